"""A `halephant_pool_size` plugin that reads the pool size from a file, for tests of reloads: the file
named by ``HALEPHANT_TEST_POOL_SIZE_FILE`` holds the size of every pool (none: not mine), read each time
a pool is sized (at its creation and after each reload), as a plugin sizing pools from a tenant table
would. ``HALEPHANT_TEST_POOL_SIZE_RECHECK`` (seconds) makes each answer ask to be asked again that much
later (`PoolSize.recheck_after`), as a plugin sizing pools by the clock does."""

from __future__ import annotations

import os

from halephant import hookimpl
from halephant.types import PoolSize, PoolTarget


@hookimpl
def halephant_pool_size(pool: PoolTarget) -> PoolSize | None:
    path = os.environ.get("HALEPHANT_TEST_POOL_SIZE_FILE")
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        size = int(f.read())
    recheck = os.environ.get("HALEPHANT_TEST_POOL_SIZE_RECHECK")
    return PoolSize(
        min=0,
        max=size,
        reason=f"size_from_file: {size}",
        recheck_after=float(recheck) if recheck else None,
    )
