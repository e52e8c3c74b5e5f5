"""`session_effects`: which session-bound feature each statement takes or may release, and the names."""

from __future__ import annotations

import pytest

from halephant.sql import Statement, session_effects
from halephant.sql.effects import SessionEffect


def effects(text: str) -> list[tuple[str, bool, tuple[str, ...]]]:
    return [(e.feature, e.acquire, e.names) for e in session_effects(Statement(text))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SELECT 1 INTO TEMP t", [("temp_tables", True, ())]),
        ("SELECT * INTO t FROM x", []),
        ("SET work_mem = '8MB'", [("settings", True, ("work_mem",))]),
        ("set session Search_Path to a, b", [("settings", True, ("search_path",))]),
        ("SET myapp.tenant = 1", [("settings", True, ("myapp.tenant",))]),
        ("SET \"TimeZone\" = 'UTC'", [("settings", True, ("TimeZone",))]),
        ("SET TIME ZONE 'UTC'", [("settings", True, ("timezone",))]),
        ("SET NAMES 'UTF8'", [("settings", True, ("client_encoding",))]),
        ("SET SCHEMA 'a'", [("settings", True, ("search_path",))]),
        ("SET LOCAL work_mem = 1", []),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", []),
        ("SET CONSTRAINTS ALL DEFERRED", []),
        ("RESET work_mem", [("settings", True, ("work_mem",))]),
        ("RESET ALL", [("settings", True, ("*",)), ("set_role", False, ())]),
        ("SET ROLE someone", [("set_role", True, ())]),
        ("SET ROLE NONE", [("set_role", False, ())]),
        ("SET SESSION AUTHORIZATION someone", [("set_role", True, ())]),
        ("SET SESSION AUTHORIZATION DEFAULT", [("set_role", False, ())]),
        ("RESET ROLE", [("set_role", False, ())]),
        ("LISTEN Chan", [("listen", True, ("chan",))]),
        ('LISTEN "Chan"', [("listen", True, ("Chan",))]),
        ("UNLISTEN *", [("listen", False, ("*",))]),
        ("SELECT pg_advisory_lock(1)", [("advisory_locks", True, ())]),
        ("SELECT pg_try_advisory_lock_shared(1)", [("advisory_locks", True, ())]),
        ("SELECT pg_advisory_unlock_all()", [("advisory_locks", False, ())]),
        ("SELECT pg_advisory_xact_lock(1)", []),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", [("with_hold", True, ())]),
        ("DECLARE c CURSOR FOR SELECT 1", []),
        ("CLOSE c", [("with_hold", False, ())]),
        ("CREATE TEMP TABLE t (n int)", [("temp_tables", True, ())]),
        ("CREATE TEMP TABLE t (n int) ON COMMIT DROP", []),
        ("DROP TABLE t", [("temp_tables", False, ())]),
        ("PREPARE p AS SELECT 1", [("prepare", True, ("p",))]),
        ("PREPARE TRANSACTION 'x'", []),
        ("DEALLOCATE PREPARE p", [("prepare", False, ("p",))]),
        ("DEALLOCATE ALL", [("prepare", False, ("*",))]),
        ("LOAD 'auto_explain'", [("load", True, ())]),
        ("SELECT set_config('application_name', 'x', false)", [("settings", True, ("application_name",))]),
        ("SELECT set_config(name, 'x', false) FROM t", [("settings", True, ())]),
        ("SELECT 1; SET a.b = 1; LISTEN x", [("settings", True, ("a.b",)), ("listen", True, ("x",))]),
        ("SELECT 'SET work_mem = 1'", []),
        ("SELECT 1", []),
    ],
)
def test_effects(text: str, expected: list[tuple[str, bool, tuple[str, ...]]]) -> None:
    assert effects(text) == expected


def test_discard_all_releases_everything_that_can_be_undone() -> None:
    found = session_effects(Statement("DISCARD ALL"))
    assert found[0] == SessionEffect("settings", True, ("*",))
    assert {e.feature for e in found[1:]} == {
        "listen", "advisory_locks", "with_hold", "temp_tables", "prepare", "set_role"
    }  # fmt: skip
    assert not any(e.acquire for e in found[1:])
