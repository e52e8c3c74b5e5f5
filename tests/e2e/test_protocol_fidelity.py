"""End to end: COPY, FunctionCall, NOTICE, large results and errors inside an extended-protocol batch behave
through halephant (transaction and session pooling) as they do connected directly.

Raw message scripts are sent to PostgreSQL directly and through halephant, and the answers compared
message by message. A 1 GB result streams through halephant while its resident memory is sampled.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import time
from typing import Any

import psycopg
import psycopg.errors
import pytest
import rawclient as rc
from rawclient import RawClient
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

MODES = ["transaction", "session"]


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    return module_halephant.start(
        default_config(
            pg,
            databases={
                "transaction": {"cluster": "main", "database": "myapp", "pool_size": 2},
                "session": {"cluster": "main", "database": "myapp", "mode": "session", "pool_size": 3},
                "single": {"cluster": "main", "database": "myapp", "pool_size": 1, "checkout_timeout": "2s"},
            },
        )
    )


@pytest.fixture(scope="module", autouse=True)
def table(pg: Cluster, hal: Running) -> None:
    pg.primary.sql("CREATE TABLE IF NOT EXISTS fidelity_copy (n int, t text)", dbname="myapp")
    pg.primary.sql("GRANT ALL ON fidelity_copy TO PUBLIC", dbname="myapp")


def connect(hal: Running, mode: str) -> psycopg.Connection[Any]:
    return psycopg.connect(hal.dsn(dbname=mode), autocommit=True, connect_timeout=5)


def raw_script(host: str, port: int, database: str, script: bytes) -> list[tuple[bytes, bytes]]:
    """Send `script` after login, read up to the last ReadyForQuery it asks for; (type, payload) pairs
    with error fields reduced to severity, SQLSTATE and message."""
    syncs = script.count(b"S\x00\x00\x00\x04") + _queries(script)
    if b"COPY fidelity_copy FROM STDIN\x00\x00\x00B" in script:
        syncs -= 1  # the Sync behind an extended-protocol COPY FROM STDIN is ignored by PostgreSQL
    with RawClient(host, port) as raw:
        raw.login("myapp", "myapp", database=database)
        raw.send(script)
        out: list[tuple[bytes, bytes]] = []
        while syncs:
            message = raw.read(timeout=10)
            if message.type == b"Z":
                syncs -= 1
            if message.type in (b"E", b"N"):
                f = message.fields
                out.append((message.type, f"{f.get('S')} {f.get('C')} {f.get('M')}".encode()))
            else:
                out.append((message.type, message.payload))
        return out


def _queries(script: bytes) -> int:
    n = pos = 0
    while pos < len(script):
        (length,) = struct.unpack_from("!i", script, pos + 1)
        n += script[pos : pos + 1] in (b"Q", b"F")
        pos += 1 + length
    return n


def function_call(oid: int, *args: bytes) -> bytes:
    body = struct.pack("!ih", oid, 1) + struct.pack("!h", 0) + struct.pack("!h", len(args))
    for arg in args:
        body += struct.pack("!i", len(arg)) + arg
    return rc.msg(b"F", body + struct.pack("!h", 0))


SCRIPTS = {
    "error_mid_batch_skips_to_sync": (
        rc.parse("SELECT 1") + rc.bind() + rc.execute()
        + rc.parse("SELEC broken") + rc.bind() + rc.execute()
        + rc.parse("SELECT 2") + rc.bind() + rc.execute() + rc.sync()
        + rc.parse("SELECT 3") + rc.bind() + rc.execute() + rc.sync()
    ),
    "error_in_a_transaction_batch": (
        rc.query("BEGIN")
        + rc.parse("SELECT 1/0") + rc.bind() + rc.execute() + rc.sync()
        + rc.query("SELECT 1") + rc.query("ROLLBACK") + rc.query("SELECT 'after'")
    ),
    "bind_unknown_statement": rc.bind("no_such_statement") + rc.execute() + rc.sync() + rc.query("SELECT 4"),
    "function_call": function_call(177, b"40", b"2") + rc.query("SELECT 5"),  # int4pl(40, 2)
    "notice": rc.query("DO $$BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END$$"),
    "copy_out": rc.query("COPY (SELECT g, 'row ' || g FROM generate_series(1, 3) g) TO STDOUT"),
    "copy_in": (
        rc.query("COPY fidelity_copy FROM STDIN") + rc.msg(b"d", b"1\tone\n") + rc.msg(b"d", b"2\ttwo\n")
        + rc.msg(b"c") + rc.query("SELECT count(*) > 0 FROM fidelity_copy")
    ),
    "copy_fail": (
        rc.query("COPY fidelity_copy FROM STDIN") + rc.msg(b"d", b"3\tthree\n") + rc.msg(b"f", b"given up\0")
        + rc.query("SELECT 6")
    ),
    "copy_in_extended": (
        rc.parse("COPY fidelity_copy FROM STDIN") + rc.bind() + rc.execute() + rc.sync()
        + rc.msg(b"d", b"7\tseven\n") + rc.msg(b"c") + rc.sync() + rc.query("SELECT 7")
    ),
}  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_raw_message_sequences_match_direct(pg: Cluster, hal: Running, mode: str, name: str) -> None:
    script = SCRIPTS[name]
    direct = raw_script(pg.primary.host, pg.primary.port, "myapp", script)
    pooled = raw_script(hal.host, hal.port, mode, script)
    assert pooled == direct
    assert_clean_servers(pg.primary)


@pytest.mark.parametrize("mode", MODES)
def test_copy_with_psycopg(pg: Cluster, hal: Running, mode: str) -> None:
    with connect(hal, mode) as conn:
        table = "fidelity_copy"
        with conn.transaction():
            conn.execute(f"DELETE FROM {table} WHERE n >= 1000")
            with conn.cursor().copy(f"COPY {table} (n, t) FROM STDIN") as copy:
                for n in range(1000, 3000):
                    copy.write_row((n, f"value {n}"))
        out = io.BytesIO()
        query = f"COPY (SELECT n, t FROM {table} WHERE n >= 1000 ORDER BY n) TO STDOUT"
        with conn.cursor().copy(query) as copy:
            for data in copy:
                out.write(data)
        lines = out.getvalue().decode().splitlines()
        assert len(lines) == 2000 and lines[0] == "1000\tvalue 1000"
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("DO $$BEGIN RAISE NOTICE 'from the server'; END$$")
        assert notices == ["from the server"]
        conn.execute(f"DELETE FROM {table} WHERE n >= 1000")
    assert_clean_servers(pg.primary)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("mode", MODES)
def test_a_1_gb_result_streams_without_growing_halephant(pg: Cluster, hal: Running, mode: str) -> None:
    pid = hal.proc.pid
    with RawClient(hal.host, hal.port, timeout=30) as raw:
        raw.login("myapp", "myapp", database=mode)
        raw.simple_query("SELECT 1")  # warm: the server exists and halephant's buffers are made
        before = _rss_kib(pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kib(pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            raw.send(rc.query("SELECT repeat('x', 1000) FROM generate_series(1, 1000000)"))
            time.sleep(0.5)  # a slow reader at first: halephant must stop reading the server meanwhile
            total = 0
            sock = raw.sock
            tail = b""
            while not tail.endswith(b"Z\x00\x00\x00\x05I"):
                chunk = sock.recv(1 << 20)
                assert chunk, "connection closed"
                total += len(chunk)
                tail = (tail + chunk)[-6:]
        finally:
            done.set()
            sampler.join()
        assert total > 1_000_000 * 1000
        growth_mib = (peak[0] - before) / 1024
        assert growth_mib < 4, f"halephant grew by {growth_mib:.1f} MiB while streaming 1 GB"
        assert [m.type for m in raw.simple_query("SELECT 1")] == [b"T", b"D", b"C", b"Z"]
    assert_clean_servers(pg.primary)


def test_a_client_still_streaming_into_a_failed_copy_is_read_on(pg: Cluster, hal: Running) -> None:
    # PostgreSQL answers a failed COPY FROM STDIN at once (ErrorResponse, ReadyForQuery) and drops the
    # CopyData that keeps coming until the client sees the error. The server goes back to the pool at
    # that ReadyForQuery, while CopyData the server was slow to take still waits in halephant and the
    # client's reading is stopped (backpressure): it must be read again once that data is gone, though
    # it is no longer linked to that server, or the client, blocked sending, waits forever.
    pg.primary.sql("CREATE TABLE IF NOT EXISTS fidelity_unique (n int PRIMARY KEY)", dbname="myapp")
    pg.primary.sql("GRANT ALL ON fidelity_unique TO PUBLIC", dbname="myapp")
    rows = b"".join(rc.msg(b"d", b"1\n") for _ in range(1_000_000))  # 6 MB, a duplicate key from row 2
    with psycopg.connect(pg.primary.dsn("myapp", "myapp", "myapp"), autocommit=True) as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE fidelity_unique")  # the COPY waits: its data piles up in halephant
        with RawClient(hal.host, hal.port, timeout=30) as raw:
            raw.login("myapp", "myapp", database="transaction")
            raw.send(rc.query("COPY fidelity_unique FROM STDIN"))  # answered once the lock is gone
            sent = threading.Event()

            def stream() -> None:
                with contextlib.suppress(OSError):
                    for _ in range(4):  # more than the kernel's socket buffers hold on the way
                        raw.sock.sendall(rows)
                    raw.sock.sendall(rc.msg(b"c") + rc.query("SELECT 'after the copy'"))
                    sent.set()

            sender = threading.Thread(target=stream, daemon=True)
            sender.start()
            time.sleep(0.5)
            assert not sent.is_set(), "halephant took everything without pushing back"
            locker.execute("ROLLBACK")
            assert raw.read().type == b"G"
            assert rc.errors(raw.read_until_ready())[0]["C"] == "23505"
            assert sent.wait(10), "the client was never read again after its COPY failed"
            assert rc.data_rows(raw.read_until_ready()) == [["after the copy"]]
            sender.join()
    assert_clean_servers(pg.primary)


def test_a_large_error_is_not_held_after_it_was_relayed(pg: Cluster, hal: Running) -> None:
    # An ErrorResponse is copied out as it passes (its SQLSTATE matters to halephant); one that spans
    # chunks is gathered in a buffer, which was kept with the server connection after use, as large as
    # the message (up to 1 GB), until another such message came.
    pid = hal.proc.pid
    with RawClient(hal.host, hal.port, timeout=30) as raw:
        raw.login("myapp", "myapp", database="session")  # the same server throughout
        raw.simple_query("SELECT 1")
        before = _rss_kib(pid)
        raw.send(rc.query("DO $$BEGIN RAISE EXCEPTION '%', repeat('e', 30000000); END$$"))
        received = b""
        while not received.endswith(b"Z\x00\x00\x00\x05I"):
            chunk = raw.sock.recv(1 << 20)
            assert chunk, "connection closed"
            received = (received + chunk)[-6:]
        assert raw.simple_query("SELECT 1")[-1].payload == b"I"
        time.sleep(0.2)
        held_mib = (_rss_kib(pid) - before) / 1024
    assert held_mib < 10, f"halephant still holds {held_mib:.1f} MiB after relaying a 30 MB error"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_large_message_from_a_client_costs_time_in_proportion_to_its_size(
    pg: Cluster, hal: Running
) -> None:
    # A 32 MB row of COPY data, sent as drivers send it, in pieces: gathered by copying everything so far
    # at every piece, it cost halephant seconds of CPU (quadratic in its size) while every other client
    # waited; gathered in place it costs about what reading and writing it once does.
    size = 32 << 20
    row = rc.msg(b"d", b"41\t" + b"x" * size + b"\n")
    with RawClient(hal.host, hal.port, timeout=30) as raw:
        raw.login("myapp", "myapp", database="transaction")
        raw.simple_query("SELECT 1")
        raw.send(rc.query("COPY fidelity_copy FROM STDIN"))
        assert raw.read().type == b"G"
        before = _cpu_seconds(hal.proc.pid)
        for i in range(0, len(row), 1 << 16):
            raw.send(row[i : i + (1 << 16)])
        raw.send(rc.msg(b"c"))
        assert [m.type for m in raw.read_until_ready()] == [b"C", b"Z"]
        spent = _cpu_seconds(hal.proc.pid) - before
        assert raw.simple_query("SELECT length(t) FROM fidelity_copy WHERE n = 41")[1].payload.endswith(
            str(size).encode()
        )
        raw.simple_query("DELETE FROM fidelity_copy WHERE n = 41")
    assert spent < 0.6, f"halephant spent {spent:.2f} s of CPU on one 32 MB message"
    assert_clean_servers(pg.primary)


#: the first message of a transaction whose replies halephant frames message by message, not only scans
SLOW_PATHS = {
    # a client that names its statements: their replies are spliced with halephant's own
    "named_statement": rc.parse("SELECT repeat('x', 40000000)", name="big") + rc.bind("big") + rc.execute()
    + rc.sync(),
    # a rejection in place is in flight behind the row: the server's error for it is replaced
    "rejection_behind": rc.query("BEGIN") + rc.query("SELECT repeat('x', 40000000)")
    + rc.query("DECLARE held CURSOR WITH HOLD FOR SELECT 1") + rc.query("ROLLBACK"),
}  # fmt: skip


@pytest.mark.parametrize("path", list(SLOW_PATHS))
def test_a_large_row_streams_where_halephant_frames_replies(pg: Cluster, hal: Running, path: str) -> None:
    # Framed whole, a 40 MB DataRow was held in halephant (and copied at every chunk, quadratic in its
    # size) while it read the server on regardless of a client that read nothing.
    script = SLOW_PATHS[path]
    pid = hal.proc.pid
    with RawClient(hal.host, hal.port, timeout=30) as raw:
        raw.login("myapp", "myapp", database="transaction")
        raw.simple_query("SELECT 1")
        before = _rss_kib(pid)
        raw.send(script)
        time.sleep(0.5)  # not reading: halephant must stop reading the server
        peak = _rss_kib(pid)
        # read as it comes, walking the message headers (RawClient gathers whole messages)
        expected = _queries(script) + script.count(rc.sync())
        types: list[bytes] = []
        pending = b""
        skip = 0
        while types.count(b"Z") < expected:
            chunk = raw.sock.recv(1 << 20)
            assert chunk, "connection closed"
            peak = max(peak, _rss_kib(pid))
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            pending += chunk[skip:]
            skip = 0
            while len(pending) >= 5:
                (length,) = struct.unpack_from("!i", pending, 1)
                types.append(pending[:1])
                if length + 1 > len(pending):
                    skip, pending = length + 1 - len(pending), b""
                else:
                    pending = pending[length + 1 :]
        assert raw.simple_query("SELECT 1")[-1].payload == b"I"
    if path == "rejection_behind":
        assert types == [b"C", b"Z", b"T", b"D", b"C", b"Z", b"E", b"Z", b"C", b"Z"]
    growth_mib = (peak - before) / 1024
    assert growth_mib < 16, f"halephant grew by {growth_mib:.1f} MiB relaying a 40 MB row"
    assert_clean_servers(pg.primary)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("after", ["begin_and_batch", "batch_without_sync", "copy_in"])
def test_a_client_that_leaves_mid_pipeline_leaves_no_dirty_server(
    pg: Cluster, hal: Running, mode: str, after: str
) -> None:
    scripts = {
        "begin_and_batch": rc.query("BEGIN") + rc.parse("SELECT pg_advisory_xact_lock(9001)") + rc.bind()
        + rc.execute(),
        "batch_without_sync": rc.parse("SELECT pg_sleep(0.2)") + rc.bind() + rc.execute() + rc.msg(b"H"),
        "copy_in": rc.query("COPY fidelity_copy FROM STDIN") + rc.msg(b"d", b"9\tnine\n"),
    }  # fmt: skip
    raw = RawClient(hal.host, hal.port)
    raw.login("myapp", "myapp", database=mode)
    raw.send(scripts[after])
    time.sleep(0.1)
    raw.close()  # no Sync, no Terminate
    assert_clean_servers(pg.primary, timeout=5)
    with connect(hal, mode) as conn:
        assert conn.execute("SELECT count(*) FROM fidelity_copy WHERE n = 9").fetchone() == (0,)
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("then", ["query", "batch"])
def test_a_copy_pipelined_with_its_data_gives_its_server_back(pg: Cluster, hal: Running, then: str) -> None:
    # A client that sends its COPY data, CopyDone and Sync without waiting for the CopyInResponse, and
    # more behind them. PostgreSQL ignores the Sync behind the Execute (it reaches it in copy-in mode):
    # forgetting every sync point sent so far at the CopyInResponse, halephant kept the server linked
    # after the last ReadyForQuery, and the next client of the pool waited for it in vain (53300).
    batch = rc.parse("SELECT 7") + rc.bind() + rc.execute() + rc.sync()
    behind = rc.query("SELECT 7") if then == "query" else batch
    script = (
        rc.parse("COPY fidelity_copy FROM STDIN") + rc.bind() + rc.execute() + rc.sync()
        + rc.msg(b"d", b"11\televen\n") + rc.msg(b"c") + rc.sync() + behind
    )  # fmt: skip
    with RawClient(hal.host, hal.port) as first, RawClient(hal.host, hal.port) as second:
        first.login("myapp", "myapp", database="single")
        second.login("myapp", "myapp", database="single")
        first.send(script)
        replies = first.read_until_ready() + first.read_until_ready()
        rest = [b"T", b"D", b"C", b"Z"] if then == "query" else [b"1", b"2", b"D", b"C", b"Z"]
        assert [m.type for m in replies] == [b"1", b"2", b"G", b"C", b"Z", *rest]
        assert rc.data_rows(replies) == [["7"]] and replies[-1].payload == b"I"
        assert not rc.errors(second.simple_query("SELECT 1"))
        first.simple_query("DELETE FROM fidelity_copy WHERE n = 11")
    assert_clean_servers(pg.primary)
