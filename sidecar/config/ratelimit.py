"""Envoy's ``rate_limits`` (``envoy.config.route.v3.RateLimit``): the descriptors a route, a
virtual host, or the global rate limit filter itself asks the rate limit service about. The
same shape is read from Envoy v3 and from native YAML.

Honoured: ``actions`` (``request_headers``, ``remote_address``, ``generic_key``,
``header_value_match``, ``destination_cluster``, ``source_cluster``, ``metadata`` on verified
JWT claims: ``envoy.filters.http.jwt_authn`` with ``path: [provider, claim...]``), ``stage`` (route and
virtual host), ``disable_key`` (route and virtual host; there is no runtime layer, so the key
never disables its entry: Envoy's behaviour when the key is unset). Refused by name: the other
actions, ``limit`` overrides, ``hits_addend``, ``apply_on_stream_done``,
``x_ratelimit_option``, formatter ``default_value``.
"""

from __future__ import annotations

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.matchers import header_matcher_from_envoy
from sidecar.core.limits import (
    DestinationClusterAction,
    GenericKeyAction,
    HeaderValueMatchAction,
    JwtClaimAction,
    RateLimitAction,
    RateLimitPolicy,
    RemoteAddressAction,
    RequestHeadersAction,
    SourceClusterAction,
)

MAX_STAGE = 10                       # Envoy: stages 0..10

ACTIONS = ("request_headers", "remote_address", "generic_key", "header_value_match",
           "destination_cluster", "source_cluster", "metadata")
_REFUSED_ACTIONS = ("dynamic_metadata", "masked_remote_address", "query_parameters",
                    "query_parameter_value_match", "extension", "remote_address_match")
JWT_FILTER = "envoy.filters.http.jwt_authn"
_POLICY_KEYS = ("stage", "disable_key", "actions", "limit", "hits_addend",
                "apply_on_stream_done", "x_ratelimit_option")


def _empty(d: dict[str, object], kind: str, path: str) -> None:
    if d[kind] is not None:
        w.check_keys(d[kind], (), w.join(path, kind))


def action_from_wire(raw: object, path: str) -> RateLimitAction:
    d = w.check_keys(raw, ACTIONS + _REFUSED_ACTIONS, path)
    kind = w.one_of(d, ACTIONS + _REFUSED_ACTIONS, path)
    kp = w.join(path, kind)
    if kind == "request_headers":
        x = w.check_keys(w.mapping(d, kind, path),
                         ("header_name", "descriptor_key", "skip_if_absent"), kp)
        return RequestHeadersAction(w.string(x, "header_name", kp, nonempty=True).lower(),
                                    w.string(x, "descriptor_key", kp, nonempty=True),
                                    w.boolean(x, "skip_if_absent", kp, False))
    if kind == "remote_address":
        _empty(d, kind, path)
        return RemoteAddressAction()
    if kind == "destination_cluster":
        _empty(d, kind, path)
        return DestinationClusterAction()
    if kind == "source_cluster":
        _empty(d, kind, path)
        return SourceClusterAction()
    if kind in ("generic_key", "header_value_match"):
        keys: tuple[str, ...] = ("descriptor_value", "descriptor_key", "default_value")
        if kind == "header_value_match":
            keys += ("expect_match", "headers")
        x = w.check_keys(w.mapping(d, kind, path), keys, kp)
        if w.string(x, "default_value", kp, ""):
            raise ConfigError(w.join(kp, "default_value"),
                              "is not supported (descriptor values are literal: no formatter)")
        value = w.string(x, "descriptor_value", kp, nonempty=True)
        if kind == "generic_key":
            return GenericKeyAction(value, w.string(x, "descriptor_key", kp, "") or "generic_key")
        hp = w.join(kp, "headers")
        tests = tuple(header_matcher_from_envoy(h, w.join(hp, i))
                      for i, h in enumerate(w.seq(x, "headers", kp)))
        if not tests:
            raise ConfigError(hp, "needs at least one header matcher")
        return HeaderValueMatchAction(value, tests,
                                      w.string(x, "descriptor_key", kp, "") or "header_match",
                                      w.boolean(x, "expect_match", kp, True))
    if kind == "metadata":
        return _jwt_claim(w.mapping(d, kind, path), kp)
    raise ConfigError(kp, f"rate limit action {kind} is not supported by this proxy "
                          f"(supported: {', '.join(ACTIONS)})")


def _jwt_claim(d: dict[str, object], path: str) -> JwtClaimAction:
    """``metadata`` on the JWT filter's dynamic metadata: ``metadata_key: {key:
    envoy.filters.http.jwt_authn, path: [{key: <provider>}, {key: <claim>}, ...]}``."""
    x = w.check_keys(d, ("descriptor_key", "metadata_key", "default_value", "source",
                         "skip_if_absent"), path)
    w.string(x, "source", path, "DYNAMIC", choices=("DYNAMIC",))
    mp = w.join(path, "metadata_key")
    mk = w.check_keys(w.mapping(x, "metadata_key", path), ("key", "path"), mp)
    if w.string(mk, "key", mp) != JWT_FILTER:
        raise ConfigError(w.join(mp, "key"),
                          f"only {JWT_FILTER} metadata (verified JWT payloads) is available")
    segs = []
    for i, seg in enumerate(w.seq(mk, "path", mp)):
        sp = w.join(w.join(mp, "path"), i)
        segs.append(w.string(w.check_keys(seg, ("key",), sp), "key", sp, nonempty=True))
    if len(segs) < 2:
        raise ConfigError(w.join(mp, "path"), "needs [{key: <provider>}, {key: <claim>}, ...]")
    return JwtClaimAction(w.string(x, "descriptor_key", path, nonempty=True), segs[0],
                          tuple(segs[1:]), w.string(x, "default_value", path, ""),
                          w.boolean(x, "skip_if_absent", path, False))


def rate_limits_from_wire(items: object, path: str, *, in_filter: bool = False
                          ) -> tuple[RateLimitPolicy, ...]:
    """A ``rate_limits`` list. ``in_filter``: the list sits in the rate limit filter's config
    or its per-route config, where Envoy does not support ``stage`` and ``disable_key``."""
    if not isinstance(items, list):
        raise ConfigError(path, "must be a list")
    out = []
    for i, r in enumerate(items):
        p = w.join(path, i)
        d = w.check_keys(r, _POLICY_KEYS, p)
        if in_filter:
            for k in ("stage", "disable_key"):
                if d.get(k) is not None:
                    raise ConfigError(w.join(p, k), "is not supported in a filter's "
                                      "rate_limits (set it on the route's rate_limits)")
        stage = w.integer(d, "stage", p, 0, lo=0, hi=MAX_STAGE)
        w.string(d, "disable_key", p, "")
        if d.get("limit") is not None:
            raise ConfigError(w.join(p, "limit"), "dynamic limit overrides are not supported")
        if d.get("hits_addend") is not None:
            raise ConfigError(w.join(p, "hits_addend"), "is not supported")
        if w.boolean(d, "apply_on_stream_done", p, False):
            raise ConfigError(w.join(p, "apply_on_stream_done"), "is not supported")
        if w.string(d, "x_ratelimit_option", p, "UNSPECIFIED",
                    choices=("UNSPECIFIED", "OFF", "DRAFT_VERSION_03")) != "UNSPECIFIED":
            raise ConfigError(w.join(p, "x_ratelimit_option"),
                              "is not supported; use the filter's enable_x_ratelimit_headers")
        ap = w.join(p, "actions")
        acts = tuple(action_from_wire(a, w.join(ap, j))
                     for j, a in enumerate(w.seq(d, "actions", p)))
        if not acts:
            raise ConfigError(ap, "needs at least one action")
        out.append(RateLimitPolicy(acts, stage))
    return tuple(out)
