"""End to end: how halephant logs in to PostgreSQL, and how clients log in to halephant.

Upstream, PostgreSQL's pg_hba.conf picks the method per role (see `support.cluster`): SCRAM for myapp,
md5 for md5user, cleartext `password` for plainuser, `trust` for trustuser. A login that succeeds proves
halephant answered that method, so each test first checks that the server really asks for it.
Client side, halephant checks SCRAM (the default), md5 (plaintext or an md5 hash in the config) or trust.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from support.halephant import HalephantFactory, Running, default_config, write_config
from support.leaks import assert_clean_servers

from halephant.auth.server_side import scram_keys
from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

#: halephant's own password for trustuser, in the config where PostgreSQL trusts that role.
TRUSTUSER_PROXY_PASSWORD = "only-halephant-knows"

_LIMITS = {"connect_timeout": "3s", "login_timeout": "5s"}


def _md5_hash(password: str, user: str) -> str:
    """The form pg_authid.rolpassword stores for md5 (md5 of password followed by user name)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


@pytest.fixture(scope="module")
def upstream_hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    """halephant logs in upstream with each role's method; clients log in to it with SCRAM (or trust)."""
    config = default_config(
        pg,
        users={
            "md5user": {"password": "md5user", "auth": "scram-sha-256"},
            "plainuser": {"password": "plainuser", "auth": "scram-sha-256"},
            "trustuser": {"auth": "trust"},
        },
        limits=_LIMITS,
    )
    return module_halephant.start(config)


@pytest.fixture(scope="module")
def client_auth_hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    """Client-side methods and failures: md5 clients, a password only halephant checks, a bad upstream one."""
    config = default_config(
        pg,
        users={
            # an md5 hash for clients, with the plaintext halephant needs upstream (SCRAM there)
            "myapp": {"password": _md5_hash("myapp", "myapp"), "server_password": "myapp", "auth": "md5"},
            "md5user": {"password": "md5user", "auth": "md5"},
            # PostgreSQL trusts this role; halephant still wants a password from clients
            "trustuser": {"password": TRUSTUSER_PROXY_PASSWORD, "auth": "scram-sha-256"},
            # the client's password is right, the one halephant uses upstream is not
            "myapp_ro": {"password": "myapp_ro", "server_password": "not-the-password"},
        },
        limits=_LIMITS,
    )
    return module_halephant.start(config)


def upstream_method(pg: Cluster, user: str) -> str:
    """The method the primary's pg_hba.conf gives `user` over TCP from 127.0.0.1 (the first match)."""
    return pg.primary.sql(
        "SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' AND address = '127.0.0.1' "
        f"AND 'all' = ANY(database) AND ('{user}' = ANY(user_name) OR 'all' = ANY(user_name)) "
        "ORDER BY line_number LIMIT 1"
    )


def stored_password_kind(pg: Cluster, user: str) -> str:
    return pg.primary.sql(f"SELECT split_part(rolpassword, '$', 1) FROM pg_authid WHERE rolname = '{user}'")


def who_am_i(hal: Running, user: str, password: str | None) -> tuple[Any, ...]:
    with psycopg.connect(hal.dsn(user=user, password=password), autocommit=True) as conn:
        with conn.transaction():
            row = conn.execute("SELECT current_user, session_user, current_database()").fetchone()
        assert row is not None
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        return tuple(row)


def login_sqlstate(hal: Running, user: str, password: str | None, database: str = "myapp") -> str | None:
    """Log in with asyncpg (which reports the SQLSTATE of a failed login); None when it succeeds."""

    async def attempt() -> str | None:
        try:
            conn = await asyncpg.connect(
                host=hal.host, port=hal.port, user=user, password=password, database=database, ssl=False
            )
        except asyncpg.PostgresError as exc:
            return str(exc.sqlstate)
        await conn.fetchval("SELECT 1")
        await conn.close()
        return None

    return asyncio.run(attempt())


# --- halephant logging in upstream ---------------------------------------------------------------------


def test_upstream_scram(pg: Cluster, upstream_hal: Running) -> None:
    assert upstream_method(pg, "myapp") == "scram-sha-256"
    assert stored_password_kind(pg, "myapp") == "SCRAM-SHA-256"
    assert who_am_i(upstream_hal, "myapp", "myapp") == ("myapp", "myapp", "myapp")
    assert_clean_servers(pg.primary)


def test_upstream_md5(pg: Cluster, upstream_hal: Running) -> None:
    assert upstream_method(pg, "md5user") == "md5"
    # stored as md5: with a SCRAM verifier PostgreSQL would run SCRAM even on an md5 line
    assert stored_password_kind(pg, "md5user").startswith("md5")
    assert who_am_i(upstream_hal, "md5user", "md5user") == ("md5user", "md5user", "myapp")
    assert_clean_servers(pg.primary)


def test_upstream_cleartext_password(pg: Cluster, upstream_hal: Running) -> None:
    assert upstream_method(pg, "plainuser") == "password"
    assert who_am_i(upstream_hal, "plainuser", "plainuser") == ("plainuser", "plainuser", "myapp")
    assert_clean_servers(pg.primary)


def test_upstream_trust_and_client_trust(pg: Cluster, upstream_hal: Running) -> None:
    assert upstream_method(pg, "trustuser") == "trust"
    # `auth: trust` and no password: neither halephant nor PostgreSQL asks for one
    assert who_am_i(upstream_hal, "trustuser", None) == ("trustuser", "trustuser", "myapp")
    assert who_am_i(upstream_hal, "trustuser", "anything at all") == ("trustuser", "trustuser", "myapp")
    assert_clean_servers(pg.primary)


def test_wrong_client_password_with_scram(upstream_hal: Running) -> None:
    assert login_sqlstate(upstream_hal, "myapp", "wrong") == "28P01"
    assert login_sqlstate(upstream_hal, "md5user", "wrong") == "28P01"
    assert login_sqlstate(upstream_hal, "myapp", "myapp") is None


# --- clients logging in to halephant -------------------------------------------------------------------


def test_halephant_checks_a_password_postgresql_does_not(pg: Cluster, client_auth_hal: Running) -> None:
    assert upstream_method(pg, "trustuser") == "trust"
    assert login_sqlstate(client_auth_hal, "trustuser", "wrong") == "28P01"
    assert login_sqlstate(client_auth_hal, "trustuser", None) == "28P01"
    expected = ("trustuser", "trustuser", "myapp")
    assert who_am_i(client_auth_hal, "trustuser", TRUSTUSER_PROXY_PASSWORD) == expected
    assert_clean_servers(pg.primary)


def test_clients_log_in_with_md5(pg: Cluster, client_auth_hal: Running) -> None:
    # myapp: an md5 hash in the config (and SCRAM upstream); md5user: plaintext (and md5 upstream)
    assert who_am_i(client_auth_hal, "myapp", "myapp") == ("myapp", "myapp", "myapp")
    assert who_am_i(client_auth_hal, "md5user", "md5user") == ("md5user", "md5user", "myapp")
    assert login_sqlstate(client_auth_hal, "myapp", "myapp") is None
    assert login_sqlstate(client_auth_hal, "myapp", "wrong") == "28P01"
    assert login_sqlstate(client_auth_hal, "md5user", "wrong") == "28P01"
    log = client_auth_hal.log_text()
    assert "myapp@myapp" in log and "login ok (md5" in log
    assert_clean_servers(pg.primary)


def test_wrong_upstream_password_reaches_the_client(pg: Cluster, client_auth_hal: Running) -> None:
    assert login_sqlstate(client_auth_hal, "myapp_ro", "myapp_ro") == "28P01"
    refused = 'halephant\'s login to the server failed: password authentication failed for user "myapp_ro"'
    with pytest.raises(psycopg.OperationalError, match=refused) as excinfo:
        psycopg.connect(client_auth_hal.dsn(user="myapp_ro", password="myapp_ro"))
    assert 'HINT:  halephant logs in as "myapp_ro" with the password halephant.yaml' in str(excinfo.value)
    log = client_auth_hal.log_text()
    assert "server login refused" in log
    assert "28P01" in log
    assert "not-the-password" not in log  # never logged
    # the other pools are not affected
    assert who_am_i(client_auth_hal, "myapp", "myapp") == ("myapp", "myapp", "myapp")


def test_a_server_login_refused_for_another_reason_than_the_password_says_so(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    pg.primary.sql("DROP ROLE IF EXISTS nologin; CREATE ROLE nologin NOLOGIN PASSWORD 'nologin'")
    run = halephant.start(default_config(pg, users={"nologin": {"password": "nologin"}}))
    assert login_sqlstate(run, "nologin", "nologin") == "28000"
    with pytest.raises(psycopg.OperationalError) as excinfo:
        psycopg.connect(run.dsn(user="nologin", password="nologin"))
    assert 'role "nologin" is not permitted to log in' in str(excinfo.value)
    hint = str(excinfo.value).split("HINT:")[1]
    assert "pg_hba.conf, or the role's rights" in hint and "password" not in hint


def test_postgresql_s_detail_of_a_refused_server_login_reaches_the_client(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # PostgreSQL 15: FATAL 42501 permission denied for database "noconnect", DETAIL User does not have
    # CONNECT privilege. halephant passes the refusal on with its DETAIL, as a direct login would get it
    pg.primary.sql("DROP DATABASE IF EXISTS noconnect")
    pg.primary.sql("CREATE DATABASE noconnect")
    pg.primary.sql("REVOKE CONNECT ON DATABASE noconnect FROM PUBLIC")
    try:
        run = halephant.start(default_config(pg, databases={"noconnect": {"cluster": "main"}}))
        with pytest.raises(psycopg.OperationalError) as excinfo:
            psycopg.connect(run.dsn(dbname="noconnect"))
        # (libpq gives a failed connection's error as text only)
        assert (
            'FATAL:  permission denied for database "noconnect"\nDETAIL:  User does not have CONNECT '
            "privilege." in str(excinfo.value)
        )
        assert login_sqlstate(run, "myapp", "myapp", "noconnect") == "42501"
        assert who_am_i(run, "myapp", "myapp") == ("myapp", "myapp", "myapp")
        run.stop()
    finally:
        pg.primary.sql("DROP DATABASE IF EXISTS noconnect WITH (FORCE)")
    assert_clean_servers(pg.primary)


#: PBKDF2 iterations of `slowscram`'s verifier: PostgreSQL's default is 4096; this takes about a second
SLOW_ITERATIONS = 3_000_000


@pytest.fixture(scope="module")
def slow_role(pg: Cluster) -> Iterator[str]:
    """Role `slowscram` (password "slow") with a verifier of SLOW_ITERATIONS, made once for the module
    (each test starts its own halephant, which has derived no keys yet); dropped after the module's
    halephants stopped, as their servers were connected as it.

    The verifier is written to pg_authid as it is: CREATE or ALTER ROLE ... PASSWORD would take it too
    (PostgreSQL 16 makes such ones with scram_iterations), but checks that it is not the verifier of an
    empty password by deriving the keys of "" with its SLOW_ITERATIONS: seconds of a test's time."""
    salt = os.urandom(16)
    stored, server = scram_keys("slow", salt, SLOW_ITERATIONS)
    b64 = base64.b64encode
    verifier = (
        f"SCRAM-SHA-256${SLOW_ITERATIONS}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"
    )
    pg.primary.sql(
        "DROP ROLE IF EXISTS slowscram; CREATE ROLE slowscram LOGIN; "
        f"UPDATE pg_authid SET rolpassword = '{verifier}' WHERE rolname = 'slowscram'"
    )
    yield "slowscram"
    pg.primary.sql("DROP ROLE IF EXISTS slowscram")


def test_a_slow_scram_login_upstream_stalls_no_other_client(
    pg: Cluster, slow_role: str, halephant: HalephantFactory
) -> None:
    # A role whose verifier has many iterations: halephant's first login as it derives the keys in a
    # worker thread, and each later one finds them cached.
    config = default_config(pg, users={"slowscram": {"password": "slow"}}, limits={"connect_timeout": "30s"})
    proxy = halephant.start(config)
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        other.execute("SELECT 1")
        outcome: list[object] = []

        def slow_login() -> None:
            try:
                with psycopg.connect(proxy.dsn(user="slowscram", password="slow")) as conn:
                    outcome.append(conn.execute("SELECT current_user").fetchone())
            except Exception as exc:  # reported by the assertion below
                outcome.append(exc)

        thread = threading.Thread(target=slow_login)
        started = time.monotonic()
        thread.start()
        worst = 0.0
        while thread.is_alive():
            t0 = time.monotonic()
            other.execute("SELECT 1")
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.01)
        thread.join()
        took = time.monotonic() - started
    assert outcome == [("slowscram",)]
    # the derivation took the slow login most of a second; the other client was never held for it
    assert took > 0.3, took
    assert worst < took / 3, (worst, took)
    # a second server connection for the role (the first is held in a transaction) costs no derivation
    with psycopg.connect(proxy.dsn(user="slowscram", password="slow")) as first:
        first.execute("SELECT 1")  # holds its server: the next client needs another one
        t0 = time.monotonic()
        with psycopg.connect(proxy.dsn(user="slowscram", password="slow")) as second:
            assert second.execute("SELECT current_user").fetchone() == ("slowscram",)
        assert time.monotonic() - t0 < took / 3
    assert "server connection opened" in proxy.log_text()


@pytest.mark.parametrize("retry", ["1h", "0"])
def test_a_refused_server_login_is_not_tried_again_before_server_login_retry(
    pg: Cluster, halephant: HalephantFactory, retry: str
) -> None:
    users = {"myapp_ro": {"password": "myapp_ro", "server_password": "not-the-password"}}
    config = default_config(pg, users=users, limits={**_LIMITS, "server_login_retry": retry})
    proxy = halephant.start(config)
    for _ in range(3):
        assert login_sqlstate(proxy, "myapp_ro", "myapp_ro") == "28P01"
    # PostgreSQL saw one failed login, not one per client (each would be a line in its log, and count
    # towards whatever locks accounts out there)
    assert proxy.log_text().count("server login refused") == (1 if retry == "1h" else 3)
    # a reload (the operator fixed the password) tries again at once
    write_config(default_config(pg, limits={**_LIMITS, "server_login_retry": retry}), proxy.config_path)
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload: done" not in proxy.log_text():
        assert time.monotonic() < deadline, proxy.log_text()
        time.sleep(0.05)
    assert who_am_i(proxy, "myapp_ro", "myapp_ro") == ("myapp_ro", "myapp_ro", "myapp")


def test_a_server_that_logged_in_across_a_reconnect_is_not_handed_on(
    pg: Cluster, slow_role: str, halephant: HalephantFactory
) -> None:
    # RECONNECT (or a reload that changes what a pool logs in with) while a server is still logging in:
    # that server was opened as things were before, and must not reach a client.
    config = default_config(
        pg,
        users={"slowscram": {"password": "slow"}, "admin": {"password": "admin-pw"}},
        databases={"myapp": {"mode": "session"}},  # the server taken at login is the session's
        clusters={"main": {"probe_user": "myapp"}},
        admin={"users": ["admin"]},
        limits={"connect_timeout": "30s"},
    )
    proxy = halephant.start(config)
    logged_in: list[Any] = []
    thread = threading.Thread(
        target=lambda: logged_in.append(psycopg.connect(proxy.dsn(user="slowscram", password="slow")))
    )
    thread.start()
    deadline = time.monotonic() + 10
    while "pool myapp/slowscram" not in proxy.log_text():  # its first server is logging in
        assert time.monotonic() < deadline, proxy.log_text()
        time.sleep(0.02)
    admin_dsn = proxy.dsn(user="admin", password="admin-pw", dbname="halephant")
    reconnected = pg.primary.sql("SELECT now()")
    with psycopg.connect(admin_dsn, autocommit=True, cursor_factory=psycopg.ClientCursor) as admin:
        admin.execute("RECONNECT")
    thread.join(30)
    with logged_in[0] as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("slowscram",)
        started = conn.execute(
            "SELECT backend_start > %s::timestamptz FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            (reconnected,),
        ).fetchone()
        assert started == (True,)  # its server was opened after the RECONNECT
    assert "logged in as before a reload or RECONNECT: closed, another opened" in proxy.log_text()
