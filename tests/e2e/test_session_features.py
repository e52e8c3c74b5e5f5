"""End to end: the session-feature table of a transaction pool (pin / reject / emulate), its release,
emulated LISTEN and SQL PREPARE, and a plugin overriding a row.

Databases with a single server connection and a 500 ms `checkout_timeout` make a pin visible: while one
client holds the server, another one's query fails with 53300; once the feature is released it runs.
After every test no server may be left in a transaction or holding an advisory lock.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator
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

PLUGINS_DIR = pathlib.Path(__file__).resolve().parent / "plugins_for_tests"


def _db(**extra: Any) -> dict[str, Any]:
    # A server handed on with the pin would reach the waiter at once: waiting longer shows nothing more.
    return {"cluster": "main", "database": "myapp", "pool_size": 1, "checkout_timeout": "500ms", **extra}


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    config = default_config(
        pg,
        databases={
            "one": _db(),
            "strict": _db(),
            "holdpin": _db(session_features={"with_hold": "pin", "load": "pin"}),
            "rejecting": _db(
                session_features={"advisory_locks": "reject", "listen": "reject", "prepare": "reject"}
            ),
        },
        plugins={"modules": ["override_session_features", "pin_on_marker"]},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(PLUGINS_DIR))
        return module_halephant.start(config)


@pytest.fixture(autouse=True)
def clean_afterwards(pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(pg.primary)


def connect(hal: Running, dbname: str = "one", **params: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(hal.dsn(dbname=dbname, **params), autocommit=True, connect_timeout=5)


def one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def assert_waits_for_the_server(conn: psycopg.Connection[Any]) -> None:
    """The pool's single server is held by another client: this one's query times out (53300)."""
    with pytest.raises(psycopg.errors.TooManyConnections):
        conn.execute("SELECT 1")


def advisory_locks(pg: Cluster) -> int:
    return int(pg.primary.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"))


# --- pin until released ----------------------------------------------------------------------------------


def test_advisory_lock_pins_the_client_until_it_unlocks(pg: Cluster, hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        a.execute("SELECT pg_advisory_lock(7001)")
        pid = one(a, "SELECT pg_backend_pid()")
        with a.transaction():
            assert one(a, "SELECT pg_backend_pid()") == pid
        assert (
            pg.primary.sql(f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = {pid}")
            == "1"
        )
        assert_waits_for_the_server(b)
        # two locks, one unlock: still held, still pinned
        a.execute("SELECT pg_advisory_lock(7002)")
        a.execute("SELECT pg_advisory_unlock(7001)")
        assert_waits_for_the_server(b)
        a.execute("SELECT pg_advisory_unlock(7002)")
        assert one(b, "SELECT 1") == 1  # released: the server went back
        assert advisory_locks(pg) == 0


def test_features_of_prepared_statements_pin_and_release_when_they_run(pg: Cluster, hal: Running) -> None:
    # prepared at once (Parse), then run by Bind/Execute alone, as drivers run the statements they cache
    a = psycopg.connect(hal.dsn(dbname="one"), autocommit=True, connect_timeout=5, prepare_threshold=0)
    with a, connect(hal) as b:
        for _ in range(2):  # the second round runs statements the server already has
            a.execute("SELECT pg_advisory_lock(%s)", [7003])
            pid = one(a, "SELECT pg_backend_pid()")
            assert_waits_for_the_server(b)  # `a` holds the lock: never handed to `b` with it
            a.execute("SELECT pg_advisory_unlock(%s)", [7003])
            assert one(b, "SELECT pg_backend_pid()") == pid  # released when it ran, not when prepared
            assert advisory_locks(pg) == 0
        a.execute("CREATE TEMP TABLE e2e_feature_prepared (n int)")
        assert_waits_for_the_server(b)
        a.execute("DROP TABLE e2e_feature_prepared")
        assert one(b, "SELECT to_regclass('pg_temp.e2e_feature_prepared') IS NULL") is True
        a.execute("PREPARE e2e_prepared_plan AS SELECT 42")  # SQL PREPARE, itself a prepared statement
        assert one(b, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'e2e_prepared_plan'") == 0
        assert one(a, "EXECUTE e2e_prepared_plan") == 42
        a.execute("DEALLOCATE e2e_prepared_plan")


@pytest.mark.parametrize(
    ("take", "release", "held"),
    [
        (
            "SELECT pg_advisory_lock(7101)",
            "SELECT pg_advisory_unlock(7101)",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
        ),
        (
            "CREATE TEMP TABLE e2e_feature_again (n int)",
            "DROP TABLE e2e_feature_again",
            "SELECT count(*) FROM pg_class WHERE relname = 'e2e_feature_again' AND relpersistence = 't'",
        ),
    ],
    ids=["advisory_lock", "temp_table"],
)
def test_a_feature_taken_again_right_after_its_release_is_never_handed_on(
    pg: Cluster, hal: Running, take: str, release: str, held: str
) -> None:
    # The release is confirmed by reading the server's state back after its transaction; the client's
    # next statement, sent as soon as it has its answer, takes the feature again meanwhile. That read-back
    # must not count as the release of the feature taken again.
    for _ in range(10):
        with connect(hal) as a:
            a.execute(take)
            a.execute(release)
            a.execute(take)
        # `a` left holding it: its server is reset (or closed) before anyone else gets it
        deadline = time.monotonic() + 3
        while pg.primary.sql(held) != "0" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pg.primary.sql(held) == "0"


def test_temp_table_pins_until_dropped(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        a.execute("CREATE TEMP TABLE e2e_feature_tmp (n int)")
        a.execute("INSERT INTO e2e_feature_tmp VALUES (1)")
        assert one(a, "SELECT count(*) FROM e2e_feature_tmp") == 1
        assert_waits_for_the_server(b)
        a.execute("DROP TABLE e2e_feature_tmp")
        assert one(b, "SELECT to_regclass('pg_temp.e2e_feature_tmp') IS NULL") is True


@pytest.mark.parametrize(
    "select_into",
    [
        "SELECT 1 AS n INTO TEMP e2e_feature_into",
        "select 1 as n into local temporary table e2e_feature_into",
        "WITH s AS (SELECT 1 AS n) SELECT n INTO pg_temp.e2e_feature_into FROM s",
    ],
)
def test_select_into_temp_pins_until_dropped(hal: Running, select_into: str) -> None:
    # a plain-looking SELECT that leaves a temporary table: never handed on with it
    with connect(hal) as a, connect(hal) as b:
        a.execute(select_into)
        assert one(a, "SELECT count(*) FROM e2e_feature_into") == 1
        assert_waits_for_the_server(b)
        a.execute("DROP TABLE e2e_feature_into")
        assert one(b, "SELECT to_regclass('pg_temp.e2e_feature_into') IS NULL") is True


def test_temp_table_on_commit_drop_does_not_pin(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        with a.transaction():
            a.execute("CREATE TEMP TABLE e2e_feature_tx (n int) ON COMMIT DROP")
        assert one(b, "SELECT 1") == 1


def test_set_role_pins_until_reset(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        a.execute("SET ROLE myapp")
        assert_waits_for_the_server(b)
        a.execute("RESET ROLE")
        assert one(b, "SELECT current_user") == "myapp"


def test_holdable_cursor_pinned_by_its_row_until_closed(hal: Running) -> None:
    with connect(hal, "holdpin") as a, connect(hal, "holdpin") as b:
        a.execute("DECLARE e2e_hold CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g")
        assert one(a, "FETCH NEXT FROM e2e_hold") == 1
        with a.transaction():
            assert one(a, "FETCH NEXT FROM e2e_hold") == 2
        assert_waits_for_the_server(b)
        a.execute("CLOSE e2e_hold")
        assert one(b, "SELECT count(*) FROM pg_cursors") == 0


def test_a_pinned_client_that_leaves_gets_a_targeted_reset_not_a_new_server(
    pg: Cluster, hal: Running
) -> None:
    with connect(hal) as a:
        pid = one(a, "SELECT pg_backend_pid()")
        a.execute("SELECT pg_advisory_lock(7003)")
        a.execute("CREATE TEMP TABLE e2e_feature_left (n int)")
        a.execute("SET work_mem = '19MB'")
    with connect(hal) as b:
        assert one(b, "SELECT pg_backend_pid()") == pid
        assert one(b, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
        assert one(b, "SELECT to_regclass('pg_temp.e2e_feature_left') IS NULL") is True
        assert one(b, "SELECT setting = reset_val FROM pg_settings WHERE name = 'work_mem'") is True


def test_a_loaded_library_closes_the_server_when_its_client_leaves(pg: Cluster, hal: Running) -> None:
    with connect(hal, "holdpin") as a:
        pid = one(a, "SELECT pg_backend_pid()")
        try:
            a.execute("LOAD 'plpgsql'")
        except psycopg.Error:
            pass  # not allowed for this role: pinned all the same, halephant cannot tell what happened
    deadline = time.monotonic() + 3
    while pg.primary.sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") != "0":
        assert time.monotonic() < deadline, "the server a LOAD ran on was handed on"
        time.sleep(0.05)


# --- reject ---------------------------------------------------------------------------------------------


def test_load_is_rejected_by_default_with_a_hint(hal: Running) -> None:
    with connect(hal) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute("LOAD 'plpgsql'")
        assert "LOAD" in (info.value.diag.message_primary or "")
        assert "session_features.load" in (info.value.diag.message_hint or "")
        assert one(conn, "SELECT 1") == 1


@pytest.mark.parametrize(
    "sql", ["SELECT pg_advisory_lock(1)", "LISTEN e2e_rejected", "PREPARE e2e_rejected AS SELECT 1"]
)
def test_rows_set_to_reject_answer_0A000(hal: Running, sql: str) -> None:
    with connect(hal, "rejecting") as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(sql)
        assert "transaction pooling" in (info.value.diag.message_primary or "")
        assert "databases.rejecting.mode: session" in (info.value.diag.message_hint or "")
        assert one(conn, "SELECT 1") == 1
        assert one(conn, "SELECT count(*) FROM pg_prepared_statements") == 0


def test_a_plugin_overrides_rows_of_the_table(pg: Cluster, hal: Running) -> None:
    with connect(hal, "strict") as a, connect(hal, "strict") as b:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="no advisory locks here"):
            a.execute("SELECT pg_advisory_lock(7004)")
        # LISTEN pinned instead of emulated: the client's own server listens
        a.execute("LISTEN e2e_strict")
        assert one(a, "SELECT count(*) FROM pg_listening_channels()") == 1
        assert_waits_for_the_server(b)
        b.close()
        with connect(hal) as other:
            other.execute("NOTIFY e2e_strict, 'direct'")
        received = list(a.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload) for n in received] == [("e2e_strict", "direct")]
        a.execute("UNLISTEN *")
        with connect(hal, "strict") as c:
            assert one(c, "SELECT count(*) FROM pg_listening_channels()") == 0


# --- emulated LISTEN --------------------------------------------------------------------------------------


def test_listen_is_emulated_without_pinning(pg: Cluster, hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        a.execute("LISTEN e2e_chan")
        # the single server is free for others, and does not listen itself
        assert one(b, "SELECT count(*) FROM pg_listening_channels()") == 0
        sender_pid = one(b, "SELECT pg_backend_pid()")
        b.execute("NOTIFY e2e_chan, 'hello'")
        received = list(a.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload, n.pid) for n in received] == [("e2e_chan", "hello", sender_pid)]
        b.execute("SELECT pg_notify('e2e_chan', 'second')")
        assert [n.payload for n in a.notifies(timeout=10, stop_after=1)] == ["second"]
        a.execute("UNLISTEN e2e_chan")
        b.execute("NOTIFY e2e_chan, 'unheard'")
        assert list(a.notifies(timeout=0.5)) == []


def test_notifications_reach_a_latin1_client_in_its_encoding(hal: Running) -> None:
    # the shared listener receives them in UTF-8; PostgreSQL sends each client its own client_encoding
    with connect(hal, client_encoding="LATIN1") as a, connect(hal) as b:
        a.execute('LISTEN "e2e_café"')
        assert one(b, "SELECT count(*) FROM pg_listening_channels()") == 0  # the shared listener's work
        b.execute("NOTIFY \"e2e_café\", 'crème brûlée'")
        received = list(a.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload) for n in received] == [("e2e_café", "crème brûlée")]
        a.execute('UNLISTEN "e2e_café"')


def test_listen_in_a_transaction_takes_effect_at_commit_only(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        a.execute("BEGIN")
        a.execute('LISTEN "E2E Mixed"')
        a.execute("ROLLBACK")
        b.execute("NOTIFY \"E2E Mixed\", 'after rollback'")
        assert list(a.notifies(timeout=0.5)) == []
        with a.transaction():
            a.execute('LISTEN "E2E Mixed"')
        b.execute("NOTIFY \"E2E Mixed\", 'after commit'")
        assert [(n.channel, n.payload) for n in a.notifies(timeout=10, stop_after=1)] == [
            ("E2E Mixed", "after commit")
        ]


def test_notifications_wait_while_the_client_is_in_a_transaction(hal: Running) -> None:
    with connect(hal, "holdpin") as a, connect(hal) as b:
        received: list[str] = []
        # a handler sees notifications whenever they arrive, also in the middle of another command
        a.add_notify_handler(lambda n: received.append(n.payload))
        a.execute("LISTEN e2e_wait")
        a.execute("BEGIN")
        a.execute("SELECT 1")
        b.execute("NOTIFY e2e_wait, 'later'")
        time.sleep(0.3)
        assert one(a, "SELECT 2") == 2  # the notification did not cut into this answer
        assert received == []
        a.execute("COMMIT")
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
            a.execute("SELECT 1")  # the handler runs for what arrived meanwhile
        time.sleep(0.2)
        a.execute("SELECT 1")
        assert received == ["later"]


def _listener_stopped(pg: Cluster, channel: str) -> bool:
    """Some shared listener's last query was the UNLISTEN of `channel` (waits up to 5 s)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stopped = pg.primary.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'halephant listener'"
            f" AND query = 'UNLISTEN \"{channel}\"'"
        )
        if int(stopped):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["rolled back", "undone", "client gone"])
def test_a_listen_that_does_not_last_leaves_nothing_on_the_shared_listener(
    pg: Cluster, hal: Running, how: str
) -> None:
    channel = f"e2e_orphan_{how.replace(' ', '_')}"
    a = connect(hal)
    try:
        a.execute("BEGIN")
        a.execute(f"LISTEN {channel}")  # the shared listener starts listening ahead of need
        if how == "rolled back":
            a.execute("ROLLBACK")
        elif how == "undone":
            a.execute(f"UNLISTEN {channel}")
            a.execute("COMMIT")
    finally:
        a.close()  # "client gone": in the middle of its transaction (close() does not commit)
    assert _listener_stopped(pg, channel)


@pytest.mark.parametrize(
    ("statements", "delivered"),
    [
        (["BEGIN", "UNLISTEN {ch}", "ROLLBACK"], True),
        (["BEGIN", "UNLISTEN *", "SELECT 1/0", "COMMIT"], True),  # COMMIT of a failed transaction
        (["UNLISTEN {ch}; SELECT 1/0"], True),  # one implicit transaction, rolled back by its error
        (["BEGIN", "UNLISTEN {ch}", "COMMIT"], False),
        (["UNLISTEN {ch}"], False),
    ],
    ids=["rolled back", "failed", "implicit failed", "committed", "autocommit"],
)
def test_an_unlisten_takes_effect_when_its_transaction_commits(
    hal: Running, statements: list[str], delivered: bool
) -> None:
    channel = "e2e_unlisten_" + str(abs(hash(tuple(statements))) % 10_000)
    with connect(hal) as a:
        a.execute(f"LISTEN {channel}")
        for sql in statements:
            try:
                a.execute(sql.format(ch=channel))
            except psycopg.errors.DivisionByZero:
                pass
        with connect(hal, "strict") as sender:
            sender.execute(f"NOTIFY {channel}, 'after'")
        got = [n.payload for n in a.notifies(timeout=1.5 if delivered else 0.5, stop_after=1)]
        assert got == (["after"] if delivered else [])


def test_a_rolled_back_listen_keeps_the_channel_of_another_client(pg: Cluster, hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        b.execute("LISTEN e2e_shared_keep")
        a.execute("BEGIN")
        a.execute("LISTEN e2e_shared_keep")
        a.execute("ROLLBACK")
        with connect(hal, "strict") as sender:
            sender.execute("NOTIFY e2e_shared_keep, 'still'")
        assert [n.payload for n in b.notifies(timeout=10, stop_after=1)] == ["still"]
        assert list(a.notifies(timeout=0.3)) == []


def test_one_shared_listener_serves_every_client(pg: Cluster, hal: Running) -> None:
    clients = [connect(hal) for _ in range(3)]
    try:
        for n, conn in enumerate(clients):
            conn.execute(f"LISTEN e2e_many_{n % 2}")
        listeners = pg.primary.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'halephant listener'"
            " AND datname = 'myapp'"
        )
        assert int(listeners) >= 1
        with connect(hal, "strict") as sender:
            sender.execute("NOTIFY e2e_many_0, 'zero'")
        for conn in (clients[0], clients[2]):
            assert [n.payload for n in conn.notifies(timeout=10, stop_after=1)] == ["zero"]
        assert list(clients[1].notifies(timeout=0.3)) == []
    finally:
        for conn in clients:
            conn.close()


def test_a_client_that_never_reads_its_notifications_is_cut_off(pg: Cluster, hal: Running) -> None:
    raw = RawClient(hal.host, hal.port, timeout=10)
    with raw:
        raw.login("myapp", "myapp", database="one")
        raw.simple_query("LISTEN e2e_flood")
        # never read while 21 MB of notifications arrive: halephant's queue for it must stay bounded
        with connect(hal) as sender:
            for n in range(30):
                # distinct payloads: PostgreSQL folds identical notifications of one transaction
                sender.execute(
                    f"SELECT pg_notify('e2e_flood', '{n}-' || g || repeat('x', 7000))"
                    " FROM generate_series(1, 100) g"
                )
            # the others are still served
            assert one(sender, "SELECT 1") == 1
        messages, closed = raw.read_all(timeout=10)
        errors = rc.errors(messages)
        assert closed
        assert errors and errors[-1]["C"] == "54000", errors
        assert "notifications" in errors[-1]["M"]
        assert len([m for m in messages if m.type == b"A"]) < 3000  # not all of them were kept
    with connect(hal) as conn:
        assert one(conn, "SELECT 1") == 1


# --- emulated SQL PREPARE ---------------------------------------------------------------------------------


def test_sql_prepare_is_emulated_per_client(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        a.execute("PREPARE e2e_plan (int) AS SELECT $1 * 2")
        b.execute("PREPARE e2e_plan AS SELECT 'other'")  # the same name, on the same server: no conflict
        for _ in range(2):
            assert one(a, "EXECUTE e2e_plan(21)") == 42
            assert one(b, "EXECUTE e2e_plan") == "other"
        with a.transaction():
            assert one(a, "EXECUTE e2e_plan(1)") == 2
            assert one(a, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'e2e_plan'") == 1
        a.execute("DEALLOCATE e2e_plan")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            a.execute("EXECUTE e2e_plan(1)")
        assert one(b, "EXECUTE e2e_plan") == "other"
        b.execute("DEALLOCATE ALL")
    with connect(hal) as c:
        assert one(c, "SELECT count(*) FROM pg_prepared_statements") == 0


def test_listen_is_handed_over_without_losing_a_notification(hal: Running) -> None:
    # A NOTIFY right after LISTEN races the hand-over from the client's own server to the shared
    # listener, which skips what was committed before it listened: the server must deliver that.
    # Each round listens on a new channel, so each round hands over again.
    with connect(hal) as a, connect(hal, "strict") as sender:
        for n in range(20):
            channel = f"e2e_race_{n}"
            a.execute(f"LISTEN {channel}")
            sender.execute(f"NOTIFY {channel}, 'x{n}'")
            assert [x.payload for x in a.notifies(timeout=5, stop_after=1)] == [f"x{n}"], f"round {n}"
            a.execute(f"UNLISTEN {channel}")
        a.execute("SELECT 1")
        assert list(a.notifies(timeout=0.3)) == []  # nothing twice


def test_a_pinned_client_that_listens_gets_each_notification_once(hal: Running) -> None:
    with connect(hal) as a, connect(hal, "strict") as sender:
        received: list[str] = []
        a.add_notify_handler(lambda n: received.append(n.payload))
        a.execute("SELECT pg_advisory_lock(7005)")  # pinned
        a.execute("LISTEN e2e_once")
        sender.execute("NOTIFY e2e_once, 'while pinned'")
        time.sleep(0.3)
        a.execute("SELECT 1")
        a.execute("SELECT pg_advisory_unlock(7005)")  # released: the shared listener takes over
        a.execute("SELECT 1")
        sender.execute("NOTIFY e2e_once, 'after release'")
        time.sleep(0.3)
        a.execute("SELECT 1")
        time.sleep(0.2)
        a.execute("SELECT 1")
        assert received == ["while pinned", "after release"]


def test_a_plugin_pin_lasts_until_the_plugin_unpins(hal: Running) -> None:
    with connect(hal) as a, connect(hal) as b:
        a.execute("SELECT 'pinme'")
        assert_waits_for_the_server(b)
        a.execute("SELECT pg_advisory_lock(7006)")
        a.execute("SELECT 'unpinme'")
        assert_waits_for_the_server(b)  # the advisory lock still holds it
        a.execute("SELECT pg_advisory_unlock(7006)")
        assert one(b, "SELECT 1") == 1
        a.execute("SELECT 'pinme'")
        assert_waits_for_the_server(b)
        a.execute("SELECT 'unpinme'")
        assert one(b, "SELECT 2") == 2


def test_listening_clients_are_told_when_the_shared_listener_is_lost(pg: Cluster, hal: Running) -> None:
    with connect(hal) as a, connect(hal) as bystander, connect(hal, "strict") as b:
        a.execute("LISTEN e2e_back")
        b.execute("NOTIFY e2e_back, 'before'")
        assert [n.payload for n in a.notifies(timeout=10, stop_after=1)] == ["before"]
        pg.primary.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'halephant listener'"
        )
        # as a direct connection whose backend was terminated: notifications may have been missed. The
        # FATAL can be lost when the client writes after halephant closed (TCP reset): then only the
        # closed connection is seen
        with pytest.raises(
            psycopg.OperationalError, match=r"notifications may have been missed|server closed the connection"
        ):
            for _ in range(50):
                a.execute("SELECT 1")
                time.sleep(0.05)
        assert one(bystander, "SELECT 1") == 1  # a client that does not listen is not concerned
    with connect(hal) as again, connect(hal, "strict") as b:
        again.execute("LISTEN e2e_back")
        b.execute("NOTIFY e2e_back, 'after'")
        assert [n.payload for n in again.notifies(timeout=10, stop_after=1)] == ["after"]


def test_an_idle_session_timeout_of_the_role_does_not_end_the_shared_listener(
    pg: Cluster, hal: Running
) -> None:
    # the shared listener sits idle between notifications: the role's timeout must not end it
    pg.primary.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'halephant listener'"
    )
    pg.primary.sql("ALTER ROLE myapp SET idle_session_timeout = '300ms'")
    try:
        with connect(hal) as a, connect(hal, "strict") as b:
            a.execute("LISTEN e2e_idle")  # a new listener, which logs in with the role's setting
            time.sleep(1.0)
            b.execute("NOTIFY e2e_idle, 'still here'")
            assert [n.payload for n in a.notifies(timeout=10, stop_after=1)] == ["still here"]
            assert one(a, "SELECT 1") == 1
    finally:
        pg.primary.sql("ALTER ROLE myapp RESET idle_session_timeout")
