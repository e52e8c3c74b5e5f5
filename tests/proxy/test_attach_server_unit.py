"""`ClientConnection.attach_server`, the pool handing a waiting client its server: a client that has a
server already (queued twice, which is a bug) gives the new one back rather than cross the two streams."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from halephant.proxy.client import READY, ClientConnection


class _Client:
    def __init__(self, server: Any) -> None:
        self.state = READY
        self.server = server
        self.waited: list[float] = []
        self.waiting_pool = SimpleNamespace(stats=SimpleNamespace(waited=self.waited.append))
        self.wait_started = 1.0
        self.checked_in: list[Any] = []
        manager = SimpleNamespace(checkin=self.checked_in.append)
        self.app = SimpleNamespace(manager=manager, loop=SimpleNamespace(time=lambda: 3.0))

    def __repr__(self) -> str:
        return "<client>"


def test_a_client_with_a_server_gives_a_second_one_back() -> None:
    first, second = object(), object()
    client = _Client(first)
    ClientConnection.attach_server(client, second)  # type: ignore[arg-type]
    assert client.server is first
    assert client.checked_in == [second]
    assert client.waiting_pool is None and client.waited == [2.0]
