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
