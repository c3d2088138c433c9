"""Envoy v3 resources -> the internal model.

One translation for every way Envoy config arrives: a bootstrap file's ``static_resources``,
xDS responses (LDS/RDS/CDS/EDS), and the file source. Anything outside the supported subset is
refused with a ConfigError naming the field: nothing is silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import filters as filter_registry
from sidecar.config import wire as w
from sidecar.cluster.breakers import circuit_breakers_from_envoy
from sidecar.config.errors import ConfigError, ConfigErrors, ErrorCollector
from sidecar.config.health_check import health_check_from_envoy
from sidecar.config.model import (
    AccessLogConfig, Admin, Cluster, DirectResponse, Endpoint, HashPolicy, HeaderMatcher,
    HeaderMutation, HeaderValueOption, HttpFilter, LbConfig, Listener, MirrorPolicy,
    QueryMatcher, Redirect, Route, RouteAction, RouteConfig, RouteMatch, Snapshot,
    StringMatcher, TracingConfig, VirtualHost, WeightedCluster,
)
from sidecar.config.outlier import outlier_detection_from_wire
from sidecar.route.retry import retry_policy_from_envoy

T_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
T_ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
T_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
T_ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
T_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
         "HttpConnectionManager")
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
T_TLS_DOWN = ("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
              "DownstreamTlsContext")
T_TLS_UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
T_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
T_STDOUT_LOG = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
T_PEAK_EWMA = ("type.googleapis.com/envoy.extensions.load_balancing_policies.peak_ewma.v3alpha."
               "PeakEwma")
T_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


# ---- small pieces ------------------------------------------------------------------------

def typed(d: Any, path: str, expected: str | tuple[str, ...]) -> dict:
    """A typed_config/Any: check its @type and return the rest."""
    if not isinstance(d, dict):
        raise ConfigError(path, "must be a mapping with an @type")
    t = d.get("@type")
    exp = (expected,) if isinstance(expected, str) else expected
    if t not in exp:
        raise ConfigError(w.join(path, "@type"), f"unsupported type {t!r}; expected {' or '.join(exp)}")
    return {k: v for k, v in d.items() if k != "@type"}


def socket_address(d: dict, path: str) -> tuple[str, int]:
    w.check_keys(d, ("socket_address",), path)
    sp = w.join(path, "socket_address")
    sa = w.check_keys(w.mapping(d, "socket_address", path),
                      ("address", "port_value", "protocol", "ipv4_compat", "resolver_name"), sp)
    if sa.get("protocol", "TCP") != "TCP":
        raise ConfigError(w.join(sp, "protocol"), "only TCP is supported")
    return w.string(sa, "address", sp, nonempty=True), w.integer(sa, "port_value", sp, lo=0, hi=65535)


def string_matcher(d: dict, path: str) -> StringMatcher:
    w.check_keys(d, ("exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"), path)
    kind = w.one_of(d, ("exact", "prefix", "suffix", "contains", "safe_regex"), path)
    ic = w.boolean(d, "ignore_case", path, False)
    if kind == "safe_regex":
        rp = w.join(path, "safe_regex")
        r = w.check_keys(d["safe_regex"], ("regex", "google_re2"), rp)
        return StringMatcher(regex=w.compile_regex(r.get("regex"), w.join(rp, "regex"),
                                                   re.IGNORECASE if ic else 0), ignore_case=False)
    val = w.string(d, kind, path)
    return StringMatcher(**{kind: val.lower() if ic else val}, ignore_case=ic)


def header_matcher(d: dict, path: str) -> HeaderMatcher:
    w.check_keys(d, ("name", "exact_match", "safe_regex_match", "present_match", "prefix_match",
                     "suffix_match", "contains_match", "string_match", "invert_match",
                     "range_match", "treat_missing_header_as_empty"), path)
    name = w.string(d, "name", path, nonempty=True).lower()
    invert = w.boolean(d, "invert_match", path, False)
    kind = w.one_of(d, ("exact_match", "safe_regex_match", "present_match", "prefix_match",
                        "suffix_match", "contains_match", "string_match", "range_match"), path,
                    required=False)
    if kind is None:
        return HeaderMatcher(name=name, invert=invert)
    kp = w.join(path, kind)
    if kind == "present_match":
        return HeaderMatcher(name=name, present=w.boolean(d, kind, path), invert=invert)
    if kind == "string_match":
        return HeaderMatcher(name=name, value=string_matcher(d[kind], kp), invert=invert)
    if kind == "safe_regex_match":
        r = w.check_keys(d[kind], ("regex", "google_re2"), kp)
        return HeaderMatcher(name=name, value=StringMatcher(regex=w.compile_regex(r.get("regex"), w.join(kp, "regex"))),
                             invert=invert)
    if kind == "range_match":
        r = w.check_keys(d[kind], ("start", "end"), kp)
        return HeaderMatcher(name=name, range_start=w.integer(r, "start", kp),
                             range_end=w.integer(r, "end", kp), invert=invert)
    field = kind[: -len("_match")]
    return HeaderMatcher(name=name, value=StringMatcher(**{field: w.string(d, kind, path)}),
                         invert=invert)


def header_options(items: list, path: str) -> tuple[HeaderValueOption, ...]:
    out = []
    for i, item in enumerate(items):
        ip = w.join(path, i)
        w.check_keys(item, ("header", "append", "append_action", "keep_empty_value"), ip)
        hp = w.join(ip, "header")
        h = w.check_keys(w.mapping(item, "header", ip), ("key", "value"), hp)
        value = w.string(h, "value", hp, "")
        if "%" in value.replace("%%", ""):
            raise ConfigError(w.join(hp, "value"), "header value formatters (%...%) are not supported")
        value = value.replace("%%", "%")
        action = w.string(item, "append_action", ip, "APPEND_IF_EXISTS_OR_ADD",
                          choices=("APPEND_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS_OR_ADD",
                                   "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS"))
        append = action == "APPEND_IF_EXISTS_OR_ADD"
        if "append" in item:
            append = w.boolean(item, "append", ip)
        elif action not in ("APPEND_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS_OR_ADD"):
            raise ConfigError(w.join(ip, "append_action"), f"{action} is not supported")
        out.append(HeaderValueOption(name=w.string(h, "key", hp, nonempty=True).lower(),
                                     value=value, append=append))
    return tuple(out)


def header_mutation(d: dict, path: str) -> HeaderMutation:
    return HeaderMutation(
        request_add=header_options(w.seq(d, "request_headers_to_add", path, []),
                                   w.join(path, "request_headers_to_add")),
        request_remove=tuple(h.lower() for h in w.seq(d, "request_headers_to_remove", path, [])),
        response_add=header_options(w.seq(d, "response_headers_to_add", path, []),
                                    w.join(path, "response_headers_to_add")),
        response_remove=tuple(h.lower() for h in w.seq(d, "response_headers_to_remove", path, [])),
    )


def fractional_percent(d: dict, path: str) -> float:
    """Envoy FractionalPercent {numerator, denominator} -> percent (0..100)."""
    w.check_keys(d, ("numerator", "denominator"), path)
    num = w.integer(d, "numerator", path, 0, lo=0)
    den = w.string(d, "denominator", path, "HUNDRED",
                   choices=("HUNDRED", "TEN_THOUSAND", "MILLION"))
    return min(100.0, num * 100.0 / {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}[den])


def runtime_fraction(d: dict, path: str) -> float:
    w.check_keys(d, ("default_value", "runtime_key"), path)
    return fractional_percent(w.mapping(d, "default_value", path), w.join(path, "default_value"))


# ---- routes ------------------------------------------------------------------------------

_MUTATION_KEYS = ("request_headers_to_add", "request_headers_to_remove",
                  "response_headers_to_add", "response_headers_to_remove")


def per_filter_configs(d: dict, path: str) -> tuple[tuple[str, Any], ...]:
    out = []
    for name, cfg in (d or {}).items():
        p = w.join(path, name)
        spec = filter_registry.lookup(name)
        if spec is None or spec.per_route_from_envoy is None:
            raise ConfigError(p, f"per-route config for filter {name!r} is not supported")
        if isinstance(cfg, dict) and cfg.get("@type") == "type.googleapis.com/envoy.config.route.v3.FilterConfig":
            fc = typed(cfg, p, "type.googleapis.com/envoy.config.route.v3.FilterConfig")
            w.check_keys(fc, ("config", "disabled", "is_optional"), p)
            if fc.get("disabled"):
                out.append((spec.name, None))
                continue
            cfg = fc["config"]
            p = w.join(p, "config")
        body = typed(cfg, p, (spec.per_route_type_url, spec.type_url))
        out.append((spec.name, spec.per_route_from_envoy(body, p)))
    return tuple(out)


def route_match(d: dict, path: str) -> RouteMatch:
    w.check_keys(d, ("prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive",
                     "headers", "query_parameters", "runtime_fraction", "grpc"), path)
    if "grpc" in d:
        raise ConfigError(w.join(path, "grpc"), "gRPC route matching is not supported")
    kind = w.one_of(d, ("prefix", "path", "safe_regex", "path_separated_prefix"), path)
    cs = w.boolean(d, "case_sensitive", path, True)
    headers, methods = [], []
    for i, h in enumerate(w.seq(d, "headers", path, [])):
        hm = header_matcher(h, w.join(w.join(path, "headers"), i))
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
            qps.append(QueryMatcher(name=w.string(q, "name", qp), value=string_matcher(q["string_match"], w.join(qp, "string_match"))))
        else:
            qps.append(QueryMatcher(name=w.string(q, "name", qp), present=w.boolean(q, "present_match", qp, True)))
    kw: dict = {}
    if kind == "safe_regex":
        rp = w.join(path, "safe_regex")
        r = w.check_keys(d["safe_regex"], ("regex", "google_re2"), rp)
        kw["regex"] = w.compile_regex(r.get("regex"), w.join(rp, "regex"), 0 if cs else re.IGNORECASE)
    else:
        v = w.string(d, kind, path)
        if kind != "prefix" and not v.startswith("/"):
            raise ConfigError(w.join(path, kind), "must start with /")
        kw[kind] = v
    rf = runtime_fraction(d["runtime_fraction"], w.join(path, "runtime_fraction")) \
        if "runtime_fraction" in d else None
    return RouteMatch(case_sensitive=cs, headers=tuple(headers), query_params=tuple(qps),
                      methods=tuple(methods), runtime_fraction=rf, **kw)


def route_action(d: dict, path: str) -> RouteAction:
    w.check_keys(d, ("cluster", "weighted_clusters", "cluster_header", "prefix_rewrite",
                     "regex_rewrite", "host_rewrite_literal", "auto_host_rewrite", "timeout",
                     "idle_timeout", "retry_policy", "request_mirror_policies", "hash_policy",
                     "cluster_not_found_response_code", "max_stream_duration",
                     "priority"), path)
    kind = w.one_of(d, ("cluster", "weighted_clusters", "cluster_header"), path)
    w.string(d, "priority", path, "DEFAULT", choices=("DEFAULT",))   # HIGH routing: not supported
    kw: dict = {}
    if kind == "cluster":
        kw["cluster"] = w.string(d, "cluster", path, nonempty=True)
    elif kind == "cluster_header":
        kw["cluster_header"] = w.string(d, "cluster_header", path, nonempty=True).lower()
    else:
        wp = w.join(path, "weighted_clusters")
        wc = w.check_keys(d["weighted_clusters"], ("clusters", "total_weight", "runtime_key_prefix"), wp)
        items = []
        for i, c in enumerate(w.seq(wc, "clusters", wp)):
            cp = w.join(w.join(wp, "clusters"), i)
            w.check_keys(c, ("name", "weight", *_MUTATION_KEYS), cp)
            items.append(WeightedCluster(name=w.string(c, "name", cp, nonempty=True),
                                         weight=w.integer(c, "weight", cp, lo=0),
                                         headers=header_mutation(c, cp)))
        if not items or sum(x.weight for x in items) == 0:
            raise ConfigError(w.join(wp, "clusters"), "needs at least one cluster with weight > 0")
        kw["weighted_clusters"] = tuple(items)
    if "prefix_rewrite" in d and "regex_rewrite" in d:
        raise ConfigError(path, "only one of prefix_rewrite, regex_rewrite may be set")
    if "prefix_rewrite" in d:
        kw["prefix_rewrite"] = w.string(d, "prefix_rewrite", path)
    if "regex_rewrite" in d:
        rp = w.join(path, "regex_rewrite")
        r = w.check_keys(d["regex_rewrite"], ("pattern", "substitution"), rp)
        pat = w.check_keys(w.mapping(r, "pattern", rp), ("regex", "google_re2"), w.join(rp, "pattern"))
        rx = w.compile_regex(pat.get("regex"), w.join(rp, "pattern.regex"))
        # Envoy substitution uses \1 for groups, as Python's re.sub does
        kw["regex_rewrite"] = (rx, w.string(r, "substitution", rp, ""))
    if "host_rewrite_literal" in d:
        kw["host_rewrite"] = w.string(d, "host_rewrite_literal", path, nonempty=True)
    kw["auto_host_rewrite"] = w.boolean(d, "auto_host_rewrite", path, False)
    kw["timeout_s"] = w.duration(d, "timeout", path, 15.0)
    if "idle_timeout" in d and w.duration(d, "idle_timeout", path) != 0:
        raise ConfigError(w.join(path, "idle_timeout"), "per-route stream idle timeouts are not "
                          "supported (only 0s, disabled); use timeout or retry_policy.per_try_timeout")
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
    return RouteAction(**kw)


def route(d: dict, path: str) -> Route:
    w.check_keys(d, ("name", "match", "route", "direct_response", "redirect",
                     "typed_per_filter_config", "decorator", "metadata", *_MUTATION_KEYS), path)
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
                     "require_tls", "include_request_attempt_count", *_MUTATION_KEYS), path)
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
    )


def route_configuration(d: dict, path: str) -> RouteConfig:
    w.check_keys(d, ("name", "virtual_hosts", "validate_clusters", "@type", *_MUTATION_KEYS), path)
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


# ---- listeners ---------------------------------------------------------------------------

def http_filters(items: list, path: str) -> tuple[HttpFilter, ...]:
    out: list[HttpFilter] = []
    if not items or (items[-1] or {}).get("name") != filter_registry.ROUTER:
        raise ConfigError(path, f"must end with {filter_registry.ROUTER}")
    for i, f in enumerate(items):
        fp = w.join(path, i)
        w.check_keys(f, ("name", "typed_config", "disabled", "is_optional"), fp)
        name = w.string(f, "name", fp, nonempty=True)
        if name == filter_registry.ROUTER:
            if i != len(items) - 1:
                raise ConfigError(fp, "the router filter must be last")
            if "typed_config" in f:
                rc = typed(f["typed_config"], w.join(fp, "typed_config"), T_ROUTER)
                w.check_keys(rc, ("suppress_envoy_headers", "start_child_span"), w.join(fp, "typed_config"))
            continue
        spec = filter_registry.lookup(name)
        if spec is None:
            raise ConfigError(w.join(fp, "name"), f"unsupported HTTP filter {name!r} (supported: "
                              f"{', '.join(filter_registry.known_names())}, {filter_registry.ROUTER})")
        tp = w.join(fp, "typed_config")
        body = typed(w.mapping(f, "typed_config", fp), tp, spec.type_url)
        out.append(HttpFilter(name=spec.name, config=spec.from_envoy(body, tp),
                              disabled=w.boolean(f, "disabled", fp, False)))
    return tuple(out)


def access_logs(items: list, path: str) -> tuple[AccessLogConfig, ...]:
    out = []
    for i, a in enumerate(items):
        ap = w.join(path, i)
        w.check_keys(a, ("name", "typed_config"), ap)
        tp = w.join(ap, "typed_config")
        tc = w.mapping(a, "typed_config", ap)
        t = tc.get("@type")
        if t == T_FILE_LOG:
            body = typed(tc, tp, T_FILE_LOG)
            w.check_keys(body, ("path", "json_format", "log_format"), tp)
            out.append(AccessLogConfig(path=w.string(body, "path", tp, nonempty=True),
                                       format="text" if "log_format" in body and "json_format" not in body else "json"))
        else:
            body = typed(tc, tp, T_STDOUT_LOG)
            w.check_keys(body, ("log_format",), tp)
            out.append(AccessLogConfig(path="/dev/stdout"))
    return tuple(out)


def listener(d: dict, path: str, rds_routes: Optional[dict[str, RouteConfig]] = None) -> Listener:
    """``rds_routes``: route configs by name already known (RDS), or None for a bootstrap."""
    from sidecar.tls.context import downstream_tls_from_envoy

    w.check_keys(d, ("name", "address", "filter_chains", "per_connection_buffer_limit_bytes",
                     "@type", "stat_prefix", "traffic_direction"), path)
    host, port_ = socket_address(w.mapping(d, "address", path), w.join(path, "address"))
    chains = w.seq(d, "filter_chains", path)
    if len(chains) != 1:
        raise ConfigError(w.join(path, "filter_chains"), "exactly one filter chain is supported")
    cp = w.join(w.join(path, "filter_chains"), 0)
    chain = w.check_keys(chains[0], ("filters", "transport_socket", "name"), cp)
    tls = None
    if "transport_socket" in chain:
        tls = downstream_tls_from_envoy(chain["transport_socket"], w.join(cp, "transport_socket"))
    fl = w.seq(chain, "filters", cp)
    if len(fl) != 1 or fl[0].get("name") != "envoy.filters.network.http_connection_manager":
        raise ConfigError(w.join(cp, "filters"),
                          "exactly one filter, envoy.filters.network.http_connection_manager, is supported")
    fp = w.join(w.join(cp, "filters"), 0)
    w.check_keys(fl[0], ("name", "typed_config"), fp)
    hp = w.join(fp, "typed_config")
    hcm = typed(w.mapping(fl[0], "typed_config", fp), hp, T_HCM)
    w.check_keys(hcm, ("stat_prefix", "codec_type", "route_config", "rds", "http_filters",
                       "access_log", "generate_request_id", "use_remote_address",
                       "xff_num_trusted_hops", "common_http_protocol_options",
                       "request_headers_timeout", "request_timeout", "stream_idle_timeout",
                       "drain_timeout", "server_name", "max_request_headers_kb",
                       "preserve_external_request_id", "normalize_path",
                       "merge_slashes", "strip_any_host_port", "strip_matching_host_port",
                       "http_protocol_options", "tracing"), hp)
    w.string(hcm, "codec_type", hp, "AUTO", choices=("AUTO", "HTTP1"))
    rc = None
    rds_name = ""
    kind = w.one_of(hcm, ("route_config", "rds"), hp)
    if kind == "route_config":
        rc = route_configuration(hcm["route_config"], w.join(hp, "route_config"))
    else:
        rp = w.join(hp, "rds")
        r = w.check_keys(hcm["rds"], ("route_config_name", "config_source"), rp)
        rds_name = w.string(r, "route_config_name", rp, nonempty=True)
        if rds_routes is not None and rds_name in rds_routes:
            rc = rds_routes[rds_name]
    cho = w.mapping(hcm, "common_http_protocol_options", hp, {})
    chp = w.join(hp, "common_http_protocol_options")
    w.check_keys(cho, ("idle_timeout", "max_headers_count", "headers_with_underscores_action"), chp)
    stat_prefix = w.string(hcm, "stat_prefix", hp, nonempty=True)
    direction = w.string(d, "traffic_direction", path, "OUTBOUND",
                         choices=("UNSPECIFIED", "INBOUND", "OUTBOUND")).lower()
    return Listener(
        name=w.string(d, "name", path, "") or f"{host}:{port_}",
        host=host, port=port_, route_config=rc, rds_name=rds_name,
        http_filters=http_filters(w.seq(hcm, "http_filters", hp, []), w.join(hp, "http_filters")),
        stat_prefix=stat_prefix,
        direction="inbound" if direction == "inbound" else "outbound",
        idle_timeout_s=w.duration(cho, "idle_timeout", chp, 3600.0),
        request_headers_timeout_s=w.duration(hcm, "request_headers_timeout", hp, 10.0),
        request_timeout_s=w.duration(hcm, "request_timeout", hp, 0.0),
        max_request_headers_kb=w.integer(hcm, "max_request_headers_kb", hp, 60, lo=1, hi=8192),
        accept_http_10=_accept_http_10(hcm, hp),
        generate_request_id=w.boolean(hcm, "generate_request_id", hp, True),
        xff_num_trusted_hops=w.integer(hcm, "xff_num_trusted_hops", hp, 0, lo=0),
        use_remote_address=w.boolean(hcm, "use_remote_address", hp, False),
        preserve_external_request_id=w.boolean(hcm, "preserve_external_request_id", hp, False),
        server_name=w.string(hcm, "server_name", hp, "envoy"),
        strip_host_port="any" if w.boolean(hcm, "strip_any_host_port", hp, False)
        else "matching" if w.boolean(hcm, "strip_matching_host_port", hp, False) else "none",
        strip_host_header=True,
        access_log=access_logs(w.seq(hcm, "access_log", hp, []), w.join(hp, "access_log")),
        drain_timeout_s=w.duration(hcm, "drain_timeout", hp, 5.0),
        tls=tls,
        tracing=hcm_tracing(hcm["tracing"], w.join(hp, "tracing")) if "tracing" in hcm else None,
        source=d,
    )


T_OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"


def hcm_tracing(d: dict, path: str) -> TracingConfig:
    """HCM ``tracing`` with the OpenTelemetry tracer over OTLP/HTTP (``http_service``)."""
    w.check_keys(d, ("provider", "random_sampling", "client_sampling", "overall_sampling",
                     "spawn_upstream_span"), path)
    percent = 100.0
    for key in ("random_sampling", "overall_sampling"):
        if key in d:
            sp = w.join(path, key)
            v = w.check_keys(d[key], ("value",), sp)
            percent = min(percent, w.number(v, "value", sp, lo=0, hi=100))
    pp = w.join(path, "provider")
    prov = w.check_keys(w.mapping(d, "provider", path), ("name", "typed_config"), pp)
    tp = w.join(pp, "typed_config")
    body = typed(w.mapping(prov, "typed_config", pp), tp, T_OTEL)
    w.check_keys(body, ("http_service", "service_name"), tp)
    if "http_service" not in body:
        raise ConfigError(tp, "only http_service (OTLP/HTTP) export is supported")
    hs = w.join(tp, "http_service")
    svc = w.check_keys(body["http_service"], ("http_uri", "request_headers_to_add"), hs)
    if svc.get("request_headers_to_add"):
        raise ConfigError(w.join(hs, "request_headers_to_add"), "is not supported")
    up = w.join(hs, "http_uri")
    uri = w.check_keys(w.mapping(svc, "http_uri", hs), ("uri", "cluster", "timeout"), up)
    return TracingConfig(sample_percent=percent, exporter="otlp_http",
                         endpoint=w.string(uri, "uri", up, nonempty=True),
                         service_name=w.string(body, "service_name", tp, "sidecar"))


def _accept_http_10(hcm: dict, hp: str) -> bool:
    op = w.join(hp, "http_protocol_options")
    o = w.check_keys(w.mapping(hcm, "http_protocol_options", hp, {}), ("accept_http_10",), op)
    return w.boolean(o, "accept_http_10", op, False)


# ---- clusters ----------------------------------------------------------------------------

def load_assignment(d: dict, path: str) -> tuple[str, tuple[Endpoint, ...]]:
    w.check_keys(d, ("cluster_name", "endpoints", "policy", "@type"), path)
    eps = []
    ep_path = w.join(path, "endpoints")
    for i, le in enumerate(w.seq(d, "endpoints", path, [])):
        lp = w.join(ep_path, i)
        w.check_keys(le, ("lb_endpoints", "locality", "priority", "load_balancing_weight"), lp)
        if w.integer(le, "priority", lp, 0) != 0:
            raise ConfigError(w.join(lp, "priority"), "only priority 0 is supported")
        for j, lbe in enumerate(w.seq(le, "lb_endpoints", lp, [])):
            bp = w.join(w.join(lp, "lb_endpoints"), j)
            w.check_keys(lbe, ("endpoint", "load_balancing_weight", "health_status", "metadata"), bp)
            ep = w.mapping(lbe, "endpoint", bp)
            epp = w.join(bp, "endpoint")
            w.check_keys(ep, ("address", "hostname", "health_check_config"), epp)
            host, prt = socket_address(w.mapping(ep, "address", epp), w.join(epp, "address"))
            if prt == 0:
                raise ConfigError(w.join(epp, "address.socket_address.port_value"), "must be 1..65535")
            status = w.string(lbe, "health_status", bp, "UNKNOWN")
            if status in ("UNHEALTHY", "DRAINING", "TIMEOUT"):
                continue   # EDS says not to use it
            eps.append(Endpoint(host=host, port=prt,
                                weight=w.integer(lbe, "load_balancing_weight", bp, 1, lo=1),
                                hostname=w.string(ep, "hostname", epp, "")))
    return w.string(d, "cluster_name", path, ""), tuple(eps)


def cluster(d: dict, path: str) -> Cluster:
    from sidecar.tls.context import upstream_tls_from_envoy

    w.check_keys(d, ("name", "type", "connect_timeout", "lb_policy", "load_assignment",
                     "dns_refresh_rate", "dns_lookup_family", "circuit_breakers",
                     "outlier_detection", "health_checks", "transport_socket",
                     "eds_cluster_config", "common_lb_config", "least_request_lb_config",
                     "ring_hash_lb_config", "load_balancing_policy", "per_connection_buffer_limit_bytes",
                     "typed_extension_protocol_options", "@type", "respect_dns_ttl",
                     "upstream_connection_options", "alt_stat_name"), path)
    name = w.string(d, "name", path, nonempty=True)
    ctype = w.string(d, "type", path, "STATIC",
                     choices=("STATIC", "STRICT_DNS", "LOGICAL_DNS", "EDS")).lower()
    kw: dict = {}
    eps: tuple = ()
    if "load_assignment" in d:
        _, eps = load_assignment(d["load_assignment"], w.join(path, "load_assignment"))
    elif ctype != "eds":
        raise ConfigError(w.join(path, "load_assignment"), f"is required for a {ctype.upper()} cluster")
    if ctype == "eds":
        ep = w.join(path, "eds_cluster_config")
        e = w.check_keys(w.mapping(d, "eds_cluster_config", path, {}), ("service_name", "eds_config"), ep)
        kw["eds_service_name"] = w.string(e, "service_name", ep, name)
    lb_policy = w.string(d, "lb_policy", path, "ROUND_ROBIN",
                         choices=("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST", "RING_HASH", "MAGLEV",
                                  "CLUSTER_PROVIDED", "LOAD_BALANCING_POLICY_CONFIG"))
    lb_kw: dict = {"policy": lb_policy.lower()}
    if "least_request_lb_config" in d:
        lp = w.join(path, "least_request_lb_config")
        lr = w.check_keys(d["least_request_lb_config"], ("choice_count",), lp)
        lb_kw["choice_count"] = w.integer(lr, "choice_count", lp, 2, lo=2)
    if "ring_hash_lb_config" in d:
        lp = w.join(path, "ring_hash_lb_config")
        rh = w.check_keys(d["ring_hash_lb_config"], ("minimum_ring_size", "maximum_ring_size", "hash_function"), lp)
        lb_kw["ring_size"] = w.integer(rh, "minimum_ring_size", lp, 1024, lo=1, hi=8_388_608)
    if "common_lb_config" in d:
        lp = w.join(path, "common_lb_config")
        cl = w.check_keys(d["common_lb_config"], ("healthy_panic_threshold",), lp)
        if "healthy_panic_threshold" in cl:
            pt = w.check_keys(cl["healthy_panic_threshold"], ("value",), w.join(lp, "healthy_panic_threshold"))
            lb_kw["panic_threshold"] = w.number(pt, "value", w.join(lp, "healthy_panic_threshold"), lo=0, hi=100)
    if "load_balancing_policy" in d:
        lp = w.join(path, "load_balancing_policy")
        lbp = w.check_keys(d["load_balancing_policy"], ("policies",), lp)
        pols = w.seq(lbp, "policies", lp)
        if len(pols) != 1:
            raise ConfigError(w.join(lp, "policies"), "exactly one policy is supported")
        pp = w.join(w.join(lp, "policies"), 0)
        ext = w.check_keys(pols[0], ("typed_extension_config",), pp)
        tp = w.join(pp, "typed_extension_config")
        tec = w.check_keys(w.mapping(ext, "typed_extension_config", pp), ("name", "typed_config"), tp)
        body = typed(w.mapping(tec, "typed_config", tp), w.join(tp, "typed_config"), T_PEAK_EWMA)
        bp = w.join(tp, "typed_config")
        w.check_keys(body, ("decay_time", "default_rtt", "choice_count", "failure_penalty"), bp)
        lb_kw.update(policy="peak_ewma", ewma_decay_s=w.duration(body, "decay_time", bp, 10.0),
                     ewma_default_rtt_s=w.duration(body, "default_rtt", bp, 0.030),
                     choice_count=w.integer(body, "choice_count", bp, 2, lo=2),
                     ewma_failure_penalty_s=w.duration(body, "failure_penalty", bp, 0.0))
    if lb_kw["policy"] in ("cluster_provided", "load_balancing_policy_config") and lb_kw["policy"] != "peak_ewma":
        if "load_balancing_policy" not in d:
            raise ConfigError(w.join(path, "lb_policy"), f"{lb_policy} is not supported")
    if "typed_extension_protocol_options" in d:
        tp = w.join(path, "typed_extension_protocol_options")
        for k, v in d["typed_extension_protocol_options"].items():
            kp = w.join(tp, k)
            if k != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions":
                raise ConfigError(kp, "unsupported protocol options")
            body = typed(v, kp, T_HTTP_OPTIONS)
            w.check_keys(body, ("explicit_http_config", "common_http_protocol_options"), kp)
            eh = body.get("explicit_http_config", {})
            if set(eh) - {"http_protocol_options"}:
                raise ConfigError(w.join(kp, "explicit_http_config"), "only HTTP/1.1 upstreams are supported")
            cho = body.get("common_http_protocol_options", {})
            w.check_keys(cho, ("idle_timeout",), w.join(kp, "common_http_protocol_options"))
            if "idle_timeout" in cho:
                kw["idle_timeout_s"] = w.duration(cho, "idle_timeout", w.join(kp, "common_http_protocol_options"))
    if "circuit_breakers" in d:
        kw["circuit_breakers"] = circuit_breakers_from_envoy(d["circuit_breakers"], w.join(path, "circuit_breakers"))
    if "outlier_detection" in d:
        kw["outlier_detection"] = outlier_detection_from_wire(d["outlier_detection"], w.join(path, "outlier_detection"))
    hc = w.seq(d, "health_checks", path, [])
    kw["health_checks"] = tuple(health_check_from_envoy(h, w.join(w.join(path, "health_checks"), i))
                                for i, h in enumerate(hc))
    if "transport_socket" in d:
        kw["tls"] = upstream_tls_from_envoy(d["transport_socket"], w.join(path, "transport_socket"))
    if "per_connection_buffer_limit_bytes" in d:
        kw["per_connection_buffer_limit"] = w.integer(d, "per_connection_buffer_limit_bytes", path, lo=1024)
    return Cluster(name=name, type=ctype, endpoints=eps,
                   connect_timeout_s=w.duration(d, "connect_timeout", path, 5.0),
                   dns_refresh_s=w.duration(d, "dns_refresh_rate", path, 5.0),
                   lb=LbConfig(**lb_kw), source=d, **kw)


# ---- bootstrap ---------------------------------------------------------------------------

def _collect(items: list, path: str, fn: Callable, errs: ErrorCollector) -> list:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(fn(item, w.join(path, i)))
        except (ConfigError, ConfigErrors) as e:
            errs.capture(e)
    return out


def bootstrap(d: dict) -> Snapshot:
    """An Envoy v3 bootstrap -> Snapshot (static parts; dynamic_resources kept for the client)."""
    errs = ErrorCollector()
    try:
        w.check_keys(d, ("node", "admin", "static_resources", "dynamic_resources",
                         "layered_runtime", "stats_flush_interval", "overload_manager"), "")
    except ConfigError as e:
        errs.capture(e)
    admin = Admin()
    if "admin" in d:
        try:
            a = w.check_keys(d["admin"], ("address", "access_log", "access_log_path", "profile_path"), "admin")
            host, prt = socket_address(w.mapping(a, "address", "admin"), "admin.address")
            admin = Admin(host=host, port=prt)
        except ConfigError as e:
            errs.capture(e)
    sr = d.get("static_resources") or {}
    try:
        w.check_keys(sr, ("listeners", "clusters", "secrets"), "static_resources")
    except ConfigError as e:
        errs.capture(e)
    clusters = _collect(sr.get("clusters") or [], "static_resources.clusters", cluster, errs)
    listeners = _collect(sr.get("listeners") or [], "static_resources.listeners", listener, errs)
    control_plane = None
    if d.get("dynamic_resources"):
        try:
            from control_plane_client.config import control_plane_from_bootstrap
            control_plane = control_plane_from_bootstrap(d, "dynamic_resources")
        except (ConfigError, ConfigErrors) as e:
            errs.capture(e)
    tracing = TracingConfig()
    traced = [(i, lst.tracing) for i, lst in enumerate(listeners) if lst.tracing is not None]
    if traced:
        tracing = traced[0][1]
        for i, t in traced[1:]:
            if t != tracing:
                errs.add(f"static_resources.listeners[{i}].filter_chains[0].filters[0]."
                         "typed_config.tracing", "every listener must use the same tracing "
                         "config (one tracer per process)")
    errs.raise_if_any()
    snap = Snapshot(listeners=tuple(listeners), clusters=tuple(clusters), admin=admin,
                    source_format="envoy", control_plane=control_plane, node=d.get("node"),
                    tracing=tracing)
    check_references(snap)
    return snap


def check_references(snap: Snapshot, native: bool = False) -> None:
    """Every cluster a route names must exist; names and addresses must be unique."""
    errs = ErrorCollector()
    base = "" if native else "static_resources."
    names: dict[str, int] = {}
    for i, c in enumerate(snap.clusters):
        if c.name in names:
            errs.add(f"{base}clusters[{i}].name", f"duplicate cluster name {c.name!r}")
        names[c.name] = i
    ports: dict[tuple, int] = {}
    for li, lst in enumerate(snap.listeners):
        key = (lst.host, lst.port)
        if key in ports and lst.port != 0:
            errs.add(f"{base}listeners[{li}].address",
                     f"{lst.host}:{lst.port} is already used by listeners[{ports[key]}]")
        ports[key] = li
        if lst.route_config is None:
            continue
        flat = native and isinstance(lst.source, dict) and "routes" in lst.source
        for vi, vh in enumerate(lst.route_config.virtual_hosts):
            for ri, r in enumerate(vh.routes):
                a = r.action
                if not isinstance(a, RouteAction):
                    continue
                if flat:
                    p = f"listeners[{li}].routes[{ri}]"
                elif native:
                    p = f"listeners[{li}].virtual_hosts[{vi}].routes[{ri}]"
                else:
                    p = (f"{base}listeners[{li}].filter_chains[0].filters[0].typed_config."
                         f"route_config.virtual_hosts[{vi}].routes[{ri}].route")
                targets = [a.cluster] if a.cluster else [x.name for x in a.weighted_clusters]
                targets += [m.cluster for m in a.mirrors]
                for t in targets:
                    if t not in names:
                        errs.add(p, f"unknown cluster {t!r}")
    errs.raise_if_any()
