"""The HTTP connection manager of one listener under one config snapshot.

``dispatch`` is what every codec (HTTP/1.1 today, HTTP/2 next) calls for a stream: edge policy,
virtual host and route from this snapshot's table, then the route's stack. Requests that match
no route are answered 404 NR here and observed by the listener-level ``unmatched`` observer.
"""

from __future__ import annotations

from multidict import MultiDict

from sidecar.config.listener import Listener
from sidecar.core.filter import FilterLike
from sidecar.core.message import Request, Response, local_reply
from sidecar.core.metrics import NULL, CounterChild
from sidecar.listener.edge import apply_edge_policy
from sidecar.listener.path import REJECT, PathPolicy
from sidecar.listener.path import apply as normalise_path
from sidecar.observability.access_log import RequestLogger
from sidecar.observability.metrics import Metrics
from sidecar.observability.tracing import ListenerTracer
from sidecar.route.observe import RouteObserver, grpc_local_reply
from sidecar.route.table import RouteTable

PROTOCOL_ERROR_STATUSES = (400, 408, 413, 426, 431, 501)


class ListenerCounters:
    """Listener-level counters that do not depend on the route."""

    __slots__ = ("cx_total", "proto_err")

    def __init__(self, m: Metrics, listener: str):
        self.cx_total: CounterChild = NULL
        self.proto_err: dict[int, CounterChild] = {}
        if not m.enabled:
            return
        self.cx_total = m.counter("sidecar_downstream_cx_total", "Downstream connections accepted",
                                  ("listener",)).labels(listener)
        fam = m.counter("sidecar_downstream_rq_protocol_error_total",
                        "Requests refused by the codec (400, 408, 431, 501, ...)",
                        ("listener", "status"))
        self.proto_err = {s: fam.labels(listener, str(s)) for s in PROTOCOL_ERROR_STATUSES}

    def protocol_error(self, status: int) -> None:
        c = self.proto_err.get(status)
        if c is not None:
            c.inc()


class HttpConnectionManager:
    """Routes and observers of one listener for one config snapshot."""

    __slots__ = ("config", "table", "tracer", "unmatched", "filters", "bound_port", "access_logs",
                 "path_policy")

    def __init__(self, config: Listener, table: RouteTable | None, unmatched: RouteObserver,
                 tracer: ListenerTracer | None, filters: list[FilterLike], bound_port: int,
                 access_logs: tuple[RequestLogger, ...] = ()):
        self.config = config
        self.access_logs = access_logs
        self.table = table
        self.unmatched = unmatched
        self.tracer = tracer
        self.filters = tuple(filters)    # built filter objects, closed when retired
        self.bound_port = bound_port
        pp = PathPolicy(config.normalize_path, config.merge_slashes,
                        config.path_with_escaped_slashes_action)
        self.path_policy = pp if pp.active else None

    async def dispatch(self, req: Request) -> Response:
        ctx = req.ctx
        ctx.observer = self.unmatched          # until a route's observe layer takes over
        ct = req.headers.get("content-type")
        if ct is not None and ct.startswith("application/grpc"):
            ctx.grpc = True
        apply_edge_policy(req, self.config, self.bound_port)
        pp = self.path_policy
        if pp is not None:
            # before routing and every filter: RBAC, routes and the upstream see one path
            path, verdict = normalise_path(pp, req.path)
            if verdict is not None:
                if verdict == REJECT:
                    ctx.response_code_details = "path_normalization_failed"
                    req.keep_alive = False          # Envoy closes the connection too
                    return local_reply(ctx, 400, "Bad Request", "DPE")
                loc: MultiDict[str] = MultiDict()
                loc["location"] = path + "?" + req.query if req.query else path
                return local_reply(ctx, 307, "", None, loc)
            req.path = path
        table = self.table
        vh = table.virtual_host(req.authority) if table is not None else None
        route = vh.match(req.method, req.path, req.query, req.headers) if vh is not None else None
        if route is None:
            ctx.flags.append("NR")
            ctx.response_code_details = "route_not_found"
            resp = Response(404)
            resp.local = True
            return grpc_local_reply(resp) if ctx.grpc else resp
        ctx.vhost_name = vh.name                # type: ignore[union-attr]
        resp = await route.handler(req)
        if ctx.grpc and resp.local:
            return grpc_local_reply(resp)
        return resp

    def retire(self) -> None:
        for f in self.filters:
            close = getattr(f, "close", None)
            if close is not None:
                close()
