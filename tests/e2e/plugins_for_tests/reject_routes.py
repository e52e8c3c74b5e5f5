"""A `halephant_route` plugin that refuses transactions with 25006, for tests of route rejections.

* user ``trustuser``: every transaction is refused (a route that is read-only and has no node at all);
* user ``plainuser``: a transaction whose first statement writes is refused, reads go to the primary.

Other users are left to the default routing.
"""

from __future__ import annotations

from halephant import hookimpl, sqlstate
from halephant.types import ClientInfo, PoolInfo, Reject, Role, Route, TransactionInfo

REFUSE_ALL_USER = "trustuser"
READ_ONLY_USER = "plainuser"
READS = frozenset({"SELECT", "SHOW", "VALUES", "TABLE", "BEGIN", "COMMIT", "ROLLBACK", "FETCH", "CLOSE"})
MESSAGE = "cannot execute this statement in a read-only transaction"
#: the DETAIL a refused-everything route adds (a Reject's `detail`)
DETAIL = "reject_routes refuses every transaction of this user."


@hookimpl
def halephant_route(
    client: ClientInfo, transaction: TransactionInfo, pool: PoolInfo
) -> Route | Reject | None:
    if client.user == REFUSE_ALL_USER:
        return Reject(
            sqlstate.READ_ONLY_SQL_TRANSACTION, MESSAGE, reason="reject_routes: refuse all", detail=DETAIL
        )
    if client.user == READ_ONLY_USER:
        statement = transaction.statement
        if statement is not None and statement.first_keyword not in READS:
            return Reject(sqlstate.READ_ONLY_SQL_TRANSACTION, MESSAGE, reason="reject_routes: a write")
        return Route(Role.PRIMARY, reason="reject_routes: a read")
    return None
