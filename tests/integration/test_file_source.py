"""File source: a watched directory (native ``control_plane: {api_type: FILE}``) or Envoy's
``path_config_source`` per type; same translation, validation and swap as the network sources."""

from __future__ import annotations

import json
import os

import aiohttp
import pytest
import yaml

from control_plane_client.resources import RDS
from control_plane_client.testing import (
    cluster,
    eventually,
    listener,
    load_assignment,
    metric_value,
    route,
)
from sidecar.config.errors import ConfigErrors
from sidecar.testing import Upstream, free_port, running_proxy, to_snapshot


def write(path, doc) -> None:
    """Atomic, as a deploy tool or a ConfigMap update does it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        if str(path).endswith(".json"):
            json.dump(doc, f)
        else:
            yaml.safe_dump(doc, f)
    os.replace(tmp, path)


def resp(version, resources):
    return {"version_info": version, "resources": resources}


async def who(s, port, path="/x"):
    async with s.get(f"http://127.0.0.1:{port}{path}") as r:
        assert r.status == 200, await r.text()
        return (await r.json())["upstream"]


def native(dirpath) -> dict:
    return {"admin": {"address": "127.0.0.1", "port": 0},
            "control_plane": {"api_type": "FILE", "path": str(dirpath), "poll_interval": "0.1s"}}


async def test_native_directory_source(tmp_path):
    d = tmp_path / "xds"
    d.mkdir()
    lp = free_port()
    async with Upstream(name="a") as a, Upstream(name="b") as b:
        write(d / "listeners.yaml", resp("1", [listener(lp)]))
        write(d / "routes.yaml", resp("1", [route("main", "svc")]))
        write(d / "clusters.json", [cluster("svc")])               # a bare list works too
        write(d / "endpoints.yaml", load_assignment("svc", [a.port]))   # and one resource
        async with running_proxy(native(d)) as p, aiohttp.ClientSession() as s:
            assert await eventually(lambda: who(s, lp), what="listener from files") == "a"
            cp = p.app.control_plane.dump()
            assert cp["api_type"] == "FILE" and cp["state"] == "synced"
            assert cp["types"]["lds"]["version"] == "1"
            assert cp["types"]["eds"]["version"].startswith("sha256:")
            assert cp["cache"]["enabled"] is False          # no point caching local files
            state_a = p.app.clusters.get("svc").state.endpoints[a.address]
            # an endpoint change in one file: applied in place
            write(d / "endpoints.yaml", load_assignment("svc", [a.port, b.port]))
            await eventually(lambda: len(p.app.clusters.get("svc").hosts) == 2)
            assert p.app.clusters.get("svc").state.endpoints[a.address] is state_a
            # a file that does not parse: rejected, the old config serves
            (d / "routes.yaml").write_text("resources: [unclosed\n")
            await eventually(lambda: p.app.control_plane.state.type_state(RDS).rejected, what="parse error")
            assert "not valid YAML" in p.app.control_plane.dump()["last_nack"]["error"]
            assert await who(s, lp) in ("a", "b")
            # an unsupported field: rejected with its path, the old config serves
            bad = route("main", "svc")
            bad["virtual_hosts"][0]["require_tls"] = "ALL"
            write(d / "routes.yaml", resp("2", [bad]))
            await eventually(lambda: "require_tls" in (p.app.control_plane.last_nack or {}).get("error", ""))
            assert await who(s, lp) in ("a", "b")
            # a good route again
            write(d / "routes.yaml", resp("3", [route("main", "svc", routes=[
                {"match": {"prefix": "/"}, "direct_response": {"status": 204}}])]))
            await eventually(lambda: p.app.control_plane.state.type_state(RDS).version == "3")
            async with s.get(f"http://127.0.0.1:{lp}/") as r:
                assert r.status == 204
            text = await (await s.get(p.admin_url + "/stats/prometheus")).text()
            assert metric_value(text, "sidecar_xds_updates_total", type="rds", outcome="rejected") == 2
            # state of the world: the listener file removed -> the listener is gone
            os.unlink(d / "listeners.yaml")
            await eventually(lambda: "ingress" not in p.app.store.listeners, what="LDS removal")
            with pytest.raises(aiohttp.ClientError):
                await who(s, lp)


async def test_bootstrap_path_config_source(tmp_path):
    lp = free_port()
    paths = {t: tmp_path / f"{t}.yaml" for t in ("lds", "cds", "rds", "eds")}
    src = lambda t: {"path_config_source": {"path": str(paths[t]),  # noqa: E731
                                            "watched_directory": {"path": str(tmp_path)}},
                     "resource_api_version": "V3"}
    async with Upstream(name="a") as a:
        write(paths["lds"], resp("l1", [listener(lp, config_source=src("rds"))]))
        write(paths["rds"], resp("r1", [route("main", "svc")]))
        write(paths["cds"], resp("c1", [cluster("svc", config_source=src("eds"))]))
        write(paths["eds"], resp("e1", [load_assignment("svc", [a.port])]))
        boot = {"node": {"id": "f2", "cluster": "c"},
                "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
                "dynamic_resources": {"lds_config": src("lds"), "cds_config": src("cds")}}
        async with running_proxy(boot) as p, aiohttp.ClientSession() as s:
            assert await eventually(lambda: who(s, lp)) == "a"
            cp = p.app.control_plane.dump()
            assert {k: cp["types"][k]["version"] for k in ("lds", "rds", "cds", "eds")} == \
                {"lds": "l1", "rds": "r1", "cds": "c1", "eds": "e1"}
            assert len(cp["sources"]) == 4


def test_bootstrap_dynamic_resources_validation():
    base = {"node": {"id": "x", "cluster": "c"},
            "static_resources": {"clusters": [{"name": "xds", "type": "STATIC", "load_assignment": {
                "cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]}}]}}
    rest = {"api_config_source": {"api_type": "REST", "cluster_names": ["nope"],
                                  "refresh_delay": "1s"}}
    with pytest.raises(ConfigErrors) as e:
        to_snapshot({**base, "dynamic_resources": {"lds_config": rest}})
    assert "must be a static cluster" in str(e.value)
    delta = {"api_config_source": {"api_type": "DELTA_GRPC", "grpc_services": [
        {"envoy_grpc": {"cluster_name": "xds"}}]}}
    with pytest.raises(ConfigErrors) as e:
        to_snapshot({**base, "dynamic_resources": {"cds_config": delta}})
    assert "dynamic_resources.cds_config.api_config_source.api_type" in str(e.value)
    with pytest.raises(ConfigErrors) as e:
        to_snapshot({**base, "dynamic_resources": {"lds_config": {"ads": {}}}})
    assert "ads_config is missing" in str(e.value)
    with pytest.raises(ConfigErrors) as e:
        to_snapshot({**base, "dynamic_resources": {"lds_resources_locator": "xdstp://x"}})
    assert "lds_resources_locator" in str(e.value)
    ok = to_snapshot({**base, "dynamic_resources": {"lds_config": {
        "api_config_source": {"api_type": "REST", "cluster_names": ["xds"], "refresh_delay": "2s"},
        "initial_fetch_timeout": "3s"}}})
    cfg = ok.control_plane
    assert cfg.lds.kind == "rest" and cfg.lds.refresh_delay_s == 2.0 and cfg.cds is None
    assert cfg.initial_fetch_timeout_s == 3.0
    # native
    snap = to_snapshot({"control_plane": {"api_type": "REST", "address": "127.0.0.1:8070",
                                          "refresh_delay": "500ms",
                                          "retry_backoff": {"base_interval": "0.1s",
                                                            "max_interval": "2s"},
                                          "cache": {"dir": "/tmp/x"}}})
    c = snap.control_plane
    assert c.default.kind == "rest" and c.addresses == (("127.0.0.1", 8070),)
    assert (c.backoff_base_s, c.backoff_max_s, c.cache_dir) == (0.1, 2.0, "/tmp/x")
    with pytest.raises(ConfigErrors) as e:
        to_snapshot({"control_plane": {"api_type": "REST", "address": "x", "bogus": 1}})
    assert "control_plane.bogus" in str(e.value)
