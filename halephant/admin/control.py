"""Operator commands on a running halephant: PAUSE, RESUME, RECONNECT, WAIT_CLOSE, KILL, DISABLE and ENABLE
(from the SQL console).

PAUSE holds every new transaction of the paused databases at its checkout, and every login that would
take a server (session pooling; a login that learns the parameters to report): the client's messages
are buffered as for any wait, and no checkout timeout runs. It reports paused once no server of those
databases is lent to a client any more. The proxy path pays one attribute test per checkout
(`holding`), false unless something is paused.

RECONNECT closes idle servers at once and marks the others (`Pool.outdated_before`, which a reload that
changes what a pool logs in with sets too) to be closed when they come back; WAIT_CLOSE answers once no
marked server is left open, nor any server of a pool a reload retired.

DISABLE refuses new logins to a database (after authentication, as PostgreSQL refuses a database that
does not allow connections) with PgBouncer's words, under PostgreSQL's SQLSTATE for it, 55000
(object_not_in_prerequisite_state; PgBouncer says 08P01); clients already logged in go on. ENABLE lets
them in again. Like PAUSE, the state lives here and not in the configuration: a reload keeps it.

A PAUSE or RESUME that would change nothing is refused with PgBouncer's words ("already suspended/paused",
"database X is not paused", "pooler is not paused/suspended"), under SQLSTATE 55000
(object_not_in_prerequisite_state) where PgBouncer says 08P01, which drivers read as a broken connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from halephant import sqlstate
from halephant.errors import ClientError
from halephant.proxy.sweep import shutdown_error

if TYPE_CHECKING:
    from halephant.admin.console import ConsoleSession
    from halephant.pool.pool import Pool
    from halephant.proxy.app import App
    from halephant.proxy.client import ClientConnection
    from halephant.proxy.server import ServerConnection

    ServerPool = Pool[ServerConnection, ClientConnection]

log = logging.getLogger("halephant.admin")

ALL = "*"


class Control:
    def __init__(self, app: App) -> None:
        self.app = app
        #: databases paused, or ALL
        self._paused: set[str] = set()
        #: checked by every checkout: True while anything is paused
        self.holding = False
        #: the clients held, each once (a dict as an ordered set): one held again after a cancel
        #: answered where it was held must not be routed twice by RESUME (the second time out of the
        #: pool's queue it had joined the first time, where it stayed to be handed a second server)
        self._held: dict[ClientConnection, None] = {}
        #: databases DISABLE keeps new clients out of
        self._disabled: set[str] = set()
        #: open SQL console sessions (not in `app.clients`: they are not pool clients)
        self.consoles: set[ConsoleSession] = set()

    async def run(self) -> None:
        """Runs in the app's task group; when halephant stops, console sessions are told 57P01."""
        try:
            await anyio.sleep_forever()
        finally:
            for session in list(self.consoles):
                session.close(shutdown_error())

    # --- state ---

    def is_paused(self, database: str) -> bool:
        return ALL in self._paused or database in self._paused

    def is_disabled(self, database: str) -> bool:
        return database in self._disabled

    def refuse_login(self, database: str) -> ClientError | None:
        """Why a client that authenticated for `database` may not log in (None: it may)."""
        if database not in self._disabled:
            return None
        return ClientError(
            sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE,
            f"database does not allow connections: {database}",
            hint=f"An operator ran DISABLE {database} on the admin console; ENABLE {database} lets "
            "clients in again.",
            fatal=True,
        )

    def disabled_databases(self) -> set[str]:
        return set(self._disabled)

    def paused_databases(self) -> set[str]:
        return set(self._paused)

    def held_by_database(self) -> dict[str, list[ClientConnection]]:
        out: dict[str, list[ClientConnection]] = {}
        for pool, clients in self.held_by_pool().items():
            logged_in = [c for c in clients if c.info is not None]
            if logged_in:
                out.setdefault(pool.key[0], []).extend(logged_in)
        return out

    def held_by_pool(self) -> dict[ServerPool, list[ClientConnection]]:
        """The clients PAUSE holds, by the pool each waits for (they are in no pool's queue)."""
        out: dict[ServerPool, list[ClientConnection]] = {}
        for client in self._held:
            if client.waiting_pool is not None:
                out.setdefault(client.waiting_pool, []).append(client)
        return out

    def _databases(self, database: str | None) -> list[str]:
        if database is None:
            return list(self.app.config.databases)
        if database not in self.app.config.databases:
            raise ClientError(sqlstate.INVALID_CATALOG_NAME, f'database "{database}" does not exist')
        return [database]

    def _pools(self, database: str | None) -> list[ServerPool]:
        return [p for k, p in list(self.app.manager.pools.items()) if database is None or k[0] == database]

    # --- called by the proxy at checkout ---

    def hold(self, client: ClientConnection, pool: ServerPool) -> bool:
        """Hold `client`'s new transaction if its database is paused; True when held."""
        if not self.is_paused(pool.key[0]):
            return False
        client.waiting_pool = pool  # buffers what it sends; never in the pool's queue, so no timeout
        client.since = self.app.loop.time()
        self._held[client] = None
        return True

    # --- commands ---

    def pause(self, database: str | None) -> None:
        """Refused while every database is paused; a database paused on its own may be paused again (its
        PAUSE answers once its transactions are done), as with PgBouncer."""
        names = self._databases(database)
        if ALL in self._paused:
            raise ClientError(sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE, "already suspended/paused")
        self._hold(ALL if database is None else names[0])
        log.info("PAUSE %s", database or "(all databases)")
        # Clients already queued for a server have started nothing either: held too, not served by the
        # servers the transactions in progress give back (PAUSE would wait for theirs as well).
        for key, pool in list(self.app.manager.shown_pools().items()):  # parked for a primary too
            if database is None or key[0] == database:
                for client in list(pool.waiters):
                    pool.cancel_wait(client)
                    self.hold(client, pool)

    def _hold(self, name: str) -> None:
        self._paused.add(name)
        self.holding = True

    def active_servers(self, database: str | None) -> int:
        n = 0
        for pool in self._pools(database):
            n += sum(1 for s in pool.active if getattr(s.client, "info", None) is not None)
        return n

    async def wait_paused(self, database: str | None, poll: float = 0.05) -> None:
        """Return once no server of `database` (all when None) is lent to a client. A RESUME meanwhile
        ends the wait with 57014: that pause is no longer in force, and its PAUSE would otherwise wait
        (the console session with it) for as long as any client keeps a server, forever in session
        pooling."""
        while self.active_servers(database):
            await anyio.sleep(poll)
            if not (ALL in self._paused if database is None else self.is_paused(database)):
                raise ClientError(sqlstate.QUERY_CANCELED, "PAUSE canceled: RESUME released the pause first")

    def resume(self, database: str | None) -> None:
        """Without a database, releases every pause; refused when nothing is paused, or when `database`
        was not paused on its own (a PAUSE of all databases is released by a RESUME of all)."""
        if database is None:
            if not self._paused:
                raise ClientError(sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE, "pooler is not paused/suspended")
            self._paused.clear()
        else:
            self._databases(database)
            if database not in self._paused:
                raise ClientError(
                    sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE,
                    f"database {database} is not paused",
                    hint="PAUSE without a database paused them all: RESUME without one releases them."
                    if ALL in self._paused
                    else None,
                )
            self._paused.discard(database)
        self.holding = bool(self._paused)
        log.info("RESUME %s", database or "(all databases)")
        self._release_held(self.is_paused)

    def _release_held(self, still_held: Callable[[str], bool]) -> None:
        """Let the held clients go on, but those whose database `still_held` says stay held."""
        held, self._held = self._held, {}
        for client in held:
            pool = client.waiting_pool
            if pool is None or client.info is None:
                continue  # gone meanwhile
            if still_held(pool.key[0]):
                self._held[client] = None
                continue
            client.waiting_pool = None
            # goes on where it was held: checkout (at login too), then what it sent; for a database a
            # reload removed, refused there
            client.reroute()

    def forget_removed(self) -> None:
        """After a reload: a database the configuration no longer has is no longer paused or disabled, so
        one added again under its name starts as a new database does (PgBouncer drops a removed database
        with its state). Clients PAUSE held for it are let go on: they are told it was removed."""
        names = self.app.config.databases
        gone = {d for d in self._paused | self._disabled if d != ALL and d not in names}
        if not gone:
            return
        self._paused -= gone
        self._disabled -= gone
        self.holding = bool(self._paused)
        for name in sorted(gone):
            log.info("%s removed: no longer paused or disabled", name)
        self._release_held(lambda database: database in names)

    def reconnect(self, database: str | None) -> int:
        """Replace the server connections of `database`: idle ones now, the others when they come back."""
        self._databases(database)
        n = 0
        now = time.monotonic()
        for pool in self._pools(database):
            for server in list(pool.idle):
                server.close("RECONNECT")
                n += 1
            # The others are closed when they come back to the pool, never handed on: after their
            # client's transaction, its session (session pooling), or a pin (an advisory lock, ...).
            pool.outdated_before = now
            pool.retire_before = max(pool.retire_before, now)
            n += len(pool.active)
        log.info("RECONNECT %s: %d server connection(s) to replace", database or "(all databases)", n)
        return n

    def disable(self, database: str) -> None:
        """Refuse new clients of `database`; those logged in go on. Disabling it again changes nothing,
        as with PgBouncer."""
        self._databases(database)
        self._disabled.add(database)
        log.info("DISABLE %s: new clients are refused", database)

    def enable(self, database: str) -> None:
        """Let new clients of `database` in again (also when it was not disabled, as with PgBouncer)."""
        self._databases(database)
        self._disabled.discard(database)
        log.info("ENABLE %s", database)

    def servers_to_close(self, database: str | None) -> int:
        """Servers of `database` (all when None) still open that RECONNECT or a reload marked to be closed:
        opened before their pool's `outdated_before`, or in a pool a reload retired (lent ones close as
        they come back). One still logging in is never handed to a client (it is closed once logged in)
        and is not counted."""
        self._databases(database)
        n = 0
        for pool in self._pools(database):
            before = pool.outdated_before
            n += sum(1 for s in pool.active if s.created_at < before)
            n += sum(1 for s in pool.idle if s.created_at < before)
        for pool in list(self.app.manager.retired):
            if database is None or pool.key[0] == database:
                n += len(pool.active) + len(pool.idle)
        return n

    async def wait_closed(self, database: str | None, poll: float = 0.05) -> None:
        """Return once `servers_to_close(database)` is 0."""
        while self.servers_to_close(database):
            await anyio.sleep(poll)

    def kill(self, database: str) -> int:
        """Drop every client and server connection of `database`; it stays paused until RESUME."""
        self._databases(database)
        self._hold(database)  # also while every database is paused: KILL is no PAUSE
        error = ClientError(
            sqlstate.ADMIN_SHUTDOWN, "terminating connection due to administrator command", fatal=True
        )
        n = 0
        for client in list(self.app.clients.values()):
            target = client.target
            if target is not None and target.database == database:
                client.fail(error)
                n += 1
        for pool in self._pools(database):
            for server in list(pool.idle) + list(pool.active):
                server.close("KILL")
        log.info("KILL %s: %d client(s) terminated", database, n)
        return n
