"""Access rules in PostgreSQL's pg_hba.conf form (PgBouncer's `auth_type = hba` with `auth_hba_file`): which
connection type, database, user and address may log in, and how. A `halephant_authenticate` policy.

Settings, in halephant.yaml::

    plugins:
      hba:
        file: /etc/halephant/pg_hba.conf          # absolute; none: this plugin decides nothing
        ident_file: /etc/halephant/pg_ident.conf  # absolute; the user name maps of `peer` lines' map=

The files are read and checked whenever the configuration loads (`halephant check`, start-up, reload):
a problem in one refuses the configuration, each one reported as `FILE:LINE: message`. A reload reads
them again, so changed rules take effect for the logins that follow (clients already in stay).

The syntax is pg_hba.conf's: one rule a line, `#` comments, fields separated by blanks, double quotes
around a name that has blanks, commas or a keyword in it, comma lists (`db1,db2`, or `db1, db2`).

* type: `local` (the Unix-domain socket, `unix_socket_dir`), `host` (TCP, with or without TLS),
  `hostssl` (TCP over TLS, `client_tls:`), `hostnossl` (TCP in plaintext);
* database: `all`, `sameuser` (the database named as the user), names;
* user: `all`, names;
* address (not on `local` lines): `all`, an IPv4 or IPv6 network in CIDR form (`10.0.0.0/8`, `::1/128`,
  a lone address is a /32 or /128), or an address and a mask in two fields (`10.0.0.0 255.0.0.0`);
* method: `trust` (no password), `reject`, `scram-sha-256`, `md5`, `cert` (`hostssl` lines only), `peer`
  (`local` lines only);
* options after the method: `clientcert=verify-full` on a `cert` line (which it means anyway), `map=NAME`
  on a `peer` line (a map of `ident_file`).

The first line whose type, database, user and address match the client decides, as in PostgreSQL:

* no line matches: FATAL 28000 `no pg_hba.conf entry for host "127.0.0.1", user "u", database "d",
  no encryption` (`SSL encryption` over TLS; the host of a Unix-domain socket client is `[local]`);
* `reject`: FATAL 28000 `pg_hba.conf rejects connection for host ...` (same form);
* `trust`: in, without a password;
* `scram-sha-256`, `md5`: the password exchange that `users:` gives the user (`scram_auth`): the user's
  secret decides it, as PostgreSQL's `md5` line runs SCRAM for a user whose password is stored as a
  SCRAM verifier. A `scram-sha-256` line for a user whose password in `users:` is an md5 hash runs an
  exchange that fails with 28P01, as PostgreSQL does (it cannot check SCRAM against an md5 hash). A user
  configured with `auth: trust` has no password to give on these lines and fails with 28P01 (the rules
  decide how a client logs in, as in PostgreSQL: give it a `trust` line);
* `cert`: the client's TLS certificate, verified against `client_tls.ca_file` during the handshake, must
  have the user name as its CN; no password then. Only `client_tls.mode` verify-ca and verify-full ask
  clients for a certificate: under another mode a `cert` line can never let anyone in (a WARNING at load);
* `peer`: the operating system user of the process at the other end of the socket (`SO_PEERCRED`) must
  be the user name, or, with `map=NAME`, a line of that map in `ident_file` must allow the pair; no
  password then. Otherwise FATAL 28000 `Peer authentication failed for user "u"`, and the log says why
  as PostgreSQL's does (`no match in usermap "NAME" for user "u" authenticated as "alice"`).

The ident file is pg_ident.conf's form: `MAPNAME SYSTEM-USERNAME PG-USERNAME` a line, `#` comments, quotes
as above. A SYSTEM-USERNAME that starts with `/` is a regular expression (Python's, which writes the
usual forms as PostgreSQL's do; quote it when it holds blanks or commas), searched in the operating
system user name, and the first `\1` in PG-USERNAME stands for its first group. PG-USERNAME may also be
`all` (any user) or `/regex` (a user name it matches), as in PostgreSQL 16. Any line of the map that
allows the pair lets the client in. A map that `map=` names and the file lacks lets no one in (a WARNING
at load); `map=` without `ident_file` is refused at load.

Rejections are immediate, as PostgreSQL checks pg_hba.conf before authentication (only an unknown
database waits for the password, so database names cannot be probed). The admin console's database
(`halephant`, `pgbouncer`) is matched like any other.

Not supported (each an error at load that says so): `replication`, `samerole`, `samegroup`, `@file`
includes, `+group` users, host names, `samehost`/`samenet`, `hostgssenc`/`hostnogssenc`, the
`password` method (halephant has no cleartext exchange: use `scram-sha-256`, which every client
library that speaks `password` also speaks) and every other method, and options other than the above;
in the ident file, `+group` and `@file` as PG-USERNAME and `include` directives.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from pydantic import BaseModel, ConfigDict, StrictStr, field_validator, model_validator

from halephant import hookimpl, sqlstate
from halephant.types import (
    AuthMethod,
    Cert,
    ClientInfo,
    Peer,
    Reject,
    ScramSha256,
    Trust,
    UserMap,
    UserMapLine,
)

if TYPE_CHECKING:
    from halephant.types import Config

__all__ = [
    "SECTION",
    "HbaError",
    "HbaLine",
    "HbaPath",
    "HbaSettings",
    "IdentPath",
    "decide",
    "halephant_authenticate",
    "halephant_configure",
    "halephant_plugin_settings",
    "parse_hba",
    "parse_ident",
]

log = logging.getLogger("halephant.plugins.hba")

#: The section name: `plugins.hba` in halephant.yaml.
SECTION = "hba"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_TYPES = frozenset(("local", "host", "hostssl", "hostnossl"))
_PASSWORD_METHODS = frozenset(("scram-sha-256", "md5"))
_METHODS = frozenset(("trust", "reject", "cert", "peer")) | _PASSWORD_METHODS
_OTHER_METHODS = frozenset(
    ("ident", "ldap", "gss", "sspi", "pam", "radius", "bsd", "krb5", "crypt", "password")
)


class HbaError(ValueError):
    """Problems in an hba or ident file, each a `FILE:LINE: message` line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class HbaLine:
    """One rule. None for `databases`, `users` or `network` means `all`."""

    line: int
    type: str
    databases: frozenset[str] | None
    sameuser: bool
    users: frozenset[str] | None
    network: Network | None
    method: str
    text: str
    #: the user name map of a `peer` line (`map=NAME`), None: the user name itself
    map: str | None = None

    def matches(self, client: ClientInfo, host: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        if self.type == "local":
            if host is not None:
                return False
        elif host is None or (
            client.tls is None
            if self.type == "hostssl"
            else self.type == "hostnossl" and client.tls is not None
        ):
            return False
        if self.network is not None and (host is None or host.version != self.network.version):
            return False
        if self.network is not None and host not in self.network:
            return False
        if self.databases is not None and not (
            client.database in self.databases or (self.sameuser and client.database == client.user)
        ):
            return False
        return self.users is None or client.user in self.users


# --- parsing -----------------------------------------------------------------------------------------

Token = tuple[str, bool]  # (text, quoted)


def _fields(text: str) -> list[list[Token]]:
    """A line's fields, each a list of tokens (a comma list); comments dropped. Raises ValueError."""
    fields: list[list[Token]] = []
    current: list[Token] = []
    i, n = 0, len(text)
    more = False  # the last token ended with a comma: the next one belongs to the same field
    while i < n:
        c = text[i]
        if c in " \t\r":
            i += 1
            continue
        if c == "#":
            break
        word, quoted = [], False
        while i < n and text[i] not in " \t\r,#":
            if text[i] == '"':
                quoted = True
                i += 1
                while True:
                    if i >= n:
                        raise ValueError("unterminated quoted string")
                    if text[i] == '"':
                        if i + 1 < n and text[i + 1] == '"':
                            word.append('"')
                            i += 2
                            continue
                        i += 1
                        break
                    word.append(text[i])
                    i += 1
            else:
                word.append(text[i])
                i += 1
        comma = i < n and text[i] == ","
        if comma:
            i += 1
        if not word and not quoted and not comma:
            break  # a `#` right after a token
        if not more:
            current = []
            fields.append(current)
        current.append(("".join(word), quoted))
        more = comma
    if more:
        raise ValueError("a comma list ends with a comma")
    return fields


def _names(field: list[Token], what: str, keywords: frozenset[str]) -> tuple[frozenset[str] | None, bool]:
    """A database or user field: (names, sameuser); names None for `all`. Raises ValueError."""
    names: set[str] = set()
    every = sameuser = False
    for text, quoted in field:
        if quoted:
            names.add(text)
            continue
        if text == "all":
            every = True
        elif text == "sameuser" and "sameuser" in keywords:
            sameuser = True
        elif text in ("samerole", "samegroup"):
            raise ValueError(f"{what} keyword {text!r} is not supported by halephant (it has no roles)")
        elif text == "replication" and what == "database":
            raise ValueError(
                "database 'replication' is not supported by halephant (no replication connections)"
            )
        elif text.startswith("@"):
            raise ValueError(f"file inclusion {text!r} is not supported by halephant: list the names here")
        elif text.startswith("+") and what == "user":
            raise ValueError(f"group membership {text!r} is not supported by halephant: list the user names")
        elif not text:
            raise ValueError(f"empty {what} name")
        else:
            names.add(text)
    return (None if every else frozenset(names)), sameuser


def _mask_length(address: str, mask: str) -> int:
    net = ipaddress.ip_address(address)
    try:
        bits = ipaddress.ip_address(mask)
    except ValueError:
        raise ValueError(f"invalid IP mask {mask!r}") from None
    if bits.version != net.version:
        raise ValueError(f"IP address and mask do not match: {address} {mask}")
    width = net.max_prefixlen
    value = int(bits)
    length = bin(value).count("1")
    if value != ((1 << width) - 1) ^ ((1 << (width - length)) - 1):
        raise ValueError(f"invalid IP mask {mask!r}: its bits must be contiguous")
    return length


def _network(fields: list[list[Token]]) -> tuple[Network | None, int]:
    """The address of a host line from `fields` (its 4th and maybe 5th field): the network (None: all)
    and how many fields it took. Raises ValueError."""
    if len(fields[0]) != 1:
        raise ValueError("multiple values in the address field")
    text, quoted = fields[0][0]
    if not quoted and text == "all":
        return None, 1
    if not quoted and text in ("samehost", "samenet"):
        raise ValueError(f"address {text!r} is not supported by halephant: write the network as CIDR")
    address, slash, _ = text.partition("/")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if any(c.isalpha() for c in address) and ":" not in address:
            raise ValueError(
                f"host name {text!r} is not supported by halephant: write an IP address or network"
            ) from None
        raise ValueError(f"invalid IP address {text!r}") from None
    if slash:
        try:
            return ipaddress.ip_network(text, strict=False), 1
        except ValueError:
            raise ValueError(f"invalid CIDR mask in address {text!r}") from None
    if len(fields) > 1 and len(fields[1]) == 1 and not fields[1][0][1] and _looks_like_mask(fields[1][0][0]):
        bits = _mask_length(address, fields[1][0][0])
        return ipaddress.ip_network(f"{address}/{bits}", strict=False), 2
    return ipaddress.ip_network(address), 1  # a lone address: that host only


def _looks_like_mask(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _line(number: int, text: str, fields: list[list[Token]]) -> HbaLine:
    def single(field: list[Token], what: str) -> str:
        if len(field) != 1:
            raise ValueError(f"multiple values in the {what} field")
        return field[0][0]

    kind = single(fields[0], "connection type")
    if kind in ("hostgssenc", "hostnogssenc"):
        raise ValueError(f"connection type {kind!r} is not supported by halephant (no GSSAPI encryption)")
    if kind not in _TYPES:
        raise ValueError(f"invalid connection type {kind!r}")
    rest = fields[1:]
    if len(rest) < 2:
        raise ValueError(
            "end-of-line before database specification"
            if not rest
            else "end-of-line before role specification"
        )
    databases, sameuser = _names(rest[0], "database", frozenset(("sameuser",)))
    users, _ = _names(rest[1], "user", frozenset())
    rest = rest[2:]
    network: Network | None = None
    if kind != "local":
        if not rest:
            raise ValueError("end-of-line before IP address specification")
        network, took = _network(rest)
        rest = rest[took:]
    if not rest:
        raise ValueError("end-of-line before authentication method")
    method = single(rest[0], "authentication method")
    if method == "password":
        raise ValueError(
            "method 'password' (cleartext) is not supported by halephant: use scram-sha-256 "
            "(or md5), which the clients that can send a cleartext password can run as well"
        )
    if method in _OTHER_METHODS:
        raise ValueError(f"method {method!r} is not supported by halephant")
    if method not in _METHODS:
        raise ValueError(f"invalid authentication method {method!r}")
    if method == "cert" and kind != "hostssl":
        raise ValueError("cert authentication is only supported on hostssl connections")
    if method == "peer" and kind != "local":
        raise ValueError("peer authentication is only supported on local sockets")
    usermap: str | None = None
    for option in rest[1:]:
        name = single(option, "option")
        if method == "cert" and name == "clientcert=verify-full":
            continue  # what cert means anyway
        if method == "peer" and name.startswith("map="):
            usermap = name.removeprefix("map=")
            if not usermap:
                raise ValueError("option 'map=' names no map")
            continue
        if name.startswith("clientcert="):
            raise ValueError(
                f"option {name!r} is not supported by halephant: use the cert method, or "
                "client_tls.mode: verify-ca / verify-full, which ask every TLS client for a certificate"
            )
        raise ValueError(f"option {name!r} is not supported by halephant")
    return HbaLine(number, kind, databases, sameuser, users, network, method, text.strip(), usermap)


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """The logical lines of a file's text, each with the number of its first line."""
    lines = text.split("\n")
    number = 0
    while number < len(lines):
        first = number + 1
        raw = lines[number]
        number += 1
        # a backslash at the end of a line continues it on the next (PostgreSQL 16)
        while raw.endswith("\\") and number < len(lines):
            raw = raw[:-1] + " " + lines[number]
            number += 1
        yield first, raw


def parse_hba(text: str, path: str) -> tuple[HbaLine, ...]:
    """The rules of an hba file's text; raises HbaError with every problem as `path:LINE: message`."""
    rules: list[HbaLine] = []
    problems: list[str] = []
    for first, raw in _lines(text):
        try:
            fields = _fields(raw)
            if fields:
                rules.append(_line(first, raw, fields))
        except ValueError as exc:
            problems.append(f"{path}:{first}: {exc}")
    if problems:
        raise HbaError(problems)
    return tuple(rules)


def _regex(text: str) -> re.Pattern[str]:
    """A `/regex` field's expression (`text` without the slash). Raises ValueError."""
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f'invalid regular expression "{text}": {exc}') from None


def _ident_line(fields: list[list[Token]]) -> tuple[str, UserMapLine]:
    """A map's name and one of its lines. Raises ValueError."""
    for field in fields:
        if len(field) != 1:
            raise ValueError("multiple values in ident field")
    name, name_quoted = fields[0][0]
    if not name_quoted and name in ("include", "include_if_exists", "include_dir"):
        raise ValueError(f"{name!r} is not supported by halephant: write the maps in this file")
    if len(fields) < 3:
        raise ValueError("missing entry at end of line")
    if len(fields) > 3:
        raise ValueError(f"extra field {fields[3][0][0]!r}: a line is MAPNAME SYSTEM-USERNAME PG-USERNAME")
    system, _ = fields[1][0]
    user, user_quoted = fields[2][0]
    system_user: str | re.Pattern[str] = system
    if system.startswith("/"):  # quoted or not, as PostgreSQL reads it (a quoted one may hold blanks)
        system_user = _regex(system[1:])
    elif not system:
        raise ValueError("empty SYSTEM-USERNAME")
    database_user: str | re.Pattern[str] | None = user
    if not user_quoted and user == "all":
        database_user = None
    elif not user_quoted and user.startswith("+"):
        raise ValueError(f"group membership {user!r} is not supported by halephant: list the user names")
    elif not user_quoted and user.startswith("@"):
        raise ValueError(f"file inclusion {user!r} is not supported by halephant: list the user names")
    elif not user_quoted and user.startswith("/"):
        database_user = _regex(user[1:])
    elif not user:
        raise ValueError("empty PG-USERNAME")
    elif "\\1" in user and isinstance(system_user, re.Pattern) and not system_user.groups:
        raise ValueError(
            f'regular expression "{system[1:]}" has no subexpressions as requested by backreference in '
            f'"{user}"'
        )
    return name, UserMapLine(system_user, database_user)


def parse_ident(text: str, path: str) -> dict[str, UserMap]:
    """The user name maps of an ident file's text (pg_ident.conf's form), by name; raises HbaError with
    every problem as `path:LINE: message`."""
    maps: dict[str, list[UserMapLine]] = {}
    problems: list[str] = []
    for first, raw in _lines(text):
        try:
            fields = _fields(raw)
            if fields:
                name, line = _ident_line(fields)
                maps.setdefault(name, []).append(line)
        except ValueError as exc:
            problems.append(f"{path}:{first}: {exc}")
    if problems:
        raise HbaError(problems)
    return {name: UserMap(name, tuple(lines)) for name, lines in maps.items()}


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise HbaError([f"cannot read {path}: {reason}"]) from None


def read_hba(path: str) -> tuple[HbaLine, ...]:
    """The rules of the hba file at `path`; raises HbaError (unreadable, or problems in it)."""
    return parse_hba(_read(path), path)


def read_ident(path: str) -> dict[str, UserMap]:
    """The user name maps of the ident file at `path`; raises HbaError (unreadable, or problems in it)."""
    return parse_ident(_read(path), path)


# --- settings ------------------------------------------------------------------------------------------


class HbaPath(str):
    """`plugins.hba.file` as validated: the path, with the rules read from it then."""

    __slots__ = ("rules",)
    rules: tuple[HbaLine, ...]

    def __new__(cls, path: str, rules: tuple[HbaLine, ...]) -> HbaPath:
        self = super().__new__(cls, path)
        self.rules = rules
        return self


class IdentPath(str):
    """`plugins.hba.ident_file` as validated: the path, with the user name maps read from it then."""

    __slots__ = ("maps",)
    maps: Mapping[str, UserMap]

    def __new__(cls, path: str, maps: Mapping[str, UserMap]) -> IdentPath:
        self = super().__new__(cls, path)
        self.maps = maps
        return self


def _absolute(value: str) -> str:
    if not os.path.isabs(value):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return value


class HbaSettings(BaseModel):
    """`plugins.hba`: the pg_hba.conf-style file of access rules (None: no rules, everything as without),
    and the pg_ident.conf-style file of user name maps its `peer` lines name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Absolute path of the file; read and checked at every configuration load (its problems are
    #: reported at this key).
    file: StrictStr | None = None
    #: Absolute path of the ident file (pg_ident.conf's form), read and checked as `file` is; needed
    #: where a `peer` line names a map (`map=NAME`).
    ident_file: StrictStr | None = None

    @field_validator("file")
    @classmethod
    def _read(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return HbaPath(value, read_hba(_absolute(value)))

    @field_validator("ident_file")
    @classmethod
    def _read_ident(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return IdentPath(value, read_ident(_absolute(value)))

    @model_validator(mode="after")
    def _maps_have_a_file(self) -> Self:
        if self.ident_file is None and isinstance(self.file, HbaPath):
            problems = [
                f"{self.file}:{rule.line}: map {rule.map!r} needs plugins.hba.ident_file, the file of user "
                "name maps"
                for rule in self.file.rules
                if rule.map is not None
            ]
            if problems:
                raise HbaError(problems)
        return self

    @property
    def rules(self) -> tuple[HbaLine, ...] | None:
        """The file's rules as read when this section was validated; None without a file."""
        return self.file.rules if isinstance(self.file, HbaPath) else None

    @property
    def maps(self) -> Mapping[str, UserMap]:
        """The ident file's user name maps as read when this section was validated; none without one."""
        return self.ident_file.maps if isinstance(self.ident_file, IdentPath) else {}


# --- decisions ----------------------------------------------------------------------------------------


class _Current:
    """The rules in force, replaced whole by `halephant_configure` (None: no file, decide nothing)."""

    __slots__ = ("file", "maps", "rules")

    def __init__(self) -> None:
        self.rules: tuple[HbaLine, ...] | None = None
        self.file = ""
        self.maps: Mapping[str, UserMap] = {}


_current = _Current()


def _host(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's IP address from `ClientInfo.address` (`host:port`); None for a Unix-domain socket."""
    host, colon, _ = address.rpartition(":")
    if not colon:
        return None
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _who(client: ClientInfo, host: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str:
    """The end of PostgreSQL's messages: `host "…", user "…", database "…", no encryption`."""
    where = "[local]" if host is None else str(host)
    encryption = "SSL encryption" if client.tls is not None else "no encryption"
    return f'host "{where}", user "{client.user}", database "{client.database}", {encryption}'


def decide(
    rules: tuple[HbaLine, ...],
    client: ClientInfo,
    config: Config | None,
    file: str = "pg_hba.conf",
    maps: Mapping[str, UserMap] | None = None,
) -> AuthMethod | Reject | None:
    """What the first matching rule says for `client` (None: the password exchange `users:` gives);
    `maps`: the user name maps of `peer` lines (a map not there lets no one in)."""
    host = _host(client.address)
    if host is None and client.address != "unix":
        # (an address the core could not read: no TCP line can match, and it is no socket either)
        return Reject(
            sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
            f"no pg_hba.conf entry for {_who(client, host)}",
            reason=f"hba: unreadable client address {client.address!r}",
        )
    for rule in rules:
        if not rule.matches(client, host):
            continue
        where = f"{file}:{rule.line}"
        log.debug("%r: hba: %s matches: %s", client, where, rule.text)
        if rule.method == "reject":
            return Reject(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                f"pg_hba.conf rejects connection for {_who(client, host)}",
                reason=f"hba: rejected by {where}",
            )
        if rule.method == "trust":
            return Trust(reason=f"hba: trust by {where}")
        if rule.method == "cert":
            return Cert(reason=f"hba: cert by {where}")
        if rule.method == "peer":
            if rule.map is None:
                return Peer(reason=f"hba: peer by {where}")
            usermap = (maps or {}).get(rule.map) or UserMap(rule.map)
            return Peer(usermap, reason=f"hba: peer by {where}")
        user = config.users.get(client.user) if config is not None else None
        if user is not None and user.auth == "trust":
            # the line asks for a password, and pg_hba.conf decides how a client logs in: a user that
            # `users:` lets in on trust has none to give here (a `trust` line lets it in)
            return ScramSha256(
                None, reason=f"hba: {where} asks for a password; user {client.user} has auth: trust and none"
            )
        if rule.method == "scram-sha-256" and user is not None and user.password_is_md5_hash:
            return ScramSha256(
                None, reason=f"hba: {where} asks for scram-sha-256, but the password is an md5 hash"
            )
        return None  # the exchange the user's secret calls for (scram_auth)
    return Reject(
        sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
        f"no pg_hba.conf entry for {_who(client, host)}",
        reason=f"hba: no line of {file} matches",
    )


@hookimpl
def halephant_plugin_settings() -> tuple[str, type[BaseModel]]:
    return (SECTION, HbaSettings)


@hookimpl
def halephant_configure(config: Config) -> None:
    settings = config.plugin_settings(SECTION)
    if not isinstance(settings, HbaSettings) or settings.file is None or settings.rules is None:
        _current.rules, _current.file, _current.maps = None, "", {}
        return
    rules = settings.rules
    cert_lines = [str(rule.line) for rule in rules if rule.method == "cert"]
    if cert_lines and config.client_tls.mode not in ("verify-ca", "verify-full"):
        log.warning(
            "%s: cert on line %s can never let a client in: client_tls.mode is %s, and only verify-ca "
            "and verify-full ask clients for a certificate",
            settings.file,
            ", ".join(cert_lines),
            config.client_tls.mode,
        )
    maps = settings.maps
    for rule in rules:
        if rule.map is not None and rule.map not in maps:
            log.warning(
                "%s:%d: map %r is not in %s: the line can never let a client in",
                settings.file,
                rule.line,
                rule.map,
                settings.ident_file,
            )
    _current.rules, _current.file, _current.maps = rules, settings.file, maps


@hookimpl(tryfirst=True)
def halephant_authenticate(client: ClientInfo, config: Config) -> AuthMethod | Reject | None:
    rules = _current.rules
    if rules is None:
        return None
    return decide(rules, client, config, _current.file, _current.maps)
