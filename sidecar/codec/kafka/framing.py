"""Kafka framing: every request and response is a 4-byte big-endian length, then that many bytes.

``FrameSplitter`` turns arbitrary TCP chunks into whole frames, keeping each frame's raw bytes
(prefix included) so a frame that need not change is forwarded byte-identical. A frame longer
than ``max_frame_bytes`` is not buffered: the splitter emits its first bytes (enough for the
request header's fixed part or the response's correlation id) as ``OversizedFrameStart`` and
then the rest as ``PassThroughBytes`` chunks while they arrive, so memory stays bounded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sidecar.codec.kafka.errors import KafkaFramingError

LENGTH_PREFIX_BYTES = 4
_LENGTH = struct.Struct(">i")
# api_key (2) + api_version (2) + correlation_id (4): enough to track an oversized request;
# a response's correlation id is its first 4 bytes
OVERSIZED_HEAD_BYTES = 8
# Kafka's own default for socket.request.max.bytes (100 MiB)
DEFAULT_MAX_FRAME_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole frame; ``raw`` includes the 4-byte length prefix."""

    raw: bytes

    @property
    def payload(self) -> memoryview:
        return memoryview(self.raw)[LENGTH_PREFIX_BYTES:]


@dataclass(frozen=True, slots=True)
class OversizedFrameStart:
    """The first bytes of a frame too large to buffer: ``head`` is the prefix plus at least
    ``OVERSIZED_HEAD_BYTES`` of payload; ``size`` is the payload length from the prefix."""

    head: bytes
    size: int


@dataclass(frozen=True, slots=True)
class PassThroughBytes:
    """More bytes of the oversized frame in progress, to forward as they are."""

    data: bytes


SplitEvent = Frame | OversizedFrameStart | PassThroughBytes


class FrameSplitter:
    """Incremental splitter for one direction of one connection."""

    __slots__ = ("_buf", "_need", "_passthrough_left", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < OVERSIZED_HEAD_BYTES:
            raise ValueError(f"max_frame_bytes must be at least {OVERSIZED_HEAD_BYTES}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._need = 0   # buffered bytes needed before the next event can be cut
        self._passthrough_left = 0

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    @property
    def in_oversized_frame(self) -> bool:
        return self._passthrough_left > 0

    def feed(self, data: bytes) -> list[SplitEvent]:
        """Split ``data`` (appended to what is buffered) into events, in stream order.

        Raises KafkaFramingError on a negative length: the stream cannot be resynchronised
        (a Kafka broker closes such a connection too).
        """
        events: list[SplitEvent] = []
        if type(data) is not bytes:
            data = bytes(data)
        if self._passthrough_left:
            take = min(self._passthrough_left, len(data))
            events.append(PassThroughBytes(data[:take]))
            self._passthrough_left -= take
            data = data[take:]
        if not data:
            return events
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return events   # a big frame arriving in pieces is copied once, when whole
            source = bytes(self._buf)
            self._buf = bytearray()
        else:
            source = data
        # slicing a bytes object over its whole length returns it without a copy, so the
        # usual case (one whole frame per read, or the last piece of one) copies nothing more
        pos = 0
        end = len(source)
        while end - pos >= LENGTH_PREFIX_BYTES:
            size = _LENGTH.unpack_from(source, pos)[0]
            if size < 0:
                raise KafkaFramingError(f"negative frame length {size}")
            total = LENGTH_PREFIX_BYTES + size
            if size > self.max_frame_bytes:
                head_needed = LENGTH_PREFIX_BYTES + OVERSIZED_HEAD_BYTES
                if end - pos < head_needed:
                    break
                available = min(end - pos, total)
                events.append(OversizedFrameStart(source[pos:pos + available], size))
                self._passthrough_left = total - available
                pos += available
                if self._passthrough_left:
                    return events   # the rest of ``data`` was all part of this frame
                continue
            if end - pos < total:
                break
            events.append(Frame(source[pos:pos + total]))
            pos += total
        if pos < end:
            rest = memoryview(source)[pos:]
            self._buf += rest
            self._need = self._bytes_needed(rest)
        return events

    def _bytes_needed(self, pending: memoryview) -> int:
        if len(pending) < LENGTH_PREFIX_BYTES:
            return LENGTH_PREFIX_BYTES
        size = int.from_bytes(pending[:LENGTH_PREFIX_BYTES], "big", signed=True)
        if size > self.max_frame_bytes:
            return LENGTH_PREFIX_BYTES + OVERSIZED_HEAD_BYTES
        return LENGTH_PREFIX_BYTES + size
