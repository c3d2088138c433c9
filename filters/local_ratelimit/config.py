"""Local rate limit config: token buckets, descriptors, and the actions that turn a request
into descriptor entries (built once per config by the parsers, called per request)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.core.context import JsonValue
from sidecar.core.limits import FailurePolicy
from sidecar.core.message import Request

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
JWT_FILTER = "envoy.filters.http.jwt_authn"
DEFAULT_MAX_DYNAMIC = 20            # Envoy's default for max_dynamic_descriptors


@dataclass(frozen=True, slots=True)
class TokenBucketConfig:
    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: float

    @property
    def rate(self) -> float:
        return self.tokens_per_fill / self.fill_interval_s


Entry = tuple[str, str]
"""One descriptor entry: (key, value)."""


@dataclass(frozen=True, slots=True)
class DescriptorConfig:
    entries: tuple[Entry, ...]          # value "" = one bucket per value ("dynamic")
    bucket: TokenBucketConfig

    @property
    def dynamic(self) -> bool:
        return any(v == "" for _, v in self.entries)


Action = Callable[[Request], "Entry | None"]
"""Turns a request into one descriptor entry, or None (not produced: the whole descriptor is
dropped). A producer is one Envoy ``RateLimit``: its actions' entries form one descriptor."""
SKIP: Entry = ("", "")
"""An action skipped (``skip_if_absent``) that keeps the rest of its descriptor."""

HeaderOption = tuple[str, str, bool]
"""A header to add: (name, value, append)."""


@dataclass(frozen=True, slots=True, eq=False)
class LocalRateLimitConfig:
    stat_prefix: str
    bucket: TokenBucketConfig | None
    descriptors: tuple[DescriptorConfig, ...] = ()
    producers: tuple[tuple[Action, ...], ...] = ()
    status: int = 429
    enabled_pct: float = 100.0
    enforced_pct: float = 100.0
    response_headers: tuple[HeaderOption, ...] = ()
    request_headers_not_enforced: tuple[HeaderOption, ...] = ()
    x_ratelimit_headers: bool = False
    always_consume_default: bool = True
    max_dynamic: int = DEFAULT_MAX_DYNAMIC
    fingerprint: str = ""               # identity of the config content, keys bucket state
    disabled: bool = False              # per-route: turn the filter off on this route
    store: str = ""                     # a Redis store of `stores:`: buckets every replica shares
    on_store_error: FailurePolicy = FailurePolicy.FAIL_OPEN
    # Envoy's local_rate_limit_per_downstream_connection: each downstream connection has its
    # own buckets (in the worker that serves it), not the sidecar's
    per_connection: bool = False


def fingerprint(d: object) -> str:
    """The config's content as canonical JSON: the same limit keeps its buckets on reload."""
    return json.dumps(d, sort_keys=True, default=str, separators=(",", ":"))


# ---- what actions read from a request ---------------------------------------------------------

def client_ip(req: Request) -> str | None:
    """The trusted client address (XFF-derived) when the listener computed one, else the peer."""
    ip = req.ctx.remote_ip
    if ip:
        return ip
    a = req.ctx.downstream_addr
    return a[0] if a else None


def jwt_claim(req: Request, provider: str, claim: tuple[str, ...]) -> str | None:
    """A string or integer claim of a verified JWT (one provider's, or any when ``provider``
    is empty), from the jwt_authn filter."""
    payloads = req.ctx.jwt_payloads
    cands = (payloads.get(provider),) if provider else tuple(payloads.values())
    for pl in cands:
        v: JsonValue = pl
        for k in claim:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            return str(v)
    return None
