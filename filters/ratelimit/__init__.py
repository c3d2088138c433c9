"""Global rate limiting: Envoy's ``envoy.filters.http.ratelimit``. Each request's descriptors,
built from the route's (or the filter's) ``rate_limits``, go to a rate limit service
(``envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`` over gRPC, through the
cluster named in the config: ``FilterEnv.rate_limit_service``), which counts them for every
replica. Modules: ``config`` (both config formats), ``filter`` (the decision)."""

from __future__ import annotations

from filters.ratelimit.config import (
    PER_ROUTE_TYPE_URL,
    TYPE_URL,
    RateLimitFilterConfig,
    RateLimitPerRoute,
    from_envoy,
    from_native,
    per_route_from_envoy,
    per_route_from_native,
)
from filters.ratelimit.filter import build, new_state
from sidecar.core.filter import FilterSpec

SPEC: FilterSpec[RateLimitFilterConfig, RateLimitPerRoute, None] = FilterSpec(
    name="envoy.filters.http.ratelimit",
    short="ratelimit",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=per_route_from_envoy,
    per_route_from_native=per_route_from_native,
)

__all__ = ["SPEC"]
