"""Client output held to the end of the loop iteration (`halephant.proxy.output`): held, written in order
in one write per client, once per iteration; written at once where nothing is gained by waiting; and
never lost or reordered by a close. End to end every test through halephant runs over it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from support.fakes import RecordingTransport

from halephant.protocol import messages as m
from halephant.proxy import output
from halephant.proxy.client import READY, ClientConnection
from halephant.proxy.server import ServerConnection
from halephant.proxy.stand_in import StandIn


class _Transport(RecordingTransport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        output.held.clear()
        loop.close()


class _Client(ClientConnection):
    __slots__ = ()

    def _closed(self, reason: str, terminated: bool = False) -> None:
        pass  # the pool's side of a close is not tested here


def _client(loop: asyncio.AbstractEventLoop) -> Any:
    client = _Client(SimpleNamespace(loop=loop))  # type: ignore[arg-type]
    client.transport = _Transport()  # type: ignore[assignment]
    return client


def _run_one_iteration(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))


def test_output_is_held_then_written_in_order_in_one_write(loop: asyncio.AbstractEventLoop) -> None:
    a, b = _client(loop), _client(loop)
    a.hold(b"1")
    b.hold(b"x")
    a.hold(b"2")
    assert a.transport.written == [] and b.transport.written == []
    assert output.held == [a, b]
    _run_one_iteration(loop)
    assert a.transport.written == [b"12"]
    assert b.transport.written == [b"x"]
    assert output.held == [] and a.held_output is None


def test_what_halephant_says_itself_goes_at_once_unless_held(loop: asyncio.AbstractEventLoop) -> None:
    # `send`: at once, so that a client that reads nothing stops halephant's reading right away
    # (`pause_writing`); behind held output, never ahead of it
    client = _client(loop)
    client.send(b"a")
    assert client.transport.written == [b"a"]
    client.hold(b"b")
    client.send(b"c")
    assert client.transport.written == [b"a"]
    _run_one_iteration(loop)
    assert client.transport.written == [b"a", b"bc"]


def test_one_flush_is_scheduled_per_iteration(loop: asyncio.AbstractEventLoop) -> None:
    scheduled: list[Any] = []
    real = loop.call_soon

    def call_soon(callback: Any, *args: Any, **kwargs: Any) -> Any:
        if callback is output.flush:  # (not the loop's own, for the test's sleep)
            scheduled.append(callback)
        return real(callback, *args, **kwargs)

    loop.call_soon = call_soon  # type: ignore[method-assign]
    clients = [_client(loop) for _ in range(5)]
    for c in clients:
        c.hold(b"a")
        c.hold(b"b")
    assert scheduled == [output.flush]
    _run_one_iteration(loop)
    clients[0].hold(b"c")  # the next iteration schedules its own
    assert scheduled == [output.flush, output.flush]


def test_close_writes_what_is_held_before_it_closes(loop: asyncio.AbstractEventLoop) -> None:
    client = _client(loop)
    client.state = READY
    client.hold(b"answer")
    client.send(m.client_error_response(ClientErrorLike(), fatal=True))
    client.close("test")
    assert client.transport.written == [b"answer" + m.client_error_response(ClientErrorLike(), fatal=True)]
    assert client.transport.closed
    _run_one_iteration(loop)  # the scheduled flush finds nothing left: nothing is written twice
    assert len(client.transport.written) == 1


def test_a_lost_connections_output_is_dropped(loop: asyncio.AbstractEventLoop) -> None:
    client = _client(loop)
    client.state = READY
    client.hold(b"answer")
    client.connection_lost(None)
    _run_one_iteration(loop)
    assert client.transport.written == []


def test_a_failing_write_does_not_keep_the_others_output(loop: asyncio.AbstractEventLoop) -> None:
    broken, fine = _client(loop), _client(loop)

    def refuse(data: bytes) -> None:
        raise RuntimeError("handle is closed")

    broken.transport.write = refuse
    broken.hold(b"lost")
    fine.hold(b"kept")
    _run_one_iteration(loop)
    assert fine.transport.written == [b"kept"]


# --- the server's hot path: held where there is something to batch with, at once where there is not ---


def _ready(tag: bytes = b"SELECT 1") -> bytes:
    return m.message(b"C", tag + b"\0") + m.READY_FOR_QUERY_IDLE


def _row() -> bytes:
    body = struct.pack("!hi", 1, 1) + b"1"
    return m.message(b"D", body)


class _Pool:
    def __init__(self, busy: int) -> None:
        self.active = set(range(busy))


def _server(loop: asyncio.AbstractEventLoop, client: Any, busy: int) -> ServerConnection:
    server = ServerConnection(None, _Pool(busy), {"user": "u"}, None, loop)  # type: ignore[arg-type]
    server.transport = RecordingTransport()  # type: ignore[assignment]
    server.login.set_result(None)
    server.client = client
    return server


class _Linked:
    """A client as the hot path reads it; `server_ready` is where the transaction would end."""

    transaction_mode = True
    statement_mode = False
    prepared = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.app = SimpleNamespace(loop=loop)
        self.transport = RecordingTransport()
        self.held_output: bytes | None = None
        self.ready: list[int] = []

    send = ClientConnection.send
    hold = ClientConnection.hold

    def server_ready(self, n: int, status: int, at_boundary: bool) -> None:
        self.ready.append(n)


def test_an_answer_is_held_while_other_servers_of_its_pool_are_busy(loop: asyncio.AbstractEventLoop) -> None:
    client = _Linked(loop)
    _server(loop, client, busy=3).data_received(_ready())
    assert client.transport.written == [] and client.ready == [1]
    _run_one_iteration(loop)
    assert client.transport.written == [_ready()]


def test_an_answer_inside_a_transaction_is_written_at_once(loop: asyncio.AbstractEventLoop) -> None:
    # its transaction's locks wait for the client's next statement: never held longer than it takes
    client = _Linked(loop)
    other = _Linked(loop)
    _server(loop, other, busy=3).data_received(_ready())  # something is held in this iteration already
    in_transaction = m.message(b"C", b"UPDATE 1\0") + m.message(b"Z", b"T")
    _server(loop, client, busy=3).data_received(in_transaction)
    assert client.transport.written == [in_transaction] and client.ready == [1]
    assert other.transport.written == []


def test_a_lone_answer_is_written_at_once(loop: asyncio.AbstractEventLoop) -> None:
    client = _Linked(loop)
    _server(loop, client, busy=1).data_received(_ready())
    assert client.transport.written == [_ready()]


def test_behind_output_held_in_this_iteration_a_lone_answer_is_held_too(
    loop: asyncio.AbstractEventLoop,
) -> None:
    first, second = _Linked(loop), _Linked(loop)
    _server(loop, first, busy=3).data_received(_ready())
    _server(loop, second, busy=1).data_received(_ready(b"SELECT 2"))
    assert second.transport.written == []
    _run_one_iteration(loop)
    assert first.transport.written == [_ready()] and second.transport.written == [_ready(b"SELECT 2")]


def test_part_of_an_answer_goes_at_once_unless_output_is_held_ahead_of_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    client = _Linked(loop)
    server = _server(loop, client, busy=3)
    server.data_received(_row())  # no ReadyForQuery: written at once
    assert client.transport.written == [_row()]
    client.hold(b"N-notice")  # held
    server.data_received(_row())  # must not overtake it
    assert client.transport.written == [_row()]
    _run_one_iteration(loop)
    assert client.transport.written == [_row(), b"N-notice" + _row()]


def test_a_stand_in_receives_at_once(loop: asyncio.AbstractEventLoop) -> None:
    class _Sink(StandIn):
        def __init__(self) -> None:
            self.transport = RecordingTransport()

        def server_ready(self, n: int, status: int, at_boundary: bool) -> None:
            pass

    sink = _Sink()
    _server(loop, sink, busy=5).data_received(_ready())
    assert sink.transport.written == [_ready()]
    assert output.held == []


class ClientErrorLike:
    """What `messages.client_error_response` reads of an error."""

    code = "57P01"
    message = "terminating connection due to administrator command"
    detail = None
    hint = None


def test_the_same_rule_off_the_hot_path(loop: asyncio.AbstractEventLoop) -> None:
    # `ServerConnection._to_client`: what `_relay` and the prepared-statement path use
    busy, alone = _server(loop, _Linked(loop), busy=3), _server(loop, _Linked(loop), busy=1)
    inside, over = _Linked(loop), _Linked(loop)
    busy._to_client(b"inside", inside, False)  # type: ignore[arg-type]
    assert inside.transport.written == [b"inside"]
    alone._to_client(b"lone", over, True)  # type: ignore[arg-type]
    assert over.transport.written == [b"lone"]
    busy._to_client(b"over", over, True)  # type: ignore[arg-type]
    busy._to_client(b"inside", inside, False)  # type: ignore[arg-type]
    assert over.transport.written == [b"lone"] and inside.transport.written == [b"inside", b"inside"]
    _run_one_iteration(loop)
    assert over.transport.written == [b"lone", b"over"]
