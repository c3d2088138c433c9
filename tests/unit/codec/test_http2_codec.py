"""The downstream HTTP/2 codec without sockets: an ``h2`` client's bytes are fed to the codec,
what it writes is read back by the client. Request validation (RFC 9113 8.2), bodies and
trailers both ways, flow control, header limits, the abuse guard and HPACK limits."""

from __future__ import annotations

import asyncio
import time

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from multidict import MultiDict

from sidecar.codec.http2 import Http2Connection
from sidecar.codec.http2_common import PREFACE
from sidecar.codec.http2_guard import Abuse, Http2Guard
from sidecar.config.http2 import Http2Options
from sidecar.core.body import BodySource, BodyStream
from sidecar.core.message import Request, Response


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


class Owner:
    """What the listener gives the codec: dispatch answers with ``handler``."""

    name = "test"
    bound_port = 8080
    max_header_bytes = 60 * 1024
    max_headers_count = 100
    headers_with_underscores = "ALLOW"
    server_name = "envoy"
    suppress_envoy_headers = False
    draining = False

    def __init__(self, handler=None) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.finished: list[tuple[Request, Response, int]] = []
        self.abuse: list[str] = []
        self.opened = self.closed = 0

    def connection_opened(self, conn) -> None:
        self.opened += 1

    def connection_closed(self, conn) -> None:
        self.closed += 1

    def protocol_error(self, status: int) -> None:
        pass

    def http2_abuse(self, kind: str) -> None:
        self.abuse.append(kind)

    async def dispatch(self, req: Request) -> Response:
        self.requests.append(req)
        if self.handler is not None:
            return await self.handler(req)
        body = req.body if isinstance(req.body, bytes) else await req.body.read_all(1 << 24)
        return Response(200, MultiDict({"content-type": "text/plain"}), b"got:" + body)

    def finish(self, req, resp, n) -> None:
        self.finished.append((req, resp, n))


class Peer:
    """An h2 client wired to a codec through a fake transport."""

    def __init__(self, options: Http2Options | None = None, handler=None) -> None:
        self.owner = Owner(handler)
        self.codec = Http2Connection(self.owner, options or Http2Options())
        self.t = FakeTransport()
        self.codec.connection_made(self.t)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="latin-1", validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.client.initiate_connection()
        self.events: list = []
        self.send(b"")

    def send(self, raw: bytes = b"") -> None:
        self.codec.data_received(self.client.data_to_send() + raw)
        self.pump()

    def pump(self) -> None:
        data = self.t.take()
        if data:
            try:
                self.events += self.client.receive_data(data)
            except h2.exceptions.ProtocolError:
                pass
            self.codec.data_received(self.client.data_to_send()) if not self.t.closed else None

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)
            self.pump()

    def of(self, kind, sid=None) -> list:
        return [e for e in self.events if isinstance(e, kind)
                and (sid is None or getattr(e, "stream_id", None) == sid)]

    def headers(self, extra=(), path="/p", method="GET") -> list:
        return [(":method", method), (":scheme", "http"), (":authority", "example.test"),
                (":path", path), *extra]


async def test_request_and_response_with_body_and_trailers():
    async def handler(req: Request) -> Response:
        body = req.body if isinstance(req.body, bytes) else await req.body.read_all(1 << 20)
        r = Response(200, MultiDict({"content-type": "text/plain", "connection": "x",
                                     "keep-alive": "1"}), body.upper())
        r.trailers = MultiDict({"grpc-status": "0"})
        return r

    p = Peer(handler=handler)
    p.client.send_headers(1, p.headers([("cookie", "a=1"), ("cookie", "b=2")], "/x?q=1", "POST"))
    p.client.send_data(1, b"hello")
    p.client.send_headers(1, [("x-req-trailer", "v")], end_stream=True)
    p.send()
    await p.settle()
    req = p.owner.requests[0]
    assert (req.method, req.path, req.query, req.version) == ("POST", "/x", "q=1", "2")
    assert req.headers["host"] == "example.test" and req.headers["cookie"] == "a=1; b=2"
    assert req.body == b"hello" and req.trailers == MultiDict({"x-req-trailer": "v"})
    assert req.ctx.protocol == "HTTP/2" and req.chunked      # no content-length: chunked upstream
    resp = p.of(h2.events.ResponseReceived, 1)[0]
    names = dict(resp.headers)
    assert names[":status"] == "200" and names["server"] == "envoy"
    assert "connection" not in names and "keep-alive" not in names
    assert b"".join(e.data for e in p.of(h2.events.DataReceived, 1)) == b"HELLO"
    assert p.of(h2.events.TrailersReceived, 1)[0].headers == [("grpc-status", "0")]


async def test_trailers_only_response_is_one_headers_frame():
    async def handler(req):
        return Response(200, MultiDict({"content-type": "application/grpc", "grpc-status": "12"}))

    p = Peer(handler=handler)
    p.client.send_headers(1, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    r = p.of(h2.events.ResponseReceived, 1)[0]
    assert r.stream_ended is not None and ("grpc-status", "12") in r.headers


@pytest.mark.parametrize("extra", [[("connection", "close")], [("transfer-encoding", "chunked")],
                                   [("te", "gzip")], [("X-Upper", "1")], [("upgrade", "h2c")],
                                   [("bad\x01name", "v")], [("x", "a\r\nb")]])
async def test_malformed_request_closes_the_connection(extra):
    p = Peer()
    p.client.send_headers(1, p.headers(extra), end_stream=True)
    p.send()
    assert p.t.closed and not p.owner.requests and p.owner.abuse == ["malformed_request"]
    assert p.of(h2.events.ConnectionTerminated)[0].error_code == 1     # PROTOCOL_ERROR


async def test_malformed_request_resets_only_the_stream_when_configured():
    p = Peer(Http2Options(override_stream_error_on_invalid_http_message=True))
    p.client.send_headers(1, p.headers([("connection", "close")]), end_stream=True)
    p.client.send_headers(3, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    assert p.of(h2.events.StreamReset, 1)[0].error_code == 1 and not p.t.closed
    assert p.of(h2.events.ResponseReceived, 3)


async def test_host_next_to_authority_is_accepted_authority_wins():
    p = Peer()
    p.client.send_headers(1, p.headers([("host", "other.test")]), end_stream=True)
    p.send()
    await p.settle()
    assert p.owner.requests[0].headers.getall("host") == ["example.test"]


async def test_headers_over_the_limit_reset_the_stream_only():
    p = Peer()
    p.owner.max_header_bytes = 1000
    p.client.send_headers(1, p.headers([("x-big", "v" * 2000)]), end_stream=True)
    p.client.send_headers(3, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    assert p.of(h2.events.StreamReset, 1)[0].error_code == 2       # INTERNAL_ERROR
    assert p.of(h2.events.ResponseReceived, 3) and not p.t.closed


async def test_streamed_body_credits_the_window_as_it_is_read():
    """A 64 KiB stream window: the client can only send more once the consumer read."""
    seen = []

    async def handler(req: Request) -> Response:
        assert isinstance(req.body, BodyStream)
        total = 0
        async for chunk in req.body:
            total += len(chunk)
            seen.append(total)
        return Response(200, MultiDict(), b"%d" % total)

    p = Peer(Http2Options(initial_stream_window_size=65535, initial_connection_window_size=65535),
             handler=handler)
    p.client.send_headers(1, p.headers(method="POST"))
    blob = b"x" * 200_000
    sent = 0
    for _ in range(200):
        window = min(p.client.local_flow_control_window(1), 16384, len(blob) - sent)
        if window > 0:
            p.client.send_data(1, blob[sent:sent + window], end_stream=sent + window == len(blob))
            sent += window
            p.send()
        await p.settle()
        if sent == len(blob):
            break
    await p.settle()
    assert sent == len(blob) and b"".join(e.data for e in p.of(h2.events.DataReceived, 1)) == b"200000"
    assert max(b - a for a, b in zip([0, *seen], seen, strict=False)) <= 65535


async def test_response_respects_the_client_window():
    async def handler(req):
        return Response(200, MultiDict(), b"y" * 300_000)

    p = Peer(handler=handler)
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    p.client.send_headers(1, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    got = sum(len(e.data) for e in p.of(h2.events.DataReceived, 1))
    assert got <= 1000                               # nothing past the window
    p.client.increment_flow_control_window(400_000)
    p.client.increment_flow_control_window(400_000, 1)
    p.send()
    await p.settle()
    assert sum(len(e.data) for e in p.of(h2.events.DataReceived, 1)) == 300_000


async def test_whole_response_with_trailers_waits_for_the_client_window():
    """A complete body over the window: the trailers follow its last byte, never before."""
    async def handler(req):
        r = Response(200, MultiDict({"content-type": "application/grpc"}), b"z" * 5000)
        r.trailers = MultiDict({"grpc-status": "0"})
        return r

    p = Peer(handler=handler)
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    p.client.send_headers(1, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    assert sum(len(e.data) for e in p.of(h2.events.DataReceived, 1)) <= 1000
    assert not p.of(h2.events.TrailersReceived, 1)
    p.client.increment_flow_control_window(10_000, 1)
    p.send()
    await p.settle()
    assert sum(len(e.data) for e in p.of(h2.events.DataReceived, 1)) == 5000
    assert p.of(h2.events.TrailersReceived, 1)[0].headers == [("grpc-status", "0")]
    assert p.of(h2.events.StreamEnded, 1) and p.owner.finished[0][2] == 5000


async def test_whole_response_counts_its_frames_once_and_ends_the_stream():
    """Headers, body and trailers within the windows go out together, counted as the
    frames they are (an outbound flood is judged on them)."""
    async def handler(req):
        r = Response(200, MultiDict(), b"q" * 40_000)    # 3 DATA frames of 16 KiB at most
        r.trailers = MultiDict({"x-t": "1"})
        return r

    p = Peer(handler=handler)
    p.client.send_headers(1, p.headers(), end_stream=True)
    p.codec.data_received(p.client.data_to_send())
    await asyncio.sleep(0)           # the stream's task answers
    g = p.codec.guard
    assert (g.data_frames_sent, g.frames_queued) == (3, 5)
    await p.settle()
    assert sum(len(e.data) for e in p.of(h2.events.DataReceived, 1)) == 40_000
    assert p.of(h2.events.TrailersReceived, 1)[0].headers == [("x-t", "1")]
    assert not p.codec.streams


@pytest.mark.parametrize("connection", ["keep-alive", "close", "Keep-Alive, X-Hop", "x-hop"])
async def test_response_fields_dropped_encoded_and_never_indexed(connection):
    """Connection-specific fields and those the ``connection`` header names are dropped; the
    volatile ones (ids) are never indexed, the others may be; the same on a later stream
    (the names are remembered)."""
    async def handler(req):
        return Response(200, MultiDict([("connection", connection), ("x-hop", "1"),
                                        ("close", "2"), ("x-request-id", req.path),
                                        ("x-cafe", "cr\u00e8me"), ("server", "up"),
                                        ("te", "trailers")]), b"ok")

    p = Peer(handler=handler)
    named = {t.strip().lower() for t in connection.split(",")}
    dropped = {"connection"} | (named & {"x-hop", "close"})
    for sid in (1, 3):
        p.client.send_headers(sid, p.headers(path=f"/{sid}"), end_stream=True)
        p.send()
        await p.settle()
        fields = p.of(h2.events.ResponseReceived, sid)[0].headers
        names = [k for k, _ in fields]
        assert not dropped & set(names) and "te" not in names
        assert ("server", "envoy") in fields and names.count("server") == 1
        assert ("close", "2") in fields or "close" in dropped
        assert ("x-hop", "1") in fields or "x-hop" in dropped
        rid = next(f for f in fields if f[0] == "x-request-id")
        assert rid == ("x-request-id", f"/{sid}") and isinstance(rid, hpack.NeverIndexedHeaderTuple)
        cafe = next(f for f in fields if f[0] == "x-cafe")
        assert cafe[1] == "cr\u00e8me" and not isinstance(cafe, hpack.NeverIndexedHeaderTuple)


def raw(*frames: Frame) -> bytes:
    return b"".join(f.serialize() for f in frames)


async def test_rapid_reset_closes_after_the_threshold_and_never_dispatches():
    p = Peer()
    enc = hpack.Encoder()
    frames: list[Frame] = []
    for i in range(300):
        sid = 1 + 2 * i
        hf = HeadersFrame(sid, enc.encode(p.headers()))
        hf.flags.add("END_HEADERS")
        hf.flags.add("END_STREAM")
        frames += [hf, RstStreamFrame(sid, error_code=8)]
    p.codec.data_received(raw(*frames))
    assert p.t.closed and p.owner.abuse == ["premature_resets"] and not p.owner.requests
    goaway = [f for f in _frames(p.t.take()) if isinstance(f, GoAwayFrame)]
    assert goaway and goaway[-1].error_code == 11          # ENHANCE_YOUR_CALM


async def test_empty_data_frames_flood():
    p = Peer()
    p.client.send_headers(1, p.headers(method="POST"))
    p.send()
    p.codec.data_received(raw(DataFrame(1, b""), DataFrame(1, b"")))
    assert p.t.closed and p.owner.abuse == ["inbound_empty_frames_flood"]


def _frames(data: bytes) -> list[Frame]:
    out = []
    while len(data) >= 9:
        f, n = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9:9 + n]))
        data = data[9 + n:]
        out.append(f)
    return out


def test_guard_limits():
    g = Http2Guard(Http2Options(max_inbound_priority_frames_per_stream=2,
                                max_outbound_control_frames=3))
    g.stream_opened()
    for _ in range(4):
        g.priority(1)
    with pytest.raises(Abuse):
        g.priority(1)                  # 2 x (1 + 1 stream) = 4 allowed
    g = Http2Guard(Http2Options())
    for _ in range(5):
        g.window_update()
    with pytest.raises(Abuse):
        g.window_update()              # 5 + 2 x (streams + 10 x DATA frames sent)
    g = Http2Guard(Http2Options())
    g.data_sent()
    for _ in range(25):
        g.window_update()
    g = Http2Guard(Http2Options(max_outbound_control_frames=3))
    for _ in range(3):
        g.control_frame()
    g.flushed()
    for _ in range(3):
        g.control_frame()
    with pytest.raises(Abuse) as e:
        g.control_frame()
    assert e.value.goaway is None      # the flood closes without a GOAWAY (it would queue too)
    g = Http2Guard(Http2Options(max_outbound_frames=5))
    for _ in range(5):
        g.frame_queued()
    with pytest.raises(Abuse) as e:
        g.data_sent()                  # DATA frames count toward max_outbound_frames too
    assert e.value.kind == "outbound_flood"
    g = Http2Guard(Http2Options())
    for _ in range(249):
        g.reset_by_peer(True)
    g.reset_by_peer(False)             # a late reset is not premature
    with pytest.raises(Abuse):
        g.reset_by_peer(True)


async def test_ping_and_priority_and_window_frames_are_counted():
    p = Peer()
    p.codec.data_received(raw(*[PriorityFrame(1, depends_on=0, stream_weight=1)
                                for _ in range(150)]))
    assert p.t.closed and p.owner.abuse == ["inbound_priority_frames_flood"]
    p = Peer()
    p.codec.data_received(raw(*[WindowUpdateFrame(0, 1) for _ in range(50)]))
    assert p.t.closed and p.owner.abuse == ["inbound_window_update_frames_flood"]
    p = Peer()
    p.codec.data_received(raw(*[PingFrame(0, b"12345678") for _ in range(1500)]))
    assert p.t.aborted and p.owner.abuse == ["outbound_control_flood"]


async def test_listener_header_limits_over_http2():
    """max_headers_count and headers_with_underscores_action REJECT_REQUEST reset the stream
    (Envoy's HTTP/2 codec); DROP_HEADER drops the field; the connection lives."""
    p = Peer()
    p.owner.max_headers_count = 10          # 4 pseudo-headers + 7 fields: one too many
    p.client.send_headers(1, p.headers([(f"x-{i}", "v") for i in range(7)]), end_stream=True)
    p.client.send_headers(3, p.headers([(f"x-{i}", "v") for i in range(6)]), end_stream=True)
    p.send()
    await p.settle()
    assert p.of(h2.events.StreamReset, 1)[0].error_code == 2
    assert p.of(h2.events.ResponseReceived, 3) and not p.t.closed
    p = Peer()
    p.owner.headers_with_underscores = "REJECT_REQUEST"
    p.client.send_headers(1, p.headers([("x_a", "v")]), end_stream=True)
    p.client.send_headers(3, p.headers([("x-a", "v")]), end_stream=True)
    p.send()
    await p.settle()
    assert p.of(h2.events.StreamReset, 1)[0].error_code == 2
    assert p.of(h2.events.ResponseReceived, 3) and not p.t.closed
    assert p.owner.abuse == ["underscore_header"]
    p = Peer()
    p.owner.headers_with_underscores = "DROP_HEADER"
    p.client.send_headers(1, p.headers([("x_a", "v"), ("x-b", "w")]), end_stream=True)
    p.send()
    await p.settle()
    h = p.owner.requests[0].headers
    assert "x_a" not in h and h["x-b"] == "w"


async def test_suppress_envoy_headers():
    async def handler(req: Request) -> Response:
        req.ctx.upstream_duration = 0.002
        return Response(200, MultiDict(), b"ok")

    for suppress, expect in ((False, True), (True, False)):
        p = Peer(handler=handler)
        p.owner.suppress_envoy_headers = suppress
        p.client.send_headers(1, p.headers(), end_stream=True)
        p.send()
        await p.settle()
        names = [k for k, _ in p.of(h2.events.ResponseReceived, 1)[0].headers]
        assert ("x-envoy-upstream-service-time" in names) is expect
        if expect:
            # indexable, as Envoy sends it (whole milliseconds repeat: a one-byte index
            # then), not a never-indexed literal that repeats its 29-byte name every time
            field = next(f for f in p.of(h2.events.ResponseReceived, 1)[0].headers
                         if f[0] == "x-envoy-upstream-service-time")
            assert field == ("x-envoy-upstream-service-time", "2")
            assert not isinstance(field, hpack.NeverIndexedHeaderTuple)


class Limits:
    request_timeout_s = 0.0
    stream_idle_timeout_s = 0.0
    max_stream_duration_s = 0.0


async def test_stream_timeouts_before_and_after_the_response():
    """The listener's sweep: before the response a local reply (504 once the request had all
    arrived, 408 while it is still arriving), after it a reset of the stream; gRPC clients
    get DEADLINE_EXCEEDED for the duration timeout."""
    hold = asyncio.Event()

    async def slow(req: Request) -> Response:
        # the connection manager marks gRPC requests (listener.http)
        req.ctx.grpc = req.headers.get("content-type", "").startswith("application/grpc")
        await hold.wait()
        return Response(200, MultiDict(), b"late")

    lim = Limits()
    lim.max_stream_duration_s = 0.001
    p = Peer(handler=slow)
    p.client.send_headers(1, p.headers(), end_stream=True)                 # complete: 504
    p.client.send_headers(3, p.headers(method="POST"))                     # still sending: 408
    p.client.send_headers(5, p.headers([("content-type", "application/grpc")], method="POST"),
                          end_stream=True)
    p.send()
    await p.settle()
    await asyncio.sleep(0.01)
    p.codec.idle_check(time.monotonic(), 0, 0, lim)
    await p.settle()
    status = {sid: dict(p.of(h2.events.ResponseReceived, sid)[0].headers)
              for sid in (1, 3, 5)}
    assert status[1][":status"] == "504" and status[3][":status"] == "408"
    assert status[5][":status"] == "200" and status[5]["grpc-status"] == "4"
    assert p.of(h2.events.StreamReset, 3)           # the rest of its upload is refused
    flags = {r.ctx.flags[0] for r, _, _ in p.owner.finished}
    assert flags == {"DT"} and not p.t.closed

    async def streaming(req: Request) -> Response:
        async def gen():
            yield b"first"
            await hold.wait()
            yield b"never"
        return Response(200, MultiDict(), gen())

    lim = Limits()
    lim.stream_idle_timeout_s = 0.001
    p = Peer(handler=streaming)
    p.client.send_headers(1, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    assert p.of(h2.events.ResponseReceived, 1)
    await asyncio.sleep(0.01)
    p.codec.idle_check(time.monotonic(), 0, 0, lim)
    await p.settle()
    assert p.of(h2.events.StreamReset, 1)[0].error_code == 0       # NO_ERROR, as Envoy
    assert p.owner.finished[0][0].ctx.flags == ["SI"] and not p.codec.streams


async def test_streams_of_a_connection_share_its_identity():
    """Per-connection state (e.g. a per-connection rate limit bucket) keys on ctx.connection:
    the same for every stream of one HTTP/2 connection, another for the next connection."""
    p = Peer()
    p.client.send_headers(1, p.headers(), end_stream=True)
    p.client.send_headers(3, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    a, b = (r.ctx.connection for r in p.owner.requests)
    assert a is not None and a is b
    q = Peer()
    q.client.send_headers(1, q.headers(), end_stream=True)
    q.send()
    await q.settle()
    assert q.owner.requests[0].ctx.connection is not a


# ---- the guard reads frame headers before the engine; what the engine decides ------------------

def test_guard_scan_counts_frames_split_anywhere_and_skips_payloads():
    """The frame headers are read across reads (a header split in two, a payload spanning
    many reads) and payloads are never taken for frame headers."""
    from sidecar.codec.http2_guard import PREFACE_LENGTH

    opts = Http2Options(max_inbound_priority_frames_per_stream=2)
    # a DATA payload made of PRIORITY frame headers: skipped, not counted
    fake = raw(*[PriorityFrame(1, depends_on=0, stream_weight=1) for _ in range(100)])
    stream = (PREFACE + raw(HeadersFrame(1, b"\x82", flags=["END_HEADERS"]),
                            DataFrame(1, fake)) +
              raw(*[PriorityFrame(1, depends_on=0, stream_weight=1) for _ in range(4)]))
    assert len(PREFACE) == PREFACE_LENGTH
    for step in (1, 5, 9, 10, 1000, len(stream)):
        g = Http2Guard(opts)
        for i in range(0, len(stream), step):
            g.scan(stream[i:i + step])
        assert (g.priority_frames, g.streams_opened, g.last_stream_id) == (4, 1, 1), step
        with pytest.raises(Abuse):     # 2 x (1 + 1 stream) = 4 allowed: the fifth is a flood
            g.scan(raw(PriorityFrame(1, depends_on=0, stream_weight=1)))


def test_guard_scan_empty_frames_and_acks():
    g = Http2Guard(Http2Options(max_outbound_control_frames=2))
    g.scan(PREFACE + raw(PingFrame(0, b"12345678", flags=["ACK"]),
                         SettingsFrame(0, flags=["ACK"])))       # ACKs we get queue nothing
    g.scan(raw(PingFrame(0, b"12345678"), SettingsFrame(0)))
    with pytest.raises(Abuse) as e:
        g.scan(raw(PingFrame(0, b"12345678")))
    assert e.value.kind == "outbound_control_flood"
    g = Http2Guard(Http2Options())
    g.scan(PREFACE + raw(HeadersFrame(1, b"", flags=["END_STREAM"]),    # END_STREAM: not empty
                         DataFrame(1, b""), DataFrame(1, b"x")))       # one empty, then data
    with pytest.raises(Abuse) as e:
        g.scan(raw(ContinuationFrame(1, b""), ContinuationFrame(1, b"")))
    assert e.value.kind == "inbound_empty_frames_flood"


async def test_too_many_streams_closes_without_a_goaway():
    """Past an acknowledged SETTINGS_MAX_CONCURRENT_STREAMS nghttp2 would send GOAWAY
    PROTOCOL_ERROR; Envoy closes without one, and so does the codec."""
    hold = asyncio.Event()

    async def slow(req):
        await hold.wait()
        return Response(200, MultiDict(), b"")

    p = Peer(Http2Options(max_concurrent_streams=2), handler=slow)
    await p.settle()                                   # our SETTINGS acknowledged
    p.t.take()
    enc = hpack.Encoder()
    p.codec.data_received(raw(*[HeadersFrame(sid, enc.encode(p.headers()),
                                             flags=["END_HEADERS", "END_STREAM"])
                                for sid in (1, 3, 5)]))
    assert p.t.aborted and p.owner.abuse == ["too_many_streams"]
    assert not [f for f in _frames(p.t.take()) if isinstance(f, GoAwayFrame)]
    hold.set()


async def test_connect_is_answered_404_and_the_connection_goes_on():
    """No route matches a CONNECT (connect_matcher is refused): 404 on its stream, as Envoy;
    the next request on the connection is served."""
    p = Peer()
    p.client.send_headers(1, [(":method", "CONNECT"), (":authority", "example.test:443")])
    p.send()
    await p.settle()
    resp = p.of(h2.events.ResponseReceived, 1)[0]
    assert dict(resp.headers)[":status"] == "404" and not p.owner.requests
    assert not p.t.closed and p.owner.abuse == []
    p.client.send_headers(3, p.headers(path="/next"), end_stream=True)
    p.send()
    await p.settle()
    assert [r.path for r in p.owner.requests] == ["/next"]


async def test_a_connection_error_ends_the_open_streams():
    """A WINDOW_UPDATE taking a stream's window past 2^31-1 while its request is being served:
    GOAWAY FLOW_CONTROL_ERROR (nghttp2's), the request body fails, the connection closes."""
    failed = []

    async def reader(req):
        try:
            await req.body.read_all(1 << 20)
        except ConnectionError as e:
            failed.append(e)
        return Response(200, MultiDict(), b"")

    p = Peer(handler=reader)
    p.client.send_headers(1, p.headers(method="POST"))
    p.send()
    await p.settle()
    p.codec.data_received(raw(WindowUpdateFrame(1, 0x7FFFFFFF)))
    goaway = [f for f in _frames(p.t.take()) if isinstance(f, GoAwayFrame)]
    await p.settle()
    assert p.t.closed and goaway and goaway[-1].error_code == 3    # FLOW_CONTROL_ERROR
    assert failed and not p.codec.streams


async def test_drain_finishes_open_streams_and_ignores_new_ones():
    hold = asyncio.Event()

    async def slow(req):
        await hold.wait()
        return Response(200, MultiDict(), b"done")

    p = Peer(handler=slow)
    p.client.send_headers(1, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    p.codec.send_goaway()
    p.pump()
    assert p.of(h2.events.ConnectionTerminated)[0].last_stream_id == 1
    p.t.take()
    p.codec.data_received(raw(HeadersFrame(3, hpack.Encoder().encode(p.headers()),
                                           flags=["END_HEADERS", "END_STREAM"])))
    hold.set()
    await p.settle()
    assert len(p.owner.requests) == 1 and p.owner.finished[0][2] == 4   # stream 1 answered
    p.codec.idle_check(time.monotonic(), 0, 0)
    assert p.t.closed


async def test_streamed_response_waits_for_the_client_window():
    """A streamed body: the writer is held while what it queued does not fit the windows (the
    engine holds at most the high-water mark), and resumes as the client opens them."""
    produced = []

    class Chunks(BodySource):
        """40 chunks of 16 KiB, produced as they are read."""

        total = 0
        at_eof = False

        async def read(self) -> bytes:
            if len(produced) == 40:
                return b""
            produced.append(1)
            return b"z" * 16384

    async def handler(req):
        return Response(200, MultiDict(), Chunks())

    p = Peer(handler=handler)
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16384})
    p.client.send_headers(1, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    got = sum(len(e.data) for e in p.of(h2.events.DataReceived, 1))
    assert got <= 16384 and len(produced) < 10          # held back, not buffered
    for _ in range(60):
        if p.of(h2.events.StreamEnded, 1):
            break
        p.client.increment_flow_control_window(65536)
        p.client.increment_flow_control_window(65536, 1)
        p.send()
        await p.settle()
    assert sum(len(e.data) for e in p.of(h2.events.DataReceived, 1)) == 40 * 16384


async def test_body_not_matching_content_length_resets_only_its_stream():
    """nghttp2 resets the stream (PROTOCOL_ERROR); Envoy keeps the connection for this one
    (observed against Envoy 1.40), unlike a malformed header block."""
    p = Peer()
    p.client.send_headers(1, p.headers([("content-length", "10")], method="POST"))
    p.client.send_data(1, b"abc", end_stream=True)
    p.client.send_headers(3, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    assert p.of(h2.events.StreamReset, 1)[0].error_code == 1 and not p.t.closed
    assert p.of(h2.events.ResponseReceived, 3)


@pytest.mark.parametrize("trailer", [("x-upper", "a\r\nb"), (":path", "/"), ("connection", "x")])
async def test_malformed_trailers_close_the_connection(trailer):
    p = Peer()
    p.client.send_headers(1, p.headers(method="POST"))
    p.client.send_data(1, b"abc")
    p.client.send_headers(1, [trailer], end_stream=True)
    p.send()
    await p.settle()
    assert p.t.closed and p.owner.abuse == ["malformed_request"]
    assert p.of(h2.events.ConnectionTerminated)[0].error_code == 1     # PROTOCOL_ERROR


async def test_large_response_within_the_client_window_needs_no_window_update():
    """A body larger than what the engine holds per stream, inside the client's windows: it
    all goes out without the client sending a WINDOW_UPDATE."""
    async def handler(req):
        return Response(200, MultiDict(), b"w" * 1_000_000)

    p = Peer(handler=handler)
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 * 1024 * 1024})
    p.client.increment_flow_control_window(16 * 1024 * 1024)
    p.client.send_headers(1, p.headers(), end_stream=True)
    p.send()
    await p.settle()
    assert sum(len(e.data) for e in p.of(h2.events.DataReceived, 1)) == 1_000_000
    assert p.of(h2.events.StreamEnded, 1) and p.owner.finished


@pytest.mark.parametrize("copies,alive", [(4000, True), (6000, False)])
async def test_hpack_bomb_resets_the_stream_up_to_the_engine_bound(copies, alive):
    """One 4 KB field indexed and referenced ``copies`` times (16 / 24 MB decoded): up to the
    engine's bound (NGH2_MAX_HEADER_LIST) the stream is reset INTERNAL_ERROR and the connection
    lives, as in Envoy; past it the engine gives up on the connection."""
    p = Peer()
    enc = hpack.Encoder()
    block = enc.encode(p.headers() + [("x-bomb", "b" * 4000)] * copies)   # about 10 KB
    assert len(block) < 16384
    p.codec.data_received(raw(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"])))
    for _ in range(3):              # the reset is written by the next pass's flush
        await asyncio.sleep(0)
    out = _frames(p.t.take())       # the h2 client never opened stream 1: read the frames
    assert not p.owner.requests and p.t.closed is not alive
    if alive:
        assert [(f.stream_id, f.error_code) for f in out if isinstance(f, RstStreamFrame)] == \
            [(1, 2)]                                    # INTERNAL_ERROR
        assert p.owner.abuse == ["headers_too_large"]


async def test_too_many_streams_before_the_settings_ack_are_refused():
    """Before the client acknowledged our SETTINGS a stream past the limit is refused
    (REFUSED_STREAM) and the connection lives: nghttp2's rule, Envoy's behaviour."""
    hold = asyncio.Event()

    async def slow(req):
        await hold.wait()
        return Response(200, MultiDict(), b"")

    owner = Owner(slow)
    codec = Http2Connection(owner, Http2Options(max_concurrent_streams=2))
    t = FakeTransport()
    codec.connection_made(t)
    enc = hpack.Encoder()
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", "a.test"), (":path", "/")]
    codec.data_received(PREFACE + raw(SettingsFrame(0), *[
        HeadersFrame(sid, enc.encode(headers), flags=["END_HEADERS", "END_STREAM"])
        for sid in (1, 3, 5)]))
    await asyncio.sleep(0)
    resets = [(f.stream_id, f.error_code) for f in _frames(t.take()) if isinstance(f, RstStreamFrame)]
    assert resets == [(5, 7)] and not t.closed and len(owner.requests) == 2
    hold.set()
    await asyncio.sleep(0)
