"""Envoy v3 RouteConfiguration, VirtualHost, Route, RouteMatch, RouteAction and RetryPolicy ->
the route model."""

from __future__ import annotations

import re
from typing import Any

import filters as filter_registry
from control_plane_client.translate.common import _MUTATION_KEYS, header_mutation, runtime_fraction, typed
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.http2 import upgrade_configs_from_wire
from sidecar.config.matchers import QueryMatcher, header_matcher_from_envoy, string_matcher_from_envoy
from sidecar.config.ratelimit import rate_limits_from_wire
from sidecar.config.route import (
    DirectResponse,
    HashPolicy,
    MirrorPolicy,
    Redirect,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    StreamDuration,
    VirtualHost,
    WeightedCluster,
    _status_codes,
    parse_retry_on,
)


def per_filter_configs(d: dict | None, path: str) -> tuple[tuple[str, Any], ...]:
    """``typed_per_filter_config``: keyed by filter instance name. A canonical Envoy name
    picks its filter; any other name is a named instance (a user filter, a filter entry named
    freely), whose filter is found by the config's ``@type``."""
    out: list[tuple[str, Any]] = []
    for name, cfg in (d or {}).items():
        p = w.join(path, name)
        filter_config = isinstance(cfg, dict) and cfg.get("@type") == T_FILTER_CONFIG
        disabled = False
        if filter_config:
            fc = typed(cfg, p, T_FILTER_CONFIG)
            w.check_keys(fc, ("config", "disabled", "is_optional"), p)
            disabled = w.boolean(fc, "disabled", p, False)
            if not disabled:
                cfg = w.mapping(fc, "config", p)
                p = w.join(p, "config")
        spec = filter_registry.lookup(name)
        key = spec.name if spec is not None and spec.name_instance is None else name
        if disabled:
            out.append((key, None))
            continue
        if spec is None or spec.name_instance is not None:
            spec = filter_registry.by_type_url(cfg.get("@type") if isinstance(cfg, dict) else None)
        if spec is None or spec.per_route_from_envoy is None:
            raise ConfigError(p, f"per-route config for filter {name!r} is not supported")
        body = typed(cfg, p, (spec.per_route_type_url, spec.type_url))
        out.append((key, spec.per_route_from_envoy(body, p)))
    return tuple(out)


T_FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"


def route_match(d: dict, path: str) -> RouteMatch:
    w.check_keys(d, ("prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive",
                     "headers", "query_parameters", "runtime_fraction", "grpc"), path)
    if "grpc" in d:
        w.check_keys(d["grpc"] or {}, (), w.join(path, "grpc"))
    kind = w.one_of(d, ("prefix", "path", "safe_regex", "path_separated_prefix"), path)
    cs = w.boolean(d, "case_sensitive", path, True)
    headers, methods = [], []
    for i, h in enumerate(w.seq(d, "headers", path, [])):
        hm = header_matcher_from_envoy(h, w.join(w.join(path, "headers"), i))
        if (hm.name == ":method" and hm.value is not None and hm.value.exact is not None
                and not hm.invert):
            methods.append(hm.value.exact.upper())
        else:
            headers.append(hm)
    qps = []
    for i, q in enumerate(w.seq(d, "query_parameters", path, [])):
        qp = w.join(w.join(path, "query_parameters"), i)
        w.check_keys(q, ("name", "string_match", "present_match"), qp)
        if "string_match" in q:
            qps.append(QueryMatcher(name=w.string(q, "name", qp), value=string_matcher_from_envoy(q["string_match"], w.join(qp, "string_match"))))
        else:
            qps.append(QueryMatcher(name=w.string(q, "name", qp), present=w.boolean(q, "present_match", qp, True)))
    kw: dict = {}
    if kind == "safe_regex":
        rp = w.join(path, "safe_regex")
        r = w.check_keys(d["safe_regex"], ("regex", "google_re2"), rp)
        w.google_re2(r, rp)
        kw["regex"] = w.compile_regex(r.get("regex"), w.join(rp, "regex"), 0 if cs else re.IGNORECASE)
    else:
        v = w.string(d, kind, path)
        if kind != "prefix" and not v.startswith("/"):
            raise ConfigError(w.join(path, kind), "must start with /")
        kw[kind] = v
    rf = runtime_fraction(d["runtime_fraction"], w.join(path, "runtime_fraction")) \
        if "runtime_fraction" in d else None
    return RouteMatch(case_sensitive=cs, headers=tuple(headers), query_params=tuple(qps),
                      methods=tuple(methods), runtime_fraction=rf, grpc="grpc" in d, **kw)


def route_action(d: dict, path: str) -> RouteAction:
    w.check_keys(d, ("cluster", "weighted_clusters", "cluster_header", "prefix_rewrite",
                     "regex_rewrite", "host_rewrite_literal", "auto_host_rewrite", "timeout",
                     "idle_timeout", "retry_policy", "request_mirror_policies", "hash_policy",
                     "cluster_not_found_response_code", "max_stream_duration",
                     "priority", "upgrade_configs", "max_grpc_timeout", "grpc_timeout_offset",
                     "rate_limits", "include_vh_rate_limits"), path)
    for old in ("max_grpc_timeout", "grpc_timeout_offset"):
        if old in d:
            raise ConfigError(w.join(path, old), "is deprecated in Envoy and not supported; use "
                                                 "max_stream_duration.grpc_timeout_header_max")
    kind = w.one_of(d, ("cluster", "weighted_clusters", "cluster_header"), path)
    w.string(d, "priority", path, "DEFAULT", choices=("DEFAULT",))   # HIGH routing: not supported
    # a cluster_header naming no cluster is a 503, as Envoy's default
    w.string(d, "cluster_not_found_response_code", path, "SERVICE_UNAVAILABLE",
             choices=("SERVICE_UNAVAILABLE",))
    kw: dict = {}
    if kind == "cluster":
        kw["cluster"] = w.string(d, "cluster", path, nonempty=True)
    elif kind == "cluster_header":
        kw["cluster_header"] = w.string(d, "cluster_header", path, nonempty=True).lower()
    else:
        wp = w.join(path, "weighted_clusters")
        wc = w.check_keys(d["weighted_clusters"], ("clusters", "total_weight"), wp)
        items = []
        for i, c in enumerate(w.seq(wc, "clusters", wp)):
            cp = w.join(w.join(wp, "clusters"), i)
            w.check_keys(c, ("name", "weight", *_MUTATION_KEYS), cp)
            items.append(WeightedCluster(name=w.string(c, "name", cp, nonempty=True),
                                         weight=w.integer(c, "weight", cp, lo=0),
                                         headers=header_mutation(c, cp)))
        if not items or sum(x.weight for x in items) == 0:
            raise ConfigError(w.join(wp, "clusters"), "needs at least one cluster with weight > 0")
        total = w.integer(wc, "total_weight", wp, None, lo=1)
        if total is not None and total != sum(x.weight for x in items):
            raise ConfigError(w.join(wp, "total_weight"), f"must equal the sum of the weights "
                              f"({sum(x.weight for x in items)})")
        kw["weighted_clusters"] = tuple(items)
    if "prefix_rewrite" in d and "regex_rewrite" in d:
        raise ConfigError(path, "only one of prefix_rewrite, regex_rewrite may be set")
    if "prefix_rewrite" in d:
        kw["prefix_rewrite"] = w.string(d, "prefix_rewrite", path)
    if "regex_rewrite" in d:
        rp = w.join(path, "regex_rewrite")
        r = w.check_keys(d["regex_rewrite"], ("pattern", "substitution"), rp)
        pat = w.check_keys(w.mapping(r, "pattern", rp), ("regex", "google_re2"), w.join(rp, "pattern"))
        w.google_re2(pat, w.join(rp, "pattern"))
        rx = w.compile_regex(pat.get("regex"), w.join(rp, "pattern.regex"))
        # Envoy substitution uses \1 for groups, as Python's re.sub does
        kw["regex_rewrite"] = (rx, w.string(r, "substitution", rp, ""))
    if "host_rewrite_literal" in d:
        kw["host_rewrite"] = w.string(d, "host_rewrite_literal", path, nonempty=True)
    kw["auto_host_rewrite"] = w.boolean(d, "auto_host_rewrite", path, False)
    kw["timeout_s"] = w.duration(d, "timeout", path, 15.0)
    kw["idle_timeout_s"] = w.duration(d, "idle_timeout", path, None)
    if "max_stream_duration" in d:
        mp = w.join(path, "max_stream_duration")
        m = w.mapping(d, "max_stream_duration", path)
        kw["max_stream_duration"] = stream_duration(m, mp)
        kw["max_stream_duration_s"] = w.duration(m, "max_stream_duration", mp, None)
    kw["upgrades"] = upgrade_configs_from_wire(d.get("upgrade_configs"), w.join(path, "upgrade_configs"))
    if "retry_policy" in d:
        kw["retry_policy"] = retry_policy_from_envoy(w.mapping(d, "retry_policy", path),
                                                     w.join(path, "retry_policy"))
    mirrors = []
    for i, m in enumerate(w.seq(d, "request_mirror_policies", path, [])):
        mp = w.join(w.join(path, "request_mirror_policies"), i)
        w.check_keys(m, ("cluster", "runtime_fraction", "trace_sampled"), mp)
        pct = runtime_fraction(m["runtime_fraction"], w.join(mp, "runtime_fraction")) \
            if "runtime_fraction" in m else 100.0
        mirrors.append(MirrorPolicy(cluster=w.string(m, "cluster", mp, nonempty=True), percent=pct))
    kw["mirrors"] = tuple(mirrors)
    hps = []
    for i, h in enumerate(w.seq(d, "hash_policy", path, [])):
        hp = w.join(w.join(path, "hash_policy"), i)
        w.check_keys(h, ("header", "cookie", "connection_properties", "query_parameter", "terminal"), hp)
        kind = w.one_of(h, ("header", "cookie", "connection_properties", "query_parameter"), hp)
        kp = w.join(hp, kind)
        term = w.boolean(h, "terminal", hp, False)
        if kind == "header":
            x = w.check_keys(h[kind], ("header_name",), kp)
            hps.append(HashPolicy(header=w.string(x, "header_name", kp).lower(), terminal=term))
        elif kind == "cookie":
            x = w.check_keys(h[kind], ("name", "ttl", "path"), kp)
            hps.append(HashPolicy(cookie=w.string(x, "name", kp), terminal=term))
        elif kind == "query_parameter":
            x = w.check_keys(h[kind], ("name",), kp)
            hps.append(HashPolicy(query_parameter=w.string(x, "name", kp), terminal=term))
        else:
            x = w.check_keys(h[kind], ("source_ip",), kp)
            hps.append(HashPolicy(source_ip=w.boolean(x, "source_ip", kp), terminal=term))
    kw["hash_policy"] = tuple(hps)
    kw["rate_limits"] = rate_limits_from_wire(d.get("rate_limits", []), w.join(path, "rate_limits"))
    # deprecated in Envoy (RateLimitPerRoute.vh_rate_limits replaces it), still honoured
    kw["include_vh_rate_limits"] = w.boolean(d, "include_vh_rate_limits", path, False)
    return RouteAction(**kw)


def stream_duration(d: dict, path: str) -> StreamDuration:
    w.check_keys(d, ("max_stream_duration", "grpc_timeout_header_max", "grpc_timeout_header_offset"),
                 path)
    return StreamDuration(grpc_header_max_s=w.duration(d, "grpc_timeout_header_max", path, None),
                          grpc_header_offset_s=w.duration(d, "grpc_timeout_header_offset", path, 0.0))


def route(d: dict, path: str) -> Route:
    w.check_keys(d, ("name", "match", "route", "direct_response", "redirect",
                     "typed_per_filter_config", *_MUTATION_KEYS), path)
    m = route_match(w.mapping(d, "match", path), w.join(path, "match"))
    kind = w.one_of(d, ("route", "direct_response", "redirect"), path)
    kp = w.join(path, kind)
    if kind == "route":
        action: Any = route_action(d["route"], kp)
    elif kind == "direct_response":
        x = w.check_keys(d[kind], ("status", "body"), kp)
        body = ""
        if "body" in x:
            b = w.check_keys(x["body"], ("inline_string", "inline_bytes"), w.join(kp, "body"))
            body = w.string(b, "inline_string", w.join(kp, "body"), "")
        action = DirectResponse(status=w.integer(x, "status", kp, lo=200, hi=599), body=body)
    else:
        x = w.check_keys(d[kind], ("https_redirect", "scheme_redirect", "host_redirect",
                                   "port_redirect", "path_redirect", "prefix_rewrite",
                                   "response_code", "strip_query"), kp)
        code = w.string(x, "response_code", kp, "MOVED_PERMANENTLY",
                        choices=("MOVED_PERMANENTLY", "FOUND", "SEE_OTHER",
                                 "TEMPORARY_REDIRECT", "PERMANENT_REDIRECT"))
        scheme = "https" if x.get("https_redirect") else x.get("scheme_redirect")
        action = Redirect(scheme=scheme, host=x.get("host_redirect"),
                          port=w.integer(x, "port_redirect", kp, None, lo=1, hi=65535),
                          path=x.get("path_redirect"), prefix_rewrite=x.get("prefix_rewrite"),
                          status={"MOVED_PERMANENTLY": 301, "FOUND": 302, "SEE_OTHER": 303,
                                  "TEMPORARY_REDIRECT": 307, "PERMANENT_REDIRECT": 308}[code],
                          strip_query=w.boolean(x, "strip_query", kp, False))
    return Route(match=m, action=action, name=w.string(d, "name", path, ""),
                 headers=header_mutation(d, path),
                 per_filter=per_filter_configs(d.get("typed_per_filter_config"),
                                               w.join(path, "typed_per_filter_config")))


def virtual_host(d: dict, path: str) -> VirtualHost:
    w.check_keys(d, ("name", "domains", "routes", "typed_per_filter_config", "retry_policy",
                     "require_tls", "include_request_attempt_count", "rate_limits",
                     *_MUTATION_KEYS), path)
    if d.get("require_tls", "NONE") != "NONE":
        raise ConfigError(w.join(path, "require_tls"), "is not supported")
    domains = w.seq(d, "domains", path)
    if not domains:
        raise ConfigError(w.join(path, "domains"), "must not be empty")
    for i, dom in enumerate(domains):
        if not isinstance(dom, str) or not dom:
            raise ConfigError(w.join(w.join(path, "domains"), i), "must be a non-empty string")
        if dom != "*" and "*" in dom[1:-1]:
            raise ConfigError(w.join(w.join(path, "domains"), i),
                              "wildcard only allowed as a prefix or suffix")
    rp = w.join(path, "routes")
    return VirtualHost(
        name=w.string(d, "name", path, nonempty=True),
        domains=tuple(x.lower() for x in domains),
        routes=tuple(route(r, w.join(rp, i)) for i, r in enumerate(w.seq(d, "routes", path, []))),
        headers=header_mutation(d, path),
        per_filter=per_filter_configs(d.get("typed_per_filter_config"),
                                      w.join(path, "typed_per_filter_config")),
        retry_policy=retry_policy_from_envoy(d["retry_policy"], w.join(path, "retry_policy"))
        if "retry_policy" in d else None,
        include_attempt_count=w.boolean(d, "include_request_attempt_count", path, False),
        rate_limits=rate_limits_from_wire(d.get("rate_limits", []), w.join(path, "rate_limits")),
    )


def route_configuration(d: dict, path: str) -> RouteConfig:
    w.check_keys(d, ("name", "virtual_hosts", "validate_clusters", "@type", *_MUTATION_KEYS), path)
    if not w.boolean(d, "validate_clusters", path, True):
        raise ConfigError(w.join(path, "validate_clusters"), "must be true: the sidecar always "
                          "checks that the clusters a route names exist")
    vp = w.join(path, "virtual_hosts")
    vhosts = tuple(virtual_host(v, w.join(vp, i)) for i, v in enumerate(w.seq(d, "virtual_hosts", path, [])))
    seen: dict[str, int] = {}
    for i, vh in enumerate(vhosts):
        for dom in vh.domains:
            if dom in seen:
                raise ConfigError(w.join(w.join(vp, i), "domains"),
                                  f"domain {dom!r} is already used by virtual_hosts[{seen[dom]}]")
            seen[dom] = i
    return RouteConfig(name=w.string(d, "name", path, ""), virtual_hosts=vhosts,
                       headers=header_mutation(d, path))


def retry_policy_from_envoy(d: dict, path: str) -> RetryPolicy:
    w.check_keys(d, ("retry_on", "num_retries", "per_try_timeout", "per_try_idle_timeout",
                     "retriable_status_codes", "retry_back_off", "retry_host_predicate",
                     "host_selection_retry_max_attempts"), path)
    if d.get("per_try_idle_timeout") is not None:
        raise ConfigError(w.join(path, "per_try_idle_timeout"),
                          "is not supported (use per_try_timeout, or the route timeout)")
    retry_on = parse_retry_on(d.get("retry_on", ""), w.join(path, "retry_on"))
    codes = _status_codes(d.get("retriable_status_codes", []), w.join(path, "retriable_status_codes"))
    base, mx = 0.025, None
    if "retry_back_off" in d:
        bp = w.join(path, "retry_back_off")
        bo = w.check_keys(d["retry_back_off"], ("base_interval", "max_interval"), bp)
        base = w.duration(bo, "base_interval", bp)
        if base <= 0:
            raise ConfigError(w.join(bp, "base_interval"), "must be greater than zero")
        mx = w.duration(bo, "max_interval", bp, None)
        if mx is not None and mx < base:
            raise ConfigError(w.join(bp, "max_interval"), "must be greater than or equal to base_interval")
    for i, p in enumerate(w.seq(d, "retry_host_predicate", path, [])):
        pp = w.join(w.join(path, "retry_host_predicate"), i)
        w.check_keys(p, ("name", "typed_config"), pp)
        if w.string(p, "name", pp) != "envoy.retry_host_predicates.previous_hosts":
            raise ConfigError(w.join(pp, "name"), "only envoy.retry_host_predicates.previous_hosts is supported")
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=w.integer(d, "num_retries", path, 1, lo=0, hi=100),
        per_try_timeout_s=w.duration(d, "per_try_timeout", path, 0.0),
        retriable_status_codes=codes,
        backoff_base_s=base,
        backoff_max_s=mx if mx is not None else base * 10,
        # Envoy retries any method. A retry always prefers a host this request has not tried
        # (the previous-hosts predicate is built in), so that predicate is accepted as a no-op.
        retry_non_idempotent=True,
        retry_host_predicate_previous_hosts=True,
        host_selection_retry_max_attempts=w.integer(d, "host_selection_retry_max_attempts", path, 3, lo=1),
        # Envoy's router honours x-envoy-max-retries / x-envoy-retry-on from (internal) clients
        allow_override_headers=True,
    )
