"""TLS for the tests: a throwaway CA (trustme), and the PostgreSQL cluster whose nodes take TCP logins over
TLS only (`start_tls_cluster`).

`TlsFiles` writes what halephant's `clusters.<name>.tls` settings name: the CA certificate, one of a CA
that signed nothing here (the wrong CA), and the client certificate and key of role `certuser`, which
logs in by certificate alone (pg_hba.conf `cert`). The server certificate names `localhost` only, so
that `verify-full` against a node written `localhost:PORT` passes and against `127.0.0.1:PORT` fails on
the name.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

import trustme

from halephant.testing.pgcluster import Cluster, ServerSsl, role_sql

from .cluster import start_test_cluster

#: the role that logs in with its client certificate, and no password
CERT_USER = "certuser"
#: the name the server certificate is issued for (and nothing else)
SERVER_NAME = "localhost"


@dataclass(frozen=True)
class TlsFiles:
    """A CA and the PEM files the tests hand halephant (all of them under one directory)."""

    ca: trustme.CA
    ca_file: str
    wrong_ca_file: str
    cert_file: str
    key_file: str

    @classmethod
    def make(cls, directory: pathlib.Path) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(directory / "ca.crt")
        trustme.CA().cert_pem.write_to_path(directory / "wrong-ca.crt")
        client = ca.issue_cert(CERT_USER, common_name=CERT_USER)
        client.cert_chain_pems[0].write_to_path(directory / "client.crt")
        client.private_key_pem.write_to_path(directory / "client.key")
        (directory / "client.key").chmod(0o600)
        return cls(
            ca,
            str(directory / "ca.crt"),
            str(directory / "wrong-ca.crt"),
            str(directory / "client.crt"),
            str(directory / "client.key"),
        )

    def server_ssl(self, hostssl_only: bool = True) -> ServerSsl:
        """The nodes' certificate (for `SERVER_NAME`), key and client CA."""
        server = self.ca.issue_cert(SERVER_NAME)
        return ServerSsl(
            cert_pem="".join(blob.bytes().decode() for blob in server.cert_chain_pems),
            key_pem=server.private_key_pem.bytes().decode(),
            client_ca_pem=self.ca.cert_pem.bytes().decode(),
            hostssl_only=hostssl_only,
        )


def start_tls_cluster(files: TlsFiles, *, replicas: int = 0, **kwargs: Any) -> Cluster:
    """The test cluster (`start_test_cluster`) with ssl = on and TLS-only TCP logins, plus `certuser`,
    whose TCP logins need its client certificate (and no password)."""
    cluster = start_test_cluster(
        replicas=replicas,
        hba=[f"hostssl all {CERT_USER} 127.0.0.1/32 cert"],
        ssl=files.server_ssl(),
        **kwargs,
    )
    try:
        cluster.primary.sql(role_sql(CERT_USER) + f"GRANT CONNECT ON DATABASE myapp TO {CERT_USER};\n")
        cluster.wait_replicated()
    except BaseException:
        cluster.destroy()
        raise
    return cluster
