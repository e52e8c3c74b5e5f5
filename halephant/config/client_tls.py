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
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass

from halephant.config.schema import TLS_VERIFIED, ClientTlsConfig

__all__ = ["ClientTls", "TlsFileProblem", "fingerprint", "load_client_tls"]

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


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
    return ClientTls(context, fingerprint(first))
