"""TLS between a client and halephant: how a connection begins TLS, what `client_tls.mode` asks of a
client at its StartupMessage, and how a failed handshake is told in the log.

A connection begins TLS in one of two ways, as PostgreSQL 17's server allows. The classic one: an
SSLRequest, answered `S` only over TCP while the configuration has a context
(`Config.client_tls_context`), after the check that nothing came behind the request (bytes sent before
the answer would be taken as encrypted: CVE-2021-23222). Direct TLS (libpq 17's `sslnegotiation=direct`):
the first byte of the connection is that of a TLS handshake record (0x16, which cannot begin a startup
packet: its length would be hundreds of megabytes), and the handshake starts at once. Direct TLS needs
the context and TCP too; without them the connection is closed without a byte, and logged, as
PostgreSQL closes it (a plaintext ErrorResponse is no TLS record: the client could not read it).

Either way halephant reads the client's first TLS record itself (`hello_complete`), then hands it to the
loop's `start_tls`, whose TLS layer is fed these bytes once it has taken the connection over
(`ClientConnection._handshake`), so that halephant sees what the client offered for ALPN
(`offered_alpn`): Python's `ssl` gives no access to it, and its server chooses no protocol, rather than
failing the handshake, when a client offers none halephant speaks. While this runs the client is in
the state HANDSHAKE, in which `login_timeout` closes it (the client sweep, as any login) without writing
anything, since an ErrorResponse in plaintext would break the handshake rather than be read.

ALPN (`alpn_refusal`), as PostgreSQL 17: the context selects `postgresql` for a client that offers it.
Direct TLS requires it (a client that offered none, or only other protocols, is refused: there is
nothing else to tell it speaks PostgreSQL's protocol); after an SSLRequest a client may offer none
(libpq before 17), but one that offers ALPN must offer `postgresql`. A refusal is logged and closed as a
failed handshake. Once the handshake is done the client's `transport` is the TLS one, so everything
that writes to the client (the relay of its server's answers included) writes through TLS, and the
StartupMessage is read over it by a new `StartupFramer`; another SSLRequest or GSSENCRequest inside
TLS is FATAL 08P01. A Unix-domain socket client is answered `N` and may log in in plaintext whatever
the mode, as PostgreSQL answers it and as its pg_hba.conf's `local` lines are apart from `hostssl`.

At the StartupMessage (`login_refusal`): `require` and the verify modes refuse a plaintext TCP client
with FATAL 28000 and a hint to use sslmode=require; `verify-ca` refuses one that sent no certificate
(a certificate it sent that `ca_file` does not sign has already failed the handshake) with
PostgreSQL's "connection requires a valid client certificate"; `verify-full` also refuses one whose
certificate's CN is not the user name, as PostgreSQL's `clientcert=verify-full`. The mode that counts
is the running configuration's when the StartupMessage comes. Cancel requests need no TLS in any
mode: libpq sends them in plaintext.
"""

from __future__ import annotations

import ssl
import struct
from typing import Any

from halephant import sqlstate
from halephant.config.schema import TLS_REQUIRED, TLS_VERIFIED, ClientTlsConfig
from halephant.errors import ClientError

__all__ = [
    "ALPN",
    "HANDSHAKE_RECORD",
    "alpn_refusal",
    "certificate_refusal",
    "failure",
    "hello_complete",
    "login_refusal",
    "offered_alpn",
    "peer_address",
]

#: the first byte of a TLS handshake record: a connection that begins with it is direct TLS
HANDSHAKE_RECORD = 0x16
#: the ALPN protocol name of PostgreSQL's protocol (PostgreSQL 17)
ALPN = "postgresql"
#: the largest TLS record (2^14 bytes of plaintext, with room for expansion, and its header): a longer
#: one is not waited for, OpenSSL refuses it
_MAX_RECORD = 5 + 2**14 + 2048
_RECORD = struct.Struct("!BHH")  # content type, legacy version, length
_EXTENSION = struct.Struct("!HH")  # type, length
_EXT_ALPN = 16  # application_layer_protocol_negotiation (RFC 7301)


def peer_address(transport: Any) -> str:
    """The client's address as the log and `ClientInfo.address` write it: `host:port`, or `unix`."""
    try:
        peer = transport.get_extra_info("peername")
    except Exception:  # uvloop asks the socket, and a closed Unix-domain transport has none: not in a log
        return "?"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")


def over_tcp(transport: Any) -> bool:
    """A TCP connection (a Unix-domain socket's peer name is a path, or empty)."""
    return isinstance(transport.get_extra_info("peername"), tuple)


def login_refusal(
    settings: ClientTlsConfig, ssl_object: ssl.SSLObject | None, user: str, tcp: bool
) -> tuple[ClientError, str] | None:
    """The FATAL a client's StartupMessage gets under `settings` (None: let in), and the reason to log."""
    mode = settings.mode
    if mode not in TLS_REQUIRED or not tcp:
        return None
    if ssl_object is None:
        return (
            ClientError(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                "SSL required",
                hint="halephant accepts only encrypted connections over TCP: connect with sslmode=require "
                "(or verify-ca, verify-full).",
                fatal=True,
            ),
            f"SSL required (client_tls.mode: {mode}): the client connected without TLS",
        )
    if mode not in TLS_VERIFIED:
        return None
    return certificate_refusal(ssl_object, user, mode == "verify-full", f"client_tls.mode: {mode}")


def certificate_refusal(
    ssl_object: ssl.SSLObject | None, user: str, check_cn: bool, why: str
) -> tuple[ClientError, str] | None:
    """The FATAL 28000 for a client without a certificate that `client_tls.ca_file` verified, or (with
    `check_cn`) whose certificate's CN is not `user`, as PostgreSQL words them, and the reason to log
    (`why`: what asked for the certificate); None: the certificate is good. The `cert` authentication
    method (`halephant.types.Cert`) is this check with `check_cn`."""
    # empty unless a certificate was sent and verified (a context that asked for none verifies none)
    certificate = ssl_object.getpeercert() if ssl_object is not None else None
    if not certificate:
        return (
            ClientError(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                "connection requires a valid client certificate",
                fatal=True,
            ),
            f"no client certificate ({why})",
        )
    if check_cn:
        cn = common_name(certificate)
        if cn != user:
            return (
                ClientError(
                    sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                    f'certificate authentication failed for user "{user}"',
                    fatal=True,
                ),
                f"the client certificate's CN ({cn!r}) is not the user name ({why})",
            )
    return None


def common_name(certificate: dict[str, Any]) -> str | None:
    """The first commonName of a certificate's subject, as `SSLObject.getpeercert()` gives it."""
    for rdn in certificate.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def failure(exc: BaseException | None) -> str:
    """Why a handshake failed (`None`: the connection ended), in a few words for the log."""
    if exc is None or isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return "the client closed the connection"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason.replace("_", " ").lower() if exc.reason else str(exc)
    return str(exc) or type(exc).__name__


def hello_complete(data: bytes | bytearray) -> bool:
    """Whether the client's first TLS record is whole in `data` (then it goes to the TLS layer), or
    `data` is no TLS handshake record, which the TLS layer refuses at once."""
    if not data:
        return False
    if data[0] != HANDSHAKE_RECORD:
        return True
    if len(data) < _RECORD.size:
        return False
    length: int = _RECORD.unpack_from(data)[2]
    return _RECORD.size + length > _MAX_RECORD or len(data) >= _RECORD.size + length


def offered_alpn(hello: bytes) -> tuple[str, ...] | None:
    """The ALPN protocols a ClientHello (`hello`: the client's first TLS record) offers; None when it
    offers none, or is not one this reads (a ClientHello cut over several records).

    The ClientHello (RFC 8446 4.1.2): the record header, the handshake header (type 1), the version and
    random, then a session id, the cipher suites and the compression methods, each behind its length,
    then the extensions."""
    try:
        content_type, _version, length = _RECORD.unpack_from(hello)
        if content_type != HANDSHAKE_RECORD or hello[5] != 1:
            return None
        end = min(len(hello), _RECORD.size + length)
        pos = _RECORD.size + 4 + 2 + 32
        pos += 1 + hello[pos]  # legacy_session_id
        pos += 2 + int.from_bytes(hello[pos : pos + 2])  # cipher_suites
        pos += 1 + hello[pos]  # legacy_compression_methods
        end = min(end, pos + 2 + int.from_bytes(hello[pos : pos + 2]))
        pos += 2
        while pos + _EXTENSION.size <= end:
            kind, size = _EXTENSION.unpack_from(hello, pos)
            pos += _EXTENSION.size
            if kind == _EXT_ALPN:
                names = hello[pos + 2 : min(pos + size, end)]
                offered = []
                i = 0
                while i < len(names):
                    offered.append(names[i + 1 : i + 1 + names[i]].decode("ascii", "replace"))
                    i += 1 + names[i]
                return tuple(offered)
            pos += size
    except (IndexError, struct.error):
        return None
    return None


def alpn_refusal(direct: bool, selected: str | None, offered: tuple[str, ...] | None) -> str | None:
    """Why a completed handshake is refused for its ALPN (None: it is not), for the log: `direct`: the
    connection began with TLS; `selected`: the protocol the handshake chose; `offered`: the client's."""
    if selected == ALPN:
        return None
    if offered:
        listed = ", ".join(repr(name) for name in offered)
        return f"the client offered the ALPN protocol(s) {listed}, not {ALPN!r}"
    if direct:
        return f"direct TLS without ALPN: a client that begins with TLS must offer {ALPN!r} (libpq 17+ does)"
    return None
