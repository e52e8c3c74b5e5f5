"""The sans-IO bookkeeping of shared prepared statements: registry, per-server LRU, translation, and the
ordered reply queue, checked against a small model of PostgreSQL's extended query protocol.

The model answers Parse/Bind/Describe/Execute/Close/Sync as PostgreSQL does for named statements (including
"ignore everything until Sync after an error"). Hypothesis generates several clients' pipelines; each client
runs its batches through `ClientStatements` against one shared model server (as a pool hands one server to
several clients at sync points) and, separately, directly against a model server of its own. The bytes each
client receives must be identical.
"""

from __future__ import annotations

import copy
import itertools
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import BackendScanner, split_frames
from halephant.protocol.prepared import (
    BARRIER,
    SYNTH,
    ClientStatements,
    ServerStatement,
    ServerStatements,
    StatementRegistry,
    parse_context,
)

# --- client message builders ------------------------------------------------------------------------------


def parse(name: str, text: str) -> bytes:
    return m.message(b"P", name.encode() + b"\0" + text.encode() + b"\0" + struct.pack("!h", 0))


def bind(name: str) -> bytes:
    return m.message(b"B", b"\0" + name.encode() + b"\0" + struct.pack("!hhh", 0, 0, 0))


def execute() -> bytes:
    return m.message(b"E", b"\0" + struct.pack("!i", 0))


def describe(name: str) -> bytes:
    return m.message(b"D", b"S" + name.encode() + b"\0")


def close(name: str) -> bytes:
    return m.message(b"C", b"S" + name.encode() + b"\0")


SYNC = m.message(b"S")
FLUSH = m.message(b"H")


# --- a model PostgreSQL backend ---------------------------------------------------------------------------


class ModelServer:
    """Named statements and portals as PostgreSQL keeps them, with its error rules."""

    def __init__(self) -> None:
        self.statements: dict[bytes, bytes] = {}  # name -> text
        self.portal: bytes | None = None
        self.skipping = False
        self.in_copy = False

    def feed(self, data: bytes) -> bytes:
        frames, consumed = split_frames(data, 1 << 20)
        assert consumed == len(data)
        out: list[bytes] = []
        for t, start, end in frames:
            out.append(self._one(t, data[start:end]))
        return b"".join(out)

    def _error(self, code: str, text: str) -> bytes:
        self.skipping = True
        return m.error_response(code, text)

    def _one(self, t: int, payload: bytes) -> bytes:
        if t == codes.SYNC:
            self.skipping = False
            self.portal = None
            return m.READY_FOR_QUERY_IDLE
        if self.skipping or t == codes.FLUSH:
            return b""
        if t == codes.PARSE:
            name, rest = payload.split(b"\0", 1)
            text = rest.split(b"\0", 1)[0]
            # PostgreSQL reports a syntax error before a duplicate name
            if text == b"FAIL":
                return self._error("42601", 'syntax error at or near "FAIL"')
            if name and name in self.statements:
                return self._error("42P05", f'prepared statement "{name.decode()}" already exists')
            self.statements[name] = text
            return m.PARSE_COMPLETE
        if t == codes.BIND:
            _, name, _ = payload.split(b"\0", 2)
            if name not in self.statements:
                return self._error("26000", f'prepared statement "{name.decode()}" does not exist')
            self.portal = self.statements[name]
            return m.message(b"2")
        if t == codes.DESCRIBE:
            name = payload[1:-1]
            if name not in self.statements:
                return self._error("26000", f'prepared statement "{name.decode()}" does not exist')
            return m.message(b"t", struct.pack("!h", 0)) + m.message(b"T", struct.pack("!h", 0))
        if t == codes.EXECUTE:
            if self.portal is None:
                return self._error("34000", 'portal "" does not exist')
            if self.portal == b"ERR":
                return self._error("22012", "division by zero")
            return m.message(b"D", b"\0\0") + m.message(b"C", b"SELECT " + self.portal + b"\0")
        if t == codes.CLOSE:
            self.statements.pop(payload[1:-1], None)
            return m.CLOSE_COMPLETE
        raise AssertionError(f"unexpected message {chr(t)}")


class Link:
    """A client's side of the pooler, as `halephant.proxy.prepared` drives it: translate out; relay back
    through the fast path (BackendScanner) or message by message, with replies cut anywhere."""

    def __init__(self, registry: StatementRegistry, blind: bool = False) -> None:
        self.books = ClientStatements(registry, blind=blind)
        self.received = b""
        self.scanner = BackendScanner()
        self.buf = b""  # a partial message held back by the message-by-message path
        self.lru = ServerStatements(1)

    def send(
        self, data: bytes, server: ModelServer, lru: ServerStatements, cuts: list[int] | None = None
    ) -> None:
        # the pooling loop counts the sync points of a run before handing it over
        syncs = sum(1 for t, _, _ in split_frames(data, 1 << 20)[0] if t == codes.SYNC)
        replies = server.feed(self.books.translate(data, lru, outstanding=syncs))
        if self.books.queue and self.books.queue[0][1] == SYNTH and self.scanner.at_boundary:
            self.received += self.books.due_replies(codes.TX_IDLE)
        self.lru = lru
        points = sorted({c % (len(replies) + 1) for c in cuts or []} | {0, len(replies)})
        for lo, hi in itertools.pairwise(points):
            self.relay(replies[lo:hi])

    def _fast(self, data: bytes) -> None:
        self.scanner.feed(data)
        self.received += data

    def relay(self, data: bytes) -> None:
        books, sc = self.books, self.scanner
        queue = books.queue
        if not self.buf and (not queue or (len(queue) == 1 and queue[0][1] == BARRIER)):
            self._fast(data)
            if queue and sc.ready:
                books.passed(sc.ready)
            return
        while data and not self.buf and not sc.at_boundary:
            step = sc.bytes_to_boundary()
            self._fast(data[:step])
            data = data[step:]
            if sc.ready and queue and queue[0][1] == BARRIER:
                books.passed(sc.ready)
        if not queue:
            rest, self.buf = self.buf + data, b""
            if rest:
                self._fast(rest)
            return
        buf = self.buf + data
        frames, consumed = split_frames(buf, 1 << 20)
        out, _ready, _status, _kept, stop = books.splice(buf, frames, codes.TX_IDLE, self.lru)
        if stop < consumed:
            rest, self.buf = buf[stop:], b""
        else:
            rest, self.buf = b"", buf[consumed:]
        self.received += b"".join(out)
        if rest:
            self._fast(rest)


# --- unit tests ---------------------------------------------------------------------------------------------


def test_registry_names_by_body_and_retires_by_generation() -> None:
    registry = StatementRegistry()
    body = b"SELECT 1\0\0\0"
    first = registry.get(body)
    assert registry.get(body) is first
    assert first.name.startswith(b"h_") and first.parse.startswith(b"P")
    assert registry.get(b"SELECT 2\0\0\0").name != first.name
    assert registry.retire(first)
    assert not registry.retire(first)  # retiring twice moves nothing
    second = registry.get(body)
    assert second.name == first.name + b"_1"
    assert registry.retire(second)
    assert registry.get(body).name == first.name + b"_2"


def test_clients_whose_settings_parse_a_text_differently_get_different_statements() -> None:
    assert parse_context({}) == parse_context({"application_name": "x", "work_mem": "1MB"}) == b""
    assert parse_context({"client_encoding": "utf-8"}) == parse_context({"client_encoding": "UTF8"})
    dmy = parse_context({"datestyle": "ISO, DMY"})
    assert dmy not in (b"", parse_context({"datestyle": "ISO, MDY"}))
    registry = StatementRegistry()
    body = b"SELECT '01/02/2003'::date\0\0\0"
    default = registry.get(body)
    assert registry.get(body, dmy) is registry.get(body, dmy) is not default
    assert registry.get(body, dmy).name != default.name
    stale = registry.get(body, dmy)
    assert registry.retire(stale) and registry.get(body, dmy).name == stale.name + b"_1"
    assert registry.get(body) is default
    # a client whose settings change: its statements are those of its new settings from then on
    client = ClientStatements(registry)
    server = ServerStatements(10)
    client.translate(parse("s", "SELECT '01/02/2003'::date"), server)
    assert client.names[b"s"] is default
    client.set_context(dmy)
    assert client.names[b"s"] is registry.get(body, dmy)


def test_clients_of_different_search_paths_get_different_statements_a_switch_keeps_its_own() -> None:
    tenant_a = parse_context({"search_path": "tenant_a"})
    tenant_b = parse_context({"search_path": "tenant_b"})
    assert len({b"", tenant_a, tenant_b}) == 3
    dmy = parse_context({"datestyle": "ISO, DMY"})
    dmy_b = parse_context({"datestyle": "ISO, DMY", "search_path": "tenant_b"})
    assert dmy_b not in (dmy, tenant_b)
    registry = StatementRegistry()
    body = b"SELECT * FROM items\0\0\0"
    assert registry.get(body, tenant_a) is not registry.get(body, tenant_b)
    client = ClientStatements(registry, context=tenant_a)
    client.translate(parse("s", "SELECT * FROM items"), ServerStatements(10))
    assert client.names[b"s"] is registry.get(body, tenant_a)
    # search_path alone changed: PostgreSQL parses the client's statement again itself (a changed result
    # type is its 0A000, as on a direct connection), so the name keeps its statement
    client.set_context(tenant_b)
    assert client.names[b"s"] is registry.get(body, tenant_a)
    client.translate(parse("t", "SELECT * FROM items"), ServerStatements(10))
    assert client.names[b"t"] is registry.get(body, tenant_b)
    # anything else changed too: every name moves to the statements of the new settings
    client.set_context(dmy)
    assert client.names[b"s"] is client.names[b"t"] is registry.get(body, dmy)


def test_server_lru_evicts_least_recently_used() -> None:
    registry = StatementRegistry()
    stmts = [registry.get(f"SELECT {i}\0\0\0".encode()) for i in range(4)]
    lru = ServerStatements(2)
    assert lru.add(stmts[0]) == [] and lru.add(stmts[1]) == []
    assert lru.use(stmts[0])  # now 1 is the oldest
    assert lru.add(stmts[2]) == [stmts[1]]
    assert lru.names() == [stmts[0].name, stmts[2].name]
    lru.restore(stmts[1])
    assert lru.names()[0] == stmts[1].name
    assert not lru.use(stmts[3])


def test_close_is_answered_in_order_behind_outstanding_replies() -> None:
    registry = StatementRegistry()
    lru = ServerStatements(10)
    books = ClientStatements(registry)
    sent = books.translate(parse("", "SELECT 1") + bind("") + execute() + close("x") + FLUSH, lru)
    assert close("x") not in sent  # the server's statements are not the client's to close
    assert books.due_replies(codes.TX_IDLE) == b""  # not before the replies to what came first
    server = ModelServer()
    replies = server.feed(sent)
    frames, _ = split_frames(replies, 1 << 20)
    out, *_ = books.splice(replies, frames, codes.TX_IDLE, lru)
    assert b"".join(out) == replies + m.CLOSE_COMPLETE
    assert not books.queue


@pytest.mark.parametrize("type_", [b"D", b"C"], ids=["Describe", "Close"])
@pytest.mark.parametrize("payload", [b"Sa", b"Sa\0x", b"Sa\0\0"], ids=["no-nul", "trailing", "two-nuls"])
def test_a_malformed_describe_or_close_of_a_statement_goes_to_the_server_as_it_is(
    type_: bytes, payload: bytes
) -> None:
    lru = ServerStatements(10)
    books = ClientStatements(StatementRegistry())
    books.translate(parse("a", "SELECT 1") + SYNC, lru)
    books.queue.clear()
    malformed = m.message(type_, payload)
    # PostgreSQL answers ERROR 08P01 to these bytes: no CloseComplete of its own, no 26000 for another name
    assert books.translate(malformed + SYNC, lru) == malformed + SYNC
    assert books.queue[0][1] != SYNTH
    assert b"a" in books.names


def test_statement_is_prepared_once_per_server_and_evicted_with_close() -> None:
    registry = StatementRegistry()
    lru = ServerStatements(1)
    books = ClientStatements(registry)
    sent = books.translate(parse("a", "SELECT 1") + parse("b", "SELECT 2") + bind("a") + SYNC, lru)
    a, b = registry.get(b"SELECT 1\0\0\0"), registry.get(b"SELECT 2\0\0\0")
    # b evicts a (capacity 1), so the Bind of a needs a Close of b and a fresh Parse of a first
    assert sent == (
        a.parse + m.message(b"C", b"S" + a.name + b"\0") + b.parse
        + m.message(b"C", b"S" + b.name + b"\0") + a.parse
        + m.message(b"B", b"\0" + a.name + b"\0" + struct.pack("!hhh", 0, 0, 0)) + SYNC
    )  # fmt: skip
    server = ModelServer()
    replies = server.feed(sent)
    frames, _ = split_frames(replies, 1 << 20)
    out, ready, *_ = books.splice(replies, frames, codes.TX_IDLE, lru)
    assert b"".join(out) == m.PARSE_COMPLETE * 2 + m.message(b"2") + m.READY_FOR_QUERY_IDLE
    assert ready == 1 and not books.queue
    assert set(server.statements) == {a.name}


def test_stale_plan_error_retires_the_statement() -> None:
    registry = StatementRegistry()
    retired: list[ServerStatement] = []
    lru = ServerStatements(10)
    books = ClientStatements(registry, on_retire=retired.append)
    books.translate(parse("q", "SELECT * FROM t") + SYNC, lru)
    books.splice(m.PARSE_COMPLETE + m.READY_FOR_QUERY_IDLE, [(49, 5, 5), (90, 10, 11)], codes.TX_IDLE, lru)
    books.translate(bind("q") + SYNC, lru)
    error = m.error_response("0A000", "cached plan must not change result type")
    replies = error + m.READY_FOR_QUERY_IDLE
    frames, _ = split_frames(replies, 1 << 20)
    out, *_ = books.splice(replies, frames, codes.TX_IDLE, lru)
    assert b"".join(out) == replies  # the client sees PostgreSQL's error
    old = books.names[b"q"]
    assert retired == [old]
    assert registry.get(old.body).name == old.name + b"_1"  # the next Parse prepares afresh


def test_barrier_passes_earlier_replies_through() -> None:
    registry = StatementRegistry()
    lru = ServerStatements(10)
    books = ClientStatements(registry, outstanding=2)
    sent = books.translate(parse("a", "SELECT 1") + SYNC, lru)
    earlier = m.message(b"C", b"SELECT 1\0") + m.READY_FOR_QUERY_IDLE * 2
    replies = earlier + ModelServer().feed(sent)
    frames, _ = split_frames(replies, 1 << 20)
    out, ready, *_ = books.splice(replies, frames, codes.TX_IDLE, lru)
    assert b"".join(out) == replies and ready == 3 and not books.queue


# --- hypothesis: pipelines through shared servers answer exactly as direct ------------------------------


def failing(server: ModelServer, batch: list[bytes]) -> bool:
    """Would `batch` get an ErrorResponse from this (direct) server?"""
    replies = copy.deepcopy(server).feed(b"".join(batch))
    return any(t == codes.ERROR_RESPONSE for t, _, _ in split_frames(replies, 1 << 20)[0])


NAMES = ["a", "b", "c"]
TEXTS = ["1", "2", "FAIL", "ERR"]

op = st.one_of(
    st.tuples(st.just("parse"), st.sampled_from(NAMES), st.sampled_from(TEXTS)),
    st.tuples(st.just("bind"), st.sampled_from([*NAMES, "zz"])),
    st.tuples(st.just("describe"), st.sampled_from([*NAMES, "zz"])),
    st.tuples(st.just("close"), st.sampled_from([*NAMES, "zz"])),
    st.tuples(st.just("unnamed"), st.sampled_from(TEXTS)),
    st.just(("flush",)),
    st.just(("sync",)),
)


def encode(item: tuple[str, ...]) -> bytes:
    kind = item[0]
    if kind == "parse":
        return parse(item[1], item[2])
    if kind == "bind":
        return bind(item[1]) + execute()
    if kind == "describe":
        return describe(item[1])
    if kind == "close":
        return close(item[1])
    if kind == "unnamed":
        return parse("", item[1]) + bind("") + execute()
    return FLUSH if kind == "flush" else SYNC


def batches(ops: list[tuple[str, ...]]) -> Iterator[list[bytes]]:
    """Split at Sync: a pooled server may move to another client only there."""
    batch: list[bytes] = []
    for item in [*ops, ("sync",)]:
        batch.append(encode(item))
        if item[0] == "sync":
            yield batch
            batch = []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(op, max_size=14), min_size=1, max_size=3),
    st.integers(1, 4),
    st.randoms(use_true_random=False),
    st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_pipelines_through_shared_servers_match_direct(
    clients: list[list[tuple[str, ...]]], capacity: int, rnd: object, blind: list[bool]
) -> None:
    import random

    assert isinstance(rnd, random.Random)
    registry = StatementRegistry()
    servers = [(ModelServer(), ServerStatements(capacity)) for _ in range(2)]
    # a blind client began naming statements after unsynced requests: its first batch is read blind
    # (errors in that batch may name halephant's server-side statement: the documented limit)
    links = [
        Link(registry, blind[n] and not failing(ModelServer(), next(batches(ops))))
        for n, ops in enumerate(clients)
    ]
    directs = [ModelServer() for _ in clients]
    expected = [b""] * len(clients)
    pending = [list(batches(ops)) for ops in clients]
    while any(pending):
        i = rnd.choice([n for n, p in enumerate(pending) if p])
        batch = pending[i].pop(0)
        while pending[i] and rnd.random() < 0.3 and not failing(directs[i], batch):
            # pipelined: the next batch goes before this one is answered (after a batch that fails,
            # halephant may have read the later ones as if it had not: the documented limit)
            batch += pending[i].pop(0)
        server, lru = rnd.choice(servers)
        server.portal = None
        # the client's messages arrive in a few chunks; the server answers each as it comes
        cut = sorted(rnd.sample(range(len(batch) + 1), k=min(2, len(batch) + 1)))
        for lo, hi in zip([0, *cut], [*cut, len(batch)], strict=True):
            if lo < hi:
                # and the server's replies reach halephant cut anywhere
                cuts = [rnd.randrange(1 << 16) for _ in range(rnd.randrange(4))]
                links[i].send(b"".join(batch[lo:hi]), server, lru, cuts)
        expected[i] += directs[i].feed(b"".join(batch))
        assert not links[i].books.queue and not links[i].books.skipping
    for link, want in zip(links, expected, strict=True):
        assert split_frames(link.received, 1 << 20)[0] == split_frames(want, 1 << 20)[0]
        assert link.received == want


def test_batch_that_needs_nothing_becomes_a_barrier_and_its_stale_plan_still_retires() -> None:
    registry = StatementRegistry()
    retired: list[ServerStatement] = []
    lru = ServerStatements(10)
    books = ClientStatements(registry, on_retire=retired.append)
    server = ModelServer()
    server.feed(books.translate(parse("q", "1") + SYNC, lru))
    books.queue.clear()
    # the steady state: Bind/Execute/Sync of a statement the server has, in one piece
    sent = books.translate(bind("q") + execute() + SYNC, lru)
    assert list(books.queue) == [(0, BARRIER, None, 1, 0, b"")]
    assert sent.startswith(m.message(b"B", b"\0" + registry.get(b"1\0\0\0").name + b"\0" + bytes(6)))
    books.translate(bind("q") + execute() + SYNC, lru)
    assert list(books.queue) == [(0, BARRIER, None, 2, 0, b"")]
    books.passed(1)
    assert list(books.queue) == [(0, BARRIER, None, 1, 0, b"")]
    books.stale_plan(m.error_response("0A000", "cached plan must not change result type")[5:])
    assert retired == [registry.get(b"1\0\0\0")] or retired  # retired, whichever object it was
    books.passed(1)
    assert not books.queue and not books.bound
    # a batch split before its Sync stays tracked until then, and needs nothing: a barrier too
    books.translate(bind("q"), lru)
    assert len(books.queue) == 1 and books.queue[0][1] != BARRIER
    books.translate(execute() + SYNC, lru)
    assert [e[1] for e in books.queue] == [BARRIER]


def describe_portal() -> bytes:
    return m.message(b"D", b"P\0")


def prepared_q() -> tuple[ClientStatements, ServerStatements]:
    """The books of a client that has prepared `q` (SELECT 1), and the server that holds it."""
    lru = ServerStatements(10)
    books = ClientStatements(StatementRegistry())
    ModelServer().feed(books.translate(parse("q", "1") + SYNC, lru))
    books.queue.clear()
    return books, lru


def test_stale_plan_of_a_lone_batch_with_describe_is_run_again_unseen() -> None:
    books, lru = prepared_q()
    old = books.names[b"q"]
    batch = bind("q") + describe_portal() + execute() + SYNC
    books.translate(batch, lru, outstanding=1, retry=b"")
    stale = m.error_response("0A000", "cached plan must not change result type")
    replies = stale + m.READY_FOR_QUERY_IDLE
    frames, _ = split_frames(replies, 1 << 20)
    out, ready, *_ = books.splice(replies, frames, codes.TX_IDLE, lru)
    assert b"".join(out) == b"" and ready == 0  # neither the error nor its ReadyForQuery reach the client
    fresh = books.names[b"q"]
    assert fresh is not old and fresh.name == old.name + b"_1"
    assert books.resend.startswith(fresh.parse)
    assert fresh.name in books.resend[len(fresh.parse) :]
    answer = m.message(b"2") + m.message(b"T", b"\0\0") + m.message(b"C", b"SELECT 0\0")
    replies = m.PARSE_COMPLETE + answer + m.READY_FOR_QUERY_IDLE
    frames, _ = split_frames(replies, 1 << 20)
    out, ready, *_ = books.splice(replies, frames, codes.TX_IDLE, lru)
    assert b"".join(out) == answer + m.READY_FOR_QUERY_IDLE and ready == 1
    assert not books.queue
    # not retried: without the Describe, or with a Flush among the messages
    books.translate(bind("q") + execute() + SYNC, lru, outstanding=1, retry=b"")
    assert all(entry[1] != 8 for entry in books.queue)
    books.queue.clear()
    for flushed in (
        bind("q") + describe_portal() + m.message(b"H") + execute() + SYNC,
        m.message(b"H") + bind("q") + describe_portal() + execute() + SYNC,
    ):
        books.translate(flushed, lru, outstanding=1, retry=b"")
        assert all(entry[1] != 8 for entry in books.queue)
        books.queue.clear()


def test_a_lone_batch_armed_for_a_retry_and_answered_in_full_takes_the_fast_path() -> None:
    books, lru = prepared_q()
    batch = bind("q") + describe_portal() + execute() + SYNC
    row = m.message(b"D", b"\0\x01\0\0\0\x01" + b"1")
    answer = m.message(b"2") + m.message(b"T", b"\0\0") + row + m.message(b"C", b"SELECT 1\0")
    # not whole, not successful, or with a message that needs halephant: the books are left as they are
    refused = [
        answer,  # no ReadyForQuery yet
        (answer + m.READY_FOR_QUERY_IDLE)[:-7] + m.READY_FOR_QUERY_IDLE,  # cut inside the last message
        m.error_response("0A000", "cached plan must not change result type") + m.READY_FOR_QUERY_IDLE,
        m.message(b"N", b"SNOTICE\0\0") + answer + m.READY_FOR_QUERY_IDLE,
        answer + m.message(b"S", b"a\0b\0") + m.READY_FOR_QUERY_IDLE,
        # a value that ends like a ReadyForQuery, and no ReadyForQuery
        m.message(b"2") + m.message(b"D", b"\0\x01\0\0\0\x06" + m.READY_FOR_QUERY_IDLE),
    ]
    for replies in refused:
        books.translate(batch, lru, outstanding=1, retry=b"")
        queued = list(books.queue)
        assert queued[0][1] == 8 and len(queued) == 4  # armed for a retry
        assert not books.retriable_answered(replies)
        assert list(books.queue) == queued
        books.queue.clear()
    books.translate(batch, lru, outstanding=1, retry=b"")
    assert books.retriable_answered(answer + m.READY_FOR_QUERY_IDLE)
    assert not books.queue and not books.bound
    # a batch that is not armed (no Describe) is not this path's
    books.translate(bind("q") + execute() + SYNC, lru, outstanding=1, retry=b"")
    assert not books.retriable_answered(
        m.message(b"2") + m.message(b"C", b"SELECT 1\0") + m.READY_FOR_QUERY_IDLE
    )


def test_stale_plan_first_in_a_transaction_is_run_again_in_the_transaction_begun_again() -> None:
    books, lru = prepared_q()
    began = m.query("BEGIN ISOLATION LEVEL REPEATABLE READ")
    batch = bind("q") + describe_portal() + execute() + SYNC
    books.translate(batch, lru, outstanding=1, retry=began)
    in_transaction = m.message(b"Z", b"T")
    stale = m.error_response("0A000", "cached plan must not change result type") + m.message(b"Z", b"E")
    frames, _ = split_frames(stale, 1 << 20)
    out, ready, *_ = books.splice(stale, frames, codes.TX_IN_TRANSACTION, lru)
    assert b"".join(out) == b"" and ready == 0
    fresh = books.names[b"q"]
    # rolled back, begun again with the client's own Query, then prepared afresh and run again
    assert books.resend.startswith(m.query("ROLLBACK") + began + fresh.parse)
    answer = m.message(b"2") + m.message(b"T", b"\0\0") + m.message(b"C", b"SELECT 0\0")
    replies = (
        m.message(b"C", b"ROLLBACK\0") + m.READY_FOR_QUERY_IDLE + m.message(b"C", b"BEGIN\0") + in_transaction
        + m.PARSE_COMPLETE + answer + in_transaction
    )  # fmt: skip
    frames, _ = split_frames(replies, 1 << 20)
    out, ready, status, *_ = books.splice(replies, frames, codes.TX_FAILED, lru)
    assert b"".join(out) == answer + in_transaction and ready == 1 and status == codes.TX_IN_TRANSACTION
    assert not books.queue
