"""Retries, Envoy ``retry_policy`` semantics: the retry layer and its pure decisions.

``RetryLayer`` sits between the route timeout and the cluster: it replays a request (body
buffered up to a limit) on ``retry_on`` conditions, with a per-try timeout, full-jitter
backoff, the cluster's retry breaker or budget, and previous-host avoidance (the cluster's
balancer skips ``ctx.tried_hosts``). The decisions are pure functions, property-tested.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace

from sidecar.cluster.cluster import ClusterState
from sidecar.config.route import GRPC_RETRY_ON, RETRY_ON, RetryPolicy
from sidecar.core.backoff import backoff_delay
from sidecar.core.body import Headers, PrefixedStream
from sidecar.core.errors import RouteTimeout, UpstreamError
from sidecar.core.filter import Handler
from sidecar.core.message import Request, Response, local_reply
from sidecar.observability.stats import ClusterStats
from sidecar.route.timeout import Clock, bound_clock

# ---- decisions (pure functions: property-tested) --------------------------------------------

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


_GRPC_CODES: dict[frozenset[str], frozenset[str]] = {}


def grpc_codes(retry_on: frozenset[str]) -> frozenset[str]:
    """The gRPC status codes (as sent in ``grpc-status``) the conditions retry."""
    codes = _GRPC_CODES.get(retry_on)
    if codes is None:
        if len(_GRPC_CODES) > 256:
            _GRPC_CODES.clear()
        codes = _GRPC_CODES[retry_on] = frozenset(str(GRPC_RETRY_ON[t]) for t in retry_on
                                                  if t in GRPC_RETRY_ON)
    return codes


def grpc_is_retriable(policy: RetryPolicy, headers: Headers) -> bool:
    """Envoy's gRPC retry conditions look at ``grpc-status`` in the response *headers* only
    (a trailers-only answer): a status in trailers comes after the body started."""
    codes = grpc_codes(policy.retry_on)
    if not codes:
        return False
    v = headers.get("grpc-status")
    return v is not None and v in codes


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

OVERRIDE_HEADERS = ("x-envoy-max-retries", "x-envoy-retry-on", "x-envoy-retry-grpc-on",
                    "x-envoy-retriable-status-codes", "x-envoy-upstream-rq-per-try-timeout-ms")


def request_overrides(headers: Headers, policy: RetryPolicy) -> tuple[int, RetryPolicy, float]:
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
            policy = replace(policy, retry_on=policy.retry_on | extra)
    v = headers.get("x-envoy-retry-grpc-on")
    if v is not None:
        headers.popall("x-envoy-retry-grpc-on")
        extra = frozenset(t for t in (s.strip() for s in v.split(",")) if t in GRPC_RETRY_ON)
        if not extra <= policy.retry_on:
            policy = replace(policy, retry_on=policy.retry_on | extra)
    v = headers.get("x-envoy-retriable-status-codes")
    if v is not None:
        headers.popall("x-envoy-retriable-status-codes")
        codes = frozenset(int(c) for c in (x.strip() for x in v.split(","))
                          if c.isascii() and c.isdigit() and len(c) == 3 and 100 <= int(c) <= 599)
        if not codes <= policy.retriable_status_codes:
            policy = replace(policy, retriable_status_codes=policy.retriable_status_codes | codes)
    v = headers.get("x-envoy-upstream-rq-per-try-timeout-ms")
    if v is not None:
        headers.popall("x-envoy-upstream-rq-per-try-timeout-ms")
        v = v.strip()
        if v.isascii() and v.isdigit():
            per_try = int(v) / 1000.0
    return num_retries, policy, per_try


# ---- the layer ------------------------------------------------------------------------------

_COUNTS = tuple(str(i) for i in range(102))   # x-envoy-attempt-count values, made once

Sleep = Callable[[float], Awaitable[None]]


async def buffer_for_replay(req: Request, limit: int) -> bool:
    """Read the body into memory up to ``limit`` so it can be sent again; past the limit the
    body goes once, unretried (returns False). Raises what reading raised (client gone)."""
    body = req.body
    if isinstance(body, bytes):
        return len(body) <= limit
    prefix: list[bytes] = []
    size = 0
    while True:
        chunk = await body.read()
        if not chunk:
            req.body = b"".join(prefix)
            if body.trailers is not None:
                req.trailers = body.trailers
            return True
        size += len(chunk)
        prefix.append(chunk)
        if size > limit:
            req.body = PrefixedStream(prefix, body)
            return False


class RetryLayer:
    """Attempts under one route deadline (see the module docstring)."""

    __slots__ = ("next", "policy", "cluster", "stats", "attempt_header", "clock", "sleep", "rand",
                 "expected_header")

    def __init__(self, policy: RetryPolicy, next: Handler, cluster: ClusterState,
                 stats: ClusterStats, attempt_header: bool, clock: Clock | None = None,
                 sleep: Sleep = asyncio.sleep, rand: Callable[[], float] = random.random,
                 expected_header: bool = True):
        self.next = next
        self.expected_header = expected_header   # false: the router's suppress_envoy_headers
        self.policy = policy
        self.cluster = cluster
        self.stats = stats
        self.attempt_header = attempt_header
        self.clock = clock if clock is not None else bound_clock()
        self.sleep = sleep
        self.rand = rand

    async def __call__(self, req: Request) -> Response:
        if req.upgrade is not None:
            return await self.next(req)      # an upgrade (tunnel) is never retried
        ctx = req.ctx
        headers = req.headers
        policy = self.policy
        if policy.allow_override_headers:
            num_retries, on, per_try = request_overrides(headers, policy)
        else:
            num_retries, on, per_try = policy.num_retries, policy, policy.per_try_timeout_s
        try:
            replayable = await buffer_for_replay(req, policy.max_buffered_body)
        except Exception:
            # the client went away (or broke framing) while sending its body
            return local_reply(ctx, 400, "downstream request body error", "DC")
        idempotent = policy.retry_non_idempotent or req.method in IDEMPOTENT_METHODS
        deadline = ctx.deadline
        stats = self.stats
        clock = self.clock
        attempt = 0
        holding = False          # this request holds one of the cluster's retry slots
        try:
            while True:
                n = attempt + 1
                if self.attempt_header:
                    headers["x-envoy-attempt-count"] = _COUNTS[n] if n < 102 else str(n)
                ctx.attempts = n
                try_deadline = deadline
                if per_try > 0:
                    pt = clock() + per_try
                    if try_deadline is None or pt < try_deadline:
                        try_deadline = pt
                ctx.attempt_deadline = try_deadline
                if try_deadline is not None and self.expected_header:
                    # Envoy: min(per-try timeout, what is left of the route timeout)
                    ms = int((try_deadline - clock()) * 1000 + 0.5)
                    headers["x-envoy-expected-rq-timeout-ms"] = str(ms if ms > 0 else 1)
                resp: Response | None = None
                err: UpstreamError | None = None
                try:
                    resp = await self.next(req)
                except UpstreamError as e:
                    err = e
                finally:
                    if holding:
                        holding = False
                        self.cluster.breakers.release_retry()
                # ---- decide -------------------------------------------------------------
                if resp is not None:
                    if not (status_is_retriable(on, resp.status)
                            or ("envoy-ratelimited" in on.retry_on
                                and "x-envoy-ratelimited" in resp.headers)
                            or (ctx.grpc and grpc_is_retriable(on, resp.headers))):
                        if attempt:
                            stats.rq_retry_success.inc()
                        return resp
                    can = idempotent
                else:
                    assert err is not None
                    flag = err.flag
                    if flag in ("UH", "UO", "NC"):
                        raise err
                    if flag == "UT":
                        if isinstance(err, RouteTimeout):
                            raise err                          # no time left (counted)
                        if deadline is not None and (try_deadline == deadline
                                                     or clock() >= deadline):
                            stats.rq_timeout.inc()
                            raise RouteTimeout() from None
                        stats.rq_per_try_timeout.inc()
                    if not error_is_retriable(on, flag, err.sent):
                        raise err
                    # only a connect failure proves the upstream never saw the request
                    can = idempotent or flag == "UF"
                if not can or not replayable:
                    return self._give_up(resp, err)
                if attempt >= num_retries:
                    if num_retries:
                        stats.retry_limit_exceeded.inc()
                    return self._give_up(resp, err)
                current = self.cluster.current
                if current is None or not self.cluster.breakers.admit_retry(current.thresholds):
                    # the retry breaker / budget: answer with what we have (Envoy)
                    stats.rq_retry_overflow.inc()
                    return self._give_up(resp, err)
                # the slot is held from now (through the backoff) until the retry completes,
                # so a storm of simultaneous failures cannot all pass the check at once
                holding = True
                if resp is not None:
                    resp.discard()          # release the discarded attempt's connection
                delay = backoff_delay(attempt, policy.backoff_base_s, policy.backoff_max_s,
                                      self.rand())
                if deadline is not None and clock() + delay >= deadline:
                    stats.rq_timeout.inc()
                    raise RouteTimeout()
                stats.rq_retry.inc()
                attempt += 1
                if delay > 0:
                    await self.sleep(delay)
        finally:
            ctx.attempt_deadline = None
            if holding:
                self.cluster.breakers.release_retry()

    @staticmethod
    def _give_up(resp: Response | None, err: UpstreamError | None) -> Response:
        if resp is not None:
            return resp
        assert err is not None
        raise err
