"""buffer, cors, compressor and header_to_metadata through real traffic, in both config
formats (the same requests, the same answers)."""

from __future__ import annotations

import gzip
import json

import aiohttp
import brotli
import pytest

from sidecar.testing import Upstream, free_port, native_config, raw_request, running_proxy

BIG = ("lorem ipsum dolor sit amet " * 200).encode()

SHOW_METADATA = '''
import json
from sidecar import sdk

class ShowMetadata(sdk.UserFilter):
    """Puts this request's dynamic metadata in a response header (for the test to see)."""
    async def __call__(self, req, next):
        resp = await next(req)
        resp.headers["x-metadata"] = json.dumps(req.ctx.metadata, sort_keys=True)
        return resp
'''


async def app(request):
    from aiohttp import web
    body = await request.read()
    if request.path == "/text":
        return web.Response(body=BIG, content_type="text/plain")
    if request.path == "/stream":
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        for _ in range(4):
            await resp.write(BIG)
        await resp.write_eof()
        return resp
    return web.json_response({"len": len(body), "headers": dict(request.headers)})


CORS = {"allow_origin_string_match": [{"exact": "https://app.test"}], "allow_methods": "GET, PUT",
        "allow_headers": "content-type", "max_age": "600", "expose_headers": "x-trace"}


def native(up: str, show: str) -> dict:
    return native_config(
        clusters={"svc": [up]},
        filters=[{"python": {"module": show, "class": "ShowMetadata"}},
                 {"header_to_metadata": {"request_rules": [{
                     "header": "x-tenant", "remove": True,
                     "on_header_present": {"metadata_namespace": "tenancy", "key": "tenant"}}]}},
                 {"cors": {"allow_origins": ["https://app.test"], "allow_methods": "GET, PUT",
                           "allow_headers": "content-type", "max_age": 600,
                           "expose_headers": "x-trace"}},
                 {"compressor": {"algorithm": "br"}},
                 {"compressor": {"algorithm": "gzip"}},
                 {"buffer": {"max_request_bytes": 1000}}],
        routes=[{"match": {"prefix": "/upload-big"}, "cluster": "svc",
                 "filters": {"buffer": {"max_request_bytes": 5000}}},
                {"match": {"prefix": "/stream-up"}, "cluster": "svc", "filters": {"buffer": "disabled"}},
                {"match": {"prefix": "/"}, "cluster": "svc"}])


def envoy(up: str, show: str, port: int) -> dict:
    host, p = up.split(":")
    t = "type.googleapis.com/envoy.extensions."

    def compressor(name, typ):
        return {"name": name, "typed_config": {"@type": t + "filters.http.compressor.v3.Compressor",
                                               "compressor_library": {"name": name, "typed_config": {
                                                   "@type": t + f"compression.{typ}"}}}}

    routes = [
        {"match": {"prefix": "/upload-big"}, "route": {"cluster": "svc"},
         "typed_per_filter_config": {"envoy.filters.http.buffer": {
             "@type": t + "filters.http.buffer.v3.BufferPerRoute",
             "buffer": {"max_request_bytes": 5000}}}},
        {"match": {"prefix": "/stream-up"}, "route": {"cluster": "svc"},
         "typed_per_filter_config": {"envoy.filters.http.buffer": {
             "@type": t + "filters.http.buffer.v3.BufferPerRoute", "disabled": True}}},
        {"match": {"prefix": "/"}, "route": {"cluster": "svc"}}]
    hcm = {"@type": t + "filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "in",
           "route_config": {"name": "r", "virtual_hosts": [{
               "name": "all", "domains": ["*"], "routes": routes,
               "typed_per_filter_config": {"envoy.filters.http.cors": {
                   "@type": t + "filters.http.cors.v3.CorsPolicy", **CORS}}}]},
           "http_filters": [
               {"name": "show", "typed_config": {
                   "@type": "type.googleapis.com/pysidecar.filter.v1.PythonFilter",
                   "module": show, "class": "ShowMetadata"}},
               {"name": "envoy.filters.http.header_to_metadata", "typed_config": {
                   "@type": t + "filters.http.header_to_metadata.v3.Config",
                   "request_rules": [{"header": "x-tenant", "remove": True, "on_header_present": {
                       "metadata_namespace": "tenancy", "key": "tenant"}}]}},
               {"name": "envoy.filters.http.cors", "typed_config": {
                   "@type": t + "filters.http.cors.v3.Cors"}},
               compressor("brotli", "brotli.compressor.v3.Brotli"),
               compressor("gzip", "gzip.compressor.v3.Gzip"),
               {"name": "envoy.filters.http.buffer", "typed_config": {
                   "@type": t + "filters.http.buffer.v3.Buffer", "max_request_bytes": 1000}},
               {"name": "envoy.filters.http.router", "typed_config": {
                   "@type": t + "filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{"name": "in", "address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                    "typed_config": hcm}]}]}],
                "clusters": [{"name": "svc", "connect_timeout": "1s", "load_assignment": {
                    "cluster_name": "svc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": host, "port_value": int(p)}}}}]}]}}]}}


@pytest.mark.parametrize("fmt", ["native", "envoy"])
async def test_builtins_through_the_proxy(tmp_path, fmt):
    show = tmp_path / "show.py"
    show.write_text(SHOW_METADATA)
    async with Upstream(app) as up:
        cfg = native(up.address, str(show)) if fmt == "native" else \
            envoy(up.address, str(show), free_port())
        async with running_proxy(cfg) as proxy, \
                aiohttp.ClientSession(auto_decompress=False,
                                      skip_auto_headers=("Accept-Encoding",)) as s:
            # header_to_metadata: the header became metadata and was removed upstream
            async with s.get(proxy.url("/x"), headers={"x-tenant": "acme"}) as r:
                assert json.loads(r.headers["x-metadata"]) == {"tenancy": {"tenant": "acme"}}
                assert "X-Tenant" not in (await r.json())["headers"]
            # cors: a preflight answered by the proxy, a simple request decorated
            async with s.options(proxy.url("/x"), headers={
                    "origin": "https://app.test", "access-control-request-method": "PUT"}) as r:
                assert r.status == 200
                assert r.headers["access-control-allow-origin"] == "https://app.test"
                assert r.headers["access-control-allow-methods"] == "GET, PUT"
                assert r.headers["access-control-max-age"] == "600"
            async with s.get(proxy.url("/x"), headers={"origin": "https://app.test"}) as r:
                assert r.headers["access-control-expose-headers"] == "x-trace"
            async with s.get(proxy.url("/x"), headers={"origin": "https://evil.test"}) as r:
                assert "access-control-allow-origin" not in r.headers
            # compressor: the client's preference among br and gzip; streamed bodies too
            async with s.get(proxy.url("/text"), headers={"accept-encoding": "gzip, br;q=0.5"}) as r:
                assert r.headers["content-encoding"] == "gzip"
                assert gzip.decompress(await r.read()) == BIG
            async with s.get(proxy.url("/text"), headers={"accept-encoding": "br"}) as r:
                assert r.headers["content-encoding"] == "br" and r.headers["vary"] == "Accept-Encoding"
                assert brotli.decompress(await r.read()) == BIG
            async with s.get(proxy.url("/stream"), headers={"accept-encoding": "gzip"}) as r:
                assert r.headers["content-encoding"] == "gzip"
                assert gzip.decompress(await r.read()) == BIG * 4
            async with s.get(proxy.url("/text")) as r:
                assert "content-encoding" not in r.headers and await r.read() == BIG
            # buffer: 413 past the limit, the per-route limit and disable
            async with s.post(proxy.url("/up"), data=b"x" * 1000) as r:
                assert r.status == 200 and (await r.json())["len"] == 1000
            async with s.post(proxy.url("/up"), data=b"x" * 1001) as r:
                assert (r.status, await r.read()) == (413, b"Payload Too Large")
            async with s.post(proxy.url("/upload-big"), data=b"x" * 4000) as r:
                assert r.status == 200
            async with s.post(proxy.url("/stream-up"), data=b"x" * 4000) as r:
                assert r.status == 200


async def test_buffered_chunked_upload_goes_upstream_with_a_length():
    async with Upstream(app) as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            filters=[{"buffer": {"max_request_bytes": 100}}],
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as proxy:
            raw = await raw_request(proxy.port(), b"POST /x HTTP/1.1\r\nHost: a\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
            assert body["len"] == 5 and body["headers"]["Content-Length"] == "5"
            assert "Transfer-Encoding" not in body["headers"]
