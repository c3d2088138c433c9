"""The upstream HTTP/2 connection (libnghttp2) through the proxy against a peer of another
implementation (``h2`` with its outbound checks off), on loopback: what nghttp2 finds wrong in
a response (a body that disagrees with its ``content-length``, a pseudo-header in trailers)
fails only that stream, and the pooled connection serves the next request. Malformed response
heads: ``test_http2.py``; the Envoy-differential cases: tests/conformance/h2."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import pytest
from h2_helpers import H2Client

from sidecar.testing import native_config, running_proxy


class _Peer(asyncio.Protocol):
    """``/short``: ``content-length: 10`` and 5 bytes; ``/bad-trailers``: trailers carrying a
    pseudo-header; anything else: 200 "ok"."""

    connections = 0

    def connection_made(self, transport) -> None:
        type(self).connections += 1
        self.t = transport
        self.c = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False))
        self.c.initiate_connection()
        transport.write(self.c.data_to_send())

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
    _Peer.connections = 0
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = native_config(clusters={"svc": {"endpoints": [f"127.0.0.1:{port}"],
                                              "protocol": "http2"}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, admin=False) as p, H2Client(p.port()) as c:
            good1 = await c.request("GET", "/good")
            bad = await c.request("GET", path)
            good2 = await c.request("GET", "/good")
        assert (good1.status, good1.body) == (200, b"ok")
        # the head may have gone out already: then the client's stream is reset mid-body
        # the head was handed on before the body proved bad: the client's stream is reset
        # (as by Envoy: tests/conformance/h2 upstream-content-length-mismatch), never completed
        assert bad.reset is not None, bad
        assert (good2.status, good2.body) == (200, b"ok")
        assert _Peer.connections == 1        # a stream error: the connection stayed up
    finally:
        server.close()
