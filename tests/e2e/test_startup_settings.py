"""Startup parameters reach the server in transaction pooling, as they would connected directly, and a bad
one is refused at login with PostgreSQL's own SQLSTATE."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import psycopg.errors
import pytest
from rawclient import RawClient, data_rows, query
from support.halephant import HalephantFactory, default_config
from support.leaks import assert_clean_servers
from support.polling import wait_until

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e


def test_each_client_sees_its_own_startup_settings_on_a_shared_server(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(default_config(pg, databases={"myapp": {"pool_size": 1}}))
    paris = psycopg.connect(
        run.dsn(options="-c TimeZone=Europe/Paris", application_name="paris"), autocommit=True
    )
    plain = psycopg.connect(run.dsn(), autocommit=True)
    with paris, plain:
        for _ in range(3):  # alternate on the single server connection
            assert paris.execute("SHOW TimeZone").fetchone() == ("Europe/Paris",)
            assert paris.execute("SHOW application_name").fetchone() == ("paris",)
            assert plain.execute("SHOW TimeZone").fetchone() != ("Europe/Paris",)
            # none sent: PostgreSQL's default, as connected directly (not the other client's)
            assert plain.execute("SHOW application_name").fetchone() == ("",)
        assert paris.info.parameter_status("TimeZone") == "Europe/Paris"
        assert plain.info.parameter_status("application_name") == ""
    assert_clean_servers(pg.primary)


def test_client_encoding_is_reported_as_postgresql_normalizes_it(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(default_config(pg))
    with psycopg.connect(run.dsn(client_encoding="utf-8"), autocommit=True) as conn:
        assert conn.info.parameter_status("client_encoding") == "UTF8"


def test_a_login_with_startup_settings_seen_before_needs_no_server(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    # Drivers send startup settings (application_name at least). A login with settings took a server to
    # check and report them, every time: with every server in a transaction it waited, and a client
    # that blocks on its next connection while its other connections hold those transactions (pgbench -C
    # -j 1, more clients than servers) waited into checkout_timeout. Settings PostgreSQL accepted once
    # are told from then on as PgBouncer tells them, from what it learnt.
    run = halephant.start(default_config(pg, databases={"myapp": {"pool_size": 1, "checkout_timeout": "2s"}}))
    dsn = run.dsn(options="-c TimeZone=Asia/Tokyo", application_name="batch")
    with psycopg.connect(dsn, autocommit=True) as first:  # takes a server to check them: learnt
        assert first.info.parameter_status("TimeZone") == "Asia/Tokyo"
    holder = psycopg.connect(run.dsn(), autocommit=True)
    try:
        holder.execute("BEGIN")  # the only server, in a transaction
        started = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as again:
            assert time.monotonic() - started < 1
            assert again.info.parameter_status("TimeZone") == "Asia/Tokyo"
            assert again.info.parameter_status("application_name") == "batch"
            # settings never seen before still take a server: this login waits into checkout_timeout
            with pytest.raises(psycopg.OperationalError, match="checkout timeout"):
                psycopg.connect(run.dsn(options="-c TimeZone=Europe/Oslo"))
            holder.execute("COMMIT")
            # and the settings are the session's, as ever
            assert again.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
            assert again.execute("SHOW application_name").fetchone() == ("batch",)
    finally:
        holder.close()
    # a bad setting is still refused at login, by PostgreSQL
    with pytest.raises(psycopg.OperationalError, match="invalid value for parameter"):
        psycopg.connect(run.dsn(options="-c TimeZone=Nowhere/Never"))
    assert_clean_servers(pg.primary)


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_application_name_add_host_says_which_client_ran_what(
    pg: Cluster, halephant: HalephantFactory, mode: str
) -> None:
    run = halephant.start(
        default_config(
            pg,
            databases={
                "myapp": {
                    "pool_size": 1 if mode == "transaction" else 2,
                    "mode": mode,
                    "application_name_add_host": True,
                    "checkout_timeout": "2s",
                }
            },
        )
    )
    first = psycopg.connect(run.dsn(application_name="billing"), autocommit=True)
    if mode == "transaction":
        # what the first login was told is kept under the name the client gave: a second client of
        # that name (from another port) logs in while the only server is busy, without one
        first.execute("BEGIN")
        started = time.monotonic()
        second = psycopg.connect(run.dsn(application_name="billing"), autocommit=True)
        assert time.monotonic() - started < 1
        first.execute("COMMIT")
    else:
        second = psycopg.connect(run.dsn(application_name="billing"), autocommit=True)
    unnamed = psycopg.connect(run.dsn(), autocommit=True) if mode == "transaction" else None
    with first, second:
        for conn in (first, second):
            host, port = _local_address(conn)
            expected = f"billing - {host}:{port}"
            # what the client is told, what it reads, and what pg_stat_activity shows of its server
            assert conn.info.parameter_status("application_name") == expected
            row = conn.execute(
                "SELECT current_setting('application_name'), application_name FROM pg_stat_activity "
                "WHERE pid = pg_backend_pid()"
            ).fetchone()
            assert row == (expected, expected)
        if unnamed is not None:
            with unnamed:
                host, port = _local_address(unnamed)
                assert unnamed.execute("SHOW application_name").fetchone() == (f" - {host}:{port}",)
        # a SET afterwards is the client's own, as PgBouncer leaves it
        first.execute("SET application_name = 'renamed'")
        assert first.execute("SHOW application_name").fetchone() == ("renamed",)
    assert_clean_servers(pg.primary)


def _local_address(conn: psycopg.Connection[Any]) -> tuple[str, int]:
    """The client side of `conn`'s TCP connection: what halephant sees as the client's address."""
    import socket

    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        host, port = sock.getsockname()[:2]
    finally:
        sock.close()
    return host, port


def test_unknown_setting_is_refused_at_login(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(default_config(pg))
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(run.dsn(options="-c no_such_setting=1"))
    assert 'unrecognized configuration parameter "no_such_setting"' in str(info.value)
    with psycopg.connect(run.dsn(), autocommit=True) as conn:  # everyone else is still served
        assert conn.execute("select 1").fetchone() == (1,)
    assert_clean_servers(pg.primary)


def test_a_cancel_that_comes_while_the_settings_are_applied_waits_for_them(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    """A client's statement goes out behind halephant's query that applies its startup settings. A cancel
    that came while that query ran cancelled it instead, and the statement then ran without the
    client's settings (here: it read another client's). The settings query is made to wait on a lock
    of the catalog it reads, so that the cancel comes exactly then."""
    sql = superuser_dsn(pg)
    run = halephant.start(default_config(pg, databases={"myapp": {"pool_size": 1}}))
    own = psycopg.connect(run.dsn(options="-c default_text_search_config=public.hal_cancel"), autocommit=True)
    other = psycopg.connect(run.dsn(), autocommit=True)
    show = "SHOW default_text_search_config"
    try:
        assert own.execute(show).fetchone() == ("public.hal_cancel",)
        assert other.execute(show).fetchone() == ("pg_catalog.english",)  # the one server: set back
        with settings_query_blocked(sql) as locker, ThreadPoolExecutor(2) as threads:
            answer = threads.submit(lambda: own.execute(show).fetchone())
            wait_until(lambda: "waiting" in server_state(sql), "the settings query waits on the lock")
            cancelled = threads.submit(own.cancel_safe)  # (cancel() holds the GIL while it waits)
            time.sleep(0.5)  # the cancel reached halephant (which holds it: nothing to see here)
            locker.rollback()
            cancelled.result(timeout=10)
            try:
                got = answer.result(timeout=10)
            except psycopg.errors.QueryCanceled:
                got = None  # the statement itself was cancelled: as the client asked
        assert got in (("public.hal_cancel",), None)
        assert own.execute(show).fetchone() == ("public.hal_cancel",)
        assert other.execute(show).fetchone() == ("pg_catalog.english",)
    finally:
        own.close()
        other.close()
    assert "cancel request held until halephant's own query" in run.log_text()
    assert_clean_servers(pg.primary)


def test_a_statement_never_runs_behind_a_settings_query_that_failed(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    """An operator's pg_cancel_backend can hit halephant's query that applies a client's settings (here it
    waits on a lock of the catalog it reads). The client's statement, sent behind it, then ran with the
    settings the previous client left on that server. It waits for that query's answer now: the client
    is told it failed and its statement runs nowhere."""
    sql = superuser_dsn(pg)
    run = halephant.start(default_config(pg, databases={"myapp": {"pool_size": 1}}))
    own = psycopg.connect(run.dsn(options="-c default_text_search_config=public.hal_cancel"), autocommit=True)
    german = "-c default_text_search_config=pg_catalog.german"
    other = psycopg.connect(run.dsn(options=german), autocommit=True)
    show = "SHOW default_text_search_config"
    try:
        assert own.execute(show).fetchone() == ("public.hal_cancel",)
        assert other.execute(show).fetchone() == ("pg_catalog.german",)  # the one server: its settings now
        with (
            settings_query_blocked(sql) as locker,
            psycopg.connect(sql, autocommit=True) as admin,
            ThreadPoolExecutor(1) as threads,
        ):
            answer = threads.submit(lambda: own.execute(show).fetchone())
            wait_until(lambda: "waiting" in server_state(sql), "the settings query waits on the lock")
            admin.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                " WHERE usename = 'myapp' AND wait_event_type = 'Lock'"
            )
            try:
                got = answer.result(timeout=10)
            except psycopg.OperationalError as exc:
                got = exc.sqlstate
            locker.rollback()
        assert got == "57014"  # not ("pg_catalog.german",): the other client's
        assert other.execute(show).fetchone() == ("pg_catalog.german",)
    finally:
        own.close()
        other.close()
    assert_clean_servers(pg.primary)


def test_what_a_client_sends_while_its_settings_are_applied_follows_its_statement(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    """The statement waits for the query that applies the client's settings, and so does what the client
    pipelines behind it meanwhile: both run, in order, with its settings, once that query has answered."""
    sql = superuser_dsn(pg)
    run = halephant.start(default_config(pg, databases={"myapp": {"pool_size": 1}}))
    other = psycopg.connect(run.dsn(), autocommit=True)
    show = "SHOW default_text_search_config"
    with RawClient(run.host, run.port, timeout=10) as own, other:
        own.login(
            "myapp", "myapp", "myapp", extra={"options": "-c default_text_search_config=public.hal_cancel"}
        )
        assert data_rows(own.simple_query(show)) == [["public.hal_cancel"]]
        assert other.execute(show).fetchone() == ("pg_catalog.english",)
        with settings_query_blocked(sql) as locker:
            own.send(query(show))
            wait_until(lambda: "waiting" in server_state(sql), "the settings query waits on the lock")
            own.send(query("SELECT 2"))  # a chunk of its own, while the statement before it waits
            time.sleep(0.2)
            locker.rollback()
        answers = own.read_until_ready() + own.read_until_ready()
        assert data_rows(answers) == [["public.hal_cancel"], ["2"]]
        assert other.execute(show).fetchone() == ("pg_catalog.english",)
    assert_clean_servers(pg.primary)


def test_a_cancel_still_on_its_way_never_reaches_the_next_clients_statement(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    """A cancel is forwarded while its client's statement runs, but PostgreSQL signals the backend only
    later: the statement may end first, and the server go to another client, whose settings query or
    statement the signal then cancelled (seen in a soak: the statement then ran with the first client's
    settings). The server waits for the cancel to be delivered before it serves anyone else. PostgreSQL's
    postmaster, stopped here, is what delivers it."""
    postmaster = int((pg.primary.datadir / "postmaster.pid").read_text().split()[0])
    run = halephant.start(default_config(pg, databases={"myapp": {"pool_size": 1}}))
    first = psycopg.connect(run.dsn(application_name="first"), autocommit=True)
    second = psycopg.connect(run.dsn(application_name="second"), autocommit=True)
    try:
        assert first.execute("SELECT 1").fetchone() == (1,)
        with ThreadPoolExecutor(3) as threads:
            slept = threads.submit(lambda: first.execute("SELECT 1 FROM pg_sleep(0.5)").fetchone())
            time.sleep(0.1)  # the statement runs
            os.kill(postmaster, signal.SIGSTOP)
            try:
                cancelled = threads.submit(first.cancel_safe)
                wait_until(lambda: "forwarding cancel request" in run.log_text(), "the cancel is forwarded")
                assert slept.result(timeout=10) == (1,)  # it ended before PostgreSQL took the cancel
                mine = "SELECT current_setting('application_name') FROM pg_sleep(1)"
                answer = threads.submit(lambda: second.execute(mine).fetchone())
                time.sleep(0.3)
            finally:
                os.kill(postmaster, signal.SIGCONT)
            cancelled.result(timeout=10)
            assert answer.result(timeout=10) == ("second",)
        assert first.execute("SELECT current_setting('application_name')").fetchone() == ("first",)
    finally:
        first.close()
        second.close()
    assert_clean_servers(pg.primary)


def superuser_dsn(pg: Cluster) -> str:
    """The primary's superuser over its unix socket, in myapp, where the text search configuration
    `public.hal_cancel` has just been made afresh (a client's setting the tests below apply)."""
    primary = pg.primary
    sql = f"host={primary.sockdir} port={primary.port} user=postgres dbname=myapp"
    with psycopg.connect(sql, autocommit=True) as admin:
        admin.execute("DROP TEXT SEARCH CONFIGURATION IF EXISTS public.hal_cancel")
        admin.execute("CREATE TEXT SEARCH CONFIGURATION public.hal_cancel (COPY = pg_catalog.simple)")
    return sql


@contextlib.contextmanager
def settings_query_blocked(sql: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection whose open transaction makes halephant's query that sets default_text_search_config
    to public.hal_cancel wait (on a lock of pg_ts_config) until it ends (`rollback()`)."""
    with psycopg.connect(sql) as locker:
        # renamed there and back: the servers' cached entry is gone, so setting it reads the catalog
        locker.execute("ALTER TEXT SEARCH CONFIGURATION public.hal_cancel RENAME TO hal_cancel2")
        locker.execute("ALTER TEXT SEARCH CONFIGURATION public.hal_cancel2 RENAME TO hal_cancel")
        locker.commit()
        locker.execute("LOCK TABLE pg_catalog.pg_ts_config IN ACCESS EXCLUSIVE MODE")
        yield locker


def server_state(dsn: str) -> str:
    """How the backends of user myapp wait: their wait events, joined."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT coalesce(wait_event_type, '') || ':' || state FROM pg_stat_activity"
            " WHERE usename = 'myapp' AND backend_type = 'client backend'"
        ).fetchall()
    return " ".join(row[0] for row in rows) + (
        " waiting" if any(r[0].startswith("Lock:") for r in rows) else ""
    )
