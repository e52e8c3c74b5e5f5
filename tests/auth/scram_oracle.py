"""SCRAM-SHA-256 computed from RFC 5802/7677 with hashlib only, as libpq and PostgreSQL compute it: the
independent oracle the auth tests check halephant (and scramp) against.

`LibpqScramClient` sends what libpq sends (an empty user name, ``n=,``) and, like libpq, uses the raw
password when SASLprep refuses it; `pg_verifier` writes a verifier in pg_authid's format.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from scramp.utils import saslprep


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def normalize(password: str) -> bytes:
    """libpq's pg_saslprep rule: SASLprep the password, or use it unchanged if SASLprep refuses it."""
    try:
        return str(saslprep(password)).encode()
    except Exception:
        return password.encode()


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", normalize(password), salt, iterations)


def pg_verifier(password: str, salt: bytes = b"0123456789abcdef", iterations: int = 4096) -> str:
    """`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` as `CREATE ROLE` stores it."""
    sp = salted_password(password, salt, iterations)
    stored = hashlib.sha256(_hmac(sp, b"Client Key")).digest()
    server = _hmac(sp, b"Server Key")
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored)}:{_b64(server)}"


class LibpqScramClient:
    """The client side of one exchange; `user` is what goes into ``n=`` (libpq: always empty)."""

    def __init__(self, password: str, user: str = "", nonce: str = "rOprNGfwEbeRWgbNEkqO") -> None:
        self.password = password
        self.bare = f"n={user},r={nonce}"
        self.nonce = nonce
        self.server_signature = b""

    def client_first(self) -> bytes:
        return ("n,," + self.bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        sf = server_first.decode()
        attrs = dict(part.split("=", 1) for part in sf.split(","))
        if not attrs["r"].startswith(self.nonce):
            raise AssertionError("server nonce does not extend the client nonce")
        sp = salted_password(self.password, base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = _hmac(sp, b"Client Key")
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.bare},{sf},{without_proof}".encode()
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = _hmac(_hmac(sp, b"Server Key"), auth_message)
        return f"{without_proof},p={_b64(proof)}".encode()

    def check_server_final(self, server_final: bytes) -> None:
        assert server_final.decode() == "v=" + _b64(self.server_signature)
