"""Fixtures shared by every test: the session's PostgreSQL cluster (`pg`) and the `halephant` process factory.

When a test fails, the report gets the logs of the halephant processes it started and what the PostgreSQL
nodes logged during the test, so a failure in CI can be read without rerunning it.

The PostgreSQL data directories go to /dev/shm when it has room to spare (HALEPHANT_PG_TMPDIR, unless
already set): creating files there costs next to nothing, where a slow disk took up to a second for each
node's copy of the template (and as long again for each CREATE DATABASE).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator

import pytest
from support import forkserver
from support.cluster import start_test_cluster
from support.halephant import HalephantFactory
from support.tls import TlsFiles, start_tls_cluster

from halephant.testing.pgcluster import Cluster, PgNotFound

PG_CLUSTER = pytest.StashKey[Cluster]()
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
FACTORY = pytest.StashKey[HalephantFactory]()
PG_LOG_OFFSETS = pytest.StashKey[dict[str, int]]()
PYCACHE = pytest.StashKey[tuple[str, str]]()
PG_TMPDIR = pytest.StashKey[bool]()

#: Lines of each log attached to a failed test's report.
LOG_TAIL_LINES = 400
#: The tmpfs for data directories, used when at least this much of it is free (a test's temporary files
#: from a big sort or result can take a gigabyte for a moment).
SHM = "/dev/shm"
SHM_MIN_FREE = 4 << 30


def _roomy_tmpfs(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= SHM_MIN_FREE


def pytest_configure(config: pytest.Config) -> None:
    # The tests start a few hundred Python interpreters (halephant, its CLI): with
    # PYTHONDONTWRITEBYTECODE, each compiled every module of halephant again, a tenth of a second of
    # each start. They share a bytecode cache of their own instead, outside the working tree.
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
        prefix = tempfile.mkdtemp(prefix="halephant-test-pycache-")
        config.stash[PYCACHE] = (prefix, os.environ.pop("PYTHONDONTWRITEBYTECODE"))
        os.environ["PYTHONPYCACHEPREFIX"] = prefix
    if not os.environ.get("HALEPHANT_PG_TMPDIR") and _roomy_tmpfs(SHM):
        config.stash[PG_TMPDIR] = True
        os.environ["HALEPHANT_PG_TMPDIR"] = SHM


def pytest_unconfigure(config: pytest.Config) -> None:
    forkserver.close()
    saved = config.stash.get(PYCACHE, None)
    if saved is not None:
        prefix, dont_write = saved
        os.environ["PYTHONDONTWRITEBYTECODE"] = dont_write
        os.environ.pop("PYTHONPYCACHEPREFIX", None)
        shutil.rmtree(prefix, ignore_errors=True)
    if config.stash.get(PG_TMPDIR, False):
        os.environ.pop("HALEPHANT_PG_TMPDIR", None)


@pytest.fixture(scope="session")
def pg(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A primary and one streaming replica with the test roles (see `support.cluster`), for the session."""
    try:
        cluster = start_test_cluster(replicas=1)
    except PgNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    request.config.stash[PG_CLUSTER] = cluster
    yield cluster
    del request.config.stash[PG_CLUSTER]
    cluster.destroy()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA and the PEM files halephant's `tls:` settings name (see `support.tls`)."""
    return TlsFiles.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_pg(tls_files: TlsFiles) -> Iterator[Cluster]:
    """A one-node cluster with ssl = on whose TCP logins must be over TLS (`support.tls`), for the
    session: the test roles, the `myapp` database, and `certuser` (client certificate logins)."""
    try:
        cluster = start_tls_cluster(tls_files)
    except PgNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    cluster.destroy()


@pytest.fixture
def halephant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HalephantFactory]:
    """Start halephant processes with ``halephant.start(config)``; all are stopped after the test."""
    factory = HalephantFactory(tmp_path_factory.mktemp("halephant"))
    request.node.stash[FACTORY] = factory
    yield factory
    factory.stop_all()


def _tail(text: str) -> str:
    lines = text.splitlines()
    if len(lines) <= LOG_TAIL_LINES:
        return text
    return f"[... {len(lines) - LOG_TAIL_LINES} earlier lines ...]\n" + "\n".join(lines[-LOG_TAIL_LINES:])


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep: pytest.TestReport = yield
    item.stash.setdefault(REPORTS, {})[rep.when] = rep
    setattr(item, f"rep_{rep.when}", rep)  # the classic recipe: `request.node.rep_call.failed`
    cluster = item.config.stash.get(PG_CLUSTER, None)
    if rep.when == "setup" and cluster is not None:
        # What the nodes log from here on belongs to this test.
        item.stash[PG_LOG_OFFSETS] = {str(n.log_path): _size(str(n.log_path)) for n in cluster.nodes}
    if rep.failed and rep.when in ("setup", "call"):
        factory = item.stash.get(FACTORY, None)
        for n, running in enumerate(factory.started if factory else [], 1):
            rep.sections.append((f"halephant #{n} log ({running!r})", _tail(running.log_text())))
        if cluster is not None and {"pg", "halephant"} & set(getattr(item, "fixturenames", ())):
            offsets = item.stash.get(PG_LOG_OFFSETS, {})
            for node in cluster.nodes:
                text = _read_from(str(node.log_path), offsets.get(str(node.log_path), 0))
                text = _tail(text) if text.strip() else "(nothing logged during this test)"
                rep.sections.append((f"PostgreSQL {node.name} log ({node.host}:{node.port})", text))
    return rep


def _size(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.seek(0, 2)
    except FileNotFoundError:
        return 0
