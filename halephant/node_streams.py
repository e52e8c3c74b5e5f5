"""The anyio streams halephant opens to a node for itself (topology probes, auth_query lookups): logging an
`OwnSession` (`halephant.auth.own_session`, sans-IO) in over one (`log_in`), driving it, and ending it. The
streams themselves come from `halephant.unix_socket.connect_stream` (TCP, TLS as the cluster says, or a
Unix-domain socket); `log_in` tries a login refused over TLS again in plaintext where the cluster's mode
is `prefer`, as libpq does (`halephant.server_tls`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.abc
import anyio.to_thread

from halephant.auth.own_session import OwnSession
from halephant.protocol import messages as m
from halephant.server_tls import (
    ServerTls,
    log_plaintext_retry,
    only_tls_accepted,
    retries_in_plaintext,
    stream_certificate,
)
from halephant.unix_socket import connect_stream

__all__ = ["cancel", "close", "log_in", "until_ready"]

Session = TypeVar("Session", bound=OwnSession)


async def until_ready(stream: anyio.abc.ByteStream, session: OwnSession) -> None:
    """Exchange messages until the server's next ReadyForQuery (the login's, or a query's); the login's
    slow steps run in a worker thread. Raises what `feed` raises, and the stream's errors."""
    while True:
        reply, ready = session.feed(await stream.receive())
        while True:
            if reply:
                await stream.send(reply)
            slow, session.slow_step = session.slow_step, None
            if slow is None:
                break
            await anyio.to_thread.run_sync(slow, abandon_on_cancel=True)
            reply, ready = session.feed(b"")
        if ready:
            return


async def close(stream: anyio.abc.ByteStream, session: OwnSession | None) -> None:
    """End the session: a Terminate once logged in (PostgreSQL logs one in the middle of a login as an
    error), then the connection; within half a second, even while being cancelled."""
    with anyio.move_on_after(0.5, shield=True):
        if session is not None and session.logged_in:
            try:
                await stream.send(m.TERMINATE)
            except Exception:
                pass
        await stream.aclose()


async def log_in(
    host: str,
    port: int,
    tls: ServerTls | None,
    new_session: Callable[[anyio.abc.ByteStream], Session],
    what: str,
    until: Callable[[anyio.abc.ByteStream, Session], Awaitable[None]] = until_ready,
) -> tuple[anyio.abc.ByteStream, Session]:
    """Connect to the node at `host:port` (`connect_stream`, with `tls`), make the session for the stream
    (`new_session`) and log it in (`until`: `until_ready`, or a caller's that wraps it); with `prefer`, a
    login the server refused over TLS is tried again on a new connection without TLS (`what` it is, for
    that log line). Returns the stream and the session, logged in; raises what failed, with what it
    opened closed."""
    stream, session, failure, encrypted = await _log_in(host, port, tls, new_session, until)
    if failure is None:
        return stream, session
    refusal = session.refusal
    if tls is None or refusal is None or not retries_in_plaintext(tls, encrypted, refusal):
        raise failure
    log_plaintext_retry(tls, host, port, refusal, what)
    stream, session, again, _ = await _log_in(host, port, None, new_session, until)
    if again is None:
        return stream, session
    if only_tls_accepted(session.refusal):
        raise failure from None
    raise again


async def _log_in(
    host: str,
    port: int,
    tls: ServerTls | None,
    new_session: Callable[[anyio.abc.ByteStream], Session],
    until: Callable[[anyio.abc.ByteStream, Session], Awaitable[None]],
) -> tuple[anyio.abc.ByteStream, Session, Exception | None, bool]:
    """One login, as `log_in`: the stream, the session, what failed (None: logged in; the stream is closed
    otherwise) and whether it was over TLS. A failure to connect at all is raised."""
    stream = await connect_stream(host, port, tls)
    encrypted = stream_certificate(stream) is not None  # PostgreSQL's TLS always has a certificate
    session: Session | None = None
    try:
        session = new_session(stream)
        await stream.send(session.startup())
        await until(stream, session)
    except Exception as exc:
        await close(stream, session)
        if session is None:
            raise
        return stream, session, exc, encrypted
    except BaseException:
        await close(stream, session)
        raise
    return stream, session, None, encrypted


async def cancel(host: str, port: int, tls: ServerTls | None, backend_key: tuple[int, int]) -> None:
    """Send a CancelRequest for the query the backend of `backend_key` runs (over TLS as `tls` says, as
    libpq 17 sends them), within five seconds; one that cannot be sent is let go (the query then ends
    when it ends). Closing a session's connection alone lets its query run to its end: PostgreSQL
    notices a closed connection only when it next reads from it or writes to it."""
    with anyio.move_on_after(5):
        try:
            stream = await connect_stream(host, port, tls)
            async with stream:
                await stream.send(m.cancel_request(*backend_key))
                await stream.receive()  # PostgreSQL closes the connection once it has taken it
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            pass
