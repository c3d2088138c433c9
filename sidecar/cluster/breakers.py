"""Circuit breakers at run time, Envoy ``circuit_breakers`` semantics.

One ``BreakerState`` per cluster name, kept across config swaps (a request admitted under the
old config releases its slot into the same counters). Admission answers at once: over
``max_requests`` (or ``max_pending_requests`` while waiting) is 503 UO with
``x-envoy-overloaded``. The only waiting is a request *pending* for a connection at
``max_connections``: it parks on a future (no polling) woken when a connection is released or
closed, bounded by ``max_pending_requests`` and the request's deadline.
"""

from __future__ import annotations

import asyncio
from collections import deque

from sidecar.config.cluster import Thresholds
from sidecar.shared.api import (
    BreakerCounters,
    BreakerSnapshot,
    Priority,
    Resource,
)

_D = Priority.DEFAULT            # routes here use the default priority (HIGH is refused)
_NO_LIMIT = 1 << 62
PENDING_POLL_S = 0.05


class ConnectionWaiters:
    """FIFO of requests pending for a connection slot in one cluster.

    ``wake()`` is called whenever a slot may have freed (a connection released or closed, an
    attempt ended). Each wake resolves the oldest waiter; a waiter that finds nothing usable
    parks again at the front, so order is kept.
    """

    __slots__ = ("queue",)

    def __init__(self) -> None:
        # public so the per-request path can test ``if waiters.queue`` without a call
        self.queue: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self.queue)

    def wake(self) -> None:
        q = self.queue
        while q:
            f = q.popleft()
            if not f.done():
                f.set_result(None)
                return

    async def wait(self, loop: asyncio.AbstractEventLoop, until: float | None,
                   front: bool = False) -> None:
        """Park until woken or until loop time ``until`` (None: no bound)."""
        fut: asyncio.Future[None] = loop.create_future()
        if front:
            self.queue.appendleft(fut)
        else:
            self.queue.append(fut)
        timer = loop.call_at(until, _resolve, fut) if until is not None else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            if not fut.done():
                fut.cancel()
            try:
                self.queue.remove(fut)
            except ValueError:
                pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BreakerState:
    """The counters every breaker threshold is checked against, for one cluster name. They
    live in ``sidecar.shared`` (``BreakerCounters``): with several workers every threshold is
    the sidecar's, not the worker's (announce-then-check admission; at most N-1 over a limit
    in a race of N workers, see ``sidecar/shared/counters.py``).

    ``active_requests`` counts attempts in flight (admitted, not pending); ``pending_requests``
    those waiting for a connection; ``active_retries`` retries admitted and not finished
    (held from the retry decision, through the backoff, to the end of the retried attempt).
    Open connections are counted by each worker's pools and published as its share.
    """

    __slots__ = ("counters", "overflow", "waiters", "poll_s", "admit", "release")

    def __init__(self, counters: BreakerCounters, workers: int = 1) -> None:
        self.counters = counters
        self.overflow = 0                # admissions refused (any threshold), this worker
        self.waiters = ConnectionWaiters()
        # one attempt's request slot and its endpoint's in-flight count, one call each way
        # (the caller counts a refusal in ``overflow`` and wakes ``waiters`` after a release)
        self.admit = counters.admit_request
        self.release = counters.release_request
        # another worker freeing a connection cannot wake this one's waiters: with several
        # workers a pending request also looks again every poll_s (overload only)
        self.poll_s = PENDING_POLL_S if workers > 1 else None

    @property
    def active_requests(self) -> int:
        return self.counters.total(_D, Resource.REQUESTS)

    @property
    def pending_requests(self) -> int:
        return self.counters.total(_D, Resource.PENDING)

    @property
    def active_retries(self) -> int:
        return self.counters.total(_D, Resource.RETRIES)

    def own(self) -> BreakerSnapshot:
        """This worker's share of each gauge (per-worker metrics add up to the sidecar's)."""
        return self.counters.own(_D)

    def admit_pending(self, t: Thresholds) -> bool:
        """Turn an admitted request into a pending one (it waits for a connection)."""
        c = self.counters
        if not c.try_acquire(_D, Resource.PENDING, t.max_pending_requests):
            self.overflow += 1
            return False
        c.release(_D, Resource.REQUESTS)
        return True

    def end_pending(self) -> None:
        c = self.counters
        c.release(_D, Resource.PENDING)
        c.try_acquire(_D, Resource.REQUESTS, _NO_LIMIT)     # admitted already: back to active

    def admit_retry(self, t: Thresholds) -> bool:
        b = t.retry_budget
        if not self.counters.try_acquire_retry(_D, t.max_retries,
                                               b.budget_percent if b is not None else None,
                                               b.min_retry_concurrency if b is not None else 0):
            self.overflow += 1
            return False
        return True

    def release_retry(self) -> None:
        self.counters.release(_D, Resource.RETRIES)

    def open_connections(self, local: int) -> int:
        """Publish this worker's open connections; the sidecar's total."""
        c = self.counters
        c.publish(_D, Resource.CONNECTIONS, local)
        return c.total(_D, Resource.CONNECTIONS)


def retry_limit(active_requests: int, max_retries: int, budget_percent: float | None,
                min_retry_concurrency: int) -> int:
    """How many retries may be outstanding at once in a cluster.

    Envoy: with a retry budget, ``max(min_retry_concurrency, budget_percent% of active
    requests)`` (active includes pending); without one, the ``max_retries`` threshold."""
    if budget_percent is not None:
        share = int(active_requests * budget_percent / 100.0)
        return share if share > min_retry_concurrency else min_retry_concurrency
    return max_retries


def retry_allowed(active_retries: int, active_requests: int, max_retries: int,
                  budget_percent: float | None, min_retry_concurrency: int) -> bool:
    """May one more retry start now (``active_retries`` are already outstanding)?"""
    return active_retries < retry_limit(active_requests, max_retries, budget_percent,
                                        min_retry_concurrency)
