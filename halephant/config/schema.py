"""The typed shape of `halephant.yaml`: frozen pydantic models, one per section.

Every model forbids unknown keys, and scalar fields use strict types, so `pool_size: "20"` is an error
rather than a silent conversion. Checks that span fields or sections (a database naming an undefined
cluster, `min_pool_size` above `pool_size`, password forms) live in `halephant.config.loader`, which can
point at the offending value in the file.

Names of `clusters:`, `databases:` and `users:` entries are their mapping keys; they are not YAML keys
inside the entry. `Config` records each key on its entry when it is validated (`DatabaseConfig.name`),
so `DatabaseConfig.server_database` can fall back to it.
"""

from __future__ import annotations

import base64
import grp
import ipaddress
import re
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from halephant.config.units import Duration, Size
from halephant.unix_socket import is_socket_dir, socket_dir, too_long

if TYPE_CHECKING:
    from halephant.config.client_tls import ClientTls
    from halephant.server_tls import ServerTls

__all__ = [
    "CATCH_ALL",
    "DEFAULT_AUTH_QUERY",
    "AdminConfig",
    "AuthName",
    "ClientTlsConfig",
    "ClientTlsMode",
    "ClusterConfig",
    "Config",
    "DatabaseConfig",
    "HostPort",
    "LimitsConfig",
    "LoggingConfig",
    "PluginsConfig",
    "PoolModeName",
    "ServerTlsConfig",
    "ServerTlsMode",
    "SessionFeaturesConfig",
    "TopologyConfig",
    "UserConfig",
    "is_md5_hash",
    "is_scram_verifier",
    "parse_scram_verifier",
]

PoolModeName = Literal["transaction", "session", "statement"]
AuthName = Literal["scram-sha-256", "md5", "trust"]

#: The `databases:` key that serves every database name not listed, under its own name upstream.
CATCH_ALL = "*"

#: PgBouncer's default `auth_query`: `$1` is the user name, sent as a parameter.
DEFAULT_AUTH_QUERY = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"

_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")
_HOSTPORT_HELP = "expected host:port like 127.0.0.1:5432 or [::1]:5432"


def is_scram_verifier(password: str) -> bool:
    """True for a stored SCRAM-SHA-256 verifier (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`)."""
    return password.startswith("SCRAM-SHA-256$")


def parse_scram_verifier(verifier: str) -> tuple[bytes, bytes, bytes, int]:
    """`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (pg_authid) -> (salt, StoredKey,
    ServerKey, iterations); ValueError saying what is wrong. The config checks every verifier with it at
    load time, so that a broken one is a config error rather than a failed login for every client of
    that user; client authentication reads the keys with it."""
    shape = "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, as in pg_authid"
    try:
        mech, rest = verifier.split("$", 1)
        iter_salt, keys = rest.split("$")
        iterations, salt = iter_salt.split(":")
        stored, server = keys.split(":")
    except ValueError:
        raise ValueError(f"not a SCRAM-SHA-256 verifier: {shape}") from None
    if mech != "SCRAM-SHA-256":
        raise ValueError(f"not a SCRAM-SHA-256 verifier: {shape}")
    if not iterations.isdigit() or not 1 <= int(iterations) <= 2**31 - 1:
        # (PostgreSQL's own limit: scram_iterations and pg_authid hold an int)
        raise ValueError(
            "not a SCRAM-SHA-256 verifier: the iteration count must be a number from 1 to 2147483647 "
            f"({shape})"
        )
    try:
        decoded = [base64.b64decode(part, validate=True) for part in (salt, stored, server)]
    except ValueError:
        raise ValueError(f"not a SCRAM-SHA-256 verifier: salt and keys must be base64 ({shape})") from None
    if not decoded[0] or len(decoded[1]) != 32 or len(decoded[2]) != 32:
        raise ValueError(
            f"not a SCRAM-SHA-256 verifier: StoredKey and ServerKey must be 32 bytes each ({shape})"
        )
    return decoded[0], decoded[1], decoded[2], int(iterations)


def is_md5_hash(password: str) -> bool:
    """True for a stored md5 hash (`md5` + 32 hex digits), as in `pg_authid.rolpassword`."""
    return _MD5_HASH.fullmatch(password) is not None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostPort(_Section):
    """An address: written `host:port`, or `[v6 address]:port`; for a cluster node the host may also be
    a Unix-socket directory, an absolute path as in libpq's `host=` (`/var/run/postgresql:5432` is the
    socket `/var/run/postgresql/.s.PGSQL.5432`, see `halephant.unix_socket`). A directory is kept written
    one way (`unix_socket.socket_dir`: `/run//pg/:5432` is `/run/pg:5432`), so that two spellings of it
    are one node, found listed twice like a TCP node.

    Port 0 is accepted (it means "any free port" for `listen`); cluster nodes refuse it, and `listen`
    and `admin.listen` refuse socket directories (`unix_socket_dir` is halephant's own socket).
    """

    host: StrictStr
    port: Annotated[StrictInt, Field(ge=0, le=65535)]

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            host, port = _split_host_port(value)
            return {"host": host, "port": port}
        if isinstance(value, Mapping | HostPort):
            return value
        got = repr(value) if isinstance(value, int | float) else f"a {type(value).__name__}"
        raise PydanticCustomError("host_port", f"{_HOSTPORT_HELP}; got {got}")

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        if is_socket_dir(host):
            _check_socket_dir(host)
            return socket_dir(host)
        if not _valid_host(host):
            raise PydanticCustomError("host", _not_a_host(host))
        return host

    @model_validator(mode="after")
    def _check_socket_path(self) -> HostPort:
        if is_socket_dir(self.host):
            _check_socket_path_length(self.host, self.port)
        return self

    @property
    def is_socket_dir(self) -> bool:
        """The host is a Unix-socket directory, not a host name or IP address."""
        return is_socket_dir(self.host)

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """`HostPort.parse("127.0.0.1:5432")`; raises pydantic.ValidationError on bad input."""
        return cls.model_validate(text)

    def __str__(self) -> str:
        if ":" in self.host and not self.is_socket_dir:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _split_host_port(text: str) -> tuple[str, int]:
    stripped = text.strip()
    if is_socket_dir(stripped):
        # a path may hold colons: the port is after the last one, and is not optional (libpq's 5432
        # would be a guess here)
        host, sep, port = stripped.rpartition(":")
        if not sep or not port.isdigit():
            raise PydanticCustomError(
                "host_port",
                f"a Unix-socket directory needs its port too, like /var/run/postgresql:5432; got {text!r}",
            )
    elif stripped.startswith("["):
        host, sep, port = stripped[1:].partition("]:")
        if not sep or not host:
            raise PydanticCustomError("host_port", f"{_HOSTPORT_HELP}; got {text!r}")
        if ":" not in host:  # brackets are for IPv6 addresses only
            raise PydanticCustomError("host_port", f"not an IPv6 address in brackets: {host!r}")
    else:
        host, sep, port = stripped.rpartition(":")
        if not sep or not host:
            raise PydanticCustomError("host_port", f"{_HOSTPORT_HELP}; got {text!r}")
        if ":" in host:
            raise PydanticCustomError(
                "host_port", f"write an IPv6 address in brackets, like [::1]:5432; got {text!r}"
            )
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise PydanticCustomError("host_port", f"the port must be a number from 0 to 65535; got {text!r}")
    if is_socket_dir(host):
        _check_socket_dir(host)
    elif not _valid_host(host):
        raise PydanticCustomError("host_port", f"{_not_a_host(host)}: {host!r}")
    return host, int(port)


def _not_a_host(host: str) -> str:
    if "/" in host:
        return "a Unix-socket directory must be an absolute path (starting with /)"
    return "not a valid host name or IP address"


def _check_socket_dir(path: str) -> None:
    if "\0" in path:
        raise PydanticCustomError("socket_dir", "a Unix-socket directory cannot contain a NUL character")


def _check_socket_path_length(directory: str, port: int) -> None:
    why = too_long(directory, port)
    if why is not None:
        raise PydanticCustomError("socket_dir", why)


def _valid_host(host: str) -> bool:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return host.isascii() and _HOSTNAME.fullmatch(host) is not None


def _server_port(node: HostPort) -> HostPort:
    if node.port == 0:
        raise PydanticCustomError("host_port", "a server node needs a real port, not 0")
    return node


def _tcp_address(address: HostPort) -> HostPort:
    if address.is_socket_dir:
        raise PydanticCustomError(
            "host_port",
            "expected a TCP address like 127.0.0.1:6432; for a Unix-domain socket set unix_socket_dir",
        )
    return address


def _socket_dir(directory: str) -> str:
    if not is_socket_dir(directory):
        raise PydanticCustomError(
            "socket_dir",
            f"expected an absolute path (starting with /), like /var/run/postgresql; got {directory!r}",
        )
    _check_socket_dir(directory)
    return socket_dir(directory)


_MODE = re.compile(r"(?:0o?)?([0-7]{3})")


def _socket_mode(value: Any) -> Any:
    # YAML reads an unquoted 0770 as the number 770: a string is the only spelling that cannot mislead
    if isinstance(value, int) and not isinstance(value, bool):
        raise PydanticCustomError(
            "socket_mode", f'write the mode as a quoted octal string, like "0{value}"; got the number {value}'
        )
    if isinstance(value, str):
        found = _MODE.fullmatch(value.strip())
        if found is None:
            raise PydanticCustomError(
                "socket_mode",
                f'expected an octal mode of permission bits, like "0777" or "0770"; got {value!r}',
            )
        return "0" + found.group(1)
    return value


def _socket_group(name: str) -> str:
    try:
        grp.getgrnam(name)
    except KeyError:
        raise PydanticCustomError("socket_group", f"no group named {name!r} on this machine") from None
    return name


TcpAddress = Annotated[HostPort, AfterValidator(_tcp_address)]

ServerTlsMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]


def _tls_file(path: str) -> str:
    # a relative path would depend on the directory halephant was started from, which a reload may not share
    if path != "system" and not path.startswith("/"):  # ("system": clusters.<name>.tls.ca_file's own word)
        raise PydanticCustomError(
            "tls_file",
            f"expected an absolute path (starting with /), like /etc/ssl/certs/pg.crt; got {path!r}",
        )
    return path


TlsFile = Annotated[StrictStr, Field(min_length=1), AfterValidator(_tls_file)]


class ServerTlsConfig(_Section):
    """`clusters.<name>.tls`: TLS from halephant to the cluster's nodes, as libpq's sslmode (see
    `halephant.server_tls`). Which files each mode needs, and whether they load, is checked when the
    configuration is loaded (`ServerTls.build`, through the loader)."""

    #: disable, prefer (TLS when the server offers it), require, verify-ca, verify-full
    mode: ServerTlsMode = "prefer"
    #: CA certificate(s) the server's certificate must be signed by (PEM), for verify-ca and verify-full;
    #: `system`: this machine's trusted CAs (verify-full only)
    ca_file: TlsFile | None = None
    #: a client certificate (PEM) and its key, for servers that ask for one (pg_hba.conf `cert`)
    cert_file: TlsFile | None = None
    key_file: TlsFile | None = None
    #: the oldest TLS version accepted
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    #: the OpenSSL cipher list for TLSv1.2 (PgBouncer's server_tls_ciphers); None: Python's defaults
    ciphers: Annotated[StrictStr, Field(min_length=1)] | None = None


class ClusterConfig(_Section):
    """One PostgreSQL cluster: its nodes (their roles are discovered by probing them), how to probe them,
    and how far a replica may lag before it gets no new transactions."""

    nodes: Annotated[tuple[Annotated[HostPort, AfterValidator(_server_port)], ...], Field(min_length=1)]
    #: The role the probes log in as; None: the first user under `users:` (not an alias) with a
    #: plaintext upstream password, else one with an md5 hash, else one with a SCRAM verifier (whose
    #: probes log in once a client of that user has).
    probe_user: Annotated[StrictStr, Field(min_length=1)] | None = None
    #: Its plaintext password; None: that user's upstream password from `users:`, if any.
    probe_password: StrictStr | None = Field(default=None, repr=False)
    #: The database the probes connect to.
    probe_database: Annotated[StrictStr, Field(min_length=1)] = "postgres"
    #: A replica further behind the primary's WAL than this (bytes) takes no new transactions.
    max_lag_bytes: Size | None = None
    #: A replica whose replay is this far behind (seconds) takes no new transactions.
    max_lag: Annotated[Duration, Field(gt=0)] | None = None
    #: TLS to the nodes (server connections, probes, cancel requests).
    tls: ServerTlsConfig = ServerTlsConfig()
    _name: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        """The key of this entry under `clusters:`."""
        return self._name

    @property
    def primary(self) -> HostPort:
        """The first configured node: the primary assumed until the probes say otherwise."""
        return self.nodes[0]


PinOrReject = Literal["pin", "reject"]
EmulateOrPinOrReject = Literal["emulate", "pin", "reject"]


class SessionFeaturesConfig(_Section):
    """`databases.<name>.session_features`: what a transaction pool does with each session-bound feature.

    `pin`: the client keeps its server until it releases the feature (or leaves); `reject`: 0A000 with a
    hint; `emulate`: halephant provides it without tying the client to a server. Applied by the default
    plugin `session_features` (`with_hold` by `cursor_guard`) through `halephant_inspect_query`.
    """

    listen: EmulateOrPinOrReject = "emulate"
    advisory_locks: PinOrReject = "pin"
    with_hold: PinOrReject = "reject"
    temp_tables: PinOrReject = "pin"
    prepare: EmulateOrPinOrReject = "emulate"
    set_role: PinOrReject = "pin"
    load: PinOrReject = "reject"


class DatabaseConfig(_Section):
    """One database clients can name in their startup packet, and the pools behind it."""

    cluster: StrictStr
    #: Upstream database name; None means the same as the entry's key (see `server_database`).
    database: Annotated[StrictStr, Field(min_length=1)] | None = None
    mode: PoolModeName = "transaction"
    pool_size: Annotated[StrictInt, Field(ge=1)] = 20
    min_pool_size: Annotated[StrictInt, Field(ge=0)] = 0
    idle_timeout: Annotated[Duration, Field(gt=0)] = 300.0
    max_lifetime: Annotated[Duration, Field(gt=0)] = 3600.0
    checkout_timeout: Annotated[Duration, Field(gt=0)] = 30.0
    server_reset_query: StrictStr = "DISCARD ALL"
    #: Append " - host:port" of the client (" - unix" on the Unix-domain socket) to the application_name
    #: it logs in with, so that the servers' pg_stat_activity says which client host ran what
    #: (PgBouncer's application_name_add_host).
    application_name_add_host: StrictBool = False
    #: Named protocol-level statements each server connection keeps for clients in transaction pooling
    #: (least recently used closed first); 0 turns sharing off: a client that names one keeps its server.
    max_prepared_statements: Annotated[StrictInt, Field(ge=0, le=100_000)] = 200
    session_features: SessionFeaturesConfig = SessionFeaturesConfig()
    #: Extra server connections a pool may open when a client has waited `reserve_pool_timeout`.
    reserve_pool_size: Annotated[StrictInt, Field(ge=0)] = 0
    reserve_pool_timeout: Annotated[Duration, Field(gt=0)] = 5.0
    #: Clients of this database at most (None: only the global `limits.max_client_conn`).
    max_client_conn: Annotated[StrictInt, Field(ge=1)] | None = None
    #: Server connections to this database on any one node at most, all users' pools together (None:
    #: no cap; each database name the catch-all entry serves has its own).
    max_db_connections: Annotated[StrictInt, Field(ge=1)] | None = None
    #: Overrides of the `limits:` timeouts for this database's clients (None: the global value).
    client_idle_timeout: Annotated[Duration, Field(ge=0)] | None = None
    idle_transaction_timeout: Annotated[Duration, Field(ge=0)] | None = None
    query_timeout: Annotated[Duration, Field(ge=0)] | None = None
    #: Where a read-only user's transactions go when no replica is usable: `primary` (still read-only)
    #: or `error` (57P03).
    replica_fallback: Literal["primary", "error"] = "primary"
    #: Where read-write users' read-only transactions go (`BEGIN READ ONLY`, or after
    #: `SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY`): `replica` or `primary`.
    read_only_transactions: Literal["replica", "primary"] = "replica"
    #: After a client's transaction on the primary, its reads go only to replicas that replayed it.
    read_your_writes: StrictBool = False
    #: How long after such a transaction that holds.
    read_your_writes_window: Annotated[Duration, Field(gt=0)] = 10.0
    #: Users not under `users:` are looked up in PostgreSQL (PgBouncer's auth_user): halephant logs in
    #: as this user (an entry of `users:`) and runs `auth_query`. None: only `users:` may log in.
    auth_user: Annotated[StrictStr, Field(min_length=1)] | None = None
    #: Gives the name and the stored password (md5 hash or SCRAM verifier) of the user named by `$1`.
    auth_query: Annotated[StrictStr, Field(min_length=1)] = DEFAULT_AUTH_QUERY
    #: The upstream database `auth_query` runs in; None: this entry's (the client's) upstream database.
    auth_dbname: Annotated[StrictStr, Field(min_length=1)] | None = None
    #: How long an answer of `auth_query` serves further logins of the same user (0: every login asks).
    auth_cache: Annotated[Duration, Field(ge=0, le=86400)] = 60.0
    _name: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        """The key of this entry under `databases:` (the name clients use)."""
        return self._name

    @property
    def server_database(self) -> str:
        """The database halephant connects to upstream: `database`, or else the entry's key."""
        return self.database or self._name


class UserConfig(_Section):
    """One user clients log in as; halephant logs in upstream under the same name."""

    #: Plaintext, a `SCRAM-SHA-256$…` verifier, or `md5` + 32 hex digits. None only with `auth: trust`.
    password: StrictStr | None = Field(default=None, repr=False)
    #: Plaintext password for the upstream login. None: `password`, which may be a verifier or hash
    #: (pass-through: an md5 hash answers md5 as it is, a SCRAM verifier once a client has logged in).
    server_password: StrictStr | None = Field(default=None, repr=False)
    auth: AuthName = "scram-sha-256"
    #: Clients logged in as this user at most (None: no per-user limit).
    max_client_conn: Annotated[StrictInt, Field(ge=1)] | None = None
    #: Server connections logged in upstream as this user on any one node at most, all databases
    #: together, its aliases' (`server_user`) included (None: no cap).
    max_user_connections: Annotated[StrictInt, Field(ge=1)] | None = None
    #: Overrides of the `limits:` timeouts for this user's clients, before the database's (None: inherit).
    client_idle_timeout: Annotated[Duration, Field(ge=0)] | None = None
    idle_transaction_timeout: Annotated[Duration, Field(ge=0)] | None = None
    query_timeout: Annotated[Duration, Field(ge=0)] | None = None
    #: Served by replicas only, with `default_transaction_read_only=on` on its server connections;
    #: any attempt to switch the session to read-write is refused with 25006.
    read_only: StrictBool = False
    #: Log in upstream as this other user (an entry under `users:`, whose upstream password is used):
    #: an alias with its own password and its own pools. None: upstream as this user itself.
    server_user: Annotated[StrictStr, Field(min_length=1)] | None = None
    _name: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        """The key of this entry under `users:` (the user name)."""
        return self._name

    @property
    def password_is_hashed(self) -> bool:
        """True when `password` is a SCRAM verifier or an md5 hash rather than plaintext."""
        return self.password is not None and (is_scram_verifier(self.password) or is_md5_hash(self.password))

    @property
    def password_is_md5_hash(self) -> bool:
        """True when `password` is an md5 hash, against which no SCRAM exchange can succeed."""
        return self.password is not None and is_md5_hash(self.password)

    @property
    def upstream_password(self) -> str | None:
        """The plaintext password halephant logs in upstream with, or None if there is none."""
        if self.server_password is not None:
            return self.server_password
        return None if self.password_is_hashed else self.password

    @property
    def upstream_secret(self) -> str | None:
        """What halephant logs in upstream with: `upstream_password`, else the SCRAM verifier or md5
        hash of `password` (pass-through, `halephant.auth.upstream`); None if there is nothing."""
        if self.server_password is not None:
            return self.server_password
        return self.password


class LimitsConfig(_Section):
    """Limits that protect halephant from slow or oversized clients and unreachable servers."""

    max_message_size: Annotated[Size, Field(ge=1024, le=2**31 - 1)] = 64 * 1024 * 1024
    login_timeout: Annotated[Duration, Field(gt=0)] = 15.0
    connect_timeout: Annotated[Duration, Field(gt=0)] = 5.0
    #: After PostgreSQL refused a server login, how long a pool tries no other (0 = at once).
    server_login_retry: Annotated[Duration, Field(ge=0)] = 5.0
    #: Client connections at most, all databases together (53300 beyond).
    max_client_conn: Annotated[StrictInt, Field(ge=1)] = 10000
    #: On SIGTERM/SIGINT, how long transactions in progress may run before everyone gets 57P01.
    shutdown_timeout: Annotated[Duration, Field(ge=0)] = 30.0
    #: The timeouts below are off at 0; `databases.<name>` may override each of the first three.
    client_idle_timeout: Annotated[Duration, Field(ge=0)] = 0.0
    idle_transaction_timeout: Annotated[Duration, Field(ge=0)] = 0.0
    query_timeout: Annotated[Duration, Field(ge=0)] = 0.0
    query_wait_notify: Annotated[Duration, Field(ge=0)] = 5.0
    #: TCP keepalive on client and server connections, and the user timeout (halephant.tcp); at 0,
    #: the kernel's default.
    tcp_keepalive: StrictBool = True
    tcp_keepidle: Annotated[Duration, Field(ge=0, le=32767)] = 0.0
    tcp_keepintvl: Annotated[Duration, Field(ge=0, le=32767)] = 0.0
    tcp_keepcnt: Annotated[StrictInt, Field(ge=0, le=127)] = 0
    tcp_user_timeout: Annotated[Duration, Field(ge=0, le=2_147_483)] = 0.0


class TopologyConfig(_Section):
    """How often, and how patiently, every node is probed for its role and replication lag."""

    interval: Annotated[Duration, Field(gt=0)] = 5.0
    timeout: Annotated[Duration, Field(gt=0)] = 3.0


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class AdminConfig(_Section):
    """`admin:`: the HTTP admin API (health, JSON state, Prometheus metrics) and the SQL console."""

    #: HTTP address of the admin API; None turns it off. Loopback by default: it shows every client.
    listen: TcpAddress | None = HostPort(host="127.0.0.1", port=6433)
    #: users (entries of `users:`) who may use the SQL console (database `halephant` or `pgbouncer`)
    users: tuple[StrictStr, ...] = ()
    #: users who may use the SQL console read-only (SHOW only)
    stats_users: tuple[StrictStr, ...] = ()


ClientTlsMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
#: the modes in which a client must use TLS over TCP, and those that also check its certificate
TLS_REQUIRED: frozenset[str] = frozenset(("require", "verify-ca", "verify-full"))
TLS_VERIFIED: frozenset[str] = frozenset(("verify-ca", "verify-full"))

_File = TlsFile


class ClientTlsConfig(_Section):
    """`client_tls:`: TLS between clients and halephant, PgBouncer's `client_tls_*` settings. The files
    are read, and the context clients get is built, when the configuration is loaded
    (`halephant.config.client_tls`). Paths are absolute, as every path halephant.yaml names."""

    #: disable (SSLRequest answered N) | allow | prefer (TLS when the client asks) | require (no
    #: plaintext login over TCP) | verify-ca (a client certificate signed by `ca_file` too) |
    #: verify-full (and its CN is the user name)
    mode: ClientTlsMode = "disable"
    #: the certificate halephant presents (PEM, intermediates after it), and its private key (PEM)
    cert_file: _File | None = None
    key_file: _File | None = None
    #: the certificates that sign client certificates (PEM): required by verify-ca and verify-full
    ca_file: _File | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    #: the OpenSSL cipher list for TLSv1.2 (PgBouncer's client_tls_ciphers); None: Python's defaults
    ciphers: Annotated[StrictStr, Field(min_length=1)] | None = None


class PluginsConfig(_Section):
    """`plugins:`. Each key besides `disable` is one plugin's section: see `Config.plugin_settings`."""

    #: Entry-point names of plugins not to load.
    disable: tuple[StrictStr, ...] = ()
    #: Importable modules to register as plugins too (single-file plugins without a package).
    modules: tuple[StrictStr, ...] = ()


class Config(_Section):
    """A validated `halephant.yaml`. Build it with `halephant.config.load_config` / `validate_config`."""

    listen: TcpAddress = HostPort(host="127.0.0.1", port=6432)
    #: A directory in which to listen on a Unix-domain socket too, `.s.PGSQL.<listen's port>` (None: off).
    unix_socket_dir: Annotated[StrictStr, AfterValidator(_socket_dir)] | None = None
    #: The socket file's permission bits, an octal string (PgBouncer's unix_socket_mode).
    unix_socket_mode: Annotated[StrictStr, BeforeValidator(_socket_mode)] = "0777"
    #: The group the socket file is given to (PgBouncer's unix_socket_group); None: the process's own.
    unix_socket_group: Annotated[StrictStr, AfterValidator(_socket_group)] | None = None
    clusters: Annotated[dict[StrictStr, ClusterConfig], Field(min_length=1)]
    databases: Annotated[dict[StrictStr, DatabaseConfig], Field(min_length=1)]
    users: Annotated[dict[StrictStr, UserConfig], Field(min_length=1)]
    limits: LimitsConfig = LimitsConfig()
    topology: TopologyConfig = TopologyConfig()
    logging: LoggingConfig = LoggingConfig()
    plugins: PluginsConfig = PluginsConfig()
    admin: AdminConfig = AdminConfig()
    client_tls: ClientTlsConfig = ClientTlsConfig()
    _source: str = PrivateAttr(default="<config>")
    _plugin_settings: dict[str, BaseModel] = PrivateAttr(default_factory=dict)
    _client_tls: ClientTls | None = PrivateAttr(default=None)
    _server_tls: dict[str, ServerTls] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _record_names(self) -> Config:
        # Private attributes may be set on frozen models; the key is the entry's identity.
        for sections in (self.clusters, self.databases, self.users):
            for key, entry in sections.items():
                entry._name = key
        return self

    @property
    def source(self) -> str:
        """The file name used in messages about this config (not a YAML key)."""
        return self._source

    def database_for(self, name: str) -> DatabaseConfig | None:
        """The `databases:` entry that serves a client's database name: its own entry, else the
        catch-all `'*'` entry, else None."""
        db = self.databases.get(name)
        return db if db is not None else self.databases.get(CATCH_ALL)

    @property
    def client_tls_context(self) -> ssl.SSLContext | None:
        """The context an SSLRequest is answered with, built once from `client_tls:` when this
        configuration was loaded; None when TLS to clients is off (`mode: disable`)."""
        loaded = self._client_tls
        return loaded.context if loaded is not None and self.client_tls.mode != "disable" else None

    @property
    def client_tls_certificate(self) -> str | None:
        """The SHA-256 fingerprint of the certificate in `client_tls.cert_file` (None: none given)."""
        return self._client_tls.fingerprint if self._client_tls is not None else None

    def server_tls(self, cluster: str) -> ServerTls:
        """The TLS settings and SSL context of cluster `cluster`'s connections, made once per
        configuration (the loader makes every cluster's, to report a file that does not load at its
        position); raises `halephant.tls_files.TlsFileProblem` or KeyError."""
        tls = self._server_tls.get(cluster)
        if tls is None:
            from halephant.server_tls import ServerTls

            tls = self._server_tls[cluster] = ServerTls.build(cluster, self.clusters[cluster].tls)
        return tls

    def plugin_settings(self, name: str) -> BaseModel | None:
        """The validated `plugins.<name>` section of a plugin that declared settings, or None."""
        return self._plugin_settings.get(name)
