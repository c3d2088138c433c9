"""Traffic control: peak-EWMA and ring-hash balancing, weighted (canary) splits, version and
debug routing. Unit tests drive real Cluster/EndpointState objects; end-to-end tests go
through the real proxy to real upstreams on 127.0.0.1, in both config formats."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from sidecar.cluster.balancers.peak_ewma import PeakEwmaBalancer, default_penalty
from sidecar.cluster.balancers.ring_hash import RingHashBalancer, mix32
from sidecar.cluster.cluster import Cluster as ClusterVersion
from sidecar.cluster.manager import ClusterManager
from sidecar.config.cluster import Cluster, Endpoint, LbConfig
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import StatsCache
from sidecar.testing import Upstream, native_config, running_proxy
from tests.paths import REPO

T_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
         "HttpConnectionManager")
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
T_PEAK_EWMA = "type.googleapis.com/envoy.extensions.load_balancing_policies.peak_ewma.v3alpha.PeakEwma"


# ---- helpers -------------------------------------------------------------------------------

class Ctx:
    def __init__(self, hash_key=None):
        self.hash_key = hash_key
        self.tried_hosts = []


def build(config: Cluster) -> ClusterVersion:
    """A cluster version built the way the manager builds one (no event loop needed)."""
    cm = ClusterManager(StatsCache(Metrics(enabled=False)))
    cm.apply((config,))
    c = cm.get(config.name)
    assert c is not None
    return c


def make_cluster(n: int, **lb) -> ClusterVersion:
    eps = tuple(Endpoint("127.0.0.1", 20000 + i) for i in range(n))
    return build(Cluster(name="c", endpoints=eps, lb=LbConfig(**lb)))


def sa(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def envoy_cluster(name: str, ups, **kw) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": sa(u.port)}} for u in ups]}]}, **kw}


def envoy_bootstrap(routes: list, clusters: list, http_filters: list = ()) -> dict:
    hcm = {"@type": T_HCM, "stat_prefix": "in",
           "route_config": {"name": "r", "virtual_hosts": [{"name": "vh", "domains": ["*"],
                                                            "routes": routes}]},
           "http_filters": list(http_filters) + [{"name": "envoy.filters.http.router",
                                                  "typed_config": {"@type": T_ROUTER}}]}
    return {"admin": {"address": sa(0)},
            "static_resources": {"listeners": [{"name": "l", "address": sa(0), "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                              "typed_config": hcm}]}]}],
                "clusters": clusters}}


def named(name: str, delay: float = 0.0):
    """An upstream handler answering its name after ``delay`` (mutable via .delay)."""
    class H:
        def __init__(self):
            self.delay = delay

        async def __call__(self, request):
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(text=name)
    return H()


async def get_many(session, url, n, concurrency=50, headers=None):
    out = []

    async def one():
        async with session.get(url, headers=headers) as r:
            out.append((r.status, await r.text()))
    for i in range(0, n, concurrency):
        await asyncio.gather(*(one() for _ in range(min(concurrency, n - i))))
    return out


# ---- peak EWMA (unit) ------------------------------------------------------------------------

def test_make_balancer_wiring():
    assert isinstance(make_cluster(3, policy="peak_ewma").lb, PeakEwmaBalancer)
    assert isinstance(make_cluster(3, policy="ring_hash").lb, RingHashBalancer)
    assert isinstance(make_cluster(3, policy="maglev").lb, RingHashBalancer)


def test_default_penalty():
    assert default_penalty(LbConfig()) == 1.0
    assert default_penalty(LbConfig(ewma_default_rtt_s=0.5)) == 5.0
    assert default_penalty(LbConfig(ewma_failure_penalty_s=0.25)) == 0.25


def test_ewma_new_endpoint_starts_at_default_rtt():
    cs = make_cluster(2, policy="peak_ewma", ewma_default_rtt_s=0.05)
    lb = cs.lb
    a, b = cs.hosts
    now = time.monotonic() + 100        # no decay for endpoints without samples
    assert lb.estimate(a, now) == pytest.approx(0.05)
    for _ in range(3):
        a.begin()                        # requests in flight (any worker's)
    assert lb.cost(a, now) == pytest.approx(0.2)
    cs.record(b, 200, 0.010, None)
    assert lb.estimate(b, time.monotonic()) == pytest.approx(0.010, rel=0.05)


def test_ewma_peak_then_decay():
    cs = make_cluster(1, policy="peak_ewma", ewma_decay_s=1.0)
    h = cs.hosts[0]
    lb = cs.lb
    cs.record(h, 200, 0.010, None)
    cs.record(h, 200, 0.200, None)          # a peak replaces the estimate at once
    assert h.ewma == pytest.approx(0.200)
    cs.record(h, 200, 0.010, None)          # a fast sample right after barely moves it
    assert h.ewma > 0.19
    later = h.ewma_stamp + 1.0              # one decay time later: e^-1 of it
    assert lb.estimate(h, later) == pytest.approx(h.ewma * 0.3679, rel=0.01)


def test_ewma_failure_penalty_fast_5xx_does_not_attract():
    cs = make_cluster(2, policy="peak_ewma", ewma_failure_penalty_s=0.5)
    bad, good = cs.hosts
    cs.record(bad, 503, 0.0001, None)
    cs.record(good, 200, 0.020, None)
    assert bad.ewma == pytest.approx(0.5)
    picks = Counter(cs.pick(Ctx()) for _ in range(200))
    assert picks[bad] == 0 and picks[good] == 200
    cs.record(good, None, 0.001, "connect_failure")
    assert good.ewma >= 0.5


def test_ewma_steers_to_fast_host_by_active_requests_and_latency():
    cs = make_cluster(3, policy="peak_ewma", ewma_decay_s=10.0)
    slow, f1, f2 = cs.hosts
    for _ in range(3):
        cs.record(slow, 200, 0.100, None)
        cs.record(f1, 200, 0.010, None)
        cs.record(f2, 200, 0.010, None)
    picks = Counter(cs.pick(Ctx()) for _ in range(300))
    assert picks[slow] == 0
    # loaded fast hosts: 15 in flight each costs 0.16 > slow's 0.1 -> slow gets picked
    for _ in range(15):
        f1.begin()
        f2.begin()
    picks = Counter(cs.pick(Ctx()) for _ in range(300))
    assert picks[slow] > 100


def test_ewma_exclude_and_choice_count():
    cs = make_cluster(4, policy="peak_ewma", choice_count=4)
    hosts = cs.hosts
    for i, h in enumerate(hosts):
        cs.record(h, 200, 0.001 * (i + 1), None)
    assert cs.lb.pick(Ctx(), ()) is hosts[0]            # all 4 compared: always the best
    assert cs.lb.pick(Ctx(), [hosts[0]]) is hosts[1]
    assert cs.lb.pick(Ctx(), list(hosts)) in hosts       # all tried: still answers
    single = make_cluster(1, policy="peak_ewma")
    assert single.pick(Ctx()) is single.hosts[0]
    empty = make_cluster(0, policy="peak_ewma")
    assert empty.pick(Ctx()) is None


def test_ewma_weights_scale_cost():
    eps = (Endpoint("127.0.0.1", 1, weight=1), Endpoint("127.0.0.1", 2, weight=4))
    cs = build(Cluster(name="w", endpoints=eps, lb=LbConfig(policy="peak_ewma")))
    a, b = cs.hosts
    cs.record(a, 200, 0.010, None)
    cs.record(b, 200, 0.020, None)           # twice as slow, four times the weight
    assert Counter(cs.pick(Ctx()) for _ in range(50))[b] == 50


# ---- ring hash (unit) ------------------------------------------------------------------------

def test_ring_hash_sticky_and_spread():
    cs = make_cluster(4, policy="ring_hash")
    owners = {}
    for _k in range(2000):
        key = random.getrandbits(32)
        h = cs.pick(Ctx(key))
        assert cs.pick(Ctx(key)) is h                    # same key, same host
        owners[key] = h
    share = Counter(owners.values())
    assert len(share) == 4
    assert min(share.values()) > 2000 / 4 * 0.6          # reasonably even

    # remove one host: only its keys move
    gone = cs.hosts[0]
    cs.lb.rebuild([h for h in cs.hosts if h is not gone])
    moved = sum(1 for k, h in owners.items() if h is not gone and cs.pick(Ctx(k)) is not h)
    assert moved == 0
    assert all(cs.pick(Ctx(k)) is not gone for k in owners)


def test_ring_hash_same_ring_everywhere_and_weights():
    a = make_cluster(3, policy="ring_hash")
    b = make_cluster(3, policy="ring_hash")
    for k in range(200):
        assert a.pick(Ctx(k)).address == b.pick(Ctx(k)).address
    eps = (Endpoint("127.0.0.1", 1, weight=1), Endpoint("127.0.0.1", 2, weight=3))
    cs = build(Cluster(name="w", endpoints=eps, lb=LbConfig(policy="ring_hash")))
    share = Counter(cs.pick(Ctx(random.getrandbits(32))).endpoint.port for _ in range(4000))
    assert 0.65 < share[2] / 4000 < 0.85


def test_ring_hash_no_key_random_and_retry_skips_tried():
    cs = make_cluster(3, policy="ring_hash")
    assert len({cs.pick(Ctx(None)) for _ in range(200)}) == 3
    first = cs.lb.pick(Ctx(12345), ())
    second = cs.lb.pick(Ctx(12345), [first])
    assert second is not first
    third = cs.lb.pick(Ctx(12345), [first, second])
    assert third not in (first, second)
    assert mix32(1) != mix32(2)


# ---- weighted split, version and debug routing (end to end) ----------------------------------

async def test_weighted_split_90_10_over_1000_requests():
    async with Upstream(named("v1")) as v1, Upstream(named("v2")) as v2:
        cfg = native_config(clusters={"v1": [v1.address], "v2": [v2.address]},
                            routes=[{"match": {"prefix": "/"}, "weighted": {"v1": 90, "v2": 10}}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            res = await get_many(s, p.url("/api"), 1000)
    assert all(st == 200 for st, _ in res)
    n2 = sum(1 for _, body in res if body == "v2")
    # binomial(1000, 0.1): mean 100, sd 9.5; +-4.5 sd
    assert 57 <= n2 <= 143, n2
    assert len(v1.requests) + len(v2.requests) == 1000


async def test_weighted_split_is_stable_per_request_id():
    async with Upstream(named("v1")) as v1, Upstream(named("v2")) as v2:
        cfg = native_config(clusters={"v1": [v1.address], "v2": [v2.address]},
                            routes=[{"match": {"prefix": "/"}, "weighted": {"v1": 50, "v2": 50}}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            for rid in ("a", "b", "c", "d"):
                seen = set()
                for _ in range(5):
                    async with s.get(p.url("/"), headers={"x-request-id": rid}) as r:
                        seen.add(await r.text())
                assert len(seen) == 1


async def test_version_and_debug_routing_native():
    async with Upstream(named("v1")) as v1, Upstream(named("v2")) as v2, \
            Upstream(named("debug")) as dbg:
        cfg = native_config(
            clusters={"v1": [v1.address], "v2": [v2.address], "debug": [dbg.address]},
            routes=[
                {"name": "debug", "match": {"prefix": "/", "headers": {"x-debug": "1"}}, "cluster": "debug"},
                {"name": "v2-header", "match": {"prefix": "/", "headers": {"x-version": "v2"}}, "cluster": "v2"},
                {"name": "v2-cookie", "match": {"prefix": "/", "cookies": {"version": "v2"}}, "cluster": "v2"},
                {"name": "default", "match": {"prefix": "/"}, "cluster": "v1"},
            ])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            async def who(**headers):
                async with s.get(p.url("/x"), headers=headers) as r:
                    return await r.text()
            assert await who() == "v1"
            assert await who(**{"x-version": "v2"}) == "v2"
            assert await who(**{"x-version": "v3"}) == "v1"
            assert await who(cookie="session=1; version=v2") == "v2"
            assert await who(cookie="version=v1") == "v1"
            assert await who(**{"x-debug": "1", "x-version": "v2"}) == "debug"


async def test_weighted_and_version_routing_envoy_format():
    async with Upstream(named("v1")) as v1, Upstream(named("v2")) as v2:
        routes = [
            {"match": {"prefix": "/", "headers": [{"name": "x-version",
                                                   "string_match": {"exact": "v2"}}]},
             "route": {"cluster": "v2"}},
            {"match": {"prefix": "/"},
             "route": {"weighted_clusters": {"clusters": [{"name": "v1", "weight": 80},
                                                          {"name": "v2", "weight": 20}]}}},
        ]
        cfg = envoy_bootstrap(routes, [envoy_cluster("v1", [v1]), envoy_cluster("v2", [v2])])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            async with s.get(p.url("/"), headers={"x-version": "v2"}) as r:
                assert await r.text() == "v2"
            res = await get_many(s, p.url("/"), 500)
    n2 = sum(1 for _, b in res if b == "v2")
    assert 60 <= n2 <= 140, n2       # binomial(500, 0.2): mean 100, sd 8.9


# ---- ring hash (end to end) ------------------------------------------------------------------

async def test_ring_hash_sticky_sessions_native_and_envoy():
    async with Upstream(named("a")) as a, Upstream(named("b")) as b, Upstream(named("c")) as c:
        ups = [a, b, c]
        native = native_config(
            clusters={"svc": {"endpoints": [u.address for u in ups], "lb": "ring_hash"}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc", "hash": [{"header": "x-user"}]}])
        envoy = envoy_bootstrap(
            [{"match": {"prefix": "/"}, "route": {"cluster": "svc", "hash_policy": [
                {"header": {"header_name": "x-user"}}]}}],
            [envoy_cluster("svc", ups, lb_policy="RING_HASH")])
        results = []
        for cfg in (native, envoy):
            async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
                owner = {}
                for user in range(30):
                    seen = set()
                    for _ in range(4):
                        async with s.get(p.url("/"), headers={"x-user": f"user-{user}"}) as r:
                            seen.add(await r.text())
                    assert len(seen) == 1, (user, seen)
                    owner[user] = seen.pop()
                assert len(set(owner.values())) >= 2
                results.append(owner)
        assert results[0] == results[1]       # same ring from both config formats


async def test_ring_hash_cookie_policy():
    async with Upstream(named("a")) as a, Upstream(named("b")) as b:
        cfg = native_config(
            clusters={"svc": {"endpoints": [a.address, b.address], "lb": "ring_hash"}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc", "hash": [{"cookie": "sid"}]}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            for sid in ("x1", "x2", "x3"):
                seen = set()
                for _ in range(4):
                    async with s.get(p.url("/"), headers={"cookie": f"sid={sid}"}) as r:
                        seen.add(await r.text())
                assert len(seen) == 1


# ---- peak EWMA (end to end) ------------------------------------------------------------------

async def test_ewma_steers_away_from_slow_endpoint_and_back():
    slow_h = named("slow")
    async with Upstream(slow_h) as slow, Upstream(named("f1")) as f1, Upstream(named("f2")) as f2:
        cfg = native_config(
            clusters={"svc": {"endpoints": [slow.address, f1.address, f2.address],
                              "lb": "peak_ewma", "ewma": {"decay": "300ms", "default_rtt": "0.1ms"}}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            async def seq(n):
                c = Counter()
                for _ in range(n):
                    async with s.get(p.url("/")) as r:
                        c[await r.text()] += 1
                return c
            warm = await seq(60)
            assert min(warm[n] for n in ("slow", "f1", "f2")) >= 1, warm   # all tried
            slow_h.delay = 0.050              # one endpoint becomes 10x+ slower
            after = await seq(150)
            # one slow answer is enough to steer away; then only rare decayed-estimate probes
            assert after["slow"] <= 12, after
            assert after["f1"] + after["f2"] >= 138

            async def share_of_slow(seconds, measure_last):
                t_end = time.monotonic() + seconds
                c = Counter()
                while time.monotonic() < t_end:
                    batch = await seq(20)
                    if time.monotonic() > t_end - measure_last:
                        c.update(batch)
                return c["slow"] / max(1, sum(c.values())), c

            avoided, c1 = await share_of_slow(1.0, 0.8)
            # only decayed-estimate probes while slow: a handful at most
            assert c1["slow"] <= max(4, 0.03 * sum(c1.values())), c1
            # recovery: the slow endpoint becomes fast again and wins traffic back once its
            # estimate has decayed (decay 300 ms: about 1.2 s from 50 ms down to ~1 ms)
            slow_h.delay = 0.0
            recovered, c2 = await share_of_slow(3.5, 1.5)
            assert c2["slow"] >= 10 and recovered >= 0.04, (c1, c2)


async def test_ewma_envoy_load_balancing_policy():
    async with Upstream(named("a")) as a:
        cl = envoy_cluster("svc", [a], load_balancing_policy={"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.peak_ewma",
            "typed_config": {"@type": T_PEAK_EWMA, "decay_time": "2s", "default_rtt": "0.005s"}}}]})
        cfg = envoy_bootstrap([{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}], [cl])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            cs = p.app.clusters.get("svc")
            assert isinstance(cs.lb, PeakEwmaBalancer)
            assert cs.lb.decay == 2.0 and cs.lb.default_rtt == 0.005
            async with s.get(p.url("/")) as r:
                assert r.status == 200
            assert cs.hosts[0].rq_total == 1


# ---- the runnable demo -----------------------------------------------------------------------

def test_canary_example_runs_and_checks_itself():
    """examples/canary/run.py: services + a real sidecar process + a scenario that verifies
    the split, the canary-only delays, pinned/debug routing, aborts, shadows and EWMA."""
    import subprocess
    import sys
    root = REPO
    r = subprocess.run([sys.executable, str(root / "examples" / "canary" / "run.py"),
                        "--free-ports", "--requests", "300"],
                       capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    assert "shadow copies" in r.stdout
