"""Active HTTP health checks against real upstreams: hosts failing checks leave the LB set and
come back after the healthy threshold; timeouts and thresholds; expected and retriable
statuses; interval jitter; checks never slow the data path."""

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from resilience_helpers import (
    clusters_json,
    envoy_config,
    fetch,
    hang,
    hdr,
    host_view,
    metric,
    prometheus,
    proxy,
    wait_for,
)

from control_plane_client.translate.cluster import health_check_from_envoy
from sidecar.config.errors import ConfigError
from sidecar.config.native.cluster import health_check_from_native
from sidecar.testing import Upstream, native_config


class Service:
    """An upstream with a /healthz whose answer the test controls: a status, or "hang"."""

    def __init__(self, name: str, health="ok"):
        self.name = name
        self.health = health          # "ok" | int status | "hang"
        self.checks: list[float] = []
        self.check_headers: list[dict] = []
        self.traffic = 0

    async def __call__(self, request):
        if request.path == "/healthz":
            self.checks.append(time.monotonic())
            self.check_headers.append(dict(request.headers))
            h = self.health
            if h == "hang":
                await hang(request)
                return web.Response(status=200)
            return web.Response(status=200 if h == "ok" else h, text="health")
        self.traffic += 1
        return web.Response(text=self.name)


async def spread(p, n: int) -> dict:
    seen: dict[str, int] = {}
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            _, body, _, _ = await fetch(s, p.url("/"))
            seen[body] = seen.get(body, 0) + 1
    return seen


def hc_native(**kw):
    d = {"path": "/healthz", "interval": "200ms", "timeout": "150ms", "healthy_threshold": 2,
         "unhealthy_threshold": 2}
    d.update(kw)
    return d


async def test_failing_host_leaves_and_returns_native_and_envoy():
    for fmt in ("native", "envoy"):
        a, b = Service("a"), Service("b", health=503)
        async with Upstream(a) as ua, Upstream(b) as ub:
            if fmt == "native":
                cfg = native_config(clusters={"svc": {"endpoints": [ua.address, ub.address],
                                                      "health_check": hc_native()}},
                                    routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
            else:
                cfg = envoy_config(clusters={"svc": {"endpoints": [ua.address, ub.address], "health_checks": [{
                    "timeout": "0.15s", "interval": "0.2s", "healthy_threshold": 2, "unhealthy_threshold": 2,
                    "no_traffic_interval": "0.2s", "http_health_check": {"path": "/healthz"}}]}},
                    routes=[{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}])
            async with proxy(cfg) as p:
                cs = p.app.clusters.get("svc")
                hb = cs.hosts[1]
                # a non-expected status fails the host at once (Envoy), whatever the threshold
                await wait_for(lambda hb=hb: not hb.hc_healthy, 2.0)
                assert await spread(p, 10) == {"a": 10}
                view = await clusters_json(p)
                hv = host_view(view, "svc", ub.address)
                assert hv["health_flags"] == "/failed_active_hc" and not hv["healthy"]
                assert hv["active_hc"] == "failure 503"
                # healthy again: back after healthy_threshold (2) passing checks
                b.health = "ok"
                n0 = len(b.checks)
                await wait_for(lambda hb=hb: hb.hc_healthy, 3.0)
                assert len(b.checks) - n0 >= 2
                seen = await spread(p, 10)
                assert seen.get("b", 0) >= 4, seen
                text = await prometheus(p)
                assert metric(text, "sidecar_upstream_health_check_total", cluster="svc", result="success") >= 2
                assert metric(text, "sidecar_upstream_health_check_total", cluster="svc", result="failure") >= 1
                assert metric(text, "sidecar_upstream_health_check_transitions_total", cluster="svc", to="healthy") == 1
                assert metric(text, "sidecar_upstream_endpoint_health_check_healthy", cluster="svc",
                              endpoint=ub.address) == 1
            # the check request itself: Envoy's user agent, the cluster name as Host
            assert hdr(b.check_headers[0], "user-agent") == "Envoy/HC"
            assert hdr(b.check_headers[0], "host") == "svc"


async def test_timeouts_count_toward_the_unhealthy_threshold():
    a, b = Service("a"), Service("b")
    async with Upstream(a) as ua, Upstream(b) as ub:
        cfg = native_config(clusters={"svc": {"endpoints": [ua.address, ub.address],
                                              "health_check": hc_native(unhealthy_threshold=3, timeout="100ms")}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg) as p:
            hb = p.app.clusters.get("svc").hosts[1]
            await wait_for(lambda: len(b.checks) >= 2, 2.0)
            assert hb.hc_healthy
            b.health = "hang"
            n0 = len(b.checks)
            await wait_for(lambda: not hb.hc_healthy, 4.0)
            assert len(b.checks) - n0 >= 3           # three timed-out checks, not one
            assert hb.last_hc == "timeout"
            text = await prometheus(p)
            assert metric(text, "sidecar_upstream_health_check_total", cluster="svc", result="timeout") >= 3
            # the data path is not slowed by hung health checks
            async with aiohttp.ClientSession() as s:
                for _ in range(5):
                    status, body, _, elapsed = await fetch(s, p.url("/"))
                    assert (status, body) == (200, "a") and elapsed < 0.3


async def test_connection_failure_is_a_network_failure():
    a = Service("a")
    async with Upstream(a) as ua:
        b = Upstream(Service("b"))
        await b.start()
        cfg = native_config(clusters={"svc": {"endpoints": [ua.address, b.address],
                                              "health_check": hc_native(unhealthy_threshold=2)}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg) as p:
            hb = p.app.clusters.get("svc").hosts[1]
            await wait_for(lambda: a.checks, 2.0)
            await asyncio.sleep(0.1)
            assert hb.hc_healthy
            await b.stop()
            await wait_for(lambda: not hb.hc_healthy, 3.0)
            assert hb.last_hc == "network_failure"
            text = await prometheus(p)
            assert metric(text, "sidecar_upstream_health_check_total", cluster="svc", result="network_failure") >= 2


async def test_retriable_statuses_use_the_threshold_and_ranges_are_expected():
    a, b = Service("a", health=204), Service("b")
    async with Upstream(a) as ua, Upstream(b) as ub:
        cfg = native_config(clusters={"svc": {"endpoints": [ua.address, ub.address], "health_check": hc_native(
            unhealthy_threshold=3, expected_statuses=[{"start": 200, "end": 300}], retriable_statuses=[503])}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg) as p:
            ha, hb = p.app.clusters.get("svc").hosts
            await wait_for(lambda: len(b.checks) >= 1 and len(a.checks) >= 2, 2.0)
            await asyncio.sleep(0.05)
            assert ha.hc_healthy            # 204 is in [200, 300)
            b.health = 503
            n0 = len(b.checks)
            await wait_for(lambda: not hb.hc_healthy, 3.0)
            assert len(b.checks) - n0 >= 3


async def test_interval_has_jitter():
    a = Service("a")
    async with Upstream(a) as ua:
        cfg = native_config(clusters={"svc": {"endpoints": [ua.address],
                                              "health_check": hc_native(interval="100ms", jitter="100ms")}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg):
            await wait_for(lambda: len(a.checks) >= 12, 5.0)
    gaps = [y - x for x, y in zip(a.checks, a.checks[1:], strict=False)]
    assert all(0.09 <= g < 0.35 for g in gaps), gaps
    assert max(gaps) - min(gaps) > 0.02, gaps


async def test_removing_health_checks_restores_hosts():
    a, b = Service("a"), Service("b", health=500)
    async with Upstream(a) as ua, Upstream(b) as ub:
        cfg = native_config(clusters={"svc": {"endpoints": [ua.address, ub.address], "health_check": hc_native()}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg) as p:
            hb = p.app.clusters.get("svc").hosts[1]
            await wait_for(lambda hb=hb: not hb.hc_healthy, 2.0)
            del cfg["clusters"][0]["health_check"]
            await p.apply(cfg)
            assert hb.hc_healthy
            n = len(b.checks)
            await asyncio.sleep(0.4)
            assert len(b.checks) == n        # checking stopped
            assert "b" in await spread(p, 6)


def test_health_check_config_both_formats():
    n = health_check_from_native({"path": "/ready", "interval": "2s", "jitter": "500ms", "timeout": "1s",
                                  "healthy_threshold": 2, "unhealthy_threshold": 4,
                                  "expected_statuses": [200, {"start": 300, "end": 400}]}, "hc")
    assert (n.path, n.interval_s, n.interval_jitter_s, n.timeout_s) == ("/ready", 2.0, 0.5, 1.0)
    assert n.status_ok(200) and n.status_ok(302) and not n.status_ok(201) and not n.status_ok(400)
    assert n.no_traffic_interval_s is None
    e = health_check_from_envoy({"timeout": "1s", "interval": "5s", "healthy_threshold": 1,
                                 "unhealthy_threshold": 3, "interval_jitter_percent": 10,
                                 "unhealthy_interval": "10s",
                                 "http_health_check": {"path": "/hc", "expected_statuses": [{"start": 200, "end": 204}]}},
                                "hc")
    assert e.no_traffic_interval_s == 60.0 and e.unhealthy_interval_s == 10.0
    assert e.status_ok(203) and not e.status_ok(204)


@pytest.mark.parametrize("fn,d,where", [
    (health_check_from_envoy, {"timeout": "1s", "interval": "1s", "healthy_threshold": 1, "unhealthy_threshold": 1,
                               "grpc_health_check": {"initial_metadata": [{"key": "k", "value": "v"}]}},
     "hc.grpc_health_check.initial_metadata"),
    (health_check_from_envoy, {"timeout": "1s", "interval": "1s", "healthy_threshold": 1, "unhealthy_threshold": 1,
                               "tcp_health_check": {"send": {"text": "zz"}}}, "hc.tcp_health_check.send.text"),
    (health_check_from_envoy, {"timeout": "1s", "interval": "1s", "healthy_threshold": 1, "unhealthy_threshold": 1},
     "hc"),
    (health_check_from_envoy, {"timeout": "1s", "healthy_threshold": 1, "unhealthy_threshold": 1,
                               "http_health_check": {"path": "/"}}, "hc.interval"),
    (health_check_from_envoy, {"timeout": "1s", "interval": "1s", "healthy_threshold": 1, "unhealthy_threshold": 1,
                               "http_health_check": {"path": "/", "codec_client_type": "HTTP2"}},
     "hc.http_health_check.codec_client_type"),
    (health_check_from_native, {"interval": "0s"}, "hc.interval"),
    (health_check_from_native, {"expected_statuses": [{"start": 300, "end": 200}]}, "hc.expected_statuses[0]"),
    (health_check_from_native, {"expected_statuses": [99]}, "hc.expected_statuses[0]"),
    (health_check_from_native, {"method": "HEAD"}, "hc"),
])
def test_bad_health_check_config_is_refused(fn, d, where):
    with pytest.raises(ConfigError) as e:
        fn(d, "hc")
    assert str(e.value).startswith(where), str(e.value)
