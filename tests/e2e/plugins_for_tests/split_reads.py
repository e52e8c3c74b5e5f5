"""Test plugin: read/write split by statement for clients whose application_name starts with ``split``.

A transaction whose first statement is a SELECT goes to a replica, anything else to the primary. Other
clients are left to the other plugins.
"""

from __future__ import annotations

from halephant import hookimpl
from halephant.types import ClientInfo, Role, Route, TransactionInfo

PREFIX = "split"
_READ = Route(Role.REPLICA, reason="split_reads: a SELECT")
_WRITE = Route(Role.PRIMARY, reason="split_reads: not a SELECT")


@hookimpl
def halephant_route(client: ClientInfo, transaction: TransactionInfo) -> Route | None:
    if not client.application_name.startswith(PREFIX):
        return None
    statement = transaction.statement
    if statement is not None and statement.first_keyword == "SELECT":
        return _READ
    return _WRITE
