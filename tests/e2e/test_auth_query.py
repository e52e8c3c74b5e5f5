"""End to end: users that halephant.yaml does not list, looked up in PostgreSQL (`auth_user` /
`auth_query`, as PgBouncer does) through the recommended SECURITY DEFINER function.

Clients log in as roles with SCRAM and md5 passwords (psql, psycopg, pgbench in both protocols with more
clients than the pool has servers), and halephant logs in to PostgreSQL as them by pass-through. Wrong
passwords and unknown roles get the same 28P01 after the same SCRAM exchange; a password changed with
ALTER ROLE counts once the answer kept (`auth_cache`) is older than that; an auth_user that may not read
pg_shadow fails its own clients' logins clearly, and no one else's. No lookup leaves a session behind.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from rawclient import AUTH_SASL, RawClient, startup
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers
from support.polling import wait_until
from test_upstream_auth import login_sqlstate, upstream_method

from halephant.testing.pgcluster import Cluster, pgbench

pytestmark = pytest.mark.e2e

RunClient = Callable[..., subprocess.CompletedProcess[str]]

AUTH_USER = "lookup_auth"
SCRAM_ROLE = "lu_scram"
#: stored as an md5 hash, and asked md5 by pg_hba.conf (support.cluster); not under users: here
MD5_ROLE = "md5user"
BENCH_DB = "e2e_lookup_bench"
FUNCTION_QUERY = "SELECT uname, phash FROM public.user_lookup($1)"

SETUP = f"""
DROP ROLE IF EXISTS {AUTH_USER};
DROP ROLE IF EXISTS {SCRAM_ROLE};
SET password_encryption = 'scram-sha-256';
CREATE ROLE {AUTH_USER} LOGIN PASSWORD '{AUTH_USER}';
CREATE ROLE {SCRAM_ROLE} LOGIN PASSWORD 'scram-pw';
GRANT CONNECT ON DATABASE myapp TO {AUTH_USER}, {SCRAM_ROLE};
\\connect myapp
CREATE OR REPLACE FUNCTION public.user_lookup(i_username text, OUT uname name, OUT phash text)
RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
$$ SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = i_username $$;
REVOKE ALL ON FUNCTION public.user_lookup(text) FROM public;
GRANT EXECUTE ON FUNCTION public.user_lookup(text) TO {AUTH_USER};
"""


def _lookup_config(pg: Cluster, **overrides: Any) -> dict[str, Any]:
    looked_up = {"auth_user": AUTH_USER, "auth_query": FUNCTION_QUERY, "auth_dbname": "myapp"}
    return default_config(
        pg,
        databases={
            "myapp": {"pool_size": 3, **looked_up},
            "myapp_session": {"cluster": "main", "database": "myapp", "mode": "session", **looked_up},
            "bench": {"cluster": "main", "database": BENCH_DB, "pool_size": 3, **looked_up},
            # PgBouncer's default query, which an auth_user that is not a superuser may not run
            "shadow": {"cluster": "main", "database": "myapp", "auth_user": AUTH_USER},
        },
        users={AUTH_USER: {"password": AUTH_USER}},
        limits={"connect_timeout": "3s", "login_timeout": "5s"},
        **overrides,
    )


@pytest.fixture(scope="module")
def roles(pg: Cluster) -> Iterator[None]:
    pg.primary.sql(SETUP)
    pg.create_database(BENCH_DB, owner=SCRAM_ROLE)
    pgbench(pg.primary, "-i", "-q", "-s", "1", dbname=BENCH_DB, user=SCRAM_ROLE)
    yield
    pg.primary.sql(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename IN ('{AUTH_USER}', "
        f"'{SCRAM_ROLE}') OR datname = '{BENCH_DB}'"
    )
    wait_until(
        lambda: (
            pg.primary.sql(
                f"SELECT count(*) FROM pg_stat_activity WHERE usename IN ('{AUTH_USER}', '{SCRAM_ROLE}')"
            )
            == "0"
        ),
        "the test roles' backends gone",
    )
    pg.primary.sql(
        f"DROP DATABASE {BENCH_DB}; \\connect myapp\nDROP FUNCTION public.user_lookup(text);\n"
        f"REVOKE CONNECT ON DATABASE myapp FROM {AUTH_USER}, {SCRAM_ROLE};\n"
        f"DROP ROLE {AUTH_USER}; DROP ROLE {SCRAM_ROLE}"
    )


@pytest.fixture(scope="module")
def hal(pg: Cluster, roles: None, module_halephant: HalephantFactory) -> Running:
    return module_halephant.start(_lookup_config(pg))


def _who(hal: Running, user: str, password: str, dbname: str = "myapp") -> tuple[Any, ...]:
    with psycopg.connect(hal.dsn(user=user, password=password, dbname=dbname), autocommit=True) as conn:
        row = conn.execute("SELECT current_user, session_user, current_database()").fetchone()
        assert row is not None
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        return tuple(row)


def _lookups_left(pg: Cluster) -> int:
    return int(
        pg.primary.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'halephant auth_query'"
        )
    )


def test_scram_user_absent_from_the_file_logs_in(pg: Cluster, hal: Running, run_client: RunClient) -> None:
    assert upstream_method(pg, SCRAM_ROLE) == "scram-sha-256"
    # psycopg, in transaction and in session pooling; halephant logs in upstream as the role itself
    assert _who(hal, SCRAM_ROLE, "scram-pw") == (SCRAM_ROLE, SCRAM_ROLE, "myapp")
    assert _who(hal, SCRAM_ROLE, "scram-pw", dbname="myapp_session") == (SCRAM_ROLE, SCRAM_ROLE, "myapp")
    # psql
    out = run_client("psql", hal, ["-XAtc", "SELECT current_user"], user=SCRAM_ROLE, password="scram-pw")
    assert out.returncode == 0 and out.stdout.strip() == SCRAM_ROLE, out.stdout + out.stderr
    # the console's user list shows the looked-up user, which now has pools
    users = {row["name"]: row for row in hal.admin_json("/users")}
    assert users[SCRAM_ROLE]["user_connections"] >= 1
    assert users[SCRAM_ROLE]["max_user_connections"] is None
    log = hal.log_text()
    verifier = pg.primary.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{SCRAM_ROLE}'")
    assert "scram-pw" not in log and verifier not in log
    wait_until(lambda: _lookups_left(pg) == 0, "lookup connections closed")
    assert_clean_servers(pg.primary)


def test_md5_user_absent_from_the_file_logs_in(pg: Cluster, hal: Running, run_client: RunClient) -> None:
    assert upstream_method(pg, MD5_ROLE) == "md5"
    assert _who(hal, MD5_ROLE, "md5user") == (MD5_ROLE, MD5_ROLE, "myapp")
    out = run_client("psql", hal, ["-XAtc", "SELECT current_user"], user=MD5_ROLE, password="md5user")
    assert out.returncode == 0 and out.stdout.strip() == MD5_ROLE, out.stdout + out.stderr
    assert login_sqlstate(hal, MD5_ROLE, "wrong") == "28P01"
    hashed = pg.primary.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{MD5_ROLE}'")
    assert hashed not in hal.log_text()
    assert_clean_servers(pg.primary)


def _first_auth_request(hal: Running, user: str) -> int:
    with RawClient(hal.host, hal.port) as raw:
        raw.send(startup({"user": user, "database": "myapp"}))
        first = raw.read()
        assert first.type == b"R", first
        return first.auth_code


def test_wrong_password_and_unknown_role_look_alike(hal: Running) -> None:
    assert login_sqlstate(hal, SCRAM_ROLE, "wrong") == "28P01"
    assert login_sqlstate(hal, "no_such_role", "wrong") == "28P01"
    # an unknown role is asked for SCRAM as a known one is, and refused only at the end
    assert _first_auth_request(hal, "no_such_role") == AUTH_SASL == _first_auth_request(hal, SCRAM_ROLE)
    messages = []
    for user in (SCRAM_ROLE, "no_such_role"):
        with pytest.raises(psycopg.OperationalError) as excinfo:
            psycopg.connect(hal.dsn(user=user, password="wrong"))
        messages.append(str(excinfo.value).split("FATAL:")[-1].replace(user, "USER").strip())
    assert messages[0] == messages[1] == 'password authentication failed for user "USER"'


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_pgbench_as_a_looked_up_user(pg: Cluster, hal: Running, protocol: str, run_client: RunClient) -> None:
    out = run_client(
        "pgbench",
        hal,
        ["-n", "-S", "-M", protocol, "-c", "8", "-j", "2", "-T", "2"],
        user=SCRAM_ROLE,
        password="scram-pw",
        dbname="bench",
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert processed is not None and int(processed.group(1)) > 100, out.stdout
    assert failed is not None and int(failed.group(1)) == 0, out.stdout
    servers = int(
        pg.primary.sql(
            f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{SCRAM_ROLE}' "
            f"AND datname = '{BENCH_DB}' AND client_addr IS NOT NULL"
        )
    )
    assert 1 <= servers <= 3
    assert_clean_servers(pg.primary)


def test_an_auth_user_that_may_not_read_pg_shadow(pg: Cluster, hal: Running) -> None:
    with pytest.raises(psycopg.OperationalError) as excinfo:
        psycopg.connect(hal.dsn(user=SCRAM_ROLE, password="scram-pw", dbname="shadow"))
    assert 'could not look up the password of user "lu_scram": the auth_query failed' in str(excinfo.value)
    wait_until(
        lambda: (
            re.search(
                r"password lookup for user 'lu_scram' failed: auth_query failed: permission denied for "
                r"(view|table) pg_shadow \(42501\) "
                r"\(auth_user 'lookup_auth', database 'myapp', cluster main\)",
                hal.log_text(),
            )
            is not None
        ),
        "the lookup's error logged",
    )
    # the same clients' logins elsewhere, and other users on that database, are not affected
    assert _who(hal, "myapp", "myapp", dbname="shadow") == ("myapp", "myapp", "myapp")
    assert _who(hal, SCRAM_ROLE, "scram-pw") == (SCRAM_ROLE, SCRAM_ROLE, "myapp")
    wait_until(lambda: _lookups_left(pg) == 0, "lookup connections closed")
    assert_clean_servers(pg.primary)


def test_a_changed_password_counts_after_auth_cache(
    pg: Cluster, roles: None, halephant: HalephantFactory
) -> None:
    config = _lookup_config(pg)
    config["databases"]["myapp"]["auth_cache"] = "1s"
    hal = halephant.start(config)
    role = "lu_changing"
    pg.primary.sql(
        f"DROP ROLE IF EXISTS {role}; SET password_encryption = 'scram-sha-256'; "
        f"CREATE ROLE {role} LOGIN PASSWORD 'before'; GRANT CONNECT ON DATABASE myapp TO {role}"
    )
    try:
        assert _who(hal, role, "before") == (role, role, "myapp")
        pg.primary.sql(
            f"ALTER ROLE {role} PASSWORD 'after'; "
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        )
        time.sleep(1.2)  # the answer kept is out of date now
        assert login_sqlstate(hal, role, "before") == "28P01"
        # the new password logs the client in, and halephant's new server logins use the new verifier
        wait_until(
            lambda: pg.primary.sql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'") == "0",
            "the old servers gone",
        )
        assert _who(hal, role, "after") == (role, role, "myapp")
        # a reload forgets what was found: the next login asks again (and still works)
        hal.reload(config, expect="reload: done")
        assert _who(hal, role, "after") == (role, role, "myapp")
    finally:
        pg.primary.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
        wait_until(
            lambda: pg.primary.sql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'") == "0",
            "backends gone",
        )
        pg.primary.sql(f"REVOKE CONNECT ON DATABASE myapp FROM {role}; DROP ROLE {role}")
    assert_clean_servers(pg.primary)


def test_a_lookup_that_hangs_is_cancelled_at_login_timeout_and_stalls_no_one_else(
    pg: Cluster, roles: None, halephant: HalephantFactory
) -> None:
    config = _lookup_config(pg)
    config["limits"]["login_timeout"] = "1s"
    # a query that takes longer than login_timeout (a primary too busy to answer, say)
    config["databases"]["shadow"]["auth_query"] = "SELECT * FROM public.user_lookup($1), pg_sleep(60)"
    hal = halephant.start(config)
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(hal.dsn(user=SCRAM_ROLE, password="scram-pw", dbname="shadow"), connect_timeout=10)
    assert time.monotonic() - started < 2.5
    wait_until(
        lambda: (
            "password lookup for user 'lu_scram' failed: timeout (auth_user 'lookup_auth', database "
            "'myapp', cluster main)" in hal.log_text()
        ),
        "the lookup's timeout logged",
    )
    # other databases' lookups, and users in the file, were served meanwhile and still are
    assert _who(hal, SCRAM_ROLE, "scram-pw") == (SCRAM_ROLE, SCRAM_ROLE, "myapp")
    assert _who(hal, "myapp", "myapp", dbname="shadow") == ("myapp", "myapp", "myapp")
    # the lookup's query was cancelled and its connection closed: no backend is left sleeping
    wait_until(lambda: _lookups_left(pg) == 0, "lookup connections closed", timeout=5)
    assert_clean_servers(pg.primary)
