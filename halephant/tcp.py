"""TCP keepalive and user timeout on halephant's connections (`limits.tcp_*`), as PgBouncer sets them.

A peer that vanishes without closing (a host powered off, a network cut, a NAT that forgot the
connection) leaves a connection that looks open: an idle pooled server would be handed to a client
whose query then hangs, a vanished client in session pooling would hold its server, and a topology
probe would wait out its whole `topology.timeout` on a node behind a dead network path, every round.
Keepalive probes find such a connection while it is idle, `tcp_user_timeout` while data waits
unacknowledged.

Set on the listening socket, whose accepted client connections inherit them (Linux), so nothing is
done per client; and on each server connection and topology probe connection (`halephant.topology.probe`)
as it opens. At 0 a value is the kernel's default. Used by the proxy and the topology layers alike.
Unix-domain sockets (`unix_socket_dir`, nodes given as socket directories) are left alone.
"""

from __future__ import annotations

import functools
import math
import socket
from typing import Protocol

from halephant.config import LimitsConfig

__all__ = ["set_tcp_options"]


class _Socket(Protocol):
    """A socket, or the stand-in an event loop's transport hands out for one (same setsockopt)."""

    @property
    def family(self) -> int: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


#: (option name, the limits field, its unit in the option: seconds or milliseconds)
_OPTIONS = (
    ("TCP_KEEPIDLE", "tcp_keepidle", 1),
    ("TCP_KEEPINTVL", "tcp_keepintvl", 1),
    ("TCP_KEEPCNT", "tcp_keepcnt", 0),
    ("TCP_USER_TIMEOUT", "tcp_user_timeout", 1000),
)


@functools.cache
def _kernel_default(option: str) -> int:
    """What a new socket has for `option`: the value 0 stands for (a reload may go back to it)."""
    with socket.socket() as sock:
        return sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, option))


def set_tcp_options(sock: _Socket, limits: LimitsConfig) -> None:
    """Give `sock` (a TCP socket; anything else is left alone) the keepalive and user timeout `limits`
    ask for."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if limits.tcp_keepalive else 0)
    for option, field, unit in _OPTIONS:
        if not hasattr(socket, option):
            continue  # not on this platform
        value: float = getattr(limits, field)
        if unit:
            value = math.ceil(value * unit)
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), int(value) or _kernel_default(option))
