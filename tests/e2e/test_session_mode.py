"""End to end: session pooling keeps one server per client session, and cleans it before the next client.

The pool has a single server, so the next client necessarily gets the server the last one used: whatever
that client left behind (settings, temporary tables, prepared statements, LISTEN, advisory locks) would
show, unless `server_reset_query` (DISCARD ALL) removed it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import psycopg
import pytest
from rawclient import RawClient, terminate
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    config = default_config(
        pg,
        databases={
            "myapp": {
                "cluster": "main", "mode": "session", "pool_size": 1, "checkout_timeout": "5s",
                "server_reset_query": "DISCARD ALL",
            },
        },
        limits={"connect_timeout": "3s", "login_timeout": "5s"},
    )  # fmt: skip
    return module_halephant.start(config)


def connect(hal: Running, **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(hal.dsn(), **kwargs)


def one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_one_backend_for_the_whole_session(pg: Cluster, hal: Running) -> None:
    with connect(hal) as conn:
        pid = one(conn, "SELECT pg_backend_pid()")
        for _ in range(3):
            with conn.transaction():
                assert one(conn, "SELECT pg_backend_pid()") == pid
            assert one(conn, "SELECT pg_backend_pid()") == pid
    with connect(hal, autocommit=False) as conn:
        for _ in range(3):
            assert one(conn, "SELECT pg_backend_pid()") == pid  # the one server of the pool, reused
            conn.commit()
    assert_clean_servers(pg.primary)


def test_session_state_lives_with_the_session_and_dies_with_it(pg: Cluster, hal: Running) -> None:
    with connect(hal, application_name="state-setter") as conn:
        pid = one(conn, "SELECT pg_backend_pid()")
        conn.execute("SET work_mem = '7MB'")
        conn.execute("SET search_path = pg_temp, public")
        conn.execute("SET application_name = 'renamed'")
        conn.execute("CREATE TEMP TABLE e2e_session_tmp (n int)")
        conn.execute("INSERT INTO e2e_session_tmp VALUES (1), (2)")
        conn.execute("PREPARE e2e_session_plan AS SELECT count(*) FROM e2e_session_tmp")
        conn.execute("LISTEN e2e_session_channel")
        conn.execute("SELECT pg_advisory_lock(424242)")
        with conn.transaction():
            conn.execute("INSERT INTO e2e_session_tmp VALUES (3)")
        # it all holds across statements and transactions of this session
        assert one(conn, "SHOW work_mem") == "7MB"
        assert one(conn, "SHOW application_name") == "renamed"
        assert one(conn, "EXECUTE e2e_session_plan") == 3
        assert one(conn, "SELECT count(*) FROM pg_listening_channels()") == 1
        assert one(conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 1
        assert one(conn, "SELECT pg_backend_pid()") == pid

    with connect(hal) as conn:
        assert one(conn, "SELECT pg_backend_pid()") == pid  # reused, not closed and reopened
        assert one(conn, "SELECT setting = reset_val FROM pg_settings WHERE name = 'work_mem'") is True
        assert one(conn, "SHOW work_mem") != "7MB"
        assert one(conn, "SHOW search_path") == '"$user", public'
        assert one(conn, "SHOW application_name") != "renamed"
        assert one(conn, "SELECT to_regclass('pg_temp.e2e_session_tmp')") is None
        assert one(conn, "SELECT count(*) FROM pg_prepared_statements") == 0
        assert one(conn, "SELECT count(*) FROM pg_listening_channels()") == 0
        assert one(conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    assert_clean_servers(pg.primary)


def test_client_leaving_mid_transaction_does_not_hand_on_its_server(pg: Cluster, hal: Running) -> None:
    conn = connect(hal)
    pid = one(conn, "SELECT pg_backend_pid()")
    conn.execute("BEGIN")
    conn.execute("CREATE TEMP TABLE e2e_session_open (n int)")
    conn.close()  # Terminate while a transaction is open: the server cannot be reset to a known state
    assert_clean_servers(pg.primary)
    with connect(hal) as conn:
        assert one(conn, "SELECT pg_backend_pid()") != pid
        assert one(conn, "SELECT to_regclass('pg_temp.e2e_session_open')") is None
        assert one(conn, "SELECT 'works'") == "works"
    assert pg.primary.sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0"
    assert_clean_servers(pg.primary)


def test_client_leaving_in_the_middle_of_a_notification_does_not_hand_on_its_server(
    pg: Cluster, hal: Running
) -> None:
    # A listening client that reads nothing: halephant stops reading its server once the client's socket
    # is full, most likely in the middle of a notification. The client then leaves between transactions.
    listener = RawClient(hal.host, hal.port, timeout=5)
    listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        listener.login("myapp", "myapp", "myapp")
        listener.simple_query("LISTEN e2e_session_flood")
        with psycopg.connect(pg.primary.dsn("myapp", "myapp", "myapp"), autocommit=True) as direct:
            direct.execute(  # 24 MB, far more than the sockets on the way hold
                "SELECT pg_notify('e2e_session_flood', g || repeat('x', 7990))"
                " FROM generate_series(1, 3000) g"
            )
        time.sleep(0.5)
        listener.send(terminate())
    finally:
        listener.close()
    with connect(hal) as conn:
        assert one(conn, "SELECT count(*) FROM pg_listening_channels()") == 0
        assert one(conn, "SELECT 'works'") == "works"
    assert_clean_servers(pg.primary)
    # (the reset's answer was read from the middle of the notification: ProtocolViolation in the callback)
    assert "Traceback" not in hal.log_text()


def test_a_loaded_library_closes_the_server_when_its_client_leaves(pg: Cluster, hal: Running) -> None:
    # DISCARD ALL unloads nothing: the next client would get a backend with the library's hooks in place
    with connect(hal) as conn:
        pid = one(conn, "SELECT pg_backend_pid()")
        try:
            conn.execute("SELECT 1; LOAD 'plpgsql'")
        except psycopg.Error:
            pass  # not allowed for this role: closed all the same, halephant cannot tell what happened
    with connect(hal) as conn:
        assert one(conn, "SELECT pg_backend_pid()") != pid
    assert pg.primary.sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0"
    with connect(hal) as conn:
        other = one(conn, "SELECT pg_backend_pid()")
        conn.execute("SET work_mem = '3MB'")  # any other session state: reset, the server kept
    with connect(hal) as conn:
        assert one(conn, "SELECT pg_backend_pid()") == other


def test_startup_parameters_reach_the_server(pg: Cluster, hal: Running) -> None:
    with connect(hal, application_name="e2e-session", options="-c work_mem=5MB") as conn:
        assert one(conn, "SHOW application_name") == "e2e-session"
        assert one(conn, "SHOW work_mem") == "5MB"
    assert_clean_servers(pg.primary)


def _one_server_sessions(
    pg: Cluster, reset_query: str, checkout_timeout: str, **overrides: Any
) -> dict[str, Any]:
    """Session pooling of `myapp` on one server connection, reset with `reset_query` (`overrides` as
    for `default_config`)."""
    database = {
        "cluster": "main", "mode": "session", "pool_size": 1, "checkout_timeout": checkout_timeout,
        "server_reset_query": reset_query,
    }  # fmt: skip
    return default_config(pg, databases={"myapp": database}, **overrides)


def test_a_failed_reset_closes_the_server_and_the_next_client_gets_a_new_one(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # PostgreSQL refuses this reset: DISCARD ALL cannot run in the implicit transaction block of a query
    # string of several statements. The server cannot be known clean, so it must be closed, not handed on.
    run = halephant.start(_one_server_sessions(pg, "DISCARD ALL; SELECT 1", "5s"))
    pids = []
    for _ in range(2):
        with connect(run) as conn:
            pids.append(one(conn, "SELECT pg_backend_pid()"))
            assert one(conn, "SHOW work_mem") != "7MB"
            conn.execute("SET work_mem = '7MB'")
            conn.execute("SELECT pg_advisory_lock(424243)")
    assert pids[0] != pids[1]
    assert_clean_servers(pg.primary)
    log = run.log_text()
    assert f"closing server pid {pids[0]}: reset query failed: DISCARD ALL cannot run inside" in log
    assert "Traceback" not in log


def test_a_reset_that_never_answers_closes_the_server_and_the_next_client_gets_a_new_one(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # A reset waiting on a lock stands for any that never answers (a frozen server, a network gone
    # silent): no client owns the server meanwhile, and it holds the pool's only place.
    reset = "SELECT pg_advisory_xact_lock(424244)"
    run = halephant.start(_one_server_sessions(pg, reset, "10s", limits={"connect_timeout": "1s"}))
    with psycopg.connect(pg.primary.dsn("myapp", "myapp", "myapp"), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(424244)")
        with connect(run) as conn:
            pid = one(conn, "SELECT pg_backend_pid()")
        started = time.monotonic()
        with connect(run) as conn:
            assert one(conn, "SELECT pg_backend_pid()") != pid
        assert time.monotonic() - started < 5  # connect_timeout, and the once-a-second sweep
    assert_clean_servers(pg.primary)
    assert f"closing server pid {pid}: no answer to its reset within connect_timeout (1s)" in run.log_text()
