"""Cluster config: endpoints, load balancing, circuit breakers, outlier detection, active health
checks; and the parsers both config formats share for them (breaker thresholds, outlier
fields, status ranges)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.http2 import UPSTREAM_DEFAULTS, Http2Options
from sidecar.config.tls import UpstreamTls
from sidecar.config.wire import Raw


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
class RetryBudget:
    budget_percent: float = 20.0      # share of active requests that may be retries
    min_retry_concurrency: int = 3


# Idle pooled connections kept per endpoint: Envoy has no such cap (a connection stays pooled
# until its idle timeout, within max_connections), so the default is that breaker's default.
DEFAULT_MAX_IDLE_CONNECTIONS = 1024


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    retry_budget: RetryBudget | None = None


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    default: Thresholds = Thresholds()
    high: Thresholds = Thresholds()


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    split_external_local_origin_errors: bool = False
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_time_s: float = 300.0
    max_ejection_percent: float = 10.0
    enforcing_consecutive_5xx: float = 100.0
    enforcing_consecutive_gateway_failure: float = 0.0
    enforcing_consecutive_local_origin_failure: float = 100.0
    enforcing_success_rate: float = 100.0
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: float = 1.9


@dataclass(frozen=True, slots=True)
class TcpHealthCheck:
    """Envoy ``tcp_health_check``: connect, send ``send`` (if any), and pass when every
    ``receive`` block is found in the answer, in order (not necessarily contiguous); with
    neither, a successful connect passes."""

    send: bytes = b""
    receive: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/healthz"
    host: str = ""                       # Host header; "" = the cluster name (as Envoy)
    interval_s: float = 5.0
    interval_jitter_s: float = 0.0       # + uniform [0, jitter) on every interval
    interval_jitter_percent: float = 0.0  # + uniform [0, interval x percent / 100)
    initial_jitter_s: float = 0.0        # the first check waits uniform [0, initial_jitter)
    timeout_s: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 3
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)   # [start, end) ranges
    # statuses that count toward unhealthy_threshold instead of failing the host at once
    retriable_statuses: tuple[tuple[int, int], ...] = ()
    unhealthy_interval_s: float | None = None       # while unhealthy (default: interval)
    unhealthy_edge_interval_s: float | None = None  # right after turning unhealthy
    healthy_edge_interval_s: float | None = None    # right after turning healthy
    no_traffic_interval_s: float | None = None      # until the cluster has seen traffic
    reuse_connection: bool = True        # keep the check's connection between checks (Envoy)
    # gRPC health checking (grpc.health.v1.Health/Check over HTTP/2) instead of GET <path>:
    # the service name asked about ("" = the server as a whole), and the :authority sent
    grpc_service: str | None = None
    grpc_authority: str = ""
    tcp: TcpHealthCheck | None = None    # a TCP check instead of the HTTP GET above

    def status_ok(self, status: int) -> bool:
        for s, e in self.expected_statuses:
            if s <= status < e:
                return True
        return False

    def status_retriable(self, status: int) -> bool:
        for s, e in self.retriable_statuses:
            if s <= status < e:
                return True
        return False


# Envoy's DnsLookupFamily: AUTO prefers IPv6 and falls back to IPv4; V4_PREFERRED the other
# way round; ALL takes both families
DNS_LOOKUP_FAMILIES = ("AUTO", "V4_ONLY", "V6_ONLY", "V4_PREFERRED", "ALL")


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    type: str = "static"                 # static | strict_dns | logical_dns | eds | original_dst
    endpoints: tuple[Endpoint, ...] = ()
    connect_timeout_s: float = 5.0
    lb: LbConfig = LbConfig()
    dns_refresh_s: float = 5.0
    dns_lookup_family: str = "ALL"       # native default; Envoy's default (AUTO) when translated
    # re-resolve when the records' TTL runs out rather than every dns_refresh_s (a TTL of 0:
    # dns_refresh_s); and/or ask these resolvers ("ip:port") instead of the system's
    respect_dns_ttl: bool = False
    dns_resolvers: tuple[str, ...] = ()
    eds_service_name: str = ""
    max_idle_connections: int = DEFAULT_MAX_IDLE_CONNECTIONS   # per endpoint
    idle_timeout_s: float = 3600.0       # upstream pooled connection idle timeout (Envoy default 1h)
    per_connection_buffer_limit: int = 1024 * 1024
    # response head limits: over them the response is a 502 and the connection closes
    max_response_headers_count: int = 100     # Envoy's common_http_protocol_options default
    max_response_headers_kb: int = 80         # Envoy's HTTP/1 default
    circuit_breakers: CircuitBreakers = CircuitBreakers()
    outlier_detection: OutlierDetection | None = None
    health_checks: tuple[HealthCheck, ...] = ()
    tls: UpstreamTls | None = None
    # the upstream protocol: "http1", "http2", or "downstream" (the client's protocol:
    # Envoy's use_downstream_protocol_config)
    protocol: str = "http1"
    http2: Http2Options = UPSTREAM_DEFAULTS
    # ORIGINAL_DST: hosts are the downstream connections' original destinations, made on use
    # and dropped after cleanup_interval without connections; upstream_port_override replaces
    # their port (0: keep it)
    cleanup_interval_s: float = 5.0
    upstream_port_override: int = 0
    bind_address: str = ""               # upstream_bind_config: local address of connections
    source: Any = None                   # the wire dict it came from, for config_dump

    def __hash__(self) -> int:
        return hash(self.name)



_KEYS = ("max_connections", "max_pending_requests", "max_requests", "max_retries", "retry_budget")


def _thresholds(d: Raw, path: str, envoy: bool) -> Thresholds:
    w.check_keys(d, (*_KEYS, "priority", "track_remaining") if envoy else _KEYS, path)
    budget = None
    if d.get("retry_budget") is not None:
        bp = w.join(path, "retry_budget")
        b = w.check_keys(d["retry_budget"], ("budget_percent", "min_retry_concurrency"), bp)
        budget = RetryBudget(budget_percent=w.number(b, "budget_percent", bp, 20.0, lo=0, hi=100),
                             min_retry_concurrency=w.integer(b, "min_retry_concurrency", bp, 3, lo=0))
    # track_remaining: the remaining capacity is always visible (StateCollector), so the
    # Envoy switch is accepted and has nothing to turn on
    return Thresholds(
        max_connections=w.integer(d, "max_connections", path, 1024, lo=1),
        max_pending_requests=w.integer(d, "max_pending_requests", path, 1024, lo=0),
        max_requests=w.integer(d, "max_requests", path, 1024, lo=1),
        max_retries=w.integer(d, "max_retries", path, 3, lo=0),
        retry_budget=budget,
    )


_FIELDS_DURATION = {"interval": "interval_s", "base_ejection_time": "base_ejection_time_s",
                    "max_ejection_time": "max_ejection_time_s"}


_FIELDS_INT = ("consecutive_5xx", "consecutive_gateway_failure",
               "consecutive_local_origin_failure", "success_rate_minimum_hosts",
               "success_rate_request_volume")


_FIELDS_PERCENT = ("max_ejection_percent", "enforcing_consecutive_5xx",
                   "enforcing_consecutive_gateway_failure",
                   "enforcing_consecutive_local_origin_failure", "enforcing_success_rate")


def outlier_detection_from_wire(d: Raw, path: str) -> OutlierDetection:
    """Envoy ``outlier_detection``; the native format uses the same field names."""
    w.check_keys(d, (*_FIELDS_DURATION, *_FIELDS_INT, *_FIELDS_PERCENT,
                     "split_external_local_origin_errors", "success_rate_stdev_factor"), path)
    kw: dict[str, Any] = {}
    for k, attr in _FIELDS_DURATION.items():
        if k in d:
            kw[attr] = w.duration(d, k, path)
            if kw[attr] <= 0 and k != "max_ejection_time":
                raise ConfigError(w.join(path, k), "must be greater than zero")
    for k in _FIELDS_INT:
        if k in d:
            kw[k] = w.integer(d, k, path, lo=0)
    for k in _FIELDS_PERCENT:
        if k in d:
            kw[k] = float(w.integer(d, k, path, lo=0, hi=100))
    if "split_external_local_origin_errors" in d:
        kw["split_external_local_origin_errors"] = w.boolean(d, "split_external_local_origin_errors", path)
    if "success_rate_stdev_factor" in d:
        # Envoy: the factor is given multiplied by 1000
        kw["success_rate_stdev_factor"] = w.integer(d, "success_rate_stdev_factor", path, lo=0) / 1000.0
    return OutlierDetection(**kw)


def _statuses(v: object, path: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, list):
        raise ConfigError(path, "must be a list of status codes or {start, end} ranges")
    out = []
    for i, r in enumerate(v):
        rp = w.join(path, i)
        if isinstance(r, int) and not isinstance(r, bool):
            if not 100 <= r <= 599:
                raise ConfigError(rp, "must be 100..599")
            out.append((r, r + 1))
            continue
        w.check_keys(r, ("start", "end"), rp)
        s, e = w.integer(r, "start", rp, lo=100, hi=599), w.integer(r, "end", rp, lo=101, hi=600)
        if e <= s:
            raise ConfigError(rp, "end must be greater than start (the range is [start, end))")
        out.append((s, e))
    return tuple(out)


def _positive(v: float, path: str) -> float:
    if v <= 0:
        raise ConfigError(path, "must be greater than zero")
    return v
