"""End-to-end: `halephant demo` serves `myapp` from the primary and `myapp_ro` from the replica, the
example plugin examples/plugins/route_by_application_name.py overrides `halephant_route` on a real
primary + streaming replica, and examples/plugins/select_pool_by_prefix.py serves tenant databases that
`databases:` does not list."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from support.halephant import REPO_ROOT, HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster, free_port

pytestmark = pytest.mark.e2e

EXAMPLE_PLUGINS = REPO_ROOT / "examples" / "plugins"


def one(dsn: str, sql: str) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture
def report_routing(pg: Cluster, halephant: HalephantFactory) -> Iterator[Running]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(EXAMPLE_PLUGINS))
        run = halephant.start(default_config(pg, plugins={"modules": ["route_by_application_name"]}))
    yield run
    assert_clean_servers(pg)


@pytest.mark.parametrize("name", ["report-weekly", "reports"])
def test_the_example_plugin_sends_reports_to_the_replica(report_routing: Running, name: str) -> None:
    assert one(report_routing.dsn(application_name=name), "SELECT pg_is_in_recovery()") is True


@pytest.mark.parametrize("name", ["web", "", "my-report"])
def test_other_clients_are_left_to_the_default(report_routing: Running, name: str) -> None:
    assert one(report_routing.dsn(application_name=name), "SELECT pg_is_in_recovery()") is False


def test_the_tenant_example_serves_databases_databases_does_not_list(
    pg: Cluster, halephant: HalephantFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a pool chosen by a plugin for a database without an entry of its own follows the entry it names
    # (here databases.tenants): it is no "database removed from the configuration"
    pg.primary.sql("DROP DATABASE IF EXISTS tenant_acme; CREATE DATABASE tenant_acme OWNER myapp")
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE_PLUGINS))
    config = default_config(
        pg,
        databases={"tenants": {"cluster": "main", "pool_size": 2, "idle_timeout": "1s"}},
        plugins={"modules": ["select_pool_by_prefix"]},
    )
    run = halephant.start(config)
    try:
        with psycopg.connect(run.dsn(dbname="tenant_acme"), autocommit=True, connect_timeout=5) as conn:
            assert one_of(conn, "SELECT current_database()") == "tenant_acme"
            time.sleep(1.5)  # a sweep of the clients (once a second) leaves it alone
            assert one_of(conn, "SELECT current_database()") == "tenant_acme"
        assert "pool tenant_acme/myapp@" in run.log_text()
        assert "was removed from the halephant configuration" not in run.log_text()
        # any tenant_<name> makes pools: unused for the entry's idle_timeout, they are forgotten
        deadline = time.monotonic() + 10
        while "pools of tenant_acme/myapp forgotten: unused for 1 s" not in run.log_text():
            assert time.monotonic() < deadline, run.log_text()
            time.sleep(0.1)
        assert_clean_servers(pg)
    finally:
        run.stop()
        pg.primary.sql("DROP DATABASE IF EXISTS tenant_acme")


def one_of(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_halephant_demo_routes_myapp_ro_to_the_replica() -> None:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "halephant", "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    banner: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(banner)
        assert "Press Ctrl-C" in text, text
        dsns = re.findall(r'psql "([^"]+)"', text)
        writer = next(d for d in dsns if "user=myapp " in d and "dbname=myapp" in d and "session" not in d)
        reader = next(d for d in dsns if "user=myapp_ro " in d)
        assert one(writer + " sslmode=disable", "SELECT pg_is_in_recovery()") is False
        assert one(reader + " sslmode=disable", "SELECT pg_is_in_recovery()") is True
        assert one(reader + " sslmode=disable", "SELECT current_user") == "myapp"
        # the same through halephant's Unix-domain socket in the demo's directory
        over_socket = next(d for d in dsns if "host=/" in d)
        assert one(over_socket, "SELECT pg_is_in_recovery()") is False
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    # Ctrl-C leaves nothing behind: neither PostgreSQL's data nor the demo's halephant.yaml
    config = re.search(r"\(config: (\S+)\)", text)
    data = re.search(r"\(data in (\S+)\)", text)
    assert config is not None and data is not None, text
    assert not os.path.exists(config.group(1))
    assert not os.path.exists(os.path.dirname(config.group(1)))
    assert not os.path.exists(data.group(1))
