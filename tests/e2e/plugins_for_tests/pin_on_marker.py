"""Test plugin: `halephant_inspect_query` pins the client for any statement containing 'pinme', and drops
that pin again for a statement containing 'unpinme'."""

from __future__ import annotations

from halephant import hookimpl
from halephant.types import ClientInfo, Pin, PoolInfo, Statement, Unpin


@hookimpl
def halephant_inspect_query(client: ClientInfo, statement: Statement, pool: PoolInfo) -> Pin | Unpin | None:
    if "unpinme" in statement.text:
        return Unpin("test: the statement says unpinme")
    if "pinme" in statement.text:
        return Pin("test: the statement says pinme")
    return None
