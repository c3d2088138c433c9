"""RBAC from Envoy v3: ``envoy.extensions.filters.http.rbac.v3.RBAC`` and ``RBACPerRoute``.

JWT claims are reached with Envoy's ``metadata`` principal (``filter:
envoy.filters.http.jwt_authn``, ``path: [{key: <provider or payload_in_metadata>}, {key:
<claim>}, ...]``). Fields this proxy cannot honour are refused by name.
"""

from __future__ import annotations

import ipaddress

import filters.rbac.engine as E
from filters.rbac.config import ACTIONS, JWT_FILTER, Engine, RbacConfig, policy
from filters.request_headers import RequestTest, request_header_test
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.matchers import header_matcher_from_envoy, string_matcher_from_envoy

_PERM_KEYS = ("and_rules", "or_rules", "any", "header", "url_path", "destination_ip",
              "destination_port", "destination_port_range", "metadata", "not_rule",
              "requested_server_name", "matcher", "uri_template", "sourced_metadata")
_PRIN_KEYS = ("and_ids", "or_ids", "any", "authenticated", "source_ip", "direct_remote_ip",
              "remote_ip", "header", "url_path", "metadata", "not_id", "filter_state",
              "sourced_metadata", "custom")
_VALUE_KINDS = ("null_match", "double_match", "string_match", "bool_match", "present_match",
                "list_match", "or_match")


def unsupported(path: str, what: str) -> ConfigError:
    return ConfigError(path, f"{what} is not supported by this proxy")


def _cidr(d: object, path: str) -> E.IpNetwork:
    """``envoy.config.core.v3.CidrRange``."""
    m = w.check_keys(d, ("address_prefix", "prefix_len"), path)
    addr = w.string(m, "address_prefix", path, nonempty=True)
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ConfigError(w.join(path, "address_prefix"), f"not an IP address: {addr!r}") from None
    plen = w.integer(m, "prefix_len", path, ip.max_prefixlen, lo=0, hi=ip.max_prefixlen)
    return ipaddress.ip_network(f"{addr}/{plen}", strict=False)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value_matcher(d: object, path: str) -> E.JsonTest:
    """``envoy.type.matcher.v3.ValueMatcher`` over a JSON value (``E.MISSING`` = absent)."""
    m = w.check_keys(d, _VALUE_KINDS, path)
    kind = w.one_of(m, _VALUE_KINDS, path)
    assert kind is not None
    kp = w.join(path, kind)
    if kind == "null_match":
        return lambda v: v is None
    if kind == "present_match":
        want = w.boolean(m, kind, path)
        return lambda v: (v is not E.MISSING) == want
    if kind == "bool_match":
        b = w.boolean(m, kind, path)
        return lambda v: isinstance(v, bool) and v == b
    if kind == "string_match":
        sm = string_matcher_from_envoy(w.mapping(m, kind, path), kp)
        return lambda v: isinstance(v, str) and sm.matches(v)
    if kind == "double_match":
        dm = w.check_keys(w.mapping(m, kind, path), ("exact", "range"), kp)
        sub = w.one_of(dm, ("exact", "range"), kp)
        if sub == "exact":
            x = w.number(dm, "exact", kp)
            return lambda v: _is_number(v) and v == x
        rp = w.join(kp, "range")
        r = w.check_keys(w.mapping(dm, "range", kp), ("start", "end"), rp)
        lo, hi = w.number(r, "start", rp), w.number(r, "end", rp)
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v < hi
    if kind == "list_match":
        lm = w.check_keys(w.mapping(m, kind, path), ("one_of",), kp)
        inner = _value_matcher(w.mapping(lm, "one_of", kp), w.join(kp, "one_of"))
        return lambda v: isinstance(v, list) and any(inner(x) for x in v)
    om = w.check_keys(w.mapping(m, kind, path), ("value_matchers",), kp)
    inners = [_value_matcher(x, w.join(w.join(kp, "value_matchers"), i))
              for i, x in enumerate(w.seq(om, "value_matchers", kp))]
    return lambda v: any(f(v) for f in inners)


def _metadata(d: object, path: str) -> RequestTest:
    """``envoy.type.matcher.v3.MetadataMatcher`` over the JWT payloads from jwt_authn."""
    m = w.check_keys(d, ("filter", "path", "value", "invert"), path)
    filt = w.string(m, "filter", path)
    if filt != JWT_FILTER:
        raise ConfigError(w.join(path, "filter"),
                          f"only {JWT_FILTER} metadata (verified JWT payloads) is available; "
                          f"got {filt!r}")
    keys = []
    pp = w.join(path, "path")
    for i, seg in enumerate(w.seq(m, "path", path)):
        sp = w.join(pp, i)
        s = w.check_keys(seg, ("key",), sp)
        keys.append(w.string(s, "key", sp, nonempty=True))
    if not keys:
        raise ConfigError(pp, "needs at least the payload key (provider or payload_in_metadata)")
    test = _value_matcher(w.mapping(m, "value", path), w.join(path, "value"))
    return E.metadata_test(keys[0], tuple(keys[1:]), test, w.boolean(m, "invert", path, False))


def _url_path(d: object, path: str) -> RequestTest:
    m = w.check_keys(d, ("path",), path)
    return E.path_test(string_matcher_from_envoy(w.mapping(m, "path", path), w.join(path, "path")))


def _header(d: object, path: str) -> RequestTest:
    return request_header_test(header_matcher_from_envoy(d, path))


def permission(d: object, path: str) -> RequestTest:
    """``envoy.config.rbac.v3.Permission``."""
    m = w.check_keys(d, _PERM_KEYS, path)
    kind = w.one_of(m, _PERM_KEYS, path)
    assert kind is not None
    kp = w.join(path, kind)
    if kind == "any":
        if not w.boolean(m, "any", path):
            raise ConfigError(kp, "must be true")
        return E.always
    if kind in ("and_rules", "or_rules"):
        s = w.check_keys(w.mapping(m, kind, path), ("rules",), kp)
        tests = [permission(x, w.join(w.join(kp, "rules"), i))
                 for i, x in enumerate(w.seq(s, "rules", kp))]
        if not tests:
            raise ConfigError(w.join(kp, "rules"), "needs at least one rule")
        return E.all_of(tests) if kind == "and_rules" else E.any_of(tests)
    if kind == "not_rule":
        return E.negate(permission(w.mapping(m, kind, path), kp))
    if kind == "header":
        return _header(w.mapping(m, kind, path), kp)
    if kind == "url_path":
        return _url_path(w.mapping(m, kind, path), kp)
    if kind == "destination_port":
        port = w.integer(m, kind, path, lo=0, hi=65535)
        return E.local_port_test(port, port + 1)
    if kind == "destination_port_range":
        r = w.check_keys(w.mapping(m, kind, path), ("start", "end"), kp)
        return E.local_port_test(w.integer(r, "start", kp, lo=0), w.integer(r, "end", kp, hi=65536))
    if kind == "metadata":
        return _metadata(w.mapping(m, kind, path), kp)
    raise unsupported(kp, kind)


def principal(d: object, path: str) -> RequestTest:
    """``envoy.config.rbac.v3.Principal``."""
    m = w.check_keys(d, _PRIN_KEYS, path)
    kind = w.one_of(m, _PRIN_KEYS, path)
    assert kind is not None
    kp = w.join(path, kind)
    if kind == "any":
        if not w.boolean(m, "any", path):
            raise ConfigError(kp, "must be true")
        return E.always
    if kind in ("and_ids", "or_ids"):
        s = w.check_keys(w.mapping(m, kind, path), ("ids",), kp)
        tests = [principal(x, w.join(w.join(kp, "ids"), i))
                 for i, x in enumerate(w.seq(s, "ids", kp))]
        if not tests:
            raise ConfigError(w.join(kp, "ids"), "needs at least one id")
        return E.all_of(tests) if kind == "and_ids" else E.any_of(tests)
    if kind == "not_id":
        return E.negate(principal(w.mapping(m, kind, path), kp))
    if kind == "authenticated":
        a = w.check_keys(w.mapping(m, kind, path, {}), ("principal_name",), kp)
        if a.get("principal_name") is None:
            return E.peer_test(None)
        return E.peer_test(string_matcher_from_envoy(w.mapping(a, "principal_name", kp),
                                                     w.join(kp, "principal_name")))
    if kind in ("source_ip", "direct_remote_ip"):
        return E.ip_in(_cidr(w.mapping(m, kind, path), kp), E.direct_ip)
    if kind == "remote_ip":
        return E.ip_in(_cidr(w.mapping(m, kind, path), kp), E.remote_ip)
    if kind == "header":
        return _header(w.mapping(m, kind, path), kp)
    if kind == "url_path":
        return _url_path(w.mapping(m, kind, path), kp)
    if kind == "metadata":
        return _metadata(w.mapping(m, kind, path), kp)
    raise unsupported(kp, kind)


def _engine(d: object, path: str) -> Engine:
    m = w.check_keys(d, ("action", "policies", "audit_logging_options"), path)
    if m.get("audit_logging_options") is not None:
        raise unsupported(w.join(path, "audit_logging_options"), "audit_logging_options")
    action = w.string(m, "action", path, "ALLOW", choices=ACTIONS)
    policies = []
    pp = w.join(path, "policies")
    for name, pol in w.mapping(m, "policies", path, {}).items():
        p = w.join(pp, str(name))
        pm = w.check_keys(pol, ("permissions", "principals", "condition", "checked_condition"), p)
        for k in ("condition", "checked_condition"):
            if pm.get(k) is not None:
                raise unsupported(w.join(p, k), "CEL " + k)
        policies.append(policy(str(name), pm, p, permission, principal))
    return Engine(action=action, policies=tuple(policies))


def from_envoy(d: object, path: str) -> RbacConfig:
    m = w.check_keys(d, ("rules", "matcher", "shadow_rules", "shadow_matcher",
                         "shadow_rules_stat_prefix", "rules_stat_prefix", "track_per_rule_stats"),
                     path)
    for k in ("matcher", "shadow_matcher"):
        if m.get(k) is not None:
            raise unsupported(w.join(path, k), f"the xDS matcher API ({k})")
    w.boolean(m, "track_per_rule_stats", path, False)   # per-policy metrics are always kept
    rules = m.get("rules")
    shadow = m.get("shadow_rules")
    return RbacConfig(
        rules=_engine(rules, w.join(path, "rules")) if rules is not None else None,
        shadow=_engine(shadow, w.join(path, "shadow_rules")) if shadow is not None else None,
        stat_prefix=w.string(m, "rules_stat_prefix", path, ""),
        shadow_stat_prefix=w.string(m, "shadow_rules_stat_prefix", path, ""))


def per_route_from_envoy(d: object, path: str) -> RbacConfig:
    """``RBACPerRoute{rbac}``; without ``rbac`` the filter is disabled on the route."""
    m = w.check_keys(d, ("rbac",), path)
    if m.get("rbac") is None:
        return RbacConfig()
    return from_envoy(w.mapping(m, "rbac", path), w.join(path, "rbac"))
