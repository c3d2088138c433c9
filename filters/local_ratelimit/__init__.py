"""Local (in-process) rate limiting: Envoy's ``envoy.filters.http.local_ratelimit``.

Token buckets, refilled lazily on the monotonic clock (no background task): a bucket holds up
to ``max_tokens`` and gains ``tokens_per_fill`` every ``fill_interval``; each request takes
one token. Besides the route's default bucket, *descriptors* give separate buckets to
requests that carry a given descriptor - a header value, the client address, a JWT claim
such as ``sub`` - with one bucket per distinct value when the descriptor's value is left
empty ("dynamic" descriptors, bounded by ``max_dynamic_descriptors``, least recently used
evicted).

As Envoy: matched descriptor buckets are consumed slowest-rate first and the first empty one
limits; the default bucket is consumed too unless ``always_consume_default_token_bucket`` is
false and a descriptor matched. A limited request gets ``429`` (or ``status``) with body
``local_rate_limited``, response flag ``RL`` and details ``local_rate_limited``; with
``enable_x_ratelimit_headers: DRAFT_VERSION_03`` every response carries ``x-ratelimit-limit``,
``x-ratelimit-remaining`` and ``x-ratelimit-reset`` (seconds until the next fill).

Envoy semantics kept on purpose: in an Envoy config, ``filter_enabled`` and ``filter_enforced``
default to 0 % (the filter only counts) - set them to 100 % to limit. The native config
defaults both to 100 %.

Buckets live in the filter's state (``buckets.LimiterStates``) keyed by the config's content
(and the route, for per-route configs), so a config reload that does not change the limit
keeps the counts.

Modules: ``config`` (types, what actions read), ``envoy`` and ``native`` (the two parsers),
``buckets`` (token buckets and their state), ``filter``.
"""

from __future__ import annotations

from filters.local_ratelimit.buckets import LimiterStates
from filters.local_ratelimit.config import TYPE_URL, LocalRateLimitConfig
from filters.local_ratelimit.envoy import from_envoy
from filters.local_ratelimit.filter import build, new_state
from filters.local_ratelimit.native import from_native, per_route_from_native
from sidecar.core.filter import FilterSpec

SPEC: FilterSpec[LocalRateLimitConfig, LocalRateLimitConfig, LimiterStates] = FilterSpec(
    name="envoy.filters.http.local_ratelimit",
    short="local_ratelimit",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=TYPE_URL,
    per_route_from_envoy=from_envoy,
    per_route_from_native=per_route_from_native,
)

__all__ = ["SPEC"]
