"""Native YAML routes and virtual hosts: match, action, rewrites, retries, mirrors, per-route
filter overrides."""

from __future__ import annotations

import re
from typing import Any

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.filters import FilterCatalog
from sidecar.config.http2 import upgrade_configs_from_wire
from sidecar.config.matchers import QueryMatcher, header_matchers_from_native, string_matcher_from_native
from sidecar.config.ratelimit import rate_limits_from_wire
from sidecar.config.route import (
    DirectResponse,
    HashPolicy,
    HeaderMutation,
    HeaderValueOption,
    MirrorPolicy,
    Redirect,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    StreamDuration,
    VirtualHost,
    WeightedCluster,
    _status_codes,
    parse_retry_on,
)
from sidecar.config.wire import Raw


def route_match_from_native(d: Raw, path: str) -> RouteMatch:
    w.check_keys(d, ("prefix", "path", "regex", "path_separated_prefix", "case_sensitive",
                     "headers", "query", "methods", "cookies", "percent", "grpc"), path)
    kind = w.one_of(d, ("prefix", "path", "regex", "path_separated_prefix"), path, required=False)
    kw: dict[str, Any] = {}
    cs = w.boolean(d, "case_sensitive", path, True)
    if kind is None:
        kw["prefix"] = "/"
    elif kind == "regex":
        kw["regex"] = w.compile_regex(d["regex"], w.join(path, "regex"), 0 if cs else re.IGNORECASE)
    else:
        v = w.string(d, kind, path)
        if not v.startswith("/"):
            raise ConfigError(w.join(path, kind), "must start with /")
        kw[kind] = v
    q = []
    for name, val in w.mapping(d, "query", path, {}).items():
        qp = w.join(w.join(path, "query"), name)
        if val is True:
            q.append(QueryMatcher(name=name))
        else:
            q.append(QueryMatcher(name=name, value=string_matcher_from_native(val, qp)))
    methods = w.seq(d, "methods", path, [])
    for i, m in enumerate(methods):
        if not isinstance(m, str) or not m.isalpha():
            raise ConfigError(w.join(w.join(path, "methods"), i), "must be an HTTP method name")
    cookies = tuple((name, string_matcher_from_native(val, w.join(w.join(path, "cookies"), name)))
                    for name, val in w.mapping(d, "cookies", path, {}).items())
    return RouteMatch(case_sensitive=cs,
                      headers=header_matchers_from_native(d["headers"], w.join(path, "headers")) if "headers" in d else (),
                      query_params=tuple(q), methods=tuple(m.upper() for m in methods),
                      cookies=cookies, grpc=w.boolean(d, "grpc", path, False),
                      runtime_fraction=w.number(d, "percent", path, None, lo=0, hi=100), **kw)


def header_mutation_from_native(d: Raw, path: str) -> HeaderMutation:
    """``request_headers: {add: {k: v}, set: {k: v}, remove: [k]}`` and the same for response."""
    out: dict[str, Any] = {}
    for side in ("request", "response"):
        key = f"{side}_headers"
        hp = w.join(path, key)
        h = w.check_keys(w.mapping(d, key, path, {}), ("add", "set", "remove"), hp)
        adds = []
        for verb, append in (("add", True), ("set", False)):
            for name, val in w.mapping(h, verb, hp, {}).items():
                if not isinstance(val, (str, int, float)):
                    raise ConfigError(w.join(w.join(hp, verb), name), "must be a string")
                adds.append(HeaderValueOption(name=str(name).lower(), value=str(val), append=append))
        out[f"{side}_add"] = tuple(adds)
        out[f"{side}_remove"] = tuple(str(x).lower() for x in w.seq(h, "remove", hp, []))
    return HeaderMutation(**out)


def per_filter_from_native(d: Raw, path: str, filters: FilterCatalog) -> tuple[tuple[str, Any], ...]:
    out: list[tuple[str, Any]] = []
    for name, cfg in (d or {}).items():
        p = w.join(path, name)
        spec = filters.lookup(name)
        if spec is None:
            raise ConfigError(p, f"unknown filter {name!r}")
        if cfg == "disabled" or cfg is False:
            out.append((spec.name, None))
        elif spec.per_route_from_native is None:
            raise ConfigError(p, f"filter {name!r} has no per-route config")
        else:
            out.append((spec.name, spec.per_route_from_native(cfg, p)))
    return tuple(out)


_ROUTE_KEYS = ("name", "match", "cluster", "weighted", "cluster_header", "direct_response",
               "redirect", "rewrite", "timeout", "idle_timeout", "retry", "mirror", "hash",
               "allow_timeout_header", "max_stream_duration", "grpc_timeout_max", "upgrades",
               "rate_limits", "include_vh_rate_limits",
               "request_headers", "response_headers", "filters")


def route_from_native(d: Raw, path: str, filters: FilterCatalog) -> Route:
    w.check_keys(d, _ROUTE_KEYS, path)
    match = route_match_from_native(w.mapping(d, "match", path, {}), w.join(path, "match"))
    kind = w.one_of(d, ("cluster", "weighted", "cluster_header", "direct_response", "redirect"), path)
    kp = w.join(path, kind)
    if kind in ("direct_response", "redirect"):
        for k in ("rate_limits", "include_vh_rate_limits"):
            if k in d:
                raise ConfigError(w.join(path, k), f"needs a route to a cluster, not {kind}")
    if kind == "direct_response":
        x = w.check_keys(d[kind], ("status", "body"), kp)
        action: Any = DirectResponse(status=w.integer(x, "status", kp, lo=200, hi=599),
                                     body=w.string(x, "body", kp, ""))
    elif kind == "redirect":
        x = w.check_keys(d[kind], ("scheme", "host", "port", "path", "prefix", "status",
                                   "strip_query"), kp)
        action = Redirect(scheme=w.string(x, "scheme", kp, None, choices=("http", "https")),
                          host=w.string(x, "host", kp, None), port=w.port(x, "port", kp, None),
                          path=w.string(x, "path", kp, None),
                          prefix_rewrite=w.string(x, "prefix", kp, None),
                          status=w.integer(x, "status", kp, 301, lo=300, hi=308),
                          strip_query=w.boolean(x, "strip_query", kp, False))
    else:
        kw: dict[str, Any] = {}
        if kind == "cluster":
            kw["cluster"] = w.string(d, "cluster", path, nonempty=True)
        elif kind == "cluster_header":
            kw["cluster_header"] = w.string(d, "cluster_header", path, nonempty=True).lower()
        else:
            wc = w.mapping(d, "weighted", path)
            if not wc or sum(v for v in wc.values() if isinstance(v, int)) <= 0:
                raise ConfigError(kp, "needs at least one cluster with weight > 0")
            kw["weighted_clusters"] = tuple(
                WeightedCluster(name=str(n), weight=w.integer(wc, n, kp, lo=0)) for n in wc)
        if "rewrite" in d:
            rp = w.join(path, "rewrite")
            r = w.check_keys(d["rewrite"], ("prefix", "regex", "substitution", "host", "auto_host"), rp)
            if "prefix" in r and "regex" in r:
                raise ConfigError(rp, "only one of prefix, regex may be set")
            if "prefix" in r:
                kw["prefix_rewrite"] = w.string(r, "prefix", rp)
            if "regex" in r:
                kw["regex_rewrite"] = (w.compile_regex(r["regex"], w.join(rp, "regex")),
                                       w.string(r, "substitution", rp))
            kw["host_rewrite"] = w.string(r, "host", rp, None)
            kw["auto_host_rewrite"] = w.boolean(r, "auto_host", rp, False)
        kw["timeout_s"] = w.duration(d, "timeout", path, 15.0)
        kw["allow_timeout_header"] = w.boolean(d, "allow_timeout_header", path, False)
        kw["idle_timeout_s"] = w.duration(d, "idle_timeout", path, None)
        kw["max_stream_duration_s"] = w.duration(d, "max_stream_duration", path, None)
        if "max_stream_duration" in d or "grpc_timeout_max" in d:
            # either one: the route timeout no longer applies (Envoy); grpc_timeout_max: 5s
            # honours a client's grpc-timeout up to 5 s (0 = no cap)
            kw["max_stream_duration"] = StreamDuration(
                grpc_header_max_s=w.duration(d, "grpc_timeout_max", path, None))
        kw["upgrades"] = upgrade_configs_from_wire(d.get("upgrades"), w.join(path, "upgrades"),
                                                   native=True)
        if "retry" in d:
            kw["retry_policy"] = retry_policy_from_native(w.mapping(d, "retry", path), w.join(path, "retry"))
        mirrors = []
        for i, m in enumerate(w.seq(d, "mirror", path, [])):
            mp = w.join(w.join(path, "mirror"), i)
            w.check_keys(m, ("cluster", "percent"), mp)
            mirrors.append(MirrorPolicy(cluster=w.string(m, "cluster", mp, nonempty=True),
                                        percent=w.number(m, "percent", mp, 100.0, lo=0, hi=100)))
        kw["mirrors"] = tuple(mirrors)
        hashes = []
        for i, h in enumerate(w.seq(d, "hash", path, [])):
            hp = w.join(w.join(path, "hash"), i)
            w.check_keys(h, ("header", "cookie", "query", "source_ip", "terminal"), hp)
            which = w.one_of(h, ("header", "cookie", "query", "source_ip"), hp)
            term = w.boolean(h, "terminal", hp, False)
            if which == "header":
                hashes.append(HashPolicy(header=w.string(h, "header", hp).lower(), terminal=term))
            elif which == "cookie":
                hashes.append(HashPolicy(cookie=w.string(h, "cookie", hp), terminal=term))
            elif which == "query":
                hashes.append(HashPolicy(query_parameter=w.string(h, "query", hp), terminal=term))
            else:
                hashes.append(HashPolicy(source_ip=w.boolean(h, "source_ip", hp), terminal=term))
        kw["hash_policy"] = tuple(hashes)
        # the global rate limit filter's descriptors, in Envoy's shape (docs/resilience.md)
        kw["rate_limits"] = rate_limits_from_wire(d.get("rate_limits", []),
                                                  w.join(path, "rate_limits"))
        kw["include_vh_rate_limits"] = w.boolean(d, "include_vh_rate_limits", path, False)
        action = RouteAction(**kw)
    return Route(match=match, action=action, name=w.string(d, "name", path, ""),
                 headers=header_mutation_from_native(d, path),
                 per_filter=per_filter_from_native(w.mapping(d, "filters", path, {}), w.join(path, "filters"), filters))


def virtual_host_from_native(d: Raw, path: str, filters: FilterCatalog) -> VirtualHost:
    w.check_keys(d, ("name", "domains", "routes", "request_headers", "response_headers",
                     "filters", "retry", "rate_limits"), path)
    domains = w.seq(d, "domains", path, ["*"])
    for i, dom in enumerate(domains):
        if not isinstance(dom, str) or not dom or (dom != "*" and "*" in dom[1:-1]):
            raise ConfigError(w.join(w.join(path, "domains"), i),
                              "must be a host name, *.suffix, prefix.* or *")
    rp = w.join(path, "routes")
    return VirtualHost(
        name=w.string(d, "name", path, "default"), domains=tuple(x.lower() for x in domains),
        routes=tuple(route_from_native(r, w.join(rp, i), filters) for i, r in enumerate(w.seq(d, "routes", path))),
        headers=header_mutation_from_native(d, path),
        per_filter=per_filter_from_native(w.mapping(d, "filters", path, {}), w.join(path, "filters"), filters),
        retry_policy=retry_policy_from_native(d["retry"], w.join(path, "retry")) if "retry" in d else None,
        include_attempt_count=True,
        rate_limits=rate_limits_from_wire(d.get("rate_limits", []), w.join(path, "rate_limits")),
    )


def retry_policy_from_native(d: Raw, path: str) -> RetryPolicy:
    w.check_keys(d, ("retry_on", "retries", "per_try_timeout", "status_codes", "backoff",
                     "max_backoff", "retry_non_idempotent", "max_buffered_body",
                     "allow_override_headers"), path)
    base = w.duration(d, "backoff", path, 0.025)
    mx = w.duration(d, "max_backoff", path, base * 10)
    if mx < base:
        raise ConfigError(w.join(path, "max_backoff"), "must be greater than or equal to backoff")
    return RetryPolicy(
        retry_on=parse_retry_on(d.get("retry_on", "5xx,reset,connect-failure"), w.join(path, "retry_on")),
        num_retries=w.integer(d, "retries", path, 2, lo=0, hi=100),
        per_try_timeout_s=w.duration(d, "per_try_timeout", path, 0.0),
        retriable_status_codes=_status_codes(d.get("status_codes", []), w.join(path, "status_codes")),
        backoff_base_s=base,
        backoff_max_s=mx,
        retry_non_idempotent=w.boolean(d, "retry_non_idempotent", path, False),
        max_buffered_body=w.integer(d, "max_buffered_body", path, 64 * 1024, lo=0),
        allow_override_headers=w.boolean(d, "allow_override_headers", path, False),
    )
