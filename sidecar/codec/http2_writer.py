"""The response side of a downstream HTTP/2 connection (``sidecar.codec.http2``): a stream's
state, its response head, a complete body queued at once without a coroutine when it fits the
client's windows, a streamed body queued as the windows allow (the writer parks until a
WINDOW_UPDATE or the transport drains), trailers, and the outbound frame counts of
``Http2Guard``. ``ResponseWriter`` is a base of ``Http2Connection``: the connection owns the
state it reads (declared below) and the three steps it calls back (``_reset``, ``_flush``,
``_abort``)."""

from __future__ import annotations

import asyncio
import time
from typing import NoReturn

import ngh2
from ngh2 import ErrorCode, NGH2Error

from sidecar.codec.consolidate import Consolidation
from sidecar.codec.http2_common import CreditedBody
from sidecar.codec.http2_guard import Abuse, Http2Guard
from sidecar.codec.http2_response import (
    CONNECTION_DROP,
    DROP_OUT,
    OUT_NAMES,
    STATUS,
    connection_drop,
    date_field,
    out_field,
    server_field,
    trailer_block,
)
from sidecar.codec.stream_owner import StreamOwner
from sidecar.core.body import BodySource, Headers
from sidecar.core.message import Request, Response

_BODYLESS = (204, 304)
# a streamed response body queued in the engine beyond this waits for the peer's windows
_QUEUE_HIGH = 64 * 1024


class H2Stream:
    __slots__ = ("sid", "req", "chunks", "body", "trailers", "ended", "reset", "done", "started",
                 "waiter", "task", "last_io", "responding", "timed_out")

    def __init__(self, sid: int, req: Request, now: float) -> None:
        self.sid = sid
        self.req = req
        self.chunks: list[bytes] | None = []   # DATA of this batch, until dispatch
        self.body: CreditedBody | None = None
        self.trailers: Headers | None = None
        self.ended = False                     # the client finished sending
        self.reset = False                     # reset by either side: nothing more to write
        self.done = False                      # our response is complete
        self.started = now                     # when its HEADERS were read (monotonic)
        self.waiter: asyncio.Future[None] | None = None    # window or drain
        self.task: asyncio.Task[None] | None = None
        self.last_io = self.started          # last frame of this stream, either way
        self.responding = False              # our response headers went out
        self.timed_out: tuple[int, str, str] | None = None   # a stream timeout fired


class StreamGone(Exception):
    """The stream was reset (or the connection is closing) while its response was written."""


class ResponseWriter:
    """The response side of ``Http2Connection`` (see the module docstring)."""

    # the connection's state this side reads and writes (set by ``Http2Connection.__init__``)
    owner: StreamOwner
    conn: ngh2.Connection
    guard: Http2Guard
    _server: tuple[str, tuple[bytes, bytes]]
    _max_frame: int
    _write_paused: bool
    _closing: bool
    _flush_handle: asyncio.Handle | None
    _quiet: Consolidation
    _loop: asyncio.AbstractEventLoop | None
    _drain: asyncio.Future[None] | None
    _window_waiters: set[H2Stream]
    _out: list[bytes]
    # the connection's steps this side calls (methods, not attributes: a compiled class
    # resolves them on the subclass)
    def _reset(self, s: H2Stream, code: int) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _abort(self, goaway: int | None = None) -> None:
        raise NotImplementedError

    def _response_headers(self, req: Request, resp: Response) -> list[ngh2.Header]:
        headers = resp.headers
        out: list[ngh2.Header] = [STATUS.get(resp.status) or
                                  (b":status", str(resp.status).encode())]
        conn_tokens = headers.get("connection")
        if conn_tokens:
            # ``keep-alive`` (nginx, on every response) and ``close`` come precomputed
            drop = CONNECTION_DROP.get(conn_tokens) or connection_drop(conn_tokens)
        else:
            drop = DROP_OUT
        append = out.append
        names = OUT_NAMES
        for k, v in headers.items():
            if k in drop:
                continue
            kb = names.get(k)        # the names that repeat, encoded once (never a volatile one)
            if kb is not None:
                append((kb, v.encode("latin-1")))
            else:
                out_field(out, k, v)
        server = self._server
        if server[0] is not self.owner.server_name:
            server = self._server = server_field(self.owner.server_name)
        append(server[1])
        if "date" not in headers:
            append(date_field())
        duration = req.ctx.upstream_duration
        if duration is not None and not self.owner.suppress_envoy_headers:
            # indexed, as Envoy's is: whole milliseconds repeat, so after the first few
            # responses it is a one-byte index; never indexed, its 29-byte name went out
            # literally in every response (the name never entered the table)
            append((b"x-envoy-upstream-service-time", str(int(duration * 1000)).encode()))
        return out

    def _respond_whole(self, s: H2Stream, req: Request, resp: Response, body: bytes) -> int:
        """A complete ``bytes`` body, without a coroutine: the headers and the body queued at
        once (one frame count, one flush). The bytes sent, or -1 when what is queued does not
        fit the peer's windows (or the transport is paused): the caller then awaits
        ``_finish_whole``."""
        head = self._response_headers(req, resp)
        status = resp.status
        if status < 200 or status in _BODYLESS or req.method == "HEAD":
            self._send_headers(s, head, True)
            resp.discard()
            return 0
        trailers = resp.trailers
        if not body:
            self._send_headers(s, head, not trailers)  # gRPC trailers-only replies: no trailers
            if trailers:
                self._send_trailers(s, trailer_block(trailers))
            return 0
        if resp.local and "content-length" not in resp.headers:
            head.append((b"content-length", str(len(body)).encode()))
        if s.reset:
            raise StreamGone()
        conn = self.conn
        sid = s.sid
        try:
            conn.send_response(sid, head, end_stream=False)
        except NGH2Error:
            raise StreamGone() from None
        s.responding = True
        end = not trailers
        try:
            conn.send_data(sid, body, end_stream=end)
        except NGH2Error:
            self._count_frame()
            raise StreamGone() from None
        try:
            queued = conn.queued_body_size(sid)
            fits = queued <= _QUEUE_HIGH and queued <= conn.remote_window_size and \
                queued <= conn.stream_remote_window_size(sid) and not self._write_paused
            if fits and trailers:        # all of it will go out: the trailers follow now
                conn.send_trailers(sid, trailer_block(trailers))
        except NGH2Error:
            raise StreamGone() from None
        try:
            # the DATA frames, the HEADERS before them (and the trailers after): one check
            self.guard.data_sent(-(-len(body) // self._max_frame), 2 if fits and trailers else 1)
        except Abuse as e:
            self._outbound_abuse(e)
        s.last_io = time.monotonic()
        if not fits:
            return -1
        s.done = True
        if not s.ended and not s.reset:
            self._after_end(s)
        if self._flush_handle is None and not self._closing:
            assert self._loop is not None
            self._quiet.start()
            self._flush_handle = self._loop.call_soon(self._flush_when_quiet)
        return len(body)

    async def _finish_whole(self, s: H2Stream, resp: Response, body: bytes) -> int:
        """The rest of ``_respond_whole`` once its body fits the windows."""
        await self._data_fits(s)
        trailers = resp.trailers
        if not trailers:
            self._after_end(s)
        self._schedule_flush()
        if trailers:
            self._send_trailers(s, trailer_block(trailers))
        return len(body)

    async def _respond_stream(self, s: H2Stream, req: Request, resp: Response,
                              body: BodySource) -> int:
        head = self._response_headers(req, resp)
        status = resp.status
        if req.method == "HEAD" or status in _BODYLESS or status < 200:
            self._send_headers(s, head, True)
            resp.discard()
            return 0
        self._send_headers(s, head, False)
        sent = 0
        async for chunk in body:
            if s.reset:
                raise StreamGone()
            if chunk:
                sent += len(chunk)
                if not self._queue_data(s, chunk, False):   # a slow reader holds the writer
                    await self._data_fits(s)
                self._schedule_flush()
        trailers = body.trailers
        if s.reset:
            raise StreamGone()
        if trailers:
            self._send_trailers(s, trailer_block(trailers))
        else:
            try:
                self.conn.end_stream(s.sid)
            except NGH2Error:
                raise StreamGone() from None
            self._count_frame()
            self._after_end(s)
            self._schedule_flush()
        return sent

    def _count_frame(self, data: int = 0) -> None:
        """Frames queued from a stream's task (``data``: DATA frames, else one other): over the
        outbound limit the connection goes."""
        try:
            if data:
                self.guard.data_sent(data)
            else:
                self.guard.frame_queued()
        except Abuse as e:
            self._outbound_abuse(e)

    def _outbound_abuse(self, e: Abuse) -> NoReturn:
        """A stream's task queued past an outbound limit: the connection goes."""
        self.owner.http2_abuse(e.kind)
        self._abort(e.goaway)
        raise StreamGone() from None

    def _send_headers(self, s: H2Stream, block: list[ngh2.Header], end: bool) -> None:
        if s.reset:
            raise StreamGone()
        try:
            self.conn.send_response(s.sid, block, end_stream=end)
        except NGH2Error:
            raise StreamGone() from None
        s.responding = True
        s.last_io = time.monotonic()
        self._count_frame()
        if end:
            self._after_end(s)
        self._schedule_flush()

    def _send_trailers(self, s: H2Stream, block: list[ngh2.Header]) -> None:
        if s.reset:
            raise StreamGone()
        try:
            self.conn.send_trailers(s.sid, block)
        except NGH2Error:
            raise StreamGone() from None
        s.last_io = time.monotonic()
        self._count_frame()
        self._after_end(s)
        self._schedule_flush()

    def _queue_data(self, s: H2Stream, data: bytes, end: bool) -> bool:
        """Queue ``data`` in the engine (it sends as the windows allow); whether what is queued
        for the stream fits the peer's windows (so the next flush sends it all) and the
        transport is not paused: else the writer waits (``_data_fits``)."""
        if s.reset:
            raise StreamGone()
        conn = self.conn
        sid = s.sid
        try:
            conn.send_data(sid, data, end_stream=end)
        except NGH2Error:
            raise StreamGone() from None
        self._count_frame(data=-(-len(data) // self._max_frame))
        s.last_io = time.monotonic()
        try:
            queued = conn.queued_body_size(sid)
            return queued <= _QUEUE_HIGH and queued <= conn.remote_window_size and \
                queued <= conn.stream_remote_window_size(sid) and not self._write_paused
        except NGH2Error:
            raise StreamGone() from None

    async def _data_fits(self, s: H2Stream) -> None:
        """Wait until what is queued for ``s`` fits the peer's windows (flushing what they
        allow first), then for the transport to drain if it is paused."""
        conn = self.conn
        sid = s.sid
        try:
            flushed = False
            while True:
                queued = conn.queued_body_size(sid)
                if queued <= _QUEUE_HIGH and queued <= conn.remote_window_size and \
                        queued <= conn.stream_remote_window_size(sid):
                    break
                if not flushed:
                    self._flush()      # what the windows allow goes out now
                    flushed = True
                    continue
                flushed = False
                await self._wait(s, True)    # the rest waits for the client's WINDOW_UPDATE
        except NGH2Error:
            raise StreamGone() from None
        if self._write_paused:
            self._flush()
            await self._wait(s, False)

    async def _wait(self, s: H2Stream, for_window: bool) -> None:
        """Park a writer until the peer's window opens (or the transport drains)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None]
        if for_window:
            fut = s.waiter = loop.create_future()
            self._window_waiters.add(s)
            self._flush()
        else:
            drain = self._drain
            if drain is None or drain.done():
                drain = self._drain = loop.create_future()
            fut = drain
        try:
            await fut
        finally:
            if for_window:
                s.waiter = None
                self._window_waiters.discard(s)
        if s.reset or self._closing:
            raise StreamGone()

    def _wake_writers(self, sid: int) -> None:
        for s in list(self._window_waiters):
            if sid == 0 or s.sid == sid:
                w = s.waiter
                if w is not None and not w.done():
                    w.set_result(None)

    def _after_end(self, s: H2Stream) -> None:
        s.done = True
        if not s.ended and not s.reset:
            # answered before the client finished sending: stop its upload (as Envoy does),
            # after the response (taken from the engine first: a reset drops what it queued)
            self._take_output()
            self._reset(s, ErrorCode.NO_ERROR)

    def _flush_when_quiet(self) -> None:
        """A whole response is written once the loop has gone a pass without reading, with
        the responses completed meanwhile (``codec.consolidate``)."""
        self._flush_handle = None
        if self._closing:
            return
        if self._quiet.wait_more():
            assert self._loop is not None
            self._flush_handle = self._loop.call_soon(self._flush_when_quiet)
        else:
            self._flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and not self._closing:
            assert self._loop is not None
            self._flush_handle = self._loop.call_soon(self._flush)

    def _take_output(self) -> None:
        """Take what the engine has ready now (written with the next flush)."""
        try:
            data = self.conn.data_to_send()
        except NGH2Error:
            return
        if data:
            self._out.append(data)
