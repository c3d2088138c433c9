"""Route config: matches, actions (cluster, weighted, header; direct response; redirect),
rewrites, header mutations, retry policy, mirrors, hash policy; the HTTP filters of a listener."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.http2 import UpgradeConfig
from sidecar.config.matchers import HeaderMatcher, QueryMatcher, StringMatcher
from sidecar.core.limits import RateLimitPolicy


@dataclass(frozen=True, slots=True)
class RouteMatch:
    prefix: str | None = None
    path: str | None = None
    regex: re.Pattern[str] | None = None
    path_separated_prefix: str | None = None
    case_sensitive: bool = True
    headers: tuple[HeaderMatcher, ...] = ()
    query_params: tuple[QueryMatcher, ...] = ()
    methods: tuple[str, ...] = ()           # empty = any
    cookies: tuple[tuple[str, StringMatcher], ...] = ()   # native: cookie-based version routing
    runtime_fraction: float | None = None  # percent of requests that match (0..100)
    grpc: bool = False                      # only gRPC requests (content-type application/grpc*)


@dataclass(frozen=True, slots=True)
class HeaderValueOption:
    name: str
    value: str
    append: bool = True   # False: overwrite if present


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    request_add: tuple[HeaderValueOption, ...] = ()
    request_remove: tuple[str, ...] = ()
    response_add: tuple[HeaderValueOption, ...] = ()
    response_remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.request_add or self.request_remove or self.response_add
                    or self.response_remove)


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int
    headers: HeaderMutation = HeaderMutation()


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    cluster: str
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class HashPolicy:
    header: str | None = None
    cookie: str | None = None
    source_ip: bool = False
    query_parameter: str | None = None
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class StreamDuration:
    """Envoy's route ``max_stream_duration`` (its presence: the route ``timeout`` then no longer
    applies, as in Envoy; the bound itself is ``RouteAction.max_stream_duration_s``). For gRPC
    requests with a ``grpc-timeout`` header and ``grpc_header_max_s`` set, the stream may last
    that timeout capped at ``grpc_header_max_s`` (0 = no cap) minus ``grpc_header_offset_s``."""
    grpc_header_max_s: float | None = None
    grpc_header_offset_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RouteAction:
    cluster: str | None = None
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    cluster_header: str | None = None
    prefix_rewrite: str | None = None
    regex_rewrite: tuple[re.Pattern[str], str] | None = None
    host_rewrite: str | None = None
    auto_host_rewrite: bool = False
    timeout_s: float = 15.0                  # 0 disables (Envoy's default is 15 s)
    retry_policy: RetryPolicy | None = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    hash_policy: tuple[HashPolicy, ...] = ()
    # honour a client's x-envoy-upstream-rq-timeout-ms (shorten only); off unless the route opts in
    allow_timeout_header: bool = False
    max_stream_duration: StreamDuration | None = None
    # per-route upgrade_configs: enable or disable upgrade types the listener allows
    upgrades: tuple[UpgradeConfig, ...] = ()
    # the listener's stream_idle_timeout / max_stream_duration for this route (None: the
    # listener's; 0 turns it off on this route)
    idle_timeout_s: float | None = None
    max_stream_duration_s: float | None = None
    # descriptors for the global rate limit filter (sidecar.config.ratelimit); with
    # include_vh_rate_limits the virtual host's are sent too
    rate_limits: tuple[RateLimitPolicy, ...] = ()
    include_vh_rate_limits: bool = False


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: str = ""


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    prefix_rewrite: str | None = None
    status: int = 301
    strip_query: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    match: RouteMatch
    action: RouteAction | DirectResponse | Redirect
    name: str = ""
    headers: HeaderMutation = HeaderMutation()
    # filter name (canonical Envoy name) -> per-route config object, or None to disable
    per_filter: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    headers: HeaderMutation = HeaderMutation()
    per_filter: tuple[tuple[str, Any], ...] = ()
    retry_policy: RetryPolicy | None = None
    # send x-envoy-attempt-count upstream on routes with retries (Envoy:
    # include_request_attempt_count, off by default; native: on)
    include_attempt_count: bool = False
    # the global rate limit filter's descriptors for routes without their own
    rate_limits: tuple[RateLimitPolicy, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    headers: HeaderMutation = HeaderMutation()


@dataclass(frozen=True, slots=True)
class HttpFilter:
    # the instance name: per-route overrides are keyed by it (the canonical Envoy name, e.g.
    # envoy.filters.http.jwt_authn, unless the config named the instance itself)
    name: str
    config: Any        # the filter module's frozen config object
    disabled: bool = False
    # the registry name of the implementation when it differs from ``name`` (an Envoy filter
    # found by its typed_config @type, a user filter: pysidecar.filters.http.python)
    kind: str = ""

    @property
    def spec_name(self) -> str:
        return self.kind or self.name


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_on: frozenset[str] = frozenset()      # 5xx, gateway-error, reset, connect-failure, ...
    num_retries: int = 1                         # Envoy default when retry_on is set
    per_try_timeout_s: float = 0.0               # 0 = none (route timeout only)
    per_try_idle_timeout_s: float = 0.0          # not supported: always 0 (refused in config)
    retriable_status_codes: frozenset[int] = frozenset()
    backoff_base_s: float = 0.025                # Envoy default 25 ms
    backoff_max_s: float = 0.250                 # Envoy default 10x base
    retry_non_idempotent: bool = False           # native extension; Envoy retries POST too
    retry_host_predicate_previous_hosts: bool = True
    host_selection_retry_max_attempts: int = 3
    max_buffered_body: int = 64 * 1024           # bodies over this are sent once, unretried
    allow_override_headers: bool = False         # honour x-envoy-max-retries / x-envoy-retry-on


# gRPC status codes retried by Envoy's gRPC retry_on conditions (x-envoy-retry-grpc-on)
GRPC_RETRY_ON = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8,
                 "internal": 13, "unavailable": 14}

RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
    "retriable-status-codes", "reset-before-request", "envoy-ratelimited", "http3-post-connect-failure",
    *GRPC_RETRY_ON,
})


def parse_retry_on(v: object, path: str) -> frozenset[str]:
    if isinstance(v, str):
        items = [s.strip() for s in v.split(",") if s.strip()]
    elif isinstance(v, list) and all(isinstance(s, str) for s in v):
        items = v
    else:
        raise ConfigError(path, "must be a comma-separated string or a list of strings")
    for s in items:
        if s not in RETRY_ON:
            raise ConfigError(path, f"unsupported retry condition {s!r} "
                                    f"(supported: {', '.join(sorted(RETRY_ON))})")
    return frozenset(items)


def _status_codes(v: object, path: str) -> frozenset[int]:
    if not isinstance(v, list):
        raise ConfigError(path, "must be a list of HTTP status codes")
    for i, c in enumerate(v):
        if isinstance(c, bool) or not isinstance(c, int) or not 100 <= c <= 599:
            raise ConfigError(w.join(path, i), "must be an HTTP status code 100..599")
    return frozenset(v)
