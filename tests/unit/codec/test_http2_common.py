"""The trailer checks of ``http2_request`` and the engine options of ``http2_common``, without
sockets."""

from __future__ import annotations

import pytest

from sidecar.codec.http2_request import Malformed, trailers_from_headers


def test_trailer_checks():
    assert dict(trailers_from_headers([(b"grpc-status", b"0")])) == {"grpc-status": "0"}
    for bad in ([(b":status", b"200")], [(b"x-a", b"a\nb")], [(b"keep-alive", b"1")]):
        with pytest.raises(Malformed):
            trailers_from_headers(bad)


def test_ngh2_server_config_lets_our_limits_decide():
    """The engine's own limits sit where ``Http2Guard`` and the codec decide first: ACKs
    queued (ours: max_outbound_control_frames, counted before the engine reads the bytes),
    header list size and count (ours: the listener's, a stream reset); windows credited by the
    codec; nghttp2's CONTINUATION and RST_STREAM rate defaults (as in Envoy)."""
    from sidecar.codec.http2_common import ngh2_server_config
    from sidecar.config.http2 import Http2Options

    c = ngh2_server_config(Http2Options())
    assert c.auto_window_update is False
    assert c.max_outbound_ack >= Http2Options().max_outbound_control_frames
    assert ngh2_server_config(Http2Options(max_outbound_control_frames=50_000)) \
        .max_outbound_ack == 50_000
    assert c.max_inbound_header_list_size >= 16 * 1024 * 1024 + 4000 * 64   # an HPACK bomb
    assert c.max_inbound_header_count > 4000
    assert (c.max_continuations, c.stream_reset_rate_limit) == (8, (1000, 33))
