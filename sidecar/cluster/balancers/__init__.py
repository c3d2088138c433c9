"""Load-balancing policies: one module each, and this registry (policy name -> class).

Adding a policy is one module, one line here and one test file.
"""

from __future__ import annotations

from sidecar.cluster.balancers.base import LoadBalancer
from sidecar.cluster.balancers.least_request import LeastRequest
from sidecar.cluster.balancers.peak_ewma import PeakEwmaBalancer
from sidecar.cluster.balancers.random_pick import Random
from sidecar.cluster.balancers.ring_hash import RingHashBalancer
from sidecar.cluster.balancers.round_robin import RoundRobin
from sidecar.config.cluster import LbConfig

BALANCERS: dict[str, type[LoadBalancer]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "least_request": LeastRequest,
    "peak_ewma": PeakEwmaBalancer,
    "ring_hash": RingHashBalancer,
    "maglev": RingHashBalancer,      # served by the same consistent-hash ring
}


def make_balancer(cfg: LbConfig) -> LoadBalancer:
    return BALANCERS[cfg.policy](cfg)
