"""Users looked up in PostgreSQL (`auth_user` / `auth_query`, a `LookUp` answer of `halephant_authenticate`),
sans-IO: the lookup's side of the protocol, the answers kept for a while, and what a looked-up user's
server connections log in with.

`LookupSession` logs in as the `auth_user` (through `halephant.auth.upstream`) and runs the query with the
extended protocol, the user name bound as the text parameter `$1` (never written into the SQL). The
first row's second column is the stored password: a SCRAM verifier, an md5 hash, or NULL.

Answers are kept by (cluster, database, auth_user, query, user) for the `LookUp`'s `cache_for` seconds, a
missing user's too (so a stream of logins under a wrong name does not become a stream of queries), and
all are forgotten on reload (`forget`). A password changed with ALTER ROLE therefore counts for new logins
at most `cache_for` seconds later.

The latest password found for each (cluster, role) is also what that role's server connections log in
with (`upstream_secret`): by pass-through, the ClientKey of a client's SCRAM login against the verifier
(`halephant.auth.passthrough`) or the md5 hash as it is. It is kept across reloads (PostgreSQL's roles
do not change with halephant's file), so pools of looked-up users keep opening servers until the next
lookup. Nothing here is logged or written anywhere.
"""

from __future__ import annotations

import time
from typing import Final

from halephant.auth.own_session import OwnSession
from halephant.config.schema import is_md5_hash, is_scram_verifier
from halephant.protocol import messages as m
from halephant.types import AuthMethod, Md5, PoolTarget, ScramSha256

__all__ = [
    "APPLICATION_NAME",
    "LookupFailed",
    "LookupSession",
    "cached",
    "forget",
    "found",
    "keep",
    "method_for",
    "upstream_secret",
]

#: application_name of the lookup connections, so operators can tell them apart in pg_stat_activity
APPLICATION_NAME = "halephant auth_query"

#: (cluster, database, auth_user, query, user)
Key = tuple[str, str, str, str, str]

_answers: dict[Key, tuple[float, str | None]] = {}
_logins: dict[tuple[str, str], str] = {}
#: answers and roles kept at most (a flood of made-up names must not grow them without bound)
_KEPT: Final = 10_000


class LookupFailed(Exception):
    """The lookup could not tell: the message says why, for the log (PostgreSQL's error, with its
    SQLSTATE). `reached` is False when the server was never logged in to."""

    def __init__(self, message: str, reached: bool = True) -> None:
        super().__init__(message)
        self.reached = reached


class LookupSession(OwnSession):
    """The lookup's side of the protocol, sans-IO: `startup()`, then `query()`; `feed()` what arrives."""

    __slots__ = ()
    application_name = APPLICATION_NAME

    def failed(self, message: str, login: bool) -> Exception:
        if login:
            return LookupFailed(f"login as the auth_user failed: {message}", reached=False)
        return LookupFailed(message)

    def query(self, sql: str, user: str) -> bytes:
        self.begin()
        return m.extended_query(sql, [user])

    def result(self) -> str | None:
        """The stored password the query gave (None: no row, or NULL), once its ReadyForQuery arrived."""
        if self.error is not None:
            raise LookupFailed(f"auth_query failed: {self.error}")
        if not self.rows:
            return None
        row = self.rows[0]
        if len(row) < 2:
            raise LookupFailed(f"auth_query returned {len(row)} column(s): expected the name, the password")
        if len(self.rows) > 1:
            raise LookupFailed(f"auth_query returned {len(self.rows)} rows: expected one")
        return row[1] or None


def method_for(user: str, secret: str | None) -> AuthMethod:
    """The exchange that checks a client against what the lookup found (without saying what it found)."""
    if secret is None:
        return ScramSha256(None, reason=f"user {user!r} not found by auth_query: mock exchange")
    if is_md5_hash(secret):
        return Md5(secret, reason=f"user {user}: md5, from auth_query")
    if is_scram_verifier(secret):
        return ScramSha256(secret, reason=f"user {user}: scram-sha-256, from auth_query")
    return ScramSha256(secret, reason=f"user {user}: scram-sha-256 (a plaintext password), from auth_query")


def cached(key: Key) -> tuple[bool, str | None]:
    """(True, the answer) when one younger than its `cache_for` is kept, else (False, None)."""
    kept = _answers.get(key)
    if kept is None:
        return False, None
    if time.monotonic() >= kept[0]:
        del _answers[key]
        return False, None
    return True, kept[1]


def keep(key: Key, secret: str | None, cache_for: float) -> None:
    """Keep an answer for `cache_for` seconds (0: not at all)."""
    if cache_for <= 0:
        return
    if len(_answers) >= _KEPT:
        now = time.monotonic()
        for stale in [k for k, (until, _) in _answers.items() if until <= now]:
            del _answers[stale]
        if len(_answers) >= _KEPT:
            del _answers[next(iter(_answers))]
    _answers[key] = (time.monotonic() + cache_for, secret)


def found(cluster: str, role: str, secret: str) -> None:
    """The lookup found `secret` for `role` on `cluster`: its server connections log in with it."""
    key = (cluster, role)
    if key not in _logins and len(_logins) >= _KEPT:
        del _logins[next(iter(_logins))]
    _logins[key] = secret


def upstream_secret(target: PoolTarget) -> str | None:
    """What a pool's server connections log in with: the target's `server_password`, else, for a user
    looked up with `auth_query`, the latest password found for its role on the target's cluster."""
    if target.server_password is not None:
        return target.server_password
    return _logins.get((target.cluster, target.server_user))


def looked_up_roles() -> set[tuple[str, str]]:
    """(cluster, role) of every user a lookup found (the admin views)."""
    return set(_logins)


def forget() -> None:
    """Forget every kept answer (a reload: auth_user or auth_query may have changed)."""
    _answers.clear()


def forget_all() -> None:
    """Forget answers and upstream passwords alike (tests)."""
    _answers.clear()
    _logins.clear()
