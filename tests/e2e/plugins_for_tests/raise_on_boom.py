"""A plugin that fails on purpose, for tests of how halephant contains a plugin's exception.

`halephant_inspect_query` raises for any statement containing ``boom``, and answers something that is no
verdict for one containing ``nonsense``; `halephant_select_pool` raises at login for a client whose
application_name is ``select_pool_boom``; `halephant_route` answers something that is no route for a client
whose application_name is ``route_nonsense``; `halephant_pool_size` raises for a database configured
with ``pool_size: 13`` (how a test makes a reload fail while it is applied). Everything else is left to
the other plugins (None: "not mine").
"""

from __future__ import annotations

from typing import Any

from halephant import hookimpl
from halephant.types import (
    ClientInfo,
    ClusterView,
    Config,
    PoolInfo,
    PoolSize,
    PoolTarget,
    Reject,
    Statement,
    TransactionInfo,
)

BOOM_APPLICATION_NAME = "select_pool_boom"


class BoomError(RuntimeError):
    """The exception these hooks raise, so the log can be checked for its name."""


@hookimpl
def halephant_inspect_query(client: ClientInfo, statement: Statement, pool: PoolInfo) -> Any:
    if "boom" in statement.text:
        raise BoomError(f"boom in statement from client #{client.id}")
    if "nonsense" in statement.text:
        return "no verdict at all"
    return None


@hookimpl(tryfirst=True)
def halephant_route(
    client: ClientInfo, transaction: TransactionInfo, pool: PoolInfo, cluster: ClusterView
) -> Any:
    if client.application_name == "route_nonsense":
        return 1
    return None


@hookimpl
def halephant_select_pool(client: ClientInfo, config: Config) -> PoolTarget | Reject | None:
    if client.application_name == BOOM_APPLICATION_NAME:
        raise BoomError(f"boom selecting a pool for client #{client.id}")
    return None


@hookimpl(tryfirst=True)
def halephant_pool_size(pool: PoolTarget, config: Config) -> PoolSize | None:
    db = config.database_for(pool.database)
    if db is not None and db.pool_size == 13:
        raise BoomError(f"boom sizing pool {pool.database}")
    return None
