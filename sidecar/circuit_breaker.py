"""Circuit-breaker thresholds (cluster setting, Envoy ``circuit_breakers`` semantics)."""

from __future__ import annotations

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


def _thresholds(d: dict, path: str) -> Thresholds:
    from sidecar import wire as w
    w.check_keys(d, ("priority", "max_connections", "max_pending_requests", "max_requests",
                     "max_retries", "retry_budget", "track_remaining"), path)
    budget = None
    if d.get("retry_budget") is not None:
        b = w.check_keys(d["retry_budget"], ("budget_percent", "min_retry_concurrency"),
                         w.join(path, "retry_budget"))
        bp = w.join(path, "retry_budget")
        budget = RetryBudget(budget_percent=w.number(b, "budget_percent", bp, 20.0, lo=0, hi=100),
                             min_retry_concurrency=w.integer(b, "min_retry_concurrency", bp, 3, lo=0))
    return Thresholds(
        max_connections=w.integer(d, "max_connections", path, 1024, lo=1),
        max_pending_requests=w.integer(d, "max_pending_requests", path, 1024, lo=1),
        max_requests=w.integer(d, "max_requests", path, 1024, lo=1),
        max_retries=w.integer(d, "max_retries", path, 3, lo=0),
        retry_budget=budget,
    )


def circuit_breakers_from_envoy(d: dict, path: str) -> CircuitBreakers:
    from sidecar import wire as w
    w.check_keys(d, ("thresholds",), path)
    default = high = Thresholds()
    for i, t in enumerate(w.seq(d, "thresholds", path, [])):
        tp = w.join(w.join(path, "thresholds"), i)
        prio = w.string(t, "priority", tp, "DEFAULT", choices=("DEFAULT", "HIGH"))
        if prio == "HIGH":
            high = _thresholds(t, tp)
        else:
            default = _thresholds(t, tp)
    return CircuitBreakers(default=default, high=high)


def circuit_breakers_from_native(d: dict, path: str) -> CircuitBreakers:
    """Native: the DEFAULT-priority thresholds written flat."""
    return CircuitBreakers(default=_thresholds(d, path))
