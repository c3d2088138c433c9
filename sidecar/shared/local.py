"""Single-process shared state: the default for one worker and for tests.

Same interfaces and the same semantics as the shared-memory ``segment`` implementation, with
plain Python objects: every count is exact (one event loop, no await inside an operation).
Bounds are the same too (a bucket table of ``bucket_rows``, a replay cache of
``replay_entries``), so a config behaves alike with one worker or many.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from sidecar.config.stores import DEFAULT_SHARED_STATE, SharedStateConfig
from sidecar.shared.api import (
    BreakerSnapshot,
    BucketDecision,
    BucketSpec,
    EndpointCounters,
    EndpointHealth,
    Outcome,
    OutcomeTotals,
    Priority,
    ReplayVerdict,
    Resource,
    Streak,
    refill,
    reset_after,
    retry_limit,
)

_REQUESTS = int(Resource.REQUESTS)     # a plain int indexes a list without the enum's lookups


class LocalBreaker:
    __slots__ = ("_counts", "_default")

    def __init__(self) -> None:
        self._counts = [[0, 0, 0, 0], [0, 0, 0, 0]]      # [priority][resource]
        self._default = self._counts[Priority.DEFAULT]

    # ``BreakerCounters``' per-attempt pair, written out: LocalState hands out its breakers and
    # endpoints together, so the endpoint is always a LocalEndpoint
    def admit_request(self, limit: int, endpoint: EndpointCounters) -> bool:
        c = self._default
        if c[_REQUESTS] >= limit:
            return False
        c[_REQUESTS] += 1
        endpoint._active += 1          # type: ignore[attr-defined]
        return True

    def release_request(self, endpoint: EndpointCounters) -> None:
        c = self._default
        if c[_REQUESTS] > 0:
            c[_REQUESTS] -= 1
        if endpoint._active > 0:       # type: ignore[attr-defined]
            endpoint._active -= 1      # type: ignore[attr-defined]

    def try_acquire(self, priority: Priority, resource: Resource, limit: int) -> bool:
        c = self._counts[priority]
        if c[resource] >= limit:
            return False
        c[resource] += 1
        return True

    def try_acquire_retry(self, priority: Priority, max_retries: int,
                          budget_percent: float | None, min_retry_concurrency: int) -> bool:
        c = self._counts[priority]
        limit = retry_limit(c[Resource.REQUESTS] + c[Resource.PENDING], max_retries,
                            budget_percent, min_retry_concurrency)
        return self.try_acquire(priority, Resource.RETRIES, limit)

    def release(self, priority: Priority, resource: Resource) -> None:
        c = self._counts[priority]
        if c[resource] > 0:
            c[resource] -= 1

    def total(self, priority: Priority, resource: Resource) -> int:
        return self._counts[priority][resource]

    def publish(self, priority: Priority, resource: Resource, value: int) -> None:
        self._counts[priority][resource] = value

    def snapshot(self, priority: Priority) -> BreakerSnapshot:
        return BreakerSnapshot(*self._counts[priority])

    def own(self, priority: Priority) -> BreakerSnapshot:
        return BreakerSnapshot(*self._counts[priority])

    def close(self) -> None:
        pass


class LocalEndpoint:
    __slots__ = ("_active", "_counts", "_streaks", "_starts", "_health", "_state")

    def __init__(self, state: "LocalState") -> None:
        self._active = 0
        self._counts = [0, 0, 0, 0, 0]      # total, success, 5xx, gateway, local_origin
        self._streaks = [0, 0, 0]
        self._starts = [0, 0, 0]            # a streak's identity: bumped when it starts over
        self._health = EndpointHealth()
        self._state = state

    def begin(self) -> None:
        self._active += 1

    def end(self) -> None:
        if self._active > 0:
            self._active -= 1

    def active(self) -> int:
        return self._active

    def own_active(self) -> int:
        return self._active

    def _restart(self, which: Streak) -> None:
        if self._streaks[which]:
            self._streaks[which] = 0
            self._starts[which] += 1

    def record(self, outcome: Outcome) -> None:
        c, s = self._counts, self._streaks
        c[0] += 1
        if outcome is Outcome.SUCCESS:
            c[1] += 1
            for k in Streak:
                self._restart(k)
        elif outcome is Outcome.LOCAL_ORIGIN:
            c[4] += 1
            s[Streak.CONSECUTIVE_LOCAL_ORIGIN] += 1
        else:
            c[2] += 1
            s[Streak.CONSECUTIVE_5XX] += 1
            if outcome is Outcome.GATEWAY:
                c[3] += 1
                s[Streak.CONSECUTIVE_GATEWAY] += 1
            else:
                self._restart(Streak.CONSECUTIVE_GATEWAY)
            self._restart(Streak.CONSECUTIVE_LOCAL_ORIGIN)   # a response came: reachable

    def streak(self, which: Streak) -> tuple[int, int]:
        return self._streaks[which], self._starts[which]

    def reset_streaks(self) -> None:
        for k in Streak:
            self._restart(k)

    def totals(self) -> OutcomeTotals:
        return OutcomeTotals(*self._counts)

    def health(self) -> EndpointHealth:
        return self._health

    def _publish(self, healthy: bool, ejected_until: float, ejections: int,
                 multiplier: int) -> None:
        self._health = EndpointHealth(healthy, ejected_until, ejections, multiplier,
                                      self._health.epoch + 1)
        self._state.epoch += 1

    def set_healthy(self, healthy: bool) -> None:
        h = self._health
        if h.healthy != healthy:
            self._publish(healthy, h.ejected_until, h.ejections, h.multiplier)

    def eject(self, now: float, base_s: float, max_s: float) -> EndpointHealth | None:
        h = self._health
        if h.ejected_until > now:
            return None
        m = h.multiplier + 1
        self._publish(h.healthy, now + min(base_s * m, max(base_s, max_s)), h.ejections + 1, m)
        return self._health

    def uneject(self) -> None:
        h = self._health
        if h.ejected_until:
            self._publish(h.healthy, 0.0, h.ejections, h.multiplier)

    def decay_multiplier(self) -> None:
        h = self._health
        if h.multiplier > 0:
            self._publish(h.healthy, h.ejected_until, h.ejections, h.multiplier - 1)

    def close(self) -> None:
        pass


class LocalBuckets:
    """Buckets by (scope, descriptor); at most ``rows`` of them. When full, a bucket that is
    back to max_tokens is dropped first (a new one starts full: nothing is lost), else the
    least recently used unpinned one (that one's debt is forgotten: counted in
    ``lossy_evictions``); pinned buckets are never dropped (``untracked`` counts the requests
    that found no room, and they are let through, as Envoy does when it cannot track)."""

    __slots__ = ("rows", "_b", "lossy_evictions", "untracked")

    def __init__(self, rows: int) -> None:
        self.rows = rows
        # key -> [tokens, last, spec, pinned]; order = least recently used first
        self._b: OrderedDict[tuple, list] = OrderedDict()
        self.lossy_evictions = 0
        self.untracked = 0

    def consume(self, scope: str, descriptor: tuple[tuple[str, str], ...], spec: BucketSpec,
                now: float, pinned: bool = True) -> BucketDecision:
        key = (scope, descriptor)
        b = self._b.get(key)
        if b is None or b[2] != spec:
            if b is None and len(self._b) >= self.rows and not self._evict(now):
                self.untracked += 1
                return BucketDecision(True, spec.max_tokens, reset_after(now, spec, now))
            b = self._b[key] = [float(spec.max_tokens), now, spec, pinned]
        else:
            self._b.move_to_end(key)
            b[3] = b[3] or pinned
        tokens, last = refill(b[0], b[1], spec, now)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        b[0], b[1] = tokens, last
        return BucketDecision(allowed, int(tokens), reset_after(last, spec, now))

    def release(self, scope: str) -> None:
        """The config ``scope`` is gone: its buckets become evictable (kept until needed)."""
        for key, b in self._b.items():
            if key[0] == scope:
                b[3] = False

    def _evict(self, now: float) -> bool:
        victim = None
        for key, (tokens, last, spec, pinned) in self._b.items():
            if pinned:
                continue
            if refill(tokens, last, spec, now)[0] >= spec.max_tokens:
                victim = key
                break
            if victim is None:
                victim = key           # the least recently used unpinned bucket
        if victim is None:
            return False
        tokens, last, spec, _ = self._b[victim]
        if refill(tokens, last, spec, now)[0] < spec.max_tokens:
            self.lossy_evictions += 1
        del self._b[victim]
        return True


class LocalReplay:
    """Seen jti values until their expiry, at most ``entries`` live ones; full means refuse."""

    __slots__ = ("entries", "_seen", "_heap")

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._seen: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, str, str]] = []

    def check_and_add(self, namespace: str, jti: str, until: float, now: float) -> ReplayVerdict:
        h, seen = self._heap, self._seen
        while h and h[0][0] < now:
            t, ns, j = heapq.heappop(h)
            if seen.get((ns, j)) == t:
                del seen[(ns, j)]
        key = (namespace, jti)
        seen_until = seen.get(key)
        if seen_until is not None and seen_until >= now:
            return ReplayVerdict.REPLAYED
        if len(seen) >= self.entries:
            return ReplayVerdict.FULL
        seen[key] = until
        heapq.heappush(h, (until, namespace, jti))
        return ReplayVerdict.FRESH


class LocalState:
    """``SharedState`` for one process. Handles are kept by name, so a config update that
    keeps a cluster or an endpoint finds its counts again."""

    def __init__(self, config: SharedStateConfig = DEFAULT_SHARED_STATE) -> None:
        self.config = config
        self._breakers: dict[str, LocalBreaker] = {}
        self._endpoints: dict[tuple[str, str], LocalEndpoint] = {}
        self._buckets = LocalBuckets(config.bucket_rows)
        self._replay = LocalReplay(config.replay_entries)
        self.epoch = 0

    def breaker(self, cluster: str) -> LocalBreaker:
        b = self._breakers.get(cluster)
        if b is None:
            b = self._breakers[cluster] = LocalBreaker()
        return b

    def endpoint(self, cluster: str, address: str) -> LocalEndpoint:
        e = self._endpoints.get((cluster, address))
        if e is None:
            e = self._endpoints[(cluster, address)] = LocalEndpoint(self)
        return e

    def forget(self, cluster: str, address: str | None = None) -> None:
        """Drop a removed cluster (or one endpoint of it); the shared table reuses rows the
        same way once every worker has closed its handle."""
        if address is None:
            self._breakers.pop(cluster, None)
            for k in [k for k in self._endpoints if k[0] == cluster]:
                del self._endpoints[k]
        else:
            self._endpoints.pop((cluster, address), None)

    def buckets(self) -> LocalBuckets:
        return self._buckets

    def replay(self) -> LocalReplay:
        return self._replay

    def health_epoch(self) -> int:
        return self.epoch

    @property
    def workers(self) -> int:
        return 1
