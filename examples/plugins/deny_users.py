"""Refuse chosen users at the door: `halephant_authenticate`.

Why: to lock an account out of the proxy at once (a leaked password, an application being retired)
without touching PostgreSQL's roles. A denied user gets 28000 (invalid_authorization_specification),
as PostgreSQL answers a pg_hba.conf `reject` line, before any password is asked for. Every other user is
left to the next plugin (the default authenticates from `users:` in halephant.yaml).
"""

from __future__ import annotations

from typing import Final

from halephant import hookimpl, sqlstate
from halephant.types import ClientInfo, Reject

#: User names that may not log in through halephant.
DENIED_USERS: Final[frozenset[str]] = frozenset({"intruder"})


@hookimpl
def halephant_authenticate(client: ClientInfo) -> Reject | None:
    if client.user not in DENIED_USERS:
        return None
    return Reject(
        sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
        f'user "{client.user}" may not connect through halephant',
        reason=f"deny_users: {client.user} is in DENIED_USERS",
    )
