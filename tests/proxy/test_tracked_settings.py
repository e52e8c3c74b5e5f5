"""`halephant.proxy.tracked_settings`: which SETs halephant carries from server to server instead of
pinning the client, and how a server's report of such a setting is recognized as the client's own."""

from __future__ import annotations

import pytest

from halephant.proxy.tracked_settings import carried, merge, tracked_change
from halephant.sql import Statement

DTRO = "default_transaction_read_only"


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SET default_transaction_read_only = on", {DTRO: "on"}),
        ("set session default_transaction_read_only to 'false'", {DTRO: "off"}),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", {DTRO: "on"}),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", {DTRO: "off"}),
        ("SET default_transaction_read_only TO DEFAULT", None),  # back to a default halephant cannot see
        ("RESET default_transaction_read_only", None),
        ("SET LOCAL default_transaction_read_only = on", None),
        ("SET default_transaction_read_only = maybe", None),  # the server refuses it: nothing to carry
        ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", None),
        ("SET default_transaction_read_only = on; SELECT 1", None),  # one implicit transaction
        ("SET search_path = app", None),
        ("SELECT 1", None),
    ],
)
def test_tracked_change(sql: str, expected: dict[str, str] | None) -> None:
    assert tracked_change(Statement(sql)) == expected


def test_merge_drops_values_equal_to_the_server_default() -> None:
    assert merge({}, {DTRO: "on"}, {}) == {DTRO: "on"}
    assert merge({DTRO: "on", "application_name": "a"}, {DTRO: "off"}, {}) == {"application_name": "a"}
    # a pool whose servers start read-only: "on" is their default
    assert merge({}, {DTRO: "on"}, {DTRO: "on"}) == {}


def test_carried_only_when_client_and_server_agree_on_a_tracked_setting() -> None:
    assert carried(DTRO, "on", {DTRO: "on"}, {DTRO: "on"})
    assert carried(DTRO, "off", {}, {})
    assert not carried(DTRO, "on", {}, {})  # changed behind halephant's back (a function): pin
    assert not carried(DTRO, "on", {DTRO: "on"}, {})
    assert not carried("application_name", "x", {"application_name": "x"}, {"application_name": "x"})
