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
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any, Protocol, cast

import httptools

from sidecar.codec.consolidate import READS
from sidecar.codec.http1_request import Refusal, new_parser, parse_head
from sidecar.codec.http1_response import local_head, streamed_head, whole_response
from sidecar.codec.sockets import peer_address, set_nodelay
from sidecar.codec.stream_owner import StreamLimits
from sidecar.codec.tunnel import serve_tunnel, tunnel_input
from sidecar.core.body import BodyAborted, BodyStream
from sidecar.core.connection_id import ConnectionId
from sidecar.core.context import RequestContext
from sidecar.core.message import Request, Response, local_reply
from sidecar.tls.context import peer_uri_san

log = logging.getLogger("sidecar.server")

DELAYED_CLOSE_S = 1.0     # Envoy's delayed_close_timeout default
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

class StreamOwner(Protocol):
    """What the codec needs from the listener that accepted the connection."""

    name: str
    max_header_bytes: int     # request line + header fields (Envoy's max_request_headers_kb)
    max_headers_count: int
    headers_with_underscores: str    # ALLOW | REJECT_REQUEST | DROP_HEADER
    server_header: str
    accept_http_10: bool
    suppress_envoy_headers: bool     # the router's: no x-envoy-upstream-service-time
    stream_idle_timeout_s: float     # an upgraded connection's idle bound (a route's overrides)

    @property
    def bound_port(self) -> int: ...

    @property
    def draining(self) -> bool: ...

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
                 "peer_identity", "requests", "_h2c", "_idle_waiter", "_refusal", "_stopped", "_pending_error", "_task", "_current",
                 "_responding", "_timed_out", "_close_after", "_last_io", "conn_id",
                 "_upgrade_req", "_upgraded")

    def __init__(self, lr: StreamOwner):
        self.lr = lr
        # Any, not asyncio.Transport: uvloop's transports are not its subclasses, and compiled
        # (mypyc) classes check declared attribute types at run time
        self.transport: Any = None
        self.parser = new_parser(self)
        self.peer: tuple[str, int] | None = None
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
        self._drain_waiter: Any = None
        self._closing = False
        self._tls = False
        self.peer_identity: str | None = None
        self.requests = 0
        self._h2c = False
        self._idle_waiter: asyncio.Future[Request | None] | None = None
        self.conn_id = ConnectionId()         # this connection, for its requests' contexts
        self._refusal: tuple[int, str] | None = None   # set by a callback that refused
        self._stopped = False          # no more parsing (a protocol error was answered/queued)
        self._pending_error: tuple[int, str] | None = None   # owed after the queued responses
        self._task: asyncio.Task | None = None
        self._current: Request | None = None   # the request being served
        self._responding = False       # its response head was written
        self._timed_out: tuple[int, str, str | None] | None = None
        self._close_after = False
        self._last_io = 0.0            # last byte in or out of the stream being served
        self._upgrade_req: Request | None = None   # an upgrade request, until its head is parsed
        self._upgraded = False                     # the connection is a tunnel (codec.tunnel)

    # ---- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = peer_address(transport)
        set_nodelay(transport)
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
            s.feed_error(BodyAborted("downstream connection closed"))
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
        # the client is gone: end the stream in flight at once, so that what it holds
        # upstream (the connection with a partial request or an unread response, its pool and
        # breaker slots) is released now, not when the upstream or a timeout ends it
        t = self._task
        if t is not None and self._busy and not t.done():
            t.cancel()

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
        READS.count += 1        # (an HTTP/2 upstream's flush waits while reads come)
        if self._stopped:
            return          # after a protocol error, or bytes after a request that closes
        self.last_active = self._last_io = time.monotonic()
        if self._upgraded:
            cast(BodyStream, self._stream).feed(data)      # a tunnel (codec.tunnel): raw bytes
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # llhttp stops after an Upgrade/CONNECT request. h2c upgrades were stripped in
            # on_headers_complete and are served as plain HTTP/1.1: parse on with a new
            # parser. An upgrade the connection manager may allow becomes a tunnel; anything
            # else was answered there (404) and the connection closes.
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            if self._h2c:
                self._h2c = False
                self.parser = new_parser(self)
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
            refusal = self._refusal
            if refusal is None:
                text = str(e)
                low = text.lower()
                if "transfer-encoding" in low and "content-length" not in low:
                    refusal = (501, "Not Implemented")
                else:
                    refusal = (400, f"bad request: {text}")
            self._protocol_error(*refusal)
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

    def _refuse(self, status: int, details: str) -> None:
        self._refusal = (status, details)
        raise Refusal(status, details)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        # the request line counts toward the header size limit, as in Envoy
        self._hsize += len(url)
        if self._hsize > self.lr.max_header_bytes:
            self._refuse(431, "request header fields too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        # the hot path: only the limits that bound memory are checked per line; the rest of
        # the validation runs once, on the whole head, in on_headers_complete
        h = self._headers
        h.append((name, value))
        self._hsize += len(name) + len(value)
        if self._hsize > self.lr.max_header_bytes:
            self._refuse(431, "request header fields too large")
        if len(h) > self.lr.max_headers_count:
            self._refuse(431, "too many request headers")

    def on_headers_complete(self) -> None:
        self._headers_started = 0.0
        p = self.parser
        try:
            req, send_continue = parse_head(self.lr, p, self._url, self._headers, self.peer,
                                            self._tls, self.peer_identity, self.conn_id)
        except Refusal as e:
            self._refusal = (e.status, e.details)
            raise
        self._req = req
        if req.upgrade is not None:
            self._upgrade_req = req
        elif req.reject is None and p.should_upgrade():
            self._h2c = True     # an h2c offer is ignored: parse on as HTTP/1.1 (Envoy)
        if send_continue:
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
        self._task = asyncio.get_running_loop().create_task(self._serve(req))

    async def _serve(self, req: Request) -> None:
        """One task per connection: serves its requests in order, parks while it is idle."""
        loop = asyncio.get_running_loop()
        while True:
            keep = await self._handle(req)
            if not keep or self._closing:
                self._end()
                return
            if self._queue:
                req = self._queue.popleft()
                continue
            err = self._pending_error
            if err is not None:
                # a protocol error after the requests already answered: its reply comes last
                self._write_error(*err)
                return
            self._busy = False
            w: asyncio.Future[Request | None] = loop.create_future()
            self._idle_waiter = w
            next_req = await w
            if next_req is None:
                return          # the connection closed while idle
            req = next_req

    async def _handle(self, req: Request) -> bool:
        lr = self.lr
        ctx = req.ctx
        self.requests += 1
        self._current = req
        self._responding = False
        self._last_io = time.monotonic()
        if req.reject is not None:
            status, text = req.reject
            resp = local_reply(ctx, status, text, "DPE")
            lr.protocol_error(status)
            try:
                await self._write(req, resp, False)
            except (ConnectionError, OSError):
                pass
            lr.finish(req, resp, 0)
            return False
        try:
            resp = await lr.dispatch(req)
        except asyncio.CancelledError:
            # the client left (connection_lost) or a stream timeout fired: everything below
            # was unwound by the cancellation (upstream connection closed, slots returned)
            return await self._after_cancel(req)
        except BodyAborted as e:
            resp = local_reply(ctx, e.status, "bad request body" if e.status == 400
                               else "downstream disconnected", "DPE" if e.status == 400 else e.flag)
        except Exception:
            log.exception("unhandled error in request chain")
            resp = local_reply(ctx, 500, "internal error", "DPE")
        # read after dispatch: the connection manager may have decided the connection closes;
        # after an upgrade request the parser is done: the connection closes (or tunnels)
        keep_alive = req.keep_alive and not lr.draining and req.upgrade is None
        if self._closing:
            resp.discard()
            if "DC" not in ctx.flags:
                ctx.flags.append("DC")
            lr.finish(req, resp, 0)
            return False
        if resp.status == 101 and req.upgrade is not None:
            idle = ctx.stream_idle_timeout
            sent = await serve_tunnel(cast(asyncio.Transport, self.transport), self.wait_writable,
                                      lr.server_header, req, resp,
                                      lr.stream_idle_timeout_s if idle is None else idle)
            lr.finish(req, resp, sent)
            return False
        body = resp.body
        if self._close_after:
            keep_alive = False
        elif not isinstance(req.body, bytes) and not req.body.at_eof:
            keep_alive = False       # the upstream answered before our client finished sending
        elif not ctx.upstream_host and (req.chunked or req.headers.get("content-length", "0") != "0"):
            keep_alive = False       # a local reply to a request with a body closes, as in Envoy
        try:
            sent = await self._write(req, resp, keep_alive)
        except (ConnectionError, OSError, asyncio.CancelledError):
            resp.discard()
            if self._timed_out is not None or self._closing:
                self._note_abort(ctx)
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

    def _note_abort(self, ctx: RequestContext) -> None:
        t = self._timed_out
        flag = t[2] if t is not None else "DC"
        if flag is not None and flag not in ctx.flags:
            ctx.flags.append(flag)

    async def _after_cancel(self, req: Request) -> bool:
        """The stream in flight was cancelled before its response started: the client left,
        or a stream timeout fired (then it is answered: 504 when the whole request had
        arrived, the connection staying usable; 408 and close while it was still arriving)."""
        ctx = req.ctx
        t = self._timed_out
        self._timed_out = None
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()          # handled here: later awaits of this task run normally
        if t is None or self._closing:
            resp = local_reply(ctx, 400, "downstream disconnected", "DC")
            self.lr.finish(req, resp, 0)
            return False
        status, text, flag = t
        resp = local_reply(ctx, status, text, flag)
        keep = status != 408 and req.keep_alive and not self.lr.draining
        try:
            await self._write(req, resp, keep)
        except (ConnectionError, OSError):
            keep = False
        self.lr.finish(req, resp, 0)
        return keep

    def _write_local(self, resp: Response) -> None:
        body = resp.body if isinstance(resp.body, bytes) else b""
        self.transport.write(local_head(resp.status, resp.headers.items(), len(body),
                                        self.lr.server_header) + body)

    async def _write(self, req: Request, resp: Response, keep_alive: bool) -> int:
        lr = self.lr
        body = resp.body
        t = self.transport
        if isinstance(body, bytes):
            data, sent = whole_response(req, resp, body, keep_alive, lr.server_header,
                                        lr.suppress_envoy_headers)
            t.write(data)
            return sent
        data, head_only, chunked, stream_len = streamed_head(
            req, resp, keep_alive, lr.server_header, lr.suppress_envoy_headers)
        t.write(data)
        if head_only:
            resp.discard()
            return 0
        self._responding = True
        sent = 0
        async for chunk in body:
            if self._closing:
                resp.discard()
                raise ConnectionResetError("downstream closed")
            self._last_io = time.monotonic()
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

    def _protocol_error(self, status: int, message: str) -> None:
        """A message the parser refused: stop reading; answer the requests already parsed, in
        order, then this error with ``connection: close`` (nothing of it went upstream)."""
        if self._closing or self._stopped:
            return
        self._stopped = True
        self.transport.pause_reading()
        s = self._stream
        if s is not None and not self._complete:
            # the body of the request in flight is malformed: its forwarding is aborted (the
            # upstream connection holding the partial body closes) and it is answered 400
            self._stream = None
            self._close_after = True
            self.lr.protocol_error(status)
            s.feed_error(BodyAborted(message, 400, "DPE"))
            return
        self._req = None
        self._chunks = []
        if self._busy:
            self._pending_error = (status, message)
        else:
            self._write_error(status, message)

    def _write_error(self, status: int, message: str) -> None:
        self.lr.protocol_error(status)
        body = message.encode()
        self.transport.write(local_head(status, (), len(body), self.lr.server_header,
                                        "text/plain") + body)
        self._end()

    def _end(self) -> None:
        """Close after our last response: FIN at once, the socket a little later, reading and
        discarding meanwhile (Envoy's delayed close). Closing a socket that still receives makes
        the kernel send an RST, and a client whose stack sees it may drop our response unread."""
        t = self.transport
        if t is None or t.is_closing() or self._closing or not t.can_write_eof():
            self._close()
            return
        self._closing = True
        self._stopped = True          # what still arrives is read and dropped
        self._busy = False
        self._headers_started = 0.0
        try:
            t.write_eof()
        except (OSError, RuntimeError):
            self._close()
            return
        asyncio.get_running_loop().call_later(DELAYED_CLOSE_S, self._really_close)

    def _really_close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def wait_writable(self) -> None:
        """Until the transport's buffer drained below its high-water mark."""
        if self._paused_writing and not self._closing:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiter = fut
            await fut

    def in_flight(self) -> int:
        """Requests being served or queued (pipelined) on this connection."""
        return 1 + len(self._queue) if self._busy else 0

    def idle_check(self, now: float, idle_timeout: float, headers_timeout: float,
                   limits: StreamLimits | None = None) -> None:
        """Called by the listener's sweep: connection idle and header-read timeouts, and the
        timeouts of the stream in flight (request, stream idle, max duration); a tunnel keeps
        its own idle timer (codec.tunnel)."""
        if self._busy:
            if limits is not None and not self._upgraded:
                self._stream_check(now, limits)
            return
        if self._headers_started and headers_timeout and now - self._headers_started > headers_timeout:
            self._stopped = True
            self._write_error(408, "request header read timeout")
            return
        if idle_timeout and now - self.last_active > idle_timeout:
            self._close()

    def _stream_check(self, now: float, limits: StreamLimits) -> None:
        req = self._current
        if req is None or self._timed_out is not None or self._closing:
            return
        ctx = req.ctx
        age = time.perf_counter() - ctx.start
        t: tuple[int, str, str | None] | None = None
        duration = ctx.max_stream_duration if ctx.max_stream_duration is not None \
            else limits.max_stream_duration_s
        idle = ctx.stream_idle_timeout if ctx.stream_idle_timeout is not None \
            else limits.stream_idle_timeout_s
        received = _request_received(req)
        if duration and age > duration:
            t = (504 if received else 408, "downstream duration timeout", "DT")
        elif idle and now - self._last_io > idle:
            t = (504 if received else 408, "stream timeout", "SI")
        elif limits.request_timeout_s and age > limits.request_timeout_s and \
                not self._responding and not received:
            t = (408, "request timeout", None)
        if t is None:
            return
        self._timed_out = t
        if t[0] == 408:
            self._stopped = True     # the rest of that request is never read: the connection closes
        if self._responding:
            # the response has started: all that is left is to reset the stream
            self._stopped = True
            if self.transport is not None:
                self.transport.abort()
        task = self._task
        if task is not None and not task.done():
            task.cancel()


def _request_received(req: Request) -> bool:
    body = req.body
    return isinstance(body, bytes) or (isinstance(body, BodyStream) and body.ended)
