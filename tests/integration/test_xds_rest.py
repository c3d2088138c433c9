"""xDS v3 REST/JSON against a real sovereign control plane on loopback (and a real Envoy 1.40 on
the same sovereign as the reference where it shows the same behaviour)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import aiohttp
import pytest
import yaml
from sovereign_fixture import Sovereign, requires_sovereign, service

from control_plane_client.testing import eventually, metric_value
from sidecar.testing import ProxyProcess, Upstream, free_port, running_proxy
from tests.paths import REPO


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
async def upstreams():
    ups = [await Upstream(name=n).start() for n in ("a", "b", "c")]
    yield ups
    for u in ups:
        await u.stop()


async def who(session, port, path="/x", host=None):
    headers = {"host": host} if host else {}
    async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as r:
        assert r.status == 200, (r.status, await r.text())
        return (await r.json())["upstream"]


async def dump(session, proxy) -> dict:
    async with session.get(proxy.admin_url + "/config_dump") as r:
        return (await r.json())["control_plane"]


@requires_sovereign
async def test_initial_load_and_endpoint_change(tmp_path, upstreams):
    a, b, c = upstreams
    lp = free_port()
    sov = Sovereign(tmp_path, [service("backend", [a.port, b.port])], lp).start()
    try:
        async with running_proxy(sov.bootstrap()) as p, aiohttp.ClientSession() as s:
            # initial load: CDS -> EDS, LDS -> RDS, all four over REST
            seen = set()
            await eventually(lambda: who(s, lp), what="listener from sovereign")
            for _ in range(8):
                seen.add(await who(s, lp))
            assert seen == {"a", "b"}
            cp = await dump(s, p)
            assert cp["state"] == "synced" and cp["api_type"] == "REST"
            for t, name in (("cds", "backend"), ("eds", "backend"), ("lds", "ingress"),
                            ("rds", "main")):
                assert cp["types"][t]["version"], t
                assert [r["name"] for r in cp["types"][t]["resources"]] == [name]
                assert cp["types"][t]["resources"][0]["last_updated"] > 0
            assert (await s.get(p.admin_url + "/ready")).status == 200
            state_a = p.app.clusters.get("backend").state.endpoints[a.address]
            # endpoint change: b out, c in; seen within a few polls (sovereign re-reads its
            # source every 1 s, RDS/EDS are polled every 1 s as the templates say)
            sov.set_services([service("backend", [a.port, c.port])])

            async def switched():
                got = {await who(s, lp) for _ in range(6)}
                return got == {"a", "c"}
            await eventually(switched, timeout=8, interval=0.2, what="endpoint change")
            assert p.app.clusters.get("backend").state.endpoints[a.address] is state_a   # kept
            cp = await dump(s, p)
            assert cp["types"]["eds"]["accepted"] >= 2
            polls = {k: v for src in cp["sources"] for k, v in src["polls"].items()}
            not_modified = sum(n for src in cp["sources"] for n in src["not_modified"].values())
            assert polls["cds"] >= 2 and not_modified >= 1     # 304 = no change
            text = await (await s.get(p.admin_url + "/stats/prometheus")).text()
            assert metric_value(text, "sidecar_xds_updates_total", type="eds", outcome="accepted") >= 2
            assert metric_value(text, "sidecar_xds_initialized") == 1
    finally:
        sov.stop()


ENVOY = shutil.which("envoy")


@requires_sovereign
async def test_invalid_resource_nack_old_config_serves(tmp_path, upstreams):
    """Duplicate domains in the RouteConfiguration: rejected (Envoy rejects it too: checked
    with a real Envoy on the same sovereign when the binary is there); the old routes serve."""
    a, b, _ = upstreams
    lp = free_port()
    sov = Sovereign(tmp_path, [service("backend", [a.port], domains=["*"]),
                               service("other", [b.port], domains=["other.local"])], lp).start()
    envoy = None
    envoy_lp = free_port()
    envoy_admin = free_port()
    if ENVOY:
        # the reference Envoy gets its own sovereign (same files) so both can bind their ports
        esov = Sovereign(tmp_path / "envoy", [service("backend", [a.port], domains=["*"]),
                                              service("other", [b.port], domains=["other.local"])],
                         envoy_lp).start()
        boot = esov.bootstrap(node_id="envoy-ref", admin_port=envoy_admin)
        (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(boot))
        elog = open(tmp_path / "envoy.log", "w")
        envoy = subprocess.Popen([ENVOY, "-c", str(tmp_path / "envoy.yaml"), "--log-level", "warn",
                                  "--base-id", str(os.getpid() % 50000 + 2000)],
                                 stdout=elog, stderr=subprocess.STDOUT)
    try:
        async with running_proxy(sov.bootstrap()) as p, aiohttp.ClientSession() as s:
            await eventually(lambda: who(s, lp), what="initial config")
            assert await who(s, lp, host="other.local") == "b"
            version = p.app.store.snapshot.version
            bad = [service("backend", [a.port], domains=["*"]),
                   service("other", [b.port], domains=["*"])]         # "*" twice
            sov.set_services(bad)
            cp = await eventually(
                lambda: _rejected(s, p, "rds"), timeout=8, interval=0.2, what="RDS NACK")
            nack = cp["types"]["rds"]["last_nack"]
            assert "domain '*' is already used" in nack["error"]
            assert cp["last_nack"]["type"] == "rds"
            # old config keeps serving, unchanged
            assert await who(s, lp) == "a" and await who(s, lp, host="other.local") == "b"
            assert p.app.store.snapshot.version == version
            # REST NACK is silent (as Envoy): the last good version is sent again, and the
            # same bad version is not re-validated on every poll
            await asyncio.sleep(2.5)
            cp = await dump(s, p)
            assert cp["types"]["rds"]["rejected"] == 1
            src = next(x for x in cp["sources"] if "rds" in x["versions"])
            assert src["rejected_versions"]["rds"] == nack["version"]
            assert src["versions"]["rds"] != nack["version"]
            text = await (await s.get(p.admin_url + "/stats/prometheus")).text()
            assert metric_value(text, "sidecar_xds_updates_total", type="rds", outcome="rejected") == 1
            if envoy is not None:
                esov.set_services(bad)
                stats = await eventually(lambda: _envoy_rejected(s, envoy_admin), timeout=10,
                                         interval=0.3, what="Envoy rejecting the same RDS")
                assert stats >= 1
                assert await who(s, envoy_lp) == "a"
                assert await who(s, envoy_lp, host="other.local") == "b"
            # fixed: accepted again
            sov.set_services([service("backend", [a.port], domains=["*"]),
                              service("other", [b.port], domains=["o2.local"])])
            await eventually(lambda: who(s, lp, host="o2.local"), timeout=8, interval=0.2)
    finally:
        sov.stop()
        if envoy is not None:
            envoy.terminate()
            envoy.wait(10)
            esov.stop()


async def _rejected(s, p, t):
    cp = await dump(s, p)
    return cp if cp["types"][t]["rejected"] else None


async def _envoy_rejected(s, admin_port):
    async with s.get(f"http://127.0.0.1:{admin_port}/stats?filter=rds.main.update_rejected") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.strip().endswith("update_rejected: 0"):
            return None
        if "update_rejected" in line:
            return int(line.rsplit(":", 1)[1])
    return None


@requires_sovereign
async def test_control_plane_killed_then_lkg_on_restart(tmp_path, upstreams):
    a, b, _ = upstreams
    lp = free_port()
    sov = Sovereign(tmp_path, [service("backend", [a.port])], lp).start()
    boot = sov.bootstrap()
    try:
        async with running_proxy(boot) as p, aiohttp.ClientSession() as s:
            await eventually(lambda: who(s, lp), what="initial config")
            cache_path = p.app.control_plane.lkg.cache.path
            await eventually(lambda: os.path.exists(cache_path), what="LKG written")
            sov.stop()                                  # the control plane dies
            await eventually(lambda: p.app.control_plane.last_error(), what="poll failure")
            for _ in range(5):                          # and the sidecar keeps serving
                assert await who(s, lp) == "a"
                await asyncio.sleep(0.2)
            assert (await s.get(p.admin_url + "/ready")).status == 200   # it was synced
            cp = await dump(s, p)
            assert any(src["last_error"] for src in cp["sources"])
        # restart the sidecar while the control plane is still down: the LKG cache serves
        async with running_proxy(boot) as p2, aiohttp.ClientSession() as s:
            assert await eventually(lambda: who(s, lp), timeout=8, what="LKG listener") == "a"
            r = await s.get(p2.admin_url + "/ready")
            body = await r.text()
            assert r.status == 200 and "last-known-good" in body and "unreachable" in body
            cp = await dump(s, p2)
            assert cp["state"] == "serving_last_known_good"
            assert cp["cache"]["serving_from_cache"] is True
            text = await (await s.get(p2.admin_url + "/stats/prometheus")).text()
            assert metric_value(text, "sidecar_xds_lkg_active") == 1
            assert metric_value(text, "sidecar_xds_lkg_loads_total", outcome="loaded") == 1
            # the control plane comes back (with a change): the sidecar syncs and is ready
            sov.set_services([service("backend", [b.port])])
            sov.start()
            await eventually(lambda: p2.app.control_plane.initialized, timeout=15,
                             what="resync after control plane restart")
            assert await eventually(lambda: _is(who(s, lp), "b"), timeout=8)
            assert (await s.get(p2.admin_url + "/ready")).status == 200
            text = await (await s.get(p2.admin_url + "/stats/prometheus")).text()
            assert metric_value(text, "sidecar_xds_lkg_active") == 0
    finally:
        sov.stop()


async def _is(coro, want):
    return (await coro) == want


EXAMPLE = REPO / "examples" / "control-plane"


@requires_sovereign
@pytest.mark.parametrize("config", ["sidecar.yaml", "sidecar-native.yaml"])
async def test_example_runs_as_documented(config, tmp_path, upstreams):
    """examples/control-plane: sovereign + the sidecar process (``sidecar run -c``), with the
    example's fixed ports rewritten to free ones."""
    a, b, _ = upstreams
    lp, admin = free_port(), free_port()
    sov = Sovereign(tmp_path, None, lp, src=EXAMPLE / "sovereign")
    services = (sov.dir / "services.yaml").read_text()
    assert "19001" in services and "19002" in services
    (sov.dir / "services.yaml").write_text(
        services.replace("19001", str(a.port)).replace("19002", str(b.port)))
    sov.start()
    text = (EXAMPLE / config).read_text()
    for old, new in (("8070", sov.port), ("9901", admin)):
        assert old in text
        text = text.replace(old, str(new))
    cfg = tmp_path / config
    cfg.write_text(text)
    env = {"SIDECAR_CACHE_DIR": str(tmp_path / "cache")}
    proxy = ProxyProcess(str(cfg), str(tmp_path), args=("--log-level", "warning"), env=env)
    try:
        proxy.start(wait_port=lp, timeout=20)
        async with aiohttp.ClientSession() as s:
            got = set()
            for _ in range(6):
                got.add(await eventually(lambda: who(s, lp), timeout=10))
            assert got == {"a", "b"}
            async with s.get(f"http://127.0.0.1:{admin}/ready") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{admin}/config_dump") as r:
                cp = (await r.json())["control_plane"]
            assert cp["state"] == "synced" and cp["types"]["rds"]["resources"][0]["name"] == "main"
        assert os.listdir(tmp_path / "cache")          # the LKG cache was written
    finally:
        proxy.stop()
        sov.stop()


def test_backoff_is_exponential_with_jitter_and_capped():
    from sidecar.core.backoff import Backoff
    b = Backoff(0.5, 4.0)
    delays = [b.next() for _ in range(8)]
    for n, d in enumerate(delays):
        cap = min(4.0, 0.5 * 2 ** n)
        assert cap / 2 <= d <= cap
    b.reset()
    assert b.next() <= 0.5


async def test_rest_protocol_against_an_in_test_server(upstreams):
    """A REST control plane written here (aiohttp): failures back off, 304 is no change, a
    cluster missing from a CDS response is removed (state of the world), a listener's route
    comes by name."""
    from aiohttp import web

    from control_plane_client.testing import cluster as cl
    from control_plane_client.testing import listener, load_assignment, route

    a, b, _ = upstreams
    lp = free_port()
    rest_src = {"resource_api_version": "V3", "api_config_source": {
        "api_type": "REST", "cluster_names": ["xds"], "refresh_delay": "0.1s"}}
    state = {"fail": 3, "clusters": [cl("one", config_source=rest_src),
                                     cl("two", config_source=rest_src)]}
    seen: list[tuple[str, dict]] = []

    async def handle(request):
        kind = request.match_info["kind"]
        body = await request.json()
        seen.append((kind, body))
        if state["fail"] > 0:
            state["fail"] -= 1
            return web.Response(status=503, text="warming up")
        res = {"clusters": state["clusters"],
               "endpoints": [load_assignment("one", [a.port]), load_assignment("two", [b.port])],
               "listeners": [listener(lp, config_source=rest_src)],
               "routes": [route("main", "one")]}[kind]
        if kind in ("endpoints", "routes"):
            res = [r for r in res if (r.get("name") or r.get("cluster_name")) in body["resource_names"]]
        version = str(hash(str(res)) & 0xffff)
        if body["version_info"] == version:
            return web.Response(status=304)
        return web.json_response({"version_info": version, "resources": res})

    app = web.Application()
    app.router.add_post("/v3/discovery:{kind}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    boot = {"node": {"id": "r1", "cluster": "c"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "dynamic_resources": {"cds_config": rest_src, "lds_config": rest_src},
            "static_resources": {"clusters": [{
                "name": "xds", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                    "cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {
                        "address": {"socket_address": {"address": "127.0.0.1",
                                                        "port_value": port}}}}]}]}}]}}
    try:
        async with running_proxy(boot) as p, aiohttp.ClientSession() as s:
            cp = p.app.control_plane
            assert await eventually(lambda: who(s, lp)) == "a"
            assert seen[0][1]["node"]["id"] == "r1" and seen[0][1]["version_info"] == ""
            assert seen[0][1]["type_url"].endswith("Cluster") or seen[0][1]["type_url"].endswith("Listener")
            assert sorted(c.name for c in p.app.clusters.clusters()) == ["one", "two", "xds"]
            eds_req = [b for k, b in seen if k == "endpoints"][-1]
            assert sorted(eds_req["resource_names"]) == ["one", "two"]
            await eventually(lambda: sum(sum(x["not_modified"].values())
                                         for x in cp.dump()["sources"]) > 3, what="304s")
            # state of the world: "two" is gone from CDS -> removed
            state["clusters"] = [cl("one", config_source=rest_src)]
            await eventually(lambda: p.app.clusters.get("two") is None, what="CDS removal")
            await eventually(lambda: cp.dump()["sources"][0]["subscriptions"].get("eds") == ["one"]
                             or any(x["subscriptions"].get("eds") == ["one"]
                                    for x in cp.dump()["sources"]), what="EDS unsubscribe")
            assert "two" not in {r["name"] for r in cp.dump()["types"]["eds"]["resources"]}
            assert await who(s, lp) == "a"
    finally:
        await runner.cleanup()
