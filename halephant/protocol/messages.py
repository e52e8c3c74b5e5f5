"""Encoders for the messages halephant originates, and decoders for the few it must read.

Everything here is pure: bytes in, values out. Decoders raise `ProtocolViolation` on malformed input and
nothing else. Only messages a decision needs are decoded; everything else is forwarded untouched.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from halephant.errors import ClientError, ProtocolViolation
from halephant.protocol import codes

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!ci")


def message(type_: bytes, payload: bytes = b"") -> bytes:
    """Frame one typed message: type byte, int32 length (including itself), payload."""
    return _HDR.pack(type_, len(payload) + 4) + payload


def _cstr(s: str) -> bytes:
    # surrogateescape: bytes that came in another encoding (`decode_parameter_status`) go out as they came
    return s.encode("utf-8", "surrogateescape") + b"\0"


# --- backend messages halephant sends to clients ---------------------------------------------------------

READY_FOR_QUERY_IDLE = message(b"Z", b"I")
AUTHENTICATION_OK = message(b"R", _I32.pack(codes.AUTH_OK))
PARSE_COMPLETE = message(b"1")
BIND_COMPLETE = message(b"2")
CLOSE_COMPLETE = message(b"3")
NO_DATA = message(b"n")
PORTAL_SUSPENDED = message(b"s")
EMPTY_QUERY_RESPONSE = message(b"I")


def ready_for_query(status: int) -> bytes:
    return message(b"Z", bytes((status,)))


def _notice_fields(severity: str, code: str, text: str, hint: str | None, detail: str | None) -> bytes:
    parts = [b"S", _cstr(severity), b"V", _cstr(severity), b"C", _cstr(code), b"M", _cstr(text)]
    if detail:
        parts += [b"D", _cstr(detail)]
    if hint:
        parts += [b"H", _cstr(hint)]
    parts.append(b"\0")
    return b"".join(parts)


def error_response(
    code: str, text: str, *, hint: str | None = None, detail: str | None = None, fatal: bool = False
) -> bytes:
    return message(b"E", _notice_fields("FATAL" if fatal else "ERROR", code, text, hint, detail))


def client_error_response(error: ClientError, *, fatal: bool | None = None) -> bytes:
    """The ErrorResponse that tells a client `error`: FATAL when the error is (or `fatal` says so)."""
    return error_response(
        error.code,
        error.message,
        hint=error.hint,
        detail=error.detail,
        fatal=error.fatal if fatal is None else fatal,
    )


def notice_response(code: str, text: str, *, hint: str | None = None, severity: str = "NOTICE") -> bytes:
    return message(b"N", _notice_fields(severity, code, text, hint, None))


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", _cstr(name) + _cstr(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return message(b"K", struct.pack("!ii", process_id, secret_key))


def authentication(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + data)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    return authentication(codes.AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def negotiate_protocol_version(newest_version: int, unrecognized: list[str]) -> bytes:
    """`newest_version` is the full version number (major << 16 | minor), as PostgreSQL sends it."""
    payload = struct.pack("!ii", newest_version, len(unrecognized)) + b"".join(_cstr(o) for o in unrecognized)
    return message(b"v", payload)


# --- frontend messages halephant sends to servers ---------------------------------------------------------


def startup_message(params: Mapping[str, str]) -> bytes:
    body = _I32.pack(codes.PROTOCOL_3_0) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return struct.pack("!iiii", 16, codes.CANCEL_REQUEST_CODE, process_id, secret_key)


#: SSLRequest: asks the server to switch the connection to TLS; it answers one byte, S (yes) or N (no)
SSL_REQUEST = struct.pack("!ii", 8, codes.SSL_REQUEST_CODE)


def query(sql: str) -> bytes:
    return message(b"Q", _cstr(sql))


def extended_query(sql: str, params: Sequence[str | None]) -> bytes:
    """Parse, Bind, Execute and Sync of the unnamed statement and portal: `sql` with its parameters
    `$1`... sent as text values (never written into the SQL), every column asked for as text."""
    values = b"".join(_I32.pack(-1) if p is None else _I32.pack(len(b := p.encode())) + b for p in params)
    return b"".join((
        message(b"P", b"\0" + _cstr(sql) + _I16.pack(0)),
        message(b"B", b"\0\0" + _I16.pack(0) + _I16.pack(len(params)) + values + _I16.pack(0)),
        message(b"E", b"\0" + _I32.pack(0)),
        SYNC,
    ))  # fmt: skip


def password_message(password: bytes) -> bytes:
    return message(b"p", password + b"\0")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


TERMINATE = message(b"X")
SYNC = message(b"S")


# --- decoders ---------------------------------------------------------------------------------------------


def read_cstring(buf: bytes | memoryview, pos: int, errors: str = "strict") -> tuple[str, int]:
    """Decode the NUL-terminated string at `pos`; return it and the position after the NUL. `errors`:
    as for `bytes.decode` ("surrogateescape" keeps bytes that are not UTF-8 as they are)."""
    b = bytes(buf) if isinstance(buf, memoryview) else buf
    end = b.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation("invalid string in message")
    try:
        return b[pos:end].decode("utf-8", errors), end + 1
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid byte sequence in message string") from None


def decode_query(payload: bytes | memoryview) -> str:
    """Query: one string."""
    text, end = read_cstring(payload, 0)
    if end != len(payload):
        raise ProtocolViolation("invalid message format")
    return text


def decode_parse(payload: bytes | memoryview) -> tuple[str, str, tuple[int, ...]]:
    """Parse: statement name, query text, parameter type OIDs."""
    b = bytes(payload)
    name, pos = read_cstring(b, 0)
    text, pos = read_cstring(b, pos)
    if pos + 2 > len(b):
        raise ProtocolViolation("invalid message format")
    (n,) = struct.unpack_from("!h", b, pos)
    pos += 2
    if n < 0 or pos + 4 * n != len(b):
        raise ProtocolViolation("invalid message format")
    return name, text, struct.unpack_from(f"!{n}I", b, pos)


class Bind(NamedTuple):
    """A decoded Bind message."""

    portal: str
    statement: str
    #: parameter format codes as sent: none (all text), one (for all) or one per parameter
    param_formats: tuple[int, ...]
    #: parameter values; None is SQL NULL
    params: tuple[bytes | None, ...]
    #: result column format codes as sent: none (all text), one (for all) or one per column
    result_formats: tuple[int, ...]


def _int16s(b: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """An int16 count and that many int16 values at `pos`; the values and the position after them."""
    if pos + 2 > len(b):
        raise ProtocolViolation("invalid message format")
    (n,) = struct.unpack_from("!h", b, pos)
    pos += 2
    if n < 0 or pos + 2 * n > len(b):
        raise ProtocolViolation("invalid message format")
    return struct.unpack_from(f"!{n}h", b, pos), pos + 2 * n


def decode_bind(payload: bytes | memoryview) -> Bind:
    """Bind: portal, statement, parameter formats, parameter values, result formats."""
    b = bytes(payload)
    portal, pos = read_cstring(b, 0)
    statement, pos = read_cstring(b, pos)
    param_formats, pos = _int16s(b, pos)
    if pos + 2 > len(b):
        raise ProtocolViolation("invalid message format")
    (n,) = struct.unpack_from("!h", b, pos)
    pos += 2
    if n < 0:
        raise ProtocolViolation("invalid message format")
    params: list[bytes | None] = []
    for _ in range(n):
        if pos + 4 > len(b):
            raise ProtocolViolation("invalid message format")
        (size,) = _I32.unpack_from(b, pos)
        pos += 4
        if size == -1:
            params.append(None)
            continue
        if size < 0 or pos + size > len(b):
            raise ProtocolViolation("invalid message format")
        params.append(b[pos : pos + size])
        pos += size
    result_formats, pos = _int16s(b, pos)
    if pos != len(b):
        raise ProtocolViolation("invalid message format")
    return Bind(portal, statement, param_formats, tuple(params), result_formats)


def decode_execute(payload: bytes | memoryview) -> tuple[str, int]:
    """Execute: portal name and the row limit (0: no limit)."""
    b = bytes(payload)
    portal, pos = read_cstring(b, 0)
    if pos + 4 != len(b):
        raise ProtocolViolation("invalid message format")
    (max_rows,) = _I32.unpack_from(b, pos)
    return portal, max_rows


def decode_describe_close(payload: bytes | memoryview) -> tuple[str, str]:
    """Describe or Close (the same layout): 'S' (statement) or 'P' (portal), and the name."""
    b = bytes(payload)
    if not b or b[0] not in b"SP":
        raise ProtocolViolation("invalid DESCRIBE or CLOSE message type")
    name, pos = read_cstring(b, 1)
    if pos != len(b):
        raise ProtocolViolation("invalid message format")
    return chr(b[0]), name


def decode_error_fields(payload: bytes | memoryview) -> dict[str, str]:
    """ErrorResponse / NoticeResponse: field code -> value."""
    b = bytes(payload)
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(b) and b[pos] != 0:
        code = chr(b[pos])
        end = b.find(b"\0", pos + 1)
        if end < 0:
            raise ProtocolViolation("invalid error message")
        fields[code] = b[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return fields


def error_ends_session(payload: bytes) -> bool:
    """An ErrorResponse whose severity is FATAL or PANIC (the server closes the connection after it).

    Read from the leading fields only, without decoding the message (which can be as large as 1 GB):
    PostgreSQL sends S (localized severity) first, then V (the same, never localized; 9.6 and later).
    """
    end = payload.find(b"\0")
    if end < 0:
        return False
    if payload.startswith(b"V", end + 1):
        return payload.startswith(_FATAL_V, end + 1) or payload.startswith(_PANIC_V, end + 1)
    return payload.startswith(_FATAL_S) or payload.startswith(_PANIC_S)  # before 9.6: S only


_FATAL_V, _PANIC_V, _FATAL_S, _PANIC_S = b"VFATAL\0", b"VPANIC\0", b"SFATAL\0", b"SPANIC\0"


def decode_parameter_status(payload: bytes | memoryview) -> tuple[str, str]:
    """A ParameterStatus's name and value. PostgreSQL sends them in the session's `client_encoding`,
    which a client may have set to LATIN1 or another: bytes that are not UTF-8 (a role name in
    session_authorization) are kept as they are (surrogateescape), and written back so by `_cstr`."""
    name, pos = read_cstring(payload, 0, "surrogateescape")
    value, _ = read_cstring(payload, pos, "surrogateescape")
    return name, value


def decode_backend_key_data(payload: bytes | memoryview) -> tuple[int, int]:
    if len(payload) < 8:
        raise ProtocolViolation("invalid BackendKeyData")
    pid, key = struct.unpack_from("!ii", payload, 0)
    return pid, key


def decode_authentication(payload: bytes | memoryview) -> tuple[int, bytes]:
    if len(payload) < 4:
        raise ProtocolViolation("invalid authentication request")
    (code,) = _I32.unpack_from(payload, 0)
    return code, bytes(payload[4:])


def decode_sasl_mechanisms(data: bytes) -> list[str]:
    try:
        return [m.decode() for m in data.split(b"\0") if m]
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid SASL mechanism name") from None


def decode_sasl_initial_response(payload: bytes | memoryview) -> tuple[str, bytes]:
    """SASLInitialResponse: mechanism name, then int32 length (-1 = none) and the client-first message."""
    b = bytes(payload)
    mech, pos = read_cstring(b, 0)
    if pos + 4 > len(b):
        raise ProtocolViolation("invalid SASLInitialResponse")
    (n,) = _I32.unpack_from(b, pos)
    data = b[pos + 4 :]
    if n == -1:
        data = b""
    elif n != len(data):
        raise ProtocolViolation("invalid SASLInitialResponse length")
    return mech, data


def decode_password(payload: bytes | memoryview) -> str:
    text, end = read_cstring(payload, 0)
    if end != len(payload):
        raise ProtocolViolation("invalid password packet")
    return text
