"""jwt_authn from Envoy v3: ``envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication`` and
``PerRouteConfig``. Fields this proxy cannot honour are refused by name (docs/security.md)."""

from __future__ import annotations

import base64
import binascii
import os
import re

from filters.jwt_authn.config import (
    JwtAuthnConfig,
    PerRoute,
    Provider,
    RemoteJwks,
    ReqAll,
    ReqAllowMissing,
    ReqAllowMissingOrFailed,
    ReqAny,
    ReqProvider,
    Requirement,
    Rule,
    RuleMatch,
    TokenLocation,
)
from filters.jwt_authn.parsing import (
    claim_path,
    header_name,
    http_url,
    keys_or_error,
    known,
    read_file,
    str_list,
)
from filters.request_headers import request_header_test
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.matchers import header_matcher_from_envoy, string_matcher_from_envoy

_PROVIDER_KEYS = (
    "issuer", "audiences", "subjects", "require_expiration", "max_lifetime", "remote_jwks",
    "local_jwks", "forward", "from_headers", "from_params", "from_cookies",
    "forward_payload_header", "pad_forward_payload_header", "payload_in_metadata",
    "normalize_payload_in_metadata", "header_in_metadata", "failed_status_in_metadata",
    "clock_skew_seconds", "jwt_cache_config", "claim_to_headers", "clear_route_cache")
_REQUIREMENT_KINDS = ("provider_name", "provider_and_audiences", "requires_any", "requires_all",
                      "allow_missing_or_failed", "allow_missing")
_RULE_MATCH_UNSUPPORTED = ("connect_matcher", "query_parameters", "grpc", "runtime_fraction",
                           "dynamic_metadata", "path_match_policy", "filter_state", "cel_expr")


def _data_source(raw: object, path: str) -> bytes:
    """``envoy.config.core.v3.DataSource``."""
    d = w.check_keys(raw, ("filename", "inline_string", "inline_bytes", "environment_variable",
                           "watched_directory"), path)
    if d.get("watched_directory") is not None:
        raise ConfigError(w.join(path, "watched_directory"), "is not supported")
    kind = w.one_of(d, ("filename", "inline_string", "inline_bytes", "environment_variable"), path)
    assert kind is not None
    v = w.string(d, kind, path)
    if kind == "inline_string":
        return v.encode()
    if kind == "inline_bytes":
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(w.join(path, kind), "must be base64") from None
    if kind == "environment_variable":
        val = os.environ.get(v)
        if val is None:
            raise ConfigError(w.join(path, kind), f"environment variable {v} is not set")
        return val.encode()
    return read_file(v, w.join(path, kind))


def _remote(raw: object, path: str) -> RemoteJwks:
    d = w.check_keys(raw, ("http_uri", "cache_duration", "async_fetch", "retry_policy"), path)
    hp = w.join(path, "http_uri")
    h = w.check_keys(w.mapping(d, "http_uri", path), ("uri", "cluster", "timeout"), hp)
    cache_s = w.duration(d, "cache_duration", path, 600.0)
    if cache_s <= 0:
        raise ConfigError(w.join(path, "cache_duration"), "must be positive")
    fetch_at_start = False
    failed_refetch_s = 1.0
    if d.get("async_fetch") is not None:
        ap = w.join(path, "async_fetch")
        a = w.check_keys(w.mapping(d, "async_fetch", path), ("fast_listener",
                                                             "failed_refetch_duration"), ap)
        w.boolean(a, "fast_listener", ap, False)   # we never hold the listener: always "fast"
        fetch_at_start = True
        failed_refetch_s = w.duration(a, "failed_refetch_duration", ap, 1.0)
    retries, base_s, max_s = 0, 0.1, 1.0
    if d.get("retry_policy") is not None:
        rp = w.join(path, "retry_policy")
        r = w.check_keys(w.mapping(d, "retry_policy", path), ("num_retries", "retry_back_off"), rp)
        retries = w.integer(r, "num_retries", rp, 1, lo=0, hi=10)
        if r.get("retry_back_off") is not None:
            bp = w.join(rp, "retry_back_off")
            b = w.check_keys(w.mapping(r, "retry_back_off", rp), ("base_interval", "max_interval"), bp)
            base_s = w.duration(b, "base_interval", bp, 1.0)
            max_s = w.duration(b, "max_interval", bp, 10 * base_s)
    return RemoteJwks(
        uri=http_url(w.string(h, "uri", hp, nonempty=True), w.join(hp, "uri")),
        cluster=w.string(h, "cluster", hp, nonempty=True), cluster_path=w.join(hp, "cluster"),
        timeout_s=w.duration(h, "timeout", hp, 1.0), cache_duration_s=cache_s,
        fetch_at_start=fetch_at_start, failed_refetch_s=failed_refetch_s,
        num_retries=retries, retry_base_s=base_s, retry_max_s=max_s)


def _locations(d: dict[str, object], path: str) -> tuple[TokenLocation, ...]:
    locs: list[TokenLocation] = []
    fh = w.join(path, "from_headers")
    for i, item in enumerate(w.seq(d, "from_headers", path, [])):
        p = w.join(fh, i)
        h = w.check_keys(item, ("name", "value_prefix"), p)
        locs.append(TokenLocation("header", header_name(w.string(h, "name", p), w.join(p, "name")),
                                  w.string(h, "value_prefix", p, "")))
    locs += [TokenLocation("query", q) for q in str_list(d, "from_params", path)]
    locs += [TokenLocation("cookie", c) for c in str_list(d, "from_cookies", path)]
    return tuple(locs)


def _provider(name: str, raw: object, path: str) -> Provider:
    d = w.check_keys(raw, _PROVIDER_KEYS, path)
    if w.boolean(d, "clear_route_cache", path, False):
        raise ConfigError(w.join(path, "clear_route_cache"),
                          "re-routing on JWT claims is not supported (routes are chosen before "
                          "filters run)")
    if d.get("normalize_payload_in_metadata"):
        raise ConfigError(w.join(path, "normalize_payload_in_metadata"), "is not supported")
    p = Provider(name=name, issuer=w.string(d, "issuer", path, ""),
                 audiences=str_list(d, "audiences", path))
    subjects = None
    if d.get("subjects") is not None:
        subjects = string_matcher_from_envoy(w.mapping(d, "subjects", path),
                                             w.join(path, "subjects"))
    max_lifetime = w.duration(d, "max_lifetime", path) if d.get("max_lifetime") is not None else None
    src = w.one_of(d, ("remote_jwks", "local_jwks"), path)
    assert src is not None
    sp = w.join(path, src)
    remote, local = None, None
    if src == "remote_jwks":
        remote = _remote(w.mapping(d, src, path), sp)
    else:
        local = keys_or_error(_data_source(w.mapping(d, src, path), sp), sp)
    cache_size, cache_max = p.cache_size, p.cache_max_token_bytes
    if d.get("jwt_cache_config") is not None:
        cp = w.join(path, "jwt_cache_config")
        c = w.check_keys(w.mapping(d, "jwt_cache_config", path), ("jwt_cache_size",
                                                                  "jwt_max_token_size"), cp)
        cache_size = w.integer(c, "jwt_cache_size", cp, 100, lo=0)
        cache_max = w.integer(c, "jwt_max_token_size", cp, 4096, lo=0)
    cth = []
    cp = w.join(path, "claim_to_headers")
    for i, item in enumerate(w.seq(d, "claim_to_headers", path, [])):
        ip = w.join(cp, i)
        c = w.check_keys(item, ("header_name", "claim_name"), ip)
        cth.append((header_name(w.string(c, "header_name", ip), w.join(ip, "header_name")),
                    claim_path(w.string(c, "claim_name", ip, nonempty=True),
                               w.join(ip, "claim_name"))))
    fph = w.string(d, "forward_payload_header", path, "")
    return Provider(
        name=name, issuer=p.issuer, audiences=p.audiences,
        locations=_locations(d, path) or p.locations,
        local_digest=local.digest if local is not None else "", local_keys=local, remote=remote,
        forward=w.boolean(d, "forward", path, False),
        forward_payload_header=(header_name(fph, w.join(path, "forward_payload_header"))
                                if fph else ""),
        pad_forward_payload_header=w.boolean(d, "pad_forward_payload_header", path, False),
        claim_to_headers=tuple(cth),
        payload_in_metadata=w.string(d, "payload_in_metadata", path, ""),
        header_in_metadata=w.string(d, "header_in_metadata", path, ""),
        failed_status_in_metadata=w.string(d, "failed_status_in_metadata", path, ""),
        clock_skew_s=float(w.integer(d, "clock_skew_seconds", path, 60, lo=0)),
        max_lifetime_s=max_lifetime,
        require_expiration=w.boolean(d, "require_expiration", path, False),
        subjects=subjects, cache_size=cache_size, cache_max_token_bytes=cache_max)


def _requirement(raw: object, path: str, names: set[str]) -> Requirement:
    d = w.check_keys(raw, _REQUIREMENT_KINDS, path)
    kind = w.one_of(d, _REQUIREMENT_KINDS, path)
    assert kind is not None
    kp = w.join(path, kind)
    if kind == "provider_name":
        n = w.string(d, kind, path, nonempty=True)
        known(n, names, kp)
        return ReqProvider(n)
    if kind == "provider_and_audiences":
        x = w.check_keys(w.mapping(d, kind, path), ("provider_name", "audiences"), kp)
        n = w.string(x, "provider_name", kp, nonempty=True)
        known(n, names, w.join(kp, "provider_name"))
        return ReqProvider(n, str_list(x, "audiences", kp))
    if kind in ("requires_any", "requires_all"):
        x = w.check_keys(w.mapping(d, kind, path), ("requirements",), kp)
        rp = w.join(kp, "requirements")
        reqs = tuple(_requirement(r, w.join(rp, i), names)
                     for i, r in enumerate(w.seq(x, "requirements", kp)))
        if len(reqs) < 2:
            raise ConfigError(rp, "needs at least two requirements")
        return ReqAny(reqs) if kind == "requires_any" else ReqAll(reqs)
    w.check_keys(d[kind] if isinstance(d[kind], dict) else {}, (), kp)
    return ReqAllowMissing() if kind == "allow_missing" else ReqAllowMissingOrFailed()


def _rule_match(raw: object, path: str) -> RuleMatch:
    d = w.check_keys(raw, ("prefix", "path", "safe_regex", "path_separated_prefix",
                           "case_sensitive", "headers", *_RULE_MATCH_UNSUPPORTED), path)
    for k in _RULE_MATCH_UNSUPPORTED:
        if d.get(k) is not None:
            raise ConfigError(w.join(path, k), "is not supported in jwt_authn rules")
    kind = w.one_of(d, ("prefix", "path", "safe_regex", "path_separated_prefix"), path)
    assert kind is not None
    cs = w.boolean(d, "case_sensitive", path, True)
    hp = w.join(path, "headers")
    headers = tuple(request_header_test(header_matcher_from_envoy(h, w.join(hp, i)))
                    for i, h in enumerate(w.seq(d, "headers", path, [])))
    if kind == "safe_regex":
        rp = w.join(path, "safe_regex")
        r = w.check_keys(w.mapping(d, kind, path), ("regex", "google_re2"), rp)
        w.google_re2(r, rp)
        rx = w.compile_regex(w.string(r, "regex", rp), w.join(rp, "regex"),
                             0 if cs else re.IGNORECASE)
        return RuleMatch("regex", regex=rx, case_sensitive=True, headers=headers)
    v = w.string(d, kind, path)
    if kind == "path_separated_prefix":
        if not v.startswith("/") or (v.endswith("/") and v != "/"):
            raise ConfigError(w.join(path, kind), "must start with / and not end with /")
    return RuleMatch(kind, v if cs else v.lower(), case_sensitive=cs, headers=headers)


def from_envoy(raw: object, path: str) -> JwtAuthnConfig:
    d = w.check_keys(raw, ("providers", "rules", "filter_state_rules", "bypass_cors_preflight",
                           "requirement_map", "stat_prefix", "strip_failure_response"), path)
    if d.get("filter_state_rules") is not None:
        raise ConfigError(w.join(path, "filter_state_rules"), "is not supported")
    pp = w.join(path, "providers")
    providers = tuple(_provider(str(n), p, w.join(pp, str(n)))
                      for n, p in w.mapping(d, "providers", path, {}).items())
    names = {p.name for p in providers}
    rmap: dict[str, Requirement] = {}
    mp = w.join(path, "requirement_map")
    for n, r in w.mapping(d, "requirement_map", path, {}).items():
        rmap[str(n)] = _requirement(r, w.join(mp, str(n)), names)
    rules = []
    rp = w.join(path, "rules")
    for i, item in enumerate(w.seq(d, "rules", path, [])):
        p = w.join(rp, i)
        r = w.check_keys(item, ("match", "requires", "requirement_name"), p)
        if r.get("requires") is not None and r.get("requirement_name") is not None:
            raise ConfigError(p, "only one of requires, requirement_name may be set")
        m = _rule_match(w.mapping(r, "match", p), w.join(p, "match"))
        req = None
        if r.get("requires") is not None:
            req = _requirement(w.mapping(r, "requires", p), w.join(p, "requires"), names)
        elif r.get("requirement_name") is not None:
            n = w.string(r, "requirement_name", p)
            req = rmap.get(n)
            if req is None:
                raise ConfigError(w.join(p, "requirement_name"), f"not in requirement_map: {n!r}")
        rules.append(Rule(m, req))
    return JwtAuthnConfig(
        providers=providers, rules=tuple(rules), requirement_map=tuple(rmap.items()),
        bypass_cors_preflight=w.boolean(d, "bypass_cors_preflight", path, False),
        strip_failure_response=w.boolean(d, "strip_failure_response", path, False),
        stat_prefix=w.string(d, "stat_prefix", path, ""))


def per_route_from_envoy(raw: object, path: str) -> PerRoute:
    d = w.check_keys(raw, ("disabled", "requirement_name"), path)
    kind = w.one_of(d, ("disabled", "requirement_name"), path)
    assert kind is not None
    if kind == "disabled":
        if not w.boolean(d, "disabled", path):
            raise ConfigError(w.join(path, "disabled"), "must be true")
        return PerRoute(disabled=True)
    return PerRoute(requirement_name=w.string(d, kind, path, nonempty=True))
