"""FrameSplitter over arbitrary TCP chunking."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.codec.kafka.errors import KafkaFramingError
from sidecar.codec.kafka.framing import (
    Frame,
    FrameSplitter,
    OversizedFrameStart,
    PassThroughBytes,
)


def framed(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({min(p, len(data)) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(splitter: FrameSplitter, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        events.extend(splitter.feed(chunk))
    return events


@settings(max_examples=200)
@given(payloads=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=8),
       points=st.lists(st.integers(min_value=0, max_value=3000), max_size=20))
def test_frames_survive_any_chunking(payloads: list[bytes], points: list[int]) -> None:
    stream = b"".join(framed(p) for p in payloads)
    splitter = FrameSplitter(max_frame_bytes=1024)
    events = feed_all(splitter, cut(stream, points))
    assert all(type(e) is Frame for e in events)
    assert [e.raw for e in events] == [framed(p) for p in payloads]
    assert [bytes(e.payload) for e in events] == payloads
    assert splitter.buffered == 0


@settings(max_examples=200)
@given(sizes=st.lists(st.integers(min_value=0, max_value=120), min_size=1, max_size=6),
       points=st.lists(st.integers(min_value=0, max_value=1000), max_size=20))
def test_oversized_frames_stream_through_byte_identical(sizes: list[int],
                                                        points: list[int]) -> None:
    max_frame = 40
    payloads = [bytes((i + j) % 256 for j in range(n)) for i, n in enumerate(sizes)]
    stream = b"".join(framed(p) for p in payloads)
    splitter = FrameSplitter(max_frame_bytes=max_frame)
    events = feed_all(splitter, cut(stream, points))
    out = b""
    starts = []
    for e in events:
        if type(e) is Frame:
            assert len(e.payload) <= max_frame
            out += e.raw
        elif type(e) is OversizedFrameStart:
            assert len(e.head) >= 4 + 8
            starts.append(e.size)
            out += e.head
        else:
            assert type(e) is PassThroughBytes
            out += e.data
    assert out == stream   # nothing lost, nothing reordered
    assert starts == [n for n in sizes if n > max_frame]
    assert not splitter.in_oversized_frame


def test_big_frame_in_small_pieces_is_one_frame() -> None:
    payload = bytes(range(256)) * 400
    stream = framed(payload)
    splitter = FrameSplitter()
    events = feed_all(splitter, [stream[i:i + 1000] for i in range(0, len(stream), 1000)])
    assert [e.raw for e in events] == [stream]


def test_negative_length_is_a_framing_error() -> None:
    with pytest.raises(KafkaFramingError):
        FrameSplitter().feed(struct.pack(">i", -5) + b"abc")


def test_prefix_split_across_chunks() -> None:
    splitter = FrameSplitter()
    stream = framed(b"hello") + framed(b"")
    assert splitter.feed(stream[:2]) == []
    assert splitter.feed(stream[2:5]) == []
    events = splitter.feed(stream[5:])
    assert [e.raw for e in events] == [framed(b"hello"), framed(b"")]
