"""Timers for everyone: two sweeps replace any per-client timer or task.

The waiter sweep (every 100 ms, `sweep_waiters`): `checkout_timeout` (ERROR 53300), the NOTICE a client
gets once it has waited `query_wait_notify` for a server (naming what holds it: the pool's size, a
refused login, or a cap across pools), and the reserve pool (one more server beyond
`pool_size`, up to `reserve_pool_size`, while the oldest waiter has waited `reserve_pool_timeout`; where
a cap across pools is full, idle servers of its other pools are closed first to make room).

The client sweep (`sweep_clients`, every second; every 100 ms while shutting down): `login_timeout`
(FATAL 57014, PostgreSQL's code for authentication_timeout), `client_idle_timeout` (FATAL 57P05),
`idle_transaction_timeout` (FATAL 25P03), `query_timeout` (a real CancelRequest to the server, whose own
ERROR 57014 reaches the client), clients of a database a reload removed (FATAL 57P01) and the shutdown
drain.

Activity is noticed without any per-message work: a client's `link_count` (bumped once per transaction)
and its server's `rfq_seen` (ReadyForQuery messages relayed) form a mark; a client whose mark has not
moved between sweeps has done nothing in between, and `sweep_since` says since when. The precision is the
sweep interval, as with PgBouncer's once-a-second janitor.
"""

from __future__ import annotations

import fcntl
import logging
import struct
import termios
from typing import TYPE_CHECKING, cast

from halephant import sqlstate
from halephant.config import UserConfig
from halephant.errors import ClientError, OutOfResources
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.proxy.client import READY as _READY
from halephant.proxy.nodes import database_removed

if TYPE_CHECKING:
    from halephant.proxy.app import App
    from halephant.proxy.client import ClientConnection
    from halephant.proxy.manager import PoolManager, ServerPool

log = logging.getLogger("halephant.timeouts")

#: the ioctl that gives a TCP socket's unsent bytes (SIOCOUTQ on Linux), where there is one
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
_INT = struct.Struct("i")

#: while shutting down, a client between transactions that has been silent this long is closed
DRAIN_IDLE_GRACE = 1.0


def sweep_waiters(manager: PoolManager, now: float) -> None:
    app = manager.app
    notify = app.config.limits.query_wait_notify
    for pool in manager.all_pools():
        waiters = pool.waiters
        if not waiters:
            continue
        for client in waiters.pop_while(lambda w: w.wait_deadline <= now):
            client.checkout_timeout()
        if not waiters:
            continue
        oldest = min(w.wait_started for w in waiters.heads())
        if notify and now - oldest >= notify:
            for client in waiters:
                if not client.wait_notified and now - client.wait_started >= notify:
                    client.wait_notified = True
                    _notify_waiting(client, pool, len(waiters), now)
        if pool.info.size.reserve:
            db = app.config.database_for(pool.info.target.entry_name)
            timeout = db.reserve_pool_timeout if db is not None else 5.0
            if now - oldest >= timeout:
                if pool.open_reserve():
                    log.info(
                        "pool %s: opening a reserve connection (oldest waiter %.1f s, %d waiting, now %d)",
                        pool.name,
                        now - oldest,
                        len(waiters),
                        pool.total,
                        extra={"event": "reserve_pool", "pool": pool.name},
                    )
                    manager.open(pool)
                elif pool.caps:
                    manager.evict_for_reserve(pool)  # opened by a later sweep, once there is room


def _notify_waiting(client: ClientConnection, pool: ServerPool, waiting: int, now: float) -> None:
    waited = now - client.wait_started
    log.info(
        "%r: waiting %.1f s for a server of pool %s (%d waiting)",
        client,
        waited,
        pool.name,
        waiting,
        extra={"event": "query_wait_notify", "pool": pool.name},
    )
    refused = pool.login_refused
    cap = pool.cap_in_the_way() if pool.caps else None
    if refused is not None:  # not full: PostgreSQL refuses another login (server_login_retry)
        error = cast(ClientError, refused[0])
        if isinstance(error, OutOfResources):  # or halephant has no descriptor for another
            why = f"cannot open another ({error.message})"
        else:
            why = f"PostgreSQL refused its last login ({error.message})"
    elif cap is not None:  # not full either: a cap across pools is (max_db_connections, ...)
        why = f"is held by {cap.describe()}: all its places are taken ({len(pool.active)} by this pool)"
    else:
        why = f"is full ({len(pool.active)} busy)"
    try:
        client.send(
            m.notice_response(
                sqlstate.SUCCESSFUL_COMPLETION,
                f"halephant: waiting {waited:.1f} s for a server connection: pool {pool.name} {why}, "
                f"{waiting} client(s) waiting",
            )
        )
    except Exception:  # the transport may be closing; the client's own callbacks will notice
        pass


def sweep_clients(app: App, now: float) -> None:
    limits = app.config.limits
    config, users = app.config, app.config.users
    draining = app.draining
    # effective timeouts per (database, user), worked out once per sweep: the user's value, else the
    # database's, else the global one
    timeouts: dict[tuple[str, str], tuple[float, float, float]] = {}
    for client in list(app.clients.values()):
        if client.state != _READY:
            # once authenticated, a client waiting for a server (session pooling) has checkout_timeout's
            # time, as documented, not what is left of login_timeout
            if client.state < _READY and now >= client.login_deadline and client.waiting_pool is None:
                client.login_timeout()
            continue
        if client.waiting_pool is not None:
            continue  # waiting: checkout_timeout, in the waiter sweep
        if client.held_back:
            client.resume_held()  # a safety net: every end of halephant's own business resumes it
        server = client.server
        rfq = server.rfq_seen if server is not None else -1
        if client.sweep_links != client.link_count or client.sweep_rfq != rfq:
            client.sweep_links, client.sweep_rfq, client.sweep_since = client.link_count, rfq, now
            target = client.target
            if (
                target is not None
                and config.database_for(target.entry_name) is None
                and (
                    server is None
                    or (
                        client.outstanding == 0
                        and server.scanner.status == codes.TX_IDLE
                        and not client.unsynced
                    )
                )
            ):
                # removed by a reload: a busy client (a session-mode one runs its own statements) is
                # never quiet for a whole sweep, so it is told between two of its transactions
                client.fail(database_removed(target.database))
            continue
        quiet = now - client.sweep_since
        target, info = client.target, client.info
        if target is None or info is None:
            continue
        key = (target.database, info.user)
        t = timeouts.get(key)
        if t is None:
            db, user = config.database_for(target.entry_name), users.get(info.user)
            if db is None:
                t = (-1.0, 0.0, 0.0)  # removed by a reload
            else:
                u = user if user is not None else _NO_USER
                t = (
                    _pick(u.client_idle_timeout, db.client_idle_timeout, limits.client_idle_timeout),
                    _pick(
                        u.idle_transaction_timeout,
                        db.idle_transaction_timeout,
                        limits.idle_transaction_timeout,
                    ),
                    _pick(u.query_timeout, db.query_timeout, limits.query_timeout),
                )
            timeouts[key] = t
        idle_timeout, idle_tx_timeout, query_timeout = t
        if server is None or (
            client.outstanding == 0 and server.scanner.status == codes.TX_IDLE and not client.unsynced
        ):
            # between transactions
            if idle_timeout < 0:
                client.fail(database_removed(target.database))
            elif draining and quiet >= DRAIN_IDLE_GRACE:
                client.fail(shutdown_error())
            elif idle_timeout and quiet >= idle_timeout:
                log.info(
                    "%r: client_idle_timeout (%gs)",
                    client,
                    idle_timeout,
                    extra={"event": "client_idle_timeout"},
                )
                client.fail(
                    ClientError(
                        sqlstate.IDLE_SESSION_TIMEOUT,
                        "terminating connection due to idle-session timeout (halephant client_idle_timeout)",
                        fatal=True,
                    )
                )
        elif client.outstanding == 0 and client.copy_mark != (client.link_count, rfq):
            # in a transaction, or in an extended-protocol batch not synced yet, and the server waits
            # for the client: it holds a server while doing nothing (not sending COPY data)
            if idle_tx_timeout and quiet >= idle_tx_timeout:
                log.info(
                    "%r: idle_transaction_timeout (%gs)",
                    client,
                    idle_tx_timeout,
                    extra={"event": "idle_transaction_timeout"},
                )
                client.fail(
                    ClientError(
                        sqlstate.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                        "terminating connection due to idle-in-transaction timeout "
                        "(halephant idle_transaction_timeout)",
                        fatal=True,
                    )
                )
        elif query_timeout and quiet >= query_timeout:
            mark = (client.link_count, rfq, _unread(client) if client.write_paused else -1)
            if client.timeout_mark == mark and client.write_paused:
                # Cancelled one query_timeout ago, and the client has read nothing since of what the query
                # sends: the backend is blocked sending it, and PostgreSQL acts on no cancel there. As
                # PgBouncer does at query_timeout, the client goes, and its server with it. (One that
                # reads, however slowly, gets the cancel's ERROR behind the rows already on their way.)
                log.warning(
                    "%r: query_timeout (%gs): still running after its cancel, and the client reads none "
                    "of its result: disconnecting it",
                    client,
                    query_timeout,
                    extra={"event": "query_timeout"},
                )
                client.fail(
                    ClientError(
                        sqlstate.QUERY_CANCELED,
                        "terminating connection: the query ran past query_timeout and its result is not "
                        "being read",
                        fatal=True,
                    )
                )
                continue
            # a query has been running that long: cancel it as the client could, and let PostgreSQL's
            # own ERROR 57014 reach the client; the clock restarts in case the cancel is lost
            log.info(
                "%r: query_timeout (%gs): cancelling on server pid %d",
                client,
                query_timeout,
                server.backend_pid,
                extra={"event": "query_timeout"},
            )
            client.sweep_since = now
            if server.at_message_boundary():
                # PostgreSQL will only say "canceling statement due to user request": say whose request
                client.send(
                    m.notice_response(
                        sqlstate.SUCCESSFUL_COMPLETION,
                        f"halephant: cancelling the query: it ran past query_timeout ({query_timeout:g}s)",
                    )
                )
            # (taken after that NOTICE, which the client has not read either)
            client.timeout_mark = (client.link_count, rfq, _unread(client) if client.write_paused else -1)
            app.spawn(app.forward_cancel, client, server, server.link_count)


_NO_USER = UserConfig(auth="trust")  # a user no longer configured: no overrides


def _unread(client: ClientConnection) -> int:
    """What halephant has written to `client` that the client has not read: its transport's buffer and,
    where the system tells, the socket's send queue. Changes only when the client reads, while halephant
    has stopped reading its server (the client being slow to read: `write_paused`)."""
    transport = client.transport
    unread = transport.get_write_buffer_size() + len(client.held_output or b"")
    sock = transport.get_extra_info("socket")
    if sock is not None and _OUTQ is not None:
        try:
            unread += _INT.unpack(fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
        except OSError:
            pass
    return unread


def _pick(*values: float | None) -> float:
    for value in values:
        if value is not None:
            return value
    return 0.0


def shutdown_error() -> ClientError:
    return ClientError(
        sqlstate.ADMIN_SHUTDOWN,
        "terminating connection due to administrator command (halephant is shutting down)",
        fatal=True,
    )
