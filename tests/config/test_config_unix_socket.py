"""Unix-domain sockets in the configuration: cluster nodes written as a socket directory
(`/var/run/postgresql:5432`, libpq's rule: a host that starts with `/`), and `unix_socket_dir`."""

from __future__ import annotations

import grp
import os

import pytest
from support.config_text import load, problems

from halephant.config import HostPort
from halephant.config.diff import diff_configs

CLUSTERS = "clusters:\n  main:\n    nodes: [127.0.0.1:5432]\n"
TAIL = """\
databases:
  myapp: {cluster: main}
users:
  myapp: {password: secret}
"""


def test_nodes_may_be_socket_directories() -> None:
    config = load(
        "clusters:\n"
        "  main:\n"
        "    nodes: [/var/run/postgresql:5432, '/srv/pg:sock/:5433', 127.0.0.1:5434]\n" + TAIL
    )
    nodes = config.clusters["main"].nodes
    assert [(n.host, n.port, n.is_socket_dir) for n in nodes] == [
        ("/var/run/postgresql", 5432, True),
        ("/srv/pg:sock", 5433, True),  # a path may hold colons: the port is after the last one
        ("127.0.0.1", 5434, False),
    ]
    # the node's name in logs, the admin views and a reload's diff; read back, the same node
    assert [str(n) for n in nodes] == ["/var/run/postgresql:5432", "/srv/pg:sock:5433", "127.0.0.1:5434"]
    assert HostPort.parse(str(nodes[1])) == nodes[1]


@pytest.mark.parametrize(
    ("written", "directory"),
    [
        ("/run/pg/", "/run/pg"),
        ("/run//pg", "/run/pg"),
        ("//run/pg//", "/run/pg"),
        ("/run/./pg/.", "/run/pg"),
        ("/", "/"),
        ("//", "/"),
        ("/run/../pg", "/run/../pg"),  # `run` may be a symbolic link: not the same as /pg
    ],
)
def test_a_socket_directory_is_written_one_way(written: str, directory: str) -> None:
    node = HostPort.parse(f"{written}:5432")
    assert (node.host, str(node)) == (directory, f"{directory}:5432")
    as_mapping = (
        load("clusters:\n  main:\n    nodes: [{host: '" + written + "', port: 5432}]\n" + TAIL)
        .clusters["main"]
        .nodes[0]
    )
    assert as_mapping == node
    config = load(CLUSTERS + f"unix_socket_dir: '{written}'\n" + TAIL)
    assert config.unix_socket_dir == directory


def test_one_socket_directory_spelled_two_ways_is_listed_twice() -> None:
    text = "clusters:\n  main:\n    nodes: [/run/pg:5432, /run/pg/:5432, '/run//pg/.:5432', /run/pg:5433]\n"
    assert problems(text + TAIL) == [
        "halephant.yaml:3:27: clusters.main.nodes.1: /run/pg:5432 is listed twice",
        "halephant.yaml:3:42: clusters.main.nodes.2: /run/pg:5432 is listed twice",
    ]


def test_socket_directory_errors_are_located() -> None:
    text = """\
    listen: /tmp:6432
    clusters:
      main:
        nodes: [/tmp:5432, /var/run/postgresql, var/run/postgresql:5432, ./sock:5432, /tmp:0]
      long:
        nodes: [127.0.0.1:5432, /%s:5432]
    databases:
      myapp: {cluster: main}
    users:
      myapp: {password: secret}
    admin:
      listen: /tmp:6433
    """ % ("d" * 100)
    long = "/" + "d" * 100 + "/.s.PGSQL.5432"
    assert problems(text) == [
        "halephant.yaml:1:9: listen: expected a TCP address like 127.0.0.1:6432; for a Unix-domain socket "
        "set unix_socket_dir",
        "halephant.yaml:4:24: clusters.main.nodes.1: a Unix-socket directory needs its port too, like "
        "/var/run/postgresql:5432; got '/var/run/postgresql'",
        "halephant.yaml:4:45: clusters.main.nodes.2: a Unix-socket directory must be an absolute path "
        "(starting with /): 'var/run/postgresql'",
        "halephant.yaml:4:70: clusters.main.nodes.3: a Unix-socket directory must be an absolute path "
        "(starting with /): './sock'",
        "halephant.yaml:4:83: clusters.main.nodes.4: a server node needs a real port, not 0",
        f"halephant.yaml:6:29: clusters.long.nodes.1: the socket path {long!r} would be longer than 107 "
        "bytes, the most a Unix-domain socket's path can be",
        "halephant.yaml:12:11: admin.listen: expected a TCP address like 127.0.0.1:6432; for a Unix-domain "
        "socket set unix_socket_dir",
    ]


def test_unix_socket_dir_is_off_by_default() -> None:
    assert load(CLUSTERS + TAIL).unix_socket_dir is None
    assert load("unix_socket_dir: /tmp\n" + CLUSTERS + TAIL).unix_socket_dir == "/tmp"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "tmp/sockets",
            "expected an absolute path (starting with /), like /var/run/postgresql; got 'tmp/sockets'",
        ),
        ("/tmp:6432", None),  # a directory whose name has a colon: nothing to do with a port here
        ("6432", "expected a string, got a number"),
    ],
)
def test_unix_socket_dir_errors(value: str, message: str | None) -> None:
    text = f"unix_socket_dir: {value}\n" + CLUSTERS + TAIL
    if message is None:
        assert load(text).unix_socket_dir == value
    else:
        assert problems(text) == [f"halephant.yaml:1:18: unix_socket_dir: {message}"]


def test_unix_socket_dir_too_long_for_listens_port() -> None:
    directory = "/" + "d" * 91  # with /.s.PGSQL.65432: 107 bytes, the most there can be
    ok = f"listen: 127.0.0.1:65432\nunix_socket_dir: {directory}\n{CLUSTERS}"
    assert load(ok + TAIL).unix_socket_dir == directory
    longer = directory + "d"
    text = f"listen: 127.0.0.1:65432\nunix_socket_dir: {longer}\n{CLUSTERS}"
    path = longer + "/.s.PGSQL.65432"
    assert problems(text + TAIL) == [
        f"halephant.yaml:2:18: unix_socket_dir: the socket path {path!r} would be longer than 107 bytes, "
        "the most a Unix-domain socket's path can be"
    ]


def test_changing_unix_socket_dir_needs_a_restart() -> None:
    old = load(CLUSTERS + TAIL)
    new = load("unix_socket_dir: /tmp\n" + CLUSTERS + TAIL)
    assert [(str(c), c.restart) for c in diff_configs(old, new)] == [
        ("~ unix_socket_dir: null -> /tmp (needs a restart)", True)
    ]


def test_unix_socket_mode_and_group_default_to_0777_and_the_process_s_group() -> None:
    config = load(CLUSTERS + TAIL)
    assert (config.unix_socket_mode, config.unix_socket_group) == ("0777", None)
    group = grp.getgrgid(os.getegid()).gr_name
    config = load(f"unix_socket_mode: '770'\nunix_socket_group: {group}\n" + CLUSTERS + TAIL)
    assert (config.unix_socket_mode, config.unix_socket_group) == ("0770", group)
    assert load("unix_socket_mode: '0o660'\n" + CLUSTERS + TAIL).unix_socket_mode == "0660"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0770", 'write the mode as a quoted octal string, like "0770"; got the number 770'),
        ("'0778'", 'expected an octal mode of permission bits, like "0777" or "0770"; got \'0778\''),
        ("'4777'", 'expected an octal mode of permission bits, like "0777" or "0770"; got \'4777\''),
        (
            "'rw-rw----'",
            'expected an octal mode of permission bits, like "0777" or "0770"; got \'rw-rw----\'',
        ),
    ],
)
def test_unix_socket_mode_errors(value: str, message: str) -> None:
    text = CLUSTERS + f"unix_socket_mode: {value}\n" + TAIL
    assert problems(text) == [f"halephant.yaml:4:19: unix_socket_mode: {message}"]


def test_an_unknown_unix_socket_group_is_an_error() -> None:
    text = CLUSTERS + "unix_socket_group: no-such-group-here\n" + TAIL
    assert problems(text) == [
        "halephant.yaml:4:20: unix_socket_group: no group named 'no-such-group-here' on this machine"
    ]


def test_changing_unix_socket_mode_or_group_needs_a_restart() -> None:
    group = grp.getgrgid(os.getegid()).gr_name
    old = load(CLUSTERS + TAIL)
    new = load(f"unix_socket_mode: '0770'\nunix_socket_group: {group}\n" + CLUSTERS + TAIL)
    assert [(str(c), c.restart) for c in diff_configs(old, new)] == [
        ("~ unix_socket_mode: 0777 -> 0770 (needs a restart)", True),
        (f"~ unix_socket_group: null -> {group} (needs a restart)", True),
    ]
