"""Telemetry config: the metrics-only listener and the opt-in Istio standard metrics.

Both ways in produce these: native YAML (``metrics: {address, port}`` at the top level and
``istio_metrics: {...}`` on a listener or a TCP chain) and Envoy v3 (Istio's own shapes: the ``15090``
listener routing ``/stats/prometheus`` to the admin, and the ``istio.stats`` HTTP filter; see
``control_plane_client/translate/telemetry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import wire as w

METRICS_PATH = "/stats/prometheus"


@dataclass(frozen=True, slots=True)
class MetricsListener:
    """A listener serving ``GET /stats/prometheus`` (all workers merged) and nothing else, so
    Prometheus can scrape the pod IP while the admin stays on loopback. Worker 0 binds it."""
    host: str = "0.0.0.0"
    port: int = 15090
    name: str = "metrics"


@dataclass(frozen=True, slots=True)
class IstioMetrics:
    """Istio's standard metrics on one HTTP listener (``istio_requests_total`` ...) or one TCP
    chain (``istio_tcp_*``, ``TcpProxy.istio_metrics``).

    reporter is ``destination`` on inbound listeners and ``source`` on outbound ones; the
    local workload's labels come from the pod (``sidecar.observability.workload``)."""
    # destination_service on inbound listeners ("": <canonical service>.<namespace>.svc.<domain>)
    service: str = ""
    # exchange workload metadata with the peer sidecar (Istio's x-envoy-peer-metadata headers);
    # a peer's metadata is used only when it agrees with the peer's verified mTLS identity
    peer_metadata: bool = True


def istio_metrics_from_native(d: w.Raw, path: str) -> IstioMetrics | None:
    """A native listener's or chain's ``istio_metrics: true | false |
    {service: web.shop.svc.cluster.local, peer_metadata: true}`` (None: off)."""
    v = d.get("istio_metrics")
    if v is None or v is False:
        return None
    if v is True:
        return IstioMetrics()
    p = w.join(path, "istio_metrics")
    m = w.check_keys(v, ("service", "peer_metadata"), p)
    return IstioMetrics(service=w.string(m, "service", p, ""),
                        peer_metadata=w.boolean(m, "peer_metadata", p, True))
