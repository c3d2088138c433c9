"""RBAC from native YAML (see docs/security.md), e.g.::

    rbac:
      action: ALLOW
      policies:
        admins:
          permissions: [{path: {prefix: /admin}}]
          principals: [{claim: {name: groups, value: admin}}]

Each permission / principal is a mapping with exactly one key.
"""

from __future__ import annotations

import ipaddress

import filters.rbac.engine as E
from filters.rbac.config import ACTIONS, Engine, RbacConfig, each, policy
from filters.request_headers import RequestTest, request_header_test
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.matchers import StringMatcher, header_matcher_from_native, string_matcher_from_native
from sidecar.core.context import JsonValue

_PERM_KEYS = ("any", "path", "method", "methods", "host", "header", "port", "and", "or", "not")
_PRIN_KEYS = ("any", "claim", "peer", "authenticated", "source_ip", "remote_ip", "header",
              "and", "or", "not")


def _single_key(d: object, keys: tuple[str, ...], path: str) -> tuple[str, object]:
    m = w.check_keys(d, keys, path)
    if len(m) != 1:
        raise ConfigError(path, f"must have exactly one of {', '.join(keys)}")
    kind = str(next(iter(m)))
    return kind, m[kind]


def _true(v: object, path: str) -> None:
    if v is not True:
        raise ConfigError(path, "must be true")


def _cidr(v: object, path: str) -> E.IpNetwork:
    if not isinstance(v, str):
        raise ConfigError(path, "must be an IP address or CIDR like 10.0.0.0/8")
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ConfigError(path, f"not an IP address or CIDR: {v!r}") from None


def _host_matcher(v: object, path: str) -> StringMatcher:
    """Host names compare case-insensitively: literal kinds are lower-cased."""
    sm = string_matcher_from_native(v, path)
    if sm.regex is not None or (sm.exact is None and sm.prefix is None and sm.suffix is None
                                and sm.contains is None):
        return sm

    def low(s: str | None) -> str | None:
        return s.lower() if s is not None else None
    return StringMatcher(exact=low(sm.exact), prefix=low(sm.prefix), suffix=low(sm.suffix),
                         contains=low(sm.contains), ignore_case=True)


def permission(d: object, path: str) -> RequestTest:
    kind, v = _single_key(d, _PERM_KEYS, path)
    kp = w.join(path, kind)
    if kind == "any":
        _true(v, kp)
        return E.always
    if kind == "path":
        return E.path_test(string_matcher_from_native(v, kp))
    if kind in ("method", "methods"):
        ms = [v] if isinstance(v, str) else v
        if not isinstance(ms, list) or not ms or not all(isinstance(x, str) and x.isalpha()
                                                         for x in ms):
            raise ConfigError(kp, "must be an HTTP method or a list of them")
        return E.methods_test(frozenset(str(x).upper() for x in ms))
    if kind == "host":
        return E.host_test(_host_matcher(v, kp))
    if kind == "header":
        return request_header_test(header_matcher_from_native(v, kp))
    if kind == "port":
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
            raise ConfigError(kp, "must be a port number")
        return E.local_port_test(v, v + 1)
    if kind in ("and", "or"):
        tests = each({kind: v}, kind, path, permission)
        return E.all_of(tests) if kind == "and" else E.any_of(tests)
    return E.negate(permission(v, kp))


def _claim(d: object, path: str) -> RequestTest:
    """``claim: {name: groups, value: admin, provider: optional}``; a space-separated ``scope``
    claim is matched per scope when ``split: true``."""
    m = w.check_keys(d, ("name", "value", "provider", "present", "split"), path)
    keys = tuple(w.string(m, "name", path, nonempty=True).split("."))
    provider = w.string(m, "provider", path, None)
    split = w.boolean(m, "split", path, False)
    if "present" in m:
        if "value" in m:
            raise ConfigError(path, "only one of value, present may be set")
        return E.claim_test(provider, keys, lambda x: True, w.boolean(m, "present", path))
    if "value" not in m:
        raise ConfigError(w.join(path, "value"), "is required (or present: true)")
    v: JsonValue = m["value"]
    if isinstance(v, bool):
        v = "true" if v else "false"
    elif isinstance(v, (int, float)):
        v = str(v)
    test = E.claim_value_test(string_matcher_from_native(v, w.join(path, "value")))
    return E.claim_test(provider, keys, E.split_scopes(test) if split else test, True)


def principal(d: object, path: str) -> RequestTest:
    kind, v = _single_key(d, _PRIN_KEYS, path)
    kp = w.join(path, kind)
    if kind == "any":
        _true(v, kp)
        return E.always
    if kind == "claim":
        return _claim(v, kp)
    if kind in ("peer", "authenticated"):
        return E.peer_test(None if v is True else string_matcher_from_native(v, kp))
    if kind in ("source_ip", "remote_ip"):
        nets = [v] if isinstance(v, str) else v
        if not isinstance(nets, list) or not nets:
            raise ConfigError(kp, "must be a CIDR or a list of CIDRs")
        getter = E.direct_ip if kind == "source_ip" else E.remote_ip
        return E.any_of(E.ip_in(_cidr(n, w.join(kp, i) if isinstance(v, list) else kp), getter)
                        for i, n in enumerate(nets))
    if kind == "header":
        return request_header_test(header_matcher_from_native(v, kp))
    if kind in ("and", "or"):
        tests = each({kind: v}, kind, path, principal)
        return E.all_of(tests) if kind == "and" else E.any_of(tests)
    return E.negate(principal(v, kp))


def _engine(d: dict[str, object], path: str) -> Engine:
    action = w.string(d, "action", path, "ALLOW")
    if action.upper() not in ACTIONS:
        raise ConfigError(w.join(path, "action"), f"must be one of {', '.join(ACTIONS)}")
    policies = []
    pp = w.join(path, "policies")
    for name, pol in w.mapping(d, "policies", path, {}).items():
        p = w.join(pp, str(name))
        policies.append(policy(str(name), w.check_keys(pol, ("permissions", "principals"), p), p,
                               permission, principal))
    return Engine(action=action.upper(), policies=tuple(policies))


def from_native(d: object, path: str) -> RbacConfig:
    """The engine inline (``action``, ``policies``) plus an optional ``shadow`` engine."""
    m = w.check_keys(d, ("action", "policies", "shadow", "stat_prefix"), path)
    rules = None
    if "action" in m or "policies" in m:
        rules = _engine(m, path)
    shadow = m.get("shadow")
    return RbacConfig(
        rules=rules,
        shadow=(_engine(w.check_keys(shadow, ("action", "policies"), w.join(path, "shadow")),
                        w.join(path, "shadow")) if shadow is not None else None),
        stat_prefix=w.string(m, "stat_prefix", path, ""))


def per_route_from_native(d: object, path: str) -> RbacConfig:
    """``{disabled: true}`` or a whole native RBAC config replacing the listener's."""
    if isinstance(d, dict) and set(d) == {"disabled"}:
        if w.boolean(d, "disabled", path) is not True:
            raise ConfigError(w.join(path, "disabled"), "must be true (omit to keep the filter)")
        return RbacConfig()
    if not isinstance(d, dict):
        raise ConfigError(path, "must be a mapping")
    return from_native(d, path)
