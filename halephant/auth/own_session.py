"""A short session of halephant's own with a node: log in as a configured role, run one query at a time,
collect its rows and its first error. Topology probes (`halephant.topology.probe`) and auth_query
lookups (`halephant.auth.lookup`, run by `halephant.proxy.auth_query`) are both this, each with its own
query, reading of the result and exception.

`OwnSession` is the protocol, sans-IO: `startup()`, then a subclass's query; `feed()` what arrives. The
login is `UpstreamAuth`'s (SCRAM bound to the node's certificate over TLS, md5, pass-through keys), its
blocking work (a SCRAM key derivation) handed out as `slow_step` for a worker thread.
`halephant.node_streams` drives one over an anyio stream. `refusal` keeps the server's ErrorResponse to
the login when it came before AuthenticationOk: with `prefer`, such a login over TLS is tried again in
plaintext (`halephant.server_tls.retries_in_plaintext`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from halephant import sqlstate
from halephant.auth.upstream import UpstreamAuth
from halephant.errors import ClientError, ProtocolViolation
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import split_frames
from halephant.protocol.session_queries import decode_data_row

__all__ = ["OwnSession"]


class OwnSession:
    """The protocol of one short session, sans-IO. A subclass sends its query (after `begin()`), reads
    `rows` and `error` once `feed` has seen its ReadyForQuery, and says what a failure raises
    (`failed`)."""

    __slots__ = (
        "_auth",
        "_authenticated",
        "_buf",
        "backend_key",
        "error",
        "logged_in",
        "refusal",
        "rows",
        "slow_step",
        "startup_params",
    )

    #: what pg_stat_activity shows of this kind of session (each subclass names its own)
    application_name: ClassVar[str]

    def __init__(
        self, user: str, password: str | None, database: str, server_certificate: bytes | None = None
    ) -> None:
        self._auth = UpstreamAuth(user, password, server_certificate)
        self.startup_params = {"user": user, "database": database, "application_name": self.application_name}
        self._buf = b""
        #: the rows of the last query, and its first error (`message (SQLSTATE)`)
        self.rows: list[list[str | None]] = []
        self.error: str | None = None
        self.logged_in = False
        self._authenticated = False  # AuthenticationOk came
        #: the server's BackendKeyData (process ID, secret key): what a CancelRequest for its query needs
        self.backend_key: tuple[int, int] | None = None
        #: the login's ErrorResponse (SQLSTATE, message) when it came before AuthenticationOk
        self.refusal: tuple[str, str] | None = None
        #: blocking login work (a SCRAM key derivation) to run in a worker thread before `feed(b"")`
        self.slow_step: Callable[[], None] | None = None

    def failed(self, message: str, login: bool) -> Exception:
        """What to raise when the session cannot go on: the login failed (`login`), or the server broke
        the protocol."""
        raise NotImplementedError

    def startup(self) -> bytes:
        return m.startup_message(self.startup_params)

    def begin(self) -> None:
        """Forget the previous query's rows and error (a subclass's query calls this)."""
        self.rows = []
        self.error = None

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Take bytes from the server; returns (bytes to send back, whether a ReadyForQuery arrived).
        Raises `failed(...)` when the login fails or the server breaks the protocol."""
        buf = self._buf + data if self._buf else data
        try:
            frames, consumed = split_frames(buf, 1 << 20)
        except ProtocolViolation as exc:
            raise self.failed(f"protocol violation from server: {exc.message}", False) from None
        self._buf = buf[consumed:]
        out: list[bytes] = []
        ready = False
        for t, start, end in frames:
            payload = buf[start:end]
            if t == codes.DATA_ROW:
                try:
                    self.rows.append(decode_data_row(payload))
                except ProtocolViolation as exc:
                    raise self.failed(f"protocol violation from server: {exc.message}", False) from None
            elif t == codes.ERROR_RESPONSE:
                fields = m.decode_error_fields(payload)
                state, message = fields.get("C", sqlstate.INTERNAL_ERROR), fields.get("M", "error")
                error = f"{message} ({state})"
                if not self.logged_in:
                    if not self._authenticated:
                        self.refusal = (state, message)
                    raise self.failed(error, True)
                self.error = self.error or error
            elif t == codes.READY_FOR_QUERY:
                self.logged_in = True
                ready = True
            elif t == codes.AUTHENTICATION:
                code, rest = m.decode_authentication(payload)
                if code == 0:
                    self._authenticated = True
                self.slow_step = self._auth.slow_step(code, rest)
                if self.slow_step is not None:
                    self._buf = buf[start - 5 :]  # taken again by `feed(b"")` once that work is done
                    break
                try:
                    reply = self._auth.respond(code, rest)
                except ClientError as exc:
                    raise self.failed(f"{exc.message} ({exc.code})", True) from None
                if reply is not None:
                    out.append(reply)
            elif t == codes.BACKEND_KEY_DATA:
                self.backend_key = m.decode_backend_key_data(payload)
            # ParameterStatus, RowDescription, CommandComplete, notices: not needed
        return b"".join(out), ready
