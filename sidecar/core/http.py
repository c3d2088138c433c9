"""Per-request objects that flow through the filter chain.

Headers are a ``multidict.MultiDict`` keyed by lower-case names (the HTTP/1 parser lowers them
once, as Envoy does), so filters look up ``req.headers.get("authorization")`` without case folding.

A body is either ``bytes`` (already complete: the common small-request case, and anything a
filter buffered) or a ``BodyStream`` that yields chunks as they arrive from the socket.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

from multidict import MultiDict

Headers = MultiDict  # lower-case str names -> str values (latin-1 decoded)


class BodyTooLarge(Exception):
    """A body exceeded the buffering limit of the feature that wanted to buffer it."""


class BodyStream:
    """Chunks of a body arriving from a socket, with flow control.

    The producer (a protocol) calls ``feed``/``feed_eof``/``feed_error``; when more than
    ``high_water`` bytes wait unread it calls ``pause()``, and reading below ``low_water``
    calls ``resume()`` so a 1 GB transfer moves in bounded memory.
    """

    __slots__ = ("_chunks", "_size", "_eof", "_exc", "_waiter", "_pause", "_resume",
                 "_paused", "high_water", "total")

    def __init__(self, pause: Callable[[], None] | None = None,
                 resume: Callable[[], None] | None = None, high_water: int = 256 * 1024):
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False
        self.high_water = high_water
        self.total = 0  # bytes fed so far

    # producer side
    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.total += len(data)
        if self._size > self.high_water and not self._paused and self._pause is not None:
            self._paused = True
            self._pause()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def feed_error(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    # consumer side
    async def read(self) -> bytes:
        """Next chunk, or b"" at the end. Raises the producer's error (reset, timeout)."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if len(self._chunks) == 1:
            data = self._chunks[0]
            self._chunks.clear()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self._size = 0
        if self._paused and self._resume is not None:
            self._paused = False
            self._resume()
        return data

    async def read_all(self, limit: int) -> bytes:
        parts = []
        size = 0
        while True:
            chunk = await self.read()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(size)
            parts.append(chunk)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.read()
            if not chunk:
                return
            yield chunk


Body = Union[bytes, BodyStream]


class RequestContext:
    """Per-request state shared by the filters of one request (never global)."""

    __slots__ = ("listener", "route", "downstream_addr", "request_id", "start", "flags",
                 "attempts", "tried_hosts", "jwt_payloads", "span", "deadline",
                 "upstream_host", "cluster", "peer_identity", "upstream_start",
                 "upstream_duration", "bytes_received", "bytes_sent", "vhost", "extra",
                 "tls", "hash_key")

    def __init__(self, listener: Any, downstream_addr: tuple | None, start: float):
        self.listener = listener
        self.route = None          # CompiledRoute
        self.vhost = None
        self.downstream_addr = downstream_addr
        self.request_id = ""
        self.start = start
        self.flags: list[str] = []  # response flags, Envoy's short codes (NR, UH, UF, ...)
        self.attempts = 0
        self.tried_hosts: list = []
        self.jwt_payloads: dict[str, dict] = {}
        self.span = None
        self.deadline: float | None = None
        self.upstream_host: str = ""
        self.cluster: str = ""
        self.peer_identity: str | None = None  # mTLS peer URI SAN, when TLS is used
        self.upstream_start = 0.0
        self.upstream_duration: float | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.extra: dict[str, Any] = {}
        self.tls = False
        self.hash_key: int | None = None   # set from the route's hash_policy (ring hash LB)


class Request:
    __slots__ = ("method", "path", "query", "headers", "body", "ctx", "version", "authority",
                 "keep_alive", "chunked", "reject")

    def __init__(self, method: str, path: str, query: str, headers: Headers, body: Body,
                 ctx: RequestContext, version: str = "1.1"):
        self.method = method
        self.path = path        # path only, as received (percent-encoding kept)
        self.query = query      # raw query string without "?", "" when absent
        self.headers = headers
        self.body = body
        self.ctx = ctx
        self.version = version
        self.authority = headers.get("host", "")
        self.keep_alive = True   # the client's wish for this request (captured at parse time)
        self.chunked = False     # the client sent the body chunked (kept upstream, as Envoy does)
        self.reject: Optional[tuple[int, str]] = None   # set by the codec: answer locally, close

    @property
    def url(self) -> str:
        return self.path + "?" + self.query if self.query else self.path

    async def read_body(self, limit: int) -> bytes:
        """Buffer the whole body (up to ``limit``), replacing the stream so it can be replayed."""
        body = self.body
        if isinstance(body, bytes):
            if len(body) > limit:
                raise BodyTooLarge(len(body))
            return body
        data = await body.read_all(limit)
        self.body = data
        return data


class Response:
    __slots__ = ("status", "headers", "body", "reason", "release")

    def __init__(self, status: int, headers: Headers | None = None, body: Body = b"",
                 reason: str = ""):
        self.status = status
        self.headers = headers if headers is not None else MultiDict()
        self.body = body
        self.reason = reason
        # called when the response is discarded (e.g. a retried attempt) so the upstream
        # connection is closed rather than leaked
        self.release: Optional[Callable[[], None]] = None

    def discard(self) -> None:
        if self.release is not None:
            self.release()
            self.release = None


def local_reply(ctx: RequestContext, status: int, body: str, flag: str | None = None,
                headers: Headers | None = None) -> Response:
    """A response made by the proxy itself (Envoy's "local reply"), recording its flag."""
    if flag is not None:
        ctx.flags.append(flag)
    h = headers if headers is not None else MultiDict()
    data = body.encode()
    if "content-type" not in h:
        h["content-type"] = "text/plain"
    return Response(status, h, data)


Handler = Callable[[Request], Awaitable[Response]]
"""The ``next`` a filter calls: the rest of the chain."""


class Filter:
    """Base class for HTTP filters: ``async __call__(req, next) -> Response``.

    A filter short-circuits by returning a response without awaiting ``next``.
    Filters are built once per route per config snapshot; per-request state goes in ``req.ctx``.
    """

    async def __call__(self, req: Request, next: Handler) -> Response:  # pragma: no cover
        return await next(req)

    def close(self) -> None:
        """Called when the snapshot that built this filter is retired."""
