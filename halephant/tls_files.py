"""The files a TLS section of halephant.yaml names (`client_tls:`, `clusters.<name>.tls`): read, checked and
loaded into an `ssl.SSLContext`, once per configuration load.

Each problem is a `TlsFileProblem` naming the setting to blame (`cert_file`, `key_file`, `ca_file`), which
the loader reports at that setting's `file:line:col`, so that `halephant check`, start-up and a reload
find a missing file, one that is not PEM, a key readable by others, an encrypted key or a key that does
not belong to its certificate, and no connection meets them. Both sides follow libpq's and PostgreSQL's
rules for a private key: owned by root with mode 0640 or less, else mode 0600 or less.

`end_point_hash` is a certificate's `tls-server-end-point` data (RFC 5929), which SCRAM-SHA-256-PLUS binds
a login to: halephant's own certificate towards clients, a node's towards PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
from typing import Final

from asn1crypto.x509 import Certificate

__all__ = [
    "VERSIONS",
    "TlsFileProblem",
    "check_key_mode",
    "end_point_hash",
    "load_key_pair",
    "read_certificates",
    "read_file",
    "set_ciphers",
]

#: `min_version`'s values
VERSIONS: Final = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsFileProblem(Exception):
    """A TLS setting that cannot be used (a file, or a cipher list); `key` is the setting to blame."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class _Passphrase(Exception):
    """A key file encrypted with a passphrase (halephant has no one to ask for it)."""


def _no_passphrase() -> str:
    raise _Passphrase


def read_file(key: str, path: str) -> bytes:
    """The file `path` that setting `key` names."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsFileProblem(key, f"cannot read {path}: {exc.strerror or exc}") from None


def read_certificates(key: str, path: str) -> str:
    """The PEM text of `path`, checked to hold at least one certificate OpenSSL takes."""
    text = read_file(key, path).decode("ascii", "replace")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError):
        raise TlsFileProblem(key, f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    return text


def check_key_mode(path: str) -> None:
    """libpq's and PostgreSQL's rule for a private key file: owned by root, read access for its group at
    most (0640 or less: a system-wide key halephant reads through a group it is in); else no access for
    others than its owner (0600 or less)."""
    try:
        found = os.stat(path)
    except OSError as exc:
        raise TlsFileProblem("key_file", f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(found.st_mode):
        raise TlsFileProblem("key_file", f"{path} is not a regular file")
    mode = stat.S_IMODE(found.st_mode)
    if mode & (0o137 if found.st_uid == 0 else 0o077):
        raise TlsFileProblem(
            "key_file",
            f"{path} has group or world access (mode {mode:04o}): a private key must have mode 0600 or "
            "less, or 0640 or less if owned by root (chmod 0600 it), as libpq requires",
        )


def load_key_pair(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Load a certificate (its chain, PEM) and its private key (PEM, unencrypted, not readable by others)
    into `context`: the one halephant presents, to clients or to the nodes."""
    read_certificates("cert_file", cert_file)
    read_file("key_file", key_file)
    check_key_mode(key_file)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _Passphrase:
        raise TlsFileProblem(
            "key_file",
            f"{key_file} is encrypted with a passphrase, which halephant has no way to ask for: give it "
            "the key decrypted (openssl pkey -in KEY -out PLAIN-KEY)",
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileProblem(
                "key_file", f"{key_file} is not the private key of the certificate in {cert_file}"
            ) from None
        raise TlsFileProblem("key_file", f"{key_file} holds no PEM private key") from None
    except OSError as exc:  # (removed or made unreadable since it was read above)
        raise TlsFileProblem("key_file", f"cannot read {key_file}: {exc.strerror or exc}") from None


#: RFC 5929: a certificate signed with MD5 or SHA-1 binds with SHA-256, any other with its signature's hash
_END_POINT_HASH = {"md5": "sha256", "sha1": "sha256"}


def end_point_hash(der: bytes) -> bytes | None:
    """`tls-server-end-point` data for a certificate (DER): its hash, with the hash function its
    signature algorithm names (RSASSA-PSS: its parameters'); None when it names none (Ed25519, Ed448)
    or the certificate cannot be read."""
    try:
        algorithm = Certificate.load(der)["signature_algorithm"]
        if algorithm.signature_algo in ("ed25519", "ed448"):  # RFC 5929 defines no hash for these
            return None
        name = algorithm.hash_algo
    except (ValueError, TypeError, KeyError):  # asn1crypto's errors: not DER, or an unknown algorithm
        return None
    name = _END_POINT_HASH.get(name, name)
    try:
        return hashlib.new(name, der).digest()
    except ValueError:
        return None


def set_ciphers(context: ssl.SSLContext, ciphers: str | None) -> None:
    """Restrict `context` to the OpenSSL cipher list `ciphers` (the `ciphers` setting; None: Python's
    defaults). It governs TLSv1.2 and older: TLSv1.3's suites are all strong, and OpenSSL keeps them."""
    if ciphers is None:
        return
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise TlsFileProblem(
            "ciphers",
            f"no cipher matches {ciphers!r}: give an OpenSSL cipher list (`openssl ciphers -v LIST` shows "
            "what one selects), e.g. HIGH:!aNULL",
        ) from None
