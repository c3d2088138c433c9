"""Limits on what one HTTP/2 client may make the downstream codec do (Envoy's
``http2_protocol_options`` flood limits and its premature-reset check, CVE-2023-44487).

The HTTP/2 engine (libnghttp2 through ``ngh2``) does not report frames, so the inbound limits
are kept the way Envoy keeps them in its nghttp2 ``on_begin_frame`` callback: from each frame's
9-byte header (``scan``: type, flags, length, stream id of every inbound frame, read
incrementally across reads, before the bytes reach the engine; payloads are skipped, never
parsed). The codec reports the rest (streams closed, resets, frames it queues, the socket
draining). A method raises ``Abuse`` when a limit is crossed, and the codec then closes that
connection (with a GOAWAY where Envoy sends one or RFC 9113 names a code) and nothing else.
nghttp2 itself bounds CONTINUATION frames, frame sizes, HPACK and flow-control windows; the
header list size is checked by the codec per stream.
"""

from __future__ import annotations

from ngh2 import ErrorCode as ErrorCodes

from sidecar.config.http2 import Http2Options

PREFACE_LENGTH = 24        # RFC 9113 3.4: the client preface before the first frame header

# frame types (RFC 9113 6) the limits look at
_DATA, _HEADERS, _PRIORITY, _SETTINGS, _PING, _WINDOW_UPDATE, _CONTINUATION = 0, 1, 2, 4, 6, 8, 9
_END_STREAM = 0x1
_ACK = 0x1

# Envoy's runtime defaults for the premature-reset check (overload.premature_reset_*)
PREMATURE_RESET_TOTAL_STREAM_COUNT = 500
PREMATURE_RESET_MIN_STREAM_LIFETIME_S = 1.0


class Abuse(Exception):
    """A limit was crossed: close the connection (``goaway``: the code to send, or None to
    close without one)."""

    def __init__(self, kind: str, goaway: int | None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.goaway = goaway


class Http2Guard:
    __slots__ = ("o", "streams_opened", "streams_closed", "premature_resets", "empty_frames",
                 "priority_frames", "window_updates", "data_frames_sent",
                 "control_frames_queued", "frames_queued", "last_stream_id", "trailer_streams",
                 "_skip", "_partial")

    def __init__(self, options: Http2Options) -> None:
        self.o = options
        self.streams_opened = 0
        self.streams_closed = 0
        self.premature_resets = 0
        self.empty_frames = 0          # consecutive frames with an empty payload
        self.priority_frames = 0
        self.window_updates = 0
        self.data_frames_sent = 0
        self.control_frames_queued = 0   # answers queued while the client is not reading
        self.frames_queued = 0           # any frame queued while the client is not reading
        self.last_stream_id = 0          # the highest stream a client HEADERS frame opened
        self.trailer_streams: set[int] = set()   # streams that sent a second HEADERS (trailers)
        self._skip = PREFACE_LENGTH      # bytes before the next frame header
        self._partial = b""              # the start of a frame header split across reads

    # ---- the inbound frame headers ----------------------------------------------------------------
    def scan(self, data: bytes) -> None:
        """Account the frames starting in ``data`` (the next bytes read from the client), as
        Envoy does per frame header; raises ``Abuse`` at the first limit crossed."""
        skip = self._skip
        n = len(data)
        if skip >= n:              # inside a payload (a large DATA frame): nothing starts here
            self._skip = skip - n
            return
        if self._partial:          # a frame header split across reads (rare)
            data = self._partial + data
            self._partial = b""
            n = len(data)
        pos = skip
        while pos + 9 <= n:
            length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
            ftype = data[pos + 3]
            if ftype == _DATA or ftype == _HEADERS or ftype == _CONTINUATION:
                if ftype == _HEADERS:
                    sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                    if sid > self.last_stream_id:
                        self.last_stream_id = sid
                        self.streams_opened += 1      # stream_opened(), inlined
                    else:
                        self.trailer_streams.add(sid)
                if length or (data[pos + 4] & _END_STREAM and ftype != _CONTINUATION):
                    self.empty_frames = 0
                else:
                    self.empty_payload()
            elif ftype == _WINDOW_UPDATE:
                self.window_update()
            elif ftype == _PING or ftype == _SETTINGS:
                if not data[pos + 4] & _ACK:
                    self.control_frame()      # the engine queues an ACK
            elif ftype == _PRIORITY:
                self.priority(0)
            pos += 9 + length
        if pos > n:
            self._skip = pos - n
        else:
            self._skip = 0
            if pos < n:
                self._partial = data[pos:]

    # ---- streams -------------------------------------------------------------------------------
    def stream_opened(self) -> None:
        self.streams_opened += 1

    def stream_closed(self) -> None:
        self.streams_closed += 1

    def reset_by_peer(self, premature: bool) -> None:
        """Envoy's rule: past half of ``PREMATURE_RESET_TOTAL_STREAM_COUNT`` premature resets,
        or past that many closed streams when half or more of them were reset early."""
        if not premature:
            return
        self.premature_resets += 1
        closed = self.streams_closed + 1
        limit = PREMATURE_RESET_TOTAL_STREAM_COUNT
        if (closed < limit and self.premature_resets >= limit // 2) or \
                (closed >= limit and self.premature_resets * 2 >= closed):
            raise Abuse("premature_resets", ErrorCodes.ENHANCE_YOUR_CALM)

    # ---- inbound frames ------------------------------------------------------------------------
    def empty_payload(self) -> None:
        """A DATA, HEADERS or CONTINUATION frame with no payload and no END_STREAM."""
        self.empty_frames += 1
        if self.empty_frames > self.o.max_consecutive_inbound_frames_with_empty_payload:
            raise Abuse("inbound_empty_frames_flood", ErrorCodes.ENHANCE_YOUR_CALM)

    def priority(self, open_streams: int) -> None:
        self.priority_frames += 1
        if self.priority_frames > self.o.max_inbound_priority_frames_per_stream * \
                (1 + self.streams_opened):
            raise Abuse("inbound_priority_frames_flood", ErrorCodes.ENHANCE_YOUR_CALM)

    def window_update(self) -> None:
        self.window_updates += 1
        o = self.o
        if self.window_updates > 5 + 2 * (self.streams_opened + o.max_inbound_window_update_frames_per_data_frame_sent
                                          * self.data_frames_sent):
            raise Abuse("inbound_window_update_frames_flood", ErrorCodes.ENHANCE_YOUR_CALM)

    def control_frame(self) -> None:
        """A frame the engine answers (PING, SETTINGS: an ACK). More answers queued than
        ``max_outbound_control_frames`` before they reach the socket (one read's worth of
        frames, plus whatever waits while the client does not read) is Envoy's outbound
        control-frame flood: the connection is closed without a GOAWAY (it would queue too)."""
        self.control_frames_queued += 1
        if self.control_frames_queued > self.o.max_outbound_control_frames:
            raise Abuse("outbound_control_flood", None)
        self.frame_queued()

    def frame_queued(self) -> None:
        """Any frame we queue (HEADERS, DATA, RST_STREAM, an ACK): past ``max_outbound_frames``
        waiting for the socket (a client that does not read), the connection is closed."""
        self.frames_queued += 1
        if self.frames_queued > self.o.max_outbound_frames:
            raise Abuse("outbound_flood", None)

    # ---- outbound ------------------------------------------------------------------------------
    def data_sent(self, frames: int = 1, others: int = 0) -> None:
        """``frames`` DATA frames queued (and ``others`` frames of the same response, its
        HEADERS and trailers, counted with them: one check for all)."""
        self.data_frames_sent += frames
        self.frames_queued += frames + others
        if self.frames_queued > self.o.max_outbound_frames:
            raise Abuse("outbound_flood", None)

    def flushed(self) -> None:
        """What was queued reached the socket (the transport is not holding it back)."""
        self.control_frames_queued = 0
        self.frames_queued = 0
