"""A cluster: ``Cluster.send`` is admission -> pick -> pooled send -> record.

``ClusterState`` is what a cluster name keeps for the life of the process (breaker counters,
endpoint states with their pools, outlier detector, health checker, metric children). A
``Cluster`` is one version of that cluster's config and endpoint set; the manager builds a new
one aside on every change and swaps ``ClusterState.current``. Requests already admitted finish
on the version they started with; counters live in the state, so their releases land in the
same place.

Every caller (route stacks, shadowing, filters calling a service, health checks) goes through
the cluster: it is the only writer of cluster and endpoint counters.

Breaker gauges, requests in flight per endpoint and the health board (active-check verdicts,
ejections) live in ``sidecar.shared`` so that with several workers they are the sidecar's: a
worker re-reads its endpoints' verdicts when the board's epoch moves (one read per pick).

Why over 600 lines: being the only writer is the point of this module, so every path that
touches cluster or endpoint counters lives here side by side (``send`` for HTTP/1.1, HTTP/2
and tunnels, ``connect`` for TCP proxying, original-destination hosts, ``record`` and
``set_health``); the mechanics they call (pools, breakers, balancers, outlier detection,
health checks) are in their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from sidecar.cluster.balancers import make_balancer
from sidecar.cluster.balancers.base import LoadBalancer
from sidecar.cluster.breakers import BreakerState
from sidecar.cluster.endpoint import EndpointState
from sidecar.config.cluster import Cluster as ClusterConfig
from sidecar.config.cluster import Endpoint
from sidecar.core.connection import ConnectionContext
from sidecar.core.context import RequestContext
from sidecar.core.errors import (
    ConnectFailure,
    NoCluster,
    NoHealthyUpstream,
    Overflow,
    PendingTimeout,
    RouteTimeout,
    UpstreamError,
    UpstreamTimeout,
)
from sidecar.core.message import Request, Response
from sidecar.observability.stats import ClusterStats
from sidecar.shared.api import SharedState
from sidecar.shared.local import LocalState
from sidecar.upstream.http1 import ConnectionPool, UpstreamConnection
from sidecar.upstream.tunnel import open_tunnel

if TYPE_CHECKING:
    # The HTTP/2 upstream (ngh2, libnghttp2) is loaded only for clusters that speak HTTP/2.
    from sidecar.upstream.http2 import Http2UpstreamConnection
    from sidecar.upstream.http2_pool import Http2Pool

log = logging.getLogger("sidecar.cluster")

P = TypeVar("P", bound=asyncio.BaseProtocol)
C = TypeVar("C", covariant=True)


class _Connects(Protocol[C]):
    """A pool that opens connections (HTTP/1.1 and HTTP/2 pools alike)."""

    async def connect(self) -> C: ...

# outcome kinds of a local failure (fed to outlier detection and the EWMA)
CONNECT_FAILURE, TIMEOUT, RESET = "connect_failure", "timeout", "reset"


class OutcomeObserver(Protocol):
    """Told the outcome of every attempt (outlier detection implements it). A protocol, not a
    base class: this module is compiled (mypyc), and an interpreted class cannot subclass a
    compiled one."""

    def on_outcome(self, host: EndpointState, status: int | None, latency: float,
                   local_error: str | None) -> None: ...

    def close(self) -> None: ...


class ClusterState:
    """Everything a cluster name keeps across config versions; ``current`` is the version
    requests go to (None once the cluster is removed: requests then get 503 NC)."""

    __slots__ = ("name", "current", "breakers", "endpoints", "stats", "outlier", "health",
                 "removed", "shared", "__weakref__")

    def __init__(self, name: str, stats: ClusterStats, shared: SharedState | None = None):
        self.name = name
        self.current: Cluster | None = None
        self.shared: SharedState = shared if shared is not None else LocalState()
        self.breakers = BreakerState(self.shared.breaker(name), self.shared.workers)
        self.endpoints: dict[str, EndpointState] = {}     # address -> state, current version
        self.stats = stats
        self.outlier: OutcomeObserver | None = None
        self.health: object | None = None                 # the cluster's HealthChecker
        self.removed = False

    async def send(self, req: Request, auto_host: bool = False) -> Response:
        c = self.current
        if c is None:
            raise NoCluster(self.name)
        return await c.send(req, auto_host)


class Cluster:
    """One version of a cluster: config, endpoint set, load balancer, TLS context."""

    __slots__ = ("name", "config", "state", "hosts", "lb", "ssl_context", "ssl_context_h2",
                 "thresholds", "stats", "warm", "_sni", "protocol", "_epoch", "_epoch_seen",
                 "_uneject_timer", "_original_dst", "_h1", "_max_requests", "_lb_record", "_loop")

    def __init__(self, config: ClusterConfig, state: ClusterState,
                 endpoints: tuple[Endpoint, ...], ssl_context: ssl.SSLContext | None,
                 warm: bool = True, ssl_context_h2: ssl.SSLContext | None = None):
        self.name = config.name
        self.config = config
        self.state = state
        self.protocol = config.protocol       # http1 | http2 | downstream
        self.ssl_context = ssl_context        # HTTP/1.1 connections (ALPN http/1.1)
        self.ssl_context_h2 = ssl_context_h2  # HTTP/2 connections (ALPN h2)
        self.thresholds = config.circuit_breakers.default
        self.stats = state.stats
        self.warm = warm              # an EDS cluster is warm once its first assignment came
        self._sni = config.tls.sni if config.tls is not None else ""
        self._epoch = state.shared.health_epoch
        self._epoch_seen = -1            # the first pick reads the board
        self._uneject_timer: asyncio.TimerHandle | None = None
        self.hosts: list[EndpointState] = [self._endpoint_state(ep) for ep in endpoints]
        self.lb = make_balancer(config.lb)
        # fixed by config, read per request
        self._original_dst = config.type == "original_dst"
        self._h1 = config.protocol == "http1"      # every request on the HTTP/1.1 pool
        self._max_requests = self.thresholds.max_requests
        # only latency-aware balancers learn from outcomes: the others cost no call
        self._lb_record = self.lb.record \
            if type(self.lb).record is not LoadBalancer.record else None
        # the loop requests run on, kept: on Python 3.11 ``asyncio.get_running_loop()`` is a
        # getpid() system call each time (its fork check)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.rebuild()

    def _endpoint_state(self, ep: Endpoint) -> EndpointState:
        """The state kept for this address (with its pool), or a new one."""
        cfg = self.config
        st = self.state.endpoints.get(ep.address)
        if st is None or st.removed:
            pool = ConnectionPool(ep.host, ep.port, cfg.connect_timeout_s,
                                  cfg.max_idle_connections, cfg.idle_timeout_s,
                                  cfg.per_connection_buffer_limit, self.ssl_context, self._sni,
                                  cfg.max_response_headers_count,
                                  cfg.max_response_headers_kb * 1024)
            st = EndpointState(ep, pool, self.state.shared.endpoint(self.name, ep.address),
                               cfg.lb.ewma_default_rtt_s)
        elif st.endpoint != ep:
            st.endpoint = ep            # a weight or hostname change keeps the state
        if st.h2 is None and cfg.protocol != "http1":
            from sidecar.upstream.http2_pool import Http2Pool  # lazy: only when a cluster speaks HTTP/2
            st.h2 = Http2Pool(ep.host, ep.port, cfg.connect_timeout_s, cfg.http2,
                              self.ssl_context_h2, self._sni, cfg.idle_timeout_s,
                              cfg.max_response_headers_count, cfg.max_response_headers_kb * 1024)
        return st

    def activate(self) -> None:
        """Make this version the one requests go to (called by the manager, on the loop)."""
        state = self.state
        cfg = self.config
        new = {h.address: h for h in self.hosts}
        for addr, old in state.endpoints.items():
            if addr not in new:
                old.removed = True
                old.close_pools()
                state.shared.forget(self.name, addr)
        waiters = state.breakers.waiters
        for h in self.hosts:
            p = h.pool
            p.connect_timeout = cfg.connect_timeout_s
            p.max_idle = cfg.max_idle_connections
            p.idle_timeout = cfg.idle_timeout_s
            p.max_headers_count = cfg.max_response_headers_count
            p.max_header_bytes = cfg.max_response_headers_kb * 1024
            p.on_free = waiters.wake
            p.local_addr = (cfg.bind_address, 0) if cfg.bind_address else None
            if p.ssl is not self.ssl_context:
                p.ssl = self.ssl_context        # new TLS settings need new connections
                p.server_hostname = self._sni
                p.close_all()
            h2 = h.h2
            if h2 is not None:
                h2.connect_timeout = cfg.connect_timeout_s
                h2.idle_timeout = cfg.idle_timeout_s
                h2.max_headers_count = p.max_headers_count
                h2.max_header_bytes = p.max_header_bytes
                h2.on_free = waiters.wake
                h2.local_addr = p.local_addr
                if h2.ssl is not self.ssl_context_h2 or h2.options != cfg.http2:
                    h2.ssl = self.ssl_context_h2     # new settings: new connections
                    h2.server_hostname = self._sni
                    h2.options = cfg.http2
                    h2.close_all()
        state.endpoints = new
        state.current = self

    # ---- eligibility and picking -----------------------------------------------------------
    def rebuild(self) -> None:
        """Recompute the eligible set after a health, ejection or endpoint change."""
        hosts = self.hosts
        avail = [h for h in hosts if h.available]
        if hosts and len(avail) * 100.0 < len(hosts) * self.config.lb.panic_threshold:
            avail = list(hosts)      # panic: too few healthy hosts, use them all (Envoy)
        self.lb.rebuild(avail)

    def sync_health(self) -> None:
        """The board moved (a verdict or an ejection, from any worker): take every endpoint's
        state from it, rebuild the eligible set, and come back when the next ejection ends."""
        self._epoch_seen = self._epoch()
        for h in self.hosts:
            h.sync()
        self.rebuild()
        now = time.monotonic()
        ends = [h.ejected_until for h in self.hosts if h.ejected_until > now]
        if self._uneject_timer is not None:
            self._uneject_timer.cancel()
            self._uneject_timer = None
        if ends:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._uneject_timer = loop.call_later(min(ends) - now + 0.001, self._ejection_ended)

    def _ejection_ended(self) -> None:
        self._uneject_timer = None
        if self.state.current is self:
            self.sync_health()

    def refresh_health(self) -> None:
        if self._epoch() != self._epoch_seen:
            self.sync_health()

    def pick(self, ctx: RequestContext | ConnectionContext | None) -> EndpointState | None:
        if self._original_dst:
            return self._original_dst_host(ctx) if isinstance(ctx, ConnectionContext) else None
        if self._epoch() != self._epoch_seen:
            self.sync_health()
        tried = ctx.tried_hosts if ctx is not None else ()
        h = self.lb.pick(ctx, tried)
        if h is not None and h.ejected_until and not h.available:
            self.rebuild()           # an ejection started or expired since the last rebuild
            h = self.lb.pick(ctx, tried)
        return h

    def open_connections(self) -> int:
        """Open (and opening) connections of the cluster, every worker's (each publishes its
        own share when it checks, connects, and every second): HTTP/1.1, HTTP/2 and TCP proxy
        connections."""
        n = 0
        for h in self.hosts:
            n += h.pool.active + h.pool.connecting + h.cx_active + h.cx_connecting
            if h.h2 is not None:
                n += h.h2.active + h.h2.connecting
        return self.state.breakers.open_connections(n)

    # ---- the request --------------------------------------------------------------------------
    async def send(self, req: Request, auto_host: bool = False) -> Response:
        """One attempt. Raises ``UpstreamError`` (with its response flag) on failure.

        The common case (HTTP/1.1, an idle pooled connection) runs straight through here;
        everything else (a new or awaited connection, HTTP/2, a tunnel) is ``_exchange``."""
        ctx = req.ctx
        if ctx.attempts == 0:
            ctx.attempts = 1
        host = self.pick(ctx)
        if host is None:
            raise NoHealthyUpstream()
        breakers = self.state.breakers
        # admission: the cluster's max_requests and the host's in-flight count, one call
        if not breakers.admit(self._max_requests, host.counters):
            breakers.overflow += 1
            self.stats.rq_overflow.inc()
            raise Overflow("max_requests")
        ctx.tried_hosts.append(host)
        ctx.upstream_host = host.address
        span = ctx.span
        client_span = span.start_client(req, host, ctx.attempts) if span is not None else None
        loop = self._loop
        if loop is None or not loop.is_running():    # a worker runs one loop (tests, several)
            loop = self._loop = asyncio.get_running_loop()
        t0 = loop.time()
        ctx.upstream_start = t0
        deadline = ctx.attempt_deadline if ctx.attempt_deadline is not None else ctx.deadline
        host_header = (host.endpoint.hostname or host.endpoint.host) if auto_host else None
        conn = host.pool.take_idle() if self._h1 and req.upgrade is None else None
        # HTTP/2 with a free stream slot: straight through too (``_exchange_h2`` without the
        # two coroutine frames)
        h2 = host.h2 if conn is None and req.upgrade is None else None
        stream = h2.acquire() if h2 is not None and (
            self.protocol == "http2" or req.version == "2") else None
        try:
            if conn is not None:
                try:
                    resp = await conn.send(req, host_header, deadline)
                except UpstreamError as e:
                    resp = await self._idle_send_failed(req, host, e, host_header, deadline,
                                                        loop, t0)
            elif stream is not None:
                try:
                    resp = await stream.send(req, host_header if host_header is not None
                                             else req.headers.get("host", ""), deadline)
                except UpstreamError as e:
                    self._exchange_failed(host, e, loop.time() - t0)
                    raise
            else:
                resp = await self._exchange(req, host, host_header, deadline, loop, t0)
        except UpstreamError as e:
            if client_span is not None:
                client_span.end(None, e.flag)
            if e.flag == "UT" and not isinstance(e, RouteTimeout) and ctx.deadline is not None \
                    and loop.time() >= ctx.deadline:
                # the route's deadline (not a per-try one) ended the request
                self.stats.rq_timeout.inc()
                raise RouteTimeout() from None
            raise
        finally:
            breakers.release(host.counters)
            if breakers.waiters.queue:
                breakers.waiters.wake()      # this attempt's connection may have been freed
        elapsed = loop.time() - t0
        ctx.upstream_duration = elapsed
        status = resp.status
        ctx.upstream_status = status
        stats = self.stats
        if stats.enabled:
            stats.rq_by_class[min(max(status // 100, 1), 5) - 1].inc()
            stats.rq_code(status).inc()
            stats.latency.observe(elapsed)
        self.record(host, status, elapsed, None)
        if client_span is not None:
            client_span.end(status, None)
        return resp

    async def _exchange(self, req: Request, host: EndpointState, host_header: str | None,
                        deadline: float | None, loop: asyncio.AbstractEventLoop,
                        t0: float) -> Response:
        """An attempt ``send`` could not make on an idle HTTP/1.1 connection."""
        if req.upgrade is not None:
            return await self._exchange_tunnel(req, host, host_header, deadline, loop, t0)
        h2 = host.h2
        if h2 is not None and (self.protocol == "http2" or req.version == "2"):
            return await self._exchange_h2(req, host, h2, host_header, deadline, loop, t0)
        pool = host.pool
        try:
            conn = pool.take_idle()
            if conn is None and self.open_connections() >= self.thresholds.max_connections:
                conn = await self._wait_for_connection(host, pool, deadline, loop)
            if conn is None:
                conn = await self._connect(host, pool, deadline, loop, t0)
                return await conn.send(req, host_header, deadline)
        except UpstreamError as e:
            self._exchange_failed(host, e, loop.time() - t0)
            raise
        try:
            return await conn.send(req, host_header, deadline)
        except UpstreamError as e:
            return await self._idle_send_failed(req, host, e, host_header, deadline, loop, t0)

    async def _idle_send_failed(self, req: Request, host: EndpointState, e: UpstreamError,
                                host_header: str | None, deadline: float | None,
                                loop: asyncio.AbstractEventLoop, t0: float) -> Response:
        """A send on a reused idle connection failed with ``e``. If the server closed the
        keep-alive connection as we reused it, nothing was processed: send once more on a
        fresh connection. Otherwise (or if that fails too) record the failure and raise."""
        try:
            if e.sent or not isinstance(req.body, bytes) or e.flag != "UC":
                raise e
            conn = await self._connect(host, host.pool, deadline, loop, t0)
            return await conn.send(req, host_header, deadline)
        except UpstreamError as failed:
            self._exchange_failed(host, failed, loop.time() - t0)
            raise

    def _exchange_failed(self, host: EndpointState, e: UpstreamError, elapsed: float) -> None:
        """Outcome of an exchange that failed after admission (HTTP/1.1 and HTTP/2 alike):
        timeouts and resets are recorded here; connect failures (UF) and overflows (UO)
        were recorded where they happened."""
        if e.flag == "UT":
            if not isinstance(e, PendingTimeout):
                host.rq_timeout += 1
                self.record(host, None, elapsed, TIMEOUT)
        elif e.flag not in ("UF", "UO"):
            self.stats.rq_reset.inc()
            self.record(host, None, elapsed, RESET)

    async def _exchange_tunnel(self, req: Request, host: EndpointState, host_header: str | None,
                               deadline: float | None, loop: asyncio.AbstractEventLoop,
                               t0: float) -> Response:
        """An upgrade request on a connection of its own (it becomes a tunnel on a 101)."""
        ep = host.endpoint
        cfg = self.config
        try:
            resp = await open_tunnel(ep.host, ep.port, self.ssl_context, self._sni,
                                     cfg.connect_timeout_s, req, host_header, deadline,
                                     cfg.per_connection_buffer_limit, host.pool.local_addr)
        except UpstreamError as e:
            elapsed = loop.time() - t0
            if e.flag == "UF":
                self.stats.cx_connect_fail.inc()
                host.cx_connect_fail += 1
                self.record(host, None, elapsed, CONNECT_FAILURE)
            elif e.flag == "UT":
                host.rq_timeout += 1
                self.record(host, None, elapsed, TIMEOUT)
            else:
                self.stats.rq_reset.inc()
                self.record(host, None, elapsed, RESET)
            raise
        self.stats.cx_total.inc()
        return resp

    async def _exchange_h2(self, req: Request, host: EndpointState, pool: Http2Pool,
                           host_header: str | None, deadline: float | None,
                           loop: asyncio.AbstractEventLoop, t0: float) -> Response:
        """One attempt as a stream on a pooled HTTP/2 connection: breakers count requests and
        connections, not requests per connection (Envoy); a request that finds every
        connection full waits as *pending*."""
        try:
            conn = pool.acquire()
            if conn is None:
                conn = await self._wait_for_stream(host, pool, deadline, loop, t0)
            authority = host_header if host_header is not None else req.headers.get("host", "")
            return await conn.send(req, authority, deadline)
        except UpstreamError as e:
            self._exchange_failed(host, e, loop.time() - t0)
            raise

    async def _wait_for_stream(self, host: EndpointState, pool: Http2Pool, deadline: float | None,
                               loop: asyncio.AbstractEventLoop, t0: float) -> Http2UpstreamConnection:
        breakers = self.state.breakers
        if not breakers.admit_pending(self.thresholds):
            self.stats.rq_pending_overflow.inc()
            raise Overflow("max_pending_requests")
        host.end()                          # pending, not active (Envoy's accounting)
        poll = breakers.poll_s
        try:
            while True:
                conn = pool.acquire()
                if conn is not None:
                    return conn
                if deadline is not None and loop.time() >= deadline:
                    raise PendingTimeout()
                if not pool.pending_room():
                    if self.open_connections() < self.thresholds.max_connections:
                        conn = await self._connect(host, pool, deadline, loop, t0)
                        if conn.has_room():
                            conn.used += 1     # the new connection serves its opener first
                            return conn
                        continue
                    self.stats.cx_overflow.inc()
                until = deadline
                if poll is not None:     # another worker may free a connection: look again
                    until = loop.time() + poll if deadline is None else \
                        min(deadline, loop.time() + poll)
                await pool.wait(loop, until)
        finally:
            breakers.end_pending()
            host.begin()

    async def _connect(self, host: EndpointState, pool: _Connects[C], deadline: float | None,
                       loop: asyncio.AbstractEventLoop, t0: float) -> C:
        """A new pooled connection (HTTP/1.1 or HTTP/2 pool): the cluster's connect timeout,
        cut short by the request's deadline (UpstreamTimeout then)."""
        try:
            if deadline is None:
                conn = await pool.connect()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        conn = await pool.connect()
                except TimeoutError:
                    raise UpstreamTimeout() from None
        except UpstreamTimeout:
            raise
        except UpstreamError:
            self.stats.cx_connect_fail.inc()
            host.cx_connect_fail += 1
            self.record(host, None, loop.time() - t0, CONNECT_FAILURE)
            raise
        self.stats.cx_total.inc()
        self.open_connections()           # publish this worker's new count at once
        return conn

    async def _wait_for_connection(self, host: EndpointState, pool: ConnectionPool,
                                   deadline: float | None,
                                   loop: asyncio.AbstractEventLoop) -> UpstreamConnection | None:
        """The cluster is at max_connections. Returns an idle pooled connection to ``host``, or
        None when a new connection may be opened; raises Overflow (503 UO) at once when
        max_pending_requests are already waiting, PendingTimeout when the deadline passes."""
        self.stats.cx_overflow.inc()
        if self._close_idle_elsewhere(pool):
            return None
        breakers = self.state.breakers
        if not breakers.admit_pending(self.thresholds):
            self.stats.rq_pending_overflow.inc()
            raise Overflow("max_pending_requests")
        host.end()                          # pending, not active (Envoy's accounting)
        waiters = breakers.waiters
        poll = breakers.poll_s
        front = False
        try:
            while True:
                if deadline is not None and loop.time() >= deadline:
                    raise PendingTimeout()
                until = deadline
                if poll is not None:
                    until = loop.time() + poll if deadline is None else \
                        min(deadline, loop.time() + poll)
                await waiters.wait(loop, until, front)
                front = True
                conn = pool.take_idle()
                if conn is not None:
                    return conn
                if self.open_connections() < self.thresholds.max_connections:
                    return None
                if self._close_idle_elsewhere(pool):
                    return None
        finally:
            breakers.end_pending()
            host.begin()
            if breakers.pending_requests and \
                    self.open_connections() < self.thresholds.max_connections:
                waiters.wake()      # pass on a slot this waiter did not use

    def _close_idle_elsewhere(self, pool: ConnectionPool) -> bool:
        """At max_connections, an idle connection to another host is capacity doing nothing:
        close the oldest one so this request can open its own."""
        for h in self.hosts:
            p = h.pool
            if p is not pool and p.idle:
                p.idle.popleft().close()
                return True
        return False

    # ---- a TCP connection (tcp_proxy) ----------------------------------------------------------
    async def connect(self, ctx: ConnectionContext,
                      protocol_factory: Callable[[], P]) -> tuple[EndpointState, asyncio.Transport, P]:
        """One upstream connection attempt: admission (``max_connections``) -> pick (the
        balancer, or the original destination) -> connect (the cluster's TLS, connect timeout,
        bind address) -> record (counters, the balancer's estimate, outlier detection).
        Raises ``UpstreamError`` with the connection's response flag (UO, UH, UF)."""
        host = self.pick(ctx)
        if host is None:
            raise NoHealthyUpstream()
        if self.open_connections() >= self.thresholds.max_connections:
            self.state.breakers.overflow += 1
            self.stats.cx_overflow.inc()
            raise Overflow("max_connections")
        ctx.tried_hosts.append(host)
        ctx.upstream_host = host.address
        ctx.attempts += 1
        ep = host.endpoint
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tls = self.ssl_context
        sni = (self._sni or ep.hostname or ep.host) if tls is not None else None
        bind = (self.config.bind_address, 0) if self.config.bind_address else None
        host.cx_connecting += 1
        host.last_used = time.monotonic()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                transport, proto = await loop.create_connection(
                    protocol_factory, ep.host, ep.port, ssl=tls, server_hostname=sni,
                    local_addr=bind)
        except TimeoutError:
            self._connect_failed(host, ctx, loop.time() - t0, "connect timeout", TIMEOUT)
            self.stats.cx_connect_timeout.inc()
            raise ConnectFailure("upstream connect timeout") from None
        except (OSError, ssl.SSLError) as e:
            reason = f"TLS error: {e.reason or e}" if isinstance(e, ssl.SSLError) \
                else f"connection failure: {e.strerror or e}"
            self._connect_failed(host, ctx, loop.time() - t0, reason, CONNECT_FAILURE)
            raise ConnectFailure(reason) from None
        finally:
            host.cx_connecting -= 1
        elapsed = loop.time() - t0
        host.cx_active += 1
        host.cx_total += 1
        host.begin()                    # an active request while it lasts (least-request)
        stats = self.stats
        stats.cx_total.inc()
        stats.cx_connect_time.observe(elapsed)
        # Envoy counts a TCP proxy connection as a request; a made connection is a
        # local-origin success for outlier detection
        self.record(host, 200, elapsed, None)
        self.open_connections()         # publish this worker's new count at once
        return host, transport, proto

    def _connect_failed(self, host: EndpointState, ctx: ConnectionContext, elapsed: float,
                        reason: str, kind: str) -> None:
        ctx.upstream_failure = reason
        host.cx_connect_fail += 1
        self.stats.cx_connect_fail.inc()
        self.record(host, None, elapsed, kind)

    def connection_closed(self, host: EndpointState, received: int, sent: int) -> None:
        """A connection ``connect`` opened is over; ``received``/``sent``: bytes from/to the
        upstream not yet counted."""
        host.cx_active -= 1
        host.end()
        host.last_used = time.monotonic()
        self.count_bytes(received, sent)
        if self.state.breakers.pending_requests:
            self.state.breakers.waiters.wake()      # an HTTP request may use the slot

    def count_bytes(self, received: int, sent: int) -> None:
        if received:
            self.stats.cx_rx_bytes.inc(received)
        if sent:
            self.stats.cx_tx_bytes.inc(sent)

    # ---- ORIGINAL_DST ------------------------------------------------------------------------
    @property
    def original_dst(self) -> bool:
        return self.config.type == "original_dst"

    def _original_dst_host(self, ctx: ConnectionContext) -> EndpointState | None:
        """The host of the connection's original destination, made on first use."""
        ip, port = ctx.original_dst or ctx.local_addr
        if self.config.upstream_port_override:
            port = self.config.upstream_port_override
        ep = Endpoint(host=ip, port=port)
        st = self.state.endpoints.get(ep.address)
        if st is None or st.removed:
            st = self._endpoint_state(ep)
            st.pool.on_free = self.state.breakers.waiters.wake
            if self.config.bind_address:
                st.pool.local_addr = (self.config.bind_address, 0)
            self.hosts.append(st)
            self.state.endpoints[ep.address] = st
        return st

    def sweep_original_dst(self, now: float) -> None:
        """Forget original-destination hosts with no connection for ``cleanup_interval``."""
        limit = self.config.cleanup_interval_s
        keep = []
        for h in self.hosts:
            if h.cx_active or h.cx_connecting or h.http_cx_active or now - h.last_used < limit:
                keep.append(h)
            else:
                h.removed = True
                h.close_pools()
                self.state.endpoints.pop(h.address, None)
        if len(keep) != len(self.hosts):
            self.hosts[:] = keep

    # ---- outcomes -----------------------------------------------------------------------------
    def record(self, host: EndpointState, status: int | None, latency: float,
               local_error: str | None) -> None:
        """Outcome of one attempt: counters, the balancer's estimate, outlier detection."""
        host.rq_total += 1
        if local_error is not None or (status is not None and status >= 500):
            host.rq_error += 1
        if self._lb_record is not None:
            self._lb_record(host, status, latency, local_error)
        outlier = self.state.outlier
        if outlier is not None:
            outlier.on_outcome(host, status, latency, local_error)

    def set_health(self, host: EndpointState, healthy: bool, detail: str) -> None:
        """The active health checker's verdict for ``host``: published on the board for every
        worker."""
        host.last_hc = detail
        host.counters.set_healthy(healthy)
        if host.hc_healthy != healthy:
            host.hc_healthy = healthy
            self.rebuild()

    def close(self) -> None:
        if self._uneject_timer is not None:
            self._uneject_timer.cancel()
            self._uneject_timer = None
        for h in self.hosts:
            h.close_pools()
