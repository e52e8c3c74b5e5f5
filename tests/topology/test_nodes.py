"""Node selection as the pool manager does it (`halephant.proxy.nodes.Nodes`), with published views and fake
clients, no I/O: clients parked while there is no primary, handed to one when it appears, failed with 57P03
when their checkout_timeout passes; no usable replica; a failed connect to the primary; read-your-writes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest

from halephant import sqlstate
from halephant.config import read_config_text, validate_config
from halephant.errors import ClientError
from halephant.proxy.manager import PoolManager
from halephant.types import ClusterView, NodeInfo, PoolMode, PoolSize, PoolTarget, Role

P, R1, R2 = ("127.0.0.1", 5001), ("127.0.0.1", 5002), ("127.0.0.1", 5003)
CONFIG = """\
clusters:
  main:
    nodes: [127.0.0.1:5001, 127.0.0.1:5002, 127.0.0.1:5003]
databases:
  myapp: {cluster: main, pool_size: 2, read_your_writes: true}
users:
  myapp: {password: secret}
"""
TARGET = PoolTarget("myapp", "main", "myapp", "myapp", "secret", PoolMode.TRANSACTION, "test")


class FakeLoop:
    now = 100.0

    def time(self) -> float:
        return self.now


@dataclass(eq=False)
class FakeClient:
    name: str
    info: Any = None
    wait_deadline: float = 1000.0
    waiting_pool: Any = None
    servers: list[Any] = field(default_factory=list)
    errors: list[ClientError] = field(default_factory=list)
    rerouted: int = 0
    config_generation: int = 0

    def attach_server(self, server: Any) -> None:
        self.waiting_pool = None
        self.servers.append(server)

    def checkout_failed(self, error: ClientError) -> None:
        self.waiting_pool = None
        self.errors.append(error)

    def reroute(self) -> None:
        self.rerouted += 1


@pytest.fixture
def manager() -> PoolManager:
    config = validate_config(read_config_text(CONFIG, "halephant.yaml"))
    plugins = SimpleNamespace(pool_size=lambda target, config: PoolSize(0, 2))
    app = SimpleNamespace(config=config, plugins=plugins, loop=FakeLoop(), debug=False, opened=[])
    app.spawn = lambda func, *args: app.opened.append(args[0])
    app.fenced = []  # nodes whose shared LISTEN connections were cut
    app.listeners = SimpleNamespace(fence=lambda cluster, address, reason: app.fenced.append(address))
    return PoolManager(app)  # type: ignore[arg-type]


def node(where: tuple[str, int], role: Role | None, usable: bool = True, lsn: int | None = None) -> NodeInfo:
    return NodeInfo(f"{where[0]}:{where[1]}", *where, role, usable, lsn=lsn, reason="test")


def publish(manager: PoolManager, *nodes: NodeInfo) -> None:
    manager.nodes.topology.states["main"].probed = True
    manager.nodes.publish("main", ClusterView("main", nodes))


def wait(manager: PoolManager, client: FakeClient, role: Role) -> Any:
    pool = manager.pool_for(TARGET, role, client)  # type: ignore[arg-type]
    assert pool is not None
    server, _ = pool.checkout(client)
    assert server is None
    client.waiting_pool = pool
    return pool


def test_parked_until_a_primary_appears(manager: PoolManager) -> None:
    publish(manager, node(P, Role.PRIMARY, usable=False), node(R1, Role.REPLICA))
    client = FakeClient("c")
    parked = wait(manager, client, Role.PRIMARY)
    assert parked.host == "" and parked.info.size.max == 0
    assert manager.app.opened == []  # type: ignore[attr-defined]  # nothing to connect to
    publish(manager, node(P, Role.PRIMARY, usable=False), node(R1, Role.PRIMARY))
    primary = manager.pools[("myapp", "myapp", "127.0.0.1:5002")]
    assert client.waiting_pool is primary and list(primary.waiters) == [client]
    assert manager.app.opened == [primary]  # type: ignore[attr-defined]


def test_parked_too_long_gets_57P03(manager: PoolManager) -> None:
    publish(manager, node(P, None, usable=False), node(R1, Role.REPLICA))
    client = FakeClient("c", wait_deadline=5.0)
    wait(manager, client, Role.PRIMARY)
    manager.nodes.expire(4.0)
    assert client.errors == []
    manager.nodes.expire(5.0)
    assert [e.code for e in client.errors] == [sqlstate.CANNOT_CONNECT_NOW]
    assert "no primary of cluster main" in client.errors[0].message


def test_no_usable_replica(manager: PoolManager) -> None:
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA, usable=False))
    assert manager.pool_for(TARGET, Role.REPLICA) is None
    reject = manager.nodes.unavailable(TARGET, Role.REPLICA)
    assert (reject.code, reject.message) == (
        sqlstate.CANNOT_CONNECT_NOW,
        "no replica of cluster main is available",
    )


def test_replica_waiters_are_routed_again_when_the_last_replica_goes(manager: PoolManager) -> None:
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA))
    client, gone = FakeClient("c"), FakeClient("gone")
    wait(manager, client, Role.REPLICA)
    wait(manager, gone, Role.REPLICA)
    gone.waiting_pool = None  # stopped waiting (cancelled, or left) while still queued
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA, usable=False))
    assert (client.rerouted, client.errors, client.waiting_pool) == (1, [], None)
    assert gone.rerouted == 0


def test_a_replica_waiter_is_routed_again_when_its_replica_is_promoted(manager: PoolManager) -> None:
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA))
    client = FakeClient("c")
    replica = wait(manager, client, Role.REPLICA)
    publish(manager, node(P, None, usable=False), node(R1, Role.PRIMARY))
    assert replica.serves is Role.PRIMARY  # its pool serves as the primary now, with a queue of its own
    assert client.rerouted == 1


def test_a_replica_waiter_whose_replica_goes_can_still_stop_waiting(manager: PoolManager) -> None:
    # two replicas share one queue: a waiter whose own replica is excluded stays queued for the other,
    # and a cancel or checkout timeout (`cancel_wait` on its waiting pool) must still take it out
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA), node(R2, Role.REPLICA))
    client = FakeClient("c")
    first = wait(manager, client, Role.REPLICA)
    publish(
        manager,
        node(P, Role.PRIMARY),
        *(node(where, Role.REPLICA, usable=where != (first.host, first.port)) for where in (R1, R2)),
    )
    other = client.waiting_pool
    assert other is not first and other.serves is Role.REPLICA and client in other.waiters
    other.cancel_wait(client)
    assert client not in other.waiters  # nobody hands it a server once it stopped waiting


def test_a_failed_replica_connect_leaves_its_waiters_to_the_probes(manager: PoolManager) -> None:
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA))
    client = FakeClient("c")
    replica = wait(manager, client, Role.REPLICA)
    replica.connecting = 1
    error = ClientError(sqlstate.CONNECTION_FAILURE, "could not connect")
    manager.nodes.connect_failed(replica, error, node_failed=True)
    assert client.errors == [] and client.waiting_pool is replica
    manager.app.opened.clear()
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA, lsn=1))  # it answers the probes again
    assert manager.app.opened == [replica]  # opened for the waiter
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA, usable=False))
    assert client.rerouted == 1


def test_clients_from_before_a_reload_do_not_switch_the_pools_back(manager: PoolManager) -> None:
    # a reload made the user read-only: new clients carry a target whose servers start read-only
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA))
    old = FakeClient("old")
    pool = manager.pool_for(TARGET, Role.PRIMARY, old)  # type: ignore[arg-type]
    assert pool is not None and pool.info.target is TARGET
    read_only = replace(TARGET, server_settings=(("default_transaction_read_only", "on"),))
    new = FakeClient("new", config_generation=1)
    assert manager.pool_for(read_only, Role.PRIMARY, new) is pool  # type: ignore[arg-type]
    assert pool.info.target is read_only
    for client, target in [(old, TARGET), (new, read_only), (old, TARGET)]:
        assert manager.pool_for(target, Role.PRIMARY, client) is pool  # type: ignore[arg-type]
        assert pool.info.target is read_only  # never back to the old one's read-write servers


def test_waiters_follow_the_primary(manager: PoolManager) -> None:
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA))
    client = FakeClient("c")
    old = wait(manager, client, Role.PRIMARY)
    publish(manager, node(P, Role.PRIMARY, usable=False), node(R1, Role.PRIMARY))
    assert client.waiting_pool is not old and client.waiting_pool.port == R1[1]
    assert old.serves is None and client.waiting_pool.serves is Role.PRIMARY
    assert manager.app.fenced == [f"{P[0]}:{P[1]}"]  # the last primary is cut off: another one is


def test_pause_holds_the_clients_parked_for_a_primary(manager: PoolManager) -> None:
    from halephant.admin.control import Control

    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA))
    client = FakeClient("c")
    primary = wait(manager, client, Role.PRIMARY)
    primary.connecting = 1
    manager.nodes.connect_failed(primary, ClientError(sqlstate.CONNECTION_FAILURE, "no"), node_failed=True)
    parked = client.waiting_pool
    assert parked.key[2] == "(no primary)" and client in parked.waiters
    control = Control(manager.app)  # type: ignore[arg-type]
    manager.app.manager = manager
    control.pause("myapp")
    assert client not in parked.waiters and client.waiting_pool is parked  # held, not handed a primary
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA, lsn=1))  # the primary is back
    assert client.servers == [] and client.waiting_pool is parked


def test_failed_connect_to_the_primary_parks_its_clients(manager: PoolManager) -> None:
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA))
    client = FakeClient("c")
    primary = wait(manager, client, Role.PRIMARY)
    primary.connecting = 1
    error = ClientError(sqlstate.CONNECTION_FAILURE, "could not connect")
    manager.nodes.connect_failed(primary, error, node_failed=True)
    assert client.errors == [] and client.waiting_pool.host == ""
    # a refused login is not the node failing: the client gets the error
    other = FakeClient("d")
    publish(manager, node(P, Role.PRIMARY), node(R1, Role.REPLICA, lsn=1))
    primary = wait(manager, other, Role.PRIMARY)
    primary.connecting = 1
    manager.nodes.connect_failed(primary, error, node_failed=False)
    assert other.errors == [error]


def test_read_your_writes_sends_reads_to_the_primary_until_a_replica_caught_up(manager: PoolManager) -> None:
    publish(
        manager,
        node(P, Role.PRIMARY, lsn=500),
        node(R1, Role.REPLICA, lsn=100),
        node(R2, Role.REPLICA, lsn=300),
    )
    client = FakeClient("c")
    replica_ports = {R1[1], R2[1]}
    pool = manager.pool_for(TARGET, Role.REPLICA, client)  # type: ignore[arg-type]
    assert pool is not None and pool.port in replica_ports  # no write yet
    manager.nodes.ryw[client] = (400, 110.0)  # type: ignore[index]
    pool = manager.pool_for(TARGET, Role.REPLICA, client)  # type: ignore[arg-type]
    assert pool is not None and pool.port == P[1]
    # a replica that replayed it and has a free server takes it
    publish(
        manager,
        node(P, Role.PRIMARY, lsn=500),
        node(R1, Role.REPLICA, lsn=100),
        node(R2, Role.REPLICA, lsn=450),
    )
    r2 = manager.pools[("myapp", "myapp", "127.0.0.1:5003")]
    r2.idle.append(SimpleNamespace(idle_since=0.0, created_at=0.0))  # type: ignore[arg-type]
    pool = manager.pool_for(TARGET, Role.REPLICA, client)  # type: ignore[arg-type]
    assert pool is r2
    # after the window, any replica again, and the entry is gone
    manager.app.loop.now = 111.0  # type: ignore[attr-defined]
    pool = manager.pool_for(TARGET, Role.REPLICA, client)  # type: ignore[arg-type]
    assert pool is not None and pool.port in replica_ports
    assert client not in manager.nodes.ryw  # type: ignore[comparison-overlap]
