"""Upstream HTTP/2: a few connections per endpoint, requests multiplexed as streams
(libnghttp2 through ``ngh2``, the engine Envoy uses).

``Http2Pool`` (``sidecar.upstream.http2_pool``) keeps the connections to one endpoint. A request
takes a stream slot on a ready connection that has room (``acquire``); with none, it waits in the
pool (the cluster counts it as *pending*, Envoy's accounting) while one request opens another
connection, if the cluster's ``max_connections`` allows. A connection's room is the smaller of
the peer's SETTINGS_MAX_CONCURRENT_STREAMS and the cluster's ``max_concurrent_streams``; until
the peer's SETTINGS arrive a connection is not used. A GOAWAY stops new streams on that
connection; the streams it covers finish, the others fail as refused (safe to retry anywhere),
and the connection closes when its last stream ends.

nghttp2 frames, compresses, validates responses (a malformed one resets its stream with
PROTOCOL_ERROR: the request fails as a protocol error, the connection lives) and holds request
body data until the peer's windows let it out; a request body is read from downstream only
while little of it waits there (``_QUEUED_MAX``), concurrently with the response, so
bidirectional streams work. Response bodies credit the peer's windows as they are read.

Per request the connection does as little as it can: ``send`` returns the response future
itself (no coroutine frame), header names are encoded and decoded once (bounded caches, in
``http2_headers`` with the rest of the header translation), deadlines given in order wait
behind one timer per connection (``_deadlines_due``), and new requests leave in one write once
the loop goes quiet (``codec.consolidate``).

(Over 600 lines: one connection's streams, their flow control, deadlines and GOAWAY handling
share the state of the connection; the pool is apart, in ``http2_pool``, and the header lists
in ``http2_headers``.)
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import ngh2
from multidict import MultiDict
from ngh2 import (
    ConnectionClosed,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    NGH2Error,
    ResponseReceived,
    Setting,
    SettingsReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
)

from sidecar.codec.consolidate import READS, Consolidation
from sidecar.codec.http2_common import (
    CreditedBody,
    client_configuration,
)
from sidecar.core.body import BodySource, Headers
from sidecar.core.errors import (
    ConnectFailure,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.core.message import Request, Response
from sidecar.upstream.http2_headers import (
    SCHEMES,
    Header,
    fields,
    fields_and_size,
    request_headers_with,
    trailer_block,
)

if TYPE_CHECKING:
    from sidecar.upstream.http2_pool import Http2Pool

# request body bytes left waiting in nghttp2 (for the peer's window) before the pump stops
# reading the downstream body: end-to-end flow control, with enough in hand to fill a window
# update at once
_QUEUED_MAX = 128 * 1024
_CANCEL = ErrorCode.CANCEL
_REFUSED = ErrorCode.REFUSED_STREAM
_MAX_STREAMS = Setting.MAX_CONCURRENT_STREAMS
_ERROR_NAMES = {int(c): c.name for c in ErrorCode}
# the context a future's cancel callback runs in (it reads no context variable; passing one
# saves copying the current context on every request)
_NO_CONTEXT = contextvars.Context()

def _reason(code: int) -> str:
    return _ERROR_NAMES.get(code) or str(code)


class _Stream:
    __slots__ = ("conn", "sid", "fut", "status", "headers", "chunks", "body", "trailers",
                 "ended", "reset", "closed", "timer", "pump", "released", "whole_ok")

    def __init__(self, conn: Http2UpstreamConnection, sid: int,
                 fut: asyncio.Future[Response]) -> None:
        self.conn = conn
        self.sid = sid
        self.fut: asyncio.Future[Response] | None = fut
        self.status = 0
        self.headers: Headers | None = None
        self.chunks: list[bytes] | None = None   # DATA of the batch the headers came in
        self.body: CreditedBody | None = None
        self.trailers: Headers | None = None
        self.ended = False            # the response is complete
        self.reset = False            # failed or reset (by either side)
        self.closed = False           # nghttp2 closed it: both sides ended
        self.timer: asyncio.TimerHandle | None = None
        self.pump: asyncio.Task[None] | None = None
        self.released = False         # the stream slot went back to the pool
        # a response complete on arrival may be handed over as bytes (+ trailers) whatever its
        # length header says: the client speaks HTTP/2, whose framing needs no length
        self.whole_ok = False

    # bound methods rather than closures: no reference cycle to leave to the GC, and
    # ``remove_done_callback(s.cancelled)`` finds the one added (bound methods compare equal)
    def abort(self) -> None:
        """The request is abandoned (``ctx.abort``: the downstream went away)."""
        self.conn._reset(self, _CANCEL)

    def cancelled(self, fut: asyncio.Future[Response]) -> None:
        """The response future's done callback: removed before it is resolved, so it runs
        only when the awaiting task was cancelled."""
        self.conn._reset(self, _CANCEL)


class Http2UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: Http2Pool) -> None:
        self.pool = pool
        self.options = pool.options
        self.conn = ngh2.Connection(ngh2.Role.CLIENT, client_configuration())
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.used = 0                 # stream slots taken (reserved or open)
        self.peer_max = 2**31 - 1     # the peer's SETTINGS_MAX_CONCURRENT_STREAMS
        # streams at once: the smaller of the peer's limit and the cluster's
        self.capacity = min(self.peer_max, self.options.max_concurrent_streams)
        self.draining = False         # no new streams (GOAWAY, or closing)
        self.closed = False
        self.idle_since = time.monotonic()
        self.requests = 0
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._waiters: dict[int, asyncio.Future[None]] = {}   # pumps waiting for the queue
        self._flush_handle: asyncio.Handle | None = None
        self._quiet = Consolidation()
        self._out: list[bytes] = []      # taken from nghttp2, written by the next flush
        self._goaway_last: int | None = None
        self._loop = asyncio.get_running_loop()
        self._deadlines: deque[tuple[float, int]] = deque()    # see ``_deadlines_due``
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._compact_at = 64
        self._scheme: Header = SCHEMES["https" if pool.ssl is not None else "http"]
        self._authority: tuple[str, Header] = ("", (b":authority", b""))   # the last one sent

    def has_room(self) -> bool:
        return self.used < self.capacity and not self.draining and not self.closed and \
            self.ready.done()

    # ---- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's is not a subclass
        o = self.options
        conn = self.conn
        conn.initiate_connection({
            Setting.ENABLE_PUSH: 0,
            Setting.INITIAL_WINDOW_SIZE: o.initial_stream_window_size,
            Setting.HEADER_TABLE_SIZE: o.hpack_table_size,
        })
        if o.initial_connection_window_size > 65535:
            conn.set_local_window_size(o.initial_connection_window_size)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.draining = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._stop_deadlines()
        if not self.ready.done():
            self.ready.set_exception(ConnectFailure(
                f"connection closed before HTTP/2 SETTINGS: {exc}" if exc else
                "connection closed before HTTP/2 SETTINGS"))
            self.ready.exception()        # retrieved here: the connect step reports it
        for s in list(self.streams.values()):
            sent = self._goaway_last is None or s.sid <= self._goaway_last
            self._fail(s, UpstreamReset("UC", "upstream connection termination" if exc is None
                                        else f"upstream reset: {exc}", sent=sent))
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)
        for w in self._waiters.values():
            if not w.done():
                w.set_result(None)
        self.pool.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        d = self._drain
        if d is not None:
            self._drain = None
            if not d.done():
                d.set_result(None)

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        READS.count += 1
        if self.closed:
            return
        try:
            self.conn.receive_data(data)
        except NGH2Error as e:
            # a limit broken (DenialOfServiceError) or a connection nghttp2 already ended
            self._connection_failed(f"{type(e).__name__}: {e}", str(e))
            return
        self._handle(self.conn.events())
        # what the engine answers (acknowledgements, a reset of a malformed response) is taken
        # and handled now, and written with the next pass's flush, which the requests started
        # meanwhile share
        self._take_sent()
        if not self.closed:
            self._schedule_flush()

    # ---- events ----------------------------------------------------------------------------------
    def _handle(self, events: list[ngh2.Event]) -> None:
        got: list[_Stream] = []
        streams = self.streams
        # ``type(e) is``: no isinstance ladder, and mypy narrows it as well
        for e in events:
            if type(e) is DataReceived:
                s = streams.get(e.stream_id)
                data = e.data
                if s is None or s.reset or (s.body is not None and s.body.discarding):
                    if data:
                        self._ack(len(data), e.stream_id)
                    continue
                if s.chunks is not None:
                    s.chunks.append(data)
                elif s.body is not None and data:
                    s.body.feed(data)
                if e.end_stream:
                    s.ended = True
                    if s.body is not None:
                        s.body.feed_eof(None)
                        self._stream_done(s)
            elif type(e) is ResponseReceived:
                s = streams.get(e.stream_id)
                if s is not None and not s.reset:
                    raw = e.headers
                    # nghttp2 checked the head: one 3-digit :status, first (RFC 9113 8.3.2)
                    headers, size = fields_and_size(raw)
                    pool = self.pool
                    if len(headers) > pool.max_headers_count or size > pool.max_header_bytes:
                        self._reset(s, ErrorCode.INTERNAL_ERROR, UpstreamProtocolError(
                            "upstream protocol error: response headers over the cluster's "
                            "max_response_headers_count / max_response_headers_kb"))
                        continue
                    s.status = int(raw[0][1])
                    s.headers = headers
                    s.chunks = []
                    s.ended = e.end_stream
                    got.append(s)
            elif type(e) is StreamClosed:
                self._on_closed(e)
            elif type(e) is TrailersReceived:
                s = streams.get(e.stream_id)
                if s is not None and not s.reset:
                    s.trailers = fields(e.headers)
                    s.ended = True
                    if s.body is not None:
                        s.body.feed_eof(s.trailers)
                        self._stream_done(s)
            else:
                self._on_connection_event(e)
        for s in got:
            if not s.reset:
                self._deliver(s)

    def _on_closed(self, e: StreamClosed) -> None:
        """nghttp2 is done with a stream: both sides ended, or it was reset (by the peer: a
        StreamReset came first and failed it; here: a response nghttp2 found malformed, a
        request it could not send, a stream a GOAWAY did not cover)."""
        s = self.streams.get(e.stream_id)
        if s is None or s.released:
            return
        s.closed = True
        code = e.error_code
        if code == 0:
            if s.fut is None:            # delivered (a pending one is delivered after the batch)
                self._stream_done(s)
        elif e.local_error is not None:
            self._fail(s, UpstreamProtocolError(f"cannot send the request: {e.local_error}"))
        elif code == _REFUSED:
            self._fail(s, UpstreamReset("UR", "refused stream", sent=False))
        else:
            self._fail(s, UpstreamProtocolError(
                "upstream protocol error: malformed response" if code == ErrorCode.PROTOCOL_ERROR
                else f"upstream protocol error: {_reason(code)}"))

    def _on_connection_event(self, e: ngh2.Event) -> None:
        """The events that are not about one response's data (rare)."""
        if type(e) is StreamReset:
            s = self.streams.get(e.stream_id)
            if s is None:
                return
            code = e.error_code
            if s.ended and code == 0:
                s.closed = True           # "stop sending": the response is complete
                self._stream_done(s)
            else:
                refused = code == _REFUSED
                self._fail(s, UpstreamReset(
                    "UR", "refused stream" if refused else f"upstream reset: {_reason(code)}",
                    sent=not refused))
        elif type(e) is SettingsReceived:
            mcs = e.settings.get(_MAX_STREAMS)
            if mcs is not None:
                self.peer_max = mcs
                self.capacity = min(mcs, self.options.max_concurrent_streams)
            if not self.ready.done():
                self.ready.set_result(None)
                self.pool.connection_ready(self)
            else:
                self.pool.room_changed()
        elif type(e) is GoAwayReceived:
            self._on_goaway(e.error_code, e.last_stream_id)
        elif type(e) is ConnectionClosed:
            if e.error_code == 0:
                self.close()
            else:
                debug = e.debug_data.decode("latin-1")
                self._connection_failed(f"{_reason(e.error_code)} {debug}".rstrip(),
                                        debug or _reason(e.error_code))
        # WindowUpdated: waiting body data goes out with the next write (nghttp2 holds it);
        # SETTINGS/PING acknowledgements, 1xx heads: nothing to do

    def _connection_failed(self, why: str, detail: str) -> None:
        """nghttp2 ended the connection (a protocol error, a limit): every stream fails."""
        if not self.ready.done():
            self.ready.set_exception(ConnectFailure(f"upstream is not speaking HTTP/2: {detail}"))
            self.ready.exception()
        err = UpstreamProtocolError(f"upstream protocol error: {why}")
        for st in list(self.streams.values()):
            self._fail(st, err)
        self.close()

    # ---- responses -------------------------------------------------------------------------------
    def _deliver(self, s: _Stream) -> None:
        """Resolve a stream's response once its HEADERS (and whatever came with them) are in."""
        chunks = s.chunks or []
        s.chunks = None
        headers = s.headers if s.headers is not None else MultiDict()
        fut = s.fut
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if s.ended and (s.whole_ok or ((not data or "content-length" in headers) and not s.trailers)):
            # complete: a plain bytes body (an HTTP/1.1 client gets it with the length it had,
            # or chunked when it had none, so only HTTP/2 clients take it without one)
            if data:
                self._ack(len(data), s.sid)
            resp = Response(s.status, headers, data)
            resp.trailers = s.trailers
            self._stream_done(s)
        else:
            # streamed (or without a length: an HTTP/1.1 client gets it chunked, as from Envoy)
            body = s.body = CreditedBody(self._credit_for(s.sid))
            if data:
                body.feed(data)
            resp = Response(s.status, headers, body)
            resp.release = lambda: self._abandon(s)
            if s.ended:
                body.feed_eof(s.trailers)
                self._stream_done(s)
        s.fut = None
        if fut is not None and not fut.done():
            fut.remove_done_callback(s.cancelled)     # not cancelled: no use for it
            fut.set_result(resp)
        else:
            resp.discard()

    def _ack(self, n: int, sid: int) -> None:
        """Credit ``n`` bytes of ``sid``'s DATA back to the peer's windows."""
        try:
            self.conn.acknowledge_received_data(n, sid)
        except (ValueError, NGH2Error):
            pass        # the connection is ending: there is no window left to credit

    def _credit_for(self, sid: int) -> Callable[[int], None]:
        def credit(n: int) -> None:
            if not self.closed:
                self._ack(n, sid)
                self._schedule_flush()
        return credit

    def _abandon(self, s: _Stream) -> None:
        """The consumer gave up on the response body: reset the stream if more is to come;
        what arrived unread is credited either way (the connection window is shared)."""
        if not s.ended:
            self._reset(s, _CANCEL)
        else:
            self._discard(s)

    def _fail(self, s: _Stream, err: UpstreamError) -> None:
        """The stream is gone (the peer reset it, nghttp2 closed it, the connection ended):
        whoever awaits its response gets ``err``."""
        s.reset = True
        fut = s.fut
        if fut is not None:
            self._settle(s, fut, err)
            self._discard(s)          # DATA that came with the head, in this same batch
        elif s.body is not None and not s.ended:
            s.body.feed_error(err)
            self._discard(s)
        self._stream_done(s)

    @staticmethod
    def _settle(s: _Stream, fut: asyncio.Future[Response], err: UpstreamError) -> None:
        """The stream failed before its response: its future gets ``err`` (unless it was
        cancelled). (The request's ``ctx.abort`` may still point at the stream: a reset
        stream ignores it.)"""
        s.fut = None
        if not fut.done():
            fut.remove_done_callback(s.cancelled)
            fut.set_exception(err)

    def _discard(self, s: _Stream) -> None:
        """Nobody will read the rest of the body: credit what it holds (the connection window
        is shared: uncredited data would shrink it for every stream after)."""
        n = 0
        chunks = s.chunks
        if chunks:
            s.chunks = None
            n = sum(map(len, chunks))
        body = s.body
        if body is not None and not body.discarding:
            n += body.discard()
        if n and not self.closed:
            self._ack(n, s.sid)
            self._schedule_flush()

    def _reset(self, s: _Stream, code: int, err: UpstreamError | None = None) -> None:
        """Reset the stream (``code`` to the peer); whoever awaits its response gets ``err``."""
        if s.reset:
            return
        s.reset = True
        if err is None:
            err = UpstreamReset("UR", "stream reset (request abandoned)")
        fut = s.fut
        if fut is not None:
            self._settle(s, fut, err)
        elif s.body is not None and not s.ended:
            s.body.feed_error(err)
        self._discard(s)
        if not self.closed:
            try:
                self.conn.reset_stream(s.sid, code)
            except NGH2Error:
                pass    # nghttp2 has closed the stream already: nothing to reset
            self._schedule_flush()
        self._stream_done(s)

    def _stream_done(self, s: _Stream) -> None:
        """The response is complete (or the stream is gone): the slot goes back once nghttp2
        closed the stream (both sides ended) or it was reset."""
        if s.timer is not None and (s.reset or s.ended):
            s.timer.cancel()
            s.timer = None
        if not (s.reset or (s.ended and s.closed)):
            return
        pump = s.pump
        if pump is not None and not pump.done():
            pump.cancel()                 # the stream is gone: nothing more can be sent
        if self._waiters:
            w = self._waiters.pop(s.sid, None)
            if w is not None and not w.done():
                w.set_result(None)
        streams = self.streams
        if streams.pop(s.sid, None) is None or s.released:
            return
        s.released = True
        self.used -= 1
        if not streams:
            self.idle_since = time.monotonic()     # read only while there are no streams
            if self.draining:
                self.close()
                return
        self.pool.room_changed()

    def _on_timeout(self, s: _Stream) -> None:
        s.timer = None
        self._reset(s, _CANCEL, UpstreamTimeout())

    # Deadlines: a timer per stream (create, cancel) is a measurable part of a request, and
    # a route's streams mostly come with deadlines in the order they were sent (one timeout,
    # a clock that moves forward). Those wait in ``_deadlines`` (deadline, stream id), behind
    # one timer armed for the first; a stream that completes is not looked for there, it is
    # skipped when its turn comes (the list is compacted when it outgrows the open streams).
    # A deadline earlier than the last queued gets a timer of its own.
    def _deadlines_due(self) -> None:
        self._deadline_timer = None
        if self.closed:
            return
        q = self._deadlines
        streams = self.streams
        # the loop's clock has millisecond steps: a timer may run up to one early
        now = self._loop.time() + 0.001
        while q:
            deadline, sid = q[0]
            s = streams.get(sid)
            if s is None or s.ended or s.reset:
                q.popleft()                    # complete: no deadline any more
            elif deadline <= now:
                q.popleft()
                self._reset(s, _CANCEL, UpstreamTimeout())
            else:
                break
        if q and not self.closed:
            self._deadline_timer = self._loop.call_at(q[0][0], self._deadlines_due)

    def _compact_deadlines(self) -> None:
        """Drop the deadlines of completed streams (memory stays bounded by the open ones)."""
        streams = self.streams
        live = [(d, sid) for d, sid in self._deadlines
                if (s := streams.get(sid)) is not None and not (s.ended or s.reset)]
        self._deadlines = deque(live)
        self._compact_at = 2 * len(live) + 64

    def _on_goaway(self, code: int, last_stream_id: int) -> None:
        self.draining = True
        self._goaway_last = last_stream_id
        for s in list(self.streams.values()):
            if s.sid > last_stream_id:
                # never processed by the peer: safe to send again, anywhere
                self._fail(s, UpstreamReset("UR", "refused stream (GOAWAY)", sent=False))
        if code != 0:
            # the peer is closing on an error: what is open cannot finish
            for s in list(self.streams.values()):
                self._fail(s, UpstreamReset("UR", f"upstream GOAWAY {code}"))
        self.pool.room_changed()
        if not self.streams or code != 0:
            self.close()

    # ---- requests --------------------------------------------------------------------------------
    def send(self, req: Request, authority: str, deadline: float | None
             ) -> asyncio.Future[Response]:
        """Send ``req`` on a slot taken with ``Http2Pool.acquire``; the response head, as a
        future to await (no coroutine of its own: a frame less on every request). Cancelling
        it (the awaiting task cancelled) resets the stream."""
        loop = self._loop
        conn = self.conn
        self.requests += 1
        body = req.body
        trailers = req.trailers
        auth = self._authority
        if auth[0] != authority:
            auth = self._authority = (authority, (b":authority", authority.encode("latin-1")))
        block = request_headers_with(req, auth[1], self._scheme)
        end_now = type(body) is bytes and not body and not trailers
        try:
            sid = conn.send_request(block, end_stream=end_now)
        except NGH2Error as e:
            # no stream ids left, or the connection is ending: nothing was sent
            self.draining = True
            self.used -= 1
            self.pool.room_changed()
            raise UpstreamReset("UR", f"cannot open a stream: {e}", sent=False) from None
        fut: asyncio.Future[Response] = loop.create_future()
        s = _Stream(self, sid, fut)
        s.whole_ok = req.version == "2"
        self.streams[sid] = s
        if not end_now:
            if type(body) is bytes:
                # in memory already: nghttp2 holds it until the peer's windows let it out
                if body:
                    conn.send_data(sid, body, end_stream=not trailers)
                if trailers:
                    conn.send_trailers(sid, trailer_block(trailers))
            else:
                s.pump = loop.create_task(self._send_body(s, cast(BodySource, body), trailers))
        # one write for the streams started while reads keep coming (``codec.consolidate``: a
        # write to a loopback peer wakes it, which costs as much as the rest of the request)
        if self._flush_handle is None and not self.closed:
            self._quiet.start()
            self._flush_handle = loop.call_soon(self._flush_when_quiet)
        if deadline is not None:
            q = self._deadlines
            if q and deadline < q[-1][0]:
                s.timer = loop.call_at(deadline, self._on_timeout, s)   # out of order: its own
            else:
                q.append((deadline, sid))
                if self._deadline_timer is None:
                    self._deadline_timer = loop.call_at(deadline, self._deadlines_due)
                elif len(q) > self._compact_at:
                    self._compact_deadlines()
        req.ctx.abort = s.abort
        fut.add_done_callback(s.cancelled, context=_NO_CONTEXT)
        return fut

    async def _send_body(self, s: _Stream, body: BodySource, trailers: Headers | None) -> None:
        conn = self.conn
        sid = s.sid
        try:
            async for chunk in body:
                if s.reset or self.closed:
                    return
                if chunk:
                    conn.send_data(sid, chunk)
                    self._schedule_flush()
                    if conn.queued_body_size(sid) > _QUEUED_MAX or self._write_paused:
                        await self._writable(s)
            trailers = body.trailers or trailers
            if s.reset or self.closed:
                return
            if trailers:
                conn.send_trailers(sid, trailer_block(trailers))
            else:
                conn.end_stream(sid)
            self._schedule_flush()
        except asyncio.CancelledError:
            pass        # the stream ended (reset, or its response done): the pump stops
        except NGH2Error:
            pass        # nghttp2 closed the stream (its StreamClosed says how)
        except Exception as e:     # the downstream body failed (client gone): reset upstream
            self._reset(s, _CANCEL, UpstreamReset("UR", f"request body: {e}"))

    async def _writable(self, s: _Stream) -> None:
        """Wait until the stream's queued body data went out (down to ``_QUEUED_MAX``) and the
        transport takes more."""
        loop = asyncio.get_running_loop()
        conn = self.conn
        while not (s.reset or self.closed):
            if self._write_paused:
                self._flush()
                d = self._drain
                if d is None or d.done():
                    d = self._drain = loop.create_future()
                await d
            elif conn.queued_body_size(s.sid) > _QUEUED_MAX:
                w = self._waiters[s.sid] = loop.create_future()
                await w
            else:
                return

    def _wake_writers(self) -> None:
        """After a write: wake the pumps whose queued data went out."""
        conn = self.conn
        for sid, w in list(self._waiters.items()):
            if conn.queued_body_size(sid) <= _QUEUED_MAX:
                del self._waiters[sid]
                if not w.done():
                    w.set_result(None)

    # ---- output ----------------------------------------------------------------------------------
    def _flush_when_quiet(self) -> None:
        """New requests are written once the loop has gone a pass without reading, with the
        requests started meanwhile (as the downstream side's responses)."""
        self._flush_handle = None
        if self.closed:
            return
        if self._quiet.wait_more():
            self._flush_handle = self._loop.call_soon(self._flush_when_quiet)
        else:
            self._flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and not self.closed:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write what nghttp2 has to send, then handle what sending it did (a reset stream is
        closed, a GOAWAY ends the connection)."""
        self._flush_handle = None
        if self.closed:
            return
        self._take_sent()
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(data)

    def _take_sent(self) -> None:
        """Take what nghttp2 has to send (into ``_out``, written by ``_flush``), then handle
        what sending it did (a reset stream is closed, a GOAWAY ends the connection)."""
        conn = self.conn
        try:
            data = conn.data_to_send()
        except NGH2Error:
            return
        if data:
            self._out.append(data)
        events = conn.events()
        if events:
            self._handle(events)
        if self._waiters:
            self._wake_writers()

    def close(self) -> None:
        """Close (gracefully when idle: a GOAWAY NO_ERROR first)."""
        if self.closed:
            return
        self.draining = True
        t = self.transport
        if t is not None and not t.is_closing():
            conn = self.conn
            try:
                if not self.streams:
                    conn.terminate_connection(0)
                data = conn.data_to_send()
            except NGH2Error:
                data = b""
            if self._out:                # taken before, not written yet: it goes first
                data = b"".join(self._out) + data
                self._out.clear()
            if data:
                t.write(data)
            t.close()
        self.closed = True
        self._stop_deadlines()
        self.pool.forget(self)

    def _stop_deadlines(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._deadlines.clear()
