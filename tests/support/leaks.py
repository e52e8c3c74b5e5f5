"""The leak oracle: after a test no server backend may be left in a transaction or holding advisory locks.

A pooler that hands a dirty server to the next client is the worst bug it can have (pgbouncer#418, #1415),
so end-to-end tests finish with `assert_clean_servers(pg)`. Both checks of a node are one query over one
psycopg connection to its unix socket: two psql processes per node took 0.1 s a call, and the suite makes
hundreds.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from halephant.testing.pgcluster import Cluster, Node

# Client backends only: walsenders, autovacuum and background workers are not the pooler's.
IDLE_IN_TRANSACTION = """
SELECT coalesce(json_agg(t ORDER BY t.pid), '[]') FROM (
    SELECT pid, usename, datname, application_name, client_addr::text, state,
           round(extract(epoch FROM now() - state_change)::numeric, 2) AS seconds, left(query, 200) AS query
    FROM pg_stat_activity
    WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
      AND state IN ('idle in transaction', 'idle in transaction (aborted)')
) t
"""

ADVISORY_LOCKS = """
SELECT coalesce(json_agg(t ORDER BY t.pid), '[]') FROM (
    SELECT l.pid, a.usename, a.datname, a.application_name, l.classid, l.objid, l.objsubid, l.mode, l.granted
    FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory'
) t
"""


CHECK = f"SELECT ({IDLE_IN_TRANSACTION}), ({ADVISORY_LOCKS})"


def _rows(node: Node) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The backends idle in a transaction, and the advisory locks, on `node` (one query, as postgres)."""
    with psycopg.connect(
        host=str(node.sockdir), port=node.port, user="postgres", dbname="postgres", autocommit=True,
        connect_timeout=10,
    ) as conn:  # fmt: skip
        row = conn.execute(CHECK).fetchone()
    assert row is not None
    return row[0], row[1]


def _problems(node: Node) -> list[str]:
    idle, locks = _rows(node)
    problems = [
        f"{node.name}: pid {r['pid']} {r['usename']}@{r['datname']} app={r['application_name']!r} "
        f"from {r['client_addr']}: {r['state']} for {r['seconds']} s, last query: {r['query']!r}"
        for r in idle
    ]
    problems += [
        f"{node.name}: pid {r['pid']} {r['usename']}@{r['datname']} app={r['application_name']!r} "
        f"{'holds' if r['granted'] else 'waits for'} advisory lock "
        f"(classid={r['classid']}, objid={r['objid']}, objsubid={r['objsubid']}, {r['mode']})"
        for r in locks
    ]
    return problems


def assert_clean_servers(target: Node | Cluster, timeout: float = 2.0) -> None:
    """Fail unless, within `timeout` seconds, no backend on the running nodes is idle in a transaction
    (or an aborted one) and none holds or waits for an advisory lock.

    The short grace period lets a pooler finish the ROLLBACK or reset it sends after the client left.
    """
    nodes = target.nodes if isinstance(target, Cluster) else [target]
    deadline = time.monotonic() + timeout
    while True:
        problems = [p for node in nodes if node.is_running for p in _problems(node)]
        if not problems:
            return
        if time.monotonic() > deadline:
            listing = "\n  ".join(problems)
            raise AssertionError(f"dirty servers after {timeout:g} s:\n  {listing}")
        time.sleep(0.05)
