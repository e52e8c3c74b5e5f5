"""A `halephant_select_pool` plugin that sends every user named ``tenant_*`` to one pool: database
``myapp`` as the upstream role ``myapp``, for tests of fair queueing between users sharing a pool."""

from __future__ import annotations

from halephant import hookimpl
from halephant.types import ClientInfo, Config, PoolMode, PoolTarget

_targets: dict[tuple[int, str], PoolTarget] = {}


@hookimpl
def halephant_select_pool(client: ClientInfo, config: Config) -> PoolTarget | None:
    if not client.user.startswith("tenant_") or client.database not in config.databases:
        return None
    key = (id(config), client.database)
    target = _targets.get(key)
    if target is None:
        db = config.databases[client.database]
        target = _targets[key] = PoolTarget(
            database=client.database,
            cluster=db.cluster,
            server_database=db.server_database,
            server_user="myapp",
            server_password="myapp",
            mode=PoolMode(db.mode),
            reason="shared_pool: tenants share myapp's pool",
        )
    return target
