"""Session settings a client may change with SET in transaction pooling without being pinned.

A `SET` outside a transaction leaves state on the server connection, so by default the client is pinned to
that server. For the settings named here halephant does what it does for startup parameters instead: it
records the value as one of the client's settings and brings every server it links to that value (only
the difference, before the client's own messages), so the client's later transactions can still be
routed and pooled. `default_transaction_read_only` is the one that matters for routing: after
`SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY` a client's transactions may go to a replica, and
stay read-only if they land on the primary.

Only a plain, single-statement `SET` to a boolean is carried; `RESET`, `TO DEFAULT`, `SET` inside a
transaction block (it could still roll back) and anything with other effects keep the pinning rule.
"""

from __future__ import annotations

from typing import Final

from halephant.sql import Statement, parse_bool, setting_changes

__all__ = ["TRACKED", "carried", "merge", "tracked_change"]

#: settings carried from server to server by halephant when a client SETs them, with PostgreSQL's default
TRACKED: Final = {"default_transaction_read_only": "off"}


def tracked_change(statement: Statement) -> dict[str, str] | None:
    """The settings a session-level SET assigns, normalized as the server reports them, when every one
    is tracked; None otherwise (the client is then pinned as for any other SET)."""
    if statement.is_multi_statement:
        return None  # one implicit transaction: a later error would roll the SET back
    changes = setting_changes(statement.text)
    if not changes:
        return None
    out: dict[str, str] = {}
    for change in changes:
        if change.local or change.name not in TRACKED or change.value is None:
            return None
        value = parse_bool(change.value)
        if value is None:
            return None
        out[change.name] = "on" if value else "off"
    return out


def merge(settings: dict[str, str], change: dict[str, str], startup: dict[str, str]) -> dict[str, str]:
    """`settings` after `change`; a value equal to the server's own default is dropped rather than kept,
    so servers are not set again at every checkout for nothing (`startup`: the pool's server settings)."""
    out = dict(settings)
    for name, value in change.items():
        if value == startup.get(name, TRACKED[name]):
            out.pop(name, None)
        else:
            out[name] = value
    return out


def carried(name: str, value: str, client_settings: dict[str, str], server_settings: dict[str, str]) -> bool:
    """A server reported `name = value` (ParameterStatus): True when that is the client's own tracked
    setting, already recorded for both, so the server holds nothing another client could inherit."""
    default = TRACKED.get(name)
    if default is None:
        return False
    return client_settings.get(name, default) == value == server_settings.get(name, default)
