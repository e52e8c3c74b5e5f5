"""Loading halephant.yaml: defaults, every error kind with its exact position, many errors at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from support.config_text import load, problems

from halephant.config import (
    ConfigError,
    HostPort,
    load_config,
    read_config,
    read_config_text,
)

MINIMAL = """\
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

# The same valid head before each error case, so the case's own lines start at line 10.
HEAD = MINIMAL


def test_minimal_file_gets_defaults() -> None:
    config = load(MINIMAL)
    assert config.source == "halephant.yaml"
    assert config.listen == HostPort(host="127.0.0.1", port=6432)
    assert config.clusters["main"].nodes == (HostPort(host="127.0.0.1", port=5432),)
    assert config.clusters["main"].name == "main"
    assert config.clusters["main"].primary == HostPort(host="127.0.0.1", port=5432)
    db = config.databases["myapp"]
    assert (db.name, db.cluster, db.database, db.server_database) == ("myapp", "main", None, "myapp")
    assert (db.mode, db.pool_size, db.min_pool_size) == ("transaction", 20, 0)
    assert (db.idle_timeout, db.max_lifetime, db.checkout_timeout) == (300.0, 3600.0, 30.0)
    assert db.server_reset_query == "DISCARD ALL"
    user = config.users["myapp"]
    assert (user.name, user.auth, user.password) == ("myapp", "scram-sha-256", "secret")
    assert user.server_password is None
    assert user.upstream_password == "secret"
    assert not user.password_is_hashed
    assert config.limits.max_message_size == 64 * 1024 * 1024
    assert (config.limits.login_timeout, config.limits.connect_timeout) == (15.0, 5.0)
    assert (config.logging.level, config.logging.format) == ("info", "text")
    assert config.plugins.disable == ()
    assert config.plugin_settings("cursor_guard") is None


def test_every_key_set() -> None:
    config = load(
        """\
        listen: "[::1]:7000"
        clusters:
          main:
            nodes:
              - 10.0.0.1:5432
              - db2.internal:5433
        databases:
          app:
            cluster: main
            database: app_production
            mode: session
            pool_size: 50
            min_pool_size: 5
            idle_timeout: 90s
            max_lifetime: 2h
            checkout_timeout: 1500ms
            server_reset_query: ""
        users:
          app:
            password: "SCRAM-SHA-256$4096:c2FsdA==$U1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1M=:\
S0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0s="
            server_password: app-plain
            auth: scram-sha-256
          legacy:
            password: md5b2c0ba0f4a1f6d0e6b0f9e4a4b8b3c6d
            server_password: legacy-plain
            auth: md5
          local:
            auth: trust
        limits:
          max_message_size: 1MB
          login_timeout: 1m
          connect_timeout: 2.5
        logging:
          level: debug
          format: json
        plugins:
          disable: [cursor_guard]
        """
    )
    assert str(config.listen) == "[::1]:7000"
    assert [str(n) for n in config.clusters["main"].nodes] == ["10.0.0.1:5432", "db2.internal:5433"]
    db = config.databases["app"]
    assert db.server_database == "app_production"
    assert (db.mode, db.pool_size, db.min_pool_size) == ("session", 50, 5)
    assert (db.idle_timeout, db.max_lifetime, db.checkout_timeout) == (90.0, 7200.0, 1.5)
    assert db.server_reset_query == ""
    assert config.users["app"].password_is_hashed
    assert config.users["app"].upstream_password == "app-plain"
    assert config.users["legacy"].upstream_password == "legacy-plain"
    assert config.users["local"].password is None
    assert config.users["local"].upstream_password is None
    assert config.limits.max_message_size == 1024 * 1024
    assert (config.limits.login_timeout, config.limits.connect_timeout) == (60.0, 2.5)
    assert (config.logging.level, config.logging.format) == ("debug", "json")
    assert config.plugins.disable == ("cursor_guard",)


def test_config_is_frozen_and_repr_hides_passwords() -> None:
    config = load(MINIMAL)
    with pytest.raises(ValidationError):
        config.databases["myapp"].pool_size = 3
    assert "secret" not in repr(config)


def test_read_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "halephant.yaml"
    path.write_text(MINIMAL)
    config = load_config(path)
    assert config.source == str(path)
    assert read_config(str(path)).data["users"]["myapp"]["password"] == "secret"


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as excinfo:
        read_config(path)
    assert str(excinfo.value) == f"{path}:1:1: cannot read the file: No such file or directory"


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "halephant.yaml"
    path.write_bytes(b"listen: 127.0.0.1:6432\nusers:\n  caf\xe9: {}\n")
    with pytest.raises(ConfigError) as excinfo:
        read_config(path)
    assert str(excinfo.value) == f"{path}:3:6: the file is not valid UTF-8"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "clusters:\n  main:\n    nodes: [127.0.0.1:5432\n",
            "halephant.yaml:4:1: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence at line 3)",
            id="unclosed-flow-sequence",
        ),
        pytest.param(
            "listen: a: b\n",
            "halephant.yaml:1:10: mapping values are not allowed here",
            id="mapping-in-scalar",
        ),
        pytest.param(
            "users:\n  myapp:\n    password: 'abc\n",
            "halephant.yaml:4:1: found unexpected end of stream (while scanning a quoted scalar at line 3)",
            id="unterminated-quote",
        ),
        pytest.param(
            "users:\n  myapp:\n    password: hunter2\n    password: hunter3\n",
            "halephant.yaml:4:5: users.myapp.password: duplicate key 'password' (first at line 3): "
            "write each key once",
            id="duplicate-key",
        ),
        pytest.param(
            "- listen\n- clusters\n",
            "halephant.yaml:1:1: the file must be a mapping of settings "
            "(listen:, clusters:, databases:, users:, ...)",
            id="top-level-list",
        ),
        pytest.param(
            "just a string\n",
            "halephant.yaml:1:1: the file must be a mapping of settings "
            "(listen:, clusters:, databases:, users:, ...)",
            id="top-level-scalar",
        ),
    ],
)
def test_yaml_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        read_config_text(text, "halephant.yaml")
    assert [str(p) for p in excinfo.value.problems] == [expected]
    assert "hunter" not in str(excinfo.value)


def test_every_duplicate_key_is_reported_with_its_path() -> None:
    text = (
        "clusters:\n  main: {nodes: [127.0.0.1:5432], nodes: [127.0.0.1:5433]}\n"
        "databases:\n  app:\n    pool_size: 3\n    cluster: main\n    pool_size: 4\n"
        "users:\n  - {password: a}\n  - {password: b, password: c}\n"
        "anchored: &loop\n  - *loop\n"
        "base: &base {mode: session}\nmerged:\n  <<: *base\n  <<: *base\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        read_config_text(text, "halephant.yaml")
    assert [str(p) for p in excinfo.value.problems] == [
        "halephant.yaml:2:35: clusters.main.nodes: duplicate key 'nodes' (first at line 2): "
        "write each key once",
        "halephant.yaml:7:5: databases.app.pool_size: duplicate key 'pool_size' (first at line 5): "
        "write each key once",
        "halephant.yaml:10:19: users.1.password: duplicate key 'password' (first at line 10): "
        "write each key once",
    ]


def test_empty_file_lists_required_sections() -> None:
    assert problems("# nothing yet\n") == [
        "halephant.yaml:1:1: clusters: this key is required",
        "halephant.yaml:1:1: databases: this key is required",
        "halephant.yaml:1:1: users: this key is required",
    ]


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        pytest.param(
            "lisen: 127.0.0.1:6432\n",
            "halephant.yaml:10:1: lisen: unknown key; did you mean 'listen'?",
            id="unknown-top-level-key",
        ),
        pytest.param(
            "frobnicate: 1\n",
            "halephant.yaml:10:1: frobnicate: unknown key; expected one of: "
            "listen, unix_socket_dir, unix_socket_mode, unix_socket_group, clusters, databases, users, "
            "limits, topology, logging, plugins, admin, client_tls",
            id="unknown-key-no-suggestion",
        ),
        pytest.param(
            "limits:\n  max_mesage_size: 1MB\n",
            "halephant.yaml:11:3: limits.max_mesage_size: unknown key; did you mean 'max_message_size'?",
            id="unknown-nested-key",
        ),
        pytest.param(
            "listen: localhost\n",
            "halephant.yaml:10:9: listen: expected host:port like 127.0.0.1:5432 or [::1]:5432; "
            "got 'localhost'",
            id="listen-without-port",
        ),
        pytest.param(
            "listen: ::1:6432\n",
            "halephant.yaml:10:9: listen: write an IPv6 address in brackets, like [::1]:5432; got '::1:6432'",
            id="listen-ipv6-unbracketed",
        ),
        pytest.param(
            "listen: 6432\n",
            "halephant.yaml:10:9: listen: expected host:port like 127.0.0.1:5432 or [::1]:5432; got 6432",
            id="listen-number",
        ),
        pytest.param(
            "limits:\n  max_message_size: 64 megs\n",
            "halephant.yaml:11:21: limits.max_message_size: expected a size like 512kB, 64MB, 1GB or a whole "
            "number of bytes; got '64 megs'",
            id="bad-size",
        ),
        pytest.param(
            "limits:\n  max_message_size: 512B\n",
            "halephant.yaml:11:21: limits.max_message_size: Input should be greater than or equal to 1024",
            id="size-below-minimum",
        ),
        pytest.param(
            "limits:\n  login_timeout: soon\n",
            "halephant.yaml:11:18: limits.login_timeout: expected a duration like 500ms, 30s, 5m, 1h, 1d "
            "or a number of seconds; got 'soon'",
            id="bad-duration",
        ),
        pytest.param(
            "limits:\n  connect_timeout: 0s\n",
            "halephant.yaml:11:20: limits.connect_timeout: Input should be greater than 0",
            id="zero-duration",
        ),
        pytest.param(
            "logging:\n  level: verbose\n",
            "halephant.yaml:11:10: logging.level: Input should be 'debug', 'info', 'warning' or 'error'",
            id="bad-enum",
        ),
        pytest.param(
            "logging: [info]\n",
            "halephant.yaml:10:1: logging: expected a mapping, got a list",
            id="section-not-a-mapping",
        ),
        pytest.param(
            "plugins:\n  disable: cursor_guard\n",
            "halephant.yaml:11:12: plugins.disable: expected a list, got a string",
            id="disable-not-a-list",
        ),
    ],
)
def test_top_level_errors(tail: str, expected: str) -> None:
    assert problems(HEAD + tail) == [expected]


def test_decimal_for_whole_number() -> None:
    assert problems(HEAD.replace("cluster: main", "cluster: main\n    pool_size: 2.5")) == [
        "halephant.yaml:7:16: databases.myapp.pool_size: expected a whole number, got a decimal number",
    ]


def test_clusters_errors() -> None:
    text = """\
    clusters:
      main:
        nodes: [127.0.0.1:5432, 127.0.0.1:5432, 127.0.0.1:0, "127.0.0.1:x"]
      empty:
        nodes: []
      nothing:
        nodes:
      wrong: 127.0.0.1:5432
      nokey: {}
    databases:
      myapp: {cluster: main}
    users:
      myapp: {password: secret}
    """
    assert problems(text) == [
        "halephant.yaml:3:29: clusters.main.nodes.1: 127.0.0.1:5432 is listed twice",
        "halephant.yaml:3:45: clusters.main.nodes.2: a server node needs a real port, not 0",
        "halephant.yaml:3:58: clusters.main.nodes.3: the port must be a number from 0 to 65535; "
        "got '127.0.0.1:x'",
        "halephant.yaml:5:5: clusters.empty.nodes: must not be empty",
        "halephant.yaml:7:5: clusters.nothing.nodes: expected a list, got nothing",
        "halephant.yaml:8:10: clusters.wrong: expected a mapping, got a string",
        "halephant.yaml:9:3: clusters.nokey.nodes: this key is required",
    ]


def test_database_errors() -> None:
    text = """\
    clusters:
      main:
        nodes: [127.0.0.1:5432]
    databases:
      myapp:
        cluster: mian
        pool_size: "20"
        min_pool_size: -1
        mode: statment
        idle_timeout: 5 min
        pool_sise: 3
      small:
        cluster: main
        pool_size: 2
        min_pool_size: 5
      zero:
        cluster: main
        pool_size: 0
        min_pool_size: 5
      nameless:
        database: ""
      7:
        cluster: main
    users:
      myapp: {password: secret}
    """
    assert problems(text) == [
        "halephant.yaml:6:14: databases.myapp.cluster: no cluster named 'mian' (clusters defined: main)",
        "halephant.yaml:7:16: databases.myapp.pool_size: expected a whole number, got a string",
        "halephant.yaml:8:20: databases.myapp.min_pool_size: Input should be greater than or equal to 0",
        "halephant.yaml:9:11: databases.myapp.mode: Input should be 'transaction', 'session' or 'statement'",
        "halephant.yaml:10:19: databases.myapp.idle_timeout: expected a duration like 500ms, 30s, 5m, 1h, 1d "
        "or a number of seconds; got '5 min'",
        "halephant.yaml:11:5: databases.myapp.pool_sise: unknown key; did you mean 'pool_size'?",
        "halephant.yaml:15:20: databases.small.min_pool_size: min_pool_size (5) cannot be larger than "
        "pool_size (2)",
        "halephant.yaml:18:16: databases.zero.pool_size: Input should be greater than or equal to 1",
        "halephant.yaml:20:3: databases.nameless.cluster: this key is required",
        "halephant.yaml:21:15: databases.nameless.database: String should have at least 1 character",
        "halephant.yaml:22:3: databases.7: expected a string, got a number",
    ]


def test_null_and_boolean_keys_are_located_and_named_as_written() -> None:
    text = (
        "clusters:\n  main: {nodes: [127.0.0.1:5432]}\n"
        "databases:\n  app: {cluster: main}\n  true:\n    cluster: main\n  ~:\n    cluster: main\n"
        "users:\n  app: {password: secret}\n  null: {password: secret}\n"
    )
    assert problems(text) == [
        "halephant.yaml:5:3: databases.true: expected a string, got a boolean",
        "halephant.yaml:7:3: databases.null: expected a string, got nothing",
        "halephant.yaml:11:3: users.null: expected a string, got nothing",
    ]


SCRAM = (
    "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$U1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1M=:"
    "S0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0s="
)
MD5 = "md5" + "0123456789abcdef" * 2


def test_user_errors() -> None:
    text = f"""\
    clusters:
      main:
        nodes: [127.0.0.1:5432]
    databases:
      myapp: {{cluster: main}}
    users:
      verifier:
        password: "{SCRAM}"
        auth: trust
      hashed:
        password: {MD5}
        server_password: plain-text-secret
        auth: md5
      scram_for_md5:
        password: "{SCRAM}"
        server_password: plain-text-secret
        auth: md5
      md5_for_scram:
        password: {MD5}
        server_password: plain-text-secret
        auth: scram-sha-256
      hashed_upstream:
        password: plain-text-secret
        server_password: {MD5}
      missing:
        auth: md5
      empty:
        password: ""
      numeric:
        password: 123456
      trusted:
        auth: trust
      wrong_auth:
        password: plain-text-secret
        auth: SCRAM
      short_keys:
        password: "SCRAM-SHA-256$4096:c2FsdA==$U3RvcmVkS2V5:U2VydmVyS2V5"
        server_password: plain-text-secret
      no_keys:
        password: "SCRAM-SHA-256$4096:abc$def"
        server_password: plain-text-secret
      endless:
        password: "{SCRAM.replace("$4096:", "$99999999999:")}"
        server_password: plain-text-secret
    """
    found = problems(text)
    assert found == [
        "halephant.yaml:8:15: users.verifier.password: with auth: trust no client logs in by SCRAM, so this "
        "verifier cannot log in upstream: set server_password to the plaintext password",
        "halephant.yaml:15:15: users.scram_for_md5.password: a SCRAM-SHA-256 verifier cannot check md5 "
        "logins: use auth: scram-sha-256, or give the plaintext password or its md5 hash",
        "halephant.yaml:19:15: users.md5_for_scram.password: an md5 hash cannot check SCRAM-SHA-256 logins: "
        "use auth: md5, or give the plaintext password or a SCRAM verifier",
        "halephant.yaml:24:22: users.hashed_upstream.server_password: server_password must be the plaintext "
        "password, not a SCRAM verifier or md5 hash",
        "halephant.yaml:25:3: users.missing.password: a password is required with auth: md5 "
        "(or use auth: trust)",
        "halephant.yaml:28:15: users.empty.password: the password is empty; "
        "use auth: trust to allow no password",
        "halephant.yaml:30:15: users.numeric.password: expected a string, got a number",
        "halephant.yaml:35:11: users.wrong_auth.auth: Input should be 'scram-sha-256', 'md5' or 'trust'",
        "halephant.yaml:37:15: users.short_keys.password: not a SCRAM-SHA-256 verifier: StoredKey and "
        "ServerKey must be 32 bytes each "
        "(expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, as in pg_authid)",
        "halephant.yaml:40:15: users.no_keys.password: not a SCRAM-SHA-256 verifier: expected "
        "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, as in pg_authid",
        "halephant.yaml:43:15: users.endless.password: not a SCRAM-SHA-256 verifier: the iteration count "
        "must be a number from 1 to 2147483647 "
        "(expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, as in pg_authid)",
    ]
    joined = "\n".join(found)
    for secret in (SCRAM, MD5, "plain-text-secret", "123456"):
        assert secret not in joined


def test_a_verifier_or_md5_hash_alone_logs_in_upstream_by_pass_through() -> None:
    # no server_password: halephant logs in with the hash itself (md5), or with the key a client's SCRAM
    # login gives (a verifier), as PgBouncer does; a configured server_password still comes first
    text = f"""\
    clusters:
      main:
        nodes: [127.0.0.1:5432]
    databases:
      myapp: {{cluster: main}}
    users:
      verifier:
        password: "{SCRAM}"
      hashed:
        password: {MD5}
        auth: md5
      hashed_trusted:
        password: {MD5}
        auth: trust
      both:
        password: "{SCRAM}"
        server_password: plain-text-secret
    """
    users = load(text).users
    assert (users["verifier"].upstream_password, users["verifier"].upstream_secret) == (None, SCRAM)
    assert (users["hashed"].upstream_password, users["hashed"].upstream_secret) == (None, MD5)
    assert users["both"].upstream_secret == "plain-text-secret"


def test_many_errors_reported_together_in_file_order() -> None:
    text = """\
    listen: 127.0.0.1
    clusters:
      main:
        nodes: []
    databases:
      myapp:
        cluster: other
        pool_size: many
        checkout_timeout: forever
    users:
      myapp:
        password: "SCRAM-SHA-256$4096:c2FsdA==$U1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1M=:\
S0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0s="
        auth: md5
    limits:
      max_message_size: huge
    logging:
      format: xml
    extra: true
    """
    assert problems(text) == [
        "halephant.yaml:1:9: listen: expected host:port like 127.0.0.1:5432 or [::1]:5432; got '127.0.0.1'",
        "halephant.yaml:4:5: clusters.main.nodes: must not be empty",
        "halephant.yaml:7:14: databases.myapp.cluster: no cluster named 'other' (clusters defined: main)",
        "halephant.yaml:8:16: databases.myapp.pool_size: expected a whole number, got a string",
        "halephant.yaml:9:23: databases.myapp.checkout_timeout: expected a duration like 500ms, 30s, 5m, 1h, "
        "1d or a number of seconds; got 'forever'",
        "halephant.yaml:12:15: users.myapp.password: a SCRAM-SHA-256 verifier cannot check md5 logins: "
        "use auth: scram-sha-256, or give the plaintext password or its md5 hash",
        "halephant.yaml:15:21: limits.max_message_size: expected a size like 512kB, 64MB, 1GB or a whole "
        "number of bytes; got 'huge'",
        "halephant.yaml:17:11: logging.format: Input should be 'text' or 'json'",
        "halephant.yaml:18:1: extra: unknown key; expected one of: "
        "listen, unix_socket_dir, unix_socket_mode, unix_socket_group, clusters, databases, users, limits, "
        "topology, logging, plugins, admin, client_tls",
    ]


def test_config_error_message_is_one_line_per_problem() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(HEAD + "logging:\n  level: loud\n  format: xml\n")
    assert str(excinfo.value) == (
        "halephant.yaml:11:10: logging.level: Input should be 'debug', 'info', 'warning' or 'error'\n"
        "halephant.yaml:12:11: logging.format: Input should be 'text' or 'json'"
    )


def test_trust_needs_no_password() -> None:
    config = load(HEAD + "  local:\n    auth: trust\n")
    assert config.users["local"].password is None


def test_yaml_tags_are_refused() -> None:
    assert problems(HEAD + "  other:\n    password: !env OTHER_PASSWORD\n") == [
        "halephant.yaml:11:15: users.other.password: YAML tags such as !env are not supported",
    ]
    assert load(HEAD + "  other:\n    password: !!str 1234\n").users["other"].password == "1234"


def test_anchors_and_merge_keys() -> None:
    config = load(
        """\
        clusters:
          main:
            nodes: [127.0.0.1:5432]
        databases:
          base: &defaults
            cluster: main
            pool_size: 5
          reports:
            <<: *defaults
            mode: session
        users:
          myapp: {password: secret}
        """
    )
    assert config.databases["reports"].pool_size == 5
    assert config.databases["reports"].mode == "session"
    # A problem in a merged-in key has no position of its own in the entry: the entry is shown.
    assert problems(
        """\
        clusters:
          main:
            nodes: [127.0.0.1:5432]
        databases:
          base: &defaults
            cluster: nowhere
          reports:
            <<: *defaults
        users:
          myapp: {password: secret}
        """
    ) == [
        "halephant.yaml:6:14: databases.base.cluster: no cluster named 'nowhere' (clusters defined: main)",
        "halephant.yaml:7:3: databases.reports.cluster: no cluster named 'nowhere' (clusters defined: main)",
    ]


def test_aliases_that_expand_to_millions_of_values_are_refused_at_once() -> None:
    # ten aliases of ten aliases of ...: 10**8 values in a few lines, which validation would walk
    levels = ["  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = MINIMAL + "limits:\n" + "\n".join(levels) + "\n"
    with pytest.raises(ConfigError) as excinfo:
        read_config_text(text, "halephant.yaml")
    assert [str(p) for p in excinfo.value.problems] == [
        "halephant.yaml:16:3: limits.a5: expands to more than 1,000,000 values through YAML aliases "
        "(*name): not a halephant configuration"
    ]
    # an alias used a few times is fine, and so is one that contains itself
    assert read_config_text(MINIMAL + "x: &x [1, 2]\ny: [*x, *x, *x]\nz: &z [*z]\n", "halephant.yaml")


def test_nesting_too_deep_for_the_parser_is_a_problem_with_a_position() -> None:
    # ruamel builds nested collections recursively: this deep, it stops with RecursionError
    text = MINIMAL + "limits: " + "[" * 500 + "]" * 500 + "\n"
    with pytest.raises(ConfigError) as excinfo:
        read_config_text(text, "halephant.yaml")
    assert [str(p) for p in excinfo.value.problems] == [
        "halephant.yaml:10:108: nested more than 100 levels deep: not a halephant configuration"
    ]


def test_raw_config_disabled_plugins() -> None:
    def disabled(text: str) -> list[str]:
        return read_config_text(text, "halephant.yaml").disabled_plugins

    assert disabled("plugins:\n  disable: [cursor_guard, pool_sizing]\n") == ["cursor_guard", "pool_sizing"]
    assert disabled("plugins:\n  disable: [cursor_guard, 3]\n") == ["cursor_guard"]
    assert disabled("plugins:\n  disable: cursor_guard\n") == []
    assert disabled("plugins: off\n") == []
    assert disabled("listen: 127.0.0.1:6432\n") == []


def test_topology_keys_and_defaults() -> None:
    config = load(MINIMAL)
    assert (config.topology.interval, config.topology.timeout) == (5.0, 3.0)
    cluster = config.clusters["main"]
    assert (cluster.probe_user, cluster.probe_password, cluster.probe_database) == (None, None, "postgres")
    assert (cluster.max_lag_bytes, cluster.max_lag) == (None, None)
    db = config.databases["myapp"]
    assert (db.read_your_writes, db.read_your_writes_window) == (False, 10.0)
    text = MINIMAL.replace(
        "nodes: [127.0.0.1:5432]",
        "nodes: [127.0.0.1:5432]\n    probe_user: watcher\n    probe_password: w\n"
        "    max_lag_bytes: 8MB\n    max_lag: 1m",
    ).replace("cluster: main", "cluster: main\n    read_your_writes: true\n    read_your_writes_window: 2s")
    config = load(text + "topology:\n  interval: 200ms\n  timeout: 1s\n")
    cluster = config.clusters["main"]
    assert (cluster.probe_user, cluster.probe_password) == ("watcher", "w")
    assert (cluster.max_lag_bytes, cluster.max_lag) == (8 * 1024 * 1024, 60.0)
    db = config.databases["myapp"]
    assert (db.read_your_writes, db.read_your_writes_window) == (True, 2.0)
    assert (config.topology.interval, config.topology.timeout) == (0.2, 1.0)


def test_topology_errors() -> None:
    text = """\
    clusters:
      main:
        nodes: [127.0.0.1:5432]
        probe_user: nobody
        max_lag_bytes: lots
        max_lag: 0s
    databases:
      myapp:
        cluster: main
        read_your_writes: "yes"
        read_your_writes_window: -1s
    users:
      myapp: {password: secret}
    topology:
      interval: 0
      timeout: soon
    """
    assert problems(text) == [
        "halephant.yaml:4:17: clusters.main.probe_user: 'nobody' is not under users:, so its password is "
        "unknown: set probe_password",
        "halephant.yaml:5:20: clusters.main.max_lag_bytes: expected a size like 512kB, 64MB, 1GB or a "
        "whole number of bytes; got 'lots'",
        "halephant.yaml:6:14: clusters.main.max_lag: Input should be greater than 0",
        "halephant.yaml:10:23: databases.myapp.read_your_writes: Input should be a valid boolean",
        "halephant.yaml:11:30: databases.myapp.read_your_writes_window: expected a duration like 500ms, "
        "30s, 5m, 1h, 1d or a number of seconds; got '-1s'",
        "halephant.yaml:15:13: topology.interval: Input should be greater than 0",
        "halephant.yaml:16:12: topology.timeout: expected a duration like 500ms, 30s, 5m, 1h, 1d or a "
        "number of seconds; got 'soon'",
    ]


def test_admin_listen_must_differ_from_listen() -> None:
    text = """\
    listen: 127.0.0.1:7000
    clusters:
      main:
        nodes: [127.0.0.1:5432]
    databases:
      myapp: {cluster: main}
    users:
      myapp: {password: secret}
    admin:
      listen: 127.0.0.1:7000
    """
    assert problems(text) == [
        "halephant.yaml:10:11: admin.listen: 127.0.0.1:7000 is also listen: "
        "the admin API needs a port of its own"
    ]
