"""End to end: server connections over their life while PostgreSQL misbehaves: a node that refuses
logins for a while (shutting down, a role's CONNECTION LIMIT reached), and what halephant does about
the clients waiting meanwhile.

This module starts its own single-node cluster: its tests shut PostgreSQL down and start it again.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg.errors
import pytest
from support.cluster import start_test_cluster
from support.halephant import HalephantFactory, Running
from support.leaks import assert_clean_servers
from support.polling import wait_until

from halephant.testing.pgcluster import Cluster, Node

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def own() -> Iterator[Cluster]:
    cluster = start_test_cluster(replicas=0)
    try:
        yield cluster
    finally:
        cluster.destroy()


def config(pg: Cluster, checkout_timeout: str = "10s", **limits: Any) -> dict[str, Any]:
    return {
        "clusters": {"main": {"nodes": [f"{pg.primary.host}:{pg.primary.port}"], "probe_user": "myapp"}},
        "databases": {"myapp": {"cluster": "main", "pool_size": 3, "checkout_timeout": checkout_timeout}},
        "users": {"myapp": {"password": "myapp"}, "limited": {"password": "limited"}},
        "limits": {"connect_timeout": "3s", **limits},
    }


def connect(run: Running, user: str = "myapp") -> psycopg.Connection[Any]:
    return psycopg.connect(run.dsn(user=user, password=user), autocommit=True)


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `work` in a thread; the list gets ("ok", result, seconds) or (sqlstate, message, seconds)."""
    out: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            out.append(("ok", work(), time.monotonic() - started))
        except psycopg.Error as exc:
            out.append((exc.sqlstate, str(exc), time.monotonic() - started))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_node_shutting_down_is_not_hammered_with_logins(own: Cluster, halephant: HalephantFactory) -> None:
    # A smart shutdown waits for the sessions it has and refuses new ones (57P03). A client needing a
    # second server of a pool that still has one waits for it; meanwhile halephant must not try a login
    # again each time the last one is refused (it did: hundreds a second, each a fork and a log line).
    run = halephant.start(config(own))
    node = own.primary
    try:
        with connect(run) as holder, connect(run) as waiter:
            holder.execute("BEGIN")
            holder.execute("SELECT 1")
            own._pg.run(
                [own._pg.bin("pg_ctl"), "-D", str(node.datadir), "-m", "smart", "stop", "--no-wait"],
                cwd=own.base_dir,
            )
            deadline = time.monotonic() + 10
            while node.log_text().count("received smart shutdown request") < 1:
                assert time.monotonic() < deadline, node.log_text()[-2000:]
                time.sleep(0.02)
            thread, out = in_thread(lambda: waiter.execute("SELECT 2").fetchone())
            time.sleep(2.5)
            attempts = run.log_text().count("server connect failed: 57P03")
            assert 1 <= attempts <= 5, f"{attempts} logins tried in 2.5 s"
            # the waiting client gets the server the other one gives back
            holder.execute("COMMIT")
            thread.join(10)
            assert out and out[0][:2] == ("ok", (2,)), out
    finally:
        node.stop("fast")
        node.start()
    assert_clean_servers(own)


def create_limited_role(pg: Cluster) -> None:
    """A role that may have two sessions at a time."""
    pg.primary.sql(
        "DROP ROLE IF EXISTS limited; CREATE ROLE limited LOGIN PASSWORD 'limited' CONNECTION LIMIT 2"
    )


def test_a_waiting_client_gets_a_server_once_logins_are_accepted_again(
    own: Cluster, halephant: HalephantFactory
) -> None:
    # The pool's one server is busy; the login of a second is refused (the role's CONNECTION LIMIT is
    # reached, by a session from elsewhere). Once that session ends, the waiting client must get a new
    # server after server_login_retry, not wait for the busy one up to checkout_timeout.
    create_limited_role(own)
    run = halephant.start(config(own, server_login_retry="1s"))
    try:
        with psycopg.connect(own.primary.dsn("limited", "limited", "myapp")):  # a session from elsewhere
            holder = connect(run, "limited")
            waiter = connect(run, "limited")
            holder.execute("BEGIN")
            holder.execute("SELECT 1")
            thread, out = in_thread(lambda: waiter.execute("SELECT 2").fetchone())
            deadline = time.monotonic() + 10
            while "server login refused: 53300" not in run.log_text():
                assert time.monotonic() < deadline, run.log_text()[-2000:]
                time.sleep(0.02)
        thread.join(12)
        assert out and out[0][:2] == ("ok", (2,)), out
        assert out[0][2] < 6, f"waited {out[0][2]:.1f} s (checkout_timeout 10 s)"
        holder.execute("COMMIT")
        holder.close()
        waiter.close()
    finally:
        run.stop()  # before the role goes: its servers are connected as it
        own.primary.sql("DROP ROLE IF EXISTS limited")
    assert_clean_servers(own)


def test_a_checkout_timeout_behind_a_refused_login_says_why(
    own: Cluster, halephant: HalephantFactory
) -> None:
    # The pool's one server is busy and PostgreSQL refuses another login: a client that waits in vain
    # is told that refusal, not that the pool is full (which would send the operator to pool_size).
    create_limited_role(own)
    run = halephant.start(
        config(own, checkout_timeout="1500ms", server_login_retry="1h", query_wait_notify="500ms")
    )
    try:
        with (
            psycopg.connect(own.primary.dsn("limited", "limited", "myapp")),  # a session from elsewhere
            connect(run, "limited") as holder,
            connect(run, "limited") as waiter,
        ):
            notices: list[str] = []
            waiter.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            holder.execute("BEGIN")
            holder.execute("SELECT 1")
            with pytest.raises(psycopg.errors.TooManyConnections) as info:
                waiter.execute("SELECT 2")
            assert "checkout timeout" in str(info.value)
            assert info.value.diag.message_hint == (
                'PostgreSQL refused the pool\'s last login: too many connections for role "limited"'
            )
            # and so did the NOTICE while it waited (query_wait_notify)
            assert len(notices) == 1 and "pool myapp/limited@" in notices[0], notices
            assert 'refused its last login (too many connections for role "limited")' in notices[0]
            holder.execute("COMMIT")
            assert waiter.execute("SELECT 3").fetchone() == (3,)  # an ERROR: the client goes on
    finally:
        run.stop()
        own.primary.sql("DROP ROLE IF EXISTS limited")


def refusals_and_failures(run: Running) -> int:
    text = run.log_text()
    return text.count("server login refused") + text.count("server connect failed")


def wait_for_servers(node: Node, user: str, n: int) -> None:
    query = f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'"
    wait_until(lambda: node.sql(query).strip() == str(n), f"{n} backends of {user} on {node.name}")


@pytest.mark.parametrize("outage", ["password changed", "node down"])
def test_min_pool_size_is_topped_up_one_login_at_a_time_after_a_failed_one(
    own: Cluster, halephant: HalephantFactory, outage: str
) -> None:
    # min_pool_size 4: while PostgreSQL refuses the role's logins (or is down), the pool's top-up must
    # try one login per server_login_retry, not four each time (four failed logins there, four lines
    # in each log, for every pool); once one logs in, the pool is filled again.
    node = own.primary
    node.sql("DROP ROLE IF EXISTS topup; CREATE ROLE topup LOGIN PASSWORD 'topup'")
    cfg = config(own, server_login_retry="500ms")
    cfg["databases"]["myapp"].update(pool_size=4, min_pool_size=4)
    cfg["users"]["topup"] = {"password": "topup"}
    run = halephant.start(cfg)
    try:
        with connect(run, "topup") as client:
            client.execute("SELECT 1")
        wait_for_servers(node, "topup", 4)
        # one for the client, then three at once: each line counts the ones logged in, not those still
        # logging in (four lines saying "now 4" would tell the operator nothing)
        opened = re.findall(r"topup@\S+: server connection opened \(pid \d+, now (\d+)", run.log_text())
        assert sorted(int(n) for n in opened) == [1, 2, 3, 4], run.log_text()[-3000:]
        if outage == "password changed":
            node.sql("ALTER ROLE topup PASSWORD 'other'")
            node.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'topup'")
        else:
            node.stop("fast")
        wait_until(lambda: refusals_and_failures(run), "a refused or failed server login")
        time.sleep(0.3)  # the four opens the first top-up after the loss tried (nothing had failed yet)
        before = refusals_and_failures(run)
        time.sleep(3)
        tried = refusals_and_failures(run) - before
        # one per sweep once server_login_retry has passed: about three in 3 s (four at a time: twelve)
        assert 1 <= tried <= 4, f"{tried} failed logins in 3 s\n" + run.log_text()[-3000:]
    finally:
        if outage == "password changed":
            node.sql("ALTER ROLE topup PASSWORD 'topup'")
        else:
            node.start()
    wait_for_servers(node, "topup", 4)  # one logged in, then the rest at once
    run.stop()
    node.sql("DROP ROLE IF EXISTS topup")
    assert_clean_servers(own)


def smart_stop(node: Node, within: float) -> bool:
    """`pg_ctl stop -m smart` (a SIGTERM to the postmaster: what an init system or container runtime sends),
    waiting up to `within` seconds; whether PostgreSQL was down by then (else its shutdown goes on)."""
    argv = [node._pg.bin("pg_ctl"), "-D", str(node.datadir), "-m", "smart", "-t", f"{within:g}", "stop"]
    return node._pg.run(argv, cwd=node.sockdir.parent, check=False, timeout=within + 10).returncode == 0


def probing_fast(own: Cluster, halephant: HalephantFactory) -> Running:
    """halephant in front of `own`, probing every 100 ms (a smart shutdown is seen within a few rounds)."""
    cfg = config(own)
    cfg["topology"] = {"interval": "100ms"}
    return halephant.start(cfg)


@contextlib.contextmanager
def restarted_after(node: Node) -> Iterator[None]:
    """Start `node` again after the block (a smart shutdown still waiting is made a fast one first)."""
    try:
        yield
    finally:
        node.stop("fast")
        node.start()


def assert_smart_shutdown_completes(node: Node, run: Running) -> None:
    started = time.monotonic()
    assert smart_stop(node, within=10), run.log_text()[-3000:]
    assert time.monotonic() - started < 5


def assert_serves_again(run: Running) -> None:
    """halephant serves as before once the node is back, and logged no traceback on the way."""
    with connect(run) as conn:
        wait_until(lambda: conn.execute("SELECT 1").fetchone() == (1,), "a query after the restart")
    assert "Traceback" not in run.log_text()


def test_a_smart_shutdown_is_not_held_up_by_the_probe_connection(
    own: Cluster, halephant: HalephantFactory
) -> None:
    # A smart shutdown waits for every session to end. The probes' connection is kept open between
    # rounds and answers them as before: never closed, it held the node up for as long as halephant ran.
    node = own.primary
    run = probing_fast(own, halephant)
    with restarted_after(node):
        assert_smart_shutdown_completes(node, run)
        wait_until(
            lambda: f"probe of {node.host}:{node.port} failed" in run.log_text(), "the node's probe failing"
        )
    assert_serves_again(run)


def test_a_smart_shutdown_is_not_held_up_by_idle_server_connections(
    own: Cluster, halephant: HalephantFactory
) -> None:
    # Once the probes find the node refusing new sessions (57P03), no new transaction goes there: the
    # pooled connections nobody uses would hold its shutdown up until their idle_timeout (5 min).
    node = own.primary
    run = probing_fast(own, halephant)
    with restarted_after(node):
        with connect(run) as a, connect(run) as b:
            a.execute("BEGIN")
            b.execute("SELECT 1")  # a second server, idle in the pool once its transaction ends
            wait_for_servers(node, "myapp", 2 + 1)  # and the probe's
            a.execute("COMMIT")
        assert_smart_shutdown_completes(node, run)
    assert "closing 2 idle server connection(s)" in run.log_text()
    assert_serves_again(run)


def test_a_smart_shutdown_is_not_held_up_by_a_shared_listener_nobody_listens_on(
    own: Cluster, halephant: HalephantFactory
) -> None:
    # LISTEN in transaction pooling runs on one shared connection per database and user, kept open once
    # opened: after its last client's UNLISTEN it still held a smart shutdown up for as long as halephant
    # ran. With a client still listening it stays, as that client's own session would, connected directly.
    node = own.primary
    run = probing_fast(own, halephant)
    with restarted_after(node):
        with connect(run) as conn:
            conn.execute("LISTEN lifecycle")
            conn.execute("SELECT 1")  # the LISTEN is read back at the end of its transaction
            wait_until(lambda: "connected (pid" in run.log_text(), "the shared listener connected")
            conn.execute("UNLISTEN lifecycle")
            conn.execute("SELECT 1")
        assert_smart_shutdown_completes(node, run)
    assert "shared listener for myapp/myapp" in run.log_text() and "no client listens" in run.log_text()
    # LISTEN works again once the node is back: the shared connection reopens
    with connect(run) as listener, connect(run) as sender:
        wait_until(lambda: listener.execute("LISTEN lifecycle") is not None, "a LISTEN after the restart")
        listener.execute("SELECT 1")
        sender.execute("NOTIFY lifecycle, 'back'")
        got = wait_until(lambda: list(listener.notifies(timeout=0.2, stop_after=1)), "the notification")
        assert got[0].payload == "back"
    assert_serves_again(run)
