"""The plugin manager's calls: direct calls when one plugin answers a hook give the same answers as pluggy,
argument pruning included; required decisions fail closed; disabled plugins stay out."""

from __future__ import annotations

import types

import pytest

from halephant import hookimpl, ignores_plain_statements, sqlstate
from halephant.config import read_config_text, validate_config
from halephant.errors import ClientError
from halephant.plugin_manager import PluginError, Plugins
from halephant.sql import Statement
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
    TransactionInfo,
)

CLIENT = ClientInfo(user="u", database="d", params={}, address="x")
TARGET = PoolTarget("d", "main", "d", "u", None, PoolMode.TRANSACTION, "test")
POOL = PoolInfo(TARGET, PoolSize(0, 1))
CLUSTER = ClusterView("main", (NodeInfo("127.0.0.1:5432", "127.0.0.1", 5432, Role.PRIMARY, usable=True),))


def _module(**hooks: object) -> types.ModuleType:
    module = types.ModuleType("test_plugin")
    for name, function in hooks.items():
        setattr(module, name, function)
    return module


def test_a_hook_implemented_with_fewer_arguments_is_called_with_just_those() -> None:
    seen: list[object] = []

    @hookimpl
    def halephant_route(pool: PoolInfo) -> Route:
        seen.append(pool)
        return Route(Role.REPLICA, "by pool")

    plugins = Plugins(
        entry_points=True,
        disabled=["replica_routing"],
        extra=[(_module(halephant_route=halephant_route), "r")],
    )
    assert plugins.route(CLIENT, TransactionInfo(None), POOL, CLUSTER) == Route(Role.REPLICA, "by pool")
    assert seen == [POOL]


def test_the_first_plugin_answer_wins_over_the_default() -> None:
    @hookimpl
    def halephant_inspect_query(statement: Statement) -> Reject | None:
        return Reject(sqlstate.INSUFFICIENT_PRIVILEGE, "no") if statement.first_keyword == "DROP" else None

    plugins = Plugins(
        entry_points=True, extra=[(_module(halephant_inspect_query=halephant_inspect_query), "i")]
    )
    assert isinstance(plugins.inspect_query(CLIENT, Statement("DROP TABLE t"), POOL), Reject)
    held = plugins.inspect_query(CLIENT, Statement("DECLARE c CURSOR WITH HOLD FOR SELECT 1"), POOL)
    assert isinstance(held, Reject) and held.code == sqlstate.FEATURE_NOT_SUPPORTED  # the default, asked next
    assert plugins.inspect_query(CLIENT, Statement("SELECT 1"), POOL) is None


def test_a_route_answer_of_the_wrong_type_is_an_internal_error() -> None:
    @hookimpl
    def halephant_route() -> str:
        return "primary"

    plugins = Plugins(
        entry_points=True,
        disabled=["replica_routing"],
        extra=[(_module(halephant_route=halephant_route), "r")],
    )
    with pytest.raises(Exception, match="unexpected type"):
        plugins.route(CLIENT, TransactionInfo(None), POOL, CLUSTER)


def test_a_route_or_pool_mode_given_by_name_is_the_enum_member() -> None:
    # the core tells roles and modes apart by identity: Route("primary", ...) must not go to a replica
    @hookimpl
    def halephant_route() -> Route:
        return Route("primary", "by name")  # type: ignore[arg-type]

    plugins = Plugins(
        entry_points=True,
        disabled=["replica_routing"],
        extra=[(_module(halephant_route=halephant_route), "r")],
    )
    assert plugins.route(CLIENT, TransactionInfo(None), POOL, CLUSTER).role is Role.PRIMARY
    target = PoolTarget("d", "main", "d", "u", None, "transaction", "by name")  # type: ignore[arg-type]
    assert target.mode is PoolMode.TRANSACTION


def test_a_route_to_no_such_role_is_the_plugins_error() -> None:
    @hookimpl
    def halephant_route() -> Route:
        return Route("leader", "no such role")  # type: ignore[arg-type]

    plugins = Plugins(
        entry_points=True,
        disabled=["replica_routing"],
        extra=[(_module(halephant_route=halephant_route), "typo")],
    )
    with pytest.raises(ValueError, match="leader") as info:
        plugins.route(CLIENT, TransactionInfo(None), POOL, CLUSTER)
    assert plugins.culprit(info.value) == ("typo", "halephant_route")
    with pytest.raises(ValueError, match="bogus"):
        PoolTarget("d", "main", "d", "u", None, "bogus", "no such mode")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "problem"),
    [
        (PoolSize(min=6, max=2), "min must be from 0 to max"),
        (PoolSize(min=-1, max=2), "min must be from 0 to max"),
        (PoolSize(min=0, max=0), "max must be 1 or more"),
        (PoolSize(min=0, max=2, reserve=-1), "reserve cannot be negative"),
        (PoolSize(min=0, max="5"), "min, max and reserve must be whole numbers"),  # type: ignore[arg-type]
        (PoolSize(min=0, max=True), "min, max and reserve must be whole numbers"),
        (PoolSize(min=0, max=2, recheck_after=0), "recheck_after must be a number of seconds more than 0"),
        (PoolSize(min=0, max=2, recheck_after=float("nan")), "recheck_after must be a number of seconds"),
        (PoolSize(min=0, max=2, recheck_after="60"), "recheck_after must be"),  # type: ignore[arg-type]
    ],
)
def test_a_pool_size_the_pool_cannot_keep_is_refused(size: PoolSize, problem: str) -> None:
    # min above max would open min servers and close them down to max at every sweep, for ever
    @hookimpl
    def halephant_pool_size() -> PoolSize:
        return size

    plugins = Plugins(entry_points=True, extra=[(_module(halephant_pool_size=halephant_pool_size), "s")])
    with pytest.raises(PluginError, match=f"halephant_pool_size answered .* for pool d/u: {problem}"):
        plugins.pool_size(TARGET, None)  # type: ignore[arg-type]


def test_a_pool_size_may_ask_to_be_asked_again() -> None:
    @hookimpl
    def halephant_pool_size() -> PoolSize:
        return PoolSize(min=0, max=2, reason="by the clock", recheck_after=60)

    plugins = Plugins(entry_points=True, extra=[(_module(halephant_pool_size=halephant_pool_size), "s")])
    assert plugins.pool_size(TARGET, None).recheck_after == 60  # type: ignore[arg-type]


def test_two_plugins_declaring_one_settings_section_refuse_to_start() -> None:
    from pydantic import BaseModel

    class Settings(BaseModel):
        size: int = 1

    @hookimpl
    def halephant_plugin_settings() -> tuple[str, type[BaseModel]]:
        return ("shared", Settings)

    plugins = Plugins(
        entry_points=True,
        extra=[
            (_module(halephant_plugin_settings=halephant_plugin_settings), "first"),
            (_module(halephant_plugin_settings=halephant_plugin_settings), "second"),
        ],
    )
    with pytest.raises(PluginError, match=r"plugins '\w+' and '\w+' both declare .* plugins\.shared") as info:
        plugins.settings_models()
    assert "'first'" in str(info.value) and "'second'" in str(info.value)


def test_a_pool_chosen_outside_the_configuration_is_refused_saying_why() -> None:
    config = validate_config(
        read_config_text(
            "clusters: {main: {nodes: [127.0.0.1:5432]}}\n"
            "databases: {tenants: {cluster: main}}\n"
            "users: {u: {password: secret}}\n",
            "halephant.yaml",
        )
    )
    chosen: list[PoolTarget] = []

    @hookimpl
    def halephant_select_pool() -> PoolTarget:
        return chosen[-1]

    plugins = Plugins(entry_points=True, extra=[(_module(halephant_select_pool=halephant_select_pool), "p")])
    chosen.append(
        PoolTarget("tenant_a", "main", "tenant_a", "u", None, PoolMode.TRANSACTION, "t", entry="tenants")
    )
    assert plugins.select_pool(CLIENT, config) is chosen[-1]
    # no entry to follow: not told later as "database removed from the configuration"
    chosen.append(PoolTarget("tenant_a", "main", "tenant_a", "u", None, PoolMode.TRANSACTION, "t"))
    with pytest.raises(
        ClientError, match="chose database 'tenant_a', which no databases: entry serves"
    ) as info:
        plugins.select_pool(CLIENT, config)
    assert info.value.code == sqlstate.INTERNAL_ERROR
    chosen.append(PoolTarget("tenants", "nowhere", "tenants", "u", None, PoolMode.TRANSACTION, "t"))
    with pytest.raises(ClientError, match="chose cluster 'nowhere', which is not under clusters:"):
        plugins.select_pool(CLIENT, config)


def test_the_plugin_an_exception_came_from_is_named() -> None:
    def helper(statement: Statement) -> None:
        raise ValueError(statement.text)  # raised below the implementation: still that plugin's

    @hookimpl
    def halephant_inspect_query(statement: Statement) -> None:
        helper(statement)

    plugins = Plugins(
        entry_points=True, extra=[(_module(halephant_inspect_query=halephant_inspect_query), "fussy")]
    )
    with pytest.raises(ValueError) as info:
        plugins.inspect_query(CLIENT, Statement("DROP TABLE t"), POOL)
    assert plugins.culprit(info.value) == ("fussy", "halephant_inspect_query")
    try:
        raise KeyError("core")
    except KeyError as exc:
        assert plugins.culprit(exc) is None


def test_a_hook_function_not_marked_as_one_refuses_to_start() -> None:
    # pluggy would pass over it without a word: a deny policy never called lets everyone in
    def halephant_authenticate(client: ClientInfo) -> Reject:
        return Reject(sqlstate.INVALID_PASSWORD, "no")

    with pytest.raises(
        PluginError, match=r"plugin 'deny': halephant_authenticate is not marked @halephant\.hookimpl"
    ):
        Plugins(entry_points=True, extra=[(_module(halephant_authenticate=halephant_authenticate), "deny")])


def test_disabling_a_required_default_without_a_replacement_refuses_to_start() -> None:
    with pytest.raises(PluginError, match="halephant_route"):
        Plugins(entry_points=True, disabled=["replica_routing"])


def test_several_inspectors_are_chained_in_pluggys_order_without_its_dispatch() -> None:
    calls: list[str] = []

    @hookimpl(tryfirst=True)
    def first(statement: Statement) -> None:
        calls.append("first")

    @hookimpl
    def middle(client: ClientInfo, statement: Statement, pool: PoolInfo) -> Reject | None:
        calls.append("middle")
        return Reject(sqlstate.INSUFFICIENT_PRIVILEGE, "middle") if "stop" in statement.text else None

    plugins = Plugins(
        entry_points=True,
        extra=[
            (_module(halephant_inspect_query=first), "first"),
            (_module(halephant_inspect_query=middle), "middle"),
        ],
    )
    hook = plugins.pm.hook.halephant_inspect_query
    assert plugins._inspect is not hook  # a generated chain, not pluggy's dispatch
    for text in ("SELECT 'stop'", "LOAD 'x'", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "SELECT 1"):
        statement = Statement(text)
        calls.clear()
        direct = plugins.inspect_query(CLIENT, statement, POOL)
        direct_calls = list(calls)
        calls.clear()
        assert direct == hook(client=CLIENT, statement=statement, pool=POOL)
        assert direct_calls == calls
    assert direct_calls == ["first", "middle"]  # nobody objected to SELECT 1: every inspector was asked


def test_several_plain_implementations_answer_as_pluggy_would() -> None:
    calls: list[str] = []

    @hookimpl
    def halephant_inspect_query(statement: Statement) -> Reject | None:
        calls.append("first")
        return Reject(sqlstate.INSUFFICIENT_PRIVILEGE, "no") if "nope" in statement.text else None

    class Later:
        @hookimpl(tryfirst=True)
        def halephant_inspect_query(self, client: ClientInfo, statement: Statement) -> Reject | None:
            calls.append("tryfirst")
            return None

    plugins = Plugins(
        entry_points=True,
        extra=[(_module(halephant_inspect_query=halephant_inspect_query), "i"), (Later(), "later")],
    )
    assert plugins._inspect.__name__ == "direct_call"  # the direct path is in use
    for text in ("SELECT nope", "SELECT 1", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DROP DATABASE x"):
        calls.clear()
        direct = plugins.inspect_query(CLIENT, Statement(text), POOL)
        expected_calls = list(calls)
        calls.clear()
        via_pluggy = plugins.pm.hook.halephant_inspect_query(
            client=CLIENT, statement=Statement(text), pool=POOL
        )
        assert direct == via_pluggy, text
        assert calls == expected_calls, text  # same order, same stop
    assert expected_calls[0] == "tryfirst"


def test_an_inspector_marked_ignores_plain_statements_is_skipped_for_them_only() -> None:
    calls: list[str] = []

    @hookimpl
    @ignores_plain_statements
    def marked(statement: Statement) -> None:
        calls.append(f"marked {statement.text}")

    plugins = Plugins(
        entry_points=True,
        disabled=["reject_statements"],  # the example package, when installed: it sees every statement
        extra=[(_module(halephant_inspect_query=marked), "m")],
    )
    assert plugins.has_inspectors and not plugins.has_plain_inspectors  # the defaults are marked too
    assert plugins.inspect_query(CLIENT, Statement("SELECT 1"), POOL) is None
    assert calls == []
    assert plugins.inspect_query(CLIENT, Statement("LISTEN x"), POOL) is None
    assert calls == ["marked LISTEN x"]

    @hookimpl
    def unmarked(statement: Statement) -> Reject | None:
        calls.append(f"unmarked {statement.text}")
        return Reject(sqlstate.INSUFFICIENT_PRIVILEGE, "no") if "secret" in statement.text else None

    plugins.register(_module(halephant_inspect_query=unmarked), "u")
    assert plugins.has_plain_inspectors
    calls.clear()
    assert isinstance(plugins.inspect_query(CLIENT, Statement("SELECT secret FROM t"), POOL), Reject)
    assert calls == ["unmarked SELECT secret FROM t"]  # the marked one is still skipped for plain ones
