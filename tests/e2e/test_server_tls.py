"""End to end: TLS from halephant to PostgreSQL (`clusters.<name>.tls`), against a node with ssl = on whose
pg_hba.conf takes TCP logins over TLS only (`tls_pg`, see `support.tls`) and the session's plaintext
cluster (`pg`, ssl = off), side by side in one halephant.

Server connections, probes, cancel requests and the shared LISTEN connection go over TLS with `require`
and the verify modes; `prefer` (the default) uses it where offered and goes on in plaintext where not;
`disable` against the TLS-only node, `require` against the plaintext one, a wrong CA and a name the
certificate does not hold fail with a refused login (28000) that says why, in the client's error and in
the log, while the other cluster's database is served on. A client certificate logs in as a role whose
pg_hba.conf line is `cert`. A TLS connection lost after login (cut at a relay, no close_notify) fails its
client only, with 08006. A reload that changes a cluster's TLS settings replaces its servers. Logins are
bound to the node's certificate (SCRAM-SHA-256-PLUS): through a man in the middle that presents another
one, the pooled servers', the probes' and the auth_query lookup's logins are refused by PostgreSQL.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import psycopg.errors
import pytest
import trustme
from support.halephant import HalephantFactory, Running
from support.leaks import assert_clean_servers
from support.polling import wait_until
from support.tls import CERT_USER, SERVER_NAME, TlsFiles

from halephant.testing.pgcluster import Cluster, pgbench

pytestmark = pytest.mark.e2e

SSL_OF_MINE = "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
BENCH_DB = "e2e_tls_bench"


def config(tls_pg: Cluster, pg: Cluster, host: str = "127.0.0.1", **tls: Any) -> dict[str, Any]:
    """Cluster `secure` (the TLS-only node, as `host`, with `tls`) serves database myapp; cluster `plain`
    (the ssl = off primary, default settings) serves database plainapp (its myapp)."""
    return {
        "clusters": {
            "secure": {
                "nodes": [f"{host}:{tls_pg.primary.port}"],
                "probe_user": "myapp",
                **({"tls": tls} if tls else {}),
            },
            "plain": {"nodes": [f"127.0.0.1:{pg.primary.port}"], "probe_user": "myapp"},
        },
        "databases": {
            "myapp": {"cluster": "secure", "pool_size": 3},
            "plainapp": {"cluster": "plain", "database": "myapp", "pool_size": 2},
            BENCH_DB: {"cluster": "secure", "pool_size": 4},
        },
        "users": {
            "myapp": {"password": "myapp"},
            CERT_USER: {"password": "certpw", "auth": "scram-sha-256"},
            "admin": {"password": "admin-pw"},
        },
        "admin": {"users": ["admin"]},
        "topology": {"interval": "300ms"},
        "limits": {"connect_timeout": "3s", "server_login_retry": "1s"},
    }


def connect(run: Running, dbname: str = "myapp", user: str = "myapp", password: str = "myapp") -> Any:
    return psycopg.connect(run.dsn(user=user, password=password, dbname=dbname), autocommit=True)


def ssl_of_mine(run: Running, dbname: str = "myapp") -> tuple[bool, str | None]:
    with connect(run, dbname) as conn:
        row = conn.execute(SSL_OF_MINE).fetchone()
    assert row is not None
    return row[0], row[1]


@dataclass(frozen=True)
class Refusal:
    sqlstate: str
    message: str
    hint: str


def refused(run: Running, dbname: str = "myapp", user: str = "myapp", password: str = "myapp") -> Refusal:
    """The error a login fails with (asyncpg: psycopg has no SQLSTATE for a failed connection)."""

    async def attempt() -> Refusal:
        with pytest.raises(asyncpg.PostgresError) as excinfo:
            conn = await asyncpg.connect(
                host=run.host, port=run.port, user=user, password=password, database=dbname, ssl=False
            )
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()
        exc = excinfo.value
        return Refusal(str(exc.sqlstate), str(exc.args[0]), str(getattr(exc, "hint", None) or ""))

    return asyncio.run(attempt())


def show_servers(run: Running) -> list[dict[str, Any]]:
    with psycopg.connect(
        run.dsn(user="admin", password="admin-pw", dbname="halephant"),
        autocommit=True,
        cursor_factory=psycopg.ClientCursor,
    ) as console:
        cur = console.execute("SHOW SERVERS")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@pytest.fixture(autouse=True)
def _clean(tls_pg: Cluster, pg: Cluster) -> Iterator[None]:
    yield
    assert_clean_servers(tls_pg)
    assert_clean_servers(pg.primary)


# --- the modes ------------------------------------------------------------------------------------------


def test_require_goes_over_tls_and_says_so(tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(config(tls_pg, pg, mode="require"))
    ssl, version = ssl_of_mine(run)
    assert ssl is True and version is not None and version.startswith("TLSv1.")
    # the plaintext cluster, at the default prefer: the SSLRequest is answered N, and it goes on
    assert ssl_of_mine(run, "plainapp") == (False, None)
    servers = {row["database"]: row["tls"] for row in show_servers(run)}
    assert servers["myapp"].startswith(f"{version}/"), servers
    assert servers["plainapp"] == "", servers
    log = run.log_text()
    opened = rf"myapp@127\.0\.0\.1:{tls_pg.primary.port}: server connection opened \(pid \d+, now 1, "
    assert re.search(opened + r"tls TLSv1\.\d/\w+", log), log
    assert re.search(
        r"server connection opened \(pid \d+, now 1, no tls: the server does not offer it\)", log
    ), log
    nodes = {node["port"]: node for node in run.admin_json("/nodes")}
    # the probes log in over TLS too: the TLS-only node is up, and the primary
    assert nodes[tls_pg.primary.port]["usable"] is True, nodes
    assert nodes[tls_pg.primary.port]["role"] == "primary", nodes


#: TLSv1.2 suites the default cipher list ranks below the AES-256 ones: chosen only when `ciphers` says so
AES128_ONLY = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"


def test_ciphers_restrict_what_a_tls_1_2_server_connection_negotiates(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory
) -> None:
    # (the cipher list governs TLSv1.2: the node is held to it for the test)
    tls_pg.primary.sql("ALTER SYSTEM SET ssl_max_protocol_version = 'TLSv1.2'; SELECT pg_reload_conf()")
    try:
        cipher_of_mine = "SELECT version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        default = halephant.start(config(tls_pg, pg, mode="require"))
        with connect(default) as conn:
            assert conn.execute(cipher_of_mine).fetchone() == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")
        default.stop()
        run = halephant.start(config(tls_pg, pg, mode="require", ciphers=AES128_ONLY))
        with connect(run) as conn:
            assert conn.execute(cipher_of_mine).fetchone() == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
        run.stop()
        # a list the node shares nothing of fails the handshake, logged as such
        refusing = halephant.start(config(tls_pg, pg, mode="require", ciphers="AES128-SHA"))
        failed = refused(refusing)
        assert failed.sqlstate == "28000" and "HANDSHAKE_FAILURE" in failed.message, failed
        assert "(min_version, ciphers, cert_file)" in failed.hint, failed
        refusing.stop()
    finally:
        tls_pg.primary.sql("ALTER SYSTEM RESET ssl_max_protocol_version; SELECT pg_reload_conf()")
    assert_clean_servers(tls_pg.primary)


def test_prefer_is_the_default_and_takes_tls_where_offered(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(config(tls_pg, pg))  # no tls: anywhere
    assert ssl_of_mine(run)[0] is True
    assert ssl_of_mine(run, "plainapp") == (False, None)


def test_disable_against_a_tls_only_node_is_refused_and_the_rest_is_served(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(config(tls_pg, pg, mode="disable"))
    error = refused(run)
    assert error.sqlstate == "28000", error
    assert "halephant's login to the server failed: " in error.message and "no encryption" in error.message
    assert error.hint is not None and "clusters.secure.tls.mode is disable" in error.hint
    assert ssl_of_mine(run, "plainapp") == (False, None)
    log = wait_until(
        lambda: (t := run.log_text()) and "server login refused: 28000" in t and t, "refusal logged"
    )
    assert "no encryption" in log
    # the probes are refused alike, and say why
    assert re.search(
        rf"cluster secure: probe of 127\.0\.0\.1:{tls_pg.primary.port} failed: pg_hba\.conf rejects .*no "
        r"encryption \(28000\) \(the node takes this login over TLS only: check clusters\.secure\.tls\."
        r"mode\)",
        log,
    ), log


def test_require_against_a_server_without_ssl_is_refused_as_libpq_says(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory
) -> None:
    cfg = config(tls_pg, pg, mode="require")
    cfg["clusters"]["plain"]["tls"] = {"mode": "require"}
    run = halephant.start(cfg)
    error = refused(run, "plainapp")
    assert error.sqlstate == "28000", error
    assert "server does not support SSL, but SSL was required" in error.message
    assert "ssl = off" in error.hint
    log = run.log_text()
    assert re.search(
        r"pool plainapp/myapp@127\.0\.0\.1:\d+: server login refused: 28000 halephant's login to the server "
        r"failed: server does not support SSL, but SSL was required",
        log,
    ), log
    assert ssl_of_mine(run)[0] is True  # the other cluster is served on


def test_verify_full_checks_the_ca_and_the_name(
    tls_pg: Cluster, pg: Cluster, tls_files: TlsFiles, halephant: HalephantFactory
) -> None:
    run = halephant.start(config(tls_pg, pg, host=SERVER_NAME, mode="verify-full", ca_file=tls_files.ca_file))
    assert ssl_of_mine(run)[0] is True


def test_verify_full_refuses_a_certificate_of_another_ca(
    tls_pg: Cluster, pg: Cluster, tls_files: TlsFiles, halephant: HalephantFactory
) -> None:
    run = halephant.start(
        config(tls_pg, pg, host=SERVER_NAME, mode="verify-full", ca_file=tls_files.wrong_ca_file)
    )
    error = refused(run)
    assert error.sqlstate == "28000", error
    assert re.search(
        "server certificate verification failed: (self-signed certificate in certificate chain|unable to get "
        "local issuer certificate)",
        error.message,
    ), error
    assert "clusters.secure.tls.ca_file" in error.hint
    assert (
        "server login refused: 28000 halephant's login to the server failed: server certificate "
        in run.log_text()
    )
    assert ssl_of_mine(run, "plainapp") == (False, None)
    assert re.search(
        rf"cluster secure: probe of localhost:{tls_pg.primary.port} failed: server certificate verification "
        "failed: ",
        run.log_text(),
    ), run.log_text()


def test_verify_full_refuses_a_name_the_certificate_does_not_hold(
    tls_pg: Cluster, pg: Cluster, tls_files: TlsFiles, halephant: HalephantFactory
) -> None:
    # the certificate names localhost; the node is written 127.0.0.1
    run = halephant.start(config(tls_pg, pg, mode="verify-full", ca_file=tls_files.ca_file))
    error = refused(run)
    assert error.sqlstate == "28000", error
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in error.message, error
    # verify-ca checks the CA only
    run = halephant.start(config(tls_pg, pg, mode="verify-ca", ca_file=tls_files.ca_file))
    assert ssl_of_mine(run)[0] is True


def test_a_client_certificate_logs_in_where_pg_hba_says_cert(
    tls_pg: Cluster, pg: Cluster, tls_files: TlsFiles, halephant: HalephantFactory
) -> None:
    run = halephant.start(
        config(tls_pg, pg, mode="require", cert_file=tls_files.cert_file, key_file=tls_files.key_file)
    )
    with connect(run, user=CERT_USER, password="certpw") as conn:
        assert conn.execute(
            "SELECT current_user, (" + SSL_OF_MINE.replace(", version", "") + ")"
        ).fetchone() == (
            CERT_USER,
            True,
        )
    # without it, PostgreSQL refuses the login
    run = halephant.start(config(tls_pg, pg, mode="require"))
    error = refused(run, user=CERT_USER, password="certpw")
    assert error.sqlstate == "28000" and "certificate" in error.message, error


def test_a_unix_socket_node_never_uses_tls(tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory) -> None:
    # as libpq: TLS is for TCP; `require` on a socket directory connects in plaintext
    cfg = config(tls_pg, pg, mode="require")
    cfg["clusters"]["secure"]["nodes"] = [f"{tls_pg.sockdir}:{tls_pg.primary.port}"]
    run = halephant.start(cfg)
    assert ssl_of_mine(run) == (False, None)
    assert re.search(r"server connection opened \(pid \d+, now 1\)", run.log_text())


# --- what goes over the TLS connections -------------------------------------------------------------------


class Relay:
    """A TCP relay to a node that notes how each connection through it starts (its first 8 bytes: an
    SSLRequest, a StartupMessage's or a CancelRequest's header), the bytes passed on as they come; `cut`
    ends one connection in the middle of its TLS stream, as a vanished server or network would."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.starts: list[bytes] = []
        #: (halephant's side, PostgreSQL's side) of each connection
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(down,), daemon=True).start()

    def _serve(self, down: socket.socket) -> None:
        with down, socket.create_connection(("127.0.0.1", self.target)) as up:
            self.pairs.append((down, up))
            self.starts.append(down.recv(8, socket.MSG_PEEK | socket.MSG_WAITALL))
            back = threading.Thread(target=self._pump, args=(up, down), daemon=True)
            back.start()
            self._pump(down, up)
            back.join(10)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self, backend_port: int) -> None:
        """End the connection whose PostgreSQL backend sees the relay at `backend_port`
        (pg_stat_activity.client_port), both ways at once, with no TLS close_notify."""
        # the newest first: a port may have served an earlier connection (a probe's, a cancel's), whose
        # sockets are closed by now, or are being closed
        for down, up in reversed(list(self.pairs)):
            try:
                if up.getsockname()[1] != backend_port:
                    continue
            except OSError:
                continue  # closed already
            for sock in (down, up):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the relay's thread, seeing the first end, may have closed the other already
            return
        raise AssertionError(f"no relayed connection from port {backend_port}")

    def close(self) -> None:
        self.listener.close()


def _behind_a_relay(tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory) -> tuple[Relay, Running]:
    """halephant with `mode: require`, reaching the TLS-only node through a `Relay`."""
    relay = Relay(tls_pg.primary.port)
    cfg = config(tls_pg, pg, mode="require")
    cfg["clusters"]["secure"]["nodes"] = [f"127.0.0.1:{relay.port}"]
    try:
        return relay, halephant.start(cfg)
    except BaseException:
        relay.close()
        raise


def test_a_cancel_reaches_a_tls_only_node_over_tls(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory
) -> None:
    relay, run = _behind_a_relay(tls_pg, pg, halephant)
    try:
        _cancel_a_sleep(run, tls_pg)
    finally:
        relay.close()
    # every connection to the node started with an SSLRequest: the probes', the server's and the
    # cancel request's (in plaintext, it would start with CancelRequest's length and code)
    assert len(relay.starts) >= 3, relay.starts
    assert set(relay.starts) == {SSL_REQUEST}, relay.starts
    log = run.log_text()
    assert re.search(r"forwarding cancel request to server pid \d+ over TLS", log), log
    assert "cancel request failed" not in log, log


def _cancel_a_sleep(run: Running, tls_pg: Cluster) -> None:
    with connect(run) as conn:
        out: list[BaseException | None] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(10)")
                out.append(None)
            except BaseException as exc:
                out.append(exc)

        thread = threading.Thread(target=sleep)
        started = time.monotonic()
        thread.start()
        wait_until(
            lambda: (
                tls_pg.primary.sql(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'"
                )
                == "1"
            ),
            "the sleep running",
        )
        conn.cancel_safe(timeout=5)
        thread.join(10)
        assert isinstance(out[0], psycopg.errors.QueryCanceled), out
        assert time.monotonic() - started < 8
        assert conn.execute("SELECT 1").fetchone() == (1,)


class MitmRelay:
    """A man in the middle: answers halephant's SSLRequest itself, terminates its TLS with another
    certificate (of another CA), and relays the decrypted bytes over a TLS connection of its own to the
    node. `tls.mode` require does not check certificates, so only the SCRAM login's channel binding can
    tell: PostgreSQL binds to its own certificate, halephant to the one it was shown."""

    def __init__(self, port: int, directory: pathlib.Path) -> None:
        self.target = port
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()
        chain = trustme.CA().issue_cert(SERVER_NAME)
        chain.cert_chain_pems[0].write_to_path(directory / "mitm.crt")
        chain.private_key_pem.write_to_path(directory / "mitm.key")
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_context.load_cert_chain(directory / "mitm.crt", directory / "mitm.key")
        self.client_context = ssl.create_default_context()
        self.client_context.check_hostname = False
        self.client_context.verify_mode = ssl.CERT_NONE
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        self.loop.close()

    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self.writers.add(down_w)
        try:
            if await down_r.readexactly(8) != SSL_REQUEST:
                return
            down_w.write(b"S")
            await down_w.drain()
            await down_w.start_tls(self.server_context)
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
            self.writers.add(up_w)
            up_w.write(SSL_REQUEST)
            assert await up_r.readexactly(1) == b"S"
            await up_w.start_tls(self.client_context)
            self.connections += 1
            await asyncio.gather(self._pump(down_r, up_w), self._pump(up_r, down_w))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            down_w.close()

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def _shutdown(self) -> None:
        self.server.close()
        for writer in self.writers:
            if not writer.transport.is_closing():
                writer.transport.abort()
        await asyncio.sleep(0.1)  # (the aborted transports' sockets are closed on the next rounds)
        self.loop.stop()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        self.thread.join(10)


def test_a_man_in_the_middle_with_another_certificate_cannot_relay_the_login(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory, tmp_path: pathlib.Path
) -> None:
    # SCRAM-SHA-256-PLUS binds halephant's login to the certificate it was shown: PostgreSQL, which
    # binds to its own, refuses it (with SCRAM-SHA-256 the relay would pass the exchange through)
    relay = MitmRelay(tls_pg.primary.port, tmp_path)
    cfg = config(tls_pg, pg, mode="require")
    cfg["clusters"]["secure"]["nodes"] = [f"127.0.0.1:{relay.port}"]
    cfg["databases"]["lookupapp"] = {"cluster": "secure", "database": "myapp", "auth_user": "myapp"}
    try:
        run = halephant.start(cfg)
        error = refused(run)
        assert error.sqlstate == "28000", error
        assert error.message == "halephant's login to the server failed: SCRAM channel binding check failed"
        assert "a man in the middle?" in error.hint and "clusters.secure.tls.mode verify-full" in error.hint
        log = wait_until(lambda: (t := run.log_text()) and "probe of" in t and t, "the refusals logged")
        assert re.search(
            r"pool myapp/myapp@127\.0\.0\.1:\d+: server login refused: \w+ .*SCRAM channel binding check "
            "failed",
            log,
        ), log
        assert re.search(
            rf"cluster secure: probe of 127\.0\.0\.1:{relay.port} failed: SCRAM channel binding check failed "
            r"\(28000\) \(the node's certificate is not the one the probe was shown: a man in the middle\?",
            log,
        ), log
        assert relay.connections >= 2  # the relay did terminate TLS (a pooled server's and a probe's)
        # the auth_query lookup's login alike: a user it would find is refused
        error = refused(run, dbname="lookupapp", user="tls_looked_up", password="looked-up-pw")
        assert error.sqlstate == "08006", error
        assert re.search(
            r"password lookup for user 'tls_looked_up' failed: login as the auth_user failed: SCRAM channel "
            r"binding check failed \(28000\)",
            run.log_text(),
        ), run.log_text()
        assert ssl_of_mine(run, "plainapp") == (False, None)  # the other cluster is served on
    finally:
        relay.close()


def test_pgbench_over_tls(tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory, run_client: Any) -> None:
    tls_pg.create_database(BENCH_DB, owner="myapp")
    pgbench(tls_pg.primary, "-i", "-q", "-s", "1", dbname=BENCH_DB, user="myapp")
    run = halephant.start(config(tls_pg, pg, mode="require"))
    for protocol in ("simple", "extended"):
        out = run_client(
            "pgbench", run, ["-n", "-S", "-M", protocol, "-c", "8", "-j", "2", "-T", "2"], dbname=BENCH_DB
        )
        assert out.returncode == 0, out.stdout + out.stderr
        processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
        assert processed is not None and int(processed.group(1)) > 100, out.stdout
        assert failed is not None and int(failed.group(1)) == 0, out.stdout
    backends = tls_pg.primary.sql(
        f"SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
        f"WHERE a.datname = '{BENCH_DB}' AND a.client_addr IS NOT NULL"
    )
    count, all_ssl = backends.split("|")
    assert int(count) >= 1 and all_ssl == "t", backends


def test_listen_and_notify_over_tls(tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(config(tls_pg, pg, mode="require"))
    with connect(run) as listener, connect(run) as notifier:
        listener.execute("LISTEN tls_channel")
        notifier.execute("NOTIFY tls_channel, 'over tls'")
        got = next(listener.notifies(timeout=5, stop_after=1))
        assert (got.channel, got.payload) == ("tls_channel", "over tls")
        listener.execute("UNLISTEN tls_channel")
    shared = tls_pg.primary.sql(
        "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
        "WHERE a.application_name = 'halephant listener'"
    )
    assert shared == "t"
    assert re.search(r"shared listener for \S+: connected \(pid \d+, tls TLSv1", run.log_text())


def test_scram_pass_through_over_tls(tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory) -> None:
    # the client's SCRAM login gives the key halephant logs in upstream with, over TLS with
    # SCRAM-SHA-256-PLUS: the proof covers the channel binding
    verifier = tls_pg.primary.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'myapp'")
    assert verifier.startswith("SCRAM-SHA-256$")
    cfg = config(tls_pg, pg, mode="require")
    cfg["users"]["myapp"] = {"password": verifier}
    run = halephant.start(cfg)
    assert ssl_of_mine(run)[0] is True


def test_users_looked_up_with_auth_query_over_tls(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory
) -> None:
    # the lookup's own connection (as auth_user) goes over TLS like the pools': the node refuses plaintext
    tls_pg.primary.sql(
        "DROP ROLE IF EXISTS tls_lookup; DROP ROLE IF EXISTS tls_looked_up;"
        " SET password_encryption = 'scram-sha-256';"
        " CREATE ROLE tls_lookup LOGIN SUPERUSER PASSWORD 'tls_lookup';"
        " CREATE ROLE tls_looked_up LOGIN PASSWORD 'looked-up-pw';"
    )
    cfg = config(tls_pg, pg, mode="require")
    cfg["databases"]["myapp"]["auth_user"] = "tls_lookup"
    cfg["users"]["tls_lookup"] = {"password": "tls_lookup"}
    try:
        run = halephant.start(cfg)
        with connect(run, user="tls_looked_up", password="looked-up-pw") as conn:
            row = conn.execute(f"SELECT current_user, ssl FROM ({SSL_OF_MINE}) s").fetchone()
        assert row == ("tls_looked_up", True)
        assert "password lookup for user" not in run.log_text()
    finally:
        tls_pg.primary.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE usename IN ('tls_lookup', 'tls_looked_up')"
        )


def test_a_server_ended_under_its_client_fails_that_client_only(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(config(tls_pg, pg, mode="require"))
    with connect(run) as victim, connect(run) as bystander:
        victim.execute("BEGIN")
        bystander.execute("BEGIN")
        pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        other = bystander.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        tls_pg.primary.sql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(psycopg.OperationalError) as excinfo:
            victim.execute("SELECT 1")
        assert excinfo.value.sqlstate in ("57P01", "08006"), excinfo.value
        assert bystander.execute("SELECT pg_backend_pid()").fetchone() == (other,)
        bystander.execute("COMMIT")
    assert ssl_of_mine(run)[0] is True


def test_a_tls_connection_lost_fails_its_client_only_with_08006(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory
) -> None:
    relay, run = _behind_a_relay(tls_pg, pg, halephant)
    try:
        with connect(run) as victim, connect(run) as bystander:
            victim.execute("BEGIN")
            bystander.execute("BEGIN")
            pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            other = bystander.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            relay.cut(int(tls_pg.primary.sql(f"SELECT client_port FROM pg_stat_activity WHERE pid = {pid}")))
            with pytest.raises(psycopg.OperationalError) as excinfo:
                victim.execute("SELECT 1")
            assert excinfo.value.sqlstate == "08006", excinfo.value
            assert bystander.execute("SELECT pg_backend_pid()").fetchone() == (other,)
            bystander.execute("COMMIT")
        assert ssl_of_mine(run)[0] is True  # a new server for the next client
        wait_until(lambda: pid not in _backends(tls_pg), "the cut backend gone")
    finally:
        relay.close()


# --- reload -----------------------------------------------------------------------------------------------


def _backends(tls_pg: Cluster) -> set[int]:
    out = tls_pg.primary.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = 'myapp' AND usename = 'myapp' "
        "AND client_addr IS NOT NULL AND application_name <> 'halephant topology'"
    )
    return {int(pid) for pid in out.split()}


def test_a_reload_that_changes_the_mode_replaces_the_servers(
    tls_pg: Cluster, pg: Cluster, tls_files: TlsFiles, halephant: HalephantFactory
) -> None:
    cfg = config(tls_pg, pg, mode="require")
    run = halephant.start(cfg)
    with connect(run) as idle_one:
        first = idle_one.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    # disable: the idle server closes at once, and new logins are refused (the node takes TLS only)
    cfg["clusters"]["secure"]["tls"] = {"mode": "disable"}
    log = run.reload(cfg, "~ clusters.secure.tls.mode: require -> disable")
    assert "a reload changed clusters.secure.tls" in log[log.rindex("SIGHUP") if "SIGHUP" in log else 0 :]
    wait_until(lambda: first not in _backends(tls_pg), "the require-mode server closed")
    error = refused(run)
    assert error.sqlstate == "28000" and "no encryption" in error.message, error
    # verify-ca: served over TLS again; a server busy in a transaction during the reload is closed as it
    # comes back, not handed to another transaction
    cfg["clusters"]["secure"]["tls"] = {"mode": "require"}
    run.reload(cfg, "~ clusters.secure.tls.mode: disable -> require")
    with connect(run) as busy:
        wait_until(lambda: ssl_of_mine(run)[0] is True, "served over TLS again")
        busy.execute("BEGIN")
        old = busy.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        cfg["clusters"]["secure"]["tls"] = {"mode": "verify-ca", "ca_file": tls_files.ca_file}
        run.reload(cfg, "~ clusters.secure.tls.mode: require -> verify-ca")
        assert busy.execute("SELECT pg_backend_pid()").fetchone() == (old,)  # its transaction goes on
        busy.execute("COMMIT")
        wait_until(lambda: old not in _backends(tls_pg), "the busy server closed once it came back")
        row = busy.execute(SSL_OF_MINE).fetchone()
        assert row is not None and row[0] is True
        assert busy.execute("SELECT pg_backend_pid()").fetchone() != (old,)


def test_a_reload_to_a_file_that_does_not_load_changes_nothing(
    tls_pg: Cluster, pg: Cluster, halephant: HalephantFactory
) -> None:
    cfg = config(tls_pg, pg, mode="require")
    run = halephant.start(cfg)
    cfg["clusters"]["secure"]["tls"] = {"mode": "verify-ca", "ca_file": "/no/such/ca.crt"}
    log = run.reload(cfg, "still running with the previous configuration")
    assert re.search(
        r"reload failed: \S+:\d+:\d+: clusters\.secure\.tls\.ca_file: cannot read /no/such/ca.crt", log
    ), log
    assert ssl_of_mine(run)[0] is True
