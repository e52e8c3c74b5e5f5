"""Pass-through keys: what halephant logs in to PostgreSQL with for a user whose halephant.yaml password
is a SCRAM verifier and who has no `server_password`, as PgBouncer does.

A verifier cannot log in by itself: it holds StoredKey = H(ClientKey), not ClientKey. A client's
successful SCRAM login against it gives ClientKey away (ClientProof XOR HMAC(StoredKey, AuthMessage),
checked by H(ClientKey) == StoredKey), and with it and the verifier's ServerKey halephant answers the
server's SCRAM exchange, as long as the server's salt and iteration count are the verifier's. The keys
live in this process's memory only, by verifier, so a reload that changes the verifier leaves the old
keys unused; nothing here is written anywhere or logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

__all__ = ["PassthroughKeys", "client_key_from_proof", "forget_all", "keys_for", "remember"]


@dataclass(frozen=True, slots=True)
class PassthroughKeys:
    salt: bytes
    iterations: int
    client_key: bytes = b""
    server_key: bytes = b""

    def __repr__(self) -> str:  # never show the keys (a log line, a traceback)
        return f"PassthroughKeys(iterations={self.iterations})"


_kept: dict[str, PassthroughKeys] = {}
#: verifiers kept at most (one per configured user in practice; a plugin could hand out more)
_KEPT: Final = 10_000


def client_key_from_proof(stored_key: bytes, auth_message: bytes, proof_b64: str) -> bytes | None:
    """ClientKey from a client's SCRAM proof, or None when the proof does not give one that matches
    StoredKey (a wrong password, a malformed proof)."""
    try:
        proof = base64.b64decode(proof_b64, validate=True)
    except (ValueError, binascii.Error):
        return None
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    if len(proof) != len(signature):
        return None
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
        return None
    return client_key


def remember(verifier: str, keys: PassthroughKeys) -> bool:
    """Keep the keys a client's login against `verifier` gave; True when halephant had none for it."""
    new = verifier not in _kept
    if new and len(_kept) >= _KEPT:
        del _kept[next(iter(_kept))]
    _kept[verifier] = keys
    return new


def keys_for(verifier: str) -> PassthroughKeys | None:
    """The keys kept for `verifier`, or None when no client has logged in against it yet."""
    return _kept.get(verifier)


def forget_all() -> None:
    """Drop every kept key (tests)."""
    _kept.clear()
