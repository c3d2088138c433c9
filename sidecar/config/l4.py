"""L4 config: filter-chain matches, listener filters, the TCP proxy and connection access logs.

A listener with several filter chains (or with listener filters, or a tcp_proxy) carries them
in ``Listener.filter_chains`` (``sidecar.config.listener.FilterChain``); these are the parts a
chain is made of. Both config formats produce them: Envoy v3 in
``control_plane_client.translate.l4``, the native YAML in ``sidecar.config.native.l4``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sidecar.config.kafka import KafkaBrokerConfig
from sidecar.config.log_format import LogFormat
from sidecar.config.telemetry import IstioMetrics

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SOURCE_TYPES = ("ANY", "SAME_IP_OR_LOOPBACK", "EXTERNAL")
LISTENER_FILTERS = ("tls_inspector", "http_inspector", "original_dst")


@dataclass(frozen=True, slots=True)
class FilterChainMatch:
    """Envoy's ``filter_chain_match``; an empty field matches anything. Envoy's order of
    evaluation (most specific wins at each step, no backtracking): destination port,
    destination IP, server name, transport protocol, application protocols, direct source
    IP, source type, source IP, source port (``sidecar.listener.chains``)."""

    destination_port: int | None = None
    prefix_ranges: tuple[IpNetwork, ...] = ()
    server_names: tuple[str, ...] = ()          # exact names and "*.suffix" wildcards
    transport_protocol: str = ""                # "raw_buffer" | "tls" | ""
    application_protocols: tuple[str, ...] = ()
    direct_source_prefix_ranges: tuple[IpNetwork, ...] = ()
    source_type: str = "ANY"
    source_prefix_ranges: tuple[IpNetwork, ...] = ()
    source_ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerFilters:
    """The listener filters that run on a new connection before a filter chain is picked,
    in config order (names from ``LISTENER_FILTERS``)."""

    filters: tuple[str, ...] = ()
    timeout_s: float = 15.0                     # listener_filters_timeout; 0: none
    continue_on_timeout: bool = False
    max_client_hello: int = 64 * 1024           # tls_inspector's max_client_hello_size

    @property
    def original_dst(self) -> bool:
        return "original_dst" in self.filters

    @property
    def inspects_bytes(self) -> bool:
        """Whether a filter reads the client's first bytes (TLS ClientHello, HTTP line)."""
        return "tls_inspector" in self.filters or "http_inspector" in self.filters


@dataclass(frozen=True, slots=True)
class ConnectionLog:
    """One access log of connections (tcp_proxy ``access_log`` or the listener's own): a
    destination and an Envoy format (text, or JSON with one format per key)."""

    path: str                                   # /dev/stdout, /dev/stderr or a file
    format: LogFormat


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class TcpProxy:
    """``envoy.filters.network.tcp_proxy``, with the network filters Envoy puts in front of it:
    ``kafka_broker`` when ``kafka``, Istio's ``istio.stats`` when ``istio_metrics``."""

    stat_prefix: str
    cluster: str = ""
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    idle_timeout_s: float = 3600.0              # Envoy's default 1 h; 0 turns it off
    max_connect_attempts: int = 1
    max_downstream_connection_duration_s: float = 0.0   # 0: none
    hash_source_ip: bool = False                # hash_policy: [{source_ip: {}}]
    access_log: tuple[ConnectionLog, ...] = ()
    kafka: KafkaBrokerConfig | None = None
    # Istio's standard TCP metrics (istio_tcp_*) for this chain's connections: Envoy's
    # istio.stats network filter in front of tcp_proxy, or native istio_metrics on the chain
    istio_metrics: IstioMetrics | None = None

    @property
    def cluster_names(self) -> tuple[str, ...]:
        return (self.cluster,) if self.cluster else tuple(w.name for w in self.weighted_clusters)
