"""The `cursor_guard` default plugin, called directly and through pluggy with halephant's hookspecs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import pluggy
import pytest
from halephant_plugins import cursor_guard
from halephant_plugins.cursor_guard import CursorGuardSettings
from pydantic import BaseModel, ValidationError

from halephant import PROJECT, hooks, sqlstate
from halephant.config import read_config_text, validate_config
from halephant.types import ClientInfo, Pin, PoolInfo, PoolMode, PoolSize, PoolTarget, Reject, Statement

if TYPE_CHECKING:
    from halephant.types import Config

HOLDABLE = 'declare "c" /*x*/ cursor with /* y */ hold for select 1'


class FakeConfig:
    """Only what `halephant_configure` reads: the validated `plugins.<name>` sections and the databases."""

    def __init__(self, sections: dict[str, BaseModel]) -> None:
        self.sections = sections
        self.databases: dict[str, object] = {}

    def plugin_settings(self, name: str) -> BaseModel | None:
        return self.sections.get(name)

    def database_for(self, name: str) -> object | None:
        return None


def configure(action: str | None) -> None:
    sections: dict[str, BaseModel] = (
        {} if action is None else {"cursor_guard": CursorGuardSettings(action=action)}
    )
    cursor_guard.halephant_configure(config=cast("Config", FakeConfig(sections)))


@pytest.fixture(autouse=True)
def default_settings() -> Iterator[None]:
    configure(None)
    yield
    configure(None)


def client() -> ClientInfo:
    return ClientInfo(
        user="myapp", database="app", params={"application_name": "django"}, address="127.0.0.1:5000"
    )


def pool(mode: PoolMode) -> PoolInfo:
    target = PoolTarget(
        database="app",
        cluster="main",
        server_database="app",
        server_user="myapp",
        server_password=None,
        mode=mode,
        reason="test",
    )
    return PoolInfo(target=target, size=PoolSize(min=0, max=5))


def inspect(text: str, mode: PoolMode) -> Reject | None:
    verdict = cursor_guard.halephant_inspect_query(
        client=client(), statement=Statement(text), pool=pool(mode)
    )
    assert verdict is None or isinstance(verdict, Reject)
    return verdict


def test_holdable_cursor_is_rejected_in_transaction_pools() -> None:
    verdict = inspect(HOLDABLE, PoolMode.TRANSACTION)
    assert isinstance(verdict, Reject)
    assert verdict.code == sqlstate.FEATURE_NOT_SUPPORTED == "0A000"
    assert verdict.message == "DECLARE ... WITH HOLD is not supported in transaction pooling"
    assert verdict.hint is not None
    assert "databases.app.mode: session" in verdict.hint
    assert "DISABLE_SERVER_SIDE_CURSORS = True" in verdict.hint
    assert verdict.reason.startswith("cursor_guard:") and "myapp" in verdict.reason


@pytest.mark.parametrize(
    "text",
    [
        "/* /* */ SELECT 1 */ DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "SELECT 1; DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT 1",
    ],
)
def test_hidden_holdable_cursors_are_rejected(text: str) -> None:
    assert isinstance(inspect(text, PoolMode.TRANSACTION), Reject)


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1",
        "DECLARE c CURSOR FOR SELECT 1",  # dies at COMMIT; PostgreSQL refuses it outside a transaction
        "BEGIN; DECLARE c CURSOR FOR SELECT 1; FETCH c; COMMIT",
        "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
        "SELECT 'DECLARE c CURSOR WITH HOLD FOR SELECT 1'",
        "-- declare c cursor with hold\nSELECT 1",
        "DO $$ BEGIN DECLARE c CURSOR WITH HOLD FOR SELECT 1; END $$",
    ],
)
def test_other_statements_pass(text: str) -> None:
    assert inspect(text, PoolMode.TRANSACTION) is None


def test_session_pools_are_left_alone() -> None:
    assert inspect(HOLDABLE, PoolMode.SESSION) is None


def test_action_allow_lets_holdable_cursors_through() -> None:
    configure("allow")
    assert inspect(HOLDABLE, PoolMode.TRANSACTION) is None
    assert inspect(HOLDABLE, PoolMode.SESSION) is None


def test_action_reject_is_the_default_and_a_reload_applies() -> None:
    configure("reject")
    assert isinstance(inspect(HOLDABLE, PoolMode.TRANSACTION), Reject)
    configure("allow")
    assert inspect(HOLDABLE, PoolMode.TRANSACTION) is None
    configure(None)  # the section removed on reload: back to the default
    assert isinstance(inspect(HOLDABLE, PoolMode.TRANSACTION), Reject)


@pytest.mark.parametrize("database", ["app", "served_by_the_catch_all"])
def test_with_hold_pin_of_the_entry_that_serves_the_database(database: str) -> None:
    # the catch-all '*' entry's session_features apply to the databases it serves
    text = (
        "clusters: {main: {nodes: [127.0.0.1:5432]}}\n"
        "databases:\n"
        "  app: {cluster: main, session_features: {with_hold: pin}}\n"
        "  '*': {cluster: main, session_features: {with_hold: pin}}\n"
        "users: {myapp: {password: secret}}\n"
    )
    cursor_guard.halephant_configure(config=validate_config(read_config_text(text, "halephant.yaml")))
    target = PoolTarget(database, "main", database, "myapp", None, PoolMode.TRANSACTION, "test")
    verdict = cursor_guard.halephant_inspect_query(
        client=client(), statement=Statement(HOLDABLE), pool=PoolInfo(target, PoolSize(min=0, max=5))
    )
    assert verdict == Pin(f"cursor_guard: DECLARE ... WITH HOLD in {database}", feature="with_hold")


def test_settings_model() -> None:
    assert cursor_guard.halephant_plugin_settings() == ("cursor_guard", CursorGuardSettings)
    assert CursorGuardSettings().action == "reject"
    assert CursorGuardSettings.model_validate({"action": "allow"}).action == "allow"
    with pytest.raises(ValidationError):
        CursorGuardSettings.model_validate({"action": "warn"})
    with pytest.raises(ValidationError):
        CursorGuardSettings.model_validate({"acton": "allow"})  # unknown keys are errors
    settings = CursorGuardSettings()
    with pytest.raises(ValidationError):
        settings.action = "allow"  # frozen: a reload builds a new object instead


def test_through_pluggy_with_the_hookspecs() -> None:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hooks)
    pm.register(cursor_guard, name="cursor_guard")
    assert pm.hook.halephant_plugin_settings() == [("cursor_guard", CursorGuardSettings)]
    pm.hook.halephant_configure(config=FakeConfig({"cursor_guard": CursorGuardSettings(action="reject")}))
    verdict = pm.hook.halephant_inspect_query(
        client=client(), statement=Statement(HOLDABLE), pool=pool(PoolMode.TRANSACTION)
    )
    assert isinstance(verdict, Reject)
    assert (
        pm.hook.halephant_inspect_query(
            client=client(), statement=Statement(HOLDABLE), pool=pool(PoolMode.SESSION)
        )
        is None
    )
