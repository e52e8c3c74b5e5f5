"""Give chosen databases a bigger pool than `databases.<name>.pool_size`: `halephant_pool_size`.

Why: pool sizes usually come from halephant.yaml, but a plugin may size pools from anywhere (a tenant
table, a billing plan, the time of day). This one reads a dict in the module; pools of other databases
are left to the next plugin (the default reads `pool_size` and `min_pool_size` from the config).

The answer is asked for when a pool is created and after each reload, never per checkout (for a size that
changes by itself, see `peak_hours_pool_size.py` and `PoolSize.recheck_after`).
"""

from __future__ import annotations

from typing import Final

from halephant import hookimpl
from halephant.types import Config, PoolSize, PoolTarget

#: Server connections at most, per user and node, for the pools of these databases (`databases:` keys).
POOL_SIZES: Final[dict[str, int]] = {"analytics": 50}


@hookimpl
def halephant_pool_size(pool: PoolTarget, config: Config) -> PoolSize | None:
    size = POOL_SIZES.get(pool.database)
    if size is None:
        return None
    entry = config.database_for(pool.entry_name)  # the entry whose settings the pool follows
    if entry is None:
        return None
    # The answer replaces the default's whole: keep the configured warm minimum (never above the new
    # maximum) and reserve.
    return PoolSize(
        min=min(entry.min_pool_size, size),
        max=size,
        reserve=entry.reserve_pool_size,
        reason=f"tenant_pool_size: {pool.database} is sized {size}",
    )
