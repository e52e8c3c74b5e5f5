"""Fixtures of the differential conformance harness: PostgreSQL directly, and halephant in both pool modes.

`targets` maps "direct", "transaction" and "session" to where a workload connects; the same workload runs
against each, and the test compares what the client saw.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from support.halephant import HalephantFactory, default_config
from workloads import Target

from halephant.testing.pgcluster import Cluster, find_bindir


@pytest.fixture(scope="module")
def targets(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Target]]:
    # module scope: its halephant and server connections are gone before other tests count backends
    factory = HalephantFactory(tmp_path_factory.mktemp("conformance"))
    run = factory.start(
        default_config(
            pg,
            databases={
                "transaction": {"cluster": "main", "database": "myapp", "pool_size": 4},
                "session": {"cluster": "main", "database": "myapp", "mode": "session", "pool_size": 8},
            },
        )
    )
    node = pg.primary
    # pgbench's tables, made once, directly
    subprocess.run(
        [str(find_bindir() / "pgbench"), "-i", "-q", "-s", "1", "-h", node.host, "-p", str(node.port),
         "-U", "myapp", "myapp"],
        check=True, capture_output=True, env={"PGPASSWORD": "myapp", "PGSSLMODE": "disable"},
    )  # fmt: skip
    try:
        yield {
            "direct": Target("direct", node.host, node.port, "myapp"),
            "transaction": Target("transaction", run.host, run.port, "transaction"),
            "session": Target("session", run.host, run.port, "session"),
        }
    finally:
        factory.stop_all()
