"""Protocol-level prepared statements in transaction pooling: the sans-IO bookkeeping.

A client's named statements are private to it, but server connections are shared, so each
(query text, parameter types) gets one server-side name (`ServerStatement`, from a `StatementRegistry`)
that any client may use on any server, among clients whose settings make PostgreSQL parse the text
alike (`parse_context`: a DMY client must not run a statement whose '01/02/2003'::date an MDY client's
settings parsed). This module owns:

* `StatementRegistry`: the server-side name of each statement body, with a generation per body hash so a
  statement whose cached plan went stale (`0A000 cached plan must not change result type` after a schema
  change) is retired everywhere: the next Parse of the same text prepares a new name;
* `ServerStatements`: which statements one server connection has prepared, least recently used first,
  bounded by `max_prepared_statements` (evictions become Close messages);
* `ClientStatements`: one client's names, the translation of its messages for the linked server
  (`translate`), and the ordered queue of its outstanding requests, which `splice` walks message by
  message over the server's replies to drop the replies to halephant's own messages, add the replies
  halephant gives itself (ParseComplete for a statement the server already has, CloseComplete for a
  client's Close) and rewrite errors, each at exactly the place PostgreSQL would have answered.

Batches that need none of that (the steady state: Bind/Execute/Sync of a statement the server has) are
folded into a barrier at their sync point, so their replies take the proxy's fast path and only their
ReadyForQuery is counted. A lone batch that asked for the row description and hit a stale plan is run
again on a fresh statement (`_retriable`, `_retry`).

The queue mirrors PostgreSQL's extended-query rules: every request answers with one completion (or an
ErrorResponse); after an error in an extended batch the server ignores everything up to Sync, so the
requests in between get no reply (their bookkeeping is undone) and synthetic replies for them are not sent.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final

from halephant import sqlstate
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import READY_FOR_QUERY_HEAD, Frame, split_frames, walk_types

__all__ = [
    "PARSE_SETTINGS",
    "ClientStatements",
    "Entry",
    "ServerStatement",
    "ServerStatements",
    "StatementRegistry",
    "parse_context",
]

_I16: Final = struct.Struct("!h")

# --- what halephant does with the replies to one queued request --------------------------------------------
FORWARD: Final = 0  # the client's own request: pass its replies on
DROP: Final = 1  # halephant's own Parse or Close: swallow its completion; pass an error on
SYNTH: Final = 2  # never sent: answer with `reply` once the requests before it are answered
FAIL: Final = 3  # sent as a Describe of a missing statement: replace its error by the one PostgreSQL gives
TAG: Final = 4  # an empty Query standing in for DEALLOCATE name: answer with its command tag
REPLACE: Final = 5  # a rejection in place: replace the server's ErrorResponse by `reply`
BARRIER: Final = 6  # requests sent before tracking began: pass everything on until `reply` ReadyForQuery
CLEAR: Final = 7  # a client's DISCARD ALL / DEALLOCATE ALL: if it succeeds, the server has no statements left
RETRY: Final = 8  # a Bind that may be sent again (with `reply`, the batch's bytes) if its plan went stale

# undo operations, applied when the server never processed the request (an earlier error) or it failed
UNMAP: Final = 1  # forget the client's name again
REMAP: Final = 2  # give the client its name back
LRU_DROP: Final = 3  # the server does not have the statement after all
LRU_ADD: Final = 4  # the server still has the statement

#: (request type, action, statement, reply or detail, undo, client name)
Entry = tuple[int, int, "ServerStatement | None", object, int, bytes]

#: the name halephant Describes to make the server fail at exactly one point of a batch
MISSING: Final = b"halephant_missing_statement"
_FAIL_MESSAGE: Final = m.message(b"D", b"S" + MISSING + b"\0")
#: the scratch name of a Parse that only asks the server whether it would accept it now
PROBE: Final = b"halephant_probe"
_CLOSE_PROBE: Final = m.message(b"C", b"S" + PROBE + b"\0")
_EMPTY_QUERY: Final = m.query("")
_ROLLBACK: Final = m.query("ROLLBACK")
_DROP_QUERY: Final[Entry] = (codes.QUERY, DROP, None, None, 0, b"")  # halephant's own Query
_DROP_SYNC: Final[Entry] = (codes.SYNC, DROP, None, None, 0, b"")  # halephant's own Sync
_PROBE_PARSE: Final[Entry] = (codes.PARSE, DROP, None, None, 0, b"")  # a Parse under the scratch name
_PROBE_CLOSE: Final[Entry] = (codes.CLOSE, DROP, None, None, 0, b"")
_STALE_PLAN: Final = "cached plan must not change result type"
_DROPPED_ALL: Final = (b"DISCARD ALL\0", b"DEALLOCATE ALL\0")  # command tags
# the statements PostgreSQL still parses in a failed transaction (IsTransactionExitStmt)
_TRANSACTION_EXIT: Final = re.compile(
    rb"\s*(?:commit|end|rollback|abort|prepare\s+transaction)\b", re.IGNORECASE
)

# completion of each request type: the reply that ends it (ErrorResponse ends an extended one too)
_DONE: Final[dict[int, frozenset[int]]] = {
    codes.PARSE: frozenset((codes.PARSE_COMPLETE,)),
    codes.BIND: frozenset((codes.BIND_COMPLETE,)),
    codes.CLOSE: frozenset((codes.CLOSE_COMPLETE,)),
    codes.DESCRIBE: frozenset((codes.ROW_DESCRIPTION, codes.NO_DATA)),
    codes.EXECUTE: frozenset((codes.COMMAND_COMPLETE, codes.EMPTY_QUERY_RESPONSE, codes.PORTAL_SUSPENDED)),
    codes.SYNC: frozenset((codes.READY_FOR_QUERY,)),
    codes.QUERY: frozenset((codes.READY_FOR_QUERY,)),
    codes.FUNCTION_CALL: frozenset((codes.READY_FOR_QUERY,)),
}
_EXTENDED: Final = frozenset((codes.PARSE, codes.BIND, codes.CLOSE, codes.DESCRIBE, codes.EXECUTE))
# replies that belong to no request
_ASYNC: Final = frozenset((codes.NOTICE_RESPONSE, codes.NOTIFICATION_RESPONSE, codes.PARAMETER_STATUS))
_TRACKED: Final = frozenset(_DONE)
_PLAIN: Final[dict[int, Entry]] = {t: (t, FORWARD, None, None, 0, b"") for t in _DONE}
_PLAIN_PARSE: Final = _PLAIN[codes.PARSE]
_PLAIN_BIND: Final = _PLAIN[codes.BIND]
_PLAIN_DESCRIBE: Final = _PLAIN[codes.DESCRIBE]
_PLAIN_CLOSE: Final = _PLAIN[codes.CLOSE]
_EXECUTE: Final = _PLAIN[codes.EXECUTE]
_PLAIN_SYNC: Final = _PLAIN[codes.SYNC]
#: the replies of a successful Bind, Describe (portal), Execute: what `retriable_answered` passes
_PLAIN_ANSWER: Final = frozenset(
    (
        codes.BIND_COMPLETE,
        codes.ROW_DESCRIPTION,
        codes.NO_DATA,
        codes.DATA_ROW,
        codes.COMMAND_COMPLETE,
        codes.EMPTY_QUERY_RESPONSE,
        codes.PORTAL_SUSPENDED,
    )
)
_SYNC_POINTS: Final = frozenset((codes.SYNC, codes.QUERY, codes.FUNCTION_CALL))
#: the messages before the Sync of a batch that `_retriable` may run again
_BIND_DESCRIBE_EXECUTE: Final = (codes.BIND, codes.DESCRIBE, codes.EXECUTE)
_STATUS_FAILED: Final = codes.TX_FAILED


def command_complete(tag: str) -> bytes:
    return m.message(b"C", tag.encode() + b"\0")


#: SQL `EXECUTE name`: the name, bare (folded to lower case) or quoted
_EXECUTE_SQL: Final = re.compile(
    rb'\s*execute\s+(?:"((?:[^"]|"")+)"|([A-Za-z_\x80-\xff][\w$\x80-\xff]*))', re.IGNORECASE
)
_EXECUTE_FIRST: Final = frozenset(b"eE \t\r\n")


def executed_name(buf: bytes, pos: int, endpos: int) -> tuple[bytes, int, int] | None:
    """The prepared statement an SQL `EXECUTE` at `buf[pos:endpos]` names, with where that name is
    written (quotes included); None if the text does not begin with EXECUTE."""
    match = _EXECUTE_SQL.match(buf, pos, endpos)
    if match is None:
        return None
    quoted = match.group(1)
    if quoted is not None:
        start, end = match.span(1)
        return quoted.replace(b'""', b'"'), start - 1, end + 1
    start, end = match.span(2)
    return match.group(2).lower(), start, end


def _names_a_statement(data: bytes, start: int, end: int) -> bool:
    """The Describe or Close whose payload is `data[start:end]` is a well-formed one of a named statement:
    'S', a name, its NUL and nothing after it. A malformed one goes to the server as it is, for PostgreSQL's
    own ERROR 08P01 (a name read up to the end, or up to a NUL in the middle, would be another name)."""
    return end - start > 2 and data[start] == 0x53 and data.find(b"\0", start + 1, end) == end - 1


def _named_as_client(payload: bytes, server_name: bytes, name: bytes) -> bytes | None:
    """An ErrorResponse that names the server's statement (`bind message supplies 1 parameters, but
    prepared statement "h_…" requires 2`) rewritten with the client's name; None if it names none."""
    quoted = b'"' + server_name + b'"'
    if quoted not in payload:
        return None
    return m.message(b"E", payload.replace(quoted, b'"' + name + b'"'))


def _aborted_error() -> bytes:
    return m.error_response(
        sqlstate.IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    )


#: settings that change what PostgreSQL makes of a statement's text when it parses it, which a prepared
#: statement keeps: the bytes of the text (client_encoding), constants such as '01/02/2003'::date or
#: '2024-01-01 12:00'::timestamptz (DateStyle, TimeZone, ...), escapes in strings; and search_path, last
#: (`_SEARCH_PATH_PART`), which names the tables and types a statement's columns come from. PostgreSQL
#: parses a statement again when search_path changed, but a named statement may not change its result
#: type: shared by clients of schemas whose tables differ (a schema per tenant), each would fail the
#: other's turn with 0A000 "cached plan must not change result type".
PARSE_SETTINGS: Final = (
    "array_nulls",
    "backslash_quote",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "lc_monetary",
    "standard_conforming_strings",
    "timezone",
    "timezone_abbreviations",
    "transform_null_equals",
    "xmloption",
    "search_path",
)

_SEARCH_PATH_PART: Final = b"search_path="


def parse_context(settings: dict[str, str]) -> bytes:
    """What of a client's settings (`PARSE_SETTINGS`) a statement it prepares depends on: clients that
    differ in it must not share a server's statement. b"" for a client at the servers' defaults."""
    if not settings:
        return b""  # nearly every client
    parts = []
    for name in PARSE_SETTINGS:
        value = settings.get(name)
        if value is not None:
            if name == "client_encoding":  # as PostgreSQL reads its name: UTF8, utf-8 and Utf_8 are one
                value = "".join(ch for ch in value.lower() if ch.isalnum())
            parts.append(f"{name}={value}")
    return "\0".join(parts).encode("utf-8", "surrogateescape")


def _without_search_path(context: bytes) -> bytes:
    """`context` less its search_path (the last part, when there)."""
    at = context.find(_SEARCH_PATH_PART)
    if at == 0 or (at > 0 and context[at - 1] == 0):
        return context[: max(at - 1, 0)]
    return context


class ServerStatement:
    """One statement body (text and parameter types), parsed under one `parse_context`, and the name it
    has on every server."""

    __slots__ = ("body", "context", "digest", "name", "needs", "parse")

    def __init__(
        self, body: bytes, digest: str, generation: int, private: int = 0, context: bytes = b""
    ) -> None:
        self.body = body
        self.context = context
        #: the statement an SQL `EXECUTE` in this one runs: prepared first wherever this one is used
        self.needs: ServerStatement | None = None
        self.digest = digest
        suffix = f"_p{private}" if private else f"_{generation}" if generation else ""
        self.name = f"h_{digest}{suffix}".encode()
        #: the Parse message that prepares it under `name`
        self.parse = m.message(b"P", self.name + b"\0" + body)

    def __repr__(self) -> str:
        return f"<ServerStatement {self.name.decode()}>"


class StatementRegistry:
    """Server-side names by statement body; shared by every client and server of a process."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._by_body: dict[bytes | tuple[bytes, bytes], ServerStatement] = {}
        self._generation: dict[str, int] = {}
        self._private = 0
        self.max_entries = max_entries

    def get(self, body: bytes, context: bytes = b"") -> ServerStatement:
        """The statement of `body` for clients with `context` (`parse_context`)."""
        key = (context, body) if context else body
        stmt = self._by_body.get(key)
        if stmt is None:
            digest = hashlib.blake2b(context + b"\0" + body if context else body, digest_size=10).hexdigest()
            stmt = ServerStatement(body, digest, self._generation.get(digest, 0), context=context)
            if len(self._by_body) >= self.max_entries:
                # clients and servers hold their statements themselves: forgetting only costs a hash
                self._by_body.clear()
            self._by_body[key] = stmt
        return stmt

    def private(self, body: bytes) -> ServerStatement:
        """A statement of `body` under a name no other client uses (never shared, never retired)."""
        self._private += 1
        return ServerStatement(body, hashlib.blake2b(body, digest_size=10).hexdigest(), 0, self._private)

    def retire(self, stmt: ServerStatement) -> bool:
        """Never hand out `stmt`'s name again; False when it was retired already."""
        current = self._generation.get(stmt.digest, 0)
        if stmt.name != ServerStatement(stmt.body, stmt.digest, current).name:
            return False
        self._generation[stmt.digest] = current + 1
        key = (stmt.context, stmt.body) if stmt.context else stmt.body
        if self._by_body.get(key) is stmt:
            del self._by_body[key]
        return True

    def generation(self, digest: str) -> int:
        return self._generation.get(digest, 0)


class ServerStatements:
    """The statements one server connection has prepared (or will have, once it reads what was sent)."""

    __slots__ = ("_names", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._names: OrderedDict[bytes, ServerStatement] = OrderedDict()

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: bytes) -> bool:
        return name in self._names

    def names(self) -> list[bytes]:
        """Least recently used first."""
        return list(self._names)

    def use(self, stmt: ServerStatement) -> bool:
        """True (and marked most recently used) when the server has `stmt`."""
        names = self._names
        if stmt.name in names:
            names.move_to_end(stmt.name)
            return True
        return False

    def add(self, stmt: ServerStatement) -> list[ServerStatement]:
        """Record `stmt` as prepared; returns the statements to close to stay within capacity."""
        names = self._names
        names[stmt.name] = stmt
        names.move_to_end(stmt.name)
        evicted: list[ServerStatement] = []
        while len(names) > self.capacity:
            _, old = names.popitem(last=False)
            evicted.append(old)
        return evicted

    def discard(self, name: bytes) -> None:
        self._names.pop(name, None)

    def add_unbounded(self, stmt: ServerStatement) -> None:
        """Record `stmt` without closing anything now: the next `add` makes room."""
        self._names[stmt.name] = stmt

    def restore(self, stmt: ServerStatement) -> None:
        """The server still has `stmt` (a Close of it was never processed)."""
        self._names[stmt.name] = stmt
        self._names.move_to_end(stmt.name, last=False)

    def clear(self) -> None:
        self._names.clear()


class ClientStatements:
    """One client's named statements and the queue of its requests outstanding on the linked server."""

    __slots__ = (
        "_batch",
        "_interesting",
        "_on_retire",
        "_pending",
        "blind",
        "bound",
        "context",
        "names",
        "queue",
        "registry",
        "resend",
        "skipping",
    )

    def __init__(
        self,
        registry: StatementRegistry,
        *,
        outstanding: int = 0,
        blind: bool = False,
        on_retire: Callable[[ServerStatement], None] | None = None,
        context: bytes = b"",
    ) -> None:
        self.registry = registry
        #: the client's `parse_context`: the statements it prepares are those of clients with the same
        self.context = context
        self.names: dict[bytes, ServerStatement] = {}
        self.queue: deque[Entry] = deque()
        #: the server reported an error in the current extended batch and ignores everything up to Sync
        self.skipping = False
        #: tracking began after requests whose replies may be on their way: until the next sync point,
        #: every reply is the server's own (see `_blind`), then a barrier of ReadyForQuery takes over
        self.blind = blind
        self._on_retire = on_retire
        #: queue entries of the batch not sealed by a sync point yet (the rightmost ones still queued)
        self._batch = 0
        #: whether the unsealed batch has a request that needs halephant (else it becomes a barrier)
        self._interesting = False
        #: entries of the messages being translated, queued at the end of the run or at a sync point
        self._pending: list[Entry] = []
        #: statements bound by the batches a barrier stands for: retired together on a stale-plan error
        self.bound: list[ServerStatement] = []
        #: bytes for the server that `splice` decided to send (a batch retried after a stale plan)
        self.resend = b""
        if outstanding:
            self.queue.append((0, BARRIER, None, outstanding, 0, b""))

    # --- client -> server -------------------------------------------------------------------------------

    def translate(
        self,
        data: bytes,
        server: ServerStatements,
        failed: bool = False,
        outstanding: int = 0,
        frames: list[Frame] | None = None,
        retry: bytes | None = None,
    ) -> bytes:
        """Rewrite a run of complete client messages for the linked server and queue what they await.

        `failed`: the server's last ReadyForQuery said its transaction failed; `outstanding`: sync points
        sent and not answered yet, those in `data` included. Unless both say the transaction cannot be
        failed when the server reads a Parse of a statement it has, that Parse is checked by the server
        under a scratch name: PostgreSQL refuses most Parses in a failed transaction.

        `retry` (not None): a lone batch in `data` may be run again after a stale plan (`_retriable`);
        outside a transaction it is `b""`, and first in a transaction it is the Query that began the
        transaction, sent again after a ROLLBACK before the batch is.
        """
        if frames is None:
            frames = split_frames(data, len(data) + 1)[0]
        out: list[bytes] = []
        append = out.append
        queue = self._pending
        last = 0  # start of the run of client bytes passed on unchanged
        odd = self.blind or self.skipping  # both only ever end inside this loop
        # where the batch being read began in `data` (-1: in an earlier run), for a transparent retry
        batch_start = 0 if retry is not None and not self._batch and not self._interesting else -1
        for i, (t, start, end) in enumerate(frames):
            head = start - 5
            if odd:
                if self.blind:
                    if t in _SYNC_POINTS:
                        self.blind = False
                        self._barrier()
                        continue
                    rewritten = self._blind(t, data, start, end, server)
                    if rewritten is not None:
                        append(data[last:head])
                        append(rewritten)
                        last = end
                    continue
                if self.skipping:
                    # the server ignores these until Sync: pass them on as they are, expect nothing
                    if t == codes.SYNC:
                        self.skipping = False
                        self._batch = 0
                        self._interesting = False
                        self._barrier()
                    continue
                odd = False
            if t not in _TRACKED:
                continue  # Flush, CopyData, CopyDone, CopyFail: no reply of their own
            if t == codes.PARSE:
                name_end = data.find(b"\0", start, end)
                if name_end < 0:
                    queue.append(_PLAIN_PARSE)
                    continue
                needs = None
                if name_end + 1 < end and data[name_end + 1] in _EXECUTE_FIRST and self.names:
                    found = executed_name(data, name_end + 1, end)
                    needs = self.names.get(found[0]) if found is not None else None
                if name_end == start and needs is None:
                    queue.append(_PLAIN_PARSE)
                    continue
                append(data[last:head])
                last = end
                body = data[name_end + 1 : end]
                if needs is not None:
                    # SQL EXECUTE of one of the client's statements: the server knows it by halephant's name
                    assert found is not None
                    body = body[: found[1] - name_end - 1] + needs.name + body[found[2] - name_end - 1 :]
                if name_end == start:
                    assert needs is not None
                    self._prepare_on(needs, server, out)
                    append(m.message(b"P", b"\0" + body))
                    queue.append(_PLAIN_PARSE)
                    continue
                # unanswered sync points ahead of this Parse: those of earlier runs and of this one
                unsure = failed or outstanding - sum(1 for f in frames[i:] if f[0] in _SYNC_POINTS) > 0
                self._parse(data[start:name_end], body, server, out, unsure, needs)
            elif t == codes.BIND:
                portal_end = data.find(b"\0", start, end)
                name_end = data.find(b"\0", portal_end + 1, end) if portal_end >= 0 else -1
                if name_end < 0 or name_end == portal_end + 1:
                    queue.append(_PLAIN_BIND)
                    continue
                append(data[last:head])
                last = end
                name = data[portal_end + 1 : name_end]
                stmt = self._ensure(name, server, out)
                if stmt is None:
                    self._fail(name, out)
                else:
                    payload = data[start : portal_end + 1] + stmt.name + data[name_end:end]
                    append(m.message(b"B", payload))
                    queue.append((t, FORWARD, stmt, None, 0, name))
            elif t == codes.DESCRIBE or t == codes.CLOSE:
                if not _names_a_statement(data, start, end):
                    queue.append(_PLAIN_DESCRIBE if t == codes.DESCRIBE else _PLAIN_CLOSE)
                    continue
                append(data[last:head])
                last = end
                name = data[start + 1 : end - 1]
                if t == codes.CLOSE:
                    # another client may use the server's statement: only the name goes
                    old = self.names.pop(name, None)
                    queue.append((t, SYNTH, old, m.CLOSE_COMPLETE, REMAP if old else 0, name))
                    self._interesting = True
                    continue
                stmt = self._ensure(name, server, out)
                if stmt is None:
                    self._fail(name, out)
                else:
                    append(m.message(b"D", b"S" + stmt.name + b"\0"))
                    queue.append((t, FORWARD, stmt, None, 0, name))
            elif t == codes.EXECUTE:
                queue.append(_EXECUTE)
            else:  # Sync, Query, FunctionCall: the batch is sealed
                if retry is not None and batch_start >= 0 and t == codes.SYNC and not odd:
                    self._retriable(data, frames, i, batch_start, retry)
                self._seal(t)
                batch_start = end if retry is not None else -1
        if queue:
            self.queue.extend(queue)
            self._batch += len(queue)
            queue.clear()
        if last == 0:
            return data
        append(data[last:])
        return b"".join(out)

    def _retriable(self, data: bytes, frames: list[Frame], i: int, batch_start: int, began: bytes) -> None:
        """Bind (a mapped statement), Describe (portal), Execute, Sync, alone outside a transaction or
        first in one (`began`: the Query that began it): if the plan went stale, the batch can be run
        again with the statement prepared afresh (in a transaction begun again), and the client (which
        asked for the row description, and saw nothing else run in the transaction) cannot tell.

        The batch is `data[batch_start:]` up to the end of `frames[i]`, its Sync."""
        pending = self._pending
        if len(pending) != 3 or self._interesting:
            return
        bind_entry = pending[0]
        if bind_entry[0] != codes.BIND or bind_entry[2] is None:
            return
        if pending[1][0] != codes.DESCRIBE or pending[2][0] != codes.EXECUTE:
            return
        # exactly those four messages (no Flush among them): the three before the Sync begin the batch
        if i < 3 or frames[i - 3][1] - 5 != batch_start:
            return
        if (frames[i - 3][0], frames[i - 2][0], frames[i - 1][0]) != _BIND_DESCRIBE_EXECUTE:
            return
        if data[frames[i - 2][1]] != 0x50:  # Describe of the portal ('P')
            return
        pending[0] = (
            codes.BIND,
            RETRY,
            bind_entry[2],
            (began, data[batch_start : frames[i][2]]),
            0,
            bind_entry[5],
        )
        self._interesting = True

    def _seal(self, t: int) -> None:
        """A sync point ends the batch. One whose requests need nothing of halephant becomes a barrier: its
        replies may then take the fast path, and only its ReadyForQuery is counted."""
        queue, pending = self.queue, self._pending
        if self._interesting:
            queue.extend(pending)
            queue.append(_PLAIN[t])
        else:
            bound = self.bound
            for entry in pending:
                if entry[2] is not None:
                    bound.append(entry[2])
            # the batch's entries queued by earlier runs; what the server answered has left already
            for _ in range(min(self._batch, len(queue))):
                stmt = queue.pop()[2]
                if stmt is not None:
                    bound.append(stmt)
            if len(bound) > 256:
                del bound[:128]
            self._barrier()
        pending.clear()
        self._batch = 0
        self._interesting = False

    def _barrier(self) -> None:
        """One more ReadyForQuery before the next request that needs anything."""
        queue = self.queue
        if queue and queue[-1][1] == BARRIER:
            count = queue[-1][3]
            assert isinstance(count, int)
            queue[-1] = (0, BARRIER, None, count + 1, 0, b"")
        else:
            queue.append((0, BARRIER, None, 1, 0, b""))

    def passed(self, ready: int) -> None:
        """The fast path relayed `ready` ReadyForQuery while a barrier was all that was outstanding."""
        queue = self.queue
        if not queue or queue[0][1] != BARRIER:
            return
        count = queue[0][3]
        assert isinstance(count, int)
        if count > ready:
            queue[0] = (0, BARRIER, None, count - ready, 0, b"")
        else:
            queue.popleft()
            if not queue:
                self.bound.clear()

    def retriable_answered(self, data: bytes) -> bool:
        """Whether `data`, the first bytes from the server for the outstanding requests, is a whole
        successful answer to exactly one batch `_retriable` armed (nothing else outstanding): its
        messages are then forgotten, and `data` may be relayed as it is (the fast path).

        The answer is walked without copying: only replies that need nothing of halephant (no error,
        notice, parameter status or copy), then the batch's one ReadyForQuery, ending `data`. Anything
        else is False, with nothing changed: `splice` then walks it message by message."""
        queue = self.queue
        if (
            len(queue) != 4
            or queue[0][1] != RETRY
            or queue[1] is not _PLAIN_DESCRIBE
            or queue[2] is not _EXECUTE
            or queue[3] is not _PLAIN_SYNC
            or data[-6:-1] != READY_FOR_QUERY_HEAD
        ):
            return False
        end = len(data) - 6
        if walk_types(data, 0, end, _PLAIN_ANSWER) != end:
            return False
        queue.clear()
        self.bound.clear()  # as `splice` does when the queue runs empty
        return True

    def copy_in(self) -> None:
        """A COPY FROM STDIN began in a batch a barrier stands for, started by an Execute with a Sync
        behind it: PostgreSQL ignores that Sync, so one ReadyForQuery fewer is coming."""
        queue = self.queue
        if queue and queue[0][1] == BARRIER:
            self.passed(1)

    def stale_plan(self, payload: bytes) -> None:
        """An ErrorResponse from a batch a barrier stands for: on a stale plan, retire what it bound."""
        if _STALE_PLAN.encode() not in payload:
            return
        fields = m.decode_error_fields(payload)
        if fields.get("C") == sqlstate.FEATURE_NOT_SUPPORTED and fields.get("M") == _STALE_PLAN:
            for stmt in self.bound:
                if self.registry.retire(stmt) and self._on_retire is not None:
                    self._on_retire(stmt)
            self.bound.clear()

    def _blind(self, t: int, data: bytes, start: int, end: int, server: ServerStatements) -> bytes | None:
        """A message sent before the books know where the server's replies stand: rewritten so that every
        reply to it is the server's own (None: passed on as it is)."""
        if t == codes.PARSE:
            name_end = data.find(b"\0", start, end)
            name = data[start:name_end]
            if name_end <= start:
                return None
            taken = self.names.get(name)
            if taken is not None:  # the server says 42P05, if about its own name (a rare mistake)
                return taken.parse
            body = data[name_end + 1 : end]
            stmt = self.registry.get(body, self.context)
            if stmt.name in server:
                stmt = self.registry.private(body)  # a real Parse needs a name the server has not got
            self.names[name] = stmt
            server.add_unbounded(stmt)
            return stmt.parse
        if t == codes.BIND:
            portal_end = data.find(b"\0", start, end)
            name_end = data.find(b"\0", portal_end + 1, end) if portal_end >= 0 else -1
            found = self.names.get(data[portal_end + 1 : name_end]) if name_end > portal_end + 1 else None
            if found is None or found.name not in server:
                return None
            return m.message(b"B", data[start : portal_end + 1] + found.name + data[name_end:end])
        if (t == codes.DESCRIBE or t == codes.CLOSE) and _names_a_statement(data, start, end):
            name = data[start + 1 : end - 1]
            found = self.names.get(name)
            if found is None or found.name not in server:
                return None
            if t == codes.CLOSE:
                del self.names[name]
                server.discard(found.name)
            return m.message(bytes((t,)), b"S" + found.name + b"\0")
        return None

    def _parse(
        self,
        name: bytes,
        body: bytes,
        server: ServerStatements,
        out: list[bytes],
        failed: bool,
        needs: ServerStatement | None = None,
    ) -> None:
        queue = self._pending
        self._interesting = True
        if name in self.names:
            # PostgreSQL parses and analyzes the text before it finds the name taken: the server checks
            # it under a scratch name (its error, if any, is the client's), then a Describe of a missing
            # statement makes it fail where PostgreSQL says 42P05 (or 25P02 in a failed transaction), so
            # that it skips the rest of the batch as it would
            out.append(m.message(b"P", PROBE + b"\0" + body) + _CLOSE_PROBE + _FAIL_MESSAGE)
            queue.append(_PROBE_PARSE)
            queue.append(_PROBE_CLOSE)
            queue.append((codes.PARSE, FAIL, None, body, 0, name))
            return
        stmt = self.registry.get(body, self.context)
        if needs is not None:
            stmt.needs = needs
        self.names[name] = stmt
        if server.use(stmt):
            if failed:
                out.append(m.message(b"P", PROBE + b"\0" + body) + _CLOSE_PROBE)
                queue.append((codes.PARSE, FORWARD, stmt, None, UNMAP, name))
                queue.append(_PROBE_CLOSE)
            else:
                queue.append((codes.PARSE, SYNTH, stmt, m.PARSE_COMPLETE, UNMAP, name))
            return
        self._make_room(server, stmt, out)
        out.append(stmt.parse)
        queue.append((codes.PARSE, FORWARD, stmt, None, UNMAP | (LRU_DROP << 4), name))

    def _make_room(self, server: ServerStatements, stmt: ServerStatement, out: list[bytes]) -> None:
        for old in server.add(stmt):
            out.append(m.message(b"C", b"S" + old.name + b"\0"))
            self._pending.append((codes.CLOSE, DROP, old, None, LRU_ADD, b""))
            self._interesting = True

    def _ensure(self, name: bytes, server: ServerStatements, out: list[bytes]) -> ServerStatement | None:
        """The client's statement `name`, prepared on `server` first if it has not got it."""
        stmt = self.names.get(name)
        if stmt is None:
            return None
        self._prepare_on(stmt, server, out)
        return stmt

    def _prepare_on(self, stmt: ServerStatement, server: ServerStatements, out: list[bytes]) -> None:
        """Prepare `stmt` on `server` (and first what it executes) unless the server has it."""
        if stmt.needs is not None:
            self._prepare_on(stmt.needs, server, out)
        if not server.use(stmt):
            self._make_room(server, stmt, out)
            out.append(stmt.parse)
            self._pending.append((codes.PARSE, DROP, stmt, None, LRU_DROP, b""))
            self._interesting = True

    def _fail(self, name: bytes, out: list[bytes]) -> None:
        out.append(_FAIL_MESSAGE)
        self._pending.append((codes.DESCRIBE, FAIL, None, None, 0, name))
        self._interesting = True

    def sql_execute(self, name: bytes, server: ServerStatements) -> tuple[bytes, bytes] | None:
        """SQL `EXECUTE name` (a Query between batches) of the client's protocol-level statement `name`:
        (what to send first, the server-side name to execute instead). Where the server has not got the
        statement, a Parse and a Sync prepare it first, their replies dropped. None: not one of the
        client's statements (an SQL-level one, or unknown: PostgreSQL decides), or mid-batch."""
        stmt = self.names.get(name)
        if stmt is None or self._batch or self._pending or self.skipping or self.blind:
            return None
        queue = self.queue
        out: list[bytes] = []
        self._prepare_on(stmt, server, out)
        if out:  # a batch of halephant's own, ended by a Sync
            out.append(m.SYNC)
            queue.extend(self._pending)
            self._pending.clear()
            queue.append(_DROP_SYNC)
            self._interesting = False
        self.bound.append(stmt)  # a stale plan retires it, as for a Bind
        self._barrier()  # the Query's own replies pass on as they are
        return b"".join(out), stmt.name

    def set_context(self, context: bytes) -> None:
        """The client's `parse_context` changed (it ran `SET DateStyle`, ...). Its statements are from now
        on those parsed under the new one, as the client's next server prepares them: one of the old
        context must not be prepared under the new settings, where clients of the old one would use it."""
        if context == self.context:
            return
        self.context = context
        # Statements of the old context that differ only in search_path stay: as on a direct connection
        # PostgreSQL parses them again under the new one, and a changed result type is its 0A000, which
        # drivers answer by preparing again (then under the new context), never rows of a shape the
        # client did not describe.
        kept = _without_search_path(context)
        for name, stmt in list(self.names.items()):
            if stmt.needs is None and stmt.context != context and _without_search_path(stmt.context) != kept:
                self.names[name] = self.registry.get(stmt.body, context)

    def deallocate(self, name: bytes) -> bytes | None:
        """SQL `DEALLOCATE name` (a Query between batches) of one of the client's statements: the name goes
        now (another client may use the server's statement, which stays), and comes back if PostgreSQL
        would have refused it (in a failed transaction). Returns the empty Query to send instead, whose
        reply becomes DEALLOCATE's; None when `name` is not the client's (PostgreSQL decides)."""
        stmt = self.names.pop(name, None)
        if stmt is None:
            return None
        self.queue.append((codes.QUERY, TAG, stmt, "DEALLOCATE", REMAP, name))
        self._batch = 0  # a sync point: the batch before it stays tracked request by request
        self._interesting = False
        return _EMPTY_QUERY

    def reset(self) -> None:
        """Forget what is outstanding (the server went back to its pool; names stay)."""
        self.queue.clear()
        self._pending.clear()
        self.skipping = self.blind = self._interesting = False
        self._batch = 0
        self.bound.clear()

    def clear_on_success(self) -> None:
        """A Query of DISCARD ALL or DEALLOCATE ALL goes to the server: the client's names go now (what it
        sends behind it may prepare them again), the server's statements once it succeeds. If it fails
        (DISCARD ALL inside a transaction block, either in a failed transaction) the names come back."""
        self.queue.append((codes.QUERY, CLEAR, None, self.names, 0, b""))
        self.names = {}
        self._batch = 0
        self._interesting = False

    def reject(self, t: int, error: bytes) -> None:
        """A rejection in place was sent (a Query or an unnamed Parse that fails on the server)."""
        if not self.skipping:  # else the server ignores it, as it would have the rejected message
            self.queue.append((t, REPLACE, None, error, 0, b""))
            self._batch = 0 if t == codes.QUERY else self._batch + 1
            self._interesting = t != codes.QUERY

    def forget(self) -> None:
        """DEALLOCATE ALL or DISCARD ALL whose outcome is not followed: the client's names go."""
        self.names.clear()

    # --- server -> client -------------------------------------------------------------------------------

    def due_replies(self, status: int) -> bytes:
        """Synthetic replies at the head of the queue: due now (the server is at a message boundary)."""
        queue = self.queue
        out: list[bytes] = []
        while queue and queue[0][1] == SYNTH:
            reply = queue.popleft()[3]
            assert isinstance(reply, bytes)
            out.append(reply)
        return b"".join(out)

    def splice(
        self,
        buf: bytes,
        frames: list[tuple[int, int, int]],
        status: int,
        server: ServerStatements,
        copy_skips_sync: bool = False,
    ) -> tuple[list[bytes], int, int, list[tuple[int, bytes]], int]:
        """Walk complete server messages against the queue.

        Returns (bytes for the client, ReadyForQuery count, last transaction status, kept messages
        (ParameterStatus, CopyInResponse), offset where the queue ran empty: the rest needs no splicing).
        """
        out: list[bytes] = []
        kept: list[tuple[int, bytes]] = []
        ready = 0
        queue = self.queue
        last = 0  # start of the run of server bytes passed on unchanged
        stop = frames[-1][2] if frames else 0  # a partial message waits in the caller's buffer
        for t, start, end in frames:
            head = start - 5
            if queue and queue[0][1] == SYNTH:
                if last < head:
                    out.append(buf[last:head])
                last = head
                out.append(self.due_replies(status))
            if not queue:
                stop = head
                break
            if t in _ASYNC:
                if t == codes.PARAMETER_STATUS:
                    kept.append((t, buf[start:end]))
                continue
            kind, action, stmt, detail, undo, name = queue[0]
            if action == BARRIER:
                if t == codes.READY_FOR_QUERY:
                    ready += 1
                    status = buf[start]
                    assert isinstance(detail, int)
                    if detail > 1:
                        queue[0] = (kind, action, stmt, detail - 1, undo, name)
                    else:
                        queue.popleft()
                elif t == codes.COPY_IN_RESPONSE:
                    kept.append((t, buf[start:end]))
                    if copy_skips_sync:
                        self.copy_in()
                elif t == codes.ERROR_RESPONSE and self.bound:
                    self.stale_plan(buf[start:end])
                continue
            if t == codes.ERROR_RESPONSE and kind in _EXTENDED:
                failed = queue.popleft()
                self._skip_to_sync(server)  # what came later is undone first
                replacement = self._error(buf[start:end], failed, status, server)
                if replacement is not None:
                    if last < head:
                        out.append(buf[last:head])
                    out.append(replacement)
                    last = end
                continue
            if t == codes.READY_FOR_QUERY:
                ready += 1
                status = buf[start]
            elif t == codes.COPY_IN_RESPONSE:
                kept.append((t, buf[start:end]))
                # PostgreSQL ignores a Sync that reaches it in copy-in mode (the batch's own)
                if len(queue) > 1 and queue[1][0] == codes.SYNC:
                    del queue[1]
            done = t in _DONE[kind]
            if action in (FORWARD, RETRY):
                if done:
                    queue.popleft()
                continue
            if action == DROP:
                if last < head:
                    out.append(buf[last:head])
                last = end
                if t == codes.READY_FOR_QUERY:
                    ready -= 1  # the answer to a batch the client never sees (a retried one)
                if done:
                    queue.popleft()
            elif action == TAG:
                if t == codes.EMPTY_QUERY_RESPONSE:
                    if last < head:
                        out.append(buf[last:head])
                    last = end
                    assert isinstance(detail, str)
                    if status == _STATUS_FAILED:
                        out.append(_aborted_error())
                        self._undo(stmt, undo, name, server)  # refused: the client keeps its statement
                    else:
                        out.append(command_complete(detail))
                elif done:
                    queue.popleft()
            elif action == REPLACE:  # a rejected Query (a rejected Parse fails above)
                if t == codes.ERROR_RESPONSE:
                    if last < head:
                        out.append(buf[last:head])
                    last = end
                    assert isinstance(detail, bytes)
                    out.append(detail)
                if done:
                    queue.popleft()
            elif action == CLEAR:
                if t == codes.COMMAND_COMPLETE and buf.startswith(_DROPPED_ALL, start):
                    server.clear()
                elif t == codes.ERROR_RESPONSE:
                    assert isinstance(detail, dict)
                    for old_name, old in detail.items():  # refused: the client keeps its statements
                        self.names.setdefault(old_name, old)
                if done:
                    queue.popleft()
            elif action == FAIL:
                # the Describe of a missing statement did not fail (someone made one by that name)
                if last < head:
                    out.append(buf[last:head])
                last = end
                if done:
                    queue.popleft()
        if last < stop:
            out.append(buf[last:stop])
        if queue and queue[0][1] == SYNTH:
            out.append(self.due_replies(status))
        if not queue:
            self.bound.clear()
        return out, ready, status, kept, stop

    def _error(self, payload: bytes, entry: Entry, status: int, server: ServerStatements) -> bytes | None:
        """The server failed a request: undo what it would have done; None keeps the server's error."""
        kind, action, stmt, detail, undo, name = entry
        if action == FAIL:
            shown = name.decode(errors="replace")
            if kind == codes.PARSE:
                assert isinstance(detail, bytes)
                if status == _STATUS_FAILED and not _TRANSACTION_EXIT.match(detail):
                    return _aborted_error()
                return m.error_response(
                    sqlstate.DUPLICATE_PREPARED_STATEMENT, f'prepared statement "{shown}" already exists'
                )
            return m.error_response(
                sqlstate.INVALID_SQL_STATEMENT_NAME, f'prepared statement "{shown}" does not exist'
            )
        if action == REPLACE:
            assert isinstance(detail, bytes)
            return detail
        self._undo(stmt, undo, name, server)
        if stmt is not None and kind != codes.CLOSE:
            fields = m.decode_error_fields(payload)
            code = fields.get("C", "")
            if code == sqlstate.FEATURE_NOT_SUPPORTED and fields.get("M", "") == _STALE_PLAN:
                # the schema changed under the statement: the next Parse of this text prepares afresh
                if self.registry.retire(stmt) and self._on_retire is not None:
                    self._on_retire(stmt)
                if action == RETRY and self._retry(stmt, detail, name, server):
                    return b""
            elif code == sqlstate.INVALID_SQL_STATEMENT_NAME:
                # the server has not got it after all (its Parse failed unseen, or a DEALLOCATE halephant
                # did not see): as PostgreSQL would, the client's name goes too
                server.discard(stmt.name)
                if name and self.names.get(name) is stmt:
                    del self.names[name]
                    shown = name.decode(errors="replace")
                    return m.error_response(
                        sqlstate.INVALID_SQL_STATEMENT_NAME, f'prepared statement "{shown}" does not exist'
                    )
            elif code == sqlstate.DUPLICATE_PREPARED_STATEMENT:
                server.add(stmt)  # it had it after all
            if name:
                return _named_as_client(payload, stmt.name, name)
        return None

    def _retry(self, stmt: ServerStatement, detail: object, name: bytes, server: ServerStatements) -> bool:
        """Run a failed retriable batch again, once, with its statement prepared afresh. Only when nothing
        was sent after it: the server has skipped the batch and answers its Sync next. In a transaction
        (the batch was the first thing in it after the Query that began it) the failed transaction is
        rolled back and begun again with that Query first; the replies to both are dropped."""
        queue = self.queue
        if len(queue) != 1 or queue[0][0] != codes.SYNC or self._batch or self._pending:
            return False
        assert isinstance(detail, tuple)
        began, batch = detail
        fresh = self.registry.get(stmt.body, stmt.context)
        if fresh.name == stmt.name or self.names.get(name) is not stmt:
            return False
        self.names[name] = fresh
        queue[0] = _DROP_SYNC  # the failed batch's ReadyForQuery
        out: list[bytes] = []
        if began:
            out.append(_ROLLBACK + began)
            queue.append(_DROP_QUERY)
            queue.append(_DROP_QUERY)
        self._prepare_on(fresh, server, out)  # a new name: the server has not got it
        self.resend = b"".join(out) + self.translate(batch, server, outstanding=1)
        return True

    def _undo(self, stmt: ServerStatement | None, undo: int, name: bytes, server: ServerStatements) -> None:
        while undo:
            op, undo = undo & 0xF, undo >> 4
            if stmt is None:
                continue
            if op == UNMAP:
                if self.names.get(name) is stmt:
                    del self.names[name]
            elif op == REMAP:
                self.names.setdefault(name, stmt)
            elif op == LRU_DROP:
                server.discard(stmt.name)
            elif op == LRU_ADD:
                server.restore(stmt)

    def _skip_to_sync(self, server: ServerStatements) -> None:
        """After an error the server ignores every request up to the next Sync."""
        queue = self.queue
        skipped: list[Entry] = []
        while queue and queue[0][0] != codes.SYNC and queue[0][1] != BARRIER:
            skipped.append(queue.popleft())
        # the books are rolled back like a log: the latest change first
        for _, _, stmt, _, undo, name in reversed(skipped):
            if undo:
                self._undo(stmt, undo, name, server)
        if not queue:
            self.skipping = True
