"""End-to-end: the `halephant` command as operators run it: `check`, `plugins`, `run` (bad config, busy port,
SIGTERM) and what a running halephant writes to its log (the events of a session, and never a password).

Every command runs as a subprocess of this interpreter (``python -m halephant``) against the working tree.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import psycopg
import pytest
import rawclient as rc
from rawclient import RawClient
from support.halephant import DEFAULT_ARGV, REPO_ROOT, HalephantFactory, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

DEFAULT_PLUGINS = {
    # name: the hook it exists for (the design's default-plugin table)
    "cursor_guard": "halephant_inspect_query",
    "hba": "halephant_authenticate",
    "database_routing": "halephant_select_pool",
    "pool_sizing": "halephant_pool_size",
    "replica_routing": "halephant_route",
    "scram_auth": "halephant_authenticate",
}
PROBLEM_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): (?P<path>[\w.]+): (?P<message>.+)$")

GOOD_CONFIG = """\
listen: 127.0.0.1:6543
clusters:
  main:
    nodes: [127.0.0.1:5999]
databases:
  myapp:
    cluster: main
users:
  myapp:
    password: secret
"""

# three mistakes: a bad duration, a database naming an undefined cluster, an unknown key
BAD_CONFIG = """\
listen: 127.0.0.1:6543
clusters:
  main:
    nodes: [127.0.0.1:5999]
databases:
  myapp:
    cluster: main
    idle_timeout: 5 parsecs
  other:
    cluster: nowhere
users:
  myapp:
    password: secret
    colour: blue
"""
BAD_CONFIG_PROBLEMS = [
    # (line, col, dotted path, a word of the message); positions are 1-based, of the value or the key
    (8, 19, "databases.myapp.idle_timeout", "duration"),
    (10, 14, "databases.other.cluster", "nowhere"),
    (14, 5, "users.myapp.colour", "unknown key"),
]


def halephant_cli(*args: str, timeout: float = 30.0, **env: str) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, COLUMNS="200", **env)  # rich folds table cells at the default 80 columns
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "halephant", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=timeout,
    )


def write(path: pathlib.Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def problem_lines(output: str) -> list[re.Match[str]]:
    return [m for line in output.splitlines() if (m := PROBLEM_LINE.match(line))]


def assert_bad_config_reported(output: str, path: str) -> None:
    problems = problem_lines(output)
    assert len(problems) == 3, output
    for found, (line, col, dotted, word) in zip(problems, BAD_CONFIG_PROBLEMS, strict=True):
        assert found["file"] == path, output
        assert (int(found["line"]), int(found["col"]), found["path"]) == (line, col, dotted), found.group(0)
        assert word in found["message"], found.group(0)


# --- halephant check ---------------------------------------------------------------------------------------


def test_check_good_file(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD_CONFIG)
    result = halephant_cli("check", "-c", path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert path in result.stdout


def test_check_bad_file_lists_every_problem_with_its_position(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "bad.yaml", BAD_CONFIG)
    result = halephant_cli("check", "-c", path)
    assert result.returncode != 0
    assert_bad_config_reported(result.stdout + result.stderr, path)


def test_check_yaml_syntax_error_has_a_position(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "broken.yaml", "clusters:\n  main: [\n")
    result = halephant_cli("check", "-c", path)
    assert result.returncode != 0
    assert re.search(rf"^{re.escape(path)}:\d+:\d+: ", result.stdout + result.stderr, re.M), result.stderr


@pytest.mark.parametrize(
    ("plugins", "module", "located", "message"),
    [
        (
            "plugins:\n  modules: [halephant_no_such_module]\n",
            None,
            "plugins.modules.0",
            "could not load plugin module 'halephant_no_such_module'",
        ),
        (
            "plugins:\n  modules: [refuses_config]\n",
            "from halephant import hookimpl\n\n@hookimpl\ndef halephant_configure(config):\n"
            "    raise RuntimeError('no, thank you')\n",
            "plugins.modules.0",
            "plugin 'refuses_config' in halephant_configure refused the configuration: "
            "RuntimeError('no, thank you')",
        ),
        (
            "plugins:\n  modules: [bad_settings]\n",
            "from halephant import hookimpl\n\n@hookimpl\ndef halephant_plugin_settings():\n"
            "    return 'not a tuple'\n",
            "plugins.modules.0",
            "plugin 'bad_settings' answered 'not a tuple' to halephant_plugin_settings",
        ),
        ("plugins:\n  disable: [scram_auth, hba]\n", None, "plugins.disable", "no plugin implements"),
    ],
    ids=["missing-module", "configure-raises", "bad-settings-answer", "required-disabled"],
)
def test_check_and_run_report_a_plugin_problem_at_its_place_in_the_file(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    plugins: str,
    module: str | None,
    located: str,
    message: str,
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # where the plugin module is written
    if module is not None:
        (tmp_path / f"{plugins.split('[')[1].split(']')[0]}.py").write_text(module)
    path = write(tmp_path / "plugins.yaml", GOOD_CONFIG)
    with open(path, "a") as f:
        f.write(plugins)
    for command in (["check", "-c", path], ["run", "-c", path]):
        result = halephant_cli(*command, timeout=20)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "Traceback" not in output, output
        problems = problem_lines(output)
        assert len(problems) == 1, output
        assert (problems[0]["file"], problems[0]["path"]) == (path, located), output
        assert message in problems[0]["message"], output


def test_check_warns_of_a_disabled_plugin_that_is_not_there(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "typo.yaml", GOOD_CONFIG + "plugins:\n  disable: [cursor_gaurd]\n")
    result = halephant_cli("check", "-c", path)
    assert result.returncode == 0, result.stderr  # disabling what is not there disables nothing
    assert f"warning: {path}:12:13: plugins.disable.0: no installed plugin is named 'cursor_gaurd'" in (
        result.stderr
    )
    assert "cursor_guard" in result.stderr  # the names it could have meant


def test_check_warns_of_a_plugin_the_environment_disables_that_is_not_there(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD_CONFIG)
    result = halephant_cli("check", "-c", path, HALEPHANT_DISABLE_PLUGINS="cursor_gaurd")
    assert result.returncode == 0, result.stderr
    assert "warning: HALEPHANT_DISABLE_PLUGINS: no installed plugin is named 'cursor_gaurd'" in result.stderr
    assert "cursor_guard" in result.stderr


def test_check_missing_file(tmp_path: pathlib.Path) -> None:
    result = halephant_cli("check", "-c", str(tmp_path / "absent.yaml"))
    assert result.returncode != 0
    assert "absent.yaml" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# --- halephant plugins -------------------------------------------------------------------------------------


def plugin_table(output: str) -> dict[str, tuple[str, set[str]]]:
    """Rows of the rich table: name -> (distribution, hooks); hooks continue on rows without a name."""
    rows: dict[str, tuple[str, set[str]]] = {}
    current = None
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != 4:
            continue
        name, distribution, _version, hook = cells
        if name:
            current = name
            rows[name] = (distribution, set())
        if current is not None and hook:
            rows[current][1].add(hook)
    return rows


def declared_hooks(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    return {
        n for n in dir(module) if n.startswith("halephant_") and hasattr(getattr(module, n), "halephant_impl")
    }


def test_plugins_lists_the_defaults() -> None:
    result = halephant_cli("plugins")
    assert result.returncode == 0, result.stderr
    table = plugin_table(result.stdout)
    for name, main_hook in DEFAULT_PLUGINS.items():
        assert name in table, result.stdout
        distribution, hooks = table[name]
        assert distribution == "halephant"
        assert main_hook in hooks
        assert hooks == declared_hooks(f"halephant_plugins.{name}")
    assert table["cursor_guard"][1] >= {"halephant_plugin_settings", "halephant_configure"}


def test_plugins_with_a_config_that_disables_one(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "disable.yaml", GOOD_CONFIG + "plugins:\n  disable: [cursor_guard]\n")
    result = halephant_cli("plugins", "-c", path)
    assert result.returncode == 0, result.stderr
    table = plugin_table(result.stdout)
    assert "cursor_guard" not in table
    assert set(DEFAULT_PLUGINS) - {"cursor_guard"} <= set(table)
    assert "disabled: cursor_guard" in result.stdout


def test_plugins_disabling_a_required_default_is_an_error(tmp_path: pathlib.Path) -> None:
    # (hba implements the hook too, but answers only where its file has rules: both must go for none)
    path = write(tmp_path / "disable.yaml", GOOD_CONFIG + "plugins:\n  disable: [scram_auth, hba]\n")
    result = halephant_cli("plugins", "-c", path)
    assert result.returncode != 0
    assert "halephant_authenticate" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "problem"),
    [(None, ":1:1: cannot read the file"), ("clusters:\n\tmain: {}\n", ":2:1: found character '\\t'")],
    ids=["missing-file", "yaml-error"],
)
def test_plugins_with_a_config_it_cannot_read_says_why(
    tmp_path: pathlib.Path, text: str | None, problem: str
) -> None:
    path = tmp_path / "halephant.yaml"
    if text is not None:
        path.write_text(text)
    result = halephant_cli("plugins", "-c", str(path))
    assert result.returncode != 0
    assert f"{path}{problem}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_broken_entry_point_is_named_with_the_way_to_leave_it_out(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an installed package whose `halephant` entry point names a module that is not there
    dist_info = tmp_path / "halephant_broken_plugin-0.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: halephant-broken-plugin\nVersion: 0.3\n"
    )
    (dist_info / "entry_points.txt").write_text("[halephant]\nbroken = halephant_broken_plugin_gone\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    named = (
        "could not load plugin 'broken' "
        "(entry point 'halephant_broken_plugin_gone' of halephant-broken-plugin 0.3"
    )
    path = write(tmp_path / "good.yaml", GOOD_CONFIG)
    for command in (["plugins"], ["check", "-c", path]):
        result = halephant_cli(*command)
        assert result.returncode != 0, result.stdout
        assert named in result.stderr and "plugins.disable" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    disabled = write(tmp_path / "disabled.yaml", GOOD_CONFIG + "plugins:\n  disable: [broken]\n")
    result = halephant_cli("check", "-c", disabled)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # an installed plugin, disabled: no typo


# --- halephant run ---------------------------------------------------------------------------------------


def test_run_with_a_bad_config_exits_with_the_problems(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "bad.yaml", BAD_CONFIG)
    result = halephant_cli("run", "-c", path, timeout=15)
    assert result.returncode != 0
    assert_bad_config_reported(result.stdout + result.stderr, path)


def test_run_on_a_port_in_use_exits_with_a_clear_message(pg: Cluster, halephant: HalephantFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = halephant.spawn(default_config(pg, listen=f"127.0.0.1:{port}"))
        rc_ = running.proc.wait(timeout=15)
    log = running.log_text()
    assert rc_ != 0, log
    assert f"127.0.0.1:{port}" in log
    assert "in use" in log.lower(), log
    assert "Traceback" not in log


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_run_raises_the_open_files_limit_to_the_hard_one_and_says_so(
    pg: Cluster, tmp_path: pathlib.Path
) -> None:
    # Each client and each server connection is a descriptor: the usual soft limit (1024) is far below
    # max_client_conn's default (10000), and a daemon that keeps it refuses clients long before that.
    factory = HalephantFactory(tmp_path, argv=["prlimit", "--nofile=512:4096", *DEFAULT_ARGV])
    try:
        enough = factory.start(default_config(pg, limits={"max_client_conn": 1000}))
        too_few = factory.start(default_config(pg))  # 10000 clients cannot fit in 4096 descriptors
        for running in (enough, too_few):
            assert resource.prlimit(running.proc.pid, resource.RLIMIT_NOFILE) == (4096, 4096)
        lines = [line for line in enough.log_text().splitlines() if "open files" in line]
        assert len(lines) == 1 and " INFO " in lines[0], lines
        assert lines[0].endswith("open files: limit 4096 (raised from 512)"), lines
        lines = [line for line in too_few.log_text().splitlines() if "open files" in line]
        assert len(lines) == 1 and " WARNING " in lines[0], lines
        assert "limit 4096 (raised from 512)" in lines[0] and "max_client_conn (10000)" in lines[0], lines
        assert "LimitNOFILE=" in lines[0], lines
        with psycopg.connect(enough.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        factory.stop_all()


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_run_refuses_to_start_under_an_open_files_limit_too_low_to_serve(
    pg: Cluster, tmp_path: pathlib.Path
) -> None:
    # Under a dozen descriptors not even the event loop starts: a clear refusal, not a traceback.
    factory = HalephantFactory(tmp_path, argv=["prlimit", "--nofile=12:12", *DEFAULT_ARGV])
    running = factory.spawn(default_config(pg))
    try:
        rc_ = running.proc.wait(timeout=15)
    finally:
        factory.stop_all()
    log = running.log_text()
    assert rc_ == 1, log
    assert "open files: limit 12 is too low to start; at least 64 are needed" in log, log
    assert "ulimit -n" in log and "Traceback" not in log, log


def test_sigterm_tells_clients_57P01_and_exits_0(pg: Cluster, halephant: HalephantFactory) -> None:
    # the transaction left open is ended by shutdown_timeout (graceful shutdown: tests/e2e/test_operations.py)
    running = halephant.start(default_config(pg, limits={"shutdown_timeout": "1s"}))
    idle = RawClient(running.host, running.port)
    busy = RawClient(running.host, running.port)
    with idle, busy:
        idle.login("myapp", "myapp", "myapp")
        busy.login("myapp", "myapp", "myapp")
        assert busy.simple_query("BEGIN")[-1].payload == b"T"
        t0 = time.monotonic()
        running.signal(signal.SIGTERM)
        for client in (idle, busy):
            error = client.expect_fatal_and_close("57P01")
            assert error.fields["M"].startswith("terminating connection due to administrator command")
        assert running.proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 5
    log = running.log_text()
    assert "SIGTERM" in log
    assert "Traceback" not in log
    # the transaction the busy client had open is not left behind on the server
    assert_clean_servers(pg.primary)


def test_sigterm_with_no_clients_exits_0(pg: Cluster, halephant: HalephantFactory) -> None:
    running = halephant.start(default_config(pg))
    running.signal(signal.SIGTERM)
    assert running.proc.wait(timeout=15) == 0


# --- the log -----------------------------------------------------------------------------------------------


def test_log_of_a_normal_session(pg: Cluster, halephant: HalephantFactory) -> None:
    running = halephant.start(default_config(pg))
    with psycopg.connect(running.dsn(application_name="log-test"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(running.dsn(password="wrong"))
    client = r"<client #\d+ myapp@myapp from 127\.0\.0\.1:\d+>"
    expected = {
        "listening": r"listening on 127\.0\.0\.1:\d+",
        "connect": rf"{client}: connected",
        "login ok": rf"{client}: login ok \(scram-sha-256, pool myapp, transaction mode\)",
        "pool created": r"pool \S+ created",
        "server connection opened": r"pool \S+: server connection opened \(pid \d+",
        "disconnect with reason": rf"{client}: disconnected: client sent Terminate",
        "failed login with reason": rf"{client}: closing: 28P01 password authentication failed",
    }
    # the lines of both clients are written as halephant gets to them: wait for all, a while at most
    deadline = time.monotonic() + 10
    while True:
        log = running.log_text()
        missing = [what for what, pattern in expected.items() if not re.search(pattern, log)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert missing == [], log


def test_no_password_from_the_config_reaches_the_log(pg: Cluster, halephant: HalephantFactory) -> None:
    # a role of its own, so that its passwords are strings found nowhere else (not the user name)
    server_password = "Srv-pa55-Plugh-7f3a"
    client_password = "Cl1ent-pa55-Xyzzy-91c2"
    pg.create_role("halephant_logcheck", server_password)
    pg.primary.sql("GRANT CONNECT ON DATABASE myapp TO halephant_logcheck")
    verifier = pg.primary.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'myapp_ro'")
    assert verifier.startswith("SCRAM-SHA-256$")
    users: dict[str, Any] = {
        "halephant_logcheck": {"password": client_password, "server_password": server_password},
        "myapp_ro": {"password": verifier, "server_password": "myapp_ro"},
    }
    running = halephant.start(default_config(pg, users=users, logging={"level": "debug"}))
    dsn = running.dsn(user="halephant_logcheck", password=client_password)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select 1")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table")
    with psycopg.connect(running.dsn(user="myapp_ro", password="myapp_ro"), autocommit=True) as conn:
        conn.execute("select 1")
    for wrong in (server_password, client_password + "x"):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(running.dsn(user="halephant_logcheck", password=wrong))
    with RawClient(running.host, running.port) as client:
        # a login that fails after the SCRAM exchange, and a database that does not exist
        client.send(rc.startup({"user": "halephant_logcheck", "database": "nosuchdb"}))
        with pytest.raises(AssertionError, match="3D000"):
            client.authenticate("halephant_logcheck", client_password)
    running.stop()
    log = running.log_text()
    assert "login ok" in log  # the log is the one of these sessions
    _, iterations_and_salt, keys = verifier.split("$")
    salt = iterations_and_salt.split(":")[1]
    secrets = [server_password, client_password, verifier, salt, *keys.split(":")]
    leaked = [s for s in secrets if s in log]
    assert leaked == [], log
