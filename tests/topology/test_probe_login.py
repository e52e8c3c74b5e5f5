"""Which login the topology probes use when the cluster names none (`probe_login`)."""

from __future__ import annotations

import textwrap

from halephant.config import Config, read_config_text, validate_config
from halephant.topology.monitor import probe_login


def load(users: str, cluster_extra: str = "") -> Config:
    text = textwrap.dedent(
        """\
        clusters:
          main:
            nodes: ["127.0.0.1:5432"]
        {extra}
        databases:
          app:
            cluster: main
        users:
        {users}
        """
    ).format(extra=textwrap.indent(cluster_extra, "    "), users=textwrap.indent(users, "  "))
    return validate_config(read_config_text(text, "halephant.yaml"))


def test_an_alias_is_not_taken_for_a_role() -> None:
    # "app_ro" comes first, but PostgreSQL knows only "app", the role it logs in as
    config = load(
        "app_ro:\n  password: ro-secret\n  read_only: true\n  server_user: app\n"
        "app:\n  password: app-secret\n"
    )
    assert probe_login(config, config.clusters["main"]) == ("app", "app-secret")


def test_the_first_user_that_can_log_in_upstream() -> None:
    # trusted without a password: nothing to log in upstream with
    config = load("trusted:\n  auth: trust\nplain:\n  password: plain-secret\n")
    assert probe_login(config, config.clusters["main"]) == ("plain", "plain-secret")


def test_probe_user_and_password_win() -> None:
    config = load("app:\n  password: app-secret\n", "probe_user: monitor\nprobe_password: m\n")
    assert probe_login(config, config.clusters["main"]) == ("monitor", "m")


SCRAM = (
    "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$U1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1M=:"
    "S0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0s="
)
MD5 = "md5" + "0123456789abcdef" * 2


def test_a_plaintext_password_is_preferred_to_pass_through() -> None:
    # a SCRAM verifier logs in only once a client of that user has: a later user with a plaintext
    # password (or an md5 hash, which needs no client) probes from the start
    config = load(
        f'scram:\n  password: "{SCRAM}"\nmd5:\n  password: {MD5}\n  auth: md5\n'
        "plain:\n  password: plain-secret\n"
    )
    assert probe_login(config, config.clusters["main"]) == ("plain", "plain-secret")
    config = load(f'scram:\n  password: "{SCRAM}"\nmd5:\n  password: {MD5}\n  auth: md5\n')
    assert probe_login(config, config.clusters["main"]) == ("md5", MD5)


def test_only_pass_through_users_probe_by_pass_through() -> None:
    config = load(f'scram:\n  password: "{SCRAM}"\n')
    assert probe_login(config, config.clusters["main"]) == ("scram", SCRAM)
    config = load(f'scram:\n  password: "{SCRAM}"\n', "probe_user: scram\n")
    assert probe_login(config, config.clusters["main"]) == ("scram", SCRAM)
