"""Application probes through the sidecar: the app container's probes rewritten by injection,
carried as JSON, parsed by the sidecar, and run by its probe port against a real app server
over real HTTP/TCP (and HTTPS), requested the way the kubelet requests the rewritten probe. Then
the real sidecar process, started with the injected container's own env, serving them."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request

import aiohttp
import pytest
import yaml
from aiohttp import web
from k8s_objects import REPO, load_docs, replicaset_pod

from sidecar.cli.certs import DevCA
from sidecar.k8s import probe_rewrite
from sidecar.k8s.inject import PROXY_CONTAINER, inject
from sidecar.k8s.probes import MAX_IN_FLIGHT, start_prober
from sidecar.k8s.settings import InjectorConfig
from sidecar.testing import ProxyProcess, Upstream, free_port, wait_for_port

KUBELET_UA = "kube-probe/1.30"


class App:
    """The app behind the probes: /health answers ``status``; /slow waits for ``release``."""

    def __init__(self):
        self.status = 200
        self.release = asyncio.Event()
        self.slow_arrivals = 0
        self.upstream = Upstream(self.handle, name="app")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            self.slow_arrivals += 1
            await self.release.wait()
        if request.path == "/moved":
            raise web.HTTPFound("/elsewhere")
        return web.Response(status=self.status, text="app\n")


@pytest.fixture
async def app():
    a = App()
    await a.upstream.start()
    yield a
    a.release.set()
    await a.upstream.stop()


def web_container(port: int, **probes) -> dict:
    return {"name": "web", "image": "web:1",
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}], **probes}


async def prober_for(container: dict, ready=None):
    """Rewrite the container's probes as injection does and serve the carried ones."""
    rewritten, carried, warnings = probe_rewrite.rewrite_container_probes(container, 15020)
    assert not warnings
    probers = probe_rewrite.parse_probers(probe_rewrite.encode(carried))

    async def always_ready():
        return None
    runner, port = await start_prober(probers, ready or always_ready, "127.0.0.1", 0)
    return runner, port, rewritten


async def kubelet_get(port: int, path: str) -> tuple[int, str]:
    """What the kubelet does with the rewritten probe (port swapped to the test's)."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}",
                     headers={"User-Agent": KUBELET_UA}) as r:
        return r.status, await r.text()


def path_of(rewritten: dict, probe: str) -> str:
    return rewritten[probe]["httpGet"]["path"]


async def test_http_and_tcp_probes_follow_the_app(app):
    c = web_container(app.upstream.port,
                      readinessProbe={"httpGet": {"path": "/health", "port": "http",
                                                  "httpHeaders": [{"name": "X-Probe",
                                                                   "value": "ready"}]},
                                      "timeoutSeconds": 2},
                      livenessProbe={"tcpSocket": {"port": app.upstream.port}})
    runner, port, rw = await prober_for(c)
    try:
        ready, live = path_of(rw, "readinessProbe"), path_of(rw, "livenessProbe")
        assert (ready, live) == ("/app-health/web/readyz", "/app-health/web/livez")
        assert await kubelet_get(port, ready) == (200, "ok\n")
        assert await kubelet_get(port, live) == (200, "ok\n")
        seen = app.upstream.requests[-1]
        assert seen.path == "/health"
        assert seen.headers["X-Probe"] == "ready" and seen.headers["User-Agent"] == KUBELET_UA

        app.status = 500
        status, text = await kubelet_get(port, ready)
        assert status == 503 and "answered 500" in text
        app.status = 200
        assert (await kubelet_get(port, ready))[0] == 200

        await app.upstream.stop()                 # the app is gone
        status, text = await kubelet_get(port, ready)
        assert status == 503 and "ClientConnectorError" in text
        status, text = await kubelet_get(port, live)
        assert status == 503 and "ConnectionRefusedError" in text
    finally:
        await runner.cleanup()


async def test_redirects_count_as_success_and_are_not_followed(app):
    c = web_container(app.upstream.port,
                      readinessProbe={"httpGet": {"path": "/moved", "port": "http"}})
    runner, port, rw = await prober_for(c)
    try:
        assert (await kubelet_get(port, path_of(rw, "readinessProbe")))[0] == 200
        assert [r.path for r in app.upstream.requests] == ["/moved"]
    finally:
        await runner.cleanup()


async def test_a_probe_is_bounded_by_its_timeout_and_by_the_in_flight_limit(app):
    c = web_container(app.upstream.port,
                      startupProbe={"httpGet": {"path": "/slow", "port": "http"},
                                    "timeoutSeconds": 1})
    runner, port, rw = await prober_for(c)
    try:
        path = path_of(rw, "startupProbe")
        # MAX_IN_FLIGHT probes held by the app; one more is answered at once, not queued
        held = [asyncio.ensure_future(kubelet_get(port, path)) for _ in range(MAX_IN_FLIGHT)]
        while app.slow_arrivals < MAX_IN_FLIGHT:
            await asyncio.sleep(0.01)
        status, text = await kubelet_get(port, path)
        assert status == 503 and "already in flight" in text
        assert app.slow_arrivals == MAX_IN_FLIGHT
        # the held ones end at the probe's timeoutSeconds with the reason
        for status, text in await asyncio.gather(*held):
            assert status == 503 and "no answer within 1s" in text
        app.release.set()
        assert (await kubelet_get(port, path))[0] == 200      # the slots are free again
    finally:
        await runner.cleanup()


async def test_https_probes_do_not_verify_the_apps_certificate(tmp_path):
    ca = DevCA.create()
    cert, key = ca.issue("shop", "web", dns=["web.shop"]).write(str(tmp_path), "web")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    seen = []

    async def health(request):
        seen.append(request.scheme)
        return web.Response(text="ok")
    tls_app = web.Application()
    tls_app.router.add_get("/health", health)
    app_runner = web.AppRunner(tls_app)
    await app_runner.setup()
    await web.TCPSite(app_runner, "127.0.0.1", 0, ssl_context=ctx).start()
    app_port = app_runner.addresses[0][1]
    c = web_container(app_port, livenessProbe={"httpGet": {"path": "/health", "port": app_port,
                                                           "scheme": "HTTPS"}})
    runner, port, rw = await prober_for(c)
    try:
        assert (await kubelet_get(port, path_of(rw, "livenessProbe")))[0] == 200
        assert seen == ["https"]
    finally:
        await runner.cleanup()
        await app_runner.cleanup()


async def test_unknown_paths_and_the_sidecars_own_health():
    state = {"reason": None}

    async def ready():
        return state["reason"]
    runner, port = await start_prober({}, ready, "127.0.0.1", 0)
    try:
        assert (await kubelet_get(port, "/app-health/web/livez"))[0] == 404
        assert (await kubelet_get(port, "/app-health/../../etc"))[0] == 404
        assert await kubelet_get(port, "/healthz/live") == (200, "live\n")
        assert await kubelet_get(port, "/healthz/ready") == (200, "ready\n")
        state["reason"] = "draining"
        assert await kubelet_get(port, "/healthz/ready") == (503, "draining\n")
    finally:
        await runner.cleanup()


# ---- the real sidecar, with the env of an injected pod --------------------------------------------

def _injected_env(app_port: int) -> dict[str, str]:
    """Inject a pod whose app listens on ``app_port``; the proxy container's literal env."""
    pod = replicaset_pod()
    web_c = pod["spec"]["containers"][0]
    web_c["ports"][0]["containerPort"] = app_port
    web_c["readinessProbe"]["httpGet"]["port"] = app_port
    web_c["startupProbe"]["tcpSocket"]["port"] = app_port
    out = inject(pod, InjectorConfig())
    proxy = next(c for c in out.pod["spec"]["initContainers"] if c["name"] == PROXY_CONTAINER)
    return {e["name"]: e["value"] for e in proxy["env"] if "value" in e}, out.pod


def _sidecar_config(tmp_path, app_port: int) -> tuple[str, int, int]:
    """The example's sidecar config (deploy/kubernetes/injector) on free loopback ports."""
    cm = next(d for d in load_docs(REPO / "deploy" / "kubernetes" / "injector" /
                                   "example-app.yaml") if d["kind"] == "ConfigMap")
    cfg = yaml.safe_load(cm["data"]["sidecar.yaml"])
    admin = free_port()
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    for lst in cfg["static_resources"]["listeners"]:
        lst["address"]["socket_address"].update(address="127.0.0.1", port_value=free_port())
    for cl in cfg["static_resources"]["clusters"]:
        if cl["name"] == "local_app":
            ep = cl["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"]["socket_address"]["port_value"] = app_port
        else:
            cl["type"] = "STATIC"
            ep = cl["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"]["socket_address"].update(address="127.0.0.1", port_value=free_port())
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    inbound = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    return str(path), admin, inbound


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"User-Agent": KUBELET_UA})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("concurrency", ["1", "2"])
async def test_the_sidecar_serves_the_injected_pods_probes(app, tmp_path, concurrency):
    env, pod = _injected_env(app.upstream.port)
    cfg, admin, inbound = _sidecar_config(tmp_path, app.upstream.port)
    probe_port = free_port()
    env.update(SIDECAR_PROBE_PORT=str(probe_port), SIDECAR_PROBE_ADDRESS="127.0.0.1",
               SIDECAR_ADMIN_PORT=str(admin))
    web_c = pod["spec"]["containers"][0]
    with ProxyProcess(cfg, str(tmp_path), args=("--concurrency", concurrency), env=env) as proc:
        proc.start()
        await asyncio.to_thread(wait_for_port, probe_port, 20, proc)
        await asyncio.to_thread(wait_for_port, inbound, 20, proc)
        status = lambda p: asyncio.to_thread(_get, probe_port, p)
        # the sidecar's own probes, as injected
        proxy = next(c for c in pod["spec"]["initContainers"] if c["name"] == PROXY_CONTAINER)
        for probe in ("startupProbe", "livenessProbe"):
            assert (await status(proxy[probe]["httpGet"]["path"]))[0] == 200
        ready_path = proxy["readinessProbe"]["httpGet"]["path"]
        for _ in range(100):           # with workers, every worker must report ready first
            if (await status(ready_path))[0] == 200:
                break
            await asyncio.sleep(0.1)
        assert (await status(ready_path)) == (200, "ready\n")
        # the app's rewritten probes, run by the sidecar against the app
        assert (await status(web_c["readinessProbe"]["httpGet"]["path"]))[0] == 200
        assert (await status(web_c["startupProbe"]["httpGet"]["path"]))[0] == 200
        assert app.upstream.requests[-1].path == "/ready"
        app.status = 503
        code, text = await status(web_c["readinessProbe"]["httpGet"]["path"])
        assert code == 503 and "answered 503" in text
        # POST /healthcheck/fail on the admin port turns the sidecar's readiness
        assert (await asyncio.to_thread(_get, admin, "/healthcheck/fail", "POST"))[0] == 200
        code, text = await status(ready_path)
        assert code == 503 and "health check failed" in text
        assert proc.stop() == 0
        assert proc.log().count(f"probe port 127.0.0.1:{probe_port} (3 app probe(s))") == 1


def test_a_malformed_carried_probe_stops_the_sidecar_with_the_reason(tmp_path):
    cfg, _, _ = _sidecar_config(tmp_path, free_port())
    env = {"SIDECAR_PROBE_PORT": str(free_port()), "SIDECAR_PROBE_ADDRESS": "127.0.0.1",
           "SIDECAR_APP_PROBERS": json.dumps({"/app-health/web/livez": {"exec": {}}})}
    with ProxyProcess(cfg, str(tmp_path), env=env) as proc:
        proc.start()
        assert proc.proc.wait(30) == 1
        assert 'SIDECAR_APP_PROBERS["/app-health/web/livez"]: unknown field(s) exec' in proc.log()


def test_no_probe_port_without_the_env(tmp_path):
    """A sidecar outside Kubernetes (no SIDECAR_PROBE_PORT) opens no extra port."""
    cfg, admin, _ = _sidecar_config(tmp_path, free_port())
    env = {k: "" for k in ("SIDECAR_PROBE_PORT", "SIDECAR_APP_PROBERS")}
    with ProxyProcess(cfg, str(tmp_path), env=env) as proc:
        proc.start(wait_port=admin)
        assert "probe port" not in proc.log()
        assert proc.stop() == 0
