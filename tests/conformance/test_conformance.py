"""The differential conformance harness: every workload of `workloads.py` runs against PostgreSQL directly
and through halephant in transaction and session pooling; what the client saw must be the same.

`python tests/conformance/table.py` runs this module and prints the per-driver table the README shows.
"""

from __future__ import annotations

import pytest
from support.leaks import assert_clean_servers
from workloads import WORKLOADS, Target, Workload

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.id for w in WORKLOADS])
def test_same_as_direct(
    pg: Cluster,
    targets: dict[str, Target],
    workload: Workload,
    mode: str,
    record_property: pytest.RecordProperty,
    request: pytest.FixtureRequest,
) -> None:
    record_property("driver", workload.driver)
    record_property("workload", workload.name)
    record_property("mode", mode)
    if workload.known_difference:
        record_property("known_difference", workload.known_difference)
        request.applymarker(pytest.mark.xfail(reason=workload.known_difference, strict=True))
    direct = workload.run(targets["direct"])
    pooled = workload.run(targets[mode])
    assert pooled == direct
    assert_clean_servers(pg.primary)
