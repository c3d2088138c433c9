"""buffer, cors, compressor, header_to_metadata, ext_authz config: behaviour with a fake next
and every refused field refused by name (traffic through the proxy: tests/integration)."""

from __future__ import annotations

import gzip
import zlib

import pytest
from multidict import MultiDict

from filters import buffer, compressor, cors, ext_authz
from filters import header_to_metadata as h2m
from filters.compressor.libraries import T_GZIP, T_ZSTD
from filters.ext_authz import config as authz_config
from sidecar import sdk
from sidecar.core.body import BodyStream
from sidecar.sdk import ConfigError, Response
from sidecar.testing import FilterTestEnv, RecordingNext, build_filter, make_request

TEXT = b"compress me please " * 50


async def body_of(resp) -> bytes:
    if isinstance(resp.body, bytes):
        return resp.body
    return b"".join([c async for c in resp.body])


# ---- buffer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status", [([b"12345", b"67890"], 200), ([b"12345", b"678901"], 413),
                                         (b"12345678901", 413), (b"", 200)])
async def test_buffer_limit(body, status):
    env = FilterTestEnv()
    f = build_filter(buffer.SPEC, buffer.from_native({"max_request_bytes": 10}, "b"), env=env)
    upstream = RecordingNext()
    resp = await f(make_request("POST", body=body), upstream)
    assert resp.status == status
    if status == 200:
        assert isinstance(upstream.last.body, bytes) and not upstream.last.chunked
    else:
        assert resp.body == b"Payload Too Large" and not upstream.called
        assert env.metric("sidecar_buffer_rq_too_large_total") == 1


def test_buffer_config():
    assert buffer.per_route_from_envoy({"disabled": True}, "p") is None
    assert buffer.per_route_from_envoy({"buffer": {"max_request_bytes": 5}}, "p").max_request_bytes == 5
    with pytest.raises(ConfigError, match="^b.max_request_bytes: is required"):
        buffer.from_envoy({}, "b")
    with pytest.raises(ConfigError, match="^b.max_request_time: unknown"):
        buffer.from_envoy({"max_request_bytes": 1, "max_request_time": "1s"}, "b")


# ---- cors -------------------------------------------------------------------------------------

POLICY = {"allow_origin_string_match": [{"exact": "https://a.test"}, {"suffix": ".b.test"}],
          "allow_methods": "GET, PUT", "allow_headers": "x-a", "expose_headers": "x-e",
          "max_age": "60", "allow_credentials": True}


def cors_filter(route_policy=POLICY, vhost_policy=None, listener=None):
    per_route = cors.policy_from_envoy(route_policy, "r") if route_policy else None
    if vhost_policy:
        vh = cors.policy_from_envoy(vhost_policy, "v")
        per_route = cors.merge(vh, per_route) if per_route else vh
    return build_filter(cors.SPEC, listener, per_route)


async def test_cors_preflight_allowed_origin_is_answered_here():
    upstream = RecordingNext()
    resp = await cors_filter()(make_request("OPTIONS", headers={
        "origin": "https://x.b.test", "access-control-request-method": "PUT"}), upstream)
    assert not upstream.called
    assert dict(resp.headers) == {
        "access-control-allow-origin": "https://x.b.test",
        "access-control-allow-credentials": "true", "access-control-allow-methods": "GET, PUT",
        "access-control-allow-headers": "x-a", "access-control-max-age": "60"}


async def test_cors_preflight_other_origin_goes_upstream_unless_told_otherwise():
    upstream = RecordingNext()
    req = make_request("OPTIONS", headers={"origin": "https://evil.test",
                                           "access-control-request-method": "PUT"})
    assert (await cors_filter()(req, upstream)).status == 200 and upstream.called
    f = cors_filter({**POLICY, "forward_not_matching_preflights": False})
    upstream = RecordingNext()
    resp = await f(req, upstream)
    assert not upstream.called and "access-control-allow-origin" not in resp.headers


async def test_cors_simple_request_headers_only_for_allowed_origins():
    f = cors_filter()
    resp = await f(make_request(headers={"origin": "https://a.test"}), RecordingNext())
    assert resp.headers["access-control-allow-origin"] == "https://a.test"
    assert resp.headers["access-control-expose-headers"] == "x-e"
    resp = await f(make_request(headers={"origin": "https://c.test"}), RecordingNext())
    assert "access-control-allow-origin" not in resp.headers


async def test_cors_route_policy_merges_over_the_virtual_host_field_by_field():
    f = cors_filter({"allow_methods": "DELETE"}, vhost_policy=POLICY)
    resp = await f(make_request("OPTIONS", headers={"origin": "https://a.test",
                                                    "access-control-request-method": "DELETE"}),
                   RecordingNext())
    assert resp.headers["access-control-allow-methods"] == "DELETE"
    assert resp.headers["access-control-allow-headers"] == "x-a"


async def test_cors_disabled_or_shadow():
    f = cors_filter({**POLICY, "filter_enabled": {"default_value": {"numerator": 0}},
                     "shadow_enabled": {"default_value": {"numerator": 100}}})
    resp = await f(make_request(headers={"origin": "https://a.test"}), RecordingNext())
    assert "access-control-allow-origin" not in resp.headers
    assert build_filter(cors.SPEC, None, None) is None       # no policy: nothing to do


def test_cors_config_refusals():
    with pytest.raises(ConfigError, match="^c.filter_enabled.runtime_key: runtime"):
        cors.policy_from_envoy({"filter_enabled": {"default_value": {"numerator": 1},
                                                   "runtime_key": "k"}}, "c")
    with pytest.raises(ConfigError, match="^c.allow_origin: unknown"):
        cors.policy_from_envoy({"allow_origin": ["*"]}, "c")
    with pytest.raises(ConfigError, match="^c.x: unknown"):
        cors.from_envoy({"x": 1}, "c")


# ---- compressor -------------------------------------------------------------------------------

def gzip_cfg(**kw):
    return compressor.SPEC.from_native({"algorithm": "gzip", **kw}, "c")


@pytest.mark.parametrize("headers, accept, compressed", [
    ({"content-type": "text/plain"}, "gzip", True),
    ({"content-type": "text/plain; charset=utf-8"}, "deflate, gzip;q=0.5", True),
    ({"content-type": "text/plain"}, None, False),
    ({"content-type": "text/plain"}, "gzip;q=0", False),
    ({"content-type": "text/plain"}, "identity", False),
    ({"content-type": "text/plain"}, "*", True),
    ({"content-type": "image/png"}, "gzip", False),
    ({"content-type": "text/plain", "content-encoding": "br"}, "gzip", False),
    ({"content-type": "text/plain", "cache-control": "public, no-transform"}, "gzip", False),
    ({"content-type": "text/plain", "content-length": "10"}, "gzip", False),
])
async def test_compressor_rules(headers, accept, compressed):
    f = build_filter(compressor.SPEC, gzip_cfg())
    req = make_request(headers={"accept-encoding": accept} if accept else {})
    resp = await f(req, RecordingNext(headers=headers, body=TEXT))
    assert (resp.headers.get("content-encoding") == "gzip") is compressed
    if compressed:
        assert gzip.decompress(resp.body) == TEXT
        assert resp.headers["vary"] == "Accept-Encoding" and "content-length" not in resp.headers


async def test_compressor_streams_and_flushes_each_chunk():
    f = build_filter(compressor.SPEC, gzip_cfg())
    stream = BodyStream()

    async def upstream(req):
        stream.feed(TEXT)                              # the rest has not arrived yet
        return Response(200, MultiDict({"content-type": "text/plain"}), stream)

    resp = await f(make_request(headers={"accept-encoding": "gzip"}), RecordingNext(handler=upstream))
    d = zlib.decompressobj(16 + 15)
    assert d.decompress(await resp.body.read()) == TEXT   # decodable before the stream ends
    stream.feed(TEXT)
    stream.feed_eof()
    assert d.decompress(await body_of(resp)) == TEXT and d.eof


async def test_compressor_etags_and_small_bodies():
    f = build_filter(compressor.SPEC, gzip_cfg(weaken_etag=True))
    resp = await f(make_request(headers={"accept-encoding": "gzip"}),
                   RecordingNext(headers={"content-type": "text/plain", "etag": '"abc"'}, body=TEXT))
    assert resp.headers["etag"] == 'W/"abc"'
    f = build_filter(compressor.SPEC, gzip_cfg(disable_on_etag=True))
    resp = await f(make_request(headers={"accept-encoding": "gzip"}),
                   RecordingNext(headers={"content-type": "text/plain", "etag": '"abc"'}, body=TEXT))
    assert "content-encoding" not in resp.headers
    f = build_filter(compressor.SPEC, gzip_cfg(min_length=1000))
    resp = await f(make_request(headers={"accept-encoding": "gzip"}),
                   RecordingNext(headers={"content-type": "text/plain"}, body=b"x" * 999))
    assert "content-encoding" not in resp.headers


async def test_compressors_in_a_chain_agree_on_the_clients_choice():
    env = FilterTestEnv()
    g = build_filter(compressor.SPEC, gzip_cfg(), env=env)
    b = build_filter(compressor.SPEC, compressor.SPEC.from_native({"algorithm": "br"}, "c"), env=env)
    upstream = RecordingNext(headers={"content-type": "text/plain"}, body=TEXT)
    for accept, chosen in (("gzip, br;q=0.9", "gzip"), ("gzip;q=0.2, br", "br"),
                           ("br;q=0.5, gzip;q=0.5", "br")):
        resp = await g(make_request(headers={"accept-encoding": accept}),
                       lambda r: b(r, upstream))
        assert resp.headers["content-encoding"] == chosen, accept
    assert env.state_for(compressor.SPEC).chains == {}


def test_compressor_config_refusals():
    lib = {"name": "g", "typed_config": {"@type": T_GZIP}}
    for extra, error in (({"request_direction_config": {}}, "c.request_direction_config: request compression"),
                         ({"response_direction_config": {"status_header_enabled": True}},
                          "c.response_direction_config.status_header_enabled: is not supported"),
                         ({"runtime_enabled": {"default_value": True, "runtime_key": "x"}},
                          "c.runtime_enabled.runtime_key: runtime")):
        with pytest.raises(ConfigError, match="^" + error):
            compressor.SPEC.from_envoy({"compressor_library": lib, **extra}, "c")
    with pytest.raises(ConfigError, match="dictionary: is not supported"):
        compressor.SPEC.from_envoy({"compressor_library": {"name": "z", "typed_config": {
            "@type": T_ZSTD, "dictionary": {"filename": "/x"}}}}, "c")
    with pytest.raises(ConfigError, match="unsupported compressor library"):
        compressor.SPEC.from_envoy({"compressor_library": {"name": "d", "typed_config": {
            "@type": "type.googleapis.com/x.Deflate"}}}, "c")


# ---- header_to_metadata -----------------------------------------------------------------------

async def test_header_to_metadata_rules():
    cfg = h2m.from_envoy({"request_rules": [
        {"header": "x-tenant", "on_header_present": {"metadata_namespace": "t", "key": "tenant"},
         "on_header_missing": {"metadata_namespace": "t", "key": "tenant", "value": "none"},
         "remove": True},
        {"header": "x-version", "on_header_present": {"key": "v", "type": "NUMBER",
                                                      "regex_value_rewrite": {
                                                          "pattern": {"regex": "^v(\\d+)$"},
                                                          "substitution": "\\1"}}},
        {"cookie": "session", "on_header_present": {"key": "s", "encode": "BASE64"}}],
        "response_rules": [{"header": "x-served-by", "on_header_present": {"key": "by"}}]}, "h")
    f = build_filter(h2m.SPEC, cfg)
    upstream = RecordingNext(headers={"x-served-by": "pod-1"})
    req = make_request(headers={"x-tenant": "acme", "x-version": "v2", "cookie": "a=1; session=aGk="})
    await f(req, upstream)
    assert req.ctx.metadata == {"t": {"tenant": "acme"},
                                h2m.DEFAULT_NAMESPACE: {"v": 2.0, "s": "hi", "by": "pod-1"}}
    assert "x-tenant" not in upstream.last.headers
    req = make_request()
    await f(req, upstream)
    assert req.ctx.metadata["t"] == {"tenant": "none"}


def test_header_to_metadata_refusals():
    with pytest.raises(ConfigError, match=r"^h.request_rules\[0\].on_header_present.type: PROTOBUF"):
        h2m.from_envoy({"request_rules": [{"header": "a", "on_header_present": {
            "key": "k", "type": "PROTOBUF_VALUE"}}]}, "h")
    with pytest.raises(ConfigError, match=r"^h.request_rules\[0\].on_header_missing.value: is required"):
        h2m.from_envoy({"request_rules": [{"header": "a", "on_header_missing": {"key": "k"}}]}, "h")
    with pytest.raises(ConfigError, match="^h.stat_prefix: is not supported"):
        h2m.from_envoy({"stat_prefix": "x"}, "h")


# ---- ext_authz config -------------------------------------------------------------------------

HTTP = {"http_service": {"server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "0.5s"}}}


@pytest.mark.parametrize("extra, error", [
    ({"clear_route_cache": True}, "a.clear_route_cache: is not supported"),
    ({"include_peer_certificate": True}, "a.include_peer_certificate: is not supported"),
    ({"route_metadata_context_namespaces": ["x"]}, "a.route_metadata_context_namespaces: is not supported"),
    ({"filter_enabled": {"default_value": {"numerator": 5}, "runtime_key": "k"}},
     "a.filter_enabled.runtime_key: runtime overrides are not supported"),
    ({"transport_api_version": "V2"}, "a.transport_api_version: must be one of AUTO, V3"),
    ({"metadata_context_namespaces": ["x"]}, "a.metadata_context_namespaces: only the gRPC"),
    ({"shadow_mode": True}, "a.shadow_mode: is not supported"),
])
def test_ext_authz_refusals(extra, error):
    with pytest.raises(ConfigError) as e:
        authz_config.from_envoy({**HTTP, **extra}, "a")
    assert str(e.value).startswith(error)


def test_ext_authz_services():
    cfg = authz_config.from_envoy({"grpc_service": {
        "envoy_grpc": {"cluster_name": "c", "authority": "authz.local",
                       "max_receive_message_length": 1000, "skip_envoy_headers": True},
        "timeout": "0.5s", "initial_metadata": [{"key": "X-Tenant", "value": "t1"}]}}, "a")
    assert cfg.grpc.envoy == sdk.EnvoyGrpcService("c", "authz.local", (("x-tenant", "t1"),),
                                                  True, 1000)
    assert cfg.grpc.timeout_s == 0.5
    for bad, error in (
            ({"envoy_grpc": {"cluster_name": "c", "retry_policy": {"num_retries": 1}}},
             "a.grpc_service.envoy_grpc.retry_policy: is not supported"),
            ({"envoy_grpc": {"cluster_name": "c"}, "timeout": "0s"},
             "a.grpc_service.timeout: 0 (no timeout) is not supported"),
            ({"envoy_grpc": {"cluster_name": "c"}, "initial_metadata": [{"key": ":path"}]},
             "a.grpc_service.initial_metadata[0].key: ':path' is set by the gRPC client"),
            ({"envoy_grpc": {"cluster_name": "c", "nope": 1}},
             "a.grpc_service.envoy_grpc.nope: unknown or unsupported field")):
        with pytest.raises(ConfigError) as e:
            authz_config.from_envoy({"grpc_service": bad}, "a")
        assert str(e.value).startswith(error)
    with pytest.raises(ConfigError, match="^a: one of grpc_service, http_service is required"):
        authz_config.from_envoy({}, "a")
    with pytest.raises(ConfigError, match="channel_credentials: is not supported"):
        authz_config.from_envoy({"grpc_service": {"google_grpc": {
            "target_uri": "127.0.0.1:1", "stat_prefix": "s",
            "channel_credentials": {"ssl_credentials": {}}}}}, "a")
    cfg = authz_config.from_envoy({"grpc_service": {"google_grpc": {"target_uri": "127.0.0.1:9",
                                                                    "stat_prefix": "s"}},
                                   "status_on_error": {"code": "ServiceUnavailable"}}, "a")
    assert cfg.grpc.timeout_s == 0.2 and cfg.status_on_error == 503
    assert authz_config.per_route_from_envoy({"disabled": True}, "p") is None
    pr = authz_config.per_route_from_envoy({"check_settings": {"context_extensions": {"k": "v"}}}, "p")
    assert pr.context_extensions == (("k", "v"),)


def test_ext_authz_needs_its_cluster():
    cfg = authz_config.from_envoy(HTTP, "a")
    with pytest.raises(ConfigError, match="no cluster named 'authz'"):
        build_filter(ext_authz.SPEC, cfg)
