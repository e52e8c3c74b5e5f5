"""`halephant.unix_socket.UnixListener` without a running halephant: how the socket file is put in place,
what a directory it cannot use says, and that only its own file is removed."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from halephant.unix_socket import MAX_SOCKET_PATH, UnixListener, UnixSocketError, socket_path

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="halephant-unix-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_socket_path() -> None:
    assert socket_path("/var/run/postgresql", 5432) == "/var/run/postgresql/.s.PGSQL.5432"
    assert socket_path("/tmp/", 6432) == "/tmp/.s.PGSQL.6432"
    assert socket_path("/", 6432) == "/.s.PGSQL.6432"


def test_listens_with_mode_0777_and_removes_only_its_own_file(directory: Path) -> None:
    listener = UnixListener(str(directory), 6432, backlog=8)
    path = directory / ".s.PGSQL.6432"
    try:
        assert listener.path == str(path)
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o777
        assert os.listdir(directory) == [".s.PGSQL.6432"]  # the temporary name is gone
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # listening already
        # a new halephant's listener takes the name over; the old one leaves it alone
        newer = UnixListener(str(directory), 6432, backlog=8)
        try:
            assert listener.remove() is False and path.is_socket()
            assert newer.remove() is True and not path.exists()
            assert newer.remove() is False
        finally:
            newer.sock.close()
    finally:
        listener.sock.close()


def test_mode_and_group_are_set_before_the_file_takes_its_name(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        gid = grp.getgrnam("nogroup").gr_gid if os.geteuid() == 0 else os.getegid()
    except KeyError:
        gid = os.getegid()
    at_rename: list[os.stat_result] = []
    rename = os.rename

    def watched(src: str, dst: str) -> None:
        at_rename.append(os.stat(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", watched)
    listener = UnixListener(str(directory), 6432, backlog=8, mode=0o660, group=gid)
    try:
        found = (directory / ".s.PGSQL.6432").stat()
        assert (found.st_mode & 0o7777, found.st_gid) == (0o660, gid)
        # what the final name showed from its first moment
        assert [(s.st_mode & 0o7777, s.st_gid) for s in at_rename] == [(0o660, gid)]
    finally:
        listener.sock.close()


def test_a_name_too_long_for_the_temporary_one_is_replaced_in_place(directory: Path) -> None:
    # room for .s.PGSQL.6432 but not for the pid after it
    deep = directory / ("d" * (MAX_SOCKET_PATH - len(str(directory)) - len("/d/.s.PGSQL.6432") - 1))
    deep.mkdir()
    path = Path(socket_path(str(deep), 6432))
    assert len(str(path)) < MAX_SOCKET_PATH < len(f"{path}.{os.getpid()}")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    listener = UnixListener(str(deep), 6432, backlog=8)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
        assert listener.remove() is True
    finally:
        listener.sock.close()


def test_errors_name_the_directory(directory: Path) -> None:
    with pytest.raises(UnixSocketError, match=f"^unix_socket_dir {directory}/missing: no such directory$"):
        UnixListener(str(directory / "missing"), 6432, backlog=8)
    (directory / "file").touch()
    with pytest.raises(UnixSocketError, match="no such directory"):
        UnixListener(str(directory / "file"), 6432, backlog=8)


def test_a_directory_it_cannot_write_to(directory: Path) -> None:
    """Run as an unprivileged user (root may write anywhere): `nobody` when the tests run as root."""
    code = (
        "import sys\n"
        "from halephant.unix_socket import UnixListener, UnixSocketError\n"
        "try:\n"
        "    UnixListener(sys.argv[1], 6432, backlog=8)\n"
        "except UnixSocketError as exc:\n"
        "    print(exc)\n"
    )
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        os.chmod(directory, 0o755)  # others may look in, not write
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        uid = user.pw_uid
    else:
        os.chmod(directory, 0o555)
        run_as = {}
        uid = os.geteuid()
    out = subprocess.run(
        [sys.executable, "-c", code, str(directory)],
        capture_output=True, text=True, timeout=30, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        **run_as,  # type: ignore[arg-type]
    )  # fmt: skip
    os.chmod(directory, 0o700)
    assert out.stdout.strip() == (
        f"unix_socket_dir {directory}: cannot listen on {directory}/.s.PGSQL.6432: the directory is not "
        f"writable by this process (uid {uid}): Permission denied"
    ), out.stderr
    assert os.listdir(directory) == []
