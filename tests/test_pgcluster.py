"""Tests of the test infrastructure: throwaway clusters (`halephant.testing.pgcluster`), the session cluster's
roles and auth methods, the leak oracle, and the halephant process factory (driven by a stand-in program).
"""

from __future__ import annotations

import pathlib
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator

import psycopg
import pytest
from ruamel.yaml import YAML
from support.cluster import ROLE_PASSWORDS
from support.halephant import HalephantDidNotStart, HalephantFactory, default_config, write_config
from support.leaks import assert_clean_servers
from support.tls import CERT_USER, SERVER_NAME, TlsFiles

from halephant.testing import pgcluster
from halephant.testing.pgcluster import Cluster, PgError, PgNotFound, conninfo, find_bindir, free_port

pytestmark = pytest.mark.e2e


# --- binaries, ports, connection strings ------------------------------------------------------------------


def test_find_bindir_has_the_server_programs() -> None:
    bindir = find_bindir()
    for program in ("initdb", "pg_ctl", "psql", "pg_basebackup"):
        assert (bindir / program).exists(), program


def test_find_bindir_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("HALEPHANT_PGBIN", str(tmp_path))
    with pytest.raises(PgNotFound) as info:
        find_bindir()
    assert "apt-get install -y postgresql" in str(info.value)
    assert "HALEPHANT_PGBIN" in str(info.value)


def test_free_port_is_bindable_and_never_a_default_port() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    assert not ports & {5432, 6432}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))


def test_conninfo_quotes_what_libpq_needs_quoted() -> None:
    assert conninfo(host="127.0.0.1", port=5, password="it's a \\ pw", dbname=None) == (
        "host=127.0.0.1 port=5 password='it\\'s a \\\\ pw'"
    )
    assert conninfo(password="") == "password=''"


# --- the session cluster ----------------------------------------------------------------------------------


def test_primary_and_replica_recovery_state(pg: Cluster) -> None:
    assert [node.name for node in pg.nodes] == ["primary", "replica1"]
    assert pg.primary.is_in_recovery() is False
    assert pg.replicas[0].is_in_recovery() is True
    assert pg.primary.sql("SHOW fsync") == "off"


def test_roles_and_database_created_on_primary_appear_on_replica(pg: Cluster) -> None:
    replica = pg.replicas[0]
    roles = replica.sql("SELECT rolname FROM pg_roles WHERE rolname NOT LIKE 'pg\\_%' ORDER BY 1").split()
    assert set(ROLE_PASSWORDS) <= set(roles)
    assert replica.sql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'myapp'") == "myapp"
    stored = dict(
        line.split("|")
        for line in replica.sql(
            "SELECT rolname, left(rolpassword, 5) FROM pg_authid WHERE rolname IN ('myapp', 'md5user')"
        ).splitlines()
    )
    assert stored == {"myapp": "SCRAM", "md5user": "md5" + stored["md5user"][3:]}


def test_create_role_and_database_are_idempotent(pg: Cluster) -> None:
    name = 'odd "role" o\'neil'
    try:
        for _ in range(2):
            pg.create_role(name, "pw'1", createdb=True)
            pg.create_database("odd db", owner=name)
        assert (
            pg.primary.sql(
                f"SELECT rolcreatedb FROM pg_roles WHERE rolname = '{name.replace(chr(39), chr(39) * 2)}'"
            )
            == "t"
        )
        pg.wait_replicated()
        assert pg.replicas[0].sql("SELECT count(*) FROM pg_database WHERE datname = 'odd db'") == "1"
    finally:
        pg.primary.sql('DROP DATABASE IF EXISTS "odd db"')
        pg.primary.sql('DROP ROLE IF EXISTS "odd ""role"" o\'\'neil"')


@pytest.mark.parametrize(
    ("user", "method"),
    [("myapp", "scram-sha-256"), ("myapp_ro", "scram-sha-256"), ("md5user", "md5"),
     ("plainuser", "password"), ("trustuser", "trust")],
)  # fmt: skip
def test_each_role_logs_in_over_tcp_with_its_method(pg: Cluster, user: str, method: str) -> None:
    for node in pg.nodes:
        with psycopg.connect(node.dsn(user, ROLE_PASSWORDS[user], "myapp"), connect_timeout=10) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)
    rule = pg.primary.sql(f"SELECT auth_method FROM pg_hba_file_rules WHERE '{user}' = ANY(user_name)")
    assert rule == (method if method != "scram-sha-256" else "")
    if method != "trust":
        with pytest.raises(psycopg.OperationalError, match="authentication failed"):
            psycopg.connect(pg.primary.dsn(user, "wrong", "myapp"), connect_timeout=10).close()


def test_ssl_is_off_unless_asked_for(pg: Cluster) -> None:
    # what every test, the demo and the benchmarks run against: plaintext, as before ServerSsl existed
    assert pg.primary.sql("SHOW ssl") == "off"
    assert not (pg.primary.datadir / pgcluster.SSL_KEY_FILE).exists()
    assert "hostssl" not in (pg.primary.datadir / "pg_hba.conf").read_text()


def test_a_tls_cluster_takes_tcp_logins_over_tls_only(tls_pg: Cluster, tls_files: TlsFiles) -> None:
    node = tls_pg.primary
    assert node.sql("SHOW ssl") == "on"
    key = (node.datadir / pgcluster.SSL_KEY_FILE).stat()
    assert (key.st_mode & 0o777, key.st_uid) == (0o600, tls_pg._pg.user.uid)
    plain = conninfo(host=node.host, port=node.port, user="myapp", password="myapp", dbname="myapp")
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(plain + " sslmode=disable", connect_timeout=10).close()
    # the certificate names localhost, signed by the CA
    verified = conninfo(
        host=SERVER_NAME, port=node.port, user="myapp", password="myapp", dbname="myapp",
        sslmode="verify-full", sslrootcert=tls_files.ca_file,
    )  # fmt: skip
    with psycopg.connect(verified, connect_timeout=10) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)
    with psycopg.connect(node.dsn("md5user", "md5user", "myapp"), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5user",)  # the test roles' own methods
    # certuser: its client certificate, no password
    cert = conninfo(
        host=node.host, port=node.port, user=CERT_USER, dbname="myapp", sslmode="require",
        sslcert=tls_files.cert_file, sslkey=tls_files.key_file,
    )  # fmt: skip
    with psycopg.connect(cert, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (CERT_USER,)
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        psycopg.connect(node.dsn(CERT_USER, None, "myapp"), connect_timeout=10).close()


def test_read_only_role_reads_what_myapp_creates(pg: Cluster) -> None:
    pg.primary.sql(
        "CREATE TABLE ro_check (x int); INSERT INTO ro_check VALUES (7)", dbname="myapp", user="myapp"
    )
    try:
        pg.wait_replicated()
        assert pg.replicas[0].sql("SELECT x FROM ro_check", dbname="myapp", user="myapp_ro") == "7"
    finally:
        pg.primary.sql("DROP TABLE ro_check", dbname="myapp", user="myapp")


def test_sql_failure_raises_with_stderr(pg: Cluster) -> None:
    with pytest.raises(PgError, match="division by zero") as info:
        pg.primary.sql("SELECT 1/0")
    assert info.value.returncode != 0


def test_leak_oracle_sees_open_transactions_and_advisory_locks(pg: Cluster) -> None:
    assert_clean_servers(pg)
    with psycopg.connect(pg.primary.dsn("myapp", "myapp", "myapp"), application_name="leaky") as conn:
        conn.execute("SELECT 1")  # psycopg opens a transaction: now idle in transaction
        with pytest.raises(AssertionError, match=r"(?s)idle in transaction.*SELECT 1"):
            assert_clean_servers(pg, timeout=0.2)
        conn.commit()
        conn.autocommit = True
        conn.execute("SELECT pg_advisory_lock(4242)")
        with pytest.raises(AssertionError, match=r"app='leaky' holds advisory lock.*objid=4242"):
            assert_clean_servers(pg.primary, timeout=0.2)
        conn.execute("SELECT pg_advisory_unlock(4242)")
        assert_clean_servers(pg, timeout=0.2)


# --- clusters of our own ----------------------------------------------------------------------------------


def _postmaster_pid(datadir: pathlib.Path) -> int:
    return int((datadir / "postmaster.pid").read_text().split()[0])


def _alive(pid: int) -> bool:
    # The postmaster removes its pid file (all `pg_ctl stop -w` waits for) a moment before it exits, and
    # whoever adopted it may take a while to reap it: a zombie counts as gone.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.01)
    return True


def test_stop_start_promote_destroy() -> None:
    cluster = Cluster.start(replicas=1, settings={"log_connections": True, "work_mem": "8MB"})
    with cluster:
        primary, replica = cluster.nodes
        assert replica.sql("SHOW work_mem") == "8MB"
        assert replica.sql("SHOW max_connections") == "200"
        pids = [_postmaster_pid(node.datadir) for node in cluster.nodes]

        primary.stop()
        assert not primary.is_running
        primary.start()
        assert primary.is_running

        replica.promote()
        assert replica.is_in_recovery() is False
        replica.sql("CREATE TABLE written_after_promotion ()")
        assert primary.is_in_recovery() is False  # both claim to be primaries now (see the design notes)
        assert "connection authorized" in replica.log_text()
    assert not cluster.base_dir.exists()
    assert not any(_alive(pid) for pid in pids)


def test_port_race_moves_to_another_port(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = pathlib.Path(tempfile.mkdtemp())
    parent.chmod(0o755)  # the PostgreSQL OS user must be able to reach base_dir
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    handed = iter([taken.getsockname()[1]])
    real_free_port = pgcluster.free_port
    monkeypatch.setattr(pgcluster, "free_port", lambda: next(handed, None) or real_free_port())
    try:
        with Cluster.start(replicas=0, base_dir=parent / "given") as cluster:
            assert cluster.primary.port != taken.getsockname()[1]
            assert cluster.primary.sql("SELECT 1") == "1"
            assert cluster.base_dir == parent / "given"
        assert not (parent / "given").exists()
    finally:
        taken.close()
        shutil.rmtree(parent)


# --- the halephant process factory, with a stand-in for halephant -----------------------------------------

FAKE_HALEPHANT = """
import socket, sys, time
from ruamel.yaml import YAML
assert sys.argv[1:3] == ["run", "-c"], sys.argv
config = YAML(typ="safe", pure=True).load(open(sys.argv[3]))
if config.get("fail"):
    print("config is broken", flush=True)
    sys.exit(3)
host, port = config["listen"].rsplit(":", 1)
time.sleep(0.2)
server = socket.create_server((host, int(port)))
admin = (config.get("admin") or {}).get("listen")
if admin:  # the factory waits for the admin API's port too
    admin_host, admin_port = admin.rsplit(":", 1)
    admin_server = socket.create_server((admin_host, int(admin_port)))
print("listening on", port, flush=True)
admin = (config.get("admin") or {}).get("listen")
if admin:  # the factory waits for the admin API's port too
    admin_host, admin_port = admin.rsplit(":", 1)
    admin_server = socket.create_server((admin_host, int(admin_port)))
while True:
    server.accept()[0].close()
"""


@pytest.fixture
def fake_factory(tmp_path: pathlib.Path) -> Iterator[HalephantFactory]:
    program = tmp_path / "fake_halephant.py"
    program.write_text(textwrap.dedent(FAKE_HALEPHANT))
    factory = HalephantFactory(tmp_path / "work", argv=[sys.executable, str(program)])
    yield factory
    factory.stop_all()


def test_factory_writes_config_waits_for_the_port_and_stops(
    fake_factory: HalephantFactory, pg: Cluster
) -> None:
    wanted = default_config(pg, databases={"myapp": {"pool_size": 2}})
    wanted["admin"] = {"listen": None}  # the fake serves no admin API: do not wait for one
    running = fake_factory.start(wanted)
    config = YAML(typ="safe", pure=True).load(running.config_path)
    assert config["listen"] == f"127.0.0.1:{running.port}"
    assert config["clusters"]["main"]["nodes"] == [f"127.0.0.1:{n.port}" for n in pg.nodes]
    assert config["databases"] == {"myapp": {"cluster": "main", "pool_size": 2}}
    assert set(config["users"]) == {"myapp", "myapp_ro"}
    socket.create_connection((running.host, running.port), timeout=5).close()
    assert f"listening on {running.port}" in running.log_text()
    assert running.dsn(application_name="x y") == (
        f"host=127.0.0.1 port={running.port} user=myapp password=myapp dbname=myapp sslmode=disable "
        "application_name='x y'"
    )
    assert running.stop() == -signal.SIGTERM
    assert not running.alive


def test_factory_reports_a_process_that_exits(fake_factory: HalephantFactory) -> None:
    with pytest.raises(HalephantDidNotStart, match=r"(?s)status 3.*config is broken"):
        fake_factory.start({"fail": True, "listen": f"127.0.0.1:{free_port()}"})


def test_default_config_overrides_merge_and_none_removes(pg: Cluster) -> None:
    config = default_config(pg, users={"myapp_ro": None}, listen="127.0.0.1:1")
    assert set(config["users"]) == {"myapp"}
    assert config["listen"] == "127.0.0.1:1"
    assert default_config(pg)["users"]["myapp_ro"] == {"password": "myapp_ro", "auth": "scram-sha-256"}


def test_default_config_is_a_valid_halephant_config(pg: Cluster, tmp_path: pathlib.Path) -> None:
    from halephant.config import load_config

    path = tmp_path / "halephant.yaml"
    write_config({**default_config(pg), "listen": f"127.0.0.1:{free_port()}"}, path)
    config = load_config(path)
    assert [node.port for node in config.clusters["main"].nodes] == [node.port for node in pg.nodes]
    assert config.users["myapp_ro"].password == "myapp_ro"
