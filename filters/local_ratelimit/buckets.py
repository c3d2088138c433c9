"""The token buckets of a local rate limit, kept by the sidecar: every worker consumes from the
same bucket (``FilterEnv.token_buckets``, exact, see docs/resilience.md), or every replica does
when the config names a store (``FilterEnv.remote_buckets``, Redis).

A bucket is named by its scope (the filter config's content, plus the route for a per-route
config) and its descriptor entries, so a reload that keeps a limit keeps its bucket, and two
routes sharing a listener-wide config share its buckets (Envoy). A per-connection config
(``local_rate_limit_per_downstream_connection``) keeps its buckets per downstream connection
instead (``PerConnection``), in the worker that serves the connection."""

from __future__ import annotations

from collections import OrderedDict
from weakref import WeakKeyDictionary

from filters.local_ratelimit.config import DescriptorConfig, LocalRateLimitConfig, TokenBucketConfig
from sidecar.core.connection_id import ConnectionId
from sidecar.core.context import RequestContext
from sidecar.core.limits import (
    BucketDecision,
    BucketSpec,
    Descriptor,
    TokenBuckets,
    refill,
    reset_after,
)
from sidecar.core.metrics import MetricFactory

PEER_CONNECTIONS = 10_000   # connections known only by their peer address (see for_connection)


def spec_of(cfg: TokenBucketConfig) -> BucketSpec:
    return BucketSpec(cfg.max_tokens, cfg.tokens_per_fill, cfg.fill_interval_s)


class Bucket:
    """One bucket of the sidecar's table: its name and spec, bound once."""

    __slots__ = ("buckets", "scope", "descriptor", "spec", "pinned", "name")

    def __init__(self, buckets: TokenBuckets, scope: str, descriptor: Descriptor,
                 spec: BucketSpec, pinned: bool):
        self.buckets = buckets
        self.scope = scope
        self.descriptor = descriptor
        self.spec = spec
        self.pinned = pinned
        # the bucket's name in a remote store (the same on every replica with this config)
        self.name = scope + "|" + "|".join(f"{k}={v}" for k, v in descriptor)

    def consume(self, now: float) -> BucketDecision:
        return self.buckets.consume(self.scope, self.descriptor, self.spec, now, self.pinned)


class DescriptorBuckets:
    """The bucket(s) of one descriptor config: one, or one per value (dynamic: unpinned in
    the sidecar's table; this LRU only bounds the handles kept here)."""

    __slots__ = ("cfg", "single", "per_value", "max_keys", "_buckets", "_scope", "_spec")

    def __init__(self, cfg: DescriptorConfig, max_keys: int, buckets: TokenBuckets, scope: str):
        self.cfg = cfg
        self._buckets, self._scope, self._spec = buckets, scope, spec_of(cfg.bucket)
        self.single = None if cfg.dynamic else Bucket(buckets, scope, cfg.entries, self._spec, True)
        self.per_value: OrderedDict[Descriptor, Bucket] = OrderedDict()
        self.max_keys = max_keys

    def get(self, entries: Descriptor) -> Bucket:
        if self.single is not None:
            return self.single
        b = self.per_value.get(entries)
        if b is None:
            b = Bucket(self._buckets, self._scope, entries, self._spec, False)
            self.per_value[entries] = b
            if len(self.per_value) > self.max_keys:
                self.per_value.popitem(last=False)
        else:
            self.per_value.move_to_end(entries)
        return b


class LimiterState:
    """The buckets of one filter config (and route, for per-route configs)."""

    __slots__ = ("default", "descriptors", "scope")

    def __init__(self, cfg: LocalRateLimitConfig, buckets: TokenBuckets, scope: str):
        self.scope = scope
        self.default = Bucket(buckets, scope, (), spec_of(cfg.bucket), True) \
            if cfg.bucket is not None else None
        # slowest rate first, as Envoy consumes them
        descs = sorted(cfg.descriptors, key=lambda d: d.bucket.rate)
        self.descriptors = [DescriptorBuckets(d, cfg.max_dynamic, buckets, scope) for d in descs]


class ConnectionBuckets:
    """The buckets of one downstream connection (``local_rate_limit_per_downstream_connection``):
    plain memory of the worker serving it, Envoy's whole-fill arithmetic, at most ``cap``
    buckets (the least recently used goes: a new bucket starts full)."""

    __slots__ = ("_buckets", "_cap")

    def __init__(self, cap: int):
        self._buckets: OrderedDict[tuple[str, Descriptor], list[float]] = OrderedDict()
        self._cap = cap

    def consume(self, scope: str, descriptor: Descriptor, spec: BucketSpec, now: float,
                pinned: bool = True) -> BucketDecision:
        key = (scope, descriptor)
        st = self._buckets.get(key)
        if st is None:
            st = self._buckets[key] = [float(spec.max_tokens), now]
            if len(self._buckets) > self._cap:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        tokens, last = refill(st[0], st[1], spec, now)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        st[0], st[1] = tokens, last
        return BucketDecision(allowed, int(tokens), reset_after(last, spec, now))

    def release(self, scope: str) -> None:
        for key in [k for k in self._buckets if k[0] == scope]:
            del self._buckets[key]


class PerConnection:
    """Each downstream connection's buckets for one filter scope, kept across config reloads
    (as Envoy keeps them in the connection's filter state) and dropped with the connection."""

    __slots__ = ("_by_conn", "_by_peer", "_cap")

    def __init__(self, cap: int):
        self._by_conn: WeakKeyDictionary[ConnectionId, ConnectionBuckets] = WeakKeyDictionary()
        # a request with no connection identity (a codec that does not give one): its peer
        # address names the connection while it lives; bounded, least recently used out
        self._by_peer: OrderedDict[tuple[str, int], ConnectionBuckets] = OrderedDict()
        self._cap = cap

    def for_connection(self, ctx: RequestContext) -> ConnectionBuckets:
        conn = ctx.connection
        if conn is not None:
            b = self._by_conn.get(conn)
            if b is None:
                b = self._by_conn[conn] = ConnectionBuckets(self._cap)
            return b
        peer = ctx.downstream_addr or ("", 0)
        b = self._by_peer.get(peer)
        if b is None:
            b = self._by_peer[peer] = ConnectionBuckets(self._cap)
            if len(self._by_peer) > PEER_CONNECTIONS:
                self._by_peer.popitem(last=False)
        else:
            self._by_peer.move_to_end(peer)
        return b


class LimiterStates:
    """Which scopes are in use by filters built from live configs (a scope's buckets are let
    go in the sidecar's table when no filter uses it any more), and the per-connection buckets
    of per-connection configs."""

    __slots__ = ("buckets", "metrics", "_users", "_per_connection")

    def __init__(self, metrics: MetricFactory, buckets: TokenBuckets):
        self.metrics = metrics
        self.buckets = buckets
        self._users: dict[str, int] = {}
        self._per_connection: dict[str, PerConnection] = {}

    def per_connection(self, state: LimiterState, cfg: LocalRateLimitConfig) -> PerConnection:
        pc = self._per_connection.get(state.scope)
        if pc is None:
            # room for the config's own buckets plus its dynamic ones on one connection
            cap = 1 + len(cfg.descriptors) * cfg.max_dynamic
            pc = self._per_connection[state.scope] = PerConnection(cap)
        return pc

    def get(self, cfg: LocalRateLimitConfig, route: str | None) -> LimiterState:
        scope = cfg.fingerprint if route is None else f"{cfg.fingerprint}|route={route}"
        self._users[scope] = self._users.get(scope, 0) + 1
        return LimiterState(cfg, self.buckets, scope)

    def done(self, state: LimiterState) -> None:
        """A filter built on ``state`` was retired."""
        n = self._users.get(state.scope, 0) - 1
        if n > 0:
            self._users[state.scope] = n
            return
        self._users.pop(state.scope, None)
        self._per_connection.pop(state.scope, None)
        self.buckets.release(state.scope)
