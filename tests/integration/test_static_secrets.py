"""Static secrets (SDS from the bootstrap): ``static_resources.secrets`` referenced by name by
``tls_certificate_sds_secret_configs`` and ``validation_context_sds_secret_config`` without an
``sds_config``. One bootstrap is run by real Envoy and by the sidecar: each terminates mTLS
with the secret's certificate, requires a client certificate signed by the secret's CA, and
originates TLS to an upstream verified with the same validation secret."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess

import aiohttp
import pytest
import yaml
from aiohttp import web

from control_plane_client.translate.bootstrap import bootstrap
from sidecar.cli.certs import DevCA
from sidecar.config.errors import ConfigErrors
from sidecar.testing import ProxyProcess, free_port, wait_for_port

ENVOY = shutil.which("envoy")
TD = "secrets.test"
T_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
T_UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
T_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
         "HttpConnectionManager")
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = DevCA.create(TD)
    ca.write(str(d))
    for sa in ("proxy", "client", "app"):
        ca.issue("ns", sa, ips=["127.0.0.1"], dns=["localhost"]).write(str(d), sa)
    return {"ca": str(d / "ca.pem"),
            **{sa: (str(d / f"{sa}.pem"), str(d / f"{sa}-key.pem")) for sa in ("proxy", "client", "app")}}


def _sa(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def config(pki, admin: int, port: int, app_port: int) -> dict:
    cert, key = pki["proxy"]
    return {
        "admin": {"address": _sa(admin)},
        "static_resources": {
            "secrets": [
                {"name": "proxy-cert", "tls_certificate": {
                    "certificate_chain": {"filename": cert}, "private_key": {"filename": key}}},
                {"name": "mesh-ca", "validation_context": {"trusted_ca": {"filename": pki["ca"]}}},
            ],
            "listeners": [{"name": "in", "address": _sa(port), "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": T_DOWN, "require_client_certificate": True,
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": [{"name": "proxy-cert"}],
                        "validation_context_sds_secret_config": {"name": "mesh-ca"}}}},
                "filters": [{"name": "envoy.filters.network.http_connection_manager",
                             "typed_config": {
                                 "@type": T_HCM, "stat_prefix": "in",
                                 "route_config": {"virtual_hosts": [{
                                     "name": "v", "domains": ["*"],
                                     "routes": [{"match": {"prefix": "/"},
                                                 "route": {"cluster": "app"}}]}]},
                                 "http_filters": [{"name": "envoy.filters.http.router",
                                                   "typed_config": {"@type": T_ROUTER}}]}}]}]}],
            "clusters": [{
                "name": "app", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": _sa(app_port)}}]}]},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": T_UP, "sni": "localhost", "common_tls_context": {
                        "validation_context_sds_secret_config": {"name": "mesh-ca"}}}}}],
        },
    }


async def _tls_app(pki):
    async def hello(request):
        return web.Response(text="app over tls")
    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*pki["app"])
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return runner, runner.addresses[0][1]


def client_ssl(pki, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False
    if with_cert:
        ctx.load_cert_chain(*pki["client"])
    return ctx


async def _get(port: int, ctx: ssl.SSLContext) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://127.0.0.1:{port}/x", ssl=ctx) as r:
            return r.status, await r.text()


def test_secrets_translate_and_are_refused_by_name_when_wrong(pki):
    snap = bootstrap(config(pki, 1, 2, 3))
    (lst,) = snap.listeners
    assert (lst.tls.cert_file, lst.tls.ca_file, lst.tls.require_client_cert) == (
        pki["proxy"][0], pki["ca"], True)
    assert snap.clusters[0].tls.ca_file == pki["ca"]
    bad = config(pki, 1, 2, 3)
    ctx = bad["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"][
        "typed_config"]["common_tls_context"]
    ctx["tls_certificate_sds_secret_configs"] = [{"name": "nope"}]
    ctx["validation_context_sds_secret_config"] = {"name": "mesh-ca", "sds_config": {"ads": {}}}
    with pytest.raises(ConfigErrors) as e:
        bootstrap(bad)
    paths = {x.path for x in e.value.errors}
    base = ("static_resources.listeners[0].filter_chains[0].transport_socket.typed_config."
            "common_tls_context.")
    assert base + "tls_certificate_sds_secret_configs[0].name" in paths


async def test_the_same_bootstrap_in_envoy_and_the_sidecar(pki, tmp_path):
    runner, app_port = await _tls_app(pki)
    procs = []
    try:
        ports = {}
        for kind in ("sidecar", "envoy") if ENVOY else ("sidecar",):
            admin, port = free_port(), free_port()
            path = tmp_path / f"{kind}.yaml"
            path.write_text(yaml.safe_dump(config(pki, admin, port, app_port)))
            if kind == "envoy":
                log = open(tmp_path / "envoy.log", "w")
                p = subprocess.Popen([ENVOY, "-c", str(path), "--concurrency", "1", "--log-level",
                                      "error", "--disable-hot-restart", "--base-id",
                                      str(os.getpid() % 10000 + 11)], stdout=log,
                                     stderr=subprocess.STDOUT)
                procs.append(p.terminate)
                await asyncio.to_thread(wait_for_port, port, 20)
            else:
                sp = ProxyProcess(str(path), str(tmp_path), args=("--log-level", "warning"))
                sp.start()
                procs.append(sp.stop)
                await asyncio.to_thread(wait_for_port, port, 20, sp)
            ports[kind] = port
        for kind, port in ports.items():
            assert await _get(port, client_ssl(pki, True)) == (200, "app over tls"), kind
            with pytest.raises(aiohttp.ClientError):          # no client certificate: refused
                await _get(port, client_ssl(pki, False))
    finally:
        for stop in procs:
            stop()
        await runner.cleanup()
