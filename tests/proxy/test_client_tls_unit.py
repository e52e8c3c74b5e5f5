"""Unit: reading the client's first TLS record before the handshake (`halephant.proxy.client_tls`): when
it is whole, the ALPN protocols its ClientHello offers, and which handshakes ALPN refuses."""

from __future__ import annotations

import ssl

import pytest

from halephant.proxy.client_tls import alpn_refusal, hello_complete, offered_alpn


def client_hello(alpn: list[str] | None, **context_settings: object) -> bytes:
    """The first record a Python (OpenSSL) client sends."""
    context = ssl.create_default_context()
    for name, value in context_settings.items():
        setattr(context, name, value)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="halephant.example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    "alpn", [None, ["postgresql"], ["h2", "http/1.1"], ["h2", "postgresql"]], ids=lambda a: repr(a)
)
@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["1.2", "1.3"])
def test_offered_alpn_reads_a_real_client_hello(alpn: list[str] | None, maximum: ssl.TLSVersion) -> None:
    hello = client_hello(alpn, maximum_version=maximum)
    assert hello_complete(hello)
    assert offered_alpn(hello) == (tuple(alpn) if alpn is not None else None)


def test_the_first_record_is_waited_for_whole() -> None:
    hello = client_hello(["postgresql"])
    assert not hello_complete(b"")
    for cut in (1, 4, 5, 100, len(hello) - 1):
        assert not hello_complete(hello[:cut]), cut
    # and what comes behind it is the TLS layer's
    assert hello_complete(hello) and hello_complete(hello + b"\x14\x03\x03\x00\x01\x01")
    # a cut record reads as no offer: the handshake's own choice then decides
    assert offered_alpn(hello[:-20]) in (None, ("postgresql",))
    assert offered_alpn(hello[:60]) is None


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n", b"\x17\x03\x03\x00\x10", b"\x16\x03\x01\xff\xff"],
    ids=["not-tls", "not-a-handshake", "longer-than-a-record"],
)
def test_what_is_no_client_hello_goes_to_the_tls_layer_at_once(data: bytes) -> None:
    # OpenSSL refuses it there, and the refusal is logged as a failed handshake
    assert hello_complete(data)
    assert offered_alpn(data) is None


def test_alpn_refusal_as_postgresql_17() -> None:
    assert alpn_refusal(True, "postgresql", ("postgresql",)) is None
    assert alpn_refusal(False, "postgresql", ("h2", "postgresql")) is None
    assert alpn_refusal(False, None, None) is None  # libpq before 17, after an SSLRequest
    assert "direct TLS without ALPN" in str(alpn_refusal(True, None, None))
    for direct in (True, False):
        assert (
            alpn_refusal(direct, None, ("h2",))
            == "the client offered the ALPN protocol(s) 'h2', not 'postgresql'"
        )
