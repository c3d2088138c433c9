"""Random choice, weighted by endpoint weight (Envoy's RANDOM)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sidecar.cluster.balancers.base import LoadBalancer
from sidecar.cluster.endpoint import EndpointState
from sidecar.core.context import HostInfo, PickContext


class Random(LoadBalancer):
    def rebuild(self, hosts: Sequence[EndpointState]) -> None:
        self.hosts = hosts
        self._weights = [h.endpoint.weight for h in hosts]
        self._uniform = len(set(self._weights)) <= 1

    def pick(self, ctx: PickContext | None,
             exclude: Sequence[HostInfo] = ()) -> EndpointState | None:
        hosts = self.hosts
        if not hosts:
            return None
        h = random.choice(hosts) if self._uniform else random.choices(hosts, self._weights)[0]
        return self._avoid(h, exclude) if exclude else h
