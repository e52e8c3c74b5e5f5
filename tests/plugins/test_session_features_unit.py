"""The `session_features` default plugin, called directly: the policy table of the `databases:` entry
that serves the client's database applies."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from halephant_plugins import session_features

from halephant import sqlstate
from halephant.config import read_config_text, validate_config
from halephant.types import ClientInfo, Pin, PoolInfo, PoolMode, PoolSize, PoolTarget, Reject, Statement

CONFIG = """\
clusters: {main: {nodes: [127.0.0.1:5432]}}
databases:
  app: {cluster: main, session_features: {advisory_locks: reject}}
  '*': {cluster: main, session_features: {advisory_locks: reject, temp_tables: reject}}
users: {myapp: {password: secret}}
"""
LOCK = "SELECT pg_advisory_lock(1)"


def configure(text: str) -> None:
    session_features.halephant_configure(config=validate_config(read_config_text(text, "halephant.yaml")))


@pytest.fixture(autouse=True)
def configured() -> Iterator[None]:
    configure(CONFIG)
    yield
    configure(CONFIG.replace("advisory_locks: reject", "advisory_locks: pin"))  # leave the defaults behind


def inspect(database: str, text: str) -> Reject | Pin | None:
    target = PoolTarget(database, "main", database, "myapp", None, PoolMode.TRANSACTION, "test")
    client = ClientInfo(user="myapp", database=database, params={}, address="127.0.0.1:5000")
    pool = PoolInfo(target, PoolSize(min=0, max=5))
    return session_features.halephant_inspect_query(client=client, statement=Statement(text), pool=pool)


@pytest.mark.parametrize("database", ["app", "served_by_the_catch_all"])
def test_the_entry_that_serves_the_database_decides(database: str) -> None:
    verdict = inspect(database, LOCK)
    assert isinstance(verdict, Reject) and verdict.code == sqlstate.FEATURE_NOT_SUPPORTED
    assert f"in transaction pool {database}" in verdict.reason


def test_each_entry_has_its_own_table() -> None:
    assert inspect("app", "CREATE TEMP TABLE t (a int)") == Pin(
        "session_features: temp_tables (CREATE)", feature="temp_tables"
    )
    verdict = inspect("served_by_the_catch_all", "CREATE TEMP TABLE t (a int)")
    assert isinstance(verdict, Reject)


def test_before_any_configuration_the_defaults_apply() -> None:
    session_features._current.config = None
    assert inspect("app", LOCK) == Pin("session_features: advisory_locks (SELECT)", feature="advisory_locks")
