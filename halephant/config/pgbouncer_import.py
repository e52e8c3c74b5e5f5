"""Turning a PgBouncer configuration (`pgbouncer.ini` and the `auth_file` it names) into a `halephant.yaml`,
for `halephant import-pgbouncer`.

`convert(ini_text, auth_file_text)` is the whole translation and touches no file: `%include` directives are
read through the `include` callable it is given. It returns the YAML text, with a header that lists every
PgBouncer setting not carried over or that means something different in halephant (a `Note` each, also
returned), and a comment next to each value saying which PgBouncer setting (or default) it comes from.
`import_files(path)` is the same with the files read from disk.

PgBouncer's defaults count where they differ from halephant's (`pool_mode` is `session` unless set,
`server_idle_timeout` 600 s, `query_wait_timeout` 120 s, `max_client_conn` 100, ...), so the result behaves
as the PgBouncer did rather than as a fresh halephant would. A file that cannot be read, or a line that
PgBouncer itself would refuse, raises `ImportProblem` (`FILE:LINE: message`).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from halephant.config.schema import CATCH_ALL, is_md5_hash, is_scram_verifier

__all__ = [
    "Converted",
    "ImportProblem",
    "Note",
    "Setting",
    "convert",
    "format_duration",
    "import_files",
    "parse_auth_file",
    "parse_connstring",
    "parse_ini",
]

#: Reads an `%include`d file: (the name as written, the including file's name) -> (its name for
#: messages, its text); raises ImportProblem when it cannot.
Include = Callable[[str, str], tuple[str, str]]


class ImportProblem(Exception):
    """A file that cannot be read or parsed: reported as `FILE:LINE: message` (line 0: the whole file)."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source}:{line}: {message}" if line else f"{source}: {message}")
        self.source, self.line, self.message = source, line, message


@dataclass(frozen=True)
class Setting:
    """One `key = value` line of pgbouncer.ini, with where it was written."""

    section: str
    key: str
    value: str
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Note:
    """A PgBouncer setting that was not carried over, or that halephant understands differently."""

    where: str  # FILE:LINE, or "PgBouncer's default"
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}"


@dataclass(frozen=True)
class Converted:
    """The result of `convert`: the halephant.yaml text and the notes its header lists."""

    yaml: str
    notes: list[Note] = field(default_factory=list)


# --- reading PgBouncer's files ------------------------------------------------------------------------------

_SECTION = re.compile(r"\[\s*([^\]]*?)\s*\]\s*$")
_INCLUDE = re.compile(r"%include\s+(.+?)\s*$")


def parse_ini(text: str, source: str, include: Include | None = None) -> list[Setting]:
    """The settings of pgbouncer.ini's `text` in file order, `%include`d files' in their place.

    PgBouncer's ini: `[section]` lines, `key = value` lines, comments on lines that start with `;` or `#`
    (those characters are not special later in a line), and `%include FILE`, read as if its lines stood
    there (the section goes on into it, and out of it). Keys and section names are case-insensitive; a
    database name may be double-quoted (`"my db" = ...`)."""
    settings: list[Setting] = []
    _parse(text, source, include, settings, "", 0)
    return settings


def _parse(
    text: str, source: str, include: Include | None, settings: list[Setting], section: str, depth: int
) -> str:
    if depth > 10:
        raise ImportProblem(source, 0, "%include nested more than 10 deep (does a file include itself?)")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if (found := _INCLUDE.match(line)) is not None:
            if include is None:
                raise ImportProblem(
                    source, number, f"cannot read {found.group(1)!r}: no file to include from"
                )
            try:
                name, included = include(found.group(1), source)
            except ImportProblem as exc:
                if exc.line or exc.source != source:
                    raise
                raise ImportProblem(source, number, exc.message) from None
            section = _parse(included, name, include, settings, section, depth + 1)
            continue
        if (found := _SECTION.match(line)) is not None:
            section = found.group(1).lower()
            continue
        key, sep, value = _split_key(line)
        if not sep or not key:
            raise ImportProblem(source, number, f"expected key = value or [section]; got {line!r}")
        if not section:
            raise ImportProblem(source, number, f"{key!r} comes before any [section]")
        # database and user names keep their case; setting names do not have one
        key = key if section in ("databases", "users", "peers") else key.lower()
        settings.append(Setting(section, key, value, source, number))
    return section


def _split_key(line: str) -> tuple[str, str, str]:
    if line.startswith('"'):  # a quoted database or user name: "" is a quote inside it
        found = re.match(r'"((?:[^"]|"")*)"\s*(=)\s*(.*)$', line)
        if found is None:
            return "", "", ""
        return found.group(1).replace('""', '"'), found.group(2), found.group(3).strip()
    key, sep, value = line.partition("=")
    return key.strip(), sep, value.strip()


def parse_connstring(text: str, source: str, line: int) -> dict[str, str]:
    """A `[databases]` value, libpq's `key=value` list: values may be single-quoted, with `\\'` and `\\\\`
    escapes; keys are case-insensitive."""
    params: dict[str, str] = {}
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return params
        found = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*").match(text, i)
        if found is None:
            raise ImportProblem(
                source, line, f"expected key=value in the connection string; got {text[i:]!r}"
            )
        key, i = found.group(1).lower(), found.end()
        value: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ImportProblem(source, line, f"unterminated quoted value of {key!r}")
                if text[i] == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    value.append(text[i])
                    i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
        params[key] = "".join(value)


_AUTH_LINE = re.compile(r'"((?:[^"]|"")*)"\s+"((?:[^"]|"")*)"')


def parse_auth_file(text: str, source: str) -> dict[str, tuple[str, int]]:
    """PgBouncer's auth_file (userlist.txt): `"user" "password"` a line, where the password is plaintext,
    an md5 hash or a SCRAM verifier and `""` is a quote inside either. Lines that do not start with a
    quote are comments, as PgBouncer reads them. Returns user -> (password, line number)."""
    users: dict[str, tuple[str, int]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line.startswith('"'):
            continue
        found = _AUTH_LINE.match(line)
        if found is None:
            raise ImportProblem(source, number, 'expected "user" "password"')
        users[found.group(1).replace('""', '"')] = (found.group(2).replace('""', '"'), number)
    return users


# --- values -------------------------------------------------------------------------------------------------

_PGB_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|s|sec|min|m|h|d)?", re.IGNORECASE)
_UNIT_SECONDS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "min": 60.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def _seconds(setting: Setting, unit: float = 1.0) -> float:
    # PgBouncer's times are seconds (fractions allowed) unless a unit says otherwise
    found = _PGB_DURATION.fullmatch(setting.value.strip())
    if found is None:
        raise ImportProblem(
            setting.source, setting.line, f"{setting.key}: expected a time; got {setting.value!r}"
        )
    number = float(found.group(1))
    return number * (_UNIT_SECONDS[found.group(2).lower()] if found.group(2) else unit)


def format_duration(seconds: float) -> str:
    """Seconds as halephant writes durations: `500ms`, `30s`, `5m`, `2h`, `1d`, `1h30m`."""
    millis = round(seconds * 1000)
    if millis % 1000:
        return f"{millis}ms"
    whole = millis // 1000
    if whole == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)


def _int(setting: Setting) -> int:
    try:
        return int(setting.value.strip())
    except ValueError:
        raise ImportProblem(
            setting.source, setting.line, f"{setting.key}: expected a whole number; got {setting.value!r}"
        ) from None


def _bool(setting: Setting) -> bool:
    value = setting.value.strip().lower()
    if value in ("1", "yes", "on", "true"):
        return True
    if value in ("0", "no", "off", "false"):
        return False
    raise ImportProblem(
        setting.source, setting.line, f"{setting.key}: expected 0 or 1; got {setting.value!r}"
    )


def _names(value: str) -> list[str]:
    return [name.strip().strip('"') for name in value.split(",") if name.strip()]


# --- what is not carried over ------------------------------------------------------------------------------

_LOGS = "halephant logs to stderr (logging.level, logging.format); see docs/operations.md"
#: [pgbouncer] settings with no counterpart, and why
_NOT_CARRIED = {
    "logfile": _LOGS,
    "syslog": _LOGS,
    "syslog_ident": _LOGS,
    "syslog_facility": _LOGS,
    "log_connections": _LOGS + " (connections are logged at info)",
    "log_disconnections": _LOGS + " (disconnections are logged at info)",
    "log_pooler_errors": _LOGS + " (errors sent to clients are logged)",
    "log_stats": "halephant keeps its statistics in the admin API (/metrics, SHOW STATS)",
    "stats_period": "halephant's statistics are always current (admin API /metrics, SHOW STATS)",
    "verbose": _LOGS + " (logging.level: debug for more)",
    "pidfile": "halephant runs in the foreground; a service manager keeps its pid",
    "user": "halephant does not switch user: start it as the user it should run as",
    "ignore_startup_parameters": "halephant needs none: it accepts every startup parameter "
    "(extra_float_digits, options, search_path, ...) and carries it to the servers each client gets",
    "track_extra_parameters": "halephant carries every parameter a client sets to the servers it gets",
    "server_reset_query_always": "halephant runs server_reset_query after session pooling, and in "
    "transaction pooling only after a client whose session state it cannot undo precisely",
    "server_check_query": "halephant checks nodes with its topology probes (topology.interval), "
    "not by querying each idle server",
    "server_check_delay": "halephant checks nodes with its topology probes (topology.interval)",
    "server_round_robin": "halephant sends read-write transactions to the primary it finds by probing",
    "server_fast_close": "halephant closes servers when their client is done (max_lifetime, reload)",
    "disable_pqexec": "no counterpart: multi-statement Query messages are allowed",
    "autodb_idle_timeout": "the '*' entry's pools are forgotten after its own idle_timeout",
    "dns_max_ttl": "halephant resolves host names as the operating system does, at each connection",
    "dns_nxdomain_ttl": "halephant resolves host names as the operating system does, at each connection",
    "dns_zone_check_period": "halephant resolves host names as the operating system does",
    "resolv_conf": "halephant resolves host names as the operating system does",
    "listen_backlog": "no counterpart (the operating system's default backlog is used)",
    "sbuf_loopcnt": "no counterpart: halephant's event loop is fair by itself",
    "pkt_buf": "no counterpart: halephant sizes its buffers itself",
    "tcp_defer_accept": "no counterpart",
    "tcp_socket_buffer": "no counterpart: the operating system's socket buffers are used",
    "suspend_timeout": "no SUSPEND: an online restart needs no hand-over of buffers (docs/operations.md)",
    "so_reuseport": "halephant always listens with SO_REUSEPORT (for rolling restarts)",
    "peer_id": "no peering: cancel requests reach the halephant that holds the client's server",
    "client_tls_dheparams": "no counterpart: halephant uses ECDHE key exchange",
    "client_tls_ecdhcurve": "no counterpart: Python's default curves are used",
    "server_tls_protocols_min": "no counterpart",
    "auth_ident_file": "used only with auth_type = hba",
    "auth_hba_file": "used only with auth_type = hba",
    "service_name": "no counterpart (a Windows service name)",
    "job_name": "no counterpart (a Windows service name)",
}
#: [pgbouncer] settings carried over by `_Converter` (anything else there is noted as unknown)
_CARRIED = {
    "listen_addr", "listen_port", "unix_socket_dir", "unix_socket_mode", "unix_socket_group",
    "auth_type", "auth_file", "auth_user", "auth_query", "auth_dbname", "auth_hba_file", "auth_ident_file",
    "pool_mode", "default_pool_size", "min_pool_size", "reserve_pool_size", "reserve_pool_timeout",
    "max_client_conn", "max_db_connections", "max_user_connections", "max_db_client_connections",
    "max_user_client_connections", "server_reset_query", "server_lifetime", "server_idle_timeout",
    "server_connect_timeout", "server_login_retry", "query_timeout", "query_wait_timeout",
    "client_idle_timeout", "client_login_timeout", "idle_transaction_timeout", "tcp_keepalive",
    "tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt", "tcp_user_timeout", "max_prepared_statements",
    "application_name_add_host", "admin_users", "stats_users", "max_packet_size",
    "client_tls_sslmode", "client_tls_cert_file", "client_tls_key_file", "client_tls_ca_file",
    "client_tls_protocols", "client_tls_ciphers", "server_tls_sslmode", "server_tls_cert_file",
    "server_tls_key_file", "server_tls_ca_file", "server_tls_protocols", "server_tls_ciphers",
}  # fmt: skip

#: PgBouncer's defaults that differ from halephant's, used where pgbouncer.ini does not set the key
_PGB_DEFAULTS = {
    "listen_port": "6432",
    "unix_socket_dir": "/tmp",
    "auth_type": "md5",
    "pool_mode": "session",
    "default_pool_size": "20",
    "max_client_conn": "100",
    "server_idle_timeout": "600",
    "query_wait_timeout": "120",
    "server_connect_timeout": "15",
    "server_login_retry": "15",
    "client_login_timeout": "60",
}
_DEFAULT = "PgBouncer's default"

#: `[databases]` keys carried over, and the others with why not
_DB_KEYS = {
    "host", "port", "dbname", "user", "password", "auth_user", "auth_query", "auth_dbname", "pool_size",
    "min_pool_size", "reserve_pool", "reserve_pool_size", "pool_mode", "max_db_connections",
    "max_db_client_connections", "server_lifetime",
}  # fmt: skip
_DB_NOT_CARRIED = {
    "connect_query": "no counterpart: set what it sets with ALTER DATABASE ... SET or ALTER ROLE ... SET",
    "client_encoding": "halephant passes each client's own startup parameters on; set a default with "
    "ALTER DATABASE ... SET client_encoding",
    "datestyle": "halephant passes each client's own startup parameters on; set a default with "
    "ALTER DATABASE ... SET datestyle",
    "timezone": "halephant passes each client's own startup parameters on; set a default with "
    "ALTER DATABASE ... SET timezone",
    "application_name": "halephant passes each client's own application_name on",
    "load_balance_hosts": "halephant sends read-write work to the primary and read-only work to replicas "
    "it finds by probing (see clusters:)",
}
_USER_NOT_CARRIED = {
    "pool_mode": "halephant sets the pool mode per database only (databases.<name>.mode)",
    "pool_size": "halephant sets pool sizes per database only (databases.<name>.pool_size)",
    "reserve_pool_size": "halephant sets reserve pools per database only",
}
_ADMIN_DATABASES = ("pgbouncer", "halephant")


# --- the conversion ---------------------------------------------------------------------------------------


def convert(
    ini_text: str,
    auth_file_text: str | None = None,
    *,
    source: str = "pgbouncer.ini",
    auth_file_source: str | None = None,
    include: Include | None = None,
    base_dir: str = "/",
) -> Converted:
    """The halephant.yaml equivalent to pgbouncer.ini's `ini_text` and its auth_file's `auth_file_text`
    (None: the ini's own `auth_file` is not available). Relative paths in the ini are taken from
    `base_dir`, as PgBouncer takes them from its working directory. Raises ImportProblem."""
    settings = parse_ini(ini_text, source, include)
    users: dict[str, tuple[str, int]] = {}
    if auth_file_text is not None:
        users = parse_auth_file(auth_file_text, auth_file_source or "auth_file")
    return _Converter(settings, users, source, auth_file_source or "auth_file", base_dir).run()


def auth_file_of(settings: Iterable[Setting]) -> Setting | None:
    """The `auth_file` setting of parsed pgbouncer.ini settings (the last one wins, as in PgBouncer)."""
    found = None
    for s in settings:
        if s.section == "pgbouncer" and s.key == "auth_file" and s.value:
            found = s
    return found


def import_files(path: str, auth_file: str | None = None) -> Converted:
    """`convert` with the files read from disk: pgbouncer.ini at `path`, its `%include`s (relative to the
    working directory as PgBouncer reads them, else to the including file's directory) and its auth_file
    (or `auth_file`, given instead). Raises ImportProblem for a file that cannot be read."""
    ini_text = _read(path, path, 0)
    include = _include_reader()
    settings = parse_ini(ini_text, path, include)
    auth_text = auth_source = None
    if auth_file is not None:
        auth_source = auth_file
        auth_text = _read(auth_file, auth_file, 0)
    elif (named := auth_file_of(settings)) is not None:
        auth_source = _locate(named.value, named.source)
        auth_text = _read(auth_source, named.source, named.line, f"auth_file {named.value}")
    return convert(
        ini_text,
        auth_text,
        source=path,
        auth_file_source=auth_source,
        include=include,
        base_dir=str(Path.cwd()),
    )


def _read(path: str, source: str, line: int, what: str | None = None) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if line == 0:
            raise ImportProblem(source, 0, f"cannot read it: {reason}") from None
        raise ImportProblem(source, line, f"cannot read {what or path}: {reason}") from None


def _locate(name: str, including: str) -> str:
    # PgBouncer opens a relative name from its working directory; from elsewhere, the including
    # file's directory is where such a name usually points
    path = Path(name)
    if path.is_absolute() or path.exists():
        return name
    beside = Path(including).parent / name
    return str(beside) if beside.exists() else name


def _include_reader() -> Include:
    def include(name: str, including: str) -> tuple[str, str]:
        located = _locate(name, including)
        try:
            return located, Path(located).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            # line 0: parse_ini puts the directive's own line in
            raise ImportProblem(including, 0, f"cannot read %include {name}: {reason}") from None

    return include


@dataclass
class _Database:
    name: str
    setting: Setting
    params: dict[str, str]


class _Converter:
    """One conversion: reads the parsed settings, builds the YAML tree and collects notes."""

    def __init__(
        self,
        settings: list[Setting],
        secrets: dict[str, tuple[str, int]],
        source: str,
        auth_source: str,
        base_dir: str,
    ) -> None:
        self.source = source
        self.globals: dict[str, Setting] = {}
        self.databases: dict[str, _Database] = {}
        self.user_settings: dict[str, Setting] = {}
        self.peers: list[Setting] = []
        self.secrets = secrets
        self.auth_source = auth_source
        self.base_dir = base_dir
        self.notes: list[Note] = []
        for s in settings:
            if s.section == "pgbouncer":
                self.globals[s.key] = s  # the last one wins, as in PgBouncer
            elif s.section == "databases":
                self.databases[s.key] = _Database(s.key, s, parse_connstring(s.value, s.source, s.line))
            elif s.section == "users":
                self.user_settings[s.key] = s
            elif s.section == "peers":
                self.peers.append(s)
            else:
                self.note(s.where, f"[{s.section}]", "not a PgBouncer section: ignored")

    # -- helpers

    def note(self, where: str, key: str, message: str) -> None:
        self.notes.append(Note(where, key, message))

    def get(self, key: str) -> Setting | None:
        """The [pgbouncer] setting `key` as written, else PgBouncer's default where it differs from
        halephant's (with `_DEFAULT` as its place), else None."""
        setting = self.globals.get(key)
        if setting is not None:
            return setting
        if key in _PGB_DEFAULTS:
            return Setting("pgbouncer", key, _PGB_DEFAULTS[key], _DEFAULT, 0)
        return None

    @staticmethod
    def origin(s: Setting, shown: str | None = None) -> str:
        value = s.value if shown is None else shown
        if s.line == 0:
            return f"{s.key} = {value} ({_DEFAULT})"
        return f"{s.key} = {value} ({s.where})"

    def put(self, target: CommentedMap, key: str, value: Any, s: Setting, comment: str | None = None) -> None:
        target[key] = value
        target.yaml_add_eol_comment(comment or self.origin(s), key, column=0)

    def path(self, value: str) -> str:
        return value if value.startswith("/") else str(Path(self.base_dir) / value)

    def duration(
        self, target: CommentedMap, key: str, s: Setting | None, *, positive: bool, unit: float = 1.0
    ) -> None:
        if s is None:
            return
        seconds = _seconds(s, unit)
        if positive and seconds == 0:
            self.note(s.where, s.key, f"0 (off) has no counterpart in halephant's {key}: its default is kept")
            return
        self.put(target, key, format_duration(seconds), s)

    # -- the sections

    def run(self) -> Converted:
        root = CommentedMap()
        self.listen(root)
        users = self.users()
        clusters, databases = self.clusters_and_databases(users)
        root["clusters"] = clusters
        root["databases"] = databases
        root["users"] = users
        limits = self.limits()
        if limits:
            root["limits"] = limits
        admin = self.admin(users, root)
        if admin:
            root["admin"] = admin
        client_tls = self.client_tls()
        if client_tls:
            root["client_tls"] = client_tls
        plugins = self.plugins()
        if plugins:
            root["plugins"] = plugins
        self.leftovers()
        for key in ("clusters", "databases", "users", "limits", "admin", "client_tls", "plugins"):
            if key in root:
                root.yaml_set_comment_before_after_key(key, before="\n")
        root.yaml_set_start_comment(self.header())
        yaml = YAML()
        yaml.indent(mapping=2, sequence=4, offset=2)
        yaml.width = 4096  # long values (auth_query, verifiers) stay on one line
        out = io.StringIO()
        yaml.dump(root, out)
        return Converted(out.getvalue(), self.notes)

    def header(self) -> str:
        lines = [
            "halephant.yaml converted from a PgBouncer configuration by `halephant import-pgbouncer`.",
            "Each value's comment names the PgBouncer setting it comes from; where pgbouncer.ini did not",
            "set one, PgBouncer's default is carried where it differs from halephant's.",
            "Check it with: halephant check -c halephant.yaml (every key: the commented halephant.yaml).",
            "",
        ]
        if self.notes:
            lines.append("Not carried over, or different in halephant:")
            lines += [f"  {note}" for note in self.notes]
        else:
            lines.append("Every PgBouncer setting was carried over.")
        return "\n".join(lines) + "\n\n"

    def listen(self, root: CommentedMap) -> None:
        port = self.get("listen_port")
        assert port is not None  # in _PGB_DEFAULTS
        port_number = _int(port)
        addr = self.globals.get("listen_addr")
        hosts = _names(addr.value) if addr is not None else []
        if not hosts:
            host = "127.0.0.1"
            self.note(
                addr.where if addr else _DEFAULT,
                "listen_addr",
                "not set, so PgBouncer took Unix-socket connections only; halephant always listens on TCP "
                "as well: 127.0.0.1 here",
            )
        else:
            host = hosts[0]
            if len(hosts) > 1:
                assert addr is not None
                self.note(addr.where, "listen_addr", f"halephant listens on one address: {host} only")
            if host == "*":
                host = "0.0.0.0"
                assert addr is not None
                self.note(addr.where, "listen_addr", "* is 0.0.0.0 here: IPv4 only (write :: for IPv6 too)")
        shown = f"[{host}]" if ":" in host else host
        root["listen"] = f"{shown}:{port_number}"
        sources = [s for s in (addr, port) if s is not None]
        root.yaml_add_eol_comment("; ".join(self.origin(s) for s in sources), "listen", column=0)
        socket_dir = self.get("unix_socket_dir")
        assert socket_dir is not None
        if socket_dir.value:
            self.put(root, "unix_socket_dir", self.path(socket_dir.value), socket_dir)
            if (mode := self.globals.get("unix_socket_mode")) is not None:
                self.put(root, "unix_socket_mode", "0" + mode.value.strip().lstrip("0").rjust(3, "0"), mode)
            if (group := self.globals.get("unix_socket_group")) is not None and group.value:
                self.put(root, "unix_socket_group", group.value, group)

    # -- users

    def auth_type(self) -> str:
        s = self.get("auth_type")
        assert s is not None
        return s.value.strip().lower()

    def users(self) -> CommentedMap:
        users = CommentedMap()
        auth_type = self.auth_type()
        at = self.get("auth_type")
        assert at is not None
        if auth_type in ("trust", "any"):
            if auth_type == "any":
                self.note(
                    at.where,
                    "auth_type",
                    "any (any user name, no password) has no counterpart: users of the "
                    "auth_file get auth: trust, others cannot log in",
                )
        elif auth_type == "plain":
            self.note(
                at.where,
                "auth_type",
                "plain: halephant asks for SCRAM (or md5 for an md5 hash) where PgBouncer "
                "asked for the cleartext password; every libpq-based client can answer it",
            )
        elif auth_type == "cert":
            self.note(
                at.where,
                "auth_type",
                "cert: halephant requires the client certificate (client_tls.mode: "
                "verify-full, its CN the user name) and the password as well; for certificate-only logins "
                "use the hba plugin with hostssl ... cert lines",
            )
        elif auth_type == "peer":
            self.note(
                at.where,
                "auth_type",
                "peer: use the hba plugin (plugins.hba.file) with a `local all all peer` "
                "line; until then users log in with their passwords",
            )
        elif auth_type in ("pam", "ldap"):
            self.note(
                at.where, "auth_type", f"{auth_type} is not supported: users log in with their passwords"
            )
        elif auth_type not in ("md5", "scram-sha-256", "hba"):
            self.note(
                at.where, "auth_type", f"unknown auth_type {auth_type!r}: users log in with their passwords"
            )
        if not self.secrets and self.globals.get("auth_file") is None:
            self.note(_DEFAULT, "auth_file", "not set: no users to carry over from it")
        for name, (secret, line) in self.secrets.items():
            where = f"{self.auth_source}:{line}"
            entry = CommentedMap()
            if auth_type in ("trust", "any"):
                if is_scram_verifier(secret):
                    self.note(
                        where,
                        name,
                        "a SCRAM verifier cannot log in upstream without a client's SCRAM login "
                        "(none under auth: trust): set server_password to the plaintext password",
                    )
                elif secret:
                    entry["password"] = secret
                entry["auth"] = "trust"
                entry.yaml_add_eol_comment(f"auth_type = {auth_type}", "auth", column=0)
                users[name] = entry
                continue
            if not secret:
                self.note(
                    where,
                    name,
                    "an empty password lets no one log in except with auth_type = trust: left out",
                )
                continue
            entry["password"] = secret
            if is_md5_hash(secret):
                entry["auth"] = "md5"
                if auth_type == "scram-sha-256":
                    self.note(
                        where,
                        name,
                        "an md5 hash cannot check SCRAM logins (PgBouncer refused this user): "
                        "auth: md5 here; give a SCRAM verifier or the plaintext password instead",
                    )
            elif is_scram_verifier(secret) or auth_type != "md5":
                entry["auth"] = "scram-sha-256"
            else:
                entry["auth"] = "md5"
            form = (
                "SCRAM verifier"
                if is_scram_verifier(secret)
                else "md5 hash"
                if is_md5_hash(secret)
                else "plaintext"
            )
            entry.yaml_add_eol_comment(f"{form} from {where}", "password", column=0)
            users[name] = entry
        self.user_limits(users)
        return users

    def user_limits(self, users: CommentedMap) -> None:
        per_user: dict[str, dict[str, str]] = {}
        for name, s in self.user_settings.items():
            params = parse_connstring(s.value, s.source, s.line)
            if name not in users:
                self.note(
                    s.where,
                    name,
                    "[users] settings of a user not in the auth_file (auth_query's users) have "
                    "no place in halephant: left out",
                )
                continue
            per_user[name] = params
        for name, entry in users.items():
            self.user_entry_limits(entry, per_user.get(name, {}), self.user_settings.get(name))
        if not users:
            raise ImportProblem(
                self.auth_source if self.secrets else self.source,
                0,
                "no users to carry over (halephant needs at least one under users:): "
                "name an auth_file that lists them",
            )

    def user_entry_limits(self, entry: CommentedMap, params: dict[str, str], line: Setting | None) -> None:
        def setting(key: str) -> Setting | None:
            if key in params and line is not None:
                return Setting("users", key, params[key], line.source, line.line)
            return self.globals.get(key)

        if (s := setting("max_user_connections")) is not None and _int(s) > 0:
            self.put(entry, "max_user_connections", _int(s), s)
        if (s := setting("max_user_client_connections")) is not None and _int(s) > 0:
            self.put(entry, "max_client_conn", _int(s), s)
        for key, value in params.items():
            if key in ("query_timeout", "idle_transaction_timeout", "client_idle_timeout"):
                self.duration(entry, key, setting(key), positive=False)
            elif key not in ("max_user_connections", "max_user_client_connections"):
                assert line is not None
                why = _USER_NOT_CARRIED.get(key, "not a [users] setting this import knows")
                self.note(line.where, f"{line.key} {key}={value}", why)

    # -- clusters and databases

    def clusters_and_databases(self, users: CommentedMap) -> tuple[CommentedMap, CommentedMap]:
        clusters = CommentedMap()
        databases = CommentedMap()
        by_nodes: dict[tuple[str, ...], str] = {}
        plans: list[tuple[_Database, tuple[str, ...]]] = []
        for db in self.databases.values():
            if db.name.lower() in _ADMIN_DATABASES:
                self.note(db.setting.where, db.name, "this name is halephant's admin console's: left out")
                continue
            plans.append((db, self.nodes(db)))
        if not plans:
            raise ImportProblem(
                self.source, 0, "no [databases] entry to carry over: halephant needs at least one"
            )
        distinct = list(dict.fromkeys(nodes for _db, nodes in plans))
        for nodes in distinct:
            first = next(db.name for db, used in plans if used == nodes)
            name = "main" if len(distinct) == 1 else self.cluster_name(first, set(by_nodes.values()))
            by_nodes[nodes] = name
            cluster = CommentedMap()
            cluster["nodes"] = CommentedSeq(nodes)
            if len(nodes) > 1:
                cluster.yaml_add_eol_comment(
                    "a host list: halephant probes which is the primary", "nodes", column=0
                )
            tls = self.server_tls()
            if tls:
                cluster["tls"] = tls
            clusters[name] = cluster
        forced = self.forced_users(users, [db for db, _nodes in plans])
        for db, nodes in plans:
            databases[db.name] = self.database(db, by_nodes[nodes], users, forced)
        return clusters, databases

    def nodes(self, db: _Database) -> tuple[str, ...]:
        params = db.params
        port = params.get("port", "5432")
        if not port.isdigit():
            raise ImportProblem(db.setting.source, db.setting.line, f"port: expected a number; got {port!r}")
        hosts = [h.strip() for h in params.get("host", "").split(",") if h.strip()]
        if not hosts:
            # PgBouncer then connects over its own unix_socket_dir
            socket_dir = self.get("unix_socket_dir")
            directory = socket_dir.value if socket_dir is not None and socket_dir.value else "/tmp"
            hosts = [self.path(directory)]
        nodes = []
        for host in hosts:
            if host.startswith("@"):
                raise ImportProblem(
                    db.setting.source,
                    db.setting.line,
                    f"host {host}: abstract Unix sockets are not supported",
                )
            nodes.append(f"[{host}]:{port}" if ":" in host and not host.startswith("/") else f"{host}:{port}")
        if len(nodes) > 1:
            self.note(
                db.setting.where,
                f"{db.name} host",
                "PgBouncer spread connections over the hosts; halephant sends read-write "
                "transactions to the primary it finds by probing them, read-only ones to replicas",
            )
        return tuple(nodes)

    @staticmethod
    def cluster_name(database: str, taken: set[str]) -> str:
        # named after the first database it serves: the ini has no name for it
        base = re.sub(r"[^A-Za-z0-9]+", "_", database).strip("_") or "default"
        name, n = base, 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        return name

    def forced_users(self, users: CommentedMap, dbs: list[_Database]) -> str | None:
        """The user every database logs in as (`user=` on each line), made the server_user of every other
        user; None when the databases differ (each noted)."""
        forced = {db.name: db.params["user"] for db in dbs if "user" in db.params}
        if not forced:
            return None
        for db in dbs:
            name, password = db.params.get("user"), db.params.get("password")
            if name is None:
                continue
            entry = users.get(name)
            if entry is None:
                if password is None:
                    self.note(
                        db.setting.where,
                        f"{db.name} user={name}",
                        "no password for this user (not in the auth_file): left out",
                    )
                    continue
                entry = users[name] = CommentedMap()
                entry["password"] = password
                entry["auth"] = "scram-sha-256"
                entry.yaml_add_eol_comment(
                    f"password= of [databases] {db.name} ({db.setting.where})", "password", column=0
                )
                self.note(
                    db.setting.where,
                    f"{db.name} user={name}",
                    "clients can log in as this user too, with the password of the database line",
                )
            elif password is not None and password != entry.get("password"):
                if is_scram_verifier(password) or is_md5_hash(password):
                    self.note(
                        db.setting.where,
                        f"{db.name} password",
                        "a hash cannot be a server_password: left out",
                    )
                else:
                    entry["server_password"] = password
                    entry.yaml_add_eol_comment(
                        f"password= of [databases] {db.name} ({db.setting.where})",
                        "server_password",
                        column=0,
                    )
        names = set(forced.values())
        if len(forced) == len(dbs) and len(names) == 1 and (target := names.pop()) in users:
            for name, entry in users.items():
                if name != target:
                    entry["server_user"] = target
                    entry.yaml_add_eol_comment(
                        f"user={target} of every [databases] line", "server_user", column=0
                    )
                    entry.pop("max_user_connections", None)  # an alias's count against its server_user's
            return target
        for db in dbs:
            if "user" in db.params:
                self.note(
                    db.setting.where,
                    f"{db.name} user={db.params['user']}",
                    "halephant logs in as each client's "
                    "own user; users.<name>.server_user aliases a user on every database, not on one: set it "
                    "where that fits",
                )
        return None

    def database(self, db: _Database, cluster: str, users: CommentedMap, forced: str | None) -> CommentedMap:
        entry = CommentedMap()
        line = db.setting
        entry["cluster"] = cluster
        p = db.params

        def local(key: str) -> Setting | None:
            return Setting("databases", key, p[key], line.source, line.line) if key in p else None

        if (dbname := p.get("dbname")) is not None and dbname != db.name:
            if db.name == CATCH_ALL:
                self.note(
                    line.where, "* dbname", "the '*' entry serves each database under the client's own name"
                )
            else:
                self.put(entry, "database", dbname, line, f"dbname ({line.where})")
        mode = local("pool_mode") or self.get("pool_mode")
        assert mode is not None
        if mode.value.lower() not in ("session", "transaction", "statement"):
            raise ImportProblem(
                mode.source,
                mode.line,
                f"pool_mode: expected session, transaction or statement; got {mode.value!r}",
            )
        self.put(entry, "mode", mode.value.lower(), mode)
        size = local("pool_size") or self.get("default_pool_size")
        assert size is not None
        self.put(entry, "pool_size", max(_int(size), 1), size)
        if (s := local("min_pool_size") or self.globals.get("min_pool_size")) is not None and _int(s) > 0:
            self.put(entry, "min_pool_size", min(_int(s), max(_int(size), 1)), s)
        reserve = local("reserve_pool_size") or local("reserve_pool") or self.globals.get("reserve_pool_size")
        if reserve is not None and _int(reserve) > 0:
            self.put(entry, "reserve_pool_size", _int(reserve), reserve)
            self.duration(
                entry, "reserve_pool_timeout", self.globals.get("reserve_pool_timeout"), positive=True
            )
        self.duration(entry, "idle_timeout", self.get("server_idle_timeout"), positive=True)
        self.duration(
            entry,
            "max_lifetime",
            local("server_lifetime") or self.globals.get("server_lifetime"),
            positive=True,
        )
        self.duration(entry, "checkout_timeout", self.get("query_wait_timeout"), positive=True)
        if (s := self.globals.get("server_reset_query")) is not None:
            self.put(entry, "server_reset_query", s.value, s)
            if mode.value != "session" and s.value and "server_reset_query_always" not in self.globals:
                self.note(
                    s.where,
                    "server_reset_query",
                    "PgBouncer ran it after session pooling only; halephant also runs it in transaction "
                    "pooling after a client whose session state it cannot undo precisely",
                )
        s = local("max_db_connections") or self.globals.get("max_db_connections")
        if s is not None and _int(s) > 0:
            self.put(entry, "max_db_connections", _int(s), s)
        if (
            s := local("max_db_client_connections") or self.globals.get("max_db_client_connections")
        ) is not None and _int(s) > 0:
            self.put(entry, "max_client_conn", _int(s), s)
        if (s := self.globals.get("max_prepared_statements")) is not None:
            self.put(entry, "max_prepared_statements", min(_int(s), 100_000), s)
        if (s := self.globals.get("application_name_add_host")) is not None and _bool(s):
            self.put(entry, "application_name_add_host", True, s)
        self.auth_lookup(entry, local, users)
        for key, value in p.items():
            if key in _DB_KEYS:
                continue
            why = _DB_NOT_CARRIED.get(key, "not a [databases] setting this import knows")
            self.note(line.where, f"{db.name} {key}={value}", why)
        if p.get("password") is not None and "user" not in p:
            self.note(line.where, f"{db.name} password", "a password without user= is not used: left out")
        return entry

    def auth_lookup(
        self, entry: CommentedMap, local: Callable[[str], Setting | None], users: CommentedMap
    ) -> None:
        auth_user = local("auth_user") or self.globals.get("auth_user")
        if auth_user is None or not auth_user.value:
            return
        user = users.get(auth_user.value)
        if user is None:
            self.note(
                auth_user.where,
                "auth_user",
                f"{auth_user.value!r} is not in the auth_file, so halephant "
                "cannot log in as it: add it under users: and set auth_user",
            )
            return
        upstream = user.get("server_password") or user.get("password")
        if not isinstance(upstream, str) or is_scram_verifier(upstream):
            self.note(
                auth_user.where,
                "auth_user",
                f"{auth_user.value!r} has only a SCRAM verifier, which cannot "
                "log in to run auth_query: set its server_password, then auth_user",
            )
            return
        self.put(entry, "auth_user", auth_user.value, auth_user)
        if (s := local("auth_query") or self.globals.get("auth_query")) is not None:
            self.put(entry, "auth_query", s.value, s)
        if (s := local("auth_dbname") or self.globals.get("auth_dbname")) is not None:
            self.put(entry, "auth_dbname", s.value, s)

    # -- the rest

    def limits(self) -> CommentedMap:
        limits = CommentedMap()
        if (s := self.get("max_client_conn")) is not None:
            self.put(limits, "max_client_conn", max(_int(s), 1), s)
        self.duration(limits, "login_timeout", self.get("client_login_timeout"), positive=True)
        self.duration(limits, "connect_timeout", self.get("server_connect_timeout"), positive=True)
        self.duration(limits, "server_login_retry", self.get("server_login_retry"), positive=False)
        for key in ("client_idle_timeout", "idle_transaction_timeout", "query_timeout"):
            self.duration(limits, key, self.globals.get(key), positive=False)
        if (s := self.globals.get("tcp_keepalive")) is not None:
            self.put(limits, "tcp_keepalive", _bool(s), s)
        for key in ("tcp_keepidle", "tcp_keepintvl"):
            self.duration(limits, key, self.globals.get(key), positive=False)
        if (s := self.globals.get("tcp_keepcnt")) is not None:
            self.put(limits, "tcp_keepcnt", _int(s), s)
        # PgBouncer's tcp_user_timeout is in milliseconds
        self.duration(
            limits, "tcp_user_timeout", self.globals.get("tcp_user_timeout"), positive=False, unit=0.001
        )
        if (s := self.globals.get("max_packet_size")) is not None:
            self.put(limits, "max_message_size", min(max(_int(s), 1024), 2**31 - 1), s)
        return limits

    def admin(self, users: CommentedMap, root: CommentedMap) -> CommentedMap:
        admin = CommentedMap()
        for key in ("admin_users", "stats_users"):
            s = self.globals.get(key)
            if s is None:
                continue
            names = [n for n in _names(s.value) if n in users]
            for missing in [n for n in _names(s.value) if n not in users]:
                self.note(
                    s.where,
                    key,
                    f"{missing!r} is not in the auth_file: left out (console users log in as users:)",
                )
            if names:
                self.put(admin, "users" if key == "admin_users" else "stats_users", CommentedSeq(names), s)
        listen = str(root["listen"])
        if listen.endswith(":6433"):
            # halephant's HTTP admin API listens on 6433 unless told otherwise
            port = int(listen.rpartition(":")[2]) + 1
            admin["listen"] = f"127.0.0.1:{port}"
            admin.yaml_add_eol_comment(
                "the HTTP admin API; its default port 6433 is listen's here", "listen", column=0
            )
        return admin

    def tls_files(self, target: CommentedMap, prefix: str) -> None:
        for key in ("cert_file", "key_file", "ca_file"):
            if (s := self.globals.get(f"{prefix}_{key}")) is not None and s.value:
                self.put(target, key, self.path(s.value), s)
        if (s := self.globals.get(f"{prefix}_protocols")) is not None:
            self.put(target, "min_version", self.min_version(s), s)
        if (s := self.globals.get(f"{prefix}_ciphers")) is not None:
            if s.value.strip().lower() in (
                "default",
                "secure",
                "fast",
                "normal",
                "compat",
                "legacy",
                "insecure",
                "all",
            ):
                self.note(
                    s.where,
                    s.key,
                    f"PgBouncer's shortcut {s.value!r}: halephant uses Python's default ciphers",
                )
            else:
                self.put(target, "ciphers", s.value, s)

    def min_version(self, s: Setting) -> str:
        words = [w.strip().lower() for w in re.split(r"[,\s]+", s.value) if w.strip()]
        if any(w in ("all", "legacy", "tlsv1", "tlsv1.0", "tlsv1.1") for w in words):
            self.note(s.where, s.key, "halephant accepts TLSv1.2 and later only")
        if words and all(w == "tlsv1.3" for w in words):
            return "TLSv1.3"
        return "TLSv1.2"

    def client_tls(self) -> CommentedMap:
        tls = CommentedMap()
        mode = self.globals.get("client_tls_sslmode")
        if mode is not None and mode.value:
            self.put(tls, "mode", mode.value.strip().lower(), mode)
        if self.auth_type() == "cert" and tls.get("mode") not in ("verify-ca", "verify-full"):
            at = self.get("auth_type")
            assert at is not None
            self.put(tls, "mode", "verify-full", at, f"auth_type = cert ({at.where})")
        self.tls_files(tls, "client_tls")
        return tls

    def server_tls(self) -> CommentedMap:
        tls = CommentedMap()
        mode = self.globals.get("server_tls_sslmode")
        if mode is not None and mode.value:
            value = mode.value.strip().lower()
            if value == "allow":
                self.note(mode.where, mode.key, "allow is prefer here: TLS when the server offers it")
                value = "prefer"
            self.put(tls, "mode", value, mode)
        self.tls_files(tls, "server_tls")
        return tls

    def plugins(self) -> CommentedMap:
        plugins = CommentedMap()
        if self.auth_type() != "hba":
            for key in ("auth_hba_file", "auth_ident_file"):
                if (s := self.globals.get(key)) is not None and s.value:
                    self.note(s.where, key, "used only with auth_type = hba: left out")
            return plugins
        hba = CommentedMap()
        at = self.get("auth_type")
        assert at is not None
        if (s := self.globals.get("auth_hba_file")) is not None and s.value:
            self.put(hba, "file", self.path(s.value), s)
        else:
            self.note(at.where, "auth_type", "hba without auth_hba_file: no access rules to carry over")
        if (s := self.globals.get("auth_ident_file")) is not None and s.value:
            self.put(hba, "ident_file", self.path(s.value), s)
        if hba:
            plugins["hba"] = hba
        return plugins

    def leftovers(self) -> None:
        for key, s in self.globals.items():
            if key in _CARRIED:
                continue
            why = _NOT_CARRIED.get(key)
            self.note(s.where, key, why or "not a PgBouncer setting this import knows: left out")
        for s in self.peers:
            self.note(
                s.where,
                f"[peers] {s.key}",
                "no peering: cancel requests reach the halephant that holds the server",
            )
