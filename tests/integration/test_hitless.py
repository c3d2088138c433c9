"""Hitless updates: route and endpoint changes from a control plane under continuous load drop
no request, an in-flight request finishes on the config it started with, and a route that moves
traffic to a cluster the sidecar does not have yet waits for it (make before break)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from sovereign_fixture import Sovereign, requires_sovereign, service

from control_plane_client.testing import eventually
from sidecar.testing import Upstream, free_port, running_proxy


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "cache"))


class Load:
    """Closed-loop load: ``workers`` clients on keep-alive connections, counting every request."""

    def __init__(self, port: int, workers: int = 4):
        self.port = port
        self.workers = workers
        self.sent = 0
        self.failed = 0
        self.failures: list[str] = []
        self.by_upstream: dict[str, int] = {}
        self.first_seen: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _worker(self) -> None:
        async with aiohttp.ClientSession() as s:
            while not self._stop.is_set():
                self.sent += 1
                try:
                    async with s.get(f"http://127.0.0.1:{self.port}/load") as r:
                        body = await r.json(content_type=None) if r.status == 200 else await r.text()
                        if r.status != 200:
                            self.failed += 1
                            self.failures.append(f"{r.status} {str(body)[:100]}")
                            continue
                        up = body["upstream"]
                        self.by_upstream[up] = self.by_upstream.get(up, 0) + 1
                        self.first_seen.setdefault(up, time.monotonic())
                except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                    self.failed += 1
                    self.failures.append(repr(e))

    def start(self) -> "Load":
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@requires_sovereign
async def test_route_change_under_load_sovereign(tmp_path, capsys):
    """One edit of sovereign's data moves "*" to a new service (a new EDS cluster and a route
    to it): under continuous load, no request fails."""
    async with Upstream(name="a") as a, Upstream(name="b") as b:
        lp = free_port()
        sov = Sovereign(tmp_path, [service("backend", [a.port], domains=["*"])], lp).start()
        try:
            async with running_proxy(sov.bootstrap()) as p:
                async with aiohttp.ClientSession() as s:
                    await eventually(lambda: s.get(f"http://127.0.0.1:{lp}/"), what="listener")
                load = Load(lp).start()
                await asyncio.sleep(1.0)
                t0 = time.monotonic()
                sov.set_services([service("backend", [a.port], domains=["backend.local"]),
                                  service("v2", [b.port], domains=["*"])])
                await eventually(lambda: load.by_upstream.get("b", 0) > 50, timeout=12,
                                 interval=0.1, what="traffic on the new route")
                await asyncio.sleep(1.0)
                await load.stop()
                switch_s = load.first_seen["b"] - t0
                cp = p.app.control_plane.dump()
            with capsys.disabled():
                print(f"\n[hitless/sovereign] route change under load: sent={load.sent} "
                      f"failed={load.failed} a={load.by_upstream.get('a', 0)} "
                      f"b={load.by_upstream.get('b', 0)} switch_after={switch_s:.2f}s")
            assert load.failed == 0, load.failures[:5]
            assert load.sent > 500 and load.by_upstream["a"] > 0 and load.by_upstream["b"] > 50
            assert cp["types"]["rds"]["rejected"] == 0 and cp["types"]["cds"]["rejected"] == 0
        finally:
            sov.stop()




@pytest.fixture
async def ads_server():
    pytest.importorskip("envoy_data_plane", reason="needs envoy-data-plane")
    from control_plane_client.ads_server import AdsServer
    s = await AdsServer().start()
    yield s
    await s.stop()


async def test_make_before_break_route_waits_for_new_cluster(ads_server, tmp_path):
    """The control plane sends the route to a new cluster first, and the cluster (then its
    endpoints) only later: the old route keeps serving until the new cluster can take traffic,
    then it switches. Under load: no request fails; each request saw one whole config."""
    from control_plane_client.resources import CDS, EDS, LDS, RDS
    from control_plane_client.testing import ads_bootstrap, cluster, listener, load_assignment, route

    srv = ads_server
    async with Upstream(name="a") as a, Upstream(name="b") as b:
        lp = free_port()
        srv.set(CDS, [cluster("v1")])
        srv.set(EDS, [load_assignment("v1", [a.port])])
        srv.set(LDS, [listener(lp)])
        srv.set(RDS, [route("main", "v1")])
        async with running_proxy(ads_bootstrap(srv.port, node_id="n")) as p:
            async with aiohttp.ClientSession() as s:
                await eventually(lambda: s.get(f"http://127.0.0.1:{lp}/"), what="listener")
            load = Load(lp).start()
            await asyncio.sleep(0.5)
            srv.set(RDS, [route("main", "v2")])                    # route first...
            await srv.wait(lambda: srv.acked("n", RDS) == "v2")
            await asyncio.sleep(0.5)
            cp = p.app.control_plane.dump()
            assert cp["warming"]["routes"] and "v2" in cp["warming"]["routes"][0]
            srv.set(CDS, [cluster("v1"), cluster("v2")])           # ...then the cluster
            await srv.wait(lambda: srv.acked("n", CDS) == "v2")
            await asyncio.sleep(0.5)
            assert p.app.control_plane.dump()["warming"]["clusters"] == ["v2"]
            assert load.by_upstream.get("b", 0) == 0
            srv.set(EDS, [load_assignment("v1", [a.port]), load_assignment("v2", [b.port])])
            await eventually(lambda: load.by_upstream.get("b", 0) > 50, timeout=5)
            await load.stop()
            assert load.failed == 0, load.failures[:5]
            assert load.by_upstream["a"] > 50
            assert p.app.control_plane.dump()["warming"] == {"clusters": [], "listeners": [],
                                                              "routes": []}


async def test_in_flight_request_finishes_on_its_config(ads_server):
    """A slow request started before a route change completes against the upstream its route
    chose; requests after the change take the new route."""
    from control_plane_client.resources import CDS, EDS, LDS, RDS
    from control_plane_client.testing import ads_bootstrap, cluster, listener, load_assignment, route

    srv = ads_server

    async def slow(request):
        await asyncio.sleep(1.0)
        return web.json_response({"upstream": "slow-a"})

    async with Upstream(slow, name="a") as a, Upstream(name="b") as b:
        lp = free_port()
        srv.set(CDS, [cluster("v1"), cluster("v2")])
        srv.set(EDS, [load_assignment("v1", [a.port]), load_assignment("v2", [b.port])])
        srv.set(LDS, [listener(lp)])
        srv.set(RDS, [route("main", "v1")])
        async with running_proxy(ads_bootstrap(srv.port, node_id="n")), \
                aiohttp.ClientSession() as s:
            await eventually(lambda: srv.acked("n", RDS) == "v1")
            await eventually(lambda: s.get(f"http://127.0.0.1:{lp}/"), what="listener")
            inflight = asyncio.ensure_future(s.get(f"http://127.0.0.1:{lp}/slow"))
            await asyncio.sleep(0.3)
            srv.set(RDS, [route("main", "v2")])
            await srv.wait(lambda: srv.acked("n", RDS) == "v2")
            async with s.get(f"http://127.0.0.1:{lp}/new") as r:
                assert (await r.json())["upstream"] == "b"
            r = await inflight
            assert r.status == 200 and (await r.json())["upstream"] == "slow-a"
            r.release()


async def test_endpoint_changes_under_load_ads(ads_server):
    """Endpoints added and removed under load (EDS only, applied in place): no request fails."""
    from control_plane_client.resources import CDS, EDS, LDS, RDS
    from control_plane_client.testing import ads_bootstrap, cluster, listener, load_assignment, route

    srv = ads_server
    ups = [await Upstream(name=n).start() for n in ("a", "b", "c")]
    try:
        lp = free_port()
        srv.set(CDS, [cluster("svc")])
        srv.set(EDS, [load_assignment("svc", [ups[0].port])])
        srv.set(LDS, [listener(lp)])
        srv.set(RDS, [route("main", "svc")])
        async with running_proxy(ads_bootstrap(srv.port, node_id="n")) as p:
            async with aiohttp.ClientSession() as s:
                await eventually(lambda: s.get(f"http://127.0.0.1:{lp}/"), what="listener")
            builds = p.app.control_plane.builds
            load = Load(lp).start()
            for ports in ([0, 1], [1, 2], [2], [0, 2], [0]):
                srv.set(EDS, [load_assignment("svc", [ups[i].port for i in ports])])
                await asyncio.sleep(0.4)
            await load.stop()
            assert load.failed == 0, load.failures[:5]
            assert set(load.by_upstream) == {"a", "b", "c"}
            assert p.app.control_plane.builds == builds      # all in place, no rebuild
    finally:
        for u in ups:
            await u.stop()
