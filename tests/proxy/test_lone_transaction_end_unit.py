"""A lone ROLLBACK or COMMIT between transactions (`ClientConnection._end_outside_transaction`): which
Query texts are answered locally, and only from a client whose answer from PostgreSQL is known.

The bytes are PostgreSQL 15's own (read off a real server, less its F/L/R fields: source file, line and
function, which halephant's messages never carry). End to end, with the primary down:
tests/e2e/test_lone_transaction_end.py.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest
from support.fakes import RecordingTransport, SendsDirectly

from halephant.proxy import client as client_module
from halephant.proxy.client import ClientConnection
from halephant.types import Pin

NOTICE = b"N\x00\x00\x00\x43SWARNING\x00VWARNING\x00C25P01\x00Mthere is no transaction in progress\x00\x00"
ROLLBACK = NOTICE + b"C\x00\x00\x00\x0dROLLBACK\x00" + b"Z\x00\x00\x00\x05I"
COMMIT = NOTICE + b"C\x00\x00\x00\x0bCOMMIT\x00" + b"Z\x00\x00\x00\x05I"

ANSWERED = {
    "ROLLBACK": ROLLBACK,
    "rollback;": ROLLBACK,
    "ABORT": ROLLBACK,
    "Rollback Work": ROLLBACK,
    "abort transaction ;": ROLLBACK,
    "\n\tROLLBACK\r\n;\f ": ROLLBACK,
    "COMMIT": COMMIT,
    "commit;": COMMIT,
    "END": COMMIT,
    "COMMIT TRANSACTION": COMMIT,
    "  End Work ;  \n": COMMIT,
}
#: left to the server: other statements, errors outside a transaction block, or text it reads otherwise
NOT_ANSWERED = [
    "ROLLBACK AND CHAIN",  # ERROR 25P01 outside a transaction block
    "COMMIT AND CHAIN",
    "ROLLBACK TO SAVEPOINT a",
    "ROLLBACK PREPARED 'x'",
    "COMMIT PREPARED 'x'",
    "ROLLBACK; SELECT 1",
    "ROLLBACK;;",
    "ROLLBACK -- why",
    "/* tag */ ROLLBACK",
    "ROLLBACK\v",  # a syntax error in PostgreSQL 15
    "ROLLBACKWORK",
    "ROLLBACK WORK TRANSACTION",
    "END IF",
]


class _Client(SendsDirectly):
    """What `_end_outside_transaction` reads of a transaction-mode client with no server linked."""

    def __init__(self, **overrides: Any) -> None:
        self.transaction_mode = True
        self._pending_pin: Pin | None = None
        self.outstanding = 0
        self.unsynced = False
        self.pinned = False
        self.settings: dict[str, str] = {}
        self._first_checked = False
        self.sweep_links = 3
        self.transport = RecordingTransport()
        self.target = SimpleNamespace(cluster="main")
        # no primary known: the only time the answer is local (see `test_not_while_a_primary_is_known`)
        view = SimpleNamespace(primary=None)
        self.app = SimpleNamespace(manager=SimpleNamespace(cluster_view=lambda name: view))
        for name, value in overrides.items():
            setattr(self, name, value)


def _query(text: str) -> bytes:
    payload = text.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(payload) + 4) + payload


def _answer(client: _Client, buf: bytes, start: int = 5, end: int | None = None) -> bool:
    end = len(buf) if end is None else end
    return ClientConnection._end_outside_transaction(client, buf, start, end)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ANSWERED)
def test_a_lone_end_is_answered_as_postgresql_answers_it(text: str) -> None:
    client = _Client(_first_checked=True)
    assert _answer(client, _query(text))
    assert b"".join(client.transport.written) == ANSWERED[text]
    assert client._first_checked is False
    assert client.sweep_links == -1  # activity, for client_idle_timeout


@pytest.mark.parametrize("text", NOT_ANSWERED)
def test_anything_else_is_left_to_the_server(text: str) -> None:
    client = _Client()
    assert not _answer(client, _query(text))
    assert client.transport.written == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"transaction_mode": False},
        {"_pending_pin": Pin("an inspector wants this statement's server")},
        {"outstanding": 1},
        {"unsynced": True},
        {"pinned": True},
        # PostgreSQL's answer depends on these: no notice at client_min_messages = error, words in
        # another language with lc_messages
        {"settings": {"client_min_messages": "error"}},
        {"settings": {"application_name": "x", "lc_messages": "de_DE.UTF-8"}},
    ],
    ids=lambda o: ",".join(o),
)
def test_only_a_client_with_nothing_open_or_set_is_answered_locally(overrides: dict[str, Any]) -> None:
    client = _Client(**overrides)
    assert not _answer(client, _query("ROLLBACK"))
    assert client.transport.written == []


def test_other_settings_do_not_matter() -> None:
    client = _Client(settings={"application_name": "app", "timezone": "UTC"})
    assert _answer(client, _query("ROLLBACK"))


def test_not_when_more_follows_it_in_the_same_chunk() -> None:
    query = _query("ROLLBACK")
    client = _Client()
    assert not _answer(client, query + _query("SELECT 1"), end=len(query))
    assert not _answer(client, query + b"Q\0\0", end=len(query))  # the start of another message
    assert client.transport.written == []


def test_not_with_bytes_after_the_text_inside_the_message() -> None:
    # PostgreSQL refuses a Query with anything after its string ("invalid message format")
    payload = b"ROLLBACK\0junk\0"
    buf = b"Q" + struct.pack("!i", len(payload) + 4) + payload
    assert not _answer(_Client(), buf)


@pytest.mark.parametrize("text", ANSWERED)
def test_the_first_byte_that_process_looks_at_lets_every_answered_text_through(text: str) -> None:
    # `_process` calls `_end_outside_transaction` only for a Query whose text starts with one of these
    assert text.encode()[0] in client_module._END_INITIALS
    assert not {ord(c) for c in "BSIUDWV"} & client_module._END_INITIALS  # BEGIN, SELECT, INSERT, ...


def test_not_while_a_primary_is_known() -> None:
    # a server's own defaults (ALTER ROLE ... SET client_min_messages = error, lc_messages) may change
    # PostgreSQL's answer, and halephant cannot see them: with a primary there, the server answers
    client = _Client()
    client.app.manager.cluster_view = lambda name: SimpleNamespace(primary=object())
    assert not _answer(client, _query("ROLLBACK"))
    assert client.transport.written == []
