"""jwt_authn from native YAML (docs/security.md, "Native config")::

    jwt_authn:
      providers:
        idp: {issuer: ..., audiences: [...], jwks_uri: https://idp/jwks.json}
      rules:
        - match: {prefix: /api}
          requires: idp

A native ``jwks_uri`` is fetched from the URI directly (no cluster); Envoy configs name a
cluster (``remote_jwks.http_uri.cluster``) and are fetched through it.
"""

from __future__ import annotations

import os
import re

from filters.jwt_authn.config import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_MAX_TOKEN_BYTES,
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
from filters.jwt_authn.keys import KeySet, secret_key_set
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
from sidecar.config.matchers import header_matcher_from_native, string_matcher_from_native
from sidecar.core.limits import FailurePolicy

_PROVIDER_KEYS = (
    "issuer", "audiences", "jwks", "jwks_file", "jwks_uri", "secret", "secret_file",
    "secret_env", "kid", "jwks_cache_duration", "jwks_fetch_timeout", "jwks_fetch_at_start",
    "jwks_kid_refetch_interval", "jwks_failed_refetch", "jwks_retries", "from", "forward",
    "payload_header", "pad_payload_header", "claims_to_headers", "payload_key",
    "clock_skew", "max_lifetime", "require_expiration", "required_claims", "subject",
    "cache_size", "replay_protection", "max_token_size")
_KEY_SOURCES = ("jwks", "jwks_file", "jwks_uri", "secret", "secret_file", "secret_env")
_REMOTE_ONLY = ("jwks_cache_duration", "jwks_fetch_timeout", "jwks_fetch_at_start",
                "jwks_kid_refetch_interval", "jwks_failed_refetch", "jwks_retries")
_RESERVED = ("allow_missing", "allow_missing_or_failed")


def _secret(d: dict[str, object], path: str) -> bytes:
    kind = w.one_of(d, ("secret", "secret_file", "secret_env"), path)
    assert kind is not None
    v = w.string(d, kind, path, nonempty=True)
    if kind == "secret":
        return v.encode()
    if kind == "secret_env":
        val = os.environ.get(v)
        if val is None:
            raise ConfigError(w.join(path, kind), f"environment variable {v} is not set")
        return val.encode()
    return read_file(v, w.join(path, kind)).strip()


def _keys(d: dict[str, object], src: str, path: str) -> tuple[KeySet | None, RemoteJwks | None]:
    """The provider's key source: local keys, or a remote JWKS."""
    sp = w.join(path, src)
    if src != "jwks_uri":
        for k in _REMOTE_ONLY:
            if k in d:
                raise ConfigError(w.join(path, k), "only applies with jwks_uri")
    if "kid" in d and not src.startswith("secret"):
        raise ConfigError(w.join(path, "kid"), "only applies with a secret")
    if src == "jwks":
        v = d[src]
        if isinstance(v, dict):
            return keys_or_error(v, sp), None
        if isinstance(v, str):
            return keys_or_error(v.encode(), sp), None
        raise ConfigError(sp, "must be a JWKS mapping or a JWKS/PEM string")
    if src == "jwks_file":
        return keys_or_error(read_file(w.string(d, src, path, nonempty=True), sp), sp), None
    if src == "jwks_uri":
        remote = RemoteJwks(
            uri=http_url(w.string(d, src, path), sp),
            timeout_s=w.duration(d, "jwks_fetch_timeout", path, 1.0),
            cache_duration_s=w.duration(d, "jwks_cache_duration", path, 600.0),
            fetch_at_start=w.boolean(d, "jwks_fetch_at_start", path, True),
            kid_refetch_interval_s=w.duration(d, "jwks_kid_refetch_interval", path, 30.0),
            failed_refetch_s=w.duration(d, "jwks_failed_refetch", path, 1.0),
            num_retries=w.integer(d, "jwks_retries", path, 0, lo=0, hi=10))
        if remote.cache_duration_s <= 0:
            raise ConfigError(w.join(path, "jwks_cache_duration"), "must be positive")
        return None, remote
    try:
        return secret_key_set(_secret(d, path), w.string(d, "kid", path, None)), None
    except ValueError as e:
        raise ConfigError(sp, str(e)) from None


def _locations(d: dict[str, object], path: str) -> tuple[TokenLocation, ...]:
    locs = []
    fp = w.join(path, "from")
    items = w.seq(d, "from", path)
    if not items:
        raise ConfigError(fp, "needs at least one location")
    for i, item in enumerate(items):
        p = w.join(fp, i)
        x = w.check_keys(item, ("header", "prefix", "query", "cookie"), p)
        kind = w.one_of(x, ("header", "query", "cookie"), p)
        assert kind is not None
        if kind != "header" and "prefix" in x:
            raise ConfigError(w.join(p, "prefix"), "only applies to header")
        nm = w.string(x, kind, p, nonempty=True)
        if kind == "header":
            locs.append(TokenLocation("header", header_name(nm, w.join(p, kind)),
                                      w.string(x, "prefix", p, "")))
        else:
            locs.append(TokenLocation(kind, nm))
    return tuple(locs)


def _replay(d: dict[str, object], path: str) -> tuple[bool, str, FailurePolicy]:
    """``replay_protection: true`` or ``{enabled, store, on_store_error}`` -> (on, store,
    policy). The cache is the sidecar's (every worker; sized by ``shared_state.replay_entries``)
    or, with ``store``, a Redis store's (every replica)."""
    rp = d.get("replay_protection")
    closed = FailurePolicy.FAIL_CLOSED
    if rp is None:
        return False, "", closed
    if isinstance(rp, bool):
        return rp, "", closed
    p = w.join(path, "replay_protection")
    if not isinstance(rp, dict):
        raise ConfigError(p, "must be true/false or a mapping")
    x = w.check_keys(rp, ("enabled", "max_entries", "store", "on_store_error"), p)
    if "max_entries" in x:
        raise ConfigError(w.join(p, "max_entries"),
                          "the replay cache is the sidecar's, shared by every provider and "
                          "worker: size it with shared_state.replay_entries")
    store = w.string(x, "store", p, "")
    if "on_store_error" in x and not store:
        raise ConfigError(w.join(p, "on_store_error"), "needs store")
    policy = FailurePolicy(w.string(x, "on_store_error", p, closed.value,
                                    choices=tuple(v.value for v in FailurePolicy)))
    return w.boolean(x, "enabled", p, True), store, policy


def _provider(name: str, raw: object, path: str) -> Provider:
    if name in _RESERVED:
        raise ConfigError(path, f"{name!r} is reserved for requirements; pick another name")
    d = w.check_keys(raw, _PROVIDER_KEYS, path)
    issuer, audiences = w.string(d, "issuer", path, ""), str_list(d, "audiences", path)
    src = w.one_of(d, _KEY_SOURCES, path)
    assert src is not None
    local, remote = _keys(d, src, path)
    locations = _locations(d, path) if "from" in d else Provider(name).locations
    ph = w.string(d, "payload_header", path, "")
    cth = []
    cp = w.join(path, "claims_to_headers")
    for h, c in w.mapping(d, "claims_to_headers", path, {}).items():
        p = w.join(cp, str(h))
        if not isinstance(c, str) or not c:
            raise ConfigError(p, "must be a claim name")
        cth.append((header_name(str(h), p), claim_path(c, p)))
    max_token = w.integer(d, "max_token_size", path, DEFAULT_MAX_TOKEN_BYTES, lo=64, hi=65536)
    jti_replay, replay_store, replay_policy = _replay(d, path)
    return Provider(
        name=name, issuer=issuer, audiences=audiences, locations=locations,
        local_digest=local.digest if local is not None else "", local_keys=local, remote=remote,
        forward=w.boolean(d, "forward", path, False),
        forward_payload_header=header_name(ph, w.join(path, "payload_header")) if ph else "",
        pad_forward_payload_header=w.boolean(d, "pad_payload_header", path, False),
        claim_to_headers=tuple(cth),
        payload_in_metadata=w.string(d, "payload_key", path, ""),
        clock_skew_s=w.duration(d, "clock_skew", path, 60.0),
        max_lifetime_s=w.duration(d, "max_lifetime", path) if "max_lifetime" in d else None,
        require_expiration=w.boolean(d, "require_expiration", path, True),
        required_claims=str_list(d, "required_claims", path),
        subjects=(string_matcher_from_native(d["subject"], w.join(path, "subject"))
                  if "subject" in d else None),
        cache_size=w.integer(d, "cache_size", path, DEFAULT_CACHE_SIZE, lo=0),
        max_token_bytes=max_token, cache_max_token_bytes=max_token,
        jti_replay=jti_replay, replay_store=replay_store, replay_on_store_error=replay_policy)


def _requirement(v: object, path: str, names: set[str] | None) -> Requirement:
    """``name`` | ``allow_missing`` | ``allow_missing_or_failed`` | ``{any: [...]}`` |
    ``{all: [...]}`` | ``{provider: name, audiences: [...]}``. ``names`` None: provider names
    are checked when the route is built (a per-route requirement)."""
    if isinstance(v, str):
        if v == "allow_missing":
            return ReqAllowMissing()
        if v == "allow_missing_or_failed":
            return ReqAllowMissingOrFailed()
        known(v, names, path)
        return ReqProvider(v)
    if not isinstance(v, dict):
        raise ConfigError(path, "must be a provider name, allow_missing, allow_missing_or_failed, "
                                "or a mapping with any/all/provider")
    d = w.check_keys(v, ("any", "all", "provider", "audiences"), path)
    kind = w.one_of(d, ("any", "all", "provider"), path)
    assert kind is not None
    if kind == "provider":
        n = w.string(d, "provider", path, nonempty=True)
        known(n, names, w.join(path, "provider"))
        return ReqProvider(n, str_list(d, "audiences", path) if "audiences" in d else None)
    if "audiences" in d:
        raise ConfigError(w.join(path, "audiences"), "only applies with provider")
    kp = w.join(path, kind)
    reqs = tuple(_requirement(x, w.join(kp, i), names) for i, x in enumerate(w.seq(d, kind, path)))
    if not reqs:
        raise ConfigError(kp, "needs at least one requirement")
    if len(reqs) == 1:
        return reqs[0]
    return ReqAny(reqs) if kind == "any" else ReqAll(reqs)


def _rule_match(raw: object, path: str) -> RuleMatch:
    d = w.check_keys(raw, ("prefix", "path", "regex", "path_separated_prefix", "case_sensitive",
                           "headers"), path)
    kind = w.one_of(d, ("prefix", "path", "regex", "path_separated_prefix"), path, required=False)
    cs = w.boolean(d, "case_sensitive", path, True)
    hp = w.join(path, "headers")
    headers = tuple(request_header_test(header_matcher_from_native(h, w.join(hp, i)))
                    for i, h in enumerate(w.seq(d, "headers", path, [])))
    if kind is None:
        return RuleMatch("prefix", "/", headers=headers)
    if kind == "regex":
        rx = w.compile_regex(d["regex"], w.join(path, "regex"), 0 if cs else re.IGNORECASE)
        return RuleMatch("regex", regex=rx, headers=headers)
    v = w.string(d, kind, path)
    if not v.startswith("/"):
        raise ConfigError(w.join(path, kind), "must start with /")
    return RuleMatch(kind, v if cs else v.lower(), case_sensitive=cs, headers=headers)


def from_native(raw: object, path: str) -> JwtAuthnConfig:
    d = w.check_keys(raw, ("providers", "rules", "requirements", "bypass_cors_preflight",
                           "strip_failure_response"), path)
    pp = w.join(path, "providers")
    pmap = w.mapping(d, "providers", path)
    if not pmap:
        raise ConfigError(pp, "needs at least one provider")
    providers = tuple(_provider(str(n), p, w.join(pp, str(n))) for n, p in pmap.items())
    names = {p.name for p in providers}
    rmap: dict[str, Requirement] = {}
    mp = w.join(path, "requirements")
    for n, r in w.mapping(d, "requirements", path, {}).items():
        rmap[str(n)] = _requirement(r, w.join(mp, str(n)), names)
    rules = []
    rp = w.join(path, "rules")
    for i, item in enumerate(w.seq(d, "rules", path, [])):
        p = w.join(rp, i)
        r = w.check_keys(item, ("match", "requires", "requirement"), p)
        if r.get("requires") is not None and r.get("requirement") is not None:
            raise ConfigError(p, "only one of requires, requirement may be set")
        m = _rule_match(w.mapping(r, "match", p, {}), w.join(p, "match"))
        req = None
        if r.get("requires") is not None:
            req = _requirement(r["requires"], w.join(p, "requires"), names)
        elif r.get("requirement") is not None:
            n = w.string(r, "requirement", p)
            req = rmap.get(n)
            if req is None:
                raise ConfigError(w.join(p, "requirement"), f"not in requirements: {n!r}")
        rules.append(Rule(m, req))
    return JwtAuthnConfig(
        providers=providers, rules=tuple(rules), requirement_map=tuple(rmap.items()),
        bypass_cors_preflight=w.boolean(d, "bypass_cors_preflight", path, False),
        strip_failure_response=w.boolean(d, "strip_failure_response", path, False))


def per_route_from_native(raw: object, path: str) -> PerRoute:
    """``{disabled: true}`` | ``{requirement: <name in requirements>}`` | ``{requires: <req>}``.

    An inline ``requires`` is checked against the listener's providers when the route is built.
    """
    d = w.check_keys(raw, ("disabled", "requirement", "requires"), path)
    kind = w.one_of(d, ("disabled", "requirement", "requires"), path)
    if kind == "disabled":
        if not w.boolean(d, "disabled", path):
            raise ConfigError(w.join(path, "disabled"), "must be true")
        return PerRoute(disabled=True)
    if kind == "requirement":
        return PerRoute(requirement_name=w.string(d, kind, path, nonempty=True))
    return PerRoute(requires=_requirement(d["requires"], w.join(path, "requires"), None))
