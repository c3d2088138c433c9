"""Envoy v3 Listener with its HTTP connection manager -> the listener model (HTTP filters, access
logs, tracing, timeouts, edge options)."""

from __future__ import annotations

import filters as filter_registry
from control_plane_client.translate.common import (
    T_FILE_LOG,
    T_HCM,
    T_ROUTER,
    T_STDOUT_LOG,
    socket_address,
    typed,
)
from control_plane_client.translate.route import route_configuration
from control_plane_client.translate.telemetry import ISTIO_STATS, T_ISTIO_STATS, istio_stats
from control_plane_client.translate.tls import downstream_tls_from_envoy
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.http2 import DOWNSTREAM_DEFAULTS, http2_options_from_wire, upgrade_configs_from_wire
from sidecar.config.listener import AccessLogConfig, Listener, TracingConfig
from sidecar.config.route import HttpFilter, RouteConfig
from sidecar.config.telemetry import IstioMetrics


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
        w.check_keys(f, ("name", "typed_config", "disabled", "is_optional"), fp)
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
                w.check_keys(rc, ("suppress_envoy_headers", "start_child_span"), w.join(fp, "typed_config"))
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


def listener(d: dict, path: str, rds_routes: dict[str, RouteConfig] | None = None) -> Listener:
    """``rds_routes``: route configs by name already known (RDS), or None for a bootstrap."""
    pass

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
        if rds_routes is not None and rds_name in rds_routes:
            rc = rds_routes[rds_name]
    cho = w.mapping(hcm, "common_http_protocol_options", hp, {})
    chp = w.join(hp, "common_http_protocol_options")
    w.check_keys(cho, ("idle_timeout", "max_headers_count", "headers_with_underscores_action"), chp)
    stat_prefix = w.string(hcm, "stat_prefix", hp, nonempty=True)
    istio: list[IstioMetrics] = []
    chain_filters = http_filters(w.seq(hcm, "http_filters", hp, []), w.join(hp, "http_filters"), istio)
    direction = w.string(d, "traffic_direction", path, "OUTBOUND",
                         choices=("UNSPECIFIED", "INBOUND", "OUTBOUND")).lower()
    return Listener(
        name=w.string(d, "name", path, "") or f"{host}:{port_}",
        host=host, port=port_, route_config=rc, rds_name=rds_name,
        http_filters=chain_filters,
        istio_metrics=istio[0] if istio else None,
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
        codec=codec, http2=http2, upgrades=upgrades,
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
