"""The observe step: what happens when a request ends (metrics, server span, access log), and
listener-level counters. Built once per listener snapshot.

Gauges of live state (open connections, requests in flight) are not kept here: the scrape-time
collector in ``sidecar.stats`` counts them from the listener when Prometheus asks.
"""

from __future__ import annotations

import time

from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import NULL


class ListenerObserver:
    """Listener-level metrics that do not depend on the route (connections, protocol errors)."""

    __slots__ = ("cx_total", "proto_err", "no_route")

    def __init__(self, m: Metrics, listener: str):
        if not m.enabled:
            self.cx_total = self.no_route = NULL
            self.proto_err = {}
            return
        self.cx_total = m.counter("sidecar_downstream_cx_total", "Downstream connections accepted",
                                  ("listener",)).labels(listener)
        fam = m.counter("sidecar_downstream_rq_protocol_error_total",
                        "Requests refused by the HTTP/1 codec (400, 408, 431, 501)",
                        ("listener", "status"))
        self.proto_err = {s: fam.labels(listener, str(s)) for s in (400, 408, 431, 501)}
        self.no_route = m.counter("sidecar_http_downstream_rq_no_route_total",
                                  "Requests that matched no route (404 NR)", ("listener",)).labels(listener)

    def connections(self, delta: int) -> None:
        if delta > 0:
            self.cx_total.inc()

    def protocol_error(self, status: int) -> None:
        c = self.proto_err.get(status)
        if c is not None:
            c.inc()


class ListenerSnapshot:
    """What one listener serves under one config snapshot: routes, tracer, access logs."""

    __slots__ = ("config", "table", "tracer", "access_logs", "stats", "listener_name",
                 "observer", "filters", "unmatched", "record")

    def __init__(self, config, table, stats, observer, tracer=None, access_logs=(), filters=()):
        self.config = config
        self.table = table
        self.tracer = tracer
        self.access_logs = tuple(access_logs)
        self.stats = stats
        self.listener_name = config.name
        self.observer = observer
        self.filters = tuple(filters)    # built filter objects, closed when retired
        self.unmatched = stats.unmatched(config.name)
        self.record = stats.metrics.enabled

    def observe_end(self, req, resp, body_bytes: int) -> None:
        ctx = req.ctx
        route = ctx.route
        duration = time.perf_counter() - ctx.start
        ctx.bytes_sent = body_bytes if body_bytes > 0 else 0
        body = req.body
        n = len(body) if body.__class__ is bytes else getattr(body, "total", 0)
        ctx.bytes_received = n
        if self.record:
            if route is None:
                st = self.unmatched
                self.observer.no_route.inc()
            else:
                st = route.stats
                if st is None:
                    # bound on a route's first request: a 10,000-route config only pays for
                    # the metric children of routes that see traffic
                    st = route.stats = self.stats.route(self.listener_name, route.vhost.name,
                                                        route.stat_name)
            status = resp.status
            st.rq_by_class[(1 if status < 100 else 5 if status >= 500 else status // 100) - 1].inc()
            st.latency.observe(duration)
            if body_bytes > 0:
                st.bytes_out.inc(body_bytes)
            if n:
                st.bytes_in.inc(n)
            flags = ctx.flags
            if flags:
                for f in flags:
                    st.flag(f).inc()
        span = ctx.span
        if span is not None:
            span.finish(req, resp, duration)
        for al in self.access_logs:
            al.log(req, resp, duration)

    def retire(self) -> None:
        for f in self.filters:
            close = getattr(f, "close", None)
            if close is not None:
                close()
