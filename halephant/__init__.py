"""halephant: a PostgreSQL connection pooler and proxy with pluggable policies.

The public surface for plugins is this module (`hookimpl`, `__version__`), `halephant.types`,
`halephant.sqlstate` and `halephant.sql`. Everything else is internal and may change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pluggy

__version__ = "0.1.0"

PROJECT = "halephant"

#: Marker for hook implementations: ``@hookimpl`` or ``@hookimpl(trylast=True)``.
hookimpl = pluggy.HookimplMarker(PROJECT)

_F = TypeVar("_F", bound=Callable[..., object])

#: The attribute `ignores_plain_statements` sets on a hook implementation.
IGNORES_PLAIN = "halephant_ignores_plain_statements"


def ignores_plain_statements(function: _F) -> _F:
    """Mark a `halephant_inspect_query` implementation that answers None for every plain statement
    (`halephant.sql.Statement.plain`: one ordinary SELECT, INSERT, UPDATE, DELETE, VALUES, TABLE or
    WITH that leaves no session state). The core then does not call it for those, which are nearly all
    statements: when every inspector is marked, a plain statement costs no hook call at all.

    ``@hookimpl`` and this decorator may come in either order. An unmarked inspector sees every statement.
    """
    setattr(function, IGNORES_PLAIN, True)
    return function


__all__ = ["IGNORES_PLAIN", "PROJECT", "__version__", "hookimpl", "ignores_plain_statements"]
