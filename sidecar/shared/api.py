"""The typed interfaces of shared state: what breakers, balancers, rate limits, the JWT filter
and the health checker call. Two implementations stand behind each: ``local`` (one process,
the default) and ``segment`` (every worker process of one sidecar, through shared memory).

All methods here are synchronous and never block on I/O: they run on the request path. The
cross-replica stores (Redis, the rate limit service) are async and have their own types in
``redis_store`` and ``rls``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from sidecar.core.limits import (
    BucketDecision,
    BucketSpec,
    ReplayCache,
    ReplayVerdict,
    TokenBuckets,
    refill,
    reset_after,
)

__all__ = ["BreakerCounters", "BreakerSnapshot", "BucketDecision", "BucketSpec", "EndpointCounters",
           "EndpointHealth", "Outcome", "OutcomeTotals", "Priority", "ReplayCache",
           "ReplayVerdict", "Resource", "SharedState", "Streak", "TokenBuckets", "refill",
           "reset_after", "retry_limit"]


class Priority(enum.IntEnum):
    """Envoy's routing priority: each has its own breaker thresholds and counters."""
    DEFAULT = 0
    HIGH = 1


class Resource(enum.IntEnum):
    """The four circuit-breaker gauges of a cluster (Envoy's ResourceManager)."""
    REQUESTS = 0        # max_requests
    PENDING = 1         # max_pending_requests
    RETRIES = 2         # max_retries / retry_budget
    CONNECTIONS = 3     # max_connections


class Outcome(enum.IntEnum):
    """What one attempt to an endpoint ended with, as outlier detection classifies it."""
    SUCCESS = 0          # not a 5xx, no local error
    ERROR_5XX = 1        # a 5xx other than a gateway error
    GATEWAY = 2          # 502, 503, 504 (also counts as 5xx)
    LOCAL_ORIGIN = 3     # connect failure, reset, timeout: no response came


class Streak(enum.IntEnum):
    """Consecutive-failure streaks an outlier detector reads (Envoy's consecutive_*)."""
    CONSECUTIVE_5XX = 0
    CONSECUTIVE_GATEWAY = 1
    CONSECUTIVE_LOCAL_ORIGIN = 2


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """One priority's gauges, summed over every worker."""
    requests: int
    pending: int
    retries: int
    connections: int


@dataclass(frozen=True, slots=True)
class OutcomeTotals:
    """Monotonic outcome counters of one endpoint, summed over every worker (success-rate
    outlier detection diffs two readings)."""
    total: int
    success: int
    errors_5xx: int        # includes gateway errors
    gateway: int
    local_origin: int


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """What the health board holds for one endpoint (written by the prober and by whichever
    worker ejects; see ``EndpointCounters``)."""
    healthy: bool = True          # active health checking verdict
    ejected_until: float = 0.0    # outlier ejection end, time.monotonic() seconds (0: none)
    ejections: int = 0            # times ejected so far
    multiplier: int = 0           # ejections in a row (Envoy's ejection time multiplier)
    epoch: int = 0                # bumped on every publication for this endpoint

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now


# ---- the interfaces ----------------------------------------------------------------------------

class BreakerCounters(Protocol):
    """A cluster's breaker gauges. ``try_acquire`` admits and counts in one step (or refuses
    and counts nothing); every admitted unit is given back with ``release``."""

    def try_acquire(self, priority: Priority, resource: Resource, limit: int) -> bool: ...
    def try_acquire_retry(self, priority: Priority, max_retries: int,
                          budget_percent: float | None, min_retry_concurrency: int) -> bool: ...
    def release(self, priority: Priority, resource: Resource) -> None: ...
    # every attempt's pair, one call each way: the DEFAULT priority's request slot (limit
    # ``max_requests``) together with the endpoint's in-flight count
    def admit_request(self, limit: int, endpoint: EndpointCounters) -> bool:
        """``try_acquire(DEFAULT, REQUESTS, limit)``, then ``endpoint.begin()`` if admitted."""
        ...
    def release_request(self, endpoint: EndpointCounters) -> None:
        """``endpoint.end()`` and ``release(DEFAULT, REQUESTS)``."""
        ...
    def total(self, priority: Priority, resource: Resource) -> int:
        """One gauge, summed over every worker."""
        ...
    def publish(self, priority: Priority, resource: Resource, value: int) -> None:
        """Set this worker's share of a gauge it counts itself (open connections)."""
        ...
    def snapshot(self, priority: Priority) -> BreakerSnapshot: ...
    def own(self, priority: Priority) -> BreakerSnapshot:
        """This worker's share (per-worker metrics add up to the sidecar's)."""
        ...
    def close(self) -> None: ...


class EndpointCounters(Protocol):
    """One endpoint of one cluster: in-flight requests (least-request, peak-EWMA), attempt
    outcomes (outlier detection) and the published health/ejection state."""

    def begin(self) -> None: ...
    def end(self) -> None: ...
    def active(self) -> int: ...
    def own_active(self) -> int:
        """This worker's share of ``active`` (per-worker metrics add up to the sidecar's)."""
        ...
    def record(self, outcome: Outcome) -> None: ...
    def streak(self, which: Streak) -> tuple[int, int]:
        """(length, start): failures of this kind since the latest success anywhere, and an
        identity of the streak (the same while no success or reset intervenes)."""
        ...
    def reset_streaks(self) -> None:
        """Start every streak over (after an ejection), sidecar-wide."""
        ...
    def totals(self) -> OutcomeTotals: ...
    def health(self) -> EndpointHealth: ...
    # the health board: any worker may write (serialized; each write bumps the epochs)
    def set_healthy(self, healthy: bool) -> None: ...
    def eject(self, now: float, base_s: float, max_s: float) -> EndpointHealth | None:
        """Eject for ``base_s x multiplier`` (capped at ``max(base_s, max_s)``); None when
        the endpoint is already ejected (another worker got there first)."""
        ...
    def uneject(self) -> None: ...
    def decay_multiplier(self) -> None:
        """One interval without ejection: the multiplier goes down by one (Envoy)."""
        ...
    def close(self) -> None: ...


class SharedState(Protocol):
    """Hands out the primitives above; one per worker process (or per process, locally)."""

    def breaker(self, cluster: str) -> BreakerCounters: ...
    def endpoint(self, cluster: str, address: str) -> EndpointCounters: ...
    def forget(self, cluster: str, address: str | None = None) -> None: ...
    def buckets(self) -> TokenBuckets: ...
    def replay(self) -> ReplayCache: ...
    def health_epoch(self) -> int:
        """Bumped on every health-board write: a worker that sees it change re-reads the
        verdicts of its endpoints."""
        ...
    @property
    def workers(self) -> int: ...


def retry_limit(active: int, max_retries: int, budget_percent: float | None,
                min_retry_concurrency: int) -> int:
    """Envoy: with a retry budget, ``max(min_retry_concurrency, budget_percent% of active
    requests + pending)``; without one, ``max_retries``."""
    if budget_percent is None:
        return max_retries
    share = int(active * budget_percent / 100.0)
    return share if share > min_retry_concurrency else min_retry_concurrency


