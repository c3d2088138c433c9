"""Native YAML for L4 listeners: a concise TCP listener, filter chains, listener filters.

A TCP listener is an address and a ``tcp_proxy`` (with ``kafka_broker`` in front for Kafka,
and ``istio_metrics`` for Istio's ``istio_tcp_*`` metrics)::

    - name: db
      port: 15432
      istio_metrics: true
      tcp_proxy: {cluster: postgres, idle_timeout: 30m, max_connect_attempts: 3,
                  access_log: stdout}

Several chains, picked per connection by their ``match`` (Envoy's filter_chain_match, with
CIDR strings), each an HTTP chain (the HTTP listener keys: routes, filters, ...) or a TCP one::

    - name: edge
      port: 8443
      listener_filters: [tls_inspector, http_inspector]
      filter_chains:
      - name: api
        match: {server_names: [api.example.com]}
        tls: {cert: api.pem, key: api.key}
        routes: [{match: {prefix: /}, cluster: api}]
      - name: passthrough
        match: {transport_protocol: tls}
        tcp_proxy: {cluster: backends}
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.kafka import kafka_broker_from_native
from sidecar.config.l4 import (
    LISTENER_FILTERS,
    SOURCE_TYPES,
    ConnectionLog,
    FilterChainMatch,
    IpNetwork,
    ListenerFilters,
    TcpProxy,
    WeightedCluster,
)
from sidecar.config.log_format import (
    CONNECTION_OPERATORS,
    DEFAULT_FORMAT,
    json_format,
    text_format,
)
from sidecar.config.telemetry import istio_metrics_from_native
from sidecar.config.wire import Raw

L4_LISTENER_KEYS = ("tcp_proxy", "kafka_broker", "filter_chains", "default_filter_chain",
                    "listener_filters", "listener_filters_timeout",
                    "continue_on_listener_filters_timeout", "connection_log", "buffer_limit",
                    "istio_metrics")
CHAIN_KEYS = ("name", "match", "tls", "tcp_proxy", "kafka_broker", "istio_metrics")
_MATCH_KEYS = ("destination_port", "destination_prefixes", "server_names", "transport_protocol",
               "application_protocols", "direct_source_prefixes", "source_type",
               "source_prefixes", "source_ports")
_DESTINATIONS = {"stdout": "/dev/stdout", "stderr": "/dev/stderr"}


def is_l4(d: Raw) -> bool:
    """Whether a native listener mapping is an L4 one (not a plain HTTP listener)."""
    return any(k in d for k in ("tcp_proxy", "kafka_broker", "filter_chains",
                                "default_filter_chain", "listener_filters", "connection_log"))


def cidr(v: object, path: str) -> IpNetwork:
    if not isinstance(v, str):
        raise ConfigError(path, "must be an address or a CIDR range (10.0.0.0/8)")
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ConfigError(path, f"{v!r} is not an address or a CIDR range") from None


def _cidrs(d: Raw, key: str, path: str) -> tuple[IpNetwork, ...]:
    kp = w.join(path, key)
    return tuple(cidr(c, w.join(kp, i)) for i, c in enumerate(w.seq(d, key, path, [])))


def _strings(d: Raw, key: str, path: str) -> tuple[str, ...]:
    kp = w.join(path, key)
    out = []
    for i, v in enumerate(w.seq(d, key, path, [])):
        if not isinstance(v, str) or not v:
            raise ConfigError(w.join(kp, i), "must be a non-empty string")
        out.append(v)
    return tuple(out)


def match_from_native(d: object, path: str) -> FilterChainMatch:
    m = w.check_keys(d, _MATCH_KEYS, path)
    names = []
    for i, n in enumerate(_strings(m, "server_names", path)):
        n = n.lower()
        if "*" in n and (not n.startswith("*.") or "*" in n[1:]):
            raise ConfigError(w.join(w.join(path, "server_names"), i),
                              f"{n!r}: a wildcard is only allowed as the leftmost label")
        names.append(n)
    ports = []
    pp = w.join(path, "source_ports")
    for i, p in enumerate(w.seq(m, "source_ports", path, [])):
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise ConfigError(w.join(pp, i), "must be a port, 1..65535")
        ports.append(p)
    return FilterChainMatch(
        destination_port=w.integer(m, "destination_port", path, None, lo=1, hi=65535),
        prefix_ranges=_cidrs(m, "destination_prefixes", path),
        server_names=tuple(names),
        transport_protocol=w.string(m, "transport_protocol", path, "",
                                    choices=("raw_buffer", "tls", "")),
        application_protocols=_strings(m, "application_protocols", path),
        direct_source_prefix_ranges=_cidrs(m, "direct_source_prefixes", path),
        source_type=w.string(m, "source_type", path, "any",
                             choices=tuple(t.lower() for t in SOURCE_TYPES)).upper(),
        source_prefix_ranges=_cidrs(m, "source_prefixes", path),
        source_ports=tuple(ports),
    )


def listener_filters_from_native(d: Raw, path: str) -> ListenerFilters:
    names: list[str] = []
    lp = w.join(path, "listener_filters")
    for i, n in enumerate(w.seq(d, "listener_filters", path, [])):
        if n not in LISTENER_FILTERS:
            raise ConfigError(w.join(lp, i), f"unknown listener filter {n!r} (known: "
                                             f"{', '.join(LISTENER_FILTERS)})")
        if n in names:
            raise ConfigError(w.join(lp, i), f"{n} is listed twice")
        names.append(n)
    return ListenerFilters(
        filters=tuple(names),
        timeout_s=w.duration(d, "listener_filters_timeout", path, 15.0),
        continue_on_timeout=w.boolean(d, "continue_on_listener_filters_timeout", path, False))


def connection_log_from_native(v: object, path: str) -> ConnectionLog:
    """``stdout`` | ``stderr`` | a file path | ``{path, format: "<Envoy format>"}`` |
    ``{path, json: {key: "%OPERATOR%"}}``; without a format, Envoy's default."""
    if isinstance(v, str):
        v = {"path": v}
    d = w.check_keys(v, ("path", "format", "json"), path)
    dest = w.string(d, "path", path, "stdout", nonempty=True)
    if "format" in d and "json" in d:
        raise ConfigError(path, "only one of format, json may be set")
    if "json" in d:
        fmt = json_format(d["json"], w.join(path, "json"), CONNECTION_OPERATORS)
    else:
        text = w.string(d, "format", path, DEFAULT_FORMAT)
        if not text.endswith("\n"):
            text += "\n"
        fmt = text_format(text, w.join(path, "format"), CONNECTION_OPERATORS)
    return ConnectionLog(path=_DESTINATIONS.get(dest, dest), format=fmt)


def _logs(d: Raw, key: str, path: str) -> tuple[ConnectionLog, ...]:
    if key not in d:
        return ()
    v = d[key]
    kp = w.join(path, key)
    if isinstance(v, list):
        return tuple(connection_log_from_native(x, w.join(kp, i)) for i, x in enumerate(v))
    return (connection_log_from_native(v, kp),)


def tcp_proxy_from_native(d: object, path: str, stat_prefix: str,
                          kafka: object = None, kafka_path: str = "") -> TcpProxy:
    t = w.check_keys(d, ("cluster", "weighted_clusters", "idle_timeout", "max_connect_attempts",
                         "max_connection_duration", "hash", "access_log", "stat_prefix"), path)
    kind = w.one_of(t, ("cluster", "weighted_clusters"), path)
    weighted = []
    if kind == "weighted_clusters":
        wp = w.join(path, "weighted_clusters")
        items = w.seq(t, "weighted_clusters", path)
        if not items:
            raise ConfigError(wp, "needs at least one cluster")
        for i, c in enumerate(items):
            ip = w.join(wp, i)
            w.check_keys(c, ("name", "weight"), ip)
            weighted.append(WeightedCluster(name=w.string(c, "name", ip, nonempty=True),
                                            weight=w.integer(c, "weight", ip, lo=1)))
    return TcpProxy(
        stat_prefix=w.string(t, "stat_prefix", path, stat_prefix, nonempty=True),
        cluster=w.string(t, "cluster", path, "", nonempty=True) if kind == "cluster" else "",
        weighted_clusters=tuple(weighted),
        idle_timeout_s=w.duration(t, "idle_timeout", path, 3600.0),
        max_connect_attempts=w.integer(t, "max_connect_attempts", path, 1, lo=1),
        max_downstream_connection_duration_s=w.duration(t, "max_connection_duration", path, 0.0),
        hash_source_ip=w.string(t, "hash", path, "", choices=("source_ip", "")) == "source_ip",
        access_log=_logs(t, "access_log", path),
        kafka=kafka_broker_from_native(kafka, kafka_path) if kafka is not None else None,
    )


def tcp_chain_from_native(d: Raw, path: str, stat_prefix: str) -> TcpProxy:
    if "tcp_proxy" not in d:
        raise ConfigError(w.join(path, "tcp_proxy"), "is required with kafka_broker (the Kafka "
                                                     "filter inspects what tcp_proxy forwards)")
    return replace(tcp_proxy_from_native(d["tcp_proxy"], w.join(path, "tcp_proxy"), stat_prefix,
                                         d.get("kafka_broker"), w.join(path, "kafka_broker")),
                   istio_metrics=istio_metrics_from_native(d, path))


def check_chain_keys(d: Raw, path: str, http_keys: tuple[str, ...]) -> None:
    """A chain is TCP (tcp_proxy, kafka_broker) or HTTP (the HTTP listener keys), not both."""
    w.check_keys(d, CHAIN_KEYS + http_keys, path)
    http = [k for k in d if k in http_keys and k not in CHAIN_KEYS]
    if ("tcp_proxy" in d or "kafka_broker" in d) and http:
        raise ConfigError(w.join(path, http[0]), "is an HTTP setting; this chain is a TCP chain "
                                                 "(tcp_proxy)")

