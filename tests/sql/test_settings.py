"""`halephant.sql.setting_changes` / `parse_bool`: every spelling of SET, RESET and transaction modes that
routing must see through, and what it must leave alone (None)."""

from __future__ import annotations

import pytest

from halephant.sql import SettingChange, parse_bool, setting_changes
from halephant.sql.settings import resets_setting

DTRO = "default_transaction_read_only"
TRO = "transaction_read_only"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SET default_transaction_read_only = off", (SettingChange(DTRO, "off"),)),
        ("set Default_Transaction_Read_Only to 'false'", (SettingChange(DTRO, "false"),)),
        ("SET SESSION default_transaction_read_only TO 0", (SettingChange(DTRO, "0"),)),
        ("SET LOCAL transaction_read_only = on", (SettingChange(TRO, "on", local=True),)),
        ('SET "default_transaction_read_only" = off', (SettingChange(DTRO, "off"),)),
        ("SET default_transaction_read_only TO DEFAULT", (SettingChange(DTRO, None),)),
        ("RESET default_transaction_read_only", (SettingChange(DTRO, None),)),
        ("/* c */ SET default_transaction_read_only=on; SELECT 1", (SettingChange(DTRO, "on"),)),
        ("SET search_path = a, \"B\", 'c d'", (SettingChange("search_path", "a, B, c d"),)),
        ("SET TIME ZONE 'UTC'", (SettingChange("timezone", "UTC"),)),
        ("SET TIME ZONE LOCAL", (SettingChange("timezone", None),)),
        ("RESET TIME ZONE", (SettingChange("timezone", None),)),
        ("SET SCHEMA 'app'", (SettingChange("search_path", "app"),)),
        ("SET my.setting = 5", (SettingChange("my.setting", "5"),)),
        ("SET statement_timeout = -1", (SettingChange("statement_timeout", "-1"),)),
        ("SET extra_float_digits = +3", (SettingChange("extra_float_digits", "+3"),)),
        ("SET TRANSACTION READ WRITE", (SettingChange(TRO, "off", local=True),)),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            (SettingChange("default_transaction_isolation", "repeatable read"), SettingChange(DTRO, "on")),
        ),
        ("BEGIN", ()),
        ("begin work", ()),
        ("BEGIN READ ONLY", (SettingChange(TRO, "on", local=True),)),
        ("START TRANSACTION READ WRITE", (SettingChange(TRO, "off", local=True),)),
        (
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY NOT DEFERRABLE",
            (
                SettingChange("transaction_isolation", "serializable", local=True),
                SettingChange(TRO, "on", local=True),
                SettingChange("transaction_deferrable", "off", local=True),
            ),
        ),
        ("begin transaction isolation level read committed, deferrable", (
            SettingChange("transaction_isolation", "read committed", local=True),
            SettingChange("transaction_deferrable", "on", local=True),
        )),
    ],
)  # fmt: skip
def test_setting_changes(text: str, expected: tuple[SettingChange, ...]) -> None:
    assert setting_changes(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1",
        "RESET ALL",
        "SET ROLE admin",
        "SET SESSION AUTHORIZATION admin",
        "SET x FROM CURRENT",
        "SET x = E'off'",  # escaped strings are not read: opaque
        "SET x =",
        "START",
        "BEGIN READ SOMETIMES",
        "'SET x = 1'",
        "-- SET x = 1",
    ],
)
def test_what_is_not_understood_is_none(text: str) -> None:
    assert setting_changes(text) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("on", True), ("ON", True), ("true", True), ("t", True), ("yes", True), ("y", True), ("1", True),
        ("off", False), ("of", False), ("false", False), ("f", False), ("no", False), ("n", False),
        ("0", False), (" off ", False), ("o", None), ("", None), ("2", None), ("maybe", None),
    ],
)  # fmt: skip
def test_parse_bool_like_postgresql(value: str, expected: bool | None) -> None:
    assert parse_bool(value) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("RESET search_path", True), ("reset all", True), ("RESET TIME ZONE", True), ("DISCARD ALL", True),
        ("SET search_path TO DEFAULT", True), ("SET SESSION work_mem = DEFAULT", True),
        ("SET TIME ZONE LOCAL", True), ("/* c */ RESET ALL", True),
        ("SET LOCAL search_path TO DEFAULT", False), ("SET search_path = public", False),
        ("DISCARD TEMP", False), ("DISCARD PLANS", False), ("SELECT 'RESET ALL'", False), ("", False),
    ],
)  # fmt: skip
def test_resets_setting(text: str, expected: bool) -> None:
    assert resets_setting(text) is expected
