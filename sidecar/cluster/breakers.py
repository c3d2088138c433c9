"""Circuit breakers (cluster setting, Envoy ``circuit_breakers`` semantics).

Config: per-priority thresholds. Runtime: the counters live on ``ClusterState``
(``active_requests``, ``pending_requests``, ``active_retries``, open connections from the
pools); admission is checked in ``RouterStage.attempt`` / ``_attempt_on`` and answers 503 UO at
once. The only waiting is a request *pending* for a connection at ``max_connections``: it
parks on a ``ConnectionWaiters`` future (no polling) until a connection is released or closed,
bounded by ``max_pending_requests`` and the request's deadline.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, slots=True)
class RetryBudget:
    budget_percent: float = 20.0      # share of active requests that may be retries
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    retry_budget: Optional[RetryBudget] = None


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    default: Thresholds = Thresholds()
    high: Thresholds = Thresholds()


_KEYS = ("max_connections", "max_pending_requests", "max_requests", "max_retries", "retry_budget")


def _thresholds(d: dict, path: str, envoy: bool) -> Thresholds:
    from sidecar.config import wire as w
    w.check_keys(d, (*_KEYS, "priority", "track_remaining") if envoy else _KEYS, path)
    budget = None
    if d.get("retry_budget") is not None:
        bp = w.join(path, "retry_budget")
        b = w.check_keys(d["retry_budget"], ("budget_percent", "min_retry_concurrency"), bp)
        budget = RetryBudget(budget_percent=w.number(b, "budget_percent", bp, 20.0, lo=0, hi=100),
                             min_retry_concurrency=w.integer(b, "min_retry_concurrency", bp, 3, lo=0))
    # track_remaining: the remaining capacity is always visible (StateCollector), so the
    # Envoy switch is accepted and has nothing to turn on
    return Thresholds(
        max_connections=w.integer(d, "max_connections", path, 1024, lo=1),
        max_pending_requests=w.integer(d, "max_pending_requests", path, 1024, lo=0),
        max_requests=w.integer(d, "max_requests", path, 1024, lo=1),
        max_retries=w.integer(d, "max_retries", path, 3, lo=0),
        retry_budget=budget,
    )


def circuit_breakers_from_envoy(d: dict, path: str) -> CircuitBreakers:
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    w.check_keys(d, ("thresholds",), path)
    default = high = Thresholds()
    seen = set()
    for i, t in enumerate(w.seq(d, "thresholds", path, [])):
        tp = w.join(w.join(path, "thresholds"), i)
        prio = w.string(t, "priority", tp, "DEFAULT", choices=("DEFAULT", "HIGH"))
        if prio in seen:
            raise ConfigError(w.join(tp, "priority"), f"{prio} thresholds are given twice")
        seen.add(prio)
        if prio == "HIGH":
            high = _thresholds(t, tp, True)
        else:
            default = _thresholds(t, tp, True)
    return CircuitBreakers(default=default, high=high)


def circuit_breakers_from_native(d: dict, path: str) -> CircuitBreakers:
    """Native: the DEFAULT-priority thresholds written flat."""
    return CircuitBreakers(default=_thresholds(d, path, False))


# ---- runtime: requests pending for a connection ----------------------------------------------

class ConnectionWaiters:
    """FIFO of requests pending for a connection slot in one cluster.

    ``wake()`` is called whenever a slot may have freed: an attempt ended (its connection went
    back to the pool or closed) or, when the pool offers the hook, a connection was released
    or closed. Each wake resolves the oldest waiter; a waiter that finds nothing usable parks
    again at the front, so order is kept.
    """

    __slots__ = ("_q", "hooked")

    def __init__(self):
        self._q: deque[asyncio.Future] = deque()
        self.hooked = weakref.WeakSet()   # pools whose release hook points here

    def __len__(self) -> int:
        return len(self._q)

    def wake(self) -> None:
        q = self._q
        while q:
            f = q.popleft()
            if not f.done():
                f.set_result(None)
                return

    async def wait(self, loop, until: Optional[float], front: bool = False) -> None:
        """Park until woken or until loop time ``until`` (None: no bound)."""
        fut = loop.create_future()
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


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def connection_waiters(cs) -> ConnectionWaiters:
    """The waiter queue of a ClusterState (made on first use: only saturated clusters need one)."""
    w = cs.__dict__.get("conn_waiters")
    if w is None:
        w = cs.conn_waiters = ConnectionWaiters()
    return w


def hook_pools(cs, waiters: ConnectionWaiters) -> None:
    """Point every pool's release/close hook (``ConnectionPool.on_free``) at ``waiters``."""
    hooked = waiters.hooked
    for h in cs.hosts:
        p = h.pool
        if p not in hooked:
            p.on_free = waiters.wake
            hooked.add(p)


def close_idle_elsewhere(cs, pool) -> bool:
    """At max_connections, an idle pooled connection to another host is capacity doing
    nothing: close the oldest one so this request can open its own. True if one was closed."""
    for h in cs.hosts:
        p = h.pool
        if p is not pool and p.idle:
            p.idle.popleft().close()
            return True
    return False


_CX_OVERFLOW: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cx_overflow_counter(metrics, cluster: str):
    """``sidecar_upstream_cx_overflow_total{cluster}``: times a request found the cluster at
    max_connections (it then waits as pending, or overflows). Bound once per cluster."""
    per = _CX_OVERFLOW.get(metrics)
    if per is None:
        per = _CX_OVERFLOW[metrics] = {}
    c = per.get(cluster)
    if c is None:
        if not metrics.enabled:
            from sidecar.observability.stats import NULL
            c = NULL
        else:
            c = metrics.counter("sidecar_upstream_cx_overflow_total",
                                "Times a cluster's max_connections breaker was reached",
                                ("cluster",)).labels(cluster)
        per[cluster] = c
    return c
