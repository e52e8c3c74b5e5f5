"""halephant logging in to PostgreSQL (`halephant.auth.upstream.UpstreamAuth`): its answers to md5,
cleartext and SASL requests, checked against PostgreSQL's formulas and scramp's server side."""

from __future__ import annotations

import base64
import hashlib

import pytest
from scram_oracle import pg_verifier
from scramp import ScramException, ScramMechanism

from halephant import sqlstate
from halephant.auth.server_side import ScramExchange, parse_scram_verifier
from halephant.auth.upstream import MAX_ITERATIONS, UpstreamAuth, UpstreamAuthError
from halephant.errors import ClientError
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import split_frames

USER = "app_owner"
PASSWORD = "s3cr3t-Ünïcode"


def password_payload(raw: bytes | None) -> bytes:
    assert raw is not None
    frames, consumed = split_frames(raw, 1 << 16)
    assert consumed == len(raw)
    ((t, s, e),) = frames
    assert t == codes.PASSWORD_MESSAGE
    return raw[s:e]


def sasl_mechanisms(*names: str) -> bytes:
    return b"".join(n.encode() + b"\0" for n in names) + b"\0"


class ScrampServer:
    """PostgreSQL's side of SCRAM, played by scramp from a stored verifier."""

    def __init__(self, verifier: str) -> None:
        info = parse_scram_verifier(verifier)
        self.server = ScramMechanism().make_server(lambda _user: info)

    def first(self, initial_response: bytes) -> bytes:
        mech, client_first = m.decode_sasl_initial_response(initial_response)
        assert mech == "SCRAM-SHA-256"
        # PostgreSQL ignores the SCRAM user name; scramp's server wants a non-empty one
        self.server.set_client_first(client_first.decode())
        server_first: str = self.server.get_server_first()
        return server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        self.server.set_client_final(client_final.decode())  # raises on a wrong proof
        server_final: str = self.server.get_server_final()
        return server_final.encode()


def scram_login(auth: UpstreamAuth, server: ScrampServer) -> None:
    initial = password_payload(auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    server_first = server.first(initial)
    client_final = password_payload(auth.respond(codes.AUTH_SASL_CONTINUE, server_first))
    assert auth.respond(codes.AUTH_SASL_FINAL, server.final(client_final)) is None
    assert auth.respond(codes.AUTH_OK, b"") is None


def test_trust() -> None:
    assert UpstreamAuth(USER, None).respond(codes.AUTH_OK, b"") is None


def test_cleartext() -> None:
    assert password_payload(UpstreamAuth(USER, PASSWORD).respond(codes.AUTH_CLEARTEXT_PASSWORD, b"")) == (
        PASSWORD.encode() + b"\0"
    )


def test_md5() -> None:
    salt = b"\x01\x02\xfe\xff"
    inner = hashlib.md5((PASSWORD + USER).encode()).hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    payload = password_payload(UpstreamAuth(USER, PASSWORD).respond(codes.AUTH_MD5_PASSWORD, salt))
    assert m.decode_password(payload) == expected


@pytest.mark.parametrize("verifier", [pg_verifier(PASSWORD), pg_verifier(PASSWORD, iterations=10000)])
def test_scram_against_scramp_server(verifier: str) -> None:
    scram_login(UpstreamAuth(USER, PASSWORD), ScrampServer(verifier))


def test_scram_mechanism_list_with_plus() -> None:
    auth = UpstreamAuth(USER, PASSWORD)
    initial = password_payload(
        auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    )
    mech, client_first = m.decode_sasl_initial_response(initial)
    assert mech == "SCRAM-SHA-256"
    assert client_first.startswith(b"n,,")  # no channel binding offered without TLS


def test_scram_wrong_password_is_refused_by_the_server() -> None:
    with pytest.raises(ScramException):
        scram_login(UpstreamAuth(USER, "wrong"), ScrampServer(pg_verifier(PASSWORD)))


def test_scram_server_first_for_another_nonce() -> None:
    other = UpstreamAuth(USER, PASSWORD)
    server_first = ScrampServer(pg_verifier(PASSWORD)).first(
        password_payload(other.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    )
    auth = UpstreamAuth(USER, PASSWORD)
    auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256"))
    with pytest.raises(UpstreamAuthError) as exc_info:
        auth.respond(codes.AUTH_SASL_CONTINUE, server_first)
    assert exc_info.value.code == sqlstate.INVALID_PASSWORD


@pytest.mark.parametrize(
    "server_final",
    [b"v=" + base64.b64encode(b"\0" * 32), b"e=invalid-proof", b"v=not base64!"],
    ids=["forged-signature", "server-error", "garbage"],
)
def test_scram_bad_server_final(server_final: bytes) -> None:
    # a server that does not know the secret cannot finish the exchange
    auth = UpstreamAuth(USER, PASSWORD)
    impostor = ScrampServer(pg_verifier("something else"))
    server_first = impostor.first(
        password_payload(auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    )
    auth.respond(codes.AUTH_SASL_CONTINUE, server_first)
    with pytest.raises(UpstreamAuthError) as exc_info:
        auth.respond(codes.AUTH_SASL_FINAL, server_final)
    assert exc_info.value.code == sqlstate.INVALID_PASSWORD


@pytest.mark.parametrize(
    ("code", "data"),
    [
        (codes.AUTH_CLEARTEXT_PASSWORD, b""),
        (codes.AUTH_MD5_PASSWORD, b"salt"),
        (codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")),
    ],
    ids=["cleartext", "md5", "sasl"],
)
def test_missing_password(code: int, data: bytes) -> None:
    with pytest.raises(UpstreamAuthError) as exc_info:
        UpstreamAuth(USER, None).respond(code, data)
    exc = exc_info.value
    assert isinstance(exc, ClientError)
    assert exc.code == sqlstate.INVALID_PASSWORD
    assert exc.message == f'server asked for a password for user "{USER}" and none is configured'


def test_no_supported_sasl_mechanism() -> None:
    with pytest.raises(UpstreamAuthError) as exc_info:
        UpstreamAuth(USER, PASSWORD).respond(
            codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256-PLUS", "OAUTHBEARER")
        )
    assert exc_info.value.code == sqlstate.FEATURE_NOT_SUPPORTED
    assert "SCRAM-SHA-256-PLUS, OAUTHBEARER" in exc_info.value.message


@pytest.mark.parametrize("code", [2, 6, 7, 8, 9, 99])
def test_unsupported_request(code: int) -> None:
    with pytest.raises(UpstreamAuthError) as exc_info:
        UpstreamAuth(USER, PASSWORD).respond(code, b"")
    assert exc_info.value.code == sqlstate.FEATURE_NOT_SUPPORTED
    assert str(code) in exc_info.value.message


@pytest.mark.parametrize("code", [codes.AUTH_SASL_CONTINUE, codes.AUTH_SASL_FINAL])
def test_sasl_steps_out_of_order(code: int) -> None:
    with pytest.raises(UpstreamAuthError):
        UpstreamAuth(USER, PASSWORD).respond(code, b"r=x,s=c2FsdA==,i=4096")


def test_halephant_to_itself() -> None:
    # halephant's client side against its own server side: both ends of a pooled login chain
    exchange = ScramExchange(USER, PASSWORD)
    exchange.start()
    auth = UpstreamAuth(USER, PASSWORD)
    reply, done = exchange.feed(
        password_payload(auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    )
    assert not done
    code, server_first = m.decode_authentication(reply[5:])
    assert code == codes.AUTH_SASL_CONTINUE
    reply, done = exchange.feed(password_payload(auth.respond(codes.AUTH_SASL_CONTINUE, server_first)))
    assert done
    code, server_final = m.decode_authentication(reply[5:])
    assert code == codes.AUTH_SASL_FINAL
    assert auth.respond(code, server_final) is None


def test_scram_password_that_saslprep_refuses() -> None:
    password = "\u05d0\u05d1\u05d2123"
    verifier = pg_verifier(password)  # what PostgreSQL stores for it: SCRAM over the raw bytes
    scram_login(UpstreamAuth(USER, password), ScrampServer(verifier))


def test_a_key_derivation_is_offered_as_slow_work_once_per_password_salt_and_count() -> None:
    verifier = pg_verifier(PASSWORD, salt=b"slow-step salt..", iterations=4097)
    first = UpstreamAuth(USER, PASSWORD)
    server = ScrampServer(verifier)
    server_first = server.first(
        password_payload(first.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    )
    assert first.slow_step(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")) is None
    slow = first.slow_step(codes.AUTH_SASL_CONTINUE, server_first)
    assert slow is not None
    slow()  # what a caller runs in a worker thread
    assert first.slow_step(codes.AUTH_SASL_CONTINUE, server_first) is None  # now cached
    client_final = password_payload(first.respond(codes.AUTH_SASL_CONTINUE, server_first))
    assert first.respond(codes.AUTH_SASL_FINAL, server.final(client_final)) is None
    # the next login with the same verifier derives nothing; another count or salt does
    second = UpstreamAuth(USER, PASSWORD)
    again = ScrampServer(verifier).first(
        password_payload(second.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    )
    assert second.slow_step(codes.AUTH_SASL_CONTINUE, again) is None
    third = UpstreamAuth(USER, PASSWORD)
    other = ScrampServer(pg_verifier(PASSWORD, salt=b"slow-step salt..", iterations=4098)).first(
        password_payload(third.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    )
    assert third.slow_step(codes.AUTH_SASL_CONTINUE, other) is not None


@pytest.mark.parametrize(
    ("iterations", "message"),
    [(MAX_ITERATIONS + 1, "iterations"), (0, "iterations"), (-5, "iterations"), ("x", "malformed")],
)
def test_a_server_asking_for_a_wrong_iteration_count_is_refused(iterations: object, message: str) -> None:
    # each iteration costs CPU time: a server (or whatever answers in its place) must not make one login
    # cost minutes
    auth = UpstreamAuth(USER, PASSWORD)
    initial = password_payload(auth.respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256")))
    nonce = m.decode_sasl_initial_response(initial)[1].decode().rsplit("r=", 1)[1]
    server_first = f"r={nonce}server,s={base64.b64encode(b'salt').decode()},i={iterations}".encode()
    assert auth.slow_step(codes.AUTH_SASL_CONTINUE, server_first) is None  # nothing to run: refused
    with pytest.raises(UpstreamAuthError, match=message) as exc_info:
        auth.respond(codes.AUTH_SASL_CONTINUE, server_first)
    assert exc_info.value.code == sqlstate.INVALID_PASSWORD
