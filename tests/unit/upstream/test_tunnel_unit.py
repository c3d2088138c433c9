"""The upstream half of an HTTP/1.1 upgrade (``sidecar.upstream.tunnel``) without sockets:
the request head it writes, and how it reads the upstream's answer (bytes fed to the protocol
through an in-memory transport): a 101 turns the rest into the tunnel's byte stream, anything
else is an ordinary response, and malformed or early-closed answers are typed upstream errors."""

from __future__ import annotations

import asyncio

import pytest
from multidict import MultiDict

from sidecar.core.body import BodyStream
from sidecar.core.context import RequestContext
from sidecar.core.errors import UpstreamProtocolError, UpstreamReset
from sidecar.core.message import Request
from sidecar.upstream.tunnel import TunnelConnection, encode_upgrade_request
from tests.unit.upstream.memory_transport import MemoryTransport


def upgrade_request(headers, query: str = "", body=b"") -> Request:
    return Request("GET", "/chat", query, MultiDict(headers), body,
                   RequestContext("l", ("127.0.0.1", 1), 0.0))


def tunnel(buffer_limit: int = 1 << 20) -> tuple[TunnelConnection, MemoryTransport]:
    conn = TunnelConnection(buffer_limit)
    t = MemoryTransport()
    conn.connection_made(t)
    return conn, t


# ---- the request head -----------------------------------------------------------------------------

def test_the_upgrade_pair_is_kept_and_other_hop_by_hop_headers_dropped():
    req = upgrade_request([("host", "front"), ("connection", "Upgrade, x-hop"), ("upgrade", "websocket"),
                           ("x-hop", "1"), ("keep-alive", "timeout=5"), ("te", "trailers"),
                           ("sec-websocket-key", "dGhlIHNhbXBsZQ=="), ("x-app", "a")], query="room=1")
    head = encode_upgrade_request(req, None).decode("latin-1")
    lines = head.split("\r\n")
    assert lines[0] == "GET /chat?room=1 HTTP/1.1"
    assert head.endswith("\r\n\r\n")
    names = [line.split(":", 1)[0] for line in lines[1:] if line]
    assert names == ["host", "connection", "upgrade", "sec-websocket-key", "x-app"]
    assert "host: front" in lines


def test_a_host_rewrite_replaces_the_host_header():
    req = upgrade_request([("host", "front"), ("connection", "upgrade"), ("upgrade", "websocket")])
    assert "host: back.internal\r\n" in encode_upgrade_request(req, "back.internal").decode()


# ---- the answer ---------------------------------------------------------------------------------

async def test_a_101_makes_the_rest_of_the_bytes_the_tunnel():
    conn, t = tunnel()
    conn.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n\x81\x02hi")
    resp = conn.head.result()
    assert resp.status == 101 and conn.upgraded
    assert resp.headers["upgrade"] == "websocket" and resp.headers["sec-websocket-accept"] == "abc"
    assert isinstance(resp.body, BodyStream)
    assert await resp.body.read() == b"\x81\x02hi"         # bytes after the head, not parsed
    conn.data_received(b"HTTP/1.1 200 not a response any more")
    assert await resp.body.read() == b"HTTP/1.1 200 not a response any more"
    resp.discard()                                         # the client went: close upstream
    assert t.closed


async def test_informational_answers_before_the_101_are_skipped():
    conn, _ = tunnel()
    conn.data_received(b"HTTP/1.1 100 Continue\r\nx-early: 1\r\n\r\n")
    assert not conn.head.done()
    conn.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\n\r\n")
    resp = conn.head.result()
    assert resp.status == 101 and "x-early" not in resp.headers


async def test_a_refusal_is_an_ordinary_response_and_the_connection_closes_after_it():
    conn, t = tunnel()
    conn.data_received(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nno")
    resp = conn.head.result()
    assert resp.status == 403 and not conn.upgraded
    assert await resp.body.read() == b"no"
    conn.data_received(b"pe!\n")
    assert await resp.body.read() == b"pe!\n"
    assert await resp.body.read() == b""
    assert t.closed                                  # never reused: not pooled


async def test_the_tunnel_is_flow_controlled():
    conn, t = tunnel(buffer_limit=8)
    conn.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
    body = conn.head.result().body
    conn.data_received(b"0123456789")
    assert t.paused                                  # past the buffer limit: stop reading
    assert await body.read() == b"0123456789"
    assert not t.paused


async def test_the_upstream_closing_ends_the_tunnel():
    conn, _ = tunnel()
    conn.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
    body = conn.head.result().body
    conn.data_received(b"last")
    conn.connection_lost(None)
    assert await body.read() == b"last"
    assert await body.read() == b""


async def test_closing_before_the_head_is_a_connection_termination():
    conn, _ = tunnel()
    conn.data_received(b"HTTP/1.1 101 Swi")
    conn.connection_lost(None)
    with pytest.raises(UpstreamReset) as e:
        conn.head.result()
    assert e.value.flag == "UC"


async def test_a_malformed_answer_is_a_protocol_error():
    conn, t = tunnel()
    conn.data_received(b"HTTP/1.1 abc Nope\r\n\r\n")
    with pytest.raises(UpstreamProtocolError) as e:
        conn.head.result()
    assert e.value.flag == "UPE" and t.closed


async def test_the_pump_copies_the_clients_bytes_upstream_until_the_client_ends():
    conn, t = tunnel()
    client = BodyStream()
    conn.start_pump(client)
    client.feed(b"hello ")
    await asyncio.sleep(0)
    client.feed(b"upstream")
    client.feed_eof()
    await asyncio.wait_for(conn.pump, 1)
    assert bytes(t.out) == b"hello upstream"
    assert t.closed                                   # the client's side ended: so does the tunnel
