"""Local rate limit: table-driven bucket behaviour on a controlled monotonic clock, descriptors
(header, JWT sub, client address), Envoy semantics (filter_enabled/enforced), headers,
metrics, state across rebuilds, config errors."""

from __future__ import annotations

import time

import pytest

from filters import local_ratelimit as L
from filters.local_ratelimit import filter as limiter
from filters.local_ratelimit.envoy import fraction
from sidecar.config.errors import ConfigError
from sidecar.core.connection_id import ConnectionId
from sidecar.testing import build_filter
from tests.jwt_helpers import Next, RouteInfo, make_request, metric, runtime


class Clock:
    def __init__(self):
        self.t = 1000.0

    def monotonic(self):
        return self.t

    def time(self):
        return time.time()


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(limiter, "time", c)   # the filter reads time.monotonic()
    return c


def rq(headers=None, sub=None, ip="10.0.0.1"):
    r = make_request("/api", headers=headers, client_ip=ip)
    if sub is not None:
        r.ctx.jwt_payloads["p"] = {"sub": sub}
    return r


# Each step: (seconds to advance before the request, request kwargs, expected status)
TABLE = [
    ("burst then limited",
     {"max_tokens": 3, "tokens_per_fill": 3, "fill_interval": "1s"},
     [(0, {}, 200), (0, {}, 200), (0, {}, 200), (0, {}, 429), (0.5, {}, 429), (0.5, {}, 200)]),
    ("partial refill",
     {"max_tokens": 4, "tokens_per_fill": 2, "fill_interval": "10s"},
     [(0, {}, 200)] * 4 + [(0, {}, 429), (10, {}, 200), (0, {}, 200), (0, {}, 429)]),
    ("refill never exceeds max",
     {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "1s"},
     [(100, {}, 200), (0, {}, 200), (0, {}, 429)]),
    ("per header value",
     {"descriptors": [{"by": {"header": "x-api-key"}, "max_tokens": 1, "fill_interval": "1m"}]},
     [(0, {"headers": {"x-api-key": "a"}}, 200), (0, {"headers": {"x-api-key": "a"}}, 429),
      (0, {"headers": {"x-api-key": "b"}}, 200), (0, {}, 200), (0, {}, 200)]),
    ("per JWT sub, plus a route bucket",
     {"max_tokens": 3, "fill_interval": "1m",
      "descriptors": [{"by": {"jwt_claim": "sub"}, "max_tokens": 1, "fill_interval": "1m"}]},
     [(0, {"sub": "alice"}, 200), (0, {"sub": "alice"}, 429), (0, {"sub": "bob"}, 200),
      (0, {}, 200), (0, {}, 429)]),
    ("per client ip",
     {"descriptors": [{"by": {"remote_ip": True}, "max_tokens": 2, "fill_interval": "1s"}]},
     [(0, {"ip": "1.1.1.1"}, 200), (0, {"ip": "1.1.1.1"}, 200), (0, {"ip": "1.1.1.1"}, 429),
      (0, {"ip": "2.2.2.2"}, 200), (1, {"ip": "1.1.1.1"}, 200)]),
    ("static descriptor value",
     {"descriptors": [{"by": {"header": "x-tier", "value": "free"}, "max_tokens": 1, "fill_interval": "1m"}]},
     [(0, {"headers": {"x-tier": "free"}}, 200), (0, {"headers": {"x-tier": "free"}}, 429),
      (0, {"headers": {"x-tier": "gold"}}, 200), (0, {"headers": {"x-tier": "gold"}}, 200)]),
    ("not enforced: counts only",
     {"max_tokens": 1, "fill_interval": "1m", "enforced": 0},
     [(0, {}, 200), (0, {}, 200), (0, {}, 200)]),
    ("disabled via enabled: 0",
     {"max_tokens": 1, "fill_interval": "1m", "enabled": False},
     [(0, {}, 200), (0, {}, 200)]),
]


@pytest.mark.parametrize("name,cfg,steps", TABLE, ids=[t[0] for t in TABLE])
async def test_native_table(clock, name, cfg, steps):
    c = L.SPEC.from_native(cfg, "local_ratelimit")
    f = build_filter(L.SPEC, c, None, runtime(), RouteInfo())
    got = []
    for adv, kw, _ in steps:
        clock.t += adv
        if f is None:
            got.append(200)
            continue
        resp = await f(rq(**kw), Next())
        got.append(resp.status)
    assert got == [s for _, _, s in steps]


async def test_limited_response_and_headers(clock):
    cfg = L.SPEC.from_native({"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "10s",
                         "response_headers": {"x-limited-by": "sidecar"}}, "rl")
    rt = runtime()
    f = build_filter(L.SPEC, cfg, None, rt, RouteInfo())
    n = Next()
    r1 = await f(rq(), n)
    assert (r1.headers["x-ratelimit-limit"], r1.headers["x-ratelimit-remaining"]) == ("2", "1")
    clock.t += 3
    r2 = await f(rq(), n)
    assert r2.headers["x-ratelimit-remaining"] == "0" and r2.headers["x-ratelimit-reset"] == "7"
    r = rq()
    r3 = await f(r, n)
    assert r3.status == 429 and r3.body == b"local_rate_limited"
    assert r3.headers["x-ratelimit-limit"] == "2" and r3.headers["x-ratelimit-reset"] == "7"
    assert r3.headers["x-limited-by"] == "sidecar"
    assert r.ctx.flags == ["RL"] and r.ctx.response_code_details == "local_rate_limited"
    assert len(n.calls) == 2
    m = lambda o: metric(rt, "sidecar_local_ratelimit_requests_total", stat_prefix="local_ratelimit", outcome=o)  # noqa: E731
    assert (m("enabled"), m("ok"), m("rate_limited"), m("enforced")) == (3, 2, 1, 1)


async def test_envoy_config_semantics(clock):
    base = {"stat_prefix": "http_local_rate_limiter",
            "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "60s"}}
    # Envoy: filter_enabled unset = 0 % -> the filter does nothing
    assert build_filter(L.SPEC, L.SPEC.from_envoy(base, "t"), None, runtime(), RouteInfo()) is None
    pct = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "rl_enabled"}
    # enabled but not enforced: counted, passed, request header added
    cfg = L.SPEC.from_envoy(dict(base, filter_enabled=pct, request_headers_to_add_when_not_enforced=[
        {"header": {"key": "x-rl-shadow", "value": "true"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]), "t")
    f = build_filter(L.SPEC, cfg, None, runtime(), RouteInfo())
    n = Next()
    await f(rq(), n)
    r2 = await f(rq(), n)
    assert r2.status == 200 and n.last.headers["x-rl-shadow"] == "true"
    # enforced, custom status, x-ratelimit headers
    cfg = L.SPEC.from_envoy(dict(base, filter_enabled=pct, filter_enforced=pct, status={"code": 503},
                            enable_x_ratelimit_headers="DRAFT_VERSION_03",
                            response_headers_to_add=[{"header": {"key": "x-rl", "value": "1"}}]), "t")
    f = build_filter(L.SPEC, cfg, None, runtime(), RouteInfo())
    assert (await f(rq(), Next())).headers["x-ratelimit-limit"] == "1"
    r = await f(rq(), Next())
    assert r.status == 503 and r.headers["x-rl"] == "1" and r.headers["x-ratelimit-remaining"] == "0"
    # fractional percent in TEN_THOUSAND
    half = fraction({"default_value": {"numerator": 5000, "denominator": "TEN_THOUSAND"}}, "p")
    assert half == 50.0


async def test_envoy_descriptors_with_rate_limit_actions(clock):
    pct = {"default_value": {"numerator": 100}}
    cfg = L.SPEC.from_envoy({
        "stat_prefix": "rl", "filter_enabled": pct, "filter_enforced": pct,
        "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "60s"},
        "always_consume_default_token_bucket": False,
        "max_dynamic_descriptors": 100,
        "rate_limits": [
            {"actions": [{"request_headers": {"header_name": "x-api-key", "descriptor_key": "key"}}]},
            {"actions": [{"metadata": {"descriptor_key": "sub", "metadata_key": {
                "key": "envoy.filters.http.jwt_authn", "path": [{"key": "p"}, {"key": "sub"}]}}}]},
            {"actions": [{"generic_key": {"descriptor_value": "all"}},
                         {"header_value_match": {"descriptor_value": "beta", "headers": [
                             {"name": "x-beta", "present_match": True}]}}]},
        ],
        "descriptors": [
            {"entries": [{"key": "key"}], "token_bucket": {"max_tokens": 1, "fill_interval": "60s"}},
            {"entries": [{"key": "sub", "value": ""}], "token_bucket": {"max_tokens": 1, "fill_interval": "60s"}},
            {"entries": [{"key": "generic_key", "value": "all"}, {"key": "header_match", "value": "beta"}],
             "token_bucket": {"max_tokens": 1, "fill_interval": "60s"}},
        ]}, "t")
    f = build_filter(L.SPEC, cfg, None, runtime(), RouteInfo())

    async def st(**kw):
        return (await f(rq(**kw), Next())).status

    # same order as the probe against envoy 1.40: a a b b c none none none none
    seq = [await st(headers={"x-api-key": k}) for k in ("a", "a", "b", "b", "c")]
    seq += [await st() for _ in range(4)]
    assert seq == [200, 429, 200, 429, 200, 200, 200, 429, 429]
    assert [await st(sub="alice"), await st(sub="alice"), await st(sub="bob")] == [200, 429, 200]
    assert [await st(headers={"x-beta": "1"}), await st(headers={"x-beta": "1"})] == [200, 429]


async def test_dynamic_descriptors_bounded(clock):
    cfg = L.SPEC.from_native({"descriptors": [{"by": {"header": "x-k"}, "max_tokens": 1,
                                          "fill_interval": "1m", "max_keys": 3}]}, "rl")
    f = build_filter(L.SPEC, cfg, None, runtime(), RouteInfo())
    for i in range(10):
        assert (await f(rq(headers={"x-k": str(i)}), Next())).status == 200
    assert len(f.state.descriptors[0].per_value) == 3


async def test_state_survives_rebuild_and_per_route_buckets(clock):
    rt = runtime()
    d = {"max_tokens": 1, "fill_interval": "1m"}
    f1 = build_filter(L.SPEC, L.SPEC.from_native(d, "rl"), None, rt, RouteInfo("a"))
    assert (await f1(rq(), Next())).status == 200
    # a reload with an identical config (new objects) keeps the bucket
    f2 = build_filter(L.SPEC, L.SPEC.from_native(dict(d), "rl"), None, rt, RouteInfo("a"))
    assert (await f2(rq(), Next())).status == 429
    # listener-wide config: the same bucket on another route
    f3 = build_filter(L.SPEC, L.SPEC.from_native(d, "rl"), None, rt, RouteInfo("b"))
    assert (await f3(rq(), Next())).status == 429
    # per-route configs get their own bucket per route
    pr = L.SPEC.per_route_from_native(d, "route.filters.local_ratelimit")
    fa = build_filter(L.SPEC, L.SPEC.from_native(d, "rl"), pr, rt, RouteInfo("a"))
    fb = build_filter(L.SPEC, L.SPEC.from_native(d, "rl"), pr, rt, RouteInfo("b"))
    assert (await fa(rq(), Next())).status == 200
    assert (await fb(rq(), Next())).status == 200
    assert (await fa(rq(), Next())).status == 429
    assert build_filter(L.SPEC, L.SPEC.from_native(d, "rl"), L.SPEC.per_route_from_native({"disabled": True}, "p"),
                   rt, RouteInfo("a")) is None


async def test_real_clock_refill():
    f = build_filter(L.SPEC, L.SPEC.from_native({"max_tokens": 1, "fill_interval": "0.1s"}, "rl"), None, runtime(), RouteInfo())
    assert (await f(rq(), Next())).status == 200
    assert (await f(rq(), Next())).status == 429
    import asyncio
    await asyncio.sleep(0.12)
    assert (await f(rq(), Next())).status == 200


@pytest.mark.parametrize("cfg,path", [
    ({"stat_prefix": "x", "token_bucket": {"max_tokens": 0, "fill_interval": "1s"}}, "t.token_bucket.max_tokens"),
    ({"stat_prefix": "x", "token_bucket": {"max_tokens": 1, "fill_interval": "1ms"}}, "t.token_bucket.fill_interval"),
    ({"token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}, "t.stat_prefix"),
    ({"stat_prefix": "x", "rate_limited_as_resource_exhausted": True},
     "t.rate_limited_as_resource_exhausted"),
    ({"stat_prefix": "x", "rate_limits": [{"actions": [{"source_cluster": {}}]}]},
     "t.rate_limits[0].actions[0].source_cluster"),
    ({"stat_prefix": "x", "enable_x_ratelimit_headers": "V2"}, "t.enable_x_ratelimit_headers"),
    ({"stat_prefix": "x", "filter_enabled": {"default_value": {"numerator": 1, "denominator": "HALF"}}},
     "t.filter_enabled.default_value.denominator"),
    ({"stat_prefix": "x", "bogus": True}, "t.bogus"),
])
def test_envoy_config_errors(cfg, path):
    with pytest.raises(ConfigError) as e:
        L.SPEC.from_envoy(cfg, "t")
    assert e.value.path == path


@pytest.mark.parametrize("cfg,path", [
    ({}, "n"),
    ({"tokens_per_fill": 1}, "n.tokens_per_fill"),
    ({"max_tokens": 1, "enforced": 150}, "n.enforced"),
    ({"descriptors": [{"by": {"header": "x", "remote_ip": True}, "max_tokens": 1}]}, "n.descriptors[0].by"),
    ({"descriptors": [{"by": {"header": "x"}}]}, "n.descriptors[0].max_tokens"),
    ({"max_tokens": 1, "unknown": 1}, "n.unknown"),
    ({"max_tokens": 1, "store": "main", "per_connection": True}, "n.per_connection"),
])
def test_native_config_errors(cfg, path):
    with pytest.raises(ConfigError) as e:
        L.SPEC.from_native(cfg, "n")
    assert e.value.path == path


async def test_per_connection_buckets(clock):
    """local_rate_limit_per_downstream_connection: each connection has its own bucket (the
    descriptors' too); the sidecar-wide bucket is not touched; a connection's buckets go with
    it; a request without a connection identity is known by its peer address."""
    cfg = L.SPEC.from_envoy({
        "stat_prefix": "x", "local_rate_limit_per_downstream_connection": True,
        "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "60s"},
        "filter_enabled": {"default_value": {"numerator": 100}},
        "filter_enforced": {"default_value": {"numerator": 100}}}, "t")
    assert cfg.per_connection
    rt = runtime()
    f = build_filter(L.SPEC, cfg, None, rt, RouteInfo())
    a, b = ConnectionId(), ConnectionId()

    def on(conn, ip="10.0.0.1"):
        r = rq(ip=ip)
        r.ctx.connection = conn
        return r

    assert [(await f(on(a), Next())).status for _ in range(3)] == [200, 200, 429]
    assert [(await f(on(b), Next())).status for _ in range(2)] == [200, 200]
    assert (await f(on(a), Next())).status == 429
    clock.t += 60
    assert (await f(on(a), Next())).status == 200                 # refilled
    # the sidecar-wide bucket of the same config was never used
    shared = rt.token_buckets().consume(f.state.scope, (), f.state.default.spec, clock.t)
    assert shared.remaining == 1
    # a connection's buckets go with it
    per = f.per_connection
    assert len(per._by_conn) == 2
    del a
    assert len(per._by_conn) == 1
    # no connection identity: the peer (address, port) names the connection
    assert [(await f(on(None, "10.9.9.9"), Next())).status for _ in range(3)] == [200, 200, 429]
    assert (await f(on(None, "10.9.9.8"), Next())).status == 200
