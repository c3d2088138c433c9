"""Telemetry config: the metrics-only listener and the opt-in Istio standard metrics.

Both ways in produce these: native YAML (``metrics: {address, port}`` at the top level and
``istio_metrics: {...}`` on a listener) and Envoy v3 (Istio's own shapes: the ``15090``
listener routing ``/stats/prometheus`` to the admin, and the ``istio.stats`` HTTP filter; see
``control_plane_client/translate/telemetry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Istio's standard metrics on one HTTP listener (``istio_requests_total`` ...).

    reporter is ``destination`` on inbound listeners and ``source`` on outbound ones; the
    local workload's labels come from the pod (``sidecar.observability.workload``)."""
    # destination_service on inbound listeners ("": <canonical service>.<namespace>.svc.<domain>)
    service: str = ""
    # exchange workload metadata with the peer sidecar (Istio's x-envoy-peer-metadata headers);
    # a peer's metadata is used only when it agrees with the peer's verified mTLS identity
    peer_metadata: bool = True
