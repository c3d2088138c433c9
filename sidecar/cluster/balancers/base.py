"""Load balancers: pick one endpoint from a cluster's eligible hosts.

Each balancer is rebuilt when the eligible set changes (rare: health, ejection, EDS), so
``pick`` is cheap. ``exclude`` holds hosts already tried by this request (retries prefer a
different host when one exists).
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.cluster.endpoint import EndpointState
from sidecar.config.cluster import LbConfig
from sidecar.core.context import HostInfo, PickContext


class LoadBalancer:
    def __init__(self, cfg: LbConfig):
        self.cfg = cfg
        self.hosts: Sequence[EndpointState] = ()

    def rebuild(self, hosts: Sequence[EndpointState]) -> None:
        self.hosts = hosts

    def pick(self, ctx: PickContext | None,
             exclude: Sequence[HostInfo] = ()) -> EndpointState | None:
        raise NotImplementedError

    def record(self, host: EndpointState, status: int | None, latency: float,
               local_error: str | None) -> None:
        """Outcome of one attempt on ``host`` (latency-aware balancers learn from it)."""

    def _avoid(self, chosen: EndpointState, exclude: Sequence[HostInfo]) -> EndpointState:
        """Retry-aware second chance: if ``chosen`` was tried, take any untried host."""
        if exclude and chosen in exclude:
            for h in self.hosts:
                if h not in exclude:
                    return h
        return chosen
