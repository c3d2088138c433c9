"""What the downstream and upstream HTTP/2 codecs share. Both run hyper's ``h2`` state machine
(framing, HPACK, stream states, flow-control windows); nothing here encodes frames or headers by
hand. Two behaviours of ``h2`` are adjusted, each for a stated protocol reason:

* ``H2Connection`` reports a graceful GOAWAY (NO_ERROR) without closing the connection: ``h2``
  refuses every frame after any GOAWAY, while RFC 9113 section 6.8 lets the streams the GOAWAY
  covers finish. A GOAWAY carrying an error still closes everything, as in ``h2``.
* ``BoundedDecoder`` applies nghttp2's (so Envoy's) HPACK limits and reports their violation with
  the code Envoy sends (COMPRESSION_ERROR), instead of ``h2``'s PROTOCOL_ERROR. The decoded size
  of a header list is left to the codec, which resets just that stream (Envoy's behaviour): the
  block is always decoded to its end so the dynamic table stays in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
import hpack.hpack
import hpack.table
import ngh2
from h2.frame_buffer import FrameBuffer
from hpack import NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame

from sidecar.config.http2 import Http2Options
from sidecar.core.body import BodyStream

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 8.2.2: header fields that never appear in HTTP/2 (``te`` only as "trailers")
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade"})
# the same as str, for messages going out (plus hop-by-hop names we never forward)
CONNECTION_SPECIFIC_STR = frozenset({"connection", "keep-alive", "proxy-connection",
                                     "transfer-encoding", "upgrade", "http2-settings"})

MAX_LITERAL = 65536          # nghttp2: a longer header name or value is a compression error
MAX_INFLATED = 64 * 1024 * 1024   # hpack's decoded-size accounting (table refs are cheap)
# a block this short holds no field over MAX_LITERAL: Huffman codes are at least 5 bits per
# octet, and a field from the dynamic table is smaller than the table (at most 64 KiB here)
_SHORT_BLOCK = MAX_LITERAL * 5 // 8 - 16

ErrorCodes = h2.errors.ErrorCodes


class NoLog:
    """A logger that does nothing at C speed. ``h2`` and ``hpack`` log as they go (``h2`` about
    a hundred ``debug`` calls per proxied request, ``hpack`` one per header) whatever the
    level; with ``h2``'s ``DummyLogger`` each is still a Python call. ``"".format`` takes any
    arguments, ignores them (no replacement field) and returns at once."""

    debug = trace = "".format


NO_LOG = NoLog()
hpack.hpack.log = NO_LOG  # type: ignore[assignment]
hpack.table.log = NO_LOG  # type: ignore[assignment]

# Header values unique to each message (ids, timings): kept out of the HPACK dynamic table (a
# literal, never indexed) so they do not push out the values that repeat (date,
# content-length, ...), which then go out as one-byte indexes.
VOLATILE = frozenset({b"x-request-id", b"traceparent", b"tracestate", b"x-b3-traceid",
                      b"x-b3-spanid", b"x-b3-parentspanid", b"x-client-trace-id",
                      b"x-envoy-upstream-service-time"})


def header(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """A header for ``h2``'s encoder: volatile ones are never indexed (see VOLATILE)."""
    if name in VOLATILE:
        return NeverIndexedHeaderTuple(name, value)
    return (name, value)


class CompressionError(h2.exceptions.ProtocolError):
    """A header block nghttp2 would refuse: GOAWAY COMPRESSION_ERROR."""

    error_code = ErrorCodes.COMPRESSION_ERROR


class BoundedDecoder(hpack.Decoder):
    """HPACK decoding with a bound on the encoded block and on each literal (see the module
    docstring)."""

    def __init__(self, max_block: int) -> None:
        super().__init__(max_header_list_size=MAX_INFLATED)
        self.max_block = max_block

    def decode(self, data: bytes, raw: bool = False) -> Iterable[hpack.HeaderTuple]:
        if len(data) > self.max_block:
            raise CompressionError(f"header block of {len(data)} bytes")
        try:
            headers = super().decode(data, raw)
        except OversizedHeaderListError as e:
            raise h2.exceptions.DenialOfServiceError(f"HPACK bomb: {e}") from e
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as e:
            raise CompressionError(f"header block: {e}") from e
        if len(data) > _SHORT_BLOCK:
            for name, value in headers:
                if len(value) > MAX_LITERAL or len(name) > MAX_LITERAL:
                    raise CompressionError("header field longer than 64 KiB")
        return headers


class PlainEncoder(hpack.Encoder):
    """HPACK encoding without Huffman coding of literals (RFC 7541 makes it the encoder's
    choice; a peer decodes either). What we send as a literal is mostly a value unique to the
    message (request ids, see VOLATILE); Huffman coding it in Python costs more CPU than the
    few bytes it saves on the wire."""

    def encode(self, headers, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class BoundedFrameBuffer(FrameBuffer):
    """``h2``'s frame buffer checks a frame's declared length against SETTINGS_MAX_FRAME_SIZE
    only once the whole frame has arrived, so a peer that declares a 16 MiB frame makes it hold
    16 MiB per connection (and an HTTP/1.1 answer on an HTTP/2 connection, read as a ~4.7 MB
    frame, waits for the connect timeout). Here the length is checked from the 9-byte frame
    header: FRAME_SIZE_ERROR before the body is buffered, as nghttp2 does."""

    def __next__(self) -> Frame:
        data = self._data
        if len(data) >= 9:
            length = (data[0] << 16) | (data[1] << 8) | data[2]
            if length > self.max_frame_size:
                self._validate_frame_length(length)        # raises FrameTooLargeError
        return super().__next__()


class H2Connection(h2.connection.H2Connection):
    """``h2.connection.H2Connection`` that lets a graceful GOAWAY drain (module docstring) and
    does not format every frame it receives for a trace log nobody reads."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.encoder = PlainEncoder()
        bounded = BoundedFrameBuffer(server=not config.client_side)
        bounded.max_frame_size = self.incoming_buffer.max_frame_size
        self.incoming_buffer = bounded

    # Before a new stream ``h2`` counts the open ones by scanning every stream it holds (and
    # drops the closed ones as it goes): a cost per stream that grows with the streams in
    # flight (a hundred multiplexed on a pooled upstream connection). Here the count is the
    # number of streams ``h2`` holds, an upper bound that gives ``h2``'s check (count + 1 >
    # limit) the same answer while under the limit; at the limit the exact scan runs (and
    # prunes). The codec drops each stream it is done with (``forget``), as the scan would,
    # so the bound stays tight; what it misses the scan prunes at the limit.
    @property
    def open_inbound_streams(self) -> int:
        return self._count_open(0 if self.config.client_side else 1)

    def _count_open(self, remainder: int) -> int:
        n = len(self.streams)
        limit = self.local_settings.max_concurrent_streams if remainder != \
            int(self.config.client_side) else self.remote_settings.max_concurrent_streams
        if n < limit:
            return n
        return self._open_streams(remainder)

    def forget(self, stream_id: int) -> None:
        """We are done with the stream: drop it from ``h2`` if ``h2`` has it closed (what
        ``_open_streams`` does; a late frame on it is still recognised through
        ``_closed_streams``)."""
        st = self.streams.get(stream_id)
        if st is not None and st.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = st.closed_by

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        # h2 4.x's own, less its ``logger.trace("Received frame: %s", repr(frame))``: the repr
        # is built for every frame even with the no-op logger (a few % of a request's CPU)
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _receive_goaway_frame(self, frame: GoAwayFrame):
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        ev = h2.events.ConnectionTerminated()
        ev.error_code = ErrorCodes.NO_ERROR
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]


class ClientH2Connection(H2Connection):
    """The upstream side (see ``H2Connection`` for the stream count)."""

    @property
    def open_outbound_streams(self) -> int:
        return self._count_open(1)


def goaway_frame(last_stream_id: int, error_code: int = 0) -> bytes:
    """A GOAWAY written beside ``h2`` (which would stop serving the connection after its own):
    the codec keeps serving streams up to ``last_stream_id`` and refuses later ones."""
    return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code).serialize()


def server_config() -> h2.config.H2Configuration:
    # inbound validation is the codec's (RFC 9113 8.2 with Envoy's choices: a Host next to
    # :authority is accepted); outbound headers are built clean by the codec
    return h2.config.H2Configuration(client_side=False, header_encoding=None,
                                     logger=NO_LOG,  # type: ignore[arg-type]
                                     validate_inbound_headers=False,
                                     normalize_inbound_headers=False,
                                     validate_outbound_headers=False,
                                     normalize_outbound_headers=False)


def client_config() -> h2.config.H2Configuration:
    # inbound validation is the upstream connection's (``http2_request.response_from_headers``,
    # one pass per header list; a malformed response resets its stream, RFC 9113 8.1.1)
    return h2.config.H2Configuration(client_side=True, header_encoding=None,
                                     logger=NO_LOG,  # type: ignore[arg-type]
                                     validate_inbound_headers=False,
                                     normalize_inbound_headers=False,
                                     validate_outbound_headers=False,
                                     normalize_outbound_headers=False)


# libnghttp2 (``ngh2``) limits of the upstream connection. A response head over the header
# list bounds is a connection error in nghttp2 (every stream on the connection fails), so they
# are as generous as the ``h2`` decoder's were (a 1 MiB block); a request head up to the
# largest a listener accepts (``max_request_headers_kb`` <= 8 MiB) can be sent.
CLIENT_MAX_RESPONSE_HEADER_LIST = 1024 * 1024
CLIENT_MAX_RESPONSE_HEADER_COUNT = 32 * 1024     # the list bound at RFC 9113's 32 octets/field
CLIENT_MAX_REQUEST_HEADER_BLOCK = 8 * 1024 * 1024 + 64 * 1024


def client_configuration() -> ngh2.Configuration:
    """The ``ngh2`` configuration of an upstream (client) connection: the peer's windows are
    credited as the response body is consumed (``acknowledge_received_data``), not on arrival,
    so a slow reader holds at most a window per stream. nghttp2 validates responses itself
    (RFC 9113 8.1.1, 8.2, 8.3.2: a malformed one resets its stream with PROTOCOL_ERROR)."""
    return ngh2.Configuration(auto_window_update=False,
                              max_inbound_header_list_size=CLIENT_MAX_RESPONSE_HEADER_LIST,
                              max_inbound_header_count=CLIENT_MAX_RESPONSE_HEADER_COUNT,
                              max_send_header_block_length=CLIENT_MAX_REQUEST_HEADER_BLOCK)


class CreditedBody(BodyStream):
    """A body received in DATA frames: the peer's window is credited as the consumer reads, so
    a slow reader holds at most a window's worth of data (HTTP/2 flow control end to end)."""

    __slots__ = ("_credit", "discarding")

    def __init__(self, credit: Callable[[int], None]) -> None:
        super().__init__()
        self._credit = credit
        self.discarding = False     # nobody will read: data is credited and dropped on arrival

    async def read(self) -> bytes:
        data = await super().read()
        if data:
            self._credit(len(data))
        return data

    def discard(self) -> int:
        """Stop buffering (the reader is gone); returns the bytes to credit now."""
        self.discarding = True
        n = self.buffered
        self._chunks.clear()
        self._size = 0
        return n


def latin1(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header values as the bytes they came from (codecs decode latin-1)."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


# ---- ngh2 (libnghttp2), the engine the codecs move to ---------------------------------------------
# A decoded header block the engine holds before the codec sees it: far above any listener's
# ``max_request_headers_kb`` (the codec resets a stream over that, as Envoy does), so the
# listener's limit decides. The engine keeps the whole decoded list (Envoy stops copying at its
# limit in nghttp2's per-field callback; ngh2 has no such hook), so this bound is also the
# memory an HPACK bomb (one large indexed field referenced many times) can hold per
# connection: a bomb up to it resets its stream as in Envoy (the conformance suite's is 16 MB
# decoded), a larger one closes the connection (the engine's DenialOfServiceError).
NGH2_MAX_HEADER_LIST = 20 * 1024 * 1024
NGH2_MAX_HEADER_COUNT = 10_000


def ngh2_server_config(options: Http2Options) -> ngh2.Configuration:
    """The downstream engine's options. Where Envoy's ``http2_protocol_options`` and an nghttp2
    limit overlap, ours decide (``Http2Guard`` counts before the engine sees the bytes):
    ``max_outbound_ack`` at or above ``max_outbound_control_frames`` (Envoy's nghttp2 adapter
    sets 10000); header list size and count far above ``max_request_headers_kb`` /
    ``max_headers_count`` (the codec resets the stream, the engine would close the
    connection). Windows are credited by the codec as bodies are read (``auto_window_update``
    off, as Envoy). nghttp2's own defaults stay where Envoy keeps them: 8 CONTINUATION frames
    per header block, the RST_STREAM rate limit (1000 burst, 33/s)."""
    return ngh2.Configuration(
        auto_window_update=False,
        max_outbound_ack=max(10_000, options.max_outbound_control_frames),
        max_inbound_header_list_size=NGH2_MAX_HEADER_LIST,
        max_inbound_header_count=NGH2_MAX_HEADER_COUNT,
        max_continuations=8,
        stream_reset_rate_limit=(1000, 33),
    )
