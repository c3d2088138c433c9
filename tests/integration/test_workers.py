"""Per-host daemon mode with several worker processes (``--concurrency N``, SO_REUSEPORT):
routing by Host and port to each local service, per-service metric labels, shared config
updates, aggregated admin, crash restart, clean shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml
from h2_helpers import H2Client
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.metrics import Metrics
from sidecar.runtime.workers import merged_metrics
from sidecar.testing import ProxyProcess, Upstream, free_port, wait_for_port
from tests.paths import REPO

N = 3


def per_host_config(port: int, port2: int, admin: int, orders: str, web: str, inventory: str,
                    body: str = "v1") -> dict:
    """One daemon for three services on this host: orders and web share port ``port`` (by
    Host), inventory has its own port."""
    return {
        "admin": {"address": "127.0.0.1", "port": admin},
        "listeners": [
            {"name": "http", "address": "127.0.0.1", "port": port, "virtual_hosts": [
                {"name": "orders", "domains": ["orders", "orders.local"],
                 "routes": [{"match": {"prefix": "/"}, "cluster": "orders"}]},
                {"name": "web", "domains": ["web", "web.local"],
                 "routes": [{"match": {"prefix": "/version"},
                             "direct_response": {"status": 200, "body": body}},
                            {"match": {"prefix": "/"}, "cluster": "web"}]}]},
            {"name": "inventory", "address": "127.0.0.1", "port": port2,
             "routes": [{"match": {"prefix": "/"}, "cluster": "inventory"}]},
        ],
        "clusters": [{"name": "orders", "endpoints": [orders]},
                     {"name": "web", "endpoints": [web]},
                     {"name": "inventory", "endpoints": [inventory]}],
    }


async def get(url, headers=None, fresh=True):
    """A GET on a new connection (so SO_REUSEPORT can pick any worker)."""
    conn = aiohttp.TCPConnector(force_close=fresh)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get(url, headers=headers or {}) as r:
            return r.status, await r.text()


def samples(text: str, name: str) -> dict:
    out = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
async def daemon(tmp_path):
    async with Upstream(name="orders") as orders, Upstream(name="web") as web, \
            Upstream(name="inventory") as inv:
        port, port2, admin = free_port(), free_port(), free_port()
        cfg = per_host_config(port, port2, admin, orders.address, web.address, inv.address)
        proc = ProxyProcess(cfg, str(tmp_path), args=("--concurrency", str(N)))
        proc.start()
        try:
            await asyncio.to_thread(wait_for_port, admin, 15, proc)
            await asyncio.to_thread(wait_for_port, port, 15, proc)
            base = f"http://127.0.0.1:{admin}"
            for _ in range(100):       # every worker up
                status, text = await get(base + "/ready")
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            yield {"proc": proc, "port": port, "port2": port2, "admin": base, "cfg": cfg,
                   "ups": {"orders": orders, "web": web, "inventory": inv}}
        finally:
            proc.stop()


async def test_routes_by_host_and_port_across_workers(daemon):
    d = daemon
    base = f"http://127.0.0.1:{d['port']}"
    results = await asyncio.gather(*[get(base + f"/o/{i}", {"Host": "orders"}) for i in range(40)],
                                   *[get(base + f"/w/{i}", {"Host": "web.local"}) for i in range(20)],
                                   *[get(f"http://127.0.0.1:{d['port2']}/i/{i}") for i in range(10)])
    assert all(s == 200 for s, _ in results)
    ups = d["ups"]
    assert len(ups["orders"].requests) == 40 and len(ups["web"].requests) == 20
    assert len(ups["inventory"].requests) == 10
    assert (await get(base + "/", {"Host": "unknown"}))[0] == 404
    # aggregated metrics: exact totals per service (virtual host / cluster labels)
    status, text = await get(d["admin"] + "/stats/prometheus")
    assert status == 200
    rq = samples(text, "sidecar_http_downstream_rq_total")
    by_vh = {}
    for k, v in rq.items():
        kd = dict(k)
        if kd["status_class"] == "2xx":
            by_vh[(kd["listener"], kd["virtual_host"])] = by_vh.get((kd["listener"], kd["virtual_host"]), 0) + v
    assert by_vh[("http", "orders")] == 40
    assert by_vh[("http", "web")] == 20
    assert by_vh[("inventory", "default")] == 10
    up_rq = samples(text, "sidecar_upstream_rq_total")
    assert up_rq[(("cluster", "orders"), ("status_class", "2xx"))] == 40
    assert samples(text, "sidecar_workers") == {(("worker", str(i)),): 1.0 for i in range(N)}
    # the kernel spread the connections over more than one worker
    status, text = await get(d["admin"] + "/stats/prometheus?per_worker=1")
    per = {}
    for k, v in samples(text, "sidecar_upstream_rq_total").items():
        kd = dict(k)
        if kd["cluster"] == "orders":
            per[kd["worker"]] = per.get(kd["worker"], 0) + v
    assert sum(per.values()) == 40
    assert sum(1 for v in per.values() if v > 0) >= 2, per


async def test_config_update_reaches_every_worker(daemon):
    d = daemon
    base = f"http://127.0.0.1:{d['port']}"
    assert (await get(base + "/version", {"Host": "web"})) == (200, "v1")
    ups = d["ups"]
    new = per_host_config(d["port"], d["port2"], int(d["admin"].rsplit(":", 1)[1]),
                          ups["orders"].address, ups["web"].address, ups["inventory"].address, body="v2")
    path = d["proc"].config_path
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(new, f)
    os.replace(path + ".tmp", path)
    end = time.monotonic() + 6
    while time.monotonic() < end:
        got = await asyncio.gather(*[get(base + "/version", {"Host": "web"}) for _ in range(15)])
        if all(g == (200, "v2") for g in got):
            break
        await asyncio.sleep(0.3)
    else:
        pytest.fail(f"not every worker reloaded: {got}")
    status, body = await get(d["admin"] + "/workers")
    versions = {w["config_version"] for w in json.loads(body)["workers"]}
    assert len(versions) == 1, versions


async def test_admin_readiness_and_healthcheck_fail_cover_all_workers(daemon):
    d = daemon
    assert (await get(d["admin"] + "/ready")) == (200, "LIVE\n")
    async with aiohttp.ClientSession() as s:
        async with s.post(d["admin"] + "/healthcheck/fail") as r:
            assert r.status == 200
    status, body = await get(d["admin"] + "/ready")
    assert status == 503
    for i in range(N):
        assert f"worker {i}: health check failed" in body
    async with aiohttp.ClientSession() as s:
        async with s.post(d["admin"] + "/healthcheck/ok") as r:
            assert r.status == 200
    assert (await get(d["admin"] + "/ready"))[0] == 200


async def test_crashed_worker_is_restarted_and_traffic_continues(daemon):
    d = daemon
    status, body = await get(d["admin"] + "/workers")
    workers = json.loads(body)["workers"]
    victim = next(w for w in workers if w["worker"] == 2)
    os.kill(victim["pid"], signal.SIGKILL)
    # connections the dead worker had (or had queued) are lost; new ones go to the others
    end = time.monotonic() + 5
    while "worker 2 died" not in d["proc"].log() and time.monotonic() < end:
        await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{d['port']}"
    results = await asyncio.gather(*[get(base + f"/x/{i}", {"Host": "orders"}) for i in range(30)])
    assert all(s == 200 for s, _ in results)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        workers = json.loads((await get(d["admin"] + "/workers"))[1])["workers"]
        w2 = next(w for w in workers if w["worker"] == 2)
        if w2.get("pid") not in (None, victim["pid"]) and w2.get("ready"):
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail(f"worker 2 not restarted: {workers}")
    assert "worker 2 died (signal 9): restarting it" in d["proc"].log()


async def test_sigterm_stops_every_worker(daemon):
    d = daemon
    pids = [w["pid"] for w in json.loads((await get(d["admin"] + "/workers"))[1])["workers"]]
    rc = await asyncio.to_thread(d["proc"].stop, signal.SIGTERM)
    assert rc == 0, d["proc"].log()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_refuses_port_zero_and_reports_bind_failure(tmp_path):
    cfg = {"listeners": [{"name": "l", "port": 0, "routes": [{"match": {"prefix": "/"},
                                                             "direct_response": {"status": 200}}]}],
           "admin": {"address": "127.0.0.1", "port": 0}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "sidecar", "run", "-c", str(p), "--concurrency", "2"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "needs fixed listener ports" in r.stderr
    # a port held by a socket without SO_REUSEPORT: every worker fails to bind, all stop
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        cfg["listeners"][0]["port"] = held.getsockname()[1]
        p.write_text(yaml.safe_dump(cfg))
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "sidecar", "run", "-c", str(p), "--concurrency", "2"],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 1, r.stderr
        assert "cannot start" in r.stderr
        assert time.monotonic() - t0 < 10


def test_merge_rules():
    def worker_text(rq: int, conns: int, version: str, start: float) -> str:
        m = Metrics()
        m.counter("sidecar_x_total", "x", ("a",)).labels("1").inc(rq)
        m.gauge("sidecar_cx_active", "c").set(conns)
        m.gauge("sidecar_config_info", "i", ("version",)).labels(version).set(1)
        m.gauge("sidecar_boot_start_time_seconds", "s").set(start)
        m.histogram("sidecar_t_seconds", "t").observe(0.2)
        return m.render()[0].decode()
    local = Metrics()
    local.counter("sidecar_x_total", "x", ("a",)).labels("1").inc(1)
    local.gauge("sidecar_cx_active", "c").set(2)
    local.gauge("sidecar_config_info", "i", ("version",)).labels("v1").set(1)
    local.gauge("sidecar_boot_start_time_seconds", "s").set(100)
    local.histogram("sidecar_t_seconds", "t").observe(0.2)
    others = {1: (200, worker_text(2, 3, "v1", 50)), 2: (200, worker_text(4, 0, "v2", 200)),
              3: (0, "worker 3 not answering")}
    text = merged_metrics(local, others)[0].decode()
    assert samples(text, "sidecar_x_total") == {(("a", "1"),): 7.0}
    assert samples(text, "sidecar_cx_active") == {(): 5.0}
    assert samples(text, "sidecar_config_info") == {(("version", "v1"),): 1.0, (("version", "v2"),): 1.0}
    assert samples(text, "sidecar_boot_start_time_seconds") == {(): 50.0}
    assert samples(text, "sidecar_t_seconds_count") == {(): 3.0}
    assert samples(text, "sidecar_t_seconds_bucket")[(("le", "0.25"),)] == 3.0
    assert samples(text, "sidecar_workers") == {(("worker", "0"),): 1.0, (("worker", "1"),): 1.0,
                                                (("worker", "2"),): 1.0, (("worker", "3"),): 0.0}
    om, ctype = merged_metrics(local, others, "application/openmetrics-text")
    assert "openmetrics" in ctype and om.decode().endswith("# EOF\n")


async def test_per_host_example(tmp_path):
    import re
    root = str(REPO)
    with open(os.path.join(root, "examples", "per-host", "sidecar.yaml")) as f:
        text = f.read()
    async with Upstream(name="orders") as o1, Upstream(name="orders-2") as o2, \
            Upstream(name="web") as web, Upstream(name="inventory") as inv:
        ports = {15080: free_port(), 15081: free_port(), 9901: free_port(), 8080: o1.port,
                 8083: o2.port, 8081: web.port, 8082: inv.port}
        for old, new in ports.items():
            text = re.sub(rf"(?<![\d.]){old}(?!\d)", str(new), text)
        cfg = tmp_path / "sidecar.yaml"
        cfg.write_text(text)
        with ProxyProcess(str(cfg), str(tmp_path), args=("--concurrency", "2")) as proc:
            proc.start()
            await asyncio.to_thread(wait_for_port, ports[9901], 15, proc)
            await asyncio.to_thread(wait_for_port, ports[15080], 15, proc)
            base = f"http://127.0.0.1:{ports[15080]}"
            got = await asyncio.gather(*[get(base + f"/o/{i}", {"Host": "orders"}) for i in range(10)])
            assert {json.loads(t)["upstream"] for _, t in got} == {"orders", "orders-2"}
            assert json.loads((await get(base + "/", {"Host": "web.local"}))[1])["upstream"] == "web"
            assert json.loads((await get(f"http://127.0.0.1:{ports[15081]}/items"))[1])["upstream"] == "inventory"
            assert (await get(base + "/", {"Host": "nope"}))[0] == 404
            workers = json.loads((await get(f"http://127.0.0.1:{ports[9901]}/workers"))[1])["workers"]
            assert len(workers) == 2


async def test_quitquitquit_drains_the_whole_group(daemon):
    d = daemon
    async with aiohttp.ClientSession() as s:
        async with s.post(d["admin"] + "/quitquitquit") as r:
            assert r.status == 200
    rc = await asyncio.to_thread(d["proc"].proc.wait, 15)
    assert rc == 0, d["proc"].log()


async def test_workers_die_with_the_supervisor(daemon):
    d = daemon
    pids = [w["pid"] for w in json.loads((await get(d["admin"] + "/workers"))[1])["workers"]]
    # the supervisor is SIGKILLed: its workers get SIGTERM from the kernel (PR_SET_PDEATHSIG)
    d["proc"].proc.kill()
    end = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < end:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(")")[-1].split()[0] != "Z":
                        alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        await asyncio.sleep(0.1)
    assert not alive, alive


async def test_http2_clients_across_workers(daemon):
    """HTTP/2 clients (prior knowledge) to the per-host daemon: each connection multiplexes
    streams, routed by ``:authority`` to each local service (HTTP/1.1 upstreams), the
    connections spread over the workers, the aggregated metrics exact."""
    d = daemon

    async def connection(authority: str, n: int) -> list[int]:
        async with H2Client(d["port"], authority=authority) as c:
            sids = [await c.start("GET", f"/h2/{i}") for i in range(n)]
            return [(await c.response(sid)).status for sid in sids]

    results = await asyncio.gather(*[connection("orders", 5) for _ in range(6)],
                                   *[connection("web.local", 5) for _ in range(6)],
                                   connection("unknown", 2))
    assert results[:12] == [[200] * 5] * 12 and results[12] == [404, 404]
    ups = d["ups"]
    assert len(ups["orders"].requests) == 30 and len(ups["web"].requests) == 30
    assert {r.path for r in ups["orders"].requests} == {f"/h2/{i}" for i in range(5)}
    status, text = await get(d["admin"] + "/stats/prometheus")
    by_vh: dict = {}
    for k, v in samples(text, "sidecar_http_downstream_rq_total").items():
        kd = dict(k)
        if kd["status_class"] == "2xx":
            by_vh[kd["virtual_host"]] = by_vh.get(kd["virtual_host"], 0) + v
    assert {vh: n for vh, n in by_vh.items() if n} == {"orders": 30, "web": 30}
    # the kernel spread the HTTP/2 connections over more than one worker
    status, text = await get(d["admin"] + "/stats/prometheus?per_worker=1")
    per: dict = {}
    for k, v in samples(text, "sidecar_upstream_rq_total").items():
        kd = dict(k)
        if kd["cluster"] in ("orders", "web"):
            per[kd["worker"]] = per.get(kd["worker"], 0) + v
    assert sum(per.values()) == 60
    assert sum(1 for v in per.values() if v > 0) >= 2, per
