"""The concise native YAML -> the internal model (see docs/config.md for every field).

A two-service local-dev config::

    listeners:
      - name: dev
        port: 10000
        routes:
          - {match: {prefix: /api}, cluster: api}
          - {match: {prefix: /}, cluster: web}
    clusters:
      - {name: api, endpoints: ["127.0.0.1:8081"]}
      - {name: web, endpoints: ["127.0.0.1:8082"]}
"""

from __future__ import annotations

from typing import Any

import filters as filter_registry
from sidecar.config import wire as w
from sidecar.cluster.breakers import circuit_breakers_from_native
from sidecar.observability.access_log import check_fields
from sidecar.config.errors import ConfigError, ConfigErrors, ErrorCollector
from sidecar.config.health_check import health_check_from_native
from sidecar.config.model import (
    LB_POLICIES, AccessLogConfig, Admin, Cluster, DirectResponse, Endpoint, HashPolicy,
    HeaderMatcher, HeaderMutation, HeaderValueOption, HttpFilter, LbConfig, Listener,
    MirrorPolicy, QueryMatcher, Redirect, Route, RouteAction, RouteConfig, RouteMatch, Snapshot,
    StringMatcher, TracingConfig, VirtualHost, WeightedCluster,
)
from sidecar.config.outlier import outlier_detection_from_wire
from sidecar.route.retry import retry_policy_from_native


def string_matcher(v: Any, path: str) -> StringMatcher:
    """A string is an exact match; a mapping picks exact/prefix/suffix/contains/regex."""
    if isinstance(v, str):
        return StringMatcher(exact=v)
    w.check_keys(v, ("exact", "prefix", "suffix", "contains", "regex", "ignore_case"), path)
    kind = w.one_of(v, ("exact", "prefix", "suffix", "contains", "regex"), path)
    if kind == "regex":
        return StringMatcher(regex=w.compile_regex(v["regex"], w.join(path, "regex")))
    ic = w.boolean(v, "ignore_case", path, False)
    s = w.string(v, kind, path)
    return StringMatcher(**{kind: s.lower() if ic else s}, ignore_case=ic)


def header_matchers(v: Any, path: str) -> tuple[HeaderMatcher, ...]:
    """``{name: value}`` (exact) or a list of ``{name, exact|prefix|regex|present, invert}``."""
    out = []
    if isinstance(v, dict):
        for name, val in v.items():
            out.append(HeaderMatcher(name=str(name).lower(), value=string_matcher(val, w.join(path, name))))
        return tuple(out)
    if not isinstance(v, list):
        raise ConfigError(path, "must be a mapping of name: value or a list of matchers")
    for i, h in enumerate(v):
        hp = w.join(path, i)
        w.check_keys(h, ("name", "exact", "prefix", "suffix", "contains", "regex", "present",
                         "invert"), hp)
        name = w.string(h, "name", hp, nonempty=True).lower()
        invert = w.boolean(h, "invert", hp, False)
        if "present" in h:
            out.append(HeaderMatcher(name=name, present=w.boolean(h, "present", hp), invert=invert))
            continue
        rest = {k: x for k, x in h.items() if k not in ("name", "invert")}
        out.append(HeaderMatcher(name=name, value=string_matcher(rest, hp) if rest else None, invert=invert))
    return tuple(out)


def _route_match(d: dict, path: str) -> RouteMatch:
    w.check_keys(d, ("prefix", "path", "regex", "path_separated_prefix", "case_sensitive",
                     "headers", "query", "methods", "cookies", "percent"), path)
    kind = w.one_of(d, ("prefix", "path", "regex", "path_separated_prefix"), path, required=False)
    kw: dict = {}
    cs = w.boolean(d, "case_sensitive", path, True)
    if kind is None:
        kw["prefix"] = "/"
    elif kind == "regex":
        import re
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
            q.append(QueryMatcher(name=name, value=string_matcher(val, qp)))
    methods = w.seq(d, "methods", path, [])
    for i, m in enumerate(methods):
        if not isinstance(m, str) or not m.isalpha():
            raise ConfigError(w.join(w.join(path, "methods"), i), "must be an HTTP method name")
    cookies = tuple((name, string_matcher(val, w.join(w.join(path, "cookies"), name)))
                    for name, val in w.mapping(d, "cookies", path, {}).items())
    return RouteMatch(case_sensitive=cs,
                      headers=header_matchers(d["headers"], w.join(path, "headers")) if "headers" in d else (),
                      query_params=tuple(q), methods=tuple(m.upper() for m in methods),
                      cookies=cookies,
                      runtime_fraction=w.number(d, "percent", path, None, lo=0, hi=100), **kw)


def _header_mutation(d: dict, path: str) -> HeaderMutation:
    """``request_headers: {add: {k: v}, set: {k: v}, remove: [k]}`` and the same for response."""
    out: dict = {}
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


def _per_filter(d: dict, path: str) -> tuple[tuple[str, Any], ...]:
    out = []
    for name, cfg in (d or {}).items():
        p = w.join(path, name)
        spec = filter_registry.lookup(name)
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
               "allow_timeout_header",
               "request_headers", "response_headers", "filters")


def _route(d: dict, path: str) -> Route:
    w.check_keys(d, _ROUTE_KEYS, path)
    match = _route_match(w.mapping(d, "match", path, {}), w.join(path, "match"))
    kind = w.one_of(d, ("cluster", "weighted", "cluster_header", "direct_response", "redirect"), path)
    kp = w.join(path, kind)
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
        kw: dict = {}
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
        if "idle_timeout" in d and w.duration(d, "idle_timeout", path) != 0:
            raise ConfigError(w.join(path, "idle_timeout"), "per-route stream idle timeouts are "
                              "not supported (only 0s); use timeout or retry.per_try_timeout")
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
        action = RouteAction(**kw)
    return Route(match=match, action=action, name=w.string(d, "name", path, ""),
                 headers=_header_mutation(d, path),
                 per_filter=_per_filter(w.mapping(d, "filters", path, {}), w.join(path, "filters")))


def _virtual_host(d: dict, path: str) -> VirtualHost:
    w.check_keys(d, ("name", "domains", "routes", "request_headers", "response_headers",
                     "filters", "retry"), path)
    domains = w.seq(d, "domains", path, ["*"])
    for i, dom in enumerate(domains):
        if not isinstance(dom, str) or not dom or (dom != "*" and "*" in dom[1:-1]):
            raise ConfigError(w.join(w.join(path, "domains"), i),
                              "must be a host name, *.suffix, prefix.* or *")
    rp = w.join(path, "routes")
    return VirtualHost(
        name=w.string(d, "name", path, "default"), domains=tuple(x.lower() for x in domains),
        routes=tuple(_route(r, w.join(rp, i)) for i, r in enumerate(w.seq(d, "routes", path))),
        headers=_header_mutation(d, path),
        per_filter=_per_filter(w.mapping(d, "filters", path, {}), w.join(path, "filters")),
        retry_policy=retry_policy_from_native(d["retry"], w.join(path, "retry")) if "retry" in d else None,
        include_attempt_count=True,
    )


def _http_filters(items: list, path: str) -> tuple[HttpFilter, ...]:
    """``filters: [{jwt_authn: {...}}, {fault: {...}}]`` in chain order."""
    out = []
    for i, f in enumerate(items):
        fp = w.join(path, i)
        if not isinstance(f, dict) or len(f) != 1:
            raise ConfigError(fp, "must be a mapping with exactly one filter name")
        (name, cfg), = f.items()
        spec = filter_registry.lookup(name)
        if spec is None:
            raise ConfigError(w.join(fp, name), f"unknown filter {name!r} (known: "
                              f"{', '.join(filter_registry.short_names())})")
        out.append(HttpFilter(name=spec.name, config=spec.from_native(cfg or {}, w.join(fp, name))))
    return tuple(out)


def _listener(d: dict, path: str) -> Listener:
    w.check_keys(d, ("name", "address", "port", "routes", "virtual_hosts", "filters",
                     "direction", "idle_timeout", "request_headers_timeout", "request_timeout",
                     "access_log", "tls", "use_remote_address", "xff_num_trusted_hops",
                     "server_name", "drain_timeout", "max_request_headers_kb",
                     "request_headers", "response_headers", "strip_host_port",
                     "accept_http_10", "trust_private_peers", "preserve_external_request_id"), path)
    if "routes" in d and "virtual_hosts" in d:
        raise ConfigError(path, "only one of routes, virtual_hosts may be set")
    if "routes" in d:
        vhosts = (_virtual_host({"name": "default", "domains": ["*"], "routes": d["routes"]}, path),)
    else:
        vp = w.join(path, "virtual_hosts")
        vhosts = tuple(_virtual_host(v, w.join(vp, i)) for i, v in enumerate(w.seq(d, "virtual_hosts", path)))
    seen: dict = {}
    for i, vh in enumerate(vhosts):
        for dom in vh.domains:
            if dom in seen:
                raise ConfigError(w.join(w.join(path, "virtual_hosts"), i),
                                  f"domain {dom!r} is already used by virtual_hosts[{seen[dom]}]")
            seen[dom] = i
    name = w.string(d, "name", path, nonempty=True)
    access_log = ()
    if "access_log" in d:
        ap = w.join(path, "access_log")
        a = d["access_log"]
        if isinstance(a, str):
            a = {"path": a}
        w.check_keys(a, ("path", "format", "fields"), ap)
        access_log = (AccessLogConfig(path={"stdout": "/dev/stdout", "stderr": "/dev/stderr"}.get(
            w.string(a, "path", ap, "stdout"), a.get("path", "/dev/stdout")),
            format=w.string(a, "format", ap, "json", choices=("json", "text", "dev")),
            fields=check_fields(w.seq(a, "fields", ap, []), w.join(ap, "fields"))),)
    tls = None
    if "tls" in d:
        from sidecar.tls.context import downstream_tls_from_native
        tls = downstream_tls_from_native(w.mapping(d, "tls", path), w.join(path, "tls"))
    return Listener(
        name=name, host=w.string(d, "address", path, "127.0.0.1"), port=w.integer(d, "port", path, lo=0, hi=65535),
        route_config=RouteConfig(name=name, virtual_hosts=vhosts, headers=_header_mutation(d, path)),
        http_filters=_http_filters(w.seq(d, "filters", path, []), w.join(path, "filters")),
        stat_prefix=name,
        direction=w.string(d, "direction", path, "outbound", choices=("inbound", "outbound")),
        idle_timeout_s=w.duration(d, "idle_timeout", path, 3600.0),
        request_headers_timeout_s=w.duration(d, "request_headers_timeout", path, 10.0),
        request_timeout_s=w.duration(d, "request_timeout", path, 0.0),
        max_request_headers_kb=w.integer(d, "max_request_headers_kb", path, 60, lo=1, hi=8192),
        accept_http_10=w.boolean(d, "accept_http_10", path, True),
        use_remote_address=w.boolean(d, "use_remote_address", path, True),
        trust_private_peers=w.boolean(d, "trust_private_peers", path, True),
        preserve_external_request_id=w.boolean(d, "preserve_external_request_id", path, True),
        xff_num_trusted_hops=w.integer(d, "xff_num_trusted_hops", path, 0, lo=0),
        server_name=w.string(d, "server_name", path, "envoy"),
        strip_host_port=w.string(d, "strip_host_port", path, "any", choices=("any", "matching", "none")),
        drain_timeout_s=w.duration(d, "drain_timeout", path, 5.0),
        access_log=access_log, tls=tls, source=d,
    )


def _endpoint(v: Any, path: str) -> Endpoint:
    if isinstance(v, str):
        host, sep, p = v.rpartition(":")
        if not sep or not host or not p.isdigit():
            raise ConfigError(path, f"must be host:port, got {v!r}")
        port = int(p)
        if not 1 <= port <= 65535:
            raise ConfigError(path, "port must be 1..65535")
        return Endpoint(host=host.strip("[]"), port=port)
    w.check_keys(v, ("address", "port", "weight"), path)
    return Endpoint(host=w.string(v, "address", path, nonempty=True), port=w.port(v, "port", path),
                    weight=w.integer(v, "weight", path, 1, lo=1, hi=1_000_000))


def _cluster(d: dict, path: str) -> Cluster:
    w.check_keys(d, ("name", "type", "endpoints", "lb", "connect_timeout", "dns_refresh",
                     "circuit_breakers", "outlier_detection", "health_check", "tls",
                     "max_idle_connections", "idle_timeout", "ewma", "panic_threshold"), path)
    ep = w.join(path, "endpoints")
    eps = tuple(_endpoint(e, w.join(ep, i)) for i, e in enumerate(w.seq(d, "endpoints", path)))
    ctype = w.string(d, "type", path, "static", choices=("static", "strict_dns", "logical_dns", "eds"))
    lb_kw: dict = {"policy": w.string(d, "lb", path, "round_robin", choices=LB_POLICIES)}
    if "ewma" in d:
        xp = w.join(path, "ewma")
        x = w.check_keys(d["ewma"], ("decay", "default_rtt", "failure_penalty", "choices"), xp)
        lb_kw.update(ewma_decay_s=w.duration(x, "decay", xp, 10.0),
                     ewma_default_rtt_s=w.duration(x, "default_rtt", xp, 0.030),
                     ewma_failure_penalty_s=w.duration(x, "failure_penalty", xp, 0.0),
                     choice_count=w.integer(x, "choices", xp, 2, lo=2))
    lb_kw["panic_threshold"] = w.number(d, "panic_threshold", path, 50.0, lo=0, hi=100)
    kw: dict = {}
    if "circuit_breakers" in d:
        kw["circuit_breakers"] = circuit_breakers_from_native(d["circuit_breakers"], w.join(path, "circuit_breakers"))
    if "outlier_detection" in d:
        kw["outlier_detection"] = outlier_detection_from_wire(d["outlier_detection"], w.join(path, "outlier_detection"))
    if "health_check" in d:
        kw["health_checks"] = (health_check_from_native(d["health_check"], w.join(path, "health_check")),)
    if "tls" in d:
        from sidecar.tls.context import upstream_tls_from_native
        kw["tls"] = upstream_tls_from_native(d["tls"], w.join(path, "tls"))
    return Cluster(name=w.string(d, "name", path, nonempty=True), type=ctype, endpoints=eps,
                   connect_timeout_s=w.duration(d, "connect_timeout", path, 5.0),
                   dns_refresh_s=w.duration(d, "dns_refresh", path, 5.0),
                   lb=LbConfig(**lb_kw),
                   max_idle_connections=w.integer(d, "max_idle_connections", path, 64, lo=0),
                   idle_timeout_s=w.duration(d, "idle_timeout", path, 3600.0), source=d, **kw)


def _tracing(d: dict, path: str) -> TracingConfig:
    w.check_keys(d, ("sample_percent", "exporter", "endpoint", "service_name"), path)
    return TracingConfig(sample_percent=w.number(d, "sample_percent", path, 1.0, lo=0, hi=100),
                         exporter=w.string(d, "exporter", path, "none",
                                           choices=("none", "otlp_http", "console", "memory")),
                         endpoint=w.string(d, "endpoint", path, ""),
                         service_name=w.string(d, "service_name", path, "sidecar"))


def snapshot(d: dict) -> Snapshot:
    """Native YAML document -> Snapshot, collecting every error with its path."""
    errs = ErrorCollector()
    try:
        w.check_keys(d, ("admin", "listeners", "clusters", "tracing", "control_plane", "node",
                         "version", "sidecar"), "")
    except ConfigError as e:
        errs.capture(e)
    admin = Admin()
    if "admin" in d:
        try:
            a = w.check_keys(d["admin"], ("address", "port"), "admin")
            admin = Admin(host=w.string(a, "address", "admin", "127.0.0.1"),
                          port=w.integer(a, "port", "admin", 9901, lo=0, hi=65535))
        except ConfigError as e:
            errs.capture(e)

    def collect(key, fn):
        out = []
        items = d.get(key) or []
        if not isinstance(items, list):
            errs.add(key, "must be a list")
            return out
        for i, item in enumerate(items):
            try:
                out.append(fn(item, f"{key}[{i}]"))
            except (ConfigError, ConfigErrors) as e:
                errs.capture(e)
        return out

    clusters = collect("clusters", _cluster)
    listeners = collect("listeners", _listener)
    extra: dict = {}
    if "sidecar" in d:     # sidecar mode: inbound + outbound listeners and the local_app cluster
        try:
            from sidecar.runtime.sidecar_mode import sidecar_from_native
            extra["sidecar"], more_l, more_c = sidecar_from_native(d["sidecar"], "sidecar", d.get("clusters"))
            listeners += more_l
            clusters += more_c
        except (ConfigError, ConfigErrors) as e:
            errs.capture(e)
    tracing = TracingConfig()
    if "tracing" in d:
        try:
            tracing = _tracing(d["tracing"], "tracing")
        except ConfigError as e:
            errs.capture(e)
    control_plane = None
    if d.get("control_plane"):
        try:
            from control_plane_client.config import control_plane_from_native
            control_plane = control_plane_from_native(d["control_plane"], "control_plane")
        except (ConfigError, ConfigErrors) as e:
            errs.capture(e)
    errs.raise_if_any()
    snap = Snapshot(listeners=tuple(listeners), clusters=tuple(clusters), admin=admin,
                    tracing=tracing, control_plane=control_plane, node=d.get("node"),
                    source_format="native", version=str(d.get("version", "0")), extra=extra)
    from control_plane_client.translate import check_references
    check_references(snap, native=True)
    return snap
