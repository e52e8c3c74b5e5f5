"""The commented example at the repository root is a valid configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from halephant.config import HostPort, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "halephant.yaml"


class CursorGuardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    action: Literal["reject", "allow"] = "reject"


def test_root_example_validates() -> None:
    config = load_config(EXAMPLE, plugin_settings={"cursor_guard": CursorGuardSettings})
    assert config.listen == HostPort(host="127.0.0.1", port=6432)
    assert [str(node) for node in config.clusters["main"].nodes] == ["127.0.0.1:5432", "127.0.0.1:5433"]
    assert config.databases["myapp"].server_database == "myapp"
    assert {name: user.password for name, user in config.users.items()} == {
        "myapp": "myapp",
        "myapp_ro": "myapp_ro",
    }
    assert config.plugin_settings("cursor_guard") == CursorGuardSettings(action="reject")
    assert config.clusters["main"].tls.mode == "prefer"


def test_root_example_sets_every_key() -> None:
    """The example doubles as the reference: each key of the schema is written out in it."""
    text = EXAMPLE.read_text()
    keys = [
        "listen", "clusters", "nodes", "databases", "cluster", "database", "mode", "pool_size",
        "min_pool_size", "idle_timeout", "max_lifetime", "checkout_timeout", "server_reset_query",
        "users", "password", "server_password", "auth", "limits", "max_message_size", "login_timeout",
        "connect_timeout", "logging", "level", "format", "plugins", "disable", "probe_user",
        "probe_password", "probe_database", "max_lag_bytes", "max_lag", "read_your_writes",
        "read_your_writes_window", "topology", "interval", "timeout", "tcp_keepalive", "tcp_keepidle",
        "tcp_keepintvl", "tcp_keepcnt", "tcp_user_timeout", "unix_socket_dir", "max_db_connections",
        "max_user_connections", "client_tls", "cert_file", "key_file", "ca_file", "min_version", "tls",
    ]  # fmt: skip
    missing = [key for key in keys if f"{key}:" not in text.replace("#", "")]
    assert missing == []
