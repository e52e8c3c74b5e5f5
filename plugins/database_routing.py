"""Database-based routing: the client's `dbname` picks a `databases:` entry, which names the cluster, the
upstream database and the pool mode; the client's user picks the upstream user and password.

A database not listed is served by the catch-all entry `'*'` when there is one (like PgBouncer's
auto-database), on the cluster it names, under the client's own database name upstream; without it the
client gets 3D000 (sent after authentication, as PostgreSQL does).

A user with `server_user` logs in upstream as that other user (with that user's upstream password) but
keeps pools of its own; a `read_only` user's server connections start with
`default_transaction_read_only=on`.

Because one port serves every database, a client's `DROP DATABASE x` would fail on halephant's own idle
server connections to `x` (PostgreSQL refuses while other sessions are connected): they are closed first.
"""

from __future__ import annotations

from halephant import hookimpl, sqlstate
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
        server_password = user.upstream_password
        if user.server_user is not None:
            upstream = config.users.get(user.server_user)
            server_user = user.server_user
            server_password = upstream.upstream_password if upstream is not None else None
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


@hookimpl(trylast=True)
def halephant_inspect_query(statement: Statement) -> CloseIdleServers | None:
    # Runs for every statement: one cached attribute decides for nearly all of them.
    if statement.first_keyword != "DROP":
        return None
    database = _dropped_database(statement.text)
    if database is None:
        return None
    return CloseIdleServers(database, reason=f"DROP DATABASE {database}: closing idle connections to it")


def _dropped_database(text: str) -> str | None:
    """The database of `DROP DATABASE [IF EXISTS] name [[WITH] (options)]`, as PostgreSQL folds it."""
    tokens = [(k, v) for k, v in iter_tokens(text, upper_words=False) if k in (WORD, QUOTED_IDENTIFIER)]
    words = [v.upper() if k == WORD else "" for k, v in tokens[:5]]
    i = 2
    if words[:2] != ["DROP", "DATABASE"]:
        return None
    if words[2:4] == ["IF", "EXISTS"]:
        i = 4
    if i >= len(tokens):
        return None
    kind, name = tokens[i]
    if kind == QUOTED_IDENTIFIER:
        return name[1:-1].replace('""', '"') if name.startswith('"') and name.endswith('"') else None
    return name.lower()
