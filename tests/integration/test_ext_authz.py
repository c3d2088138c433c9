"""ext_authz through real traffic, against real authorization servers run by the test: an HTTP
one (aiohttp, reached through the ``authz`` cluster) and a gRPC one (grpcio serving
``envoy.service.auth.v3.Authorization/Check``), in both config formats."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy_data_plane.envoy.config.core.v3 import HeaderValue, HeaderValueOption
from envoy_data_plane.envoy.service.auth.v3 import (
    CheckRequest,
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Struct
from envoy_data_plane.google.rpc import Status

from sidecar.testing import Upstream, free_port, native_config, running_proxy

T_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
T_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


class HttpAuthz:
    """Allows requests with ``x-allow: yes``; denies others with 401, a body and headers;
    ``/slow`` answers after a second."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, request.path_qs,
                          {k.lower(): v for k, v in request.headers.items()}, body))
        if request.path.endswith("/slow"):
            await asyncio.sleep(1.0)
        if request.headers.get("x-allow") == "yes":
            return web.Response(status=200, headers={
                "x-auth-user": "alice", "x-auth-extra": "no", "x-auth-tenant": "t1",
                "x-envoy-auth-headers-to-remove": "x-secret", "x-client-note": "seen"})
        return web.Response(status=401, text="go away", headers={
            "www-authenticate": "Bearer", "x-auth-debug": "nope"})


def http_authz_config(**extra) -> dict:
    return {"http_service": {
        "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "0.5s"},
        "path_prefix": "/auth",
        "authorization_request": {"allowed_headers": {"patterns": [{"exact": "x-allow"}]},
                                  "headers_to_add": [{"key": "x-from", "value": "sidecar"}]},
        "authorization_response": {
            "allowed_upstream_headers": {"patterns": [{"exact": "x-auth-user"}]},
            "allowed_upstream_headers_to_append": {"patterns": [{"exact": "x-auth-tenant"}]},
            "allowed_client_headers": {"patterns": [{"exact": "www-authenticate"}]},
            "allowed_client_headers_on_success": {"patterns": [{"exact": "x-client-note"}]},
            "dynamic_metadata_from_headers": {"patterns": [{"exact": "x-auth-user"}]}}},
        **extra}


async def get(s, url, headers=None, method="GET", data=None):
    async with s.request(method, url, headers=headers or {}, data=data) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_http_service_native(tmp_path):
    authz = HttpAuthz()
    async with Upstream() as app, Upstream(authz, name="authz") as az:
        cfg = native_config(
            clusters={"app": [app.address], "authz": [az.address]},
            filters=[{"ext_authz": http_authz_config(with_request_body={"max_request_bytes": 100})}],
            routes=[{"match": {"prefix": "/public"}, "cluster": "app",
                     "filters": {"ext_authz": "disabled"}},
                    {"match": {"prefix": "/"}, "cluster": "app"}])
        async with running_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
            st, h, body = await get(s, proxy.url("/orders?id=1"), {"x-allow": "yes",
                                                                  "x-secret": "s", "x-other": "o",
                                                                  "x-auth-tenant": "t0"})
            assert st == 200 and h["x-client-note"] == "seen"
            up = json.loads(body)["headers"]
            assert up["x-auth-user"] == "alice" and "x-auth-extra" not in up
            assert up["x-auth-tenant"] == "t1" and "x-secret" not in up   # t0 and t1: two lines
            method, path, seen, _ = authz.seen[-1]
            assert (method, path) == ("GET", "/auth/orders?id=1")
            assert seen["x-allow"] == "yes" and seen["x-from"] == "sidecar"
            assert "x-other" not in seen and "x-secret" not in seen
            st, h, body = await get(s, proxy.url("/orders"), {"x-allow": "no"})
            assert (st, body) == (401, b"go away")
            assert h["www-authenticate"] == "Bearer" and "x-auth-debug" not in h
            st, _, _ = await get(s, proxy.url("/orders"), {"x-allow": "yes"}, "POST", b"x" * 50)
            assert st == 200 and authz.seen[-1][3] == b"x" * 50
            st, _, _ = await get(s, proxy.url("/orders"), {"x-allow": "yes"}, "POST", b"x" * 101)
            assert st == 413
            n = len(authz.seen)
            st, _, _ = await get(s, proxy.url("/public/x"))
            assert st == 200 and len(authz.seen) == n          # disabled on this route
            st, _, _ = await get(s, proxy.url("/slow"), {"x-allow": "yes"})
            assert st == 403                                   # timed out: status_on_error
            metric = proxy.app.metrics.registry.get_sample_value
            assert metric("sidecar_ext_authz_total", {"outcome": "denied"}) == 1
            assert metric("sidecar_ext_authz_total", {"outcome": "error"}) == 1
            # the checks went through the authz cluster and were counted there
            assert metric("sidecar_upstream_rq_total", {"cluster": "authz",
                                                        "status_class": "2xx"}) == 2
            assert metric("sidecar_upstream_rq_total", {"cluster": "authz",
                                                        "status_class": "4xx"}) == 1


def envoy_doc(port: int, app: str, authz: str, ext_authz: dict, routes: list[dict]) -> dict:
    def cluster(name: str, address: str) -> dict:
        host, p = address.split(":")
        return {"name": name, "connect_timeout": "0.5s", "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": int(p)}}}}]}]}}

    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "in",
           "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"],
                                                            "routes": routes}]},
           "http_filters": [
               {"name": "envoy.filters.http.ext_authz", "typed_config": {"@type": T_AUTHZ, **ext_authz}},
               {"name": "envoy.filters.http.router", "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{"name": "in", "address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                    "typed_config": hcm}]}]}],
                "clusters": [cluster("app", app), cluster("authz", authz)]}}


@pytest.mark.parametrize("failure_mode_allow", [False, True])
async def test_http_service_envoy_format_and_failure_mode(failure_mode_allow):
    authz = HttpAuthz()
    closed = f"127.0.0.1:{free_port()}"           # nothing listens: connect failure
    async with Upstream() as app, Upstream(authz, name="authz") as az:
        port = free_port()
        routes = [{"match": {"prefix": "/down"}, "route": {"cluster": "app"},
                   "typed_per_filter_config": {"envoy.filters.http.ext_authz": {
                       "@type": T_PER_ROUTE, "check_settings": {"http_service": {
                           "server_uri": {"uri": "http://x", "cluster": "app", "timeout": "0.5s"},
                           "path_override": "/status/503"}}}}},
                  {"match": {"prefix": "/"}, "route": {"cluster": "app"}}]
        doc = envoy_doc(port, app.address, az.address, http_authz_config(
            failure_mode_allow=failure_mode_allow, failure_mode_allow_header_add=True,
            status_on_error={"code": "ServiceUnavailable"}), routes)
        async with running_proxy(doc) as proxy, aiohttp.ClientSession() as s:
            st, _, body = await get(s, proxy.url("/ok"), {"x-allow": "yes"})
            assert st == 200 and json.loads(body)["headers"]["x-auth-user"] == "alice"
            st, _, body = await get(s, proxy.url("/no"))
            assert (st, body) == (401, b"go away")
            n = len(authz.seen)
            st, _, _ = await get(s, proxy.url("/down"))      # per-route service: the app
            assert st == 200 and len(authz.seen) == n
            assert app.requests[-2].path == "/status/503"     # asked with path_override
        doc["static_resources"]["clusters"][1] = envoy_doc(port, app.address, closed, {}, [])[
            "static_resources"]["clusters"][1]
        async with running_proxy(doc) as proxy, aiohttp.ClientSession() as s:
            st, _, body = await get(s, proxy.url("/ok"), {"x-allow": "yes"})
            if failure_mode_allow:
                assert st == 200
                assert json.loads(body)["headers"]["x-envoy-auth-failure-mode-allowed"] == "true"
            else:
                assert st == 503 and body == b""


# ---- gRPC ---------------------------------------------------------------------------------------

class GrpcAuthz:
    """``Authorization/Check`` on a real grpcio server: ``x-allow: yes`` is OK (with header
    changes and dynamic metadata), anything else is denied 401 with a body."""

    def __init__(self) -> None:
        self.seen: list[CheckRequest] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def check(self, request: CheckRequest, context) -> CheckResponse:
        self.seen.append(request)
        http = request.attributes.request.http
        if http.headers.get("x-allow") == "yes":
            return CheckResponse(
                status=Status(code=0),
                ok_response=OkHttpResponse(
                    headers=[HeaderValueOption(header=HeaderValue(key="x-auth-user", value="alice"))],
                    headers_to_remove=["x-secret"],
                    response_headers_to_add=[HeaderValueOption(
                        header=HeaderValue(key="x-client-note", value="grpc"))]),
                dynamic_metadata=Struct.from_dict({"user": "alice"}))
        return CheckResponse(status=Status(code=7), denied_response=DeniedHttpResponse(
            status=HttpStatus(code=StatusCode.Unauthorized), body="denied by grpc",
            headers=[HeaderValueOption(header=HeaderValue(key="x-why", value="no"))]))

    async def start(self) -> "GrpcAuthz":
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self.check, request_deserializer=CheckRequest.parse,
            response_serializer=lambda m: bytes(m))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "envoy.service.auth.v3.Authorization", {"Check": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


def grpc_authz_config(port: int, **extra) -> dict:
    return {"grpc_service": {"google_grpc": {"target_uri": f"127.0.0.1:{port}", "stat_prefix": "az"},
                             "timeout": "1s"}, **extra}


async def test_grpc_service_native_and_envoy():
    az = await GrpcAuthz().start()
    try:
        async with Upstream() as app:
            # a user filter would read the metadata; here a header_to_metadata-free check: the
            # access to ctx.metadata is asserted through the gRPC request's metadata_context
            native = native_config(
                clusters={"app": [app.address]},
                filters=[{"ext_authz": grpc_authz_config(
                    az.port, with_request_body={"max_request_bytes": 1000, "pack_as_bytes": True})}],
                routes=[{"match": {"prefix": "/ext"}, "cluster": "app", "filters": {"ext_authz": {
                    "check_settings": {"context_extensions": {"team": "payments"}}}}},
                        {"match": {"prefix": "/"}, "cluster": "app"}])
            port = free_port()
            envoy = envoy_doc(port, app.address, app.address, grpc_authz_config(az.port), [
                {"match": {"prefix": "/ext"}, "route": {"cluster": "app"},
                 "typed_per_filter_config": {"envoy.filters.http.ext_authz": {
                     "@type": T_PER_ROUTE,
                     "check_settings": {"context_extensions": {"team": "payments"}}}}},
                {"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
            for cfg in (native, envoy):
                async with running_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
                    st, h, body = await get(s, proxy.url("/ext/a?b=1"),
                                            {"x-allow": "yes", "x-secret": "s"}, "POST", b"hello")
                    assert st == 200 and h["x-client-note"] == "grpc"
                    up = json.loads(body)["headers"]
                    assert up["x-auth-user"] == "alice" and "x-secret" not in up
                    http = az.seen[-1].attributes.request.http
                    assert (http.method, http.path, http.headers["x-allow"]) == ("POST", "/ext/a?b=1", "yes")
                    assert az.seen[-1].attributes.context_extensions == {"team": "payments"}
                    assert az.seen[-1].attributes.source.address.socket_address.address == "127.0.0.1"
                    if cfg is native:
                        assert http.raw_body == b"hello" and http.size == 5
                    st, h, body = await get(s, proxy.url("/other"))
                    assert (st, body, h["x-why"]) == (401, b"denied by grpc", "no")
                    assert az.seen[-1].attributes.context_extensions == {}
    finally:
        await az.stop()
    async with Upstream() as app:        # the gRPC server is gone: an error, status_on_error
        cfg = native_config(clusters={"app": [app.address]},
                            filters=[{"ext_authz": grpc_authz_config(az.port)}],
                            routes=[{"match": {"prefix": "/"}, "cluster": "app"}])
        async with running_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
            st, _, _ = await get(s, proxy.url("/"), {"x-allow": "yes"})
            assert st == 403


async def test_grpc_service_through_a_cluster():
    """``envoy_grpc``: the Check call goes through the ``authz`` cluster (HTTP/2), whose
    counters count it; the per-route check settings still reach the service."""
    az = await GrpcAuthz().start()
    service = {"grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "1s",
                                "initial_metadata": [{"key": "x-tenant", "value": "t1"}]}}
    try:
        async with Upstream() as app:
            cfg = native_config(
                clusters={"app": [app.address],
                          "authz": {"endpoints": [f"127.0.0.1:{az.port}"], "protocol": "http2"}},
                filters=[{"ext_authz": service}],
                routes=[{"match": {"prefix": "/ext"}, "cluster": "app", "filters": {"ext_authz": {
                    "check_settings": {"context_extensions": {"team": "payments"}}}}},
                        {"match": {"prefix": "/"}, "cluster": "app"}])
            async with running_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
                st, h, body = await get(s, proxy.url("/ext/a"), {"x-allow": "yes", "x-secret": "s"})
                assert st == 200 and h["x-client-note"] == "grpc"
                up = json.loads(body)["headers"]
                assert up["x-auth-user"] == "alice" and "x-secret" not in up
                assert az.seen[-1].attributes.context_extensions == {"team": "payments"}
                st, h, body = await get(s, proxy.url("/other"))
                assert (st, body, h["x-why"]) == (401, b"denied by grpc", "no")
                async with s.get(proxy.admin_url + "/stats/prometheus") as r:
                    metrics = await r.text()
                assert 'sidecar_upstream_rq_total{cluster="authz",status_class="2xx"} 2.0' \
                    in metrics
    finally:
        await az.stop()
    # an HTTP/1.1 cluster cannot carry gRPC: refused with the field's path
    cfg = native_config(clusters={"app": ["127.0.0.1:1"], "authz": ["127.0.0.1:2"]},
                        filters=[{"ext_authz": service}],
                        routes=[{"match": {"prefix": "/"}, "cluster": "app"}])
    with pytest.raises(Exception, match="envoy_grpc.cluster_name: cluster 'authz' speaks http1"):
        async with running_proxy(cfg):
            pass
