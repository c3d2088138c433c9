"""Native YAML clusters: ``{name, endpoints: [host:port], lb, circuit_breakers, ...}``."""

from __future__ import annotations

from typing import Any

from sidecar.config import wire as w
from sidecar.config.cluster import (
    DEFAULT_MAX_IDLE_CONNECTIONS,
    DNS_LOOKUP_FAMILIES,
    LB_POLICIES,
    CircuitBreakers,
    Cluster,
    Endpoint,
    HealthCheck,
    LbConfig,
    TcpHealthCheck,
    _positive,
    _statuses,
    _thresholds,
    outlier_detection_from_wire,
)
from sidecar.config.errors import ConfigError
from sidecar.config.http2 import (
    DOWNSTREAM_ONLY,
    UPSTREAM_DEFAULTS,
    UPSTREAM_PROTOCOLS,
    Http2Options,
    http2_options_from_wire,
)
from sidecar.config.native.listener import _file, _min_version
from sidecar.config.tls import UpstreamTls
from sidecar.config.wire import Raw


def endpoint_from_native(v: Any, path: str) -> Endpoint:
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


def _resolver(v: Any, path: str) -> str:
    """A DNS resolver: "ip" or "ip:port" (53 by default)."""
    if not isinstance(v, str) or not v:
        raise ConfigError(path, "must be an address like 10.0.0.2 or 10.0.0.2:53")
    host, sep, port = v.rpartition(":")
    if sep and port.isdigit() and "]" not in port:
        return v
    return f"{v}:53"


def cluster_from_native(d: Raw, path: str) -> Cluster:
    w.check_keys(d, ("name", "type", "endpoints", "lb", "connect_timeout", "dns_refresh",
                     "dns_lookup_family", "max_response_headers_count", "max_response_headers_kb",
                     "respect_dns_ttl", "dns_resolvers",
                     "circuit_breakers", "outlier_detection", "health_check", "tls",
                     "max_idle_connections", "idle_timeout", "ewma", "panic_threshold",
                     "cleanup_interval", "port_override", "bind_address", "protocol", "http2"), path)
    ctype = w.string(d, "type", path, "static",
                     choices=("static", "strict_dns", "logical_dns", "eds", "original_dst"))
    ep = w.join(path, "endpoints")
    if ctype == "original_dst":
        # the hosts are the connections' original destinations (transparent interception)
        for key in ("endpoints", "health_check", "outlier_detection", "lb"):
            if key in d:
                raise ConfigError(w.join(path, key), "does not apply to an original_dst cluster "
                                                     "(its hosts are the connections' original "
                                                     "destinations)")
        eps: tuple[Endpoint, ...] = ()
    else:
        for key in ("cleanup_interval", "port_override"):
            if key in d:
                raise ConfigError(w.join(path, key), "only applies to an original_dst cluster")
        eps = tuple(endpoint_from_native(e, w.join(ep, i))
                    for i, e in enumerate(w.seq(d, "endpoints", path)))
    lb_kw: dict[str, Any] = {"policy": w.string(d, "lb", path, "round_robin", choices=LB_POLICIES)}
    if "ewma" in d:
        xp = w.join(path, "ewma")
        x = w.check_keys(d["ewma"], ("decay", "default_rtt", "failure_penalty", "choices"), xp)
        lb_kw.update(ewma_decay_s=w.duration(x, "decay", xp, 10.0),
                     ewma_default_rtt_s=w.duration(x, "default_rtt", xp, 0.030),
                     ewma_failure_penalty_s=w.duration(x, "failure_penalty", xp, 0.0),
                     choice_count=w.integer(x, "choices", xp, 2, lo=2))
    lb_kw["panic_threshold"] = w.number(d, "panic_threshold", path, 50.0, lo=0, hi=100)
    kw: dict[str, Any] = {}
    if "circuit_breakers" in d:
        kw["circuit_breakers"] = circuit_breakers_from_native(d["circuit_breakers"], w.join(path, "circuit_breakers"))
    if "outlier_detection" in d:
        kw["outlier_detection"] = outlier_detection_from_wire(d["outlier_detection"], w.join(path, "outlier_detection"))
    if "health_check" in d:
        kw["health_checks"] = (health_check_from_native(d["health_check"], w.join(path, "health_check")),)
    if "tls" in d:
        kw["tls"] = upstream_tls_from_native(d["tls"], w.join(path, "tls"))
    if ctype == "original_dst":
        kw["cleanup_interval_s"] = _positive(w.duration(d, "cleanup_interval", path, 5.0),
                                             w.join(path, "cleanup_interval"))
        kw["upstream_port_override"] = w.integer(d, "port_override", path, 0, lo=0, hi=65535)
    if "bind_address" in d:
        kw["bind_address"] = w.string(d, "bind_address", path, nonempty=True)
    protocol = w.string(d, "protocol", path, "http1", choices=UPSTREAM_PROTOCOLS)
    if "http2" in d:
        if protocol == "http1":
            raise ConfigError(w.join(path, "http2"), "needs protocol: http2 or downstream")
        kw["http2"] = upstream_http2_options(d["http2"], w.join(path, "http2"))
    return Cluster(protocol=protocol, name=w.string(d, "name", path, nonempty=True), type=ctype,
                   endpoints=eps,
                   connect_timeout_s=w.duration(d, "connect_timeout", path, 5.0),
                   dns_refresh_s=w.duration(d, "dns_refresh", path, 5.0),
                   dns_lookup_family=w.string(d, "dns_lookup_family", path, "ALL",
                                              choices=DNS_LOOKUP_FAMILIES),
                   respect_dns_ttl=w.boolean(d, "respect_dns_ttl", path, False),
                   dns_resolvers=tuple(_resolver(r, w.join(w.join(path, "dns_resolvers"), i))
                                       for i, r in enumerate(w.seq(d, "dns_resolvers", path, []))),
                   max_response_headers_count=w.integer(d, "max_response_headers_count", path,
                                                        100, lo=1),
                   max_response_headers_kb=w.integer(d, "max_response_headers_kb", path, 80,
                                                     lo=1, hi=8192),
                   lb=LbConfig(**lb_kw),
                   max_idle_connections=w.integer(d, "max_idle_connections", path,
                                                    DEFAULT_MAX_IDLE_CONNECTIONS, lo=0),
                   idle_timeout_s=w.duration(d, "idle_timeout", path, 3600.0), source=d, **kw)


def upstream_http2_options(d: object, path: str) -> Http2Options:
    """Cluster ``http2: {max_concurrent_streams, initial_stream_window, initial_connection_window,
    hpack_table_size}``."""
    opts = http2_options_from_wire(d, path, UPSTREAM_DEFAULTS, native=True)
    for f in DOWNSTREAM_ONLY:
        if getattr(opts, f) != getattr(UPSTREAM_DEFAULTS, f):
            raise ConfigError(w.join(path, f), "applies to listeners only")
    return opts


def upstream_tls_from_native(v: object, path: str) -> UpstreamTls:
    """Cluster ``tls: true`` (system CAs, hostname checked) or
    ``tls: {sni, ca, cert, key, san: [uri...], verify, check_hostname, min_version}``.

    With ``ca`` (a private mesh CA) the hostname is not checked by default (mesh certificates
    name workloads by SPIFFE URI, not by DNS): pin identities with ``san`` instead."""
    if v is True:
        return UpstreamTls(check_hostname=True)
    d = w.check_keys(v, ("sni", "ca", "cert", "key", "san", "verify", "check_hostname", "min_version"), path)
    ca = _file(d, "ca", path)
    cert = _file(d, "cert", path)
    key = _file(d, "key", path)
    if (cert is None) != (key is None):
        raise ConfigError(w.join(path, "key" if key is None else "cert"), "cert and key go together")
    sans = d.get("san", [])
    if isinstance(sans, str):
        sans = [sans]
    if not isinstance(sans, list) or not all(isinstance(s, str) and s for s in sans):
        raise ConfigError(w.join(path, "san"), "must be a URI or a list of URIs")
    verify = w.boolean(d, "verify", path, True)
    if not verify and (ca or sans):
        raise ConfigError(w.join(path, "verify"), "verify: false cannot be combined with ca or san")
    return UpstreamTls(sni=w.string(d, "sni", path, ""), ca_file=ca, cert_file=cert, key_file=key,
                       verify=verify, min_version=_min_version(d, path), match_san_uris=tuple(sans),
                       check_hostname=w.boolean(d, "check_hostname", path, verify and ca is None))


def circuit_breakers_from_native(d: Raw, path: str) -> CircuitBreakers:
    """Native: the DEFAULT-priority thresholds written flat."""
    return CircuitBreakers(default=_thresholds(d, path, False))


_HC_HTTP_ONLY = ("path", "host", "expected_statuses", "retriable_statuses", "reuse_connection")


def health_check_from_native(d: Raw, path: str) -> HealthCheck:
    """HTTP (``path``...), gRPC (``grpc: {service, authority}``, or ``grpc: true``) or TCP
    (``tcp: {send, receive}``: hex payloads, or ``tcp: {}`` for a connect-only check)."""
    w.check_keys(d, ("path", "host", "interval", "jitter", "initial_jitter", "timeout",
                     "healthy_threshold", "unhealthy_threshold", "expected_statuses",
                     "retriable_statuses", "unhealthy_interval", "no_traffic_interval",
                     "reuse_connection", "tcp", "grpc"), path)
    w.one_of(d, ("tcp", "grpc"), path, required=False)
    tcp = None
    if "tcp" in d:
        for key in _HC_HTTP_ONLY:
            if key in d:
                raise ConfigError(w.join(path, key), "is an HTTP check field; this is a tcp check")
        tp = w.join(path, "tcp")
        t = w.check_keys(d["tcp"] or {}, ("send", "receive"), tp)
        tcp = TcpHealthCheck(
            send=_hex(t["send"], w.join(tp, "send")) if t.get("send") else b"",
            receive=tuple(_hex(r, w.join(w.join(tp, "receive"), i))
                          for i, r in enumerate(w.seq(t, "receive", tp, []))))
    grpc: dict[str, Any] = {}
    if "grpc" in d:
        # grpc: {service: name, authority: host} (or grpc: true for the server as a whole)
        gp = w.join(path, "grpc")
        g = {} if d["grpc"] is True else w.check_keys(d["grpc"], ("service", "authority"), gp)
        for k in ("path", "expected_statuses", "retriable_statuses"):
            if k in d:
                raise ConfigError(w.join(path, k), "does not apply to a gRPC health check")
        grpc = {"grpc_service": w.string(g, "service", gp, ""), "path": "/grpc.health.v1.Health/Check",
                "grpc_authority": w.string(g, "authority", gp, "")}
    hc_path = grpc.pop("path") if grpc else w.string(d, "path", path, "/healthz", nonempty=True)
    return HealthCheck(
        tcp=tcp,
        path=hc_path,
        host=w.string(d, "host", path, ""),
        interval_s=_positive(w.duration(d, "interval", path, 5.0), w.join(path, "interval")),
        interval_jitter_s=w.duration(d, "jitter", path, 0.0),
        initial_jitter_s=w.duration(d, "initial_jitter", path, 0.0),
        timeout_s=_positive(w.duration(d, "timeout", path, 1.0), w.join(path, "timeout")),
        healthy_threshold=w.integer(d, "healthy_threshold", path, 1, lo=1),
        unhealthy_threshold=w.integer(d, "unhealthy_threshold", path, 3, lo=1),
        expected_statuses=_statuses(w.seq(d, "expected_statuses", path, [200]),
                                    w.join(path, "expected_statuses")),
        retriable_statuses=_statuses(w.seq(d, "retriable_statuses", path, []),
                                     w.join(path, "retriable_statuses")),
        unhealthy_interval_s=w.duration(d, "unhealthy_interval", path, None),
        # native: checks run at `interval` from the start unless this is set
        no_traffic_interval_s=w.duration(d, "no_traffic_interval", path, None),
        reuse_connection=w.boolean(d, "reuse_connection", path, tcp is None),
        **grpc)


def _hex(v: object, path: str) -> bytes:
    if not isinstance(v, str) or not v:
        raise ConfigError(path, "must be a hex string")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise ConfigError(path, "must be a hex string") from None
