"""Pooling edge cases on a single server connection (pool_size 1), each once a real bug: a server handed on
in an aborted transaction, rejections under pipelining, an extended-protocol COPY, parameters reported
after a reset, a Pin decided while waiting for a server, an error while buffered login data is replayed."""

from __future__ import annotations

import pathlib
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from rawclient import RawClient, bind, data_rows, errors, execute, msg, parse, query, startup, sync, terminate
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

PLUGINS_DIR = pathlib.Path(__file__).resolve().parent / "plugins_for_tests"


_open_clients: list[RawClient] = []


@pytest.fixture(autouse=True)
def _test_plugins_and_client_cleanup(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PYTHONPATH", str(PLUGINS_DIR))
    yield
    while _open_clients:
        _open_clients.pop().close()


def _config(pg: Cluster, **database: Any) -> dict[str, Any]:
    db = {"cluster": "main", "pool_size": 1, "checkout_timeout": "2s", **database}
    return default_config(
        pg, databases={"myapp": db}, limits={"connect_timeout": "3s", "login_timeout": "5s"}
    )


def _login(run: Running, **params: str) -> tuple[RawClient, Any]:
    client = RawClient(run.host, run.port, timeout=5)
    _open_clients.append(client)
    return client, client.login("myapp", "myapp", "myapp", extra=params or None)


def test_server_in_an_aborted_transaction_is_never_handed_on(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(_config(pg, server_reset_query=""))  # no reset to hide the problem
    a, _ = _login(run)
    a.simple_query("BEGIN")
    assert [e["C"] for e in errors(a.simple_query("DECLARE c CURSOR WITH HOLD FOR SELECT 1"))] == ["0A000"]
    a.send(terminate())
    a.close()
    time.sleep(0.3)
    b, _ = _login(run)
    out = b.simple_query("SELECT 1")
    assert errors(out) == [] and data_rows(out) == [["1"]]
    assert_clean_servers(pg.primary)


def test_a_client_gone_with_pipelined_queries_unread_frees_its_server(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # The client queues far more than the sockets hold and reads nothing: halephant stops reading from the
    # server, whose backend blocks sending results, so it no longer reads what is queued for it either.
    run = halephant.start(_config(pg))
    a, _ = _login(run)
    marker = "edges_unread_pipeline"
    one_query = query(f"SELECT repeat('x', 100000) AS {marker}")  # 50 bytes in, 100 kB out
    a.sock.setblocking(False)
    batch, pending = one_query * 50, b""
    sent, deadline = 0, time.monotonic() + 3
    moved = time.monotonic()
    # until everything on the way is stuck (nothing taken for half a second), a limit, or 3 s
    while sent < 64 * 1024 * 1024 and time.monotonic() < deadline and time.monotonic() - moved < 0.5:
        pending = pending or batch  # whole messages only: a partial send goes on where it stopped
        try:
            n = a.sock.send(pending)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        sent += n
        pending = pending[n:]
        moved = time.monotonic()
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()  # a reset, as from a killed process
    busy = (
        f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%AS {marker}%' AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + 10
    while pg.primary.sql(busy) != "0":
        assert time.monotonic() < deadline, "the server of the client that left is still running its query"
        time.sleep(0.2)
    b, _ = _login(run)  # the pool's one server was replaced
    out = b.simple_query("SELECT 1")
    assert errors(out) == [] and data_rows(out) == [["1"]]
    assert_clean_servers(pg.primary)


def test_rejection_behind_pipelined_queries_keeps_its_own_error(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(_config(pg))
    c, _ = _login(run)
    c.send(
        query("SELECT 1") + query("SELECT pg_sleep(0.3)") + query("DECLARE c CURSOR WITH HOLD FOR SELECT 1")
    )
    out = c.read_until_ready() + c.read_until_ready() + c.read_until_ready()
    assert [e["C"] for e in errors(out)] == ["0A000"]


def test_rejection_while_a_large_row_is_in_flight(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg))
    c, _ = _login(run)
    c.simple_query("BEGIN")
    c.send(query("SELECT repeat('0', 4000000)"))
    time.sleep(0.5)  # the proxy is in the middle of the DataRow: the client is not reading
    c.send(query("DECLARE c CURSOR WITH HOLD FOR SELECT 1"))
    first = c.read_until_ready(timeout=10)
    assert errors(first) == [] and len(data_rows(first)[0][0]) == 4000000
    assert [e["C"] for e in errors(c.read_until_ready(timeout=10))] == ["0A000"]
    c.simple_query("ROLLBACK")
    assert_clean_servers(pg.primary)


def test_extended_protocol_copy_in_gives_the_server_back(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg))
    a, _ = _login(run)
    a.simple_query("CREATE TABLE IF NOT EXISTS edges_copy (n int)")
    a.send(parse("COPY edges_copy FROM STDIN") + bind() + execute() + sync())
    a.read_until(b"G")
    a.send(msg(b"d", b"1\n") + msg(b"c") + sync())  # what libpq sends: a Sync after CopyDone
    assert errors(a.read_until_ready()) == []
    b, _ = _login(run)  # the only server must be free again
    out = b.simple_query("SELECT count(*) FROM edges_copy")
    assert errors(out) == [] and int(data_rows(out)[0][0]) >= 1
    b.simple_query("DROP TABLE edges_copy")
    assert_clean_servers(pg.primary)


def test_parameters_reported_at_login_are_the_servers_after_a_reset(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(_config(pg, mode="session"))
    a, told_a = _login(run, TimeZone="Asia/Tokyo", client_encoding="LATIN1")
    assert (told_a.params["TimeZone"], told_a.params["client_encoding"]) == ("Asia/Tokyo", "LATIN1")
    a.send(terminate())
    a.close()
    time.sleep(0.3)
    b, told_b = _login(run)
    rows = data_rows(b.simple_query("SELECT current_setting('TimeZone'), current_setting('client_encoding')"))
    assert [told_b.params["TimeZone"], told_b.params["client_encoding"]] == rows[0]


def test_pin_decided_while_waiting_for_a_server_is_kept(pg: Cluster, halephant: HalephantFactory) -> None:
    config = _config(pg)
    config["plugins"] = {"modules": ["pin_on_marker"]}
    run = halephant.start(config)
    a, _ = _login(run)
    b, _ = _login(run)
    x, _ = _login(run)
    a.simple_query("BEGIN")  # a holds the only server
    b.send(query("SELECT 'pinme'"))  # b waits: the Pin is decided now, applied when a server comes
    time.sleep(0.3)
    a.simple_query("COMMIT")
    assert errors(b.read_until_ready()) == []
    assert [e["C"] for e in errors(x.simple_query("SELECT 1"))] == ["53300"]  # b keeps the server
    assert "pinned to server" in run.log_text()


def test_error_in_data_buffered_during_login_reaches_the_client(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    config = _config(pg)
    config["users"] = {"trustuser": {"auth": "trust"}}
    run = halephant.start(config)
    client = RawClient(run.host, run.port, timeout=3)
    _open_clients.append(client)
    # a startup setting makes login wait for a settings query; a bogus message waits behind it
    client.send(
        startup({"user": "trustuser", "database": "myapp", "application_name": "x"}) + b"\x01\x00\x00\x00\x00"
    )
    messages, closed = client.read_all(timeout=3)
    assert closed and [m.fields.get("C") for m in messages if m.type == b"E"] == ["08P01"]
    assert "Traceback" not in run.log_text()


@pytest.mark.parametrize("second", ["query", "batch"])
def test_a_plain_statement_waiting_for_a_server_keeps_what_follows_it(
    pg: Cluster, halephant: HalephantFactory, second: str
) -> None:
    # The short path for a plain statement sends it as it is when a server comes, unless more arrived
    # while it waited: then everything goes, in order.
    run = halephant.start(_config(pg))
    a, _ = _login(run)
    b, _ = _login(run)
    a.simple_query("BEGIN")  # holds the only server
    b.send(query("SELECT 1"))
    time.sleep(0.2)  # b waits with its plain statement
    if second == "query":
        b.send(query("SELECT 2"))
    else:
        b.send(parse("SELECT 2") + bind() + execute() + sync())
    time.sleep(0.2)
    a.simple_query("COMMIT")
    out = b.read_until_ready() + b.read_until_ready()
    assert errors(out) == [] and data_rows(out) == [["1"], ["2"]]
    assert data_rows(b.simple_query("SELECT 3")) == [["3"]]
    assert_clean_servers(pg.primary)


def test_a_plain_batch_waiting_for_a_server_is_sent_whole(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(_config(pg))
    a, _ = _login(run)
    b, _ = _login(run)
    a.simple_query("BEGIN")
    b.send(parse("SELECT 41 + 1") + bind() + msg(b"D", b"P\0") + execute() + sync())
    time.sleep(0.2)
    a.simple_query("COMMIT")
    out = b.read_until_ready()
    assert errors(out) == [] and data_rows(out) == [["42"]]
    assert [m.type for m in out][:2] == [b"1", b"2"]  # ParseComplete, BindComplete: the whole batch ran
    assert_clean_servers(pg.primary)
