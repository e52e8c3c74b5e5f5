"""A raw-socket PostgreSQL frontend for end-to-end tests of hostile input: byte builders and a reader.

Drivers refuse to send malformed bytes, so tests that check how halephant answers them build every packet
here (StartupMessage, SSLRequest, typed messages with any length) and read the answers message by message.
`RawClient.login()` runs a real SCRAM-SHA-256 exchange (via scramp) so that after-login cases start from an
authenticated session.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from scramp import ScramClient

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

AUTH_OK = 0
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


# --- builders --------------------------------------------------------------------------------------------


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def packet(code: int, body: bytes = b"") -> bytes:
    """An untyped startup-phase packet: int32 length (including itself), int32 code, body."""
    return struct.pack("!ii", len(body) + 8, code) + body


def startup(params: dict[str, str] | None = None, *, major: int = 3, minor: int = 0) -> bytes:
    """A StartupMessage with these parameters (name/value pairs and the final NUL)."""
    body = b"".join(cstr(k) + cstr(v) for k, v in (params or {}).items()) + b"\0"
    return packet((major << 16) | minor, body)


def ssl_request() -> bytes:
    return packet(SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return packet(GSSENC_REQUEST_CODE)


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return packet(CANCEL_REQUEST_CODE, struct.pack("!iI", process_id, secret_key & 0xFFFFFFFF))


def msg(type_: bytes, payload: bytes = b"", *, length: int | None = None) -> bytes:
    """A typed message; `length` overrides the int32 length field (for lying about it)."""
    return type_ + struct.pack("!i", len(payload) + 4 if length is None else length) + payload


def query(sql: str) -> bytes:
    return msg(b"Q", cstr(sql))


def parse(sql: str, name: str = "") -> bytes:
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!h", 0))


def bind(statement: str = "", portal: str = "", result_formats: tuple[int, ...] = ()) -> bytes:
    # no parameter formats, no parameters; result formats: none (all text), one for all, or one per column
    n = len(result_formats)
    return msg(b"B", cstr(portal) + cstr(statement) + struct.pack(f"!hhh{n}h", 0, 0, n, *result_formats))


def describe(kind: str = "P", name: str = "") -> bytes:
    """Describe a statement ('S') or a portal ('P')."""
    return msg(b"D", kind.encode() + cstr(name))


def close(kind: str = "P", name: str = "") -> bytes:
    """Close a statement ('S') or a portal ('P')."""
    return msg(b"C", kind.encode() + cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", cstr(portal) + struct.pack("!i", max_rows))


def sync() -> bytes:
    return msg(b"S")


def terminate() -> bytes:
    return msg(b"X")


# --- reading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    type: bytes
    payload: bytes

    @property
    def fields(self) -> dict[str, str]:
        """The fields of an ErrorResponse or NoticeResponse: {'S': 'FATAL', 'C': '08P01', 'M': ...}."""
        out: dict[str, str] = {}
        for part in self.payload.split(b"\0"):
            if part:
                out[chr(part[0])] = part[1:].decode(errors="replace")
        return out

    @property
    def auth_code(self) -> int:
        (code,) = struct.unpack_from("!i", self.payload)
        return int(code)

    def __repr__(self) -> str:
        if self.type in (b"E", b"N"):
            return f"<{self.type.decode()} {self.fields}>"
        return f"<{self.type!r} {self.payload[:60]!r}>"


class Closed(Exception):
    """The peer closed the connection; `data` holds what it sent that did not form a whole message."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(f"connection closed (trailing bytes {data!r})")
        self.data = data


@dataclass
class Session:
    """What a successful login produced."""

    process_id: int = 0
    secret_key: int = 0
    params: dict[str, str] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)


class RawClient:
    """One TCP connection speaking raw protocol bytes (or, with `unix`, a Unix-domain socket's: the socket
    file `<dir>/.s.PGSQL.<port>`). Every read has a deadline (`timeout` seconds)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 5.0,
        rcvbuf: int | None = None,
        source: str | None = None,
        unix: str | None = None,
    ) -> None:
        if unix is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(unix)
        elif rcvbuf is None:
            # `source`: the local address to connect from (bound first), for tests of address rules
            bind = (source, 0) if source is not None else None
            self.sock = socket.create_connection((host, port), timeout=timeout, source_address=bind)
        else:
            # a small receive buffer is set before connecting: shrunk on an open connection, Linux drops
            # what the window it advertised before still lets in, and the sender crawls on retransmits
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect((host, port))
        if unix is None:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self._buf = b""
        #: the login in progress or last finished, also when it failed (its last message is then the error)
        self.last_session = Session()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None = None) -> ssl.SSLSocket:
        """Send SSLRequest, expect `S`, and go on over TLS (the handshake happens here, within the
        client's timeout); returns the TLS socket (its peer certificate, its version)."""
        self.send(ssl_request())
        answer = self.read_byte()
        assert answer == b"S", f"SSLRequest answered {answer!r}"
        assert not self._buf, f"bytes behind the S: {self._buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        return self.sock

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer in time")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):  # (over TLS: closed without close_notify)
            chunk = b""
        except TimeoutError:
            raise TimeoutError(f"no answer in time (have {self._buf!r})") from None
        if not chunk:
            raise Closed(self._buf)
        self._buf += chunk

    def read_byte(self, timeout: float | None = None) -> bytes:
        """One untyped byte: the answer to SSLRequest/GSSENCRequest."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._buf:
            self._fill(deadline)
        b, self._buf = self._buf[:1], self._buf[1:]
        return b

    def skip_byte(self, expected: bytes, timeout: float | None = None) -> bool:
        """Consume the next byte if it is `expected` (an optional SSLRequest answer); say whether it was."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while not self._buf:
                self._fill(deadline)
        except Closed:
            return False
        if self._buf[:1] != expected:
            return False
        self._buf = self._buf[1:]
        return True

    def read(self, timeout: float | None = None) -> Message:
        """The next typed message; raises `Closed` at end of stream, TimeoutError after the deadline."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self._buf) < 5:
            self._fill(deadline)
        (length,) = struct.unpack_from("!i", self._buf, 1)
        while len(self._buf) < 1 + length:
            self._fill(deadline)
        out = Message(self._buf[:1], self._buf[5 : 1 + length])
        self._buf = self._buf[1 + length :]
        return out

    def read_until(self, *types: bytes, timeout: float | None = None) -> list[Message]:
        """Messages up to and including the first whose type is in `types`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out: list[Message] = []
        while True:
            out.append(self.read(timeout=max(0.0, deadline - time.monotonic())))
            if out[-1].type in types:
                return out

    def read_until_ready(self, timeout: float | None = None) -> list[Message]:
        return self.read_until(b"Z", timeout=timeout)

    def send_until_not_read(self, stream: bytes, within: float = 6.0) -> int:
        """Send `stream` over and over, reading nothing, until the peer stops reading too (a send blocks
        for a second); returns the bytes sent. Fails if the peer still reads after `within` seconds."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)  # little waiting on this side
        self.sock.settimeout(1.0)
        sent = 0
        deadline = time.monotonic() + within
        while True:
            assert time.monotonic() < deadline, f"the peer read {sent >> 20} MB without its answers read"
            try:
                sent += self.sock.send(stream[sent % len(stream) :])
            except TimeoutError:
                return sent

    def rest_of_stream(self) -> bytes:
        """Every byte still to come, unframed, up to the end of the connection."""
        data = self._buf
        while chunk := self.sock.recv(1 << 20):
            data += chunk
        return data

    def read_all(self, timeout: float | None = None) -> tuple[list[Message], bool]:
        """Everything until the peer closes or goes quiet: (messages, closed)."""
        out: list[Message] = []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                out.append(self.read(timeout=max(0.0, deadline - time.monotonic())))
            except Closed:
                return out, True
            except TimeoutError:
                return out, False

    def expect_error(self, timeout: float | None = None) -> Message:
        """Skip notices and the like until an ErrorResponse; fail if the connection closes first."""
        while True:
            try:
                message = self.read(timeout)
            except Closed as exc:
                raise AssertionError(f"connection closed without an ErrorResponse ({exc})") from None
            if message.type == b"E":
                return message

    def expect_fatal_and_close(self, code: str, timeout: float | None = None) -> Message:
        """An ErrorResponse with severity FATAL and SQLSTATE `code`, then the connection closes."""
        error = self.expect_error(timeout)
        assert error.fields.get("S") == "FATAL", error
        assert error.fields.get("C") == code, error
        self.expect_closed(timeout)
        return error

    def expect_closed(self, timeout: float | None = None) -> None:
        """The peer closes the connection (anything it still sends is ignored)."""
        messages, closed = self.read_all(timeout)
        assert closed, f"connection still open; got {messages}"

    def is_closed(self, timeout: float = 0.5) -> bool:
        _, closed = self.read_all(timeout)
        return closed

    # --- login ---

    def login(
        self,
        user: str,
        password: str,
        database: str,
        *,
        extra: dict[str, str] | None = None,
        channel_binding: tuple[str, Any] | None = None,
    ) -> Session:
        """StartupMessage and a SCRAM-SHA-256 exchange, up to ReadyForQuery (see `authenticate`)."""
        self.send(startup({"user": user, "database": database, **(extra or {})}))
        return self.authenticate(user, password, channel_binding=channel_binding)

    def authenticate(
        self,
        user: str,
        password: str,
        *,
        pipelined: bytes = b"",
        channel_binding: tuple[str, Any] | None = None,
    ) -> Session:
        """Answer the authentication requests of a login whose StartupMessage was already sent.

        `pipelined` goes out in the same write as the last SCRAM message, before AuthenticationOk comes.
        `channel_binding`, scramp's (`("tls-server-end-point", the TLS socket or the data)`), makes it
        pick SCRAM-SHA-256-PLUS where offered.
        Raises AssertionError on an ErrorResponse; `last_session.messages` then ends with it."""
        session = self.last_session = Session()
        scram: ScramClient | None = None
        while True:
            message = self.read()
            session.messages.append(message)
            if message.type == b"E":
                raise AssertionError(f"login failed: {message.fields}")
            if message.type == b"R":
                code = message.auth_code
                if code == AUTH_SASL:
                    mechanisms = [m.decode() for m in message.payload[4:].split(b"\0") if m]
                    scram = ScramClient(mechanisms, user, password, channel_binding=channel_binding)
                    first = scram.get_client_first().encode()
                    body = cstr(scram.mechanism_name) + struct.pack("!i", len(first)) + first
                    self.send(msg(b"p", body))
                elif code == AUTH_SASL_CONTINUE:
                    assert scram is not None
                    scram.set_server_first(message.payload[4:].decode())
                    self.send(msg(b"p", scram.get_client_final().encode()) + pipelined)
                elif code == AUTH_SASL_FINAL:
                    assert scram is not None
                    scram.set_server_final(message.payload[4:].decode())
                elif code != AUTH_OK:
                    raise AssertionError(f"unexpected authentication request {code}")
            elif message.type == b"S":
                name, value, _ = message.payload.split(b"\0")
                session.params[name.decode()] = value.decode()
            elif message.type == b"K":
                session.process_id, session.secret_key = struct.unpack("!iI", message.payload)
            elif message.type == b"Z":
                return session

    def simple_query(self, sql: str) -> list[Message]:
        """Send a Query and read up to its ReadyForQuery."""
        self.send(query(sql))
        return self.read_until_ready()


def errors(messages: list[Message]) -> list[dict[str, str]]:
    """The fields of every ErrorResponse among `messages`."""
    return [m.fields for m in messages if m.type == b"E"]


def row_description(message: Message) -> list[tuple[str, int, int]]:
    """The (name, type OID, format code) of each column of a RowDescription."""
    assert message.type == b"T", message
    (n,) = struct.unpack_from("!h", message.payload)
    pos = 2
    out = []
    for _ in range(n):
        end = message.payload.index(b"\0", pos)
        name = message.payload[pos:end].decode()
        _table, _column, oid, _size, _mod, fmt = struct.unpack_from("!ihihih", message.payload, end + 1)
        out.append((name, oid, fmt))
        pos = end + 1 + 18
    return out


def raw_rows(messages: list[Message]) -> list[list[bytes | None]]:
    """The undecoded values of each DataRow (text or binary, as sent)."""
    rows: list[list[bytes | None]] = []
    for m in messages:
        if m.type != b"D":
            continue
        (n,) = struct.unpack_from("!h", m.payload)
        pos = 2
        row: list[bytes | None] = []
        for _ in range(n):
            (length,) = struct.unpack_from("!i", m.payload, pos)
            pos += 4
            if length < 0:
                row.append(None)
            else:
                row.append(m.payload[pos : pos + length])
                pos += length
        rows.append(row)
    return rows


def data_rows(messages: list[Message]) -> list[list[str | None]]:
    """Decode DataRow messages (text format) into lists of values."""
    return [[None if value is None else value.decode() for value in row] for row in raw_rows(messages)]


def assert_one_row_cut_short(data: bytes) -> None:
    """`data` is a DataRow of `repeat('x', ...)` that the connection ended in the middle of, with
    nothing written inside it (an ErrorResponse there would be read as the rest of the value)."""
    assert data[:1] == b"D"
    (length,) = struct.unpack_from("!i", data, 1)
    assert len(data) < 1 + length, "the row was not cut short"
    assert set(data[-1000:]) == {ord("x")}, f"something came inside the row: {data[-120:]!r}"
