"""End-to-end: the Django project in examples/django, with the settings of halephant's Django page,
through halephant in transaction pooling on a real primary + streaming replica.

`migrate` runs on the primary; writes through `default` land on the primary; `pg_is_in_recovery()` is
true through `replica` and false through `default`; a write through `replica` fails with 25006 and the
connection stays usable; `manage.py test` creates and drops `test_myapp` through the catch-all entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from support.halephant import REPO_ROOT, HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

django = pytest.importorskip("django", reason="Django is in the test extras: pip install -e '.[test]'")

EXAMPLE = REPO_ROOT / "examples" / "django"


@pytest.fixture(scope="module")
def proxy(pg: Cluster, module_halephant: HalephantFactory) -> Iterator[Running]:
    config = default_config(
        pg,
        databases={"*": {"cluster": "main", "pool_size": 5}},
        users={"myapp_ro": {"password": "myapp_ro", "read_only": True, "server_user": "myapp"}},
        logging={"level": "debug"},
    )
    yield module_halephant.start(config)
    pg.primary.sql("DROP TABLE IF EXISTS notes_note, django_migrations", dbname="myapp")


@pytest.fixture(autouse=True)
def clean_afterwards(pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(pg)


def manage(proxy: Running, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HALEPHANT_PORT=str(proxy.port), PYTHONDONTWRITEBYTECODE="1")
    env.pop("DJANGO_SETTINGS_MODULE", None)
    proc = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_migrate_runs_on_the_primary(pg: Cluster, proxy: Running) -> None:
    out = manage(proxy, "migrate", "--noinput").stdout
    assert "Applying notes.0001_initial... OK" in out or "No migrations to apply" in out
    assert pg.primary.sql("SELECT to_regclass('notes_note') IS NOT NULL", dbname="myapp") == "t"


def test_the_seed_scenario(pg: Cluster, proxy: Running) -> None:
    manage(proxy, "migrate", "--noinput")
    results: dict[str, Any] = json.loads(manage(proxy, "routing_demo", "--json").stdout)
    assert results["default_in_recovery"] is False
    assert results["replica_in_recovery"] is True
    assert results["replica_write"] == "25006", results
    assert results["replica_usable_after"] is True
    # the write through default landed on the primary
    count = pg.primary.sql(f"SELECT count(*) FROM notes_note WHERE id = {results['note_id']}", dbname="myapp")
    assert count == "1"
    log = proxy.log_text()
    assert "replica: user myapp_ro is read-only" in log
    assert "primary: default route for myapp" in log


def test_manage_py_test_creates_and_drops_its_database_through_halephant(pg: Cluster, proxy: Running) -> None:
    proc = manage(proxy, "test", "notes", "--noinput", "-v", "2", timeout=180)
    assert "Ran 2 tests" in proc.stderr
    assert "OK" in proc.stderr
    assert pg.primary.sql("SELECT count(*) FROM pg_database WHERE datname = 'test_myapp'") == "0"
    assert "DROP DATABASE test_myapp: closing idle connections to it" in proxy.log_text()
