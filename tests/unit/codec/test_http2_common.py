"""The adjustments of ``h2``/``hpack`` in ``sidecar.codec.http2_common`` and the upstream
response checks of ``http2_request``, without sockets: two ``h2`` connections talking through
their byte buffers."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest

from sidecar.codec.http2_common import (
    ClientH2Connection,
    H2Connection,
    PlainEncoder,
    client_config,
    server_config,
)
from sidecar.codec.http2_request import Malformed, response_from_headers, trailers_from_headers


def test_plain_encoder_is_decodable_and_follows_the_peer_table_size():
    enc, dec = PlainEncoder(), hpack.Decoder()
    headers = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-a", b"b" * 40)]
    first = enc.encode(headers)
    assert list(dec.decode(first, raw=True)) == headers
    again = enc.encode(headers)
    assert len(again) < len(first) and list(dec.decode(again, raw=True)) == headers  # indexed
    enc.header_table_size = 100        # the peer's SETTINGS_HEADER_TABLE_SIZE (h2 sets it)
    block = enc.encode(headers)
    assert block[0] & 0xE0 == 0x20     # a dynamic table size update opens the block
    assert list(dec.decode(block, raw=True)) == headers and dec.header_table_size == 100


def test_no_huffman_literals():
    block = PlainEncoder().encode([(b"x-id", b"abcdefgh")])
    assert b"abcdefgh" in block     # sent as it is (RFC 7541 5.2 with H = 0)


def _pair() -> tuple[ClientH2Connection, h2.connection.H2Connection]:
    client = ClientH2Connection(client_config())
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 3})
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]


def test_client_stream_count_follows_the_streams_and_the_peer_limit():
    client, server = _pair()
    sids = []
    for _ in range(3):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQ, end_stream=True)
        sids.append(sid)
    assert client.open_outbound_streams == 3
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        client.send_headers(client.get_next_available_stream_id(), REQ, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(sids[0], [(b":status", b"200")], end_stream=True)
    client.receive_data(server.data_to_send())
    # closed in h2 but not yet released by the pool: still counted, until forgotten
    client.forget(sids[0])
    assert sids[0] not in client.streams and client.open_outbound_streams == 2
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQ, end_stream=True)
    # a stream still open is kept by forget (h2's own scan drops it once closed)
    client.forget(sids[1])
    assert sids[1] in client.streams


class _PastLimits(h2.connection.H2Connection):
    open_outbound_streams = 0      # a client that ignores the server's stream limit


def test_server_stream_limit_is_exact_at_the_limit():
    client = _PastLimits(h2.config.H2Configuration(client_side=True))
    server = H2Connection(server_config())
    server.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    server.initiate_connection()
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())      # our SETTINGS acknowledged
    client.send_headers(1, REQ, end_stream=True)
    client.send_headers(3, REQ, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(b":status", b"200")], end_stream=True)   # stream 1 closed, not forgotten
    # a third stream: under the limit once the closed one is pruned by h2's exact count
    client.receive_data(server.data_to_send())
    client.send_headers(5, REQ, end_stream=True)
    server.receive_data(client.data_to_send())
    assert server.open_inbound_streams == 2
    client.send_headers(7, REQ, end_stream=True)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        server.receive_data(client.data_to_send())


def test_response_checks():
    assert response_from_headers([(b":status", b"204"), (b"x-a", b"1")])[0] == 204
    for bad in ([(b"x-a", b"1")],                                   # no :status
                [(b":status", b"200"), (b":status", b"200")],       # twice
                [(b"x-a", b"1"), (b":status", b"200")],             # after a regular field
                [(b":status", b"20x")],
                [(b":status", b"200"), (b":path", b"/")],
                [(b":status", b"200"), (b"connection", b"close")],  # RFC 9113 8.2.2
                [(b":status", b"200"), (b"te", b"gzip")],
                [(b":status", b"200"), (b"X-Upper", b"1")],
                [(b":status", b"200"), (b"x-a", b"a\r\nb")],
                [(b":status", b"200"), (b"x-a", b" padded")]):
        with pytest.raises(Malformed):
            response_from_headers(bad)
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
