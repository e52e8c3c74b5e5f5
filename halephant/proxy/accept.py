"""Accepting client connections on a listening socket (TCP `listen`, or `unix_socket_dir`), and what is
done when the process is out of file descriptors.

The event loop's own server is not used for this: on EMFILE/ENFILE uvloop (libuv's "EMFILE trick")
accepts each waiting connection and closes it at once, and logs nothing, so clients are cut off and the
operator never learns why; plain asyncio logs a traceback every second. Here, as in PgBouncer, a failed
accept stops accepting on that socket for `RETRY_SECONDS`, or until a client leaves: existing clients
keep being served, new ones wait in the listen queue (up to its backlog) and are accepted as soon as
descriptors are free again. The failure is logged at once, then at most once per `LOG_EVERY_SECONDS`
with the number of failed attempts in between, naming the limit that was reached; once the queue has
been emptied, accepting again is logged once.

`shortage` says what ran out and what the operator can change, for this log and for a server
connection that could not be opened for the same reason (`halephant.proxy.manager`).

An accepted socket is handed to the loop with `connect_accepted_socket` (one short task per
connection, until `connection_made`), the same way for uvloop and asyncio.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import resource
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["LOG_EVERY_SECONDS", "OUT_OF_RESOURCES", "RETRY_SECONDS", "Acceptor", "shortage"]

log = logging.getLogger("halephant")

#: how long accepting pauses after an accept failed for want of a resource (unless a client leaves first)
RETRY_SECONDS = 0.5
#: the least time between two log lines about failing accepts on one socket
LOG_EVERY_SECONDS = 5.0
#: accepts per readiness event: a connection storm on one socket does not starve the rest of the loop
_BATCH = 64
#: errors of the connection being accepted (it went away, a firewall refused it): the next one is taken
_THIS_CONNECTION = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
#: errors of the process (or the system) being out of something, rather than of one connection
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def shortage(exc: OSError, lower: str = "max_client_conn") -> str:
    """What ran out, and what the operator can change (`lower`: what takes the descriptors)."""
    if exc.errno == errno.EMFILE:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return (
            f"halephant has all the {soft} file descriptors it may open; raise the limit "
            f"(ulimit -n, or LimitNOFILE= in its systemd unit) or lower {lower}"
        )
    if exc.errno == errno.ENFILE:
        return "the system's table of open files is full (sysctl fs.file-max)"
    if exc.errno in (errno.ENOBUFS, errno.ENOMEM):
        return "the kernel is out of memory for sockets"
    return "unexpected error"


class Acceptor:
    """Accepts the connections of one listening socket for `factory`'s protocol. The socket stays the
    caller's: `close()` stops accepting and leaves it open."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        name: str,
        pending: set[asyncio.Task[Any]],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        #: how the log names the socket (`127.0.0.1:6432`, a socket file's path)
        self.name = name
        #: connections accepted and not yet made (shared with the app: its shutdown waits for them)
        self.pending = pending
        self._fd = sock.fileno()
        self._reading = False
        self._closed = False
        self._retry: asyncio.Handle | None = None
        #: failed accepts since accepting last succeeded, and since the last log line about them
        self.failures = 0
        self._unlogged = 0
        self._first_failure = 0.0
        self._logged_at = 0.0

    def start(self) -> None:
        if not self._closed and not self._reading:
            self.loop.add_reader(self._fd, self._accept)
            self._reading = True

    def close(self) -> None:
        """Stop accepting (the socket is left open: see `accept_queued`)."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False

    def accept_queued(self) -> int:
        """Accept every connection the kernel has queued now (before the socket is closed, which would
        reset them); returns how many. Used once accepting has stopped, at shutdown."""
        accepted = 0
        while True:
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                return accepted
            self._hand_over(conn)
            accepted += 1

    def _accept(self) -> None:
        for _ in range(_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                if self.failures:
                    # the queue is empty: everyone who waited has been taken
                    self._recovered()
                return
            except OSError as exc:
                if exc.errno in _THIS_CONNECTION:
                    continue
                self._failed(exc)
                return
            self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn))
        self.pending.add(task)
        task.add_done_callback(functools.partial(self._made, conn))

    def _made(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self.pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: could not set up an accepted connection: %s", self.name, task.exception())
            conn.close()

    def _failed(self, exc: OSError) -> None:
        # stop reading: the socket stays readable while connections wait, and each wake-up would fail
        self.loop.remove_reader(self._fd)
        self._reading = False
        self._retry = self.loop.call_later(RETRY_SECONDS, self._resume)
        now = self.loop.time()
        if not self.failures:
            self._first_failure = now
        self.failures += 1
        if self._logged_at and now - self._logged_at < LOG_EVERY_SECONDS:
            self._unlogged += 1
            return
        since = f" ({self._unlogged} more failed attempt(s) since the last message)" if self._unlogged else ""
        log.warning(
            "cannot accept connections on %s: %s: %s; clients already connected are served, new ones "
            "wait in the listen queue%s",
            self.name,
            exc.strerror or exc,
            shortage(exc),
            since,
        )
        self._logged_at = now
        self._unlogged = 0

    def resume_now(self) -> None:
        """A descriptor was freed (a client left): try the waiting connections now, not at the next retry."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self.start()
            # at once: the queue may have been emptied meanwhile (clients gave up), and an empty queue
            # never makes the socket readable, so waiting for that would never tell accepting works again
            self._accept()

    def _recovered(self) -> None:
        log.info(
            "accepting connections on %s again (%d attempt(s) failed over %.1fs)",
            self.name,
            self.failures,
            self.loop.time() - self._first_failure,
        )
        self.failures = 0
