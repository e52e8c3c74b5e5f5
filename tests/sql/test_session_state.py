"""`Statement.session_state`: which statements leave state on a server connection beyond their transaction
(a transaction pooler pins such a client to its server), and which do not."""

from __future__ import annotations

import pytest

from halephant.sql import Statement


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SET search_path = a", "SET"),
        ("set work_mem='8MB'", "SET"),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SET"),
        ("RESET ALL", "RESET"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
        ("DEALLOCATE ALL", "DEALLOCATE"),
        ("LISTEN chan", "LISTEN"),
        ("UNLISTEN *", "UNLISTEN"),
        ("LOAD 'auto_explain'", "LOAD"),
        ("DISCARD TEMP", "DISCARD"),
        ("CREATE TEMP TABLE t (x int)", "CREATE TEMP"),
        ("create temporary view v as select 1", "CREATE TEMP"),
        ("CREATE LOCAL TEMPORARY TABLE t (x int)", "CREATE TEMP"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DECLARE WITH HOLD"),
        ("SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
        ("select pg_try_advisory_lock(1, 2)", "pg_try_advisory_lock"),
        ("SELECT set_config('a.b', 'c', false)", "set_config"),
        ("SELECT 1; LISTEN chan", "LISTEN"),
        ("SELECT 1 AS n INTO TEMP t", "SELECT INTO TEMP"),
        ("select * into temporary table t from x", "SELECT INTO TEMP"),
        ("SELECT * INTO GLOBAL TEMP t FROM x", "SELECT INTO TEMP"),
        ("SELECT * INTO pg_temp.t FROM x", "SELECT INTO TEMP"),
        ('SELECT * INTO "pg_temp".t FROM x', "SELECT INTO TEMP"),
        ("WITH s AS (SELECT 1) SELECT * INTO TEMP t FROM s", "SELECT INTO TEMP"),
        ("SELECT 1; SELECT 2 INTO TEMP t", "SELECT INTO TEMP"),
        ("BEGIN; SET search_path = a; COMMIT", "SET"),
    ],
)
def test_statements_that_leave_session_state(text: str, expected: str) -> None:
    assert Statement(text).session_state == expected


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1",
        "SET LOCAL work_mem = '8MB'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "UPDATE t SET x = 1 WHERE y = 2",
        "SELECT * FROM t OFFSET 10",
        "CREATE TABLE t (x int)",
        "DECLARE c CURSOR FOR SELECT 1",
        "SELECT pg_advisory_xact_lock(1)",
        "INSERT INTO settings (name) VALUES ('listen')",
        "SELECT * INTO t FROM x",
        "SELECT temp INTO t FROM x",
        "SELECT 'into temp' FROM x",
        'SELECT * INTO "TEMP" FROM x',
        "SELECT 1 /* into temp */",
        "",
    ],
)
def test_statements_that_do_not(text: str) -> None:
    assert Statement(text).session_state == ""
