"""The observe step: what happens when a request ends (metrics, access log) and
per-listener connection gauges. Built once per listener snapshot."""

from __future__ import annotations

import time

from sidecar.metrics import Metrics
from sidecar.stats import NULL


class ListenerObserver:
    """Listener-level metrics that do not depend on the route (connections, protocol errors)."""

    __slots__ = ("cx_active", "cx_total", "proto_err", "no_route")

    def __init__(self, m: Metrics, listener: str):
        if not m.enabled:
            self.cx_active = self.cx_total = self.no_route = NULL
            self.proto_err = {}
            return
        self.cx_active = m.gauge("sidecar_downstream_cx_active", "Open downstream connections",
                                 ("listener",)).labels(listener)
        self.cx_total = m.counter("sidecar_downstream_cx_total", "Downstream connections accepted",
                                  ("listener",)).labels(listener)
        fam = m.counter("sidecar_downstream_rq_protocol_error_total",
                        "Requests refused by the HTTP/1 codec (400, 408, 431, 501)",
                        ("listener", "status"))
        self.proto_err = {s: fam.labels(listener, str(s)) for s in (400, 408, 431, 501)}
        self.no_route = m.counter("sidecar_http_downstream_rq_no_route_total",
                                  "Requests that matched no route (404 NR)", ("listener",)).labels(listener)

    def connections(self, delta: int) -> None:
        self.cx_active.inc(delta)
        if delta > 0:
            self.cx_total.inc()

    def protocol_error(self, status: int) -> None:
        c = self.proto_err.get(status)
        if c is not None:
            c.inc()


class ListenerSnapshot:
    """What one listener serves under one config snapshot: routes, tracer, access logs."""

    __slots__ = ("config", "table", "tracer", "access_logs", "stats", "listener_name",
                 "observer", "filters")

    def __init__(self, config, table, stats, observer, tracer=None, access_logs=(), filters=()):
        self.config = config
        self.table = table
        self.tracer = tracer
        self.access_logs = tuple(access_logs)
        self.stats = stats
        self.listener_name = config.name
        self.observer = observer
        self.filters = tuple(filters)    # built filter objects, closed when retired

    def observe_end(self, req, resp, body_bytes: int) -> None:
        ctx = req.ctx
        route = ctx.route
        duration = time.perf_counter() - ctx.start
        ctx.bytes_sent = body_bytes if body_bytes > 0 else 0
        status = resp.status
        if route is not None:
            st = route.stats
            st.rq_by_class[min(max(status // 100, 1), 5) - 1].inc()
            st.latency.observe(duration)
            if body_bytes > 0:
                st.bytes_out.inc(body_bytes)
            body = req.body
            n = len(body) if isinstance(body, bytes) else getattr(body, "total", 0)
            ctx.bytes_received = n
            if n:
                st.bytes_in.inc(n)
        else:
            self.observer.no_route.inc()
        if ctx.flags:
            for f in ctx.flags:
                self.stats.flag(self.listener_name, f).inc()
        for al in self.access_logs:
            al.log(req, resp, duration)

    def retire(self) -> None:
        for f in self.filters:
            close = getattr(f, "close", None)
            if close is not None:
                close()
