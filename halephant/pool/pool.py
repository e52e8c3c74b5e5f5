"""One pool: the server connections for one (database, user, node), the clients waiting for one, and the
counters `halephant status` shows (PgBouncer's names: cl_active, cl_waiting, sv_active, sv_idle, sv_used).

`checkout()` either hands over an idle server at once or queues the waiter and says whether a new
connection should be opened; `checkin()` gives a server to the next waiter or makes it idle. Opening and
closing are done by the caller.

Waiters queue per group (the client's user name): FIFO within a group, round robin between groups, so
when several client users share one pool (a plugin mapping them to one upstream role) one user's 500
waiters cannot starve another's 5. With a single group this is plain FIFO.

The pools of one (database, user) on a cluster's replicas share one `waiters` queue (see
`halephant.pool.group`), so a server coming free on any replica serves the next waiter. `serves` is the
role the pool's node can take transactions for now (None: down, lagging, or not the elected primary),
kept up to date by the pool manager as the topology changes.

`caps` are the caps on server connections across pools that count this pool's (`halephant.pool.caps`:
max_db_connections, max_user_connections), empty when none is configured: they are asked only where a
connection would be opened, and when a replica is picked for a transaction (`capped_out`: only a capped
pool with no idle server), never when an idle server is checked out or a server checked in here (the
pool manager looks at a check-in only while a cap has pools waiting, through `retire_before`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from halephant.pool.stats import PoolStats
from halephant.types import PoolInfo, PoolSize, PoolTarget, Role

if TYPE_CHECKING:
    from halephant.pool.caps import Cap


class PooledServer(Protocol):
    """What the pool needs of a server connection."""

    created_at: float
    idle_since: float

    def close(self, reason: str) -> None: ...


S = TypeVar("S", bound=PooledServer)
W = TypeVar("W")  # a waiting client; the pool only queues it


class WaitQueue(Generic[W]):
    """Waiting clients: FIFO per group, round robin between the groups that have waiters."""

    __slots__ = ("_groups", "_len", "_order")

    def __init__(self) -> None:
        self._groups: dict[Hashable, deque[W]] = {}
        self._order: deque[Hashable] = deque()  # groups with waiters; the next to serve first
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[W]:
        for group in list(self._order):
            yield from list(self._groups[group])

    def append(self, waiter: W, group: Hashable = None) -> None:
        queue = self._groups.get(group)
        if queue is None:
            queue = self._groups[group] = deque()
            self._order.append(group)
        queue.append(waiter)
        self._len += 1

    def popleft(self) -> W:
        """The next waiter: the oldest of the group whose turn it is; that group goes to the back."""
        order = self._order
        group = order[0]
        queue = self._groups[group]
        waiter = queue.popleft()
        self._len -= 1
        if not queue:
            order.popleft()
            del self._groups[group]
        elif len(order) > 1:  # one group (one user), the usual case, has nothing to rotate
            order.rotate(-1)
        return waiter

    def remove(self, waiter: W) -> None:
        """Take `waiter` out; ValueError when it is not queued."""
        for group, queue in self._groups.items():
            try:
                queue.remove(waiter)
            except ValueError:
                continue
            self._len -= 1
            if not queue:
                del self._groups[group]
                self._order.remove(group)
            return
        raise ValueError("not waiting")

    def clear(self) -> None:
        self._groups.clear()
        self._order.clear()
        self._len = 0

    def heads(self) -> list[W]:
        """The oldest waiter of each group."""
        return [queue[0] for queue in self._groups.values()]

    def pop_while(self, expired: Callable[[W], bool]) -> list[W]:
        """Take out, oldest first in each group, the waiters for which `expired` is true (each group's
        waiters are in arrival order, so the scan stops at the first one that is not)."""
        out: list[W] = []
        for group in list(self._groups):
            queue = self._groups[group]
            while queue and expired(queue[0]):
                out.append(queue.popleft())
            if not queue:
                del self._groups[group]
                self._order.remove(group)
        self._len -= len(out)
        return out


class Pool(Generic[S, W]):
    __slots__ = (
        "active",
        "caps",
        "closed_count",
        "connecting",
        "failed_open_at",
        "host",
        "idle",
        "info",
        "key",
        "lifetime_before",
        "lingering",
        "login_refused",
        "opened_count",
        "outdated_before",
        "port",
        "retire_before",
        "serves",
        "stats",
        "track_lsn",
        "waiters",
    )

    def __init__(self, target: PoolTarget, size: PoolSize, host: str, port: int) -> None:
        self.info = PoolInfo(target=target, size=size)
        self.host = host
        self.port = port
        self.key = (target.database, target.pool_user, f"{host}:{port}")
        self.idle: list[S] = []  # most recently used last
        self.active: set[S] = set()
        self.waiters: WaitQueue[W] = WaitQueue()
        self.connecting = 0
        self.opened_count = 0
        self.closed_count = 0
        self.stats = PoolStats()
        self.serves: Role | None = None
        #: read-your-writes: learn the primary's WAL position when a client's transaction ends here
        self.track_lsn = False
        #: a server coming back that was opened before this (monotonic) time is looked at before it is
        #: handed on (the later of the two below; +inf while a reload's smaller size is not reached:
        #: each one coming back is then counted), kept up to date by the pool manager's sweep
        self.retire_before = float("-inf")
        #: a server opened before this time is past max_lifetime
        self.lifetime_before = float("-inf")
        #: a server opened before this time is to be replaced (a reload changed what it logs in with,
        #: or RECONNECT)
        self.outdated_before = float("-inf")
        #: (the error, until when): the server refused a login; none is tried again until then
        self.login_refused: tuple[object, float] | None = None
        #: loop time of the last open that failed (refused, or the node unreachable), None once one logs
        #: in again: meanwhile the pool manager tops min_pool_size up one connection at a time
        self.failed_open_at: float | None = None
        #: the caps that count this pool's server connections (set by the pool manager)
        self.caps: tuple[Cap, ...] = ()
        #: servers closed while the pool had caps, until PostgreSQL has closed its side (backend gone):
        #: server -> when it was closed; the caps count them
        self.lingering: dict[S, float] = {}

    def __repr__(self) -> str:
        return (
            f"<Pool {self.name} sv_active={len(self.active)} sv_idle={len(self.idle)} "
            f"connecting={self.connecting} cl_waiting={len(self.waiters)} max={self.info.size.max}>"
        )

    @property
    def name(self) -> str:
        return f"{self.key[0]}/{self.key[1]}@{self.key[2]}"

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    def checkout(self, waiter: W, group: Hashable = None) -> tuple[S | None, bool]:
        """Give `waiter` a server now, or queue it in `group`. Returns (server or None, open_one_more)."""
        idle = self.idle
        if idle:
            server = idle.pop()
            self.active.add(server)
            return server, False
        self.waiters.append(waiter, group)
        return None, self._should_open()

    def _should_open(self) -> bool:
        # `total`, inlined: a client that queues runs this
        connecting = self.connecting
        if (
            self.waiters._len > connecting
            and len(self.idle) + len(self.active) + connecting < self.info.size.max
        ):
            if self.caps and not self._admitted():
                return False
            self.connecting += 1
            return True
        return False

    def _admitted(self) -> bool:
        """Whether every cap has room for one more connection of this pool; each one that has none
        holds the pool until it has (`Cap.hold`)."""
        admitted = True
        for cap in self.caps:
            if cap.room() <= 0:
                cap.hold(self)
                admitted = False
        if admitted:
            for cap in self.caps:
                cap.held.pop(self, None)
        return admitted

    def held_by(self) -> Cap | None:
        """The cap that keeps this pool from opening a connection for its waiters now (None: none does;
        the pool may be full by its own size)."""
        return self._full_cap() if self.total < self.info.size.max else None

    def cap_in_the_way(self) -> Cap | None:
        """The full cap that keeps this pool from opening a connection its waiters could have: below its
        size (`held_by`), or its reserve once at its size (None: no cap does, or nothing is left to open):
        what a client that waits, or waited in vain, is told."""
        size = self.info.size
        return self._full_cap() if self.total < size.max + size.reserve else None

    def capped_out(self) -> bool:
        """No idle server, and a full cap keeps the pool from opening one: a client queued here now
        waits for a place under that cap (asked by `PoolGroup.pick_replica`, only of a pool with caps)."""
        return not self.idle and self._full_cap() is not None

    def _full_cap(self) -> Cap | None:
        """The first of its caps that has no room left."""
        for cap in self.caps:
            if cap.room() <= 0:
                return cap
        return None

    def cancel_wait(self, waiter: W) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def checkin(self, server: S) -> W | None:
        """Return a clean server (an active one). Returns the waiter it was handed to (it stays active),
        if any."""
        waiters = self.waiters
        if waiters._len:  # not bool(waiters): a Python-level __bool__ call, per transaction
            return waiters.popleft()  # the server stays active
        self.active.discard(server)
        server.idle_since = _monotonic()
        self.idle.append(server)
        return None

    def connected(self, server: S) -> W | None:
        """A connection opened for this pool finished logging in."""
        self.connecting -= 1
        self.opened_count += 1
        self.failed_open_at = None
        self.active.add(server)  # as if checked out: `checkin` keeps it active for a waiter
        return self.checkin(server)

    def connect_failed(self, served_elsewhere: bool = False) -> list[W]:
        """Opening failed. When nothing else could serve the waiters soon, they are returned to be failed.

        `served_elsewhere`: the waiters are shared with pools that can still serve them (replicas).
        """
        self.connecting -= 1
        if self.connecting == 0 and not self.active and not self.idle and not served_elsewhere:
            failed = list(self.waiters)
            self.waiters.clear()
            return failed
        return []

    def discard(self, server: S) -> None:
        """Forget a server that closed (or is being closed)."""
        if server in self.active:
            self.active.discard(server)
        else:
            try:
                self.idle.remove(server)
            except ValueError:
                if self.lingering:
                    self.lingering.pop(server, None)  # gone now
                return
        self.closed_count += 1

    def linger(self, server: S) -> bool:
        """A server being closed (taken out of the pool already): while the pool has caps, it stays
        counted until it is gone (`discard` once more). False when the pool has none."""
        if not self.caps:
            return False
        self.lingering[server] = _monotonic()
        return True

    def should_open_for_waiters(self) -> bool:
        """After a server was discarded: open a replacement if clients still wait."""
        return self._should_open()

    def expired(self, now: float, idle_timeout: float, max_lifetime: float) -> list[S]:
        """Idle servers to close: past max_lifetime, or idle too long while above min_pool_size."""
        out: list[S] = []
        keep_min = self.info.size.min
        for server in list(self.idle):
            too_old = now - server.created_at > max_lifetime
            too_idle = now - server.idle_since > idle_timeout and self.total > keep_min
            if too_old or too_idle:
                self.idle.remove(server)
                out.append(server)
        self.closed_count += len(out)
        return out

    def open_reserve(self) -> bool:
        """Open one connection beyond `max`, up to `max + reserve`, for waiters nobody is opening for."""
        if self._reserve_wanted():
            if self.caps and self._full_cap() is not None:
                return False  # the reserve never goes beyond a cap (`reserve_held_by`: room is made)
            self.connecting += 1
            return True
        return False

    def reserve_held_by(self) -> list[Cap]:
        """The full caps that keep `open_reserve` from opening a connection the waiters could have
        (`Cap.evict_for_reserve` makes room under each). None for a pool below its size: the caps hold
        it as for any connection (`Cap.hold`), and make room for it then."""
        if self.total < self.info.size.max or not self._reserve_wanted():
            return []
        return [cap for cap in self.caps if cap.room() <= 0]

    def _reserve_wanted(self) -> bool:
        size = self.info.size
        return (
            bool(size.reserve)
            and len(self.waiters) > self.connecting
            and self.total < size.max + size.reserve
        )

    def excess_idle(self) -> list[S]:
        """Idle servers beyond `max` (reserve connections no longer needed, or a pool shrunk by a
        reload), taken out of the pool to be closed."""
        out: list[S] = []
        while self.idle and self.total > self.info.size.max:
            out.append(self.idle.pop(0))  # the least recently used
        self.closed_count += len(out)
        return out

    def missing_for_min(self, at_most: int | None = None) -> int:
        """How many connections to open so the pool holds min_pool_size (`at_most` of them); they
        count as connecting from now on."""
        n = max(0, self.info.size.min - self.total)
        if at_most is not None:
            n = min(n, at_most)
        for cap in self.caps:  # min_pool_size never goes beyond a cap
            n = min(n, max(0, cap.room()))
        self.connecting += n
        return n
