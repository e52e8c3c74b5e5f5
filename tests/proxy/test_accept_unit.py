"""`halephant.proxy.accept.Acceptor` on a real listening socket whose accept() is made to fail as it does
when the process is out of file descriptors: how often that is logged, and that accepting comes back."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

import pytest

from halephant.proxy import accept
from halephant.proxy.accept import Acceptor


class _Starved:
    """A listening socket whose accept() fails with EMFILE while `starved` is set."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.starved = True
        self.attempts = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        self.attempts += 1
        if self.starved:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()


class _Protocol(asyncio.Protocol):
    made: list[asyncio.BaseTransport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


def test_failed_accepts_are_logged_sparingly_with_a_count_and_accepting_resumes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accept, "RETRY_SECONDS", 0.02)
    monkeypatch.setattr(accept, "LOG_EVERY_SECONDS", 0.25)
    caplog.set_level(logging.INFO, logger="halephant")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listening:
            listening.setblocking(False)
            starved = _Starved(listening)
            pending: set[asyncio.Task[Any]] = set()
            acceptor = Acceptor(loop, starved, _Protocol, "test:1", pending)  # type: ignore[arg-type]
            acceptor.start()
            client = socket.create_connection(listening.getsockname())
            try:
                await asyncio.sleep(0.6)
                assert starved.attempts >= 10  # retried all along, not given up
                assert not _Protocol.made
                starved.starved = False
                await asyncio.sleep(0.1)
                assert len(_Protocol.made) == 1  # the connection that waited in the queue
                assert acceptor.failures == 0
            finally:
                acceptor.close()
                client.close()
                for transport in _Protocol.made:
                    transport.close()

    asyncio.run(main())
    failed = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
    assert 2 <= len(failed) <= 4, failed  # one at once, then one per LOG_EVERY_SECONDS
    assert "Too many open files" in failed[0] and "ulimit -n" in failed[0]
    assert "more failed attempt(s) since the last message" in failed[1]
    again = [r.getMessage() for r in caplog.records if "again" in r.getMessage()]
    assert len(again) == 1 and "accepting connections on test:1 again" in again[0], again
