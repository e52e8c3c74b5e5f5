"""Unix-domain sockets, on both sides: the `.s.PGSQL.<port>` file name, the listening socket of
`unix_socket_dir`, and connections to a node written as a socket directory.

A host that starts with `/` is a socket directory, as in libpq's `host=`: node `/var/run/postgresql:5432`
(the configuration writes the directory one way, `socket_dir`, so `/run/pg/:5432` is `/run/pg:5432`) is
reached at `/var/run/postgresql/.s.PGSQL.5432` by server connections (the shared LISTEN one too),
topology probes and cancel requests alike (`create_connection`, `connect_stream`). TCP options
(keepalive, user timeout) do not apply to such a connection (`halephant.tcp` leaves any socket that
is not TCP alone), and neither does TLS, whatever the cluster's `tls.mode` (libpq ignores sslmode for
a socket too): a TCP connection with TLS settings is opened by `halephant.server_tls`.

Listening (`UnixListener`): the socket is bound under a temporary name beside the final one, given its
mode and group (`unix_socket_mode`, `unix_socket_group`), listens, and is then renamed over the final
name (so the final name never has another mode or group). So a stale file left by a crashed halephant
is replaced, and so is the live one of a halephant being replaced (an online restart: the TCP listener
uses SO_REUSEPORT, which a Unix-domain socket has no equivalent of), with no moment in which the name
is missing. At
shutdown the file is removed only if it is still this process's (same device and inode): a new
halephant may already have put its own in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import socket
import stat
from collections.abc import Callable

import anyio
import anyio.abc

from halephant.server_tls import ServerTls, open_connection, open_stream

__all__ = [
    "MAX_SOCKET_PATH",
    "UnixListener",
    "UnixSocketError",
    "connect_stream",
    "create_connection",
    "is_socket_dir",
    "socket_dir",
    "socket_path",
    "too_long",
    "uses_tls",
]

#: The longest socket path PostgreSQL and libpq take (sun_path less its terminating NUL, on Linux).
MAX_SOCKET_PATH = 107


class UnixSocketError(Exception):
    """`unix_socket_dir` cannot be listened on; the message says why, for the operator."""


def is_socket_dir(host: str) -> bool:
    """A node's host names a Unix-socket directory (libpq's rule: it starts with `/`)."""
    return host.startswith("/")


def socket_dir(directory: str) -> str:
    """`directory` written one way: no repeated, trailing or `.` components (`/run//pg/./` is `/run/pg`),
    so that one directory spelled two ways is one node (one pool, one name in logs and admin views).
    Lexical only, the filesystem is not asked; `..` is kept, since `/a/../b` is `/b` only when `a` is
    no symbolic link."""
    return "/" + "/".join(part for part in directory.split("/") if part not in ("", "."))


def socket_path(directory: str, port: int) -> str:
    """`<directory>/.s.PGSQL.<port>`: where PostgreSQL (and PgBouncer, and halephant) listen."""
    return f"{directory.rstrip('/')}/.s.PGSQL.{port}"


def too_long(directory: str, port: int) -> str | None:
    """Why the socket of `directory` and `port` cannot be (its path would not fit), else None."""
    path = socket_path(directory, port)
    if len(path.encode(errors="surrogateescape")) <= MAX_SOCKET_PATH:
        return None
    return (
        f"the socket path {path!r} would be longer than {MAX_SOCKET_PATH} bytes, the most a Unix-domain "
        "socket's path can be"
    )


def uses_tls(host: str, tls: ServerTls | None) -> bool:
    """A connection to `host` with `tls` starts with an SSLRequest: TCP, and a mode other than disable."""
    return tls is not None and tls.context is not None and not is_socket_dir(host)


async def connect_stream(host: str, port: int, tls: ServerTls | None = None) -> anyio.abc.ByteStream:
    """An anyio stream to a node: its socket file when `host` is a directory, else TCP (after an
    SSLRequest, TLS when the server takes it, unless `tls` is None or its mode disable)."""
    if is_socket_dir(host):
        return await anyio.connect_unix(socket_path(host, port))
    if tls is not None and tls.context is not None:
        return await open_stream(host, port, tls)
    return await anyio.connect_tcp(host, port)


async def create_connection(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    tls: ServerTls | None = None,
) -> None:
    """Connect `factory()`'s protocol to a node: its socket file when `host` is a directory, else TCP
    (after an SSLRequest, TLS when the server takes it, unless `tls` is None or its mode disable)."""
    if is_socket_dir(host):
        await loop.create_unix_connection(factory, socket_path(host, port))
    elif tls is not None and tls.context is not None:
        await open_connection(loop, factory, host, port, tls)
    else:
        await loop.create_connection(factory, host, port)


class UnixListener:
    """The listening socket `<directory>/.s.PGSQL.<port>`, made as the module docstring says."""

    __slots__ = ("_ident", "directory", "path", "sock")

    def __init__(
        self, directory: str, port: int, backlog: int, mode: int = 0o777, group: int | None = None
    ) -> None:
        """Bind, give the file `mode` and `group` (a gid; None: the process's), listen and put the file
        in place; raises UnixSocketError."""
        self.directory = directory
        self.path = socket_path(directory, port)
        if not os.path.isdir(directory):
            raise UnixSocketError(f"unix_socket_dir {directory}: no such directory")
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise UnixSocketError(f"unix_socket_dir {directory}: {self.path} exists and is not a socket")
        # a name of this process's own beside the final one; too long a name, and the file is replaced
        # the plain way (removed, then bound: a connection attempt in between finds no file)
        temporary = f"{self.path}.{os.getpid()}"
        if len(os.fsencode(temporary)) > MAX_SOCKET_PATH:
            temporary = self.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # left by a crashed process of the same pid, or (the plain way) the stale file itself
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            sock.bind(temporary)
            try:
                # 0777 by default, as PostgreSQL's and PgBouncer's: who may connect is the directory's
                # to say. The group first: the mode may then let only that group connect.
                if group is not None:
                    try:
                        os.chown(temporary, -1, group)
                    except OSError as exc:
                        raise UnixSocketError(
                            f"unix_socket_group: cannot give {self.path} to group {_group_name(group)}: "
                            f"{exc.strerror} (halephant, uid {os.geteuid()}, must be a member of it)"
                        ) from exc
                os.chmod(temporary, mode)
                sock.listen(backlog)
                found = os.stat(temporary)
                if temporary != self.path:
                    os.rename(temporary, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            sock.setblocking(False)
        except UnixSocketError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise UnixSocketError(
                f"unix_socket_dir {directory}: cannot listen on {self.path}: {_why(exc)}"
            ) from exc
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._ident = (found.st_dev, found.st_ino)

    def remove(self) -> bool:
        """Remove the socket file if it is still the one this listener made; True if it was."""
        try:
            found = os.lstat(self.path)
        except OSError:
            return False
        if (found.st_dev, found.st_ino) != self._ident:
            return False  # another halephant's now
        try:
            os.unlink(self.path)
        except OSError:
            return False
        return True


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"the directory is not writable by this process (uid {os.geteuid()}): {exc.strerror}"
    return exc.strerror or str(exc)
