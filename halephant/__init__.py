"""halephant: a PostgreSQL connection pooler and proxy with pluggable policies.

The public surface for plugins is this module (`hookimpl`, `__version__`), `halephant.types`,
`halephant.sqlstate` and `halephant.sql`. Everything else is internal and may change.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT = "halephant"

#: Marker for hook implementations: ``@hookimpl`` or ``@hookimpl(trylast=True)``.
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "__version__", "hookimpl"]
