"""Role-based access control: Envoy's ``envoy.filters.http.rbac``.

A policy matches when ANY of its permissions matches the request AND ANY of its principals
matches the caller. The engine's action decides what a match means:

* ``ALLOW``: the request passes only if some policy matches (no policies: everything denied);
* ``DENY``: the request is refused if some policy matches (no policies: everything passes);
* ``LOG``: never refuses; the matched policy is only recorded.

``shadow_rules`` are evaluated and counted but never enforced. A refusal is Envoy's local
reply: ``403`` with body ``RBAC: access denied`` and response code details
``rbac_access_denied_matched_policy[<policy>|none]``; Envoy sets no response flag, we record
the local flag ``RBAC``.

Config comes in two ways, both compiled to the same closures (one ``fn(req) -> bool`` per
permission/principal, built once per route per snapshot; nothing is parsed per request):

* Envoy v3 ``type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC`` (and
  ``RBACPerRoute`` per route). JWT claims are reached with Envoy's ``metadata`` principal,
  ``filter: envoy.filters.http.jwt_authn`` and ``path: [{key: <provider or
  payload_in_metadata>}, {key: <claim>}, ...]``.
* native: see ``docs/security.md``; e.g. ``{action: ALLOW, policies: {admins: {permissions:
  [{path: {prefix: /admin}}], principals: [{claim: {name: groups, value: admin}}]}}}``.

This module also holds the StringMatcher / HeaderMatcher readers shared with jwt_authn.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multidict import MultiDict

from sidecar.config import matchers as M
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.matchers import StringMatcher, string_matcher_from_envoy, string_matcher_from_native
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Filter, FilterEnv, FilterSpec, no_state
from sidecar.core.message import Request, Response, local_reply

METADATA_NAMESPACE = "envoy.filters.http.rbac"   # dynamic metadata, as Envoy names it

log = logging.getLogger("sidecar.filters.rbac")

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
PER_ROUTE_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
JWT_FILTER = "envoy.filters.http.jwt_authn"
DENIED_BODY = "RBAC: access denied"
# Envoy 1.40 logs no response flag for an RBAC denial (only response code details); this local
# flag makes denials visible in our access log and per-flag counters (see docs/security.md).
FLAG = "RBAC"
ACTIONS = ("ALLOW", "DENY", "LOG")

Matcher = Callable[[Request], bool]


# =============================================================================================
# shared matcher readers (also used by filters.jwt_authn)
# =============================================================================================








def _value_getter(name: str) -> Callable[[Request], str | None]:
    """Envoy's view of a header, pseudo-headers included (``:method``, ``:authority``, ...)."""
    if name == ":method":
        return lambda req: req.method
    if name in (":authority", "host"):
        return lambda req: req.headers.get("host")
    if name == ":path":
        return lambda req: req.url
    if name == ":scheme":
        return lambda req: "https" if req.ctx.tls else "http"

    def get(req: Request) -> str | None:
        vals = req.headers.getall(name, None)
        if vals is None:
            return None
        return vals[0] if len(vals) == 1 else ",".join(vals)
    return get


def _header_test(hm: M.HeaderMatcher) -> Matcher:
    get = _value_getter(hm.name)
    return lambda req: hm.matches_value(get(req))


def header_matcher_from_envoy(d: Any, path: str) -> Matcher:
    """``envoy.config.route.v3.HeaderMatcher`` as a ``fn(req) -> bool``."""
    return _header_test(M.header_matcher_from_envoy(d, path))


def header_matcher_from_native(d: Any, path: str) -> Matcher:
    """``{name, exact|prefix|suffix|contains|regex|present, ignore_case, invert}``."""
    return _header_test(M.header_matcher_from_native(d, path))


def path_only(req: Request) -> str:
    return req.path


# =============================================================================================
# permissions and principals
# =============================================================================================

@functools.lru_cache(maxsize=4096)
def _parse_ip(s: str):
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def _cidr(d: Any, path: str):
    w.check_keys(d, ("address_prefix", "prefix_len"), path)
    addr = w.string(d, "address_prefix", path, nonempty=True)
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ConfigError(w.join(path, "address_prefix"), f"not an IP address: {addr!r}") from None
    plen = w.integer(d, "prefix_len", path, ip.max_prefixlen, lo=0, hi=ip.max_prefixlen)
    return ipaddress.ip_network(f"{addr}/{plen}", strict=False)


def _cidr_native(v: Any, path: str):
    if not isinstance(v, str):
        raise ConfigError(path, "must be an IP address or CIDR like 10.0.0.0/8")
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ConfigError(path, f"not an IP address or CIDR: {v!r}") from None


def _direct_ip(req: Request) -> str | None:
    a = req.ctx.downstream_addr
    return a[0] if a else None


def _remote_ip(req: Request) -> str | None:
    # The trusted client address (XFF-derived) when the listener computed one, else the peer.
    return req.ctx.remote_ip or _direct_ip(req)


def _ip_in(net, getter: Callable[[Request], str | None]) -> Matcher:
    def match(req: Request) -> bool:
        s = getter(req)
        if not s:
            return False
        ip = _parse_ip(s)
        if ip is None:
            return False
        if ip.version != net.version:
            mapped = getattr(ip, "ipv4_mapped", None)
            if mapped is None or net.version != 4:
                return False
            ip = mapped
        return ip in net
    return match


def _local_port(req: Request) -> int | None:
    return req.ctx.local_port or None


def _any_of(fns: list[Matcher]) -> Matcher:
    if len(fns) == 1:
        return fns[0]
    t = tuple(fns)
    return lambda req: any(f(req) for f in t)


def _all_of(fns: list[Matcher]) -> Matcher:
    if len(fns) == 1:
        return fns[0]
    t = tuple(fns)
    return lambda req: all(f(req) for f in t)


def _always(req: Request) -> bool:
    return True


# ---- JWT claim lookup -----------------------------------------------------------------------

_MISSING = object()


def _walk(value: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(value, dict):
            return _MISSING
        value = value.get(k, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _value_matcher_envoy(d: Any, path: str) -> Callable[[Any], bool]:
    """``envoy.type.matcher.v3.ValueMatcher`` over a JSON value (``_MISSING`` = absent)."""
    w.check_keys(d, ("null_match", "double_match", "string_match", "bool_match",
                     "present_match", "list_match", "or_match"), path)
    kind = w.one_of(d, ("null_match", "double_match", "string_match", "bool_match",
                        "present_match", "list_match", "or_match"), path)
    kp = w.join(path, kind)
    if kind == "null_match":
        return lambda v: v is None
    if kind == "present_match":
        want = w.boolean(d, kind, path)
        return lambda v: (v is not _MISSING) == want
    if kind == "bool_match":
        b = w.boolean(d, kind, path)
        return lambda v: isinstance(v, bool) and v == b
    if kind == "string_match":
        sm = string_matcher_from_envoy(w.mapping(d, kind, path), kp)
        return lambda v: isinstance(v, str) and sm.matches(v)
    if kind == "double_match":
        dm = w.check_keys(w.mapping(d, kind, path), ("exact", "range"), kp)
        sub = w.one_of(dm, ("exact", "range"), kp)
        if sub == "exact":
            x = w.number(dm, "exact", kp)
            return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == x
        rp = w.join(kp, "range")
        r = w.check_keys(w.mapping(dm, "range", kp), ("start", "end"), rp)
        lo, hi = w.number(r, "start", rp), w.number(r, "end", rp)
        return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                          and lo <= v < hi)
    if kind == "list_match":
        lm = w.check_keys(w.mapping(d, kind, path), ("one_of",), kp)
        inner = _value_matcher_envoy(w.mapping(lm, "one_of", kp), w.join(kp, "one_of"))
        return lambda v: isinstance(v, list) and any(inner(x) for x in v)
    om = w.check_keys(w.mapping(d, kind, path), ("value_matchers",), kp)
    inners = [_value_matcher_envoy(x, w.join(w.join(kp, "value_matchers"), i))
              for i, x in enumerate(w.seq(om, "value_matchers", kp))]
    return lambda v: any(f(v) for f in inners)


def _metadata_envoy(d: Any, path: str) -> Matcher:
    """``envoy.type.matcher.v3.MetadataMatcher`` over the JWT payloads from jwt_authn."""
    w.check_keys(d, ("filter", "path", "value", "invert"), path)
    filt = w.string(d, "filter", path)
    if filt != JWT_FILTER:
        raise ConfigError(w.join(path, "filter"),
                          f"only {JWT_FILTER} metadata (verified JWT payloads) is available; "
                          f"got {filt!r}")
    keys = []
    pp = w.join(path, "path")
    for i, seg in enumerate(w.seq(d, "path", path)):
        sp = w.join(pp, i)
        w.check_keys(seg, ("key",), sp)
        keys.append(w.string(seg, "key", sp, nonempty=True))
    if not keys:
        raise ConfigError(pp, "needs at least the payload key (provider or payload_in_metadata)")
    vm = _value_matcher_envoy(w.mapping(d, "value", path), w.join(path, "value"))
    invert = w.boolean(d, "invert", path, False)
    head, rest = keys[0], tuple(keys[1:])

    def match(req: Request) -> bool:
        payload = req.ctx.jwt_payloads.get(head, _MISSING)
        v = payload if payload is _MISSING else _walk(payload, rest)
        return vm(v) != invert
    return match


def _claim_value_test(sm: StringMatcher) -> Callable[[Any], bool]:
    def test(v: Any) -> bool:
        if isinstance(v, str):
            return sm.matches(v)
        if isinstance(v, bool):
            return sm.matches("true" if v else "false")
        if isinstance(v, (int, float)):
            return sm.matches(str(v))
        if isinstance(v, list):   # list claims such as groups/roles/scp: any element
            return any(test(x) for x in v if not isinstance(x, (list, dict)))
        return False
    return test


def _claim_native(d: Any, path: str) -> Matcher:
    """``claim: {name: groups, value: admin, provider: optional}``; a space-separated ``scope``
    claim is matched per scope when ``split: true``."""
    w.check_keys(d, ("name", "value", "provider", "present", "split"), path)
    name = w.string(d, "name", path, nonempty=True)
    keys = tuple(name.split("."))
    provider = w.string(d, "provider", path, None)
    split = w.boolean(d, "split", path, False)
    if "present" in d:
        if "value" in d:
            raise ConfigError(path, "only one of value, present may be set")
        want = w.boolean(d, "present", path)
        test: Callable[[Any], bool] = lambda v: True   # noqa: E731
    else:
        want = True
        if "value" not in d:
            raise ConfigError(w.join(path, "value"), "is required (or present: true)")
        v = d["value"]
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (int, float)):
            v = str(v)
        test = _claim_value_test(string_matcher_from_native(v, w.join(path, "value")))
        if split:
            inner = test
            test = lambda x: (isinstance(x, str) and any(inner(p) for p in x.split())) \
                or (not isinstance(x, str) and inner(x))  # noqa: E731

    def match(req: Request) -> bool:
        payloads = req.ctx.jwt_payloads
        if provider is not None:
            p = payloads.get(provider)
            cands = (p,) if p is not None else ()
        else:
            cands = payloads.values()
        for p in cands:
            x = _walk(p, keys)
            if x is not _MISSING and test(x):
                return want
        return not want
    return match


# ---- Envoy permission / principal -----------------------------------------------------------

_PERM_KEYS = ("and_rules", "or_rules", "any", "header", "url_path", "destination_ip",
              "destination_port", "destination_port_range", "metadata", "not_rule",
              "requested_server_name", "matcher", "uri_template", "sourced_metadata")
_PRIN_KEYS = ("and_ids", "or_ids", "any", "authenticated", "source_ip", "direct_remote_ip",
              "remote_ip", "header", "url_path", "metadata", "not_id", "filter_state",
              "sourced_metadata", "custom")


def _unsupported(path: str, what: str) -> ConfigError:
    return ConfigError(path, f"{what} is not supported by this proxy")


def _url_path_envoy(d: Any, path: str) -> Matcher:
    w.check_keys(d, ("path",), path)
    sm = string_matcher_from_envoy(w.mapping(d, "path", path), w.join(path, "path"))
    m = sm.matches
    return lambda req: m(req.path)


def _permission_envoy(d: Any, path: str) -> Matcher:
    w.check_keys(d, _PERM_KEYS, path)
    kind = w.one_of(d, _PERM_KEYS, path)
    kp = w.join(path, kind)
    if kind == "any":
        if not w.boolean(d, "any", path):
            raise ConfigError(kp, "must be true")
        return _always
    if kind in ("and_rules", "or_rules"):
        s = w.check_keys(w.mapping(d, kind, path), ("rules",), kp)
        fns = [_permission_envoy(x, w.join(w.join(kp, "rules"), i))
               for i, x in enumerate(w.seq(s, "rules", kp))]
        if not fns:
            raise ConfigError(w.join(kp, "rules"), "needs at least one rule")
        return _all_of(fns) if kind == "and_rules" else _any_of(fns)
    if kind == "not_rule":
        inner = _permission_envoy(w.mapping(d, kind, path), kp)
        return lambda req: not inner(req)
    if kind == "header":
        return header_matcher_from_envoy(w.mapping(d, kind, path), kp)
    if kind == "url_path":
        return _url_path_envoy(w.mapping(d, kind, path), kp)
    if kind == "destination_port":
        port = w.integer(d, kind, path, lo=0, hi=65535)
        return lambda req: _local_port(req) == port
    if kind == "destination_port_range":
        r = w.check_keys(w.mapping(d, kind, path), ("start", "end"), kp)
        lo, hi = w.integer(r, "start", kp, lo=0), w.integer(r, "end", kp, hi=65536)

        def in_range(req: Request) -> bool:
            p = _local_port(req)
            return p is not None and lo <= p < hi
        return in_range
    if kind == "metadata":
        return _metadata_envoy(w.mapping(d, kind, path), kp)
    raise _unsupported(kp, kind)


def _principal_envoy(d: Any, path: str) -> Matcher:
    w.check_keys(d, _PRIN_KEYS, path)
    kind = w.one_of(d, _PRIN_KEYS, path)
    kp = w.join(path, kind)
    if kind == "any":
        if not w.boolean(d, "any", path):
            raise ConfigError(kp, "must be true")
        return _always
    if kind in ("and_ids", "or_ids"):
        s = w.check_keys(w.mapping(d, kind, path), ("ids",), kp)
        fns = [_principal_envoy(x, w.join(w.join(kp, "ids"), i))
               for i, x in enumerate(w.seq(s, "ids", kp))]
        if not fns:
            raise ConfigError(w.join(kp, "ids"), "needs at least one id")
        return _all_of(fns) if kind == "and_ids" else _any_of(fns)
    if kind == "not_id":
        inner = _principal_envoy(w.mapping(d, kind, path), kp)
        return lambda req: not inner(req)
    if kind == "authenticated":
        a = w.check_keys(w.mapping(d, kind, path, {}), ("principal_name",), kp)
        if a.get("principal_name") is None:
            return lambda req: req.ctx.peer_identity is not None
        sm = string_matcher_from_envoy(w.mapping(a, "principal_name", kp),
                                       w.join(kp, "principal_name"))
        m = sm.matches
        return lambda req: req.ctx.peer_identity is not None and m(req.ctx.peer_identity)
    if kind in ("source_ip", "direct_remote_ip"):
        return _ip_in(_cidr(w.mapping(d, kind, path), kp), _direct_ip)
    if kind == "remote_ip":
        return _ip_in(_cidr(w.mapping(d, kind, path), kp), _remote_ip)
    if kind == "header":
        return header_matcher_from_envoy(w.mapping(d, kind, path), kp)
    if kind == "url_path":
        return _url_path_envoy(w.mapping(d, kind, path), kp)
    if kind == "metadata":
        return _metadata_envoy(w.mapping(d, kind, path), kp)
    raise _unsupported(kp, kind)


# ---- native permission / principal ----------------------------------------------------------

_NPERM_KEYS = ("any", "path", "method", "methods", "host", "header", "port", "and", "or", "not")
_NPRIN_KEYS = ("any", "claim", "peer", "authenticated", "source_ip", "remote_ip", "header",
               "and", "or", "not")


def _list_of(d: dict, key: str, path: str, fn) -> list[Matcher]:
    kp = w.join(path, key)
    items = w.seq(d, key, path)
    if not items:
        raise ConfigError(kp, "needs at least one entry")
    return [fn(x, w.join(kp, i)) for i, x in enumerate(items)]


def _single_key(d: Any, keys: tuple[str, ...], path: str) -> str:
    w.check_keys(d, keys, path)
    if len(d) != 1:
        raise ConfigError(path, f"must have exactly one of {', '.join(keys)}")
    return next(iter(d))


def _permission_native(d: Any, path: str) -> Matcher:
    kind = _single_key(d, _NPERM_KEYS, path)
    kp = w.join(path, kind)
    v = d[kind]
    if kind == "any":
        if v is not True:
            raise ConfigError(kp, "must be true")
        return _always
    if kind == "path":
        m = string_matcher_from_native(v, kp).matches
        return lambda req: m(req.path)
    if kind in ("method", "methods"):
        ms = [v] if isinstance(v, str) else v
        if not isinstance(ms, list) or not ms or not all(isinstance(x, str) and x.isalpha()
                                                         for x in ms):
            raise ConfigError(kp, "must be an HTTP method or a list of them")
        allowed = frozenset(x.upper() for x in ms)
        return lambda req: req.method in allowed
    if kind == "host":
        sm = string_matcher_from_native(v, kp)
        if sm.exact is not None or sm.prefix is not None or sm.suffix is not None \
                or sm.contains is not None:
            sm = StringMatcher(exact=sm.exact.lower() if sm.exact is not None else None,
                               prefix=sm.prefix.lower() if sm.prefix is not None else None,
                               suffix=sm.suffix.lower() if sm.suffix is not None else None,
                               contains=sm.contains.lower() if sm.contains is not None else None,
                               ignore_case=True)
        m = sm.matches

        def host_match(req: Request) -> bool:
            h = req.headers.get("host")
            if h is None:
                return False
            if h.endswith("]") or ":" not in h:      # no port (or bare IPv6 literal)
                return m(h)
            return m(h) or m(h.rsplit(":", 1)[0])
        return host_match
    if kind == "header":
        return header_matcher_from_native(v, kp)
    if kind == "port":
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
            raise ConfigError(kp, "must be a port number")
        return lambda req: _local_port(req) == v
    if kind in ("and", "or"):
        fns = _list_of(d, kind, path, _permission_native)
        return _all_of(fns) if kind == "and" else _any_of(fns)
    inner = _permission_native(v, kp)
    return lambda req: not inner(req)


def _principal_native(d: Any, path: str) -> Matcher:
    kind = _single_key(d, _NPRIN_KEYS, path)
    kp = w.join(path, kind)
    v = d[kind]
    if kind == "any":
        if v is not True:
            raise ConfigError(kp, "must be true")
        return _always
    if kind == "claim":
        return _claim_native(v, kp)
    if kind in ("peer", "authenticated"):
        if v is True:
            return lambda req: req.ctx.peer_identity is not None
        m = string_matcher_from_native(v, kp).matches
        return lambda req: req.ctx.peer_identity is not None and m(req.ctx.peer_identity)
    if kind in ("source_ip", "remote_ip"):
        nets = [v] if isinstance(v, str) else v
        if not isinstance(nets, list) or not nets:
            raise ConfigError(kp, "must be a CIDR or a list of CIDRs")
        getter = _direct_ip if kind == "source_ip" else _remote_ip
        return _any_of([_ip_in(_cidr_native(n, w.join(kp, i) if isinstance(v, list) else kp),
                               getter) for i, n in enumerate(nets)])
    if kind == "header":
        return header_matcher_from_native(v, kp)
    if kind in ("and", "or"):
        fns = _list_of(d, kind, path, _principal_native)
        return _all_of(fns) if kind == "and" else _any_of(fns)
    inner = _principal_native(v, kp)
    return lambda req: not inner(req)


# =============================================================================================
# config model
# =============================================================================================

@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    name: str
    permission: Matcher     # any of the permissions
    principal: Matcher      # any of the principals

    def matches(self, req: Request) -> bool:
        return self.permission(req) and self.principal(req)


@dataclass(frozen=True, slots=True, eq=False)
class Engine:
    action: str                         # ALLOW | DENY | LOG
    policies: tuple[Policy, ...]

    def evaluate(self, req: Request) -> tuple[bool, str | None]:
        """(allowed, matched policy name or None)."""
        for p in self.policies:
            if p.matches(req):
                return self.action != "DENY", p.name
        return self.action != "ALLOW", None


@dataclass(frozen=True, slots=True, eq=False)
class RbacConfig:
    rules: Engine | None = None
    shadow: Engine | None = None
    stat_prefix: str = ""
    shadow_stat_prefix: str = ""


def _policies(d: dict, path: str, envoy: bool) -> tuple[Policy, ...]:
    out = []
    pp = w.join(path, "policies")
    for name, pol in w.mapping(d, "policies", path, {}).items():
        p = w.join(pp, name)
        if envoy:
            w.check_keys(pol, ("permissions", "principals", "condition", "checked_condition"), p)
            for k in ("condition", "checked_condition"):
                if pol.get(k) is not None:
                    raise _unsupported(w.join(p, k), "CEL " + k)
            perm_fn, prin_fn = _permission_envoy, _principal_envoy
        else:
            w.check_keys(pol, ("permissions", "principals"), p)
            perm_fn, prin_fn = _permission_native, _principal_native
        perms = _list_of(pol, "permissions", p, perm_fn)
        prins = _list_of(pol, "principals", p, prin_fn)
        out.append(Policy(name=str(name), permission=_any_of(perms), principal=_any_of(prins)))
    return tuple(out)


def _engine_envoy(d: Any, path: str) -> Engine:
    w.check_keys(d, ("action", "policies", "audit_logging_options"), path)
    if d.get("audit_logging_options") is not None:
        raise _unsupported(w.join(path, "audit_logging_options"), "audit_logging_options")
    action = w.string(d, "action", path, "ALLOW", choices=ACTIONS)
    return Engine(action=action, policies=_policies(d, path, envoy=True))


def _engine_native(d: Any, path: str) -> Engine:
    w.check_keys(d, ("action", "policies"), path)
    action = w.string(d, "action", path, "ALLOW")
    if action.upper() not in ACTIONS:
        raise ConfigError(w.join(path, "action"), f"must be one of {', '.join(ACTIONS)}")
    return Engine(action=action.upper(), policies=_policies(d, path, envoy=False))


def from_envoy(d: dict, path: str) -> RbacConfig:
    w.check_keys(d, ("rules", "matcher", "shadow_rules", "shadow_matcher",
                     "shadow_rules_stat_prefix", "rules_stat_prefix", "track_per_rule_stats"),
                 path)
    for k in ("matcher", "shadow_matcher"):
        if d.get(k) is not None:
            raise _unsupported(w.join(path, k), f"the xDS matcher API ({k})")
    w.boolean(d, "track_per_rule_stats", path, False)   # per-policy metrics are always kept
    rules = d.get("rules")
    shadow = d.get("shadow_rules")
    return RbacConfig(
        rules=_engine_envoy(rules, w.join(path, "rules")) if rules is not None else None,
        shadow=_engine_envoy(shadow, w.join(path, "shadow_rules")) if shadow is not None else None,
        stat_prefix=w.string(d, "rules_stat_prefix", path, ""),
        shadow_stat_prefix=w.string(d, "shadow_rules_stat_prefix", path, ""))


def from_native(d: dict, path: str) -> RbacConfig:
    """Native: the engine inline (``action``, ``policies``) plus optional ``shadow`` engine."""
    w.check_keys(d, ("action", "policies", "shadow", "stat_prefix"), path)
    rules = None
    if "action" in d or "policies" in d:
        rules = _engine_native({k: d[k] for k in ("action", "policies") if k in d}, path)
    shadow = d.get("shadow")
    return RbacConfig(
        rules=rules,
        shadow=_engine_native(shadow, w.join(path, "shadow")) if shadow is not None else None,
        stat_prefix=w.string(d, "stat_prefix", path, ""))


def per_route_from_envoy(d: dict, path: str) -> RbacConfig | None:
    """``RBACPerRoute{rbac}``; without ``rbac`` the filter is disabled on the route."""
    w.check_keys(d, ("rbac",), path)
    if d.get("rbac") is None:
        return RbacConfig()
    return from_envoy(w.mapping(d, "rbac", path), w.join(path, "rbac"))


def per_route_from_native(d: Any, path: str) -> RbacConfig:
    """``{disabled: true}`` or a whole native RBAC config replacing the listener's."""
    if isinstance(d, dict) and set(d) == {"disabled"}:
        if w.boolean(d, "disabled", path) is not True:
            raise ConfigError(w.join(path, "disabled"), "must be true (omit to keep the filter)")
        return RbacConfig()
    if not isinstance(d, dict):
        raise ConfigError(path, "must be a mapping")
    return from_native(d, path)


# =============================================================================================
# the filter
# =============================================================================================

class _Counters:
    """Pre-bound metric children for one engine."""

    __slots__ = ("allowed", "denied", "policy")

    def __init__(self, metrics: Any, engine: Engine, mode: str, prefix: str):
        dec = metrics.counter("sidecar_rbac_decisions_total",
                              "RBAC decisions by mode (enforced|shadow) and result",
                              ("stat_prefix", "mode", "result"))
        pol = metrics.counter("sidecar_rbac_policy_matches_total",
                              "Requests matched by each RBAC policy",
                              ("stat_prefix", "mode", "policy"))
        self.allowed = dec.labels(prefix, mode, "allowed")
        self.denied = dec.labels(prefix, mode, "denied")
        self.policy = {p.name: pol.labels(prefix, mode, p.name) for p in engine.policies}


class RbacFilter(Filter):
    __slots__ = ("rules", "shadow", "_c", "_sc")

    def __init__(self, cfg: RbacConfig, metrics: Any):
        self.rules = cfg.rules
        self.shadow = cfg.shadow
        self._c = _Counters(metrics, cfg.rules, "enforced", cfg.stat_prefix) if cfg.rules else None
        self._sc = (_Counters(metrics, cfg.shadow, "shadow", cfg.shadow_stat_prefix)
                    if cfg.shadow else None)

    async def __call__(self, req: Request, next) -> Response:
        if self.shadow is not None:
            ok, name = self.shadow.evaluate(req)
            c = self._sc
            (c.allowed if ok else c.denied).inc()
            if name is not None:
                c.policy[name].inc()
            info = req.ctx.metadata.setdefault(METADATA_NAMESPACE, {})
            info["shadow_engine_result"] = "allowed" if ok else "denied"
            if name is not None:
                info["shadow_effective_policy_id"] = name
        if self.rules is not None:
            ok, name = self.rules.evaluate(req)
            c = self._c
            if name is not None:
                c.policy[name].inc()
                if self.rules.action == "LOG":
                    req.ctx.metadata.setdefault(METADATA_NAMESPACE, {})["log_policy_id"] = name
            if not ok:
                c.denied.inc()
                req.ctx.response_code_details = (
                    f"rbac_access_denied_matched_policy[{name or 'none'}]")
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("rbac denied %s %s (policy %s)", req.method, req.path, name)
                return local_reply(req.ctx, 403, DENIED_BODY, FLAG, MultiDict())
            c.allowed.inc()
        return await next(req)


def build(config: RbacConfig, per_route: RbacConfig | None, state: None, env: FilterEnv,
          route: RouteInfo) -> RbacFilter | None:
    cfg = per_route if per_route is not None else config
    if cfg.rules is None and cfg.shadow is None:
        return None
    return RbacFilter(cfg, env.metrics)


SPEC = FilterSpec(
    name="envoy.filters.http.rbac",
    short="rbac",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=no_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=per_route_from_envoy,
    per_route_from_native=per_route_from_native,
)
