"""The session-feature policy table of each database: the default `halephant_inspect_query` for LISTEN,
advisory locks, temporary tables, SQL PREPARE, SET ROLE / SESSION AUTHORIZATION and LOAD.

Why: in transaction pooling a client has a server only for one transaction, but these features live as
long as the server connection. Per database the operator chooses, in `halephant.yaml`::

    databases:
      myapp:
        session_features:
          listen: emulate        # emulate | pin | reject
          advisory_locks: pin    # pin | reject
          with_hold: reject      # pin | reject   (applied by the cursor_guard plugin)
          temp_tables: pin       # pin | reject
          prepare: emulate       # emulate | pin | reject
          set_role: pin          # pin | reject
          load: reject           # pin | reject

`reject` answers `Reject` (0A000 with a hint; the statement never runs, the client stays usable).
`pin` answers `Pin(reason, feature=...)`: the client keeps its server until it releases the feature
(UNLISTEN, advisory unlock, CLOSE, DROP of its temporary tables, RESET ROLE, DEALLOCATE) or leaves;
the core logs each pin and its release. `emulate` answers nothing: the core then emulates (LISTEN
through a shared listener connection per database, SQL PREPARE prepared again on each server).
Session pools are left alone. Any plugin answering `halephant_inspect_query` first overrides this; a
feature that no plugin rejects or pins and that cannot be emulated is pinned by the core regardless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from halephant import hookimpl, ignores_plain_statements, sqlstate
from halephant.sql import session_effects
from halephant.types import ClientInfo, DatabaseConfig, Pin, PoolInfo, PoolMode, Reject, Statement

if TYPE_CHECKING:
    from halephant.types import Config

__all__ = ["HINT", "MESSAGES", "halephant_configure", "halephant_inspect_query"]

#: what the client is told per rejected feature
MESSAGES = {
    "listen": "LISTEN is not supported in transaction pooling",
    "advisory_locks": "session-level advisory locks are not supported in transaction pooling",
    "temp_tables": "temporary tables that outlive their transaction are not supported in transaction pooling",
    "prepare": "SQL PREPARE is not supported in transaction pooling",
    "set_role": "SET ROLE and SET SESSION AUTHORIZATION are not supported in transaction pooling",
    "load": "LOAD is not supported in transaction pooling",
}
HINT = (
    "In transaction pooling the next transaction may run on another server connection. Use session "
    "pooling for this database (databases.{database}.mode: session in halephant.yaml), or set "
    "databases.{database}.session_features.{feature}: pin to keep the server until the feature is released."
)


class _Current:
    """The configuration in force (its policy tables); replaced whole on every reload."""

    __slots__ = ("config",)

    def __init__(self) -> None:
        self.config: Config | None = None


_current = _Current()
_DEFAULT = DatabaseConfig(cluster="")


@hookimpl
def halephant_configure(config: Config) -> None:
    _current.config = config


@hookimpl(trylast=True)
@ignores_plain_statements  # answers None for every plain statement (tested)
def halephant_inspect_query(client: ClientInfo, statement: Statement, pool: PoolInfo) -> Reject | Pin | None:
    # Cheapest tests first: this runs for every Query and Parse, and nearly every statement has no effect.
    # (statement pooling is transaction pooling: its clients change servers as often)
    if not statement.session_state or pool.mode is PoolMode.SESSION:
        return None
    config = _current.config
    # the database's own entry, or the catch-all '*' entry that serves it
    db = config.database_for(pool.target.entry_name) if config is not None else None
    policy = (db if db is not None else _DEFAULT).session_features
    pin: Pin | None = None
    for effect in session_effects(statement):
        feature = effect.feature
        if not effect.acquire or feature == "with_hold" or feature not in MESSAGES:
            continue  # releases, settings (always carried) and WITH HOLD (cursor_guard's) are not ours
        action = getattr(policy, feature)
        if action == "reject":
            return Reject(
                sqlstate.FEATURE_NOT_SUPPORTED,
                MESSAGES[feature],
                hint=HINT.format(database=pool.database, feature=feature),
                reason=f"session_features: {feature} from {client.user} in transaction pool {pool.database}",
            )
        if action == "pin" and pin is None:
            pin = Pin(f"session_features: {feature} ({statement.first_keyword})", feature=feature)
    return pin
