"""The `database_routing` default plugin called directly: targets for listed, catch-all and alias users,
and the statements before which idle server connections to a database are closed."""

from __future__ import annotations

import textwrap

import pytest
from halephant_plugins import database_routing

from halephant import sqlstate
from halephant.config import Config, read_config_text, validate_config
from halephant.protocol.session_params import startup_settings
from halephant.types import ClientInfo, CloseIdleServers, PoolMode, PoolTarget, Reject, Statement

CONFIG = """\
clusters:
  main: {nodes: [127.0.0.1:5432, 127.0.0.1:5433]}
  other: {nodes: [127.0.0.1:5434]}
databases:
  myapp: {cluster: main}
  reports: {cluster: other, database: warehouse, mode: session}
  '*': {cluster: main}
users:
  myapp: {password: myapp}
  myapp_ro: {password: ro, read_only: true, server_user: myapp}
"""


def config() -> Config:
    return validate_config(read_config_text(textwrap.dedent(CONFIG), "halephant.yaml"))


def select(user: str, database: str, **params: str) -> PoolTarget | Reject:
    client = ClientInfo(user=user, database=database, params=params, address="test")
    client.settings = startup_settings(params)  # as the core sets them before this hook
    return database_routing.halephant_select_pool(client=client, config=config())


def test_listed_database() -> None:
    target = select("myapp", "reports")
    assert isinstance(target, PoolTarget)
    assert (target.cluster, target.server_database, target.server_user, target.mode) == (
        "other", "warehouse", "myapp", PoolMode.SESSION,
    )  # fmt: skip
    assert target.server_password == "myapp" and target.server_settings == ()


def test_catch_all_serves_any_other_database_under_its_own_name() -> None:
    target = select("myapp", "test_myapp")
    assert isinstance(target, PoolTarget)
    assert (target.database, target.cluster, target.server_database) == ("test_myapp", "main", "test_myapp")
    assert "'*'" in target.reason


def test_alias_user_logs_in_upstream_as_the_other_user_with_pools_of_its_own() -> None:
    target = select("myapp_ro", "myapp")
    assert isinstance(target, PoolTarget)
    assert (target.server_user, target.server_password, target.user, target.pool_user) == (
        "myapp", "myapp", "myapp_ro", "myapp_ro",
    )  # fmt: skip
    assert target.server_settings == (("default_transaction_read_only", "on"),)


SCRAM = (
    "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$U1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1M=:"
    "S0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0s="
)


def test_a_hashed_password_is_the_upstream_one_unless_server_password_is_set() -> None:
    # pass-through (halephant.auth.upstream): the verifier or hash itself goes to the login, for the user
    # and for its aliases; a server_password comes first
    users = {
        "hashed": {"password": SCRAM},
        "hashed_alias": {"password": "alias", "server_user": "hashed"},
        "md5": {"password": "md5" + "0123456789abcdef" * 2, "auth": "md5"},
        "both": {"password": SCRAM, "server_password": "plain"},
    }
    text = textwrap.dedent(CONFIG) + "".join(
        f"  {name}: {{{', '.join(f'{k}: {v!r}' for k, v in entry.items())}}}\n"
        for name, entry in users.items()
    )
    config = validate_config(read_config_text(text, "halephant.yaml"))
    passwords = {}
    for name in users:
        target = database_routing.halephant_select_pool(
            client=ClientInfo(user=name, database="myapp", params={}, address="test"), config=config
        )
        assert isinstance(target, PoolTarget)
        passwords[name] = target.server_password
    assert passwords == {
        "hashed": SCRAM,
        "hashed_alias": SCRAM,
        "md5": "md5" + "0123456789abcdef" * 2,
        "both": "plain",
    }


@pytest.mark.parametrize(
    "params",
    [
        {"options": "-c default_transaction_read_only=off"},
        {"options": "-c transaction_read_only=off"},
        {"default_transaction_read_only": "off"},
        # PostgreSQL folds setting names to lower case: so must the check
        {"Default_Transaction_Read_Only": "off"},
        {"DEFAULT_TRANSACTION_READ_ONLY": "false"},
        {"options": "-c Default_Transaction_Read_Only=no"},
        {"options": "--Transaction-Read-Only=0"},
        # the last one given wins, in PostgreSQL as in the settings read
        {"default_transaction_read_only": "on", "Default_Transaction_Read_Only": "off"},
    ],
)
def test_a_read_only_user_cannot_turn_read_only_off_at_startup(params: dict[str, str]) -> None:
    answer = select("myapp_ro", "myapp", **params)
    assert isinstance(answer, Reject) and answer.code == sqlstate.READ_ONLY_SQL_TRANSACTION
    assert isinstance(select("myapp", "myapp", **params), PoolTarget)  # read-write users may


@pytest.mark.parametrize(
    "params",
    [
        {"default_transaction_read_only": "on"},
        {"Default_Transaction_Read_Only": "true"},
        {"options": "-c default_transaction_read_only=yes -c statement_timeout=5s"},
        {"options": "-c application_name=transaction_read_only=off"},  # a value, not the setting
    ],
)
def test_a_read_only_user_may_keep_read_only_on_at_startup(params: dict[str, str]) -> None:
    assert isinstance(select("myapp_ro", "myapp", **params), PoolTarget)


@pytest.mark.parametrize(
    ("sql", "database"),
    [
        ("DROP DATABASE test_myapp", "test_myapp"),
        ("drop database if exists Test_MyApp", "test_myapp"),
        ('DROP DATABASE "Test" WITH (FORCE)', "Test"),
        ("ALTER DATABASE old RENAME TO new", "old"),
        ('CREATE DATABASE "test_myapp_1" WITH TEMPLATE "test_myapp" OWNER myapp', "test_myapp"),
        ("CREATE DATABASE x TEMPLATE = template0", "template0"),
        ("DROP TABLE t", None),
        ("ALTER DATABASE x SET work_mem = '1MB'", None),
        ("CREATE DATABASE x", None),
        ("SELECT 'DROP DATABASE x'", None),
        ("DROP DATABASE", None),
    ],
)
def test_statements_that_need_a_database_without_sessions(sql: str, database: str | None) -> None:
    answer = database_routing.halephant_inspect_query(statement=Statement(sql))
    if database is None:
        assert answer is None
    else:
        assert isinstance(answer, CloseIdleServers) and answer.database == database
