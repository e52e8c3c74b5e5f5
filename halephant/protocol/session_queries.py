"""The SQL halephant runs on a server for a transaction-mode client's session state, and reading its answer.

Sans-IO: text in, text out. Four kinds of query:

* the end-of-transaction query (`boundary_sql`): after a transaction that ran `SET`/`RESET`, `LISTEN`,
  SQL `PREPARE` or released a pinned feature, it reads from the server what that left behind, since only
  the server knows whether the transaction committed, which `SET LOCAL` ended and which statement failed:
  the settings' values and whether they are session values (`pg_settings.source`), the channels
  listened to, the SQL prepared statements, and per pinned feature whether any of it is still held;
* the clean-up before the server goes back (`cleanup_sql`): emulated LISTEN and SQL PREPARE leave the
  server as it was;
* the targeted reset when a pinned client leaves (`reset_sql`): only what its features could leave behind,
  so that server-side state that belongs to the pool (protocol-level prepared statements) survives;
* a client's SQL prepared statements prepared again on its next server (`prepare_sql`).

Answers come back as rows of `(kind, name, value, extra)` (`BoundaryRow`). They run on a server set up for
the linked client, whose `client_encoding` may be other than UTF-8: values go out and come back in a form
that does not depend on it (`literal`, `text_value`).
"""

from __future__ import annotations

import struct
from typing import Final

from halephant.errors import ProtocolViolation

__all__ = [
    "KIND_FEATURE",
    "KIND_LISTEN",
    "KIND_PREPARED",
    "KIND_SETTING",
    "RESET_SQL",
    "boundary_sql",
    "cleanup_sql",
    "decode_data_row",
    "literal",
    "prepare_sql",
    "reset_sql",
    "text_value",
]

KIND_SETTING: Final = "s"
KIND_LISTEN: Final = "l"
KIND_PREPARED: Final = "p"
KIND_FEATURE: Final = "f"

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


def literal(value: str) -> str:
    """An SQL string expression for `value` that means the same whatever the server's `client_encoding`
    and `standard_conforming_strings` are when it reads it: halephant's own queries run on a server set up
    for the linked client, which may be LATIN1 or have escapes on. ASCII goes as a plain literal; text
    with other characters or a backslash goes as hex digits of its UTF-8 bytes, converted on the server."""
    if value.isascii() and "\\" not in value:
        return "'" + value.replace("'", "''") + "'"
    data = value.encode("utf-8", "surrogateescape").hex()
    return f"pg_catalog.convert_from(pg_catalog.decode('{data}', 'hex'), 'UTF8')"


def _text(expression: str) -> str:
    """A text column of a read-back query as hex digits of its UTF-8 bytes (`text_value` reads it): the
    server sends text in the linked client's `client_encoding`, which need not be UTF-8."""
    return f"pg_catalog.encode(pg_catalog.convert_to({expression}, 'UTF8'), 'hex')"


def text_value(column: str) -> str:
    """A column of a read-back query written by `_text` (not NULL)."""
    try:
        return bytes.fromhex(column).decode("utf-8", "surrogateescape")
    except ValueError:
        raise ProtocolViolation("invalid hex text in an internal query's answer") from None


#: per feature: a count of what of it is still held on this backend (0 = released)
_HELD: Final[dict[str, str]] = {
    "advisory_locks": "SELECT count(*) FROM pg_catalog.pg_locks "
    "WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()",
    "listen": "SELECT count(*) FROM pg_catalog.pg_listening_channels()",
    "with_hold": "SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable",
    "temp_tables": "SELECT count(*) FROM pg_catalog.pg_class "
    "WHERE relnamespace = pg_catalog.pg_my_temp_schema()",
    "prepare": "SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql",
    "set_role": "SELECT (session_user <> current_user OR session_user <> {user})::int",
    # LOAD cannot be undone: a library stays loaded until the backend exits
    "load": "SELECT 1",
}

#: what undoes each feature on a server a pinned client leaves behind (None: nothing can)
RESET_SQL: Final[dict[str, str | None]] = {
    "listen": "UNLISTEN *",
    "advisory_locks": "SELECT pg_catalog.pg_advisory_unlock_all()",
    "with_hold": "CLOSE ALL",
    "temp_tables": "DISCARD TEMP",
    "prepare": "DO $$DECLARE r record; BEGIN FOR r IN SELECT name FROM pg_catalog.pg_prepared_statements "
    "WHERE from_sql LOOP EXECUTE 'DEALLOCATE ' || pg_catalog.quote_ident(r.name); END LOOP; END$$",
    "set_role": "RESET SESSION AUTHORIZATION; RESET ROLE",
    "load": None,
}


def boundary_sql(
    settings: list[str], features: list[str], *, listen: bool, prepared: bool, server_user: str
) -> str:
    """One query reading what the transaction left: see the module docstring. Rows: (kind, name, value,
    extra): settings (name, current value or NULL, pg_settings.source), channels, SQL prepared statements
    (name, statement text) and, per feature, how much of it is still held. The names and values of the
    first three kinds come as `_text` writes them: read them with `text_value`."""
    parts: list[str] = []
    if settings:
        names = ", ".join(literal(name) for name in settings)
        parts.append(
            f"SELECT 's', {_text('n')}, {_text('pg_catalog.current_setting(n, true)')}, "
            "(SELECT s.source FROM pg_catalog.pg_settings s WHERE lower(s.name) = n) "
            f"FROM pg_catalog.unnest(ARRAY[{names}]::text[]) n"
        )
    if listen:
        parts.append(f"SELECT 'l', {_text('c')}, NULL, NULL FROM pg_catalog.pg_listening_channels() c")
    if prepared:
        parts.append(
            f"SELECT 'p', {_text('name')}, {_text('statement')}, NULL "
            "FROM pg_catalog.pg_prepared_statements WHERE from_sql"
        )
    for feature in features:
        held = _HELD[feature].format(user=literal(server_user))
        parts.append(f"SELECT 'f', {literal(feature)}, ({held})::text, NULL")
    return " UNION ALL ".join(parts)


def prepare_sql(texts: list[str]) -> str:
    """SQL `PREPARE` statements (as `pg_prepared_statements` shows them) prepared again on a server set up
    for their client: one with other than ASCII characters runs through `EXECUTE` from UTF-8 bytes, since
    the server reads a query in the client's encoding."""
    parts = []
    for text in texts:
        text = text.rstrip().rstrip(";")
        parts.append(text if text.isascii() else f"DO $$BEGIN EXECUTE {literal(text)}; END$$")
    return "; ".join(parts)


def cleanup_sql(*, listen: bool, prepared: bool) -> str:
    """Undo emulated LISTEN and SQL PREPARE on a server before it goes back to the pool."""
    parts = []
    if listen:
        parts.append("UNLISTEN *")
    if prepared:
        reset = RESET_SQL["prepare"]
        assert reset is not None
        parts.append(reset)
    return "; ".join(parts)


def reset_sql(features: list[str]) -> str | None:
    """The targeted reset for a server a pinned client leaves; None when one of its features cannot be
    undone (the server must then be closed)."""
    parts: list[str] = []
    for feature in features:
        reset = RESET_SQL.get(feature)
        if reset is None:
            return None
        parts.append(reset)
    return "; ".join(parts)


def decode_data_row(payload: bytes) -> list[str | None]:
    """DataRow in text format: each column's value, None for NULL."""
    try:
        (n,) = _I16.unpack_from(payload, 0)
        pos = 2
        out: list[str | None] = []
        for _ in range(n):
            (size,) = _I32.unpack_from(payload, pos)
            pos += 4
            if size < 0:
                out.append(None)
                continue
            if pos + size > len(payload):
                raise ProtocolViolation("invalid DataRow")
            out.append(payload[pos : pos + size].decode())
            pos += size
    except (struct.error, UnicodeDecodeError):
        raise ProtocolViolation("invalid DataRow") from None
    if pos != len(payload):
        raise ProtocolViolation("invalid DataRow")
    return out
