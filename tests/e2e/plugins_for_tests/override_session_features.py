"""Test plugin: overrides rows of the session-feature table for the database `strict`.

Session advisory locks are rejected there (the default table pins them), and LISTEN pins the client
(the default emulates it); answered before the default `session_features` plugin, which is `trylast`.
"""

from __future__ import annotations

from halephant import hookimpl, sqlstate
from halephant.types import ClientInfo, Pin, PoolInfo, Reject, Statement

DATABASE = "strict"


@hookimpl
def halephant_inspect_query(client: ClientInfo, statement: Statement, pool: PoolInfo) -> Reject | Pin | None:
    if pool.database != DATABASE:
        return None
    if "pg_advisory_lock" in statement.text:
        return Reject(sqlstate.FEATURE_NOT_SUPPORTED, "no advisory locks here", hint="test plugin")
    if statement.first_keyword == "LISTEN":
        return Pin("test: LISTEN pinned", feature="listen")
    return None
