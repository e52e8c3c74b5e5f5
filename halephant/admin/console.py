"""The SQL admin console: clients that connect to the virtual database `halephant` (or `pgbouncer`, so
PgBouncer tooling works unchanged) talk to halephant itself, as with PgBouncer's admin console.

Authentication is the normal one (`users:` entries, `halephant_authenticate`); afterwards the user must be
listed in `admin.users` (every command) or `admin.stats_users` (SHOW only), else 42501. The session is
then handed to `ConsoleSession`, which answers SHOW POOLS | CLIENTS | SERVERS | STATS | STATS_TOTALS |
LISTS | DATABASES | USERS | CONFIG | VERSION | NODES with PgBouncer's columns and types
(`halephant.admin.resultset` encodes them) and runs PAUSE, RESUME, RECONNECT, WAIT_CLOSE, KILL, DISABLE,
ENABLE, RELOAD and SHUTDOWN. The simple query protocol is the console's language, as for PgBouncer; the
extended protocol is answered too (the unnamed statement and portal, text or binary results as Bind
asks, row limits with PortalSuspended) so that drivers that always use it (psycopg, asyncpg with
statement_cache_size=0) work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import struct
import time
from typing import TYPE_CHECKING, Any

from halephant import __version__, sqlstate
from halephant.admin.resultset import (
    TEXT,
    Column,
    Result,
    columns,
    command_complete,
    data_row,
    encode_result,
    result_formats,
    row_description,
)
from halephant.config.diff import RESTART_PATHS
from halephant.errors import ClientError, ProtocolViolation
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import split_frames

if TYPE_CHECKING:
    from halephant.proxy.app import App
    from halephant.proxy.client import ClientConnection

log = logging.getLogger("halephant.admin")

#: database names that reach the console instead of a pool
ADMIN_DATABASES = frozenset({"halephant", "pgbouncer"})
#: logins to the console admitted beyond limits.max_client_conn (console sessions are not counted once
#: logged in; this bounds the ones still authenticating)
CONSOLE_HEADROOM = 5
_I16 = struct.Struct("!h")
_WRITE_COMMANDS = frozenset(
    {"PAUSE", "RESUME", "RECONNECT", "WAIT_CLOSE", "KILL", "DISABLE", "ENABLE", "RELOAD", "SHUTDOWN"}
)
#: commands that may answer only later (the session reads nothing more meanwhile)
_WAITING_COMMANDS = frozenset({"PAUSE", "WAIT_CLOSE"})
#: what the console reports at login (PgBouncer says e.g. "1.21.0/bouncer")
CONSOLE_PARAMS = {
    "server_version": f"{__version__}/halephant",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "is_superuser": "off",
}


def start_console(client: ClientConnection) -> None:
    """The client authenticated to an admin database: check the console's user lists, then take over."""
    app, info = client.app, client.info
    assert info is not None
    admin = app.config.admin
    if info.user in admin.users:
        readonly = False
    elif info.user in admin.stats_users:
        readonly = True
    else:
        why = "not in admin.users or admin.stats_users"
        app.stats.decide("reject", info, why, sqlstate.INSUFFICIENT_PRIVILEGE)
        raise ClientError(
            sqlstate.INSUFFICIENT_PRIVILEGE,
            f'user "{info.user}" may not use the admin console',
            hint="List the user in admin.users (or admin.stats_users for SHOW only).",
            fatal=True,
        )
    log.info("%r: admin console (%s)", client, "read-only" if readonly else "read-write")
    client.cancel_key = secrets.randbits(31) or 1
    out = [m.AUTHENTICATION_OK]
    out += [m.parameter_status(k, v) for k, v in CONSOLE_PARAMS.items()]
    out.append(m.parameter_status("application_name", info.application_name))
    out.append(m.backend_key_data(info.id, client.cancel_key))
    out.append(m.READY_FOR_QUERY_IDLE)
    client.send(b"".join(out))
    client.write_held()  # the console writes to the transport itself from here on
    session = ConsoleSession(app, client, readonly)
    client.transport.set_protocol(session)
    # Not a pool client any more: the login, idle and drain sweeps leave it alone, and the console
    # sessions are closed when halephant stops (Control.run).
    app.client_closed(client)
    app.control.consoles.add(session)
    # Bytes that came in behind the login in the same chunk are handed back to the client object once
    # this callback returns: WELCOME buffers them there, and the session takes them over.
    from halephant.proxy.client import WELCOME

    client.state = WELCOME
    app.loop.call_soon(session.take_buffered)


class _Portal:
    """The unnamed portal: a command's result, the format of each column, the rows Execute has sent."""

    __slots__ = ("formats", "result", "sent")

    def __init__(self, result: Result, formats: tuple[int, ...]) -> None:
        self.result = result
        self.formats = formats
        self.sent = 0


class ConsoleSession(asyncio.Protocol):
    """One console connection after login."""

    def __init__(self, app: App, client: ClientConnection, readonly: bool) -> None:
        self.app = app
        self.client = client
        self.readonly = readonly
        self.transport = client.transport
        self._buf = b""
        self._busy = False  # a command that waits (PAUSE) is running: input waits behind it
        self._write_paused = False  # the client reads none of its answers: its input waits too
        self._closed = False
        self._skip_to_sync = False
        self._statement: str | None = None  # the unnamed statement of the extended protocol
        self._portal: _Portal | None = None  # dropped at Sync, as PostgreSQL ends the implicit transaction

    def take_buffered(self) -> None:
        data, self.client._buf = self.client._buf, b""
        if data and not self._closed:
            self.data_received(bytes(data))

    # --- asyncio.Protocol ---

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            try:
                self._process()
            except ProtocolViolation as exc:
                self._fatal(exc.code, exc.message)
            except Exception as exc:
                log.exception("admin console: internal error")
                self._fatal(sqlstate.INTERNAL_ERROR, f"internal error in halephant: {exc!r}")

    def pause_writing(self) -> None:
        # A client that reads none of its answers is read no further, as a backend blocked sending
        # reads nothing: the answers to what it keeps sending would otherwise pile up here.
        self._write_paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._set_reading()

    def _set_reading(self) -> None:
        """Read the client while it reads its answers and no command (PAUSE) holds its input."""
        if self._closed:
            return
        if self._write_paused or self._busy:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.app.control.consoles.discard(self)
        log.info("%r: admin console closed", self.client)

    def _fatal(self, code: str, message: str) -> None:
        self.close(ClientError(code, message, fatal=True))

    def close(self, error: ClientError) -> None:
        """Send a FATAL error and close the connection."""
        if self._closed:
            return
        self._closed = True
        self.app.control.consoles.discard(self)
        self.app.stats.error(error.code)
        try:
            self.transport.write(m.client_error_response(error, fatal=True))
        finally:
            self.transport.close()

    # --- framing ---

    def _process(self) -> None:
        frames, consumed = split_frames(self._buf, 1 << 20)
        buf, self._buf = self._buf, self._buf[consumed:]
        out: list[bytes] = []
        for i, (t, start, end) in enumerate(frames):
            payload = buf[start:end]
            if t == codes.TERMINATE:
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            if t == codes.QUERY:
                text = payload[:-1].decode(errors="replace")
                pending = self._simple_query(text, out)
                if pending is not None:
                    # a waiting command: answer the rest after it
                    rest = b"".join(buf[s - 5 : e] for _t, s, e in frames[i + 1 :])
                    self._buf = rest + self._buf
                    self.transport.write(b"".join(out))
                    self._wait_for(pending, simple=True)
                    return
                out.append(m.READY_FOR_QUERY_IDLE)
            elif t == codes.SYNC:
                self._skip_to_sync = False
                self._portal = None
                out.append(m.READY_FOR_QUERY_IDLE)
            elif self._skip_to_sync:
                continue
            else:
                try:
                    pending = self._extended(t, payload, out)
                except ClientError as exc:
                    out.append(self._error(exc))
                    self._skip_to_sync = True
                    continue
                if pending is not None:
                    rest = b"".join(buf[s - 5 : e] for _t, s, e in frames[i + 1 :])
                    self._buf = rest + self._buf
                    self.transport.write(b"".join(out))
                    self._wait_for(pending, simple=False)
                    return
        self.transport.write(b"".join(out))

    def _error(self, exc: ClientError) -> bytes:
        self.app.stats.error(exc.code)
        return m.client_error_response(exc, fatal=False)

    def _simple_query(self, text: str, out: list[bytes]) -> asyncio.Task[str] | None:
        commands = [c.strip() for c in text.split(";")]
        commands = [c for c in commands if c]
        if not commands:
            out.append(m.EMPTY_QUERY_RESPONSE)
            return None
        for n, command in enumerate(commands):
            try:
                verb = _verb(command)
                if verb in _WAITING_COMMANDS:
                    self._check_write(verb)
                    if n != len(commands) - 1:
                        raise ClientError(sqlstate.FEATURE_NOT_SUPPORTED, f"{verb} must be the last command")
                    task = self._start_waiting(verb, command)
                    if task is not None:
                        return task
                    out.append(command_complete(verb))
                    continue
                out.append(encode_result(self.run(command)))
            except ClientError as exc:
                out.append(self._error(exc))
                return None
        return None

    def _start_waiting(self, verb: str, command: str) -> asyncio.Task[str] | None:
        """Run PAUSE or WAIT_CLOSE up to its wait: the task that answers once the wait is over, or None
        when there is nothing to wait for."""
        control = self.app.control
        if verb == "PAUSE":
            database = self._pause(command)
            if control.active_servers(database):
                return asyncio.ensure_future(self._pause_done(database))
            return None
        database = _argument(command, verb)
        pending = control.servers_to_close(database)  # (3D000 for an unknown database)
        self.app.stats.decide("admin", self.client.info, command)
        log.info("WAIT_CLOSE %s: %d server connection(s) to close", database or "(all databases)", pending)
        if pending:
            return asyncio.ensure_future(self._closed_done(database))
        return None

    def _wait_for(self, task: asyncio.Task[str], *, simple: bool) -> None:
        """Hold this session's input until `task` (PAUSE waiting for transactions, WAIT_CLOSE for servers
        to close) is done; a simple Query is then answered, an extended-protocol batch goes on from its
        next message."""
        self._busy = True
        self._set_reading()

        def done(t: asyncio.Task[str]) -> None:
            self._busy = False
            if self._closed:
                return
            self._set_reading()
            exc = None if t.cancelled() else t.exception()
            if t.cancelled() or exc is not None:
                if isinstance(exc, ClientError):
                    error = exc
                else:
                    error = ClientError(sqlstate.INTERNAL_ERROR, f"the command failed: {exc!r}")
                self.transport.write(self._error(error))
                self._skip_to_sync = not simple
            elif simple:
                self.transport.write(command_complete(t.result()))
            if simple:
                self.transport.write(m.READY_FOR_QUERY_IDLE)
            if self._buf:
                self.data_received(b"")

        task.add_done_callback(done)

    async def _pause_done(self, database: str | None) -> str:
        await self.app.control.wait_paused(database)
        return "PAUSE"

    async def _closed_done(self, database: str | None) -> str:
        await self.app.control.wait_closed(database)
        return "WAIT_CLOSE"

    def _extended(self, t: int, payload: bytes, out: list[bytes]) -> asyncio.Task[str] | None:
        """Answer one extended-protocol message as PostgreSQL would; a PAUSE that has to wait returns its
        task."""
        if t == codes.PARSE:
            name, query, _ = m.decode_parse(payload)
            if name:
                raise ClientError(sqlstate.FEATURE_NOT_SUPPORTED, "the admin console has no named statements")
            self._statement = query
            out.append(m.PARSE_COMPLETE)
        elif t == codes.BIND:
            return self._bind(m.decode_bind(payload), out)
        elif t == codes.DESCRIBE:
            kind, name = m.decode_describe_close(payload)
            if kind == "S":
                command = self._command(name)
                out.append(m.message(b"t", _I16.pack(0)))  # ParameterDescription: no parameters
                if not command:
                    out.append(m.NO_DATA)
                    return None
                # the formats are not known before Bind: PostgreSQL describes a statement as text
                out.append(row_description(self.run(command, describe=True).columns))
            else:
                portal = self._named_portal(name)
                out.append(row_description(portal.result.columns, portal.formats))
        elif t == codes.EXECUTE:
            name, max_rows = m.decode_execute(payload)
            self._execute(self._named_portal(name), max_rows, out)
        elif t == codes.CLOSE:
            kind, name = m.decode_describe_close(payload)
            # closing what does not exist is no error (PostgreSQL); named ones never exist here
            if not name and kind == "S":
                self._statement = None
            elif not name:
                self._portal = None
            out.append(m.CLOSE_COMPLETE)
        elif t == codes.FLUSH:
            pass
        else:
            raise ClientError(
                sqlstate.FEATURE_NOT_SUPPORTED, f"message type {chr(t)!r} is not supported here"
            )
        return None

    def _command(self, statement: str) -> str:
        """The command text of the statement named `statement` (only the unnamed one can exist)."""
        if statement:
            raise ClientError(
                sqlstate.INVALID_SQL_STATEMENT_NAME, f'prepared statement "{statement}" does not exist'
            )
        if self._statement is None:
            raise ClientError(
                sqlstate.INVALID_SQL_STATEMENT_NAME, "unnamed prepared statement does not exist"
            )
        return self._statement.strip().rstrip(";").strip()

    def _named_portal(self, name: str) -> _Portal:
        if name or self._portal is None:
            raise ClientError(sqlstate.INVALID_CURSOR_NAME, f'portal "{name}" does not exist')
        return self._portal

    def _bind(self, bind: m.Bind, out: list[bytes]) -> asyncio.Task[str] | None:
        command = self._command(bind.statement)
        # PostgreSQL's checks and words; a console command has no parameters
        n = len(bind.params)
        if len(bind.param_formats) > 1 and len(bind.param_formats) != n:
            raise ClientError(
                sqlstate.PROTOCOL_VIOLATION,
                f"bind message has {len(bind.param_formats)} parameter formats but {n} parameters",
            )
        if n:
            raise ClientError(
                sqlstate.PROTOCOL_VIOLATION,
                f'bind message supplies {n} parameters, but prepared statement "{bind.statement}" requires 0',
            )
        if bind.portal:
            raise ClientError(sqlstate.FEATURE_NOT_SUPPORTED, "the admin console has no named portals")
        self._portal = None  # a Bind replaces the unnamed portal
        verb = _verb(command)
        if verb in _WAITING_COMMANDS:
            self._check_write(verb)
            task = self._start_waiting(verb, command)
            self._portal = _Portal(Result((), (), verb), ())
            out.append(m.BIND_COMPLETE)
            return task
        result = self.run(command) if command else Result((), (), "")
        # formats apply to a result with columns only: PostgreSQL ignores them for other commands
        formats = result_formats(bind.result_formats, len(result.columns)) if result.columns else ()
        self._portal = _Portal(result, formats)
        out.append(m.BIND_COMPLETE)
        return None

    def _execute(self, portal: _Portal, max_rows: int, out: list[bytes]) -> None:
        """Send the portal's next rows: all that are left, or at most `max_rows` (> 0) followed by
        PortalSuspended when that many were sent, as PostgreSQL does (the next Execute goes on from there;
        one that finds no rows left completes the portal)."""
        result = portal.result
        if not result.tag:
            out.append(m.EMPTY_QUERY_RESPONSE)
            return
        start = portal.sent
        rows = result.rows[start:] if max_rows <= 0 else result.rows[start : start + max_rows]
        portal.sent += len(rows)
        out += [data_row(row, result.columns, portal.formats) for row in rows]
        if 0 < max_rows == len(rows):
            out.append(m.PORTAL_SUSPENDED)
        else:
            out.append(command_complete(result.tag))

    # --- commands ---

    def _check_rights(self) -> None:
        """The user lists are read again for every command: a reload may have changed them."""
        user = self.client.info.user if self.client.info else ""
        admin = self.app.config.admin
        if user in admin.users:
            self.readonly = False
        elif user in admin.stats_users:
            self.readonly = True
        else:
            raise ClientError(
                sqlstate.INSUFFICIENT_PRIVILEGE,
                f'user "{user}" may no longer use the admin console',
                hint="A reload took the user out of admin.users and admin.stats_users.",
            )

    def _check_write(self, verb: str) -> None:
        self._check_rights()
        if self.readonly:
            user = self.client.info.user if self.client.info else ""
            raise ClientError(
                sqlstate.INSUFFICIENT_PRIVILEGE,
                f'{verb}: the admin console is read-only for user "{user}"',
                hint="Users in admin.stats_users may run SHOW only; admin.users may run every command.",
            )

    def _pause(self, command: str) -> str | None:
        database = _argument(command, "PAUSE")
        self.app.control.pause(database)
        self.app.stats.decide("admin", self.client.info, f"PAUSE {database or ''}".strip())
        return database

    def run(self, command: str, *, describe: bool = False) -> Result:
        """Run one console command (without PAUSE's wait) and return its result set."""
        words = command.split()
        verb = words[0].upper() if words else ""
        if verb == "SHOW":
            self._check_rights()
            if len(words) != 2:
                raise _syntax(command)
            what = words[1].upper()
            show = _SHOW.get(what)
            if show is None:
                raise ClientError(
                    sqlstate.SYNTAX_ERROR,
                    f"unknown SHOW command: {words[1]}",
                    hint="SHOW HELP lists the commands.",
                )
            return show(self.app)
        if verb not in _WRITE_COMMANDS:
            raise _syntax(command)
        self._check_write(verb)
        if describe:
            return Result((), (), verb)
        control = self.app.control
        if verb == "RESUME":
            control.resume(_argument(command, verb))
        elif verb == "RECONNECT":
            control.reconnect(_argument(command, verb))
        elif verb == "KILL":
            database = _argument(command, verb)
            if database is None:
                raise ClientError(sqlstate.SYNTAX_ERROR, "KILL needs a database name")
            control.kill(database)
        elif verb in ("DISABLE", "ENABLE"):
            database = _argument(command, verb)
            if database is None:
                raise ClientError(sqlstate.SYNTAX_ERROR, f"{verb} needs a database name")
            if verb == "DISABLE":
                control.disable(database)
            else:
                control.enable(database)
        elif verb == "RELOAD":
            if len(words) != 1:
                raise _syntax(command)
            if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, signal.SIG_IGN, None):
                raise ClientError(
                    sqlstate.FEATURE_NOT_SUPPORTED, "this halephant cannot reload its configuration"
                )
            # Done here rather than by a SIGHUP to itself, so the answer can say how it went: a file
            # with mistakes is ERROR F0000 with each of them, as PgBouncer answers, not a RELOAD that
            # leaves the previous configuration in force unbeknown to the operator.
            log.info("%r: RELOAD: reloading %s", self.client, self.app.config.source)
            result = self.app.reload()
            if not result.ok:
                raise ClientError(
                    sqlstate.CONFIG_FILE_ERROR,
                    f"reload failed: {len(result.errors)} error(s); still running with the previous "
                    "configuration:\n" + "\n".join(result.errors),
                )
        elif verb == "SHUTDOWN":
            if len(words) != 1:
                raise _syntax(command)
            os.kill(os.getpid(), signal.SIGTERM)
        self.app.stats.decide("admin", self.client.info, command)
        return Result((), (), verb)


def _verb(command: str) -> str:
    return command.split(None, 1)[0].upper() if command.strip() else ""


def _argument(command: str, verb: str) -> str | None:
    words = command.split()
    if len(words) > 2:
        raise _syntax(command)
    if len(words) == 1:
        return None
    name = words[1]
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1]
    return name


def _syntax(command: str) -> ClientError:
    return ClientError(
        sqlstate.SYNTAX_ERROR,
        f"invalid admin console command: {command[:200]}",
        hint="Commands: SHOW POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|LISTS|DATABASES|USERS|CONFIG|VERSION|"
        "NODES, PAUSE [db], RESUME [db], RECONNECT [db], WAIT_CLOSE [db], KILL db, DISABLE db, ENABLE db, "
        "RELOAD, SHUTDOWN.",
    )


# --- SHOW ----------------------------------------------------------------------------------------------


def _split_address(address: str) -> tuple[str, int | None]:
    host, _, port = address.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else (address, None)


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


# Each SHOW declares its columns with PgBouncer's names and types (PgBouncer 1.18's: int4 for counts,
# ports and flags, int8 for the statistics, text for times and addresses) where PgBouncer has them, so that
# its tooling reads them alike, even from a result without rows; halephant's own columns come after.

POOLS_COLUMNS = columns(
    "database:text user:text cl_active:int4 cl_waiting:int4 sv_active:int4 sv_idle:int4 sv_used:int4 "
    "sv_tested:int4 sv_login:int4 maxwait:int4 maxwait_us:int4 pool_mode:text node:text"
)


def show_pools(app: App) -> Result:
    from halephant.admin import snapshot

    rows = []
    for p in snapshot.pools(app):
        wait = p["maxwait"]
        rows.append(
            [
                p["database"], p["user"], p["cl_active"], p["cl_waiting"], p["sv_active"], p["sv_idle"],
                p["sv_used"], 0, p["sv_login"], int(wait), int((wait - int(wait)) * 1e6), p["pool_mode"],
                p["node"],
            ]
        )  # fmt: skip
    return Result(POOLS_COLUMNS, rows, "SHOW")


CLIENTS_COLUMNS = columns(
    "type:text user:text database:text state:text addr:text port:int4 connect_time:text request_time:text "
    "wait:int4 wait_us:int4 link:text remote_pid:int4 tls:text application_name:text pinned:bool"
)


def show_clients(app: App) -> Result:
    from halephant.admin import snapshot

    rows = []
    for c in snapshot.clients(app):
        host, port = _split_address(c["address"])
        waiting = c["state"] == "waiting"
        rows.append(
            [
                "C", c["user"], c["database"], c["state"], host, port, _timestamp(c["connected_at"]),
                _timestamp(c["since"]), int(c["for"]) if waiting else 0,
                int((c["for"] % 1) * 1e6) if waiting else 0, c["server_pid"], c["id"],
                _tls(c), c["application_name"], c["pinned"],
            ]
        )  # fmt: skip
    return Result(CLIENTS_COLUMNS, rows, "SHOW")


def _tls(connection: dict[str, Any]) -> str:
    # PgBouncer's form: version/cipher, empty for a plaintext connection (a client's or a server's)
    version, cipher = connection.get("tls"), connection.get("tls_cipher")
    if not version:
        return ""
    return f"{version}/{cipher}" if cipher else str(version)


SERVERS_COLUMNS = columns(
    "type:text user:text database:text state:text addr:text port:int4 connect_time:text request_time:text "
    "link:text remote_pid:int4 transactions:int8 queries:int8 tls:text"
)


def show_servers(app: App) -> Result:
    from halephant.admin import snapshot

    now = time.time()
    rows = []
    for s in snapshot.servers(app):
        host, port = _split_address(s["node"])
        age = s.get("age")
        rows.append(
            [
                "S", s["user"], s["database"], s["state"], host, port,
                _timestamp(now - age) if age is not None else None,
                _timestamp(now - s.get("idle_for", 0.0)) if age is not None else None,
                s.get("client"), s["pid"], s.get("transactions"), s.get("queries"), _tls(s),
            ]
        )  # fmt: skip
    return Result(SERVERS_COLUMNS, rows, "SHOW")


STATS_COLUMNS = columns(
    "database:text total_xact_count:int8 total_query_count:int8 total_wait_time:int8 total_wait_count:int8 "
    "max_wait_time:int8 total_checkout_timeouts:int8 avg_xact_count:int8 avg_query_count:int8 "
    "avg_wait_time:int8"
)


def _stats_per_database(app: App) -> list[tuple[str, dict[str, Any]]]:
    """The pools' counters summed per database (databases with a pool only, as PgBouncer's)."""
    from halephant.admin import snapshot

    per_db: dict[str, dict[str, Any]] = {}
    for p in snapshot.pools(app):
        d = per_db.setdefault(p["database"], {"x": 0, "q": 0, "a": 0, "w": 0.0, "wc": 0, "wm": 0.0, "t": 0})
        d["x"] += p["transactions"]
        d["q"] += p["queries"]
        d["a"] += p["checkouts"]
        d["w"] += p["wait_total"]
        d["wc"] += p["waits"]
        d["wm"] = max(d["wm"], p["wait_max"])
        d["t"] += p["checkout_timeouts"]
    return sorted(per_db.items())


def show_stats(app: App) -> Result:
    uptime = max(time.time() - app.stats.started_at, 1.0)
    rows = []
    for name, d in _stats_per_database(app):
        rows.append(
            [
                name, d["x"], d["q"], int(d["w"] * 1e6), d["wc"], int(d["wm"] * 1e6), d["t"],
                int(d["x"] / uptime), int(d["q"] / uptime), int(d["w"] * 1e6 / d["wc"]) if d["wc"] else 0,
            ]
        )  # fmt: skip
    return Result(STATS_COLUMNS, rows, "SHOW")


# PgBouncer's names and meanings: server_assignment_count (servers handed to clients: halephant's
# checkouts), xact_count, query_count, wait_time (µs clients waited for a server, counted when they get
# one); halephant does not count bytes or time spent in transactions and queries: NULL, never a made-up 0.
STATS_TOTALS_COLUMNS = columns(
    "database:text server_assignment_count:int8 xact_count:int8 query_count:int8 bytes_received:int8 "
    "bytes_sent:int8 xact_time:int8 query_time:int8 wait_time:int8"
)


def show_stats_totals(app: App) -> Result:
    rows = [
        [name, d["a"], d["x"], d["q"], None, None, None, None, int(d["w"] * 1e6)]
        for name, d in _stats_per_database(app)
    ]
    return Result(STATS_TOTALS_COLUMNS, rows, "SHOW")


LISTS_COLUMNS = columns("list:text items:int4")


def show_lists(app: App) -> Result:
    """PgBouncer's counts of its internal lists, one per row. halephant keeps no freed connection objects
    for reuse and no DNS cache of its own, so those counts are 0."""
    from halephant.admin import snapshot

    clients = list(app.clients.values())
    servers = sum(len(p.active) + len(p.idle) + p.connecting for p in list(app.manager.pools.values()))
    rows = [
        ["databases", len(app.config.databases)],
        ["users", len(app.config.users)],
        ["pools", len(app.manager.pools)],
        ["free_clients", 0],
        ["used_clients", len(clients) + len(app.control.consoles)],  # console sessions are clients too
        ["login_clients", sum(1 for c in clients if snapshot.client_state(c) == "login")],
        ["free_servers", 0],
        ["used_servers", servers],  # logging in, lent or idle, as SHOW SERVERS lists them
        ["dns_names", 0],
        ["dns_zones", 0],
        ["dns_queries", 0],
        ["dns_pending", 0],
    ]
    return Result(LISTS_COLUMNS, rows, "SHOW")


# max_connections is PgBouncer's name for max_db_connections (0: none), which halephant applies per node;
# current_connections are the database's server connections on all its nodes.
DATABASES_COLUMNS = columns(
    "name:text host:text port:int4 database:text cluster:text pool_size:int4 min_pool_size:int4 "
    "reserve_pool:int4 pool_mode:text max_connections:int4 current_connections:int4 paused:int4 "
    "disabled:int4"
)


def show_databases(app: App) -> Result:
    current: dict[str, int] = {}
    for key, pool in app.manager.shown_pools().items():
        current[key[0]] = current.get(key[0], 0) + pool.total
    rows = []
    for name, db in sorted(app.config.databases.items()):
        cluster = app.config.clusters.get(db.cluster)
        # the probed primary (the first configured node while none is known)
        view = app.manager.cluster_view(db.cluster) if cluster is not None else None
        primary = (view.primary or cluster.nodes[0]) if view is not None and cluster is not None else None
        rows.append(
            [
                name, primary.host if primary else None, primary.port if primary else None,
                db.server_database, db.cluster, db.pool_size, db.min_pool_size, db.reserve_pool_size, db.mode,
                db.max_db_connections or 0, current.get(name, 0), 1 if app.control.is_paused(name) else 0,
                1 if app.control.is_disabled(name) else 0,
            ]
        )  # fmt: skip
    return Result(DATABASES_COLUMNS, rows, "SHOW")


# PgBouncer 1.24's SHOW USERS (with max_user_client_connections; 1.18 had name and pool_mode only): one
# row per configured user, aliases included. pool_size, reserve_pool_size and pool_mode are a user's
# overrides, text as PgBouncer types them: halephant sets those per database only, so NULL (PgBouncer's
# documented "not set"). max_user_connections and current_connections are the role the user logs in
# upstream as (for an alias, its server_user's, whose cap counts the alias's servers too), on every node;
# max_user_client_connections is users.<name>.max_client_conn. 0: no cap, as PgBouncer shows its default.
USERS_COLUMNS = columns(
    "name:text pool_size:text reserve_pool_size:text pool_mode:text max_user_connections:int4 "
    "current_connections:int4 max_user_client_connections:int4 current_client_connections:int4"
)


def show_users(app: App) -> Result:
    from halephant.admin import snapshot

    rows = [
        [
            u["name"], None, None, None, u["max_user_connections"] or 0, u["user_connections"],
            u["max_client_conn"] or 0, u["client_connections"],
        ]
        for u in snapshot.users(app)
    ]  # fmt: skip
    return Result(USERS_COLUMNS, rows, "SHOW")


def _flatten(value: Any, prefix: str, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list):
        out.append((prefix, ", ".join(str(v) for v in value)))
    else:
        out.append((prefix, "" if value is None else str(value)))


CONFIG_COLUMNS = columns("key:text value:text changeable:text")


def show_config(app: App) -> Result:
    from halephant.admin import snapshot

    pairs: list[tuple[str, str]] = []
    _flatten(snapshot.config(app), "", pairs)

    def changeable(key: str) -> str:  # by a reload (RELOAD, SIGHUP); the others need a restart
        return "no" if any(key == p or key.startswith(p + ".") for p in RESTART_PATHS) else "yes"

    return Result(CONFIG_COLUMNS, [[k, v, changeable(k)] for k, v in pairs], "SHOW")


def show_version(app: App) -> Result:
    return Result(columns("version:text"), [[f"halephant {__version__}"]], "SHOW")


NODES_COLUMNS = columns(
    "cluster:text node:text role:text usable:bool lag_bytes:int8 lag_seconds:float8 last_probe:float8 "
    "reason:text"
)


def show_nodes(app: App) -> Result:
    from halephant.admin import snapshot

    rows = [
        [n["cluster"], n["name"], n["role"], n["usable"], n.get("lag_bytes"), n.get("lag_seconds"),
         n.get("last_probe"), n.get("reason", "")]
        for n in snapshot.nodes(app)
    ]  # fmt: skip
    return Result(NODES_COLUMNS, rows, "SHOW")


def show_help(app: App) -> Result:
    rows = [
        ["SHOW POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|LISTS|DATABASES|USERS|CONFIG|VERSION|NODES", "read"],
        ["PAUSE [db]", "hold new transactions once running ones finish"],
        ["RESUME [db]", "release held transactions"],
        ["RECONNECT [db]", "replace server connections as they become idle"],
        ["WAIT_CLOSE [db]", "answer once the servers RECONNECT or a reload marked to close are closed"],
        ["KILL db", "drop every client and server connection of db (stays paused until RESUME)"],
        ["DISABLE db", "refuse new clients of db (55000); connected ones go on, a reload keeps it"],
        ["ENABLE db", "let new clients of db in again"],
        ["RELOAD", "reload the configuration file"],
        ["SHUTDOWN", "stop halephant as on SIGTERM"],
    ]
    return Result((Column("command", TEXT), Column("what it does", TEXT)), rows, "SHOW")


_SHOW = {
    "HELP": show_help,
    "POOLS": show_pools,
    "CLIENTS": show_clients,
    "SERVERS": show_servers,
    "STATS": show_stats,
    "STATS_TOTALS": show_stats_totals,
    "LISTS": show_lists,
    "DATABASES": show_databases,
    "CONFIG": show_config,
    "VERSION": show_version,
    "NODES": show_nodes,
    "USERS": show_users,
}
