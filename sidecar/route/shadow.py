"""Request shadowing (Envoy's ``request_mirror_policies``, Istio's ``mirror``).

A route mirrors a share of its requests to other clusters, fire and forget:

* ``mirror()`` never waits on the network: it decides (percent, concurrency bound, body
  size), snapshots the request head and starts a task. The primary's response never waits
  for, and never fails because of, a shadow.
* The shadow copy has the same method, path (after rewrites), headers and body; its Host gets
  Envoy's ``-shadow`` suffix before the port (``foo.com`` -> ``foo.com-shadow``,
  ``foo.com:8080`` -> ``foo.com-shadow:8080``). Its response is read and thrown away.
* A body that is already complete (``bytes``) is shared as is. A streaming body is teed: the
  primary reads it as usual and the shadow gets a copy of the chunks as they pass, sent once
  the whole body has gone by. Past ``MAX_BODY_BYTES`` the copy is dropped and the shadow
  skipped (counted as ``body_too_large``); the primary never waits for the shadow's buffering.
* At most ``MAX_IN_FLIGHT`` shadow requests run at once per process; past that a shadow is
  skipped (``overflow``). Each has the route's remaining timeout (``DEFAULT_TIMEOUT_S`` when the
  route has none), capped at ``MAX_TIMEOUT_S``.
* The shadow cluster's load balancer, circuit breaker (``max_requests``), pools and outcome
  recording (EWMA, outlier detection) apply as for any request to that cluster.

Metrics: ``sidecar_shadow_requests_total{cluster,outcome}`` (outcome: 1xx..5xx for answered
shadows, ``timeout``, ``error``, ``overflow``, ``body_too_large``, ``no_upstream``),
``sidecar_shadow_rq_time_seconds{cluster}``, ``sidecar_shadow_active``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Optional

from sidecar.observability.stats import NULL
from sidecar.core.http import BodyStream
from sidecar.observability.metrics import STATUS_CLASSES
from sidecar.upstream.http1 import HOP_BY_HOP, UpstreamError

log = logging.getLogger("sidecar.shadow")

MAX_IN_FLIGHT = 100
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_TIMEOUT_S = 15.0
MAX_TIMEOUT_S = 60.0
MAX_DRAIN_BYTES = 4 * 1024 * 1024   # a larger shadow response closes its connection instead
_STATE_KEY = "sidecar.shadow"


def shadow_host(host: str) -> str:
    """Envoy's shadow authority: ``-shadow`` before the port, if any (IPv6 literals kept)."""
    if not host:
        return host
    port_start = host.rfind(":")
    if port_start != -1:
        v6_end = host.rfind("]")
        if v6_end == -1 or v6_end < port_start:
            return host[:port_start] + "-shadow" + host[port_start:]
    return host + "-shadow"


class _Shared:
    """Process-wide shadow state (survives config reloads): in-flight count and tasks."""

    __slots__ = ("in_flight", "tasks", "gauge", "metrics", "_counters", "_latency")

    def __init__(self, metrics) -> None:
        self.in_flight = 0
        self.tasks: set[asyncio.Task] = set()
        self.metrics = metrics
        self._counters = None
        self._latency = None
        self.gauge = None
        if metrics is not None and getattr(metrics, "enabled", False):
            self.gauge = metrics.gauge("sidecar_shadow_active", "Shadow requests in flight")
            self._counters = metrics.counter("sidecar_shadow_requests_total",
                                             "Shadow (mirrored) requests by outcome",
                                             ("cluster", "outcome"))
            self._latency = metrics.histogram("sidecar_shadow_rq_time_seconds",
                                              "Shadow request latency to response headers",
                                              ("cluster",))

    def stats_for(self, cluster: str) -> "_MirrorStats":
        return _MirrorStats(self, cluster)




class _MirrorStats:
    __slots__ = ("by_class", "timeout", "error", "overflow", "too_large", "no_upstream",
                 "latency")

    def __init__(self, shared: _Shared, cluster: str):
        c = shared._counters
        if c is None:
            self.by_class = (NULL,) * 5
            self.timeout = self.error = self.overflow = self.too_large = self.no_upstream = NULL
            self.latency = NULL
            return
        self.by_class = tuple(c.labels(cluster, s) for s in STATUS_CLASSES)
        self.timeout = c.labels(cluster, "timeout")
        self.error = c.labels(cluster, "error")
        self.overflow = c.labels(cluster, "overflow")
        self.too_large = c.labels(cluster, "body_too_large")
        self.no_upstream = c.labels(cluster, "no_upstream")
        self.latency = shared._latency.labels(cluster)


class _Mirror:
    __slots__ = ("cluster", "fraction", "stats")

    def __init__(self, cluster: str, percent: float, stats: _MirrorStats):
        self.cluster = cluster
        self.fraction = max(0.0, min(percent, 100.0)) / 100.0
        self.stats = stats


class _ShadowCtx:
    """The little a load balancer reads from a request context."""

    __slots__ = ("hash_key", "tried_hosts")

    def __init__(self, hash_key: Optional[int]):
        self.hash_key = hash_key
        self.tried_hosts: list = []


class TeeStream(BodyStream):
    """Wraps a request body stream: the primary reads through it unchanged while a copy (up to
    ``limit`` bytes) is kept; ``on_complete(data)`` runs when the end of the body goes by,
    ``on_too_large()`` once if the body outgrows the limit."""

    __slots__ = ("inner", "_parts", "_size", "_limit", "_on_complete", "_on_too_large", "_done")

    def __init__(self, inner: BodyStream, limit: int, on_complete, on_too_large):
        # the BodyStream machinery is not used: every read goes to ``inner``
        self.inner = inner
        self._parts: Optional[list[bytes]] = []
        self._size = 0
        self._limit = limit
        self._on_complete = on_complete
        self._on_too_large = on_too_large
        self._done = False

    @property
    def at_eof(self) -> bool:
        return self.inner.at_eof

    async def read(self) -> bytes:
        chunk = await self.inner.read()
        parts = self._parts
        if parts is None:
            return chunk
        if chunk:
            self._size += len(chunk)
            if self._size > self._limit:
                self._parts = None
                self._on_too_large()
            else:
                parts.append(chunk)
        elif not self._done:
            self._done = True
            self._parts = None
            self._on_complete(b"".join(parts))
        return chunk


class Shadower:
    """The mirrors of one route. Built with the route's router stage, once per snapshot."""

    __slots__ = ("mirrors", "clusters", "shared", "max_in_flight", "max_body", "default_timeout",
                 "max_timeout")

    def __init__(self, mirrors, clusters, runtime: Any):
        state = getattr(runtime, "state", None)
        shared = state.get(_STATE_KEY) if state is not None else None
        if shared is None:
            shared = _Shared(getattr(runtime, "metrics", None))
            if state is not None:
                state[_STATE_KEY] = shared
        self.shared: _Shared = shared
        self.clusters = clusters
        self.mirrors = tuple(_Mirror(m.cluster, m.percent, shared.stats_for(m.cluster))
                             for m in mirrors)
        self.max_in_flight = MAX_IN_FLIGHT
        self.max_body = MAX_BODY_BYTES
        self.default_timeout = DEFAULT_TIMEOUT_S
        self.max_timeout = MAX_TIMEOUT_S

    # ---- the request path (never awaits the network) ------------------------------------
    async def mirror(self, req, path: str) -> None:
        chosen = None
        for m in self.mirrors:
            if m.fraction < 1.0 and random.random() >= m.fraction:
                continue
            if chosen is None:
                chosen = [m]
            else:
                chosen.append(m)
        if chosen is None:
            return
        ctx = req.ctx
        head = _Head(req, path, ctx)
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = ctx.deadline
        if deadline is None:
            deadline = now + self.default_timeout
        elif deadline - now > self.max_timeout:
            deadline = now + self.max_timeout
        body = req.body
        if isinstance(body, bytes):
            for m in chosen:
                if len(body) > self.max_body:
                    m.stats.too_large.inc()
                    continue
                self._launch(m, head, body, deadline)
            return
        if not isinstance(body, BodyStream):
            # a body already partly consumed by someone else: nothing safe to copy
            for m in chosen:
                m.stats.too_large.inc()
            return

        def complete(data: bytes) -> None:
            for m in chosen:
                self._launch(m, head, data, deadline)

        def too_large() -> None:
            for m in chosen:
                m.stats.too_large.inc()

        req.body = TeeStream(body, self.max_body, complete, too_large)

    def _launch(self, m: _Mirror, head: "_Head", body: bytes, deadline: float) -> None:
        shared = self.shared
        if shared.in_flight >= self.max_in_flight:
            m.stats.overflow.inc()
            return
        cs = self.clusters.get(m.cluster)
        if cs is None:
            m.stats.no_upstream.inc()
            return
        span = None
        if head.span_parent is not None:
            from sidecar.observability.tracing import shadow_span
            try:
                span = shadow_span(head.span_parent, head.method, m.cluster, head.path)
            except Exception:          # tracing must never break a request
                span = None
        data = head.encode(body, span)
        shared.in_flight += 1
        if shared.gauge is not None:
            shared.gauge.inc()
        try:
            task = asyncio.get_running_loop().create_task(
                self._send(cs, m, head.method, data, body, head.hash_key, deadline, span))
        except Exception:
            shared.in_flight -= 1
            if shared.gauge is not None:
                shared.gauge.dec()
            raise
        shared.tasks.add(task)
        task.add_done_callback(shared.tasks.discard)

    # ---- the shadow request (its own task) ----------------------------------------------
    async def _send(self, cs, m: _Mirror, method: str, head: bytes, body: bytes, hash_key,
                    deadline: float, span) -> None:
        shared = self.shared
        status = None
        flag = None
        try:
            status, flag = await self._exchange(cs, m, method, head, body, hash_key, deadline, span)
        except asyncio.CancelledError:
            flag = "LR"
            raise
        finally:
            shared.in_flight -= 1
            if shared.gauge is not None:
                shared.gauge.dec()
            if span is not None:
                try:
                    span.end(status, flag)
                except Exception:
                    pass

    async def _exchange(self, cs, m: _Mirror, method: str, head: bytes, body: bytes, hash_key,
                        deadline: float, span) -> tuple[Optional[int], Optional[str]]:
        """One shadow exchange: (status or None, response flag or None)."""
        stats = m.stats
        loop = asyncio.get_running_loop()
        host = None
        conn = None
        counted = False
        t0 = loop.time()
        try:
            host = cs.pick(_ShadowCtx(hash_key))
            if host is None:
                stats.no_upstream.inc()
                return None, "UH"
            if span is not None:
                span.set_address(host)
            if cs.active_requests >= cs.config.circuit_breakers.default.max_requests:
                stats.overflow.inc()
                return None, "UO"
            cs.active_requests += 1
            host.active_requests += 1
            counted = True
            pool = host.pool
            conn = pool.take_idle()
            if conn is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    conn = await pool.connect()
            resp = await conn.request(head, body, False, method == "HEAD", deadline)
        except TimeoutError:
            stats.timeout.inc()
            if host is not None:
                cs.record(host, None, loop.time() - t0, "timeout")
            return None, "UT"
        except UpstreamError as e:
            if e.flag == "UT":
                stats.timeout.inc()
            else:
                stats.error.inc()
            if host is not None:
                err = {"UT": "timeout", "UF": "connect_failure"}.get(e.flag, "reset")
                cs.record(host, None, loop.time() - t0, err)
            return None, e.flag or "UC"
        except asyncio.CancelledError:
            if conn is not None:
                conn.close()
            stats.error.inc()
            raise
        except Exception as e:  # never let a shadow failure escape its task
            if conn is not None:
                conn.close()
            stats.error.inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("shadow to %s failed: %r", m.cluster, e)
            return None, "UC"
        finally:
            if counted:
                cs.active_requests -= 1
                host.active_requests -= 1
        elapsed = loop.time() - t0
        status = resp.status
        stats.by_class[min(max(status // 100, 1), 5) - 1].inc()
        stats.latency.observe(elapsed)
        cs.record(host, status, elapsed, None)
        rb = resp.body
        if isinstance(rb, BodyStream):
            # read and drop the body so the connection can go back to the pool
            size = 0
            try:
                while True:
                    chunk = await rb.read()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > MAX_DRAIN_BYTES:
                        resp.discard()
                        break
            except asyncio.CancelledError:
                resp.discard()
                raise
            except Exception:
                resp.discard()
        return status, None


class _Head:
    """The request head of the shadow copies, captured when ``mirror()`` runs (later header
    changes of the primary, such as the attempt count, do not leak in): request line and
    headers, minus framing and hop-by-hop headers, with the ``-shadow`` Host."""

    __slots__ = ("method", "path", "hash_key", "span_parent", "_lines", "_text")

    def __init__(self, req, path: str, ctx):
        headers = req.headers
        conn_tokens = headers.get("connection")
        drop = HOP_BY_HOP
        if conn_tokens:
            drop = HOP_BY_HOP | {t.strip().lower() for t in conn_tokens.split(",")}
        url = path + "?" + req.query if req.query else path
        lines = [("", f"{req.method} {url} HTTP/1.1\r\n")]
        saw_host = False
        for k, v in headers.items():
            if k in drop or k == "content-length" or k == "expect":
                continue
            if k == "host":
                if saw_host:
                    continue
                saw_host = True
                v = shadow_host(v)
            lines.append((k, f"{k}: {v}\r\n"))
        self.method = req.method
        self.path = path
        self.hash_key = ctx.hash_key
        self.span_parent = ctx if ctx.span is not None else None
        self._lines = lines
        self._text = "".join(line for _, line in lines)

    def encode(self, body: bytes, span) -> bytes:
        if span is None:
            text = self._text
        else:
            from sidecar.observability.tracing import TRACE_HEADERS
            text = "".join(line for k, line in self._lines if k not in TRACE_HEADERS)
            text += span.header_lines()
        if body or self.method in ("POST", "PUT", "PATCH"):
            text = f"{text}content-length: {len(body)}\r\n\r\n"
        else:
            text += "\r\n"
        return text.encode("latin-1")


def cancel_all(runtime) -> int:
    """Cancel the shadow requests still in flight (for process shutdown); returns how many."""
    state = getattr(runtime, "state", None)
    shared = state.get(_STATE_KEY) if state is not None else None
    if shared is None:
        return 0
    n = 0
    for t in list(shared.tasks):
        if not t.done():
            t.cancel()
            n += 1
    return n
