"""Two injected pods on loopback, as real sidecar processes: ``productpage`` (its app calls
through the outbound listener) and ``reviews-v2`` (its inbound listener requires mTLS and
hands requests to its app). Each sidecar gets the env the injector gives an injected pod's
proxy container, and Istio metrics on; both expose the metrics-only listener.

TCP too: productpage's outbound TCP listener (tcp_proxy, Istio metrics on) reaches reviews'
inbound TCP listener over mTLS (Istio's ``outbound|port||host`` cluster name), which hands the
bytes to a TCP app that answers each chunk twice; a second outbound TCP listener points at a
closed port (connect failures, UF,URX)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from aiohttp import web

from sidecar.cli.certs import DevCA
from sidecar.testing import ProxyProcess, Upstream, free_port, wait_for_port

TD = "cluster.local"
NS = "shop"
PRODUCTPAGE_ID = f"spiffe://{TD}/ns/{NS}/sa/productpage"
REVIEWS_ID = f"spiffe://{TD}/ns/{NS}/sa/reviews"
REVIEWS_HOST = f"reviews.{NS}.svc.cluster.local"
REVIEWS_TCP_CLUSTER = f"outbound|9000||{REVIEWS_HOST}"     # Istio's name for the service port


def pod_env(pod: str, sa: str, app: str, version: str, workload: str) -> dict[str, str]:
    """What ``sidecar inject`` gives the proxy container (downward API values filled in)."""
    return {"POD_NAME": pod, "POD_NAMESPACE": NS, "SERVICE_ACCOUNT": sa, "POD_IP": "127.0.0.1",
            "SIDECAR_WORKLOAD_NAME": workload, "SIDECAR_APP": app, "SIDECAR_VERSION": version,
            "SIDECAR_CANONICAL_SERVICE": app, "SIDECAR_CANONICAL_REVISION": version}


def write_pki(d: str) -> dict[str, str]:
    ca = DevCA.create(TD)
    ca.write(d)
    out = {"ca": os.path.join(d, "ca.pem")}
    for sa in ("productpage", "reviews", "intruder"):
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
        for name, cfg, env, port in (
                ("server", server, pod_env("reviews-v2-7d9f8c6b5d-x2x9z", "reviews", "reviews",
                                           "v2", "reviews-v2"), self.inbound_port),
                ("client", client, pod_env("productpage-v1-5f9d8c7b6a-q8w7e", "productpage",
                                           "productpage", "v1", "productpage-v1"),
                 self.outbound_port)):
            d = os.path.join(self.tmp, name)
            os.makedirs(d, exist_ok=True)
            proc = ProxyProcess(cfg, d, env=env).start()
            self.procs.append(proc)
            wait_for_port(port, proc=proc)
        server_proc, client_proc = self.procs
        wait_for_port(self.tcp_inbound_port, proc=server_proc)
        for port in (self.tcp_outbound_port, self.tcp_dead_port):
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
        """A connection through the listener whose cluster refuses: the proxy just closes."""
        r, w = await asyncio.open_connection("127.0.0.1", self.tcp_dead_port)
        try:
            w.write(b"lost")
            return await r.read()
        finally:
            w.close()

    async def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        if self.app is not None:
            await self.app.stop()
        if self.tcp_app is not None:
            self.tcp_app.close()
