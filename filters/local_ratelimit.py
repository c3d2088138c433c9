"""Local (in-process) rate limiting: Envoy's ``envoy.filters.http.local_ratelimit``.

Token buckets, refilled lazily on the monotonic clock (no background task): a bucket holds up
to ``max_tokens`` and gains ``tokens_per_fill`` every ``fill_interval``; each request takes
one token. Besides the route's default bucket, *descriptors* give separate buckets to
requests that carry a given descriptor - a header value, the client address, a JWT claim
such as ``sub`` - with one bucket per distinct value when the descriptor's value is left
empty ("dynamic" descriptors, bounded by ``max_dynamic_descriptors``, least recently used
evicted).

As Envoy: matched descriptor buckets are consumed slowest-rate first and the first empty one
limits; the default bucket is consumed too unless ``always_consume_default_token_bucket`` is
false and a descriptor matched. A limited request gets ``429`` (or ``status``) with body
``local_rate_limited``, response flag ``RL`` and details ``local_rate_limited``; with
``enable_x_ratelimit_headers: DRAFT_VERSION_03`` every response carries ``x-ratelimit-limit``,
``x-ratelimit-remaining`` and ``x-ratelimit-reset`` (seconds until the next fill).

Envoy semantics kept on purpose: in an Envoy config, ``filter_enabled`` and ``filter_enforced``
default to 0 % (the filter only counts) - set them to 100 % to limit. The native config
defaults both to 100 %.

Buckets live in ``runtime.state`` keyed by the config's content (and the route, for
per-route configs), so a config reload that does not change the limit keeps the counts.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multidict import MultiDict

from filters.request_headers import request_header_test
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.matchers import header_matcher_from_envoy
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Filter, FilterEnv, FilterSpec
from sidecar.core.message import Request, Response, local_reply
from sidecar.core.metrics import MetricFactory

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
BODY = "local_rate_limited"
FLAG = "RL"
JWT_FILTER = "envoy.filters.http.jwt_authn"
DEFAULT_MAX_DYNAMIC = 20            # Envoy's default for max_dynamic_descriptors
NATIVE_MAX_KEYS = 10_000


@dataclass(frozen=True, slots=True)
class TokenBucketConfig:
    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: float

    @property
    def rate(self) -> float:
        return self.tokens_per_fill / self.fill_interval_s


@dataclass(frozen=True, slots=True)
class DescriptorConfig:
    entries: tuple[tuple[str, str], ...]     # (key, value); value "" = one bucket per value
    bucket: TokenBucketConfig

    @property
    def dynamic(self) -> bool:
        return any(v == "" for _, v in self.entries)


# An action turns a request into one descriptor entry (key, value) or None (not produced);
# a producer is one Envoy RateLimit: its actions' entries form one descriptor.
Action = Callable[[Request], tuple[str, str] | None]
_SKIP = ("", "")     # an action that is skipped (skip_if_absent) but keeps the descriptor


@dataclass(frozen=True, slots=True, eq=False)
class LocalRateLimitConfig:
    stat_prefix: str
    bucket: TokenBucketConfig | None
    descriptors: tuple[DescriptorConfig, ...] = ()
    producers: tuple[tuple[Action, ...], ...] = ()
    status: int = 429
    enabled_pct: float = 100.0
    enforced_pct: float = 100.0
    response_headers: tuple[tuple[str, str, bool], ...] = ()          # (name, value, append)
    request_headers_not_enforced: tuple[tuple[str, str, bool], ...] = ()
    x_ratelimit_headers: bool = False
    always_consume_default: bool = True
    max_dynamic: int = DEFAULT_MAX_DYNAMIC
    fingerprint: str = ""               # identity of the config content, keys bucket state
    disabled: bool = False              # per-route: turn the filter off on this route


# =============================================================================================
# token bucket
# =============================================================================================

class TokenBucket:
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
        self.per_value: OrderedDict = OrderedDict()
        self.max_keys = max_keys

    def get(self, values: tuple, now: float) -> TokenBucket:
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
    __slots__ = ("default", "descriptors")

    def __init__(self, cfg: LocalRateLimitConfig, now: float):
        self.default = TokenBucket(cfg.bucket, now) if cfg.bucket is not None else None
        # slowest rate first, as Envoy consumes them
        descs = sorted(cfg.descriptors, key=lambda d: d.bucket.rate)
        self.descriptors = [DescriptorBuckets(d, cfg.max_dynamic, now) for d in descs]


# =============================================================================================
# parsing helpers
# =============================================================================================

def _fingerprint(d: Any) -> str:
    return json.dumps(d, sort_keys=True, default=str, separators=(",", ":"))


def _bucket_envoy(d: Any, path: str) -> TokenBucketConfig:
    w.check_keys(d, ("max_tokens", "tokens_per_fill", "fill_interval"), path)
    mx = w.integer(d, "max_tokens", path, lo=1)
    per = w.integer(d, "tokens_per_fill", path, 1, lo=1)
    interval = w.duration(d, "fill_interval", path)
    if interval < 0.05:
        raise ConfigError(w.join(path, "fill_interval"), "must be at least 50ms (as Envoy)")
    return TokenBucketConfig(mx, per, interval)


def _bucket_native(d: dict, path: str, required: bool) -> TokenBucketConfig | None:
    if "max_tokens" not in d:
        if required:
            raise ConfigError(w.join(path, "max_tokens"), "is required")
        for k in ("tokens_per_fill", "fill_interval"):
            if k in d:
                raise ConfigError(w.join(path, k), "needs max_tokens")
        return None
    mx = w.integer(d, "max_tokens", path, lo=1)
    per = w.integer(d, "tokens_per_fill", path, mx, lo=1)
    interval = w.duration(d, "fill_interval", path, 1.0)
    if interval < 0.05:
        raise ConfigError(w.join(path, "fill_interval"), "must be at least 50ms")
    return TokenBucketConfig(mx, per, interval)


_DENOMS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


def _fraction_envoy(d: Any, path: str) -> float:
    """RuntimeFractionalPercent -> percent. There is no runtime layer here, so a
    ``runtime_key`` always resolves to its ``default_value`` (Envoy's behaviour when the key
    is unset)."""
    w.check_keys(d, ("default_value", "runtime_key"), path)
    w.string(d, "runtime_key", path, "")
    dp = w.join(path, "default_value")
    dv = w.check_keys(w.mapping(d, "default_value", path), ("numerator", "denominator"), dp)
    num = w.integer(dv, "numerator", dp, 0, lo=0)
    den = _DENOMS[w.string(dv, "denominator", dp, "HUNDRED", choices=tuple(_DENOMS))]
    return min(100.0, num * 100.0 / den)


def _header_options_envoy(items: list, path: str) -> tuple[tuple[str, str, bool], ...]:
    out = []
    for i, o in enumerate(items):
        p = w.join(path, i)
        w.check_keys(o, ("header", "append", "append_action", "keep_empty_value"), p)
        hp = w.join(p, "header")
        h = w.check_keys(w.mapping(o, "header", p), ("key", "value", "raw_value"), hp)
        if h.get("raw_value") is not None:
            raise ConfigError(w.join(hp, "raw_value"), "is not supported; use value")
        name = w.string(h, "key", hp, nonempty=True).lower()
        value = w.string(h, "value", hp, "")
        if o.get("append") is not None and o.get("append_action") is not None:
            raise ConfigError(p, "only one of append, append_action may be set")
        append = w.boolean(o, "append", p, True)
        act = w.string(o, "append_action", p, None,
                       choices=("APPEND_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS_OR_ADD"))
        if act is not None:
            append = act == "APPEND_IF_EXISTS_OR_ADD"
        w.boolean(o, "keep_empty_value", p, False)
        out.append((name, value, append))
    return tuple(out)


def _descriptors_envoy(items: list, path: str) -> tuple[DescriptorConfig, ...]:
    out = []
    for i, d in enumerate(items):
        p = w.join(path, i)
        w.check_keys(d, ("entries", "token_bucket"), p)
        ep = w.join(p, "entries")
        entries = []
        for j, e in enumerate(w.seq(d, "entries", p)):
            q = w.join(ep, j)
            w.check_keys(e, ("key", "value"), q)
            entries.append((w.string(e, "key", q, nonempty=True), w.string(e, "value", q, "")))
        if not entries:
            raise ConfigError(ep, "needs at least one entry")
        out.append(DescriptorConfig(tuple(entries),
                                    _bucket_envoy(w.mapping(d, "token_bucket", p),
                                                  w.join(p, "token_bucket"))))
    return tuple(out)


def _client_ip(req: Request) -> str | None:
    ip = req.ctx.remote_ip
    if ip:
        return ip
    a = req.ctx.downstream_addr
    return a[0] if a else None


def _jwt_claim(req: Request, provider: str, claim: tuple[str, ...]) -> str | None:
    payloads = req.ctx.jwt_payloads
    cands = (payloads.get(provider),) if provider else tuple(payloads.values())
    for pl in cands:
        v: Any = pl
        for k in claim:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            return str(v)
    return None


def _action_envoy(d: Any, path: str) -> Action:
    kinds = ("request_headers", "remote_address", "generic_key", "header_value_match",
             "metadata", "source_cluster", "destination_cluster", "dynamic_metadata",
             "masked_remote_address", "query_parameters", "query_parameter_value_match",
             "extension")
    w.check_keys(d, kinds, path)
    kind = w.one_of(d, kinds, path)
    kp = w.join(path, kind)
    if kind == "request_headers":
        x = w.check_keys(w.mapping(d, kind, path), ("header_name", "descriptor_key",
                                                    "skip_if_absent"), kp)
        hname = w.string(x, "header_name", kp, nonempty=True).lower()
        key = w.string(x, "descriptor_key", kp, nonempty=True)
        skip = w.boolean(x, "skip_if_absent", kp, False)

        def request_headers(req: Request):
            v = req.headers.get(hname)
            if v is None:
                return _SKIP if skip else None
            return (key, v)
        return request_headers
    if kind == "remote_address":
        w.check_keys(d[kind] or {}, (), kp)

        def remote_address(req: Request):
            ip = _client_ip(req)
            return ("remote_address", ip) if ip else None
        return remote_address
    if kind == "generic_key":
        x = w.check_keys(w.mapping(d, kind, path), ("descriptor_value", "descriptor_key"), kp)
        entry = (w.string(x, "descriptor_key", kp, "generic_key") or "generic_key",
                 w.string(x, "descriptor_value", kp, nonempty=True))
        return lambda req: entry
    if kind == "header_value_match":
        x = w.check_keys(w.mapping(d, kind, path), ("descriptor_key", "descriptor_value",
                                                    "expect_match", "headers"), kp)
        entry = (w.string(x, "descriptor_key", kp, "header_match") or "header_match",
                 w.string(x, "descriptor_value", kp, nonempty=True))
        expect = w.boolean(x, "expect_match", kp, True)
        hp = w.join(kp, "headers")
        ms = [request_header_test(header_matcher_from_envoy(h, w.join(hp, i)))
              for i, h in enumerate(w.seq(x, "headers", kp))]
        if not ms:
            raise ConfigError(hp, "needs at least one header matcher")
        return lambda req: entry if all(m(req) for m in ms) == expect else None
    if kind == "metadata":
        x = w.check_keys(w.mapping(d, kind, path), ("descriptor_key", "metadata_key",
                                                    "default_value", "source",
                                                    "skip_if_absent"), kp)
        key = w.string(x, "descriptor_key", kp, nonempty=True)
        w.string(x, "source", kp, "DYNAMIC", choices=("DYNAMIC",))
        mp = w.join(kp, "metadata_key")
        mk = w.check_keys(w.mapping(x, "metadata_key", kp), ("key", "path"), mp)
        if w.string(mk, "key", mp) != JWT_FILTER:
            raise ConfigError(w.join(mp, "key"),
                              f"only {JWT_FILTER} metadata (verified JWT payloads) is available")
        segs = []
        for i, s in enumerate(w.seq(mk, "path", mp)):
            sp = w.join(w.join(mp, "path"), i)
            w.check_keys(s, ("key",), sp)
            segs.append(w.string(s, "key", sp, nonempty=True))
        if len(segs) < 2:
            raise ConfigError(w.join(mp, "path"), "needs [{key: <provider>}, {key: <claim>}, ...]")
        provider, claim = segs[0], tuple(segs[1:])
        default = w.string(x, "default_value", kp, "")
        skip = w.boolean(x, "skip_if_absent", kp, False)

        def metadata(req: Request):
            v = _jwt_claim(req, provider, claim)
            if v is None:
                if default:
                    return (key, default)
                return _SKIP if skip else None
            return (key, v)
        return metadata
    raise ConfigError(kp, f"rate limit action {kind} is not supported by this proxy")


def _producers_envoy(items: list, path: str) -> tuple[tuple[Action, ...], ...]:
    out = []
    for i, r in enumerate(items):
        p = w.join(path, i)
        w.check_keys(r, ("stage", "disable_key", "actions", "limit", "apply_on_stream_done"), p)
        if w.integer(r, "stage", p, 0) != 0:
            raise ConfigError(w.join(p, "stage"), "only stage 0 is supported")
        if r.get("limit") is not None:
            raise ConfigError(w.join(p, "limit"), "dynamic limit overrides are not supported")
        if w.boolean(r, "apply_on_stream_done", p, False):
            raise ConfigError(w.join(p, "apply_on_stream_done"), "is not supported")
        w.string(r, "disable_key", p, "")
        ap = w.join(p, "actions")
        acts = tuple(_action_envoy(a, w.join(ap, j)) for j, a in enumerate(w.seq(r, "actions", p)))
        if not acts:
            raise ConfigError(ap, "needs at least one action")
        out.append(acts)
    return tuple(out)


_ENVOY_KEYS = ("stat_prefix", "status", "token_bucket", "filter_enabled", "filter_enforced",
               "request_headers_to_add_when_not_enforced", "response_headers_to_add",
               "descriptors", "stage", "local_rate_limit_per_downstream_connection",
               "local_cluster_rate_limit", "enable_x_ratelimit_headers", "vh_rate_limits",
               "always_consume_default_token_bucket", "rate_limited_as_resource_exhausted",
               "rate_limits", "max_dynamic_descriptors")


def from_envoy(d: dict, path: str) -> LocalRateLimitConfig:
    w.check_keys(d, _ENVOY_KEYS, path)
    if w.integer(d, "stage", path, 0) != 0:
        raise ConfigError(w.join(path, "stage"), "only stage 0 is supported")
    for k in ("local_rate_limit_per_downstream_connection", "rate_limited_as_resource_exhausted"):
        if w.boolean(d, k, path, False):
            raise ConfigError(w.join(path, k), "is not supported")
    if d.get("local_cluster_rate_limit") is not None:
        raise ConfigError(w.join(path, "local_cluster_rate_limit"), "is not supported")
    if w.string(d, "vh_rate_limits", path, "OVERRIDE", choices=("OVERRIDE",
                                                                "INCLUDE", "IGNORE")) != "OVERRIDE":
        raise ConfigError(w.join(path, "vh_rate_limits"),
                          "route/virtual host rate_limits are not supported; use rate_limits here")
    status = 429
    if d.get("status") is not None:
        sp = w.join(path, "status")
        s = w.check_keys(w.mapping(d, "status", path), ("code",), sp)
        status = w.integer(s, "code", sp, lo=400, hi=599)
    bucket = None
    if d.get("token_bucket") is not None:
        bucket = _bucket_envoy(w.mapping(d, "token_bucket", path), w.join(path, "token_bucket"))
    enabled = (_fraction_envoy(w.mapping(d, "filter_enabled", path), w.join(path, "filter_enabled"))
               if d.get("filter_enabled") is not None else 0.0)
    enforced = (_fraction_envoy(w.mapping(d, "filter_enforced", path),
                                w.join(path, "filter_enforced"))
                if d.get("filter_enforced") is not None else 0.0)
    descriptors = _descriptors_envoy(w.seq(d, "descriptors", path, []), w.join(path, "descriptors"))
    producers = _producers_envoy(w.seq(d, "rate_limits", path, []), w.join(path, "rate_limits"))
    xrl = w.string(d, "enable_x_ratelimit_headers", path, "OFF",
                   choices=("OFF", "DRAFT_VERSION_03")) == "DRAFT_VERSION_03"
    return LocalRateLimitConfig(
        stat_prefix=w.string(d, "stat_prefix", path, nonempty=True),
        bucket=bucket, descriptors=descriptors, producers=producers, status=status,
        enabled_pct=enabled, enforced_pct=enforced,
        response_headers=_header_options_envoy(w.seq(d, "response_headers_to_add", path, []),
                                               w.join(path, "response_headers_to_add")),
        request_headers_not_enforced=_header_options_envoy(
            w.seq(d, "request_headers_to_add_when_not_enforced", path, []),
            w.join(path, "request_headers_to_add_when_not_enforced")),
        x_ratelimit_headers=xrl,
        always_consume_default=w.boolean(d, "always_consume_default_token_bucket", path, True),
        max_dynamic=w.integer(d, "max_dynamic_descriptors", path, DEFAULT_MAX_DYNAMIC, lo=1),
        fingerprint="envoy:" + _fingerprint(d))


# ---- native ----------------------------------------------------------------------------------

_NATIVE_KEYS = ("stat_prefix", "max_tokens", "tokens_per_fill", "fill_interval", "status",
                "enabled", "enforced", "headers", "response_headers", "descriptors",
                "always_consume_default", "disabled")


def _percent_native(d: dict, key: str, path: str) -> float:
    v = d.get(key)
    if v is None or v is True:
        return 100.0
    if v is False:
        return 0.0
    return w.number(d, key, path, lo=0, hi=100)


def _by_native(d: Any, path: str, key: str) -> Action:
    w.check_keys(d, ("header", "jwt_claim", "provider", "remote_ip", "value"), path)
    kind = w.one_of(d, ("header", "jwt_claim", "remote_ip"), path)
    if kind != "jwt_claim" and "provider" in d:
        raise ConfigError(w.join(path, "provider"), "only applies with jwt_claim")
    if kind == "header":
        hname = w.string(d, "header", path, nonempty=True).lower()

        def by_header(req: Request):
            v = req.headers.get(hname)
            return (key, v) if v is not None else None
        return by_header
    if kind == "jwt_claim":
        claim = tuple(w.string(d, "jwt_claim", path, nonempty=True).split("."))
        provider = w.string(d, "provider", path, "")

        def by_claim(req: Request):
            v = _jwt_claim(req, provider, claim)
            return (key, v) if v is not None else None
        return by_claim
    if w.boolean(d, "remote_ip", path) is not True:
        raise ConfigError(w.join(path, "remote_ip"), "must be true")

    def by_ip(req: Request):
        ip = _client_ip(req)
        return (key, ip) if ip else None
    return by_ip


def from_native(d: dict, path: str) -> LocalRateLimitConfig:
    """Native form::

        local_ratelimit:
          max_tokens: 100          # the route's bucket (optional when descriptors are given)
          tokens_per_fill: 100     # default: max_tokens
          fill_interval: 1s
          descriptors:             # extra buckets, one per distinct value
            - by: {jwt_claim: sub}         # or {header: x-api-key} or {remote_ip: true}
              max_tokens: 10
              fill_interval: 1s
    """
    w.check_keys(d, _NATIVE_KEYS, path)
    if w.boolean(d, "disabled", path, False):
        if set(d) != {"disabled"}:
            raise ConfigError(path, "disabled: true takes no other fields")
        return LocalRateLimitConfig(stat_prefix="", bucket=None, disabled=True)
    bucket = _bucket_native(d, path, required=False)
    descs = []
    producers = []
    dp = w.join(path, "descriptors")
    max_keys = NATIVE_MAX_KEYS
    for i, x in enumerate(w.seq(d, "descriptors", path, [])):
        p = w.join(dp, i)
        w.check_keys(x, ("by", "max_tokens", "tokens_per_fill", "fill_interval", "max_keys"), p)
        key = f"d{i}"
        by = w.mapping(x, "by", p)
        producers.append((_by_native(by, w.join(p, "by"), key),))
        value = w.string(by, "value", w.join(p, "by"), "")
        descs.append(DescriptorConfig(((key, value),), _bucket_native(x, p, required=True)))
        max_keys = max(1, min(max_keys, w.integer(x, "max_keys", p, NATIVE_MAX_KEYS, lo=1)))
    if bucket is None and not descs:
        raise ConfigError(path, "needs max_tokens (the route's bucket) or descriptors")
    rh = []
    rp = w.join(path, "response_headers")
    for name, val in w.mapping(d, "response_headers", path, {}).items():
        if not isinstance(val, (str, int)):
            raise ConfigError(w.join(rp, name), "must be a string")
        rh.append((str(name).lower(), str(val), True))
    return LocalRateLimitConfig(
        stat_prefix=w.string(d, "stat_prefix", path, "local_ratelimit"),
        bucket=bucket, descriptors=tuple(descs), producers=tuple(producers),
        status=w.integer(d, "status", path, 429, lo=400, hi=599),
        enabled_pct=_percent_native(d, "enabled", path),
        enforced_pct=_percent_native(d, "enforced", path),
        response_headers=tuple(rh),
        x_ratelimit_headers=w.boolean(d, "headers", path, True),
        always_consume_default=w.boolean(d, "always_consume_default", path, True),
        max_dynamic=max_keys,
        fingerprint="native:" + _fingerprint(d))


def per_route_from_native(d: Any, path: str) -> LocalRateLimitConfig:
    if not isinstance(d, dict):
        raise ConfigError(path, "must be a mapping")
    return from_native(d, path)


# =============================================================================================
# the filter
# =============================================================================================

def _chance(pct: float) -> bool:
    if pct >= 100.0:
        return True
    if pct <= 0.0:
        return False
    return random.random() * 100.0 < pct


def _add_headers(h: MultiDict, opts: tuple) -> None:
    for name, value, append in opts:
        if append:
            h.add(name, value)
        else:
            h[name] = value


class LocalRateLimitFilter(Filter):
    def __init__(self, cfg: LocalRateLimitConfig, state: LimiterState, metrics: Any):
        self.cfg = cfg
        self.state = state
        fam = metrics.counter("sidecar_local_ratelimit_requests_total",
                              "Local rate limit decisions (Envoy's enabled/ok/rate_limited/"
                              "enforced counters)", ("stat_prefix", "outcome"))
        sp = cfg.stat_prefix
        self._enabled = fam.labels(sp, "enabled")
        self._ok = fam.labels(sp, "ok")
        self._limited = fam.labels(sp, "rate_limited")
        self._enforced = fam.labels(sp, "enforced")
        self._enabled_pct = cfg.enabled_pct
        self._enforced_pct = cfg.enforced_pct
        # descriptor lookup: entries-key tuple -> DescriptorBuckets, in state order
        self._by_keys: dict[tuple, list] = {}
        for db in state.descriptors:
            self._by_keys.setdefault(tuple(k for k, _ in db.cfg.entries), []).append(db)

    def _descriptors(self, req: Request) -> list[tuple]:
        out = []
        for acts in self.cfg.producers:
            entries = []
            for a in acts:
                e = a(req)
                if e is None:
                    entries = None
                    break
                if e is not _SKIP:
                    entries.append(e)
            if entries:
                out.append(tuple(entries))
        return out

    def _match(self, descs: list[tuple], now: float) -> list[TokenBucket]:
        buckets = []
        seen = set()
        for entries in descs:
            keys = tuple(k for k, _ in entries)
            for db in self._by_keys.get(keys, ()):
                want = db.cfg.entries
                if all(wv == "" or wv == v for (_, wv), (_, v) in zip(want, entries, strict=False)):
                    b = db.get(tuple(v for _, v in entries), now)
                    if id(b) not in seen:
                        seen.add(id(b))
                        buckets.append((db.cfg.bucket.rate, b))
                    break
        buckets.sort(key=lambda x: x[0])
        return [b for _, b in buckets]

    async def __call__(self, req: Request, next) -> Response:
        if not _chance(self._enabled_pct):
            return await next(req)
        self._enabled.inc()
        cfg = self.cfg
        now = time.monotonic()
        matched = self._match(self._descriptors(req), now) if cfg.producers else []
        limiting: TokenBucket | None = None
        shown: TokenBucket | None = None
        for b in matched:
            if shown is None:
                shown = b
            if not b.consume(now):
                limiting = b
                break
        default = self.state.default
        if limiting is None and default is not None and (not matched or cfg.always_consume_default):
            if shown is None:
                shown = default
            if not default.consume(now):
                limiting = default
        if limiting is None:
            self._ok.inc()
            resp = await next(req)
            if cfg.x_ratelimit_headers and shown is not None:
                self._xrl(resp.headers, shown, now)
            return resp
        self._limited.inc()
        if not _chance(self._enforced_pct):
            if cfg.request_headers_not_enforced:
                _add_headers(req.headers, cfg.request_headers_not_enforced)
            resp = await next(req)
            if cfg.x_ratelimit_headers:
                self._xrl(resp.headers, limiting, now)
            return resp
        self._enforced.inc()
        req.ctx.response_code_details = BODY
        h = MultiDict()
        if cfg.x_ratelimit_headers:
            self._xrl(h, limiting, now)
        _add_headers(h, cfg.response_headers)
        return local_reply(req.ctx, cfg.status, BODY, FLAG, h)

    @staticmethod
    def _xrl(h: MultiDict, b: TokenBucket, now: float) -> None:
        h["x-ratelimit-limit"] = str(b.cfg.max_tokens)
        h["x-ratelimit-remaining"] = str(b.remaining())
        h["x-ratelimit-reset"] = str(b.reset_after(now))


_MAX_STATES = 4096


class LimiterStates:
    """Token buckets kept across reloads: one per filter config (and route, for per-route
    configs), so a reload does not refill them."""

    __slots__ = ("buckets", "metrics")

    def __init__(self, metrics: MetricFactory):
        self.metrics = metrics
        self.buckets: dict[tuple[object, object], LimiterState] = {}


def new_state(env: FilterEnv) -> LimiterStates:
    return LimiterStates(env.metrics)


def build(config: LocalRateLimitConfig, per_route: LocalRateLimitConfig | None,
          states: LimiterStates, env: FilterEnv, route: RouteInfo) -> LocalRateLimitFilter | None:
    cfg = per_route if per_route is not None else config
    if cfg.disabled or cfg.enabled_pct <= 0.0:
        return None                       # Envoy: filter_enabled unset means 0 % - a no-op
    if cfg.bucket is None and not cfg.descriptors:
        return None
    buckets = states.buckets
    # a listener-wide config shares one bucket across its routes; a per-route config has its own
    rkey = route.name if per_route is not None else None
    key = (cfg.fingerprint, rkey)
    st = buckets.get(key)
    if st is None:
        st = buckets[key] = LimiterState(cfg, time.monotonic())
        while len(buckets) > _MAX_STATES:
            del buckets[next(iter(buckets))]
    return LocalRateLimitFilter(cfg, st, states.metrics)


SPEC = FilterSpec(
    name="envoy.filters.http.local_ratelimit",
    short="local_ratelimit",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=TYPE_URL,
    per_route_from_envoy=from_envoy,
    per_route_from_native=per_route_from_native,
)
