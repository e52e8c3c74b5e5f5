"""Clients authenticating to halephant (`halephant.auth.server_side`): SCRAM-SHA-256 against scramp's
client (what drivers run) and a libpq-style client, md5, and the mock exchange for unknown users."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scram_oracle import LibpqScramClient, pg_verifier
from scramp import ScramClient, ScramMechanism

from halephant import sqlstate
from halephant.auth.passthrough import keys_for
from halephant.auth.server_side import (
    Md5Exchange,
    ScramExchange,
    exchange_for,
    is_md5_hash,
    is_scram_verifier,
    parse_scram_verifier,
)
from halephant.errors import ClientError, ProtocolViolation
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.protocol.framing import split_frames
from halephant.types import Md5, ScramSha256, Trust

USER = "myapp"
PASSWORD = "correct horse battery staple"


def auth_request(raw: bytes) -> tuple[int, bytes]:
    """Decode the single AuthenticationRequest halephant sent: (code, data)."""
    frames, consumed = split_frames(raw, 1 << 16)
    assert consumed == len(raw) and len(frames) == 1
    t, s, e = frames[0]
    assert t == codes.AUTHENTICATION
    return m.decode_authentication(raw[s:e])


def payload_of(raw: bytes) -> bytes:
    """The body of one frontend message, as the proxy hands it to `feed`."""
    frames, _ = split_frames(raw, 1 << 16)
    ((t, s, e),) = frames
    assert t == codes.PASSWORD_MESSAGE
    return raw[s:e]


def scramp_verifier(password: str) -> str:
    """The same verifier computed by scramp, the library halephant uses."""
    salt, stored, server, iterations = ScramMechanism().make_auth_info(password, iteration_count=4096)
    keys = [base64.b64encode(k).decode() for k in (salt, stored, server)]
    return f"SCRAM-SHA-256${iterations}:{keys[0]}${keys[1]}:{keys[2]}"


def scram_first_step(exchange: ScramExchange, client_first: bytes) -> bytes:
    code, data = auth_request(exchange.start())
    assert code == codes.AUTH_SASL
    assert m.decode_sasl_mechanisms(data) == ["SCRAM-SHA-256"]
    reply, done = exchange.feed(payload_of(m.sasl_initial_response("SCRAM-SHA-256", client_first)))
    assert not done
    code, server_first = auth_request(reply)
    assert code == codes.AUTH_SASL_CONTINUE
    return server_first


def scram_final_step(exchange: ScramExchange, client_final: bytes) -> bytes:
    reply, done = exchange.feed(payload_of(m.sasl_response(client_final)))
    assert done
    code, server_final = auth_request(reply)
    assert code == codes.AUTH_SASL_FINAL
    return server_final


def login_with_scramp(exchange: ScramExchange, password: str, scram_user: str = USER) -> None:
    """A full exchange as a driver built on scramp runs it; raises what halephant raises."""
    client = ScramClient(["SCRAM-SHA-256"], scram_user, password)
    server_first = scram_first_step(exchange, client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    server_final = scram_final_step(exchange, client.get_client_final().encode())
    client.set_server_final(server_final.decode())  # the client checks halephant knew the secret


def login_like_libpq(exchange: ScramExchange, password: str, scram_user: str = "") -> None:
    client = LibpqScramClient(password, user=scram_user)
    server_first = scram_first_step(exchange, client.client_first())
    client.check_server_final(scram_final_step(exchange, client.client_final(server_first)))


def assert_bad_password(exc: ClientError, user: str = USER) -> None:
    assert exc.code == sqlstate.INVALID_PASSWORD == "28P01"
    assert exc.message == f'password authentication failed for user "{user}"'
    assert exc.fatal


SECRETS = pytest.mark.parametrize(
    "secret",
    [PASSWORD, pg_verifier(PASSWORD), scramp_verifier(PASSWORD)],
    ids=["plaintext", "pg-verifier", "scramp-verifier"],
)


# --- SCRAM-SHA-256 -----------------------------------------------------------------------------------


@SECRETS
def test_scram_right_password_scramp_client(secret: str) -> None:
    login_with_scramp(ScramExchange(USER, secret), PASSWORD)


@SECRETS
def test_scram_right_password_libpq_empty_username(secret: str) -> None:
    # libpq sends `n=,` (the startup packet's user counts); scramp alone refuses an empty SCRAM user name
    login_like_libpq(ScramExchange(USER, secret), PASSWORD)


def test_scram_user_name_in_exchange_is_ignored() -> None:
    # PostgreSQL ignores the SCRAM user name: the startup user is the one authenticated
    login_with_scramp(ScramExchange(USER, PASSWORD), PASSWORD, scram_user="somebody-else")


@SECRETS
@pytest.mark.parametrize("client", ["scramp", "libpq"])
def test_scram_wrong_password(secret: str, client: str) -> None:
    with pytest.raises(ClientError) as exc_info:
        if client == "scramp":
            login_with_scramp(ScramExchange(USER, secret), "wrong")
        else:
            login_like_libpq(ScramExchange(USER, secret), "wrong")
    assert_bad_password(exc_info.value)


@pytest.mark.parametrize("client", ["scramp", "libpq"])
def test_scram_unknown_user_fails_only_at_the_end(client: str) -> None:
    exchange = ScramExchange("nobody", None)
    # the first step answers like a real user, so user names cannot be probed ...
    if client == "scramp":
        scramp_client = ScramClient(["SCRAM-SHA-256"], "nobody", PASSWORD)
        server_first = scram_first_step(exchange, scramp_client.get_client_first().encode())
        scramp_client.set_server_first(server_first.decode())
        client_final = scramp_client.get_client_final().encode()
    else:
        libpq = LibpqScramClient(PASSWORD)
        server_first = scram_first_step(exchange, libpq.client_first())
        client_final = libpq.client_final(server_first)
    # ... and the exchange fails with the same error as a wrong password
    with pytest.raises(ClientError) as exc_info:
        exchange.feed(payload_of(m.sasl_response(client_final)))
    assert_bad_password(exc_info.value, "nobody")


def _salt_and_iterations(server_first: bytes) -> tuple[str, str]:
    attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
    assert set(attrs) == {"r", "s", "i"}
    return attrs["s"], attrs["i"]


def test_scram_unknown_user_looks_like_a_known_one() -> None:
    def first(user: str, secret: str | None) -> tuple[str, str]:
        return _salt_and_iterations(
            scram_first_step(ScramExchange(user, secret), LibpqScramClient("x").client_first())
        )

    known = first(USER, PASSWORD)
    unknown = first("nobody", None)
    # a real user's salt is stable: a mock one must be too, or asking twice gives the game away
    assert first("nobody", None) == unknown
    assert first(USER, PASSWORD) == known
    assert first("nobody2", None)[0] != unknown[0]
    assert unknown[1] == known[1] == "4096"
    assert len(unknown[0]) == len(known[0])


def test_scram_verifier_iterations_are_announced() -> None:
    exchange = ScramExchange(USER, pg_verifier(PASSWORD, iterations=5000))
    assert _salt_and_iterations(scram_first_step(exchange, LibpqScramClient("x").client_first()))[1] == "5000"


def test_scram_wrong_mechanism() -> None:
    exchange = ScramExchange(USER, PASSWORD)
    exchange.start()
    with pytest.raises(ClientError) as exc_info:
        exchange.feed(
            payload_of(m.sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=x"))
        )
    assert exc_info.value.code == sqlstate.PROTOCOL_VIOLATION
    assert exc_info.value.fatal


# --- SCRAM-SHA-256-PLUS (channel binding over TLS) -------------------------------------------------------

#: a connection's tls-server-end-point data (the hash of halephant's certificate)
BINDING = hashlib.sha256(b"halephant's certificate").digest()


def bound_login(exchange: ScramExchange, password: str, binding: bytes, *, verify: bool = True) -> None:
    """A full exchange as a scramp client with channel binding runs it (it picks PLUS when offered)."""
    _code, data = auth_request(exchange.start())
    mechanisms = m.decode_sasl_mechanisms(data)
    client = ScramClient(mechanisms, USER, password, channel_binding=("tls-server-end-point", binding))
    reply, _ = exchange.feed(
        payload_of(m.sasl_initial_response(client.mechanism_name, client.get_client_first().encode()))
    )
    client.set_server_first(auth_request(reply)[1].decode())
    server_final = scram_final_step(exchange, client.get_client_final().encode())
    if verify:
        client.set_server_final(server_final.decode())


def test_scram_plus_is_offered_first_over_tls_and_binds_the_login() -> None:
    exchange = ScramExchange(USER, PASSWORD, channel_binding=BINDING)
    assert m.decode_sasl_mechanisms(auth_request(exchange.start())[1]) == [
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-256",
    ]
    bound_login(exchange, PASSWORD, BINDING)


def test_scram_plus_keeps_the_pass_through_keys() -> None:
    # the proof of a bound login is over the binding too: the ClientKey is recovered all the same
    verifier = pg_verifier(PASSWORD, salt=b"bound-login-salt")
    exchange = ScramExchange(USER, verifier, channel_binding=BINDING)
    bound_login(exchange, PASSWORD, BINDING)
    keys = keys_for(verifier)
    assert keys is not None
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), b"bound-login-salt", 4096)
    assert keys.client_key == hmac.new(salted, b"Client Key", hashlib.sha256).digest()


def test_scram_plus_with_another_certificates_binding_is_refused() -> None:
    # a man in the middle terminated TLS with another certificate: PostgreSQL's 08P01, not 28P01
    with pytest.raises(ClientError) as exc_info:
        bound_login(ScramExchange(USER, PASSWORD, channel_binding=BINDING), PASSWORD, b"another certificate")
    assert (exc_info.value.code, exc_info.value.message) == ("08P01", "SCRAM channel binding check failed")


def test_scram_plus_wrong_password_is_28P01() -> None:
    with pytest.raises(ClientError) as exc_info:
        bound_login(ScramExchange(USER, PASSWORD, channel_binding=BINDING), "wrong", BINDING)
    assert_bad_password(exc_info.value)


def test_scram_plain_mechanism_still_works_over_tls() -> None:
    # a client that cannot bind (asyncpg) picks SCRAM-SHA-256 with the gs2 flag n
    exchange = ScramExchange(USER, PASSWORD, channel_binding=BINDING)
    exchange.start()
    client = LibpqScramClient(PASSWORD)
    reply, _ = exchange.feed(payload_of(m.sasl_initial_response("SCRAM-SHA-256", client.client_first())))
    client.check_server_final(scram_final_step(exchange, client.client_final(auth_request(reply)[1])))


#: PostgreSQL 15's DETAIL texts for these refusals (auth-scram.c), word for word
_NOT_INCLUDED = (
    "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data."
)
_INCLUDED = (
    "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel "
    "binding data."
)
_DOWNGRADE = (
    "The client supports SCRAM channel binding but thinks the server does not.  However, this server does "
    "support channel binding."
)


@pytest.mark.parametrize(
    ("binding", "mechanism", "client_first", "message", "detail"),
    [
        # "y": the client could bind, and thinks the server cannot: a downgrade, when PLUS was offered
        (BINDING, "SCRAM-SHA-256", b"y,,n=,r=abc", "SCRAM channel binding negotiation error", _DOWNGRADE),
        (BINDING, "SCRAM-SHA-256-PLUS", b"n,,n=,r=abc", "malformed SCRAM message", _NOT_INCLUDED),
        (BINDING, "SCRAM-SHA-256-PLUS", b"y,,n=,r=abc", "malformed SCRAM message", _NOT_INCLUDED),
        (BINDING, "SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc", "malformed SCRAM message", _INCLUDED),
        (
            BINDING, "SCRAM-SHA-256-PLUS", b"p=tls-unique,,n=,r=abc",
            'unsupported SCRAM channel-binding type "tls-unique"', None,
        ),
        # without TLS PLUS is not offered
        (
            None, "SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc",
            "client selected an invalid SASL authentication mechanism", None,
        ),
    ],
    ids=["y-downgrade", "plus-n", "plus-y", "plain-with-binding", "plus-tls-unique", "plus-without-tls"],
)  # fmt: skip
def test_scram_channel_binding_negotiation_refused_as_postgresql_does(
    binding: bytes | None, mechanism: str, client_first: bytes, message: str, detail: str | None
) -> None:
    for user, secret in ((USER, PASSWORD), ("nobody", None)):  # the same for unknown users
        exchange = ScramExchange(user, secret, channel_binding=binding)
        exchange.start()
        with pytest.raises(ClientError) as exc_info:
            exchange.feed(payload_of(m.sasl_initial_response(mechanism, client_first)))
        error = exc_info.value
        assert (error.code, error.message, error.fatal, error.detail, error.hint) == (
            "08P01",
            message,
            True,
            detail,
            None,
        )
        fields = m.decode_error_fields(m.client_error_response(error)[5:])
        assert (fields["S"], fields.get("D")) == ("FATAL", detail)


def test_scram_y_flag_without_tls_is_fine() -> None:
    # "y" over a connection that cannot bind is what PostgreSQL lets in too
    exchange = ScramExchange(USER, PASSWORD)
    exchange.start()
    reply, done = exchange.feed(payload_of(m.sasl_initial_response("SCRAM-SHA-256", b"y,,n=,r=abc")))
    assert not done and auth_request(reply)[0] == codes.AUTH_SASL_CONTINUE


def test_scram_message_after_the_end() -> None:
    exchange = ScramExchange(USER, PASSWORD)
    login_like_libpq(exchange, PASSWORD)
    with pytest.raises(ClientError) as exc_info:
        exchange.feed(b"c=biws")
    assert exc_info.value.code == sqlstate.PROTOCOL_VIOLATION


# PostgreSQL 15's answers to the same client-first-messages: a message it cannot parse is a protocol
# violation, not a wrong password, whether the user exists or not
@pytest.mark.parametrize("user, secret", [(USER, PASSWORD), ("nobody", None)], ids=["known", "unknown"])
@pytest.mark.parametrize(
    "client_first, code",
    [
        (b"", "08P01"),
        (b"n,,", "08P01"),
        (b"n,,r=abc", "08P01"),
        (b"y,,n=,", "08P01"),
        (b"x,,n=,r=abc", "08P01"),
        (b"\xff\xfe", "08P01"),
        (b"n,a=b,n=,r=x", "0A000"),
        (b"n,,m=ext,n=,r=abc", "0A000"),
        (b"n,,mx", "0A000"),
    ],
)
def test_scram_malformed_client_first(client_first: bytes, code: str, user: str, secret: str | None) -> None:
    exchange = ScramExchange(user, secret)
    with pytest.raises(ClientError) as exc_info:
        exchange.feed(payload_of(m.sasl_initial_response("SCRAM-SHA-256", client_first)))
    assert exc_info.value.code == code
    assert exc_info.value.fatal
    if code == sqlstate.PROTOCOL_VIOLATION:
        assert exc_info.value.message == "malformed SCRAM message"


@pytest.mark.parametrize("final", [b"c=biws,r=zzz,p=abc", b"garbage", b"c=biws"])
def test_scram_malformed_client_final(final: bytes) -> None:
    exchange = ScramExchange(USER, PASSWORD)
    scram_first_step(exchange, LibpqScramClient(PASSWORD).client_first())
    with pytest.raises(ClientError) as exc_info:
        exchange.feed(final)
    assert (exc_info.value.code, exc_info.value.message) == ("08P01", "malformed SCRAM message")


def test_scram_malformed_initial_response() -> None:
    with pytest.raises(ProtocolViolation):
        ScramExchange(USER, PASSWORD).feed(b"SCRAM-SHA-256\0\0\0")


@settings(derandomize=True, database=None, max_examples=200, deadline=None)
@given(final=st.binary(max_size=120) | st.text(max_size=60).map(lambda t: ("c=biws,r=" + t).encode()))
def test_scram_any_client_final_is_refused_cleanly(final: bytes) -> None:
    exchange = ScramExchange(USER, PASSWORD)
    scram_first_step(exchange, LibpqScramClient(PASSWORD).client_first())
    with pytest.raises(ClientError) as exc_info:
        exchange.feed(final)
    if exc_info.value.code != sqlstate.PROTOCOL_VIOLATION:
        assert_bad_password(exc_info.value)


@settings(derandomize=True, database=None, max_examples=200, deadline=None)
@given(payload=st.binary(max_size=80))
def test_scram_any_first_message_raises_only_client_error(payload: bytes) -> None:
    try:
        ScramExchange(USER, PASSWORD).feed(payload)
    except ClientError:
        pass


def test_scram_password_that_saslprep_refuses() -> None:
    password = "\u05d0\u05d1\u05d2123"
    login_like_libpq(ScramExchange(USER, password), password)


def test_scram_user_name_scramp_refuses() -> None:
    login_like_libpq(ScramExchange(USER, PASSWORD), PASSWORD, scram_user="\u05d0b")


def test_scram_salt_does_not_depend_on_the_password_alone() -> None:
    def salt(user: str) -> str:
        return _salt_and_iterations(
            scram_first_step(ScramExchange(user, PASSWORD), LibpqScramClient("x").client_first())
        )[0]

    assert salt("alice") != salt("bob")


# --- md5 ---------------------------------------------------------------------------------------------


def md5_answer(password: str, user: str, salt: bytes) -> bytes:
    # PostgreSQL's formula: "md5" + md5(md5(password || user) || salt)
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def md5_login(exchange: Md5Exchange, password: str, user: str = USER) -> tuple[bytes, bool]:
    code, salt = auth_request(exchange.start())
    assert code == codes.AUTH_MD5_PASSWORD
    assert len(salt) == 4
    return exchange.feed(payload_of(m.password_message(md5_answer(password, user, salt))))


MD5_HASH = "md5" + hashlib.md5((PASSWORD + USER).encode()).hexdigest()


@pytest.mark.parametrize("secret", [PASSWORD, MD5_HASH], ids=["plaintext", "md5-hash"])
def test_md5_right_password(secret: str) -> None:
    assert md5_login(Md5Exchange(USER, secret), PASSWORD) == (b"", True)


@pytest.mark.parametrize("secret", [PASSWORD, MD5_HASH], ids=["plaintext", "md5-hash"])
def test_md5_wrong_password(secret: str) -> None:
    with pytest.raises(ClientError) as exc_info:
        md5_login(Md5Exchange(USER, secret), "wrong")
    assert_bad_password(exc_info.value)


def test_md5_hash_is_bound_to_the_user() -> None:
    # an md5 hash stored for another user name does not match (the user is salted in)
    with pytest.raises(ClientError):
        md5_login(Md5Exchange("other", MD5_HASH), PASSWORD, user="other")


def test_md5_unknown_user() -> None:
    with pytest.raises(ClientError) as exc_info:
        md5_login(Md5Exchange("nobody", None), PASSWORD, user="nobody")
    assert_bad_password(exc_info.value, "nobody")


def test_md5_salt_is_random_per_exchange() -> None:
    salts = {auth_request(Md5Exchange(USER, PASSWORD).start())[1] for _ in range(8)}
    assert len(salts) == 8


def test_md5_replayed_answer_fails() -> None:
    first = Md5Exchange(USER, PASSWORD)
    _, salt = auth_request(first.start())
    answer = payload_of(m.password_message(md5_answer(PASSWORD, USER, salt)))
    second = Md5Exchange(USER, PASSWORD)
    second.start()
    with pytest.raises(ClientError):
        second.feed(answer)


def test_md5_cleartext_answer_fails() -> None:
    exchange = Md5Exchange(USER, PASSWORD)
    exchange.start()
    with pytest.raises(ClientError):
        exchange.feed(payload_of(m.password_message(PASSWORD.encode())))


def test_md5_malformed_password_message() -> None:
    exchange = Md5Exchange(USER, PASSWORD)
    exchange.start()
    with pytest.raises(ProtocolViolation):
        exchange.feed(b"md5abc")


# --- choosing the exchange ---------------------------------------------------------------------------


def test_exchange_for() -> None:
    assert isinstance(exchange_for(ScramSha256(PASSWORD), USER), ScramExchange)
    assert isinstance(exchange_for(ScramSha256(None), USER), ScramExchange)
    assert isinstance(exchange_for(Md5(MD5_HASH), USER), Md5Exchange)
    assert exchange_for(Trust(), USER) is None
    with pytest.raises(TypeError):
        exchange_for("password", USER)  # type: ignore[arg-type]


def test_md5_against_scram_verifier_never_lets_in() -> None:
    exchange = exchange_for(Md5(pg_verifier(PASSWORD)), USER)
    assert isinstance(exchange, Md5Exchange)
    with pytest.raises(ClientError) as exc_info:
        md5_login(exchange, PASSWORD)
    assert_bad_password(exc_info.value)


# --- secrets -----------------------------------------------------------------------------------------


def test_parse_scram_verifier() -> None:
    salt, stored, server, iterations = parse_scram_verifier(
        pg_verifier(PASSWORD, salt=b"s" * 16, iterations=4097)
    )
    assert (salt, iterations, len(stored), len(server)) == (b"s" * 16, 4097, 32, 32)


@pytest.mark.parametrize(
    "bad",
    [
        "SCRAM-SHA-256$4096:c2FsdA==$abc",
        "SCRAM-SHA-1$4096:c2FsdA==$YQ==:Yg==",
        "SCRAM-SHA-256$x:c2FsdA==$YQ==:Yg==",
        "SCRAM-SHA-256$4096:!!$YQ==:Yg==",
        "md5" + "0" * 32,
        "",
    ],
)
def test_parse_scram_verifier_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="not a SCRAM-SHA-256 verifier"):
        parse_scram_verifier(bad)


def test_secret_kinds() -> None:
    assert is_scram_verifier(pg_verifier("x"))
    assert not is_scram_verifier("SCRAM-SHA-256")
    assert is_md5_hash(MD5_HASH)
    assert not is_md5_hash(MD5_HASH.upper())
    assert not is_md5_hash("md5" + "g" * 32)
    assert not is_md5_hash("md5secret")


def test_scram_start_message_layout() -> None:
    raw = ScramExchange(USER, PASSWORD).start()
    assert raw == b"R" + struct.pack("!ii", 23, codes.AUTH_SASL) + b"SCRAM-SHA-256\0\0"
