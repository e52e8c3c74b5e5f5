"""Client authentication from the `users:` section: SCRAM-SHA-256 (the default), md5, or trust when a user
is explicitly configured with `auth: trust`.

Unknown users get the same exchange as known ones against a fake secret, and fail with 28P01, so user
names cannot be enumerated.
"""

from __future__ import annotations

from halephant import hookimpl
from halephant.types import AuthMethod, ClientInfo, Config, Md5, PoolTarget, ScramSha256, Trust


@hookimpl(trylast=True)
def halephant_authenticate(client: ClientInfo, pool: PoolTarget | None, config: Config) -> AuthMethod:
    user = config.users.get(client.user)
    if user is None:
        return ScramSha256(None, reason=f"unknown user {client.user!r}: mock exchange")
    if user.auth == "trust":
        return Trust(reason=f"user {client.user} is configured with auth: trust")
    if user.auth == "md5":
        return Md5(user.password, reason=f"user {client.user}: md5")
    return ScramSha256(user.password, reason=f"user {client.user}: scram-sha-256")
