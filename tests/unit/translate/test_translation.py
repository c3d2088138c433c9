"""Envoy fields the translator honours reach the config model with their values (the field
coverage table, ``control_plane_client.translate.coverage``, names these tests for fields whose
behaviour is not already asserted end to end elsewhere)."""

from __future__ import annotations

import base64
import copy
import json

from multidict import MultiDict

from control_plane_client.translate.bootstrap import bootstrap
from sidecar.config.route import Redirect, RouteAction
from sidecar.core.context import RequestContext
from sidecar.core.message import Request, Response
from sidecar.observability.formatter import compile_http
from tests.jwt_helpers import jwks, public_jwk, rsa_key
from tests.unit.translate.probe import CLUSTER_AT, HCM_AT, ROUTE_AT, get, probe_bootstrap, put


def translate(*changes: tuple[str, object]):
    doc = probe_bootstrap()
    for path, value in changes:
        put(doc, path, copy.deepcopy(value))
    return bootstrap(doc)


def test_listener_and_hcm_fields():
    snap = translate(
        ("static_resources.listeners[0].traffic_direction", "INBOUND"),
        (HCM_AT + ".codec_type", "HTTP1"), (HCM_AT + ".server_name", "edge"),
        (HCM_AT + ".max_request_headers_kb", 32), (HCM_AT + ".use_remote_address", True),
        (HCM_AT + ".xff_num_trusted_hops", 2), (HCM_AT + ".generate_request_id", False),
        (HCM_AT + ".preserve_external_request_id", True), (HCM_AT + ".strip_any_host_port", True),
        (HCM_AT + ".http_protocol_options", {"accept_http_10": True}))
    lst = snap.listeners[0]
    assert (lst.direction, lst.server_name, lst.max_request_headers_kb, lst.use_remote_address,
            lst.xff_num_trusted_hops, lst.generate_request_id, lst.preserve_external_request_id,
            lst.strip_host_port, lst.accept_http_10) == (
        "inbound", "edge", 32, True, 2, False, True, "any", True)
    lst = translate((HCM_AT + ".strip_matching_host_port", True)).listeners[0]
    assert lst.strip_host_port == "matching"


def test_route_fields():
    rc_at = HCM_AT + ".route_config"
    vh_at = rc_at + ".virtual_hosts[0]"
    snap = translate(
        (rc_at + ".request_headers_to_remove", ["x-a"]), (rc_at + ".response_headers_to_remove", ["x-b"]),
        (rc_at + ".validate_clusters", True),
        (vh_at + ".request_headers_to_remove", ["x-c"]), (vh_at + ".response_headers_to_remove", ["x-d"]),
        (vh_at + ".include_request_attempt_count", True),
        (ROUTE_AT + ".request_headers_to_remove", ["x-e"]), (ROUTE_AT + ".response_headers_to_remove", ["x-f"]),
        (ROUTE_AT + ".match", {"safe_regex": {"regex": "/r.*"}}),
        (ROUTE_AT + ".route", {"cluster_header": "x-cluster", "host_rewrite_literal": "h.test",
                               "max_stream_duration": {"max_stream_duration": "2s"},
                               "retry_policy": {"retry_on": "5xx", "host_selection_retry_max_attempts": 5}}))
    rc = snap.listeners[0].route_config
    vh = rc.virtual_hosts[0]
    route = vh.routes[0]
    assert (rc.headers.request_remove, rc.headers.response_remove) == (("x-a",), ("x-b",))
    assert (vh.headers.request_remove, vh.headers.response_remove) == (("x-c",), ("x-d",))
    assert vh.include_attempt_count
    assert (route.headers.request_remove, route.headers.response_remove) == (("x-e",), ("x-f",))
    assert route.match.regex is not None and route.match.regex.pattern == "/r.*"
    a = route.action
    assert isinstance(a, RouteAction)
    assert (a.cluster_header, a.host_rewrite, a.max_stream_duration_s) == ("x-cluster", "h.test", 2.0)
    assert a.retry_policy is not None and a.retry_policy.host_selection_retry_max_attempts == 5
    a = translate((ROUTE_AT + ".route.auto_host_rewrite", True)).listeners[0].route_config \
        .virtual_hosts[0].routes[0].action
    assert isinstance(a, RouteAction) and a.auto_host_rewrite
    a = translate((ROUTE_AT + ".route", {
        "weighted_clusters": {"total_weight": 3, "clusters": [
            {"name": "c0", "weight": 3, "request_headers_to_remove": ["x-g"],
             "response_headers_to_remove": ["x-h"]}]},
        "regex_rewrite": {"pattern": {"regex": "^/a"}, "substitution": "/b"}})).listeners[0] \
        .route_config.virtual_hosts[0].routes[0].action
    assert isinstance(a, RouteAction) and a.regex_rewrite is not None
    assert a.regex_rewrite[0].pattern == "^/a" and a.regex_rewrite[1] == "/b"
    (wc,) = a.weighted_clusters
    assert (wc.weight, wc.headers.request_remove, wc.headers.response_remove) == (3, ("x-g",), ("x-h",))
    doc = probe_bootstrap()
    route = get(doc, ROUTE_AT)
    del route["route"]
    route["redirect"] = {"https_redirect": True, "host_redirect": "h", "port_redirect": 8443,
                         "path_redirect": "/p", "strip_query": True, "response_code": "FOUND"}
    r = bootstrap(doc).listeners[0].route_config.virtual_hosts[0].routes[0].action
    assert r == Redirect(scheme="https", host="h", port=8443, path="/p", status=302, strip_query=True)
    route["redirect"] = {"scheme_redirect": "http", "prefix_rewrite": "/q"}
    r = bootstrap(doc).listeners[0].route_config.virtual_hosts[0].routes[0].action
    assert isinstance(r, Redirect) and (r.scheme, r.prefix_rewrite) == ("http", "/q")


def test_cluster_fields():
    snap = translate(
        (CLUSTER_AT + ".lb_policy", "RING_HASH"),
        (CLUSTER_AT + ".ring_hash_lb_config", {"minimum_ring_size": 64, "maximum_ring_size": 128}),
        (CLUSTER_AT + ".common_lb_config", {"healthy_panic_threshold": {"value": 25}}),
        (CLUSTER_AT + ".outlier_detection", {"enforcing_consecutive_5xx": 50,
                                             "enforcing_success_rate": 60,
                                             "enforcing_consecutive_local_origin_failure": 70}),
        (CLUSTER_AT + ".load_assignment.endpoints[0].locality", {"region": "r", "zone": "z",
                                                                 "sub_zone": "s"}),
        (CLUSTER_AT + ".load_assignment.endpoints[0].load_balancing_weight", 3),
        (CLUSTER_AT + ".load_assignment.endpoints[0].lb_endpoints[0].load_balancing_weight", 7),
        (CLUSTER_AT + ".load_assignment.endpoints[0].lb_endpoints[0].health_status", "HEALTHY"))
    c = snap.clusters[0]
    od = c.outlier_detection
    assert (c.lb.policy, c.lb.ring_size, c.lb.panic_threshold) == ("ring_hash", 64, 25.0)
    assert od is not None and (od.enforcing_consecutive_5xx, od.enforcing_success_rate,
                               od.enforcing_consecutive_local_origin_failure) == (50.0, 60.0, 70.0)
    assert [e.weight for e in c.endpoints] == [7]
    # an endpoint EDS marks unhealthy is not used
    c = translate((CLUSTER_AT + ".load_assignment.endpoints[0].lb_endpoints[0].health_status",
                   "UNHEALTHY")).clusters[0]
    assert c.endpoints == ()
    c = translate((CLUSTER_AT + ".lb_policy", "LEAST_REQUEST"),
                  (CLUSTER_AT + ".least_request_lb_config", {"choice_count": 5})).clusters[0]
    assert (c.lb.policy, c.lb.choice_count) == ("least_request", 5)


def test_dynamic_resources_fields():
    snap = translate(("dynamic_resources", {
        "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                       "set_node_on_first_message_only": True,
                       "grpc_services": [{"envoy_grpc": {"cluster_name": "c0"}}]},
        "cds_config": {"ads": {}, "resource_api_version": "V3"}}))
    cp = snap.control_plane
    assert cp is not None and "c0" in repr(cp) and "ads" in repr(cp).lower()


def test_filter_fields():
    f = HCM_AT + ".http_filters"
    keys = json.dumps(jwks(public_jwk(rsa_key("k"), "kid-inline-bytes"))).encode()
    snap = translate(
        (f + "[0].typed_config.providers.q", {"issuer": "iq", "local_jwks": {
            "inline_bytes": base64.b64encode(keys).decode()}}),
        (f + "[0].typed_config.providers.p.from_cookies", ["c0ok"]),
        (f + "[0].typed_config.providers.p.pad_forward_payload_header", True),
        (f + "[0].typed_config.providers.p.forward_payload_header", "x-payload"),
        (f + "[0].typed_config.providers.p.remote_jwks.async_fetch", {"fast_listener": True}),
        (f + "[0].typed_config.providers.p.jwt_cache_config", {"jwt_cache_size": 10,
                                                               "jwt_max_token_size": 1234}),
        (f + "[0].typed_config.rules[0].requires", {"requires_all": {"requirements": [
            {"provider_and_audiences": {"provider_name": "p", "audiences": ["aud1"]}},
            {"requires_any": {"requirements": [{"provider_name": "p"},
                                               {"allow_missing_or_failed": {}}]}}]}}),
        (f + "[1].typed_config.rules_stat_prefix", "rp_"),
        (f + "[1].typed_config.shadow_rules_stat_prefix", "sp_"),
        (f + "[1].typed_config.track_per_rule_stats", True),
        (f + "[1].typed_config.rules.policies.p", {
            "permissions": [{"and_rules": {"rules": [{"destination_port": 8080}, {
                "destination_port_range": {"start": 1, "end": 9}}]}},
                {"or_rules": {"rules": [{"url_path": {"path": {"safe_regex": {"regex": "/x.*"}}}},
                                        {"url_path": {"path": {"contains": "adm",
                                                               "ignore_case": True}}}]}}],
            "principals": [{"and_ids": {"ids": [{"source_ip": {"address_prefix": "10.0.0.0",
                                                               "prefix_len": 8}}]}},
                           {"or_ids": {"ids": [{"direct_remote_ip": {"address_prefix": "10.1.0.0",
                                                                     "prefix_len": 16}},
                                               {"remote_ip": {"address_prefix": "10.2.0.0",
                                                              "prefix_len": 16}},
                                               {"authenticated": {"principal_name": {
                                                   "exact": "spiffe://p"}}}]}}]}),
        (f + "[3].typed_config.disable_downstream_cluster_stats", True),
        (ROUTE_AT + ".typed_per_filter_config", {"envoy.filters.http.fault": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "is_optional": True, "disabled": True}}))
    lst = snap.listeners[0]
    jwt, rbac = repr(lst.http_filters[0].config), repr(lst.http_filters[1].config)
    for text in ("c0ok", "x-payload", "1234", "aud1"):
        assert text in jwt, text
    inline = next(p for p in lst.http_filters[0].config.providers if p.name == "q")
    assert inline.local_digest and inline.remote is None      # keys from inline_bytes
    for text in ("rp_", "sp_"):       # the matchers compile to functions: see test_rbac.py
        assert text in rbac, text
    assert dict(lst.route_config.virtual_hosts[0].routes[0].per_filter)["envoy.filters.http.fault"] is None


def test_access_log_fields():
    stdout = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
    snap = translate((HCM_AT + ".access_log", [
        {"name": "a", "typed_config": {"@type": stdout, "log_format": {
            "text_format": "[%RESPONSE_CODE%] [%REQ(X-NONE)%]", "omit_empty_values": True}}},
        {"name": "b", "typed_config": {"@type": stdout, "log_format": {
            "json_format": {"b": "%RESPONSE_CODE%", "a": "x", "n": {"z": 1, "y": "%PROTOCOL%"}},
            "json_format_options": {"sort_properties": False}}}}]))
    text, js = snap.listeners[0].access_log
    assert (text.path, text.format) == ("/dev/stdout", "envoy")
    req = Request("GET", "/", "", MultiDict(), b"", RequestContext("l", None, 0.0))
    assert compile_http(text.log_format)(req, Response(200), 0.0) == "[200] []"   # omitted: ""
    # keys sorted at every level whatever sort_properties says, as Envoy 1.40 writes them
    assert compile_http(js.log_format)(req, Response(200), 0.0) == \
        '{"a":"x","b":200,"n":{"y":"HTTP/1.1","z":1}}'


