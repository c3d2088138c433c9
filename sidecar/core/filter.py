"""The filter contract: a filter is ``async (request, next) -> response``.

A filter short-circuits by returning a response without awaiting ``next``. Filters are built
once per route per config snapshot (``FilterSpec.build``); per-request state lives in
``request.ctx``; state that must outlive a config reload (JWKS, token buckets, replay caches)
lives in the filter's own typed state object, made once per process by ``FilterSpec.new_state``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from sidecar.core.context import RouteInfo
from sidecar.core.grpc import EnvoyGrpcService, GrpcReply
from sidecar.core.limits import (
    FailurePolicy,
    RateLimitService,
    RemoteBuckets,
    RemoteReplayCache,
    ReplayCache,
    TokenBuckets,
)
from sidecar.core.message import Request, Response
from sidecar.core.metrics import MetricFactory

Handler = Callable[[Request], Awaitable[Response]]
"""The ``next`` a filter calls: the rest of the route's stack."""


class Filter:
    """Base class for HTTP filters (subclassing it is optional: any object with this
    ``__call__`` is a filter)."""

    async def __call__(self, req: Request, next: Handler) -> Response:
        return await next(req)

    def close(self) -> None:
        """Called when the config snapshot that built this filter is retired."""


FilterLike = Callable[[Request, Handler], Awaitable[Response]]


class UpstreamClient(Protocol):
    """Sends a request through one cluster: its load balancer, breakers, pools and TLS."""

    @property
    def name(self) -> str:
        """The cluster's name."""
        ...

    async def send(self, request: Request) -> Response: ...


class GrpcClient(Protocol):
    """Unary gRPC calls to one ``envoy_grpc`` service: each is a POST (``application/grpc``,
    ``te: trailers``, ``grpc-timeout``, one length-prefixed message) through the service's
    cluster's ``Cluster.send``. Never raises for a failed call: the reply's status says why."""

    @property
    def service(self) -> EnvoyGrpcService: ...

    async def unary(self, method: str, message: bytes, timeout_s: float,
                    metadata: tuple[tuple[str, str], ...] = ()) -> GrpcReply:
        """Call ``method`` (``package.Service/Method``) with the serialized ``message``,
        bounded by ``timeout_s``."""
        ...


class FilterEnv(Protocol):
    """The services the proxy offers a filter while it is built (typed, no string bags)."""

    @property
    def metrics(self) -> MetricFactory: ...

    def upstream(self, cluster: str) -> UpstreamClient:
        """A client for ``cluster`` (raises ``KeyError`` when no such cluster is configured)."""
        ...

    def grpc_client(self, service: EnvoyGrpcService) -> GrpcClient:
        """A unary gRPC client of ``service`` through its cluster. A cluster not configured
        (yet) is accepted, as by Envoy: calls fail UNAVAILABLE until it exists. Raises
        ``ValueError`` when the cluster is configured and does not speak HTTP/2."""
        ...

    @property
    def local_cluster(self) -> str:
        """The local service cluster (Envoy's ``--service-cluster``: the bootstrap's
        ``node.cluster``), "" when not given."""
        ...

    # ---- limits that are the sidecar's (every worker), or every replica's (a store) -------
    def token_buckets(self) -> TokenBuckets:
        """Token buckets shared by every worker of the sidecar (exact; see docs/resilience.md)."""
        ...

    def replay_cache(self) -> ReplayCache:
        """The sidecar's ``jti`` replay cache, shared by every worker."""
        ...

    def replay_store(self, store: str, policy: FailurePolicy) -> RemoteReplayCache:
        """The replay cache in the named store (``stores:``), shared by every replica; with
        ``fail_open`` it falls back on the sidecar's own cache while the store is down.
        Raises ``KeyError`` when no such store is configured."""
        ...

    def remote_buckets(self, store: str, policy: FailurePolicy) -> RemoteBuckets:
        """Token buckets in the named store, shared by every replica. Raises ``KeyError``."""
        ...

    def rate_limit_service(self, service: EnvoyGrpcService) -> RateLimitService:
        """Envoy's rate limit service (gRPC through ``service.cluster``); as ``grpc_client``
        (``ValueError`` for a cluster that does not speak HTTP/2)."""
        ...


ConfigT = TypeVar("ConfigT")
PerRouteT = TypeVar("PerRouteT")
StateT = TypeVar("StateT")

RawConfig = Mapping[str, object]


@dataclass(frozen=True, slots=True)
class FilterSpec(Generic[ConfigT, PerRouteT, StateT]):
    """How one HTTP filter is parsed (both config formats), built and kept across reloads."""

    name: str                                        # canonical Envoy name
    short: str                                       # native YAML name
    type_url: str                                    # typed_config "@type" accepted from Envoy
    from_envoy: Callable[[RawConfig, str], ConfigT]  # typed_config (minus @type), path -> config
    from_native: Callable[[object, str], ConfigT]
    new_state: Callable[[FilterEnv], StateT]         # once per process (survives reloads)
    # (config, per-route config or None, state, env, route) -> the filter, or None to skip it
    build: Callable[[ConfigT, PerRouteT | None, StateT, FilterEnv, RouteInfo], FilterLike | None]
    per_route_type_url: str = ""
    per_route_from_envoy: Callable[[RawConfig, str], PerRouteT] | None = None
    per_route_from_native: Callable[[object, str], PerRouteT] | None = None
    close_state: Callable[[StateT], None] | None = None
    # files the config was made from (a user filter's module): the proxy reloads its config
    # when one changes
    source_files: Callable[[ConfigT], tuple[str, ...]] | None = None
    # filters that may appear several times, each instance named (user filters): (config, the
    # name of the Envoy filter entry, or None from native YAML) -> (the instance name, the
    # config carrying it). Per-route overrides and metrics use the instance name.
    name_instance: Callable[[ConfigT, str | None], tuple[str, ConfigT]] | None = None
    # (virtual host's override, route's override) -> the one the route gets; without it the
    # route's replaces the virtual host's (CORS merges field by field, as Envoy does)
    merge_per_route: Callable[[PerRouteT, PerRouteT], PerRouteT] | None = None


def no_state(env: FilterEnv) -> None:
    """``FilterSpec.new_state`` for filters that keep nothing across reloads."""
    return None
