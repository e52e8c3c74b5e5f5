"""Startup settings: which startup parameters are settings, `options` switches, the SQL applying them."""

from __future__ import annotations

import pytest

from halephant.errors import ClientError
from halephant.protocol.session_params import restore_sql, settings_sql, startup_settings


def test_settings_exclude_connection_parameters_and_fold_names() -> None:
    params = {
        "user": "u",
        "database": "d",
        "replication": "false",
        "application_name": "app",
        "DateStyle": "ISO",
    }
    assert startup_settings(params) == {"application_name": "app", "datestyle": "ISO"}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("-c search_path=a,b", {"search_path": "a,b"}),
        ("-cwork_mem=8MB", {"work_mem": "8MB"}),
        ("--statement-timeout=5s", {"statement_timeout": "5s"}),
        ("-c application_name=a\\ b  -c geqo=off", {"application_name": "a b", "geqo": "off"}),
        ("", {}),
    ],
)
def test_options_switches(options: str, expected: dict[str, str]) -> None:
    assert startup_settings({"user": "u", "options": options}) == expected


@pytest.mark.parametrize("options", ["-d 5", "-c novalue", "-c 'x;drop'=1"])
def test_bad_options_are_refused_at_login(options: str) -> None:
    with pytest.raises(ClientError) as info:
        startup_settings({"user": "u", "options": options})
    assert info.value.fatal


@pytest.mark.parametrize(
    ("options", "code"),
    [("hello", "42601"), ("-c a=1 hello", "42601"), ("-d 5", "0A000"), ("-c novalue", "42601")],
)
def test_bad_options_get_postgresqls_sqlstate(options: str, code: str) -> None:
    # a word that is no switch: 42601 as PostgreSQL; a switch it has but halephant does not take: 0A000
    with pytest.raises(ClientError) as info:
        startup_settings({"user": "u", "options": options})
    assert info.value.code == code


def test_sql_is_only_the_difference_and_quotes_values() -> None:
    assert settings_sql({"a": "1"}, {"a": "1"}) == ""
    assert settings_sql({"a": "1", "b": "2"}, {"a": "1"}) == "RESET b"
    assert settings_sql({}, {"x": "it's"}) == "SELECT pg_catalog.set_config('x', 'it''s', false)"


def test_restore_sql_sets_again_only_what_the_session_no_longer_holds() -> None:
    assert restore_sql({"search_path": "tenant1", "application_name": "it's"}) == (
        "SELECT pg_catalog.set_config(t.n, t.v, false) FROM (VALUES ('search_path', 'tenant1'), "
        "('application_name', 'it''s')) AS t(n, v) WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_settings s "
        "WHERE pg_catalog.lower(s.name) = t.n AND s.source = 'session')"
    )
