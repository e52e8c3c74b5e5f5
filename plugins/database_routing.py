"""Database-based routing: the client's `dbname` picks a `databases:` entry, which names the cluster, the
upstream database and the pool mode; the client's user picks the upstream user and password.

Unknown databases get 3D000 (sent after authentication, as PostgreSQL does).
"""

from __future__ import annotations

from halephant import hookimpl, sqlstate
from halephant.types import ClientInfo, Config, PoolMode, PoolTarget, Reject


@hookimpl(trylast=True)
def halephant_select_pool(client: ClientInfo, config: Config) -> PoolTarget | Reject:
    db = config.databases.get(client.database)
    if db is None:
        return Reject(
            sqlstate.INVALID_CATALOG_NAME,
            f'database "{client.database}" does not exist',
            reason=f"no databases entry named {client.database!r}",
        )
    user = config.users.get(client.user)
    server_password = None
    if user is not None:
        server_password = user.upstream_password
    return PoolTarget(
        database=client.database,
        cluster=db.cluster,
        server_database=db.database or client.database,
        server_user=client.user,
        server_password=server_password,
        mode=PoolMode(db.mode),
        reason=f"database {client.database} -> cluster {db.cluster}",
    )
