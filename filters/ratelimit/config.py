"""Config of ``envoy.filters.http.ratelimit`` (global rate limiting through Envoy's rate limit
service) and of its per-route override, from Envoy v3 and from native YAML.

Honoured (Envoy v3 ``RateLimit``): domain, stage, request_type, timeout (default 20ms; 0,
Envoy's "no timeout", is refused: every call is bounded), failure_mode_deny,
failure_mode_deny_percent, rate_limit_service (``envoy_grpc``: cluster_name, authority,
skip_envoy_headers, max_receive_message_length, with initial_metadata; transport V3),
enable_x_ratelimit_headers, disable_x_envoy_ratelimited_header, rate_limited_status,
status_on_error, rate_limited_as_resource_exhausted, response_headers_to_add (literal values),
filter_enabled, filter_enforced, rate_limits, metadata_namespace, stat_prefix.
``RateLimitPerRoute``: vh_rate_limits, rate_limits, domain. Everything else is refused by
name with its path.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from filters.local_ratelimit.envoy import fraction
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.grpc_service import envoy_grpc_service
from sidecar.config.ratelimit import MAX_STAGE, rate_limits_from_wire
from sidecar.core.grpc import EnvoyGrpcService
from sidecar.core.limits import RateLimitPolicy

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
PER_ROUTE_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"
DEFAULT_TIMEOUT_S = 0.020                   # Envoy's default for this filter
DEFAULT_NAMESPACE = "envoy.filters.http.ratelimit"


class RequestType(enum.Enum):
    BOTH = "both"
    INTERNAL = "internal"                   # only requests with x-envoy-internal: true
    EXTERNAL = "external"                   # only the others


class VhRateLimits(enum.Enum):
    OVERRIDE = "OVERRIDE"   # the virtual host's rate limits when the route has none
    INCLUDE = "INCLUDE"     # the virtual host's as well as the route's
    IGNORE = "IGNORE"       # never the virtual host's


class HeaderAction(enum.Enum):
    APPEND_IF_EXISTS_OR_ADD = "APPEND_IF_EXISTS_OR_ADD"
    ADD_IF_ABSENT = "ADD_IF_ABSENT"
    OVERWRITE_IF_EXISTS_OR_ADD = "OVERWRITE_IF_EXISTS_OR_ADD"
    OVERWRITE_IF_EXISTS = "OVERWRITE_IF_EXISTS"


@dataclass(frozen=True, slots=True)
class HeaderToAdd:
    name: str                                # lower case
    value: str
    action: HeaderAction = HeaderAction.APPEND_IF_EXISTS_OR_ADD
    keep_empty_value: bool = False


@dataclass(frozen=True, slots=True)
class RateLimitFilterConfig:
    domain: str
    service: EnvoyGrpcService               # the rate limit service (gRPC through a cluster)
    service_path: str = ""                  # where its cluster was given (for errors)
    stage: int = 0
    request_type: RequestType = RequestType.BOTH
    timeout_s: float = DEFAULT_TIMEOUT_S
    failure_mode_deny: bool = False         # service error: status_on_error (deny) or pass
    failure_mode_deny_pct: float | None = None   # set: this share of errors is denied
    x_ratelimit_headers: bool = False       # DRAFT_VERSION_03
    x_envoy_ratelimited: bool = True        # x-envoy-ratelimited: true on over-limit answers
    rate_limited_status: int = 429
    status_on_error: int = 500
    resource_exhausted: bool = False        # gRPC requests: RESOURCE_EXHAUSTED, not UNAVAILABLE
    response_headers: tuple[HeaderToAdd, ...] = ()   # added to rate-limited answers
    enabled_pct: float = 100.0
    enforced_pct: float = 100.0
    rate_limits: tuple[RateLimitPolicy, ...] = ()    # set: route and virtual host ones ignored
    metadata_namespace: str = DEFAULT_NAMESPACE
    stat_prefix: str = ""

    @property
    def service_cluster(self) -> str:
        return self.service.cluster


@dataclass(frozen=True, slots=True)
class RateLimitPerRoute:
    vh_rate_limits: VhRateLimits = VhRateLimits.OVERRIDE
    rate_limits: tuple[RateLimitPolicy, ...] = ()    # set: every other rate_limits ignored
    domain: str = ""                                 # "" : the filter's


# ---- Envoy v3 ------------------------------------------------------------------------------

_FILTER_KEYS = ("domain", "stage", "request_type", "timeout", "failure_mode_deny",
                "rate_limit_service", "enable_x_ratelimit_headers",
                "disable_x_envoy_ratelimited_header", "rate_limited_status", "status_on_error",
                "stat_prefix", "rate_limited_as_resource_exhausted", "response_headers_to_add",
                "filter_enabled", "filter_enforced", "failure_mode_deny_percent",
                "rate_limits", "metadata_namespace")


def _status(d: dict[str, Any], key: str, path: str, default: int) -> int:
    """``HttpStatus``; Envoy answers ``default`` for a code under 400."""
    if d.get(key) is None:
        return default
    p = w.join(path, key)
    s = w.check_keys(w.mapping(d, key, path), ("code",), p)
    code = w.integer(s, "code", p, lo=100, hi=599)
    return code if code >= 400 else default


def headers_to_add(items: list[object], path: str) -> tuple[HeaderToAdd, ...]:
    """``HeaderValueOption``s with literal values (formatters like ``%REQ(...)%`` are refused:
    they would be sent as written)."""
    out = []
    for i, item in enumerate(items):
        p = w.join(path, i)
        o = w.check_keys(item, ("header", "append", "append_action", "keep_empty_value"), p)
        hp = w.join(p, "header")
        h = w.check_keys(w.mapping(o, "header", p), ("key", "value", "raw_value"), hp)
        if h.get("raw_value") is not None:
            raise ConfigError(w.join(hp, "raw_value"), "is not supported; use value")
        value = w.string(h, "value", hp, "")
        if "%" in value:
            raise ConfigError(w.join(hp, "value"),
                              "substitution formatters are not supported (a literal value only)")
        if o.get("append") is not None and o.get("append_action") is not None:
            raise ConfigError(p, "only one of append, append_action may be set")
        action = HeaderAction(w.string(o, "append_action", p, "APPEND_IF_EXISTS_OR_ADD",
                                       choices=tuple(a.value for a in HeaderAction)))
        if o.get("append") is not None and not w.boolean(o, "append", p):
            action = HeaderAction.OVERWRITE_IF_EXISTS_OR_ADD
        out.append(HeaderToAdd(w.string(h, "key", hp, nonempty=True).lower(), value, action,
                               w.boolean(o, "keep_empty_value", p, False)))
    return tuple(out)


def _service(d: dict[str, Any], path: str) -> tuple[EnvoyGrpcService, str]:
    sp = w.join(path, "rate_limit_service")
    svc = w.check_keys(w.mapping(d, "rate_limit_service", path),
                       ("grpc_service", "transport_api_version"), sp)
    w.string(svc, "transport_api_version", sp, "V3", choices=("V3",))
    gp = w.join(sp, "grpc_service")
    grpc = w.check_keys(w.mapping(svc, "grpc_service", sp),
                        ("envoy_grpc", "google_grpc", "timeout", "initial_metadata",
                         "retry_policy"), gp)
    for k in ("google_grpc", "retry_policy"):
        if grpc.get(k) is not None:
            raise ConfigError(w.join(gp, k), "is not supported; use envoy_grpc (a cluster)")
    if grpc.get("timeout") is not None:
        raise ConfigError(w.join(gp, "timeout"), "is not supported; use the filter's timeout")
    if grpc.get("envoy_grpc") is None:
        raise ConfigError(w.join(gp, "envoy_grpc"), "is required")
    return envoy_grpc_service(grpc, gp), w.join(gp, "envoy_grpc.cluster_name")


def from_envoy(d: Any, path: str) -> RateLimitFilterConfig:
    w.check_keys(d, _FILTER_KEYS, path)
    service, service_path = _service(d, path)
    timeout = w.duration(d, "timeout", path, DEFAULT_TIMEOUT_S)
    if timeout <= 0:
        raise ConfigError(w.join(path, "timeout"),
                          "0 (no timeout) is not supported: every call to the service is bounded")
    xrl = w.string(d, "enable_x_ratelimit_headers", path, "OFF",
                   choices=("OFF", "DRAFT_VERSION_03"))
    deny_pct = None
    if d.get("failure_mode_deny_percent") is not None:
        deny_pct = fraction(w.mapping(d, "failure_mode_deny_percent", path),
                            w.join(path, "failure_mode_deny_percent"))
    pcts = {}
    for k in ("filter_enabled", "filter_enforced"):
        pcts[k] = 100.0 if d.get(k) is None else fraction(w.mapping(d, k, path), w.join(path, k))
    return RateLimitFilterConfig(
        domain=w.string(d, "domain", path, nonempty=True),
        service=service, service_path=service_path,
        stage=w.integer(d, "stage", path, 0, lo=0, hi=MAX_STAGE),
        request_type=RequestType(w.string(d, "request_type", path, "both",
                                          choices=("both", "internal", "external", "")) or "both"),
        timeout_s=timeout,
        failure_mode_deny=w.boolean(d, "failure_mode_deny", path, False),
        failure_mode_deny_pct=deny_pct,
        x_ratelimit_headers=xrl == "DRAFT_VERSION_03",
        x_envoy_ratelimited=not w.boolean(d, "disable_x_envoy_ratelimited_header", path, False),
        rate_limited_status=_status(d, "rate_limited_status", path, 429),
        status_on_error=_status(d, "status_on_error", path, 500),
        resource_exhausted=w.boolean(d, "rate_limited_as_resource_exhausted", path, False),
        response_headers=headers_to_add(w.seq(d, "response_headers_to_add", path, []),
                                        w.join(path, "response_headers_to_add")),
        enabled_pct=pcts["filter_enabled"], enforced_pct=pcts["filter_enforced"],
        rate_limits=rate_limits_from_wire(d.get("rate_limits", []), w.join(path, "rate_limits"),
                                          in_filter=True),
        metadata_namespace=w.string(d, "metadata_namespace", path, "") or DEFAULT_NAMESPACE,
        stat_prefix=w.string(d, "stat_prefix", path, ""))


def per_route_from_envoy(d: Any, path: str) -> RateLimitPerRoute:
    w.check_keys(d, ("vh_rate_limits", "override_option", "rate_limits", "domain"), path)
    # not implemented in Envoy either ([#not-implemented-hide:])
    w.string(d, "override_option", path, "DEFAULT", choices=("DEFAULT",))
    return RateLimitPerRoute(
        vh_rate_limits=VhRateLimits(w.string(d, "vh_rate_limits", path, "OVERRIDE",
                                             choices=tuple(v.value for v in VhRateLimits))),
        rate_limits=rate_limits_from_wire(d.get("rate_limits", []), w.join(path, "rate_limits"),
                                          in_filter=True),
        domain=w.string(d, "domain", path, ""))


# ---- native YAML ---------------------------------------------------------------------------

_NATIVE_KEYS = ("domain", "cluster", "timeout", "failure_mode_deny", "headers",
                "x_envoy_ratelimited", "rate_limited_status", "status_on_error", "stat_prefix",
                "request_type", "stage", "rate_limits", "enabled", "enforced")


def _percent(d: dict[str, Any], key: str, path: str) -> float:
    v = d.get(key)
    if v is None or v is True:
        return 100.0
    if v is False:
        return 0.0
    return w.number(d, key, path, lo=0, hi=100)


def from_native(raw: object, path: str) -> RateLimitFilterConfig:
    """::

        ratelimit:
          domain: edge               # the rate limit service's domain
          cluster: ratelimit         # the cluster of the service (gRPC)
          timeout: 20ms
          failure_mode_deny: false   # service down: let requests through (default) or 500
          headers: true              # x-ratelimit-limit/-remaining/-reset (DRAFT_VERSION_03)
          rate_limits: [...]         # optional: descriptors for every route (Envoy's shape)

    Routes and virtual hosts carry their own ``rate_limits`` (Envoy's shape)."""
    d = w.check_keys(raw, _NATIVE_KEYS, path)
    timeout = w.duration(d, "timeout", path, DEFAULT_TIMEOUT_S)
    if timeout <= 0:
        raise ConfigError(w.join(path, "timeout"), "must be positive")
    return RateLimitFilterConfig(
        domain=w.string(d, "domain", path, nonempty=True),
        service=EnvoyGrpcService(w.string(d, "cluster", path, nonempty=True)),
        service_path=w.join(path, "cluster"),
        stage=w.integer(d, "stage", path, 0, lo=0, hi=MAX_STAGE),
        request_type=RequestType(w.string(d, "request_type", path, "both",
                                          choices=tuple(t.value for t in RequestType))),
        timeout_s=timeout,
        failure_mode_deny=w.boolean(d, "failure_mode_deny", path, False),
        x_ratelimit_headers=w.boolean(d, "headers", path, True),
        x_envoy_ratelimited=w.boolean(d, "x_envoy_ratelimited", path, True),
        rate_limited_status=w.integer(d, "rate_limited_status", path, 429, lo=400, hi=599),
        status_on_error=w.integer(d, "status_on_error", path, 500, lo=400, hi=599),
        enabled_pct=_percent(d, "enabled", path), enforced_pct=_percent(d, "enforced", path),
        rate_limits=rate_limits_from_wire(d.get("rate_limits", []), w.join(path, "rate_limits"),
                                          in_filter=True),
        stat_prefix=w.string(d, "stat_prefix", path, ""))


def per_route_from_native(raw: object, path: str) -> RateLimitPerRoute:
    """``{vh_rate_limits: OVERRIDE|INCLUDE|IGNORE, rate_limits: [...], domain: ...}``."""
    return per_route_from_envoy(raw, path)
