"""Which node's pool a transaction gets, following the topology the probes report; and read-your-writes.

`Nodes` owns the latest `ClusterView` of each cluster (published by `halephant.topology.monitor`), one
`PoolGroup` per (database, user) and the I/O their changes call for: when a primary appears, the clients
parked waiting for one are handed to it; when a primary stops being one, its waiting clients are parked
(or handed to the new primary); a parked client whose checkout_timeout passes gets 57P03.

Read-your-writes (per database, off by default): when a client's transaction ends on the primary, the
server is asked for `pg_current_wal_insert_lsn()` before it goes back to the pool (the insert position:
with synchronous_commit off the commit record may not be written out yet), after halephant's own
clean-up of the server if there is one (emulated LISTEN and PREPARE); for the window after that, the
client's replica-routed transactions go only to a replica whose replayed LSN (as last probed) has
reached it, else to the primary. Until the answer arrives, the client counts as not caught up anywhere.
With the feature off nothing of this runs: the check on the transaction path is one empty-dict test.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from halephant import sqlstate
from halephant.errors import ClientError
from halephant.pool.group import PoolGroup
from halephant.pool.pool import Pool
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import split_frames
from halephant.protocol.session_queries import decode_data_row
from halephant.proxy.stand_in import StandIn
from halephant.topology.monitor import TopologyMonitor
from halephant.topology.probe import parse_lsn
from halephant.topology.state import SPLIT_BRAIN, configured_view
from halephant.types import ClusterView, Config, NodeInfo, PoolTarget, Reject, Role

if TYPE_CHECKING:
    from halephant.proxy.client import ClientConnection
    from halephant.proxy.manager import PoolManager
    from halephant.proxy.server import ServerConnection

    ServerPool = Pool[ServerConnection, ClientConnection]
    Group = PoolGroup[ServerConnection, ClientConnection]

log = logging.getLogger("halephant.pool")

_PRIMARY = Role.PRIMARY  # enum member lookups cost ~60 ns; pool_for runs per transaction
#: a client whose write's LSN is not known yet: no replica has reached it
_PENDING = 1 << 64
_LSN_QUERY = m.query("SELECT pg_current_wal_insert_lsn()")


def _address(host: str, port: int) -> str:
    return f"{host}:{port}"  # as in Pool.key


def _group_of(client: ClientConnection) -> str | None:
    """The wait-queue group of a client (its user name), as the client itself queues."""
    return client.info.user if client.info is not None else None


def database_removed(database: str) -> ClientError:
    """What a client of a database that a reload removed is told (FATAL 57P01)."""
    return ClientError(
        sqlstate.ADMIN_SHUTDOWN,
        f'terminating connection: database "{database}" was removed from the halephant configuration',
        fatal=True,
    )


class Nodes:
    def __init__(self, manager: PoolManager) -> None:
        self.manager = manager
        self.app = manager.app
        self.topology = TopologyMonitor(self.app.config, self.publish)
        self.views: dict[str, ClusterView] = self.topology.views()
        self.groups: dict[tuple[str, str], Group] = {}
        self._shapes: dict[str, tuple[tuple[str, Role | None, bool], ...]] = {}
        #: the last probed WAL position of each node ("host:port"), for read-your-writes
        self._lsn: dict[str, int] = {}
        #: read-your-writes: client -> (LSN its reads must see, until when)
        self.ryw: dict[ClientConnection, tuple[int, float]] = {}
        #: the address of each cluster's last elected primary ("host:port"), to fence when another is
        self._primaries: dict[str, str] = {}

    # --- the transaction path ---

    def view(self, name: str) -> ClusterView:
        view = self.views.get(name)
        if view is None:  # a cluster the monitor does not know (added by a reload): configured order
            view = self.views[name] = configured_view(name, self.app.config.clusters[name])
        return view

    def pool_for(
        self, target: PoolTarget, role: Role, client: ClientConnection | None = None
    ) -> ServerPool | None:
        """The pool that gets a transaction for `role`; None when no node can take it (no usable
        replica). With no primary known, the pool returned only queues, until one appears."""
        group = self.groups.get((target.database, target.pool_user))
        generation = client.config_generation if client is not None else -1
        if group is None or group.cluster != target.cluster:
            group = self._new_group(target)
            group.generation = generation
        elif group.target is not target and generation >= group.generation:
            # A reload handed new clients a new target: the pools log in with it from now on. The
            # clients from before keep theirs, but must not switch the pools back (and forth: every
            # switch replaces the servers, when what they log in with changed).
            group.generation = generation
            self._retarget(group, target)
        if role is _PRIMARY:
            return group.primary or group.waiting_for_primary
        if not group.wants_replicas:  # the first transaction of these clients routed to a replica
            group.wants_replicas = True
            self._assign(group, self.view(group.cluster))
        pools = group.replicas
        if not pools:
            return None
        if self.ryw and client is not None:
            entry = self.ryw.get(client)
            if entry is not None:
                return self._caught_up(group, client, entry)
        return group.pick_replica()

    def primary_pool(self, target: PoolTarget) -> ServerPool:
        """The pool of the current primary (while none is known, one that only queues: host "")."""
        group = self.groups.get((target.database, target.pool_user))
        if group is None or group.cluster != target.cluster:
            group = self._new_group(target)
        return group.primary or group.waiting_for_primary

    def unavailable(self, target: PoolTarget, role: Role) -> Reject:
        """The error for a transaction routed to `role` when no node of the cluster can take it."""
        return Reject(
            sqlstate.CANNOT_CONNECT_NOW,
            f"no {role} of cluster {target.cluster} is available",
            hint="The nodes are down, failing over, or (replicas) too far behind; retry later.",
            reason=f"no usable {role} in cluster {target.cluster}",
        )

    def _caught_up(self, group: Group, client: ClientConnection, entry: tuple[int, float]) -> ServerPool:
        lsn, until = entry
        if self.app.loop.time() > until:
            del self.ryw[client]
            return group.pick_replica()  # type: ignore[return-value]  # replicas is not empty here
        replicas = group.replicas
        lsns = self._lsn
        caught_up = [p for p in replicas if lsns.get(p.key[2], -1) >= lsn]
        if len(caught_up) == len(replicas):
            return group.pick_replica()  # type: ignore[return-value]
        # A newer probe may show a replica that caught up: ask for one for the next transactions.
        self.topology.probe_soon(group.cluster)
        # Only a replica with a server free now: a queued client could be served by any replica.
        free = [p for p in caught_up if p.idle]
        if free:
            return group.pick_replica(free)  # type: ignore[return-value]
        if self.app.debug:
            log.debug("%r: read-your-writes: no replica has replayed LSN %d yet: primary", client, lsn)
        return group.primary or group.waiting_for_primary

    # --- pools and groups ---

    def _new_group(self, target: PoolTarget) -> Group:
        config = self.app.config
        if config.database_for(target.entry_name) is None:
            # a reload removed it while this client stayed connected: what the client sweep tells the
            # idle ones, told here to one that got its next query in first
            raise database_removed(target.database)
        cluster = config.clusters.get(target.cluster)
        if cluster is None:  # a reload removed it while this client stayed connected
            raise ClientError(
                sqlstate.ADMIN_SHUTDOWN,
                f'terminating connection: cluster "{target.cluster}" was removed from the configuration',
                fatal=True,
            )
        group: Group = PoolGroup(target)
        self.groups[(target.database, target.pool_user)] = group
        self._assign(group, self.view(target.cluster))
        return group

    def _retarget(self, group: Group, target: PoolTarget) -> None:
        # A reload hands new clients a new target (a password, a pool mode): the node pools take it
        # up as the pool manager decides (`node_pool`).
        group.target = target
        for pool in group.pools.values():
            self.manager.node_pool(target, pool.host, pool.port)

    def reconfigure(self, config: Config) -> None:
        """A reload (after the pool manager retired the pools of removed databases and nodes): the
        probes follow the new clusters, and each group is pointed at the pools of its cluster's nodes."""
        self.topology.reconfigure(config)
        self.views = {name: state.view for name, state in self.topology.states.items()}
        self._shapes.clear()
        for key, group in list(self.groups.items()):
            cluster = config.clusters.get(group.cluster)
            db = config.database_for(group.target.entry_name)
            if cluster is None or db is None:
                del self.groups[key]
                for pool in group.pools.values():
                    pool.serves = None
                continue
            pools = {
                address: self.manager.node_pool(group.target, n.host, n.port)
                for n in cluster.nodes
                if (address := _address(n.host, n.port)) in group.pools
            }
            for address, pool in group.pools.items():
                if pools.get(address) is not pool:
                    pool.serves = None  # retired: clients that cached it look the primary up again
            group.pools = pools
            self._assign(group, self.view(group.cluster))

    def forget_group(self, key: tuple[str, str]) -> None:
        """The pools of (database, user) were forgotten (unused catch-all pools)."""
        self.groups.pop(key, None)

    def _assign(self, group: Group, view: ClusterView) -> None:
        primary = view.primary
        # pools for the nodes that serve what these clients use (no replica pools for write-only users)
        for node in (primary, *(view.replicas if group.wants_replicas else ())):
            if node is not None and _address(node.host, node.port) not in group.pools:
                group.pools[_address(node.host, node.port)] = self.manager.node_pool(
                    group.target, node.host, node.port
                )
        displaced = group.assign(
            _address(primary.host, primary.port) if primary is not None else None,
            [_address(node.host, node.port) for node in view.replicas],
        )
        for pool in group.pools.values():
            db = self.app.config.database_for(pool.info.target.entry_name)
            pool.track_lsn = pool.serves is Role.PRIMARY and db is not None and db.read_your_writes
        for waiter in displaced:
            self._to_primary(group, waiter)
        if group.replica_waiters and group.replicas:
            # A waiter queued by a replica that serves no more stays in the shared queue for the others:
            # its waiting pool must be one of theirs, whose queue a cancel or checkout timeout takes it
            # out of (the excluded pool's queue is its own again). With none left, it is routed again
            # after this round (`_serve_replica_waiters`).
            serving = group.replicas[0]
            for waiter in group.replica_waiters:
                queued_by = waiter.waiting_pool
                if queued_by is not None and queued_by.serves is not Role.REPLICA:
                    waiter.waiting_pool = serving
        if group.replica_waiters:
            # a replica that was opening connections for them may have just been excluded
            replica = group.pick_replica()
            if replica is not None and replica.should_open_for_waiters():
                self.manager.open(replica)

    def _to_primary(self, group: Group, waiter: ClientConnection) -> None:
        """Hand a client waiting for the primary to the current one, or park it until there is one."""
        pool = group.primary
        if pool is None:
            parked = group.waiting_for_primary
            parked.waiters.append(waiter, _group_of(waiter))
            waiter.waiting_pool = parked
            return
        server, open_one = pool.checkout(waiter, _group_of(waiter))
        if server is not None:
            self.manager.hand_over(waiter, server)
            return
        waiter.waiting_pool = pool
        if open_one:
            self.manager.open(pool)

    def publish(self, name: str, view: ClusterView) -> None:
        """The monitor's latest view of cluster `name` (called after every round of probes)."""
        state = self.topology.states.get(name)
        if state is not None:
            self._close_idle_on_refusing(name, state.refusing_sessions())
        if self.views.get(name) is view:
            return  # every probe failed: the last known topology stands, nothing to do
        self.views[name] = view
        for node in view.nodes:
            if node.lsn is not None:
                self._lsn[_address(node.host, node.port)] = node.lsn
        shape = tuple((node.name, node.role, node.usable) for node in view.nodes)
        changed = shape != self._shapes.get(name)
        self._shapes[name] = shape
        if changed:
            self._fence(view)
        for group in list(self.groups.values()):
            if group.cluster != name:
                continue
            if changed:
                self._assign(group, view)
            parked = group.waiting_for_primary.waiters
            if parked and group.primary is not None:
                waiters = list(parked)
                parked.clear()
                for waiter in waiters:
                    self._to_primary(group, waiter)
            if group.replica_waiters:
                self._serve_replica_waiters(group)

    def _close_idle_on_refusing(self, cluster: str, nodes: list[NodeInfo]) -> None:
        """Close the idle server connections to nodes that refuse new sessions (57P03): in a smart
        shutdown PostgreSQL waits for every session to end, and pooled connections nobody uses would
        hold it up until their idle_timeout, or for ever while new transactions kept taking them. Such a
        node is down for the probes, so no new transaction is routed there, unless it is the cluster's
        only node (the last known topology is kept): those wait for a server as for a node that is
        down. Servers in use are left to their clients, as the shutdown means them to be: each is
        closed by the first round that finds it idle. So is a shared LISTEN connection there that no
        client listens on any more (`Listeners.release_unused`)."""
        for node in nodes:
            address = _address(node.host, node.port)
            self.app.listeners.release_unused(cluster, address, f"{address} takes no new sessions")
            for pool in list(self.manager.pools.values()):
                if pool.key[2] != address or pool.info.target.cluster != cluster or not pool.idle:
                    continue
                servers = list(pool.idle)
                log.warning(
                    "pool %s: closing %d idle server connection(s): %s takes no new sessions (57P03)",
                    pool.name,
                    len(servers),
                    address,
                )
                for server in servers:
                    server.close(f"{address} takes no new sessions")

    def _serve_replica_waiters(self, group: Group) -> None:
        """After a round of probes: the clients waiting for a replica server get one opened for them, or,
        with no replica left, are routed again, as a client arriving now is (the policy may fall back
        to the primary): what they sent has started nowhere."""
        if group.replicas:
            replica = group.pick_replica()
            if replica is not None and replica.should_open_for_waiters():
                self.manager.open(replica)
            return
        log.info(
            "cluster %s: no replica left: %d waiting client(s) routed again",
            group.cluster,
            len(group.replica_waiters),
        )
        self._route_replica_waiters_again(group)

    @staticmethod
    def _route_replica_waiters_again(group: Group) -> None:
        waiters = list(group.replica_waiters)
        group.replica_waiters.clear()
        for waiter in waiters:
            pool = waiter.waiting_pool
            if pool is None or waiter in pool.waiters:
                continue  # no longer waiting for a replica (it stopped waiting, left, or waits elsewhere)
            # waiting for a replica, now in no queue (its pool may even be the primary, promoted)
            waiter.waiting_pool = None
            waiter.reroute()

    def _fence(self, view: ClusterView) -> None:
        """Cut every server connection to a node that is no longer the primary: one that claims to be
        primary but lost to another, and the last primary once another node is: a client in a
        transaction there (or holding its server for its session) would go on writing to it, and one
        whose COMMIT waits on a frozen node would see it succeed there later. Its clients get 08006."""
        fenced: dict[str, tuple[str, bool]] = {}  # address -> (why, spare its replica pools)
        for node in view.nodes:
            if node.role is Role.PRIMARY and not node.usable and node.reason.startswith(SPLIT_BRAIN):
                fenced[_address(node.host, node.port)] = (node.reason, False)
        primary = view.primary
        if primary is not None:
            now = _address(primary.host, primary.port)
            last = self._primaries.get(view.name)
            self._primaries[view.name] = now
            if last is not None and last != now:
                # it may be a replica again by now: its replica pools are spared
                fenced.setdefault(
                    last, (f"{last} is no longer the primary of cluster {view.name}: {now} is", True)
                )
        for address, (reason, as_primary) in fenced.items():
            for pool in list(self.manager.pools.values()):
                if (
                    pool.key[2] != address
                    or pool.info.target.cluster != view.name
                    or not (pool.idle or pool.active)
                ):
                    continue
                if as_primary and pool.serves is Role.REPLICA:
                    continue  # connected to it since it rejoined as a replica
                log.warning(
                    "pool %s: closing its %d server connection(s): %s",
                    pool.name,
                    len(pool.idle) + len(pool.active),
                    reason,
                )
                for server in [*pool.idle, *pool.active]:
                    server.fence(reason)
            self.app.listeners.fence(view.name, address, reason)

    # --- I/O outcomes ---

    def connect_failed(self, pool: ServerPool, error: ClientError, node_failed: bool) -> None:
        """Opening a server connection for `pool` failed; `node_failed`: the node did not answer (as
        opposed to refusing the login), so the topology is probed again at once."""
        target = pool.info.target
        group = self.groups.get((target.database, target.pool_user))
        if node_failed:
            self.topology.probe_soon(target.cluster)
        served_elsewhere = False
        if group is not None and pool.serves is Role.REPLICA:
            # the replicas share their waiters: another one that is serving will get to them
            others = [p for p in group.replicas if p is not pool]
            if pool.login_refused is not None and any(p.login_refused is None for p in others):
                # This replica refused the login (at max_connections: 53300; pg_hba.conf; a CONNECTION
                # LIMIT) and another may not: its waiters are routed again, and `pick_replica` passes
                # it by until server_login_retry has passed.
                pool.connect_failed(True)
                self._route_replica_waiters_again(group)
                return
            served_elsewhere = any(p.active or p.idle or p.connecting for p in others)
            if node_failed and others and not served_elsewhere:
                other = group.pick_replica(others)
                if other is not None and other.should_open_for_waiters():
                    self.manager.open(other)
                    served_elsewhere = True
        failed = pool.connect_failed(served_elsewhere)
        state = self.topology.states.get(target.cluster)
        # With no node answering the probes there is nothing to wait for: fail them as without probes.
        probed = state is not None and state.probed and not state.all_failed
        if node_failed and probed and group is not None and pool.serves is not None and failed:
            # The node may be failing over or going down: its clients wait for the probes rather than
            # fail now. A primary's are parked until the probes find a primary (or their checkout_timeout
            # passes: 57P03); a replica's go back to the replicas' queue, served by a replica that
            # answers, or routed again if none is left (`_serve_replica_waiters`).
            role = "primary" if pool.serves is Role.PRIMARY else "replica"
            log.warning(
                "pool %s: the %s did not answer; %d client(s) wait for the probes",
                pool.name,
                role,
                len(failed),
            )
            for waiter in failed:
                if pool.serves is Role.PRIMARY:
                    group.waiting_for_primary.waiters.append(waiter, _group_of(waiter))
                    waiter.waiting_pool = group.waiting_for_primary
                else:
                    group.replica_waiters.append(waiter, _group_of(waiter))
            return
        for waiter in failed:
            waiter.checkout_failed(error)

    def expire(self, now: float) -> None:
        """Fail the clients parked for a primary whose checkout_timeout passed (57P03)."""
        for group in self.groups.values():
            parked = group.waiting_for_primary.waiters
            if not parked:
                continue
            for waiter in parked.pop_while(lambda w: w.wait_deadline <= now):
                log.warning("%r: no primary in cluster %s within checkout_timeout", waiter, group.cluster)
                waiter.checkout_failed(
                    ClientError(
                        sqlstate.CANNOT_CONNECT_NOW,
                        f"no primary of cluster {group.cluster} is available",
                        hint="The primary is down or failing over; retry later.",
                    )
                )

    def forget_expired(self, now: float) -> None:
        if self.ryw:
            for client in [c for c, (_, until) in self.ryw.items() if until < now]:
                del self.ryw[client]

    # --- read-your-writes ---

    def lsn_pending(self, server: ServerConnection, client: ClientConnection) -> float:
        """A client's transaction ended on the primary `server`: until its WAL position is known, no
        replica counts as having reached it. Returns when read-your-writes ends for it."""
        db = self.app.config.database_for(server.pool.info.target.entry_name)
        window = db.read_your_writes_window if db is not None else 10.0
        until = self.app.loop.time() + window
        self.ryw[client] = (_PENDING, until)
        return until

    def learn_lsn(self, server: ServerConnection, client: ClientConnection) -> None:
        """A client's transaction ended on the primary: ask the server for its WAL position, then check
        the server in."""
        until = self.lsn_pending(server, client)
        server.client = _LsnQuery(self, server, client, until)  # type: ignore[assignment]
        server.send(_LSN_QUERY)


class _LsnQuery(StandIn):
    """Stands in for the client while its primary server answers `SELECT pg_current_wal_insert_lsn()`."""

    __slots__ = ("_buf", "client", "nodes", "server", "transport", "until")

    def __init__(
        self, nodes: Nodes, server: ServerConnection, client: ClientConnection, until: float
    ) -> None:
        self.nodes = nodes
        self.server = server
        self.client = client
        self.until = until
        self._buf = b""
        self.transport = self  # the server relays its answer here: write() collects it

    def write(self, data: bytes) -> None:
        self._buf += data

    def pause_reading(self) -> None:
        pass

    def server_ready(self, n: int, status: int, at_boundary: bool) -> None:
        server = self.server
        server.client = None
        lsn = self._lsn()
        entry = self.nodes.ryw.get(self.client)
        if lsn is not None and entry is not None and entry[0] == _PENDING:
            self.nodes.ryw[self.client] = (lsn, self.until)
            if self.nodes.app.debug:
                log.debug(
                    "%r: read-your-writes: reads must see LSN %X/%X", self.client, lsn >> 32, lsn & 0xFFFFFFFF
                )
        if status == codes.TX_IDLE and at_boundary:
            self.nodes.manager.checkin(server)
        else:
            server.close("read-your-writes query left the server in a transaction")

    def _lsn(self) -> int | None:
        try:
            frames, _ = split_frames(self._buf, 1 << 20)
            for t, start, end in frames:
                if t == codes.DATA_ROW:
                    value = decode_data_row(self._buf[start:end])[0]
                    return parse_lsn(value) if value is not None else None
        except Exception:  # a garbled answer: the client stays pinned to the primary for the window
            log.warning("server %s: could not read pg_current_wal_insert_lsn()", self.server, exc_info=True)
        return None
