"""The one internal config model: frozen, slotted dataclasses.

Both ways in (native YAML in ``sidecar.native`` and Envoy v3 in
``control_plane_client.translate``) produce a ``Snapshot``; nothing downstream sees dicts.
Per-feature config types live beside their code (``sidecar.retry.RetryPolicy``,
``sidecar.circuit_breaker.CircuitBreakers``, ...) and are only referenced here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from sidecar.cluster.breakers import CircuitBreakers
from sidecar.config.health_check import HealthCheck
from sidecar.config.outlier import OutlierDetection
from sidecar.route.retry import RetryPolicy
from sidecar.tls.context import DownstreamTls, UpstreamTls


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    weight: int = 1
    hostname: str = ""          # for DNS clusters: the name this address came from

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


LB_POLICIES = ("round_robin", "random", "least_request", "peak_ewma", "ring_hash", "maglev")


@dataclass(frozen=True, slots=True)
class LbConfig:
    policy: str = "round_robin"
    choice_count: int = 2            # least_request / peak_ewma: power of N choices
    ewma_decay_s: float = 10.0       # peak_ewma decay time
    ewma_default_rtt_s: float = 0.030
    ewma_failure_penalty_s: float = 0.0   # a failure counts as max(latency, penalty); 0 = default
    ring_size: int = 1024
    panic_threshold: float = 50.0    # percent healthy below which all hosts are used


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    type: str = "static"                 # static | strict_dns | logical_dns | eds
    endpoints: tuple[Endpoint, ...] = ()
    connect_timeout_s: float = 5.0
    lb: LbConfig = LbConfig()
    dns_refresh_s: float = 5.0
    eds_service_name: str = ""
    max_idle_connections: int = 64       # per endpoint, idle pooled connections kept
    idle_timeout_s: float = 3600.0       # upstream pooled connection idle timeout (Envoy default 1h)
    per_connection_buffer_limit: int = 1024 * 1024
    circuit_breakers: CircuitBreakers = CircuitBreakers()
    outlier_detection: Optional[OutlierDetection] = None
    health_checks: tuple[HealthCheck, ...] = ()
    tls: Optional[UpstreamTls] = None
    source: Any = None                   # the wire dict it came from, for config_dump

    def __hash__(self) -> int:
        return hash(self.name)


# ---- routing ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StringMatcher:
    """Envoy's StringMatcher: exact / prefix / suffix / contains / safe_regex."""
    exact: Optional[str] = None
    prefix: Optional[str] = None
    suffix: Optional[str] = None
    contains: Optional[str] = None
    regex: Optional[re.Pattern] = None
    ignore_case: bool = False

    def matches(self, value: str) -> bool:
        if self.ignore_case:
            value = value.lower()
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.suffix is not None:
            return value.endswith(self.suffix)
        if self.contains is not None:
            return self.contains in value
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return True


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    name: str                       # lower-case
    value: Optional[StringMatcher] = None   # None with present=None: header present
    present: Optional[bool] = None
    invert: bool = False
    # envoy range_match
    range_start: Optional[int] = None
    range_end: Optional[int] = None

    def matches(self, headers) -> bool:
        if self.name == ":method":
            raise AssertionError("method matchers are compiled separately")
        values = headers.getall(self.name, None)
        if self.present is not None:
            ok = (values is not None) == self.present
        elif values is None:
            ok = False
        elif self.value is None and self.range_start is None:
            ok = True
        else:
            v = ",".join(values) if len(values) > 1 else values[0]
            if self.range_start is not None:
                try:
                    n = int(v)
                    ok = self.range_start <= n < self.range_end
                except ValueError:
                    ok = False
            else:
                ok = self.value.matches(v)
        return ok != self.invert


@dataclass(frozen=True, slots=True)
class QueryMatcher:
    name: str
    value: Optional[StringMatcher] = None
    present: bool = True


@dataclass(frozen=True, slots=True)
class RouteMatch:
    prefix: Optional[str] = None
    path: Optional[str] = None
    regex: Optional[re.Pattern] = None
    path_separated_prefix: Optional[str] = None
    case_sensitive: bool = True
    headers: tuple[HeaderMatcher, ...] = ()
    query_params: tuple[QueryMatcher, ...] = ()
    methods: tuple[str, ...] = ()           # empty = any
    cookies: tuple[tuple[str, StringMatcher], ...] = ()   # native: cookie-based version routing
    runtime_fraction: Optional[float] = None  # percent of requests that match (0..100)


@dataclass(frozen=True, slots=True)
class HeaderValueOption:
    name: str
    value: str
    append: bool = True   # False: overwrite if present


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    request_add: tuple[HeaderValueOption, ...] = ()
    request_remove: tuple[str, ...] = ()
    response_add: tuple[HeaderValueOption, ...] = ()
    response_remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.request_add or self.request_remove or self.response_add
                    or self.response_remove)


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int
    headers: HeaderMutation = HeaderMutation()


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    cluster: str
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class HashPolicy:
    header: Optional[str] = None
    cookie: Optional[str] = None
    source_ip: bool = False
    query_parameter: Optional[str] = None
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class RouteAction:
    cluster: Optional[str] = None
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    cluster_header: Optional[str] = None
    prefix_rewrite: Optional[str] = None
    regex_rewrite: Optional[tuple[re.Pattern, str]] = None
    host_rewrite: Optional[str] = None
    auto_host_rewrite: bool = False
    timeout_s: float = 15.0                  # 0 disables (Envoy's default is 15 s)
    retry_policy: Optional[RetryPolicy] = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    hash_policy: tuple[HashPolicy, ...] = ()
    # honour a client's x-envoy-upstream-rq-timeout-ms (shorten only); off unless the route opts in
    allow_timeout_header: bool = False


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: str = ""


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    prefix_rewrite: Optional[str] = None
    status: int = 301
    strip_query: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    match: RouteMatch
    action: RouteAction | DirectResponse | Redirect
    name: str = ""
    headers: HeaderMutation = HeaderMutation()
    # filter name (canonical Envoy name) -> per-route config object, or None to disable
    per_filter: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    headers: HeaderMutation = HeaderMutation()
    per_filter: tuple[tuple[str, Any], ...] = ()
    retry_policy: Optional[RetryPolicy] = None
    # send x-envoy-attempt-count upstream on routes with retries (Envoy:
    # include_request_attempt_count, off by default; native: on)
    include_attempt_count: bool = False


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    headers: HeaderMutation = HeaderMutation()


@dataclass(frozen=True, slots=True)
class HttpFilter:
    name: str          # canonical Envoy name, e.g. envoy.filters.http.jwt_authn
    config: Any        # the filter module's frozen config object
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str = "/dev/stdout"
    format: str = "json"            # json | text
    fields: tuple[str, ...] = ()    # empty: the default field set


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    host: str
    port: int
    route_config: Optional[RouteConfig] = None
    rds_name: str = ""                    # when routes come from RDS
    http_filters: tuple[HttpFilter, ...] = ()
    stat_prefix: str = ""
    direction: str = "outbound"           # inbound | outbound (sidecar mode)
    idle_timeout_s: float = 3600.0        # downstream connection idle timeout (Envoy 1 h)
    request_headers_timeout_s: float = 10.0   # slow-loris guard
    request_timeout_s: float = 0.0        # whole downstream request, 0 = off
    max_request_headers_kb: int = 60
    accept_http_10: bool = False          # Envoy answers 426 to HTTP/1.0 unless enabled
    generate_request_id: bool = True
    xff_num_trusted_hops: int = 0
    use_remote_address: bool = True
    # edge listeners: which peers are "internal" (their x-envoy-* headers and request ids are
    # trusted). Envoy 1.40 trusts none by default; native listeners trust loopback and RFC 1918.
    trust_private_peers: bool = False
    preserve_external_request_id: bool = False
    server_name: str = "envoy"
    # strip ":port" from Host before virtual-host matching: "any" | "matching" (only when it is
    # the listener's port) | "none" (Envoy's default; native configs default to "any")
    strip_host_port: str = "none"
    # also remove that port from the Host header sent upstream (Envoy's strip_*_host_port does;
    # native listeners strip it only for virtual-host matching and forward Host unchanged)
    strip_host_header: bool = False
    access_log: tuple[AccessLogConfig, ...] = ()
    tls: Optional[DownstreamTls] = None
    drain_timeout_s: float = 5.0
    tracing: Optional["TracingConfig"] = None   # Envoy HCM tracing (becomes Snapshot.tracing)
    source: Any = None


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


@dataclass(frozen=True, slots=True)
class Snapshot:
    listeners: tuple[Listener, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    admin: Admin = Admin()
    version: str = "0"
    tracing: TracingConfig = TracingConfig()
    control_plane: Any = None            # control_plane_client config, when dynamic
    node: Any = None
    source_format: str = "native"        # native | envoy
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def cluster(self, name: str) -> Optional[Cluster]:
        for c in self.clusters:
            if c.name == name:
                return c
        return None
