"""Upstream HTTP/2: a few connections per endpoint, requests multiplexed as streams (``h2``).

``Http2Pool`` (``sidecar.upstream.http2_pool``) keeps the connections to one endpoint. A request takes a stream slot on a ready
connection that has room (``acquire``); with none, it waits in the pool (the cluster counts it
as *pending*, Envoy's accounting) while one request opens another connection, if the cluster's
``max_connections`` allows. A connection's room is the smaller of the peer's
SETTINGS_MAX_CONCURRENT_STREAMS and the cluster's ``max_concurrent_streams``; until the peer's
SETTINGS arrive a connection is not used. A GOAWAY stops new streams on that connection; the
streams it covers finish, the others fail as refused (safe to retry anywhere), and the
connection closes when its last stream ends.

Request bodies are sent as the peer's windows allow (concurrently with the response, so
bidirectional streams work); response bodies credit the peer's window as they are read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import h2.events as ev
import h2.exceptions
import h2.settings
from hpack import NeverIndexedHeaderTuple
from multidict import MultiDict

from sidecar.codec.headers import NOT_FORWARDED, connection_drop
from sidecar.codec.http2_common import (
    CONNECTION_SPECIFIC_STR,
    VOLATILE,
    BoundedDecoder,
    ClientH2Connection,
    CreditedBody,
    ErrorCodes,
    client_config,
    goaway_frame,
)
from sidecar.codec.http2_request import Malformed, response_from_headers, trailers_from_headers
from sidecar.core.body import BodySource, Headers
from sidecar.core.errors import (
    ConnectFailure,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.core.message import Request, Response

if TYPE_CHECKING:
    from sidecar.upstream.http2_pool import Http2Pool

S = h2.settings.SettingCodes
_DROP = NOT_FORWARDED | {"host"} | CONNECTION_SPECIFIC_STR


def request_headers(req: Request, authority: str, scheme: str) -> list[tuple[bytes, bytes]]:
    """The HEADERS of ``req`` for an HTTP/2 upstream: pseudo-headers from the request line and
    Host; no connection-specific headers (RFC 9113 8.2.2), ``te`` only as "trailers"."""
    headers = req.headers
    drop = connection_drop(_DROP, headers.get("connection"))
    url = req.path + "?" + req.query if req.query else req.path
    out = [(b":method", req.method.encode("latin-1")), (b":scheme", scheme.encode()),
           (b":authority", authority.encode("latin-1")), (b":path", url.encode("latin-1"))]
    te_trailers = False
    append = out.append
    for k, v in headers.items():
        if k in drop:
            if k == "te" and not te_trailers and "trailers" in v.lower():
                te_trailers = True
                append((b"te", b"trailers"))
            continue
        kb = k.encode("latin-1")
        # header() inlined: a call per field is a measurable part of the request
        append((kb, v.encode("latin-1")) if kb not in VOLATILE else
               NeverIndexedHeaderTuple(kb, v.encode("latin-1")))
    cl = headers.get("content-length")
    if cl is not None:
        append((b"content-length", cl.encode("latin-1")))
    return out


class _Stream:
    __slots__ = ("sid", "fut", "status", "headers", "chunks", "body", "trailers", "ended",
                 "reset", "timer", "pump", "sent_end", "released", "whole_ok")

    def __init__(self, sid: int, fut: asyncio.Future[Response]) -> None:
        self.sid = sid
        self.fut: asyncio.Future[Response] | None = fut
        self.status = 0
        self.headers: Headers | None = None
        self.chunks: list[bytes] | None = None   # DATA of the batch the headers came in
        self.body: CreditedBody | None = None
        self.trailers: Headers | None = None
        self.ended = False            # the response is complete
        self.reset = False
        self.timer: asyncio.TimerHandle | None = None
        self.pump: asyncio.Task[None] | None = None
        self.sent_end = False         # our request is complete
        self.released = False         # the stream slot went back to the pool
        # a response complete on arrival may be handed over as bytes (+ trailers) whatever its
        # length header says: the client speaks HTTP/2, whose framing needs no length
        self.whole_ok = False


class Http2UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: Http2Pool) -> None:
        self.pool = pool
        self.options = pool.options
        self.conn = ClientH2Connection(client_config())
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.used = 0                 # stream slots taken (reserved or open)
        self.peer_max = 2**31 - 1     # the peer's SETTINGS_MAX_CONCURRENT_STREAMS
        self.draining = False         # no new streams (GOAWAY, or closing)
        self.closed = False
        self.idle_since = time.monotonic()
        self.requests = 0
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._waiting: set[_Stream] = set()
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._max_frame = 16384
        self._goaway_last: int | None = None

    @property
    def capacity(self) -> int:
        return min(self.peer_max, self.options.max_concurrent_streams)

    def has_room(self) -> bool:
        return not self.draining and not self.closed and self.ready.done() and \
            self.used < self.capacity

    # ---- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's is not a subclass
        o = self.options
        conn = self.conn
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            S.ENABLE_PUSH: 0,
            S.INITIAL_WINDOW_SIZE: o.initial_stream_window_size,
            S.HEADER_TABLE_SIZE: o.hpack_table_size,
        })
        conn.decoder = BoundedDecoder(1024 * 1024)
        conn.decoder.max_allowed_table_size = o.hpack_table_size
        conn.initiate_connection()
        extra = o.initial_connection_window_size - 65535
        if extra > 0:
            conn.increment_flow_control_window(extra)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.draining = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
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
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            err = UpstreamProtocolError(f"upstream protocol error: {e}")
            if not self.ready.done():
                self.ready.set_exception(ConnectFailure(f"upstream is not speaking HTTP/2: {e}"))
                self.ready.exception()
            for st in list(self.streams.values()):
                self._fail(st, err)
            self._flush()
            self.close()
            return
        got: list[_Stream] = []
        streams = self.streams
        s: _Stream | None
        conn = self.conn
        for event in events:
            if isinstance(event, ev.DataReceived):
                s = streams.get(event.stream_id)
                if s is None or s.reset or (s.body is not None and s.body.discarding):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    continue
                pad = event.flow_controlled_length - len(event.data)
                if pad:
                    conn.acknowledge_received_data(pad, event.stream_id)
                if s.chunks is not None:
                    s.chunks.append(event.data)
                elif s.body is not None and event.data:
                    s.body.feed(event.data)
            elif isinstance(event, ev.ResponseReceived):
                s = streams.get(event.stream_id)
                if s is not None and not s.reset:
                    try:
                        s.status, s.headers = response_from_headers(event.headers)
                    except Malformed as m:
                        self._malformed(s, m)
                        continue
                    s.chunks = []
                    got.append(s)
            elif isinstance(event, ev.TrailersReceived):
                s = streams.get(event.stream_id)
                if s is not None and not s.reset:
                    try:
                        s.trailers = trailers_from_headers(event.headers)
                    except Malformed as m:
                        self._malformed(s, m)
            elif isinstance(event, ev.StreamEnded):
                s = streams.get(event.stream_id)
                if s is not None:
                    s.ended = True
                    if s.body is not None:
                        s.body.feed_eof(s.trailers)
                        self._stream_done(s)
            elif isinstance(event, ev.StreamReset):
                s = streams.get(event.stream_id)
                if s is not None:
                    if s.ended and event.error_code == ErrorCodes.NO_ERROR:
                        self._stream_done(s)      # "stop sending": the response is complete
                    else:
                        refused = event.error_code == ErrorCodes.REFUSED_STREAM
                        self._fail(s, UpstreamReset(
                            "UR", "refused stream" if refused else
                            f"upstream reset: {ErrorCodes(event.error_code).name}"
                            if event.error_code in ErrorCodes._value2member_map_ else
                            f"upstream reset: {event.error_code}", sent=not refused))
            elif isinstance(event, ev.WindowUpdated):
                self._wake(event.stream_id)
            elif isinstance(event, ev.RemoteSettingsChanged):
                changed = event.changed_settings
                if S.MAX_CONCURRENT_STREAMS in changed:
                    self.peer_max = changed[S.MAX_CONCURRENT_STREAMS].new_value
                if S.MAX_FRAME_SIZE in changed:
                    self._max_frame = self.conn.max_outbound_frame_size
                if S.INITIAL_WINDOW_SIZE in changed:
                    self._wake(0)
                if not self.ready.done():
                    self.ready.set_result(None)
                    self.pool.connection_ready(self)
                else:
                    self.pool.room_changed()
            elif isinstance(event, ev.ConnectionTerminated):
                self._on_goaway(int(event.error_code or 0), event.last_stream_id or 0)
        for s in got:
            if not s.reset:
                self._deliver(s)
        self._flush()

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
                self.conn.acknowledge_received_data(len(data), s.sid)
            resp = Response(s.status, headers, data)
            resp.trailers = s.trailers
            self._stream_done(s)
        else:
            # streamed (or without a length: an HTTP/1.1 client gets it chunked, as from Envoy)
            body = s.body = CreditedBody(self._credit_for(s.sid))
            if data:
                body.feed(data)
            resp = Response(s.status, headers, body)
            if s.ended:
                body.feed_eof(s.trailers)
                self._stream_done(s)
            else:
                resp.release = lambda: self._abandon(s)
        s.fut = None
        if fut is not None and not fut.done():
            fut.set_result(resp)
        else:
            resp.discard()

    def _malformed(self, s: _Stream, m: Malformed) -> None:
        """A malformed response (RFC 9113 8.1.1): a stream error, the connection lives."""
        self._reset(s, ErrorCodes.PROTOCOL_ERROR,
                    UpstreamProtocolError(f"upstream protocol error: malformed response ({m})"))

    def _credit_for(self, sid: int) -> Callable[[int], None]:
        def credit(n: int) -> None:
            if not self.closed:
                self.conn.acknowledge_received_data(n, sid)
                self._schedule_flush()
        return credit

    def _abandon(self, s: _Stream) -> None:
        """The consumer gave up on the response body: reset the stream."""
        if not s.ended:
            self._reset(s, ErrorCodes.CANCEL)

    def _fail(self, s: _Stream, err: UpstreamError) -> None:
        s.reset = True
        fut = s.fut
        if fut is not None:
            s.fut = None
            if not fut.done():
                fut.set_exception(err)
        elif s.body is not None and not s.ended:
            s.body.feed_error(err)
        self._stream_done(s)

    def _reset(self, s: _Stream, code: int, err: UpstreamError | None = None) -> None:
        """Reset the stream (``code`` to the peer); whoever awaits its response gets ``err``."""
        if s.reset:
            return
        s.reset = True
        if err is None:
            err = UpstreamReset("UR", "stream reset (request abandoned)")
        fut = s.fut
        if fut is not None:
            s.fut = None
            if not fut.done():
                fut.set_exception(err)
        elif s.body is not None and not s.ended:
            s.body.feed_error(err)
        if not self.closed:
            try:
                self.conn.reset_stream(s.sid, code)
            except h2.exceptions.StreamClosedError:
                pass
            self._schedule_flush()
        if s.body is not None and not s.body.discarding:
            n = s.body.discard()
            if n and not self.closed:
                self.conn.acknowledge_received_data(n, s.sid)
        self._stream_done(s)

    def _stream_done(self, s: _Stream) -> None:
        """The response is complete (or the stream is gone): the slot goes back once our
        request is complete too (a stream is open until both sides ended)."""
        if s.timer is not None and (s.reset or s.ended):
            s.timer.cancel()
            s.timer = None
        if not (s.reset or (s.ended and s.sent_end)):
            return
        if s.pump is not None and not s.pump.done() and s.reset:
            s.pump.cancel()
        w = self._waiters.pop(s.sid, None)
        if w is not None and not w.done():
            w.set_result(None)
        if self.streams.pop(s.sid, None) is None or s.released:
            return
        s.released = True
        self.conn.forget(s.sid)
        self.used -= 1
        self.idle_since = time.monotonic()
        if self.draining and not self.streams:
            self.close()
        else:
            self.pool.room_changed()

    def _on_timeout(self, s: _Stream) -> None:
        s.timer = None
        self._reset(s, ErrorCodes.CANCEL, UpstreamTimeout())

    def _on_goaway(self, code: int, last_stream_id: int) -> None:
        self.draining = True
        self._goaway_last = last_stream_id
        for s in list(self.streams.values()):
            if s.sid > last_stream_id:
                # never processed by the peer: safe to send again, anywhere
                self._fail(s, UpstreamReset("UR", "refused stream (GOAWAY)", sent=False))
        if code != 0:
            # h2 closed the connection: what is open cannot finish
            for s in list(self.streams.values()):
                self._fail(s, UpstreamReset("UR", f"upstream GOAWAY {code}"))
        self.pool.room_changed()
        if not self.streams or code != 0:
            self.close()

    # ---- requests --------------------------------------------------------------------------------
    async def send(self, req: Request, authority: str, deadline: float | None) -> Response:
        """Send ``req`` on a slot taken with ``Http2Pool.acquire``; the response head."""
        loop = asyncio.get_running_loop()
        conn = self.conn
        self.requests += 1
        try:
            sid = conn.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.draining = True
            self.used -= 1
            raise UpstreamReset("UR", "no stream ids left", sent=False) from None
        fut: asyncio.Future[Response] = loop.create_future()
        s = _Stream(sid, fut)
        s.whole_ok = req.version == "2"
        self.streams[sid] = s
        body = req.body
        trailers = req.trailers
        scheme = "https" if self.pool.ssl is not None else "http"
        block = request_headers(req, authority, scheme)
        end_now = isinstance(body, bytes) and not body and not trailers
        try:
            conn.send_headers(sid, block, end_stream=end_now)
        except h2.exceptions.ProtocolError as e:
            self._fail(s, UpstreamProtocolError(f"cannot send the request: {e}"))
            raise UpstreamProtocolError(f"cannot send the request: {e}") from None
        if end_now:
            s.sent_end = True
        elif isinstance(body, bytes) and len(body) <= conn.local_flow_control_window(sid) \
                and len(body) <= self._max_frame and not trailers:
            conn.send_data(sid, body, end_stream=True)     # the common small body: no task
            s.sent_end = True
        else:
            s.pump = loop.create_task(self._send_body(s, body, trailers))
        # one write per loop turn for every stream started in it (a write to a loopback peer
        # costs as much as the rest of the request): requests dispatched from one downstream
        # read share a syscall
        self._schedule_flush()
        if deadline is not None:
            s.timer = loop.call_at(deadline, self._on_timeout, s)
        ctx = req.ctx
        ctx.abort = lambda: self._reset(s, ErrorCodes.CANCEL)
        try:
            return await fut
        except asyncio.CancelledError:
            self._reset(s, ErrorCodes.CANCEL)
            raise
        finally:
            if ctx.abort is not None and s.reset:
                ctx.abort = None

    async def _send_body(self, s: _Stream, body: bytes | BodySource, trailers: Headers | None) -> None:
        try:
            if isinstance(body, bytes):
                await self._send_data(s, body)
            else:
                async for chunk in body:
                    if s.reset:
                        return
                    if chunk:
                        await self._send_data(s, chunk)
                trailers = body.trailers or trailers
            if s.reset or self.closed:
                return
            if trailers:
                self.conn.send_headers(s.sid, [(k.encode("latin-1"), v.encode("latin-1"))
                                               for k, v in trailers.items()
                                               if k not in CONNECTION_SPECIFIC_STR],
                                       end_stream=True)
            else:
                self.conn.end_stream(s.sid)
            s.sent_end = True
            self._schedule_flush()
            if s.ended:
                self._stream_done(s)
        except asyncio.CancelledError:
            pass
        except h2.exceptions.StreamClosedError:
            s.sent_end = True
            self._stream_done(s)
        except Exception as e:     # the downstream body failed (client gone): reset upstream
            self._reset(s, ErrorCodes.CANCEL, UpstreamReset("UR", f"request body: {e}"))

    async def _send_data(self, s: _Stream, data: bytes) -> None:
        conn = self.conn
        view = memoryview(data)
        pos, total = 0, len(data)
        loop = asyncio.get_running_loop()
        while pos < total:
            if s.reset or self.closed:
                raise h2.exceptions.StreamClosedError(s.sid)
            window = conn.local_flow_control_window(s.sid)
            if window <= 0:
                w = self._waiters[s.sid] = loop.create_future()
                await w
                continue
            n = min(window, total - pos, self._max_frame)
            conn.send_data(s.sid, data if n == total else view[pos:pos + n])
            pos += n
            self._schedule_flush()
            if self._write_paused:
                self._flush()
                d = self._drain
                if d is None or d.done():
                    d = self._drain = loop.create_future()
                await d

    def _wake(self, sid: int) -> None:
        if sid == 0:
            waiters = list(self._waiters.values())
            self._waiters.clear()
        else:
            w = self._waiters.pop(sid, None)
            waiters = [w] if w is not None else []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # ---- output ----------------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if self._flush_handle is None and not self.closed:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        data = self.conn.data_to_send()
        t = self.transport
        if data and t is not None and not t.is_closing():
            t.write(data)

    def close(self) -> None:
        """Close (gracefully when idle: a GOAWAY NO_ERROR first)."""
        if self.closed:
            return
        self.draining = True
        t = self.transport
        if t is not None and not t.is_closing():
            self._flush()
            if not self.streams:
                t.write(goaway_frame(0))
            t.close()
        self.closed = True
        self.pool.forget(self)
