"""The downstream HTTP/1.1 codec: bytes <-> requests and responses on one connection.

A connection is an ``asyncio.Protocol`` fed to llhttp (httptools). Small requests usually
arrive whole in one read, so the common case dispatches with a complete ``bytes`` body; larger
bodies stream with flow control. Requests on one connection are answered in order
(pipelining). The codec knows nothing of routing: it hands each request to its ``StreamOwner``
(the listener's HTTP connection manager) and writes back the response it gets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable
from typing import Protocol, cast

import httptools
from multidict import MultiDict

from sidecar.codec.headers import DATE, HOP_BY_HOP, status_line
from sidecar.codec.tunnel import serve_tunnel, tunnel_input
from sidecar.core.body import BodyStream
from sidecar.core.context import RequestContext
from sidecar.core.message import Request, Response, local_reply
from sidecar.tls.context import peer_uri_san

log = logging.getLogger("sidecar.server")

_BODYLESS = (204, 304)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class StreamOwner(Protocol):
    """What the codec needs from the listener that accepted the connection."""

    name: str
    bound_port: int
    max_header_bytes: int
    server_header: str
    accept_http_10: bool
    draining: bool

    def connection_opened(self, conn: "DownstreamConnection") -> None: ...

    def connection_closed(self, conn: "DownstreamConnection") -> None: ...

    def protocol_error(self, status: int) -> None: ...

    def dispatch(self, req: Request) -> Awaitable[Response]: ...

    def finish(self, req: Request, resp: Response, body_bytes: int) -> None:
        """The stream is over (response written, or abandoned): observe it."""
        ...


class DownstreamConnection(asyncio.Protocol):
    __slots__ = ("lr", "transport", "parser", "peer", "_url", "_headers", "_hsize", "_req",
                 "_chunks", "_stream", "_complete", "_queue", "_busy", "last_active",
                 "_headers_started", "_paused_writing", "_drain_waiter", "_closing", "_tls",
                 "peer_identity", "requests", "_h2c", "_idle_waiter", "_upgrade_req",
                 "_upgraded")

    def __init__(self, lr: StreamOwner):
        self.lr = lr
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = None
        self._url: list[bytes] = []
        self._headers: list = []
        self._hsize = 0
        self._req: Request | None = None
        self._chunks: list[bytes] = []
        self._stream: BodyStream | None = None
        self._complete = False
        self._queue: deque = deque()
        self._busy = False
        self.last_active = time.monotonic()
        self._headers_started = 0.0
        self._paused_writing = False
        self._drain_waiter = None
        self._closing = False
        self._tls = False
        self.peer_identity = None
        self.requests = 0
        self._h2c = False
        self._idle_waiter: asyncio.Future | None = None
        self._upgrade_req: Request | None = None   # an upgrade request, until its head is parsed
        self._upgraded = False                     # the connection is a tunnel

    # ---- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            self._tls = True
            self.peer_identity = peer_uri_san(sslobj)
        self.lr.connection_opened(self)

    def connection_lost(self, exc) -> None:
        self._closing = True
        iw = self._idle_waiter
        if iw is not None:
            self._idle_waiter = None
            if not iw.done():
                iw.set_result(None)
        self.lr.connection_closed(self)
        s = self._stream
        if s is not None and not self._complete:
            s.feed_error(ConnectionResetError("downstream connection closed"))
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

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self._upgraded:
            cast(BodyStream, self._stream).feed(data)      # a tunnel (codec.tunnel): raw bytes
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # llhttp stops after an Upgrade/CONNECT request. h2c upgrades were stripped in
            # on_headers_complete and are served as plain HTTP/1.1: parse on with a new
            # parser. Anything else was answered there (403/404) and the connection closes.
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            if self._h2c:
                self._h2c = False
                self.parser = httptools.HttpRequestParser(self)
                if offset < len(data):
                    self.data_received(data[offset:])
                return
            up = self._upgrade_req
            if up is not None:
                # what the client sends from now on is the tunnel's (codec.tunnel)
                self._upgrade_req = None
                self._stream = tunnel_input(up, cast(asyncio.Transport, self.transport),
                                            data[offset:])
                self._complete = False
                self._upgraded = True
                return
            self.transport.pause_reading()
            return
        except httptools.HttpParserError as e:
            if self._hsize < 0:
                self._reject(431, "request header fields too large")
            elif "invalid `Transfer-Encoding`" in str(e) or "invalid Transfer-Encoding" in str(e):
                self._reject(501, "Not Implemented")
            else:
                self._reject(400, f"bad request: {e}")
            return
        req = self._req
        if req is not None:
            # headers arrived in this read but the body has not finished: stream it
            self._req = None
            s = BodyStream(self.transport.pause_reading, self.transport.resume_reading)
            for c in self._chunks:
                s.feed(c)
            self._chunks = []
            self._stream = s
            req.body = s
            self._enqueue(req)

    def eof_received(self):
        return False    # half-close: we close when we are done writing

    # ---- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = []
        self._headers = []
        self._hsize = 0
        self._complete = False
        self._stream = None
        self._headers_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hsize += len(name) + len(value)
        if self._hsize > self.lr.max_header_bytes:
            self._hsize = -1
            raise httptools.HttpParserError("headers too large")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_started = 0.0
        headers = MultiDict()
        for name, value in self._headers:
            headers.add(name.decode("latin-1").lower(), value.decode("latin-1"))
        raw = b"".join(self._url) if len(self._url) != 1 else self._url[0]
        url = raw.decode("latin-1")
        if url[:1] != "/" and url[:4].lower() == "http":
            # absolute-form target: its authority replaces Host (RFC 9112 3.2.2)
            scheme, sep, rest = url.partition("://")
            if sep:
                authority, slash, tail = rest.partition("/")
                headers["host"] = authority
                url = slash + tail if slash else "/"
        path, _, query = url.partition("?")
        if "#" in query:
            query = query.partition("#")[0]
        elif "#" in path:
            path = path.partition("#")[0]
        p = self.parser
        ctx = RequestContext(self.lr.name, self.peer, time.perf_counter(), self.lr.bound_port)
        ctx.tls = self._tls
        ctx.peer_identity = self.peer_identity
        method = p.get_method().decode("latin-1")
        version = p.get_http_version()
        req = self._req = Request(method, path, query, headers, b"", ctx, version)
        req.keep_alive = p.should_keep_alive()
        req.chunked = "transfer-encoding" in headers
        if version != "1.1" and not (version == "1.0" and self.lr.accept_http_10):
            req.reject = (426, "Upgrade Required")
        elif version == "1.1" and "host" not in headers:
            req.reject = (400, "")
        elif method == "CONNECT":
            req.reject = (404, "")
        elif p.should_upgrade():
            up = headers.get("upgrade", "").lower()
            if up.startswith("h2c"):
                self._h2c = True    # ignore the h2c upgrade offer, as Envoy does
            else:
                # the connection manager decides (upgrade_configs); 403 when not allowed
                req.upgrade = up.partition(",")[0].strip()
                self._upgrade_req = req
        if headers.get("expect", "").lower() == "100-continue" and req.reject is None:
            # Envoy's default: answer 100-continue locally, strip Expect upstream
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        s = self._stream
        if s is not None:
            s.feed(body)
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._complete = True
        req = self._req
        if req is not None:
            # the whole request arrived in one read (the common case): a complete bytes body
            self._req = None
            chunks = self._chunks
            if chunks:
                req.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
            self._enqueue(req)
            return
        s = self._stream
        if s is not None:
            s.feed_eof()
            self._stream = None

    # ---- requests ------------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        if self._busy:
            self._queue.append(req)
            return
        self._busy = True
        w = self._idle_waiter
        if w is not None:
            # the connection's serving task is parked between requests: hand it this one
            # (a future is cheaper than a new task per request)
            self._idle_waiter = None
            w.set_result(req)
            return
        asyncio.get_running_loop().create_task(self._serve(req))

    async def _serve(self, req: Request) -> None:
        """One task per connection: serves its requests in order, parks while it is idle."""
        loop = asyncio.get_running_loop()
        while True:
            keep = await self._handle(req)
            if not keep or self._closing:
                self._close()
                return
            if self._queue:
                req = self._queue.popleft()
                continue
            self._busy = False
            w = self._idle_waiter = loop.create_future()
            req = await w
            if req is None:
                return          # the connection closed while idle

    async def _handle(self, req: Request) -> bool:
        lr = self.lr
        ctx = req.ctx
        self.requests += 1
        # after an upgrade request the parser is done: the connection closes (or tunnels)
        keep_alive = req.keep_alive and not lr.draining and req.upgrade is None
        if req.reject is not None:
            status, text = req.reject
            resp = local_reply(ctx, status, text, "DPE")
            keep_alive = False
            lr.protocol_error(status)
            try:
                await self._write(req, resp, False)
            except (ConnectionError, OSError):
                pass
            lr.finish(req, resp, 0)
            return False
        try:
            resp = await lr.dispatch(req)
        except Exception:
            log.exception("unhandled error in request chain")
            resp = local_reply(ctx, 500, "internal error", "DPE")
        if self._closing:
            resp.discard()
            lr.finish(req, resp, 0)
            return False
        if resp.status == 101 and req.upgrade is not None:
            sent = await serve_tunnel(cast(asyncio.Transport, self.transport), self.wait_writable,
                                      lr.server_header, req, resp)
            lr.finish(req, resp, sent)
            return False
        body = resp.body
        if not isinstance(req.body, bytes) and not req.body.at_eof:
            keep_alive = False       # the upstream answered before our client finished sending
        elif not ctx.upstream_host and (req.chunked or req.headers.get("content-length", "0") != "0"):
            keep_alive = False       # a local reply to a request with a body closes, as in Envoy
        try:
            sent = await self._write(req, resp, keep_alive)
        except (ConnectionError, OSError, asyncio.CancelledError):
            resp.discard()
            lr.finish(req, resp, 0)
            return False
        except Exception as e:   # an upstream body that failed mid-stream
            resp.discard()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("response body aborted: %s", e)
            ctx.flags.append("UPE" if "protocol" in str(e) else "UR")
            lr.finish(req, resp, 0)
            return False
        lr.finish(req, resp, sent)
        return keep_alive and (isinstance(body, bytes) or sent >= 0)

    async def _write(self, req: Request, resp: Response, keep_alive: bool) -> int:
        headers = resp.headers
        status = resp.status
        lr = self.lr
        parts = [status_line(status)]
        conn_tokens = headers.get("connection")
        drop = HOP_BY_HOP
        if conn_tokens:
            drop = HOP_BY_HOP | {t.strip().lower() for t in conn_tokens.split(",")}
        head_only = req.method == "HEAD" or status in _BODYLESS or status < 200
        body = resp.body
        stream_len = None
        te = headers.get("transfer-encoding")
        # keep the upstream's chunked framing (Envoy does), even for a body read whole
        up_chunked = te is not None and "chunked" in te.lower()
        for k, v in headers.items():
            if k in drop or k == "server":
                continue
            if k == "content-length":
                if head_only or not isinstance(body, bytes):
                    stream_len = v     # keep the upstream's length for HEAD and streams
                    parts.append(f"content-length: {v}\r\n")
                continue
            parts.append(f"{k}: {v}\r\n")
        parts.append(lr.server_header)
        if "date" not in headers:
            parts.append(f"date: {DATE.get()}\r\n")
        ctx = req.ctx
        if ctx.upstream_duration is not None:
            parts.append(f"x-envoy-upstream-service-time: {int(ctx.upstream_duration * 1000)}\r\n")
        if not keep_alive:
            parts.append("connection: close\r\n")
        t = self.transport
        if isinstance(body, bytes):
            if not head_only:
                if up_chunked:
                    parts.append("transfer-encoding: chunked\r\n\r\n")
                    t.write("".join(parts).encode("latin-1")
                            + (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"))
                    return len(body)
                parts.append(f"content-length: {len(body)}\r\n\r\n")
                t.write("".join(parts).encode("latin-1") + body)
                return len(body)
            if stream_len is None:
                if up_chunked:
                    parts.append("transfer-encoding: chunked\r\n")
                elif body and status >= 200 and status not in _BODYLESS:
                    # HEAD of a local reply: the length of the body a GET would get
                    parts.append(f"content-length: {len(body)}\r\n")
            parts.append("\r\n")
            t.write("".join(parts).encode("latin-1"))
            return 0
        if head_only:
            parts.append("\r\n")
            t.write("".join(parts).encode("latin-1"))
            resp.discard()
            return 0
        chunked = stream_len is None
        if chunked:
            parts.append("transfer-encoding: chunked\r\n")
        parts.append("\r\n")
        t.write("".join(parts).encode("latin-1"))
        sent = 0
        async for chunk in body:
            if self._closing:
                resp.discard()
                raise ConnectionResetError("downstream closed")
            sent += len(chunk)
            if chunked:
                t.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                t.write(chunk)
            if self._paused_writing:
                self._drain_waiter = asyncio.get_running_loop().create_future()
                await self._drain_waiter
        if chunked:
            t.write(b"0\r\n\r\n")
        elif stream_len is not None and stream_len.isdigit() and sent != int(stream_len):
            return -1    # short body from upstream: the connection must close
        return sent

    def _reject(self, status: int, message: str) -> None:
        """A protocol-level error: answer and close (nothing reached the upstream)."""
        if self._closing:
            return
        body = message.encode()
        head = (f"{status_line(status)}content-length: {len(body)}\r\ncontent-type: text/plain\r\n"
                f"{self.lr.server_header}date: {DATE.get()}\r\nconnection: close\r\n\r\n")
        self.lr.protocol_error(status)
        if not self._busy:
            self.transport.write(head.encode("latin-1") + body)
            self._close()
        else:
            self._closing = True   # finish the in-flight response, then close

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def wait_writable(self) -> None:
        """Until the transport's buffer drained below its high-water mark."""
        if self._paused_writing and not self._closing:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def in_flight(self) -> int:
        """Requests being served or queued (pipelined) on this connection."""
        return 1 + len(self._queue) if self._busy else 0

    def idle_check(self, now: float, idle_timeout: float, headers_timeout: float) -> None:
        if self._busy:
            return
        if self._headers_started and headers_timeout and now - self._headers_started > headers_timeout:
            self._reject(408, "request header read timeout")
            return
        if idle_timeout and now - self.last_active > idle_timeout:
            self._close()


