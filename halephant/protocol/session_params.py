"""The settings a client asked for in its StartupMessage, and the SQL that brings a server to them.

PostgreSQL applies every startup parameter other than `user`, `database`, `replication` and `options`
as a setting, and the `-c name=value` / `--name=value` switches inside `options` too. A pooled server
was started with none of them, so halephant applies them itself when it links a server to the client:
only the difference from what the server holds now, with `set_config()` (which takes the value exactly
as the startup packet carries it, lists such as search_path included) and `RESET` for what must go.
Set that way, they are session values, which `RESET` would take back to the server's defaults where
PostgreSQL takes them back to the startup values: `restore_sql` sets them again after one.
The values are written so that the server reads them right whatever `client_encoding` the previous
client left it with (`halephant.protocol.session_queries.literal`).
"""

from __future__ import annotations

import re

from halephant import sqlstate
from halephant.errors import ClientError
from halephant.protocol.session_queries import literal

#: startup parameters that are not settings
NOT_SETTINGS = frozenset(("user", "database", "replication", "options"))
_NO_SETTINGS: dict[str, str] = {}
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?")


def _split_options(options: str) -> list[str]:
    # libpq's rule: whitespace separates switches, a backslash escapes the next character
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


def startup_settings(params: dict[str, str]) -> dict[str, str]:
    """Settings requested at startup, names lower-cased as PostgreSQL folds them."""
    settings = {name.lower(): value for name, value in params.items() if name not in NOT_SETTINGS}
    words = _split_options(params.get("options", ""))
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            assignment = words[i + 1]
            i += 2
        elif word.startswith("-c") or word.startswith("--"):
            assignment = word[2:]
            i += 1
        elif not word.startswith("-"):
            # PostgreSQL's own code and text for a word that is no switch at all
            raise ClientError(
                sqlstate.SYNTAX_ERROR,
                f"invalid command-line argument for server process: {word}",
                hint='Try "postgres --help" for more information.',
                fatal=True,
            )
        else:
            raise ClientError(
                sqlstate.FEATURE_NOT_SUPPORTED,
                f"unsupported command-line switch in options: {word}",
                hint="Only -c name=value and --name=value are supported in the options parameter.",
                fatal=True,
            )
        name, sep, value = assignment.partition("=")
        if not sep:
            raise ClientError(sqlstate.SYNTAX_ERROR, f"-c {assignment} requires a value", fatal=True)
        settings[name.replace("-", "_").lower()] = value
    if not settings:
        return _NO_SETTINGS  # shared (never mutated): idle clients are many
    for name in settings:
        if not _SETTING_NAME.fullmatch(name):
            raise ClientError(
                sqlstate.UNDEFINED_OBJECT, f'unrecognized configuration parameter "{name}"', fatal=True
            )
    return settings


def settings_sql(current: dict[str, str], wanted: dict[str, str]) -> str:
    """SQL taking a server from the settings in `current` to those in `wanted` ("" when nothing to do)."""
    parts = [f"RESET {name}" for name in current if name not in wanted]
    changes = [
        f"pg_catalog.set_config({literal(name)}, {literal(value)}, false)"
        for name, value in wanted.items()
        if current.get(name) != value
    ]
    if changes:
        parts.append("SELECT " + ", ".join(changes))
    return "; ".join(parts)


def restore_sql(settings: dict[str, str]) -> str:
    """SQL setting each of the startup `settings` again where the session holds no value of its own any
    more (`pg_settings.source` is not `session`: a `RESET`, `RESET ALL`, `DISCARD ALL` or `SET x TO
    DEFAULT` took it back to the server's default), leaving those set since as they are."""
    values = ", ".join(f"({literal(name)}, {literal(value)})" for name, value in settings.items())
    return (
        "SELECT pg_catalog.set_config(t.n, t.v, false) "
        f"FROM (VALUES {values}) AS t(n, v) WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_settings s "
        "WHERE pg_catalog.lower(s.name) = t.n AND s.source = 'session')"
    )
