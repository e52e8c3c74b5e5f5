"""The hand-over of a transaction-mode client's LISTEN from its own server connection to the shared
listener (`halephant.proxy.session_state`): every notification reaches the client once.

While the client's former server undoes its LISTENs, it may still send notifications the shared listener
also delivers, and ones the shared listener never saw (committed before it started listening). These
tests drive `deliver` (the shared listener's copy) and `late_notification` (the server's) in every order,
and the server connection's hand-on of what follows the hand-over query's answer in the same chunk.
End to end, `test_listen_is_handed_over_without_losing_a_notification` (tests/e2e/test_session_features.py)
hands over twenty times with a NOTIFY right behind each LISTEN; the race itself (a shared listener that
is still connecting) shows in the conformance workload "psycopg async: LISTEN / NOTIFY" under CPU load.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

from support.fakes import RecordingTransport, SendsDirectly

from halephant.protocol import messages as m
from halephant.proxy import session_state
from halephant.proxy.server import ServerConnection
from halephant.proxy.session_state import SessionState
from halephant.proxy.stand_in import StandIn


class _Client(SendsDirectly):
    """What `deliver` and `late_notification` read of a client between transactions."""

    def __init__(self) -> None:
        self.session = SessionState()
        self.session.listening = {"chan"}
        # as `_clean_up_now` leaves it when it hands the channel over
        self.session.handover_until = time.monotonic() + session_state.RELAYED_SECONDS
        self.transport = RecordingTransport()
        self.server = None
        self.write_paused = False
        self.waiting_pool = None
        self.is_closed = False
        self.settings: dict[str, str] = {}  # client_encoding not set: notifications pass on as they are


def _note(payload: str, pid: int = 42) -> bytes:
    body = struct.pack("!i", pid) + b"chan\0" + payload.encode() + b"\0"
    return b"A" + struct.pack("!i", len(body) + 4) + body


def _client() -> Any:
    return _Client()


def test_the_servers_late_copy_of_what_the_listener_delivered_is_dropped() -> None:
    client = _client()
    session_state.deliver(client, _note("one"))
    session_state.late_notification(client, _note("one"))
    assert client.transport.written == [_note("one")]


def test_what_only_the_server_saw_is_delivered_and_the_listeners_later_copy_dropped() -> None:
    client = _client()
    session_state.late_notification(client, _note("before"))  # committed before the listener listened
    session_state.late_notification(client, _note("both"))
    session_state.deliver(client, _note("both"))  # the listener's copy of the second one
    assert client.transport.written == [_note("before"), _note("both")]


def test_distinct_notifications_from_both_all_arrive() -> None:
    client = _client()
    session_state.deliver(client, _note("a"))
    session_state.late_notification(client, _note("b"))
    session_state.deliver(client, _note("c"))
    session_state.late_notification(client, _note("a", pid=7))  # same payload, another sender
    assert client.transport.written == [_note("a"), _note("b"), _note("c"), _note("a", pid=7)]


def test_one_copy_cancels_one_copy() -> None:
    # the same notification sent twice (two transactions of one sender): both copies of each arrive once
    client = _client()
    session_state.deliver(client, _note("x"))
    session_state.deliver(client, _note("x"))
    session_state.late_notification(client, _note("x"))
    session_state.late_notification(client, _note("x"))
    assert client.transport.written == [_note("x"), _note("x")]


def test_a_client_that_left_gets_nothing() -> None:
    client = _client()
    client.is_closed = True
    session_state.late_notification(client, _note("gone"))
    assert client.transport.written == []


def test_outside_a_hand_over_the_listeners_deliveries_are_not_recorded() -> None:
    client = _client()
    client.session.handover_until = time.monotonic() - 1  # the window has passed
    session_state.deliver(client, _note("later"))
    assert not client.session.handed_over and client.session.handover_until == 0.0
    assert client.transport.written == [_note("later")]


# --- the server connection: what comes right behind the hand-over's own query -------------------------


class _StandIn(StandIn):
    """Takes the client's place on the server, as the reset query's stand-in does after the hand-over."""

    def __init__(self) -> None:
        self.transport = RecordingTransport()

    def server_ready(self, n: int, status: int, at_boundary: bool) -> None:
        pass


class _Linked:
    """The client linked to the server while its hand-over query runs."""

    transaction_mode = True
    prepared = None
    held_back = False

    def __init__(self) -> None:
        self.transport = RecordingTransport()
        self.relayed: list[bytes] = []

    def notification_relayed(self, payload: bytes) -> None:
        self.relayed.append(payload)

    def settings_applied(self, error: object) -> None:
        pass


def test_a_notification_right_behind_the_handover_querys_answer_reaches_whoever_is_linked_next() -> None:
    # The server still listens while it runs `NOTIFY halephant_listen_handover`; a notification it sends
    # right behind that query's ReadyForQuery may share the chunk. The query's callback hands the server
    # to the reset query's stand-in, whose sink delivers notifications to the client (`late_notification`):
    # the rest of the chunk must go there, not be dropped.
    loop = asyncio.new_event_loop()
    try:
        server = ServerConnection(None, None, {"user": "u"}, None, loop)  # type: ignore[arg-type]
        server.transport = RecordingTransport()  # type: ignore[assignment]
        client, stand_in = _Linked(), _StandIn()
        server.client = client  # type: ignore[assignment]
        server.run_internal(
            "NOTIFY halephant_listen_handover", lambda _rows, _error: _hand_on(server, stand_in)
        )
        answer = m.message(b"C", b"NOTIFY\0") + m.READY_FOR_QUERY_IDLE
        server.data_received(answer + _note("right behind"))
        assert stand_in.transport.written == [_note("right behind")]
        assert client.transport.written == []
    finally:
        loop.close()


def _hand_on(server: ServerConnection, stand_in: StandIn) -> None:
    server.client = stand_in  # type: ignore[assignment]
