"""Istio's standard metrics (opt-in per listener: ``istio_metrics``), so the Istio Grafana
dashboards work unchanged.

HTTP and gRPC: ``istio_requests_total``, ``istio_request_duration_milliseconds``,
``istio_request_bytes``, ``istio_response_bytes``; TCP: ``istio_tcp_sent_bytes_total``,
``istio_tcp_received_bytes_total``, ``istio_tcp_connections_opened_total``,
``istio_tcp_connections_closed_total``. Istio's label set, in Istio's order.

``reporter`` is ``destination`` on inbound listeners (this pod is the destination; the peer,
from its mTLS identity and metadata exchange, is the source) and ``source`` on outbound ones
(this pod is the source; the destination is the chosen cluster's service and its verified
identity).

Bounded label values: this side's labels are fixed per process; the service labels come from
cluster config; codes and flags from small sets; peers from verified identities, at most
``MAX_PEERS`` distinct ones per process (then ``unknown``). Nothing is taken from request
values (no Host-header fallback). Recording binds the label children of a (peer, service,
protocol, code, flags) combination once and reuses them (``_children``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sidecar.config.cluster import Cluster as ClusterConfig
from sidecar.config.telemetry import IstioMetrics
from sidecar.core.metrics import CounterChild, CounterFamily, HistogramChild, HistogramFamily, MetricFactory
from sidecar.observability.flags import KNOWN_FLAGS, envoy_order
from sidecar.observability.workload import UNKNOWN, Workload, WorkloadLabels, peer_from_identity

log = logging.getLogger("sidecar.istio")

SIDE = ("workload", "workload_namespace", "principal", "app", "version", "cluster",
        "canonical_service", "canonical_revision")
SOURCE = tuple(f"source_{s}" for s in SIDE)
DESTINATION = tuple(f"destination_{s}" for s in SIDE)
SERVICE = ("destination_service", "destination_service_name", "destination_service_namespace")
HTTP_LABELS = ("reporter", *SOURCE, *DESTINATION, *SERVICE, "request_protocol",
               "response_code", "grpc_response_status", "response_flags",
               "connection_security_policy")
TCP_LABELS = ("reporter", *SOURCE, *DESTINATION, *SERVICE, "request_protocol",
              "response_flags", "connection_security_policy")

# Envoy's default histogram buckets (milliseconds), as Istio's duration histogram uses them
DURATION_MS_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                       60000, 300000, 600000, 1800000, 3600000)
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)

MAX_PEERS = 1000            # distinct peer label sets per process; beyond: "unknown"
MAX_CHILDREN = 20000        # bound label-children caches per recorder (then: no caching)

GRPC_STATUSES = frozenset(str(i) for i in range(17))


@dataclass(frozen=True, slots=True)
class ServiceLabels:
    host: str = UNKNOWN
    name: str = UNKNOWN
    namespace: str = UNKNOWN

    def values(self) -> tuple[str, str, str]:
        return (self.host, self.name, self.namespace)


def service_labels(host: str) -> ServiceLabels:
    """``name.namespace.svc.<domain>`` -> (host, name, namespace); other hosts keep the host
    as the name and an unknown namespace."""
    if not host or host == UNKNOWN:
        return ServiceLabels()
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return ServiceLabels(host, parts[0], parts[1])
    return ServiceLabels(host, host, UNKNOWN)


class ClusterFacts:
    """What an outbound stream's or connection's destination labels come from (one cluster's
    config)."""

    __slots__ = ("service", "principal", "mtls")

    def __init__(self, service: ServiceLabels, principal: str, mtls: bool):
        self.service = service
        self.principal = principal    # the one identity its TLS verifies, else unknown
        self.mtls = mtls              # it presents a client certificate


def cluster_host(name: str, config: ClusterConfig | None) -> str:
    """The service host a cluster stands for: Istio's ``outbound|port|subset|host`` name, else
    a DNS endpoint's host (STRICT/LOGICAL_DNS), else the cluster's name."""
    if name.startswith("outbound|") and name.count("|") == 3:
        return name.rsplit("|", 1)[1]
    if config is not None and config.type in ("strict_dns", "logical_dns") and config.endpoints:
        return config.endpoints[0].host
    return name


def cluster_facts(name: str, config: ClusterConfig | None) -> ClusterFacts:
    tls = config.tls if config is not None else None
    principal = UNKNOWN
    if tls is not None and tls.verify and len(tls.match_san_uris) == 1:
        principal = tls.match_san_uris[0]
    return ClusterFacts(service_labels(cluster_host(name, config)) if name else ServiceLabels(),
                        principal, tls is not None and tls.presents_cert)


def flags_label(flags: list[str]) -> str:
    if not flags:
        return "-"
    return ",".join(f if f in KNOWN_FLAGS else "other" for f in envoy_order(flags))


class IstioFamilies:
    """The eight families on the process registry, made once."""

    def __init__(self, m: MetricFactory):
        self.enabled = m.enabled
        self.requests: CounterFamily = m.counter(
            "istio_requests_total", "Requests (Istio standard metric)", HTTP_LABELS)
        self.duration: HistogramFamily = m.histogram(
            "istio_request_duration_milliseconds", "Request duration in milliseconds (Istio)",
            HTTP_LABELS, buckets=DURATION_MS_BUCKETS)
        self.request_bytes: HistogramFamily = m.histogram(
            "istio_request_bytes", "Request body sizes (Istio)", HTTP_LABELS, buckets=SIZE_BUCKETS)
        self.response_bytes: HistogramFamily = m.histogram(
            "istio_response_bytes", "Response body sizes (Istio)", HTTP_LABELS,
            buckets=SIZE_BUCKETS)
        self.tcp_sent: CounterFamily = m.counter(
            "istio_tcp_sent_bytes_total", "Bytes sent to the downstream in TCP connections (Istio)",
            TCP_LABELS)
        self.tcp_received: CounterFamily = m.counter(
            "istio_tcp_received_bytes_total",
            "Bytes received from the downstream in TCP connections (Istio)", TCP_LABELS)
        self.tcp_opened: CounterFamily = m.counter(
            "istio_tcp_connections_opened_total", "TCP connections opened (Istio)", TCP_LABELS)
        self.tcp_closed: CounterFamily = m.counter(
            "istio_tcp_connections_closed_total", "TCP connections closed (Istio)", TCP_LABELS)
        self._peers: dict[WorkloadLabels, WorkloadLabels] = {}
        self._overflow_logged = False

    def bounded_peer(self, peer: WorkloadLabels) -> WorkloadLabels:
        """The peer as a label set, or ``unknown`` everywhere once ``MAX_PEERS`` distinct
        peers were seen (a peer can only add itself after proving an identity, but a CA that
        issues many identities must not grow the registry without end)."""
        known = self._peers.get(peer)
        if known is not None:
            return known
        if len(self._peers) >= MAX_PEERS:
            if not self._overflow_logged:
                self._overflow_logged = True
                log.warning("Istio metrics: more than %d distinct peers; further peers are "
                            "labelled unknown", MAX_PEERS)
            return WorkloadLabels()
        self._peers[peer] = peer
        return peer


class _Http:
    __slots__ = ("requests", "duration", "request_bytes", "response_bytes")

    def __init__(self, f: IstioFamilies, labels: tuple[str, ...]):
        self.requests: CounterChild = f.requests.labels(*labels)
        self.duration: HistogramChild = f.duration.labels(*labels)
        self.request_bytes: HistogramChild = f.request_bytes.labels(*labels)
        self.response_bytes: HistogramChild = f.response_bytes.labels(*labels)


class HttpRecorder:
    """Records finished HTTP streams of one listener (one reporter and one local side)."""

    __slots__ = ("families", "inbound", "_children")

    def __init__(self, families: IstioFamilies, inbound: bool):
        self.families = families
        self.inbound = inbound
        self._children: dict[tuple[object, ...], _Http] = {}

    def record(self, *, local: WorkloadLabels, peer: WorkloadLabels, service: ServiceLabels,
               grpc: bool, status: int, grpc_status: str, flags: list[str], mtls: bool,
               duration_s: float, request_bytes: int, response_bytes: int) -> None:
        protocol = "grpc" if grpc else "http"
        gs = (grpc_status if grpc_status in GRPC_STATUSES else UNKNOWN) if grpc else ""
        fl = flags_label(flags)
        key = (local, peer, service, protocol, status, gs, fl, mtls)
        ch = self._children.get(key)
        if ch is None:
            peer = self.families.bounded_peer(peer)
            if self.inbound:
                src, dst = peer, local
                security = "mutual_tls" if mtls else "none"
                reporter = "destination"
            else:
                src, dst = local, peer
                security = "unknown"           # as Istio reports on the source side
                reporter = "source"
            ch = _Http(self.families, (reporter, *src.values(), *dst.values(), *service.values(),
                                       protocol, str(status), gs, fl, security))
            if len(self._children) < MAX_CHILDREN:
                self._children[key] = ch
        ch.requests.inc()
        ch.duration.observe(duration_s * 1000.0)
        ch.request_bytes.observe(request_bytes)
        ch.response_bytes.observe(response_bytes)


class TcpRecorder:
    """The TCP families' children for one connection's labels (bound once per connection)."""

    __slots__ = ("sent", "received", "opened", "closed")

    def __init__(self, families: IstioFamilies, inbound: bool, local: WorkloadLabels,
                 peer: WorkloadLabels, service: ServiceLabels, mtls: bool, flags: str = "-"):
        peer = families.bounded_peer(peer)
        if inbound:
            labels = ("destination", *peer.values(), *local.values(), *service.values(), "tcp",
                      flags, "mutual_tls" if mtls else "none")
        else:
            labels = ("source", *local.values(), *peer.values(), *service.values(), "tcp",
                      flags, "unknown")
        self.sent: CounterChild = families.tcp_sent.labels(*labels)
        self.received: CounterChild = families.tcp_received.labels(*labels)
        self.opened: CounterChild = families.tcp_opened.labels(*labels)
        self.closed: CounterChild = families.tcp_closed.labels(*labels)


class TcpReporter:
    """The Istio TCP metrics of one tcp_proxy chain (``TcpProxy.istio_metrics``): which side
    reports, this pod's labels, and each connection's ``TcpRecorder``, bound once per
    connection when its upstream connection is settled (connected, or failed with its flags).

    The peer is the downstream's verified mTLS identity inbound, the identity the cluster's TLS
    verifies outbound, as for HTTP streams (``sidecar.route.istio``). TCP has no metadata
    exchange here, so a peer is known by its identity (namespace, principal) only.
    Recorders with the same labels are shared: they hold only the label children."""

    __slots__ = ("families", "inbound", "local", "local_mtls", "service", "_facts",
                 "_recorders")

    def __init__(self, families: IstioFamilies, workload: Workload, inbound: bool,
                 cfg: IstioMetrics):
        self.families = families
        self.inbound = inbound
        self.local = workload.labels(UNKNOWN)
        self.local_mtls = workload.labels(workload.spiffe_id)
        self.service = service_labels(cfg.service or workload.default_service())
        self._facts: dict[str, ClusterFacts] = {}
        self._recorders: dict[tuple[object, ...], TcpRecorder] = {}

    def facts(self, cluster: str, config: ClusterConfig | None) -> ClusterFacts:
        f = self._facts.get(cluster)
        if f is None:
            f = self._facts[cluster] = cluster_facts(cluster, config)
        return f

    def recorder(self, *, peer_identity: str | None, downstream_tls: bool, cluster: str,
                 config: ClusterConfig | None, flags: list[str]) -> TcpRecorder:
        """The children of one connection's labels (its flags as they are now)."""
        fl = flags_label(flags)
        if self.inbound:
            mtls = downstream_tls and peer_identity is not None
            key: tuple[object, ...] = (peer_identity if mtls else None, fl)
        else:
            facts = self.facts(cluster, config)
            mtls = facts.mtls
            key = (cluster, fl)
        rec = self._recorders.get(key)
        if rec is not None:
            return rec
        if self.inbound:
            peer = peer_from_identity(peer_identity) if mtls else WorkloadLabels()
            service = self.service
        else:
            peer = peer_from_identity(facts.principal) if facts.principal != UNKNOWN \
                else WorkloadLabels()
            service = facts.service
        rec = TcpRecorder(self.families, self.inbound, self.local_mtls if mtls else self.local,
                          peer, service, mtls, fl)
        if len(self._recorders) < MAX_CHILDREN:
            self._recorders[key] = rec
        return rec
