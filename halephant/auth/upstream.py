"""Logging in to PostgreSQL: answers the server's AuthenticationRequests (SCRAM-SHA-256, md5, cleartext,
trust) for a server connection. Sans-IO: `respond(code, data)` returns the message to send, or None.

The secret is the plaintext password, or, with no `server_password`, the user's own halephant.yaml
password when it is a hash (pass-through, as PgBouncer does): an md5 hash answers md5 as it is (md5 of
the hash's hex and the salt); a SCRAM verifier answers SCRAM-SHA-256 with the ClientKey a client's login
gave (`halephant.auth.passthrough`), when the server's salt and iteration count are the verifier's.
`passthrough_unready` tells a caller before it connects that such a login has nothing to answer with yet.

Over TLS the login is bound to the server's certificate, as libpq's default `channel_binding=prefer` binds
it: given the certificate the server presented on the connection (`server_certificate`, from
`halephant.server_tls.transport_certificate` / `stream_certificate`), its `tls-server-end-point` data (RFC
5929: `halephant.tls_files.end_point_hash`) is the channel binding, and SCRAM-SHA-256-PLUS is
taken when the server offers it (GS2 header `p=tls-server-end-point`, and the data in the
client-final-message's `c=`, which the proof covers), so a relay that presents another certificate (an
attacker in the middle, which `tls.mode` prefer and require do not stop) cannot log in with the exchange:
PostgreSQL computes the binding of its own certificate and refuses the login. Over TLS without binding
data (a certificate signed with Ed25519 or Ed448, for which RFC 5929 names no hash) SCRAM-SHA-256 is taken
with `n` (an offered PLUS not used; `y` would be a downgrade that PostgreSQL refuses); with binding data
and no PLUS offered, with `y`; without TLS, with `n`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Final

from scramp.utils import saslprep

from halephant import sqlstate
from halephant.auth.passthrough import PassthroughKeys, keys_for
from halephant.config.schema import is_md5_hash, is_scram_verifier
from halephant.errors import ClientError
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.tls_files import end_point_hash


class UpstreamAuthError(ClientError):
    """The server asked for something halephant cannot answer (e.g. a password that is not configured)."""


#: The most PBKDF2 iterations a server may ask for (as scramp allows): each costs the CPU about 0.4 µs,
#: so this bounds one login's key derivation to a few seconds, in a worker thread.
MAX_ITERATIONS: Final = 10_000_000

# Salted-password keys by (password, salt, iterations) -> (ClientKey, ServerKey). PostgreSQL keeps one
# salt per role password, so only a user's first server login derives them; every later one (a pool
# opening servers by the dozen) costs two HMACs.
_keys: dict[tuple[bytes, bytes, int], tuple[bytes, bytes]] = {}
_KEYS_KEPT: Final = 1024


def _derive(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """PBKDF2 (blocking, milliseconds at PostgreSQL's default 4096 iterations): run it in a worker
    thread (`UpstreamAuth.slow_step`) where the count may be large; hashlib releases the GIL."""
    key = (password, salt, iterations)
    keys = _keys.get(key)
    if keys is None:
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        keys = (
            hmac.new(salted, b"Client Key", hashlib.sha256).digest(),
            hmac.new(salted, b"Server Key", hashlib.sha256).digest(),
        )
        if len(_keys) >= _KEYS_KEPT:
            _keys.clear()
        _keys[key] = keys
    return keys


def scram_password(password: str) -> bytes:
    """The bytes SCRAM hashes: SASLprep'd, or the raw UTF-8 bytes for a password SASLprep refuses (as
    PostgreSQL and libpq do)."""
    try:
        prepared: str = saslprep(password)
    except Exception:
        return password.encode()
    return prepared.encode()


#: RFC 5802's GS2 headers: channel binding used; supported but not offered by the server; not used
_GS2_PLUS: Final = "p=tls-server-end-point,,"
_GS2_UNOFFERED: Final = "y,,"
_GS2_NONE: Final = "n,,"


class _ScramClient:
    """The client side of SCRAM-SHA-256(-PLUS), as libpq runs it: from a password, or from pass-through
    keys (`pinned`), which hold only for their own salt and iteration count. `gs2_header` is one of the
    `_GS2_*`; `binding` the channel binding data that `_GS2_PLUS` sends (b"" with the others)."""

    __slots__ = (
        "_binding",
        "_combined",
        "_first_bare",
        "_gs2_header",
        "_iterations",
        "_nonce",
        "_password",
        "_salt",
        "_server_first",
        "_server_signature",
        "pinned",
    )

    def __init__(
        self,
        password: str | None,
        pinned: PassthroughKeys | None = None,
        gs2_header: str = _GS2_NONE,
        binding: bytes = b"",
    ) -> None:
        self._gs2_header = gs2_header
        self._binding = binding
        self._password = b"" if password is None else scram_password(password)
        self.pinned = pinned
        self._nonce = base64.b64encode(os.urandom(18)).decode()
        self._first_bare = f"n=*,r={self._nonce}"  # PostgreSQL ignores the SCRAM user name
        self._server_first = ""
        self._combined = ""
        self._salt = b""
        self._iterations = 0
        self._server_signature = b""

    def client_first(self) -> str:
        return self._gs2_header + self._first_bare

    def server_first(self, message: str) -> None:
        try:
            attrs = dict(part.split("=", 1) for part in message.split(","))
            combined, salt, iterations = (
                attrs["r"],
                base64.b64decode(attrs["s"], validate=True),
                int(attrs["i"]),
            )
        except (ValueError, KeyError, binascii.Error):
            raise ScramError("malformed server-first-message") from None
        if not combined.startswith(self._nonce) or len(combined) == len(self._nonce):
            raise ScramError("server nonce does not extend the client nonce")
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ScramError(
                f"the server asks for {iterations} iterations (at most {MAX_ITERATIONS:,} are accepted)"
            )
        self._server_first, self._combined, self._salt, self._iterations = message, combined, salt, iterations

    def pinned_mismatch(self) -> bool:
        """True when the server's salt or iteration count is not the pass-through keys'."""
        pinned = self.pinned
        return pinned is not None and (pinned.salt, pinned.iterations) != (self._salt, self._iterations)

    def keys_cached(self) -> bool:
        return self.pinned is not None or (self._password, self._salt, self._iterations) in _keys

    def derive(self) -> None:
        _derive(self._password, self._salt, self._iterations)

    def client_final(self) -> str:
        channel = base64.b64encode(self._gs2_header.encode() + self._binding).decode()
        without_proof = f"c={channel},r={self._combined}"
        pinned = self.pinned
        if pinned is not None:
            client_key, server_key = pinned.client_key, pinned.server_key
        else:
            client_key, server_key = _derive(self._password, self._salt, self._iterations)
        stored_key = hashlib.sha256(client_key).digest()
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}"

    def server_final(self, message: str) -> None:
        if message.startswith("e="):
            raise ScramError(f"the server reported an error: {message[2:]}")
        try:
            signature = base64.b64decode(message[2:], validate=True) if message.startswith("v=") else b""
        except (ValueError, binascii.Error):
            signature = b""
        if not self._server_signature or not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("the server's signature does not match")


class ScramError(Exception):
    """The server's side of the SCRAM exchange is wrong."""


def _hash_kind(secret: str | None) -> str:
    if secret is None:
        return ""
    if is_scram_verifier(secret):
        return "a SCRAM verifier"
    return "an md5 hash" if is_md5_hash(secret) else ""


def _only_a_hash(user: str, secret: str, asked: str) -> UpstreamAuthError:
    return UpstreamAuthError(
        sqlstate.INVALID_PASSWORD,
        f'server asked for {asked} for user "{user}", and halephant.yaml gives "{user}" only '
        f"{_hash_kind(secret)}, which cannot answer it",
        hint=f'Set server_password for "{user}" to the plaintext password.',
    )


def _no_keys_yet(user: str) -> UpstreamAuthError:
    return UpstreamAuthError(
        sqlstate.INVALID_PASSWORD,
        f'no client of user "{user}" has logged in since halephant started: halephant.yaml gives '
        f'"{user}" a SCRAM verifier and no server_password, and a client\'s SCRAM login gives the key '
        "halephant logs in to the server with",
        hint=f'Log in as "{user}" through halephant once, or set server_password for "{user}".',
    )


def passthrough_unready(user: str, secret: str | None) -> UpstreamAuthError | None:
    """The error a login as `user` with `secret` would end in because no client has given its
    pass-through keys yet (a SCRAM verifier with none kept), else None. Callers check before they
    connect, so that pools and probes waiting for a client's login put no load on PostgreSQL (even a
    server whose pg_hba.conf would not ask for a password gets no connection until then)."""
    if secret is not None and is_scram_verifier(secret) and keys_for(secret) is None:
        return _no_keys_yet(user)
    return None


class UpstreamAuth:
    """One login's answers. A caller that must not block first asks `slow_step` for the work an answer
    needs (a SCRAM key derivation not yet cached), runs it in a worker thread, then calls `respond`.

    `password` is the plaintext password, a SCRAM verifier or an md5 hash (pass-through, see above).
    `server_certificate` is the certificate (DER) the server presented over TLS, None without TLS; a
    caller that makes the connection after this was made sets it with `bind` before the server's first
    AuthenticationRequest is answered."""

    __slots__ = ("_password", "_scram", "_user", "channel_binding")

    def __init__(self, user: str, password: str | None, server_certificate: bytes | None = None) -> None:
        self._user = user
        self._password = password
        self._scram: _ScramClient | None = None
        #: the connection's `tls-server-end-point` data: None without TLS, or when the server's
        #: certificate names no hash (Ed25519, Ed448)
        self.channel_binding: bytes | None = None
        self.bind(server_certificate)

    def bind(self, server_certificate: bytes | None) -> None:
        """Bind the login to the certificate (DER) the server presented on this connection, if any."""
        self.channel_binding = end_point_hash(server_certificate) if server_certificate else None

    def _need_password(self) -> str:
        if self._password is None:
            raise UpstreamAuthError(
                sqlstate.INVALID_PASSWORD,
                f'server asked for a password for user "{self._user}" and none is configured',
            )
        return self._password

    def _scram_client(self, gs2_header: str, binding: bytes) -> _ScramClient:
        secret = self._need_password()
        if is_md5_hash(secret):
            raise _only_a_hash(self._user, secret, "SCRAM-SHA-256")
        if not is_scram_verifier(secret):
            return _ScramClient(secret, None, gs2_header, binding)
        keys = keys_for(secret)
        if keys is None:
            raise _no_keys_yet(self._user)
        return _ScramClient(None, keys, gs2_header, binding)

    def _mechanism(self, offered: list[str]) -> tuple[str, str, bytes]:
        """(mechanism, GS2 header, binding data) for the mechanisms the server offers, as libpq's
        channel_binding=prefer chooses."""
        binding = self.channel_binding
        if binding is not None and "SCRAM-SHA-256-PLUS" in offered:
            return "SCRAM-SHA-256-PLUS", _GS2_PLUS, binding
        if "SCRAM-SHA-256" not in offered:
            raise UpstreamAuthError(
                sqlstate.FEATURE_NOT_SUPPORTED,
                f"server offers no supported SASL mechanism ({', '.join(offered)})",
            )
        if binding is not None:  # we could bind, and the server says it cannot
            return "SCRAM-SHA-256", _GS2_UNOFFERED, b""
        return "SCRAM-SHA-256", _GS2_NONE, b""

    def _verifier_differs(self) -> UpstreamAuthError:
        user = self._user
        return UpstreamAuthError(
            sqlstate.INVALID_PASSWORD,
            f'the server\'s SCRAM verifier for user "{user}" differs from the one halephant logs in with '
            "(another salt or iteration count: was the role's password changed?)",
            hint=f"Copy the role's pg_authid.rolpassword into users.{user}.password (clients then log in "
            f'with the new password), or set server_password for "{user}"; a user found by auth_query is '
            "looked up again once the answer kept for it (auth_cache) has expired.",
        )

    def slow_step(self, code: int, data: bytes) -> Callable[[], None] | None:
        """Blocking work `respond(code, data)` would do, to run in a worker thread before calling it
        (it then finds the result cached); None when there is none, or the request is wrong (`respond`
        then says so)."""
        scram = self._scram
        if code != codes.AUTH_SASL_CONTINUE or scram is None:
            return None
        try:
            scram.server_first(data.decode())
        except (ScramError, UnicodeDecodeError):
            return None
        return None if scram.keys_cached() else scram.derive

    def respond(self, code: int, data: bytes) -> bytes | None:
        if code == codes.AUTH_OK:
            return None
        if code == codes.AUTH_CLEARTEXT_PASSWORD:
            password = self._need_password()
            if _hash_kind(password):
                raise _only_a_hash(self._user, password, "a cleartext password")
            return m.password_message(password.encode())
        if code == codes.AUTH_MD5_PASSWORD:
            password = self._need_password()
            if is_md5_hash(password):
                inner = password[3:]  # what md5(password + user) gives, as PostgreSQL keeps it
            elif is_scram_verifier(password):
                raise _only_a_hash(self._user, password, "an md5 password")
            else:
                inner = hashlib.md5((password + self._user).encode()).hexdigest()
            return m.password_message(b"md5" + hashlib.md5(inner.encode() + data[:4]).hexdigest().encode())
        try:
            if code == codes.AUTH_SASL:
                # Over TLS PostgreSQL offers SCRAM-SHA-256-PLUS too: taken with the connection's
                # binding data, with a password or pass-through keys alike (see the module's docstring)
                mechanism, gs2_header, binding = self._mechanism(m.decode_sasl_mechanisms(data))
                self._scram = self._scram_client(gs2_header, binding)
                return m.sasl_initial_response(mechanism, self._scram.client_first().encode())
            if code == codes.AUTH_SASL_CONTINUE and self._scram is not None:
                self._scram.server_first(data.decode())
                if self._scram.pinned_mismatch():
                    raise self._verifier_differs()
                return m.sasl_response(self._scram.client_final().encode())
            if code == codes.AUTH_SASL_FINAL and self._scram is not None:
                self._scram.server_final(data.decode())
                return None
        except (ScramError, UnicodeDecodeError) as exc:
            raise UpstreamAuthError(
                sqlstate.INVALID_PASSWORD, f"SCRAM exchange with the server failed: {exc}"
            ) from None
        raise UpstreamAuthError(
            sqlstate.FEATURE_NOT_SUPPORTED, f"unsupported authentication request {code} from server"
        )
