"""The upstream HTTP/2 connection and its pool without sockets: an ``h2`` server (a real HTTP/2
peer, another implementation than the connection's nghttp2) exchanges bytes with
``Http2UpstreamConnection`` through an in-memory transport.

Covers stream-slot accounting (capacity = min(peer SETTINGS, cluster limit), busiest first,
slots back when both sides ended), GOAWAY bookkeeping (streams above last_stream_id fail as
never sent, the others finish, the connection closes after its last stream), refused streams,
malformed responses (nghttp2's checks: the stream fails, the connection lives), request bodies
read from downstream only as the peer's windows let them out, flow-control credit, the header
translation for an HTTP/2 upstream, idle sweep and drain."""

from __future__ import annotations

import asyncio
import random

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from multidict import MultiDict
from ngh2 import DataReceived

from sidecar.config.http2 import UPSTREAM_DEFAULTS, Http2Options
from sidecar.core.body import BodyStream
from sidecar.core.context import RequestContext
from sidecar.core.errors import (
    ConnectFailure,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.core.message import Request
from sidecar.upstream import http2 as http2_module
from sidecar.upstream.http2 import Http2UpstreamConnection
from sidecar.upstream.http2_headers import request_headers
from sidecar.upstream.http2_pool import Http2Pool
from tests.unit.upstream.memory_transport import MemoryTransport


class Server:
    """An h2 server wired to one upstream connection (it sends whatever head a test gives it:
    no outbound validation)."""

    def __init__(self, conn: Http2UpstreamConnection, transport: MemoryTransport,
                 max_streams: int | None = None) -> None:
        self.conn = conn
        self.t = transport
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.h2.initiate_connection()
        if max_streams is not None:
            self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
        self.requests: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.resets: dict[int, int] = {}

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to say."""
        for _ in range(20):
            moved = False
            data = self.t.take()
            if data:
                moved = True
                for e in self.h2.receive_data(data):
                    if isinstance(e, h2.events.RequestReceived):
                        self.requests[e.stream_id] = e.headers
                    elif isinstance(e, h2.events.DataReceived):
                        self.bodies[e.stream_id] = self.bodies.get(e.stream_id, b"") + e.data
                        self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, h2.events.StreamEnded):
                        self.ended.add(e.stream_id)
                    elif isinstance(e, h2.events.TrailersReceived):
                        self.trailers[e.stream_id] = e.headers
                    elif isinstance(e, h2.events.StreamReset):
                        self.resets[e.stream_id] = e.error_code
            out = self.h2.data_to_send()
            if out:
                moved = True
                self.conn.data_received(out)
            if not moved:
                return

    def respond(self, sid: int, status: int = 200, body: bytes = b"ok") -> None:
        self.h2.send_headers(sid, [(b":status", str(status).encode()),
                                   (b"content-length", str(len(body)).encode())])
        self.h2.send_data(sid, body, end_stream=True)
        self.pump()

    def raw(self, frame: bytes) -> None:
        """A frame written beside h2 (h2 stops serving after its own GOAWAY)."""
        self.conn.data_received(frame)


def goaway_frame(last_stream_id: int, error_code: int = 0) -> bytes:
    return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code).serialize()


def pool(max_streams: int = UPSTREAM_DEFAULTS.max_concurrent_streams, idle_timeout: float = 3600.0) -> Http2Pool:
    return Http2Pool("127.0.0.1", 1, 1.0, Http2Options(max_concurrent_streams=max_streams),
                     idle_timeout=idle_timeout)


def connect(p: Http2Pool, peer_max: int | None = None) -> tuple[Http2UpstreamConnection, Server]:
    """A connection as ``Http2Pool.connect`` makes one, its peer's SETTINGS exchanged."""
    conn = Http2UpstreamConnection(p)
    t = MemoryTransport()
    conn.connection_made(t)
    p.conns.append(conn)
    server = Server(conn, t, peer_max)
    server.pump()
    return conn, server


def request(method: str = "GET", path: str = "/items", query: str = "", headers=None,
            body: bytes = b"") -> Request:
    h = MultiDict(headers if headers is not None else {"host": "svc.local"})
    return Request(method, path, query, h, body, RequestContext("l", ("10.0.0.1", 1), 0.0))


async def settle() -> None:
    """A few loop turns: writes are flushed once per turn (call_soon), after the sends in it."""
    for _ in range(3):
        await asyncio.sleep(0)


async def start(conn: Http2UpstreamConnection, req: Request | None = None) -> asyncio.Task:
    task = asyncio.ensure_future(conn.send(req or request(), "svc.local", None))
    await settle()               # the HEADERS go out
    return task


async def one_stream(p: Http2Pool | None = None
                     ) -> tuple[Http2Pool, Http2UpstreamConnection, Server, asyncio.Task, int]:
    """A pool with one connection carrying one request whose HEADERS the peer has read."""
    p = p or pool()
    conn, server = connect(p)
    p.acquire()
    task = await start(conn)
    server.pump()
    (sid,) = server.requests
    return p, conn, server, task, sid


# ---- readiness and slots ------------------------------------------------------------------------

async def test_a_connection_is_not_used_before_the_peers_settings():
    p = pool()
    conn = Http2UpstreamConnection(p)
    t = MemoryTransport()
    conn.connection_made(t)
    p.conns.append(conn)
    assert t.out.startswith(b"PRI * HTTP/2.0")         # our preface went out at once
    assert p.acquire() is None and p.pending_room()
    woken = asyncio.ensure_future(p.wait(asyncio.get_running_loop(), None))
    await settle()
    Server(conn, t, max_streams=2).pump()
    assert conn.ready.done() and conn.peer_max == 2
    await asyncio.wait_for(woken, 1)                    # the pool's waiter was woken
    assert p.acquire() is conn and not p.pending_room()


async def test_capacity_is_the_smaller_of_the_peers_limit_and_the_clusters():
    p = pool(max_streams=3)
    conn, _ = connect(p, peer_max=100)
    assert conn.capacity == 3
    assert [p.acquire() for _ in range(4)] == [conn, conn, conn, None]
    assert conn.used == 3 and not conn.has_room()

    p2 = pool(max_streams=100)
    conn2, _ = connect(p2, peer_max=2)
    assert conn2.capacity == 2
    assert [p2.acquire() for _ in range(3)] == [conn2, conn2, None]


async def test_acquire_prefers_the_busiest_connection_with_room():
    p = pool(max_streams=4)
    a, _ = connect(p)
    b, _ = connect(p)
    b.used = 2
    assert p.acquire() is b and b.used == 3
    b.used = 4                                          # full: the other one
    assert p.acquire() is a
    assert p.streams() == 5 and p.active == 2 and p.idle == ()


async def test_a_peer_lowering_its_limit_is_honoured():
    p = pool()
    conn, server = connect(p, peer_max=10)
    server.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    server.pump()
    assert conn.peer_max == 1
    assert p.acquire() is conn and p.acquire() is None


# ---- an exchange --------------------------------------------------------------------------------

async def test_a_request_goes_out_and_its_slot_comes_back_with_the_response():
    p = pool()
    conn, server = connect(p)
    assert p.acquire() is conn
    task = await start(conn, request("POST", "/orders", "id=7",
                                     {"host": "svc.local", "x-trace": "t1", "content-length": "4"},
                                     body=b"data"))
    server.pump()
    (sid, head), = server.requests.items()
    assert head[:4] == [(b":method", b"POST"), (b":scheme", b"http"),
                        (b":authority", b"svc.local"), (b":path", b"/orders?id=7")]
    assert (b"host", b"svc.local") not in head and (b"x-trace", b"t1") in head
    assert server.bodies[sid] == b"data" and sid in server.ended
    assert conn.used == 1
    server.respond(sid, 201, b"created")
    resp = await asyncio.wait_for(task, 1)
    assert (resp.status, resp.body, resp.headers["content-length"]) == (201, b"created", "7")
    assert conn.used == 0 and conn.streams == {}
    assert conn.has_room() and not conn.closed


async def test_streams_started_in_one_loop_turn_share_one_write():
    p = pool()
    conn, server = connect(p)
    writes: list[int] = []
    write = server.t.write

    def counted(data: bytes) -> None:
        writes.append(len(data))
        write(data)
    server.t.write = counted
    tasks = []
    for _ in range(3):
        assert p.acquire() is conn
        tasks.append(asyncio.ensure_future(conn.send(request(), "svc.local", None)))
    await settle()
    assert len(writes) == 1                         # three HEADERS, one syscall
    server.pump()
    assert sorted(server.requests) == [1, 3, 5]
    for sid in (1, 3, 5):
        server.respond(sid)
    assert [r.status for r in await asyncio.gather(*tasks)] == [200] * 3


async def test_a_refused_stream_is_marked_as_never_sent():
    p, conn, server, task, sid = await one_stream()
    server.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
    server.pump()
    with pytest.raises(UpstreamReset) as e:
        await asyncio.wait_for(task, 1)
    assert (e.value.flag, e.value.sent, e.value.reason) == ("UR", False, "refused stream")
    assert conn.used == 0


async def test_any_other_reset_is_marked_as_possibly_processed():
    p, conn, server, task, sid = await one_stream()
    server.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
    server.pump()
    with pytest.raises(UpstreamReset) as e:
        await asyncio.wait_for(task, 1)
    assert (e.value.flag, e.value.sent) == ("UR", True)
    assert "INTERNAL_ERROR" in e.value.reason


async def test_a_response_without_a_length_streams_with_its_trailers_and_credits_the_peer():
    p = Http2Pool("127.0.0.1", 1, 1.0, Http2Options(initial_stream_window_size=65535,
                                                    initial_connection_window_size=65535))
    p, conn, server, task, sid = await one_stream(p)
    server.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    for _ in range(3):
        server.h2.send_data(sid, b"x" * 16000)
    server.pump()
    resp = await asyncio.wait_for(task, 1)
    assert resp.status == 200 and resp.body_source() is not None      # streamed: not complete yet
    assert server.h2.local_flow_control_window(sid) == 65535 - 48000  # not credited while unread
    assert await resp.body.read() == b"x" * 48000
    await settle()                          # the WINDOW_UPDATE is flushed on a later turn
    server.pump()
    assert server.h2.local_flow_control_window(sid) == 65535          # credited once read
    server.h2.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    server.pump()
    assert await resp.body.read() == b""
    assert resp.body.trailers is not None and resp.body.trailers["grpc-status"] == "0"
    assert conn.used == 0


async def test_a_passed_deadline_resets_the_stream_and_frees_its_slot():
    p = pool()
    conn, server = connect(p)
    p.acquire()
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(conn.send(request(), "svc.local", loop.time()))
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(task, 1)
    await settle()
    resets: list[int] = []
    data = server.t.take()
    for e in server.h2.receive_data(data):
        if isinstance(e, h2.events.StreamReset):
            resets.append(e.error_code)
    assert resets == [ErrorCodes.CANCEL]
    assert conn.used == 0 and conn.streams == {} and conn.has_room()


def sent_resets(server: Server) -> dict[int, int]:
    """The RST_STREAMs the connection wrote since the peer last read (stream id -> code)."""
    return {e.stream_id: e.error_code for e in server.h2.receive_data(server.t.take())
            if isinstance(e, h2.events.StreamReset)}


async def test_deadlines_in_order_share_a_timer_and_each_stream_gets_its_own():
    """Streams sent with deadlines in order wait behind one timer: the one whose deadline
    passes is reset, one answered before its deadline is not, a later one stays open."""
    p = pool()
    conn, server = connect(p)
    loop = asyncio.get_running_loop()
    soon = loop.time() + 0.05
    p.acquire(), p.acquire(), p.acquire()
    answered = asyncio.ensure_future(conn.send(request(), "svc.local", soon))
    late = asyncio.ensure_future(conn.send(request(), "svc.local", soon))
    later = asyncio.ensure_future(conn.send(request(), "svc.local", loop.time() + 30))
    await settle()
    server.pump()
    sid_answered, sid_late, sid_later = sorted(server.requests)
    server.respond(sid_answered, 200, b"in time")
    assert (await asyncio.wait_for(answered, 1)).body == b"in time"
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(late, 2)
    await settle()
    assert sent_resets(server) == {sid_late: ErrorCodes.CANCEL}
    assert not later.done() and list(conn.streams) == [sid_later] and conn.used == 1
    server.respond(sid_later, 200, b"slow but fine")
    assert (await asyncio.wait_for(later, 1)).body == b"slow but fine"
    assert conn.used == 0 and conn.streams == {}


async def test_a_deadline_earlier_than_those_queued_still_fires_on_time():
    p = pool()
    conn, server = connect(p)
    loop = asyncio.get_running_loop()
    p.acquire(), p.acquire()
    patient = asyncio.ensure_future(conn.send(request(), "svc.local", loop.time() + 30))
    hurried = asyncio.ensure_future(conn.send(request(), "svc.local", loop.time() + 0.05))
    await settle()
    server.pump()
    sid_patient, sid_hurried = sorted(server.requests)
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(hurried, 2)      # long before the first queued deadline
    await settle()
    assert sent_resets(server) == {sid_hurried: ErrorCodes.CANCEL}
    assert not patient.done() and list(conn.streams) == [sid_patient]
    server.respond(sid_patient)
    assert (await asyncio.wait_for(patient, 1)).status == 200


async def test_deadlines_of_completed_streams_are_not_kept():
    """Many answered streams with a far deadline: what the connection remembers of their
    deadlines stays bounded by the open streams, not by the requests sent."""
    p = pool()
    conn, server = connect(p)
    loop = asyncio.get_running_loop()
    for _ in range(500):
        p.acquire()
        task = asyncio.ensure_future(conn.send(request(), "svc.local", loop.time() + 30))
        await settle()
        server.pump()
        server.respond(max(server.requests))
        await asyncio.wait_for(task, 1)
    assert len(conn._deadlines) <= 2 * len(conn.streams) + 65
    assert conn.used == 0 and conn.streams == {}


async def test_a_cancelled_request_resets_its_stream():
    p, conn, server, task, sid = await one_stream()
    task.cancel()
    await settle()
    assert sent_resets(server) == {sid: ErrorCodes.CANCEL}
    assert conn.used == 0 and conn.streams == {} and conn.has_room()


def test_header_name_caches_are_bounded_and_keep_no_long_names():
    """Names are encoded (request) and decoded (response) once, but a peer cannot grow the
    caches: long names are never kept, and the count is capped."""
    from sidecar.upstream import http2_headers as up
    long_name = "x-" + "a" * 200
    req = request(headers={"host": "svc.local", long_name: "1", "x-short": "2"})
    head = request_headers(req, "svc.local", "http")
    assert (long_name.encode(), b"1") in head and (b"x-short", b"2") in head
    assert long_name not in up._NAMES and up._NAMES["x-short"] == b"x-short"
    fields, _ = up.fields_and_size(((b":status", b"200"), (long_name.encode(), b"v"),
                                     (b"x-back", b"w")))
    assert list(fields.items()) == [(long_name, "v"), ("x-back", "w")]
    assert long_name.encode() not in up._DECODED and up._DECODED[b"x-back"] == "x-back"
    kept = dict(up._NAMES), dict(up._DECODED)
    try:
        for i in range(up._NAMES_MAX + 10):
            up._encoded_name(f"x-n{i}")
            up._decoded_name(f"x-n{i}".encode())
        assert len(up._NAMES) == len(up._DECODED) == up._NAMES_MAX
    finally:      # the caches are the module's: leave them as other tests expect
        up._NAMES.clear()
        up._NAMES.update(kept[0])
        up._DECODED.clear()
        up._DECODED.update(kept[1])


async def test_discarding_a_streamed_response_resets_its_stream():
    p, conn, server, task, sid = await one_stream()
    server.h2.send_headers(sid, [(b":status", b"200")])
    server.h2.send_data(sid, b"partial")
    server.pump()
    resp = await asyncio.wait_for(task, 1)
    resp.discard()                                   # a retried attempt, a client gone
    await settle()
    resets = [e.error_code for e in server.h2.receive_data(server.t.take())
              if isinstance(e, h2.events.StreamReset)]
    assert resets == [ErrorCodes.CANCEL] and conn.used == 0


# ---- what nghttp2 checks, flow control -----------------------------------------------------------

@pytest.mark.parametrize("head", [
    [(b":status", b"200"), (b"X-Upper", b"1")],
    [(b":status", b"200"), (b"connection", b"close")],
    [(b":status", b"200"), (b"te", b"gzip")],
    [(b":status", b"200"), (b"x-v", b"a\r\nb")],
    [(b":status", b"200"), (b"x-v", b" padded")],
    [(b"x-first", b"1"), (b":status", b"200")],
    [(b":status", b"2000")],
    [(b":status", b"200"), (b":path", b"/")],
    [(b"x-no-status", b"1")],
], ids=["upper-case", "connection-specific", "te", "crlf", "whitespace", "pseudo-after",
        "status", "request-pseudo", "no-status"])
async def test_a_malformed_response_resets_only_its_stream(head):
    """RFC 9113 8.1.1: a stream error (RST_STREAM PROTOCOL_ERROR, the request fails as a protocol
    error: 502 UPE); the connection serves the next request."""
    p, conn, server, task, sid = await one_stream()
    server.h2.send_headers(sid, head)
    server.pump()
    with pytest.raises(UpstreamProtocolError) as e:
        await asyncio.wait_for(task, 1)
    assert e.value.flag == "UPE" and "malformed response" in e.value.reason
    await settle()                  # the reset is written by the next pass's flush
    server.pump()
    assert server.resets == {sid: ErrorCodes.PROTOCOL_ERROR}
    assert conn.used == 0 and not conn.closed
    assert p.acquire() is conn
    task2 = await start(conn)
    server.pump()
    server.respond(max(server.requests), 200, b"next")
    assert (await asyncio.wait_for(task2, 1)).body == b"next"


async def test_malformed_trailers_fail_the_streamed_body():
    p, conn, server, task, sid = await one_stream()
    server.h2.send_headers(sid, [(b":status", b"200")])
    server.h2.send_data(sid, b"part")
    server.pump()
    resp = await asyncio.wait_for(task, 1)
    server.h2.send_headers(sid, [(b":status", b"200")], end_stream=True)   # a pseudo-header
    server.pump()
    with pytest.raises(UpstreamProtocolError):
        await resp.body.read_all(1 << 20)
    assert conn.used == 0 and not conn.closed and conn.has_room()


async def test_a_body_shorter_than_its_content_length_fails_only_its_stream():
    p, conn, server, task, sid = await one_stream()
    server.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"10")])
    server.h2.send_data(sid, b"short", end_stream=True)
    server.pump()
    resp = await asyncio.wait_for(task, 1)
    with pytest.raises(UpstreamProtocolError):
        await resp.body.read_all(1 << 20)
    assert conn.used == 0 and not conn.closed and conn.has_room()


async def test_a_request_body_is_read_from_downstream_only_as_the_peers_window_lets_it_out():
    """HTTP/2 flow control end to end: while the peer reads nothing (its 65535-byte windows
    stay closed) the connection stops reading the downstream body; it all goes out once the
    peer reads."""
    p = pool()
    conn, server = connect(p)
    src = BodyStream()
    req = request("POST", "/up", headers={"host": "svc.local"})
    req.body = src
    p.acquire()
    task = asyncio.ensure_future(conn.send(req, "svc.local", None))
    chunk = bytes(range(256)) * 64                     # 16 KiB
    for _ in range(40):                                # 640 KiB offered, the peer not reading
        src.feed(chunk)
        await settle()
    assert src.buffered > 256 * 1024                   # most of it was left downstream
    src.feed_eof()
    for _ in range(200):
        server.pump()
        await settle()
        if server.ended:
            break
    (sid,) = server.requests
    assert server.bodies[sid] == chunk * 40 and sid in server.ended
    server.respond(sid, 200, b"got it")
    assert (await asyncio.wait_for(task, 1)).body == b"got it"
    assert conn.used == 0


async def test_request_trailers_follow_an_in_memory_body():
    p = pool()
    conn, server = connect(p)
    p.acquire()
    req = request("POST", "/t", headers={"host": "svc.local", "te": "trailers"}, body=b"abc")
    req.trailers = MultiDict({"x-checksum": "900150983cd2"})
    task = await start(conn, req)
    server.pump()
    (sid,) = server.requests
    assert server.bodies[sid] == b"abc"
    assert server.trailers[sid] == [(b"x-checksum", b"900150983cd2")] and sid in server.ended
    server.respond(sid)
    assert (await asyncio.wait_for(task, 1)).status == 200


async def test_a_discarded_body_is_credited_to_the_connection_window():
    """Data a reset stream holds unread goes back to the peer's connection window (else the
    window shrinks for every stream after it)."""
    p = Http2Pool("127.0.0.1", 1, 1.0, Http2Options(initial_stream_window_size=65535,
                                                    initial_connection_window_size=65535))
    p, conn, server, task, sid = await one_stream(p)
    server.h2.send_headers(sid, [(b":status", b"200")])
    for _ in range(3):
        server.h2.send_data(sid, b"x" * 16000)
    server.pump()
    resp = await asyncio.wait_for(task, 1)
    assert server.h2.outbound_flow_control_window == 65535 - 48000
    resp.discard()
    await settle()
    server.pump()
    assert server.resets == {sid: ErrorCodes.CANCEL}
    assert server.h2.outbound_flow_control_window == 65535


async def test_data_that_came_with_a_head_and_a_reset_is_credited():
    """HEADERS, DATA and RST_STREAM in one read: the stream fails before its response was
    handed over; the DATA it held still goes back to the connection window."""
    p = Http2Pool("127.0.0.1", 1, 1.0, Http2Options(initial_stream_window_size=65535,
                                                    initial_connection_window_size=65535))
    p, conn, server, task, sid = await one_stream(p)
    server.h2.send_headers(sid, [(b":status", b"200")])
    for _ in range(3):
        server.h2.send_data(sid, b"x" * 16000)
    server.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
    server.pump()
    with pytest.raises(UpstreamReset):
        await asyncio.wait_for(task, 1)
    await settle()
    server.pump()
    assert server.h2.outbound_flow_control_window == 65535 and conn.used == 0


async def test_a_complete_body_discarded_unread_is_credited_too():
    p = Http2Pool("127.0.0.1", 1, 1.0, Http2Options(initial_stream_window_size=65535,
                                                    initial_connection_window_size=65535))
    p, conn, server, task, sid = await one_stream(p)
    server.h2.send_headers(sid, [(b":status", b"200")])      # no length: an HTTP/1.1 client
    for i in range(3):                                          # gets it streamed
        server.h2.send_data(sid, b"x" * 16000, end_stream=i == 2)
    server.pump()
    resp = await asyncio.wait_for(task, 1)
    assert resp.body_source() is not None and conn.used == 0
    resp.discard()                                    # a retry policy dropping it, say
    await settle()
    server.pump()
    assert server.resets == {} and server.h2.outbound_flow_control_window == 65535


async def _random_exchanges(seed: int, rounds: int) -> None:
    """Many streams on one connection with small windows, the peer answering at random (whole,
    streamed, with trailers, malformed, reset, given up for want of window), the consumer
    reading or discarding at random, the client resetting at random, request bodies in memory
    or streamed."""
    rnd = random.Random(seed)
    p = Http2Pool("127.0.0.1", 1, 1.0, Http2Options(
        max_concurrent_streams=20, initial_stream_window_size=65535,
        initial_connection_window_size=65535))
    conn, server = connect(p)
    sent_total = 0        # DATA bytes the peer sent
    received = credited = 0
    # the connection's own count of what it received and credited, where its methods can be
    # wrapped (the interpreted form; a compiled class calls its methods directly)
    counted = not http2_module.__file__.endswith(".so")
    if counted:
        handle, ack = conn._handle, conn._ack

        def counting_handle(events):
            nonlocal received
            received += sum(len(e.data) for e in events if type(e) is DataReceived)
            handle(events)

        def counting_ack(n: int, sid: int) -> None:
            nonlocal credited
            credited += n
            ack(n, sid)
        conn._handle, conn._ack = counting_handle, counting_ack   # type: ignore[method-assign]

    async def consume(task: asyncio.Future, discard: bool) -> None:
        try:
            resp = await task
            if discard:
                resp.discard()
            elif resp.body_source() is not None:
                await resp.body.read_all(1 << 24)
        except UpstreamError:
            pass    # a failed exchange is one of the outcomes drawn; the credit check is below

    async def feed(src: BodyStream, chunks: int) -> None:
        for _ in range(chunks):
            src.feed(b"y" * rnd.randint(1, 40000))
            await asyncio.sleep(0)
        src.feed_eof()

    consumers, answered, started = [], set(), []
    for _ in range(rounds):
        while p.acquire() is not None:
            if rnd.random() < 0.3:
                req = request("POST", "/s")
                req.body = src = BodyStream()
                consumers.append(asyncio.ensure_future(feed(src, rnd.randint(0, 4))))
            else:
                req = request("POST", "/b", body=b"x" * rnd.choice([0, rnd.randint(1, 100000)]))
            task = asyncio.ensure_future(conn.send(req, "svc.local", None))
            consumers.append(asyncio.ensure_future(consume(task, rnd.random() < 0.3)))
            started.append(req)
        await settle()
        if rnd.random() < 0.3:                  # a client gone, a timeout: our reset
            abort = rnd.choice(started).ctx.abort
            if abort is not None:
                abort()
        server.pump()
        for sid in [s for s in server.requests
                    if s not in answered and s not in server.resets and rnd.random() < 0.5]:
            answered.add(sid)
            h = server.h2
            act = rnd.random()
            if act < 0.1:
                h.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            elif act < 0.2:
                h.send_headers(sid, [(b":status", b"200"), (b"X-Bad", b"1")])
            else:
                n = rnd.randint(0, 60000)
                length = [(b"content-length", str(n).encode())] if rnd.random() < 0.5 else []
                h.send_headers(sid, [(b":status", b"200"), *length])
                sent = 0
                while sent < n and (room := min(h.local_flow_control_window(sid), 16000)) > 0:
                    h.send_data(sid, b"z" * min(room, n - sent))
                    sent += min(room, n - sent)
                sent_total += sent
                if sent < n:
                    h.reset_stream(sid, ErrorCodes.CANCEL)
                elif rnd.random() < 0.3:
                    h.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                else:
                    h.end_stream(sid)
            server.pump()
        await settle()
        server.pump()
    for sid in server.requests:
        if sid not in answered and sid not in server.resets:
            server.h2.reset_stream(sid, ErrorCodes.CANCEL)
    for _ in range(5):
        server.pump()
        await settle()
    await asyncio.wait_for(asyncio.gather(*consumers), 5)
    await settle()
    server.pump()
    assert conn.used == 0 and conn.streams == {} and not conn.closed and p.streams() == 0
    assert sent_total > 1_000_000
    if counted:
        assert credited == received       # every byte delivered went back as window credit
    # on the wire, both forms: what is not credited yet is only what nghttp2 holds back until
    # half the window is consumed (DATA of streams already closed, consumed by the engine)
    assert 65535 - server.h2.outbound_flow_control_window < 65535 // 2


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_exchanges_return_every_slot_and_every_byte_of_window(seed):
    await _random_exchanges(seed, 120)


# ---- GOAWAY -------------------------------------------------------------------------------------

async def test_goaway_fails_later_streams_as_unsent_finishes_covered_ones_then_closes():
    p = pool()
    freed: list[int] = []
    p.on_free = lambda: freed.append(1)
    conn, server = connect(p)
    tasks = []
    for _ in range(3):
        assert p.acquire() is conn
        tasks.append(await start(conn))
    server.pump()
    assert sorted(server.requests) == [1, 3, 5]
    server.raw(goaway_frame(3))                       # streams 1 and 3 will be answered
    await settle()
    with pytest.raises(UpstreamReset) as e:
        await tasks[2]
    assert (e.value.flag, e.value.sent) == ("UR", False)      # safe to retry anywhere
    assert conn.draining and not conn.has_room() and p.acquire() is None
    assert conn.used == 2 and not conn.closed
    server.respond(1, 200, b"one")
    assert (await asyncio.wait_for(tasks[0], 1)).body == b"one"
    assert not conn.closed                            # stream 3 still open
    server.respond(3, 200, b"three")
    assert (await asyncio.wait_for(tasks[1], 1)).body == b"three"
    assert conn.closed and server.t.closed            # its last stream ended: closed
    assert p.conns == [] and freed == [1]


async def test_goaway_with_an_error_fails_every_stream_and_closes_at_once():
    p = pool()
    conn, server = connect(p)
    p.acquire()
    t1 = await start(conn)
    p.acquire()
    t3 = await start(conn)
    server.pump()
    server.raw(goaway_frame(3, ErrorCodes.ENHANCE_YOUR_CALM))
    await settle()
    for t in (t1, t3):
        with pytest.raises(UpstreamReset) as e:
            await t
        assert e.value.sent          # the peer may have processed them
    assert conn.closed and conn.used == 0 and p.conns == []


async def test_goaway_on_an_idle_connection_closes_it():
    p = pool()
    conn, server = connect(p)
    server.raw(goaway_frame(0))
    assert conn.closed and p.conns == []


async def test_connection_lost_fails_open_streams_as_connection_termination():
    p = pool()
    conn, server = connect(p)
    p.acquire()
    t1 = await start(conn)
    server.pump()
    conn.connection_lost(None)
    with pytest.raises(UpstreamReset) as e:
        await t1
    assert (e.value.flag, e.value.sent) == ("UC", True)
    assert p.conns == []


async def test_connection_lost_before_settings_fails_the_connect_step():
    p = pool()
    conn = Http2UpstreamConnection(p)
    conn.connection_made(MemoryTransport())
    p.conns.append(conn)
    conn.connection_lost(ConnectionResetError("reset by peer"))
    with pytest.raises(ConnectFailure) as e:
        conn.ready.result()
    assert "before HTTP/2 SETTINGS" in e.value.reason and e.value.sent is False
    assert p.conns == [] and not p.pending_room()


def bare_connection(p: Http2Pool) -> tuple[Http2UpstreamConnection, MemoryTransport]:
    conn = Http2UpstreamConnection(p)
    t = MemoryTransport()
    conn.connection_made(t)
    p.conns.append(conn)
    return conn, t


async def test_a_malformed_first_frame_fails_the_connect_step():
    p = pool()
    conn, t = bare_connection(p)
    conn.data_received(b"\x00\x00\x04\x07\x00\x00\x00\x00\x00abcd")   # a 4-byte GOAWAY
    with pytest.raises(ConnectFailure) as e:
        conn.ready.result()
    assert "not speaking HTTP/2" in e.value.reason
    assert conn.closed and t.closed and p.conns == []


async def test_an_http1_answer_fails_the_connect_step_at_once():
    p = pool()
    conn, t = bare_connection(p)
    conn.data_received(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    assert conn.ready.done()
    with pytest.raises(ConnectFailure) as e:
        conn.ready.result()
    assert "not speaking HTTP/2" in e.value.reason


async def test_a_connection_error_fails_every_stream_as_a_protocol_error_and_closes():
    p, conn, server, task, sid = await one_stream()
    server.raw(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")       # DATA on stream 0
    with pytest.raises(UpstreamProtocolError) as e:
        await asyncio.wait_for(task, 1)
    assert e.value.flag == "UPE" and "PROTOCOL_ERROR" in e.value.reason
    goaway = [ev for ev in server.h2.receive_data(server.t.take())
              if isinstance(ev, h2.events.ConnectionTerminated)]
    assert [g.error_code for g in goaway] == [ErrorCodes.PROTOCOL_ERROR]
    assert conn.closed and server.t.closed and p.conns == [] and conn.used == 0


# ---- sweep and drain ----------------------------------------------------------------------------

async def test_sweep_closes_only_connections_idle_past_the_timeout():
    p = pool(idle_timeout=60.0)
    idle, _ = connect(p)
    busy, busy_server = connect(p)
    busy.used += 1
    await start(busy)
    busy_server.pump()
    p.sweep(idle.idle_since + 30.0)
    assert not idle.closed
    p.sweep(max(idle.idle_since, busy.idle_since) + 61.0)
    assert idle.closed and not busy.closed
    assert p.conns == [busy]


async def test_close_all_closes_idle_connections_and_drains_busy_ones():
    p = pool()
    busy, server = connect(p)
    idle, _ = connect(p)
    assert p.acquire() is busy            # equally idle: the first one
    task = await start(busy)
    server.pump()
    p.close_all()
    assert idle.closed and not busy.closed and busy.draining and not busy.has_room()
    (sid,) = server.requests
    server.respond(sid)
    assert (await asyncio.wait_for(task, 1)).status == 200
    assert busy.closed and p.conns == []


# ---- header translation -------------------------------------------------------------------------

def test_request_headers_drop_connection_specific_and_keep_te_trailers():
    req = request("GET", "/a b", "", {
        "host": "front.example", "connection": "keep-alive, x-hop", "keep-alive": "timeout=5",
        "x-hop": "secret", "upgrade": "h2c", "transfer-encoding": "chunked",
        "proxy-connection": "keep-alive", "te": "trailers, deflate", "x-app": "1"})
    out = request_headers(req, "back.internal:8443", "https")
    assert out[:4] == [(b":method", b"GET"), (b":scheme", b"https"),
                       (b":authority", b"back.internal:8443"), (b":path", b"/a b")]
    names = [k for k, _ in out[4:]]
    assert names == [b"te", b"x-app"]
    assert (b"te", b"trailers") in out


def test_request_headers_drop_te_without_trailers_and_keep_repeated_values():
    h = MultiDict([("host", "h"), ("te", "gzip"), ("x-v", "1"), ("x-v", "2")])
    out = request_headers(request(headers=h), "h", "http")
    assert [kv for kv in out[4:]] == [(b"x-v", b"1"), (b"x-v", b"2")]
