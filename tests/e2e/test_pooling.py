"""End to end: how halephant's pools behave with real clients and a real PostgreSQL.

Sharing a server between clients (transaction mode), pool_size limits, checkout_timeout in both pool
modes, min_pool_size / idle_timeout / max_lifetime, cancel requests, a server lost mid-transaction, a
client lost mid-transaction, and session state in transaction mode (SET, LISTEN, temporary tables, advisory
locks, PREPARE, startup parameters): kept for the client that made it, never seen by the next one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest
import rawclient as rc
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers
from support.polling import became

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

#: The server database of the min_pool_size / idle_timeout pool, so its backends can be counted alone.
WARM_DB = "e2e_pool_warm"

BackendPids = Callable[..., list[int]]


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    """One halephant for the module, a pool per scenario (pools are per database entry and user)."""
    pg.create_database(WARM_DB, owner="myapp")
    main = {"cluster": "main", "database": "myapp", "checkout_timeout": "5s"}
    config = default_config(
        pg,
        databases={
            "myapp": {**main, "pool_size": 5},
            "one": {**main, "pool_size": 1},
            "one_short": {**main, "pool_size": 1, "checkout_timeout": "500ms"},
            "two": {**main, "pool_size": 2},
            "session_one": {**main, "mode": "session", "pool_size": 1, "checkout_timeout": "500ms"},
            "lifetime": {**main, "pool_size": 1, "max_lifetime": "1s"},
            "leak_one": {**main, "pool_size": 1},
            "warm": {
                "cluster": "main", "database": WARM_DB, "pool_size": 5, "min_pool_size": 2,
                "idle_timeout": "1s",
            },
        },
        limits={"connect_timeout": "3s", "login_timeout": "5s"},
    )  # fmt: skip
    return module_halephant.start(config)


def connect(hal: Running, dbname: str = "myapp", **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(hal.dsn(dbname=dbname), **kwargs)


def one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


_table_numbers = iter(range(1, 1_000_000))


def new_table(pg: Cluster) -> str:
    name = f"e2e_pooling_{next(_table_numbers)}_{int(time.time() * 1000) % 100_000}"
    pg.primary.sql(
        f"CREATE TABLE {name} (id int PRIMARY KEY, v int); INSERT INTO {name} VALUES (1, 0)",
        dbname="myapp",
        user="myapp",
    )
    return name


# --- sharing and limits --------------------------------------------------------------------------------


def test_two_clients_interleave_on_pool_size_1(pg: Cluster, hal: Running) -> None:
    table = new_table(pg)
    with connect(hal, "one") as a, connect(hal, "one") as b, ThreadPoolExecutor(1) as pool:
        with a.transaction():
            a_pid = backend_pid(a)
            a.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
            started = time.monotonic()

            def second_client() -> tuple[int, int, float]:
                return backend_pid(b), one(b, f"SELECT v FROM {table}"), time.monotonic()

            waiting: Future[tuple[int, int, float]] = pool.submit(second_client)
            time.sleep(0.4)
            assert not waiting.done(), "the second client got a server while pool_size 1 was in use"
            a.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
        b_pid, b_value, b_done = waiting.result(timeout=5)
        assert b_done - started >= 0.4
        assert b_value == 2  # it ran after the first client's transaction had committed
        assert b_pid == a_pid  # the one server was handed on, not reopened
        assert backend_pid(a) == a_pid
    assert_clean_servers(pg.primary)


def test_pool_size_respected_under_load(pg: Cluster, hal: Running) -> None:
    async def client(n: int) -> set[int]:
        pids = set()
        async with await psycopg.AsyncConnection.connect(hal.dsn(dbname="two"), autocommit=True) as conn:
            for _ in range(5):
                async with conn.transaction():
                    cur = await conn.execute("SELECT pg_backend_pid(), pg_sleep(0.01)")
                    row = await cur.fetchone()
                    assert row is not None
                    pids.add(int(row[0]))
        return pids

    async def main() -> list[set[int]]:
        return await asyncio.gather(*(client(n) for n in range(12)))

    seen = set().union(*asyncio.run(main()))
    assert 1 <= len(seen) <= 2, f"pool_size 2, yet {len(seen)} backends served: {sorted(seen)}"
    assert_clean_servers(pg.primary)


def test_checkout_timeout_in_transaction_mode_is_an_error_not_a_disconnect(pg: Cluster, hal: Running) -> None:
    with connect(hal, "one_short") as holder, connect(hal, "one_short") as other:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            other.execute("SELECT 1")
        waited = time.monotonic() - started
        assert info.value.sqlstate == "53300", info.value
        assert 0.4 <= waited < 3, waited
        assert not other.closed
        holder.execute("COMMIT")
        assert other.execute("SELECT 'usable again'").fetchone() == ("usable again",)
    assert_clean_servers(pg.primary)


def test_checkout_timeout_in_session_mode_refuses_the_connection(pg: Cluster, hal: Running) -> None:
    async def second_client() -> None:
        conn = await asyncpg.connect(
            host=hal.host, port=hal.port, user="myapp", password="myapp", database="session_one", ssl=False
        )
        await conn.close()

    with connect(hal, "session_one") as holder:
        assert holder.execute("SELECT 1").fetchone() == (1,)
        started = time.monotonic()
        with pytest.raises(asyncpg.exceptions.TooManyConnectionsError):
            asyncio.run(second_client())
        assert 0.4 <= time.monotonic() - started < 3
        # psycopg shows the same FATAL as libpq reports it
        with pytest.raises(psycopg.OperationalError, match="no server connection available"):
            connect(hal, "session_one")
    # once the holder has left, its server is reset and handed to the next client
    with connect(hal, "session_one") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert_clean_servers(pg.primary)


def test_hundreds_of_logins_queued_behind_a_busy_pool_all_get_in(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # A login with startup settings needs a server once (to check them and learn what to report), then
    # gives it straight back, to the next login waiting: handed on 400 times in a row when the one busy
    # server comes free. Never a recursion through every waiting client.
    tiny = {"cluster": "main", "database": "myapp", "pool_size": 1, "checkout_timeout": "20s"}
    run = halephant.start(default_config(pg, databases={"tiny": tiny}, limits={"login_timeout": "20s"}))

    async def login() -> str:
        conn = await asyncpg.connect(
            host=run.host, port=run.port, user="myapp", password="myapp", database="tiny", ssl=False,
            server_settings={"application_name": "queued"}, timeout=30,
        )  # fmt: skip
        try:
            return str(await conn.fetchval("SELECT 'in'"))
        finally:
            await conn.close()

    async def storm() -> list[str]:
        holder = await asyncpg.connect(
            host=run.host, port=run.port, user="myapp", password="myapp", database="tiny", ssl=False
        )
        busy = asyncio.create_task(holder.execute("SELECT pg_sleep(2)"))
        await asyncio.sleep(0.3)
        outcomes = await asyncio.gather(*(login() for _ in range(400)), return_exceptions=True)
        await busy
        await holder.close()
        return [o if isinstance(o, str) else repr(o) for o in outcomes]

    outcomes = asyncio.run(storm())
    assert [o for o in outcomes if o != "in"] == []
    assert "RecursionError" not in run.log_text()
    with psycopg.connect(run.dsn(dbname="tiny")) as after:  # the pool is not wedged
        assert after.execute("SELECT 1").fetchone() == (1,)


def test_a_session_client_waits_for_a_server_up_to_checkout_timeout_not_login_timeout(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # authenticated, then waiting for a server: the database's checkout_timeout, however short the
    # login_timeout (which is for connecting and authenticating)
    held = {"cluster": "main", "database": "myapp", "mode": "session", "pool_size": 1}
    held["checkout_timeout"] = "2500ms"
    run = halephant.start(default_config(pg, databases={"held": held}, limits={"login_timeout": "1s"}))
    with psycopg.connect(run.dsn(dbname="held")) as holder:
        assert holder.execute("SELECT 1").fetchone() == (1,)
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="no server connection available"):
            psycopg.connect(run.dsn(dbname="held"))  # FATAL 53300, as libpq reports it
        assert time.monotonic() - started >= 2


# --- min_pool_size, idle_timeout, max_lifetime ---------------------------------------------------------


def test_min_pool_size_and_idle_timeout(pg: Cluster, hal: Running, backend_pids: BackendPids) -> None:
    # pools are created by their first client; min_pool_size is kept from then on
    with connect(hal, "warm") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (WARM_DB,)
    assert became(lambda: len(backend_pids(WARM_DB)) == 2, timeout=5), backend_pids(WARM_DB)

    # four transactions at once need four servers
    conns = [connect(hal, "warm") for _ in range(4)]
    try:
        for conn in conns:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
        assert len(backend_pids(WARM_DB)) == 4
        for conn in conns:
            conn.execute("COMMIT")
    finally:
        for conn in conns:
            conn.close()

    # idle ones close after idle_timeout (1 s, checked every second), down to min_pool_size and no further
    counts: list[int] = []

    def settled() -> bool:
        counts.append(len(backend_pids(WARM_DB)))
        return counts[-1] == 2

    assert became(settled, timeout=6, interval=0.1), counts
    for _ in range(15):
        counts.append(len(backend_pids(WARM_DB)))
        time.sleep(0.1)
    assert min(counts) == 2, counts
    assert counts[-1] == 2, counts


def test_max_lifetime_replaces_the_server(pg: Cluster, hal: Running) -> None:
    def gone(pid: int) -> bool:
        return pg.primary.sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0"

    with connect(hal, "lifetime") as conn:
        first = backend_pid(conn)
        assert backend_pid(conn) == first
        started = time.monotonic()
        assert became(lambda: gone(first), timeout=5), "max_lifetime 1 s: the server should have been closed"
        assert time.monotonic() - started > 0.5  # not at once: it lived out its lifetime
        second = backend_pid(conn)
    assert second != first


def test_max_lifetime_replaces_a_server_that_is_never_idle(pg: Cluster, hal: Running) -> None:
    # Three clients keep the pool's one server busy: it goes from one to the next without ever being
    # idle, where the sweep looks at ages. It must still be replaced once past its lifetime (on release).
    # They stop a moment after the first replacement (each has run on the new server), or after 3.5 s.
    stop = time.monotonic() + 3.5
    pids: set[int] = set()
    errors: list[BaseException] = []

    def busy() -> None:
        nonlocal stop
        try:
            with connect(hal, "lifetime") as conn:
                while time.monotonic() < stop:
                    pids.add(backend_pid(conn))
                    if len(pids) >= 2:
                        stop = min(stop, time.monotonic() + 0.3)
        except BaseException as exc:  # reported below: the clients see no error while servers rotate
            errors.append(exc)

    with ThreadPoolExecutor(3) as executor:
        for _ in range(3):
            executor.submit(busy)
    assert errors == []
    assert len(pids) >= 2, f"max_lifetime 1 s, 3.5 s of back-to-back transactions: servers {pids}"


# --- cancel --------------------------------------------------------------------------------------------


def timed_error(conn: psycopg.Connection[Any], sql: str) -> tuple[str | None, float]:
    """Run `sql`: the SQLSTATE it failed with (None if it did not), and how long it took."""
    started = time.monotonic()
    try:
        conn.execute(sql)
    except psycopg.Error as exc:
        return exc.sqlstate, time.monotonic() - started
    return None, time.monotonic() - started


def test_cancel_cancels_only_that_query(pg: Cluster, hal: Running) -> None:
    with connect(hal) as sleeper, connect(hal) as bystander, ThreadPoolExecutor(2) as pool:
        cancelled = pool.submit(timed_error, sleeper, "SELECT pg_sleep(10)")
        short = pool.submit(lambda: bystander.execute("SELECT pg_sleep(1), 'finished'").fetchone())
        time.sleep(0.5)
        sleeper.cancel()
        code, took = cancelled.result(timeout=5)
        assert code == "57014"
        assert took < 2.5
        assert short.result(timeout=5) == ("", "finished")
        assert sleeper.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)
    assert_clean_servers(pg.primary)


@pytest.mark.parametrize("dbname", ["myapp", "session_one"])
def test_a_cancel_has_landed_when_the_client_hears_back(pg: Cluster, hal: Running, dbname: str) -> None:
    # libpq's PQcancel (psycopg's cancel()) returns once the cancel connection is closed, taken as the
    # sign that the server got the cancel: the statement sent next must not be the one it cancels
    outcomes = []
    with connect(hal, dbname, autocommit=False) as conn:
        for _ in range(10):
            conn.execute("SELECT 1")  # idle in a transaction: its server is linked, nothing running
            conn.cancel()
            try:
                conn.execute("SELECT pg_sleep(0.1)")
                outcomes.append("ok")
            except psycopg.errors.QueryCanceled:
                outcomes.append("cancelled")
            conn.rollback()
    assert outcomes == ["ok"] * 10
    assert_clean_servers(pg.primary)


def test_cancel_without_a_running_query_is_harmless(pg: Cluster, hal: Running) -> None:
    # pool_size 1: the idle client's last server is now running someone else's query
    with connect(hal, "one") as idle, connect(hal, "one") as busy, ThreadPoolExecutor(1) as pool:
        idle_pid = backend_pid(idle)
        running = pool.submit(lambda: busy.execute("SELECT pg_sleep(0.8), pg_backend_pid()").fetchone())
        time.sleep(0.3)
        idle.cancel()
        row = running.result(timeout=5)
        assert row == ("", idle_pid)  # the same server, and its query was not cancelled
        idle.cancel()
        assert idle.execute("SELECT 'still fine'").fetchone() == ("still fine",)
    hal_log = hal.log_text()
    assert "cancel request ignored: no query running" in hal_log
    assert_clean_servers(pg.primary)


def test_cancel_of_a_statement_waiting_for_a_server_cancels_it_there(pg: Cluster, hal: Running) -> None:
    # pool_size 1 and a 5 s checkout_timeout: the waiting statement has reached no server yet
    with connect(hal, "one") as holder, connect(hal, "one") as waiter, ThreadPoolExecutor(1) as pool:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")

        waiting = pool.submit(timed_error, waiter, "SELECT 'never sent'")
        time.sleep(0.5)
        waiter.cancel()
        code, took = waiting.result(timeout=5)
        assert code == "57014" and took < 2.5  # as PostgreSQL answers a cancelled statement
        holder.execute("COMMIT")
        assert waiter.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)
    assert "its statement was still waiting for a server" in hal.log_text()
    assert_clean_servers(pg.primary)


# --- losing one side mid-transaction -------------------------------------------------------------------


def test_server_lost_mid_transaction(pg: Cluster, hal: Running) -> None:
    with connect(hal) as victim, connect(hal) as other:
        victim.execute("BEGIN")
        pid = backend_pid(victim)
        assert other.execute("SELECT 1").fetchone() == (1,)
        assert pg.primary.sql(f"SELECT pg_terminate_backend({pid})") == "t"
        time.sleep(0.2)
        with pytest.raises(psycopg.OperationalError) as info:
            victim.execute("SELECT 1")
        error = info.value
        # PostgreSQL's own FATAL (57P01, relayed as the server sent it) or halephant's 08006; never a replay
        assert error.sqlstate in ("08006", "57P01"), repr(error)
        assert victim.closed or victim.broken
        assert other.execute("SELECT 2").fetchone() == (2,)
    with connect(hal) as fresh:
        new_pid = backend_pid(fresh)
        assert new_pid != pid
    assert "lost mid-transaction" in hal.log_text()
    assert_clean_servers(pg.primary)


def test_a_session_clients_server_lost_between_transactions_is_not_logged_as_mid_transaction(
    pg: Cluster, hal: Running
) -> None:
    # In session pooling a client keeps its server while idle: losing it then is no transaction lost,
    # and a log saying "mid-transaction" sent the operator looking for one.
    with connect(hal, "session_one") as victim:
        pid = backend_pid(victim)
        assert pg.primary.sql(f"SELECT pg_terminate_backend({pid})") == "t"
        line = f"server <Server pid={pid} "
        assert became(lambda: line in hal.log_text() and "lost between transactions" in hal.log_text())
    lost = [entry for entry in hal.log_text().splitlines() if line in entry and " lost " in entry]
    assert len(lost) == 1 and "lost between transactions" in lost[0], lost
    assert_clean_servers(pg.primary)


def test_a_server_fatal_reaches_the_client_alone(pg: Cluster, hal: Running) -> None:
    # pg_terminate_backend (or a fast shutdown) of a client's server: PostgreSQL's own FATAL is relayed,
    # then the server closes. Nothing may follow that FATAL: a second one (halephant's 08006) is read by
    # the client, idle until then, as a second answer to its next query (psycopg: "received 2 results").
    with rc.RawClient(hal.host, hal.port, timeout=5) as raw:
        raw.login("myapp", "myapp", database="myapp")
        raw.send(rc.query("BEGIN; SELECT pg_backend_pid()"))
        pid = next(m for m in raw.read_until_ready() if m.type == b"D").payload[6:].decode()
        assert pg.primary.sql(f"SELECT pg_terminate_backend({pid})") == "t"
        messages, closed = raw.read_all(timeout=5)
    assert closed
    assert [(m.type, m.fields.get("S"), m.fields.get("C")) for m in messages] == [(b"E", "FATAL", "57P01")]


def test_an_idle_server_ended_by_postgresql_is_logged_with_its_reason(pg: Cluster, hal: Running) -> None:
    # pg_terminate_backend of a pooled server, or a fast shutdown of the node: PostgreSQL's FATAL comes
    # to a server no client is linked to. It was closed with a debug line only, so an operator saw
    # server connections vanish (the next one opened said "now 1") and never learnt why.
    with connect(hal, "one") as conn:
        pid = backend_pid(conn)  # idle in the pool from here on
        assert pg.primary.sql(f"SELECT pg_terminate_backend({pid})") == "t"
        expected = (
            f"server <Server pid={pid} one/myapp@{pg.primary.host}:{pg.primary.port} idle> closed while "
            "idle: FATAL 57P01 terminating connection due to administrator command"
        )
        assert became(lambda: expected in hal.log_text()), hal.log_text()[-3000:]
        assert backend_pid(conn) != pid  # served by a new one
    assert_clean_servers(pg.primary)


def test_server_lost_in_the_middle_of_a_row_ends_the_client_stream_there(pg: Cluster, hal: Running) -> None:
    # A backend terminated while blocked sending a large row to a client that reads slowly stops in the
    # middle of the row. An ErrorResponse appended there would be read as the rest of the row (the end
    # of its value, then garbage): the connection just ends, as it does connected directly.
    with rc.RawClient(hal.host, hal.port, timeout=10) as raw:
        raw.login("myapp", "myapp", database="myapp")
        raw.send(rc.query("SELECT repeat('x', 40000000) AS cut_short"))
        deadline = time.monotonic() + 10
        pid = ""
        while not pid:  # blocked sending: the client reads nothing, so halephant stopped reading the server
            assert time.monotonic() < deadline, "the backend never blocked sending"
            time.sleep(0.05)
            pid = pg.primary.sql(
                "SELECT pid FROM pg_stat_activity"
                " WHERE query LIKE '%AS cut_short' AND wait_event = 'ClientWrite'"
            )
        assert pg.primary.sql(f"SELECT pg_terminate_backend({pid})") == "t"
        assert raw.read().type == b"T"
        data = raw.rest_of_stream()
    rc.assert_one_row_cut_short(data)


def drop(conn: psycopg.Connection[Any]) -> None:
    """Drop the TCP connection under the driver, with no Terminate, as a crashed client would."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    conn.close()


def test_client_lost_mid_transaction_leaves_no_lock(pg: Cluster, hal: Running) -> None:
    table = new_table(pg)
    conn = connect(hal)
    conn.execute("BEGIN")
    pid = backend_pid(conn)
    conn.execute(f"UPDATE {table} SET v = 100 WHERE id = 1")
    drop(conn)
    assert_clean_servers(pg.primary)
    with connect(hal) as other:
        started = time.monotonic()
        with other.transaction():
            other.execute("SET LOCAL lock_timeout = '3s'")
            other.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
        assert time.monotonic() - started < 1.5
        assert other.execute(f"SELECT v FROM {table}").fetchone() == (1,)  # the lost UPDATE rolled back
    # the server was closed rather than rolled back and handed on
    assert became(
        lambda: pg.primary.sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0", 2
    )
    assert_clean_servers(pg.primary)


def test_client_lost_mid_statement_has_its_statement_cancelled(pg: Cluster, hal: Running) -> None:
    table = new_table(pg)
    conn = connect(hal)
    conn.execute("BEGIN")
    pid = backend_pid(conn)
    conn.execute(f"UPDATE {table} SET v = 100 WHERE id = 1")
    # a statement that would run for a minute, holding the row lock, and a client that goes away
    conn.pgconn.send_query(b"SELECT pg_sleep(60)")
    assert became(
        lambda: pg.primary.sql(f"SELECT wait_event FROM pg_stat_activity WHERE pid = {pid}") == "PgSleep", 5
    )
    drop(conn)
    # the backend does not run on to the end of its statement: it is cancelled, rolls back and exits
    assert became(
        lambda: pg.primary.sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0", 5
    )
    assert "cancelling the statement its client left running" in hal.log_text()
    with connect(hal) as other:
        assert other.execute(f"SELECT v FROM {table} WHERE id = 1").fetchone() == (0,)  # rolled back
    assert_clean_servers(pg.primary)


def test_a_statement_a_client_sends_before_terminate_runs_to_its_end(pg: Cluster, hal: Running) -> None:
    # Terminate after a statement, without waiting for its answer (libpq's PQsendQuery then PQfinish):
    # PostgreSQL reads the messages in order, runs the statement to its end (committing it), and only
    # then the Terminate. The client asked for nothing to be cancelled.
    table = new_table(pg)
    direct = (pg.primary.host, pg.primary.port, "myapp")
    for host, port, dbname in (direct, (hal.host, hal.port, "myapp"), (hal.host, hal.port, "session_one")):
        with rc.RawClient(host, port, timeout=10) as raw:
            raw.login("myapp", "myapp", database=dbname)
            update = rc.query(f"UPDATE {table} SET v = v + 1 FROM pg_sleep(0.5) WHERE id = 1")
            raw.send(update + rc.terminate())  # and gone, without waiting for the answer
        time.sleep(0.1)
    running = f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'UPDATE {table} %'"
    assert became(lambda: pg.primary.sql(running) == "0", 5)
    with connect(hal) as other:
        assert other.execute(f"SELECT v FROM {table} WHERE id = 1").fetchone() == (3,)
    assert_clean_servers(pg.primary)


# --- session state -------------------------------------------------------------------------------------


#: Session state a client can leave on a server: the statement, and a query that is true while it is absent.
SESSION_STATE = [
    pytest.param(
        "SET application_name = 'x'", "SELECT current_setting('application_name') <> 'x'", id="set_reported"
    ),
    pytest.param(
        "SET TimeZone = 'Asia/Tokyo'", "SELECT current_setting('TimeZone') <> 'Asia/Tokyo'", id="set_timezone"
    ),
    pytest.param(
        "SET statement_timeout = '1234ms'",
        "SELECT current_setting('statement_timeout') <> '1234ms'",
        id="set_unreported",
    ),
    pytest.param(
        "SET search_path = pg_catalog",
        "SELECT current_setting('search_path') <> 'pg_catalog'",
        id="search_path",
    ),
    pytest.param("LISTEN e2e_state_channel", "SELECT count(*) = 0 FROM pg_listening_channels()", id="listen"),
    pytest.param(
        "SELECT pg_advisory_lock(4242)",
        "SELECT count(*) = 0 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        id="advisory_lock",
    ),
    pytest.param(
        "CREATE TEMP TABLE e2e_state_tmp (n int)",
        "SELECT to_regclass('pg_temp.e2e_state_tmp') IS NULL",
        id="temp_table",
    ),
    pytest.param(
        "PREPARE e2e_state_plan AS SELECT 1",
        # by name: a server may hold other clients' protocol-level statements (halephant's shared ones)
        "SELECT count(*) = 0 FROM pg_prepared_statements WHERE name = 'e2e_state_plan'",
        id="prepare",
    ),
]


@pytest.mark.parametrize(("statement", "absent"), SESSION_STATE)
def test_session_state_never_leaks_in_transaction_mode(
    pg: Cluster, hal: Running, statement: str, absent: str
) -> None:
    # pool_size 1 and a pool of its own: the next client gets the very server the statement ran on
    with connect(hal, "leak_one") as setter:
        try:
            setter.execute(statement)
        except psycopg.Error:
            pass  # refusing session state in transaction pooling would be a correct answer too
        setter_pid = backend_pid(setter)
    with connect(hal, "leak_one") as next_client:
        try:
            assert one(next_client, absent) is True
            assert next_client.info.parameter_status("application_name") != "x"
        finally:
            if backend_pid(next_client) == setter_pid:
                next_client.execute("DISCARD ALL")  # whatever was left behind must not reach other tests
    assert_clean_servers(pg.primary)


@pytest.mark.parametrize(
    ("statement", "absent"),
    # LISTEN is emulated by a shared listener connection: the client's own server does not listen (see
    # tests/e2e/test_session_features.py for its notifications)
    [p for p in SESSION_STATE if p.id != "listen"],
)
def test_session_state_lasts_for_its_session_in_transaction_mode(
    pg: Cluster, hal: Running, statement: str, absent: str
) -> None:
    # as connected directly: what a client set up is still there in its later transactions
    with connect(hal, "two") as conn, connect(hal, "two") as other:
        conn.execute(statement)
        assert other.execute("SELECT 1").fetchone() == (1,)  # the pool's other server is in use too
        with conn.transaction():
            conn.execute("SELECT 1")
        assert one(conn, absent) is False
        assert one(other, absent) is True
    assert_clean_servers(pg.primary)


def test_set_of_a_reported_parameter_is_reported_and_never_leaks(hal: Running) -> None:
    with connect(hal, "two", application_name="first") as conn:
        conn.execute("SET application_name = 'x'")
        assert conn.info.parameter_status("application_name") == "x"
        assert one(conn, "SHOW application_name") == "x"
        with connect(hal, "two") as next_client:
            assert next_client.info.parameter_status("application_name") != "x"
            assert one(next_client, "SHOW application_name") != "x"


def test_startup_application_name_reaches_the_server(hal: Running) -> None:
    with connect(hal, application_name="e2e-startup") as conn:
        assert conn.info.parameter_status("application_name") == "e2e-startup"
        assert one(conn, "SHOW application_name") == "e2e-startup"


def test_startup_options_reach_the_server(hal: Running) -> None:
    with connect(hal, options="-c TimeZone=Europe/Paris") as conn:
        assert conn.info.parameter_status("TimeZone") == "Europe/Paris"
        assert one(conn, "SHOW TimeZone") == "Europe/Paris"


# --- a client that shuts its side down (half-close) ------------------------------------------------------


def half_closed(hal: Running, dbname: str, sent: bytes) -> list[rc.Message]:
    """Log in raw, send `sent`, shut the write side down (`nc -N`, a script) and read to the end."""
    with rc.RawClient(hal.host, hal.port, timeout=10) as raw:
        raw.login("myapp", "myapp", database=dbname)
        raw.send(sent)
        raw.sock.shutdown(socket.SHUT_WR)
        messages, closed = raw.read_all()
    assert closed, f"connection left open; got {messages}"
    return messages


@pytest.mark.parametrize("dbname", ["one", "session_one"])
def test_a_half_closed_client_gets_its_answers_and_its_server_is_reused(
    pg: Cluster, hal: Running, dbname: str
) -> None:
    # PostgreSQL runs and answers what came before the end of the client's stream, then ends the session
    messages = half_closed(hal, dbname, rc.query("SELECT 42, pg_backend_pid()"))
    assert [message.type for message in messages] == [b"T", b"D", b"C", b"Z"], messages
    answer, pid = rc.data_rows(messages)[0]
    assert answer == "42"
    # the pool's one server went back clean (session pooling: reset) and serves the next client
    with connect(hal, dbname) as other:
        assert backend_pid(other) == int(pid)
        assert one(other, "SELECT count(*) FROM pg_prepared_statements") == 0
    assert_clean_servers(pg.primary)


@pytest.mark.parametrize("dbname", ["one", "session_one"])
def test_a_half_closed_client_in_a_transaction_has_it_rolled_back(
    pg: Cluster, hal: Running, dbname: str
) -> None:
    table = new_table(pg)
    sent = rc.query("BEGIN") + rc.query(f"UPDATE {table} SET v = 7 WHERE id = 1") + rc.query("SELECT 1")
    messages = half_closed(hal, dbname, sent)
    assert [message.type for message in messages] == [b"C", b"Z", b"C", b"Z", b"T", b"D", b"C", b"Z"]
    assert messages[-1].payload == b"T"
    with connect(hal, dbname) as other:
        assert one(other, f"SELECT v FROM {table} WHERE id = 1") == 0  # never committed
    assert_clean_servers(pg.primary)


def test_a_half_closed_client_waits_for_a_long_statement(pg: Cluster, hal: Running) -> None:
    # its statement runs to its end and is answered, however long it takes (it is not taken for a
    # client that went away); the client may be told an unchanged setting again meanwhile
    messages = half_closed(hal, "one", rc.query("SELECT 43 FROM pg_sleep(1.5)"))
    assert [message.type for message in messages if message.type != b"S"] == [b"T", b"D", b"C", b"Z"]
    assert rc.data_rows(messages) == [["43"]]
    assert_clean_servers(pg.primary)


def test_a_half_closed_client_waiting_for_a_server_is_answered(pg: Cluster, hal: Running) -> None:
    with connect(hal, "one") as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # the pool's only server is taken
        with rc.RawClient(hal.host, hal.port, timeout=10) as raw:
            raw.login("myapp", "myapp", database="one")
            raw.send(rc.query("SELECT 44"))
            raw.sock.shutdown(socket.SHUT_WR)
            time.sleep(0.3)  # waiting for the server
            holder.execute("COMMIT")
            messages, closed = raw.read_all()
    assert closed, messages
    assert [message.type for message in messages] == [b"T", b"D", b"C", b"Z"], messages
    assert rc.data_rows(messages) == [["44"]]
    assert_clean_servers(pg.primary)
