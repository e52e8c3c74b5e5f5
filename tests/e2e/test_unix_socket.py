"""End to end: Unix-domain sockets on both sides of halephant.

Clients: `unix_socket_dir` makes halephant listen on `<dir>/.s.PGSQL.<port>` as well, where psycopg and
pgbench reach it with `host=<dir>` (SCRAM login, transactions, cancel requests, the admin views showing
the peer as `unix`, max_client_conn counting it). A stale socket file does not stop start-up; at shutdown
the file is removed only while it is still this process's (an online restart replaces it first).
Servers: nodes written as `<socket dir>:<port>` are reached over PostgreSQL's own socket by server
connections, topology probes, cancel requests and the shared LISTEN connection (PostgreSQL then shows
them with no client_addr).
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers
from support.polling import wait_until

from halephant.testing.pgcluster import Cluster, find_bindir, free_port, pgbench

pytestmark = pytest.mark.e2e

BENCH_DB = "e2e_unix_bench"


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A fresh directory for halephant's socket (short: a socket's path holds 107 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="halephant-unix-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="halephant-unix-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory, module_sockdir: Path) -> Running:
    config = default_config(
        pg,
        unix_socket_dir=str(module_sockdir),
        clusters={"main": {"probe_user": "myapp"}},
        databases={"bench": {"cluster": "main", "database": BENCH_DB, "pool_size": 4}},
        users={"admin": {"password": "admin-pw"}},
        admin={"users": ["admin"]},
    )
    run = module_halephant.start(config)
    wait_until(lambda: accepts(module_sockdir / f".s.PGSQL.{run.port}"), "the socket accepts connections")
    return run


def over_socket(run: Running, directory: Path, **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    dsn_keys = {k: kwargs.pop(k) for k in ("user", "password", "dbname") if k in kwargs}
    return psycopg.connect(run.dsn(host=str(directory), **dsn_keys), **kwargs)


# --- clients on halephant's socket -----------------------------------------------------------------


def test_psycopg_over_the_socket(hal: Running, module_sockdir: Path, pg: Cluster) -> None:
    path = module_sockdir / f".s.PGSQL.{hal.port}"
    assert path.is_socket() and path.stat().st_mode & 0o777 == 0o777
    # the socket asks for the password as TCP does: it is not a trusted way in
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        over_socket(hal, module_sockdir, password="wrong")
    with over_socket(hal, module_sockdir, application_name="unix-client") as conn:
        with conn.transaction():
            first = conn.execute("SELECT txid_current()").fetchone()
            second = conn.execute("SELECT txid_current()").fetchone()
        assert first == second
        assert conn.execute("SELECT current_user").fetchone() == ("myapp",)
        mine = [c for c in hal.admin_json("/clients") if c["application_name"] == "unix-client"]
        assert [c["address"] for c in mine] == ["unix"]
        with over_socket(
            hal, module_sockdir, user="admin", password="admin-pw", dbname="halephant"
        ) as console:
            cur = console.execute("SHOW CLIENTS")
            names = [d.name for d in cur.description]
            rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        shown = [r for r in rows if r["application_name"] == "unix-client"]
        assert [(r["addr"], r["port"]) for r in shown] == [("unix", None)]
        assert hal.admin_json("/snapshot")["summary"]["unix_socket"] == str(path)
    assert re.search(r"<client #\d+ myapp@myapp from unix>: connected", hal.log_text())
    assert_clean_servers(pg.primary)


def test_cancel_over_the_socket_cancels_only_that_query(hal: Running, module_sockdir: Path) -> None:
    with (
        over_socket(hal, module_sockdir, application_name="unix-cancelled") as victim,
        over_socket(hal, module_sockdir, application_name="unix-bystander") as bystander,
        ThreadPoolExecutor(2) as pool,
    ):
        cancelled = pool.submit(victim.execute, "SELECT pg_sleep(30)")
        spared = pool.submit(lambda: bystander.execute("SELECT pg_sleep(1.5), 'finished'").fetchone())

        def both_running() -> bool:
            states = {c["application_name"]: c["state"] for c in hal.admin_json("/clients")}
            return states.get("unix-cancelled") == "active" and states.get("unix-bystander") == "active"

        wait_until(both_running, "both queries running")
        t0 = time.monotonic()
        victim.cancel()  # libpq's PQcancel: a CancelRequest over the same socket
        with pytest.raises(psycopg.errors.QueryCanceled):
            cancelled.result(10)
        assert time.monotonic() - t0 < 5
        assert spared.result(10)[1] == "finished"
        assert victim.execute("SELECT 1").fetchone() == (1,)


def test_pgbench_over_the_socket(pg: Cluster, hal: Running, module_sockdir: Path) -> None:
    pg.create_database(BENCH_DB, owner="myapp")
    pgbench(pg.primary, "-i", "-q", "-s", "1", dbname=BENCH_DB, user="myapp")
    argv = [
        str(find_bindir() / "pgbench"), "-h", str(module_sockdir), "-p", str(hal.port), "-U", "myapp",
        "-n", "-S", "-c", "8", "-j", "2", "-T", "3", "bench",
    ]  # fmt: skip
    env = dict(os.environ, PGPASSWORD="myapp")
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert processed is not None and int(processed.group(1)) > 100, out.stdout
    assert failed is not None and int(failed.group(1)) == 0, out.stdout


# --- the socket file over halephant's lifetime ----------------------------------------------------------


def test_a_stale_socket_file_is_replaced_and_unix_clients_count_against_max_client_conn(
    pg: Cluster, halephant: HalephantFactory, sockdir: Path
) -> None:
    port = free_port()
    path = sockdir / f".s.PGSQL.{port}"
    with socket.socket(socket.AF_UNIX) as stale:  # a crashed instance's: bound, nobody listening any more
        stale.bind(str(path))
    assert path.is_socket() and not accepts(path)
    config = default_config(
        pg, listen=f"127.0.0.1:{port}", unix_socket_dir=str(sockdir), limits={"max_client_conn": 1}
    )
    run = halephant.start(config)
    wait_until(lambda: accepts(path), "the socket accepts connections")

    def probes_gone() -> bool:
        # the connections that found halephant listening (TCP, then the socket) count as clients until
        # halephant has seen them close
        summary = run.admin_json("/snapshot")["summary"]
        return summary["connections_total"] >= 2 and summary["clients"] == 0

    wait_until(probes_gone, "the probe connections gone")
    with over_socket(run, sockdir) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            psycopg.connect(run.dsn())  # over TCP: the socket's client holds the only place
    # its place is free again once it has gone
    wait_until(lambda: not run.admin_json("/clients"), "the client gone")
    with psycopg.connect(run.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_unix_socket_mode_and_group_are_the_socket_file_s_and_need_a_restart(
    pg: Cluster, halephant: HalephantFactory, sockdir: Path
) -> None:
    group = "nogroup" if _group_exists("nogroup") else grp.getgrgid(os.getegid()).gr_name
    config = default_config(
        pg, unix_socket_dir=str(sockdir), unix_socket_mode="0660", unix_socket_group=group
    )
    run = halephant.start(config)
    path = sockdir / f".s.PGSQL.{run.port}"
    wait_until(lambda: accepts(path), "the socket accepts connections")
    found = path.stat()
    assert (found.st_mode & 0o7777, found.st_gid) == (0o660, grp.getgrnam(group).gr_gid)
    with over_socket(run, sockdir) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert run.admin_url is not None
    config.update(
        listen=f"{run.host}:{run.port}",
        admin={"listen": run.admin_url.removeprefix("http://")},
        unix_socket_mode="0600",
    )
    log = run.reload(config, expect="unix_socket_mode: 0660 -> 0600 (needs a restart)")
    assert "reload: done (0 change(s) applied, 1 need a restart)" in log
    assert path.stat().st_mode & 0o7777 == 0o660


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_shutdown_removes_the_socket_file_unless_a_new_halephant_replaced_it(
    pg: Cluster, halephant: HalephantFactory, sockdir: Path
) -> None:
    config = default_config(pg, listen=f"127.0.0.1:{free_port()}", unix_socket_dir=str(sockdir))
    old = halephant.start(config)
    path = sockdir / f".s.PGSQL.{old.port}"
    old_inode = wait_until(lambda: accepts(path) and inode(path), "the first socket")
    client = over_socket(old, sockdir)
    try:
        assert client.execute("SELECT 1").fetchone() == (1,)
        # an online restart: the new one listens on the same port (SO_REUSEPORT) and puts its own
        # socket in place of the old one's, which keeps serving its clients
        new = halephant.spawn(config)
        wait_until(lambda: inode(path) not in (None, old_inode), "the new halephant's socket")
        assert client.execute("SELECT 2").fetchone() == (2,)
        new_inode = inode(path)
        old.signal(signal.SIGTERM)
        assert old.proc.wait(10) == 0  # its idle socket client was closed (57P01)
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 3")
    finally:
        client.close()
    assert inode(path) == new_inode, "the old halephant removed the new one's socket"
    assert f"left {path} alone: it is no longer this process's socket" in old.log_text()
    with over_socket(new, sockdir, application_name="after-handover") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert [c["address"] for c in new.admin_json("/clients")] == ["unix"]
    assert new.stop() == 0
    assert not path.exists()
    assert os.listdir(sockdir) == []  # no temporary file left either


@pytest.mark.parametrize("problem", ["missing", "regular file"])
def test_a_socket_directory_that_cannot_be_used_stops_start_up(
    pg: Cluster, halephant: HalephantFactory, sockdir: Path, problem: str
) -> None:
    port = free_port()
    if problem == "missing":
        directory = sockdir / "nope"
        expected = f"halephant: unix_socket_dir {directory}: no such directory"
    else:
        directory = sockdir
        (sockdir / f".s.PGSQL.{port}").write_text("not a socket\n")
        expected = (
            f"halephant: unix_socket_dir {directory}: {directory}/.s.PGSQL.{port} exists and is not a socket"
        )
    run = halephant.spawn(default_config(pg, listen=f"127.0.0.1:{port}", unix_socket_dir=str(directory)))
    assert run.proc.wait(30) == 1
    assert expected in run.log_text()
    if problem == "regular file":
        assert (sockdir / f".s.PGSQL.{port}").read_text() == "not a socket\n"


# --- nodes given as PostgreSQL's socket directory -----------------------------------------------------


def test_nodes_given_as_socket_directories(pg: Cluster, halephant: HalephantFactory) -> None:
    nodes = [f"{pg.sockdir}:{node.port}" for node in pg.nodes]
    config = default_config(pg, clusters={"main": {"nodes": nodes}})
    run = halephant.start(config)
    # probed over the socket: each node's role and timeline are known (a probe that failed would leave
    # the configured order, without a timeline), under the name it was given
    shown = {n["name"]: (n["role"], n["usable"], n["timeline"] is not None) for n in run.admin_json("/nodes")}
    assert shown == {nodes[0]: ("primary", True, True), nodes[1]: ("replica", True, True)}

    def peer(node: Any, pid: int) -> str:
        return str(
            node.sql(f"SELECT client_addr IS NULL, client_port FROM pg_stat_activity WHERE pid = {pid}")
        )

    with psycopg.connect(run.dsn(), autocommit=True) as conn:
        # pg_hba.conf trusts the socket: halephant's server login needs no password there
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone() or (0,)
        assert peer(pg.primary, pid) == "t|-1"  # a Unix-domain socket's backend
        conn.execute("BEGIN READ ONLY")  # routed to the replica (read_only_transactions: replica)
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone() or (0,)
        conn.execute("COMMIT")
        assert peer(pg.replicas[0], pid) == "t|-1"
        for node in pg.nodes:
            probes = node.sql(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'halephant topology' AND client_addr IS NULL"
            )
            assert int(probes) >= 1, node

        # a cancel request is forwarded over the socket too
        with ThreadPoolExecutor(1) as pool:
            sleeping = pool.submit(conn.execute, "SELECT pg_sleep(30)")
            wait_until(
                lambda: any(c["state"] == "active" for c in run.admin_json("/clients")), "the query running"
            )
            conn.cancel()
            with pytest.raises(psycopg.errors.QueryCanceled):
                sleeping.result(10)

        # and so is the shared connection that listens for transaction-pooled clients
        conn.execute("LISTEN unix_channel")
        with psycopg.connect(run.dsn(), autocommit=True) as other:
            wait_until(
                lambda: re.search(r"shared listener for \S+: connected", run.log_text()), "the listener"
            )
            notified = threading.Event()
            other.execute("NOTIFY unix_channel, 'over the socket'")
            for notify in conn.notifies(timeout=10, stop_after=1):
                assert notify.payload == "over the socket"
                notified.set()
            assert notified.is_set()
    assert "could not connect" not in run.log_text()
    assert_clean_servers(pg.primary)
