"""Weighted round robin (Envoy's ROUND_ROBIN): a smooth schedule computed once per host change."""

from __future__ import annotations

import random
from collections.abc import Sequence
from math import gcd

from sidecar.cluster.balancers.base import LoadBalancer
from sidecar.cluster.endpoint import EndpointState
from sidecar.core.context import HostInfo, PickContext


class RoundRobin(LoadBalancer):
    """Weighted round robin: the schedule repeats each host ``weight/gcd`` times, spread out."""

    def rebuild(self, hosts: Sequence[EndpointState]) -> None:
        self.hosts = hosts
        weights = [h.endpoint.weight for h in hosts]
        if hosts and len(set(weights)) > 1:
            g = 0
            for w in weights:
                g = gcd(g, w)
            reduced = [w // g for w in weights]
            if sum(reduced) <= 10_000:
                # smooth weighted round robin (nginx's), computed once
                cur = [0] * len(hosts)
                total = sum(reduced)
                sched = []
                for _ in range(total):
                    for i, w in enumerate(reduced):
                        cur[i] += w
                    best = max(range(len(hosts)), key=lambda i: cur[i])
                    cur[best] -= total
                    sched.append(hosts[best])
                self._sched = sched
            else:
                self._sched = random.choices(hosts, weights=weights, k=10_000)
        else:
            self._sched = list(hosts)
        # start at a random offset so many sidecars do not hit hosts in lockstep
        self._i = random.randrange(len(self._sched)) if self._sched else 0

    def pick(self, ctx: PickContext | None,
             exclude: Sequence[HostInfo] = ()) -> EndpointState | None:
        sched = self._sched
        if not sched:
            return None
        i = self._i
        self._i = i + 1 if i + 1 < len(sched) else 0
        h = sched[i]
        return self._avoid(h, exclude) if exclude else h
