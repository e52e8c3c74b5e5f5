"""End-to-end: access rules in pg_hba.conf form (`plugins.hba.file`, the `hba` plugin) with psql, psycopg
and raw sockets in front of real PostgreSQL: database, user, address, connection type (TLS or not, the
Unix-domain socket) and method (trust, reject, passwords, cert) of the first matching line; a reload
that changes the rules, one that breaks them, and `halephant check` naming the bad line.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import rawclient as rc
import trustme
from rawclient import RawClient
from support.halephant import REPO_ROOT, HalephantFactory, Running, default_config, write_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

#: the plugin through `plugins.modules` where the installed distribution does not register it yet
MODULES = [] if any(ep.name == "hba" for ep in importlib.metadata.entry_points(group="halephant")) else [
    "halephant_plugins.hba"
]  # fmt: skip

RULES = """\
# halephant's test rules
local     myapp   myapp                      trust
host      all     myapp_ro   127.0.0.1/32    reject
hostssl   myapp   sslonly    127.0.0.1/32    scram-sha-256
hostnossl myapp   plainonly  127.0.0.1/32    scram-sha-256
host      myapp   myapp      127.0.0.1/32    scram-sha-256
host      myapp   addr       127.0.0.1/32    scram-sha-256
host      myapp   addr8      127.0.0.0/8     scram-sha-256
host      myapp   trusted    127.0.0.1       255.255.255.255   trust
hostssl   myapp   myapp,certuser  127.0.0.1/32  cert
"""
ALIASES = ("sslonly", "plainonly", "addr", "addr8", "trusted", "certuser")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("hba-pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "root.crt"))
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(root / "server.crt"))
    leaf.private_key_pem.write_to_path(str(root / "server.key"))
    (root / "server.key").chmod(0o600)
    tls = {"cert_file": str(root / "server.crt"), "key_file": str(root / "server.key")}
    return ca, root, tls


def client_cert(ca: trustme.CA, root: Path, cn: str) -> dict[str, str]:
    leaf = ca.issue_cert(f"{cn}.clients.example", common_name=cn)
    cert, key = root / f"client-{cn}.crt", root / f"client-{cn}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return {"sslcert": str(cert), "sslkey": str(key)}


@pytest.fixture(scope="module")
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="halephant-hba-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hba_config(pg: Cluster, hba_file: Path, **overrides: Any) -> dict[str, Any]:
    users = {name: {"password": f"{name}-pw", "server_user": "myapp"} for name in ALIASES}
    return default_config(
        pg,
        clusters={"main": {"probe_user": "myapp"}},
        databases={"myapp_session": {"cluster": "main", "database": "myapp", "mode": "session"}},
        users=users,
        plugins={"modules": MODULES, "hba": {"file": str(hba_file)}},
        **overrides,
    )


@pytest.fixture(scope="module")
def hal(
    pg: Cluster,
    module_halephant: HalephantFactory,
    tmp_path_factory: pytest.TempPathFactory,
    pki: tuple[trustme.CA, Path, dict[str, Any]],
    sockdir: Path,
) -> Running:
    """`client_tls.mode: prefer` (TLS optional, no client certificate asked for), the rules above."""
    path = tmp_path_factory.mktemp("hba") / "pg_hba.conf"
    path.write_text(RULES)
    return module_halephant.start(
        hba_config(pg, path, unix_socket_dir=str(sockdir), client_tls={"mode": "prefer", **pki[2]})
    )


@pytest.fixture(autouse=True)
def left_clean(pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(pg.primary)


def login(run: Running, user: str, password: str | None = None, **params: Any) -> str:
    """current_user through psycopg, or raise psycopg's error."""
    params.setdefault("dbname", "myapp")
    dsn = run.dsn(user=user, password=password, **params)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_user").fetchone()
        assert row is not None
        return str(row[0])


NO_ENTRY = "FATAL:  no pg_hba.conf entry for host"
NO_CERT = "FATAL:  connection requires a valid client certificate"


def refused(run: Running, user: str, password: str | None = None, **params: Any) -> str:
    """The error psycopg reports for a login that fails (it gives no SQLSTATE for a failed connection:
    the raw-socket tests check those)."""
    with pytest.raises(psycopg.OperationalError) as caught:
        login(run, user, password, **params)
    return str(caught.value)


def test_a_user_on_a_database_its_lines_do_not_name_gets_28000_at_once(hal: Running) -> None:
    assert login(hal, "myapp", "myapp") == "myapp"
    error = refused(hal, "myapp", "myapp", dbname="myapp_session", sslmode="disable")
    assert (
        'no pg_hba.conf entry for host "127.0.0.1", user "myapp", database "myapp_session", no encryption'
        in error
    ), error
    error = refused(hal, "myapp", "myapp", dbname="myapp_session", sslmode="require")
    assert ', database "myapp_session", SSL encryption' in error
    # told before any password is asked for, and the line that decided is in the log
    with RawClient(hal.host, hal.port) as raw:
        raw.send(rc.startup({"user": "myapp", "database": "myapp_session"}))
        message = raw.read()
        assert message.type == b"E" and message.fields["C"] == "28000", message
    assert "rejected: hba: no line of" in hal.log_text()


def test_a_reject_line(hal: Running) -> None:
    error = refused(hal, "myapp_ro", "myapp_ro", sslmode="disable")
    assert (
        'FATAL:  pg_hba.conf rejects connection for host "127.0.0.1", user "myapp_ro", database "myapp"'
        in error
    )
    assert "pg_hba.conf:3" in hal.log_text()


def test_hostssl_and_hostnossl(hal: Running) -> None:
    assert login(hal, "sslonly", "sslonly-pw", sslmode="require") == "myapp"
    assert NO_ENTRY in refused(hal, "sslonly", "sslonly-pw", sslmode="disable")
    assert login(hal, "plainonly", "plainonly-pw", sslmode="disable") == "myapp"
    assert NO_ENTRY in refused(hal, "plainonly", "plainonly-pw", sslmode="require")


def test_local_lines_over_the_unix_socket(hal: Running, sockdir: Path) -> None:
    # trust on the socket for myapp: no password
    with psycopg.connect(
        host=str(sockdir), port=hal.port, user="myapp", dbname="myapp", autocommit=True
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("myapp",)
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(host=str(sockdir), port=hal.port, user="addr", password="addr-pw", dbname="myapp")
    assert 'no pg_hba.conf entry for host "[local]", user "addr", database "myapp", no encryption' in str(
        caught.value
    )
    # over TCP myapp still needs its password
    assert "password authentication failed" in refused(hal, "myapp", "wrong", sslmode="disable")


def test_an_address_rule(hal: Running) -> None:
    with RawClient(hal.host, hal.port, source="127.0.0.2") as raw, pytest.raises(AssertionError):
        raw.login("addr", "addr-pw", "myapp")
    assert rc.errors(raw.last_session.messages)[-1]["M"] == (
        'no pg_hba.conf entry for host "127.0.0.2", user "addr", database "myapp", no encryption'
    )
    with RawClient(hal.host, hal.port, source="127.0.0.2") as raw:
        raw.login("addr8", "addr8-pw", "myapp")
        assert rc.errors(raw.simple_query("SELECT 1")) == []
    with RawClient(hal.host, hal.port) as raw:
        raw.login("addr", "addr-pw", "myapp")


def test_a_trust_line_asks_no_password(hal: Running) -> None:
    assert login(hal, "trusted", sslmode="disable") == "myapp"
    assert "login ok (trust" in hal.log_text()


def test_a_cert_line_fails_where_no_certificate_is_asked_for(
    hal: Running, pki: tuple[trustme.CA, Path, dict[str, Any]]
) -> None:
    # mode prefer asks for no client certificate: one the client would send is never verified
    error = refused(hal, "certuser", sslmode="require", **client_cert(pki[0], pki[1], "certuser"))
    assert NO_CERT in error
    assert "cert on line 10 can never let a client in: client_tls.mode is prefer" in hal.log_text()


def test_cert_lines_with_verified_client_certificates(
    pg: Cluster,
    halephant: HalephantFactory,
    tmp_path: Path,
    pki: tuple[trustme.CA, Path, dict[str, Any]],
) -> None:
    ca, root, tls = pki
    path = tmp_path / "pg_hba.conf"
    path.write_text(RULES)
    ca.cert_pem.write_to_path(str(root / "ca.crt"))
    run = halephant.start(
        hba_config(pg, path, client_tls={"mode": "verify-ca", "ca_file": str(root / "ca.crt"), **tls})
    )
    assert login(run, "certuser", sslmode="require", **client_cert(ca, root, "certuser")) == "myapp"
    assert "login ok (cert" in run.log_text()
    error = refused(run, "certuser", sslmode="require", **client_cert(ca, root, "someone"))
    assert 'certificate authentication failed for user "certuser"' in error
    # (verify-ca itself refuses a TLS client that sends no certificate, with the same words)
    error = refused(run, "certuser", sslmode="require")
    assert NO_CERT in error
    # a password line is unaffected by the certificate
    assert login(run, "sslonly", "sslonly-pw", sslmode="require", **client_cert(ca, root, "x")) == "myapp"


def test_reload_changes_the_rules_and_a_broken_file_is_refused(
    pg: Cluster, halephant: HalephantFactory, tmp_path: Path
) -> None:
    path = tmp_path / "pg_hba.conf"
    path.write_text(RULES)
    config = hba_config(pg, path)
    run = halephant.start(config)
    with psycopg.connect(run.dsn(user="myapp", dbname="myapp", password="myapp"), autocommit=True) as other:
        assert login(run, "addr", "addr-pw") == "myapp"
        path.write_text("host myapp addr 127.0.0.1/32 reject\n" + RULES)
        run.reload(config, "reload: done")
        assert "FATAL:  pg_hba.conf rejects connection" in refused(run, "addr", "addr-pw")
        path.write_text("host myapp addr 127.0.0.1/32 password\n" + RULES)
        log = run.reload(config, "still running with the previous configuration")
        assert f"{path}:1: method 'password' (cleartext) is not supported by halephant" in log
        assert "FATAL:  pg_hba.conf rejects connection" in refused(
            run, "addr", "addr-pw"
        )  # the rules of before stay
        assert login(run, "addr8", "addr8-pw") == "myapp"
        path.write_text(RULES)
        run.reload(config, "reload: done")
        assert login(run, "addr", "addr-pw") == "myapp"
        assert other.execute("SELECT 1").fetchone() == (1,)  # unaffected throughout


def test_check_reports_the_bad_line(pg: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "pg_hba.conf"
    path.write_text("# rules\nlocal all all trust\nhost all all all ident\n")
    config_path = tmp_path / "halephant.yaml"
    write_config(hba_config(pg, path), config_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "halephant", "check", "-c", str(config_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"plugins.hba.file: {path}:3: method 'ident' is not supported by halephant" in result.stderr, (
        result.stderr
    )
    assert "Traceback" not in result.stderr
