"""What one `SET`, `RESET`, `BEGIN` or `START TRANSACTION` statement changes, read from its tokens.

Routing needs to see through the spellings PostgreSQL accepts for the same change (`SET x = off`,
`SET x TO 'false'`, `SET SESSION x TO DEFAULT`, `RESET x`, `SET SESSION CHARACTERISTICS AS TRANSACTION
READ WRITE`, `BEGIN ISOLATION LEVEL SERIALIZABLE, READ WRITE`). The grammar followed is gram.y's
`VariableSetStmt`, `VariableResetStmt` and `transaction_mode_list`; the transaction modes come out as the
settings they assign (`transaction_read_only`, and with SESSION CHARACTERISTICS
`default_transaction_read_only`), so one question ("is read-only being turned off?") covers every form.
Anything not understood gives None: callers then treat the statement as opaque.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from halephant.sql.lexer import (
    COMMENT,
    NUMBER,
    PUNCT,
    QUOTED_IDENTIFIER,
    SEMICOLON,
    SPACE,
    STRING,
    WORD,
    Token,
    iter_tokens,
)

__all__ = ["SettingChange", "parse_bool", "resets_setting", "setting_changes"]


@dataclass(frozen=True, slots=True)
class SettingChange:
    """One setting a statement assigns.

    `name` is lower-cased as PostgreSQL folds it (a quoted name is kept as written); `value` is the text
    assigned (for a list, the items joined by ", "), or None for "back to the session default" (`RESET`,
    `TO DEFAULT`); `local` is true when it lasts only for the current transaction (`SET LOCAL`,
    `SET TRANSACTION`, the modes of `BEGIN`).
    """

    name: str
    value: str | None
    local: bool = False


_TRUE: Final = ("true", "yes", "on", "1")
_FALSE: Final = ("false", "no", "off", "0")
#: `SET TIME ZONE` and friends: special syntax for ordinary settings
_SPECIAL_NAMES: Final = {"SCHEMA": "search_path", "NAMES": "client_encoding"}


def parse_bool(value: str) -> bool | None:
    """PostgreSQL's `parse_bool`: true/false/yes/no/on/off/1/0 and unique prefixes, any case; else None."""
    v = value.strip().lower()
    if not v:
        return None
    if v in ("1", "0"):
        return v == "1"
    if v in ("on", "off", "of"):
        return v == "on"
    if len(v) >= 1 and ("true".startswith(v) or "yes".startswith(v)):
        return True
    if len(v) >= 1 and ("false".startswith(v) or "no".startswith(v)):
        return False
    return None


def _tokens(text: str) -> list[Token]:
    out: list[Token] = []
    for kind, value in iter_tokens(text):
        if kind in (SPACE, COMMENT):
            continue
        if kind == SEMICOLON:
            if out:
                break  # one statement only
            continue
        out.append((kind, value))
    return out


def _name(tokens: list[Token], i: int) -> tuple[str, int] | None:
    """A possibly dotted setting name at `tokens[i]`: (name, index after it)."""
    parts: list[str] = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == WORD:
            parts.append(value.lower())
        elif kind == QUOTED_IDENTIFIER and value.startswith('"'):
            parts.append(value[1:-1].replace('""', '"'))
        else:
            return None
        i += 1
        if i < len(tokens) and tokens[i] == (PUNCT, "."):
            i += 1
            continue
        return ".".join(parts), i
    return None


def _value(tokens: list[Token]) -> str | None:
    """The value list after `TO`/`=`: its items joined by ", " (strings unquoted); "" if malformed."""
    items: list[str] = []
    expect_item = True
    sign = ""
    for kind, value in tokens:
        if expect_item:
            if kind == STRING and value.startswith("'") and not sign:
                items.append(value[1:-1].replace("''", "'"))
            elif kind == WORD and not sign:
                items.append(value.lower())
            elif kind == NUMBER:
                items.append(sign + value)
            elif kind == QUOTED_IDENTIFIER and value.startswith('"') and not sign:
                items.append(value[1:-1].replace('""', '"'))
            elif kind == PUNCT and value in ("+", "-") and not sign:
                sign = value  # a signed number follows
                continue
            else:
                return ""
            sign = ""
            expect_item = False
        elif (kind, value) == (PUNCT, ","):
            expect_item = True
        else:
            return ""
    return ", ".join(items) if items and not expect_item else ""


def _transaction_modes(tokens: list[Token], prefix: str, local: bool) -> tuple[SettingChange, ...] | None:
    """gram.y's transaction_mode_list: ISOLATION LEVEL ..., READ ONLY|WRITE, [NOT] DEFERRABLE."""
    changes: list[SettingChange] = []
    words = [v if k == WORD else (v if (k, v) == (PUNCT, ",") else None) for k, v in tokens]
    i = 0
    while i < len(words):
        word = words[i]
        if word == ",":
            i += 1
        elif word == "READ" and i + 1 < len(words) and words[i + 1] in ("ONLY", "WRITE"):
            on = "on" if words[i + 1] == "ONLY" else "off"
            changes.append(SettingChange(f"{prefix}transaction_read_only", on, local))
            i += 2
        elif word == "DEFERRABLE":
            changes.append(SettingChange(f"{prefix}transaction_deferrable", "on", local))
            i += 1
        elif word == "NOT" and i + 1 < len(words) and words[i + 1] == "DEFERRABLE":
            changes.append(SettingChange(f"{prefix}transaction_deferrable", "off", local))
            i += 2
        elif word == "ISOLATION" and i + 1 < len(words) and words[i + 1] == "LEVEL":
            pair = tuple(words[i + 2 : i + 4])
            if pair in (("READ", "COMMITTED"), ("READ", "UNCOMMITTED"), ("REPEATABLE", "READ")):
                level, i = f"{pair[0]} {pair[1]}".lower(), i + 4
            elif words[i + 2 : i + 3] == ["SERIALIZABLE"]:
                level, i = "serializable", i + 3
            else:
                return None
            changes.append(SettingChange(f"{prefix}transaction_isolation", level, local))
        else:
            return None
    return tuple(changes)


def setting_changes(text: str) -> tuple[SettingChange, ...] | None:
    """The settings the first statement of `text` assigns, or None when it is not a `SET`, `RESET`,
    `BEGIN` or `START TRANSACTION` this reader understands.

    `BEGIN` alone gives `()`; `RESET ALL` gives None (it is not one setting).
    """
    tokens = _tokens(text)
    if not tokens or tokens[0][0] != WORD:
        return None
    first = tokens[0][1]
    if first in ("BEGIN", "START"):
        i = 1
        if first == "START":
            if tokens[1:2] != [(WORD, "TRANSACTION")]:
                return None
            i = 2
        elif tokens[1:2] in ([(WORD, "WORK")], [(WORD, "TRANSACTION")]):
            i = 2
        return _transaction_modes(tokens[i:], "", local=True)
    if first == "RESET":
        if tokens[1:] == [(WORD, "TIME"), (WORD, "ZONE")]:
            return (SettingChange("timezone", None),)
        named = _name(tokens, 1)
        if named is None or named[1] != len(tokens) or named[0] in ("all", "session", "role"):
            return None
        return (SettingChange(named[0], None),)
    if first != "SET":
        return None
    i, local = 1, False
    if tokens[1:2] == [(WORD, "SESSION")]:
        if tokens[2:5] == [(WORD, "CHARACTERISTICS"), (WORD, "AS"), (WORD, "TRANSACTION")]:
            return _transaction_modes(tokens[5:], "default_", local=False)
        if tokens[2:3] == [(WORD, "AUTHORIZATION")]:
            return None
        i = 2
    elif tokens[1:2] == [(WORD, "LOCAL")]:
        i, local = 2, True
    if tokens[i : i + 1] == [(WORD, "TRANSACTION")] and i == 1:
        return _transaction_modes(tokens[2:], "", local=True)
    if tokens[i : i + 2] == [(WORD, "TIME"), (WORD, "ZONE")]:
        name, rest = "timezone", tokens[i + 2 :]
        if rest in ([(WORD, "DEFAULT")], [(WORD, "LOCAL")]):
            return (SettingChange(name, None, local),)
    elif tokens[i : i + 1] and tokens[i][0] == WORD and tokens[i][1] in _SPECIAL_NAMES:
        name, rest = _SPECIAL_NAMES[tokens[i][1]], tokens[i + 1 :]
    else:
        named = _name(tokens, i)
        if named is None or named[0] in ("role", "session"):
            return None
        name, after = named
        if tokens[after : after + 1] not in ([(WORD, "TO")], [(PUNCT, "=")]):
            return None  # FROM CURRENT, or something this reader does not know
        rest = tokens[after + 1 :]
        if rest == [(WORD, "DEFAULT")]:
            return (SettingChange(name, None, local),)
    value = _value(rest)
    if not value:
        return None
    return (SettingChange(name, value, local),)


def resets_setting(text: str) -> bool:
    """Whether the first statement of `text` may bring a setting back to its session's reset value (what
    the session got at startup): `RESET x`, `RESET ALL`, `DISCARD ALL`, `SET x TO DEFAULT`, `SET TIME
    ZONE LOCAL`. `SET LOCAL x TO DEFAULT` lasts only for its transaction: not counted."""
    tokens = _tokens(text)
    if not tokens or tokens[0][0] != WORD:
        return False
    first = tokens[0][1]
    if first == "RESET":
        return True
    if first == "DISCARD":
        return tokens[1:2] == [(WORD, "ALL")]
    if first != "SET":
        return False
    changes = setting_changes(text)
    return changes is not None and any(change.value is None and not change.local for change in changes)
