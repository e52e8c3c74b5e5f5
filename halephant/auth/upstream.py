"""Logging in to PostgreSQL: answers the server's AuthenticationRequests (SCRAM-SHA-256, md5, cleartext,
trust) for a server connection. Sans-IO: `respond(code, data)` returns the message to send, or None."""

from __future__ import annotations

import hashlib

from scramp import ScramClient, ScramException

from halephant import sqlstate
from halephant.errors import ClientError
from halephant.protocol import codes
from halephant.protocol import messages as m


class UpstreamAuthError(ClientError):
    """The server asked for something halephant cannot answer (e.g. a password that is not configured)."""


class UpstreamAuth:
    __slots__ = ("_password", "_scram", "_user")

    def __init__(self, user: str, password: str | None) -> None:
        self._user = user
        self._password = password
        self._scram: ScramClient | None = None

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
                self._scram = ScramClient(["SCRAM-SHA-256"], self._user, self._need_password())
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
