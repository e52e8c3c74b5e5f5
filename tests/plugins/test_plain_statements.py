"""The default inspectors are marked `ignores_plain_statements`, so the core skips them for a plain
statement: this holds only if each of them answers None for every plain statement, whatever the user,
database policy or text. Checked directly, over generated texts."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from halephant_plugins import cursor_guard, database_routing, replica_routing, session_features
from hypothesis import given
from hypothesis import strategies as st

from halephant import IGNORES_PLAIN
from halephant.config import read_config_text, validate_config
from halephant.types import ClientInfo, PoolInfo, PoolMode, PoolSize, PoolTarget, Statement

CONFIG = """\
clusters:
  main: {nodes: [127.0.0.1:5432, 127.0.0.1:5433]}
databases:
  myapp: {cluster: main}
  strict:
    cluster: main
    session_features: {listen: reject, advisory_locks: reject, temp_tables: reject, prepare: reject,
                       set_role: reject, load: reject, with_hold: pin}
users:
  myapp: {password: myapp}
  myapp_ro: {password: ro, read_only: true, server_user: myapp}
"""

INSPECTORS = [
    cursor_guard.halephant_inspect_query,
    database_routing.halephant_inspect_query,
    replica_routing.halephant_inspect_query,
    session_features.halephant_inspect_query,
]

WORDS = [
    "SELECT",
    "select",
    "INSERT INTO t VALUES (1)",
    "UPDATE t SET a = 1",
    "DELETE FROM t",
    "WITH x AS (",
    "VALUES (1)",
    "TABLE t",
    " ",
    "(",
    ")",
    ";",
    "'",
    "'x'",
    '"',
    "$$",
    "--",
    "\n",
    "/*",
    "*/",
    "declare",
    "cursor",
    "with hold",
    "set",
    "read write",
    "read only",
    "transaction_read_only",
    "set_config(",
    "pg_advisory_lock(",
    "listen",
    "prepare",
    "drop database",
    "into temp",
    "into",
    "temp",
    "pg_temp.",
    "begin",
    "start transaction",
    "discard all",
    "load",
    "role",
    "session authorization",
    "1",
]
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)


@pytest.fixture(autouse=True, scope="module")
def configured() -> Iterator[None]:
    config = validate_config(read_config_text(textwrap.dedent(CONFIG), "halephant.yaml"))
    for module in (cursor_guard, replica_routing, session_features):
        module.halephant_configure(config=config)
    yield
    replica_routing._current.config = None
    replica_routing._plans.clear()


def _pool(user: str, database: str) -> PoolInfo:
    server_user = "myapp" if user == "myapp_ro" else user
    target = PoolTarget(database, "main", "myapp", server_user, None, PoolMode.TRANSACTION, "test", user=user)
    return PoolInfo(target, PoolSize(0, 5))


POOLS = [_pool(user, database) for user in ("myapp", "myapp_ro") for database in ("myapp", "strict")]


def _call(function: Callable[..., Any], **arguments: Any) -> Any:
    # as pluggy calls an implementation: with the arguments it names
    names = inspect.signature(function).parameters
    return function(**{name: arguments[name] for name in names})


def test_every_default_inspector_is_marked() -> None:
    assert all(getattr(function, IGNORES_PLAIN, False) for function in INSPECTORS)


@given(texts)
def test_the_default_inspectors_answer_none_for_plain_statements(text: str) -> None:
    statement = Statement(text)
    if not statement.plain:
        return
    for pool in POOLS:
        client = ClientInfo(user=pool.target.pool_user, database=pool.database, params={}, address="x")
        for function in INSPECTORS:
            assert _call(function, client=client, statement=Statement(text), pool=pool) is None, function


def test_the_generated_texts_include_plain_and_guarded_ones() -> None:
    # the property above is not vacuous: such texts are plain, and their neighbours are not
    assert Statement("SELECT 1 read write").plain
    assert not Statement("SELECT set_config( 1").plain
    assert not Statement("SELECT into temp t").plain
