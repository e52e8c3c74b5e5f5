"""`GET /metrics`: Prometheus text exposition, built at scrape time from the counters halephant keeps anyway.

A custom collector (prometheus-client) reads the pools, the process statistics and the cluster views
when scraped; nothing is updated on the proxy's path for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from halephant import __version__
from halephant.admin import snapshot

if TYPE_CHECKING:
    from halephant.proxy.app import App

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
POOL_LABELS = ["database", "user", "node"]


class HalephantCollector:
    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        info = GaugeMetricFamily("halephant_info", "halephant version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        connections = CounterMetricFamily(
            "halephant_client_connections", "Client connections accepted since start"
        )
        connections.add_metric([], app.stats.connections)
        yield connections

        clients = GaugeMetricFamily("halephant_clients", "Connected clients by state", labels=["state"])
        for state, n in snapshot.clients_by_state(app).items():
            clients.add_metric([state], n)
        yield clients

        xacts = CounterMetricFamily("halephant_transactions", "Transactions completed", labels=POOL_LABELS)
        queries = CounterMetricFamily(
            "halephant_queries", "Queries completed (ReadyForQuery answered)", labels=POOL_LABELS
        )
        timeouts = CounterMetricFamily(
            "halephant_checkout_timeouts", "Clients that gave up waiting for a server", labels=POOL_LABELS
        )
        wait = HistogramMetricFamily(
            "halephant_wait_seconds", "Time clients waited for a server connection", labels=POOL_LABELS
        )
        servers = GaugeMetricFamily(
            "halephant_server_connections", "Server connections by state", labels=[*POOL_LABELS, "state"]
        )
        waiting = GaugeMetricFamily(
            "halephant_pool_waiting_clients", "Clients waiting for a server", labels=POOL_LABELS
        )
        maxwait = GaugeMetricFamily(
            "halephant_pool_maxwait_seconds", "Age of the oldest waiting client", labels=POOL_LABELS
        )
        now = app.loop.time()
        held = app.control.held_by_pool()  # waiting too, as SHOW POOLS counts them: held by PAUSE
        for key, pool in sorted(app.manager.shown_pools().items()):
            labels = list(key)
            x, q, _links = snapshot.pool_totals(pool)
            xacts.add_metric(labels, x)
            queries.add_metric(labels, q)
            timeouts.add_metric(labels, pool.stats.checkout_timeouts)
            buckets, _count, total = snapshot.wait_histogram(pool)
            wait.add_metric(
                labels, [("+Inf" if b == float("inf") else repr(b), n) for b, n in buckets], total
            )
            states = Counter(snapshot.server_state(s) for s in pool.active)
            states["idle"] = len(pool.idle)
            states["login"] = pool.connecting
            for state in ("active", "idle", "used", "login"):
                servers.add_metric([*labels, state], states[state])
            held_here = held.get(pool, ())
            waiting.add_metric(labels, len(pool.waiters) + len(held_here))
            maxwait.add_metric(labels, snapshot.oldest_wait(pool, now, held_here))
        yield from (xacts, queries, timeouts, wait, servers, waiting, maxwait)

        # the clients of each pool as SHOW POOLS counts them (a client not yet linked is counted with the
        # pool it would get), so that one application's clients can be watched apart from another's
        pool_clients = GaugeMetricFamily(
            "halephant_pool_clients", "Clients of a pool by state", labels=[*POOL_LABELS, "state"]
        )
        for row in snapshot.pools(app):
            labels = [row["database"], row["user"], row["node"]]
            pool_clients.add_metric([*labels, "active"], row["cl_linked"])
            pool_clients.add_metric([*labels, "idle"], row["cl_active"] - row["cl_linked"])
            pool_clients.add_metric([*labels, "waiting"], row["cl_waiting"])
        yield pool_clients

        errors = CounterMetricFamily(
            "halephant_errors", "Errors halephant sent to clients, by SQLSTATE", labels=["sqlstate"]
        )
        for code, n in sorted(app.stats.errors.items()):
            errors.add_metric([code], n)
        yield errors

        role = GaugeMetricFamily(
            "halephant_node_role", "1 for the role each node has now", labels=["cluster", "node", "role"]
        )
        usable = GaugeMetricFamily("halephant_node_usable", "1 when a node takes new transactions",
                                   labels=["cluster", "node"])  # fmt: skip
        lag_bytes = GaugeMetricFamily("halephant_node_lag_bytes", "Replication lag in bytes",
                                      labels=["cluster", "node"])  # fmt: skip
        lag_seconds = GaugeMetricFamily("halephant_node_lag_seconds", "Replication lag in seconds",
                                        labels=["cluster", "node"])  # fmt: skip
        for node in snapshot.nodes(app):
            labels = [node["cluster"], node["name"]]
            role.add_metric([*labels, node["role"] or "unknown"], 1)
            usable.add_metric(labels, 1 if node["usable"] else 0)
            if node.get("lag_bytes") is not None:
                lag_bytes.add_metric(labels, node["lag_bytes"])
            if node.get("lag_seconds") is not None:
                lag_seconds.add_metric(labels, node["lag_seconds"])
        yield from (role, usable, lag_bytes, lag_seconds)

        paused = GaugeMetricFamily(
            "halephant_database_paused", "1 while PAUSE holds a database's transactions", labels=["database"]
        )
        for database in sorted(app.config.databases):
            paused.add_metric([database], 1 if app.control.is_paused(database) else 0)
        yield paused
        disabled = GaugeMetricFamily(
            "halephant_database_disabled",
            "1 while DISABLE refuses a database's new clients",
            labels=["database"],
        )
        for database in sorted(app.config.databases):
            disabled.add_metric([database], 1 if app.control.is_disabled(database) else 0)
        yield disabled

        reloads = CounterMetricFamily("halephant_reloads", "Configuration reloads", labels=["result"])
        for result in ("ok", "failed"):
            reloads.add_metric([result], app.stats.reloads[result])
        yield reloads


def registry(app: App) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(HalephantCollector(app))
    ProcessCollector(registry=reg)  # CPU seconds, resident memory, open files, start time
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
