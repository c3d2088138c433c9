"""Metric recording: pre-bound children for the hot path, and a scrape-time collector.

Two kinds of numbers:

* **Events** (a request ended, a retry happened, a breaker refused) are counted on the hot path
  through children bound once per cluster / route (``ClusterStats``, ``RouteStats``), so
  recording is one method call. With metrics off every child is ``NULL`` (a no-op).
* **State** the data plane already keeps (open connections, requests in flight, endpoint
  health, ejections, peak-EWMA estimates, breaker occupancy, per-endpoint counters) is never
  recorded per request: ``StateCollector`` reads it from the cluster manager and the listeners
  when Prometheus scrapes.

Labels are bounded by config (listener, virtual host, route name, cluster, endpoint address,
status class, response flag), never by request values such as paths or header values.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from sidecar.observability.metrics import STATUS_CLASSES, Metrics

# Per-endpoint series are emitted for at most this many endpoints per cluster (the rest are
# still counted in the per-cluster series): a 10,000-endpoint EDS cluster must not make a
# scrape explode.
MAX_ENDPOINT_SERIES_PER_CLUSTER = 256

# Envoy response flags (short codes); anything else is counted as "other" so a bug or a new
# filter cannot create unbounded label values.
KNOWN_FLAGS = frozenset((
    "DC", "DI", "DPE", "FI", "IH", "LH", "LR", "NC", "NFCF", "NR", "OM", "RL", "RLSE", "SI",
    "UAEX", "UC", "UF", "UH", "UMSDR", "UO", "UPE", "URX", "UT", "UR", "DF", "DO", "DT",
))


class _Null:
    """Stands in for a metric child when metrics are off: every call is a no-op."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def set(self, value: float) -> None:
        pass


NULL = _Null()


class ClusterStats:
    """Upstream event counters for one cluster (per attempt, not per downstream request)."""

    __slots__ = ("rq_by_class", "rq_total", "cx_connect_fail", "rq_timeout", "rq_retry",
                 "rq_retry_success", "rq_retry_overflow", "rq_overflow", "latency",
                 "cx_total", "rq_reset", "rq_per_try_timeout", "retry_limit_exceeded",
                 "rq_pending_overflow", "hc_success", "hc_failure", "ejections_enforced")

    def __init__(self, m: Metrics, cluster: str):
        if not m.enabled:
            for s in self.__slots__:
                setattr(self, s, NULL)
            self.rq_by_class = (NULL,) * 5
            return
        rq = m.counter("sidecar_upstream_rq_total", "Upstream requests (attempts) answered, by response class",
                       ("cluster", "status_class"))
        self.rq_by_class = tuple(rq.labels(cluster, c) for c in STATUS_CLASSES)
        self.rq_total = NULL
        self.cx_connect_fail = m.counter("sidecar_upstream_cx_connect_fail_total",
                                         "Upstream connection failures", ("cluster",)).labels(cluster)
        self.cx_total = m.counter("sidecar_upstream_cx_total", "Upstream connections opened",
                                  ("cluster",)).labels(cluster)
        self.rq_timeout = m.counter("sidecar_upstream_rq_timeout_total",
                                    "Upstream requests that hit the route timeout", ("cluster",)).labels(cluster)
        self.rq_per_try_timeout = m.counter("sidecar_upstream_rq_per_try_timeout_total",
                                            "Upstream attempts that hit the per-try timeout",
                                            ("cluster",)).labels(cluster)
        self.rq_reset = m.counter("sidecar_upstream_rq_reset_total",
                                  "Upstream requests reset before a response", ("cluster",)).labels(cluster)
        retry = m.counter("sidecar_upstream_rq_retry_total", "Retries by outcome",
                          ("cluster", "outcome"))
        self.rq_retry = retry.labels(cluster, "attempted")
        self.rq_retry_success = retry.labels(cluster, "success")
        self.rq_retry_overflow = retry.labels(cluster, "overflow")
        self.retry_limit_exceeded = retry.labels(cluster, "limit_exceeded")
        ov = m.counter("sidecar_upstream_rq_overflow_total",
                       "Requests refused by a circuit breaker", ("cluster", "breaker"))
        self.rq_overflow = ov.labels(cluster, "max_requests")
        self.rq_pending_overflow = ov.labels(cluster, "max_pending_requests")
        self.latency = m.histogram("sidecar_upstream_rq_time_seconds",
                                   "Upstream attempt latency to response headers",
                                   ("cluster",)).labels(cluster)
        hc = m.counter("sidecar_upstream_health_check_total", "Active health checks by result",
                       ("cluster", "result"))
        self.hc_success = hc.labels(cluster, "success")
        self.hc_failure = hc.labels(cluster, "failure")
        self.ejections_enforced = m.counter(
            "sidecar_upstream_outlier_ejections_enforced_total",
            "Endpoints ejected by outlier detection", ("cluster",)).labels(cluster)


class RouteStats:
    """Downstream request stats for one route on one listener."""

    __slots__ = ("rq_by_class", "latency", "bytes_in", "bytes_out", "_flags", "_flag_family",
                 "_labels")

    def __init__(self, m: Metrics, listener: str, vhost: str, route: str):
        self._flags: dict[str, Any] = {}
        self._labels = (listener, vhost, route)
        if not m.enabled:
            self.rq_by_class = (NULL,) * 5
            self.latency = self.bytes_in = self.bytes_out = NULL
            self._flag_family = None
            return
        rq = m.counter("sidecar_http_downstream_rq_total", "Downstream requests by response class",
                       ("listener", "virtual_host", "route", "status_class"))
        self.rq_by_class = tuple(rq.labels(listener, vhost, route, c) for c in STATUS_CLASSES)
        self.latency = m.histogram("sidecar_http_downstream_rq_time_seconds",
                                   "Downstream request latency (headers in to last byte out)",
                                   ("listener", "virtual_host", "route")).labels(listener, vhost, route)
        self.bytes_in = m.counter("sidecar_http_downstream_rq_bytes_total", "Request body bytes received",
                                  ("listener", "virtual_host", "route")).labels(listener, vhost, route)
        self.bytes_out = m.counter("sidecar_http_downstream_rs_bytes_total", "Response body bytes sent",
                                   ("listener", "virtual_host", "route")).labels(listener, vhost, route)
        self._flag_family = m.counter("sidecar_http_downstream_rq_flag_total",
                                      "Downstream requests by Envoy response flag",
                                      ("listener", "virtual_host", "route", "flag"))

    def flag(self, flag: str):
        """The counter for one response flag (bound on first use: flags are the rare path)."""
        c = self._flags.get(flag)
        if c is None:
            fam = self._flag_family
            if fam is None:
                return NULL
            label = flag if flag in KNOWN_FLAGS else "other"
            c = self._flags[flag] = fam.labels(*self._labels, label)
        return c


class StatsCache:
    """One ClusterStats / RouteStats per name for the life of the process (children reused
    across reloads)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._clusters: dict[str, ClusterStats] = {}
        self._routes: dict[tuple, RouteStats] = {}

    def cluster(self, name: str) -> ClusterStats:
        s = self._clusters.get(name)
        if s is None:
            s = self._clusters[name] = ClusterStats(self.metrics, name)
        return s

    def route(self, listener: str, vhost: str, route: str) -> RouteStats:
        key = (listener, vhost, route)
        s = self._routes.get(key)
        if s is None:
            s = self._routes[key] = RouteStats(self.metrics, listener, vhost, route)
        return s

    def unmatched(self, listener: str) -> RouteStats:
        """Requests that matched no route (404 NR) or never reached routing."""
        return self.route(listener, "", "")

    def flag(self, listener: str, flag: str):
        """Kept for callers of the first core version: the listener-level (unmatched) series."""
        return self.unmatched(listener).flag(flag)


# ---- scrape-time state --------------------------------------------------------------------

def install_state_collector(app) -> bool:
    """Register the scrape-time collector for ``app`` (idempotent; no-op with metrics off)."""
    m = app.metrics
    if not m.enabled:
        return False
    return m.add_collector("state", StateCollector(app))


def _listener_active_requests(lr) -> int:
    return lr.active_requests()


def _breaker_open(cs) -> dict[str, int]:
    from sidecar.route.retry import retry_limit
    t = cs.config.circuit_breakers.default
    b = t.retry_budget
    limit = retry_limit(cs.active_requests + cs.pending_requests, t.max_retries,
                        b.budget_percent if b is not None else None,
                        b.min_retry_concurrency if b is not None else 0)
    return {
        "max_connections": int(cs.open_connections() >= t.max_connections),
        "max_pending_requests": int(cs.pending_requests >= t.max_pending_requests),
        "max_requests": int(cs.active_requests >= t.max_requests),
        "max_retries": int(cs.active_retries >= limit),
    }


def endpoint_ewma(cs, host, now: float) -> Optional[tuple[float, float]]:
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
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        app = self.app
        G, C = GaugeMetricFamily, CounterMetricFamily

        cx_active = G("sidecar_downstream_cx_active", "Open downstream connections", labels=("listener",))
        rq_active = G("sidecar_downstream_rq_active", "Downstream requests in flight", labels=("listener",))
        store = getattr(app, "store", None)
        listeners = getattr(store, "listeners", {}) if store is not None else {}
        for name, lr in list(listeners.items()):
            cx_active.add_metric((name,), len(lr.connections))
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

        clusters = getattr(getattr(app, "clusters", None), "clusters", {})
        now = time.monotonic()
        for name, cs in sorted(list(clusters.items())):
            up_rq_active.add_metric((name,), cs.active_requests)
            up_pending.add_metric((name,), cs.pending_requests)
            up_retries.add_metric((name,), cs.active_retries)
            warm.add_metric((name,), int(bool(getattr(cs, "warm", True))))
            for b, v in _breaker_open(cs).items():
                breaker.add_metric((name, b), v)
            hosts = list(cs.hosts)
            n_avail = n_ejected = n_hc_fail = cx = 0
            for i, h in enumerate(hosts):
                ejected = h.ejected_until > now
                avail = h.hc_healthy and not ejected and not h.removed
                n_avail += avail
                n_ejected += ejected
                n_hc_fail += not h.hc_healthy
                hcx = h.pool.active
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
                e_rq_active.add_metric(lv, h.active_requests)
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
        al = sys.modules.get("sidecar.observability.access_log")
        if al is not None:
            lines = C("sidecar_access_log_lines_total", "Access log lines by outcome",
                      labels=("path", "outcome"))
            for path, sink in list(al._SINKS.items()):
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
