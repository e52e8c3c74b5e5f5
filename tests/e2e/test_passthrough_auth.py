"""End to end: pass-through, halephant logging in to PostgreSQL with no plaintext password in its
configuration. A user whose password is the SCRAM verifier copied from pg_authid logs in upstream with
the ClientKey its own clients' SCRAM logins give (in transaction and session pooling, and for an alias
that logs in as it); an md5 hash logs in as it is. Before any client has logged in nothing connects
to PostgreSQL as that user, and once the role's password is changed there, server logins fail with a
message that says so."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from support.halephant import HalephantFactory, default_config
from support.leaks import assert_clean_servers
from support.polling import wait_until
from test_upstream_auth import _md5_hash, login_sqlstate, stored_password_kind, upstream_method, who_am_i

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

NO_KEYS = (
    'halephant\'s login to the server failed: no client of user "passuser" has logged in since halephant '
    'started: halephant.yaml gives "passuser" a SCRAM verifier and no server_password'
)


def _verifier(pg: Cluster, role: str) -> str:
    return pg.primary.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")


@pytest.fixture
def pass_role(pg: Cluster) -> Iterator[str]:
    """Role `passuser` (password "passpw", a SCRAM verifier in pg_authid), made afresh for each test."""
    pg.primary.sql(
        "DROP ROLE IF EXISTS passuser; SET password_encryption = 'scram-sha-256'; "
        "CREATE ROLE passuser LOGIN PASSWORD 'passpw'; GRANT CONNECT ON DATABASE myapp TO passuser"
    )
    yield "passuser"
    pg.primary.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'passuser'; "
        "REVOKE CONNECT ON DATABASE myapp FROM passuser"
    )
    wait_until(
        lambda: pg.primary.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'passuser'") == "0",
        "passuser's backends gone",
    )
    pg.primary.sql("DROP ROLE passuser")


def _config(pg: Cluster, verifier: str, min_pool_size: int = 2) -> dict[str, Any]:
    return default_config(
        pg,
        databases={
            "myapp": {"mode": "transaction", "min_pool_size": min_pool_size},
            "myapp_session": {"cluster": "main", "database": "myapp", "mode": "session"},
        },
        # only pass-through users: the probes log in as passuser too
        users={
            "myapp": None,
            "myapp_ro": None,
            "passuser": {"password": verifier},
            # an alias with a plaintext password of its own, logging in upstream as passuser
            "passalias": {"password": "aliaspw", "server_user": "passuser"},
        },
        topology={"interval": "200ms"},
        limits={"connect_timeout": "3s", "login_timeout": "5s", "server_login_retry": "1h"},
    )


def _tcp_connections_received(pg: Cluster) -> int:
    return pg.primary.log_text().count("connection received: host=127.0.0.1")


def test_scram_pass_through_in_transaction_and_session_mode(
    pg: Cluster, pass_role: str, halephant: HalephantFactory
) -> None:
    verifier = _verifier(pg, pass_role)
    assert verifier.startswith("SCRAM-SHA-256$") and upstream_method(pg, pass_role) == "scram-sha-256"
    # every connection to the primary is logged while this test runs, to see that none is tried
    pg.primary.sql("ALTER SYSTEM SET log_connections = on; SELECT pg_reload_conf()")
    try:
        proxy = halephant.start(_config(pg, verifier))
        before = _tcp_connections_received(pg)
        # before any client of passuser logged in: the probes (every 200 ms) do not connect, and an
        # alias that logs in as passuser is told why it gets no server
        with pytest.raises(psycopg.OperationalError, match=re.escape(NO_KEYS)) as excinfo:
            psycopg.connect(proxy.dsn(user="passalias", password="aliaspw"))
        assert 'Log in as "passuser" through halephant once, or set server_password' in str(excinfo.value)
        time.sleep(1.5)
        assert _tcp_connections_received(pg) == before
        log = proxy.log_text()
        assert "the probes log in as 'passuser' by SCRAM pass-through" in log
        assert "cluster main: every probe failed; keeping the last known topology" in log
        assert log.count("probe of 127.0.0.1") <= len(pg.nodes)  # once per node, not every round
        # a wrong client password is still refused, and gives nothing to log in with
        assert login_sqlstate(proxy, "passuser", "wrong") == "28P01"
        assert _tcp_connections_received(pg) == before
        # passuser logs in: its ClientKey logs halephant in upstream, in transaction pooling...
        assert who_am_i(proxy, "passuser", "passpw") == ("passuser", "passuser", "myapp")
        # ...and in session pooling
        with psycopg.connect(proxy.dsn(user="passuser", password="passpw", dbname="myapp_session")) as conn:
            assert conn.execute("SELECT current_user, pg_backend_pid() <> 0").fetchone() == ("passuser", True)
        # the alias refused a moment ago gets its server at once (not after server_login_retry), and the
        # probes answer, and min_pool_size is topped up
        assert who_am_i(proxy, "passalias", "aliaspw") == ("passuser", "passuser", "myapp")
        wait_until(lambda: "cluster main: probes answer again" in proxy.log_text(), "the probes log in")
        wait_until(
            lambda: (
                int(
                    pg.primary.sql(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'passuser' "
                        "AND application_name = '' AND datname = 'myapp'"
                    )
                )
                >= 2
            ),
            "min_pool_size servers as passuser",
        )
        assert "passpw" not in proxy.log_text() and verifier not in proxy.log_text()
        assert_clean_servers(pg.primary)
    finally:
        pg.primary.sql("ALTER SYSTEM RESET log_connections; SELECT pg_reload_conf()")


def test_a_password_changed_in_postgresql_fails_new_server_logins_clearly(
    pg: Cluster, pass_role: str, halephant: HalephantFactory
) -> None:
    verifier = _verifier(pg, pass_role)
    proxy = halephant.start(_config(pg, verifier, min_pool_size=0))
    assert who_am_i(proxy, "passuser", "passpw") == ("passuser", "passuser", "myapp")
    pg.primary.sql(
        "ALTER ROLE passuser PASSWORD 'changed'; "
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'passuser'"
    )
    wait_until(
        lambda: pg.primary.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'passuser'") == "0",
        "passuser's servers gone",
    )
    # the client still logs in to halephant (with the password halephant.yaml's verifier is of), but
    # halephant's login to the server as passuser is refused, with why
    differs = (
        "halephant's login to the server failed: the server's SCRAM verifier for user \"passuser\" differs "
        "from the one halephant logs in with (another salt or iteration count: was the role's password "
        "changed?)"
    )
    with (
        pytest.raises(psycopg.OperationalError, match=re.escape(differs)) as excinfo,
        psycopg.connect(proxy.dsn(user="passuser", password="passpw")) as conn,
    ):
        conn.execute("SELECT 1")
    assert "users.passuser.password" in str(excinfo.value)
    assert login_sqlstate(proxy, "passuser", "passpw") == "28P01"
    assert "server login refused: 28P01" in proxy.log_text()
    # the probes (passuser's too) give their logins up in the middle of the exchange: closed without a
    # Terminate, which PostgreSQL would log as an error of its own ("expected SASL response, got
    # message type 88") at every round
    wait_until(
        lambda: proxy.log_text().count("differs from the one halephant logs in with") >= 4, "failed probes"
    )
    assert "expected SASL response" not in pg.primary.log_text()


def test_md5_pass_through(pg: Cluster, halephant: HalephantFactory) -> None:
    # md5user is stored as an md5 hash and pg_hba.conf asks it for md5 (support.cluster)
    assert upstream_method(pg, "md5user") == "md5" and stored_password_kind(pg, "md5user").startswith("md5")
    hashed = pg.primary.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'md5user'")
    assert hashed == _md5_hash("md5user", "md5user")
    config = default_config(pg, users={"md5user": {"password": hashed, "auth": "md5"}})
    proxy = halephant.start(config)
    # no client login needed first: the hash answers md5 as it is
    assert who_am_i(proxy, "md5user", "md5user") == ("md5user", "md5user", "myapp")
    assert login_sqlstate(proxy, "md5user", "wrong") == "28P01"
    assert hashed not in proxy.log_text()
    assert_clean_servers(pg.primary)
