"""Real HTTP/2 peers for the integration tests, on asyncio and ``h2``: a client that runs many
streams on one connection (cleartext prior knowledge or TLS with ALPN) and an upstream server
driven by a handler. Frames and HPACK are ``h2``'s."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from sidecar.testing import native_config, running_proxy


@dataclass
class H2Response:
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    reset: int | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return default

    @property
    def text(self) -> str:
        return self.body.decode()


class _Proto(asyncio.Protocol):
    def __init__(self, conn: h2.connection.H2Connection, on_events) -> None:
        self.conn = conn
        self.on_events = on_events
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.transport.close()
            return
        self.on_events(events)
        self.flush()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.on_events([h2.events.ConnectionTerminated()])


class H2Client:
    """``async with H2Client(port) as c: r = await c.request("GET", "/")``."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None,
                 authority: str = "example.test", host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.tls = tls
        self.authority = authority
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="latin-1"))
        self.proto: _Proto | None = None
        self.streams: dict[int, tuple[H2Response, asyncio.Future[H2Response]]] = {}
        self.window = asyncio.Event()
        self.goaway: tuple[int, int] | None = None
        self.alpn: str | None = None

    async def __aenter__(self) -> H2Client:
        loop = asyncio.get_running_loop()
        self.conn.initiate_connection()
        _, self.proto = await loop.create_connection(
            lambda: _Proto(self.conn, self._events), self.host, self.port, ssl=self.tls,
            server_hostname="localhost" if self.tls else None)
        if self.tls is not None:
            self.alpn = self.proto.transport.get_extra_info("ssl_object").selected_alpn_protocol()
        self.proto.flush()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.proto is not None and self.proto.transport is not None:
            try:
                self.conn.close_connection()
                self.proto.flush()
            except h2.exceptions.ProtocolError:
                pass
            self.proto.transport.close()

    def _events(self, events) -> None:
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                self.streams[ev.stream_id][0].headers = list(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                item = self.streams.get(ev.stream_id)
                if item is not None:
                    item[0].body += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.streams[ev.stream_id][0].trailers = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                self._done(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                item = self.streams.get(ev.stream_id)
                if item is not None:
                    item[0].reset = int(ev.error_code)
                    self._done(ev.stream_id)
            elif isinstance(ev, h2.events.WindowUpdated):
                self.window.set()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                if ev.error_code is not None:
                    self.goaway = (int(ev.error_code), ev.last_stream_id or 0)
                for sid in list(self.streams):
                    if ev.last_stream_id is None or sid > ev.last_stream_id:
                        self._done(sid)
                self.window.set()

    def _done(self, sid: int) -> None:
        item = self.streams.get(sid)
        if item is not None and not item[1].done():
            r = item[0]
            r.status = int(dict(r.headers).get(":status", 0)) or None
            r.headers = [(k, v) for k, v in r.headers if not k.startswith(":")]
            item[1].set_result(r)

    async def start(self, method: str = "GET", path: str = "/", headers=(), body: bytes = b"",
                    trailers=None, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        fut = asyncio.get_running_loop().create_future()
        self.streams[sid] = (H2Response(), fut)
        hdrs = [(":method", method), (":scheme", "https" if self.tls else "http"),
                (":authority", self.authority), (":path", path), *headers]
        self.conn.send_headers(sid, hdrs, end_stream=not body and not trailers and end)
        self.proto.flush()
        if body:
            await self.send_data(sid, body, end=end and not trailers)
        if trailers:
            self.conn.send_headers(sid, list(trailers), end_stream=True)
            self.proto.flush()
        return sid

    async def send_data(self, sid: int, body: bytes, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(sid, bytes(chunk), end_stream=end and not view)
            self.proto.flush()
        if end and not body:
            self.conn.end_stream(sid)
            self.proto.flush()

    async def response(self, sid: int, timeout: float = 10.0) -> H2Response:
        return await asyncio.wait_for(self.streams[sid][1], timeout)

    async def request(self, method: str = "GET", path: str = "/", headers=(), body: bytes = b"",
                      trailers=None, timeout: float = 10.0) -> H2Response:
        return await self.response(await self.start(method, path, headers, body, trailers), timeout)


# ---- an HTTP/2 upstream ---------------------------------------------------------------------

@dataclass
class H2Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]]
    authority: str = ""

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


# handler(request) -> (status, headers, body, trailers)
H2Handler = Callable[[H2Request], Awaitable[tuple[int, list, bytes, list]]]


async def echo_handler(req: H2Request) -> tuple[int, list, bytes, list]:
    return 200, [("content-type", "text/plain"), ("x-path", req.path)], req.body or b"ok", []


class H2Upstream:
    """An HTTP/2 (prior knowledge) server on loopback; ``requests`` records what arrived;
    ``goaway_after``: send a graceful GOAWAY once that many streams were opened (streams it
    covers are answered, the connection closes after them)."""

    def __init__(self, handler: H2Handler = echo_handler, *, max_streams: int = 100,
                 goaway_after: int = 0) -> None:
        self.handler = handler
        self.max_streams = max_streams
        self.goaway_after = goaway_after
        self.requests: list[H2Request] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> H2Upstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ServerProto(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()


class _ServerProto(asyncio.Protocol):
    def __init__(self, up: H2Upstream) -> None:
        self.up = up
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="latin-1"))
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, dict] = {}
        self.opened = 0
        self.active = 0
        self.goaway_sent = False
        self.window = asyncio.Event()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.up.connections += 1
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.up.max_streams})
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.opened += 1
                self.pending[ev.stream_id] = {"headers": list(ev.headers), "body": b"", "trailers": []}
            elif isinstance(ev, h2.events.DataReceived):
                self.pending[ev.stream_id]["body"] += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.pending[ev.stream_id]["trailers"] = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                p = self.pending.pop(ev.stream_id)
                self.active += 1
                asyncio.ensure_future(self._answer(ev.stream_id, p))
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self.window.set()
        if self.up.goaway_after and not self.goaway_sent and self.opened >= self.up.goaway_after:
            self.goaway_sent = True
            # graceful: the streams opened so far are answered (h2 would refuse to send after
            # its own GOAWAY, so it is written beside it, as the proxy does)
            self.flush()
            self.transport.write(GoAwayFrame(0, last_stream_id=self.conn.highest_inbound_stream_id,
                                             error_code=0).serialize())
        self.flush()

    async def _answer(self, sid: int, p: dict) -> None:
        pseudo = {k: v for k, v in p["headers"] if k.startswith(":")}
        req = H2Request(pseudo.get(":method", ""), pseudo.get(":path", ""),
                        [(k, v) for k, v in p["headers"] if not k.startswith(":")], p["body"],
                        p["trailers"], pseudo.get(":authority", ""))
        self.up.requests.append(req)
        try:
            status, headers, body, trailers = await self.up.handler(req)
            self.conn.send_headers(sid, [(":status", str(status)), *headers],
                                   end_stream=not body and not trailers)
            view = memoryview(body)
            while view:
                window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if window <= 0:
                    self.window.clear()
                    self.flush()
                    await self.window.wait()
                    continue
                chunk, view = view[:window], view[window:]
                self.conn.send_data(sid, bytes(chunk), end_stream=not view and not trailers)
            if trailers:
                self.conn.send_headers(sid, trailers, end_stream=True)
            self.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.active -= 1
            if self.goaway_sent and not self.active and not self.pending and self.transport:
                self.transport.close()


class RawH2Server(asyncio.Protocol):
    """An HTTP/2 upstream on ``h2`` with its outbound checks off, so a test can make it send
    what a conforming server would not; subclasses answer in ``data_received``. ``connections``
    counts the connections made to the subclass."""

    connections = 0

    def connection_made(self, transport) -> None:
        type(self).connections += 1
        self.t = transport
        self.c = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False))
        self.c.initiate_connection()
        transport.write(self.c.data_to_send())


async def good_bad_good(peer: type[RawH2Server], bad_path: str) -> list[H2Response]:
    """``/good``, ``bad_path``, ``/good`` on one client connection through a sidecar whose
    HTTP/2 cluster is one ``peer`` server on loopback (its ``connections`` reset first)."""
    peer.connections = 0
    server = await asyncio.get_running_loop().create_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = native_config(clusters={"svc": {"endpoints": [f"127.0.0.1:{port}"],
                                              "protocol": "http2"}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, admin=False) as p, H2Client(p.port()) as c:
            return [await c.request("GET", path) for path in ("/good", bad_path, "/good")]
    finally:
        server.close()

