"""The listener filters' parsers on real bytes: ClientHellos written by Python's own TLS stack
(OpenSSL, through a memory BIO), HTTP request lines, and everything in between."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.l4.inspectors import (
    NEED_MORE,
    NOT_FOUND,
    ClientHello,
    TlsParseError,
    detect_http,
    parse_client_hello,
)


def client_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_sni_and_alpn_from_a_real_client_hello():
    hello = client_hello("API.Example.com", ["h2", "http/1.1"])
    assert parse_client_hello(hello) == ClientHello("api.example.com", ("h2", "http/1.1"))


def test_no_sni_no_alpn():
    assert parse_client_hello(client_hello(None)) == ClientHello("", ())


def test_every_prefix_asks_for_more():
    hello = client_hello("a.test", ["http/1.1"])
    for n in range(len(hello)):
        assert parse_client_hello(hello[:n]) == NEED_MORE, n
    # trailing bytes (the client's next flight) do not matter
    assert parse_client_hello(hello + b"\x17\x03\x03") == ClientHello("a.test", ("http/1.1",))


def test_a_hello_split_over_two_records():
    hello = client_hello("split.test")
    body = hello[5:]
    cut = len(body) // 2
    rec = lambda b: b"\x16\x03\x01" + len(b).to_bytes(2, "big") + b  # noqa: E731
    assert parse_client_hello(rec(body[:cut]) + rec(body[cut:])) == ClientHello("split.test", ())
    assert parse_client_hello(rec(body[:cut]) + rec(body[cut:])[:7]) == NEED_MORE


def test_not_tls():
    assert parse_client_hello(b"GET / HTTP/1.1\r\n") == NOT_FOUND
    assert parse_client_hello(b"\x16\x09\x00\x00\x10") == NOT_FOUND     # not SSL 3.x
    assert parse_client_hello(b"\x00\x00\x00") == NEED_MORE     # no record header yet (Envoy)


def test_malformed_and_oversized_hellos_are_errors():
    with pytest.raises(TlsParseError):
        parse_client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")   # a ServerHello
    with pytest.raises(TlsParseError):
        parse_client_hello(b"\x16\x03\x01\x00\x00")                   # an empty record
    with pytest.raises(TlsParseError):
        parse_client_hello(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00")
    with pytest.raises(TlsParseError):
        parse_client_hello(client_hello("x.test"), max_size=64)


@given(st.binary(max_size=300))
def test_any_bytes_give_an_answer_or_a_parse_error(data):
    try:
        r = parse_client_hello(data)
    except TlsParseError:
        return
    assert r in (NEED_MORE, NOT_FOUND) or isinstance(r, ClientHello)


@pytest.mark.parametrize("data,want", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http/1.1"),
    (b"POST /upload?a=1 HTTP/1.0\r\n", "http/1.0"),
    (b"GET / HTTP/1.1\n", "http/1.1"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2c"),
    (b"PRI * HTTP/2.0\r\n", NEED_MORE),
    (b"GE", NEED_MORE),
    (b"GET /path HT", NEED_MORE),
    (b"GET /path HTTP/1.", NEED_MORE),
    (b"GET /path XTTP", NOT_FOUND),
    (b"GET / HTTP/2.0\r\n", NOT_FOUND),
    (b"\x00\x00\x00\x2a", NOT_FOUND),             # a Kafka frame
    (b"\x16\x03\x01\x02\x00", NOT_FOUND),         # TLS
    (b"SSH-2.0-OpenSSH_9.6\r\n", NOT_FOUND),
    (b" GET / HTTP/1.1\r\n", NOT_FOUND),
    (b"", NEED_MORE),
])
def test_http_detection(data, want):
    assert detect_http(data) == want
