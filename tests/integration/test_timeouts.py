"""Timeouts over real loopback sockets: route (504 UT), per-try, connect, the timeout header,
downstream idle and header-read (slow loris), upstream pooled-connection idle. Latency bounds
are loose on purpose (shared CI machines)."""

import asyncio
import time

import aiohttp
from aiohttp import web
from resilience_helpers import (
    RawServer,
    blackhole_listener,
    envoy_config,
    fetch,
    hang,
    hdr,
    metric,
    ok_response,
    prometheus,
    proxy,
)

from sidecar.testing import Upstream, native_config


def hang_then(first_hangs: int):
    """The first ``first_hangs`` requests never get an answer (until the proxy gives up)."""
    n = {"c": 0}

    async def handler(request):
        n["c"] += 1
        if n["c"] <= first_hangs:
            await hang(request)
        return web.Response(text=f"answer {n['c']}")
    return handler


async def test_route_timeout_answers_504_ut_native_and_envoy():
    async with Upstream(hang_then(100)) as up:
        configs = [
            native_config(clusters={"svc": [up.address]},
                          routes=[{"match": {"prefix": "/"}, "cluster": "svc", "timeout": "300ms"}]),
            envoy_config(clusters={"svc": {"endpoints": [up.address]}},
                         routes=[{"match": {"prefix": "/"}, "route": {"cluster": "svc", "timeout": "0.3s"}}]),
        ]
        for cfg in configs:
            async with proxy(cfg) as p:
                async with aiohttp.ClientSession() as s:
                    status, body, _, elapsed = await fetch(s, p.url("/slow"))
                text = await prometheus(p)
            assert status == 504 and body == "upstream request timeout"
            assert 0.25 <= elapsed < 2.0, elapsed
            assert metric(text, "sidecar_upstream_rq_timeout_total", cluster="svc") == 1
            assert metric(text, "sidecar_http_downstream_rq_flag_total", flag="UT") == 1


async def test_timeout_zero_disables_the_route_timeout():
    async def slow(request):
        await asyncio.sleep(0.4)
        return web.Response(text="late but fine")
    async with Upstream(slow) as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc", "timeout": 0}])
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                status, body, _, _ = await fetch(s, p.url("/"))
    assert (status, body) == (200, "late but fine")


async def test_client_timeout_header_shortens_the_route_timeout_when_allowed():
    async with Upstream(hang_then(100)) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[
            {"match": {"prefix": "/allowed"}, "cluster": "svc", "timeout": "5s", "allow_timeout_header": True},
            {"match": {"prefix": "/"}, "cluster": "svc", "timeout": "600ms"}])
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                h = {"x-envoy-upstream-rq-timeout-ms": "200"}
                status, _, _, elapsed = await fetch(s, p.url("/allowed"), headers=h)
                assert status == 504
                assert 0.15 <= elapsed < 1.5, elapsed
                # not allowed on this route: the route's own timeout holds
                status, _, _, elapsed = await fetch(s, p.url("/other"), headers=h)
                assert status == 504
                assert 0.55 <= elapsed < 2.0, elapsed
    # the header is for this hop only
    assert "x-envoy-upstream-rq-timeout-ms" not in {k.lower() for k in up.requests[0].headers}


async def test_per_try_timeout_retries_a_hung_attempt_native_and_envoy():
    for make in ("native", "envoy"):
        async with Upstream(hang_then(1)) as up:
            if make == "native":
                cfg = native_config(clusters={"svc": [up.address]}, routes=[{
                    "match": {"prefix": "/"}, "cluster": "svc", "timeout": "5s",
                    "retry": {"retry_on": "5xx", "retries": 2, "per_try_timeout": "250ms", "backoff": "10ms"}}])
            else:
                cfg = envoy_config(clusters={"svc": {"endpoints": [up.address]}}, routes=[{
                    "match": {"prefix": "/"}, "route": {"cluster": "svc", "timeout": "5s", "retry_policy": {
                        "retry_on": "5xx", "num_retries": 2, "per_try_timeout": "0.25s",
                        "retry_back_off": {"base_interval": "0.01s"}}}}])
            async with proxy(cfg) as p:
                async with aiohttp.ClientSession() as s:
                    status, body, _, elapsed = await fetch(s, p.url("/"))
                text = await prometheus(p)
        assert (status, body) == (200, "answer 2"), make
        assert 0.2 <= elapsed < 2.0, elapsed
        assert [hdr(r, "x-envoy-attempt-count") for r in up.requests] == ["1", "2"]
        # the upstream learns how long this attempt may take
        assert int(hdr(up.requests[0], "x-envoy-expected-rq-timeout-ms")) <= 250
        assert metric(text, "sidecar_upstream_rq_per_try_timeout_total", cluster="svc") == 1
        assert metric(text, "sidecar_upstream_rq_timeout_total", cluster="svc") == 0


async def test_per_try_timeouts_on_every_attempt_end_in_504():
    async with Upstream(hang_then(100)) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{
            "match": {"prefix": "/"}, "cluster": "svc", "timeout": "10s",
            "retry": {"retry_on": "5xx", "retries": 2, "per_try_timeout": "200ms", "backoff": "5ms"}}])
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                status, _, _, elapsed = await fetch(s, p.url("/"))
    assert status == 504
    assert len(up.requests) == 3
    assert 0.55 <= elapsed < 3.0, elapsed


async def test_route_timeout_bounds_all_attempts_together():
    async with Upstream(hang_then(100)) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{
            "match": {"prefix": "/"}, "cluster": "svc", "timeout": "500ms",
            "retry": {"retry_on": "5xx", "retries": 10, "per_try_timeout": "200ms", "backoff": "5ms"}}])
        async with proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                status, _, _, elapsed = await fetch(s, p.url("/"))
    assert status == 504
    assert 0.45 <= elapsed < 2.0, elapsed
    assert 2 <= len(up.requests) <= 3


async def test_connect_timeout_then_retry_on_another_host():
    async with Upstream() as good:
        with blackhole_listener() as black:
            cfg = native_config(clusters={"svc": {"endpoints": [black], "connect_timeout": "300ms"}},
                                routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
            async with proxy(cfg) as p:
                async with aiohttp.ClientSession() as s:
                    status, body, _, elapsed = await fetch(s, p.url("/"))
                text = await prometheus(p)
            assert status == 503 and "connection failure" in body
            assert 0.25 <= elapsed < 2.0, elapsed
            assert metric(text, "sidecar_upstream_cx_connect_fail_total", cluster="svc") == 1
            # with a second host and connect-failure retries, the request still succeeds
            cfg = envoy_config(clusters={"svc": {"endpoints": [black, good.address], "connect_timeout": "0.3s"}},
                               routes=[{"match": {"prefix": "/"}, "route": {"cluster": "svc", "retry_policy": {
                                   "retry_on": "connect-failure", "num_retries": 1}}}])
            async with proxy(cfg) as p:
                async with aiohttp.ClientSession() as s:
                    results = [await fetch(s, p.url("/")) for _ in range(4)]
    assert [r[0] for r in results] == [200] * 4


async def test_downstream_idle_timeout_closes_quiet_connections_native_and_envoy():
    async with Upstream() as up:
        for cfg in (
            native_config(clusters={"svc": [up.address]}, routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                          listener={"idle_timeout": "1s"}),
            envoy_config(clusters={"svc": {"endpoints": [up.address]}},
                         routes=[{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}],
                         hcm={"common_http_protocol_options": {"idle_timeout": "1s"}}),
        ):
            async with proxy(cfg) as p:
                reader, writer = await asyncio.open_connection("127.0.0.1", p.port())
                writer.write(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
                await reader.readuntil(b"\r\n\r\n")
                t = time.monotonic()
                # keep-alive connection, then silence: the proxy closes it
                rest = await asyncio.wait_for(reader.read(), 5.0)
                while rest:
                    rest = await asyncio.wait_for(reader.read(), 5.0)
                elapsed = time.monotonic() - t
                writer.close()
            assert 0.8 <= elapsed < 3.5, elapsed


async def test_slow_loris_header_read_timeout_does_not_hold_the_proxy():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener={"request_headers_timeout": "1s", "idle_timeout": "60s"})
        async with proxy(cfg) as p:
            loris = []
            for _ in range(20):
                r, w = await asyncio.open_connection("127.0.0.1", p.port())
                loris.append((r, w))
            t = time.monotonic()

            async def dribble(w):
                try:
                    for ch in b"GET /slow HTTP/1.1\r\nhost: a\r\nx-long-header: " + b"a" * 200:
                        w.write(bytes([ch]))
                        await asyncio.sleep(0.2)
                except (ConnectionError, OSError):
                    pass
            tasks = [asyncio.create_task(dribble(w)) for _, w in loris]
            # meanwhile normal clients are served at once
            async with aiohttp.ClientSession() as s:
                for _ in range(5):
                    status, _, _, elapsed = await fetch(s, p.url("/ok"))
                    assert status == 200 and elapsed < 0.5
            answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 6.0) for r, _ in loris))
            elapsed = time.monotonic() - t
            for tk in tasks:
                tk.cancel()
            for _, w in loris:
                w.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0]
    assert 0.9 <= elapsed < 4.0, elapsed
    assert all(r.path == "/ok" for r in up.requests)     # nothing of the slow requests went upstream


async def test_upstream_idle_pooled_connections_are_closed_native_and_envoy():
    async with RawServer(lambda n: ok_response()) as up:
        for cfg in (
            native_config(clusters={"svc": {"endpoints": [up.address], "idle_timeout": "1s"}},
                          routes=[{"match": {"prefix": "/"}, "cluster": "svc"}]),
            envoy_config(clusters={"svc": {"endpoints": [up.address], "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {}},
                    "common_http_protocol_options": {"idle_timeout": "1s"}}}}},
                routes=[{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}]),
        ):
            before = up.closed_by_peer
            async with proxy(cfg) as p:
                async with aiohttp.ClientSession() as s:
                    assert (await fetch(s, p.url("/")))[0] == 200
                host = p.app.clusters.get("svc").hosts[0]
                assert host.pool.active == 1
                t = time.monotonic()
                while up.closed_by_peer == before and time.monotonic() - t < 4:
                    await asyncio.sleep(0.05)
                elapsed = time.monotonic() - t
                assert up.closed_by_peer == before + 1, "the proxy kept the idle connection"
                assert 0.9 <= elapsed < 3.5, elapsed
                assert host.pool.active == 0
