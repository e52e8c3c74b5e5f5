"""The SQL halephant runs for a transaction-mode client's session state, and reading its answers."""

from __future__ import annotations

import struct

import pytest

from halephant.errors import ProtocolViolation
from halephant.protocol.session_queries import (
    boundary_sql,
    cleanup_sql,
    decode_data_row,
    literal,
    prepare_sql,
    reset_sql,
    text_value,
)


def data_row(*values: bytes | None) -> bytes:
    out = struct.pack("!h", len(values))
    for value in values:
        out += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return out


def test_decode_data_row() -> None:
    assert decode_data_row(data_row(b"s", b"work_mem", None, b"")) == ["s", "work_mem", None, ""]
    assert decode_data_row(data_row()) == []


@pytest.mark.parametrize("bad", [b"", b"\x00\x01", data_row(b"abc")[:-1], data_row(b"\xff\xfe")])
def test_decode_data_row_refuses_malformed_input(bad: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decode_data_row(bad)


def test_literal_doubles_quotes() -> None:
    assert literal("it's") == "'it''s'"


@pytest.mark.parametrize("value", ["café", "a\\b", "日本"])
def test_literal_of_other_than_ascii_does_not_depend_on_the_servers_client_encoding(value: str) -> None:
    # the server reads halephant's query in the linked client's encoding (LATIN1, ...): ASCII only
    sql = literal(value)
    assert sql.isascii() and "\\" not in sql and value.encode().hex() in sql


def test_text_value_reads_hex_of_utf8() -> None:
    assert text_value("636166c3a9") == "café"
    with pytest.raises(ProtocolViolation):
        text_value("caf\u00e9")


def test_prepare_sql_keeps_ascii_and_runs_the_rest_from_utf8() -> None:
    assert prepare_sql(["PREPARE a AS SELECT 1;", "PREPARE b AS SELECT 2"]) == (
        "PREPARE a AS SELECT 1; PREPARE b AS SELECT 2"
    )
    sql = prepare_sql(["PREPARE café AS SELECT 1"])
    assert sql.isascii() and sql.startswith("DO $$BEGIN EXECUTE ")


def test_boundary_sql_reads_only_what_was_asked() -> None:
    sql = boundary_sql(["work_mem", "a'b"], [], listen=False, prepared=False, server_user="u")
    assert "'a''b'" in sql and "pg_listening_channels" not in sql and "pg_prepared_statements" not in sql
    sql = boundary_sql([], ["advisory_locks", "set_role"], listen=True, prepared=True, server_user="o'x")
    assert "pg_locks" in sql and "'o''x'" in sql and "pg_listening_channels" in sql and "from_sql" in sql
    assert sql.count("UNION ALL") == 3


def test_cleanup_and_reset() -> None:
    assert cleanup_sql(listen=True, prepared=False) == "UNLISTEN *"
    assert "DEALLOCATE" in cleanup_sql(listen=False, prepared=True)
    assert reset_sql(["advisory_locks", "temp_tables"]) == (
        "SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP"
    )
    assert reset_sql(["load"]) is None
    assert reset_sql([]) == ""
