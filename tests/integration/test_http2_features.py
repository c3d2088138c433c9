"""The features of the HTTP/1.1 integration tests over HTTP/2 downstream (h2c prior knowledge,
and TLS with ALPN ``h2``), with real peers on loopback: jwt_authn with a remote JWKS fetched
through a cluster, ext_authz against a real HTTP authorization service, header_to_metadata and
a user ``python`` filter, the global ``ratelimit`` filter against the real rate limit service
(grpcio + redis-server), per-connection local rate limits (streams of one connection share a
bucket), multi-worker daemon mode with metrics aggregated across workers, and the dashboard's
data, and jwt_authn + ext_authz compared with Envoy 1.40 over HTTP/2.
tests/integration/test_http2.py has the routing/retry/timeout/drain scenarios. Over 600 lines on
purpose: one feature-by-HTTP/2 matrix sharing the ``Downstream`` helper (h2c or TLS+ALPN)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from h2_helpers import H2Client, H2Request, H2Response, H2Upstream
from prometheus_client.parser import text_string_to_metric_families
from resilience_helpers import metric, prometheus

from sidecar.config.stores import RedisStoreConfig
from sidecar.shared.redis_store import RedisStore
from sidecar.shared.testing import RedisServer
from sidecar.shared.testing_rls import RateLimitService, serve
from sidecar.testing import (
    ProxyProcess,
    Upstream,
    free_port,
    native_config,
    running_proxy,
    stop_process,
    wait_for_port,
)
from tests.jwt_helpers import AUDIENCE, ISSUER, jwks, mint, public_jwk, rsa_key
from tests.paths import REPO

VIA = ["h2c", "h2-tls"]
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
PYTHON_FILTER = "type.googleapis.com/pysidecar.filter.v1.PythonFilter"
GRPC_EMPTY = b"\x00\x00\x00\x00\x00"     # one empty gRPC message

# A user filter that shows the test what the proxy knew of the request: its dynamic metadata
# and verified JWT payloads (as a response header), and the request body it read (as a header
# added upstream), so a streamed HTTP/2 body is read through the SDK.
SHOW = '''
import json
from sidecar import sdk

class Show(sdk.UserFilter):
    async def __call__(self, req, next):
        body = await req.read_body(1 << 20)
        req.headers["x-body-seen"] = str(len(body))
        req.body = body
        resp = await next(req)
        resp.headers["x-metadata"] = json.dumps(req.ctx.metadata, sort_keys=True, default=str)
        resp.headers["x-jwt"] = json.dumps(req.ctx.jwt_payloads, sort_keys=True, default=str)
        return resp
'''

# A user filter that raises on /boom (500 FE for that stream only) and answers /deny itself.
GATE = '''
from sidecar import sdk

class Gate(sdk.UserFilter):
    async def __call__(self, req, next):
        if req.path.startswith("/boom"):
            raise RuntimeError("boom")
        if req.path.startswith("/deny"):
            return sdk.local_reply(req.ctx, 403, "not you")
        return await next(req)
'''


def seen(up: Upstream, i: int = -1) -> dict[str, str]:
    return {k.lower(): v for k, v in up.requests[i].headers.items()}


# ---- TLS with ALPN h2 ------------------------------------------------------------------------------

def server_cert(d: Path) -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1 (its own CA): (cert, key) paths."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = d / "server.pem", d / "server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class Downstream:
    """How the test's HTTP/2 client reaches the listener: h2c prior knowledge, or TLS whose
    ALPN must pick ``h2`` (``listener`` is the native listener part that sets it up)."""

    def __init__(self, via: str, tmp_path: Path):
        self.via = via
        self.listener: dict = {}
        self.tls: ssl.SSLContext | None = None
        if via == "h2-tls":
            cert, key = server_cert(tmp_path)
            self.listener = {"tls": {"cert": cert, "key": key, "alpn": ["h2", "http/1.1"]}}
            self.tls = ssl.create_default_context(cafile=cert)
            self.tls.set_alpn_protocols(["h2", "http/1.1"])

    def client(self, port: int) -> H2Client:
        return H2Client(port, tls=self.tls)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def check(self, c: H2Client) -> None:
        """The connection really is HTTP/2 (over TLS: chosen by ALPN)."""
        if self.tls is not None:
            assert c.alpn == "h2"


# ---- jwt_authn: a remote JWKS fetched through a cluster ---------------------------------------------

def jwt_envoy_doc(jwks_port: int, app: str) -> dict:
    """Envoy v3: jwt_authn whose remote JWKS is fetched through cluster ``idp`` (the URI's host
    does not resolve: only the cluster reaches the server), forwarding the payload as a header,
    a claim as a header and the payload as metadata; a user filter shows what it saw."""
    def cluster(name: str, address: str) -> dict:
        host, port = address.split(":")
        return {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": int(port)}}}}]}]}}

    jwt_filter = {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"idp": {
            "issuer": ISSUER, "audiences": [AUDIENCE],
            "remote_jwks": {"http_uri": {"uri": "http://idp.invalid/keys/jwks.json",
                                         "cluster": "idp", "timeout": "2s"},
                            "cache_duration": "300s"},
            "forward_payload_header": "x-jwt-payload",
            "claim_to_headers": [{"header_name": "x-jwt-sub", "claim_name": "sub"}],
            "payload_in_metadata": "jwt_payload"}},
        "rules": [{"match": {"prefix": "/public"}},
                  {"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}]}}
    hcm = {"@type": HCM, "stat_prefix": "in", "codec_type": "AUTO",
           "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "app"}}]}]},
           "http_filters": [jwt_filter, ROUTER]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{"name": "in", "address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm}]}]}],
                "clusters": [cluster("app", app), cluster("idp", f"127.0.0.1:{jwks_port}")]}}


def unb64(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


async def test_jwt_authn_over_h2_with_jwks_through_a_cluster():
    keys = jwks(public_jwk(rsa_key("a"), "k1"))

    async def jwks_handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(keys)

    async with Upstream() as app, Upstream(jwks_handler, name="idp") as idp:
        async with running_proxy(jwt_envoy_doc(int(idp.address.rsplit(":", 1)[1]), app.address),
                                 admin=False) as p:
            async with H2Client(p.port()) as c:
                good = mint(sub="alice", groups=["dev"])
                # concurrent streams on one connection: valid, invalid, missing, public
                sids = [await c.start("GET", "/api/x", [("authorization", "Bearer " + good)]),
                        await c.start("GET", "/api/x", [("authorization", "Bearer "
                                                         + mint(key=rsa_key("evil")))]),
                        await c.start("GET", "/api/x"),
                        await c.start("GET", "/public/x", [("x-jwt-sub", "spoofed")])]
                ok, forged, missing, public = [await c.response(s) for s in sids]
                expired = await c.request("GET", "/api/y", [
                    ("authorization", "Bearer " + mint(exp=1, iat=0))])
            assert ok.status == 200
            assert (forged.status, forged.body) == (401, b"Jwt verification fails")
            assert forged.get("www-authenticate", "").endswith('error="invalid_token"')
            assert (missing.status, missing.body) == (401, b"Jwt is missing")
            assert missing.get("www-authenticate") == 'Bearer realm="http://example.test/api/x"'
            assert (expired.status, expired.body) == (401, b"Jwt is expired")
            assert public.status == 200
            # the valid request reached the app with the claim and the payload forwarded; the
            # spoofed claim header on the public path was removed
            assert len(app.requests) == 2
            by_path = {r.path: {k.lower(): v for k, v in r.headers.items()} for r in app.requests}
            up = by_path["/api/x"]
            assert up["x-jwt-sub"] == "alice"
            payload = json.loads(unb64(up["x-jwt-payload"]))
            assert payload["sub"] == "alice" and payload["groups"] == ["dev"]
            assert payload["iss"] == ISSUER
            assert "x-jwt-sub" not in by_path["/public/x"]
            # the keys came from the JWKS server, through cluster idp (Host of the URI)
            assert idp.requests and idp.requests[0].path == "/keys/jwks.json"
            assert idp.requests[0].headers["Host"] == "idp.invalid"


async def test_jwt_payload_in_metadata_over_h2_tls(tmp_path):
    """The same provider over TLS (ALPN h2): the payload kept for later filters reaches a
    user filter, read from a request whose body streams in DATA frames."""
    keys = jwks(public_jwk(rsa_key("a"), "k1"))
    show = tmp_path / "show.py"
    show.write_text(SHOW)
    ds = Downstream("h2-tls", tmp_path)

    async def jwks_handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(keys)

    async with Upstream() as app, Upstream(jwks_handler, name="idp") as idp:
        doc = jwt_envoy_doc(int(idp.address.rsplit(":", 1)[1]), app.address)
        cert, key = ds.listener["tls"]["cert"], ds.listener["tls"]["key"]
        listener = doc["static_resources"]["listeners"][0]
        chain = listener["filter_chains"][0]
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [{"certificate_chain": {"filename": cert},
                                      "private_key": {"filename": key}}]}}}
        filters = chain["filters"][0]["typed_config"]["http_filters"]
        filters.insert(1, {"name": "show", "typed_config": {
            "@type": PYTHON_FILTER, "module": str(show), "class": "Show"}})
        async with running_proxy(doc, admin=False) as p:
            async with ds.client(p.port()) as c:
                ds.check(c)
                r = await c.request("POST", "/api/x", [
                    ("authorization", "Bearer " + mint(sub="alice", tenant="t1"))],
                    body=b"z" * 40000)
                bad = await c.request("POST", "/api/x", [("authorization", "Bearer nope")],
                                      body=b"z")
            assert r.status == 200, r.body
            assert json.loads(r.get("x-jwt"))["jwt_payload"]["tenant"] == "t1"
            assert seen(app)["x-body-seen"] == "40000" and app.requests[-1].body == b"z" * 40000
            assert seen(app)["x-forwarded-proto"] == "https"
            assert bad.status == 401 and len(app.requests) == 1


# ---- ext_authz: a real HTTP authorization service ----------------------------------------------------

class HttpAuthz:
    """Allows requests with ``x-allow: yes`` (adding headers for the upstream and the client);
    denies the others with 401, a body and headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append((request.method, request.path_qs,
                          {k.lower(): v for k, v in request.headers.items()}))
        if request.headers.get("x-allow") == "yes":
            return web.Response(status=200, headers={
                "x-auth-user": "alice", "x-auth-extra": "no", "x-client-note": "seen"})
        return web.Response(status=401, text="go away", headers={
            "www-authenticate": "Bearer", "x-auth-debug": "nope"})


@pytest.mark.parametrize("via", VIA)
async def test_ext_authz_http_service_over_h2(via, tmp_path):
    authz = HttpAuthz()
    ds = Downstream(via, tmp_path)
    async with Upstream() as app, Upstream(authz, name="authz") as az:
        cfg = native_config(
            clusters={"app": [app.address], "authz": [az.address]},
            filters=[{"ext_authz": {"http_service": {
                "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "2s"},
                "path_prefix": "/auth",
                "authorization_request": {
                    "allowed_headers": {"patterns": [{"exact": "x-allow"}]},
                    "headers_to_add": [{"key": "x-from", "value": "sidecar"}]},
                "authorization_response": {
                    "allowed_upstream_headers": {"patterns": [{"exact": "x-auth-user"}]},
                    "allowed_client_headers": {"patterns": [{"exact": "www-authenticate"}]},
                    "allowed_client_headers_on_success": {"patterns": [{"exact": "x-client-note"}]}}}}}],
            routes=[{"match": {"prefix": "/"}, "cluster": "app"}],
            listener=ds.listener)
        async with running_proxy(cfg) as p:
            async with ds.client(p.port()) as c:
                ds.check(c)
                # allowed and denied streams at once on one connection
                sids = [await c.start("GET", "/orders?id=1", [("x-allow", "yes"), ("x-other", "o")]),
                        await c.start("GET", "/orders?id=2", [("x-allow", "no")]),
                        await c.start("POST", "/orders?id=3", [("x-allow", "yes")], b"payload"),
                        await c.start("POST", "/pkg.Svc/M", [("content-type", "application/grpc"),
                                                             ("te", "trailers")], GRPC_EMPTY)]
                allowed, denied, posted, grpc_denied = [await c.response(s) for s in sids]
            assert allowed.status == 200 and allowed.get("x-client-note") == "seen"
            assert (denied.status, denied.body) == (401, b"go away")
            assert denied.get("www-authenticate") == "Bearer" and denied.get("x-auth-debug") is None
            assert posted.status == 200
            # a gRPC call denied: trailers-only, the service's status as gRPC's (as Envoy)
            assert (grpc_denied.status, grpc_denied.body) == (200, b"")
            assert grpc_denied.get("grpc-status") == "16" and grpc_denied.get("grpc-message") == "go away"
            assert grpc_denied.get("www-authenticate") == "Bearer"
            assert sorted(r.path for r in app.requests) == ["/orders?id=1", "/orders?id=3"]
            for r in app.requests:
                h = {k.lower(): v for k, v in r.headers.items()}
                assert h["x-auth-user"] == "alice" and "x-auth-extra" not in h
                assert h["x-forwarded-proto"] == ds.scheme
            assert next(r for r in app.requests if r.method == "POST").body == b"payload"
            asked = {path: (method, h) for method, path, h in authz.seen}
            assert set(asked) == {"/auth/orders?id=1", "/auth/orders?id=2", "/auth/orders?id=3",
                                  "/auth/pkg.Svc/M"}
            method, h = asked["/auth/orders?id=1"]
            assert method == "GET" and h["x-allow"] == "yes" and h["x-from"] == "sidecar"
            assert "x-other" not in h
            text = await prometheus(p)
            assert metric(text, "sidecar_ext_authz_total", outcome="denied") == 2
            assert metric(text, "sidecar_upstream_rq_total", cluster="authz", status_class="2xx") == 2
            assert metric(text, "sidecar_upstream_rq_total", cluster="authz", status_class="4xx") == 2


@pytest.mark.skipif(shutil.which("envoy") is None, reason="envoy binary not installed")
async def test_jwt_and_ext_authz_over_h2_match_envoy():
    """One Envoy v3 bootstrap (jwt_authn with its JWKS through a cluster, then ext_authz)
    through Envoy 1.40 and through the sidecar, the same HTTP/2 streams on one connection
    each: the same statuses, headers, bodies for plain and gRPC requests."""
    keys = jwks(public_jwk(rsa_key("a"), "k1"))

    async def jwks_handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(keys)

    def doc(port: int, jwks_port: int, app: str, authz: str) -> dict:
        d = jwt_envoy_doc(jwks_port, app)
        d["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port
        hcm = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"].insert(1, {"name": "envoy.filters.http.ext_authz", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "http_service": {
                "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "2s"},
                "authorization_request": {"allowed_headers": {"patterns": [{"exact": "x-allow"}]}},
                "authorization_response": {
                    "allowed_upstream_headers": {"patterns": [{"exact": "x-auth-user"}]},
                    "allowed_client_headers": {"patterns": [{"exact": "www-authenticate"}]}}}}})
        host, p = authz.split(":")
        d["static_resources"]["clusters"].append({
            "name": "authz", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                "cluster_name": "authz", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": host, "port_value": int(p)}}}}]}]}})
        return d

    good, forged = mint(sub="alice"), mint(key=rsa_key("evil"))
    grpc = [("content-type", "application/grpc"), ("te", "trailers")]
    cases = [("GET", "/api/a", [("authorization", "Bearer " + good), ("x-allow", "yes")], b""),
             ("GET", "/api/b", [("authorization", "Bearer " + good), ("x-allow", "no")], b""),
             ("GET", "/api/c", [("x-allow", "yes")], b""),
             ("GET", "/api/d", [("authorization", "Bearer " + forged), ("x-allow", "yes")], b""),
             ("POST", "/pkg.Svc/A", [("authorization", "Bearer " + good), ("x-allow", "no"), *grpc],
              GRPC_EMPTY),
             ("POST", "/pkg.Svc/B", [("x-allow", "yes"), *grpc], GRPC_EMPTY)]
    skip = {"date", "x-envoy-upstream-service-time", "content-length"}

    async def observe(port: int, app: Upstream) -> list:
        async with H2Client(port) as c:
            sids = [await c.start(m, path, h, body) for m, path, h, body in cases]
            rs = [await c.response(sid) for sid in sids]
        out = []
        for r in rs:
            local = r.status != 200 or r.get("grpc-status") is not None
            out.append((r.status, sorted((k, v) for k, v in r.headers if k not in skip)
                        if local else None, r.body if local else None, r.trailers))
        up = {k.lower(): v for k, v in app.requests[-1].headers.items()}
        return [out, len(app.requests), up.get("x-jwt-sub"), up.get("x-auth-user")]

    async with Upstream() as app, Upstream(jwks_handler, name="idp") as idp, \
            Upstream(HttpAuthz(), name="authz") as az:
        jwks_port = int(idp.address.rsplit(":", 1)[1])
        port = free_port()
        envoy = EnvoyProcess(doc(port, jwks_port, app.address, az.address))
        try:
            await asyncio.to_thread(wait_for_port, port, 20)
            theirs = await observe(port, app)
            app.requests.clear()
            async with running_proxy(doc(0, jwks_port, app.address, az.address), admin=False) as p:
                ours = await observe(p.port(), app)
        finally:
            envoy.stop()
    assert ours == theirs
    statuses = [(st, dict(h or {}).get("grpc-status")) for st, h, _, _ in ours[0]]
    assert statuses == [(200, None), (401, None), (401, None), (401, None), (200, "16"), (200, "16")]
    assert ours[1:] == [1, "alice", "alice"]


class EnvoyProcess:
    """The ``envoy`` binary on a bootstrap written to a temporary file."""

    def __init__(self, doc: dict):
        self.dir = tempfile.mkdtemp(prefix="h2-features-envoy-")
        path = os.path.join(self.dir, "envoy.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f)
        self.proc = subprocess.Popen(["envoy", "-c", path, "--use-dynamic-base-id",
                                      "--concurrency", "1", "--log-level", "error"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- header_to_metadata and a user python filter -----------------------------------------------------

@pytest.mark.parametrize("via", VIA)
async def test_header_to_metadata_and_user_filters_over_h2(via, tmp_path):
    show = tmp_path / "show.py"
    show.write_text(SHOW)
    gate = tmp_path / "gate.py"
    gate.write_text(GATE)
    ds = Downstream(via, tmp_path)
    examples = REPO / "examples" / "filters"

    async def app_handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.json_response({"body": body.decode(), "password": "hunter2",
                                  "tenant": request.headers.get("x-tenant")})

    async with Upstream(app_handler) as app:
        cfg = native_config(
            clusters={"app": [app.address]},
            filters=[{"python": {"name": "gate", "module": str(gate), "class": "Gate"}},
                     {"python": {"name": "show", "module": str(show), "class": "Show"}},
                     {"header_to_metadata": {"request_rules": [{
                         "header": "x-tenant", "remove": True,
                         "on_header_present": {"metadata_namespace": "tenancy", "key": "tenant"}}]}},
                     {"python": {"name": "json", "module": str(examples / "json_transform.py"),
                                 "class": "JsonTransform",
                                 "config": {"set": {"source": "edge"}, "redact": ["password"]}}}],
            routes=[{"match": {"prefix": "/"}, "cluster": "app"}],
            listener=ds.listener)
        async with running_proxy(cfg, admin=False) as p:
            async with ds.client(p.port()) as c:
                ds.check(c)
                sids = [await c.start("POST", f"/t/{i}", [("x-tenant", f"acme{i}"),
                                                          ("content-type", "application/json")],
                                      json.dumps({"item": i}).encode()) for i in range(3)]
                # a stream whose filter raises, beside them on the same connection
                boom = await c.start("POST", "/boom", [], b"x" * 1000)
                rs: list[H2Response] = [await c.response(s) for s in sids]
                boomed = await c.response(boom)
                plain = await c.request("GET", "/plain")
                denied = await c.request("POST", "/deny", [("content-type", "application/grpc")],
                                         GRPC_EMPTY)
            for i, r in enumerate(rs):
                assert r.status == 200, r.body
                # header_to_metadata: the header became this stream's metadata, removed upstream
                assert json.loads(r.get("x-metadata")) == {"tenancy": {"tenant": f"acme{i}"}}
                got = json.loads(r.body)
                assert got["tenant"] is None and "password" not in got      # response redacted
                assert json.loads(got["body"]) == {"item": i, "source": "edge"}   # transformed
            assert plain.status == 200 and json.loads(plain.get("x-metadata")) == {}
            assert (boomed.status, boomed.body) == (500, b"filter error")
            # the filter's own reply to a gRPC client is gRPC-shaped
            assert denied.status == 200 and denied.get("grpc-status") == "7"
            assert denied.get("grpc-message") == "not you"
            assert len(app.requests) == 4
            assert all("x-tenant" not in seen(app, i) for i in range(len(app.requests)))


async def test_h2_end_to_end_cookie_crumbs_and_response_metadata(tmp_path):
    """HTTP/2 on both sides: a JWT in a cookie the client split into crumbs (RFC 9113 8.2.3)
    is found; a response header of the HTTP/2 upstream becomes metadata (header_to_metadata
    response rule) and is removed; the upstream's trailers still reach the client."""
    show = tmp_path / "show.py"
    show.write_text(SHOW)

    async def handler(req: H2Request) -> tuple[int, list, bytes, list]:
        return 200, [("content-type", "text/plain"), ("x-up", "v1")], \
            f"hi {req.get('x-jwt-sub')} {req.get('cookie')}".encode(), [("x-trailer", "t")]

    async with H2Upstream(handler) as up:
        cfg = native_config(
            clusters={"svc": {"endpoints": [up.address], "protocol": "http2"}},
            filters=[{"python": {"module": str(show), "class": "Show"}},
                     {"header_to_metadata": {"response_rules": [{
                         "header": "x-up", "remove": True,
                         "on_header_present": {"metadata_namespace": "resp", "key": "up"}}]}},
                     {"jwt_authn": {"providers": {"idp": {
                         "issuer": ISSUER, "audiences": [AUDIENCE],
                         "jwks": jwks(public_jwk(rsa_key("a"), "k1")), "from": [{"cookie": "tk"}],
                         "claims_to_headers": {"x-jwt-sub": "sub"}}},
                         "rules": [{"match": {"prefix": "/"}, "requires": "idp"}]}}],
            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, admin=False) as p:
            async with H2Client(p.port()) as c:
                r = await c.request("GET", "/x", [("cookie", "a=b"), ("cookie", "tk=" + mint(sub="ck")),
                                                  ("te", "trailers")])
                missing = await c.request("GET", "/x", [("cookie", "a=b"), ("cookie", "c=d")])
        assert r.status == 200 and r.get("x-up") is None
        assert json.loads(r.get("x-metadata")) == {"resp": {"up": "v1"}}
        assert r.body.startswith(b"hi ck a=b; tk=") and r.trailers == [("x-trailer", "t")]
        assert (missing.status, missing.body) == (401, b"Jwt is missing")
        assert len(up.requests) == 1


# ---- the global ratelimit filter against the real rate limit service --------------------------------

RLS_LIMITS = {
    "domain": "edge",
    "descriptors": [{"key": "user", "rate_limit": {"unit": "hour", "requests_per_unit": 2}}],
    "response_headers_to_add": {"x-rls": "seen"},
    "request_headers_to_add": {"x-rls-checked": "yes"},
    "over_limit_body": "slow down",
}


@pytest.fixture
def redis_server():
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("via", VIA)
async def test_global_ratelimit_over_h2(via, tmp_path, redis_server):
    """Streams of one HTTP/2 connection are checked one by one with the service (grpcio,
    counting in redis-server): two of three concurrent streams pass, the third gets Envoy's
    429; a gRPC call over the limit gets the gRPC-shaped reply."""
    host, _, rport = redis_server.address.rpartition(":")
    store = RedisStore(RedisStoreConfig(name="rls", host=host, port=int(rport), timeout_s=1.0,
                                        key_prefix="rls:"))
    service = RateLimitService(RLS_LIMITS, store)
    rls_port = free_port()
    server = await serve(rls_port, service)
    ds = Downstream(via, tmp_path)
    try:
        async with Upstream() as app:
            cfg = native_config(
                clusters={"app": [app.address],
                          "rls": {"endpoints": [f"127.0.0.1:{rls_port}"], "protocol": "http2"}},
                filters=[{"ratelimit": {"domain": "edge", "cluster": "rls", "timeout": "2s",
                                        "failure_mode_deny": True}}],
                routes=[{"match": {"prefix": "/"}, "cluster": "app", "rate_limits": [
                    {"actions": [{"request_headers": {"header_name": "x-user",
                                                      "descriptor_key": "user"}}]}]}],
                listener=ds.listener)
            async with running_proxy(cfg) as p:
                async with ds.client(p.port()) as c:
                    ds.check(c)
                    sids = [await c.start("GET", f"/r{i}", [("x-user", "ann")]) for i in range(3)]
                    rs = [await c.response(s) for s in sids]
                    grpc_call = await c.request("POST", "/pkg.Svc/M", [
                        ("x-user", "ann"), ("content-type", "application/grpc"),
                        ("te", "trailers")], GRPC_EMPTY)
                    other = await c.request("GET", "/bob", [("x-user", "bob")])
                assert sorted(r.status for r in rs) == [200, 200, 429]
                limited = next(r for r in rs if r.status == 429)
                assert limited.get("x-envoy-ratelimited") == "true" and limited.body == b"slow down"
                assert all(r.get("x-rls") == "seen" for r in rs)
                assert grpc_call.status == 200 and grpc_call.get("grpc-status") == "14"
                assert grpc_call.get("x-envoy-ratelimited") == "true"
                assert other.status == 200
                # the service was asked once per stream, with the stream's descriptor
                assert len(service.seen) == 5
                assert [[(e.key, e.value) for e in d.entries] for d in service.seen[0].descriptors] \
                    == [[("user", "ann")]]
                # only the streams let through reached the app, with the service's header
                assert len(app.requests) == 3
                assert all(seen(app, i)["x-rls-checked"] == "yes" for i in range(3))
                text = await prometheus(p)
                assert metric(text, "sidecar_ratelimit_total", cluster="app", outcome="ok") == 3
                assert metric(text, "sidecar_ratelimit_total", cluster="app",
                              outcome="over_limit") == 2
    finally:
        await server.stop(None)
        await store.close()


# ---- local_ratelimit per downstream connection ----------------------------------------------------

@pytest.mark.parametrize("via", VIA)
async def test_local_ratelimit_per_connection_over_h2(via, tmp_path):
    """``local_rate_limit_per_downstream_connection``: the streams of one HTTP/2 connection
    share one bucket; another connection has its own; a listener-wide bucket next to it is
    shared by every connection."""
    ds = Downstream(via, tmp_path)
    async with Upstream() as app:
        cfg = native_config(
            clusters={"app": [app.address]},
            filters=[{"local_ratelimit": {"max_tokens": 2, "fill_interval": "1h",
                                          "per_connection": True}}],
            routes=[{"match": {"prefix": "/shared"}, "cluster": "app",
                     "filters": {"local_ratelimit": {"max_tokens": 3, "fill_interval": "1h"}}},
                    {"match": {"prefix": "/"}, "cluster": "app"}],
            listener=ds.listener)
        async with running_proxy(cfg, admin=False) as p:
            async with ds.client(p.port()) as a, ds.client(p.port()) as b:
                ds.check(a)
                ds.check(b)
                # three concurrent streams on connection a: two tokens
                sids = [await a.start("GET", f"/a{i}") for i in range(3)]
                on_a = [(await a.response(s)).status for s in sids]
                # connection b has its own bucket, spent the same way
                sids = [await b.start("GET", f"/b{i}") for i in range(3)]
                on_b = [(await b.response(s)).status for s in sids]
                again_a = await a.request("GET", "/a-again")
                # the per-route override is not per connection: 3 tokens for everyone
                shared = [(await a.request("GET", "/shared/1")).status,
                          (await b.request("GET", "/shared/2")).status,
                          (await a.request("GET", "/shared/3")).status,
                          (await b.request("GET", "/shared/4")).status]
            assert sorted(on_a) == [200, 200, 429] and sorted(on_b) == [200, 200, 429]
            assert again_a.status == 429 and again_a.body == b"local_rate_limited"
            assert shared == [200, 200, 200, 429]
            # a new connection: a fresh bucket
            async with ds.client(p.port()) as c:
                assert (await c.request("GET", "/c")).status == 200
            assert len(app.requests) == 2 + 2 + 3 + 1


# ---- multi-worker daemon mode ---------------------------------------------------------------------

def samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for k, v in samples(text, name).items()
               if all(dict(k).get(lk) == lv for lk, lv in labels.items()))


async def admin_get(admin: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin}{path}") as r:
            return r.status, await r.text()


async def test_workers_serve_h2_and_aggregate_metrics(tmp_path):
    """``sidecar run --concurrency 2``: h2c connections, and TLS ones whose ALPN picks h2 in
    whichever worker accepts them, spread over the workers by the kernel, each carrying
    several streams; /stats/prometheus adds the workers' counts up exactly."""
    conns, tls_conns, streams = 16, 6, 5
    ds = Downstream("h2-tls", tmp_path)
    async with Upstream() as app:
        port, tls_port, admin = free_port(), free_port(), free_port()
        routes = [{"name": "main", "match": {"prefix": "/"}, "cluster": "app"}]
        cfg = native_config(clusters={"app": [app.address]}, routes=routes,
                            listener={"port": port},
                            extra_listeners=[{"name": "tls", "address": "127.0.0.1",
                                              "port": tls_port, "routes": routes, **ds.listener}])
        cfg["admin"]["port"] = admin
        proc = ProxyProcess(cfg, str(tmp_path), args=("--concurrency", "2"))
        proc.start()
        try:
            await asyncio.to_thread(wait_for_port, admin, 20, proc)
            for _ in range(200):       # every worker up
                if (await admin_get(admin, "/ready"))[0] == 200:
                    break
                await asyncio.sleep(0.1)
            for p in (port, tls_port):
                await asyncio.to_thread(wait_for_port, p, 20, proc)
            _, before = await admin_get(admin, "/stats/prometheus")
            cx_before = {name: total(before, "sidecar_downstream_cx_total", listener=name)
                         for name in ("test", "tls")}

            async def one_connection(n: int, tls: bool) -> list[H2Response]:
                async with (ds.client(tls_port) if tls else H2Client(port)) as c:
                    if tls:
                        ds.check(c)
                    sids = [await c.start("GET", f"/c{n}/s{i}") for i in range(streams)]
                    return [await c.response(s) for s in sids]

            results = await asyncio.gather(*[one_connection(n, False) for n in range(conns)],
                                           *[one_connection(n, True) for n in range(tls_conns)])
            n_rq = (conns + tls_conns) * streams
            assert [r.status for rs in results for r in rs] == [200] * n_rq
            assert len(app.requests) == n_rq
            status, text = await admin_get(admin, "/stats/prometheus")
            assert status == 200
            for name, n in (("test", conns), ("tls", tls_conns)):
                assert total(text, "sidecar_http_downstream_rq_total", listener=name,
                             route="main", status_class="2xx") == n * streams
                assert total(text, "sidecar_downstream_cx_total", listener=name) \
                    - cx_before[name] == n
            assert total(text, "sidecar_upstream_rq_total", cluster="app") == n_rq
            assert samples(text, "sidecar_workers") == {(("worker", "0"),): 1.0,
                                                        (("worker", "1"),): 1.0}
            # per worker: the streams add up, and both workers served HTTP/2 connections
            _, per_text = await admin_get(admin, "/stats/prometheus?per_worker=1")
            per: dict[str, float] = {}
            for k, v in samples(per_text, "sidecar_http_downstream_rq_total").items():
                kd = dict(k)
                if kd.get("route") == "main":
                    per[kd["worker"]] = per.get(kd["worker"], 0) + v
            assert sum(per.values()) == n_rq
            assert sum(1 for v in per.values() if v > 0) == 2, per
        finally:
            proc.stop()


# ---- the dashboard's data -------------------------------------------------------------------------

async def test_dashboard_json_counts_h2_traffic():
    """/dashboard.json after HTTP/2 traffic: per-route counts by class, the cluster's attempts,
    and, while streams are open on one connection, one connection and its in-flight streams."""
    release = asyncio.Event()

    async def app_handler(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/api/hold"):
            await release.wait()
        return web.Response(text="ok")

    async with Upstream(app_handler) as app:
        cfg = native_config(clusters={"app": [app.address]},
                            routes=[{"name": "api", "match": {"prefix": "/api"}, "cluster": "app"},
                                    {"name": "down", "match": {"path": "/down"},
                                     "direct_response": {"status": 503}}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            async def dashboard() -> dict:
                async with s.get(p.admin_url + "/dashboard.json") as r:
                    assert r.status == 200
                    return await r.json()

            assert (await dashboard())["totals"]["requests"] == 0
            async with H2Client(p.port()) as c:
                sids = [await c.start("GET", f"/api/{i}") for i in range(10)]
                assert [(await c.response(sid)).status for sid in sids] == [200] * 10
                assert (await c.request("GET", "/down")).status == 503
                held = [await c.start("GET", f"/api/hold/{i}") for i in range(2)]
                for _ in range(500):
                    if len(app.requests) == 12:
                        break
                    await asyncio.sleep(0.01)
                during = await dashboard()
                release.set()
                assert [(await c.response(sid)).status for sid in held] == [200, 200]
            for _ in range(500):       # the proxy sees the client's close on its own time
                after = await dashboard()
                if next(x for x in after["listeners"] if x["name"] == "test")["cx_active"] == 0:
                    break
                await asyncio.sleep(0.01)
        lst = next(x for x in during["listeners"] if x["name"] == "test")
        assert (lst["kind"], lst["cx_active"], lst["rq_active"]) == ("http", 1, 2)
        routes = {r["route"]: r for r in after["routes"]}
        assert routes["api"]["requests"] == 12 and routes["api"]["errors_5xx"] == 0
        assert {k: v for k, v in routes["api"]["by_class"].items() if v} == {"2xx": 12}
        assert routes["down"]["requests"] == 1 and routes["down"]["errors_5xx"] == 1
        assert {x["name"]: x for x in after["clusters"]}["app"]["attempts"] == 12
        assert after["totals"]["requests"] == 13
        assert next(x for x in after["listeners"] if x["name"] == "test")["cx_active"] == 0
