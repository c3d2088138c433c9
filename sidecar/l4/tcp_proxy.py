"""``envoy.filters.network.tcp_proxy``: bytes both ways between a client and an upstream
host, with ``kafka_broker`` optionally in front.

``TcpProxyFilter`` is built once per filter chain per config snapshot (its clusters, stats,
access logs, the Kafka filter). Each accepted connection is a ``TcpProxySession`` (the
downstream ``asyncio.Protocol``) paired with an ``UpstreamSide`` once the cluster connected
(``Cluster.connect``: breakers, balancer, TLS, outlier detection).

* Nothing is read from the client until the upstream is connected (Envoy's default), so no
  byte is buffered for a connection that may never be made.
* Backpressure: when one side's write buffer passes the high-water mark (the listener's
  ``per_connection_buffer_limit_bytes``) the proxy stops reading the other side, and reads
  again once it drained below the low mark. A slow reader costs at most about two buffer
  limits of memory per connection, whatever the other side sends.
* Half-close: an end of stream from one side is passed on as a FIN to the other, which may
  go on sending; the connection is closed when both directions ended (or either side
  closed). A TLS side has no half-close in asyncio: its end closes it.
* Idle timeout and max connection duration are checked by the listener's once-a-second
  sweep (no timer per connection); bytes are added to the counters there too, and at close
  (Istio's ``istio_tcp_*`` too, when the chain has ``istio_metrics``: labels bound once per
  connection when its upstream side is settled).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

from sidecar.cluster.cluster import Cluster, ClusterState
from sidecar.cluster.endpoint import EndpointState
from sidecar.codec.sockets import set_nodelay
from sidecar.config.cluster import Cluster as ClusterConfig
from sidecar.config.l4 import TcpProxy
from sidecar.core.connection import ConnectionContext
from sidecar.core.errors import ConnectFailure, UpstreamError
from sidecar.observability.access_log import ConnectionLogger
from sidecar.observability.istio import TcpRecorder, TcpReporter
from sidecar.observability.stats import TcpStats
from sidecar.tls.context import peer_uri_san

if TYPE_CHECKING:
    # kafka_broker pulls in kio (and kio pulls in hypothesis): ~11 MB, loaded only when a
    # config has a Kafka filter (runtime/store.py builds it).
    from sidecar.l4.kafka_broker import FilterOutput, KafkaBrokerFilter, KafkaBrokerSession

log = logging.getLogger("sidecar.tcp_proxy")


class SessionOwner(Protocol):
    """What a session needs from the listener that accepted it."""

    def session_opened(self, session: TcpProxySession) -> None: ...

    def session_closed(self, session: TcpProxySession) -> None: ...


class TcpProxyFilter:
    """One tcp_proxy chain of one config snapshot."""

    __slots__ = ("config", "clusters", "weights", "total_weight", "stats", "kafka", "logs",
                 "buffer_limit", "listener_logs", "istio")

    def __init__(self, config: TcpProxy, clusters: Sequence[ClusterState], stats: TcpStats,
                 kafka: KafkaBrokerFilter | None, logs: tuple[ConnectionLogger, ...],
                 listener_logs: tuple[ConnectionLogger, ...], buffer_limit: int,
                 istio: TcpReporter | None = None):
        self.config = config
        self.clusters = tuple(clusters)
        self.weights = tuple(w.weight for w in config.weighted_clusters) or (1,)
        self.total_weight = sum(self.weights)
        self.stats = stats
        self.kafka = kafka
        self.logs = logs
        self.listener_logs = listener_logs
        self.buffer_limit = buffer_limit
        self.istio = istio               # Istio's istio_tcp_* metrics, when the chain asks

    def cluster_config(self, name: str) -> ClusterConfig | None:
        for state in self.clusters:
            if state.name == name:
                c = state.current
                return c.config if c is not None else None
        return None

    def pick_cluster(self) -> ClusterState:
        clusters = self.clusters
        if len(clusters) == 1:
            return clusters[0]
        r = random.random() * self.total_weight
        for state, weight in zip(clusters, self.weights, strict=True):
            r -= weight
            if r < 0:
                return state
        return clusters[-1]

    def session(self, owner: SessionOwner, ctx: ConnectionContext) -> TcpProxySession:
        return TcpProxySession(self, owner, ctx)


class TcpProxySession(asyncio.Protocol):
    """The downstream side of one proxied connection (and the session's state)."""

    __slots__ = ("f", "owner", "ctx", "down", "up", "upstream", "cluster", "host", "kafka",
                 "down_eof", "up_eof", "closed", "active", "last_active", "_task",
                 "down_rx", "down_tx", "up_rx", "up_tx", "_flushed", "_connected",
                 "_reading_paused", "down_closed", "up_closed", "_finished", "down_tls",
                 "up_tls", "_early", "istio")

    def __init__(self, f: TcpProxyFilter, owner: SessionOwner, ctx: ConnectionContext):
        self.f = f
        self.owner = owner
        self.ctx = ctx
        self.down: asyncio.Transport | None = None
        self.up: asyncio.Transport | None = None
        self.upstream: UpstreamSide | None = None
        self.cluster: Cluster | None = None
        self.host: EndpointState | None = None
        self.kafka: KafkaBrokerSession | None = None
        self.down_eof = self.up_eof = False
        self.down_closed = self.up_closed = False
        self.closed = False
        self._finished = False
        self.active = False              # bytes moved since the last sweep
        self.last_active = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.down_rx = self.down_tx = self.up_rx = self.up_tx = 0
        self._flushed = (0, 0, 0, 0)
        self._connected = False
        self._reading_paused = False     # downstream reading paused by upstream backpressure
        self.down_tls = self.up_tls = False  # asyncio has no TLS half-close
        self._early: list[bytes] = []
        self.istio: TcpRecorder | None = None    # bound once the upstream side is settled

    # ---- downstream (the client) ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is no asyncio.Transport subclass but has its methods
        transport = cast(asyncio.Transport, transport)
        self.down = transport
        transport.pause_reading()        # until the upstream is connected
        # uvloop starts reading a server connection after connection_made: pause again then
        asyncio.get_running_loop().call_soon(self._pause_until_connected)
        set_nodelay(transport)
        ctx = self.ctx
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            self.down_tls = True
            ctx.peer_identity = peer_uri_san(sslobj)
            ctx.tls_version = sslobj.version() or ""
        limit = self.f.buffer_limit
        transport.set_write_buffer_limits(high=limit)
        self.f.stats.cx_total.inc()
        self.owner.session_opened(self)
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await self._connect_upstream()
        except asyncio.CancelledError:
            self._finish()
            raise

    async def _connect_upstream(self) -> None:
        f = self.f
        ctx = self.ctx
        attempts = f.config.max_connect_attempts
        if f.config.hash_source_ip:
            ctx.hash_key = zlib.crc32(ctx.remote_addr[0].encode())
        while True:
            state = f.pick_cluster()
            cluster = state.current
            ctx.cluster = state.name
            if cluster is None:
                f.stats.no_route.inc()
                self._fail("NC", "no cluster found")
                return
            try:
                host, transport, upstream = await cluster.connect(ctx, lambda: UpstreamSide(self))
            except ConnectFailure as e:
                if self.closed:
                    self._finish()
                    return
                if ctx.attempts < attempts:
                    continue
                f.stats.attempts_exceeded.inc()
                ctx.flags.append(e.flag)
                self._fail("URX", e.reason)      # Envoy: UF,URX once attempts are exhausted
                return
            except UpstreamError as e:
                self._fail(e.flag, e.reason)
                return
            self.cluster, self.host, self.up = cluster, host, transport
            if f.istio is not None:
                self._istio_open()
            if self.closed:              # the client went away while we connected
                transport.close()
                self._finish()
                return
            break
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=f.buffer_limit)
        self.up_tls = transport.get_extra_info("ssl_object") is not None
        local = transport.get_extra_info("sockname")
        if local:
            ctx.upstream_local_addr = f"{local[0]}:{local[1]}"
        if f.kafka is not None:
            self.kafka = f.kafka.session(ctx.peer_identity)
        self._connected = True
        early, self._early = self._early, []
        for data in early:
            self._forward(data)
        if self.down_eof and not transport.is_closing():     # the client finished early
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        down = self.down
        if down is not None and not down.is_closing():
            down.resume_reading()

    def _pause_until_connected(self) -> None:
        down = self.down
        if not self._connected and down is not None and not down.is_closing():
            down.pause_reading()

    def _istio_open(self) -> None:
        """Bind this connection's Istio TCP metrics (its labels, once) and count it opened:
        when connected, or when it failed (then with its flags, UF,URX, UO...)."""
        rep = self.f.istio
        if rep is None or self.istio is not None:
            return
        ctx = self.ctx
        rec = self.istio = rep.recorder(
            peer_identity=ctx.peer_identity, downstream_tls=self.down_tls, cluster=ctx.cluster,
            config=self.cluster.config if self.cluster is not None
            else self.f.cluster_config(ctx.cluster), flags=ctx.flags)
        rec.opened.inc()

    def _fail(self, flag: str, reason: str) -> None:
        """No upstream connection: close the client (Envoy sends nothing, just closes)."""
        self.ctx.flags.append(flag)
        if not self.ctx.upstream_failure and flag != "UF":
            self.ctx.upstream_failure = reason
        self.ctx.termination = reason
        if self.f.istio is not None:
            self._istio_open()
        down = self.down
        if down is not None:
            down.close()
        self._finish()

    def data_received(self, data: bytes) -> None:
        self.active = True
        up = self.up
        if up is None or not self._connected:
            # read before the pause took effect: keep it for the upstream, bounded
            early = self._early
            early.append(data)
            if sum(map(len, early)) > self.f.buffer_limit and self.down is not None:
                self.down.pause_reading()
            return
        self._forward(data)

    def _forward(self, data: bytes) -> None:
        # counted when forwarded: bytes read early and never forwarded were never "received"
        # (Envoy does not read them at all before the upstream is connected)
        self.down_rx += len(data)
        up = self.up
        assert up is not None
        k = self.kafka
        if k is None:
            self.up_tx += len(data)
            up.write(data)
            return
        self._apply(k.on_downstream_bytes(data))

    def _apply(self, out: FilterOutput) -> None:
        """Write what the Kafka filter produced (request bytes up, local answers down)."""
        up, down = self.up, self.down
        if out.to_upstream and up is not None:
            self.up_tx += len(out.to_upstream)
            up.write(out.to_upstream)
        if out.to_downstream and down is not None:
            self.down_tx += len(out.to_downstream)
            down.write(out.to_downstream)
        if out.close:
            self.ctx.termination = f"kafka: {out.close_reason}"
            self.close()

    def eof_received(self) -> bool | None:
        """The client finished sending: pass the FIN on and keep receiving."""
        self.down_eof = True
        up = self.up
        if up is not None and not up.is_closing():
            if self.up_eof or not up.can_write_eof():
                up.close()
            else:
                up.write_eof()
        if self.up_eof or self.down_tls:
            return None                  # both directions are done (or TLS): let it close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.down_closed = True
        self.closed = True
        up = self.up
        if up is not None and not up.is_closing():
            up.close()                   # flushes what is buffered, then closes
        # still connecting: _connect finishes the session when it sees ``closed``
        self._maybe_finish()

    # downstream write buffer: the client reads slowly -> stop reading the upstream
    def pause_writing(self) -> None:
        up = self.up
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        up = self.up
        if up is not None and not up.is_closing():
            up.resume_reading()

    # ---- upstream events (from UpstreamSide) -----------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        self.up_rx += len(data)
        self.active = True
        down = self.down
        if down is None:
            return
        k = self.kafka
        if k is None:
            self.down_tx += len(data)
            down.write(data)
            return
        self._apply(k.on_upstream_bytes(data))

    def upstream_eof(self) -> bool | None:
        self.up_eof = True
        down = self.down
        if down is not None and not down.is_closing():
            if self.down_eof or not down.can_write_eof():
                down.close()
            else:
                down.write_eof()
        if self.down_eof or self.up_tls:
            return None
        return True

    def upstream_lost(self) -> None:
        self.up_closed = True
        self.closed = True
        down = self.down
        if down is not None and not down.is_closing():
            down.close()
        self._maybe_finish()

    def upstream_pause_writing(self) -> None:
        down = self.down
        if down is not None and not self._reading_paused:
            self._reading_paused = True
            self.f.stats.paused.inc()
            down.pause_reading()

    def upstream_resume_writing(self) -> None:
        down = self.down
        if down is not None and self._reading_paused:
            self._reading_paused = False
            self.f.stats.resumed.inc()
            if not down.is_closing():
                down.resume_reading()

    # ---- ending -------------------------------------------------------------------------------
    def close(self, flag: str | None = None, details: str = "") -> None:
        """Close both sides (flushing what is buffered); idempotent."""
        if flag is not None:
            self.ctx.flags.append(flag)
        if details:
            self.ctx.termination = details
        self.closed = True
        for t in (self.down, self.up):
            if t is not None and not t.is_closing():
                t.close()

    def abort(self) -> None:
        """Drop both sides at once (listener drain deadline, shutdown)."""
        self.closed = True
        for tr in (self.down, self.up):
            if tr is not None:
                tr.abort()
        task = self._task
        if task is not None and not task.done():
            task.cancel()

    def _maybe_finish(self) -> None:
        if self.down_closed and (self.up is None or self.up_closed):
            t = self._task
            if self.up is None and t is not None and not t.done():
                return                   # still connecting: _connect finishes the session
            self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        ctx = self.ctx
        ctx.end = asyncio.get_running_loop().time()
        ctx.bytes_received = self.down_rx
        ctx.bytes_sent = self.down_tx
        if self.f.istio is not None:
            self._istio_open()           # the client left before the upstream side settled
        self.flush_stats()
        k = self.kafka
        if k is not None:
            k.on_close()
        if self.cluster is not None and self.host is not None:
            self.cluster.connection_closed(self.host, 0, 0)
        if self.istio is not None:
            self.istio.closed.inc()
        f = self.f
        f.stats.duration.observe(ctx.duration)
        for lg in f.logs:
            lg.log(ctx)
        for lg in f.listener_logs:
            lg.log(ctx)
        self.owner.session_closed(self)

    def flush_stats(self) -> None:
        """Add the bytes moved since the last flush to the counters (sweep and close)."""
        cur = (self.down_rx, self.down_tx, self.up_rx, self.up_tx)
        old = self._flushed
        if cur == old:
            return
        self._flushed = cur
        st = self.f.stats
        if cur[0] != old[0]:
            st.rx_bytes.inc(cur[0] - old[0])
        if cur[1] != old[1]:
            st.tx_bytes.inc(cur[1] - old[1])
        if self.cluster is not None:
            self.cluster.count_bytes(cur[2] - old[2], cur[3] - old[3])
        rec = self.istio
        if rec is not None:              # Istio: received from / sent to the downstream
            if cur[0] != old[0]:
                rec.received.inc(cur[0] - old[0])
            if cur[1] != old[1]:
                rec.sent.inc(cur[1] - old[1])

    def sweep(self, now: float) -> None:
        """Once a second (the listener's sweep): counters, idle timeout, max duration."""
        self.flush_stats()
        if self.active:
            self.active = False
            self.last_active = now
            return
        cfg = self.f.config
        if cfg.idle_timeout_s and now - self.last_active >= cfg.idle_timeout_s and \
                not self.closed:
            self.f.stats.idle_timeout.inc()
            self.close(None, "idle timeout")

    def check_duration(self, loop_now: float) -> None:
        limit = self.f.config.max_downstream_connection_duration_s
        if limit and loop_now - self.ctx.start >= limit and not self.closed:
            self.f.stats.max_duration_reached.inc()
            self.close("DT", "max_downstream_connection_duration")


class UpstreamSide(asyncio.Protocol):
    """The upstream connection of a session; every event goes to the session."""

    __slots__ = ("s",)

    def __init__(self, session: TcpProxySession):
        self.s = session

    def data_received(self, data: bytes) -> None:
        self.s.upstream_data(data)

    def eof_received(self) -> bool | None:
        return self.s.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.s.upstream_lost()

    def pause_writing(self) -> None:
        self.s.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.s.upstream_resume_writing()
