"""End to end: in transaction pooling a client's settings live as long as its connection, as they would
connected directly, without tying it to one server.

Database `one` has a single server connection, shared by every client in turn: a client that were pinned
by its SET would make the next client wait until `checkout_timeout` (1 s) and fail with 53300, and a
setting left on the server would show to the next client. After each test the server must be clean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    config = default_config(
        pg,
        databases={
            "one": {"cluster": "main", "database": "myapp", "pool_size": 1, "checkout_timeout": "1s"},
        },
    )
    return module_halephant.start(config)


@pytest.fixture(autouse=True)
def clean_afterwards(pg: Cluster, hal: Running) -> Iterator[None]:
    yield
    assert_clean_servers(pg.primary)
    # the one server of the pool is back at the pool's defaults for whoever comes next
    with connect(hal) as conn:
        assert one(conn, "SELECT count(*) FROM pg_settings WHERE source = 'session'") == 0


def connect(hal: Running, prepare_threshold: int | None = 5, **params: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        hal.dsn(dbname="one", **params),
        autocommit=True,
        connect_timeout=5,
        prepare_threshold=prepare_threshold,
    )


def one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_set_lasts_for_the_client_and_never_reaches_another(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        default_work_mem = one(b, "SHOW work_mem")
        a.execute("SET work_mem = '7MB'")
        a.execute("SET search_path = pg_catalog, public")
        a.execute("SET statement_timeout TO 4321")
        a.execute("SET myapp.tenant = 'acme'")  # a custom setting
        for _ in range(3):  # both take turns on the single server connection
            assert one(a, "SHOW work_mem") == "7MB"
            assert one(a, "SHOW search_path") == "pg_catalog, public"
            assert one(a, "SHOW statement_timeout") == "4321ms"
            assert one(a, "SELECT current_setting('myapp.tenant')") == "acme"
            assert one(b, "SHOW work_mem") == default_work_mem
            assert one(b, "SHOW search_path") == '"$user", public'
            assert one(b, "SELECT current_setting('myapp.tenant', true)") in (None, "")
        assert one(a, "SELECT pg_backend_pid()") == one(b, "SELECT pg_backend_pid()")  # one server, shared


def test_set_local_and_rolled_back_sets_do_not_last(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        default = one(b, "SHOW work_mem")
        with a.transaction():
            a.execute("SET LOCAL work_mem = '5MB'")
            assert one(a, "SHOW work_mem") == "5MB"
        assert one(b, "SHOW work_mem") == default
        assert one(a, "SHOW work_mem") == default
        a.execute("BEGIN")
        a.execute("SET work_mem = '6MB'")
        a.execute("ROLLBACK")
        assert one(b, "SELECT 1") == 1
        assert one(a, "SHOW work_mem") == default
        # a SET after a savepoint that is rolled back goes; the one before it stays, once committed
        with a.transaction():
            a.execute("SET work_mem = '9MB'")
            a.execute("SAVEPOINT s")
            a.execute("SET work_mem = '10MB'")
            a.execute("ROLLBACK TO SAVEPOINT s")
        assert one(b, "SHOW work_mem") == default
        assert one(a, "SHOW work_mem") == "9MB"
        # a failed transaction keeps nothing
        a.execute("BEGIN")
        a.execute("SET work_mem = '11MB'")
        with pytest.raises(psycopg.errors.DivisionByZero):
            a.execute("SELECT 1/0")
        a.execute("ROLLBACK")
        assert one(b, "SELECT 1") == 1
        assert one(a, "SHOW work_mem") == "9MB"


def test_set_in_a_committed_transaction_and_in_a_multi_statement_query_lasts(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        with a.transaction():
            a.execute("SET work_mem = '12MB'")
        a.execute("SELECT 1; SET lock_timeout = '2s'; SELECT 2")
        assert one(b, "SHOW lock_timeout") == "0"
        assert one(a, "SHOW work_mem") == "12MB"
        assert one(a, "SHOW lock_timeout") == "2s"
        a.execute("SELECT set_config('statement_timeout', '2min', false)")
        assert one(b, "SHOW statement_timeout") == "0"
        assert one(a, "SHOW statement_timeout") == "2min"


def test_reset_and_discard_all_return_to_the_pool_defaults(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        default = one(b, "SHOW work_mem")
        a.execute("SET work_mem = '13MB'")
        a.execute("SET lock_timeout = '3s'")
        a.execute("RESET work_mem")
        assert one(b, "SELECT 1") == 1
        assert one(a, "SHOW work_mem") == default
        assert one(a, "SHOW lock_timeout") == "3s"
        a.execute("RESET ALL")
        assert one(b, "SELECT 1") == 1
        assert one(a, "SHOW lock_timeout") == "0"
        a.execute("SET work_mem = '14MB'")
        a.execute("DISCARD ALL")
        assert one(b, "SELECT 1") == 1
        assert one(a, "SHOW work_mem") == default


def test_reported_settings_stay_consistent_with_what_queries_see(hal: Running) -> None:
    with connect(hal, application_name="first", options="-c TimeZone=Europe/Paris") as a, connect(hal) as b:
        assert a.info.parameter_status("TimeZone") == "Europe/Paris"
        a.execute("SET TIME ZONE 'Asia/Tokyo'")
        a.execute("SET application_name = 'renamed'")
        a.execute("SET DateStyle = 'SQL, DMY'")
        for _ in range(2):
            assert one(b, "SHOW TimeZone") != "Asia/Tokyo"
            assert one(b, "SHOW application_name") != "renamed"
            assert one(b, "SHOW DateStyle") == "ISO, MDY"
            assert one(a, "SHOW TimeZone") == "Asia/Tokyo" == a.info.parameter_status("TimeZone")
            assert one(a, "SHOW application_name") == "renamed" == a.info.parameter_status("application_name")
            assert one(a, "SHOW DateStyle") == "SQL, DMY" == a.info.parameter_status("DateStyle")
        assert b.info.parameter_status("TimeZone") != "Asia/Tokyo"
        assert b.info.parameter_status("DateStyle") == "ISO, MDY"
        # a SET that fails changes nothing
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            a.execute("SET TimeZone = 'Not/AZone'")
        assert one(a, "SHOW TimeZone") == "Asia/Tokyo" == a.info.parameter_status("TimeZone")


def test_startup_settings_are_carried_and_overridden_by_set(hal: Running) -> None:
    with connect(hal, options="-c work_mem=15MB -c lock_timeout=4s") as a, connect(hal) as b:
        assert one(a, "SHOW work_mem") == "15MB"
        a.execute("SET work_mem = '16MB'")
        assert one(b, "SHOW lock_timeout") == "0"
        assert one(a, "SHOW work_mem") == "16MB"
        assert one(a, "SHOW lock_timeout") == "4s"


def test_set_does_not_pin_a_client_that_leaves(pg: Cluster, hal: Running) -> None:
    with connect(hal) as a:
        pid = one(a, "SELECT pg_backend_pid()")
        a.execute("SET work_mem = '17MB'")
    with connect(hal) as b:
        assert one(b, "SELECT pg_backend_pid()") == pid  # the same server, not closed for it
        assert one(b, "SELECT setting = reset_val FROM pg_settings WHERE name = 'work_mem'") is True


# Drivers prepare a statement once (Parse), then send only Bind/Execute for it, maybe transactions later:
# psycopg from the prepare_threshold-th run on (0: at once), asyncpg always. A SET in such a statement
# takes effect when it runs, not when it is prepared.


@pytest.mark.parametrize("threshold", [0, 2])
def test_a_set_in_a_prepared_statement_lasts_from_each_run_and_never_reaches_another(
    hal: Running, threshold: int
) -> None:
    with connect(hal, prepare_threshold=threshold) as a, connect(hal) as b:
        default = one(b, "SHOW work_mem")
        for _ in range(4):
            a.execute("SET work_mem = '33MB'")
            assert one(a, "SHOW work_mem") == "33MB"
            assert one(b, "SHOW work_mem") == default
            a.execute("RESET work_mem")
            assert one(a, "SHOW work_mem") == default
            assert one(b, "SHOW work_mem") == default
        for tenant in ("t1", "t2", "t3", "t4"):
            a.execute("SELECT set_config('myapp.tenant', %s, false)", [tenant])
            assert one(a, "SELECT current_setting('myapp.tenant')") == tenant
            assert one(b, "SELECT current_setting('myapp.tenant', true)") in (None, "")
            assert one(a, "SELECT current_setting('myapp.tenant')") == tenant
    with connect(hal) as c:  # after the client left, the server is back at the pool's defaults
        assert one(c, "SELECT current_setting('myapp.tenant', true)") in (None, "")
        assert one(c, "SHOW work_mem") == default


def test_set_config_through_asyncpg_statements_follows_each_call(hal: Running) -> None:
    async def main() -> None:
        a = await asyncpg.connect(
            host=hal.host, port=hal.port, user="myapp", password="myapp", database="one", ssl=False
        )
        try:
            with connect(hal) as b:  # takes turns with `a` on the pool's single server
                for tenant in ("t1", "t2", "t3"):
                    await a.fetchval("SELECT set_config('myapp.tenant', $1, false)", tenant)
                    assert await a.fetchval("SELECT current_setting('myapp.tenant')") == tenant
                    assert one(b, "SELECT current_setting('myapp.tenant', true)") in (None, "")
                    # brought back to `a` on the server that `b` had in between: this call's tenant
                    assert await a.fetchval("SELECT current_setting('myapp.tenant')") == tenant
        finally:
            await a.close()

    asyncio.run(main())


def test_session_mode_is_unchanged(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(default_config(pg, databases={"myapp": {"mode": "session", "pool_size": 1}}))
    with psycopg.connect(run.dsn(), autocommit=True) as conn:
        conn.execute("SET work_mem = '18MB'")
        with conn.transaction():
            assert one(conn, "SHOW work_mem") == "18MB"
    with psycopg.connect(run.dsn(), autocommit=True) as conn:
        assert one(conn, "SELECT setting = reset_val FROM pg_settings WHERE name = 'work_mem'") is True
    assert_clean_servers(pg.primary)


# A client whose client_encoding is not UTF-8 (LATIN1 here) sends text that is not UTF-8 as soon as it holds
# a character outside ASCII: PostgreSQL runs it, so halephant must see what it does all the same.


def test_a_latin1_statement_that_takes_a_session_lock_pins_its_client(hal: Running) -> None:
    with connect(hal, client_encoding="LATIN1") as a, connect(hal) as b:
        a.execute("SELECT pg_advisory_lock(4242) -- the café's lock")
        pid = one(a, "SELECT pg_backend_pid()")
        # the single server is a's while it holds the lock: b waits for it in vain
        with pytest.raises(psycopg.errors.TooManyConnections):
            b.execute("SELECT 1")
        assert one(a, "SELECT pg_backend_pid()") == pid
        assert one(a, "SELECT pg_advisory_unlock(4242) -- the café's lock") is True
        assert one(b, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


def test_settings_with_other_than_ascii_survive_clients_in_other_encodings(hal: Running) -> None:
    # halephant's own queries (a client's settings applied, read back at the end of a transaction, its SQL
    # PREPAREs made again) run on a server whose client_encoding is the linked client's
    with (
        connect(hal, client_encoding="LATIN1") as latin1,
        connect(hal, client_encoding="UTF8", options="-c myapp.name=josé") as utf8,
    ):
        latin1.execute("SET search_path = 'schéma', public")
        latin1.execute("SELECT set_config('myapp.city', 'Zürich', false)")
        latin1.execute("PREPARE café AS SELECT 'crème'::text")
        for _ in range(2):  # both take turns on the single server connection
            assert one(utf8, "SELECT current_setting('myapp.name')") == "josé"
            assert one(utf8, "SHOW search_path") == '"$user", public'
            assert one(utf8, "SELECT current_setting('myapp.city', true)") in (None, "")
            assert one(latin1, "SHOW search_path") == '"schéma", public'
            assert one(latin1, "SELECT current_setting('myapp.city')") == "Zürich"
            assert one(latin1, "EXECUTE café") == "crème"
        latin1.execute("DEALLOCATE café")
