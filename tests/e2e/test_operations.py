"""End-to-end: reload on SIGHUP (applied live, or refused with every error as file:line:col), graceful
shutdown on SIGTERM (transactions finish, then 57P01, bounded by shutdown_timeout; a second signal is
fast) and the online restart: a second halephant on the same port (SO_REUSEPORT) takes over while the
first drains, and a client connecting in a loop sees no failed attempt."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import rawclient as rc
from rawclient import RawClient, data_rows, errors
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster, free_port

pytestmark = pytest.mark.e2e

_open: list[RawClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def _client(run: Running, user: str = "myapp", dbname: str = "myapp", timeout: float = 10) -> RawClient:
    client = RawClient(run.host, run.port, timeout=timeout)
    _open.append(client)
    client.login(user, user, dbname)
    return client


def _works(client: RawClient) -> bool:
    out = client.simple_query("SELECT 41 + 1")
    return errors(out) == [] and data_rows(out) == [["42"]]


def _wait_log(run: Running, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = run.log_text()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged within {timeout} s; log:\n{run.log_text()}")


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def _config(pg: Cluster, **db: Any) -> dict[str, Any]:
    return default_config(
        pg,
        listen=f"127.0.0.1:{free_port()}",
        databases={"myapp": {"cluster": "main", "pool_size": 1, "checkout_timeout": "10s", **db}},
        limits={"login_timeout": "5s"},
    )


# --- reload ---------------------------------------------------------------------------------------------


def test_reload_grows_a_pool_live_without_dropping_anyone(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg)
    run = halephant.start(config)
    holder, waiter = _client(run), _client(run)
    assert errors(holder.simple_query("BEGIN")) == []
    waiter.send(rc.query("SELECT 5"))
    time.sleep(0.3)  # waiting: the only server is in the holder's transaction
    config["databases"]["myapp"]["pool_size"] = 2
    log = run.reload(config, "reload: done")
    assert "~ databases.myapp.pool_size: 1 -> 2" in log
    assert "size: max 1 -> 2" in log
    out = waiter.read_until_ready(timeout=5)  # served by the second server while the holder still holds
    assert data_rows(out) == [["5"]]
    assert errors(holder.simple_query("COMMIT")) == []
    assert _works(holder) and _works(waiter)


def test_reload_changes_the_checkout_timeout_of_connected_clients(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    config = _config(pg)
    run = halephant.start(config)
    holder, waiter = _client(run), _client(run)
    assert errors(holder.simple_query("BEGIN")) == []
    waiter.send(rc.query("SELECT 5"))
    time.sleep(0.3)  # waiting (checkout_timeout 10s): the only server is in the holder's transaction
    assert errors(holder.simple_query("COMMIT")) == []
    assert data_rows(waiter.read_until_ready(timeout=5)) == [["5"]]
    config["databases"]["myapp"]["checkout_timeout"] = "500ms"
    run.reload(config, "reload: done")
    assert errors(holder.simple_query("BEGIN")) == []
    started = time.monotonic()
    out = waiter.simple_query("SELECT 6")  # the same client waits again, under the new timeout
    assert [e["C"] for e in errors(out)] == ["53300"]
    assert time.monotonic() - started < 3
    assert errors(holder.simple_query("COMMIT")) == []
    assert _works(waiter)


def test_reload_with_errors_keeps_the_old_config_and_logs_every_error(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    config = _config(pg)
    run = halephant.start(config)
    client = _client(run)
    bad = default_config(pg, listen=config["listen"])
    bad["databases"]["myapp"]["pool_size"] = -1
    bad["limits"] = {"query_timout": "1s"}
    log = run.reload(bad, "reload failed: 2 error(s)")
    name = run.config_path.name
    lines = [line for line in log.splitlines() if "reload failed:" in line and f"{name}:" in line]
    assert len(lines) == 2, log
    assert any("databases.myapp.pool_size: Input should be greater than or equal to 1" in x for x in lines)
    assert any("limits.query_timout: unknown key; did you mean 'query_timeout'?" in x for x in lines)
    for line in lines:  # file:line:col
        position = line.split(f"{name}:", 1)[1].split(":")[:2]
        assert all(part.isdigit() for part in position), line
    # and where monitoring looks: a SIGHUP has no one to answer, and the log may be far away
    last = run.admin_json("/snapshot")["summary"]["last_reload"]
    assert last["ok"] is False and last["at"] > time.time() - 60, last
    assert sorted(last["errors"]) == sorted(line.split("reload failed: ", 1)[1] for line in lines), last
    assert _works(client)
    # the old pool size still holds: a second client waits while the first is in a transaction
    assert errors(client.simple_query("BEGIN")) == []
    other = _client(run)
    other.send(rc.query("SELECT 1"))
    with pytest.raises(TimeoutError):
        other.read(timeout=0.5)
    assert errors(client.simple_query("COMMIT")) == []
    assert data_rows(other.read_until_ready()) == [["1"]]
    run.reload(config, "reload: done")
    assert run.admin_json("/snapshot")["summary"]["last_reload"]["errors"] == []


def test_reload_adds_and_removes_databases_and_users(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg)
    config["databases"]["old_alias"] = {"cluster": "main", "database": "myapp"}
    run = halephant.start(config)
    staying = _client(run)
    leaving_idle = _client(run, dbname="old_alias")
    leaving_busy = _client(run, dbname="old_alias")
    leaving_asks = _client(run, dbname="old_alias")
    assert errors(leaving_busy.simple_query("BEGIN")) == []
    new = _config(pg)
    new["listen"] = config["listen"]
    new["databases"]["new_alias"] = {"cluster": "main", "database": "myapp"}
    new["users"]["plainuser"] = {"password": "plainuser"}
    del new["users"]["myapp_ro"]
    log = run.reload(new, "reload: done")
    # a query right after the reload, before the client sweep tells the idle clients: told the same
    leaving_asks.send(rc.query("SELECT 1"))
    assert "old_alias" in leaving_asks.expect_fatal_and_close("57P01", timeout=5).fields["M"]
    assert "+ databases.new_alias: added" in log and "- databases.old_alias: removed" in log
    assert "- users.myapp_ro: removed" in log
    assert _works(_client(run, dbname="new_alias")) and _works(_client(run, "plainuser"))
    ro = RawClient(run.host, run.port, timeout=5)
    _open.append(ro)
    with pytest.raises(AssertionError, match="28P01"):
        ro.login("myapp_ro", "myapp_ro", "myapp")
    # the removed database's idle client is told so; the one in a transaction finishes it first
    error = leaving_idle.expect_fatal_and_close("57P01", timeout=5)
    assert "old_alias" in error.fields["M"]
    assert _works(leaving_busy)
    assert errors(leaving_busy.simple_query("COMMIT")) == []
    leaving_busy.expect_fatal_and_close("57P01", timeout=5)
    assert _works(staying)
    assert_clean_servers(pg.primary)


def test_reload_reports_what_needs_a_restart(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg)
    run = halephant.start(config)
    moved = dict(config, listen=f"127.0.0.1:{free_port()}")
    log = run.reload(moved, "need a restart")
    assert f"~ listen: {config['listen']} -> {moved['listen']} (needs a restart)" in log
    assert _works(_client(run))  # still on the old address


# --- shutdown -------------------------------------------------------------------------------------------


def test_sigterm_lets_the_transaction_finish_then_57P01(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg, pool_size=2))
    busy, idle = _client(run), _client(run)
    assert errors(busy.simple_query("BEGIN")) == []
    time.sleep(1.2)  # the idle client has been quiet for more than a second
    run.signal(signal.SIGTERM)
    _wait_log(run, "stopped listening")
    idle.expect_fatal_and_close("57P01", timeout=3)
    with pytest.raises(OSError):
        RawClient(run.host, run.port, timeout=2).login("myapp", "myapp", "myapp")
    assert _works(busy)  # its transaction goes on
    assert errors(busy.simple_query("COMMIT")) == []
    error = busy.expect_fatal_and_close("57P01", timeout=5)
    assert "halephant is shutting down" in error.fields["M"]
    assert run.proc.wait(5) == 0
    assert_clean_servers(pg.primary)


def test_shutdown_timeout_ends_a_transaction_that_does_not(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg)
    config["limits"]["shutdown_timeout"] = "1s"
    run = halephant.start(config)
    stuck = _client(run)
    assert errors(stuck.simple_query("BEGIN")) == []
    t0 = time.monotonic()
    run.signal(signal.SIGTERM)
    stuck.expect_fatal_and_close("57P01", timeout=5)
    assert 0.8 <= time.monotonic() - t0 < 3
    assert run.proc.wait(5) == 0
    assert_clean_servers(pg.primary)


def test_second_signal_terminates_at_once(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg)
    config["limits"]["shutdown_timeout"] = "1m"
    run = halephant.start(config)
    stuck = _client(run)
    assert errors(stuck.simple_query("BEGIN")) == []
    run.signal(signal.SIGTERM)
    _wait_log(run, "stopped listening")
    t0 = time.monotonic()
    run.signal(signal.SIGINT)
    stuck.expect_fatal_and_close("57P01", timeout=5)
    assert run.proc.wait(5) == 0
    assert time.monotonic() - t0 < 2
    assert_clean_servers(pg.primary)


# --- online restart -------------------------------------------------------------------------------------


def test_rolling_restart_loses_no_connection_attempt(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg, pool_size=4)
    old = halephant.start(config)
    host, port = old.host, old.port
    attempts, failures = 0, []
    stop = threading.Event()

    def connect_forever() -> None:
        nonlocal attempts
        while not stop.is_set():
            attempts += 1
            try:
                with RawClient(host, port, timeout=10) as client:
                    client.login("myapp", "myapp", "myapp")
                    out = client.simple_query("SELECT 1")
                    assert data_rows(out) == [["1"]], out
                    client.send(rc.terminate())
            except Exception as exc:  # any failure counts, whatever its kind
                failures.append(repr(exc))

    loops = [threading.Thread(target=connect_forever) for _ in range(2)]
    for t in loops:
        t.start()
    try:
        _wait_until(lambda: attempts >= 20, "the clients connect in a loop")
        new = halephant.spawn(config)  # the same listen address
        _wait_log(new, "listening on")
        time.sleep(0.5)
        old.signal(signal.SIGTERM)
        assert old.proc.wait(10) == 0
        before = attempts
        _wait_until(lambda: attempts > before + 20, "the new one serves alone")
    finally:
        stop.set()
        for t in loops:
            t.join(15)
    assert attempts > 50
    assert failures == [], f"{len(failures)} of {attempts} attempts failed: {failures[:5]}"
    assert new.alive and "shutting down" not in new.log_text()
    assert_clean_servers(pg.primary)


def test_reload_applies_plugin_settings(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg)
    run = halephant.start(config)
    client = _client(run)
    hold = "DECLARE c CURSOR WITH HOLD FOR SELECT 1"
    assert [e["C"] for e in errors(client.simple_query(hold))] == ["0A000"]
    config["plugins"] = {"cursor_guard": {"action": "allow"}}
    log = run.reload(config, "reload: done")
    assert "~ plugins.cursor_guard.action: reject -> allow" in log
    assert errors(client.simple_query("BEGIN")) == []
    assert errors(client.simple_query(hold)) == []  # the same client, now allowed
    assert errors(client.simple_query("CLOSE c")) == []
    assert errors(client.simple_query("COMMIT")) == []
    assert_clean_servers(pg.primary)


def test_reload_shrinks_a_pool_by_closing_idle_servers(
    pg: Cluster, halephant: HalephantFactory, backend_pids: Any
) -> None:
    config = _config(pg, pool_size=3, idle_timeout="1h")
    run = halephant.start(config)
    clients = [_client(run) for _ in range(3)]
    for c in clients:
        assert errors(c.simple_query("BEGIN")) == []
    for c in clients:
        assert errors(c.simple_query("COMMIT")) == []
    assert len(backend_pids("myapp")) == 3
    config["databases"]["myapp"]["pool_size"] = 1
    log = run.reload(config, "reload: done")
    assert "size: max 3 -> 1" in log
    # the idle servers above the new size closed with the reload, not at the next sweep: right away, a
    # second transaction waits for the one server left
    assert "above the pool size (1), now 2" in log and "above the pool size (1), now 1" in log
    first, second = clients[:2]
    assert errors(first.simple_query("BEGIN")) == []
    second.send(rc.query("SELECT 1"))
    with pytest.raises(TimeoutError):
        second.read(timeout=0.5)
    assert errors(first.simple_query("COMMIT")) == []
    assert data_rows(second.read_until_ready()) == [["1"]]
    deadline = time.monotonic() + 5
    while len(backend_pids("myapp")) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(backend_pids("myapp")) == 1
    assert all(_works(c) for c in clients)  # nobody was dropped; they share the one server now


def test_reload_that_changes_what_a_pool_logs_in_with_replaces_its_servers(
    pg: Cluster, halephant: HalephantFactory, backend_pids: Any
) -> None:
    # The pool keeps its name, but its servers were opened as a read-write session of another database:
    # a new client of a user made read_only by a reload must not be handed one.
    config = _config(pg, pool_size=2, idle_timeout="1h")
    run = halephant.start(config)
    busy, idle = _client(run), _client(run)
    assert errors(busy.simple_query("BEGIN")) == []
    assert errors(idle.simple_query("SELECT 1")) == []  # a second server, idle in the pool
    old = set(backend_pids("myapp"))
    assert len(old) == 2
    config["users"]["myapp"]["read_only"] = True
    config["databases"]["myapp"]["database"] = "postgres"
    run.reload(config, "reload: done")
    check = "SELECT current_setting('default_transaction_read_only'), current_database(), pg_backend_pid()"
    new = _client(run)
    rows = data_rows(new.simple_query(check))
    assert rows[0][:2] == ["on", "postgres"] and int(rows[0][2]) not in old
    assert [e["C"] for e in errors(new.simple_query("CREATE TEMP TABLE w (x int)"))] == ["25006"]
    assert errors(busy.simple_query("COMMIT")) == []  # its server is closed as it comes back
    deadline = time.monotonic() + 5
    while set(backend_pids("myapp")) & old and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(backend_pids("myapp")) & old  # the idle one closed at once, the busy one on its return
    # clients from before the reload and after it, in turns: the pool stays on the new login
    for client in (idle, new, busy, new):
        assert errors(client.simple_query("SELECT 1")) == []
    assert data_rows(new.simple_query(check))[0][:2] == ["on", "postgres"]
    log = run.log_text()
    assert log.count("server connection(s) are replaced: a reload changed what they log in with") == 1
    assert "(opened before a reload or RECONNECT)" in log


def test_a_sighup_while_starting_reloads_once_started(pg: Cluster, halephant: HalephantFactory) -> None:
    # SIGHUP's default action ends a process: one that comes during the imports or the first round of
    # probes (here held for topology.timeout by a node that accepts and never answers) must not.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        config = _config(pg)
        config["clusters"]["main"]["nodes"].append(f"127.0.0.1:{silent.getsockname()[1]}")
        config["topology"] = {"timeout": "2s"}
        run = halephant.spawn(config)
        silent.settimeout(10)
        probe, _ = silent.accept()  # in its first round of probes: started, not serving yet
        probe.close()
        for _ in range(3):
            run.signal(signal.SIGHUP)
            time.sleep(0.3)
        run.wait_ready()
        _wait_log(run, "received SIGHUP while starting: reloading")
        assert run.alive and _works(_client(run))
    finally:
        silent.close()


def test_reload_shrinks_a_busy_pool_as_its_servers_come_back(
    pg: Cluster, halephant: HalephantFactory, backend_pids: Any
) -> None:
    # Under load a server goes from client to client without ever being idle: a smaller pool_size must
    # still be reached, not only once the load stops, and by closing the excess only.
    config = _config(pg, pool_size=3, idle_timeout="1h")
    run = halephant.start(config)
    holders = [_client(run) for _ in range(3)]
    for c in holders:
        assert errors(c.simple_query("BEGIN")) == []
    old = set(backend_pids("myapp"))
    assert len(old) == 3
    waiters = [_client(run) for _ in range(3)]
    for c in waiters:
        c.send(rc.query("SELECT pg_backend_pid()"))
    config["databases"]["myapp"]["pool_size"] = 2
    run.reload(config, "reload: done")
    for c in holders:
        assert errors(c.simple_query("COMMIT")) == []
    served = {int(data_rows(c.read_until_ready(timeout=10))[0][0]) for c in waiters}
    assert served <= old and len(served) <= 2  # two of the three kept and handed on, no new login
    assert len(backend_pids("myapp")) == 2
    assert run.log_text().count("(above the pool size)") == 1


def test_a_pool_retired_by_a_reload_stays_in_the_admin_views_while_it_serves(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    config = _config(pg)
    config["databases"]["sess"] = {"cluster": "main", "database": "myapp", "mode": "session"}
    run = halephant.start(config)
    held = _client(run, dbname="sess")
    assert errors(held.simple_query("BEGIN")) == []
    del config["databases"]["sess"]
    run.reload(config, "reload: done")
    # its session goes on until it is between transactions: meanwhile its server is still there, and so
    # it is in the views
    assert [s["database"] for s in run.admin_json("/servers")].count("sess") == 1
    assert [p["sv_active"] for p in run.admin_json("/pools") if p["database"] == "sess"] == [1]
    # then it is told (57P01), at the next sweep, however busy it keeps itself
    assert errors(held.simple_query("COMMIT")) == []
    deadline = time.monotonic() + 5
    with pytest.raises(rc.Closed):
        while time.monotonic() < deadline:
            out = held.simple_query("SELECT 1")
            assert errors(out) == [] or errors(out)[0]["C"] == "57P01"
            time.sleep(0.1)
    assert "was removed from the halephant configuration" in run.log_text()


def test_a_reload_of_an_unchanged_file_keeps_logins_from_waiting_for_a_server(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # A login answers with the server parameters learnt from the pool: after a reload that changed
    # nothing, a newcomer must not wait for the pool's only server, busy in another's transaction.
    config = _config(pg)
    run = halephant.start(config)
    holder = _client(run)
    assert errors(holder.simple_query("BEGIN")) == []
    run.signal(signal.SIGHUP)  # the file as it is
    assert "unchanged" in _wait_log(run, "reload: done")
    t0 = time.monotonic()
    newcomer = _client(run)
    assert time.monotonic() - t0 < 1, "the login waited for a server"
    assert errors(holder.simple_query("COMMIT")) == []
    assert _works(newcomer) and _works(holder)
