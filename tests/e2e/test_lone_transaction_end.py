"""End to end: a lone ROLLBACK or COMMIT from a client with no transaction open is answered by halephant
itself, as PostgreSQL answers it (WARNING 25P01 "there is no transaction in progress", then its tag), so
it needs no server: while the primary is down it is answered at once instead of after checkout_timeout.

Drivers send such a ROLLBACK after an error: psycopg's `with conn.transaction()` whose BEGIN failed used
to wait out checkout_timeout twice. A ROLLBACK inside a transaction, and what PostgreSQL answers
differently (AND CHAIN, a client that set client_min_messages), still go to the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors
import pytest
from rawclient import Message, RawClient, query
from support.cluster import start_test_cluster
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

CHECKOUT_TIMEOUT = 2.0
#: how long an answer that needs no server may take on a loaded machine (far below CHECKOUT_TIMEOUT)
AT_ONCE = 1.0

#: answered locally when no transaction is open
LONE = ["ROLLBACK", "commit;", "END WORK", "Abort Transaction ;", "COMMIT TRANSACTION", "rollback work\n"]


def _reduced(messages: list[Message]) -> list[tuple[bytes, ...]]:
    """Messages as compared with PostgreSQL's: a notice or error by its fields other than F, L and R
    (PostgreSQL's source file, line and function, which halephant's own messages do not carry)."""
    out: list[tuple[bytes, ...]] = []
    for message in messages:
        if message.type in (b"N", b"E"):
            fields = {k: v for k, v in message.fields.items() if k not in "FLR"}
            out.append((message.type, *(f"{k}={v}".encode() for k, v in sorted(fields.items()))))
        else:
            out.append((message.type, message.payload))
    return out


def _answers(host: str, port: int, statements: list[str]) -> list[list[tuple[bytes, ...]]]:
    with RawClient(host, port, timeout=10) as raw:
        raw.login("myapp", "myapp", "myapp")
        return [_reduced(raw.simple_query(sql)) for sql in statements]


def _notices(conn: psycopg.Connection[Any]) -> list[tuple[str | None, ...]]:
    seen: list[tuple[str | None, ...]] = []

    def handler(d: psycopg.errors.Diagnostic) -> None:
        seen.append(
            (
                d.severity,
                d.severity_nonlocalized,
                d.sqlstate,
                d.message_primary,
                d.message_detail,
                d.message_hint,
            )
        )

    conn.add_notice_handler(handler)
    return seen


def _wait_log(run: Running, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in run.log_text():
        assert time.monotonic() < deadline, f"no log line {text!r}:\n{run.log_text()[-3000:]}"
        time.sleep(0.05)


# --- with every node up: the same answers as PostgreSQL's -------------------------------------------------


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    return module_halephant.start(
        default_config(pg, databases={"myapp": {"cluster": "main", "pool_size": 2, "checkout_timeout": "3s"}})
    )


def test_answers_are_postgresqls(pg: Cluster, hal: Running) -> None:
    statements = [
        *LONE,
        # left to the server: an ERROR outside a transaction block
        "ROLLBACK AND CHAIN",
        "COMMIT AND CHAIN",
        # inside a transaction: the server's ROLLBACK (no notice), and the one of a failed transaction
        "BEGIN",
        "ROLLBACK",
        "BEGIN",
        "SELECT 1/0",
        "COMMIT",
        # PostgreSQL sends no WARNING to a client that asked for errors only: left to the server
        "SET client_min_messages = error",
        "ROLLBACK",
        "RESET client_min_messages",
        "ROLLBACK",
    ]
    direct = _answers(pg.primary.host, pg.primary.port, statements)
    pooled = _answers(hal.host, hal.port, statements)
    assert pooled == direct
    warning = (b"N", b"C=25P01", b"M=there is no transaction in progress", b"S=WARNING", b"V=WARNING")
    assert direct[0] == [warning, (b"C", b"ROLLBACK\0"), (b"Z", b"I")]
    assert direct[1] == [warning, (b"C", b"COMMIT\0"), (b"Z", b"I")]
    assert direct[len(LONE) + 3] == [(b"C", b"ROLLBACK\0"), (b"Z", b"I")]  # inside BEGIN: no warning
    assert direct[-3] == [(b"C", b"ROLLBACK\0"), (b"Z", b"I")]  # client_min_messages = error
    assert_clean_servers(pg.primary)


def test_a_lone_rollback_pipelined_with_more_keeps_its_place(pg: Cluster, hal: Running) -> None:
    script = query("ROLLBACK") + query("SELECT 'after'") + query("COMMIT")
    out = []
    for host, port in ((pg.primary.host, pg.primary.port), (hal.host, hal.port)):
        with RawClient(host, port, timeout=10) as raw:
            raw.login("myapp", "myapp", "myapp")
            raw.send(script)
            out.append([_reduced(raw.read_until_ready()) for _ in range(3)])
    assert out[1] == out[0]
    assert_clean_servers(pg.primary)


# --- with the primary down --------------------------------------------------------------------------------


@pytest.fixture
def fresh() -> Iterator[Cluster]:
    # a replica that stays up: its probes go on answering, so the primary is marked down, and
    # transactions that need it wait for it up to checkout_timeout (57P03), as in a real outage
    cluster = start_test_cluster(replicas=1)
    try:
        cluster.primary.sql("CREATE TABLE t (id int)", dbname="myapp", user="myapp")
        yield cluster
    finally:
        cluster.destroy()


def test_a_lone_rollback_or_commit_is_answered_at_once_while_the_primary_is_down(
    fresh: Cluster, halephant: HalephantFactory
) -> None:
    primary = fresh.primary
    run = halephant.start(
        default_config(
            fresh,
            databases={
                "myapp": {"cluster": "main", "pool_size": 2, "checkout_timeout": f"{CHECKOUT_TIMEOUT}s"}
            },
            topology={"interval": "200ms", "timeout": "1s"},
        )
    )
    # what psycopg's notice handler sees connected directly
    with psycopg.connect(primary.dsn("myapp", "myapp", "myapp"), autocommit=True) as direct:
        direct_notices = _notices(direct)
        direct.execute("ROLLBACK")
        direct.execute("COMMIT")
    warning = ("WARNING", "WARNING", "25P01", "there is no transaction in progress", None, None)
    assert direct_notices == [warning, warning]

    # logged in while the primary is up (a login needs a server to learn the parameters to report)
    raw = RawClient(run.host, run.port, timeout=10)
    conn = psycopg.connect(run.dsn(), autocommit=True, connect_timeout=5)
    try:
        raw.login("myapp", "myapp", "myapp")
        notices = _notices(conn)
        # a ROLLBACK inside a transaction goes to the server, which undoes the INSERT
        with conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
        assert notices == []

        primary.stop()
        _wait_log(run, f"node {primary.host}:{primary.port} marked down")
        for sql in LONE:
            start = time.monotonic()
            answer = raw.simple_query(sql)
            took = time.monotonic() - start
            tag = b"ROLLBACK\0" if sql.lower().startswith(("rollback", "abort")) else b"COMMIT\0"
            assert _reduced(answer) == [
                (b"N", b"C=25P01", b"M=there is no transaction in progress", b"S=WARNING", b"V=WARNING"),
                (b"C", tag),
                (b"Z", b"I"),
            ], sql
            assert took < AT_ONCE, (sql, took)

        start = time.monotonic()
        conn.execute("ROLLBACK")
        conn.execute("COMMIT")
        assert time.monotonic() - start < AT_ONCE
        assert notices == direct_notices

        # what is not a lone ROLLBACK still needs the primary: it waits for one (read below, as it waits
        # out checkout_timeout at the same time as the BEGIN that follows)
        raw.send(query("ROLLBACK AND CHAIN"))

        # BEGIN waits for a primary up to checkout_timeout, then fails; the ROLLBACK psycopg sends then
        # is answered at once (it used to wait out checkout_timeout a second time)
        notices.clear()
        start = time.monotonic()
        with pytest.raises(psycopg.errors.CannotConnectNow), conn.transaction():
            conn.execute("INSERT INTO t VALUES (2)")
        took = time.monotonic() - start
        assert CHECKOUT_TIMEOUT - 0.5 < took < CHECKOUT_TIMEOUT + AT_ONCE, took
        assert notices == direct_notices[:1]

        error = raw.expect_error(timeout=CHECKOUT_TIMEOUT + 5)
        assert error.fields["C"] == "57P03", error
        raw.read_until_ready()

        primary.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
                break
            except (psycopg.errors.CannotConnectNow, psycopg.errors.ConnectionFailure):
                assert time.monotonic() < deadline, "the primary never came back"
                time.sleep(0.1)
        assert [m.type for m in raw.simple_query("ROLLBACK")] == [b"N", b"C", b"Z"]
    finally:
        raw.close()
        conn.close()
    assert_clean_servers(primary)
