"""Public value objects that hooks receive and return.

Decision results are small frozen dataclasses carrying a `reason`, so every decision can be explained in
logs and status views. Plugins import from here, `halephant`, `halephant.sqlstate` and `halephant.sql`
only; everything else in the core is internal.
"""

from __future__ import annotations

import enum
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from halephant.config.schema import DEFAULT_AUTH_QUERY, Config, DatabaseConfig, UserConfig
from halephant.sql import Statement

__all__ = [
    "Allow",
    "AuthMethod",
    "Cert",
    "ClientInfo",
    "CloseIdleServers",
    "ClusterView",
    "Config",
    "DatabaseConfig",
    "LookUp",
    "Md5",
    "NodeInfo",
    "Peer",
    "Pin",
    "PoolInfo",
    "PoolMode",
    "PoolSize",
    "PoolTarget",
    "Reject",
    "Role",
    "Route",
    "ScramSha256",
    "Statement",
    "StatusPanel",
    "TransactionInfo",
    "Trust",
    "Unpin",
    "UserConfig",
    "UserMap",
    "UserMapLine",
    "Verdict",
]


class PoolMode(enum.StrEnum):
    """When a client gives its server connection back.

    STATEMENT is transaction pooling that allows no transaction block (PgBouncer's statement pooling):
    every statement (every Query, every Sync of the extended protocol) must end with the server Idle.
    Whatever tells transaction pooling from session pooling treats it as TRANSACTION
    (`mode is not PoolMode.SESSION`).
    """

    TRANSACTION = "transaction"
    SESSION = "session"
    STATEMENT = "statement"


class Role(enum.StrEnum):
    """What a node is, or which kind of node a transaction must run on."""

    PRIMARY = "primary"
    REPLICA = "replica"


# --- decisions ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse: the client gets an ErrorResponse with this SQLSTATE, message, hint and detail (`reason` is
    what the log and the decision records say; the message when empty)."""

    code: str
    message: str
    hint: str | None = None
    reason: str = ""
    detail: str | None = None

    def __post_init__(self) -> None:
        if not self.reason:
            object.__setattr__(self, "reason", self.message)


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the statement through and stop asking other inspectors."""

    reason: str


@dataclass(frozen=True, slots=True)
class Pin:
    """Keep the client's server connection.

    Without `feature`, for the rest of its session (or until a later `Unpin`). With `feature` (a row of
    `databases.<name>.session_features`, see `halephant.sql.effects.FEATURES`), until the client
    releases that feature (UNLISTEN, advisory unlock, CLOSE, DROP of its temporary tables, RESET ROLE):
    after a statement that may release it, the core checks the server at the end of the transaction and
    gives the server back once nothing session-bound is left on it.
    """

    reason: str
    feature: str = ""


@dataclass(frozen=True, slots=True)
class Unpin:
    """Drop an earlier feature-less `Pin` of this client: the server goes back to the pool at the end of
    the transaction, once the core has checked that no session-bound state is left on it (otherwise the
    client stays pinned for what is left). The statement itself runs as usual."""

    reason: str


@dataclass(frozen=True, slots=True)
class CloseIdleServers:
    """Let the statement through, after closing halephant's idle server connections to the upstream
    database `database` on the client's cluster (a `DROP DATABASE` would fail on them otherwise).
    Connections in use by other clients are left alone: the statement then fails as it would direct."""

    database: str
    reason: str


Verdict = Allow | Reject | Pin | Unpin | CloseIdleServers


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """Where a client's session goes: answer of `halephant_select_pool`.

    `database` is the pool's database name (the `databases:` entry, or the client's database name when
    the catch-all `'*'` entry serves it); `server_database` and `server_user` are what halephant uses
    when it logs in upstream, with `server_settings` as extra startup parameters (e.g.
    `default_transaction_read_only=on` for a read-only user). `user` is the halephant user the pools
    belong to ("" means `server_user`): an alias that logs in upstream as another user still gets pools
    of its own, so servers set up differently are never shared. `entry` is the `databases:` entry
    whose settings the pools use (sizes, timeouts, reset query, session features; "" means the one
    that serves `database`): a plugin that serves databases `databases:` does not list names the
    entry they follow, and its clients are told 57P01 once a reload removes that entry.
    `server_password` is the plaintext password, or the `server_user`'s SCRAM verifier or md5 hash for a
    pass-through login (`halephant.auth.upstream`); None: none (a server asking for one is refused).
    """

    database: str
    cluster: str
    server_database: str
    server_user: str
    server_password: str | None
    mode: PoolMode
    reason: str
    user: str = ""
    server_settings: tuple[tuple[str, str], ...] = ()
    entry: str = ""

    def __post_init__(self) -> None:
        if type(self.mode) is not PoolMode:
            # the core tells modes apart by identity: "session" must not pass for transaction pooling
            object.__setattr__(self, "mode", PoolMode(self.mode))

    @property
    def pool_user(self) -> str:
        """The user part of this target's pool keys."""
        return self.user or self.server_user

    @property
    def entry_name(self) -> str:
        """The name to look the pools' `databases:` entry up by (`Config.database_for`)."""
        return self.entry or self.database


@dataclass(frozen=True, slots=True)
class PoolSize:
    """How many server connections one pool (database, user, node) may hold.

    `recheck_after` (seconds, more than 0) asks `halephant_pool_size` again for this pool that long
    after this answer, without a reload: for sizes that follow the clock or anything else that changes
    by itself (a bigger pool during office hours). None, the default: asked again only after a reload.
    """

    min: int
    max: int
    reserve: int = 0
    reason: str = ""
    recheck_after: float | None = None


@dataclass(frozen=True, slots=True, weakref_slot=True)
class PoolInfo:
    """What hooks see of the pool a client uses. Plugins may keep a weak reference to one: the core
    replaces it on reload, and forgets it with the pools of a database name the catch-all entry served."""

    target: PoolTarget
    size: PoolSize

    @property
    def mode(self) -> PoolMode:
        return self.target.mode

    @property
    def database(self) -> str:
        return self.target.database


@dataclass(frozen=True, slots=True)
class Route:
    """Which kind of node runs a transaction: answer of `halephant_route`.

    `role` may be given by its name (`"primary"`, `"replica"`); anything else raises ValueError.
    """

    role: Role
    reason: str

    def __post_init__(self) -> None:
        if type(self.role) is not Role:
            # the core tells roles apart by identity: "primary" must not be taken for a replica route
            object.__setattr__(self, "role", Role(self.role))


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One PostgreSQL node of a cluster as the core last saw it.

    `role` is None while the node's role is unknown (never reached); `usable` says whether new
    transactions may go there (reachable, and for a replica within the cluster's lag limits), and
    `reason` explains why not. Lags are None where unknown (and always for a primary). `lsn` is the
    WAL position the last probe saw (a primary's current one, a replica's replayed one, as a byte
    offset) and `timeline` the node's timeline; both None until a probe answered.
    """

    name: str
    host: str
    port: int
    role: Role | None
    usable: bool
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    reason: str = ""
    lsn: int | None = None
    timeline: int | None = None
    #: when the node was last probed (Unix time); None until then
    probed_at: float | None = None


@dataclass(frozen=True, slots=True)
class ClusterView:
    """A cluster's nodes at one moment: what `halephant_route` sees to decide between primary and
    replicas. Immutable: the core makes a new one when anything about a node changes."""

    name: str
    nodes: tuple[NodeInfo, ...]

    @property
    def primary(self) -> NodeInfo | None:
        """The usable primary, or None (none reachable, or failover in progress)."""
        for node in self.nodes:
            if node.role is Role.PRIMARY and node.usable:
                return node
        return None

    @property
    def replicas(self) -> tuple[NodeInfo, ...]:
        """The replicas that may take new transactions now."""
        return tuple(node for node in self.nodes if node.role is Role.REPLICA and node.usable)


@dataclass(frozen=True, slots=True)
class TransactionInfo:
    """The transaction being routed: its first statement when it starts with Query or Parse, or with a
    Bind of a statement the client prepared by name (what drivers send for the statements they cache)."""

    statement: Statement | None


@dataclass(frozen=True, slots=True)
class StatusPanel:
    """A panel a plugin adds to `halephant status`: a titled table of text cells.

    `columns` name the table's columns; each row has one string per column. `note` is a line printed
    under the table (e.g. what the numbers mean). Plain data, so a plugin needs no terminal library.
    """

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...] = ()
    note: str = ""


# --- authentication methods: the core drives the exchange --------------------------------------------


@dataclass(frozen=True, slots=True)
class ScramSha256:
    """Authenticate the client with SCRAM-SHA-256.

    `secret` is the plaintext password or a `SCRAM-SHA-256$…` verifier; `None` runs a mock exchange that
    always fails with 28P01, so unknown user names cannot be told apart from bad passwords.
    """

    secret: str | None
    reason: str = "scram-sha-256"


@dataclass(frozen=True, slots=True)
class Md5:
    """Authenticate the client with md5 (`secret`: plaintext or an `md5…` hash; `None` always fails)."""

    secret: str | None
    reason: str = "md5"


@dataclass(frozen=True, slots=True)
class Trust:
    """Let the client in without a password (explicit opt-in only)."""

    reason: str = "trust"


@dataclass(frozen=True, slots=True)
class LookUp:
    """Look the client's password up in PostgreSQL, then authenticate it against what was found (PgBouncer's
    `auth_user` / `auth_query`).

    The core logs in to the primary of the client's pool's cluster as `auth_user` (an entry of `users:`,
    with its upstream password), in database `dbname`, runs `query` with the client's user name as its
    parameter `$1`, and reads the first row's second column: a SCRAM verifier runs `ScramSha256`, an md5
    hash `Md5`, no row or a NULL the mock exchange that fails with 28P01 (as for an unknown user). A
    query that fails ends the login with 28000 (08006 when the primary cannot be reached) and a log line
    with PostgreSQL's error. An answer serves
    further logins of the same user for `cache_for` seconds (0: every login asks). Afterwards halephant
    logs in upstream as the client's user by pass-through of what was found (the ClientKey of the
    client's SCRAM login, or the md5 hash). Without a pool (pool selection rejected the client) the core
    runs the mock exchange instead.
    """

    auth_user: str
    dbname: str
    query: str = DEFAULT_AUTH_QUERY
    cache_for: float = 60.0
    reason: str = "auth_query"


@dataclass(frozen=True, slots=True)
class Cert:
    """Let the client in without a password on the strength of its TLS client certificate (pg_hba.conf's
    `cert`): the core checks that the client connected over TLS with a certificate that `client_tls.ca_file`
    verified during the handshake (only `client_tls.mode` verify-ca and verify-full ask for one), and that
    the certificate's CN is the user name. No certificate, or one not verified: FATAL 28000 "connection
    requires a valid client certificate"; another CN: FATAL 28000 "certificate authentication failed for
    user ...". A plaintext or Unix-domain socket client never passes."""

    reason: str = "cert"


@dataclass(frozen=True, slots=True)
class UserMapLine:
    """One line of a user name map, as pg_ident.conf writes it (`MAPNAME SYSTEM-USERNAME PG-USERNAME`).

    `system_user` is a name, or a compiled regular expression (pg_ident.conf's `/regex`), searched in the
    operating system user name as PostgreSQL does (anchor it with `^` and `$` to match it whole).
    `database_user` is a name, in which the first `\\1` stands for the expression's first group; a
    compiled expression the requested user name must contain a match of; or None for any user (`all`).
    """

    system_user: str | re.Pattern[str]
    database_user: str | re.Pattern[str] | None

    def allows(self, system_user: str, database_user: str) -> bool:
        """Whether this line lets operating system user `system_user` log in as `database_user`."""
        wanted = self.database_user
        if isinstance(self.system_user, str):
            if self.system_user != system_user:
                return False
        else:
            found = self.system_user.search(system_user)
            if found is None:
                return False
            if isinstance(wanted, str) and "\\1" in wanted:
                group = found.group(1) if self.system_user.groups else None
                if group is None:
                    return False  # no group (refused at load), or one that took no part in the match
                wanted = wanted.replace("\\1", group, 1)  # the first only, as PostgreSQL replaces it
        if wanted is None:
            return True
        if isinstance(wanted, str):
            return wanted == database_user
        return wanted.search(database_user) is not None


@dataclass(frozen=True, slots=True)
class UserMap:
    """A user name map (pg_ident.conf's MAPNAME and its lines): which operating system users may log in as
    which database users. Any one line that allows a pair allows it, as in PostgreSQL."""

    name: str
    lines: tuple[UserMapLine, ...] = ()

    def allows(self, system_user: str, database_user: str) -> bool:
        """Whether some line lets operating system user `system_user` log in as `database_user`."""
        return any(line.allows(system_user, database_user) for line in self.lines)


@dataclass(frozen=True, slots=True)
class Peer:
    """Let a client on the Unix-domain socket (`unix_socket_dir`) in without a password, on the strength of
    its operating system user (pg_hba.conf's `peer`): the core reads the user id of the process at the
    other end of the socket from the kernel (`SO_PEERCRED`) and its name from the user database. Without a
    `map` that name must be the requested user name; with one, the map must allow the pair (`UserMap`).
    Otherwise, over TCP, or for a user id with no name: FATAL 28000 `Peer authentication failed for user
    "..."`, the reason in the log as PostgreSQL writes it (`no match in usermap "..." for user "..."
    authenticated as "..."`)."""

    map: UserMap | None = None
    reason: str = "peer"


AuthMethod = ScramSha256 | Md5 | Trust | LookUp | Cert | Peer


# --- the client as hooks see it ----------------------------------------------------------------------

_client_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class ClientInfo:
    """One connected client. Plugins keep per-client state in `stash`, keyed by an object they own."""

    user: str
    database: str
    params: dict[str, str]
    address: str
    id: int = field(default_factory=lambda: next(_client_ids))
    _stash: dict[object, Any] | None = field(default=None, repr=False)
    #: The session's settings as halephant carries them (read only): those set at startup, and in
    #: transaction pooling every one the client changed, as the server read it back at the end of the
    #: transaction (so a SET LOCAL or a rolled-back SET does not count). Names lower-case; a setting
    #: back at the pool's default is absent.
    settings: dict[str, str] = field(default_factory=dict, repr=False)
    #: The TLS version of its connection ("TLSv1.3", "TLSv1.2") when it connected over TLS
    #: (`client_tls:`), else None: a plugin may refuse a user or a database in plaintext with it.
    tls: str | None = None

    @property
    def stash(self) -> dict[object, Any]:
        """Per-client plugin state, keyed by an object the plugin owns (created on first use: idle
        clients are many, and most plugins keep nothing)."""
        if self._stash is None:
            self._stash = {}
        return self._stash

    def stashed(self, key: object, default: Any = None) -> Any:
        """`stash.get(key, default)` without creating the stash: for checks that run per transaction."""
        stash = self._stash
        return default if stash is None else stash.get(key, default)

    @property
    def application_name(self) -> str:
        """The `application_name` of the startup packet ("" if none). A later `SET application_name`
        does not change it: the session's current value is `settings.get("application_name")`."""
        return self.params.get("application_name", "")

    def __repr__(self) -> str:
        return f"<client #{self.id} {self.user}@{self.database} from {self.address}>"
