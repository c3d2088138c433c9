"""Last-known-good cache: atomic, versioned, checksummed; used at start when the control plane is
unreachable (and said so in /ready, logs and metrics); a corrupted file is refused."""

from __future__ import annotations

import json
import logging
import os

import aiohttp
import pytest

from control_plane_client.cache import FORMAT_VERSION, CacheError, LkgCache, cache_file_name
from control_plane_client.testing import eventually, metric_value
from sidecar.testing import Upstream, free_port, running_proxy

RES = {"type.googleapis.com/envoy.config.cluster.v3.Cluster": [
    {"name": "svc", "version": "7", "resource": {"name": "svc", "type": "STATIC"}}]}


def test_roundtrip_atomic_and_versioned(tmp_path):
    c = LkgCache(str(tmp_path / "d" / cache_file_name("node/1")), "node/1")
    assert c.path.endswith("xds-lkg-node_1.json")
    assert c.load() is None                                  # no file: nothing, no error
    c.write(c.encode({"cds": "7"}, RES))
    c.write(c.encode({"cds": "8"}, RES))
    doc = LkgCache(c.path, "node/1").load()
    assert doc["versions"] == {"cds": "8"} and doc["generation"] == 2
    assert doc["format_version"] == FORMAT_VERSION and doc["resources"] == RES
    assert os.listdir(tmp_path / "d") == [os.path.basename(c.path)]     # no temp files left
    assert oct(os.stat(tmp_path / "d").st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw.replace(b'"svc"', b'"svx"', 1), "checksum mismatch"),
    (lambda raw: raw[: len(raw) // 2], "not valid JSON"),
    (lambda raw: b"\x00\xff" + raw, "not valid JSON"),
    (lambda raw: json.dumps({**json.loads(raw), "format_version": 99}).encode(), "format_version"),
    (lambda raw: json.dumps({**json.loads(raw), "format": "other"}).encode(), "not a pysidecar"),
])
def test_corrupted_cache_refused(tmp_path, damage, message):
    c = LkgCache(str(tmp_path / "lkg.json"), "n")
    c.write(c.encode({"cds": "7"}, RES))
    with open(c.path, "rb") as f:
        raw = f.read()
    with open(c.path, "wb") as f:
        f.write(damage(raw))
    with pytest.raises(CacheError, match=message):
        LkgCache(c.path, "n").load()


def test_cache_of_another_node_refused(tmp_path):
    c = LkgCache(str(tmp_path / "lkg.json"), "n1")
    c.write(c.encode({}, RES))
    with pytest.raises(CacheError, match="saved for node 'n1'"):
        LkgCache(c.path, "n2").load()


# ---- at start, with the control plane down ------------------------------------------------

envoy_data_plane = pytest.importorskip("envoy_data_plane", reason="uses the in-test ADS server")


async def test_lkg_serves_when_control_plane_unreachable(tmp_path, monkeypatch, caplog):
    from control_plane_client.ads_server import AdsServer
    from control_plane_client.resources import CDS, EDS, LDS, RDS
    from control_plane_client.testing import ads_bootstrap, cluster, listener, load_assignment, route

    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "cache"))
    lp = free_port()
    async with Upstream(name="a") as a, Upstream(name="b") as b:
        srv = await AdsServer().start()
        port = srv.port
        srv.set(CDS, [cluster("svc")])
        srv.set(EDS, [load_assignment("svc", [a.port])])
        srv.set(LDS, [listener(lp)])
        srv.set(RDS, [route("main", "svc")])
        boot = ads_bootstrap(port, node_id="lkg-node")
        async with running_proxy(boot) as p, aiohttp.ClientSession() as s:
            await eventually(lambda: s.get(f"http://127.0.0.1:{lp}/"), what="listener")
            cache = p.app.control_plane.lkg.cache
            await eventually(lambda: p.app.control_plane.lkg.status == "saved")
            srv.set(EDS, [load_assignment("svc", [b.port])])       # every accepted update saved
            await eventually(lambda: json.load(open(cache.path))["versions"]["eds"] == "v2")
            saved = json.load(open(cache.path))
            assert {t.rsplit(".", 1)[1] for t in saved["resources"]} == {
                "Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration"}
        await srv.stop()

        caplog.set_level(logging.WARNING, logger="sidecar.xds")
        async with running_proxy(boot) as p, aiohttp.ClientSession() as s:
            async with await eventually(lambda: s.get(f"http://127.0.0.1:{lp}/"),
                                        what="listener from the cache") as r:
                assert (await r.json())["upstream"] == "b"
            r = await s.get(p.admin_url + "/ready")
            body = await r.text()
            # serving from the cache is ready (the data plane works), and /ready says why
            assert r.status == 200 and body.startswith("LIVE")
            assert "last-known-good" in body and cache.path in body and "unreachable" in body
            assert any("serving the last-known-good config" in m for m in caplog.messages)
            text = await (await s.get(p.admin_url + "/stats/prometheus")).text()
            assert metric_value(text, "sidecar_xds_lkg_active") == 1
            assert metric_value(text, "sidecar_xds_lkg_loads_total", outcome="loaded") == 1
            cp = (await (await s.get(p.admin_url + "/config_dump")).json())["control_plane"]
            assert cp["state"] == "serving_last_known_good"
            assert cp["types"]["eds"]["version"] == "v2"
            # the control plane is back: its config replaces the cache's, and /ready is 200
            srv = AdsServer()
            srv._versions = {(None, t): 10 for t in (CDS, EDS, LDS, RDS)}
            srv.set(CDS, [cluster("svc")])
            srv.set(EDS, [load_assignment("svc", [a.port])])
            srv.set(LDS, [listener(lp)])
            srv.set(RDS, [route("main", "svc")])
            await srv.start(port=port)
            try:
                await eventually(lambda: p.app.control_plane.initialized, timeout=10)
                await eventually(lambda: srv.acked("lkg-node", EDS) == "v11")
                async with s.get(f"http://127.0.0.1:{lp}/") as r:
                    assert (await r.json())["upstream"] == "a"
                assert (await s.get(p.admin_url + "/ready")).status == 200
                await eventually(lambda: json.load(open(cache.path))["versions"]["eds"] == "v11")
            finally:
                await srv.stop()


async def test_corrupted_cache_is_refused_at_start(tmp_path, monkeypatch):
    from control_plane_client.testing import ads_bootstrap

    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path))
    port = free_port()                     # nothing listens there: the control plane is down
    c = LkgCache(str(tmp_path / cache_file_name("n")), "n")
    lp = free_port()
    listener = {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": lp}},
                "filter_chains": []}
    c.write(c.encode({"lds": "1"}, {"type.googleapis.com/envoy.config.listener.v3.Listener": [
        {"name": "l", "version": "1", "resource": listener}]}))
    raw = open(c.path, "rb").read()
    open(c.path, "wb").write(raw.replace(str(lp).encode(), str(lp + 1).encode()))
    async with running_proxy(ads_bootstrap(port, node_id="n")) as p, aiohttp.ClientSession() as s:
        cp = p.app.control_plane
        await eventually(lambda: cp.lkg.status.startswith("refused"), timeout=10)
        assert "checksum mismatch" in cp.lkg.status
        r = await s.get(p.admin_url + "/ready")
        body = await r.text()
        assert r.status == 503 and "cache refused" in body and "checksum" in body
        assert p.app.store.listeners == {}                       # nothing untrusted serves
        text = await (await s.get(p.admin_url + "/stats/prometheus")).text()
        assert metric_value(text, "sidecar_xds_lkg_loads_total", outcome="refused") == 1
        assert metric_value(text, "sidecar_xds_lkg_active") == 0
