"""Envoy v3 Cluster and ClusterLoadAssignment -> the cluster model (LB policies, breakers,
outlier detection, health checks, upstream TLS, protocol options)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import replace

from control_plane_client.translate.common import T_HTTP_OPTIONS, T_PEAK_EWMA, socket_address, typed
from control_plane_client.translate.dynamic import config_source
from control_plane_client.translate.tls import Secrets, upstream_tls_from_envoy
from sidecar.config import wire as w
from sidecar.config.cluster import (
    DNS_LOOKUP_FAMILIES,
    CircuitBreakers,
    Cluster,
    Endpoint,
    HealthCheck,
    LbConfig,
    TcpHealthCheck,
    Thresholds,
    _positive,
    _statuses,
    _thresholds,
    outlier_detection_from_wire,
)
from sidecar.config.errors import ConfigError
from sidecar.config.http2 import DOWNSTREAM_ONLY, UPSTREAM_DEFAULTS, Http2Options, http2_options_from_wire
from sidecar.config.tls import UpstreamTls


def load_assignment(d: dict, path: str) -> tuple[str, tuple[Endpoint, ...]]:
    w.check_keys(d, ("cluster_name", "endpoints", "@type"), path)
    eps = []
    ep_path = w.join(path, "endpoints")
    for i, le in enumerate(w.seq(d, "endpoints", path, [])):
        lp = w.join(ep_path, i)
        w.check_keys(le, ("lb_endpoints", "locality", "priority", "load_balancing_weight"), lp)
        if w.integer(le, "priority", lp, 0) != 0:
            raise ConfigError(w.join(lp, "priority"), "only priority 0 is supported")
        for j, lbe in enumerate(w.seq(le, "lb_endpoints", lp, [])):
            bp = w.join(w.join(lp, "lb_endpoints"), j)
            w.check_keys(lbe, ("endpoint", "load_balancing_weight", "health_status"), bp)
            ep = w.mapping(lbe, "endpoint", bp)
            epp = w.join(bp, "endpoint")
            w.check_keys(ep, ("address", "hostname"), epp)
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


T_CARES = "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig"


def dns_resolvers(d: dict, path: str) -> tuple[str, ...]:
    """``typed_dns_resolver_config`` with the c-ares resolver: its ``resolvers`` addresses."""
    w.check_keys(d, ("name", "typed_config"), path)
    tp = w.join(path, "typed_config")
    body = typed(w.mapping(d, "typed_config", path), tp, T_CARES)
    w.check_keys(body, ("resolvers",), tp)
    out = []
    for i, a in enumerate(w.seq(body, "resolvers", tp)):
        host, prt = socket_address(a, w.join(w.join(tp, "resolvers"), i))
        out.append(f"{host}:{prt or 53}")
    return tuple(out)


def cluster(d: dict, path: str, secrets: Secrets | None = None) -> Cluster:
    w.check_keys(d, ("name", "type", "connect_timeout", "lb_policy", "load_assignment",
                     "dns_refresh_rate", "dns_lookup_family", "circuit_breakers",
                     "outlier_detection", "health_checks", "transport_socket",
                     "eds_cluster_config", "common_lb_config", "least_request_lb_config",
                     "ring_hash_lb_config", "load_balancing_policy", "per_connection_buffer_limit_bytes",
                     "typed_extension_protocol_options", "@type", "respect_dns_ttl",
                     "typed_dns_resolver_config", "original_dst_lb_config", "cleanup_interval",
                     "upstream_bind_config"), path)
    name = w.string(d, "name", path, nonempty=True)
    ctype = w.string(d, "type", path, "STATIC",
                     choices=("STATIC", "STRICT_DNS", "LOGICAL_DNS", "EDS", "ORIGINAL_DST")).lower()
    kw: dict = {}
    eps: tuple = ()
    if ctype == "original_dst":
        kw.update(_original_dst(d, path))
    elif "load_assignment" in d:
        _, eps = load_assignment(d["load_assignment"], w.join(path, "load_assignment"))
    elif ctype != "eds":
        raise ConfigError(w.join(path, "load_assignment"), f"is required for a {ctype.upper()} cluster")
    for key in ("original_dst_lb_config", "cleanup_interval"):
        if key in d and ctype != "original_dst":
            raise ConfigError(w.join(path, key), "only applies to an ORIGINAL_DST cluster")
    if "upstream_bind_config" in d:
        kw["bind_address"] = _bind_address(d["upstream_bind_config"], w.join(path, "upstream_bind_config"))
    if ctype != "eds" and "eds_cluster_config" in d:
        raise ConfigError(w.join(path, "eds_cluster_config"), "only applies to an EDS cluster")
    if ctype == "eds":
        ep = w.join(path, "eds_cluster_config")
        e = w.check_keys(w.mapping(d, "eds_cluster_config", path, {}), ("service_name", "eds_config"), ep)
        if "eds_config" in e:
            # honoured by the xDS client when it subscribes; checked here so a bad one is a
            # config error with its path, not a silent no-subscription
            config_source(w.mapping(e, "eds_config", ep), w.join(ep, "eds_config"))
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
        # the ring is built with exactly minimum_ring_size entries, which maximum_ring_size
        # bounds: a maximum below the minimum is an error, as in Envoy
        if w.integer(rh, "maximum_ring_size", lp, 8_388_608, lo=1, hi=8_388_608) < lb_kw["ring_size"]:
            raise ConfigError(w.join(lp, "maximum_ring_size"), "must be >= minimum_ring_size")
        w.string(rh, "hash_function", lp, "XX_HASH", choices=("XX_HASH",))
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
    if lb_kw["policy"] == "cluster_provided" and ctype == "original_dst":
        lb_kw["policy"] = "round_robin"     # unused: the connection names its host
    elif ctype == "original_dst":
        raise ConfigError(w.join(path, "lb_policy"), "an ORIGINAL_DST cluster needs CLUSTER_PROVIDED")
    if lb_kw["policy"] in ("cluster_provided", "load_balancing_policy_config") and lb_kw["policy"] != "peak_ewma":
        if "load_balancing_policy" not in d:
            raise ConfigError(w.join(path, "lb_policy"), f"{lb_policy} is not supported")
    if "typed_extension_protocol_options" in d:
        kw.update(protocol_options(w.mapping(d, "typed_extension_protocol_options", path),
                                   w.join(path, "typed_extension_protocol_options")))
    if "circuit_breakers" in d:
        kw["circuit_breakers"] = circuit_breakers_from_envoy(d["circuit_breakers"], w.join(path, "circuit_breakers"))
    if "outlier_detection" in d:
        kw["outlier_detection"] = outlier_detection_from_wire(d["outlier_detection"], w.join(path, "outlier_detection"))
    hc = w.seq(d, "health_checks", path, [])
    kw["health_checks"] = tuple(health_check_from_envoy(h, w.join(w.join(path, "health_checks"), i))
                                for i, h in enumerate(hc))
    if "transport_socket" in d:
        kw["tls"] = upstream_tls_from_envoy(d["transport_socket"], w.join(path, "transport_socket"),
                                            secrets)
        check_alpn(kw.get("protocol", "http1"), kw["tls"],
                   w.join(path, "transport_socket.typed_config.common_tls_context.alpn_protocols"))
    if "per_connection_buffer_limit_bytes" in d:
        kw["per_connection_buffer_limit"] = w.integer(d, "per_connection_buffer_limit_bytes", path, lo=1024)
    kw["dns_lookup_family"] = w.string(d, "dns_lookup_family", path, "AUTO",
                                       choices=DNS_LOOKUP_FAMILIES)
    kw["respect_dns_ttl"] = w.boolean(d, "respect_dns_ttl", path, False)
    if "typed_dns_resolver_config" in d:
        kw["dns_resolvers"] = dns_resolvers(w.mapping(d, "typed_dns_resolver_config", path),
                                            w.join(path, "typed_dns_resolver_config"))
    return Cluster(name=name, type=ctype, endpoints=eps,
                   connect_timeout_s=w.duration(d, "connect_timeout", path, 5.0),
                   dns_refresh_s=w.duration(d, "dns_refresh_rate", path, 5.0),
                   lb=LbConfig(**lb_kw), source=d, **kw)


HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _http1_options(d: object, path: str) -> None:
    """``http_protocol_options`` of an HTTP/1.1 upstream: the defaults only."""
    if d is None:
        return
    w.check_keys(d, (), path)


def upstream_http2_options(d: object, path: str, native: bool = False) -> Http2Options:
    """HTTP/2 settings of a cluster's connections: streams per connection and windows (the
    flood limits protect the proxy from its clients and are refused here)."""
    opts = http2_options_from_wire(d, path, UPSTREAM_DEFAULTS, native)
    for f in DOWNSTREAM_ONLY:
        if getattr(opts, f) != getattr(UPSTREAM_DEFAULTS, f):
            raise ConfigError(w.join(path, f), "applies to listeners only (upstream HTTP/2 "
                                               "connections use the defaults)")
    return opts


def check_alpn(protocol: str, tls: UpstreamTls | None, path: str) -> None:
    """An explicit upstream ALPN list must offer the cluster's protocol."""
    if tls is None or not tls.alpn:
        return
    need = {"http1": ("http/1.1",), "http2": ("h2",), "downstream": ("http/1.1", "h2")}[protocol]
    for p in need:
        if p not in tls.alpn:
            raise ConfigError(path, f"must offer {p!r} for this cluster's protocol")


def protocol_options(d: dict, path: str) -> dict:
    """``typed_extension_protocol_options``: the upstream protocol (HTTP/1.1, HTTP/2, or the
    downstream's), its HTTP/2 settings and the upstream idle timeout."""
    out: dict = {}
    for k, v in d.items():
        kp = w.join(path, k)
        if k != HTTP_OPTIONS_KEY:
            raise ConfigError(kp, f"unsupported protocol options (supported: {HTTP_OPTIONS_KEY})")
        body = typed(v, kp, T_HTTP_OPTIONS)
        w.check_keys(body, ("explicit_http_config", "use_downstream_protocol_config", "auto_config",
                            "common_http_protocol_options", "upstream_http_protocol_options",
                            "http_filters", "header_validation_config"), kp)
        for refused, why in (("auto_config", "ALPN-negotiated upstream protocols are not supported; "
                                             "use explicit_http_config"),
                             ("http_filters", "upstream HTTP filters are not supported"),
                             ("header_validation_config", "is not supported"),
                             ("upstream_http_protocol_options", "is not supported (auto_sni, "
                                                                "auto_san_validation)")):
            if refused in body:
                raise ConfigError(w.join(kp, refused), why)
        kind = w.one_of(body, ("explicit_http_config", "use_downstream_protocol_config"), kp,
                        required=False)
        if kind is not None:
            ep = w.join(kp, kind)
            eh = w.check_keys(body[kind], ("http_protocol_options", "http2_protocol_options",
                                           "http3_protocol_options"), ep)
            if "http3_protocol_options" in eh:
                raise ConfigError(w.join(ep, "http3_protocol_options"), "HTTP/3 is not supported")
            if kind == "explicit_http_config":
                which = w.one_of(eh, ("http_protocol_options", "http2_protocol_options"), ep)
                out["protocol"] = "http2" if which == "http2_protocol_options" else "http1"
            else:
                out["protocol"] = "downstream"
            _http1_options(eh.get("http_protocol_options"), w.join(ep, "http_protocol_options"))
            if "http2_protocol_options" in eh:
                out["http2"] = upstream_http2_options(eh["http2_protocol_options"],
                                                      w.join(ep, "http2_protocol_options"))
        cp = w.join(kp, "common_http_protocol_options")
        cho = w.check_keys(w.mapping(body, "common_http_protocol_options", kp, {}),
                           ("idle_timeout", "max_headers_count", "max_response_headers_kb"), cp)
        if "idle_timeout" in cho:
            out["idle_timeout_s"] = w.duration(cho, "idle_timeout", cp)
        # response head limits (a 502 above them: HTTP/1.1 closes the connection, HTTP/2 resets
        # just the stream)
        out["max_response_headers_count"] = w.integer(cho, "max_headers_count", cp, 100, lo=1)
        out["max_response_headers_kb"] = w.integer(cho, "max_response_headers_kb", cp, 80,
                                                   lo=1, hi=8192)
    return out


def _original_dst(d: dict, path: str) -> dict:
    """ORIGINAL_DST: no endpoints (the connection names its destination), Envoy's
    ``original_dst_lb_config`` and ``cleanup_interval``."""
    if "load_assignment" in d:
        raise ConfigError(w.join(path, "load_assignment"),
                          "an ORIGINAL_DST cluster takes its hosts from the connections: no "
                          "load_assignment")
    for key in ("health_checks", "outlier_detection"):
        if key in d:
            raise ConfigError(w.join(path, key), "is not supported on an ORIGINAL_DST cluster "
                                                 "(its hosts come and go with connections)")
    kw: dict = {"cleanup_interval_s": w.duration(d, "cleanup_interval", path, 5.0)}
    if kw["cleanup_interval_s"] <= 0:
        raise ConfigError(w.join(path, "cleanup_interval"), "must be greater than zero")
    if "original_dst_lb_config" in d:
        op = w.join(path, "original_dst_lb_config")
        o = w.check_keys(d["original_dst_lb_config"], ("use_http_header", "http_header_name",
                                                       "upstream_port_override", "metadata_key"), op)
        for key in ("use_http_header", "http_header_name", "metadata_key"):
            if key in o:
                raise ConfigError(w.join(op, key), "is not supported (the destination is the "
                                                   "connection's original destination)")
        kw["upstream_port_override"] = w.integer(o, "upstream_port_override", op, 0, lo=0, hi=65535)
    return kw


def _bind_address(d: dict, path: str) -> str:
    sp = w.join(path, "source_address")
    for key in ("freebind", "socket_options", "extra_source_addresses",
                "additional_source_addresses", "local_address_selector"):
        if key in d:
            raise ConfigError(w.join(path, key), "is not supported")
    w.check_keys(d, ("source_address",), path)
    sa = w.check_keys(w.mapping(d, "source_address", path),
                      ("address", "port_value", "protocol"), sp)
    if w.integer(sa, "port_value", sp, 0) != 0:
        raise ConfigError(w.join(sp, "port_value"), "only 0 (any local port) is supported")
    if sa.get("protocol", "TCP") != "TCP":
        raise ConfigError(w.join(sp, "protocol"), "only TCP is supported")
    return w.string(sa, "address", sp, nonempty=True)


def circuit_breakers_from_envoy(d: dict, path: str) -> CircuitBreakers:
    w.check_keys(d, ("thresholds",), path)
    default = high = Thresholds()
    seen = set()
    for i, t in enumerate(w.seq(d, "thresholds", path, [])):
        tp = w.join(w.join(path, "thresholds"), i)
        prio = w.string(t, "priority", tp, "DEFAULT", choices=("DEFAULT", "HIGH"))
        if prio in seen:
            raise ConfigError(w.join(tp, "priority"), f"{prio} thresholds are given twice")
        seen.add(prio)
        if prio == "HIGH":
            high = _thresholds(t, tp, True)
        else:
            default = _thresholds(t, tp, True)
    return CircuitBreakers(default=default, high=high)


def _payload(d: object, path: str) -> bytes:
    """A health check ``Payload``: ``{text: <hex>}`` or ``{binary: <base64>}``."""
    w.check_keys(d, ("text", "binary"), path)
    assert isinstance(d, dict)
    kind = w.one_of(d, ("text", "binary"), path)
    assert kind is not None         # one_of raises when neither is set
    v = w.string(d, kind, path, nonempty=True)
    try:
        return bytes.fromhex(v) if kind == "text" else base64.b64decode(v, validate=True)
    except (ValueError, binascii.Error):
        raise ConfigError(w.join(path, kind), "must be hex" if kind == "text" else "must be base64")


def _tcp_health_check(d: dict, path: str) -> HealthCheck:
    tp = w.join(path, "tcp_health_check")
    t = w.check_keys(d["tcp_health_check"] or {}, ("send", "receive", "proxy_protocol_config"), tp)
    if "proxy_protocol_config" in t:
        raise ConfigError(w.join(tp, "proxy_protocol_config"), "is not supported")
    send = _payload(t["send"], w.join(tp, "send")) if t.get("send") else b""
    receive = tuple(_payload(r, w.join(w.join(tp, "receive"), i))
                    for i, r in enumerate(w.seq(t, "receive", tp, [])))
    if w.boolean(d, "reuse_connection", path, False):
        raise ConfigError(w.join(path, "reuse_connection"),
                          "true is not supported with tcp_health_check (every check connects anew)")
    base = health_check_from_envoy({k: v for k, v in d.items()
                                    if k not in ("tcp_health_check", "reuse_connection")}
                                   | {"http_health_check": {"path": "/"}}, path)
    return replace(base, path="", tcp=TcpHealthCheck(send=send, receive=receive),
                   reuse_connection=False)


def health_check_from_envoy(d: dict, path: str) -> HealthCheck:
    w.check_keys(d, ("timeout", "interval", "interval_jitter", "interval_jitter_percent",
                     "healthy_threshold", "unhealthy_threshold", "http_health_check",
                     "no_traffic_interval", "unhealthy_interval", "healthy_edge_interval",
                     "unhealthy_edge_interval", "initial_jitter", "reuse_connection",
                     "grpc_health_check", "tcp_health_check"), path)
    kind = w.one_of(d, ("http_health_check", "grpc_health_check", "tcp_health_check"), path,
                    required=False)
    if kind is None:
        raise ConfigError(path, "one of http_health_check, grpc_health_check, tcp_health_check "
                                "is required (redis, thrift and custom health checks are not "
                                "supported)")
    if kind == "tcp_health_check":
        return _tcp_health_check(d, path)
    opt = lambda k: w.duration(d, k, path, None)  # noqa: E731
    common: dict = dict(
        interval_s=_positive(w.duration(d, "interval", path), w.join(path, "interval")),
        timeout_s=_positive(w.duration(d, "timeout", path), w.join(path, "timeout")),
        interval_jitter_s=w.duration(d, "interval_jitter", path, 0.0),
        interval_jitter_percent=float(w.integer(d, "interval_jitter_percent", path, 0, lo=0, hi=100)),
        initial_jitter_s=w.duration(d, "initial_jitter", path, 0.0),
        healthy_threshold=w.integer(d, "healthy_threshold", path, lo=1),
        unhealthy_threshold=w.integer(d, "unhealthy_threshold", path, lo=1),
        unhealthy_interval_s=opt("unhealthy_interval"),
        unhealthy_edge_interval_s=opt("unhealthy_edge_interval"),
        healthy_edge_interval_s=opt("healthy_edge_interval"),
        # Envoy: 60 s until the cluster has carried traffic
        no_traffic_interval_s=w.duration(d, "no_traffic_interval", path, 60.0),
        reuse_connection=w.boolean(d, "reuse_connection", path, True),
    )
    if kind == "grpc_health_check":
        gp = w.join(path, "grpc_health_check")
        g = w.check_keys(d["grpc_health_check"] or {}, ("service_name", "authority",
                                                        "initial_metadata"), gp)
        if g.get("initial_metadata"):
            raise ConfigError(w.join(gp, "initial_metadata"), "is not supported")
        return HealthCheck(path="/grpc.health.v1.Health/Check",
                           grpc_service=w.string(g, "service_name", gp, ""),
                           grpc_authority=w.string(g, "authority", gp, ""), **common)
    hp = w.join(path, "http_health_check")
    h = w.check_keys(d["http_health_check"], ("path", "host", "expected_statuses",
                                              "retriable_statuses", "codec_client_type"), hp)
    w.string(h, "codec_client_type", hp, "HTTP1", choices=("HTTP1",))
    return HealthCheck(
        path=w.string(h, "path", hp, nonempty=True), host=w.string(h, "host", hp, ""),
        expected_statuses=_statuses(h["expected_statuses"], w.join(hp, "expected_statuses"))
        if "expected_statuses" in h else ((200, 201),),
        retriable_statuses=_statuses(h["retriable_statuses"], w.join(hp, "retriable_statuses"))
        if "retriable_statuses" in h else (),
        **common,
    )
