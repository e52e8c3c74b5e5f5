"""End-to-end: TLS between clients and halephant (`client_tls:`), with real clients (psql, psycopg, asyncpg,
and raw sockets through Python's ssl) in front of real PostgreSQL.

The certificates come from a throwaway CA (trustme): halephant's for 127.0.0.1 and localhost (and a
second one, for reloads), client certificates by CN, and a second CA whose certificates halephant does
not trust. One halephant in `require` mode serves most of the module; the other modes, and reloads, get
their own. After every test no server backend may be left dirty.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import re
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg_binary
import pytest
import rawclient as rc
import trustme
from rawclient import RawClient
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers
from support.polling import wait_until

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

LOGIN_TIMEOUT = 2.0
PLUGINS_DIR = Path(__file__).resolve().parent / "plugins_for_tests"


@dataclass
class Pki:
    """A CA and the files the tests hand to halephant and to clients."""

    root: Path
    ca: trustme.CA
    ca_file: Path
    cert: Path  # halephant's certificate (127.0.0.1, localhost) and its key
    key: Path
    other_cert: Path  # another one, for reloads
    other_key: Path

    def client(self, cn: str, ca: trustme.CA | None = None) -> tuple[str, str]:
        """A client certificate with this CN (signed by `ca`, by default the trusted one): paths."""
        leaf = (ca or self.ca).issue_cert(f"{cn}.clients.example", common_name=cn)
        tag = "rogue-" if ca is not None else ""
        cert, key = self.root / f"{tag}client-{cn}.crt", self.root / f"{tag}client-{cn}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)  # libpq refuses a key others can read
        return str(cert), str(key)

    def context(self) -> ssl.SSLContext:
        """A client context that verifies halephant against the CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def settings(self, mode: str, **extra: Any) -> dict[str, Any]:
        """A `client_tls:` section."""
        return {"mode": mode, "cert_file": str(self.cert), "key_file": str(self.key), **extra}


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(path: Path) -> str:
    return fingerprint(ssl.PEM_cert_to_DER_cert(path.read_text()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "root.crt"))
    files = []
    for name in ("server", "server2"):
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        leaf.cert_chain_pems[0].write_to_path(str(root / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(root / f"{name}.key"))
        (root / f"{name}.key").chmod(0o600)
        files += [root / f"{name}.crt", root / f"{name}.key"]
    return Pki(root, ca, root / "root.crt", *files)


@pytest.fixture(scope="module")
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="halephant-tls-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory, pki: Pki, sockdir: Path) -> Running:
    """`require`: every TCP login encrypted."""
    return module_halephant.start(
        default_config(
            pg,
            clusters={"main": {"probe_user": "myapp"}},
            unix_socket_dir=str(sockdir),
            databases={"myapp_session": {"cluster": "main", "database": "myapp", "mode": "session"}},
            users={
                "admin": {"password": "admin-pw"},
                "trusty": {"auth": "trust", "server_user": "myapp"},  # logs in without a password
            },
            admin={"users": ["admin"]},
            limits={"login_timeout": f"{LOGIN_TIMEOUT:g}s"},
            client_tls=pki.settings("require"),
        )
    )


@pytest.fixture(autouse=True)
def left_clean(pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(pg.primary)


def raw(run: Running, timeout: float = 5.0) -> RawClient:
    return RawClient(run.host, run.port, timeout=timeout)


def verified(pki: Pki, **extra: Any) -> dict[str, Any]:
    """libpq settings that verify halephant's certificate and host name."""
    return {"sslmode": "verify-full", "sslrootcert": str(pki.ca_file), **extra}


def in_log(run: Running, pattern: str) -> re.Match[str]:
    found: re.Match[str] = wait_until(lambda: re.search(pattern, run.log_text()), f"{pattern!r} logged")
    return found


# --- clients over TLS --------------------------------------------------------------------------------------


def test_psql_sslmode_require_runs_a_query(hal: Running, run_client: Any) -> None:
    out = run_client(
        "psql",
        hal,
        ["-X", "-At", "-c", "SELECT 40 + 2", "-c", r"\conninfo"],
        dbname="dbname=myapp sslmode=require",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "42"
    assert "SSL connection (protocol: TLSv1.3" in out.stdout, out.stdout
    in_log(hal, r"<client #\d+ myapp@myapp from 127\.0\.0\.1:\d+>: connected \(tls=TLSv1\.3\)")
    in_log(hal, r"login ok \(scram-sha-256, pool myapp, transaction mode, tls=TLSv1\.3\)")


def test_psql_verify_full_and_show_clients_says_tls(hal: Running, pki: Pki, run_client: Any) -> None:
    secure = f"sslmode=verify-full sslrootcert={pki.ca_file}"
    out = run_client("psql", hal, ["-X", "-At", "-c", "SELECT current_user"], dbname=f"dbname=myapp {secure}")
    assert (out.returncode, out.stdout.strip()) == (0, "myapp"), out.stderr
    out = run_client(
        "psql",
        hal,
        ["-X", "-A", "-F", "\t", "-c", "SHOW CLIENTS"],
        user="admin",
        password="admin-pw",
        dbname=f"dbname=halephant {secure} application_name=tls-console",
    )
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines() if "\t" in line]
    rows = [dict(zip(lines[0], line, strict=True)) for line in lines[1:]]
    mine = [r for r in rows if r["application_name"] == "tls-console"]
    assert len(mine) == 1, rows
    version, _, cipher = mine[0]["tls"].partition("/")
    assert version == "TLSv1.3" and cipher.startswith("TLS_"), mine


def test_psql_sslmode_allow_retries_with_tls(hal: Running, run_client: Any) -> None:
    # libpq's allow tries plaintext first, and tries again with TLS once that is refused
    out = run_client("psql", hal, ["-X", "-At", "-c", r"\conninfo"], dbname="dbname=myapp sslmode=allow")
    assert out.returncode == 0, out.stderr
    assert "SSL connection (protocol: TLSv1.3" in out.stdout, out.stdout


def test_psycopg_over_tls(hal: Running, pki: Pki) -> None:
    dsn = hal.dsn(**verified(pki, application_name="tls-psycopg"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        # a result of some megabytes, many TLS records, relayed from the server through TLS
        rows = conn.execute("SELECT i, repeat('x', 200) FROM generate_series(1, 20000) i").fetchall()
        assert len(rows) == 20000 and rows[-1] == (20000, "x" * 200)
        for n in range(3):  # prepared on the third: a named statement over TLS
            assert conn.execute("SELECT %s::int * 2", [n], prepare=True).fetchone() == (n * 2,)
        with conn.transaction():
            conn.execute("SELECT 1")
        mine = [c for c in hal.admin_json("/clients") if c["application_name"] == "tls-psycopg"]
        assert [(c["tls"], c["tls_cipher"][:4]) for c in mine] == [("TLSv1.3", "TLS_")], mine
        summary = hal.admin_json("/snapshot")["summary"]  # what `halephant status` counts as over TLS
        assert summary["clients_tls"] == len([c for c in hal.admin_json("/clients") if c["tls"]]) >= 1
    # min_version is TLSv1.2 here: a client that offers no more speaks TLSv1.2
    dsn = hal.dsn(**verified(pki, ssl_max_protocol_version="TLSv1.2", application_name="tls-1.2"))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        mine = [c for c in hal.admin_json("/clients") if c["application_name"] == "tls-1.2"]
        assert [c["tls"] for c in mine] == ["TLSv1.2"], mine
        conn.rollback()


def test_asyncpg_over_tls(hal: Running, pki: Pki) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(
            host=hal.host, port=hal.port, user="myapp", password="myapp", database="myapp",
            ssl=pki.context(), server_settings={"application_name": "tls-asyncpg"},
        )  # fmt: skip
        try:
            assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
            statement = await conn.prepare("SELECT $1::text || '!'")
            assert await statement.fetchval("hello") == "hello!"
            async with conn.transaction():
                assert await conn.fetchval("SELECT count(*) FROM generate_series(1, 1000)") == 1000
            mine = [c for c in hal.admin_json("/clients") if c["application_name"] == "tls-asyncpg"]
            assert [c["tls"] for c in mine] == ["TLSv1.3"]
        finally:
            await conn.close()

    asyncio.run(main())


# --- SCRAM-SHA-256-PLUS -------------------------------------------------------------------------------------


def test_channel_binding_required_by_psql_and_psycopg(hal: Running, pki: Pki, run_client: Any) -> None:
    # libpq's channel_binding=require: SCRAM-SHA-256-PLUS, bound to halephant's certificate
    out = run_client(
        "psql",
        hal,
        ["-X", "-At", "-c", "SELECT 1"],
        dbname="dbname=myapp sslmode=require channel_binding=require",
    )
    assert (out.returncode, out.stdout.strip()) == (0, "1"), out.stderr
    with psycopg.connect(hal.dsn(**verified(pki, channel_binding="require"))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.rollback()


def test_a_bound_login_gives_the_keys_for_pass_through(
    pg: Cluster, halephant: HalephantFactory, pki: Pki
) -> None:
    # users.myapp.password is pg_authid's verifier: halephant logs in upstream with the ClientKey a
    # client's SCRAM login gives it, here a login bound to the TLS channel (SCRAM-SHA-256-PLUS)
    verifier = pg.primary.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'myapp'").strip()
    assert verifier.startswith("SCRAM-SHA-256$")
    config = default_config(
        pg,
        clusters={"main": {"probe_user": "myapp"}},
        users={"myapp": {"password": verifier}, "myapp_ro": None},
        client_tls=pki.settings("require"),
    )
    run = halephant.start(config)
    with psycopg.connect(run.dsn(**verified(pki, channel_binding="require")), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("myapp",)


def test_channel_binding_to_another_certificate_is_refused(hal: Running, pki: Pki) -> None:
    # what a man in the middle with its own certificate would relay: the proof is bound to that one
    with raw(hal) as client:
        tls = client.start_tls(pki.context(), server_hostname="127.0.0.1")
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        with pytest.raises(AssertionError, match="login failed"):
            client.login("myapp", "myapp", "myapp", channel_binding=("tls-server-end-point", b"x" * 32))
        error = client.last_session.messages[-1]
        assert (error.fields["C"], error.fields["M"]) == ("08P01", "SCRAM channel binding check failed")
    with raw(hal) as client:  # the same client, bound to the certificate halephant presents: in
        tls = client.start_tls(pki.context(), server_hostname="127.0.0.1")
        client.login("myapp", "myapp", "myapp", channel_binding=("tls-server-end-point", tls))
        assert rc.data_rows(client.simple_query("SELECT 7")) == [["7"]]


def test_gssapi_encryption_is_declined_and_tls_taken_after_it(hal: Running, pki: Pki) -> None:
    # libpq with gssencmode=prefer asks for GSSAPI encryption first, then for TLS
    with raw(hal) as client:
        client.send(rc.gssenc_request())
        assert client.read_byte() == b"N"
        tls = client.start_tls(pki.context(), server_hostname="127.0.0.1")
        assert tls.version() == "TLSv1.3"
        client.login("myapp", "myapp", "myapp", channel_binding=("tls-server-end-point", tls))
        assert rc.data_rows(client.simple_query("SELECT 5")) == [["5"]]


def test_session_pooling_and_copy_both_ways_over_tls(hal: Running, pki: Pki, pg: Cluster) -> None:
    # megabytes each way through TLS, in session pooling (the server linked from login on)
    rows = [(i, "y" * 300) for i in range(40000)]
    with psycopg.connect(hal.dsn(**verified(pki, dbname="myapp_session")), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE tls_copy (id int, v text)")
        with conn.cursor() as cur:
            with cur.copy("COPY tls_copy FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            assert conn.execute("SELECT count(*), sum(length(v)) FROM tls_copy").fetchone() == (
                40000,
                12000000,
            )
            with cur.copy("COPY tls_copy TO STDOUT") as copy:
                assert sum(1 for _ in copy.rows()) == 40000


# --- require ------------------------------------------------------------------------------------------------


def test_a_plaintext_login_is_refused_with_28000(hal: Running, run_client: Any) -> None:
    out = run_client("psql", hal, ["-X", "-c", "SELECT 1"], dbname="dbname=myapp sslmode=disable")
    assert out.returncode != 0
    assert "FATAL:  SSL required" in out.stderr and "sslmode=require" in out.stderr, out.stderr
    with raw(hal) as client:
        client.send(rc.startup({"user": "trusty", "database": "myapp"}))
        error = client.expect_fatal_and_close("28000")
        assert error.fields["M"] == "SSL required"
    in_log(hal, r"trusty@myapp .*: rejected: SSL required \(client_tls\.mode: require\)")


def test_a_unix_socket_client_is_answered_N_and_logs_in_without_tls(hal: Running, sockdir: Path) -> None:
    path = sockdir / f".s.PGSQL.{hal.port}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(rc.ssl_request())
        assert sock.recv(1) == b"N"
    with psycopg.connect(hal.dsn(host=str(sockdir)), autocommit=True) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    "trailing",
    [
        pytest.param(rc.query("CREATE TABLE tls_smuggled ()"), id="query"),
        pytest.param(
            rc.startup({"user": "trusty", "database": "myapp"}) + rc.query("CREATE TABLE tls_smuggled ()"),
            id="startup-and-query",
        ),
    ],
)
def test_plaintext_behind_an_ssl_request_is_08P01_and_nothing_runs(
    hal: Running, pg: Cluster, trailing: bytes
) -> None:
    # CVE-2021-23222 shape: what came in the same write as the SSLRequest would pass as encrypted
    with raw(hal) as client:
        client.send(rc.ssl_request() + trailing)
        messages, closed = client.read_all(timeout=3.0)
        assert closed, f"still open after {messages}"
        assert [(m.type, m.fields.get("S"), m.fields.get("C")) for m in messages] == [
            (b"E", "FATAL", "08P01")
        ], messages
        assert messages[0].fields["M"] == "received unencrypted data after SSL request"
    assert pg.primary.sql("SELECT to_regclass('tls_smuggled') IS NULL").strip() == "t"


@pytest.mark.parametrize(
    "request_bytes", [rc.ssl_request(), rc.gssenc_request()], ids=["SSLRequest", "GSSENCRequest"]
)
def test_an_encryption_request_inside_tls_is_08P01(hal: Running, pki: Pki, request_bytes: bytes) -> None:
    with raw(hal) as client:
        client.start_tls(pki.context(), server_hostname="127.0.0.1")
        client.send(request_bytes)
        error = client.expect_fatal_and_close("08P01")  # read over TLS
        assert "request received inside an encrypted connection" in error.fields["M"], error


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["nothing", "part-of-a-ClientHello"])
def test_a_stalled_handshake_is_closed_by_login_timeout(hal: Running, sent: bytes) -> None:
    with raw(hal, timeout=LOGIN_TIMEOUT + 10) as client:
        client.send(rc.ssl_request())
        assert client.read_byte() == b"S"
        started = time.monotonic()
        client.send(sent)
        # closed without a byte: a plaintext ErrorResponse is no TLS record
        assert client.rest_of_stream() == b""
        waited = time.monotonic() - started
    # the client sweep runs once a second
    assert LOGIN_TIMEOUT - 0.5 < waited < LOGIN_TIMEOUT + 2.5, waited
    in_log(hal, r"<client #\d+ \(starting\) from 127\.0\.0\.1:\d+>: login timeout")


def test_a_failed_handshake_is_logged_and_disturbs_no_one(hal: Running, pki: Pki) -> None:
    with psycopg.connect(hal.dsn(**verified(pki))) as conn:
        conn.execute("SELECT 1")  # a transaction open on a server, over TLS
        for junk in (b"garbage" * 100, b"\x16\x03\x01\x00\x05hello", os.urandom(2000)):
            with raw(hal) as client:
                client.send(rc.ssl_request())
                assert client.read_byte() == b"S"
                client.send(junk)
                assert client.is_closed(3.0)
        with raw(hal) as client:  # gives up before the handshake
            client.send(rc.ssl_request())
            assert client.read_byte() == b"S"
        # a client that does not trust halephant's certificate hangs up in the handshake
        with raw(hal) as client, pytest.raises(ssl.SSLCertVerificationError):
            client.start_tls(ssl.create_default_context(), server_hostname="127.0.0.1")
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.commit()
    assert hal.alive
    in_log(hal, r"\(starting\) from 127\.0\.0\.1:\d+>: TLS handshake failed: wrong version number")
    in_log(hal, r"TLS handshake failed: the client closed the connection")
    in_log(hal, r"TLS handshake failed: (tlsv1 alert unknown ca|sslv3 alert bad certificate)")
    assert "Traceback" not in hal.log_text()


@pytest.mark.parametrize("how", ["cancel", "cancel_safe"])
def test_cancel_of_a_tls_clients_query(hal: Running, pki: Pki, how: str) -> None:
    # cancel: libpq's PQcancel, a CancelRequest in plaintext (require does not refuse it);
    # cancel_safe: libpq 17's cancel connection, SSLRequest then the CancelRequest over TLS
    name = f"tls-{how}"
    with (
        psycopg.connect(hal.dsn(**verified(pki, application_name=name)), autocommit=True) as conn,
        ThreadPoolExecutor(1) as pool,
    ):
        running = pool.submit(conn.execute, "SELECT pg_sleep(30)")
        wait_until(
            lambda: (
                [c["state"] for c in hal.admin_json("/clients") if c["application_name"] == name]
                == ["active"]
            ),
            "the query running",
        )
        started = time.monotonic()
        getattr(conn, how)()
        with pytest.raises(psycopg.errors.QueryCanceled):
            running.result(10)
        assert time.monotonic() - started < 5
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- direct TLS (libpq 17's sslnegotiation=direct) and ALPN ----------------------------------------------


def ssl_attribute(conn: psycopg.Connection[Any], name: str) -> bytes | None:
    """What libpq says of the connection's TLS (`PQsslAttribute(conn, name)`: "alpn", "cipher", ...)."""
    libpq = ctypes.CDLL(
        str(next(Path(psycopg_binary.__file__).parent.parent.glob("psycopg_binary.libs/libpq-*")))
    )
    libpq.PQsslAttribute.restype = ctypes.c_char_p
    libpq.PQsslAttribute.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    value: bytes | None = libpq.PQsslAttribute(conn.pgconn.pgconn_ptr, name.encode())
    return value


def negotiated_alpn(conn: psycopg.Connection[Any]) -> bytes | None:
    """What libpq says the handshake chose for ALPN."""
    return ssl_attribute(conn, "alpn")


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_psycopg_with_direct_tls_logs_in_and_runs_queries(hal: Running, pki: Pki, sslmode: str) -> None:
    name = f"direct-{sslmode}"
    settings = verified(pki) if sslmode == "verify-full" else {"sslmode": sslmode}
    dsn = hal.dsn(**settings, sslnegotiation="direct", application_name=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert negotiated_alpn(conn) == b"postgresql"
        rows = conn.execute("SELECT i, repeat('x', 200) FROM generate_series(1, 5000) i").fetchall()
        assert len(rows) == 5000 and rows[-1] == (5000, "x" * 200)
        with conn.transaction():
            assert conn.execute("SELECT %s::int * 2", [21]).fetchone() == (42,)
        mine = [c for c in hal.admin_json("/clients") if c["application_name"] == name]
        assert [c["tls"] for c in mine] == ["TLSv1.3"], mine
    in_log(hal, r"myapp@myapp from 127\.0\.0\.1:\d+>: connected \(tls=TLSv1\.3\)")


def test_psycopg_after_an_ssl_request_is_given_alpn_postgresql(hal: Running, pki: Pki) -> None:
    with psycopg.connect(hal.dsn(**verified(pki), sslnegotiation="postgres")) as conn:
        assert conn.pgconn.ssl_in_use
        assert negotiated_alpn(conn) == b"postgresql"
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.rollback()


@pytest.mark.parametrize(
    ("direct", "alpn", "refusal"),
    [
        (True, None, r"direct TLS without ALPN: a client that begins with TLS must offer 'postgresql'"),
        (True, ["h2"], r"the client offered the ALPN protocol\(s\) 'h2', not 'postgresql'"),
        (True, ["h2", "postgresql"], None),
        (False, None, None),  # libpq before 17
        (False, ["http/1.1"], r"the client offered the ALPN protocol\(s\) 'http/1\.1', not 'postgresql'"),
        (False, ["postgresql"], None),
    ],
    ids=[
        "direct-none",
        "direct-h2",
        "direct-h2-postgresql",
        "classic-none",
        "classic-http",
        "classic-postgresql",
    ],
)
def test_alpn_must_be_postgresql_and_direct_tls_needs_it(
    hal: Running, pki: Pki, direct: bool, alpn: list[str] | None, refusal: str | None
) -> None:
    context = pki.context()
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    with raw(hal) as client:
        if direct:
            client.sock = context.wrap_socket(client.sock, server_hostname="127.0.0.1")
        else:
            client.start_tls(context, server_hostname="127.0.0.1")
        assert isinstance(client.sock, ssl.SSLSocket)
        if refusal is not None:
            # the handshake completes (Python's ssl chooses no protocol rather than fail it); then the
            # connection is closed without a PostgreSQL message
            assert client.sock.selected_alpn_protocol() is None
            assert client.is_closed(3.0)
            in_log(hal, r"\(starting\) from 127\.0\.0\.1:\d+>: TLS handshake failed: " + refusal)
            return
        assert client.sock.selected_alpn_protocol() == (None if alpn is None else "postgresql")
        client.send(rc.startup({"user": "trusty", "database": "myapp"}))
        assert client.read_until_ready()[0].auth_code == 0
        assert rc.data_rows(client.simple_query("SELECT 'over TLS'")) == [["over TLS"]]
        client.send(rc.terminate())


def test_direct_tls_in_pieces_and_with_a_query_behind_the_startup(hal: Running, pki: Pki) -> None:
    # the ClientHello comes a few bytes at a time: halephant waits for the whole record
    context = pki.context()
    context.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with raw(hal) as client:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        for i in range(0, len(hello), 100):
            client.sock.sendall(hello[i : i + 100])
            time.sleep(0.01)
        while True:
            incoming.write(client.sock.recv(65536))
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
        client.sock.sendall(outgoing.read())
        assert tls.selected_alpn_protocol() == "postgresql"
        # the StartupMessage and a query in one record, as a client pipelines them
        tls.write(rc.startup({"user": "trusty", "database": "myapp"}) + rc.query("SELECT 6 * 7"))
        client.sock.sendall(outgoing.read())
        plain = b""
        row = b"D\x00\x00\x00\x0c\x00\x01\x00\x00\x00\x0242"  # one column: 42
        while not (row in plain and plain.endswith(b"Z\x00\x00\x00\x05I")):
            incoming.write(client.sock.recv(65536))
            while True:
                try:
                    plain += tls.read(65536)
                except ssl.SSLWantReadError:
                    break
        tls.write(rc.terminate())
        client.sock.sendall(outgoing.read())


def test_direct_tls_on_the_unix_socket_is_closed_without_a_word(
    hal: Running, pki: Pki, sockdir: Path
) -> None:
    context = pki.context()
    context.set_alpn_protocols(["postgresql"])
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(sockdir / f".s.PGSQL.{hal.port}"))
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            context.wrap_socket(sock, server_hostname="127.0.0.1")
    in_log(hal, r"from unix>: direct TLS refused: direct TLS is for TCP, not a Unix-domain socket")


# --- the other modes ----------------------------------------------------------------------------------------


def test_prefer_serves_plaintext_and_tls_and_plugins_see_which(
    pg: Cluster, halephant: HalephantFactory, pki: Pki
) -> None:
    config = default_config(
        pg,
        client_tls=pki.settings("prefer", min_version="TLSv1.3"),
        plugins={"modules": ["tls_only_user"]},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(PLUGINS_DIR))
        run = halephant.start(config)
    with psycopg.connect(run.dsn(sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(run.dsn(sslmode="prefer")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # without TLS there is nothing to bind to: SCRAM-SHA-256-PLUS is not offered, and libpq refuses
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(run.dsn(sslmode="disable", channel_binding="require"))
    # the plugin lets myapp_ro in over TLS only (ClientInfo.tls)
    ro = {"user": "myapp_ro", "password": "myapp_ro"}
    with pytest.raises(psycopg.OperationalError, match='user "myapp_ro" may connect only over TLS'):
        psycopg.connect(run.dsn(**ro, sslmode="disable"))
    with psycopg.connect(run.dsn(**ro, sslmode="require")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # min_version: TLSv1.3 turns a client that offers TLSv1.2 at most away in the handshake
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(run.dsn(sslmode="require", ssl_max_protocol_version="TLSv1.2"))
    in_log(run, r"TLS handshake failed: (unsupported protocol|tlsv1 alert protocol version)")


def test_ciphers_restrict_what_a_tls_1_2_client_negotiates(
    pg: Cluster, halephant: HalephantFactory, pki: Pki
) -> None:
    tls12 = {"sslmode": "require", "ssl_max_protocol_version": "TLSv1.2"}
    run = halephant.start(default_config(pg, client_tls=pki.settings("require")))
    with psycopg.connect(run.dsn(**tls12)) as conn:
        assert ssl_attribute(conn, "cipher") == b"ECDHE-ECDSA-AES256-GCM-SHA384"
    run.stop()
    aes128 = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
    run = halephant.start(default_config(pg, client_tls=pki.settings("require", ciphers=aes128)))
    with psycopg.connect(run.dsn(**tls12)) as conn:
        assert ssl_attribute(conn, "cipher") == b"ECDHE-ECDSA-AES128-GCM-SHA256"
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # TLSv1.3 is not governed by the list
    with psycopg.connect(run.dsn(sslmode="require")) as conn:
        assert ssl_attribute(conn, "protocol") == b"TLSv1.3"
    run.stop()
    # a client that shares no suite of the list fails the handshake, logged
    run = halephant.start(default_config(pg, client_tls=pki.settings("require", ciphers="AES128-SHA")))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(run.dsn(sslmode="require", ssl_max_protocol_version="TLSv1.2"))
    in_log(run, r"TLS handshake failed: (no shared cipher|sslv3 alert handshake failure)")


def test_verify_ca_takes_a_certificate_the_ca_signed(
    pg: Cluster, halephant: HalephantFactory, pki: Pki
) -> None:
    run = halephant.start(default_config(pg, client_tls=pki.settings("verify-ca", ca_file=str(pki.ca_file))))
    cert, key = pki.client("someone-else")  # verify-ca does not read the CN
    with psycopg.connect(run.dsn(**verified(pki, sslcert=cert, sslkey=key))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # no certificate: the handshake completes, and the StartupMessage gets PostgreSQL's 28000
    with pytest.raises(psycopg.OperationalError, match="connection requires a valid client certificate"):
        psycopg.connect(run.dsn(**verified(pki)))
    in_log(run, r"myapp@myapp .*: rejected: no client certificate \(client_tls\.mode: verify-ca\)")
    # a certificate another CA signed fails the handshake
    rogue_cert, rogue_key = pki.client("myapp", ca=trustme.CA())
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(run.dsn(**verified(pki, sslcert=rogue_cert, sslkey=rogue_key)))
    in_log(
        run, r"TLS handshake failed: client certificate not accepted: unable to get local issuer certificate"
    )


def test_verify_full_needs_the_cn_to_be_the_user(pg: Cluster, halephant: HalephantFactory, pki: Pki) -> None:
    run = halephant.start(
        default_config(pg, client_tls=pki.settings("verify-full", ca_file=str(pki.ca_file)))
    )
    cert, key = pki.client("myapp")
    with psycopg.connect(run.dsn(**verified(pki, sslcert=cert, sslkey=key))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    other_cert, other_key = pki.client("other")
    with pytest.raises(psycopg.OperationalError, match='certificate authentication failed for user "myapp"'):
        psycopg.connect(run.dsn(**verified(pki, sslcert=other_cert, sslkey=other_key)))
    in_log(run, r"rejected: the client certificate's CN \('other'\) is not the user name")
    with pytest.raises(psycopg.OperationalError, match="connection requires a valid client certificate"):
        psycopg.connect(run.dsn(**verified(pki)))


# --- reload ------------------------------------------------------------------------------------------------


def test_reload_gives_new_connections_the_new_certificate(
    pg: Cluster, halephant: HalephantFactory, pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(pki.cert, cert)
    shutil.copy(pki.key, key)
    config = default_config(pg, client_tls={"mode": "require", "cert_file": str(cert), "key_file": str(key)})
    run = halephant.start(config)

    def served() -> str:
        with raw(run) as client:
            der = client.start_tls(pki.context(), server_hostname="127.0.0.1").getpeercert(binary_form=True)
        assert der is not None
        return fingerprint(der)

    assert served() == pem_fingerprint(pki.cert)
    with psycopg.connect(run.dsn(**verified(pki)), autocommit=True) as old:
        assert old.execute("SELECT 1").fetchone() == (1,)
        # other files
        config["client_tls"] = pki.settings("require")
        config["client_tls"].update(cert_file=str(pki.other_cert), key_file=str(pki.other_key))
        run.reload(config, expect="reload: applied ~ client_tls.cert_file")
        assert served() == pem_fingerprint(pki.other_cert)
        assert old.execute("SELECT 2").fetchone() == (2,)  # its TLS session goes on
        # the same file names, new contents (a renewed certificate put in place)
        config["client_tls"].update(cert_file=str(cert), key_file=str(key))
        run.reload(config, expect="reload: applied ~ client_tls.cert_file")
        assert served() == pem_fingerprint(pki.cert)
        shutil.copy(pki.other_cert, cert)
        shutil.copy(pki.other_key, key)
        log = run.reload(config, expect="reload: client_tls: certificate")
        assert served() == pem_fingerprint(pki.other_cert)
        # a broken certificate: the reload is refused, at the key's position, and the last one stays
        cert.write_text("not a certificate\n")
        log = run.reload(config, expect="still running with the previous configuration")
        assert re.search(
            rf"reload failed: {re.escape(str(run.config_path))}:\d+:\d+: client_tls\.cert_file: "
            rf"{re.escape(str(cert))} holds no PEM certificate",
            log,
        ), log
        assert served() == pem_fingerprint(pki.other_cert)
        # TLS turned off: SSLRequest answered N, and the encrypted session still goes on
        config["client_tls"] = {"mode": "disable"}
        run.reload(config, expect="reload: applied ~ client_tls.mode: require -> disable")
        with raw(run) as client:
            client.send(rc.ssl_request())
            assert client.read_byte() == b"N"
        assert old.execute("SELECT 3").fetchone() == (3,)
        assert old.pgconn.ssl_in_use


# --- without client_tls ------------------------------------------------------------------------------------


def test_direct_tls_without_client_tls_is_closed_and_others_are_served(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(default_config(pg))
    with psycopg.connect(run.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # PostgreSQL without ssl closes such a connection without a word, and so does halephant
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(run.dsn(sslmode="require", sslnegotiation="direct"), connect_timeout=5)
        with raw(run) as client:
            client.send(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello
            assert client.rest_of_stream() == b""
        assert conn.execute("SELECT 2").fetchone() == (2,)
    with psycopg.connect(run.dsn()) as conn:
        assert conn.execute("SELECT 3").fetchone() == (3,)
        conn.rollback()
    in_log(run, r"\(starting\) from 127\.0\.0\.1:\d+>: direct TLS refused: client_tls\.mode is disable")
    assert run.alive
