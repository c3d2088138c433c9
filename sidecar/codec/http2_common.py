"""What the downstream and upstream HTTP/2 codecs share. Both run libnghttp2 (the engine Envoy
uses) through ``ngh2``, a sans-I/O binding: framing, HPACK, stream states, flow-control windows
and RFC 9113 validation are nghttp2's; nothing here encodes frames or headers by hand. Here:
the engine's options for each side, the header sets both codecs filter by, and the request or
response body whose peer window is credited as it is read.
"""

from __future__ import annotations

from collections.abc import Callable

import ngh2

from sidecar.config.http2 import Http2Options
from sidecar.core.body import BodyStream

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 8.2.2: header fields that never appear in HTTP/2 (``te`` only as "trailers")
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade"})
# the same as str, for messages going out (plus hop-by-hop names we never forward)
CONNECTION_SPECIFIC_STR = frozenset({"connection", "keep-alive", "proxy-connection",
                                     "transfer-encoding", "upgrade", "http2-settings"})

# Header values unique to each message (ids): kept out of the HPACK dynamic table (a literal,
# never indexed: ``ngh2.NeverIndexedHeader``) so they do not push out the values that repeat
# (date, content-length, ...), which then go out as one-byte indexes. Not
# x-envoy-upstream-service-time: its whole milliseconds repeat (Envoy indexes it too).
VOLATILE = frozenset({b"x-request-id", b"traceparent", b"tracestate", b"x-b3-traceid",
                      b"x-b3-spanid", b"x-b3-parentspanid", b"x-client-trace-id"})


# ---- the upstream (client) engine --------------------------------------------------------------
# A response head over the header list bounds is a connection error in nghttp2 (every stream on
# the connection fails), so they are generous (1 MiB decoded; the cluster's own, smaller
# ``max_response_headers_*`` limits reset just the stream); a request head up to the
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


# ---- the downstream (server) engine ----------------------------------------------------------
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
    off, as Envoy). The RST_STREAM rate limit is Envoy's ``stream_reset_burst`` /
    ``stream_reset_rate`` (1000, 33/s by default), which Envoy also hands to nghttp2; 8
    CONTINUATION frames per header block, as Envoy keeps it."""
    return ngh2.Configuration(
        auto_window_update=False,
        max_outbound_ack=max(10_000, options.max_outbound_control_frames),
        max_inbound_header_list_size=NGH2_MAX_HEADER_LIST,
        max_inbound_header_count=NGH2_MAX_HEADER_COUNT,
        max_continuations=8,
        stream_reset_rate_limit=(options.stream_reset_burst, options.stream_reset_rate),
    )


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
