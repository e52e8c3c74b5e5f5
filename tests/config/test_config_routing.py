"""Config keys of replica and database routing: `users.<name>.read_only` / `server_user`,
`databases.<name>.replica_fallback` / `read_only_transactions`, and the catch-all `'*'` entry; each bad
value is reported at its file:line:col."""

from __future__ import annotations

import pytest
from support.config_text import load, problems

GOOD = """\
clusters:
  main: {nodes: [127.0.0.1:5432, 127.0.0.1:5433]}
  other: {nodes: [127.0.0.1:5434]}
databases:
  myapp: {cluster: main, replica_fallback: error, read_only_transactions: primary}
  reports: {cluster: other, database: warehouse}
  '*': {cluster: main}
users:
  myapp: {password: myapp}
  myapp_ro: {password: ro, read_only: true, server_user: myapp}
"""


def test_routing_keys_and_defaults() -> None:
    config = load(GOOD)
    assert config.databases["myapp"].replica_fallback == "error"
    assert config.databases["myapp"].read_only_transactions == "primary"
    assert config.databases["reports"].replica_fallback == "primary"
    assert config.databases["reports"].read_only_transactions == "replica"
    assert config.users["myapp_ro"].read_only is True
    assert config.users["myapp_ro"].server_user == "myapp"
    assert config.users["myapp"].read_only is False and config.users["myapp"].server_user is None


def test_catch_all_entry_serves_unlisted_databases() -> None:
    config = load(GOOD)
    assert config.database_for("myapp") is config.databases["myapp"]
    assert config.database_for("test_myapp") is config.databases["*"]
    assert config.database_for("reports") is config.databases["reports"]
    without = load(GOOD.replace("  '*': {cluster: main}\n", ""))
    assert without.database_for("test_myapp") is None


def test_database_on_an_unknown_cluster() -> None:
    text = GOOD.replace("reports: {cluster: other,", "reports: {cluster: elsewhere,")
    assert problems(text) == [
        "halephant.yaml:6:22: databases.reports.cluster: no cluster named 'elsewhere' "
        "(clusters defined: main, other)"
    ]


def test_catch_all_on_an_unknown_cluster_and_with_a_database_name() -> None:
    text = GOOD.replace("'*': {cluster: main}", "'*': {cluster: nowhere, database: x}")
    assert problems(text) == [
        "halephant.yaml:7:18: databases.*.cluster: no cluster named 'nowhere' "
        "(clusters defined: main, other)",
        "halephant.yaml:7:37: databases.*.database: the '*' entry serves every database under the client's "
        "own name: remove database:",
    ]


def test_bad_routing_values() -> None:
    text = (
        GOOD.replace("replica_fallback: error", "replica_fallback: replica")
        .replace("read_only_transactions: primary", "read_only_transactions: yes")
        .replace("read_only: true", 'read_only: "yes"')
    )
    assert problems(text) == [
        "halephant.yaml:5:44: databases.myapp.replica_fallback: Input should be 'primary' or 'error'",
        "halephant.yaml:5:77: databases.myapp.read_only_transactions: Input should be 'replica' or 'primary'",
        "halephant.yaml:10:39: users.myapp_ro.read_only: Input should be a valid boolean",
    ]


@pytest.mark.parametrize(
    ("server_user", "message"),
    [
        ("nobody", "no user named 'nobody' (users defined: myapp)"),
        ("myapp_ro", "a user cannot be its own server_user; leave server_user out"),
    ],
)
def test_bad_server_user(server_user: str, message: str) -> None:
    text = GOOD.replace("server_user: myapp}", f"server_user: {server_user}}}")
    assert problems(text) == [f"halephant.yaml:10:58: users.myapp_ro.server_user: {message}"]


def test_server_user_chains_are_refused() -> None:
    text = GOOD + "  report: {password: r, server_user: myapp_ro}\n"
    assert problems(text) == [
        "halephant.yaml:11:38: users.report.server_user: user 'myapp_ro' has a server_user of its own: "
        "name the user that logs in upstream"
    ]


def test_the_example_file_documents_every_routing_key() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "halephant.yaml").read_text()
    for key in ("read_only:", "server_user:", "replica_fallback:", "read_only_transactions:", "'*':"):
        assert key in text, f"halephant.yaml does not document {key}"
