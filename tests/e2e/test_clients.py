"""End to end: real client programs and drivers through halephant to a real PostgreSQL.

psql (queries, scripts, \\copy), psycopg 3 (sync, async, pipeline mode), asyncpg (session and transaction
pooling), pgbench (simple and extended protocol under load), notices and notifications, and a large
result streamed without halephant buffering it. FunctionCall is left out: no common driver sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest
from psycopg.rows import tuple_row
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster, pgbench

pytestmark = pytest.mark.e2e

BENCH_DB = "e2e_bench"
BENCH_POOL_SIZE = 4

RunClient = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    """One halephant for the module: `myapp` (transaction, 5), `myapp3` (transaction, 3), `copy_one`
    (transaction, 1), `myapp_session` (session) and `bench` (the pgbench database, transaction, 4)."""
    short = {"checkout_timeout": "10s", "idle_timeout": "30s"}
    config = default_config(
        pg,
        databases={
            "myapp": {"cluster": "main", "pool_size": 5, **short},
            "myapp3": {"cluster": "main", "database": "myapp", "pool_size": 3, **short},
            "copy_one": {"cluster": "main", "database": "myapp", "pool_size": 1, "checkout_timeout": "1s"},
            "myapp_session": {"cluster": "main", "database": "myapp", "mode": "session", "pool_size": 5},
            "bench": {"cluster": "main", "database": BENCH_DB, "pool_size": BENCH_POOL_SIZE, **short},
        },
        users={"trustuser": {"auth": "trust"}},
        limits={"connect_timeout": "3s", "login_timeout": "5s"},
    )
    return module_halephant.start(config)


_table_numbers = iter(range(1, 1_000_000))


def new_table(pg: Cluster, columns: str = "id int PRIMARY KEY, v text") -> str:
    """Create a table owned by myapp with a name no other test uses."""
    name = f"e2e_clients_{next(_table_numbers)}_{int(time.time() * 1000) % 100_000}"
    pg.primary.sql(f"CREATE TABLE {name} ({columns})", dbname="myapp", user="myapp")
    return name


def count_rows(pg: Cluster, table: str) -> int:
    return int(pg.primary.sql(f"SELECT count(*) FROM {table}", dbname="myapp"))


# --- psql ----------------------------------------------------------------------------------------------


def test_psql_query_and_script(pg: Cluster, hal: Running, run_client: RunClient) -> None:
    out = run_client("psql", hal, ["-X", "-A", "-t", "-c", "SELECT 6 * 7, current_user"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42|myapp"

    table = new_table(pg)
    script = (
        "BEGIN;\n"
        f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two');\n"
        f"UPDATE {table} SET v = 'deux' WHERE id = 2;\n"
        "COMMIT;\n"
        "BEGIN;\n"
        f"INSERT INTO {table} VALUES (3, 'rolled back');\n"
        "ROLLBACK;\n"
        f"SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM {table};\n"
    )
    out = run_client("psql", hal, ["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"], input=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1=one,2=deux"
    assert pg.primary.sql(f"SELECT string_agg(v, ',' ORDER BY id) FROM {table}", dbname="myapp") == "one,deux"
    assert_clean_servers(pg.primary)


def test_psql_copy_round_trip(pg: Cluster, hal: Running, run_client: RunClient, tmp_path: Path) -> None:
    table = new_table(pg)
    source = tmp_path / "in.tsv"
    source.write_text("".join(f"{i}\tvalue {i} with\\ttab\n" for i in range(1, 10_001)))
    dest = tmp_path / "out.tsv"
    script = (
        f"\\copy {table} FROM '{source}'\n"
        f"\\copy (SELECT * FROM {table} ORDER BY id) TO '{dest}'\n"
        f"SELECT count(*), sum(id) FROM {table};\n"
    )
    out = run_client("psql", hal, ["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"], input=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"10000|{sum(range(1, 10_001))}"
    assert dest.read_text() == source.read_text()
    assert count_rows(pg, table) == 10_000
    assert_clean_servers(pg.primary)


class RawSession:
    """Just enough of the frontend protocol to send COPY messages exactly when a test wants them (drivers
    stop sending as soon as they notice an error). Logs in as a user with `auth: trust`."""

    def __init__(self, hal: Running, user: str, dbname: str) -> None:
        self.sock = socket.create_connection((hal.host, hal.port), timeout=5)
        params = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0" for k, v in (("user", user), ("database", dbname))
        )
        body = struct.pack("!i", 196608) + params + b"\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self._buf = b""
        self.read_until(b"Z")

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        self.sock.sendall(kind + struct.pack("!i", len(payload) + 4) + payload)

    def read_until(self, kind: bytes) -> list[bytes]:
        """Read messages up to and including the first of type `kind`; return their types."""
        seen: list[bytes] = []
        while True:
            while len(self._buf) < 5 or len(self._buf) < 1 + struct.unpack("!i", self._buf[1:5])[0]:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {seen}")
                self._buf += chunk
            size = struct.unpack("!i", self._buf[1:5])[0]
            t, self._buf = self._buf[:1], self._buf[1 + size :]
            seen.append(t)
            if t == kind:
                return seen

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(b"X")
        self.sock.close()


def test_failed_copy_in_gives_the_server_back(pg: Cluster, hal: Running) -> None:
    table = new_table(pg, "n int")
    pg.primary.sql(f"GRANT SELECT, INSERT ON {table} TO trustuser", dbname="myapp")
    copier = RawSession(hal, "trustuser", "copy_one")
    try:
        copier.send(b"Q", f"COPY {table} FROM STDIN\0".encode())
        copier.read_until(b"G")  # CopyInResponse
        copier.send(b"d", b"not a number\n")
        assert copier.read_until(b"Z") == [b"E", b"Z"]  # the COPY failed; the server is idle
        # what a client streaming COPY data has sent before it sees the error; PostgreSQL ignores it
        copier.send(b"d", b"1\n")
        copier.send(b"c")
        time.sleep(0.1)
        # the copier is idle; pool_size 1: the next client of the pool needs the same server
        with psycopg.connect(hal.dsn(user="trustuser", password=None, dbname="copy_one")) as other:
            assert other.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    finally:
        copier.close()
    assert_clean_servers(pg.primary)


# --- psycopg, sync -------------------------------------------------------------------------------------


def test_psycopg_autocommit_transactions_and_executemany(pg: Cluster, hal: Running) -> None:
    table = new_table(pg)
    with psycopg.connect(hal.dsn(), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (0, "autocommit"))
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "committed"))
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (2, "rolled back"))
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "duplicate"))
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"row {i}") for i in range(10, 1010)]
            )
            rows = cur.execute(f"SELECT count(*), min(id), max(id) FROM {table}").fetchone()
        assert rows == (1002, 0, 1009)
        assert conn.execute(f"SELECT v FROM {table} WHERE id = 2").fetchone() is None

    # a non-autocommit connection: the driver's implicit BEGIN, then commit and rollback
    with psycopg.connect(hal.dsn()) as conn:
        conn.execute(f"DELETE FROM {table} WHERE id >= 10")
        conn.rollback()
        conn.execute(f"DELETE FROM {table} WHERE id >= 500")
        conn.commit()
    assert count_rows(pg, table) == 2 + 490
    assert_clean_servers(pg.primary)


def test_psycopg_server_side_cursor_streams_100k_rows_in_a_transaction(pg: Cluster, hal: Running) -> None:
    with psycopg.connect(hal.dsn(), autocommit=True) as conn:
        with conn.transaction(), conn.cursor(name="e2e_big") as cur:
            cur.itersize = 5_000
            cur.execute("SELECT g, repeat('x', 20) FROM generate_series(1, 100000) g")
            count = total = 0
            for g, text in cur:
                count += 1
                total += g
                assert len(text) == 20
        assert (count, total) == (100_000, sum(range(1, 100_001)))
        # the cursor died with its transaction, and the connection is still good
        assert conn.execute("SELECT count(*) FROM pg_cursors").fetchone() == (0,)
    assert_clean_servers(pg.primary)


# --- psycopg, async ------------------------------------------------------------------------------------


def test_psycopg_async_20_tasks_over_pool_size_3(pg: Cluster, hal: Running) -> None:
    table = new_table(pg, "task int PRIMARY KEY, pid int")

    async def task(n: int) -> int:
        async with await psycopg.AsyncConnection.connect(hal.dsn(dbname="myapp3"), autocommit=True) as conn:
            async with conn.transaction():
                cur = await conn.execute("SELECT pg_backend_pid()")
                row = await cur.fetchone()
                assert row is not None
                await conn.execute("SELECT pg_sleep(0.05)")
                await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (n, row[0]))
            cur = await conn.execute(f"SELECT pid FROM {table} WHERE task = %s", (n,))
            assert await cur.fetchone() == (row[0],)
            return int(row[0])

    async def main() -> list[int]:
        return await asyncio.gather(*(task(n) for n in range(20)))

    pids = asyncio.run(main())
    assert len(pids) == 20
    assert 1 <= len(set(pids)) <= 3, f"more server connections than pool_size 3: {sorted(set(pids))}"
    assert count_rows(pg, table) == 20
    assert_clean_servers(pg.primary)


# --- psycopg pipeline mode -----------------------------------------------------------------------------


def pipeline_outcome(conn: psycopg.Connection[Any], table: str, tag: str) -> list[Any]:
    """Run one pipeline with an error in the middle; return what each statement gave, and the table's rows.

    Which call raises depends on timing (the failed statement's error, then possibly PipelineAborted for
    those behind it), so what is compared is the first error and each cursor's final state.
    """
    queries: list[tuple[str, tuple[Any, ...]]] = [
        ("SELECT 1 AS a, 'two' AS b", ()),
        (f"INSERT INTO {table} VALUES (%s, %s) RETURNING id", (1, tag)),
        ("SELECT %s::int + 1", (41,)),
        ("SELECT 1 / 0", ()),  # division_by_zero: the rest up to the Sync is skipped
        ("SELECT 'never'", ()),
        (f"INSERT INTO {table} VALUES (%s, %s)", (2, tag)),
    ]
    after_sync = [("SELECT 'after sync', %s::text", (tag,)), (f"SELECT count(*) FROM {table}", ())]
    cursors: list[psycopg.Cursor[Any]] = []
    errors: list[str | None] = []
    with conn.pipeline() as p:
        for query, params in queries:
            cur = conn.cursor(row_factory=tuple_row)
            try:
                cur.execute(query, params)
            except psycopg.Error as exc:
                errors.append(exc.sqlstate or type(exc).__name__)
            cursors.append(cur)
        try:
            p.sync()
        except psycopg.Error as exc:
            errors.append(exc.sqlstate or type(exc).__name__)
        for query, params in after_sync:
            cur = conn.cursor(row_factory=tuple_row)
            cur.execute(query, params)
            cursors.append(cur)
    states: list[Any] = []
    for cur in cursors:
        try:
            states.append(("rows", cur.fetchall()))
        except psycopg.Error as exc:
            states.append(("error", type(exc).__name__, exc.sqlstate))
    assert set(errors[1:]) <= {"PipelineAborted"}, errors
    return [errors[:1], states]


def test_psycopg_pipeline_matches_direct_connection(pg: Cluster, hal: Running) -> None:
    direct_table, proxied_table = new_table(pg), new_table(pg)
    with psycopg.connect(pg.primary.dsn("myapp", "myapp", "myapp"), autocommit=True) as conn:
        direct = pipeline_outcome(conn, direct_table, "t")
        # the connection is usable afterwards
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(hal.dsn(), autocommit=True) as conn:
        proxied = pipeline_outcome(conn, proxied_table, "t")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxied == direct
    errors, states = proxied
    assert errors == ["22012"]
    assert states[0] == ("rows", [(1, "two")])
    assert states[2] == ("rows", [(42,)])
    assert states[-2] == ("rows", [("after sync", "t")])
    # the implicit transaction of the failed batch was rolled back, the INSERT with it
    assert states[-1] == ("rows", [(0,)])
    assert count_rows(pg, proxied_table) == count_rows(pg, direct_table) == 0
    assert_clean_servers(pg.primary)


# --- asyncpg -------------------------------------------------------------------------------------------


def test_asyncpg_session_mode(pg: Cluster, hal: Running) -> None:
    table = new_table(pg, "id int PRIMARY KEY, v text")

    async def main() -> None:
        conn = await asyncpg.connect(
            host=hal.host, port=hal.port, user="myapp", password="myapp", database="myapp_session", ssl=False
        )
        try:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert await conn.fetch("SELECT $1::int * 2 AS n", 21) == [(42,)]
            stmt = await conn.prepare(f"SELECT v FROM {table} WHERE id = $1")
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"v{i}") for i in range(500)])
            assert await stmt.fetchval(7) == "v7"
            assert await stmt.fetchval(499) == "v499"
            async with conn.transaction():
                await conn.execute(f"UPDATE {table} SET v = 'changed' WHERE id = 1")
            with pytest.raises(RuntimeError, match="roll me back"):
                async with conn.transaction():
                    await conn.execute(f"UPDATE {table} SET v = 'lost' WHERE id = 2")
                    raise RuntimeError("roll me back")
            assert await stmt.fetchval(1) == "changed"
            assert await stmt.fetchval(2) == "v2"
            async with conn.transaction():
                seen = [
                    r["id"] async for r in conn.cursor(f"SELECT id FROM {table} ORDER BY id", prefetch=50)
                ]
            assert seen == list(range(500))
            # one backend for the whole session
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        finally:
            await conn.close()

    asyncio.run(main())
    assert_clean_servers(pg.primary)


def test_asyncpg_transaction_mode_without_statement_cache(pg: Cluster, hal: Running) -> None:
    table = new_table(pg, "id int PRIMARY KEY, v text")

    async def main() -> None:
        conn = await asyncpg.connect(
            host=hal.host, port=hal.port, user="myapp", password="myapp", database="myapp",
            ssl=False, statement_cache_size=0,
        )  # fmt: skip
        try:
            assert await conn.fetchval("SELECT $1::text || $2::text", "hal", "ephant") == "halephant"
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"v{i}") for i in range(300)])
            async with conn.transaction():
                await conn.execute(f"DELETE FROM {table} WHERE id >= 100")
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 100
            with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
                async with conn.transaction():
                    await conn.execute(f"DELETE FROM {table}")
                    await conn.fetchval("SELECT 1 / $1::int", 0)
            rows = await conn.fetch(f"SELECT id, v FROM {table} WHERE id < $1 ORDER BY id", 3)
            assert [tuple(r) for r in rows] == [(0, "v0"), (1, "v1"), (2, "v2")]
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 100
        finally:
            await conn.close()

    asyncio.run(main())
    assert_clean_servers(pg.primary)


# --- pgbench -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_db(pg: Cluster) -> str:
    pg.create_database(BENCH_DB, owner="myapp")
    pgbench(pg.primary, "-i", "-q", "-s", "1", dbname=BENCH_DB, user="myapp")
    return BENCH_DB


class BackendSampler:
    """Samples, in a thread, how many backends halephant holds for one database (as myapp)."""

    def __init__(self, backend_pids: Callable[..., list[int]], dbname: str) -> None:
        self.backend_pids, self.dbname = backend_pids, dbname
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(len(self.backend_pids(self.dbname)))
            self._stop.wait(0.05)

    def __enter__(self) -> BackendSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_pgbench_under_load(
    pg: Cluster,
    hal: Running,
    bench_db: str,
    protocol: str,
    run_client: RunClient,
    backend_pids: Callable[..., list[int]],
) -> None:
    with BackendSampler(backend_pids, bench_db) as sampler:
        out = run_client(
            "pgbench",
            hal,
            ["-n", "-M", protocol, "-c", "20", "-j", "2", "-T", "2"],
            dbname="bench",
            timeout=60,
        )
    assert out.returncode == 0, out.stdout + out.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert processed is not None and int(processed.group(1)) > 100, out.stdout
    assert failed is not None and int(failed.group(1)) == 0, out.stdout
    assert len(sampler.samples) >= 10
    assert max(sampler.samples) <= BENCH_POOL_SIZE, sampler.samples
    assert max(sampler.samples) >= 1
    assert_clean_servers(pg.primary)


# --- asynchronous messages -----------------------------------------------------------------------------


def test_notice_is_delivered(hal: Running) -> None:
    notices: list[tuple[str | None, str | None]] = []
    with psycopg.connect(hal.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
        conn.execute("DO $$BEGIN RAISE NOTICE 'hi'; END$$")
        assert notices == [("NOTICE", "hi")]
        with conn.transaction():
            conn.execute("DO $$BEGIN RAISE WARNING 'careful %', 42; END$$")
        assert notices[1:] == [("WARNING", "careful 42")]


def test_notify_reaches_a_listener_in_session_mode(pg: Cluster, hal: Running) -> None:
    with psycopg.connect(hal.dsn(dbname="myapp_session"), autocommit=True) as listener:
        listener.execute("LISTEN e2e_channel")
        with psycopg.connect(hal.dsn(), autocommit=True) as sender:
            sender.execute("NOTIFY e2e_channel, 'first'")
            sender.execute("SELECT pg_notify('e2e_channel', 'second')")
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=2)]
        assert got == [("e2e_channel", "first"), ("e2e_channel", "second")]
        assert listener.execute("SELECT 1").fetchone() == (1,)
    assert_clean_servers(pg.primary)


# --- big results ---------------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak_rss(pid: int) -> bool:
    # writing 5 to clear_refs resets VmHWM (Linux >= 4.0); without it the peak is sampled instead
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.fixture
def lone_hal(pg: Cluster, halephant: HalephantFactory) -> Iterator[Running]:
    yield halephant.start(default_config(pg))


def test_50mb_result_streams_without_buffering(pg: Cluster, lone_hal: Running) -> None:
    pid = lone_hal.proc.pid
    with psycopg.connect(lone_hal.dsn(), autocommit=True) as conn:
        conn.execute("SELECT repeat('x', 1000) FROM generate_series(1, 100)").fetchall()  # warm up
        before = _status_kb(pid, "VmRSS")
        peak_resettable = _reset_peak_rss(pid)
        peak = before
        rows = size = 0
        with conn.cursor() as cur:
            # a slow reader: halephant must stop reading from the server rather than buffer the result;
            # PostgreSQL produces the rest well within the first pause
            for (text,) in cur.stream("SELECT repeat('x', 1000) FROM generate_series(1, 50000)"):
                rows += 1
                size += len(text)
                if rows == 1000 or rows % 10000 == 0:
                    time.sleep(0.5 if rows == 1000 else 0.05)
                    peak = max(peak, _status_kb(pid, "VmRSS"))
        if peak_resettable:
            peak = max(peak, _status_kb(pid, "VmHWM"))
    assert (rows, size) == (50_000, 50_000_000)
    grown_mb = (peak - before) / 1024
    assert grown_mb < 30, f"halephant's RSS grew by {grown_mb:.1f} MB while streaming 50 MB"
