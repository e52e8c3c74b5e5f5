"""Plugin settings sections: `plugins.<name>` validated against the model each loaded plugin declares."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from halephant.config import Config, ConfigError, read_config_text, validate_config

HEAD = """\
clusters:
  main:
    nodes: [127.0.0.1:5432]
databases:
  myapp:
    cluster: main
users:
  myapp:
    password: secret
"""


class CursorGuardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    action: Literal["reject", "allow"] = "reject"


class PoolSizingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reserve: int = Field(default=0, ge=0)
    per_user: dict[str, int] = {}

    @field_validator("per_user")
    @classmethod
    def _positive(cls, value: dict[str, int]) -> dict[str, int]:
        if any(size < 1 for size in value.values()):
            raise ValueError("every size must be 1 or more")
        return value


class NeedsKey(BaseModel):
    key: str


MODELS: Mapping[str, type[BaseModel]] = {
    "cursor_guard": CursorGuardSettings,
    "pool_sizing": PoolSizingSettings,
}


def load(tail: str, models: Mapping[str, type[BaseModel]] = MODELS) -> Config:
    return validate_config(read_config_text(HEAD + textwrap.dedent(tail), "halephant.yaml"), models)


def problems(tail: str, models: Mapping[str, type[BaseModel]] = MODELS) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load(tail, models)
    return [str(p) for p in excinfo.value.problems]


def test_sections_are_validated_into_their_models() -> None:
    config = load(
        """\
        plugins:
          cursor_guard:
            action: allow
          pool_sizing:
            reserve: 2
            per_user: {myapp: 5}
        """
    )
    assert config.plugin_settings("cursor_guard") == CursorGuardSettings(action="allow")
    assert config.plugin_settings("pool_sizing") == PoolSizingSettings(reserve=2, per_user={"myapp": 5})
    assert config.plugin_settings("replica_routing") is None


def test_plugin_without_a_section_gets_defaults() -> None:
    config = load("")
    assert config.plugin_settings("cursor_guard") == CursorGuardSettings()
    assert config.plugin_settings("pool_sizing") == PoolSizingSettings()
    # An empty section (`cursor_guard:` with nothing under it) means the same.
    assert load("plugins:\n  cursor_guard:\n").plugin_settings("cursor_guard") == CursorGuardSettings()


def test_errors_are_positioned_inside_the_section() -> None:
    assert problems(
        """\
        plugins:
          cursor_guard:
            action: rejct
            mode: strict
          pool_sizing:
            reserve: -1
            per_user: {myapp: 0}
        """
    ) == [
        "halephant.yaml:12:13: plugins.cursor_guard.action: Input should be 'reject' or 'allow'",
        "halephant.yaml:13:5: plugins.cursor_guard.mode: unknown key; expected one of: action",
        "halephant.yaml:15:14: plugins.pool_sizing.reserve: Input should be greater than or equal to 0",
        "halephant.yaml:16:5: plugins.pool_sizing.per_user: every size must be 1 or more",
    ]


def test_section_must_be_a_mapping() -> None:
    assert problems("plugins:\n  cursor_guard: reject\n") == [
        "halephant.yaml:11:17: plugins.cursor_guard: expected a mapping, got a string",
    ]


def test_unknown_section_lists_known_plugins() -> None:
    assert problems("plugins:\n  cursor_gaurd:\n    action: allow\n") == [
        "halephant.yaml:11:3: plugins.cursor_gaurd: no loaded plugin takes settings under this name; "
        "plugins with settings: cursor_guard, pool_sizing",
    ]
    assert problems("plugins:\n  anything: {}\n", models={}) == [
        "halephant.yaml:11:3: plugins.anything: no loaded plugin takes settings under this name; "
        "plugins with settings: none",
    ]


def test_disabled_plugin_section_is_not_validated() -> None:
    config = load(
        """\
        plugins:
          disable: [cursor_guard, gone]
          cursor_guard:
            action: whatever
          gone:
            anything: 1
        """
    )
    assert config.plugins.disable == ("cursor_guard", "gone")
    assert config.plugin_settings("cursor_guard") is None
    assert config.plugin_settings("pool_sizing") == PoolSizingSettings()


def test_missing_required_plugin_setting() -> None:
    assert problems("", models={"needs_key": NeedsKey}) == [
        "halephant.yaml:1:1: plugins.needs_key.key: this key is required",
    ]
    assert problems("plugins:\n  needs_key: {}\n", models={"needs_key": NeedsKey}) == [
        "halephant.yaml:11:3: plugins.needs_key.key: this key is required",
    ]


def test_plugin_errors_join_core_errors() -> None:
    assert problems("logging: {level: loud}\nplugins:\n  cursor_guard: {action: maybe}\n") == [
        "halephant.yaml:10:18: logging.level: Input should be 'debug', 'info', 'warning' or 'error'",
        "halephant.yaml:12:26: plugins.cursor_guard.action: Input should be 'reject' or 'allow'",
    ]
