"""Topology probes of a node whose pg_hba.conf takes TCP logins over TLS only (`tls_pg`, ssl = on): with
the cluster's `tls:` settings the probe logs in over TLS and sees the primary; in plaintext it is refused
with PostgreSQL's reason; a certificate that does not verify fails the probe with the verification error,
and a round of probes reports that as the node's reason."""

from __future__ import annotations

import anyio
import pytest
from support.tls import SERVER_NAME, TlsFiles

from halephant.config import Config, read_config_text, validate_config
from halephant.testing.pgcluster import Cluster
from halephant.topology.monitor import TopologyMonitor
from halephant.topology.probe import ProbeConnection, ProbeFailed
from halephant.types import ClusterView, Role

pytestmark = pytest.mark.e2e


def _config(nodes: list[str], tls: str) -> Config:
    text = (
        "clusters:\n  main:\n"
        f"    nodes: [{', '.join(nodes)}]\n"
        "    probe_user: myapp\n"
        f"    tls: {tls}\n"
        "databases:\n  myapp: {cluster: main}\n"
        "users:\n  myapp: {password: myapp}\n"
    )
    return validate_config(read_config_text(text, "halephant.yaml"))


def _probe(node: str, config: Config) -> ProbeConnection:
    host, _, port = node.rpartition(":")
    return ProbeConnection(
        host, int(port), "myapp", "myapp", "postgres", config.limits, config.server_tls("main")
    )


async def _probe_once(probe: ProbeConnection) -> object:
    try:
        return await probe.probe()
    finally:
        await probe.aclose()


def test_a_tls_only_node_is_probed_over_tls(tls_pg: Cluster, tls_files: TlsFiles) -> None:
    node = f"127.0.0.1:{tls_pg.primary.port}"
    for tls in ("{mode: require}", "{mode: prefer}", f"{{mode: verify-ca, ca_file: {tls_files.ca_file}}}"):
        result = anyio.run(_probe_once, _probe(node, _config([node], tls)))
        assert getattr(result, "in_recovery", None) is False, (tls, result)
    named = f"{SERVER_NAME}:{tls_pg.primary.port}"
    config = _config([named], f"{{mode: verify-full, ca_file: {tls_files.ca_file}}}")
    result = anyio.run(_probe_once, _probe(named, config))
    assert getattr(result, "in_recovery", None) is False


@pytest.mark.parametrize(
    ("tls", "why"),
    [
        ("{mode: disable}", "no encryption (28000)"),
        ("{mode: verify-full, ca_file: CA}", "server certificate verification failed: IP address mismatch"),
        ("{mode: verify-ca, ca_file: WRONG}", "server certificate verification failed: "),
    ],
)
def test_a_probe_refused_says_why(tls_pg: Cluster, tls_files: TlsFiles, tls: str, why: str) -> None:
    node = f"127.0.0.1:{tls_pg.primary.port}"
    config = _config([node], tls.replace("WRONG", tls_files.wrong_ca_file).replace("CA", tls_files.ca_file))
    with pytest.raises(ProbeFailed) as excinfo:
        anyio.run(_probe_once, _probe(node, config))
    assert why in str(excinfo.value), excinfo.value


def test_a_round_of_probes_sees_the_node_up_or_says_why_not(tls_pg: Cluster, tls_files: TlsFiles) -> None:
    # the node twice, under verify-full: written as the name its certificate holds it is up, written
    # 127.0.0.1 it is down, and the reason is the name check's
    named = f"{SERVER_NAME}:{tls_pg.primary.port}"
    mismatched = f"127.0.0.1:{tls_pg.primary.port}"
    views: list[ClusterView] = []
    config = _config([mismatched, named], f"{{mode: verify-full, ca_file: {tls_files.ca_file}}}")
    monitor = TopologyMonitor(config, lambda _name, view: views.append(view))

    async def main() -> None:
        await monitor.first_round()
        for probes in monitor._probes.values():
            for probe in probes:
                await probe.aclose()

    anyio.run(main)
    (view,) = views
    by_name = {node.name: node for node in view.nodes}
    assert by_name[named].usable and by_name[named].role is Role.PRIMARY, by_name[named]
    assert not by_name[mismatched].usable
    assert "server certificate verification failed: IP address mismatch" in by_name[mismatched].reason
