"""Idle-client memory probe: how much resident memory a pooler spends per connected but silent client.

    .venv/bin/python bench/idle_clients.py --pid PID HOST:PORT [-n 1000] \
        [--user bench --password bench --dbname bench]

Opens N client connections over plain TCP sockets, each through the full startup handshake (StartupMessage,
then SCRAM-SHA-256 via scramp, MD5 or cleartext, whatever the pooler asks for) up to ReadyForQuery, and leaves
them idle. The pooler's RSS (VmRSS of PID and of any child processes it has) is read before and after, and
reported as MiB per 1,000 idle clients. One more client must then still run ``SELECT 1``: a pooler that stays
small by refusing or stalling clients does not pass. Everything is closed at the end.

``bench/bench.py --idle N`` calls :func:`measure` for PgBouncer and halephant; the goal it checks is in
``bench/README.md``. This is a measurement script, not part of the halephant package.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from scramp import ScramClient

PROTOCOL_VERSION_3 = 196608  # 3.0, as every libpq since 7.4 sends it

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


class HandshakeFailed(Exception):
    """The pooler refused or broke off a client's startup (its ErrorResponse text when it sent one)."""


@dataclass(frozen=True)
class IdleResult:
    """One measurement; RSS values are KiB as /proc reports them."""

    target: str
    pid: int
    clients: int
    rss_before_kib: int
    rss_after_kib: int
    rss_closed_kib: int
    connect_s: float
    extra_client_ok: bool

    @property
    def mib_per_1000(self) -> float:
        return (
            (self.rss_after_kib - self.rss_before_kib) / self.clients * 1000 / 1024 if self.clients else 0.0
        )

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "mib_per_1000": round(self.mib_per_1000, 3)}


def _message(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack("!i", len(payload) + 4) + payload


def _error_text(payload: bytes) -> str:
    """The S/C/M fields of an ErrorResponse, enough to say why a connection failed."""
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return f"{fields.get('S', 'ERROR')} {fields.get('C', '?????')}: {fields.get('M', '')}"


class _Connection:
    """A blocking client socket with just enough framing for startup and one simple query."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self) -> tuple[bytes, bytes]:
        while True:
            if len(self._buf) >= 5:
                (length,) = struct.unpack_from("!i", self._buf, 1)
                if length < 4:
                    raise HandshakeFailed(f"bad message length {length}")
                if len(self._buf) >= 1 + length:
                    tag, payload = bytes(self._buf[:1]), bytes(self._buf[5 : 1 + length])
                    del self._buf[: 1 + length]
                    return tag, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HandshakeFailed("connection closed by the pooler")
            self._buf += chunk

    def expect_auth(self, code: int) -> bytes:
        tag, payload = self.read_message()
        if tag == b"E":
            raise HandshakeFailed(_error_text(payload))
        if tag != b"R" or struct.unpack_from("!i", payload)[0] != code:
            raise HandshakeFailed(f"expected authentication message {code}, got {tag!r} {payload[:16]!r}")
        return payload[4:]


def _sasl(conn: _Connection, mechanisms: list[str], user: str, password: str) -> None:
    # No TLS here, so no channel binding: only the plain mechanism can be chosen.
    if "SCRAM-SHA-256" not in mechanisms:
        raise HandshakeFailed(f"no usable SASL mechanism in {mechanisms}")
    client = ScramClient(["SCRAM-SHA-256"], user, password)
    first = client.get_client_first().encode()
    conn.send(_message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
    client.set_server_first(conn.expect_auth(AUTH_SASL_CONTINUE).decode())
    conn.send(_message(b"p", client.get_client_final().encode()))
    client.set_server_final(conn.expect_auth(AUTH_SASL_FINAL).decode())
    conn.expect_auth(AUTH_OK)


def open_client(
    host: str, port: int, user: str, password: str, dbname: str, timeout: float = 30.0
) -> _Connection:
    """Connect and run the startup handshake until the first ReadyForQuery."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = _Connection(sock)
    try:
        params = b"user\0" + user.encode() + b"\0database\0" + dbname.encode() + b"\0"
        params += b"application_name\0idle_clients\0\0"
        body = struct.pack("!i", PROTOCOL_VERSION_3) + params
        conn.send(struct.pack("!i", len(body) + 4) + body)
        while True:
            tag, payload = conn.read_message()
            if tag == b"E":
                raise HandshakeFailed(_error_text(payload))
            if tag == b"Z":
                return conn
            if tag != b"R":
                continue  # ParameterStatus, BackendKeyData, NoticeResponse: not needed here
            (code,) = struct.unpack_from("!i", payload)
            if code == AUTH_OK:
                continue
            if code == AUTH_SASL:
                mechanisms = [m.decode() for m in payload[4:].split(b"\0") if m]
                _sasl(conn, mechanisms, user, password)
            elif code == AUTH_MD5:
                inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                digest = b"md5" + hashlib.md5(inner + payload[4:8]).hexdigest().encode()
                conn.send(_message(b"p", digest + b"\0"))
            elif code == AUTH_CLEARTEXT:
                conn.send(_message(b"p", password.encode() + b"\0"))
            else:
                raise HandshakeFailed(f"unsupported authentication request {code}")
    except BaseException:
        sock.close()
        raise


def select_one(conn: _Connection) -> bool:
    """Run ``SELECT 1`` with the simple protocol; True when it returned the row and ended ReadyForQuery."""
    conn.send(_message(b"Q", b"SELECT 1\0"))
    got_row = False
    while True:
        tag, payload = conn.read_message()
        if tag == b"D":
            got_row = payload == struct.pack("!hi", 1, 1) + b"1"
        elif tag == b"E":
            got_row = False
        elif tag == b"Z":
            return got_row


def close_client(conn: _Connection) -> None:
    with contextlib.suppress(OSError):
        conn.send(_message(b"X", b""))  # Terminate, as a polite client would
    conn.sock.close()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of the process plus that of its descendants (a pooler may fork workers)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
        todo.extend(_children(p))
    return total


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def measure(
    host: str,
    port: int,
    *,
    pid: int,
    clients: int = 1000,
    user: str = "bench",
    password: str = "bench",
    dbname: str = "bench",
    settle_s: float = 1.0,
    target: str = "",
    progress: Callable[[str], None] | None = None,
) -> IdleResult:
    """Open ``clients`` idle connections to HOST:PORT and return the RSS growth of process ``pid``."""
    say = progress or (lambda _line: None)
    _raise_fd_limit(clients + 64)
    # Warm-up: the first query makes the pooler open its server connection and touch its query path, so the
    # baseline already holds what any pooler needs once rather than per client.
    warm = open_client(host, port, user, password, dbname)
    try:
        if not select_one(warm):
            raise HandshakeFailed("warm-up SELECT 1 failed")
    finally:
        close_client(warm)
    time.sleep(settle_s)
    before = rss_kib(pid)
    say(f"{target or f'{host}:{port}'} pid {pid}: VmRSS before {before} KiB")
    conns: list[_Connection] = []
    extra_ok = False
    t0 = time.monotonic()
    try:
        step = max(1, clients // 4)
        for i in range(1, clients + 1):
            conns.append(open_client(host, port, user, password, dbname))
            if i % step == 0 and i != clients:
                rss = rss_kib(pid)
                say(
                    f"  {i:6d} idle clients: VmRSS {rss} KiB (+{rss - before}) [{time.monotonic() - t0:.1f}s]"
                )
        connect_s = time.monotonic() - t0
        time.sleep(settle_s)
        after = rss_kib(pid)
        say(f"  {clients:6d} idle clients: VmRSS {after} KiB (+{after - before}) [{connect_s:.1f}s]")
        extra = open_client(host, port, user, password, dbname)
        try:
            extra_ok = select_one(extra)
        finally:
            close_client(extra)
        say(f"  one more client ran SELECT 1: {'yes' if extra_ok else 'NO'}")
    finally:
        for conn in conns:
            close_client(conn)
    time.sleep(settle_s)
    closed = rss_kib(pid)
    return IdleResult(
        target=target or f"{host}:{port}",
        pid=pid,
        clients=clients,
        rss_before_kib=before,
        rss_after_kib=after,
        rss_closed_kib=closed,
        connect_s=round(connect_s, 2),
        extra_client_ok=extra_ok,
    )


def format_result(r: IdleResult) -> str:
    return (
        f"{r.target}: {r.clients} idle clients: VmRSS {r.rss_before_kib} -> {r.rss_after_kib} KiB "
        f"(+{r.rss_after_kib - r.rss_before_kib} KiB) = {r.mib_per_1000:.2f} MiB per 1,000 idle clients; "
        f"connects took {r.connect_s:.1f}s; "
        f"one more client ran SELECT 1: {'yes' if r.extra_client_ok else 'NO'}; "
        f"VmRSS after closing all: {r.rss_closed_kib} KiB"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("target", metavar="HOST:PORT", help="the pooler's client address")
    ap.add_argument("--pid", type=int, required=True, help="the pooler's process id (its RSS is measured)")
    ap.add_argument("-n", "--clients", type=int, default=1000, help="idle clients to open (default 1000)")
    ap.add_argument("--user", default="bench")
    ap.add_argument("--password", default="bench")
    ap.add_argument("--dbname", default="bench")
    ap.add_argument("--json", metavar="FILE", help="append the result as one JSON line")
    a = ap.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    try:
        result = measure(
            host or "127.0.0.1",
            int(port),
            pid=a.pid,
            clients=a.clients,
            user=a.user,
            password=a.password,
            dbname=a.dbname,
            target=a.target,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (OSError, HandshakeFailed) as exc:
        print(f"idle_clients: {exc}", file=sys.stderr)
        return 1
    print(format_result(result))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"kind": "idle", **result.as_dict()}) + "\n")
    return 0 if result.extra_client_ok else 1


if __name__ == "__main__":
    sys.exit(main())
