"""Authenticating clients: the exchanges a `halephant_authenticate` answer asks the core to run.

Each exchange is sans-IO: `start()` gives the first AuthenticationRequest to send, `feed(payload)` takes
the body of the client's next PasswordMessage/SASL message and returns ``(reply, done)``. A wrong
password raises `ClientError` 28P01, a SCRAM message that cannot be parsed 08P01, as in PostgreSQL.
Unknown users run the same exchange against a deterministic fake secret and fail at the end, as
PostgreSQL does, so user names cannot be enumerated.

A successful SCRAM login against a configured SCRAM verifier also keeps the client's ClientKey
(`halephant.auth.passthrough`): halephant logs in to PostgreSQL with it when the user has no
`server_password` (pass-through). `ScramExchange.learned_keys` is that verifier when this login gave the
first keys for it, so the caller can let pools that were waiting for them log in at once.

Over TLS (`channel_binding`: the connection's `tls-server-end-point` data) SCRAM-SHA-256-PLUS is offered
before SCRAM-SHA-256, as PostgreSQL offers them: a client that picks it binds its proof to halephant's
certificate, so a man in the middle that terminated TLS with another certificate cannot relay the login
(libpq's `channel_binding=require`). What PostgreSQL refuses in the negotiation is refused alike, 08P01:
a client that says it could bind but thinks the server cannot (`y`, a downgrade), binding data with the
plain mechanism or none with PLUS, another binding type, and binding data that does not match.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from typing import Protocol

from scramp import ScramException, ScramMechanism
from scramp.utils import ServerError

from halephant import sqlstate
from halephant.auth.passthrough import PassthroughKeys, client_key_from_proof, remember
from halephant.auth.upstream import scram_password
from halephant.config.schema import is_md5_hash, is_scram_verifier, parse_scram_verifier
from halephant.errors import ClientError
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.types import AuthMethod, Md5, ScramSha256, Trust

_MECHANISM = ScramMechanism("SCRAM-SHA-256")
_MECHANISM_PLUS = ScramMechanism("SCRAM-SHA-256-PLUS")
_CHANNEL_BINDING_TYPE = "tls-server-end-point"
# A per-process secret for mock salts: stable within a run, unguessable from outside.
_MOCK_SECRET = os.urandom(16)

AuthInfo = tuple[bytes, bytes, bytes, int]


def auth_failed(user: str, method: str) -> ClientError:
    return (
        ClientError(
            sqlstate.INVALID_PASSWORD, f'password authentication failed for user "{user}"', fatal=True
        )
        if method != "trust"
        else ClientError(sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, "no access", fatal=True)
    )


class Exchange(Protocol):
    name: str
    learned_keys: str | None

    def start(self) -> bytes: ...

    def feed(self, payload: bytes) -> tuple[bytes, bool]: ...


def _user_salt(user: str) -> bytes:
    # Depends on the user name and a process secret only: it reveals nothing about the password, and
    # known and unknown users look alike.
    return hmac.new(_MOCK_SECRET, user.encode(), hashlib.sha256).digest()[:16]


def scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """StoredKey and ServerKey for a password, over SASLprep'd bytes when possible.

    Like PostgreSQL and libpq, a password SASLprep refuses is used as its raw UTF-8 bytes.
    """
    salted = hashlib.pbkdf2_hmac("sha256", scram_password(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest(), server_key


@functools.lru_cache(maxsize=1024)
def _auth_info_for(user: str, secret: str) -> AuthInfo:
    # PBKDF2 costs ~1 ms: derive each user's verifier once, not per login.
    if is_scram_verifier(secret):
        return parse_scram_verifier(secret)
    salt = _user_salt(user)
    stored, server = scram_keys(secret, salt, 4096)
    return salt, stored, server, 4096


def _mock_auth_info(user: str) -> AuthInfo:
    return _user_salt(user), os.urandom(32), os.urandom(32), 4096


class ScramExchange:
    """SCRAM-SHA-256 as PostgreSQL runs it (the SCRAM user name is ignored: the startup user counts), and
    SCRAM-SHA-256-PLUS when `channel_binding` (the connection's `tls-server-end-point` data) is given."""

    name = "scram-sha-256"

    def __init__(self, user: str, secret: str | None, channel_binding: bytes | None = None) -> None:
        self.user = user
        self._known = secret is not None
        #: the configured verifier whose ClientKey this login gives (None: plaintext or unknown user)
        self._verifier = secret if secret is not None and is_scram_verifier(secret) else None
        #: the verifier, once this login gave the first pass-through keys for it
        self.learned_keys: str | None = None
        info = _auth_info_for(user, secret) if secret is not None else _mock_auth_info(user)
        self._auth_info = lambda _name: info
        self._channel_binding = channel_binding
        self._server = _MECHANISM.make_server(self._auth_info)  # (replaced if the client picks PLUS)
        self._step = 0

    @property
    def mechanisms(self) -> list[str]:
        """What is offered, in PostgreSQL's order: PLUS first, where the connection can bind."""
        if self._channel_binding is None:
            return ["SCRAM-SHA-256"]
        return ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]

    def start(self) -> bytes:
        return m.authentication_sasl(self.mechanisms)

    def _negotiate(self, mech: str, first: str) -> None:
        """Check the client's channel binding choice as PostgreSQL does; set up the server for PLUS."""
        flag = first.split(",", 1)[0]
        if mech == "SCRAM-SHA-256-PLUS":
            if not flag.startswith("p="):
                raise _malformed(
                    "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include "
                    "channel binding data."
                )
            if flag[2:] != _CHANNEL_BINDING_TYPE:
                raise ClientError(
                    sqlstate.PROTOCOL_VIOLATION,
                    f'unsupported SCRAM channel-binding type "{flag[2:]}"',
                    fatal=True,
                )
            assert self._channel_binding is not None  # (offered only then)
            self._server = _MECHANISM_PLUS.make_server(
                self._auth_info, channel_binding=(_CHANNEL_BINDING_TYPE, self._channel_binding)
            )
        elif flag.startswith("p="):
            raise _malformed(
                "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message "
                "includes channel binding data."
            )
        elif flag == "y" and self._channel_binding is not None:
            raise ClientError(
                sqlstate.PROTOCOL_VIOLATION,
                "SCRAM channel binding negotiation error",
                detail="The client supports SCRAM channel binding but thinks the server does not.  "
                "However, this server does support channel binding.",
                fatal=True,
            )

    def feed(self, payload: bytes) -> tuple[bytes, bool]:
        try:
            if self._step == 0:
                self._step = 1
                mech, data = m.decode_sasl_initial_response(payload)
                if mech not in self.mechanisms:
                    raise ClientError(
                        sqlstate.PROTOCOL_VIOLATION,
                        "client selected an invalid SASL authentication mechanism",
                        fatal=True,
                    )
                first = data.decode()
                self._negotiate(mech, first)
                if first.count(",") >= 2 and first.split(",", 2)[1]:
                    raise ClientError(
                        sqlstate.FEATURE_NOT_SUPPORTED,
                        "client uses authorization identity, but it is not supported",
                        fatal=True,
                    )
                # PostgreSQL ignores the SCRAM user name (the startup user counts) and libpq sends an empty
                # one (`n=,`), which scramp refuses: give scramp a placeholder, but keep the exact bytes the
                # client signed for the AuthMessage.
                gs2_end = first.index(",", first.index(",") + 1) + 1
                bare = first[gs2_end:]
                if bare.startswith("m"):  # reserved-mext: PostgreSQL refuses it before reading further
                    raise ClientError(
                        sqlstate.FEATURE_NOT_SUPPORTED,
                        "client requires an unsupported SCRAM extension",
                        fatal=True,
                    )
                if not bare.startswith("n="):
                    raise ValueError("client-first-message without a user name attribute")
                self._server.set_client_first(first[:gs2_end] + "n=*" + bare[bare.index(",") :])
                self._server.client_first_bare = bare
                return m.authentication(
                    codes.AUTH_SASL_CONTINUE, self._server.get_server_first().encode()
                ), False
            if self._step == 1:
                self._step = 2
                self._server.set_client_final(payload.decode())
                if not self._known:
                    raise auth_failed(self.user, "scram")
                if self._verifier is not None:
                    self._keep_keys(payload.decode())
                final = self._server.get_server_final().encode()
                return m.authentication(codes.AUTH_SASL_FINAL, final), True
        except ScramException as exc:
            if exc.server_error is ServerError.INVALID_PROOF:
                raise auth_failed(self.user, "scram") from None
            if exc.server_error is ServerError.CHANNEL_BINDINGS_DONT_MATCH:
                # PostgreSQL's answer: not a wrong password, and not for a client to retry
                raise ClientError(
                    sqlstate.PROTOCOL_VIOLATION, "SCRAM channel binding check failed", fatal=True
                ) from None
            raise _malformed() from None
        except (ValueError, UnicodeDecodeError):
            raise _malformed() from None
        raise ClientError(sqlstate.PROTOCOL_VIOLATION, "unexpected SASL message", fatal=True)

    def _keep_keys(self, client_final: str) -> None:
        """Recover ClientKey from the proof scramp has just verified, and keep it for pass-through."""
        server = self._server
        without_proof, _, proof = client_final.rpartition(",p=")
        auth_message = f"{server.client_first_bare},{server.server_first},{without_proof}".encode()
        client_key = client_key_from_proof(server.stored_key, auth_message, proof)
        if client_key is None or self._verifier is None:  # (scramp accepted it: cannot happen)
            return
        # (scramp keeps the salt and count as its own Salt and IterationCount)
        keys = PassthroughKeys(bytes(server.salt), int(server.i), client_key, bytes(server.server_key))
        if remember(self._verifier, keys):
            self.learned_keys = self._verifier


def _malformed(detail: str | None = None) -> ClientError:
    # PostgreSQL's answer to a SCRAM message it cannot parse, whether the user exists or not: only a
    # well-formed exchange with a wrong proof is a wrong password (28P01)
    return ClientError(sqlstate.PROTOCOL_VIOLATION, "malformed SCRAM message", detail=detail, fatal=True)


def md5_inner(password: str, user: str) -> str:
    return hashlib.md5((password + user).encode()).hexdigest()


class Md5Exchange:
    """md5: the client proves knowledge of md5(password + user) salted with 4 random bytes."""

    name = "md5"

    def __init__(self, user: str, secret: str | None) -> None:
        self.user = user
        if secret is None:
            self._inner = None
        elif is_md5_hash(secret):
            self._inner = secret[3:]
        else:
            self._inner = md5_inner(secret, user)
        self._salt = os.urandom(4)
        self.learned_keys: str | None = None

    def start(self) -> bytes:
        return m.authentication(codes.AUTH_MD5_PASSWORD, self._salt)

    def feed(self, payload: bytes) -> tuple[bytes, bool]:
        given = m.decode_password(payload)
        if self._inner is None:
            raise auth_failed(self.user, "md5")
        expected = "md5" + hashlib.md5(self._inner.encode() + self._salt).hexdigest()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise auth_failed(self.user, "md5")
        return b"", True


def exchange_for(method: AuthMethod, user: str, channel_binding: bytes | None = None) -> Exchange | None:
    """The exchange for a method, or None for trust (no password asked); `channel_binding`: the TLS
    connection's `tls-server-end-point` data, which lets SCRAM offer SCRAM-SHA-256-PLUS."""
    if isinstance(method, ScramSha256):
        return ScramExchange(user, method.secret, channel_binding)
    if isinstance(method, Md5):
        if method.secret is not None and is_scram_verifier(method.secret):
            # md5 cannot be checked against a SCRAM verifier: run a failing exchange, never let it in
            return Md5Exchange(user, None)
        return Md5Exchange(user, method.secret)
    if isinstance(method, Trust):
        return None
    # `Cert` and `Peer` ask no password: the connection checks its certificate (`halephant.proxy.client_tls`)
    # or its operating system user (`halephant.proxy.peer`)
    raise TypeError(f"no password exchange for authentication method {method!r}")
