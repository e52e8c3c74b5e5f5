"""End-to-end: replica routing and database routing on a real primary + streaming replica.

User-based (a `read_only` alias user served by the replica, every read-write switch refused with 25006,
`replica_fallback`), transaction-based (`BEGIN READ ONLY`, `SET SESSION CHARACTERISTICS AS TRANSACTION
READ ONLY` without pinning, `read_only_transactions: primary`), the reasons in the debug log, the
catch-all `'*'` database, `DROP DATABASE` of a database halephant holds idle connections to, and two
independent clusters behind one port.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors
import pytest
from psycopg.pq import TransactionStatus
from rawclient import RawClient, data_rows, errors
from support.cluster import start_test_cluster
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def proxy(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    pg.primary.sql(
        "CREATE TABLE IF NOT EXISTS routing_t (id int); ALTER TABLE routing_t OWNER TO myapp;"
        "GRANT SELECT ON routing_t TO myapp_ro",
        dbname="myapp",
    )
    pg.wait_replicated()
    config = default_config(
        pg,
        clusters={"solo": {"nodes": [f"{pg.primary.host}:{pg.primary.port}"]}},
        databases={
            "fallback_primary": {"cluster": "solo", "database": "myapp"},
            "fallback_error": {"cluster": "solo", "database": "myapp", "replica_fallback": "error"},
            "ro_on_primary": {"cluster": "main", "database": "myapp", "read_only_transactions": "primary"},
            "myapp_session": {"cluster": "main", "database": "myapp", "mode": "session", "pool_size": 2},
            "*": {"cluster": "main", "pool_size": 3},
        },
        users={"myapp_ro": {"password": "myapp_ro", "read_only": True, "server_user": "myapp"}},
        logging={"level": "debug"},
    )
    return module_halephant.start(config)


@pytest.fixture(autouse=True)
def clean_afterwards(pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(pg)


def connect(
    proxy: Running, autocommit: bool = True, prepare_threshold: int | None = None, **params: Any
) -> psycopg.Connection[Any]:
    # statements sent as they are unless a test asks psycopg to prepare them (0: at once)
    conn = psycopg.connect(proxy.dsn(**params), autocommit=autocommit, connect_timeout=5)
    conn.prepare_threshold = prepare_threshold
    return conn


def ro(proxy: Running, autocommit: bool = True, **params: Any) -> psycopg.Connection[Any]:
    return connect(proxy, autocommit, user="myapp_ro", password="myapp_ro", **params)


def one(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def local_port(conn: psycopg.Connection[Any]) -> int:
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        port: int = sock.getsockname()[1]
    return port


def status(conn: psycopg.Connection[Any]) -> TransactionStatus:
    return conn.info.transaction_status


# --- user-based: the read-only alias -------------------------------------------------------------------


def test_read_only_user_is_served_by_the_replica_as_the_application_role(proxy: Running) -> None:
    with ro(proxy) as conn:
        for _ in range(3):  # every transaction, not just the first
            assert one(conn, "SELECT pg_is_in_recovery()") is True
        assert one(conn, "SELECT current_user") == "myapp"  # the alias logs in upstream as myapp
        assert one(conn, "SHOW default_transaction_read_only") == "on"
        assert conn.info.parameter_status("default_transaction_read_only") == "on"
    with connect(proxy) as conn:
        assert one(conn, "SELECT pg_is_in_recovery()") is False
        assert one(conn, "SHOW default_transaction_read_only") == "off"


def test_read_only_user_cannot_switch_at_startup_by_the_case_of_a_name(proxy: Running) -> None:
    # A startup parameter's name is a setting's in any case (asyncpg's server_settings sends any):
    # PostgreSQL would apply it after the pool's default_transaction_read_only=on.
    extra = {"Default_Transaction_Read_Only": "off"}
    with RawClient(proxy.host, proxy.port, timeout=5) as conn, pytest.raises(AssertionError, match="25006"):
        conn.login("myapp_ro", "myapp_ro", "myapp", extra=extra)


def test_the_alias_has_pools_of_its_own(proxy: Running) -> None:
    # myapp and myapp_ro log in upstream as the same role; a server set up read-only for one must never
    # serve the other
    with ro(proxy) as reader, connect(proxy) as writer:
        for _ in range(5):
            assert one(reader, "SHOW default_transaction_read_only") == "on"
            assert one(writer, "SHOW default_transaction_read_only") == "off"
            writer.execute("INSERT INTO routing_t VALUES (1)")
    assert "myapp/myapp_ro@" in proxy.log_text()


def test_a_write_through_the_read_only_user_fails_25006_and_the_connection_stays_usable(
    proxy: Running,
) -> None:
    with ro(proxy) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO routing_t VALUES (2)")
        assert status(conn) is TransactionStatus.IDLE
        assert one(conn, "SELECT count(*) >= 0 FROM routing_t") is True


READ_WRITE_SWITCHES = [
    "SET default_transaction_read_only = off",
    "SET default_transaction_read_only TO 'false'",
    "set session default_transaction_read_only = 0",
    "SET default_transaction_read_only TO DEFAULT",
    "RESET default_transaction_read_only",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
    "BEGIN READ WRITE",
    "begin transaction isolation level repeatable read read write",
    "START TRANSACTION READ WRITE",
    "SET transaction_read_only = off",
    "SET LOCAL transaction_read_only TO off",
    "SET TRANSACTION READ WRITE",
    "/* tag */ SET default_transaction_read_only = off",
    'SET "default_transaction_read_only" = off',
    "SELECT 1; SET default_transaction_read_only = off",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT pg_catalog.set_config('transaction_read_only', 'off', true)",
    "DO $$ BEGIN EXECUTE 'SET default_transaction_read_only = off'; END $$",
    "SELECT set_config('default_transaction_read_only'::text, 'off', false)",
    "SELECT set_config('default_transaction_' || 'read_only', 'off', false)",
    "SELECT set_config(E'default_transaction_read_only', 'off', false)",
    "SELECT \"set_config\"('default_transaction_read_only', 'off', false)",
    "DO $$ BEGIN PERFORM set_config('default_transaction_' || 'read_only', 'off', false); END $$",
]


@pytest.mark.parametrize("sql", READ_WRITE_SWITCHES)
def test_read_only_user_cannot_switch_to_read_write(proxy: Running, sql: str) -> None:
    with ro(proxy) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
            conn.execute(sql)
        assert "is read-only" in str(info.value)
        assert "users.myapp_ro.read_only" in (info.value.diag.message_hint or "")
        assert status(conn) is TransactionStatus.IDLE
        assert one(conn, "SHOW default_transaction_read_only") == "on"
        assert one(conn, "SELECT pg_is_in_recovery()") is True


@pytest.mark.parametrize("sql", ["SET TRANSACTION READ WRITE", "SET LOCAL transaction_read_only = off"])
def test_read_only_user_cannot_switch_inside_a_transaction(proxy: Running, sql: str) -> None:
    with ro(proxy, autocommit=False) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute(sql)
        assert status(conn) is TransactionStatus.INERROR  # as PostgreSQL aborts on any error
        conn.rollback()
        assert one(conn, "SELECT pg_is_in_recovery()") is True


@pytest.mark.parametrize(
    "sql",
    [
        "SET default_transaction_read_only = on",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "BEGIN READ ONLY",
        "SHOW transaction_read_only",
        "SELECT current_setting('default_transaction_read_only')",
        "SELECT set_config('application_name', 'x', false)",
    ],
)
def test_read_only_user_may_stay_read_only(proxy: Running, sql: str) -> None:
    with ro(proxy) as conn:
        conn.execute(sql)
        if sql.startswith("BEGIN"):
            conn.execute("ROLLBACK")
        assert one(conn, "SELECT pg_is_in_recovery()") is True


def test_read_only_user_in_session_pooling_keeps_a_replica_server(proxy: Running) -> None:
    with ro(proxy, dbname="myapp_session") as conn:
        pid = one(conn, "SELECT pg_backend_pid()")
        assert one(conn, "SELECT pg_is_in_recovery()") is True
        assert one(conn, "SELECT pg_backend_pid()") == pid
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        assert one(conn, "SHOW default_transaction_read_only") == "on"


def test_replica_fallback_primary_stays_read_only(proxy: Running) -> None:
    with ro(proxy, dbname="fallback_primary") as conn:
        assert one(conn, "SELECT pg_is_in_recovery()") is False  # no replica in cluster solo
        assert one(conn, "SHOW default_transaction_read_only") == "on"
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO routing_t VALUES (3)")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("BEGIN READ WRITE")
        assert one(conn, "SELECT 1") == 1
    log = proxy.log_text()
    assert "primary: user myapp_ro is read-only, no usable replica (replica_fallback: primary)" in log


def test_replica_fallback_primary_refuses_a_session_switched_to_read_write_unseen(
    pg: Cluster, proxy: Running
) -> None:
    # dynamic SQL: no statement halephant sees names the setting, but the server reports the switch
    with ro(proxy, dbname="fallback_primary") as conn:
        conn.execute("DO $$ BEGIN EXECUTE 'SET default_transaction_read' || '_only = off'; END $$")
        for sql in ["INSERT INTO routing_t VALUES (5)", "SELECT 1"]:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
                conn.execute(sql)
            assert "switched to read-write" in str(info.value)
            assert status(conn) is TransactionStatus.IDLE
    assert pg.primary.sql("SELECT count(*) FROM routing_t WHERE id = 5", dbname="myapp") == "0"


def test_replica_fallback_error_is_57P03(proxy: Running) -> None:
    with ro(proxy, dbname="fallback_error") as conn:
        with pytest.raises(psycopg.errors.CannotConnectNow) as info:
            conn.execute("SELECT 1")
        assert "no replica is available" in str(info.value)
        assert status(conn) is TransactionStatus.IDLE
    with connect(proxy, dbname="fallback_error") as conn:  # read-write users are not affected
        assert one(conn, "SELECT pg_is_in_recovery()") is False


# --- transaction-based, for read-write users ------------------------------------------------------------


@pytest.mark.parametrize(
    "begin",
    ["BEGIN READ ONLY", "START TRANSACTION READ ONLY", "begin isolation level repeatable read, read only"],
)
@pytest.mark.parametrize("prepare_threshold", [None, 0], ids=["sent", "prepared"])
def test_a_read_only_transaction_goes_to_the_replica(
    proxy: Running, begin: str, prepare_threshold: int | None
) -> None:
    # prepared, the BEGIN is a Parse once, then a Bind of its name: routed by the text all the same
    with connect(proxy, prepare_threshold=prepare_threshold) as conn:
        for _ in range(3):
            conn.execute(begin)
            assert one(conn, "SELECT pg_is_in_recovery()") is True
            conn.execute("COMMIT")
            assert one(conn, "SELECT pg_is_in_recovery()") is False  # the next transaction is routed again
            conn.execute("BEGIN")
            assert one(conn, "SELECT pg_is_in_recovery()") is False
            conn.execute("COMMIT")


def test_a_serializable_read_only_transaction_stays_on_the_primary(proxy: Running) -> None:
    # a hot standby cannot run SERIALIZABLE (0A000): such a transaction is kept on the primary
    with connect(proxy) as conn:
        conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE")
        assert one(conn, "SELECT pg_is_in_recovery()") is False
        conn.execute("COMMIT")


@pytest.mark.parametrize(
    ("on", "off"),
    [
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        ),
        ("SET default_transaction_read_only = on", "SET default_transaction_read_only TO off"),
    ],
)  # fmt: skip
def test_a_read_only_session_goes_to_replicas_until_reset(proxy: Running, on: str, off: str) -> None:
    with connect(proxy) as conn:
        me = f"from 127.0.0.1:{local_port(conn)}>"
        conn.execute(on)
        for _ in range(3):
            assert one(conn, "SELECT pg_is_in_recovery()") is True
            assert one(conn, "SHOW default_transaction_read_only") == "on"
        # as directly: a read-only session may still begin a read-write transaction (on the primary)
        conn.execute("BEGIN READ WRITE")
        conn.execute("INSERT INTO routing_t VALUES (6)")
        assert one(conn, "SELECT pg_is_in_recovery()") is False
        conn.execute("COMMIT")
        assert one(conn, "SELECT pg_is_in_recovery()") is True
        conn.execute(off)
        assert one(conn, "SELECT pg_is_in_recovery()") is False
        conn.execute("INSERT INTO routing_t VALUES (4)")  # read-write again, on the primary
        assert one(conn, "SHOW default_transaction_read_only") == "off"
    # carried from server to server rather than pinning the client to one
    mine = [line for line in proxy.log_text().splitlines() if me in line]
    assert mine and not [line for line in mine if "pinned" in line]
    with connect(proxy) as other:  # and no server was left read-only for the next client
        for _ in range(5):
            assert one(other, "SHOW default_transaction_read_only") == "off"


def test_the_statement_right_after_a_switch_is_routed_by_it(proxy: Running) -> None:
    # The switch is read back from the server after its transaction, while the client may already have
    # sent its next statement: that one waits for the answer and is routed by it, never sent on to the
    # server of the switch (a write right after `... = off` on the replica failed with 25006).
    # A raw client sends the next statement the moment the ReadyForQuery arrives, as psql -c ... -c does.
    steps = [
        ("SET default_transaction_read_only = on", None),
        ("SELECT pg_is_in_recovery()", [["t"]]),
        ("SET search_path = public", None),
        ("SET default_transaction_read_only = off", None),
        ("INSERT INTO routing_t VALUES (100)", None),
        ("SELECT pg_is_in_recovery()", [["f"]]),
    ]
    for _ in range(20):
        with RawClient(proxy.host, proxy.port, timeout=5) as conn:
            conn.login("myapp", "myapp", "myapp")
            for sql, rows in steps:
                out = conn.simple_query(sql)
                assert errors(out) == [], sql
                assert rows is None or data_rows(out) == rows, sql


@pytest.mark.parametrize(
    "undone",
    [
        ["BEGIN", "SET default_transaction_read_only = on", "ROLLBACK"],
        ["BEGIN", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SELECT 1/0"],
        ["SET default_transaction_read_only = on; SELECT 1/0"],
        ["BEGIN", "SAVEPOINT s", "SET default_transaction_read_only = on", "ROLLBACK TO s", "COMMIT"],
    ],
    ids=["rolled-back", "failed-transaction", "failed-query", "rolled-back-savepoint"],
)
def test_a_switch_postgresql_undid_changes_no_route(proxy: Running, undone: list[str]) -> None:
    with connect(proxy) as conn:
        for sql in undone:
            try:
                conn.execute(sql)
            except psycopg.errors.DivisionByZero:
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
        assert one(conn, "SHOW default_transaction_read_only") == "off"
        conn.execute("INSERT INTO routing_t VALUES (7)")  # as directly: read-write, so on the primary
        assert one(conn, "SELECT pg_is_in_recovery()") is False


def test_a_read_only_session_stays_read_only_on_the_primary(proxy: Running) -> None:
    with connect(proxy, dbname="ro_on_primary") as conn:
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        assert one(conn, "SELECT pg_is_in_recovery()") is False  # read_only_transactions: primary
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO routing_t VALUES (5)")
        conn.execute("BEGIN READ ONLY")
        assert one(conn, "SELECT pg_is_in_recovery()") is False
        conn.execute("COMMIT")


def test_every_decision_is_logged_with_its_reason(proxy: Running) -> None:
    with ro(proxy) as conn:
        conn.execute("SELECT 1")
    with connect(proxy) as conn:
        conn.execute("BEGIN READ ONLY")
        conn.execute("COMMIT")
        conn.execute("SELECT 1")
    log = proxy.log_text()
    assert re.search(r"route replica: replica: user myapp_ro is read-only", log)
    assert re.search(r"route replica: replica: transaction starts READ ONLY", log)
    assert re.search(r"route primary: primary: default route for myapp", log)


# --- database-based -------------------------------------------------------------------------------------


def test_the_catch_all_entry_serves_unlisted_databases_under_their_own_name(proxy: Running) -> None:
    with connect(proxy, dbname="postgres") as conn:
        assert one(conn, "SELECT current_database()") == "postgres"
        assert one(conn, "SELECT pg_is_in_recovery()") is False
    with ro(proxy, dbname="postgres") as conn:
        assert one(conn, "SELECT pg_is_in_recovery()") is True


def test_an_unlisted_database_that_does_not_exist_upstream_is_3D000(proxy: Running) -> None:
    with pytest.raises(psycopg.OperationalError, match='database "no_such_db" does not exist'):
        connect(proxy, dbname="no_such_db")


def test_catch_all_pools_nobody_uses_are_forgotten(pg: Cluster, halephant: HalephantFactory) -> None:
    # one set of pools per name asked for, with no bound: kept for the entry's idle_timeout after last use
    catch_all = {"cluster": "main", "pool_size": 2, "idle_timeout": "1s"}
    run = halephant.start(default_config(pg, databases={"*": catch_all}))
    for name in ("postgres", "no_such_db_1", "no_such_db_2"):
        try:
            with psycopg.connect(run.dsn(dbname=name), connect_timeout=5) as conn:
                assert one(conn, "SELECT current_database()") == name
        except psycopg.OperationalError as exc:
            assert "does not exist" in str(exc)
    with psycopg.connect(run.dsn(dbname="myapp"), autocommit=True, connect_timeout=5) as held:
        deadline = time.monotonic() + 10
        while run.log_text().count("forgotten: unused") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        log = run.log_text()
        for name in ("postgres", "no_such_db_1", "no_such_db_2"):
            assert f"pools of {name}/myapp forgotten: unused for 1 s" in log
        assert "pools of myapp/myapp forgotten" not in log  # its client is still connected
        assert one(held, "SELECT 1") == 1
    with psycopg.connect(run.dsn(dbname="postgres"), connect_timeout=5) as again:  # made again on demand
        assert one(again, "SELECT current_database()") == "postgres"


def test_the_pools_of_a_catch_all_database_show_their_mode(proxy: Running) -> None:
    with connect(proxy, dbname="postgres") as conn:
        assert one(conn, "SELECT current_database()") == "postgres"
        pools = [p for p in proxy.admin_json("/pools") if p["database"] == "postgres"]
    assert pools and {p["pool_mode"] for p in pools} == {"transaction"}


@pytest.mark.parametrize(
    "drop", ["DROP DATABASE {name}", "drop database if exists {name}", 'DROP DATABASE "{name}" WITH (FORCE)']
)
def test_drop_database_closes_halephant_idle_connections_to_it(
    pg: Cluster, proxy: Running, drop: str
) -> None:
    name = "routing_drop_me"
    with connect(proxy, dbname="postgres") as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
        with connect(proxy, dbname=name) as conn:  # leaves an idle server connection in halephant's pool
            assert one(conn, "SELECT current_database()") == name
        assert f"pool {name}/myapp@" in proxy.log_text()
        admin.execute(drop.format(name=name))
        assert one(admin, f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == 0
    assert f"DROP DATABASE {name}: closing idle connections to it" in proxy.log_text()


def test_drop_database_still_fails_while_another_client_uses_it(proxy: Running) -> None:
    name = "routing_in_use"
    with connect(proxy, dbname="postgres") as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
        with connect(proxy, dbname=name, autocommit=False) as user:
            user.execute("SELECT 1")  # holds its server: a transaction is open
            with pytest.raises(psycopg.errors.ObjectInUse):
                admin.execute(f"DROP DATABASE {name}")
            user.rollback()
        admin.execute(f"DROP DATABASE {name}")


def test_two_independent_clusters_behind_one_port(pg: Cluster, halephant: HalephantFactory) -> None:
    other = start_test_cluster(replicas=0)
    try:
        for cluster, name in ((other, "other"), (pg, "main")):
            cluster.primary.sql(
                "DROP TABLE IF EXISTS which; CREATE TABLE which (name text); GRANT SELECT ON which TO myapp;"
                f"INSERT INTO which VALUES ('{name}')",
                dbname="myapp",
            )
        config = default_config(
            pg,
            clusters={"other": {"nodes": [f"{other.primary.host}:{other.primary.port}"]}},
            databases={"otherapp": {"cluster": "other", "database": "myapp"}},
        )
        run = halephant.start(config)
        with connect(run) as main_conn, connect(run, dbname="otherapp") as other_conn:
            assert one(main_conn, "SELECT name FROM which") == "main"
            assert one(other_conn, "SELECT name FROM which") == "other"
            assert one(other_conn, "SELECT current_database()") == "myapp"
            assert one(other_conn, "SELECT current_setting('port')::int") == other.primary.port
        assert_clean_servers(other)
    finally:
        pg.primary.sql("DROP TABLE IF EXISTS which", dbname="myapp")
        other.destroy()


def test_a_database_on_an_unknown_cluster_does_not_start(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.spawn(default_config(pg, databases={"lost": {"cluster": "nowhere"}}))
    assert run.proc.wait(15) != 0
    log = run.log_text()
    where = r"halephant-\d+\.yaml:\d+:\d+: databases\.lost\.cluster"
    assert re.search(where + r": no cluster named 'nowhere'", log)


@pytest.mark.parametrize(
    "params",
    [
        {"options": "-c default_transaction_read_only=off"},
        {"options": "--default-transaction-read-only=off"},
    ],
)
def test_read_only_user_cannot_switch_at_startup(proxy: Running, params: dict[str, str]) -> None:
    with pytest.raises(psycopg.OperationalError, match="is read-only"):
        ro(proxy, **params)
    with ro(proxy, options="-c statement_timeout=5s") as conn:  # other startup settings are fine
        assert one(conn, "SHOW statement_timeout") == "5s"
        assert one(conn, "SHOW default_transaction_read_only") == "on"
