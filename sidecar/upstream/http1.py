"""Upstream HTTP/1.1: a pooled keep-alive connection per request, llhttp (httptools) parsing.

The response is parsed by llhttp and re-serialised downstream from its parts; raw upstream
bytes are never passed through. A parser is made per response so that a HEAD response (which
llhttp cannot tell has no body) never corrupts the next one on the connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable

import httptools
from multidict import MultiDict

from sidecar.codec.headers import NOT_FORWARDED, connection_drop
from sidecar.core.body import BodyStream
from sidecar.core.errors import (
    ConnectFailure,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.core.message import Request, Response


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "_headers", "_status", "_future", "_stream",
                 "_chunks", "_complete", "_head_done", "_keep_alive", "_closed", "_timer",
                 "_no_body", "_paused_writing", "_drain_waiter", "idle_since", "requests",
                 "_got_bytes", "_counted_gone", "_spare_parser")

    def __init__(self, pool: "ConnectionPool"):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = None
        self._spare_parser = None    # llhttp resets itself after a complete message: reuse it
        self._future: asyncio.Future | None = None
        self._stream: BodyStream | None = None
        self._closed = False
        self._timer = None
        self._paused_writing = False
        self._drain_waiter: asyncio.Future | None = None
        self.idle_since = 0.0
        self.requests = 0
        self._got_bytes = False
        self._counted_gone = False
        self._complete = False
        self._head_done = False
        self._keep_alive = False
        self._no_body = False
        self._headers = []
        self._chunks = []
        self._status = 0

    # ---- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self._closed = True
        self.pool.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        err = UpstreamReset("UC", "upstream connection termination"
                            if exc is None else f"upstream reset: {exc}", sent=self._got_bytes or True)
        fut = self._future
        if fut is not None and not fut.done():
            # a reused connection closed by the server before any response byte
            err.sent = self._got_bytes
            fut.set_exception(err)
        elif self._stream is not None and not self._complete:
            self._stream.feed_error(err)
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        w = self._drain_waiter
        if w is not None:
            self._drain_waiter = None
            if not w.done():
                w.set_result(None)

    async def _drain(self) -> None:
        if self._paused_writing and not self._closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self._closed:
            raise UpstreamReset("UC", "upstream connection closed while sending the body")

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            # bytes with no request outstanding: the server is misbehaving
            self.close()
            return
        self._got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamProtocolError(f"upstream protocol error: {e}"))
            self.close()
            return
        if self._head_done:
            fut = self._future
            if fut is not None and not fut.done():
                self._resolve()

    def eof_received(self):
        return False

    # ---- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._headers = []      # interim response: wait for the final one
            return
        self._status = status
        self._head_done = True
        self._keep_alive = self.parser.should_keep_alive()
        if self._no_body:
            # HEAD: llhttp would wait for Content-Length bytes that never come
            self._complete = True
            self.parser = None

    def on_body(self, body: bytes) -> None:
        s = self._stream
        if s is not None:
            s.feed(body)
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        if not self._head_done:
            return               # end of an interim 1xx message
        self._complete = True
        self._spare_parser = self.parser
        self.parser = None
        s = self._stream
        if s is not None:
            s.feed_eof()
            self._finish()

    # ---- request/response ------------------------------------------------------------------
    def _resolve(self) -> None:
        headers = MultiDict()
        for name, value in self._headers:
            headers.add(name.decode("latin-1").lower(), value.decode("latin-1"))
        if self._complete:
            chunks = self._chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            resp = Response(self._status, headers, body)
            self._future.set_result(resp)
            self._future = None
            self._finish()
        else:
            s = BodyStream(self.transport.pause_reading, self.transport.resume_reading,
                           self.pool.buffer_limit)
            for c in self._chunks:
                s.feed(c)
            self._chunks = []
            self._stream = s
            resp = Response(self._status, headers, s)
            resp.release = self._abandon
            self._future.set_result(resp)
            self._future = None

    def _fail(self, exc: UpstreamError) -> None:
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        elif self._stream is not None:
            self._stream.feed_error(exc)

    def _on_timeout(self) -> None:
        self._timer = None
        self._fail(UpstreamTimeout())
        self.close()

    def _abandon(self) -> None:
        """The consumer gave up on a streamed body: the connection can't be reused."""
        if not self._complete:
            self.close()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stream = None
        if self._keep_alive and not self._closed:
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.forget(self)

    async def send(self, req: Request, host_header: str | None,
                   deadline: float | None) -> Response:
        """Encode ``req`` (``host_header`` replaces Host when set) and send it."""
        head, chunked = encode_request(req, host_header)
        return await self.request(head, req.body, chunked, req.method == "HEAD", deadline)

    async def request(self, head: bytes, body, chunked: bool, no_body_response: bool,
                      deadline: float | None) -> Response:
        """Send one request and wait for the response head (body may still stream)."""
        loop = asyncio.get_running_loop()
        parser = self._spare_parser
        if parser is None or no_body_response:
            # a fresh parser for HEAD: its response has no body for llhttp to consume
            parser = httptools.HttpResponseParser(self)
        self._spare_parser = None
        self.parser = parser
        self._headers = []
        self._chunks = []
        self._status = 0
        self._head_done = False
        self._complete = False
        self._keep_alive = False
        self._no_body = no_body_response
        self._stream = None
        self._got_bytes = False
        self.requests += 1
        fut = self._future = loop.create_future()
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_timeout)
        t = self.transport
        if isinstance(body, bytes):
            if chunked:
                t.write(head + (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"))
            else:
                t.write(head + body if body else head)
        else:
            t.write(head)
            async for chunk in body:
                if fut.done():
                    break           # early response (e.g. 413) or failure: stop sending
                if chunked:
                    t.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    t.write(chunk)
                if self._paused_writing:
                    await self._drain()
            if chunked and not fut.done():
                t.write(b"0\r\n\r\n")
        return await fut


class ConnectionPool:
    """Idle keep-alive connections to one endpoint, most recently used first."""

    __slots__ = ("host", "port", "idle", "active", "connect_timeout", "max_idle", "idle_timeout",
                 "buffer_limit", "ssl", "server_hostname", "connecting", "total_connects",
                 "connect_failures", "on_free", "__weakref__")

    def __init__(self, host: str, port: int, connect_timeout: float, max_idle: int = 64,
                 idle_timeout: float = 3600.0, buffer_limit: int = 1024 * 1024,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str = ""):
        self.host = host
        self.port = port
        self.idle: deque[UpstreamConnection] = deque()
        self.active = 0                  # open connections (idle + busy)
        self.connecting = 0
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.buffer_limit = buffer_limit
        self.ssl = ssl_context
        self.server_hostname = server_hostname
        self.total_connects = 0
        self.connect_failures = 0
        # called when a connection becomes idle or closes: wakes requests waiting at the
        # cluster's max_connections (sidecar.circuit_breaker)
        self.on_free: Callable[[], None] | None = None

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn._closed and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        self.connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                kw = {}
                if self.ssl is not None:
                    kw = {"ssl": self.ssl, "server_hostname": self.server_hostname or self.host}
                _, conn = await loop.create_connection(lambda: UpstreamConnection(self),
                                                       self.host, self.port, **kw)
        except TimeoutError:
            self.connect_failures += 1
            raise ConnectFailure("upstream connect timeout") from None
        except OSError as e:
            self.connect_failures += 1
            raise ConnectFailure(f"connection failure: {e.strerror or e}") from None
        except ssl.SSLError as e:
            self.connect_failures += 1
            raise ConnectFailure(f"TLS error: {e.reason or e}") from None
        finally:
            self.connecting -= 1
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.active += 1
        self.total_connects += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if self.on_free is not None:
            self.on_free()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn._counted_gone:
            return
        conn._counted_gone = True
        self.active -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if self.on_free is not None:
            self.on_free()

    def sweep(self, now: float) -> None:
        """Close connections idle longer than the idle timeout (called about once a second)."""
        idle = self.idle
        while idle and now - idle[0].idle_since > self.idle_timeout:
            idle.popleft().close()

    def close_all(self) -> None:
        while self.idle:
            self.idle.pop().close()


def encode_request(req: Request, host_header: str | None = None) -> tuple[bytes, bool]:
    """Request line + headers for an HTTP/1.1 upstream, with our own framing and no hop-by-hop
    headers (RFC 9110 7.6.1, plus those named in Connection). Returns (head, chunked)."""
    headers = req.headers
    drop = connection_drop(NOT_FORWARDED, headers.get("connection"))
    url = req.path + "?" + req.query if req.query else req.path
    parts = [f"{req.method} {url} HTTP/1.1\r\n"]
    for k, v in headers.items():
        if k in drop:
            if k != "te" or v.lower() != "trailers":
                continue
        if host_header is not None and k == "host":
            v = host_header
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
        if cl is not None:
            parts.append(f"content-length: {cl}\r\n")
        else:
            parts.append("transfer-encoding: chunked\r\n")
            chunked = True
    parts.append("\r\n")
    return "".join(parts).encode("latin-1"), chunked
