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

from typing import Any

from sidecar.core.metrics import NULL, CounterChild, CounterFamily, HistogramChild
from sidecar.observability.flags import KNOWN_FLAGS
from sidecar.observability.metrics import STATUS_CLASSES, Metrics

GRPC_STATUSES = frozenset([str(i) for i in range(17)] + ["none"])


def _bound_child(cache: dict[str, Any], family: CounterFamily | None, labels: tuple[str, ...],
                 value: str, known: frozenset[str] | set[str]) -> Any:
    """The child of ``family`` for ``labels`` + ``value``, bound on first use and cached; a
    value outside ``known`` is counted as "other" (labels stay bounded)."""
    c = cache.get(value)
    if c is None:
        if family is None:
            return NULL
        c = cache[value] = family.labels(*labels, value if value in known else "other")
    return c


class ClusterStats:
    """Upstream event counters for one cluster (per attempt, not per downstream request)."""

    __slots__ = ("rq_by_class", "rq_total", "cx_connect_fail", "rq_timeout", "rq_retry",
                 "rq_retry_success", "rq_retry_overflow", "rq_overflow", "latency",
                 "cx_total", "cx_overflow", "rq_reset", "rq_per_try_timeout", "retry_limit_exceeded",
                 "rq_pending_overflow", "hc_success", "hc_failure", "ejections_enforced",
                 "cx_connect_timeout", "cx_connect_time", "cx_rx_bytes", "cx_tx_bytes",
                 "enabled", "_codes", "_code_family", "_cluster")
    # declared as the metric interfaces, not the classes that implement them: with metrics off
    # each is NULL, and a compiled caller checks the declared type
    rq_total: CounterChild
    cx_connect_fail: CounterChild
    rq_timeout: CounterChild
    rq_retry: CounterChild
    rq_retry_success: CounterChild
    rq_retry_overflow: CounterChild
    rq_overflow: CounterChild
    latency: HistogramChild
    cx_total: CounterChild
    cx_overflow: CounterChild
    rq_reset: CounterChild
    rq_per_try_timeout: CounterChild
    retry_limit_exceeded: CounterChild
    rq_pending_overflow: CounterChild
    hc_success: CounterChild
    hc_failure: CounterChild
    ejections_enforced: CounterChild
    cx_connect_timeout: CounterChild
    cx_connect_time: HistogramChild
    cx_rx_bytes: CounterChild
    cx_tx_bytes: CounterChild

    def __init__(self, m: Metrics, cluster: str):
        self._codes: dict[int, Any] = {}
        self._cluster = cluster
        self._code_family: Any = None
        # the per-attempt path tests this once instead of calling NULL children
        self.enabled: bool = m.enabled
        if not m.enabled:
            self.rq_by_class: tuple[CounterChild, ...] = (NULL,) * 5
            self.rq_total = self.cx_connect_fail = self.rq_timeout = self.rq_retry = NULL
            self.rq_retry_success = self.rq_retry_overflow = self.rq_overflow = NULL
            self.cx_total = self.cx_overflow = self.rq_reset = self.rq_per_try_timeout = NULL
            self.retry_limit_exceeded = self.rq_pending_overflow = self.hc_success = NULL
            self.hc_failure = self.ejections_enforced = self.cx_connect_timeout = NULL
            self.cx_rx_bytes = self.cx_tx_bytes = NULL
            self.latency = self.cx_connect_time = NULL
            return
        # per response code, as Envoy's envoy_cluster_upstream_rq{envoy_response_code}: success
        # rate per code can be graphed (codes are bounded: 100..599)
        self._code_family = m.counter("sidecar_upstream_rq_code_total",
                                      "Upstream requests (attempts) answered, by response code",
                                      ("cluster", "envoy_response_code"))
        rq = m.counter("sidecar_upstream_rq_total", "Upstream requests (attempts) answered, by response class",
                       ("cluster", "status_class"))
        self.rq_by_class = tuple(rq.labels(cluster, c) for c in STATUS_CLASSES)
        self.rq_total = NULL
        self.cx_connect_fail = m.counter("sidecar_upstream_cx_connect_fail_total",
                                         "Upstream connection failures", ("cluster",)).labels(cluster)
        self.cx_overflow = m.counter("sidecar_upstream_cx_overflow_total",
                                     "Times a cluster's max_connections breaker was reached",
                                     ("cluster",)).labels(cluster)
        self.cx_total = m.counter("sidecar_upstream_cx_total", "Upstream connections opened",
                                  ("cluster",)).labels(cluster)
        # TCP proxy connections (Envoy's upstream_cx_connect_timeout, upstream_cx_connect_ms,
        # upstream_cx_rx_bytes_total, upstream_cx_tx_bytes_total)
        self.cx_connect_timeout = m.counter("sidecar_upstream_cx_connect_timeout_total",
                                            "Upstream connections that timed out connecting",
                                            ("cluster",)).labels(cluster)
        self.cx_connect_time = m.histogram("sidecar_upstream_cx_connect_time_seconds",
                                           "Time to establish TCP proxy upstream connections",
                                           ("cluster",)).labels(cluster)
        self.cx_rx_bytes = m.counter("sidecar_upstream_cx_rx_bytes_total",
                                     "Bytes received from upstream TCP proxy connections",
                                     ("cluster",)).labels(cluster)
        self.cx_tx_bytes = m.counter("sidecar_upstream_cx_tx_bytes_total",
                                     "Bytes sent on upstream TCP proxy connections",
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


    def rq_code(self, status: int) -> Any:
        """The counter of one response code (bound on first use)."""
        c = self._codes.get(status)
        if c is None:
            fam = self._code_family
            if fam is None:
                return NULL
            label = str(status) if 100 <= status <= 599 else "other"
            c = self._codes[status] = fam.labels(self._cluster, label)
        return c


class RouteStats:
    """Downstream request stats for one route on one listener."""

    __slots__ = ("rq_by_class", "latency", "bytes_in", "bytes_out", "_flags", "_flag_family",
                 "_labels", "_grpc", "_grpc_family", "enabled")

    def __init__(self, m: Metrics, listener: str, vhost: str, route: str):
        self._flags: dict[str, Any] = {}
        self._grpc: dict[str, Any] = {}
        self._labels = (listener, vhost, route)
        # a recorder may test this once instead of calling NULL children (metrics off)
        self.enabled: bool = m.enabled
        if not m.enabled:
            self.rq_by_class: tuple[CounterChild, ...] = (NULL,) * 5
            self.latency: HistogramChild = NULL
            self.bytes_in: CounterChild = NULL
            self.bytes_out: CounterChild = NULL
            self._flag_family = None
            self._grpc_family = None
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
        self._grpc_family = m.counter("sidecar_grpc_downstream_rq_total",
                                      "gRPC requests by gRPC status (0..16, \"none\" when the "
                                      "response carried none)",
                                      ("listener", "virtual_host", "route", "grpc_status"))

    def grpc(self, status: str):
        """The counter for one gRPC status (bound on first use; 17 values at most)."""
        return _bound_child(self._grpc, self._grpc_family, self._labels, status, GRPC_STATUSES)

    def flag(self, flag: str):
        """The counter for one response flag (bound on first use: flags are the rare path)."""
        return _bound_child(self._flags, self._flag_family, self._labels, flag, KNOWN_FLAGS)


class TcpStats:
    """Downstream stats of one tcp_proxy ``stat_prefix`` (Envoy's ``tcp.<stat_prefix>.*``)."""

    __slots__ = ("cx_total", "no_route", "rx_bytes", "tx_bytes", "paused", "resumed",
                 "idle_timeout", "max_duration_reached", "attempts_exceeded", "duration")
    cx_total: CounterChild          # (the interfaces: NULL with metrics off)
    no_route: CounterChild
    rx_bytes: CounterChild
    tx_bytes: CounterChild
    paused: CounterChild
    resumed: CounterChild
    idle_timeout: CounterChild
    max_duration_reached: CounterChild
    attempts_exceeded: CounterChild
    duration: HistogramChild

    def __init__(self, m: Metrics, stat_prefix: str):
        if not m.enabled:
            self.cx_total = self.no_route = self.rx_bytes = self.tx_bytes = NULL
            self.paused = self.resumed = self.idle_timeout = self.max_duration_reached = NULL
            self.attempts_exceeded = NULL
            self.duration = NULL
            return
        lbl = ("stat_prefix",)

        def c(name: str, doc: str) -> CounterChild:
            return m.counter(name, doc, lbl).labels(stat_prefix)
        self.cx_total = c("sidecar_tcp_downstream_cx_total", "Connections handled by tcp_proxy")
        self.no_route = c("sidecar_tcp_downstream_cx_no_route_total",
                          "Connections whose cluster was not found (NC)")
        self.rx_bytes = c("sidecar_tcp_downstream_cx_rx_bytes_total",
                          "Bytes received from downstream clients")
        self.tx_bytes = c("sidecar_tcp_downstream_cx_tx_bytes_total",
                          "Bytes sent to downstream clients")
        self.paused = c("sidecar_tcp_downstream_flow_control_paused_reading_total",
                        "Times reading the client paused because the upstream was slow")
        self.resumed = c("sidecar_tcp_downstream_flow_control_resumed_reading_total",
                         "Times reading the client resumed")
        self.idle_timeout = c("sidecar_tcp_idle_timeout_total",
                              "Connections closed by the idle timeout")
        self.max_duration_reached = c("sidecar_tcp_max_downstream_connection_duration_total",
                                      "Connections closed by max_downstream_connection_duration")
        self.attempts_exceeded = c("sidecar_tcp_upstream_connect_attempts_exceeded_total",
                                   "Connections closed after max_connect_attempts failed connects")
        self.duration = m.histogram("sidecar_tcp_downstream_cx_length_seconds",
                                    "Duration of tcp_proxy connections", lbl,
                                    buckets=CONNECTION_BUCKETS).labels(stat_prefix)


CONNECTION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0,
                      3600.0)


class ListenerL4Stats:
    """Connection-level stats of one listener with filter chains (Envoy's ``listener.*``
    and the listener filters' own)."""

    __slots__ = ("no_filter_chain", "filter_timeout", "_filter_family", "_filters", "_listener")

    def __init__(self, m: Metrics, listener: str):
        self._listener = listener
        self._filters: dict[tuple[str, str], CounterChild] = {}
        self.no_filter_chain: CounterChild = NULL
        self.filter_timeout: CounterChild = NULL
        self._filter_family: CounterFamily | None = None
        if not m.enabled:
            return
        self.no_filter_chain = m.counter("sidecar_listener_no_filter_chain_match_total",
                                         "Connections closed because no filter chain matched",
                                         ("listener",)).labels(listener)
        self.filter_timeout = m.counter("sidecar_listener_filters_timeout_total",
                                        "Connections whose listener filters timed out",
                                        ("listener",)).labels(listener)
        self._filter_family = m.counter("sidecar_listener_filter_total",
                                        "Listener filter outcomes (tls_found, sni_found, "
                                        "alpn_found, tls_not_found, http11, http10, h2c, "
                                        "http_not_found, client_hello_error, "
                                        "original_dst_found, original_dst_not_found)",
                                        ("listener", "filter", "outcome"))

    def filter(self, name: str, outcome: str) -> CounterChild:
        key = (name, outcome)
        c = self._filters.get(key)
        if c is None:
            fam = self._filter_family
            c = self._filters[key] = fam.labels(self._listener, name, outcome) \
                if fam is not None else NULL
        return c


class StatsCache:
    """One ClusterStats / RouteStats per name for the life of the process (children reused
    across reloads)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._clusters: dict[str, ClusterStats] = {}
        self._routes: dict[tuple, RouteStats] = {}
        self._no_route: dict[str, CounterChild] = {}
        self._tcp: dict[str, TcpStats] = {}
        self._listeners_l4: dict[str, ListenerL4Stats] = {}

    def tcp(self, stat_prefix: str) -> TcpStats:
        s = self._tcp.get(stat_prefix)
        if s is None:
            s = self._tcp[stat_prefix] = TcpStats(self.metrics, stat_prefix)
        return s

    def listener_l4(self, listener: str) -> ListenerL4Stats:
        s = self._listeners_l4.get(listener)
        if s is None:
            s = self._listeners_l4[listener] = ListenerL4Stats(self.metrics, listener)
        return s

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

    def no_route(self, listener: str) -> CounterChild:
        c = self._no_route.get(listener)
        if c is None:
            c = NULL
            if self.metrics.enabled:
                c = self.metrics.counter("sidecar_http_downstream_rq_no_route_total",
                                         "Requests that matched no route (404 NR)",
                                         ("listener",)).labels(listener)
            self._no_route[listener] = c
        return c


# ---- scrape-time state --------------------------------------------------------------------


