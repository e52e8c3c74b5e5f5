"""The operations keys (limits, reserve pool, timeouts, shutdown, the caps across pools) with their
positions, and the diff a reload applies (`halephant.config.diff`): entries added and removed as a
whole, secrets never shown, restart-only settings marked."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.config_text import load, problems

from halephant.config.diff import config_tree, diff_configs, diff_trees, redact_tree

BASE = """\
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


def test_defaults() -> None:
    config = load(BASE)
    limits = config.limits
    assert (limits.max_client_conn, limits.shutdown_timeout, limits.query_wait_notify) == (10000, 30.0, 5.0)
    assert (limits.client_idle_timeout, limits.idle_transaction_timeout, limits.query_timeout) == (0, 0, 0)
    db = config.databases["myapp"]
    assert (db.reserve_pool_size, db.reserve_pool_timeout, db.max_client_conn) == (0, 5.0, None)
    assert (db.client_idle_timeout, db.idle_transaction_timeout, db.query_timeout) == (None, None, None)
    assert config.users["myapp"].max_client_conn is None


def test_values_are_read() -> None:
    config = load(
        BASE.replace("cluster: main", "cluster: main\n    reserve_pool_size: 3\n    query_timeout: 2s")
        + "limits:\n  max_client_conn: 50\n  shutdown_timeout: 1m\n  client_idle_timeout: 10m\n"
    )
    assert config.databases["myapp"].reserve_pool_size == 3
    assert config.databases["myapp"].query_timeout == 2.0
    assert (config.limits.max_client_conn, config.limits.shutdown_timeout) == (50, 60.0)
    assert config.limits.client_idle_timeout == 600.0


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        pytest.param(
            "limits:\n  max_client_conn: 0\n",
            "halephant.yaml:11:20: limits.max_client_conn: Input should be greater than or equal to 1",
            id="max-client-conn-zero",
        ),
        pytest.param(
            "limits:\n  shutdown_timeout: later\n",
            "halephant.yaml:11:21: limits.shutdown_timeout: expected a duration like 500ms, 30s, 5m, 1h, 1d "
            "or a number of seconds; got 'later'",
            id="shutdown-timeout",
        ),
        pytest.param(
            "limits:\n  query_wait_notify: -1\n",
            "halephant.yaml:11:22: limits.query_wait_notify: a duration must be a finite number of seconds, "
            "0 or more; got -1",
            id="negative-duration",
        ),
        pytest.param(
            "limits:\n  idle_transaction_timout: 5s\n",
            "halephant.yaml:11:3: limits.idle_transaction_timout: unknown key; did you mean "
            "'idle_transaction_timeout'?",
            id="misspelt",
        ),
    ],
)
def test_limits_errors(tail: str, expected: str) -> None:
    assert problems(BASE + tail) == [expected]


def test_database_and_user_errors() -> None:
    text = BASE.replace(
        "cluster: main", "cluster: main\n    reserve_pool_size: -1\n    client_idle_timeout: x"
    )
    text = text.replace("password: secret", "password: secret\n    max_client_conn: many")
    assert problems(text) == [
        "halephant.yaml:7:24: databases.myapp.reserve_pool_size: Input should be greater than or equal to 0",
        "halephant.yaml:8:26: databases.myapp.client_idle_timeout: expected a duration like 500ms, 30s, 5m, "
        "1h, 1d or a number of seconds; got 'x'",
        "halephant.yaml:12:22: users.myapp.max_client_conn: expected a whole number, got a string",
    ]


def test_caps_across_pools_default_to_none_and_are_read() -> None:
    config = load(BASE)
    assert config.databases["myapp"].max_db_connections is None
    assert config.users["myapp"].max_user_connections is None
    config = load(
        BASE.replace("cluster: main", "cluster: main\n    max_db_connections: 40")
        + "  app_ro:\n    password: ro\n    server_user: myapp\n"
    )
    assert config.databases["myapp"].max_db_connections == 40
    config = load(BASE + "    max_user_connections: 3\n")
    assert config.users["myapp"].max_user_connections == 3


@pytest.mark.parametrize(
    ("db_value", "user_value", "expected"),
    [
        pytest.param(
            "0",
            "-2",
            [
                "halephant.yaml:7:25: databases.myapp.max_db_connections: Input should be greater than or "
                "equal to 1",
                "halephant.yaml:11:27: users.myapp.max_user_connections: Input should be greater than or "
                "equal to 1",
            ],
            id="zero-and-negative",
        ),
        pytest.param(
            '"10"',
            "2.5",
            [
                "halephant.yaml:7:25: databases.myapp.max_db_connections: expected a whole number, "
                "got a string",
                "halephant.yaml:11:27: users.myapp.max_user_connections: expected a whole number, "
                "got a decimal number",
            ],
            id="wrong-types",
        ),
        pytest.param(
            "true",
            "[1]",
            [
                "halephant.yaml:7:25: databases.myapp.max_db_connections: expected a whole number, got a "
                "boolean",
                "halephant.yaml:11:5: users.myapp.max_user_connections: expected a whole number, got a list",
            ],
            id="boolean-and-list",
        ),
    ],
)
def test_caps_across_pools_errors(db_value: str, user_value: str, expected: list[str]) -> None:
    text = BASE.replace("cluster: main", f"cluster: main\n    max_db_connections: {db_value}")
    text += f"    max_user_connections: {user_value}\n"
    assert problems(text) == expected


def test_an_alias_has_no_max_user_connections_of_its_own() -> None:
    # it logs in upstream as its server_user: that user's cap counts its connections
    text = BASE + "  myapp_ro:\n    password: ro\n    server_user: myapp\n    max_user_connections: 2\n"
    assert problems(text) == [
        "halephant.yaml:13:27: users.myapp_ro.max_user_connections: this user logs in upstream as 'myapp', "
        "whose cap counts its connections too: set max_user_connections under users.myapp instead"
    ]


def test_check_reports_a_bad_cap_with_its_position(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from halephant.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("cluster: main", "cluster: main\n    max_db_connections: 0"))
    result = CliRunner().invoke(main, ["check", "-c", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:7:25: databases.myapp.max_db_connections: Input should be greater than or equal to 1" in (
        result.output
    )


def test_diff_reports_entries_leaves_and_restarts() -> None:
    old = load(BASE + "users:\n  bob:\n    password: hunter2\n".replace("users:\n", ""))
    new = load(
        BASE.replace("password: secret", "password: other-secret").replace("[127.0.0.1:5432]", "[h:1, h:2]")
        + "  carol:\n    password: carolpw\nlisten: 0.0.0.0:7000\nlimits:\n  query_timeout: 3s\n"
        "plugins:\n  disable: [cursor_guard]\n"
    )
    lines = [str(c) for c in diff_configs(old, new)]
    assert lines == [
        "~ listen: 127.0.0.1:6432 -> 0.0.0.0:7000 (needs a restart)",
        "~ clusters.main.nodes: [127.0.0.1:5432] -> [h:1, h:2]",
        "~ users.myapp.password: changed (secret, not shown)",
        "- users.bob: removed",
        "+ users.carol: added",
        "~ limits.query_timeout: 0.0 -> 3.0",
        "~ plugins.disable: [] -> [cursor_guard] (needs a restart)",
    ]
    text = "\n".join(lines)
    for secret in ("secret", "other-secret", "hunter2", "carolpw"):
        assert f" {secret}" not in text and f"{secret} " not in text


def test_diff_of_equal_configs_is_empty_and_trees_work_redacted() -> None:
    config = load(BASE)
    assert diff_configs(config, load(BASE)) == []
    running = redact_tree(config_tree(config))
    assert running["users"]["myapp"]["password"] == "(secret)"
    assert "secret" not in repr(running).replace("(secret)", "")
    changed = load(BASE.replace("cluster: main", "cluster: main\n    pool_size: 7"))
    assert [str(c) for c in diff_trees(running, redact_tree(config_tree(changed)))] == [
        "~ databases.myapp.pool_size: 20 -> 7"
    ]


def test_check_against_prints_the_dry_run(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from halephant.cli import main

    old, new, bad = tmp_path / "old.yaml", tmp_path / "new.yaml", tmp_path / "bad.yaml"
    old.write_text(BASE)
    new.write_text(BASE.replace("password: secret", "password: s3cret-two") + "listen: 127.0.0.1:7000\n")
    bad.write_text(BASE + "limits:\n  query_timeout: never\n")
    result = CliRunner().invoke(main, ["check", "-c", str(new), "--against", str(old)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [
        f"a reload from {old} would apply 1 change(s):",
        "  ~ listen: 127.0.0.1:6432 -> 127.0.0.1:7000 (needs a restart)",
        "  ~ users.myapp.password: changed (secret, not shown)",
        "1 change(s) need a restart",
    ]
    assert "s3cret" not in result.output
    same = CliRunner().invoke(main, ["check", "-c", str(old), "--against", str(old)])
    assert same.exit_code == 0 and f"no changes from {old}" in same.output
    broken = CliRunner().invoke(main, ["check", "-c", str(bad), "--against", str(old)])
    assert broken.exit_code == 1
    assert f"{bad}:11:18: limits.query_timeout" in broken.output
