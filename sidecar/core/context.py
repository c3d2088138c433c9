"""Per-request state shared by the layers of one request: one typed object, never global.

Layers and filters read and write named fields; there is no string-keyed bag. The one
namespaced map is Envoy's *dynamic metadata* (``metadata[filter_name][key]``), which filters
use to hand facts to later filters and to the access log, exactly as in Envoy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from sidecar.core.connection_id import ConnectionId

if TYPE_CHECKING:
    from sidecar.core.limits import RouteRateLimits
    from sidecar.core.message import Request, Response


class HostInfo(Protocol):
    """The upstream endpoint an attempt went to (a cluster's endpoint state)."""

    @property
    def address(self) -> str: ...


class PickContext(Protocol):
    """What a load balancer may read of the request (``RequestContext``) or the connection
    (``sidecar.core.connection.ConnectionContext``) it picks a host for."""

    @property
    def hash_key(self) -> int | None: ...


class RouteInfo(Protocol):
    """What a layer may know of the route that matched (``sidecar.route.table.CompiledRoute``)."""

    @property
    def name(self) -> str: ...

    @property
    def stat_name(self) -> str: ...

    @property
    def vhost_name(self) -> str: ...

    @property
    def cluster_names(self) -> tuple[str, ...]:
        """The clusters the route names in its config (empty for ``cluster_header`` routes)."""
        ...

    def pick_cluster(self, req: Request) -> str:
        """The cluster this request will go to ("" when the route answers itself)."""
        ...

    @property
    def rate_limits(self) -> RouteRateLimits:
        """The route's and its virtual host's ``rate_limits`` (the global rate limit filter)."""
        ...


class ClientSpan(Protocol):
    def end(self, status: int | None, flag: str | None = None) -> None: ...


class ServerSpan(Protocol):
    """The sampled server span of one request (``sidecar.observability.tracing``)."""

    def start_client(self, req: Request, host: HostInfo, attempt_no: int = 1) -> ClientSpan:
        """A client span for one upstream attempt; sets the propagation headers on ``req``."""
        ...

    @property
    def trace_id_hex(self) -> str: ...

    @property
    def span_id_hex(self) -> str: ...


class StreamObserver(Protocol):
    """Told when a stream is over (its response written, or the stream reset)."""

    def stream_done(self, req: Request, resp: Response, body_bytes: int) -> None: ...


JsonValue = object
"""A JSON-like value in dynamic metadata (str, int, float, bool, None, list, dict)."""


class RequestContext:
    """Everything the layers of one request share."""

    __slots__ = ("listener_name", "local_port", "downstream_addr", "remote_ip", "tls",
                 "peer_identity", "protocol", "request_id", "start", "route", "vhost_name",
                 "flags", "response_code_details", "attempts", "tried_hosts", "cluster",
                 "upstream_host", "upstream_start", "upstream_duration", "deadline",
                 "attempt_deadline", "hash_key", "span", "jwt_payloads", "metadata",
                 "bytes_received", "bytes_sent", "grpc", "observer", "upstream_status",
                 "original_path", "stream_idle_timeout", "max_stream_duration", "abort",
                 "grpc_status", "grpc_timeout", "peer_workload", "connection")

    def __init__(self, listener_name: str, downstream_addr: tuple[str, int] | None,
                 start: float, local_port: int = 0):
        self.listener_name = listener_name
        self.local_port = local_port               # the listener's bound port
        self.downstream_addr = downstream_addr     # the TCP peer
        # the client's address: the peer, or the XFF entry trusted by xff_num_trusted_hops
        self.remote_ip = downstream_addr[0] if downstream_addr else ""
        self.tls = False
        self.peer_identity: str | None = None      # mTLS peer URI SAN (SPIFFE ID)
        self.protocol = "HTTP/1.1"
        self.request_id = ""
        self.start = start                         # perf_counter() when the head arrived
        self.route: RouteInfo | None = None
        self.vhost_name = ""
        self.flags: list[str] = []                 # Envoy response flags (NR, UH, UF, ...)
        self.response_code_details = ""
        self.attempts = 0
        self.tried_hosts: list[HostInfo] = []
        self.cluster = ""
        self.upstream_host = ""
        self.upstream_start = 0.0
        self.upstream_duration: float | None = None
        self.upstream_status: int | None = None
        self.deadline: float | None = None         # the route timeout (loop time)
        self.attempt_deadline: float | None = None  # min(per-try timeout, route deadline)
        self.hash_key: int | None = None           # from the route's hash_policy (ring hash)
        self.span: ServerSpan | None = None
        self.jwt_payloads: dict[str, dict[str, JsonValue]] = {}
        self.metadata: dict[str, dict[str, JsonValue]] = {}
        self.bytes_received = 0
        self.bytes_sent = 0
        self.grpc = False                          # content-type application/grpc*
        self.observer: StreamObserver | None = None
        self.original_path = ""                    # the path before a route rewrote it
        # set by an upstream exchange in progress (an HTTP/2 stream): the downstream codec
        # calls it when its client resets the stream, so the upstream stream is reset too
        self.abort: Callable[[], None] | None = None
        self.grpc_status: str | None = None        # of the response (headers or trailers)
        # the client's grpc-timeout in seconds, read when the request arrived (before any
        # route header mutation), for routes with max_stream_duration.grpc_timeout_header_max
        self.grpc_timeout: float | None = None
        # a route's own stream timeouts (seconds, 0 = off), overriding the listener's
        self.stream_idle_timeout: float | None = None
        self.max_stream_duration: float | None = None
        # the peer's workload labels from Istio metadata exchange, once checked against its
        # verified identity (a sidecar.observability.workload.WorkloadLabels); Istio metrics
        self.peer_workload: object | None = None
        # the downstream connection the request came on (a per-connection limit keys on it);
        # None when the request came from no connection
        self.connection: ConnectionId | None = None

    def flag(self, flag: str) -> None:
        self.flags.append(flag)
