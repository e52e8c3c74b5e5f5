"""Test plugin: `halephant_inspect_query` pins the client for any statement containing 'pinme'."""

from __future__ import annotations

from halephant import hookimpl
from halephant.types import ClientInfo, Pin, PoolInfo, Statement


@hookimpl
def halephant_inspect_query(client: ClientInfo, statement: Statement, pool: PoolInfo) -> Pin | None:
    if "pinme" in statement.text:
        return Pin("test: the statement says pinme")
    return None
