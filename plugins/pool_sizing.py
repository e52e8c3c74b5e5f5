"""Pool sizes from the config: `databases.<name>.pool_size` server connections at most,
`min_pool_size` kept warm and `reserve_pool_size` extra for clients that waited too long, per database,
user and node."""

from __future__ import annotations

from halephant import hookimpl
from halephant.types import Config, PoolSize, PoolTarget


@hookimpl(trylast=True)
def halephant_pool_size(pool: PoolTarget, config: Config) -> PoolSize | None:
    db = config.database_for(pool.entry_name)
    if db is None:
        return None
    return PoolSize(
        min=db.min_pool_size,
        max=db.pool_size,
        reserve=db.reserve_pool_size,
        reason=f"databases.{db.name}.pool_size",
    )
