"""gRPC through the sidecar with real grpcio servers and clients: native config (cluster
``protocol: http2``), sidecar mode with a gRPC app (``app_protocol: http2``), gRPC over TLS with
ALPN h2 both ways and mTLS, the four call kinds' trailers, gRPC health checking (native), the
gRPC status in access logs and metrics, retries on gRPC codes and grpc-timeout."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from h2_helpers import H2Client
from resilience_helpers import metric, prometheus

from sidecar.testing import native_config, running_proxy

SERVICE = "demo.Echo"


class EchoService:
    """A grpcio server with generic handlers (bytes in, bytes out) and grpc.health.v1."""

    def __init__(self, name: str = "echo", creds: grpc.ServerCredentials | None = None) -> None:
        self.name = name
        self.calls = 0
        self.fail_first: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self.health = health.HealthServicer()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = (self.server.add_secure_port("127.0.0.1:0", creds) if creds is not None
                     else self.server.add_insecure_port("127.0.0.1:0"))
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self._lock:
            self.calls += 1
            self.metadata.append(md)
            key = md.get("x-key", "")
            left = self.fail_first.get(key, 0)
            if left:
                self.fail_first[key] = left - 1
        if left:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        if "x-delay" in md:
            threading.Event().wait(float(md["x-delay"]))
        if md.get("x-fail"):
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        context.set_trailing_metadata((("x-served-by", self.name),))
        return b"echo:" + request

    def _stream(self, request: bytes, context: grpc.ServicerContext):
        for i in range(int(request.decode())):
            yield b"m%d" % i

    def __enter__(self) -> EchoService:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(0).wait(5)


def unary(port: int, msg: bytes = b"hi", metadata=(), timeout: float = 10.0,
          creds: grpc.ChannelCredentials | None = None):
    """(code, value or details, trailing metadata) of one call (runs in a thread)."""
    opts = [("grpc.enable_http_proxy", 0)]
    if creds is not None:
        opts.append(("grpc.ssl_target_name_override", "localhost"))
    ch = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=opts) if creds is not None \
        else grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
    with ch:
        call = ch.unary_unary(f"/{SERVICE}/Unary")
        try:
            value, c = call.with_call(msg, metadata=list(metadata), timeout=timeout)
            return c.code().name, value, dict(c.trailing_metadata())
        except grpc.RpcError as e:
            return e.code().name, e.details(), dict(e.trailing_metadata() or ())


def stream(port: int, n: int) -> list[bytes]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return list(ch.unary_stream(f"/{SERVICE}/Stream")(str(n).encode(), timeout=10))


def grpc_cluster(port: int, **extra) -> dict:
    return {"endpoints": [f"127.0.0.1:{port}"], "protocol": "http2", **extra}


async def test_grpc_native_config_access_log_and_metrics(tmp_path):
    log = tmp_path / "access.log"
    with EchoService() as svc:
        cfg = native_config(clusters={"grpc": grpc_cluster(svc.port)},
                            routes=[{"name": "echo", "match": {"prefix": f"/{SERVICE}/", "grpc": True},
                                     "cluster": "grpc"}],
                            listener={"access_log": {"path": str(log)}})
        async with running_proxy(cfg) as p:
            code, value, trailing = await asyncio.to_thread(unary, p.port(), b"x", [("x-a", "1")])
            assert (code, value, trailing.get("x-served-by")) == ("OK", b"echo:x", "echo")
            assert svc.metadata[-1]["x-a"] == "1" and "x-request-id" in svc.metadata[-1]
            code, details, _ = await asyncio.to_thread(unary, p.port(), b"x", [("x-fail", "1")])
            assert (code, details) == ("NOT_FOUND", "no such thing")
            assert await asyncio.to_thread(stream, p.port(), 50) == [b"m%d" % i for i in range(50)]
            text = await prometheus(p)
            assert metric(text, "sidecar_grpc_downstream_rq_total", route="echo", grpc_status="0") == 2
            assert metric(text, "sidecar_grpc_downstream_rq_total", route="echo", grpc_status="5") == 1
        from sidecar.observability.access_log import flush_all
        flush_all()
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert [x["grpc_status"] for x in lines] == ["0", "5", "0"]
        assert {x["protocol"] for x in lines} == {"HTTP/2"}


async def test_grpc_retry_on_codes_and_grpc_timeout():
    with EchoService() as svc:
        svc.fail_first["k1"] = 2
        cfg = native_config(clusters={"grpc": grpc_cluster(svc.port)}, routes=[
            {"match": {"prefix": "/", "headers": {"x-route": "deadline"}}, "cluster": "grpc",
             "grpc_timeout_max": "5s", "request_headers": {"remove": ["grpc-timeout"]}},
            {"match": {"prefix": "/"}, "cluster": "grpc",
             "retry": {"retry_on": "unavailable,resource-exhausted", "retries": 3, "backoff": "1ms",
                       "retry_non_idempotent": True}}])
        async with running_proxy(cfg, admin=False) as p:
            code, value, _ = await asyncio.to_thread(unary, p.port(), b"r", [("x-key", "k1")])
            assert (code, value) == ("OK", b"echo:r") and svc.calls == 3
            # grpc-timeout (200 ms, under grpc_timeout_max) ends the call at the proxy, with a
            # gRPC-shaped local reply (the route hides the header from the server)
            async with H2Client(p.port()) as c:
                r = await c.request("POST", f"/{SERVICE}/Unary", [
                    ("content-type", "application/grpc"), ("te", "trailers"),
                    ("grpc-timeout", "200m"), ("x-route", "deadline"), ("x-delay", "2")],
                    b"\x00\x00\x00\x00\x01d")
            assert r.status == 200 and r.body == b""
            assert (r.get("grpc-status"), r.get("grpc-message")) == ("4", "downstream duration timeout")


async def test_grpc_health_checking_native():
    with EchoService("a") as a, EchoService("b") as b:
        b.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        cfg = native_config(
            clusters={"grpc": {"endpoints": [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
                               "protocol": "http2", "panic_threshold": 0,
                               "health_check": {"grpc": {"service": SERVICE}, "interval": "100ms",
                                                "unhealthy_threshold": 1}}},
            routes=[{"match": {"prefix": "/"}, "cluster": "grpc"}])
        async with running_proxy(cfg, admin=False) as p:
            served = set()
            for _ in range(100):
                served = {(await asyncio.to_thread(unary, p.port()))[2].get("x-served-by")
                          for _ in range(6)}
                if served == {"a"}:
                    break
                await asyncio.sleep(0.05)
            assert served == {"a"}


async def test_sidecar_mode_with_a_grpc_app():
    with EchoService("app") as app:
        cfg = {"admin": {"address": "127.0.0.1", "port": 0},
               "sidecar": {"service": "echo", "app": app.port, "app_protocol": "http2",
                           "inbound": {"address": "127.0.0.1", "port": 0}}}
        async with running_proxy(cfg, admin=False) as p:
            port = p.port("inbound")
            code, value, trailing = await asyncio.to_thread(unary, port, b"in")
            assert (code, value, trailing.get("x-served-by")) == ("OK", b"echo:in", "app")


# ---- TLS --------------------------------------------------------------------------------------

def _pki(d: Path) -> dict[str, str]:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": str(d / "ca.pem")}
    Path(out["ca"]).write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, sans: list) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[name] = str(d / f"{name}.pem")
        out[name + "_key"] = str(d / f"{name}-key.pem")
        Path(out[name]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        Path(out[name + "_key"]).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf("server", local)
    leaf("client", [x509.UniformResourceIdentifier("spiffe://test/ns/default/sa/client")])
    return out


async def test_grpc_over_tls_alpn_both_ways_and_mtls(tmp_path):
    pki = _pki(tmp_path)
    read = lambda k: Path(pki[k]).read_bytes()  # noqa: E731
    server_creds = grpc.ssl_server_credentials([(read("server_key"), read("server"))])
    with EchoService("tls-up", server_creds) as svc:
        cfg = native_config(
            clusters={"grpc": grpc_cluster(svc.port, tls={"ca": pki["ca"], "sni": "localhost"})},
            routes=[{"match": {"prefix": "/"}, "cluster": "grpc"}],
            filters=[{"rbac": {"action": "ALLOW", "policies": {"client": {
                "permissions": [{"any": True}],
                "principals": [{"authenticated": "spiffe://test/ns/default/sa/client"}]}}}}],
            listener={"tls": {"cert": pki["server"], "key": pki["server_key"], "ca": pki["ca"],
                              "alpn": ["h2", "http/1.1"]}})
        async with running_proxy(cfg, admin=False) as p:
            creds = grpc.ssl_channel_credentials(root_certificates=read("ca"),
                                                 private_key=read("client_key"),
                                                 certificate_chain=read("client"))
            code, value, trailing = await asyncio.to_thread(unary, p.port(), b"s", (), 10.0, creds)
            assert (code, value, trailing.get("x-served-by")) == ("OK", b"echo:s", "tls-up")
            # without a client certificate the TLS handshake itself is refused (mTLS required)
            anon = grpc.ssl_channel_credentials(root_certificates=read("ca"))
            code, _, _ = await asyncio.to_thread(unary, p.port(), b"s", (), 5.0, anon)
            assert code == "UNAVAILABLE"


@pytest.mark.parametrize("alpn", [["h2"], ["http/1.1"]])
async def test_tls_listener_alpn_choice(tmp_path, alpn):
    import ssl

    from sidecar.testing import Upstream
    pki = _pki(tmp_path)
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener={"tls": {"cert": pki["server"], "key": pki["server_key"],
                                              "alpn": ["h2", "http/1.1"]}})
        async with running_proxy(cfg, admin=False) as p:
            ctx = ssl.create_default_context(cafile=pki["ca"])
            ctx.set_alpn_protocols(alpn)
            if alpn == ["h2"]:
                async with H2Client(p.port(), tls=ctx) as c:
                    assert c.alpn == "h2"
                    r = await c.request("GET", "/tls")
                assert r.status == 200
                assert up.requests[-1].headers["X-Forwarded-Proto"] == "https"
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", p.port(), ssl=ctx,
                                                               server_hostname="localhost")
                assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
                writer.write(b"GET /tls HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = await asyncio.wait_for(reader.read(), 5)
                assert data.startswith(b"HTTP/1.1 200")
                writer.close()
