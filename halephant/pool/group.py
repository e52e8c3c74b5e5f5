"""The pools of one (database, user) across a cluster's nodes, and which node a transaction gets.

PRIMARY goes to the pool of the elected primary; while there is none, waiters are parked in
`waiting_for_primary` (a pool with no node and no capacity: it only queues) until one appears or their
checkout_timeout passes. REPLICA goes to the usable replica with the fewest active server connections
(connections being opened count too), round-robin among equals; one that cannot serve a client now
because a full cap across pools keeps it from opening a connection and it has no idle server
(`Pool.capped_out`) only when no other one can serve now; and one that refused halephant's last
login (`Pool.login_refused`) only when all did. The replica pools share one wait queue, so whichever
replica frees a server first serves the next waiter.

Synchronous and I/O-free like `Pool`: the pool manager assigns the pools when the topology changes and does
the I/O the choices call for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic

from halephant.pool.pool import Pool, S, W, WaitQueue
from halephant.types import PoolSize, PoolTarget, Role

__all__ = ["NO_PRIMARY", "PoolGroup"]

_NO_CAPACITY = PoolSize(min=0, max=0, reason="waiting for a primary: no node to connect to")

#: the node name the admin views show for the clients that wait for a primary
NO_PRIMARY = "(no primary)"
#: what a replica that refused halephant's last login (until server_login_retry passes) weighs in
#: `pick_replica`: picked only when every other one refused too
_REFUSED = 1 << 30
#: what a replica whose full cap keeps it from opening a connection, with no idle server, weighs in
#: `pick_replica` (`Pool.capped_out`): a client sent there would queue for a place under the cap while
#: another replica may serve it now; below `_REFUSED`, as such a replica still logs in
_CAPPED = 1 << 20


class PoolGroup(Generic[S, W]):
    __slots__ = (
        "_next",
        "cluster",
        "generation",
        "pools",
        "primary",
        "replica_waiters",
        "replicas",
        "target",
        "waiting_for_primary",
        "wants_replicas",
    )

    def __init__(self, target: PoolTarget) -> None:
        self.cluster = target.cluster
        #: the target the group was last asked for (a reload may hand clients a new one), and the
        #: configuration generation it comes from: a client from an older one does not change it back
        self.target = target
        self.generation = 0
        #: every pool of this (database, user), by node ("host:port"), whatever its node's role now
        self.pools: dict[str, Pool[S, W]] = {}
        self.primary: Pool[S, W] | None = None
        self.replicas: tuple[Pool[S, W], ...] = ()
        self.replica_waiters: WaitQueue[W] = WaitQueue()
        self.waiting_for_primary: Pool[S, W] = Pool(target, _NO_CAPACITY, "", 0)
        self.waiting_for_primary.key = (*self.waiting_for_primary.key[:2], NO_PRIMARY)  # as shown
        self._next = 0
        #: a transaction was routed to a replica once: the replicas' pools are kept assigned from then on
        self.wants_replicas = False

    def __repr__(self) -> str:
        primary = self.primary.key[2] if self.primary is not None else None
        return (
            f"<PoolGroup {self.cluster} primary={primary} replicas={[p.key[2] for p in self.replicas]} "
            f"waiting_for_primary={len(self.waiting_for_primary.waiters)}>"
        )

    def assign(self, primary: str | None, replicas: Sequence[str]) -> list[W]:
        """Point the group at the nodes that serve each role now (nodes without a pool in `pools` are
        left out: pools are made only for the roles the group's clients use).

        Sets each pool's `serves` and its wait queue. Returns the clients that were waiting for a pool
        that no longer serves as the primary, taken out of its queue: the caller hands them on.
        """
        self.primary = self.pools.get(primary) if primary is not None else None
        self.replicas = tuple(self.pools[name] for name in replicas if name in self.pools)
        displaced: list[W] = []
        for pool in self.pools.values():
            serves = Role.PRIMARY if pool is self.primary else Role.REPLICA if pool in self.replicas else None
            if pool.waiters is self.replica_waiters:
                if serves is not Role.REPLICA:
                    pool.waiters = WaitQueue()
            elif pool.waiters and serves is not Role.PRIMARY:
                displaced.extend(pool.waiters)
                pool.waiters.clear()
            if serves is Role.REPLICA:
                pool.waiters = self.replica_waiters
            pool.serves = serves
        return displaced

    def pick_replica(self, pools: Sequence[Pool[S, W]] | None = None) -> Pool[S, W] | None:
        """The least busy of `pools` (default: the usable replicas), round-robin on ties; one held by a
        full cap with no idle server (`Pool.capped_out`) only when every other one is too, or refused
        halephant's last login."""
        if pools is None:
            pools = self.replicas
        n = len(pools)
        if n < 2:
            return pools[0] if n else None
        start = self._next = (self._next + 1) % n
        best = _least_busy(pools, start, caps=False)
        if best.caps and best.capped_out():
            # Only the winner is asked (one attribute test per pick where no cap is configured); the
            # weighing again with every cap in it picks what weighing them all from the start would.
            return _least_busy(pools, start, caps=True)
        return best


def _least_busy(pools: Sequence[Pool[S, W]], start: int, caps: bool) -> Pool[S, W]:
    """`PoolGroup.pick_replica`'s weighing: the fewest active and opening connections, from `start` on
    (the first of equals wins); a replica that refused halephant's last login weighs `_REFUSED` more,
    and with `caps` one held by a full cap with no idle server (`Pool.capped_out`) `_CAPPED` more."""
    n = len(pools)
    best = pools[start]
    best_load = -1
    for i in range(n):
        pool = pools[(start + i) % n]
        load = len(pool.active) + pool.connecting
        if pool.login_refused is not None:
            load += _REFUSED
        elif caps and pool.caps and pool.capped_out():
            load += _CAPPED
        if best_load < 0 or load < best_load:
            best, best_load = pool, load
    return best
