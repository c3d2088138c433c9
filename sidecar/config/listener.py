"""Listener config: address, HTTP options and timeouts, edge policy, access logs (and the field
vocabulary native access logs may name), TLS, tracing, sidecar mode and admin; and, for L4
listeners, their filter chains (``FilterChain``), listener filters and connection logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.config.errors import ConfigError
from sidecar.config.http2 import DOWNSTREAM_DEFAULTS, Http2Options, UpgradeConfig
from sidecar.config.l4 import ConnectionLog, FilterChainMatch, ListenerFilters, TcpProxy
from sidecar.config.log_format import LogFormat, is_sensitive_header
from sidecar.config.route import HttpFilter, RouteConfig
from sidecar.config.telemetry import IstioMetrics
from sidecar.config.tls import DownstreamTls


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str = "/dev/stdout"
    format: str = "json"            # json | text | dev (fields below) | envoy (Envoy's formats)
    fields: tuple[str, ...] = ()    # empty: the default field set
    # format "envoy": the parsed SubstitutionFormatString (None: Envoy's default format)
    log_format: LogFormat | None = None


ESCAPED_SLASHES_ACTIONS = ("KEEP_UNCHANGED", "REJECT_REQUEST", "UNESCAPE_AND_REDIRECT",
                           "UNESCAPE_AND_FORWARD")
UNDERSCORE_ACTIONS = ("ALLOW", "REJECT_REQUEST", "DROP_HEADER")


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    host: str
    port: int
    route_config: RouteConfig | None = None
    rds_name: str = ""                    # when routes come from RDS
    http_filters: tuple[HttpFilter, ...] = ()
    stat_prefix: str = ""
    direction: str = "outbound"           # inbound | outbound (sidecar mode)
    idle_timeout_s: float = 3600.0        # downstream connection idle timeout (Envoy 1 h)
    request_headers_timeout_s: float = 10.0   # slow-loris guard
    request_timeout_s: float = 0.0        # until the whole request is received, 0 = off
    stream_idle_timeout_s: float = 300.0  # no byte in or out on a stream (Envoy 5 min), 0 = off
    max_stream_duration_s: float = 0.0    # a stream's whole life, 0 = off
    max_request_headers_kb: int = 60      # request line + header fields
    max_headers_count: int = 100          # header lines of a request (Envoy's default)
    headers_with_underscores_action: str = "ALLOW"   # ALLOW | REJECT_REQUEST | DROP_HEADER
    # path normalisation before filters and routing (the upstream gets the normalised path)
    normalize_path: bool = False          # RFC 3986 dot segments, unreserved %XX decoded
    merge_slashes: bool = False
    path_with_escaped_slashes_action: str = "KEEP_UNCHANGED"   # | REJECT_REQUEST |
    #                                      UNESCAPE_AND_REDIRECT | UNESCAPE_AND_FORWARD
    accept_http_10: bool = False          # Envoy answers 426 to HTTP/1.0 unless enabled
    generate_request_id: bool = True
    xff_num_trusted_hops: int = 0
    use_remote_address: bool = True
    # edge listeners: which peers are "internal" (their x-envoy-* headers and request ids are
    # trusted). Envoy 1.40 trusts none by default; native listeners trust loopback and RFC 1918.
    trust_private_peers: bool = False
    preserve_external_request_id: bool = False
    server_name: str = "envoy"
    # the router adds no x-envoy-* headers of its own (expected-rq-timeout-ms upstream;
    # upstream-service-time and overloaded downstream)
    suppress_envoy_headers: bool = False
    # strip ":port" from Host before virtual-host matching: "any" | "matching" (only when it is
    # the listener's port) | "none" (Envoy's default; native configs default to "any")
    strip_host_port: str = "none"
    # also remove that port from the Host header sent upstream (Envoy's strip_*_host_port does;
    # native listeners strip it only for virtual-host matching and forward Host unchanged)
    strip_host_header: bool = False
    access_log: tuple[AccessLogConfig, ...] = ()
    tls: DownstreamTls | None = None
    drain_timeout_s: float = 5.0
    tracing: "TracingConfig" | None = None   # Envoy HCM tracing (becomes Snapshot.tracing)
    # the downstream codec: "auto" (HTTP/2 by ALPN h2 or the connection preface, else
    # HTTP/1.1), "http1", "http2" (Envoy's codec_type)
    codec: str = "auto"
    http2: Http2Options = DOWNSTREAM_DEFAULTS
    upgrades: tuple[UpgradeConfig, ...] = ()   # Upgrade tokens tunnelled (upgrade_configs)
    istio_metrics: IstioMetrics | None = None   # opt-in Istio standard metrics
    # L4: several filter chains, picked per connection by their match (sidecar.listener.chains).
    # Empty: the listener is one HTTP chain made of the fields above (the common case). Set:
    # the HTTP fields above are unused and each HTTP chain carries its own (FilterChain.http).
    filter_chains: tuple["FilterChain", ...] = ()
    default_filter_chain: "FilterChain | None" = None
    listener_filters: ListenerFilters = ListenerFilters()
    connection_log: tuple[ConnectionLog, ...] = ()   # the listener's own access_log (L4)
    # per_connection_buffer_limit_bytes: bytes a TCP proxy buffers toward a slow side before
    # it stops reading the other (L4 listeners)
    buffer_limit_bytes: int = 1024 * 1024
    source: Any = None

    @property
    def l4(self) -> bool:
        """Whether connections are dispatched to filter chains (not one HTTP chain)."""
        return bool(self.filter_chains) or self.default_filter_chain is not None


@dataclass(frozen=True, slots=True)
class FilterChain:
    """One filter chain: its match, its TLS termination, and either an HTTP connection manager
    (``http``: the HCM settings, in the shape of an HTTP ``Listener``) or a ``tcp_proxy``."""

    name: str
    match: FilterChainMatch = FilterChainMatch()
    tls: DownstreamTls | None = None
    http: Listener | None = None
    tcp: TcpProxy | None = None


@dataclass(frozen=True, slots=True)
class Admin:
    host: str = "127.0.0.1"
    port: int = 9901


@dataclass(frozen=True, slots=True)
class TracingConfig:
    sample_percent: float = 1.0
    exporter: str = "none"          # none | otlp_http | console | memory
    endpoint: str = ""              # OTLP/HTTP collector URL
    service_name: str = "sidecar"


DEFAULT_FIELDS = ("start_time", "method", "path", "protocol", "status", "response_flags",
                  "duration_ms", "upstream_duration_ms", "bytes_received", "bytes_sent",
                  "upstream_host", "route", "cluster", "request_id", "trace_id", "user_agent",
                  "downstream_address", "authority", "listener", "grpc_status")


EXTRA_FIELDS = ("attempts", "upstream_cluster", "virtual_host", "peer_identity", "span_id",
                "x_forwarded_for", "referer")


KNOWN_FIELDS = frozenset(DEFAULT_FIELDS + EXTRA_FIELDS)


REQUEST_HEADER = "request_header."


RESPONSE_HEADER = "response_header."


def check_fields(fields: list[Any], path: str = "access_log.fields") -> tuple[str, ...]:
    """Validate a field list (for the config loaders): unknown or sensitive fields are a
    ConfigError with the path of the bad entry."""
    out = []
    for i, f in enumerate(fields):
        p = f"{path}[{i}]"
        if not isinstance(f, str) or not f:
            raise ConfigError(p, "must be a field name")
        for prefix in (REQUEST_HEADER, RESPONSE_HEADER):
            if f.startswith(prefix):
                name = f[len(prefix):]
                if not name:
                    raise ConfigError(p, f"{prefix}<name> needs a header name")
                if is_sensitive_header(name):
                    raise ConfigError(p, f"header {name!r} may carry credentials and is never logged")
                break
        else:
            if f not in KNOWN_FIELDS:
                raise ConfigError(p, f"unknown access log field {f!r} (known: "
                                  f"{', '.join(sorted(KNOWN_FIELDS))}, request_header.<name>, "
                                  f"response_header.<name>)")
        out.append(f)
    return tuple(out)


APP_CLUSTER = "local_app"


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    service: str
    app_host: str
    app_port: int
    health_path: str | None = None       # None: a TCP connect is the probe
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 1.0
    app_cluster: str = APP_CLUSTER
