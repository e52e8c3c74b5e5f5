"""The admin HTTP server's own connection handling, on a real socket: what it holds for a peer that
stops reading."""

from __future__ import annotations

import asyncio
import socket
import types

import pytest

from halephant.admin import http
from halephant.admin.http import AdminServer

BODY = b"x" * (32 << 20)  # well beyond what the kernel buffers of both sides hold


def test_an_answer_the_peer_does_not_read_is_dropped_after_the_read_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Closed gracefully, the transport would keep the connection and the unsent answer for as long as
    # the peer stays connected without reading: a file descriptor and the answer's memory each.
    monkeypatch.setattr(http, "READ_TIMEOUT", 0.3)
    fake = types.SimpleNamespace(
        _respond=lambda head: (200, "text/plain", BODY, "GET"), _send=AdminServer._send
    )

    async def main() -> int:
        server = await asyncio.start_server(lambda r, w: AdminServer._handle(fake, r, w), "127.0.0.1", 0)  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(("127.0.0.1", port))
        peer.sendall(b"GET /clients HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(1.0)  # past the timeout, reading nothing
        peer.setblocking(False)
        received = 0
        loop = asyncio.get_running_loop()
        try:
            while chunk := await asyncio.wait_for(loop.sock_recv(peer, 1 << 20), 5):
                received += len(chunk)
        except ConnectionResetError:
            pass
        finally:
            peer.close()
            server.close()
        return received

    assert asyncio.run(main()) < len(BODY)
