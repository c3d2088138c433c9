"""Process lifecycle with the real CLI: SIGTERM drain, reloads (SIGHUP and file change)."""

import asyncio
import gc
import os
import signal
import time

import aiohttp
import yaml
from aiohttp import web

from sidecar.runtime.app import GC_YOUNG_THRESHOLD
from sidecar.testing import ProxyProcess, Upstream, free_port, running_proxy, wait_for_port


def cfg(port, admin, up_addr, body_prefix=None, **route_extra):
    route = {"match": {"prefix": "/"}, "cluster": "svc", **route_extra}
    if body_prefix:
        route["response_headers"] = {"set": {"x-config": body_prefix}}
    return {"admin": {"address": "127.0.0.1", "port": admin},
            "listeners": [{"name": "main", "address": "127.0.0.1", "port": port, "drain_timeout": "5s",
                           "routes": [route]}],
            "clusters": [{"name": "svc", "endpoints": [up_addr]}]}


async def test_sigterm_drains_in_flight_requests(tmp_path):
    async def slow(request):
        await asyncio.sleep(1.0)
        return web.Response(text="finished")
    async with Upstream(slow) as up:
        port, admin = free_port(), free_port()
        with ProxyProcess(cfg(port, admin, up.address), str(tmp_path)) as proc:
            proc.start(wait_port=port)
            async with aiohttp.ClientSession() as s:
                inflight = [asyncio.ensure_future(s.get(f"http://127.0.0.1:{port}/")) for _ in range(5)]
                await asyncio.sleep(0.3)
                proc.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                # draining: readiness fails and no new connections are accepted
                async with s.get(f"http://127.0.0.1:{admin}/ready") as r:
                    assert r.status == 503
                results = await asyncio.gather(*inflight)
                for r in results:
                    assert r.status == 200
                    assert await r.text() == "finished"
            rc = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 10)
            assert rc == 0


async def test_reload_on_sighup_and_file_change_and_bad_file_kept(tmp_path):
    async with Upstream() as up:
        port, admin = free_port(), free_port()
        proc = ProxyProcess(cfg(port, admin, up.address, "v1"), str(tmp_path))
        with proc:
            proc.start(wait_port=port)
            url = f"http://127.0.0.1:{port}/"
            async with aiohttp.ClientSession() as s:
                async with s.get(url) as r:
                    assert r.headers["x-config"] == "v1"
                # SIGHUP after rewriting the file (mtime may not change within a second)
                with open(proc.config_path, "w") as f:
                    yaml.safe_dump(cfg(port, admin, up.address, "v2"), f)
                proc.proc.send_signal(signal.SIGHUP)
                await wait_header(s, url, "v2")
                # an invalid file is refused; the old config keeps serving
                with open(proc.config_path, "w") as f:
                    f.write(f"listeners: [{{name: main, port: {port}, routes: [{{cluster: nope}}]}}]\n")
                os.utime(proc.config_path, (time.time() + 5, time.time() + 5))
                await asyncio.sleep(2.5)
                async with s.get(url) as r:
                    assert r.status == 200 and r.headers["x-config"] == "v2"
                async with s.get(f"http://127.0.0.1:{admin}/stats/prometheus") as r:
                    text = await r.text()
                assert 'sidecar_config_updates_total{outcome="rejected",source="file"} 1.0' in text
                # a good file change is picked up by the watcher
                with open(proc.config_path, "w") as f:
                    yaml.safe_dump(cfg(port, admin, up.address, "v3"), f)
                os.utime(proc.config_path, (time.time() + 10, time.time() + 10))
                await wait_header(s, url, "v3")
        assert "unknown cluster 'nope'" in proc.log()


async def wait_header(s, url, value, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        async with s.get(url) as r:
            if r.headers.get("x-config") == value:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"config {value} not applied")


async def test_reload_under_load_drops_no_request(tmp_path):
    async with Upstream() as up:
        port, admin = free_port(), free_port()
        proc = ProxyProcess(cfg(port, admin, up.address, "a"), str(tmp_path))
        with proc:
            proc.start(wait_port=port)
            url = f"http://127.0.0.1:{port}/"
            stop = False
            results = {"ok": 0, "failed": 0}

            async def client(s):
                while not stop:
                    try:
                        async with s.get(url) as r:
                            await r.read()
                            results["ok" if r.status == 200 else "failed"] += 1
                    except aiohttp.ClientError:
                        results["failed"] += 1

            async with aiohttp.ClientSession() as s:
                tasks = [asyncio.ensure_future(client(s)) for _ in range(8)]
                for i in range(6):
                    with open(proc.config_path, "w") as f:
                        yaml.safe_dump(cfg(port, admin, up.address, f"gen{i}"), f)
                    proc.proc.send_signal(signal.SIGHUP)
                    await asyncio.sleep(0.3)
                stop = True
                await asyncio.gather(*tasks)
            assert results["failed"] == 0, results
            assert results["ok"] > 100


async def test_admin_endpoints(tmp_path):
    async with Upstream() as up:
        port, admin = free_port(), free_port()
        with ProxyProcess(cfg(port, admin, up.address), str(tmp_path)) as proc:
            proc.start(wait_port=port)
            wait_for_port(admin)
            base = f"http://127.0.0.1:{admin}"
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/x") as r:
                    assert r.status == 200
                async with s.get(base + "/ready") as r:
                    assert r.status == 200
                async with s.get(base + "/config_dump") as r:
                    dump = await r.json()
                    assert dump["clusters"][0]["name"] == "svc"
                    assert dump["listeners"][0]["port"] == port
                async with s.get(base + "/clusters") as r:
                    text = await r.text()
                    assert f"svc::{up.address}::rq_total::1" in text
                async with s.get(base + "/stats/prometheus") as r:
                    text = await r.text()
                    assert 'sidecar_http_downstream_rq_total{listener="main",route="default",status_class="2xx",virtual_host="default"} 1.0' in text
                    assert 'sidecar_upstream_rq_total{cluster="svc",status_class="2xx"} 1.0' in text
                    assert "sidecar_downstream_cx_active" in text
                    assert "sidecar_config_info" in text
                async with s.post(base + "/healthcheck/fail") as r:
                    assert r.status == 200
                async with s.get(base + "/ready") as r:
                    assert r.status == 503
                async with s.post(base + "/healthcheck/ok") as r:
                    pass
                async with s.get(base + "/ready") as r:
                    assert r.status == 200
                async with s.post(base + "/drain_listeners") as r:
                    assert r.status == 200
                await asyncio.sleep(0.3)
                async with s.get(base + "/ready") as r:
                    assert r.status == 503
                async with s.post(base + "/quitquitquit") as r:
                    assert r.status == 200
            rc = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 10)
            assert rc == 0


async def test_admin_binds_loopback_by_default():
    from sidecar.runtime.loader import snapshot_from_doc as snapshot
    snap = snapshot({"listeners": [], "clusters": []})
    assert snap.admin.host == "127.0.0.1"


async def test_start_sets_the_collectors_young_generation():
    """A started proxy collects its young generation every GC_YOUNG_THRESHOLD allocations, not
    CPython's 700 (docs/performance.md: the collector's share of an HTTP/2 request)."""
    before = gc.get_threshold()
    gc.set_threshold(700, before[1], before[2])
    try:
        async with Upstream() as up, running_proxy(cfg(free_port(), free_port(), up.address)):
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)
