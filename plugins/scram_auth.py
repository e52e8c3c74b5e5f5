"""Client authentication from the `users:` section: SCRAM-SHA-256 (the default), md5, or trust when a user
is explicitly configured with `auth: trust`.

A user not under `users:` whose database's entry sets `auth_user` is looked up in PostgreSQL (`LookUp`:
the core runs `auth_query` as the auth_user, then SCRAM or md5 against what it found, as PgBouncer does).
Other unknown users, and users the lookup does not find, get the same exchange as known ones against a
fake secret, and fail with 28P01, so user names cannot be enumerated.
"""

from __future__ import annotations

from halephant import hookimpl
from halephant.types import AuthMethod, ClientInfo, Config, LookUp, Md5, PoolTarget, ScramSha256, Trust


@hookimpl(trylast=True)
def halephant_authenticate(client: ClientInfo, pool: PoolTarget | None, config: Config) -> AuthMethod:
    user = config.users.get(client.user)
    if user is None:
        db = config.database_for(pool.entry_name) if pool is not None else None
        if pool is not None and db is not None and db.auth_user is not None:
            return LookUp(
                auth_user=db.auth_user,
                dbname=db.auth_dbname or pool.server_database,
                query=db.auth_query,
                cache_for=db.auth_cache,
                reason=f"user {client.user!r} not under users: looked up as {db.auth_user}",
            )
        return ScramSha256(None, reason=f"unknown user {client.user!r}: mock exchange")
    if user.auth == "trust":
        return Trust(reason=f"user {client.user} is configured with auth: trust")
    if user.auth == "md5":
        return Md5(user.password, reason=f"user {client.user}: md5")
    return ScramSha256(user.password, reason=f"user {client.user}: scram-sha-256")
