"""HTTP/2 end to end with real peers on loopback: scenarios of the HTTP/1.1 integration tests run
over both protocols (routing and header mutations, retries, timeouts, filters, shadowing,
tracing, metrics and access logs), HTTP/2 upstreams (pooling, a graceful GOAWAY, protocol
translation both ways), drain, and the native config shape (``codec``, ``http2``, cluster
``protocol``). The Envoy-differential cases are in tests/conformance/h2."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import h2.config
import h2.connection
import h2.events
import pytest
from aiohttp import web
from h2_helpers import H2Client, H2Request, H2Upstream, RawH2Server, good_bad_good
from resilience_helpers import metric, prometheus

from sidecar.testing import Upstream, native_config, running_proxy

VIA = ["http1", "h2"]


async def fetch(via: str, port: int, method: str = "GET", path: str = "/", headers=(),
                body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request over HTTP/1.1 (aiohttp) or HTTP/2 (prior knowledge): status, headers, body."""
    if via == "h2":
        async with H2Client(port) as c:
            r = await c.request(method, path, list(headers), body)
            return r.status or 0, dict(r.headers), r.body
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"http://127.0.0.1:{port}{path}", headers=list(headers),
                             data=body or None) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def seen(up: Upstream, i: int = -1) -> dict[str, str]:
    return {k.lower(): v for k, v in up.requests[i].headers.items()}


# ---- the same scenarios over HTTP/1.1 and HTTP/2 -------------------------------------------------

@pytest.mark.parametrize("via", VIA)
async def test_routing_and_header_mutations(via):
    async with Upstream() as a, Upstream() as b:
        cfg = native_config(
            clusters={"a": [a.address], "b": [b.address]},
            routes=[{"match": {"prefix": "/b", "headers": {"x-pick": "b"}}, "cluster": "b",
                     "request_headers": {"set": {"x-added": "1"}},
                     "response_headers": {"set": {"x-route": "b"}}},
                    {"match": {"path": "/direct"}, "direct_response": {"status": 202, "body": "hi"}},
                    {"match": {"prefix": "/"}, "cluster": "a",
                     "rewrite": {"prefix": "/rewritten/"}}])
        async with running_proxy(cfg, admin=False) as p:
            port = p.port()
            st, h, _ = await fetch(via, port, path="/b/x", headers=[("x-pick", "b")])
            assert st == 200 and h["x-route"] == "b"
            assert seen(b)["x-added"] == "1" and b.requests[-1].path == "/b/x"
            st, h, body = await fetch(via, port, path="/direct")
            assert (st, body) == (202, b"hi")
            st, _, _ = await fetch(via, port, path="/other?q=1")
            assert st == 200 and a.requests[-1].path.startswith("/rewritten/other")
            assert seen(a)["x-forwarded-proto"] == "http" and "x-request-id" in seen(a)


@pytest.mark.parametrize("via", VIA)
async def test_retries_and_timeouts(via):
    calls = {"n": 0}

    async def flaky(request):
        await request.read()
        calls["n"] += 1
        if request.path == "/slow":
            await asyncio.sleep(2)
        if calls["n"] % 2 == 1:
            return web.Response(status=503, text="try again")
        return web.Response(text="ok")

    async with Upstream(flaky) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[
            {"match": {"path": "/slow"}, "cluster": "svc", "timeout": "300ms"},
            {"match": {"prefix": "/"}, "cluster": "svc",
             "retry": {"retry_on": "5xx", "retries": 2, "backoff": "1ms",
                       "retry_non_idempotent": True}}])
        async with running_proxy(cfg, admin=False) as p:
            st, _, body = await fetch(via, p.port(), "POST", "/r", body=b"payload")
            assert (st, body) == (200, b"ok") and calls["n"] == 2
            assert [r.body for r in up.requests] == [b"payload", b"payload"]
            st, h, body = await fetch(via, p.port(), path="/slow")
            assert (st, body) == (504, b"upstream request timeout")


@pytest.mark.parametrize("via", VIA)
async def test_route_stream_timeouts(via):
    """A route's idle_timeout and max_stream_duration (the listener's stream timeouts, which
    the codecs' sweeps enforce) answer the same over both protocols."""
    async def slow(request):
        await asyncio.sleep(1.5)
        return web.Response(text="late")

    async with Upstream(slow) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[
            {"match": {"prefix": "/idle"}, "cluster": "svc", "idle_timeout": "300ms"},
            {"match": {"prefix": "/dur"}, "cluster": "svc", "max_stream_duration": "300ms"},
            {"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, admin=False) as p:
            st, _, body = await fetch(via, p.port(), path="/idle")
            assert (st, body) == (504, b"stream timeout")
            st, _, body = await fetch(via, p.port(), path="/dur")
            assert (st, body) == (504, b"downstream duration timeout")
            st, _, body = await fetch(via, p.port(), path="/ok")
            assert (st, body) == (200, b"late")


@pytest.mark.parametrize("via", VIA)
async def test_filters(via):
    async with Upstream() as up:
        cfg = native_config(
            clusters={"svc": [up.address]},
            filters=[{"rbac": {"action": "DENY", "policies": {"admin": {
                         "permissions": [{"path": {"prefix": "/admin"}}],
                         "principals": [{"any": True}]}}}},
                     {"local_ratelimit": {"max_tokens": 2, "fill_interval": "1h"}},
                     {"fault": {}}],
            routes=[{"match": {"prefix": "/fault"}, "cluster": "svc",
                     "filters": {"fault": {"abort": {"status": 418}}}},
                    {"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, admin=False) as p:
            st, _, body = await fetch(via, p.port(), path="/admin/x")
            assert (st, body) == (403, b"RBAC: access denied")
            st, _, body = await fetch(via, p.port(), path="/fault")
            assert (st, body) == (418, b"fault filter abort")
            assert (await fetch(via, p.port(), path="/a"))[0] == 200
            st, h, _ = await fetch(via, p.port(), path="/b")
            assert st == 429 and h.get("x-ratelimit-limit") is None or st == 429


@pytest.mark.parametrize("via", VIA)
async def test_shadowing(via):
    async with Upstream() as prim, Upstream() as sh:
        cfg = native_config(clusters={"p": [prim.address], "s": [sh.address]}, routes=[
            {"match": {"prefix": "/"}, "cluster": "p", "mirror": [{"cluster": "s"}]}])
        async with running_proxy(cfg, admin=False) as p:
            st, _, _ = await fetch(via, p.port(), "POST", "/m", body=b"copy me")
            assert st == 200
            for _ in range(200):
                if sh.requests:
                    break
                await asyncio.sleep(0.01)
            assert sh.requests[0].body == b"copy me" and sh.requests[0].path == "/m"
            assert seen(sh, 0)["host"].endswith("-shadow") or "-shadow" in seen(sh, 0)["host"]


@pytest.mark.parametrize("via", VIA)
async def test_tracing_metrics_and_access_log(via, tmp_path):
    log_path = tmp_path / "access.log"
    async with Upstream() as up:
        cfg = native_config(
            clusters={"svc": [up.address]},
            routes=[{"name": "main", "match": {"prefix": "/"}, "cluster": "svc"}],
            listener={"access_log": {"path": str(log_path)}},
            tracing={"exporter": "memory", "sample_percent": 100.0})
        async with running_proxy(cfg) as p:
            tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            st, _, _ = await fetch(via, p.port(), path="/t", headers=[("traceparent", tp)])
            assert st == 200
            # the upstream is a child of the server span, in the client's trace
            assert seen(up)["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
            text = await prometheus(p)
            assert metric(text, "sidecar_http_downstream_rq_total", route="main",
                          status_class="2xx") == 1
        from sidecar.observability.access_log import flush_all
        flush_all()
        line = json.loads(log_path.read_text().splitlines()[-1])
        assert line["protocol"] == ("HTTP/2" if via == "h2" else "HTTP/1.1")
        assert line["status"] == 200 and line["path"] == "/t" and line["grpc_status"] is None


# ---- HTTP/2 upstreams ------------------------------------------------------------------------------

@pytest.mark.parametrize("via", VIA)
async def test_http2_upstream_translation_both_ways(via):
    async def handler(req: H2Request):
        return 200, [("content-type", "text/plain"), ("x-up", "1")], b"from h2:" + req.body, \
            [("x-trailer", "t")]

    async with H2Upstream(handler) as up:
        cfg = native_config(clusters={"svc": {"endpoints": [up.address], "protocol": "http2"}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, admin=False) as p:
            st, h, body = await fetch(via, p.port(), "POST", "/x?y=1",
                                      headers=[("x-custom", "v"), ("te", "trailers")], body=b"abc")
            assert (st, body) == (200, b"from h2:abc") and h["x-up"] == "1"
            req = up.requests[-1]
            assert req.path == "/x?y=1" and req.get("x-custom") == "v"
            # no connection-specific header reaches the HTTP/2 upstream (RFC 9113 8.2.2)
            names = {k for k, _ in req.headers}
            assert not names & {"connection", "keep-alive", "transfer-encoding", "host", "upgrade"}
            assert req.get("te") == "trailers"


async def test_http2_upstream_multiplexes_and_survives_goaway():
    async def slow(req: H2Request):
        await asyncio.sleep(0.05)
        return 200, [], req.path.encode(), []

    async with H2Upstream(slow, max_streams=5, goaway_after=7) as up:
        cfg = native_config(clusters={"svc": {"endpoints": [up.address], "protocol": "http2"}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc",
                                     "retry": {"retry_on": "refused-stream,reset", "retries": 3,
                                               "backoff": "1ms"}}])
        async with running_proxy(cfg, admin=False) as p:
            async with H2Client(p.port()) as c:
                sids = [await c.start("GET", f"/r{i}") for i in range(20)]
                rs = [await c.response(s) for s in sids]
            assert [r.status for r in rs] == [200] * 20
            assert [r.body for r in rs] == [f"/r{i}".encode() for i in range(20)]
            # the GOAWAY sent another connection's way the streams it did not cover
            assert up.connections >= 2


class _MalformedOnBad(RawH2Server):
    """An HTTP/2 upstream (``h2`` with its outbound checks off) answering ``/bad`` with a
    connection-specific header (RFC 9113 8.2.2: a malformed response), anything else well."""

    def data_received(self, data: bytes) -> None:
        for e in self.c.receive_data(data):
            if isinstance(e, h2.events.RequestReceived):
                bad = dict(e.headers)[b":path"] == b"/bad"
                head = [(b":status", b"200"), (b"content-length", b"2")]
                self.c.send_headers(e.stream_id, head + [(b"connection", b"close")] if bad else head)
                self.c.send_data(e.stream_id, b"ok", end_stream=True)
        self.t.write(self.c.data_to_send())


async def test_malformed_upstream_response_resets_only_its_stream():
    good1, bad, good2 = await good_bad_good(_MalformedOnBad, "/bad")
    assert (good1.status, good1.body) == (200, b"ok")
    assert bad.status == 502       # upstream protocol error (UPE), as a malformed h1 answer
    assert (good2.status, good2.body) == (200, b"ok")
    # a stream error: the pooled connection stayed up for the next request
    assert _MalformedOnBad.connections == 1


async def test_grpc_like_trailers_only_and_status_metrics():
    async def handler(req: H2Request):
        if req.path.endswith("/Fail"):
            return 200, [("content-type", "application/grpc"), ("grpc-status", "5"),
                         ("grpc-message", "no such thing")], b"", []
        return 200, [("content-type", "application/grpc")], b"\x00\x00\x00\x00\x02hi", \
            [("grpc-status", "0")]

    async with H2Upstream(handler) as up:
        cfg = native_config(clusters={"svc": {"endpoints": [up.address], "protocol": "http2"}},
                            routes=[{"name": "grpc", "match": {"prefix": "/pkg.Svc/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            async with H2Client(p.port()) as c:
                hdrs = [("content-type", "application/grpc"), ("te", "trailers")]
                ok = await c.request("POST", "/pkg.Svc/Ok", hdrs, b"\x00\x00\x00\x00\x00")
                bad = await c.request("POST", "/pkg.Svc/Fail", hdrs, b"\x00\x00\x00\x00\x00")
                nr = await c.request("POST", "/nothing", hdrs, b"")
            assert ok.trailers == [("grpc-status", "0")] and ok.body.endswith(b"hi")
            assert bad.get("grpc-status") == "5" and bad.body == b"" and not bad.trailers
            text = await prometheus(p)
            assert metric(text, "sidecar_grpc_downstream_rq_total", route="grpc", grpc_status="0") == 1
            assert metric(text, "sidecar_grpc_downstream_rq_total", route="grpc", grpc_status="5") == 1
            # no route: a gRPC-shaped 404 (UNIMPLEMENTED), as from Envoy
            assert nr.status == 200 and nr.get("grpc-status") == "12"


# ---- listener behaviour ----------------------------------------------------------------------------

async def test_drain_sends_goaway_and_finishes_open_streams():
    async def slow(request):
        await asyncio.sleep(0.5)
        return web.Response(text="done")

    async with Upstream(slow) as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, admin=False) as p:
            lr = p.app.store.listeners["test"]
            async with H2Client(p.port()) as c:
                sid = await c.start("GET", "/in-flight")
                await asyncio.sleep(0.1)
                drain = asyncio.ensure_future(lr.drain(5.0))
                r = await c.response(sid)
                await drain
            assert (r.status, r.body) == (200, b"done")
            assert c.goaway is not None and c.goaway[0] == 0


async def test_native_http2_settings_and_codec_choice():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener={"codec": "http2", "http2": {"max_concurrent_streams": 3,
                                                                  "initial_stream_window": 65535}})
        async with running_proxy(cfg, admin=False) as p:
            async with H2Client(p.port()) as c:
                r = await c.request("GET", "/a")
                assert r.status == 200
                assert c.conn.remote_settings.max_concurrent_streams == 3
            # codec: http2 closes an HTTP/1.1 client's connection without an answer
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port())
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()


@pytest.mark.parametrize("via", VIA)
async def test_sdk_filters(via):
    """cors, compressor (a streamed response compressed on the way) and buffer over both."""
    big = b"compress me " * 4000

    async def handler(request):
        await request.read()
        if request.path == "/stream":
            resp = web.StreamResponse(headers={"content-type": "text/plain"})
            await resp.prepare(request)
            for _ in range(4):
                await resp.write(big)
            await resp.write_eof()
            return resp
        return web.Response(body=big, content_type="text/plain")

    async with Upstream(handler) as up:
        cfg = native_config(
            clusters={"svc": [up.address]},
            filters=[{"cors": {"allow_origins": ["https://app.test"], "allow_methods": "GET, PUT"}},
                     {"compressor": {"algorithm": "gzip"}},
                     {"buffer": {"max_request_bytes": 1000}}],
            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, admin=False) as p:
            st, h, _ = await fetch(via, p.port(), "OPTIONS", "/x", headers=[
                ("origin", "https://app.test"), ("access-control-request-method", "PUT")])
            assert st == 200 and h["access-control-allow-origin"] == "https://app.test"
            if via == "h2":       # aiohttp decompresses by itself; the raw bytes over HTTP/2
                for path, n in (("/text", 1), ("/stream", 4)):
                    st, h, body = await fetch(via, p.port(), path=path,
                                              headers=[("accept-encoding", "gzip")])
                    assert h["content-encoding"] == "gzip" and gzip.decompress(body) == big * n
            st, _, body = await fetch(via, p.port(), "POST", "/up", body=b"x" * 1001)
            assert (st, body) == (413, b"Payload Too Large")


@pytest.mark.parametrize("via", VIA)
async def test_ipv6_client(via):
    """A client on an IPv6 listener: its peer is a 4-tuple (host, port, flowinfo, scope_id)
    from the socket, which the codecs keep as (host, port); the upstream sees it in XFF."""
    async with Upstream() as up:
        cfg = native_config(clusters={"up": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "up"}],
                            listener={"address": "::1"})
        async with running_proxy(cfg, admin=False) as p:
            port = p.port()
            if via == "h2":
                async with H2Client(port, host="::1") as c:
                    st = (await c.request("GET", "/v6")).status
            else:
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"http://[::1]:{port}/v6") as r:
                        st = r.status
            assert st == 200
            assert seen(up)["x-forwarded-for"] == "::1"
