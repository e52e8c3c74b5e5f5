"""What a running halephant looks like right now, as plain JSON-ready data: pools, users, nodes, clients,
servers, wait queues, recent decisions, errors, rates, and the configuration with its secrets redacted.

Everything here runs on the event loop when the admin API or the SQL console asks, walking the pools and
clients once; nothing is kept up to date on the proxy's path except the counters it reads
(`halephant.pool.stats`, `halephant.proxy.stats`). `Rates` samples the totals once a second for
transactions/s and queries/s.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import os
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio

from halephant import __version__
from halephant.auth import lookup
from halephant.config.diff import REDACTED, config_tree, redact_tree
from halephant.config.schema import is_md5_hash, is_scram_verifier
from halephant.pool.caps import DB
from halephant.pool.group import NO_PRIMARY
from halephant.pool.stats import WAIT_BUCKETS
from halephant.proxy.client import READY

if TYPE_CHECKING:
    from halephant.config import Config
    from halephant.pool.pool import Pool
    from halephant.proxy.app import App
    from halephant.proxy.client import ClientConnection
    from halephant.proxy.server import ServerConnection

    ServerPool = Pool[ServerConnection, ClientConnection]

PoolKey = tuple[str, str, str]
#: configuration keys whose values are never shown (any key containing one of these words)
SECRET_WORDS = ("password", "secret", "verifier", "token", "private_key")
CLIENT_STATES = ("login", "idle", "waiting", "active")


def client_state(client: ClientConnection) -> str:
    if client.state != READY:
        return "login"
    if client.server is not None:
        return "active"
    if client.waiting_pool is not None:
        return "waiting"
    return "idle"


def _pool_servers(pool: ServerPool) -> Iterable[ServerConnection]:
    yield from pool.active
    yield from pool.idle


def oldest_wait(pool: ServerPool, now: float, held: Iterable[ClientConnection] = ()) -> float:
    """Seconds the longest-waiting client of `pool` has waited (0 when none waits); `held`: the clients
    PAUSE holds for it, which wait outside its queue.

    Looked for among all waiters: a queue that is fair between users is not ordered by age."""
    return max((now - waiter.since for waiter in itertools.chain(pool.waiters, held)), default=0.0)


def pool_totals(pool: ServerPool) -> tuple[int, int, int]:
    """(transactions, queries, server checkouts) since the pool was created."""
    st = pool.stats
    xacts, queries, links = st.closed_xacts, st.closed_queries, st.closed_links
    for server in _pool_servers(pool):
        xacts += server.xact_seen
        queries += server.rfq_seen
        links += server.link_count
    return xacts, queries, links


def server_state(server: ServerConnection) -> str:
    """PgBouncer's names: active (lent to a client), used (running halephant's reset), idle."""
    if server.client is None:
        return "idle"
    return "active" if getattr(server.client, "info", None) is not None else "used"


def _client_pool_key(app: App, client: ClientConnection) -> PoolKey | None:
    if client.server is not None:
        return client.server.pool.key
    if client.waiting_pool is not None:
        return client.waiting_pool.key
    primary = client._primary_pool
    if primary is not None:
        return primary.key
    target = client.target
    if target is None or target.cluster not in app.config.clusters:
        return None
    probed = app.manager.cluster_view(target.cluster).primary  # None while failing over
    node = probed if probed is not None else app.config.clusters[target.cluster].nodes[0]
    return (target.database, target.server_user, f"{node.host}:{node.port}")


def pools(app: App) -> list[dict[str, Any]]:
    """One row per pool (database, user, node), with PgBouncer's SHOW POOLS counters and ours."""
    now = app.loop.time()
    mono = time.monotonic()
    cl: dict[PoolKey, Counter[str]] = {}
    for client in list(app.clients.values()):
        key = _client_pool_key(app, client)
        if key is not None:
            cl.setdefault(key, Counter())[client_state(client)] += 1
    shown = app.manager.shown_pools()
    keys = sorted(set(shown) | set(cl))
    held = app.control.held_by_pool()  # waiting outside the pools' queues
    rows = []
    for key in keys:
        pool = shown.get(key)
        counts = cl.get(key, Counter())
        database, user, node = key
        # the pool's own mode: a database the catch-all entry (or a plugin) serves has no entry of its name
        db = app.config.database_for(database)
        mode = pool.info.target.mode if pool is not None else db.mode if db is not None else ""
        row: dict[str, Any] = {
            "database": database,
            "user": user,
            "node": node,
            "pool_mode": str(mode),
            "cl_active": counts["active"] + counts["idle"],
            "cl_waiting": counts["waiting"],
            "cl_linked": counts["active"],
            "sv_active": 0,
            "sv_idle": 0,
            "sv_used": 0,
            "sv_login": 0,
            "maxwait": 0.0,
            "pool_size": 0,
            "min_pool_size": 0,
            "transactions": 0,
            "queries": 0,
            "checkouts": 0,
            "waits": 0,
            "wait_total": 0.0,
            "wait_max": 0.0,
            "checkout_timeouts": 0,
            "servers_opened": 0,
            "servers_closed": 0,
            "paused": app.control.is_paused(database),
            # the caps across pools that count this pool's servers (None: no such cap), what they count
            # now on this node, every pool of theirs together, and the one keeping its waiters from a
            # new server, if one is
            "max_db_connections": None,
            "db_connections": None,
            "max_user_connections": None,
            "user_connections": None,
            "held_by": None,
        }
        if pool is not None:
            for cap in pool.caps:
                counted = "db_connections" if cap.setting == DB else "user_connections"
                row[cap.setting] = cap.limit
                row[counted] = cap.counted()
            if pool.waiters and pool.caps:
                holder = pool.held_by()
                row["held_by"] = holder.describe() if holder is not None else None
            states = Counter(server_state(s) for s in pool.active)
            xacts, queries, links = pool_totals(pool)
            st = pool.stats
            row.update(
                sv_active=states["active"],
                sv_used=states["used"],
                sv_idle=len(pool.idle),
                sv_login=pool.connecting,
                maxwait=round(oldest_wait(pool, now, held.get(pool, ())), 6),
                pool_size=pool.info.size.max,
                min_pool_size=pool.info.size.min,
                transactions=xacts,
                queries=queries,
                checkouts=links,
                waits=st.wait_count,
                wait_total=round(st.wait_total, 6),
                wait_max=round(st.wait_max, 6),
                checkout_timeouts=st.checkout_timeouts,
                servers_opened=pool.opened_count,
                servers_closed=pool.closed_count,
            )
            ages = [mono - s.created_at for s in _pool_servers(pool)]
            row["oldest_server_age"] = round(max(ages, default=0.0), 3)
        rows.append(row)
    return rows


def users(app: App) -> list[dict[str, Any]]:
    """One row per configured user, aliases (`server_user`) included, by name: the role it logs in
    upstream as; `max_user_connections` and `user_connections`, that role's cap and the server
    connections logged in as it on every node, every database and every alias together, those closing
    but not gone yet included (what the role's caps count: `halephant.pool.caps`); `max_client_conn`
    and `client_connections`, the user's own cap on logged-in clients and their number now. Users
    looked up with `auth_query` (not under `users:`) follow, those that have pools, with no caps."""
    servers: Counter[str] = Counter()
    looked_up: set[str] = set()
    found = {role for _cluster, role in lookup.looked_up_roles()}
    for pool in app.manager.all_pools():
        role = pool.info.target.server_user
        servers[role] += pool.total + len(pool.lingering)
        if role in found and role not in app.config.users:
            looked_up.add(role)
    logged_in = app.client_counts.by_user
    rows = []
    for name, user in sorted(app.config.users.items()):
        role = user.server_user or name
        upstream = app.config.users.get(role)
        rows.append(
            {
                "name": name,
                "server_user": role,
                "max_user_connections": upstream.max_user_connections if upstream is not None else None,
                "user_connections": servers[role],
                "max_client_conn": user.max_client_conn,
                "client_connections": logged_in.get(name, 0),
            }
        )
    for name in sorted(looked_up):
        rows.append(
            {
                "name": name,
                "server_user": name,
                "max_user_connections": None,
                "user_connections": servers[name],
                "max_client_conn": None,
                "client_connections": logged_in.get(name, 0),
            }
        )
    return rows


def wait_histogram(pool: ServerPool) -> tuple[list[tuple[float, int]], int, float]:
    """Cumulative (upper bound, count) buckets of checkout waits, the count and the sum (seconds).

    Every checkout is observed: the ones served at once fall in the first bucket with a wait of 0."""
    _xacts, _queries, links = pool_totals(pool)
    st = pool.stats
    immediate = max(0, links - st.wait_count)
    buckets: list[tuple[float, int]] = []
    running = immediate
    for bound, n in zip((*WAIT_BUCKETS, float("inf")), st.wait_buckets, strict=True):
        running += n
        buckets.append((bound, running))
    return buckets, immediate + st.wait_count, st.wait_total


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def nodes(app: App) -> list[dict[str, Any]]:
    """Every node of every cluster as the pool manager sees it now (role, usable, lag, last probe)."""
    out = []
    for name in app.config.clusters:
        view = app.manager.cluster_view(name)
        for node in view.nodes:
            row: dict[str, Any] = {"cluster": name}
            for f in dataclasses.fields(node):
                row[f.name] = _plain(getattr(node, f.name))
            row["last_probe"] = row.pop("probed_at", None)
            out.append(row)
    return out


def clients(app: App) -> list[dict[str, Any]]:
    now = app.loop.time()
    wall = time.time()
    out = []
    consoles = [session.client for session in list(app.control.consoles)]
    for client in [*app.clients.values(), *consoles]:
        info = client.info
        server = client.server
        out.append(
            {
                "id": client.number,
                "user": info.user if info else "",
                "database": info.database if info else "",
                "address": info.address if info else "",
                "application_name": info.application_name if info else "",
                "state": "console" if client.console else client_state(client),
                # state changes are stamped with a clock of 100 ms resolution (App.clock)
                "since": round(wall - max(0.0, now - client.since), 3),
                "for": round(max(0.0, now - client.since), 3),
                "connected_at": round(wall - (now - client.connected_at), 3),
                "pool": "/".join(client.waiting_pool.key) if client.waiting_pool is not None else None,
                "server_pid": server.backend_pid if server is not None else None,
                "pinned": client.pinned,
                # the TLS version and cipher of a client connected over TLS, else None
                "tls": info.tls if info else None,
                "tls_cipher": _cipher(client) if info and info.tls else None,
            }
        )
    return out


def _cipher(client: ClientConnection) -> str | None:
    cipher = client.transport.get_extra_info("cipher")  # (name, protocol, bits)
    return str(cipher[0]) if cipher else None


def clients_by_state(app: App) -> dict[str, int]:
    counts = Counter(client_state(c) for c in list(app.clients.values()))
    out = {state: counts[state] for state in CLIENT_STATES}
    if app.control.consoles:
        out["console"] = len(app.control.consoles)
    return out


def servers(app: App) -> list[dict[str, Any]]:
    mono = time.monotonic()
    out = []
    for key, pool in list(app.manager.shown_pools().items()):
        for server in _pool_servers(pool):
            client = server.client
            out.append(
                {
                    "pid": server.backend_pid,
                    "database": key[0],
                    "user": key[1],
                    "node": key[2],
                    "state": server_state(server),
                    "client": getattr(client, "number", None),
                    "age": round(mono - server.created_at, 3),
                    "idle_for": round(mono - server.idle_since, 3) if client is None else 0.0,
                    "transactions": server.xact_seen,
                    "queries": server.rfq_seen,
                    "checkouts": server.link_count,
                    "session_state": server.dirty,
                    # the TLS version and cipher of a server connection over TLS, else None (as /clients)
                    "tls": server.tls.partition("/")[0] or None,
                    "tls_cipher": server.tls.partition("/")[2] or None,
                }
            )
        for _ in range(pool.connecting):
            out.append({"pid": None, "database": key[0], "user": key[1], "node": key[2], "state": "login"})
    return out


def queues(app: App) -> list[dict[str, Any]]:
    """Pools with clients waiting for a server, and clients held by PAUSE."""
    now = app.loop.time()
    out = []
    for key, pool in list(app.manager.shown_pools().items()):
        if not pool.waiters:
            continue
        out.append(
            {
                "database": key[0],
                "user": key[1],
                "node": key[2],
                "waiting": len(pool.waiters),
                "oldest_wait": round(oldest_wait(pool, now), 3),
                "clients": [c.number for c in list(pool.waiters)[:50]],
                "reason": "no primary (failing over?)" if key[2] == NO_PRIMARY else "pool full",
            }
        )
    for database, held in app.control.held_by_database().items():
        out.append(
            {
                "database": database,
                "user": "",
                "node": "",
                "waiting": len(held),
                "oldest_wait": round(max((now - c.since for c in held), default=0.0), 3),
                "clients": [c.number for c in held[:50]],
                "reason": "paused",
            }
        )
    return out


def decisions(app: App, limit: int = 200) -> list[dict[str, Any]]:
    items = list(app.stats.decisions)[-limit:]
    return [d.as_dict() for d in reversed(items)]  # newest first


def errors(app: App) -> dict[str, int]:
    return dict(sorted(app.stats.errors.items()))


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    lowered = key.lower()
    if any(word in lowered for word in SECRET_WORDS):
        return None if value is None else REDACTED
    if isinstance(value, str) and (is_scram_verifier(value) or is_md5_hash(value)):
        return REDACTED
    return value


def config(app: App) -> dict[str, Any]:
    """The running configuration, every password, verifier and secret replaced by `(secret)`."""
    return redacted_config(app.config)


def redacted_config(cfg: Config) -> dict[str, Any]:
    """`cfg` as the tree `halephant.config.diff` compares (so `halephant check --against URL` can diff a
    file against a running halephant), with secrets redacted: the keys diff knows as secret, any key
    named like one (plugin settings too), and any value that looks like a SCRAM verifier or md5 hash."""
    redacted: dict[str, Any] = _redact(redact_tree(config_tree(cfg)))
    return redacted


def ready(app: App) -> tuple[bool, dict[str, Any]]:
    """Ready when every database's cluster has a usable primary or replica, and halephant is not
    shutting down (a load balancer should stop sending new connections to a draining process).

    A cluster none of whose nodes answered the last round of probes is not ready, although halephant keeps
    routing by the last view it had (or, never having had one, by the configured order): it cannot
    vouch for any of them."""
    out: dict[str, Any] = {}
    ok = not getattr(app, "draining", False)
    states = app.manager.nodes.topology.states
    for name, db in app.config.databases.items():
        view = app.manager.cluster_view(db.cluster)
        state = states.get(db.cluster)
        answered = state is not None and state.probed and not state.all_failed
        usable = [n.name for n in view.nodes if n.usable] if answered else []
        out[name] = {"cluster": db.cluster, "usable_nodes": usable, "ready": bool(usable)}
        if not answered:
            out[name]["reason"] = "no node answered the last probes"
        ok = ok and bool(usable)
    return ok, out


class Rates:
    """Transactions/s and queries/s over the last second, sampled by a background task."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.transactions_per_s = 0.0
        self.queries_per_s = 0.0
        self._last: tuple[float, int, int] | None = None

    def totals(self) -> tuple[int, int]:
        xacts = queries = 0
        for pool in list(self.app.manager.shown_pools().values()):
            x, q, _ = pool_totals(pool)
            xacts += x
            queries += q
        return xacts, queries

    def sample(self) -> None:
        now = time.monotonic()
        xacts, queries = self.totals()
        if self._last is not None:
            then, x0, q0 = self._last
            dt = max(now - then, 1e-6)
            self.transactions_per_s = max(0.0, (xacts - x0) / dt)
            self.queries_per_s = max(0.0, (queries - q0) / dt)
        self._last = (now, xacts, queries)

    async def run(self) -> None:
        while True:
            self.sample()
            await anyio.sleep(1.0)


def summary(app: App, rates: Rates | None) -> dict[str, Any]:
    xacts, queries = rates.totals() if rates is not None else (0, 0)
    return {
        "version": __version__,
        "pid": os.getpid(),
        "now": time.time(),
        "started_at": app.stats.started_at,
        "uptime": round(time.time() - app.stats.started_at, 3),
        "listen": f"{app.address[0]}:{app.address[1]}" if app.address else None,
        "unix_socket": app.unix_socket,
        "connections_total": app.stats.connections,
        "clients": len(app.clients),
        # of them, those connected over TLS (`client_tls:`)
        "clients_tls": sum(1 for c in list(app.clients.values()) if c.info is not None and c.info.tls),
        "transactions_total": xacts,
        "queries_total": queries,
        "transactions_per_s": round(rates.transactions_per_s, 1) if rates is not None else 0.0,
        "queries_per_s": round(rates.queries_per_s, 1) if rates is not None else 0.0,
        "reloads": dict(app.stats.reloads),
        # a SIGHUP's reload answers nobody: whether the file in force is the one on disk shows here
        "last_reload": (
            None
            if app.stats.last_reload is None
            else {
                "at": app.stats.last_reload[0],
                "ok": not app.stats.last_reload[1],
                "errors": app.stats.last_reload[1],
            }
        ),
        "paused": sorted(app.control.paused_databases()),
        "disabled": sorted(app.control.disabled_databases()),
    }


def full(app: App, rates: Rates | None) -> dict[str, Any]:
    """Everything `halephant status` shows, in one document (`GET /snapshot`)."""
    return {
        "summary": summary(app, rates),
        "pools": pools(app),
        "nodes": nodes(app),
        "clients_by_state": clients_by_state(app),
        "queues": queues(app),
        "decisions": decisions(app, 50),
        "errors": errors(app),
    }
