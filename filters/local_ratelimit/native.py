"""Local rate limit from native YAML::

    local_ratelimit:
      max_tokens: 100          # the route's bucket (optional when descriptors are given)
      tokens_per_fill: 100     # default: max_tokens
      fill_interval: 1s
      descriptors:             # extra buckets, one per distinct value
        - by: {jwt_claim: sub}         # or {header: x-api-key} or {remote_ip: true}
          max_tokens: 10
          fill_interval: 1s
      store: main              # optional: buckets in that Redis store (`stores:`), shared by
      on_store_error: fail_open    # every replica; fail_open (default) or fail_closed
      per_connection: false    # true: each downstream connection has its own buckets

Without ``store`` the buckets are the sidecar's: every worker takes from the same bucket.

Unlike Envoy's, the native filter limits by default (``enabled`` and ``enforced`` 100 %).
"""

from __future__ import annotations

from filters.local_ratelimit.config import (
    Action,
    DescriptorConfig,
    Entry,
    HeaderOption,
    LocalRateLimitConfig,
    TokenBucketConfig,
    client_ip,
    fingerprint,
    jwt_claim,
)
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.core.limits import FailurePolicy
from sidecar.core.message import Request

NATIVE_MAX_KEYS = 10_000
_KEYS = ("stat_prefix", "max_tokens", "tokens_per_fill", "fill_interval", "status", "enabled",
         "enforced", "headers", "response_headers", "descriptors", "always_consume_default",
         "disabled", "store", "on_store_error", "per_connection")


def _bucket(d: dict[str, object], path: str) -> TokenBucketConfig:
    mx = w.integer(d, "max_tokens", path, lo=1)
    per = w.integer(d, "tokens_per_fill", path, mx, lo=1)
    interval = w.duration(d, "fill_interval", path, 1.0)
    if interval < 0.05:
        raise ConfigError(w.join(path, "fill_interval"), "must be at least 50ms")
    return TokenBucketConfig(mx, per, interval)


def _route_bucket(d: dict[str, object], path: str) -> TokenBucketConfig | None:
    if "max_tokens" not in d:
        for k in ("tokens_per_fill", "fill_interval"):
            if k in d:
                raise ConfigError(w.join(path, k), "needs max_tokens")
        return None
    return _bucket(d, path)


def _percent(d: dict[str, object], key: str, path: str) -> float:
    v = d.get(key)
    if v is None or v is True:
        return 100.0
    if v is False:
        return 0.0
    return w.number(d, key, path, lo=0, hi=100)


def _by(raw: object, path: str, key: str) -> Action:
    d = w.check_keys(raw, ("header", "jwt_claim", "provider", "remote_ip", "value"), path)
    kind = w.one_of(d, ("header", "jwt_claim", "remote_ip"), path)
    if kind != "jwt_claim" and "provider" in d:
        raise ConfigError(w.join(path, "provider"), "only applies with jwt_claim")
    if kind == "header":
        hname = w.string(d, "header", path, nonempty=True).lower()

        def by_header(req: Request) -> Entry | None:
            v = req.headers.get(hname)
            return (key, v) if v is not None else None
        return by_header
    if kind == "jwt_claim":
        claim = tuple(w.string(d, "jwt_claim", path, nonempty=True).split("."))
        provider = w.string(d, "provider", path, "")

        def by_claim(req: Request) -> Entry | None:
            v = jwt_claim(req, provider, claim)
            return (key, v) if v is not None else None
        return by_claim
    if w.boolean(d, "remote_ip", path) is not True:
        raise ConfigError(w.join(path, "remote_ip"), "must be true")

    def by_ip(req: Request) -> Entry | None:
        ip = client_ip(req)
        return (key, ip) if ip else None
    return by_ip


def from_native(raw: object, path: str) -> LocalRateLimitConfig:
    d = w.check_keys(raw, _KEYS, path)
    if w.boolean(d, "disabled", path, False):
        if set(d) != {"disabled"}:
            raise ConfigError(path, "disabled: true takes no other fields")
        return LocalRateLimitConfig(stat_prefix="", bucket=None, disabled=True)
    bucket = _route_bucket(d, path)
    descs = []
    producers = []
    dp = w.join(path, "descriptors")
    max_keys = NATIVE_MAX_KEYS
    for i, item in enumerate(w.seq(d, "descriptors", path, [])):
        p = w.join(dp, i)
        x = w.check_keys(item, ("by", "max_tokens", "tokens_per_fill", "fill_interval",
                                "max_keys"), p)
        key = f"d{i}"
        by = w.mapping(x, "by", p)
        producers.append((_by(by, w.join(p, "by"), key),))
        value = w.string(by, "value", w.join(p, "by"), "")
        descs.append(DescriptorConfig(((key, value),), _bucket(x, p)))
        max_keys = max(1, min(max_keys, w.integer(x, "max_keys", p, NATIVE_MAX_KEYS, lo=1)))
    if bucket is None and not descs:
        raise ConfigError(path, "needs max_tokens (the route's bucket) or descriptors")
    rh: list[HeaderOption] = []
    rp = w.join(path, "response_headers")
    for name, val in w.mapping(d, "response_headers", path, {}).items():
        if not isinstance(val, (str, int)):
            raise ConfigError(w.join(rp, str(name)), "must be a string")
        rh.append((str(name).lower(), str(val), True))
    return LocalRateLimitConfig(
        stat_prefix=w.string(d, "stat_prefix", path, "local_ratelimit"),
        bucket=bucket, descriptors=tuple(descs), producers=tuple(producers),
        status=w.integer(d, "status", path, 429, lo=400, hi=599),
        enabled_pct=_percent(d, "enabled", path),
        enforced_pct=_percent(d, "enforced", path),
        response_headers=tuple(rh),
        x_ratelimit_headers=w.boolean(d, "headers", path, True),
        always_consume_default=w.boolean(d, "always_consume_default", path, True),
        max_dynamic=max_keys,
        store=w.string(d, "store", path, ""),
        on_store_error=_policy(d, path),
        per_connection=_per_connection(d, path),
        fingerprint="native:" + fingerprint(d))


def _per_connection(d: dict[str, object], path: str) -> bool:
    on = w.boolean(d, "per_connection", path, False)
    if on and d.get("store"):
        raise ConfigError(w.join(path, "per_connection"),
                          "per-connection buckets live in the worker; they cannot be in a store")
    return on


def _policy(d: dict[str, object], path: str) -> FailurePolicy:
    if "on_store_error" in d and not d.get("store"):
        raise ConfigError(w.join(path, "on_store_error"), "needs store")
    return FailurePolicy(w.string(d, "on_store_error", path, FailurePolicy.FAIL_OPEN.value,
                                  choices=tuple(p.value for p in FailurePolicy)))


def per_route_from_native(d: object, path: str) -> LocalRateLimitConfig:
    if not isinstance(d, dict):
        raise ConfigError(path, "must be a mapping")
    return from_native(d, path)
