"""Caps on server connections across pools, per node: `max_db_connections` (every pool of one database,
all users together) and `max_user_connections` (every pool that logs in upstream as one role, all
databases together), as PgBouncer has them; per node, because PostgreSQL's `max_connections` and a
role's connection limit are.

A `Cap` counts its pools' server connections that PostgreSQL may still see: open, being opened, and
closed by halephant but not gone yet (`Pool.lingering`: PostgreSQL closes its side only once the
backend has exited, and counts it until then). A pool asks its caps before it opens a connection
(`Pool._should_open`, `open_reserve`, `missing_for_min`); one that a full cap refuses is *held* by it:
the cap keeps the held pools in order, and
* `serve_held` picks which of them open a connection when the cap has room again;
* `evict_idle` takes idle servers of its pools out to be closed while held pools want more than
  the cap will have room for once those already closing are gone (as PgBouncer evicts idle
  connections of the database's, or the user's, other pools); `evict_for_reserve` does the same for
  a pool whose reserve connection is due (`Pool.reserve_held_by`), which the waiter sweep then opens;
* `reclaim` says whether a server checked in to one of its pools must be closed rather than handed on:
  the cap was lowered below what its pools hold, or a held pool wants the place and the server's own
  pool needs it less (it has no waiters, or holds more servers than the held pool plus one).

Synchronous and I/O-free like `Pool`: the pool manager (`halephant.proxy.manager`) keeps each pool's caps
up to date with the configuration and performs what these decisions call for. `wake` is how a pool that
gets held asks the manager for a look (it schedules one, never does I/O there and then).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from halephant.pool.pool import Pool

    AnyPool = Pool[Any, Any]

__all__ = ["DB", "USER", "Cap", "covers", "wants"]

#: the settings, as the operator writes them
DB: Literal["max_db_connections"] = "max_db_connections"
USER: Literal["max_user_connections"] = "max_user_connections"


def covers(setting: str, name: str, node: str) -> str:
    """What a cap covers, for people: `of database "app" on 10.0.0.1:5432`."""
    return f'of {"database" if setting == DB else "user"} "{name}" on {node}'


def wants(pool: AnyPool) -> int:
    """How many more connections `pool` would open for its waiters now, were no cap in the way."""
    return max(0, min(len(pool.waiters) - pool.connecting, pool.info.size.max - pool.total))


class Cap:
    __slots__ = ("held", "limit", "name", "node", "pools", "setting", "wake", "waking")

    def __init__(self, setting: str, name: str, node: str, limit: int) -> None:
        #: DB or USER
        self.setting = setting
        #: the database (DB) or the role halephant logs in upstream as (USER)
        self.name = name
        #: "host:port", as in `Pool.key`
        self.node = node
        self.limit = limit
        #: the pools it counts
        self.pools: list[AnyPool] = []
        #: pools it refused a connection their waiters need, oldest first (a dict as an ordered set)
        self.held: dict[AnyPool, None] = {}
        #: called when a pool gets held (the pool manager schedules a look at the cap)
        self.wake: Callable[[Cap], None] | None = None
        #: a look is scheduled (set and cleared by whoever `wake` calls)
        self.waking = False

    def __repr__(self) -> str:
        return f"<Cap {self.setting}={self.limit} {self.name}@{self.node} counted={self.counted()}>"

    def describe(self) -> str:
        """`max_db_connections (2) of database "app" on 10.0.0.1:5432`, for log lines and clients."""
        return f"{self.setting} ({self.limit}) {covers(self.setting, self.name, self.node)}"

    def hint(self) -> str:
        """What a client refused a server because of this cap is told to do about it."""
        if self.setting == DB:
            whose = f'All the pools of database "{self.name}" (every user) together'
        else:
            whose = f'All the pools that log in as "{self.name}" (every database) together'
        return (
            f"{whose} may hold {self.limit} server connection(s) on {self.node} ({self.setting}): raise "
            "it, or shorten transactions."
        )

    # --- counting ---

    def open_count(self) -> int:
        """Server connections of its pools open or being opened."""
        return sum(p.total for p in self.pools)

    def counted(self) -> int:
        """What the cap holds against new connections: `open_count` and those closing, not gone yet."""
        return sum(p.total + len(p.lingering) for p in self.pools)

    def room(self) -> int:
        """Connections its pools may still open (0 or less: none, the cap is full)."""
        return self.limit - self.counted()

    def hold(self, pool: AnyPool) -> None:
        """`pool` needs a connection and the cap has no room: keep it in line, and ask for a look."""
        self.held.setdefault(pool, None)
        if not self.waking and self.wake is not None:
            self.wake(self)

    def wanted(self, besides: AnyPool | None = None) -> int:
        """Connections the held pools (but `besides`) would open now."""
        return sum(wants(p) for p in self.held if p is not besides)

    # --- what to do ---

    def forget_served(self) -> None:
        """Let go of the held pools that want no connection any more (their clients were served
        otherwise, gave up, or left), and of those PostgreSQL refuses logins to for now: the pool
        manager's tick tries those again once server_login_retry has passed, as for any pool."""
        for pool in [p for p in self.held if p.login_refused is not None or not wants(p)]:
            del self.held[pool]

    def serve_held(self) -> list[AnyPool]:
        """While there is room: the held pools to open a connection for, one each in turn, oldest held
        first (their `connecting` is counted already: the caller opens one per entry). A pool whose
        waiters no longer need one leaves the line; one that another cap still refuses waits in that
        one's."""
        self.forget_served()
        opened: list[AnyPool] = []
        while self.held and self.room() > 0:
            pool = next(iter(self.held))
            del self.held[pool]
            if pool._should_open():  # (holds it again, at the back, where a cap has no room)
                opened.append(pool)
                if wants(pool):
                    self.held.setdefault(pool, None)  # more to come: after the others
        return opened

    def evict_idle(self) -> list[Any]:
        """Idle servers to close so that the held pools get their places: as many as they want beyond
        what the cap will have room for once the servers already closing are gone, least recently
        used first, taken out of their pools (the caller closes them; they count until gone)."""
        return self._take_idle(self.open_count() + self.wanted() - self.limit)

    def evict_for_reserve(self) -> list[Any]:
        """Idle servers to close so that a pool's reserve connection gets a place too (the pool is full
        by its own size: it wants none as a held pool would, `wants`), beyond what the held pools want
        and what the servers already closing will free; taken out as `evict_idle` does."""
        return self._take_idle(self.open_count() + self.wanted() + 1 - self.limit)

    def trim(self) -> list[Any]:
        """After the cap was lowered: idle servers above it, least recently used first, taken out of
        their pools to be closed (busy ones close as they come back: `reclaim`)."""
        return self._take_idle(self.open_count() - self.limit)

    def _take_idle(self, n: int) -> list[Any]:
        if n <= 0:
            return []
        idle = [(server.idle_since, server, pool) for pool in self.pools for server in pool.idle]
        idle.sort(key=lambda entry: entry[0])
        out = []
        for _since, server, pool in idle[:n]:
            pool.discard(server)
            out.append(server)
        return out

    def watch_check_ins(self) -> None:
        """Have each server that comes back to one of its pools looked at (`reclaim`) before it is handed
        on: as when a reload shrinks a pool (`Pool.retire_before`)."""
        for pool in self.pools:
            pool.retire_before = float("inf")

    def reclaim(self, pool: AnyPool) -> str:
        """Why a server that comes back to `pool` is to be closed rather than handed on ("" if not)."""
        open_now = self.open_count()
        if open_now > self.limit:
            return f"above {self.describe()}"
        if not self.held:
            return ""
        wanted = 0
        fewest = None
        for other in self.held:
            if other is pool:
                continue
            n = wants(other)
            if n:
                wanted += n
                fewest = other.total if fewest is None else min(fewest, other.total)
        if fewest is None or open_now + wanted <= self.limit:
            return ""  # the servers already closing make room enough
        if wants(pool) and pool.total <= fewest + 1:
            return ""  # its own waiters need it as much
        return f"another pool waits for a place under {self.describe()}"
