"""The HTTP/2 connections to one endpoint: which one a request's stream goes on, when another
is opened, how they drain (see ``sidecar.upstream.http2`` for one connection)."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable

from sidecar.codec.sockets import set_nodelay
from sidecar.config.http2 import Http2Options
from sidecar.core.errors import ConnectFailure
from sidecar.upstream.http2 import Http2UpstreamConnection


class Http2Pool:
    """The HTTP/2 connections to one endpoint (see the module docstring)."""

    __slots__ = ("host", "port", "connect_timeout", "options", "ssl", "server_hostname",
                 "idle_timeout", "max_headers_count", "max_header_bytes", "conns", "connecting",
                 "total_connects", "connect_failures",
                 "on_free", "local_addr", "_waiters", "__weakref__")

    def __init__(self, host: str, port: int, connect_timeout: float, options: Http2Options,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str = "",
                 idle_timeout: float = 3600.0, max_headers_count: int = 100,
                 max_header_bytes: int = 80 * 1024) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.options = options
        self.ssl = ssl_context
        self.server_hostname = server_hostname
        self.idle_timeout = idle_timeout
        # response head limits (the cluster's max_response_headers_count / _kb): a head over
        # them fails its stream (502 UPE), as Envoy's HTTP/2 codec resets it
        self.max_headers_count = max_headers_count
        self.max_header_bytes = max_header_bytes
        self.conns: list[Http2UpstreamConnection] = []    # open (ready or not yet)
        self.connecting = 0
        self.total_connects = 0
        self.connect_failures = 0
        # called when a connection closes (a max_connections slot frees in the cluster)
        self.on_free: Callable[[], None] | None = None
        self.local_addr: tuple[str, int] | None = None     # the cluster's upstream_bind_config
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def active(self) -> int:
        """Open connections (as the HTTP/1.1 pool's ``active``)."""
        return len(self.conns)

    @property
    def idle(self) -> tuple[()]:
        return ()      # an HTTP/2 connection is never "idle capacity" for another host

    def streams(self) -> int:
        return sum(c.used for c in self.conns)

    def acquire(self) -> Http2UpstreamConnection | None:
        """A ready connection with room, its slot taken (the busiest first, so idle ones age
        out), or None."""
        best = None
        for c in self.conns:
            # ``has_room()``, inline (once per request), cheapest test first
            if c.used < c.capacity and not c.draining and not c.closed and c.ready.done() \
                    and (best is None or c.used > best.used):
                best = c
        if best is not None:
            best.used += 1
        return best

    def pending_room(self) -> bool:
        """A connection is being set up: waiting for it may be enough."""
        return any(not c.ready.done() and not c.closed for c in self.conns) or self.connecting > 0

    async def connect(self) -> Http2UpstreamConnection:
        """A new connection, once the peer's SETTINGS arrived (its room is known)."""
        loop = asyncio.get_running_loop()
        self.connecting += 1
        conn: Http2UpstreamConnection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: Http2UpstreamConnection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=(self.server_hostname or self.host) if self.ssl is not None else None,
                    local_addr=self.local_addr)
                conn = proto
                set_nodelay(proto.transport)
                self.conns.append(proto)
                self.connecting -= 1
                await proto.ready
        except TimeoutError:
            self._connect_failed(conn)
            raise ConnectFailure("upstream connect timeout") from None
        except OSError as e:
            self._connect_failed(conn)
            raise ConnectFailure(f"connection failure: {e.strerror or e}") from None
        except ssl.SSLError as e:
            self._connect_failed(conn)
            raise ConnectFailure(f"TLS error: {e.reason or e}") from None
        except ConnectFailure:
            self._connect_failed(conn)
            raise
        except BaseException:
            self._connect_failed(conn)
            raise
        self.total_connects += 1
        return proto

    def _connect_failed(self, conn: Http2UpstreamConnection | None) -> None:
        self.connect_failures += 1
        if conn is None:
            self.connecting -= 1
        else:
            conn.close()
        self.room_changed()

    async def wait(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        """Park until a stream slot may have freed or a connection came up (or the deadline)."""
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_at(deadline, _resolve, fut) if deadline is not None else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def connection_ready(self, conn: Http2UpstreamConnection) -> None:
        self.room_changed()

    def room_changed(self) -> None:
        """Wake every waiter: each takes a slot or decides to open a connection (few wait:
        only requests that found every connection full)."""
        waiters = self._waiters
        while waiters:
            f = waiters.popleft()
            if not f.done():
                f.set_result(None)

    def forget(self, conn: Http2UpstreamConnection) -> None:
        try:
            self.conns.remove(conn)
        except ValueError:
            return
        self.room_changed()
        if self.on_free is not None:
            self.on_free()

    def sweep(self, now: float) -> None:
        """Close connections without streams for longer than the idle timeout."""
        for c in list(self.conns):
            if not c.streams and c.ready.done() and now - c.idle_since > self.idle_timeout:
                c.close()

    def close_all(self) -> None:
        """Drain: connections close when their last stream ends (idle ones at once)."""
        for c in list(self.conns):
            c.draining = True
            if not c.streams:
                c.close()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
