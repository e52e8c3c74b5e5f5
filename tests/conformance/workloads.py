"""Scripted client workloads for the differential conformance harness.

Each workload drives one client library (psycopg sync, async and pipeline mode, asyncpg, raw protocol
messages, pgbench) through a script and returns what the client saw, normalized so that only what must
differ between PostgreSQL and a pooler (backend process IDs, secret keys) is left out. The harness runs
every workload directly and through halephant and compares the results.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg.errors

from halephant.testing.pgcluster import conninfo, find_bindir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))
rc = importlib.import_module("rawclient")  # the raw protocol client of the end-to-end tests


@dataclass(frozen=True)
class Target:
    """Where a workload connects: PostgreSQL itself or halephant."""

    name: str
    host: str
    port: int
    database: str
    user: str = "myapp"
    password: str = "myapp"

    @property
    def dsn(self) -> str:
        return conninfo(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=self.database,
            sslmode="disable", connect_timeout=10,
        )  # fmt: skip


@dataclass(frozen=True)
class Workload:
    driver: str
    name: str
    run: Callable[[Target], Any]
    #: why halephant knowingly differs from PostgreSQL here ("" when it must not)
    known_difference: str = ""

    @property
    def id(self) -> str:
        return f"{self.driver}:{self.name}"


WORKLOADS: list[Workload] = []


def workload(
    driver: str, name: str, known_difference: str = ""
) -> Callable[[Callable[[Target], Any]], Callable[[Target], Any]]:
    def register(fn: Callable[[Target], Any]) -> Callable[[Target], Any]:
        WORKLOADS.append(Workload(driver, name, fn, known_difference))
        return fn

    return register


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _sqlstate(exc: BaseException) -> str:
    return getattr(exc, "sqlstate", None) or type(exc).__name__


# --- psycopg (sync) ---------------------------------------------------------------------------------------


@workload("psycopg", "types, parameters and errors")
def psycopg_basic(t: Target) -> Any:
    out: list[Any] = []
    with psycopg.connect(t.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT %s::int, %s::text, %s::numeric, %s::jsonb, %s::int[], NULL, true, '2024-01-02'::date",
            (42, "héllo", Decimal("1.50"), psycopg.types.json.Jsonb({"a": [1, 2]}), [1, 2, 3]),
        ).fetchone()
        out.append(row)
        out.append(conn.execute("SELECT g, g * 2 FROM generate_series(1, 5) g").fetchall())
        try:
            conn.execute("SELECT 1/0")
        except psycopg.Error as exc:
            out.append(_sqlstate(exc))
        out.append(conn.execute("SELECT 'usable'").fetchone())
        try:
            conn.execute("SELECT * FROM no_such_table")
        except psycopg.Error as exc:
            out.append((_sqlstate(exc), exc.diag.message_primary))
        with conn.transaction():
            out.append(conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'pg_class'").fetchone())
        out.append(str(conn.info.transaction_status))
    return out


@workload("psycopg", "transactions and savepoints")
def psycopg_transactions(t: Target) -> Any:
    table = _unique("conf_tx")
    out: list[Any] = []
    with psycopg.connect(t.dsn) as conn:
        conn.execute(f"CREATE TABLE {table} (n int)")
        conn.commit()
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (2)")
            try:
                with conn.transaction():
                    conn.execute(f"INSERT INTO {table} VALUES (3)")
                    conn.execute("SELECT 1/0")
            except psycopg.errors.DivisionByZero:
                out.append("savepoint rolled back")
        conn.rollback()
        out.append(conn.execute(f"SELECT array_agg(n ORDER BY n) FROM {table}").fetchone())
        conn.execute(f"DROP TABLE {table}")
        conn.commit()
    return out


@workload("psycopg", "server-side cursor in a transaction")
def psycopg_named_cursor(t: Target) -> Any:
    with psycopg.connect(t.dsn) as conn:
        with conn.cursor("conf_cur") as cur:
            cur.execute("SELECT g FROM generate_series(1, 10) g")
            first = cur.fetchmany(3)
            second = cur.fetchmany(3)
            rest = cur.fetchall()
        conn.commit()
        return [first, second, rest]


@workload("psycopg", "prepared statements (prepare=True)")
def psycopg_prepared(t: Target) -> Any:
    with psycopg.connect(t.dsn, autocommit=True) as conn:
        results = [conn.execute("SELECT %s::int * 2", (n,), prepare=True).fetchone() for n in range(8)]
        with conn.transaction():
            results += [
                conn.execute("SELECT %s::text || 'x'", (n,), prepare=True).fetchone() for n in range(3)
            ]
        return results


@workload("psycopg", "session settings across transactions")
def psycopg_settings(t: Target) -> Any:
    out: list[Any] = []
    with psycopg.connect(t.dsn, autocommit=True, options="-c statement_timeout=5s") as conn:
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        conn.execute("SET search_path = pg_catalog, public")
        with conn.transaction():
            conn.execute("SET LOCAL work_mem = '5MB'")
        for _ in range(3):
            with conn.transaction():
                query = (
                    "SELECT current_setting('TimeZone'), current_setting('search_path'),"
                    " current_setting('work_mem') = reset_val, current_setting('statement_timeout')"
                    " FROM pg_settings WHERE name = 'work_mem'"
                )
                out.append(conn.execute(query).fetchone())
        out.append(conn.info.parameter_status("TimeZone"))
        conn.execute("RESET ALL")
        out.append(conn.execute("SHOW search_path").fetchone())
    return out


@workload("psycopg", "notices and reported parameters")
def psycopg_reported(t: Target) -> Any:
    names = (
        "application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone",
        "standard_conforming_strings", "integer_datetimes", "server_encoding", "is_superuser",
    )  # fmt: skip
    out: list[Any] = []
    with psycopg.connect(t.dsn, autocommit=True, application_name="conformance") as conn:
        notices: list[tuple[str | None, str | None]] = []
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary)))
        out.append([conn.info.parameter_status(n) for n in names])
        conn.execute("DO $$BEGIN RAISE NOTICE 'n1'; RAISE WARNING 'w1'; END$$")
        conn.execute("SET DateStyle = 'SQL, DMY'")
        conn.execute("SET application_name = 'renamed'")
        with conn.transaction():
            conn.execute("SET IntervalStyle = 'postgres_verbose'")
            conn.execute("SELECT 1")
        for _ in range(2):
            out.append([conn.info.parameter_status(n) for n in names])
            out.append(conn.execute("SELECT current_setting('DateStyle'), current_setting('IntervalStyle'),"
                                    " current_setting('application_name')").fetchone())  # fmt: skip
        out.append(notices)
    return out


@workload(
    "psycopg",
    "RESET back to the startup parameters",
    known_difference="the ParameterStatus of a startup value RESET brings back comes right after the "
    "RESET's ReadyForQuery, not before it: a client that reads nothing more still shows the pool's default",
)
def psycopg_reset_to_startup(t: Target) -> Any:
    dsn = t.dsn + " application_name=startup options='-c work_mem=6MB'"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET application_name = 'renamed'")
        conn.execute("SET work_mem = '7MB'")
        conn.execute("RESET ALL")
        return [
            conn.info.parameter_status("application_name"),
            conn.execute(
                "SELECT current_setting('application_name'), current_setting('work_mem')"
            ).fetchone(),
        ]


@workload("psycopg", "LISTEN / NOTIFY")
def psycopg_listen(t: Target) -> Any:
    channel = _unique("conf_chan")
    with (
        psycopg.connect(t.dsn, autocommit=True) as listener,
        psycopg.connect(t.dsn, autocommit=True) as sender,
    ):
        listener.execute(f"LISTEN {channel}")
        # each sender PID is read in the notifying transaction itself: in transaction pooling two
        # transactions of one client may run on different servers, as PostgreSQL's PIDs then say
        cursor = sender.execute(f"NOTIFY {channel}, 'one'; SELECT pg_backend_pid()")
        cursor.nextset()
        one = cursor.fetchone()
        two = sender.execute("SELECT pg_backend_pid() FROM pg_notify(%s, 'two')", (channel,)).fetchone()
        assert one is not None and two is not None
        notes = list(listener.notifies(timeout=10, stop_after=2))
        pids = (one[0], two[0])[: len(notes)]
        got = [(n.channel == channel, n.payload, n.pid == pid) for n, pid in zip(notes, pids, strict=True)]
        listener.execute(f"UNLISTEN {channel}")
        return got


@workload("psycopg", "COPY in and out")
def psycopg_copy(t: Target) -> Any:
    table = _unique("conf_copy")
    with psycopg.connect(t.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (n int, t text)")
        try:
            with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
                for n in range(100):
                    copy.write_row((n, f"row {n}"))
            chunks = []
            with conn.cursor().copy(f"COPY (SELECT * FROM {table} ORDER BY n) TO STDOUT") as copy:
                chunks = [bytes(c) for c in copy]
            return [
                len(b"".join(chunks).splitlines()),
                conn.execute(f"SELECT sum(n) FROM {table}").fetchone(),
            ]
        finally:
            conn.execute(f"DROP TABLE {table}")


@workload("psycopg", "SQL PREPARE / EXECUTE")
def psycopg_sql_prepare(t: Target) -> Any:
    with psycopg.connect(t.dsn, autocommit=True) as conn:
        conn.execute("PREPARE conf_plan (int) AS SELECT $1 + 1")
        out = [
            conn.execute("EXECUTE conf_plan(1)").fetchone(),
            conn.execute("EXECUTE conf_plan(41)").fetchone(),
        ]
        conn.execute("DEALLOCATE conf_plan")
        try:
            conn.execute("EXECUTE conf_plan(1)")
        except psycopg.Error as exc:
            out.append(_sqlstate(exc))
        return out


@workload("psycopg", "session advisory lock")
def psycopg_advisory(t: Target) -> Any:
    key = int(uuid.uuid4().int % 1_000_000)
    with psycopg.connect(t.dsn, autocommit=True) as a, psycopg.connect(t.dsn, autocommit=True) as b:
        out = [a.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()]
        with a.transaction():
            out.append(a.execute("SELECT 1").fetchone())
        out.append(b.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone())
        out.append(a.execute("SELECT pg_advisory_unlock(%s)", (key,)).fetchone())
        out.append(b.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone())
        out.append(b.execute("SELECT pg_advisory_unlock(%s)", (key,)).fetchone())
        return out


# --- psycopg (async and pipeline) ---------------------------------------------------------------------------


@workload("psycopg async", "queries, transactions and errors")
def psycopg_async(t: Target) -> Any:
    async def main() -> Any:
        out: list[Any] = []
        async with await psycopg.AsyncConnection.connect(t.dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT %s::int + 1, %s::text", (1, "a"))
            out.append(await cur.fetchone())
            async with conn.transaction():
                cur = await conn.execute("SELECT g FROM generate_series(1, 3) g")
                out.append(await cur.fetchall())
            try:
                await conn.execute("SELECT 1/0")
            except psycopg.Error as exc:
                out.append(_sqlstate(exc))
            cur = await conn.execute("SELECT 'after'")
            out.append(await cur.fetchone())
        return out

    return asyncio.run(main())


@workload("psycopg async", "LISTEN / NOTIFY")
def psycopg_async_listen(t: Target) -> Any:
    channel = _unique("conf_achan")

    async def main() -> Any:
        async with (
            await psycopg.AsyncConnection.connect(t.dsn, autocommit=True) as listener,
            await psycopg.AsyncConnection.connect(t.dsn, autocommit=True) as sender,
        ):
            await listener.execute(f"LISTEN {channel}")
            await sender.execute(f"NOTIFY {channel}, 'async'")
            return [(n.payload,) async for n in listener.notifies(timeout=10, stop_after=1)]

    return asyncio.run(main())


@workload("psycopg pipeline", "pipelined queries with an error")
def psycopg_pipeline(t: Target) -> Any:
    out: list[Any] = []
    with psycopg.connect(t.dsn, autocommit=True) as conn:
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int", (n,)) for n in range(5)]
        out.append([c.fetchone() for c in cursors])
        try:
            with conn.pipeline():
                first = conn.execute("SELECT 'before'")
                conn.execute("SELECT 1/0")
                conn.execute("SELECT 'skipped'")
        except psycopg.Error as exc:
            out.append(_sqlstate(exc))
            out.append(first.fetchone())
        with conn.pipeline(), conn.transaction():
            c1 = conn.execute("SELECT 1")
            c2 = conn.execute("SELECT 2")
        out.append([c1.fetchone(), c2.fetchone()])
    return out


# --- asyncpg ----------------------------------------------------------------------------------------------


async def _asyncpg_connect(t: Target) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=t.host, port=t.port, user=t.user, password=t.password, database=t.database, ssl=False
    )


@workload("asyncpg", "prepared statements and types")
def asyncpg_prepared(t: Target) -> Any:
    async def main() -> Any:
        conn = await _asyncpg_connect(t)
        try:
            stmt = await conn.prepare("SELECT $1::int * 2, $2::text, $3::numeric, $4::uuid, $5::int[]")
            u = uuid.UUID("12345678-1234-5678-1234-567812345678")
            rows = [tuple(await stmt.fetchrow(n, "x", Decimal("2.5"), u, [n])) for n in range(5)]
            rows.append(await conn.fetchval("SELECT $1::jsonb", '{"k": 1}'))
            try:
                await conn.fetch("SELECT 1/0")
            except asyncpg.PostgresError as exc:
                rows.append(exc.sqlstate)
            rows.append(await conn.fetchval("SELECT 'after'"))
            return rows
        finally:
            await conn.close()

    return asyncio.run(main())


@workload("asyncpg", "executemany and cursors in a transaction")
def asyncpg_executemany(t: Target) -> Any:
    table = _unique("conf_many")

    async def main() -> Any:
        conn = await _asyncpg_connect(t)
        try:
            await conn.execute(f"CREATE TABLE {table} (n int, t text)")
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(n, f"v{n}") for n in range(50)])
            out = [await conn.fetchval(f"SELECT count(*) FROM {table}")]
            async with conn.transaction():
                cursor = await conn.cursor(f"SELECT n FROM {table} ORDER BY n")
                out.append([r["n"] for r in await cursor.fetch(5)])
                out.append([r["n"] for r in await cursor.fetch(5)])
                out.append(
                    [r["n"] async for r in conn.cursor(f"SELECT n FROM {table} WHERE n < 3 ORDER BY n")]
                )
            await conn.execute(f"DROP TABLE {table}")
            return out
        finally:
            await conn.close()

    return asyncio.run(main())


@workload("asyncpg", "LISTEN with add_listener")
def asyncpg_listen(t: Target) -> Any:
    channel = _unique("conf_pgl")

    async def main() -> Any:
        listener = await _asyncpg_connect(t)
        sender = await _asyncpg_connect(t)
        got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        try:

            def callback(_conn: object, _pid: int, ch: str, payload: str) -> None:
                got.put_nowait((ch, payload))

            await listener.add_listener(channel, callback)
            await sender.execute(f"NOTIFY {channel}, 'hi'")
            first = await asyncio.wait_for(got.get(), 10)
            await listener.remove_listener(channel, callback)
            return [first[0] == channel, first[1]]
        finally:
            await listener.close()
            await sender.close()

    return asyncio.run(main())


# --- raw protocol messages ---------------------------------------------------------------------------------


def _raw(t: Target, script: bytes, readies: int) -> list[tuple[str, bytes]]:
    with rc.RawClient(t.host, t.port, timeout=10) as raw:
        raw.login(t.user, t.password, database=t.database)
        raw.send(script)
        out: list[tuple[str, bytes]] = []
        while readies:
            message = raw.read()
            readies -= message.type == b"Z"
            if message.type in (b"E", b"N"):
                f = message.fields
                out.append((message.type.decode(), f"{f.get('S')} {f.get('C')} {f.get('M')}".encode()))
            else:
                out.append((message.type.decode(), message.payload))
        return out


def _describe(kind: bytes, name: str = "") -> bytes:
    return rc.msg(b"D", kind + rc.cstr(name))


def _close(kind: bytes, name: str) -> bytes:
    return rc.msg(b"C", kind + rc.cstr(name))


@workload("raw protocol", "pipelined extended protocol with named statements")
def raw_pipeline(t: Target) -> Any:
    script = (
        rc.parse("SELECT 41 + 1", "conf_s1") + _describe(b"S", "conf_s1")
        + rc.bind("conf_s1") + _describe(b"P") + rc.execute() + rc.msg(b"H")
        + rc.parse("SELECT 'unnamed'") + rc.bind() + rc.execute() + rc.sync()
        + rc.bind("conf_s1") + rc.execute() + _close(b"S", "conf_s1") + rc.sync()
        + rc.bind("conf_s1") + rc.execute() + rc.sync()
    )  # fmt: skip
    return _raw(t, script, 3)


@workload("raw protocol", "errors mid-batch skip to Sync")
def raw_errors(t: Target) -> Any:
    script = (
        rc.parse("SELECT 1") + rc.bind() + rc.execute()
        + rc.parse("SELEC 2") + rc.bind() + rc.execute() + rc.sync()
        + rc.query("BEGIN") + rc.parse("SELECT 1/0") + rc.bind() + rc.execute() + rc.sync()
        + rc.query("SELECT 1") + rc.query("ROLLBACK") + rc.query("SELECT 'done'")
    )  # fmt: skip
    return _raw(t, script, 6)


# --- pgbench ----------------------------------------------------------------------------------------------


@workload("pgbench", "-M prepared, select-only")
def pgbench_prepared(t: Target) -> Any:
    proc = subprocess.run(
        [str(find_bindir() / "pgbench"), "-n", "-M", "prepared", "-S", "-t", "50", "-c", "2",
         "-h", t.host, "-p", str(t.port), "-U", t.user, t.database],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PGPASSWORD": t.password, "PGSSLMODE": "disable"},
    )  # fmt: skip
    processed = re.search(r"number of transactions actually processed: (\S+)", proc.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", proc.stdout)
    return [proc.returncode, processed and processed.group(1), failed and failed.group(1)]
