"""Client connection limits, refused with FATAL 53300 as PostgreSQL refuses connections beyond its own.

`limits.max_client_conn` bounds every connection (checked at the StartupMessage, with PostgreSQL's
"sorry, too many clients already"); `databases.<name>.max_client_conn` and `users.<name>.max_client_conn`
bound logged-in clients, checked once the password is proven, so an unauthenticated peer can neither
probe nor use up another user's allowance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from halephant import sqlstate
from halephant.config import Config
from halephant.errors import ClientError

if TYPE_CHECKING:
    from halephant.types import PoolTarget


class ClientCounts:
    """Logged-in clients per database and per user."""

    __slots__ = ("by_database", "by_user")

    def __init__(self) -> None:
        self.by_database: dict[str, int] = {}
        self.by_user: dict[str, int] = {}

    def admit(self, config: Config, target: PoolTarget, user: str) -> ClientError | None:
        """Count a client of `target` in, or say why it may not log in (nothing is counted then)."""
        database = target.database
        db, u = config.database_for(target.entry_name), config.users.get(user)
        n_db, n_user = self.by_database.get(database, 0), self.by_user.get(user, 0)
        if db is not None and db.max_client_conn is not None and n_db >= db.max_client_conn:
            return ClientError(
                sqlstate.TOO_MANY_CONNECTIONS,
                f'too many connections for database "{database}" (max_client_conn {db.max_client_conn})',
                fatal=True,
            )
        if u is not None and u.max_client_conn is not None and n_user >= u.max_client_conn:
            return ClientError(
                sqlstate.TOO_MANY_CONNECTIONS,
                f'too many connections for role "{user}" (max_client_conn {u.max_client_conn})',
                fatal=True,
            )
        self.by_database[database] = n_db + 1
        self.by_user[user] = n_user + 1
        return None

    def release(self, database: str, user: str) -> None:
        for counts, key in ((self.by_database, database), (self.by_user, user)):
            n = counts.get(key, 0) - 1
            if n > 0:
                counts[key] = n
            else:
                counts.pop(key, None)


def too_many_clients(config: Config, connected: int) -> ClientError | None:
    """The global limit, checked at the StartupMessage (`connected` includes this client)."""
    if connected > config.limits.max_client_conn:
        return ClientError(
            sqlstate.TOO_MANY_CONNECTIONS,
            f"sorry, too many clients already (halephant max_client_conn {config.limits.max_client_conn})",
            fatal=True,
        )
    return None
