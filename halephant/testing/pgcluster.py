"""Throwaway PostgreSQL clusters (a primary, streaming replicas) for tests, `halephant demo` and benchmarks.

This module owns finding the PostgreSQL binaries, running them as a non-root OS user, the cached template
data directory, and starting, promoting, stopping and removing the nodes. It uses the standard library only,
so the runtime (`halephant demo`) can use it without test dependencies.

Settings favour speed over safety (``fsync=off``, ``full_page_writes=off``): never point one at real data.

API::

    find_bindir() -> pathlib.Path      # HALEPHANT_PGBIN | `pg_config --bindir` | /usr/lib/postgresql/*/bin
    free_port() -> int                 # a free 127.0.0.1 TCP port, never 5432 or 6432
    conninfo(**params) -> str          # a libpq keyword/value string, values quoted as libpq wants
    pgbench(node, *args, dbname="postgres", user="postgres") -> str
    role_sql(name, password=None, ...) / database_sql(name, owner) -> str
        # the scripts of Cluster.create_role / create_database, to batch several in one Node.sql call

    class PgNotFound(RuntimeError)     # no binaries; the message says how to install them
    class PgError(RuntimeError)        # a PostgreSQL program failed; .argv, .returncode, .stderr

    class Node:                        # one postmaster
        name, host ("127.0.0.1"), port, datadir, sockdir, log_path
        sql(query, dbname="postgres", user="postgres", *, timeout=60.0) -> str
            # psql -X -A -t -q -v ON_ERROR_STOP=1 over the unix socket (trust); stdout stripped
        start() / stop(mode="fast") / kill() / promote() / reload()
        is_running                     # property
        is_in_recovery() -> bool
        set_hba(lines)                 # extra pg_hba.conf lines placed before the generic scram ones; reloads
        dsn(user, password, dbname="postgres") -> str
        log_text() -> str

    class ServerSsl:                   # ssl = on: certificate and key (PEM), CA for client certificates
        cert_pem, key_pem, client_ca_pem=None, hostssl_only=True

    class Cluster:
        primary: Node; replicas: list[Node]; nodes (primary first); base_dir: pathlib.Path
        Cluster.start(*, replicas=1, settings=None, base_dir=None, max_connections=200,
                      shared_buffers="128MB", hba=(), ssl=None) -> Cluster
        add_replica(name=None) -> Node   # pg_basebackup of the primary as it is now
        create_role(name, password=None, *, superuser=False, createdb=False, password_encryption=None)
        create_database(name, owner)
        wait_replicated(timeout=10.0)
        stop() / destroy()             # replicas first; destroy also removes what was created on disk
        with Cluster.start() as c: ... # destroys on exit

Clusters still alive when the interpreter exits are destroyed by an ``atexit`` handler, so an interrupted
test run or demo does not leave postmasters behind.

PostgreSQL refuses to run as root. When the effective uid is 0 every PostgreSQL program runs as the OS user
``postgres`` if it exists, else as ``halephant-pg`` (created with ``useradd --system``). Data directories come
from `tempfile.mkdtemp` and are chowned to that user: directories such as pytest's ``tmp_path`` are 0700
root-owned and unusable by it. Each node is a copy of a template made by ``initdb`` once per PostgreSQL
version and OS user (``/tmp/halephant-pgtemplate-<major>-<user>-<hash>``): copying is about ten times
faster than running initdb again. The replicas `Cluster.start` makes are copies too, started (all at once)
as standbys of the fresh primary; `add_replica` clones a running primary with ``pg_basebackup``.

HALEPHANT_PG_TMPDIR, when set, is the directory that holds the data directories and the template instead
of the temporary directory: the tests point it at a tmpfs such as /dev/shm, where creating the thousand
files of a data directory takes a few milliseconds instead of up to a second on a slow disk.

Authentication: ``trust`` on the unix socket (``Node.sql`` uses it, for any role), ``scram-sha-256`` on
127.0.0.1 for clients and replication, with any ``hba`` lines placed before those generic lines.

TLS: off unless ``Cluster.start(ssl=ServerSsl(...))`` is given a server certificate and key in PEM (the
tests make them with trustme; this module makes none): every node then runs with ``ssl = on``, the files
in its data directory (the key mode 0600, owned by the OS user that runs PostgreSQL, as it insists), and
with ``hostssl_only`` its pg_hba.conf refuses every TCP login that is not over TLS (``hostnossl ...
reject`` first; the ``host`` lines then match TLS logins only). ``client_ca_pem`` becomes ``ssl_ca_file``,
for ``cert`` logins and ``clientcert=`` options in ``hba`` lines.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import hashlib
import os
import pathlib
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

__all__ = [
    "Cluster",
    "Node",
    "PgError",
    "PgNotFound",
    "ServerSsl",
    "conninfo",
    "database_sql",
    "find_bindir",
    "free_port",
    "pgbench",
    "role_sql",
]

HOST = "127.0.0.1"
RESERVED_PORTS = frozenset({5432, 6432})
FALLBACK_OS_USER = "halephant-pg"
TEMPLATE_PREFIX = "halephant-pgtemplate"

#: How long one PostgreSQL program may run before we give up on it.
COMMAND_TIMEOUT = 120.0

INITDB_ARGS = (
    "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
    "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
)  # fmt: skip

# Written once into the template; per-node values live in `halephant.conf`, included last so that it wins.
TEMPLATE_CONF = """
# --- halephant throwaway cluster: NOT crash safe (fsync and full_page_writes are off) ---
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = replica
max_wal_senders = 10
hot_standby = on
password_encryption = 'scram-sha-256'
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
include_if_exists = 'halephant.conf'
"""

HBA_HEAD = """\
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
"""
HBA_TAIL = """\
host    all          all   127.0.0.1/32   scram-sha-256
host    replication  all   127.0.0.1/32   scram-sha-256
"""
#: first of a `ServerSsl(hostssl_only=True)` node's lines over TCP: a login not over TLS goes no further
HBA_NO_PLAINTEXT = """\
hostnossl all        all   all            reject
hostnossl replication all  all            reject
"""

#: the files of `ServerSsl`, in each node's data directory (`ssl_cert_file` and `ssl_key_file` default to
#: the first two)
SSL_CERT_FILE = "server.crt"
SSL_KEY_FILE = "server.key"
SSL_CA_FILE = "root.crt"

PG_INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found. Install them with "
    "`apt-get install -y postgresql` (Debian/Ubuntu), or set HALEPHANT_PGBIN to the directory that "
    "holds initdb (e.g. HALEPHANT_PGBIN=/usr/lib/postgresql/15/bin)."
)


@dataclass(frozen=True)
class ServerSsl:
    """TLS for every node of a cluster (`Cluster.start(ssl=...)`): ``ssl = on`` with this certificate (its
    chain, PEM) and key (PEM, unencrypted). `client_ca_pem`: the CA that signs the client certificates
    ``cert`` logins present (``ssl_ca_file``); `hostssl_only`: TCP logins without TLS are refused."""

    cert_pem: str
    key_pem: str
    client_ca_pem: str | None = None
    hostssl_only: bool = True

    def settings(self) -> dict[str, str]:
        """The postgresql.conf settings for it (the file names are relative to the data directory)."""
        out = {"ssl": "on", "ssl_cert_file": SSL_CERT_FILE, "ssl_key_file": SSL_KEY_FILE}
        if self.client_ca_pem is not None:
            out["ssl_ca_file"] = SSL_CA_FILE
        return out


class PgNotFound(RuntimeError):
    """No PostgreSQL server binaries were found; the message says how to install them."""


class PgError(RuntimeError):
    """A PostgreSQL program (psql, pg_ctl, initdb, ...) failed."""

    def __init__(
        self, message: str, *, argv: Sequence[str] = (), returncode: int | None = None, stderr: str = ""
    ) -> None:
        detail = f"\n{stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{message}{detail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


# --- binaries ---------------------------------------------------------------------------------------------


def _has_initdb(path: pathlib.Path) -> bool:
    return os.access(path / "initdb", os.X_OK) and os.access(path / "pg_ctl", os.X_OK)


def _version_key(path: pathlib.Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: compare versions numerically so that 10 sorts after 9.6.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def find_bindir() -> pathlib.Path:
    """Return the directory holding initdb, pg_ctl, psql and pg_basebackup.

    HALEPHANT_PGBIN wins when set. Otherwise `pg_config --bindir` when it holds initdb (libpq-dev's
    pg_config points at /usr/bin, which does not), else the highest /usr/lib/postgresql/*/bin (Debian keeps
    the server binaries off PATH), else the directory of an initdb found on PATH.
    """
    override = os.environ.get("HALEPHANT_PGBIN")
    if override:
        path = pathlib.Path(override)
        if _has_initdb(path):
            return path
        raise PgNotFound(f"HALEPHANT_PGBIN={override} holds no initdb/pg_ctl. {PG_INSTALL_HINT}")
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            )
            path = pathlib.Path(out.stdout.strip())
            if out.stdout.strip() and _has_initdb(path):
                return path
    candidates = [p for p in pathlib.Path("/usr/lib/postgresql").glob("*/bin") if _has_initdb(p)]
    if candidates:
        return max(candidates, key=_version_key)
    initdb = shutil.which("initdb")
    if initdb and _has_initdb(pathlib.Path(initdb).parent):
        return pathlib.Path(initdb).parent
    raise PgNotFound(PG_INSTALL_HINT)


_recent_ports: collections.deque[int] = collections.deque(maxlen=512)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now (never 5432 or 6432).

    The port is free when we look, not reserved: whoever binds it must retry on "address in use".
    Ports handed out recently by this process are skipped, so two callers in a row never get the same one.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port in RESERVED_PORTS or port in _recent_ports:
            continue
        _recent_ports.append(port)
        return port
    raise RuntimeError("could not find a free TCP port on 127.0.0.1")


def _quote_conninfo(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conninfo(**params: object) -> str:
    """Build a libpq keyword/value connection string; None values are left out."""
    return " ".join(
        f"{key}={_quote_conninfo(str(value))}" for key, value in params.items() if value is not None
    )


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    # standard_conforming_strings is on in every supported PostgreSQL: only quotes need doubling.
    return "'" + value.replace("'", "''") + "'"


# --- running programs as the PostgreSQL OS user -----------------------------------------------------------


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int
    home: str
    #: True when we are root and drop to this user for every PostgreSQL program.
    switch: bool


def _os_user() -> _OsUser:
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, switch=False)
    for name in ("postgres", FALLBACK_OS_USER):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, switch=True)
    try:
        subprocess.run(
            ["useradd", "--system", "--create-home", "--user-group", "--shell", "/bin/sh", FALLBACK_OS_USER],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        stderr = getattr(exc, "stderr", "") or str(exc)
        raise PgError(
            f"PostgreSQL refuses to run as root and there is no `postgres` OS user; creating "
            f"`{FALLBACK_OS_USER}` failed",
            stderr=stderr,
        ) from exc
    entry = pwd.getpwnam(FALLBACK_OS_USER)
    return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, switch=True)


class _PgInstall:
    """The binaries plus the OS user that runs them."""

    def __init__(self, bindir: pathlib.Path, user: _OsUser) -> None:
        self.bindir = bindir
        self.user = user
        # PG* variables (PGHOST, PGPORT, PGPASSWORD, PGSERVICE, ...) would silently redirect our programs.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if user.switch:
            self.env["HOME"] = user.home
            self.env["USER"] = self.env["LOGNAME"] = user.name
        self._major: str | None = None

    def bin(self, name: str) -> str:
        return str(self.bindir / name)

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: pathlib.Path | str | None = None,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        switch = self.user.switch
        try:
            proc = subprocess.run(
                list(argv), input=input, capture_output=True, text=True, timeout=timeout, env=self.env,
                cwd=cwd if cwd is not None else (self.user.home if switch else None),
                user=self.user.uid if switch else None, group=self.user.gid if switch else None,
                extra_groups=[] if switch else None,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise PgError(
                f"{pathlib.Path(argv[0]).name} did not finish within {timeout:g} s", argv=argv
            ) from exc
        if check and proc.returncode != 0:
            raise PgError(
                f"{pathlib.Path(argv[0]).name} failed (exit {proc.returncode})",
                argv=argv, returncode=proc.returncode, stderr=proc.stderr or proc.stdout,
            )  # fmt: skip
        return proc

    @property
    def major(self) -> str:
        if self._major is None:
            out = self.run([self.bin("pg_ctl"), "--version"]).stdout
            found = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
            if not found:
                raise PgError(f"cannot parse the PostgreSQL version from {out.strip()!r}")
            self._major = found.group(1)
        return self._major

    def chown(self, path: pathlib.Path) -> None:
        if self.user.switch:
            os.chown(path, self.user.uid, self.user.gid)

    def write_file(self, path: pathlib.Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o600)
        self.chown(path)

    def make_dir(self, path: pathlib.Path) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        self.chown(path)


def _tmp_root() -> pathlib.Path:
    """Where data directories and the template go: HALEPHANT_PG_TMPDIR, else the temporary directory."""
    return pathlib.Path(os.environ.get("HALEPHANT_PG_TMPDIR") or tempfile.gettempdir())


def _install() -> _PgInstall:
    return _PgInstall(find_bindir(), _os_user())


def _template(pg: _PgInstall) -> pathlib.Path:
    """Return the cached, never-started template data directory, building it on first use.

    The name carries a hash of everything that shapes it, so a changed recipe never reuses a stale one.
    It is built under a temporary name and renamed into place, under an flock, so concurrent test runs
    neither race nor see a half-built directory.
    """
    recipe = "\0".join([str(pg.bindir), *INITDB_ARGS, TEMPLATE_CONF, HBA_HEAD, HBA_TAIL])
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    root = _tmp_root()
    final = root / f"{TEMPLATE_PREFIX}-{pg.major}-{pg.user.name}-{digest}"
    if (final / "PG_VERSION").is_file():
        return _checked_template(final, pg)
    # Read-only is enough for flock and works whoever created the lock file.
    fd = os.open(root / f".{final.name}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if (final / "PG_VERSION").is_file():
            return _checked_template(final, pg)
        build = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=root))
        try:
            pg.chown(build)
            pg.run([pg.bin("initdb"), "-D", str(build), *INITDB_ARGS], cwd=build)
            with (build / "postgresql.conf").open("a") as conf:
                conf.write(TEMPLATE_CONF)
            pg.write_file(build / "pg_hba.conf", HBA_HEAD + HBA_TAIL)
            build.rename(final)
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
        return final
    finally:
        os.close(fd)


def _checked_template(path: pathlib.Path, pg: _PgInstall) -> pathlib.Path:
    owner = path.stat().st_uid
    if owner != pg.user.uid:
        raise PgError(f"template {path} belongs to uid {owner}, not {pg.user.name}; remove it and retry")
    return path


# --- nodes ------------------------------------------------------------------------------------------------


def _log_offset(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: pathlib.Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


class Node:
    """One postmaster: a primary or a streaming replica, reachable on 127.0.0.1:port and its unix socket."""

    host = HOST

    def __init__(
        self,
        *,
        name: str,
        port: int,
        datadir: pathlib.Path,
        sockdir: pathlib.Path,
        log_path: pathlib.Path,
        install: _PgInstall,
        settings: Mapping[str, str],
    ) -> None:
        self.name = name
        self.port = port
        self.datadir = datadir
        self.sockdir = sockdir
        self.log_path = log_path
        self._pg = install
        self._settings = dict(settings)
        self._hba: list[str] = []
        self._ssl: ServerSsl | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.host}:{self.port} {self.datadir}>"

    # - queries -

    def sql(
        self, query: str, dbname: str = "postgres", user: str = "postgres", *, timeout: float = 60.0
    ) -> str:
        """Run `query` (one or more statements) with psql over the unix socket; return stdout stripped.

        Rows come one per line, columns separated by ``|``. Raises PgError carrying psql's stderr.
        """
        argv = [
            self._pg.bin("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.sockdir), "-p", str(self.port), "-U", user, "-d", dbname, "-f", "-",
        ]  # fmt: skip
        proc = self._pg.run(argv, input=query, timeout=timeout, cwd=self.sockdir.parent, check=False)
        if proc.returncode != 0:
            raise PgError(
                f"psql on {self.name} ({user}@{dbname}) failed: {query.strip()[:200]}",
                argv=argv,
                returncode=proc.returncode,
                stderr=proc.stderr,
            )
        return proc.stdout.strip()

    def is_in_recovery(self) -> bool:
        return self.sql("SELECT pg_is_in_recovery()") == "t"

    def dsn(self, user: str, password: str | None, dbname: str = "postgres") -> str:
        """A libpq keyword/value string for a TCP connection to this node (sslmode=disable; require on a
        node started with `ServerSsl`)."""
        return conninfo(
            host=self.host, port=self.port, user=user, password=password, dbname=dbname,
            sslmode="disable" if self._ssl is None else "require",
        )  # fmt: skip

    def log_text(self) -> str:
        return _read_from(self.log_path, 0)

    # - process control -

    def _pg_ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self._pg.run(
            [self._pg.bin("pg_ctl"), "-D", str(self.datadir), *args], timeout=timeout, cwd=self.sockdir.parent
        )

    @property
    def is_running(self) -> bool:
        if not (self.datadir / "postmaster.pid").exists():
            return False
        argv = [self._pg.bin("pg_ctl"), "-D", str(self.datadir), "status"]
        return self._pg.run(argv, cwd=self.sockdir.parent, check=False).returncode == 0

    def start(self) -> None:
        """Start the postmaster and wait until it accepts connections (a replica: until consistent)."""
        offset = _log_offset(self.log_path)
        try:
            self._pg_ctl("-l", str(self.log_path), "-w", "-t", "60", "start")
        except PgError as exc:
            log = _read_from(self.log_path, offset)
            raise PgError(
                f"{self.name} did not start (port {self.port}); its log says:\n{log.strip()}",
                argv=exc.argv,
                returncode=exc.returncode,
                stderr=exc.stderr,
            ) from exc

    def stop(self, mode: str = "fast") -> None:
        """Stop the postmaster if it runs (`mode`: smart, fast or immediate)."""
        if self.is_running:
            self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def kill(self) -> None:
        """Stop without a shutdown checkpoint, like a crash (``pg_ctl stop -m immediate``)."""
        self.stop("immediate")

    def promote(self) -> None:
        """Promote a replica and wait until it accepts writes."""
        self._pg_ctl("-w", "-t", "60", "promote")

    def restart_as_standby(self) -> None:
        """Stop, then start again in recovery (standby.signal), following no primary: a demoted primary."""
        self.stop()
        self._pg.write_file(self.datadir / "standby.signal", "")
        self.start()

    def reload(self, timeout: float = 10.0) -> None:
        """Re-read postgresql.conf and pg_hba.conf, returning once new connections see the change."""
        before = self.sql("SELECT pg_conf_load_time()")
        self.sql("SELECT pg_reload_conf()")
        # The postmaster handles SIGHUP asynchronously; backends forked after it inherit its load time.
        deadline = time.monotonic() + timeout
        while self.sql("SELECT pg_conf_load_time()") == before:
            if time.monotonic() > deadline:
                raise PgError(f"{self.name} did not reload its configuration within {timeout:g} s")
            time.sleep(0.01)

    # - configuration -

    def set_hba(self, lines: Iterable[str]) -> None:
        """Place `lines` in pg_hba.conf before the generic scram-sha-256 lines (reloading if running)."""
        self._hba = [line.strip() for line in lines if line.strip()]
        self._write_hba()
        if self.is_running:
            self.reload()

    def _write_hba(self) -> None:
        extra = "".join(f"{line}\n" for line in self._hba)
        first = HBA_NO_PLAINTEXT if self._ssl is not None and self._ssl.hostssl_only else ""
        self._pg.write_file(self.datadir / "pg_hba.conf", HBA_HEAD + first + extra + HBA_TAIL)

    def _write_ssl(self) -> None:
        """The certificate, key and client CA of `ServerSsl` into the data directory (mode 0600, owned by
        the OS user that runs PostgreSQL, which refuses a key others may read)."""
        ssl = self._ssl
        if ssl is None:
            return
        self._pg.write_file(self.datadir / SSL_CERT_FILE, ssl.cert_pem)
        self._pg.write_file(self.datadir / SSL_KEY_FILE, ssl.key_pem)
        if ssl.client_ca_pem is not None:
            self._pg.write_file(self.datadir / SSL_CA_FILE, ssl.client_ca_pem)

    def _write_conf(self) -> None:
        settings = {
            "port": str(self.port),
            "unix_socket_directories": str(self.sockdir),
            # Walreceivers report cluster_name as their application_name, so pg_stat_replication names us.
            "cluster_name": self.name,
            **self._settings,
        }
        text = "".join(f"{key} = {_quote_literal(value)}\n" for key, value in settings.items())
        self._pg.write_file(self.datadir / "halephant.conf", text)

    def _start_fresh(self, attempts: int = 5) -> None:
        """Start a node that nobody knows the port of yet, moving to another port if that one was taken."""
        for attempt in range(attempts):
            offset = _log_offset(self.log_path)
            try:
                self.start()
                return
            except PgError:
                log = _read_from(self.log_path, offset)
                if attempt + 1 == attempts or ("could not bind" not in log and "in use" not in log):
                    raise
            self.port = free_port()
            self._write_conf()


def _settings_text(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


_live_clusters: set[Cluster] = set()


class Cluster:
    """A primary and its streaming replicas, all under one base directory."""

    def __init__(
        self,
        *,
        base_dir: pathlib.Path,
        install: _PgInstall,
        settings: Mapping[str, str],
        hba: Sequence[str],
        owns_base_dir: bool,
        ssl: ServerSsl | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.sockdir = base_dir / "sock"
        self._pg = install
        self._settings = dict(settings)
        self._hba = list(hba)
        self._ssl = ssl
        self._owns_base_dir = owns_base_dir
        self._created: list[pathlib.Path] = []
        self.primary: Node = self._new_node("primary")
        self.replicas: list[Node] = []

    def __repr__(self) -> str:
        return f"<Cluster {self.base_dir} {', '.join(f'{n.name}:{n.port}' for n in self.nodes)}>"

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    @classmethod
    def start(
        cls,
        *,
        replicas: int = 1,
        settings: Mapping[str, str | int | bool] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        max_connections: int = 200,
        shared_buffers: str = "128MB",
        hba: Sequence[str] = (),
        ssl: ServerSsl | None = None,
    ) -> Cluster:
        """Start a primary plus `replicas` streaming replicas and return once every replica streams.

        `settings` are extra postgresql.conf parameters for every node; `hba` lines go before the generic
        scram-sha-256 lines of every node's pg_hba.conf. `ssl`: TLS on every node (see `ServerSsl`).
        Without `base_dir` a fresh temporary directory is used; either way `destroy()` removes only what
        this cluster created.
        """
        install = _install()
        template = _template(install)
        if base_dir is None:
            path = pathlib.Path(tempfile.mkdtemp(prefix="halephant-pg-", dir=_tmp_root()))
            owns = True
        else:
            path = pathlib.Path(base_dir).absolute()
            owns = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
        install.chown(path)
        merged = {"max_connections": str(max_connections), "shared_buffers": shared_buffers}
        if ssl is not None:
            merged.update(ssl.settings())
        merged.update({key: _settings_text(value) for key, value in (settings or {}).items()})
        cluster = cls(base_dir=path, install=install, settings=merged, hba=hba, owns_base_dir=owns, ssl=ssl)
        _live_clusters.add(cluster)
        try:
            install.make_dir(cluster.sockdir)
            cluster._created.append(cluster.sockdir)
            cluster._create_primary(template)
            cluster._start_replicas_from(template, replicas)
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _new_node(self, name: str) -> Node:
        return Node(
            name=name,
            port=free_port(),
            datadir=self.base_dir / name,
            sockdir=self.sockdir,
            log_path=self.base_dir / f"{name}.log",
            install=self._pg,
            settings=self._settings,
        )

    def _copy_template(self, node: Node, template: pathlib.Path) -> None:
        """Make `node`'s data directory a copy of the template, with its settings and pg_hba.conf."""
        if node.datadir.exists():
            raise PgError(f"{node.datadir} already exists; pick an empty base_dir")
        self._created += [node.datadir, node.log_path]
        # `cp -a` keeps the owner and the 0700 mode PostgreSQL insists on.
        self._pg.run(["cp", "-a", str(template), str(node.datadir)], cwd=self.base_dir)
        node._write_conf()
        node._hba = list(self._hba)
        node._ssl = self._ssl
        node._write_ssl()
        if node._hba or node._ssl is not None:
            node._write_hba()

    def _create_primary(self, template: pathlib.Path) -> None:
        self._copy_template(self.primary, template)
        self.primary._start_fresh()

    def _start_replicas_from(self, template: pathlib.Path, count: int) -> None:
        """Start `count` streaming replicas made by copying the template, all at once.

        The template was never started, and the primary has not checkpointed since it started from its
        copy of it: a standby started from another copy is the primary as it was at its start, and streams
        everything since from its WAL. This saves a ``pg_basebackup`` (a checkpoint and a second copy of
        every file) per replica; `add_replica` takes one, for a primary that has run for a while.
        """
        nodes = [self._new_node(f"replica{len(self.replicas) + i + 1}") for i in range(count)]
        for node in nodes:
            self._copy_template(node, template)
            # what `pg_basebackup -R` writes
            primary = conninfo(host=self.sockdir, port=self.primary.port, user="postgres")
            with (node.datadir / "postgresql.auto.conf").open("a") as conf:
                conf.write(f"primary_conninfo = {_quote_literal(primary)}\n")
            self._pg.write_file(node.datadir / "standby.signal", "")
            self.replicas.append(node)
        with ThreadPoolExecutor(max(count, 1)) as pool:
            for started in [pool.submit(node._start_fresh) for node in nodes]:
                started.result()
        for node in nodes:
            self._wait_streaming(node)

    def add_replica(self, name: str | None = None) -> Node:
        """Clone the primary with ``pg_basebackup -R`` over its unix socket, start it, wait for streaming."""
        name = name or f"replica{len(self.replicas) + 1}"
        node = self._new_node(name)
        if node.datadir.exists():
            raise PgError(f"{node.datadir} already exists")
        self._created += [node.datadir, node.log_path]
        self._pg.run(
            [self._pg.bin("pg_basebackup"), "-h", str(self.sockdir), "-p", str(self.primary.port),
             "-U", "postgres", "-D", str(node.datadir), "-R", "-X", "stream", "-c", "fast"],
            cwd=self.base_dir,
        )  # fmt: skip
        # The copy carries the primary's halephant.conf and pg_hba.conf; give it its own port and name.
        node._write_conf()
        node._hba = list(self.primary._hba)
        node._ssl = self._ssl
        node._write_ssl()
        self.replicas.append(node)
        node._start_fresh()
        self._wait_streaming(node)
        return node

    def _wait_streaming(self, node: Node, timeout: float = 30.0) -> None:
        query = f"SELECT state FROM pg_stat_replication WHERE application_name = {_quote_literal(node.name)}"
        deadline = time.monotonic() + timeout
        while (state := self.primary.sql(query)) != "streaming":
            if time.monotonic() > deadline:
                raise PgError(
                    f"{node.name} is not streaming after {timeout:g} s (state {state!r}); "
                    f"its log says:\n{node.log_text().strip()}"
                )
            time.sleep(0.01)

    # - objects -

    def create_role(
        self,
        name: str,
        password: str | None = None,
        *,
        superuser: bool = False,
        createdb: bool = False,
        password_encryption: str | None = None,
    ) -> None:
        """Create a LOGIN role on the primary, or bring an existing one to these attributes.

        `password_encryption` ("md5" or "scram-sha-256") picks how the password is stored.
        """
        self.primary.sql(
            role_sql(
                name, password, superuser=superuser, createdb=createdb,
                password_encryption=password_encryption,
            )
        )  # fmt: skip

    def create_database(self, name: str, owner: str) -> None:
        """Create a database on the primary unless it exists (CREATE DATABASE cannot run in a DO block)."""
        self.primary.sql(database_sql(name, owner))

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Wait until every running replica has replayed the primary's current WAL position."""
        # the insert position, not the write position: with synchronous_commit=off a commit record
        # may still sit in WAL buffers, before pg_current_wal_lsn()
        lsn = self.primary.sql("SELECT pg_current_wal_insert_lsn()")
        query = f"SELECT pg_last_wal_replay_lsn() >= {_quote_literal(lsn)}::pg_lsn"
        deadline = time.monotonic() + timeout
        for node in self.replicas:
            if not node.is_running:
                continue
            while node.sql(query) != "t":
                if time.monotonic() > deadline:
                    raise PgError(f"{node.name} has not replayed up to {lsn} within {timeout:g} s")
                time.sleep(0.01)

    # - lifecycle -

    def stop(self, mode: str = "fast") -> None:
        """Stop every node, replicas first (so the primary's shutdown does not make them complain)."""
        for node in [*reversed(self.replicas), self.primary]:
            node.stop(mode)

    def destroy(self) -> None:
        """Stop every node at once and remove what this cluster created on disk."""
        _live_clusters.discard(self)
        errors: list[BaseException] = []
        for node in [*reversed(self.replicas), self.primary]:
            try:
                node.stop("immediate")
            except PgError as exc:
                errors.append(exc)
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            for path in reversed(self._created):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()


def role_sql(
    name: str,
    password: str | None = None,
    *,
    superuser: bool = False,
    createdb: bool = False,
    password_encryption: str | None = None,
) -> str:
    """The psql script of `Cluster.create_role`, to run with others in one `Node.sql` call."""
    attrs = [
        "LOGIN",
        "SUPERUSER" if superuser else "NOSUPERUSER",
        "CREATEDB" if createdb else "NOCREATEDB",
        f"PASSWORD {_quote_literal(password)}" if password is not None else "PASSWORD NULL",
    ]
    ident, options = _quote_ident(name), " ".join(attrs)
    tag = "$halephant$"
    body = (
        f"BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = {_quote_literal(name)}) "
        f"THEN ALTER ROLE {ident} {options}; ELSE CREATE ROLE {ident} {options}; END IF; END"
    )
    if tag in body:
        raise ValueError(f"role name or password contains {tag}")
    if not password_encryption:
        return f"DO {tag}{body}{tag};\n"
    return (
        f"SET password_encryption = {_quote_literal(password_encryption)};\n"
        f"DO {tag}{body}{tag};\nRESET password_encryption;\n"
    )


def database_sql(name: str, owner: str) -> str:
    """The psql script of `Cluster.create_database`, to run with others in one `Node.sql` call."""
    return (
        f"SELECT format('CREATE DATABASE %I OWNER %I', {_quote_literal(name)}, {_quote_literal(owner)}) "
        f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = {_quote_literal(name)})\\gexec\n"
    )


def pgbench(
    node: Node, *args: str, dbname: str = "postgres", user: str = "postgres", timeout: float = 600.0
) -> str:
    """Run pgbench against `node` over its unix socket and return its stdout (raises PgError on failure)."""
    argv = [node._pg.bin("pgbench"), "-h", str(node.sockdir), "-p", str(node.port), "-U", user, *args, dbname]
    return node._pg.run(argv, timeout=timeout, cwd=node.sockdir.parent).stdout


@atexit.register
def _destroy_leftovers() -> None:
    for cluster in list(_live_clusters):
        with contextlib.suppress(Exception):
            cluster.destroy()
