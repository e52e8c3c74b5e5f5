"""End to end: statement pooling (`mode: statement`), transaction pooling that allows no transaction block.

Autocommit statements share the servers as in transaction mode (psycopg, pgbench over the simple and the
extended protocol with more clients than servers, SET and prepared statements carried with the client).
A statement, or an extended-protocol batch up to its Sync, that leaves its server in a transaction (or
in a failed one) ends the client with FATAL 25001 and PgBouncer's message, and its transaction is rolled
back: the server is pooled again when nothing else of the client's is on it, else closed. A simple Query
whose text opens and ends a transaction ends Idle and is allowed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg.errors
import pytest
import rawclient as rc
from rawclient import RawClient
from support.halephant import REPO_ROOT, HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster, pgbench

pytestmark = pytest.mark.e2e

BENCH_DB = "e2e_statement_bench"
MESSAGE = "transaction blocks not allowed in statement pooling mode"
RunClient = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    """`stmt` (statement, 3), `stmt_one` (statement, 1: the next client gets the same server) and
    `bench` (the pgbench database, statement, 2)."""
    main = {"cluster": "main", "database": "myapp", "mode": "statement", "checkout_timeout": "10s"}
    config = default_config(
        pg,
        databases={
            "stmt": {**main, "pool_size": 3},
            "stmt_one": {**main, "pool_size": 1},
            "bench": {**main, "database": BENCH_DB, "pool_size": 2},
        },
        clusters={"main": {"probe_user": "myapp"}},
        users={"admin": {"password": "admin-pw"}},
        admin={"users": ["admin"]},
        limits={"connect_timeout": "3s", "login_timeout": "5s"},
    )
    pg.primary.sql("CREATE TABLE IF NOT EXISTS e2e_statement_rows (n int)", dbname="myapp", user="myapp")
    return module_halephant.start(config)


def connect(hal: Running, dbname: str = "stmt", **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(hal.dsn(dbname=dbname), **kwargs)


def one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def committed(pg: Cluster, n: int) -> int:
    out = pg.primary.sql(f"SELECT count(*) FROM e2e_statement_rows WHERE n = {n}", dbname="myapp")
    return int(out.strip())


def stmt_one_backend(pg: Cluster) -> list[int]:
    out = pg.primary.sql(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND client_addr IS NOT NULL "
        "AND datname = 'myapp' AND usename = 'myapp' AND pid <> pg_backend_pid() ORDER BY pid"
    )
    return [int(line) for line in out.splitlines() if line.strip()]


# --- what works as in transaction mode ----------------------------------------------------------------


def test_autocommit_statements_share_one_server(pg: Cluster, hal: Running) -> None:
    with connect(hal, "stmt_one") as a, connect(hal, "stmt_one") as b:
        pid = one(a, "SELECT pg_backend_pid()")
        assert one(b, "SELECT pg_backend_pid()") == pid  # a's server went back after its statement
        a.execute("SET work_mem = '3MB'")  # carried with the client, as in transaction mode
        assert one(b, "SHOW work_mem") != "3MB"
        assert one(a, "SHOW work_mem") == "3MB"
        for n in range(3):  # a named prepared statement (extended protocol), shared across servers
            assert a.execute("SELECT %s::int + 1", (n,), prepare=True).fetchone() == (n + 1,)
        a.execute("INSERT INTO e2e_statement_rows VALUES (1)")
        # PostgreSQL's own answer to a cursor outside a transaction block, as in transaction mode
        with pytest.raises(psycopg.errors.NoActiveSqlTransaction):
            a.execute("DECLARE c CURSOR FOR SELECT 1")
        assert one(a, "SELECT 1") == 1
    assert committed(pg, 1) >= 1
    assert_clean_servers(pg.primary)


def test_a_transaction_in_one_query_string_is_allowed(pg: Cluster, hal: Running) -> None:
    with connect(hal) as conn:
        conn.execute("BEGIN; INSERT INTO e2e_statement_rows VALUES (2); COMMIT")
        assert one(conn, "SELECT count(*) FROM e2e_statement_rows WHERE n = 2") == 1
    assert committed(pg, 2) == 1
    assert_clean_servers(pg.primary)


@pytest.fixture(scope="module")
def bench_db(pg: Cluster) -> str:
    pg.create_database(BENCH_DB, owner="myapp")
    pgbench(pg.primary, "-i", "-q", "-s", "1", dbname=BENCH_DB, user="myapp")
    return BENCH_DB


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_pgbench_select_only_with_more_clients_than_servers(
    pg: Cluster, hal: Running, bench_db: str, protocol: str, run_client: RunClient
) -> None:
    out = run_client(
        "pgbench", hal, ["-n", "-S", "-M", protocol, "-c", "8", "-j", "2", "-T", "2"], dbname="bench",
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert processed is not None and int(processed.group(1)) > 100, out.stdout
    assert failed is not None and int(failed.group(1)) == 0, out.stdout
    assert_clean_servers(pg.primary)


# --- a transaction block is refused --------------------------------------------------------------------


def test_begin_from_psycopg_ends_the_client_and_rolls_back(pg: Cluster, hal: Running) -> None:
    with connect(hal, "stmt_one") as conn:
        pid = one(conn, "SELECT pg_backend_pid()")
    # psycopg outside autocommit sends BEGIN first: refused there, before its INSERT runs
    conn = connect(hal, "stmt_one", autocommit=False)
    with pytest.raises(psycopg.errors.ActiveSqlTransaction, match=MESSAGE) as caught:
        conn.execute("INSERT INTO e2e_statement_rows VALUES (3)")
    assert caught.value.sqlstate == "25001"
    assert conn.closed or conn.broken
    conn.close()
    assert committed(pg, 3) == 0
    assert_clean_servers(pg.primary)
    # rolled back and pooled again, not closed: the pool's one server serves the next client
    with connect(hal, "stmt_one") as conn:
        assert one(conn, "SELECT pg_backend_pid()") == pid
        assert one(conn, "SELECT now() = statement_timestamp()") is True  # no transaction left open
    assert_clean_servers(pg.primary)


def test_a_write_in_a_refused_transaction_is_not_committed(pg: Cluster, hal: Running) -> None:
    with RawClient(hal.host, hal.port, timeout=10) as raw:
        raw.login("myapp", "myapp", "stmt")
        raw.send(rc.query("BEGIN; INSERT INTO e2e_statement_rows VALUES (4)"))
        error = raw.expect_fatal_and_close("25001")
    assert error.fields["M"] == MESSAGE
    assert "autocommit" in error.fields["H"]
    assert committed(pg, 4) == 0
    assert_clean_servers(pg.primary)


def test_begin_from_psql_is_refused(pg: Cluster, hal: Running, run_client: RunClient) -> None:
    out = run_client(
        "psql", hal,
        ["-X", "-v", "ON_ERROR_STOP=1", "-c", "BEGIN", "-c", "INSERT INTO e2e_statement_rows VALUES (5)"],
        dbname="stmt",
    )  # fmt: skip
    assert out.returncode != 0
    assert MESSAGE in out.stderr, out.stderr
    assert committed(pg, 5) == 0
    assert_clean_servers(pg.primary)


def test_a_failed_transaction_is_refused_too(pg: Cluster, hal: Running) -> None:
    with RawClient(hal.host, hal.port, timeout=10) as raw:
        raw.login("myapp", "myapp", "stmt")
        raw.send(rc.query("BEGIN; INSERT INTO e2e_statement_rows VALUES (6); SELECT 1/0"))
        assert raw.expect_error().fields["C"] == "22012"  # the server's own error first
        raw.expect_fatal_and_close("25001")
    assert committed(pg, 6) == 0
    assert_clean_servers(pg.primary)


def test_extended_protocol_the_unit_is_the_sync(pg: Cluster, hal: Running) -> None:
    with RawClient(hal.host, hal.port, timeout=10) as raw:
        raw.login("myapp", "myapp", "stmt")
        # BEGIN and COMMIT in one batch end Idle: allowed
        batch = b"".join(
            rc.parse(sql) + rc.bind() + rc.execute()
            for sql in ("BEGIN", "INSERT INTO e2e_statement_rows VALUES (7)", "COMMIT")
        )
        raw.send(batch + rc.sync())
        assert not rc.errors(raw.read_until_ready())
        # BEGIN alone up to a Sync: refused
        raw.send(rc.parse("BEGIN") + rc.bind() + rc.execute() + rc.sync())
        messages, closed = raw.read_all()
    # the error answers the Execute: neither its CommandComplete nor a ReadyForQuery came before it
    assert closed and [m.type for m in messages] == [b"1", b"2", b"E"], messages
    assert (messages[-1].fields["S"], messages[-1].fields["C"]) == ("FATAL", "25001")
    assert committed(pg, 7) == 1
    assert_clean_servers(pg.primary)


def test_a_refused_transaction_with_more_sent_behind_it_closes_its_server(pg: Cluster, hal: Running) -> None:
    with connect(hal, "stmt_one") as conn:
        pid = one(conn, "SELECT pg_backend_pid()")
    with RawClient(hal.host, hal.port, timeout=10) as raw:
        raw.login("myapp", "myapp", "stmt_one")
        # a Parse with no Sync yet reached the server inside that transaction: the server cannot be
        # rolled back in step with it, so it is closed
        raw.send(rc.query("BEGIN") + rc.parse("INSERT INTO e2e_statement_rows VALUES (8)"))
        raw.expect_fatal_and_close("25001")
    assert committed(pg, 8) == 0
    deadline = time.monotonic() + 5
    while pid in stmt_one_backend(pg) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid not in stmt_one_backend(pg)
    with connect(hal, "stmt_one") as conn:
        assert one(conn, "SELECT 1") == 1
    assert_clean_servers(pg.primary)


# --- where the mode shows --------------------------------------------------------------------------------


def test_the_mode_is_shown_everywhere(pg: Cluster, hal: Running) -> None:
    with connect(hal) as conn:
        assert one(conn, "SELECT 1") == 1
    console = hal.dsn(user="admin", password="admin-pw", dbname="pgbouncer")
    with psycopg.connect(console, autocommit=True, cursor_factory=psycopg.ClientCursor) as admin:
        for what in ("POOLS", "DATABASES"):
            cur = admin.execute(f"SHOW {what}")
            names = [d.name for d in cur.description or ()]
            rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            key = "name" if what == "DATABASES" else "database"
            assert {r["pool_mode"] for r in rows if r[key] == "stmt"} == {"statement"}
    pools = [p for p in hal.admin_json("/snapshot")["pools"] if p["database"] == "stmt"]
    assert pools and {p["pool_mode"] for p in pools} == {"statement"}
    status = subprocess.run(
        [sys.executable, "-m", "halephant", "status", "--url", str(hal.admin_url), "--once"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200"},
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert re.search(r"\bstmt\b.*\bstatement\b", status.stdout), status.stdout
    assert re.search(r"login ok \(.*pool stmt, statement mode", hal.log_text())


CHECKED = """\
clusters:
  main:
    nodes: [127.0.0.1:5999]
databases:
  myapp:
    cluster: main
    mode: {mode}
users:
  myapp:
    password: secret
"""


def test_halephant_check_accepts_statement_and_lists_it_for_a_bad_mode(tmp_path: Any) -> None:
    def check(mode: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{mode}.yaml"
        path.write_text(CHECKED.format(mode=mode))
        return subprocess.run(
            [sys.executable, "-m", "halephant", "check", "-c", str(path)],
            capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip

    good = check("statement")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = check("statment")
    assert bad.returncode != 0
    assert re.search(
        r"statment\.yaml:7:11: databases\.myapp\.mode: "
        r"Input should be 'transaction', 'session' or 'statement'",
        bad.stdout + bad.stderr,
    ), bad.stdout + bad.stderr
