"""Load balancers: pick one endpoint from a cluster's eligible hosts.

Each balancer is rebuilt when the eligible set changes (rare: health, ejection, EDS), so
``pick`` is cheap. ``exclude`` holds hosts already tried by this request (retries prefer a
different host when one exists).
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.config.cluster import LbConfig


class LoadBalancer:
    def __init__(self, cfg: LbConfig):
        self.cfg = cfg
        self.hosts: Sequence = ()

    def rebuild(self, hosts: Sequence) -> None:
        self.hosts = hosts

    def pick(self, ctx, exclude: Sequence = ()):  # -> EndpointState | None
        raise NotImplementedError

    def record(self, host, status, latency: float, local_error) -> None:
        """Outcome of one attempt on ``host`` (latency-aware balancers learn from it)."""

    def _avoid(self, chosen, exclude):
        """Retry-aware second chance: if ``chosen`` was tried, take any untried host."""
        if chosen is not None and exclude and chosen in exclude:
            for h in self.hosts:
                if h not in exclude:
                    return h
        return chosen


