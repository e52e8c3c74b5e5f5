"""Topology decisions (`halephant.topology.state.ClusterState`) from made-up probe outcomes: role discovery,
split brain, lag limits, nodes going down, every probe failing. No I/O."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from halephant.config.schema import ClusterConfig
from halephant.topology import state as state_module
from halephant.topology.probe import ProbeResult
from halephant.topology.state import ClusterState, format_bytes
from halephant.types import Role

A, B, C = "127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"
MB = 1024 * 1024


def state(**settings: Any) -> ClusterState:
    return ClusterState("main", ClusterConfig.model_validate({"nodes": [A, B, C], **settings}))


def primary(lsn: int = 100 * MB, timeline: int = 1) -> ProbeResult:
    return ProbeResult(in_recovery=False, lsn=lsn, replay_age=None, timeline=timeline)


def replica(lsn: int = 100 * MB, age: float | None = 0.0, timeline: int = 1) -> ProbeResult:
    return ProbeResult(in_recovery=True, lsn=lsn, replay_age=age, timeline=timeline)


def roles(s: ClusterState) -> list[tuple[str, Role | None, bool]]:
    return [(n.name, n.role, n.usable) for n in s.view.nodes]


def test_configured_order_until_probed() -> None:
    s = state()
    assert roles(s) == [(A, Role.PRIMARY, True), (B, Role.REPLICA, True), (C, Role.REPLICA, True)]
    assert s.view.primary is not None and s.view.primary.name == A
    assert [n.probed_at for n in s.view.nodes] == [None, None, None]


def test_each_probe_round_stamps_its_nodes() -> None:
    s = state()
    before = time.time()
    s.update([primary(), "could not connect: Connection refused", replica()])
    assert all(n.probed_at is not None and before <= n.probed_at <= time.time() for n in s.view.nodes)


def test_roles_come_from_the_probes(caplog: pytest.LogCaptureFixture) -> None:
    s = state()
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([replica(), primary(), replica()])
    assert roles(s) == [(A, Role.REPLICA, True), (B, Role.PRIMARY, True), (C, Role.REPLICA, True)]
    assert s.view.primary is not None and s.view.primary.name == B
    assert [n.name for n in s.view.replicas] == [A, C]
    assert f"cluster main: primary {B}" in caplog.text
    # later role changes are logged as such
    caplog.clear()
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update(["no answer within 3s", replica(), primary(timeline=2)])
    assert f"{C} is now primary (was replica)" in caplog.text
    assert f"{B} is now replica (was primary)" in caplog.text
    assert f"node {A} marked down" in caplog.text


def test_a_node_that_fails_its_probe_is_down_and_keeps_its_role(caplog: pytest.LogCaptureFixture) -> None:
    s = state()
    s.update([primary(), replica(), replica()])
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([primary(), "could not connect: Connection refused", replica()])
    node = s.view.nodes[1]
    assert (node.role, node.usable) == (Role.REPLICA, False)
    assert node.reason == f"{B} is down: could not connect: Connection refused"
    assert f"probe of {B} failed: could not connect: Connection refused" in caplog.text
    assert f"node {B} marked down" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([primary(), replica(), replica()])
    assert s.view.nodes[1].usable
    assert f"{B} readmitted" in caplog.text


def test_nodes_refusing_sessions_are_listed_even_when_every_probe_failed() -> None:
    s = state()
    s.update([primary(), replica(), replica()])
    assert s.refusing_sessions() == []
    shutting_down = "the database system is shutting down (57P03)"
    s.update([shutting_down, "could not connect: Connection refused", replica()])
    assert [n.name for n in s.refusing_sessions()] == [A]
    s.update([shutting_down, shutting_down, shutting_down])  # the last known topology is kept
    assert [n.name for n in s.refusing_sessions()] == [A, B, C]
    s.update([primary(), "no answer within 3s", "probe query failed: out of memory (53200)"])
    assert s.refusing_sessions() == []


def test_every_probe_failing_keeps_the_last_topology(caplog: pytest.LogCaptureFixture) -> None:
    s = state()
    s.update([replica(), primary(), replica()])
    before = s.view
    with caplog.at_level(logging.INFO, "halephant.topology"):
        assert s.update(["timeout", "timeout", "timeout"]) is before
        assert s.update(["timeout", "timeout", "timeout"]) is before
    assert caplog.text.count("every probe failed; keeping the last known topology") == 1
    assert s.view.primary is not None and s.view.primary.name == B


def test_split_brain_goes_to_the_highest_timeline(caplog: pytest.LogCaptureFixture) -> None:
    s = state()
    s.update([primary(), replica(), replica()])
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([primary(timeline=1), primary(timeline=2), replica()])
    assert s.view.primary is not None and s.view.primary.name == B
    loser = s.view.nodes[0]
    assert (loser.role, loser.usable) == (Role.PRIMARY, False)
    assert "split brain" in loser.reason
    assert [n.name for n in s.view.nodes if n.role is Role.PRIMARY and n.usable] == [B]
    assert "split brain" in caplog.text and f"writes go to {B} only" in caplog.text
    # logged once while it lasts
    caplog.clear()
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([primary(timeline=1), primary(timeline=2), replica()])
    assert "split brain:" not in caplog.text


def test_an_old_primary_is_never_elected_again_when_the_new_one_misses_a_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = state()
    s.update([primary(), replica(), replica()])
    s.update([primary(timeline=1), primary(timeline=2), replica()])  # B promoted, A still up
    assert s.view.primary is not None and s.view.primary.name == B
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([primary(timeline=1), "connection refused", replica()])  # B restarting, say
    assert s.view.primary is None  # writes wait for B: they would be lost on A
    stale = s.view.nodes[0]
    assert (stale.role, stale.usable) == (Role.PRIMARY, False)
    assert stale.reason.startswith("split brain: ")  # so its server connections are closed
    assert "a primary on timeline 2 was seen" in caplog.text
    s.update([primary(timeline=1), primary(timeline=2), replica()])
    assert s.view.primary is not None and s.view.primary.name == B
    # once the old primary rejoins on the new timeline, it may be elected again later
    s.update([primary(timeline=3), replica(timeline=3), replica(timeline=3)])
    assert s.view.primary is not None and s.view.primary.name == A


def test_split_brain_on_one_timeline_keeps_the_current_primary() -> None:
    s = state()
    s.update([replica(), primary(), replica()])
    s.update([primary(), primary(), replica()])
    assert s.view.primary is not None and s.view.primary.name == B


def test_lag_limits_exclude_replicas_never_the_primary(caplog: pytest.LogCaptureFixture) -> None:
    s = state(max_lag_bytes="8MB", max_lag="30s")
    # C is behind every position the probes saw the primary at: its replay age is all there is to go by
    s.update([primary(lsn=20 * MB), replica(lsn=20 * MB), replica(lsn=19 * MB, age=31.0)])
    assert len(s.view.replicas) == 2  # over max_lag once: maybe just a record waiting on an idle primary
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([primary(lsn=20 * MB), replica(lsn=8 * MB), replica(lsn=19 * MB, age=31.0)])
    a, b, c = s.view.nodes
    assert a.usable and a.role is Role.PRIMARY
    assert (b.usable, b.lag_bytes, b.reason) == (False, 12 * MB, f"replica {B} lag 12 MB > 8 MB")
    assert (c.usable, c.lag_seconds, c.reason) == (False, 31.0, f"replica {C} lag 31.0s > 30s")
    assert s.view.replicas == ()
    caplog.clear()
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([primary(lsn=21 * MB), replica(lsn=20 * MB), replica(lsn=21 * MB, age=0.0)])
    assert [n.name for n in s.view.replicas] == [B, C]
    assert f"{B} readmitted: replica {B} (lag 1 MB)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([primary(lsn=40 * MB), replica(lsn=20 * MB), replica(lsn=40 * MB)])
    assert f"{B} excluded: replica {B} lag 20 MB > 8 MB" in caplog.text


def test_lag_is_unknown_without_a_primary() -> None:
    s = state(max_lag_bytes="1MB")
    s.update(["down", replica(lsn=1), replica(lsn=2)])
    assert [n.lag_bytes for n in s.view.nodes] == [None, None, None]
    assert len(s.view.replicas) == 2
    assert s.view.primary is None


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 12 * MB, 3 * 1024 * MB)] == [
        "0 B", "1023 B", "1 kB", "1.5 kB", "12 MB", "3 GB",
    ]  # fmt: skip


def test_a_node_down_from_the_start_has_no_role_until_it_answers(caplog: pytest.LogCaptureFixture) -> None:
    s = state()
    s.update([primary(), "could not connect: Connection refused", replica()])
    assert s.view.nodes[1].role is None and not s.view.nodes[1].usable
    with caplog.at_level(logging.INFO, "halephant.topology"):
        s.update([primary(), replica(), replica()])
    assert f"{B} is now replica (was unknown)" in caplog.text
    assert f"{B} readmitted" in caplog.text


def test_a_reload_that_changes_the_nodes_keeps_what_the_probes_said_of_those_still_listed() -> None:
    s = state()
    s.update([primary(timeline=1), primary(timeline=2), replica(timeline=2)])  # B promoted, A fenced
    assert s.view.primary is not None and s.view.primary.name == B
    d = "127.0.0.1:5004"
    # reordered, C removed, D added: the configured order alone would make A the primary
    reloaded = ClusterState("main", ClusterConfig.model_validate({"nodes": [A, d, B]}), s)
    a, new, b = reloaded.view.nodes
    assert (b.name, b.role, b.usable) == (B, Role.PRIMARY, True)
    assert (a.name, a.role, a.usable) == (A, Role.PRIMARY, False) and a.reason.startswith("split brain: ")
    assert (new.name, new.role, new.usable) == (d, None, False)
    assert reloaded.timeline == 2  # A is still never elected while B misses a probe
    reloaded.update([primary(timeline=1), replica(timeline=2), "connection refused"])
    assert reloaded.view.primary is None
    # a cluster whose nodes are all new starts from the configured order
    fresh = ClusterState("main", ClusterConfig.model_validate({"nodes": [d]}), s)
    assert fresh.view.primary is not None and fresh.view.primary.name == d and fresh.timeline == 0


def test_a_replica_that_receives_no_wal_falls_behind_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its replay age stays 0 (it has nothing left to replay), yet the primary goes on writing: the time
    # since the primary first had WAL the replica has not replayed is its lag.
    clock = [1000.0]
    monkeypatch.setattr(state_module, "_now", lambda: clock[0])
    s = state(max_lag="30s")
    for i in range(7):  # 10 s apart, the primary writes; B follows, C stopped at 20 MB
        lsn = (20 + i) * MB
        s.update([primary(lsn=lsn), replica(lsn=lsn), replica(lsn=20 * MB)])
        clock[0] += 10
    _, b, c = s.view.nodes
    assert b.usable and b.lag_seconds == 0.0
    assert c.lag_seconds == 50.0  # the primary was past 20 MB 50 s ago (in the second round)
    assert not c.usable and c.reason == f"replica {C} lag 50.0s > 30s"  # over it twice in a row
    # a reload that changes the nodes keeps the primary's positions: C is still behind
    nodes = [A, B, C, "127.0.0.1:5004"]
    reloaded = ClusterState("main", ClusterConfig.model_validate({"nodes": nodes, "max_lag": "30s"}), s)
    reloaded.update([primary(lsn=26 * MB), replica(lsn=26 * MB), replica(lsn=20 * MB), replica(lsn=26 * MB)])
    assert not reloaded.view.nodes[2].usable and reloaded.view.nodes[2].lag_seconds == 60.0
    # with the primary down, the replicas are the freshest there is: not excluded for time
    clock[0] += 100
    reloaded.update(["connection refused", replica(lsn=26 * MB), replica(lsn=25 * MB), replica(lsn=26 * MB)])
    assert reloaded.view.nodes[1].usable and reloaded.view.nodes[3].usable
    # an idle primary: a replica at its position is not behind, however old its last commit
    s.update([primary(lsn=26 * MB), replica(lsn=26 * MB), replica(lsn=26 * MB)])
    assert [n.usable for n in s.view.nodes] == [True, True, True]
    # another primary's positions say nothing of the old one's
    s.update([replica(lsn=26 * MB), primary(lsn=30 * MB, timeline=2), replica(lsn=26 * MB)])
    assert s.view.nodes[2].lag_seconds == 0.0


def test_a_replica_replaying_a_long_transaction_as_it_streams_is_not_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bulk load on an otherwise quiet primary: no commit for a long time, the replica replays the WAL as
    # it comes (a little always waits, so its replay age counts from the last commit), keeping up.
    clock = [1000.0]
    monkeypatch.setattr(state_module, "_now", lambda: clock[0])
    s = state(max_lag="30s")
    s.update([primary(lsn=20 * MB), replica(lsn=20 * MB), replica(lsn=20 * MB)])
    for i in range(1, 8):
        clock[0] += 10
        lsn = (20 + 10 * i) * MB
        s.update([primary(lsn=lsn), replica(lsn=lsn - MB, age=10.0 * i), replica(lsn=20 * MB, age=10.0 * i)])
    _, b, c = s.view.nodes
    assert b.usable and b.lag_seconds == 0.0  # it was at most one round behind
    # C stopped replaying at 20 MB: the primary was past it 60 s ago
    assert not c.usable and c.lag_seconds == 60.0 and c.reason == f"replica {C} lag 60.0s > 30s"
