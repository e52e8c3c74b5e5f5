"""The result sets the SQL console sends: typed columns, RowDescription, DataRow in text or binary format.

Every SHOW declares its columns and their types (PgBouncer's types for PgBouncer's columns), so a result
with no rows keeps them. A client of the extended protocol asks for text (format 0) or binary (format 1)
per column in its Bind; binary values are encoded as PostgreSQL's send functions encode them (int8send,
int4send, boolsend, float8send, textsend), for drivers such as asyncpg that always ask for binary where
they can decode it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from halephant import sqlstate
from halephant.errors import ClientError
from halephant.protocol import messages as m

#: type OIDs, as in PostgreSQL's pg_type
BOOL, INT8, INT4, TEXT, FLOAT8 = 16, 20, 23, 25, 701
TYPE_NAMES = {"bool": BOOL, "int8": INT8, "int4": INT4, "text": TEXT, "float8": FLOAT8}
#: pg_type.typlen, which RowDescription carries (-1: variable length)
_TYPLEN = {BOOL: 1, INT8: 8, INT4: 4, TEXT: -1, FLOAT8: 8}
TEXT_FORMAT, BINARY_FORMAT = 0, 1

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_I64 = struct.Struct("!q")
_F64 = struct.Struct("!d")
_FIELD = struct.Struct("!ihihih")  # table OID, column number, type OID, typlen, typmod, format
_NULL = _I32.pack(-1)


class Column(NamedTuple):
    name: str
    type: int  # a type OID of TYPE_NAMES


class Result(NamedTuple):
    """What one console command answers: its columns (none for a command without rows), rows, tag."""

    columns: Sequence[Column]
    rows: Sequence[Sequence[Any]]
    tag: str


def columns(spec: str) -> tuple[Column, ...]:
    """Columns from `"name:type name:type ..."`, the types named as in TYPE_NAMES."""
    out = []
    for item in spec.split():
        name, _, type_name = item.partition(":")
        out.append(Column(name, TYPE_NAMES[type_name]))
    return tuple(out)


def result_formats(codes: Sequence[int], n: int) -> tuple[int, ...]:
    """The format of each of `n` columns from a Bind's result format codes: none (all text), one (for
    every column) or one per column, as PostgreSQL reads them; it answers other counts with 08P01."""
    for code in codes:
        if code not in (TEXT_FORMAT, BINARY_FORMAT):
            raise ClientError(sqlstate.INVALID_PARAMETER_VALUE, f"unsupported format code: {code}")
    if not codes:
        return (TEXT_FORMAT,) * n
    if len(codes) == 1:
        return (codes[0],) * n
    if len(codes) != n:
        raise ClientError(
            sqlstate.PROTOCOL_VIOLATION,
            f"bind message has {len(codes)} result formats but query has {n} columns",
        )
    return tuple(codes)


def row_description(cols: Sequence[Column], formats: Sequence[int] | None = None) -> bytes:
    """RowDescription (NoData for a command without columns); `formats` None: all text."""
    if not cols:
        return m.NO_DATA
    formats = formats or (TEXT_FORMAT,) * len(cols)
    parts = [_I16.pack(len(cols))]
    for col, fmt in zip(cols, formats, strict=True):
        parts.append(col.name.encode() + b"\0" + _FIELD.pack(0, 0, col.type, _TYPLEN[col.type], -1, fmt))
    return m.message(b"T", b"".join(parts))


def text_value(value: Any, type_: int) -> bytes:
    """The text form of a non-NULL value, as PostgreSQL's output functions write it."""
    if type_ == BOOL or isinstance(value, bool):
        return b"t" if value else b"f"
    if type_ in (INT8, INT4):
        return str(int(value)).encode()
    if type_ == FLOAT8:
        x = float(value)
        if math.isnan(x):
            return b"NaN"
        if math.isinf(x):
            return b"Infinity" if x > 0 else b"-Infinity"
        return repr(x).encode()
    return str(value).encode()


def binary_value(value: Any, type_: int) -> bytes:
    """The binary form of a non-NULL value, as PostgreSQL's send functions write it."""
    if type_ == INT8:
        return _I64.pack(int(value))
    if type_ == INT4:
        return _I32.pack(int(value))
    if type_ == BOOL:
        return b"\x01" if value else b"\x00"
    if type_ == FLOAT8:
        return _F64.pack(float(value))
    return text_value(value, type_)  # textsend: the characters in the client encoding (UTF8)


def data_row(row: Sequence[Any], cols: Sequence[Column], formats: Sequence[int] | None = None) -> bytes:
    """One DataRow; `formats` None: all text."""
    formats = formats or (TEXT_FORMAT,) * len(cols)
    parts = [_I16.pack(len(cols))]
    for value, col, fmt in zip(row, cols, formats, strict=True):
        if value is None:
            parts.append(_NULL)
            continue
        raw = binary_value(value, col.type) if fmt == BINARY_FORMAT else text_value(value, col.type)
        parts.append(_I32.pack(len(raw)) + raw)
    return m.message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return m.message(b"C", tag.encode() + b"\0")


def encode_result(result: Result) -> bytes:
    """A whole result in text format, as the simple query protocol sends it."""
    out = []
    if result.columns:
        out.append(row_description(result.columns))
    out += [data_row(row, result.columns) for row in result.rows]
    out.append(command_complete(result.tag))
    return b"".join(out)
