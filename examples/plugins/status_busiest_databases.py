"""Add a "Busiest databases" panel to `halephant status`: `halephant_extend_status`.

Why: the built-in pools panel has one row per database, user and node; on a busy pooler with many
users the question "which database is doing the work" needs a sum. This panel adds transactions,
queries and waiting clients per database, busiest first, from the same snapshot the view already read.
"""

from __future__ import annotations

from typing import Any

from halephant import hookimpl
from halephant.types import StatusPanel

#: databases shown
TOP = 5


@hookimpl
def halephant_extend_status(snapshot: dict[str, Any]) -> StatusPanel | None:
    totals: dict[str, list[int]] = {}
    for pool in snapshot.get("pools", []):
        row = totals.setdefault(pool["database"], [0, 0, 0])
        row[0] += int(pool.get("transactions", 0))
        row[1] += int(pool.get("queries", 0))
        row[2] += int(pool.get("cl_waiting", 0))
    if not totals:
        return None
    busiest = sorted(totals.items(), key=lambda kv: -kv[1][0])[:TOP]
    return StatusPanel(
        title="Busiest databases",
        columns=("database", "transactions", "queries", "waiting"),
        rows=tuple((name, str(x), str(q), str(w)) for name, (x, q, w) in busiest),
        note="totals since start, all users and nodes",
    )
