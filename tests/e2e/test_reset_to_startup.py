"""End to end: `RESET x`, `RESET ALL` and `DISCARD ALL` take a client's settings back to what it gave at
startup, as PostgreSQL does, not to the pool's defaults; in transaction and in session pooling.

halephant sets a client's startup settings on its server as session values, which RESET alone would take
back to the server's defaults: an asyncpg pool, which runs `RESET ALL` each time a connection goes back
to it, would then query the wrong schema. Database `one` (transaction pooling) and `sess` (session
pooling) each have a single server, shared by every client in turn: another client sees the pool's
defaults there all the same.
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

TENANT = "tenant1"
TENANT_OPTIONS = f"-c search_path={TENANT}"


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    # a schema per tenant: its table is found only with the tenant's search_path
    pg.primary.sql(
        f"CREATE SCHEMA IF NOT EXISTS {TENANT};"
        f"CREATE TABLE IF NOT EXISTS {TENANT}.tenant_items (name text);"
        f"TRUNCATE {TENANT}.tenant_items; INSERT INTO {TENANT}.tenant_items VALUES ('{TENANT}')",
        dbname="myapp", user="myapp",
    )  # fmt: skip
    one_server = {"cluster": "main", "database": "myapp", "pool_size": 1, "checkout_timeout": "2s"}
    config = default_config(
        pg,
        databases={
            "one": one_server,
            "sess": {**one_server, "mode": "session", "server_reset_query": "DISCARD ALL"},
        },
    )
    return module_halephant.start(config)


@pytest.fixture(autouse=True)
def clean_afterwards(pg: Cluster, hal: Running) -> Iterator[None]:
    yield
    assert_clean_servers(pg.primary)
    # the one server of the transaction pool is back at the pool's defaults for whoever comes next
    with connect(hal) as conn:
        assert one(conn, "SELECT count(*) FROM pg_settings WHERE source = 'session'") == 0


def connect(hal: Running, dbname: str = "one", **params: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(hal.dsn(dbname=dbname, **params), autocommit=True, connect_timeout=5)


def one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def assert_startup_settings(conn: psycopg.Connection[Any]) -> None:
    """`conn` (logged in as `tenant()`) runs with its startup settings and was told so."""
    assert one(conn, "SELECT name FROM tenant_items") == TENANT
    assert one(conn, "SHOW search_path") == TENANT
    assert one(conn, "SHOW application_name") == "svc"
    assert conn.info.parameter_status("application_name") == "svc"
    assert one(conn, "SHOW TimeZone") == "Asia/Tokyo"
    assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"


def tenant(hal: Running, dbname: str = "one") -> psycopg.Connection[Any]:
    return connect(hal, dbname, options=f"{TENANT_OPTIONS} -c TimeZone=Asia/Tokyo", application_name="svc")


def assert_pool_defaults(conn: psycopg.Connection[Any]) -> None:
    assert one(conn, "SHOW search_path") == '"$user", public'
    assert one(conn, "SHOW application_name") == ""
    assert one(conn, "SHOW TimeZone") != "Asia/Tokyo"


@pytest.mark.parametrize("reset", ["RESET ALL", "DISCARD ALL", "RESET search_path; RESET application_name"])
def test_reset_returns_to_the_startup_settings(hal: Running, reset: str) -> None:
    with tenant(hal) as a, connect(hal) as b:
        a.execute("SET work_mem = '11MB'")
        a.execute("SET search_path = public")
        a.execute("SET application_name = 'renamed'")
        a.execute("SET TIME ZONE 'Europe/Paris'")
        assert one(b, "SHOW work_mem") != "11MB"
        a.execute(reset)
        for _ in range(2):  # the two take turns on the single server
            assert one(a, "SELECT name FROM tenant_items") == TENANT
            assert one(a, "SHOW search_path") == TENANT
            assert one(a, "SHOW application_name") == "svc"
            assert a.info.parameter_status("application_name") == "svc"
            assert_pool_defaults(b)
        all_reset = "ALL" in reset
        assert (one(a, "SHOW TimeZone") == "Asia/Tokyo") is all_reset
        assert (a.info.parameter_status("TimeZone") == "Asia/Tokyo") is all_reset
        assert (one(a, "SHOW work_mem") == "11MB") is not all_reset
        assert one(a, "SELECT pg_backend_pid()") == one(b, "SELECT pg_backend_pid()")  # one server, shared


def test_reset_of_one_setting_leaves_the_others(hal: Running) -> None:
    with tenant(hal) as a, connect(hal) as b:
        a.execute("SET search_path = public")
        a.execute("SET TIME ZONE 'Europe/Paris'")
        a.execute("RESET search_path")
        assert one(b, "SELECT 1") == 1
        assert one(a, "SELECT name FROM tenant_items") == TENANT
        assert one(a, "SHOW TimeZone") == "Europe/Paris" == a.info.parameter_status("TimeZone")
        a.execute("SET TimeZone TO DEFAULT")  # the same as RESET TimeZone
        assert one(b, "SELECT 1") == 1
        assert_startup_settings(a)


def test_reset_in_a_transaction_block_lasts_when_it_commits(hal: Running) -> None:
    with tenant(hal) as a, connect(hal) as b:
        a.execute("SET application_name = 'renamed'")
        with a.transaction():
            a.execute("RESET ALL")
            a.execute("SET work_mem = '12MB'")  # set after the reset: it stays
        assert one(b, "SELECT 1") == 1
        assert_startup_settings(a)
        assert one(a, "SHOW work_mem") == "12MB"
        # rolled back, a RESET changes nothing
        a.execute("SET application_name = 'renamed'")
        with pytest.raises(psycopg.errors.DivisionByZero), a.transaction():
            a.execute("RESET ALL")
            a.execute("SELECT 1/0")
        assert one(a, "SHOW application_name") == "renamed" == a.info.parameter_status("application_name")
        assert one(a, "SELECT name FROM tenant_items") == TENANT
        assert_pool_defaults(b)


def test_pinned_client_gets_its_startup_settings_on_the_server_it_keeps(pg: Cluster, hal: Running) -> None:
    with tenant(hal) as a:
        a.execute("SELECT pg_advisory_lock(7301)")  # pins `a` to its server
        pid = one(a, "SELECT pg_backend_pid()")
        a.execute("RESET ALL")
        assert_startup_settings(a)
        assert one(a, "SELECT pg_backend_pid()") == pid
        a.execute("SELECT pg_advisory_unlock(7301)")
    with connect(hal) as b:
        assert_pool_defaults(b)


def test_a_startup_setting_that_cannot_be_set_again_closes_the_client(pg: Cluster, hal: Running) -> None:
    # its startup value is gone after login (the text search configuration was dropped): set again after
    # the RESET it fails, and the client must not go on with the pool's default
    pg.primary.sql(
        "DROP TEXT SEARCH CONFIGURATION IF EXISTS public.hal_reset;"
        "CREATE TEXT SEARCH CONFIGURATION public.hal_reset (COPY = pg_catalog.simple)",
        dbname="myapp",
    )
    with connect(hal, options="-c default_text_search_config=public.hal_reset") as a:
        assert one(a, "SHOW default_text_search_config") == "public.hal_reset"
        pg.primary.sql("DROP TEXT SEARCH CONFIGURATION public.hal_reset", dbname="myapp")
        a.execute("RESET ALL")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="hal_reset"):
            a.execute("SELECT 1")  # told FATAL, as when a login's setting is refused
        with pytest.raises(psycopg.OperationalError):
            a.execute("SELECT 1")
    with connect(hal) as b:  # the server, reset, holds nothing of `a`'s
        assert one(b, "SHOW default_text_search_config") != "public.hal_reset"


async def asyncpg_pool(hal: Running, database: str) -> Any:
    """An asyncpg pool of one connection with startup settings, which it runs `RESET ALL` on at every
    release (its reset query)."""
    return await asyncpg.create_pool(
        host=hal.host, port=hal.port, user="myapp", password="myapp", database=database, ssl=False,
        server_settings={"search_path": TENANT, "application_name": "svc"},
        min_size=1, max_size=1,
    )  # fmt: skip


def test_asyncpg_pool_keeps_its_server_settings_across_its_reset(hal: Running) -> None:
    async def main() -> None:
        pool = await asyncpg_pool(hal, "one")
        try:
            with connect(hal) as other:
                for _ in range(3):
                    # released, the connection ran asyncpg's reset query (... RESET ALL) in between
                    async with pool.acquire() as conn:
                        assert await conn.fetchval("SELECT name FROM tenant_items") == TENANT
                        assert await conn.fetchval("SHOW application_name") == "svc"
                        assert conn.get_settings().application_name == "svc"
                    assert_pool_defaults(other)
        finally:
            await pool.close()

    asyncio.run(main())


# --- session pooling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", ["RESET ALL", "DISCARD ALL", "RESET search_path; RESET application_name"])
def test_session_pooling_reset_returns_to_the_startup_settings(hal: Running, reset: str) -> None:
    with tenant(hal, "sess") as a:
        a.execute("SET search_path = public")
        a.execute("SET application_name = 'renamed'")
        a.execute(reset)
        assert one(a, "SELECT name FROM tenant_items") == TENANT
        assert one(a, "SHOW application_name") == "svc" == a.info.parameter_status("application_name")
        if "ALL" in reset:
            assert one(a, "SHOW TimeZone") == "Asia/Tokyo" == a.info.parameter_status("TimeZone")
        # set after the reset, in the same Query: it stays
        a.execute("RESET ALL; SET search_path = public")
        assert one(a, "SHOW search_path") == "public"
        assert one(a, "SHOW application_name") == "svc"
    with connect(hal, "sess") as b:  # the same server, reset for the next session
        assert_pool_defaults(b)


def test_session_pooling_asyncpg_pool_keeps_its_server_settings(hal: Running) -> None:
    async def main() -> None:
        pool = await asyncpg_pool(hal, "sess")
        try:
            for _ in range(3):
                async with pool.acquire() as conn:
                    assert await conn.fetchval("SELECT name FROM tenant_items") == TENANT
                    assert await conn.fetchval("SHOW application_name") == "svc"
        finally:
            await pool.close()

    asyncio.run(main())
