"""Counters one pool keeps for the operator (`halephant status`, the admin API, /metrics).

Plain attributes, written only off the per-message path: a wait is recorded when it ends, a checkout
timeout when it fires, and the per-server counters (`ServerConnection.rfq_seen`, `xact_seen`,
`link_count`) are folded in here when a server connection closes, so totals stay monotonic without any
work per transaction.
"""

from __future__ import annotations

from bisect import bisect_left

#: upper bounds (seconds) of the wait-time histogram buckets; a last bucket (+Inf) is implied
WAIT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)


class PoolStats:
    __slots__ = (
        "checkout_timeouts",
        "closed_links",
        "closed_queries",
        "closed_xacts",
        "wait_buckets",
        "wait_max",
        "wait_total",
    )

    def __init__(self) -> None:
        #: totals carried over from server connections that are gone
        self.closed_queries = 0
        self.closed_xacts = 0
        self.closed_links = 0
        #: clients that had to queue for a server, and how long they waited in all (seconds)
        self.wait_total = 0.0
        self.wait_max = 0.0
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self.checkout_timeouts = 0

    def waited(self, seconds: float) -> None:
        """A queued client got its server after `seconds` (runs per wait: the count is the buckets' sum)."""
        self.wait_total += seconds
        if seconds > self.wait_max:
            self.wait_max = seconds
        self.wait_buckets[bisect_left(WAIT_BUCKETS, seconds)] += 1  # the first bound >= seconds

    @property
    def wait_count(self) -> int:
        """Clients that had to queue for a server."""
        return sum(self.wait_buckets)

    def server_closed(self, queries: int, xacts: int, links: int) -> None:
        self.closed_queries += queries
        self.closed_xacts += xacts
        self.closed_links += links
