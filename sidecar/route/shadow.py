"""Request shadowing (Envoy's ``request_mirror_policies``, Istio's ``mirror``).

A route mirrors a share of its requests to other clusters, fire and forget:

* The layer never waits on the network: it decides (percent, concurrency bound, body size),
  snapshots the request head and starts a task. The primary's response never waits for, and
  never fails because of, a shadow.
* The copy has the same method, path (after rewrites), headers and body; its Host gets Envoy's
  ``-shadow`` suffix before the port (``foo.com:8080`` -> ``foo.com-shadow:8080``). Its response
  is read and thrown away.
* A complete (``bytes``) body is shared as is. A streaming body is teed: the primary reads it as
  usual and the shadow gets a copy once the whole body has gone by; past ``MAX_BODY_BYTES`` the
  copy is dropped and the shadow skipped (``body_too_large``).
* At most ``MAX_IN_FLIGHT`` shadows run at once per process (``overflow`` past that). Each has
  the route's remaining timeout (``DEFAULT_TIMEOUT_S`` without one), capped at ``MAX_TIMEOUT_S``.
* The copy goes through the shadow cluster's own ``Cluster.send``: its balancer, breakers,
  pools, connect-failure accounting and outcome recording apply as to any request.
* The layer sits outside the retry layer: a request is mirrored once, not once per attempt.

Metrics: ``sidecar_shadow_requests_total{cluster,outcome}`` (1xx..5xx, ``timeout``, ``error``,
``overflow``, ``body_too_large``, ``no_upstream``), ``sidecar_shadow_rq_time_seconds{cluster}``,
``sidecar_shadow_active``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Protocol

from multidict import MultiDict

from sidecar.codec.headers import HOP_BY_HOP, connection_drop
from sidecar.config.route import MirrorPolicy
from sidecar.core.body import BodySource, Headers
from sidecar.core.context import RequestContext
from sidecar.core.errors import UpstreamError
from sidecar.core.filter import Handler
from sidecar.core.message import Request, Response
from sidecar.core.metrics import NULL, CounterChild, GaugeChild, HistogramChild
from sidecar.observability.metrics import STATUS_CLASSES, Metrics
from sidecar.observability.tracing import TRACE_HEADERS, ServerSpan, ShadowParent

log = logging.getLogger("sidecar.shadow")

MAX_IN_FLIGHT = 100
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_TIMEOUT_S = 15.0
MAX_TIMEOUT_S = 60.0
MAX_DRAIN_BYTES = 4 * 1024 * 1024   # a larger shadow response closes its connection instead
_SKIP_HEADERS = HOP_BY_HOP | {"content-length", "expect"}


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


class ShadowState:
    """Process-wide (survives config reloads): shadows in flight, their tasks, metrics."""

    __slots__ = ("in_flight", "tasks", "gauge", "_counters", "_latency", "max_in_flight",
                 "max_body", "default_timeout", "max_timeout")

    def __init__(self, metrics: Metrics) -> None:
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.max_in_flight = MAX_IN_FLIGHT
        self.max_body = MAX_BODY_BYTES
        self.default_timeout = DEFAULT_TIMEOUT_S
        self.max_timeout = MAX_TIMEOUT_S
        self._counters = None
        self._latency = None
        self.gauge: GaugeChild = NULL
        if metrics.enabled:
            self.gauge = metrics.gauge("sidecar_shadow_active", "Shadow requests in flight")
            self._counters = metrics.counter("sidecar_shadow_requests_total",
                                             "Shadow (mirrored) requests by outcome",
                                             ("cluster", "outcome"))
            self._latency = metrics.histogram("sidecar_shadow_rq_time_seconds",
                                              "Shadow request latency to response headers",
                                              ("cluster",))

    def stats_for(self, cluster: str) -> MirrorStats:
        return MirrorStats(self._counters, self._latency, cluster)

    def cancel_all(self) -> int:
        """Cancel the shadows still in flight (process shutdown); returns how many."""
        n = 0
        for t in list(self.tasks):
            if not t.done():
                t.cancel()
                n += 1
        return n


class MirrorStats:
    __slots__ = ("by_class", "timeout", "error", "overflow", "too_large", "no_upstream",
                 "latency")

    def __init__(self, counters: object, latency: object, cluster: str):
        self.by_class: tuple[CounterChild, ...] = (NULL,) * 5
        self.timeout: CounterChild = NULL
        self.error: CounterChild = NULL
        self.overflow: CounterChild = NULL
        self.too_large: CounterChild = NULL
        self.no_upstream: CounterChild = NULL
        self.latency: HistogramChild = NULL
        if counters is None or latency is None:
            return
        c = counters
        self.by_class = tuple(c.labels(cluster, s) for s in STATUS_CLASSES)  # type: ignore[attr-defined]
        self.timeout = c.labels(cluster, "timeout")                          # type: ignore[attr-defined]
        self.error = c.labels(cluster, "error")                              # type: ignore[attr-defined]
        self.overflow = c.labels(cluster, "overflow")                        # type: ignore[attr-defined]
        self.too_large = c.labels(cluster, "body_too_large")                 # type: ignore[attr-defined]
        self.no_upstream = c.labels(cluster, "no_upstream")                  # type: ignore[attr-defined]
        self.latency = latency.labels(cluster)                               # type: ignore[attr-defined]


class MirrorCluster(Protocol):
    """What a mirror sends to: a cluster by name (``ClusterState``)."""

    @property
    def name(self) -> str: ...

    @property
    def current(self) -> object | None: ...

    async def send(self, req: Request, auto_host: bool = False) -> Response: ...


class Mirror:
    __slots__ = ("cluster", "fraction", "stats")

    def __init__(self, cluster: MirrorCluster, percent: float, stats: MirrorStats):
        self.cluster = cluster
        self.fraction = max(0.0, min(percent, 100.0)) / 100.0
        self.stats = stats


class TeeStream(BodySource):
    """The primary reads through it unchanged while a copy (up to ``limit`` bytes) is kept;
    ``on_complete(data)`` runs when the end of the body goes by, ``on_too_large()`` once if
    the body outgrows the limit."""

    __slots__ = ("inner", "_parts", "_size", "_limit", "_on_complete", "_on_too_large", "_done")

    def __init__(self, inner: BodySource, limit: int, on_complete: Callable[[bytes], None],
                 on_too_large: Callable[[], None]):
        super().__init__()
        self.inner = inner
        self._parts: list[bytes] | None = []
        self._size = 0
        self._limit = limit
        self._on_complete = on_complete
        self._on_too_large = on_too_large
        self._done = False

    @property
    def total(self) -> int:
        return self.inner.total

    @property
    def at_eof(self) -> bool:
        return self.inner.at_eof

    async def read(self) -> bytes:
        chunk = await self.inner.read()
        if not chunk:
            self.trailers = self.inner.trailers
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


class ShadowHead:
    """The head of the shadow copies, captured when the layer runs (later changes of the
    primary's headers, such as the attempt count, do not leak in)."""

    __slots__ = ("method", "path", "query", "headers", "hash_key", "span_parent")

    def __init__(self, req: Request):
        headers = req.headers
        drop = connection_drop(_SKIP_HEADERS, headers.get("connection"))
        parent = req.ctx.span
        if parent is not None:
            drop = drop | TRACE_HEADERS        # the shadow's own span names itself upstream
        out: Headers = MultiDict()
        saw_host = False
        for k, v in headers.items():
            if k in drop:
                continue
            if k == "host":
                if saw_host:
                    continue
                saw_host = True
                v = shadow_host(v)
            out.add(k, v)
        self.method = req.method
        self.path = req.path
        self.query = req.query
        self.headers = out
        self.hash_key = req.ctx.hash_key
        self.span_parent = parent if isinstance(parent, ServerSpan) else None

    def request(self, body: bytes, deadline: float, cluster: str, listener: str) -> Request:
        ctx = RequestContext(listener, None, 0.0)
        ctx.hash_key = self.hash_key
        ctx.deadline = deadline
        ctx.cluster = cluster
        if self.span_parent is not None:
            ctx.span = ShadowParent(self.span_parent, cluster)
        req = Request(self.method, self.path, self.query, self.headers.copy(), body, ctx)
        return req


class ShadowLayer:
    """The mirrors of one route (see the module docstring)."""

    __slots__ = ("next", "mirrors", "shared")

    def __init__(self, mirrors: tuple[tuple[MirrorPolicy, MirrorCluster], ...], next: Handler,
                 shared: ShadowState):
        self.next = next
        self.shared = shared
        self.mirrors = tuple(Mirror(state, m.percent, shared.stats_for(m.cluster))
                             for m, state in mirrors)

    async def __call__(self, req: Request) -> Response:
        if req.upgrade is not None:
            return await self.next(req)      # a tunnel is not mirrored (nor is it by Envoy)
        chosen: list[Mirror] | None = None
        for m in self.mirrors:
            if m.fraction < 1.0 and random.random() >= m.fraction:
                continue
            if chosen is None:
                chosen = [m]
            else:
                chosen.append(m)
        if chosen is not None:
            self._mirror(req, chosen)
        return await self.next(req)

    def _mirror(self, req: Request, chosen: list[Mirror]) -> None:
        shared = self.shared
        head = ShadowHead(req)
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = req.ctx.deadline
        if deadline is None:
            deadline = now + shared.default_timeout
        elif deadline - now > shared.max_timeout:
            deadline = now + shared.max_timeout
        listener = req.ctx.listener_name
        body = req.body
        if isinstance(body, bytes):
            for m in chosen:
                if len(body) > shared.max_body:
                    m.stats.too_large.inc()
                else:
                    self._launch(m, head, body, deadline, listener)
            return

        def complete(data: bytes) -> None:
            for m in chosen:
                self._launch(m, head, data, deadline, listener)

        def too_large() -> None:
            for m in chosen:
                m.stats.too_large.inc()

        req.body = TeeStream(body, shared.max_body, complete, too_large)

    def _launch(self, m: Mirror, head: ShadowHead, body: bytes, deadline: float,
                listener: str) -> None:
        shared = self.shared
        if shared.in_flight >= shared.max_in_flight:
            m.stats.overflow.inc()
            return
        if m.cluster.current is None:
            m.stats.no_upstream.inc()
            return
        req = head.request(body, deadline, m.cluster.name, listener)
        shared.in_flight += 1
        shared.gauge.inc()
        task = asyncio.get_running_loop().create_task(self._send(m, req))
        shared.tasks.add(task)
        task.add_done_callback(shared.tasks.discard)

    async def _send(self, m: Mirror, req: Request) -> None:
        shared = self.shared
        stats = m.stats
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            resp = await m.cluster.send(req)
        except UpstreamError as e:
            if e.flag == "UT":
                stats.timeout.inc()
            elif e.flag in ("UH", "NC"):
                stats.no_upstream.inc()
            elif e.flag == "UO":
                stats.overflow.inc()
            else:
                stats.error.inc()
            return
        except Exception as e:         # never let a shadow failure escape its task
            stats.error.inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("shadow to %s failed: %r", m.cluster.name, e)
            return
        finally:
            shared.in_flight -= 1
            shared.gauge.dec()
        stats.by_class[min(max(resp.status // 100, 1), 5) - 1].inc()
        stats.latency.observe(loop.time() - t0)
        rb = resp.body
        if isinstance(rb, bytes):
            return
        size = 0                      # read and drop the body so the connection is reused
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
