"""Istio standard metrics on a listener's routes: the facts they are labelled with, Istio's
metadata exchange, and the recording at the end of each stream.

Per listener (``IstioListener``, built with the listener's stacks): the reporter (inbound:
``destination``, outbound: ``source``), this pod's labels, the inbound service, and per
cluster (outbound) the destination service and the identity its TLS settings verify.

Metadata exchange (``PeerExchangeLayer``, right inside the observe layer; Istio's
``x-envoy-peer-metadata`` headers): outbound requests to clusters that verify a mesh identity
(mTLS with one expected SPIFFE URI SAN) carry this pod's metadata and the peer's answer names
the destination workload; inbound, a request's metadata names the source workload and the
answer carries ours. Metadata is used only when it agrees with the peer's verified identity,
and the headers never reach the app or the caller.
"""

from __future__ import annotations

import time

from sidecar.cluster.manager import ClusterManager
from sidecar.config.listener import Listener
from sidecar.core.body import BodySource
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Handler
from sidecar.core.message import Request, Response
from sidecar.observability.istio import (
    ClusterFacts,
    HttpRecorder,
    IstioFamilies,
    cluster_facts,
    service_labels,
)
from sidecar.observability.workload import (
    PEER_METADATA,
    PEER_METADATA_ID,
    UNKNOWN,
    Workload,
    WorkloadLabels,
    peer_from_identity,
    peer_from_metadata,
    spiffe_parts,
)

PEER_CACHE = 1024          # decoded metadata headers kept per listener


class IstioListener:
    """One listener's Istio labels and recorder."""

    __slots__ = ("recorder", "inbound", "local", "local_mtls", "service", "headers",
                 "_clusters", "_facts", "_peers")

    def __init__(self, families: IstioFamilies, workload: Workload, listener: Listener,
                 clusters: ClusterManager):
        cfg = listener.istio_metrics
        assert cfg is not None
        self.inbound = listener.direction == "inbound"
        self.recorder = HttpRecorder(families, self.inbound)
        # this side's principal is the pod's SPIFFE ID when the connection is mutual TLS
        self.local = workload.labels(UNKNOWN)
        self.local_mtls = workload.labels(workload.spiffe_id)
        self.service = service_labels(cfg.service or workload.default_service())
        self.headers = workload.metadata_headers() if cfg.peer_metadata else None
        self._clusters = clusters
        self._facts: dict[str, ClusterFacts] = {}
        # decoded metadata by (header, identity): a peer sends the same header on every request
        self._peers: dict[tuple[str, str], WorkloadLabels | None] = {}

    def peer(self, header: str, identity: str) -> WorkloadLabels | None:
        key = (header, identity)
        try:
            return self._peers[key]
        except KeyError:
            pass
        peer = peer_from_metadata(header, identity)
        if len(self._peers) < PEER_CACHE:
            self._peers[key] = peer
        return peer

    def facts(self, cluster: str) -> ClusterFacts:
        f = self._facts.get(cluster)
        if f is None:
            c = self._clusters.get(cluster)
            f = self._facts[cluster] = cluster_facts(cluster, c.config if c is not None else None)
        return f

    def stream_done(self, req: Request, resp: Response, body_bytes: int) -> None:
        ctx = req.ctx
        peer = ctx.peer_workload
        grpc_status = ""
        if ctx.grpc:
            grpc_status = resp.headers.get("grpc-status", "")
            if not grpc_status:
                trailers = resp.trailers
                src = resp.body
                if trailers is None and isinstance(src, BodySource):
                    trailers = src.trailers
                if trailers is not None:
                    grpc_status = trailers.get("grpc-status", "")
        if self.inbound:
            mtls = ctx.tls and ctx.peer_identity is not None
            if not isinstance(peer, WorkloadLabels):
                peer = peer_from_identity(ctx.peer_identity) if mtls else WorkloadLabels()
            local, service = (self.local_mtls if mtls else self.local), self.service
        else:
            facts = self.facts(ctx.cluster)
            mtls = facts.mtls
            if not isinstance(peer, WorkloadLabels):
                peer = peer_from_identity(facts.principal) if facts.principal != UNKNOWN \
                    else WorkloadLabels()
            local, service = (self.local_mtls if mtls else self.local), facts.service
        self.recorder.record(local=local, peer=peer, service=service, grpc=ctx.grpc,
                             status=resp.status, grpc_status=grpc_status, flags=ctx.flags,
                             mtls=mtls, duration_s=time.perf_counter() - ctx.start,
                             request_bytes=ctx.bytes_received, response_bytes=ctx.bytes_sent)


class PeerExchangeLayer:
    """Istio's metadata exchange for one route (see the module docstring)."""

    __slots__ = ("istio", "next", "send")

    def __init__(self, istio: IstioListener, route: RouteInfo, next: Handler):
        self.istio = istio
        self.next = next
        names = route.cluster_names
        # outbound: only to clusters that verify a mesh identity (the metadata names this pod:
        # it is for mesh peers, not for whatever a route reaches)
        self.send = (not istio.inbound and istio.headers is not None and bool(names)
                     and all(spiffe_parts(istio.facts(n).principal) is not None for n in names))

    async def __call__(self, req: Request) -> Response:
        istio = self.istio
        headers = istio.headers
        ctx = req.ctx
        if istio.inbound:
            raw = req.headers.get(PEER_METADATA)
            if raw is not None or PEER_METADATA_ID in req.headers:
                req.headers.popall(PEER_METADATA, None)
                req.headers.popall(PEER_METADATA_ID, None)
            if raw and headers is not None and ctx.tls and ctx.peer_identity:
                ctx.peer_workload = istio.peer(raw, ctx.peer_identity)
            resp = await self.next(req)
            if raw is not None and headers is not None:
                # answer a mesh peer's metadata with ours (never to a caller that sent none)
                for name, value in headers:
                    resp.headers[name] = value
            return resp
        if self.send and headers is not None:
            for name, value in headers:
                req.headers[name] = value
        resp = await self.next(req)
        raw = resp.headers.get(PEER_METADATA)
        if raw is not None or PEER_METADATA_ID in resp.headers:
            resp.headers.popall(PEER_METADATA, None)
            resp.headers.popall(PEER_METADATA_ID, None)
            if raw and headers is not None:
                principal = istio.facts(ctx.cluster).principal
                if spiffe_parts(principal) is not None:
                    ctx.peer_workload = istio.peer(raw, principal)
        return resp
