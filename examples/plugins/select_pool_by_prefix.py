"""Serve many tenant databases from one `databases:` entry: `halephant_select_pool`.

Why: with a database per tenant, listing each one in halephant.yaml does not scale. Here a client asking
for `tenant_<name>` is sent to the database of that name on the cluster of the `databases.tenants` entry,
with that entry's pool mode. A name with its own `databases:` entry keeps it, and any other name is left
to the next plugin (the default looks it up in `databases:`, and answers 3D000 for names it does not know).

Each tenant database gets its own pools (pools are keyed by `PoolTarget.database`), so a server connection
is never handed from one tenant's database to another. Those pools have no `databases:` entry of their
own: `PoolTarget.entry` names the `tenants` entry, whose settings they follow (pool sizes, timeouts, reset
query, session features), and a reload that removes it ends their clients' sessions (57P01).

Tenant names are limited to lower-case letters, digits and `_`; PostgreSQL answers 3D000 for a tenant
that does not exist. The pools of a tenant database nobody uses are forgotten after the `tenants` entry's
idle_timeout, as those of the catch-all entry are.
"""

from __future__ import annotations

import re
from typing import Final

from halephant import hookimpl
from halephant.types import ClientInfo, Config, PoolMode, PoolTarget

#: The `databases:` entry whose cluster, pool mode and settings every tenant database uses.
TEMPLATE: Final = "tenants"
TENANT_DATABASE: Final = re.compile(r"tenant_([a-z0-9_]{1,50})")


@hookimpl
def halephant_select_pool(client: ClientInfo, config: Config) -> PoolTarget | None:
    match = TENANT_DATABASE.fullmatch(client.database)
    entry = config.databases.get(TEMPLATE)
    if match is None or entry is None or client.database in config.databases:
        return None
    user = config.users.get(client.user)
    return PoolTarget(
        database=client.database,
        cluster=entry.cluster,
        server_database=client.database,
        server_user=client.user,
        server_password=user.upstream_secret if user is not None else None,
        mode=PoolMode(entry.mode),
        reason=f"tenant {match.group(1)} -> cluster {entry.cluster} (databases.{TEMPLATE})",
        entry=TEMPLATE,
    )
