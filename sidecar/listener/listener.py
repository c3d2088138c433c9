"""A bound listener: accept, keep track of connections, sweep idle ones, drain.

Its routes live in an ``HttpConnectionManager`` swapped by the config store in one assignment,
without touching the socket; a request in flight keeps the manager it started with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from sidecar.codec.detect import server_protocol
from sidecar.codec.stream_owner import ServedConnection
from sidecar.config.listener import Listener
from sidecar.core.message import Request, Response, local_reply
from sidecar.listener.http import HttpConnectionManager, ListenerCounters
from sidecar.observability.metrics import Metrics
from sidecar.tls.context import server_context
from sidecar.tls.secrets import SecretStore


def sweep_interval(cfg: Listener) -> float:
    """Timeouts are checked by one sweep per listener, not a timer per request: once a second,
    or more often when a configured timeout is short (a fifth of it, at least every 50 ms)."""
    shortest = min((t for t in (cfg.request_timeout_s, cfg.stream_idle_timeout_s,
                                cfg.max_stream_duration_s, cfg.request_headers_timeout_s,
                                cfg.idle_timeout_s) if t > 0), default=5.0)
    return max(0.05, min(1.0, shortest / 5))


async def _no_routes(req: Request) -> Response:
    return local_reply(req.ctx, 404, "", "NR")


class ListenerRuntime:
    """A bound listener; its routes are swapped by the config store without touching sockets."""

    def __init__(self, config: Listener, metrics: Metrics, secrets: SecretStore | None = None):
        self.config = config
        self.secrets = secrets          # SDS certificates by name
        self.name = config.name
        self.connections: set[ServedConnection] = set()
        self.server: asyncio.Server | None = None
        self.draining = False
        # swapped by the config store in one assignment; a stream reads it once, at dispatch
        self.hcm: HttpConnectionManager | None = None
        self._limits(config)
        self._sweeper: asyncio.Task[None] | None = None
        self.bound_port = config.port
        self.downstream_cx_active = 0
        self.counters = ListenerCounters(metrics, config.name)

    def active_requests(self) -> int:
        """Requests being served or queued (pipelined) on this listener's connections."""
        return sum(c.in_flight() for c in self.connections)

    def swap(self, config: Listener, hcm: HttpConnectionManager) -> HttpConnectionManager | None:
        """Serve ``hcm`` (a new config's routes) from now on; returns the one it replaces."""
        self.config = config
        self._limits(config)
        old, self.hcm = self.hcm, hcm
        return old

    def _limits(self, config: Listener) -> None:
        """What the codec reads from its listener on every request (no config lookups)."""
        self.max_header_bytes = config.max_request_headers_kb * 1024
        self.max_headers_count = config.max_headers_count
        self.headers_with_underscores = config.headers_with_underscores_action
        self.server_header = f"server: {config.server_name}\r\n"
        self.server_name = config.server_name
        self.accept_http_10 = config.accept_http_10
        self.suppress_envoy_headers = config.suppress_envoy_headers
        self.stream_idle_timeout_s = config.stream_idle_timeout_s

    def port_bound(self) -> None:
        """Port 0 was bound to a real port: routes that strip a matching port must know it."""
        hcm = self.hcm
        if hcm is not None:
            hcm.bound_port = self.bound_port
            if hcm.table is not None:
                hcm.table.listener_port = str(self.bound_port)

    # ---- what the codec asks of its listener (codec.http1.StreamOwner) ---------------------
    def connection_opened(self, conn: ServedConnection) -> None:
        self.connections.add(conn)
        self.downstream_cx_active += 1
        self.counters.cx_total.inc()

    def connection_closed(self, conn: ServedConnection) -> None:
        self.connections.discard(conn)
        self.downstream_cx_active -= 1

    def protocol_error(self, status: int) -> None:
        self.counters.protocol_error(status)

    def http2_abuse(self, kind: str) -> None:
        self.counters.http2_abuse(kind)

    def new_connection(self) -> asyncio.Protocol:
        """The codec for a connection just accepted (the listener's codec_type, read now)."""
        cfg = self.config
        return server_protocol(self, cfg.codec, cfg.http2, cfg.idle_timeout_s)

    def dispatch(self, req: Request) -> Awaitable[Response]:
        """The current manager's dispatch (its coroutine: no frame here)."""
        hcm = self.hcm
        if hcm is None:
            return _no_routes(req)
        return hcm.dispatch(req)

    def finish(self, req: Request, resp: Response, body_bytes: int) -> None:
        observer = req.ctx.observer
        if observer is None:
            hcm = self.hcm
            if hcm is None:
                return
            observer = hcm.unmatched
        observer.stream_done(req, resp, body_bytes)

    async def start(self, reuse_port: bool = False, sock=None) -> None:
        loop = asyncio.get_running_loop()
        ssl_ctx = server_context(self.config.tls, self.secrets) if self.config.tls is not None \
            else None
        if sock is not None:
            self.server = await loop.create_server(self.new_connection, sock=sock, backlog=1024,
                                                   ssl=ssl_ctx)
        else:
            self.server = await loop.create_server(self.new_connection,
                                                   self.config.host, self.config.port,
                                                   reuse_port=reuse_port or None, backlog=1024,
                                                   ssl=ssl_ctx)
        self.bound_port = self.server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            cfg = self.config
            await asyncio.sleep(sweep_interval(cfg))
            now = time.monotonic()
            cfg = self.config
            for c in list(self.connections):
                c.idle_check(now, cfg.idle_timeout_s, cfg.request_headers_timeout_s, cfg)

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        self.draining = True

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to ``timeout``), then close."""
        await self.stop_accepting()
        for c in list(self.connections):
            if not c._busy:
                c._close()
        end = time.monotonic() + timeout
        while self.connections and time.monotonic() < end:
            await asyncio.sleep(0.05)
            for c in list(self.connections):
                if not c._busy:
                    c._close()
        for c in list(self.connections):
            c._close()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for c in list(self.connections):
            c._close()
