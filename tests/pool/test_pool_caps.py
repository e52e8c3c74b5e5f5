"""Caps across pools (`halephant.pool.caps.Cap`: max_db_connections, max_user_connections) with fake
servers and waiters: a full cap holds a pool below its own size, counts a closed server until it is
gone, hands places to held pools in turn, evicts idle servers of other pools for them, reclaims
servers at check-in, and is never exceeded by the reserve pool or min_pool_size. No I/O, no event loop."""

from __future__ import annotations

import random

import pytest
from test_pool_logic import FakePool, FakeServer, FakeWaiter, fill_idle, make_pool

from halephant.pool.caps import DB, USER, Cap
from halephant.types import PoolSize


def capped(cap: Cap, *names: str, max_: int = 5) -> list[FakePool]:
    """Pools of users `names` (pool_size `max_`) counted by `cap`, as the pool manager sets them up."""
    pools = []
    for name in names:
        pool = make_pool(max_=max_)
        pool.key = (pool.key[0], name, pool.key[2])
        pool.caps = (*pool.caps, cap)
        cap.pools.append(pool)
        pools.append(pool)
    return pools


def db_cap(limit: int = 2) -> tuple[Cap, list[Cap]]:
    """A max_db_connections cap, and the list its `wake` records into."""
    cap = Cap(DB, "shop", "127.0.0.1:15432", limit)
    woken: list[Cap] = []
    cap.wake = woken.append
    return cap, woken


def open_for(pool: FakePool, waiter: FakeWaiter) -> FakeServer:
    """`waiter` queues, a connection is opened for it and handed to it."""
    assert pool.checkout(waiter) == (None, True)
    server = FakeServer()
    assert pool.connected(server) is waiter
    return server


def close(pool: FakePool, server: FakeServer) -> None:
    """What `ServerConnection.close` does with the pool: forget it, keep it counted until it is gone."""
    pool.discard(server)
    assert pool.linger(server)


def test_a_full_cap_holds_a_pool_below_its_own_size() -> None:
    cap, woken = db_cap(limit=2)
    a, b = capped(cap, "a", "b")
    open_for(a, FakeWaiter("a1"))
    open_for(a, FakeWaiter("a2"))
    assert cap.counted() == 2
    w = FakeWaiter("b1")
    assert b.checkout(w) == (None, False)  # b holds nothing, yet opens nothing: the database is full
    assert list(cap.held) == [b] and woken == [cap]
    assert b.connecting == 0 and list(b.waiters) == [w]
    assert b.held_by() is cap
    assert cap.describe() == 'max_db_connections (2) of database "shop" on 127.0.0.1:15432'
    b.checkout(FakeWaiter("b2"))
    assert list(cap.held) == [b]  # held once, in its place


def test_a_closed_server_counts_until_it_is_gone_then_the_held_pool_opens() -> None:
    cap, _woken = db_cap(limit=2)
    a, b = capped(cap, "a", "b")
    s1 = open_for(a, FakeWaiter("a1"))
    open_for(a, FakeWaiter("a2"))
    w = FakeWaiter("b1")
    b.checkout(w)
    close(a, s1)
    # PostgreSQL still has the backend until it closes its side: no new login yet
    assert a.total == 1 and cap.counted() == 2
    assert cap.serve_held() == []
    a.discard(s1)  # connection_lost: gone
    assert cap.counted() == 1
    assert cap.serve_held() == [b]
    assert b.connecting == 1 and not cap.held
    server = FakeServer()
    assert b.connected(server) is w


def test_a_pool_without_caps_keeps_nothing_of_a_closed_server() -> None:
    pool = make_pool()
    (s,) = fill_idle(pool, 1)
    pool.discard(s)
    assert not pool.linger(s)
    assert pool.lingering == {}


def test_held_pools_take_turns() -> None:
    cap, _woken = db_cap(limit=2)
    a, b, c = capped(cap, "a", "b", "c")
    s1, s2 = open_for(a, FakeWaiter("a1")), open_for(a, FakeWaiter("a2"))
    for pool, n in ((b, 2), (c, 2)):
        for i in range(n):
            pool.checkout(FakeWaiter(f"{pool.key[1]}{i}"))
    assert list(cap.held) == [b, c]
    for s in (s1, s2):
        close(a, s)
        a.discard(s)
    assert cap.serve_held() == [b, c]  # one each, the longest held first, not both to b
    assert (b.connecting, c.connecting) == (1, 1)
    assert list(cap.held) == [b, c]  # both want one more, in turn


def test_held_pools_that_want_nothing_now_or_are_refused_logins_leave_the_line() -> None:
    cap, _woken = db_cap(limit=1)
    a, b, c = capped(cap, "a", "b", "c")
    s = open_for(a, FakeWaiter("a1"))
    gave_up = FakeWaiter("b1")
    b.checkout(gave_up)
    c.checkout(FakeWaiter("c1"))
    assert list(cap.held) == [b, c]
    b.cancel_wait(gave_up)
    c.login_refused = (object(), 1e9)  # server_login_retry: the tick tries it again, not every release
    close(a, s)
    a.discard(s)
    assert cap.serve_held() == []
    assert not cap.held and (b.connecting, c.connecting) == (0, 0)


def test_idle_servers_of_other_pools_are_evicted_for_a_held_pool() -> None:
    cap, _woken = db_cap(limit=2)
    a, b = capped(cap, "a", "b")
    old, recent = fill_idle(a, 2)
    old.idle_since, recent.idle_since = 1.0, 2.0
    b.checkout(FakeWaiter("b1"))
    assert list(cap.held) == [b]
    assert cap.evict_idle() == [old]  # one is wanted: the least recently used goes
    assert a.idle == [recent] and a.closed_count == 1
    a.linger(old)
    assert cap.evict_idle() == []  # the one closing makes the room: no second eviction
    a.discard(old)
    assert cap.serve_held() == [b]


def test_a_checked_in_server_goes_to_a_held_pool_that_needs_it_more() -> None:
    cap, _woken = db_cap(limit=2)
    a, b = capped(cap, "a", "b")
    s1, s2 = open_for(a, FakeWaiter("a1")), open_for(a, FakeWaiter("a2"))
    b.checkout(FakeWaiter("b1"))
    # a has no waiters: a server coming back is closed so that b opens one
    assert "another pool waits for a place under max_db_connections (2)" in cap.reclaim(a)
    a.checkout(FakeWaiter("a3"))  # now a has a waiter too (and is held), but holds 2 against b's 0
    assert cap.reclaim(a) != ""
    close(a, s1)
    assert cap.reclaim(a) == ""  # s1 closing gives b its place: nothing more to reclaim
    a.discard(s1)
    assert cap.serve_held() == [b]
    b.connected(FakeServer())
    b.checkout(FakeWaiter("b2"))  # b wants a second one: held again, after a (held by its a3)
    assert list(cap.held) == [a, b]
    assert cap.reclaim(a) == ""  # 1 and 1, and a has a waiter: a keeps s2
    assert s2 in a.active


def test_a_lowered_cap_trims_idle_servers_and_reclaims_busy_ones() -> None:
    cap, _woken = db_cap(limit=4)
    a, b = capped(cap, "a", "b")
    idle = fill_idle(a, 2)
    busy = open_for(b, FakeWaiter("b1")), open_for(b, FakeWaiter("b2"))
    cap.limit = 1
    assert sorted(s.id for s in cap.trim()) == sorted(s.id for s in idle)
    assert a.idle == [] and cap.open_count() == 2
    assert cap.reclaim(b) == 'above max_db_connections (1) of database "shop" on 127.0.0.1:15432'
    b.discard(busy[0])
    assert cap.reclaim(b) == ""  # down to the cap: the other stays
    assert cap.trim() == []


def test_reserve_and_min_pool_size_never_exceed_the_cap() -> None:
    cap, _woken = db_cap(limit=3)
    (a,) = capped(cap, "a", max_=2)
    a.info = type(a.info)(target=a.info.target, size=PoolSize(min=2, max=2, reserve=3))
    assert a.missing_for_min() == 2
    (b,) = capped(cap, "b", max_=2)
    b.info = type(b.info)(target=b.info.target, size=PoolSize(min=2, max=2))
    assert b.missing_for_min() == 1  # only one place left under the cap
    assert b.missing_for_min() == 0
    for server in (FakeServer(), FakeServer()):
        a.connected(server)
    a.checkout(FakeWaiter("a1"))
    a.checkout(FakeWaiter("a2"))
    a.checkout(FakeWaiter("a3"))  # a is full by its size: its reserve is what could serve it
    assert not a.open_reserve()  # 3 of 3 counted: none beyond the cap
    assert not cap.held  # (not held as for a connection below its size: the waiter sweep evicts for it)
    assert a.reserve_held_by() == [cap] and cap.evict_for_reserve() == []  # b's place is not idle
    b.connect_failed()
    assert a.open_reserve()  # room again
    assert cap.counted() == 3


def test_a_pool_that_needs_its_reserve_under_a_full_cap_gets_an_idle_server_closed_for_it() -> None:
    cap, _woken = db_cap(limit=3)
    a, b, c = capped(cap, "a", "b", "c", max_=1)
    a.info = type(a.info)(target=a.info.target, size=PoolSize(min=0, max=1, reserve=1))
    (idle_b,) = fill_idle(b, 1, idle_since=1.0)
    (idle_c,) = fill_idle(c, 1, idle_since=2.0)
    open_for(a, FakeWaiter("a1"))  # a at its size, busy; b and c hold the other places, idle
    assert a.checkout(FakeWaiter("a2")) == (None, False)
    assert not cap.held and a.held_by() is None  # full by its own size: only its reserve can serve
    assert not a.open_reserve()
    assert a.reserve_held_by() == [cap]
    assert cap.evict_for_reserve() == [idle_b]  # the least recently used
    assert b.linger(idle_b) and cap.room() == 0  # counted until PostgreSQL lets it go
    assert cap.evict_for_reserve() == []  # the one closing makes room enough: c keeps its server
    assert not a.open_reserve()
    b.discard(idle_b)  # gone
    assert a.open_reserve() and cap.counted() == 3
    assert a.reserve_held_by() == []  # one connection opening for the one waiter: nothing more wanted
    assert c.idle == [idle_c]


def test_a_reserve_gets_a_place_besides_those_held_pools_want() -> None:
    cap, _woken = db_cap(limit=3)
    a, b = capped(cap, "a", "b", max_=1)
    (c,) = capped(cap, "c", max_=2)
    a.info = type(a.info)(target=a.info.target, size=PoolSize(min=0, max=1, reserve=1))
    idle_c = fill_idle(c, 2)
    open_for(a, FakeWaiter("a1"))
    a.checkout(FakeWaiter("a2"))
    b.checkout(FakeWaiter("b1"))  # below its size: held (`evict_idle` makes room for it)
    assert list(cap.held) == [b] and a.reserve_held_by() == [cap] and b.reserve_held_by() == []
    assert cap.evict_for_reserve() == idle_c  # one for b's place, one for a's reserve
    assert cap.evict_for_reserve() == [] and cap.evict_idle() == []


def test_a_pool_of_two_caps_is_held_by_each_that_is_full() -> None:
    db, _ = db_cap(limit=1)
    user = Cap(USER, "myapp", "127.0.0.1:15432", 1)
    user.wake = lambda cap: None
    (a,) = capped(db, "a")
    a.caps = (db, user)
    user.pools.append(a)
    other = make_pool()  # another database, same role: counted by the user cap only
    other.caps = (user,)
    user.pools.append(other)
    open_for(other, FakeWaiter("o1"))
    a.checkout(FakeWaiter("a1"))
    assert list(user.held) == [a] and not db.held
    assert a.held_by() is user
    assert 'max_user_connections (1) of user "myapp"' in user.describe()


class Traffic:
    """Random traffic from three users' pools under one cap, with the pool manager's part played as it
    plays it: a server checked in is closed when a cap reclaims it, and held pools get a look whenever
    a server is gone (`PoolManager._relieve`)."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.cap, _woken = db_cap(self.rnd.randint(1, 4))
        self.pools = capped(self.cap, "a", "b", "c", max_=self.rnd.randint(1, 5))
        self.owner: dict[FakeServer, FakePool] = {}
        self.holding: list[FakeServer] = []  # lent to a waiter
        self.opening: list[FakePool] = []
        self.closing: list[FakeServer] = []

    def connect_one(self, i: int) -> None:
        pool = self.opening.pop(i)
        server = FakeServer()
        self.owner[server] = pool
        if pool.connected(server) is not None:
            self.holding.append(server)

    def check_in(self, server: FakeServer) -> None:
        pool = self.owner[server]
        if any(cap.reclaim(pool) for cap in pool.caps):
            pool.discard(server)
            pool.linger(server)
            self.closing.append(server)
            if pool.should_open_for_waiters():
                self.opening.append(pool)
        elif pool.checkin(server) is not None:
            self.holding.append(server)

    def gone(self, server: FakeServer) -> None:
        self.owner[server].discard(server)
        self.opening.extend(self.cap.serve_held())
        for evicted in self.cap.evict_idle():
            self.owner[evicted].linger(evicted)
            self.closing.append(evicted)

    def step(self, n: int) -> None:
        rnd = self.rnd
        action = rnd.random()
        if action < 0.4:
            pool = rnd.choice(self.pools)
            server, open_one = pool.checkout(FakeWaiter(str(n)))
            if server is not None:
                self.holding.append(server)
            elif open_one:
                self.opening.append(pool)
        elif action < 0.6 and self.opening:
            self.connect_one(rnd.randrange(len(self.opening)))
        elif action < 0.85 and self.holding:
            self.check_in(self.holding.pop(rnd.randrange(len(self.holding))))
        elif self.closing:
            self.gone(self.closing.pop(rnd.randrange(len(self.closing))))

    def seen_by_postgresql(self) -> int:
        return sum(p.total for p in self.pools) + len(self.closing)

    def settle(self) -> bool:
        """One step of the clients having stopped: False once nothing is left in flight."""
        if self.opening:
            self.connect_one(0)
        elif self.holding:
            self.check_in(self.holding.pop(0))
        elif self.closing:
            self.gone(self.closing.pop(0))
        else:
            return False
        return True


@pytest.mark.parametrize("seed", range(0, 200, 25))
def test_the_cap_is_never_exceeded_and_every_waiter_is_served(seed: int) -> None:
    """At no step does PostgreSQL see more connections than the cap (open, opening, or closed but not
    gone yet), and once the clients stop coming, every waiter has had a server (no pool starves behind
    another's servers)."""
    for run in range(seed, seed + 25):
        traffic = Traffic(run)
        cap = traffic.cap
        for n in range(300):
            traffic.step(n)
            assert traffic.seen_by_postgresql() <= cap.limit, (run, n)
        for n in range(10_000):
            if not traffic.settle():
                break
            assert traffic.seen_by_postgresql() <= cap.limit, (run, n)
        assert not any(p.waiters for p in traffic.pools), (run, [len(p.waiters) for p in traffic.pools], cap)


def test_cap_in_the_way_is_the_cap_a_client_waiting_for_the_reserve_in_vain_is_told_of() -> None:
    cap, _woken = db_cap(limit=2)
    a, b = capped(cap, "a", "b", max_=1)
    a.info = type(a.info)(target=a.info.target, size=PoolSize(min=0, max=1, reserve=1))
    assert a.cap_in_the_way() is None  # below its size, and the cap has room
    open_for(a, FakeWaiter("a1"))
    assert a.cap_in_the_way() is None  # at its size, but the cap has room for its reserve
    open_for(b, FakeWaiter("b1"))
    # (asked once the waiter that timed out has left the queue: no waiter needed)
    assert a.cap_in_the_way() is cap and a.held_by() is None
    a.connecting += 1  # its reserve connection opening: no reserve left to hold up
    assert a.cap_in_the_way() is None
