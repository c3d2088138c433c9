"""Scrape-time state: what the data plane already keeps (connections, requests in flight,
endpoint health, ejections, EWMA, breaker occupancy, per-endpoint counters) is read when
Prometheus scrapes, never recorded per request.

With several workers, worker 0 merges every worker's scrape (``sidecar.runtime.workers``).
Gauges counted per worker (requests in flight, connections) are reported as this worker's
share, so the merged sum is the sidecar's; facts that are the sidecar's (an endpoint's health
verdict or ejection, whether a breaker is open) are the same in every worker and merged by
max (``SIDECAR_FACTS``).
"""

from __future__ import annotations

import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sidecar.cluster.breakers import retry_limit
from sidecar.cluster.cluster import Cluster
from sidecar.cluster.endpoint import EndpointState
from sidecar.observability.access_log import access_log_sinks

# Per-endpoint series are emitted for at most this many endpoints per cluster (the rest are
# still counted in the per-cluster series): a 10,000-endpoint EDS cluster must not make a
# scrape explode.
MAX_ENDPOINT_SERIES_PER_CLUSTER = 256


# families whose value is the sidecar's in every worker: merged by max, not summed
SIDECAR_FACTS = frozenset((
    "sidecar_upstream_circuit_breaker_open", "sidecar_upstream_endpoints",
    "sidecar_upstream_outlier_ejections_active", "sidecar_upstream_cluster_warm",
    "sidecar_upstream_endpoint_available", "sidecar_upstream_endpoint_health_check_healthy",
    "sidecar_upstream_endpoint_ejected", "sidecar_upstream_endpoint_ejections",
    "sidecar_upstream_endpoint_weight", "sidecar_config_resources",
))


def install_state_collector(app) -> bool:
    """Register the scrape-time collector for ``app`` (idempotent; no-op with metrics off)."""
    m = app.metrics
    if not m.enabled:
        return False
    return m.add_collector("state", StateCollector(app))


def _listener_active_requests(lr) -> int:
    return lr.active_requests()


def breaker_open(c: Cluster) -> dict[str, int]:
    t = c.thresholds
    br = c.state.breakers
    b = t.retry_budget
    limit = retry_limit(br.active_requests + br.pending_requests, t.max_retries,
                        b.budget_percent if b is not None else None,
                        b.min_retry_concurrency if b is not None else 0)
    return {
        "max_connections": int(c.open_connections() >= t.max_connections),
        "max_pending_requests": int(br.pending_requests >= t.max_pending_requests),
        "max_requests": int(br.active_requests >= t.max_requests),
        "max_retries": int(br.active_retries >= limit),
    }


def endpoint_ewma(cs: Cluster, host: EndpointState, now: float) -> tuple[float, float] | None:
    """(latency estimate seconds, LB cost) as a peak-EWMA balancer sees them right now (the
    estimate decays with time), or None when the cluster's balancer keeps no EWMA."""
    lb = cs.lb
    est_fn = getattr(lb, "estimate", None)
    if est_fn is None:
        return None
    est = est_fn(host, now)
    cost_fn = getattr(lb, "cost", None)
    cost = cost_fn(host, now) if cost_fn is not None else est * (host.active_requests + 1)
    return est, cost


class StateCollector:
    """Reads listener / cluster / endpoint state at scrape time (zero hot-path cost)."""

    def __init__(self, app):
        self.app = app

    def describe(self):
        return []   # unchecked collector: families vary with config

    def collect(self):
        app = self.app
        G, C = GaugeMetricFamily, CounterMetricFamily

        cx_active = G("sidecar_downstream_cx_active", "Open downstream connections", labels=("listener",))
        rq_active = G("sidecar_downstream_rq_active", "Downstream requests in flight", labels=("listener",))
        store = getattr(app, "store", None)
        listeners = getattr(store, "listeners", {}) if store is not None else {}
        for name, lr in list(listeners.items()):
            cx_active.add_metric((name,), len(lr.connections) + len(lr.sessions))
            rq_active.add_metric((name,), _listener_active_requests(lr))
        yield cx_active
        yield rq_active

        up_rq_active = G("sidecar_upstream_rq_active", "Upstream requests in flight", labels=("cluster",))
        up_pending = G("sidecar_upstream_rq_pending_active", "Requests waiting for a connection",
                       labels=("cluster",))
        up_retries = G("sidecar_upstream_rq_retry_active", "Retries in flight", labels=("cluster",))
        up_cx = G("sidecar_upstream_cx_active", "Open upstream connections", labels=("cluster",))
        breaker = G("sidecar_upstream_circuit_breaker_open",
                    "1 when the breaker threshold is reached (new requests overflow)",
                    labels=("cluster", "breaker"))
        members = G("sidecar_upstream_endpoints", "Endpoints by state", labels=("cluster", "state"))
        ej_active = G("sidecar_upstream_outlier_ejections_active", "Endpoints ejected right now",
                      labels=("cluster",))
        warm = G("sidecar_upstream_cluster_warm", "1 once the cluster has its endpoints (EDS)",
                 labels=("cluster",))
        ep_labels = ("cluster", "endpoint")
        e_avail = G("sidecar_upstream_endpoint_available",
                    "1 when the load balancer may pick the endpoint (healthy, not ejected)", labels=ep_labels)
        e_hc = G("sidecar_upstream_endpoint_health_check_healthy",
                 "Last active health-check verdict (1 healthy)", labels=ep_labels)
        e_ejected = G("sidecar_upstream_endpoint_ejected", "1 while outlier detection ejects the endpoint",
                      labels=ep_labels)
        e_ejections = C("sidecar_upstream_endpoint_ejections_total", "Times the endpoint was ejected",
                        labels=ep_labels)
        e_ewma = G("sidecar_upstream_endpoint_ewma_seconds",
                   "Peak-EWMA latency estimate, decayed to now (peak_ewma clusters)", labels=ep_labels)
        e_cost = G("sidecar_upstream_endpoint_ewma_cost_seconds",
                   "Peak-EWMA load-balancer cost: estimate x (active requests + 1) / weight",
                   labels=ep_labels)
        e_rq_active = G("sidecar_upstream_endpoint_rq_active", "Requests in flight to the endpoint",
                        labels=ep_labels)
        e_rq = C("sidecar_upstream_endpoint_rq_total", "Attempts sent to the endpoint", labels=ep_labels)
        e_err = C("sidecar_upstream_endpoint_rq_error_total",
                  "Attempts that failed (5xx, reset, timeout, connect failure)", labels=ep_labels)
        e_to = C("sidecar_upstream_endpoint_rq_timeout_total", "Attempts that timed out", labels=ep_labels)
        e_cf = C("sidecar_upstream_endpoint_cx_connect_fail_total", "Connection failures", labels=ep_labels)
        e_cx = G("sidecar_upstream_endpoint_cx_active", "Open connections to the endpoint", labels=ep_labels)
        e_weight = G("sidecar_upstream_endpoint_weight", "Load-balancing weight", labels=ep_labels)

        now = time.monotonic()
        for cs in sorted(app.clusters.clusters(), key=lambda c: c.name):
            name = cs.name
            cs.refresh_health()
            own = cs.state.breakers.own()
            up_rq_active.add_metric((name,), own.requests)
            up_pending.add_metric((name,), own.pending)
            up_retries.add_metric((name,), own.retries)
            warm.add_metric((name,), int(cs.warm))
            for b, v in breaker_open(cs).items():
                breaker.add_metric((name, b), v)
            hosts = list(cs.hosts)
            n_avail = n_ejected = n_hc_fail = cx = 0
            for i, h in enumerate(hosts):
                ejected = h.ejected_until > now
                avail = h.hc_healthy and not ejected and not h.removed
                n_avail += avail
                n_ejected += ejected
                n_hc_fail += not h.hc_healthy
                hcx = h.http_cx_active + h.cx_active
                cx += hcx
                if i >= MAX_ENDPOINT_SERIES_PER_CLUSTER:
                    continue
                lv = (name, h.address)
                e_avail.add_metric(lv, int(avail))
                e_hc.add_metric(lv, int(h.hc_healthy))
                e_ejected.add_metric(lv, int(ejected))
                e_ejections.add_metric(lv, h.ejections)
                try:
                    ew = endpoint_ewma(cs, h, now)
                except Exception:
                    ew = None
                if ew is not None:
                    e_ewma.add_metric(lv, ew[0])
                    e_cost.add_metric(lv, ew[1])
                e_rq_active.add_metric(lv, h.counters.own_active())
                e_rq.add_metric(lv, h.rq_total)
                e_err.add_metric(lv, h.rq_error)
                e_to.add_metric(lv, h.rq_timeout)
                e_cf.add_metric(lv, h.cx_connect_fail)
                e_cx.add_metric(lv, hcx)
                e_weight.add_metric(lv, h.endpoint.weight)
            up_cx.add_metric((name,), cx)
            members.add_metric((name, "total"), len(hosts))
            members.add_metric((name, "available"), n_avail)
            members.add_metric((name, "ejected"), n_ejected)
            members.add_metric((name, "health_check_failed"), n_hc_fail)
            ej_active.add_metric((name,), n_ejected)
        yield from (up_rq_active, up_pending, up_retries, up_cx, breaker, members, ej_active, warm,
                    e_avail, e_hc, e_ejected, e_ejections, e_ewma, e_cost, e_rq_active, e_rq, e_err,
                    e_to, e_cf, e_cx, e_weight)

        # access log sinks (process-wide, one per destination)
        lines = C("sidecar_access_log_lines_total", "Access log lines by outcome",
                  labels=("path", "outcome"))
        for path, sink in access_log_sinks():
            lines.add_metric((path, "written"), sink.written)
            lines.add_metric((path, "dropped"), sink.dropped)
        yield lines

        # control plane: the version, update counters and last update time are recorded by
        # the app when an update is accepted or refused (sidecar_config_*); this adds sizes
        snap = store.snapshot if store is not None else None
        if snap is not None:
            n = G("sidecar_config_resources", "Resources in the config in force", labels=("type",))
            n.add_metric(("listener",), len(snap.listeners))
            n.add_metric(("cluster",), len(snap.clusters))
            yield n
