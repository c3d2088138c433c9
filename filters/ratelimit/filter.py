"""The global rate limit filter: build the request's descriptors from the route's (or the
filter's) ``rate_limits``, ask the rate limit service, and answer as Envoy's
``envoy.filters.http.ratelimit`` does:

* OK: the request goes on, with the service's ``request_headers_to_add``; the response gets the
  service's ``response_headers_to_add`` and, when enabled, ``x-ratelimit-*``.
* OVER_LIMIT: ``rate_limited_status`` (429) with the service's ``raw_body``, flag ``RL``,
  details ``request_rate_limited``, ``x-envoy-ratelimited: true`` (unless disabled), the
  service's headers, ``x-ratelimit-*`` and the filter's ``response_headers_to_add``. Not
  enforced (``filter_enforced``): passed on, the response still carries those headers.
* Error (service down, timed out, refused, bad answer): ``status_on_error`` (500), flag
  ``RLSE``, details ``rate_limiter_error`` when ``failure_mode_deny``; else passed on.

Counted in ``sidecar_ratelimit_total{cluster, stat_prefix, outcome}`` (Envoy's
``cluster.<route cluster>.ratelimit.ok|over_limit|error|failure_mode_allowed``).
"""

from __future__ import annotations

import random

from multidict import MultiDict

from filters.local_ratelimit.config import jwt_claim
from filters.ratelimit.config import (
    HeaderAction,
    HeaderToAdd,
    RateLimitFilterConfig,
    RateLimitPerRoute,
    RequestType,
    VhRateLimits,
)
from filters.request_headers import header_value_getter
from sidecar.config.errors import ConfigError
from sidecar.core.body import Headers
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Filter, FilterEnv, Handler
from sidecar.core.limits import (
    Descriptor,
    RateLimitPolicy,
    RateLimitService,
    RlsResponse,
    descriptor_for,
    x_ratelimit_headers,
)
from sidecar.core.message import Request, Response, local_reply
from sidecar.core.metrics import CounterChild, MetricFactory

FLAG_LIMITED = "RL"
FLAG_ERROR = "RLSE"
DETAILS_LIMITED = "request_rate_limited"
DETAILS_ERROR = "rate_limiter_error"
GRPC_RESOURCE_EXHAUSTED = "8"
_OUTCOMES = ("ok", "over_limit", "error", "failure_mode_allowed")


def _chance(pct: float) -> bool:
    if pct >= 100.0:
        return True
    if pct <= 0.0:
        return False
    return random.random() * 100.0 < pct


class RequestSource:
    """What rate limit actions read of one request (``sidecar.core.limits.DescriptorSource``),
    as Envoy's actions see it."""

    __slots__ = ("req", "destination_cluster", "source_cluster")

    def __init__(self, req: Request, destination_cluster: str, source_cluster: str):
        self.req = req
        self.destination_cluster = destination_cluster
        self.source_cluster = source_cluster

    def header(self, name: str) -> str | None:
        if name[:1] == ":" or name == "host":
            return header_value_getter(name)(self.req)
        return self.req.headers.get(name)         # Envoy takes the first value

    def joined_header(self, name: str) -> str | None:
        return header_value_getter(name)(self.req)

    @property
    def remote_address(self) -> str:
        ctx = self.req.ctx
        if ctx.remote_ip:
            return ctx.remote_ip
        return ctx.downstream_addr[0] if ctx.downstream_addr else ""

    def jwt_claim(self, provider: str, claim: tuple[str, ...]) -> str | None:
        return jwt_claim(self.req, provider, claim)


def add_headers(h: Headers, items: tuple[tuple[str, str], ...]) -> None:
    """Envoy's ``HeaderMapImpl::copyFrom``: every header is added (appended)."""
    for k, v in items:
        h.add(k, v)


def apply_headers_to_add(h: Headers, items: tuple[HeaderToAdd, ...]) -> None:
    for x in items:
        if not x.value and not x.keep_empty_value:
            continue
        present = x.name in h
        if x.action is HeaderAction.APPEND_IF_EXISTS_OR_ADD:
            h.add(x.name, x.value)
        elif x.action is HeaderAction.ADD_IF_ABSENT:
            if not present:
                h[x.name] = x.value
        elif x.action is HeaderAction.OVERWRITE_IF_EXISTS_OR_ADD or present:
            h[x.name] = x.value


class Counters:
    __slots__ = _OUTCOMES

    def __init__(self, metrics: MetricFactory, cluster: str, stat_prefix: str):
        fam = metrics.counter("sidecar_ratelimit_total",
                              "Global rate limit decisions per route cluster (Envoy's "
                              "cluster.<c>.ratelimit.ok/over_limit/error/failure_mode_allowed)",
                              ("cluster", "stat_prefix", "outcome"))
        for o in _OUTCOMES:
            child: CounterChild = fam.labels(cluster, stat_prefix, o)
            setattr(self, o, child)

    ok: CounterChild
    over_limit: CounterChild
    error: CounterChild
    failure_mode_allowed: CounterChild


def policies_for(cfg: RateLimitFilterConfig, per_route: RateLimitPerRoute | None,
                 route: RouteInfo) -> tuple[RateLimitPolicy, ...]:
    """Which ``rate_limits`` make this route's descriptors (Envoy's precedence): the per-route
    config's, else the filter's, else the route's of the filter's stage plus, per the
    virtual-host option, its virtual host's."""
    if per_route is not None and per_route.rate_limits:
        return per_route.rate_limits
    if cfg.rate_limits:
        return cfg.rate_limits
    rl = route.rate_limits
    out = [p for p in rl.route if p.stage == cfg.stage]
    mode = VhRateLimits.INCLUDE if rl.include_vhost else \
        (per_route.vh_rate_limits if per_route is not None else VhRateLimits.OVERRIDE)
    if mode is VhRateLimits.INCLUDE or (mode is VhRateLimits.OVERRIDE and not rl.route):
        out += [p for p in rl.vhost if p.stage == cfg.stage]
    return tuple(out)


class RateLimitFilter(Filter):
    def __init__(self, cfg: RateLimitFilterConfig, domain: str,
                 policies: tuple[RateLimitPolicy, ...], service: RateLimitService,
                 route: RouteInfo, local_cluster: str, metrics: MetricFactory):
        self.cfg = cfg
        self.domain = domain
        self.policies = policies
        self.service = service
        self.route = route
        self.local_cluster = local_cluster
        self._metrics = metrics
        self._counters = {c: Counters(metrics, c, cfg.stat_prefix) for c in route.cluster_names}
        # a cluster_header route names its cluster per request: counted under cluster ""
        # (labels come from the config, never from requests)
        self._other: Counters | None = None

    def _skip(self, req: Request) -> bool:
        rt = self.cfg.request_type
        if rt is RequestType.BOTH:
            return False
        internal = req.headers.get("x-envoy-internal") == "true"
        return internal != (rt is RequestType.INTERNAL)

    async def __call__(self, req: Request, next: Handler) -> Response:
        cfg = self.cfg
        if not _chance(cfg.enabled_pct) or self._skip(req):
            return await next(req)
        cluster = self.route.pick_cluster(req)
        if not cluster:                 # a direct response or no cluster: Envoy has no entry
            return await next(req)
        src = RequestSource(req, cluster, self.local_cluster)
        descriptors: list[Descriptor] = []
        for p in self.policies:
            d = descriptor_for(p, src)
            if d is not None:
                descriptors.append(d)
        if not descriptors:
            return await next(req)
        counters = self._counters.get(cluster)
        if counters is None:
            counters = self._other
            if counters is None:
                counters = self._other = Counters(self._metrics, "", cfg.stat_prefix)
        try:
            answer = await self.service.should_rate_limit(self.domain, tuple(descriptors), 0,
                                                          cfg.timeout_s)
        except Exception:       # noqa: BLE001 - down, timed out, refused, a malformed answer
            return await self._failed(req, next, counters)
        if answer.dynamic_metadata:
            req.ctx.metadata[cfg.metadata_namespace] = answer.dynamic_metadata
        to_add = answer.response_headers_to_add
        if answer.over_limit:
            counters.over_limit.inc()
            if cfg.x_envoy_ratelimited:
                to_add += (("x-envoy-ratelimited", "true"),)
        else:
            counters.ok.inc()
        if cfg.x_ratelimit_headers:
            to_add += x_ratelimit_headers(answer)
        if answer.over_limit and _chance(cfg.enforced_pct):
            return self._limited(req, answer, to_add)
        add_headers(req.headers, answer.request_headers_to_add)
        resp = await next(req)
        add_headers(resp.headers, to_add)
        return resp

    def _limited(self, req: Request, answer: RlsResponse,
                 to_add: tuple[tuple[str, str], ...]) -> Response:
        cfg = self.cfg
        h: Headers = MultiDict()
        add_headers(h, to_add)
        apply_headers_to_add(h, cfg.response_headers)
        body = answer.raw_body.decode("utf-8", "replace")
        ct = req.headers.get("content-type")
        if cfg.resource_exhausted and ct is not None and ct.startswith("application/grpc"):
            # Envoy's gRPC local reply, with RESOURCE_EXHAUSTED instead of the status's mapping
            h["content-type"] = "application/grpc"
            h["grpc-status"] = GRPC_RESOURCE_EXHAUSTED
            if body:
                h["grpc-message"] = body
            req.ctx.flag(FLAG_LIMITED)
            req.ctx.response_code_details = DETAILS_LIMITED
            resp = Response(200, h, b"")
            resp.local = True
            return resp
        resp = local_reply(req.ctx, cfg.rate_limited_status, body, FLAG_LIMITED, h,
                           DETAILS_LIMITED)
        if not body and "content-type" not in to_add_names(to_add, cfg.response_headers):
            del resp.headers["content-type"]      # Envoy: no body, no content type
        return resp

    async def _failed(self, req: Request, next: Handler, counters: Counters) -> Response:
        cfg = self.cfg
        counters.error.inc()
        deny = cfg.failure_mode_deny if cfg.failure_mode_deny_pct is None \
            else _chance(cfg.failure_mode_deny_pct)
        self.service.count_failure_mode(deny)
        if deny:
            resp = local_reply(req.ctx, cfg.status_on_error, "", FLAG_ERROR, None, DETAILS_ERROR)
            del resp.headers["content-type"]
            return resp
        counters.failure_mode_allowed.inc()
        return await next(req)


def to_add_names(to_add: tuple[tuple[str, str], ...],
                 configured: tuple[HeaderToAdd, ...]) -> set[str]:
    return {k for k, _ in to_add} | {x.name for x in configured}


def new_state(env: FilterEnv) -> None:
    return None


def build(config: RateLimitFilterConfig, per_route: RateLimitPerRoute | None, state: None,
          env: FilterEnv, route: RouteInfo) -> RateLimitFilter | None:
    policies = policies_for(config, per_route, route)
    if not policies:
        return None                      # nothing to ask about on this route
    try:
        # a cluster not configured (yet) is accepted, as by Envoy: every call is then an error
        service = env.rate_limit_service(config.service)
    except ValueError as e:                  # not HTTP/2
        raise ConfigError(config.service_path or "ratelimit.cluster", str(e)) from None
    domain = per_route.domain if per_route is not None and per_route.domain else config.domain
    return RateLimitFilter(config, domain, policies, service, route, env.local_cluster,
                           env.metrics)
