"""End to end: Unix-domain sockets between halephant and PostgreSQL.

Nodes written as `<socket dir>:<port>` are reached over PostgreSQL's own socket by server connections,
topology probes, cancel requests and the shared LISTEN connection (PostgreSQL then shows them with no
client_addr).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import psycopg.errors
import pytest
from support.halephant import HalephantFactory, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)


# --- nodes given as PostgreSQL's socket directory -----------------------------------------------------


def test_nodes_given_as_socket_directories(pg: Cluster, halephant: HalephantFactory) -> None:
    nodes = [f"{pg.sockdir}:{node.port}" for node in pg.nodes]
    config = default_config(pg, clusters={"main": {"nodes": nodes}})
    run = halephant.start(config)
    # probed over the socket: each node's role is known, under the name it was given
    shown = {n["name"]: n["role"] for n in run.admin_json("/nodes")}
    assert shown == {nodes[0]: "primary", nodes[1]: "replica"}

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
            wait_for(
                lambda: any(c["state"] == "active" for c in run.admin_json("/clients")), "the query running"
            )
            conn.cancel()
            with pytest.raises(psycopg.errors.QueryCanceled):
                sleeping.result(10)

        # and so is the shared connection that listens for transaction-pooled clients
        conn.execute("LISTEN unix_channel")
        with psycopg.connect(run.dsn(), autocommit=True) as other:
            wait_for(lambda: re.search(r"shared listener for \S+: connected", run.log_text()), "the listener")
            notified = threading.Event()
            other.execute("NOTIFY unix_channel, 'over the socket'")
            for notify in conn.notifies(timeout=10, stop_after=1):
                assert notify.payload == "over the socket"
                notified.set()
            assert notified.is_set()
    assert "could not connect" not in run.log_text()
    assert_clean_servers(pg.primary)
