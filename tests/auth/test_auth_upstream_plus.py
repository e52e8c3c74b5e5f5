"""halephant's login to PostgreSQL over TLS bound to the server's certificate (SCRAM-SHA-256-PLUS,
`tls-server-end-point`), as libpq's channel_binding=prefer: the mechanism and GS2 header it picks, the
exact `c=` it sends (checked against RFC 5802/5929 computed here with hashlib), and scramp's server side
accepting it with the same binding data and refusing it with another certificate's, with a password and
with pass-through keys alike."""

from __future__ import annotations

import base64
import datetime
import hashlib
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from scram_oracle import pg_verifier
from scramp import ScramException, ScramMechanism
from test_auth_server_side import login_like_libpq
from test_auth_upstream import password_payload, sasl_mechanisms

from halephant import sqlstate
from halephant.auth import passthrough
from halephant.auth.server_side import ScramExchange, parse_scram_verifier
from halephant.auth.upstream import UpstreamAuth, UpstreamAuthError
from halephant.protocol import codes
from halephant.protocol import messages as m

USER = "app_owner"
PASSWORD = "s3cr3t-Ünïcode"
VERIFIER = pg_verifier(PASSWORD)
BOTH = sasl_mechanisms("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")


def _certificate(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, name: str) -> bytes:
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA384()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .sign(key, algorithm)
    )
    return certificate.public_bytes(serialization.Encoding.DER)


#: the node's certificate, signed with ECDSA-SHA384: RFC 5929 binds it with SHA-384
SERVER_CERT = _certificate(ec.generate_private_key(ec.SECP256R1()), "node")
#: the certificate a relay in the middle presents instead
OTHER_CERT = _certificate(ec.generate_private_key(ec.SECP256R1()), "relay")
#: a certificate signed with Ed25519, which names no hash to bind with
ED25519_CERT = _certificate(ed25519.Ed25519PrivateKey.generate(), "node")


@pytest.fixture(autouse=True)
def no_keys() -> Iterator[None]:
    passthrough.forget_all()
    yield
    passthrough.forget_all()


class PlusServer:
    """PostgreSQL's side of SCRAM-SHA-256-PLUS over a TLS session with `certificate`, played by scramp."""

    def __init__(self, verifier: str, certificate: bytes) -> None:
        info = parse_scram_verifier(verifier)
        binding = ("tls-server-end-point", hashlib.sha384(certificate).digest())
        self.server = ScramMechanism("SCRAM-SHA-256-PLUS").make_server(
            lambda _u: info, channel_binding=binding
        )

    def first(self, initial_response: bytes) -> bytes:
        mech, client_first = m.decode_sasl_initial_response(initial_response)
        assert mech == "SCRAM-SHA-256-PLUS"
        self.server.set_client_first(client_first.decode())
        return str(self.server.get_server_first()).encode()

    def final(self, client_final: bytes) -> bytes:
        self.server.set_client_final(client_final.decode())  # raises on a wrong binding or proof
        return str(self.server.get_server_final()).encode()


def _attrs(message: bytes) -> dict[str, str]:
    return dict(part.split("=", 1) for part in message.decode().split(","))


def run_login(auth: UpstreamAuth, server: PlusServer) -> tuple[bytes, bytes]:
    """The whole exchange; returns (client-first-message, client-final-message)."""
    initial = password_payload(auth.respond(codes.AUTH_SASL, BOTH))
    _mech, client_first = m.decode_sasl_initial_response(initial)
    server_first = server.first(initial)
    client_final = password_payload(auth.respond(codes.AUTH_SASL_CONTINUE, server_first))
    assert auth.respond(codes.AUTH_SASL_FINAL, server.final(client_final)) is None
    assert auth.respond(codes.AUTH_OK, b"") is None
    return client_first, client_final


def test_over_tls_the_login_is_bound_to_the_servers_certificate() -> None:
    client_first, client_final = run_login(
        UpstreamAuth(USER, PASSWORD, SERVER_CERT), PlusServer(VERIFIER, SERVER_CERT)
    )
    gs2 = b"p=tls-server-end-point,,"
    assert client_first.startswith(gs2 + b"n=*,r=")
    # c= is the GS2 header and the certificate's hash with its signature's hash function (SHA-384)
    expected = base64.b64encode(gs2 + hashlib.sha384(SERVER_CERT).digest()).decode()
    assert _attrs(client_final)["c"] == expected


def test_a_relay_with_another_certificate_is_refused() -> None:
    # halephant saw the relay's certificate; the server binds to its own: the proof does not hold
    auth = UpstreamAuth(USER, PASSWORD, OTHER_CERT)
    server = PlusServer(VERIFIER, SERVER_CERT)
    initial = password_payload(auth.respond(codes.AUTH_SASL, BOTH))
    client_final = password_payload(auth.respond(codes.AUTH_SASL_CONTINUE, server.first(initial)))
    with pytest.raises(ScramException, match="channel"):
        server.final(client_final)


def test_a_pass_through_login_is_bound_too() -> None:
    login_like_libpq(ScramExchange(USER, VERIFIER), PASSWORD)  # a client's login gives the keys
    assert passthrough.keys_for(VERIFIER) is not None
    client_first, client_final = run_login(
        UpstreamAuth(USER, VERIFIER, SERVER_CERT), PlusServer(VERIFIER, SERVER_CERT)
    )
    assert client_first.startswith(b"p=tls-server-end-point,,")
    gs2_and_data = b"p=tls-server-end-point,," + hashlib.sha384(SERVER_CERT).digest()
    assert _attrs(client_final)["c"] == base64.b64encode(gs2_and_data).decode()
    # and with another certificate's binding the same keys' proof is refused
    auth = UpstreamAuth(USER, VERIFIER, OTHER_CERT)
    server = PlusServer(VERIFIER, SERVER_CERT)
    initial = password_payload(auth.respond(codes.AUTH_SASL, BOTH))
    with pytest.raises(ScramException):
        server.final(password_payload(auth.respond(codes.AUTH_SASL_CONTINUE, server.first(initial))))


def _initial(auth: UpstreamAuth, offered: bytes) -> tuple[str, bytes]:
    return m.decode_sasl_initial_response(password_payload(auth.respond(codes.AUTH_SASL, offered)))


@pytest.mark.parametrize(
    ("certificate", "offered", "mechanism", "gs2"),
    [
        # without TLS: no binding, as before
        (None, sasl_mechanisms("SCRAM-SHA-256"), "SCRAM-SHA-256", b"n,,"),
        # over TLS with a certificate that names no hash: PLUS is offered and not used, so "n" (a "y"
        # would tell PostgreSQL the client thinks it offers no binding: a downgrade it refuses)
        (ED25519_CERT, BOTH, "SCRAM-SHA-256", b"n,,"),
        # over TLS, a server that offers no PLUS: "y", the client could bind and the server cannot
        (SERVER_CERT, sasl_mechanisms("SCRAM-SHA-256"), "SCRAM-SHA-256", b"y,,"),
    ],
)
def test_without_binding_the_gs2_header_says_why(
    certificate: bytes | None, offered: bytes, mechanism: str, gs2: bytes
) -> None:
    auth = UpstreamAuth(USER, PASSWORD, certificate)
    got, client_first = _initial(auth, offered)
    assert (got, client_first[: len(gs2)]) == (mechanism, gs2)
    info = parse_scram_verifier(VERIFIER)
    server = ScramMechanism().make_server(lambda _u: info)
    server.set_client_first(client_first.decode())
    client_final = password_payload(
        auth.respond(codes.AUTH_SASL_CONTINUE, server.get_server_first().encode())
    )
    assert _attrs(client_final)["c"] == base64.b64encode(gs2).decode()
    server.set_client_final(client_final.decode())
    assert auth.respond(codes.AUTH_SASL_FINAL, server.get_server_final().encode()) is None


def test_bind_after_the_connection_is_made() -> None:
    # a pooled server's UpstreamAuth exists before its connection: bound once TLS is up
    auth = UpstreamAuth(USER, PASSWORD)
    auth.bind(SERVER_CERT)
    run_login(auth, PlusServer(VERIFIER, SERVER_CERT))


def test_only_plus_offered_without_binding_is_refused() -> None:
    with pytest.raises(UpstreamAuthError) as excinfo:
        UpstreamAuth(USER, PASSWORD).respond(codes.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256-PLUS"))
    assert excinfo.value.code == sqlstate.FEATURE_NOT_SUPPORTED
