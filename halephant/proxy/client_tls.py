"""TLS between a client and halephant: what `client_tls.mode` asks of a client at its StartupMessage,
and how a failed handshake is told in the log.

The upgrade itself is `ClientConnection`'s (`_start_tls`): an SSLRequest is answered `S` only over TCP
while the configuration has a context (`Config.client_tls_context`), after the check that nothing came
behind the request (bytes sent before the answer would be taken as encrypted: CVE-2021-23222). Reading
stops until the loop's `start_tls` takes the connection over; while the handshake runs the client is in
the state HANDSHAKE, in which `login_timeout` closes it (the client sweep, as any login) without writing
anything, since an ErrorResponse in plaintext would break the handshake rather than be read. Once it is
done the client's `transport` is the TLS one, so everything that writes to the client (the relay of
its server's answers included) writes through TLS, and the StartupMessage is read over it by a new
`StartupFramer`; another SSLRequest or GSSENCRequest inside TLS is FATAL 08P01. A Unix-domain socket
client is answered `N` and may log in in plaintext whatever the mode, as PostgreSQL answers it and as
its pg_hba.conf's `local` lines are apart from `hostssl`.

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
from typing import Any

from halephant import sqlstate
from halephant.config.schema import TLS_REQUIRED, TLS_VERIFIED, ClientTlsConfig
from halephant.errors import ClientError

__all__ = ["certificate_refusal", "failure", "login_refusal", "peer_address"]


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
