"""The upstream HTTP/2 connection (libnghttp2) through the proxy against a peer of another
implementation (``h2`` with its outbound checks off), on loopback: what nghttp2 finds wrong in
a response (a body that disagrees with its ``content-length``, a pseudo-header in trailers)
fails only that stream, and the pooled connection serves the next request. Malformed response
heads: ``test_http2.py``; the Envoy-differential cases: tests/conformance/h2."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2_helpers import H2Client, H2Request, H2Upstream, RawH2Server, good_bad_good
from resilience_helpers import envoy_config, proxy

from sidecar.testing import native_config


class _Peer(RawH2Server):
    """``/short``: ``content-length: 10`` and 5 bytes; ``/bad-trailers``: trailers carrying a
    pseudo-header; anything else: 200 "ok"."""

    def data_received(self, data: bytes) -> None:
        for e in self.c.receive_data(data):
            if isinstance(e, h2.events.RequestReceived):
                path = dict(e.headers)[b":path"]
                sid = e.stream_id
                if path == b"/short":
                    self.c.send_headers(sid, [(b":status", b"200"), (b"content-length", b"10")])
                    self.c.send_data(sid, b"short", end_stream=True)
                elif path == b"/bad-trailers":
                    self.c.send_headers(sid, [(b":status", b"200")])
                    self.c.send_data(sid, b"body")
                    self.c.send_headers(sid, [(b":status", b"200")], end_stream=True)
                else:
                    self.c.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
                    self.c.send_data(sid, b"ok", end_stream=True)
            elif isinstance(e, h2.events.DataReceived):
                self.c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        self.t.write(self.c.data_to_send())


@pytest.mark.parametrize("path", ["/short", "/bad-trailers"])
async def test_a_response_body_nghttp2_refuses_fails_only_its_stream(path):
    good1, bad, good2 = await good_bad_good(_Peer, path)
    assert (good1.status, good1.body) == (200, b"ok")
    # the head was handed on before the body proved bad: the client's stream is reset
    # (as by Envoy: tests/conformance/h2 upstream-content-length-mismatch), never completed
    assert bad.reset is not None, bad
    assert (good2.status, good2.body) == (200, b"ok")
    assert _Peer.connections == 1        # a stream error: the connection stayed up


async def _headers_by_path(req: H2Request) -> tuple[int, list, bytes, list]:
    """``/count/N``: N extra response headers of ~10 bytes; ``/bytes/N``: one header of N
    bytes."""
    _, kind, n = req.path.split("/")
    if kind == "count":
        return 200, [(f"x-h{i}", "v") for i in range(int(n))], b"ok", []
    return 200, [("x-big", "v" * int(n))], b"ok", []


def _limited(up: H2Upstream, envoy: bool) -> dict:
    """An HTTP/2 cluster whose response heads may carry at most 10 fields and 1 KiB, in the
    Envoy v3 shape or the native one."""
    if envoy:
        return envoy_config(clusters={"app": {"endpoints": [up.address],
                                              "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
                "common_http_protocol_options": {"max_headers_count": 10,
                                                 "max_response_headers_kb": 1}}}}},
            routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
    return native_config(clusters={"app": {"endpoints": [up.address], "protocol": "http2",
                                           "max_response_headers_count": 10,
                                           "max_response_headers_kb": 1}},
                         routes=[{"match": {"prefix": "/"}, "cluster": "app"}])


@pytest.mark.parametrize("envoy", [False, True], ids=["native", "envoy"])
async def test_cluster_response_head_limits_apply_to_http2_upstreams(envoy):
    """``max_response_headers_count`` / ``max_response_headers_kb`` (Envoy's
    ``common_http_protocol_options``) bound an HTTP/2 upstream's response heads as they bound
    HTTP/1.1 ones: a head over either is a 502 (an upstream protocol error), and only its stream fails (the pooled
    connection serves the next request)."""
    async with H2Upstream(_headers_by_path) as up:
        async with proxy(_limited(up, envoy)) as p, H2Client(p.port()) as c:
            ok = await c.request("GET", "/count/9")
            many = await c.request("GET", "/count/11")
            big = await c.request("GET", "/bytes/1100")
            again = await c.request("GET", "/bytes/900")
        assert (ok.status, ok.body) == (200, b"ok")
        assert many.status == 502 and big.status == 502
        assert (again.status, again.body) == (200, b"ok")
        assert up.connections == 1          # stream errors: the connection stayed up
