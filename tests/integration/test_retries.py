"""Retries against real flaky upstreams on loopback: retry_on conditions, attempt counts seen by
the upstream, previous-host avoidance, the non-idempotent rule, the replay buffer limit,
override headers, released discarded responses, backoff, and the retry storm bound."""

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from resilience_helpers import (
    RawServer,
    dead_address,
    envoy_config,
    fetch,
    hdr,
    metric,
    ok_response,
    prometheus,
    proxy,
)

from sidecar.testing import Upstream, native_config


def fail_then_ok(n_fail: int, status: int = 503):
    n = {"c": 0}

    async def handler(request):
        n["c"] += 1
        if n["c"] <= n_fail:
            return web.Response(status=status, text=f"fail {n['c']}")
        return web.Response(text=f"ok after {n['c'] - 1} failures")
    return handler


def always(status: int, delay: float = 0.0):
    async def handler(request):
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, text=str(status))
    return handler


def attempts(up) -> list:
    return [hdr(r, "x-envoy-attempt-count") for r in up.requests]


def route(cluster="svc", **retry):
    return [{"match": {"prefix": "/"}, "cluster": cluster, "retry": {"backoff": "5ms", **retry}}]


async def test_fail_n_times_then_succeed_native_and_envoy():
    for fmt in ("native", "envoy"):
        async with Upstream(fail_then_ok(2)) as up:
            if fmt == "native":
                cfg = native_config(clusters={"svc": [up.address]}, routes=route(retry_on="5xx", retries=3))
            else:
                cfg = envoy_config(clusters={"svc": {"endpoints": [up.address]}}, routes=[{
                    "match": {"prefix": "/"}, "route": {"cluster": "svc", "retry_policy": {
                        "retry_on": "5xx", "num_retries": 3, "retry_back_off": {"base_interval": "0.005s"}}}}])
            async with proxy(cfg) as p:
                async with aiohttp.ClientSession() as s:
                    status, body, _, _ = await fetch(s, p.url("/x"))
                text = await prometheus(p)
        assert (status, body) == (200, "ok after 2 failures"), fmt
        assert attempts(up) == ["1", "2", "3"]
        assert metric(text, "sidecar_upstream_rq_retry_total", cluster="svc", outcome="attempted") == 2
        assert metric(text, "sidecar_upstream_rq_retry_total", cluster="svc", outcome="success") == 1
        # upstream attempts, by class: two 5xx and one 2xx
        assert metric(text, "sidecar_upstream_rq_total", cluster="svc", status_class="5xx") == 2


async def test_retries_exhausted_returns_the_last_upstream_answer():
    async with Upstream(always(503)) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=route(retry_on="5xx", retries=2))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                status, body, _, _ = await fetch(s, p.url("/"))
            text = await prometheus(p)
    assert (status, body) == (503, "503")
    assert attempts(up) == ["1", "2", "3"]
    assert metric(text, "sidecar_upstream_rq_retry_total", cluster="svc", outcome="limit_exceeded") == 1


async def test_attempt_count_only_on_routes_that_retry():
    async with Upstream(always(200)) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[
            {"match": {"prefix": "/plain"}, "cluster": "svc"},
            {"match": {"prefix": "/"}, "cluster": "svc", "retry": {"retries": 1}}])
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                assert (await fetch(s, p.url("/plain")))[0] == 200
                assert (await fetch(s, p.url("/r")))[0] == 200
    # Envoy sends no attempt count on a plain route; a retrying route says which attempt it is
    assert attempts(up) == [None, "1"]


@pytest.mark.parametrize("retry_on,codes,status,expected_attempts", [
    ("5xx", [], 409, 1),
    ("retriable-4xx", [], 409, 3),
    ("retriable-4xx", [], 404, 1),
    ("retriable-status-codes", [418], 418, 3),
    ("retriable-status-codes", [418], 500, 1),
    ("gateway-error", [], 502, 3),
    ("gateway-error", [], 500, 1),
    ("5xx", [], 500, 3),
])
async def test_retry_on_status_conditions(retry_on, codes, status, expected_attempts):
    async with Upstream(always(status)) as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=route(retry_on=retry_on, retries=2, status_codes=codes))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                got, _, _, _ = await fetch(s, p.url("/"))
    assert got == status
    assert len(up.requests) == expected_attempts


async def test_reset_is_retried_only_with_a_reset_condition():
    behaviour = lambda n: "reset" if n % 2 == 1 else ok_response(b"second try")   # noqa: E731
    async with RawServer(behaviour) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=route(retry_on="reset", retries=1))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                status, body, _, _ = await fetch(s, p.url("/"))
            text = await prometheus(p)
        assert (status, body) == (200, "second try")
        assert up.requests == 2
        assert metric(text, "sidecar_upstream_rq_reset_total", cluster="svc") == 1
    async with RawServer(behaviour) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=route(retry_on="connect-failure", retries=1))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                status, body, _, _ = await fetch(s, p.url("/"))
        assert status == 503 and "reset" in body
        assert up.requests == 1


async def test_connect_failure_is_retried_on_another_host_even_for_post():
    async with Upstream() as good:
        cfg = native_config(clusters={"svc": [dead_address(), good.address]},
                            routes=route(retry_on="connect-failure", retries=1))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                results = [await fetch(s, p.url("/"), method="POST", data=b"payload") for _ in range(6)]
    assert [r[0] for r in results] == [200] * 6
    assert all(r.body == b"payload" for r in good.requests)
    assert len(good.requests) == 6      # each POST reached the live host exactly once


async def test_retries_avoid_hosts_that_already_failed():
    ups = [Upstream(always(503), name=f"u{i}") for i in range(3)]
    for u in ups:
        await u.start()
    try:
        cfg = native_config(clusters={"svc": {"endpoints": [u.address for u in ups], "lb": "random"}},
                            routes=route(retry_on="5xx", retries=2))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                for i in range(10):
                    status, _, _, _ = await fetch(s, p.url("/"), headers={"x-request-id": f"req-{i}"})
                    assert status == 503
    finally:
        for u in ups:
            await u.stop()
    for i in range(10):
        hit = [u.name for u in ups for r in u.requests if hdr(r, "x-request-id") == f"req-{i}"]
        assert sorted(hit) == ["u0", "u1", "u2"], hit       # 3 attempts, 3 different hosts


async def test_non_idempotent_requests_are_not_retried_unless_configured():
    async with Upstream(always(503)) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[
            {"match": {"prefix": "/opt-in"}, "cluster": "svc",
             "retry": {"retry_on": "5xx,reset", "retries": 2, "backoff": "5ms", "retry_non_idempotent": True}},
            {"match": {"prefix": "/"}, "cluster": "svc", "retry": {"retry_on": "5xx,reset", "retries": 2, "backoff": "5ms"}},
        ])
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                assert (await fetch(s, p.url("/a"), method="POST", data=b"x"))[0] == 503
                assert len(up.requests) == 1
                assert (await fetch(s, p.url("/a"), method="PUT", data=b"x"))[0] == 503   # idempotent
                assert len(up.requests) == 4
                assert (await fetch(s, p.url("/opt-in"), method="POST", data=b"body"))[0] == 503
                assert len(up.requests) == 7
    assert [r.body for r in up.requests[4:]] == [b"body"] * 3     # the body was replayed intact
    # a reset after the request was sent is not retried for POST either
    async with RawServer(lambda n: "reset") as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=route(retry_on="reset", retries=2))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                assert (await fetch(s, p.url("/"), method="POST", data=b"x"))[0] == 503
        assert up.requests == 1


async def test_bodies_over_the_buffer_limit_are_sent_once():
    async with Upstream(always(503)) as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=route(retry_on="5xx", retries=2, retry_non_idempotent=True,
                                         max_buffered_body=1024))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                small = b"s" * 1000
                assert (await fetch(s, p.url("/"), method="POST", data=small))[0] == 503
                assert len(up.requests) == 3
                big = b"b" * 300_000

                async def stream():
                    for i in range(0, len(big), 10_000):
                        yield big[i:i + 10_000]
                        await asyncio.sleep(0)
                assert (await fetch(s, p.url("/"), method="POST", data=stream()))[0] == 503
                assert len(up.requests) == 4
                assert (await fetch(s, p.url("/"), method="POST", data=b"c" * 5000))[0] == 503
                assert len(up.requests) == 5
    assert [len(r.body) for r in up.requests] == [1000] * 3 + [300_000, 5000]
    assert up.requests[3].body == big


async def test_override_headers_only_when_the_route_allows_them():
    async with Upstream(always(409)) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[
            {"match": {"prefix": "/allowed"}, "cluster": "svc",
             "retry": {"retry_on": "5xx", "retries": 1, "backoff": "5ms", "allow_override_headers": True}},
            {"match": {"prefix": "/"}, "cluster": "svc", "retry": {"retry_on": "5xx", "retries": 1, "backoff": "5ms"}},
        ])
        h = {"x-envoy-retry-on": "retriable-4xx", "x-envoy-max-retries": "3"}
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                assert (await fetch(s, p.url("/plain"), headers=h))[0] == 409
                assert len(up.requests) == 1
                assert (await fetch(s, p.url("/allowed"), headers=h))[0] == 409
                assert len(up.requests) == 5           # 409 now retriable, 3 retries
                assert (await fetch(s, p.url("/allowed"), headers={"x-envoy-max-retries": "0",
                                                                   "x-envoy-retry-on": "retriable-4xx"}))[0] == 409
                assert len(up.requests) == 6
    # consumed on the route that honours them
    assert "x-envoy-retry-on" not in {k.lower() for k in up.requests[1].headers}


async def test_discarded_responses_are_released():
    """Failed attempts stream a large body; each discarded one must free its connection
    (closed, since it was not read to the end) instead of pinning it paused."""
    n = {"c": 0}

    async def handler(request):
        n["c"] += 1
        if n["c"] % 2 == 1:
            resp = web.StreamResponse(status=503)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            try:
                for _ in range(100):
                    await resp.write(b"e" * 65536)
            except (ConnectionError, RuntimeError):
                pass
            return resp
        return web.Response(text="fine")
    async with Upstream(handler) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=route(retry_on="5xx", retries=1))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                for _ in range(10):
                    status, body, _, elapsed = await fetch(s, p.url("/"))
                    assert (status, body) == (200, "fine")
                    assert elapsed < 2.0
            host = p.app.clusters.get("svc").hosts[0]
            await asyncio.sleep(0.1)
            assert host.pool.active <= 1, host.pool.active
            assert host.active_requests == 0


async def test_backoff_has_full_jitter_between_attempts():
    stamps: dict[str, list] = {}

    async def handler(request):
        stamps.setdefault(request.headers["x-request-id"], []).append(time.monotonic())
        return web.Response(status=503)
    async with Upstream(handler) as up:
        cfg = native_config(clusters={"svc": {"endpoints": [up.address], "circuit_breakers": {"max_retries": 100}}},
                            routes=route(retry_on="5xx", retries=1, backoff="200ms", max_backoff="200ms"))
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                await asyncio.gather(*(fetch(s, p.url("/"), headers={"x-request-id": f"r{i}"}) for i in range(20)))
    gaps = [t[1] - t[0] for t in stamps.values()]
    assert len(gaps) == 20
    assert all(0 <= g < 0.35 for g in gaps), gaps       # uniform in [0, 200ms) + scheduling
    mean = sum(gaps) / len(gaps)
    assert 0.04 < mean < 0.17, gaps                     # about 100 ms on average, not fixed
    assert max(gaps) - min(gaps) > 0.05                 # jittered


async def _storm(cfg_cluster: dict, clients: int, duration: float, upstream_delay: float):
    """Every host fails; ``clients`` loop on requests for ``duration``. Returns what the
    upstream saw (first attempts, retries, max concurrent retries) and the proxy's counters."""
    seen = {"first": 0, "retry": 0, "retry_inflight": 0, "retry_peak": 0}

    async def handler(request):
        is_retry = request.headers.get("x-envoy-attempt-count", "1") != "1"
        seen["retry" if is_retry else "first"] += 1
        if is_retry:
            seen["retry_inflight"] += 1
            seen["retry_peak"] = max(seen["retry_peak"], seen["retry_inflight"])
        try:
            await asyncio.sleep(upstream_delay)
        finally:
            if is_retry:
                seen["retry_inflight"] -= 1
        return web.Response(status=503)

    ups = [Upstream(handler) for _ in range(2)]
    for u in ups:
        await u.start()
    try:
        cfg = native_config(clusters={"svc": {"endpoints": [u.address for u in ups], **cfg_cluster}},
                            routes=route(retry_on="5xx", retries=3, backoff="2ms", max_backoff="5ms"))
        async with proxy(cfg) as p:
            statuses = []
            end = time.monotonic() + duration

            async def client(s):
                while time.monotonic() < end:
                    statuses.append((await fetch(s, p.url("/")))[0])
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                await asyncio.gather(*(client(s) for _ in range(clients)))
            text = await prometheus(p)
    finally:
        for u in ups:
            await u.stop()
    return seen, statuses, text


async def test_retry_storm_is_capped_by_max_retries():
    seen, statuses, text = await _storm({}, clients=30, duration=1.0, upstream_delay=0.02)
    assert set(statuses) == {503}
    # without a breaker the upstream would see 3 retries per request (4x load); the default
    # max_retries=3 allows at most 3 retries outstanding in the cluster at any moment
    assert seen["retry_peak"] <= 3, seen
    assert seen["retry"] <= seen["first"] * 0.25, seen
    assert metric(text, "sidecar_upstream_rq_retry_total", cluster="svc", outcome="overflow") > 0


async def test_retry_storm_is_capped_by_the_retry_budget():
    seen, statuses, text = await _storm(
        {"circuit_breakers": {"retry_budget": {"budget_percent": 20, "min_retry_concurrency": 1}}},
        clients=40, duration=1.2, upstream_delay=0.02)
    assert set(statuses) == {503}
    # retries outstanding <= 20% of active requests: with ~40 in flight, about 8 at once,
    # so the extra load is a fraction of the first attempts (slack for timing)
    assert 1 <= seen["retry_peak"] <= 12, seen
    assert seen["retry"] <= seen["first"] * 0.4, seen
    assert seen["retry"] > 0
    assert metric(text, "sidecar_upstream_rq_retry_total", cluster="svc", outcome="overflow") > 0


@pytest.mark.parametrize("envoy", [False, True])
async def test_flaky_example_hides_the_flaky_upstreams(envoy):
    from examples.flaky.run import run
    report = await run(envoy=envoy, free_ports=True, duration=3.0, concurrency=6, quiet=True)
    prot, raw = report["protected"], report["unprotected"]
    assert raw["success_rate"] < 0.9, raw          # the instances really are flaky
    assert prot["success_rate"] >= 0.98, prot
    assert prot["requests"] > 200
    assert report["instances"]["broken"]["health_checks"] > 0
