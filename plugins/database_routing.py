"""Database-based routing: the client's `dbname` picks a `databases:` entry, which names the cluster, the
upstream database and the pool mode; the client's user picks the upstream user and password.

Unknown databases get 3D000 (sent after authentication, as PostgreSQL does).
"""

from __future__ import annotations

from halephant import hookimpl, sqlstate
from halephant.types import ClientInfo, Config, PoolMode, PoolTarget, Reject

# One PoolTarget per (config, database, user), shared by that pool's clients: idle clients are many.
_targets: dict[tuple[int, str, str], PoolTarget] = {}


@hookimpl(trylast=True)
def halephant_configure(config: Config) -> None:
    _targets.clear()  # a reload may change any of it


@hookimpl(trylast=True)
def halephant_select_pool(client: ClientInfo, config: Config) -> PoolTarget | Reject:
    key = (id(config), client.database, client.user)
    target = _targets.get(key)
    if target is None:
        answer = _select(client, config)
        if isinstance(answer, Reject):
            return answer
        target = _targets[key] = answer
    return target


def _select(client: ClientInfo, config: Config) -> PoolTarget | Reject:
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
