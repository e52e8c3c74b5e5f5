"""libpq's rule for `prefer`'s retry in plaintext (`halephant.server_tls.retries_in_plaintext`), and what an
`OwnSession` keeps for it (`refusal`: the server's ErrorResponse before AuthenticationOk only). The retry
itself, on every path, is end to end in `tests/e2e/test_server_tls_prefer.py`."""

from __future__ import annotations

import pytest

from halephant.config.schema import ServerTlsConfig
from halephant.protocol import codes
from halephant.protocol import messages as m
from halephant.server_tls import ServerTls, only_tls_accepted, retries_in_plaintext
from halephant.topology.probe import ProbeFailed, ProbeSession

HBA_OVER_TLS = (
    "28000",
    'no pg_hba.conf entry for host "10.0.0.1", user "app", database "app", SSL encryption',
)
HBA_PLAINTEXT = (
    "28000",
    'no pg_hba.conf entry for host "10.0.0.1", user "app", database "app", no encryption',
)
WRONG_PASSWORD = ("28P01", 'password authentication failed for user "app"')


def tls(mode: str) -> ServerTls:
    return ServerTls.build("main", ServerTlsConfig(mode=mode))


@pytest.mark.parametrize(
    "refusal",
    [HBA_OVER_TLS, WRONG_PASSWORD, ("53300", "sorry, too many clients already"), ("3D000", "no db")],
)
def test_prefer_tries_any_refusal_before_authentication_ok_again(refusal: tuple[str, str]) -> None:
    # libpq (fe-connect.c): every ErrorResponse in CONNECTION_AWAITING_RESPONSE, a wrong password too
    assert retries_in_plaintext(tls("prefer"), True, refusal)


def test_what_is_not_tried_again() -> None:
    assert not retries_in_plaintext(tls("prefer"), False, HBA_OVER_TLS)  # not over TLS to begin with
    assert not retries_in_plaintext(tls("prefer"), True, None)  # no refusal: lost, or halephant's own
    # the server is starting or stopping: libpq moves to the next host, not to plaintext
    assert not retries_in_plaintext(tls("prefer"), True, ("57P03", "the database system is starting up"))
    # the modes that require TLS never fall back (verify-ca is as they are: its ca_file needs a file)
    assert not retries_in_plaintext(tls("require"), True, HBA_OVER_TLS)
    verify_full = ServerTls.build("main", ServerTlsConfig(mode="verify-full", ca_file="system"))
    assert not retries_in_plaintext(verify_full, True, HBA_OVER_TLS)
    assert not retries_in_plaintext(None, True, HBA_OVER_TLS)


def test_the_refusal_reported_after_both_failed() -> None:
    assert only_tls_accepted(HBA_PLAINTEXT)  # then the refusal over TLS says what is wrong
    assert not only_tls_accepted(WRONG_PASSWORD)
    assert not only_tls_accepted(None)


def test_a_session_keeps_the_refusal_before_authentication_ok_only() -> None:
    session = ProbeSession("app", "secret", "postgres")
    refusal = m.error_response("28P01", 'password authentication failed for user "app"', fatal=True)
    with pytest.raises(ProbeFailed):
        session.feed(m.authentication(codes.AUTH_CLEARTEXT_PASSWORD) + refusal)
    assert session.refusal == WRONG_PASSWORD
    after = ProbeSession("app", "secret", "nodb")
    with pytest.raises(ProbeFailed):
        after.feed(
            m.authentication(codes.AUTH_OK)
            + m.error_response("3D000", 'database "nodb" does not exist', fatal=True)
        )
    assert after.refusal is None
