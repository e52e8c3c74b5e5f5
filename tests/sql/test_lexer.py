"""The PostgreSQL tokenizer and statement splitter in `halephant.sql.lexer`.

Cases follow PostgreSQL's scanner (scan.l); `pglast`, which embeds that scanner, is the differential
oracle for statement boundaries.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.scaling import assert_linear

from halephant.sql import (
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
    iter_tokens,
    split_statements,
)
from halephant.sql.lexer import iter_token_spans, statement_spans


def significant(text: str, **kwargs: bool) -> list[tuple[str, str]]:
    return [(k, v) for k, v in iter_tokens(text, **kwargs) if k not in (SPACE, COMMENT)]


# (text, significant tokens with words upper-cased)
TOKEN_CASES: list[tuple[str, list[tuple[str, str]]]] = [
    ("", []),
    ("SELECT 1", [(WORD, "SELECT"), (NUMBER, "1")]),
    ("select\t1\n", [(WORD, "SELECT"), (NUMBER, "1")]),
    # comments
    ("-- declare\nselect", [(WORD, "SELECT")]),
    ("select --x\r1", [(WORD, "SELECT"), (NUMBER, "1")]),
    ("/* a */ b", [(WORD, "B")]),
    ("/* /* */ SELECT 1 */ LISTEN x", [(WORD, "LISTEN"), (WORD, "X")]),
    ("/* /* /* */ */ x */ y", [(WORD, "Y")]),
    ("/*/ x */ y", [(WORD, "Y")]),  # `/*/` does not close: the `*` belongs to the opener
    ("/**/y", [(WORD, "Y")]),
    ("a/*x*/b", [(WORD, "A"), (WORD, "B")]),
    ("a+-- c\nb", [(WORD, "A"), (PUNCT, "+"), (WORD, "B")]),  # `--` ends an operator
    ("a*/b", [(WORD, "A"), (PUNCT, "*"), (PUNCT, "/"), (WORD, "B")]),  # `*/` outside a comment
    # standard strings
    ("'it''s'", [(STRING, "'it''s'")]),
    ("'a\\'", [(STRING, "'a\\'")]),  # backslash is ordinary with standard_conforming_strings on
    ("'-- not a comment'", [(STRING, "'-- not a comment'")]),
    ("'/* nor this'", [(STRING, "'/* nor this'")]),
    ("'a;b'", [(STRING, "'a;b'")]),
    ("''", [(STRING, "''")]),
    ("''''", [(STRING, "''''")]),
    # E'' and other prefixes
    ("E'a\\'b'", [(STRING, "E'a\\'b'")]),
    ("e'\\\\' x", [(STRING, "e'\\\\'"), (WORD, "X")]),
    ("E'a''b'", [(STRING, "E'a''b'")]),
    ("U&'d\\0061t'", [(STRING, "U&'d\\0061t'")]),
    ("u&'x' UESCAPE '!'", [(STRING, "u&'x'"), (WORD, "UESCAPE"), (STRING, "'!'")]),
    ("B'1010' X'ff' N'x'", [(STRING, "B'1010'"), (STRING, "X'ff'"), (STRING, "N'x'")]),
    ("note'x'", [(WORD, "NOTE"), (STRING, "'x'")]),  # a word that ends in e is not a prefix
    ("E", [(WORD, "E")]),
    # quoted identifiers: never keywords
    ('"select"', [(QUOTED_IDENTIFIER, '"select"')]),
    ('"a""b"', [(QUOTED_IDENTIFIER, '"a""b"')]),
    ('U&"d\\0061t"', [(QUOTED_IDENTIFIER, 'U&"d\\0061t"')]),
    ('"x;--/*"', [(QUOTED_IDENTIFIER, '"x;--/*"')]),
    # dollar quotes and parameters
    ("$$a;b$$", [(DOLLAR_STRING, "$$a;b$$")]),
    ("$fn$ $$ ; $fn$ x", [(DOLLAR_STRING, "$fn$ $$ ; $fn$"), (WORD, "X")]),
    ("$a$ $b$ $a$", [(DOLLAR_STRING, "$a$ $b$ $a$")]),
    ("$a$x$ba$y$a$", [(DOLLAR_STRING, "$a$x$ba$y$a$")]),
    ("$1", [(PARAM, "$1")]),
    ("$12, $3", [(PARAM, "$12"), (PUNCT, ","), (PARAM, "$3")]),
    ("a$b$c", [(WORD, "A$B$C")]),  # `$` continues an identifier, so no dollar quote here
    ("$_x$ y $_x$", [(DOLLAR_STRING, "$_x$ y $_x$")]),
    ("$ x", [(PUNCT, "$"), (WORD, "X")]),
    # numbers
    ("1.5e-3 .5 0x1F 1_000", [(NUMBER, "1.5e-3"), (NUMBER, ".5"), (NUMBER, "0x1F"), (NUMBER, "1_000")]),
    ("1..10", [(NUMBER, "1"), (PUNCT, "."), (NUMBER, ".10")]),  # plpgsql ranges live in strings
    # punctuation and semicolons
    ("a::int;", [(WORD, "A"), (PUNCT, ":"), (PUNCT, ":"), (WORD, "INT"), (SEMICOLON, ";")]),
    ("(x)", [(PUNCT, "("), (WORD, "X"), (PUNCT, ")")]),
    # non-ASCII: identifier characters to PostgreSQL, folded only in their ASCII letters
    ("sélect", [(WORD, "SéLECT")]),
    ("\u017felect", [(WORD, "\u017fELECT")]),  # long s: str.upper() makes it SELECT, PostgreSQL does not
    ("a\u00a0b", [(WORD, "A\u00a0B")]),  # U+00A0 is not whitespace to PostgreSQL
    # unterminated: the rest of the text is one token
    ("select 'abc", [(WORD, "SELECT"), (STRING, "'abc")]),
    ("select 'it''", [(WORD, "SELECT"), (STRING, "'it''")]),
    ("select E'a\\'", [(WORD, "SELECT"), (STRING, "E'a\\'")]),
    ("select E'a\\", [(WORD, "SELECT"), (STRING, "E'a\\")]),
    ('select "abc', [(WORD, "SELECT"), (QUOTED_IDENTIFIER, '"abc')]),
    ("select $$abc", [(WORD, "SELECT"), (DOLLAR_STRING, "$$abc")]),
    ("select $q$abc $$", [(WORD, "SELECT"), (DOLLAR_STRING, "$q$abc $$")]),
    ("select /* a /* b */", [(WORD, "SELECT")]),
    ("select --", [(WORD, "SELECT")]),
]


@pytest.mark.parametrize(("text", "expected"), TOKEN_CASES)
def test_significant_tokens(text: str, expected: list[tuple[str, str]]) -> None:
    assert significant(text) == expected


@pytest.mark.parametrize(("text", "expected"), TOKEN_CASES)
def test_tokens_are_lossless(text: str, expected: list[tuple[str, str]]) -> None:
    assert "".join(value for _, value in iter_tokens(text, upper_words=False)) == text


def test_comment_tokens_keep_their_text() -> None:
    text = "/* a /* b */ c */x-- d\n"
    assert list(iter_tokens(text)) == [
        (COMMENT, "/* a /* b */ c */"),
        (WORD, "X"),
        (COMMENT, "-- d"),
        (SPACE, "\n"),
    ]


def test_unterminated_comment_runs_to_the_end() -> None:
    assert list(iter_tokens("x /* a /* b */ ; y")) == [
        (WORD, "X"),
        (SPACE, " "),
        (COMMENT, "/* a /* b */ ; y"),
    ]


def test_words_keep_their_case_when_asked() -> None:
    assert significant("Select x", upper_words=False) == [(WORD, "Select"), (WORD, "x")]


def test_standard_conforming_strings_off_reads_backslash_escapes() -> None:
    text = "select 'a\\'; drop table t; --'"
    assert significant(text) == [
        (WORD, "SELECT"),
        (STRING, "'a\\'"),
        (SEMICOLON, ";"),
        (WORD, "DROP"),
        (WORD, "TABLE"),
        (WORD, "T"),
        (SEMICOLON, ";"),
    ]
    assert significant(text, standard_conforming_strings=False) == [
        (WORD, "SELECT"),
        (STRING, "'a\\'; drop table t; --'"),
    ]


def test_token_spans_respect_bounds() -> None:
    text = "select 1; select 'x'"
    assert [(k, text[s:e]) for k, s, e in iter_token_spans(text, 10, 20)] == [
        (WORD, "select"),
        (SPACE, " "),
        (STRING, "'x'"),
    ]
    assert list(iter_token_spans(text, 5, 5)) == []


# --- splitting ----------------------------------------------------------------------------------------

SPLIT_CASES: list[tuple[str, list[str]]] = [
    ("", []),
    ("   \n", []),
    (";", []),
    (";;  ;", []),
    ("-- only a comment", []),
    ("/* only */ ; /* comments */", []),
    ("SELECT 1", ["SELECT 1"]),
    ("SELECT 1;", ["SELECT 1"]),
    ("SELECT 1;;", ["SELECT 1"]),
    ("SELECT 1; SELECT 2", ["SELECT 1", " SELECT 2"]),
    ("SELECT 1; -- trailing", ["SELECT 1"]),
    ("SELECT ';'; SELECT 2", ["SELECT ';'", " SELECT 2"]),
    ("SELECT E'\\';'; SELECT 2", ["SELECT E'\\';'", " SELECT 2"]),
    ("SELECT '\\'; SELECT 2", ["SELECT '\\'", " SELECT 2"]),
    ('SELECT ";"; SELECT 2', ['SELECT ";"', " SELECT 2"]),
    ("DO $$ BEGIN x; y; END $$; SELECT 2", ["DO $$ BEGIN x; y; END $$", " SELECT 2"]),
    ("DO $f$ a $$; $$ b $f$; c", ["DO $f$ a $$; $$ b $f$", " c"]),
    ("SELECT 1 /* ; /* ; */ ; */; SELECT 2", ["SELECT 1 /* ; /* ; */ ; */", " SELECT 2"]),
    ("SELECT 1 -- ;\n; SELECT 2", ["SELECT 1 -- ;\n", " SELECT 2"]),
    ("select$a$;$a$", ["select$a$", "$a$"]),  # `$` inside an identifier starts no dollar quote
    ("select 1$a$;$a$", ["select 1$a$", "$a$"]),  # trailing junk after a number: two statements
    ("SELECT 'abc; SELECT 2", ["SELECT 'abc; SELECT 2"]),
    ("SELECT 1; /* open ; ", ["SELECT 1"]),
    ("SELECT 1; 'x'", ["SELECT 1", " 'x'"]),
    # a `$` right after a dollar quote may open the next one; after a word it continues the word
    ("$$$$$$;$$", ["$$$$$$;$$"]),
    ("$$x$$e'\\';'", ["$$x$$e'\\';'"]),
    ("a$$b$;c", ["a$$b$", "c"]),
    ("x$e'\\';'", ["x$e'\\'", "'"]),
    ("$1$a$;$a$", ["$1$a$", "$a$"]),
]


@pytest.mark.parametrize(("text", "expected"), SPLIT_CASES)
def test_split_statements(text: str, expected: list[str]) -> None:
    assert split_statements(text) == expected


def split_by_tokens(text: str, standard_conforming_strings: bool = True) -> list[tuple[int, int]]:
    """The statement spans the full tokenizer implies: a slow second implementation to compare with."""
    spans, start, significant_seen = [], 0, False
    for kind, s, e in iter_token_spans(text, standard_conforming_strings=standard_conforming_strings):
        if kind == SEMICOLON:
            if significant_seen:
                spans.append((start, s))
            start, significant_seen = e, False
        elif kind not in (SPACE, COMMENT):
            significant_seen = True
    if significant_seen:
        spans.append((start, len(text)))
    return spans


# SQL-ish fragments that exercise every rule, joined at random: far more likely than plain random text to
# produce quotes, comments and dollar quotes that open and close in interesting places.
FRAGMENTS = [
    "select",
    "declare",
    "c",
    "cursor",
    "with",
    "hold",
    "for",
    "1",
    "1.5",
    "$1",
    "e",
    "E",
    "U&",
    "x",
    " ",
    "\n",
    "\t",
    ";",
    ",",
    "(",
    ")",
    "'",
    "''",
    "'a'",
    "E'",
    "e'\\''",
    "\\",
    "\\'",
    '"',
    '""',
    '"q"',
    "$",
    "$$",
    "$a$",
    "$b$",
    "$1$",
    "-",
    "--",
    "--x\n",
    "/",
    "*",
    "/*",
    "*/",
    "/* ; */",
    "é",
    "\u017f",
    "+",
]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=200)


@given(st.one_of(any_text, fragment_text))
def test_iter_tokens_never_raises_and_is_lossless(text: str) -> None:
    for standard_conforming_strings in (True, False):
        exact = list(
            iter_tokens(text, upper_words=False, standard_conforming_strings=standard_conforming_strings)
        )
        assert "".join(value for _, value in exact) == text
        assert all(value for _, value in exact)
        folded = list(iter_tokens(text, standard_conforming_strings=standard_conforming_strings))
        assert [kind for kind, _ in folded] == [kind for kind, _ in exact]
        assert [len(value) for _, value in folded] == [len(value) for _, value in exact]


@given(st.one_of(any_text, fragment_text), st.booleans())
def test_splitter_agrees_with_the_tokenizer(text: str, standard_conforming_strings: bool) -> None:
    assert statement_spans(text, standard_conforming_strings=standard_conforming_strings) == split_by_tokens(
        text, standard_conforming_strings
    )


# libpg_query's split also counts parentheses (`CREATE RULE … DO (a; b)` is one statement); ours does not,
# which can only over-count, so parentheses are left out of this comparison. Numbers get a space after
# them: where PostgreSQL reads `1select` or `$1$a$` as a number then more tokens (an error to the parser),
# this scanner reads trailing junk.
ASCII_FRAGMENTS = [
    f + " " if f[-1].isdigit() else f for f in FRAGMENTS if f.isascii() and f not in ("(", ")", "$1$")
]
ascii_fragment_text = st.lists(st.sampled_from(ASCII_FRAGMENTS), max_size=30).map("".join)


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow], max_examples=300)
@given(ascii_fragment_text)
def test_splitter_agrees_with_postgresql_scanner(text: str) -> None:
    from pglast import parser

    try:
        theirs = parser.split(text, with_parser=False, only_slices=True)
    except Exception:  # scan errors: unterminated literal, trailing junk ... (PostgreSQL runs nothing)
        assume(False)
        return
    # libpg_query's scanner split keeps only statements with at least one keyword in them.
    ours = [
        (start, end)
        for start, end in statement_spans(text)
        if any(token.kind != "NO_KEYWORD" for token in parser.scan(text[start:end]))
    ]
    assert len(ours) == len(theirs), (ours, theirs)
    for (start, end), their in zip(ours, theirs, strict=True):
        # pglast trims whitespace around each statement; ours keeps it.
        assert start <= their.start and their.stop <= end
        assert text[start : their.start].strip() == "" and text[their.stop : end].strip() == ""


def test_splitting_megabytes_is_linear() -> None:
    row = "INSERT INTO t VALUES (1, 'a;b', \"c\", $$d$$) /* e */; -- f\n"
    text = row * (5_000_000 // len(row))
    assert len(statement_spans(text)) == text.count("\n")
    assert_linear(lambda n: row * n, statement_spans, 5_000)


def test_one_unterminated_literal_in_megabytes_is_linear() -> None:
    text = "SELECT $$" + "x; " * 1_700_000
    assert split_statements(text) == [text]
    assert len(list(iter_tokens(text))) == 3
    assert_linear(
        lambda n: "SELECT $$" + "x; " * n, lambda t: (split_statements(t), list(iter_tokens(t))), 170_000
    )
