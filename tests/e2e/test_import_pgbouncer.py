"""End-to-end: a PgBouncer set-up converted by `halephant import-pgbouncer` serves clients as it did.

The pgbouncer.ini and userlist.txt are written as a production PgBouncer in front of the test cluster
would have them (the role's SCRAM verifier from pg_authid, no plaintext password anywhere, as
`bench/bench.py` sets PgBouncer up); the command's output is started as it is, and a psycopg client logs
in through it with the role's password.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import psycopg
import pytest
from ruamel.yaml import YAML
from support.halephant import REPO_ROOT, HalephantFactory
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster, free_port

pytestmark = pytest.mark.e2e


def test_converted_pgbouncer_config_serves_clients(
    pg: Cluster, halephant: HalephantFactory, tmp_path: pathlib.Path
) -> None:
    verifier = pg.primary.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'myapp'")
    assert verifier.startswith("SCRAM-SHA-256$")
    (tmp_path / "userlist.txt").write_text(f'"myapp" "{verifier}"\n')
    port = free_port()
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        f"""\
[databases]
myapp = host={pg.primary.host} port={pg.primary.port} dbname=myapp pool_size=3

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {tmp_path}/userlist.txt
pool_mode = transaction
max_client_conn = 200
ignore_startup_parameters = extra_float_digits,options
logfile = {tmp_path}/pgbouncer.log
log_connections = 0
"""
    )
    out = tmp_path / "halephant.yaml"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    )
    result = subprocess.run(
        [sys.executable, "-m", "halephant", "import-pgbouncer", str(ini), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "ignore_startup_parameters" in result.stderr  # noted, and in the file's header too
    config = YAML(typ="safe", pure=True).load(out.read_text())
    assert config["listen"] == f"127.0.0.1:{port}"
    assert config["users"]["myapp"]["password"] == verifier  # no plaintext password kept

    running = halephant.start(config)
    with psycopg.connect(
        host="127.0.0.1",
        port=running.port,
        dbname="myapp",
        user="myapp",
        password="myapp",
        connect_timeout=10,
    ) as conn:
        row = conn.execute("SELECT current_user, current_database(), 6 * 7").fetchone()
        assert row == ("myapp", "myapp", 42)
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS t (x int) ON COMMIT DROP")
            conn.execute("INSERT INTO t VALUES (1)")
    assert_clean_servers(pg)
