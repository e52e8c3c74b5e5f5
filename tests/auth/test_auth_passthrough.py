"""Pass-through: halephant logging in to PostgreSQL as a user whose halephant.yaml password is a SCRAM
verifier (with the ClientKey a client's SCRAM login gave) or an md5 hash (as it is), with no plaintext
password anywhere. Checked against scramp's server side built from the same verifier, and the oracle's
formulas."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest
from scram_oracle import _hmac, pg_verifier, salted_password
from scramp import ScramException
from test_auth_server_side import login_like_libpq, login_with_scramp
from test_auth_upstream import ScrampServer, password_payload, sasl_mechanisms, scram_login

from halephant import sqlstate
from halephant.auth import passthrough
from halephant.auth.server_side import Md5Exchange, ScramExchange, md5_inner
from halephant.auth.upstream import UpstreamAuth, UpstreamAuthError, passthrough_unready
from halephant.errors import ClientError
from halephant.protocol import codes
from halephant.topology.probe import ProbeConnection, ProbeFailed

USER = "myapp"
PASSWORD = "correct horse battery staple"
SALT = b"0123456789abcdef"
VERIFIER = pg_verifier(PASSWORD, SALT)
NO_KEYS = (
    'no client of user "myapp" has logged in since halephant started: halephant.yaml gives "myapp" a '
    "SCRAM verifier and no server_password, and a client's SCRAM login gives the key halephant logs in "
    "to the server with"
)
DIFFERS = (
    'the server\'s SCRAM verifier for user "myapp" differs from the one halephant logs in with '
    "(another salt or iteration count: was the role's password changed?)"
)


@pytest.fixture(autouse=True)
def no_keys() -> Iterator[None]:
    passthrough.forget_all()
    yield
    passthrough.forget_all()


def client_logs_in(secret: str = VERIFIER, password: str = PASSWORD) -> ScramExchange:
    exchange = ScramExchange(USER, secret)
    login_like_libpq(exchange, password)
    return exchange


# --- keeping ClientKey from a client's login -------------------------------------------------------


def test_a_client_login_against_a_verifier_gives_its_client_key() -> None:
    assert client_logs_in().learned_keys == VERIFIER  # the first keys for this verifier
    keys = passthrough.keys_for(VERIFIER)
    assert keys is not None
    salted = salted_password(PASSWORD, SALT, 4096)
    assert (keys.salt, keys.iterations) == (SALT, 4096)
    assert keys.client_key == _hmac(salted, b"Client Key")
    assert keys.server_key == _hmac(salted, b"Server Key")
    assert "key" not in repr(keys).lower().replace("passthroughkeys", "")  # never shown
    # another login (here by a scramp client, which sends its user name) keeps the same keys, and is
    # not news
    exchange = ScramExchange(USER, VERIFIER)
    login_with_scramp(exchange, PASSWORD)
    assert exchange.learned_keys is None
    assert passthrough.keys_for(VERIFIER) == keys


def test_a_wrong_password_gives_no_key() -> None:
    with pytest.raises(ClientError) as excinfo:
        client_logs_in(password="wrong")
    assert excinfo.value.code == sqlstate.INVALID_PASSWORD
    assert passthrough.keys_for(VERIFIER) is None


def test_a_plaintext_password_needs_no_key() -> None:
    assert client_logs_in(secret=PASSWORD).learned_keys is None
    assert passthrough.keys_for(PASSWORD) is None


def test_the_key_is_recovered_from_the_proof_alone() -> None:
    stored = hashlib.sha256(_hmac(salted_password(PASSWORD, SALT, 4096), b"Client Key")).digest()
    assert passthrough.client_key_from_proof(stored, b"auth message", "not base64!") is None
    assert passthrough.client_key_from_proof(stored, b"auth message", "AAAA") is None  # too short
    assert passthrough.client_key_from_proof(stored, b"auth message", "A" * 43 + "=") is None  # wrong


# --- logging in upstream with it ---------------------------------------------------------------------


def test_pass_through_login_against_scramp_built_from_the_same_verifier() -> None:
    client_logs_in()
    scram_login(UpstreamAuth(USER, VERIFIER), ScrampServer(VERIFIER))
    # the server's ServerSignature is checked with the verifier's ServerKey
    auth = UpstreamAuth(USER, VERIFIER)
    server = ScrampServer(VERIFIER)
    server_first = server.first(
        password_payload(auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    )
    server.final(password_payload(auth.respond(codes.AUTH_SASL_CONTINUE, server_first)))
    with pytest.raises(UpstreamAuthError) as excinfo:
        auth.respond(codes.AUTH_SASL_FINAL, b"v=" + b"A" * 43 + b"=")
    assert (
        excinfo.value.message
        == "SCRAM exchange with the server failed: the server's signature does not match"
    )


def test_pass_through_login_against_halephant_itself() -> None:
    client_logs_in()
    server = ScramExchange(USER, VERIFIER)
    auth = UpstreamAuth(USER, VERIFIER)
    reply = auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256"))
    raw, _ = server.feed(password_payload(reply))
    reply = auth.respond(codes.AUTH_SASL_CONTINUE, raw[9:])
    raw, done = server.feed(password_payload(reply))
    assert done
    assert auth.respond(codes.AUTH_SASL_FINAL, raw[9:]) is None


def test_before_any_client_login_there_is_nothing_to_log_in_with() -> None:
    error = passthrough_unready(USER, VERIFIER)
    assert error is not None
    assert (error.code, error.message) == (sqlstate.INVALID_PASSWORD, NO_KEYS)
    assert error.hint == 'Log in as "myapp" through halephant once, or set server_password for "myapp".'
    with pytest.raises(UpstreamAuthError) as excinfo:
        UpstreamAuth(USER, VERIFIER).respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256"))
    assert (excinfo.value.code, excinfo.value.message) == (sqlstate.INVALID_PASSWORD, NO_KEYS)
    client_logs_in()
    assert passthrough_unready(USER, VERIFIER) is None
    assert passthrough_unready(USER, PASSWORD) is None and passthrough_unready(USER, None) is None


@pytest.mark.parametrize(
    "server_verifier",
    [
        pg_verifier(PASSWORD, b"another salt!!!!"),
        pg_verifier(PASSWORD, SALT, 8192),
        pg_verifier("new", b"x" * 16),
    ],
    ids=["salt", "iterations", "password"],
)
def test_a_server_verifier_that_differs_fails_clearly(server_verifier: str) -> None:
    client_logs_in()
    auth = UpstreamAuth(USER, VERIFIER)
    server = ScrampServer(server_verifier)
    server_first = server.first(
        password_payload(auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    )
    with pytest.raises(UpstreamAuthError) as excinfo:
        auth.respond(codes.AUTH_SASL_CONTINUE, server_first)
    assert (excinfo.value.code, excinfo.value.message) == (sqlstate.INVALID_PASSWORD, DIFFERS)
    assert excinfo.value.hint == (
        "Copy the role's pg_authid.rolpassword into users.myapp.password (clients then log in with the new "
        'password), or set server_password for "myapp"; a user found by auth_query is looked up again once '
        "the answer kept for it (auth_cache) has expired."
    )


def test_same_salt_and_count_but_other_keys_are_refused_by_the_server() -> None:
    # (PostgreSQL draws a new salt for every new password, so this is a forged verifier)
    client_logs_in()
    auth = UpstreamAuth(USER, VERIFIER)
    server = ScrampServer(pg_verifier("other password", SALT))
    server_first = server.first(
        password_payload(auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    )
    with pytest.raises(ScramException):
        server.final(password_payload(auth.respond(codes.AUTH_SASL_CONTINUE, server_first)))


# --- md5 -----------------------------------------------------------------------------------------------


def test_md5_pass_through_answers_with_the_hash_as_it_is() -> None:
    hashed = "md5" + md5_inner(PASSWORD, USER)
    salt = b"\x01\x02\xfe\xff"
    answer = password_payload(UpstreamAuth(USER, hashed).respond(codes.AUTH_MD5_PASSWORD, salt))
    assert answer == password_payload(UpstreamAuth(USER, PASSWORD).respond(codes.AUTH_MD5_PASSWORD, salt))
    # and halephant's own md5 check (the server's formula) takes it
    server = Md5Exchange(USER, hashed)
    server.start()
    server._salt = salt
    assert server.feed(answer) == (b"", True)


@pytest.mark.parametrize(
    ("secret", "code", "data", "message"),
    [
        (
            VERIFIER,
            codes.AUTH_MD5_PASSWORD,
            b"salt",
            "an md5 password",
        ),
        (VERIFIER, codes.AUTH_CLEARTEXT_PASSWORD, b"", "a cleartext password"),
        ("md5" + "0" * 32, codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256"), "SCRAM-SHA-256"),
        ("md5" + "0" * 32, codes.AUTH_CLEARTEXT_PASSWORD, b"", "a cleartext password"),
    ],
)
def test_a_hash_cannot_answer_another_method(secret: str, code: int, data: bytes, message: str) -> None:
    client_logs_in()  # keys are no help for md5 or cleartext
    with pytest.raises(UpstreamAuthError) as excinfo:
        UpstreamAuth(USER, secret).respond(code, data)
    kind = "a SCRAM verifier" if secret == VERIFIER else "an md5 hash"
    assert (excinfo.value.code, excinfo.value.message) == (
        sqlstate.INVALID_PASSWORD,
        f'server asked for {message} for user "myapp", and halephant.yaml gives "myapp" only {kind}, '
        "which cannot answer it",
    )
    assert excinfo.value.hint == 'Set server_password for "myapp" to the plaintext password.'


# --- probes ----------------------------------------------------------------------------------------------


def test_a_probe_without_keys_does_not_connect() -> None:
    accepted: list[int] = []

    async def main() -> None:
        async with (
            await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
            anyio.create_task_group() as tg,
        ):

            async def answer(stream: anyio.abc.SocketStream) -> None:
                accepted.append(1)
                await stream.aclose()

            tg.start_soon(listener.serve, answer)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            probe = ProbeConnection("127.0.0.1", port, USER, VERIFIER, "postgres")
            for _ in range(3):
                with pytest.raises(ProbeFailed, match="no client of user"):
                    await probe.probe()
            await anyio.sleep(0.05)
            assert accepted == []
            client_logs_in()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                await probe.probe()
            assert accepted
            tg.cancel_scope.cancel()

    anyio.run(main)
