"""The probe's sans-IO protocol side (`halephant.topology.probe.ProbeSession`): login, the probe query's
answer fed whole, split at every offset and one byte at a time, and failures."""

from __future__ import annotations

import struct

import pytest

from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.topology.probe import ProbeFailed, ProbeResult, ProbeSession, parse_lsn

LOGIN = (
    m.authentication(codes.AUTH_CLEARTEXT_PASSWORD)
    + m.authentication(codes.AUTH_OK)
    + m.parameter_status("server_version", "15.0")
    + m.backend_key_data(42, 7)
    + m.READY_FOR_QUERY_IDLE
)


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return m.message(b"D", body)


ANSWER = (
    m.message(b"T", b"\x00\x00")  # RowDescription: ignored
    + data_row(b"t", b"57804384", b"1.5", b"2")
    + m.message(b"C", b"SELECT 1\x00")
    + m.READY_FOR_QUERY_IDLE
)


def feed_in_chunks(session: ProbeSession, data: bytes, cut: list[int]) -> tuple[bytes, bool]:
    out, ready, last = b"", False, 0
    for pos in [*cut, len(data)]:
        reply, r = session.feed(data[last:pos])
        out += reply
        ready = ready or r
        last = pos
    return out, ready


@pytest.mark.parametrize("how", ["whole", "every-offset", "byte-at-a-time"])
def test_login_and_probe(how: str) -> None:
    splits = {
        "whole": [[]],
        "every-offset": [[i] for i in range(1, len(LOGIN))],
        "byte-at-a-time": [list(range(1, len(LOGIN)))],
    }[how]
    for cut in splits:
        session = ProbeSession("probe", "secret", "postgres")
        assert b"user\x00probe\x00" in session.startup()
        reply, ready = feed_in_chunks(session, LOGIN, cut)
        assert ready and session.logged_in
        assert reply == m.password_message(b"secret")
        assert b"pg_is_in_recovery()" in session.query()
        answer_cut = [c for c in cut if c < len(ANSWER)]
        _, ready = feed_in_chunks(session, ANSWER, answer_cut)
        assert ready
        assert session.result() == ProbeResult(in_recovery=True, lsn=57804384, replay_age=1.5, timeline=2)


def test_nulls_for_a_primary() -> None:
    session = ProbeSession("probe", None, "postgres")
    session.feed(m.authentication(codes.AUTH_OK) + m.READY_FOR_QUERY_IDLE)
    session.query()
    session.feed(data_row(b"f", b"1000", None, b"3") + m.READY_FOR_QUERY_IDLE)
    assert session.result() == ProbeResult(in_recovery=False, lsn=1000, replay_age=None, timeline=3)


def test_login_refused() -> None:
    session = ProbeSession("probe", "wrong", "postgres")
    refusal = m.error_response("28P01", 'password authentication failed for user "probe"', fatal=True)
    with pytest.raises(ProbeFailed, match=r'password authentication failed for user "probe" \(28P01\)'):
        session.feed(m.authentication(codes.AUTH_CLEARTEXT_PASSWORD) + refusal)


def test_no_password_configured() -> None:
    session = ProbeSession("probe", None, "postgres")
    with pytest.raises(ProbeFailed, match="none is configured"):
        session.feed(m.authentication(codes.AUTH_CLEARTEXT_PASSWORD))


def test_query_error_and_garbage() -> None:
    session = ProbeSession("probe", None, "postgres")
    session.feed(m.authentication(codes.AUTH_OK) + m.READY_FOR_QUERY_IDLE)
    session.query()
    session.feed(m.error_response("42883", "function does not exist") + m.READY_FOR_QUERY_IDLE)
    with pytest.raises(ProbeFailed, match=r"probe query failed: function does not exist \(42883\)"):
        session.result()
    session.query()
    session.feed(data_row(b"t", b"x", None, None) + m.READY_FOR_QUERY_IDLE)
    with pytest.raises(ProbeFailed, match="not a number"):
        session.result()
    session.query()
    session.feed(m.READY_FOR_QUERY_IDLE)
    with pytest.raises(ProbeFailed, match="no row"):
        session.result()
    with pytest.raises(ProbeFailed, match="protocol violation"):
        session.feed(b"D\xff\xff\xff\xff")


def test_parse_lsn() -> None:
    assert parse_lsn("0/3420660") == 0x3420660
    assert parse_lsn("1/0") == 1 << 32
