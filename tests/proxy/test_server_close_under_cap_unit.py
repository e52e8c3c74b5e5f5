"""`ServerConnection.close` for a server whose pool has caps across pools (max_db_connections, ...): it
sends Terminate and waits for PostgreSQL to close its side (the backend has exited then) before its
place under the cap is free; a server of a pool without caps is closed at once, as before."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from halephant.pool.caps import DB, Cap
from halephant.pool.pool import Pool
from halephant.protocol import messages as m
from halephant.proxy.server import ServerConnection
from halephant.types import PoolMode, PoolSize, PoolTarget


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.calls: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return "close" in self.calls or "abort" in self.calls

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_server(loop: asyncio.AbstractEventLoop, capped: bool) -> tuple[Any, Cap, list[Any], FakeTransport]:
    target = PoolTarget(
        database="shop", cluster="main", server_database="shop", server_user="app", server_password=None,
        mode=PoolMode.TRANSACTION, reason="test",
    )  # fmt: skip
    pool: Pool[Any, Any] = Pool(target, PoolSize(min=0, max=5), "127.0.0.1", 15432)
    cap = Cap(DB, "shop", "127.0.0.1:15432", 1)
    if capped:
        pool.caps = (cap,)
        cap.pools.append(pool)
    gone: list[Any] = []
    manager = SimpleNamespace(server_gone=gone.append)
    server = ServerConnection(manager, pool, {"user": "app", "database": "shop"}, None, loop)  # type: ignore[arg-type]
    transport = FakeTransport()
    server.transport = transport  # type: ignore[assignment]
    server.login.set_result(None)
    pool.idle.append(server)
    return server, cap, gone, transport


def test_a_closed_server_holds_its_place_under_the_cap_until_postgresql_closes_its_side(
    loop: asyncio.AbstractEventLoop,
) -> None:
    server, cap, gone, transport = make_server(loop, capped=True)
    server.reading_paused = True  # (its client was slow to read): EOF must still reach it
    server.close("evicted")
    assert transport.written == [m.TERMINATE]
    assert transport.calls == ["resume_reading"]  # not closed: its EOF says the backend has exited
    assert server.pool.idle == [] and server in server.pool.lingering
    assert cap.counted() == 1 and cap.room() == 0
    server.connection_lost(None)  # PostgreSQL closed the connection
    assert server.pool.lingering == {}
    assert cap.counted() == 0
    assert gone == [server.pool]  # the pool manager hears of it: held pools may open now


def test_a_server_of_a_pool_without_caps_is_closed_at_once(loop: asyncio.AbstractEventLoop) -> None:
    server, _cap, _gone, transport = make_server(loop, capped=False)
    server.close("idle_timeout")
    assert transport.written == [m.TERMINATE]
    assert transport.calls == ["close"]
    assert server.pool.lingering == {}
