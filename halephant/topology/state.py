"""What a cluster looks like after each round of probes: which node is the primary, which replicas may take
new transactions, and the log lines that explain every change. Pure logic (no I/O): `ClusterState.update`
takes one outcome per node and returns the new immutable `ClusterView`.

Rules:
* a node whose probe failed is down: it keeps its last known role but is not usable; one whose probe
  login was refused with 57P03 (a smart shutdown waiting for its sessions to end, or starting up) is
  listed by `refusing_sessions`, even when it is the only node;
* when every probe of the cluster failed, nothing changes (halephant may be the one cut off): the last
  known topology is kept, and the log says so;
* of several nodes that all claim to be primary (after a promotion, until the old primary is fenced),
  the one on the highest timeline wins; on equal timelines the current primary stays, else the first
  configured. The others are not usable, and a split-brain warning is logged;
* a node claiming to be primary on a lower timeline than a primary seen before is never elected, even
  alone: it is an old primary that was not shut down, and the new one may just have missed a probe.
  Writes wait for a primary on that timeline (the highest is forgotten by a restart, or a reload that
  leaves none of the cluster's nodes);
* a reload that changes a cluster's nodes keeps what the probes said of the nodes still listed; new
  nodes are not usable until probed;
* a replica beyond `max_lag_bytes` (behind the primary's WAL) or `max_lag` (over it in two rounds in a
  row) is not usable until it is back under; a primary is never excluded for lag. A replica's lag in
  time is how long ago the primary had written WAL the replica has not replayed yet (from the positions
  the probes saw, round by round): a replica that stopped receiving WAL has nothing left to replay,
  yet falls behind all the same. Only while the probes have not seen the primary at the replica's
  position yet (just started, a new primary) does its replay age count as well, if larger (since the
  last replayed commit, while it has WAL to replay).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence

from halephant import sqlstate
from halephant.config.schema import ClusterConfig
from halephant.topology.probe import ProbeResult
from halephant.types import ClusterView, NodeInfo, Role

__all__ = ["SPLIT_BRAIN", "ClusterState", "configured_view", "format_bytes"]

#: how the reason of a node that claims to be primary but lost the election starts
SPLIT_BRAIN = "split brain: "

log = logging.getLogger("halephant.topology")

#: how the failure of a probe refused a login because the node takes no new sessions ends
_REFUSED = f"({sqlstate.CANNOT_CONNECT_NOW})"

#: the primary WAL positions kept, one per round in which it moved (at a 5 s interval: over 5 hours)
_WAL_KEPT = 4096


def _now() -> float:
    return time.monotonic()


def format_bytes(n: int) -> str:
    """`12 MB`, `1.5 kB`, `8 MB`, `0 B`: sizes in log lines and reasons (powers of 1024, like PostgreSQL)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            if unit == "B" or value >= 10 or value.is_integer():
                return f"{value:.0f} {unit}"
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def configured_view(name: str, cluster: ClusterConfig) -> ClusterView:
    """Before any probe has answered: the first configured node is the primary, the others replicas."""
    return ClusterView(
        name,
        tuple(
            NodeInfo(
                str(node),
                node.host,
                node.port,
                Role.PRIMARY if i == 0 else Role.REPLICA,
                usable=True,
                reason="configured order (not probed yet)",
            )
            for i, node in enumerate(cluster.nodes)
        ),
    )


class ClusterState:
    """One cluster's topology as the probes see it, round after round."""

    def __init__(self, name: str, cluster: ClusterConfig, previous: ClusterState | None = None) -> None:
        """`previous`: the cluster's state before a reload changed its nodes (or probe login)."""
        self.name = name
        self.cluster = cluster
        self.view = configured_view(name, cluster)
        self.probed = False  # True once a round had at least one answer
        self._failing: dict[str, str] = {}  # node -> why its last probe failed
        #: the last round had no answer at all (the view is the last known one)
        self.all_failed = False
        self._split_brain: frozenset[str] = frozenset()
        self._over_time: set[str] = set()  # replicas over max_lag in the last round
        #: the highest timeline a primary of this cluster was elected on
        self.timeline = 0
        #: the elected primary's WAL positions, rising, with when the probes saw each (for replicas' lag)
        self._wal_primary = ""
        self._wal_lsns: list[int] = []
        self._wal_times: list[float] = []
        if previous is not None and previous.probed:
            self._carry_over(previous)

    def _carry_over(self, previous: ClusterState) -> None:
        """Until the new nodes are probed, the nodes still listed keep what the probes said of them, and
        the new ones take nothing: the configured order would make the first listed node the primary
        (an old, fenced primary; a replica after a reorder)."""
        known = {node.name: node for node in previous.view.nodes}
        if not known.keys() & {node.name for node in self.view.nodes}:
            return  # none of its nodes is left: a new cluster under an old name
        self.view = ClusterView(
            self.name,
            tuple(
                known.get(node.name)
                or NodeInfo(
                    node.name, node.host, node.port, None, False, reason=f"{node.name}: not probed yet"
                )
                for node in self.view.nodes
            ),
        )
        self.probed = True
        self.timeline = previous.timeline
        self._split_brain = previous._split_brain
        self._over_time = previous._over_time & known.keys()
        if previous._wal_primary in known.keys() & {node.name for node in self.view.nodes}:
            # a replica's lag in time is measured against them: without, one that stopped receiving
            # WAL would look caught up again
            self._wal_primary = previous._wal_primary
            self._wal_lsns, self._wal_times = previous._wal_lsns, previous._wal_times

    def update(self, outcomes: Sequence[ProbeResult | str]) -> ClusterView:
        """Take one round: per node (in configured order) its ProbeResult, or why the probe failed."""
        assert len(outcomes) == len(self.view.nodes)
        for node, outcome in zip(self.view.nodes, outcomes, strict=True):
            if isinstance(outcome, str):
                if self._failing.get(node.name) != outcome:  # once per failure, again if the cause changes
                    log.warning("cluster %s: probe of %s failed: %s", self.name, node.name, outcome)
                self._failing[node.name] = outcome
            else:
                self._failing.pop(node.name, None)
        if all(isinstance(outcome, str) for outcome in outcomes):
            if not self.all_failed:
                self.all_failed = True
                log.error(
                    "cluster %s: every probe failed; keeping the last known topology (%s)",
                    self.name,
                    self._describe(self.view) if self.probed else "none yet: the configured order",
                )
            return self.view
        if self.all_failed:
            self.all_failed = False
            log.info("cluster %s: probes answer again", self.name)
        view = ClusterView(self.name, self._nodes(outcomes))
        self._log_changes(self.view, view)
        self.view = view
        self.probed = True
        return view

    def refusing_sessions(self) -> list[NodeInfo]:
        """The nodes whose last probe was refused with 57P03: they answer, and take no new sessions."""
        if not self._failing:
            return []
        return [node for node in self.view.nodes if self._failing.get(node.name, "").endswith(_REFUSED)]

    def _nodes(self, outcomes: Sequence[ProbeResult | str]) -> tuple[NodeInfo, ...]:
        old = self.view.nodes
        primary = self._elect(outcomes)
        primary_result = outcomes[primary] if primary is not None else None
        primary_lsn = primary_result.lsn if isinstance(primary_result, ProbeResult) else None
        if primary is not None and primary_lsn is not None:
            self._saw_primary_wal(old[primary].name, primary_lsn)
        nodes: list[NodeInfo] = []
        for i, (node, outcome) in enumerate(zip(old, outcomes, strict=True)):
            if isinstance(outcome, str):
                role = node.role if self.probed else None
                nodes.append(self._info(node, role, False, f"{node.name} is down: {outcome}"))
            elif not outcome.in_recovery:
                if i == primary:
                    nodes.append(self._info(node, Role.PRIMARY, True, f"primary {node.name}", outcome))
                elif primary is None:
                    reason = (
                        f"{SPLIT_BRAIN}{node.name} claims to be primary on timeline {outcome.timeline}, "
                        f"but a primary on timeline {self.timeline} was seen: writes wait for it"
                    )
                    nodes.append(self._info(node, Role.PRIMARY, False, reason, outcome))
                else:
                    winner = old[primary].name
                    reason = (
                        f"{SPLIT_BRAIN}{node.name} (timeline {outcome.timeline}) also claims to be primary; "
                        f"{winner} (timeline {_timeline(outcomes, primary)}) takes the writes"
                    )
                    nodes.append(self._info(node, Role.PRIMARY, False, reason, outcome))
            else:
                nodes.append(self._replica(node, outcome, primary_lsn))
        return tuple(nodes)

    def _elect(self, outcomes: Sequence[ProbeResult | str]) -> int | None:
        claims = [i for i, o in enumerate(outcomes) if isinstance(o, ProbeResult) and not o.in_recovery]
        if not claims:
            return None
        current = self.view.primary.name if self.probed and self.view.primary is not None else None
        names = [node.name for node in self.view.nodes]

        def rank(i: int) -> tuple[int, bool, int]:
            outcome = outcomes[i]
            assert isinstance(outcome, ProbeResult)
            return (outcome.timeline or 0, names[i] == current, -i)

        winner = max(claims, key=rank)
        winner_timeline = _timeline(outcomes, winner) or 0
        if winner_timeline < self.timeline:
            # every claimant is behind a primary seen before (which may just have missed this probe)
            stale = frozenset(names[i] for i in claims)
            if stale != self._split_brain:
                log.error(
                    "cluster %s: %s claim(s) to be primary on timeline %s, but a primary on timeline %d was "
                    "seen: no writes go there (an old primary that was not shut down?); a restart forgets "
                    "that timeline",
                    self.name,
                    ", ".join(names[i] for i in claims),
                    winner_timeline,
                    self.timeline,
                )
            self._split_brain = stale
            return None
        self.timeline = winner_timeline
        claimants = frozenset(names[i] for i in claims)
        if len(claims) > 1:
            if claimants != self._split_brain:
                log.warning(
                    "cluster %s: split brain: %s all claim to be primary; writes go to %s only "
                    "(highest timeline), the others get no transactions until they are fenced or rejoin "
                    "as replicas",
                    self.name,
                    ", ".join(f"{names[i]} (timeline {_timeline(outcomes, i)})" for i in claims),
                    names[winner],
                )
        elif self._split_brain:
            log.info("cluster %s: split brain over: %s is the only primary", self.name, names[winner])
        self._split_brain = claimants if len(claims) > 1 else frozenset()
        return winner

    def _saw_primary_wal(self, name: str, lsn: int) -> None:
        if name != self._wal_primary:  # another primary: its positions say nothing of the old one's
            self._wal_primary = name
            self._wal_lsns, self._wal_times = [], []
        if self._wal_lsns and lsn <= self._wal_lsns[-1]:
            return  # nothing written since: the first time it was at this position is what counts
        self._wal_lsns.append(lsn)
        self._wal_times.append(_now())
        if len(self._wal_lsns) > _WAL_KEPT:
            del self._wal_lsns[0], self._wal_times[0]

    def _behind_for(self, lsn: int) -> float:
        """For how long the primary has had WAL beyond `lsn` (0 when a replica at `lsn` has replayed all
        the primary had written when last probed)."""
        i = bisect.bisect_right(self._wal_lsns, lsn)  # the first position seen beyond it
        return _now() - self._wal_times[i] if i < len(self._wal_times) else 0.0

    def _replica(self, node: NodeInfo, outcome: ProbeResult, primary_lsn: int | None) -> NodeInfo:
        lag_bytes = None
        if primary_lsn is not None and outcome.lsn is not None:
            lag_bytes = max(0, primary_lsn - outcome.lsn)
        lag_seconds = outcome.replay_age
        if outcome.lsn is not None and primary_lsn is not None:
            # (only with a primary answering: while it is down, a replica that missed its last WAL is
            # still the freshest there is)
            # When the probes saw the primary at this position or before it, when the primary went past
            # it is known (to a round), and that is how stale the replica is. Its replay age is not: it
            # counts from the last commit replayed, which is long ago while a long transaction on an
            # otherwise quiet primary streams its WAL (a bulk load, CREATE INDEX), replayed as it comes.
            behind = self._behind_for(outcome.lsn)
            known = self._wal_lsns[0] <= outcome.lsn
            lag_seconds = behind if known else max(lag_seconds or 0.0, behind)
        max_bytes, max_seconds = self.cluster.max_lag_bytes, self.cluster.max_lag
        over_time = max_seconds is not None and lag_seconds is not None and lag_seconds > max_seconds
        # The replay age jumps to "since the last replayed commit" whenever any WAL waits to be replayed,
        # even a checkpoint record of an idle primary: it counts once it is over two rounds in a row (or
        # the replica is excluded already).
        confirmed = over_time and (node.name in self._over_time or not node.usable)
        if over_time:
            self._over_time.add(node.name)
        else:
            self._over_time.discard(node.name)
        reason = ""
        if max_bytes is not None and lag_bytes is not None and lag_bytes > max_bytes:
            reason = f"replica {node.name} lag {format_bytes(lag_bytes)} > {format_bytes(max_bytes)}"
        elif confirmed:
            reason = f"replica {node.name} lag {lag_seconds:.1f}s > {max_seconds:g}s"
        usable = not reason
        if usable:
            lag = format_bytes(lag_bytes) if lag_bytes is not None else "unknown"
            reason = f"replica {node.name} (lag {lag})"
        return self._info(node, Role.REPLICA, usable, reason, outcome, lag_bytes, lag_seconds)

    @staticmethod
    def _info(
        node: NodeInfo,
        role: Role | None,
        usable: bool,
        reason: str,
        outcome: ProbeResult | None = None,
        lag_bytes: int | None = None,
        lag_seconds: float | None = None,
    ) -> NodeInfo:
        return NodeInfo(
            node.name,
            node.host,
            node.port,
            role,
            usable,
            lag_bytes=lag_bytes,
            lag_seconds=lag_seconds,
            reason=reason,
            lsn=outcome.lsn if outcome is not None else node.lsn,
            timeline=outcome.timeline if outcome is not None else node.timeline,
            probed_at=time.time(),  # made only from a probe round's outcomes
        )

    def _log_changes(self, old: ClusterView, new: ClusterView) -> None:
        for before, after in zip(old.nodes, new.nodes, strict=True):
            name = after.name
            if before.probed_at is None:  # its first answer (the first round, or a node a reload added)
                if after.usable:
                    log.info("cluster %s: %s", self.name, after.reason)
                else:
                    log.warning("cluster %s: %s: no new transactions go there", self.name, after.reason)
                continue
            came_up = before.reason.startswith(f"{name} is down") and name not in self._failing
            if after.role is not None and after.role != before.role and after.usable:
                was = before.role or "unknown"
                log.warning("cluster %s: %s is now %s (was %s)", self.name, name, after.role, was)
            if before.usable and not after.usable:
                if name in self._failing:
                    log.warning(
                        "cluster %s: node %s marked down: no new transactions go there until a probe "
                        "succeeds",
                        self.name,
                        name,
                    )
                else:
                    log.warning("cluster %s: %s excluded: %s", self.name, name, after.reason)
            elif not before.usable and after.usable:
                log.info("cluster %s: %s readmitted: %s", self.name, name, after.reason)
            elif came_up and not after.usable:
                log.warning(
                    "cluster %s: %s answers again but is not usable: %s", self.name, name, after.reason
                )

    @staticmethod
    def _describe(view: ClusterView) -> str:
        return ", ".join(
            f"{node.name} {node.role or 'unknown'}{'' if node.usable else ' (not usable)'}"
            for node in view.nodes
        )


def _timeline(outcomes: Sequence[ProbeResult | str], i: int | None) -> int | None:
    if i is None:
        return None
    outcome = outcomes[i]
    return outcome.timeline if isinstance(outcome, ProbeResult) else None
