"""Node selection (`halephant.pool.group.PoolGroup`) with fake servers and waiters: least active replica,
round-robin on ties, replicas held by a full cap with no idle server after those that can serve now,
refusing replicas last, one wait queue shared by the replicas, waiters displaced when the primary moves."""

from __future__ import annotations

import random

from test_pool_logic import FakePool, FakeServer, FakeWaiter, make_pool

from halephant.pool.caps import DB, Cap
from halephant.pool.group import PoolGroup, _least_busy
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


def node_cap(pool: FakePool, limit: int, held_by_others: int) -> tuple[Cap, FakePool]:
    """A max_db_connections cap on `pool`'s node, counting it and another user's pool there that holds
    `held_by_others` busy servers (as the pool manager sets them up)."""
    cap = Cap(DB, "shop", pool.key[2], limit)
    cap.wake = lambda cap: None
    other = make_pool(max_=5)
    other.key = (other.key[0], "other", pool.key[2])
    other.active.update(FakeServer() for _ in range(held_by_others))
    for p in (pool, other):
        p.caps = (cap,)
        cap.pools.append(p)
    return cap, other


def test_a_replica_held_by_its_full_cap_is_picked_only_when_no_other_can_serve() -> None:
    group = make_group()
    group.assign("a:1", ["b:2", "c:3"])
    b, c = group.replicas
    c.active.add(FakeServer())  # busier than b: b would be picked, could it serve
    cap_b, other = node_cap(b, limit=1, held_by_others=1)
    assert b.capped_out() and not c.capped_out()
    assert [group.pick_replica() for _ in range(3)] == [c, c, c]
    other.idle.extend(other.active)  # the cap full of another pool's idle servers: b waits for an eviction
    other.active.clear()
    assert b.capped_out()
    assert [group.pick_replica() for _ in range(3)] == [c, c, c]
    cap_b.limit = 2  # room again: the least busy as before
    assert [group.pick_replica() for _ in range(3)] == [b, b, b]
    # full again, by an idle server of b's own: b serves at once with it
    b.connecting += 1
    b.connected(FakeServer())
    assert cap_b.room() == 0 and b.idle and not b.capped_out()
    assert [group.pick_replica() for _ in range(3)] == [b, b, b]


def test_every_replica_held_by_a_full_cap_still_gives_one_the_least_busy() -> None:
    group = make_group()
    group.assign("a:1", ["b:2", "c:3"])
    b, c = group.replicas
    c.active.add(FakeServer())
    node_cap(b, limit=1, held_by_others=1)
    node_cap(c, limit=1, held_by_others=0)  # full by c's own busy server
    assert b.capped_out() and c.capped_out()
    assert [group.pick_replica() for _ in range(3)] == [b, b, b]


def test_a_replica_that_refused_a_login_still_comes_after_one_held_by_a_cap() -> None:
    group = make_group()
    group.assign("a:1", ["b:2", "c:3"])
    b, c = group.replicas
    node_cap(c, limit=1, held_by_others=1)
    b.login_refused = (object(), 0.0)
    assert [group.pick_replica() for _ in range(3)] == [c, c, c]
    c.login_refused = (object(), 0.0)  # both refused: the least busy, the cap aside
    c.active.add(FakeServer())
    assert [group.pick_replica() for _ in range(3)] == [b, b, b]


def test_with_every_replica_full_a_waiter_is_served_by_whichever_frees_first() -> None:
    group = make_group()
    group.assign("a:1", ["b:2", "c:3"])
    b, c = group.replicas
    sc = FakeServer()
    c.active.add(sc)
    cap_b, other_b = node_cap(b, limit=1, held_by_others=1)
    node_cap(c, limit=1, held_by_others=0)
    first, second = FakeWaiter("first"), FakeWaiter("second")
    for waiter in (first, second):
        pool = group.pick_replica()
        assert pool is b
        assert pool.checkout(waiter) == (None, False)  # held by b's cap, queued for both replicas
    assert list(cap_b.held) == [b]
    assert c.checkin(sc) is first  # c's server comes back first: it serves the oldest
    (gone,) = other_b.active
    other_b.discard(gone)  # b's place under its cap is free next
    assert cap_b.serve_held() == [b]
    assert b.connected(FakeServer()) is second
    assert not group.replica_waiters and not cap_b.held


def test_asking_only_the_winner_about_caps_picks_as_weighing_every_replica_would() -> None:
    rng = random.Random(7)
    for _ in range(500):
        group: PoolGroup[FakeServer, FakeWaiter] = PoolGroup(make_pool().info.target)
        for i in range(rng.randint(2, 4)):
            pool = make_pool(max_=3)
            pool.key = (pool.key[0], pool.key[1], f"r{i}:1")
            group.pools[pool.key[2]] = pool
            pool.active.update(FakeServer() for _ in range(rng.randint(0, 2)))
            pool.connecting = rng.randint(0, 1)
            if rng.random() < 0.5:
                node_cap(pool, limit=rng.randint(1, 4), held_by_others=rng.randint(0, 2))
                if rng.random() < 0.3:
                    pool.idle.append(FakeServer())
            if rng.random() < 0.2:
                pool.login_refused = (object(), 0.0)
        group.assign(None, list(group.pools))
        start = (group._next + 1) % len(group.replicas)
        assert group.pick_replica() is _least_busy(group.replicas, start, caps=True)
