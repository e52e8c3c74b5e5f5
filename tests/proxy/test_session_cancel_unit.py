"""Cancel requests of session-pooling clients, which are told their server's own process ID
(`App.session_process_id`, `App._cancel`): servers on different hosts (a primary and its replica, two
clusters) may have the same process ID, and each client's cancel must still reach its own server.
End to end, on one host: tests/e2e/test_session_mode_fidelity.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from halephant.proxy.app import App


class _Client:
    def __init__(self, number: int, cancel_key: int, server: object) -> None:
        self.number = number
        self.cancel_key = cancel_key
        self.server = server
        self.told_pid = 0

    def cancel_wait(self) -> bool:
        return False


def _app() -> Any:
    app: Any = App.__new__(App)
    app.clients = {}
    app.session_pids = {}
    app._acceptor = app._unix_acceptor = None  # not listening
    app.forwarded = []
    app.spawn = lambda fn, client, server, link, done: app.forwarded.append((client, server))
    return app


def _cancel(app: Any, process_id: int, key: int) -> list[tuple[Any, Any]]:
    app.forwarded.clear()
    App._cancel(app, process_id, key, lambda: None)
    return list(app.forwarded)


def _server(pid: int, host: str) -> SimpleNamespace:
    return SimpleNamespace(backend_pid=pid, link_count=1, host=host, absorb=0, tls_used=None)


def test_two_session_clients_told_the_same_process_id_each_cancel_their_own_query() -> None:
    app = _app()
    on_primary, on_replica = _server(4242, "primary"), _server(4242, "replica")
    a, b = _Client(1, 111, on_primary), _Client(2, 222, on_replica)
    for client in (a, b):
        app.clients[client.number] = client
        assert App.session_process_id(app, client, client.server.backend_pid) == 4242
    assert _cancel(app, 4242, 111) == [(a, on_primary)]
    assert _cancel(app, 4242, 222) == [(b, on_replica)]
    assert _cancel(app, 4242, 333) == []  # nobody's key

    App.client_closed(app, b)
    assert _cancel(app, 4242, 222) == []
    assert _cancel(app, 4242, 111) == [(a, on_primary)]  # still registered after the other one left
    App.client_closed(app, a)
    assert app.session_pids == {} and app.clients == {}
