"""A topology probe's TCP connection gets `limits.tcp_*` (keepalive, user timeout) as server connections
do, also after a reload; a probe over a Unix-domain socket is left alone. Against a stand-in node that
answers the SSLRequest (`tls.mode` prefer, the default) with N, as PostgreSQL with `ssl = off` does, and
the login with AuthenticationOk and ReadyForQuery."""

from __future__ import annotations

import shutil
import socket
import tempfile
import textwrap
from pathlib import Path

import anyio
import anyio.abc

from halephant.config import Config, read_config_text, validate_config
from halephant.protocol import messages as m
from halephant.topology.monitor import TopologyMonitor
from halephant.topology.probe import ProbeConnection

LOGIN_OK = m.authentication(0) + m.ready_for_query(ord("I"))


def _config(node: str, limits: str) -> Config:
    text = (
        f'clusters:\n  main:\n    nodes: ["{node}"]\n'
        "databases:\n  app:\n    cluster: main\n"
        "users:\n  app:\n    password: secret\n"
        "limits:\n" + textwrap.indent(limits, "  ")
    )
    return validate_config(read_config_text(text, "halephant.yaml"))


async def _node(listener: anyio.abc.SocketListener) -> None:
    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            if await stream.receive() == m.SSL_REQUEST:  # over TCP: a Unix-domain socket never has TLS
                await stream.send(b"N")
                await stream.receive()  # the StartupMessage
            await stream.send(LOGIN_OK)
            await anyio.sleep_forever()

    await listener.serve(answer)


def _options(probe: ProbeConnection) -> tuple[int, int, int, int, int]:
    assert probe._stream is not None
    sock = probe._stream.extra(anyio.abc.SocketAttribute.raw_socket)
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


def test_probe_connections_get_the_tcp_options_and_a_reload_s_new_ones() -> None:
    async def main() -> None:
        async with (
            await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(_node, listener)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            limits = "tcp_keepidle: 7s\ntcp_keepintvl: 3s\ntcp_keepcnt: 4\ntcp_user_timeout: 9s\n"
            config = _config(f"127.0.0.1:{port}", limits)
            monitor = TopologyMonitor(config, lambda _name, _view: None)
            (probe,) = monitor._probes["main"]
            try:
                await probe._connect()
                assert _options(probe) == (1, 7, 3, 4, 9000)
                await probe.aclose()
                # a reload keeps the probe of an unchanged node; its next connection gets the new options
                monitor.reconfigure(_config(f"127.0.0.1:{port}", "tcp_keepidle: 11s\ntcp_keepalive: false\n"))
                assert monitor._probes["main"] == [probe]
                await probe._connect()
                keepalive, idle, *_ = _options(probe)
                assert (keepalive, idle) == (0, 11)
            finally:
                await probe.aclose()
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_probe_over_a_unix_socket_is_left_alone() -> None:
    directory = Path(tempfile.mkdtemp(prefix="halephant-probe-"))
    try:

        async def main() -> None:
            path = directory / ".s.PGSQL.5432"
            async with await anyio.create_unix_listener(path) as listener, anyio.create_task_group() as tg:
                tg.start_soon(_node, listener)
                config = _config(f"{directory}:5432", "tcp_keepidle: 7s\n")
                probe = ProbeConnection(str(directory), 5432, "app", "secret", "postgres", config.limits)
                await probe._connect()  # setting TCP options on it would raise
                await probe.aclose()
                tg.cancel_scope.cancel()

        anyio.run(main)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
