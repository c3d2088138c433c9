"""The HTTP connection manager of one listener under one config snapshot.

``dispatch`` is what every codec (HTTP/1.1 today, HTTP/2 next) calls for a stream: edge policy,
virtual host and route from this snapshot's table, then the route's stack. Requests that match
no route are answered 404 NR here and observed by the listener-level ``unmatched`` observer.
"""

from __future__ import annotations

from collections.abc import Awaitable

from multidict import MultiDict

from sidecar.config.listener import Listener
from sidecar.config.route import RouteAction
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
from sidecar.route.timeout import parse_grpc_timeout

PROTOCOL_ERROR_STATUSES = (400, 408, 413, 426, 431, 501)


class ListenerCounters:
    """Listener-level counters that do not depend on the route."""

    __slots__ = ("cx_total", "proto_err", "_h2_abuse", "_h2_family", "_listener")

    def __init__(self, m: Metrics, listener: str):
        self.cx_total: CounterChild = NULL
        self.proto_err: dict[int, CounterChild] = {}
        self._h2_abuse: dict[str, CounterChild] = {}
        self._h2_family = None
        self._listener = listener
        if not m.enabled:
            return
        self._h2_family = m.counter("sidecar_downstream_http2_abuse_total",
                                    "HTTP/2 connections or streams ended by a protocol limit "
                                    "(floods, rapid reset, malformed requests)", ("listener", "kind"))
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

    def http2_abuse(self, kind: str) -> None:
        """Counted by kind (a fixed set named by the HTTP/2 codec), bound on first use."""
        c = self._h2_abuse.get(kind)
        if c is None:
            fam = self._h2_family
            c = self._h2_abuse[kind] = fam.labels(self._listener, kind) if fam is not None else NULL
        c.inc()


async def ready(resp: Response) -> Response:
    """A reply that needs no waiting, as the awaitable a dispatch returns."""
    return resp


async def _grpc_shaped(pending: Awaitable[Response]) -> Response:
    """A gRPC client's local replies carry grpc-status (Envoy's gRPC-shaped local replies)."""
    resp = await pending
    return grpc_local_reply(resp) if resp.local else resp


class HttpConnectionManager:
    """Routes and observers of one listener for one config snapshot."""

    __slots__ = ("config", "table", "tracer", "unmatched", "filters", "bound_port", "access_logs",
                 "path_policy", "upgrades")

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
        self.upgrades = {u.upgrade_type: u.enabled for u in config.upgrades}

    def finish(self, req: Request, resp: Response, body_bytes: int) -> None:
        """The stream is over: its observer records it (a request refused before dispatch, by
        the codec, has none yet: the listener-level one)."""
        observer = req.ctx.observer
        if observer is None:
            observer = self.unmatched
        observer.stream_done(req, resp, body_bytes)

    def dispatch(self, req: Request) -> Awaitable[Response]:
        """The matched route's stack, returned unawaited (this adds no frame to a request's
        await chain); a reply made here (refused upgrade, bad path, no route) comes ready."""
        ctx = req.ctx
        ctx.observer = self.unmatched          # until a route's observe layer takes over
        headers = req.headers
        ct = headers.get("content-type")
        if ct is not None and ct.startswith("application/grpc"):
            ctx.grpc = True
            gt = headers.get("grpc-timeout")
            if gt is not None:
                ctx.grpc_timeout = parse_grpc_timeout(gt)
        apply_edge_policy(req, self.config, self.bound_port)
        if req.upgrade is not None and req.upgrade not in self.upgrades:
            return ready(upgrade_refused(req))     # before routing, as Envoy's connection manager
        pp = self.path_policy
        if pp is not None:
            # before routing and every filter: RBAC, routes and the upstream see one path
            path, verdict = normalise_path(pp, req.path)
            if verdict is not None:
                if verdict == REJECT:
                    ctx.response_code_details = "path_normalization_failed"
                    req.keep_alive = False          # Envoy closes the connection too
                    return ready(local_reply(ctx, 400, "Bad Request", "DPE"))
                loc: MultiDict[str] = MultiDict()
                loc["location"] = path + "?" + req.query if req.query else path
                return ready(local_reply(ctx, 307, "", None, loc))
            req.path = path
        table = self.table
        vh = table.virtual_host(req.authority) if table is not None else None
        route = vh.match(req.method, req.path, req.query, headers) if vh is not None else None
        if route is None:
            ctx.flags.append("NR")
            ctx.response_code_details = "route_not_found"
            resp = Response(404)
            resp.local = True
            return ready(grpc_local_reply(resp) if ctx.grpc else resp)
        ctx.vhost_name = vh.name                # type: ignore[union-attr]
        if req.upgrade is not None and not self._upgrade_allowed(req, route.config.action):
            return ready(upgrade_refused(req))
        if ctx.grpc:
            return _grpc_shaped(route.handler(req))
        return route.handler(req)

    def _upgrade_allowed(self, req: Request, action: object) -> bool:
        """Envoy's upgrade_configs: the listener lists the upgrade types it tunnels (enabled or
        not by default); a route may turn a listed type on or off. Sets the route's tunnel idle
        timeout."""
        up = req.upgrade
        enabled = self.upgrades.get(up)        # type: ignore[arg-type]
        if enabled is None or not isinstance(action, RouteAction):
            return False
        for u in action.upgrades:
            if u.upgrade_type == up:
                enabled = u.enabled
        return enabled

    def retire(self) -> None:
        for f in self.filters:
            close = getattr(f, "close", None)
            if close is not None:
                close()


def upgrade_refused(req: Request) -> Response:
    """403 with an empty body (Envoy's answer to an upgrade it does not tunnel); the HTTP/1.1
    codec closes the connection after it."""
    req.ctx.response_code_details = "upgrade_failed"
    resp = Response(403)
    resp.local = True
    return resp
