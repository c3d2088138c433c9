"""The local rate limit filter: descriptor buckets (slowest rate first), then the route's
default bucket; a limited request gets the configured status with body
``local_rate_limited``, response flag ``RL``."""

from __future__ import annotations

import random
import time

from multidict import MultiDict

from filters.local_ratelimit.buckets import (
    Bucket,
    DescriptorBuckets,
    LimiterState,
    LimiterStates,
    PerConnection,
)
from filters.local_ratelimit.config import SKIP, Entry, HeaderOption, LocalRateLimitConfig
from sidecar.config.errors import ConfigError
from sidecar.core.body import Headers
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Filter, FilterEnv, Handler
from sidecar.core.limits import BucketDecision, RemoteBuckets
from sidecar.core.message import Request, Response, local_reply
from sidecar.core.metrics import MetricFactory

BODY = "local_rate_limited"
FLAG = "RL"


def _chance(pct: float) -> bool:
    if pct >= 100.0:
        return True
    if pct <= 0.0:
        return False
    return random.random() * 100.0 < pct


def _add_headers(h: Headers, opts: tuple[HeaderOption, ...]) -> None:
    for name, value, append in opts:
        if append:
            h.add(name, value)
        else:
            h[name] = value


def _xrl(h: Headers, b: Bucket, d: BucketDecision) -> None:
    h["x-ratelimit-limit"] = str(b.spec.max_tokens)
    h["x-ratelimit-remaining"] = str(d.remaining)
    h["x-ratelimit-reset"] = str(d.reset_s)


class LocalRateLimitFilter(Filter):
    def __init__(self, cfg: LocalRateLimitConfig, state: LimiterState, states: LimiterStates,
                 metrics: MetricFactory, remote: RemoteBuckets | None = None):
        self.cfg = cfg
        self.state = state
        self.states = states
        self.remote = remote            # a store shared by every replica, or None
        # per-connection buckets (local_rate_limit_per_downstream_connection), or None
        self.per_connection: PerConnection | None = \
            states.per_connection(state, cfg) if cfg.per_connection else None
        fam = metrics.counter("sidecar_local_ratelimit_requests_total",
                              "Local rate limit decisions (Envoy's enabled/ok/rate_limited/"
                              "enforced counters)", ("stat_prefix", "outcome"))
        sp = cfg.stat_prefix
        self._enabled = fam.labels(sp, "enabled")
        self._ok = fam.labels(sp, "ok")
        self._limited = fam.labels(sp, "rate_limited")
        self._enforced = fam.labels(sp, "enforced")
        self._store_error = fam.labels(sp, "store_error")
        self._enabled_pct = cfg.enabled_pct
        self._enforced_pct = cfg.enforced_pct
        # descriptor lookup: the entries' keys -> DescriptorBuckets, in state order
        self._by_keys: dict[tuple[str, ...], list[DescriptorBuckets]] = {}
        for db in state.descriptors:
            self._by_keys.setdefault(tuple(k for k, _ in db.cfg.entries), []).append(db)

    def _descriptors(self, req: Request) -> list[tuple[Entry, ...]]:
        out = []
        for acts in self.cfg.producers:
            entries: list[Entry] = []
            for a in acts:
                e = a(req)
                if e is None:
                    entries = []
                    break
                if e is not SKIP:
                    entries.append(e)
            if entries:
                out.append(tuple(entries))
        return out

    def _match(self, descs: list[tuple[Entry, ...]]) -> list[Bucket]:
        buckets: list[tuple[float, Bucket]] = []
        seen: set[int] = set()
        for entries in descs:
            keys = tuple(k for k, _ in entries)
            for db in self._by_keys.get(keys, ()):
                want = db.cfg.entries
                if all(wv == "" or wv == v for (_, wv), (_, v) in zip(want, entries, strict=False)):
                    b = db.get(entries)
                    if id(b) not in seen:
                        seen.add(id(b))
                        buckets.append((db.cfg.bucket.rate, b))
                    break
        buckets.sort(key=lambda x: x[0])
        return [b for _, b in buckets]

    async def __call__(self, req: Request, next: Handler) -> Response:
        if not _chance(self._enabled_pct):
            return await next(req)
        self._enabled.inc()
        cfg = self.cfg
        order = self._match(self._descriptors(req)) if cfg.producers else []
        default = self.state.default
        if default is not None and (not order or cfg.always_consume_default):
            order.append(default)
        if not order:
            self._ok.inc()
            return await next(req)
        if self.remote is not None:
            i, decision = await self.remote.consume_all(tuple((b.name, b.spec) for b in order))
            if i < 0:
                self._store_error.inc()
                i = 0
            shown, shown_d = order[i], decision
            limiting = None if decision.allowed else order[i]
            limit_d = decision
        else:
            now = time.monotonic()
            shown, shown_d = order[0], None
            limiting, limit_d = None, None
            conn = self.per_connection.for_connection(req.ctx) \
                if self.per_connection is not None else None
            for b in order:
                d = b.consume(now) if conn is None else \
                    conn.consume(b.scope, b.descriptor, b.spec, now)
                if shown_d is None:
                    shown_d = d
                if not d.allowed:
                    limiting, limit_d = b, d
                    break
        if limiting is None or limit_d is None:
            self._ok.inc()
            resp = await next(req)
            if cfg.x_ratelimit_headers and shown_d is not None:
                _xrl(resp.headers, shown, shown_d)
            return resp
        self._limited.inc()
        if not _chance(self._enforced_pct):
            if cfg.request_headers_not_enforced:
                _add_headers(req.headers, cfg.request_headers_not_enforced)
            resp = await next(req)
            if cfg.x_ratelimit_headers:
                _xrl(resp.headers, limiting, limit_d)
            return resp
        self._enforced.inc()
        req.ctx.response_code_details = BODY
        h: Headers = MultiDict()
        if cfg.x_ratelimit_headers:
            _xrl(h, limiting, limit_d)
        _add_headers(h, cfg.response_headers)
        return local_reply(req.ctx, cfg.status, BODY, FLAG, h)

    def close(self) -> None:
        self.states.done(self.state)


def new_state(env: FilterEnv) -> LimiterStates:
    return LimiterStates(env.metrics, env.token_buckets())


def build(config: LocalRateLimitConfig, per_route: LocalRateLimitConfig | None,
          states: LimiterStates, env: FilterEnv, route: RouteInfo) -> LocalRateLimitFilter | None:
    cfg = per_route if per_route is not None else config
    if cfg.disabled or cfg.enabled_pct <= 0.0:
        return None                       # Envoy: filter_enabled unset means 0 % - a no-op
    if cfg.bucket is None and not cfg.descriptors:
        return None
    remote = None
    if cfg.store:
        try:
            remote = env.remote_buckets(cfg.store, cfg.on_store_error)
        except KeyError:
            raise ConfigError("local_ratelimit.store",
                              f"no store named {cfg.store!r} in stores:") from None
    # a listener-wide config shares its buckets across its routes; a per-route config has its own
    state = states.get(cfg, route.name if per_route is not None else None)
    return LocalRateLimitFilter(cfg, state, states, states.metrics, remote)
