"""The startup phase (`halephant.protocol.startup`): SSLRequest, GSSENCRequest, CancelRequest and
StartupMessage framed from bytes however they are chunked, and refused as PostgreSQL refuses them."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halephant import sqlstate
from halephant.errors import ClientError, ProtocolViolation
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupFramer,
    StartupMessage,
    StartupPacket,
)

FUZZ = settings(parent=settings.get_profile("halephant-protocol"))


def packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", 8 + len(body), code) + body


def startup_body(pairs: Iterable[tuple[str, str]]) -> bytes:
    return b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in pairs) + b"\0"


def startup(pairs: Iterable[tuple[str, str]], major: int = 3, minor: int = 0) -> bytes:
    return packet((major << 16) | minor, startup_body(pairs))


SSL = packet(codes.SSL_REQUEST_CODE)
GSSENC = packet(codes.GSSENC_REQUEST_CODE)
CANCEL = packet(codes.CANCEL_REQUEST_CODE, struct.pack("!ii", 4242, -17))
STARTUP = startup(
    [("user", "myapp"), ("database", "shop"), ("application_name", "web"), ("client_encoding", "UTF8")]
)

EXPECTED: dict[bytes, StartupPacket] = {
    SSL: SSLRequest(),
    GSSENC: GSSENCRequest(),
    CANCEL: CancelRequest(4242, -17),
    STARTUP: StartupMessage(
        0, {"user": "myapp", "database": "shop", "application_name": "web", "client_encoding": "UTF8"}
    ),
}
CASES = pytest.mark.parametrize(
    "raw", list(EXPECTED), ids=["SSLRequest", "GSSENCRequest", "CancelRequest", "StartupMessage"]
)


def feed_chunks(chunks: Iterable[bytes]) -> tuple[list[StartupPacket], StartupFramer]:
    framer = StartupFramer()
    out: list[StartupPacket] = []
    for chunk in chunks:
        out += framer.feed(chunk)
    return out, framer


def feed_all(data: bytes) -> list[StartupPacket]:
    packets, _ = feed_chunks([data])
    return packets


# --- framing -----------------------------------------------------------------------------------------


@CASES
def test_whole_packet(raw: bytes) -> None:
    packets, framer = feed_chunks([raw])
    assert packets == [EXPECTED[raw]]
    assert not framer.pending


@CASES
def test_split_at_every_offset(raw: bytes) -> None:
    for cut in range(len(raw) + 1):
        packets, framer = feed_chunks([raw[:cut], raw[cut:]])
        assert packets == [EXPECTED[raw]], cut
        assert not framer.pending


@CASES
def test_one_byte_at_a_time(raw: bytes) -> None:
    framer = StartupFramer()
    seen: list[StartupPacket] = []
    for i in range(len(raw)):
        got = framer.feed(raw[i : i + 1])
        # nothing comes out before the last byte, exactly one packet with it
        assert got == ([] if i < len(raw) - 1 else [EXPECTED[raw]])
        assert framer.pending == (i < len(raw) - 1)
        seen += got
    assert seen == [EXPECTED[raw]]


def test_ssl_refused_then_startup_in_later_chunks() -> None:
    # the normal sequence: SSLRequest, the server answers 'N', then the StartupMessage (in any chunks)
    for cut in range(len(STARTUP) + 1):
        framer = StartupFramer()
        assert framer.feed(SSL) == [SSLRequest()]
        assert not framer.pending
        assert framer.feed(STARTUP[:cut]) + framer.feed(STARTUP[cut:]) == [EXPECTED[STARTUP]]


def test_ssl_then_gssenc_refused_then_startup() -> None:
    # each kind of encryption request is answered once, in either order
    for first, second in ((SSL, GSSENC), (GSSENC, SSL)):
        framer = StartupFramer()
        assert framer.feed(first) == [EXPECTED[first]]
        assert framer.feed(second) == [EXPECTED[second]]
        assert framer.feed(STARTUP) == [EXPECTED[STARTUP]]


@pytest.mark.parametrize("request_bytes", [SSL, GSSENC], ids=["SSLRequest", "GSSENCRequest"])
def test_a_second_encryption_request_of_a_kind_is_an_unsupported_protocol(request_bytes: bytes) -> None:
    # as PostgreSQL answers it: FATAL 0A000 "unsupported frontend protocol 1234.5679: ..."
    framer = StartupFramer()
    assert framer.feed(request_bytes) == [EXPECTED[request_bytes]]
    with pytest.raises(ClientError, match="unsupported frontend protocol 1234") as caught:
        framer.feed(request_bytes)
    assert caught.value.code == sqlstate.FEATURE_NOT_SUPPORTED and caught.value.fatal


def test_bytes_pipelined_behind_startup_are_kept() -> None:
    query = m.query("SELECT 1")
    framer = StartupFramer()
    assert framer.feed(STARTUP + query) == [EXPECTED[STARTUP]]
    assert framer.pending
    assert framer.take_rest() == query
    assert not framer.pending


def test_startup_message_encoder_round_trip() -> None:
    params = {"user": "u", "database": "d", "options": "-c search_path=x", "TimeZone": "Europe/Paris"}
    assert feed_all(m.startup_message(params)) == [StartupMessage(0, params)]


def test_cancel_request_encoder_round_trip() -> None:
    assert feed_all(m.cancel_request(-1, 2**31 - 1)) == [CancelRequest(-1, 2**31 - 1)]


# --- what a StartupMessage says ----------------------------------------------------------------------


def test_database_defaults_to_user() -> None:
    (msg,) = feed_all(startup([("user", "alice")]))
    assert isinstance(msg, StartupMessage)
    assert (msg.user, msg.database) == ("alice", "alice")
    (msg,) = feed_all(startup([("user", "alice"), ("database", "")]))
    assert isinstance(msg, StartupMessage)
    assert msg.database == "alice"


def test_protocol_3_2_with_protocol_options() -> None:
    raw = startup([("user", "u"), ("_pq_.compression", "on"), ("database", "d"), ("_pq_.x", "1")], minor=2)
    assert feed_all(raw) == [
        StartupMessage(
            minor=2, params={"user": "u", "database": "d"}, protocol_options=["_pq_.compression", "_pq_.x"]
        )
    ]


def test_empty_value_is_kept() -> None:
    assert feed_all(startup([("user", "u"), ("application_name", "")])) == [
        StartupMessage(0, {"user": "u", "application_name": ""})
    ]


def test_utf8_parameters() -> None:
    assert feed_all(startup([("user", "jürgen"), ("database", "données")])) == [
        StartupMessage(0, {"user": "jürgen", "database": "données"})
    ]


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("major", "minor"), [(2, 0), (4, 0), (1, 0), (0, 0)])
def test_unsupported_protocol_version(major: int, minor: int) -> None:
    with pytest.raises(ClientError) as exc_info:
        feed_all(startup([("user", "u")], major=major, minor=minor))
    exc = exc_info.value
    assert type(exc) is ClientError  # not a protocol violation: PostgreSQL's 0A000 FATAL
    assert exc.code == sqlstate.FEATURE_NOT_SUPPORTED == "0A000"
    assert exc.message == f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
    assert exc.fatal


@pytest.mark.parametrize(
    "pairs",
    [[], [("database", "d")], [("user", ""), ("database", "d")]],
    ids=["nothing", "no-user", "empty-user"],
)
def test_missing_user(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(ClientError) as exc_info:
        feed_all(startup(pairs))
    exc = exc_info.value
    assert type(exc) is ClientError
    assert exc.code == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION == "28000"
    assert exc.message == "no PostgreSQL user name specified in startup packet"
    assert exc.fatal


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no terminator at all
        b"user\0u\0",  # pairs but no final NUL
        b"user\0u",  # value not terminated
        b"user\0u\0database\0",  # name without value
        b"user\0u\0x",  # trailing garbage after the pairs
    ],
)
def test_missing_final_nul(body: bytes) -> None:
    with pytest.raises(ProtocolViolation) as exc_info:
        feed_all(packet(codes.PROTOCOL_3_0, body))
    assert exc_info.value.code == sqlstate.PROTOCOL_VIOLATION
    assert exc_info.value.fatal


# measured against PostgreSQL 15: these log in as a normal connection ...
@pytest.mark.parametrize("value", ["false", "FALSE", "f", "fa", "n", "NO", "off", "of", "0"])
def test_replication_off_in_any_spelling_is_a_normal_connection(value: str) -> None:
    (packet,) = feed_all(startup([("user", "u"), ("replication", value)]))
    assert isinstance(packet, StartupMessage)
    assert not packet.replication


# ... these ask for a replication connection ...
@pytest.mark.parametrize("value", ["true", "t", "TR", "yes", "y", "on", "1", "database"])
def test_replication_on_in_any_spelling_asks_for_replication(value: str) -> None:
    (packet,) = feed_all(startup([("user", "u"), ("replication", value)]))
    assert isinstance(packet, StartupMessage)
    assert packet.replication


# ... and these are FATAL 22023, before the missing user would be reported
@pytest.mark.parametrize("value", ["", "o", "x", "00", " false", "falsey", "Database", "2"])
def test_replication_with_an_invalid_value_is_22023(value: str) -> None:
    with pytest.raises(ClientError) as exc_info:
        feed_all(startup([("replication", value)]))
    exc = exc_info.value
    assert exc.code == sqlstate.INVALID_PARAMETER_VALUE == "22023"
    assert exc.message == f'invalid value for parameter "replication": "{value}"'
    assert exc.fatal


def test_empty_parameter_name() -> None:
    with pytest.raises(ProtocolViolation):
        feed_all(packet(codes.PROTOCOL_3_0, b"user\0u\0\0v\0\0"))


def test_invalid_utf8_parameter() -> None:
    with pytest.raises(ProtocolViolation):
        feed_all(packet(codes.PROTOCOL_3_0, b"user\0\xff\xfe\0\0"))


@pytest.mark.parametrize("length", [-1, 0, 4, 7, codes.MAX_STARTUP_PACKET_LENGTH + 1, 2**31 - 1])
def test_invalid_length(length: int) -> None:
    # refused from the header alone: a client cannot make halephant wait for 2 GB
    header = struct.pack("!ii", length, codes.PROTOCOL_3_0)
    with pytest.raises(ProtocolViolation, match="invalid length of startup packet"):
        StartupFramer().feed(header)
    # ...from the length field alone, before the code arrives
    with pytest.raises(ProtocolViolation, match="invalid length of startup packet"):
        StartupFramer().feed(header[:4])


def test_longest_accepted_length() -> None:
    pad = codes.MAX_STARTUP_PACKET_LENGTH - 8 - len(b"user\0u\0x\0\0")
    raw = packet(codes.PROTOCOL_3_0, b"user\0u\0x\0" + b"y" * (pad - 1) + b"\0\0")
    assert len(raw) == codes.MAX_STARTUP_PACKET_LENGTH
    (msg,) = feed_all(raw)
    assert isinstance(msg, StartupMessage)
    assert msg.params["x"] == "y" * (pad - 1)


@pytest.mark.parametrize(
    ("code", "body"),
    [
        (codes.SSL_REQUEST_CODE, b"\0\0\0\0"),
        (codes.GSSENC_REQUEST_CODE, b"\0"),
        (codes.CANCEL_REQUEST_CODE, b"\0\0\0\1"),
        (codes.CANCEL_REQUEST_CODE, b"\0" * 12),
    ],
)
def test_fixed_size_requests_with_wrong_length(code: int, body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        feed_all(packet(code, body))


@pytest.mark.parametrize("request_bytes", [SSL, GSSENC], ids=["SSLRequest", "GSSENCRequest"])
@pytest.mark.parametrize("trailing", [b"\0", b"\0\0\0\x08\x04\xd2", m.query("SELECT 1")[:7]])
def test_encryption_request_with_trailing_bytes_is_pending(request_bytes: bytes, trailing: bytes) -> None:
    # the proxy refuses bytes sent behind an SSLRequest before its answer (PostgreSQL: "received
    # unencrypted data after SSL request"); it can only do so if the framer keeps them pending
    packets, framer = feed_chunks([request_bytes + trailing])
    assert packets == [EXPECTED[request_bytes]]
    assert framer.pending


@pytest.mark.parametrize("request_bytes", [SSL, GSSENC], ids=["SSLRequest", "GSSENCRequest"])
def test_encryption_request_with_whole_packet_behind_it_is_pending(request_bytes: bytes) -> None:
    packets, framer = feed_chunks([request_bytes + STARTUP])
    assert packets == [EXPECTED[request_bytes]]
    assert framer.pending


# --- any bytes: packets or a ClientError, nothing else --------------------------------------------------


def _startup_like() -> st.SearchStrategy[bytes]:
    # mostly well-framed packets with random bodies and codes, so the fuzzing gets past the length check
    code = st.sampled_from(
        [
            codes.SSL_REQUEST_CODE,
            codes.GSSENC_REQUEST_CODE,
            codes.CANCEL_REQUEST_CODE,
            codes.PROTOCOL_3_0,
            codes.PROTOCOL_3_0 | 2,
            2 << 16,
        ]
    ) | st.integers(-(2**31), 2**31 - 1)
    body = st.binary(max_size=40) | st.lists(
        st.sampled_from([b"user", b"u", b"database", b"_pq_.x", b"", b"\xff", b"options"]), max_size=8
    ).map(lambda parts: b"".join(p + b"\0" for p in parts) + b"\0")
    framed = st.builds(packet, code, body)
    return st.lists(framed | st.binary(max_size=12), min_size=1, max_size=4).map(b"".join)


@FUZZ
@given(data=_startup_like(), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_any_bytes_give_packets_or_client_error(data: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    framer = StartupFramer()
    try:
        for a, b in itertools.pairwise(bounds):
            for p in framer.feed(data[a:b]):
                assert isinstance(p, SSLRequest | GSSENCRequest | CancelRequest | StartupMessage)
    except ClientError as exc:  # ProtocolViolation is a ClientError
        assert exc.fatal
        assert exc.code in (
            sqlstate.PROTOCOL_VIOLATION,
            sqlstate.FEATURE_NOT_SUPPORTED,
            sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
        )


@FUZZ
@given(
    params=st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12).filter(
            lambda k: not k.startswith("_pq_.")
        ),
        st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20),
        max_size=5,
    ),
    user=st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12),
    cut=st.integers(0, 400),
)
def test_startup_round_trip_any_parameters(params: dict[str, str], user: str, cut: int) -> None:
    params = {**params, "user": user}
    raw = m.startup_message(params)
    packets, framer = feed_chunks([raw[:cut], raw[cut:]])
    assert packets == [StartupMessage(0, params)]
    assert not framer.pending
