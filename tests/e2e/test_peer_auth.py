"""End-to-end: pg_hba.conf's `peer` on halephant's Unix-domain socket (`plugins.hba.file` with
`plugins.hba.ident_file`), in front of real PostgreSQL, with psycopg, psql and raw sockets: the test
process's operating system user logs in as itself, a map lets it in under other names (a name, a
regular expression with `\\1`), and everything else gets PostgreSQL's FATAL 28000 with the reason in the
log; `peer` on a TCP line and a bad map line are refused by `halephant check` at their FILE:LINE.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
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
from rawclient import RawClient
from support.halephant import REPO_ROOT, HalephantFactory, Running, default_config, write_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster, find_bindir

pytestmark = pytest.mark.e2e

#: the plugin through `plugins.modules` where the installed distribution does not register it yet
MODULES = [] if any(ep.name == "hba" for ep in importlib.metadata.entry_points(group="halephant")) else [
    "halephant_plugins.hba"
]  # fmt: skip

#: who the test process is, as the kernel tells halephant at the other end of the socket
OS_USER = pwd.getpwuid(os.geteuid()).pw_name
#: a user id no one has (no name in the user database)
NO_SUCH_UID = 54321

RULES = f"""\
local  myapp  "{OS_USER}"                   peer
local  myapp  mapped,refused                 peer map=staff
local  myapp  "{OS_USER}_rx",someone_rx      peer   map=rx
local  myapp  myapp                          peer
"""
IDENT = f"""\
# MAPNAME  SYSTEM-USERNAME  PG-USERNAME
staff      "{OS_USER}"      mapped
staff      someone-else     refused
rx         /^(.+)$          \\1_rx
"""
#: clients log in under these names; halephant logs in upstream as myapp (`server_user`)
ALIASES = (OS_USER, "mapped", "refused", f"{OS_USER}_rx", "someone_rx")


def peer_config(pg: Cluster, sockdir: Path, hba_file: Path, ident_file: Path) -> dict[str, Any]:
    users = {name: {"password": "unused-pw", "server_user": "myapp"} for name in ALIASES}
    return default_config(
        pg,
        unix_socket_dir=str(sockdir),
        clusters={"main": {"probe_user": "myapp"}},
        users=users,
        plugins={"modules": MODULES, "hba": {"file": str(hba_file), "ident_file": str(ident_file)}},
    )


@pytest.fixture(scope="module")
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="halephant-peer-"))
    path.chmod(0o755)  # (a client of another user id reaches the socket too)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def hal(
    pg: Cluster, module_halephant: HalephantFactory, tmp_path_factory: pytest.TempPathFactory, sockdir: Path
) -> Running:
    root = tmp_path_factory.mktemp("peer")
    (root / "pg_hba.conf").write_text(RULES)
    (root / "pg_ident.conf").write_text(IDENT)
    return module_halephant.start(peer_config(pg, sockdir, root / "pg_hba.conf", root / "pg_ident.conf"))


@pytest.fixture(autouse=True)
def left_clean(pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(pg.primary)


def login(run: Running, sockdir: Path, user: str) -> tuple[str, int]:
    """current_user and a query's answer over halephant's socket, with no password, or psycopg's error."""
    with psycopg.connect(
        host=str(sockdir), port=run.port, user=user, dbname="myapp", autocommit=True, connect_timeout=10
    ) as conn:
        row = conn.execute("SELECT current_user, 6 * 7").fetchone()
        assert row is not None
        return str(row[0]), int(row[1])


def refusal(run: Running, sockdir: Path, user: str) -> dict[str, str]:
    """The ErrorResponse fields a raw login as `user` over the socket gets."""
    with RawClient("", run.port, unix=str(sockdir / f".s.PGSQL.{run.port}")) as raw:
        raw.send(rc.startup({"user": user, "database": "myapp"}))
        message = raw.read()
    assert message.type == b"E", message
    return message.fields


def test_the_os_user_logs_in_as_itself(hal: Running, sockdir: Path) -> None:
    assert login(hal, sockdir, OS_USER) == ("myapp", 42)
    assert "login ok (peer" in hal.log_text()


def test_another_user_name_without_a_map_is_refused(hal: Running, sockdir: Path) -> None:
    fields = refusal(hal, sockdir, "myapp")
    assert (fields["S"], fields["C"], fields["M"]) == (
        "FATAL", "28000", 'Peer authentication failed for user "myapp"'
    )  # fmt: skip
    with pytest.raises(psycopg.OperationalError) as caught:
        login(hal, sockdir, "myapp")
    assert 'FATAL:  Peer authentication failed for user "myapp"' in str(caught.value)
    assert (
        f"provided user name (myapp) and authenticated user name ({OS_USER}) do not match "
        "(hba: peer by" in hal.log_text()
    )


def test_a_map_allows_its_pairs_only(hal: Running, sockdir: Path) -> None:
    assert login(hal, sockdir, "mapped") == ("myapp", 42)
    fields = refusal(hal, sockdir, "refused")
    assert (fields["C"], fields["M"]) == ("28000", 'Peer authentication failed for user "refused"')
    assert f'no match in usermap "staff" for user "refused" authenticated as "{OS_USER}"' in hal.log_text()


def test_a_regular_expression_map_line(hal: Running, sockdir: Path) -> None:
    assert login(hal, sockdir, f"{OS_USER}_rx") == ("myapp", 42)
    fields = refusal(hal, sockdir, "someone_rx")
    assert (fields["C"], fields["M"]) == ("28000", 'Peer authentication failed for user "someone_rx"')
    assert f'no match in usermap "rx" for user "someone_rx" authenticated as "{OS_USER}"' in hal.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting under another user id needs root")
def test_a_user_id_with_no_name_is_refused(hal: Running, sockdir: Path) -> None:
    # psql run under a user id the user database does not know
    result = subprocess.run(
        [str(find_bindir() / "psql"), "-X", "-h", str(sockdir), "-p", str(hal.port), "-U", OS_USER,
         "-d", "myapp", "-c", "SELECT 1"],
        capture_output=True, text=True, timeout=30, user=NO_SUCH_UID, cwd="/",
        env={"PATH": os.environ.get("PATH", ""), "HOME": "/", "PGCONNECT_TIMEOUT": "10"},
    )  # fmt: skip
    assert result.returncode != 0
    assert f'FATAL:  Peer authentication failed for user "{OS_USER}"' in result.stderr, result.stderr
    assert f"could not look up local user ID {NO_SUCH_UID}: user does not exist" in hal.log_text()


def test_peer_over_tcp_is_not_a_login(hal: Running) -> None:
    # no TCP line: the peer lines are for the socket only
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(hal.dsn(user=OS_USER, password="unused-pw"), connect_timeout=10)
    assert f'no pg_hba.conf entry for host "127.0.0.1", user "{OS_USER}"' in str(caught.value)


def check(pg: Cluster, tmp_path: Path, rules: str, ident: str) -> str:
    """What `halephant check` says on stderr of a configuration with these files (it must fail)."""
    (tmp_path / "pg_hba.conf").write_text(rules)
    (tmp_path / "pg_ident.conf").write_text(ident)
    config = peer_config(pg, tmp_path, tmp_path / "pg_hba.conf", tmp_path / "pg_ident.conf")
    write_config(config, tmp_path / "halephant.yaml")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "halephant", "check", "-c", str(tmp_path / "halephant.yaml")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_check_refuses_peer_on_a_host_line_and_a_bad_map_line(pg: Cluster, tmp_path: Path) -> None:
    hba_file, ident_file = tmp_path / "pg_hba.conf", tmp_path / "pg_ident.conf"
    stderr = check(pg, tmp_path, "local all all peer\nhost all all 127.0.0.1/32 peer\n", IDENT)
    assert (
        f"plugins.hba.file: {hba_file}:2: peer authentication is only supported on local sockets" in stderr
    ), stderr
    stderr = check(pg, tmp_path, RULES, IDENT + "rx /^(.+$ \\1\n")
    assert f'plugins.hba.ident_file: {ident_file}:5: invalid regular expression "^(.+$"' in stderr, stderr
