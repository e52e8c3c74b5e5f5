"""Node selection (`halephant.pool.group.PoolGroup`) with fake servers and waiters: least active replica,
round-robin on ties, refusing replicas last, one wait queue shared by the replicas, waiters displaced
when the primary moves."""

from __future__ import annotations

from test_pool_logic import FakeServer, FakeWaiter, make_pool

from halephant.pool.group import PoolGroup
from halephant.types import Role

NODES = ("a:1", "b:2", "c:3")


def make_group() -> PoolGroup[FakeServer, FakeWaiter]:
    group: PoolGroup[FakeServer, FakeWaiter] = PoolGroup(make_pool().info.target)
    for name in NODES:
        pool = make_pool(max_=2)
        pool.key = (pool.key[0], pool.key[1], name)
        group.pools[name] = pool
    return group


def test_roles_and_shared_queue() -> None:
    group = make_group()
    assert group.assign("a:1", ["b:2", "c:3"]) == []
    a, b, c = (group.pools[n] for n in NODES)
    assert (a.serves, b.serves, c.serves) == (Role.PRIMARY, Role.REPLICA, Role.REPLICA)
    assert group.primary is a and group.replicas == (b, c)
    assert b.waiters is c.waiters is group.replica_waiters
    assert a.waiters is not group.replica_waiters


def test_round_robin_on_ties_least_active_otherwise() -> None:
    group = make_group()
    group.assign("a:1", ["b:2", "c:3"])
    b, c = group.replicas
    picks = [group.pick_replica() for _ in range(4)]
    assert picks in ([b, c, b, c], [c, b, c, b])
    b.active.add(FakeServer())
    assert [group.pick_replica() for _ in range(3)] == [c, c, c]
    c.connecting = 2  # connections being opened count as busy
    assert [group.pick_replica() for _ in range(3)] == [b, b, b]


def test_a_replica_that_refused_a_login_is_picked_only_when_every_one_did() -> None:
    group = make_group()
    group.assign("a:1", ["b:2", "c:3"])
    b, c = group.replicas
    c.active.update((FakeServer(), FakeServer()))  # busier than b, and still preferred to a refusing b
    b.login_refused = (object(), 0.0)
    assert [group.pick_replica() for _ in range(3)] == [c, c, c]
    c.login_refused = (object(), 0.0)
    assert [group.pick_replica() for _ in range(3)] == [b, b, b]  # all refused: the least busy
    b.login_refused = c.login_refused = None
    assert [group.pick_replica() for _ in range(3)] == [b, b, b]


def test_a_free_server_on_any_replica_serves_the_oldest_waiter() -> None:
    group = make_group()
    group.assign("a:1", ["b:2", "c:3"])
    b, c = group.replicas
    sb, sc = FakeServer(), FakeServer()
    b.active.add(sb)
    c.active.add(sc)
    first, second = FakeWaiter("first"), FakeWaiter("second")
    assert b.checkout(first)[0] is None
    assert c.checkout(second)[0] is None
    assert c.checkin(sc) is first  # queued on b, served by c
    assert b.checkin(sb) is second


def test_no_replica_and_no_primary() -> None:
    group = make_group()
    group.assign(None, [])
    assert group.primary is None and group.pick_replica() is None
    assert all(pool.serves is None for pool in group.pools.values())


def test_waiters_for_a_primary_that_stops_being_one_are_handed_back() -> None:
    group = make_group()
    group.assign("a:1", ["b:2", "c:3"])
    a = group.pools["a:1"]
    a.active.add(FakeServer())
    a.active.add(FakeServer())  # full
    w = FakeWaiter("w")
    assert a.checkout(w) == (None, False)
    displaced = group.assign("c:3", ["b:2"])
    assert displaced == [w]
    assert not a.waiters and a.serves is None
    c = group.pools["c:3"]
    assert c.serves is Role.PRIMARY and c.waiters is not group.replica_waiters
