"""What the proxy offers filters while they are built (``sidecar.core.filter.FilterEnv``):
clusters to call (HTTP, or unary gRPC through ``sidecar.cluster.grpc``), and the limits that are the sidecar's (token buckets and the replay cache in
``sidecar.shared``, shared by every worker) or every replica's (Redis stores, Envoy's rate
limit service)."""

from __future__ import annotations

from sidecar.cluster.cluster import ClusterState
from sidecar.cluster.grpc import ClusterGrpcClient, not_http2
from sidecar.cluster.manager import ClusterManager
from sidecar.config.stores import StoresConfig
from sidecar.core.filter import GrpcClient, UpstreamClient
from sidecar.core.grpc import EnvoyGrpcService
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
from sidecar.observability.metrics import Metrics
from sidecar.runtime.stores import StoreRuntime, redis_module
from sidecar.shared.api import SharedState


class ClusterClient:
    """Sends a filter's request through one cluster (its balancer, breakers, pools, TLS): the
    same ``Cluster.send`` routes use, like Envoy Lua's ``httpCall``."""

    __slots__ = ("state",)

    def __init__(self, state: ClusterState):
        self.state = state

    @property
    def name(self) -> str:
        return self.state.name

    async def send(self, request: Request) -> Response:
        return await self.state.send(request)


class ProxyFilterEnv:
    __slots__ = ("_metrics", "_clusters", "_shared", "_stores", "_remote", "_local_cluster")

    def __init__(self, metrics: Metrics, clusters: ClusterManager,
                 shared: SharedState | None = None, stores: StoreRuntime | None = None,
                 local_cluster: str = ""):
        self._metrics = metrics
        self._local_cluster = local_cluster
        self._clusters = clusters
        self._shared = shared if shared is not None else clusters.shared
        self._stores = stores if stores is not None else StoreRuntime(StoresConfig(), metrics)
        # one client per (store, policy), kept while the store's config is unchanged
        self._remote: dict[tuple[str, str, FailurePolicy], object] = {}

    @property
    def metrics(self) -> MetricFactory:
        return self._metrics

    @property
    def local_cluster(self) -> str:
        return self._local_cluster

    def upstream(self, cluster: str) -> UpstreamClient:
        state = self._clusters.states.get(cluster)
        if state is None or state.current is None:
            raise KeyError(cluster)
        return ClusterClient(state)

    def token_buckets(self) -> TokenBuckets:
        return self._shared.buckets()

    def replay_cache(self) -> ReplayCache:
        return self._shared.replay()

    def replay_store(self, store: str, policy: FailurePolicy) -> RemoteReplayCache:
        st = self._stores.redis(store)
        key = ("replay", store, policy)
        c = self._remote.get(key)
        rs = redis_module()
        if not isinstance(c, rs.RedisReplayCache) or c.store is not st:
            c = self._remote[key] = rs.RedisReplayCache(st, policy, local=self._shared.replay())
        return c

    def remote_buckets(self, store: str, policy: FailurePolicy) -> RemoteBuckets:
        st = self._stores.redis(store)
        key = ("buckets", store, policy)
        c = self._remote.get(key)
        rs = redis_module()
        if not isinstance(c, rs.RedisBuckets) or c.store is not st:
            c = self._remote[key] = rs.RedisBuckets(st, policy)
        return c

    def grpc_client(self, service: EnvoyGrpcService) -> GrpcClient:
        state = self._clusters.state(service.cluster)
        why = not_http2(state)
        if why is not None:
            raise ValueError(why)
        return ClusterGrpcClient(service, state)

    def rate_limit_service(self, service: EnvoyGrpcService) -> RateLimitService:
        return self._stores.rate_limit_service(self.grpc_client(service))
