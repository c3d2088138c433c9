"""Retry policy (route setting, Envoy ``retry_policy`` semantics) and the retry arithmetic.

The config type and the pure decisions live here (property-tested in tests/test_retry_math.py);
the retry loop itself is ``RouterStage.with_retries`` in ``sidecar.router_stage``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_on: frozenset[str] = frozenset()      # 5xx, gateway-error, reset, connect-failure, ...
    num_retries: int = 1                         # Envoy default when retry_on is set
    per_try_timeout_s: float = 0.0               # 0 = none (route timeout only)
    per_try_idle_timeout_s: float = 0.0          # not supported: always 0 (refused in config)
    retriable_status_codes: frozenset[int] = frozenset()
    backoff_base_s: float = 0.025                # Envoy default 25 ms
    backoff_max_s: float = 0.250                 # Envoy default 10x base
    retry_non_idempotent: bool = False           # native extension; Envoy retries POST too
    retry_host_predicate_previous_hosts: bool = True
    host_selection_retry_max_attempts: int = 3
    max_buffered_body: int = 64 * 1024           # bodies over this are sent once, unretried
    allow_override_headers: bool = False         # honour x-envoy-max-retries / x-envoy-retry-on


RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
    "retriable-status-codes", "reset-before-request", "envoy-ratelimited", "http3-post-connect-failure",
})


def parse_retry_on(v, path: str) -> frozenset[str]:
    from sidecar.config.errors import ConfigError
    if isinstance(v, str):
        items = [s.strip() for s in v.split(",") if s.strip()]
    elif isinstance(v, list) and all(isinstance(s, str) for s in v):
        items = v
    else:
        raise ConfigError(path, "must be a comma-separated string or a list of strings")
    for s in items:
        if s not in RETRY_ON:
            raise ConfigError(path, f"unsupported retry condition {s!r} "
                                    f"(supported: {', '.join(sorted(RETRY_ON))})")
    return frozenset(items)


def _status_codes(v, path: str) -> frozenset[int]:
    from sidecar.config.errors import ConfigError
    from sidecar.config import wire as w
    if not isinstance(v, list):
        raise ConfigError(path, "must be a list of HTTP status codes")
    for i, c in enumerate(v):
        if isinstance(c, bool) or not isinstance(c, int) or not 100 <= c <= 599:
            raise ConfigError(w.join(path, i), "must be an HTTP status code 100..599")
    return frozenset(v)


def retry_policy_from_envoy(d: dict, path: str) -> RetryPolicy:
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    w.check_keys(d, ("retry_on", "num_retries", "per_try_timeout", "per_try_idle_timeout",
                     "retriable_status_codes", "retry_back_off", "retry_host_predicate",
                     "host_selection_retry_max_attempts"), path)
    if d.get("per_try_idle_timeout") is not None:
        raise ConfigError(w.join(path, "per_try_idle_timeout"),
                          "is not supported (use per_try_timeout, or the route timeout)")
    retry_on = parse_retry_on(d.get("retry_on", ""), w.join(path, "retry_on"))
    codes = _status_codes(d.get("retriable_status_codes", []), w.join(path, "retriable_status_codes"))
    base, mx = 0.025, None
    if "retry_back_off" in d:
        bp = w.join(path, "retry_back_off")
        bo = w.check_keys(d["retry_back_off"], ("base_interval", "max_interval"), bp)
        base = w.duration(bo, "base_interval", bp)
        if base <= 0:
            raise ConfigError(w.join(bp, "base_interval"), "must be greater than zero")
        mx = w.duration(bo, "max_interval", bp, None)
        if mx is not None and mx < base:
            raise ConfigError(w.join(bp, "max_interval"), "must be greater than or equal to base_interval")
    for i, p in enumerate(w.seq(d, "retry_host_predicate", path, [])):
        pp = w.join(w.join(path, "retry_host_predicate"), i)
        w.check_keys(p, ("name", "typed_config"), pp)
        if w.string(p, "name", pp) != "envoy.retry_host_predicates.previous_hosts":
            raise ConfigError(w.join(pp, "name"), "only envoy.retry_host_predicates.previous_hosts is supported")
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=w.integer(d, "num_retries", path, 1, lo=0, hi=100),
        per_try_timeout_s=w.duration(d, "per_try_timeout", path, 0.0),
        retriable_status_codes=codes,
        backoff_base_s=base,
        backoff_max_s=mx if mx is not None else base * 10,
        # Envoy retries any method. A retry always prefers a host this request has not tried
        # (the previous-hosts predicate is built in), so that predicate is accepted as a no-op.
        retry_non_idempotent=True,
        retry_host_predicate_previous_hosts=True,
        host_selection_retry_max_attempts=w.integer(d, "host_selection_retry_max_attempts", path, 3, lo=1),
        # Envoy's router honours x-envoy-max-retries / x-envoy-retry-on from (internal) clients
        allow_override_headers=True,
    )


def retry_policy_from_native(d: dict, path: str) -> RetryPolicy:
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    w.check_keys(d, ("retry_on", "retries", "per_try_timeout", "status_codes", "backoff",
                     "max_backoff", "retry_non_idempotent", "max_buffered_body",
                     "allow_override_headers"), path)
    base = w.duration(d, "backoff", path, 0.025)
    mx = w.duration(d, "max_backoff", path, base * 10)
    if mx < base:
        raise ConfigError(w.join(path, "max_backoff"), "must be greater than or equal to backoff")
    return RetryPolicy(
        retry_on=parse_retry_on(d.get("retry_on", "5xx,reset,connect-failure"), w.join(path, "retry_on")),
        num_retries=w.integer(d, "retries", path, 2, lo=0, hi=100),
        per_try_timeout_s=w.duration(d, "per_try_timeout", path, 0.0),
        retriable_status_codes=_status_codes(d.get("status_codes", []), w.join(path, "status_codes")),
        backoff_base_s=base,
        backoff_max_s=mx,
        retry_non_idempotent=w.boolean(d, "retry_non_idempotent", path, False),
        max_buffered_body=w.integer(d, "max_buffered_body", path, 64 * 1024, lo=0),
        allow_override_headers=w.boolean(d, "allow_override_headers", path, False),
    )


# ---- retry arithmetic (pure functions: property-tested) -------------------------------------

def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """The upper bound of the jittered delay before retry number ``attempt + 1``."""
    if attempt < 0:
        attempt = 0
    ceiling = base * (2 ** min(attempt, 30))
    return cap if ceiling > cap else ceiling


def backoff_delay(attempt: int, base: float, cap: float, rand: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)).

    ``attempt`` counts retries from 0; ``rand`` is uniform in [0, 1).
    """
    return backoff_ceiling(attempt, base, cap) * rand


def retry_limit(active_requests: int, max_retries: int, budget_percent: Optional[float],
                min_retry_concurrency: int) -> int:
    """How many retries may be outstanding at once in a cluster.

    Envoy: with a retry budget, ``max(min_retry_concurrency, budget_percent% of active
    requests)`` (active includes pending); without one, the ``max_retries`` threshold."""
    if budget_percent is not None:
        share = int(active_requests * budget_percent / 100.0)
        return share if share > min_retry_concurrency else min_retry_concurrency
    return max_retries


def retry_allowed(active_retries: int, active_requests: int, max_retries: int,
                  budget_percent: Optional[float], min_retry_concurrency: int) -> bool:
    """May one more retry start now (``active_retries`` are already outstanding)?"""
    return active_retries < retry_limit(active_requests, max_retries, budget_percent,
                                        min_retry_concurrency)


_GATEWAY = frozenset({502, 503, 504})


def status_is_retriable(policy: RetryPolicy, status: int) -> bool:
    on = policy.retry_on
    if status >= 500 and "5xx" in on:
        return True
    if status in _GATEWAY and "gateway-error" in on:
        return True
    if status == 409 and "retriable-4xx" in on:
        return True
    if "retriable-status-codes" in on and status in policy.retriable_status_codes:
        return True
    return False


_RESET_ANY = frozenset({"reset", "5xx", "gateway-error"})
_BEFORE_RESPONSE = frozenset({"reset-before-request", "refused-stream"})
_CONNECT = frozenset({"connect-failure", "5xx", "gateway-error", "reset"})


def error_is_retriable(policy: RetryPolicy, flag: str, sent: bool) -> bool:
    """A local failure of one attempt.

    ``flag``: UF connect failure (or connect timeout), UC/UR reset, UT per-try timeout,
    UPE protocol error. ``sent`` is False when the upstream closed the connection without
    one response byte: HTTP/1.1's nearest thing to HTTP/2's REFUSED_STREAM, so the
    ``refused-stream`` and ``reset-before-request`` conditions cover it.
    """
    on = policy.retry_on
    if flag == "UF":
        return not on.isdisjoint(_CONNECT)
    if flag in ("UC", "UR", "UPE"):
        return not on.isdisjoint(_RESET_ANY) or (not sent and not on.isdisjoint(_BEFORE_RESPONSE))
    if flag == "UT":   # a per-try timeout answers 504
        return not on.isdisjoint(_RESET_ANY)
    return False


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


# ---- per-request override headers (honoured only when the route allows them) ---------------

OVERRIDE_HEADERS = ("x-envoy-max-retries", "x-envoy-retry-on", "x-envoy-retriable-status-codes",
                    "x-envoy-upstream-rq-per-try-timeout-ms")


def request_overrides(headers, policy: RetryPolicy) -> tuple[int, RetryPolicy, float]:
    """Apply ``x-envoy-max-retries`` / ``x-envoy-retry-on`` / ``x-envoy-retriable-status-codes``
    / ``x-envoy-upstream-rq-per-try-timeout-ms`` and remove them (they are for this hop).

    Returns (num_retries, policy whose retry_on/codes apply, per-try timeout). Unknown
    retry-on tokens and malformed numbers are ignored, as Envoy does."""
    num_retries = policy.num_retries
    per_try = policy.per_try_timeout_s
    v = headers.get("x-envoy-max-retries")
    if v is not None:
        headers.popall("x-envoy-max-retries")
        v = v.strip()
        if v.isascii() and v.isdigit():
            num_retries = min(int(v), 100)
    v = headers.get("x-envoy-retry-on")
    if v is not None:
        headers.popall("x-envoy-retry-on")
        extra = frozenset(t for t in (s.strip() for s in v.split(",")) if t in RETRY_ON)
        if not extra <= policy.retry_on:
            from dataclasses import replace
            policy = replace(policy, retry_on=policy.retry_on | extra)
    v = headers.get("x-envoy-retriable-status-codes")
    if v is not None:
        headers.popall("x-envoy-retriable-status-codes")
        codes = frozenset(int(c) for c in (x.strip() for x in v.split(","))
                          if c.isascii() and c.isdigit() and len(c) == 3 and 100 <= int(c) <= 599)
        if not codes <= policy.retriable_status_codes:
            from dataclasses import replace
            policy = replace(policy, retriable_status_codes=policy.retriable_status_codes | codes)
    v = headers.get("x-envoy-upstream-rq-per-try-timeout-ms")
    if v is not None:
        headers.popall("x-envoy-upstream-rq-per-try-timeout-ms")
        v = v.strip()
        if v.isascii() and v.isdigit():
            per_try = int(v) / 1000.0
    return num_retries, policy, per_try
