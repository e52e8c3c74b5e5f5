"""End-to-end: node roles discovered by probing, replica selection, lag limits, read-your-writes, probe
failures, failover and split brain, on real primaries with streaming replicas.

This module starts its own cluster (a primary and two replicas) because its tests pause replay on the
replicas; the failover tests start a fresh cluster each, because they break it. Transactions are sent to
replicas by two plugins loaded with ``plugins.modules``: the `route_by_application_name` example
(application_name ``report…``: every transaction to a replica) and `split_reads` (``split…``: SELECT to a
replica, the rest to the primary). Which node served a query is read with ``inet_server_port()``.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import psycopg
import psycopg.errors
import pytest
from support.cluster import start_test_cluster
from support.halephant import HalephantFactory, Running, write_config
from support.leaks import assert_clean_servers
from support.polling import wait_until

from halephant.testing.pgcluster import Cluster, Node

pytestmark = pytest.mark.e2e

HERE = pathlib.Path(__file__).resolve().parent
PLUGIN_PATH = f"{HERE / 'plugins_for_tests'}:{HERE.parents[1] / 'examples' / 'plugins'}"
PLUGINS = {"modules": ["route_by_application_name", "split_reads"]}
INTERVAL = 0.2  # topology.interval in these tests


@pytest.fixture(scope="module")
def cl() -> Iterator[Cluster]:
    cluster = start_test_cluster(replicas=2)
    try:
        cluster.primary.sql("CREATE TABLE t (id int, pad text)", dbname="myapp", user="myapp")
        cluster.wait_replicated()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # the factory hands its environment to halephant, which imports the plugins from there
    monkeypatch.setenv("PYTHONPATH", PLUGIN_PATH)


def config(nodes: list[Node], **cluster: Any) -> dict[str, Any]:
    return {
        "clusters": {"main": {"nodes": [f"{n.host}:{n.port}" for n in nodes], **cluster}},
        "databases": {
            "myapp": {"cluster": "main", "pool_size": 5, "checkout_timeout": "5s"},
            "ryw": {
                "cluster": "main",
                "database": "myapp",
                "pool_size": 5,
                "read_your_writes": True,
                "read_your_writes_window": "1500ms",
            },
        },
        "users": {"myapp": {"password": "myapp"}},
        "topology": {"interval": f"{int(INTERVAL * 1000)}ms", "timeout": "1s"},
        "plugins": PLUGINS,
        "logging": {"level": "debug"},
    }


def connect(run: Running, app: str = "", dbname: str = "myapp") -> psycopg.Connection[Any]:
    return psycopg.connect(
        run.dsn(dbname=dbname, application_name=app or "plain"),
        autocommit=True,
        connect_timeout=10,
        prepare_threshold=None,  # repeated queries must not pin the client (named prepared statements)
    )


def port(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT inet_server_port()").fetchone()
    assert row is not None
    return int(row[0])


def wait_log(run: Running, text: str, timeout: float = 10.0, *, seen: int = 0) -> None:
    """Wait for a log line containing `text`: one more than the `seen` already logged."""
    wait_until(
        lambda: run.log_text().count(text) > seen, f"log line {text!r}\n{run.log_text()[-3000:]}", timeout
    )


def paused(node: Node) -> Any:
    class _Paused:
        def __enter__(self) -> None:
            node.sql("SELECT pg_wal_replay_pause()")

        def __exit__(self, *exc: object) -> None:
            node.sql("SELECT pg_wal_replay_resume()")

    return _Paused()


def write_wal(primary: Node, rows: int = 5000) -> None:
    primary.sql(
        f"INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, {rows}) g",
        dbname="myapp",
        user="myapp",
    )


# --- roles, balancing ----------------------------------------------------------------------------------


def test_roles_are_discovered_not_configured(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    primary, r1, r2 = cl.primary, *cl.replicas
    # a replica first: the configured order says nothing about roles
    run = halephant.start(config([r1, primary, r2]))
    with connect(run) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert port(conn) == primary.port
        conn.execute("INSERT INTO t VALUES (-1, 'roles')")
        conn.execute("DELETE FROM t WHERE id = -1")
    with connect(run, "report-roles") as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        assert port(conn) in (r1.port, r2.port)
    log = run.log_text()
    assert f"cluster main: primary {primary.host}:{primary.port}" in log
    assert f"cluster main: replica {r1.host}:{r1.port}" in log
    assert_clean_servers(cl)


def test_least_connections_and_round_robin(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    r1, r2 = cl.replicas
    run = halephant.start(config(cl.nodes))
    replica_ports = {r1.port, r2.port}
    # one at a time: every replica is as idle as the other, so they take turns
    with connect(run, "report-rr") as conn:
        seen = [port(conn) for _ in range(6)]
    assert set(seen) == replica_ports, seen
    assert all(a != b for a, b in itertools.pairwise(seen)), seen
    # two transactions at once: the second goes to the replica that has none
    a, b = connect(run, "report-a"), connect(run, "report-b")
    try:
        a.execute("BEGIN")
        b.execute("BEGIN")
        assert {port(a), port(b)} == replica_ports
        a.execute("COMMIT")
        b.execute("COMMIT")
    finally:
        a.close()
        b.close()
    assert_clean_servers(cl)


def test_one_wait_queue_across_replicas(cl: Cluster, halephant: HalephantFactory, plugin_env: None) -> None:
    """With every replica's pool full, whichever replica frees a server first serves the oldest waiter."""
    cfg = config(cl.nodes)
    cfg["databases"]["myapp"]["pool_size"] = 1
    run = halephant.start(cfg)
    holders = [connect(run, f"report-hold{i}") for i in range(2)]
    waiter = connect(run, "report-waiter")
    try:
        for conn in holders:
            conn.execute("BEGIN")
            port(conn)
        held = {port(conn): conn for conn in holders}
        assert set(held) == {r.port for r in cl.replicas}
        answer: list[int] = []
        thread = threading.Thread(target=lambda: answer.append(port(waiter)))
        thread.start()
        time.sleep(0.3)
        assert not answer  # both replicas' only servers are busy
        # free the second replica's server: the waiter, queued when it chose either, gets it
        last = cl.replicas[1].port
        held[last].execute("COMMIT")
        thread.join(5)
        assert answer == [last]
        held[cl.replicas[0].port].execute("COMMIT")
    finally:
        for conn in [*holders, waiter]:
            conn.close()
    assert_clean_servers(cl)


# --- lag ----------------------------------------------------------------------------------------------


def test_lagging_replica_is_excluded_then_readmitted(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    primary, r1, r2 = cl.primary, *cl.replicas
    run = halephant.start(config(cl.nodes, max_lag_bytes="64kB"))
    with paused(r1):
        write_wal(primary)
        wait_log(run, f"{r1.host}:{r1.port} excluded: replica {r1.host}:{r1.port} lag")
        with connect(run, "report-lag") as conn:
            # r2 replays the same WAL: on a busy machine it may be over the limit for a moment too
            wait_until(lambda: _replica_port(conn) == r2.port, "r2 serving")
            assert {port(conn) for _ in range(6)} == {r2.port}
        # the primary is never excluded for lag; with every replica too far behind, the example plugin
        # leaves reports to the default, whose replica_fallback is the primary
        r2_excluded = f"{r2.host}:{r2.port} excluded"
        r2_readmitted = f"{r2.host}:{r2.port} readmitted"
        seen = run.log_text()  # r2 may have been excluded and readmitted above already
        with paused(r2):
            write_wal(primary)
            wait_log(run, r2_excluded, seen=seen.count(r2_excluded))
            with connect(run, "report-none") as conn:
                assert port(conn) == primary.port
                assert port(conn) == primary.port
            with connect(run) as conn:
                assert port(conn) == primary.port
    wait_log(run, f"{r1.host}:{r1.port} readmitted")
    wait_log(run, r2_readmitted, seen=seen.count(r2_readmitted))
    with connect(run, "report-back") as conn:
        assert {port(conn) for _ in range(6)} == {r1.port, r2.port}
    assert "lag" in run.log_text()
    assert_clean_servers(cl)


def _replica_port(conn: psycopg.Connection[Any]) -> int | None:
    try:
        return port(conn)
    except psycopg.errors.CannotConnectNow:
        return None


def test_time_lag_limit(cl: Cluster, halephant: HalephantFactory, plugin_env: None) -> None:
    primary, r1, _ = cl.primary, *cl.replicas
    run = halephant.start(config(cl.nodes, max_lag="1s"))
    with paused(r1):
        write_wal(primary, rows=10)
        wait_log(run, f"{r1.host}:{r1.port} excluded: replica {r1.host}:{r1.port} lag", timeout=15)
        assert "s > 1s" in run.log_text()
    wait_log(run, f"{r1.host}:{r1.port} readmitted")


# --- read-your-writes ---------------------------------------------------------------------------------


def test_read_your_writes(cl: Cluster, halephant: HalephantFactory, plugin_env: None) -> None:
    primary = cl.primary
    replica_ports = {r.port for r in cl.replicas}
    run = halephant.start(config(cl.nodes))
    with connect(run, "split-ryw", dbname="ryw") as ryw, connect(run, "split-plain") as plain:
        # caught up: reads go to the replicas, also right after a write once they replayed it
        assert port(ryw) in replica_ports
        with paused(cl.replicas[0]), paused(cl.replicas[1]):
            ryw.execute("INSERT INTO t VALUES (-2, 'ryw')")
            plain.execute("INSERT INTO t VALUES (-3, 'plain')")
            # its own write is visible: no replica replayed it, so the read goes to the primary
            assert ryw.execute("SELECT count(*), inet_server_port() FROM t WHERE id = -2").fetchone() == (
                1,
                primary.port,
            )
            # without read-your-writes a client reads from a replica that has not replayed its write yet
            row = plain.execute("SELECT count(*), inet_server_port() FROM t WHERE id = -3").fetchone()
            assert row is not None and row[0] == 0 and row[1] in replica_ports
            # after the window, reads go to replicas again even though they still lag
            time.sleep(1.6)
            assert port(ryw) in replica_ports
            ryw.execute("DELETE FROM t WHERE id IN (-2, -3)")
        # replicas caught up with the delete: reads go to them again, within the window
        wait_until(
            lambda: (
                ryw.execute("SELECT count(*), inet_server_port() FROM t WHERE id = -2").fetchone()
                in {(0, p) for p in replica_ports}
            ),
            "a read of a caught-up replica",
        )
    assert_clean_servers(cl)


@pytest.mark.parametrize(
    "write",
    [
        # SQL PREPARE is emulated: halephant prepares it again on the server, and cleans up after
        ["PREPARE ins(int, text) AS INSERT INTO t VALUES ($1, $2)", "EXECUTE ins(-5, 'prepared')"],
        # LISTEN is emulated: the server's own LISTEN is undone after the transaction
        ["BEGIN", "LISTEN ryw_channel", "INSERT INTO t VALUES (-5, 'listen')", "COMMIT"],
    ],
    ids=["prepare", "listen"],
)
def test_read_your_writes_holds_after_halephant_cleans_the_server_up(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None, write: list[str]
) -> None:
    # the server goes back to the pool through a clean-up query: the client's position must be learnt
    run = halephant.start(config(cl.nodes))
    with connect(run, "split-ryw", dbname="ryw") as ryw, paused(cl.replicas[0]), paused(cl.replicas[1]):
        for sql in write:
            ryw.execute(sql)
        row = ryw.execute("SELECT count(*), inet_server_port() FROM t WHERE id = -5").fetchone()
        assert row == (1, cl.primary.port)
        ryw.execute("DELETE FROM t WHERE id = -5")
    assert_clean_servers(cl)


# --- probe failures -----------------------------------------------------------------------------------


def test_read_your_writes_holds_for_a_write_on_a_server_past_max_lifetime(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    # the server is closed at check-in for its age: the client's position must still be learnt first
    cfg = config(cl.nodes)
    cfg["databases"]["ryw"]["max_lifetime"] = "1s"
    run = halephant.start(cfg)
    with connect(run, "split-ryw", dbname="ryw") as ryw, paused(cl.replicas[0]), paused(cl.replicas[1]):
        with ryw.transaction():
            ryw.execute("INSERT INTO t VALUES (-4, 'old server')")
            time.sleep(2.2)  # past max_lifetime, and the sweep has seen it
        row = ryw.execute("SELECT count(*), inet_server_port() FROM t WHERE id = -4").fetchone()
        assert row == (1, cl.primary.port)
        ryw.execute("DELETE FROM t WHERE id = -4")
    assert "(max_lifetime)" in run.log_text()
    assert_clean_servers(cl)


def test_wrong_probe_password_marks_that_node_down(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    # a node where the probe user's password differs: its probes fail, the others keep serving
    other = start_test_cluster(replicas=0)
    try:
        other.primary.sql("ALTER ROLE myapp PASSWORD 'not-myapp'")
        run = halephant.start(config([*cl.nodes, other.primary]))
        name = f"{other.primary.host}:{other.primary.port}"
        wait_log(run, f'probe of {name} failed: password authentication failed for user "myapp" (28P01)')
        assert f"{name} is down" in run.log_text()
        with connect(run) as conn:
            assert port(conn) == cl.primary.port
        with connect(run, "report-pw") as conn:
            assert {port(conn) for _ in range(6)} == {r.port for r in cl.replicas}
    finally:
        other.destroy()


def test_a_stopped_replica_is_marked_down_until_it_answers_again(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    r1, r2 = cl.replicas
    run = halephant.start(config(cl.nodes))
    name = f"{r2.host}:{r2.port}"
    with connect(run, "report-down") as conn:
        assert {port(conn) for _ in range(4)} == {r1.port, r2.port}
        r2.stop()
        try:
            wait_log(run, f"node {name} marked down")
            wait_log(run, f"probe of {name} failed: could not connect")
            assert {port(conn) for _ in range(6)} == {r1.port}
        finally:
            r2.start()
        wait_log(run, f"{name} readmitted")
        assert {port(conn) for _ in range(4)} == {r1.port, r2.port}
    assert_clean_servers(cl)


def test_a_replica_that_refuses_logins_gets_no_reads_while_another_serves(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    # The replica answers its probes (they log in to "postgres") but refuses every login to myapp, as a
    # replica at max_connections (53300) or behind a pg_hba.conf change does: not a node failure, so
    # it stays a usable replica, and its reads must go to the other one, whether that one has servers
    # open or not, until server_login_retry has passed.
    refusing, serving = cl.replicas
    cfg = config(cl.nodes)
    cfg["limits"] = {"server_login_retry": "1s"}
    refusing.set_hba(["host myapp all 127.0.0.1/32 reject"])
    try:
        run = halephant.start(cfg)
        with connect(run, "report-refused") as conn:
            assert [port(conn) for _ in range(6)] == [serving.port] * 6
        with connect(run, "report-refused") as conn:  # the serving replica's server is idle now
            assert [port(conn) for _ in range(6)] == [serving.port] * 6
        assert "server login refused: 28000" in run.log_text()
    finally:
        refusing.set_hba([])
    with connect(run, "report-refused") as conn:
        # once server_login_retry has passed (and the next maintenance tick saw it), it is picked again
        wait_until(lambda: {port(conn) for _ in range(6)} == {refusing.port, serving.port}, "both replicas")
    assert_clean_servers(cl)


def test_clients_are_told_the_primarys_parameters_whoever_logged_in_first(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    # The first server of (myapp, myapp) opens on a replica (a "report" client's login). A client that
    # asks libpq for a read-write session must not then be told in_hot_standby=on: it would refuse
    # halephant, whose writes go to the primary.
    run = halephant.start(config(cl.nodes))
    with connect(run, "report-first") as first:
        assert port(first) in {r.port for r in cl.replicas}
        assert first.info.parameter_status("in_hot_standby") == "on"  # no primary server opened yet
        with connect(run) as writer:  # the primary's first server opens for its login
            assert port(writer) == cl.primary.port
    # no startup settings: told the parameters halephant learnt, without taking a server to log in
    dsn = run.dsn(target_session_attrs="read-write")
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        assert conn.info.parameter_status("in_hot_standby") == "off"
        assert port(conn) == cl.primary.port


def test_a_client_waiting_for_a_replica_is_routed_again_when_no_replica_is_left(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    # BEGIN READ ONLY goes to a replica; with none usable, replica_fallback (primary) decides. A client
    # that was waiting for a replica server when the last replica went must be routed as one arriving
    # then is: its BEGIN has started nowhere.
    cfg = config(cl.nodes)
    cfg["databases"]["myapp"]["pool_size"] = 1
    run = halephant.start(cfg)
    holders = [connect(run) for _ in cl.replicas]
    waiter = connect(run)
    try:
        for holder in holders:  # one server per replica, both busy
            holder.execute("BEGIN READ ONLY")
            assert port(holder) in {r.port for r in cl.replicas}
        with ThreadPoolExecutor(1) as pool:
            began = pool.submit(waiter.execute, "BEGIN READ ONLY")
            time.sleep(0.3)
            assert not began.done()  # waiting for a replica server
            for replica in cl.replicas:
                replica.stop()
            try:
                began.result(timeout=10)  # not 57P03 or 08006: routed again, to the primary
                assert port(waiter) == cl.primary.port
                waiter.execute("COMMIT")
            finally:
                for replica in cl.replicas:
                    replica.start()
        assert "no replica left: 1 waiting client(s) routed again" in run.log_text()
    finally:
        for conn in (*holders, waiter):
            conn.close()
    for replica in cl.replicas:
        wait_log(run, f"{replica.host}:{replica.port} readmitted")
    assert_clean_servers(cl)


def test_a_read_only_user_logs_in_and_reads_while_the_primary_is_down(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    # Its login learns the parameters to report from a server: a replica's, as its transactions run there.
    cfg = config(cl.nodes)
    cfg["users"]["myapp_ro"] = {"password": "myapp_ro", "read_only": True, "server_user": "myapp"}
    run = halephant.start(cfg)
    primary = cl.primary
    name = f"{primary.host}:{primary.port}"
    primary.stop()
    try:
        wait_log(run, f"node {name} marked down")
        dsn = run.dsn(user="myapp_ro", password="myapp_ro", dbname="myapp", application_name="reader")
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10, prepare_threshold=None) as conn:
            assert port(conn) in {r.port for r in cl.replicas}
            row = conn.execute("SELECT count(*) >= 0 FROM t").fetchone()
            assert row == (True,)
    finally:
        primary.start()
    wait_log(run, f"{name} readmitted")
    assert_clean_servers(cl)


def test_every_probe_failing_keeps_the_last_topology(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    run = halephant.start(config(cl.nodes, probe_user="myapp", probe_password="wrong"))
    wait_log(run, "cluster main: every probe failed; keeping the last known topology")
    with connect(run) as conn:  # the configured order: the first node is the primary
        assert port(conn) == cl.primary.port
    # ...but halephant cannot vouch for any node: not ready for a load balancer
    status, body = run.admin_get("/ready")
    assert status == 503, body
    assert json.loads(body)["databases"]["myapp"] == {
        "cluster": "main",
        "usable_nodes": [],
        "ready": False,
        "reason": "no node answered the last probes",
    }


def test_reload_follows_the_clusters_nodes(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    primary, r1, _ = cl.primary, *cl.replicas
    cfg = config([primary])
    run = halephant.start(cfg)
    with connect(run, "report-reload") as conn:
        assert port(conn) == primary.port  # no replica in the cluster: replica_fallback, the primary
        cfg["listen"] = f"{run.host}:{run.port}"
        cfg["clusters"]["main"]["nodes"] = [f"{n.host}:{n.port}" for n in (r1, primary)]
        cfg["clusters"]["main"]["max_lag_bytes"] = "1GB"
        write_config(cfg, run.config_path)
        run.signal(signal.SIGHUP)
        wait_log(run, f"cluster main: replica {r1.host}:{r1.port}")
        assert port(conn) == r1.port
    with connect(run) as conn:
        assert port(conn) == primary.port
    assert_clean_servers(cl)


def test_a_probe_connection_ended_by_the_server_is_not_the_node_failing(
    cl: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    # The probes keep their connection open between rounds; an administrator's pg_terminate_backend, an
    # idle_session_timeout or a quick restart ends it. The node answers a new connection at once: it
    # must not be marked down for an interval.
    run = halephant.start(config(cl.nodes))
    kill = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = "
    kill += "'halephant topology'"
    for _ in range(3):
        assert cl.primary.sql(kill) == "1"
        wait_until(
            lambda: cl.primary.sql(kill.replace("pg_terminate_backend(pid)", "*")) == "1", "a new probe"
        )
    time.sleep(INTERVAL)
    log = run.log_text()
    assert "probe of" not in log and "marked down" not in log, log[-3000:]
    with connect(run) as conn:
        assert port(conn) == cl.primary.port


# --- failover -----------------------------------------------------------------------------------------


@pytest.fixture
def fresh() -> Iterator[Cluster]:
    cluster = start_test_cluster(replicas=1)
    try:
        cluster.primary.sql("CREATE TABLE t (id int, pad text)", dbname="myapp", user="myapp")
        cluster.wait_replicated()
        yield cluster
    finally:
        cluster.destroy()


def test_failover_to_a_promoted_replica(
    fresh: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    old, new = fresh.primary, fresh.replicas[0]
    cfg = config(fresh.nodes)
    cfg["databases"]["myapp"]["checkout_timeout"] = "3s"
    run = halephant.start(cfg)
    # logged in before the failover (a login needs the primary too: it learns the parameters to report)
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(4):
            conns.append(connect(run))
        inside, refused, waiting, after = conns
        inside.execute("BEGIN")
        inside.execute("INSERT INTO t VALUES (1, 'lost')")
        old.kill()
        # mid-transaction on the dead primary: the server connection is lost (never replayed elsewhere)
        with pytest.raises(psycopg.OperationalError) as excinfo:
            inside.execute("INSERT INTO t VALUES (2, 'lost')")
        assert excinfo.value.sqlstate == "08006", excinfo.value
        # no primary: a new write waits for one up to checkout_timeout, then gets 57P03 (an ERROR: the
        # connection stays usable)
        wait_log(run, f"{old.host}:{old.port} marked down")
        start = time.monotonic()
        with pytest.raises(psycopg.errors.CannotConnectNow):
            refused.execute("INSERT INTO t VALUES (3, 'nowhere')")
        assert 2.5 < time.monotonic() - start < 6
        # a write that starts waiting before the promotion is served by the new primary
        waited: list[Any] = []

        def write() -> None:
            waiting.execute("INSERT INTO t VALUES (4, 'waited')")
            waited.append(port(waiting))

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.2)
        # the admin views show it waiting (it is in no node's pool)
        queues = run.admin_json("/queues")
        assert [(q["node"], q["waiting"]) for q in queues] == [("(no primary)", 1)], queues
        assert any(p["node"] == "(no primary)" and p["cl_waiting"] == 1 for p in run.admin_json("/pools"))
        new.promote()
        promoted = time.monotonic()
        wait_until(lambda: _write_ok(after), "a write through halephant after the promotion")
        assert time.monotonic() - promoted < 2 * INTERVAL + 1.0  # two intervals, plus this machine's slack
        assert port(after) == new.port
        writer.join(5)
        assert waited == [new.port]
        assert port(refused) == new.port
    finally:
        for conn in conns:
            conn.close()
    log = run.log_text()
    assert f"{new.host}:{new.port} is now primary (was replica)" in log
    assert new.sql("SELECT count(*) FROM t WHERE id IN (4, 5)", dbname="myapp") == "2"
    assert_clean_servers(new)


def _write_ok(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("INSERT INTO t VALUES (5, 'after')")
    except psycopg.errors.CannotConnectNow:
        return False
    return True


def test_split_brain_writes_go_to_the_higher_timeline(
    fresh: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    old, new = fresh.primary, fresh.replicas[0]
    run = halephant.start(config(fresh.nodes))
    with connect(run) as conn:
        assert port(conn) == old.port
    inside = connect(run)
    inside.execute("BEGIN")
    inside.execute("INSERT INTO t VALUES (-1, 'old primary')")
    new.promote()  # the old primary still runs and still accepts writes: both claim to be primary
    wait_log(run, "split brain")
    # a transaction in progress on the losing node is cut off rather than allowed to commit there
    wait_log(run, "server connection(s): split brain")
    with pytest.raises(psycopg.OperationalError) as excinfo:
        inside.execute("COMMIT")
    assert excinfo.value.sqlstate == "08006", excinfo.value
    inside.close()
    with connect(run) as conn:
        for i in range(5):
            conn.execute("INSERT INTO t VALUES (%s, 'split')", (i,))
            assert port(conn) == new.port
    assert old.sql("SELECT count(*) FROM t", dbname="myapp") == "0"
    assert new.sql("SELECT count(*) FROM t", dbname="myapp") == "5"
    log = run.log_text()
    assert "writes go to " + f"{new.host}:{new.port} only" in log
    assert_clean_servers(fresh)


def test_a_primary_restarted_as_a_standby_between_probes_takes_no_write(
    fresh: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    """Between two rounds of probes the primary comes back as a standby and the replica is promoted: the
    next write must not go to the standby (25006) but wait for the probes, which find the new primary."""
    old, new = fresh.primary, fresh.replicas[0]
    cfg = config(fresh.nodes)
    cfg["topology"]["interval"] = "1h"  # no round of probes of its own during the test
    run = halephant.start(cfg)
    with connect(run) as conn:
        conn.execute("INSERT INTO t VALUES (1, 'before')")
        assert port(conn) == old.port
    old.restart_as_standby()
    new.promote()
    with connect(run) as conn:
        conn.execute("INSERT INTO t VALUES (2, 'after')")
        assert port(conn) == new.port
    assert f"{old.host}:{old.port} is in recovery (a standby), not the primary" in run.log_text()
    assert new.sql("SELECT count(*) FROM t", dbname="myapp") == "2"
    assert_clean_servers(new)


def _processes_of(node: Node) -> list[int]:
    """The postmaster of `node` and every process it forked."""
    postmaster = int((node.datadir / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == postmaster:
                pids.append(int(entry))
    return pids


def test_a_frozen_primary_replaced_by_another_is_cut_off(
    fresh: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    # A primary that hangs (a frozen host, a network partition) keeps its connections open: once another
    # node is the primary, a COMMIT waiting there must fail (08006), not succeed on the old node later.
    old, new = fresh.primary, fresh.replicas[0]
    run = halephant.start(config(fresh.nodes))
    inside = connect(run)
    inside.execute("BEGIN")
    inside.execute("INSERT INTO t VALUES (-2, 'frozen primary')")
    frozen = _processes_of(old)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as threads:
        try:
            wait_log(run, f"{old.host}:{old.port} marked down")
            committed = threads.submit(inside.execute, "COMMIT")
            new.promote()
            wait_log(run, f"{new.host}:{new.port} is now primary")
            wait([committed], timeout=5)
            assert committed.done(), "the COMMIT still waits on the frozen old primary"
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
    error = committed.exception()
    assert isinstance(error, psycopg.OperationalError) and error.sqlstate == "08006", error
    inside.close()
    assert "is no longer the primary of cluster main" in run.log_text()
    # (whether the old node ran the COMMIT it had received when it wakes up is its own affair: the
    # client was told the connection failed, which says that the outcome is not known)
    with connect(run) as conn:
        conn.execute("INSERT INTO t VALUES (-3, 'after')")
        assert port(conn) == new.port


def test_emulated_listen_follows_the_primary_after_a_promotion(
    fresh: Cluster, halephant: HalephantFactory, plugin_env: None
) -> None:
    # The shared LISTEN connection is outside the pools: left on the old primary, it would hear nothing
    # of the NOTIFYs now sent to the new one, and its clients would never know.
    old, new = fresh.primary, fresh.replicas[0]
    run = halephant.start(config(fresh.nodes))
    listening = connect(run)
    listening.execute("LISTEN ch")
    wait_log(run, "shared listener for")
    new.promote()  # the old primary still runs: both claim to be primary
    wait_log(run, "shared listener for myapp/myapp@" + f"{old.host}:{old.port}: closing it")
    with pytest.raises(psycopg.OperationalError) as excinfo:  # told, as when its backend is lost
        listening.execute("SELECT 1")
    assert excinfo.value.sqlstate == "08006", excinfo.value
    listening.close()
    with connect(run) as again, connect(run) as sender:
        again.execute("LISTEN ch")
        wait_until(lambda: _notified(again, sender), "a notification through the new primary")
        assert port(sender) == new.port


def _notified(listener: psycopg.Connection[Any], sender: psycopg.Connection[Any]) -> bool:
    sender.execute("NOTIFY ch, 'hello'")
    listener.execute("SELECT 1")
    return any(n.payload == "hello" for n in listener.notifies(timeout=0.2, stop_after=1))
