"""`Statement`: what hooks see of one Query or Parse text, with each fact computed on first use.

Hooks run once per Query and once per Parse, so the common case must stay near a microsecond: the first
keyword of an ordinary statement comes from one anchored regular expression, everything else from the
lexer in `halephant.sql.lexer`, and `pglast` (a real PostgreSQL parser, tens of microseconds and more)
only when a plugin asks for `.ast`, under a size cap so megabytes are never parsed on the event loop.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar, Final

from halephant.sql.lexer import (
    COMMENT,
    IDENT_CONT_CHARS,
    QUOTED_IDENTIFIER,
    SEMICOLON,
    SPACE,
    STRING,
    WORD,
    TokenKind,
    block_comment_end,
    iter_token_spans,
    statement_spans,
    upper_word,
)

__all__ = ["Statement", "statement_of"]

# An ordinary statement: optional whitespace and opening parentheses, then an ASCII word that does not
# start a string (`E'…'`, `U&'…'`) or run into non-ASCII identifier characters. Anything else takes the
# lexer path, which gives the same answer for these texts.
_FAST_FIRST_WORD: Final = re.compile(
    r"[ \t\n\r\f\v(]*([A-Za-z_][A-Za-z0-9_$]*)(?![A-Za-z0-9_$'&\x80-\U0010ffff])"
)
# `declares_holdable_cursor` cannot be true without "hold" and "declare" (ASCII case folding, as
# PostgreSQL's for keywords).
_DECLARE: Final = re.compile(
    rf"[dD](?<![{IDENT_CONT_CHARS}][dD])[eE][cC][lL][aA][rR][eE](?![{IDENT_CONT_CHARS}])"
)

_NON_SPACE: Final = re.compile(r"[^ \t\n\r\f\v]")
_NEWLINE: Final = re.compile(r"[\n\r]")
_CURSOR_OPTIONS: Final = frozenset({"BINARY", "INSENSITIVE", "ASENSITIVE", "SCROLL"})
_UNSET: Final[Any] = object()
#: first keywords of statements whose effect outlives the transaction on that server connection
_SESSION_KEYWORDS: Final = frozenset(
    {"SET", "RESET", "PREPARE", "DEALLOCATE", "LISTEN", "UNLISTEN", "LOAD", "DISCARD", "CREATE", "DECLARE"}
    | {"SELECT", "WITH"}  # SELECT ... INTO TEMP
)
_SELECTS: Final = frozenset({"SELECT", "WITH"})
#: the shape of a `plain` statement (see `Statement.plain`): one of these first words as
#: `_FAST_FIRST_WORD` finds it (ASCII case folding only, as PostgreSQL's for keywords), then no `;`
#: except one that ends the text
_PLAIN: Final = re.compile(
    r"[ \t\n\r\f\v(]*(select|insert|update|delete|values|table|with)"
    r"(?![A-Za-z0-9_$'&\x80-\U0010ffff])[^;]*;?[ \t\n\r\f\v]*\Z",
    re.IGNORECASE | re.ASCII,
)
#: the first six characters, lower-cased, of the usual plain statement, and its first keyword
_PLAIN_HEADS: Final = {w.lower(): w for w in ("SELECT", "INSERT", "UPDATE", "DELETE", "VALUES")}
#: what may follow such a word for the short test in `Statement._is_plain` (a subset of what _PLAIN
#: allows there; anything else goes to _PLAIN)
_PLAIN_HEAD_ENDS: Final = frozenset(" \t\n\r\f\v(*")
#: session-level functions, found by a plain search (a false positive only costs a reconnect)
_SESSION_FUNCTIONS: Final = re.compile(r"(?i)pg_(?:try_)?advisory_lock|set_config\"?\s*\(")


def _significant(
    text: str, start: int, end: int, standard_conforming_strings: bool
) -> Iterator[tuple[TokenKind, str]]:
    """Tokens of `text[start:end]` other than whitespace and comments, words upper-cased."""
    spans = iter_token_spans(text, start, end, standard_conforming_strings=standard_conforming_strings)
    for kind, s, e in spans:
        if kind == WORD:
            yield kind, upper_word(text[s:e])
        elif kind != SPACE and kind != COMMENT:
            yield kind, text[s:e]


def _first_non_space(text: str) -> int:
    m = _NON_SPACE.search(text)
    return len(text) if m is None else m.start()


def _first_token_start(text: str, pos: int, end: int) -> int:
    """Offset of the first token in `text[pos:end]` that is not whitespace or a comment."""
    while (m := _NON_SPACE.search(text, pos, end)) is not None:
        pos = m.start()
        if text.startswith("--", pos, end):
            newline = _NEWLINE.search(text, pos, end)
            pos = end if newline is None else newline.start()
        elif text.startswith("/*", pos, end):
            pos = block_comment_end(text, pos + 2, end)
        else:
            return pos
    return end


def _is_holdable_declare(tokens: Iterator[tuple[TokenKind, str]]) -> bool:
    """Match `DECLARE name [BINARY] [ASENSITIVE|INSENSITIVE] [[NO] SCROLL] CURSOR WITH HOLD` (gram.y).

    The options may come in any order, as the grammar allows; the name may be any identifier, even an
    unreserved keyword such as `cursor` or `hold`.
    """
    if next(tokens, None) != (WORD, "DECLARE"):
        return False
    name = next(tokens, None)
    if name is None or name[0] not in (WORD, QUOTED_IDENTIFIER):
        return False
    token = next(tokens, None)
    if name[0] == QUOTED_IDENTIFIER and token == (WORD, "UESCAPE"):  # U&"c!0063" UESCAPE '!'
        if (escape := next(tokens, None)) is None or escape[0] != STRING:
            return False
        token = next(tokens, None)
    while token is not None and token[0] == WORD and (token[1] in _CURSOR_OPTIONS or token[1] == "NO"):
        if token[1] == "NO" and next(tokens, None) != (WORD, "SCROLL"):
            return False
        token = next(tokens, None)
    return (
        token == (WORD, "CURSOR")
        and next(tokens, None) == (WORD, "WITH")
        and next(tokens, None) == (WORD, "HOLD")
    )


_INTO_TEMP: Final = frozenset({"TEMP", "TEMPORARY", "PG_TEMP"})


class Statement:
    """One SQL text as sent in a Query or Parse message, possibly several statements.

    Every property is computed on first access and cached; constructing one costs almost nothing.
    Words are compared upper-cased (ASCII letters only, as PostgreSQL folds keywords); quoted identifiers
    (`"select"`), strings, comments and dollar-quoted bodies never count as keywords.
    """

    #: `.ast` gives up (returns None) above this many UTF-8 bytes: parsing a 0.6 MB query takes ~30 ms.
    MAX_PARSE_BYTES: ClassVar[int] = 256 * 1024
    #: How many words `.keywords` keeps.
    KEYWORD_LIMIT: ClassVar[int] = 10

    # The facts below are computed on first use. Their defaults live on the class, so constructing one
    # stores the text only (no __slots__: a subclass may then fix facts in advance, see `statement_of`).
    _first_keyword: str | None = None
    _keywords: tuple[str, ...] | None = None
    _spans: list[tuple[int, int]] | None = None
    _holdable: bool | None = None
    _session: str | None = None
    _low: str | None = None
    _plain: bool | None = None
    _ast: Any = _UNSET

    def __init__(self, text: str) -> None:
        self.text: Final = text

    def __repr__(self) -> str:
        shown = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"Statement({shown!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Statement):
            return self.text == other.text
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.text)

    def _lower(self) -> str:
        # One lower-cased copy serves every substring prefilter below: most texts are seen once (literal
        # values differ), so each fact's first computation is the common case.
        low = self._low
        if low is None:
            low = self._low = self.text.lower()
        return low

    def mentions(self, word: str) -> bool:
        """`word` (lower case) occurs anywhere in the text, ignoring ASCII case: a cheap prefilter before
        the facts below, also in comments and strings (a false positive only costs the precise test)."""
        return word in self._lower()

    # --- structure -----------------------------------------------------------------------------------

    def _statement_spans(self) -> list[tuple[int, int]]:
        spans = self._spans
        if spans is None:
            spans = self._spans = statement_spans(self.text)
        return spans

    @property
    def statement_count(self) -> int:
        """How many non-empty statements the text holds (`SELECT 1;;` is one; a bare comment is none)."""
        if self._spans is None and _FAST_FIRST_WORD.match(self.text):
            # No `;`, or only one that ends the text (`SELECT …;`, as pgbench and many tools send):
            # one statement, without lexing a text that is most often seen once.
            text = self.text
            semicolon = text.find(";")
            if semicolon < 0 or semicolon == len(text.rstrip(" \t\n\r\f\v")) - 1:
                return 1
        return len(self._statement_spans())

    @property
    def is_multi_statement(self) -> bool:
        """More than one statement (only a simple Query may carry several: one implicit transaction)."""
        return self.statement_count > 1

    @property
    def statements(self) -> tuple[str, ...]:
        """The text of each non-empty statement, split at top-level `;` (see `split_statements`)."""
        text = self.text
        return tuple(text[start:end] for start, end in self._statement_spans())

    # --- keywords ------------------------------------------------------------------------------------

    @property
    def first_keyword(self) -> str:
        """The first unquoted word of the first statement, upper-cased (`"SELECT"`), or `""` if none."""
        keyword = self._first_keyword
        if keyword is None:
            text = self.text
            m = _FAST_FIRST_WORD.match(text)
            if m is None and text.startswith(("/*", "--"), _first_non_space(text)):
                # A leading comment (ORM and tracing tags): skip it without tokenizing, then retry.
                m = _FAST_FIRST_WORD.match(text, _first_token_start(text, 0, len(text)))
            if m is not None:
                keyword = m.group(1).upper()
            else:
                keywords = self.keywords
                keyword = keywords[0] if keywords else ""
            self._first_keyword = keyword
        return keyword

    @property
    def first_keywords(self) -> tuple[str, ...]:
        """The first keyword of every statement in the text, in order (`SELECT 1; TRUNCATE t` gives
        `("SELECT", "TRUNCATE")`), one per `statements` (`""` for one without a word): what a policy
        about kinds of statement checks, since a simple Query may carry several and `first_keyword` is
        the first one's only. Not cached."""
        if self.statement_count == 1:
            return (self.first_keyword,)
        return tuple(Statement(text).first_keyword for text in self.statements)

    @property
    def keywords(self) -> tuple[str, ...]:
        """The first `KEYWORD_LIMIT` unquoted words of the first statement, upper-cased.

        Other tokens are skipped, so `BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY` gives
        `("BEGIN", "ISOLATION", "LEVEL", "SERIALIZABLE", "READ", "ONLY")`. Unquoted identifiers are words
        too: `SELECT a FROM t` gives `("SELECT", "A", "FROM", "T")`.
        """
        keywords = self._keywords
        if keywords is None:
            keywords = self._keywords = self._first_statement_words()
        return keywords

    def _first_statement_words(self) -> tuple[str, ...]:
        text = self.text
        limit = self.KEYWORD_LIMIT
        words: list[str] = []
        statement_started = False
        for kind, start, end in iter_token_spans(text):
            if kind == WORD:
                words.append(upper_word(text[start:end]))
                if len(words) >= limit:
                    break
                statement_started = True
            elif kind == SEMICOLON:
                if statement_started:
                    break
            elif kind != SPACE and kind != COMMENT:
                statement_started = True
        return tuple(words)

    # --- policy facts --------------------------------------------------------------------------------

    @property
    def declares_holdable_cursor(self) -> bool:
        """Some statement in the text is `DECLARE … CURSOR WITH HOLD …`, a cursor that outlives COMMIT.

        Seen through any case, comments between the words and quoted cursor names; text inside strings,
        comments and dollar quotes never counts. When the text holds a backslash, it is also read as a
        session with `standard_conforming_strings = off` would read it (`'\\'` then does not end the
        string), and either reading is enough: the client's setting is not known here.
        """
        holdable = self._holdable
        if holdable is None:
            holdable = self._holdable = self._find_holdable_cursor()
        return holdable

    def _find_holdable_cursor(self) -> bool:
        text = self.text
        # `in text.lower()` was the fastest case-insensitive test measured (3x a regex): ~1 µs per 1.5 KB.
        if "hold" not in self._lower():
            return False
        candidates = {m.start() for m in _DECLARE.finditer(text)}
        if not candidates:
            return False
        readings = (True, False) if "\\" in text else (True,)
        for standard_conforming_strings in readings:
            if standard_conforming_strings:
                spans = self._statement_spans()
            else:
                spans = statement_spans(text, standard_conforming_strings=False)
            for start, end in spans:
                # Only a statement whose first word is a candidate `declare` is tokenized, and only as far
                # as its first words: megabytes of statements quoting "declare … hold" stay cheap.
                first = _first_token_start(text, start, end)
                if first in candidates and _is_holdable_declare(
                    _significant(text, first, end, standard_conforming_strings)
                ):
                    return True
        return False

    @property
    def session_state(self) -> str:
        """What this text leaves behind on the server connection after its transaction, or `""`.

        Conservative: `SET` (not `SET LOCAL` / `SET TRANSACTION`), `RESET`, `PREPARE`, `DEALLOCATE`,
        `LISTEN`, `UNLISTEN`, `LOAD`, `DISCARD`, `CREATE TEMP …`, `SELECT … INTO TEMP …`,
        `DECLARE … WITH HOLD`, and calls of session advisory locks or `set_config`. A transaction
        pooler must not hand such a server to another client as it is.
        """
        found = self._session
        if found is None:
            found = self._session = self._find_session_state()
        return found

    def _find_session_state(self) -> str:
        # The common case, about 0.2 µs: none of the words that could matter appear anywhere. `set` also
        # covers reset and set_config, `listen` unlisten. Chained `in` tests measured 3x faster than a
        # regex alternation and 4x faster than any() over a tuple.
        low = self._lower()
        if not (
            "set" in low
            or "prepare" in low
            or "deallocate" in low
            or "listen" in low
            or "load" in low
            or "discard" in low
            or "create" in low
            or "declare" in low
            or "advisory_lock" in low
            or ("into" in low and "temp" in low)
        ):
            return ""
        texts = (self,) if self.statement_count <= 1 else tuple(Statement(t) for t in self.statements)
        for statement in texts:
            keyword = statement.first_keyword
            if keyword not in _SESSION_KEYWORDS:
                continue
            if keyword == "SET":
                second = statement.keywords[1:2]
                if second != ("LOCAL",) and second != ("TRANSACTION",):
                    return "SET"
            elif keyword == "CREATE":
                if {"TEMP", "TEMPORARY"} & set(statement.keywords[1:4]):
                    return "CREATE TEMP"
            elif keyword == "DECLARE":
                if statement.declares_holdable_cursor:
                    return "DECLARE WITH HOLD"
            elif keyword in _SELECTS:
                if statement.selects_into_temp:
                    return "SELECT INTO TEMP"
            else:
                return keyword
        match = _SESSION_FUNCTIONS.search(self.text)
        return match.group(0).rstrip("( \t\n") if match else ""

    @property
    def plain(self) -> bool:
        """An ordinary statement, the kind nearly every transaction sends: nothing in it for a policy.

        True when the text is one statement (at most one `;`, at its end) that starts, after optional
        whitespace and opening parentheses, with SELECT, INSERT, UPDATE, DELETE, VALUES, TABLE or WITH,
        and leaves no session state (`session_state` is `""`). So it declares no cursor, changes no
        setting and takes no session-level lock. Conservative: a leading comment, or a `;` inside a
        string, makes a text not plain. An inspector marked `@halephant.ignores_plain_statements`
        is not called for plain statements.
        """
        plain = self._plain
        if plain is None:
            plain = self._plain = self._is_plain()
        return plain

    def _is_plain(self) -> bool:
        # Scans at C speed instead of the facts one by one (most texts are seen once): the shape, then
        # the names of session-level functions, which are all that can give such a text session state
        # (a case-insensitive regular expression search for them costs 4x these two tests).
        text = self.text
        low = self._lower()
        keyword = _PLAIN_HEADS.get(low[:6])
        semi = text.find(";")
        if keyword is not None and low[6:7] in _PLAIN_HEAD_ENDS and (semi < 0 or semi == len(text) - 1):
            # the usual shape, decided without the regular expression (a third of the cost): a first
            # word at the very start, no `;` but one that ends the text; _PLAIN agrees on these
            pass
        else:
            m = _PLAIN.match(text)
            if m is None:
                return False
            keyword = m.group(1).upper()
        if self._first_keyword is None:
            self._first_keyword = keyword  # the word first_keyword finds
        if "advisory_lock" in low or "set_config" in low:  # what _SESSION_FUNCTIONS can match
            return False
        if "into" in low and "temp" in low and self.selects_into_temp:
            return False
        self._session = ""
        return True

    @property
    def selects_into_temp(self) -> bool:
        """`SELECT … INTO [LOCAL | GLOBAL] TEMP | TEMPORARY …` or `… INTO pg_temp.name`: a temporary
        table created by SELECT INTO (gram.y's OptTempTableName), which outlives the transaction like
        CREATE TEMP.

        Tokenized, so strings, comments and quoted identifiers other than `"pg_temp"` never count; a
        false positive only keeps a client on its server. Not cached: asked at most once per text."""
        low = self._lower()
        if "into" not in low or "temp" not in low:
            return False
        text = self.text
        tokens = _significant(text, 0, len(text), True)
        for kind, value in tokens:
            if kind == WORD and value == "INTO":
                after = next(tokens, None)
                if after is not None and after[0] == WORD and after[1] in ("LOCAL", "GLOBAL"):
                    after = next(tokens, None)
                if after is not None and (
                    (after[0] == WORD and after[1] in _INTO_TEMP)
                    or (after[0] == QUOTED_IDENTIFIER and after[1] == '"pg_temp"')
                ):
                    return True
        return False

    # --- full parse ----------------------------------------------------------------------------------

    @property
    def ast(self) -> Any:
        """pglast's parse tree (a tuple of `pglast.ast.RawStmt`), or None.

        None when the text is over `MAX_PARSE_BYTES` or pglast cannot parse it. Parsing costs ~30 µs for
        `SELECT 1` and grows with the text: call this only when the cheap facts above cannot decide.
        """
        tree = self._ast
        if tree is _UNSET:
            tree = self._ast = self._parse()
        return tree

    def _parse(self) -> Any:
        text = self.text
        limit = self.MAX_PARSE_BYTES
        # A str of n code points is n to 4n UTF-8 bytes: encode only when the length cannot decide.
        if len(text) > limit:
            return None
        if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
            return None
        try:
            from pglast import parse_sql  # imported on first use: a C extension most processes never need

            return parse_sql(text)
        except Exception:
            return None


# --- one Statement per text --------------------------------------------------------------------------

# Statements are immutable facts about a text (lazily computed and cached inside), so one object per
# distinct text serves every client: applications repeat the same few statements.
_by_text: dict[bytes, Statement] = {}
_CACHE_SIZE: Final = 2048
_CACHE_MAX_TEXT: Final = 8192
# Texts sent with their values inline (the simple protocol: psycopg2, pgbench -M simple) differ in
# their numbers only, so most are seen once. Whether a text is `plain` does not depend on which digits
# it holds (a digit stays a digit for the lexer, and no keyword or `;` is made of digits) unless it
# has a `$` (a dollar-quote tag may hold digits): such texts share the answer, kept per shape with all
# digits read as 0, with the first keyword it comes with.
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_plain_shapes: dict[bytes, type[Statement]] = {}


def statement_of(raw: bytes) -> Statement | None:
    """The `Statement` of a Query's or Parse's text, shared by every client that sends the same text
    (except a plain text whose shape is known: cheaper to build than to cache).

    The text is in the client's `client_encoding`: nearly always UTF-8. Text that is not UTF-8 comes
    from a client with another encoding (LATIN1, WIN1252, EUC_JP, ...) and must be inspected all the
    same, or its `SET`s, advisory locks and `WITH HOLD` cursors would slip past halephant: it is read
    as Latin-1, exact for LATIN1 and keeping every ASCII byte where it is. In the multi-byte client
    encodings (SJIS, BIG5, GBK, UHC, ...) a character's second byte may look like an ASCII letter or a
    backslash, but never like a quote, `$`, `-`, `/` or `*` (nor, but in JOHAB, `;`): keywords,
    strings, comments and statement ends are still found; names with such characters come out garbled."""
    statement = _by_text.get(raw)
    if statement is not None:
        return statement
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if len(raw) > _CACHE_MAX_TEXT:
        return Statement(text)
    if 36 in raw:  # "$"
        statement = Statement(text)
    else:
        shape = raw.translate(_DIGITS_AS_ZERO)
        plain = _plain_shapes.get(shape)
        if plain is not None:
            # seen this shape: the facts come with the class, and building it again costs about what
            # a cache entry would save; not cached, so texts seen once do not crowd out the others
            return plain(text)
        statement = Statement(text)
        if statement.plain:
            if len(_plain_shapes) >= _CACHE_SIZE:
                _plain_shapes.clear()
            _plain_shapes[shape] = _plain_kind(statement.first_keyword)
    if len(_by_text) >= _CACHE_SIZE:
        _by_text.clear()  # crude but cheap; applications repeat a small set of texts
    _by_text[raw] = statement
    return statement


def _plain_kind(keyword: str) -> type[Statement]:
    """A `Statement` class whose texts are plain and start with `keyword` (one class per keyword)."""
    kind = _plain_kinds.get(keyword)
    if kind is None:
        # the facts as class attributes in place of the properties that would compute them (and of
        # the fields those read): a pooled transaction reads `plain` and `first_keyword` once each
        facts = {"plain": True, "first_keyword": keyword, "session_state": ""}
        kind = _plain_kinds[keyword] = type("PlainStatement", (Statement,), facts)
    return kind


_plain_kinds: dict[str, type[Statement]] = {}
