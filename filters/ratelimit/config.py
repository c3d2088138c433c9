"""Config of ``envoy.filters.http.ratelimit`` (global rate limiting through a rate limit
service) and of the route ``rate_limits`` that build its descriptors. A pure module: parsing
into frozen dataclasses, and ``descriptor_for`` (Envoy's action semantics) over a small
request view, so the filter (written on top of ``sidecar.shared.rls``) stays thin.

Honoured: domain, stage 0, request_type both, timeout (default 20ms, as Envoy),
failure_mode_deny, rate_limit_service (envoy_grpc cluster, transport V3),
enable_x_ratelimit_headers, disable_x_envoy_ratelimited_header, rate_limited_status,
status_on_error, stat_prefix. Route actions: request_headers, remote_address, generic_key,
destination_cluster. Everything else is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
DEFAULT_TIMEOUT_S = 0.020                   # Envoy's default for this filter


@dataclass(frozen=True, slots=True)
class RateLimitFilterConfig:
    domain: str
    service_cluster: str                    # the cluster of the rate limit service (h2)
    timeout_s: float = DEFAULT_TIMEOUT_S
    failure_mode_deny: bool = False         # service error: 500 (deny) or let through
    x_ratelimit_headers: bool = False       # DRAFT_VERSION_03
    x_envoy_ratelimited: bool = True        # add x-envoy-ratelimited on 429
    rate_limited_status: int = 429
    status_on_error: int = 500
    stat_prefix: str = ""


@dataclass(frozen=True, slots=True)
class RequestHeadersAction:
    header_name: str                        # lower case
    descriptor_key: str
    skip_if_absent: bool = False


@dataclass(frozen=True, slots=True)
class RemoteAddressAction:
    pass


@dataclass(frozen=True, slots=True)
class GenericKeyAction:
    descriptor_value: str
    descriptor_key: str = "generic_key"


@dataclass(frozen=True, slots=True)
class DestinationClusterAction:
    pass


Action = RequestHeadersAction | RemoteAddressAction | GenericKeyAction | DestinationClusterAction


@dataclass(frozen=True, slots=True)
class RouteRateLimit:
    """One entry of a route's (or virtual host's) ``rate_limits``: one descriptor."""
    actions: tuple[Action, ...]
    hits_addend: int = 0                    # 0: the service's default (1)


class RequestView(Protocol):
    def header(self, name: str) -> str | None: ...
    @property
    def remote_address(self) -> str | None: ...
    @property
    def route_cluster(self) -> str: ...


Descriptor = tuple[tuple[str, str], ...]


def descriptor_for(rl: RouteRateLimit, req: RequestView) -> Descriptor | None:
    """Envoy: every action must produce its entry or the whole descriptor is dropped; a
    ``request_headers`` action with ``skip_if_absent`` only drops its own entry."""
    entries: list[tuple[str, str]] = []
    for a in rl.actions:
        if isinstance(a, RequestHeadersAction):
            v = req.header(a.header_name)
            if v is None:
                if a.skip_if_absent:
                    continue
                return None
            entries.append((a.descriptor_key, v))
        elif isinstance(a, RemoteAddressAction):
            ip = req.remote_address
            if not ip:
                return None
            entries.append(("remote_address", ip))
        elif isinstance(a, GenericKeyAction):
            entries.append((a.descriptor_key, a.descriptor_value))
        else:
            entries.append(("destination_cluster", req.route_cluster))
    return tuple(entries) if entries else None


# ---- parsing (Envoy JSON/YAML) -------------------------------------------------------------

_FILTER_KEYS = ("domain", "stage", "request_type", "timeout", "failure_mode_deny",
                "rate_limit_service", "enable_x_ratelimit_headers",
                "disable_x_envoy_ratelimited_header", "rate_limited_status", "status_on_error",
                "stat_prefix", "rate_limited_as_resource_exhausted", "response_headers_to_add",
                "filter_enabled", "filter_enforced", "failure_mode_deny_percent",
                "rate_limits")
_UNSUPPORTED = ("rate_limited_as_resource_exhausted", "response_headers_to_add",
                "filter_enabled", "filter_enforced", "failure_mode_deny_percent", "rate_limits")


def _status(d: dict, key: str, path: str, default: int) -> int:
    if d.get(key) is None:
        return default
    p = w.join(path, key)
    s = w.check_keys(w.mapping(d, key, path), ("code",), p)
    return w.integer(s, "code", p, lo=200, hi=599)


def filter_from_envoy(d: Any, path: str) -> RateLimitFilterConfig:
    w.check_keys(d, _FILTER_KEYS, path)
    for k in _UNSUPPORTED:
        if d.get(k) not in (None, False, [], {}):
            raise ConfigError(w.join(path, k), "is not supported by this proxy")
    if w.integer(d, "stage", path, 0, lo=0, hi=10) != 0:
        raise ConfigError(w.join(path, "stage"), "only stage 0 is supported")
    w.string(d, "request_type", path, "both", choices=("both",))
    sp = w.join(path, "rate_limit_service")
    svc = w.check_keys(w.mapping(d, "rate_limit_service", path),
                       ("grpc_service", "transport_api_version"), sp)
    w.string(svc, "transport_api_version", sp, "V3", choices=("V3",))
    gp = w.join(sp, "grpc_service")
    grpc = w.check_keys(w.mapping(svc, "grpc_service", sp), ("envoy_grpc", "timeout"), gp)
    if "timeout" in grpc:
        raise ConfigError(w.join(gp, "timeout"), "use the filter's timeout")
    ep = w.join(gp, "envoy_grpc")
    eg = w.check_keys(w.mapping(grpc, "envoy_grpc", gp), ("cluster_name",), ep)
    timeout = w.duration(d, "timeout", path, DEFAULT_TIMEOUT_S)
    if timeout <= 0:
        raise ConfigError(w.join(path, "timeout"), "must be positive")
    xrl = w.string(d, "enable_x_ratelimit_headers", path, "OFF",
                   choices=("OFF", "DRAFT_VERSION_03"))
    return RateLimitFilterConfig(
        domain=w.string(d, "domain", path, nonempty=True),
        service_cluster=w.string(eg, "cluster_name", ep, nonempty=True),
        timeout_s=timeout,
        failure_mode_deny=w.boolean(d, "failure_mode_deny", path, False),
        x_ratelimit_headers=xrl == "DRAFT_VERSION_03",
        x_envoy_ratelimited=not w.boolean(d, "disable_x_envoy_ratelimited_header", path, False),
        rate_limited_status=_status(d, "rate_limited_status", path, 429),
        status_on_error=_status(d, "status_on_error", path, 500),
        stat_prefix=w.string(d, "stat_prefix", path, ""))


_ACTIONS = ("request_headers", "remote_address", "generic_key", "destination_cluster",
            "source_cluster", "header_value_match", "dynamic_metadata", "metadata",
            "masked_remote_address", "query_parameters", "query_parameter_value_match",
            "extension")


def action_from_envoy(d: Any, path: str) -> Action:
    w.check_keys(d, _ACTIONS, path)
    kind = w.one_of(d, _ACTIONS, path) or ""
    kp = w.join(path, kind)
    if kind == "request_headers":
        x = w.check_keys(w.mapping(d, kind, path),
                         ("header_name", "descriptor_key", "skip_if_absent"), kp)
        return RequestHeadersAction(w.string(x, "header_name", kp, nonempty=True).lower(),
                                    w.string(x, "descriptor_key", kp, nonempty=True),
                                    w.boolean(x, "skip_if_absent", kp, False))
    if kind == "remote_address":
        w.check_keys(d[kind] or {}, (), kp)
        return RemoteAddressAction()
    if kind == "generic_key":
        x = w.check_keys(w.mapping(d, kind, path), ("descriptor_value", "descriptor_key"), kp)
        return GenericKeyAction(w.string(x, "descriptor_value", kp, nonempty=True),
                                w.string(x, "descriptor_key", kp, "") or "generic_key")
    if kind == "destination_cluster":
        w.check_keys(d[kind] or {}, (), kp)
        return DestinationClusterAction()
    raise ConfigError(kp, f"rate limit action {kind} is not supported by this proxy")


def route_rate_limits_from_envoy(items: Any, path: str) -> tuple[RouteRateLimit, ...]:
    if not isinstance(items, list):
        raise ConfigError(path, "must be a list")
    out = []
    for i, r in enumerate(items):
        p = w.join(path, i)
        w.check_keys(r, ("stage", "disable_key", "actions", "limit", "hits_addend",
                         "apply_on_stream_done"), p)
        if w.integer(r, "stage", p, 0, lo=0, hi=10) != 0:
            raise ConfigError(w.join(p, "stage"), "only stage 0 is supported")
        # no runtime layer here: a disable_key never resolves to "disabled" (Envoy's default)
        w.string(r, "disable_key", p, "")
        if r.get("limit") is not None:
            raise ConfigError(w.join(p, "limit"), "dynamic limit overrides are not supported")
        if w.boolean(r, "apply_on_stream_done", p, False):
            raise ConfigError(w.join(p, "apply_on_stream_done"), "is not supported")
        hits = 0
        if r.get("hits_addend") is not None:
            hp = w.join(p, "hits_addend")
            h = w.check_keys(w.mapping(r, "hits_addend", p), ("number", "format"), hp)
            if "format" in h:
                raise ConfigError(w.join(hp, "format"), "is not supported; use number")
            hits = w.integer(h, "number", hp, lo=0, hi=1_000_000_000)
        ap = w.join(p, "actions")
        acts = tuple(action_from_envoy(a, w.join(ap, j))
                     for j, a in enumerate(w.seq(r, "actions", p)))
        if not acts:
            raise ConfigError(ap, "needs at least one action")
        out.append(RouteRateLimit(acts, hits))
    return tuple(out)
