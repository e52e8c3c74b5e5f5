"""Cheap facts about SQL text for hooks: part of the public plugin API.

This package owns reading SQL without executing it: a lossless PostgreSQL tokenizer (`iter_tokens`), a
statement splitter that respects quotes, nested comments and dollar quotes (`split_statements`), and
`Statement`, the object `halephant_inspect_query` and `halephant_route` receive, whose facts
(`first_keyword`, `first_keywords`, `keywords`, `statement_count`, `declares_holdable_cursor`, `ast`) are
computed on first use, and `setting_changes`, what a `SET` / `RESET` / `BEGIN` / `START TRANSACTION`
assigns (with `parse_bool`, PostgreSQL's reading of boolean values). It imports only the standard
library; `pglast` is loaded the first time a plugin asks for `.ast`.
"""

from __future__ import annotations

from halephant.sql.effects import FEATURES, SessionEffect, session_effects
from halephant.sql.lexer import (
    COMMENT,
    DOLLAR_STRING,
    NUMBER,
    PARAM,
    PUNCT,
    QUOTED_IDENTIFIER,
    SEMICOLON,
    SPACE,
    STRING,
    WORD,
    Token,
    TokenKind,
    iter_tokens,
    split_statements,
)
from halephant.sql.settings import SettingChange, parse_bool, setting_changes
from halephant.sql.statement import Statement

__all__ = [
    "COMMENT",
    "DOLLAR_STRING",
    "FEATURES",
    "NUMBER",
    "PARAM",
    "PUNCT",
    "QUOTED_IDENTIFIER",
    "SEMICOLON",
    "SPACE",
    "STRING",
    "WORD",
    "SessionEffect",
    "SettingChange",
    "Statement",
    "Token",
    "TokenKind",
    "iter_tokens",
    "parse_bool",
    "session_effects",
    "setting_changes",
    "split_statements",
]
