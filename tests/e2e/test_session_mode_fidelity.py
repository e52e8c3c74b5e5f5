"""End to end: through halephant's session pooling a client sees what it would see connected directly.

The process ID in BackendKeyData is the server's own (so `pg_backend_pid()` and the sender PID of the
client's own NOTIFYs match it) while cancel requests still go through halephant with halephant's secret;
every startup parameter PostgreSQL accepts is accepted, and the ParameterStatus messages are PostgreSQL's.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import psycopg.errors
import pytest
from rawclient import RawClient
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster, conninfo

pytestmark = pytest.mark.e2e

#: startup parameters beyond what libpq sends by itself, as a driver may send them
EXTRA_STARTUP = {
    "client_min_messages": "warning",
    "extra_float_digits": "3",
    "DateStyle": "German",
    "IntervalStyle": "iso_8601",
    "TimeZone": "America/New_York",
    "client_encoding": "utf-8",
    "application_name": "fidelity",
    "options": "-c work_mem=3MB --lock-timeout=5s",
}


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    return module_halephant.start(
        default_config(pg, databases={"myapp": {"cluster": "main", "mode": "session", "pool_size": 3}})
    )


def direct_dsn(pg: Cluster, **extra: Any) -> str:
    node = pg.primary
    return conninfo(
        host=node.host, port=node.port, user="myapp", password="myapp", dbname="myapp", sslmode="disable",
        **extra,
    )  # fmt: skip


def one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_backend_pid_is_the_servers_and_cancel_still_works(pg: Cluster, hal: Running) -> None:
    with psycopg.connect(hal.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        assert one(conn, "SELECT pg_backend_pid()") == pid
        conn.execute("LISTEN fidelity_self")
        conn.execute("NOTIFY fidelity_self, 'me'")
        notes = list(conn.notifies(timeout=2, stop_after=1))
        assert [(n.payload, n.pid) for n in notes] == [("me", pid)]
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        assert time.monotonic() - started < 5
        timer.join()
        assert one(conn, "SELECT 1") == 1
    assert_clean_servers(pg.primary)


def test_parameter_status_is_exactly_postgresqls(pg: Cluster, hal: Running) -> None:
    for extra in ({}, {"application_name": "fid", "options": "-c TimeZone=Asia/Tokyo -c DateStyle=SQL,DMY"}):
        with psycopg.connect(direct_dsn(pg, **extra)) as direct, psycopg.connect(hal.dsn(**extra)) as pooled:
            names = [
                "application_name", "client_encoding", "DateStyle", "default_transaction_read_only",
                "in_hot_standby", "integer_datetimes", "IntervalStyle", "is_superuser", "server_encoding",
                "server_version", "session_authorization", "standard_conforming_strings", "TimeZone",
            ]  # fmt: skip
            for name in names:
                assert pooled.info.parameter_status(name) == direct.info.parameter_status(name), name


def _login(host: str, port: int, params: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    with RawClient(host, port) as raw:
        session = raw.login("myapp", "myapp", database="myapp", extra=params)
        shown = []
        for setting in ("client_min_messages", "extra_float_digits", "DateStyle", "work_mem", "lock_timeout"):
            rows = [m for m in raw.simple_query(f"SHOW {setting}") if m.type == b"D"]
            shown.append(rows[0].payload[6:].decode())
        return session.params, shown


def test_every_startup_parameter_is_accepted_as_postgresql_does(pg: Cluster, hal: Running) -> None:
    direct_params, direct_shown = _login(pg.primary.host, pg.primary.port, EXTRA_STARTUP)
    pooled_params, pooled_shown = _login(hal.host, hal.port, EXTRA_STARTUP)
    assert pooled_shown == direct_shown == ["warning", "3", "German, DMY", "3MB", "5s"]
    assert pooled_params == direct_params
    assert pooled_params["client_encoding"] == "UTF8"
    assert_clean_servers(pg.primary)


def test_startup_parameters_in_transaction_pooling_too(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(default_config(pg))
    direct_params, direct_shown = _login(pg.primary.host, pg.primary.port, EXTRA_STARTUP)
    pooled_params, pooled_shown = _login(run.host, run.port, EXTRA_STARTUP)
    assert pooled_shown == direct_shown
    for name in ("client_encoding", "DateStyle", "IntervalStyle", "TimeZone", "application_name"):
        assert pooled_params[name] == direct_params[name], name
    assert_clean_servers(pg.primary)


def test_terminating_its_own_backend_ends_the_session_as_directly(pg: Cluster, hal: Running) -> None:
    outcomes = []
    for dsn in (direct_dsn(pg), hal.dsn()):
        conn = psycopg.connect(dsn, autocommit=True)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        outcomes.append((type(info.value).__name__, info.value.sqlstate))
        conn.close()
    assert outcomes[1] == outcomes[0] == ("AdminShutdown", "57P01")
    with psycopg.connect(hal.dsn(), autocommit=True) as conn:  # the pool replaced its server
        assert one(conn, "SELECT 1") == 1
