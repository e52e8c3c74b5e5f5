"""Peer authentication in the core (`halephant.proxy.peer`, `halephant.types.Peer`): the operating system
user read from a real Unix-domain socket pair, the user name map's matching as pg_ident.conf's, and
PostgreSQL's refusals with the reason to log."""

from __future__ import annotations

import os
import pwd
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from halephant import sqlstate
from halephant.proxy.peer import os_user_id, peer_refusal
from halephant.types import Peer, UserMap, UserMapLine

OS_USER = pwd.getpwuid(os.geteuid()).pw_name


class Transport:
    """What the core asks a transport for here: its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None


@pytest.fixture
def unix() -> Iterator[Transport]:
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        yield Transport(ours)


def test_the_user_id_at_the_other_end(unix: Transport) -> None:
    assert os_user_id(unix.sock) == os.geteuid()


def test_the_os_user_logs_in_as_itself_only(unix: Transport) -> None:
    assert peer_refusal(unix, OS_USER, Peer()) is None
    refused = peer_refusal(unix, "someone", Peer(reason="hba: peer by f:1"))
    assert refused is not None
    error, why = refused
    assert (error.code, error.message, error.fatal) == (
        sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, 'Peer authentication failed for user "someone"', True
    )  # fmt: skip
    assert why == (
        f"provided user name (someone) and authenticated user name ({OS_USER}) do not match "
        "(hba: peer by f:1)"
    )


def test_a_map_decides(unix: Transport) -> None:
    usermap = UserMap("m", (UserMapLine(OS_USER, "app"),))
    assert peer_refusal(unix, "app", Peer(usermap)) is None
    refused = peer_refusal(unix, OS_USER, Peer(usermap))  # a map replaces the name's own match
    assert refused is not None
    assert refused[1] == f'no match in usermap "m" for user "{OS_USER}" authenticated as "{OS_USER}" (peer)'
    empty = peer_refusal(unix, "app", Peer(UserMap("gone")))
    assert empty is not None and 'no match in usermap "gone"' in empty[1]


def test_tcp_is_refused(unix: Transport) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        refused = peer_refusal(Transport(tcp), OS_USER, Peer())
    assert refused is not None
    assert refused[0].code == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION
    assert refused[1] == "peer authentication is only supported on local sockets (peer)"


@pytest.mark.parametrize(
    ("line", "system_user", "database_user", "allowed"),
    [
        (UserMapLine("alice", "app"), "alice", "app", True),
        (UserMapLine("alice", "app"), "alice", "other", False),
        (UserMapLine("alice", "app"), "bob", "app", False),
        (UserMapLine("alice", None), "alice", "anything", True),
        (UserMapLine(re.compile(r"^(.*)@example\.com$"), "\\1"), "alice@example.com", "alice", True),
        (UserMapLine(re.compile(r"^(.*)@example\.com$"), "\\1"), "alice@example.org", "alice", False),
        (UserMapLine(re.compile(r"^(.*)@example\.com$"), "\\1"), "alice@example.com", "bob", False),
        # searched, not matched whole, as PostgreSQL's regexec
        (UserMapLine(re.compile("dev"), "app"), "a-developer", "app", True),
        # the first \1 only is replaced, as in PostgreSQL
        (UserMapLine(re.compile("^(a)$"), "\\1\\1"), "a", "a\\1", True),
        (UserMapLine(re.compile("^(x)?a$"), "\\1"), "a", "", False),  # the group took no part
        (UserMapLine("alice", re.compile("^app_")), "alice", "app_ro", True),
        (UserMapLine("alice", re.compile("^app_")), "alice", "ro_app", False),
    ],
)
def test_what_a_map_line_allows(
    line: UserMapLine, system_user: str, database_user: str, allowed: bool
) -> None:
    assert line.allows(system_user, database_user) is allowed
    assert UserMap("m", (UserMapLine("nobody", "x"), line)).allows(system_user, database_user) is allowed
