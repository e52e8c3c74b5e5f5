"""Database-based routing: the client's `dbname` picks a `databases:` entry, which names the cluster, the
upstream database and the pool mode; the client's user picks the upstream user and password.

A database not listed is served by the catch-all entry `'*'` when there is one (like PgBouncer's
auto-database), on the cluster it names, under the client's own database name upstream; without it the
client gets 3D000 (sent after authentication, as PostgreSQL does).

The upstream password is the user's `server_password`, else its `password`, which may be a SCRAM
verifier or md5 hash that halephant logs in with by pass-through (`halephant.auth.upstream`).
A user with `server_user` logs in upstream as that other user (with that user's upstream password) but
keeps pools of its own; a `read_only` user's server connections start with
`default_transaction_read_only=on`.

Because one port serves every database, a client's `DROP DATABASE x` would fail on halephant's own idle
server connections to `x` (PostgreSQL refuses while other sessions are connected): they are closed first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from halephant import hookimpl, ignores_plain_statements, sqlstate
from halephant.sql import QUOTED_IDENTIFIER, WORD, iter_tokens
from halephant.types import (
    ClientInfo,
    CloseIdleServers,
    Config,
    PoolMode,
    PoolTarget,
    Reject,
    Statement,
)

#: startup settings of a read-only user's server connections
READ_ONLY_SETTINGS = (("default_transaction_read_only", "on"),)

# One PoolTarget per (config, database, user), shared by that pool's clients: idle clients are many.
_targets: dict[tuple[int, str, str], PoolTarget] = {}


@hookimpl(trylast=True)
def halephant_configure(config: Config) -> None:
    _targets.clear()  # a reload may change any of it


@hookimpl(trylast=True)
def halephant_select_pool(client: ClientInfo, config: Config) -> PoolTarget | Reject:
    if client.settings and _read_write_at_startup(client, config):
        return Reject(
            sqlstate.READ_ONLY_SQL_TRANSACTION,
            f'user "{client.user}" is read-only: default_transaction_read_only cannot be set at startup',
            hint=f"users.{client.user}.read_only is set in halephant.yaml.",
            reason=f"read-only user {client.user} asked for default_transaction_read_only at startup",
        )
    key = (id(config), client.database, client.user)
    target = _targets.get(key)
    if target is None:
        answer = _select(client, config)
        if isinstance(answer, Reject):
            return answer
        if len(_targets) > 10000:
            _targets.clear()  # '*' lets clients name any database: never grow without bound
        target = _targets[key] = answer
    return target


def _read_write_at_startup(client: ClientInfo, config: Config) -> bool:
    """A read-only user's startup settings (parameters or `options=-c ...`) that touch its read-only
    setting: they would be applied to its server connections, after the pool's own. Read from
    `client.settings`, where names are folded to lower case as PostgreSQL folds them (a check of the
    raw parameters would let `Default_Transaction_Read_Only=off` through)."""
    user = config.users.get(client.user)
    if user is None or not user.read_only:
        return False
    for name in _READ_ONLY_NAMES:
        value = client.settings.get(name)
        if value is not None and value.strip().lower() not in _TRUE_WORDS:
            return True
    return False


#: the settings that make a session read-write when set to false
_READ_ONLY_NAMES: Final = ("default_transaction_read_only", "transaction_read_only")
#: the spellings of true PostgreSQL accepts for a boolean setting (unique prefixes of true and yes)
_TRUE_WORDS: Final = frozenset(("on", "1", "t", "tr", "tru", "true", "y", "ye", "yes"))


def _select(client: ClientInfo, config: Config) -> PoolTarget | Reject:
    db = config.database_for(client.database)
    if db is None:
        return Reject(
            sqlstate.INVALID_CATALOG_NAME,
            f'database "{client.database}" does not exist',
            reason=f"no databases entry named {client.database!r}",
        )
    listed = db.name == client.database
    user = config.users.get(client.user)
    server_user: str = client.user
    server_password: str | None = None
    settings: tuple[tuple[str, str], ...] = ()
    how = ""
    if user is not None:
        server_password = user.upstream_secret
        if user.server_user is not None:
            upstream = config.users.get(user.server_user)
            server_user = user.server_user
            server_password = upstream.upstream_secret if upstream is not None else None
            how = f", upstream as {server_user}"
        if user.read_only:
            settings = READ_ONLY_SETTINGS
            how += ", read-only"
    return PoolTarget(
        database=client.database,
        cluster=db.cluster,
        server_database=db.server_database if listed else client.database,
        server_user=server_user,
        server_password=server_password,
        mode=PoolMode(db.mode),
        reason=f"database {client.database} -> cluster {db.cluster}"
        + ("" if listed else " (databases.'*')")
        + how,
        user=client.user,
        server_settings=settings,
    )


_NEEDS_NO_SESSIONS: Final = frozenset({"DROP", "ALTER", "CREATE"})


@hookimpl(trylast=True)
@ignores_plain_statements  # answers None for every plain statement (tested)
def halephant_inspect_query(statement: Statement) -> CloseIdleServers | None:
    # Runs for every statement: one cached attribute decides for nearly all of them.
    if statement.first_keyword not in _NEEDS_NO_SESSIONS:
        return None
    found = _database_without_sessions(statement.text)
    if found is None:
        return None
    what, database = found
    return CloseIdleServers(database, reason=f"{what} {database}: closing idle connections to it")


def _database_without_sessions(text: str) -> tuple[str, str] | None:
    """The database a statement needs no other session connected to, as PostgreSQL folds its name:
    `DROP DATABASE [IF EXISTS] x`, `ALTER DATABASE x RENAME TO y`, and the template of
    `CREATE DATABASE y ... TEMPLATE [=] x` (how Django's `test --parallel` clones its test database)."""
    tokens = [(k, v) for k, v in iter_tokens(text, upper_words=False) if k in (WORD, QUOTED_IDENTIFIER)]
    words = [v.upper() if k == WORD else "" for k, v in tokens[:64]]
    if words[1:2] != ["DATABASE"]:
        return None
    if words[0] == "DROP":
        i = 4 if words[2:4] == ["IF", "EXISTS"] else 2
        return _name(tokens, i, "DROP DATABASE")
    if words[0] == "ALTER" and words[3:5] == ["RENAME", "TO"]:
        return _name(tokens, 2, "ALTER DATABASE")
    if words[0] == "CREATE" and "TEMPLATE" in words[3:]:
        return _name(tokens, words.index("TEMPLATE", 3) + 1, "CREATE DATABASE ... TEMPLATE")
    return None


def _name(tokens: Sequence[tuple[str, str]], i: int, what: str) -> tuple[str, str] | None:
    if i >= len(tokens):
        return None
    kind, name = tokens[i]
    if kind == QUOTED_IDENTIFIER:
        if not (name.startswith('"') and name.endswith('"') and len(name) >= 2):
            return None
        return what, name[1:-1].replace('""', '"')
    return what, name.lower()
