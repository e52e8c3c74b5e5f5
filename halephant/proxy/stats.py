"""Process-wide statistics of a running halephant: connections, errors sent by SQLSTATE, reloads (and
the last one's errors), and a bounded ring of recent decisions with their reasons (rejects, pins,
checkout timeouts, console commands).

Recording is a counter increment or one `deque.append`; it happens at decision points (once per client,
per rejected statement, per pin), never per protocol message. Per-pool counters live on each pool
(`halephant.pool.stats.PoolStats`); the admin API reads both.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from halephant.proxy.app import App
    from halephant.types import ClientInfo

#: how many recent decisions are kept (the oldest are dropped)
DECISIONS_KEPT = 200
#: resolution of `App.clock`, the loop time clients stamp their state changes with
CLOCK_RESOLUTION = 0.1


@dataclass(frozen=True, slots=True)
class Decision:
    """One explainable decision: what was decided, for whom, the SQLSTATE sent (if any), and why."""

    at: float  # wall-clock time (seconds since the epoch)
    kind: str  # reject, pin, route, checkout_timeout, admin, ...
    client: int  # the client's number (its process ID as told), 0 when none
    user: str
    database: str
    code: str
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {
            "at": self.at,
            "kind": self.kind,
            "client": self.client,
            "user": self.user,
            "database": self.database,
            "sqlstate": self.code,
            "reason": self.reason,
        }


class Stats:
    """Counters and the decision ring of one halephant process."""

    def __init__(self, decisions_kept: int = DECISIONS_KEPT) -> None:
        self.started_at = time.time()
        #: client connections accepted since start
        self.connections = 0
        #: ErrorResponse messages halephant itself sent to clients, by SQLSTATE
        self.errors: Counter[str] = Counter()
        self.decisions: deque[Decision] = deque(maxlen=decisions_kept)
        #: configuration reloads, by outcome ("ok" / "failed")
        self.reloads: Counter[str] = Counter()
        #: when the last reload ran (wall clock) and its errors (none: applied); None before the first
        self.last_reload: tuple[float, list[str]] | None = None

    def error(self, code: str) -> None:
        """halephant sent an ErrorResponse with this SQLSTATE."""
        self.errors[code] += 1

    def decide(self, kind: str, client: ClientInfo | None, reason: str, code: str = "") -> None:
        """Remember a decision for `/decisions` and `halephant status`."""
        self.decisions.append(
            Decision(
                time.time(),
                kind,
                client.id if client is not None else 0,
                client.user if client is not None else "",
                client.database if client is not None else "",
                code,
                reason,
            )
        )

    def reloaded(self, errors: list[str]) -> None:
        """A configuration reload finished (called by the reload path); `errors`: why it was refused."""
        self.reloads["failed" if errors else "ok"] += 1
        self.last_reload = (time.time(), list(errors))


async def run_clock(app: App) -> None:
    """Keep `app.clock` (loop time) current to CLOCK_RESOLUTION.

    Clients stamp each change between idle and active with it: reading an attribute costs a fraction of
    a clock call, and that happens twice per transaction."""
    loop = app.loop
    while True:
        app.clock = loop.time()
        await anyio.sleep(CLOCK_RESOLUTION)
