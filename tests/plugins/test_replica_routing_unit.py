"""The `replica_routing` default plugin called directly: its decisions and reasons for each kind of user,
database setting and cluster state, and which statements count as a switch to read-write."""

from __future__ import annotations

import gc
import textwrap
from collections.abc import Iterator

import pytest
from halephant_plugins import replica_routing

from halephant import sqlstate
from halephant.config import Config, read_config_text, validate_config
from halephant.types import (
    ClientInfo,
    ClusterView,
    NodeInfo,
    PoolInfo,
    PoolMode,
    PoolSize,
    PoolTarget,
    Reject,
    Role,
    Route,
    Statement,
    TransactionInfo,
)

CONFIG = """\
clusters:
  main: {nodes: [127.0.0.1:5432, 127.0.0.1:5433]}
databases:
  myapp: {cluster: main}
  strict: {cluster: main, replica_fallback: error}
  onprimary: {cluster: main, read_only_transactions: primary}
users:
  myapp: {password: myapp}
  myapp_ro: {password: ro, read_only: true, server_user: myapp}
"""

PRIMARY = NodeInfo("p", "127.0.0.1", 5432, Role.PRIMARY, usable=True)
REPLICA = NodeInfo("r", "127.0.0.1", 5433, Role.REPLICA, usable=True)
WITH_REPLICA = ClusterView("main", (PRIMARY, REPLICA))
REPLICA_DOWN = ClusterView("main", (PRIMARY, NodeInfo("r", "127.0.0.1", 5433, Role.REPLICA, usable=False)))


@pytest.fixture(autouse=True)
def config() -> Iterator[Config]:
    config = validate_config(read_config_text(textwrap.dedent(CONFIG), "halephant.yaml"))
    replica_routing.halephant_configure(config=config)
    yield config
    replica_routing._current.config = None
    replica_routing._plans.clear()


def pool(user: str, database: str = "myapp") -> PoolInfo:
    server_user = "myapp" if user == "myapp_ro" else user
    target = PoolTarget(database, "main", "myapp", server_user, None, PoolMode.TRANSACTION, "test", user=user)
    return PoolInfo(target, PoolSize(0, 5))


def client(user: str) -> ClientInfo:
    return ClientInfo(user=user, database="myapp", params={}, address="test")


def route(
    user: str,
    sql: str | None = "SELECT 1",
    database: str = "myapp",
    cluster: ClusterView = WITH_REPLICA,
    who: ClientInfo | None = None,
) -> Route | Reject:
    statement = Statement(sql) if sql is not None else None
    return replica_routing.halephant_route(
        client=who or client(user), transaction=TransactionInfo(statement), pool=pool(user, database),
        cluster=cluster,
    )  # fmt: skip


def test_read_only_user_goes_to_a_replica() -> None:
    assert route("myapp_ro") == Route(Role.REPLICA, "replica: user myapp_ro is read-only")


def test_read_only_user_falls_back_to_the_primary() -> None:
    assert route("myapp_ro", cluster=REPLICA_DOWN) == Route(
        Role.PRIMARY, "primary: user myapp_ro is read-only, no usable replica (replica_fallback: primary)"
    )


def test_read_only_user_with_replica_fallback_error_gets_57P03() -> None:
    answer = route("myapp_ro", database="strict", cluster=REPLICA_DOWN)
    assert isinstance(answer, Reject) and answer.code == sqlstate.CANNOT_CONNECT_NOW
    assert "replica_fallback: error" in answer.reason
    assert route("myapp_ro", database="strict") == Route(Role.REPLICA, "replica: user myapp_ro is read-only")


def test_a_read_only_user_whose_session_turned_read_write_is_refused_on_the_primary() -> None:
    # a switch the statements did not show (a function, dynamic SQL), as the server reported it
    me = client("myapp_ro")
    me.settings["default_transaction_read_only"] = "off"
    answer = route("myapp_ro", who=me, cluster=REPLICA_DOWN)
    assert isinstance(answer, Reject) and answer.code == sqlstate.READ_ONLY_SQL_TRANSACTION
    assert "default_transaction_read_only is off" in answer.message
    # a replica refuses the writes itself
    assert route("myapp_ro", who=me) == Route(Role.REPLICA, "replica: user myapp_ro is read-only")
    me.settings["default_transaction_read_only"] = "on"
    assert route("myapp_ro", who=me, cluster=REPLICA_DOWN).role is Role.PRIMARY  # type: ignore[union-attr]


def test_read_write_user_goes_to_the_primary() -> None:
    assert route("myapp") == Route(Role.PRIMARY, "primary: default route for myapp")
    assert route("myapp", None) == Route(Role.PRIMARY, "primary: default route for myapp")
    assert route("myapp", "BEGIN") == Route(Role.PRIMARY, "primary: default route for myapp")


@pytest.mark.parametrize("sql", ["BEGIN READ ONLY", "start transaction read only", "BEGIN REPEATABLE READ"])
def test_read_only_transactions(sql: str) -> None:
    answer = route("myapp", sql)
    if "ONLY" in sql.upper():
        assert answer == Route(Role.REPLICA, "replica: transaction starts READ ONLY")
        assert route("myapp", sql, cluster=REPLICA_DOWN) == Route(
            Role.PRIMARY, "primary: transaction starts READ ONLY, no usable replica"
        )
        assert route("myapp", sql, database="onprimary").role is Role.PRIMARY
    else:
        assert answer.role is Role.PRIMARY  # type: ignore[union-attr]


def test_serializable_read_only_stays_on_the_primary() -> None:
    assert route("myapp", "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY").role is Role.PRIMARY  # type: ignore[union-attr]


def inspect(who: ClientInfo, sql: str, database: str = "myapp") -> object:
    return replica_routing.halephant_inspect_query(
        client=who, statement=Statement(sql), pool=pool(who.user, database)
    )


def test_a_read_only_session_routes_to_replicas_until_it_is_undone() -> None:
    # the settings the core carries for the client (read back from the server after each transaction)
    me = client("myapp")
    me.settings["default_transaction_read_only"] = "on"
    assert route("myapp", who=me) == Route(Role.REPLICA, "replica: session is read-only (SET by the client)")
    assert route("myapp", who=me, cluster=REPLICA_DOWN).role is Role.PRIMARY  # type: ignore[union-attr]
    me.settings["default_transaction_read_only"] = "off"
    assert route("myapp", who=me).role is Role.PRIMARY  # type: ignore[union-attr]
    me.settings["default_transaction_read_only"] = "true"  # as given in the startup options
    assert route("myapp", who=me).role is Role.REPLICA  # type: ignore[union-attr]
    del me.settings["default_transaction_read_only"]  # RESET, DISCARD ALL: back at the pool's default
    assert route("myapp", who=me).role is Role.PRIMARY  # type: ignore[union-attr]


def test_statements_alone_do_not_make_a_session_read_only() -> None:
    # what they do is known once the server ran them (a SET may be rolled back): the settings decide
    me = client("myapp")
    assert inspect(me, "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY") is None
    assert route("myapp", who=me).role is Role.PRIMARY  # type: ignore[union-attr]


def test_read_only_transactions_primary_keeps_read_only_sessions_on_the_primary() -> None:
    me = client("myapp")
    me.settings["default_transaction_read_only"] = "on"
    assert route("myapp", who=me, database="onprimary").role is Role.PRIMARY  # type: ignore[union-attr]


SWITCHES = [
    "SET default_transaction_read_only = off",
    "SET default_transaction_read_only = 'no'",
    "SET default_transaction_read_only TO DEFAULT",
    "RESET default_transaction_read_only",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SET TRANSACTION READ WRITE",
    "SET transaction_read_only = off",
    "BEGIN READ WRITE",
    "START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ WRITE",
    "SET default_transaction_read_only = E'off'",
    "SELECT 1; RESET default_transaction_read_only",
    "SELECT 1; BEGIN READ WRITE; INSERT INTO t VALUES (1); COMMIT",
    "select set_config('default_transaction_read_only', 'off', false)",
    "SELECT set_config('transaction_read_only', $1, true)",
    "SELECT set_config($1, 'off', false)",
    "DO $$ BEGIN PERFORM set_config('default_transaction_read_only', 'off', false); END $$",
    # forms whose setting name is not one plain literal
    "SELECT set_config('default_transaction_read_only'::text, 'off', false)",
    "SELECT set_config('default_transaction_' || 'read_only', 'off', false)",
    "SELECT set_config('default_transaction_'\n'read_only', 'off', false)",
    "SELECT set_config(E'default_transaction_read_only', 'off', false)",
    "SELECT set_config(U&'default_transaction_read_only', 'off', false)",
    "SELECT set_config($$default_transaction_read_only$$, 'off', false)",
    "SELECT \"set_config\"('default_transaction_read_only', 'off', false)",
    "SELECT set_config('default_transaction_read_only', 'o' || 'ff', false)",
    "DO $f$ BEGIN PERFORM set_config('default_transaction_' || 'read_only', 'off', false); END $f$",
    "DO 'BEGIN PERFORM set_config(''default_transaction_'' || ''read_only'', ''off'', false); END'",
    # a function that runs its argument as SQL in the session
    "SELECT query_to_xml('SELECT set_config(''transaction_read_only'', ''off'', false)', false, false, '')",
]


@pytest.mark.parametrize("sql", SWITCHES)
def test_every_switch_to_read_write_is_refused_for_a_read_only_user(sql: str) -> None:
    answer = inspect(client("myapp_ro"), sql)
    assert isinstance(answer, Reject), sql
    assert answer.code == sqlstate.READ_ONLY_SQL_TRANSACTION
    assert answer.message.startswith('user "myapp_ro" is read-only: ')
    assert answer.hint is not None and "users.myapp_ro.read_only" in answer.hint


@pytest.mark.parametrize("sql", SWITCHES)
def test_read_write_users_may_switch(sql: str) -> None:
    assert inspect(client("myapp"), sql) is None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "SELECT 'SET default_transaction_read_only = off'",
        "-- RESET default_transaction_read_only\nSELECT 1",
        "SHOW default_transaction_read_only",
        "SET default_transaction_read_only = on",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "BEGIN READ ONLY",
        "BEGIN",
        "RESET ALL",
        "DISCARD ALL",
        "SELECT set_config('TimeZone', 'UTC', false)",
        "SELECT set_config('default_transaction_read_only', 'on', false)",
        "SELECT set_config('default_transaction_read_only'::text, 'on'::text, false)",
        "SELECT set_config('myapp.tenant'::text, $1, false)",
        "SELECT set_config('myapp.tenant', 'a' || 'b', false)",
        "DO $$ BEGIN PERFORM set_config('search_path', 'public', false); END $$",
        "SELECT count(*) FROM audit WHERE statement LIKE '%set_config(%'",
        "SELECT count(*) FROM audit WHERE statement LIKE '%set_config(''transaction_read_only''%'",
        "SET TIME ZONE 'UTC'",
        "INSERT INTO t VALUES ('read write')",
    ],
)
def test_what_keeps_a_read_only_user_read_only_is_allowed(sql: str) -> None:
    assert inspect(client("myapp_ro"), sql) is None


def test_a_read_only_session_keeps_read_write_and_serializable_transactions_on_the_primary() -> None:
    me = client("myapp")
    me.settings["default_transaction_read_only"] = "on"
    assert route("myapp", "BEGIN ISOLATION LEVEL SERIALIZABLE", who=me).role is Role.PRIMARY  # type: ignore[union-attr]
    assert route("myapp", "BEGIN READ WRITE", who=me).role is Role.PRIMARY  # type: ignore[union-attr]
    assert route("myapp", "START TRANSACTION READ ONLY", who=me).role is Role.REPLICA  # type: ignore[union-attr]
    assert route("myapp", "BEGIN", who=me).role is Role.REPLICA  # type: ignore[union-attr]
    me.settings["default_transaction_isolation"] = "serializable"
    assert route("myapp", who=me).role is Role.PRIMARY  # type: ignore[union-attr]  # a standby cannot


def test_ordinary_statements_cost_no_per_text_work() -> None:
    replica_routing._facts.clear()
    for sql in ("SELECT 42", "INSERT INTO t VALUES ('read write')", "UPDATE t SET a = 1"):
        assert inspect(client("myapp_ro"), sql) is None
    assert replica_routing._facts == {}


def test_a_plan_goes_with_its_pool() -> None:
    # the catch-all entry makes pools (and a PoolInfo) per database name and forgets them when unused:
    # the plans made for them must not outlive them
    pools = [pool("myapp", f"db{i}") for i in range(50)]
    for each in pools:
        assert replica_routing.halephant_route(
            client=client("myapp"), transaction=TransactionInfo(None), pool=each, cluster=WITH_REPLICA
        ) == Route(Role.PRIMARY, "primary: default route for myapp")  # fmt: skip
    assert len(replica_routing._plans) == 50
    del pools, each
    gc.collect()
    assert replica_routing._plans == {}
