"""The pools of a running halephant, and the I/O their decisions call for: opening server connections
(a short task each, under `connect_timeout`), resetting session-mode servers, the maintenance loop
(idle_timeout, max_lifetime, min_pool_size, servers beyond the pool's size, resets that do not answer)
and what a reload changes about the pools (`reconfigure`). The timeouts themselves are swept in
`halephant.proxy.sweep`. Which node's pool a transaction gets, following the probed topology, is
`halephant.proxy.nodes`.

The caps across pools (`max_db_connections`, `max_user_connections`: `halephant.pool.caps`) are kept
here too: which pools each one counts, following the configuration, and what their decisions call for.
A pool held by a full cap gets a look at once (`_relieve`: connections opened for held pools while there
is room, idle servers of the cap's other pools closed for them), and again whenever one of the cap's
servers is gone or fails to open, and every 100 ms as a safety net (which also closes idle servers for a
pool whose reserve connection is due: `evict_for_reserve`); a server checked in to a pool of a
cap with held pools, or above a lowered cap, is looked at before it is handed on (`_retiring`). Nothing
of this runs for a pool without caps.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import anyio

from halephant import sqlstate
from halephant.auth.lookup import upstream_secret
from halephant.config import Config
from halephant.errors import ClientError, OutOfResources
from halephant.pool.caps import DB, USER, Cap, covers
from halephant.pool.pool import Pool
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import split_frames
from halephant.proxy import prepared
from halephant.proxy.accept import OUT_OF_RESOURCES, shortage
from halephant.proxy.nodes import Nodes
from halephant.proxy.server import ServerConnection, ServerLoginError
from halephant.proxy.stand_in import StandIn
from halephant.proxy.sweep import sweep_clients, sweep_waiters
from halephant.server_tls import ServerTls
from halephant.types import ClusterView, PoolInfo, PoolMode, PoolSize, PoolTarget, Role
from halephant.unix_socket import uses_tls

if TYPE_CHECKING:
    from halephant.proxy.app import App
    from halephant.proxy.client import ClientConnection

    ServerPool = Pool[ServerConnection, ClientConnection]

log = logging.getLogger("halephant.pool")

#: SQLSTATEs of a failed server login that mean the node itself is going away, not a refusal
_NODE_FAILURES = frozenset(
    (sqlstate.CONNECTION_FAILURE, sqlstate.CANNOT_CONNECT_NOW, sqlstate.ADMIN_SHUTDOWN)
)

#: sets of startup settings whose parameters are kept per (database, user) (`learn_welcome`): drivers send
#: the same few (application_name, client_encoding, DateStyle, ...), so more means settings that vary
_WELCOME_SETTINGS_KEPT = 256


class _Reset(StandIn):
    """Stands in for a client while a server runs its reset query (session pooling, a pinned client that
    left, or the clean-up of a transaction-mode client's emulated state)."""

    __slots__ = ("clears_settings", "client", "manager", "server", "started", "transport")

    class _Sink:
        """Reads the reset query's answer only to see whether any of it failed."""

        __slots__ = ("buf", "failed", "notifications")

        def __init__(self, notifications: Callable[[bytes], None] | None) -> None:
            self.buf = b""
            self.failed = ""
            self.notifications = notifications

        def write(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            frames, consumed = split_frames(buf, 1 << 30)
            self.buf = buf[consumed:]
            for t, start, end in frames:
                if t == codes.ERROR_RESPONSE and not self.failed:
                    self.failed = m.decode_error_fields(buf[start:end]).get("M", "error")
                elif t == codes.NOTIFICATION_RESPONSE and self.notifications is not None:
                    self.notifications(buf[start - 5 : end])

        @staticmethod
        def pause_reading() -> None:
            pass

    def __init__(
        self,
        manager: PoolManager,
        server: ServerConnection,
        clears_settings: bool = True,
        notifications: Callable[[bytes], None] | None = None,
        client: ClientConnection | None = None,
    ) -> None:
        self.manager = manager
        self.server = server
        self.client = client  # whose transaction just ended (read-your-writes), if any
        self.transport = self._Sink(notifications)
        self.clears_settings = clears_settings
        self.started = time.monotonic()  # bounded by connect_timeout (`PoolManager._close_stuck_resets`)

    def server_ready(self, n: int, status: int, at_boundary: bool) -> None:
        server = self.server
        server.client = None
        if self.transport.failed:
            log.info(
                "pool %s: closing server pid %d: reset query failed: %s",
                server.pool.name,
                server.backend_pid,
                self.transport.failed,
            )
            server.close(f"reset query failed: {self.transport.failed}")
        elif status == codes.TX_IDLE and at_boundary:
            server.dirty = ""
            if self.clears_settings:
                server.settings = {}  # the reset query (DISCARD ALL / RESET ALL) undid them
            self.manager.checkin(server, self.client)
        else:
            server.close("reset query left the server in a transaction")


class PoolManager:
    def __init__(self, app: App) -> None:
        self.app = app
        self.pools: dict[tuple[str, str, str], ServerPool] = {}
        self._infos: dict[tuple[str, str], PoolInfo] = {}
        self._welcome: dict[tuple[str, str], dict[str, str]] = {}
        #: ...and what a login with startup settings was told, by those settings (`learn_welcome`)
        self._welcome_with: dict[tuple[str, str], dict[frozenset[tuple[str, str]], dict[str, str]]] = {}
        self.nodes = Nodes(self)
        #: pools a reload took out of use: they serve what they still hold, then close (see tick)
        self.retired: list[ServerPool] = []
        #: (database, user) of catch-all pools holding nothing -> since when (`_forget_unused`)
        self._unused: dict[tuple[str, str], float] = {}
        #: pool key -> when to ask its size again (`PoolSize.recheck_after`, `_recheck_sizes`)
        self._size_due: dict[tuple[str, str, str], float] = {}
        #: servers handed to waiting clients while another hand-over is under way (`hand_over`)
        self._handing = False
        self._hand_overs: deque[tuple[ClientConnection, ServerConnection]] = deque()
        #: the caps across pools, by (setting, database or user, node) (`_caps_for`)
        self.caps: dict[tuple[str, str, str], Cap] = {}
        #: each cluster's TLS settings, as last configured (a cluster a reload removed keeps its last:
        #: its retired pools may still open a server for the clients they hold)
        self.tls: dict[str, ServerTls] = {name: app.config.server_tls(name) for name in app.config.clusters}

    # --- lookups ---

    def pool_info(self, target: PoolTarget) -> PoolInfo:
        key = (target.database, target.pool_user)
        info = self._infos.get(key)
        if info is None or info.target != target:
            # sized once per pool (halephant_pool_size is not called per client), shared by its clients
            size = info.size if info is not None else self.app.plugins.pool_size(target, self.app.config)
            info = self._infos[key] = PoolInfo(target=target, size=size)
        return info

    def welcome_params(self, target: PoolTarget | None, settings: dict[str, str]) -> dict[str, str] | None:
        """The parameters a transaction-pooling client logging in with startup `settings` is told, when
        known without a server: the primary's, and for settings, what a login with the same ones was told
        once PostgreSQL had accepted them (`learn_welcome`). None: the login takes a server for it."""
        if target is None:
            return None
        pair = (target.database, target.pool_user)
        if not settings:
            return self._welcome.get(pair)
        known = self._welcome_with.get(pair)
        return None if known is None else known.get(frozenset(settings.items()))

    def learn_welcome(
        self, target: PoolTarget, settings: dict[str, str], server: ServerConnection, app_suffix: str = ""
    ) -> None:
        """A login with startup `settings` was told `server`'s parameters, the server having taken those
        settings (PostgreSQL refuses a bad one): the next login with the same settings is told the same
        without taking a server (as PgBouncer answers logins from what it learnt). Only from a server of
        the primary: what a replica says (in_hot_standby=on) is not what `_welcome` tells. `app_suffix`:
        what `application_name_add_host` appended to the client's application_name, kept under the
        settings as the client gave them (each client's host differs)."""
        if not settings or server.pool.serves is not Role.PRIMARY:
            return
        params = dict(server.params)
        if app_suffix:
            name = settings.get("application_name", "")
            if not name.endswith(app_suffix) or not params.get("application_name", "").endswith(app_suffix):
                return  # (changed on the way: nothing to learn for others)
            settings = {**settings, "application_name": name[: -len(app_suffix)]}
            params["application_name"] = params["application_name"][: -len(app_suffix)]
        known = self._welcome_with.setdefault((target.database, target.pool_user), {})
        if len(known) >= _WELCOME_SETTINGS_KEPT:
            known.clear()
        known[frozenset(settings.items())] = params

    def cluster_view(self, name: str) -> ClusterView:
        """The cluster's nodes as last probed (immutable; a new view replaces it after a change)."""
        view = self.nodes.views.get(name)
        return view if view is not None else self.nodes.view(name)

    def pool_for(
        self, target: PoolTarget, role: Role, client: ClientConnection | None = None
    ) -> ServerPool | None:
        """The pool of the node that gets a transaction of `client` routed to `role`; None when no node
        can take it (see `halephant.proxy.nodes`)."""
        return self.nodes.pool_for(target, role, client)

    def node_pool(self, target: PoolTarget, host: str, port: int) -> ServerPool:
        """The pool of (database, user) on one node, created on first use."""
        key = (target.database, target.pool_user, f"{host}:{port}")
        pool = self.pools.get(key)
        # A reload changed what this pool logs in with (a password): new servers use the new one.
        # Clients from before and after a change of pool mode may share it: it stays in transaction
        # (or statement) mode once a client of either used it, so a server with session state left on it is
        # closed at check-in rather than handed on.
        if (
            pool is not None
            and pool.info.target is not target
            and pool.info.target != target
            and (target.mode is pool.info.mode or target.mode is not PoolMode.SESSION)
        ):
            old = pool.info.target
            pool.info = PoolInfo(target=target, size=pool.info.size)
            if (old.server_database, old.server_user, old.server_settings) != (
                target.server_database,
                target.server_user,
                target.server_settings,
            ):
                # Its servers are connected to another database, as another role, or with other
                # settings (a user made read_only): none is handed to a client again.
                self._outdate(pool, "what they log in with")
            self._set_caps(pool, self._caps_for(pool, self.app.config))
        if pool is None:
            pool = self.pools[key] = Pool[ServerConnection, "ClientConnection"](
                target, self.pool_info(target).size, host, port
            )
            size = pool.info.size
            log.info("pool %s created (size %d, min %d: %s)", pool.name, size.max, size.min, size.reason)
            self._set_caps(pool, self._caps_for(pool, self.app.config))
        return pool

    @staticmethod
    def _outdate(pool: ServerPool, changed: str) -> None:
        """A reload changed `changed` for `pool`'s servers: none is handed to a client again. Idle ones
        close now, busy ones when they come back (as for max_lifetime), one logging in meanwhile once
        logged in (`_open`)."""
        pool.outdated_before = now = time.monotonic()
        pool.retire_before = max(pool.retire_before, now)
        log.info(
            "pool %s: its %d server connection(s) are replaced: a reload changed %s",
            pool.name,
            len(pool.idle) + len(pool.active),
            changed,
        )
        for server in list(pool.idle):
            pool.discard(server)
            server.close("a reload changed the pool's settings")

    def tls_for(self, cluster: str) -> ServerTls:
        """The TLS settings connections to `cluster`'s nodes are opened with (the last configured, for a
        cluster a reload removed); KeyError for a cluster never configured (never plaintext instead)."""
        tls = self.tls.get(cluster)
        if tls is None:
            tls = self.tls[cluster] = self.app.config.server_tls(cluster)
        return tls

    # --- caps across pools ---

    def _caps_for(self, pool: ServerPool, config: Config) -> tuple[Cap, ...]:
        """The caps that count `pool`'s server connections under `config` (made on first use)."""
        target = pool.info.target
        node = pool.key[2]
        caps = []
        db = config.database_for(target.entry_name)
        if db is not None and db.max_db_connections is not None:
            # per database name: each one the catch-all entry serves has a cap of its own
            caps.append(self._cap(DB, target.database, node, db.max_db_connections))
        user = config.users.get(target.server_user)
        if user is not None and user.max_user_connections is not None:
            # per role halephant logs in as: an alias counts against the user it logs in as
            caps.append(self._cap(USER, target.server_user, node, user.max_user_connections))
        return tuple(caps)

    def _cap(self, setting: str, name: str, node: str, limit: int) -> Cap:
        cap = self.caps.get((setting, name, node))
        if cap is None:
            cap = self.caps[(setting, name, node)] = Cap(setting, name, node, limit)
            cap.wake = self._wake
        cap.limit = limit
        return cap

    def _set_caps(self, pool: ServerPool, caps: tuple[Cap, ...]) -> None:
        old = pool.caps
        if old == caps:
            return
        for cap in old:
            if cap not in caps:
                cap.pools.remove(pool)
                cap.held.pop(pool, None)
                if not cap.pools and self.caps.get((cap.setting, cap.name, cap.node)) is cap:
                    del self.caps[(cap.setting, cap.name, cap.node)]
        for cap in caps:
            if cap not in old:
                cap.pools.append(pool)
        pool.caps = caps

    def _wake(self, cap: Cap) -> None:
        """A pool got held by `cap`: a look at it right after the current callback (never from inside
        the pool's own decision)."""
        cap.waking = True
        self.app.loop.call_soon(self._relieve, cap)

    def _relieve(self, cap: Cap) -> None:
        """Open connections for the pools `cap` holds while it has room; close idle servers of its other
        pools for those it has none for; have check-ins looked at while some still wait."""
        cap.waking = False
        if self.caps.get((cap.setting, cap.name, cap.node)) is not cap:
            return  # a reload took it away (its pools were given their waiters' connections then)
        try:
            for pool in cap.serve_held():  # (forgets the held pools that want nothing now)
                self.open(pool)
            if not cap.held:
                return
            _close_taken(
                cap.evict_idle(),
                f"another pool waits for a place under {cap.describe()}",
                f"evicted: {cap.setting}",
            )
            cap.watch_check_ins()
        except Exception:  # a bug here must not stop the callback that called it: log it, go on
            log.exception("cap %s: look at its held pools failed", cap.describe())

    def evict_for_reserve(self, pool: ServerPool) -> None:
        """`pool`'s reserve connection is due but a full cap keeps it closed: idle servers of the cap's
        other pools are closed for it (as PgBouncer does); the waiter sweep opens it once they are gone,
        unless a held pool of the cap takes the place first."""
        for cap in pool.reserve_held_by():
            _close_taken(
                cap.evict_for_reserve(),
                f"pool {pool.name} needs a reserve connection under {cap.describe()}",
                f"evicted: {cap.setting}",
            )

    def _caps_changed(self, pool: ServerPool, failed: bool = False) -> None:
        """One of `pool`'s servers is gone, or `failed` to open: the held pools of its caps may proceed.
        After a failure, `pool` itself is not among them: it tries again as a pool without caps would
        (its next client, or the tick), not as fast as its node can refuse."""
        for cap in pool.caps:
            if failed:
                cap.held.pop(pool, None)
            if cap.held:
                self._relieve(cap)

    # --- I/O the pools call for ---

    def open(self, pool: ServerPool) -> None:
        self.app.spawn(self._open, pool)

    async def _open(self, pool: ServerPool) -> None:
        loop = self.app.loop
        target = pool.info.target
        # No application_name of halephant's own: a client that sends none must see PostgreSQL's
        # default (empty), as connected directly; a client's own is applied while it has the server.
        startup = {
            "user": target.server_user,
            "database": target.server_database,
            **dict(target.server_settings),
        }
        refused = pool.login_refused
        if refused is not None:
            if loop.time() < refused[1]:
                # PostgreSQL refused the last login: no other before server_login_retry (each would
                # fail as well, and log a failed login there, for every transaction)
                self.nodes.connect_failed(pool, cast(ClientError, refused[0]), False)
                if pool.caps:
                    self._caps_changed(pool, failed=True)
                return
            pool.login_refused = None
        server = ServerConnection(self, pool, startup, upstream_secret(target), loop)
        tls: ServerTls | None = None
        in_plaintext_after_tls = False
        try:
            tls = self.tls_for(target.cluster)
            with anyio.fail_after(self.app.config.limits.connect_timeout):
                opened = await server.open(tls)
                in_plaintext_after_tls = opened is not server  # `prefer` tried it again (`open`)
                server = opened
                if server.closing:  # closed between its ReadyForQuery and now: nobody can use it
                    raise ServerLoginError(
                        sqlstate.CONNECTION_FAILURE, "server closed the connection after login", fatal=True
                    )
        except Exception as exc:
            server.abort()
            pool.failed_open_at = loop.time()
            if isinstance(exc, ClientError) and exc.code.startswith("28"):
                # the client's own login succeeded: say whose login this was (a TLS connection the
                # cluster's tls: settings refused is such a refusal too: `TlsRefused`)
                error = ClientError(
                    exc.code,
                    f"halephant's login to the server failed: {exc.message}",
                    hint=exc.hint or _login_hint(exc, target, server, tls),
                    detail=exc.detail,
                    fatal=True,
                )
            elif isinstance(exc, ClientError):
                error = ClientError(exc.code, exc.message, hint=exc.hint, detail=exc.detail, fatal=True)
            elif isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
                # halephant has no descriptor for the socket: the node is well (its probes answer), and
                # every attempt fails alike until a descriptor is freed
                error = OutOfResources(
                    f"halephant could not open a connection to server {pool.host}:{pool.port}: "
                    f"{exc.strerror}",
                    hint=shortage(exc, "max_client_conn or the pool sizes"),
                )
            elif isinstance(exc, TimeoutError):
                error = ClientError(
                    sqlstate.CONNECTION_FAILURE,
                    f"could not connect to server {pool.host}:{pool.port}: timeout",
                    fatal=True,
                )
            else:
                error = ClientError(
                    sqlstate.CONNECTION_FAILURE,
                    f"could not connect to server {pool.host}:{pool.port}: {exc}",
                    fatal=True,
                )
            # a login the server refused is not the node failing; no answer (or a shutdown) is
            node_failed = not isinstance(error, OutOfResources) and (
                not isinstance(exc, ClientError) or exc.code in _NODE_FAILURES
            )
            retry = self.app.config.limits.server_login_retry
            if node_failed:
                log.warning("pool %s: server connect failed: %s %s", pool.name, error.code, error.message)
            else:
                # no other login for server_login_retry; out of descriptors is handled alike (one attempt
                # a second, or one per waiting client, would log as often), and a client that needs a
                # server meanwhile is told at once, not parked for probes that find the node well
                if retry > 0:
                    pool.login_refused = (error, loop.time() + retry)
                if isinstance(error, OutOfResources):
                    log.warning(
                        "pool %s: cannot open a server connection: %s: %s%s",
                        pool.name,
                        cast(OSError, exc).strerror,
                        error.hint,
                        f" (no other attempt for {retry:g}s: server_login_retry)" if retry > 0 else "",
                    )
                else:
                    log.warning(
                        "pool %s: server login refused: %s %s%s",
                        pool.name,
                        error.code,
                        error.message,
                        f" (no other login for {retry:g}s: server_login_retry)" if retry > 0 else "",
                    )
            self.nodes.connect_failed(pool, error, node_failed)
            if pool.caps:
                self._caps_changed(pool, failed=True)
            return
        if server.created_at < pool.outdated_before:
            # A reload changed what the pool logs in with (or RECONNECT ran) while this one logged in
            # with the old: never handed to a client. Another one is opened in its place.
            log.info(
                "pool %s: server pid %d logged in as before a reload or RECONNECT: closed, another opened",
                pool.name,
                server.backend_pid,
            )
            server.close("opened before a reload or RECONNECT")
            self.app.spawn(self._open, pool)
            return
        if pool.serves is Role.PRIMARY and server.params.get("in_hot_standby") == "on":
            # The node was restarted as a standby (or demoted) since the probes last saw it primary:
            # every write there would fail with 25006. PostgreSQL 14+ says so at login. Its clients
            # wait for the probes, run at once, as when the node does not answer.
            where = f"{pool.host}:{pool.port}"
            log.warning(
                "pool %s: %s is in recovery (a standby), not the primary: server closed, probing again",
                pool.name,
                where,
            )
            server.close("the node is a standby")
            error = ClientError(
                sqlstate.CANNOT_CONNECT_NOW,
                f"{where} is a standby now, not the primary of cluster {target.cluster}",
                hint="The cluster is failing over or being restarted; retry later.",
                fatal=True,
            )
            self.nodes.connect_failed(pool, error, True)
            if pool.caps:
                self._caps_changed(pool, failed=True)
            return
        pair = (target.database, target.pool_user)
        if pool.serves is Role.PRIMARY or pair not in self._welcome:
            # What clients logging in without a server are told: the primary's parameters (a
            # replica's say in_hot_standby=on, and libpq's target_session_attrs=read-write would refuse
            # halephant), from its newest server (a default changed since on the server side, by
            # ALTER ROLE ... SET or postgresql.conf, reaches new clients as servers are replaced).
            if self._welcome.get(pair) != server.params:
                # a default changed on the server side: what logins with settings were told is stale too
                self._welcome_with.pop(pair, None)
            self._welcome[pair] = dict(server.params)
        log.info(
            "pool %s: server connection opened (pid %d, now %d%s%s)",
            pool.name,
            server.backend_pid,
            len(pool.idle) + len(pool.active) + 1,  # this one: counted as connecting until `connected`
            f", {pool.connecting - 1} more logging in" if pool.connecting > 1 else "",
            f", tls {server.tls}"
            if server.tls
            else ", no tls: the server refused the login over it"
            if in_plaintext_after_tls
            else ", no tls: the server does not offer it"
            if uses_tls(pool.host, tls)
            else "",
        )
        first = pool.connected(server)
        if first is not None:
            self.hand_over(first, server)
        elif pool.caps:
            self._caps_changed(pool)  # idle at once (its waiters left): a held pool may need the place

    def checkin(self, server: ServerConnection, client: ClientConnection | None = None) -> None:
        """A client is done with `server`: close it if it may carry session state, else pool it."""
        if server.closing:
            return
        if server.cancelling:
            # A cancel forwarded for its last statement is not delivered yet: PostgreSQL signals the
            # backend later, and would cancel whatever it runs by then, another client's statement or
            # the query that applies its settings. Checked in once PostgreSQL has taken it.
            server.parked = (client,)
            return
        pool = server.pool
        if server.dirty:
            if pool.info.mode is not PoolMode.SESSION:
                # session state would leak into the next client: never hand it on
                log.info(
                    "pool %s: closing server pid %d: session state left by the client (%s)",
                    pool.name,
                    server.backend_pid,
                    server.dirty,
                )
                server.close(f"session state: {server.dirty}")
                if client is not None and pool.track_lsn:
                    self.nodes.lsn_pending(server, client)  # read-your-writes: position not learnt
                self.server_gone(pool)
                return
        elif client is not None and pool.track_lsn:
            self.nodes.learn_lsn(server, client)  # read-your-writes: checks the server in afterwards
            return
        elif server.created_at < pool.retire_before and (why := self._retiring(pool, server)):
            # A busy pool hands a server from client to client without it ever being idle, where the
            # sweep would see it: max_lifetime, a reload and RECONNECT are enforced here too, as
            # PgBouncer does on release.
            log.info(
                "pool %s: closing server pid %d (%s), now %d", pool.name, server.backend_pid, why, pool.total
            )
            server.close(why)
            self.server_gone(pool)
            return
        waiter = pool.checkin(server)
        if waiter is not None:
            self.hand_over(waiter, server)

    @staticmethod
    def _retiring(pool: ServerPool, server: ServerConnection) -> str:
        """Why `server`, come back to `pool`, is closed rather than handed on ("" when it is not)."""
        if server.created_at < pool.outdated_before:
            return "opened before a reload or RECONNECT"
        if server.created_at < pool.lifetime_before:
            return "max_lifetime"
        if pool.total > pool.info.size.max:
            return "above the pool size"  # a reload shrank it: only the excess goes
        if pool.caps:
            for cap in pool.caps:
                why = cap.reclaim(pool)
                if why:
                    return why
            if any(cap.held for cap in pool.caps):
                return ""  # every server that comes back is looked at while a pool waits
        # the smaller size is reached (or this is the usual look at an old server): back to ages
        pool.retire_before = max(pool.lifetime_before, pool.outdated_before)
        return ""

    def hand_over(self, waiter: ClientConnection, server: ServerConnection) -> None:
        """Give `server` (checked out for it) to a client that waited for one.

        A client may give the server straight back as it takes it (a login that only needed the server
        to learn the parameters to report), which hands it to the next waiting client, and so on: done
        one after the other here, never nested, however many clients wait (hundreds of logins queued
        behind a busy pool would otherwise exhaust the stack)."""
        if self._handing:
            self._hand_overs.append((waiter, server))
            return
        self._handing = True
        try:
            waiter.attach_server(server)
            queued = self._hand_overs
            while queued:
                waiter, server = queued.popleft()
                waiter.attach_server(server)
        finally:
            self._handing = False

    def reset_and_checkin(
        self,
        server: ServerConnection,
        targeted: str | None = None,
        clears_settings: bool = False,
        notifications: Callable[[bytes], None] | None = None,
        client: ClientConnection | None = None,
    ) -> None:
        """Run the reset query, then pool the server (or close it if that fails).

        `targeted` replaces `server_reset_query` when the caller knows exactly what a transaction-mode
        client left (its settings are then left to the next client's settings difference). The
        NotificationResponses the server sends meanwhile go to `notifications` (else nowhere). `client`:
        the client whose transaction just ended there, checked in with it as `checkin` does (its
        read-your-writes position is learnt after the reset)."""
        if client is not None and server.pool.track_lsn:
            # its next transaction may be routed before the reset is over: not to a replica yet
            self.nodes.lsn_pending(server, client)
        if targeted:
            query = targeted
        else:
            db = self.app.config.database_for(server.pool.info.target.entry_name)
            query = db.server_reset_query if db is not None else "DISCARD ALL"
        if not query:
            self.checkin(server, client)
            return
        server.client = _Reset(  # type: ignore[assignment]
            self,
            server,
            clears_settings=clears_settings or not targeted,
            notifications=notifications,
            client=client,
        )
        prepared.forget_after_reset(server, query)
        server.send(m.query(query))

    def close_idle(self, cluster: str, server_database: str, reason: str) -> None:
        """Close the idle server connections to one upstream database of a cluster, at once (before a
        client's DROP DATABASE, which fails while any other session is connected to it)."""
        closed = 0
        for pool in self.pools.values():
            target = pool.info.target
            if target.cluster == cluster and target.server_database == server_database and pool.idle:
                for server in list(pool.idle):
                    server.close(reason)
                    closed += 1
        if closed:
            log.info("closed %d idle server connection(s) to %s: %s", closed, server_database, reason)

    def server_gone(self, pool: ServerPool) -> None:
        if pool.should_open_for_waiters():
            self.open(pool)
        if pool.caps:
            self._caps_changed(pool)

    # --- maintenance ---

    def passthrough_keys_learned(self, verifier: str) -> None:
        """A client's SCRAM login gave the first pass-through keys for `verifier`: the pools that log in
        upstream with it and were refused for want of them (`server_login_retry`) log in at once."""
        for pool in self.all_pools():
            if upstream_secret(pool.info.target) == verifier:
                pool.login_refused = None
                pool.failed_open_at = None

    def all_pools(self) -> list[ServerPool]:
        return [*self.pools.values(), *self.retired]

    def shown_pools(self) -> dict[tuple[str, str, str], ServerPool]:
        """Every pool by its key, for the admin views: retired ones too (they still serve what they
        hold; a live pool of the same key wins), and the queue of each group's clients that wait for a
        primary (node "(no primary)")."""
        out = {pool.key: pool for pool in self.retired}
        out.update(self.pools)
        for group in list(self.nodes.groups.values()):
            parked = group.waiting_for_primary
            if parked.waiters:
                out[parked.key] = parked
        return out

    async def expire_waiters(self) -> None:
        """Every 100 ms: checkout_timeout, query_wait_notify and the reserve pool for waiting clients;
        while shutting down, the client sweep as well."""
        loop = self.app.loop
        while True:
            await anyio.sleep(0.1)
            now = loop.time()
            try:
                sweep_waiters(self, now)
                self.nodes.expire(now)
                for cap in [cap for cap in self.caps.values() if cap.held]:
                    self._relieve(cap)  # a safety net: whatever frees room under a cap looks at once
                if self.app.draining:
                    sweep_clients(self.app, now)
            except Exception:  # a bug here must not stop the sweeps (or the proxy): log it, go on
                log.exception("waiter sweep failed")

    async def maintain(self) -> None:
        loop = self.app.loop
        while True:
            await anyio.sleep(1.0)
            try:
                self.tick()
                if not self.app.draining:
                    sweep_clients(self.app, loop.time())
            except Exception:  # a bug here must not stop the sweeps (or the proxy): log it, go on
                log.exception("maintenance sweep failed")

    def tick(self) -> None:
        now = time.monotonic()
        self.nodes.forget_expired(self.app.loop.time())
        for pool in self.retired:
            for server in list(pool.idle):
                pool.discard(server)
                server.close("pool retired by a configuration reload")
        kept = []
        for pool in self.retired:
            if pool.total or pool.waiters or pool.lingering:
                kept.append(pool)
            else:
                self._set_caps(pool, ())
        self.retired = kept
        self._close_stuck_resets(now)
        self._abort_lingering(now)
        loop_now = self.app.loop.time()
        for pool in list(self.pools.values()):
            refused = pool.login_refused
            if refused is not None and loop_now >= refused[1]:
                # server_login_retry has passed: a replica refusing logins is picked again
                # (`pick_replica`), and the pool's waiters get another login below
                pool.login_refused = None
            db = self.app.config.database_for(pool.info.target.entry_name)
            if db is None:
                continue
            self._close_excess(pool)
            pool.lifetime_before = now - db.max_lifetime
            if pool.retire_before != math.inf:  # (+inf: shrinking, see `_retiring`)
                pool.retire_before = max(pool.lifetime_before, pool.outdated_before)
            for server in pool.expired(now, db.idle_timeout, db.max_lifetime):
                reason = "max_lifetime" if now - server.created_at > db.max_lifetime else "idle_timeout"
                log.info(
                    "pool %s: closing server pid %d (%s), now %d",
                    pool.name,
                    server.backend_pid,
                    reason,
                    pool.total,
                )
                server.close(reason)
            if pool.serves is None or not (pool.opened_count or pool.connecting):
                continue  # a node that takes no transactions now, or a pool nobody has used yet
            failed = pool.failed_open_at
            if failed is None:
                for _ in range(pool.missing_for_min()):
                    self.app.spawn(self._open_for_min, pool)
            elif (
                not pool.connecting
                and loop_now >= failed + self.app.config.limits.server_login_retry
                and pool.missing_for_min(at_most=1)
            ):
                # The last open failed (a refused login, a node down): one login, not the whole
                # min_pool_size again each time (each a failed login there and a line in both logs);
                # the rest once one has logged in.
                self.app.spawn(self._open_for_min, pool)
            if pool.waiters and pool.login_refused is None and pool.should_open_for_waiters():
                # A login failed while the pool's other servers were busy: its clients wait for those,
                # and nothing else would try another login for them (only a client that comes next
                # does). One a second, as PgBouncer's janitor does, once server_login_retry allows.
                self.open(pool)
        self._forget_unused(now)
        self._recheck_sizes(now)

    def _close_stuck_resets(self, now: float) -> None:
        """Close the servers whose reset has not answered within connect_timeout (a frozen server, a
        network gone silent, a reset query that waits on a lock): no client owns them, so nothing else
        would, and each holds a place in its pool that waiting clients need."""
        limit = self.app.config.limits.connect_timeout
        for pool in self.all_pools():
            for server in list(pool.active):
                reset = cast(object, server.client)  # a stand-in, typed as the client it stands in for
                if isinstance(reset, _Reset) and now - reset.started > limit:
                    log.warning(
                        "pool %s: closing server pid %d: no answer to its reset within connect_timeout (%gs)",
                        pool.name,
                        server.backend_pid,
                        limit,
                    )
                    server.close("reset did not answer within connect_timeout")

    def _abort_lingering(self, now: float) -> None:
        """Servers closed under a cap whose PostgreSQL side has not closed within connect_timeout (a
        frozen node): dropped, so that they stop holding their caps' places."""
        limit = self.app.config.limits.connect_timeout
        for pool in self.all_pools():
            if pool.lingering:
                for server, since in list(pool.lingering.items()):
                    if now - since > limit:
                        log.warning(
                            "pool %s: server pid %d did not close within connect_timeout (%gs): dropped",
                            pool.name,
                            server.backend_pid,
                            limit,
                        )
                        del pool.lingering[server]
                        server.abort()

    def _forget_unused(self, now: float) -> None:
        """The catch-all entry (`databases: '*'`) makes pools for every database name a client asks for,
        and so may a plugin's `halephant_select_pool` (for databases that follow the settings of an entry
        of another name, `PoolTarget.entry`), so their number has no bound: once the pools of such a
        database and user hold no server and none of that database's clients is connected, for the
        entry's idle_timeout, they are forgotten, with what was kept for them (as PgBouncer drops
        automatic databases after autodb_idle_timeout)."""
        config = self.app.config
        by_pair: dict[tuple[str, str], list[ServerPool]] = {}
        for pool in self.pools.values():
            if pool.key[0] not in config.databases:
                by_pair.setdefault(pool.key[:2], []).append(pool)
        connected = self.app.client_counts.by_database
        for pair in [pair for pair in self._unused if pair not in by_pair]:
            del self._unused[pair]
        for pair, pools in by_pair.items():
            entry = config.database_for(pools[0].info.target.entry_name)
            if (
                entry is None
                or pair[0] in connected
                or any(pool.total or pool.waiters or pool.lingering for pool in pools)
            ):
                self._unused.pop(pair, None)
                continue
            if now - self._unused.setdefault(pair, now) < entry.idle_timeout:
                continue
            del self._unused[pair]
            for pool in pools:
                del self.pools[pool.key]
                pool.serves = None  # a reference kept anywhere looks its pool up again
                self._set_caps(pool, ())
            self._infos.pop(pair, None)
            self._welcome.pop(pair, None)
            self._welcome_with.pop(pair, None)
            self.nodes.forget_group(pair)
            log.info("pools of %s/%s forgotten: unused for %.0f s", *pair, entry.idle_timeout)

    @staticmethod
    def _close_excess(pool: ServerPool) -> None:
        """Close the idle servers above the pool's size (a reload shrank it, or reserve ones)."""
        excess = pool.excess_idle()
        for i, server in enumerate(excess):
            log.info(
                "pool %s: closing server pid %d: above the pool size (%d), now %d",
                pool.name,
                server.backend_pid,
                pool.info.size.max,
                pool.total + len(excess) - 1 - i,  # taken out of the pool already: counted down here
            )
            server.close("above the pool size")

    async def _open_for_min(self, pool: ServerPool) -> None:
        await self._open(pool)

    def close_all(self) -> None:
        for pool in self.all_pools():
            for server in list(pool.idle) + list(pool.active):
                server.close("shutdown")
            for server in list(pool.lingering):  # no place under a cap to keep now: closed at once
                if server.transport is not None:
                    server.transport.close()

    # --- pool sizes ---

    def _resize(self, pool: ServerPool, size: PoolSize) -> str:
        """Give `pool` the size `halephant_pool_size` just answered; returns the change, or ""."""
        old = pool.info.size
        if size == old:
            return ""
        pool.info = PoolInfo(target=pool.info.target, size=size)
        if (size.min, size.max, size.reserve) == (old.min, old.max, old.reserve):
            return ""  # a new reason or recheck_after only (a size by the clock, asked again): not news
        # not handed out again until the next sweep: a shrunk pool shrinks now
        self._close_excess(pool)
        if size.max < old.max and pool.active:
            # A busy pool hands a server from client to client without it coming back idle:
            # each one that comes back is counted, and closed while the pool is above its
            # new size (`_retiring`).
            pool.retire_before = math.inf
        while pool.should_open_for_waiters():
            self.open(pool)
        return (
            f"pool {pool.name} size: max {old.max} -> {size.max}, min {old.min} -> {size.min}, "
            f"reserve {old.reserve} -> {size.reserve} ({size.reason})"
        )

    def _recheck_sizes(self, now: float) -> None:
        """Ask `halephant_pool_size` again for the pools whose last answer set `recheck_after` and is
        that old (a size that follows the clock), as a reload would. A plugin that raises or answers
        nonsense leaves the pool as it was, logged, and is asked again `recheck_after` later. A pool
        not seen here before is asked at once: it may have been created with the size its database and
        user's first pool was given (`pool_info`), an answer of unknown age."""
        due = self._size_due
        for key in [key for key in due if key not in self.pools]:
            del due[key]
        for key, pool in list(self.pools.items()):
            after = pool.info.size.recheck_after
            if after is None:
                due.pop(key, None)
                continue
            if now < due.get(key, now):
                continue
            try:
                size = self.app.plugins.pool_size(pool.info.target, self.app.config)
            except Exception as exc:
                due[key] = now + after
                log.error("pool %s: asking its size again failed, it keeps its size: %s", pool.name, exc)
                continue
            change = self._resize(pool, size)
            if change:
                log.info("%s", change, extra={"event": "pool_resized", "pool": pool.name})
            info = self._infos.get(key[:2])
            if info is not None and info.target is pool.info.target:
                self._infos[key[:2]] = pool.info  # pools created from now on start at this size
            if size.recheck_after is None:
                due.pop(key, None)
            else:
                due[key] = now + size.recheck_after

    # --- reload ---

    def reconfigure(self, config: Config, unchanged: bool = False) -> list[str]:
        """Apply a new configuration to the pools; returns what changed, one line each.

        Pools are re-sized through `halephant_pool_size`; a pool whose database is gone or whose node
        left its cluster is retired: it keeps serving the transactions (and waiters) it has, and its
        servers close as they become idle. Clients link to the new pools from their next transaction.
        The server parameters new clients are told are learnt again from new servers, unless the file
        is `unchanged` (learnt only when a server opens: until then, every login takes a server).
        """
        changes: list[str] = []
        # (taken first: a pool the reload gives a new target is pointed at its new caps on the way)
        caps_before = {key: cap.limit for key, cap in self.caps.items()}
        held_before = {pool for cap in self.caps.values() for pool in cap.held}
        self._infos.clear()
        if not unchanged:
            self._welcome.clear()
            self._welcome_with.clear()
        asked: dict[tuple[str, str, str], float | None] = {}
        tls_changed = set()
        for name in config.clusters:
            tls = config.server_tls(name)
            before = self.tls.get(name)
            if before is not None and before.settings != tls.settings:
                tls_changed.add(name)
            self.tls[name] = tls  # (new contexts all the same: the files may have been replaced)
        for key, pool in list(self.pools.items()):
            pool.login_refused = None  # a password may have changed: try again at once
            _database, _user, node = key
            db = config.database_for(pool.info.target.entry_name)
            cluster = config.clusters.get(db.cluster) if db is not None else None
            nodes = {str(n) for n in cluster.nodes} if cluster is not None else set()
            if db is None or (node not in nodes and f"{pool.host}:{pool.port}" not in nodes):
                del self.pools[key]
                self.retired.append(pool)
                for server in list(pool.idle):
                    pool.discard(server)
                    server.close("pool retired by a configuration reload")
                changes.append(
                    f"pool {pool.name} retired ({'database removed' if db is None else 'node removed'})"
                )
                continue
            if db.cluster in tls_changed and pool.total:
                # as a changed node address would: servers of the old settings serve no new client
                self._outdate(pool, f"clusters.{db.cluster}.tls")
                changes.append(f"pool {pool.name}: server connections replaced (clusters.{db.cluster}.tls)")
            size = self.app.plugins.pool_size(pool.info.target, config)
            change = self._resize(pool, size)
            if change:
                changes.append(change)
            asked[key] = size.recheck_after
        # every pool was just asked: a `recheck_after` counts from now
        now = time.monotonic()
        self._size_due = {key: now + after for key, after in asked.items() if after is not None}
        self.nodes.reconfigure(config)
        changes += self._reconfigure_caps(config, caps_before, held_before)
        return changes

    def _reconfigure_caps(
        self, config: Config, before: dict[tuple[str, str, str], int], held: set[ServerPool]
    ) -> list[str]:
        """Point every pool at the caps `config` gives it (`before`: the caps' limits before the reload,
        `held`: the pools they held). A lowered cap closes the idle servers above it now and the busy
        ones as they come back; a raised or removed one lets the pools it held open."""
        for pool in self.all_pools():
            self._set_caps(pool, self._caps_for(pool, config))
        changes = []
        for key in sorted(set(before) | set(self.caps)):
            cap = self.caps.get(key)
            old, new = before.get(key), cap.limit if cap is not None else None
            if old != new:
                changes.append(f"{key[0]} {covers(*key)}: {old or 'none'} -> {new or 'none'}")
        for cap in list(self.caps.values()):
            _close_taken(cap.trim(), f"above {cap.describe()}", f"above {cap.setting}")
            if cap.open_count() > cap.limit:
                cap.watch_check_ins()  # the busy ones close as they come back
            self._relieve(cap)
        for pool in held:
            while pool.should_open_for_waiters():  # (held again where a cap still has no room)
                self.open(pool)
        return changes


#: why PostgreSQL refuses a SCRAM-SHA-256-PLUS login (`halephant.auth.upstream`), for the log and the client
_BINDING_HINT = (
    "halephant binds its SCRAM login to the certificate it was shown, and the server's own differs: "
    "something between halephant and the node presents another certificate (a man in the middle?). "
    "clusters.{cluster}.tls.mode verify-full checks the certificate."
)


def _login_hint(exc: ClientError, target: PoolTarget, server: ServerConnection, tls: ServerTls | None) -> str:
    """The hint for a login PostgreSQL refused (28000, 28P01) that gave none of its own."""
    user = target.server_user
    if exc.code == sqlstate.INVALID_PASSWORD:
        return (
            f'halephant logs in as "{user}" with the password halephant.yaml gives it (server_password, '
            "else password)."
        )
    if "channel binding" in exc.message:
        return _BINDING_HINT.format(cluster=target.cluster)
    if not server.tls and exc.message.endswith("no encryption"):
        # pg_hba.conf has a hostssl line for it, and no host one: PostgreSQL's own words for that
        mode = tls.mode if tls is not None else "disable"
        return (
            f"The server accepts this login over TLS only, and halephant connected in plaintext "
            f"(clusters.{target.cluster}.tls.mode is {mode}): set it to require, verify-ca or verify-full."
        )
    if server.tls and tls is not None and exc.message.endswith("SSL encryption"):
        # pg_hba.conf has a hostnossl line for it, and no host one (or rejects it over TLS)
        return (
            f"The server refuses this login over TLS, and clusters.{target.cluster}.tls.mode is {tls.mode}: "
            "set it to prefer (a login refused over TLS is tried again without TLS) or disable, or let the "
            "login in over TLS in the server's pg_hba.conf."
        )
    return (
        f'halephant logs in as "{user}" from the host halephant runs on: the server\'s pg_hba.conf, or the '
        "role's rights, refuse that."
    )


def _close_taken(servers: list[ServerConnection], why: str, reason: str) -> None:
    """Close idle servers a cap took out of their pools (`why`: for the log; `reason`: for the server)."""
    for server in servers:
        log.info("pool %s: closing idle server pid %d: %s", server.pool.name, server.backend_pid, why)
        server.close(reason)
