"""Bodies: complete ``bytes``, or a ``BodySource`` that yields chunks as they arrive.

A body is ``bytes`` when it is already complete (the common small request, or anything a layer
buffered) and a ``BodySource`` otherwise. ``BodyStream`` is the source a codec feeds from a
socket, with flow control: past ``high_water`` unread bytes it pauses the producer, and reading
resumes it, so a 1 GB transfer moves in bounded memory. Trailers of a streamed body arrive with
its end (``source.trailers`` once ``read()`` returned ``b""``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from multidict import MultiDict

Headers = MultiDict[str]
"""Lower-case names -> values (latin-1 decoded); codecs lower the names once, as Envoy does."""


class BodyTooLarge(Exception):
    """A body exceeded the buffering limit of the layer that wanted to buffer it."""


class BodyAborted(ConnectionError):
    """The producer of a streamed body went away or sent a malformed body: whoever was
    forwarding it must drop what it holds (an upstream connection with a partial request).

    ``status`` and ``flag`` are the local reply owed when no response has started yet
    (400 DPE for a malformed body; DC when the downstream connection closed)."""

    def __init__(self, reason: str, status: int = 400, flag: str = "DC"):
        super().__init__(reason)
        self.status = status
        self.flag = flag


class BodySource:
    """A body arriving in chunks. ``read()`` returns the next chunk, ``b""`` at the end."""

    __slots__ = ("trailers",)

    def __init__(self) -> None:
        self.trailers: Headers | None = None

    @property
    def total(self) -> int:
        """Bytes of this body received from its producer so far."""
        raise NotImplementedError

    @property
    def at_eof(self) -> bool:
        raise NotImplementedError

    async def read(self) -> bytes:
        raise NotImplementedError

    async def read_all(self, limit: int) -> bytes:
        """The rest of the body, or ``BodyTooLarge`` once it passes ``limit`` bytes."""
        parts: list[bytes] = []
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


class BodyStream(BodySource):
    """Chunks fed by a producer (a codec), read by one consumer, with flow control.

    The producer calls ``feed`` / ``feed_eof`` / ``feed_error``; ``pause`` is called when more
    than ``high_water`` bytes wait unread and ``resume`` when the consumer drained them.
    """

    __slots__ = ("_chunks", "_size", "_eof", "_exc", "_waiter", "_pause", "_resume",
                 "_paused", "high_water", "_total")

    def __init__(self, pause: Callable[[], None] | None = None,
                 resume: Callable[[], None] | None = None, high_water: int = 256 * 1024):
        super().__init__()
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False
        self.high_water = high_water
        self._total = 0

    @property
    def total(self) -> int:
        return self._total

    # ---- producer side ----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._total += len(data)
        if self._size > self.high_water and not self._paused and self._pause is not None:
            self._paused = True
            self._pause()
        self._wake()

    def feed_eof(self, trailers: Headers | None = None) -> None:
        self._eof = True
        if trailers is not None:
            self.trailers = trailers
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
    def ended(self) -> bool:
        """The producer delivered the whole body (it may not all have been read yet)."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes fed and not read yet (HTTP/2 flow control credits the peer as they are read)."""
        return self._size

    # ---- consumer side ----------------------------------------------------------------------
    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def failed(self) -> bool:
        return self._exc is not None

    async def read(self) -> bytes:
        """Next chunk, or b"" at the end. Raises the producer's error (reset, timeout)."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        if self._paused and self._resume is not None:
            self._paused = False
            self._resume()
        return data


class PrefixedStream(BodySource):
    """A body with its first chunks already read (by a replay buffer that hit its limit):
    those chunks first, then the rest of the original source."""

    __slots__ = ("prefix", "rest")

    def __init__(self, prefix: list[bytes], rest: BodySource):
        super().__init__()
        self.prefix = prefix
        self.rest = rest

    @property
    def total(self) -> int:
        return self.rest.total

    @property
    def at_eof(self) -> bool:
        return not self.prefix and self.rest.at_eof

    async def read(self) -> bytes:
        if self.prefix:
            data = b"".join(self.prefix)
            self.prefix = []
        else:
            data = await self.rest.read()
            if not data:
                self.trailers = self.rest.trailers
        return data


class TransformedBody(BodySource):
    """A streamed body rewritten chunk by chunk (compression, for one): each chunk read from
    ``source`` goes through ``transform``; at its end ``finish()`` gives the last bytes. Chunks
    that transform to nothing are skipped, so a reader only sees ``b""`` at the very end."""

    __slots__ = ("source", "transform", "finish", "_done", "_out")

    def __init__(self, source: BodySource, transform: Callable[[bytes], bytes],
                 finish: Callable[[], bytes]):
        super().__init__()
        self.source = source
        self.transform = transform
        self.finish = finish
        self._done = False
        self._out = 0

    @property
    def total(self) -> int:
        """Bytes produced so far (what the reader got)."""
        return self._out

    @property
    def at_eof(self) -> bool:
        return self._done

    async def read(self) -> bytes:
        while not self._done:
            chunk = await self.source.read()
            if chunk:
                data = self.transform(chunk)
            else:
                self._done = True
                self.trailers = self.source.trailers
                data = self.finish()
            if data:
                self._out += len(data)
                return data
        return b""


Body = bytes | BodySource


def body_length(body: Body) -> int:
    """Bytes of a body delivered so far (all of it, for a complete one)."""
    return len(body) if body.__class__ is bytes else body.total  # type: ignore[union-attr]
