"""The outermost layer of every route: the server span, local-reply shaping (gRPC clients get
gRPC-shaped replies, as from Envoy), and what happens when the stream is over (metrics, span
end, access log), which the codec reports once the response has been written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from sidecar.core.context import RouteInfo, StreamObserver
from sidecar.core.filter import Handler
from sidecar.core.grpc import grpc_local_reply, grpc_message, grpc_reply, is_grpc
from sidecar.core.message import Request, Response
from sidecar.core.metrics import CounterChild
from sidecar.observability.access_log import RequestLogger
from sidecar.observability.stats import RouteStats
from sidecar.observability.tracing import ListenerTracer, ServerSpan

log = logging.getLogger("sidecar.route")

__all__ = ["ObserveLayer", "RouteObserver", "grpc_local_reply", "grpc_message", "grpc_reply",
           "grpc_status_of", "is_grpc"]


def grpc_status_of(resp: Response) -> str | None:
    """The gRPC status of a response: in its headers (trailers-only) or its trailers."""
    v = resp.headers.get("grpc-status")
    if v is not None:
        return v
    t = resp.trailers
    if t is None:
        src = resp.body_source()
        t = src.trailers if src is not None else None
    return t.get("grpc-status") if t is not None else None


class RouteObserver:
    """Records one finished stream: route metrics, the server span's end, access log lines."""

    __slots__ = ("_stats", "_make_stats", "access_logs", "no_route", "also")

    def __init__(self, make_stats: Callable[[], RouteStats], access_logs: tuple[RequestLogger, ...],
                 no_route: CounterChild | None = None, also: tuple[StreamObserver, ...] = ()):
        self._stats: RouteStats | None = None
        self._make_stats = make_stats
        self.access_logs = access_logs
        self.no_route = no_route
        self.also = also          # more recorders of finished streams (Istio metrics)

    @property
    def stats(self) -> RouteStats:
        st = self._stats
        if st is None:
            # bound on a route's first request: a 10,000-route config only pays for the
            # metric children of routes that see traffic
            st = self._stats = self._make_stats()
        return st

    def stream_done(self, req: Request, resp: Response, body_bytes: int) -> None:
        ctx = req.ctx
        duration = time.perf_counter() - ctx.start
        if ctx.grpc:
            gs = ctx.grpc_status = grpc_status_of(resp)
            self.stats.grpc(gs if gs is not None else "none").inc()
        ctx.bytes_sent = body_bytes if body_bytes > 0 else 0
        body = req.body
        n = ctx.bytes_received = len(body) if body.__class__ is bytes else body.total  # type: ignore[union-attr]
        st = self._stats
        if st is None:
            st = self.stats
        if self.no_route is not None and ctx.route is None:
            self.no_route.inc()
        if st.enabled:
            status = resp.status
            st.rq_by_class[(1 if status < 100 else 5 if status >= 500 else status // 100) - 1].inc()
            st.latency.observe(duration)
            if body_bytes > 0:
                st.bytes_out.inc(body_bytes)
            if n:
                st.bytes_in.inc(n)
            for f in ctx.flags:
                st.flag(f).inc()
        span = ctx.span
        if isinstance(span, ServerSpan):
            span.finish(req, resp, duration)
        for al in self.access_logs:
            al.log(req, resp, duration)
        for o in self.also:
            o.stream_done(req, resp, body_bytes)


class ObserveLayer:
    """The outermost layer of a route: binds the route and its observer to the request and
    starts the server span when sampled. It returns its next's coroutine (no frame of its own):
    an exception below becomes a 500 in the codec, and local replies are shaped for gRPC
    clients by the HTTP connection manager, where every local reply passes."""

    __slots__ = ("next", "route", "tracer", "observer")

    def __init__(self, route: RouteInfo, next: Handler, tracer: ListenerTracer | None,
                 observer: RouteObserver):
        self.next = next
        self.route = route
        self.tracer = tracer
        self.observer = observer

    def __call__(self, req: Request) -> Awaitable[Response]:
        ctx = req.ctx
        ctx.route = self.route
        ctx.observer = self.observer
        if self.tracer is not None:
            self.tracer.begin(req)
        return self.next(req)
