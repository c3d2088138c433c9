"""Native YAML listeners: routes or virtual hosts, the HTTP filter list, timeouts, edge policy,
access log, TLS; L4 listeners (``sidecar.config.native.l4``); and native tracing."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.filters import FilterCatalog, InstanceParsers, ListenerFilterCatalog
from sidecar.config.http2 import (
    CODECS,
    DOWNSTREAM_DEFAULTS,
    http2_options_from_wire,
    upgrade_configs_from_wire,
)
from sidecar.config.l4 import ConnectionLog, FilterChainMatch
from sidecar.config.listener import (
    ESCAPED_SLASHES_ACTIONS,
    UNDERSCORE_ACTIONS,
    AccessLogConfig,
    FilterChain,
    Listener,
    TracingConfig,
    check_fields,
)
from sidecar.config.log_format import HTTP_OPERATORS, json_format, text_format
from sidecar.config.native.l4 import (
    CHAIN_KEYS,
    L4_LISTENER_KEYS,
    check_chain_keys,
    connection_log_from_native,
    is_l4,
    listener_filters_from_native,
    match_from_native,
    tcp_chain_from_native,
)
from sidecar.config.native.route import header_mutation_from_native, virtual_host_from_native
from sidecar.config.route import HttpFilter, RouteConfig, VirtualHost
from sidecar.config.telemetry import istio_metrics_from_native
from sidecar.config.tls import TLS_VERSIONS, DownstreamTls
from sidecar.config.wire import Raw


def http_filters_from_native(items: list[Any], path: str, filters: FilterCatalog) -> tuple[HttpFilter, ...]:
    """``filters: [{jwt_authn: {...}}, {fault: {...}}]`` in chain order."""
    out = []
    names: dict[str, int] = {}
    for i, f in enumerate(items):
        fp = w.join(path, i)
        if not isinstance(f, dict) or len(f) != 1:
            raise ConfigError(fp, "must be a mapping with exactly one filter name")
        (name, cfg), = f.items()
        spec = filters.lookup(name)
        if spec is None:
            raise ConfigError(w.join(fp, name), f"unknown filter {name!r} (known: "
                              f"{', '.join(filters.short_names())})")
        config = spec.from_native(cfg or {}, w.join(fp, name))
        instance, kind = spec.name, ""
        if spec.name_instance is not None:
            instance, config = spec.name_instance(config, None)
            kind = spec.name
            if instance in names:
                raise ConfigError(w.join(fp, name), f"filter name {instance!r} is already used by "
                                  f"{w.join(path, names[instance])}; give this one a name")
        names.setdefault(instance, i)
        out.append(HttpFilter(name=instance, config=config, kind=kind))
    return tuple(out)


def route_filter_catalog(http_filters: tuple[HttpFilter, ...],
                         filters: FilterCatalog) -> FilterCatalog:
    """What routes resolve per-route filter overrides with: the listener's named instances (user
    filters, by their instance name) before the filters of the registry."""
    instances = {}
    for hf in http_filters:
        if hf.kind:
            spec = filters.lookup(hf.kind)
            assert spec is not None
            instances[hf.name] = InstanceParsers(hf.name, hf.name, spec.from_native,
                                                 spec.per_route_from_native)
    return ListenerFilterCatalog(filters, instances) if instances else filters


_BASE_KEYS = ("name", "address", "port", "direction")
# what an HTTP listener (or an HTTP chain of an L4 listener) may set
HTTP_KEYS = ("routes", "virtual_hosts", "filters", "idle_timeout", "request_headers_timeout",
             "request_timeout", "access_log", "tls", "use_remote_address", "xff_num_trusted_hops",
             "server_name", "drain_timeout", "max_request_headers_kb", "request_headers",
             "response_headers", "strip_host_port", "accept_http_10", "trust_private_peers",
             "preserve_external_request_id", "stream_idle_timeout", "max_stream_duration",
             "max_headers_count", "headers_with_underscores_action", "normalize_path",
             "merge_slashes", "path_with_escaped_slashes_action", "istio_metrics", "codec",
             "http2", "upgrades")


def listener_from_native(d: Raw, path: str, filters: FilterCatalog) -> Listener:
    if isinstance(d, dict) and is_l4(d):
        return l4_listener_from_native(d, path, filters)
    w.check_keys(d, _BASE_KEYS + HTTP_KEYS, path)
    if "routes" in d and "virtual_hosts" in d:
        raise ConfigError(path, "only one of routes, virtual_hosts may be set")
    http_filters = http_filters_from_native(w.seq(d, "filters", path, []), w.join(path, "filters"),
                                            filters)
    filters = route_filter_catalog(http_filters, filters)
    vhosts: tuple[VirtualHost, ...]
    if "routes" in d:
        vhosts = (virtual_host_from_native({"name": "default", "domains": ["*"], "routes": d["routes"]}, path, filters),)
    else:
        vp = w.join(path, "virtual_hosts")
        vhosts = tuple(virtual_host_from_native(v, w.join(vp, i), filters) for i, v in enumerate(w.seq(d, "virtual_hosts", path)))
    seen: dict[str, Any] = {}
    for i, vh in enumerate(vhosts):
        for dom in vh.domains:
            if dom in seen:
                raise ConfigError(w.join(w.join(path, "virtual_hosts"), i),
                                  f"domain {dom!r} is already used by virtual_hosts[{seen[dom]}]")
            seen[dom] = i
    name = w.string(d, "name", path, nonempty=True)
    access_log: tuple[AccessLogConfig, ...] = ()
    if "access_log" in d:
        ap = w.join(path, "access_log")
        a = d["access_log"]
        if isinstance(a, str):
            a = {"path": a}
        w.check_keys(a, ("path", "format", "fields", "text_format", "json_format",
                         "omit_empty_values"), ap)
        dest = {"stdout": "/dev/stdout", "stderr": "/dev/stderr"}.get(
            w.string(a, "path", ap, "stdout"), a.get("path", "/dev/stdout"))
        if "text_format" in a or "json_format" in a:
            # Envoy's command operators (%REQ(...)%, %RESPONSE_CODE%, ...), as in log_format
            kind = w.one_of(a, ("text_format", "json_format"), ap)
            for k in ("format", "fields"):
                if k in a:
                    raise ConfigError(w.join(ap, k), f"does not apply with {kind}")
            omit = w.boolean(a, "omit_empty_values", ap, False)
            kp = w.join(ap, kind)
            fmt = text_format(w.string(a, kind, ap), kp, HTTP_OPERATORS, omit) \
                if kind == "text_format" else \
                json_format(w.mapping(a, kind, ap), kp, HTTP_OPERATORS, omit)
            access_log = (AccessLogConfig(path=dest, format="envoy", log_format=fmt),)
        else:
            access_log = (AccessLogConfig(
                path=dest, format=w.string(a, "format", ap, "json", choices=("json", "text", "dev")),
                fields=check_fields(w.seq(a, "fields", ap, []), w.join(ap, "fields"))),)
    tls = None
    if "tls" in d:
        tls = downstream_tls_from_native(w.mapping(d, "tls", path), w.join(path, "tls"))
    return Listener(
        name=name, host=w.string(d, "address", path, "127.0.0.1"), port=w.integer(d, "port", path, lo=0, hi=65535),
        route_config=RouteConfig(name=name, virtual_hosts=vhosts, headers=header_mutation_from_native(d, path)),
        http_filters=http_filters,
        stat_prefix=name,
        direction=w.string(d, "direction", path, "outbound", choices=("inbound", "outbound")),
        idle_timeout_s=w.duration(d, "idle_timeout", path, 3600.0),
        request_headers_timeout_s=w.duration(d, "request_headers_timeout", path, 10.0),
        request_timeout_s=w.duration(d, "request_timeout", path, 0.0),
        stream_idle_timeout_s=w.duration(d, "stream_idle_timeout", path, 300.0),
        max_stream_duration_s=w.duration(d, "max_stream_duration", path, 0.0),
        max_request_headers_kb=w.integer(d, "max_request_headers_kb", path, 60, lo=1, hi=8192),
        max_headers_count=w.integer(d, "max_headers_count", path, 100, lo=1),
        headers_with_underscores_action=w.string(d, "headers_with_underscores_action", path,
                                                 "ALLOW", choices=UNDERSCORE_ACTIONS),
        normalize_path=w.boolean(d, "normalize_path", path, False),
        merge_slashes=w.boolean(d, "merge_slashes", path, False),
        path_with_escaped_slashes_action=w.string(d, "path_with_escaped_slashes_action", path,
                                                  "KEEP_UNCHANGED", choices=ESCAPED_SLASHES_ACTIONS),
        accept_http_10=w.boolean(d, "accept_http_10", path, True),
        use_remote_address=w.boolean(d, "use_remote_address", path, True),
        trust_private_peers=w.boolean(d, "trust_private_peers", path, True),
        preserve_external_request_id=w.boolean(d, "preserve_external_request_id", path, True),
        xff_num_trusted_hops=w.integer(d, "xff_num_trusted_hops", path, 0, lo=0),
        server_name=w.string(d, "server_name", path, "envoy"),
        strip_host_port=w.string(d, "strip_host_port", path, "any", choices=("any", "matching", "none")),
        drain_timeout_s=w.duration(d, "drain_timeout", path, 5.0),
        access_log=access_log, tls=tls, source=d,
        codec=w.string(d, "codec", path, "auto", choices=CODECS),
        http2=http2_options_from_wire(d.get("http2"), w.join(path, "http2"), DOWNSTREAM_DEFAULTS,
                                      native=True),
        upgrades=upgrade_configs_from_wire(d.get("upgrades"), w.join(path, "upgrades"), native=True),
        istio_metrics=istio_metrics_from_native(d, path),
    )


def l4_listener_from_native(d: Raw, path: str, filters: FilterCatalog) -> Listener:
    """A TCP listener (``tcp_proxy`` [+ ``kafka_broker``], ``tls``) or one with
    ``filter_chains`` (see ``sidecar.config.native.l4``)."""
    w.check_keys(d, _BASE_KEYS + L4_LISTENER_KEYS + ("tls", "drain_timeout"), path)
    name = w.string(d, "name", path, nonempty=True)
    base = Listener(name=name, host=w.string(d, "address", path, "127.0.0.1"),
                    port=w.integer(d, "port", path, lo=0, hi=65535), stat_prefix=name,
                    direction=w.string(d, "direction", path, "outbound",
                                       choices=("inbound", "outbound")),
                    drain_timeout_s=w.duration(d, "drain_timeout", path, 5.0), source=d)
    flat = "tcp_proxy" in d or "kafka_broker" in d
    if flat and ("filter_chains" in d or "default_filter_chain" in d):
        raise ConfigError(w.join(path, "tcp_proxy" if "tcp_proxy" in d else "kafka_broker"),
                          "a listener with filter_chains sets tcp_proxy in its chains")
    for key in ("tls", "istio_metrics"):
        if not flat and key in d:
            raise ConfigError(w.join(path, key), f"with filter_chains, each chain sets its own "
                                                 f"{key}")
    chains: list[FilterChain] = []
    default = None
    if flat:
        tls = downstream_tls_from_native(w.mapping(d, "tls", path), w.join(path, "tls")) \
            if "tls" in d else None
        chains.append(FilterChain(name="", tls=tls, tcp=tcp_chain_from_native(d, path, name)))
    else:
        cp = w.join(path, "filter_chains")
        for i, c in enumerate(w.seq(d, "filter_chains", path, [])):
            chains.append(_chain_from_native(c, w.join(cp, i), base, filters))
        if d.get("default_filter_chain") is not None:
            default = _chain_from_native(d["default_filter_chain"],
                                         w.join(path, "default_filter_chain"), base, filters,
                                         default=True)
        if not chains and default is None:
            raise ConfigError(cp, "needs at least one chain (or a default_filter_chain, or "
                                  "tcp_proxy for a TCP listener)")
        seen: dict[object, int] = {}
        for i, ch in enumerate(chains):
            if ch.match in seen:
                raise ConfigError(w.join(cp, i), f"match is the same as that of "
                                                 f"filter_chains[{seen[ch.match]}]: it could "
                                                 "never be picked")
            seen[ch.match] = i
    return replace(base, filter_chains=tuple(chains), default_filter_chain=default,
                   listener_filters=listener_filters_from_native(d, path),
                   connection_log=_connection_logs(d, path),
                   buffer_limit_bytes=w.integer(d, "buffer_limit", path, 1024 * 1024, lo=1024))


def _connection_logs(d: Raw, path: str) -> tuple[ConnectionLog, ...]:
    if "connection_log" not in d:
        return ()
    v = d["connection_log"]
    kp = w.join(path, "connection_log")
    if isinstance(v, list):
        return tuple(connection_log_from_native(x, w.join(kp, i)) for i, x in enumerate(v))
    return (connection_log_from_native(v, kp),)


def _chain_from_native(c: object, path: str, base: Listener, filters: FilterCatalog,
                       default: bool = False) -> FilterChain:
    d = w.check_keys(c, CHAIN_KEYS + HTTP_KEYS, path)
    check_chain_keys(d, path, HTTP_KEYS)
    if default and "match" in d:
        raise ConfigError(w.join(path, "match"), "a default chain has no match")
    match = match_from_native(d["match"], w.join(path, "match")) if d.get("match") is not None \
        else FilterChainMatch()
    tls = downstream_tls_from_native(w.mapping(d, "tls", path), w.join(path, "tls")) \
        if "tls" in d else None
    name = w.string(d, "name", path, "")
    if "tcp_proxy" in d or "kafka_broker" in d:
        return FilterChain(name=name, match=match, tls=tls,
                           tcp=tcp_chain_from_native(d, path, name or base.name))
    if "routes" not in d and "virtual_hosts" not in d:
        raise ConfigError(path, "a chain needs tcp_proxy (TCP) or routes / virtual_hosts (HTTP)")
    http_d = {k: v for k, v in d.items() if k in HTTP_KEYS and k != "tls"}
    http_d.update(name=base.name, address=base.host, port=base.port, direction=base.direction)
    http = listener_from_native(http_d, path, filters)
    return FilterChain(name=name, match=match, tls=tls, http=replace(http, source=d))


def tracing_from_native(d: Raw, path: str) -> TracingConfig:
    w.check_keys(d, ("sample_percent", "exporter", "endpoint", "service_name"), path)
    return TracingConfig(sample_percent=w.number(d, "sample_percent", path, 1.0, lo=0, hi=100),
                         exporter=w.string(d, "exporter", path, "none",
                                           choices=("none", "otlp_http", "console", "memory")),
                         endpoint=w.string(d, "endpoint", path, ""),
                         service_name=w.string(d, "service_name", path, "sidecar"))


def _min_version(d: Raw, path: str) -> str:
    v = d.get("min_version", "1.2")
    if isinstance(v, float):
        v = f"{v:.1f}"
    v = {"1.2": "TLSv1_2", "1.3": "TLSv1_3"}.get(str(v), str(v))
    if v in ("TLSv1_0", "TLSv1_1", "1.0", "1.1"):
        raise ConfigError(w.join(path, "min_version"), "must be 1.2 or 1.3 (TLS 1.2 is the floor)")
    if v not in TLS_VERSIONS:
        raise ConfigError(w.join(path, "min_version"), f"must be 1.2 or 1.3, got {d.get('min_version')!r}")
    return v


def _file(d: Raw, key: str, path: str, required: bool = False) -> str | None:
    v = w.string(d, key, path, None if not required else w._MISSING, nonempty=True)
    if v is not None and not os.path.isfile(v):
        raise ConfigError(w.join(path, key), f"cannot read file {v!r}")
    return v


def _required_file(d: Raw, key: str, path: str) -> str:
    v = _file(d, key, path, required=True)
    assert v is not None        # required: _file raised otherwise
    return v


def downstream_tls_from_native(d: Raw, path: str) -> DownstreamTls:
    """Listener ``tls: {cert, key, ca, require_client_cert, min_version}``.

    ``ca`` turns on client-certificate verification (mTLS); with it, ``require_client_cert``
    defaults to true (set false to accept clients without a certificate too)."""
    w.check_keys(d, ("cert", "key", "ca", "require_client_cert", "min_version", "alpn"), path)
    alpn = w.seq(d, "alpn", path, [])
    for i, p in enumerate(alpn):
        if p not in ("h2", "http/1.1"):
            raise ConfigError(w.join(w.join(path, "alpn"), i), "must be h2 or http/1.1")
    if len(set(alpn)) != len(alpn):
        raise ConfigError(w.join(path, "alpn"), "lists a protocol twice")
    cert = _required_file(d, "cert", path)
    key = _required_file(d, "key", path)
    ca = _file(d, "ca", path)
    require = w.boolean(d, "require_client_cert", path, ca is not None)
    if require and ca is None:
        raise ConfigError(w.join(path, "require_client_cert"), "needs ca (the CA that signs client certificates)")
    return DownstreamTls(cert_file=cert, key_file=key, ca_file=ca, require_client_cert=require,
                         min_version=_min_version(d, path), alpn=tuple(alpn))
