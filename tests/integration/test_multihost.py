"""Several "hosts" on one machine: each host is a loopback address (127.0.0.2, .3, .4) with an
app and its sidecar (a real ``sidecar`` process in sidecar mode). Sidecars talk to each other
with mTLS (SPIFFE identities, rbac on inbound). One host's sidecar is killed mid-test: its
peer ejects it (outlier detection; retries on connect failure / reset hide the failures from
the app) and keeps serving.

    client -> [A: web inbound] -> web app -> [A: outbound] --mTLS--> [B: orders inbound] -> orders app
                                                             \\-mTLS--> [C: orders inbound] -> orders app
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.cli.certs import DevCA
from sidecar.testing import free_port

TD = "multihost.test"
HOSTS = {"A": "127.0.0.2", "B": "127.0.0.3", "C": "127.0.0.4"}

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


def _loopback_aliases_work() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.4", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _loopback_aliases_work(),
                                reason="this machine cannot bind 127.0.0.2-4")


def _port_free_everywhere() -> int:
    for _ in range(50):
        p = free_port()
        try:
            for ip in HOSTS.values():
                with socket.socket() as s:
                    s.bind((ip, p))
            return p
        except OSError:
            continue
    raise RuntimeError("no common free port")


class Host:
    def __init__(self, name: str, tmp, certs: dict, ports: dict, app_handler):
        self.name = name
        self.ip = HOSTS[name]
        self.tmp = tmp
        self.certs = certs
        self.ports = ports
        self.app_handler = app_handler
        self.requests: list[str] = []
        self.proc = None
        self.runner = None

    async def start_app(self):
        async def handle(request):
            self.requests.append(request.path)
            return await self.app_handler(self, request)
        a = web.Application()
        a.router.add_route("*", "/{t:.*}", handle)
        self.runner = web.AppRunner(a, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.ip, self.ports["app"]).start()

    def start_sidecar(self, cfg: dict):
        path = self.tmp / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.log_path = self.tmp / f"{self.name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(path)], stdout=self._log,
                                     stderr=subprocess.STDOUT)

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    def log(self) -> str:
        return self.log_path.read_text()

    async def stop(self):
        if self.runner is not None:          # the app first: the sidecar drains until it is gone
            await self.runner.cleanup()
            self.runner = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc is not None:
            self._log.close()


def orders_sidecar(h: Host, pki: dict) -> dict:
    web_id = f"spiffe://{TD}/ns/shop/sa/web"
    return {
        "admin": {"address": "127.0.0.1", "port": h.ports["admin"]},
        "sidecar": {
            "service": "orders", "app": f"{h.ip}:{h.ports['app']}",
            "app_health": {"interval": "0.2s"},
            "inbound": {"address": h.ip, "port": h.ports["inbound"],
                        "tls": {"cert": pki[h.name][0], "key": pki[h.name][1], "ca": pki["ca"]},
                        "filters": [{"rbac": {"action": "ALLOW", "policies": {"web": {
                            "permissions": [{"any": True}], "principals": [{"peer": web_id}]}}}}]},
        },
    }


def web_sidecar(h: Host, pki: dict, peers: list[Host]) -> dict:
    orders_id = f"spiffe://{TD}/ns/shop/sa/orders"
    return {
        "admin": {"address": "127.0.0.1", "port": h.ports["admin"]},
        "sidecar": {
            "service": "web", "app": f"{h.ip}:{h.ports['app']}",
            "app_health": {"interval": "0.2s"},
            "inbound": {"address": h.ip, "port": h.ports["inbound"]},
            "outbound": {"address": h.ip, "port": h.ports["outbound"], "routes": [
                {"match": {"prefix": "/orders"}, "cluster": "orders", "timeout": "5s",
                 "retry": {"retry_on": "connect-failure,reset,5xx", "retries": 3,
                           "per_try_timeout": "2s"}}]},
        },
        "clusters": [{
            "name": "orders", "connect_timeout": "1s",
            "endpoints": [f"{p.ip}:{p.ports['inbound']}" for p in peers],
            "tls": {"ca": pki["ca"], "cert": pki[h.name][0], "key": pki[h.name][1], "san": orders_id},
            # several callers retry at once when a host dies: more than Envoy's default 3
            # concurrent retries must be allowed, or the retry breaker answers 503 (UF) itself
            "circuit_breakers": {"max_retries": 50},
            "outlier_detection": {"consecutive_5xx": 2, "interval": "0.5s", "base_ejection_time": "30s",
                                  "max_ejection_percent": 50},
        }],
    }


async def _get(url, timeout=10.0):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(url) as r:
            return r.status, await r.text()


async def _wait_ready(h: Host, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if h.proc.poll() is not None:
            raise AssertionError(f"sidecar {h.name} exited:\n{h.log()}")
        try:
            if (await _get(h.admin + "/ready", 1.0))[0] == 200:
                return
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"sidecar {h.name} not ready:\n{h.log()}")


async def test_hosts_exchange_traffic_and_survive_a_dead_peer(tmp_path):
    ca = DevCA.create(TD)
    ca.write(str(tmp_path))
    pki = {"ca": str(tmp_path / "ca.pem")}
    for name, sa in (("A", "web"), ("B", "orders"), ("C", "orders")):
        pki[name] = ca.issue("shop", sa, ips=[HOSTS[name]]).write(str(tmp_path), f"host-{name}")
    inbound, outbound = _port_free_everywhere(), _port_free_everywhere()

    async def orders_app(h, request):
        return web.Response(text=f"order {request.path.rsplit('/', 1)[-1]} from host {h.name}")

    async def web_app(h, request):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{h.ip}:{outbound}/orders/{request.path.rsplit('/', 1)[-1]}") as r:
                return web.Response(status=r.status, text=await r.text())

    hosts = {n: Host(n, tmp_path, pki, {"app": free_port(), "admin": free_port(), "inbound": inbound,
                                        "outbound": outbound}, web_app if n == "A" else orders_app)
             for n in HOSTS}
    a, b, c = hosts["A"], hosts["B"], hosts["C"]
    try:
        for h in hosts.values():
            await h.start_app()
        b.start_sidecar(orders_sidecar(b, pki))
        c.start_sidecar(orders_sidecar(c, pki))
        a.start_sidecar(web_sidecar(a, pki, [b, c]))
        await asyncio.gather(*(_wait_ready(h) for h in hosts.values()))

        entry = f"http://{a.ip}:{inbound}/checkout"
        # both replicas serve, through two sidecars and mTLS
        results = [await _get(f"{entry}/{i}") for i in range(20)]
        assert all(s == 200 for s, _ in results), results
        served = {t.rsplit(" ", 1)[-1] for _, t in results}
        assert served == {"B", "C"}
        # the orders sidecars only let web's identity in
        with pytest.raises(aiohttp.ClientError):
            await _get(f"https://{b.ip}:{inbound}/orders/x")       # no client certificate

        # kill host C's sidecar in the middle of streams of requests
        stop = asyncio.Event()
        killed_at = []

        async def load(k):
            out, i = [], 0
            while not stop.is_set():
                out.append(await _get(f"{entry}/{1000 * k + i}"))
                i += 1
            return out

        async def kill_then_stop():
            await asyncio.sleep(0.5)
            c.proc.send_signal(signal.SIGKILL)
            killed_at.append(len(b.requests) + len(c.requests) - 20)   # stream requests so far
            await asyncio.sleep(1.5)
            stop.set()

        res = await asyncio.gather(*(load(k) for k in range(4)), kill_then_stop())
        during = [r for chunk in res[:4] for r in chunk]
        assert killed_at[0] >= 10 and len(during) - killed_at[0] >= 20   # before and after the kill
        assert all(s == 200 for s, _ in during), [r for r in during if r[0] != 200][:5]
        assert sum(1 for _, t in during if t.endswith("host C")) > 0   # C served until it died

        # A ejected C and keeps serving from B only
        c_addr = f"{c.ip}:{inbound}"
        end = time.monotonic() + 5
        view = None
        while time.monotonic() < end:
            view = json.loads((await _get(a.admin + "/clusters?format=json"))[1])
            hosts_view = {h["address"]: h for cl in view["clusters"] if cl["name"] == "orders"
                          for h in cl["hosts"]}
            if hosts_view[c_addr]["ejected"]:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"C not ejected: {view}")
        assert not hosts_view[f"{b.ip}:{inbound}"]["ejected"]
        c_before = hosts_view[c_addr]["rq_total"]
        after = [await _get(f"{entry}/{2000 + i}") for i in range(20)]
        assert all(s == 200 and t.endswith("host B") for s, t in after), after
        view = json.loads((await _get(a.admin + "/clusters?format=json"))[1])
        c_after = next(h for cl in view["clusters"] if cl["name"] == "orders"
                       for h in cl["hosts"] if h["address"] == c_addr)["rq_total"]
        assert c_after == c_before          # no attempt went to the ejected host
        metrics = (await _get(a.admin + "/stats/prometheus"))[1]
        enforced = sum(s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                       if s.name == "sidecar_upstream_outlier_ejections_by_reason_total"
                       and s.labels.get("cluster") == "orders")
        assert enforced >= 1
    finally:
        await asyncio.gather(*(h.stop() for h in hosts.values()), return_exceptions=True)
