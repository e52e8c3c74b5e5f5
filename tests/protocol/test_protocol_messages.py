"""Encoders and decoders (`halephant.protocol.messages`): round trips, byte layouts checked against the
protocol documentation, and decoders that answer garbage with `ProtocolViolation` and nothing else."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halephant.errors import ProtocolViolation
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import split_frames

FUZZ = settings(parent=settings.get_profile("halephant-protocol"))

#: text as PostgreSQL's C strings carry it: any UTF-8 encodable character but NUL
cstr_text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=30)
int32 = st.integers(-(2**31), 2**31 - 1)


def unframe(raw: bytes) -> tuple[int, bytes]:
    """The single message in `raw`: (type, payload); fails if there is more or less than one."""
    frames, consumed = split_frames(raw, 1 << 20)
    assert consumed == len(raw)
    assert len(frames) == 1
    t, s, e = frames[0]
    return t, raw[s:e]


def parse_payload(name: bytes, text: bytes, oids: list[int]) -> bytes:
    # built from the protocol docs, independently of halephant's encoders (it has none for Parse)
    return name + b"\0" + text + b"\0" + struct.pack(f"!h{len(oids)}I", len(oids), *oids)


# --- byte layouts ------------------------------------------------------------------------------------


def test_message_framing() -> None:
    assert m.message(b"Q", b"x\0") == b"Q\x00\x00\x00\x06x\0"
    assert m.message(b"S") == b"S\x00\x00\x00\x04"
    assert m.SYNC == b"S\0\0\0\x04"
    assert m.TERMINATE == b"X\0\0\0\x04"
    assert m.READY_FOR_QUERY_IDLE == b"Z\0\0\0\x05I"
    assert m.ready_for_query(codes.TX_FAILED) == b"Z\0\0\0\x05E"
    assert m.AUTHENTICATION_OK == b"R\0\0\0\x08\0\0\0\0"
    assert m.PARSE_COMPLETE == b"1\0\0\0\x04"
    assert m.CLOSE_COMPLETE == b"3\0\0\0\x04"


def test_negotiate_protocol_version_layout() -> None:
    raw = m.negotiate_protocol_version(0, ["_pq_.a", "_pq_.bc"])
    assert unframe(raw) == (codes.NEGOTIATE_PROTOCOL_VERSION, b"\0\0\0\0\0\0\0\x02_pq_.a\0_pq_.bc\0")


def test_startup_and_cancel_layout() -> None:
    assert m.startup_message({"user": "u"}) == b"\0\0\0\x10\0\x03\0\0user\0u\0\0"
    assert m.cancel_request(1, 2) == struct.pack("!iiii", 16, 80877102, 1, 2)


def test_notice_response_fields() -> None:
    t, payload = unframe(m.notice_response("01000", "careful", hint="look"))
    assert t == codes.NOTICE_RESPONSE
    assert m.decode_error_fields(payload) == {
        "S": "NOTICE",
        "V": "NOTICE",
        "C": "01000",
        "M": "careful",
        "H": "look",
    }


# --- round trips -------------------------------------------------------------------------------------


@FUZZ
@given(
    code=st.from_regex(r"[0-9A-Z]{5}", fullmatch=True),
    text=cstr_text,
    hint=st.none() | cstr_text.filter(bool),
    detail=st.none() | cstr_text.filter(bool),
    fatal=st.booleans(),
)
def test_error_response_round_trip(
    code: str, text: str, hint: str | None, detail: str | None, fatal: bool
) -> None:
    t, payload = unframe(m.error_response(code, text, hint=hint, detail=detail, fatal=fatal))
    assert t == codes.ERROR_RESPONSE
    severity = "FATAL" if fatal else "ERROR"
    expected = {"S": severity, "V": severity, "C": code, "M": text}
    if detail:
        expected["D"] = detail
    if hint:
        expected["H"] = hint
    assert m.decode_error_fields(payload) == expected


@FUZZ
@given(name=cstr_text, value=cstr_text)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    t, payload = unframe(m.parameter_status(name, value))
    assert t == codes.PARAMETER_STATUS
    assert m.decode_parameter_status(payload) == (name, value)
    assert m.decode_parameter_status(memoryview(payload)) == (name, value)


def test_a_parameter_status_in_another_encoding_is_kept_byte_for_byte() -> None:
    # a LATIN1 session's session_authorization for the role "josé": not UTF-8, and no protocol violation
    payload = b"session_authorization\0jos\xe9\0"
    name, value = m.decode_parameter_status(payload)
    assert name == "session_authorization"
    assert m.parameter_status(name, value) == m.message(b"S", payload)


@FUZZ
@given(pid=int32, key=int32)
def test_backend_key_data_round_trip(pid: int, key: int) -> None:
    t, payload = unframe(m.backend_key_data(pid, key))
    assert t == codes.BACKEND_KEY_DATA
    assert m.decode_backend_key_data(payload) == (pid, key)


@FUZZ
@given(sql=cstr_text)
def test_query_round_trip(sql: str) -> None:
    t, payload = unframe(m.query(sql))
    assert t == codes.QUERY
    assert m.decode_query(payload) == sql
    assert m.decode_query(memoryview(payload)) == sql


@FUZZ
@given(name=cstr_text, text=cstr_text, oids=st.lists(st.integers(0, 2**32 - 1), max_size=8))
def test_parse_decodes(name: str, text: str, oids: list[int]) -> None:
    payload = parse_payload(name.encode(), text.encode(), oids)
    assert m.decode_parse(payload) == (name, text, tuple(oids))
    assert m.decode_parse(memoryview(payload)) == (name, text, tuple(oids))


def bind_payload(
    portal: bytes,
    statement: bytes,
    param_formats: list[int],
    params: list[bytes | None],
    result_formats: list[int],
) -> bytes:
    # built from the protocol docs, independently of halephant's decoder
    out = portal + b"\0" + statement + b"\0"
    out += struct.pack(f"!h{len(param_formats)}h", len(param_formats), *param_formats)
    out += struct.pack("!h", len(params))
    for p in params:
        out += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return out + struct.pack(f"!h{len(result_formats)}h", len(result_formats), *result_formats)


int16 = st.integers(-(2**15), 2**15 - 1)


@FUZZ
@given(
    portal=cstr_text,
    statement=cstr_text,
    param_formats=st.lists(int16, max_size=4),
    params=st.lists(st.none() | st.binary(max_size=20), max_size=4),
    result_formats=st.lists(int16, max_size=6),
)
def test_bind_decodes(
    portal: str,
    statement: str,
    param_formats: list[int],
    params: list[bytes | None],
    result_formats: list[int],
) -> None:
    payload = bind_payload(portal.encode(), statement.encode(), param_formats, params, result_formats)
    expected = (portal, statement, tuple(param_formats), tuple(params), tuple(result_formats))
    assert m.decode_bind(payload) == expected
    assert m.decode_bind(memoryview(payload)).result_formats == tuple(result_formats)


@FUZZ
@given(portal=cstr_text, max_rows=int32)
def test_execute_decodes(portal: str, max_rows: int) -> None:
    assert m.decode_execute(portal.encode() + b"\0" + struct.pack("!i", max_rows)) == (portal, max_rows)


def test_describe_and_close_decode() -> None:
    assert m.decode_describe_close(b"S\0") == ("S", "")
    assert m.decode_describe_close(memoryview(b"Pname\0")) == ("P", "name")


def test_portal_suspended_and_friends_layout() -> None:
    assert m.PORTAL_SUSPENDED == b"s\0\0\0\x04"
    assert m.BIND_COMPLETE == b"2\0\0\0\x04"
    assert m.NO_DATA == b"n\0\0\0\x04"
    assert m.EMPTY_QUERY_RESPONSE == b"I\0\0\0\x04"


@FUZZ
@given(mech=cstr_text, data=st.binary(max_size=100))
def test_sasl_initial_response_round_trip(mech: str, data: bytes) -> None:
    t, payload = unframe(m.sasl_initial_response(mech, data))
    assert t == codes.PASSWORD_MESSAGE
    assert m.decode_sasl_initial_response(payload) == (mech, data)


def test_sasl_initial_response_without_data() -> None:
    # length -1 means "no initial response"
    assert m.decode_sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xff") == ("SCRAM-SHA-256", b"")


@FUZZ
@given(password=cstr_text)
def test_password_round_trip(password: str) -> None:
    t, payload = unframe(m.password_message(password.encode()))
    assert t == codes.PASSWORD_MESSAGE
    assert m.decode_password(payload) == password


@FUZZ
@given(code=int32, data=st.binary(max_size=40))
def test_authentication_round_trip(code: int, data: bytes) -> None:
    t, payload = unframe(m.authentication(code, data))
    assert t == codes.AUTHENTICATION
    assert m.decode_authentication(payload) == (code, data)


def test_authentication_sasl_round_trip() -> None:
    t, payload = unframe(m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    assert t == codes.AUTHENTICATION
    code, data = m.decode_authentication(payload)
    assert code == codes.AUTH_SASL
    assert data == b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    assert m.decode_sasl_mechanisms(data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def test_sasl_response_is_raw() -> None:
    assert unframe(m.sasl_response(b"c=biws,r=x,p=y")) == (codes.PASSWORD_MESSAGE, b"c=biws,r=x,p=y")


def test_read_cstring_positions() -> None:
    assert m.read_cstring(b"ab\0cd\0", 0) == ("ab", 3)
    assert m.read_cstring(b"ab\0cd\0", 3) == ("cd", 6)
    assert m.read_cstring(memoryview(b"ab\0"), 0) == ("ab", 3)
    for bad, pos in [(b"ab", 0), (b"ab\0", 3), (b"\xff\0", 0)]:
        with pytest.raises(ProtocolViolation):
            m.read_cstring(bad, pos)


# --- malformed input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decoder", "payload"),
    [
        (m.decode_query, b"SELECT 1"),  # no NUL
        (m.decode_query, b"SELECT 1\0junk"),
        (m.decode_parse, b"s\0q\0"),  # no parameter count
        (m.decode_parse, b"s\0q\0\xff\xff"),  # negative count
        (m.decode_parse, b"s\0q\0\0\x02\0\0\0\x17"),  # count says 2, one OID
        (m.decode_parse, b"s\0q\0\0\0\0"),  # trailing byte
        (m.decode_error_fields, b"Mno terminator"),
        (m.decode_parameter_status, b"name\0value"),
        (m.decode_backend_key_data, b"\0\0\0\1\0\0\0"),
        (m.decode_authentication, b"\0\0\0"),
        (m.decode_sasl_initial_response, b"SCRAM-SHA-256\0\0\0"),
        (m.decode_sasl_initial_response, b"SCRAM-SHA-256\0\0\0\0\x05abc"),
        (m.decode_sasl_initial_response, b"SCRAM-SHA-256\0\xff\xff\xff\xfeabc"),
        (m.decode_password, b"secret"),
        (m.decode_password, b"secret\0\0"),
        (m.decode_password, b"\xff\0"),
        (m.decode_bind, b"\0\0\0\0\0"),  # no result format count
        (m.decode_bind, b"\0\0\0\0\0\0\0\0\0"),  # trailing byte
        (m.decode_bind, b"\0\0\xff\xff\0\0\0\0"),  # negative parameter format count
        (m.decode_bind, b"\0\0\0\0\0\x01\0\0\0\x05ab\0\0"),  # a value shorter than its length
        (m.decode_bind, b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0"),  # a length below -1
        (m.decode_bind, b"\0\0\0\0\0\0\0\x02\0\x01"),  # two result formats, one given
        (m.decode_execute, b"\0\0\0\0"),
        (m.decode_execute, b"\0\0\0\0\0\0"),
        (m.decode_describe_close, b"X\0"),
        (m.decode_describe_close, b""),
        (m.decode_describe_close, b"Sname"),
        (m.decode_describe_close, b"S\0\0"),
    ],
)
def test_malformed(decoder: Callable[[bytes], object], payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decoder(payload)


DECODERS: list[Callable[[bytes], object]] = [
    m.decode_query,
    m.decode_parse,
    m.decode_error_fields,
    m.decode_parameter_status,
    m.decode_backend_key_data,
    m.decode_authentication,
    m.decode_sasl_initial_response,
    m.decode_password,
    m.decode_bind,
    m.decode_execute,
    m.decode_describe_close,
    lambda b: m.read_cstring(b, 0),
    lambda b: m.read_cstring(b, len(b) // 2),
]


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda d: getattr(d, "__name__", "?"))
@FUZZ
@given(
    payload=st.binary(max_size=60)
    | st.lists(
        st.sampled_from([b"\0", b"\xff", b"a", b"\0\0\0\x01", b"\xff\xff", b"SCRAM-SHA-256\0", b"\x00\x02"]),
        max_size=10,
    ).map(b"".join)
)
def test_decoders_raise_only_protocol_violation(decoder: Callable[[bytes], object], payload: bytes) -> None:
    for given_payload in (payload, memoryview(payload)):
        try:
            decoder(given_payload)  # type: ignore[arg-type]
        except ProtocolViolation:
            pass


def test_decode_sasl_mechanisms_invalid_utf8() -> None:
    with pytest.raises(ProtocolViolation):
        m.decode_sasl_mechanisms(b"SCRAM-SHA-256\0\xff\xfe\0\0")


@FUZZ
@given(payload=st.text(st.characters(codec="utf-8"), max_size=30).map(str.encode))
def test_decode_sasl_mechanisms_valid_utf8_never_fails(payload: bytes) -> None:
    assert all(m.decode_sasl_mechanisms(payload))


@pytest.mark.parametrize(
    "fields, ends",
    [
        (b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0", True),
        (b"SPANIC\0VPANIC\0CXX000\0Mboom\0", True),
        (b"SSCHWERWIEGEND\0VFATAL\0C57P01\0Mx\0", True),  # a localized S, the V that never is
        (b"SERROR\0VERROR\0C42601\0Msyntax error\0", False),
        (b"SFEHLER\0VERROR\0C42601\0MFATAL in the text\0", False),
        (b"SFATAL\0C57P01\0Mbefore 9.6: no V field\0", True),
        (b"SERROR\0C22012\0Mdivision by zero\0", False),
        (b"", False),
    ],
)
def test_error_ends_session_reads_the_severity_only(fields: bytes, ends: bool) -> None:
    assert m.error_ends_session(fields + b"\0") is ends
