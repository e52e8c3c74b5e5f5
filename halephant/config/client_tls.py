"""The TLS context halephant presents to clients (`client_tls:`), built once per configuration load.

`load_client_tls` reads `cert_file`, `key_file` and `ca_file` and makes the `ssl.SSLContext` every
SSLRequest of that configuration's lifetime is answered with, so that `halephant check`, start-up and a
reload find a missing file, a file that is not PEM, an encrypted key or a key that does not belong to
the certificate, each reported at its key in the file (`TlsFileProblem`), and no client meets them.
Connections keep the context they were made with: a reload gives new connections the new one.

The context follows PostgreSQL's server: `min_version` (TLSv1.2 by default), no renegotiation, no
session tickets (libpq never resumes a session), ALPN `postgresql` for a client that offers it. In
`verify-ca` and `verify-full` a client certificate is asked for and checked against `ca_file` during
the handshake (one that does not verify fails it); one that sends none completes the handshake and is
refused at its StartupMessage with PostgreSQL's FATAL 28000, which says why where a failed handshake
says little (`halephant.proxy.client_tls`).

`channel_binding(context)` is the `tls-server-end-point` data of the certificate a connection was made
with, which SCRAM-SHA-256-PLUS binds the login to (`halephant.auth.server_side`): the certificate's
hash with its signature's hash function, read from the DER here once per load.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import weakref
from dataclasses import dataclass

from halephant.config.schema import TLS_VERIFIED, ClientTlsConfig

__all__ = ["ClientTls", "TlsFileProblem", "channel_binding", "fingerprint", "load_client_tls"]

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

#: each context's `tls-server-end-point` data, for the connections made with it (`channel_binding`)
_END_POINTS: weakref.WeakKeyDictionary[ssl.SSLContext, bytes] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class ClientTls:
    """What `client_tls:` loaded: the server-side context, and its certificate's fingerprint."""

    context: ssl.SSLContext
    #: SHA-256 of the certificate (DER), as `openssl x509 -fingerprint -sha256` shows it
    fingerprint: str


class TlsFileProblem(Exception):
    """A file of `client_tls:` that cannot be used; `key` is the setting that names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class _Encrypted(Exception):
    """Raised by the passphrase callback: OpenSSL would otherwise ask for one on the terminal."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def fingerprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _read(key: str, path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TlsFileProblem(key, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise TlsFileProblem(key, f"{path} is not a PEM file") from None


def channel_binding(context: ssl.SSLContext) -> bytes | None:
    """The `tls-server-end-point` channel binding data (RFC 5929) of the connections made with `context`:
    the hash of halephant's certificate that SCRAM-SHA-256-PLUS binds a login to; None when the
    certificate's signature names no hash (Ed25519), and then SCRAM-SHA-256-PLUS is not offered."""
    return _END_POINTS.get(context)


# The hash of a certificate's signature algorithm, by the algorithm's OID (DER contents): RFC 5929
# takes SHA-256 for MD5 and SHA-1, the signature's own hash otherwise.
_SIGNATURE_HASHES = {
    bytes.fromhex("2a864886f70d010104"): "sha256",  # md5WithRSAEncryption
    bytes.fromhex("2a864886f70d010105"): "sha256",  # sha1WithRSAEncryption
    bytes.fromhex("2a864886f70d01010e"): "sha224",
    bytes.fromhex("2a864886f70d01010b"): "sha256",
    bytes.fromhex("2a864886f70d01010c"): "sha384",
    bytes.fromhex("2a864886f70d01010d"): "sha512",
    bytes.fromhex("2a8648ce3d0401"): "sha256",  # ecdsa-with-SHA1
    bytes.fromhex("2a8648ce3d040301"): "sha224",
    bytes.fromhex("2a8648ce3d040302"): "sha256",
    bytes.fromhex("2a8648ce3d040303"): "sha384",
    bytes.fromhex("2a8648ce3d040304"): "sha512",
}
_RSASSA_PSS = bytes.fromhex("2a864886f70d01010a")
#: the hashes RSASSA-PSS parameters may name (SHA-1 when they name none)
_PSS_HASHES = {
    bytes.fromhex("2b0e03021a"): "sha256",  # sha1
    bytes.fromhex("608648016503040204"): "sha224",
    bytes.fromhex("608648016503040201"): "sha256",
    bytes.fromhex("608648016503040202"): "sha384",
    bytes.fromhex("608648016503040203"): "sha512",
}


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """The DER element at `pos`: (tag, start of its contents, end of its contents)."""
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[pos : pos + size], "big")
        pos += size
    return tag, pos, pos + length


def end_point_hash(der: bytes) -> bytes | None:
    """`tls-server-end-point` data for a certificate (DER): its hash, with the hash function its
    signature algorithm names; None when it names none (Ed25519, Ed448) or cannot be read."""
    try:
        _tag, certificate, _end = _tlv(der, 0)
        _tag, _start, tbs_end = _tlv(der, certificate)  # tbsCertificate
        _tag, algorithm, algorithm_end = _tlv(der, tbs_end)  # signatureAlgorithm
        _tag, oid_start, oid_end = _tlv(der, algorithm)
        oid = der[oid_start:oid_end]
        name = _SIGNATURE_HASHES.get(oid)
        if oid == _RSASSA_PSS:
            name = "sha256"  # the parameters' default hash, SHA-1
            if oid_end < algorithm_end:
                _tag, params, params_end = _tlv(der, oid_end)  # RSASSA-PSS-params
                if params < params_end and der[params] == 0xA0:  # [0] hashAlgorithm
                    _tag, explicit, _end = _tlv(der, params)
                    _tag, hash_algorithm, _end = _tlv(der, explicit)
                    _tag, start, end = _tlv(der, hash_algorithm)
                    name = _PSS_HASHES.get(der[start:end])
    except IndexError:
        return None
    return hashlib.new(name, der).digest() if name is not None else None


def load_client_tls(section: ClientTlsConfig, base_dir: str) -> ClientTls | None:
    """The context for `section`, its relative paths taken from `base_dir`; None when it names no
    certificate (then `mode` is `disable`: the loader checks that). Raises `TlsFileProblem`."""
    if section.cert_file is None or section.key_file is None:
        return None
    cert_file = os.path.join(base_dir, section.cert_file)
    key_file = os.path.join(base_dir, section.key_file)
    cert_pem = _read("cert_file", cert_file)
    _read("key_file", key_file)
    # the certificate on its own first: load_cert_chain's error would not say which file is wrong
    start = cert_pem.find(ssl.PEM_HEADER)
    end = cert_pem.find(ssl.PEM_FOOTER, max(start, 0)) + len(ssl.PEM_FOOTER)
    try:
        if start < 0 or end < len(ssl.PEM_FOOTER):
            raise ValueError
        first = ssl.PEM_cert_to_DER_cert(cert_pem[start:end])
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_pem)
    except (ValueError, ssl.SSLError):
        raise TlsFileProblem("cert_file", f"{cert_file} holds no PEM certificate") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _Encrypted:
        raise TlsFileProblem(
            "key_file", f"{key_file} is encrypted: halephant takes no passphrase, give it the key unencrypted"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"the private key in {key_file} does not belong to the certificate in {cert_file}"
        else:
            message = f"{key_file} holds no PEM private key"
        raise TlsFileProblem("key_file", message) from None
    except OSError as exc:  # (removed or made unreadable since it was read above)
        raise TlsFileProblem("key_file", f"cannot read {key_file}: {exc.strerror or exc}") from None
    if section.ca_file is not None:
        ca_file = os.path.join(base_dir, section.ca_file)
        _read("ca_file", ca_file)
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError:
            raise TlsFileProblem("ca_file", f"{ca_file} holds no PEM certificate") from None
        except OSError as exc:
            raise TlsFileProblem("ca_file", f"cannot read {ca_file}: {exc.strerror or exc}") from None
    context.minimum_version = _VERSIONS[section.min_version]
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    context.num_tickets = 0
    context.set_alpn_protocols(["postgresql"])
    # CERT_OPTIONAL: a certificate that is sent must verify, and one that is not sent is refused at
    # the StartupMessage with a message that says so (see the module's docstring)
    context.verify_mode = ssl.CERT_OPTIONAL if section.mode in TLS_VERIFIED else ssl.CERT_NONE
    end_point = end_point_hash(first)
    if end_point is not None:
        _END_POINTS[context] = end_point
    return ClientTls(context, fingerprint(first))
