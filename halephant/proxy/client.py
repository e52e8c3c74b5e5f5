"""A client connection: startup, authentication, then the pooling loop for one client.

Theory of operation. Before login the client's bytes are startup packets, then password messages, driven
by `StartupFramer` and the auth exchange the `halephant_authenticate` answer asks for; an SSLRequest, or a
TLS handshake as the first bytes (direct TLS), may first turn the connection into a TLS one (`client_tls:`,
see `halephant.proxy.client_tls`), after which
`transport` is the TLS transport and everything below runs over it unchanged. After login every
chunk is cut into complete messages (`split_frames`); runs of messages are forwarded to the linked server
in one write. Only three things need decisions, and each happens at most once per statement or
transaction, never per message:

* the first message of a transaction with no server linked: `halephant_route`, then a checkout from the
  pool (queued FIFO, bounded by `checkout_timeout`; what the client sends meanwhile is buffered);
* a Query or Parse: `halephant_inspect_query` (Reject / Pin / Allow), and whether the statement leaves
  session state behind (then the client is pinned to its server, and the server is reset before reuse);
* a ReadyForQuery from the server (`server_ready`): in transaction pooling the server goes back when it
  says Idle, every sync point the client sent has been answered and nothing was sent after the last one.

Linking a server applies the client's settings first (startup parameters and the SETs it made since),
only where the server differs. What a transaction leaves in the session (settings, session-bound features,
emulated LISTEN and SQL PREPARE) is `halephant.proxy.session_state`'s: a client that has any of it has a
`session`, and only such a client costs more than one comparison at the end of a transaction.
In session pooling the startup settings are applied once, at login, as session values: after a statement
that may RESET them (seen among the statements already read for `halephant_inspect_query`), they are set
again where the session no longer holds them (`_restore_startup`), as PostgreSQL's RESET goes back to them.
Named prepared statements do not pin: from its first named Parse a client's messages go through
`halephant.proxy.prepared`, which maps its names onto statements shared on the servers.
A rejected statement is answered without running it. With no server linked the answer is local; inside a
transaction, the statement is swapped for one that fails at exactly that point on the server, whose error
is then rewritten, so ordering under pipelining and the aborted-transaction state are PostgreSQL's own.
A lone ROLLBACK or COMMIT from a client with no transaction open (drivers send one after an error) is
answered locally too while no primary is known, with PostgreSQL's own WARNING: it needs no server, so it
does not wait for one through a failover (`_end_outside_transaction`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import select
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from halephant import sqlstate
from halephant.admin.console import ADMIN_DATABASES, CONSOLE_HEADROOM, start_console
from halephant.auth.server_side import Exchange, exchange_for
from halephant.config.client_tls import channel_binding
from halephant.errors import ClientError, MalformedMessage, OutOfResources, ProtocolViolation
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import READY_FOR_QUERY_HEAD, split_frames, walk_types
from halephant.protocol.prepared import ClientStatements
from halephant.protocol.session_params import restore_sql, startup_settings
from halephant.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupFramer,
    StartupMessage,
)
from halephant.proxy import client_tls, output, prepared, session_state
from halephant.proxy.auth_query import look_up
from halephant.proxy.limits import too_many_clients
from halephant.proxy.peer import peer_refusal
from halephant.sql import Statement
from halephant.sql.effects import LOAD, session_effects
from halephant.sql.settings import resets_setting
from halephant.sql.statement import statement_of
from halephant.types import (
    Allow,
    AuthMethod,
    Cert,
    ClientInfo,
    CloseIdleServers,
    LookUp,
    Peer,
    Pin,
    PoolInfo,
    PoolMode,
    PoolTarget,
    Reject,
    Role,
    Route,
    ScramSha256,
    TransactionInfo,
    Verdict,
)

if TYPE_CHECKING:
    from halephant.pool.pool import Pool
    from halephant.proxy.app import App
    from halephant.proxy.server import ServerConnection

    ServerPool = Pool[ServerConnection, "ClientConnection"]

log = logging.getLogger("halephant.client")

#: HANDSHAKE: from the `S` answer to an SSLRequest, or a first byte that begins direct TLS, to the end of
#: the TLS handshake (client_tls)
STARTUP, HANDSHAKE, AUTH, WELCOME, READY, CLOSED = range(6)
#: how long `start_tls` may take beyond login_timeout: the client sweep closes a stalled handshake first
_HANDSHAKE_BACKSTOP = 5.0
#: how long a closed client's connection is kept for it to read what was still to send (`close`)
_CLOSE_GRACE = 10.0
#: how often a half-closed client still waiting for answers is checked for being gone altogether
_HALF_CLOSED_CHECK = 0.5
_SYNC_POINTS = frozenset((codes.QUERY, codes.SYNC, codes.FUNCTION_CALL))
# What each frontend message means for the pooling loop (one dict lookup per message).
_K_QUERY, _K_PARSE, _K_SYNC, _K_BATCH, _K_NEUTRAL, _K_TERMINATE, _K_COPY_END = range(7)
_KIND: dict[int, int] = {
    codes.QUERY: _K_QUERY,  # a statement, and a sync point
    codes.PARSE: _K_PARSE,  # a statement, inside a batch
    codes.SYNC: _K_SYNC,
    codes.FUNCTION_CALL: _K_SYNC,
    codes.BIND: _K_BATCH,
    codes.DESCRIBE: _K_BATCH,
    codes.EXECUTE: _K_BATCH,
    codes.CLOSE: _K_BATCH,
    # neither open nor close a batch
    codes.FLUSH: _K_NEUTRAL,
    codes.COPY_DATA: _K_NEUTRAL,
    codes.COPY_DONE: _K_COPY_END,  # neutral too, but remembered (`copy_in_started`)
    codes.COPY_FAIL: _K_COPY_END,
    codes.TERMINATE: _K_TERMINATE,
}
assert set(_KIND) == codes.FRONTEND_TYPES
_NAMES_A_STATEMENT = frozenset((codes.BIND, codes.DESCRIBE))
_NO_UNNAMED_STATEMENT = m.error_response(
    sqlstate.INVALID_SQL_STATEMENT_NAME,
    "unnamed prepared statement does not exist",
    hint="In transaction pooling the unnamed statement lasts only as long as the transaction that "
    "prepared it: send Parse in the same transaction as its Bind, or prepare a named statement.",
)


def _unnamed(t: int, buf: bytes, start: int, end: int) -> bool:
    """A Bind or Describe (of a statement) whose payload is `buf[start:end]` names the unnamed statement."""
    if t == codes.DESCRIBE:
        return buf[start:end] == b"S\0"
    portal_end = buf.find(b"\0", start, end)  # Bind: the portal's name, then the statement's
    return portal_end >= 0 and buf[portal_end + 1 : portal_end + 2] == b"\0" and portal_end + 1 < end


def _fatal(reject: Reject) -> ClientError:
    """A Reject at login (a plugin's, or no node to route it to), as the FATAL the client is told."""
    return ClientError(reject.code, reject.message, hint=reject.hint, detail=reject.detail, fatal=True)


def _error(reject: Reject) -> bytes:
    """A Reject of a statement or a transaction, as the ErrorResponse (ERROR) the client is told."""
    return m.error_response(reject.code, reject.message, hint=reject.hint, detail=reject.detail)


_NEEDS_NO_SERVER = frozenset((codes.SYNC, codes.FLUSH, codes.COPY_DATA, codes.COPY_DONE, codes.COPY_FAIL))
#: of those, the ones PostgreSQL answers with ERROR 08P01 "invalid message format" when they have a body
_EMPTY_ONLY = frozenset((codes.SYNC, codes.FLUSH))
#: first keywords of a statement that begins a transaction block
_BEGINS = frozenset(("BEGIN", "START"))
#: the bytes a Query of ROLLBACK, ABORT, COMMIT or END may start with: one subscript leaves every other
#: transaction's first statement (BEGIN, SELECT, ...) alone, before `_end_outside_transaction` looks closer
_END_INITIALS = frozenset(b"RrAaCcEe \t\n\r\f")
#: a whole Query payload of ROLLBACK, ABORT, COMMIT or END, optionally with WORK or TRANSACTION and a
#: `;`, in any case, with PostgreSQL's whitespace around the words (not \v: a syntax error before 16).
#: Nothing else: AND CHAIN is an ERROR outside a transaction block, ROLLBACK TO / PREPARED are other
#: statements, and a comment or a second statement goes to the server as any other text.
_LONE_END = re.compile(
    rb"[ \t\n\r\f]*(?:(rollback|abort)|commit|end)"
    rb"(?:[ \t\n\r\f]+(?:work|transaction))?[ \t\n\r\f]*;?[ \t\n\r\f]*\0",
    re.IGNORECASE,
)
#: PostgreSQL's answer to such a statement outside a transaction block (xact.c: EndTransactionBlock,
#: UserAbortTransactionBlock), as it sends it with the default lc_messages and client_min_messages
_NO_TRANSACTION = m.notice_response(
    sqlstate.NO_ACTIVE_SQL_TRANSACTION, "there is no transaction in progress", severity="WARNING"
)
_LONE_ROLLBACK = _NO_TRANSACTION + m.message(b"C", b"ROLLBACK\0") + m.READY_FOR_QUERY_IDLE
_LONE_COMMIT = _NO_TRANSACTION + m.message(b"C", b"COMMIT\0") + m.READY_FOR_QUERY_IDLE
#: settings that change that answer (its severity's words and message, or whether it is sent at all)
_NOTICE_SETTINGS = ("client_min_messages", "lc_messages")
_reject_markers = itertools.count(1)
#: bytes a client may send while it waits for a server before its reading is paused
_MAX_BUFFERED_WHILE_WAITING = 256 * 1024
#: an incomplete message longer than this is gathered in place, in a bytearray (`_gathered`)
_GATHER_FROM = 64 * 1024
_TX_IDLE = codes.TX_IDLE
_QUERY = codes.QUERY
_PARSE = codes.PARSE
_SYNC = codes.SYNC
_STATEMENT_TARGET = ord("S")  # Close (and Describe) of a prepared statement, not of a portal
#: what may follow the unnamed Parse of a batch `_quick_batch` takes, before its Sync
_QUICK_BATCH = frozenset((codes.BIND, codes.DESCRIBE, codes.EXECUTE, codes.CLOSE, codes.FLUSH))
#: the first byte of what `_quick_query` may take (a 1-byte slice is a cached object: no allocation)
_QUICK_TYPES = frozenset((b"Q", b"P"))
#: Describe the unnamed portal, Execute it for all rows, Sync: how most drivers end a batch
_DESCRIBE_EXECUTE_SYNC = b"D\0\0\0\x06P\0" + b"E\0\0\0\x09\0\0\0\0\0" + b"S\0\0\0\x04"
_TAIL_SIZE = len(_DESCRIBE_EXECUTE_SYNC)
_unpack_len = struct.Struct("!i").unpack_from


_PRIMARY = Role.PRIMARY  # enum member lookups cost ~60 ns; this one runs per transaction
_new_transaction = object.__new__
#: a login's check-out (to learn the server's parameters): no statement, and the primary unless routed
_LOGIN_TRANSACTION: Final = TransactionInfo(None)
_LOGIN_ROUTE: Final = Route(Role.PRIMARY, "login: learning server parameters")
#: the slot's own setter: what a frozen dataclass's __init__ ends up calling, minus its overhead
_set_statement: Callable[[TransactionInfo, Statement | None], None] = vars(TransactionInfo)[
    "statement"
].__set__


def _bound_name(buf: bytes, start: int, end: int) -> bytes:
    """The name of the prepared statement the Bind whose payload is `buf[start:end]` runs (b"": unnamed)."""
    name_start = buf.find(b"\0", start, end) + 1  # after the portal's name
    return buf[name_start : buf.find(b"\0", name_start, end)]


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_app_suffix",
        "_beginning",
        "_buf",
        "_checkout_timeout",
        "_end_error",
        "_exchange",
        "_first_checked",
        "_framer",
        "_hello",
        "_last_route",
        "_last_sync_point",
        "_pending_pin",
        "_primary_pool",
        "_quick",
        "_read_paused",
        "_reject_next",
        "app",
        "began_with",
        "cancel_key",
        "config_generation",
        "connected_at",
        "copy_ended",
        "copy_mark",
        "held_back",
        "held_output",
        "info",
        "link_count",
        "login_deadline",
        "number",
        "outstanding",
        "pinned",
        "pool_info",
        "pool_reject",
        "prepared",
        "server",
        "session",
        "session_due",
        "settings",
        "since",
        "skip_to_sync",
        "startup_reset",
        "state",
        "statement_mode",
        "sweep_links",
        "sweep_rfq",
        "sweep_since",
        "target",
        "timeout_mark",
        "told_pid",
        "transaction_mode",
        "transport",
        "unsynced",
        "wait_deadline",
        "wait_notified",
        "wait_started",
        "waiting_pool",
        "write_paused",
    )

    def __init__(self, app: App) -> None:
        self.app = app
        self.state = STARTUP
        self._framer: StartupFramer | None = StartupFramer()
        #: while the client's first TLS record is read (HANDSHAKE): the context, whether the connection
        #: began with TLS, and the bytes so far (`_hello_data`)
        self._hello: tuple[ssl.SSLContext, bool, bytearray] | None = None
        self._buf: bytes | bytearray = b""  # a bytearray while a large message arrives (`_gathered`)
        self._exchange: Exchange | None = None
        self.info: ClientInfo | None = None
        self.target: PoolTarget | None = None
        self.pool_reject: Reject | None = None
        self.pool_info: PoolInfo | None = None
        self.server: ServerConnection | None = None
        self.waiting_pool: ServerPool | None = None
        self.outstanding = 0
        self.unsynced = False
        self.skip_to_sync = False
        self.pinned = False
        #: named statements mapped to shared server-side ones (transaction pooling), once it names one
        self.prepared: ClientStatements | None = None
        self.settings: dict[str, str] = {}
        self.transaction_mode = False
        #: statement pooling: transaction pooling (`transaction_mode` is True too) with no transaction block
        self.statement_mode = False
        self.write_paused = False
        self._first_checked = False
        #: what `application_name_add_host` appends to the client's application_name (" - host:port")
        self._app_suffix = ""
        self._reject_next: bytes | None = None
        #: the FATAL a `_Finishing` client ends with once what it sent before is answered (None: its EOF)
        self._end_error: ClientError | None = None
        #: enforced by the client sweep (halephant.proxy.sweep), not a timer per connection
        self.login_deadline = 0.0
        self._primary_pool: ServerPool | None = None
        #: the database's checkout_timeout (seconds), looked up at the first wait (< 0: not yet)
        self._checkout_timeout = -1.0
        self.config_generation = 0  # of the configuration its target comes from
        #: the Query `_quick_query` took and left waiting for a server (sent as it is when one comes)
        self._quick: bytes | None = None
        self._read_paused = False
        #: what the client sent for its next transaction waits in `_buf` while halephant finishes its own
        #: business with the last one's server (`_after_transaction`)
        self.held_back = False
        #: what is to be written to the client at the end of this loop iteration (`send`)
        self.held_output: bytes | None = None
        self._last_sync_point = 0
        #: the Query that began the current transaction from idle, while it is the only sync point sent in
        #: it before the latest one (a stale-plan retry replays it: halephant.proxy.prepared.forward)
        self.began_with: bytes | None = None
        self._beginning: bytes | None = None  # the same, for the latest sync point
        self._last_route: Route | None = None
        self._pending_pin: Verdict | None = None  # a Pin/Unpin verdict waiting for the server it applies to
        #: session state beyond the startup settings (transaction pooling), created on first need
        self.session: session_state.SessionState | None = None
        #: the session state must be read back from the server at the end of this transaction
        self.session_due = False
        #: session pooling: a statement may have reset settings given at startup, which go back to their
        #: startup values at the end of its transaction (`_restore_startup`)
        self.startup_reset = False
        self.wait_deadline = 0.0
        self.wait_started = 0.0
        self.wait_notified = False
        self.cancel_key = 0
        self.number = 0
        self.told_pid = 0  # session pooling: the server process ID the client was told
        #: transactions linked so far, and what the timeout sweep saw last (halephant.proxy.sweep)
        self.link_count = 0
        self.sweep_links = -1
        self.sweep_rfq = -1
        self.sweep_since = 0.0
        #: (link_count, the server's rfq_seen) when the linked server last entered COPY FROM STDIN: while
        #: both stay the same, the client is sending its data (the sweep's activity marks cannot see it)
        self.copy_mark = (-1, -1)
        #: the last CopyDone/CopyFail sent to a server: (link_count, sync points sent before it on that
        #: server, counted as its `rfq_seen` counts them, 1 if the client had sent messages after the last
        #: of those, 1 if that last one was a Sync), for a CopyInResponse that comes after it
        self.copy_ended = (-1, 0, 0, 0)
        #: (link_count, the server's rfq_seen, what the client had not read yet) when query_timeout last
        #: cancelled the client's query
        self.timeout_mark = (-1, -1, -1)
        #: loop time of the connection, and of the last change between idle, waiting and active
        self.connected_at = self.since = 0.0

    def __repr__(self) -> str:
        if self.info:
            return repr(self.info)
        transport = getattr(self, "transport", None)
        address = client_tls.peer_address(transport) if transport is not None else "?"
        return f"<client #{self.number} (starting) from {address}>"

    @property
    def console(self) -> bool:
        """Connected to the admin console (database `halephant` or `pgbouncer`), not to a pool."""
        return self.info is not None and self.info.database in ADMIN_DATABASES

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio's. Both loops set TCP_NODELAY on TCP transports
        # themselves; asking for the socket object here would cost ~100 bytes per idle client.
        self.transport = cast(asyncio.Transport, transport)
        self.login_deadline = self.app.loop.time() + self.app.config.limits.login_timeout
        self.number = self.app.client_opened(self)
        # the shared 100 ms clock: no float object of its own per idle client
        self.connected_at = self.since = self.app.clock

    def data_received(self, data: bytes) -> None:
        try:
            if self.state == READY:
                if self.waiting_pool is None:
                    if (
                        self.server is None
                        and data[:1] in _QUICK_TYPES
                        and not self._buf
                        and self.transaction_mode
                        and self.session is None
                        and self.prepared is None
                        and not self.skip_to_sync
                        and not self._first_checked
                        and self._reject_next is None
                        and self._quick_query(data)
                    ):
                        return
                    self._process(data)
                else:
                    self._buffer_while_waiting(data)
            elif self.state == STARTUP:
                self._startup_data(data)
            elif self.state == AUTH:
                self._auth_data(data)
            elif self.state == WELCOME:
                self._buffer_while_waiting(data)
            elif self.state == HANDSHAKE:
                if self._hello is not None:
                    self._hello_data(data)
                else:
                    # decrypted bytes the loop hands over before `_handshake` has the TLS transport
                    self._buf += data
        except ClientError as exc:
            self.fail(exc)
        except Exception as exc:
            self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> None:
        # a bug or a plugin's exception costs this client only, never the listener or a server callback
        culprit = self.app.plugins.culprit(exc)
        if culprit is None:
            log.exception("%r: internal error", self)
            message = f"internal error in halephant: {exc!r}"
        else:
            log.exception("%r: internal error: plugin %r raised in %s", self, *culprit)
            message = f"internal error in halephant: plugin {culprit[0]!r} raised in {culprit[1]}: {exc!r}"
        self.fail(ClientError(sqlstate.INTERNAL_ERROR, message, fatal=True))

    def _buffer_while_waiting(self, data: bytes) -> None:
        # Reading is not paused at every wait (two epoll_ctl calls per transaction under load): a
        # client waiting for its answer sends little. Only a client that keeps sending is paused.
        self._buf += data
        if len(self._buf) > _MAX_BUFFERED_WHILE_WAITING and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_if_paused(self) -> None:
        if self._read_paused:
            self._read_paused = False
            self._resume_reading()

    def _resume_reading(self) -> None:
        """Read the client again, unless something else still holds its reading paused: output it has
        not read (`write_paused`), a wait that buffered enough (`_read_paused`), or the full input of
        its server (`ServerConnection.pause_writing`)."""
        server = self.server
        if (
            self.state != CLOSED
            and not self.write_paused
            and not self._read_paused
            and (server is None or server.paused_client is not self)
        ):
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.held_output = None
        if self.state == CLOSED:
            return
        if self.state == HANDSHAKE:
            self._handshake_failed(client_tls.failure(exc))
            return
        self._closed("client closed the connection" if exc is None else f"client connection lost: {exc}")

    def eof_received(self) -> bool | None:
        """The client shut its side of the connection down (`shutdown(SHUT_WR)`: `nc -N`, a script).
        PostgreSQL runs and answers what came before the end of the stream, then ends the session: the
        connection stays open for those answers (`_Finishing`). Closed at once, as before, when nothing
        is left to answer, before login, over TLS (asyncio cannot keep a TLS connection half open) and
        where the peer closed altogether (a Unix-domain socket says so)."""
        if type(self) is _Finishing:
            return True  # seen already (a transport may report it again)
        if (
            self.state != READY
            or not self._awaits_answers()
            or self._over_tls()
            or _peer_gone(self.transport)
        ):
            return None
        self._finishing()
        self.app.loop.call_later(_HALF_CLOSED_CHECK, self._check_half_closed, False)
        return True

    def pause_writing(self) -> None:
        # The client reads nothing: its server's output waits, and so does its own input, as a backend
        # blocked sending reads nothing more. What halephant answers itself (a ReadyForQuery to each
        # Sync, a refusal to each message) would otherwise pile up in the transport without bound.
        self.write_paused = True
        if self.server is not None:
            self.server.set_reading(True)
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.server is not None:
            self.server.set_reading(False)
        self._resume_reading()
        if self.session is not None:
            session_state.flush(self)

    def resume_reading_from_server(self) -> None:
        self._resume_reading()

    # --- startup and authentication ---

    def login_timeout(self) -> None:
        """Called by the client sweep once `login_deadline` has passed."""
        if self.state < READY:
            log.info("%r: login timeout", self)
            # PostgreSQL's own code and text for authentication_timeout
            self.fail(
                ClientError(sqlstate.QUERY_CANCELED, "canceling authentication due to timeout", fatal=True)
            )

    def _startup_data(self, data: bytes) -> None:
        framer = self._framer
        assert framer is not None
        if data and data[0] == client_tls.HANDSHAKE_RECORD and framer.untouched and not self._over_tls():
            self._direct_tls(data)
            return
        for packet in framer.feed(data):
            if isinstance(packet, SSLRequest | GSSENCRequest):
                what = "SSL" if isinstance(packet, SSLRequest) else "GSSAPI encryption"
                if self._over_tls():
                    # (PostgreSQL would take it for a startup packet of an unknown protocol, 0A000; a
                    # negotiation inside the one that has ended is a protocol violation)
                    raise ProtocolViolation(f"{what} request received inside an encrypted connection")
                if framer.pending:
                    # bytes behind an encryption request would pass as encrypted (CVE-2021-23222 shape)
                    raise ProtocolViolation(f"received unencrypted data after {what} request")
                context = self.app.config.client_tls_context if isinstance(packet, SSLRequest) else None
                if context is not None and client_tls.over_tcp(self.transport):
                    self._start_tls(context)
                    return
                self.transport.write(b"N")
            elif isinstance(packet, CancelRequest):
                self.state = CLOSED
                self.app.client_closed(self)
                # closed once the cancel has reached PostgreSQL: the client waits for that (see App.cancel)
                self.app.cancel(packet.process_id, packet.secret_key, self.transport.close)
                return
            elif isinstance(packet, StartupMessage):
                rest = framer.take_rest()
                self._framer = None
                self._startup(packet)
                if rest:
                    self.data_received(rest)
                return

    def _refused(self, error: ClientError, why: str) -> ClientError:
        """A login refused for `why` (logged, and counted as a decision): the error to raise."""
        log.info("%r: rejected: %s", self, why)
        self.app.stats.decide("reject", self.info, why, error.code)
        return error

    def _over_tls(self) -> bool:
        return self.transport.get_extra_info("ssl_object") is not None

    def _direct_tls(self, data: bytes) -> None:
        """The connection began with a TLS handshake record (libpq's sslnegotiation=direct)."""
        context = self.app.config.client_tls_context
        tcp = client_tls.over_tcp(self.transport)
        if context is None or not tcp:
            # PostgreSQL closes it too, without a word: a plaintext ErrorResponse is no TLS record
            why = "client_tls.mode is disable" if tcp else "direct TLS is for TCP, not a Unix-domain socket"
            log.info("%r: direct TLS refused: %s", self, why)
            self.close("direct TLS refused")
            return
        self._begin_tls(context, data, direct=True)

    def _start_tls(self, context: ssl.SSLContext) -> None:
        self.transport.write(b"S")
        self._begin_tls(context, b"", direct=False)

    def _begin_tls(self, context: ssl.SSLContext, data: bytes, direct: bool) -> None:
        self.state = HANDSHAKE
        self._framer = None
        self._hello = (context, direct, bytearray())
        self._hello_data(data)

    def _hello_data(self, data: bytes) -> None:
        """Bytes of the client's first TLS record: once it is whole, the handshake starts with it."""
        assert self._hello is not None
        context, direct, hello = self._hello
        hello += data
        if not client_tls.hello_complete(hello):
            return
        self._hello = None
        # nothing more is read until start_tls reads it
        self.transport.pause_reading()
        self.app.spawn(self._handshake, context, bytes(hello), direct)

    async def _handshake(self, context: ssl.SSLContext, hello: bytes, direct: bool) -> None:
        loop = self.app.loop
        # start_tls takes the transport over (`set_protocol`) before it first waits, and schedules the
        # start of the handshake: the bytes read so far are given to its TLS layer first
        starting = loop.start_tls(
            self.transport,
            self,
            context,
            server_side=True,
            ssl_handshake_timeout=self.app.config.limits.login_timeout + _HANDSHAKE_BACKSTOP,
        )
        loop.call_soon(self._feed_tls, hello)
        try:
            transport = await starting
        except Exception as exc:  # a failed handshake costs this client only
            self._handshake_failed(client_tls.failure(exc))
            return
        except BaseException:  # cancelled: halephant stops
            self.close("halephant is shutting down")
            raise
        if self.state != HANDSHAKE or transport is None:  # closed meanwhile (login_timeout, shutdown)
            if transport is not None:
                transport.abort()
            return
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        refused = client_tls.alpn_refusal(
            direct, ssl_object.selected_alpn_protocol(), client_tls.offered_alpn(hello)
        )
        if refused is not None:
            self._handshake_failed(refused)
            return
        self.state = STARTUP
        self._framer = StartupFramer()  # the StartupMessage comes over TLS, read from scratch
        early, self._buf = self._buf, b""
        if early:
            self.data_received(bytes(early))

    def _feed_tls(self, data: bytes) -> None:
        """Hand `data`, read from the client before `start_tls`, to the TLS layer that now reads it (a
        `BufferedProtocol`, asyncio's and uvloop's alike)."""
        protocol = self.transport.get_protocol()
        if protocol is self:
            return  # start_tls failed before taking the transport over: its error is being handled
        tls = cast(asyncio.BufferedProtocol, protocol)
        view = memoryview(data)
        while view:
            buffer = memoryview(tls.get_buffer(len(view)))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]

    def _handshake_failed(self, why: str) -> None:
        if self.state != HANDSHAKE:
            return  # closed on purpose (login_timeout, shutdown), or already told
        log.info("%r: TLS handshake failed: %s", self, why)
        self.close("TLS handshake failed")

    def _startup(self, packet: StartupMessage) -> None:
        address = client_tls.peer_address(self.transport)
        ssl_object = self.transport.get_extra_info("ssl_object")
        tls = ssl_object.version() if ssl_object is not None else None
        info = self.info = ClientInfo(
            user=packet.user,
            database=packet.database,
            params=packet.params,
            address=address,
            id=self.number,
            tls=tls,
        )
        log.info("%r: connected%s", self, f" (tls={tls})" if tls else "")
        refused_tls = client_tls.login_refusal(
            self.app.config.client_tls, ssl_object, packet.user, client_tls.over_tcp(self.transport)
        )
        if refused_tls is not None:
            raise self._refused(*refused_tls)
        connected = len(self.app.clients)
        if packet.database in ADMIN_DATABASES:
            connected -= CONSOLE_HEADROOM  # an operator can still get in when clients fill every slot
        refused = too_many_clients(self.app.config, connected)
        if refused is not None:
            log.warning(
                "%r: rejected: %s",
                self,
                refused.message,
                extra={"event": "max_client_conn", "sqlstate": refused.code},
            )
            raise refused
        if packet.minor > 0 or packet.protocol_options:
            self.send(m.negotiate_protocol_version(codes.PROTOCOL_3_0, packet.protocol_options))
        if packet.replication:
            raise ClientError(
                sqlstate.FEATURE_NOT_SUPPORTED, "replication connections are not supported", fatal=True
            )
        self.settings = info.settings = startup_settings(packet.params)
        plugins, config = self.app.plugins, self.app.config
        selected = None if packet.database in ADMIN_DATABASES else plugins.select_pool(info, config)
        if selected is None:
            pass  # the admin console: authenticated like anyone, no pool
        elif isinstance(selected, Reject):
            self.pool_reject = selected  # told only after authentication, as PostgreSQL does
        else:
            self.target = selected
            self.config_generation = self.app.config_generation
        method = plugins.authenticate(info, self.target, config)
        if isinstance(method, Reject):
            # told at once, as PostgreSQL's pg_hba.conf refusals are
            raise self._refused(_fatal(method), method.reason)
        if isinstance(method, LookUp):
            if self.target is not None:
                self.state = AUTH  # what the client sends meanwhile waits (`_auth_data`)
                look_up(self.app, self.target, info.user, method, self._looked_up)
                return
            method = ScramSha256(None, reason="no pool to look the password up for: mock exchange")
        self._start_exchange(method)

    def _start_exchange(self, method: AuthMethod) -> None:
        assert self.info is not None
        # over TLS, SCRAM may bind the login to the certificate this connection was made with
        ssl_object = self.transport.get_extra_info("ssl_object")
        if isinstance(method, Cert):
            # no password: the certificate the handshake verified, its CN the user name
            refused = client_tls.certificate_refusal(ssl_object, self.info.user, True, method.reason)
            if refused is not None:
                raise self._refused(*refused)
            self._authenticated("cert")
            return
        if isinstance(method, Peer):
            # no password: the operating system user at the other end of the Unix-domain socket
            refused = peer_refusal(self.transport, self.info.user, method)
            if refused is not None:
                raise self._refused(*refused)
            self._authenticated("peer")
            return
        binding = channel_binding(ssl_object.context) if ssl_object is not None else None
        self._exchange = exchange_for(method, self.info.user, binding)
        if self._exchange is None:
            self._authenticated("trust")
            return
        self.state = AUTH
        self.send(self._exchange.start())

    def _looked_up(self, answer: AuthMethod | ClientError) -> None:
        """The password lookup (`halephant.proxy.auth_query`) answered: the exchange to run, or the error
        that ends the login. Ignored once the client is gone (login timeout, closed)."""
        if self.state != AUTH or self._exchange is not None:
            return
        try:
            if isinstance(answer, ClientError):
                raise answer
            self._start_exchange(answer)
            if self._buf and self.state == AUTH:
                self._auth_data(b"")
        except ClientError as exc:
            self.fail(exc)
        except Exception as exc:
            self._internal_error(exc)

    def _auth_data(self, data: bytes) -> None:
        if self._exchange is None:  # the password lookup has not answered yet
            self._buffer_while_waiting(data)
            return
        buf = bytes(self._buf) + data if self._buf else data  # (bytes: only `_process` gathers in place)
        frames, consumed = split_frames(buf, 1 << 16)
        self._buf = buf[consumed:]
        for t, start, end in frames:
            if t != codes.PASSWORD_MESSAGE:
                if t == codes.TERMINATE:
                    self.close()
                    return
                raise ProtocolViolation(f"expected password response, got message type {chr(t)!r}")
            assert self._exchange is not None
            reply, done = self._exchange.feed(buf[start:end])
            if reply:
                self.send(reply)
            if done:
                # whatever came behind the last password message, complete messages included, is the
                # client's first request: a pipelining client does not wait for AuthenticationOk
                rest, self._buf = buf[end:], b""
                learned = self._exchange.learned_keys
                if learned is not None:
                    self.app.manager.passthrough_keys_learned(learned)
                self._authenticated(self._exchange.name)
                if rest:
                    self.data_received(bytes(rest))
                return

    def _authenticated(self, how: str) -> None:
        self._exchange = None
        if self.console:
            start_console(self)
            return
        if self.pool_reject is not None:
            raise self._refused(_fatal(self.pool_reject), self.pool_reject.reason)
        assert self.info is not None and self.target is not None
        disabled = self.app.control.refuse_login(self.target.database)
        if disabled is not None:
            raise self._refused(disabled, disabled.message)
        pool_info = self.app.manager.pool_info(self.target)
        refused = self.app.client_counts.admit(self.app.config, self.target, self.info.user)
        if refused is not None:
            log.warning(
                "%r: rejected: %s",
                self,
                refused.message,
                extra={"event": "max_client_conn", "sqlstate": refused.code},
            )
            raise refused
        self.pool_info = pool_info  # from here on the client is counted (see _closed)
        self.send(m.AUTHENTICATION_OK)
        mode = self.pool_info.mode
        self.transaction_mode = mode is not PoolMode.SESSION
        self.statement_mode = mode is PoolMode.STATEMENT
        log.info(
            "%r: login ok (%s, pool %s, %s mode%s)",
            self,
            how,
            self.target.database,
            self.target.mode,
            f", tls={self.info.tls}" if self.info.tls else "",
        )
        self.state = WELCOME
        if not self.transaction_mode and "application_name" not in self.settings:
            # as connected directly: no application_name given means "", not halephant's own
            self.settings = self.info.settings = {**self.settings, "application_name": ""}
        welcome_key = self.settings
        entry = self.app.config.database_for(self.target.entry_name)
        if entry is not None and entry.application_name_add_host:
            # (PgBouncer's application_name_add_host) the servers' pg_stat_activity shows which client
            # host ran what; the parameters a login is told are still learnt once per given settings
            self._app_suffix = f" - {self.info.address}"
            given = self.settings.get("application_name", "")
            welcome_key = {**self.settings, "application_name": given}
            self.settings = self.info.settings = {**welcome_key, "application_name": given + self._app_suffix}
        params = self.app.manager.welcome_params(self.target, welcome_key)
        if params is not None and self._app_suffix:
            params = {**params, "application_name": params.get("application_name", "") + self._app_suffix}
        if self.pool_info.mode is PoolMode.SESSION or params is None:
            # Session pooling holds a server from login. Otherwise a server is needed once to learn the
            # parameters to report, or, once per set of startup settings, to check them and report them
            # as the server normalizes them (PostgreSQL refuses a bad one at login, so does halephant).
            self._login_checkout()
            return
        self._welcome(params)

    def _login_checkout(self) -> None:
        if self._checkout(None, codes.QUERY) and self.server is not None and not self.server.absorb:
            self._welcome(self.server.params)

    def _welcome(self, params: dict[str, str]) -> None:
        assert self.info is not None
        if self.server is not None and self.settings and self.transaction_mode and self.target is not None:
            self.app.manager.learn_welcome(self.target, self.settings, self.server, self._app_suffix)
        self._resume_if_paused()
        out = [m.parameter_status(name, value) for name, value in params.items()]
        # unpredictable: the key is what authorizes cancelling this client's queries
        self.cancel_key = secrets.randbits(31) or 1  # 0 means "no key yet"
        process_id = self.info.id
        if not self.transaction_mode and self.server is not None:
            # session pooling: the server's real process ID, so pg_backend_pid() and the sender of the
            # client's own NOTIFYs match what it was told; the secret key stays halephant's
            process_id = self.app.session_process_id(self, self.server.backend_pid)
        out.append(m.backend_key_data(process_id, self.cancel_key))
        out.append(m.READY_FOR_QUERY_IDLE)
        self.send(b"".join(out))
        self.state = READY
        if self.server is not None and self.transaction_mode:
            self._release(after_transaction=False)
        # the timeout sweep counts quiet time from here, not from the first sweep that sees the client
        self.sweep_links = self.link_count
        self.sweep_rfq = self.server.rfq_seen if self.server is not None else -1
        self.sweep_since = self.app.loop.time()
        if self._buf:
            self._process(b"")

    # --- the pooling loop ---

    def _process(self, data: bytes) -> None:
        # (data_received first offers a new transaction's data to _quick_query)
        self._quick = None
        server = self.server
        if self._buf:
            buf = self._gathered(data)
            if buf is None:
                return
            if self.held_back and server is not None and server.absorb:
                self._buf = buf  # still waiting for the answer to the query applying its settings
                return
        else:
            buf = data
        if server is not None and self.session is not None and self._after_transaction(server):
            self._buf = buf
            self.held_back = True
            return
        self.held_back = False
        self._buf = b""
        frames, consumed = split_frames(buf, self.app.max_message_size)
        plugins = self.app.plugins
        transaction_mode = self.transaction_mode
        ps = self.prepared
        fwd = 0  # start of the run of messages not yet forwarded
        # where the batch not yet ended by a sync point began in `buf` (-1: in an earlier run)
        batch_at = -1 if self.unsynced else 0
        for t, start, end in frames:
            kind = _KIND.get(t)
            if kind is None:
                consumed = start - 5  # what came before it goes on (below); it is refused after that
                break
            head = start - 5
            if self.skip_to_sync:
                # after an error in an extended-protocol batch, PostgreSQL ignores everything until Sync
                if server is not None and fwd < head:
                    if ps is None:
                        server.send(buf[fwd:head])
                    else:
                        prepared.forward(self, server, buf[fwd:head])
                fwd = end
                if t != codes.SYNC:
                    continue
                self.skip_to_sync = False
                if server is None:
                    self.send(m.READY_FOR_QUERY_IDLE)
                    continue
                fwd = head  # the Sync itself goes to the server, whose ReadyForQuery answers it
            statement = None
            if kind <= _K_PARSE:  # Query or Parse
                if transaction_mode or server is None or plugins.has_inspectors:
                    statement = self._statement(t, buf, start, end)
                if (
                    statement is not None
                    and not self._first_checked
                    and plugins.has_inspectors
                    # nearly every statement is plain, and the default inspectors all ignore those
                    and (plugins.has_plain_inspectors or not statement.plain)
                ):
                    assert self.info is not None and self.pool_info is not None
                    verdict = plugins.inspect_query(self.info, statement, self.pool_info)
                    if verdict is None:  # nearly always: no objection
                        pass
                    elif isinstance(verdict, Reject):
                        log.info("%r: rejected %s: %s", self, verdict.code, verdict.reason)
                        self.app.stats.decide("reject", self.info, verdict.reason, verdict.code)
                        self.app.stats.error(verdict.code)
                        error = _error(verdict)
                        if server is None:
                            self._reject_locally(t, error)
                        else:
                            if fwd < head:
                                if ps is None:
                                    server.send(buf[fwd:head])
                                else:
                                    prepared.forward(self, server, buf[fwd:head])
                            self._reject_in_place(server, t, error)
                        fwd = end
                        continue
                    elif isinstance(verdict, CloseIdleServers):
                        assert self.target is not None
                        self.app.manager.close_idle(self.target.cluster, verdict.database, verdict.reason)
                    elif not isinstance(verdict, Allow):
                        # Pin / Unpin: applied once a server is linked (survives a wait for one)
                        self._pending_pin = verdict
            elif kind == _K_TERMINATE:
                if server is not None and fwd < head:
                    if ps is None:
                        server.send(buf[fwd:head])
                    else:
                        prepared.forward(self, server, buf[fwd:head])
                self.close(terminated=True)
                return
            if server is None:
                if self._reject_next is not None:
                    error, self._reject_next = self._reject_next, None
                    self._first_checked = False
                    self._pending_pin = None
                    self._reject_locally(t, error)
                    fwd = end
                    continue
                if t in _NEEDS_NO_SERVER and (start == end or t not in _EMPTY_ONLY):
                    # Between transactions: a Sync is answered as PostgreSQL would (nothing is pending);
                    # CopyData/CopyDone/CopyFail left over after a failed COPY, and Flush, are ignored,
                    # as the server would ignore them. None of them is worth a checkout. A Sync or Flush
                    # with a body goes to a server, whose ERROR 08P01 (and skip to Sync) is the answer.
                    if t == codes.SYNC:
                        self.send(m.READY_FOR_QUERY_IDLE)
                    fwd = end
                    continue
                if (
                    kind == _K_QUERY
                    and statement is not None  # also: the text is not empty
                    and buf[start] in _END_INITIALS
                    and self._end_outside_transaction(buf, start, end)
                ):
                    fwd = end
                    continue
                if t in _NAMES_A_STATEMENT and transaction_mode and _unnamed(t, buf, start, end):
                    # The unnamed statement of an earlier transaction stayed on its server: whichever
                    # server this transaction gets holds another one, or another client's. Never run it.
                    self.app.stats.error(sqlstate.INVALID_SQL_STATEMENT_NAME)
                    self._reject_locally(t, _NO_UNNAMED_STATEMENT)
                    fwd = end
                    continue
                # the first message of a transaction: route it, then get a server
                if t == codes.BIND and ps is not None:
                    statement = self._bound_statement(ps, buf, start, end)
                self._buf = buf[head:]
                if not self._checkout(statement, t):
                    return  # waiting; _buf is processed again when a server arrives (or its settings)
                self._buf = b""
                server = self.server
                if server is None:  # rejected by routing
                    self._pending_pin = None
                    fwd = end
                    continue
            self._first_checked = False
            verdict = self._pending_pin
            if verdict is not None:
                self._pending_pin = None
            if statement is not None and not transaction_mode and statement.session_state:
                if any(e.feature == LOAD for e in session_effects(statement)):
                    # session pooling: no reset unloads a library (a transaction pool closes such a server
                    # too)
                    server.unresettable = "a client ran LOAD"
                if not self.startup_reset and any(resets_setting(text) for text in statement.statements):
                    self.startup_reset = True
            if statement is not None and transaction_mode:
                effect = statement.session_state
                if effect == "DEALLOCATE" or effect == "DISCARD":
                    # named statements: only the client's own go (see halephant.proxy.prepared)
                    if fwd < head:
                        if ps is None:
                            server.send(buf[fwd:head])
                        else:
                            prepared.forward(self, server, buf[fwd:head])
                        fwd = head
                    instead = prepared.deallocate(self, server, t, statement, buf[head:end])
                    if instead is not None:
                        server.send(instead)
                        fwd = end
                elif ps is not None and t == codes.QUERY and statement.first_keyword == "EXECUTE":
                    # SQL EXECUTE of a protocol-level statement: the server knows it by halephant's name
                    if fwd < head:
                        prepared.forward(self, server, buf[fwd:head])
                        fwd = head
                    instead = prepared.sql_execute(self, server, buf[head:end])
                    if instead is not None:
                        server.send(instead)
                        fwd = end
                if t != codes.PARSE and (
                    effect or (not statement.plain and statement.mentions("search_path"))
                ):
                    # a new search_path (SET LOCAL leaves no `effect`; a plain statement sets none): the
                    # statements prepared after it are those of its clients
                    if ps is not None and fwd < head:
                        prepared.forward(self, server, buf[fwd:head])  # ...not those before it
                        fwd = head
                    session_state.search_path_set(self, statement)
                session = self.session
                if session is not None and session.unlistening is not None:
                    session_state.unlisten_outcome(self, statement)  # a ROLLBACK undoes the UNLISTEN
                if t == codes.PARSE:
                    # only prepared: it takes effect when a Bind runs it (below)
                    session_state.on_parse(self, buf[start : buf.find(b"\0", start, end)], statement, verdict)
                elif effect or verdict is not None or (session is not None and session.pins):
                    # State that outlives the transaction: carried with the client, or the client keeps
                    # this server (logged with the reason) until it is released.
                    session_state.on_statement(self, statement, verdict)
                if t == codes.PARSE and buf[start] != 0 and ps is None:
                    if prepared.limit(self):
                        # mapped onto statements shared on the servers from now on: no pin. The books
                        # follow the batch from its start when none of it has gone to the server yet;
                        # else the replies to what went stay the server's own (`blind`)
                        whole = batch_at >= 0 and fwd <= batch_at
                        cut = batch_at if whole else head
                        if fwd < cut:
                            server.send(buf[fwd:cut])
                            fwd = cut
                        ps = self.prepared = prepared.activate(self, blind=not whole)
                    elif self.session is not None:
                        session_state.pin_session(self, "named prepared statement")
                    elif not self.pinned:
                        self.pin_for("named prepared statement")
            elif isinstance(verdict, Pin):
                self.pin_for(verdict.reason)
            elif self.session is not None and kind == _K_BATCH and self.session.parsed and transaction_mode:
                if t == codes.BIND:  # a statement parsed earlier, maybe transactions ago, runs now
                    session_state.on_bind(self, _bound_name(buf, start, end))
                elif t == codes.CLOSE and buf[start] == _STATEMENT_TARGET:
                    session_state.on_close(self, buf[start + 1 : buf.find(b"\0", start + 1, end)])
            if kind <= _K_SYNC:
                if kind != _K_PARSE:  # Query, Sync, FunctionCall: a sync point
                    if ps is not None:  # only a client whose statements are mapped retries a batch
                        self.began_with = self._beginning
                        self._beginning = (
                            buf[head:end]
                            if statement is not None
                            and t == codes.QUERY
                            and self.outstanding == 0
                            and server.scanner.status == codes.TX_IDLE
                            and statement.first_keyword in _BEGINS
                            and not statement.is_multi_statement
                            else None
                        )
                    self.outstanding += 1
                    self.unsynced = False
                    self._last_sync_point = t
                    batch_at = end
                else:
                    self.unsynced = True
            elif kind == _K_BATCH:
                self.unsynced = True
            elif kind == _K_COPY_END:
                self.copy_ended = (
                    self.link_count,
                    server.rfq_seen + self.outstanding,
                    self.unsynced,
                    self._last_sync_point == _SYNC,
                )
        if server is not None and fwd < consumed:
            if ps is None:
                server.send(buf if fwd == 0 and consumed == len(buf) else buf[fwd:consumed])
            elif fwd == 0 and consumed == len(buf):
                prepared.forward(self, server, buf, frames)  # the common case: framed already
            else:
                prepared.forward(self, server, buf[fwd:consumed])
        if consumed < len(buf):
            if buf[consumed] not in _KIND:
                # refuse on the type byte alone: waiting for the body of a bogus length could hang forever
                raise MalformedMessage(f"invalid frontend message type {buf[consumed]}")
            rest = buf[consumed:]
            self._buf = bytearray(rest) if len(rest) > 4 and _unpack_len(rest, 1)[0] > _GATHER_FROM else rest

    def _gathered(self, data: bytes) -> bytes | None:
        """For `_process`: what is left of earlier chunks, then `data`; None while a large message is
        still incomplete (gathered in place: copied whole at every chunk, it would cost time quadratic
        in its size)."""
        pending = self._buf
        if isinstance(pending, bytearray):
            pending += data
            if len(pending) <= _unpack_len(pending, 1)[0]:
                return None
            return bytes(pending)
        return pending + data

    @staticmethod
    def _bound_statement(ps: ClientStatements, buf: bytes, start: int, end: int) -> Statement | None:
        """The statement a Bind runs, when the client prepared it by name: a transaction that starts by
        running one (drivers run what they prepared so) is routed as a Query of its text would be."""
        name = _bound_name(buf, start, end)
        bound = ps.names.get(name) if name else None
        if bound is None:
            return None
        body = bound.body  # the text, then the parameter types
        return statement_of(body[: body.find(b"\0")])

    def _after_transaction(self, server: ServerConnection) -> bool:
        """The client's transaction is over and the server stays linked only for halephant's own business
        with it (reading the session state back, handing LISTEN over): what the client sends now begins
        its next transaction, which waits for that to finish, so that it is routed as any other (after
        `SET default_transaction_read_only = off`, say, to the primary) rather than sent to this server.
        A pinned client waits too: what it sends may take again a feature whose release the read-back is
        about to report (`SELECT pg_advisory_unlock(1)`, then `SELECT pg_advisory_lock(1)`), and that
        report must not count for the feature taken again."""
        session = self.session
        return (
            session is not None
            and (session.reading_on is server or session.cleaning)
            and self.outstanding == 0
            and not self.unsynced
            and server.scanner.status == _TX_IDLE
        )

    def resume_held(self) -> None:
        """Go on with what `_process` held back, if halephant's business with the server is over."""
        if not self.held_back or self.state != READY:
            return
        server = self.server
        if server is not None and (server.absorb or self._after_transaction(server)):
            return
        try:
            self._process(b"")
        except ClientError as exc:
            self.fail(exc)
        except Exception as exc:  # called from other callbacks: never let it escape there
            self._internal_error(exc)

    def _quick_query(self, data: bytes) -> bool:
        """The most common transaction in transaction pooling, by the shortest path: one whole Query of a
        plain statement (`Statement.plain`) from a client with nothing carried between transactions and
        no server linked. False, having done nothing, for anything else: `_process` then takes it.

        Exactly what `_process` would do for it: no inspector wants a plain statement, it has no
        session effect, so it is routed, linked to a server and sent, and counted as a sync point.
        """
        app = self.app
        n = len(data)
        if n < 6 or n > app.max_message_size or app.plugins.has_plain_inspectors:
            return False
        if data[0] == _QUERY:
            if _unpack_len(data, 1)[0] + 1 != n:
                return False
            text_end = data.find(b"\0", 5)  # `_statement`, inlined
            if text_end < 0:
                return False
            statement = statement_of(data[5:text_end])
            sync_point = _QUERY
        else:
            statement = self._quick_batch(data, n)
            sync_point = _SYNC
        if statement is None or not statement.plain:
            return False
        # A refused route is answered as for a Query (error, then ReadyForQuery): for a whole batch
        # ending in its Sync those are the same bytes the general loop sends, which skips to that Sync.
        if not self._checkout(statement, _QUERY):
            # processed again by _process once a server arrives, or sent as it is by attach_server
            # if nothing came in meanwhile (by resume_held once the server has the client's settings)
            self._buf = self._quick = data
            return True
        server = self.server
        if server is not None:
            self.outstanding += 1
            self.unsynced = False
            self._last_sync_point = sync_point
            server.transport.write(data)  # type: ignore[union-attr]  # linked: connected
        return True

    @staticmethod
    def _quick_batch(data: bytes, n: int) -> Statement | None:
        """For `_quick_query`: the statement of a whole extended-protocol batch as drivers send one
        transaction (an unnamed Parse, then only Bind, Describe, Execute, Close or Flush, ending with
        its one Sync), else None (`_process` then frames it, and reports what is malformed). `n` is
        `len(data)`, at least 6 and within the message size limit."""
        if data[0] != _PARSE or data[5] != 0:
            return None  # a named statement is the prepared-statement mapping's
        parse_end = _unpack_len(data, 1)[0] + 1
        if not 5 <= parse_end <= n:
            return None
        # walked here without building the frame list `split_frames` makes: this runs per transaction.
        # No message of a chunk this size can be over the size limit without running past its end.
        # The tail most drivers send (Describe the portal, Execute it, Sync) is matched in one step;
        # the walk must then land exactly on it.
        last = n - 5
        walk_to = n - _TAIL_SIZE if data.endswith(_DESCRIBE_EXECUTE_SYNC) else last
        if walk_types(data, parse_end, walk_to, _QUICK_BATCH) != walk_to:
            return None
        # ...up to its Sync, which must end the data
        if walk_to == last and (data[last] != _SYNC or _unpack_len(data, last + 1)[0] != 4):
            return None
        # `_statement`, inlined: the name is empty (data[5] is its NUL), the text follows
        text_end = data.find(b"\0", 6, parse_end)
        return None if text_end < 0 else statement_of(data[6:text_end])

    @staticmethod
    def _statement(t: int, buf: bytes, start: int, end: int) -> Statement | None:
        """The statement of the Query or Parse whose payload is `buf[start:end]`; None when malformed
        (PostgreSQL will say so itself)."""
        # Only the text is needed: find its NULs directly (the full decoders cost ~3x more).
        if t != codes.QUERY:
            name_end = buf.find(b"\0", start, end)
            if name_end < 0:
                return None
            start = name_end + 1
        text_end = buf.find(b"\0", start, end)
        if text_end < 0:
            return None
        return statement_of(buf[start:text_end])

    def _end_outside_transaction(self, buf: bytes, start: int, end: int) -> bool:
        """For `_process`, at a Query with no server linked whose text may end a transaction: answer
        it here, as PostgreSQL answers it outside a transaction block, when that is exactly what a
        server would send. False, having done nothing, for anything else.

        Transaction pooling with no server linked means no transaction is open: the server goes back
        only at ReadyForQuery Idle with nothing outstanding, and a pinned client keeps its server. The
        Query must be the last thing the client sent (nothing pipelined behind it), no inspector may
        have asked for a pin, and the client must not have set what changes PostgreSQL's answer. Not
        routed: no server is needed, so a lone ROLLBACK after a failed transaction (as drivers send
        one) is answered at once also while the primary is down, instead of waiting for a checkout.
        """
        if (
            end != len(buf)
            or not self.transaction_mode
            or self._pending_pin is not None
            or self.outstanding
            or self.unsynced
            or self.pinned
        ):
            return False
        settings = self.settings
        if settings:
            for name in _NOTICE_SETTINGS:
                if name in settings:
                    return False
        # Only while no primary is known: a server's own defaults (ALTER ROLE ... SET
        # client_min_messages, lc_messages) may change its answer, which halephant cannot see.
        target = self.target
        if target is None or self.app.manager.cluster_view(target.cluster).primary is not None:
            return False
        match = _LONE_END.fullmatch(buf, start, end)
        if match is None:
            return False
        self._first_checked = False
        self.sweep_links = -1  # activity for the timeout sweep, as a transaction through a server is
        self.send(_LONE_ROLLBACK if match.group(1) else _LONE_COMMIT)
        return True

    def _reject_locally(self, t: int, error: bytes) -> None:
        """Answer a rejected message with no server involved (between transactions)."""
        self.send(error)
        if t in _SYNC_POINTS:
            self.send(m.READY_FOR_QUERY_IDLE)
        else:
            self.skip_to_sync = True

    def _reject_in_place(self, server: ServerConnection, t: int, error: bytes) -> None:
        """Inside a transaction: make the server fail at this very point, then show our error instead."""
        marker = f"halephant_rejected_{next(_reject_markers)}"
        if self.prepared is not None:
            prepared.reject(self, t, error)
        else:
            server.arm_rewrite(marker.encode(), error, self.outstanding)
        if t == codes.QUERY:
            server.send(m.query(marker))
            self.outstanding += 1
            self.unsynced = False
        else:
            server.send(m.message(b"P", b"\0" + marker.encode() + b"\0\0\0"))
            self.unsynced = True
            self.skip_to_sync = True

    def _checkout(self, statement: Statement | None, t: int) -> bool:
        """Link a server for a new transaction. False when the client has to wait (or was failed)."""
        # Written for few bytecodes: this runs once per transaction.
        app = self.app
        info = self.info
        target = self.target
        assert info is not None and target is not None
        ready = self.state == READY
        if ready or not self.transaction_mode:
            # TransactionInfo(statement) without the frozen dataclass's slower __init__ (per transaction)
            transaction = _new_transaction(TransactionInfo)
            _set_statement(transaction, statement)
            nodes = app.manager.nodes
            cluster = nodes.views.get(target.cluster) or nodes.view(target.cluster)
            route = app.plugins.route_call(info, transaction, self.pool_info, cluster)
            if type(route) is not Route:  # the exact type first: per transaction
                route = app.plugins.route_answer(route)
                if isinstance(route, Reject):
                    return self._route_rejected(route, t, ready)
        else:
            # A server is needed once at login only to learn the parameters to report: routed as a
            # transaction with no statement, so that a read-only user's login is served by a replica
            # (and works while the primary is down). Not a transaction, though: a policy refusing this
            # user's transactions must not refuse the login, which then learns them from the primary.
            cluster = app.manager.cluster_view(target.cluster)
            answer = app.plugins.route_call(info, _LOGIN_TRANSACTION, self.pool_info, cluster)
            route = answer if type(answer) is Route else _LOGIN_ROUTE
            if route.role is not _PRIMARY and app.manager.pool_for(target, route.role, self) is None:
                route = _LOGIN_ROUTE  # no such node can take it now: nor should the login fail for that
        if route is not self._last_route and ready and route != self._last_route:
            # recorded when this client's routing changes (its first transaction included), not per
            # transaction: the default plugin answers with the same Route object while nothing changes
            self._last_route = route
            app.stats.decide("route", info, route.reason)
        if app.debug:
            log.debug("%r: route %s: %s", self, route.role, route.reason)
        if route.role is _PRIMARY:
            # the same pool while its node stays the primary: looked up again only after a failover
            pool = self._primary_pool
            if pool is None or pool.serves is not _PRIMARY:
                pool = self._primary_pool = app.manager.pool_for(target, route.role, self)
        else:
            pool = app.manager.pool_for(target, route.role, self)
        if pool is None:
            return self._route_rejected(app.manager.nodes.unavailable(target, route.role), t, ready)
        if app.control.holding and app.control.hold(self, pool):
            # PAUSE: held until RESUME; a login too (session pooling takes its server at login, and a
            # login that learns the parameters to report would open one)
            self._first_checked = True
            return False
        # waiters queue per client user: fair between users sharing one pool
        server, open_one = pool.checkout(self, info.user)
        if server is not None:
            return self._link(server)
        if open_one:
            app.manager.open(pool)
        self.waiting_pool = pool
        self._first_checked = True
        timeout = self._checkout_timeout
        if timeout < 0:
            db = app.config.database_for(target.entry_name)
            timeout = self._checkout_timeout = db.checkout_timeout if db is not None else 30.0
        # enforced by the pool manager's sweep (one timer for everyone, not one per wait)
        self.wait_started = self.since = now = app.loop.time()
        self.wait_notified = False
        self.wait_deadline = now + timeout
        return False

    def _route_rejected(self, route: Reject, t: int, ready: bool) -> bool:
        """For `_checkout`: no server for this transaction (a plugin refused it, or no node can take it).
        At login that fails the client; afterwards only the transaction is refused."""
        log.info("%r: route rejected %s: %s", self, route.code, route.reason)
        app = self.app
        app.stats.decide("route_reject", self.info, route.reason, route.code)
        if not ready:
            raise _fatal(route)
        app.stats.error(route.code)
        self._reject_locally(t, _error(route))
        return True

    def forget_pools(self) -> None:
        """A reload may have changed the pools and their settings: look the primary's pool and the
        checkout timeout up again when next needed."""
        self._primary_pool = None
        self._checkout_timeout = -1.0

    def attach_server(self, server: ServerConnection) -> None:
        """Called by the pool: the server this client waited for."""
        pool = self.waiting_pool
        if pool is not None:
            pool.stats.waited(self.app.loop.time() - self.wait_started)
            self.waiting_pool = None
        if self.state == CLOSED or self.server is not None:
            # gone while waiting: give the server straight back. (One that has a server already was
            # queued twice, a bug: a second server would cross the streams of the two.)
            if self.server is not None:
                log.error("%r: handed %s while it has %s: given back", self, server, self.server)
            self.app.manager.checkin(server)
            return
        try:
            linked = self._link(server)
            if self._read_paused:
                self._resume_if_paused()
            if not linked:
                return  # what it sent waits for its settings to be applied (`resume_held`)
            quick = self._quick
            if quick is not None:
                self._quick = None
                if self._buf is quick:  # what _quick_query took, and nothing since: send it
                    self._buf = b""
                    self._first_checked = False
                    self.outstanding += 1
                    self.unsynced = False
                    self._last_sync_point = _QUERY if quick[0] == _QUERY else _SYNC  # `_sync_point`
                    server.transport.write(quick)  # type: ignore[union-attr]  # linked: connected
                    return
            if self.state == WELCOME:
                self._first_checked = False
                if not server.absorb:
                    self._welcome(server.params)
            else:
                self._process(b"")
        except ClientError as exc:
            self.fail(exc)
        except Exception as exc:
            self._internal_error(exc)

    def reroute(self) -> None:
        """Called by the pool manager: the pool this client waits on has no node to serve it any more
        (the replicas are gone); by RESUME: its database is no longer paused. Nothing it sent has
        started anywhere, so it is routed again as if it had just come: the routing policy decides where
        it goes now (the primary, or a refusal)."""
        self._end_wait()
        if self.state == READY:
            self.data_received(b"")  # its next transaction, from the start: routed, then a server
        elif self.state == WELCOME:
            try:
                self._login_checkout()
            except ClientError as exc:
                self.fail(exc)
            except Exception as exc:
                self._internal_error(exc)

    def checkout_failed(self, error: ClientError) -> None:
        """Called by the pool manager: no server could be opened for this waiting client."""
        self._end_wait()
        if self.state == CLOSED:
            return
        if self.state != READY or (self.pool_info is not None and self.pool_info.mode is PoolMode.SESSION):
            self.fail(error)  # (always sent as FATAL)
            return
        self.app.stats.error(error.code)
        self._reject_next = m.client_error_response(error, fatal=False)
        self.data_received(b"")

    def checkout_timeout(self) -> None:
        """Called by the pool manager's sweep: `wait_deadline` passed (already out of the queue)."""
        pool = self.waiting_pool
        if pool is None:
            return
        pool.stats.checkout_timeouts += 1
        message = f"no server connection available for pool {pool.key[0]}/{pool.key[1]}: checkout timeout"
        refused = pool.login_refused
        cap = pool.cap_in_the_way() if pool.caps else None
        if refused is not None:
            # the pool is not full: PostgreSQL refuses its logins (server_login_retry), or halephant is
            # out of descriptors for another; say so
            error = cast(ClientError, refused[0])
            if isinstance(error, OutOfResources):
                hint = f"{error.message}; {error.hint}"
            else:
                hint = f"PostgreSQL refused the pool's last login: {error.message}"
            why = f"no server of pool {pool.name} in time"
        elif cap is not None:
            # the pool (or its reserve) is not full either: a cap across pools is (max_db_connections, ...)
            message += f": {cap.describe()} reached"
            hint = cap.hint()
            why = f"no server of pool {pool.name} in time: {cap.describe()} reached"
        else:
            hint = "The pool is full; raise pool_size or checkout_timeout, or shorten transactions."
            why = f"no server of pool {pool.name} in time"
        log.warning("%r: checkout timeout waiting for a server of pool %s", self, pool.name)
        self.app.stats.decide("checkout_timeout", self.info, why, sqlstate.TOO_MANY_CONNECTIONS)
        self.checkout_failed(ClientError(sqlstate.TOO_MANY_CONNECTIONS, message, hint=hint))

    def cancel_wait(self) -> bool:
        """A cancel request while this client waits for a server: its statement has started nowhere, so
        it is answered here as PostgreSQL answers a cancelled one (ERROR 57014, the rest of its batch
        skipped up to the Sync); what the client pipelined behind it goes on as it would. False when it
        is not waiting for a transaction's server."""
        if self.waiting_pool is None or self.state != READY or not self.transaction_mode:
            return False
        self._end_wait()
        self.app.stats.error(sqlstate.QUERY_CANCELED)
        self._reject_next = m.error_response(
            sqlstate.QUERY_CANCELED, "canceling statement due to user request"
        )
        self.data_received(b"")
        return True

    def _end_wait(self) -> None:
        if self.waiting_pool is not None:
            self.waiting_pool.cancel_wait(self)
            self.waiting_pool = None
        self._resume_if_paused()

    def _link(self, server: ServerConnection) -> bool:
        """Link `server`; False when what the client sent must wait for the query that applies its
        settings there (`_checkout` and `attach_server` then treat it as still waiting)."""
        self.server = server
        self.since = self.app.clock
        server.client = self
        server.link_count += 1
        self.link_count += 1
        if self.write_paused:
            server.set_reading(True)
        # (settings nearly always equal: no call then)
        if server.settings != self.settings and server.apply_settings(self.settings) and self.state == READY:
            # Sent behind that query, the client's statement would run even when the query failed (an
            # operator's cancel hit it), with the settings another client left there: it waits for the
            # answer (`settings_applied`, then `resume_held`).
            self.held_back = True
            self._first_checked = True
            if self.session is not None:
                session_state.on_link(self, server)
            return False
        if self.session is not None:
            session_state.on_link(self, server)
        return True

    def settings_applied(self, error: ClientError | None) -> None:
        """The linked server ran the query that applies this client's startup settings."""
        try:
            self._settings_applied(error)
        except ClientError as exc:
            self.fail(exc)
        except Exception as exc:  # called from the server's callback: never let it escape there
            self._internal_error(exc)

    def _settings_applied(self, error: ClientError | None) -> None:
        if self.state == WELCOME:
            if error is not None:
                self.fail(error)  # as PostgreSQL does at login: FATAL with its own SQLSTATE
            elif self.server is not None:
                self._welcome(self.server.params)
        elif error is not None:
            # what the client sent waits for this answer (`_link`) and is dropped: run without its settings
            # it would read or write as another client; the server, dirty, is closed when it goes back
            log.warning("%r: could not apply startup settings on %s: %s", self, self.server, error.message)
            self.fail(error)

    def copy_in_started(self, counted: int = 0) -> None:
        """The linked server entered COPY FROM STDIN mode (`counted`: ReadyForQuery of the same chunk
        already in the server's `rfq_seen`, and not yet in `outstanding`).

        Started by an extended-protocol Execute, the Sync the client sent behind it reached the server
        in copy-in mode, where PostgreSQL ignores Sync: it will never be answered. The batch is
        finished by the Sync the client sends after CopyDone/CopyFail.
        """
        server = self.server
        if server is None:
            return
        self.copy_mark = (self.link_count, server.rfq_seen)
        answered = server.rfq_seen - counted
        link, sent, unsynced, sync = self.copy_ended
        # Every sync point sent before the Execute (or Query) of this COPY was answered before its
        # CopyInResponse: fewer than `sent` (+1 when the COPY's batch had no Sync) only if the client
        # sent its CopyDone/CopyFail before this CopyInResponse came (it pipelined its data). What it
        # sent after that CopyDone stays in the books then.
        if link == self.link_count and answered < sent + unsynced:
            self.copy_ended = (-1, 0, 0, 0)
            if unsynced or sync:  # an extended-protocol COPY: its batch ends at a Sync after CopyDone
                if not unsynced:
                    self.outstanding -= 1  # the Sync behind its Execute, which PostgreSQL ignores
                if answered + self.outstanding == sent:  # no sync point since the CopyDone yet
                    self.unsynced = True
            return
        if self._last_sync_point == codes.SYNC:
            self.outstanding = 0
            self.unsynced = True

    def pin_for(self, reason: str) -> None:
        """Keep the linked server for the rest of this client's session."""
        if self.pinned or self.server is None:
            return
        self.pinned = True
        if not self.server.dirty:  # a reason to close the server that is already there stays
            self.server.dirty = reason
        log.info("%r: pinned to server pid %d: %s", self, self.server.backend_pid, reason)
        self.app.stats.decide("pin", self.info, reason)

    def server_ready(self, n: int, status: int, at_boundary: bool) -> None:
        """The linked server sent `n` ReadyForQuery; the last said `status`."""
        outstanding = self.outstanding - n
        if outstanding > 0:
            self.outstanding = outstanding
            return
        self.outstanding = 0
        if at_boundary and status == _TX_IDLE and self.transaction_mode and not self.unsynced:
            if self.session is None:  # the common case: nothing carried between transactions
                if not self.pinned:
                    server = self.server
                    if server is not None:  # `_release()`, inlined: this runs per transaction
                        self.server = None
                        server.client = None
                        self.since = self.app.clock
                        if self.write_paused:
                            server.set_reading(False)
                        self.app.manager.checkin(server, self)
            else:
                session_state.at_idle(self)
        elif self.statement_mode and status != _TX_IDLE:
            # (tested only here, where a transaction-mode client's server stays linked: the Idle path
            # above, run once per transaction, is the same in both modes)
            self._transaction_block_refused(status, at_boundary)
        elif self.startup_reset and at_boundary and status == _TX_IDLE and not self.unsynced:
            self._restore_startup()

    def _restore_startup(self) -> None:
        """Session pooling: the transaction that just ended may have reset settings the client gave at
        startup. halephant set those on the server (`_link`), as session values, which RESET takes
        back to the server's defaults; PostgreSQL takes them back to the startup values, and so does
        this query, ahead of whatever the client sends next (queued behind it on the server)."""
        self.startup_reset = False
        server = self.server
        if server is None or not self.settings:
            return
        before = dict(server.params)
        server.run_internal(
            restore_sql(self.settings), lambda rows, error: self._startup_restored(server, before, error)
        )

    def _startup_restored(self, server: ServerConnection, before: dict[str, str], error: str | None) -> None:
        if self.server is not server:
            return
        if error is not None:
            # the reset stands: as if the client had run it on a server it logged in to without them
            log.warning("%r: could not set its startup settings again: %s", self, error)
            return
        self.report_changed_parameters(server, before)

    def report_changed_parameters(self, server: ServerConnection, before: dict[str, str]) -> None:
        """Tell the client the reported parameters (ParameterStatus) that halephant's own query changed on
        its server (`before`: the server's parameters before that query), as PostgreSQL tells a client
        what its RESET changed."""
        changed = [m.parameter_status(k, v) for k, v in server.params.items() if before.get(k) != v]
        if changed:
            self.send(b"".join(changed))

    def withheld_ready(self, data: bytes, ready: int, status: int) -> bytes:
        """Statement pooling: `data` (a server's bytes for this client, completing `ready` ReadyForQuery,
        the last with a `status` other than Idle) without the ReadyForQuery that ends it, when that one
        will be refused (`_transaction_block_refused`, whose FATAL error takes its place). Told that it
        is in a transaction, a client would read that error as coming between statements, where libpq
        only shows it as a notice; withheld, the error is the answer to the statement, as from PgBouncer.
        The CommandComplete right before it goes too: that statement's work is rolled back, and a driver
        that sends BEGIN alone (psycopg) expects one result, not a success and an error.
        Where the chunk ends otherwise (a notice came right behind) the ReadyForQuery goes with the rest
        and the error follows it. (Only the refused client, closed next, could be misled by a chunk that
        began inside a message and merely ends like this.)"""
        if self.outstanding > ready or data[-6:-1] != READY_FOR_QUERY_HEAD or data[-1] != status:
            return data
        try:
            frames, consumed = split_frames(data, len(data))
        except MalformedMessage:
            frames, consumed = [], 0  # began inside a message
        if consumed == len(data) and len(frames) > 1 and frames[-2][0] == codes.COMMAND_COMPLETE:
            return data[: frames[-2][1] - 5]
        return data[:-6]

    def _transaction_block_refused(self, status: int, at_boundary: bool) -> None:
        """Statement pooling: a statement (a Query, or an extended-protocol batch up to its Sync) left
        its server in a transaction block, or in a failed one.

        The statements before it in the same Query were answered as inside the transaction (and so was
        this one, where its ReadyForQuery could not be withheld: `withheld_ready`): only ending the
        session undoes that, as PostgreSQL does when idle_in_transaction_session_timeout ends a
        transaction a client holds open. It is sent FATAL 25001 (active_sql_transaction: a
        transaction is open where none may be, as PostgreSQL says of a statement that cannot run in a
        transaction block), with PgBouncer's message text, which tools match on. The server is never
        handed on in that transaction: rolled back and pooled when nothing else of the client's is on
        it, else closed (`_closed`, as for a client that left mid-transaction)."""
        server = self.server
        if (
            server is not None
            and at_boundary
            and not self.unsynced
            and self.session is None
            and not self.pinned
            and not server.absorb
            and not server.dirty
        ):
            # Nothing session-bound was done (that would have given the client a `session` or a pin),
            # and the settings on the server are the ones it was linked with: the rollback leaves the
            # server as it was before the transaction. (Named protocol-level statements outlive a
            # rollback, as the server's record of them assumes.)
            self.server = None
            server.client = None
            if server.reading_paused:
                server.set_reading(False)
            self.app.manager.reset_and_checkin(server, "ROLLBACK")
        log.info(
            "%r: transaction block refused in statement pooling (server transaction status %s)",
            self,
            chr(status),
        )
        entry = self.target.entry_name if self.target is not None else ""
        if entry not in self.app.config.databases:
            entry = "'*'"  # the catch-all entry serves it
        self.fail(
            ClientError(
                sqlstate.ACTIVE_SQL_TRANSACTION,
                "transaction blocks not allowed in statement pooling mode",
                hint="Run every statement in autocommit mode, or use transaction pooling for this database "
                f"(databases.{entry}.mode: transaction in halephant.yaml).",
                fatal=True,
            )
        )

    def notification_relayed(self, payload: bytes) -> None:
        """The linked server delivered a notification to this client itself (transaction pooling)."""
        if self.session is not None:
            session_state.relayed(self, payload)

    def parameter_changed(self, name: str) -> None:
        """The server reported a new value of a reported setting (transaction pooling)."""
        session_state.parameter_changed(self, name)

    def unpin(self, reason: str) -> None:
        """The pinned server holds nothing session-bound any more: it may go back after this transaction."""
        if not self.pinned:
            return
        self.pinned = False
        if self.server is not None:
            if self.session is None or self.server.dirty == self.session.pin_reason:
                self.server.dirty = ""  # a reason to close it that is not the pin's stays
            log.info("%r: unpinned from server pid %d: %s", self, self.server.backend_pid, reason)

    @property
    def is_closed(self) -> bool:
        return self.state == CLOSED

    def release(self, reset: str = "", notifications: Callable[[bytes], None] | None = None) -> None:
        """Give the linked server back to its pool (transaction pooling, at the end of a transaction),
        after running `reset` on it when given (the server is closed if that fails); the
        NotificationResponses the server sends meanwhile go to `notifications` when given."""
        if reset:
            server = self.server
            assert server is not None
            self.server = None
            server.client = None
            if self.write_paused:
                server.set_reading(False)
            self.app.manager.reset_and_checkin(server, reset, notifications=notifications, client=self)
        else:
            self._release()
        if self.session is not None:
            session_state.flush(self)
        if self.held_back:
            self.resume_held()  # its next transaction: routed, and linked to a server

    def _release(self, after_transaction: bool = True) -> None:
        server = self.server
        assert server is not None
        self.server = None
        server.client = None
        self.since = self.app.clock
        if self.write_paused:
            server.set_reading(False)
        self.app.manager.checkin(server, self if after_transaction else None)

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        if self.server is server:
            self.server = None
            # (a session-pooling client keeps its server between transactions: say which it was)
            idle = not self.outstanding and server.scanner.status == _TX_IDLE
            log.warning(
                "%r: server %s lost %s: %s",
                self,
                server,
                "between transactions" if idle else "mid-transaction",
                reason,
            )
            if server.fatal_relayed:
                # The server's own FATAL (pg_terminate_backend, a shutdown) was relayed: the client ends
                # as connected directly. A FATAL of halephant's after it would be read, by a client idle
                # until then, as a second answer to its next query.
                self.close("the server ended the connection with a FATAL error")
                return
            self.fail(
                ClientError(sqlstate.CONNECTION_FAILURE, f"server connection lost: {reason}", fatal=True),
                # a backend terminated while blocked sending a row to a slow client stops inside it
                mid_message=not server.scanner.at_boundary,
            )

    # --- ending ---

    def _awaits_answers(self) -> bool:
        """Something the client sent is still to be answered: it waits for a server or for halephant's
        business with one, or a sync point it sent is not answered yet (except in COPY FROM STDIN,
        which only the client's own CopyDone could end)."""
        if self.waiting_pool is not None or self.held_back:
            return True
        server = self.server
        return self.outstanding > 0 and (
            server is None or self.copy_mark != (self.link_count, server.rfq_seen)
        )

    def _finishing(self) -> None:
        """Nothing more is read from this client: what it sent is answered, then it is closed."""
        self.transport.pause_reading()
        # Its own class, rather than a flag tested at every ReadyForQuery: the per-transaction path of
        # every other client stays as it is (same slots, so the object only changes class).
        self.__class__ = _Finishing

    def _finish_if_answered(self) -> None:
        if self.state != READY or self._awaits_answers():
            return
        error = self._end_error
        if error is None:
            self.close("client closed the connection")
        else:
            self.fail(error)

    def _answer_then_fail(self, error: MalformedMessage) -> None:
        """A malformed message: PostgreSQL reads a client's messages one by one, so the complete ones
        before it (even in the same packet) run and are answered first, then the session ends with FATAL
        08P01. What the client sends after it is not read. The server is released after the answers
        as for a client that went away (`_closed`: closed if its transaction was left open)."""
        self._end_error = error
        self._finishing()
        before, error.before = error.before, b""
        try:
            if before:
                self._process(before)  # `_Finishing._process`: ends the client once it is answered
            else:
                self._finish_if_answered()
        except ClientError as exc:
            self.fail(exc)
        except Exception as exc:
            self._internal_error(exc)

    def _check_half_closed(self, probed: bool) -> None:
        """Timer while a half-closed client waits for its answers. A client that closed its connection
        altogether (or crashed) sent the same FIN, and a statement left running for a client that is gone
        is cancelled (`_closed`). Only data sent to it tells them apart (a reset comes back): once, it is
        sent a ParameterStatus that repeats a value it was told (integer_datetimes, fixed for a server's
        life), which a client may be sent at any time; a client still reading is told nothing new."""
        if self.state == CLOSED:
            return
        transport = self.transport
        if _peer_gone(transport):
            transport.abort()  # connection_lost follows: as a client whose connection is lost
            return
        server = self.server
        if not probed and server is not None and server.at_message_boundary():
            value = server.params.get("integer_datetimes")
            if value is not None:
                self.send(m.parameter_status("integer_datetimes", value))
                probed = True
        self.app.loop.call_later(_HALF_CLOSED_CHECK, self._check_half_closed, probed)

    def fail(self, error: ClientError, mid_message: bool = False) -> None:
        """Send `error` as FATAL and close the connection.

        What comes here comes from outside the flow of the client's messages (a timeout, a shutdown, a
        plugin's broken answer, an internal error): where the client stands in its protocol is not
        known, so an ERROR it could go on after (with its ReadyForQuery, or up to its Sync) cannot be
        given; refusals a client survives are answered in the flow (`_reject_locally`).

        A client that was relayed part of a message (`mid_message`, or its linked server's scanner is
        inside one: a large row on its way) is closed without it: the ErrorResponse would be read as
        the rest of that message. It sees the connection end there, as when a backend dies."""
        if self.state == CLOSED:
            return
        if type(error) is MalformedMessage and self.state == READY and self._end_error is not error:
            self._answer_then_fail(error)
            return
        self.app.stats.error(error.code)
        server = self.server
        # (mid-handshake, plaintext would break the handshake rather than be read)
        if not mid_message and self.state != HANDSHAKE and (server is None or server.scanner.at_boundary):
            self.send(m.client_error_response(error, fatal=True))  # written by `close`, below
        level = logging.WARNING if error.code == sqlstate.INTERNAL_ERROR else logging.INFO
        log.log(level, "%r: closing: %s %s", self, error.code, error.message, extra={"sqlstate": error.code})
        self.close(f"closed by halephant: {error.code}")

    def send(self, data: bytes) -> None:
        """Write `data` to the client, behind what is held for it (`hold`): at once when nothing is.
        Every write after the TLS negotiation goes through here or `hold`, which keeps their order."""
        out = self.held_output
        if out is None:
            self.transport.write(data)
        else:
            self.held_output = out + data

    def hold(self, data: bytes) -> None:
        """Write `data` to the client at the end of this loop iteration, with the other answers held in
        it (`halephant.proxy.output`), behind what is held for it already."""
        out = self.held_output
        if out is None:
            self.held_output = data
            if not output.held:
                self.app.loop.call_soon(output.flush)
            output.held.append(self)
        else:
            self.held_output = out + data

    def write_held(self) -> None:
        """Write what `send` holds for the client now, ahead of what comes next on its transport."""
        out = self.held_output
        if out is not None:
            self.held_output = None
            self.transport.write(out)

    def close(self, reason: str = "", *, terminated: bool = False) -> None:
        """Close the connection; `terminated`: the client sent Terminate (see `_closed`)."""
        if self.state == CLOSED:
            return
        try:
            self.write_held()  # the error that ends it, for one, goes before the end
        except Exception:  # the transport may be gone already
            self.held_output = None
        self._closed(
            reason or ("client sent Terminate" if self.state == READY else "closed during login"), terminated
        )
        transport = self.transport
        transport.close()
        if transport.get_write_buffer_size():
            # It has not read all that was sent to it (the error that ends it comes last). Closed
            # gracefully, the connection and what is still to send would be kept for as long as the
            # client stays connected without reading (a query_timeout or a KILL of one that stopped
            # reading), no longer counted as a client: dropped once a reader has had time to take it.
            self.app.loop.call_later(_CLOSE_GRACE, transport.abort)

    def _closed(self, reason: str, terminated: bool = False) -> None:
        """The client is gone. A statement its server still runs is cancelled, unless the client ended
        with Terminate: PostgreSQL runs what came before a Terminate to its end (a client may send a
        statement and Terminate without waiting for the answer), so the server is only closed."""
        self.state = CLOSED
        if self.session is not None:
            session_state.forget(self)
        if self.waiting_pool is not None:
            self.waiting_pool.cancel_wait(self)
            self.waiting_pool = None
        server, self.server = self.server, None
        if server is not None:
            server.client = None
            clean = self.outstanding == 0 and not self.unsynced and server.scanner.status == codes.TX_IDLE
            if server.reading_paused:
                server.set_reading(False)
            if self.transaction_mode:
                reset = session_state.on_leave(self)
            else:
                reset = None if server.unresettable else ""
            if not clean:
                if self.outstanding and not terminated:
                    self.app.cancel_orphaned(server)  # a statement still runs, its client gone: stop it
                server.close("client left mid-transaction")
            elif not server.scanner.at_boundary:
                # In the middle of a message the client had not read whole (a notification, while the
                # client read nothing and so neither did halephant): a reset's answer would be read from
                # the middle of that message, and cannot be told apart from it.
                server.close("client left in the middle of a message from the server")
            elif reset is None:
                server.close("client left session state that cannot be undone (LOAD)")
            elif server.absorb:
                # halephant's own query for this client still runs: let it finish, and since what it
                # would have read back is not recorded, reset the settings too
                query = f"{reset}; RESET ALL" if reset else "DISCARD ALL"
                self.app.manager.reset_and_checkin(server, query, clears_settings=True)
            else:
                # session pooling, or a client pinned by session state: reset before anyone else gets it
                # (targeted when halephant knows what the client held, else server_reset_query)
                self.app.manager.reset_and_checkin(server, reset or None)
        self.app.client_closed(self)
        if self.pool_info is not None and self.info is not None:
            self.app.client_counts.release(self.pool_info.database, self.info.user)
        if self.info is not None:
            log.info("%r: disconnected: %s", self, reason)


class _Finishing(ClientConnection):
    """A client from which nothing more is read: it shut its side of the connection down, or sent a
    malformed message (`_end_error`). What it sent before goes on as usual; once every answer has been
    relayed it is closed (after `_end_error` as FATAL), and its server released as for a client that
    went away. A client becomes one by changing class (`_finishing`)."""

    __slots__ = ()

    def _process(self, data: bytes) -> None:
        super()._process(data)
        self._finish_if_answered()

    def server_ready(self, n: int, status: int, at_boundary: bool) -> None:
        super().server_ready(n, status, at_boundary)
        self._finish_if_answered()

    def _resume_reading(self) -> None:
        pass  # nothing more is read from it


def _peer_gone(transport: asyncio.BaseTransport) -> bool:
    """The client's socket is shut in both directions (the peer closed a Unix-domain socket, or a TCP
    peer answered data with a reset): nothing sent to it can be read any more."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # POLLHUP and POLLERR are reported whatever is asked for
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))
