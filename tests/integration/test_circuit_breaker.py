"""Circuit breakers against a slow upstream with concurrency: overflow answers 503 UO at once,
pending requests wait (without blocking the loop) for a released connection, nothing is lost."""

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from resilience_helpers import clusters_json, envoy_config, fetch, metric, prometheus, proxy

from control_plane_client.translate.cluster import circuit_breakers_from_envoy
from sidecar.config.errors import ConfigError
from sidecar.config.native.cluster import circuit_breakers_from_native
from sidecar.testing import Upstream, native_config


class Slow:
    """An upstream handler that answers after ``delay`` and tracks concurrency."""

    def __init__(self, delay: float):
        self.delay = delay
        self.inflight = 0
        self.peak = 0
        self.served = 0
        self.peers = set()

    async def __call__(self, request):
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        self.peers.add(request.transport.get_extra_info("peername"))
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.inflight -= 1
        self.served += 1
        return web.Response(text="slow ok")


async def burst(p, n: int, path: str = "/"):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        return await asyncio.gather(*(fetch(s, p.url(path)) for _ in range(n)))


OVERFLOW_BODY = "upstream connect error or disconnect/reset before headers. reset reason: overflow"


async def test_max_requests_overflows_at_once_native_and_envoy():
    for fmt in ("native", "envoy"):
        slow = Slow(0.6)
        async with Upstream(slow) as up:
            if fmt == "native":
                cfg = native_config(clusters={"svc": {"endpoints": [up.address],
                                                      "circuit_breakers": {"max_requests": 3}}},
                                    routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
            else:
                cfg = envoy_config(clusters={"svc": {"endpoints": [up.address], "circuit_breakers": {
                    "thresholds": [{"priority": "DEFAULT", "max_requests": 3}]}}},
                    routes=[{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}])
            async with proxy(cfg) as p:
                results = await burst(p, 12)
                text = await prometheus(p)
        ok = [r for r in results if r[0] == 200]
        over = [r for r in results if r[0] == 503]
        assert len(ok) + len(over) == 12, results          # none lost
        assert len(ok) == 3 == slow.served, fmt            # the upstream saw exactly the admitted ones
        assert slow.peak <= 3
        assert all(r[1] == OVERFLOW_BODY and r[3] < 0.3 for r in over), over   # 503 UO at once
        assert metric(text, "sidecar_upstream_rq_overflow_total", cluster="svc", breaker="max_requests") == 9
        assert metric(text, "sidecar_http_downstream_rq_flag_total", flag="UO") == 9


async def test_max_connections_queues_pending_then_overflows():
    slow = Slow(0.3)
    async with Upstream(slow) as up:
        cfg = native_config(clusters={"svc": {"endpoints": [up.address], "circuit_breakers": {
            "max_connections": 2, "max_pending_requests": 3}}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc", "timeout": "5s"}])
        async with proxy(cfg) as p:
            t = time.monotonic()
            results = await burst(p, 10)
            total = time.monotonic() - t
            text = await prometheus(p)
            cs = p.app.clusters.get("svc")
            assert cs.state.breakers.pending_requests == 0 and cs.state.breakers.active_requests == 0
    ok = [r for r in results if r[0] == 200]
    over = [r for r in results if r[0] == 503]
    assert len(ok) == 5 and len(over) == 5, [r[:2] for r in results]   # 2 at once + 3 pending
    assert all(r[1] == OVERFLOW_BODY and r[3] < 0.25 for r in over)
    assert slow.peak <= 2 and len(slow.peers) <= 2                   # never more than 2 connections
    # the pending ones were woken as connections came back: 3 rounds of 0.3 s, not a timeout
    assert 0.8 < total < 2.5, total
    assert metric(text, "sidecar_upstream_rq_overflow_total", cluster="svc", breaker="max_pending_requests") == 5
    assert metric(text, "sidecar_upstream_cx_overflow_total", cluster="svc") >= 8


async def test_pending_requests_use_connections_freed_on_other_hosts():
    """At max_connections, an idle connection to another host is closed so a pending request
    for this host can connect (capacity is never stranded in an idle pool)."""
    a, b = Slow(0.05), Slow(0.05)
    async with Upstream(a) as ua, Upstream(b) as ub:
        cfg = native_config(clusters={"svc": {"endpoints": [ua.address, ub.address], "lb": "round_robin",
                                              "circuit_breakers": {"max_connections": 1}}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc", "timeout": "3s"}])
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                for _ in range(6):
                    status, _, _, elapsed = await fetch(s, p.url("/"))
                    assert status == 200 and elapsed < 1.0
            cs = p.app.clusters.get("svc")
            assert cs.open_connections() <= 1
    assert a.served == 3 and b.served == 3


async def test_pending_requests_get_connections_released_by_streamed_responses():
    """A streamed response gives its connection back only when its body ends (after the
    attempt returned): pending requests must still be woken for it."""
    async def streamed(request):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(3):
            await resp.write(b"x" * 1000)
            await asyncio.sleep(0.1)
        await resp.write_eof()
        return resp
    async with Upstream(streamed) as up:
        cfg = native_config(clusters={"svc": {"endpoints": [up.address], "circuit_breakers": {"max_connections": 1}}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc", "timeout": "5s"}])
        async with proxy(cfg) as p:
            t = time.monotonic()
            results = await burst(p, 4)
            total = time.monotonic() - t
            assert p.app.clusters.get("svc").hosts[0].pool.total_connects == 1   # one connection, reused
    assert [(r[0], len(r[1])) for r in results] == [(200, 3000)] * 4
    assert total < 3.0, total


async def test_pending_wait_is_bounded_by_the_route_timeout():
    slow = Slow(1.5)
    async with Upstream(slow) as up:
        cfg = native_config(clusters={"svc": {"endpoints": [up.address], "circuit_breakers": {"max_connections": 1}}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc", "timeout": "400ms"}])
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                first = asyncio.create_task(fetch(s, p.url("/")))
                await asyncio.sleep(0.05)
                status, body, _, elapsed = await fetch(s, p.url("/"))
                await first
            assert p.app.clusters.get("svc").state.breakers.pending_requests == 0
    assert status == 504 and body == "upstream request timeout"
    assert 0.3 < elapsed < 1.2, elapsed


async def test_saturated_breaker_never_blocks_the_event_loop():
    slow = Slow(0.8)
    async with Upstream(slow) as up, Upstream() as fast:
        cfg = native_config(
            clusters={"svc": {"endpoints": [up.address], "circuit_breakers": {
                "max_connections": 2, "max_pending_requests": 50}}, "fast": [fast.address]},
            routes=[{"match": {"prefix": "/fast"}, "cluster": "fast"},
                    {"match": {"prefix": "/"}, "cluster": "svc", "timeout": "5s"}])
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                slow_ones = [asyncio.create_task(fetch(s, p.url("/slow"))) for _ in range(20)]
                await asyncio.sleep(0.1)
                view = await clusters_json(p)
                assert view["svc"]["rq_pending"] == 18
                text = await prometheus(p)
                assert metric(text, "sidecar_upstream_circuit_breaker_open", cluster="svc",
                              breaker="max_connections") == 1
                assert metric(text, "sidecar_upstream_rq_pending_active", cluster="svc") == 18
                lat = []
                for _ in range(10):
                    status, _, _, elapsed = await fetch(s, p.url("/fast"))
                    assert status == 200
                    lat.append(elapsed)
                assert max(lat) < 0.2, lat
                for t in slow_ones:
                    t.cancel()
                await asyncio.gather(*slow_ones, return_exceptions=True)


async def test_breaker_counters_return_to_zero_and_clusters_view():
    slow = Slow(0.3)
    async with Upstream(slow) as up:
        cfg = native_config(clusters={"svc": {"endpoints": [up.address], "circuit_breakers": {"max_requests": 2}}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with proxy(cfg) as p:
            task = asyncio.create_task(burst(p, 4))
            await asyncio.sleep(0.15)
            view = await clusters_json(p)
            assert view["svc"]["rq_active"] == 2
            assert view["svc"]["circuit_breakers"]["open"] is True
            assert view["svc"]["hosts"][0]["rq_active"] == 2
            await task
            view = await clusters_json(p)
            assert view["svc"]["rq_active"] == 0 and view["svc"]["circuit_breakers"]["open"] is False


def test_breaker_config_both_formats():
    cb = circuit_breakers_from_native({"max_connections": 10, "max_pending_requests": 0, "max_requests": 20,
                                       "max_retries": 1, "retry_budget": {"budget_percent": 25,
                                                                          "min_retry_concurrency": 2}}, "cb")
    t = cb.default
    assert (t.max_connections, t.max_pending_requests, t.max_requests, t.max_retries) == (10, 0, 20, 1)
    assert (t.retry_budget.budget_percent, t.retry_budget.min_retry_concurrency) == (25, 2)
    d = circuit_breakers_from_native({}, "cb").default
    assert (d.max_connections, d.max_pending_requests, d.max_requests, d.max_retries) == (1024, 1024, 1024, 3)
    e = circuit_breakers_from_envoy({"thresholds": [
        {"priority": "DEFAULT", "max_requests": 5, "track_remaining": True},
        {"priority": "HIGH", "max_requests": 50, "retry_budget": {"budget_percent": {"value": 10.0}}}]}, "cb")
    assert e.default.max_requests == 5 and e.high.max_requests == 50
    assert e.high.retry_budget.budget_percent == 10.0 and e.high.retry_budget.min_retry_concurrency == 3


@pytest.mark.parametrize("fn,d,where", [
    (circuit_breakers_from_native, {"priority": "HIGH"}, "cb"),
    (circuit_breakers_from_native, {"max_requests": 0}, "cb.max_requests"),
    (circuit_breakers_from_native, {"retry_budget": {"budget_percent": 120}}, "cb.retry_budget.budget_percent"),
    (circuit_breakers_from_envoy, {"thresholds": [{}, {}]}, "cb.thresholds[1].priority"),
    (circuit_breakers_from_envoy, {"thresholds": [{"priority": "LOW"}]}, "cb.thresholds[0].priority"),
])
def test_bad_breaker_config_is_refused(fn, d, where):
    with pytest.raises(ConfigError) as e:
        fn(d, "cb")
    assert str(e.value).startswith(where), str(e.value)
