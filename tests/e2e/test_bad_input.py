"""End-to-end: hostile and malformed client input against a running halephant in front of real PostgreSQL.

Each case sends raw protocol bytes (built in `rawclient`) and checks the answer against what PostgreSQL
itself does (reference: PostgreSQL 15 measured on raw input) and the SQLSTATEs halephant promises. After
every case the module's halephant must still serve a normal psycopg client, and no server backend may be
left dirty. One halephant serves the whole module to keep the suite fast.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import rawclient as rc
from rawclient import RawClient
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

LOGIN_TIMEOUT = 1.0
MAX_MESSAGE_SIZE = 1024 * 1024


@pytest.fixture(scope="module")
def proxy(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    return module_halephant.start(
        default_config(
            pg,
            databases={"myapp_session": {"cluster": "main", "database": "myapp", "mode": "session"}},
            limits={"max_message_size": "1MB", "login_timeout": f"{LOGIN_TIMEOUT:g}s"},
        )
    )


@pytest.fixture(autouse=True)
def still_serving(pg: Cluster, proxy: Running) -> Iterator[None]:
    """After every case: halephant is alive, serves a normal client, and left no server dirty."""
    yield
    assert proxy.alive, "halephant exited"
    with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert_clean_servers(pg.primary)


def raw(proxy: Running, timeout: float = 5.0) -> RawClient:
    return RawClient(proxy.host, proxy.port, timeout=timeout)


def logged_in(proxy: Running) -> tuple[RawClient, rc.Session]:
    client = raw(proxy)
    session = client.login("myapp", "myapp", "myapp")
    return client, session


def assert_usable(client: RawClient) -> None:
    """The same connection still runs a query and is idle afterwards."""
    answer = client.simple_query("select 42")
    assert rc.errors(answer) == []
    assert rc.data_rows(answer) == [["42"]]
    assert answer[-1].payload == b"I"


def assert_refused(client: RawClient, code: str = "08P01") -> None:
    """Either a FATAL `code` then close, or (as PostgreSQL does for some framing errors) a plain close.

    Anything else, in particular an open connection or a different error, fails.
    """
    messages, closed = client.read_all(timeout=3.0)
    assert closed, f"connection left open; got {messages}"
    for message in messages:
        assert message.type == b"E", messages
        assert message.fields.get("S") == "FATAL", messages
        assert message.fields.get("C") == code, messages


# --- authentication ------------------------------------------------------------------------------------


def _attempt(proxy: Running, user: str, password: str, database: str) -> tuple[list[rc.Message], rc.Message]:
    """A SCRAM login that must fail: the messages up to the error, and the error."""
    with raw(proxy) as client:
        client.send(rc.startup({"user": user, "database": database}))
        with pytest.raises(AssertionError, match="login failed"):
            client.authenticate(user, password)
        seen = client.last_session.messages
        client.expect_closed()
    return seen, seen[-1]


def test_unknown_user_gets_a_scram_exchange_then_28P01(proxy: Running) -> None:
    seen, error = _attempt(proxy, "nobody", "secret", "myapp")
    # a full mock exchange: SASL offered, server-first sent, and only then the failure
    assert [m.auth_code for m in seen if m.type == b"R"] == [rc.AUTH_SASL, rc.AUTH_SASL_CONTINUE]
    assert error.fields["S"] == "FATAL"
    assert error.fields["C"] == "28P01"
    assert error.fields["M"] == 'password authentication failed for user "nobody"'


def test_wrong_password_looks_exactly_like_an_unknown_user(proxy: Running) -> None:
    seen_known, known = _attempt(proxy, "myapp", "wrong", "myapp")
    seen_unknown, unknown = _attempt(proxy, "nobody", "wrong", "myapp")
    assert [m.type for m in seen_known] == [m.type for m in seen_unknown]
    assert known.payload == unknown.payload.replace(b'"nobody"', b'"myapp"')


def test_wrong_password_with_psycopg(proxy: Running) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(password="wrong"), connect_timeout=5)
    assert 'password authentication failed for user "myapp"' in str(info.value)


@pytest.mark.parametrize("user", ["myapp", "nobody"])
@pytest.mark.parametrize(
    "client_first, code",
    [(b"n,,r=abc", "08P01"), (b"x,,n=,r=abc", "08P01"), (b"n,a=b,n=,r=x", "0A000")],
)
def test_malformed_scram_message_is_not_a_wrong_password(
    proxy: Running, user: str, client_first: bytes, code: str
) -> None:
    # PostgreSQL 15 answers these with 08P01 "malformed SCRAM message" (0A000 for an authorization
    # identity), for known and unknown users alike
    with raw(proxy) as client:
        client.send(rc.startup({"user": user, "database": "myapp"}))
        assert client.read().auth_code == rc.AUTH_SASL
        mechanism = b"SCRAM-SHA-256\0"
        client.send(rc.msg(b"p", mechanism + struct.pack("!i", len(client_first)) + client_first))
        error = client.expect_error()
        assert (error.fields["S"], error.fields["C"]) == ("FATAL", code), error
        client.expect_closed()


@pytest.mark.parametrize("user", ["myapp", "nobody"])
def test_channel_binding_data_without_plus_is_malformed_with_postgresql_s_detail(
    proxy: Running, user: str
) -> None:
    # PostgreSQL 15, plaintext connection: FATAL 08P01 "malformed SCRAM message" with this DETAIL
    client_first = b"p=tls-server-end-point,,n=,r=abc"
    with raw(proxy) as client:
        client.send(rc.startup({"user": user, "database": "myapp"}))
        assert client.read().auth_code == rc.AUTH_SASL
        client.send(rc.msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(client_first)) + client_first))
        error = client.expect_error()
        assert (error.fields["S"], error.fields["C"], error.fields["M"]) == (
            "FATAL",
            "08P01",
            "malformed SCRAM message",
        ), error
        assert error.fields["D"] == (
            "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes "
            "channel binding data."
        )
        assert "H" not in error.fields
        client.expect_closed()


def test_unknown_database_is_told_only_after_a_correct_password(proxy: Running) -> None:
    with raw(proxy) as client:
        client.send(rc.startup({"user": "myapp", "database": "nosuchdb"}))
        with pytest.raises(AssertionError, match="login failed"):
            client.authenticate("myapp", "myapp")
        seen = client.last_session.messages
        # the whole SCRAM exchange ran (server-final included) before the database was refused
        assert [m.auth_code for m in seen if m.type == b"R"][:3] == [
            rc.AUTH_SASL, rc.AUTH_SASL_CONTINUE, rc.AUTH_SASL_FINAL,
        ]  # fmt: skip
        error = seen[-1]
        assert (error.fields["S"], error.fields["C"]) == ("FATAL", "3D000")
        assert error.fields["M"] == 'database "nosuchdb" does not exist'
        client.expect_closed()


def test_unknown_database_with_a_wrong_password_says_28P01(proxy: Running) -> None:
    # otherwise database names could be probed without knowing any password
    _, error = _attempt(proxy, "myapp", "wrong", "nosuchdb")
    assert (error.fields["S"], error.fields["C"]) == ("FATAL", "28P01")
    _, error = _attempt(proxy, "nobody", "wrong", "nosuchdb")
    assert (error.fields["S"], error.fields["C"]) == ("FATAL", "28P01")


def test_startup_without_user_is_28000(proxy: Running) -> None:
    with raw(proxy) as client:
        client.send(rc.startup({"database": "myapp"}))
        error = client.expect_fatal_and_close("28000")
        assert error.fields["M"] == "no PostgreSQL user name specified in startup packet"


# --- protocol versions, encryption requests --------------------------------------------------------------


@pytest.mark.parametrize(("major", "minor"), [(2, 0), (4, 0)])
def test_unsupported_protocol_major_is_0A000(proxy: Running, major: int, minor: int) -> None:
    with raw(proxy) as client:
        client.send(rc.startup({"user": "myapp", "database": "myapp"}, major=major, minor=minor))
        error = client.expect_fatal_and_close("0A000")
        assert error.fields["M"].startswith(f"unsupported frontend protocol {major}.{minor}")


def test_replication_f_is_a_normal_login(proxy: Running) -> None:
    with raw(proxy) as client:
        client.login("myapp", "myapp", "myapp", extra={"replication": "f"})
        assert_usable(client)


@pytest.mark.parametrize(("value", "code"), [("x", "22023"), ("database", "0A000"), ("y", "0A000")])
def test_replication_value_is_checked_as_postgresql_does(proxy: Running, value: str, code: str) -> None:
    with raw(proxy) as client:
        client.send(rc.startup({"user": "myapp", "database": "myapp", "replication": value}))
        client.expect_fatal_and_close(code)


def test_protocol_3_2_is_negotiated_down_then_login_works(proxy: Running) -> None:
    with raw(proxy) as client:
        client.send(rc.startup({"user": "myapp", "database": "myapp"}, minor=2))
        session = client.authenticate("myapp", "myapp")
        first = session.messages[0]
        assert first.type == b"v"
        newest, unrecognized = struct.unpack_from("!ii", first.payload)
        assert (newest, unrecognized) == (3 << 16, 0)  # the full version code of 3.0, as PostgreSQL sends
        assert_usable(client)


def test_unknown_protocol_option_is_listed_in_negotiation_then_login_works(proxy: Running) -> None:
    with raw(proxy) as client:
        client.send(rc.startup({"user": "myapp", "database": "myapp", "_pq_.foo": "bar"}))
        session = client.authenticate("myapp", "myapp")
        first = session.messages[0]
        assert first.type == b"v"
        newest, unrecognized = struct.unpack_from("!ii", first.payload)
        assert (newest, unrecognized) == (3 << 16, 1)
        assert first.payload[8:] == b"_pq_.foo\0"
        assert_usable(client)


def test_libpq_asking_for_the_latest_protocol_logs_in(proxy: Running) -> None:
    if psycopg.pq.version() < 180000:
        pytest.skip(f"libpq {psycopg.pq.version()} cannot ask for protocol 3.2 (needs libpq 18)")
    with psycopg.connect(proxy.dsn(max_protocol_version="latest"), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize(
    "request_bytes", [rc.ssl_request(), rc.gssenc_request()], ids=["SSLRequest", "GSSENCRequest"]
)
def test_a_second_encryption_request_of_a_kind_is_0A000(proxy: Running, request_bytes: bytes) -> None:
    # PostgreSQL answers one of each kind, then takes another for an unsupported protocol version
    with raw(proxy) as client:
        client.send(request_bytes)
        assert client.read_byte() == b"N"
        client.send(request_bytes)
        messages, closed = client.read_all(timeout=3.0)
        assert closed and [(m.type, m.fields["S"], m.fields["C"]) for m in messages] == [
            (b"E", "FATAL", "0A000")
        ], messages
        assert "unsupported frontend protocol 1234." in messages[0].fields["M"]


@pytest.mark.parametrize(
    "request_bytes", [rc.ssl_request(), rc.gssenc_request()], ids=["SSLRequest", "GSSENCRequest"]
)
def test_encryption_request_is_declined_then_plain_login_works(proxy: Running, request_bytes: bytes) -> None:
    with raw(proxy) as client:
        client.send(request_bytes)
        assert client.read_byte() == b"N"
        client.login("myapp", "myapp", "myapp")
        assert_usable(client)


def test_gssenc_then_ssl_request_both_declined(proxy: Running) -> None:
    with raw(proxy) as client:
        client.send(rc.gssenc_request())
        assert client.read_byte() == b"N"
        client.send(rc.ssl_request())
        assert client.read_byte() == b"N"
        client.login("myapp", "myapp", "myapp")
        assert_usable(client)


@pytest.mark.parametrize(
    "trailing",
    [
        pytest.param(rc.startup({"user": "myapp", "database": "myapp"}), id="whole-startup"),
        pytest.param(b"\x00\x00\x00", id="three-bytes"),
    ],
)
def test_bytes_behind_an_ssl_request_are_08P01(proxy: Running, trailing: bytes) -> None:
    # CVE-2021-23222 shape: bytes sent before the TLS answer would be taken as if they were protected.
    # PostgreSQL answers the request, then refuses: "received unencrypted data after SSL request";
    # refusing without the 'N' is as good.
    with raw(proxy) as client:
        client.send(rc.ssl_request() + trailing)
        client.skip_byte(b"N")
        messages, closed = client.read_all(timeout=3.0)
        assert closed, f"still open after {messages}"
        assert [(m.type, m.fields.get("S"), m.fields.get("C")) for m in messages] == [
            (b"E", "FATAL", "08P01")
        ], messages


# --- malformed startup packets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!ii", 4, 3 << 16),
        struct.pack("!i", 4),  # the length alone: refused without waiting for the code
        struct.pack("!ii", 7, 3 << 16),
        struct.pack("!ii", 20000, 3 << 16) + b"user\0",
        struct.pack("!ii", 2**31 - 1, 3 << 16),
        struct.pack("!i", -1) + b"\0\0\0\0",
        rc.msg(b"p", b"password\0"),  # a PasswordMessage before any startup packet
    ],
    ids=["len-4", "len-4-alone", "len-7", "len-20000", "len-2^31-1", "len-negative", "password-first"],
)
def test_bad_startup_length_is_refused_at_once(proxy: Running, data: bytes) -> None:
    with raw(proxy) as client:
        t0 = time.monotonic()
        client.send(data)
        assert_refused(client)
        # at once: not left open until the login timeout
        assert time.monotonic() - t0 < LOGIN_TIMEOUT * 0.8


@pytest.mark.parametrize(
    "body",
    [
        b"user\0myapp\0database\0myapp\0",  # no final NUL
        b"user\0myapp\0database\0",  # odd number of strings
        b"user\0myapp",  # the last string unterminated
    ],
    ids=["no-final-nul", "odd-count", "unterminated"],
)
def test_bad_startup_layout_is_08P01(proxy: Running, body: bytes) -> None:
    with raw(proxy) as client:
        client.send(rc.packet(3 << 16, body))
        error = client.expect_fatal_and_close("08P01")
        assert "invalid startup packet layout" in error.fields["M"]


@pytest.mark.parametrize("sent", [b"\x00\x00", b""], ids=["half-header", "nothing"])
def test_silent_client_is_closed_after_login_timeout(proxy: Running, sent: bytes) -> None:
    with raw(proxy, timeout=LOGIN_TIMEOUT + 3) as client:
        t0 = time.monotonic()
        client.send(sent)
        messages, closed = client.read_all()
        elapsed = time.monotonic() - t0
        assert closed
        assert LOGIN_TIMEOUT * 0.8 <= elapsed <= LOGIN_TIMEOUT + 1.5, elapsed
        assert [(m.type, m.fields.get("S")) for m in messages] == [(b"E", "FATAL")], messages
        assert messages[0].fields["C"] == "57014"


def test_client_stalling_mid_authentication_is_closed_after_login_timeout(proxy: Running) -> None:
    with raw(proxy, timeout=LOGIN_TIMEOUT + 3) as client:
        t0 = time.monotonic()
        client.send(rc.startup({"user": "myapp", "database": "myapp"}))
        assert client.read().auth_code == rc.AUTH_SASL
        messages, closed = client.read_all()
        assert closed
        assert time.monotonic() - t0 <= LOGIN_TIMEOUT + 1.5
        assert [m.fields.get("S") for m in messages] == ["FATAL"], messages


# --- after login: framing -------------------------------------------------------------------------------


def test_unknown_message_type_is_08P01(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.msg(b"Y", b"hello"))
        error = client.expect_error()
        # PostgreSQL: FATAL 08P01 "invalid frontend message type 89"; from halephant or passed through
        assert (error.fields["S"], error.fields["C"]) == ("FATAL", "08P01"), error
        assert "invalid frontend message type" in error.fields["M"]
        client.expect_closed()


def test_unknown_message_type_inside_a_transaction_is_08P01(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        assert client.simple_query("begin")[-1].payload == b"T"
        client.send(rc.msg(b"Y", b"hello"))
        error = client.expect_error()
        assert (error.fields["S"], error.fields["C"]) == ("FATAL", "08P01"), error
        client.expect_closed()


def test_password_message_after_login_is_08P01(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.msg(b"p", b"myapp\0"))
        error = client.expect_error()
        assert (error.fields["S"], error.fields["C"]) == ("FATAL", "08P01"), error
        client.expect_closed()


@pytest.mark.parametrize("length", [0, 3, -1], ids=["0", "3", "negative"])
def test_message_length_below_4_is_08P01(proxy: Running, length: int) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.msg(b"Q", b"select 1\0", length=length))
        client.expect_fatal_and_close("08P01")


def test_message_above_max_message_size_is_08P01_and_others_keep_working(proxy: Running) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        other.execute("select 1")
        client, _ = logged_in(proxy)
        with client:
            t0 = time.monotonic()
            # only the header and a little of the body: the limit applies before buffering the rest
            client.send(rc.msg(b"Q", b"select 1", length=2 * MAX_MESSAGE_SIZE))
            error = client.expect_fatal_and_close("08P01")
            assert time.monotonic() - t0 < 2.0
            assert "too large" in error.fields["M"] or "length" in error.fields["M"]
        assert other.execute("select 2").fetchone() == (2,)


def test_message_just_under_max_message_size_works(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        padding = MAX_MESSAGE_SIZE - 100
        answer = client.simple_query("select length('" + "x" * padding + "')")
        assert rc.errors(answer) == []
        assert rc.data_rows(answer) == [[str(padding)]]


@pytest.mark.parametrize("database", ["myapp", "myapp_session"])
def test_a_query_pipelined_behind_the_last_scram_message_is_answered(proxy: Running, database: str) -> None:
    with raw(proxy) as client:
        client.send(rc.startup({"user": "myapp", "database": database}))
        client.authenticate("myapp", "myapp", pipelined=rc.query("select 42"))
        answer = client.read_until_ready()
        assert rc.errors(answer) == []
        assert rc.data_rows(answer) == [["42"]]
        assert_usable(client)


def test_a_password_message_pipelined_behind_the_last_scram_message_is_08P01(proxy: Running) -> None:
    with raw(proxy) as client:
        client.send(rc.startup({"user": "myapp", "database": "myapp"}))
        client.authenticate("myapp", "myapp", pipelined=rc.msg(b"p", b"myapp\0"))
        client.expect_fatal_and_close("08P01")


def test_second_startup_message_after_login_is_08P01(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.startup({"user": "myapp", "database": "myapp"}))
        # PostgreSQL refuses on the type byte alone, without waiting for a body
        error = client.expect_error(timeout=2.0)
        assert (error.fields["S"], error.fields["C"]) == ("FATAL", "08P01"), error
        client.expect_closed()


# --- after login: messages PostgreSQL answers and survives ----------------------------------------------


def test_query_without_its_nul_is_an_error_and_the_session_continues(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.msg(b"Q", b"select 1"))
        answer = client.read_until_ready()
        errors = rc.errors(answer)
        # PostgreSQL: ERROR 08P01 "invalid string in message", then ReadyForQuery; the session goes on
        assert [(e["S"], e["C"]) for e in errors] == [("ERROR", "08P01")], answer
        assert answer[-1].payload == b"I"
        assert_usable(client)


def test_bind_to_an_unknown_statement_is_26000_and_the_session_continues(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.bind("no_such_statement") + rc.execute() + rc.sync())
        answer = client.read_until_ready()
        assert [(e["S"], e["C"]) for e in rc.errors(answer)] == [("ERROR", "26000")], answer
        assert answer[-1].payload == b"I"
        assert_usable(client)


def test_execute_without_bind_is_34000_and_the_session_continues(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.execute("no_such_portal") + rc.sync())
        answer = client.read_until_ready()
        assert [(e["S"], e["C"]) for e in rc.errors(answer)] == [("ERROR", "34000")], answer
        assert_usable(client)


def test_copy_data_outside_copy_is_ignored(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.msg(b"d", b"stray row\n") + rc.msg(b"c") + rc.query("select 7"))
        answer = client.read_until_ready()
        assert rc.errors(answer) == []
        assert rc.data_rows(answer) == [["7"]]
        assert_usable(client)


def test_sync_alone_gets_ready_for_query(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.sync())
        answer = client.read_until_ready()
        assert [m.type for m in answer] == [b"Z"]
        assert answer[-1].payload == b"I"
        assert_usable(client)


@pytest.mark.parametrize("type_", [b"S", b"H"], ids=["Sync", "Flush"])
def test_sync_or_flush_with_a_body_is_08P01_and_the_session_continues(proxy: Running, type_: bytes) -> None:
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.msg(type_, b"x") + rc.sync() + rc.query("select 7"))
        answer = client.read_until(b"C")
        # PostgreSQL: ERROR 08P01 "invalid message format" (then, after Flush, skips to the Sync)
        assert [(e["S"], e["C"]) for e in rc.errors(answer)] == [("ERROR", "08P01")], answer
        assert rc.data_rows(answer) == [["7"]]
        client.read_until_ready()
        assert_usable(client)


def test_error_mid_pipeline_skips_to_sync(proxy: Running) -> None:
    client, _ = logged_in(proxy)
    with client:
        batch = rc.parse("select 1/0") + rc.bind() + rc.execute() + rc.parse("select 2") + rc.bind()
        client.send(batch + rc.execute() + rc.sync() + rc.parse("select 3") + rc.bind() + rc.execute())
        client.send(rc.sync())
        first = client.read_until_ready()
        assert [e["C"] for e in rc.errors(first)] == ["22012"]
        assert rc.data_rows(first) == []
        second = client.read_until_ready()
        assert rc.errors(second) == []
        assert rc.data_rows(second) == [["3"]]
        assert_usable(client)


def test_client_that_reads_none_of_its_answers_is_not_read_either(proxy: Running) -> None:
    # Halephant answers each unnamed Bind (26000) and Sync (ReadyForQuery) itself: about ten times the
    # bytes sent. A backend whose client reads nothing blocks sending and reads nothing more; so must
    # halephant, or those answers pile up in its memory as fast as the client can send (half a GB in
    # ten seconds, measured).
    client, _ = logged_in(proxy)
    with client:
        batch = rc.bind() + rc.sync()
        stream = batch * 1000
        sent = client.send_until_not_read(stream)
        # then it reads: every answer arrives, in order, and the session goes on
        batches = -(-sent // len(batch))
        client.sock.settimeout(30.0)
        rest = batch[sent % len(batch) :] if sent % len(batch) else b""
        writer = threading.Thread(target=client.sock.sendall, args=(rest + rc.query("select 42"),))
        writer.start()
        answers = bytearray()
        end = rc.msg(b"C", b"SELECT 1\0") + rc.msg(b"Z", b"I")
        while not answers.endswith(end):
            chunk = client.sock.recv(1 << 20)
            assert chunk, "closed"
            answers += chunk
        writer.join()
        assert answers.count(b"C26000\0") == batches
        assert answers.count(rc.msg(b"Z", b"I")) == batches + 1
        assert_usable(client)


# --- cancel requests ---------------------------------------------------------------------------------------


def _cancel(proxy: Running, process_id: int, secret_key: int) -> None:
    with raw(proxy) as canceller:
        canceller.send(rc.cancel_request(process_id, secret_key))
        messages, closed = canceller.read_all(timeout=3.0)
        assert closed and messages == [], "a CancelRequest is answered by closing, silently"


def wait_running(pg: Cluster, query: str, timeout: float = 3.0) -> None:
    """Return once `query` runs on the primary (so that a cancel has something to hit)."""
    literal = query.replace("'", "''")
    deadline = time.monotonic() + timeout
    while pg.primary.sql(f"SELECT count(*) FROM pg_stat_activity WHERE query = '{literal}'") == "0":
        assert time.monotonic() < deadline, f"{query!r} did not start"
        time.sleep(0.02)


def test_cancel_with_a_bogus_key_cancels_nothing(pg: Cluster, proxy: Running) -> None:
    client, session = logged_in(proxy)
    with client:
        sql = "select pg_sleep(1), 'done'"
        client.send(rc.query(sql))
        wait_running(pg, sql)
        _cancel(proxy, session.process_id, session.secret_key ^ 0x5A5A5A5A)
        _cancel(proxy, session.process_id + 100000, session.secret_key)
        answer = client.read_until_ready()
        assert rc.errors(answer) == []
        assert rc.data_rows(answer) == [["", "done"]]


def test_cancel_with_the_right_key_cancels_that_query(pg: Cluster, proxy: Running) -> None:
    # the positive control for the test above: the same request with the right key does cancel
    client, session = logged_in(proxy)
    with client:
        sql = "select pg_sleep(5)"
        client.send(rc.query(sql))
        wait_running(pg, sql)
        _cancel(proxy, session.process_id, session.secret_key)
        answer = client.read_until_ready(timeout=4.0)
        assert [e["C"] for e in rc.errors(answer)] == ["57014"]
        assert_usable(client)


def test_truncated_cancel_request_is_closed(proxy: Running) -> None:
    with raw(proxy) as client:
        client.send(rc.packet(rc.CANCEL_REQUEST_CODE, b"\0\0\0\1"))
        assert_refused(client)


# --- load ------------------------------------------------------------------------------------------------


def _garbage(kind: int, rng: random.Random) -> bytes:
    if kind == 0:
        return rng.randbytes(rng.randint(1, 200))
    if kind == 1:
        return b"\x00\x00"  # half a header, then silence until the login timeout
    if kind == 2:
        return struct.pack("!ii", rng.choice([0, 5, 10001, 2**31 - 1]), 3 << 16)
    if kind == 3:
        return rc.startup({"user": "myapp", "database": "myapp"}) + rng.randbytes(50)
    if kind == 4:
        return rc.ssl_request() + rng.randbytes(20)
    return rc.startup({"user": "nobody", "database": "myapp"}, major=rng.choice([1, 2, 4, 1234]))


def test_fifty_garbage_connections_do_not_disturb_a_normal_client(proxy: Running) -> None:
    stop = threading.Event()
    failures: list[BaseException] = []
    done = 0

    def normal_client() -> None:
        nonlocal done
        try:
            with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as conn:
                while not stop.is_set():
                    assert conn.execute("select %s::int", (done,)).fetchone() == (done,)
                    done += 1
        except BaseException as exc:
            failures.append(exc)

    def garbage_client(n: int) -> None:
        rng = random.Random(n)
        try:
            with socket.create_connection((proxy.host, proxy.port), timeout=LOGIN_TIMEOUT + 3) as sock:
                sock.sendall(_garbage(n % 6, rng))
                while sock.recv(4096):
                    pass
        except OSError:
            pass  # a reset is a fine answer to garbage

    worker = threading.Thread(target=normal_client)
    worker.start()
    attackers = [threading.Thread(target=garbage_client, args=(n,)) for n in range(50)]
    for t in attackers:
        t.start()
    for t in attackers:
        t.join(timeout=LOGIN_TIMEOUT + 5)
    stop.set()
    worker.join(timeout=10)
    assert not any(t.is_alive() for t in attackers), "a garbage connection was left open"
    assert failures == []
    assert done > 10


# --- a malformed message behind valid ones ---------------------------------------------------------------

#: malformed messages, each FATAL 08P01 on its own (see the tests above)
MALFORMED = {
    "unknown type": rc.msg(b"Y", b"hello"),
    "length below 4": rc.msg(b"Q", b"select 1\0", length=3),
    "length above max_message_size": rc.msg(b"Q", b"select 1", length=2 * MAX_MESSAGE_SIZE),
}


@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_messages_before_a_malformed_one_are_answered_first(proxy: Running, bad: bytes) -> None:
    # PostgreSQL reads message by message: it runs and answers every complete message that came before
    # the malformed one, even in the same packet, and only then ends the session
    client, _ = logged_in(proxy)
    with client:
        client.send(rc.query("select 1") + bad)
        messages, closed = client.read_all(timeout=3.0)
    assert closed, messages
    assert [message.type for message in messages] == [b"T", b"D", b"C", b"Z", b"E"], messages
    assert rc.data_rows(messages) == [["1"]]
    assert (messages[-1].fields["S"], messages[-1].fields["C"]) == ("FATAL", "08P01"), messages


@pytest.mark.parametrize("database", ["myapp", "myapp_session"])
def test_an_extended_batch_before_a_malformed_message_is_answered_first(
    proxy: Running, database: str
) -> None:
    client = raw(proxy)
    with client:
        client.login("myapp", "myapp", database)
        batch = rc.parse("select 2") + rc.bind() + rc.execute() + rc.sync()
        client.send(batch + MALFORMED["unknown type"])
        messages, closed = client.read_all(timeout=3.0)
    assert closed, messages
    assert [message.type for message in messages] == [b"1", b"2", b"D", b"C", b"Z", b"E"], messages
    assert (messages[-1].fields["S"], messages[-1].fields["C"]) == ("FATAL", "08P01"), messages


@pytest.mark.parametrize("database", ["myapp", "myapp_session"])
def test_a_transaction_left_open_by_a_malformed_message_never_commits(
    pg: Cluster, proxy: Running, database: str
) -> None:
    table = f"bad_input_open_{database}"
    pg.primary.sql(
        f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int)", dbname="myapp", user="myapp"
    )
    client = raw(proxy)
    with client:
        client.login("myapp", "myapp", database)
        pid = rc.data_rows(client.simple_query("select pg_backend_pid()"))[0][0]
        sent = rc.query("begin") + rc.query(f"insert into {table} values (1)") + MALFORMED["length below 4"]
        client.send(sent)
        messages, closed = client.read_all(timeout=3.0)
    assert closed, messages
    assert [message.type for message in messages] == [b"C", b"Z", b"C", b"Z", b"E"], messages
    assert messages[2].payload == b"INSERT 0 1\0"
    assert messages[3].payload == b"T"  # the transaction was open when the malformed message came
    assert (messages[-1].fields["S"], messages[-1].fields["C"]) == ("FATAL", "08P01"), messages
    # the server holding the open transaction was closed (it rolled back), never handed on
    gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
    deadline = time.monotonic() + 5
    while pg.primary.sql(gone) != "0":
        assert time.monotonic() < deadline, "the server with the open transaction is still there"
        time.sleep(0.05)
    assert pg.primary.sql(f"SELECT count(*) FROM {table}", dbname="myapp", user="myapp") == "0"
    assert_clean_servers(pg.primary)
