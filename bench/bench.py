"""halephant's benchmark: the script that holds the performance goals (never run in CI; see bench/README.md).

    .venv/bin/python bench/bench.py [--quick] [--reps N] [--json FILE] [--idle 1000] ...

It starts a throwaway PostgreSQL primary, loads it with ``pgbench -i``, starts PgBouncer (transaction mode)
and halephant with the same pool size in front of it, then runs a pgbench matrix (select-only and tpcb-like,
simple/extended protocol, 1/10/100 clients) against every target - direct PostgreSQL included - interleaved,
so slow drifts of a shared machine hit every target alike. Per run it records TPS, latency, failures and the
CPU each party spent per transaction, read from /proc. It prints one table per cell, then the goals as
PASS/FAIL. Every process and directory it creates is removed at exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import idle_clients

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # halephant.testing is imported from the working tree, installed or not

from halephant.testing.pgcluster import (  # noqa: E402
    Cluster,
    PgError,
    PgNotFound,
    ServerSsl,
    find_bindir,
    free_port,
)

# The goals this benchmark holds (bench/README.md says where they come from).
GOAL_TPS_RATIO = 0.75  # halephant TPS / PgBouncer TPS ...
GOAL_TPS_MODE = "S"  # ... with pgbench -S ...
GOAL_TPS_CLIENTS = (10, 100)  # ... at these client counts, every protocol both run
GOAL_IDLE_MIB_PER_1000 = 2.0  # RSS growth per 1,000 idle clients
GOAL_TARGET = "halephant"

HZ = os.sysconf("SC_CLK_TCK")
MODE_LABEL = {"S": "-S", "tpcb": "tpcb"}
# Benchmark-only settings: no durability, so PostgreSQL spends its CPU on queries, not on I/O waits.
PG_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
PG_SHARED_BUFFERS = "256MB"
PG_MAX_CONNECTIONS = 300  # direct c=100 plus both pools, with room to spare


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _non_default_plugins() -> list[str]:
    """Installed plugins that halephant does not ship (e.g. the examples): left out of measurements."""
    from importlib.metadata import entry_points

    return sorted(
        ep.name for ep in entry_points(group="halephant") if ep.value.split(".")[0] != "halephant_plugins"
    )


class BenchError(Exception):
    """Something the benchmark needs is missing or broke; the message says what."""


# ---------------------------------------------------------------------------------------------------------
# /proc accounting


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may contain spaces and parentheses: split after the last ')'.
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, CPU ticks): utime+stime of all its threads plus cutime+cstime of its reaped children.

    A child that exits during a run is neither lost nor counted twice: once reaped, its time moves from its
    own entry into its parent's cutime, so a before/after difference over a process tree stays right.
    """
    table: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is None:
            continue
        table[int(name)] = (int(f[1]), int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]))
    return table


def tree_ticks(root: int | None, table: dict[int, tuple[int, int]]) -> int | None:
    if root is None or root not in table:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += table[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def run_queue_ns(pid: int | None) -> int | None:
    """Nanoseconds the threads of `pid` have spent runnable but waiting for a CPU (schedstat's run_delay).

    With the pooler's CPU per transaction it tells whether the pooler is what limits a run: a pooler that is
    running or waiting to run nearly all the time is the bottleneck, whatever its CPU share."""
    if pid is None:
        return None
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None  # gone, or a kernel without schedstat
    return total


def system_ticks() -> tuple[int, int]:
    """(busy, softirq) CPU ticks of the whole machine since boot; busy is everything but idle and iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], v[6]


def machine_load(seconds: float = 1.0) -> float:
    """Percent of ONE core busy over the next `seconds`."""
    b = system_ticks()[0]
    time.sleep(seconds)
    return (system_ticks()[0] - b) / HZ / seconds * 100


def listener_pid(port: int) -> int | None:
    """The topmost process holding the TCP socket that listens on `port` (to charge a pooler's CPU)."""
    inodes = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{cols[9]}]")
        except OSError:
            continue
    holders = set()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(f"{fd_dir}/{fd}") in inodes:
                    holders.add(int(fd_dir.split("/")[2]))
                    break
        except OSError:
            continue
    table = process_table()
    roots = [p for p in holders if table.get(p, (0, 0))[0] not in holders]
    return min(roots) if roots else None


# ---------------------------------------------------------------------------------------------------------
# tools and processes


def find_pg_tool(name: str) -> str:
    try:
        path = find_bindir() / name
    except PgNotFound as exc:
        raise BenchError(str(exc)) from exc
    if not os.access(path, os.X_OK):
        raise BenchError(f"{path} not found (apt-get install -y postgresql-client)")
    return str(path)


def pgbouncer_version(binary: str) -> tuple[int, int]:
    first = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    m = re.search(r"(\d+)\.(\d+)", first)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def find_pgbouncer() -> str:
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BenchError("pgbouncer not found (apt-get install -y pgbouncer, or run with --no-pgbouncer)")


def service_user() -> pwd.struct_passwd | None:
    """The non-root OS user that PgBouncer runs as when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "halephant-pg"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--create-home", "--user-group", "--shell", "/bin/sh", "halephant-pg"],
        check=True,
    )
    return pwd.getpwnam("halephant-pg")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, logfile: Path, what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} at start-up:\n{_tail(logfile)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s:\n{_tail(logfile)}")


def stop_process(proc: subprocess.Popen[bytes], what: str) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        log(f"# {what} did not stop on SIGTERM; killing it")
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------------------------------------------------
# targets


@dataclass
class Target:
    name: str
    host: str
    port: int
    pid: int | None = None  # the pooler's process, charged with its CPU; None for direct PostgreSQL
    proc: subprocess.Popen[bytes] | None = None  # set when this script started it
    logfile: Path | None = None
    #: whether it can run pgbench -M prepared (PgBouncer only from 1.21, with max_prepared_statements)
    prepared: bool = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


@dataclass
class Setup:
    args: argparse.Namespace
    stack: contextlib.ExitStack
    pg_host: str = "127.0.0.1"
    pg_port: int = 0
    scram_verifier: str | None = None
    targets: list[Target] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    #: with --tls: a self-signed certificate for 127.0.0.1 and its key, presented by PostgreSQL and both
    #: poolers alike
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def tempdir(self, prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"halephant-bench-{prefix}-"))
        self.stack.callback(shutil.rmtree, path, True)
        return path

    def pg_env(self) -> dict[str, str]:
        env = {**os.environ, "PGPASSWORD": self.args.password, "PGCONNECT_TIMEOUT": "10"}
        if self.args.tls:
            env["PGSSLMODE"] = "require"  # every target, direct PostgreSQL included
        return env

    def make_certificate(self) -> None:
        """--tls: one self-signed certificate (RSA 2048, as a typical deployment's) for every target."""
        d = self.tempdir("tls")
        self.tls_cert, self.tls_key = d / "server.crt", d / "server.key"
        r = subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(self.tls_key),
                "-out",
                str(self.tls_cert),
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise BenchError(f"openssl could not make a certificate for --tls: {r.stderr.strip()}")
        self.tls_key.chmod(0o600)

    def psql_argv(self) -> list[str]:
        a = self.args
        host, port = self.pg_host, str(self.pg_port)
        return [a.psql, "-X", "-q", "-A", "-t", "-h", host, "-p", port, "-U", a.user, "-d", a.dbname]

    def psql(self, *sql: str) -> str:
        """Run statements one by one (VACUUM refuses a transaction block) on PostgreSQL itself."""
        cmd = [*self.psql_argv(), "-v", "ON_ERROR_STOP=1"]
        for statement in sql:
            cmd += ["-c", statement]
        r = subprocess.run(cmd, env=self.pg_env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"psql {' '.join(sql)!r} failed: {r.stderr.strip()}")
        return r.stdout.strip()

    # --- PostgreSQL ---------------------------------------------------------------------------------------

    def start_postgres(self) -> None:
        a = self.args
        if a.pg:
            self.pg_host, port = a.pg.rsplit(":", 1)
            self.pg_port = int(port)
            log(f"# using PostgreSQL at {a.pg} (role {a.user}, database {a.dbname} must exist)")
        else:
            t0 = time.monotonic()
            try:
                ssl = None
                if self.tls_cert is not None and self.tls_key is not None:
                    ssl = ServerSsl(self.tls_cert.read_text(), self.tls_key.read_text(), hostssl_only=False)
                cluster = Cluster.start(
                    replicas=0,
                    settings=PG_SETTINGS,
                    max_connections=PG_MAX_CONNECTIONS,
                    shared_buffers=PG_SHARED_BUFFERS,
                    ssl=ssl,
                )
                self.stack.callback(cluster.destroy)
                cluster.create_role(a.user, a.password, createdb=True)
                cluster.create_database(a.dbname, a.user)
                # PgBouncer gets the role's SCRAM verifier, not its password, as a production set-up would.
                self.scram_verifier = cluster.primary.sql(
                    f"SELECT rolpassword FROM pg_authid WHERE rolname = '{a.user}'"
                )
            except (PgError, PgNotFound) as exc:
                raise BenchError(f"could not start PostgreSQL: {exc}") from exc
            if not self.scram_verifier.startswith("SCRAM-SHA-256$"):
                raise BenchError(f"role {a.user} has no SCRAM verifier: {self.scram_verifier[:20]!r}")
            self.pg_port = cluster.primary.port
            log(f"# PostgreSQL primary on 127.0.0.1:{self.pg_port} ({time.monotonic() - t0:.1f}s)")
        if not a.no_init:
            t0 = time.monotonic()
            cmd = [a.pgbench, "-i", "-q", "-s", str(a.scale), "-h", self.pg_host, "-p", str(self.pg_port)]
            r = subprocess.run(
                [*cmd, "-U", a.user, a.dbname], env=self.pg_env(), capture_output=True, text=True
            )
            if r.returncode != 0:
                raise BenchError(f"pgbench -i failed:\n{r.stderr.strip()}")
            log(f"# pgbench -i -s {a.scale} done ({time.monotonic() - t0:.1f}s)")
        self.targets.append(Target("direct", self.pg_host, self.pg_port))

    # --- PgBouncer ----------------------------------------------------------------------------------------

    def start_pgbouncer(self) -> None:
        a = self.args
        binary = find_pgbouncer()
        d = self.tempdir("pgbouncer")
        port = free_port()
        secret = self.scram_verifier or a.password  # plaintext works too when we may not read pg_authid
        (d / "userlist.txt").write_text(f'"{a.user}" "{secret}"\n')
        # From 1.21 PgBouncer keeps protocol-level prepared statements in transaction mode (as halephant does
        # with its default max_prepared_statements: 200); older versions cannot run pgbench -M prepared.
        prepared = pgbouncer_version(binary) >= (1, 21)
        prepared_line = "max_prepared_statements = 200\n" if prepared else ""
        tls_lines = ""
        if self.tls_cert is not None and self.tls_key is not None:
            # PgBouncer reads the files as its own user: copies in its directory, which it owns
            shutil.copy(self.tls_cert, d / "server.crt")
            shutil.copy(self.tls_key, d / "server.key")
            tls_lines = (
                f"client_tls_sslmode = require\nclient_tls_cert_file = {d}/server.crt\n"
                f"client_tls_key_file = {d}/server.key\nserver_tls_sslmode = require\n"
            )
        (d / "pgbouncer.ini").write_text(
            f"""\
[databases]
{a.dbname} = host={self.pg_host} port={self.pg_port} dbname={a.dbname}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {d}/userlist.txt
pool_mode = transaction
default_pool_size = {a.pool_size}
max_client_conn = 2000
max_db_connections = 0
ignore_startup_parameters = extra_float_digits,options
logfile = {d}/pgbouncer.log
log_connections = 0
log_disconnections = 0
{prepared_line}{tls_lines}"""
        )
        user = service_user()
        kwargs: dict[str, Any] = {}
        if user is not None:
            for path in (d, d / "userlist.txt", d / "pgbouncer.ini", *d.glob("server.*")):
                os.chown(path, user.pw_uid, user.pw_gid)
            # Popen switches user in the child before exec, so proc.pid is PgBouncer itself (its CPU and RSS).
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        out = d / "stderr.log"
        with open(out, "wb") as errf:
            proc = subprocess.Popen(
                [binary, str(d / "pgbouncer.ini")],
                stdin=subprocess.DEVNULL,
                stdout=errf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only this script, which then stops it in order
                cwd=d,
                **kwargs,
            )
        self.stack.callback(stop_process, proc, "pgbouncer")
        wait_listening(proc, port, d / "pgbouncer.log", "pgbouncer", 15)
        self.versions["pgbouncer"] = subprocess.run(
            [binary, "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0]
        log(f"# {self.versions['pgbouncer']} pid {proc.pid} on 127.0.0.1:{port} (pool_size {a.pool_size})")
        self.targets.append(
            Target("pgbouncer", "127.0.0.1", port, proc.pid, proc, d / "pgbouncer.log", prepared=prepared)
        )

    # --- halephant ----------------------------------------------------------------------------------------

    def start_halephant(self) -> None:
        a = self.args
        d = self.tempdir("halephant")
        port = free_port()
        config = d / "halephant.yaml"
        client_tls = cluster_tls = ""
        if self.tls_cert is not None and self.tls_key is not None:
            client_tls = (
                f"client_tls: {{mode: require, cert_file: {self.tls_cert}, key_file: {self.tls_key}}}\n"
            )
            cluster_tls = "    tls: {mode: require}\n"
        config.write_text(
            f"""\
# generated by bench/bench.py
listen: 127.0.0.1:{port}
{client_tls}clusters:
  main:
    nodes: ["{self.pg_host}:{self.pg_port}"]
{cluster_tls}databases:
  {a.dbname}:
    cluster: main
    mode: transaction
    pool_size: {a.pool_size}
users:
  {a.user}:
    password: {json.dumps(a.password)}
    auth: scram-sha-256
logging:
  level: warning  # like PgBouncer's log_connections = 0 here: no log line per client
plugins:
  disable: {json.dumps(_non_default_plugins())}  # measure halephant as shipped
"""
        )
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        }
        errlog = d / "halephant.log"
        with open(errlog, "wb") as errf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "halephant", "run", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=errf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
                env=env,
            )
        self.stack.callback(stop_process, proc, "halephant")
        self.stack.callback(self._report_halephant_log, proc, errlog)
        wait_listening(proc, port, errlog, "halephant", 30)
        log(f"# halephant pid {proc.pid} on 127.0.0.1:{port} (pool_size {a.pool_size}, log {errlog})")
        self.targets.append(Target("halephant", "127.0.0.1", port, proc.pid, proc, errlog))

    @staticmethod
    def _report_halephant_log(proc: subprocess.Popen[bytes], errlog: Path) -> None:
        if proc.poll() is not None and proc.returncode not in (0, -signal.SIGTERM):
            log(f"# halephant exited with {proc.returncode}; last log lines:\n{_tail(errlog)}")

    def add_external(self, spec: str) -> None:
        name, sep, address = spec.partition("=")
        if not sep:
            name, address = "target", spec
        host, _, port = address.rpartition(":")
        pid = listener_pid(int(port))
        log(f"# target {name} at {address}" + (f" (pid {pid})" if pid else " (pid unknown: no CPU figures)"))
        self.targets.append(Target(name, host or "127.0.0.1", int(port), pid))

    def check_targets(self) -> None:
        """One SELECT 1 through every target before spending minutes on the matrix."""
        for t in self.targets:
            if self.args.tls:  # (idle_clients speaks plaintext only)
                a = self.args
                cmd = [
                    a.psql,
                    "-X",
                    "-A",
                    "-t",
                    "-h",
                    t.host,
                    "-p",
                    str(t.port),
                    "-U",
                    a.user,
                    "-d",
                    a.dbname,
                ]
                r = subprocess.run(
                    [*cmd, "-c", "SELECT 1"], env=self.pg_env(), capture_output=True, text=True
                )
                if r.returncode != 0 or r.stdout.strip() != "1":
                    raise BenchError(
                        f"target {t.name} ({t.address}) does not work over TLS: {r.stderr.strip()}"
                    )
                continue
            try:
                conn = idle_clients.open_client(
                    t.host, t.port, self.args.user, self.args.password, self.args.dbname
                )
                ok = idle_clients.select_one(conn)
                idle_clients.close_client(conn)
            except (OSError, idle_clients.HandshakeFailed) as exc:
                problem = str(exc)
            else:
                problem = "" if ok else "SELECT 1 did not return 1"
            if problem:
                tail = f"; its log ends with:\n{_tail(t.logfile)}" if t.logfile else ""
                raise BenchError(f"target {t.name} ({t.address}) does not work: {problem}{tail}")

    def collect_versions(self) -> None:
        a = self.args
        version = subprocess.run([a.pgbench, "--version"], capture_output=True, text=True).stdout.strip()
        self.versions["pgbench"] = version
        self.versions["postgresql"] = self.psql("SHOW server_version")
        self.versions["python"] = platform.python_version()
        self.versions["kernel"] = platform.release()
        self.versions["cpus"] = str(os.cpu_count())


# ---------------------------------------------------------------------------------------------------------
# one pgbench run


@dataclass(frozen=True)
class Cell:
    mode: str
    proto: str
    clients: int

    def label(self) -> str:
        return f"{MODE_LABEL[self.mode]} {self.proto} c={self.clients}"


def _grab(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def wait_quiet(limit_pct: float, max_wait: float) -> tuple[float, float]:
    """Block until the machine is nearly idle (bounded): unrelated work on a small box skews every number."""
    t0 = time.monotonic()
    load = machine_load()
    while load > limit_pct and time.monotonic() - t0 < max_wait:
        log(f"#   machine busy ({load:.0f}% of a core), waiting for quiet...")
        time.sleep(1)
        load = machine_load()
    return load, time.monotonic() - t0


def run_once(setup: Setup, target: Target, cell: Cell, postmaster: int | None) -> dict[str, Any]:
    a = setup.args
    pre_load, waited = wait_quiet(a.quiet_pct, a.quiet_wait)
    if cell.mode == "tpcb":
        # Directly on PostgreSQL so every target starts from the same table state.
        setup.psql("TRUNCATE pgbench_history", "VACUUM pgbench_branches, pgbench_tellers")
    cmd = [a.pgbench, "-n", "-h", target.host, "-p", str(target.port), "-U", a.user, "-M", cell.proto]
    cmd += ["-c", str(cell.clients), "-j", str(threads(cell)), "-T", str(a.duration)]
    cmd += (["-S"] if cell.mode == "S" else []) + [a.dbname]

    table = process_table()
    b_pg, b_px, (b_sys, b_si) = tree_ticks(postmaster, table), tree_ticks(target.pid, table), system_ticks()
    b_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    b_rq = run_queue_ns(target.pid)
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=setup.pg_env(), capture_output=True, text=True, timeout=a.duration + 300)
    wall = time.monotonic() - t0
    e_rq = run_queue_ns(target.pid)
    e_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    time.sleep(0.5)  # backends closing with pgbench exit and get reaped: their CPU moves to the postmaster
    table = process_table()
    e_pg, e_px, (e_sys, e_si) = tree_ticks(postmaster, table), tree_ticks(target.pid, table), system_ticks()

    out = r.stdout + r.stderr
    tps = _grab(
        r"tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)\)", out
    )
    lat = _grab(r"latency average = ([\d.]+) ms", out)
    failed = _grab(r"number of failed transactions: (\d+)", out)
    txns = _grab(r"number of transactions actually processed: (\d+)", out)
    n = int(txns) if txns else 0

    def pct(ticks: float | None) -> float | None:
        return None if ticks is None else round(ticks / HZ / wall * 100, 1)

    def us_per_txn(ticks: float | None) -> float | None:
        return None if ticks is None or not n else round(ticks / HZ * 1e6 / n, 1)

    pg_ticks = None if b_pg is None or e_pg is None else e_pg - b_pg
    px_ticks = None if b_px is None or e_px is None else e_px - b_px
    bench_ticks = (e_ru.ru_utime + e_ru.ru_stime - b_ru.ru_utime - b_ru.ru_stime) * HZ
    busy_ticks, softirq_ticks = e_sys - b_sys, e_si - b_si
    rq_ticks = None if b_rq is None or e_rq is None else (e_rq - b_rq) / 1e9 * HZ
    rec: dict[str, Any] = {
        "kind": "run",
        "target": target.name,
        "mode": cell.mode,
        "proto": cell.proto,
        "clients": cell.clients,
        "duration": a.duration,
        "tps": float(tps) if tps else None,
        "lat_ms": float(lat) if lat else None,
        "failed": int(failed) if failed else 0,
        "txns": n,
        "pooler_us_per_txn": us_per_txn(px_ticks),
        # how long the pooler waited for a CPU while it had work: (CPU + this) per transaction near 1e6 / tps
        # means the pooler was running or runnable all the time, i.e. it limited the run
        "pooler_runq_us_per_txn": us_per_txn(rq_ticks),
        "postgres_us_per_txn": us_per_txn(pg_ticks),
        "pgbench_us_per_txn": us_per_txn(bench_ticks),
        "cpu_pooler_pct": pct(px_ticks),
        "cpu_postgres_pct": pct(pg_ticks),
        "cpu_pgbench_pct": pct(bench_ticks),
        # softirq: kernel network work (loopback TCP receive); shown for information only, because much of it
        # is also charged to whichever process it interrupted. "other": busy time not charged to PostgreSQL,
        # the pooler or pgbench - unrelated load plus softirq in idle context. Large values: a disturbed run.
        "cpu_softirq_pct": pct(softirq_ticks),
        "cpu_other_pct": pct(busy_ticks - (pg_ticks or 0) - (px_ticks or 0) - bench_ticks),
        "pre_load_pct": round(pre_load, 1),
        "waited_s": round(waited, 1),
        "rc": r.returncode,
        "cmd": " ".join(cmd),
    }
    if rec["tps"] is None or r.returncode != 0:
        rec["error"] = out.strip().splitlines()[-3:]
        if rec["tps"] is None:  # a run that never got going: its CPU shares mean nothing
            rec.update({k: None for k in rec if k.startswith("cpu_") or k.endswith("_per_txn")})
    return rec


# ---------------------------------------------------------------------------------------------------------
# matrix and report


def cells_of(args: argparse.Namespace) -> list[Cell]:
    return [Cell(m, p, c) for m in args.modes for p in args.protocols for c in args.clients]


def threads(cell: Cell) -> int:
    """pgbench -j. pgbench prepares with a blocking PQprepare: a client waiting there for a pooled server
    would stall the other clients of its thread, one of which may hold that server in a tpcb transaction.
    So -M prepared tpcb runs a thread per client, for every target alike."""
    if cell.proto == "prepared" and cell.mode == "tpcb":
        return cell.clients
    return min(2, cell.clients)


def targets_for(cell: Cell, targets: list[Target]) -> list[Target]:
    # PgBouncer before 1.21 cannot keep prepared statements in transaction mode: its rows say n/a.
    return [t for t in targets if t.prepared or cell.proto != "prepared"]


def _run_summary(rec: dict[str, Any]) -> str:
    def g(key: str, spec: str) -> str:
        return _fmt(rec.get(key), spec)

    runq = rec.get("pooler_runq_us_per_txn")
    line = (
        f"tps={g('tps', '.0f')} lat={g('lat_ms', '.3f')}ms us/txn: pooler={g('pooler_us_per_txn', '.1f')} "
        + ("" if runq is None else f"(+{runq:.1f} waiting for a CPU) ")
        + f"pg={g('postgres_us_per_txn', '.1f')} pgbench={g('pgbench_us_per_txn', '.1f')}; "
        f"%cpu: softirq={g('cpu_softirq_pct', '.0f')} other={g('cpu_other_pct', '.0f')} "
        f"pre={g('pre_load_pct', '.0f')}"
    )
    return line + (f" ERROR {rec['error']}" if "error" in rec else "")


def run_matrix(setup: Setup, jsonf: TextIO | None, stamp: dict[str, Any]) -> list[dict[str, Any]]:
    a = setup.args
    cells = cells_of(a)
    postmaster = listener_pid(setup.pg_port)
    total = sum(len(targets_for(c, setup.targets)) for c in cells) * a.reps
    log(
        f"# {total} runs x {a.duration}s = ~{total * (a.duration + 3) / 60:.1f} min "
        "(more if it waits for quiet); "
        f"targets: {', '.join(f'{t.name}={t.address}' for t in setup.targets)}"
    )
    results: list[dict[str, Any]] = []
    k = 0
    for rep in range(a.reps):
        for i, cell in enumerate(cells):
            ts = targets_for(cell, setup.targets)
            # Rotate the order per cell and reverse it on odd repetitions, so no target always runs first
            # (right after a vacuum) or last (when the machine has warmed up).
            shift = (i + rep) % len(ts)
            order = ts[shift:] + ts[:shift]
            if rep % 2:
                order.reverse()
            for t in order:
                k += 1
                if not t.alive():
                    rec: dict[str, Any] = {
                        "kind": "run",
                        "target": t.name,
                        "mode": cell.mode,
                        "proto": cell.proto,
                        "clients": cell.clients,
                        "tps": None,
                        "error": ["process has exited"],
                    }
                else:
                    rec = run_once(setup, t, cell, postmaster)
                rec["rep"] = rep
                results.append(rec)
                if jsonf:
                    jsonf.write(json.dumps({**stamp, **rec}) + "\n")
                    jsonf.flush()
                log(f"# [{k}/{total}] {cell.label():22} {t.name:12} {_run_summary(rec)}")
    return results


def median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def runs_of(results: list[dict[str, Any]], target: str, cell: Cell) -> list[dict[str, Any]]:
    key = (target, cell.mode, cell.proto, cell.clients)
    return [r for r in results if (r["target"], r["mode"], r["proto"], r["clients"]) == key]


def cell_value(results: list[dict[str, Any]], target: str, cell: Cell, key: str) -> float | None:
    return median([r.get(key) for r in runs_of(results, target, cell)])


def _fmt(v: float | None, spec: str, width: int = 0) -> str:
    return f"{'-' if v is None else format(v, spec):>{width}}"


# (header, width, format, run-record key) for the per-cell tables; values are medians over repetitions
COLUMNS = [
    ("tps", 9, ",.0f", "tps"),
    ("lat ms", 8, ".3f", "lat_ms"),
    ("pooler us/txn", 13, ".1f", "pooler_us_per_txn"),
    ("pooler runq us", 14, ".1f", "pooler_runq_us_per_txn"),
    ("postgres us/txn", 15, ".1f", "postgres_us_per_txn"),
    ("softirq %", 9, ".0f", "cpu_softirq_pct"),
    ("other %", 7, ".0f", "cpu_other_pct"),
]


def print_tables(setup: Setup, results: list[dict[str, Any]], out: TextIO) -> None:
    a = setup.args
    print(
        f"\npgbench -T {a.duration} -j min(2,c) (c for prepared tpcb), scale {a.scale}, "
        f"pool_size {a.pool_size}, "
        f"{'median of ' + str(a.reps) + ' reps' if a.reps > 1 else '1 rep'}; "
        "tps = 'without initial connection time'; CPU per transaction in us; "
        f"softirq and other in % of one core ({os.cpu_count()} cores)",
        file=out,
    )
    header = f"  {'target':<12} {'x direct':>8} {'x pgbouncer':>11} {'failed':>6} "
    header += " ".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS)
    for cell in cells_of(a):
        names = [t.name for t in targets_for(cell, setup.targets)]
        left_out = [t.name for t in setup.targets if t.name not in names]
        direct = cell_value(results, "direct", cell, "tps")
        pgb = cell_value(results, "pgbouncer", cell, "tps") if "pgbouncer" in names else None
        print(f"\n{cell.label()}\n{header}", file=out)
        for name in names:
            tps = cell_value(results, name, cell, "tps")
            runs = runs_of(results, name, cell)
            row = f"  {name:<12} {_fmt(tps / direct if tps and direct else None, '.2f', 8)} "
            row += f"{_fmt(tps / pgb if tps and pgb else None, '.2f', 11)} "
            row += f"{sum(r.get('failed') or 0 for r in runs):>6} "
            row += " ".join(_fmt(cell_value(results, name, cell, key), f, w) for _, w, f, key in COLUMNS)
            if any("error" in r for r in runs):
                row += "  ERRORS (see the run log above)"
            print(row, file=out)
        for name in left_out:
            print(f"  {name:<12} {'n/a':>8}  (cannot run -M prepared in transaction mode)", file=out)


def goal_checks(
    setup: Setup, results: list[dict[str, Any]], idle: list[idle_clients.IdleResult]
) -> list[dict[str, Any]]:
    """The goals that this run could evaluate: both targets measured in a goal cell, or idle clients."""
    checks: list[dict[str, Any]] = []
    if setup.args.tls:
        return checks  # the goals are for plaintext connections: a TLS run is for comparison
    for cell in cells_of(setup.args) if results else []:
        if cell.mode != GOAL_TPS_MODE or cell.clients not in GOAL_TPS_CLIENTS or cell.proto == "prepared":
            continue
        h = cell_value(results, GOAL_TARGET, cell, "tps")
        b = cell_value(results, "pgbouncer", cell, "tps")
        if h is None or b is None:
            continue
        ratio = h / b
        checks.append(
            {
                "kind": "goal",
                "goal": f"{GOAL_TARGET} >= {GOAL_TPS_RATIO}x PgBouncer TPS",
                "cell": cell.label(),
                "value": round(ratio, 3),
                "detail": f"{h:,.0f} / {b:,.0f} tps = {ratio:.2f}x",
                "result": "PASS" if ratio >= GOAL_TPS_RATIO else "FAIL",
            }
        )
    for r in idle:
        if r.target != GOAL_TARGET:
            continue
        ok = r.extra_client_ok and r.mib_per_1000 <= GOAL_IDLE_MIB_PER_1000
        checks.append(
            {
                "kind": "goal",
                "goal": f"{GOAL_TARGET} <= {GOAL_IDLE_MIB_PER_1000:g} MiB RSS per 1,000 idle clients",
                "cell": f"{r.clients} idle clients",
                "value": round(r.mib_per_1000, 3),
                "detail": f"{r.mib_per_1000:.2f} MiB per 1,000"
                + ("" if r.extra_client_ok else ", one more client FAILED"),
                "result": "PASS" if ok else "FAIL",
            }
        )
    return checks


def print_goals(
    checks: list[dict[str, Any]], idle: list[idle_clients.IdleResult], out: TextIO, tls: bool = False
) -> None:
    if idle:
        print("\nIdle clients (RSS growth of the pooler process)", file=out)
        for r in idle:
            print(f"  {idle_clients.format_result(r)}", file=out)
    print("\nGoals", file=out)
    if tls:
        print(
            "  none evaluated: the goals are for plaintext connections; --tls runs are for comparison",
            file=out,
        )
    elif not checks:
        print(
            f"  none evaluated: they need {GOAL_TARGET} and pgbouncer at {MODE_LABEL[GOAL_TPS_MODE]} "
            f"c={'/'.join(map(str, GOAL_TPS_CLIENTS))}, or {GOAL_TARGET} with --idle",
            file=out,
        )
    for c in checks:
        print(f"  {c['goal']:<48} {c['cell']:<20} {c['detail']:<34} {c['result']}", file=out)


def run_idle(setup: Setup, n: int) -> list[idle_clients.IdleResult]:
    a = setup.args
    out: list[idle_clients.IdleResult] = []
    for t in setup.targets:
        if t.name == "direct" or t.pid is None or not t.alive():
            continue
        log(f"# idle clients: {n} against {t.name} ({t.address}, pid {t.pid})")
        try:
            out.append(
                idle_clients.measure(
                    t.host,
                    t.port,
                    pid=t.pid,
                    clients=n,
                    user=a.user,
                    password=a.password,
                    dbname=a.dbname,
                    target=t.name,
                    progress=log,
                )
            )
        except (OSError, idle_clients.HandshakeFailed) as exc:
            log(f"# idle clients against {t.name} failed: {exc}")
    return out


# ---------------------------------------------------------------------------------------------------------
# command line


def _list(kind: type, allowed: tuple[str, ...] = ()) -> Any:
    def parse(text: str) -> list[Any]:
        items = [kind(x) for x in text.split(",") if x.strip()]
        bad = [x for x in items if allowed and x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench.py",
        description="Interleaved pgbench matrix: direct PostgreSQL vs PgBouncer vs halephant (and others).",
    )
    ap.add_argument("--quick", action="store_true", help="fast check: -T 5, -S only, clients 10,100")
    ap.add_argument("--modes", type=_list(str, ("S", "tpcb")), help="S (pgbench -S) and/or tpcb [S,tpcb]")
    ap.add_argument(
        "--protocols",
        type=_list(str, ("simple", "extended", "prepared")),
        help="pgbench -M values [simple,extended,prepared]; PgBouncer < 1.21 sits out 'prepared'",
    )
    ap.add_argument("--clients", type=_list(int), help="client counts [1,10,100]")
    ap.add_argument("-T", dest="duration", type=int, help="seconds per pgbench run [10]")
    ap.add_argument("--reps", type=int, default=1, help="repeat the matrix; tables show medians [1]")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i scale [10]")
    ap.add_argument(
        "--pool-size", type=int, default=20, help="server connections per pool, both poolers [20]"
    )
    ap.add_argument("--no-pgbouncer", action="store_true", help="leave PgBouncer out")
    ap.add_argument("--no-halephant", action="store_true", help="leave halephant out")
    ap.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="also measure an already running pooler (repeatable); it must route --dbname to the primary",
    )
    ap.add_argument(
        "--pg", metavar="HOST:PORT", help="use this running PostgreSQL instead of a throwaway one"
    )
    ap.add_argument("--no-init", action="store_true", help="skip pgbench -i (the tables must exist)")
    ap.add_argument("--user", default="bench")
    ap.add_argument("--password", default="bench")
    ap.add_argument("--dbname", default="bench")
    ap.add_argument("--idle", type=int, default=0, metavar="N", help="also measure RSS with N idle clients")
    ap.add_argument("--idle-only", action="store_true", help="skip the pgbench matrix (with --idle)")
    ap.add_argument(
        "--json", metavar="FILE", help="append every run, idle measurement and goal as JSON lines"
    )
    ap.add_argument(
        "--tls",
        action="store_true",
        help="every connection over TLS (sslmode=require: clients to each target, poolers to PostgreSQL); "
        "for comparison only, the goals are for plaintext",
    )
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal fails")
    ap.add_argument(
        "--quiet-pct", type=float, default=30.0, help="'quiet' = below this %% of one core busy [30]"
    )
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="wait at most this long for quiet [60]")
    a = ap.parse_args(argv)
    a.modes = a.modes or (["S"] if a.quick else ["S", "tpcb"])
    a.protocols = a.protocols or ["simple", "extended", "prepared"]
    a.clients = a.clients or ([10, 100] if a.quick else [1, 10, 100])
    a.duration = a.duration or (5 if a.quick else 10)
    if a.idle_only and not a.idle:
        ap.error("--idle-only needs --idle N")
    if a.tls and a.idle:
        ap.error("--idle measures plaintext clients: run it without --tls")
    a.pgbench = find_pg_tool("pgbench")
    a.psql = find_pg_tool("psql")
    return a


def run(setup: Setup, stamp: dict[str, Any]) -> list[dict[str, Any]]:
    """Start everything, measure, print; returns the goal checks. The caller tears down."""
    args = setup.args
    if args.tls:
        setup.make_certificate()
    setup.start_postgres()
    if not args.no_pgbouncer:
        setup.start_pgbouncer()
    if not args.no_halephant:
        setup.start_halephant()
    for spec in args.target:
        setup.add_external(spec)
    setup.check_targets()
    setup.collect_versions()
    log("# " + ", ".join(f"{k} {v}" for k, v in setup.versions.items()))
    jsonf = setup.stack.enter_context(open(args.json, "a")) if args.json else None  # noqa: SIM115
    if jsonf:
        jsonf.write(
            json.dumps({**stamp, "kind": "setup", "versions": setup.versions, "args": vars(args)}) + "\n"
        )
    # Idle clients first: a pooler's allocator keeps what the matrix's 100 clients freed and would hand it
    # to the idle clients, hiding part of their cost.
    idle = run_idle(setup, args.idle) if args.idle else []
    results = [] if args.idle_only else run_matrix(setup, jsonf, stamp)
    if results:
        print_tables(setup, results, sys.stdout)
    checks = goal_checks(setup, results, idle)
    if jsonf:
        for rec in [*({"kind": "idle", **r.as_dict()} for r in idle), *checks]:
            jsonf.write(json.dumps({**stamp, **rec}) + "\n")
    print_goals(checks, idle, sys.stdout, tls=args.tls)
    sys.stdout.flush()
    return checks


def _raise_signal_as_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as exc:
        log(f"bench.py: {exc}")
        return 2
    signal.signal(signal.SIGTERM, _raise_signal_as_exit)
    signal.signal(signal.SIGHUP, _raise_signal_as_exit)
    # Children inherit this: PgBouncer needs a descriptor per client (max_client_conn 2000) and server.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    stack = contextlib.ExitStack()
    setup = Setup(args, stack)
    stamp = {"bench_started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    checks: list[dict[str, Any]] = []
    try:
        try:
            checks = run(setup, stamp)
        finally:
            # Tear-down must finish even if Ctrl-C is pressed again while it runs.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stack.close()
    except BenchError as exc:
        log(f"bench.py: {exc}")
        return 1
    except KeyboardInterrupt:
        log("bench.py: interrupted; everything it started has been stopped")
        return 130
    except SystemExit as exc:
        log("bench.py: terminated by a signal; everything it started has been stopped")
        raise exc
    if args.check and any(c["result"] == "FAIL" for c in checks):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
