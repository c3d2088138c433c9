"""Load balancers: pick one endpoint from a cluster's eligible hosts.

Each balancer is rebuilt when the eligible set changes (rare: health, ejection, EDS), so
``pick`` is cheap. ``exclude`` holds hosts already tried by this request (retries prefer a
different host when one exists).
"""

from __future__ import annotations

import random
from math import gcd
from typing import Sequence

from sidecar.config.model import LbConfig


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


class RoundRobin(LoadBalancer):
    """Weighted round robin: the schedule repeats each host ``weight/gcd`` times, spread out."""

    def rebuild(self, hosts):
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

    def pick(self, ctx, exclude=()):
        sched = self._sched
        if not sched:
            return None
        i = self._i
        self._i = i + 1 if i + 1 < len(sched) else 0
        h = sched[i]
        return self._avoid(h, exclude) if exclude else h


class Random(LoadBalancer):
    def rebuild(self, hosts):
        self.hosts = hosts
        self._weights = [h.endpoint.weight for h in hosts]
        self._uniform = len(set(self._weights)) <= 1

    def pick(self, ctx, exclude=()):
        hosts = self.hosts
        if not hosts:
            return None
        h = random.choice(hosts) if self._uniform else random.choices(hosts, self._weights)[0]
        return self._avoid(h, exclude) if exclude else h


class LeastRequest(LoadBalancer):
    """Power of N choices on active requests (Envoy's LEAST_REQUEST, default N=2)."""

    def pick(self, ctx, exclude=()):
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


def make_balancer(cfg: LbConfig) -> LoadBalancer:
    policy = cfg.policy
    if policy == "round_robin":
        return RoundRobin(cfg)
    if policy == "random":
        return Random(cfg)
    if policy == "least_request":
        return LeastRequest(cfg)
    if policy == "peak_ewma":
        from sidecar.cluster.balancers.peak_ewma import PeakEwmaBalancer
        return PeakEwmaBalancer(cfg)
    if policy in ("ring_hash", "maglev"):
        from sidecar.cluster.balancers.ring_hash import RingHashBalancer
        return RingHashBalancer(cfg)
    raise ValueError(f"unknown lb policy {policy}")
