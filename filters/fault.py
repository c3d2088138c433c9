"""Fault injection: Envoy's ``envoy.filters.http.fault`` (Istio's VirtualService ``fault``).

Injects a fixed delay and/or an abort (HTTP status, or a gRPC status in a trailers-only
response) into a share of requests, before they reach the upstream:

* a delay is an ``asyncio.sleep`` (the event loop keeps serving everyone else), flag ``DI``;
  an abort is a local reply that never reaches the upstream, flag ``FI``; a request can be
  delayed and then aborted, as in Envoy;
* header-controlled faults (``x-envoy-fault-delay-request``: milliseconds,
  ``x-envoy-fault-abort-request``: HTTP status 200..599, ``x-envoy-fault-abort-grpc-request``,
  and the ``...-percentage`` headers, whose value is capped by the configured percentage) work
  only when ``header_delay`` / ``header_abort`` is configured;
* restrictions: ``headers`` (all must match), ``downstream_nodes`` (the
  ``x-envoy-downstream-service-node`` header must be one of them), ``upstream_cluster`` (the
  route must target that cluster; see ``_cluster_check``), ``max_active_faults`` (process-wide
  count of requests currently delayed or aborted; past it nothing is injected and
  ``sidecar_fault_overflow_total`` counts it).

Config comes from Envoy (``HTTPFault``, also accepted per route/virtual host through
``typed_per_filter_config``, where it replaces the listener-level config) or native YAML::

    filters:
      - fault:
          delay: {fixed: 2s, percent: 10}        # or {header: true, percent: 100}
          abort: {status: 503, percent: 5}       # or {grpc_status: 14} or {header: true}
          upstream_cluster: reviews-v2           # optional restrictions
          headers: {x-test-fault: "on"}
          downstream_nodes: [frontend]
          max_active_faults: 100

Native percentages are plain percents (0..100, default 100); Envoy's are
``{numerator, denominator}`` with Envoy's default of 0 when ``percentage`` is absent.

Metrics: ``sidecar_fault_injected_total{kind="delay"|"abort"}``, ``sidecar_fault_overflow_total``,
``sidecar_fault_active`` (gauge).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from multidict import MultiDict

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.matchers import HeaderMatcher, header_matcher_from_envoy, header_matchers_from_native
from sidecar.core.body import Headers
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Filter, FilterEnv, FilterSpec, Handler
from sidecar.core.message import Request, Response, local_reply
from sidecar.core.metrics import NULL, CounterChild, GaugeChild, MetricFactory

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
PER_ROUTE_TYPE_URL = TYPE_URL

H_DELAY = "x-envoy-fault-delay-request"
H_DELAY_PCT = "x-envoy-fault-delay-request-percentage"
H_ABORT = "x-envoy-fault-abort-request"
H_ABORT_GRPC = "x-envoy-fault-abort-grpc-request"
H_ABORT_PCT = "x-envoy-fault-abort-request-percentage"
H_NODE = "x-envoy-downstream-service-node"

ABORT_BODY = "fault filter abort"
_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


# =============================================================================================
# config
# =============================================================================================

@dataclass(frozen=True, slots=True)
class Percent:
    """A share of requests: ``fraction`` (0..1); header percentages are numerators over
    ``denominator`` and are capped at ``fraction``."""
    fraction: float
    denominator: int = 100

    def from_header(self, value: str | None) -> float:
        if value is None:
            return self.fraction
        try:
            n = int(value.strip())
        except ValueError:
            return self.fraction
        if n < 0:
            return self.fraction
        return min(n / self.denominator, self.fraction)


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_s: float | None          # None: the delay comes from the request header
    percent: Percent

    @property
    def header(self) -> bool:
        return self.fixed_s is None


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int | None        # exactly one of http_status / grpc_status, or neither
    grpc_status: int | None        # for a header-controlled abort
    percent: Percent

    @property
    def header(self) -> bool:
        return self.http_status is None and self.grpc_status is None


@dataclass(frozen=True, slots=True)
class FaultConfig:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    upstream_cluster: str = ""
    headers: tuple[HeaderMatcher, ...] = ()     # all must match
    downstream_nodes: frozenset[str] = frozenset()
    max_active_faults: int | None = None


# ---- Envoy ----------------------------------------------------------------------------------

def _fractional_percent(d: dict[str, object], key: str, path: str) -> Percent:
    """Envoy FractionalPercent; absent means 0 (Envoy's default)."""
    if d.get(key) is None:
        return Percent(0.0, 100)
    p = w.join(path, key)
    fp = w.check_keys(w.mapping(d, key, path), ("numerator", "denominator"), p)
    num = w.integer(fp, "numerator", p, 0, lo=0)
    den = _DENOMINATORS[w.string(fp, "denominator", p, "HUNDRED", choices=tuple(_DENOMINATORS))]
    return Percent(min(1.0, num / den), den)


def _envoy_delay(raw: object, path: str) -> FaultDelay:
    d = w.check_keys(raw, ("fixed_delay", "header_delay", "percentage"), path)
    kind = w.one_of(d, ("fixed_delay", "header_delay"), path)
    pct = _fractional_percent(d, "percentage", path)
    if kind == "header_delay":
        w.check_keys(d["header_delay"], (), w.join(path, "header_delay"))
        return FaultDelay(None, pct)
    s = w.duration(d, "fixed_delay", path)
    if s <= 0:
        raise ConfigError(w.join(path, "fixed_delay"), "must be greater than 0")
    return FaultDelay(s, pct)


def _envoy_abort(raw: object, path: str) -> FaultAbort:
    d = w.check_keys(raw, ("http_status", "grpc_status", "header_abort", "percentage"), path)
    kind = w.one_of(d, ("http_status", "grpc_status", "header_abort"), path)
    pct = _fractional_percent(d, "percentage", path)
    if kind == "header_abort":
        w.check_keys(d["header_abort"], (), w.join(path, "header_abort"))
        return FaultAbort(None, None, pct)
    if kind == "grpc_status":
        return FaultAbort(None, w.integer(d, "grpc_status", path, lo=0), pct)
    return FaultAbort(w.integer(d, "http_status", path, lo=200, hi=599), None, pct)


_RUNTIME_KEYS = ("delay_percent_runtime", "abort_percent_runtime", "delay_duration_runtime",
                 "abort_http_status_runtime", "max_active_faults_runtime",
                 "response_rate_limit_percent_runtime", "abort_grpc_status_runtime")


def from_envoy(raw: object, path: str) -> FaultConfig:
    d = w.check_keys(raw, ("delay", "abort", "upstream_cluster", "headers", "downstream_nodes",
                     "max_active_faults", "response_rate_limit", "disable_downstream_cluster_stats",
                     "filter_metadata", *_RUNTIME_KEYS), path)
    if d.get("response_rate_limit") is not None:
        raise ConfigError(w.join(path, "response_rate_limit"),
                          "response rate limiting faults are not supported")
    if d.get("filter_metadata") is not None:
        raise ConfigError(w.join(path, "filter_metadata"), "is not supported")
    for k in _RUNTIME_KEYS:
        if d.get(k):
            raise ConfigError(w.join(path, k), "runtime overrides are not supported "
                              "(there is no runtime layer); set the value in the config")
    w.boolean(d, "disable_downstream_cluster_stats", path, False)   # no per-downstream stats
    hp = w.join(path, "headers")
    headers = tuple(header_matcher_from_envoy(h, w.join(hp, i))
                    for i, h in enumerate(w.seq(d, "headers", path, [])))
    np_ = w.join(path, "downstream_nodes")
    nodes = []
    for i, n in enumerate(w.seq(d, "downstream_nodes", path, [])):
        if not isinstance(n, str):
            raise ConfigError(w.join(np_, i), "must be a string")
        nodes.append(n)
    return FaultConfig(
        delay=_envoy_delay(d["delay"], w.join(path, "delay")) if d.get("delay") is not None else None,
        abort=_envoy_abort(d["abort"], w.join(path, "abort")) if d.get("abort") is not None else None,
        upstream_cluster=w.string(d, "upstream_cluster", path, ""),
        headers=headers,
        downstream_nodes=frozenset(nodes),
        max_active_faults=w.integer(d, "max_active_faults", path, None, lo=0),
    )


# ---- native ---------------------------------------------------------------------------------

def _native_percent(d: dict[str, object], path: str) -> Percent:
    return Percent(w.number(d, "percent", path, 100.0, lo=0, hi=100) / 100.0, 100)


def _native_delay(raw: object, path: str) -> FaultDelay:
    if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
        raw = {"fixed": raw}                   # delay: 2s
    d = w.check_keys(raw, ("fixed", "header", "percent"), path)
    kind = w.one_of(d, ("fixed", "header"), path)
    pct = _native_percent(d, path)
    if kind == "header":
        if not w.boolean(d, "header", path):
            raise ConfigError(w.join(path, "header"), "must be true (or use fixed)")
        return FaultDelay(None, pct)
    s = w.duration(d, "fixed", path)
    if s <= 0:
        raise ConfigError(w.join(path, "fixed"), "must be greater than 0")
    return FaultDelay(s, pct)


def _native_abort(raw: object, path: str) -> FaultAbort:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = {"status": raw}                  # abort: 503
    d = w.check_keys(raw, ("status", "grpc_status", "header", "percent"), path)
    kind = w.one_of(d, ("status", "grpc_status", "header"), path)
    pct = _native_percent(d, path)
    if kind == "header":
        if not w.boolean(d, "header", path):
            raise ConfigError(w.join(path, "header"), "must be true (or use status)")
        return FaultAbort(None, None, pct)
    if kind == "grpc_status":
        return FaultAbort(None, w.integer(d, "grpc_status", path, lo=0, hi=16), pct)
    return FaultAbort(w.integer(d, "status", path, lo=200, hi=599), None, pct)


def from_native(raw: object, path: str) -> FaultConfig:
    d = w.check_keys(raw, ("delay", "abort", "upstream_cluster", "headers", "downstream_nodes",
                     "max_active_faults"), path)
    headers: tuple[HeaderMatcher, ...] = ()
    if d.get("headers") is not None:
        headers = header_matchers_from_native(d["headers"], w.join(path, "headers"))
    nodes = w.seq(d, "downstream_nodes", path, [])
    for i, n in enumerate(nodes):
        if not isinstance(n, str):
            raise ConfigError(w.join(w.join(path, "downstream_nodes"), i), "must be a string")
    return FaultConfig(
        delay=_native_delay(d["delay"], w.join(path, "delay")) if d.get("delay") is not None else None,
        abort=_native_abort(d["abort"], w.join(path, "abort")) if d.get("abort") is not None else None,
        upstream_cluster=w.string(d, "upstream_cluster", path, ""),
        headers=headers,
        downstream_nodes=frozenset(nodes),
        max_active_faults=w.integer(d, "max_active_faults", path, None, lo=0),
    )


# =============================================================================================
# the filter
# =============================================================================================



class _Shared:
    """Process-wide: the active-fault count (for max_active_faults) and its metrics."""

    __slots__ = ("active", "gauge", "delays", "aborts", "overflow")

    def __init__(self, metrics: MetricFactory):
        self.active = 0
        self.gauge: GaugeChild = NULL
        self.delays: CounterChild = NULL
        self.aborts: CounterChild = NULL
        self.overflow: CounterChild = NULL
        if not metrics.enabled:
            return
        inj = metrics.counter("sidecar_fault_injected_total", "Faults injected, by kind",
                              ("kind",))
        self.delays = inj.labels("delay")
        self.aborts = inj.labels("abort")
        self.overflow = metrics.counter("sidecar_fault_overflow_total",
                                        "Faults not injected because max_active_faults was reached")
        self.gauge = metrics.gauge("sidecar_fault_active", "Requests with an active injected fault")


def _cluster_check(upstream: str, route: RouteInfo) -> tuple[bool, Callable[[Request], bool] | None]:
    """(applies at all, per-request check or None). Filters run before the route picks a
    cluster, so: a route that never targets ``upstream`` gets no filter; a single-cluster route
    that does always matches; otherwise (weighted, ``cluster_header``) the route says where
    this request goes (the same draw the route will make)."""
    if not upstream:
        return True, None
    names = route.cluster_names
    if names and upstream not in names:
        return False, None
    if names and len(set(names)) == 1:
        return True, None
    return True, lambda req: route.pick_cluster(req) == upstream


class FaultFilter(Filter):
    __slots__ = ("delay", "abort", "headers", "nodes", "max_active", "cluster_check", "shared")

    def __init__(self, cfg: FaultConfig, shared: _Shared,
                 cluster_check: Callable[[Request], bool] | None):
        self.delay = cfg.delay
        self.abort = cfg.abort
        self.headers = cfg.headers
        self.nodes = cfg.downstream_nodes
        self.max_active = cfg.max_active_faults
        self.cluster_check = cluster_check
        self.shared = shared

    def _delay_s(self, headers: Headers) -> float:
        d = self.delay
        if d is None:
            return 0.0
        if d.fixed_s is None:
            v = headers.get(H_DELAY)
            if v is None:
                return 0.0
            try:
                ms = int(v.strip())
            except ValueError:
                return 0.0
            if ms <= 0:
                return 0.0
            frac = d.percent.from_header(headers.get(H_DELAY_PCT))
            s = ms / 1000.0
        else:
            frac = d.percent.fraction
            s = d.fixed_s
        if frac >= 1.0 or (frac > 0.0 and random.random() < frac):
            return s
        return 0.0

    def _abort(self, headers: Headers) -> tuple[int, int | None] | None:
        a = self.abort
        if a is None:
            return None
        if a.http_status is None and a.grpc_status is None:
            status = grpc = None
            v = headers.get(H_ABORT)
            if v is not None:
                try:
                    n = int(v.strip())
                except ValueError:
                    n = 0
                if 200 <= n < 600:
                    status = n
            if status is None:
                v = headers.get(H_ABORT_GRPC)
                if v is not None:
                    try:
                        n = int(v.strip())
                    except ValueError:
                        n = -1
                    if n >= 0:
                        status, grpc = 200, n
            if status is None:
                return None
            frac = a.percent.from_header(headers.get(H_ABORT_PCT))
        else:
            frac = a.percent.fraction
            status = a.http_status if a.http_status is not None else 200
            grpc = a.grpc_status
        if frac >= 1.0 or (frac > 0.0 and random.random() < frac):
            return status, grpc
        return None

    async def __call__(self, req: Request, next: Handler) -> Response:
        shared = self.shared
        if self.max_active is not None and shared.active >= self.max_active:
            shared.overflow.inc()
            return await next(req)
        headers = req.headers
        if self.cluster_check is not None and not self.cluster_check(req):
            return await next(req)
        if self.nodes and headers.get(H_NODE) not in self.nodes:
            return await next(req)
        for hm in self.headers:
            if not hm.matches(headers):
                return await next(req)
        delay = self._delay_s(headers)
        active = False
        try:
            if delay > 0:
                active = True
                shared.active += 1
                shared.gauge.inc()
                shared.delays.inc()
                req.ctx.flags.append("DI")
                await asyncio.sleep(delay)
            abort = self._abort(headers)
            if abort is not None:
                if not active:
                    active = True
                    shared.active += 1
                    shared.gauge.inc()
                shared.aborts.inc()
                status, grpc = abort
                ctx = req.ctx
                ctx.response_code_details = "fault_filter_abort"
                if grpc is not None:
                    h: Headers = MultiDict()
                    h["content-type"] = "application/grpc"
                    h["grpc-status"] = str(grpc)
                    h["grpc-message"] = ABORT_BODY
                    return local_reply(ctx, 200, "", "FI", h)
                return local_reply(ctx, status, ABORT_BODY, "FI")
            return await next(req)
        finally:
            if active:
                shared.active -= 1
                shared.gauge.dec()


def new_state(env: FilterEnv) -> _Shared:
    return _Shared(env.metrics)


def build(config: FaultConfig, per_route: FaultConfig | None, shared: _Shared, env: FilterEnv,
          route: RouteInfo) -> FaultFilter | None:
    cfg = per_route if per_route is not None else config
    if cfg.delay is None and cfg.abort is None:
        return None
    applies, check = _cluster_check(cfg.upstream_cluster, route)
    if not applies:
        return None
    return FaultFilter(cfg, shared, check)


SPEC = FilterSpec(
    name="envoy.filters.http.fault",
    short="fault",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=from_envoy,
    per_route_from_native=from_native,
)
