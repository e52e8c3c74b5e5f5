"""Redaction of the configuration the admin API and SHOW CONFIG show, without a running halephant."""

from __future__ import annotations

import textwrap

from pydantic import BaseModel, ConfigDict

from halephant.admin.snapshot import REDACTED, redacted_config
from halephant.config import read_config_text, validate_config

VERIFIER = (
    "SCRAM-SHA-256$4096:c2FsdA==$U1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1M=:"
    "S0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0s="
)


def test_every_password_form_is_redacted_and_the_rest_is_kept() -> None:
    text = f"""\
    clusters:
      main:
        nodes: [127.0.0.1:5433]
    databases:
      myapp:
        cluster: main
    users:
      plain:
        password: plaintext-secret
      scram:
        password: "{VERIFIER}"
        server_password: upstream-secret
      hashed:
        password: md5c2a5d2ca7ba8ba5dca4ee0e7d1d2bba1
        server_password: other-secret
        auth: md5
      trusted:
        auth: trust
    admin:
      users: [plain]
    """
    config = validate_config(read_config_text(textwrap.dedent(text), "halephant.yaml"))
    shown = redacted_config(config)
    users = shown["users"]
    assert users["plain"]["password"] == REDACTED
    assert users["scram"]["password"] == REDACTED and users["scram"]["server_password"] == REDACTED
    assert users["hashed"]["password"] == REDACTED and users["hashed"]["server_password"] == REDACTED
    assert users["trusted"]["password"] is None
    assert shown["admin"]["users"] == ["plain"]
    assert shown["databases"]["myapp"]["pool_size"] == 20
    flat = repr(shown)
    for secret in ("plaintext-secret", "upstream-secret", "other-secret", "SCRAM-SHA-256$", "md5c2a5"):
        assert secret not in flat


class TokenSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_token: str = ""
    level: int = 1


def test_plugin_sections_are_shown_with_their_secrets_redacted() -> None:
    text = """\
    clusters:
      main:
        nodes: [127.0.0.1:5433]
    databases:
      myapp:
        cluster: main
    users:
      myapp:
        password: x
    plugins:
      tokens:
        api_token: tok-123
        level: 3
    """
    raw = read_config_text(textwrap.dedent(text), "halephant.yaml")
    shown = redacted_config(validate_config(raw, {"tokens": TokenSettings}))
    assert shown["plugins"]["tokens"] == {"api_token": REDACTED, "level": 3}
