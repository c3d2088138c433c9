"""Peak-EWMA load balancing with power of N choices (Finagle, Linkerd, tower's ``PeakEwma``).

Each endpoint keeps one latency estimate (``EndpointState.ewma``, seconds) stamped with the time
of its last sample (``ewma_stamp``). Its cost when choosing is::

    cost = decayed_estimate * (active_requests + 1) / weight
    decayed_estimate = ewma * exp(-(now - ewma_stamp) / decay)

The estimate is a *peak* EWMA: a sample above the (decayed) estimate replaces it at once, so a
slow endpoint is avoided after one slow response; a sample below it pulls it down only as fast
as the decay allows (``w = exp(-dt/decay)``; ``ewma = ewma*w + sample*(1-w)``). While an endpoint
gets no traffic its estimate decays towards zero, so a formerly slow endpoint is probed again
after roughly ``decay * ln(slow/fast)`` seconds and wins its share back once it is fast.

An endpoint that has never answered costs ``default_rtt * (active + 1)``.

Failures are penalised: a 5xx or a local error (connect failure, reset, timeout) counts as a
sample of ``max(latency, penalty)``, so an endpoint that fails fast does not look fast. The
penalty is ``LbConfig.ewma_failure_penalty_s`` or, when that is 0, ``max(1 s, 10 x default_rtt)``.

Picking draws ``choice_count`` distinct endpoints at random and keeps the cheapest (hosts this
request already tried are skipped when another exists). Nothing is mutated by ``pick``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

from sidecar.cluster.balancers.base import LoadBalancer
from sidecar.cluster.endpoint import EndpointState
from sidecar.config.cluster import LbConfig
from sidecar.core.context import HostInfo, PickContext

DEFAULT_PENALTY_FLOOR_S = 1.0
DEFAULT_PENALTY_RTT_FACTOR = 10.0


def default_penalty(cfg: LbConfig) -> float:
    if cfg.ewma_failure_penalty_s > 0:
        return cfg.ewma_failure_penalty_s
    return max(DEFAULT_PENALTY_FLOOR_S, DEFAULT_PENALTY_RTT_FACTOR * cfg.ewma_default_rtt_s)


class PeakEwmaBalancer(LoadBalancer):
    __slots__ = ("decay", "default_rtt", "penalty", "choices", "_weighted")

    def __init__(self, cfg: LbConfig):
        super().__init__(cfg)
        self.decay = max(cfg.ewma_decay_s, 1e-3)
        self.default_rtt = cfg.ewma_default_rtt_s
        self.penalty = default_penalty(cfg)
        self.choices = max(2, cfg.choice_count)
        self._weighted = False

    def rebuild(self, hosts: Sequence[EndpointState]) -> None:
        self.hosts = hosts
        self._weighted = any(h.endpoint.weight != 1 for h in hosts)

    # ---- cost --------------------------------------------------------------------------
    def estimate(self, host: EndpointState, now: float) -> float:
        """The host's latency estimate at ``now`` (seconds), decayed since its last sample."""
        if host.rq_total == 0:
            return self.default_rtt
        dt = now - host.ewma_stamp
        if dt <= 0:
            return host.ewma
        return host.ewma * math.exp(-dt / self.decay)

    def cost(self, host: EndpointState, now: float) -> float:
        c = self.estimate(host, now) * (host.active_requests + 1)
        if self._weighted:
            c /= max(host.endpoint.weight, 1)
        return c

    # ---- pick --------------------------------------------------------------------------
    def pick(self, ctx: PickContext | None,
             exclude: Sequence[HostInfo] = ()) -> EndpointState | None:
        hosts = self.hosts
        n = len(hosts)
        if n == 0:
            return None
        if n == 1:
            return hosts[0]
        now = time.monotonic()
        k = self.choices
        cands: Sequence[EndpointState]
        if k == 2:
            i = random.randrange(n)
            j = random.randrange(n - 1)
            if j >= i:
                j += 1
            cands = (hosts[i], hosts[j])
        elif k >= n:
            cands = hosts
        else:
            cands = random.sample(hosts, k)
        best = None
        best_cost = 0.0
        for h in cands:
            if exclude and h in exclude:
                continue
            c = self.cost(h, now)
            if best is None or c < best_cost:
                best, best_cost = h, c
        if best is None:
            # every candidate was already tried: the cheapest untried host, if any
            for h in hosts:
                if h in exclude:
                    continue
                c = self.cost(h, now)
                if best is None or c < best_cost:
                    best, best_cost = h, c
            if best is None:
                best = cands[0]
        return best

    # ---- learn -------------------------------------------------------------------------
    def record(self, host: EndpointState, status: int | None, latency: float,
               local_error: str | None) -> None:
        rtt = latency if latency > 0 else 0.0
        if local_error is not None or (status is not None and status >= 500):
            if rtt < self.penalty:
                rtt = self.penalty
        now = time.monotonic()
        if host.rq_total <= 1:
            # first sample of this endpoint (ClusterState.record counts it before calling us)
            host.ewma = rtt
            host.ewma_stamp = now
            return
        dt = now - host.ewma_stamp
        w = math.exp(-dt / self.decay) if dt > 0 else 1.0
        decayed = host.ewma * w
        if rtt > decayed:
            host.ewma = rtt                                 # peak: jump up at once
        else:
            host.ewma = decayed + rtt * (1.0 - w)           # Finagle's step: decay, then blend
        host.ewma_stamp = now
