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


class ReplayVerdict(enum.Enum):
    FRESH = "fresh"          # first use: recorded until its expiry
    REPLAYED = "replayed"    # seen before and not yet expired: refuse
    FULL = "full"            # no room without forgetting a live jti: refuse (fail closed)
    UNAVAILABLE = "store_unavailable"   # the cross-replica store could not answer: refuse


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
    """What the single health/outlier writer published for one endpoint."""
    healthy: bool = True          # active health checking verdict
    ejected_until: float = 0.0    # outlier ejection end, time.monotonic() seconds (0: none)
    ejections: int = 0            # times ejected so far (Envoy's ejection multiplier input)
    epoch: int = 0                # bumped on every publication for this endpoint

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """Envoy token bucket: holds up to max_tokens, gains tokens_per_fill every fill_interval."""
    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: float


@dataclass(frozen=True, slots=True)
class BucketDecision:
    allowed: bool
    remaining: int          # whole tokens left after this request
    reset_s: int            # whole seconds until the next fill (x-ratelimit-reset)


# ---- the interfaces ----------------------------------------------------------------------------

class BreakerCounters(Protocol):
    """A cluster's breaker gauges. ``try_acquire`` admits and counts in one step (or refuses
    and counts nothing); every admitted unit is given back with ``release``."""

    def try_acquire(self, priority: Priority, resource: Resource, limit: int) -> bool: ...
    def try_acquire_retry(self, priority: Priority, max_retries: int,
                          budget_percent: float | None, min_retry_concurrency: int) -> bool: ...
    def release(self, priority: Priority, resource: Resource) -> None: ...
    def snapshot(self, priority: Priority) -> BreakerSnapshot: ...
    def close(self) -> None: ...


class EndpointCounters(Protocol):
    """One endpoint of one cluster: in-flight requests (least-request, peak-EWMA), attempt
    outcomes (outlier detection) and the published health/ejection state."""

    def begin(self) -> None: ...
    def end(self) -> None: ...
    def active(self) -> int: ...
    def record(self, outcome: Outcome) -> None: ...
    def streak(self, which: Streak) -> int: ...
    def totals(self) -> OutcomeTotals: ...
    def health(self) -> EndpointHealth: ...
    def close(self) -> None: ...


class HealthWriter(Protocol):
    """The one writer of health and ejection state (the prober / outlier detector)."""

    def publish(self, cluster: str, address: str, health: EndpointHealth) -> bool: ...
    def epoch(self) -> int: ...


class TokenBuckets(Protocol):
    """Token buckets keyed by ``scope`` (one filter config) and ``descriptor`` (its entries,
    () for the default bucket). ``pinned`` buckets (the config's own) are never evicted;
    dynamic ones (one per header value, client address...) may be, as documented."""

    def consume(self, scope: str, descriptor: tuple[tuple[str, str], ...], spec: BucketSpec,
                now: float, pinned: bool = True) -> BucketDecision: ...
    def release(self, scope: str) -> None: ...


class ReplayCache(Protocol):
    """jti values seen until their expiry; insert-if-absent is one atomic step."""

    def check_and_add(self, namespace: str, jti: str, until: float, now: float) -> ReplayVerdict: ...


class SharedState(Protocol):
    """Hands out the primitives above; one per worker process (or per process, locally)."""

    def breaker(self, cluster: str) -> BreakerCounters: ...
    def endpoint(self, cluster: str, address: str) -> EndpointCounters: ...
    def forget(self, cluster: str, address: str | None = None) -> None: ...
    def buckets(self) -> TokenBuckets: ...
    def replay(self) -> ReplayCache: ...
    def health_writer(self) -> HealthWriter: ...
    def health_epoch(self) -> int: ...


def retry_limit(active: int, max_retries: int, budget_percent: float | None,
                min_retry_concurrency: int) -> int:
    """Envoy: with a retry budget, ``max(min_retry_concurrency, budget_percent% of active
    requests + pending)``; without one, ``max_retries``."""
    if budget_percent is None:
        return max_retries
    share = int(active * budget_percent / 100.0)
    return share if share > min_retry_concurrency else min_retry_concurrency


def refill(tokens: float, last: float, spec: BucketSpec, now: float) -> tuple[float, float]:
    """Whole fills since ``last`` (Envoy refills in steps, not continuously)."""
    interval = spec.fill_interval_s
    elapsed = now - last
    if elapsed >= interval:
        n = int(elapsed // interval)
        tokens = min(float(spec.max_tokens), tokens + n * spec.tokens_per_fill)
        last += n * interval
    elif elapsed < 0:            # a torn or future stamp (see segment.py): start over from now
        last = now
    return tokens, last


def reset_after(last: float, spec: BucketSpec, now: float) -> int:
    left = spec.fill_interval_s - (now - last)
    return max(0, int(-(-left // 1)))      # ceil without importing math on the hot path
