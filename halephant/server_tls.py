"""TLS from halephant to PostgreSQL nodes (`clusters.<name>.tls`), as libpq's `sslmode` and PgBouncer's
`server_tls_*`: the SSL context of each cluster, and the SSLRequest that starts TLS on a new connection.

`ServerTls.build` turns a cluster's settings into one `ssl.SSLContext`, once per configuration load (the
loader builds every cluster's as it validates the file, so that a certificate or key that cannot be
loaded is reported at its `file:line:col`; `Config.server_tls` hands it out). A TCP connection to a
node then starts as PostgreSQL's protocol wants (`open_connection` for asyncio protocols: pooled
servers and the shared LISTEN connection; `open_stream` for anyio streams: topology probes and cancel
requests): the 8-byte SSLRequest, and one byte back, `S` (the TLS handshake follows, on the same
socket, before any byte of the protocol) or `N` (the server has `ssl = off`: plaintext from there on,
unless the mode requires TLS). The socket is handed to the event loop already connected, so a
connection's messages take exactly the path they take without TLS: only its transport differs.

Modes, as libpq's: `disable` sends no SSLRequest; `prefer` (the default) uses TLS when the server
offers it, without checking its certificate, which protects from eavesdropping but not from an
active attacker (who can answer `N`, or present any certificate); `require` fails when the server
does not offer TLS, still without checking the certificate; `verify-ca` checks that a CA of
`ca_file` signed it; `verify-full` also that it names the node's host (`server_hostname`, also sent
as SNI unless the host is an IP address). Nodes given as a Unix-socket directory never use TLS,
whatever the mode (libpq ignores sslmode there too): `halephant.unix_socket` decides that.

A login refused over TLS with `prefer` is tried once more, on a new connection without TLS (no
SSLRequest), as libpq's `sslmode=prefer` does: so a node whose pg_hba.conf lets a role in by a
`hostnossl` line only is still served. libpq's rule (fe-connect.c, `PQconnectPoll`): the server
answered the startup with an ErrorResponse before AuthenticationOk, whatever its SQLSTATE (a wrong
password too: libpq sends it again in plaintext), except 57P03 (cannot connect now: the server is
starting or stopping, and plaintext would fare no better). An error after AuthenticationOk (an unknown
database, too many connections for the role), the connection lost, or a failure of halephant's own
(no password to answer with, channel binding refused) is not tried again; nor is a TLS handshake that
fails (libpq's `prefer` tries that one in plaintext too): it raises as below. `retries_in_plaintext`
is the rule; each path that logs in (pooled servers and the shared LISTEN connection:
`halephant.proxy.server`; probes and auth_query lookups: `halephant.node_streams`) applies it and logs
the retry (`log_plaintext_retry`). When the plaintext login is refused as well, the refusal reported
is the plaintext one's, unless it only says that TLS is required (`only_tls_accepted`): then the one
over TLS says what is wrong.

Failures: the server answering `N` where TLS is required, a certificate that does not verify, and a
handshake that fails for another reason (no common protocol version) raise `TlsRefused`, a refused
login (28000): the node answers, it is not down, and logging in again at once would fail the same way.
The server closing the connection during the negotiation is the connection failing (an OSError).

`transport_certificate` (asyncio transports) and `stream_certificate` (anyio streams) give the
certificate the node presented on a connection, which the login binds to (SCRAM-SHA-256-PLUS:
`halephant.auth.upstream`), whatever the mode: unverified, it is still the certificate this
connection's TLS session was made with, so a relay presenting another one cannot use the login.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSStream

from halephant import sqlstate
from halephant.errors import ClientError, ProtocolViolation
from halephant.protocol import messages as m
from halephant.tls_files import VERSIONS, TlsFileProblem, load_key_pair, read_certificates, set_ciphers

if TYPE_CHECKING:
    from halephant.config.schema import ServerTlsConfig

__all__ = [
    "REQUIRED_MODES",
    "SYSTEM_CA",
    "Refusal",
    "ServerTls",
    "TlsFileProblem",
    "TlsRefused",
    "describe",
    "log_plaintext_retry",
    "only_tls_accepted",
    "open_connection",
    "open_stream",
    "retries_in_plaintext",
    "stream_certificate",
    "transport_certificate",
]

log = logging.getLogger("halephant.server")

#: the modes that fail rather than go on in plaintext
REQUIRED_MODES: Final = frozenset(("require", "verify-ca", "verify-full"))
#: `ca_file: system`: this machine's trusted CAs (libpq 16's `sslrootcert=system`)
SYSTEM_CA: Final = "system"


class TlsRefused(ClientError):
    """No TLS connection to a node as its cluster's settings ask for one (see the module docstring)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, message, hint=hint, fatal=True)


@dataclass(frozen=True, slots=True, eq=False)
class ServerTls:
    """One cluster's TLS to its nodes: the mode, and the context (None with `disable`); `settings`, what
    they were made from (a reload that changes them replaces the cluster's server connections)."""

    cluster: str
    settings: ServerTlsConfig
    context: ssl.SSLContext | None

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def required(self) -> bool:
        """A connection fails rather than go on in plaintext."""
        return self.mode in REQUIRED_MODES

    @classmethod
    def build(cls, cluster: str, settings: ServerTlsConfig) -> ServerTls:
        """The context `settings` ask for, with its files loaded; raises TlsFileProblem."""
        mode = settings.mode
        files = {"ca_file": settings.ca_file, "cert_file": settings.cert_file, "key_file": settings.key_file}
        if mode == "disable":
            for key, value in {**files, "ciphers": settings.ciphers}.items():
                if value is not None:
                    raise TlsFileProblem(
                        key,
                        f"mode is disable (no TLS), so {key} is never used: remove it, or pick another mode",
                    )
            return cls(cluster, settings, None)
        verify = mode in ("verify-ca", "verify-full")
        ca_file = settings.ca_file
        if verify and ca_file is None:
            raise TlsFileProblem(
                "mode",
                f"{mode} checks the server's certificate against ca_file: set ca_file to the CA "
                f"certificate(s) that signed it (PEM), or to {SYSTEM_CA} for this machine's trusted CAs",
            )
        if not verify and ca_file is not None:
            raise TlsFileProblem(
                "ca_file",
                f"with mode {mode} the server's certificate is not checked, and ca_file would be ignored: "
                "set mode to verify-ca or verify-full, or remove ca_file",
            )
        if ca_file == SYSTEM_CA and mode != "verify-full":
            # any public CA signs certificates for names of anyone's: only the name check makes them mean
            # something (libpq refuses sslrootcert=system below verify-full too)
            raise TlsFileProblem("ca_file", f"ca_file: {SYSTEM_CA} needs mode verify-full, as libpq's does")
        if (settings.cert_file is None) != (settings.key_file is None):
            missing, given = (
                ("key_file", "cert_file") if settings.key_file is None else ("cert_file", "key_file")
            )
            raise TlsFileProblem(given, f"{given} needs {missing} too: the client certificate and its key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = VERSIONS[settings.min_version]
        set_ciphers(context, settings.ciphers)
        if verify:
            context.check_hostname = mode == "verify-full"
            context.verify_mode = ssl.CERT_REQUIRED
            if ca_file == SYSTEM_CA:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            elif ca_file is not None:
                context.load_verify_locations(cadata=read_certificates("ca_file", ca_file))
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if settings.cert_file is not None and settings.key_file is not None:
            load_key_pair(context, settings.cert_file, settings.key_file)
        return cls(cluster, settings, context)

    # --- the negotiation ---

    def wants_tls(self, answer: bytes, where: str) -> bool:
        """What the server's answer to the SSLRequest means: True to start the handshake, False to go on
        in plaintext. Raises TlsRefused (TLS required, not offered), ProtocolViolation (not an answer to
        an SSLRequest) or ConnectionError (no answer)."""
        if answer == b"S":
            return True
        if answer == b"N":
            if self.required:
                raise TlsRefused(
                    f"server does not support SSL, but SSL was required (server {where}, "
                    f"clusters.{self.cluster}.tls.mode {self.mode})",
                    hint="The server has ssl = off in postgresql.conf: turn it on there, or set "
                    f"clusters.{self.cluster}.tls.mode to prefer (TLS when the server offers it) or disable.",
                )
            return False
        if not answer:
            raise ConnectionError("the server closed the connection in answer to the SSL request")
        raise ProtocolViolation(
            f"received invalid response to SSL negotiation from server {where}: {answer!r}"
        )

    def handshake_failed(self, exc: ssl.SSLError, where: str) -> Exception:
        """What a failed TLS handshake with the server at `where` is, for the caller to raise."""
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return ConnectionError("the server closed the connection during the TLS handshake")
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = (exc.verify_message or str(exc)).rstrip(". ")
            return TlsRefused(
                f"server certificate verification failed: {why} (server {where}, "
                f"clusters.{self.cluster}.tls.mode {self.mode})",
                hint=f"clusters.{self.cluster}.tls.ca_file must hold the CA certificate that signed the "
                "server's certificate"
                + (
                    ", and the certificate must name the node's host as written in nodes: (DNS name or IP "
                    "address among its subject alternative names), or use mode verify-ca."
                    if self.mode == "verify-full"
                    else "."
                ),
            )
        return TlsRefused(
            f"TLS handshake with server {where} failed: {exc.reason or exc} "
            f"(clusters.{self.cluster}.tls.mode {self.mode})",
            hint=f"Compare clusters.{self.cluster}.tls (min_version, ciphers, cert_file) with the server's "
            "ssl_* settings; the server's log says more.",
        )


# --- the plaintext retry of `prefer` ---

#: a login refusal: the SQLSTATE and message of the ErrorResponse the server answered it with
Refusal = tuple[str, str]


def retries_in_plaintext(tls: ServerTls | None, encrypted: bool, refusal: Refusal | None) -> bool:
    """libpq's rule (module docstring): a login over TLS (`encrypted`) with mode prefer that the server
    refused before AuthenticationOk (`refusal`, None for any other failure) is tried again without TLS."""
    return (
        tls is not None
        and tls.mode == "prefer"
        and encrypted
        and refusal is not None
        and refusal[0] != sqlstate.CANNOT_CONNECT_NOW
    )


def log_plaintext_retry(tls: ServerTls, host: str, port: int, refusal: Refusal, what: str) -> None:
    """One line for a retry in plaintext: what (`what`: "server connection", "probe", ...) and why."""
    log.info(
        "%s to server %s: login over SSL refused (%s %s): trying again without SSL "
        "(clusters.%s.tls.mode prefer, as libpq's sslmode=prefer)",
        what,
        _address(host, port),
        refusal[0],
        refusal[1],
        tls.cluster,
    )


def only_tls_accepted(refusal: Refusal | None) -> bool:
    """The plaintext retry was refused for being plaintext: pg_hba.conf has a `hostssl` line for the
    login and no other (PostgreSQL's message ends in `no encryption`). The refusal over TLS (a wrong
    password, say) is then the one that says what is wrong, and the one to report."""
    return (
        refusal is not None
        and refusal[0] == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION
        and refusal[1].endswith("no encryption")
    )


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """`TLSv1.3/TLS_AES_256_GCM_SHA384` for a connection's TLS session, "" for none (SHOW SERVERS)."""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0]}" if cipher else str(ssl_object.version())


def transport_certificate(transport: asyncio.BaseTransport) -> bytes | None:
    """The certificate (DER) the node presented on an asyncio connection, checked or not; None in
    plaintext."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None


def stream_certificate(stream: anyio.abc.ByteStream) -> bytes | None:
    """The certificate (DER) the node presented on an anyio stream, as `transport_certificate`."""
    certificate: bytes | None = stream.extra(TLSAttribute.peer_certificate_binary, None)
    return certificate


# --- connecting ---


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected, non-blocking TCP socket to `host`, trying each of its addresses in turn."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(exc) for exc in errors)}")


async def open_connection(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    tls: ServerTls,
) -> None:
    """Connect `factory()`'s protocol to the node at `host:port` (TCP) after the SSLRequest: over TLS when
    the server takes it, else in plaintext (unless `tls` requires TLS). Raises as the module docstring
    says, or OSError."""
    where = _address(host, port)
    sock = await _connect(loop, host, port)
    try:
        await loop.sock_sendall(sock, m.SSL_REQUEST)
        # one byte exactly: anything the server (or someone in between) sent after it would otherwise be
        # taken as if it had come over TLS
        use_tls = tls.wants_tls(await loop.sock_recv(sock, 1), where)
    except BaseException:
        sock.close()
        raise
    # from here the event loop owns the socket, and closes it if this fails
    if not use_tls:
        await loop.create_connection(factory, sock=sock)
        return
    try:
        await loop.create_connection(factory, sock=sock, ssl=tls.context, server_hostname=host)
    except ssl.SSLError as exc:
        raise tls.handshake_failed(exc, where) from None


async def open_stream(host: str, port: int, tls: ServerTls) -> anyio.abc.ByteStream:
    """An anyio stream to the node at `host:port` (TCP) after the SSLRequest, as `open_connection`."""
    where = _address(host, port)
    stream = await anyio.connect_tcp(host, port)
    try:
        await stream.send(m.SSL_REQUEST)
        try:
            answer = await stream.receive(1)
        except anyio.EndOfStream:
            answer = b""
        if not tls.wants_tls(answer, where):
            return stream
        try:
            # standard_compatible=False: PostgreSQL may close without a TLS close_notify (it ends a
            # cancel request's connection so): the end of the stream, not an error
            return await TLSStream.wrap(
                stream, hostname=host, ssl_context=tls.context, standard_compatible=False
            )
        except ssl.SSLError as exc:
            raise tls.handshake_failed(exc, where) from None
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
