"""The I/O side of protocol-level prepared statements in transaction pooling.

`halephant.protocol.prepared` keeps the books; this module connects them to a client and its linked
server: it starts tracking a client at its first named Parse (`activate`), sends its translated messages
(`forward`), relays the server's replies message by message while the client has requests outstanding
(`relay`), and handles the SQL statements that drop prepared statements (`deallocate`). Clients that
never name a statement never come here: their bytes take the ordinary forwarding path.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from halephant.errors import ProtocolViolation
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import PASSED_AS_IT_COMES, Frame, split_frames
from halephant.protocol.prepared import (
    BARRIER,
    DROP,
    SYNTH,
    ClientStatements,
    ServerStatement,
    ServerStatements,
    StatementRegistry,
    executed_name,
)
from halephant.proxy import session_state
from halephant.sql import Statement

if TYPE_CHECKING:
    from halephant.proxy.client import ClientConnection
    from halephant.proxy.server import ServerConnection

log = logging.getLogger("halephant.prepared")

#: the server-side names of every statement body, for every client and server of this process
REGISTRY = StatementRegistry()
_MAX_SERVER_MESSAGE = 1 << 30
_DEALLOCATE = re.compile(
    r'\s*deallocate\s+(?:prepare\s+)?(?:(all)|"((?:[^"]|"")+)"|([A-Za-z_\x80-\uffff][\w$\x80-\uffff]*))\s*;?\s*',
    re.IGNORECASE,
)
_DISCARD_ALL = re.compile(r"\s*discard\s+all\s*;?\s*", re.IGNORECASE)
#: the reset queries that drop every prepared statement of a server connection
_DROPS_ALL = re.compile(r"\b(?:discard\s+all|deallocate\s+(?:prepare\s+)?all)\b", re.IGNORECASE)


def limit(client: ClientConnection) -> int:
    """`max_prepared_statements` of the client's database (0: named statements pin the client)."""
    target = client.target
    db = client.app.config.database_for(target.entry_name) if target is not None else None
    return db.max_prepared_statements if db is not None else 0


def _retired(stmt: ServerStatement) -> None:
    log.info("prepared statement %s retired (its cached plan changed result type)", stmt.name.decode())


def activate(client: ClientConnection, blind: bool) -> ClientStatements:
    """Track `client`'s named statements from now on. Its earlier requests may still be unanswered: a
    barrier of as many ReadyForQuery as sync points are outstanding separates them from what is tracked,
    and (`blind`) requests of the current batch already sent keep the server's own replies until the
    next sync point."""
    log.info("%r: named prepared statements are mapped to shared server-side statements", client)
    return ClientStatements(
        REGISTRY,
        outstanding=client.outstanding,
        blind=blind,
        on_retire=_retired,
        context=session_state.prepare_context(client),
    )


def statements_of(server: ServerConnection) -> ServerStatements:
    found = server.statements
    if found is None:
        db = server.manager.app.config.database_for(server.pool.info.target.entry_name)
        found = server.statements = ServerStatements(db.max_prepared_statements if db is not None else 200)
    return found


def forward(
    client: ClientConnection, server: ServerConnection, data: bytes, frames: list[Frame] | None = None
) -> None:
    """Send a run of complete client messages through the client's statement books (`frames`: the
    messages of `data`, when the caller cut them already)."""
    ps = client.prepared
    assert ps is not None
    sc = server.scanner
    status = sc.status
    # alone, outside a transaction or first in one, a batch may be run again after a stale plan (see
    # `_retriable`)
    retry: bytes | None = None
    if client.outstanding == 1:
        if status == codes.TX_IDLE:
            retry = b""
        elif status == codes.TX_IN_TRANSACTION:
            retry = client.began_with
    server.send(
        ps.translate(
            data, statements_of(server), status == codes.TX_FAILED, client.outstanding, frames, retry
        )
    )
    queue = ps.queue
    if queue and queue[0][1] == SYNTH and sc.at_boundary:
        # nothing before it is outstanding: answer now (the client may wait for it after a Flush)
        client.send(ps.due_replies(sc.status))


def reject(client: ClientConnection, t: int, error: bytes) -> None:
    ps = client.prepared
    assert ps is not None
    ps.reject(t, error)


def deallocate(
    client: ClientConnection, server: ServerConnection, t: int, statement: Statement, message: bytes
) -> bytes | None:
    """DEALLOCATE / DISCARD from a client in transaction pooling (`message`: the Query or Parse).

    Returns what to send instead, or None to send `message` as the caller would. `DEALLOCATE name` of
    one of the client's statements is answered by halephant (the server's statement is shared); `ALL`
    and `DISCARD ALL` go to the server, so that PostgreSQL refuses or answers them itself. The books
    follow only what succeeds: PostgreSQL refuses DISCARD ALL inside a transaction block, and both in
    a failed transaction, and then every prepared statement stays, the client's and the server's.
    """
    text = statement.text
    ps = client.prepared
    match = _DEALLOCATE.fullmatch(text) if statement.first_keyword == "DEALLOCATE" else None
    discard_all = match is None and _DISCARD_ALL.fullmatch(text) is not None
    if match is None and not discard_all:
        return None  # DISCARD PLANS/TEMP/SEQUENCES, several statements: nothing to do with names
    if match is not None and match.group(1) is None:
        quoted = match.group(2)
        name = (quoted.replace('""', '"') if quoted else match.group(3).lower()).encode()
        if ps is not None and t == codes.QUERY and not ps.skipping:
            return ps.deallocate(name)
        return None  # an SQL-level name, or unknown: PostgreSQL decides
    if t == codes.QUERY and ps is not None and not ps.skipping and not ps.blind:
        ps.clear_on_success()  # its reply says whether the server's statements went
        return message
    if t == codes.QUERY and not client.outstanding and not client.unsynced:
        # nothing in flight: the server's state now is the one the Query meets
        status = server.scanner.status
        if status == codes.TX_FAILED or (status == codes.TX_IN_TRANSACTION and discard_all):
            return None  # refused: nothing goes
        if ps is not None:
            ps.forget()
        if server.statements is not None:
            server.statements.clear()
        return None
    # Run when an Execute of it comes, or in a state not followed: whether it drops the server's
    # statements is not known. The books are left as they are (a Bind of a statement gone is answered
    # 26000, as PostgreSQL would after it), and the server is closed rather than handed to another
    # client whose statements halephant would believe prepared there, or not.
    if server.statements is not None and not server.dirty:
        server.dirty = f"{statement.first_keyword} ALL with an outcome not followed"
    return None


def sql_execute(client: ClientConnection, server: ServerConnection, message: bytes) -> bytes | None:
    """SQL `EXECUTE name [(args)]` from a client (`message`: its Query) that names one of its
    protocol-level statements, which live on the servers under halephant's names: what to send instead,
    the Query naming the server's statement (prepared there first when it has not got it). None sends
    `message` as it is: a name of the client's SQL PREPAREs, an unknown one, or a moment when the
    server's state is not known for sure (a failed transaction runs no EXECUTE anyway)."""
    ps = client.prepared
    if ps is None or client.outstanding or client.unsynced or server.scanner.status == codes.TX_FAILED:
        return None
    named = executed_name(message, 5, len(message))
    if named is None:
        return None
    name, start, end = named
    found = ps.sql_execute(name, statements_of(server))
    if found is None:
        return None
    first, server_name = found
    payload = message[5:start] + server_name + message[end:]
    return first + m.message(b"Q", payload)


def forget_after_reset(server: ServerConnection, query: str) -> None:
    """The server ran `query` before going back to its pool: did that drop its prepared statements?"""
    if server.statements is not None and _DROPS_ALL.search(query):
        server.statements.clear()


def relay(server: ServerConnection, data: bytes, client: ClientConnection) -> None:
    """Server -> client for a client whose statements are mapped: message by message while a request
    that needs halephant (a synthetic reply, a reply to drop, an error to rewrite) is outstanding."""
    ps = client.prepared
    assert ps is not None
    queue = ps.queue
    sc = server.scanner
    if not server._buf and (not queue or (len(queue) == 1 and queue[0][1] == BARRIER)):
        # nothing outstanding but whole batches that need nothing of halephant: the fast path, counting
        # their ReadyForQuery (an ErrorResponse reaches `stale_plan` through the scanner's kept messages)
        server._relay(data, client)
        if queue:
            if sc.kept and client._last_sync_point == codes.SYNC:
                for t, _ in sc.kept:
                    if t == codes.COPY_IN_RESPONSE:
                        ps.copy_in()  # the Sync behind the Execute that began it goes unanswered
            if sc.ready and queue:
                ps.passed(sc.ready)
            if queue and server.client is not client:
                _out_of_step(client, ps)
        return
    if not server._buf and sc.at_boundary and ps.retriable_answered(data):
        # the whole, successful answer to a lone Bind/Describe/Execute/Sync (armed for a stale-plan
        # retry that it turned out not to need): relayed as it is
        server._relay(data, client)
        return
    # The fast path may have passed on the start of a message (before tracking began, or a notice while
    # nothing was outstanding): pass on its rest the same way first.
    while data and not server._buf and not sc.at_boundary:
        step = sc.bytes_to_boundary()
        server._relay(data[:step], client)
        data = data[step:]
        if server.client is not client:
            return
        if sc.ready and queue and queue[0][1] == BARRIER:  # a ReadyForQuery counts down a barrier
            kind, action, stmt, left, undo, name = queue[0]
            assert isinstance(left, int)
            if left > sc.ready:
                queue[0] = (kind, action, stmt, left - sc.ready, undo, name)
            else:
                queue.popleft()
    if not queue:
        rest, server._buf = server._buf + data, b""
        if rest:
            server._relay(rest, client)
        return
    buf = server._buf + data if server._buf else data
    try:
        frames, consumed = split_frames(buf, _MAX_SERVER_MESSAGE)
    except ProtocolViolation as exc:
        server._lost_with_client(client, f"protocol violation from server: {exc.message}")
        return
    copy_skips_sync = client._last_sync_point == codes.SYNC
    out, ready, status, kept, stop = ps.splice(buf, frames, sc.status, statements_of(server), copy_skips_sync)
    if stop < consumed:  # nothing is outstanding any more: the rest takes the fast path
        rest, server._buf = buf[stop:], b""
    elif consumed < len(buf) and buf[consumed] in PASSED_AS_IT_COMES and (not queue or queue[0][1] != DROP):
        # a row goes on as it comes: gathered whole, it would be held, copied at every chunk, and the
        # server read on meanwhile (halephant stops reading it only once the client falls behind)
        rest, server._buf = buf[consumed:], b""
    else:
        rest, server._buf = b"", buf[consumed:]
    if ps.resend:
        server.send(ps.resend)
        ps.resend = b""
    sc.status = status
    server.rfq_seen += ready
    if ready:
        if status == codes.TX_IDLE:
            server.xact_seen += 1  # as the fast path counts transactions
        elif client.statement_mode and out and not rest and not server._buf:
            out = [client.withheld_ready(b"".join(out), ready, status)]
    if out:
        # at once inside a transaction, held with the loop iteration's others once it is over
        server._to_client(b"".join(out), client, ready > 0 and status == codes.TX_IDLE)
    if kept:
        server._kept(kept, client, ready)
    if ready:
        client.server_ready(ready, status, not rest and not server._buf)
        if server.client is not client and queue:
            _out_of_step(client, ps)
    if rest and server.client is client:
        server._relay(rest, client)


def _out_of_step(client: ClientConnection, ps: ClientStatements) -> None:
    # The pooling loop gave the server back with requests still in the books: they can never be
    # answered now. Start afresh rather than read the next server's replies against them.
    log.warning(
        "%r: prepared-statement books out of step at check-in (%d entries): reset", client, len(ps.queue)
    )
    ps.reset()
