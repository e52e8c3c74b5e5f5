"""Logging in to PostgreSQL: answers the server's AuthenticationRequests (SCRAM-SHA-256, md5, cleartext,
trust) for a server connection. Sans-IO: `respond(code, data)` returns the message to send, or None."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from scramp import ScramClient, ScramException

from halephant import sqlstate
from halephant.errors import ClientError
from halephant.protocol import codes
from halephant.protocol import messages as m


class UpstreamAuthError(ClientError):
    """The server asked for something halephant cannot answer (e.g. a password that is not configured)."""


class _RawBytesScramClient:
    """SCRAM-SHA-256 over the password's raw UTF-8 bytes, for passwords SASLprep refuses.

    PostgreSQL and libpq fall back to the raw bytes in that case; scramp refuses such passwords, so this
    small client (same method names as scramp's) covers exactly that case.
    """

    def __init__(self, password: str) -> None:
        self._password = password.encode()
        self._nonce = base64.b64encode(os.urandom(18)).decode()
        self._first_bare = f"n=*,r={self._nonce}"  # PostgreSQL ignores the SCRAM user name
        self._server_signature = b""

    def get_client_first(self) -> str:
        return "n,," + self._first_bare

    def set_server_first(self, message: str) -> None:
        self._server_first = message
        attrs = dict(part.split("=", 1) for part in message.split(","))
        if not attrs.get("r", "").startswith(self._nonce):
            raise ScramException("server nonce does not extend the client nonce")
        self._combined = attrs["r"]
        self._salt = base64.b64decode(attrs["s"])
        self._iterations = int(attrs["i"])

    def get_client_final(self) -> str:
        without_proof = f"c=biws,r={self._combined}"
        salted = hashlib.pbkdf2_hmac("sha256", self._password, self._salt, self._iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self._server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}"

    def set_server_final(self, message: str) -> None:
        if not message.startswith("v=") or not hmac.compare_digest(
            base64.b64decode(message[2:]), self._server_signature
        ):
            raise ScramException("the server's signature does not match")


class UpstreamAuth:
    __slots__ = ("_password", "_scram", "_user")

    def __init__(self, user: str, password: str | None) -> None:
        self._user = user
        self._password = password
        self._scram: ScramClient | _RawBytesScramClient | None = None

    def _need_password(self) -> str:
        if self._password is None:
            raise UpstreamAuthError(
                sqlstate.INVALID_PASSWORD,
                f'server asked for a password for user "{self._user}" and none is configured',
            )
        return self._password

    def respond(self, code: int, data: bytes) -> bytes | None:
        if code == codes.AUTH_OK:
            return None
        if code == codes.AUTH_CLEARTEXT_PASSWORD:
            return m.password_message(self._need_password().encode())
        if code == codes.AUTH_MD5_PASSWORD:
            inner = hashlib.md5((self._need_password() + self._user).encode()).hexdigest()
            return m.password_message(b"md5" + hashlib.md5(inner.encode() + data[:4]).hexdigest().encode())
        try:
            if code == codes.AUTH_SASL:
                mechanisms = m.decode_sasl_mechanisms(data)
                if "SCRAM-SHA-256" not in mechanisms:
                    raise UpstreamAuthError(
                        sqlstate.FEATURE_NOT_SUPPORTED,
                        f"server offers no supported SASL mechanism ({', '.join(mechanisms)})",
                    )
                password = self._need_password()
                try:
                    self._scram = ScramClient(["SCRAM-SHA-256"], self._user, password)
                except ScramException:
                    self._scram = _RawBytesScramClient(password)  # SASLprep refused it
                return m.sasl_initial_response("SCRAM-SHA-256", self._scram.get_client_first().encode())
            if code == codes.AUTH_SASL_CONTINUE and self._scram is not None:
                self._scram.set_server_first(data.decode())
                return m.sasl_response(self._scram.get_client_final().encode())
            if code == codes.AUTH_SASL_FINAL and self._scram is not None:
                self._scram.set_server_final(data.decode())
                return None
        except ScramException as exc:
            raise UpstreamAuthError(
                sqlstate.INVALID_PASSWORD, f"SCRAM exchange with the server failed: {exc}"
            ) from None
        raise UpstreamAuthError(
            sqlstate.FEATURE_NOT_SUPPORTED, f"unsupported authentication request {code} from server"
        )
