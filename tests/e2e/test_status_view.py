"""End to end: `halephant status` against a running halephant under pgbench load, as a script sees it
(`--once`, `--json`) and as an operator sees it in a terminal (tmux: refreshes in place, `q` quits)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from support.halephant import REPO_ROOT, HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster, find_bindir, free_port, pgbench

pytestmark = pytest.mark.e2e

BENCH_DB = "e2e_status_bench"


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    pg.create_database(BENCH_DB, owner="myapp")
    pgbench(pg.primary, "-i", "-q", "-s", "1", dbname=BENCH_DB, user="myapp")
    config = default_config(
        pg,
        databases={"bench": {"cluster": "main", "database": BENCH_DB, "pool_size": 3}},
        users={"admin": {"password": "admin-pw"}},
        admin={"users": ["admin"]},
    )
    return module_halephant.start(config)


def env() -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    # the test runner's own terminal size must not override the size of the terminal under test
    for name in ("NO_COLOR", "LINES", "COLUMNS"):
        out.pop(name, None)
    return out


def status(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "halephant", "status", *args],
        capture_output=True, text=True, timeout=30, env={**env(), "COLUMNS": str(columns)},
    )  # fmt: skip


@pytest.fixture
def load(hal: Running, pg: Cluster) -> Iterator[subprocess.Popen[str]]:
    """pgbench through halephant for the test's duration: 6 clients on a pool of 3, select-only."""
    argv = [
        str(find_bindir() / "pgbench"), "-h", hal.host, "-p", str(hal.port), "-U", "myapp",
        "-n", "-S", "-c", "6", "-j", "2", "-T", "60", "bench",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PGPASSWORD": "myapp", "PGSSLMODE": "disable"},
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        summary = hal.admin_json("/snapshot")["summary"]
        if summary["transactions_per_s"] > 0:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"pgbench did not get going: {proc.communicate()}")
    yield proc
    proc.terminate()
    proc.communicate(timeout=10)
    assert_clean_servers(pg)


@pytest.mark.parametrize("columns", [80, 160])
def test_once_prints_one_snapshot_under_load(hal: Running, load: subprocess.Popen[str], columns: int) -> None:
    assert hal.admin_url is not None
    result = status("--url", hal.admin_url, "--once", columns=columns)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert max(len(line) for line in out.splitlines()) <= columns
    rate = re.search(r"([\d,.]+) tx/s", out)
    assert rate and float(rate.group(1).replace(",", "")) > 0, out
    for title in ("Pools", "Nodes", "Clients", "Wait queues", "Recent decisions", "Errors sent"):
        assert title in out, title
    assert ("bench/myapp@" in out) if columns == 80 else ("bench" in out and "myapp" in out)
    assert "primary" in out and "replica" in out


def test_json_prints_the_raw_snapshot(hal: Running, load: subprocess.Popen[str]) -> None:
    assert hal.admin_url is not None
    result = status("--url", hal.admin_url.removeprefix("http://"), "--json")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    pools = [p for p in snapshot["pools"] if p["database"] == "bench"]
    assert pools and sum(p["transactions"] for p in pools) > 0
    assert sum(p["sv_active"] + p["sv_idle"] for p in pools) <= 3
    assert snapshot["clients_by_state"]["active"] + snapshot["clients_by_state"]["idle"] >= 1


def test_url_from_the_config_file(hal: Running) -> None:
    result = status("-c", str(hal.config_path), "--once")
    assert result.returncode == 0, result.stderr
    assert "Pools" in result.stdout


def test_into_a_pipe_it_prints_one_snapshot(hal: Running) -> None:
    # a live view into a pipe or a file would show nothing: without --once, one snapshot all the same
    assert hal.admin_url is not None
    result = status("--url", hal.admin_url)
    assert result.returncode == 0, result.stderr
    assert "Pools" in result.stdout


def test_unreachable_admin_api_is_a_clear_error() -> None:
    result = status("--url", f"http://127.0.0.1:{free_port()}", "--once")
    assert result.returncode == 1
    assert "cannot read http://127.0.0.1:" in result.stderr and "/snapshot" in result.stderr


# --- in a terminal -----------------------------------------------------------------------------------------


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux) and is needed to test the live view")
    socket = f"halephant-status-{uuid.uuid4().hex[:8]}"
    base = ["tmux", "-L", socket, "-f", "/dev/null"]
    yield base
    subprocess.run([*base, "kill-server"], capture_output=True, timeout=10)


def capture(base: list[str]) -> str:
    return subprocess.run(
        [*base, "capture-pane", "-p", "-t", "view"], capture_output=True, text=True, timeout=10
    ).stdout


def wait_for(base: list[str], pattern: str, timeout: float = 15.0, unlike: str | None = None) -> str:
    """The first screen that matches `pattern` (and differs from `unlike`)."""
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = capture(base)
        if re.search(pattern, screen) and screen != unlike:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared; screen:\n{screen}")


def alive(base: list[str]) -> bool:
    found = subprocess.run([*base, "has-session", "-t", "view"], capture_output=True, timeout=10)
    return found.returncode == 0


@pytest.mark.parametrize("columns", [80, 160])
def test_live_view_in_tmux_refreshes_in_place_and_q_quits(
    hal: Running, load: subprocess.Popen[str], tmux: list[str], columns: int
) -> None:
    assert hal.admin_url is not None
    command = f"{sys.executable} -m halephant status --url {hal.admin_url} --interval 0.5"
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "view", "-x", str(columns), "-y", "60", command],
        check=True, timeout=10, env=env(),
    )  # fmt: skip
    first = wait_for(tmux, r"[1-9][\d,]*\.\d tx/s")
    assert "Pools" in first and "q: quit" in first, first
    # refreshed in place: a later screen (the header's uptime and rates change), drawn to its last
    # section (a capture may catch a redraw half done), shows the view once
    second = wait_for(tmux, r"(?s)tx/s.*Recent decisions", unlike=first)
    assert second.count("Pools") == 1 and second.count("Recent decisions") == 1
    assert max(len(line.rstrip()) for line in second.splitlines()) <= columns
    assert "bench" in second
    subprocess.run([*tmux, "send-keys", "-t", "view", "q"], check=True, timeout=10)
    deadline = time.monotonic() + 10
    while alive(tmux) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(tmux), "q did not quit halephant status"


def test_live_view_ctrl_c_quits(hal: Running, tmux: list[str]) -> None:
    assert hal.admin_url is not None
    command = f"{sys.executable} -m halephant status --url {hal.admin_url}"
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "view", "-x", "80", "-y", "50", command],
        check=True, timeout=10, env=env(),
    )  # fmt: skip
    wait_for(tmux, r"Pools")
    subprocess.run([*tmux, "send-keys", "-t", "view", "C-c"], check=True, timeout=10)
    deadline = time.monotonic() + 10
    while alive(tmux) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(tmux), "Ctrl-C did not quit halephant status"
