"""Token buckets, refilled lazily on the monotonic clock (no background task), and the bucket
state kept across config reloads."""

from __future__ import annotations

import math
from collections import OrderedDict

from filters.local_ratelimit.config import DescriptorConfig, LocalRateLimitConfig, TokenBucketConfig
from sidecar.core.metrics import MetricFactory


class TokenBucket:
    """Holds up to ``max_tokens``, gains ``tokens_per_fill`` every ``fill_interval``."""

    __slots__ = ("cfg", "tokens", "last")

    def __init__(self, cfg: TokenBucketConfig, now: float):
        self.cfg = cfg
        self.tokens = float(cfg.max_tokens)
        self.last = now

    def _refill(self, now: float) -> None:
        c = self.cfg
        elapsed = now - self.last
        if elapsed >= c.fill_interval_s:
            n = int(elapsed // c.fill_interval_s)
            self.tokens = min(float(c.max_tokens), self.tokens + n * c.tokens_per_fill)
            self.last += n * c.fill_interval_s

    def consume(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def remaining(self) -> int:
        return int(self.tokens)

    def reset_after(self, now: float) -> int:
        """Whole seconds until the next fill."""
        return max(0, math.ceil(self.cfg.fill_interval_s - (now - self.last)))


class DescriptorBuckets:
    """The bucket(s) of one descriptor config: one, or one per value (LRU-bounded)."""

    __slots__ = ("cfg", "single", "per_value", "max_keys")

    def __init__(self, cfg: DescriptorConfig, max_keys: int, now: float):
        self.cfg = cfg
        self.single = None if cfg.dynamic else TokenBucket(cfg.bucket, now)
        self.per_value: OrderedDict[tuple[str, ...], TokenBucket] = OrderedDict()
        self.max_keys = max_keys

    def get(self, values: tuple[str, ...], now: float) -> TokenBucket:
        if self.single is not None:
            return self.single
        b = self.per_value.get(values)
        if b is None:
            b = TokenBucket(self.cfg.bucket, now)
            self.per_value[values] = b
            if len(self.per_value) > self.max_keys:
                self.per_value.popitem(last=False)
        else:
            self.per_value.move_to_end(values)
        return b


class LimiterState:
    """The buckets of one filter config (and route, for per-route configs)."""

    __slots__ = ("default", "descriptors")

    def __init__(self, cfg: LocalRateLimitConfig, now: float):
        self.default = TokenBucket(cfg.bucket, now) if cfg.bucket is not None else None
        # slowest rate first, as Envoy consumes them
        descs = sorted(cfg.descriptors, key=lambda d: d.bucket.rate)
        self.descriptors = [DescriptorBuckets(d, cfg.max_dynamic, now) for d in descs]


MAX_STATES = 4096

StateKey = tuple[str, "str | None"]
"""(config fingerprint, route name for a per-route config)."""


class LimiterStates:
    """Token buckets kept across reloads: one set per filter config (and route, for per-route
    configs), so a reload that does not change a limit does not refill its buckets."""

    __slots__ = ("buckets", "metrics")

    def __init__(self, metrics: MetricFactory):
        self.metrics = metrics
        self.buckets: dict[StateKey, LimiterState] = {}

    def get(self, cfg: LocalRateLimitConfig, route: str | None, now: float) -> LimiterState:
        buckets = self.buckets
        key = (cfg.fingerprint, route)
        st = buckets.get(key)
        if st is None:
            st = buckets[key] = LimiterState(cfg, now)
            while len(buckets) > MAX_STATES:
                del buckets[next(iter(buckets))]
        return st
