"""End-to-end: limits and timeouts, each answered with PostgreSQL's own SQLSTATE while every other client
keeps being served: max_client_conn (global, per database, per user: 53300), client_idle_timeout (57P05),
idle_transaction_timeout (25P03), query_timeout (a real cancel: 57014), the query_wait_notify NOTICE,
the reserve pool, and fair queueing between users sharing one pool."""

from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import resource
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import rawclient as rc
from rawclient import RawClient, data_rows, errors
from support.halephant import HalephantFactory, Running, default_config, write_config
from support.leaks import assert_clean_servers
from support.polling import wait_until

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

PLUGINS_DIR = pathlib.Path(__file__).resolve().parent / "plugins_for_tests"

_open: list[RawClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def _client(
    run: Running,
    user: str = "myapp",
    password: str | None = None,
    timeout: float = 10,
    rcvbuf: int | None = None,
) -> RawClient:
    client = RawClient(run.host, run.port, timeout=timeout, rcvbuf=rcvbuf)
    _open.append(client)
    client.login(user, password if password is not None else user, "myapp")
    return client


def _works(client: RawClient) -> bool:
    out = client.simple_query("SELECT 41 + 1")
    return errors(out) == [] and data_rows(out) == [["42"]]


def _holds(run: Running, sock: socket.socket) -> bool:
    """Whether the halephant process still has its end of the client connection `sock` open."""
    port = sock.getsockname()[1]
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port:  # its remote address is the client's
                inodes.add(f"socket:[{fields[9]}]")
    fds = pathlib.Path(f"/proc/{run.proc.pid}/fd")
    return any(os.readlink(fd) in inodes for fd in fds.iterdir())


def _config(pg: Cluster, limits: dict[str, Any] | None = None, **db: Any) -> dict[str, Any]:
    return default_config(
        pg,
        databases={"myapp": {"cluster": "main", "pool_size": 2, **db}},
        limits={"login_timeout": "5s", **(limits or {})},
    )


# --- max_client_conn ------------------------------------------------------------------------------------


def test_global_max_client_conn_refuses_with_53300(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg, limits={"max_client_conn": 3}))
    clients = [_client(run) for _ in range(3)]
    extra = RawClient(run.host, run.port, timeout=5)
    _open.append(extra)
    extra.send(rc.startup({"user": "myapp", "database": "myapp"}))
    error = extra.expect_fatal_and_close("53300")
    assert "too many clients" in error.fields["M"]
    assert all(_works(c) for c in clients)
    clients[0].send(rc.terminate())
    clients[0].close()
    time.sleep(0.2)
    assert _works(_client(run))  # a slot freed is a slot usable


def test_out_of_file_descriptors_is_logged_sparingly_and_accepting_resumes(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # uvloop's own server accepted and closed at once every connection it had no descriptor for,
    # logging nothing (libuv's EMFILE trick); asyncio's logs a traceback every second
    run = halephant.start(_config(pg))
    client = _client(run)
    assert _works(client)  # its server is open, idle in the pool: it needs no new descriptor
    in_use = len(os.listdir(f"/proc/{run.proc.pid}/fd"))
    _soft, hard = resource.prlimit(run.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(run.proc.pid, resource.RLIMIT_NOFILE, (in_use + 2, hard))
    waiting = [socket.create_connection((run.host, run.port), timeout=5) for _ in range(30)]
    try:
        wait_until(lambda: "cannot accept connections" in run.log_text(), "the failed accept logged")
        time.sleep(1.5)  # accepting is retried meanwhile
        assert _works(client)
        lines = run.log_text().splitlines()
        failed = [line for line in lines if "cannot accept connections" in line]
        assert len(failed) == 1, lines
        assert "Too many open files" in failed[0] and "ulimit -n" in failed[0], failed
        assert f"all the {in_use + 2} file descriptors" in failed[0], failed
        assert len(lines) < 20, lines
    finally:
        for sock in waiting:
            sock.close()
    wait_until(lambda: "accepting connections on" in run.log_text(), "accepting again logged")
    assert _works(_client(run))
    assert _works(client)


def _next_fd_fails(run: Running) -> None:
    """Lower halephant's RLIMIT_NOFILE so that the next descriptor it opens is refused (EMFILE): the
    limit is on descriptor numbers, and a new one takes the lowest number free."""
    open_now = {int(fd) for fd in os.listdir(f"/proc/{run.proc.pid}/fd")}
    lowest_free = min(set(range(len(open_now) + 1)) - open_now)
    _soft, hard = resource.prlimit(run.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(run.proc.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))


def test_out_of_file_descriptors_for_server_connections_is_told_as_such(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # The node answers (its probe connection stays open): halephant itself cannot open a socket. Taken
    # for the node failing, each waiting client was parked for the probes, which found the primary
    # well and handed it back, ten times a second (two log lines each) until checkout_timeout, then
    # told 57P03 "no primary ... is down or failing over"; a client waiting behind a busy server was
    # told "The pool is full; raise pool_size", which needs more descriptors still.
    run = halephant.start(
        _config(
            pg,
            limits={"server_login_retry": "500ms"},
            checkout_timeout="1500ms",
            pool_size=3,
        )
    )
    holder, waiter, other = _client(run), _client(run), _client(run)
    soft, hard = resource.prlimit(run.proc.pid, resource.RLIMIT_NOFILE)
    assert errors(holder.simple_query("BEGIN")) == []  # the pool's one server, busy
    _next_fd_fails(run)
    try:
        started = time.monotonic()
        error = errors(waiter.simple_query("SELECT 1"))
        assert [e["C"] for e in error] == ["53300"], error  # checkout_timeout, as ever
        assert "Too many open files" in error[0].get("H", ""), error  # but not "the pool is full"
        assert "file descriptors" in error[0].get("H", ""), error
        assert time.monotonic() - started < 3
        assert errors(holder.simple_query("COMMIT")) == []
        # no server at all now: told at once, not parked until checkout_timeout
        pid = data_rows(other.simple_query("SELECT pg_backend_pid()"))[0][0]
        in_use = len(os.listdir(f"/proc/{run.proc.pid}/fd"))
        assert pg.primary.sql(f"SELECT pg_terminate_backend({pid})") == "t"
        wait_until(lambda: len(os.listdir(f"/proc/{run.proc.pid}/fd")) < in_use, "the server closed")
        _next_fd_fails(run)
        started = time.monotonic()
        error = errors(other.simple_query("SELECT 2"))
        assert [e["C"] for e in error] == ["53000"], error  # insufficient_resources, as PostgreSQL
        assert "Too many open files" in error[0]["M"], error
        assert time.monotonic() - started < 1
        lines = [line for line in run.log_text().splitlines() if "Too many open files" in line]
        assert 1 <= len(lines) <= 6, lines  # once per server_login_retry at most
        assert all("ulimit -n" in line for line in lines), lines
        assert "did not answer" not in run.log_text()
    finally:
        resource.prlimit(run.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    wait_until(lambda: _works(other), "a server opened again", timeout=5)
    assert _works(waiter) and _works(holder)
    assert_clean_servers(pg.primary)


def test_the_admin_api_out_of_file_descriptors_is_logged_and_answers_once_it_can(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # The admin API ran on the event loop's own server: uvloop accepted each request it had no
    # descriptor for and closed it at once (libuv's EMFILE trick), logging nothing, so a health check
    # failed with a reset connection and nobody learnt why. It now accepts as the client listener does.
    run = halephant.start(_config(pg))
    assert run.admin_get("/health") == (200, "ok\n")
    assert run.admin_url is not None
    host, port = run.admin_url.removeprefix("http://").rsplit(":", 1)
    soft, hard = resource.prlimit(run.proc.pid, resource.RLIMIT_NOFILE)
    _next_fd_fails(run)
    try:
        check = socket.create_connection((host, int(port)), timeout=5)  # taken into the listen queue
        check.sendall(b"GET /health HTTP/1.1\r\nHost: halephant\r\n\r\n")
        wait_until(
            lambda: f"cannot accept connections on admin API {host}:{port}" in run.log_text(),
            "the failed accept logged",
            timeout=5,
        )
    finally:
        resource.prlimit(run.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    with check:
        answer = b""
        while chunk := check.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok\n"), answer
    wait_until(
        lambda: f"accepting connections on admin API {host}:{port} again" in run.log_text(), "recovery logged"
    )
    assert run.admin_get("/health") == (200, "ok\n")


def test_per_database_and_per_user_max_client_conn(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg, max_client_conn=2)
    config["users"]["myapp_ro"]["max_client_conn"] = 1
    run = halephant.start(config)
    a, b = _client(run), _client(run)
    third = RawClient(run.host, run.port, timeout=5)
    _open.append(third)
    with pytest.raises(AssertionError, match="53300"):
        third.login("myapp", "myapp", "myapp")
    assert 'database "myapp"' in third.last_session.messages[-1].fields["M"]
    assert _works(a) and _works(b)
    a.send(rc.terminate())
    a.close()
    time.sleep(0.2)
    ro = _client(run, "myapp_ro")  # the database has room again
    assert _works(ro)
    b.send(rc.terminate())
    b.close()
    time.sleep(0.2)
    second_ro = RawClient(run.host, run.port, timeout=5)
    _open.append(second_ro)
    with pytest.raises(AssertionError, match="53300"):
        second_ro.login("myapp_ro", "myapp_ro", "myapp")
    assert 'role "myapp_ro"' in second_ro.last_session.messages[-1].fields["M"]
    assert _works(ro) and _works(_client(run))


def test_wrong_password_is_not_counted(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg, max_client_conn=1))
    for _ in range(3):
        bad = RawClient(run.host, run.port, timeout=5)
        _open.append(bad)
        with pytest.raises(AssertionError, match="28P01"):
            bad.login("myapp", "wrong", "myapp")
    assert _works(_client(run))


# --- timeouts -------------------------------------------------------------------------------------------


def test_client_idle_timeout_closes_only_the_idle_client(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg, limits={"client_idle_timeout": "1500ms"}))
    idle, busy = _client(run), _client(run)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.5:
        assert _works(busy)
        time.sleep(0.3)
    error = idle.expect_fatal_and_close("57P05", timeout=3)
    assert "idle-session timeout" in error.fields["M"]
    assert _works(busy)


def test_idle_transaction_timeout_closes_the_client_and_rolls_back(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(_config(pg, idle_transaction_timeout="1s"))
    stuck, other = _client(run), _client(run)
    assert errors(stuck.simple_query("BEGIN")) == []
    assert errors(stuck.simple_query("SELECT pg_advisory_xact_lock(4242)")) == []
    t0 = time.monotonic()
    error = stuck.expect_fatal_and_close("25P03", timeout=5)
    assert 1.0 <= time.monotonic() - t0 <= 4.5  # the sweeps run once a second
    assert "idle-in-transaction timeout" in error.fields["M"]
    assert _works(other)
    # a transaction that keeps talking is not idle
    assert errors(other.simple_query("BEGIN")) == []
    for _ in range(6):
        assert _works(other)
        time.sleep(0.4)
    assert errors(other.simple_query("COMMIT")) == []
    assert_clean_servers(pg.primary, timeout=3)


def test_idle_transaction_timeout_cuts_a_batch_left_without_its_sync(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # Parse/Bind/Execute and a Flush, then nothing: the client holds a server while doing nothing
    run = halephant.start(_config(pg, idle_transaction_timeout="1s"))
    stuck, copying = _client(run), _client(run)
    stuck.send(rc.parse("SELECT 1") + rc.bind() + rc.execute() + rc.msg(b"H"))
    stuck.read_until(b"C")
    t0 = time.monotonic()
    error = stuck.expect_fatal_and_close("25P03", timeout=5)
    assert 1.0 <= time.monotonic() - t0 <= 4.5
    assert "idle-in-transaction timeout" in error.fields["M"]
    # ...but one sending COPY data slowly, in such a batch, is busy, not idle
    assert errors(copying.simple_query("CREATE TABLE IF NOT EXISTS limits_copy (n int)")) == []
    copying.send(rc.parse("COPY limits_copy FROM STDIN") + rc.bind() + rc.execute() + rc.sync())
    copying.read_until(b"G")
    for n in range(8):
        copying.send(rc.msg(b"d", f"{n}\n".encode()))
        time.sleep(0.4)
    copying.send(rc.msg(b"c") + rc.sync())
    assert errors(copying.read_until_ready()) == []
    out = copying.simple_query("SELECT count(*) FROM limits_copy; DROP TABLE limits_copy")
    assert errors(out) == [] and data_rows(out) == [["8"]]
    assert_clean_servers(pg.primary, timeout=3)


def test_query_timeout_cancels_with_57014_and_the_client_stays(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(_config(pg, limits={"query_timeout": "1s"}))
    slow, other = _client(run), _client(run)
    t0 = time.monotonic()
    slow.send(rc.query("SELECT pg_sleep(20)"))
    assert _works(other)  # served meanwhile by the other server
    out = slow.read_until_ready(timeout=6)
    assert [e["C"] for e in errors(out)] == ["57014"]
    notices = [m.fields["M"] for m in out if m.type == b"N"]
    assert any("query_timeout (1s)" in n for n in notices), out
    assert time.monotonic() - t0 < 5  # the sweeps run once a second
    assert _works(slow) and _works(other)
    assert_clean_servers(pg.primary)


def test_query_timeout_disconnects_a_client_that_reads_none_of_the_result(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # PostgreSQL acts on no cancel while a backend is blocked sending: the cancel alone would leave the
    # server taken for as long as the client neither reads nor leaves
    run = halephant.start(_config(pg, limits={"query_timeout": "1s"}))
    stalled, other = _client(run), _client(run)
    stalled.send(rc.query("SELECT 'stalled', repeat('x', 1000000) FROM generate_series(1, 1000)"))
    running = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE query LIKE 'SELECT ''stalled''%' AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + 10
    while pg.primary.sql(running) != "1" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pg.primary.sql(running) == "1"
    assert _holds(run, stalled.sock)
    deadline = time.monotonic() + 8
    while pg.primary.sql(running) != "0" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pg.primary.sql(running) == "0", "the backend still runs the query"
    assert "still running after its cancel, and the client reads none of its result" in run.log_text()
    # and halephant let go of the connection (after a grace of 10 s for a client that reads slowly),
    # rather than keep it until the client reads what was sent
    deadline = time.monotonic() + 15
    while _holds(run, stalled.sock):
        assert time.monotonic() < deadline, "halephant keeps the connection of the client it closed"
        time.sleep(0.1)
    assert _works(other)
    assert_clean_servers(pg.primary)


def test_query_timeout_does_not_disconnect_a_client_that_reads_its_result_slowly(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # A client that reads, if slowly, gets the cancel's ERROR 57014 behind the rows already on their
    # way and stays connected, as connected directly: only one that reads nothing is disconnected.
    run = halephant.start(_config(pg, limits={"query_timeout": "1s"}))
    slow = _client(run, timeout=60, rcvbuf=16384)
    slow.send(rc.query("SELECT repeat('x', 8000) FROM generate_series(1, 100000)"))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:  # two sweeps and more past the cancel, reading all along
        chunk = slow.sock.recv(8192)
        assert chunk, f"disconnected after {time.monotonic() - t0:.1f} s while reading its result"
        slow._buf += chunk
        while len(slow._buf) >= 5 and len(slow._buf) >= 1 + struct.unpack_from("!i", slow._buf, 1)[0]:
            assert slow.read().type in (b"T", b"D", b"N"), "the query ended before the test could see"
        time.sleep(0.04)
    out = slow.read_until_ready(timeout=60)  # then at full speed, up to the end of the result
    assert [e["C"] for e in errors(out)] == ["57014"]
    assert _works(slow)
    assert_clean_servers(pg.primary)


def test_database_and_user_overrides_of_query_timeout(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg, limits={"query_timeout": "1s"}, query_timeout=0)
    config["users"]["myapp_ro"]["query_timeout"] = "1s"
    run = halephant.start(config)
    client, limited = _client(run), _client(run, "myapp_ro")
    limited.send(rc.query("SELECT pg_sleep(2.5)"))
    out = client.simple_query("SELECT pg_sleep(2.5)")
    assert errors(out) == []  # the database turned it off
    assert [e["C"] for e in errors(limited.read_until_ready())] == ["57014"]  # the user turned it on


# --- waiting for a server ---------------------------------------------------------------------------------


def test_query_wait_notify_tells_the_waiting_client(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg, limits={"query_wait_notify": "500ms"}, pool_size=1))
    holder, waiter = _client(run), _client(run)
    assert errors(holder.simple_query("BEGIN")) == []
    waiter.send(rc.query("SELECT 7"))
    notice = waiter.read(timeout=3)
    assert notice.type == b"N", notice
    text = notice.fields["M"]
    assert "myapp/myapp@" in text and "1 client(s) waiting" in text, text
    assert errors(holder.simple_query("COMMIT")) == []
    out = waiter.read_until_ready()
    assert data_rows(out) == [["7"]] and errors(out) == []


def test_reserve_pool_serves_a_client_that_waited(
    pg: Cluster, halephant: HalephantFactory, backend_pids: Any
) -> None:
    run = halephant.start(
        _config(pg, pool_size=1, reserve_pool_size=1, reserve_pool_timeout="500ms", idle_timeout="1h")
    )
    holder, waiter = _client(run), _client(run)
    assert errors(holder.simple_query("BEGIN")) == []
    t0 = time.monotonic()
    out = waiter.simple_query("SELECT 8")
    assert data_rows(out) == [["8"]]
    assert 0.4 <= time.monotonic() - t0 < 3  # served by the reserve while the holder keeps its server
    assert len(backend_pids("myapp")) == 2
    assert errors(holder.simple_query("COMMIT")) == []
    deadline = time.monotonic() + 5
    while len(backend_pids("myapp")) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(backend_pids("myapp")) == 1  # the reserve connection closed once idle
    assert _works(holder) and _works(waiter)


def test_a_waiter_is_served_once_a_refused_server_login_would_succeed(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # A server login that fails while the pool's other server is busy (here PostgreSQL's own limit;
    # no file descriptor left fails the same way) leaves the client queued: the pool has room, so it
    # must try again, not leave the client to the busy server or to checkout_timeout.
    run = halephant.start(
        _config(pg, limits={"server_login_retry": "500ms"}, pool_size=2, checkout_timeout="20s")
    )
    holder, waiter = _client(run, "myapp_ro"), _client(run, "myapp_ro")
    assert errors(holder.simple_query("BEGIN")) == []
    pg.primary.sql("ALTER ROLE myapp_ro CONNECTION LIMIT 1")
    try:
        waiter.send(rc.query("SELECT 9"))
        deadline = time.monotonic() + 5
        while "server login refused" not in run.log_text():
            assert time.monotonic() < deadline, "the second server login was not refused"
            time.sleep(0.05)
    finally:
        pg.primary.sql("ALTER ROLE myapp_ro CONNECTION LIMIT -1")
    t0 = time.monotonic()
    out = waiter.read_until_ready(timeout=5)
    assert data_rows(out) == [["9"]]
    assert time.monotonic() - t0 < 3  # server_login_retry, then the next once-a-second sweep
    assert errors(holder.simple_query("COMMIT")) == []
    assert _works(holder) and _works(waiter)
    assert_clean_servers(pg.primary)


def test_fair_queueing_between_users_of_one_pool(pg: Cluster, halephant: HalephantFactory) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(PLUGINS_DIR))
        config = _config(pg, pool_size=1, checkout_timeout="60s")
        config["users"].update({"tenant_a": {"auth": "trust"}, "tenant_b": {"auth": "trust"}})
        config["plugins"] = {"modules": ["shared_pool"]}
        config["limits"]["query_wait_notify"] = 0
        run = halephant.start(config)
    greedy = [_client(run, "tenant_a", "", timeout=30) for _ in range(80)]
    modest = [_client(run, "tenant_b", "", timeout=30) for _ in range(5)]
    for c in greedy:
        c.send(rc.query("SELECT pg_sleep(0.05)"))
    time.sleep(0.3)  # tenant_a's 80 queue up first
    t0 = time.monotonic()
    for c in modest:
        c.send(rc.query("SELECT 1"))
    latencies: list[float] = []

    def read(client: RawClient) -> None:
        out = client.read_until_ready(timeout=30)
        assert errors(out) == [] and data_rows(out) == [["1"]]
        latencies.append(time.monotonic() - t0)

    threads = [threading.Thread(target=read, args=(c,)) for c in modest]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in greedy:
        assert errors(c.read_until_ready(timeout=30)) == []
    greedy_done = time.monotonic() - t0
    assert len(latencies) == 5
    # FIFO would make tenant_b wait behind all of tenant_a (~4 s); round robin serves it in between
    assert max(latencies) < greedy_done / 2, (latencies, greedy_done)
    assert greedy_done > 2.0


def test_catch_all_clients_get_their_entrys_limits(pg: Cluster, halephant: HalephantFactory) -> None:
    config = default_config(pg, limits={"login_timeout": "5s"})
    config["databases"] = {"*": {"cluster": "main", "max_client_conn": 1, "query_timeout": "1s"}}
    run = halephant.start(config)
    client = _client(run)  # "myapp" is served by the '*' entry
    time.sleep(2.5)  # idle across two sweeps: the entry exists, so the client is kept
    assert _works(client)
    second = RawClient(run.host, run.port, timeout=5)
    _open.append(second)
    with pytest.raises(AssertionError, match="53300"):
        second.login("myapp", "myapp", "myapp")
    out = client.simple_query("SELECT pg_sleep(10)")
    assert [e["C"] for e in errors(out)] == ["57014"]
    assert _works(client)


# --- TCP keepalive ---------------------------------------------------------------------------------------

#: (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT) as read from a socket
_TCP_OPTIONS = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
)


def _tcp_sockets(pid: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(local port, peer port, `_TCP_OPTIONS` values) of each connected TCP socket of process `pid`, read
    from a copy of its descriptor (pidfd_getfd, Linux 5.6+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            copy = libc.syscall(438, pidfd, int(fd), 0)  # SYS_pidfd_getfd
            if copy < 0:
                if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
                    pytest.skip("this kernel (or its sandbox) does not let a test copy another's socket")
                continue
            sock = socket.socket(fileno=copy)
            try:
                if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM:
                    try:
                        peer = sock.getpeername()[1]
                    except OSError:
                        continue  # listening
                    options = tuple(sock.getsockopt(level, option) for level, option in _TCP_OPTIONS)
                    found.append((sock.getsockname()[1], peer, options))
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    return found


def test_tcp_keepalive_is_set_on_client_and_server_connections(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    limits = {"tcp_keepidle": "77s", "tcp_keepintvl": "7s", "tcp_keepcnt": 4, "tcp_user_timeout": "9s"}
    config = _config(pg, limits=limits)
    run = halephant.start(config)
    with psycopg.connect(run.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        sockets = _tcp_sockets(run.proc.pid)
        # the pooled servers (the topology probes' connection, to database postgres, is not one of
        # them: each probe has its own timeout)
        pooled = pg.primary.sql(
            "SELECT client_port FROM pg_stat_activity WHERE usename = 'myapp' AND datname = 'myapp'"
        )
        ports = {int(port) for port in pooled.split()}
        clients = [options for local, _, options in sockets if local == run.port]
        servers = [options for local, _, options in sockets if local in ports]
        assert clients == [(1, 77, 7, 4, 9000)]
        assert servers and set(servers) == {(1, 77, 7, 4, 9000)}
    # a reload applies to the connections accepted from then on
    write_config(_config(pg, limits={"tcp_keepalive": False}), run.config_path)
    run.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload: done" not in run.log_text():
        assert time.monotonic() < deadline, run.log_text()[-2000:]
        time.sleep(0.05)
    with psycopg.connect(run.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        clients = [options for local, _, options in _tcp_sockets(run.proc.pid) if local == run.port]
        assert [options[0] for options in clients] == [0]
