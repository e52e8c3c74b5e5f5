"""Which kind of node runs a transaction: the default `halephant_route` policy, and the guard that keeps a
read-only session read-only (`halephant_inspect_query`).

User-based: a user with `read_only: true` is served by replicas. Its server connections start with
`default_transaction_read_only=on` (see `database_routing`), and any attempt to switch its session or a
transaction to read-write is refused with 25006 before it reaches a server, the client staying usable:
`SET [SESSION|LOCAL] default_transaction_read_only|transaction_read_only = off|DEFAULT`, their `RESET`,
`SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE`, `SET TRANSACTION READ WRITE`,
`BEGIN|START TRANSACTION ... READ WRITE`, `set_config()` of either setting (unless to a true literal)
or of a name that is not a plain literal (`'a' || 'b'`, `E'...'`, a parameter), also in a `DO` block's
body, and `DO` blocks that mention them. When no replica is usable, `databases.<name>.replica_fallback`
decides: `primary` (the default; still read-only) or `error` (57P03).
What a function or dynamic SQL does inside the server cannot be seen. On a replica PostgreSQL refuses
writes anyway; on the primary fallback, a transaction-pooled session whose server reported
`default_transaction_read_only` off after such a switch gets 25006 for every transaction there (the
client must reconnect). A session-pooled one, which is routed once, and the rest of the very Query that
made the switch are not covered.

Transaction-based, for read-write users, when `databases.<name>.read_only_transactions` is `replica`
(the default): a transaction that starts with `BEGIN READ ONLY` / `START TRANSACTION READ ONLY` goes to a
replica, and after `SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY` or
`SET default_transaction_read_only = on` every later transaction of that client does, until it sets
read-write again (`RESET`, `TO DEFAULT`, `RESET ALL` and `DISCARD ALL` end it too). What counts is the
session's setting as the core carries it (`ClientInfo.settings`: read back from the server at the end of
each transaction), so a SET that was rolled back or undone by a failed transaction changes nothing, as
with PostgreSQL. Such a SET does not pin the client in transaction pooling: the core carries session
settings with the client to every server it gets, so the transactions stay read-only if they land on the
primary.
Read-only transactions fall back to the primary when no replica is usable; a SERIALIZABLE one stays on
the primary (a hot standby refuses serializable transactions).

Every decision carries its reason ("replica: user myapp_ro is read-only"), logged at debug level.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from typing import Final

from halephant import hookimpl, ignores_plain_statements, sqlstate
from halephant.sql import (
    COMMENT,
    DOLLAR_STRING,
    PARAM,
    PUNCT,
    QUOTED_IDENTIFIER,
    SPACE,
    STRING,
    WORD,
    iter_tokens,
    parse_bool,
    setting_changes,
)
from halephant.types import (
    ClientInfo,
    ClusterView,
    Config,
    PoolInfo,
    Reject,
    Role,
    Route,
    Statement,
    TransactionInfo,
)

#: settings whose value "off" makes a session or transaction read-write
READ_ONLY_SETTINGS: Final = frozenset({"default_transaction_read_only", "transaction_read_only"})
HINT: Final = (
    "This connection is routed to read-only replicas (users.{user}.read_only in halephant.yaml). "
    "Connect as a read-write user to write."
)


class _Current:
    """The config in force (set by `halephant_configure`; the route hook does not receive it)."""

    __slots__ = ("config",)

    def __init__(self) -> None:
        self.config: Config | None = None


_current = _Current()


class _Plan:
    """Precomputed decisions for one pool (database, user): the route hook runs per transaction."""

    __slots__ = (
        "fallback",
        "pool_ref",
        "primary",
        "read_only_user",
        "read_write_on_primary",
        "ro_to_replica",
        "ro_tx",
        "ro_tx_fallback",
        "session",
        "session_fallback",
        "session_primary_tx",
        "to_replica",
    )

    def __init__(self, pool: PoolInfo, config: Config | None) -> None:
        # weak: the core forgets the pools of a catch-all database name once unused (and a reload
        # replaces every PoolInfo); the plan goes with its PoolInfo (`_plan`)
        self.pool_ref = weakref.ref(pool, _forget(id(pool)))
        target = pool.target
        user_name = target.pool_user
        user = config.users.get(user_name) if config is not None else None
        db = config.database_for(target.entry_name) if config is not None else None
        self.read_only_user = user is not None and user.read_only
        self.ro_to_replica = db is None or db.read_only_transactions == "replica"
        fallback = db.replica_fallback if db is not None else "primary"
        self.primary = Route(Role.PRIMARY, f"primary: default route for {user_name}")
        self.to_replica = Route(Role.REPLICA, f"replica: user {user_name} is read-only")
        self.fallback: Route | Reject
        if fallback == "error":
            self.fallback = Reject(
                sqlstate.CANNOT_CONNECT_NOW,
                f'no replica is available for read-only user "{user_name}"',
                hint="Every replica is down or lagging; databases."
                f"{target.database}.replica_fallback: primary would use the primary (read-only).",
                reason=f"error: user {user_name} is read-only, no usable replica (replica_fallback: error)",
            )
        else:
            self.fallback = Route(
                Role.PRIMARY,
                f"primary: user {user_name} is read-only, no usable replica (replica_fallback: primary)",
            )
        self.read_write_on_primary = Reject(
            sqlstate.READ_ONLY_SQL_TRANSACTION,
            f'user "{user_name}" is read-only, but its session was switched to read-write '
            "(default_transaction_read_only is off): not served on the primary",
            hint="No replica is usable now, and the primary serves this user only in a read-only "
            f"session (users.{user_name}.read_only in halephant.yaml): reconnect.",
            reason=f"error: read-only user {user_name} turned default_transaction_read_only off, "
            "no usable replica",
        )
        self.ro_tx = Route(Role.REPLICA, "replica: transaction starts READ ONLY")
        self.ro_tx_fallback = Route(Role.PRIMARY, "primary: transaction starts READ ONLY, no usable replica")
        self.session = Route(Role.REPLICA, "replica: session is read-only (SET by the client)")
        self.session_fallback = Route(Role.PRIMARY, "primary: session is read-only, no usable replica")
        self.session_primary_tx = Route(
            Role.PRIMARY,
            "primary: session is read-only, but the transaction starts READ WRITE or SERIALIZABLE",
        )


# id(PoolInfo) -> its plan (PoolInfo hashes all its fields: id() is what a per-transaction lookup affords).
# An entry is removed when its PoolInfo is freed (the callback of the plan's weak reference, which runs
# before that id can be given to another object), so a plan is found only for its own pool, and the
# plans of pools the core has forgotten (one per database name the catch-all entry served) do not pile up.
_plans: dict[int, _Plan] = {}


def _forget(key: int) -> Callable[[weakref.ref[PoolInfo]], None]:
    def forget(ref: weakref.ref[PoolInfo]) -> None:
        plan = _plans.get(key)
        if plan is not None and plan.pool_ref is ref:
            del _plans[key]

    return forget


def _plan(pool: PoolInfo) -> _Plan:
    plan = _plans.get(id(pool))
    if plan is None:
        plan = _plans[id(pool)] = _Plan(pool, _current.config)
    return plan


def _has_replica(cluster: ClusterView) -> bool:
    # a loop, not any() or cluster.replicas: nothing is allocated, and this runs per transaction
    for node in cluster.nodes:  # noqa: SIM110
        if node.role is Role.REPLICA and node.usable:
            return True
    return False


@hookimpl(trylast=True)
def halephant_configure(config: Config) -> None:
    _current.config = config
    _plans.clear()


@hookimpl(trylast=True)
def halephant_route(
    client: ClientInfo, transaction: TransactionInfo, pool: PoolInfo, cluster: ClusterView
) -> Route | Reject:
    plan = _plans.get(id(pool))  # _plan(), inlined: this runs per transaction
    if plan is None:
        plan = _plan(pool)
    if plan.read_only_user:
        if _has_replica(cluster):
            return plan.to_replica  # a hot standby refuses writes, whatever the session says
        if type(plan.fallback) is Route and _read_write_session(client):
            return plan.read_write_on_primary
        return plan.fallback
    if not plan.ro_to_replica:
        return plan.primary
    statement = transaction.statement
    begin = statement if statement is not None and statement.first_keyword in _STARTS else None
    read_only = client.settings.get("default_transaction_read_only")
    if read_only is not None and _session_read_only(read_only, client):
        if begin is not None and _needs_primary(begin):
            return plan.session_primary_tx
        return plan.session if _has_replica(cluster) else plan.session_fallback
    if begin is not None and _starts_read_only(begin):
        return plan.ro_tx if _has_replica(cluster) else plan.ro_tx_fallback
    return plan.primary


_STARTS: Final = frozenset({"BEGIN", "START"})


def _read_write_session(client: ClientInfo) -> bool:
    """The read-only user's session is read-write by default: something the inspect hook could not see
    turned it off (a function, dynamic SQL in a DO block), as the server reported."""
    value = client.settings.get("default_transaction_read_only")
    return value is not None and parse_bool(value) is not True


def _session_read_only(value: str, client: ClientInfo) -> bool:
    """The session's transactions are read-only by default (`value`: its default_transaction_read_only)
    and not SERIALIZABLE, which a hot standby cannot run. Read from the settings the core carries for the
    client, which the server itself reported at the end of each transaction: a SET that was rolled back,
    or that a failed transaction undid, does not count."""
    if not parse_bool(value):
        return False
    isolation = client.settings.get("default_transaction_isolation", "")
    return isolation.strip().lower() != "serializable"


# BEGIN texts are few: (access mode: "on" / "off" / None, serializable) is kept per text
_begins: dict[str, tuple[str | None, bool]] = {}


def _begin_modes(statement: Statement) -> tuple[str | None, bool]:
    modes = _begins.get(statement.text)
    if modes is None:
        if len(_begins) > 1024:
            _begins.clear()
        changes = setting_changes(statement.text) or ()
        access = [c.value for c in changes if c.name == "transaction_read_only"]
        modes = _begins[statement.text] = (
            access[-1] if access else None,
            any(c.name == "transaction_isolation" and c.value == "serializable" for c in changes),
        )
    return modes


def _starts_read_only(statement: Statement) -> bool:
    """BEGIN/START TRANSACTION ... READ ONLY, except SERIALIZABLE, which a hot standby cannot run."""
    if "ONLY" not in statement.keywords:
        return False
    access, serializable = _begin_modes(statement)
    return access == "on" and not serializable


def _needs_primary(statement: Statement) -> bool:
    """BEGIN/START TRANSACTION ... READ WRITE or SERIALIZABLE: what a standby cannot run, even in a
    session that is read-only by default (PostgreSQL lets such a session begin a read-write one)."""
    keywords = statement.keywords
    if "WRITE" not in keywords and "SERIALIZABLE" not in keywords:
        return False
    access, serializable = _begin_modes(statement)
    return access == "off" or serializable


# --- keeping read-only sessions read-only ------------------------------------------------------------


_NOTHING: Final = ""
# What a text switches to read-write ("" for nothing), shared by every client (applications repeat a
# small set of statements).
_facts: dict[str, str] = {}
_FACT_CACHE_SIZE: Final = 4096
_FACT_CACHE_MAX_TEXT: Final = 8192
#: first keywords of the statements that can change read-only-ness (besides set_config, a session state)
_MAYBE: Final = frozenset({"SET", "RESET", "BEGIN", "START", "DISCARD", "DO"})
_RELEVANT: Final = re.compile(r"(?i)read|reset|discard|set_config")
_MENTIONS: Final = re.compile(r"(?i)transaction_read_only|read\s+write")


@hookimpl(trylast=True)
@ignores_plain_statements  # answers None for every plain statement (tested)
def halephant_inspect_query(client: ClientInfo, statement: Statement, pool: PoolInfo) -> Reject | None:
    # Nearly every statement is decided by facts cached on the Statement, which the core reads anyway:
    # most simple-protocol texts are new (their literals differ), so no per-text work comes first.
    if not (
        statement.first_keyword in _MAYBE
        or statement.session_state
        # a later statement of a multi-statement text: any switch it makes names "read" (READ WRITE,
        # transaction_read_only); SET, RESET, DISCARD and set_config() are session states above
        or (";" in statement.text and statement.mentions("read") and statement.is_multi_statement)
    ):
        return None
    plan = _plan(pool)
    if not plan.read_only_user:
        return None  # a read-write user's read-only session is routed from its settings (the route hook)
    text = statement.text
    to_read_write = _facts.get(text)
    if to_read_write is None:
        to_read_write = _classify(statement)
        if len(text) <= _FACT_CACHE_MAX_TEXT:
            if len(_facts) >= _FACT_CACHE_SIZE:
                _facts.clear()
            _facts[text] = to_read_write
    if not to_read_write:
        return None
    user = pool.target.pool_user
    return Reject(
        sqlstate.READ_ONLY_SQL_TRANSACTION,
        f'user "{user}" is read-only: {to_read_write} is not allowed',
        hint=HINT.format(user=user),
        reason=f"read-only user {user}: {to_read_write}",
    )


def _classify(statement: Statement) -> str:
    """What the text does to switch a session or transaction to read-write, described ("" if nothing)."""
    if _RELEVANT.search(statement.text) is None:
        return _NOTHING
    texts = statement.statements if statement.is_multi_statement else (statement.text,)
    for text in texts:
        what = _classify_one(text)
        if what:
            return what
    return _NOTHING


def _classify_one(text: str) -> str:
    keyword = Statement(text).first_keyword
    if keyword in ("SET", "RESET", "BEGIN", "START"):
        changes = setting_changes(text)
        if changes is None:
            if _MENTIONS.search(text) and not re.fullmatch(r"(?i)\s*RESET\s+ALL\s*;?\s*", text):
                return f"{keyword} of transaction_read_only in a form halephant cannot check"
            return ""
        for change in changes:
            if change.name not in READ_ONLY_SETTINGS:
                continue
            on = parse_bool(change.value) if change.value is not None else None
            if not on:
                return _describe(keyword, text, change.name, change.value)
        return ""
    if keyword == "DO" and _MENTIONS.search(text):
        return "a DO block that changes transaction_read_only"
    if "set_config" in text.lower():
        return _set_config_switch(text)
    return ""


def _describe(keyword: str, text: str, name: str, value: str | None) -> str:
    if keyword in ("BEGIN", "START"):
        return "START TRANSACTION READ WRITE" if keyword == "START" else "BEGIN READ WRITE"
    if keyword == "RESET":
        return f"RESET {name}"
    words = text.upper().split()
    if "CHARACTERISTICS" in words[:3]:
        return "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE"
    if words[1:2] == ["TRANSACTION"]:
        return "SET TRANSACTION READ WRITE"
    return f"SET {name} TO DEFAULT" if value is None else f"SET {name} = {value}"


def _set_config_switch(text: str, in_do: bool = False, data: bool = False) -> str:
    """A `set_config(name, value, ...)` call that could turn read-only off, described; "" if none.

    Only a name and a value written as plain literals (`'...'`, a cast allowed) can be checked: a call
    with anything else there (an expression, a parameter, an `E'...'` or dollar-quoted string) is
    refused, whatever it names. The body of a `DO` block is looked into as well, and the strings in it
    (dynamic SQL). The strings of other statements are mostly data (`LIKE '%set_config(%'`), but a
    function may run one as SQL in the session (`query_to_xml('SELECT set_config(...)', ...)`): there
    (`data`) only a call that plainly names a read-only setting counts."""
    tokens = [(k, v) for k, v in iter_tokens(text) if k != SPACE and k != COMMENT]
    in_do = in_do or tokens[:1] == [(WORD, "DO")]
    for i, (kind, value) in enumerate(tokens):
        if kind == DOLLAR_STRING or (kind == STRING and value.startswith("'")):
            if "set_config" in value.lower():  # a DO block's body, a string in it, or maybe data
                if kind == DOLLAR_STRING:
                    body = value[value.index("$", 1) + 1 : value.rindex("$", 0, -1)]
                else:
                    body = value[1:-1].replace("''", "'")
                what = _set_config_switch(body, in_do=True) if in_do else _set_config_switch(body, data=True)
                if what:
                    return what
            continue
        if not _is_set_config(kind, value) or tokens[i + 1 : i + 2] != [(PUNCT, "(")]:
            continue
        name, j = _literal_argument(tokens, i + 2)
        if name is None:
            if data:
                continue  # text that mentions set_config, as data does
            if tokens[i + 2 : i + 3] and tokens[i + 2][0] == PARAM:
                return "set_config() with a setting name halephant cannot see"
            return "set_config() with a computed setting name"
        if name.lower() not in READ_ONLY_SETTINGS:
            continue
        new, _ = _literal_argument(tokens, j)
        if new is not None and parse_bool(new):
            continue  # set to true: stays read-only
        return f"set_config('{name.lower()}', ...)"
    return ""


def _is_set_config(kind: str, value: str) -> bool:
    return (kind == WORD and value == "SET_CONFIG") or (kind == QUOTED_IDENTIFIER and value == '"set_config"')


def _literal_argument(tokens: Sequence[tuple[str, str]], i: int) -> tuple[str | None, int]:
    """The function argument at `tokens[i]` when it is one plain `'...'` literal, maybe cast
    (`'x'::text`), and the index after its `,` (None when it is anything else)."""
    kind, value = tokens[i] if i < len(tokens) else ("", "")
    if kind != STRING or not value.startswith("'"):
        return None, i
    i += 1
    if tokens[i : i + 2] == [(PUNCT, ":"), (PUNCT, ":")]:
        if tokens[i + 2 : i + 3] == [] or tokens[i + 2][0] != WORD:
            return None, i
        i += 3
    if tokens[i : i + 1] not in ([(PUNCT, ",")], [(PUNCT, ")")]):
        return None, i
    return value[1:-1].replace("''", "'"), i + 1
