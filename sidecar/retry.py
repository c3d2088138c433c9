"""Retry policy (route setting, Envoy ``retry_policy`` semantics).

The config type lives here; the retry *behaviour* is the ``RetryLayer`` in ``sidecar.chain``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_on: frozenset[str] = frozenset()      # 5xx, gateway-error, reset, connect-failure, ...
    num_retries: int = 1                         # Envoy default when retry_on is set
    per_try_timeout_s: float = 0.0               # 0 = none (route timeout only)
    per_try_idle_timeout_s: float = 0.0
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
    from sidecar.errors import ConfigError
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


def retry_policy_from_envoy(d: dict, path: str) -> RetryPolicy:
    from sidecar import wire as w
    w.check_keys(d, ("retry_on", "num_retries", "per_try_timeout", "per_try_idle_timeout",
                     "retriable_status_codes", "retry_back_off", "retry_host_predicate",
                     "host_selection_retry_max_attempts"), path)
    retry_on = parse_retry_on(d.get("retry_on", ""), w.join(path, "retry_on"))
    codes = d.get("retriable_status_codes", [])
    for i, c in enumerate(codes):
        if not isinstance(c, int) or not 100 <= c <= 599:
            from sidecar.errors import ConfigError
            raise ConfigError(w.join(w.join(path, "retriable_status_codes"), i), "must be 100..599")
    base, mx = 0.025, None
    if "retry_back_off" in d:
        bo = w.check_keys(d["retry_back_off"], ("base_interval", "max_interval"),
                          w.join(path, "retry_back_off"))
        base = w.duration(bo, "base_interval", w.join(path, "retry_back_off"))
        mx = w.duration(bo, "max_interval", w.join(path, "retry_back_off"), None)
    previous_hosts = False
    for i, p in enumerate(w.seq(d, "retry_host_predicate", path, [])):
        pp = w.join(w.join(path, "retry_host_predicate"), i)
        if w.string(p, "name", pp) != "envoy.retry_host_predicates.previous_hosts":
            from sidecar.errors import ConfigError
            raise ConfigError(w.join(pp, "name"), "only envoy.retry_host_predicates.previous_hosts is supported")
        previous_hosts = True
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=w.integer(d, "num_retries", path, 1, lo=0, hi=100),
        per_try_timeout_s=w.duration(d, "per_try_timeout", path, 0.0),
        per_try_idle_timeout_s=w.duration(d, "per_try_idle_timeout", path, 0.0),
        retriable_status_codes=frozenset(codes),
        backoff_base_s=base,
        backoff_max_s=mx if mx is not None else base * 10,
        # Envoy retries any method; the previous-hosts predicate is opt-in there but we always
        # prefer an untried host (the issue asks for it), so this flag only records the config.
        retry_non_idempotent=True,
        retry_host_predicate_previous_hosts=previous_hosts or True,
        host_selection_retry_max_attempts=w.integer(d, "host_selection_retry_max_attempts", path, 3, lo=1),
        allow_override_headers=True,
    )


def retry_policy_from_native(d: dict, path: str) -> RetryPolicy:
    from sidecar import wire as w
    w.check_keys(d, ("retry_on", "retries", "per_try_timeout", "status_codes", "backoff",
                     "max_backoff", "retry_non_idempotent", "max_buffered_body",
                     "allow_override_headers"), path)
    base = w.duration(d, "backoff", path, 0.025)
    return RetryPolicy(
        retry_on=parse_retry_on(d.get("retry_on", "5xx,reset,connect-failure"), w.join(path, "retry_on")),
        num_retries=w.integer(d, "retries", path, 2, lo=0, hi=100),
        per_try_timeout_s=w.duration(d, "per_try_timeout", path, 0.0),
        retriable_status_codes=frozenset(w.seq(d, "status_codes", path, [])),
        backoff_base_s=base,
        backoff_max_s=w.duration(d, "max_backoff", path, base * 10),
        retry_non_idempotent=w.boolean(d, "retry_non_idempotent", path, False),
        max_buffered_body=w.integer(d, "max_buffered_body", path, 64 * 1024, lo=0),
        allow_override_headers=w.boolean(d, "allow_override_headers", path, False),
    )


# ---- retry arithmetic (pure functions: property-tested) -------------------------------------

def backoff_delay(attempt: int, base: float, cap: float, rand: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)].

    ``attempt`` counts retries from 0; ``rand`` is uniform in [0, 1).
    """
    if attempt < 0:
        attempt = 0
    ceiling = base * (2 ** min(attempt, 30))
    if ceiling > cap:
        ceiling = cap
    return ceiling * rand


def retry_allowed(active_retries: int, active_requests: int, max_retries: int,
                  budget_percent: float | None, min_retry_concurrency: int) -> bool:
    """May one more retry start now? Envoy: with a retry budget the limit is
    max(min_retry_concurrency, budget_percent% of active requests); otherwise max_retries."""
    if budget_percent is not None:
        limit = max(min_retry_concurrency, int(active_requests * budget_percent / 100.0))
        return active_retries < limit
    return active_retries < max_retries


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


def error_is_retriable(policy: RetryPolicy, flag: str, sent: bool) -> bool:
    """``flag``: UF connect failure, UC/UR reset, UT per-try timeout, UPE protocol error."""
    on = policy.retry_on
    if flag == "UF":
        return bool(on & {"connect-failure", "5xx", "gateway-error", "reset"})
    if flag in ("UC", "UR", "UPE"):
        return bool(on & {"reset", "5xx", "gateway-error"}) or (not sent and "reset-before-request" in on)
    if flag == "UT":   # a per-try timeout answers 504
        return bool(on & {"5xx", "gateway-error", "reset"})
    return False


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
