"""The unary gRPC client over a cluster (``sidecar.cluster.grpc``, Envoy's ``envoy_grpc``)
against a real grpcio server: the call goes through ``Cluster.send`` (the cluster's counters,
breakers and endpoints apply), and every way a call ends gives the status Envoy's client
gives it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from h2_helpers import H2Request, H2Upstream

from sidecar.cli.certs import DevCA
from sidecar.core.grpc import EnvoyGrpcService, grpc_frame
from sidecar.testing import FilterTestEnv, free_port

SERVICE = "test.Echo"


class EchoServer:
    """``test.Echo/Say`` answers the request's bytes reversed; ``Fail`` aborts with the
    request as the message; ``Slow`` sleeps; ``Big`` answers 10 KB. The metadata of every call
    is kept."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.release = asyncio.Event()

    def _keep(self, context: grpc.aio.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata()}
        remaining = context.time_remaining()     # from grpc-timeout (grpcio hides the header)
        md["(time_remaining)"] = "" if remaining is None else f"{remaining:.1f}"
        self.seen.append(md)

    async def say(self, request: bytes, context) -> bytes:
        self._keep(context)
        return request[::-1]

    async def fail(self, request: bytes, context) -> bytes:
        self._keep(context)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, request.decode())

    async def slow(self, request: bytes, context) -> bytes:
        self._keep(context)
        await self.release.wait()
        return b"late"

    async def big(self, request: bytes, context) -> bytes:
        self._keep(context)
        return b"x" * 10_000

    async def start(self, port: int = 0) -> EchoServer:
        self.server = grpc.aio.server()
        handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in (
            ("Say", self.say), ("Fail", self.fail), ("Slow", self.slow), ("Big", self.big))}
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            await self.server.stop(0)


def h2_cluster(port: int, **extra) -> dict:
    return {"endpoints": [f"127.0.0.1:{port}"], "protocol": "http2", **extra}


async def test_unary_calls_through_the_cluster():
    srv = await EchoServer().start()
    env = FilterTestEnv(clusters={"echo": h2_cluster(srv.port)})
    try:
        client = env.grpc_client(EnvoyGrpcService("echo"))
        reply = await client.unary(f"{SERVICE}/Say", b"hello", 2.0)
        assert (reply.status, reply.payload) == (0, b"olleh")
        md = srv.seen[-1]
        # Envoy's envoy_grpc headers: the cluster's name as authority, the timeout in ms, the
        # async client's internal marking
        assert md["(time_remaining)"] in ("2.0", "1.9")
        assert md["x-envoy-internal"] == "true" and "x-forwarded-for" in md
        # a non-OK status (grpcio answers it trailers-only) with its message
        reply = await client.unary(f"{SERVICE}/Fail", "nope, 100% sûr".encode(), 2.0)
        assert (reply.status, reply.message, reply.payload) == (7, "nope, 100% sûr", b"")
        # an unknown method: grpcio's UNIMPLEMENTED
        assert (await client.unary(f"{SERVICE}/Nope", b"", 2.0)).status == 12
        # the timeout: DEADLINE_EXCEEDED, and the call does not outlive it
        reply = await asyncio.wait_for(client.unary(f"{SERVICE}/Slow", b"", 0.2), 5)
        assert reply.status == 4
        # each call is an upstream request of the cluster (its counters)
        assert env.metric("sidecar_upstream_rq_total", cluster="echo", status_class="2xx") >= 3
    finally:
        await env.aclose()
        await srv.stop()


async def test_call_options_through_the_cluster():
    srv = await EchoServer().start()
    env = FilterTestEnv(clusters={"echo": h2_cluster(srv.port)})
    try:
        client = env.grpc_client(EnvoyGrpcService(
            "echo", authority="auth.example", initial_metadata=(("x-tenant", "t1"),),
            skip_envoy_headers=True, max_receive_bytes=1000))
        reply = await client.unary(f"{SERVICE}/Say", b"ab", 1.0, (("x-call", "1"),))
        assert reply.status == 0 and reply.payload == b"ba"
        md = srv.seen[-1]
        assert (md["x-tenant"], md["x-call"]) == ("t1", "1")
        assert "x-envoy-internal" not in md and "x-forwarded-for" not in md
        # max_receive_message_length: a larger answer is an error
        reply = await client.unary(f"{SERVICE}/Big", b"", 1.0)
        assert reply.status == 13 and "max_receive_message_length" in reply.message
        # the authority reached the server (grpcio checks nothing of it; the cluster's name
        # would otherwise be sent)
        assert env.clusters.get("echo") is not None
    finally:
        await env.aclose()
        await srv.stop()


async def test_failures_before_an_answer_are_unavailable():
    dead = free_port()
    env = FilterTestEnv(clusters={"dead": h2_cluster(dead)})
    try:
        reply = await env.grpc_client(EnvoyGrpcService("dead")).unary(f"{SERVICE}/Say", b"", 1.0)
        assert reply.status == 14
        assert env.metric("sidecar_upstream_cx_connect_fail_total", cluster="dead") >= 1
        # a cluster that is not configured: accepted (as by Envoy), every call UNAVAILABLE
        reply = await env.grpc_client(EnvoyGrpcService("later")).unary(f"{SERVICE}/Say", b"", 1.0)
        assert reply.status == 14 and "later" in reply.message
    finally:
        await env.aclose()


async def test_circuit_breaker_applies():
    srv = await EchoServer().start()
    env = FilterTestEnv(clusters={"echo": h2_cluster(
        srv.port, circuit_breakers={"max_requests": 1})})
    try:
        client = env.grpc_client(EnvoyGrpcService("echo"))
        slow = asyncio.ensure_future(client.unary(f"{SERVICE}/Slow", b"", 5.0))
        for _ in range(500):
            if srv.seen or slow.done():
                break
            await asyncio.sleep(0.01)
        assert srv.seen, slow.result() if slow.done() else "the slow call did not arrive"
        reply = await client.unary(f"{SERVICE}/Say", b"x", 1.0)
        assert reply.status == 14 and "overflow" in reply.message
        assert env.metric("sidecar_upstream_rq_overflow_total", cluster="echo",
                          breaker="max_requests") == 1
        srv.release.set()
        assert (await slow).payload == b"late"
    finally:
        await env.aclose()
        await srv.stop()


def test_a_cluster_that_does_not_speak_http2_is_refused():
    env = FilterTestEnv(clusters={"h1": ["127.0.0.1:1"]})
    try:
        with pytest.raises(ValueError, match="needs an HTTP/2 cluster"):
            env.grpc_client(EnvoyGrpcService("h1"))
    finally:
        env.close()


async def test_the_cluster_tls_applies(tmp_path):
    """A TLS cluster: the call goes over TLS (ALPN h2) to a grpcio server with its own
    certificate, verified against the cluster's CA and pinned SPIFFE identity; a cluster
    pinning another identity cannot call it (UNAVAILABLE: the connection is refused)."""
    ca = DevCA.create("cluster.local")
    ca.write(str(tmp_path))
    cert, key = ca.issue("shop", "authz", ips=["127.0.0.1"]).write(str(tmp_path), "authz")
    with open(cert, "rb") as c, open(key, "rb") as k:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())])
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Say": grpc.unary_unary_rpc_method_handler(_reversed)}),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    ca_path = str(tmp_path / "ca.pem")
    env = FilterTestEnv(clusters={
        "authz": h2_cluster(port, tls={"ca": ca_path, "san": ["spiffe://cluster.local/ns/shop/sa/authz"]}),
        "wrong": h2_cluster(port, tls={"ca": ca_path, "san": ["spiffe://cluster.local/ns/shop/sa/x"]})})
    try:
        reply = await env.grpc_client(EnvoyGrpcService("authz")).unary(f"{SERVICE}/Say", b"tls", 2.0)
        assert (reply.status, reply.payload) == (0, b"slt")
        reply = await env.grpc_client(EnvoyGrpcService("wrong")).unary(f"{SERVICE}/Say", b"x", 2.0)
        assert reply.status == 14
    finally:
        await env.aclose()
        await server.stop(0)


async def _reversed(request: bytes, context) -> bytes:
    return request[::-1]


async def test_authority_and_wire_shape():
    """What the service receives, read on the wire by an ``h2`` server: ``:authority`` (the
    cluster's name, or ``envoy_grpc.authority``), the gRPC headers and the framed message; a
    trailers-only answer and a 503 are read as Envoy's client reads them."""
    async def handler(req: H2Request) -> tuple[int, list, bytes, list]:
        if req.path.endswith("/Unavailable"):
            return 503, [("content-type", "text/plain")], b"busy", []
        if req.path.endswith("/Denied"):
            return 200, [("content-type", "application/grpc"), ("grpc-status", "7"),
                         ("grpc-message", "no%20way")], b"", []
        return 200, [("content-type", "application/grpc")], grpc_frame(b"pong"), \
            [("grpc-status", "0")]

    async with H2Upstream(handler) as up:
        env = FilterTestEnv(clusters={"svc": h2_cluster(up.port)})
        try:
            plain = env.grpc_client(EnvoyGrpcService("svc"))
            named = env.grpc_client(EnvoyGrpcService("svc", authority="authz.example"))
            assert (await plain.unary(f"{SERVICE}/Ping", b"ping", 1.5)).payload == b"pong"
            req = up.requests[-1]
            assert (req.method, req.path, req.authority, req.body) == \
                ("POST", f"/{SERVICE}/Ping", "svc", grpc_frame(b"ping"))
            assert (req.get("content-type"), req.get("te"), req.get("grpc-timeout"),
                    req.get("x-envoy-expected-rq-timeout-ms")) == \
                ("application/grpc", "trailers", "1500m", "1500")
            assert (await named.unary(f"{SERVICE}/Ping", b"", 1.0)).ok
            assert up.requests[-1].authority == "authz.example"
            denied = await plain.unary(f"{SERVICE}/Denied", b"", 1.0)
            assert (denied.status, denied.message) == (7, "no way")
            assert (await plain.unary(f"{SERVICE}/Unavailable", b"", 1.0)).status == 14
        finally:
            await env.aclose()
