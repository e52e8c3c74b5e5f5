"""The SQL admin console: clients that connect to the virtual database `halephant` (or `pgbouncer`, so
PgBouncer tooling works unchanged) talk to halephant itself, as with PgBouncer's admin console.

Authentication is the normal one (`users:` entries, `halephant_authenticate`); afterwards the user must be
listed in `admin.users` (every command) or `admin.stats_users` (SHOW only), else 42501. The session is
then handed to `ConsoleSession`, which answers SHOW POOLS | CLIENTS | SERVERS | STATS | DATABASES |
CONFIG | VERSION | NODES with PgBouncer-like result sets and runs PAUSE, RESUME, RECONNECT, KILL, RELOAD
and SHUTDOWN. The simple query protocol is the console's language, as for PgBouncer; a minimal extended
protocol (unnamed statements, text results) is answered too so that drivers that always use it work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from halephant import __version__, sqlstate
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
_I32 = struct.Struct("!i")
_OID_BOOL, _OID_INT8, _OID_FLOAT8, _OID_TEXT = 16, 20, 701, 25
_WRITE_COMMANDS = frozenset({"PAUSE", "RESUME", "RECONNECT", "KILL", "RELOAD", "SHUTDOWN"})
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

Result = tuple[list[str], list[list[Any]], str]


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
    client.transport.write(b"".join(out))
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


def _row_description(columns: list[str], types: list[int]) -> bytes:
    parts = [_I16.pack(len(columns))]
    for name, oid in zip(columns, types, strict=True):
        parts.append(name.encode() + b"\0" + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0))
    return m.message(b"T", b"".join(parts))


def _text(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    return str(value).encode()


def _data_row(row: Sequence[Any]) -> bytes:
    parts = [_I16.pack(len(row))]
    for value in row:
        raw = _text(value)
        parts.append(_I32.pack(-1) if raw is None else _I32.pack(len(raw)) + raw)
    return m.message(b"D", b"".join(parts))


def _types(columns: list[str], rows: Sequence[Sequence[Any]]) -> list[int]:
    types = []
    for i in range(len(columns)):
        oid = _OID_TEXT
        for row in rows:
            value = row[i]
            if value is None:
                continue
            if isinstance(value, bool):
                oid = _OID_BOOL
            elif isinstance(value, int):
                oid = _OID_INT8
            elif isinstance(value, float):
                oid = _OID_FLOAT8
            break
        types.append(oid)
    return types


def encode_result(result: Result, *, describe: bool = True) -> bytes:
    columns, rows, tag = result
    out = []
    if columns and describe:
        out.append(_row_description(columns, _types(columns, rows)))
    out += [_data_row(row) for row in rows]
    out.append(m.message(b"C", tag.encode() + b"\0"))
    return b"".join(out)


class ConsoleSession(asyncio.Protocol):
    """One console connection after login."""

    def __init__(self, app: App, client: ClientConnection, readonly: bool) -> None:
        self.app = app
        self.client = client
        self.readonly = readonly
        self.transport = client.transport
        self._buf = b""
        self._busy = False  # a command that waits (PAUSE) is running: input waits behind it
        self._closed = False
        self._skip_to_sync = False
        self._statement = ""  # the unnamed statement of the extended protocol
        self._portal: Result | None = None

    def take_buffered(self) -> None:
        data, self.client._buf = self.client._buf, b""
        if data and not self._closed:
            self.data_received(data)

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
            self.transport.write(m.error_response(error.code, error.message, hint=error.hint, fatal=True))
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
        return m.error_response(exc.code, exc.message, hint=exc.hint)

    def _simple_query(self, text: str, out: list[bytes]) -> asyncio.Task[str] | None:
        commands = [c.strip() for c in text.split(";")]
        commands = [c for c in commands if c]
        if not commands:
            out.append(m.message(b"I"))  # EmptyQueryResponse
            return None
        for n, command in enumerate(commands):
            try:
                if _verb(command) == "PAUSE":
                    self._check_write("PAUSE")
                    if n != len(commands) - 1:
                        raise ClientError(sqlstate.FEATURE_NOT_SUPPORTED, "PAUSE must be the last command")
                    database = self._pause(command)
                    if self.app.control.active_servers(database):
                        return asyncio.ensure_future(self._pause_done(database))
                    out.append(m.message(b"C", b"PAUSE\0"))
                    continue
                out.append(encode_result(self.run(command)))
            except ClientError as exc:
                out.append(self._error(exc))
                return None
        return None

    def _wait_for(self, task: asyncio.Task[str], *, simple: bool) -> None:
        """Hold this session's input until `task` (PAUSE waiting for transactions) is done; a simple
        Query is then answered, an extended-protocol batch goes on from its next message."""
        self._busy = True

        def done(t: asyncio.Task[str]) -> None:
            self._busy = False
            if self._closed:
                return
            if t.cancelled() or t.exception() is not None:
                error = ClientError(sqlstate.INTERNAL_ERROR, f"PAUSE failed: {t.exception()!r}")
                self.transport.write(self._error(error))
                self._skip_to_sync = not simple
            elif simple:
                self.transport.write(m.message(b"C", t.result().encode() + b"\0"))
            if simple:
                self.transport.write(m.READY_FOR_QUERY_IDLE)
            if self._buf:
                self.data_received(b"")

        task.add_done_callback(done)

    async def _pause_done(self, database: str | None) -> str:
        await self.app.control.wait_paused(database)
        return "PAUSE"

    def _extended(self, t: int, payload: bytes, out: list[bytes]) -> asyncio.Task[str] | None:
        """Answer one extended-protocol message; a PAUSE that has to wait returns its task."""
        if t == codes.PARSE:
            name, query, _ = m.decode_parse(payload)
            if name:
                raise ClientError(sqlstate.FEATURE_NOT_SUPPORTED, "the admin console has no named statements")
            self._statement = query
            out.append(m.message(b"1"))
        elif t == codes.BIND:
            portal_end = payload.index(b"\0")
            statement_end = payload.index(b"\0", portal_end + 1)
            if payload[:portal_end] or payload[portal_end + 1 : statement_end]:
                raise ClientError(sqlstate.FEATURE_NOT_SUPPORTED, "the admin console has no named portals")
            command = self._statement.strip().rstrip(";").strip()
            if _verb(command) == "PAUSE":
                self._check_write("PAUSE")
                database = self._pause(command)
                self._portal = ([], [], "PAUSE")
                out.append(m.message(b"2"))
                if self.app.control.active_servers(database):
                    return asyncio.ensure_future(self._pause_done(database))
                return None
            self._portal = self.run(command) if command else ([], [], "")
            out.append(m.message(b"2"))
        elif t == codes.DESCRIBE:
            if payload[:1] == b"S":
                out.append(m.message(b"t", _I16.pack(0)))  # no parameters
                if not self._statement.strip():
                    out.append(m.message(b"n"))
                    return None
                columns, rows, _tag = self.run(self._statement.strip().rstrip(";").strip(), describe=True)
                out.append(_row_description(columns, _types(columns, rows)) if columns else m.message(b"n"))
                return None
            if self._portal is None:
                raise ClientError(sqlstate.INVALID_CURSOR_STATE, "portal does not exist")
            columns, rows, _tag = self._portal
            out.append(_row_description(columns, _types(columns, rows)) if columns else m.message(b"n"))
        elif t == codes.EXECUTE:
            if self._portal is None:
                raise ClientError(sqlstate.INVALID_CURSOR_STATE, "portal does not exist")
            if not self._portal[2]:
                out.append(m.message(b"I"))
            else:
                out.append(encode_result(self._portal, describe=False))
        elif t == codes.CLOSE:
            out.append(m.message(b"3"))
        elif t == codes.FLUSH:
            pass
        else:
            raise ClientError(
                sqlstate.FEATURE_NOT_SUPPORTED, f"message type {chr(t)!r} is not supported here"
            )
        return None

    # --- commands ---

    def _check_write(self, verb: str) -> None:
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
            return [], [], verb
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
        elif verb == "RELOAD":
            if len(words) != 1:
                raise _syntax(command)
            if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, signal.SIG_IGN, None):
                raise ClientError(
                    sqlstate.FEATURE_NOT_SUPPORTED, "this halephant cannot reload its configuration"
                )
            os.kill(os.getpid(), signal.SIGHUP)
        elif verb == "SHUTDOWN":
            if len(words) != 1:
                raise _syntax(command)
            os.kill(os.getpid(), signal.SIGTERM)
        self.app.stats.decide("admin", self.client.info, command)
        return [], [], verb


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
        hint="Commands: SHOW POOLS|CLIENTS|SERVERS|STATS|DATABASES|CONFIG|VERSION|NODES, PAUSE [db], "
        "RESUME [db], RECONNECT [db], KILL db, RELOAD, SHUTDOWN.",
    )


# --- SHOW ----------------------------------------------------------------------------------------------


def _split_address(address: str) -> tuple[str, int | None]:
    host, _, port = address.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else (address, None)


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def show_pools(app: App) -> Result:
    from halephant.admin import snapshot

    columns = [
        "database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested",
        "sv_login", "maxwait", "maxwait_us", "pool_mode", "node",
    ]  # fmt: skip
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
    return columns, rows, "SHOW"


def show_clients(app: App) -> Result:
    from halephant.admin import snapshot

    columns = [
        "type", "user", "database", "state", "addr", "port", "connect_time", "request_time", "wait",
        "wait_us", "link", "remote_pid", "application_name", "pinned",
    ]  # fmt: skip
    rows = []
    for c in snapshot.clients(app):
        host, port = _split_address(c["address"])
        waiting = c["state"] == "waiting"
        rows.append(
            [
                "C", c["user"], c["database"], c["state"], host, port, _timestamp(c["connected_at"]),
                _timestamp(c["since"]), int(c["for"]) if waiting else 0,
                int((c["for"] % 1) * 1e6) if waiting else 0, c["server_pid"], c["id"],
                c["application_name"], c["pinned"],
            ]
        )  # fmt: skip
    return columns, rows, "SHOW"


def show_servers(app: App) -> Result:
    from halephant.admin import snapshot

    columns = [
        "type", "user", "database", "state", "addr", "port", "connect_time", "request_time", "link",
        "remote_pid", "transactions", "queries",
    ]  # fmt: skip
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
                s.get("client"), s["pid"], s.get("transactions"), s.get("queries"),
            ]
        )  # fmt: skip
    return columns, rows, "SHOW"


def show_stats(app: App) -> Result:
    from halephant.admin import snapshot

    columns = [
        "database", "total_xact_count", "total_query_count", "total_wait_time", "total_wait_count",
        "max_wait_time", "total_checkout_timeouts", "avg_xact_count", "avg_query_count", "avg_wait_time",
    ]  # fmt: skip
    uptime = max(time.time() - app.stats.started_at, 1.0)
    per_db: dict[str, dict[str, Any]] = {}
    for p in snapshot.pools(app):
        d = per_db.setdefault(p["database"], {"x": 0, "q": 0, "w": 0.0, "wc": 0, "wm": 0.0, "t": 0})
        d["x"] += p["transactions"]
        d["q"] += p["queries"]
        d["w"] += p["wait_total"]
        d["wc"] += p["waits"]
        d["wm"] = max(d["wm"], p["wait_max"])
        d["t"] += p["checkout_timeouts"]
    rows = []
    for name, d in sorted(per_db.items()):
        rows.append(
            [
                name, d["x"], d["q"], int(d["w"] * 1e6), d["wc"], int(d["wm"] * 1e6), d["t"],
                int(d["x"] / uptime), int(d["q"] / uptime), int(d["w"] * 1e6 / d["wc"]) if d["wc"] else 0,
            ]
        )  # fmt: skip
    return columns, rows, "SHOW"


def show_databases(app: App) -> Result:
    columns = [
        "name", "host", "port", "database", "cluster", "pool_size", "min_pool_size", "reserve_pool",
        "pool_mode", "current_connections", "paused", "disabled",
    ]  # fmt: skip
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
                db.server_database, db.cluster, db.pool_size, db.min_pool_size, 0, db.mode,
                current.get(name, 0), app.control.is_paused(name), False,
            ]
        )  # fmt: skip
    return columns, rows, "SHOW"


def _flatten(value: Any, prefix: str, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list):
        out.append((prefix, ", ".join(str(v) for v in value)))
    else:
        out.append((prefix, "" if value is None else str(value)))


def show_config(app: App) -> Result:
    from halephant.admin import snapshot

    pairs: list[tuple[str, str]] = []
    _flatten(snapshot.config(app), "", pairs)

    def changeable(key: str) -> str:  # by a reload (RELOAD, SIGHUP); the others need a restart
        return "no" if any(key == p or key.startswith(p + ".") for p in RESTART_PATHS) else "yes"

    return ["key", "value", "changeable"], [[k, v, changeable(k)] for k, v in pairs], "SHOW"


def show_version(app: App) -> Result:
    return ["version"], [[f"halephant {__version__}"]], "SHOW"


def show_nodes(app: App) -> Result:
    from halephant.admin import snapshot

    columns = ["cluster", "node", "role", "usable", "lag_bytes", "lag_seconds", "last_probe", "reason"]
    rows = [
        [n["cluster"], n["name"], n["role"], n["usable"], n.get("lag_bytes"), n.get("lag_seconds"),
         n.get("last_probe"), n.get("reason", "")]
        for n in snapshot.nodes(app)
    ]  # fmt: skip
    return columns, rows, "SHOW"


def show_help(app: App) -> Result:
    rows = [
        ["SHOW POOLS|CLIENTS|SERVERS|STATS|DATABASES|CONFIG|VERSION|NODES", "read"],
        ["PAUSE [db]", "hold new transactions once running ones finish"],
        ["RESUME [db]", "release held transactions"],
        ["RECONNECT [db]", "replace server connections as they become idle"],
        ["KILL db", "drop every client and server connection of db (stays paused until RESUME)"],
        ["RELOAD", "reload the configuration file"],
        ["SHUTDOWN", "stop halephant as on SIGTERM"],
    ]
    return ["command", "what it does"], rows, "SHOW"


_SHOW = {
    "HELP": show_help,
    "POOLS": show_pools,
    "CLIENTS": show_clients,
    "SERVERS": show_servers,
    "STATS": show_stats,
    "DATABASES": show_databases,
    "CONFIG": show_config,
    "VERSION": show_version,
    "NODES": show_nodes,
}
