"""Which kind of node runs a transaction. In this version every cluster's first node is its primary and all
transactions go there; the decision still carries its reason so logs can explain it."""

from __future__ import annotations

from halephant import hookimpl
from halephant.types import ClientInfo, PoolInfo, Role, Route, TransactionInfo


@hookimpl(trylast=True)
def halephant_route(client: ClientInfo, transaction: TransactionInfo, pool: PoolInfo) -> Route:
    return Route(Role.PRIMARY, reason=f"primary: default route for {client.user}")
