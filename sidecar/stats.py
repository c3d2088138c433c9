"""Pre-bound metric children for the hot path (one object per cluster / route).

Labels are bounded by config (listener, route name, cluster, status class, response flag),
never by request values such as paths.
"""

from __future__ import annotations

from sidecar.metrics import STATUS_CLASSES, Metrics


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
    __slots__ = ("rq_by_class", "rq_total", "cx_connect_fail", "rq_timeout", "rq_retry",
                 "rq_retry_success", "rq_retry_overflow", "rq_overflow", "latency",
                 "cx_total", "rq_reset", "rq_per_try_timeout", "retry_limit_exceeded",
                 "rq_pending_overflow")

    def __init__(self, m: Metrics, cluster: str):
        if not m.enabled:
            for s in self.__slots__:
                setattr(self, s, NULL)
            self.rq_by_class = (NULL,) * 5
            return
        rq = m.counter("sidecar_upstream_rq_total", "Upstream requests (attempts) by response class",
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


class RouteStats:
    """Downstream request stats for one route on one listener."""

    __slots__ = ("rq_by_class", "latency", "bytes_in", "bytes_out")

    def __init__(self, m: Metrics, listener: str, vhost: str, route: str):
        if not m.enabled:
            self.rq_by_class = (NULL,) * 5
            self.latency = self.bytes_in = self.bytes_out = NULL
            return
        rq = m.counter("sidecar_http_downstream_rq_total", "Downstream requests by response class",
                       ("listener", "virtual_host", "route", "status_class"))
        self.rq_by_class = tuple(rq.labels(listener, vhost, route, c) for c in STATUS_CLASSES)
        self.latency = m.histogram("sidecar_http_downstream_rq_time_seconds",
                                   "Downstream request latency (first byte in to last byte out)",
                                   ("listener", "virtual_host", "route")).labels(listener, vhost, route)
        self.bytes_in = m.counter("sidecar_http_downstream_rq_bytes_total", "Request body bytes received",
                                  ("listener", "virtual_host", "route")).labels(listener, vhost, route)
        self.bytes_out = m.counter("sidecar_http_downstream_rs_bytes_total", "Response body bytes sent",
                                   ("listener", "virtual_host", "route")).labels(listener, vhost, route)


class StatsCache:
    """One ClusterStats / RouteStats per name for the life of the process (children reused
    across reloads)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._clusters: dict[str, ClusterStats] = {}
        self._routes: dict[tuple, RouteStats] = {}
        self._flags: dict[tuple, object] = {}
        m = metrics
        if m.enabled:
            self._flag_family = m.counter("sidecar_http_downstream_rq_flag_total",
                                          "Downstream requests by response flag",
                                          ("listener", "flag"))
            self.no_route = None

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

    def flag(self, listener: str, flag: str):
        if not self.metrics.enabled:
            return NULL
        key = (listener, flag)
        c = self._flags.get(key)
        if c is None:
            c = self._flags[key] = self._flag_family.labels(listener, flag)
        return c
