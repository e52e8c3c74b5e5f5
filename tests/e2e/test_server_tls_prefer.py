"""End to end: `prefer` (the default `clusters.<name>.tls.mode`) tries a login refused over TLS again in
plaintext, as libpq's `sslmode=prefer` does (`halephant.server_tls`), against a node with ssl = on whose
pg_hba.conf lets the roles of this test in by `hostnossl` lines only (and rejects them over TLS).

With `prefer`, every path that logs in to the node (pooled servers, probes, the auth_query lookup, the
shared LISTEN connection) goes on in plaintext after one log line, and clients are served; a wrong
password, refused in plaintext, is the refusal the client sees; with `require`, the same node refuses
the login (28000), as it does without the retry.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from support.cluster import start_test_cluster
from support.halephant import HalephantFactory, Running
from support.leaks import assert_clean_servers
from support.tls import TlsFiles

from halephant.testing.pgcluster import Cluster, PgNotFound

pytestmark = pytest.mark.e2e

#: the roles this node takes over TCP in plaintext only
ROLES = "myapp,nossl_lookup,nossl_looked_up"
SSL_OF_MINE = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
RETRY_LINE = (
    r"{what} to server 127\.0\.0\.1:{port}: login over SSL refused \(28000 pg_hba\.conf rejects "
    r"connection for host \"127\.0\.0\.1\", user \"{user}\", database \"{database}\", SSL encryption\): "
    r"trying again without SSL \(clusters\.nossl\.tls\.mode prefer, as libpq's sslmode=prefer\)"
)


@pytest.fixture(scope="module")
def nossl_pg(tls_files: TlsFiles) -> Iterator[Cluster]:
    """One node with ssl = on whose pg_hba.conf takes `ROLES` over TCP without TLS only."""
    try:
        cluster = start_test_cluster(
            replicas=0,
            ssl=tls_files.server_ssl(hostssl_only=False),
            hba=[
                f"hostnossl all {ROLES} 127.0.0.1/32 scram-sha-256",
                f"hostssl   all {ROLES} 127.0.0.1/32 reject",
            ],
        )
    except PgNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        cluster.primary.sql(
            "SET password_encryption = 'scram-sha-256';"
            " CREATE ROLE nossl_lookup LOGIN SUPERUSER PASSWORD 'nossl_lookup';"
            " CREATE ROLE nossl_looked_up LOGIN PASSWORD 'looked-up-pw';"
        )
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(autouse=True)
def _clean(nossl_pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(nossl_pg)


def config(pg: Cluster, **tls: Any) -> dict[str, Any]:
    return {
        "clusters": {
            "nossl": {
                "nodes": [f"127.0.0.1:{pg.primary.port}"],
                "probe_user": "myapp",
                **({"tls": tls} if tls else {}),
            },
        },
        "databases": {
            "myapp": {"cluster": "nossl", "pool_size": 2},
            # users not under users: are looked up on the node by the auth_user
            "lookedup": {"cluster": "nossl", "database": "myapp", "auth_user": "nossl_lookup"},
        },
        "users": {
            "myapp": {"password": "myapp"},
            "nossl_lookup": {"password": "nossl_lookup"},
            "admin": {"password": "admin-pw"},
        },
        "admin": {"users": ["admin"]},
        "topology": {"interval": "300ms"},
        "limits": {"connect_timeout": "3s", "server_login_retry": "1s"},
    }


def connect(run: Running, user: str = "myapp", password: str = "myapp", dbname: str = "myapp") -> Any:
    return psycopg.connect(run.dsn(user=user, password=password, dbname=dbname), autocommit=True)


def show_servers(run: Running) -> list[dict[str, Any]]:
    with psycopg.connect(
        run.dsn(user="admin", password="admin-pw", dbname="halephant"),
        autocommit=True,
        cursor_factory=psycopg.ClientCursor,
    ) as console:
        cur = console.execute("SHOW SERVERS")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def refused(run: Running) -> asyncpg.PostgresError:
    """The error a login as myapp fails with (asyncpg: psycopg has no SQLSTATE for a failed connection)."""

    async def attempt() -> asyncpg.PostgresError:
        with pytest.raises(asyncpg.PostgresError) as excinfo:
            conn = await asyncpg.connect(
                host=run.host, port=run.port, user="myapp", password="myapp", database="myapp", ssl=False
            )
            await conn.close()
        return excinfo.value

    return asyncio.run(attempt())


def test_prefer_logs_in_again_without_tls_where_pg_hba_takes_only_plaintext(
    nossl_pg: Cluster, halephant: HalephantFactory
) -> None:
    port = nossl_pg.primary.port
    run = halephant.start(config(nossl_pg))  # no tls: the default, prefer
    # pooled servers
    with connect(run) as a, connect(run) as b:
        assert a.execute(SSL_OF_MINE).fetchone() == (False,)
        a.execute("CREATE TEMP TABLE t (x int)")  # session state a reset must clear
        a.execute("INSERT INTO t VALUES (1)")
        with b.transaction():
            assert b.execute("SELECT current_user, 6 * 7").fetchone() == ("myapp", 42)
    servers = [row for row in show_servers(run) if row["database"] == "myapp"]
    assert servers and all(row["tls"] == "" for row in servers), servers
    # the shared LISTEN connection
    with connect(run) as listener, connect(run) as notifier:
        listener.execute("LISTEN nossl_channel")
        notifier.execute("NOTIFY nossl_channel, 'in plaintext'")
        got = next(listener.notifies(timeout=5, stop_after=1))
        assert (got.channel, got.payload) == ("nossl_channel", "in plaintext")
        listener.execute("UNLISTEN nossl_channel")
    shared = nossl_pg.primary.sql(
        "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
        "WHERE a.application_name = 'halephant listener'"
    )
    assert shared == "f"
    # the auth_query lookup, logged in as nossl_lookup
    with connect(run, "nossl_looked_up", "looked-up-pw", "lookedup") as conn:
        assert conn.execute(f"SELECT current_user, ({SSL_OF_MINE})").fetchone() == ("nossl_looked_up", False)
    # the probes: the node is up, and primary
    node = {n["port"]: n for n in run.admin_json("/nodes")}[port]
    assert node["usable"] is True and node["role"] == "primary", node
    log = run.log_text()
    for what, user, database in (
        ("server connection", "myapp", "myapp"),
        ("shared listener", "myapp", "myapp"),
        ("auth_query lookup", "nossl_lookup", "myapp"),
        ("probe", "myapp", "postgres"),
    ):
        line = RETRY_LINE.format(what=what, port=port, user=user, database=database)
        assert re.search(line, log), (what, log)
    assert re.search(
        r"pool myapp/myapp@\S+: server connection opened \(pid \d+, now 1, no tls: the server refused the "
        r"login over it\)",
        log,
    ), log
    assert "server login refused" not in log and "password lookup for user" not in log, log
    nossl_pg.primary.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename LIKE 'nossl_look%'"
    )


def test_require_is_refused_by_the_same_node(nossl_pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(config(nossl_pg, mode="require"))
    error = refused(run)
    assert error.sqlstate == "28000", error
    message = str(error.args[0])
    assert message.startswith("halephant's login to the server failed: pg_hba.conf rejects connection"), error
    assert message.endswith("SSL encryption"), error
    assert "clusters.nossl.tls.mode is require: set it to prefer" in str(getattr(error, "hint", "")), error
    assert "trying again without SSL" not in run.log_text()


def test_a_wrong_password_in_plaintext_is_the_refusal_reported(
    nossl_pg: Cluster, halephant: HalephantFactory
) -> None:
    # refused over TLS by pg_hba.conf before any password, then in plaintext for the password: the
    # client is told the latter, the one that says what to fix
    cfg = config(nossl_pg)
    cfg["users"]["myapp"]["server_password"] = "not-myapp"
    run = halephant.start(cfg)
    error = refused(run)
    assert error.sqlstate == "28P01", error
    assert 'password authentication failed for user "myapp"' in str(error.args[0]), error
    log = run.log_text()
    line = RETRY_LINE.format(
        what="server connection", port=nossl_pg.primary.port, user="myapp", database="myapp"
    )
    assert len(re.findall(line, log)) == 1, log
