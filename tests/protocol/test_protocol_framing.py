"""Message framing after login (`halephant.protocol.framing`): `split_frames` on the client side and
`BackendScanner` on the server side give the same answers however a stream is chunked."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halephant.errors import ProtocolViolation
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import BackendScanner, split_frames

FUZZ = settings(parent=settings.get_profile("halephant-protocol"))
MAX = 1 << 20

CLIENT_STREAM = [
    (codes.QUERY, b"SELECT 1\0"),
    (codes.PARSE, b"s1\0SELECT $1\0\0\x01\0\0\0\x17"),
    (codes.BIND, b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"),
    (codes.EXECUTE, b"\0\0\0\0\0"),
    (codes.SYNC, b""),
    (codes.FLUSH, b""),
    (codes.COPY_DATA, b"x" * 300),
    (codes.TERMINATE, b""),
]


def stream(msgs: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(m.message(bytes((t,)), p) for t, p in msgs)


def frames_fed(chunks: Iterable[bytes], max_size: int = MAX) -> tuple[list[tuple[int, bytes]], bytes]:
    """Feed chunks the way the proxy does: keep the unconsumed tail and prepend it to the next chunk."""
    tail = b""
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        buf = tail + chunk
        frames, consumed = split_frames(buf, max_size)
        out += [(t, buf[s:e]) for t, s, e in frames]
        tail = buf[consumed:]
    return out, tail


def chunked(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(c for c in cuts if 0 <= c <= len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- split_frames ------------------------------------------------------------------------------------


def test_split_frames_whole() -> None:
    data = stream(CLIENT_STREAM)
    frames, consumed = split_frames(data, MAX)
    assert consumed == len(data)
    assert [(t, data[s:e]) for t, s, e in frames] == CLIENT_STREAM


def test_split_frames_at_every_offset() -> None:
    data = stream(CLIENT_STREAM)
    for cut in range(len(data) + 1):
        assert frames_fed([data[:cut], data[cut:]]) == (CLIENT_STREAM, b""), cut


def test_split_frames_one_byte_at_a_time() -> None:
    data = stream(CLIENT_STREAM)
    assert frames_fed(data[i : i + 1] for i in range(len(data))) == (CLIENT_STREAM, b"")


def test_split_frames_keeps_incomplete_tail() -> None:
    data = stream(CLIENT_STREAM[:2])
    frames, consumed = split_frames(data[:-1], MAX)
    assert len(frames) == 1
    assert consumed == 5 + len(CLIENT_STREAM[0][1])
    assert split_frames(b"Q\0\0", MAX) == ([], 0)
    assert split_frames(b"", MAX) == ([], 0)


def test_split_frames_memoryview() -> None:
    data = stream(CLIENT_STREAM)
    frames, consumed = split_frames(memoryview(data), MAX)  # type: ignore[arg-type]
    assert consumed == len(data)
    assert [(t, data[s:e]) for t, s, e in frames] == CLIENT_STREAM


@pytest.mark.parametrize("length", [-(2**31), -1, 0, 3])
def test_split_frames_length_too_small(length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        split_frames(b"Q" + struct.pack("!i", length), MAX)


def test_split_frames_length_too_large() -> None:
    assert split_frames(b"Q" + struct.pack("!i", 100), 100) == ([], 0)  # at the limit: wait for it
    with pytest.raises(ProtocolViolation, match="too large"):
        split_frames(b"Q" + struct.pack("!i", 101), 100)


def test_split_frames_refuses_a_bad_length_behind_good_frames() -> None:
    with pytest.raises(ProtocolViolation):
        split_frames(m.SYNC + b"S" + struct.pack("!i", 2), MAX)


@FUZZ
@given(
    msgs=st.lists(
        st.tuples(st.sampled_from(sorted(codes.FRONTEND_TYPES)), st.binary(max_size=70)), max_size=12
    ),
    cuts=st.lists(st.integers(0, 1000), max_size=10),
)
def test_split_frames_any_chunking(msgs: list[tuple[int, bytes]], cuts: list[int]) -> None:
    data = stream(msgs)
    assert frames_fed(chunked(data, cuts)) == (msgs, b"")


@FUZZ
@given(data=st.binary(max_size=120), max_size=st.integers(0, 200))
def test_split_frames_any_bytes(data: bytes, max_size: int) -> None:
    try:
        frames, consumed = split_frames(data, max_size)
    except ProtocolViolation:
        return
    pos = 0
    for t, s, e in frames:  # contiguous, in order, within the data
        assert t == data[pos]
        assert s == pos + 5
        assert e - s == struct.unpack_from("!i", data, pos + 1)[0] - 4
        pos = e
    assert consumed == pos <= len(data)


# --- BackendScanner: a reference model ----------------------------------------------------------------

KEEP = frozenset({codes.PARAMETER_STATUS, codes.ERROR_RESPONSE})


@dataclass
class Expected:
    """What a scanner must report for a whole stream, computed message by message."""

    boundaries: set[int] = field(default_factory=lambda: {0})
    ready: int = 0
    kept: list[tuple[int, bytes]] = field(default_factory=list)
    status_at: list[tuple[int, int]] = field(default_factory=list)  # (end offset, status) of each Z

    def status_after(self, offset: int) -> int:
        status = codes.TX_IDLE
        for end, st_ in self.status_at:
            if end <= offset:
                status = st_
        return status


def expected_for(msgs: list[tuple[int, bytes]], keep: frozenset[int]) -> Expected:
    exp = Expected()
    pos = 0
    for t, payload in msgs:
        pos += 5 + len(payload)
        exp.boundaries.add(pos)
        if t == codes.READY_FOR_QUERY:
            exp.ready += 1
            exp.status_at.append((pos, payload[0]))
        elif t in keep:
            exp.kept.append((t, payload))
    return exp


def scan(chunks: list[bytes], keep: frozenset[int] = KEEP) -> tuple[int, int, list[tuple[int, bytes]]]:
    """Feed chunks; check at_boundary and status after each; return ready, status, kept over all chunks."""
    data = b"".join(chunks)
    msgs, tail = frames_fed([data])
    assert tail == b""
    exp = expected_for(msgs, keep)
    scanner = BackendScanner(keep)
    ready = 0
    kept: list[tuple[int, bytes]] = []
    offset = 0
    for chunk in chunks:
        scanner.feed(chunk)
        offset += len(chunk)
        ready += scanner.ready
        kept += scanner.kept
        assert scanner.at_boundary == (offset in exp.boundaries), offset
        assert scanner.status == exp.status_after(offset), offset
    assert (ready, kept) == (exp.ready, exp.kept)
    return ready, scanner.status, kept


def rfq(status: int) -> tuple[int, bytes]:
    return codes.READY_FOR_QUERY, bytes((status,))


#: the bytes of a whole ReadyForQuery (Idle), as they may also end a value inside a DataRow
READY_LOOKALIKE = b"Z\0\0\0\x05I"

SERVER_STREAM = [
    (codes.AUTHENTICATION, struct.pack("!i", 0)),
    (codes.PARAMETER_STATUS, b"server_version\x0015.4\0"),
    (codes.PARAMETER_STATUS, b"TimeZone\0UTC\0"),
    (codes.BACKEND_KEY_DATA, struct.pack("!ii", 1, 2)),
    rfq(codes.TX_IDLE),
    (codes.ROW_DESCRIPTION, b"\0\x01a\0" + b"\0" * 18),
    (codes.DATA_ROW, b"\0\x01\0\0\x01\x00" + b"y" * 256),
    (codes.COMMAND_COMPLETE, b"SELECT 1\0"),
    rfq(codes.TX_IN_TRANSACTION),
    (codes.ERROR_RESPONSE, b"SERROR\0C42601\0Msyntax error\0\0"),
    rfq(codes.TX_FAILED),
    # an extended-protocol reply: ParseComplete and BindComplete open it, passed in one step
    (codes.PARSE_COMPLETE, b""),
    (codes.BIND_COMPLETE, b""),
    (codes.DATA_ROW, b"\0\x01\0\0\0\x01y"),
    # a value ending in what looks like a whole ReadyForQuery: a chunk cut right behind it has none
    (codes.DATA_ROW, b"\0\x01\0\0\0\x06" + READY_LOOKALIKE),
    (codes.COMMAND_COMPLETE, b"SELECT 1\0"),
    rfq(codes.TX_FAILED),
    (codes.NOTICE_RESPONSE, b"SNOTICE\0\0"),
    (codes.PARAMETER_STATUS, b"application_name\0x\0"),
    rfq(codes.TX_IDLE),
]


def test_scanner_whole() -> None:
    ready, status, kept = scan([stream(SERVER_STREAM)])
    assert ready == 5
    assert status == codes.TX_IDLE
    assert [t for t, _ in kept] == [codes.PARAMETER_STATUS] * 2 + [
        codes.ERROR_RESPONSE,
        codes.PARAMETER_STATUS,
    ]


def test_scanner_split_at_every_offset() -> None:
    data = stream(SERVER_STREAM)
    for cut in range(len(data) + 1):
        scan([data[:cut], data[cut:]])


def test_scanner_one_byte_at_a_time() -> None:
    data = stream(SERVER_STREAM)
    scan([data[i : i + 1] for i in range(len(data))])


def test_scanner_ready_and_status_per_chunk() -> None:
    scanner = BackendScanner()
    scanner.feed(stream([rfq(codes.TX_IN_TRANSACTION)]))
    assert (scanner.ready, scanner.status, scanner.at_boundary) == (1, codes.TX_IN_TRANSACTION, True)
    scanner.feed(stream([(codes.COMMAND_COMPLETE, b"COMMIT\0")]))
    # `ready` counts only this chunk; `status` is still the last one seen
    assert (scanner.ready, scanner.status) == (0, codes.TX_IN_TRANSACTION)
    scanner.feed(b"")
    assert (scanner.ready, scanner.at_boundary, scanner.kept) == (0, True, [])


def test_scanner_keeps_nothing_by_default() -> None:
    scanner = BackendScanner()
    scanner.feed(stream(SERVER_STREAM))
    assert scanner.kept == []
    assert scanner.ready == 1 + 1 + 1 + 1 + 1


def test_scanner_kept_payload_is_bytes() -> None:
    scanner = BackendScanner(KEEP)
    data = stream([(codes.PARAMETER_STATUS, b"a\0b\0")])
    scanner.feed(data[:7])
    scanner.feed(data[7:])
    assert scanner.kept == [(codes.PARAMETER_STATUS, b"a\0b\0")]
    assert all(type(p) is bytes for _, p in scanner.kept)


@pytest.mark.parametrize("length", [-1, 0, 3])
def test_scanner_invalid_length(length: int) -> None:
    with pytest.raises(ProtocolViolation):
        BackendScanner().feed(b"D" + struct.pack("!i", length))


def test_scanner_ready_for_query_without_status_byte() -> None:
    with pytest.raises(ProtocolViolation):
        BackendScanner().feed(b"Z" + struct.pack("!i", 4))


# --- BackendScanner: random streams, random chunking --------------------------------------------------

_BACKEND_TYPES = [
    codes.AUTHENTICATION,
    codes.BACKEND_KEY_DATA,
    codes.COMMAND_COMPLETE,
    codes.DATA_ROW,
    codes.ERROR_RESPONSE,
    codes.NOTICE_RESPONSE,
    codes.PARAMETER_STATUS,
    codes.ROW_DESCRIPTION,
    codes.PARSE_COMPLETE,
    codes.NOTIFICATION_RESPONSE,
    codes.COPY_OUT_RESPONSE,
]
_backend_message = st.one_of(
    st.sampled_from([codes.TX_IDLE, codes.TX_IN_TRANSACTION, codes.TX_FAILED]).map(rfq),
    st.sampled_from([(codes.PARSE_COMPLETE, b""), (codes.BIND_COMPLETE, b"")]),  # what feed skips at once
    st.binary(max_size=20).map(lambda b: (codes.DATA_ROW, b + READY_LOOKALIKE)),  # ends like a reply
    st.tuples(
        st.sampled_from(_BACKEND_TYPES), st.binary(max_size=40) | st.binary(min_size=100, max_size=300)
    ),
)


@FUZZ
@given(
    msgs=st.lists(_backend_message, max_size=15),
    cuts=st.lists(st.integers(0, 3000), max_size=12),
    keep=st.sets(st.sampled_from(_BACKEND_TYPES), max_size=4).map(frozenset),
)
def test_scanner_any_chunking(msgs: list[tuple[int, bytes]], cuts: list[int], keep: frozenset[int]) -> None:
    data = stream(msgs)
    whole = scan([data], keep)
    assert scan(chunked(data, cuts), keep) == whole


@FUZZ
@given(
    data=st.binary(max_size=80) | st.lists(_backend_message, max_size=6).map(stream).map(lambda b: b[:-1]),
    cuts=st.lists(st.integers(0, 100), max_size=6),
)
def test_scanner_any_bytes(data: bytes, cuts: list[int]) -> None:
    scanner = BackendScanner(KEEP)
    try:
        for chunk in chunked(data, cuts):
            scanner.feed(chunk)
    except ProtocolViolation:
        return
    assert isinstance(scanner.status, int)
