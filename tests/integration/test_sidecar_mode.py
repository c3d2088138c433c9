"""Sidecar mode: inbound + outbound listeners for one app, app readiness, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml
from aiohttp import web

from sidecar.config.errors import ConfigErrors
from sidecar.config.listener import APP_CLUSTER
from sidecar.runtime.sidecar_mode import attach
from sidecar.testing import Upstream, free_port, running_proxy, to_snapshot, wait_for_port
from tests.paths import REPO


def sidecar_cfg(app_port: int, *, inbound: dict | None = None, outbound: dict | None = None,
                clusters: list | None = None, **sc) -> dict:
    inbound = {"address": "127.0.0.1", "port": 0, **(inbound or {})}
    s = {"service": "orders", "app": app_port, "inbound": inbound,
         "app_health": {"interval": "0.1s", "timeout": "0.5s"}, **sc}
    if outbound is not None:
        s["outbound"] = {"address": "127.0.0.1", "port": 0, **outbound}
    return {"admin": {"address": "127.0.0.1", "port": 0}, "sidecar": s, "clusters": clusters or []}


async def fetch(url, method="GET", **kw):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, **kw) as r:
            return r.status, await r.text()


async def wait_until(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await pred():
            return True
        await asyncio.sleep(0.05)
    return False


class App:
    """The 'local app': an aiohttp server that may be started and stopped by the test."""

    def __init__(self, port: int, handler=None):
        self.port = port
        self.handler = handler
        self.healthy = True
        self.runner = None

    async def start(self):
        async def default(request):
            return web.Response(text=f"app got {request.path}")

        async def healthz(request):
            return web.Response(status=200 if self.healthy else 503, text="health")

        a = web.Application()
        a.router.add_get("/healthz", healthz)
        a.router.add_route("*", "/{t:.*}", self.handler or default)
        self.runner = web.AppRunner(a, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self):
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


# ---- config -----------------------------------------------------------------------------------

def test_sidecar_section_expands_to_two_listeners_and_the_app_cluster():
    snap = to_snapshot(sidecar_cfg(8080, outbound={"routes": [{"match": {"prefix": "/"}, "cluster": "payments"}]},
                                   clusters=[{"name": "payments", "endpoints": ["127.0.0.1:9"]}]))
    by_name = {l.name: l for l in snap.listeners}
    assert by_name["inbound"].direction == "inbound" and by_name["outbound"].direction == "outbound"
    app = snap.cluster(APP_CLUSTER)
    assert [e.address for e in app.endpoints] == ["127.0.0.1:8080"]
    assert app.lb.panic_threshold == 0
    sc = snap.sidecar
    assert (sc.service, sc.app_host, sc.app_port, sc.health_path) == ("orders", "127.0.0.1", 8080, None)
    # defaults: inbound on every interface, outbound on loopback
    snap = to_snapshot({"sidecar": {"app": "10.0.0.5:3000",
                                    "outbound": {"routes": [{"match": {"prefix": "/"},
                                                             "direct_response": {"status": 200}}]}}})
    by_name = {l.name: l for l in snap.listeners}
    assert (by_name["inbound"].host, by_name["inbound"].port) == ("0.0.0.0", 15006)
    assert (by_name["outbound"].host, by_name["outbound"].port) == ("127.0.0.1", 15001)
    assert snap.sidecar.app_host == "10.0.0.5"


@pytest.mark.parametrize("sc, err", [
    ({}, "sidecar.app: is required (the local app's port or host:port)"),
    ({"app": "x:y"}, "sidecar.app: must be a port or host:port, got 'x:y'"),
    ({"app": 70000}, "sidecar.app: port must be 1..65535"),
    ({"app": 80, "inbound": {"name": "x"}}, "sidecar.inbound.name: is set by the sidecar section"),
    ({"app": 80, "inbound": {"bogus": 1}}, "sidecar.inbound.bogus: unknown or unsupported field"),
    ({"app": 80, "outbound": {"routes": [{"match": {"prefix": "/"}, "cluster": "nope"}]}},
     "sidecar.outbound.routes[0]: unknown cluster 'nope'"),
    ({"app": 80, "outbound": {}}, "sidecar.outbound: needs routes or virtual_hosts (the services the app calls)"),
    ({"app": 80, "app_health": {"path": "healthz"}}, "sidecar.app_health.path: must start with /"),
    ({"app": 80, "extra": 1}, "sidecar.extra: unknown or unsupported field"),
])
def test_sidecar_section_errors(sc, err):
    with pytest.raises(ConfigErrors) as e:
        to_snapshot({"sidecar": sc})
    assert [str(x) for x in e.value.errors] == [err]


def test_local_app_cluster_name_is_reserved():
    with pytest.raises(ConfigErrors) as e:
        to_snapshot({"sidecar": {"app": 80}, "clusters": [{"name": "local_app", "endpoints": ["127.0.0.1:1"]}]})
    assert "reserved" in str(e.value)


# ---- readiness ----------------------------------------------------------------------------------

async def test_app_started_after_the_sidecar():
    port = free_port()
    async with running_proxy(sidecar_cfg(port)) as p:
        rt = attach(p.app)
        assert attach(p.app) is rt                     # idempotent
        inbound = p.url("/orders/7", "inbound")
        await wait_until(lambda: _probed(rt))
        status, body = await fetch(p.admin_url + "/ready")
        assert status == 503 and "not reachable" in body
        status, body = await fetch(inbound)
        assert (status, body) == (503, "no healthy upstream")
        app = await App(port).start()
        try:
            assert await wait_until(lambda: _ready(p))
            assert await fetch(inbound) == (200, "app got /orders/7")
            assert "sidecar_app_up{service=\"orders\"} 1.0" in (await fetch(p.admin_url + "/stats/prometheus"))[1]
        finally:
            await app.stop()
        # the app goes away: not ready again, inbound 503
        assert await wait_until(lambda: _not_ready(p))
        assert (await fetch(inbound))[0] == 503


async def test_app_health_path_gates_inbound():
    port = free_port()
    app = App(port)
    app.healthy = False
    await app.start()
    try:
        cfg = sidecar_cfg(port, app_health={"path": "/healthz", "interval": "0.1s"})
        async with running_proxy(cfg) as p:
            rt = attach(p.app)
            await wait_until(lambda: _probed(rt))
            status, body = await fetch(p.admin_url + "/ready")
            assert status == 503 and "/healthz answered 503" in body
            # the app listens but says it is not ready: inbound does not send it traffic
            assert (await fetch(p.url("/x", "inbound")))[0] == 503
            app.healthy = True
            assert await wait_until(lambda: _ready(p))
            assert await fetch(p.url("/x", "inbound")) == (200, "app got /x")
    finally:
        await app.stop()


async def test_inbound_filters_and_outbound_routes():
    """Inbound applies the listener filters (here: rbac) before the app; the app's calls go
    out through the outbound listener's routes."""
    port = free_port()
    async with Upstream(name="payments") as payments:
        cfg = sidecar_cfg(
            port,
            inbound={"filters": [{"rbac": {"action": "DENY", "policies": {"no-admin": {
                "permissions": [{"path": {"prefix": "/admin"}}], "principals": [{"any": True}]}}}}]},
            outbound={"routes": [{"match": {"prefix": "/pay"}, "cluster": "payments",
                                  "retry": {"retry_on": "5xx", "retries": 1}}]},
            clusters=[{"name": "payments", "endpoints": [payments.address]}])
        async with running_proxy(cfg) as p:
            attach(p.app)
            out_url = p.url("/pay/1", "outbound")

            async def handler(request):
                async with aiohttp.ClientSession() as s:
                    async with s.get(out_url) as r:
                        return web.Response(text=f"paid via sidecar: {r.status}")

            app = await App(port, handler).start()
            try:
                assert await wait_until(lambda: _ready(p))
                assert await fetch(p.url("/checkout", "inbound")) == (200, "paid via sidecar: 200")
                assert [r.path for r in payments.requests] == ["/pay/1"]
                assert (await fetch(p.url("/admin", "inbound")))[0] == 403
            finally:
                await app.stop()


async def _probed(rt):
    return rt.app_up is not None


async def _ready(p):
    return (await fetch(p.admin_url + "/ready"))[0] == 200


async def _not_ready(p):
    return (await fetch(p.admin_url + "/ready"))[0] == 503


# ---- lifecycle: SIGTERM drains inbound first, outbound while the app runs --------------------

RUNNER = """
import asyncio, sys
from sidecar.admin.server import start_admin
from sidecar.runtime.app import App, install_uvloop, setup_logging
from sidecar.runtime.loader import load_file

async def main(path):
    app = App(load_file(path), config_path=path, admin=start_admin)
    await app.start()
    await app.run_until_stopped()

setup_logging("info")
install_uvloop()
asyncio.run(main(sys.argv[1]))
"""


async def test_sigterm_drains_before_the_app_stops(tmp_path):
    app_port, in_port, out_port, admin = free_port(), free_port(), free_port(), free_port()
    async with Upstream(name="payments") as payments:
        cfg = {"admin": {"address": "127.0.0.1", "port": admin},
               "sidecar": {"app": app_port, "app_health": {"interval": "0.1s"},
                           "inbound": {"address": "127.0.0.1", "port": in_port, "drain_timeout": "5s"},
                           "outbound": {"address": "127.0.0.1", "port": out_port, "drain_timeout": "5s",
                                        "routes": [{"match": {"prefix": "/"}, "cluster": "payments"}]}},
               "clusters": [{"name": "payments", "endpoints": [payments.address]}]}
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = open(tmp_path / "log", "w")
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(path)], stdout=log,
                                stderr=subprocess.STDOUT)
        started = asyncio.Event()
        finish = asyncio.Event()

        async def slow(request):
            # the app is busy with a request when the pod is told to stop; after SIGTERM it still
            # needs its sidecar's outbound listener to finish the work
            started.set()
            await finish.wait()
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{out_port}/after-sigterm") as r:
                    return web.Response(text=f"done ({r.status})")

        app = await App(app_port, slow).start()
        try:
            await asyncio.to_thread(wait_for_port, admin, 15)
            base = f"http://127.0.0.1:{admin}"
            assert await wait_until(lambda: _ready_url(base), 10)
            inflight = asyncio.create_task(fetch(f"http://127.0.0.1:{in_port}/work"))
            await asyncio.wait_for(started.wait(), 5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await wait_until(lambda: _not_ready_url(base), 3)
            assert "draining" in (await fetch(base + "/ready"))[1]
            # no new inbound connections while draining
            with pytest.raises(aiohttp.ClientError):
                await fetch(f"http://127.0.0.1:{in_port}/new")
            finish.set()
            assert await asyncio.wait_for(inflight, 10) == (200, "done (200)")
            assert [r.path for r in payments.requests] == ["/after-sigterm"]
            # the sidecar keeps its outbound listener while the app runs...
            await asyncio.sleep(0.5)
            assert proc.poll() is None
            assert (await fetch(f"http://127.0.0.1:{out_port}/still-there"))[0] == 200
        finally:
            await app.stop()          # ...and exits once the app has stopped
        rc = await asyncio.to_thread(proc.wait, 10)
        log.close()
        text = (tmp_path / "log").read_text()
        assert rc == 0, text
        assert time.monotonic() - t0 < 8
        assert "app stopped: draining outbound listeners" in text


async def _ready_url(base):
    try:
        return (await fetch(base + "/ready"))[0] == 200
    except aiohttp.ClientError:
        return False


async def _not_ready_url(base):
    try:
        return (await fetch(base + "/ready"))[0] == 503
    except aiohttp.ClientError:
        return False


# ---- examples/sidecar-mode, end to end --------------------------------------------------------

EXAMPLE = os.path.join(str(REPO), "examples",
                       "sidecar-mode")


def _rewrite_ports(text: str, ports: dict[int, int]) -> str:
    import re
    for old, new in ports.items():
        text = re.sub(rf"(?<![\d.]){old}(?!\d)", str(new), text)
    return text


async def test_example_configs(tmp_path):
    from sidecar.cli.certs import DevCA
    ca = DevCA.create("example.org")
    ca.write(str(tmp_path / "certs"))
    for sa in ("orders", "web"):
        ca.issue("shop", sa).write(str(tmp_path / "certs"), sa)
    fixed = (8080, 8081, 8090, 15006, 15001, 15106, 15101, 9901, 9902)
    ports = {p: free_port() for p in fixed}
    for name in ("orders.yaml", "web.yaml"):
        with open(os.path.join(EXAMPLE, name)) as f:
            (tmp_path / name).write_text(_rewrite_ports(f.read(), ports))
    procs, logs = [], []
    apps = None
    try:
        for name in ("orders.yaml", "web.yaml"):
            log = open(tmp_path / f"{name}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-c", RUNNER, name], cwd=str(tmp_path),
                                          stdout=log, stderr=subprocess.STDOUT))
        orders_admin = f"http://127.0.0.1:{ports[9901]}"
        await asyncio.to_thread(wait_for_port, ports[9901], 15)
        await asyncio.to_thread(wait_for_port, ports[9902], 15)
        status, body = await fetch(orders_admin + "/ready")
        assert status == 503 and "not reachable" in body          # the apps are not up yet
        env = dict(os.environ, ORDERS_PORT=str(ports[8080]), WEB_PORT=str(ports[8081]),
                   PAYMENTS_PORT=str(ports[8090]), WEB_OUTBOUND=f"http://127.0.0.1:{ports[15101]}",
                   ORDERS_OUTBOUND=f"http://127.0.0.1:{ports[15001]}")
        apps = subprocess.Popen([sys.executable, os.path.join(EXAMPLE, "apps.py")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        assert await wait_until(lambda: _ready_url(orders_admin), 15)
        assert await wait_until(lambda: _ready_url(f"http://127.0.0.1:{ports[9902]}"), 15)
        status, body = await fetch(f"http://127.0.0.1:{ports[15106]}/checkout/42")
        assert status == 200, body
        assert yaml.safe_load(body) == {"order": "42", "payment": "paid 42"}
        with pytest.raises(aiohttp.ClientError):        # orders' inbound wants web's certificate
            await fetch(f"https://127.0.0.1:{ports[15006]}/orders/1", ssl=False)
    finally:
        if apps is not None:
            apps.terminate()
            apps.wait(10)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
