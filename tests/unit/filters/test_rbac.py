"""RBAC: table-driven policy decisions in both config formats, shadow mode, per-route
override, metrics, config errors."""

from __future__ import annotations

import pytest

from filters import rbac as R
from sidecar.config.errors import ConfigError
from sidecar.testing import build_filter
from tests.jwt_helpers import Next, RouteInfo, make_request, metric, runtime


def req(path="/", method="GET", headers=None, claims=None, ip="10.1.2.3", peer=None,
        host="api.example.com", provider="p", query=""):
    r = make_request(path, method=method, headers=headers, client_ip=ip, peer=peer, host=host,
                     query=query)
    if claims is not None:
        r.ctx.jwt_payloads[provider] = claims
    return r


async def decide(cfg, r, rt=None):
    rt = rt or runtime()
    f = build_filter(R.SPEC, cfg, None, rt, RouteInfo())
    n = Next()
    resp = await f(r, n)
    return resp, n, rt


# ---- native table ------------------------------------------------------------------------------

ADMIN = {"claims": {"sub": "alice", "iss": "https://idp", "groups": ["dev", "admin"]}}
DEV = {"claims": {"sub": "bob", "iss": "https://idp", "groups": ["dev"]}}

NATIVE_TABLE = [
    # (name, policies config, request kwargs, allowed)
    ("path prefix + group claim (list) allowed",
     {"action": "ALLOW", "policies": {"admins": {
         "permissions": [{"path": {"prefix": "/admin"}}],
         "principals": [{"claim": {"name": "groups", "value": "admin"}}]}}},
     dict(path="/admin/users", **ADMIN), True),
    ("path prefix + group claim denied for dev",
     {"action": "ALLOW", "policies": {"admins": {
         "permissions": [{"path": {"prefix": "/admin"}}],
         "principals": [{"claim": {"name": "groups", "value": "admin"}}]}}},
     dict(path="/admin/users", **DEV), False),
    ("no token at all -> no claims -> denied",
     {"action": "ALLOW", "policies": {"admins": {
         "permissions": [{"any": True}],
         "principals": [{"claim": {"name": "sub", "value": "alice"}}]}}},
     dict(path="/x"), False),
    ("sub exact", {"policies": {"p": {"permissions": [{"any": True}],
                                      "principals": [{"claim": {"name": "sub", "value": "alice"}}]}}},
     dict(**ADMIN), True),
    ("iss + sub (and)", {"policies": {"p": {"permissions": [{"any": True}], "principals": [
        {"and": [{"claim": {"name": "iss", "value": "https://idp"}},
                 {"claim": {"name": "sub", "value": {"prefix": "b"}}}]}]}}},
     dict(**DEV), True),
    ("claim from a named provider only", {"policies": {"p": {"permissions": [{"any": True}],
        "principals": [{"claim": {"name": "sub", "value": "alice", "provider": "other"}}]}}},
     dict(**ADMIN), False),
    ("nested claim", {"policies": {"p": {"permissions": [{"any": True}],
        "principals": [{"claim": {"name": "org.tier", "value": "gold"}}]}}},
     dict(claims={"org": {"tier": "gold"}}), True),
    ("scope split", {"policies": {"p": {"permissions": [{"any": True}],
        "principals": [{"claim": {"name": "scope", "value": "write", "split": True}}]}}},
     dict(claims={"scope": "read write"}), True),
    ("bool claim", {"policies": {"p": {"permissions": [{"any": True}],
        "principals": [{"claim": {"name": "email_verified", "value": True}}]}}},
     dict(claims={"email_verified": True}), True),
    ("claim present", {"policies": {"p": {"permissions": [{"any": True}],
        "principals": [{"claim": {"name": "tenant", "present": True}}]}}},
     dict(claims={"tenant": "t1"}), True),
    ("method list", {"policies": {"ro": {"permissions": [{"methods": ["GET", "HEAD"]}],
                                         "principals": [{"any": True}]}}},
     dict(method="POST"), False),
    ("method allowed", {"policies": {"ro": {"permissions": [{"methods": ["GET", "HEAD"]}],
                                            "principals": [{"any": True}]}}},
     dict(method="HEAD"), True),
    ("host with port", {"policies": {"h": {"permissions": [{"host": "API.example.com"}],
                                           "principals": [{"any": True}]}}},
     dict(host="api.example.com:8443"), True),
    ("host other", {"policies": {"h": {"permissions": [{"host": "api.example.com"}],
                                       "principals": [{"any": True}]}}},
     dict(host="evil.example.com"), False),
    ("path regex", {"policies": {"r": {"permissions": [{"path": {"regex": "/v[0-9]+/items"}}],
                                       "principals": [{"any": True}]}}},
     dict(path="/v2/items"), True),
    ("path exact ignores query", {"policies": {"r": {"permissions": [{"path": "/health"}],
                                                     "principals": [{"any": True}]}}},
     dict(path="/health", query="verbose=1"), True),
    ("header permission", {"policies": {"r": {"permissions": [{"header": {"name": "x-env", "exact": "prod"}}],
                                              "principals": [{"any": True}]}}},
     dict(headers={"x-env": "prod"}), True),
    ("not permission", {"policies": {"r": {"permissions": [{"not": {"path": {"prefix": "/internal"}}}],
                                           "principals": [{"any": True}]}}},
     dict(path="/internal/x"), False),
    ("or permission", {"policies": {"r": {"permissions": [{"or": [{"path": "/a"}, {"path": "/b"}]}],
                                          "principals": [{"any": True}]}}},
     dict(path="/b"), True),
    ("source cidr", {"policies": {"lan": {"permissions": [{"any": True}],
                                          "principals": [{"source_ip": "10.0.0.0/8"}]}}},
     dict(ip="10.9.9.9"), True),
    ("source cidr outside", {"policies": {"lan": {"permissions": [{"any": True}],
                                                  "principals": [{"source_ip": ["10.0.0.0/8", "192.168.0.0/16"]}]}}},
     dict(ip="172.16.0.1"), False),
    ("ipv6 cidr", {"policies": {"v6": {"permissions": [{"any": True}],
                                       "principals": [{"source_ip": "fd00::/8"}]}}},
     dict(ip="fd00::1"), True),
    ("ipv4-mapped ipv6 client", {"policies": {"lan": {"permissions": [{"any": True}],
                                                      "principals": [{"source_ip": "10.0.0.0/8"}]}}},
     dict(ip="::ffff:10.0.0.7"), True),
    ("peer identity", {"policies": {"m": {"permissions": [{"any": True}],
                                          "principals": [{"peer": "spiffe://cluster/ns/a/sa/web"}]}}},
     dict(peer="spiffe://cluster/ns/a/sa/web"), True),
    ("peer identity missing (no mTLS)", {"policies": {"m": {"permissions": [{"any": True}],
                                                            "principals": [{"peer": True}]}}},
     dict(), False),
    ("request header principal", {"policies": {"k": {"permissions": [{"any": True}],
                                                     "principals": [{"header": {"name": "x-api-key", "present": True}}]}}},
     dict(headers={"x-api-key": "k"}), True),
    ("not principal", {"policies": {"k": {"permissions": [{"any": True}],
                                          "principals": [{"not": {"claim": {"name": "groups", "value": "banned"}}}]}}},
     dict(claims={"groups": ["banned"]}), False),
    ("DENY matching", {"action": "DENY", "policies": {"block": {"permissions": [{"path": {"prefix": "/admin"}}],
                                                              "principals": [{"any": True}]}}},
     dict(path="/admin"), False),
    ("DENY not matching", {"action": "DENY", "policies": {"block": {"permissions": [{"path": {"prefix": "/admin"}}],
                                                                  "principals": [{"any": True}]}}},
     dict(path="/public"), True),
    ("ALLOW without policies denies all", {"action": "ALLOW", "policies": {}}, dict(), False),
    ("DENY without policies allows all", {"action": "DENY", "policies": {}}, dict(), True),
    ("LOG never denies", {"action": "LOG", "policies": {"l": {"permissions": [{"any": True}],
                                                            "principals": [{"any": True}]}}},
     dict(), True),
    ("any of several principals", {"policies": {"p": {"permissions": [{"any": True}],
        "principals": [{"source_ip": "192.168.0.0/16"}, {"claim": {"name": "sub", "value": "bob"}}]}}},
     dict(**DEV), True),
]


@pytest.mark.parametrize("name,cfg,rq,allowed", NATIVE_TABLE, ids=[t[0] for t in NATIVE_TABLE])
async def test_native_table(name, cfg, rq, allowed):
    r = req(**rq)
    resp, n, rt = await decide(R.SPEC.from_native(cfg, "rbac"), r)
    assert n.called == allowed
    if allowed:
        assert resp.status == 200
    else:
        assert resp.status == 403 and resp.body == b"RBAC: access denied"
        assert r.ctx.response_code_details.startswith("rbac_access_denied_matched_policy[")
        assert r.ctx.flags == ["RBAC"]     # local flag (Envoy 1.40 logs "-" here)


# ---- Envoy v3 table ----------------------------------------------------------------------------

def envoy(action, policies):
    return R.SPEC.from_envoy({"rules": {"action": action, "policies": policies}}, "typed_config")


JWT_GROUP_ADMIN = {"metadata": {"filter": "envoy.filters.http.jwt_authn",
                                "path": [{"key": "p"}, {"key": "groups"}],
                                "value": {"list_match": {"one_of": {"string_match": {"exact": "admin"}}}}}}
JWT_SUB = {"metadata": {"filter": "envoy.filters.http.jwt_authn",
                        "path": [{"key": "p"}, {"key": "sub"}],
                        "value": {"string_match": {"exact": "alice"}}}}

ENVOY_TABLE = [
    ("metadata list claim", "ALLOW", {"a": {"permissions": [{"any": True}], "principals": [JWT_GROUP_ADMIN]}},
     dict(**ADMIN), True),
    ("metadata list claim missing group", "ALLOW", {"a": {"permissions": [{"any": True}], "principals": [JWT_GROUP_ADMIN]}},
     dict(**DEV), False),
    ("metadata string claim", "ALLOW", {"a": {"permissions": [{"any": True}], "principals": [JWT_SUB]}},
     dict(**ADMIN), True),
    ("metadata inverted", "ALLOW", {"a": {"permissions": [{"any": True}], "principals": [
        {"metadata": dict(JWT_SUB["metadata"], invert=True)}]}}, dict(**ADMIN), False),
    (":method header", "ALLOW", {"a": {"permissions": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}}],
                                       "principals": [{"any": True}]}}, dict(method="GET"), True),
    (":authority header", "ALLOW", {"a": {"permissions": [{"header": {"name": ":authority", "exact_match": "api.example.com"}}],
                                          "principals": [{"any": True}]}}, dict(host="other"), False),
    ("url_path prefix", "DENY", {"d": {"permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                                       "principals": [{"any": True}]}}, dict(path="/admin/x"), False),
    ("url_path safe_regex", "ALLOW", {"a": {"permissions": [{"url_path": {"path": {"safe_regex": {"regex": "/items/[0-9]+"}}}}],
                                            "principals": [{"any": True}]}}, dict(path="/items/42"), True),
    ("and_rules / not_rule", "ALLOW", {"a": {"permissions": [{"and_rules": {"rules": [
        {"url_path": {"path": {"prefix": "/api"}}},
        {"not_rule": {"header": {"name": ":method", "exact_match": "DELETE"}}}]}}],
        "principals": [{"any": True}]}}, dict(path="/api/x", method="DELETE"), False),
    ("or_ids", "ALLOW", {"a": {"permissions": [{"any": True}], "principals": [{"or_ids": {"ids": [
        {"direct_remote_ip": {"address_prefix": "192.168.0.0", "prefix_len": 16}},
        {"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": {"value": 8}}}]}}]}},
     dict(ip="10.1.1.1"), True),
    ("and_ids / not_id", "ALLOW", {"a": {"permissions": [{"any": True}], "principals": [{"and_ids": {"ids": [
        {"authenticated": {"principal_name": {"prefix": "spiffe://cluster/"}}},
        {"not_id": {"authenticated": {"principal_name": {"exact": "spiffe://cluster/bad"}}}}]}}]}},
     dict(peer="spiffe://cluster/good"), True),
    ("authenticated any", "ALLOW", {"a": {"permissions": [{"any": True}], "principals": [{"authenticated": {}}]}},
     dict(), False),
    ("header principal present_match", "ALLOW", {"a": {"permissions": [{"any": True}], "principals": [
        {"header": {"name": "x-internal", "present_match": True}}]}}, dict(headers={"x-internal": "1"}), True),
    ("destination_port", "ALLOW", {"a": {"permissions": [{"destination_port": 8080}], "principals": [{"any": True}]}},
     dict(), False),
    ("header range_match", "ALLOW", {"a": {"permissions": [{"header": {"name": "x-n", "range_match": {"start": 1, "end": 10}}}],
                                           "principals": [{"any": True}]}}, dict(headers={"x-n": "5"}), True),
    ("double_match claim", "ALLOW", {"a": {"permissions": [{"any": True}], "principals": [{"metadata": {
        "filter": "envoy.filters.http.jwt_authn", "path": [{"key": "p"}, {"key": "level"}],
        "value": {"double_match": {"range": {"start": 3, "end": 10}}}}}]}}, dict(claims={"level": 5}), True),
]


@pytest.mark.parametrize("name,action,policies,rq,allowed", ENVOY_TABLE, ids=[t[0] for t in ENVOY_TABLE])
async def test_envoy_table(name, action, policies, rq, allowed):
    resp, n, _ = await decide(envoy(action, policies), req(**rq))
    assert n.called == allowed
    assert resp.status == (200 if allowed else 403)


# ---- shadow, metrics, per-route ---------------------------------------------------------------

async def test_shadow_counts_but_never_enforces():
    cfg = R.SPEC.from_envoy({"shadow_rules": {"action": "DENY", "policies": {"would-block": {
        "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}], "principals": [{"any": True}]}}}},
        "t")
    rt = runtime()
    for path in ("/admin/a", "/admin/b", "/public"):
        r = req(path)
        resp, n, _ = await decide(cfg, r, rt)
        assert resp.status == 200 and n.called
    assert r.ctx.metadata["envoy.filters.http.rbac"]["shadow_engine_result"] == "allowed"
    assert metric(rt, "sidecar_rbac_decisions_total", stat_prefix="", mode="shadow", result="denied") == 2
    assert metric(rt, "sidecar_rbac_decisions_total", stat_prefix="", mode="shadow", result="allowed") == 1
    assert metric(rt, "sidecar_rbac_policy_matches_total", stat_prefix="", mode="shadow",
                  policy="would-block") == 2


async def test_enforced_and_shadow_together_metrics_per_policy():
    cfg = R.SPEC.from_native({"action": "DENY", "stat_prefix": "edge",
                         "policies": {"no-admin": {"permissions": [{"path": {"prefix": "/admin"}}],
                                                   "principals": [{"any": True}]},
                                      "no-debug": {"permissions": [{"path": "/debug"}],
                                                   "principals": [{"any": True}]}},
                         "shadow": {"action": "ALLOW", "policies": {"only-get": {
                             "permissions": [{"method": "GET"}], "principals": [{"any": True}]}}}},
                        "rbac")
    rt = runtime()
    r = req("/admin/x")
    resp, n, _ = await decide(cfg, r, rt)
    assert resp.status == 403
    assert r.ctx.response_code_details == "rbac_access_denied_matched_policy[no-admin]"
    await decide(cfg, req("/debug"), rt)
    await decide(cfg, req("/debug"), rt)
    resp, _, _ = await decide(cfg, req("/ok", method="POST"), rt)
    assert resp.status == 200
    m = lambda **kw: metric(rt, **kw)  # noqa: E731
    assert m(name="sidecar_rbac_policy_matches_total", stat_prefix="edge", mode="enforced", policy="no-admin") == 1
    assert m(name="sidecar_rbac_policy_matches_total", stat_prefix="edge", mode="enforced", policy="no-debug") == 2
    assert m(name="sidecar_rbac_decisions_total", stat_prefix="edge", mode="enforced", result="denied") == 3
    assert m(name="sidecar_rbac_decisions_total", stat_prefix="", mode="shadow", result="denied") == 1


async def test_allow_denial_details_name_none():
    r = req("/x")
    await decide(R.SPEC.from_native({"action": "ALLOW", "policies": {}}, "r"), r)
    assert r.ctx.response_code_details == "rbac_access_denied_matched_policy[none]"


async def test_per_route_override_and_disable():
    base = R.SPEC.from_native({"action": "DENY", "policies": {"all": {"permissions": [{"any": True}],
                                                                 "principals": [{"any": True}]}}}, "r")
    rt = runtime()
    assert build_filter(R.SPEC, base, R.SPEC.per_route_from_envoy({}, "p"), rt, RouteInfo()) is None
    assert build_filter(R.SPEC, base, R.SPEC.per_route_from_native({"disabled": True}, "p"), rt, RouteInfo()) is None
    override = R.SPEC.per_route_from_envoy({"rbac": {"rules": {"action": "ALLOW", "policies": {
        "get": {"permissions": [{"header": {"name": ":method", "exact_match": "GET"}}],
                "principals": [{"any": True}]}}}}}, "p")
    f = build_filter(R.SPEC, base, override, rt, RouteInfo())
    n = Next()
    assert (await f(req(method="GET"), n)).status == 200
    assert (await f(req(method="PUT"), n)).status == 403


@pytest.mark.parametrize("cfg,path,msg", [
    ({"rules": {"action": "ALLOW", "policies": {"p": {"permissions": [{"any": True}], "principals": [{"any": True}],
                                                      "condition": {"x": 1}}}}},
     "t.rules.policies.p.condition", "not supported"),
    ({"rules": {"action": "MAYBE"}}, "t.rules.action", "must be one of"),
    ({"rules": {"policies": {"p": {"permissions": [{"destination_ip": {"address_prefix": "1.1.1.1"}}],
                                   "principals": [{"any": True}]}}}},
     "t.rules.policies.p.permissions[0].destination_ip", "not supported"),
    ({"rules": {"policies": {"p": {"permissions": [{"any": True}], "principals": [
        {"metadata": {"filter": "istio_authn", "path": [{"key": "x"}], "value": {"present_match": True}}}]}}}},
     "t.rules.policies.p.principals[0].metadata.filter", "jwt_authn"),
    ({"rules": {"policies": {"p": {"permissions": [], "principals": [{"any": True}]}}}},
     "t.rules.policies.p.permissions", "at least one"),
    ({"rules": {"policies": {"p": {"permissions": [{"any": True}], "principals": [
        {"remote_ip": {"address_prefix": "10.0.0.x", "prefix_len": 8}}]}}}},
     "t.rules.policies.p.principals[0].remote_ip.address_prefix", "not an IP"),
    ({"rules": {"policies": {"p": {"permissions": [{"url_path": {"path": {"safe_regex": {"regex": "("}}}}],
                                   "principals": [{"any": True}]}}}},
     "t.rules.policies.p.permissions[0].url_path.path.safe_regex.regex", "invalid regular"),
    ({"matcher": {}}, "t.matcher", "not supported"),
])
def test_envoy_config_errors(cfg, path, msg):
    with pytest.raises(ConfigError) as e:
        R.SPEC.from_envoy(cfg, "t")
    assert e.value.path == path and msg in e.value.message


@pytest.mark.parametrize("cfg,path", [
    ({"policies": {"p": {"permissions": [{"path": "/a", "method": "GET"}], "principals": [{"any": True}]}}},
     "n.policies.p.permissions[0]"),
    ({"policies": {"p": {"permissions": [{"any": True}], "principals": [{"source_ip": "10.0.0.0/33"}]}}},
     "n.policies.p.principals[0].source_ip"),
    ({"policies": {"p": {"permissions": [{"methods": ["G E T"]}], "principals": [{"any": True}]}}},
     "n.policies.p.permissions[0].methods"),
    ({"policies": {"p": {"permissions": [{"any": True}], "principals": [{"claim": {"name": "sub"}}]}}},
     "n.policies.p.principals[0].claim.value"),
    ({"action": "ALLOW", "policies": {"p": {"permissions": [{"any": True}]}}}, "n.policies.p.principals"),
    ({"bogus": 1}, "n.bogus"),
])
def test_native_config_errors(cfg, path):
    with pytest.raises(ConfigError) as e:
        R.SPEC.from_native(cfg, "n")
    assert e.value.path == path
