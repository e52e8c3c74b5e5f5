"""Config keys of users looked up in PostgreSQL: `databases.<name>.auth_user`, `auth_query`,
`auth_dbname` and `auth_cache`, and the checks that span them and `users:`; each bad value is reported at
its file:line:col."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.config_text import load, problems

from halephant.config.schema import DEFAULT_AUTH_QUERY

VERIFIER = "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "="
GOOD = f"""\
clusters:
  main: {{nodes: [127.0.0.1:5432]}}
databases:
  myapp: {{cluster: main, auth_user: lookup, auth_query: "SELECT u, p FROM f($1)", auth_dbname: postgres}}
  other: {{cluster: main, auth_user: lookup, auth_cache: 0s}}
  plain: {{cluster: main}}
users:
  lookup: {{password: lookup-pw}}
  hashed: {{password: md50123456789abcdef0123456789abcdef, auth: md5}}
  verifier: {{password: "{VERIFIER}"}}
"""


def test_auth_query_keys_and_defaults() -> None:
    config = load(GOOD)
    myapp, other, plain = (config.databases[name] for name in ("myapp", "other", "plain"))
    assert (myapp.auth_user, myapp.auth_query, myapp.auth_dbname) == (
        "lookup",
        "SELECT u, p FROM f($1)",
        "postgres",
    )
    assert myapp.auth_cache == 60.0 and other.auth_cache == 0.0
    assert other.auth_query == DEFAULT_AUTH_QUERY == "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    assert other.auth_dbname is None and plain.auth_user is None
    # an md5 hash logs in upstream as it is: good enough for an auth_user
    assert load(GOOD.replace("auth_user: lookup, auth_cache", "auth_user: hashed, auth_cache"))


def test_auth_user_not_under_users() -> None:
    assert problems(
        GOOD.replace("other: {cluster: main, auth_user: lookup", "other: {cluster: main, auth_user: nobody")
    ) == [
        "halephant.yaml:5:37: databases.other.auth_user: no user named 'nobody' under users: "
        "(lookup, hashed, verifier)"
    ]


def test_auth_user_with_only_a_verifier() -> None:
    text = GOOD.replace(
        "other: {cluster: main, auth_user: lookup", "other: {cluster: main, auth_user: verifier"
    )
    assert problems(text) == [
        "halephant.yaml:5:37: databases.other.auth_user: user 'verifier' has only a SCRAM verifier, "
        "which logs in upstream only after a client of its own has: set users.verifier.server_password"
    ]


@pytest.mark.parametrize(
    ("good", "bad", "problem"),
    [
        (
            '"SELECT u, p FROM f($1)"',
            "\"SELECT u, p FROM f('x')\"",
            "4:57: databases.myapp.auth_query: auth_query must name the user as $1 (sent as a parameter), "
            "like SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
        ),
        (
            "auth_dbname: postgres",
            'auth_dbname: ""',
            "4:96: databases.myapp.auth_dbname: String should have at least 1 character",
        ),
        (
            "auth_cache: 0s",
            "auth_cache: -1s",
            "5:57: databases.other.auth_cache: expected a duration like 500ms, 30s, 5m, 1h, 1d or a number "
            "of seconds; got '-1s'",
        ),
    ],
)
def test_bad_auth_query_values(good: str, bad: str, problem: str) -> None:
    assert problems(GOOD.replace(good, bad)) == [f"halephant.yaml:{problem}"]


def test_the_example_file_documents_every_auth_query_key() -> None:
    text = (Path(__file__).resolve().parents[2] / "halephant.yaml").read_text()
    for key in ("auth_user:", "auth_query:", "auth_dbname:", "auth_cache:"):
        assert key in text, f"halephant.yaml does not document {key}"
