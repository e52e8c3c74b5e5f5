"""The HTTP admin API on `admin.listen`: /health, /ready, JSON state and Prometheus /metrics.

A deliberately small HTTP/1.1 server on asyncio streams, in the proxy's own event loop: GET only, one
request per connection (`Connection: close`), bounded request size and read time, so a slow or hostile
scraper cannot hold anything the proxy needs. Every answer is built from data already in memory.

If the address is taken (e.g. by the previous process during an online restart), binding is retried
every second: the proxy keeps serving meanwhile. Connections are accepted as the client listener's are
(`halephant.proxy.accept`), not by the event loop's own server: out of file descriptors, uvloop's would
accept each waiting request and close it at once, logging nothing; here a request waits in the listen
queue until a descriptor is free, and the shortage is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import anyio

from halephant.admin import metrics, snapshot
from halephant.proxy.accept import Acceptor

if TYPE_CHECKING:
    from halephant.config.schema import HostPort
    from halephant.proxy.app import App

log = logging.getLogger("halephant.admin")

MAX_REQUEST = 16 * 1024
READ_TIMEOUT = 5.0
BIND_RETRY = 1.0
BACKLOG = 128

Handler = Callable[[dict[str, list[str]]], tuple[int, str, bytes]]


def _json(data: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(data, indent=1, default=str).encode() + b"\n"


class AdminServer:
    def __init__(self, app: App) -> None:
        self.app = app
        self.rates = snapshot.Rates(app)
        self._registry = metrics.registry(app)
        self.address: tuple[str, int] | None = None
        #: requests accepted and not yet being read
        self._accepting: set[asyncio.Task[Any]] = set()
        self.routes: dict[str, Handler] = {
            "/health": lambda q: (200, "text/plain", b"ok\n"),
            "/ready": self._ready,
            "/snapshot": lambda q: _json(snapshot.full(self.app, self.rates)),
            "/pools": lambda q: _json(snapshot.pools(self.app)),
            "/users": lambda q: _json(snapshot.users(self.app)),
            "/nodes": lambda q: _json(snapshot.nodes(self.app)),
            "/clients": lambda q: _json(snapshot.clients(self.app)),
            "/servers": lambda q: _json(snapshot.servers(self.app)),
            "/queues": lambda q: _json(snapshot.queues(self.app)),
            "/decisions": self._decisions,
            "/errors": lambda q: _json(snapshot.errors(self.app)),
            "/config": lambda q: _json(snapshot.config(self.app)),
            "/metrics": lambda q: (200, metrics.CONTENT_TYPE, metrics.render(self._registry)),
        }

    def _ready(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        ok, detail = snapshot.ready(self.app)
        return _json({"ready": ok, "databases": detail}, 200 if ok else 503)

    def _decisions(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        try:
            limit = int(query.get("limit", ["200"])[0])
        except ValueError:
            limit = 0
        if limit < 1:
            return _json({"error": "limit must be a positive number"}, 400)
        return _json(snapshot.decisions(self.app, limit))

    # --- lifecycle ---

    async def run(self, listen: HostPort) -> None:
        """Serve until cancelled; retry the bind while the address is taken."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.rates.run)
            warned = False
            sock: socket.socket | None = None
            while sock is None:
                try:
                    sock = socket.create_server(
                        (listen.host, listen.port),
                        family=socket.AF_INET6 if ":" in listen.host else socket.AF_INET,
                        backlog=BACKLOG,
                    )
                except OSError as exc:
                    if not warned:
                        log.warning("admin API cannot listen on %s (%s): retrying every second", listen, exc)
                        warned = True
                    await anyio.sleep(BIND_RETRY)
            sock.setblocking(False)
            name = sock.getsockname()
            self.address = (name[0], name[1])
            loop = asyncio.get_running_loop()
            acceptor = Acceptor(loop, sock, self._protocol, f"admin API {name[0]}:{name[1]}", self._accepting)
            acceptor.start()
            log.info("admin API listening on http://%s:%d/", name[0], name[1])
            try:
                await anyio.sleep_forever()
            finally:
                acceptor.close()
                sock.close()

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        # what asyncio.start_server makes for each connection
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=MAX_REQUEST), self._handle)

    # --- one request ---

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (asyncio.LimitOverrunError, ValueError):
                await self._send(writer, 431, "text/plain", b"request header too large\n")
                return
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            status, ctype, body, method = self._respond(head)
            await self._send(writer, status, ctype, b"" if method == "HEAD" else body, len(body))
        except Exception:  # one bad request must never reach the proxy's task group
            log.exception("admin API: error while answering a request")
        finally:
            writer.close()

    def _respond(self, head: bytes) -> tuple[int, str, bytes, str]:
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, version = request_line.split(" ")
        except ValueError:
            return 400, "text/plain", b"bad request\n", ""
        if not version.startswith("HTTP/1."):
            return 505, "text/plain", b"HTTP/1.x only\n", method
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n", method
        # (not urlsplit: it reads "//pools" as a host name with an empty path, which is the index)
        path, _, query = target.partition("?")
        path = path.rstrip("/") or "/"
        if path == "/":
            index = {"endpoints": sorted(self.routes)}
            status, ctype, body = _json(index)
            return status, ctype, body, method
        handler = self.routes.get(path)
        if handler is None:
            return 404, "text/plain", b"not found\n", method
        status, ctype, body = handler(parse_qs(query))
        return status, ctype, body, method

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, length: int | None = None
    ) -> None:
        reason = HTTPStatus(status).phrase
        allow = "Allow: GET, HEAD\r\n" if status == 405 else ""  # (RFC 9110: a 405 says what is allowed)
        head = (
            f"HTTP/1.1 {status} {reason}\r\n{allow}Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        try:
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except TimeoutError:
            # A peer that reads none of it: closed gracefully, the connection and the unsent answer
            # would be kept for as long as the peer stays connected
            writer.transport.abort()
        except ConnectionError:
            pass
