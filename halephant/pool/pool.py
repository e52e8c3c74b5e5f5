"""One pool: the server connections for one (database, user, node), the clients waiting for one, and the
counters `halephant status` shows (PgBouncer's names: cl_active, cl_waiting, sv_active, sv_idle, sv_used).

`checkout()` either hands over an idle server at once or queues the waiter (FIFO) and says whether a new
connection should be opened; `checkin()` gives a server to the oldest waiter or makes it idle. Opening and
closing are done by the caller.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Generic, Protocol, TypeVar

from halephant.pool.stats import PoolStats
from halephant.types import PoolInfo, PoolSize, PoolTarget


class PooledServer(Protocol):
    """What the pool needs of a server connection."""

    created_at: float
    idle_since: float

    def close(self, reason: str) -> None: ...


S = TypeVar("S", bound=PooledServer)
W = TypeVar("W")  # a waiting client; the pool only queues it


class Pool(Generic[S, W]):
    __slots__ = (
        "active",
        "closed_count",
        "connecting",
        "host",
        "idle",
        "info",
        "key",
        "opened_count",
        "port",
        "stats",
        "waiters",
    )

    def __init__(self, target: PoolTarget, size: PoolSize, host: str, port: int) -> None:
        self.info = PoolInfo(target=target, size=size)
        self.host = host
        self.port = port
        self.key = (target.database, target.pool_user, f"{host}:{port}")
        self.idle: list[S] = []  # most recently used last
        self.active: set[S] = set()
        self.waiters: deque[W] = deque()
        self.connecting = 0
        self.opened_count = 0
        self.closed_count = 0
        self.stats = PoolStats()

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

    def checkout(self, waiter: W) -> tuple[S | None, bool]:
        """Give `waiter` a server now, or queue it. Returns (server or None, open_one_more)."""
        if self.idle:
            server = self.idle.pop()
            self.active.add(server)
            return server, False
        self.waiters.append(waiter)
        return None, self._should_open()

    def _should_open(self) -> bool:
        if len(self.waiters) > self.connecting and self.total < self.info.size.max:
            self.connecting += 1
            return True
        return False

    def cancel_wait(self, waiter: W) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def checkin(self, server: S) -> W | None:
        """Return a clean server. Returns the waiter it was handed to (already marked active), if any."""
        self.active.discard(server)
        if self.waiters:
            waiter = self.waiters.popleft()
            self.active.add(server)
            return waiter
        server.idle_since = time.monotonic()
        self.idle.append(server)
        return None

    def connected(self, server: S) -> W | None:
        """A connection opened for this pool finished logging in."""
        self.connecting -= 1
        self.opened_count += 1
        return self.checkin(server)

    def connect_failed(self) -> list[W]:
        """Opening failed. When nothing else could serve the waiters soon, they are returned to be failed."""
        self.connecting -= 1
        if self.connecting == 0 and not self.active and not self.idle:
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
                return
        self.closed_count += 1

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

    def missing_for_min(self) -> int:
        """How many connections to open so the pool holds min_pool_size."""
        n = max(0, self.info.size.min - self.total)
        self.connecting += n
        return n
