"""The anyio streams halephant opens to a node for itself (topology probes, auth_query lookups): driving an
`OwnSession` (`halephant.auth.own_session`, sans-IO) over one, and ending it. The streams themselves come
from `halephant.unix_socket.connect_stream` (TCP, TLS as the cluster says, or a Unix-domain socket).
"""

from __future__ import annotations

import anyio
import anyio.abc
import anyio.to_thread

from halephant.auth.own_session import OwnSession
from halephant.protocol import messages as m

__all__ = ["close", "until_ready"]


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
