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


class ConnectionWaiters:
    """FIFO of requests pending for a connection slot in one cluster.

    ``wake()`` is called whenever a slot may have freed (a connection released or closed, an
    attempt ended). Each wake resolves the oldest waiter; a waiter that finds nothing usable
    parks again at the front, so order is kept.
    """

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def wake(self) -> None:
        q = self._q
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
            self._q.appendleft(fut)
        else:
            self._q.append(fut)
        timer = loop.call_at(until, _resolve, fut) if until is not None else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            if not fut.done():
                fut.cancel()
            try:
                self._q.remove(fut)
            except ValueError:
                pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BreakerState:
    """The counters every breaker threshold is checked against, for one cluster name.

    ``active_requests`` counts attempts in flight (admitted, not pending); ``pending_requests``
    those waiting for a connection; ``active_retries`` retries admitted and not finished
    (held from the retry decision, through the backoff, to the end of the retried attempt).
    Open connections are counted by the pools themselves.
    """

    __slots__ = ("active_requests", "pending_requests", "active_retries", "overflow", "waiters")

    def __init__(self) -> None:
        self.active_requests = 0
        self.pending_requests = 0
        self.active_retries = 0
        self.overflow = 0                # admissions refused (any threshold), for /clusters
        self.waiters = ConnectionWaiters()

    def admit_request(self, t: Thresholds) -> bool:
        if self.active_requests >= t.max_requests:
            self.overflow += 1
            return False
        self.active_requests += 1
        return True

    def release_request(self) -> None:
        self.active_requests -= 1
        if self.pending_requests:
            self.waiters.wake()       # this attempt's connection may have been freed

    def admit_pending(self, t: Thresholds) -> bool:
        """Turn an admitted request into a pending one (it waits for a connection)."""
        if self.pending_requests >= t.max_pending_requests:
            self.overflow += 1
            return False
        self.pending_requests += 1
        self.active_requests -= 1
        return True

    def end_pending(self) -> None:
        self.pending_requests -= 1
        self.active_requests += 1

    def admit_retry(self, t: Thresholds) -> bool:
        b = t.retry_budget
        if not retry_allowed(self.active_retries, self.active_requests + self.pending_requests,
                             t.max_retries, b.budget_percent if b is not None else None,
                             b.min_retry_concurrency if b is not None else 0):
            self.overflow += 1
            return False
        self.active_retries += 1
        return True

    def release_retry(self) -> None:
        self.active_retries -= 1


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
