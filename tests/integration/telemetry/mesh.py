"""Two injected pods on loopback, as real sidecar processes: ``productpage`` (its app calls
through the outbound listener) and ``reviews-v2`` (its inbound listener requires mTLS and
hands requests to its app). Each sidecar gets the env the injector gives an injected pod's
proxy container, and Istio metrics on; both expose the metrics-only listener.

TCP too: productpage's outbound TCP listener (tcp_proxy, Istio metrics on) reaches reviews'
inbound TCP listener over mTLS (Istio's ``outbound|port||host`` cluster name), which hands the
bytes to a TCP app that answers each chunk twice; a second outbound TCP listener points at a
closed port (connect failures, UF,URX).

gRPC too: a third injected pod, ``ratings-v1``, runs a grpcio service (``ratings.Ratings/Get``:
OK, or NOT_FOUND for an unknown id) behind its sidecar (``app_protocol: http2``, inbound over
mTLS); productpage's app calls it with a grpcio client (h2c) through productpage's outbound
listener, whose cluster speaks HTTP/2 over mTLS to ratings' inbound listener."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import grpc
from aiohttp import web

from sidecar.cli.certs import DevCA
from sidecar.testing import ProxyProcess, Upstream, free_port, wait_for_port

TD = "cluster.local"
NS = "shop"
PRODUCTPAGE_ID = f"spiffe://{TD}/ns/{NS}/sa/productpage"
REVIEWS_ID = f"spiffe://{TD}/ns/{NS}/sa/reviews"
REVIEWS_HOST = f"reviews.{NS}.svc.cluster.local"
REVIEWS_TCP_CLUSTER = f"outbound|9000||{REVIEWS_HOST}"     # Istio's name for the service port
RATINGS_ID = f"spiffe://{TD}/ns/{NS}/sa/ratings"
RATINGS_HOST = f"ratings.{NS}.svc.cluster.local"
RATINGS_METHOD = "/ratings.Ratings/Get"


def pod_env(pod: str, sa: str, app: str, version: str, workload: str) -> dict[str, str]:
    """What ``sidecar inject`` gives the proxy container (downward API values filled in)."""
    return {"POD_NAME": pod, "POD_NAMESPACE": NS, "SERVICE_ACCOUNT": sa, "POD_IP": "127.0.0.1",
            "SIDECAR_WORKLOAD_NAME": workload, "SIDECAR_APP": app, "SIDECAR_VERSION": version,
            "SIDECAR_CANONICAL_SERVICE": app, "SIDECAR_CANONICAL_REVISION": version}


def write_pki(d: str) -> dict[str, str]:
    ca = DevCA.create(TD)
    ca.write(d)
    out = {"ca": os.path.join(d, "ca.pem")}
    for sa in ("productpage", "reviews", "ratings", "intruder"):
        cert, key = ca.issue(NS, sa, ips=["127.0.0.1"]).write(d, sa)
        out[sa], out[sa + "-key"] = cert, key
    return out


@dataclass
class Mesh:
    tmp: str
    pki: dict[str, str] = field(default_factory=dict)
    app: Upstream | None = None
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    outbound_port: int = 0
    inbound_port: int = 0
    client_metrics: int = 0
    server_metrics: int = 0
    client_admin: int = 0
    server_admin: int = 0
    procs: list[ProxyProcess] = field(default_factory=list)
    tcp_outbound_port: int = 0          # productpage -> reviews, TCP over mTLS
    tcp_inbound_port: int = 0
    tcp_dead_port: int = 0              # productpage -> a closed port
    tcp_app: asyncio.Server | None = None
    grpc_outbound_port: int = 0         # productpage -> ratings, gRPC over mTLS
    grpc_inbound_port: int = 0
    grpc_metrics: int = 0               # ratings' metrics-only listener
    grpc_app: grpc.aio.Server | None = None
    grpc_seen: list[dict[str, str]] = field(default_factory=list)

    async def _start_grpc_app(self) -> int:
        async def get(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.grpc_seen.append({k: v for k, v in context.invocation_metadata()})
            if request != b"1":
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such rating")
            return b"5 stars"

        self.grpc_app = grpc.aio.server()
        self.grpc_app.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "ratings.Ratings", {"Get": grpc.unary_unary_rpc_method_handler(get)}),))
        port = self.grpc_app.add_insecure_port("127.0.0.1:0")
        await self.grpc_app.start()
        return port

    async def grpc_call(self, rating_id: bytes) -> tuple[grpc.StatusCode, bytes]:
        """One unary call from productpage's app through its sidecar (h2c to the outbound
        listener): the status and the answer."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_outbound_port}") as ch:
            call = ch.unary_unary(RATINGS_METHOD)(rating_id, timeout=5)
            try:
                return grpc.StatusCode.OK, await call
            except grpc.aio.AioRpcError as e:
                return e.code(), b""

    async def start(self) -> Mesh:
        self.pki = write_pki(os.path.join(self.tmp, "pki"))

        async def app(request: web.Request) -> web.StreamResponse:
            self.seen_headers.append(dict(request.headers))
            body = await request.read()
            if request.path.startswith("/missing"):
                return web.Response(status=404, text="no such review")
            if request.path.startswith("/fail"):
                return web.Response(status=503, text="overloaded")
            return web.Response(body=b"r" * 100 + body)

        self.app = await Upstream(app).start()

        async def tcp_app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data * 2)           # twice: sent and received bytes differ
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        self.tcp_app = await asyncio.start_server(tcp_app, "127.0.0.1", 0)
        tcp_app_port = self.tcp_app.sockets[0].getsockname()[1]
        self.tcp_outbound_port, self.tcp_inbound_port = free_port(), free_port()
        self.tcp_dead_port = free_port()
        closed = free_port()
        self.outbound_port, self.inbound_port = free_port(), free_port()
        self.client_metrics, self.server_metrics = free_port(), free_port()
        self.client_admin, self.server_admin = free_port(), free_port()
        p = self.pki
        server = {
            "admin": {"address": "127.0.0.1", "port": self.server_admin},
            "metrics": {"address": "127.0.0.1", "port": self.server_metrics},
            "listeners": [{
                "name": "tcp-inbound", "address": "127.0.0.1", "port": self.tcp_inbound_port,
                "direction": "inbound", "istio_metrics": True,
                "tls": {"cert": p["reviews"], "key": p["reviews-key"], "ca": p["ca"]},
                "tcp_proxy": {"cluster": "tcp_app"}}],
            "clusters": [{"name": "tcp_app", "endpoints": [f"127.0.0.1:{tcp_app_port}"]}],
            "sidecar": {"service": "reviews", "app": self.app.port,
                        "inbound": {"address": "127.0.0.1", "port": self.inbound_port,
                                    "istio_metrics": True,
                                    "tls": {"cert": p["reviews"], "key": p["reviews-key"],
                                            "ca": p["ca"]}}}}
        client = {
            "admin": {"address": "127.0.0.1", "port": self.client_admin},
            "metrics": {"address": "127.0.0.1", "port": self.client_metrics},
            "listeners": [{
                "name": "outbound", "address": "127.0.0.1", "port": self.outbound_port,
                "direction": "outbound", "istio_metrics": True,
                "routes": [{"match": {"prefix": "/"}, "cluster": REVIEWS_HOST}]}, {
                "name": "tcp-outbound", "address": "127.0.0.1", "port": self.tcp_outbound_port,
                "direction": "outbound", "istio_metrics": True,
                "tcp_proxy": {"cluster": REVIEWS_TCP_CLUSTER}}, {
                "name": "tcp-dead", "address": "127.0.0.1", "port": self.tcp_dead_port,
                "direction": "outbound", "istio_metrics": True,
                "tcp_proxy": {"cluster": "dead"}}],
            "clusters": [{"name": REVIEWS_HOST, "endpoints": [f"127.0.0.1:{self.inbound_port}"],
                          "tls": {"ca": p["ca"], "cert": p["productpage"],
                                  "key": p["productpage-key"], "san": [REVIEWS_ID]}},
                         {"name": REVIEWS_TCP_CLUSTER,
                          "endpoints": [f"127.0.0.1:{self.tcp_inbound_port}"],
                          "tls": {"ca": p["ca"], "cert": p["productpage"],
                                  "key": p["productpage-key"], "san": [REVIEWS_ID]}},
                         {"name": "dead", "endpoints": [f"127.0.0.1:{closed}"]}]}
        grpc_app_port = await self._start_grpc_app()
        self.grpc_outbound_port, self.grpc_inbound_port = free_port(), free_port()
        self.grpc_metrics = free_port()
        ratings = {
            "admin": {"address": "127.0.0.1", "port": free_port()},
            "metrics": {"address": "127.0.0.1", "port": self.grpc_metrics},
            "sidecar": {"service": "ratings", "app": grpc_app_port, "app_protocol": "http2",
                        "inbound": {"address": "127.0.0.1", "port": self.grpc_inbound_port,
                                    "istio_metrics": True,
                                    "tls": {"cert": p["ratings"], "key": p["ratings-key"],
                                            "ca": p["ca"]}}}}
        client["listeners"].append({
            "name": "grpc-outbound", "address": "127.0.0.1", "port": self.grpc_outbound_port,
            "direction": "outbound", "istio_metrics": True,
            "routes": [{"match": {"prefix": "/"}, "cluster": RATINGS_HOST}]})
        client["clusters"].append({
            "name": RATINGS_HOST, "endpoints": [f"127.0.0.1:{self.grpc_inbound_port}"],
            "protocol": "http2",
            "tls": {"ca": p["ca"], "cert": p["productpage"], "key": p["productpage-key"],
                    "san": [RATINGS_ID]}})
        for name, cfg, env, port in (
                ("server", server, pod_env("reviews-v2-7d9f8c6b5d-x2x9z", "reviews", "reviews",
                                           "v2", "reviews-v2"), self.inbound_port),
                ("client", client, pod_env("productpage-v1-5f9d8c7b6a-q8w7e", "productpage",
                                           "productpage", "v1", "productpage-v1"),
                 self.outbound_port),
                ("ratings", ratings, pod_env("ratings-v1-6c8b9d7f5c-k2m4n", "ratings", "ratings",
                                             "v1", "ratings-v1"), self.grpc_inbound_port)):
            d = os.path.join(self.tmp, name)
            os.makedirs(d, exist_ok=True)
            proc = ProxyProcess(cfg, d, env=env).start()
            self.procs.append(proc)
            wait_for_port(port, proc=proc)
        server_proc, client_proc, _ = self.procs
        wait_for_port(self.tcp_inbound_port, proc=server_proc)
        for port in (self.tcp_outbound_port, self.tcp_dead_port, self.grpc_outbound_port):
            wait_for_port(port, proc=client_proc)
        return self

    async def tcp_exchange(self, payload: bytes, port: int = 0) -> bytes:
        """One TCP connection through productpage's outbound TCP listener: send ``payload``,
        read the app's answer (twice the payload), close."""
        r, w = await asyncio.open_connection("127.0.0.1", port or self.tcp_outbound_port)
        try:
            w.write(payload)
            await w.drain()
            return await r.readexactly(2 * len(payload))
        finally:
            w.close()
            await w.wait_closed()

    async def tcp_refused(self) -> bytes:
        """A connection through the listener whose cluster refuses: the proxy just closes.
        What it closes with is timing: a FIN, or a RST when "lost" was still unread in its
        socket (the kernel resets a socket closed with unread data); either way no byte."""
        r, w = await asyncio.open_connection("127.0.0.1", self.tcp_dead_port)
        try:
            w.write(b"lost")
            try:
                return await r.read()
            except ConnectionResetError:
                return b""
        finally:
            w.close()

    async def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        if self.app is not None:
            await self.app.stop()
        if self.tcp_app is not None:
            self.tcp_app.close()
        if self.grpc_app is not None:
            await self.grpc_app.stop(0)
