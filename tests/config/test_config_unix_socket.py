"""Unix-domain sockets in the configuration: cluster nodes written as a socket directory
(`/var/run/postgresql:5432`, libpq's rule: a host that starts with `/`)."""

from __future__ import annotations

import textwrap

import pytest

from halephant.config import Config, ConfigError, HostPort, read_config_text, validate_config


def load(text: str) -> Config:
    return validate_config(read_config_text(textwrap.dedent(text), "halephant.yaml"))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load(text)
    return [str(p) for p in excinfo.value.problems]


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
        ("/srv/pg:sock/", 5433, True),  # a path may hold colons: the port is after the last one
        ("127.0.0.1", 5434, False),
    ]
    # written back as given (the node's name in logs, the admin views and a reload's diff)
    assert [str(n) for n in nodes] == ["/var/run/postgresql:5432", "/srv/pg:sock/:5433", "127.0.0.1:5434"]
    assert HostPort.parse(str(nodes[1])) == nodes[1]


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
        "halephant.yaml:1:9: listen: expected a TCP address like 127.0.0.1:6432, not a Unix-socket directory",
        "halephant.yaml:4:24: clusters.main.nodes.1: a Unix-socket directory needs its port too, like "
        "/var/run/postgresql:5432; got '/var/run/postgresql'",
        "halephant.yaml:4:45: clusters.main.nodes.2: a Unix-socket directory must be an absolute path "
        "(starting with /): 'var/run/postgresql'",
        "halephant.yaml:4:70: clusters.main.nodes.3: a Unix-socket directory must be an absolute path "
        "(starting with /): './sock'",
        "halephant.yaml:4:83: clusters.main.nodes.4: a server node needs a real port, not 0",
        f"halephant.yaml:6:29: clusters.long.nodes.1: the socket path {long!r} would be longer than 107 "
        "bytes, the most a Unix-domain socket's path can be",
        "halephant.yaml:12:11: admin.listen: expected a TCP address like 127.0.0.1:6432, not a Unix-socket "
        "directory",
    ]
