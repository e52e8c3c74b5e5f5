"""End to end: protocol-level prepared statements in transaction pooling.

Client statement names are private to each client and mapped onto shared server-side statements, prepared
on whichever server a client gets. These tests run more clients than servers so statements really move
between servers, and compare what clients see with what PostgreSQL says directly: raw message sequences
(hand-written and hypothesis-generated pipelines of Parse/Bind/Describe/Execute/Close/Sync/Flush), psycopg
(prepare=True, pipeline mode), asyncpg (its statement cache, executemany) and pgbench -M prepared.
"""

from __future__ import annotations

import asyncio
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest
import rawclient as rc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawclient import Message, RawClient
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster, pgbench

pytestmark = pytest.mark.e2e

BENCH_DB = "e2e_prepared_bench"
POOL_SIZE = 2


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    pg.create_database(BENCH_DB, owner="myapp")
    pgbench(pg.primary, "-i", "-q", "-s", "1", dbname=BENCH_DB, user="myapp")
    main = {"cluster": "main", "database": "myapp", "checkout_timeout": "10s"}
    config = default_config(
        pg,
        databases={
            "myapp": {**main, "pool_size": POOL_SIZE},
            "one": {**main, "pool_size": 1},
            "tiny_cache": {**main, "pool_size": 1, "max_prepared_statements": 2},
            "pinning": {**main, "pool_size": 2, "max_prepared_statements": 0},
            "bench": {"cluster": "main", "database": BENCH_DB, "pool_size": 4},
        },
    )
    return module_halephant.start(config)


@pytest.fixture(autouse=True)
def clean(pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(pg.primary)


_table_numbers = iter(range(1, 1_000_000))


def new_table(pg: Cluster, columns: str = "id int PRIMARY KEY, v text") -> str:
    name = f"e2e_prepared_{next(_table_numbers)}_{int(time.time() * 1000) % 100_000}"
    pg.primary.sql(f"CREATE TABLE {name} ({columns})", dbname="myapp", user="myapp")
    return name


# --- raw protocol ----------------------------------------------------------------------------------------


def parse(sql: str, name: str = "", types: tuple[int, ...] = ()) -> bytes:
    return rc.msg(b"P", rc.cstr(name) + rc.cstr(sql) + struct.pack(f"!h{len(types)}I", len(types), *types))


def bind(statement: str = "", portal: str = "", params: tuple[str | None, ...] = ()) -> bytes:
    body = rc.cstr(portal) + rc.cstr(statement) + struct.pack("!hh", 0, len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p.encode())) + p.encode()
    return rc.msg(b"B", body + struct.pack("!h", 0))


def describe(kind: str, name: str = "") -> bytes:
    return rc.msg(b"D", kind.encode() + rc.cstr(name))


def close(kind: str, name: str = "") -> bytes:
    return rc.msg(b"C", kind.encode() + rc.cstr(name))


def flush() -> bytes:
    return rc.msg(b"H")


def direct(pg: Cluster) -> RawClient:
    client = RawClient(pg.primary.host, pg.primary.port)
    client.login("myapp", "myapp", "myapp")
    return client


def proxied(hal: Running, dbname: str = "myapp") -> RawClient:
    client = RawClient(hal.host, hal.port)
    client.login("myapp", "myapp", dbname)
    return client


def read_syncs(client: RawClient, n: int, timeout: float = 5.0) -> list[Message]:
    out: list[Message] = []
    for _ in range(n):
        out += client.read_until_ready(timeout=timeout)
    return out


def shape(messages: list[Message]) -> list[tuple[str, ...]]:
    """What must match between PostgreSQL and halephant: types, SQLSTATEs and messages, rows, tags."""
    out: list[tuple[str, ...]] = []
    for msg in messages:
        t = msg.type.decode()
        if t in ("E", "N"):
            f = msg.fields
            out.append((t, f.get("C", ""), f.get("M", "")))
        elif t in ("D", "C", "Z", "T", "t"):
            out.append((t, msg.payload.hex()))
        elif t == "S":
            continue  # ParameterStatus: not part of the answer
        else:
            out.append((t,))
    return out


def test_statement_is_shared_and_prepared_on_whichever_server(pg: Cluster, hal: Running) -> None:
    with proxied(hal) as a, proxied(hal) as b:
        for client in (a, b):
            client.send(
                parse("SELECT $1::int + 1", "s1") + bind("s1", params=("41",)) + rc.execute() + rc.sync()
            )
            got = client.read_until_ready()
            assert [m.type for m in got] == [b"1", b"2", b"D", b"C", b"Z"], got
            assert rc.data_rows(got) == [["42"]]
        # the same text keeps working for both, whichever server each gets
        for i in range(10):
            for client in (a, b):
                client.send(bind("s1", params=(str(i),)) + rc.execute() + rc.sync())
                assert rc.data_rows(client.read_until_ready()) == [[str(i + 1)]]


def test_bind_to_unknown_statement_is_26000_and_client_stays_usable(hal: Running) -> None:
    with proxied(hal) as client:
        client.send(bind("nope") + rc.execute() + rc.sync())
        got = client.read_until_ready()
        assert [m.type for m in got] == [b"E", b"Z"]
        assert got[0].fields["C"] == "26000"
        assert got[0].fields["M"] == 'prepared statement "nope" does not exist'
        client.send(describe("S", "nope") + rc.sync())
        got = client.read_until_ready()
        assert got[0].fields["M"] == 'prepared statement "nope" does not exist'
        assert rc.data_rows(client.simple_query("SELECT 7")) == [["7"]]


def test_the_unnamed_statement_of_another_transaction_is_never_run(hal: Running) -> None:
    # One server (database "one"): the unnamed statement A prepared stays on it after A's transaction.
    # Neither B nor A itself may run it in a later transaction: with more servers it could be anyone's.
    with proxied(hal, "one") as a, proxied(hal, "one") as b:
        a.send(parse("SELECT 'prepared by a'") + rc.sync())
        assert [m.type for m in a.read_until_ready()] == [b"1", b"Z"]
        for client in (b, a):
            client.send(bind() + rc.execute() + rc.sync())
            got = client.read_until_ready()
            assert [m.type for m in got] == [b"E", b"Z"], got
            assert (got[0].fields["C"], got[0].fields["M"]) == (
                "26000",
                "unnamed prepared statement does not exist",
            )
            client.send(describe("S") + rc.sync())
            assert rc.errors(client.read_until_ready())[0]["C"] == "26000"
        # within one transaction it is the client's own: Parse, then Bind after a Flush, as asyncpg does
        a.send(parse("SELECT 'mine'") + describe("S") + rc.msg(b"H"))
        assert [a.read(timeout=5).type for _ in range(3)] == [b"1", b"t", b"T"]
        a.send(bind() + rc.execute() + rc.sync())
        assert rc.data_rows(a.read_until_ready()) == [["mine"]]
        assert rc.data_rows(b.simple_query("SELECT 7")) == [["7"]]


def test_errors_name_the_client_statement_not_the_server_one(hal: Running) -> None:
    with proxied(hal) as client:
        client.send(parse("SELECT $1::int + $2::int", "sum") + bind("sum", params=("1",)) + rc.sync())
        got = client.read_until_ready()
        assert [m.type for m in got] == [b"1", b"E", b"Z"]
        assert got[1].fields["C"] == "08P01"
        assert got[1].fields["M"] == (
            'bind message supplies 1 parameters, but prepared statement "sum" requires 2'
        )
        client.send(bind("sum", params=("1", "2")) + rc.execute() + rc.sync())
        assert rc.data_rows(client.read_until_ready()) == [["3"]]


def test_sql_execute_runs_a_protocol_level_statement_as_direct(pg: Cluster, hal: Running) -> None:
    with proxied(hal) as client:
        client.send(parse("SELECT $1::int * 10, 'x'::text", "Tens") + rc.sync())
        client.read_until_ready()
        # on other servers too, where halephant prepares it first
        for _ in range(3):
            with proxied(hal) as other:  # holds another server, so the pool hands out a new one
                other.simple_query("BEGIN")
                got = client.simple_query('EXECUTE "Tens"(4)')
                assert [m.type for m in got] == [b"T", b"D", b"C", b"Z"]
                assert rc.data_rows(got) == [["40", "x"]]
                assert got[2].payload == b"SELECT 1\0"  # the executed statement's tag, as direct
                other.simple_query("ROLLBACK")
        client.send(parse("SELECT 'low'::text", "low") + rc.sync())
        client.read_until_ready()
        assert rc.data_rows(client.simple_query("execute LOW")) == [["low"]]  # unquoted: folded
        got = client.simple_query("EXECUTE nope")
        assert got[0].fields["C"] == "26000"
        assert got[0].fields["M"] == 'prepared statement "nope" does not exist'
        # in a transaction, and after it failed: PostgreSQL's answers
        client.simple_query("BEGIN")
        assert rc.data_rows(client.simple_query('EXECUTE "Tens"(5)')) == [["50", "x"]]
        assert client.simple_query("SELECT 1/0")[0].fields["C"] == "22012"
        assert client.simple_query('EXECUTE "Tens"(6)')[0].fields["C"] == "25P02"
        client.simple_query("ROLLBACK")
        assert rc.data_rows(client.simple_query('EXECUTE "Tens"(7)')) == [["70", "x"]]


@pytest.mark.parametrize("prepare", [False, True])
def test_sql_execute_in_a_parse_runs_a_protocol_level_statement(hal: Running, prepare: bool) -> None:
    # psycopg and asyncpg send every query as Parse, Bind, Execute: EXECUTE arrives inside a Parse,
    # unnamed, or named once psycopg prepares it
    with psycopg.connect(hal.dsn(), autocommit=True) as conn:
        conn.pgconn.prepare(b"Twice", b"SELECT $1::int * 2")
        for n in range(6):
            with proxied(hal) as other:  # holds a server now and then: the next one may lack both
                if n % 2:
                    other.simple_query("BEGIN")
                got = conn.execute(f'EXECUTE "Twice"({n})', prepare=prepare).fetchall()
                assert got == [(2 * n,)]
                other.simple_query("ROLLBACK")
    # the client's name stayed its own: no server knows a statement by it
    with proxied(hal) as a, proxied(hal) as b:
        a.simple_query("BEGIN")
        for client in (a, b):
            assert client.simple_query('EXECUTE "Twice"(1)')[0].fields["C"] == "26000"
        a.simple_query("ROLLBACK")


def test_duplicate_name_is_42P05_and_close_frees_it(hal: Running) -> None:
    with proxied(hal) as client:
        client.send(parse("SELECT 1", "dup") + rc.sync())
        assert [m.type for m in client.read_until_ready()] == [b"1", b"Z"]
        client.send(parse("SELECT 2", "dup") + bind("dup") + rc.execute() + rc.sync())
        got = client.read_until_ready()
        assert [m.type for m in got] == [b"E", b"Z"]
        assert got[0].fields["C"] == "42P05"
        assert got[0].fields["M"] == 'prepared statement "dup" already exists'
        # as PostgreSQL does, the text is parsed and analyzed before the name is found taken
        client.send(parse("SELEC 2", "dup") + rc.sync())
        assert client.read_until_ready()[0].fields["C"] == "42601"
        client.send(parse("SELECT * FROM no_such_table", "dup") + bind("dup") + rc.sync())
        got = client.read_until_ready()
        assert [m.type for m in got] == [b"E", b"Z"] and got[0].fields["C"] == "42P01"
        client.simple_query("BEGIN")
        client.send(parse("SELECT 2", "dup") + rc.sync())
        assert client.read_until_ready()[0].fields["C"] == "42P05"
        client.send(parse("SELECT 2", "dup") + rc.sync())  # in the failed transaction
        assert client.read_until_ready()[0].fields["C"] == "25P02"
        client.send(parse("ROLLBACK", "dup") + rc.sync())  # still parsed there: its name is taken
        assert client.read_until_ready()[0].fields["C"] == "42P05"
        client.simple_query("ROLLBACK")
        got = client.simple_query(
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'halephant_probe'"
        )
        assert rc.data_rows(got) == [["0"]]  # the scratch statement does not stay
        client.send(close("S", "dup") + close("S", "never_was") + parse("SELECT 2", "dup") + rc.sync())
        assert [m.type for m in client.read_until_ready()] == [b"3", b"3", b"1", b"Z"]
        client.send(bind("dup") + rc.execute() + rc.sync())
        assert rc.data_rows(client.read_until_ready()) == [["2"]]


def test_synthetic_replies_come_in_order_under_pipelining(hal: Running) -> None:
    pins = hal.log_text().count("pinned to server")
    with proxied(hal) as warm:
        warm.send(parse("SELECT 'warm'::text", "w") + rc.sync())
        warm.read_until_ready()
    with proxied(hal, "one") as a:
        a.send(parse("SELECT 'warm'::text", "w") + rc.sync())  # prepares it on the only server
        a.read_until_ready()
    with proxied(hal, "one") as client:
        client.send(parse("SELECT 'other'::text", "o") + rc.sync())
        assert [m.type for m in client.read_until_ready()] == [b"1", b"Z"]
        # 'w' is already on the server: its ParseComplete is halephant's, between the server's replies
        client.send(
            parse("SELECT pg_sleep(0.2)") + bind() + rc.execute()
            + parse("SELECT 'warm'::text", "w") + bind("w") + rc.execute()
            + close("S", "w") + flush()
        )  # fmt: skip
        got = [client.read(timeout=5) for _ in range(8)]
        assert [m.type for m in got] == [b"1", b"2", b"D", b"C", b"1", b"2", b"D", b"C"], got
        assert client.read(timeout=5).type == b"3"
        client.send(rc.sync())
        assert [m.type for m in client.read_until_ready()] == [b"Z"]
    assert hal.log_text().count("pinned to server") == pins


def test_first_named_statement_mid_batch_is_shared_too(hal: Running) -> None:
    before = pins(hal)
    with proxied(hal) as client:
        client.send(
            parse("SELECT 1") + bind() + rc.execute() + parse("SELECT 2", "two") + bind("two") + rc.execute()
            + rc.sync()
        )  # fmt: skip
        got = client.read_until_ready()
        assert [m.type for m in got] == [b"1", b"2", b"D", b"C", b"1", b"2", b"D", b"C", b"Z"]
        client.send(bind("two") + rc.execute() + rc.sync())
        assert rc.data_rows(client.read_until_ready()) == [["2"]]
        # the same text again, mid-batch in a new client, while the server already has it
        with proxied(hal) as other:
            other.send(
                parse("SELECT 1") + bind() + rc.execute() + parse("SELECT 2", "mine") + bind("mine")
                + rc.execute() + close("S", "mine") + rc.sync() + parse("SELECT 2", "mine") + rc.sync()
            )  # fmt: skip
            got = other.read_until_ready() + other.read_until_ready()
            assert b"".join(m.type for m in got) == b"12DC12DC3Z1Z"
    assert pins(hal) == before


def test_first_named_statement_mid_batch_is_followed_from_the_batch_start(hal: Running) -> None:
    # the batch's earlier (unnamed) requests came in the same write: the books follow all of it, so the
    # error names the client's statement and a failed Parse leaves nothing behind on the server
    unnamed = parse("SELECT 1") + bind() + rc.execute()
    with proxied(hal, "one") as client:
        client.send(
            unnamed + parse("SELECT $1::int + $2::int", "sum") + bind("sum", params=("1",)) + rc.sync()
        )
        got = client.read_until_ready()
        assert [m.type for m in got] == [b"1", b"2", b"D", b"C", b"1", b"E", b"Z"], got
        assert (
            got[5].fields["M"]
            == 'bind message supplies 1 parameters, but prepared statement "sum" requires 2'
        )
    with proxied(hal, "one") as client:
        client.send(unnamed + parse("SELEC 2", "bad") + rc.sync())
        assert rc.errors(client.read_until_ready())[0]["C"] == "42601"
    with proxied(hal, "one") as other:  # the same server (pool_size 1): it has no statement of that text
        other.send(parse("SELEC 2", "mine") + bind("mine") + rc.execute() + rc.sync())
        got = other.read_until_ready()
        assert [m.type for m in got] == [b"E", b"Z"], got
        assert got[0].fields["C"] == "42601"


def test_large_result_ahead_of_a_synthetic_reply_streams_through(hal: Running) -> None:
    # the replies are relayed message by message while CloseComplete waits behind 1 MB of rows that
    # arrive in many pieces, messages cut anywhere
    with proxied(hal) as client:
        client.send(parse("SELECT 1", "x") + rc.sync())
        client.read_until_ready()
        big = "SELECT repeat(md5(i::text), 600) FROM generate_series(1, 50) i"
        for _ in range(2):
            client.send(
                parse(big) + bind() + rc.execute() + close("S", "x") + parse("SELECT 1", "x")
                + bind("x") + rc.execute() + rc.sync()
            )  # fmt: skip
            got = client.read_until_ready(timeout=20)
            kinds = b"".join(m.type for m in got)
            assert kinds == b"12" + b"D" * 50 + b"C312DCZ", kinds[-12:]
            assert [len(m.payload) for m in got if m.type == b"D"][:50] == [19_206] * 50


def test_error_in_batch_skips_synthetic_replies_and_undoes_parse(hal: Running) -> None:
    with proxied(hal, "one") as client:
        client.send(parse("SELECT 1", "known") + rc.sync())
        client.read_until_ready()
        # after the error PostgreSQL ignores everything up to Sync: no ParseComplete, no CloseComplete
        client.send(
            parse("SELECT 1/(random() * 0)::int") + bind() + rc.execute()
            + parse("SELECT 1", "again") + close("S", "known") + parse("SELECT 3", "new") + rc.sync()
        )  # fmt: skip
        got = client.read_until_ready()
        assert [m.type for m in got] == [b"1", b"2", b"E", b"Z"], got
        # so 'known' is still there, 'again' and 'new' never were
        client.send(bind("known") + rc.execute() + bind("again") + rc.sync())
        got = client.read_until_ready()
        assert [m.type for m in got] == [b"2", b"D", b"C", b"E", b"Z"], got
        assert got[3].fields["M"] == 'prepared statement "again" does not exist'
        client.send(parse("SELECT 3", "new") + rc.sync())
        assert [m.type for m in client.read_until_ready()] == [b"1", b"Z"]


def test_deallocate_and_discard_all_forget_only_the_clients_names(hal: Running) -> None:
    with proxied(hal, "one") as a, proxied(hal, "one") as b:
        for client in (a, b):
            client.send(parse("SELECT 'x'::text", "x") + parse("SELECT 'y'::text", "y") + rc.sync())
            assert [m.type for m in client.read_until_ready()] == [b"1", b"1", b"Z"]
        got = a.simple_query("DEALLOCATE x")
        assert [(m.type, m.payload) for m in got] == [(b"C", b"DEALLOCATE\0"), (b"Z", b"I")]
        a.send(bind("x") + rc.sync())
        assert a.read_until_ready()[0].fields["C"] == "26000"
        got = a.simple_query("deallocate all")
        assert [(m.type, m.payload) for m in got] == [(b"C", b"DEALLOCATE ALL\0"), (b"Z", b"I")]
        a.send(parse("SELECT 'y'::text", "y") + rc.sync())
        assert [m.type for m in a.read_until_ready()] == [b"1", b"Z"]
        got = a.simple_query("DISCARD ALL")
        assert [(m.type, m.payload) for m in got] == [(b"C", b"DISCARD ALL\0"), (b"Z", b"I")]
        a.send(bind("y") + rc.sync())
        assert a.read_until_ready()[0].fields["C"] == "26000"
        # b's statements, on the same server, were never touched
        b.send(bind("x") + rc.execute() + bind("y") + rc.execute() + rc.sync())
        assert rc.data_rows(b.read_until_ready()) == [["x"], ["y"]]
        # inside a transaction DISCARD ALL is PostgreSQL's to refuse
        b.close()
        a.simple_query("BEGIN")
        got = a.simple_query("DISCARD ALL")
        assert got[0].fields["C"] == "25001"
        a.simple_query("ROLLBACK")


def test_discard_all_and_deallocate_all_reach_the_server_and_others_prepare_again(hal: Running) -> None:
    with proxied(hal, "one") as a, proxied(hal, "one") as b:
        b.send(parse("SELECT 'b'::text", "bs") + rc.sync())
        b.read_until_ready()
        a.send(parse("SELECT 'a'::text", "as") + rc.sync())
        a.read_until_ready()
        a.simple_query("SET application_name = 'changed'")
        got = a.simple_query("DISCARD ALL")
        assert [(m.type, m.payload) for m in got if m.type != b"S"] == [
            (b"C", b"DISCARD ALL\0"),
            (b"Z", b"I"),
        ]
        assert rc.data_rows(a.simple_query("SHOW application_name")) != [["changed"]]
        a.send(bind("as") + rc.sync())
        assert a.read_until_ready()[0].fields["C"] == "26000"
        # the server dropped b's statement too: it is prepared again, unseen
        b.send(bind("bs") + rc.execute() + rc.sync())
        assert rc.data_rows(b.read_until_ready()) == [["b"]]
        a.simple_query("PREPARE sql_level AS SELECT 1")
        a.send(parse("SELECT 2", "p2") + rc.sync())
        a.read_until_ready()
        got = a.simple_query("DEALLOCATE ALL")
        assert [(m.type, m.payload) for m in got] == [(b"C", b"DEALLOCATE ALL\0"), (b"Z", b"I")]
        assert a.simple_query("EXECUTE sql_level")[0].fields["C"] == "26000"
        a.send(bind("p2") + rc.sync())
        assert a.read_until_ready()[0].fields["C"] == "26000"
        b.send(bind("bs") + rc.execute() + rc.sync())
        assert rc.data_rows(b.read_until_ready()) == [["b"]]


@pytest.mark.parametrize(
    "steps",
    [
        ["BEGIN", "DISCARD ALL", "ROLLBACK"],
        ["BEGIN", "SELECT 1/0", "DEALLOCATE ALL", "ROLLBACK"],
        ["BEGIN", "SELECT 1/0", "DISCARD ALL", "ROLLBACK"],
        ["BEGIN", "SELECT 1/0", "DEALLOCATE a", "ROLLBACK"],
    ],
)
def test_deallocate_refused_by_postgresql_leaves_every_statement(
    pg: Cluster, hal: Running, steps: list[str]
) -> None:
    # PostgreSQL refuses DISCARD ALL in a transaction block and both in a failed transaction: the
    # client's statements stay, and so do the server's, which another client's Parse then finds there
    with direct(pg) as d, proxied(hal, "one") as a, proxied(hal, "one") as b:
        for client in (d, a):
            client.send(parse("SELECT 'a'::text", "a") + rc.sync())
            client.read_until_ready()
        for sql in steps:
            assert shape(a.simple_query(sql)) == shape(d.simple_query(sql)), sql
        for client in (d, a):
            client.send(bind("a") + rc.execute() + rc.sync())
            assert rc.data_rows(client.read_until_ready()) == [["a"]]
        b.send(parse("SELECT 'a'::text", "b") + bind("b") + rc.execute() + rc.sync())
        assert [m.type for m in b.read_until_ready()] == [b"1", b"2", b"D", b"C", b"Z"]


def test_discard_all_of_a_client_without_statements_keeps_the_books_of_others(hal: Running) -> None:
    with proxied(hal, "one") as a, proxied(hal, "one") as plain:
        a.send(parse("SELECT 'a'::text", "a") + rc.sync())
        a.read_until_ready()
        plain.simple_query("BEGIN")
        assert plain.simple_query("DISCARD ALL")[0].fields["C"] == "25001"
        plain.simple_query("ROLLBACK")
        a.send(parse("SELECT 'a'::text", "a2") + bind("a2") + rc.execute() + rc.sync())
        assert [m.type for m in a.read_until_ready()] == [b"1", b"2", b"D", b"C", b"Z"]
        assert [m.type for m in plain.simple_query("DISCARD ALL")] == [b"C", b"Z"]
        a.send(bind("a") + rc.execute() + rc.sync())
        assert rc.data_rows(a.read_until_ready()) == [["a"]]


@pytest.mark.parametrize("sql", ["DISCARD ALL", "DEALLOCATE ALL"])
@pytest.mark.parametrize("in_block", [True, False])
def test_discard_all_by_extended_protocol_leaves_no_server_with_wrong_books(
    hal: Running, sql: str, in_block: bool
) -> None:
    # run by an Execute, whether it drops the server's statements is not followed: the server is closed
    # at the end of the transaction rather than handed to a client halephant would then answer wrongly
    with proxied(hal, "one") as a, proxied(hal, "one") as b:
        for client in (a, b):
            client.send(parse("SELECT 'a'::text", "a") + rc.sync())
            client.read_until_ready()
        if in_block:
            a.simple_query("BEGIN")
        a.send(parse(sql) + bind() + rc.execute() + rc.sync())
        a.read_until_ready()
        if in_block:
            a.simple_query("ROLLBACK")
        for client in (b, a):
            client.send(parse("SELECT 'a'::text", "c") + bind("c") + rc.execute() + rc.sync())
            assert [m.type for m in client.read_until_ready()] == [b"1", b"2", b"D", b"C", b"Z"]
        # refused in a transaction block (DISCARD ALL), the client's statements stay, as do b's anyway
        for client in (b, a) if in_block and sql == "DISCARD ALL" else (b,):
            client.send(bind("a") + rc.execute() + rc.sync())
            assert rc.data_rows(client.read_until_ready()) == [["a"]]


def test_copy_from_stdin_by_execute_keeps_the_books_straight(pg: Cluster, hal: Running) -> None:
    # PostgreSQL ignores the Sync that reaches it in copy-in mode: its ReadyForQuery never comes
    table = new_table(pg)
    with proxied(hal, "one") as client, proxied(hal, "one") as other:
        other.send(parse("SELECT 'o'::text", "o") + rc.sync())
        other.read_until_ready()
        client.send(parse("SELECT 1", "warm") + rc.sync())
        client.read_until_ready()
        for n in range(2):
            client.send(parse(f"COPY {table} FROM STDIN") + bind() + rc.execute() + rc.sync())
            assert [m.type for m in client.read_until(b"G")] == [b"1", b"2", b"G"]
            rows = f"{2 * n}\tx\n{2 * n + 1}\ty\n".encode()
            client.send(rc.msg(b"d", rows) + rc.msg(b"c") + rc.sync())
            assert [m.type for m in client.read_until_ready()] == [b"C", b"Z"]
            # a statement the server has: its ParseComplete is halephant's, in its place
            client.send(parse("SELECT 'o'::text", f"mine{n}") + bind(f"mine{n}") + rc.execute() + rc.sync())
            got = client.read_until_ready()
            assert b"".join(m.type for m in got) == b"12DCZ"
    assert int(pg.primary.sql(f"SELECT count(*) FROM {table}", dbname="myapp")) == 4


def test_rejection_inside_a_transaction_keeps_its_place_among_mapped_statements(hal: Running) -> None:
    with proxied(hal) as client:
        client.send(parse("SELECT 'kept'::text", "k") + rc.sync())
        client.read_until_ready()
        client.simple_query("BEGIN")
        # cursor_guard refuses a holdable cursor in transaction pooling: the server fails at that point
        client.send(
            bind("k") + rc.execute() + parse("DECLARE c CURSOR WITH HOLD FOR SELECT 1") + bind()
            + rc.execute() + rc.sync()
        )  # fmt: skip
        got = client.read_until_ready()
        assert [m.type for m in got] == [b"2", b"D", b"C", b"E", b"Z"]
        assert got[3].fields["C"] == "0A000" and got[-1].payload == b"E"
        client.simple_query("ROLLBACK")
        client.send(bind("k") + rc.execute() + rc.sync())
        assert rc.data_rows(client.read_until_ready()) == [["kept"]]


def test_lru_closes_least_recently_used_statements(pg: Cluster, hal: Running) -> None:
    with proxied(hal, "tiny_cache") as client:
        for i in range(5):
            client.send(parse(f"SELECT {i}", f"s{i}") + rc.sync())
            assert [m.type for m in client.read_until_ready()] == [b"1", b"Z"]
        for _ in range(2):
            for i in range(5):
                client.send(bind(f"s{i}") + rc.execute() + rc.sync())
                assert rc.data_rows(client.read_until_ready()) == [[str(i)]]
        got = client.simple_query("SELECT count(*) FROM pg_prepared_statements")
        assert rc.data_rows(got) == [["2"]]


def test_max_prepared_statements_0_pins_as_before(hal: Running) -> None:
    with proxied(hal, "pinning") as client:
        client.send(parse("SELECT pg_backend_pid()", "pid") + bind("pid") + rc.execute() + rc.sync())
        first = rc.data_rows(client.read_until_ready())
        with proxied(hal, "pinning") as other:
            other.send(parse("SELECT pg_backend_pid()", "pid") + bind("pid") + rc.execute() + rc.sync())
            assert rc.data_rows(other.read_until_ready()) != first
        client.send(bind("pid") + rc.execute() + rc.sync())
        assert rc.data_rows(client.read_until_ready()) == first


def test_schema_change_retires_the_statement_everywhere(pg: Cluster, hal: Running) -> None:
    table = new_table(pg)
    pg.primary.sql(f"INSERT INTO {table} VALUES (1, 'one')", dbname="myapp")
    query = f"SELECT * FROM {table}"
    with proxied(hal, "one") as a:
        a.send(parse(query, "q") + bind("q") + rc.execute() + rc.sync())
        assert rc.data_rows(a.read_until_ready()) == [["1", "one"]]
        pg.primary.sql(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 5", dbname="myapp")
        a.send(bind("q") + rc.execute() + rc.sync())
        got = a.read_until_ready()
        # what PostgreSQL says directly, too
        assert got[0].fields["C"] == "0A000"
        assert got[0].fields["M"] == "cached plan must not change result type"
        with proxied(hal, "one") as b:
            # the same text from another client on the same server prepares afresh
            b.send(parse(query, "mine") + bind("mine") + rc.execute() + rc.sync())
            assert rc.data_rows(b.read_until_ready()) == [["1", "one", "5"]]
        a.send(close("S", "q") + parse(query, "q") + bind("q") + rc.execute() + rc.sync())
        assert rc.data_rows(a.read_until_ready()) == [["1", "one", "5"]]


def test_stale_plan_is_retried_when_the_client_asked_for_the_row_description(
    pg: Cluster, hal: Running
) -> None:
    table = new_table(pg)
    pg.primary.sql(f"INSERT INTO {table} VALUES (1, 'one')", dbname="myapp")
    query = f"SELECT * FROM {table}"
    with proxied(hal, "one") as client:
        client.send(parse(query, "q") + bind("q") + describe("P") + rc.execute() + rc.sync())
        assert rc.data_rows(client.read_until_ready()) == [["1", "one"]]
        pg.primary.sql(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 5", dbname="myapp")
        # alone, outside a transaction, with Describe before Execute: run again on a fresh statement,
        # and the new row description tells the client the new shape
        client.send(bind("q") + describe("P") + rc.execute() + rc.sync())
        got = client.read_until_ready()
        assert b"".join(m.type for m in got) == b"2TDCZ", got
        assert rc.data_rows(got) == [["1", "one", "5"]]
        assert b"extra" in got[1].payload
        # without the Describe the client relies on a row description it has: PostgreSQL's error
        pg.primary.sql(f"ALTER TABLE {table} DROP COLUMN extra", dbname="myapp")
        client.send(bind("q") + rc.execute() + rc.sync())
        got = client.read_until_ready()
        assert got[0].fields["C"] == "0A000"
        client.send(bind("q") + describe("P") + rc.execute() + rc.sync())
        assert rc.data_rows(client.read_until_ready()) == [["1", "one"]]
        # first in a transaction: rolled back, begun again as the client began it, and run again
        pg.primary.sql(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 6", dbname="myapp")
        client.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        client.send(bind("q") + describe("P") + rc.execute() + rc.sync())
        got = client.read_until_ready()
        assert b"".join(m.type for m in got) == b"2TDCZ", got
        assert rc.data_rows(got) == [["1", "one", "6"]] and got[-1].payload == b"T"
        got = client.simple_query("SELECT current_setting('transaction_isolation')")
        assert rc.data_rows(got) == [["repeatable read"]]
        client.simple_query("COMMIT")

        def not_retried_after(change: str, *first: str, columns: list[str]) -> None:
            client.send(bind("q") + describe("P") + rc.execute() + rc.sync())  # the plan as it is now
            assert rc.data_rows(client.read_until_ready()) == [columns]
            pg.primary.sql(f"ALTER TABLE {table} {change}", dbname="myapp")
            for query in first:
                client.simple_query(query)
            client.send(bind("q") + describe("P") + rc.execute() + rc.sync())
            got = client.read_until_ready()
            assert got[0].fields["C"] == "0A000" and got[-1].payload == b"E"
            client.simple_query("ROLLBACK")

        # after anything else in the transaction never: PostgreSQL's error
        not_retried_after("DROP COLUMN extra", "BEGIN", "SELECT 1", columns=["1", "one", "6"])
        # nor when the transaction was already open when the BEGIN came (a warning, not a new one)
        not_retried_after("ADD COLUMN extra int DEFAULT 7", "BEGIN", "BEGIN", columns=["1", "one"])


def test_psycopg_transaction_survives_a_schema_change_under_its_prepared_statement(
    pg: Cluster, hal: Running
) -> None:
    # psycopg begins each transaction with a simple-protocol BEGIN, then runs a prepared statement as
    # Bind, Describe (portal), Execute, Sync: first in its transaction, so run again after a stale plan
    table = new_table(pg)
    pg.primary.sql(f"INSERT INTO {table} VALUES (1, 'one')", dbname="myapp")
    with psycopg.connect(hal.dsn(), prepare_threshold=0) as conn:
        assert conn.execute(f"SELECT * FROM {table}").fetchall() == [(1, "one")]
        conn.commit()
        pg.primary.sql(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 5", dbname="myapp")
        cur = conn.execute(f"SELECT * FROM {table}")
        assert [c.name for c in cur.description or ()] == ["id", "v", "extra"]
        assert cur.fetchall() == [(1, "one", 5)]
        conn.commit()


def test_client_gone_mid_pipeline_leaves_no_dirty_server(pg: Cluster, hal: Running) -> None:
    for _ in range(3):
        client = proxied(hal, "one")
        client.send(parse("SELECT 1", "a") + rc.sync())
        client.read_until_ready()
        client.send(
            rc.query("BEGIN") + parse("SELECT pg_sleep(0.1)", "b") + bind("b") + rc.execute() + flush()
        )
        client.read_until_ready()
        client.close()
    assert_clean_servers(pg.primary)
    with proxied(hal, "one") as client:
        client.send(parse("SELECT 1", "a") + bind("a") + rc.execute() + rc.sync())
        assert rc.data_rows(client.read_until_ready()) == [["1"]]


# --- drivers ---------------------------------------------------------------------------------------------


def pins(hal: Running) -> int:
    return hal.log_text().count("pinned to server")


def run_threads(n: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]


def test_psycopg_prepared_statements_move_between_servers(pg: Cluster, hal: Running) -> None:
    table = new_table(pg)
    before = pins(hal)
    seen_pids: set[int] = set()

    def work(i: int) -> None:
        with psycopg.connect(hal.dsn(), autocommit=True, prepare_threshold=0) as conn:
            for n in range(40):
                row = conn.execute("SELECT %s::int * 2, pg_backend_pid()", (n,)).fetchone()
                assert row is not None and row[0] == 2 * n
                seen_pids.add(row[1])
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i * 1000 + n, f"c{i}"))
                with conn.transaction():
                    got = conn.execute(f"SELECT count(*) FROM {table} WHERE v = %s", (f"c{i}",)).fetchone()
                    assert got == (n + 1,)

    run_threads(2 * POOL_SIZE + 2, work)
    assert len(seen_pids) == POOL_SIZE  # every client used every server, nobody was pinned
    assert pins(hal) == before
    assert int(pg.primary.sql(f"SELECT count(*) FROM {table}", dbname="myapp")) == 40 * (2 * POOL_SIZE + 2)


# PostgreSQL reads a statement's constants when it prepares it, with the settings of that moment, and keeps
# them: clients whose DateStyle, TimeZone or client_encoding differ must never run each other's statement.
_CONSTANTS = "SELECT '01/02/2003'::date::text, '2024-01-01 12:00'::timestamptz::text, 'é'::text"


def test_prepared_statements_are_not_shared_by_clients_whose_settings_parse_them_differently(
    hal: Running,
) -> None:
    def connect(options: str, **params: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(
            hal.dsn(dbname="one", options=options, **params), autocommit=True, prepare_threshold=0
        )

    us = "-c DateStyle=ISO,MDY -c TimeZone=UTC"
    eu = "-c DateStyle=ISO,DMY -c TimeZone=Asia/Tokyo"
    with (
        connect(us) as mdy,
        connect(eu) as dmy,
        connect(us, client_encoding="LATIN1") as latin1,
        connect("") as later,
    ):
        for _ in range(2):  # all take turns on the pool's single server
            assert mdy.execute(_CONSTANTS).fetchone() == ("2003-01-02", "2024-01-01 12:00:00+00", "é")
            assert dmy.execute(_CONSTANTS).fetchone() == ("2003-02-01", "2024-01-01 12:00:00+09", "é")
            assert latin1.execute(_CONSTANTS).fetchone() == ("2003-01-02", "2024-01-01 12:00:00+00", "é")
        # a client that changes those settings after preparing: its statement is parsed again under them
        # (connected directly it would keep the first parse), never under the other clients' name
        later.execute(_CONSTANTS).fetchone()
        later.execute("SET DateStyle = 'ISO, DMY'")
        later.execute("SET TimeZone = 'Asia/Tokyo'")
        assert later.execute(_CONSTANTS).fetchone() == ("2003-02-01", "2024-01-01 12:00:00+09", "é")
        assert mdy.execute(_CONSTANTS).fetchone() == ("2003-01-02", "2024-01-01 12:00:00+00", "é")
        later.execute("SET DateStyle = 'ISO, MDY'")
        later.execute("SET TimeZone = 'UTC'")
        assert later.execute(_CONSTANTS).fetchone() == ("2003-01-02", "2024-01-01 12:00:00+00", "é")
        assert dmy.execute(_CONSTANTS).fetchone() == ("2003-02-01", "2024-01-01 12:00:00+09", "é")


def two_tenant_schemas(pg: Cluster) -> tuple[str, str]:
    """Two new schemas, each with a table `items` of another shape (one row each): a schema per tenant."""
    table = new_table(pg)
    a, b = f"{table}_a", f"{table}_b"
    pg.primary.sql(
        f"CREATE SCHEMA {a}; CREATE TABLE {a}.items (id int, name text);"
        f"INSERT INTO {a}.items VALUES (1, 'a');"
        f"CREATE SCHEMA {b}; CREATE TABLE {b}.items (id int, name text, extra int);"
        f"INSERT INTO {b}.items VALUES (2, 'b', 3)",
        dbname="myapp", user="myapp",
    )  # fmt: skip
    return a, b


def test_clients_of_schemas_whose_tables_differ_each_run_their_own_statement(
    pg: Cluster, hal: Running
) -> None:
    # A schema per tenant, chosen by search_path: the same text names tables of different shapes. A
    # shared statement would be parsed again for each tenant in turn, and PostgreSQL refuses a named
    # statement a new result type (0A000), which asyncpg reports while preparing, without retrying.
    a, b = two_tenant_schemas(pg)

    async def outcome(port: int, dbname: str) -> list[Any]:
        async def connect(**kwargs: Any) -> asyncpg.Connection:
            return await asyncpg.connect(
                host=hal.host, port=port, user="myapp", password="myapp", database=dbname, ssl=False, **kwargs
            )

        tenants = [await connect(server_settings={"search_path": schema}) for schema in (a, b)]
        switching = await connect()
        out: list[Any] = []
        try:
            for _ in range(2):  # on a pool of one server: every statement runs on the same server
                for conn in tenants:
                    out.append([tuple(r) for r in await conn.fetch("SELECT * FROM items")])
                # a client that changes search_path under its cached statement: PostgreSQL's 0A000,
                # which asyncpg answers by preparing it again, as connected directly
                for schema in (a, b):
                    await switching.execute(f"SET search_path = {schema}")
                    out.append([tuple(r) for r in await switching.fetch("SELECT * FROM items")])
        finally:
            for conn in (*tenants, switching):
                await conn.close()
        return out

    direct = asyncio.run(outcome(pg.primary.port, "myapp"))
    assert direct == [[(1, "a")], [(2, "b", 3)], [(1, "a")], [(2, "b", 3)]] * 2
    assert asyncio.run(outcome(hal.port, "one")) == direct


@pytest.mark.parametrize("how", ["asyncpg SET LOCAL", "psycopg set_config", "psycopg pipeline"])
def test_a_search_path_set_for_one_transaction_chooses_the_statements_prepared_in_it(
    pg: Cluster, hal: Running, how: str
) -> None:
    # A schema per tenant in transaction pooling: each transaction starts by choosing its tenant with
    # SET LOCAL search_path (or set_config(..., true), in a statement drivers prepare and then only Bind).
    a, b = two_tenant_schemas(pg)

    async def with_asyncpg(port: int, dbname: str) -> list[Any]:
        conns = [
            await asyncpg.connect(host=hal.host, port=port, user="myapp", password="myapp", database=dbname,
                                  ssl=False)
            for _ in range(2)
        ]  # fmt: skip
        out: list[Any] = []
        try:
            for _ in range(3):
                for conn, schema in zip(conns, (a, b), strict=True):
                    async with conn.transaction():
                        await conn.execute(f"SET LOCAL search_path = {schema}")
                        out.append([tuple(r) for r in await conn.fetch("SELECT * FROM items")])
        finally:
            for conn in conns:
                await conn.close()
        return out

    def with_psycopg(dsn: str) -> list[Any]:
        out: list[Any] = []
        with psycopg.connect(dsn, prepare_threshold=0) as ca, psycopg.connect(dsn, prepare_threshold=0) as cb:
            for _ in range(3):
                for conn, schema in ((ca, a), (cb, b)):
                    if how == "psycopg set_config":
                        conn.execute("SELECT set_config('search_path', %s, true)", (schema,))
                        out.append(conn.execute("SELECT * FROM items WHERE id > %s", (0,)).fetchall())
                    else:
                        with conn.pipeline():
                            conn.execute(f"SET LOCAL search_path = {schema}")
                            cur = conn.execute("SELECT * FROM items WHERE id > %s", (0,))
                        out.append(cur.fetchall())
                    conn.commit()
        return out

    if how.startswith("asyncpg"):
        direct = asyncio.run(with_asyncpg(pg.primary.port, "myapp"))
        through = asyncio.run(with_asyncpg(hal.port, "one"))
    else:
        direct = with_psycopg(pg.primary.dsn("myapp", "myapp", "myapp"))
        through = with_psycopg(hal.dsn(dbname="one"))
    assert direct == [[(1, "a")], [(2, "b", 3)]] * 3
    assert through == direct


@pytest.mark.parametrize("autocommit", [True, False])
def test_psycopg_pipeline_mode_with_prepared_statements(pg: Cluster, hal: Running, autocommit: bool) -> None:
    # without autocommit psycopg sends BEGIN (unnamed) ahead of the first named statement in the batch
    before = pins(hal)

    def outcome(dsn: str) -> list[Any]:
        table = new_table(pg)
        results: list[Any] = []
        with psycopg.connect(dsn, autocommit=autocommit, prepare_threshold=0) as conn:
            for round_ in range(3):
                cursors: list[Any] = []
                try:
                    with conn.pipeline() as p:
                        cursors += [
                            conn.execute("SELECT %s::int + %s::int", (round_, k), prepare=True)
                            for k in range(5)
                        ]
                        insert = f"INSERT INTO {table} VALUES (%s, 'p') RETURNING id"
                        cursors.append(conn.execute(insert, (round_,), prepare=True))
                        p.sync()
                        # psycopg raises the error of a pipeline wherever it reads it: sync or exit
                        conn.execute("SELECT 1 / %s::int", (round_,), prepare=True)
                        p.sync()
                except psycopg.errors.DivisionByZero:
                    results.append("22012")
                results.append([c.fetchall() for c in cursors])
                if not autocommit:
                    conn.rollback()
            # outside a pipeline afterwards, on a fresh batch
            results.append(conn.execute("SELECT %s::text", ("after",), prepare=True).fetchall())
        return results

    proxied_result = outcome(hal.dsn())
    direct_result = outcome(pg.primary.dsn("myapp", "myapp", "myapp"))
    assert proxied_result == direct_result
    assert proxied_result[0] == "22012"
    assert proxied_result[1][:5] == [[(k,)] for k in range(5)]
    assert proxied_result[-1] == [("after",)]
    assert pins(hal) == before


def test_asyncpg_statement_cache_executemany_in_transaction_mode(pg: Cluster, hal: Running) -> None:
    table = new_table(pg)
    before = pins(hal)

    async def client(i: int) -> set[int]:
        conn = await asyncpg.connect(
            host=hal.host, port=hal.port, user="myapp", password="myapp", database="myapp", ssl=False
        )
        pids: set[int] = set()
        try:
            for n in range(20):
                assert await conn.fetchval("SELECT $1::int + $2::int", n, i) == n + i
                pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
            await conn.executemany(
                f"INSERT INTO {table} VALUES ($1, $2)", [(i * 1000 + k, f"a{i}") for k in range(200)]
            )
            stmt = await conn.prepare(f"SELECT count(*) FROM {table} WHERE v = $1")
            assert await stmt.fetchval(f"a{i}") == 200
            async with conn.transaction():
                await conn.execute(f"UPDATE {table} SET v = $1 WHERE id = $2", f"b{i}", i * 1000)
                rows = [r["id"] async for r in conn.cursor(f"SELECT id FROM {table} WHERE v = $1", f"a{i}")]
                assert len(rows) == 199
            with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
                await conn.fetchval("SELECT 1 / $1::int", 0)
            assert await stmt.fetchval(f"b{i}") == 1
        finally:
            await conn.close()
        return pids

    async def main() -> set[int]:
        results = await asyncio.gather(*(client(i) for i in range(3 * POOL_SIZE)))
        return set().union(*results)

    assert len(asyncio.run(main())) == POOL_SIZE
    assert pins(hal) == before


def test_asyncpg_reprepares_after_schema_change_as_direct(pg: Cluster, hal: Running) -> None:
    table = new_table(pg)
    pg.primary.sql(f"INSERT INTO {table} VALUES (1, 'one')", dbname="myapp")

    async def main(port: int, database: str) -> list[Any]:
        conns = [
            await asyncpg.connect(host=hal.host, port=port, user="myapp", password="myapp", database=database,
                                  ssl=False)
            for _ in range(2)
        ]  # fmt: skip
        try:
            out = [tuple(await c.fetchrow(f"SELECT * FROM {table}")) for c in conns]
            await conns[0].execute(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 7")
            # asyncpg sees 0A000, drops its cached statement and prepares again: the server must let it
            for c in conns:
                out.append(tuple(await c.fetchrow(f"SELECT * FROM {table}")))
            await conns[0].execute(f"ALTER TABLE {table} DROP COLUMN extra")
            return out
        finally:
            for c in conns:
                await c.close()

    through = asyncio.run(main(hal.port, "one"))
    assert through == [(1, "one"), (1, "one"), (1, "one", 7), (1, "one", 7)]


def test_pgbench_prepared(hal: Running, run_client: Any) -> None:
    # a thread per client: pgbench prepares with a blocking PQprepare, so a client waiting for a server
    # would stall the other clients of its thread, one of which holds that server in its transaction
    out = run_client(
        "pgbench", hal, ["-n", "-M", "prepared", "-c", "8", "-j", "8", "-T", "2"], dbname="bench", timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert processed is not None and int(processed.group(1)) > 100, out.stdout
    assert failed is not None and int(failed.group(1)) == 0, out.stdout


# --- hypothesis: raw pipelines, direct and through halephant ----------------------------------------------

VALID = ["SELECT 1", "SELECT 'two'::text AS t", "SELECT 1/(random() * 0)::int", "BEGIN", "COMMIT"]

raw_op = st.one_of(
    st.tuples(st.just("parse"), st.sampled_from(["a", "b"]), st.sampled_from(VALID)),
    st.tuples(st.just("unnamed"), st.sampled_from([*VALID, "SELEC 1"])),
    st.tuples(st.just("bind"), st.sampled_from(["a", "b", "zz"]), st.booleans()),
    st.tuples(st.just("describe"), st.sampled_from(["a", "b", "zz"])),
    st.tuples(st.just("close"), st.sampled_from(["a", "b", "zz"])),
    st.just(("flush",)),
    st.just(("sync",)),
)
noise_op = st.sampled_from(["none", "none", "hold", "release", "prepare"])


def raw_bytes(item: tuple[Any, ...]) -> bytes:
    kind = item[0]
    if kind == "parse":
        return parse(item[2], item[1])
    if kind == "unnamed":
        return parse(item[1]) + bind() + rc.execute()
    if kind == "bind":
        return bind(item[1]) + (describe("P") if item[2] else b"") + rc.execute()
    if kind == "describe":
        return describe("S", item[1])
    if kind == "close":
        return close("S", item[1])
    return flush() if kind == "flush" else rc.sync()


def raw_batches(ops: list[tuple[Any, ...]]) -> list[bytes]:
    out, batch = [], b""
    for item in [*ops, ("sync",)]:
        batch += raw_bytes(item)
        if item[0] == "sync":
            out.append(batch)
            batch = b""
    return out


class Noise:
    """Another client of the same pool: holds a server now and then and prepares the same texts."""

    def __init__(self, hal: Running) -> None:
        self.client = proxied(hal)
        self.holding = False
        self.n = 0

    def act(self, what: str) -> None:
        if what == "hold" and not self.holding:
            self.client.simple_query("BEGIN")
            self.client.simple_query("SELECT 1")
            self.holding = True
        elif what == "release" and self.holding:
            self.client.simple_query("COMMIT")
            self.holding = False
        elif what == "prepare":
            self.n += 1
            texts = enumerate(VALID[:3])
            self.client.send(b"".join(parse(text, f"n{self.n}_{i}") for i, text in texts) + rc.sync())
            self.client.read_until_ready()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(raw_op, max_size=10), noise_op), min_size=1, max_size=5))
def test_raw_pipelines_answer_as_direct(pg: Cluster, hal: Running, script: list[Any]) -> None:
    # The first named statement comes at a sync point: named later in a batch whose start came in an
    # earlier write, errors in that batch may name halephant's server-side statement instead of the
    # client's (the documented limit).
    ops = [("parse", "first", "SELECT 1"), ("sync",)]
    ops += [op for batch_ops, _ in script for op in [*batch_ops, ("sync",)]]
    noises = [noise for _, noise in script]
    with direct(pg) as d, proxied(hal) as p:
        noise = Noise(hal)
        try:
            for i, batch in enumerate(raw_batches(ops)):
                if 0 < i <= len(noises):
                    noise.act(noises[i - 1])
                d.send(batch)
                p.send(batch)
                want, got = shape(d.read_until_ready()), shape(p.read_until_ready())
                assert got == want, f"batch {i}: {batch!r}"
            for client in (d, p):
                client.send(close("S", "a") + close("S", "b") + close("S", "first") + rc.sync())
                client.read_until_ready()
                client.simple_query("ROLLBACK")
        finally:
            noise.act("release")
            noise.client.close()
