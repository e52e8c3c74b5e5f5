"""The startup phase: untyped packets a client sends before it is logged in.

A packet is an int32 length (including itself) and an int32 code: SSLRequest, GSSENCRequest, CancelRequest,
or a protocol version followed by NUL-terminated name/value pairs (StartupMessage). `StartupFramer` turns
bytes into these packets; everything that PostgreSQL would refuse is refused here with the SQLSTATE and,
where it has one, the text PostgreSQL uses.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field

from halephant import sqlstate
from halephant.errors import ClientError, ProtocolViolation
from halephant.protocol import codes


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """Protocol 3.x startup; `minor` > 0 or `_pq_.*` options call for NegotiateProtocolVersion."""

    minor: int
    params: dict[str, str]
    protocol_options: list[str] = field(default_factory=list)

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        # libpq's rule: the database defaults to the user name
        return self.params.get("database") or self.user

    @property
    def replication(self) -> bool:
        """Asks for a replication connection (physical, or logical with `database`)."""
        value = self.params.get("replication")
        return value is not None and (value == "database" or parse_bool(value) is True)


def parse_bool(value: str) -> bool | None:
    """PostgreSQL's parse_bool: a non-empty prefix of true/yes/false/no, on/off (two letters at least), 1
    or 0, in any case; None for anything else."""
    lowered = value.lower()
    if lowered in ("1", "0"):
        return lowered == "1"
    if len(lowered) >= 2 and lowered in ("on", "off", "of"):
        return lowered == "on"
    for word, meaning in (("true", True), ("yes", True), ("false", False), ("no", False)):
        if lowered and word.startswith(lowered):
            return meaning
    return None


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage

_LENGTH = _CODE = struct.Struct("!i")


class StartupFramer:
    """Frames startup-phase packets. `feed()` returns complete packets; `pending` says whether bytes wait."""

    __slots__ = ("_answered", "_buf")

    def __init__(self) -> None:
        self._buf = b""
        self._answered: set[int] = set()  # the encryption requests already answered

    @property
    def pending(self) -> bool:
        return bool(self._buf)

    @property
    def untouched(self) -> bool:
        """Nothing framed or waiting yet: what comes next is the first byte of the connection (or of the
        TLS it began with)."""
        return not self._buf and not self._answered

    def take_rest(self) -> bytes:
        """Bytes received after the last packet (a client may pipeline its first query behind startup)."""
        rest, self._buf = self._buf, b""
        return rest

    def feed(self, data: bytes) -> list[StartupPacket]:
        buf = self._buf + data if self._buf else data
        out: list[StartupPacket] = []
        pos = 0
        while len(buf) - pos >= 4:
            # the length is checked as soon as it is there, as PostgreSQL does: a client that sent a bad
            # one gets its error at once, not after login_timeout
            (length,) = _LENGTH.unpack_from(buf, pos)
            if length < 8 or length > codes.MAX_STARTUP_PACKET_LENGTH:
                raise ProtocolViolation("invalid length of startup packet")
            if len(buf) - pos < length:
                break
            code = _CODE.unpack_from(buf, pos + 4)[0]
            if code in self._answered:
                # PostgreSQL takes a second request of the same kind for a protocol version it lacks
                raise unsupported_protocol(code)
            packet = parse_startup_packet(code, buf[pos + 8 : pos + length])
            if isinstance(packet, SSLRequest | GSSENCRequest):
                self._answered.add(code)
            out.append(packet)
            pos += length
            # One packet per step: after SSLRequest/GSSENCRequest the client must wait for our answer, and
            # after StartupMessage/CancelRequest come typed messages, or nothing.
            break
        self._buf = buf[pos:]
        return out


def unsupported_protocol(code: int) -> ClientError:
    """PostgreSQL's answer to a startup packet of a protocol version it does not speak."""
    return ClientError(
        sqlstate.FEATURE_NOT_SUPPORTED,
        f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0 to 3.0",
        fatal=True,
    )


def parse_startup_packet(code: int, body: bytes) -> StartupPacket:
    """Decode one startup-phase packet from its code and the bytes after the code."""
    if code == codes.SSL_REQUEST_CODE:
        if body:
            raise ProtocolViolation("invalid length of SSLRequest")
        return SSLRequest()
    if code == codes.GSSENC_REQUEST_CODE:
        if body:
            raise ProtocolViolation("invalid length of GSSENCRequest")
        return GSSENCRequest()
    if code == codes.CANCEL_REQUEST_CODE:
        if len(body) != 8:
            raise ProtocolViolation("invalid length of CancelRequest")
        pid, key = struct.unpack("!ii", body)
        return CancelRequest(pid, key)
    if code >> 16 != 3:
        raise unsupported_protocol(code)
    if not body or body[-1] != 0:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    params: dict[str, str] = {}
    options: list[str] = []
    content = body[:-1]
    if content and content[-1] != 0:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = content[:-1].split(b"\0") if content else []
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    try:
        for i in range(0, len(parts), 2):
            # interned: every idle client keeps these, and most are the same few strings
            name, value = sys.intern(parts[i].decode()), parts[i + 1].decode()
            if len(value) <= 64:
                value = sys.intern(value)
            if not name:
                raise ProtocolViolation("invalid startup packet layout: empty parameter name")
            if name.startswith("_pq_."):
                options.append(name)
            else:
                if name == "replication" and value != "database" and parse_bool(value) is None:
                    raise ClientError(
                        sqlstate.INVALID_PARAMETER_VALUE,
                        f'invalid value for parameter "replication": "{value}"',
                        hint='Valid values are: "false", 0, "true", 1, "database".',
                        fatal=True,
                    )
                params[name] = value
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid byte sequence in startup packet") from None
    if not params.get("user"):
        raise ClientError(
            sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
            fatal=True,
        )
    return StartupMessage(code & 0xFFFF, params, options)
