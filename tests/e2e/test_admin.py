"""End to end: the HTTP admin API (health, readiness, JSON state, Prometheus metrics) and the SQL admin
console (SHOW, PAUSE/RESUME, RECONNECT, KILL, permissions), against a real PostgreSQL behind halephant.

Secrets: the configuration has a plaintext password, a SCRAM verifier and a server_password; none of
them may appear in /config, /metrics or SHOW CONFIG.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from typing import Any

import psycopg
import psycopg.errors
import pytest
import rawclient as rc
from scramp import ScramMechanism
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.admin.snapshot import REDACTED
from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

PLAIN_SECRET = "pl41n-s3cret-myapp"
SERVER_SECRET = "myapp_ro"  # the real role password, used upstream only


def verifier(password: str) -> str:
    salt, stored, server, iterations = ScramMechanism().make_auth_info(password, iteration_count=4096)
    keys = [base64.b64encode(k).decode() for k in (salt, stored, server)]
    return f"SCRAM-SHA-256${iterations}:{keys[0]}${keys[1]}:{keys[2]}"


RO_VERIFIER = verifier("ro-client-pw")


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    main = {"cluster": "main", "database": "myapp"}
    config = default_config(
        pg,
        # the probes' login (else the first user that can log in upstream: "admin", no PostgreSQL role)
        clusters={"main": {"probe_user": "myapp"}},
        databases={
            "myapp": {**main, "pool_size": 3, "checkout_timeout": "5s"},
            "one": {**main, "pool_size": 1, "checkout_timeout": "300ms"},
            "pausable": {**main, "pool_size": 2, "checkout_timeout": "5s"},
            "killable": {**main, "pool_size": 2},
            "pausable_session": {**main, "mode": "session", "pool_size": 2},
        },
        users={
            "myapp_ro": {"password": RO_VERIFIER, "server_password": SERVER_SECRET},
            "admin": {"password": "admin-pw"},
            "watcher": {"password": "watcher-pw"},
            "nobody": {"password": "nobody-pw"},
            "plain": {"password": PLAIN_SECRET, "auth": "md5"},
            "trustuser": {"auth": "trust"},
        },
        admin={"users": ["admin", "trustuser"], "stats_users": ["watcher"]},
    )
    return module_halephant.start(config)


def connect(hal: Running, dbname: str = "myapp", **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(hal.dsn(dbname=dbname), **kwargs)


def console(hal: Running, user: str = "admin", password: str | None = None, dbname: str = "halephant") -> Any:
    password = password or {"admin": "admin-pw", "watcher": "watcher-pw", "nobody": "nobody-pw"}[user]
    dsn = hal.dsn(user=user, password=password, dbname=dbname)
    return psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.ClientCursor)


def show(conn: Any, what: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# --- HTTP ----------------------------------------------------------------------------------------------


def test_health_and_ready(hal: Running) -> None:
    assert hal.admin_get("/health") == (200, "ok\n")
    body = hal.admin_json("/ready")
    assert body["ready"] is True
    assert body["databases"]["myapp"]["usable_nodes"]


def test_unknown_path_is_404_and_post_is_405(hal: Running) -> None:
    import urllib.error
    import urllib.request

    assert hal.admin_get("/nope")[0] == 404
    assert hal.admin_url is not None
    request = urllib.request.Request(hal.admin_url + "/health", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    info.value.close()
    assert info.value.code == 405 and info.value.headers["Allow"] == "GET, HEAD"
    assert hal.admin_get("//pools")[0] == 404  # not the index: "pools" is no host name here
    for limit in ("0", "-1", "x"):
        assert hal.admin_get(f"/decisions?limit={limit}")[0] == 400


def test_pools_count_transactions_and_queries(hal: Running, pg: Cluster) -> None:
    before = {(p["database"], p["user"]): p for p in hal.admin_json("/pools")}
    with connect(hal) as conn:
        for _ in range(5):
            conn.execute("SELECT 1")
        with conn.transaction():
            conn.execute("SELECT 1")
            conn.execute("SELECT 2")
    pools = [p for p in hal.admin_json("/pools") if p["database"] == "myapp" and p["user"] == "myapp"]
    assert pools
    xacts = sum(p["transactions"] for p in pools)
    queries = sum(p["queries"] for p in pools)
    old = before.get(("myapp", "myapp"), {"transactions": 0, "queries": 0})
    assert xacts - old["transactions"] >= 6
    assert queries - old["queries"] >= 9  # 5 + BEGIN, 2 statements, COMMIT
    assert sum(p["sv_idle"] + p["sv_active"] + p["sv_used"] for p in pools) >= 1  # used: being reset
    assert_clean_servers(pg)


def test_clients_and_servers(hal: Running) -> None:
    with connect(hal, application_name="admin-test") as conn:
        conn.execute("SELECT 1")
        clients = hal.admin_json("/clients")
        mine = [c for c in clients if c["application_name"] == "admin-test"]
        assert len(mine) == 1 and mine[0]["state"] == "idle" and mine[0]["user"] == "myapp"
        with conn.transaction():
            conn.execute("SELECT 1")
            mine = [c for c in hal.admin_json("/clients") if c["id"] == mine[0]["id"]]
            assert mine[0]["state"] == "active" and mine[0]["server_pid"]
            servers = hal.admin_json("/servers")
            linked = [s for s in servers if s["pid"] == mine[0]["server_pid"]]
            assert linked and linked[0]["state"] == "active" and linked[0]["client"] == mine[0]["id"]


def test_waiting_client_shows_in_queues_pools_and_metrics(hal: Running, pg: Cluster) -> None:
    holder = connect(hal, dbname="one")
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with connect(hal, dbname="one") as conn:
                conn.execute("SELECT 1")
        except BaseException as exc:  # the checkout timeout (300ms)
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        queue: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not queue:
            queue = [q for q in hal.admin_json("/queues") if q["database"] == "one"]
            time.sleep(0.02)
        assert queue and queue[0]["waiting"] == 1 and queue[0]["oldest_wait"] >= 0
        pool = [p for p in hal.admin_json("/pools") if p["database"] == "one"]
        assert pool[0]["cl_waiting"] == 1 and pool[0]["sv_active"] == 1
        thread.join(5)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert errors and isinstance(errors[0], psycopg.errors.TooManyConnections)
    pool = [p for p in hal.admin_json("/pools") if p["database"] == "one"]
    assert pool[0]["checkout_timeouts"] >= 1
    assert hal.admin_json("/errors").get("53300", 0) >= 1
    decisions = hal.admin_json("/decisions")
    assert any(d["kind"] == "checkout_timeout" and d["sqlstate"] == "53300" for d in decisions)
    metrics = hal.admin_get("/metrics")[1]
    assert 'halephant_checkout_timeouts_total{database="one"' in metrics
    assert 'halephant_errors_total{sqlstate="53300"}' in metrics
    assert_clean_servers(pg)


def test_rejects_and_pins_are_decisions(hal: Running) -> None:
    with connect(hal) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("DECLARE c CURSOR WITH HOLD FOR SELECT 1")
        conn.execute("CREATE TEMP TABLE pinned_here (a int)")  # session-bound: pins the server
    decisions = hal.admin_json("/decisions?limit=50")
    assert any(d["kind"] == "reject" and d["sqlstate"] == "0A000" for d in decisions)
    assert any(d["kind"] == "pin" for d in decisions)
    assert hal.admin_json("/errors").get("0A000", 0) >= 1


def test_routing_is_a_decision_when_it_changes_not_per_transaction(hal: Running) -> None:
    before = [d for d in hal.admin_json("/decisions?limit=200") if d["kind"] == "route"]
    with connect(hal) as conn:
        for _ in range(20):
            conn.execute("SELECT 1")
    routes = [d for d in hal.admin_json("/decisions?limit=200") if d["kind"] == "route"]
    new = routes[len(before) :] if len(routes) >= len(before) else routes
    mine = [d for d in new if d["user"] == "myapp"]
    assert len(mine) == 1, [(d["client"], d["reason"]) for d in mine]  # twenty transactions: once
    assert mine[0]["reason"].startswith("primary"), mine


def test_metrics_are_prometheus_text(hal: Running) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with connect(hal) as conn:
        conn.execute("SELECT 1")
    status, text = hal.admin_get("/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "halephant_client_connections", "halephant_clients", "halephant_transactions", "halephant_queries",
        "halephant_wait_seconds", "halephant_checkout_timeouts", "halephant_errors",
        "halephant_server_connections", "halephant_node_role", "halephant_reloads",
        "halephant_database_paused", "process_resident_memory_bytes",
    ):  # fmt: skip
        assert name in families, name
    xacts = [s for s in families["halephant_transactions"].samples if s.labels.get("database") == "myapp"]
    assert xacts and xacts[0].value >= 1
    roles = {(s.labels["node"], s.labels["role"]) for s in families["halephant_node_role"].samples}
    assert any(role == "primary" for _node, role in roles)
    assert any(role == "replica" for _node, role in roles)
    samples = families["halephant_wait_seconds"].samples
    counts = [s for s in samples if s.name == "halephant_wait_seconds_count"]
    assert counts and all(s.value >= 0 for s in counts)


def test_nodes(hal: Running, pg: Cluster) -> None:
    nodes = hal.admin_json("/nodes")
    assert {n["name"] for n in nodes} == {f"{n.host}:{n.port}" for n in pg.nodes}
    assert {n["role"] for n in nodes} == {"primary", "replica"}
    # when each node was last probed (Unix time), or None while it has not been
    for n in nodes:
        probed = n["last_probe"]
        assert probed is None or (isinstance(probed, float) and abs(time.time() - probed) < 3600), n


def test_snapshot_has_every_section(hal: Running) -> None:
    snap = hal.admin_json("/snapshot")
    for key in ("summary", "pools", "nodes", "clients_by_state", "queues", "decisions", "errors"):
        assert key in snap
    assert snap["summary"]["connections_total"] >= 1


def test_no_secret_in_config_or_metrics(hal: Running) -> None:
    status, body = hal.admin_get("/config")
    assert status == 200
    config = json.loads(body)
    assert config["users"]["myapp_ro"]["password"] == REDACTED
    assert config["users"]["myapp_ro"]["server_password"] == REDACTED
    assert config["admin"]["users"] == ["admin", "trustuser"]
    everything = body + hal.admin_get("/metrics")[1] + hal.admin_get("/snapshot")[1]
    for secret in ("admin-pw", "watcher-pw", PLAIN_SECRET, RO_VERIFIER, "SCRAM-SHA-256$"):
        assert secret not in everything, secret
    for name, user in config["users"].items():
        assert user["password"] == (REDACTED if name != "trustuser" else None)
        assert user["server_password"] in (None, REDACTED)
    with console(hal) as conn:
        rows = show(conn, "CONFIG")
    text = json.dumps(rows)
    assert "users.myapp_ro.password" in text
    for secret in ("admin-pw", "watcher-pw", PLAIN_SECRET, RO_VERIFIER, "SCRAM-SHA-256$"):
        assert secret not in text, secret
    assert not any(r["key"].endswith("password") and r["value"] not in (REDACTED, "") for r in rows)
    # what a reload cannot change says so
    changeable = {r["key"]: r["changeable"] for r in rows}
    assert changeable["listen"] == changeable["admin.listen"] == "no"
    assert changeable["limits.max_client_conn"] == "yes"


# --- the SQL console -------------------------------------------------------------------------------------


def test_console_show_commands(hal: Running) -> None:
    with connect(hal) as conn:
        conn.execute("SELECT 1")
        with console(hal) as admin:
            pools = show(admin, "POOLS")
            assert any(p["database"] == "myapp" and p["user"] == "myapp" for p in pools)
            assert {"cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "maxwait"} <= set(pools[0])
            clients = show(admin, "CLIENTS")
            assert any(c["user"] == "myapp" and c["database"] == "myapp" for c in clients)
            assert show(admin, "SERVERS")
            stats = show(admin, "STATS")
            assert any(s["database"] == "myapp" and s["total_xact_count"] >= 1 for s in stats)
            dbs = show(admin, "DATABASES")
            assert {d["name"] for d in dbs} >= {"myapp", "one"}
            assert show(admin, "VERSION")[0]["version"].startswith("halephant ")
            assert any(r["command"] == "PAUSE [db]" for r in show(admin, "HELP"))
            nodes = show(admin, "NODES")
            assert {n["role"] for n in nodes} == {"primary", "replica"}
            # case and a trailing semicolon do not matter; psycopg's default (extended) protocol works too
            assert admin.execute("show version;").fetchone()
    dsn = hal.dsn(user="admin", password="admin-pw", dbname="pgbouncer")
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SHOW VERSION").fetchone()[0].startswith("halephant")  # type: ignore[index]


def test_console_with_psql(hal: Running, run_client: Any) -> None:
    result = run_client(
        "psql", hal, ["-X", "-A", "-t", "-c", "SHOW VERSION", "-c", "SHOW POOLS"],
        user="admin", password="admin-pw", dbname="pgbouncer",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("halephant ")
    bad = run_client("psql", hal, ["-X", "-c", "SHOW NONSENSE"], user="admin", password="admin-pw",
                     dbname="halephant")  # fmt: skip
    assert bad.returncode != 0 and "unknown SHOW command" in bad.stderr


def test_console_refuses_other_users_with_42501(hal: Running) -> None:
    with rc.RawClient(hal.host, hal.port) as client:
        with pytest.raises(AssertionError, match="login failed"):
            client.login("nobody", "nobody-pw", "halephant")
        error = client.last_session.messages[-1]
        assert (error.fields["S"], error.fields["C"]) == ("FATAL", "42501")
        client.expect_closed()
    # authentication comes first: a wrong password is 28P01, as for any database
    with rc.RawClient(hal.host, hal.port) as client:
        with pytest.raises(AssertionError, match="login failed"):
            client.login("admin", "wrong", "pgbouncer")
        assert client.last_session.messages[-1].fields["C"] == "28P01"
    with pytest.raises(psycopg.OperationalError, match="may not use the admin console"):
        console(hal, "nobody")


def test_console_unknown_command_is_42601_and_session_goes_on(hal: Running) -> None:
    with console(hal) as admin:
        with pytest.raises(psycopg.errors.SyntaxError):
            admin.execute("DROP TABLE everything")
        with pytest.raises(psycopg.errors.SyntaxError):
            admin.execute("SHOW TABLES")
        assert admin.execute("SHOW VERSION").fetchone()


def test_console_is_read_only_for_stats_users(hal: Running) -> None:
    with console(hal, "watcher") as watcher:
        assert show(watcher, "POOLS") is not None
        for command in ("PAUSE", "RESUME", "RECONNECT", "KILL myapp", "SHUTDOWN", "RELOAD"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                watcher.execute(command)
    assert hal.alive


def test_pause_waits_for_running_transactions_then_holds_new_ones(hal: Running, pg: Cluster) -> None:
    busy = connect(hal, dbname="pausable")
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    admin = console(hal)
    paused = threading.Event()

    def pause() -> None:
        admin.execute("PAUSE pausable")
        paused.set()

    thread = threading.Thread(target=pause)
    thread.start()
    time.sleep(0.3)
    assert not paused.is_set(), "PAUSE returned while a transaction was running"
    busy.execute("COMMIT")
    assert paused.wait(5), "PAUSE did not return after the transaction ended"
    thread.join(5)

    done = threading.Event()
    result: list[Any] = []

    def later() -> None:
        result.append(busy.execute("SELECT 42").fetchone())
        done.set()

    other = threading.Thread(target=later)
    other.start()
    time.sleep(0.4)
    assert not done.is_set(), "a new transaction ran while the database was paused"
    queues = [q for q in hal.admin_json("/queues") if q["database"] == "pausable"]
    assert queues and queues[0]["reason"] == "paused"
    # counted as waiting alike by SHOW POOLS and the metrics, for as long as it has waited
    pools = [p for p in show(admin, "POOLS") if p["database"] == "pausable"]
    assert [p["cl_waiting"] for p in pools] == [1]
    assert int(pools[0]["maxwait"]) + int(pools[0]["maxwait_us"]) / 1e6 > 0.2  # PgBouncer's two columns
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(hal.admin_get("/metrics")[1])}
    waiting = families["halephant_pool_waiting_clients"].samples
    assert [s.value for s in waiting if s.labels["database"] == "pausable"] == [1]
    maxwait = families["halephant_pool_maxwait_seconds"].samples
    assert [s.value > 0.2 for s in maxwait if s.labels["database"] == "pausable"] == [True]
    # other databases are not paused
    with connect(hal) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    admin.execute("RESUME pausable")
    assert done.wait(5)
    other.join(5)
    assert result == [(42,)]
    busy.close()
    admin.close()
    assert_clean_servers(pg)


def test_reconnect_replaces_server_connections(hal: Running, backend_pids: Any) -> None:
    with connect(hal) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()
        with console(hal) as admin:
            admin.execute("RECONNECT myapp")
        second = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert first != second


@pytest.mark.parametrize("dbname", ["pausable", "pausable_session"])
def test_reconnect_replaces_a_server_pinned_at_that_moment(hal: Running, dbname: str) -> None:
    # a client holding an advisory lock keeps its server; once it lets go, that server is replaced, not
    # handed to the next client
    with connect(hal, dbname=dbname) as pinned:
        pinned.execute("SELECT pg_advisory_lock(42)")
        held = pinned.execute("SELECT pg_backend_pid()").fetchone()
        with console(hal) as admin:
            admin.execute(f"RECONNECT {dbname}")
        assert pinned.execute("SELECT pg_backend_pid()").fetchone() == held  # still pinned
        pinned.execute("SELECT pg_advisory_unlock(42)")
        after = pinned.execute("SELECT pg_backend_pid()").fetchone()
    with connect(hal, dbname=dbname) as other:
        seen = {other.execute("SELECT pg_backend_pid()").fetchone() for _ in range(3)}
    assert held not in seen and (dbname == "pausable_session" or after != held)
    assert "(opened before a reload or RECONNECT)" in hal.log_text()


def test_kill_drops_clients_with_57P01_and_resume_reopens(hal: Running, pg: Cluster) -> None:
    victim = connect(hal, dbname="killable")
    victim.execute("SELECT 1")
    bystander = connect(hal)
    with console(hal) as admin:
        admin.execute("KILL killable")
        with pytest.raises(psycopg.OperationalError) as info:
            victim.execute("SELECT 1")
        assert "administrator command" in str(info.value)
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        pools = [p for p in show(admin, "DATABASES") if p["name"] == "killable"]
        assert pools[0]["paused"] is True
        admin.execute("RESUME killable")
    with connect(hal, dbname="killable") as again:
        assert again.execute("SELECT 1").fetchone() == (1,)
    bystander.close()
    victim.close()
    assert_clean_servers(pg)


def test_pause_holds_the_transactions_already_queued_too(hal: Running, pg: Cluster) -> None:
    busy = [connect(hal, dbname="pausable") for _ in range(2)]  # both servers of the pool
    for conn in busy:
        conn.execute("BEGIN")
    queued = connect(hal, dbname="pausable")
    served = threading.Event()
    waiter = threading.Thread(target=lambda: (queued.execute("SELECT 7"), served.set()))
    waiter.start()
    time.sleep(0.3)  # queued for a server
    with console(hal) as admin:
        pausing = threading.Thread(target=lambda: admin.execute("PAUSE pausable"))
        pausing.start()
        time.sleep(0.2)
        for conn in busy:
            conn.execute("COMMIT")
        pausing.join(5)
        assert not pausing.is_alive()
        time.sleep(0.3)
        assert not served.is_set(), "a transaction queued before PAUSE ran while paused"
        admin.execute("RESUME pausable")
    assert served.wait(5)
    waiter.join(5)
    for conn in [*busy, queued]:
        conn.close()
    assert_clean_servers(pg)


def test_pause_without_a_database_pauses_all_and_resume_releases(hal: Running, pg: Cluster) -> None:
    with console(hal) as admin:
        admin.execute("PAUSE")
        assert show(admin, "DATABASES")[0]["paused"] is True
        assert hal.admin_json("/snapshot")["summary"]["paused"] == ["*"]
        held = connect(hal)  # logging in still works; its first transaction is held
        done = threading.Event()
        thread = threading.Thread(target=lambda: (held.execute("SELECT 1"), done.set()))
        thread.start()
        time.sleep(0.3)
        assert not done.is_set()
        admin.execute("RESUME")
        assert done.wait(5)
        thread.join(5)
        held.close()
    assert_clean_servers(pg)


def test_pause_holds_a_session_mode_login_until_resume(hal: Running, pg: Cluster) -> None:
    # session pooling takes a server at login: during PAUSE (the operator is about to restart
    # PostgreSQL) the login waits, as a transaction would, and opens nothing
    with console(hal) as admin:
        admin.execute("PAUSE pausable_session")
        before = pg.primary.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'myapp'")
        logged_in: list[psycopg.Connection[Any]] = []
        thread = threading.Thread(target=lambda: logged_in.append(connect(hal, dbname="pausable_session")))
        thread.start()
        time.sleep(0.5)
        assert not logged_in
        assert pg.primary.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'myapp'") == before
        row = next(r for r in show(admin, "DATABASES") if r["name"] == "pausable_session")
        assert row["paused"] in (True, 1)  # (PgBouncer's type is int4)
        admin.execute("RESUME pausable_session")
        thread.join(5)
        assert logged_in
        with logged_in[0] as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert_clean_servers(pg)


def test_reload_never_kills_halephant(hal: Running) -> None:
    # RELOAD sends SIGHUP to halephant itself: where no reload is installed, it must refuse instead
    with console(hal) as admin:
        try:
            admin.execute("RELOAD")
        except psycopg.errors.FeatureNotSupported:
            pass
        time.sleep(0.3)
        assert admin.execute("SHOW VERSION").fetchone()
    assert hal.alive


def test_shutdown_stops_halephant_and_tells_clients_57P01(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(
        default_config(pg, users={"admin": {"password": "admin-pw"}}, admin={"users": ["admin"]})
    )
    client = psycopg.connect(run.dsn(), autocommit=True)
    client.execute("SELECT 1")
    with psycopg.connect(
        run.dsn(user="admin", password="admin-pw", dbname="halephant"), autocommit=True
    ) as admin:
        admin.execute("SHUTDOWN")
    assert run.proc.wait(15) == 0
    with pytest.raises(psycopg.OperationalError, match="administrator command"):
        client.execute("SELECT 1")
    client.close()
    assert "received SIGTERM" in run.log_text()


def test_console_answers_a_query_sent_in_the_same_packet_as_the_login(hal: Running) -> None:
    with rc.RawClient(hal.host, hal.port) as client:
        client.send(rc.startup({"user": "trustuser", "database": "halephant"}) + rc.query("SHOW VERSION"))
        messages = client.read_until(b"Z")  # the login's ReadyForQuery
        assert messages[0].auth_code == 0
        rows = rc.data_rows(client.read_until_ready())
        assert rows and str(rows[0][0]).startswith("halephant ")
        client.send(rc.terminate())
        client.expect_closed()


def _admin_address(hal: Running) -> tuple[str, int]:
    assert hal.admin_url is not None
    host, _, port = hal.admin_url.removeprefix("http://").rpartition(":")
    return host, int(port)


def _raw_http(hal: Running, request: bytes) -> bytes:
    import socket

    with socket.create_connection(_admin_address(hal), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_bad_http_requests_get_4xx_and_the_proxy_keeps_serving(hal: Running) -> None:
    import socket

    # a scraper that connects and never finishes its request holds nothing the proxy needs
    stalled = socket.create_connection(_admin_address(hal), timeout=10)
    stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    try:
        assert _raw_http(hal, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert _raw_http(hal, b"GET /health HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
        huge = b"GET /health HTTP/1.1\r\nX-Filler: " + b"a" * 70_000 + b"\r\n\r\n"
        assert _raw_http(hal, huge).startswith(b"HTTP/1.1 431 ")
        head = _raw_http(hal, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        with connect(hal) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert hal.admin_get("/health")[0] == 200
    finally:
        stalled.close()


def test_pause_over_the_extended_protocol_waits_too(hal: Running, pg: Cluster) -> None:
    busy = connect(hal, dbname="pausable")
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    dsn = hal.dsn(user="admin", password="admin-pw", dbname="halephant")
    admin = psycopg.connect(dsn, autocommit=True)  # psycopg's default cursor: Parse/Bind/Execute/Sync
    paused = threading.Event()
    thread = threading.Thread(target=lambda: (admin.execute("PAUSE pausable"), paused.set()))
    thread.start()
    time.sleep(0.3)
    assert not paused.is_set()
    busy.execute("COMMIT")
    assert paused.wait(5)
    thread.join(5)
    assert admin.execute("SHOW VERSION").fetchone()  # the session goes on after the wait
    admin.execute("RESUME pausable")
    assert busy.execute("SELECT 7").fetchone() == (7,)
    busy.close()
    admin.close()
    assert_clean_servers(pg)


def test_check_against_the_running_halephant_is_a_dry_run(hal: Running) -> None:
    import subprocess
    import sys

    from support.halephant import REPO_ROOT

    assert hal.admin_url is not None
    new = hal.config_path.with_name("proposed.yaml")
    text = hal.config_path.read_text()
    assert "pool_size: 3" in text
    new.write_text(text.replace("pool_size: 3", "pool_size: 9").replace("admin-pw", "new-admin-pw"))
    result = subprocess.run(
        [sys.executable, "-m", "halephant", "check", "-c", str(new), "--against", hal.admin_url],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"a reload from {hal.admin_url} would apply 1 change(s):" in lines
    assert "  ~ databases.myapp.pool_size: 3 -> 9" in lines
    # secrets are compared redacted on both sides: never shown, and a password change is not visible
    assert "admin-pw" not in result.stdout and "SCRAM" not in result.stdout
    unreachable = subprocess.run(
        [sys.executable, "-m", "halephant", "check", "-c", str(new), "--against", "http://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert unreachable.returncode == 1 and "cannot read http://127.0.0.1:1/config" in unreachable.stderr


def _reloads_ok(hal: Running) -> float:
    import re

    found = re.search(
        r'^halephant_reloads_total\{result="ok"\} ([\d.]+)$', hal.admin_get("/metrics")[1], re.M
    )
    assert found
    return float(found.group(1))


def test_reload_is_counted_in_metrics(hal: Running) -> None:
    before = _reloads_ok(hal)
    with console(hal) as admin:
        admin.execute("RELOAD")
    deadline = time.monotonic() + 5
    while _reloads_ok(hal) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _reloads_ok(hal) == before + 1


def test_console_gets_in_when_clients_fill_max_client_conn(pg: Cluster, halephant: HalephantFactory) -> None:
    config = default_config(
        pg,
        users={"admin": {"password": "admin-pw"}},
        admin={"users": ["admin"]},
        limits={"max_client_conn": 1},
    )
    run = halephant.start(config)
    with psycopg.connect(run.dsn(), autocommit=True) as first:
        first.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="too many"):
            psycopg.connect(run.dsn(), autocommit=True)
        dsn = run.dsn(user="admin", password="admin-pw", dbname="halephant")
        with psycopg.connect(dsn, autocommit=True) as admin:
            clients = admin.execute("SHOW CLIENTS").fetchall()
            assert len(clients) == 2  # the client and the console session itself
