"""`databases.<name>.session_features`: defaults, accepted values, and errors that point into the file."""

from __future__ import annotations

import pytest

from halephant.config import ConfigError, read_config_text, validate_config
from halephant.config.schema import SessionFeaturesConfig

HEAD = """\
clusters:
  main:
    nodes: [127.0.0.1:5432]
users:
  myapp: {password: secret}
databases:
  myapp:
    cluster: main
"""


def test_defaults_are_the_issue_table() -> None:
    config = validate_config(read_config_text(HEAD, "halephant.yaml"))
    assert config.databases["myapp"].session_features == SessionFeaturesConfig(
        listen="emulate", advisory_locks="pin", with_hold="reject", temp_tables="pin",
        prepare="emulate", set_role="pin", load="reject",
    )  # fmt: skip


def test_rows_can_be_set() -> None:
    text = HEAD + "    session_features: {listen: pin, load: pin, advisory_locks: reject}\n"
    features = validate_config(read_config_text(text, "halephant.yaml")).databases["myapp"].session_features
    assert (features.listen, features.load, features.advisory_locks, features.prepare) == (
        "pin", "pin", "reject", "emulate"
    )  # fmt: skip


def test_bad_values_are_reported_with_their_position() -> None:
    text = HEAD + (
        "    session_features:\n      advisory_locks: emulate\n      listen: sometimes\n      cursors: pin\n"
    )
    with pytest.raises(ConfigError) as info:
        validate_config(read_config_text(text, "halephant.yaml"))
    problems = [str(p) for p in info.value.problems]
    assert problems == [
        "halephant.yaml:10:23: databases.myapp.session_features.advisory_locks: Input should be 'pin' or "
        "'reject'",
        "halephant.yaml:11:15: databases.myapp.session_features.listen: Input should be 'emulate', 'pin' or "
        "'reject'",
        "halephant.yaml:12:7: databases.myapp.session_features.cursors: unknown key; expected one of: "
        "listen, advisory_locks, with_hold, temp_tables, prepare, set_role, load",
    ]
