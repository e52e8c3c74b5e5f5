"""Unix-domain sockets: the `.s.PGSQL.<port>` file name, and connections to a node written as a socket
directory.

A host that starts with `/` is a socket directory, as in libpq's `host=`: node `/var/run/postgresql:5432`
is reached at `/var/run/postgresql/.s.PGSQL.5432` by server connections (the shared LISTEN one too),
topology probes and cancel requests alike (`create_connection`, `connect_stream`). TCP options
(keepalive, user timeout) do not apply to such a connection (`halephant.proxy.tcp` leaves any socket that
is not TCP alone).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio
import anyio.abc

__all__ = [
    "MAX_SOCKET_PATH",
    "connect_stream",
    "create_connection",
    "is_socket_dir",
    "socket_path",
]

#: The longest socket path PostgreSQL and libpq take (sun_path less its terminating NUL, on Linux).
MAX_SOCKET_PATH = 107


def is_socket_dir(host: str) -> bool:
    """A node's host names a Unix-socket directory (libpq's rule: it starts with `/`)."""
    return host.startswith("/")


def socket_path(directory: str, port: int) -> str:
    """`<directory>/.s.PGSQL.<port>`: where PostgreSQL (and PgBouncer, and halephant) listen."""
    return f"{directory.rstrip('/')}/.s.PGSQL.{port}"


async def connect_stream(host: str, port: int) -> anyio.abc.SocketStream:
    """An anyio stream to a node: its socket file when `host` is a directory, else TCP."""
    if is_socket_dir(host):
        return await anyio.connect_unix(socket_path(host, port))
    return await anyio.connect_tcp(host, port)


async def create_connection(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
) -> None:
    """Connect `factory()`'s protocol to a node: its socket file when `host` is a directory, else TCP."""
    if is_socket_dir(host):
        await loop.create_unix_connection(factory, socket_path(host, port))
    else:
        await loop.create_connection(factory, host, port)
