"""`databases.<name>.max_prepared_statements`: its default, its bounds with positions, the example."""

from __future__ import annotations

from pathlib import Path

import pytest

from halephant.config import Config, ConfigError, read_config_text, validate_config

EXAMPLE = Path(__file__).resolve().parents[2] / "halephant.yaml"

HEAD = """\
clusters:
  main:
    nodes: [127.0.0.1:5432]
users:
  myapp:
    password: secret
databases:
  myapp:
    cluster: main
"""


def load(text: str) -> Config:
    return validate_config(read_config_text(text, "halephant.yaml"))


def test_default_is_200_and_0_is_allowed() -> None:
    assert load(HEAD).databases["myapp"].max_prepared_statements == 200
    assert load(HEAD + "    max_prepared_statements: 0\n").databases["myapp"].max_prepared_statements == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1", "halephant.yaml:10:30: databases.myapp.max_prepared_statements: "
         "Input should be greater than or equal to 0"),
        ("many", "halephant.yaml:10:30: databases.myapp.max_prepared_statements: "
         "expected a whole number, got a string"),
        ("1000001", "halephant.yaml:10:30: databases.myapp.max_prepared_statements: "
         "Input should be less than or equal to 100000"),
    ],
)  # fmt: skip
def test_bad_values_point_at_the_value(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(HEAD + f"    max_prepared_statements: {value}\n")
    assert [str(p) for p in excinfo.value.problems] == [expected]


def test_root_example_documents_it() -> None:
    assert "max_prepared_statements:" in EXAMPLE.read_text()
