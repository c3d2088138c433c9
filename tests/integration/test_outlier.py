"""Outlier detection against upstreams that fail for a while: ejection, return, the ejection
time multiplier, max_ejection_percent, panic, gateway/local-origin/success-rate detection."""

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from resilience_helpers import (
    RawServer,
    clusters_json,
    envoy_config,
    fetch,
    host_view,
    metric,
    prometheus,
    proxy,
    wait_for,
)

from sidecar.cluster.outlier import success_rate_threshold
from sidecar.config.cluster import outlier_detection_from_wire
from sidecar.config.errors import ConfigError
from sidecar.testing import Upstream, native_config


class Toggle:
    """An upstream that answers ``status`` while ``failing``, 200 otherwise."""

    def __init__(self, name: str, failing: bool = False, status: int = 503):
        self.name = name
        self.failing = failing
        self.status = status
        self.hits = 0

    async def __call__(self, request):
        self.hits += 1
        if self.failing:
            return web.Response(status=self.status, text=f"{self.name} failing")
        return web.Response(text=self.name)


async def hosts_hit(p, n: int) -> dict:
    seen: dict[str, int] = {}
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            status, body, _, _ = await fetch(s, p.url("/"))
            seen[body] = seen.get(body, 0) + 1
    return seen


def od_native(**kw):
    base = {"consecutive_5xx": 3, "interval": "10s", "base_ejection_time": "1s", "max_ejection_percent": 50}
    base.update(kw)
    return base


async def test_consecutive_5xx_ejects_then_returns_native_and_envoy():
    for fmt in ("native", "envoy"):
        bad, good = Toggle("bad", failing=True), Toggle("good")
        async with Upstream(bad) as ub, Upstream(good) as ug:
            if fmt == "native":
                cfg = native_config(clusters={"svc": {"endpoints": [ub.address, ug.address],
                                                      "outlier_detection": od_native()}},
                                    routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
            else:
                cfg = envoy_config(clusters={"svc": {"endpoints": [ub.address, ug.address], "outlier_detection": {
                    "consecutive_5xx": 3, "interval": "10s", "base_ejection_time": "1s", "max_ejection_percent": 50}}},
                    routes=[{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}])
            async with proxy(cfg) as p:
                seen = await hosts_hit(p, 10)        # round robin: bad fails 3 times -> ejected
                assert bad.hits == 3, (fmt, seen)
                view = await clusters_json(p)
                h = host_view(view, "svc", ub.address)
                assert h["ejected"] and h["ejections"] == 1 and not h["healthy"]
                assert h["health_flags"] == "/failed_outlier_check"
                text = await prometheus(p)
                assert metric(text, "sidecar_upstream_outlier_ejections_enforced_total", cluster="svc") == 1
                assert metric(text, "sidecar_upstream_outlier_ejections_by_reason_total", cluster="svc",
                              reason="consecutive_5xx") == 1
                assert metric(text, "sidecar_upstream_outlier_ejections_active", cluster="svc") == 1
                assert (await hosts_hit(p, 10)) == {"good": 10}
                bad.failing = False
                t = time.monotonic()
                await wait_for(lambda: not p.app.clusters.get("svc").hosts[0].ejected_until, 3.0)
                assert 0.6 < time.monotonic() - t < 1.6      # back after base_ejection_time
                seen = await hosts_hit(p, 10)
                assert seen.get("bad", 0) >= 4, seen         # back in the load-balancing set
                text = await prometheus(p)
                assert metric(text, "sidecar_upstream_outlier_unejections_total", cluster="svc") == 1
                assert metric(text, "sidecar_upstream_outlier_ejections_active", cluster="svc") == 0


async def test_ejection_time_grows_with_consecutive_ejections():
    bad, good = Toggle("bad", failing=True), Toggle("good")
    async with Upstream(bad) as ub, Upstream(good) as ug:
        cfg = native_config(clusters={"svc": {"endpoints": [ub.address, ug.address], "outlier_detection": od_native(
            consecutive_5xx=2, base_ejection_time="400ms")}}, routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg) as p:
            host = p.app.clusters.get("svc").hosts[0]
            durations = []
            for _ in range(3):
                await wait_for(lambda: not host.ejected_until, 5.0)
                async with aiohttp.ClientSession() as s:
                    while not host.ejected_until:
                        await fetch(s, p.url("/"))
                durations.append(host.ejected_until - time.monotonic())
            assert host.ejections == 3
    # base x 1, x 2, x 3 (the interval, 10 s, never ran to bring the multiplier down)
    assert durations[0] == pytest.approx(0.4, abs=0.15)
    assert durations[1] == pytest.approx(0.8, abs=0.15)
    assert durations[2] == pytest.approx(1.2, abs=0.15)


async def test_max_ejection_percent_limits_ejections_and_panic_keeps_traffic_flowing():
    ups = [Toggle(f"u{i}", failing=True) for i in range(4)]
    servers = [Upstream(u) for u in ups]
    for s in servers:
        await s.start()
    try:
        cfg = native_config(clusters={"svc": {"endpoints": [s.address for s in servers], "outlier_detection": od_native(
            consecutive_5xx=2, max_ejection_percent=25, base_ejection_time="30s")}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg) as p:
            await hosts_hit(p, 24)
            cs = p.app.clusters.get("svc")
            assert sum(1 for h in cs.hosts if h.ejected) == 1
            text = await prometheus(p)
            assert metric(text, "sidecar_upstream_outlier_ejections_overflow_total", cluster="svc") >= 1
        # with every host allowed out, all get ejected: the panic threshold still sends traffic
        cfg["clusters"][0]["outlier_detection"]["max_ejection_percent"] = 100
        async with proxy(cfg) as p:
            await hosts_hit(p, 24)
            cs = p.app.clusters.get("svc")
            assert all(h.ejected for h in cs.hosts)
            before = sum(u.hits for u in ups)
            seen = await hosts_hit(p, 8)
            assert sum(u.hits for u in ups) == before + 8        # upstream answers, not 503 UH
            assert all(k.endswith("failing") for k in seen)
    finally:
        for s in servers:
            await s.stop()


async def test_gateway_failures_eject_only_when_enforced():
    async def run(enforcing):
        bad, good = Toggle("bad", failing=True, status=502), Toggle("good")
        async with Upstream(bad) as ub, Upstream(good) as ug:
            cfg = native_config(clusters={"svc": {"endpoints": [ub.address, ug.address], "outlier_detection": {
                "consecutive_5xx": 100, "consecutive_gateway_failure": 2,
                "enforcing_consecutive_gateway_failure": enforcing, "interval": "10s",
                "base_ejection_time": "5s", "max_ejection_percent": 50}}},
                routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
            async with proxy(cfg) as p:
                await hosts_hit(p, 8)
                text = await prometheus(p)
                return bad.hits, text
    hits, text = await run(100)
    assert hits == 2
    assert metric(text, "sidecar_upstream_outlier_ejections_by_reason_total", cluster="svc",
                  reason="consecutive_gateway_failure") == 1
    hits, text = await run(0)          # Envoy's default: detected, not enforced
    assert hits == 4
    assert metric(text, "sidecar_upstream_outlier_ejections_detected_total", cluster="svc",
                  reason="consecutive_gateway_failure") >= 1
    assert metric(text, "sidecar_upstream_outlier_ejections_enforced_total", cluster="svc") == 0


async def test_local_origin_failures_resets_eject_a_host():
    for split in (True, False):
        async with RawServer(lambda n: "reset") as bad, Upstream() as good:
            od = {"interval": "10s", "base_ejection_time": "5s", "max_ejection_percent": 50}
            if split:
                od.update(split_external_local_origin_errors=True, consecutive_local_origin_failure=2,
                          consecutive_5xx=100)
            else:
                od.update(consecutive_5xx=2)     # resets count as 503s
            cfg = native_config(clusters={"svc": {"endpoints": [bad.address, good.address], "outlier_detection": od}},
                                routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
            async with proxy(cfg) as p:
                async with aiohttp.ClientSession() as s:
                    statuses = [(await fetch(s, p.url("/")))[0] for _ in range(10)]
                text = await prometheus(p)
            reason = "consecutive_local_origin_failure" if split else "consecutive_5xx"
            assert bad.requests == 2, (split, statuses)
            assert statuses.count(503) == 2
            assert metric(text, "sidecar_upstream_outlier_ejections_by_reason_total", cluster="svc", reason=reason) == 1


async def test_success_rate_ejects_the_outlier():
    ups = [Toggle(f"u{i}") for i in range(4)] + [Toggle("bad", failing=True)]
    servers = [Upstream(u) for u in ups]
    for s in servers:
        await s.start()
    try:
        cfg = native_config(clusters={"svc": {"endpoints": [s.address for s in servers], "outlier_detection": {
            "consecutive_5xx": 0, "consecutive_gateway_failure": 0, "interval": "500ms",
            "base_ejection_time": "30s", "max_ejection_percent": 50, "success_rate_minimum_hosts": 5,
            "success_rate_request_volume": 10, "success_rate_stdev_factor": 1000}}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg) as p:
            cs = p.app.clusters.get("svc")
            bad_host = cs.hosts[4]
            async with aiohttp.ClientSession() as s:
                end = time.monotonic() + 5
                while not bad_host.ejected and time.monotonic() < end:
                    await asyncio.gather(*(fetch(s, p.url("/")) for _ in range(25)))
            assert bad_host.ejected
            assert sum(1 for h in cs.hosts if h.ejected) == 1
            text = await prometheus(p)
            assert metric(text, "sidecar_upstream_outlier_ejections_by_reason_total", cluster="svc",
                          reason="success_rate") == 1
    finally:
        for s in servers:
            await s.stop()


async def test_turning_detection_off_returns_ejected_hosts():
    bad, good = Toggle("bad", failing=True), Toggle("good")
    async with Upstream(bad) as ub, Upstream(good) as ug:
        cfg = native_config(clusters={"svc": {"endpoints": [ub.address, ug.address],
                                              "outlier_detection": od_native(base_ejection_time="60s")}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg) as p:
            await hosts_hit(p, 8)
            cs = p.app.clusters.get("svc")
            assert cs.hosts[0].ejected
            del cfg["clusters"][0]["outlier_detection"]
            await p.apply(cfg)
            assert not cs.hosts[0].ejected
            assert "bad failing" in await hosts_hit(p, 4)


def test_success_rate_threshold_math():
    assert success_rate_threshold([1.0, 1.0, 1.0, 1.0, 0.0], 1.0) == pytest.approx(0.4)
    assert success_rate_threshold([0.9] * 5, 1.9) == pytest.approx(0.9)


def test_outlier_config_errors():
    with pytest.raises(ConfigError) as e:
        outlier_detection_from_wire({"interval": "0s"}, "od")
    assert str(e.value).startswith("od.interval")
    with pytest.raises(ConfigError) as e:
        outlier_detection_from_wire({"max_ejection_percent": 120}, "od")
    assert str(e.value).startswith("od.max_ejection_percent")
    with pytest.raises(ConfigError):
        outlier_detection_from_wire({"failure_percentage_threshold": 5}, "od")
    od = outlier_detection_from_wire({"success_rate_stdev_factor": 1900, "consecutive_5xx": {"value": 7}}, "od")
    assert od.success_rate_stdev_factor == 1.9 and od.consecutive_5xx == 7
