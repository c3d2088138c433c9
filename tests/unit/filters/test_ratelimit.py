"""The global rate limit filter without sockets: route ``rate_limits`` parsing (both formats)
and refusals by path, descriptor building (Envoy's action semantics), which policies a route
uses (per-route, filter, route, virtual host, stage), the filter's config and refusals, and
its answers against an in-process stand-in for the service (the real service over gRPC is in
tests/integration/test_ratelimit_service.py and the Envoy comparison in
tests/conformance/envoy/test_ratelimit_envoy.py)."""

from __future__ import annotations

import pytest
import yaml

from control_plane_client.translate.route import route_configuration
from filters import CATALOG
from filters import ratelimit as RL
from filters.ratelimit.config import (
    HeaderAction,
    RequestType,
    VhRateLimits,
    from_envoy,
    from_native,
    per_route_from_envoy,
)
from filters.ratelimit.filter import RateLimitFilter, RequestSource, policies_for
from sidecar.config.errors import ConfigError
from sidecar.config.native.route import virtual_host_from_native
from sidecar.config.ratelimit import rate_limits_from_wire
from sidecar.core.grpc import EnvoyGrpcService
from sidecar.core.limits import (
    DestinationClusterAction,
    GenericKeyAction,
    HeaderValueMatchAction,
    JwtClaimAction,
    RateLimitPolicy,
    RemoteAddressAction,
    RequestHeadersAction,
    RlsCode,
    RlsDescriptorStatus,
    RlsLimit,
    RlsResponse,
    RlsUnit,
    RouteRateLimits,
    SourceClusterAction,
    descriptor_for,
    x_ratelimit_headers,
)
from sidecar.shared.health import Unavailable
from sidecar.testing import FakeRoute, FilterTestEnv, make_request
from tests.jwt_helpers import Next

SERVICE = {"transport_api_version": "V3",
           "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}}}

# ---- rate_limits ---------------------------------------------------------------------------

POLICIES = yaml.safe_load("""
- actions:
  - request_headers: {header_name: X-User, descriptor_key: user, skip_if_absent: true}
  - remote_address: {}
  - generic_key: {descriptor_value: api}
- stage: 2
  disable_key: no-runtime-here
  actions:
  - destination_cluster: {}
  - request_headers: {header_name: x-tenant, descriptor_key: tenant}
- actions:
  - header_value_match:
      descriptor_value: beta
      expect_match: false
      headers: [{name: x-beta, present_match: true}]
  - source_cluster: {}
""")


def test_rate_limits_parse():
    a, b, c = rate_limits_from_wire(POLICIES, "r")
    assert a == RateLimitPolicy((RequestHeadersAction("x-user", "user", True),
                                 RemoteAddressAction(), GenericKeyAction("api")))
    assert b == RateLimitPolicy((DestinationClusterAction(),
                                 RequestHeadersAction("x-tenant", "tenant")), stage=2)
    hv = c.actions[0]
    assert isinstance(hv, HeaderValueMatchAction)
    assert (hv.descriptor_key, hv.descriptor_value, hv.expect_match) == \
        ("header_match", "beta", False)
    assert c.actions[1] == SourceClusterAction()


@pytest.mark.parametrize("item,path", [
    ({"actions": [{"query_parameters": {}}]}, "r[0].actions[0].query_parameters"),
    ({"actions": [{"metadata": {"descriptor_key": "k", "metadata_key": {
        "key": "envoy.lb", "path": [{"key": "a"}, {"key": "b"}]}}}]},
     "r[0].actions[0].metadata.metadata_key.key"),
    ({"actions": [{"dynamic_metadata": {}}]}, "r[0].actions[0].dynamic_metadata"),
    ({"actions": [{"masked_remote_address": {}}]}, "r[0].actions[0].masked_remote_address"),
    ({"actions": [{"extension": {}}]}, "r[0].actions[0].extension"),
    ({"actions": [{"remote_address_match": {}}]}, "r[0].actions[0].remote_address_match"),
    ({"actions": []}, "r[0].actions"),
    ({"actions": [{"generic_key": {}}]}, "r[0].actions[0].generic_key.descriptor_value"),
    ({"actions": [{"generic_key": {"descriptor_value": "x", "default_value": "y"}}]},
     "r[0].actions[0].generic_key.default_value"),
    ({"actions": [{"header_value_match": {"descriptor_value": "x"}}]},
     "r[0].actions[0].header_value_match.headers"),
    ({"actions": [{"header_value_match": {"descriptor_value": "x", "headers": []}}]},
     "r[0].actions[0].header_value_match.headers"),
    ({"actions": [{"remote_address": {"x": 1}}]}, "r[0].actions[0].remote_address.x"),
    ({"actions": [{"remote_address": {}}], "limit": {}}, "r[0].limit"),
    ({"actions": [{"remote_address": {}}], "hits_addend": {"number": 2}}, "r[0].hits_addend"),
    ({"actions": [{"remote_address": {}}], "apply_on_stream_done": True},
     "r[0].apply_on_stream_done"),
    ({"actions": [{"remote_address": {}}], "x_ratelimit_option": "OFF"},
     "r[0].x_ratelimit_option"),
    ({"actions": [{"remote_address": {}}], "stage": 11}, "r[0].stage"),
    ({"actions": [{"remote_address": {}, "generic_key": {"descriptor_value": "x"}}]},
     "r[0].actions[0]"),
    ({"actions": [{"remote_address": {}}], "colour": 1}, "r[0].colour"),
])
def test_rate_limits_refusals(item, path):
    with pytest.raises(ConfigError) as e:
        rate_limits_from_wire([item], "r")
    assert e.value.path == path


def test_filter_level_rate_limits_refuse_stage_and_disable_key():
    for k, v in (("stage", 1), ("disable_key", "k")):
        with pytest.raises(ConfigError) as e:
            rate_limits_from_wire([{"actions": [{"remote_address": {}}], k: v}], "f.rate_limits",
                                  in_filter=True)
        assert e.value.path == f"f.rate_limits[0].{k}"


def test_envoy_route_and_virtual_host_rate_limits():
    rc = route_configuration({"virtual_hosts": [{
        "name": "vh", "domains": ["*"],
        "rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "vh"}}]}],
        "routes": [{"match": {"prefix": "/"}, "route": {
            "cluster": "svc", "include_vh_rate_limits": True,
            "rate_limits": [{"actions": [{"remote_address": {}}]}]}}]}]}, "rc")
    vh = rc.virtual_hosts[0]
    assert vh.rate_limits == (RateLimitPolicy((GenericKeyAction("vh"),)),)
    action = vh.routes[0].action
    assert action.rate_limits == (RateLimitPolicy((RemoteAddressAction(),)),)
    assert action.include_vh_rate_limits
    with pytest.raises(ConfigError) as e:
        route_configuration({"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {
                "cluster": "svc", "rate_limits": [{"actions": [{"query_parameters": {}}]}]}}]}]},
            "rc")
    assert e.value.path == \
        "rc.virtual_hosts[0].routes[0].route.rate_limits[0].actions[0].query_parameters"


def test_native_route_rate_limits():
    vh = virtual_host_from_native({
        "rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "vh"}}]}],
        "routes": [{"match": {"prefix": "/"}, "cluster": "svc", "include_vh_rate_limits": True,
                    "rate_limits": [{"actions": [{"remote_address": {}}]}]}]},
        "vh", CATALOG)
    assert vh.routes[0].action.rate_limits == (RateLimitPolicy((RemoteAddressAction(),)),)
    assert vh.rate_limits == (RateLimitPolicy((GenericKeyAction("vh"),)),)
    with pytest.raises(ConfigError) as e:
        virtual_host_from_native({"routes": [{"direct_response": {"status": 200},
                                              "rate_limits": []}]}, "vh", CATALOG)
    assert e.value.path == "vh.routes[0].rate_limits"


# ---- descriptors -----------------------------------------------------------------------------

def source(headers=None, ip="10.0.0.9", path="/api", query="", cluster="svc", local="front"):
    req = make_request(path=path, query=query, headers=headers, remote_ip=ip)
    return RequestSource(req, cluster, local)


def test_descriptors_follow_envoys_action_semantics():
    a, b, c = rate_limits_from_wire(POLICIES, "r")
    full = source({"x-user": "ann", "x-tenant": "t1"})
    assert descriptor_for(a, full) == (("user", "ann"), ("remote_address", "10.0.0.9"),
                                       ("generic_key", "api"))
    assert descriptor_for(b, full) == (("destination_cluster", "svc"), ("tenant", "t1"))
    # expect_match false: the entry when x-beta is absent
    assert descriptor_for(c, full) == (("header_match", "beta"), ("source_cluster", "front"))
    assert descriptor_for(c, source({"x-beta": "1"})) is None
    bare = source({})
    # skip_if_absent drops the entry only; a missing header without it drops the descriptor
    assert descriptor_for(a, bare) == (("remote_address", "10.0.0.9"), ("generic_key", "api"))
    assert descriptor_for(b, bare) is None
    only_user = RateLimitPolicy((RequestHeadersAction("x-user", "user", True),))
    assert descriptor_for(only_user, bare) is None           # no entries: no descriptor


def test_jwt_claim_descriptor():
    (p,) = rate_limits_from_wire([{"actions": [{"metadata": {
        "descriptor_key": "sub", "default_value": "anonymous", "metadata_key": {
            "key": "envoy.filters.http.jwt_authn", "path": [{"key": "idp"}, {"key": "sub"}]}}}]}],
        "r")
    assert p.actions == (JwtClaimAction("sub", "idp", ("sub",), "anonymous"),)
    src = source()
    src.req.ctx.jwt_payloads["idp"] = {"sub": "ann"}
    assert descriptor_for(p, src) == (("sub", "ann"),)
    assert descriptor_for(p, source()) == (("sub", "anonymous"),)     # no JWT: the default


def test_request_headers_reads_pseudo_headers_and_the_first_value():
    src = source([("x-user", "ann"), ("x-user", "bob")], path="/p", query="a=1")
    assert src.header("x-user") == "ann"                     # Envoy: the first value
    assert src.joined_header("x-user") == "ann,bob"          # header matchers: all of them
    assert src.header(":path") == "/p?a=1"
    assert src.header(":method") == "GET"
    assert src.header(":authority") == "example.com"


# ---- which policies a route uses ---------------------------------------------------------------

P_ROUTE = RateLimitPolicy((GenericKeyAction("route"),))
P_ROUTE2 = RateLimitPolicy((GenericKeyAction("route-stage-1"),), stage=1)
P_VH = RateLimitPolicy((GenericKeyAction("vh"),))
P_FILTER = RateLimitPolicy((GenericKeyAction("filter"),))
P_PER_ROUTE = RateLimitPolicy((GenericKeyAction("per-route"),))


def cfg(**kw):
    return from_envoy({"domain": "d", "rate_limit_service": SERVICE, **kw}, "f")


@pytest.mark.parametrize("route_rl,vh_rl,include,per_route,filter_kw,want", [
    ((P_ROUTE,), (P_VH,), False, None, {}, (P_ROUTE,)),                # override: the route's
    ((), (P_VH,), False, None, {}, (P_VH,)),                          # none: the vhost's
    ((P_ROUTE,), (P_VH,), True, None, {}, (P_ROUTE, P_VH)),            # include_vh_rate_limits
    ((P_ROUTE,), (P_VH,), False, "INCLUDE", {}, (P_ROUTE, P_VH)),
    ((), (P_VH,), False, "IGNORE", {}, ()),
    ((P_ROUTE, P_ROUTE2), (P_VH,), False, None, {"stage": 1}, (P_ROUTE2,)),
    # the route has rate limits (of another stage): no virtual host ones under override
    ((P_ROUTE2,), (P_VH,), False, None, {}, ()),
    ((P_ROUTE,), (P_VH,), True, None,
     {"rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "filter"}}]}]},
     (P_FILTER,)),
    ((P_ROUTE,), (P_VH,), True, "per-route",
     {"rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "filter"}}]}]},
     (P_PER_ROUTE,)),
])
def test_policy_precedence(route_rl, vh_rl, include, per_route, filter_kw, want):
    route = FakeRoute(rate_limits=RouteRateLimits(route_rl, vh_rl, include))
    pr = None
    if per_route == "per-route":
        pr = per_route_from_envoy({"rate_limits": [
            {"actions": [{"generic_key": {"descriptor_value": "per-route"}}]}]}, "pr")
    elif per_route is not None:
        pr = per_route_from_envoy({"vh_rate_limits": per_route}, "pr")
    assert policies_for(cfg(**filter_kw), pr, route) == want


# ---- the filter's config -------------------------------------------------------------------

FILTER = yaml.safe_load("""
domain: edge
stage: 3
request_type: external
timeout: 0.05s
failure_mode_deny: true
failure_mode_deny_percent: {default_value: {numerator: 25}}
enable_x_ratelimit_headers: DRAFT_VERSION_03
disable_x_envoy_ratelimited_header: true
rate_limited_status: {code: 503}
status_on_error: {code: 502}
rate_limited_as_resource_exhausted: true
response_headers_to_add:
- header: {key: X-Limited, value: "yes"}
- header: {key: x-once, value: "1"}
  append_action: ADD_IF_ABSENT
filter_enabled: {default_value: {numerator: 50}, runtime_key: k}
filter_enforced: {default_value: {numerator: 5000, denominator: TEN_THOUSAND}}
metadata_namespace: ns
stat_prefix: front
rate_limit_service:
  transport_api_version: V3
  grpc_service: {envoy_grpc: {cluster_name: ratelimit}}
""")


def test_filter_config():
    c = from_envoy(FILTER, "f")
    assert (c.domain, c.service_cluster, c.service_path, c.stage, c.request_type) == \
        ("edge", "ratelimit", "f.rate_limit_service.grpc_service.envoy_grpc.cluster_name", 3,
         RequestType.EXTERNAL)
    assert (c.timeout_s, c.failure_mode_deny, c.failure_mode_deny_pct) == (0.05, True, 25.0)
    assert (c.x_ratelimit_headers, c.x_envoy_ratelimited, c.rate_limited_status,
            c.status_on_error, c.resource_exhausted) == (True, False, 503, 502, True)
    assert [(h.name, h.value, h.action) for h in c.response_headers] == [
        ("x-limited", "yes", HeaderAction.APPEND_IF_EXISTS_OR_ADD),
        ("x-once", "1", HeaderAction.ADD_IF_ABSENT)]
    assert (c.enabled_pct, c.enforced_pct, c.metadata_namespace, c.stat_prefix) == \
        (50.0, 50.0, "ns", "front")
    d = cfg()
    assert (d.timeout_s, d.failure_mode_deny, d.x_envoy_ratelimited, d.rate_limited_status,
            d.enabled_pct, d.metadata_namespace) == \
        (0.020, False, True, 429, 100.0, "envoy.filters.http.ratelimit")
    # Envoy: a rate limited status under 400 means 429
    assert cfg(rate_limited_status={"code": 200}).rate_limited_status == 429
    s = from_envoy({**FILTER, "rate_limit_service": {"grpc_service": {
        "envoy_grpc": {"cluster_name": "rls", "authority": "rls.local",
                       "skip_envoy_headers": True, "max_receive_message_length": 4096},
        "initial_metadata": [{"key": "x-tenant", "value": "a"}]}}}, "f")
    assert s.service == EnvoyGrpcService("rls", "rls.local", (("x-tenant", "a"),), True, 4096)
    n = from_native({"domain": "edge", "cluster": "rls"}, "ratelimit")
    assert (n.service_cluster, n.x_ratelimit_headers, n.service_path) == \
        ("rls", True, "ratelimit.cluster")
    p = per_route_from_envoy({"vh_rate_limits": "INCLUDE", "domain": "other"}, "pr")
    assert (p.vh_rate_limits, p.domain) == (VhRateLimits.INCLUDE, "other")


@pytest.mark.parametrize("patch,path", [
    ({"timeout": "0s"}, "f.timeout"),
    ({"stage": 11}, "f.stage"),
    ({"request_type": "sometimes"}, "f.request_type"),
    ({"rate_limit_service": {"grpc_service": {"google_grpc": {"target_uri": "x"}}}},
     "f.rate_limit_service.grpc_service.google_grpc"),
    ({"rate_limit_service": {"grpc_service": {"envoy_grpc": {"cluster_name": "x"},
                                              "timeout": "1s"}}},
     "f.rate_limit_service.grpc_service.timeout"),
    ({"rate_limit_service": {"grpc_service": {"envoy_grpc": {"cluster_name": "x",
                                                             "retry_policy": {}}}}},
     "f.rate_limit_service.grpc_service.envoy_grpc.retry_policy"),
    ({"rate_limit_service": {"grpc_service": {"envoy_grpc": {"cluster_name": "x"},
                                              "retry_policy": {}}}},
     "f.rate_limit_service.grpc_service.retry_policy"),
    ({"rate_limit_service": {"grpc_service": {"envoy_grpc": {"cluster_name": "x"},
                                              "initial_metadata": [{"key": "te"}]}}},
     "f.rate_limit_service.grpc_service.initial_metadata[0].key"),
    ({"rate_limit_service": {"transport_api_version": "V2", "grpc_service": {}}},
     "f.rate_limit_service.transport_api_version"),
    ({"rate_limit_service": None}, "f.rate_limit_service"),
    ({"enable_x_ratelimit_headers": "ON"}, "f.enable_x_ratelimit_headers"),
    ({"response_headers_to_add": [{"header": {"key": "x", "value": "%REQ(x)%"}}]},
     "f.response_headers_to_add[0].header.value"),
    ({"rate_limits": [{"actions": [{"remote_address": {}}], "stage": 1}]},
     "f.rate_limits[0].stage"),
    ({"bogus": 1}, "f.bogus"),
])
def test_filter_config_refusals(patch, path):
    with pytest.raises(ConfigError) as e:
        from_envoy({**FILTER, **patch}, "f")
    assert e.value.path == path


def test_per_route_refusals():
    with pytest.raises(ConfigError) as e:
        per_route_from_envoy({"override_option": "INCLUDE_POLICY"}, "pr")
    assert e.value.path == "pr.override_option"
    with pytest.raises(ConfigError) as e:
        per_route_from_envoy({"vh_rate_limits": "SOMETIMES"}, "pr")
    assert e.value.path == "pr.vh_rate_limits"


def test_service_cluster_must_speak_http2_but_may_not_exist_yet():
    route = FakeRoute(rate_limits=RouteRateLimits((P_ROUTE,)))
    env = FilterTestEnv(clusters={"ratelimit": ["127.0.0.1:1"]})        # HTTP/1.1
    with pytest.raises(ConfigError) as e:
        RL.SPEC.build(cfg(), None, None, env, route)
    assert e.value.path == "f.rate_limit_service.grpc_service.envoy_grpc.cluster_name"
    assert "needs an HTTP/2 cluster" in str(e.value)
    env.close()
    # Envoy accepts a cluster it does not know (every call is then an error): so does the filter
    assert RL.SPEC.build(cfg(), None, None, FilterTestEnv(), route) is not None
    env = FilterTestEnv(clusters={"ratelimit": {"endpoints": ["127.0.0.1:1"],
                                                "protocol": "http2"}})
    assert RL.SPEC.build(cfg(), None, None, env, route) is not None
    env.close()
    # a route with nothing to ask about gets no filter at all
    assert RL.SPEC.build(cfg(), None, None, FilterTestEnv(), FakeRoute()) is None


# ---- the filter's answers (the service stood in by an object: no network here) ---------------

class Service:
    def __init__(self, answer=None, error=None):
        self.answer, self.error = answer, error
        self.calls: list[tuple] = []
        self.failure_modes: list[bool] = []

    async def should_rate_limit(self, domain, descriptors, hits_addend, timeout_s):
        self.calls.append((domain, descriptors, timeout_s))
        if self.error is not None:
            raise self.error
        return self.answer

    def count_failure_mode(self, denied):
        self.failure_modes.append(denied)


def answer(code=RlsCode.OK, remaining=4, **kw):
    return RlsResponse(code, (RlsDescriptorStatus(code, RlsLimit(10, RlsUnit.MINUTE, "n"),
                                                  remaining, 42),), **kw)


def make(service, route=None, env=None, **kw):
    env = env or FilterTestEnv()
    route = route or FakeRoute(rate_limits=RouteRateLimits((RateLimitPolicy(
        (RequestHeadersAction("x-user", "user"),)),)))
    c = cfg(**kw)
    return RateLimitFilter(c, "d", policies_for(c, None, route), service, route, "", env.metrics)


async def test_ok_passes_with_the_services_headers():
    svc = Service(answer(response_headers_to_add=(("x-rls", "1"),),
                         request_headers_to_add=(("x-checked", "yes"),),
                         dynamic_metadata={"tier": "gold"}))
    f, n = make(svc, enable_x_ratelimit_headers="DRAFT_VERSION_03"), Next()
    req = make_request(headers={"x-user": "ann"})
    resp = await f(req, n)
    assert resp.status == 200 and n.calls[0].headers["x-checked"] == "yes"
    assert svc.calls == [("d", ((("user", "ann"),),), 0.020)]
    assert resp.headers["x-rls"] == "1" and resp.headers["x-ratelimit-remaining"] == "4"
    assert resp.headers["x-ratelimit-limit"] == '10, 10;w=60;name="n"'
    assert resp.headers["x-ratelimit-reset"] == "42"
    assert req.ctx.metadata["envoy.filters.http.ratelimit"] == {"tier": "gold"}
    # no descriptor (no x-user): no call at all
    assert (await f(make_request(), n)).status == 200 and len(svc.calls) == 1


async def test_over_limit_answers_429_as_envoy():
    svc = Service(answer(RlsCode.OVER_LIMIT, 0, raw_body=b"slow down",
                         response_headers_to_add=(("x-rls", "1"),)))
    f, n = make(svc, response_headers_to_add=[{"header": {"key": "x-limited", "value": "y"}}]), \
        Next()
    req = make_request(headers={"x-user": "ann"})
    resp = await f(req, n)
    assert not n.called
    assert (resp.status, resp.body) == (429, b"slow down")
    assert resp.headers["x-envoy-ratelimited"] == "true" and resp.headers["x-rls"] == "1"
    assert resp.headers["x-limited"] == "y" and "x-ratelimit-limit" not in resp.headers
    assert req.ctx.flags == ["RL"] and req.ctx.response_code_details == "request_rate_limited"
    # no body: no content type (Envoy's local reply)
    svc.answer = answer(RlsCode.OVER_LIMIT, 0)
    resp = await f(make_request(headers={"x-user": "ann"}), n)
    assert resp.body == b"" and "content-type" not in resp.headers


async def test_over_limit_not_enforced_passes_with_the_header():
    svc = Service(answer(RlsCode.OVER_LIMIT, 0))
    f, n = make(svc, filter_enforced={"default_value": {"numerator": 0}}), Next()
    resp = await f(make_request(headers={"x-user": "ann"}), n)
    assert resp.status == 200 and n.called
    assert resp.headers["x-envoy-ratelimited"] == "true"


async def test_grpc_request_gets_resource_exhausted_when_asked():
    svc = Service(answer(RlsCode.OVER_LIMIT, 0))
    f = make(svc, rate_limited_as_resource_exhausted=True)
    resp = await f(make_request(headers={"x-user": "a", "content-type": "application/grpc"}),
                   Next())
    assert (resp.status, resp.headers["grpc-status"]) == (200, "8")
    # a plain HTTP request still gets 429
    assert (await f(make_request(headers={"x-user": "a"}), Next())).status == 429


@pytest.mark.parametrize("kw,status,denied", [
    ({}, 200, False),
    ({"failure_mode_deny": True}, 500, True),
    ({"failure_mode_deny": True, "status_on_error": {"code": 503}}, 503, True),
    ({"failure_mode_deny": False,
      "failure_mode_deny_percent": {"default_value": {"numerator": 100}}}, 500, True),
    ({"failure_mode_deny": True,
      "failure_mode_deny_percent": {"default_value": {"numerator": 0}}}, 200, False),
])
async def test_service_errors(kw, status, denied):
    env = FilterTestEnv()
    svc = Service(error=Unavailable("down"))
    f = make(svc, env=env, **kw)
    req = make_request(headers={"x-user": "ann"})
    resp = await f(req, Next())
    assert resp.status == status and svc.failure_modes == [denied]
    if denied:
        assert req.ctx.flags == ["RLSE"] and resp.body == b""
        assert req.ctx.response_code_details == "rate_limiter_error"
    labels = {"cluster": "svc", "stat_prefix": ""}
    assert env.metric("sidecar_ratelimit_total", outcome="error", **labels) == 1
    assert env.metric("sidecar_ratelimit_total", outcome="failure_mode_allowed",
                      **labels) == (0 if denied else 1)


async def test_request_type_and_direct_responses():
    svc = Service(answer())
    internal = make_request(headers={"x-user": "a", "x-envoy-internal": "true"})
    f = make(svc, request_type="external")
    await f(internal, Next())
    assert svc.calls == []
    await f(make_request(headers={"x-user": "a"}), Next())
    assert len(svc.calls) == 1
    # a route that answers itself (no cluster): no call, as Envoy (no route entry)
    f = make(svc, route=FakeRoute(clusters=(), rate_limits=RouteRateLimits((RateLimitPolicy(
        (GenericKeyAction("x"),)),))))
    await f(make_request(), Next())
    assert len(svc.calls) == 1


def test_x_ratelimit_headers_from_least_remaining():
    resp = RlsResponse(RlsCode.OK, (
        RlsDescriptorStatus(RlsCode.OK, RlsLimit(100, RlsUnit.MINUTE), 40, 30),
        RlsDescriptorStatus(RlsCode.OK, None, 0, None),
        RlsDescriptorStatus(RlsCode.OK, RlsLimit(10, RlsUnit.SECOND, "per-ip"), 3, 1),
    ))
    assert dict(x_ratelimit_headers(resp)) == {
        "x-ratelimit-limit": '10, 100;w=60, 10;w=1;name="per-ip"',
        "x-ratelimit-remaining": "3", "x-ratelimit-reset": "1"}
    assert x_ratelimit_headers(RlsResponse(RlsCode.OK, ())) == ()
