"""The probe loop: every `topology.interval`, each cluster's nodes are probed concurrently (each bounded by
`topology.timeout`), and the resulting `ClusterView` is handed to `publish` (the pool manager).

A round can also be asked for early (`probe_soon`), e.g. when a server connection to the primary cannot
be opened or a read-your-writes client waits for a replica to catch up; such early rounds are spaced at
least `MIN_GAP` apart so they cannot flood the nodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import anyio.abc

from halephant.config.schema import ClusterConfig, Config, UserConfig, is_md5_hash, is_scram_verifier
from halephant.topology.probe import ProbeConnection, ProbeFailed, ProbeResult
from halephant.topology.state import ClusterState
from halephant.types import ClusterView

__all__ = ["MIN_GAP", "TopologyMonitor", "probe_login"]

log = logging.getLogger("halephant.topology")

#: seconds between two rounds of one cluster, at least, when rounds are asked for early
MIN_GAP = 0.1


def _probe_rank(user: UserConfig) -> int | None:
    """How well a user serves as the probes' login: 0 a plaintext upstream password, 1 an md5 hash
    (pass-through needs nothing more), 2 a SCRAM verifier (pass-through once a client of that user has
    logged in: until then the probes fail and the cluster keeps its last known topology); None: none."""
    if user.upstream_password is not None:
        return 0
    secret = user.upstream_secret
    if secret is None:
        return None
    return 1 if is_md5_hash(secret) else 2 if is_scram_verifier(secret) else None


def probe_login(config: Config, cluster: ClusterConfig) -> tuple[str, str | None]:
    """The user and password the probes of `cluster` log in with: `probe_user`/`probe_password`, else the
    first user under `users:` (not an alias) that halephant can log in upstream with, preferring a
    plaintext password to a pass-through md5 hash, and that to a pass-through SCRAM verifier
    (`_probe_rank`)."""
    if cluster.probe_user is not None:
        user = config.users.get(cluster.probe_user)
        password = cluster.probe_password
        if password is None and user is not None:
            password = user.upstream_secret
        return cluster.probe_user, password
    best: tuple[int, str, str | None] | None = None
    for name, user in config.users.items():
        # an alias (server_user) is no role of PostgreSQL's: the user it logs in as is under users: too
        rank = _probe_rank(user) if user.server_user is None else None
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, name, user.upstream_secret)
    if best is not None:
        return best[1], cluster.probe_password or best[2]
    return next(iter(config.users)), cluster.probe_password


def _log_passthrough_probes(name: str, user: str, password: str | None) -> None:
    if password is not None and is_scram_verifier(password):
        log.info(
            "cluster %s: the probes log in as %r by SCRAM pass-through (its password in halephant.yaml is a "
            "SCRAM verifier, with no server_password): they fail until a client of %r has logged in, and "
            "the cluster keeps its configured topology until then; set probe_user/probe_password, or a "
            "server_password, to probe from the start",
            name,
            user,
            user,
        )


class TopologyMonitor:
    def __init__(self, config: Config, publish: Callable[[str, ClusterView], None]) -> None:
        self.interval = config.topology.interval
        self.timeout = config.topology.timeout
        self._publish = publish
        self.states = {name: ClusterState(name, cluster) for name, cluster in config.clusters.items()}
        self._probes: dict[str, list[ProbeConnection]] = {}
        for name, cluster in config.clusters.items():
            user, password = probe_login(config, cluster)
            _log_passthrough_probes(name, user, password)
            tls = config.server_tls(name)
            self._probes[name] = [
                ProbeConnection(
                    node.host, node.port, user, password, cluster.probe_database, config.limits, tls
                )
                for node in cluster.nodes
            ]
        self._wake: dict[str, anyio.Event] = {}
        self._last_round = dict.fromkeys(config.clusters, 0.0)
        self._tg: anyio.abc.TaskGroup | None = None

    def reconfigure(self, config: Config) -> None:
        """A reload: new intervals and lag limits apply at once, `limits.tcp_*` to probe connections
        opened from then on (and the TLS context, made anew from the files); a cluster whose nodes,
        probe login or TLS settings changed is probed afresh at once (its nodes still listed keep their
        last known state until then, new ones are not usable); added clusters are probed, removed ones
        no longer."""
        self.interval = config.topology.interval
        self.timeout = config.topology.timeout
        closing: list[ProbeConnection] = []
        for name in [n for n in self.states if n not in config.clusters]:
            del self.states[name]
            closing += self._probes.pop(name)
            self._last_round.pop(name, None)
            event = self._wake.pop(name, None)
            if event is not None:
                event.set()  # its loop wakes up and ends
        for name, cluster in config.clusters.items():
            user, password = probe_login(config, cluster)
            tls = config.server_tls(name)
            wanted = [(n.host, n.port, user, password, cluster.probe_database) for n in cluster.nodes]
            probes = self._probes.get(name)
            if (
                probes is None
                or [(p.host, p.port, p.user, p.password, p.database) for p in probes] != wanted
                or any(p.tls is None or p.tls.settings != tls.settings for p in probes)
            ):
                closing += probes or []
                _log_passthrough_probes(name, user, password)
                self._probes[name] = [ProbeConnection(*args, config.limits, tls) for args in wanted]
                self.states[name] = ClusterState(name, cluster, self.states.get(name))
            else:
                self.states[name].cluster = cluster  # lag limits
                for probe in probes:
                    probe.limits = config.limits  # limits.tcp_* for the connections it opens from now on
                    probe.tls = tls
            self._last_round.setdefault(name, 0.0)
            if name not in self._wake and self._tg is not None:
                self._wake[name] = anyio.Event()
                self._tg.start_soon(self._loop, name)
            else:
                self.probe_soon(name)
        if self._tg is not None:
            for probe in closing:
                self._tg.start_soon(probe.aclose)

    def views(self) -> dict[str, ClusterView]:
        return {name: state.view for name, state in self.states.items()}

    async def first_round(self) -> None:
        """Probe every cluster once (before clients are let in, so their first transaction is routed on
        what the nodes say rather than on the configured order)."""
        async with anyio.create_task_group() as tg:
            for name in self.states:
                tg.start_soon(self._round, name)

    async def run(self) -> None:
        """Probe every cluster every interval, until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for name in self.states:
                    self._wake[name] = anyio.Event()
                    tg.start_soon(self._loop, name)
        finally:
            with anyio.CancelScope(shield=True):
                for probes in self._probes.values():
                    for probe in probes:
                        await probe.aclose()

    def probe_soon(self, name: str) -> None:
        """Ask for a round of cluster `name` now rather than at the next interval."""
        event = self._wake.get(name)
        if event is not None:
            event.set()

    async def _loop(self, name: str) -> None:
        while name in self.states:  # a reload may remove the cluster
            now = time.monotonic()
            wait = self._last_round[name] + self.interval - now
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._wake[name].wait()
                if name not in self.states:
                    return
                self._wake[name] = anyio.Event()
                gap = self._last_round[name] + MIN_GAP - time.monotonic()
                if gap > 0:
                    await anyio.sleep(gap)
            if name in self.states:
                await self._round(name)

    async def _round(self, name: str) -> None:
        self._last_round[name] = time.monotonic()
        probes = self._probes[name]
        outcomes: list[ProbeResult | str] = [""] * len(probes)
        async with anyio.create_task_group() as tg:
            for i, probe in enumerate(probes):
                tg.start_soon(self._probe_one, probe, outcomes, i)
        if self._probes.get(name) is not probes:
            return  # a reload changed the cluster meanwhile: these answers are about the old one
        state = self.states[name]
        try:
            view = state.update(outcomes)
        except Exception:  # a bug here must not stop the probes of every cluster
            log.exception("cluster %s: could not update the topology", name)
            return
        self._publish(name, view)

    async def _probe_one(self, probe: ProbeConnection, outcomes: list[ProbeResult | str], i: int) -> None:
        try:
            with anyio.fail_after(self.timeout):
                outcomes[i] = await probe.probe()
        except TimeoutError:
            outcomes[i] = f"no answer within {self.timeout:g}s"
        except ProbeFailed as exc:
            why = str(exc)
            if why.endswith("no encryption (28000)") and probe.tls is not None:
                # pg_hba.conf has a hostssl line for the probes' login and no host one
                why += (
                    f" (the node takes this login over TLS only: check clusters.{probe.tls.cluster}.tls.mode)"
                )
            elif "channel binding" in why and probe.tls is not None:
                # SCRAM-SHA-256-PLUS refused: the node's certificate is not the one the probe was shown
                why += (
                    " (the node's certificate is not the one the probe was shown: a man in the middle? "
                    f"clusters.{probe.tls.cluster}.tls.mode verify-full checks it)"
                )
            elif "(28P01)" in why or "(28000)" in why:
                why += f" (probe user {probe.user!r}: check probe_user and probe_password)"
            outcomes[i] = why
        except OSError as exc:
            outcomes[i] = f"could not connect: {exc.strerror or exc}"
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            outcomes[i] = "the server closed the connection"
        except Exception as exc:
            outcomes[i] = f"probe failed: {exc!r}"
