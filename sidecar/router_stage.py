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
import time
import zlib
from typing import Optional

from sidecar.chain import apply_request_mutation, apply_response_mutation
from sidecar.http import BodyStream, BodyTooLarge, Request, Response, local_reply
from sidecar.model import HeaderMutation, RouteAction
from sidecar.retry import (
    IDEMPOTENT_METHODS, RetryPolicy, backoff_delay, error_is_retriable, retry_allowed,
    status_is_retriable,
)
from sidecar.upstream import HOP_BY_HOP, UpstreamError, UpstreamTimeout

RESET_BODY = "upstream connect error or disconnect/reset before headers. reset reason: "
_NO_BODY_STATUS = (204, 304)


def local_reply_for_error(ctx, e: UpstreamError) -> Response:
    flag = e.flag
    if flag == "UT":
        return local_reply(ctx, 504, "upstream request timeout", "UT")
    if flag == "UF":
        return local_reply(ctx, 503, RESET_BODY + "connection failure", "UF")
    if flag == "UPE":
        return local_reply(ctx, 502, RESET_BODY + "protocol error", "UPE")
    if flag == "UO":
        return local_reply(ctx, 503, RESET_BODY + "overflow", "UO")
    if flag == "UH":
        return local_reply(ctx, 503, "no healthy upstream", "UH")
    return local_reply(ctx, 503, RESET_BODY + "connection termination", flag or "UC")


def request_hash(policies, req) -> Optional[int]:
    """Envoy's hash_policy: combine the values of the policies that apply (terminal stops)."""
    from sidecar.router import parse_cookies
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


class PrefixedStream:
    """A body stream with some chunks already read (by a retry buffer that hit its limit)."""

    __slots__ = ("prefix", "rest")

    def __init__(self, prefix: list[bytes], rest: BodyStream):
        self.prefix = prefix
        self.rest = rest

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        for c in self.prefix:
            yield c
        async for c in self.rest:
            yield c


class RouterStage:
    __slots__ = ("route", "action", "mutation", "clusters", "cluster", "weighted", "timeout",
                 "retry", "listener", "stats", "shadow", "prefix_len", "cluster_stats",
                 "host_rewrite", "regex_rewrite", "prefix_rewrite", "timeout_header",
                 "route_name", "cluster_header", "manager", "hash_policy")

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
        self.timeout_header = action.allow_timeout_header
        self.retry: Optional[RetryPolicy] = action.retry_policy or vhost_config.retry_policy
        self.prefix_rewrite = action.prefix_rewrite
        self.prefix_len = len(route.config.match.prefix or route.config.match.path or "") \
            if action.prefix_rewrite is not None else 0
        self.regex_rewrite = action.regex_rewrite
        self.host_rewrite = action.host_rewrite
        self.hash_policy = action.hash_policy
        self.shadow = None
        if action.mirrors:
            from sidecar.shadow import Shadower
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
                rid = ctx.request_id
                point = (zlib.crc32(rid.encode()) if rid else random.getrandbits(32)) % total
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
        if self.prefix_rewrite is not None:
            path = self.prefix_rewrite + path[self.prefix_len:]
            if not path.startswith("/"):
                path = "/" + path
        elif self.regex_rewrite is not None:
            rx, sub = self.regex_rewrite
            path = rx.sub(sub, path)
        if self.host_rewrite is not None:
            headers["host"] = self.host_rewrite
        elif self.action.auto_host_rewrite:
            pass  # applied per attempt, once the endpoint is known

        timeout = self.timeout
        if self.timeout_header:
            t = headers.get("x-envoy-upstream-rq-timeout-ms")
            if t is not None:
                headers.popall("x-envoy-upstream-rq-timeout-ms")
                if t.isdigit():
                    timeout = int(t) / 1000.0
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + timeout if timeout > 0 else None
        ctx.deadline = deadline
        if timeout > 0 and not self.action.retry_policy:
            headers["x-envoy-expected-rq-timeout-ms"] = str(int(timeout * 1000))

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
        ctx = req.ctx
        headers = req.headers
        num_retries = policy.num_retries
        retry_on_policy = policy
        if policy.allow_override_headers:
            v = headers.get("x-envoy-max-retries")
            if v is not None and v.isdigit():
                num_retries = int(v)
            v = headers.get("x-envoy-retry-on")
            if v:
                try:
                    from sidecar.retry import parse_retry_on
                    extra = parse_retry_on(v, "x-envoy-retry-on")
                    retry_on_policy = RetryPolicy(**{**{s: getattr(policy, s) for s in policy.__slots__},
                                                     "retry_on": policy.retry_on | extra})
                except Exception:
                    pass
        # A body must be buffered to be replayed; past the limit it goes once, unretried.
        replayable = True
        if not isinstance(req.body, bytes):
            prefix: list[bytes] = []
            size = 0
            stream = req.body
            while True:
                chunk = await stream.read()
                if not chunk:
                    req.body = b"".join(prefix)
                    break
                size += len(chunk)
                prefix.append(chunk)
                if size > policy.max_buffered_body:
                    req.body = PrefixedStream(prefix, stream)
                    replayable = False
                    break
        idempotent = req.method in IDEMPOTENT_METHODS or policy.retry_non_idempotent
        thresholds = cs.config.circuit_breakers.default
        budget = thresholds.retry_budget
        per_try = policy.per_try_timeout_s
        attempt = 0
        is_retry = False
        while True:
            headers["x-envoy-attempt-count"] = str(attempt + 1)
            ctx.attempts = attempt + 1
            try_deadline = deadline
            if per_try > 0:
                pt = loop.time() + per_try
                if try_deadline is None or pt < try_deadline:
                    try_deadline = pt
            if is_retry:
                cs.active_retries += 1
            try:
                resp = await self.attempt(req, cs, cstats, path, try_deadline, deadline, loop)
                err = None
            except UpstreamError as e:
                resp = None
                err = e
            finally:
                if is_retry:
                    cs.active_retries -= 1
            # decide
            if err is None:
                if not status_is_retriable(retry_on_policy, resp.status):
                    if is_retry:
                        cstats.rq_retry_success.inc()
                    return resp
                can = idempotent
            else:
                if err.flag in ("UH", "UO"):
                    return local_reply_for_error(ctx, err)
                overall_expired = deadline is not None and loop.time() >= deadline
                if err.flag == "UT" and overall_expired:
                    cstats.rq_timeout.inc()
                    return local_reply_for_error(ctx, err)
                if err.flag == "UT":
                    cstats.rq_per_try_timeout.inc()
                if not error_is_retriable(retry_on_policy, err.flag, err.sent):
                    return local_reply_for_error(ctx, err)
                # connect failures never reached the upstream: safe even for POST
                can = idempotent or err.flag == "UF" or not err.sent
            if not can or not replayable or attempt >= num_retries:
                if attempt >= num_retries and attempt > 0:
                    cstats.retry_limit_exceeded.inc()
                return resp if err is None else local_reply_for_error(ctx, err)
            bp = budget.budget_percent if budget is not None else None
            mrc = budget.min_retry_concurrency if budget is not None else 0
            if not retry_allowed(cs.active_retries, cs.active_requests, thresholds.max_retries, bp, mrc):
                cstats.rq_retry_overflow.inc()
                return resp if err is None else local_reply_for_error(ctx, err)
            if resp is not None:
                resp.discard()
            delay = backoff_delay(attempt, policy.backoff_base_s, policy.backoff_max_s, random.random())
            if deadline is not None and loop.time() + delay >= deadline:
                cstats.rq_timeout.inc()
                return local_reply(ctx, 504, "upstream request timeout", "UT")
            cstats.rq_retry.inc()
            attempt += 1
            is_retry = True
            if delay > 0:
                await asyncio.sleep(delay)

    async def attempt(self, req: Request, cs, cstats, path: str, deadline, overall_deadline, loop):
        """One upstream attempt. Raises UpstreamError (with its response flag)."""
        ctx = req.ctx
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
        cs.active_requests += 1
        host.active_requests += 1
        t0 = loop.time()
        ctx.upstream_start = t0
        try:
            if conn is None:
                if cs.open_connections() >= thresholds.max_connections:
                    if cs.pending_requests >= thresholds.max_pending_requests:
                        cs.overflow += 1
                        cstats.rq_pending_overflow.inc()
                        raise Overflow("max_pending_requests")
                    conn = await self._wait_for_connection(cs, host, pool, deadline, loop)
                    reused = conn is not None and conn.requests > 0
                if conn is None:
                    try:
                        conn = await pool.connect()
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
                    conn = await pool.connect()
                    resp = await conn.request(head, body, chunked, no_body, deadline)
                else:
                    raise
        except UpstreamError as e:
            elapsed = loop.time() - t0
            if e.flag == "UT":
                host.rq_timeout += 1
                cs.record(host, None, elapsed, "timeout")
            elif e.flag not in ("UF", "UO"):
                cstats.rq_reset.inc()
                cs.record(host, None, elapsed, "reset")
            raise
        finally:
            cs.active_requests -= 1
            host.active_requests -= 1
        elapsed = loop.time() - t0
        ctx.upstream_duration = elapsed
        status = resp.status
        cstats.rq_by_class[min(max(status // 100, 1), 5) - 1].inc()
        cstats.latency.observe(elapsed)
        cs.record(host, status, elapsed, None)
        return resp

    async def _wait_for_connection(self, cs, host, pool, deadline, loop):
        """At max_connections: wait (as a pending request) for a pooled connection."""
        cs.pending_requests += 1
        try:
            while True:
                await asyncio.sleep(0.001)
                conn = pool.take_idle()
                if conn is not None:
                    return conn
                if cs.open_connections() < cs.config.circuit_breakers.default.max_connections:
                    return None
                if deadline is not None and loop.time() >= deadline:
                    raise UpstreamTimeout()
        finally:
            cs.pending_requests -= 1

    def serialize_head(self, req: Request, path: str, host) -> tuple[bytes, bool]:
        """Request line + headers for the upstream, with our own framing and no hop-by-hop
        headers (RFC 9110 7.6.1, plus those named in Connection)."""
        headers = req.headers
        conn_tokens = headers.get("connection")
        drop = HOP_BY_HOP
        if conn_tokens:
            drop = HOP_BY_HOP | {t.strip().lower() for t in conn_tokens.split(",")}
        url = path + "?" + req.query if req.query else path
        parts = [f"{req.method} {url} HTTP/1.1\r\n"]
        auto_host = self.action.auto_host_rewrite
        for k, v in headers.items():
            if k in drop or k == "content-length" or k == "expect":
                continue
            if auto_host and k == "host":
                v = host.endpoint.hostname or host.endpoint.host
            parts.append(f"{k}: {v}\r\n")
        body = req.body
        chunked = False
        if isinstance(body, bytes):
            if body or req.method in ("POST", "PUT", "PATCH"):
                parts.append(f"content-length: {len(body)}\r\n")
        else:
            cl = headers.get("content-length")
            if cl is not None and isinstance(body, BodyStream):
                parts.append(f"content-length: {cl}\r\n")
            else:
                parts.append("transfer-encoding: chunked\r\n")
                chunked = True
        parts.append("\r\n")
        return "".join(parts).encode("latin-1"), chunked
