"""What the proxy offers filters while they are built (``sidecar.core.filter.FilterEnv``)."""

from __future__ import annotations

from sidecar.cluster.cluster import ClusterState
from sidecar.cluster.manager import ClusterManager
from sidecar.core.filter import UpstreamClient
from sidecar.core.message import Request, Response
from sidecar.core.metrics import MetricFactory
from sidecar.observability.metrics import Metrics


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
    __slots__ = ("_metrics", "_clusters")

    def __init__(self, metrics: Metrics, clusters: ClusterManager):
        self._metrics = metrics
        self._clusters = clusters

    @property
    def metrics(self) -> MetricFactory:
        return self._metrics

    def upstream(self, cluster: str) -> UpstreamClient:
        state = self._clusters.states.get(cluster)
        if state is None or state.current is None:
            raise KeyError(cluster)
        return ClusterClient(state)
