"""Emulated LISTEN: one shared listener connection per database and user, delivering NOTIFY to its clients.

A pooled server cannot keep LISTENing for a transaction-mode client: the next client would get its
notifications, and this client would miss those sent while it has no server. So each channel a client
listens to is LISTENed on one extra server connection per (database, user) (on the primary: standbys
cannot LISTEN), opened on first use and kept outside the pool. A channel is LISTENed there as soon as a
client's transaction LISTENs to it, and UNLISTENed once no client listens to it or is about to (a
rolled-back or undone LISTEN, a client gone in the middle of its transaction: `settle`).

Its `data_received` is the ordinary relay of `ServerConnection`, whose client is the `_Listener` here:
every NotificationResponse is handed, whole and as PostgreSQL sent it (channel, payload and the
notifying backend's PID), to each client subscribed to that channel (`session_state.deliver`, which
queues it while the client is in a transaction).

`when_active` lets a client's server stop listening only once the shared connection listens. PostgreSQL
starts a new listener past every notification already committed, so the client's server must deliver
those: it first NOTIFYs `halephant_listen_handover` itself, which makes it read the whole notification
queue while it still listens, and what it still sends while its LISTENs are undone reaches the client
unless the shared connection delivered the same one (`session_state.late_notification`). So nothing
is lost in between, and a notification both deliver arrives once (copies are matched by sender PID,
channel and payload for 5 s; two identical ones sent during a hand-over count as one). When the
listener connection is lost, its clients are disconnected with 08006 (as a direct connection whose
backend went away), since notifications may have been missed meanwhile.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import anyio

from halephant import sqlstate
from halephant.auth.lookup import upstream_secret
from halephant.errors import ClientError
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import split_frames
from halephant.proxy import session_state
from halephant.proxy.server import ServerConnection
from halephant.proxy.stand_in import StandIn

if TYPE_CHECKING:
    from halephant.pool.pool import Pool
    from halephant.proxy.app import App
    from halephant.proxy.client import ClientConnection

    ServerPool = Pool[ServerConnection, ClientConnection]

log = logging.getLogger("halephant.listen")

Waiter = Callable[[bool], None]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _major(server_version: str) -> int:
    """The major version in a server_version ParameterStatus ("15.18 (Debian 15.18-0+deb12u1)"); 0 if none."""
    digits = server_version.split(".", 1)[0].split(" ", 1)[0]
    return int(digits) if digits.isdigit() else 0


class Listeners:
    """The shared listeners of a running halephant, one per (database, server user)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._by_key: dict[tuple[str, str], _Listener] = {}

    def _for(self, client: ClientConnection) -> _Listener | None:
        target = client.target
        if target is None:
            return None
        key = (target.database, target.pool_user)
        listener = self._by_key.get(key)
        if listener is None:
            listener = self._by_key[key] = _Listener(self.app, self.app.manager.nodes.primary_pool(target))
        return listener

    def prepare(self, client: ClientConnection, channels: Iterable[str]) -> None:
        """Start listening early on channels the client is about to LISTEN to (its transaction may
        still roll that back: `settle` then drops them)."""
        listener = self._for(client)
        if listener is not None:
            listener.want(channels, client)

    def settle(self, client: ClientConnection) -> None:
        """The client's LISTENs are read back (or it left): what it wanted ahead of need and did not
        subscribe to (a rolled-back LISTEN, a transaction cut short) is no longer listened to, unless
        another client listens to it or is about to."""
        listener = self._for(client)
        if listener is not None:
            listener.settle(client)

    def subscribe(self, client: ClientConnection, channels: Iterable[str]) -> None:
        listener = self._for(client)
        if listener is not None:
            listener.subscribe(client, channels)

    def unsubscribe(self, client: ClientConnection, channels: Iterable[str]) -> None:
        listener = self._for(client)
        if listener is not None:
            listener.unsubscribe(client, channels)

    def when_active(self, client: ClientConnection, channels: Iterable[str], done: Waiter) -> None:
        listener = self._for(client)
        if listener is None:
            done(False)
        else:
            listener.when_active(set(channels), done, client)

    def close_all(self) -> None:
        for listener in self._by_key.values():
            listener.close()

    def release_unused(self, cluster: str, address: str, reason: str) -> int:
        """Close the shared connections to node `address` of `cluster` that no client listens on (a node
        that takes no new sessions: in a smart shutdown it waits for every session to end, and a listener
        kept open would hold it up for ever). One with listening clients stays, as their sessions would
        on a direct connection; each reopens on the primary when a client next LISTENs. Returns how many
        were closed."""
        n = 0
        for listener in self._by_key.values():
            server = listener.server
            if (
                server is not None
                and not server.closing
                and listener.unused
                and server.pool.key[2] == address
                and server.pool.info.target.cluster == cluster
            ):
                log.info(
                    "shared listener for %s: closing it, no client listens: %s", listener.pool.name, reason
                )
                server.close(reason)
                n += 1
        return n

    def fence(self, cluster: str, address: str, reason: str) -> None:
        """Cut the shared connections to node `address` of `cluster` (no longer its primary): their clients
        are told as when it is lost, and it reopens on the primary."""
        for listener in self._by_key.values():
            server = listener.server
            if (
                server is not None
                and server.pool.key[2] == address
                and server.pool.info.target.cluster == cluster
            ):
                log.warning("shared listener for %s: closing it: %s", listener.pool.name, reason)
                server.fence(reason)


class _Listener(StandIn):
    """One shared listener connection; stands in as the server connection's client."""

    def __init__(self, app: App, pool: ServerPool) -> None:
        self.app = app
        self.pool = pool
        self.server: ServerConnection | None = None
        self.opening = False
        self.closed = False
        #: channel -> clients that receive its notifications (an empty set: LISTENed ahead of need)
        self.channels: dict[str, set[ClientConnection]] = {}
        #: channel -> clients whose transaction LISTENs to it, until they subscribe or `settle`
        self.wanted: dict[str, set[ClientConnection]] = {}
        #: channels the shared connection listens to now
        self.active: set[str] = set()
        #: LISTEN/UNLISTEN queries in flight, oldest first: the channels each makes active, and those
        #: it stops (a channel one of them touches is not counted as active until they are answered)
        self._batches: deque[tuple[list[str], list[str]]] = deque()
        self._waiters: list[tuple[set[str], Waiter]] = []
        self._buf = b""
        self.transport = self  # the relay writes the server's bytes here

    # --- what clients ask ---

    def want(self, channels: Iterable[str], client: ClientConnection) -> None:
        new = []
        for ch in channels:
            if ch not in self.channels:
                self.channels[ch] = set()
                new.append(ch)
            wanting = self.wanted.get(ch)
            if wanting is None:
                wanting = self.wanted[ch] = set()
            wanting.add(client)
        self._listen(new)

    def subscribe(self, client: ClientConnection, channels: Iterable[str]) -> None:
        new = []
        for ch in channels:
            clients = self.channels.get(ch)
            if clients is None:
                clients = self.channels[ch] = set()
                new.append(ch)
            clients.add(client)
        self._listen(new)

    def unsubscribe(self, client: ClientConnection, channels: Iterable[str]) -> None:
        names = list(channels)  # walked twice
        for ch in names:
            clients = self.channels.get(ch)
            if clients is not None:
                clients.discard(client)
        self._drop_unused(names)

    def settle(self, client: ClientConnection) -> None:
        wanted = []
        for ch, wanting in list(self.wanted.items()):
            if client in wanting:
                wanting.discard(client)
                wanted.append(ch)
                if not wanting:
                    del self.wanted[ch]
        self._drop_unused(wanted)

    def _drop_unused(self, channels: Iterable[str]) -> None:
        """UNLISTEN those of `channels` that no client listens to, is about to, or waits for."""
        gone = []
        for ch in channels:
            if (
                self.channels.get(ch) == set()
                and ch not in self.wanted
                and not any(ch in waited for waited, _ in self._waiters)
            ):
                del self.channels[ch]
                gone.append(ch)
        if gone and self.server is not None and not self.server.closing:
            self.active.difference_update(gone)
            self._batches.append(([], gone))
            self.server.send(m.query("; ".join(f"UNLISTEN {_ident(ch)}" for ch in gone)))

    def when_active(self, channels: set[str], done: Waiter, client: ClientConnection) -> None:
        if self._listening(channels):
            done(True)
            return
        self.want(channels, client)
        self._waiters.append((channels, done))
        self._open()

    # --- the connection ---

    def _listen(self, channels: list[str]) -> None:
        if not channels:
            return
        if self.server is None or self.server.closing:
            self._open()
            return
        self._batches.append((channels, []))
        self.server.send(m.query("; ".join(f"LISTEN {_ident(ch)}" for ch in channels)))

    def _open(self) -> None:
        if self.opening or self.closed or (self.server is not None and not self.server.closing):
            return
        self.opening = True
        self.app.spawn(self._connect)

    async def _connect(self) -> None:
        target = self.pool.info.target
        self.pool = self.app.manager.nodes.primary_pool(target)  # the primary may have changed
        startup = {
            "user": target.server_user,
            "database": target.server_database,
            "application_name": "halephant listener",
            # notifications arrive in UTF-8, re-encoded for each client that has another encoding
            "client_encoding": "UTF8",
        }
        loop = self.app.loop
        server = ServerConnection(self.app.manager, self.pool, startup, upstream_secret(target), loop)
        try:
            if not self.pool.host:
                raise ConnectionError("no primary is available")
            with anyio.fail_after(self.app.config.limits.connect_timeout):
                server = await server.open(self.app.manager.tls_for(target.cluster), "shared listener")
        except Exception as exc:
            server.abort()
            self.opening = False
            log.warning("shared listener for %s: could not connect: %s", self.pool.name, exc)
            waiters, self._waiters = self._waiters, []
            for _, done in waiters:
                done(False)
            return
        self.opening = False
        if self.closed:
            server.close("shutdown")
            return
        self.server = server
        self.active = set()
        self._batches.clear()
        server.client = self  # type: ignore[assignment]
        log.info(
            "shared listener for %s: connected (pid %d%s)",
            self.pool.name,
            server.backend_pid,
            f", tls {server.tls}" if server.tls else "",
        )
        if _major(server.params.get("server_version", "")) >= 14:
            # It sits idle between notifications: an idle_session_timeout set on its role or database
            # would end it, and with it every listening client's LISTEN (08006).
            self._batches.append(([], []))
            server.send(m.query("SET idle_session_timeout = 0"))
        self._listen(list(self.channels))

    @property
    def unused(self) -> bool:
        """No client listens on this connection, is about to, or waits for it to."""
        return not self.channels and not self.wanted and not self._waiters

    def close(self) -> None:
        self.closed = True
        if self.server is not None:
            self.server.close("shutdown")

    # --- standing in for a client of the server connection ---

    def write(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        frames, consumed = split_frames(buf, 1 << 30)
        self._buf = buf[consumed:]
        for t, start, end in frames:
            if t == codes.NOTIFICATION_RESPONSE:
                channel_end = buf.find(b"\0", start + 4, end)
                channel = buf[start + 4 : channel_end].decode(errors="replace")
                clients = self.channels.get(channel)
                if clients:
                    message = buf[start - 5 : end]
                    for client in list(clients):
                        session_state.deliver(client, message)
            elif t == codes.ERROR_RESPONSE:
                fields = m.decode_error_fields(buf[start:end])
                log.warning("shared listener for %s: %s %s", self.pool.name, fields.get("C"), fields.get("M"))

    def server_ready(self, n: int, status: int, at_boundary: bool) -> None:
        for _ in range(n):
            if self._batches:
                started, stopped = self._batches.popleft()
                self.active.update(started)
                self.active.difference_update(stopped)
        if self._waiters:
            ready: list[tuple[set[str], Waiter]] = []
            waiting: list[tuple[set[str], Waiter]] = []
            for waiter in self._waiters:
                (ready if self._listening(waiter[0]) else waiting).append(waiter)
            if ready:
                self._waiters = waiting  # first: a callback may add waiters of its own
                for _, done in ready:
                    done(True)
                # a client that waited may have left meanwhile
                self._drop_unused({ch for chs, _ in ready for ch in chs})

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        if server is not self.server:
            return
        self.server = None
        self.active = set()
        self._batches.clear()
        if self.closed:
            return
        log.warning("shared listener for %s lost: %s", self.pool.name, reason)
        # Connected directly, a client whose backend is gone learns it with its connection; notifications
        # sent meanwhile may be lost, so its listening clients are told the same way and reconnect.
        error = ClientError(
            sqlstate.CONNECTION_FAILURE,
            "the connection that listens for this client's notifications was lost: "
            "notifications may have been missed",
            fatal=True,
        )
        for client in {c for clients in self.channels.values() for c in clients}:
            client.fail(error)
        if self.channels:
            self._open()  # channels wanted ahead of need

    def _listening(self, channels: set[str]) -> bool:
        """The shared connection listens to all of `channels`, and no query in flight changes that."""
        return channels <= self.active and not any(
            channels.intersection(started) or channels.intersection(stopped)
            for started, stopped in self._batches
        )

    def pause_reading(self) -> None:
        pass
