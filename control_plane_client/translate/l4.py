"""Envoy v3 -> L4 config: filter chain matches, listener filters, tcp_proxy (with kafka_broker
and Istio's ``istio.stats`` in front). Every field is honoured or refused with its path.
Connection access logs are read by ``control_plane_client.translate.access_log``."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from control_plane_client.translate.access_log import connection_logs
from control_plane_client.translate.common import typed
from control_plane_client.translate.telemetry import ISTIO_STATS, T_ISTIO_STATS, istio_stats
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.kafka import (
    KAFKA_BROKER_FILTER,
    TOPIC_ACL_FILTER,
    KafkaBrokerConfig,
    kafka_broker_from_envoy_chain,
)
from sidecar.config.l4 import (
    LISTENER_FILTERS,
    SOURCE_TYPES,
    FilterChainMatch,
    IpNetwork,
    ListenerFilters,
    TcpProxy,
    WeightedCluster,
)
from sidecar.config.telemetry import IstioMetrics

TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
T_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_LISTENER_FILTER_TYPES = {
    "tls_inspector": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3."
                     "TlsInspector",
    "http_inspector": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3."
                      "HttpInspector",
    "original_dst": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3."
                    "OriginalDst",
}
_BY_TYPE = {v: k for k, v in _LISTENER_FILTER_TYPES.items()}


# ---- filter_chain_match ----------------------------------------------------------------------

def cidr(d: object, path: str) -> IpNetwork:
    """A ``CidrRange``: ``{address_prefix, prefix_len}``."""
    c = w.check_keys(d, ("address_prefix", "prefix_len"), path)
    addr = w.string(c, "address_prefix", path, nonempty=True)
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ConfigError(w.join(path, "address_prefix"), f"{addr!r} is not an IP address") from None
    bits = w.integer(c, "prefix_len", path, ip.max_prefixlen, lo=0, hi=ip.max_prefixlen)
    # Envoy masks the host bits off (10.1.2.3/8 is 10.0.0.0/8)
    return ipaddress.ip_network(f"{addr}/{bits}", strict=False)


def _cidrs(d: dict, key: str, path: str) -> tuple[IpNetwork, ...]:
    kp = w.join(path, key)
    return tuple(cidr(c, w.join(kp, i)) for i, c in enumerate(w.seq(d, key, path, [])))


def server_name(v: object, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(path, "must be a server name")
    name = v.lower()
    if "*" in name and (not name.startswith("*.") or "*" in name[1:]):
        raise ConfigError(path, f"{v!r}: a wildcard is only allowed as the leftmost label "
                                "(*.example.com)")
    return name


def filter_chain_match(d: object, path: str) -> FilterChainMatch:
    m = w.check_keys(d, ("destination_port", "prefix_ranges", "address_suffix", "suffix_len",
                         "direct_source_prefix_ranges", "source_type", "source_prefix_ranges",
                         "source_ports", "server_names", "transport_protocol",
                         "application_protocols"), path)
    for key in ("address_suffix", "suffix_len"):
        if key in m:
            raise ConfigError(w.join(path, key), "is not supported (nor implemented by Envoy)")
    sp = w.join(path, "source_ports")
    names = w.join(path, "server_names")
    alpn = w.join(path, "application_protocols")
    return FilterChainMatch(
        destination_port=w.integer(m, "destination_port", path, None, lo=1, hi=65535),
        prefix_ranges=_cidrs(m, "prefix_ranges", path),
        direct_source_prefix_ranges=_cidrs(m, "direct_source_prefix_ranges", path),
        source_type=w.string(m, "source_type", path, "ANY", choices=SOURCE_TYPES),
        source_prefix_ranges=_cidrs(m, "source_prefix_ranges", path),
        source_ports=tuple(_port(p, w.join(sp, i))
                           for i, p in enumerate(w.seq(m, "source_ports", path, []))),
        server_names=tuple(server_name(n, w.join(names, i))
                           for i, n in enumerate(w.seq(m, "server_names", path, []))),
        transport_protocol=w.string(m, "transport_protocol", path, ""),
        application_protocols=tuple(_name(a, w.join(alpn, i))
                                    for i, a in enumerate(w.seq(m, "application_protocols", path, []))),
    )


def _port(v: object, path: str) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ConfigError(path, "must be a port, 1..65535")
    return v


def _name(v: object, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(path, "must be a non-empty string")
    return v


# ---- listener filters ------------------------------------------------------------------------

def listener_filters(d: dict, path: str) -> ListenerFilters:
    """The listener's ``listener_filters``, ``listener_filters_timeout`` and
    ``continue_on_listener_filters_timeout``."""
    names: list[str] = []
    max_hello = 0
    lp = w.join(path, "listener_filters")
    for i, f in enumerate(w.seq(d, "listener_filters", path, [])):
        fp = w.join(lp, i)
        w.check_keys(f, ("name", "typed_config", "filter_disabled", "config_discovery"), fp)
        for key in ("filter_disabled", "config_discovery"):
            if key in f:
                raise ConfigError(w.join(fp, key), "is not supported")
        tp = w.join(fp, "typed_config")
        tc = w.mapping(f, "typed_config", fp)
        kind = _BY_TYPE.get(tc.get("@type", ""))
        if kind is None:
            raise ConfigError(w.join(tp, "@type"),
                              f"unsupported listener filter {tc.get('@type')!r} (supported: "
                              f"{', '.join(_LISTENER_FILTER_TYPES.values())})")
        body = typed(tc, tp, _LISTENER_FILTER_TYPES[kind])
        if kind == "tls_inspector":
            max_hello = _tls_inspector(body, tp)
        else:
            w.check_keys(body, (), tp)
        if kind in names:
            raise ConfigError(fp, f"{kind} is listed twice")
        names.append(kind)
    assert all(n in LISTENER_FILTERS for n in names)
    return ListenerFilters(
        filters=tuple(names),
        timeout_s=w.duration(d, "listener_filters_timeout", path, 15.0),
        continue_on_timeout=w.boolean(d, "continue_on_listener_filters_timeout", path, False),
        max_client_hello=max_hello or ListenerFilters().max_client_hello)


def _tls_inspector(body: dict, path: str) -> int:
    """The ClientHello size limit (``max_client_hello_size``, 0: the default)."""
    w.check_keys(body, ("enable_ja3_fingerprinting", "enable_ja4_fingerprinting",
                        "max_client_hello_size"), path)
    for key in ("enable_ja3_fingerprinting", "enable_ja4_fingerprinting"):
        if key in body:
            raise ConfigError(w.join(path, key), "TLS fingerprinting is not supported")
    return w.integer(body, "max_client_hello_size", path, 0, lo=0, hi=65536)


# ---- tcp_proxy -------------------------------------------------------------------------------

_TCP_PROXY_FIELDS = ("stat_prefix", "cluster", "weighted_clusters", "idle_timeout",
                     "max_connect_attempts", "access_log", "hash_policy",
                     "max_downstream_connection_duration")
_TCP_PROXY_REFUSED = ("on_demand", "metadata_match", "downstream_idle_timeout",
                      "upstream_idle_timeout", "backoff_options", "tunneling_config",
                      "max_downstream_connection_duration_jitter_percentage",
                      "access_log_flush_interval", "flush_access_log_on_connected",
                      "access_log_options", "proxy_protocol_tlvs",
                      "proxy_protocol_tlv_merge_policy", "upstream_connect_mode",
                      "max_early_data_bytes", "check_drain_close")


def tcp_proxy(d: dict, path: str, kafka: KafkaBrokerConfig | None = None) -> TcpProxy:
    for key in _TCP_PROXY_REFUSED:
        if key in d:
            raise ConfigError(w.join(path, key), "is not supported")
    w.check_keys(d, _TCP_PROXY_FIELDS, path)
    kind = w.one_of(d, ("cluster", "weighted_clusters"), path)
    weighted: list[WeightedCluster] = []
    if kind == "weighted_clusters":
        wp = w.join(path, "weighted_clusters")
        wc = w.check_keys(d["weighted_clusters"], ("clusters",), wp)
        cp = w.join(wp, "clusters")
        items = w.seq(wc, "clusters", wp)
        if not items:
            raise ConfigError(cp, "needs at least one cluster")
        for i, c in enumerate(items):
            ip = w.join(cp, i)
            w.check_keys(c, ("name", "weight", "metadata_match"), ip)
            if "metadata_match" in c:
                raise ConfigError(w.join(ip, "metadata_match"), "is not supported")
            weighted.append(WeightedCluster(name=w.string(c, "name", ip, nonempty=True),
                                            weight=w.integer(c, "weight", ip, lo=1)))
    hash_source_ip = False
    hp = w.join(path, "hash_policy")
    policies = w.seq(d, "hash_policy", path, [])
    if len(policies) > 1:
        raise ConfigError(hp, "at most one hash policy is supported (Envoy allows one)")
    for i, h in enumerate(policies):
        ip = w.join(hp, i)
        w.check_keys(h, ("source_ip", "filter_state"), ip)
        if "filter_state" in h:
            raise ConfigError(w.join(ip, "filter_state"), "is not supported (only source_ip)")
        if "source_ip" not in h:
            raise ConfigError(ip, "source_ip is required")
        w.check_keys(h["source_ip"] or {}, (), w.join(ip, "source_ip"))
        hash_source_ip = True
    return TcpProxy(
        stat_prefix=w.string(d, "stat_prefix", path, nonempty=True),
        cluster=w.string(d, "cluster", path, "") if kind == "cluster" else "",
        weighted_clusters=tuple(weighted),
        idle_timeout_s=w.duration(d, "idle_timeout", path, 3600.0),
        max_connect_attempts=w.integer(d, "max_connect_attempts", path, 1, lo=1),
        max_downstream_connection_duration_s=w.duration(
            d, "max_downstream_connection_duration", path, 0.0),
        hash_source_ip=hash_source_ip,
        access_log=connection_logs(w.seq(d, "access_log", path, []), w.join(path, "access_log")),
        kafka=kafka,
    )


def tcp_chain(filters: list, path: str) -> TcpProxy:
    """A chain's network filters for a TCP chain: [istio.stats?, kafka_topic_acl?,
    kafka_broker?] then tcp_proxy, last. ``istio.stats`` (Istio puts it before tcp_proxy, with
    the same PluginConfig as its HTTP filter) turns on the ``istio_tcp_*`` metrics."""
    kafka = kafka_broker_from_envoy_chain(filters, path)
    istio: IstioMetrics | None = None
    proxy: TcpProxy | None = None
    for i, f in enumerate(filters):
        fp = w.join(path, i)
        w.check_keys(f, ("name", "typed_config"), fp)
        name = f.get("name")
        if name in (KAFKA_BROKER_FILTER, TOPIC_ACL_FILTER):
            if i == len(filters) - 1:
                raise ConfigError(fp, f"{name} must be followed by {TCP_PROXY_FILTER} (it "
                                      "inspects the traffic tcp_proxy forwards)")
            continue
        if name == ISTIO_STATS:
            if istio is not None:
                raise ConfigError(fp, f"{ISTIO_STATS} is already in the chain")
            if i == len(filters) - 1:
                raise ConfigError(fp, f"{ISTIO_STATS} must be followed by {TCP_PROXY_FILTER} "
                                      "(it counts the connections tcp_proxy forwards)")
            tp = w.join(fp, "typed_config")
            istio = istio_stats(typed(w.mapping(f, "typed_config", fp, {"@type": T_ISTIO_STATS}),
                                      tp, T_ISTIO_STATS), tp)
            continue
        if name != TCP_PROXY_FILTER:
            raise ConfigError(w.join(fp, "name"), f"unsupported network filter {name!r} "
                                                  f"(supported: {TCP_PROXY_FILTER}, "
                                                  f"{KAFKA_BROKER_FILTER}, {TOPIC_ACL_FILTER}, "
                                                  f"{ISTIO_STATS}, "
                                                  "envoy.filters.network.http_connection_manager)")
        if i != len(filters) - 1:
            raise ConfigError(fp, f"{TCP_PROXY_FILTER} is a terminal filter: it must be last")
        tp = w.join(fp, "typed_config")
        proxy = tcp_proxy(typed(w.mapping(f, "typed_config", fp), tp, T_TCP_PROXY), tp, kafka)
    if proxy is None:
        raise ConfigError(path, f"a chain needs a terminal filter ({TCP_PROXY_FILTER} or "
                                "envoy.filters.network.http_connection_manager)")
    return replace(proxy, istio_metrics=istio) if istio is not None else proxy
