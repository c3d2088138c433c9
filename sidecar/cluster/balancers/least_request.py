"""Power of N choices on active requests (Envoy's LEAST_REQUEST, default N=2)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sidecar.cluster.balancers.base import LoadBalancer
from sidecar.cluster.endpoint import EndpointState
from sidecar.core.context import HostInfo, PickContext


class LeastRequest(LoadBalancer):
    """Power of N choices on active requests (Envoy's LEAST_REQUEST, default N=2)."""

    def pick(self, ctx: PickContext | None,
             exclude: Sequence[HostInfo] = ()) -> EndpointState | None:
        hosts = self.hosts
        n = len(hosts)
        if n == 0:
            return None
        if n == 1:
            return hosts[0]
        best = None
        for _ in range(self.cfg.choice_count):
            h = hosts[random.randrange(n)]
            if exclude and h in exclude:
                continue
            if best is None or h.active_requests < best.active_requests:
                best = h
        return best if best is not None else self._avoid(hosts[0], exclude)
