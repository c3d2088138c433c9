"""jwt_authn without sockets: the attack table, algorithms, token locations, outputs,
requirements, caches, logging, both config formats and their errors. Remote JWKS (real
servers, clusters) and end-to-end runs are in tests/integration/test_jwt_authn.py."""

from __future__ import annotations

import json
import logging
import time

import jwt
import pytest

from filters import jwt_authn as J
from filters.jwt_authn import status as S
from filters.jwt_authn import verify
from filters.jwt_authn.config import DEFAULT_LOCATIONS
from filters.jwt_authn.filter import provider_runtime
from filters.jwt_authn.keys import ALGORITHM, parse_jwks
from filters.jwt_authn.replay import ReplayCheck
from sidecar.config.errors import ConfigError
from sidecar.shared.local import LocalReplay
from sidecar.testing import build_filter
from tests.jwt_helpers import (
    ATTACKS,
    AUDIENCE,
    HS_SECRET,
    ISSUER,
    Next,
    RouteInfo,
    attack_cases,
    b64,
    build,
    call,
    ec_key,
    fresh_attack,
    jwks,
    make_request,
    metric,
    mint,
    native,
    public_jwk,
    public_pem,
    rsa_key,
    rsa_provider,
    runtime,
    unb64,
)

NOW = lambda: int(time.time())  # noqa: E731


@pytest.fixture(scope="module")
def std():
    """rsa provider 'p' (plus replay-protected 'once' and HS 'hs') with rules by prefix."""
    cfg = native({"p": rsa_provider(),
                  "once": rsa_provider(replay_protection=True,
                                       **{"from": [{"header": "x-once", "prefix": "Bearer "}]}),
                  "hs": {"issuer": ISSUER, "audiences": [AUDIENCE], "secret": HS_SECRET,
                         "from": [{"header": "x-hs"}]}},
                 rules=[{"match": {"prefix": "/once"}, "requires": "once"},
                        {"match": {"prefix": "/hs"}, "requires": "hs"},
                        {"match": {"prefix": "/api"}, "requires": "p"}])
    return cfg


# ---- the attack table --------------------------------------------------------------------------

@pytest.mark.parametrize("name", [a[0] for a in ATTACKS])
async def test_attack_table(std, name):
    _, token, status, body = fresh_attack(name)
    f, rt = build(std)
    req = make_request("/api/x", token=token)
    resp, n = await call(f, req)
    assert resp.status == status, (name, resp.body)
    if status == 200:
        assert n.called
        assert n.last.ctx.jwt_payloads["p"]["sub"] == "alice"
        return
    assert not n.called
    assert resp.body.decode() == body
    www = resp.headers["www-authenticate"]
    assert www == 'Bearer realm="http://svc.local/api/x", error="invalid_token"'
    assert req.ctx.response_code_details == (
        "jwt_authn_access_denied{" + body.replace(" ", "_") + "}")
    assert req.ctx.jwt_payloads == {}


async def test_missing_token_is_401_without_error():
    f, _ = build(native({"p": rsa_provider()}, rules=[{"match": {"prefix": "/"}, "requires": "p"}]))
    req = make_request("/api/x", query="a=1")
    resp, n = await call(f, req)
    assert resp.status == 401 and resp.body == b"Jwt is missing"
    # realm is scheme://host/path; the query (which may carry a token) is never echoed
    assert resp.headers["www-authenticate"] == 'Bearer realm="http://svc.local/api/x"'
    assert req.ctx.response_code_details == "jwt_authn_access_denied{Jwt_is_missing}"
    assert req.ctx.flags == ["JWT"]     # local flag (Envoy 1.40 logs "-" here)
    # wrong scheme / case-sensitive prefix counts as missing, as in Envoy
    resp, _ = await call(f, make_request(headers={"authorization": "bearer " + mint()}))
    assert resp.status == 401 and resp.body == b"Jwt is missing"
    resp, _ = await call(f, make_request(headers={"authorization": "Basic dXNlcjpwdw=="}))
    assert resp.body == b"Jwt is missing"


async def test_hs256_shared_secret_and_short_secret_refused(std):
    f, _ = build(std)
    tok = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": NOW() + 60}, HS_SECRET, algorithm="HS256")
    resp, n = await call(f, make_request("/hs/x", headers={"x-hs": tok}))
    assert resp.status == 200 and n.last.ctx.jwt_payloads["hs"]["iss"] == ISSUER
    # HS512 needs a 64-byte key: this secret allows HS256 only
    tok = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": NOW() + 60}, HS_SECRET + "x" * 30,
                     algorithm="HS512")
    resp, _ = await call(f, make_request("/hs/x", headers={"x-hs": tok}))
    assert resp.status == 401 and resp.body.decode() == "Jwt verification fails"
    # forged with a different secret
    tok = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": NOW() + 60}, "y" * 40, algorithm="HS256")
    resp, _ = await call(f, make_request("/hs/x", headers={"x-hs": tok}))
    assert resp.status == 401 and resp.body == b"Jwt verification fails"
    with pytest.raises(ConfigError) as e:
        native({"hs": {"secret": "short"}})
    assert e.value.path == "jwt_authn.providers.hs.secret" and "32 bytes" in e.value.message


async def test_replayed_jti(std):
    rt = runtime()
    f, _ = build(std, rt=rt)
    tok = mint(jti="one-time-1")
    resp, n = await call(f, make_request("/once/x", headers={"x-once": "Bearer " + tok}))
    assert resp.status == 200
    resp, n = await call(f, make_request("/once/x", headers={"x-once": "Bearer " + tok}))
    assert resp.status == 401 and resp.body == b"Jwt has already been used" and not n.called
    # a different token with the same jti is a replay too
    resp, _ = await call(f, make_request("/once/x", headers={"x-once": "Bearer " + mint(jti="one-time-1", sub="bob")}))
    assert resp.status == 401
    # a token without jti is refused when replay protection is on
    resp, _ = await call(f, make_request("/once/x", headers={"x-once": "Bearer " + mint()}))
    assert resp.status == 401 and resp.body == b"Jwt payload [jti] field is required"
    # a config reload (new filter, same runtime state) remembers seen jtis
    f2, _ = build(native({"once": rsa_provider(replay_protection=True)},
                         rules=[{"match": {"prefix": "/"}, "requires": "once"}]), rt=rt)
    resp, _ = await call(f2, make_request("/once/x", token=tok))
    assert resp.status == 401 and resp.body == b"Jwt has already been used"
    assert metric(rt, "sidecar_jwt_authn_verifications_total", provider="once", outcome="replayed") >= 2


def test_replay_cache_is_bounded_and_forgets_expired():
    c = ReplayCheck("iss", LocalReplay(2), None)
    assert c.check("a", 100.0, 10.0) is None
    assert c.check("b", 200.0, 10.0) is None
    assert c.check("a", 100.0, 20.0) is S.REPLAYED
    assert c.check("c", 300.0, 20.0) is S.REPLAY_FULL     # fail closed while full
    assert c.check("c", 300.0, 150.0) is None             # "a" expired and purged
    assert c.check("a", 400.0, 150.0) is S.REPLAY_FULL
    assert ReplayCheck("other", c.local, None).check("a", 400.0, 150.0) is S.REPLAY_FULL


def test_replay_max_entries_refused_pointing_at_shared_state():
    with pytest.raises(ConfigError) as e:
        native({"once": rsa_provider(replay_protection={"max_entries": 10})})
    assert "replay_protection.max_entries" in str(e.value) and "shared_state.replay_entries" in str(e.value)


# ---- token locations and outputs -----------------------------------------------------------------

async def test_locations_header_prefix_query_cookie():
    cfg = native({"p": rsa_provider(**{"from": [{"header": "x-token", "prefix": "Token "},
                                                {"query": "jwt"}, {"cookie": "session"}]})},
                 rules=[{"match": {"prefix": "/"}, "requires": "p"}])
    f, _ = build(cfg)
    tok = mint()
    for req in (make_request(headers={"x-token": "Token " + tok}),
                make_request(query="a=1&jwt=" + tok + "&b=2"),
                make_request(headers={"cookie": "x=1; session=" + tok + "; y=2"})):
        resp, n = await call(f, req)
        assert resp.status == 200, resp.body
    # Authorization is not a location of this provider
    resp, _ = await call(f, make_request(token=tok))
    assert resp.status == 401 and resp.body == b"Jwt is missing"


async def test_outputs_payload_header_claims_and_forwarding():
    cfg = J.SPEC.from_envoy({
        "providers": {"p": {
            "issuer": ISSUER, "audiences": [AUDIENCE],
            "local_jwks": {"inline_string": json.dumps(jwks(public_jwk(rsa_key("a"), "k1")))},
            "forward_payload_header": "x-jwt-payload",
            "claim_to_headers": [{"header_name": "x-sub", "claim_name": "sub"},
                                 {"header_name": "x-groups", "claim_name": "groups"},
                                 {"header_name": "x-org", "claim_name": "org.id"},
                                 {"header_name": "x-admin", "claim_name": "admin"}],
            "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
            "from_params": ["access_token"],
            "payload_in_metadata": "my_payload",
        }},
        "rules": [{"match": {"prefix": "/open"}, "requires": {"allow_missing": {}}},
                  {"match": {"prefix": "/"}, "requires": {"provider_name": "p"}}],
    }, "typed_config")
    f, _ = build(cfg)
    tok = mint(groups=["admin", "dev"], org={"id": "acme"}, admin=True)
    req = make_request(token=tok, headers={"x-sub": "spoofed", "x-jwt-payload": "spoofed"})
    resp, n = await call(f, req)
    assert resp.status == 200
    h = n.last.headers
    assert "authorization" not in h                      # forward: false strips the token
    assert h.getall("x-sub") == ["alice"]               # client copy replaced, not appended
    assert h["x-jwt-payload"] == tok.split(".")[1]       # base64url payload, unpadded
    assert json.loads(unb64(h["x-jwt-payload"]))["groups"] == ["admin", "dev"]
    import base64
    assert json.loads(base64.b64decode(h["x-groups"])) == ["admin", "dev"]
    assert h["x-org"] == "acme" and h["x-admin"] == "true"
    assert n.last.ctx.jwt_payloads["p"] is n.last.ctx.jwt_payloads["my_payload"]
    # query token removed from the forwarded query
    req = make_request(query="a=1&access_token=" + tok)
    resp, n = await call(f, req)
    assert resp.status == 200 and n.last.query == "a=1"
    # allow_missing route: no token, but spoofed output headers are still removed
    req = make_request("/open", headers={"x-sub": "admin", "x-jwt-payload": "e30"})
    resp, n = await call(f, req)
    assert resp.status == 200 and "x-sub" not in n.last.headers
    assert "x-jwt-payload" not in n.last.headers and n.last.ctx.jwt_payloads == {}


async def test_forward_true_keeps_token_and_pad_payload():
    f, _ = build(native({"p": rsa_provider(forward=True, payload_header="x-p", pad_payload_header=True)},
                        rules=[{"match": {"prefix": "/"}, "requires": "p"}]))
    tok = mint(sub="a")
    resp, n = await call(f, make_request(token=tok))
    assert n.last.headers["authorization"] == "Bearer " + tok
    assert len(n.last.headers["x-p"]) % 4 == 0


# ---- requirements, rules and per-route config ----------------------------------------------------

@pytest.fixture(scope="module")
def multi():
    return native(
        {"a": rsa_provider(**{"from": [{"header": "x-a"}]}),
         "b": {"issuer": "https://b.test", "secret": HS_SECRET, "from": [{"header": "x-b"}]}},
        requirements={"either": {"any": ["a", "b"]}, "both": {"all": ["a", "b"]}},
        rules=[{"match": {"path": "/public"}},
               {"match": {"prefix": "/either"}, "requirement": "either"},
               {"match": {"prefix": "/both"}, "requires": {"all": ["a", "b"]}},
               {"match": {"prefix": "/opt"}, "requires": "allow_missing"},
               {"match": {"prefix": "/fail-ok"}, "requires": "allow_missing_or_failed"},
               {"match": {"prefix": "/aud"}, "requires": {"provider": "a", "audiences": ["special"]}},
               {"match": {"prefix": "/hdr", "headers": [{"name": "x-secure", "exact": "1"}]},
                "requires": "a"},
               {"match": {"regex": "/re/[0-9]+"}, "requires": "a"}])


def _b_token(**kw):
    c = {"iss": "https://b.test", "exp": NOW() + 60}
    c.update(kw)
    return jwt.encode(c, HS_SECRET, algorithm="HS256")


REQ_TABLE = [
    # path, headers, expected status
    ("/public", {}, 200),
    ("/public/sub", {}, 200),        # no rule matches -> untouched
    ("/either", {}, 401),
    ("/either", {"x-a": "A"}, 200),
    ("/either", {"x-b": "B"}, 200),
    ("/either", {"x-a": "bad.token.x"}, 401),
    ("/both", {"x-a": "A"}, 401),
    ("/both", {"x-a": "A", "x-b": "B"}, 200),
    ("/opt", {}, 200),
    ("/opt", {"x-a": "A"}, 200),
    ("/opt", {"x-a": "EXPIRED"}, 401),
    ("/fail-ok", {"x-a": "EXPIRED"}, 200),
    ("/fail-ok", {}, 200),
    ("/aud", {"x-a": "A"}, 403),
    ("/aud", {"x-a": "A_SPECIAL"}, 200),
    ("/hdr", {"x-secure": "1"}, 401),
    ("/hdr", {"x-secure": "0"}, 200),
    ("/re/12", {}, 401),
    ("/re/12x", {}, 200),
]


@pytest.mark.parametrize("path,headers,status", REQ_TABLE)
async def test_requirement_table(multi, path, headers, status):
    toks = {"A": mint(), "B": _b_token(), "EXPIRED": mint(exp=NOW() - 3600),
            "A_SPECIAL": mint(aud="special")}
    h = {k: toks.get(v, v) for k, v in headers.items()}
    f, _ = build(multi)
    resp, n = await call(f, make_request(path, headers=h))
    assert resp.status == status, resp.body
    assert n.called == (status == 200)


async def test_allow_failed_still_outputs_valid_tokens(multi):
    f, _ = build(multi)
    resp, n = await call(f, make_request("/fail-ok", headers={"x-a": mint(), "x-b": "junk"}))
    assert resp.status == 200 and set(n.last.ctx.jwt_payloads) == {"a"}


async def test_per_route_config():
    cfg = J.SPEC.from_envoy({
        "providers": {"p": {"issuer": ISSUER, "local_jwks": {"inline_string": json.dumps(
            jwks(public_jwk(rsa_key("a"), "k1")))}}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "p"}}],
        "requirement_map": {"opt": {"allow_missing": {}}},
    }, "t")
    off = J.SPEC.per_route_from_envoy({"disabled": True}, "r")
    assert build_filter(J.SPEC, cfg, off, runtime(), RouteInfo()) is None
    f, _ = build(cfg, J.SPEC.per_route_from_envoy({"requirement_name": "opt"}, "r"))
    resp, n = await call(f, make_request("/anything"))
    assert resp.status == 200
    with pytest.raises(ConfigError, match="requirement_map"):
        build(cfg, J.SPEC.per_route_from_envoy({"requirement_name": "nope"}, "r"))
    # native inline per-route requirement, checked against the providers at build
    f, _ = build(cfg, J.SPEC.per_route_from_native({"requires": "p"}, "r"))
    assert (await call(f, make_request("/x")))[0].status == 401
    with pytest.raises(ConfigError, match="unknown jwt_authn provider"):
        build(cfg, J.SPEC.per_route_from_native({"requires": "q"}, "r"))


async def test_cors_preflight_bypass_and_subjects_and_lifetime():
    cfg = native({"p": rsa_provider(subject={"prefix": "svc-"}, max_lifetime="1h")},
                 rules=[{"match": {"prefix": "/"}, "requires": "p"}], bypass_cors_preflight=True)
    f, rt = build(cfg)
    pre = make_request(method="OPTIONS", headers={"origin": "https://a", "access-control-request-method": "GET"})
    assert (await call(f, pre))[0].status == 200
    assert metric(rt, "sidecar_jwt_authn_requests_total", stat_prefix="", outcome="cors_preflight_bypassed") == 1
    assert (await call(f, make_request(token=mint(sub="svc-1", exp=NOW() + 600))))[0].status == 200
    assert (await call(f, make_request(token=mint(sub="user", exp=NOW() + 600))))[0].status == 401
    assert (await call(f, make_request(token=mint(sub="svc-1", exp=NOW() + 86400))))[0].status == 401
    # native default: exp is required
    assert (await call(f, make_request(token=mint(sub="svc-1", exp=None))))[0].status == 401


async def test_strip_failure_response():
    cfg = J.SPEC.from_envoy({"providers": {"p": {"local_jwks": {"inline_string": json.dumps(
        jwks(public_jwk(rsa_key("a"), "k1")))}}}, "strip_failure_response": True,
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "p"}}]}, "t")
    f, _ = build(cfg)
    resp, _ = await call(f, make_request())
    assert resp.status == 401 and resp.body == b"" and "www-authenticate" not in resp.headers


# ---- verified-token cache ---------------------------------------------------------------------------

class FakeTime:
    def __init__(self):
        self.now = time.time()
        self.mono = time.monotonic()

    def time(self):
        return self.now

    def monotonic(self):
        return self.mono


async def test_cache_hit_skips_crypto_and_honours_exp(monkeypatch):
    cfg = native({"p": rsa_provider(clock_skew="0s")}, rules=[{"match": {"prefix": "/"}, "requires": "p"}])
    f, rt = build(cfg)
    tok = mint(exp=NOW() + 100)
    assert (await call(f, make_request(token=tok)))[0].status == 200
    calls = []
    algo = ALGORITHM["RS256"]
    orig = type(algo).verify
    monkeypatch.setattr(type(algo), "verify", lambda self, *a: calls.append(1) or orig(self, *a))
    for _ in range(50):
        resp, n = await call(f, make_request(token=tok))
        assert resp.status == 200 and n.last.ctx.jwt_payloads["p"]["sub"] == "alice"
    assert calls == []
    assert metric(rt, "sidecar_jwt_authn_token_cache_total", provider="p", result="hit") == 50
    ft = FakeTime()
    ft.now += 101
    monkeypatch.setattr(verify, "time", ft)   # verify reads time.time()
    resp, _ = await call(f, make_request(token=tok))
    assert resp.status == 401 and resp.body == b"Jwt is expired"


async def test_cache_is_bounded():
    cfg = native({"p": rsa_provider(cache_size=3)}, rules=[{"match": {"prefix": "/"}, "requires": "p"}])
    f, rt = build(cfg)
    for i in range(10):
        assert (await call(f, make_request(token=mint(sub=f"u{i}"))))[0].status == 200
    prt = provider_runtime(cfg.providers[0], rt.state_for(J.SPEC), rt)
    assert len(prt.cache) == 3


async def test_cached_path_is_cheap(monkeypatch):
    """The performance budget, checked by what runs (its speed is measured in bench/): a cached
    valid token costs a dict hit - no JSON parsing, no base64, no signature check."""
    cfg = native({"p": rsa_provider()}, rules=[{"match": {"prefix": "/"}, "requires": "p"}])
    f, rt = build(cfg)
    tok = mint()
    n = Next()
    await f(make_request(token=tok), n)
    work = []
    monkeypatch.setattr(verify.json, "loads", lambda *a, **k: work.append("json"))
    monkeypatch.setattr(verify, "_b64url", lambda *a: work.append("b64"))
    algo = ALGORITHM["RS256"]
    monkeypatch.setattr(type(algo), "verify", lambda *a: work.append("sig"))
    for _ in range(100):
        resp = await f(make_request(token=tok), n)
        assert resp.status == 200
    assert work == []
    assert metric(rt, "sidecar_jwt_authn_token_cache_total", provider="p", result="hit") == 100


# ---- no token or secret in logs --------------------------------------------------------------------

async def test_tokens_never_logged(caplog, std):
    caplog.set_level(logging.DEBUG, logger="sidecar")
    f, _ = build(std)
    secrets = []
    for _name, tok, _, _ in attack_cases():
        secrets.append(tok)
        await call(f, make_request("/api/x", token=tok))
    hs = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": NOW() + 60}, HS_SECRET, algorithm="HS256")
    await call(f, make_request("/hs/x", headers={"x-hs": hs}))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "jwt provider p:" in text          # debug logging did run
    for tok in secrets + [hs]:
        for part in tok.split("."):
            if len(part) > 16:
                assert part not in text
    assert HS_SECRET not in text


# ---- config formats and errors ----------------------------------------------------------------------

def test_envoy_config_full_and_native_equivalent(tmp_path):
    jf = tmp_path / "jwks.json"
    jf.write_text(json.dumps(jwks(public_jwk(rsa_key("a"), "k1"))))
    env = J.SPEC.from_envoy({
        "providers": {
            "local": {"issuer": ISSUER, "audiences": [AUDIENCE], "local_jwks": {"filename": str(jf)},
                      "clock_skew_seconds": 30, "require_expiration": True,
                      "jwt_cache_config": {"jwt_cache_size": 10},
                      "forward": True, "header_in_metadata": "h", "failed_status_in_metadata": "f"},
            "remote": {"issuer": "https://r", "remote_jwks": {
                "http_uri": {"uri": "https://idp.test/jwks", "cluster": "idp", "timeout": "2s"},
                "cache_duration": "300s", "async_fetch": {"failed_refetch_duration": "5s"},
                "retry_policy": {"num_retries": 2}},
                "subjects": {"prefix": "spiffe://"}, "max_lifetime": "3600s"}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
            {"provider_name": "local"}, {"provider_name": "remote"}]}}}],
        "bypass_cors_preflight": True, "stat_prefix": "edge"}, "typed_config")
    loc, rem = env.providers
    assert loc.clock_skew_s == 30 and loc.require_expiration and loc.cache_size == 10
    assert loc.locations == DEFAULT_LOCATIONS
    assert rem.remote.timeout_s == 2 and rem.remote.cache_duration_s == 300
    assert rem.remote.fetch_at_start and rem.remote.failed_refetch_s == 5
    assert rem.remote.num_retries == 2 and rem.subjects.prefix == "spiffe://"
    nat = J.SPEC.from_native({"providers": {"local": {"issuer": ISSUER, "audiences": [AUDIENCE],
                                                 "jwks_file": str(jf), "clock_skew": "30s"}},
                         "rules": [{"match": {"prefix": "/"}, "requires": "local"}]}, "n")
    assert nat.providers[0].local_digest == loc.local_digest


@pytest.mark.parametrize("cfg,path,msg", [
    ({"providers": {"p": {"issuer": "x", "local_jwks": {"inline_string": "{}"}, "bogus": 1}}},
     "t.providers.p.bogus", "unknown"),
    ({"providers": {"p": {"local_jwks": {"inline_string": "nope"}}}},
     "t.providers.p.local_jwks", "invalid JWKS"),
    ({"providers": {"p": {"local_jwks": {"inline_string": json.dumps(jwks({"kty": "oct", "k": b64(b"short")}))}}}},
     "t.providers.p.local_jwks", "no usable"),
    ({"providers": {"p": {"local_jwks": {"inline_string": "{}"}}}}, "t.providers.p.local_jwks", "invalid JWKS"),
    ({"providers": {"p": {"remote_jwks": {"http_uri": {"uri": "ftp://x", "cluster": "c"}}}}},
     "t.providers.p.remote_jwks.http_uri.uri", "http"),
    ({"providers": {"p": {"remote_jwks": {"http_uri": {"uri": "https://idp/jwks"}}}}},
     "t.providers.p.remote_jwks.http_uri.cluster", "required"),
    ({"providers": {"p": {"clear_route_cache": True, "local_jwks": {"inline_string": "{}"}}}},
     "t.providers.p.clear_route_cache", "not supported"),
    ({"providers": {}, "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "x"}}]},
     "t.rules[0].requires.provider_name", "unknown provider"),
    ({"providers": {}, "rules": [{"match": {"prefix": "/", "grpc": {}}}]},
     "t.rules[0].match.grpc", "not supported"),
    ({"providers": {}, "filter_state_rules": {"name": "x"}}, "t.filter_state_rules", "not supported"),
])
def test_envoy_config_errors(cfg, path, msg):
    with pytest.raises(ConfigError) as e:
        J.SPEC.from_envoy(cfg, "t")
    assert e.value.path == path and msg in e.value.message


@pytest.mark.parametrize("cfg,path", [
    ({"providers": {"p": {"jwks_uri": "https://x", "secret": HS_SECRET}}}, "n.providers.p"),
    ({"providers": {"allow_missing": {"secret": HS_SECRET}}}, "n.providers.allow_missing"),
    ({"providers": {"p": {"secret": HS_SECRET, "jwks_cache_duration": "1s"}}}, "n.providers.p.jwks_cache_duration"),
    ({"providers": {"p": {"secret": HS_SECRET}}, "rules": [{"match": {"prefix": "x"}, "requires": "p"}]},
     "n.rules[0].match.prefix"),
    ({"providers": {"p": {"secret": HS_SECRET}}, "rules": [{"requires": {"any": ["p", "q"]}}]},
     "n.rules[0].requires.any[1]"),
    ({"providers": {"p": {"secret": HS_SECRET, "from": [{"query": "t", "prefix": "x"}]}}},
     "n.providers.p.from[0].prefix"),
    ({"providers": {"p": {"jwks_file": "/nonexistent/jwks.json"}}}, "n.providers.p.jwks_file"),
])
def test_native_config_errors(cfg, path):
    with pytest.raises(ConfigError) as e:
        J.SPEC.from_native(cfg, "n")
    assert e.value.path == path


def test_pem_keys_and_jwks_key_filtering():
    ks = parse_jwks(public_pem(rsa_key("a")) + public_pem(ec_key("a")))
    assert [sorted(k.algs) for k in ks.keys][1] == ["ES256"]
    ks = parse_jwks(jwks(public_jwk(rsa_key("a"), "s"),
                           dict(public_jwk(rsa_key("a"), "e"), use="enc"),
                           {"kty": "XYZ", "kid": "u"}))
    assert [k.kid for k in ks.keys] == ["s"] and ks.skipped == 2
    small = rsa_key_small()
    with pytest.raises(ValueError, match="2048"):
        parse_jwks(jwks(public_jwk(small, "tiny")))
    assert "key" not in repr(ks.keys[0]).lower().replace("verifykey", "")


def rsa_key_small():
    from cryptography.hazmat.primitives.asymmetric import rsa
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def test_remote_jwks_cluster_must_exist():
    """Envoy ``http_uri.cluster`` is where the JWKS is fetched from: a cluster that does not
    exist refuses the config when the filter is built, naming the field (tests/integration
    fetch through a real one)."""
    cfg = J.SPEC.from_envoy({"providers": {"p": {"issuer": ISSUER, "remote_jwks": {
        "http_uri": {"uri": "https://idp.invalid/jwks", "cluster": "nosuch", "timeout": "1s"}}}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "p"}}]},
        "listeners[0].http_filters[0].typed_config")
    rt = runtime(clusters={"idp": ["127.0.0.1:9"]})
    with pytest.raises(ConfigError) as e:
        build(cfg, rt=rt)
    assert e.value.path == ("listeners[0].http_filters[0].typed_config.providers.p.remote_jwks"
                            ".http_uri.cluster")
    assert "no cluster named 'nosuch'" in e.value.message
    rt.close()


async def test_envoy_rule_header_match_on_a_pseudo_header():
    """Rule ``headers`` see the request as Envoy does (``:method`` here), through the shared
    matchers."""
    cfg = J.SPEC.from_envoy({"providers": {"p": {"issuer": ISSUER, "local_jwks": {
        "inline_string": json.dumps(jwks(public_jwk(rsa_key("a"), "k1")))}}},
        "rules": [{"match": {"prefix": "/", "headers": [
            {"name": ":method", "string_match": {"exact": "POST"}}]},
            "requires": {"provider_name": "p"}}]}, "t")
    f, _ = build(cfg)
    assert (await call(f, make_request(method="POST")))[0].status == 401
    assert (await call(f, make_request(method="GET")))[0].status == 200
