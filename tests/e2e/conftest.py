"""Fixtures for the end-to-end tests in tests/e2e: a module-scoped halephant factory and client helpers.

The top-level `halephant` fixture stops its processes after each test; most e2e modules run many tests
against one configuration, so `module_halephant` keeps the processes it starts for the whole module.
A failed test's report gets the logs of the module's halephant processes, as the top-level conftest
does for the function-scoped ones.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Protocol

import pytest
from support.halephant import HalephantFactory, Running

from halephant.testing.pgcluster import Cluster, find_bindir

MODULE_FACTORY = pytest.StashKey[HalephantFactory]()

#: Lines of a halephant log attached to a failed test's report.
LOG_TAIL_LINES = 300


@pytest.fixture(scope="module")
def module_halephant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HalephantFactory]:
    """Like `halephant`, but its processes run until the module's last test has finished."""
    factory = HalephantFactory(tmp_path_factory.mktemp("halephant-module"))
    request.node.stash[MODULE_FACTORY] = factory
    yield factory
    factory.stop_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep: pytest.TestReport = yield
    if rep.failed and rep.when in ("setup", "call"):
        module = item.getparent(pytest.Module)
        factory = module.stash.get(MODULE_FACTORY, None) if module is not None else None
        if factory is not None and "module_halephant" in getattr(item, "fixturenames", ()):
            for n, running in enumerate(factory.started, 1):
                lines = running.log_text().splitlines()[-LOG_TAIL_LINES:]
                rep.sections.append((f"module halephant #{n} log ({running!r})", "\n".join(lines)))
    return rep


# --- helpers, handed to tests as fixtures (a conftest is not importable as a module) ---------------------


def pg_bin(name: str) -> str:
    """The path of a PostgreSQL client program (psql, pgbench) of the installed version."""
    return str(find_bindir() / name)


def _run_client(
    program: str,
    run: Running,
    args: Sequence[str],
    *,
    user: str = "myapp",
    password: str = "myapp",
    dbname: str = "myapp",
    input: str | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run psql or pgbench through halephant over TCP; the password goes in PGPASSWORD."""
    env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    argv = [pg_bin(program), "-h", run.host, "-p", str(run.port), "-U", user, *args, dbname]
    return subprocess.run(argv, input=input, capture_output=True, text=True, env=env, timeout=timeout)


def _backend_pids(pg: Cluster, dbname: str, user: str = "myapp") -> list[int]:
    out = pg.primary.sql(
        # halephant connects over TCP; this query's own psql comes over the unix socket (client_addr NULL).
        # application_name cannot tell: halephant applies each client's own while it serves that client.
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
        f"AND client_addr IS NOT NULL AND datname = '{dbname}' AND usename = '{user}' ORDER BY pid"
    )
    return [int(line) for line in out.splitlines() if line.strip()]


class ClientRunner(Protocol):
    def __call__(
        self,
        program: str,
        run: Running,
        args: Sequence[str],
        *,
        user: str = ...,
        password: str = ...,
        dbname: str = ...,
        input: str | None = ...,
        timeout: float = ...,
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="session")
def run_client() -> ClientRunner:
    """``run_client("psql", run, [args...], input=...)``: psql or pgbench through halephant, the password
    in PGPASSWORD."""
    return _run_client


@pytest.fixture(scope="session")
def backend_pids(pg: Cluster) -> Callable[..., list[int]]:
    """``backend_pids(dbname, user="myapp")``: pids of TCP connections for that database and user on the
    primary (halephant's server connections, when the test connects nothing else directly), sorted."""
    return functools.partial(_backend_pids, pg)
