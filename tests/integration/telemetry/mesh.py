"""Two injected pods on loopback, as real sidecar processes: ``productpage`` (its app calls
through the outbound listener) and ``reviews-v2`` (its inbound listener requires mTLS and
hands requests to its app). Each sidecar gets the env the injector gives an injected pod's
proxy container, and Istio metrics on; both expose the metrics-only listener."""

from __future__ import annotations

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
        self.outbound_port, self.inbound_port = free_port(), free_port()
        self.client_metrics, self.server_metrics = free_port(), free_port()
        self.client_admin, self.server_admin = free_port(), free_port()
        p = self.pki
        server = {
            "admin": {"address": "127.0.0.1", "port": self.server_admin},
            "metrics": {"address": "127.0.0.1", "port": self.server_metrics},
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
                "routes": [{"match": {"prefix": "/"}, "cluster": REVIEWS_HOST}]}],
            "clusters": [{"name": REVIEWS_HOST, "endpoints": [f"127.0.0.1:{self.inbound_port}"],
                          "tls": {"ca": p["ca"], "cert": p["productpage"],
                                  "key": p["productpage-key"], "san": [REVIEWS_ID]}}]}
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
        return self

    async def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        if self.app is not None:
            await self.app.stop()
