"""The precomputed response fields of the downstream HTTP/2 codec: what a response never
carries, the names encoded once, and caches a peer cannot grow."""

from __future__ import annotations

from multidict import MultiDict
from ngh2 import NeverIndexedHeader

from sidecar.codec import http2_response as r


def test_connection_drop_names_the_tokens_and_the_connection_specific_fields():
    for value in ("keep-alive", "Keep-Alive"):
        assert r.CONNECTION_DROP[value] == r.DROP_OUT
        assert {"connection", "keep-alive", "transfer-encoding", "server", "te"} <= r.DROP_OUT
    assert "close" in r.CONNECTION_DROP["close"]
    drop = r.connection_drop(" X-Hop ,Other")
    assert {"x-hop", "other"} <= drop and r.DROP_OUT <= drop


def test_caches_are_bounded_in_entries_and_length():
    long_value = "x-" + "a" * 100
    r.connection_drop(long_value)
    assert long_value not in r.CONNECTION_DROP
    for i in range(100):
        r.connection_drop(f"x-{i}")
    assert len(r.CONNECTION_DROP) <= 64
    long_name = "x-" + "n" * 100
    out: list = []
    r.out_field(out, long_name, "v")
    r.out_field(out, "x-short", "v")
    assert out == [(long_name.encode(), b"v"), (b"x-short", b"v")]
    assert long_name not in r.OUT_NAMES and r.OUT_NAMES["x-short"] == b"x-short"


def test_volatile_fields_are_never_indexed_nor_cached():
    out: list = []
    r.out_field(out, "x-request-id", "abc")
    [field] = out
    assert isinstance(field, NeverIndexedHeader) and field == (b"x-request-id", b"abc")
    assert "x-request-id" not in r.OUT_NAMES


def test_trailer_block_drops_connection_specific_and_pseudo_fields():
    block = r.trailer_block(MultiDict([("grpc-status", "0"), ("connection", "x"),
                                       (":status", "200"), ("grpc-message", "caf\u00e9")]))
    assert block == [(b"grpc-status", b"0"), (b"grpc-message", "caf\u00e9".encode("latin-1"))]


def test_date_and_server_fields():
    date = r.date_field()
    assert date[0] == b"date" and date[1].endswith(b" GMT")
    assert r.server_field("envoy") == ("envoy", (b"server", b"envoy"))
