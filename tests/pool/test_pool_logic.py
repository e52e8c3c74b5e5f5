"""Pool decisions (`halephant.pool.pool.Pool`) with fake servers and waiters: who gets which server, who
waits and in which order, when to open and what to close. No I/O, no event loop."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from halephant.pool.pool import Pool
from halephant.types import PoolMode, PoolSize, PoolTarget

_ids = itertools.count(1)


@dataclass(eq=False)
class FakeServer:
    created_at: float = 0.0
    idle_since: float = 0.0
    closed: list[str] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_ids))

    def close(self, reason: str) -> None:
        self.closed.append(reason)

    def __repr__(self) -> str:
        return f"<server {self.id}>"


@dataclass(eq=False)
class FakeWaiter:
    name: str
    servers: list[FakeServer] = field(default_factory=list)

    def attach_server(self, server: FakeServer) -> None:
        self.servers.append(server)

    def __repr__(self) -> str:
        return f"<waiter {self.name}>"


FakePool = Pool[FakeServer, FakeWaiter]


def make_pool(max_: int = 3, min_: int = 0) -> FakePool:
    target = PoolTarget(
        database="shop",
        cluster="main",
        server_database="shop_db",
        server_user="myapp",
        server_password=None,
        mode=PoolMode.TRANSACTION,
        reason="test",
    )
    return FakePool(target, PoolSize(min=min_, max=max_), "127.0.0.1", 15432)


def fill_idle(
    pool: FakePool, n: int, *, created_at: float = 0.0, idle_since: float = 0.0
) -> list[FakeServer]:
    """Put n servers in the pool the way the proxy does: open for a waiter, log in, check in."""
    servers = []
    for _ in range(n):
        pool.connecting += 1
        server = FakeServer(created_at=created_at)
        assert pool.connected(server) is None
        server.idle_since = idle_since
        servers.append(server)
    return servers


# --- checkout / checkin ------------------------------------------------------------------------------


def test_checkout_from_idle_is_lifo() -> None:
    pool = make_pool()
    a, b, c = fill_idle(pool, 3)
    # the most recently used server is warmest (caches, prepared plans): hand it out first
    assert pool.checkout(FakeWaiter("w1")) == (c, False)
    assert pool.checkout(FakeWaiter("w2")) == (b, False)
    assert pool.active == {c, b}
    assert pool.idle == [a]
    pool.checkin(c)
    assert pool.checkout(FakeWaiter("w3")) == (c, False)


def test_checkout_queues_and_opens_up_to_max() -> None:
    pool = make_pool(max_=2)
    w1, w2, w3 = FakeWaiter("1"), FakeWaiter("2"), FakeWaiter("3")
    assert pool.checkout(w1) == (None, True)
    assert pool.checkout(w2) == (None, True)
    assert pool.connecting == 2
    assert pool.checkout(w3) == (None, False)  # total == max
    assert list(pool.waiters) == [w1, w2, w3]
    assert pool.total == 2


def test_checkout_opens_only_while_waiters_exceed_connecting() -> None:
    pool = make_pool(max_=5)
    (s,) = fill_idle(pool, 1)
    assert pool.checkout(FakeWaiter("holder")) == (s, False)
    w1 = FakeWaiter("1")
    assert pool.checkout(w1) == (None, True)
    pool.cancel_wait(w1)  # the waiter left; its connection is still coming
    assert pool.checkout(FakeWaiter("2")) == (None, False)  # 1 waiter, 1 connecting: nothing more
    assert pool.checkout(FakeWaiter("3")) == (None, True)
    assert pool.connecting == 2


def test_checkin_hands_to_oldest_waiter() -> None:
    pool = make_pool(max_=1)
    (s,) = fill_idle(pool, 1)
    pool.checkout(FakeWaiter("holder"))
    w1, w2 = FakeWaiter("1"), FakeWaiter("2")
    assert pool.checkout(w1) == (None, False)
    assert pool.checkout(w2) == (None, False)
    assert pool.checkin(s) is w1
    assert pool.active == {s}
    assert pool.idle == []
    assert pool.checkin(s) is w2
    assert pool.checkin(s) is None
    assert pool.idle == [s]
    assert pool.active == set()


def test_checkin_stamps_idle_since(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make_pool()
    (s,) = fill_idle(pool, 1)
    pool.checkout(FakeWaiter("w"))
    monkeypatch.setattr("halephant.pool.pool._monotonic", lambda: 1234.5)
    pool.checkin(s)
    assert s.idle_since == 1234.5


def test_cancel_wait_unknown_waiter_is_harmless() -> None:
    pool = make_pool()
    pool.cancel_wait(FakeWaiter("never queued"))
    assert not pool.waiters


# --- connected / connect_failed ----------------------------------------------------------------------


def test_connected_serves_first_waiter() -> None:
    pool = make_pool()
    w1, w2 = FakeWaiter("1"), FakeWaiter("2")
    pool.checkout(w1)
    pool.checkout(w2)
    s = FakeServer()
    assert pool.connected(s) is w1
    assert (pool.connecting, pool.opened_count, pool.active) == (1, 1, {s})
    s2 = FakeServer()
    assert pool.connected(s2) is w2
    assert (pool.connecting, pool.opened_count, pool.active) == (0, 2, {s, s2})


def test_connected_without_waiter_goes_idle() -> None:
    pool = make_pool(min_=1)
    assert pool.missing_for_min() == 1
    s = FakeServer()
    assert pool.connected(s) is None
    assert pool.idle == [s]
    assert pool.connecting == 0


def test_connect_failed_fails_waiters_when_nothing_can_serve_them() -> None:
    pool = make_pool()
    w1, w2 = FakeWaiter("1"), FakeWaiter("2")
    pool.checkout(w1)
    pool.checkout(w2)
    assert pool.connecting == 2
    assert pool.connect_failed() == []  # another connection is still coming
    assert pool.connect_failed() == [w1, w2]  # oldest first
    assert not pool.waiters
    assert pool.connecting == 0


def test_connect_failed_keeps_waiters_while_a_server_is_active() -> None:
    pool = make_pool(max_=2)
    (s,) = fill_idle(pool, 1)
    pool.checkout(FakeWaiter("holder"))
    w = FakeWaiter("w")
    assert pool.checkout(w) == (None, True)
    assert pool.connect_failed() == []  # `s` comes back at its holder's next ReadyForQuery
    assert list(pool.waiters) == [w]
    assert pool.checkin(s) is w


def test_connect_failed_without_waiters() -> None:
    pool = make_pool(min_=2)
    assert pool.missing_for_min() == 2
    assert pool.connect_failed() == []
    assert pool.connect_failed() == []
    assert pool.connecting == 0


# --- discard -----------------------------------------------------------------------------------------


def test_discard_active_and_idle() -> None:
    pool = make_pool()
    a, b = fill_idle(pool, 2)
    pool.checkout(FakeWaiter("w"))  # takes b
    pool.discard(b)
    pool.discard(a)
    assert (pool.active, pool.idle, pool.closed_count) == (set(), [], 2)
    pool.discard(a)  # already gone: not counted twice
    assert pool.closed_count == 2


def test_discard_then_open_for_waiters() -> None:
    pool = make_pool(max_=1)
    (s,) = fill_idle(pool, 1)
    pool.checkout(FakeWaiter("holder"))
    w = FakeWaiter("w")
    assert pool.checkout(w) == (None, False)
    pool.discard(s)  # the server died under its holder
    assert pool.should_open_for_waiters()
    assert pool.connecting == 1
    assert not pool.should_open_for_waiters()  # one is already coming for the one waiter
    assert pool.connected(FakeServer()) is w


def test_should_open_for_waiters_without_waiters() -> None:
    pool = make_pool()
    assert not pool.should_open_for_waiters()
    assert pool.connecting == 0


# --- expiry and min_pool_size ------------------------------------------------------------------------


def test_expired_idle_timeout_above_min() -> None:
    pool = make_pool(max_=5, min_=0)
    old = fill_idle(pool, 2, idle_since=0.0)
    fresh = fill_idle(pool, 1, idle_since=95.0)
    out = pool.expired(now=100.0, idle_timeout=10.0, max_lifetime=3600.0)
    assert out == old
    assert pool.idle == fresh
    assert pool.closed_count == 2


def test_expired_idle_timeout_is_strict() -> None:
    pool = make_pool()
    fill_idle(pool, 1, idle_since=90.0)
    assert pool.expired(now=100.0, idle_timeout=10.0, max_lifetime=3600.0) == []


def test_expired_never_below_min() -> None:
    pool = make_pool(max_=5, min_=2)
    fill_idle(pool, 2, idle_since=0.0)
    assert pool.expired(now=1000.0, idle_timeout=10.0, max_lifetime=3600.0) == []
    assert len(pool.idle) == 2


def test_expired_counts_active_servers_towards_min() -> None:
    pool = make_pool(max_=5, min_=2)
    a, b, _c = fill_idle(pool, 3, idle_since=0.0)
    pool.checkout(FakeWaiter("w"))  # c is active, a and b idle
    assert pool.expired(now=1000.0, idle_timeout=10.0, max_lifetime=3600.0) == [a]
    assert pool.idle == [b]


def test_expired_closes_down_to_min() -> None:
    pool = make_pool(max_=10, min_=2)
    servers = fill_idle(pool, 6, idle_since=0.0)
    out = pool.expired(now=1000.0, idle_timeout=10.0, max_lifetime=3600.0)
    assert out == servers[:4]  # the longest idle go first
    assert len(pool.idle) == 2


def test_expired_max_lifetime_ignores_min() -> None:
    pool = make_pool(max_=5, min_=3)
    old = fill_idle(pool, 2, created_at=0.0, idle_since=99.0)
    young = fill_idle(pool, 1, created_at=90.0, idle_since=99.0)
    out = pool.expired(now=100.0, idle_timeout=300.0, max_lifetime=50.0)
    assert out == old
    assert pool.idle == young
    # and min_pool_size is refilled afterwards
    assert pool.missing_for_min() == 2


def test_expired_leaves_active_servers_alone() -> None:
    pool = make_pool()
    (s,) = fill_idle(pool, 1, created_at=0.0, idle_since=0.0)
    pool.checkout(FakeWaiter("w"))
    assert pool.expired(now=1e6, idle_timeout=1.0, max_lifetime=1.0) == []
    assert pool.active == {s}


def test_expired_does_not_close_them() -> None:
    # the caller closes (I/O); the pool only decides
    pool = make_pool()
    (s,) = fill_idle(pool, 1, created_at=0.0)
    assert pool.expired(now=1e6, idle_timeout=1.0, max_lifetime=1.0) == [s]
    assert s.closed == []
    pool.discard(s)  # the server's close path reports it again: not counted twice
    assert pool.closed_count == 1


def test_missing_for_min() -> None:
    pool = make_pool(max_=5, min_=3)
    assert pool.missing_for_min() == 3
    assert pool.connecting == 3
    assert pool.missing_for_min() == 0  # connecting ones count
    pool.connected(FakeServer())
    pool.connect_failed()
    assert pool.missing_for_min() == 1


def test_missing_for_min_at_most_and_a_login_clears_the_failed_open() -> None:
    pool = make_pool(max_=5, min_=3)
    assert pool.missing_for_min(at_most=1) == 1
    assert pool.connecting == 1
    pool.failed_open_at = 12.0  # what the pool manager sets when an open fails
    pool.connected(FakeServer())
    assert pool.failed_open_at is None  # one logged in: the rest is opened at once again
    assert pool.missing_for_min() == 2


# --- description -------------------------------------------------------------------------------------


def test_repr_is_one_readable_line() -> None:
    pool = make_pool(max_=4)
    fill_idle(pool, 2)
    pool.checkout(FakeWaiter("a"))
    text = repr(pool)
    assert "\n" not in text
    assert text == "<Pool shop/myapp@127.0.0.1:15432 sv_active=1 sv_idle=1 connecting=0 cl_waiting=0 max=4>"
    assert pool.name == "shop/myapp@127.0.0.1:15432"
    assert pool.key == ("shop", "myapp", "127.0.0.1:15432")


# --- any sequence of events --------------------------------------------------------------------------


class PoolMachine(RuleBasedStateMachine):
    """Drives a pool the way the proxy's manager does and checks its books after every step."""

    waiting = Bundle("waiting")
    holders = Bundle("holders")

    def __init__(self) -> None:
        super().__init__()
        self.pool = make_pool(max_=3, min_=1)
        self.clock = 0.0
        self.served: set[FakeWaiter] = set()
        self.failed: set[FakeWaiter] = set()
        self.cancelled: set[FakeWaiter] = set()
        self.held: dict[FakeServer, FakeWaiter] = {}

    def _serve(self, waiter: FakeWaiter | None, server: FakeServer) -> None:
        if waiter is not None:
            assert waiter not in self.served
            waiter.attach_server(server)
            self.served.add(waiter)
            self.held[server] = waiter

    @rule(target=waiting)
    def checkout(self) -> FakeWaiter:
        w = FakeWaiter(str(next(_ids)))
        server, _open = self.pool.checkout(w)
        if server is not None:
            self._serve(w, server)
        return w

    @precondition(lambda self: self.pool.connecting > 0)
    @rule(ok=st.booleans())
    def connection_done(self, ok: bool) -> None:
        if ok:
            s = FakeServer(created_at=self.clock)
            self._serve(self.pool.connected(s), s)
        else:
            self.failed.update(self.pool.connect_failed())

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def checkin(self, data: st.DataObject) -> None:
        server = data.draw(st.sampled_from(sorted(self.held, key=lambda s: s.id)))
        del self.held[server]
        self._serve(self.pool.checkin(server), server)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def server_lost(self, data: st.DataObject) -> None:
        server = data.draw(st.sampled_from(sorted(self.held, key=lambda s: s.id)))
        del self.held[server]
        self.pool.discard(server)
        self.pool.should_open_for_waiters()

    @rule(w=consumes(waiting))
    def cancel(self, w: FakeWaiter) -> None:
        if w in self.pool.waiters:
            self.cancelled.add(w)
        self.pool.cancel_wait(w)

    @rule(dt=st.sampled_from([1.0, 30.0, 600.0]))
    def tick(self, dt: float) -> None:
        self.clock += dt
        for s in self.pool.expired(self.clock, idle_timeout=60.0, max_lifetime=1000.0):
            assert s not in self.held
        self.pool.missing_for_min()

    @invariant()
    def books_balance(self) -> None:
        pool = self.pool
        assert pool.connecting >= 0
        assert pool.total <= pool.info.size.max
        assert not (set(pool.idle) & pool.active)
        assert len(set(pool.idle)) == len(pool.idle)
        assert pool.active == set(self.held)
        # nobody waits while a server sits idle
        assert not (pool.idle and pool.waiters)
        # every waiter can still be served: a connection is coming or an active server will come back
        if pool.waiters:
            assert pool.connecting > 0 or pool.active
        for w in pool.waiters:
            assert w not in self.served and w not in self.failed and w not in self.cancelled


PoolMachine.TestCase.settings = settings(
    derandomize=True, database=None, max_examples=150, stateful_step_count=40, deadline=None
)
test_pool_state_machine = PoolMachine.TestCase
