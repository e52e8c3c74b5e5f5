"""Running a `LookUp` (`auth_user` / `auth_query`) for a client's login: the I/O around
`halephant.auth.lookup`.

Each lookup is a short connection of its own to the primary of the client's cluster (over TLS as the
cluster's `tls:` says, like every connection to a node, its login bound to the node's certificate), logged
in as the auth_user, that runs the query once and ends with a Terminate. Not a server of the auth_user's
pool: a lookup then never waits behind that pool's clients (or takes a server from them), is bound by no
pool mode, cap or reset query, and leaves nothing on a server anyone else gets. What this costs (a login
per lookup) is bounded by the answers kept for `cache_for` seconds and by running one query for all the
clients that log in as the same user at the same time; at most `_CONCURRENT` lookups connect at once.

The lookup runs in the app's task group, never on the client's callbacks: the client waits in its AUTH
state, bounded by its `login_timeout` like any login (the lookup itself by the same time: a query still
running then is cancelled with a CancelRequest, or its backend would stay busy until it ends, one more
for every login that tries again). The result
reaches each waiting client through its callback, as the exchange to run (`halephant.auth.lookup.
method_for`) or as the error that ends its login: 08006 when the primary cannot be reached or refuses
the auth_user's login, 28000 when the query fails; either way with a log line that says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
import anyio.to_thread

from halephant import sqlstate
from halephant.auth import lookup
from halephant.auth.upstream import passthrough_unready
from halephant.errors import ClientError
from halephant.node_streams import cancel, close, log_in, until_ready
from halephant.server_tls import stream_certificate
from halephant.types import AuthMethod, LookUp, PoolTarget

if TYPE_CHECKING:
    from halephant.proxy.app import App

log = logging.getLogger("halephant.auth")

Done = Callable[[AuthMethod | ClientError], None]

#: lookup connections open at once, at most (a burst of made-up user names is not a burst of logins)
_CONCURRENT: Final = 8

_waiting: dict[lookup.Key, list[Done]] = {}
_slots: anyio.Semaphore | None = None


def look_up(app: App, target: PoolTarget, user: str, method: LookUp, done: Done) -> None:
    """Find `user`'s password as `method` says, then call `done` with the exchange to run or the error
    that ends the login: at once when a kept answer serves, else from a task."""
    key = (target.cluster, method.dbname, method.auth_user, method.query, user)
    hit, secret = lookup.cached(key)
    if hit:
        done(lookup.method_for(user, secret))
        return
    waiters = _waiting.get(key)
    if waiters is not None:  # the same lookup is running for another client: one answer for both
        waiters.append(done)
        return
    _waiting[key] = [done]
    app.spawn(_run, app, key, target, method, user)


async def _run(app: App, key: lookup.Key, target: PoolTarget, method: LookUp, user: str) -> None:
    result: AuthMethod | ClientError
    try:
        secret = await _query(app, target, method, user)
    except Exception as exc:
        result = _failed(target, method, user, exc)
    else:
        lookup.keep(key, secret, method.cache_for)
        if secret is not None:
            lookup.found(target.cluster, user, secret)
        result = lookup.method_for(user, secret)
    for done in _waiting.pop(key, ()):
        done(result)


async def _query(app: App, target: PoolTarget, method: LookUp, user: str) -> str | None:
    global _slots
    config = app.config
    entry = config.users.get(method.auth_user)
    if entry is None:
        raise lookup.LookupFailed(f"auth_user {method.auth_user!r} is not under users:", reached=False)
    role = entry.server_user or method.auth_user
    upstream = config.users.get(role)
    password = upstream.upstream_secret if upstream is not None else None
    unready = passthrough_unready(role, password)
    if unready is not None:
        raise lookup.LookupFailed(unready.message, reached=False)
    primary = app.manager.cluster_view(target.cluster).primary
    if primary is None:
        raise lookup.LookupFailed(f"no primary of cluster {target.cluster} is available", reached=False)
    if _slots is None:
        _slots = anyio.Semaphore(_CONCURRENT)
    tls = app.manager.tls_for(target.cluster)
    with anyio.fail_after(config.limits.login_timeout):
        async with _slots:
            try:
                stream, session = await log_in(
                    primary.host,
                    primary.port,
                    tls,
                    lambda stream: lookup.LookupSession(
                        role, password, method.dbname, stream_certificate(stream)
                    ),
                    "auth_query lookup",
                    _until_ready,
                )
            except OSError as exc:
                raise lookup.LookupFailed(
                    f"could not connect to {primary.host}:{primary.port}: {exc.strerror or exc}",
                    reached=False,
                ) from None
            try:
                await stream.send(session.query(method.query, user))
                await _until_ready(stream, session)
                return session.result()
            except anyio.get_cancelled_exc_class():
                # login_timeout passed while the query runs (a lock wait, an overloaded primary): left
                # alone it would hold its backend until it ends, one more for every login that retries
                if session.backend_key is not None:
                    app.spawn(cancel, primary.host, primary.port, tls, session.backend_key)
                raise
            finally:
                await close(stream, session)


async def _until_ready(stream: anyio.abc.ByteStream, session: lookup.LookupSession) -> None:
    try:
        await until_ready(stream, session)
    except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        raise lookup.LookupFailed(
            f"the server closed the connection: {exc!r}", reached=session.logged_in
        ) from None


def _failed(target: PoolTarget, method: LookUp, user: str, exc: Exception) -> ClientError:
    if isinstance(exc, TimeoutError):
        why, reached = "timeout", False
    elif isinstance(exc, lookup.LookupFailed):
        why, reached = str(exc), exc.reached
    elif isinstance(exc, ClientError):  # TLS to the node refused (`halephant.server_tls.TlsRefused`)
        why, reached = f"{exc.message} ({exc.code})", False
    else:
        why, reached = repr(exc), False
    log.warning(
        "password lookup for user %r failed: %s (auth_user %r, database %r, cluster %s)",
        user,
        why,
        method.auth_user,
        method.dbname,
        target.cluster,
        extra={"event": "auth_query_failed"},
    )
    if reached:
        return ClientError(
            sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
            f'could not look up the password of user "{user}": the auth_query failed',
            hint="halephant's log says why.",
            fatal=True,
        )
    return ClientError(
        sqlstate.CONNECTION_FAILURE,
        f'could not look up the password of user "{user}": halephant could not log in to the server '
        "as the auth_user",
        hint="halephant's log says why.",
        fatal=True,
    )
