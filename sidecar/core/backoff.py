"""Exponential backoff, one formula for every retrying part (route retries, xDS reconnects).

The n-th wait is drawn below ``ceiling(n) = min(cap, base * 2**n)``: with *full* jitter
(uniform in [0, ceiling), Envoy's route retries) or *equal* jitter (uniform in
[ceiling/2, ceiling), for reconnect loops that must not hammer a control plane).
"""

from __future__ import annotations

import random


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """The upper bound of the jittered delay before retry number ``attempt + 1``."""
    if attempt < 0:
        attempt = 0
    ceiling = base * (2 ** min(attempt, 30))
    return cap if ceiling > cap else ceiling


def backoff_delay(attempt: int, base: float, cap: float, rand: float) -> float:
    """Full jitter: uniform in [0, ceiling); ``rand`` is uniform in [0, 1)."""
    return backoff_ceiling(attempt, base, cap) * rand


class Backoff:
    """A reconnect loop's backoff with equal jitter; ``reset()`` after a success."""

    __slots__ = ("base", "max", "attempt")

    def __init__(self, base: float, maximum: float):
        self.base = base
        self.max = maximum
        self.attempt = 0

    def next(self) -> float:
        d = backoff_ceiling(self.attempt, self.base, self.max)
        self.attempt += 1
        return d / 2 + random.random() * d / 2

    def reset(self) -> None:
        self.attempt = 0
