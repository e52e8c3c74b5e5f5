"""End-to-end: policy plugins through a running halephant, driven with psycopg.

Covers the default `cursor_guard` (holdable cursors in transaction pools), its settings, disabling it, a
plugin that raises (contained to one client), the `reject_statements` example package, and a routing
plugin that refuses transactions with 25006. Test plugins live in `plugins_for_tests/` and are loaded with
``plugins: {modules: [...]}``; one halephant with all of them serves most of the module.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors
import pytest
import rawclient as rc
from psycopg.pq import TransactionStatus
from rawclient import RawClient
from support.halephant import HalephantFactory, Running, default_config, write_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

PLUGINS_DIR = pathlib.Path(__file__).resolve().parent / "plugins_for_tests"
TEST_PLUGINS = ["raise_on_boom", "reject_routes"]
HAS_REJECT_STATEMENTS = bool(importlib.metadata.entry_points(group="halephant", name="reject_statements"))
HOLD = "DECLARE c CURSOR WITH HOLD FOR SELECT 1"


def _config(pg: Cluster, **overrides: Any) -> dict[str, Any]:
    return default_config(
        pg,
        databases={
            "myapp_session": {"cluster": "main", "database": "myapp", "mode": "session", "pool_size": 2}
        },
        users={
            "trustuser": {"password": "trustuser", "auth": "scram-sha-256"},
            "plainuser": {"password": "plainuser", "auth": "scram-sha-256"},
        },
        limits={"login_timeout": "2s"},
        **overrides,
    )


@pytest.fixture(scope="module")
def proxy(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    plugins: dict[str, Any] = {"modules": TEST_PLUGINS}
    if HAS_REJECT_STATEMENTS:
        plugins["reject_statements"] = {"users": ["myapp"], "patterns": [r"(?i)^\s*drop\s"]}
    with pytest.MonkeyPatch.context() as mp:
        # the factory hands its environment to halephant, which imports the test plugins from there
        mp.setenv("PYTHONPATH", str(PLUGINS_DIR))
        return module_halephant.start(_config(pg, plugins=plugins))


@pytest.fixture(autouse=True)
def clean_afterwards(pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(pg.primary)


def connect(proxy: Running, autocommit: bool = True, **params: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(**params), autocommit=autocommit, connect_timeout=5)


def status(conn: psycopg.Connection[Any]) -> TransactionStatus:
    # a call, so that mypy does not carry one assertion's narrowing over to the next
    return conn.info.transaction_status


def assert_usable(conn: psycopg.Connection[Any]) -> None:
    assert conn.execute("select 1").fetchone() == (1,)
    assert status(conn) in (TransactionStatus.IDLE, TransactionStatus.INTRANS)


def assert_cursor_guard_error(error: psycopg.Error) -> None:
    assert error.diag.sqlstate == "0A000"
    assert error.diag.severity == "ERROR"
    assert "WITH HOLD" in (error.diag.message_primary or "")
    hint = error.diag.message_hint or ""
    assert "session pooling" in hint
    assert "DISABLE_SERVER_SIDE_CURSORS" in hint


# --- cursor_guard ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        HOLD,
        "declare c cursor with hold for select 1",
        "declare c /* x */ cursor with -- y\n hold for select 1",
        'DECLARE "My Cursor" CURSOR WITH HOLD FOR SELECT 1',
        "DECLARE c NO SCROLL BINARY CURSOR WITH HOLD FOR SELECT 1",
        "/* /* nested */ SELECT 1 */ DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "\n\tDECLARE\tc CURSOR\nWITH\r\n  HOLD FOR SELECT 1",
        "SELECT 1; DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    ],
    ids=["upper", "lower", "comments", "quoted-name", "options", "nested-comment", "whitespace", "second"],
)
def test_holdable_cursor_outside_a_transaction_is_0A000(proxy: Running, sql: str) -> None:
    with connect(proxy) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(sql)
        assert_cursor_guard_error(info.value)
        assert status(conn) is TransactionStatus.IDLE
        assert_usable(conn)
        # nothing was declared: the statement never reached a server
        with pytest.raises(psycopg.errors.InvalidCursorName):
            conn.execute("FETCH ALL FROM c")


def test_holdable_cursor_inside_begin_aborts_the_transaction_like_postgresql(proxy: Running) -> None:
    with connect(proxy, autocommit=False) as conn:
        conn.execute("select 1")
        assert status(conn) is TransactionStatus.INTRANS
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(HOLD)
        assert_cursor_guard_error(info.value)
        assert status(conn) is TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 2")
        conn.rollback()
        assert status(conn) is TransactionStatus.IDLE
        assert_usable(conn)
        conn.rollback()


def test_holdable_cursor_inside_begin_with_raw_messages(proxy: Running) -> None:
    # the ReadyForQuery statuses, which psycopg hides: T, then E after the rejection, I after ROLLBACK
    with RawClient(proxy.host, proxy.port) as client:
        client.login("myapp", "myapp", "myapp")
        assert client.simple_query("BEGIN")[-1].payload == b"T"
        answer = client.simple_query(HOLD)
        assert [e["C"] for e in rc.errors(answer)] == ["0A000"]
        assert answer[-1].payload == b"E"
        answer = client.simple_query("select 1")
        assert [e["C"] for e in rc.errors(answer)] == ["25P02"]
        assert client.simple_query("ROLLBACK")[-1].payload == b"I"
        assert rc.data_rows(client.simple_query("select 5")) == [["5"]]


def test_holdable_cursor_via_the_extended_protocol_is_0A000(proxy: Running) -> None:
    with connect(proxy) as conn:
        with conn.cursor() as cur:
            with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
                cur.execute("declare c cursor with hold for select %s", (1,))
            assert_cursor_guard_error(info.value)
        assert status(conn) is TransactionStatus.IDLE
        assert_usable(conn)


def test_holdable_cursor_via_the_extended_protocol_inside_a_transaction(proxy: Running) -> None:
    with connect(proxy, autocommit=False) as conn:
        conn.execute("select %s", (1,))
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute("declare c cursor with hold for select %s", (1,))
        assert_cursor_guard_error(info.value)
        assert status(conn) is TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select %s", (2,))
        conn.rollback()
        assert_usable(conn)
        conn.rollback()


def test_psycopg_named_cursor_with_hold_is_0A000(proxy: Running) -> None:
    # what Django's server-side cursors do in autocommit
    with connect(proxy) as conn:
        cur = conn.cursor(name="django_cursor", withhold=True)
        try:
            with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
                cur.execute("select generate_series(1, 3)")
        finally:
            cur.close()
        assert_cursor_guard_error(info.value)
        assert_usable(conn)


def test_plain_cursor_inside_a_transaction_is_allowed(proxy: Running) -> None:
    with connect(proxy) as conn:
        with conn.transaction():
            conn.execute("DECLARE c CURSOR FOR SELECT generate_series(1, 5)")
            assert conn.execute("FETCH 2 FROM c").fetchall() == [(1,), (2,)]
            assert conn.execute("FETCH ALL FROM c").fetchall() == [(3,), (4,), (5,)]
        assert_usable(conn)


def test_psycopg_named_cursor_without_hold_in_a_transaction_is_allowed(proxy: Running) -> None:
    with connect(proxy, autocommit=False) as conn:
        with conn.cursor(name="plain") as cur:
            cur.execute("select generate_series(1, 4)")
            assert cur.fetchmany(3) == [(1,), (2,), (3,)]
        conn.commit()


def test_holdable_cursor_in_a_session_pool_is_allowed_and_survives_commit(proxy: Running) -> None:
    with connect(proxy, dbname="myapp_session") as conn:
        conn.execute("DECLARE c CURSOR WITH HOLD FOR SELECT generate_series(1, 3)")
        # each statement committed on its own: the cursor outlived its transaction, on the same server
        assert conn.execute("FETCH 2 FROM c").fetchall() == [(1,), (2,)]
        with conn.transaction():
            assert conn.execute("FETCH ALL FROM c").fetchall() == [(3,)]
        conn.execute("CLOSE c")
        assert_usable(conn)


def test_cursor_guard_action_allow(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg, plugins={"cursor_guard": {"action": "allow"}}))
    with connect(run, autocommit=False) as conn:
        # in one transaction, so the FETCH is sure to reach the server that holds the cursor
        conn.execute(HOLD)
        assert conn.execute("FETCH ALL FROM c").fetchall() == [(1,)]
        conn.execute("CLOSE c")
        conn.commit()
        assert_usable(conn)


def test_cursor_guard_disabled(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg, plugins={"disable": ["cursor_guard"]}))
    with connect(run, autocommit=False) as conn:
        conn.execute(HOLD)
        assert conn.execute("FETCH ALL FROM c").fetchall() == [(1,)]
        conn.execute("CLOSE c")
        conn.commit()
        assert_usable(conn)


# --- a plugin that raises ----------------------------------------------------------------------------------


def test_inspect_query_exception_costs_that_client_only(proxy: Running) -> None:
    with connect(proxy) as bystander, connect(proxy) as victim:
        assert_usable(bystander)
        with pytest.raises(psycopg.Error) as info:
            victim.execute("select 'boom'")
        assert info.value.diag.sqlstate == "XX000"
        assert info.value.diag.severity == "FATAL"
        # the plugin is named, not only in the traceback
        assert "plugin 'raise_on_boom' raised in halephant_inspect_query: BoomError" in str(
            info.value.diag.message_primary
        )
        assert victim.closed or victim.broken
        assert_usable(bystander)
        with connect(proxy) as newcomer:
            assert_usable(newcomer)
    log = proxy.log_text()
    assert "Traceback (most recent call last)" in log
    assert "BoomError: boom in statement" in log
    assert "internal error: plugin 'raise_on_boom' raised in halephant_inspect_query" in log


def test_inspect_query_exception_inside_a_transaction(proxy: Running) -> None:
    # the server held mid-transaction must not go back to the pool in that state
    with connect(proxy, autocommit=False) as victim:
        victim.execute("select 1")
        with pytest.raises(psycopg.Error) as info:
            victim.execute("select 'boom'")
        assert info.value.diag.sqlstate == "XX000"
    with connect(proxy) as after:
        assert_usable(after)


@pytest.mark.parametrize(
    ("params", "sql", "hook"),
    [
        ({"application_name": "route_nonsense"}, "SELECT 1", "halephant_route"),
        ({}, "SELECT 'nonsense'", "halephant_inspect_query"),
    ],
    ids=["route", "inspect_query"],
)
def test_a_plugin_answer_of_the_wrong_type_costs_that_client_only(
    proxy: Running, params: dict[str, str], sql: str, hook: str
) -> None:
    # XX000 and closed: never a client left waiting for a ReadyForQuery, never a statement let through
    with connect(proxy) as bystander:
        with RawClient(proxy.host, proxy.port, timeout=5) as client:
            client.login("myapp", "myapp", "myapp", extra=params or None)
            client.send(rc.query(sql))
            error = client.expect_fatal_and_close("XX000", timeout=5)
            assert f"plugin answer of unexpected type from {hook}" in error.fields["M"]
        assert_usable(bystander)
    log = proxy.log_text()
    assert f"closing: XX000 plugin answer of unexpected type from {hook}" in log
    assert "disconnected: closed by halephant: XX000" in log  # not "client sent Terminate"


def test_a_reload_a_plugin_fails_while_it_is_applied_changes_nothing(
    pg: Cluster, halephant: HalephantFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(PLUGINS_DIR))
    config = _config(pg, plugins={"modules": TEST_PLUGINS})
    config["databases"]["myapp"]["pool_size"] = 5
    run = halephant.start(config)
    with connect(run) as client:
        assert_usable(client)  # its pool exists: the reload re-sizes it
        config["databases"]["myapp"]["pool_size"] = 13  # raise_on_boom's pool_size hook raises for it
        config["limits"]["login_timeout"] = "3s"
        assert run.admin_url is not None
        config["listen"] = f"{run.host}:{run.port}"
        config["admin"] = {"listen": run.admin_url.removeprefix("http://")}
        write_config(config, run.config_path)
        run.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed while applying it" not in run.log_text():
            assert time.monotonic() < deadline, run.log_text()
            time.sleep(0.05)
        assert_usable(client)
    # all or nothing: the previous configuration runs on, and the failure is counted
    assert "BoomError: boom sizing pool myapp" in run.log_text()
    shown = {k: v for k, v in _flat(run.admin_json("/config"))}
    assert shown["databases.myapp.pool_size"] == 5 and shown["limits.login_timeout"] == 2.0
    metrics = run.admin_get("/metrics")[1]
    assert 'halephant_reloads_total{result="failed"} 1.0' in metrics
    with connect(run) as newcomer:
        assert_usable(newcomer)


def test_a_reload_of_an_unchanged_file_asks_the_plugins_again(
    pg: Cluster, halephant: HalephantFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    # halephant_pool_size is asked "again after each reload": a plugin may size pools from elsewhere
    size_file = tmp_path / "pool_size"
    size_file.write_text("3")
    monkeypatch.setenv("PYTHONPATH", str(PLUGINS_DIR))
    monkeypatch.setenv("HALEPHANT_TEST_POOL_SIZE_FILE", str(size_file))
    run = halephant.start(_config(pg, plugins={"modules": ["size_from_file"]}))
    with connect(run) as client:
        assert_usable(client)  # its pool exists, sized 3
        size_file.write_text("4")
        run.signal(signal.SIGHUP)  # the configuration file itself is unchanged
        deadline = time.monotonic() + 10
        while "reload: done" not in run.log_text():
            assert time.monotonic() < deadline, run.log_text()
            time.sleep(0.05)
        assert_usable(client)
    log = run.log_text()
    assert "size: max 3 -> 4, min 0 -> 0, reserve 0 -> 0 (size_from_file: 4)" in log, log


def test_a_pool_size_with_recheck_after_is_asked_again_without_a_reload(
    pg: Cluster, halephant: HalephantFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    # a size that follows the clock (office hours) must change by itself: nobody sends SIGHUP
    size_file = tmp_path / "pool_size"
    size_file.write_text("3")
    monkeypatch.setenv("PYTHONPATH", str(PLUGINS_DIR))
    monkeypatch.setenv("HALEPHANT_TEST_POOL_SIZE_FILE", str(size_file))
    monkeypatch.setenv("HALEPHANT_TEST_POOL_SIZE_RECHECK", "1")
    run = halephant.start(_config(pg, plugins={"modules": ["size_from_file"]}))
    with connect(run) as client:
        assert_usable(client)  # its pool exists, sized 3
        assert "created (size 3, min 0: size_from_file: 3)" in run.log_text()
        size_file.write_text("4")
        deadline = time.monotonic() + 10
        while "size: max 3 -> 4, min 0 -> 0, reserve 0 -> 0 (size_from_file: 4)" not in run.log_text():
            assert time.monotonic() < deadline, run.log_text()
            time.sleep(0.05)
        assert_usable(client)
        pools = [p for p in run.admin_json("/pools") if p["database"] == "myapp"]
        assert pools and all(p["pool_size"] == 4 for p in pools), pools
    assert "reload" not in run.log_text()


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, value)]


def test_select_pool_exception_fails_that_login_only(proxy: Running) -> None:
    with connect(proxy) as bystander:
        with RawClient(proxy.host, proxy.port) as client:
            client.send(
                rc.startup({"user": "myapp", "database": "myapp", "application_name": "select_pool_boom"})
            )
            error = client.expect_fatal_and_close("XX000")
            assert "plugin 'raise_on_boom' raised in halephant_select_pool: BoomError" in error.fields["M"]
        with pytest.raises(psycopg.OperationalError, match="internal error"):
            connect(proxy, application_name="select_pool_boom")
        assert_usable(bystander)
        with connect(proxy, application_name="someone_else") as newcomer:
            assert_usable(newcomer)
    assert "BoomError: boom selecting a pool" in proxy.log_text()


# --- the reject_statements example package ----------------------------------------------------------------


@pytest.mark.skipif(
    not HAS_REJECT_STATEMENTS,
    reason="the examples/halephant-reject-statements package is not installed (no reject_statements "
    "entry point in the halephant group)",
)
def test_reject_statements_package(proxy: Running) -> None:
    with connect(proxy) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("DROP TABLE halephant_no_such_table")
        assert info.value.diag.sqlstate == "42501"
        assert status(conn) is TransactionStatus.IDLE
        assert_usable(conn)
        # only statements that match: a DROP inside other text is not one
        assert conn.execute("select 'drop table x'").fetchone() == ("drop table x",)
    with connect(proxy, user="myapp_ro", password="myapp_ro") as other:
        # not a listed user: the statement reaches PostgreSQL, which has its own opinion
        with pytest.raises(psycopg.errors.UndefinedTable):
            other.execute("DROP TABLE halephant_no_such_table")
        other.execute("DROP TABLE IF EXISTS halephant_no_such_table")
        assert_usable(other)


# --- a routing plugin that refuses ------------------------------------------------------------------------


def test_route_reject_for_writes_is_25006_and_the_client_stays_usable(proxy: Running) -> None:
    with connect(proxy, user="plainuser", password="plainuser") as conn:
        assert_usable(conn)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
            conn.execute("CREATE TEMP TABLE t (id int)")
        assert info.value.diag.severity == "ERROR"
        assert status(conn) is TransactionStatus.IDLE
        assert_usable(conn)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TEMP TABLE t (id int) -- %s", (1,))
        assert_usable(conn)


def test_route_reject_for_every_transaction_is_25006_and_the_client_stays_usable(proxy: Running) -> None:
    with connect(proxy, user="trustuser", password="trustuser") as conn:
        for _ in range(2):
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
                conn.execute("select 1")
            assert info.value.diag.severity == "ERROR"
            assert info.value.diag.message_detail == "reject_routes refuses every transaction of this user."
            assert status(conn) is TransactionStatus.IDLE
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("select %s", (1,))
        assert not conn.closed
