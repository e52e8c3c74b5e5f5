"""Configuration written inline in a test: `load` it (dedented, as `halephant.yaml`), or get the
`problems` it is refused with, each as `halephant check` prints it."""

from __future__ import annotations

import textwrap

import pytest

from halephant.config import Config, ConfigError, read_config_text, validate_config


def load(text: str) -> Config:
    return validate_config(read_config_text(textwrap.dedent(text), "halephant.yaml"))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load(text)
    return [str(p) for p in excinfo.value.problems]
