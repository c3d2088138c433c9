"""The downstream HTTP/2 codec: one connection, many concurrent streams, on libnghttp2 (``ngh2``,
the engine Envoy uses).

Each stream becomes a ``Request`` handed to the connection's ``StreamOwner`` (the listener's
HTTP connection manager), exactly as the HTTP/1.1 codec does, and its ``Response`` is written
back on the stream; routing, filters and clusters never know the wire protocol.

* **Bodies.** A request whose DATA all arrived with its HEADERS (the common small request and
  gRPC unary call) is dispatched with a complete ``bytes`` body; others stream through a
  ``CreditedBody`` that credits the client's window as the body is read (the engine's
  automatic WINDOW_UPDATE is off: flow control end to end). Response bodies are queued in the
  engine, which sends them as the peer's windows allow; a writer waits while what it queued
  does not fit the windows, and the transport's write buffer is respected. Trailers pass both
  ways.
* **Validation** (RFC 9113 8.2 and 8.3): nghttp2 checks every request's header list and resets
  a malformed one's stream (PROTOCOL_ERROR); by default the whole connection is then closed with
  GOAWAY PROTOCOL_ERROR (Envoy closes it too), or only the stream is reset with
  ``override_stream_error_on_invalid_http_message``. Headers larger than
  ``max_request_headers_kb`` reset the stream (INTERNAL_ERROR), keeping the connection.
* **Abuse** (``Http2Guard``): rapid reset, floods of control, empty, PRIORITY and WINDOW_UPDATE
  frames close the connection (the guard reads each inbound frame header before the engine
  gets the bytes); nghttp2 itself bounds CONTINUATION frames, HPACK and flow control.
* **Drain**: a GOAWAY NO_ERROR naming the last stream accepted; streams already open finish.
* **Stream timeouts** (the listener's sweep calls ``idle_check``): request, stream idle and
  max duration per stream, a route's own overriding the listener's, as the HTTP/1.1 codec.

Over 600 lines on purpose: everything here reads or writes the one engine state (events,
streams, the output) of a connection. The response side (queueing heads, bodies and trailers
as the windows allow) is its base class, ``http2_writer.ResponseWriter``; what touches no
engine state (request validation, abuse counting, the engine's options, the response fields
precomputed) lives in ``http2_request``, ``http2_guard``, ``http2_common`` and
``http2_response``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

import ngh2
from ngh2 import (
    ConnectionClosed,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    NGH2Error,
    PingReceived,
    RequestReceived,
    SettingsReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

from sidecar.codec.consolidate import READS, Consolidation
from sidecar.codec.http2_common import (
    CreditedBody,
    ngh2_server_config,
)
from sidecar.codec.http2_guard import Abuse, Http2Guard
from sidecar.codec.http2_request import (
    Malformed,
    Refused,
    TooLarge,
    request_from_checked_headers,
    trailers_from_headers,
)
from sidecar.codec.http2_response import (
    server_field,
)
from sidecar.codec.http2_writer import H2Stream, ResponseWriter, StreamGone
from sidecar.codec.sockets import peer_address, set_nodelay
from sidecar.codec.stream_owner import StreamLimits, StreamOwner
from sidecar.config.http2 import Http2Options
from sidecar.core.connection_id import ConnectionId
from sidecar.core.grpc import grpc_local_reply, grpc_reply
from sidecar.core.message import Response, local_reply
from sidecar.tls.context import peer_uri_san

log = logging.getLogger("sidecar.http2")

_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
_SETTINGS_MAX_FRAME_SIZE = 0x5
# nghttp2's GOAWAY debug data for a client past an acknowledged SETTINGS_MAX_CONCURRENT_STREAMS:
# Envoy closes that connection without a GOAWAY, and so does the codec
_TOO_MANY_STREAMS = b"max concurrent streams"


class Http2Connection(ResponseWriter, asyncio.Protocol):
    """One downstream HTTP/2 connection (see the module docstring)."""

    def __init__(self, owner: StreamOwner, options: Http2Options) -> None:
        self.owner = owner
        self.options = options
        self.transport: asyncio.Transport | None = None
        self.conn = ngh2.Connection(ngh2.Role.SERVER, ngh2_server_config(options))
        self.streams: dict[int, H2Stream] = {}
        self.peer: tuple[str, int] | None = None
        self.tls = False
        self.peer_identity: str | None = None
        self.last_active = time.monotonic()
        self.guard = Http2Guard(options)
        self.requests = 0
        self._closing = False
        self._flush_handle: asyncio.Handle | None = None
        self._quiet = Consolidation()
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._going_away = False
        self._ended = False             # the engine is done (ConnectionClosed): close after output
        self._failed = False            # ... on a connection error: close without the streams
        self._out: list[bytes] = []     # engine output taken early (before a reset), not written
        self._window_waiters: set[H2Stream] = set()
        self._max_frame = 16384
        self._stream_errors = options.override_stream_error_on_invalid_http_message
        self._peer_reset = 0            # the stream of the last StreamReset (a peer's RST_STREAM)
        self.conn_id = ConnectionId()         # this connection, for its streams' contexts
        self._server = server_field(owner.server_name)   # (name, its ``server`` field)
        self._loop: asyncio.AbstractEventLoop | None = None    # set with the transport

    # ---- what the listener sees (as for HTTP/1.1 connections) -----------------------------------
    @property
    def lr(self) -> StreamOwner:
        """The stream owner, under the HTTP/1.1 codec's name for it."""
        return self.owner

    @property
    def _busy(self) -> bool:
        return bool(self.streams)

    def in_flight(self) -> int:
        return len(self.streams)

    def idle_check(self, now: float, idle_timeout: float, headers_timeout: float,
                   limits: StreamLimits | None = None) -> None:
        """Called by the listener's sweep: drain, the connection's idle timeout, and each
        stream's timeouts (request, stream idle, max duration; a route's override the
        listener's)."""
        if self.owner.draining and not self._going_away:
            self.send_goaway()
        if not self.streams and (self._going_away or self._ended or
                                 (idle_timeout and now - self.last_active > idle_timeout)):
            self._close()
            return
        if limits is not None and self.streams:
            for st in list(self.streams.values()):
                if st.timed_out is None and not st.reset and not st.done and st.task is not None:
                    self._stream_check(st, now, limits)

    def _stream_check(self, st: H2Stream, now: float, limits: StreamLimits) -> None:
        """Envoy's stream timeouts: before the response a local reply (504 once the request
        had all arrived, else 408), after it a reset of the stream."""
        ctx = st.req.ctx
        age = time.perf_counter() - ctx.start
        duration = ctx.max_stream_duration if ctx.max_stream_duration is not None \
            else limits.max_stream_duration_s
        idle = ctx.stream_idle_timeout if ctx.stream_idle_timeout is not None \
            else limits.stream_idle_timeout_s
        received = st.ended
        t: tuple[int, str, str] | None = None
        if duration and age > duration:
            t = (504 if received else 408, "downstream duration timeout", "DT")
        elif idle and now - st.last_io > idle:
            t = (504 if received else 408, "stream timeout", "SI")
        elif limits.request_timeout_s and age > limits.request_timeout_s and \
                not st.responding and not received:
            t = (408, "request timeout", "")
        if t is None:
            return
        st.timed_out = t
        if st.responding:
            self._reset(st, ErrorCode.NO_ERROR)
        task = st.task
        if task is not None and not task.done():
            task.cancel()

    def _close(self) -> None:
        """Close gracefully: a GOAWAY (if none was sent), then the socket."""
        if self._closing:
            return
        if not self._going_away:
            self.send_goaway()
        self._flush()
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def send_goaway(self, error: int = 0) -> None:
        """Stop accepting streams after the highest one seen (graceful when ``error`` is 0):
        the engine ignores later streams and lets the open ones finish."""
        if self._going_away or self.transport is None:
            return
        self._going_away = True
        try:
            self.conn.send_goaway(error, last_stream_id=self.guard.last_stream_id)
        except NGH2Error:
            pass        # the engine already ended the connection: its own GOAWAY went out
        self._flush()

    # ---- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's is not a subclass
        self._loop = asyncio.get_running_loop()
        self.peer = peer_address(transport)
        set_nodelay(transport)
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            self.tls = True
            self.peer_identity = peer_uri_san(sslobj)
        o = self.options
        conn = self.conn
        conn.initiate_connection({
            ngh2.Setting.HEADER_TABLE_SIZE: o.hpack_table_size,
            ngh2.Setting.MAX_CONCURRENT_STREAMS: o.max_concurrent_streams,
            ngh2.Setting.INITIAL_WINDOW_SIZE: o.initial_stream_window_size,
            ngh2.Setting.ENABLE_CONNECT_PROTOCOL: 0,
        })
        if o.initial_connection_window_size > 65535:
            conn.set_local_window_size(o.initial_connection_window_size)
        self._flush()
        self.owner.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self.owner.connection_closed(self)
        gone = ConnectionResetError("downstream connection closed")
        for s in list(self.streams.values()):
            self._on_reset(s, gone, by_peer=False)
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.guard.flushed()
        d = self._drain
        if d is not None:
            self._drain = None
            if not d.done():
                d.set_result(None)

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        READS.count += 1
        if self._closing or self._ended:      # the engine is done: the last streams finish
            return
        self.last_active = time.monotonic()
        conn = self.conn
        try:
            self.guard.scan(data)
            conn.receive_data(data)
            self._events(conn.events())
        except Abuse as e:
            self.owner.http2_abuse(e.kind)
            self._abort(e.goaway)
            return
        except NGH2Error as err:     # (its own name: compiled, one name has one type)
            # the engine gave up on the connection (a limit of its own, or used after its end)
            self.owner.http2_abuse("protocol_error")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("HTTP/2 engine error from %s: %s", self.peer, err)
            self._abort(None)
            return
        # what the engine answers is taken and handled now (a malformed request or a flood
        # ends the connection at once); acknowledgements and resets are written with the next
        # pass's flush, which the responses of the requests just read may share
        if self._take_sent():
            if self._ended:
                self._write_out()
            else:
                self._schedule_flush()

    # ---- events --------------------------------------------------------------------------------
    def _events(self, events: list[ngh2.Event]) -> None:
        new: list[H2Stream] | None = None
        streams = self.streams
        for e in events:
            # type(e) is X: one C call and a compare per branch (mypy narrows on it); the events
            # every stream has first
            if type(e) is RequestReceived:
                s = self._on_request(e)
                if s is not None:
                    if new is None:
                        new = [s]
                    else:
                        new.append(s)
            elif type(e) is StreamClosed:
                if e.error_code:            # closed normally: nothing to do
                    self._on_closed(e)
            elif type(e) is DataReceived:
                sid = e.stream_id
                s = streams.get(sid)
                data = e.data
                if s is None or s.reset or (s.body is not None and s.body.discarding):
                    if data:
                        self._credit(len(data), sid)
                else:
                    s.last_io = self.last_active
                    if s.chunks is not None:
                        s.chunks.append(data)
                    elif s.body is not None and data:
                        s.body.feed(data)
                    if e.end_stream and not s.ended:    # _end_of_request, inlined
                        s.ended = True
                        if s.body is not None:
                            s.body.feed_eof(s.trailers)
            elif type(e) is TrailersReceived:
                s = streams.get(e.stream_id)
                if s is not None:
                    try:
                        s.trailers = trailers_from_headers(list(e.headers))
                    except Malformed:
                        raise Abuse("malformed_trailers", ErrorCode.PROTOCOL_ERROR) from None
                    self._end_of_request(s)
            elif type(e) is WindowUpdated:
                if self._window_waiters:
                    self._wake_writers(e.stream_id)
            elif type(e) is StreamReset:          # the peer's RST_STREAM
                sid = self._peer_reset = e.stream_id
                s = streams.get(sid)
                self.guard.reset_by_peer(s is not None and not s.done and
                                         time.monotonic() - s.started < 1.0)
                if s is not None:
                    self._on_reset(s, ConnectionResetError("stream reset by the client"), True)
            elif type(e) is SettingsReceived:
                settings = e.settings
                if _SETTINGS_INITIAL_WINDOW_SIZE in settings and self._window_waiters:
                    self._wake_writers(0)
                if _SETTINGS_MAX_FRAME_SIZE in settings:
                    self._max_frame = settings[_SETTINGS_MAX_FRAME_SIZE]
            elif type(e) is GoAwayReceived:
                # the client is going away: finish what is open (after a graceful GOAWAY),
                # accept nothing new; a GOAWAY with an error ends everything now
                self._going_away = True
                if not streams or e.error_code:
                    self._closing = True
                    if self.transport is not None:
                        self.transport.close()
                    return
            elif type(e) is ConnectionClosed:
                self._on_engine_closed(e)
            elif type(e) is PingReceived:
                pass            # answered by the engine, counted by the guard
        if new is not None:
            for s in new:
                if not s.reset:
                    self._dispatch(s)

    def _end_of_request(self, s: H2Stream) -> None:
        if not s.ended:
            s.ended = True
            if s.body is not None:
                s.body.feed_eof(s.trailers)

    def _on_closed(self, e: StreamClosed) -> None:
        """The engine closed a stream. Closed with PROTOCOL_ERROR by the engine itself (not a
        reset of the peer's, not ours): nghttp2 found the request malformed (RFC 9113 8.1.1,
        8.2). A malformed header block (the request's, or its trailers) closes the connection
        without ``override_stream_error_on_invalid_http_message``, as in Envoy; a body that
        does not match its content-length only resets its stream (Envoy too)."""
        sid = e.stream_id
        code = e.error_code
        if not code or sid == self._peer_reset:
            return
        s = self.streams.get(sid)
        if code == ErrorCode.PROTOCOL_ERROR and not self._stream_errors and \
                (s is None or (not s.reset and sid in self.guard.trailer_streams)):
            raise Abuse("malformed_request", ErrorCode.PROTOCOL_ERROR)
        if s is not None and not s.reset:
            if code == ErrorCode.PROTOCOL_ERROR:
                self.owner.http2_abuse("malformed_request")
            self._on_reset(s, ConnectionResetError("stream reset"), False)
        elif s is None and code == ErrorCode.PROTOCOL_ERROR:
            self.owner.http2_abuse("malformed_request")

    def _on_engine_closed(self, e: ConnectionClosed) -> None:
        """The engine ended the connection (a GOAWAY of its own is in the output, or ours after
        the last stream). Past SETTINGS_MAX_CONCURRENT_STREAMS Envoy closes without a GOAWAY."""
        if e.error_code and _TOO_MANY_STREAMS in e.debug_data:
            raise Abuse("too_many_streams", None)
        if e.error_code:
            # a connection error: the engine's GOAWAY goes out and every stream ends with it
            self.owner.http2_abuse("protocol_error")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("HTTP/2 connection error from %s: %s %r", self.peer, e.error_code,
                          e.debug_data)
            self._failed = True
            gone = ConnectionResetError("HTTP/2 connection error")
            for s in list(self.streams.values()):
                self._on_reset(s, gone, by_peer=False)
        self._ended = True
        self._going_away = True

    def _on_request(self, e: RequestReceived) -> H2Stream | None:
        sid = e.stream_id
        owner = self.owner
        try:
            req = request_from_checked_headers(
                e.headers, owner.name, self.peer, owner.bound_port, self.tls, self.peer_identity,
                owner.headers_with_underscores, owner.max_header_bytes, owner.max_headers_count)
        except TooLarge:
            # Envoy: header_list_size_too_large / too_many_headers reset the stream, the
            # connection lives
            owner.http2_abuse("headers_too_large")
            self.conn.reset_stream(sid, ErrorCode.INTERNAL_ERROR)
            return None
        except Refused:
            # headers_with_underscores_action REJECT_REQUEST: Envoy's HTTP/2 codec resets the
            # stream (HTTP/1.1 gets a 400)
            owner.http2_abuse("underscore_header")
            self.conn.reset_stream(sid, ErrorCode.INTERNAL_ERROR)
            return None
        except Malformed as m:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("malformed HTTP/2 request from %s: %s", self.peer, m)
            if self._stream_errors:
                # counted when the engine reports the stream closed (``_on_closed``)
                self.conn.reset_stream(sid, ErrorCode.PROTOCOL_ERROR)
                return None
            raise Abuse("malformed_request", ErrorCode.PROTOCOL_ERROR) from None
        req.ctx.connection = self.conn_id
        s = H2Stream(sid, req, self.last_active)    # set as the frame was read
        self.streams[sid] = s
        if e.end_stream:
            s.ended = True
            s.chunks = None
        return s

    def _dispatch(self, s: H2Stream) -> None:
        req = s.req
        if s.chunks is not None:
            if s.ended:
                # the whole body came with the headers: a complete body, credited now
                data = s.chunks[0] if len(s.chunks) == 1 else b"".join(s.chunks)
                req.body = data
                req.trailers = s.trailers
                if data:
                    self.conn.acknowledge_received_data(len(data), s.sid)
                    if "content-length" not in req.headers:
                        req.chunked = True   # no length given: an HTTP/1.1 upstream gets chunks
            else:
                body = s.body = CreditedBody(self._credit_for(s.sid))
                for c in s.chunks:
                    if c:
                        body.feed(c)
                req.body = body
                req.chunked = "content-length" not in req.headers
                if req.headers.get("expect", "").lower() == "100-continue":
                    self.conn.send_informational_response(s.sid, [(b":status", b"100")])
            s.chunks = None
        if "expect" in req.headers:
            req.headers.popall("expect", None)     # answered here, never forwarded
        self.requests += 1
        assert self._loop is not None
        s.task = self._loop.create_task(self._serve(s))

    def _credit_for(self, sid: int) -> Callable[[int], None]:
        def credit(n: int) -> None:
            if not self._closing:
                try:
                    self.conn.acknowledge_received_data(n, sid)
                except (NGH2Error, ValueError):
                    return          # the stream or the connection is gone
                self._schedule_flush()
        return credit

    # ---- serving a stream ------------------------------------------------------------------------
    async def _serve(self, s: H2Stream) -> None:
        req = s.req
        owner = self.owner
        ctx = req.ctx
        if req.reject is not None:
            status, text = req.reject
            owner.protocol_error(status)
            resp = local_reply(ctx, status, text, "DPE")
        else:
            try:
                resp = await owner.dispatch(req)
            except asyncio.CancelledError:
                if s.timed_out is None:
                    raise
                resp = self._timeout_reply(s)     # unwound below (upstream reset, slots back)
            except Exception:
                log.exception("unhandled error in request chain")
                resp = local_reply(ctx, 500, "internal error", "DPE")
        sent = 0
        if s.reset or self._closing:
            resp.discard()
        else:
            try:
                body = resp.body
                if isinstance(body, bytes):
                    sent = self._respond_whole(s, req, resp, body)
                    if sent < 0:
                        sent = await self._finish_whole(s, resp, body)
                else:
                    sent = await self._respond_stream(s, req, resp, body)
            except StreamGone:
                resp.discard()
                sent = 0
            except asyncio.CancelledError:
                if s.timed_out is None:
                    raise
                _uncancel()
                resp.discard()
                if s.timed_out[2] not in ctx.flags:
                    ctx.flags.append(s.timed_out[2])
            except Exception as e:   # the upstream body failed mid-stream: reset this stream
                resp.discard()
                ctx.flags.append("UPE" if "protocol" in str(e) else "UR")
                self._reset(s, ErrorCode.INTERNAL_ERROR)
        owner.finish(req, resp, sent)
        self._stream_closed(s)

    def _timeout_reply(self, s: H2Stream) -> Response:
        """The local reply of a stream timeout that fired before the response (gRPC-shaped
        for gRPC clients, DEADLINE_EXCEEDED for the duration timeout, as Envoy)."""
        _uncancel()
        assert s.timed_out is not None
        status, text, flag = s.timed_out
        ctx = s.req.ctx
        if flag == "DT" and ctx.grpc:
            ctx.flags.append(flag)
            return grpc_reply(4, text)
        resp = local_reply(ctx, status, text, flag or None)
        return grpc_local_reply(resp) if ctx.grpc else resp

    def _reset(self, s: H2Stream, code: int) -> None:
        if not s.reset:
            s.reset = True
            try:
                self.conn.reset_stream(s.sid, code)
            except NGH2Error:
                pass    # the engine has closed the stream already: nothing to reset
            body = s.body
            if body is not None and not s.ended:
                # whoever still reads the request body (an upstream copying it) must stop
                body.feed_error(ConnectionResetError("stream reset"))
            self._discard_body(s)
            self._schedule_flush()

    def _on_reset(self, s: H2Stream, exc: BaseException, by_peer: bool) -> None:
        s.reset = True
        body = s.body
        if body is not None and not s.ended:
            body.feed_error(exc)
        self._discard_body(s)
        w = s.waiter
        if w is not None and not w.done():
            w.set_result(None)
        abort = s.req.ctx.abort
        if abort is not None and not s.done:
            s.req.ctx.abort = None
            abort()           # reset the upstream request too
        if s.task is None:
            self._stream_closed(s)   # never dispatched (reset in the batch that opened it)

    def _credit(self, n: int, sid: int) -> None:
        """Credit ``n`` bytes nobody will read (the stream may be gone: its connection window)."""
        try:
            self.conn.acknowledge_received_data(n, sid)
        except (NGH2Error, ValueError):
            pass        # the connection is ending: no window left to credit

    def _discard_body(self, s: H2Stream) -> None:
        body = s.body
        chunks = s.chunks
        n = 0
        if chunks:                 # reset before its dispatch: what arrived is credited
            s.chunks = None
            n = sum(map(len, chunks))
        if body is not None and not body.discarding:
            n += body.discard()
        if n and not self._closing:
            self._credit(n, s.sid)

    def _stream_closed(self, s: H2Stream) -> None:
        if self.streams.pop(s.sid, None) is None:
            return
        if s.chunks or s.body is not None:
            self._discard_body(s)
        guard = self.guard
        guard.stream_closed()
        if guard.trailer_streams:
            guard.trailer_streams.discard(s.sid)
        self.last_active = time.monotonic()
        if not self.streams and (self._going_away or self._ended) and not self._closing:
            self._close()

    # ---- output ----------------------------------------------------------------------------------
    def _flush(self) -> None:
        """One write of everything the engine has ready. What the engine reports on sending
        (streams it closed, its own end) is handled first: a malformed request or a flood found
        by the engine closes the connection without what was queued."""
        self._flush_handle = None
        if not self._closing and self._take_sent():     # (closing: its last write is done)
            self._write_out()

    def _take_sent(self) -> bool:
        """Take what the engine has ready (into ``_out``) and handle what sending it did;
        False if that aborted the connection."""
        conn = self.conn
        try:
            data = conn.data_to_send()
            events = conn.events()
            if events:
                self._events(events)
        except Abuse as e:
            self.owner.http2_abuse(e.kind)
            self._abort(e.goaway)
            return False
        except NGH2Error:
            data = b""
            self._ended = True
        if data:
            self._out.append(data)
        return True

    def _write_out(self) -> None:
        """One write of what was taken; the socket closes once the engine has ended."""
        out = self._out
        t = self.transport
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if t is not None and not t.is_closing():
                t.write(data)
                if not self._write_paused:
                    self.guard.flushed()        # the transport took it all
        if self._ended and (self._failed or not self.streams) and not self._closing:
            self._closing = True
            if t is not None and not t.is_closing():
                t.close()

    def _abort(self, goaway: int | None = None) -> None:
        """Close now (abuse): with a GOAWAY of ``goaway``'s code, or silently."""
        if self._closing:
            return
        self._closing = True
        self._out.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        t = self.transport
        if t is None:
            return
        if goaway is not None:
            conn = self.conn
            try:
                conn.data_to_send()          # nothing else goes out
                conn.terminate_connection(goaway, last_stream_id=self.guard.last_stream_id)
                t.write(conn.data_to_send())
            except NGH2Error:
                pass    # the engine ended first: the socket just closes
            t.close()       # the GOAWAY is flushed before the socket closes
        else:
            t.abort()


def _uncancel() -> None:
    """The cancellation of a stream's task by its timeout was handled: later awaits of the
    task run normally."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
