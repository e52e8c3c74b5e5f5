"""Send reporting clients to a replica: `halephant_route` by `application_name`.

Why: reports are long read-only queries that need not see the very latest write, and they are best kept
off the primary. Clients say what they are in the `application_name` startup parameter (libpq's
`application_name=report-weekly`, psycopg's `application_name=`), so no user has to be created for them.

Any client whose application_name starts with "report" is routed to a replica; every other transaction is
left to the next plugin (the default sends it to the primary). A report that tries to write gets
PostgreSQL's own 25006 from the replica.

The name is the one of the startup packet (`client.application_name`); a client that sets it later with
`SET application_name` is routed by `client.settings.get("application_name")` instead. While no replica
can take transactions (`cluster.replicas` is empty) the decision is left to the default, which applies
`databases.<name>.replica_fallback` (the primary, unless set to `error`): a plugin's own `REPLICA` route
would fail each of those transactions with 57P03 instead.
"""

from __future__ import annotations

from typing import Final

from halephant import hookimpl
from halephant.types import ClientInfo, ClusterView, Role, Route

#: application_name prefix of the clients sent to a replica.
PREFIX: Final = "report"


@hookimpl
def halephant_route(client: ClientInfo, cluster: ClusterView) -> Route | None:
    if not client.application_name.startswith(PREFIX) or not cluster.replicas:
        return None
    return Route(Role.REPLICA, reason=f"replica: application_name {client.application_name!r} is a report")
