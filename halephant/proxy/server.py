"""A server connection: logging in to PostgreSQL, then relaying its bytes to whichever client it is linked to.

`open` opens it (over TLS when its cluster's `tls:` settings and the server agree on it:
`halephant.server_tls`; the relaying below is the same either way, only the transport differs), and
with `prefer` tries a login refused over TLS again in plaintext, as libpq does. Login is
driven by callbacks (StartupMessage, the auth exchange, ParameterStatus, BackendKeyData, up to the
first ReadyForQuery) and completes `login` (a future the opener awaits under a timeout). After login,
`data_received` forwards each chunk to the linked client whole and only scans headers (BackendScanner);
the client decides at each ReadyForQuery whether the server goes back to its pool. Bytes from a server
no client is linked to (a FATAL, a stray notification) close it: an idle server must be silent.

A client that names prepared statements has its replies relayed message by message while it has requests
outstanding (`halephant.proxy.prepared`), so that halephant's own replies fall into place.

Two slower paths exist for halephant's own queries: the answers to a settings query (a client's startup
parameters and session settings) and to the queries that read or clean up a transaction-mode client's
session state (`run_internal`) are swallowed (`absorb`), and while a rejection is in flight the stream
is framed fully so the server's error for the swapped statement can be replaced by the rejection
(`arm_rewrite`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import anyio.to_thread

from halephant import sqlstate
from halephant.auth.upstream import UpstreamAuth, passthrough_unready
from halephant.errors import ClientError, ProtocolViolation
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import PASSED_AS_IT_COMES, BackendScanner, split_frames
from halephant.protocol.session_params import settings_sql
from halephant.protocol.session_queries import decode_data_row
from halephant.proxy import prepared, session_state
from halephant.proxy.output import held as _held
from halephant.server_tls import (
    Refusal,
    ServerTls,
    describe,
    log_plaintext_retry,
    only_tls_accepted,
    retries_in_plaintext,
    transport_certificate,
)
from halephant.tcp import set_tcp_options
from halephant.unix_socket import create_connection

if TYPE_CHECKING:
    from halephant.pool.pool import Pool
    from halephant.protocol.prepared import ServerStatements
    from halephant.proxy.client import ClientConnection
    from halephant.proxy.manager import PoolManager

    ServerPool = Pool["ServerConnection", ClientConnection]

log = logging.getLogger("halephant.server")

_MAX_SERVER_MESSAGE = 1 << 30
# ParameterStatus: session state changed; CopyInResponse: a COPY FROM STDIN began (its Sync accounting);
# ErrorResponse: a stale plan of a shared prepared statement (halephant.proxy.prepared);
# NotificationResponse: a server's own LISTEN delivered it (emulated LISTEN must not deliver it again).
# Only messages of these rare types are copied out; the test is made for every message anyway.
_KEEP = frozenset(
    (codes.PARAMETER_STATUS, codes.COPY_IN_RESPONSE, codes.ERROR_RESPONSE, codes.NOTIFICATION_RESPONSE)
)
_TX_IDLE = codes.TX_IDLE
#: the answer to an internal query: its rows (text format), and the error message if it failed
InternalDone = Callable[[list[list[str | None]], str | None], None]


def _unsolicited(data: bytes) -> str:
    """What an idle server sent, for the log: its first ErrorResponse or NoticeResponse."""
    try:
        frames, _ = split_frames(data, _MAX_SERVER_MESSAGE)
        for t, start, end in frames:
            if t == codes.ERROR_RESPONSE or t == codes.NOTICE_RESPONSE:
                fields = m.decode_error_fields(data[start:end])
                return f"{fields.get('S', '?')} {fields.get('C', '?')} {fields.get('M', '')}"
    except ProtocolViolation:
        pass
    return f"it sent {data[:1]!r} while idle"


class ServerLoginError(ClientError):
    """PostgreSQL refused the login (its own SQLSTATE) or broke the protocol during it."""


class ServerConnection(asyncio.Protocol):
    __slots__ = (
        "_auth",
        "_authenticated",
        "_buf",
        "_internal",
        "_internal_error",
        "_internal_rows",
        "_password",
        "_rewrites",
        "_setup_error",
        "_slow_step",
        "_startup",
        "absorb",
        "backend_key",
        "backend_pid",
        "cancelling",
        "client",
        "closing",
        "created_at",
        "dirty",
        "fatal_relayed",
        "held_cancels",
        "idle_since",
        "link_count",
        "login",
        "manager",
        "params",
        "parked",
        "paused_client",
        "pool",
        "reading_paused",
        "refusal",
        "rfq_seen",
        "scanner",
        "settings",
        "statements",
        "tls",
        "tls_used",
        "transport",
        "unresettable",
        "xact_seen",
    )

    def __init__(
        self,
        manager: PoolManager,
        pool: ServerPool,
        startup: dict[str, str],
        password: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.manager = manager
        self.pool = pool
        self._startup = startup
        self._password = password  # for a login tried again in plaintext (`open`)
        self._auth = UpstreamAuth(startup["user"], password)
        self._authenticated = False  # AuthenticationOk came
        #: the server's ErrorResponse to the login before AuthenticationOk (`server_tls.retries_in_plaintext`)
        self.refusal: Refusal | None = None
        self._slow_step = False  # login work running in a worker thread: bytes wait in _buf meanwhile
        self.login: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key = 0
        self.client: ClientConnection | None = None
        self.scanner = BackendScanner(_KEEP)
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.closing = False
        self.reading_paused = False
        #: the client whose reading this server stopped while it was slow to take that client's data
        self.paused_client: ClientConnection | None = None
        #: why this server carries session state since its last reset ("" = clean): checked at check-in
        self.dirty = ""
        self.fatal_relayed = False
        #: why no reset can make this server clean ("" = a reset can): it is closed when its client leaves
        self.unresettable = ""
        self.link_count = 0  # bumped at every link: a cancel checks it did not go stale
        #: rejections in flight, oldest first: (marker, error, ReadyForQuery count after which it is due)
        self._rewrites: deque[tuple[bytes, bytes, int]] = deque()
        #: ReadyForQuery messages relayed since the connection opened, and those that said Idle
        self.rfq_seen = 0
        self.xact_seen = 0
        #: settings applied on behalf of clients (startup parameters) beyond the server's own startup
        self.settings: dict[str, str] = {}
        #: ReadyForQuery messages still to swallow: answers to halephant's own set-up queries
        self.absorb = 0
        self._setup_error: ClientError | None = None
        #: the named statements prepared here on behalf of clients (halephant.proxy.prepared)
        self.statements: ServerStatements | None = None
        #: one entry per absorbed query, oldest first: None for a settings query, else its callback
        self._internal: deque[InternalDone | None] = deque()
        self._internal_rows: list[list[str | None]] = []
        self._internal_error: str | None = None
        #: cancel requests of the linked client that came while halephant's own query ran ahead of the
        #: client's statement: (client, done), forwarded once it has answered (`App.cancel`)
        self.held_cancels: list[tuple[ClientConnection, Callable[[], None]]] = []
        #: cancel requests sent to PostgreSQL for this server that it has not yet confirmed (closed)
        self.cancelling = 0
        #: (the client it came from,) when a check-in waits for those to be confirmed (`PoolManager.checkin`)
        self.parked: tuple[ClientConnection | None] | None = None
        #: its TLS session, `TLSv1.3/TLS_AES_256_GCM_SHA384` ("" in plaintext), for SHOW SERVERS and logs
        self.tls = ""
        #: the cluster's TLS settings it was opened with, when over TLS (its cancel requests use them too)
        self.tls_used: ServerTls | None = None

    def __repr__(self) -> str:
        state = "closing" if self.closing else ("active" if self.client else "idle")
        return f"<Server pid={self.backend_pid} {self.pool.name} {state}>"

    # --- asyncio.Protocol: login ---

    async def open(self, tls: ServerTls | None, what: str = "server connection") -> ServerConnection:
        """Connect to the pool's node, over TLS as the cluster's `tls` settings say, and log in: this
        connection once logged in, or the one opened in its place without TLS when `prefer` tries a login
        refused over TLS again (see `halephant.server_tls`; `what` it is, for that log line). Raises the
        login's error; the caller aborts this connection then (the other one is aborted here). A
        pass-through login with nothing to answer yet is refused as PostgreSQL's refusal is, without
        connecting (`halephant.auth.upstream.passthrough_unready`)."""
        unready = passthrough_unready(self._startup["user"], self._password)
        if unready is not None:
            raise unready
        await self._connect(tls)
        try:
            await self.login
            return self
        except ClientError as exc:
            refusal = self.refusal
            if tls is None or refusal is None or not retries_in_plaintext(tls, bool(self.tls), refusal):
                raise
            refused = exc
        self.abort()
        pool = self.pool
        log_plaintext_retry(tls, pool.host, pool.port, refusal, what)
        retry = ServerConnection(self.manager, pool, self._startup, self._password, self.manager.app.loop)
        retry.created_at = self.created_at  # a reload meanwhile outdates it as it would have this one
        try:
            await retry._connect(None)
            await retry.login
        except ClientError:
            retry.abort()
            if only_tls_accepted(retry.refusal):
                raise refused from None
            raise
        except BaseException:
            retry.abort()
            raise
        return retry

    async def _connect(self, tls: ServerTls | None) -> None:
        """Connect to the pool's node, over TLS as `tls` says (None: plaintext); the login starts as the
        connection is made, and completes `login`."""
        pool = self.pool
        await create_connection(self.manager.app.loop, lambda: self, pool.host, pool.port, tls)
        if self.tls:
            self.tls_used = tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio's; both loops set TCP_NODELAY themselves
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            set_tcp_options(sock, self.manager.app.config.limits)
        self.tls = describe(transport.get_extra_info("ssl_object"))
        self._auth.bind(transport_certificate(transport))
        self.transport.write(m.startup_message(self._startup))

    def _login_data(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        frames, consumed = split_frames(buf, 1 << 20)
        self._buf = buf[consumed:]
        assert self.transport is not None
        for t, start, end in frames:
            payload = buf[start:end]
            if t == codes.AUTHENTICATION:
                code, rest = m.decode_authentication(payload)
                if code == 0:
                    self._authenticated = True
                slow = self._auth.slow_step(code, rest)
                if slow is not None:
                    # a key derivation (a user's first SCRAM login, milliseconds to seconds): in a worker
                    # thread, not blocking every client; this message is taken again once it is done
                    self._buf = buf[start - 5 :]
                    self._slow_step = True
                    self.manager.app.spawn(self._login_slow_step, slow)
                    return
                reply = self._auth.respond(code, rest)
                if reply is not None:
                    self.transport.write(reply)
            elif t == codes.PARAMETER_STATUS:
                name, value = m.decode_parameter_status(payload)
                self.params[name] = value
            elif t == codes.BACKEND_KEY_DATA:
                self.backend_pid, self.backend_key = m.decode_backend_key_data(payload)
            elif t == codes.ERROR_RESPONSE:
                fields = m.decode_error_fields(payload)
                state, message = fields.get("C", sqlstate.CONNECTION_FAILURE), fields.get("M", "login failed")
                if not self._authenticated:
                    self.refusal = (state, message)
                raise ServerLoginError(
                    state,
                    message,
                    hint=fields.get("H"),
                    detail=fields.get("D"),
                    fatal=True,
                )
            elif t == codes.READY_FOR_QUERY:
                if consumed != len(buf) or end != consumed:
                    raise ProtocolViolation("server sent data after its first ReadyForQuery")
                if not self.login.done():
                    self.login.set_result(None)
                return
            # NoticeResponse, NegotiateProtocolVersion: nothing to do

    def _logging_in(self, data: bytes) -> None:
        try:
            self._login_data(data)
        except Exception as exc:  # a hostile or broken server must not take the proxy down
            self._login_failed(exc)

    def _login_failed(self, exc: Exception) -> None:
        """The login failed: a refusal as the server gave it (a ClientError), anything else as 08006."""
        if not self.login.done():
            if not isinstance(exc, ClientError):
                exc = ServerLoginError(sqlstate.CONNECTION_FAILURE, f"login failed: {exc!r}")
            self.login.set_exception(exc)
        self.abort()

    async def _login_slow_step(self, work: Callable[[], None]) -> None:
        try:
            await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except Exception as exc:  # this login fails, not the proxy (a spawned task's error would stop it)
            self._login_failed(exc)
            return
        finally:
            self._slow_step = False
        if not self.login.done() and not self.closing:
            self._logging_in(b"")  # the message that needed the work, and any that came meanwhile
        # else timed out or lost meanwhile: the keys are cached for the next login all the same

    # --- asyncio.Protocol: relaying ---

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            if self.absorb or client.prepared is not None or self._rewrites:
                self._special_data(data, client)
                return
            # the hot path: `_relay`, inlined (this runs for every chunk a server sends)
            sc = self.scanner
            try:
                ready = sc.feed(data)
            except ProtocolViolation as exc:
                self._lost_with_client(client, f"protocol violation from server: {exc.message}")
                return
            if ready:
                self.rfq_seen += ready
                status = sc.status
                if status == _TX_IDLE:
                    self.xact_seen += 1
                    # `_to_client(data, client, True)`, inlined too: once per transaction
                    if client.held_output is None and not _held and len(self.pool.active) < 2:
                        client.transport.write(data)
                    else:
                        client.hold(data)
                else:
                    if client.statement_mode:
                        data = client.withheld_ready(data, ready, status)
                    self._to_client(data, client, False)
                if sc.kept:
                    self._kept(sc.kept, client, ready)
                client.server_ready(ready, status, sc.at_boundary)
            else:
                self._to_client(data, client, False)
                if sc.kept:
                    self._kept(sc.kept, client)
            return
        if not self.login.done():
            if self._slow_step:
                self._buf += data
            else:
                self._logging_in(data)
            return
        # unsolicited bytes on an idle server (a FATAL from pg_terminate_backend or a shutdown, a
        # notification): logged with PostgreSQL's reason, or servers would vanish without one
        log.info("server %s closed while idle: %s", self, _unsolicited(data))
        self.close("server sent data while idle")

    def _special_data(self, data: bytes, client: ClientConnection) -> None:
        """A linked server's chunk while halephant has business of its own in the stream: answers to
        its set-up queries to swallow, a client's mapped prepared statements, a rejection to show."""
        if self.absorb:
            try:
                self._absorbing_data(data, client)
            except ProtocolViolation as exc:
                self._lost_with_client(client, f"protocol violation from server: {exc.message}")
        elif client.prepared is not None:
            prepared.relay(self, data, client)
        else:
            self._rewrite_path(data, client)

    def _relay(self, data: bytes, client: ClientConnection) -> None:
        """Scan headers, forward the chunk whole, account for ReadyForQuery (`data_received` inlines
        this for the common case)."""
        sc = self.scanner
        try:
            ready = sc.feed(data)
        except ProtocolViolation as exc:
            self._lost_with_client(client, f"protocol violation from server: {exc.message}")
            return
        if ready:
            self.rfq_seen += ready
            status = sc.status
            if status == _TX_IDLE:
                self.xact_seen += 1  # a transaction (or a run of autocommit statements) ended
            elif client.statement_mode:
                data = client.withheld_ready(data, ready, status)
            self._to_client(data, client, status == _TX_IDLE)
            if sc.kept:
                self._kept(sc.kept, client, ready)
            client.server_ready(ready, status, sc.at_boundary)
        else:
            self._to_client(data, client, False)
            if sc.kept:
                self._kept(sc.kept, client)

    def _to_client(self, data: bytes, client: ClientConnection, over: bool) -> None:
        """Relay a chunk to the client, at once or with the other answers of this loop iteration
        (`halephant.proxy.output`). Only an answer that ends the client's transaction (`over`) waits, and
        only where there is something to write it with: output held already in this iteration, or
        other servers of its pool at work whose answers may come in it. Part of an answer gains nothing
        from waiting, nor does the answer of a client alone; an answer inside a transaction would keep
        that transaction's locks longer. What is held for the client already is never overtaken."""
        if client.held_output is None and (not over or (not _held and len(self.pool.active) < 2)):
            client.transport.write(data)
        else:
            client.hold(data)

    def _kept(self, kept: list[tuple[int, bytes]], client: ClientConnection, counted: int = 0) -> None:
        """Act on the messages the scanner copied out of a chunk (`counted`: ReadyForQuery of that chunk
        already in `rfq_seen`)."""
        for t, payload in kept:
            if t == codes.PARAMETER_STATUS:
                # a reported setting changed (SET application_name, SET TIME ZONE, ...): session state,
                # and what the next client is told at login must be the server's value now
                name, value = m.decode_parameter_status(payload)
                self.params[name] = value
                if client.transaction_mode:
                    # carried with the client like any session setting (read back at the transaction's end)
                    client.parameter_changed(name)
            elif t == codes.COPY_IN_RESPONSE:
                client.copy_in_started(counted)
            elif t == codes.ERROR_RESPONSE:
                if m.error_ends_session(payload):
                    self.fatal_relayed = True  # the server closes next: its client heard why
                if client.prepared is not None and client.prepared.bound:
                    client.prepared.stale_plan(payload)
                if client.session is not None:
                    session_state.failed_in_transaction(client)
            elif t == codes.NOTIFICATION_RESPONSE and client.transaction_mode:
                client.notification_relayed(payload)

    def apply_settings(self, wanted: dict[str, str]) -> bool:
        """Bring this server to a client's startup settings; True when a query for that is in flight.

        The query goes out ahead of the client's own messages and its answers are swallowed (`absorb`);
        the client hears `settings_applied()` once its ReadyForQuery arrives.
        """
        if wanted == self.settings:
            return False  # the common case: nothing to do, decided without building any SQL
        sql = settings_sql(self.settings, wanted)
        if not sql:
            return False
        self.settings = dict(wanted)
        self.absorb += 1
        self._internal.append(None)
        self._setup_error = None
        self.send(m.query(sql))
        return True

    def run_internal(self, sql: str, done: InternalDone) -> None:
        """Run one of halephant's own queries ahead of whatever the client sends next; its answer is
        swallowed and handed to `done(rows, error)` once its ReadyForQuery arrives."""
        self.absorb += 1
        self._internal.append(done)
        self.send(m.query(sql))

    def _absorbing_data(self, data: bytes, client: ClientConnection) -> None:
        buf = self._buf + data if self._buf else data
        frames, _ = split_frames(buf, _MAX_SERVER_MESSAGE)
        pos = 0
        settings_done = False
        answered: list[tuple[InternalDone, list[list[str | None]], str | None]] = []
        internal = self._internal
        for t, start, end in frames:
            if t == codes.DATA_ROW:
                if internal and internal[0] is not None:
                    self._internal_rows.append(decode_data_row(buf[start:end]))
            elif t == codes.PARAMETER_STATUS:
                name, value = m.decode_parameter_status(buf[start:end])
                self.params[name] = value
            elif t == codes.ERROR_RESPONSE:
                fields = m.decode_error_fields(buf[start:end])
                if internal and internal[0] is not None:
                    if self._internal_error is None:
                        self._internal_error = f"{fields.get('C', '')} {fields.get('M', '')}"
                elif self._setup_error is None:
                    self._setup_error = ClientError(
                        fields.get("C", sqlstate.INTERNAL_ERROR),
                        fields.get("M", "invalid setting"),
                        hint=fields.get("H"),
                        fatal=True,
                    )
                    # The whole settings query rolled back: this server still holds what the previous
                    # client left, which no record says now. It must not be handed on.
                    self.settings = {}
                    self.dirty = f"could not apply a client's settings: {fields.get('M', '')}"
            elif t == codes.NOTIFICATION_RESPONSE:
                # a notification is the client's, whoever's query it arrived behind
                client.send(buf[start - 5 : end])
                if client.transaction_mode:
                    client.notification_relayed(buf[start:end])
            elif t == codes.READY_FOR_QUERY:
                self.absorb -= 1
                entry = internal.popleft() if internal else None
                if entry is None:
                    settings_done = True
                else:
                    answered.append((entry, self._internal_rows, self._internal_error))
                    self._internal_rows = []
                    self._internal_error = None
            pos = end
            if not self.absorb:
                break
        rest = buf[pos:]
        self._buf = b""
        if settings_done:
            client.settings_applied(self._setup_error)
        for done, rows, error in answered:
            done(rows, error)
        if self.absorb:
            # an incomplete message of an absorbed answer (a query sent by a callback above goes out only
            # when the client has nothing in flight, so nothing of the client's can be in `rest`)
            self._buf = rest
            return
        if rest:
            # to whoever is linked now, as if it had come in a chunk of its own: a callback above may have
            # handed the server on (a reset query's stand-in gets the NotificationResponse a server
            # still listening sent right behind its ReadyForQuery; dropped, it was lost)
            self.data_received(rest)
        if client.held_back:
            client.resume_held()  # what the client sent meanwhile, once halephant's business is over
        if self.held_cancels:
            self._release_cancels()

    def _release_cancels(self, forward: bool = True) -> None:
        """Forward the cancel requests held while halephant's own query ran (`forward` False: the server
        is gone, there is nothing to cancel: their cancel connections are just closed)."""
        held, self.held_cancels = self.held_cancels, []
        for client, done in held:
            if forward:
                self.manager.app.forward_held_cancel(client, self, done)
            else:
                done()

    def arm_rewrite(self, marker: bytes, error: bytes, pending: int) -> None:
        """Replace the server's ErrorResponse that mentions `marker` by `error` (a rejection in place).

        `pending` is how many ReadyForQuery the client still awaits for what it sent before: the
        error is due before the one after those; if that one arrives first (an earlier error made the
        server skip the rejected message), the entry is dropped.
        """
        self._rewrites.append((marker, error, self.rfq_seen + pending))

    def _rewrite_path(self, data: bytes, client: ClientConnection) -> None:
        sc = self.scanner
        # The slow path needs message boundaries: relay through the scanner up to the next one first.
        while data and not self._buf and not sc.at_boundary:
            step = sc.bytes_to_boundary()
            self._relay(data[:step], client)
            data = data[step:]
            if self.client is not client:
                return
        if data:
            self._rewriting_data(data, client)

    def _rewriting_data(self, data: bytes, client: ClientConnection) -> None:
        # Used only while a rejection is in flight: frame fully so one message can be swapped.
        buf = self._buf + data if self._buf else data
        frames, consumed = split_frames(buf, _MAX_SERVER_MESSAGE)
        out: list[bytes] = []
        kept: list[tuple[int, bytes]] = []
        ready = 0
        status = self.scanner.status
        last = 0
        rewrites = self._rewrites
        for t, start, end in frames:
            if not rewrites:
                consumed = start - 5  # the rest goes back to the fast path
                break
            if t == codes.ERROR_RESPONSE and rewrites[0][0] in buf[start:end]:
                out.append(buf[last : start - 5])
                out.append(rewrites.popleft()[1])
                last = end
            elif t == codes.READY_FOR_QUERY:
                ready += 1
                status = buf[start]
                self.rfq_seen += 1
                if status == _TX_IDLE:
                    self.xact_seen += 1
                while rewrites and self.rfq_seen > rewrites[0][2]:
                    rewrites.popleft()  # its error never came: the server skipped the message
            elif t in _KEEP:
                kept.append((t, buf[start:end]))
        out.append(buf[last:consumed])
        rest = buf[consumed:]
        if rewrites and not (rest and rest[0] in PASSED_AS_IT_COMES):
            self._buf, rest = rest, b""  # an incomplete message, framed whole once the rest arrives
        else:
            self._buf = b""  # the rest takes the fast path (a row: as it comes, see `_rewrite_path`)
        self.scanner.status = status
        client.send(b"".join(out))
        if kept:
            self._kept(kept, client, ready)
        if ready:
            client.server_ready(ready, status, not rest and not self._buf)
        if rest and self.client is client:
            self._relay(rest, client)

    def _lost_with_client(self, client: ClientConnection, reason: str) -> None:
        self.client = None
        client.server_lost(self, reason)
        self.close(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        login = self.login
        # (cancelled: the opener's connect_timeout passed)
        logged_in = login.done() and not login.cancelled() and login.exception() is None
        if not login.done():
            login.set_exception(
                ServerLoginError(
                    sqlstate.CONNECTION_FAILURE, "server closed the connection during login", fatal=True
                )
            )
        was_closing = self.closing
        self.closing = True
        if self.paused_client is not None:
            self.resume_writing()  # what the client sent is gone with the connection
        client, self.client = self.client, None
        self.pool.discard(self)
        if not was_closing:
            self.pool.stats.server_closed(self.rfq_seen, self.xact_seen, self.link_count)
        if client is not None:
            client.server_lost(self, "server closed the connection unexpectedly")
        if self.held_cancels:
            self._release_cancels(forward=False)
        if not was_closing:
            log.info("server %s closed: %s", self, exc or "connection closed by server")
        if logged_in:
            self.manager.server_gone(self.pool)
        # else it never served: its opener (`PoolManager._open`) has accounted for the failure. Opening
        # another here for the waiting clients would retry a node that refuses every login (one shutting
        # down: 57P03) as fast as it answers, hundreds of times a second, until checkout_timeout.

    def pause_writing(self) -> None:
        # the server is slow to take the client's data: stop reading the client
        client = self.client
        if client is not None:
            self.paused_client = client
            client.transport.pause_reading()

    def resume_writing(self) -> None:
        # The client whose reading was stopped, which need not be linked any more: a COPY FROM STDIN that
        # failed on the server was answered (ErrorResponse, ReadyForQuery) and the server handed back
        # while the client's CopyData still waited here for the server to discard it. Resumed when
        # still linked, the client would be read from never again.
        client, self.paused_client = self.paused_client, None
        if client is not None:
            client.resume_reading_from_server()

    # --- control ---

    def set_reading(self, paused: bool) -> None:
        if self.transport is None or self.closing or paused == self.reading_paused:
            return
        self.reading_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def at_message_boundary(self) -> bool:
        """True when the linked client has been sent whole messages only, so halephant may put one of
        its own (a NoticeResponse) in between."""
        return self.scanner.at_boundary and not self.absorb and not self._rewrites and not self._buf

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self, reason: str) -> None:
        """Close gracefully (Terminate) and forget it; abort it when it cannot take what is still to send."""
        if self.closing:
            return
        self.closing = True
        log.debug("closing server %s: %s", self, reason)
        self.pool.discard(self)
        self.pool.stats.server_closed(self.rfq_seen, self.xact_seen, self.link_count)
        transport = self.transport
        if transport is not None:
            if not transport.is_closing():
                transport.write(m.TERMINATE)
            if transport.get_write_buffer_size():
                # Not even the Terminate went out: the server is not reading, typically because it is
                # blocked sending results that nobody reads any more (a client that pipelined queries and
                # left). A graceful close would wait for it forever, holding the connection and the
                # backend, since a closing transport reads nothing: drop the connection instead. The
                # backend sees it go, rolls back and exits.
                transport.abort()
            elif self.client is None and self.pool.linger(self):
                # Counted by the pool's caps (max_db_connections, ...) until PostgreSQL closes its
                # side, which it does only once the backend has exited (pqcomm.c's socket_close): a
                # place freed under a cap is then really free for the next login. Nothing the server
                # sends now goes anywhere; connection_lost comes at its EOF (or the maintenance tick
                # drops it after connect_timeout).
                if self.reading_paused:
                    self.reading_paused = False
                    transport.resume_reading()
            else:
                transport.close()

    def fence(self, reason: str) -> None:
        """Cut the connection now, not waiting for the server to take a Terminate (it may be frozen): a
        node that is no longer the primary. Its client learns it as the loss of its server (08006)."""
        self.close(reason)
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
