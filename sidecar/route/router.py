"""The router stage: the innermost part of every proxied route.

    header mutation + rewrites -> cluster choice -> shadow (fire and forget)
      -> route timeout (one deadline for all attempts)
        -> retries (policy, backoff, budget, previous-host avoidance)
          -> one attempt: breaker admission, pick endpoint, pooled connection, send,
             record outcome (EWMA, outlier detection, per-attempt metrics)

Timeouts are deadlines handed to the upstream connection (a timer on the loop), so the
common case costs no task or cancellation machinery.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from typing import Optional

from sidecar.route.stack import apply_request_mutation, apply_response_mutation
from sidecar.core.http import BodyStream, Request, Response, local_reply
from sidecar.config.model import HeaderMutation, RouteAction
from sidecar.cluster.breakers import (
    close_idle_elsewhere, connection_waiters, cx_overflow_counter, hook_pools,
)
from sidecar.route.retry import (
    IDEMPOTENT_METHODS, RetryPolicy, backoff_delay, error_is_retriable, request_overrides,
    retry_allowed, status_is_retriable,
)
from sidecar.upstream.http1 import HOP_BY_HOP, UpstreamError, UpstreamTimeout

_COUNTS = tuple(str(i) for i in range(102))   # x-envoy-attempt-count values, made once

# per-request control headers the router reads and never forwards (as Envoy's router)
ROUTER_CONSUMED = frozenset({"x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries",
                             "x-envoy-upstream-rq-per-try-timeout-ms",
                             "x-envoy-hedge-on-per-try-timeout",
                             "x-envoy-upstream-rq-timeout-alt-response",
                             "x-envoy-retriable-status-codes", "x-envoy-retriable-header-names"})
# request headers never copied upstream as they are: hop-by-hop ones, the framing we redo,
# Expect (answered locally) and the router's control headers (te: trailers is let through)
NOT_FORWARDED = HOP_BY_HOP | {"content-length", "expect"} | ROUTER_CONSUMED
RESET_BODY = "upstream connect error or disconnect/reset before headers. reset reason: "
_NO_BODY_STATUS = (204, 304)


def local_reply_for_error(ctx, e: UpstreamError) -> Response:
    flag = e.flag
    if flag == "UT":
        return local_reply(ctx, 504, "upstream request timeout", "UT")
    if flag == "UF":
        return local_reply(ctx, 503, RESET_BODY + "remote connection failure", "UF")
    if flag == "UPE":
        return local_reply(ctx, 502, RESET_BODY + "protocol error", "UPE")
    if flag == "UO":
        return local_reply(ctx, 503, RESET_BODY + "overflow", "UO")
    if flag == "UH":
        return local_reply(ctx, 503, "no healthy upstream", "UH")
    return local_reply(ctx, 503, RESET_BODY + "connection termination", flag or "UC")


def weighted_point(request_id: str, total: int) -> Optional[int]:
    """The weighted-cluster draw: stable for a request id (retries and replays of one request
    land on the same cluster); None when there is no id (then the draw is random)."""
    if not request_id:
        return None
    return zlib.crc32(request_id.encode()) % total


def request_hash(policies, req) -> Optional[int]:
    """Envoy's hash_policy: combine the values of the policies that apply (terminal stops)."""
    from sidecar.route.table import parse_cookies
    h = None
    for p in policies:
        v = None
        if p.header is not None:
            v = req.headers.get(p.header)
        elif p.cookie is not None:
            v = parse_cookies(req.headers.getall("cookie", ())).get(p.cookie)
        elif p.query_parameter is not None:
            from urllib.parse import parse_qs
            vals = parse_qs(req.query).get(p.query_parameter)
            v = vals[0] if vals else None
        elif p.source_ip and req.ctx.downstream_addr:
            v = req.ctx.downstream_addr[0]
        if v is None:
            continue
        x = zlib.crc32(v.encode("utf-8", "surrogateescape"))
        h = x if h is None else ((h * 31) ^ x) & 0xFFFFFFFF
        if p.terminal:
            break
    return h


class NoHealthyUpstream(UpstreamError):
    def __init__(self):
        super().__init__("UH", "no healthy upstream", sent=False)


class Overflow(UpstreamError):
    def __init__(self, what: str):
        super().__init__("UO", f"overflow: {what}", sent=False)


async def _connect(pool, deadline):
    """A new pooled connection: the cluster's connect timeout, cut short by the (per-try or
    route) deadline (UpstreamTimeout then)."""
    if deadline is None:
        return await pool.connect()
    try:
        async with asyncio.timeout_at(deadline):
            return await pool.connect()
    except TimeoutError:
        raise UpstreamTimeout() from None


class PendingTimeout(UpstreamTimeout):
    """The deadline passed while waiting for a connection slot (no host was tried)."""


class PrefixedStream:
    """A body stream with some chunks already read (by a retry buffer that hit its limit).

    Quacks like the BodyStream it wraps (``read``, ``at_eof``, iteration), so the listener
    can still tell whether the client finished sending."""

    __slots__ = ("prefix", "rest")

    def __init__(self, prefix: list[bytes], rest: BodyStream):
        self.prefix = prefix
        self.rest = rest

    @property
    def at_eof(self) -> bool:
        return not self.prefix and self.rest.at_eof

    async def read(self) -> bytes:
        if self.prefix:
            data = b"".join(self.prefix)
            self.prefix = []
            return data
        return await self.rest.read()

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        while True:
            chunk = await self.read()
            if not chunk:
                return
            yield chunk


class RouterStage:
    __slots__ = ("route", "action", "mutation", "clusters", "cluster", "weighted", "timeout",
                 "retry", "listener", "stats", "shadow", "prefix_len", "cluster_stats",
                 "host_rewrite", "regex_rewrite", "prefix_rewrite", "timeout_header",
                 "route_name", "cluster_header", "manager", "hash_policy", "attempt_header", "timeout_ms")

    def __init__(self, route, action: RouteAction, mutation: HeaderMutation, listener, runtime,
                 clusters, vhost_config):
        self.route = route
        self.action = action
        self.mutation = mutation
        self.manager = clusters
        self.listener = listener
        stats = runtime.stats
        self.cluster = clusters.get(action.cluster) if action.cluster else None
        self.cluster_stats = stats.cluster(action.cluster) if action.cluster else None
        self.cluster_header = action.cluster_header
        # weighted clusters: cumulative weights; a request's pick is stable for its request id
        cum = 0
        weighted = []
        for wc in action.weighted_clusters:
            cum += wc.weight
            weighted.append((cum, clusters.get(wc.name), wc.headers, stats.cluster(wc.name), wc.name))
        self.weighted = tuple(weighted)
        self.timeout = action.timeout_s
        self.timeout_ms = str(int(action.timeout_s * 1000))   # x-envoy-expected-rq-timeout-ms
        self.timeout_header = action.allow_timeout_header
        self.retry: Optional[RetryPolicy] = action.retry_policy or vhost_config.retry_policy
        self.attempt_header = vhost_config.include_attempt_count
        self.prefix_rewrite = action.prefix_rewrite
        self.prefix_len = len(route.config.match.prefix or route.config.match.path or "") \
            if action.prefix_rewrite is not None else 0
        self.regex_rewrite = action.regex_rewrite
        self.host_rewrite = action.host_rewrite
        self.hash_policy = action.hash_policy
        self.shadow = None
        if action.mirrors:
            from sidecar.route.shadow import Shadower
            self.shadow = Shadower(action.mirrors, clusters, runtime)
        self.stats = stats
        self.route_name = route.name

    # ---- the request -----------------------------------------------------------------------
    async def __call__(self, req: Request) -> Response:
        ctx = req.ctx
        headers = req.headers
        cs = self.cluster
        cstats = self.cluster_stats
        extra_mut = None
        if cs is None:
            if self.weighted:
                total = self.weighted[-1][0]
                point = weighted_point(ctx.request_id, total)
                if point is None:
                    point = random.getrandbits(32) % total
                for cum, state, wmut, wstats, name in self.weighted:
                    if point < cum:
                        cs, extra_mut, cstats = state, wmut, wstats
                        ctx.cluster = name
                        break
            elif self.cluster_header is not None:
                name = headers.get(self.cluster_header, "")
                cs = self.manager.get(name)
                cstats = self.stats.cluster(name) if cs is not None else None
                ctx.cluster = name
        else:
            ctx.cluster = cs.name
        if cs is None:
            # the cluster vanished (or a cluster_header named none): Envoy answers 503 NC
            return local_reply(ctx, 503, "", "NC")
        if not self.mutation.empty:
            apply_request_mutation(self.mutation, headers)
        if extra_mut is not None and not extra_mut.empty:
            apply_request_mutation(extra_mut, headers)
        path = req.path
        if self.prefix_rewrite is not None or self.regex_rewrite is not None:
            headers["x-envoy-original-path"] = req.url
        if self.prefix_rewrite is not None:
            path = self.prefix_rewrite + path[self.prefix_len:]
            if not path.startswith("/"):
                path = "/" + path
        elif self.regex_rewrite is not None:
            rx, sub = self.regex_rewrite
            path = rx.sub(sub, path)
        if self.host_rewrite is not None:
            headers["x-envoy-original-host"] = headers.get("host", "")
            headers["host"] = self.host_rewrite
        elif self.action.auto_host_rewrite:
            pass  # applied per attempt, once the endpoint is known

        timeout = self.timeout
        t = headers.get("x-envoy-upstream-rq-timeout-ms")
        if t is not None:
            # always consumed; honoured only where the route allows it (a client may shorten,
            # never lengthen, the route timeout)
            headers.popall("x-envoy-upstream-rq-timeout-ms")
            if self.timeout_header and t.isascii() and t.isdigit():
                t_s = int(t) / 1000.0
                if timeout <= 0 or 0 < t_s < timeout:
                    timeout = t_s
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + timeout if timeout > 0 else None
        ctx.deadline = deadline
        if timeout > 0 and not self.action.retry_policy:
            headers["x-envoy-expected-rq-timeout-ms"] = (
                self.timeout_ms if timeout == self.timeout else str(int(timeout * 1000)))

        if self.hash_policy:
            ctx.hash_key = request_hash(self.hash_policy, req)
        if self.shadow is not None:
            await self.shadow.mirror(req, path)

        policy = self.retry
        if policy is None:
            try:
                resp = await self.attempt(req, cs, cstats, path, deadline, None, loop)
            except UpstreamError as e:
                if e.flag == "UT":
                    cstats.rq_timeout.inc()
                return local_reply_for_error(ctx, e)
            if extra_mut is not None:
                apply_response_mutation(extra_mut, resp.headers)
            apply_response_mutation(self.mutation, resp.headers)
            return resp
        resp = await self.with_retries(req, cs, cstats, path, deadline, policy, loop)
        if extra_mut is not None:
            apply_response_mutation(extra_mut, resp.headers)
        apply_response_mutation(self.mutation, resp.headers)
        return resp

    async def with_retries(self, req, cs, cstats, path, deadline, policy: RetryPolicy, loop):
        """Attempts under one route deadline: retry_on, per-try timeout, full-jitter backoff,
        retry budget / max_retries, replay buffer limit, non-idempotent rule."""
        ctx = req.ctx
        headers = req.headers
        if policy.allow_override_headers:
            num_retries, on_policy, per_try = request_overrides(headers, policy)
        else:
            num_retries, on_policy, per_try = policy.num_retries, policy, policy.per_try_timeout_s
        # A body must be buffered to be replayed; past the limit it goes once, unretried.
        body = req.body
        limit = policy.max_buffered_body
        if isinstance(body, bytes):
            replayable = len(body) <= limit
        else:
            replayable = True
            prefix: list[bytes] = []
            size = 0
            try:
                while True:
                    chunk = await body.read()
                    if not chunk:
                        req.body = b"".join(prefix)
                        break
                    size += len(chunk)
                    prefix.append(chunk)
                    if size > limit:
                        req.body = PrefixedStream(prefix, body)
                        replayable = False
                        break
            except Exception:
                # the client went away (or broke framing) while sending its body
                return local_reply(ctx, 400, "downstream request body error", "DC")
        idempotent = policy.retry_non_idempotent or req.method in IDEMPOTENT_METHODS
        thresholds = cs.config.circuit_breakers.default
        budget = thresholds.retry_budget
        bp = budget.budget_percent if budget is not None else None
        mrc = budget.min_retry_concurrency if budget is not None else 0
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
                    pt = loop.time() + per_try
                    if try_deadline is None or pt < try_deadline:
                        try_deadline = pt
                if try_deadline is not None:
                    # Envoy: min(per-try timeout, what is left of the route timeout)
                    ms = int((try_deadline - loop.time()) * 1000 + 0.5)
                    headers["x-envoy-expected-rq-timeout-ms"] = str(ms if ms > 0 else 1)
                try:
                    resp = await self.attempt(req, cs, cstats, path, try_deadline, deadline, loop)
                    err = None
                except UpstreamError as e:
                    resp = None
                    err = e
                finally:
                    if holding:
                        holding = False
                        cs.active_retries -= 1
                # ---- decide -----------------------------------------------------------
                if err is None:
                    if not (status_is_retriable(on_policy, resp.status)
                            or ("envoy-ratelimited" in on_policy.retry_on
                                and "x-envoy-ratelimited" in resp.headers)):
                        if attempt:
                            cstats.rq_retry_success.inc()
                        return resp
                    can = idempotent
                else:
                    flag = err.flag
                    if flag == "UH" or flag == "UO":
                        return local_reply_for_error(ctx, err)
                    if flag == "UT":
                        if deadline is not None and (try_deadline == deadline or loop.time() >= deadline):
                            cstats.rq_timeout.inc()     # the route timeout: no time left
                            return local_reply_for_error(ctx, err)
                        cstats.rq_per_try_timeout.inc()
                    if not error_is_retriable(on_policy, flag, err.sent):
                        return local_reply_for_error(ctx, err)
                    # only a connect failure proves the upstream never saw the request
                    can = idempotent or flag == "UF"
                if not can or not replayable:
                    return resp if err is None else local_reply_for_error(ctx, err)
                if attempt >= num_retries:
                    if num_retries:
                        cstats.retry_limit_exceeded.inc()
                    return resp if err is None else local_reply_for_error(ctx, err)
                if not retry_allowed(cs.active_retries, cs.active_requests + cs.pending_requests,
                                     thresholds.max_retries, bp, mrc):
                    # the retry breaker / budget: answer with what we have (Envoy's behaviour)
                    cstats.rq_retry_overflow.inc()
                    return resp if err is None else local_reply_for_error(ctx, err)
                # the slot is held from now (through the backoff) until the retry completes,
                # so a storm of simultaneous failures cannot all pass the check at once
                cs.active_retries += 1
                holding = True
                if resp is not None:
                    resp.discard()          # release the discarded attempt's connection
                delay = backoff_delay(attempt, policy.backoff_base_s, policy.backoff_max_s,
                                      random.random())
                if deadline is not None and loop.time() + delay >= deadline:
                    cstats.rq_timeout.inc()
                    return local_reply(ctx, 504, "upstream request timeout", "UT")
                cstats.rq_retry.inc()
                attempt += 1
                if delay > 0:
                    await asyncio.sleep(delay)
        finally:
            if holding:
                cs.active_retries -= 1

    async def attempt(self, req: Request, cs, cstats, path: str, deadline, overall_deadline, loop):
        """One upstream attempt. Raises UpstreamError (with its response flag)."""
        ctx = req.ctx
        if ctx.attempts == 0:          # a route without retries: its only attempt (no
            ctx.attempts = 1           # x-envoy-attempt-count there: Envoy sends none either)
        host = cs.pick(ctx)
        if host is None:
            raise NoHealthyUpstream()
        thresholds = cs.config.circuit_breakers.default
        if cs.active_requests >= thresholds.max_requests:
            cs.overflow += 1
            cstats.rq_overflow.inc()
            raise Overflow("max_requests")
        ctx.tried_hosts.append(host)
        ctx.upstream_host = host.address
        span = ctx.span
        client_span = span.start_client(req, host, ctx.attempts) if span is not None else None
        try:
            resp = await self._attempt_on(req, cs, cstats, path, deadline, loop, host, thresholds)
        except UpstreamError as e:
            if client_span is not None:
                client_span.end(None, e.flag)
            raise
        if client_span is not None:
            client_span.end(resp.status, None)
        return resp

    async def _attempt_on(self, req, cs, cstats, path, deadline, loop, host, thresholds):
        ctx = req.ctx
        pool = host.pool
        conn = pool.take_idle()
        reused = conn is not None
        # counted from admission (synchronously after the max_requests check in attempt)
        cs.active_requests += 1
        host.active_requests += 1
        t0 = loop.time()
        ctx.upstream_start = t0
        try:
            if conn is None:
                if cs.open_connections() >= thresholds.max_connections:
                    conn = await self._wait_for_connection(cs, host, pool, deadline, loop)
                    reused = conn is not None
                if conn is None:
                    try:
                        conn = await _connect(pool, deadline)
                    except UpstreamTimeout:
                        raise
                    except UpstreamError:
                        cstats.cx_connect_fail.inc()
                        host.cx_connect_fail += 1
                        cs.record(host, None, loop.time() - t0, "connect_failure")
                        raise
                    cstats.cx_total.inc()
            head, chunked = self.serialize_head(req, path, host)
            body = req.body
            no_body = req.method == "HEAD"
            try:
                resp = await conn.request(head, body, chunked, no_body, deadline)
            except UpstreamError as e:
                if reused and not e.sent and isinstance(body, bytes) and e.flag == "UC":
                    # the server closed an idle keep-alive connection as we reused it:
                    # nothing was processed, so send once more on a fresh connection
                    conn = await _connect(pool, deadline)
                    cstats.cx_total.inc()
                    resp = await conn.request(head, body, chunked, no_body, deadline)
                else:
                    raise
        except UpstreamError as e:
            elapsed = loop.time() - t0
            if e.flag == "UT":
                if not isinstance(e, PendingTimeout):
                    host.rq_timeout += 1
                    cs.record(host, None, elapsed, "timeout")
            elif e.flag not in ("UF", "UO"):
                cstats.rq_reset.inc()
                cs.record(host, None, elapsed, "reset")
            raise
        finally:
            cs.active_requests -= 1
            host.active_requests -= 1
            if cs.pending_requests:
                # this attempt's connection went back to the pool or closed: a slot may be free
                w = cs.__dict__.get("conn_waiters")
                if w is not None:
                    w.wake()
        elapsed = loop.time() - t0
        ctx.upstream_duration = elapsed
        status = resp.status
        cstats.rq_by_class[min(max(status // 100, 1), 5) - 1].inc()
        cstats.latency.observe(elapsed)
        cs.record(host, status, elapsed, None)
        return resp

    async def _wait_for_connection(self, cs, host, pool, deadline, loop):
        """The cluster is at max_connections. Returns an idle pooled connection to ``host``, or
        None when a new connection may be opened; raises Overflow (503 UO) at once when
        max_pending_requests are already waiting, UpstreamTimeout when the deadline passes.

        Waiting parks on a future woken (``ConnectionPool.on_free``) when a connection is
        released or closed: the event loop is never blocked."""
        cx_overflow_counter(self.stats.metrics, cs.name).inc()
        if close_idle_elsewhere(cs, pool):
            return None
        t = cs.config.circuit_breakers.default
        if cs.pending_requests >= t.max_pending_requests:
            cs.overflow += 1
            self.stats.cluster(cs.name).rq_pending_overflow.inc()
            raise Overflow("max_pending_requests")
        waiters = connection_waiters(cs)
        hook_pools(cs, waiters)
        # while pending, the request counts as pending, not active (Envoy's accounting)
        cs.pending_requests += 1
        cs.active_requests -= 1
        host.active_requests -= 1
        front = False
        try:
            while True:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    raise PendingTimeout()
                await waiters.wait(loop, deadline, front)
                front = True
                conn = pool.take_idle()
                if conn is not None:
                    return conn
                if cs.open_connections() < cs.config.circuit_breakers.default.max_connections:
                    return None
                if close_idle_elsewhere(cs, pool):
                    return None
        finally:
            cs.pending_requests -= 1
            cs.active_requests += 1
            host.active_requests += 1
            if cs.pending_requests and cs.open_connections() < \
                    cs.config.circuit_breakers.default.max_connections:
                waiters.wake()      # pass on a slot this waiter did not use

    def serialize_head(self, req: Request, path: str, host) -> tuple[bytes, bool]:
        """Request line + headers for the upstream, with our own framing and no hop-by-hop
        headers (RFC 9110 7.6.1, plus those named in Connection)."""
        headers = req.headers
        conn_tokens = headers.get("connection")
        drop = NOT_FORWARDED
        if conn_tokens:
            drop = NOT_FORWARDED | {t.strip().lower() for t in conn_tokens.split(",")}
        url = path + "?" + req.query if req.query else path
        parts = [f"{req.method} {url} HTTP/1.1\r\n"]
        auto_host = self.action.auto_host_rewrite
        for k, v in headers.items():
            if k in drop:
                if k != "te" or v.lower() != "trailers":
                    continue
            if auto_host and k == "host":
                v = host.endpoint.hostname or host.endpoint.host
            parts.append(f"{k}: {v}\r\n")
        body = req.body
        chunked = False
        if isinstance(body, bytes):
            if req.chunked:
                # keep the client's framing, as Envoy does (the connection frames the bytes)
                parts.append("transfer-encoding: chunked\r\n")
                chunked = True
            elif body or req.method in ("POST", "PUT", "PATCH"):
                parts.append(f"content-length: {len(body)}\r\n")
        else:
            cl = headers.get("content-length")
            if cl is not None and isinstance(body, (BodyStream, PrefixedStream)):
                parts.append(f"content-length: {cl}\r\n")
            else:
                parts.append("transfer-encoding: chunked\r\n")
                chunked = True
        parts.append("\r\n")
        return "".join(parts).encode("latin-1"), chunked
