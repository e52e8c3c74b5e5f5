"""The TLS context halephant presents to clients (`client_tls:`), built once per configuration load.

`load_client_tls` reads `cert_file`, `key_file` and `ca_file` and makes the `ssl.SSLContext` every
TLS handshake of that configuration's lifetime runs with (after an SSLRequest, or direct), so that
`halephant check`, start-up and a reload find a file that cannot be used (`halephant.tls_files`:
missing, not PEM, a key others may read, encrypted or not the certificate's), each reported at its key
in the file (`TlsFileProblem`), and no client meets them.
Connections keep the context they were made with: a reload gives new connections the new one.

The context follows PostgreSQL's server: `min_version` (TLSv1.2 by default), no renegotiation, no
session tickets (libpq never resumes a session), ALPN `postgresql` for a client that offers it (Python's
`ssl` then chooses none for a client that offers only other protocols, and direct TLS needs it: what
PostgreSQL refuses there is refused after the handshake, `halephant.proxy.client_tls`). In
`verify-ca` and `verify-full` a client certificate is asked for and checked against `ca_file` during
the handshake (one that does not verify fails it); one that sends none completes the handshake and is
refused at its StartupMessage with PostgreSQL's FATAL 28000, which says why where a failed handshake
says little (`halephant.proxy.client_tls`).

`channel_binding(context)` is the `tls-server-end-point` data of the certificate a connection was made
with, which SCRAM-SHA-256-PLUS binds the login to (`halephant.auth.server_side`): the certificate's
hash with its signature's hash function (`halephant.tls_files.end_point_hash`), once per load.
"""

from __future__ import annotations

import hashlib
import ssl
import weakref
from dataclasses import dataclass

from halephant.config.schema import TLS_VERIFIED, ClientTlsConfig
from halephant.tls_files import (
    VERSIONS,
    TlsFileProblem,
    end_point_hash,
    load_key_pair,
    read_certificates,
    set_ciphers,
)

__all__ = ["ClientTls", "TlsFileProblem", "channel_binding", "fingerprint", "load_client_tls"]

#: each context's `tls-server-end-point` data, for the connections made with it (`channel_binding`)
_END_POINTS: weakref.WeakKeyDictionary[ssl.SSLContext, bytes] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class ClientTls:
    """What `client_tls:` loaded: the server-side context, and its certificate's fingerprint."""

    context: ssl.SSLContext
    #: SHA-256 of the certificate (DER), as `openssl x509 -fingerprint -sha256` shows it
    fingerprint: str


def fingerprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def channel_binding(context: ssl.SSLContext) -> bytes | None:
    """The `tls-server-end-point` channel binding data (RFC 5929) of the connections made with `context`:
    the hash of halephant's certificate that SCRAM-SHA-256-PLUS binds a login to; None when the
    certificate's signature names no hash (Ed25519), and then SCRAM-SHA-256-PLUS is not offered."""
    return _END_POINTS.get(context)


def load_client_tls(section: ClientTlsConfig) -> ClientTls | None:
    """The context for `section` (its paths absolute: the schema checks); None when it names no
    certificate (then `mode` is `disable`: the loader checks that). Raises `TlsFileProblem`."""
    if section.cert_file is None or section.key_file is None:
        return None
    cert_pem = read_certificates("cert_file", section.cert_file)
    # the first certificate is halephant's own (intermediates follow it): its fingerprint and binding
    start = cert_pem.find(ssl.PEM_HEADER)
    first = ssl.PEM_cert_to_DER_cert(
        cert_pem[start : cert_pem.index(ssl.PEM_FOOTER, start) + len(ssl.PEM_FOOTER)]
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_key_pair(context, section.cert_file, section.key_file)
    if section.ca_file is not None:
        read_certificates("ca_file", section.ca_file)
        try:
            context.load_verify_locations(cafile=section.ca_file)
        except (ssl.SSLError, OSError) as exc:  # (replaced since it was read above)
            raise TlsFileProblem("ca_file", f"cannot load {section.ca_file}: {exc}") from None
    context.minimum_version = VERSIONS[section.min_version]
    set_ciphers(context, section.ciphers)
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
