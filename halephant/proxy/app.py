"""A running halephant: the listeners, the registry of clients (for cancel keys), the pool manager, and
the anyio task group everything that is not per-message runs in (server logins, maintenance, signals).

It listens on `listen` (TCP) and, with `unix_socket_dir`, on `<dir>/.s.PGSQL.<port>` too (see
`halephant.unix_socket`); the clients of both are served alike, accepted by `halephant.proxy.accept`
(which also says what happens when the process is out of file descriptors).

`App.serve()` runs until SIGINT/SIGTERM or `shutdown()`. The first SIGTERM/SIGINT (`begin_shutdown`)
stops listening (the TCP listener uses SO_REUSEPORT, so a new halephant may already be listening on the
same port, and may have put its own socket file in place of this one's, which is then left alone), lets
transactions in progress finish for up to `limits.shutdown_timeout` while clients between transactions
are closed, then tells everyone left 57P01; a second signal skips the wait. SIGHUP reloads the
configuration file (`reload()`, see `halephant.proxy.reload`).
"""

from __future__ import annotations

import asyncio
import grp
import hmac
import itertools
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVarTuple

import anyio
import anyio.abc

from halephant.admin.control import Control
from halephant.admin.http import AdminServer
from halephant.config import Config
from halephant.plugin_manager import Plugins
from halephant.protocol import messages as m
from halephant.proxy.accept import Acceptor
from halephant.proxy.client import ClientConnection
from halephant.proxy.limits import ClientCounts
from halephant.proxy.listener import Listeners
from halephant.proxy.manager import PoolManager
from halephant.proxy.reload import ReloadResult, reload_app
from halephant.proxy.server import ServerConnection
from halephant.proxy.stats import Stats, run_clock
from halephant.proxy.sweep import shutdown_error
from halephant.tcp import set_tcp_options
from halephant.unix_socket import UnixListener, connect_stream

log = logging.getLogger("halephant")

Args = TypeVarTuple("Args")


class App:
    def __init__(self, config: Config, plugins: Plugins) -> None:
        self.config = config
        #: bumped by every reload applied: a client's targets are of the configuration it logged in under
        self.config_generation = 0
        self.plugins = plugins
        self.max_message_size = config.limits.max_message_size
        #: checked before per-transaction debug lines, so they cost nothing when off
        self.debug = logging.getLogger("halephant").isEnabledFor(logging.DEBUG)
        self.manager = PoolManager(self)
        self.stats = Stats()
        #: loop time, refreshed every 100 ms (see `halephant.proxy.stats.run_clock`)
        self.clock = 0.0
        self.control = Control(self)
        self.admin: AdminServer | None = None
        #: shared LISTEN connections (emulated LISTEN in transaction pooling)
        self.listeners = Listeners(self)
        #: every connected client by its number, which is also the process ID it is told (cancel keys)
        self.clients: dict[int, ClientConnection] = {}
        #: session-pooling clients by the server process ID they were told instead of their number (servers
        #: on different hosts may have the same process ID: each of its clients is told it)
        self.session_pids: dict[int, list[ClientConnection]] = {}
        self.client_counts = ClientCounts()
        #: set by begin_shutdown(): no new connections; clients leave as their transactions end
        self.draining = False
        self._acceptor: Acceptor | None = None
        self._listen_sock: socket.socket | None = None
        self._unix_acceptor: Acceptor | None = None
        self._unix: UnixListener | None = None
        #: connections accepted and still being set up (shutdown waits for them)
        self._accepting: set[asyncio.Task[Any]] = set()
        self._numbers = itertools.count(1)
        self._tg: anyio.abc.TaskGroup | None = None
        self._stop = anyio.Event()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in serve()
        self.address: tuple[str, int] | None = None
        #: the path of the Unix-domain socket listened on (`unix_socket_dir`), None when off
        self.unix_socket: str | None = None

    # --- lifecycle ---

    async def serve(
        self, *, on_ready: Callable[[App], Any] | None = None, early_hups: list[int] | None = None
    ) -> None:
        """Serve until stopped. `early_hups`: SIGHUPs received before this installs its handlers (the
        caller notes them from the process start): one reload is done for them once it has."""
        # cached: on Python 3.11 every get_running_loop() is a getpid() syscall
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time()
        self.plugins.configure(self.config)
        # the nodes' roles before the first client's first transaction is routed
        await self.manager.nodes.topology.first_round()
        listen = self.config.listen
        sock = self._listen_socket(listen.host, listen.port)
        self._listen_sock = sock
        name = sock.getsockname()
        self._acceptor = self._accept_on(sock, f"{name[0]}:{name[1]}")
        self.address = (name[0], name[1])
        log.info("listening on %s:%d", name[0], name[1])
        try:
            if self.config.unix_socket_dir is not None:
                # the port listened on: `listen`'s, or the one the system picked for port 0
                await self._listen_unix(self.config.unix_socket_dir, name[1])
        except BaseException:
            self._stop_listening()
            raise
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                # first: until its handlers are installed a SIGTERM kills the process outright
                tg.start_soon(self._signals, early_hups)
                tg.start_soon(self.manager.maintain)
                tg.start_soon(self.manager.expire_waiters)
                tg.start_soon(run_clock, self)
                tg.start_soon(self.control.run)
                if self.config.admin.listen is not None:
                    self.admin = AdminServer(self)
                    tg.start_soon(self.admin.run, self.config.admin.listen)
                tg.start_soon(self.manager.nodes.topology.run)
                if on_ready is not None:
                    result = on_ready(self)
                    if isinstance(result, Awaitable):
                        await result
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            self._stop_listening()
            self._terminate_everyone()
            await anyio.sleep(0.05)  # let the closing writes go out
            log.info("stopped")

    def _listen_socket(self, host: str, port: int) -> socket.socket:
        # SO_REUSEPORT: a new halephant can listen on the same port while this one drains (online
        # restart), and several can share a port to use several cores
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            set_tcp_options(sock, self.config.limits)  # inherited by the connections it accepts
            sock.bind((host, port))
            sock.listen(4096)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _listen_unix(self, directory: str, port: int) -> None:
        group = self.config.unix_socket_group
        unix = self._unix = UnixListener(
            directory,
            port,
            backlog=4096,
            mode=int(self.config.unix_socket_mode, 8),
            group=grp.getgrnam(group).gr_gid if group is not None else None,
        )
        self._unix_acceptor = self._accept_on(unix.sock, unix.path)
        self.unix_socket = unix.path
        log.info("listening on %s", unix.path)

    def _accept_on(self, sock: socket.socket, name: str) -> Acceptor:
        acceptor = Acceptor(self.loop, sock, lambda: ClientConnection(self), name, self._accepting)
        acceptor.start()
        return acceptor

    def tcp_options_changed(self) -> None:
        """A reload may have changed `limits.tcp_*`: connections accepted from now on get the new ones."""
        if self._listen_sock is not None:
            set_tcp_options(self._listen_sock, self.config.limits)

    def _stop_listening(self) -> None:
        """Close the listeners, first accepting what the kernel already queued on them: closing a
        listening socket resets the connections in its queue, and those are connection attempts already
        made. The Unix-domain socket's file goes first (no new attempt finds it), if it is still ours."""
        unix, unix_acceptor = self._unix, self._unix_acceptor
        self._unix = self._unix_acceptor = None
        if unix is not None:
            if unix.remove():
                log.info("removed %s", unix.path)
            else:
                log.info("left %s alone: it is no longer this process's socket", unix.path)
        acceptor, sock = self._acceptor, self._listen_sock
        self._acceptor = self._listen_sock = None
        if sock is None:
            return
        accepted = 0
        for each, listening in ((acceptor, sock), (unix_acceptor, unix.sock if unix is not None else None)):
            if listening is None:
                continue
            if each is not None:
                each.close()
                accepted += each.accept_queued()
            listening.close()
        log.info("stopped listening%s", f" ({accepted} queued connection(s) accepted)" if accepted else "")

    async def _signals(self, early_hups: list[int] | None = None) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            if early_hups:
                log.info("received SIGHUP while starting: reloading %s", self.config.source)
                try:
                    self.reload()
                except Exception:
                    log.exception("reload failed")
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP: reloading %s", self.config.source)
                    try:
                        self.reload()
                    except Exception:  # a bug in applying it must not take the proxy down
                        log.exception("reload failed")
                elif not self.draining:
                    log.info("received %s: shutting down", name)
                    self.begin_shutdown()
                else:
                    log.info("received %s again: terminating every client now", name)
                    self.shutdown()

    def reload(self) -> ReloadResult:
        """Read the configuration file again and apply what can change live (see halephant.proxy.reload)."""
        result = reload_app(self)
        self.stats.reloaded(result.errors)
        return result

    def begin_shutdown(self) -> None:
        """Stop accepting; let transactions finish for up to `shutdown_timeout`, then stop."""
        if self.draining:
            return
        self.draining = True
        self._stop_listening()
        timeout = self.config.limits.shutdown_timeout
        log.info(
            "shutting down: %d client(s) connected, waiting up to %gs for transactions",
            len(self.clients),
            timeout,
        )
        self.spawn(self._drain, self.loop.time() + timeout)

    async def _drain(self, deadline: float) -> None:
        # idle clients are closed by the client sweep (halephant.proxy.sweep); this waits for the rest
        while (self.clients or any(not t.done() for t in self._accepting)) and self.loop.time() < deadline:
            await anyio.sleep(0.05)
        if self.clients:
            log.info("shutdown_timeout reached: terminating %d client(s)", len(self.clients))
        self.shutdown()

    def shutdown(self) -> None:
        """Stop now: every client left gets 57P01."""
        self._stop.set()

    def _terminate_everyone(self) -> None:
        error = shutdown_error()
        for client in list(self.clients.values()):
            client.fail(error)
        self.listeners.close_all()
        self.manager.close_all()

    def spawn(self, func: Callable[[*Args], Coroutine[Any, Any, Any]], *args: *Args) -> None:
        """Run a background coroutine (a server login, a warm-up) in the app's task group."""
        assert self._tg is not None
        self._tg.start_soon(func, *args)

    # --- clients ---

    def client_opened(self, client: ClientConnection) -> int:
        """Register a new connection; returns its number."""
        number = next(self._numbers)
        self.clients[number] = client
        self.stats.connections += 1
        return number

    def client_closed(self, client: ClientConnection) -> None:
        self.clients.pop(client.number, None)
        # its descriptor is free: connections waiting while the process was out of them can be taken
        if self._acceptor is not None and self._acceptor.failures:
            self._acceptor.resume_now()
        if self._unix_acceptor is not None and self._unix_acceptor.failures:
            self._unix_acceptor.resume_now()
        if client.told_pid:
            told = self.session_pids.get(client.told_pid)
            if told is not None and client in told:
                told.remove(client)
                if not told:
                    del self.session_pids[client.told_pid]

    def session_process_id(self, client: ClientConnection, backend_pid: int) -> int:
        """Register the process ID a session-pooling client is told (its server's); returns it."""
        self.session_pids.setdefault(backend_pid, []).append(client)
        client.told_pid = backend_pid
        return backend_pid

    def cancel(self, process_id: int, secret_key: int, done: Callable[[], None]) -> None:
        """A CancelRequest: forward it to the server linked to that client now, and to nobody otherwise
        (a statement still waiting for a server is cancelled where it waits). `done` is called once the
        cancel has been handled: when forwarded, once PostgreSQL has closed its cancel connection, which
        it does after signalling the backend. Clients (libpq's PQcancel, psycopg, asyncpg) wait for the
        cancel connection to close before they send anything more, so that their next statement is not
        the one cancelled: closing the client's cancel connection any earlier breaks that."""
        try:
            self._cancel(process_id, secret_key, done)
        except BaseException:
            done()
            raise

    def _cancel(self, process_id: int, secret_key: int, done: Callable[[], None]) -> None:
        key = (secret_key & 0xFFFFFFFF).to_bytes(4, "big")
        for client in (self.clients.get(process_id), *self.session_pids.get(process_id, ())):
            if (
                client is not None
                and client.cancel_key
                and hmac.compare_digest(client.cancel_key.to_bytes(4, "big"), key)
            ):
                break
        else:
            log.info("cancel request for unknown client %d ignored", process_id)
            done()
            return
        server = client.server
        if server is None:
            if client.cancel_wait():
                log.info("%r: cancel request: its statement was still waiting for a server", client)
            else:
                log.info("%r: cancel request ignored: no query running", client)
            done()
            return
        if server.absorb:
            # halephant's own query (the client's startup settings, a clean-up) runs ahead of the
            # client's statement: cancelled now, it would fail instead, and the statement run after it
            # without the client's settings. Forwarded once that query has answered.
            log.info(
                "%r: cancel request held until halephant's own query on server pid %d has answered",
                client,
                server.backend_pid,
            )
            server.held_cancels.append((client, done))
            return
        self._forward_cancel(client, server, done)

    def forward_held_cancel(
        self, client: ClientConnection, server: ServerConnection, done: Callable[[], None]
    ) -> None:
        """Forward a cancel request held while halephant's own query ran on `server` (`_cancel`), if the
        client still has that server."""
        if client.server is not server or server.closing:
            log.info("%r: held cancel request dropped: its server moved on", client)
            done()
            return
        self._forward_cancel(client, server, done)

    def _forward_cancel(
        self, client: ClientConnection, server: ServerConnection, done: Callable[[], None]
    ) -> None:
        log.info(
            "%r: forwarding cancel request to server pid %d%s",
            client,
            server.backend_pid,
            " over TLS" if server.tls_used is not None else "",
        )
        self.spawn(self._send_cancel, client, server, server.link_count, done)

    async def _send_cancel(
        self, client: ClientConnection, server: ServerConnection, link: int, done: Callable[[], None]
    ) -> None:
        try:
            await self.forward_cancel(client, server, link)
        finally:
            done()

    async def forward_cancel(self, client: ClientConnection, server: ServerConnection, link: int) -> None:
        """Send a CancelRequest for the query `server` runs for `client`, unless the server moved on (its
        `link_count` is no longer `link`); returns once PostgreSQL has closed the cancel connection."""

        def still_theirs() -> bool:
            # the server may have moved on to another client while we connected: never cancel theirs
            if client.server is server and server.link_count == link:
                return True
            log.info("%r: cancel dropped: its server moved on", client)
            return False

        await self._cancel_request(server, repr(client), still_theirs)

    def cancel_orphaned(self, server: ServerConnection) -> None:
        """Cancel the statement `server` still runs for a client that left. Closing the connection alone
        lets it run to its end (PostgreSQL notices a closed connection only when it next reads from it
        or writes to it), holding its locks, its snapshot and a backend meanwhile. The server is being
        closed, so the cancel can reach no other client's statement."""
        log.info("server pid %d: cancelling the statement its client left running", server.backend_pid)
        self.spawn(self._cancel_request, server, f"server pid {server.backend_pid}", None)

    async def _cancel_request(
        self, server: ServerConnection, who: str, wanted: Callable[[], bool] | None
    ) -> None:
        try:
            with anyio.fail_after(5):
                # over TLS when its server connection is (as libpq 17 sends them): the cancel key is not
                # to be seen on the wire when the session it cancels was not; PostgreSQL checks no
                # pg_hba.conf line for a cancel request, so plaintext would be taken as well
                stream = await connect_stream(server.pool.host, server.pool.port, server.tls_used)
                async with stream:
                    if wanted is not None and not wanted():
                        return
                    server.cancelling += 1  # the server serves nobody else until PostgreSQL has taken it
                    try:
                        await stream.send(m.cancel_request(server.backend_pid, server.backend_key))
                        await stream.receive()
                    finally:
                        server.cancelling -= 1
                        if not server.cancelling and server.parked is not None:
                            (client,), server.parked = server.parked, None
                            self.manager.checkin(server, client)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        except Exception as exc:
            log.warning("%s: cancel request failed: %s", who, exc)
