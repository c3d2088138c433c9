"""Envoy v3 Listener -> the listener model: an HTTP connection manager's settings (HTTP filters,
access logs, tracing, timeouts, edge options), and for L4 listeners their filter chains."""

from __future__ import annotations

from dataclasses import replace

import filters as filter_registry
from control_plane_client.translate.access_log import access_logs, connection_logs
from control_plane_client.translate.common import T_HCM, T_ROUTER, socket_address, typed
from control_plane_client.translate.dynamic import config_source
from control_plane_client.translate.l4 import filter_chain_match, listener_filters, tcp_chain
from control_plane_client.translate.route import route_configuration
from control_plane_client.translate.telemetry import ISTIO_STATS, T_ISTIO_STATS, istio_stats
from control_plane_client.translate.tls import Secrets, downstream_tls_from_envoy
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.http2 import DOWNSTREAM_DEFAULTS, http2_options_from_wire, upgrade_configs_from_wire
from sidecar.config.l4 import FilterChainMatch
from sidecar.config.listener import ESCAPED_SLASHES_ACTIONS, FilterChain, Listener, TracingConfig
from sidecar.config.route import HttpFilter, RouteConfig
from sidecar.config.telemetry import IstioMetrics


def router_suppresses_envoy_headers(items: list, path: str) -> bool:
    """The router filter's ``suppress_envoy_headers`` (it is the last filter)."""
    if not items or not isinstance(items[-1], dict) or "typed_config" not in items[-1]:
        return False
    tp = w.join(w.join(path, len(items) - 1), "typed_config")
    rc = typed(items[-1]["typed_config"], tp, T_ROUTER)
    return w.boolean(rc, "suppress_envoy_headers", tp, False)


def http_filters(items: list, path: str, istio: list[IstioMetrics] | None = None
                 ) -> tuple[HttpFilter, ...]:
    """``istio``: where the ``istio.stats`` filter's settings go (it is not a request filter:
    it becomes the listener's ``istio_metrics``)."""
    out: list[HttpFilter] = []
    seen: dict[str, int] = {}
    if not items or (items[-1] or {}).get("name") != filter_registry.ROUTER:
        raise ConfigError(path, f"must end with {filter_registry.ROUTER}")
    for i, f in enumerate(items):
        fp = w.join(path, i)
        w.check_keys(f, ("name", "typed_config", "disabled"), fp)
        name = w.string(f, "name", fp, nonempty=True)
        if name == ISTIO_STATS and istio is not None:
            if istio:
                raise ConfigError(fp, f"{ISTIO_STATS} is already in the chain")
            if w.boolean(f, "disabled", fp, False):
                raise ConfigError(w.join(fp, "disabled"), f"is not supported on {ISTIO_STATS}")
            tp = w.join(fp, "typed_config")
            istio.append(istio_stats(typed(w.mapping(f, "typed_config", fp, {"@type": T_ISTIO_STATS}),
                                           tp, T_ISTIO_STATS), tp))
            continue
        if name == filter_registry.ROUTER:
            if i != len(items) - 1:
                raise ConfigError(fp, "the router filter must be last")
            if "typed_config" in f:
                rc = typed(f["typed_config"], w.join(fp, "typed_config"), T_ROUTER)
                w.check_keys(rc, ("suppress_envoy_headers",), w.join(fp, "typed_config"))
            continue
        tc = f.get("typed_config")
        spec = filter_registry.lookup(name)
        instance, kind = name, ""
        if spec is None or spec.name_instance is not None:
            # Envoy finds an extension by its typed_config @type; the name is the instance's
            # own (per-route overrides are keyed by it)
            spec = filter_registry.by_type_url(tc.get("@type") if isinstance(tc, dict) else None)
            if spec is None:
                raise ConfigError(w.join(fp, "name"), f"unsupported HTTP filter {name!r} (supported: "
                                  f"{', '.join(filter_registry.known_names())}, "
                                  f"{filter_registry.ROUTER}; or a typed_config of one of their "
                                  "types, such as the user filter type "
                                  "type.googleapis.com/pysidecar.filter.v1.PythonFilter)")
            if spec.name != name:
                kind = spec.name
        else:
            instance = spec.name
        tp = w.join(fp, "typed_config")
        body = typed(w.mapping(f, "typed_config", fp), tp, spec.type_url)
        config = spec.from_envoy(body, tp)
        if spec.name_instance is not None:
            instance, config = spec.name_instance(config, name)
            kind = spec.name
        if instance in seen and spec.name_instance is not None:
            raise ConfigError(w.join(fp, "name"), f"filter name {instance!r} is already used by "
                              f"{w.join(path, seen[instance])}")
        seen[instance] = i
        out.append(HttpFilter(name=instance, config=config,
                              disabled=w.boolean(f, "disabled", fp, False), kind=kind))
    return tuple(out)


HCM_FILTER = "envoy.filters.network.http_connection_manager"
_LISTENER_FIELDS = ("name", "address", "filter_chains", "@type", "traffic_direction",
                    "listener_filters", "listener_filters_timeout",
                    "continue_on_listener_filters_timeout", "default_filter_chain", "access_log",
                    "per_connection_buffer_limit_bytes")
_CHAIN_FIELDS = ("filters", "transport_socket", "name", "filter_chain_match")


def listener(d: dict, path: str, rds_routes: dict[str, RouteConfig] | None = None,
             secrets: Secrets | None = None) -> Listener:
    """``rds_routes``: route configs by name already known (RDS), or None for a bootstrap.

    A listener with one HTTP connection manager chain, no match and no listener filters is an
    HTTP listener (its fields carry the HCM settings); anything else keeps its filter chains
    (``Listener.filter_chains``), each an HTTP or a TCP chain, picked per connection."""
    w.check_keys(d, _LISTENER_FIELDS, path)
    host, port_ = socket_address(w.mapping(d, "address", path), w.join(path, "address"))
    name = w.string(d, "name", path, "") or f"{host}:{port_}"
    direction = w.string(d, "traffic_direction", path, "OUTBOUND",
                         choices=("UNSPECIFIED", "INBOUND", "OUTBOUND")).lower()
    direction = "inbound" if direction == "inbound" else "outbound"
    base = Listener(name=name, host=host, port=port_, direction=direction, source=d)
    chains = w.seq(d, "filter_chains", path, [])
    cp = w.join(path, "filter_chains")
    parsed = [filter_chain(c, w.join(cp, i), base, rds_routes, secrets)
              for i, c in enumerate(chains)]
    default = None
    if d.get("default_filter_chain") is not None:
        default = filter_chain(d["default_filter_chain"], w.join(path, "default_filter_chain"),
                               base, rds_routes, secrets, default=True)
    if not parsed and default is None:
        raise ConfigError(cp, "needs at least one filter chain (or a default_filter_chain)")
    lfilters = listener_filters(d, path)
    logs = connection_logs(w.seq(d, "access_log", path, []), w.join(path, "access_log"))
    check_unique_matches(parsed, cp)
    only = parsed[0] if len(parsed) == 1 else None
    if only is not None and only.http is not None and default is None and not lfilters.filters \
            and only.match == FilterChainMatch() and not logs:
        if "per_connection_buffer_limit_bytes" in d:
            raise ConfigError(w.join(path, "per_connection_buffer_limit_bytes"),
                              "only applies to L4 listeners (filter chains, tcp_proxy)")
        return replace(only.http, tls=only.tls)      # the common HTTP listener
    return replace(base, buffer_limit_bytes=w.integer(d, "per_connection_buffer_limit_bytes",
                                                      path, 1024 * 1024, lo=1024),
                   filter_chains=tuple(parsed), default_filter_chain=default,
                   listener_filters=lfilters, connection_log=logs)


def check_unique_matches(parsed: list[FilterChain], path: str) -> None:
    """Envoy refuses two chains with the same match: the second could never be picked."""
    seen: dict[FilterChainMatch, int] = {}
    for i, c in enumerate(parsed):
        j = seen.get(c.match)
        if j is not None:
            raise ConfigError(w.join(path, i), f"filter_chain_match is the same as that of "
                                               f"filter_chains[{j}]: it could never be picked")
        seen[c.match] = i


def filter_chain(d: dict, path: str, base: Listener, rds_routes: dict[str, RouteConfig] | None,
                 secrets: Secrets | None, default: bool = False) -> FilterChain:
    w.check_keys(d, _CHAIN_FIELDS, path)
    if default and "filter_chain_match" in d:
        raise ConfigError(w.join(path, "filter_chain_match"), "a default filter chain has no match")
    match = FilterChainMatch()
    if d.get("filter_chain_match") is not None:
        match = filter_chain_match(d["filter_chain_match"], w.join(path, "filter_chain_match"))
    tls = None
    if "transport_socket" in d:
        tls = downstream_tls_from_envoy(d["transport_socket"], w.join(path, "transport_socket"),
                                        secrets)
    name = w.string(d, "name", path, "")
    fl = w.seq(d, "filters", path)
    fp = w.join(path, "filters")
    if not fl:
        raise ConfigError(fp, "needs a terminal filter (http_connection_manager or tcp_proxy)")
    if any(isinstance(f, dict) and f.get("name") == HCM_FILTER for f in fl):
        if len(fl) != 1:
            raise ConfigError(fp, f"{HCM_FILTER} must be the chain's only network filter")
        f0 = w.join(fp, 0)
        w.check_keys(fl[0], ("name", "typed_config"), f0)
        hp = w.join(f0, "typed_config")
        hcm = typed(w.mapping(fl[0], "typed_config", f0), hp, T_HCM)
        return FilterChain(name=name, match=match, tls=tls,
                           http=http_connection_manager(hcm, hp, base, rds_routes))
    return FilterChain(name=name, match=match, tls=tls, tcp=tcp_chain(fl, fp))


def http_connection_manager(hcm: dict, hp: str, base: Listener,
                            rds_routes: dict[str, RouteConfig] | None) -> Listener:
    """An HCM's settings, in the shape of an HTTP listener (name, address from ``base``)."""
    w.check_keys(hcm, ("stat_prefix", "codec_type", "route_config", "rds", "http_filters",
                       "access_log", "generate_request_id", "use_remote_address",
                       "xff_num_trusted_hops", "common_http_protocol_options",
                       "request_headers_timeout", "request_timeout", "stream_idle_timeout",
                       "drain_timeout", "server_name", "max_request_headers_kb",
                       "preserve_external_request_id", "normalize_path",
                       "merge_slashes", "path_with_escaped_slashes_action",
                       "strip_any_host_port", "strip_matching_host_port",
                       "http_protocol_options", "tracing", "http2_protocol_options",
                       "upgrade_configs"), hp)
    codec = w.string(hcm, "codec_type", hp, "AUTO", choices=("AUTO", "HTTP1", "HTTP2")).lower()
    http2 = http2_options_from_wire(hcm.get("http2_protocol_options"),
                                    w.join(hp, "http2_protocol_options"), DOWNSTREAM_DEFAULTS)
    if codec == "http1" and "http2_protocol_options" in hcm:
        raise ConfigError(w.join(hp, "http2_protocol_options"), "codec_type HTTP1 never speaks HTTP/2")
    upgrades = upgrade_configs_from_wire(hcm.get("upgrade_configs"), w.join(hp, "upgrade_configs"))
    rc = None
    rds_name = ""
    kind = w.one_of(hcm, ("route_config", "rds"), hp)
    if kind == "route_config":
        rc = route_configuration(hcm["route_config"], w.join(hp, "route_config"))
    else:
        rp = w.join(hp, "rds")
        r = w.check_keys(hcm["rds"], ("route_config_name", "config_source"), rp)
        rds_name = w.string(r, "route_config_name", rp, nonempty=True)
        if "config_source" in r:
            # honoured by the xDS client's RDS subscription; checked here so that a bad one
            # is an error with its path
            config_source(w.mapping(r, "config_source", rp), w.join(rp, "config_source"))
        if rds_routes is not None and rds_name in rds_routes:
            rc = rds_routes[rds_name]
    cho = w.mapping(hcm, "common_http_protocol_options", hp, {})
    chp = w.join(hp, "common_http_protocol_options")
    w.check_keys(cho, ("idle_timeout", "max_headers_count", "headers_with_underscores_action",
                       "max_stream_duration"), chp)
    stat_prefix = w.string(hcm, "stat_prefix", hp, nonempty=True)
    istio: list[IstioMetrics] = []
    chain_filters = http_filters(w.seq(hcm, "http_filters", hp, []), w.join(hp, "http_filters"), istio)
    return replace(
        base,
        route_config=rc, rds_name=rds_name,
        http_filters=chain_filters,
        istio_metrics=istio[0] if istio else None,
        stat_prefix=stat_prefix,
        idle_timeout_s=w.duration(cho, "idle_timeout", chp, 3600.0),
        request_headers_timeout_s=w.duration(hcm, "request_headers_timeout", hp, 10.0),
        request_timeout_s=w.duration(hcm, "request_timeout", hp, 0.0),
        stream_idle_timeout_s=w.duration(hcm, "stream_idle_timeout", hp, 300.0),
        max_stream_duration_s=w.duration(cho, "max_stream_duration", chp, 0.0),
        max_request_headers_kb=w.integer(hcm, "max_request_headers_kb", hp, 60, lo=1, hi=8192),
        max_headers_count=w.integer(cho, "max_headers_count", chp, 100, lo=1),
        headers_with_underscores_action=w.string(
            cho, "headers_with_underscores_action", chp, "ALLOW",
            choices=("ALLOW", "REJECT_REQUEST", "DROP_HEADER")),
        normalize_path=w.boolean(hcm, "normalize_path", hp, False),
        merge_slashes=w.boolean(hcm, "merge_slashes", hp, False),
        path_with_escaped_slashes_action=_escaped_slashes(hcm, hp),
        accept_http_10=_accept_http_10(hcm, hp),
        generate_request_id=w.boolean(hcm, "generate_request_id", hp, True),
        xff_num_trusted_hops=w.integer(hcm, "xff_num_trusted_hops", hp, 0, lo=0),
        use_remote_address=w.boolean(hcm, "use_remote_address", hp, False),
        preserve_external_request_id=w.boolean(hcm, "preserve_external_request_id", hp, False),
        server_name=w.string(hcm, "server_name", hp, "envoy"),
        suppress_envoy_headers=router_suppresses_envoy_headers(
            w.seq(hcm, "http_filters", hp, []), w.join(hp, "http_filters")),
        strip_host_port="any" if w.boolean(hcm, "strip_any_host_port", hp, False)
        else "matching" if w.boolean(hcm, "strip_matching_host_port", hp, False) else "none",
        strip_host_header=True,
        access_log=access_logs(w.seq(hcm, "access_log", hp, []), w.join(hp, "access_log")),
        drain_timeout_s=w.duration(hcm, "drain_timeout", hp, 5.0),
        tracing=hcm_tracing(hcm["tracing"], w.join(hp, "tracing")) if "tracing" in hcm else None,
        codec=codec, http2=http2, upgrades=upgrades,
    )


T_OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"


def hcm_tracing(d: dict, path: str) -> TracingConfig:
    """HCM ``tracing`` with the OpenTelemetry tracer over OTLP/HTTP (``http_service``)."""
    w.check_keys(d, ("provider", "random_sampling", "overall_sampling"), path)
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


def _escaped_slashes(hcm: dict, hp: str) -> str:
    v = w.string(hcm, "path_with_escaped_slashes_action", hp, "KEEP_UNCHANGED",
                 choices=("IMPLEMENTATION_SPECIFIC_DEFAULT", *ESCAPED_SLASHES_ACTIONS))
    # Envoy's implementation-specific default is KEEP_UNCHANGED
    return "KEEP_UNCHANGED" if v == "IMPLEMENTATION_SPECIFIC_DEFAULT" else v


def _accept_http_10(hcm: dict, hp: str) -> bool:
    op = w.join(hp, "http_protocol_options")
    o = w.check_keys(w.mapping(hcm, "http_protocol_options", hp, {}), ("accept_http_10",), op)
    return w.boolean(o, "accept_http_10", op, False)
