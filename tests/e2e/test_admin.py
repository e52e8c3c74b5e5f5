"""End to end: the HTTP admin API (health, readiness, JSON state, Prometheus metrics) and the SQL admin
console (SHOW, PAUSE/RESUME, RECONNECT, KILL, permissions), against a real PostgreSQL behind halephant.

Secrets: the configuration has a plaintext password, a SCRAM verifier and a server_password; none of
them may appear in /config, /metrics or SHOW CONFIG.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest
import rawclient as rc
from ruamel.yaml import YAML
from scramp import ScramMechanism
from support.halephant import HalephantFactory, Running, default_config, write_config
from support.leaks import assert_clean_servers
from support.polling import wait_until

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
            "myapp": {**main, "pool_size": 3, "checkout_timeout": "5s", "reserve_pool_size": 2},
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

    with connect(hal) as conn, connect(hal) as idle:
        conn.execute("SELECT 1")
        idle.execute("SELECT 1")
        conn.execute("BEGIN")
        conn.execute("SELECT 2")  # linked to its server until COMMIT
        status, text = hal.admin_get("/metrics")
        conn.execute("COMMIT")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    mine = {"active": 0.0, "idle": 0.0, "waiting": 0.0}
    for sample in families["halephant_pool_clients"].samples:  # (a pool per node)
        if (sample.labels["database"], sample.labels["user"]) == ("myapp", "myapp"):
            mine[sample.labels["state"]] += sample.value
    assert mine == {"active": 1, "idle": 1, "waiting": 0}
    for name in (
        "halephant_client_connections", "halephant_clients", "halephant_transactions", "halephant_queries",
        "halephant_wait_seconds", "halephant_checkout_timeouts", "halephant_errors",
        "halephant_server_connections", "halephant_node_role", "halephant_reloads",
        "halephant_database_paused", "halephant_database_disabled", "process_resident_memory_bytes",
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
            by_name = {d["name"]: d for d in dbs}
            assert (by_name["myapp"]["reserve_pool"], by_name["one"]["reserve_pool"]) == (2, 0)
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


def test_console_reads_no_faster_than_its_client_reads_the_answers(hal: Running) -> None:
    # Every answer is the console's own: a client that sends commands and reads none of the answers
    # must stop being read, or the answers pile up in halephant's memory as fast as it sends.
    with rc.RawClient(hal.host, hal.port, timeout=5) as admin:
        admin.login("watcher", "watcher-pw", "halephant")
        stream = rc.query("SHOW VERSION") * 1000
        sent = admin.send_until_not_read(stream)
        # then it reads: every command is answered, in order, and the session goes on
        one = len(rc.query("SHOW VERSION"))
        admin.sock.settimeout(30.0)
        rest = stream[sent % one : one] if sent % one else b""
        writer = threading.Thread(target=admin.sock.sendall, args=(rest + rc.query("SHOW HELP"),))
        writer.start()
        answers = bytearray()
        end = rc.msg(b"C", b"SHOW\0") + rc.msg(b"Z", b"I")
        while b"what it does" not in answers[-1000:] or not answers.endswith(end):
            chunk = admin.sock.recv(1 << 20)
            assert chunk, "closed"
            answers += chunk
        writer.join()
        assert answers.count(b"\0\x01version\0") == -(-sent // one)  # each answer's RowDescription
        assert answers.count(rc.msg(b"Z", b"I")) == -(-sent // one) + 1


def test_console_is_read_only_for_stats_users(hal: Running) -> None:
    with console(hal, "watcher") as watcher:
        assert show(watcher, "POOLS") is not None
        for command in ("PAUSE", "RESUME", "RECONNECT", "KILL myapp", "SHUTDOWN", "RELOAD"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                watcher.execute(command)
    assert hal.alive


def test_a_reload_changes_the_rights_of_an_open_console_session(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    def config(users: list[str], stats_users: list[str]) -> dict[str, Any]:
        return default_config(
            pg,
            users={"admin": {"password": "admin-pw"}},
            admin={"users": users, "stats_users": stats_users},
        )

    def reload(cfg: dict[str, Any]) -> None:
        seen = run.log_text().count("reload: done")
        cfg["listen"] = f"{run.host}:{run.port}"
        cfg["admin"]["listen"] = run.admin_url.removeprefix("http://") if run.admin_url else None
        write_config(cfg, run.config_path)
        run.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while run.log_text().count("reload: done") == seen:
            assert time.monotonic() < deadline, run.log_text()
            time.sleep(0.05)

    run = halephant.start(config(["admin"], []))
    with console(run) as admin:
        admin.execute("RECONNECT")
        reload(config([], ["admin"]))  # SHOW only from now on
        assert show(admin, "VERSION")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute("RECONNECT")
        reload(config([], []))  # nothing at all
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may no longer use the admin console"):
            admin.execute("SHOW VERSION")
        reload(config(["admin"], []))
        admin.execute("RECONNECT")


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
    pool_clients = families["halephant_pool_clients"].samples
    assert {s.labels["state"]: s.value for s in pool_clients if s.labels["database"] == "pausable"} == {
        "active": 0,
        "idle": 0,
        "waiting": 1,
    }
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
        assert pools[0]["paused"] == 1  # int4 0/1, as PgBouncer says it
        admin.execute("RESUME killable")
    with connect(hal, dbname="killable") as again:
        assert again.execute("SELECT 1").fetchone() == (1,)
    bystander.close()
    victim.close()
    assert_clean_servers(pg)


def test_kill_of_a_client_in_the_middle_of_a_row_ends_its_stream_there(hal: Running, pg: Cluster) -> None:
    # The client has been relayed part of a large row (it reads slowly): a FATAL written now would be
    # read as the rest of the row, so the connection just ends, as when a backend dies.
    with rc.RawClient(hal.host, hal.port, timeout=10) as raw:
        raw.login("myapp", "myapp", database="killable")
        raw.send(rc.query("SELECT repeat('x', 40000000) AS killed_mid_row"))
        deadline = time.monotonic() + 10
        # blocked sending: halephant has relayed what the client's socket takes, and waits
        while not pg.primary.sql(
            "SELECT pid FROM pg_stat_activity"
            " WHERE query LIKE '%AS killed_mid_row' AND wait_event = 'ClientWrite'"
        ):
            assert time.monotonic() < deadline, "the backend never blocked sending"
            time.sleep(0.05)
        with console(hal) as admin:
            admin.execute("KILL killable")
            admin.execute("RESUME killable")
        assert raw.read().type == b"T"
        data = raw.rest_of_stream()
    rc.assert_one_row_cut_short(data)
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
        assert show(admin, "DATABASES")[0]["paused"] == 1
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


def test_a_resume_ends_the_wait_of_a_pause_it_released(hal: Running, pg: Cluster) -> None:
    # In session pooling a PAUSE waits for every session to end: an operator who gives up and RESUMEs
    # from another console gets the waiting PAUSE answered (57014), not its console hung as long as a
    # client stays connected.
    with connect(hal, dbname="pausable_session") as session, console(hal) as admin, console(hal) as other:
        session.execute("SELECT 1")
        with ThreadPoolExecutor(1) as threads:
            paused = threads.submit(admin.execute, "PAUSE pausable_session")
            time.sleep(0.3)
            assert not paused.done(), "PAUSE returned while a session held its server"
            other.execute("RESUME pausable_session")
            error = paused.exception(timeout=5)
        assert isinstance(error, psycopg.errors.QueryCanceled), error
        assert "RESUME" in str(error)
        assert show(admin, "VERSION")  # the console goes on
        assert session.execute("SELECT 2").fetchone() == (2,)
    assert_clean_servers(pg)


def test_a_client_held_again_after_a_cancel_is_queued_once_at_resume(hal: Running, pg: Cluster) -> None:
    # A client held by PAUSE, cancelled there (57014), then held again by its next statement, was held
    # twice: RESUME routed it twice, so that it queued twice for the full pool, and the second server
    # handed to it was linked to it while it had one already (or sat idle with one, in transaction
    # pooling), whose answers went to a client that had moved on.
    busy = [connect(hal, dbname="pausable") for _ in range(2)]  # the whole pool (2), in transactions
    for conn in busy:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
    client = connect(hal, dbname="pausable")
    with console(hal) as admin, console(hal) as other:
        paused: list[BaseException | None] = []

        def pause() -> None:
            try:
                admin.execute("PAUSE pausable")  # answered 57014 by the RESUME below
                paused.append(None)
            except psycopg.Error as exc:
                paused.append(exc)

        pausing = threading.Thread(target=pause)
        pausing.start()
        time.sleep(0.3)
        answers: list[Any] = []

        def run(sql: str) -> None:
            try:
                answers.append(client.execute(sql).fetchone())
            except psycopg.Error as exc:
                answers.append(exc)

        first = threading.Thread(target=run, args=("SELECT 1",))
        first.start()
        time.sleep(0.3)
        client.cancel()  # while held: answered where it waits
        first.join(5)
        assert isinstance(answers[0], psycopg.errors.QueryCanceled), answers
        second = threading.Thread(target=run, args=("SELECT 2",))
        second.start()
        time.sleep(0.3)
        other.execute("RESUME pausable")  # the pool is still full: it queues for a server
        pausing.join(5)
        assert paused and isinstance(paused[0], psycopg.errors.QueryCanceled), paused
        time.sleep(0.3)
        busy[0].execute("COMMIT")
        second.join(5)
        assert answers[1:] == [(2,)]
        time.sleep(0.3)
        linked = [c for c in hal.admin_json("/clients") if c["database"] == "pausable" and c["server_pid"]]
        assert len(linked) == 1, linked  # busy[1] only, still in its transaction
        # the server busy[0] gave up serves the others, not a client between transactions
        assert busy[0].execute("SELECT 3").fetchone() == (3,)
        busy[1].execute("COMMIT")
    for conn in [*busy, client]:
        conn.close()
    assert_clean_servers(pg)


def test_pause_and_resume_that_change_nothing_are_refused_as_by_pgbouncer(hal: Running) -> None:
    def refused(admin: Any, command: str) -> tuple[str | None, str | None]:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as info:  # 55000
            admin.execute(command)
        return info.value.diag.message_primary, info.value.diag.message_hint

    with console(hal) as admin:
        try:
            assert refused(admin, "RESUME") == ("pooler is not paused/suspended", None)
            assert refused(admin, "RESUME myapp") == ("database myapp is not paused", None)
            with pytest.raises(psycopg.errors.InvalidCatalogName):  # an unknown name is still 3D000
                admin.execute("RESUME nosuch")
            # a database paused on its own may be paused again, as with PgBouncer; resumed once
            admin.execute("PAUSE pausable")
            admin.execute("PAUSE pausable")
            admin.execute("RESUME pausable")
            assert refused(admin, "RESUME pausable") == ("database pausable is not paused", None)
            # all of them: a second PAUSE, a PAUSE of one, a RESUME of one are refused; RESUME releases
            admin.execute("PAUSE")
            assert refused(admin, "PAUSE") == ("already suspended/paused", None)
            assert refused(admin, "PAUSE myapp") == ("already suspended/paused", None)
            message, hint = refused(admin, "RESUME myapp")
            assert message == "database myapp is not paused" and hint and "RESUME without one" in hint
            assert all(d["paused"] == 1 for d in show(admin, "DATABASES"))
            admin.execute("RESUME")
            assert refused(admin, "RESUME") == ("pooler is not paused/suspended", None)
            # the same through the extended protocol
            with psycopg.connect(hal.dsn(user="admin", password="admin-pw", dbname="halephant")) as ext:
                ext.autocommit = True
                with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                    ext.execute("RESUME")
                assert ext.execute("SHOW VERSION").fetchone()
        finally:
            if hal.admin_json("/snapshot")["summary"]["paused"]:
                admin.execute("RESUME")
        assert all(d["paused"] == 0 for d in show(admin, "DATABASES"))
    with connect(hal) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


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

    with socket.create_connection(_admin_address(hal), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_bad_http_requests_get_4xx_and_the_proxy_keeps_serving(hal: Running) -> None:

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


def test_reload_of_a_broken_file_is_refused_with_F0000_and_every_error(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # RELOAD sent itself a SIGHUP and answered at once: an operator who reloaded a file with a mistake
    # was told RELOAD (success) while the old configuration stayed in force. As PgBouncer's, it now
    # answers ERROR F0000 with each problem at its file:line:col, and the old configuration stays.
    run = halephant.start(
        default_config(pg, users={"admin": {"password": "admin-pw"}}, admin={"users": ["admin"]})
    )
    good = YAML(typ="safe").load(run.config_path.read_text())  # as written, with its listen addresses
    bad = {**good, "databases": {"myapp": {"cluster": "main", "pool_size": -1}}}
    bad["limits"] = {"query_timout": "1s"}
    write_config(bad, run.config_path)
    with console(run) as admin:
        with pytest.raises(psycopg.errors.ConfigFileError) as info:
            admin.execute("RELOAD")
        message = info.value.diag.message_primary or ""
        name = run.config_path.name
        assert "2 error(s)" in message and "previous configuration" in message, message
        assert f"{name}:" in message and "databases.myapp.pool_size" in message, message
        assert "limits.query_timout: unknown key" in message, message
        assert admin.execute("SHOW VERSION").fetchone()  # an ERROR: the console stays usable
        write_config({**good, "limits": {"query_timeout": "1s"}}, run.config_path)
        assert admin.execute("RELOAD").statusmessage == "RELOAD"
    with connect(run) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert "reload: done" in run.log_text()


def test_console_gets_in_when_clients_fill_max_client_conn(pg: Cluster, halephant: HalephantFactory) -> None:
    config = default_config(
        pg,
        users={"admin": {"password": "admin-pw"}},
        admin={"users": ["admin"]},
        limits={"max_client_conn": 1},
    )
    run = halephant.start(config)
    # the connection that found the port open at start-up counts until halephant has seen it close
    wait_until(lambda: run.admin_json("/clients") == [], "the start-up check's connection gone")
    with psycopg.connect(run.dsn(), autocommit=True) as first:
        first.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="too many"):
            psycopg.connect(run.dsn(), autocommit=True)
        dsn = run.dsn(user="admin", password="admin-pw", dbname="halephant")
        with psycopg.connect(dsn, autocommit=True) as admin:
            clients = admin.execute("SHOW CLIENTS").fetchall()
            assert len(clients) == 2  # the client and the console session itself


# --- the console's extended protocol, as drivers speak it ------------------------------------------------

#: every SHOW the console answers
SHOW_COMMANDS = [
    "HELP", "POOLS", "CLIENTS", "SERVERS", "STATS", "STATS_TOTALS", "LISTS", "DATABASES", "CONFIG", "VERSION",
    "NODES", "USERS",
]  # fmt: skip


def console_raw(hal: Running) -> rc.RawClient:
    client = rc.RawClient(hal.host, hal.port)
    client.login("admin", "admin-pw", "pgbouncer")
    return client


def test_every_show_through_asyncpg_without_statement_cache(hal: Running) -> None:
    # asyncpg describes the unnamed statement, then asks for binary results wherever it can decode them
    # (int4, int8, bool, float8, text) and decodes the DataRows as binary: text there was misread
    async def main() -> dict[str, list[asyncpg.Record]]:
        conn = await asyncpg.connect(
            host=hal.host, port=hal.port, user="admin", password="admin-pw", database="pgbouncer",
            ssl=False, statement_cache_size=0,
        )  # fmt: skip
        try:
            return {what: await conn.fetch(f"SHOW {what}") for what in SHOW_COMMANDS}
        finally:
            await conn.close()

    with connect(hal) as client:
        client.execute("SELECT 1")  # a pool, a server and a client to show
        results = asyncio.run(main())
        with console(hal) as admin:  # the same through the simple query protocol (text)
            texts = {what: show(admin, what) for what in ("DATABASES", "NODES", "VERSION")}
    for what, rows in results.items():
        assert rows, what
    dbs = {r["name"]: dict(r) for r in results["DATABASES"]}
    assert {d["name"]: (d["host"], d["port"], d["paused"], d["pool_size"]) for d in texts["DATABASES"]} == {
        name: (d["host"], d["port"], d["paused"], d["pool_size"]) for name, d in dbs.items()
    }
    assert dbs["myapp"]["paused"] == 0 and dbs["myapp"]["disabled"] == 0 and dbs["myapp"]["pool_size"] == 3
    pools = [dict(p) for p in results["POOLS"] if p["database"] == "myapp"]
    assert pools and all(isinstance(p["cl_active"], int) and isinstance(p["maxwait_us"], int) for p in pools)
    nodes = {n["node"]: dict(n) for n in results["NODES"]}
    assert {n["node"]: (n["role"], n["usable"]) for n in texts["NODES"]} == {
        name: (n["role"], n["usable"]) for name, n in nodes.items()
    }
    for n in nodes.values():
        assert n["usable"] is True
        assert n["last_probe"] is None or abs(n["last_probe"] - time.time()) < 3600
        assert n["lag_seconds"] is None or isinstance(n["lag_seconds"], float)
    assert results["VERSION"][0]["version"] == texts["VERSION"][0]["version"]
    assert any(s["remote_pid"] and isinstance(s["transactions"], int) for s in results["SERVERS"])
    assert any(c["user"] == "myapp" and isinstance(c["port"], int) for c in results["CLIENTS"])
    assert any(s["database"] == "myapp" and s["total_xact_count"] >= 1 for s in results["STATS"])
    assert any(s["database"] == "myapp" and s["xact_count"] >= 1 for s in results["STATS_TOTALS"])
    assert dict(results["LISTS"])["databases"] == 5  # type: ignore[arg-type]


def _execute_batch(client: rc.RawClient, query: str, formats: tuple[int, ...]) -> list[rc.Message]:
    client.send(rc.parse(query) + rc.bind(result_formats=formats) + rc.describe() + rc.execute() + rc.sync())
    return client.read_until_ready()


def test_console_sends_binary_where_bind_asks_for_it(hal: Running, pg: Cluster) -> None:
    with console_raw(hal) as client:
        text = _execute_batch(client, "SHOW DATABASES", ())
        binary = _execute_batch(client, "SHOW DATABASES", (1,))  # one code: binary for every column
    assert [m.type for m in binary[:3]] == [b"1", b"2", b"T"] and binary[-2:][0].type == b"C"
    described = rc.row_description(binary[2])
    assert [fmt for _name, _oid, fmt in described] == [1] * len(described)
    assert [oid for _name, oid, _fmt in described] == [oid for _n, oid, _f in rc.row_description(text[2])]
    names = [name for name, _oid, _fmt in described]
    by_name = {rc.data_rows(text)[i][0]: row for i, row in enumerate(rc.raw_rows(binary))}
    myapp = dict(zip(names, by_name["myapp"], strict=True))
    # as int4send, textsend write them: 4 bytes big-endian, the characters
    assert myapp["name"] == b"myapp" and myapp["pool_mode"] == b"transaction"
    assert struct.unpack("!i", myapp["port"]) == (pg.primary.port,)
    assert struct.unpack("!i", myapp["pool_size"]) == (3,)
    assert myapp["paused"] == myapp["disabled"] == b"\0\0\0\0"

    # one code per column: text, binary as asked; bool and float8 as boolsend and float8send write them
    with console_raw(hal) as client:
        nodes_text = _execute_batch(client, "SHOW NODES", ())
        formats = (0, 0, 0, 1, 1, 1, 1, 0)  # usable, lag_bytes, lag_seconds, last_probe binary
        nodes = _execute_batch(client, "SHOW NODES", formats)
    described = rc.row_description(nodes[2])
    assert [(name, oid, fmt) for name, oid, fmt in described][3:7] == [
        ("usable", 16, 1), ("lag_bytes", 20, 1), ("lag_seconds", 701, 1), ("last_probe", 701, 1),
    ]  # fmt: skip
    texts = {row[1]: row for row in rc.data_rows(nodes_text)}
    for row in rc.raw_rows(nodes):
        node = row[1]
        assert node is not None
        expected = texts[node.decode()]
        assert row[2] == (expected[2] or "").encode()  # text as asked
        assert row[3] == (b"\x01" if expected[3] == "t" else b"\x00")
        if expected[4] is None:
            assert row[4] is None  # NULL is -1 whatever the format
        else:
            assert struct.unpack("!q", row[4] or b"") == (int(expected[4]),)
        for i in (5, 6):
            if expected[i] is None:
                assert row[i] is None
            else:
                (value,) = struct.unpack("!d", row[i] or b"")
                assert math.isclose(value, float(expected[i]), rel_tol=1e-9, abs_tol=1.0)


def test_console_answers_bad_result_formats_as_postgresql(hal: Running) -> None:
    with console_raw(hal) as client:
        # two codes for a result of thirteen columns: 08P01 (an ERROR, not FATAL), then the batch is skipped
        client.send(rc.parse("SHOW DATABASES") + rc.bind(result_formats=(1, 0)) + rc.execute() + rc.sync())
        messages = client.read_until_ready()
        assert [m.type for m in messages] == [b"1", b"E", b"Z"]
        error = messages[1].fields
        assert (error["S"], error["C"]) == ("ERROR", "08P01")
        assert error["M"] == "bind message has 2 result formats but query has 13 columns"
        client.send(rc.parse("SHOW VERSION") + rc.bind(result_formats=(2,)) + rc.execute() + rc.sync())
        messages = client.read_until_ready()
        assert [m.type for m in messages] == [b"1", b"E", b"Z"]
        assert (messages[1].fields["C"], messages[1].fields["M"]) == ("22023", "unsupported format code: 2")
        # formats mean nothing to a command without a result, as for PostgreSQL
        client.send(rc.parse("RECONNECT myapp") + rc.bind(result_formats=(1, 1)) + rc.execute() + rc.sync())
        assert [m.type for m in client.read_until_ready()] == [b"1", b"2", b"C", b"Z"]
        assert rc.data_rows(client.simple_query("SHOW VERSION"))


def _types(messages: list[rc.Message]) -> list[bytes]:
    """Message types (an ErrorResponse with its SQLSTATE), notices and ParameterStatus left out."""
    return [
        m.type + m.fields["C"].encode() if m.type == b"E" else m.type for m in messages if m.type not in b"NS"
    ]


def _run_script(host: str, port: int, user: str, password: str, database: str, script: bytes) -> list[bytes]:
    with rc.RawClient(host, port) as client:
        client.login(user, password, database)
        client.send(script)
        out = []
        for _ in range(script.count(rc.sync())):
            out += _types(client.read_until_ready())
        return out


def _limited(query: str) -> bytes:
    """Execute the unnamed portal 2 rows at a time, twice, then the rest; Close it and Execute again."""
    return (
        rc.parse(query) + rc.bind(result_formats=(1,)) + rc.execute(max_rows=2) + rc.execute(max_rows=2)
        + rc.execute() + rc.sync()
        + rc.bind() + rc.execute(max_rows=1) + rc.close() + rc.execute() + rc.sync()
        + rc.bind() + rc.sync() + rc.execute() + rc.sync()
    )  # fmt: skip


def _collapsed(types: list[bytes]) -> list[bytes]:
    """A run of more than two DataRows as one `D+`: the two results differ in length."""
    out: list[bytes] = []
    run = 0
    for t in [*types, b""]:
        if t == b"D":
            run += 1
            continue
        out += [b"D"] * run if run <= 2 else [b"D+"]
        run = 0
        out.append(t)
    return out[:-1]


def test_console_row_limits_and_close_match_postgresql(hal: Running, pg: Cluster) -> None:
    # PostgreSQL's SHOW ALL is a utility statement with rows, like the console's SHOW: the same messages
    # must come back in the same order (a row limit ends with PortalSuspended; Close drops the portal;
    # Sync drops the unnamed portal), whatever the number of rows
    direct = _run_script(pg.primary.host, pg.primary.port, "myapp", "myapp", "myapp", _limited("SHOW ALL"))
    console = _run_script(hal.host, hal.port, "admin", "admin-pw", "halephant", _limited("SHOW CONFIG"))
    assert _collapsed(direct) == [
        b"1", b"2", b"D", b"D", b"s", b"D", b"D", b"s", b"D+", b"C", b"Z",
        b"2", b"D", b"s", b"3", b"E34000", b"Z",
        b"2", b"Z", b"E34000", b"Z",
    ]  # fmt: skip
    assert _collapsed(console) == _collapsed(direct)

    # exactly as many rows as the limit: PortalSuspended, and the next Execute completes with none
    def one_row(query: str) -> bytes:
        return rc.parse(query) + rc.bind() + rc.execute(max_rows=1) + rc.execute(max_rows=1) + rc.sync()

    direct = _run_script(
        pg.primary.host, pg.primary.port, "myapp", "myapp", "myapp", one_row("SHOW work_mem")
    )
    console = _run_script(hal.host, hal.port, "admin", "admin-pw", "halephant", one_row("SHOW VERSION"))
    assert console == direct == [b"1", b"2", b"D", b"s", b"C", b"Z"]


def test_console_portal_errors_name_the_portal(hal: Running) -> None:
    with console_raw(hal) as client:
        client.send(rc.parse("SHOW VERSION") + rc.bind() + rc.close() + rc.execute() + rc.sync())
        messages = client.read_until_ready()
        assert [m.type for m in messages] == [b"1", b"2", b"3", b"E", b"Z"]
        assert (messages[3].fields["C"], messages[3].fields["M"]) == ("34000", 'portal "" does not exist')
        client.send(rc.close("S") + rc.bind() + rc.sync())
        messages = client.read_until_ready()
        assert [m.type for m in messages] == [b"3", b"E", b"Z"]
        assert messages[1].fields["C"] == "26000"
        assert messages[1].fields["M"] == "unnamed prepared statement does not exist"
        assert rc.data_rows(client.simple_query("SHOW VERSION"))


def test_show_columns_keep_their_types_without_rows(pg: Cluster, halephant: HalephantFactory) -> None:
    config = default_config(
        pg,
        clusters={"main": {"probe_user": "myapp"}},
        users={"admin": {"password": "admin-pw"}},
        admin={"users": ["admin"]},
    )
    run = halephant.start(config)
    with rc.RawClient(run.host, run.port) as client:
        client.login("admin", "admin-pw", "halephant")
        for what, expected in [
            ("SERVERS", {"port": 23, "remote_pid": 23, "transactions": 20, "connect_time": 25}),
            ("STATS", {"total_xact_count": 20, "total_wait_time": 20, "database": 25}),
        ]:
            messages = client.simple_query(f"SHOW {what}")
            assert not rc.data_rows(messages), what  # nothing connected yet
            types = {name: oid for name, oid, _fmt in rc.row_description(messages[0])}
            assert {name: types[name] for name in expected} == expected, what


# --- PgBouncer tooling ----------------------------------------------------------------------------------

#: PgBouncer's SHOW LISTS rows, as its documentation names them
PGBOUNCER_LISTS = [
    "databases", "users", "pools", "free_clients", "used_clients", "login_clients", "free_servers",
    "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending",
]  # fmt: skip
#: what prometheus-community/pgbouncer_exporter reads as numbers (the rest are labels), per SHOW
EXPORTER_METRICS = {
    "DATABASES": [
        "pool_size", "reserve_pool", "max_connections", "current_connections", "paused", "disabled",
    ],
    "STATS_TOTALS": [
        "query_count", "query_time", "bytes_received", "requests", "bytes_sent", "wait_time", "xact_count",
        "xact_time", "client_parse_count", "server_parse_count", "bind_count",
    ],
    "POOLS": [
        "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait",
    ],
}  # fmt: skip


def test_show_lists_and_stats_totals_have_pgbouncers_columns(hal: Running) -> None:
    with connect(hal) as client:
        client.execute("SELECT 1")
        with console(hal) as admin:
            cur = admin.execute("SHOW LISTS")
            assert [(d.name, d.type_code) for d in cur.description] == [("list", 25), ("items", 23)]
            lists = dict(cur.fetchall())
            stats = {s["database"]: s for s in show(admin, "STATS")}
            cur = admin.execute("SHOW STATS_TOTALS")
            names = [d.name for d in cur.description]
            totals = {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}
    assert list(lists) == PGBOUNCER_LISTS
    assert lists["databases"] == 5 and lists["users"] == 7  # default_config's myapp and the module's six
    assert lists["pools"] >= 1 and lists["used_servers"] >= 1
    assert lists["used_clients"] >= 2  # the client and this console session
    assert lists["free_clients"] == lists["free_servers"] == lists["dns_names"] == 0
    assert names == [
        "database", "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
        "xact_time", "query_time", "wait_time",
    ]  # fmt: skip
    myapp = totals["myapp"]
    assert myapp["server_assignment_count"] >= 1 and myapp["query_count"] >= 1 and myapp["wait_time"] >= 0
    assert myapp["xact_count"] >= stats["myapp"]["total_xact_count"] >= 1  # counted since, never less
    # not measured by halephant: NULL, not a made-up zero
    assert myapp["bytes_received"] is myapp["bytes_sent"] is myapp["xact_time"] is myapp["query_time"] is None


def test_pgbouncer_exporter_reads_every_number(hal: Running) -> None:
    # the exporter (lib/pq, simple query protocol) parses each metric column's text with ParseFloat and
    # reports the pooler down when SHOW LISTS or SHOW STATS_TOTALS fails; "t"/"f" are not numbers
    with connect(hal) as client:
        client.execute("SELECT 1")
        with console_raw(hal) as admin:
            for what, metrics in EXPORTER_METRICS.items():
                messages = admin.simple_query(f"SHOW {what};")
                assert not rc.errors(messages), (what, rc.errors(messages))
                names = [name for name, _oid, _fmt in rc.row_description(messages[0])]
                for row in rc.data_rows(messages):
                    for name, value in zip(names, row, strict=True):
                        if name in metrics and value is not None:
                            float(value)
            messages = admin.simple_query("SHOW LISTS;")
            assert len(rc.row_description(messages[0])) == 2
            assert all(float(items or "") >= 0 for _list, items in rc.data_rows(messages))
