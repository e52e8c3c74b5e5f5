"""End to end: the caps on server connections across pools, against a real PostgreSQL.

max_db_connections (a database's pools on one node, every user together) and max_user_connections
(every pool that logs in as one role, its aliases' included, every database together): what
pg_stat_activity on the node shows never goes beyond them while several users' clients run at once,
every client is served (an idle pool at the cap gives way to another user's waiting clients), a client
that waits past checkout_timeout gets 53300 naming the cap (as does the query_wait_notify NOTICE), and a
reload that lowers a cap closes the idle servers above it at once and the busy ones as they come back.
Each scenario counts the backends of a server database (or role) of its own. With two replicas, a read
goes to the replica that can serve it rather than queue at one whose cap is full (a cluster of its own).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from support.cluster import start_test_cluster
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers
from support.polling import became

from halephant.testing.pgcluster import Cluster, conninfo

pytestmark = pytest.mark.e2e

#: the server database of each scenario, so that its backends can be counted alone
SHARED_DB, GIVE_WAY_DB, USER_DB_1, USER_DB_2, RELOAD_DB, RESERVE_DB = (
    "e2e_caps_shared", "e2e_caps_give_way", "e2e_caps_u1", "e2e_caps_u2", "e2e_caps_reload",
    "e2e_caps_reserve",
)  # fmt: skip
#: the role of the max_user_connections scenario (and its alias's)
CAPS_ROLE = "e2e_capsuser"


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    for name in (SHARED_DB, GIVE_WAY_DB, USER_DB_1, USER_DB_2, RESERVE_DB):
        pg.create_database(name, owner="myapp")
    pg.create_role(CAPS_ROLE, CAPS_ROLE)
    main = {"cluster": "main", "pool_size": 5, "checkout_timeout": "5s"}
    config = default_config(
        pg,
        clusters={"main": {"probe_user": "myapp"}},  # (the first user by name is the alias, not a role)
        databases={
            "shared": {**main, "database": SHARED_DB, "max_db_connections": 2},
            "give_way": {**main, "database": GIVE_WAY_DB, "max_db_connections": 2},
            "tiny": {**main, "database": "myapp", "max_db_connections": 1, "checkout_timeout": "700ms"},
            "reserve": {
                **main,
                "database": RESERVE_DB,
                "pool_size": 1,
                "reserve_pool_size": 1,
                "reserve_pool_timeout": "300ms",
                "max_db_connections": 2,
                "checkout_timeout": "3s",
            },
            "u1": {**main, "database": USER_DB_1},
            "u2": {**main, "database": USER_DB_2},
        },
        users={
            # logs in upstream with trust (tests/support/cluster.py): the password is halephant's own
            "trustuser": {"password": "trustuser"},
            CAPS_ROLE: {"password": CAPS_ROLE, "max_user_connections": 2},
            "capsalias": {"password": "capsalias", "server_user": CAPS_ROLE},
        },
        limits={"query_wait_notify": "200ms", "connect_timeout": "3s"},
    )
    return module_halephant.start(config)


class Sampler:
    """Counts, as often as it can in a thread, halephant's backends on the primary that match `where`
    (pg_stat_activity, read as a superuser over the unix socket), and keeps the largest count."""

    def __init__(self, pg: Cluster, where: str) -> None:
        node = pg.primary
        self._conn = psycopg.connect(
            conninfo(host=str(node.sockdir), port=node.port, user="postgres", dbname="postgres"),
            autocommit=True,
        )
        self._query = (
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            f"AND client_addr IS NOT NULL AND {where}"
        )
        self.max = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        row = self._conn.execute(self._query).fetchone()
        assert row is not None
        return int(row[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max = max(self.max, self.now())
            self.samples += 1
            self._stop.wait(0.002)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.max = max(self.max, self.now())
        self._conn.close()


async def run_clients(hal: Running, who: list[tuple[str, str]], transactions: int) -> list[set[str]]:
    """One client per (user, database) in `who`, all at once, each running `transactions` short
    transactions; returns the current_user each one saw."""

    async def client(user: str, dbname: str) -> set[str]:
        seen = set()
        async with await psycopg.AsyncConnection.connect(
            hal.dsn(user=user, password=user, dbname=dbname), autocommit=True
        ) as conn:
            for _ in range(transactions):
                async with conn.transaction():
                    cur = await conn.execute("SELECT current_user, pg_sleep(0.003)")
                    row = await cur.fetchone()
                    assert row is not None
                    seen.add(row[0])
        return seen

    return await asyncio.gather(*(client(user, dbname) for user, dbname in who))


# --- max_db_connections ----------------------------------------------------------------------------------


def test_two_users_share_max_db_connections_and_both_are_served(pg: Cluster, hal: Running) -> None:
    who = [("myapp", "shared")] * 4 + [("trustuser", "shared")] * 4
    with Sampler(pg, f"datname = '{SHARED_DB}'") as sampler:
        seen = asyncio.run(run_clients(hal, who, transactions=12))
    assert seen == [{"myapp"}] * 4 + [{"trustuser"}] * 4  # every client of both users got through
    assert sampler.samples > 10
    assert 1 <= sampler.max <= 2, f"{sampler.max} backends of {SHARED_DB}, max_db_connections is 2"
    assert_clean_servers(pg.primary)


def test_an_idle_pool_at_the_cap_gives_way_to_another_users_client(pg: Cluster, hal: Running) -> None:
    with Sampler(pg, f"datname = '{GIVE_WAY_DB}'") as sampler:
        a1 = psycopg.connect(hal.dsn(dbname="give_way"), autocommit=True)
        a2 = psycopg.connect(hal.dsn(dbname="give_way"), autocommit=True)
        with a1, a2:
            a1.execute("BEGIN")
            a1.execute("SELECT 1")
            a2.execute("BEGIN")
            a2.execute("SELECT 1")  # myapp's pool holds both places of the database
            a1.execute("COMMIT")
            a2.execute("COMMIT")  # and keeps them, idle (idle_timeout is minutes)
            assert sampler.now() == 2
            started = time.monotonic()
            # trustuser's pool holds nothing: its login and its query each need a place, which only
            # closing one of myapp's idle servers can give (else: 53300 after checkout_timeout, 5 s)
            with psycopg.connect(hal.dsn(user="trustuser", password="trustuser", dbname="give_way")) as b:
                assert b.execute("SELECT current_user").fetchone() == ("trustuser",)
            assert time.monotonic() - started < 3
            assert a1.execute("SELECT 'still served'").fetchone() == ("still served",)
    assert sampler.max <= 2, f"{sampler.max} backends of {GIVE_WAY_DB}, max_db_connections is 2"


def test_a_client_held_by_the_cap_is_told_which_cap(pg: Cluster, hal: Running) -> None:
    holder = psycopg.connect(hal.dsn(dbname="tiny"), autocommit=True)
    other = psycopg.connect(hal.dsn(user="trustuser", password="trustuser", dbname="tiny"), autocommit=True)
    with holder, other:
        notices: list[str] = []
        other.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # the database's one place, in a transaction
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            other.execute("SELECT 1")
        assert 0.6 <= time.monotonic() - started < 3
        error = info.value.diag
        assert info.value.sqlstate == "53300"
        assert error.message_primary == (
            "no server connection available for pool tiny/trustuser: checkout timeout: "
            f'max_db_connections (1) of database "tiny" on 127.0.0.1:{pg.primary.port} reached'
        )
        assert error.message_hint is not None and "raise it" in error.message_hint
        assert "every user" in error.message_hint
        # the pool of trustuser is far from its pool_size (5): the NOTICE names the cap, not a full pool
        assert len(notices) == 1 and "pool tiny/trustuser@" in notices[0], notices
        assert 'is held by max_db_connections (1) of database "tiny"' in notices[0], notices
        assert "is full" not in notices[0]
        holder.execute("COMMIT")
        assert other.execute("SELECT 'usable again'").fetchone() == ("usable again",)


def test_a_pool_that_needs_its_reserve_gets_an_idle_place_of_another_users_pool(
    pg: Cluster, hal: Running
) -> None:
    with Sampler(pg, f"datname = '{RESERVE_DB}'") as sampler:
        # trustuser's pool takes one of the database's two places, and keeps it idle
        with psycopg.connect(hal.dsn(user="trustuser", password="trustuser", dbname="reserve")) as other:
            other.execute("SELECT 1")
        busy = psycopg.connect(hal.dsn(dbname="reserve"), autocommit=True)
        waiting = psycopg.connect(hal.dsn(dbname="reserve"), autocommit=True)
        with busy, waiting:
            busy.execute("BEGIN")
            busy.execute("SELECT 1")  # myapp's pool (pool_size 1) at its size: the cap is full too
            assert sampler.now() == 2
            started = time.monotonic()
            # served by a reserve connection after reserve_pool_timeout (300ms), in the place of
            # trustuser's idle server; not after checkout_timeout (3 s: 53300), nor by busy's COMMIT
            assert waiting.execute("SELECT 'reserve'").fetchone() == ("reserve",)
            assert time.monotonic() - started < 2
            assert busy.execute("SELECT 'still in its transaction'").fetchone() is not None
            busy.execute("COMMIT")
    assert sampler.max <= 2, f"{sampler.max} backends of {RESERVE_DB}, max_db_connections is 2"
    assert "needs a reserve connection under max_db_connections (2)" in hal.log_text()
    assert_clean_servers(pg.primary)


def test_a_client_waiting_in_vain_for_a_reserve_a_cap_holds_up_is_told_the_cap(
    pg: Cluster, hal: Running
) -> None:
    # As above, but trustuser's server is busy too: nothing can be closed for the reserve, and the
    # client's 53300 must name the cap, not send the operator to pool_size.
    other = psycopg.connect(
        hal.dsn(user="trustuser", password="trustuser", dbname="reserve"), autocommit=True
    )
    busy = psycopg.connect(hal.dsn(dbname="reserve"), autocommit=True)
    waiting = psycopg.connect(hal.dsn(dbname="reserve"), autocommit=True)
    with other, busy, waiting:
        for conn in (other, busy):
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.TooManyConnections) as refused:
            waiting.execute("SELECT 'never'")
        assert "max_db_connections (2)" in str(refused.value), str(refused.value)
        assert "reached" in str(refused.value)
        for conn in (other, busy):
            conn.execute("COMMIT")
        assert waiting.execute("SELECT 'after'").fetchone() == ("after",)  # the client goes on
    assert_clean_servers(pg.primary)


# --- max_user_connections --------------------------------------------------------------------------------


def test_max_user_connections_counts_every_database_and_the_alias(pg: Cluster, hal: Running) -> None:
    who = [(CAPS_ROLE, "u1")] * 3 + [(CAPS_ROLE, "u2")] * 3 + [("capsalias", "u2")] * 3
    with Sampler(pg, f"usename = '{CAPS_ROLE}'") as sampler:
        seen = asyncio.run(run_clients(hal, who, transactions=10))
    assert seen == [{CAPS_ROLE}] * 9  # the alias logs in as the role: it counts against the role's cap
    assert sampler.samples > 10
    assert 1 <= sampler.max <= 2, f"{sampler.max} backends of {CAPS_ROLE}, max_user_connections is 2"
    pools = {(p["database"], p["user"]): p for p in hal.admin_json("/pools")}
    assert pools[("u2", "capsalias")]["max_user_connections"] == 2
    assert pools[("u2", "capsalias")]["user_connections"] <= 2
    assert_clean_servers(pg.primary)


# --- reload ------------------------------------------------------------------------------------------------


@pytest.fixture
def reload_db(pg: Cluster) -> Iterator[str]:
    pg.create_database(RELOAD_DB, owner="myapp")
    yield RELOAD_DB


def test_reload_lowering_the_cap_closes_idle_servers_now_and_busy_ones_as_they_come_back(
    pg: Cluster, halephant: HalephantFactory, reload_db: str
) -> None:
    db = {"cluster": "main", "database": reload_db, "pool_size": 5, "max_db_connections": 3}
    config = default_config(pg, databases={"myapp": db})
    run = halephant.start(config)
    counted = f"datname = '{reload_db}'"
    with Sampler(pg, counted) as sampler:
        clients = [psycopg.connect(run.dsn(), autocommit=True) for _ in range(3)]
        try:
            busy_1, busy_2, done = clients
            pids = {}
            for client in clients:
                client.execute("BEGIN")
                pids[client] = client.execute("SELECT pg_backend_pid()").fetchone()
            done.execute("COMMIT")  # its server goes back idle: 3 open, 1 idle
            assert sampler.now() == 3
            config["databases"]["myapp"]["max_db_connections"] = 1
            log = run.reload(config, "reload: done")
            assert f'max_db_connections of database "myapp" on 127.0.0.1:{pg.primary.port}: 3 -> 1' in log
            assert "~ databases.myapp.max_db_connections: 3 -> 1" in log
            assert became(lambda: sampler.now() == 2, interval=0.02), (
                "the idle server above the cap was not closed"
            )
            for client in (busy_1, busy_2):  # never cut in the middle of their transactions
                assert client.execute("SELECT pg_backend_pid()").fetchone() == pids[client]
            busy_1.execute("COMMIT")  # comes back while 2 are open: closed
            assert became(lambda: sampler.now() == 1, interval=0.02)
            busy_2.execute("COMMIT")  # at the cap now: kept
            assert done.execute("SELECT pg_backend_pid()").fetchone() == pids[busy_2]
            assert sampler.now() == 1
        finally:
            for client in clients:
                client.close()
    assert sampler.max <= 3


# --- replicas ------------------------------------------------------------------------------------------


@pytest.fixture
def two_replicas() -> Iterator[Cluster]:
    cluster = start_test_cluster(replicas=2)
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_a_read_goes_to_the_replica_with_room_not_to_one_whose_cap_is_full(
    two_replicas: Cluster, halephant: HalephantFactory
) -> None:
    cl = two_replicas
    reads = {"cluster": "main", "database": "myapp", "pool_size": 5, "checkout_timeout": "1s"}
    config = default_config(
        cl,
        clusters={"main": {"probe_user": "myapp"}},
        databases={"myapp": reads, "hold": {**reads, "mode": "session"}},
        users={"myapp_ro": {"read_only": True, "max_user_connections": 1}},
    )
    run = halephant.start(config)
    ports = {node.port for node in cl.replicas}

    def port(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT inet_server_port()").fetchone()
        assert row is not None
        return int(row[0])

    # a session-mode client of the role takes the one place its cap leaves it on one replica, and keeps it
    with psycopg.connect(
        run.dsn(user="myapp_ro", password="myapp_ro", dbname="hold"), autocommit=True
    ) as holder:
        full = port(holder)
        assert full in ports
        (free,) = ports - {full}
        # The role's other pool (another database) has no server anywhere, and each replica is as idle as
        # the other: were the one whose cap is full picked for every other read (its login included),
        # those would wait there for checkout_timeout and get 53300.
        with psycopg.connect(
            run.dsn(user="myapp_ro", password="myapp_ro", dbname="myapp"), autocommit=True
        ) as reader:
            assert [port(reader) for _ in range(6)] == [free] * 6
        assert port(holder) == full
        node = next(node for node in cl.replicas if node.port == full)
        backends = (
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'myapp_ro' AND client_addr IS NOT NULL"
        )
        assert node.sql(backends) == "1"  # the holder's: never one more under max_user_connections
    assert_clean_servers(cl)
