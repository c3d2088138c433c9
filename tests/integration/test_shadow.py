"""Request shadowing (mirroring): what the shadow upstream receives, and that a slow, hanging
or dead shadow never delays or fails the primary. Real proxy, real upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

import sidecar.route.shadow as shadow_mod
from sidecar.route.shadow import shadow_host
from sidecar.testing import Upstream, free_port, native_config, running_proxy

T_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
         "HttpConnectionManager")
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class BlackHole:
    """A TCP server that accepts, reads and never answers (a hung shadow service)."""

    def __init__(self):
        self.connections = 0
        self.received = b""
        self._server = None
        self._writers = []

    async def _handle(self, reader, writer):
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.received += data
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc):
        for w in self._writers:
            w.close()
        self._server.close()


def metric(proxy, name: str, **labels) -> float:
    return proxy.app.metrics.registry.get_sample_value(name, labels) or 0.0


async def wait_for(pred, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


async def finish_shadows(proxy):
    proxy.app.shadow.cancel_all()
    await asyncio.sleep(0)


def mirror_cfg(primary, shadow, mirror=None, timeout="2s", **route):
    return native_config(
        clusters={"primary": [primary.address], "shadow": [shadow.address]},
        routes=[{"match": {"prefix": "/"}, "cluster": "primary", "timeout": timeout,
                 "mirror": mirror or [{"cluster": "shadow"}], **route}])


# ---- host suffix ----------------------------------------------------------------------------

@pytest.mark.parametrize("host,expected", [
    ("foo.com", "foo.com-shadow"),
    ("foo.com:8080", "foo.com-shadow:8080"),
    ("127.0.0.1:10000", "127.0.0.1-shadow:10000"),
    ("[::1]:8080", "[::1]-shadow:8080"),
    ("[::1]", "[::1]-shadow"),
    ("", ""),
])
def test_shadow_host_like_envoy(host, expected):
    assert shadow_host(host) == expected


# ---- what the shadow receives ---------------------------------------------------------------

async def test_shadow_gets_same_request_with_shadow_host():
    async with Upstream(name="primary") as prim, Upstream(name="shadow") as sh:
        cfg = mirror_cfg(prim, sh, request_headers={"set": {"x-route": "r1"}})
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            async with s.post(p.url("/orders/7?x=1"), data=b'{"qty": 2}',
                              headers={"host": "shop.example:8080", "x-user": "u1",
                                       "content-type": "application/json"}) as r:
                assert r.status == 200
                assert (await r.json())["upstream"] == "primary"
            assert await wait_for(lambda: len(sh.requests) == 1)
            assert metric(p, "sidecar_shadow_requests_total", cluster="shadow", outcome="2xx") == 1
        got = sh.requests[0]
        prim_req = prim.requests[0]
        h = {k.lower(): v for k, v in got.headers.items()}
        assert got.method == "POST" and got.path == "/orders/7?x=1"
        assert got.body == b'{"qty": 2}'
        ph = {k.lower(): v for k, v in prim_req.headers.items()}
        # the primary's Host (the listener may strip the port, as Envoy's strip_any_host_port)
        assert ph["host"] in ("shop.example:8080", "shop.example")
        assert h["host"] == shadow_host(ph["host"])       # shop.example-shadow[:8080]
        assert h["host"].startswith("shop.example-shadow")
        assert h["x-user"] == "u1" and h["content-type"] == "application/json"
        assert h["x-route"] == "r1"                       # after the route's header mutation
        assert h["x-request-id"] == ph["x-request-id"]


async def test_streamed_body_is_teed_to_the_shadow():
    async with Upstream(name="primary") as prim, Upstream(name="shadow") as sh:
        async with running_proxy(mirror_cfg(prim, sh)) as p, aiohttp.ClientSession() as s:
            async def gen():
                for i in range(5):
                    yield f"chunk{i};".encode() * 100
                    await asyncio.sleep(0.01)
            async with s.put(p.url("/upload"), data=gen()) as r:   # chunked upload
                assert r.status == 200
            assert await wait_for(lambda: len(sh.requests) == 1)
        expected = b"".join(f"chunk{i};".encode() * 100 for i in range(5))
        assert prim.requests[0].body == expected
        assert sh.requests[0].body == expected and sh.requests[0].method == "PUT"


async def test_body_over_limit_skips_shadow_and_counts(monkeypatch):
    monkeypatch.setattr(shadow_mod, "MAX_BODY_BYTES", 1000)
    async with Upstream(name="primary") as prim, Upstream(name="shadow") as sh:
        async with running_proxy(mirror_cfg(prim, sh)) as p, aiohttp.ClientSession() as s:
            async with s.post(p.url("/big"), data=b"x" * 5000) as r:        # complete body
                assert r.status == 200
            async def gen():
                for _ in range(5):
                    yield b"y" * 500
                    await asyncio.sleep(0.01)
            async with s.post(p.url("/big-stream"), data=gen()) as r:      # streamed body
                assert r.status == 200
            async with s.post(p.url("/small"), data=b"z" * 10) as r:
                assert r.status == 200
            assert await wait_for(lambda: len(sh.requests) == 1)
            await asyncio.sleep(0.05)
            assert metric(p, "sidecar_shadow_requests_total", cluster="shadow",
                          outcome="body_too_large") == 2
        assert [r.path for r in sh.requests] == ["/small"]
        assert [len(r.body) for r in prim.requests] == [5000, 2500, 10]


# ---- the primary is never delayed or failed -------------------------------------------------

async def test_hanging_shadow_never_delays_primary():
    async with Upstream(name="primary") as prim, BlackHole() as hole:
        async with running_proxy(mirror_cfg(prim, hole, timeout="1s")) as p, \
                aiohttp.ClientSession() as s:
            worst = 0.0
            for i in range(20):
                t = time.monotonic()
                async with s.get(p.url(f"/r{i}")) as r:
                    assert r.status == 200
                    await r.read()
                worst = max(worst, time.monotonic() - t)
            assert worst < 0.5, worst              # the shadows wait 1 s, the primary never
            assert await wait_for(lambda: hole.connections >= 1)
            # the shadows time out on their own (route timeout 1 s)
            assert await wait_for(lambda: metric(p, "sidecar_shadow_requests_total", cluster="shadow",
                                                 outcome="timeout") == 20, timeout=3.0)
            assert metric(p, "sidecar_shadow_active") == 0
            assert b"\r\nhost: 127.0.0.1-shadow" in hole.received


async def test_dead_shadow_never_fails_primary():
    async with Upstream(name="primary") as prim:
        class Dead:
            address = f"127.0.0.1:{free_port()}"       # nothing listens there
        async with running_proxy(mirror_cfg(prim, Dead)) as p, aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.get(p.url("/")) as r:
                    assert r.status == 200
            assert await wait_for(lambda: metric(p, "sidecar_shadow_requests_total",
                                                 cluster="shadow", outcome="error") == 5)
        assert len(prim.requests) == 5


async def test_slow_shadow_bounded_concurrency(monkeypatch):
    monkeypatch.setattr(shadow_mod, "MAX_IN_FLIGHT", 3)
    async with Upstream(name="primary") as prim, BlackHole() as hole:
        async with running_proxy(mirror_cfg(prim, hole, timeout="5s")) as p, \
                aiohttp.ClientSession() as s:
            t = time.monotonic()
            for _ in range(10):
                async with s.get(p.url("/")) as r:
                    assert r.status == 200
            assert time.monotonic() - t < 1.0
            assert await wait_for(lambda: hole.connections == 3)
            assert metric(p, "sidecar_shadow_requests_total", cluster="shadow", outcome="overflow") == 7
            assert metric(p, "sidecar_shadow_active") == 3
            await finish_shadows(p)
            assert await wait_for(lambda: metric(p, "sidecar_shadow_active") == 0)


async def test_shadow_of_missing_cluster_is_counted():
    async with Upstream(name="primary") as prim, Upstream(name="shadow") as sh:
        cfg = mirror_cfg(prim, sh)
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            # the shadow cluster is gone from the cluster manager (e.g. removed by CDS while
            # the route still names it): the shadow is skipped and counted
            snap = p.app.store.snapshot
            p.app.clusters.apply(tuple(c for c in snap.clusters if c.name != "shadow"))
            async with s.get(p.url("/")) as r:
                assert r.status == 200
            assert metric(p, "sidecar_shadow_requests_total", cluster="shadow", outcome="no_upstream") == 1


# ---- share and config formats -----------------------------------------------------------------

async def test_mirror_percent_share():
    async with Upstream(name="primary") as prim, Upstream(name="shadow") as sh:
        cfg = mirror_cfg(prim, sh, mirror=[{"cluster": "shadow", "percent": 25}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            async def one():
                async with s.get(p.url("/")) as r:
                    await r.read()
            for _ in range(8):
                await asyncio.gather(*(one() for _ in range(50)))
            await asyncio.sleep(0.1)
        n = len(sh.requests)
        assert 60 <= n <= 140, n       # binomial(400, .25): mean 100, sd 8.7
        assert len(prim.requests) == 400


async def test_envoy_request_mirror_policies():
    async with Upstream(name="primary") as prim, Upstream(name="shadow") as sh:
        def sa(port):
            return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

        def cl(name, up):
            return {"name": name, "type": "STATIC", "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": name, "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": sa(up.port)}}]}]}}
        route = {"match": {"prefix": "/"}, "route": {"cluster": "primary", "request_mirror_policies": [
            {"cluster": "shadow", "runtime_fraction": {"default_value": {"numerator": 100}}}]}}
        hcm = {"@type": T_HCM, "stat_prefix": "in",
               "route_config": {"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [route]}]},
               "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER}}]}
        cfg = {"admin": {"address": sa(0)}, "static_resources": {
            "listeners": [{"name": "l", "address": sa(0), "filter_chains": [{"filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
            "clusters": [cl("primary", prim), cl("shadow", sh)]}}
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            async with s.get(p.url("/e"), headers={"host": "api.local"}) as r:
                assert r.status == 200
            assert await wait_for(lambda: len(sh.requests) == 1)
        assert sh.requests[0].headers["Host"] == "api.local-shadow"
