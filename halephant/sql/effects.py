"""What a SQL text does to the session it runs in: which session-bound feature it takes or may release.

A transaction pooler hands a server connection to another client after each transaction, so anything a
statement leaves on the connection beyond its transaction must be known: settings (`SET`), `LISTEN`,
session advisory locks, holdable cursors, temporary tables, SQL `PREPARE`, `SET ROLE` / `SET SESSION
AUTHORIZATION` and `LOAD`. `session_effects()` lists them per statement as `SessionEffect`s, each naming
the feature (the rows of `databases.<name>.session_features`), whether the statement takes it (`acquire`)
or may give it back (`acquire=False`), and the names involved where they can be read from the text
(setting names, channels, prepared statement names).

Reading is lexical and conservative: a release is only a hint (the core checks the server afterwards);
an acquire that cannot be told apart from a harmless statement is reported anyway.
Only texts for which `Statement.session_state` is non-empty need this, so its cost is off the hot path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from halephant.sql.lexer import COMMENT, QUOTED_IDENTIFIER, SPACE, STRING, WORD, iter_token_spans, upper_word
from halephant.sql.statement import Statement

__all__ = [
    "ADVISORY_LOCKS",
    "FEATURES",
    "LISTEN",
    "LOAD",
    "PREPARE",
    "SETTINGS",
    "SET_ROLE",
    "TEMP_TABLES",
    "WITH_HOLD",
    "SessionEffect",
    "session_effects",
]

LISTEN: Final = "listen"
ADVISORY_LOCKS: Final = "advisory_locks"
WITH_HOLD: Final = "with_hold"
TEMP_TABLES: Final = "temp_tables"
PREPARE: Final = "prepare"
SET_ROLE: Final = "set_role"
LOAD: Final = "load"
#: session settings (`SET`, `RESET`, `set_config`): always carried with the client, never a policy row
SETTINGS: Final = "settings"
#: the session-bound features an operator chooses a policy for, in `databases.<name>.session_features`
FEATURES: Final = (LISTEN, ADVISORY_LOCKS, WITH_HOLD, TEMP_TABLES, PREPARE, SET_ROLE, LOAD)
#: `names` of a SETTINGS effect that means "every setting" (RESET ALL, DISCARD ALL)
ALL: Final = "*"


@dataclass(frozen=True, slots=True)
class SessionEffect:
    """One session-bound effect of a statement.

    `feature` is one of `FEATURES` or `SETTINGS`; `acquire` is True when the statement takes the feature
    and False when it may release it; `names` are the setting names, channels or prepared statement
    names the text mentions (lower-cased where PostgreSQL folds them; `"*"` for all of them).
    """

    feature: str
    acquire: bool
    names: tuple[str, ...] = ()


_NONE: Final[tuple[SessionEffect, ...]] = ()
#: first keywords of statements that may release a feature without counting as session state themselves
_RELEASE_KEYWORDS: Final = frozenset({"CLOSE", "DROP"})
_ADVISORY: Final = re.compile(r"(?i)\bpg_(try_)?advisory_(un)?lock(_shared|_all)?\s*\(")
_SET_CONFIG: Final = re.compile(r"(?i)\bset_config\s*\(\s*('(?:[^']|'')*'|\$\$[^$]*\$\$)?")
#: `SET <keywords>` forms that are not `SET name ...` (gram.y's set_rest_more), with the setting they set
_SET_SPECIAL: Final[dict[tuple[str, ...], tuple[str, ...]]] = {
    ("TIME", "ZONE"): ("timezone",),
    ("NAMES",): ("client_encoding",),
    ("SCHEMA",): ("search_path",),
    ("XML", "OPTION"): ("xmloption",),
    ("SESSION", "CHARACTERISTICS"): (
        "default_transaction_isolation",
        "default_transaction_read_only",
        "default_transaction_deferrable",
    ),
}


def _words(text: str, limit: int = 8) -> list[tuple[str, str]]:
    """The first `limit` significant tokens as (kind, value): words upper-cased, identifiers unquoted."""
    out: list[tuple[str, str]] = []
    for kind, start, end in iter_token_spans(text):
        if kind in (SPACE, COMMENT):
            continue
        value = text[start:end]
        if kind == WORD:
            value = upper_word(value)
        elif kind == QUOTED_IDENTIFIER and value.startswith('"'):
            value = value[1:-1].replace('""', '"')
        elif kind == STRING and value.startswith("'"):
            value = value[1:-1].replace("''", "'")
        out.append((kind, value))
        if len(out) >= limit:
            break
    return out


def _name(token: tuple[str, str] | None) -> str | None:
    """An identifier as PostgreSQL reads it: unquoted words fold to lower case."""
    if token is None:
        return None
    kind, value = token
    if kind == WORD:
        return value.lower()
    if kind == QUOTED_IDENTIFIER:
        return value
    return None


def _setting_name(tokens: list[tuple[str, str]], i: int) -> str | None:
    # a setting name is an identifier, possibly qualified (`myapp.tenant`)
    name = _name(tokens[i] if i < len(tokens) else None)
    if name is None:
        return None
    if i + 2 < len(tokens) and tokens[i + 1][1] == ".":
        rest = _name(tokens[i + 2])
        if rest is not None:
            name = f"{name}.{rest}"
    return name


def _one(text: str) -> tuple[SessionEffect, ...]:
    """The effects of one statement (no top-level `;` inside)."""
    tokens = _words(text)
    if not tokens or tokens[0][0] != WORD:
        return _functions(text)
    first = tokens[0][1]
    second = tokens[1][1] if len(tokens) > 1 and tokens[1][0] == WORD else ""
    if first == "SET":
        i = 1
        if second == "LOCAL" or second == "TRANSACTION" or second == "CONSTRAINTS":
            return _NONE  # ends with the transaction
        if second == "SESSION":
            third = tokens[2][1] if len(tokens) > 2 else ""
            if third == "AUTHORIZATION":
                release = len(tokens) > 3 and tokens[3] == (WORD, "DEFAULT")
                return (SessionEffect(SET_ROLE, not release),)
            if third != "CHARACTERISTICS":
                i = 2
        if tokens[i : i + 1] == [(WORD, "ROLE")]:
            release = len(tokens) > i + 1 and tokens[i + 1] == (WORD, "NONE")
            return (SessionEffect(SET_ROLE, not release),)
        words = tuple(value for _, value in tokens[i : i + 2])
        for key, names in _SET_SPECIAL.items():
            if words[: len(key)] == key:
                return (SessionEffect(SETTINGS, True, names),)
        if words[:1] == ("SEED",):
            return _NONE  # the random seed: nothing a later client could notice
        name = _setting_name(tokens, i)
        return (SessionEffect(SETTINGS, True, (name,)),) if name else _NONE
    if first == "RESET":
        if second == "ROLE":
            return (SessionEffect(SET_ROLE, False),)
        if second == "SESSION" and len(tokens) > 2 and tokens[2][1] == "AUTHORIZATION":
            return (SessionEffect(SET_ROLE, False),)
        if second == "ALL":
            return (SessionEffect(SETTINGS, True, (ALL,)), SessionEffect(SET_ROLE, False))
        if words_special := [names for key, names in _SET_SPECIAL.items() if key[0] == second]:
            return (SessionEffect(SETTINGS, True, words_special[0]),)
        name = _setting_name(tokens, 1)
        return (SessionEffect(SETTINGS, True, (name,)),) if name else _NONE
    if first == "DISCARD":
        if second == "ALL":
            return (
                SessionEffect(SETTINGS, True, (ALL,)),
                *(SessionEffect(feature, False, (ALL,)) for feature in FEATURES if feature != LOAD),
            )
        if second == "TEMP" or second == "TEMPORARY":
            return (SessionEffect(TEMP_TABLES, False),)
        return _NONE
    if first == "LISTEN":
        channel = _name(tokens[1] if len(tokens) > 1 else None)
        return (SessionEffect(LISTEN, True, (channel,) if channel else ()),)
    if first == "UNLISTEN":
        if len(tokens) > 1 and tokens[1][1] == "*":
            return (SessionEffect(LISTEN, False, (ALL,)),)
        channel = _name(tokens[1] if len(tokens) > 1 else None)
        return (SessionEffect(LISTEN, False, (channel,) if channel else ()),)
    if first == "PREPARE":
        if second == "TRANSACTION":
            return _NONE  # two-phase commit: not session state
        name = _name(tokens[1] if len(tokens) > 1 else None)
        return (SessionEffect(PREPARE, True, (name,) if name else ()),)
    if first == "DEALLOCATE":
        i = 2 if second == "PREPARE" else 1
        if i < len(tokens) and tokens[i] == (WORD, "ALL"):
            return (SessionEffect(PREPARE, False, (ALL,)),)
        name = _name(tokens[i] if i < len(tokens) else None)
        return (SessionEffect(PREPARE, False, (name,) if name else ()),)
    if first == "LOAD":
        return (SessionEffect(LOAD, True),)
    if first == "DECLARE":
        if Statement(text).declares_holdable_cursor:
            return (SessionEffect(WITH_HOLD, True),)
        return _NONE
    if first == "CLOSE":
        return (SessionEffect(WITH_HOLD, False),)
    if first == "CREATE":
        kinds = {value for _, value in tokens[1:5]}
        if kinds & {"TEMP", "TEMPORARY"} or "pg_temp" in text.lower():
            upper = text.upper()
            if "ON COMMIT DROP" in " ".join(upper.split()):
                return _NONE  # gone at the end of its transaction
            return (SessionEffect(TEMP_TABLES, True),)
        return _functions(text)
    if first == "DROP":
        return (SessionEffect(TEMP_TABLES, False),)
    if (first == "SELECT" or first == "WITH") and Statement(text).selects_into_temp:
        return (SessionEffect(TEMP_TABLES, True), *_functions(text))
    return _functions(text)


def _functions(text: str) -> tuple[SessionEffect, ...]:
    effects: list[SessionEffect] = []
    for match in _ADVISORY.finditer(text):
        effects.append(SessionEffect(ADVISORY_LOCKS, match.group(2) is None))
    for match in _SET_CONFIG.finditer(text):
        literal = match.group(1)
        if literal and literal.startswith("'"):
            effects.append(SessionEffect(SETTINGS, True, (literal[1:-1].replace("''", "'").lower(),)))
        elif literal:
            effects.append(SessionEffect(SETTINGS, True, (literal[2:-2].lower(),)))
        else:
            # a computed name: which setting changes cannot be read from the text
            effects.append(SessionEffect(SETTINGS, True, ()))
    return tuple(effects)


def session_effects(statement: Statement) -> tuple[SessionEffect, ...]:
    """Every session-bound effect of the text, in order; empty for an ordinary statement.

    Cheap when `statement.session_state` is empty (the common case): nothing is tokenized then.
    """
    if (
        not statement.session_state
        and statement.first_keyword not in _RELEASE_KEYWORDS
        and "advisory_unlock" not in statement.text.lower()
    ):
        return _NONE
    if statement.statement_count <= 1:
        return _one(statement.text)
    effects: list[SessionEffect] = []
    for text in statement.statements:
        effects.extend(_one(text))
    return tuple(effects)
