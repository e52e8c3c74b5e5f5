"""Peer authentication (`halephant.types.Peer`, pg_hba.conf's `peer`): who is at the other end of a
Unix-domain socket, as the kernel says, and whether that operating system user may log in as the user
it asked for.

The user id comes from `SO_PEERCRED` (Linux), read once per login from the accepted socket, its name
from the user database (`pwd.getpwuid`, as PostgreSQL's `getpwuid`). The refusals are PostgreSQL's:
FATAL 28000 `Peer authentication failed for user "..."` to the client, and the reason in the log in
PostgreSQL's words (`no match in usermap ...`, `provided user name (...) and authenticated user name
(...) do not match`, `could not look up local user ID ...`).
"""

from __future__ import annotations

import errno
import pwd
import socket
import struct
from typing import Any

from halephant import sqlstate
from halephant.errors import ClientError
from halephant.types import Peer

__all__ = ["os_user_id", "peer_refusal"]

#: struct ucred: pid, uid, gid
_UCRED = struct.Struct("3i")


def os_user_id(sock: Any) -> int:
    """The user id of the process at the other end of the Unix-domain socket `sock` (a socket, or the
    loop's stand-in for one). Raises OSError, ENOSYS on a platform without `SO_PEERCRED`."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        raise OSError(errno.ENOSYS, "peer authentication is not supported on this platform")
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    return int(uid)


def peer_refusal(transport: Any, user: str, method: Peer) -> tuple[ClientError, str] | None:
    """The FATAL 28000 for a client that `method` does not let in as `user`, and the reason to log; None:
    in. Looks the user name up in the user database (`getpwuid`: a local lookup for most systems, done
    once per login, as PgBouncer and PostgreSQL do it)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        # (a plugin answered Peer for a TCP client: PostgreSQL refuses such an hba line at load)
        return _failed(user), f"peer authentication is only supported on local sockets ({method.reason})"
    try:
        uid = os_user_id(sock)
    except OSError as exc:
        why = exc.strerror if exc.errno == errno.ENOSYS else f"could not get peer credentials: {exc.strerror}"
        return _failed(user), f"{why} ({method.reason})"
    try:
        system_user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return _failed(user), f"could not look up local user ID {uid}: user does not exist ({method.reason})"
    usermap = method.map
    if usermap is None:
        if system_user == user:
            return None
        return (
            _failed(user),
            f"provided user name ({user}) and authenticated user name ({system_user}) do not match "
            f"({method.reason})",
        )
    if usermap.allows(system_user, user):
        return None
    return (
        _failed(user),
        f'no match in usermap "{usermap.name}" for user "{user}" authenticated as "{system_user}" '
        f"({method.reason})",
    )


def _failed(user: str) -> ClientError:
    return ClientError(
        sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
        f'Peer authentication failed for user "{user}"',
        fatal=True,
    )
