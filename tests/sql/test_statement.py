"""`halephant.sql.Statement`: the lazy facts hooks read, checked against pglast where it can judge."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.scaling import assert_linear

from halephant.sql import Statement, session_effects, split_statements
from halephant.sql.statement import _PLAIN, statement_of

# --- first_keyword / keywords -------------------------------------------------------------------------

KEYWORD_CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("", "", ()),
    ("   ", "", ()),
    ("-- only a comment", "", ()),
    ("SELECT 1", "SELECT", ("SELECT",)),
    ("select * from t", "SELECT", ("SELECT", "FROM", "T")),
    ("  \n\tBegin read only", "BEGIN", ("BEGIN", "READ", "ONLY")),
    ("(SELECT 1) UNION (SELECT 2)", "SELECT", ("SELECT", "UNION", "SELECT")),
    ("/* x */ LISTEN chan", "LISTEN", ("LISTEN", "CHAN")),
    ("/* /* */ SELECT 1 */ SET search_path = evil", "SET", ("SET", "SEARCH_PATH", "EVIL")),
    ("-- select\nUPDATE t SET a = 1", "UPDATE", ("UPDATE", "T", "SET", "A")),
    ("; ; DELETE FROM t", "DELETE", ("DELETE", "FROM", "T")),
    ("SELECT 1; DROP TABLE t", "SELECT", ("SELECT",)),
    ('"select" x', "X", ("X",)),  # a quoted identifier is never a keyword
    ("'DECLARE' x", "X", ("X",)),
    ("'x'; SELECT 1", "", ()),  # the first statement has no word at all
    ("E'a' b", "B", ("B",)),
    ("U&'a' b", "B", ("B",)),
    ("\u017felect 1", "\u017fELECT", ("\u017fELECT",)),  # not a keyword to PostgreSQL either
    (
        "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
        "BEGIN",
        ("BEGIN", "ISOLATION", "LEVEL", "SERIALIZABLE", "READ", "ONLY", "DEFERRABLE"),
    ),
    (
        "SELECT a, b, c, d, e, f, g, h, i, j, k, l",
        "SELECT",
        ("SELECT", "A", "B", "C", "D", "E", "F", "G", "H", "I"),  # KEYWORD_LIMIT words
    ),
    (
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "WITH",
        ("WITH", "D", "AS", "DELETE", "FROM", "T", "RETURNING", "SELECT", "FROM", "D"),
    ),
    ("select$a$ 1", "SELECT$A$", ("SELECT$A$",)),
    ("$$x$$", "", ()),
]


@pytest.mark.parametrize(("text", "first", "keywords"), KEYWORD_CASES)
def test_keywords(text: str, first: str, keywords: tuple[str, ...]) -> None:
    assert Statement(text).first_keyword == first
    assert Statement(text).keywords == keywords
    statement = Statement(text)
    assert statement.keywords == keywords and statement.first_keyword == first  # the other order of caching


@pytest.mark.parametrize(
    ("text", "first_keywords"),
    [
        ("", ()),
        ("-- only a comment", ()),
        ("SELECT 1", ("SELECT",)),
        ("TRUNCATE t;", ("TRUNCATE",)),
        ("/* x */ truncate t", ("TRUNCATE",)),
        ("SELECT 1; truncate t", ("SELECT", "TRUNCATE")),  # what `first_keyword` alone would miss
        ("select ';'; /* ; */ DROP TABLE t;;", ("SELECT", "DROP")),
        ("'x'; SELECT 1", ("", "SELECT")),
        ("'x'", ("",)),
    ],
)
def test_first_keywords(text: str, first_keywords: tuple[str, ...]) -> None:
    statement = Statement(text)
    assert statement.first_keywords == first_keywords
    assert len(first_keywords) == statement.statement_count == len(statement.statements)


FRAGMENTS = [
    "select",
    "Declare",
    "c",
    "cursor",
    "with",
    "hold",
    "for",
    "1",
    "$1",
    "e",
    "E",
    "U&",
    "x",
    " ",
    "\n",
    ";",
    ",",
    "(",
    ")",
    "'",
    "'a'",
    "E'",
    "e'\\''",
    "\\",
    '"',
    '"q"',
    "$",
    "$$",
    "$a$",
    "--",
    "--x\n",
    "/*",
    "*/",
    "/* ; */",
    "é",
    "\u017f",
    "&",
]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=200)


@given(st.one_of(any_text, fragment_text))
def test_fast_paths_agree_with_the_lexer(text: str) -> None:
    statement = Statement(text)
    words = statement._first_statement_words()
    assert statement.first_keyword == (words[0] if words else "")
    assert statement.statement_count == len(split_statements(text))
    assert statement.is_multi_statement == (len(split_statements(text)) > 1)
    assert isinstance(statement.declares_holdable_cursor, bool)


# --- plain ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 538291;",
        "select 1",
        "(SELECT 1)",
        "  \n\tINSERT INTO t VALUES (1, 'a')",
        "UPDATE t SET a = 1 WHERE b = 2",
        "delete from t",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "VALUES (1)",
        "TABLE t",
        "SELECT 1;  ",
        "SELECT * INTO t FROM x",
    ],
)
def test_plain(text: str) -> None:
    assert Statement(text).plain is True


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SELECT 1; SELECT 2",
        "SELECT 1; -- trailing comment after the end",
        "SELECT ';'",  # conservative: a ; in a string is not looked into
        "/* tag */ SELECT 1",  # conservative: a leading comment takes the full path
        "SELECT pg_advisory_lock(1)",
        "select PG_TRY_ADVISORY_LOCK(1)",
        "SELECT set_config('a.b', 'c', false)",
        "SELECT 1 INTO TEMP t",
        "SET x = 1",
        "BEGIN",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "DROP TABLE t",
        "selectx 1",
        "\u017felect 1",  # not SELECT: ASCII case folding only
        "select'a'",
    ],
)
def test_not_plain(text: str) -> None:
    assert Statement(text).plain is False


@given(st.one_of(any_text, fragment_text, st.sampled_from(FRAGMENTS).map(lambda f: "SELECT 1 " + f)))
def test_a_plain_statement_has_nothing_for_a_policy(text: str) -> None:
    # what the default inspectors rely on to be marked ignores_plain_statements
    statement = Statement(text)
    if statement.plain:
        fresh = Statement(text)  # the facts computed on their own, not left behind by .plain
        assert fresh.statement_count == 1
        assert fresh.first_keyword in {"SELECT", "INSERT", "UPDATE", "DELETE", "VALUES", "TABLE", "WITH"}
        assert statement.first_keyword == fresh.first_keyword
        assert fresh.session_state == "" and statement.session_state == ""
        assert not fresh.declares_holdable_cursor
        assert session_effects(fresh) == ()


_HEADS = st.sampled_from(["SELECT", "select", "Insert", "UPDATE", "delete", "VALUES", "SELECTx", "selec"])
_AFTER = st.sampled_from([" ", "\t", "\n", "(", "*", ";", "", "'", "\u0130", "\u212a", "\xa0"])


@given(_HEADS, _AFTER, st.one_of(any_text, fragment_text), st.sampled_from(["", ";", "; ", ";;", " "]))
def test_the_short_shape_test_agrees_with_the_regular_expression(
    head: str, after: str, body: str, end: str
) -> None:
    text = head + after + body + end
    low = text.lower()
    expected = (
        _PLAIN.match(text) is not None
        and "advisory_lock" not in low
        and "set_config" not in low
        and not Statement(text).selects_into_temp
    )
    statement = Statement(text)
    assert statement.plain is expected
    if expected:
        assert statement.first_keyword == Statement(text).first_keyword


# --- statement_count ----------------------------------------------------------------------------------

COUNT_CASES: list[tuple[str, int]] = [
    ("", 0),
    (";", 0),
    ("/* c */", 0),
    ("SELECT 1", 1),
    ("SELECT 1;", 1),
    ("SELECT 1; SELECT 2", 2),
    ("SELECT 1;; SELECT 2;", 2),
    ("SELECT ';'", 1),
    ("SELECT 1 -- ; SELECT 2", 1),
    ("DO $$ BEGIN PERFORM 1; END $$", 1),
    ("SELECT 1; DECLARE c CURSOR FOR SELECT 1", 2),
]


@pytest.mark.parametrize(("text", "count"), COUNT_CASES)
def test_statement_count(text: str, count: int) -> None:
    statement = Statement(text)
    assert statement.statement_count == count
    assert statement.is_multi_statement == (count > 1)
    assert len(statement.statements) == count


def test_statements_are_the_split_texts() -> None:
    assert Statement("SELECT 1; /* x */ ; SELECT ';'").statements == ("SELECT 1", " SELECT ';'")


# --- declares_holdable_cursor -------------------------------------------------------------------------

HOLDABLE = [
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "declare c cursor with hold for select 1",
    'declare "c" /*x*/ cursor with /* y */ hold for select 1',
    "DeClArE c CuRsOr WiTh HoLd FoR SELECT 1",
    "DECLARE c BINARY INSENSITIVE NO SCROLL CURSOR WITH HOLD FOR SELECT 1",
    "DECLARE c NO SCROLL BINARY CURSOR WITH HOLD FOR SELECT 1",
    "DECLARE c ASENSITIVE SCROLL CURSOR WITH HOLD FOR SELECT 1",
    "DECLARE cursor CURSOR WITH HOLD FOR SELECT 1",  # the name may be an unreserved keyword
    "DECLARE hold CURSOR WITH HOLD FOR SELECT 1",
    'DECLARE "with hold" CURSOR WITH HOLD FOR SELECT 1',
    'DECLARE U&"c" CURSOR WITH HOLD FOR SELECT 1',
    "DECLARE U&\"c\" UESCAPE '!' CURSOR WITH HOLD FOR SELECT 1",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1;",
    "DECLARE\tc\nCURSOR\r\nWITH\fHOLD\vFOR SELECT 1",
    "DECLARE c--x\nCURSOR--y\nWITH--z\nHOLD FOR SELECT 1",
    "DECLARE/**/c/**/CURSOR/**/WITH/**/HOLD/**/FOR SELECT 1",
    "  -- leading comment\n DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "/* /* */ SELECT 1 */ DECLARE c CURSOR WITH HOLD FOR SELECT 1",  # nested comments (reference T2)
    "SELECT 1; DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
    "SELECT ';'; DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "SELECT $$;$$; DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "SELECT E'\\';'; DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    # standard_conforming_strings on (the default): the string ends at the second quote
    "SELECT 'a\\'; DECLARE c CURSOR WITH HOLD FOR SELECT 1; --'",
    # standard_conforming_strings off: `\'` does not end the string; the client's setting is unknown here
    "SELECT 'a\\'' ; DECLARE c CURSOR WITH HOLD FOR SELECT 1 --'",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 'unterminated",
    "DECLARE c CURSOR WITH HOLD",  # incomplete: PostgreSQL refuses it, rejecting it too is harmless
]

NOT_HOLDABLE = [
    "",
    "SELECT 1",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
    "DECLARE c SCROLL CURSOR FOR SELECT hold FROM t",
    "DECLARE c CURSOR FOR SELECT 1 WITH HOLD",
    "SELECT 'DECLARE c CURSOR WITH HOLD'",
    "SELECT 'DECLARE c CURSOR WITH HOLD FOR SELECT 1'; SELECT 2",
    "-- declare c cursor with hold\nSELECT 1",
    "-- declare c cursor with hold",
    "/* DECLARE c CURSOR WITH HOLD FOR SELECT 1 */",
    "/* /* */ DECLARE c CURSOR WITH HOLD FOR SELECT 1 */",
    "DO $$ BEGIN DECLARE c CURSOR WITH HOLD FOR SELECT 1; END $$",
    "SELECT $f$ ; DECLARE c CURSOR WITH HOLD FOR SELECT 1; $f$",
    'SELECT "DECLARE c CURSOR WITH HOLD"',
    '"DECLARE" c CURSOR WITH HOLD FOR SELECT 1',
    'DECLARE c "CURSOR" WITH HOLD FOR SELECT 1',
    'DECLARE c CURSOR "WITH" HOLD FOR SELECT 1',
    'DECLARE c CURSOR WITH "HOLD" FOR SELECT 1',
    "EXPLAIN DECLARE c CURSOR WITH HOLD FOR SELECT 1",  # explains it, declares nothing
    "SELECT declare FROM t WHERE hold",
    "xDECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "DECLARE c CURSOR WITH HOLDx FOR SELECT 1",
    "DECLARE c NO CURSOR WITH HOLD FOR SELECT 1",
    "DECLARE CURSOR WITH HOLD FOR SELECT 1",  # `CURSOR` is the name here; `WITH` is no option
    "DECLARE c CUR\u017fOR WITH HOLD FOR SELECT 1",  # a long s is no S to PostgreSQL
    "SELECT E'\\'; DECLARE c CURSOR WITH HOLD FOR SELECT 1; --'",
]


@pytest.mark.parametrize("text", HOLDABLE)
def test_declares_holdable_cursor(text: str) -> None:
    assert Statement(text).declares_holdable_cursor is True


@pytest.mark.parametrize("text", NOT_HOLDABLE)
def test_does_not_declare_holdable_cursor(text: str) -> None:
    assert Statement(text).declares_holdable_cursor is False


def _pglast_declares_holdable(text: str) -> bool | None:
    """PostgreSQL's grammar (via pglast): a DECLARE with CURSOR_OPT_HOLD; None when it cannot parse."""
    import pglast
    from pglast.enums import CURSOR_OPT_HOLD

    try:
        tree = pglast.parse_sql(text)
    except Exception:
        return None
    return any(
        type(raw.stmt).__name__ == "DeclareCursorStmt" and getattr(raw.stmt, "options", 0) & CURSOR_OPT_HOLD
        for raw in tree
    )


def _random_case(draw: st.DrawFn, word: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in word)


@st.composite
def declare_texts(draw: st.DrawFn) -> str:
    """Mostly valid DECLAREs, with comments and whitespace between the words, sometimes hidden."""
    gap = st.sampled_from([" ", "  ", "\n", "\t", "/**/", " /* x */ ", "/* /* n */ ; */", "-- c ;\n", "\r\n"])
    words = [
        "DECLARE",
        draw(st.sampled_from(["c", '"c"', '"with hold"', "cursor", "hold", 'U&"c"', "scroll"])),
    ]
    options = draw(
        st.lists(
            st.sampled_from(["BINARY", "INSENSITIVE", "ASENSITIVE", "SCROLL", "NO SCROLL"]),
            max_size=2,
            unique=True,
        )
    )
    words += [*options, "CURSOR"]
    words += draw(st.sampled_from([[], ["WITH", "HOLD"], ["WITHOUT", "HOLD"], ["WITH", '"HOLD"']]))
    words += ["FOR", "SELECT", draw(st.sampled_from(["1", "'hold'", "$$;$$", "E'\\';'"]))]
    body = draw(gap).join(_random_case(draw, w) if w.isalpha() else w for w in words)
    before = draw(st.sampled_from(["", "SELECT 1;", "SELECT ';' ;", "/* ; */ ", "-- x\n", "BEGIN; "]))
    after = draw(st.sampled_from(["", ";", "; SELECT 2", "; COMMIT"]))
    text = before + body + after
    hide = draw(st.sampled_from(["none", "none", "string", "dollar", "comment", "line_comment", "quoted"]))
    if hide == "string":
        text = "SELECT '" + text.replace("'", "''") + "'"
    elif hide == "dollar":
        text = "SELECT $q$" + text + "$q$"
    elif hide == "comment":
        text = "/* " + text + " */ SELECT 1"
    elif hide == "line_comment":
        text = "SELECT 1 -- " + text.replace("\n", " ").replace("\r", " ")
    elif hide == "quoted":
        text = 'SELECT 1 AS "' + text.replace('"', '""') + '"'
    return text


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow], max_examples=400)
@given(st.one_of(declare_texts(), fragment_text))
def test_holdable_cursor_agrees_with_postgresql_grammar(text: str) -> None:
    expected = _pglast_declares_holdable(text)
    assume(expected is not None)  # PostgreSQL runs nothing of a text it cannot parse
    assert Statement(text).declares_holdable_cursor == expected


@given(any_text)
def test_holdable_cursor_never_raises(text: str) -> None:
    Statement(text).declares_holdable_cursor  # noqa: B018


def test_megabytes_of_sql_cost_linear_time() -> None:
    # Every statement quotes "declare" and "hold", so no prefilter can skip the work.
    row = "SELECT 'declare c cursor with hold', $$hold$$ /* declare */ FROM t; "
    tail = "DECLARE c CURSOR WITH HOLD FOR SELECT 1"
    text = row * (5_000_000 // len(row)) + tail
    statement = Statement(text)
    assert statement.declares_holdable_cursor is True
    assert statement.statement_count == 5_000_000 // len(row) + 1
    assert statement.first_keyword == "SELECT"
    assert statement.ast is None  # over MAX_PARSE_BYTES: never parsed

    def facts(text: str) -> object:
        s = Statement(text)
        return s.declares_holdable_cursor, s.statement_count, s.first_keyword, s.ast

    assert_linear(lambda n: row * n + tail, facts, 5_000)


def test_megabytes_of_one_statement_cost_linear_time() -> None:
    def make(n: int) -> str:
        return "SELECT * FROM t WHERE id IN (" + ", ".join(f"'{i}'" for i in range(n)) + ") -- hold"

    statement = Statement(make(520_000))
    assert len(statement.text) > 5_000_000
    assert statement.declares_holdable_cursor is False
    assert statement.statement_count == 1
    assert statement.keywords[:3] == ("SELECT", "FROM", "T")

    def facts(text: str) -> object:
        s = Statement(text)
        return s.declares_holdable_cursor, s.statement_count, s.keywords

    assert_linear(make, facts, 52_000)


# --- ast ----------------------------------------------------------------------------------------------


def test_ast_parses_lazily_and_caches() -> None:
    statement = Statement("SELECT 1; SELECT 2")
    tree = statement.ast
    assert tree is not None and len(tree) == 2
    assert type(tree[0].stmt).__name__ == "SelectStmt"
    assert statement.ast is tree


def test_ast_is_none_for_text_pglast_refuses() -> None:
    assert Statement("SELEC 1").ast is None
    assert Statement("SELECT '\ud800'").ast is None  # a lone surrogate cannot even be encoded
    assert Statement("(" * 10_000).ast is None


def test_ast_is_none_above_the_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Statement, "MAX_PARSE_BYTES", 100)
    assert Statement("SELECT 1 -- " + "x" * 88).ast is not None  # exactly 100 bytes
    assert Statement("SELECT 1 -- " + "x" * 89).ast is None
    # The cap counts UTF-8 bytes, not characters: 30 four-byte characters are 120 bytes.
    assert Statement("SELECT 1 -- " + "\U0001f418" * 22).ast is not None  # 12 + 88 bytes
    assert Statement("SELECT 1 -- " + "\U0001f418" * 23).ast is None


def test_default_size_cap() -> None:
    assert Statement.MAX_PARSE_BYTES == 256 * 1024
    assert Statement("SELECT 1 -- " + "x" * (256 * 1024)).ast is None


# --- the object ---------------------------------------------------------------------------------------


def test_statement_is_a_small_value() -> None:
    a, b = Statement("SELECT 1"), Statement("SELECT 1")
    assert a == b and hash(a) == hash(b) and a != Statement("SELECT 2")
    assert a != "SELECT 1"
    assert a.text == "SELECT 1"
    assert repr(a) == "Statement('SELECT 1')"
    assert repr(Statement("x" * 100)).endswith("...')")
    assert vars(a) == {"text": "SELECT 1"}  # constructing one stores the text only; facts come on use


def test_mentions_ignores_ascii_case_and_looks_everywhere() -> None:
    statement = Statement("SELECT 1; BEGIN /* x */ Read WRITE")
    assert statement.mentions("read")
    assert statement.mentions("begin")
    assert not statement.mentions("hold")


# --- statement_of: one Statement per text, plain facts shared by texts that differ in digits only ------


def test_statement_of_shares_one_object_per_text() -> None:
    first = statement_of(b"SELECT 1 FROM t WHERE a = 42")
    assert first is not None and first is statement_of(b"SELECT 1 FROM t WHERE a = 42")


def test_text_in_another_client_encoding_is_inspected_all_the_same() -> None:
    # LATIN1 bytes (not UTF-8): a client with client_encoding LATIN1 sends them, and PostgreSQL runs them
    locks = statement_of(b"SELECT pg_advisory_lock(1) /* caf\xe9 */")
    assert locks is not None and not locks.plain and locks.text.endswith("café */")
    setting = statement_of(b"SET search_path = 'sch\xe9ma', public")
    assert setting is not None and setting.session_state


def test_a_dollar_quote_tag_with_digits_does_not_share_the_answer() -> None:
    # unterminated ($q1$ is never closed): all string, so plain; with every digit 0 the same shape
    # closes the string and runs SELECT INTO TEMP, which must not be taken as plain from that answer
    loose = statement_of(b"SELECT $q1$ $q2$ INTO TEMP x1")
    closed = statement_of(b"SELECT $q0$ $q0$ INTO TEMP x0")
    assert loose is not None and closed is not None
    assert loose.plain is Statement(loose.text).plain
    assert closed.plain is False


digits = st.text(alphabet="0123456789", min_size=1, max_size=6)


@given(
    st.one_of(fragment_text, any_text, st.sampled_from(FRAGMENTS).map(lambda f: "SELECT 1 " + f)),
    st.lists(digits, min_size=1, max_size=4),
    st.lists(digits, min_size=1, max_size=4),
)
def test_texts_that_differ_in_digits_only_agree_on_plain(
    text: str, first: list[str], second: list[str]
) -> None:
    # the same text with different numbers put in at the same places: the second is answered from the
    # shape the first left behind, and must get what it would get on its own
    parts = ("SELECT a FROM t WHERE id = {} " + text + " AND b = {}").split("{}")
    one = parts[0] + first[0] + parts[1] + first[-1] + parts[2]
    two = parts[0] + second[0] + parts[1] + second[-1] + parts[2]
    assume(one.encode() != two.encode())
    a = statement_of(one.encode())
    b = statement_of(two.encode())
    if a is None or b is None:
        return
    assert a.plain is Statement(one).plain
    assert b.plain is Statement(two).plain
    assert b.first_keyword == Statement(two).first_keyword
    assert b.session_state == Statement(two).session_state
