"""Cross-origin resource sharing: Envoy's ``envoy.filters.http.cors``.

A request with an ``Origin`` is checked against the policy of its route. A preflight
(``OPTIONS`` with ``Access-Control-Request-Method``) is answered here, 200 with the
``access-control-allow-*`` headers, never reaching the upstream (one from an origin that is
not allowed goes on upstream when ``forward_not_matching_preflights``, Envoy's default, else
is answered 200 without ``access-control-allow-origin``). Other requests go on, and the
response gets ``access-control-allow-origin`` (the request's origin),
``access-control-allow-credentials`` and ``access-control-expose-headers`` when the origin is
allowed; an origin that is not allowed leaves the response as it is (the browser blocks it).

Envoy: the filter itself has no fields; the policy is a ``CorsPolicy`` in
``typed_per_filter_config`` of a virtual host and/or a route (merged field by field, the
route's first, as Envoy does). ``filter_enabled`` / ``shadow_enabled`` take their
``default_value`` (there is no runtime layer: ``runtime_key`` is refused); in shadow mode the
origin is only counted. Native: a default policy on the filter, overridable per virtual host
and route::

    filters:
      - cors:
          allow_origins: ["https://app.example.com", {suffix: ".example.com"}]
          allow_methods: GET, POST
          allow_headers: content-type, authorization
          expose_headers: x-request-id
          max_age: "600"
          allow_credentials: true

Metrics: ``sidecar_cors_requests_total{origin="valid"|"invalid"}``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from multidict import MultiDict

from sidecar import sdk
from sidecar.sdk import ConfigError, StringMatcher, wire

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
POLICY_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """None/empty fields are unset: a less specific policy's value applies."""

    allow_origins: tuple[StringMatcher, ...] = ()
    allow_methods: str = ""
    allow_headers: str = ""
    expose_headers: str = ""
    max_age: str = ""
    allow_credentials: bool | None = None
    allow_private_network_access: bool | None = None
    forward_not_matching_preflights: bool | None = None
    enabled: float = 1.0             # share of requests the policy is enforced for
    shadow: float = 0.0              # share of requests only counted


def merge(outer: CorsPolicy, inner: CorsPolicy) -> CorsPolicy:
    """``inner`` (the more specific: route over virtual host over filter) field by field."""
    return CorsPolicy(
        allow_origins=inner.allow_origins or outer.allow_origins,
        allow_methods=inner.allow_methods or outer.allow_methods,
        allow_headers=inner.allow_headers or outer.allow_headers,
        expose_headers=inner.expose_headers or outer.expose_headers,
        max_age=inner.max_age or outer.max_age,
        allow_credentials=_first(inner.allow_credentials, outer.allow_credentials),
        allow_private_network_access=_first(inner.allow_private_network_access,
                                            outer.allow_private_network_access),
        forward_not_matching_preflights=_first(inner.forward_not_matching_preflights,
                                               outer.forward_not_matching_preflights),
        # Envoy takes enabled/shadow from the most specific policy only
        enabled=inner.enabled, shadow=inner.shadow)


def _first(a: bool | None, b: bool | None) -> bool | None:
    return a if a is not None else b


# ---- Envoy ------------------------------------------------------------------------------------

def _runtime_percent(d: dict[str, object], key: str, path: str, default: float) -> float:
    if d.get(key) is None:
        return default
    p = wire.join(path, key)
    r = wire.check_keys(d[key], ("default_value", "runtime_key"), p)
    if r.get("runtime_key"):
        raise ConfigError(wire.join(p, "runtime_key"), "runtime overrides are not supported "
                          "(there is no runtime layer); set default_value")
    dp = wire.join(p, "default_value")
    fp = wire.check_keys(wire.mapping(r, "default_value", p), ("numerator", "denominator"), dp)
    den = _DENOMINATORS[wire.string(fp, "denominator", dp, "HUNDRED", choices=tuple(_DENOMINATORS))]
    return min(1.0, wire.integer(fp, "numerator", dp, 0, lo=0) / den)


def policy_from_envoy(d: object, path: str) -> CorsPolicy:
    m = wire.check_keys(d, ("allow_origin_string_match", "allow_methods", "allow_headers",
                            "expose_headers", "max_age", "allow_credentials", "filter_enabled",
                            "shadow_enabled", "allow_private_network_access",
                            "forward_not_matching_preflights"), path)
    op = wire.join(path, "allow_origin_string_match")
    origins = tuple(sdk.string_matcher_from_envoy(o, wire.join(op, i))
                    for i, o in enumerate(wire.seq(m, "allow_origin_string_match", path, [])))
    return _policy(m, path, origins, envoy=True)


def _policy(m: dict[str, object], path: str, origins: tuple[StringMatcher, ...],
            envoy: bool) -> CorsPolicy:
    max_age = m.get("max_age")
    if isinstance(max_age, int) and not isinstance(max_age, bool) and not envoy:
        max_age = str(max_age)
    if max_age is not None and (not isinstance(max_age, str) or not max_age.isdigit()):
        raise ConfigError(wire.join(path, "max_age"), "must be a number of seconds")
    return CorsPolicy(
        allow_origins=origins,
        allow_methods=wire.string(m, "allow_methods", path, ""),
        allow_headers=wire.string(m, "allow_headers", path, ""),
        expose_headers=wire.string(m, "expose_headers", path, ""),
        max_age=max_age or "",
        allow_credentials=wire.boolean(m, "allow_credentials", path, None),
        allow_private_network_access=wire.boolean(m, "allow_private_network_access", path, None),
        forward_not_matching_preflights=wire.boolean(m, "forward_not_matching_preflights", path,
                                                     None),
        enabled=_runtime_percent(m, "filter_enabled", path, 1.0) if envoy
        else wire.number(m, "enabled_percent", path, 100.0, lo=0, hi=100) / 100.0,
        shadow=_runtime_percent(m, "shadow_enabled", path, 0.0) if envoy
        else wire.number(m, "shadow_percent", path, 0.0, lo=0, hi=100) / 100.0,
    )


def from_envoy(d: object, path: str) -> CorsPolicy | None:
    wire.check_keys(d, (), path)       # the Cors filter message has no fields
    return None


# ---- native -----------------------------------------------------------------------------------

def policy_from_native(d: object, path: str) -> CorsPolicy:
    m = wire.check_keys(d, ("allow_origins", "allow_methods", "allow_headers", "expose_headers",
                            "max_age", "allow_credentials", "allow_private_network_access",
                            "forward_not_matching_preflights", "enabled_percent",
                            "shadow_percent"), path)
    op = wire.join(path, "allow_origins")
    origins = []
    for i, o in enumerate(wire.seq(m, "allow_origins", path, [])):
        origins.append(StringMatcher(prefix="") if o == "*"
                       else sdk.string_matcher_from_native(o, wire.join(op, i)))
    return _policy(m, path, tuple(origins), envoy=False)


def from_native(d: object, path: str) -> CorsPolicy | None:
    if d in (None, {}):
        return None
    return policy_from_native(d, path)


# ---- the filter -------------------------------------------------------------------------------

class CorsState:
    __slots__ = ("valid", "invalid")

    def __init__(self, env: sdk.FilterEnv):
        c = sdk.counter(env.metrics, "sidecar_cors_requests_total",
                        "Requests with an Origin header, by whether the origin is allowed",
                        ("origin",))
        self.valid = c.labels("valid")
        self.invalid = c.labels("invalid")


class CorsFilter(sdk.Filter):
    __slots__ = ("policy", "state", "allow_credentials", "private_network", "forward")

    def __init__(self, policy: CorsPolicy, state: CorsState):
        self.policy = policy
        self.state = state
        self.allow_credentials = bool(policy.allow_credentials)
        self.private_network = bool(policy.allow_private_network_access)
        self.forward = policy.forward_not_matching_preflights is not False

    def _allowed(self, origin: str) -> bool:
        for m in self.policy.allow_origins:
            if m.matches("*") or m.matches(origin):
                return True
        return False

    async def __call__(self, req: sdk.Request, next: sdk.Handler) -> sdk.Response:
        p = self.policy
        enabled = p.enabled >= 1.0 or (p.enabled > 0.0 and random.random() < p.enabled)
        shadow = not enabled and p.shadow > 0.0 and (p.shadow >= 1.0 or random.random() < p.shadow)
        if not enabled and not shadow:
            return await next(req)
        headers = req.headers
        origin = headers.get("origin")
        if not origin:
            return await next(req)
        allowed = self._allowed(origin)
        (self.state.valid if allowed else self.state.invalid).inc()
        if not enabled:
            return await next(req)
        if req.method == "OPTIONS" and headers.get("access-control-request-method"):
            if allowed or not self.forward:
                return self._preflight(req, origin if allowed else None)
            return await next(req)
        resp = await next(req)
        if allowed:
            h = resp.headers
            h["access-control-allow-origin"] = origin
            if self.allow_credentials:
                h["access-control-allow-credentials"] = "true"
            if p.expose_headers:
                h["access-control-expose-headers"] = p.expose_headers
        return resp

    def _preflight(self, req: sdk.Request, origin: str | None) -> sdk.Response:
        p = self.policy
        rh = req.headers
        h: sdk.Headers = MultiDict()
        if origin is not None:
            h["access-control-allow-origin"] = origin
        if self.allow_credentials:
            h["access-control-allow-credentials"] = "true"
        if p.allow_methods:
            h["access-control-allow-methods"] = (rh.get("access-control-request-method", "")
                                                 if p.allow_methods == "*" else p.allow_methods)
        if p.allow_headers:
            h["access-control-allow-headers"] = (rh.get("access-control-request-headers", "")
                                                 if p.allow_headers == "*" else p.allow_headers)
        if p.max_age:
            h["access-control-max-age"] = p.max_age
        if self.private_network and rh.get("access-control-request-private-network") == "true":
            h["access-control-allow-private-network"] = "true"
        req.ctx.response_code_details = "cors_response"
        resp = sdk.Response(200, h, b"")
        resp.local = True
        return resp


def new_state(env: sdk.FilterEnv) -> CorsState:
    return CorsState(env)


def build(config: CorsPolicy | None, per_route: CorsPolicy | None, state: CorsState,
          env: sdk.FilterEnv, route: sdk.RouteInfo) -> CorsFilter | None:
    if per_route is not None and config is not None:
        policy: CorsPolicy | None = merge(config, per_route)
    else:
        policy = per_route or config
    if policy is None:
        return None                    # Envoy: no policy on the route, nothing to do
    return CorsFilter(policy, state)


SPEC = sdk.FilterSpec(
    name="envoy.filters.http.cors",
    short="cors",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=POLICY_TYPE_URL,
    per_route_from_envoy=policy_from_envoy,
    per_route_from_native=policy_from_native,
    merge_per_route=merge,
)
