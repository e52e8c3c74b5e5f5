"""The console's result sets (`halephant.admin.resultset`) without a running halephant: values encoded as
PostgreSQL's output and send functions encode them, Bind's result format codes read as PostgreSQL reads
them, and RowDescription fields."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from halephant.admin import resultset as r
from halephant.errors import ClientError
from halephant.protocol.framing import split_frames


def fields(message: bytes) -> tuple[int, bytes]:
    frames, consumed = split_frames(message, 1 << 20)
    assert consumed == len(message) and len(frames) == 1
    t, s, e = frames[0]
    return t, message[s:e]


def values(message: bytes) -> list[bytes | None]:
    t, payload = fields(message)
    assert t == ord("D")
    (n,) = struct.unpack_from("!h", payload)
    pos, out = 2, []
    for _ in range(n):
        (size,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        out.append(None if size < 0 else payload[pos : pos + size])
        pos += max(size, 0)
    assert pos == len(payload)
    return out


COLS = r.columns("b:bool i4:int4 i8:int8 f:float8 t:text")


def test_columns_spec() -> None:
    assert [(c.name, c.type) for c in COLS] == [("b", 16), ("i4", 23), ("i8", 20), ("f", 701), ("t", 25)]
    with pytest.raises(KeyError):
        r.columns("x:numeric")


def test_binary_values_are_postgresql_send_functions() -> None:
    row = [True, -2, 2**40, 1.5, "é"]
    assert values(r.data_row(row, COLS, (1,) * 5)) == [
        b"\x01",  # boolsend: one byte
        b"\xff\xff\xff\xfe",  # int4send: four bytes, big-endian, two's complement
        b"\x00\x00\x01\x00\x00\x00\x00\x00",  # int8send
        b"\x3f\xf8\x00\x00\x00\x00\x00\x00",  # float8send: IEEE 754 double, big-endian
        "é".encode(),  # textsend: the characters in the client encoding (UTF8)
    ]
    assert values(r.data_row([False, 0, 0, 0.0, ""], COLS, (1,) * 5)) == [
        b"\x00", b"\0" * 4, b"\0" * 8, b"\0" * 8, b"",
    ]  # fmt: skip


def test_text_values_are_postgresql_output_functions() -> None:
    row = [True, -2, 2**40, 1.5, "é"]
    assert values(r.data_row(row, COLS)) == [b"t", b"-2", b"1099511627776", b"1.5", "é".encode()]
    specials = [r.text_value(x, r.FLOAT8) for x in (math.inf, -math.inf, math.nan)]
    assert specials == [b"Infinity", b"-Infinity", b"NaN"]


def test_null_is_minus_one_in_either_format() -> None:
    for formats in (None, (0,) * 5, (1,) * 5):
        assert values(r.data_row([None] * 5, COLS, formats)) == [None] * 5


def test_mixed_formats_per_column() -> None:
    assert values(r.data_row([True, 7, 7, 0.5, "x"], COLS, (0, 1, 0, 1, 0))) == [
        b"t", b"\0\0\0\x07", b"7", struct.pack("!d", 0.5), b"x",
    ]  # fmt: skip


@given(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False))
def test_binary_round_trips(i8: int, f: float) -> None:
    _b, i4, big, dbl, _t = values(r.data_row([True, i8 % 2**31, i8, f, "t"], COLS, (1,) * 5))
    assert struct.unpack("!q", big or b"") == (i8,)
    assert struct.unpack("!i", i4 or b"") == (i8 % 2**31,)
    assert struct.unpack("!d", dbl or b"") == (f,)


def test_result_formats_as_postgresql_reads_them() -> None:
    assert r.result_formats((), 3) == (0, 0, 0)  # none: all text
    assert r.result_formats((1,), 3) == (1, 1, 1)  # one: for every column
    assert r.result_formats((0, 1, 0), 3) == (0, 1, 0)  # one per column
    with pytest.raises(ClientError) as info:
        r.result_formats((1, 0), 3)
    message = "bind message has 2 result formats but query has 3 columns"
    assert (info.value.code, info.value.message) == ("08P01", message)
    assert not info.value.fatal
    with pytest.raises(ClientError) as info:
        r.result_formats((2,), 3)
    assert (info.value.code, info.value.message) == ("22023", "unsupported format code: 2")


def test_row_description_fields() -> None:
    t, payload = fields(r.row_description(COLS, (1, 0, 1, 0, 1)))
    assert t == ord("T")
    (n,) = struct.unpack_from("!h", payload)
    pos, out = 2, []
    for _ in range(n):
        end = payload.index(b"\0", pos)
        out.append((payload[pos:end].decode(), *struct.unpack_from("!ihihih", payload, end + 1)))
        pos = end + 19
    assert pos == len(payload)
    # name, table OID, column number, type OID, typlen, typmod, format
    assert out == [
        ("b", 0, 0, 16, 1, -1, 1), ("i4", 0, 0, 23, 4, -1, 0), ("i8", 0, 0, 20, 8, -1, 1),
        ("f", 0, 0, 701, 8, -1, 0), ("t", 0, 0, 25, -1, -1, 1),
    ]  # fmt: skip
    assert r.row_description(()) == b"n\0\0\0\x04"  # NoData
    assert r.row_description(COLS) == r.row_description(COLS, (0,) * 5)


def test_encode_result_keeps_the_types_without_rows() -> None:
    out = r.encode_result(r.Result(COLS, [], "SHOW"))
    assert out == r.row_description(COLS) + b"C\0\0\0\x09SHOW\0"
