"""Refuse `DECLARE … WITH HOLD` in transaction pools: the default `halephant_inspect_query` policy.

Why: in transaction pooling a client keeps a server connection only until its transaction ends. A plain
cursor dies at COMMIT, so it is safe (and PostgreSQL itself refuses a non-holdable DECLARE outside a
transaction block, 25P01). A `WITH HOLD` cursor outlives COMMIT: it stays on the server connection that
has just gone back to the pool, holding memory and visible to whichever client gets that connection
next, while this client's next `FETCH` may land on another connection: it fails with 34000 "cursor does
not exist", or reads another client's cursor that has the same name. Django's server-side
cursors in autocommit are exactly this, which is why its documentation for poolers says
`DISABLE_SERVER_SIDE_CURSORS = True`.

The statement is rejected with 0A000 (feature_not_supported) and a hint naming both fixes; the client's
session stays usable. Session pools are left alone. This plugin is the `with_hold` row of the
session-feature table: with `databases.<name>.session_features.with_hold: pin` the cursor is allowed
and the client keeps its server until it closes the cursor (`Pin(..., feature="with_hold")`).

Settings, in halephant.yaml::

    plugins:
      cursor_guard:
        action: reject   # or "allow": let holdable cursors through (you accept the risk above)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from halephant import hookimpl, ignores_plain_statements, sqlstate
from halephant.types import ClientInfo, Pin, PoolInfo, PoolMode, Reject, Statement

if TYPE_CHECKING:
    from halephant.types import Config

__all__ = [
    "HINT",
    "MESSAGE",
    "SECTION",
    "CursorGuardSettings",
    "halephant_configure",
    "halephant_inspect_query",
    "halephant_plugin_settings",
]

#: The section name: `plugins.cursor_guard` in halephant.yaml.
SECTION = "cursor_guard"
MESSAGE = "DECLARE ... WITH HOLD is not supported in transaction pooling"
HINT = (
    "A holdable cursor outlives its transaction, but in transaction pooling the next statement may run on "
    "another server connection. Use session pooling for this database (databases.{database}.mode: session "
    "in halephant.yaml), or declare the cursor without WITH HOLD inside BEGIN ... COMMIT. "
    "Django: set DISABLE_SERVER_SIDE_CURSORS = True in the database settings."
)


class CursorGuardSettings(BaseModel):
    """`plugins.cursor_guard`: what to do with a holdable cursor in a transaction pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: `reject` answers 0A000 with a hint; `allow` lets the statement through.
    action: Literal["reject", "allow"] = "reject"


class _Current:
    """The settings in force.

    `halephant_configure` runs once per config load and reload, while the inspect hook runs per statement:
    the hook reads one attribute here instead of looking the section up in the config every time. A reload
    replaces the object in one assignment, so a statement sees either the old settings or the new ones.
    Until the first configure call the defaults apply, so the guard fails closed.
    """

    __slots__ = ("config", "settings")

    def __init__(self) -> None:
        self.settings = CursorGuardSettings()
        #: the configuration in force: each database's `session_features.with_hold`
        self.config: Config | None = None


_current = _Current()
_SESSION = PoolMode.SESSION  # a module constant: an enum member lookup per statement costs ~60 ns


@hookimpl
def halephant_plugin_settings() -> tuple[str, type[BaseModel]]:
    return (SECTION, CursorGuardSettings)


@hookimpl
def halephant_configure(config: Config) -> None:
    settings = config.plugin_settings(SECTION)
    # The section is optional in halephant.yaml: no section means the defaults.
    _current.settings = settings if isinstance(settings, CursorGuardSettings) else CursorGuardSettings()
    _current.config = config


@hookimpl(trylast=True)
@ignores_plain_statements  # answers None for every plain statement (tested)
def halephant_inspect_query(client: ClientInfo, statement: Statement, pool: PoolInfo) -> Reject | Pin | None:
    # Cheapest tests first: this runs for every Query and Parse, and nearly every statement is no cursor.
    if pool.mode is _SESSION or _current.settings.action != "reject":
        return None
    if not statement.declares_holdable_cursor:
        return None
    config = _current.config
    # the database's own entry, or the catch-all '*' entry that serves it
    db = config.database_for(pool.target.entry_name) if config is not None else None
    if db is not None and db.session_features.with_hold == "pin":
        return Pin(f"cursor_guard: DECLARE ... WITH HOLD in {pool.database}", feature="with_hold")
    return Reject(
        sqlstate.FEATURE_NOT_SUPPORTED,
        MESSAGE,
        hint=HINT.format(database=pool.database),
        reason=f"cursor_guard: DECLARE ... WITH HOLD from {client.user} in transaction pool {pool.database}",
    )
