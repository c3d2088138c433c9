"""Real peers for the HTTP/2, gRPC and WebSocket conformance suite (all on 127.0.0.1).

- ``EchoServer``: one port that speaks HTTP/1.1 (aiohttp) and HTTP/2 with prior knowledge
  (``h2``), told apart by the connection preface. Answers with a JSON echo of the request as
  it arrived (protocol, headers in order, body digest, request trailers) and can be steered by
  the query string (status, response headers, body size, response trailers, delay).
- ``GrpcBackend``: a real ``grpcio`` server with a generic-handler service ``test.Echo`` (bytes
  in, bytes out: Unary, ServerStream, ClientStream, Bidi, steered by request metadata) and the
  standard ``grpc.health.v1.Health`` service from grpcio-health-checking.
- ``WsEchoServer``: a ``websockets`` server that echoes, and closes on request.
- ``H2Client``: a synchronous HTTP/2 client on a raw socket (cleartext or TLS with ALPN) built
  on ``h2``: exact response headers, trailers, resets, GOAWAY, the server's SETTINGS.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# ---- the HTTP/1.1 + h2c echo upstream --------------------------------------------------------

def _steer(query: list[tuple[str, str]]) -> dict:
    """The query-string knobs, shared by both protocols."""
    out: dict = {"status": 200, "headers": [], "trailers": [], "size": None, "delay": 0.0,
                 "body": None, "chunked": False}
    for k, v in query:
        if k == "status":
            out["status"] = int(v)
        elif k == "hdr":
            name, _, value = v.partition(":")
            out["headers"].append((name, value))
        elif k == "trailer":
            name, _, value = v.partition(":")
            out["trailers"].append((name, value))
        elif k == "size":
            out["size"] = int(v)
        elif k == "delay":
            out["delay"] = float(v)
        elif k == "body":
            out["body"] = v.encode()
        elif k == "chunked":
            out["chunked"] = v == "1"
    return out


def _payload(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def _echo(version: str, method: str, path: str, headers: list, body: bytes,
          trailers: list, conn: int = 0) -> bytes:
    return json.dumps({"version": version, "conn": conn, "method": method, "path": path,
                       "headers": headers, "body_len": len(body),
                       "body_md5": hashlib.md5(body).hexdigest(),
                       "trailers": trailers}).encode()


class _H2EchoProtocol(asyncio.Protocol):
    """The HTTP/2 side of ``EchoServer`` (h2 does the framing, HPACK and flow control)."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1"))
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, dict] = {}
        self.window_open = asyncio.Event()
        self.conn_id = next(server.conn_ids)
        self.active = 0

    def connection_made(self, transport) -> None:     # type: ignore[override]
        self.transport = transport
        self.server.connections["2"] += 1
        self.conn.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.requests[ev.stream_id] = {"headers": list(ev.headers), "body": bytearray(),
                                               "trailers": []}
                self.active += 1
                self.server.max_streams_per_connection = max(
                    self.server.max_streams_per_connection, self.active)
            elif isinstance(ev, h2.events.DataReceived):
                req = self.requests.get(ev.stream_id)
                if req is not None:
                    req["body"] += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.requests[ev.stream_id]["trailers"] = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                req = self.requests.pop(ev.stream_id, None)
                if req is not None:
                    asyncio.ensure_future(self._respond(ev.stream_id, req))
            elif isinstance(ev, h2.events.StreamReset):
                if self.requests.pop(ev.stream_id, None) is not None:
                    self.active -= 1
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self.window_open.set()
        self._flush()

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.window_open.set()

    async def _respond(self, sid: int, req: dict) -> None:
        try:
            await self._answer(sid, req)
        finally:
            self.active -= 1

    async def _answer(self, sid: int, req: dict) -> None:
        pseudo = {k: v for k, v in req["headers"] if k.startswith(":")}
        path = pseudo.get(":path", "/")
        steer = _steer(parse_qsl(urlsplit(path).query, keep_blank_values=True))
        if steer["delay"]:
            await asyncio.sleep(steer["delay"])
        if steer["body"] is not None:
            body, ctype = steer["body"], "text/plain"
        elif steer["size"] is not None:
            body, ctype = _payload(steer["size"]), "application/octet-stream"
        else:
            body = _echo("2", pseudo.get(":method", ""), path,
                         [[k, v] for k, v in req["headers"]], bytes(req["body"]),
                         [[k, v] for k, v in req["trailers"]], self.conn_id)
            ctype = "application/json"
        headers = [(":status", str(steer["status"])), ("content-type", ctype)]
        headers += [(k.lower(), v) for k, v in steer["headers"]]
        try:
            no_body = not body and not steer["trailers"]
            self.conn.send_headers(sid, headers, end_stream=no_body)
            self._flush()
            if not no_body:
                await self._send_body(sid, body, end=not steer["trailers"])
            if steer["trailers"]:
                self.conn.send_headers(sid, [(k.lower(), v) for k, v in steer["trailers"]],
                                       end_stream=True)
            self._flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._flush()

    async def _send_body(self, sid: int, body: bytes, end: bool) -> None:
        view = memoryview(body)
        while view:
            if self.transport is None:
                return
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(sid, bytes(chunk), end_stream=end and not view)
            self._flush()
        if end and not body:
            self.conn.end_stream(sid)
            self._flush()


class _Sniffer(asyncio.Protocol):
    """Reads the first bytes of a connection and hands it to the HTTP/2 echo (on the h2
    connection preface) or to aiohttp (anything else)."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:     # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) < len(PREFACE) and PREFACE.startswith(self.buf):
            return
        assert self.transport is not None
        if self.buf.startswith(PREFACE):
            proto: asyncio.Protocol = _H2EchoProtocol(self.server)
        else:
            self.server.connections["1.1"] += 1
            proto = self.server.http1_factory()
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        proto.data_received(self.buf)


class EchoServer:
    """The echo upstream in its own thread and event loop (sync tests share it)."""

    def __init__(self) -> None:
        self.port = 0
        self.connections: collections.Counter = collections.Counter()
        self.conn_ids = itertools.count(1)
        self.max_streams_per_connection = 0      # the most streams one h2 connection carried
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.http1_factory: Callable[[], asyncio.Protocol]

    async def _handle_http1(self, request: web.Request) -> web.StreamResponse:
        steer = _steer(list(request.query.items()))
        if steer["delay"]:
            await asyncio.sleep(steer["delay"])
        try:
            body_in = await request.content.read()   # (read() caps bodies at 1 MiB)
        except ConnectionError:      # the proxy gave up on this request: nobody to answer
            return web.Response(status=499)
        if steer["body"] is not None:
            body, ctype = steer["body"], "text/plain"
        elif steer["size"] is not None:
            body, ctype = _payload(steer["size"]), "application/octet-stream"
        else:
            body = _echo(f"{request.version.major}.{request.version.minor}", request.method,
                         request.raw_path,
                         [[k.decode("latin-1").lower(), v.decode("latin-1")]
                          for k, v in request.raw_headers], body_in, [])
            ctype = "application/json"
        if steer["chunked"]:
            resp = web.StreamResponse(status=steer["status"])
            resp.headers["Content-Type"] = ctype
            for k, v in steer["headers"]:
                resp.headers.add(k, v)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(body)
            await resp.write_eof()
            return resp
        out = web.Response(status=steer["status"], body=body, content_type=None)
        out.headers["Content-Type"] = ctype
        for k, v in steer["headers"]:
            out.headers.add(k, v)
        return out

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)

        async def start():
            self.http1_factory = web.Server(self._handle_http1, access_log=None)
            srv = await loop.create_server(lambda: _Sniffer(self), "127.0.0.1", 0)
            self.port = srv.sockets[0].getsockname()[1]
            return srv

        srv = loop.run_until_complete(start())
        self._ready.set()
        loop.run_forever()
        srv.close()
        loop.close()

    def start(self) -> EchoServer:
        self._thread = threading.Thread(target=self._run, name="h2-echo", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("echo server did not start")
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)


# ---- gRPC ------------------------------------------------------------------------------------

SERVICE = "test.Echo"
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.enable_http_proxy", 0)]


def _md(context: grpc.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}


@dataclass
class RecordedCall:
    method: str
    metadata: list      # [(key, value)] as the server saw it


class GrpcBackend:
    """A real grpcio server: ``test.Echo`` (generic handlers, raw bytes) and
    ``grpc.health.v1.Health``. Behaviour per call comes from the request metadata:

    ``x-fail: CODE`` (+ ``x-fail-message``) aborts before any message (trailers-only);
    ``x-fail-times: N`` + ``x-key`` + ``x-fail-code`` aborts the first N attempts of that key;
    ``x-fail-after: N`` (ServerStream) aborts after N messages; ``x-trailing: k=v;k=v`` and
    ``x-initial: k=v;...`` add metadata; ``x-delay: s`` waits (until cancelled);
    ``x-hold: 1`` waits until ``release()``; ``x-size: N`` answers N bytes.
    Every answer carries the trailing metadata ``x-served-by: <name>``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[RecordedCall] = []
        self.attempts: collections.Counter = collections.Counter()
        self.health = health.HealthServicer()
        self.active_holds = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=96), options=GRPC_OPTIONS,
                                  maximum_concurrent_rpcs=None)
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.set_serving(True)

    def start(self) -> GrpcBackend:
        self.server.start()
        return self

    def stop(self) -> None:
        self.release()
        self.server.stop(0).wait(5)

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE, status)
        self.health.set("", status)

    def release(self) -> None:
        self._release.set()

    def rearm(self) -> None:
        self._release = threading.Event()

    def calls_with(self, key: str, value: str) -> list[RecordedCall]:
        return [c for c in list(self.calls) if (key, value) in c.metadata]

    # ---- handlers ----

    def _begin(self, method: str, context: grpc.ServicerContext) -> dict[str, str]:
        md = _md(context)
        self.calls.append(RecordedCall(method, list(context.invocation_metadata())))
        if "x-initial" in md:
            context.send_initial_metadata(_pairs(md["x-initial"]))
        trailing = [("x-served-by", self.name)] + _pairs(md.get("x-trailing", ""))
        context.set_trailing_metadata(trailing)
        if "x-delay" in md:
            done = threading.Event()
            context.add_callback(done.set)
            done.wait(float(md["x-delay"]))
        if md.get("x-hold") == "1":
            with self._lock:
                self.active_holds += 1
            try:
                self._release.wait(20)
            finally:
                with self._lock:
                    self.active_holds -= 1
        if "x-fail-times" in md:
            key = md.get("x-key", "")
            with self._lock:
                self.attempts[key] += 1
                n = self.attempts[key]
            if n <= int(md["x-fail-times"]):
                context.abort(getattr(grpc.StatusCode, md.get("x-fail-code", "UNAVAILABLE")),
                              f"attempt {n} failed")
        if "x-fail" in md:
            context.abort(getattr(grpc.StatusCode, md["x-fail"]), md.get("x-fail-message", ""))
        return md

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = self._begin("Unary", context)
        if "x-size" in md:
            return _payload(int(md["x-size"]))
        return request

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        md = self._begin("ServerStream", context)
        count, _, size = request.decode().partition(":")
        fail_after = int(md.get("x-fail-after", "-1"))
        for i in range(int(count)):
            if i == fail_after:
                context.abort(grpc.StatusCode.ABORTED, f"stopped after {i}")
            yield struct.pack(">I", i) + _payload(int(size or "0"))

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._begin("ClientStream", context)
        count = total = 0
        digest = hashlib.md5()
        for r in requests:
            count += 1
            total += len(r)
            digest.update(r)
        return f"{count}:{total}:{digest.hexdigest()}".encode()

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._begin("Bidi", context)
        for r in requests:
            yield b"echo:" + r


def _pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split(";"):
        if item:
            k, _, v = item.partition("=")
            out.append((k, v))
    return out


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(message)) + message


def grpc_messages(body: bytes) -> list[bytes]:
    out = []
    while len(body) >= 5:
        _, n = struct.unpack(">BI", body[:5])
        out.append(body[5:5 + n])
        body = body[5 + n:]
    return out


# ---- WebSocket -------------------------------------------------------------------------------

class WsEchoServer:
    """A ``websockets`` echo server. Text ``close:CODE:REASON`` makes the server close;
    ``big:N`` answers N bytes (binary). Records each handshake's request headers."""

    def __init__(self) -> None:
        self.handshakes: list[list[tuple[str, str]]] = []
        self.closed_by_client: list[int | None] = []
        self._server = serve(self._handler, "127.0.0.1", 0, compression=None,
                             max_size=16 << 20, ping_interval=None)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ws-echo",
                                        daemon=True)

    def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.handshakes.append([(k.lower(), v) for k, v in ws.request.headers.raw_items()])
        try:
            for msg in ws:
                if isinstance(msg, str) and msg.startswith("close:"):
                    _, code, reason = msg.split(":", 2)
                    ws.close(int(code), reason)
                    return
                if isinstance(msg, str) and msg.startswith("big:"):
                    ws.send(_payload(int(msg[4:])))
                    continue
                ws.send(msg)
        except ConnectionClosed:
            pass
        rcvd = ws.protocol.close_rcvd
        self.closed_by_client.append(rcvd.code if rcvd is not None else None)

    def start(self) -> WsEchoServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)


# ---- a synchronous HTTP/2 client -------------------------------------------------------------

@dataclass
class H2Response:
    stream_id: int
    headers: list = field(default_factory=list)        # final response headers, in order
    informational: list = field(default_factory=list)  # 1xx header blocks
    body: bytes = b""
    trailers: list = field(default_factory=list)
    reset: int | None = None          # RST_STREAM error code from the server
    trailers_only: bool = False          # the response HEADERS frame carried END_STREAM
    ended: bool = False

    @property
    def status(self) -> int | None:
        for k, v in self.headers:
            if k == ":status":
                return int(v)
        return None

    def get(self, name: str, default=None):
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def trailer(self, name: str, default=None):
        for k, v in self.trailers:
            if k == name:
                return v
        return default

    @property
    def echo(self) -> dict:
        return json.loads(self.body)


class H2Closed(ConnectionError):
    pass


def client_tls_context(ca_file: str, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


class H2Client:
    """An HTTP/2 client connection (prior knowledge, or TLS with ALPN ``h2``)."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None,
                 server_hostname: str = "localhost", timeout: float = 10.0,
                 validate_outbound: bool = True, local_settings: dict | None = None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        self.alpn: str | None = None
        if tls is not None:
            self.sock = tls.wrap_socket(raw, server_hostname=server_hostname)
            self.alpn = self.sock.selected_alpn_protocol()
        self.timeout = timeout
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="latin-1",
                                        validate_outbound_headers=validate_outbound,
                                        normalize_outbound_headers=validate_outbound)
        self.conn = h2.connection.H2Connection(cfg)
        if local_settings:
            self.conn.local_settings = h2.settings.Settings(client=True,
                                                            initial_values=local_settings)
        self.conn.initiate_connection()
        self.streams: dict[int, H2Response] = {}
        self.goaway: tuple[int, int] | None = None        # (error code, last stream id)
        self.closed = False
        self.server_settings: dict[int, int] = {}
        self.server_connection_window_increment = 0
        self._pings: set[bytes] = set()
        self._flush()

    # -- plumbing --

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump(self) -> None:
        """Read once and process the events (raises H2Closed when the peer closed)."""
        if self.closed:
            raise H2Closed("connection closed")
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            data = b""
        if not data:
            self.closed = True
            raise H2Closed("connection closed")
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.closed = True
            raise
        for ev in events:
            self._event(ev)
        try:
            self._flush()
        except OSError:
            pass

    def _event(self, ev) -> None:
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            for code, change in ev.changed_settings.items():
                self.server_settings[int(code)] = change.new_value
        elif isinstance(ev, h2.events.WindowUpdated) and ev.stream_id == 0:
            self.server_connection_window_increment += ev.delta
        elif isinstance(ev, h2.events.PingAckReceived):
            self._pings.discard(ev.ping_data)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = (int(ev.error_code), ev.last_stream_id)
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            self.streams[ev.stream_id].informational.append(list(ev.headers))
        elif isinstance(ev, h2.events.ResponseReceived):
            r = self.streams[ev.stream_id]
            r.headers = list(ev.headers)
            r.trailers_only = ev.stream_ended is not None
        elif isinstance(ev, h2.events.DataReceived):
            r = self.streams[ev.stream_id]
            r.body += ev.data
            if ev.flow_controlled_length:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.streams[ev.stream_id].trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.streams[ev.stream_id].ended = True
        elif isinstance(ev, h2.events.StreamReset) and ev.stream_id in self.streams:
            self.streams[ev.stream_id].reset = int(ev.error_code)

    def ping(self) -> None:
        """Send a PING and wait for its ACK: every frame the server sent before is seen."""
        payload = struct.pack(">Q", time.monotonic_ns())
        self._pings.add(payload)
        self.conn.ping(payload)
        self._flush()
        while payload in self._pings:
            self._pump()

    def settings_exchange(self) -> dict[int, int]:
        """The server's SETTINGS (and its connection WINDOW_UPDATE) as first sent."""
        self.ping()
        return dict(self.server_settings)

    # -- requests --

    def start(self, method: str = "GET", path: str = "/", headers=(), body: bytes = b"",
              trailers=None, authority: str = "example.test", scheme: str = "http",
              end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = H2Response(sid)
        hdrs = [(":method", method), (":scheme", scheme), (":authority", authority),
                (":path", path)] + [(k, v) for k, v in headers]
        no_body = not body and not trailers and end
        self.conn.send_headers(sid, hdrs, end_stream=no_body)
        self._flush()
        if body:
            self.send_body(sid, body, end=end and not trailers)
        if trailers:
            self.conn.send_headers(sid, list(trailers), end_stream=True)
            self._flush()
        return sid

    def start_headers(self, hdrs: list[tuple[str, str]], end: bool = True) -> int:
        """A stream opened with exactly these header fields (a CONNECT, say)."""
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = H2Response(sid)
        self.conn.send_headers(sid, hdrs, end_stream=end)
        self._flush()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            r = self.streams[sid]
            if r.reset is not None or r.ended:
                return
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self._pump()
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(sid, bytes(chunk), end_stream=end and not view)
            self._flush()

    def end(self, sid: int) -> None:
        self.conn.end_stream(sid)
        self._flush()

    def wait(self, sid: int) -> H2Response:
        r = self.streams[sid]
        while not r.ended and r.reset is None:
            try:
                self._pump()
            except H2Closed:
                break
        return r

    def request(self, method: str = "GET", path: str = "/", headers=(), body: bytes = b"",
                **kw) -> H2Response:
        return self.wait(self.start(method, path, headers, body, **kw))

    def close(self) -> None:
        try:
            if not self.closed:
                self.conn.close_connection()
                self._flush()
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> H2Client:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- a minimal HTTP/1.1 client (exact bytes in, status/headers/body/trailers out) -----------

@dataclass
class H1Response:
    status: int
    headers: list            # [(lowercase name, value)] in wire order
    body: bytes
    trailers: list

    def get(self, name: str, default=None):
        for k, v in self.headers:
            if k == name:
                return v
        return default

    @property
    def echo(self) -> dict:
        return json.loads(self.body)


def http1_exchange(port: int, data: bytes, *, tls: ssl.SSLContext | None = None,
                   timeout: float = 10.0, head_only: bool = False) -> H1Response:
    """Send ``data`` on a new connection and read one response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="localhost")
    buf = b""

    def fill() -> None:
        nonlocal buf
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed early; got {buf[:200]!r}")
        buf += chunk

    def line() -> bytes:
        nonlocal buf
        while b"\r\n" not in buf:
            fill()
        out, _, buf = buf.partition(b"\r\n")
        return out

    def exact(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            fill()
        out, buf = buf[:n], buf[n:]
        return out

    try:
        sock.sendall(data)
        while True:
            status = int(line().split(b" ", 2)[1])
            headers = []
            while True:
                ln = line()
                if not ln:
                    break
                k, _, v = ln.decode("latin-1").partition(":")
                headers.append((k.strip().lower(), v.strip()))
            if status >= 200 or status == 101:
                break
        resp = H1Response(status, headers, b"", [])
        if head_only or status in (101, 204, 304):
            return resp
        if "chunked" in (resp.get("transfer-encoding") or "").lower():
            while True:
                n = int(line().split(b";")[0], 16)
                if n == 0:
                    while True:
                        ln = line()
                        if not ln:
                            break
                        k, _, v = ln.decode("latin-1").partition(":")
                        resp.trailers.append((k.strip().lower(), v.strip()))
                    break
                resp.body += exact(n)
                exact(2)
        elif resp.get("content-length") is not None:
            resp.body = exact(int(resp.get("content-length")))
        else:
            try:
                while True:
                    fill()
            except ConnectionError:
                pass
            resp.body, buf = buf, b""
        return resp
    finally:
        sock.close()


ERROR_NAMES = {int(c): c.name for c in h2.errors.ErrorCodes}


def error_name(code: int | None) -> str | None:
    return None if code is None else ERROR_NAMES.get(code, str(code))
