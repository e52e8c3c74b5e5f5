"""The `admin:` section: defaults, and errors reported at file:line:col."""

from __future__ import annotations

from support.config_text import load, problems

BASE = """\
clusters:
  main:
    nodes: [127.0.0.1:5433]
databases:
  myapp:
    cluster: main
users:
  myapp:
    password: secret
"""


def test_defaults_listen_on_loopback_with_no_console_users() -> None:
    admin = load(BASE).admin
    assert admin.listen is not None and (admin.listen.host, admin.listen.port) == ("127.0.0.1", 6433)
    assert admin.users == () and admin.stats_users == ()


def test_listen_null_turns_the_api_off() -> None:
    assert load(BASE + "admin:\n  listen: null\n").admin.listen is None


def test_console_users_must_be_configured_users() -> None:
    text = BASE + "admin:\n  users: [myapp, ghost]\n  stats_users: [phantom]\n"
    assert problems(text) == [
        "halephant.yaml:11:18: admin.users.1: no user named 'ghost' under users:",
        "halephant.yaml:12:17: admin.stats_users.0: no user named 'phantom' under users:",
    ]


def test_bad_listen_and_unknown_key() -> None:
    text = BASE + "admin:\n  listen: nowhere\n  port: 1\n"
    found = problems(text)
    assert found[0].startswith("halephant.yaml:11:11: admin.listen: expected host:port")
    assert found[1].startswith("halephant.yaml:12:3: admin.port: unknown key")


def test_admin_database_names_are_reserved() -> None:
    text = """\
clusters:
  main:
    nodes: [127.0.0.1:5433]
databases:
  myapp:
    cluster: main
  pgbouncer:
    cluster: main
users:
  myapp:
    password: secret
"""
    assert problems(text) == [
        "halephant.yaml:7:3: databases.pgbouncer: this name is the admin console's; pick another"
    ]
