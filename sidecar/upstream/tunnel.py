"""The upstream half of an upgraded (tunnelled) HTTP/1.1 connection, e.g. WebSocket.

An upgrade request gets its own connection (never pooled: after a 101 it is no longer HTTP).
The request head goes out with its ``Connection: upgrade`` and ``Upgrade`` headers; the
response head is parsed by llhttp. On 101 the response's body is the upstream's byte stream
(flow-controlled), and a task copies the client's bytes (the request's body) upstream, until
either side closes. Any other answer is an ordinary response and the connection closes after.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

import httptools
from multidict import MultiDict

from sidecar.codec.headers import NOT_FORWARDED, connection_drop
from sidecar.codec.sockets import set_nodelay
from sidecar.core.body import BodySource, BodyStream, Headers
from sidecar.core.errors import (
    ConnectFailure,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.core.message import Request, Response

_KEEP = frozenset({"connection", "upgrade"})


def encode_upgrade_request(req: Request, host_header: str | None) -> bytes:
    """The request head, hop-by-hop headers removed except the upgrade pair."""
    headers = req.headers
    drop = connection_drop(NOT_FORWARDED, headers.get("connection")) - _KEEP
    url = req.path + "?" + req.query if req.query else req.path
    parts = [f"{req.method} {url} HTTP/1.1\r\n"]
    for k, v in headers.items():
        if k in drop:
            continue
        if host_header is not None and k == "host":
            v = host_header
        parts.append(f"{k}: {v}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


class TunnelConnection(asyncio.Protocol):
    def __init__(self, buffer_limit: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self.down: BodyStream | None = None      # upstream -> client bytes
        self.upgraded = False
        self.buffer_limit = buffer_limit
        self.pump: asyncio.Task[None] | None = None

    # ---- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            assert self.down is not None
            self.down.feed(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            self._upgrade(data[offset:])
        except httptools.HttpParserError as e:
            self._fail(UpstreamProtocolError(f"upstream protocol error: {e}"))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(UpstreamReset("UC", "upstream connection termination"))
        d = self.down
        if d is not None:
            d.feed_eof()     # the upstream closed: the tunnel ends (the client is closed too)
        if self.pump is not None:
            self.pump.cancel()

    # ---- llhttp callbacks ---------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._headers = []
            return
        self.status = status
        if status != 101:
            # an ordinary answer: its body follows, then the connection closes
            t = self.transport
            assert t is not None
            self.down = BodyStream(t.pause_reading, t.resume_reading, self.buffer_limit)
            self._resolve(self.down)

    def on_body(self, body: bytes) -> None:
        if self.down is not None:
            self.down.feed(body)

    def on_message_complete(self) -> None:
        if self.down is not None and not self.upgraded:
            self.down.feed_eof()
            self.close()

    # ---- the tunnel -----------------------------------------------------------------------------
    def _upgrade(self, rest: bytes) -> None:
        if self.status != 101:
            self._fail(UpstreamProtocolError("upstream upgraded without a 101"))
            self.close()
            return
        t = self.transport
        assert t is not None
        self.upgraded = True
        self.down = BodyStream(t.pause_reading, t.resume_reading, self.buffer_limit)
        if rest:
            self.down.feed(rest)
        self._resolve(self.down)

    def _resolve(self, body: BodyStream) -> None:
        h: Headers = MultiDict()
        for k, v in self._headers:
            h.add(k.decode("latin-1").lower(), v.decode("latin-1"))
        resp = Response(self.status, h, body)
        resp.release = self.close
        if not self.head.done():
            self.head.set_result(resp)

    def _fail(self, err: UpstreamError) -> None:
        if not self.head.done():
            self.head.set_exception(err)

    def start_pump(self, source: BodySource) -> None:
        """Copy the client's bytes upstream until the client's side ends."""
        self.pump = asyncio.get_running_loop().create_task(self._copy(source))

    async def _copy(self, source: BodySource) -> None:
        t = self.transport
        assert t is not None
        try:
            async for chunk in source:
                if t.is_closing():
                    return
                t.write(chunk)
        except Exception:    # the client went away
            pass
        self.close()

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()


async def open_tunnel(host: str, port: int, ssl_context: ssl.SSLContext | None,
                      server_hostname: str, connect_timeout: float, req: Request,
                      host_header: str | None, deadline: float | None,
                      buffer_limit: int, local_addr: tuple[str, int] | None = None) -> Response:
    """Connect, send the upgrade request, return the response head (a 101's body is the
    tunnel from upstream; the client's bytes in ``req.body`` are copied upstream)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            _, conn = await loop.create_connection(
                lambda: TunnelConnection(buffer_limit), host, port, ssl=ssl_context,
                server_hostname=(server_hostname or host) if ssl_context is not None else None,
                local_addr=local_addr)
    except TimeoutError:
        raise ConnectFailure("upstream connect timeout") from None
    except OSError as e:
        raise ConnectFailure(f"connection failure: {e.strerror or e}") from None
    except ssl.SSLError as e:
        raise ConnectFailure(f"TLS error: {e.reason or e}") from None
    assert conn.transport is not None
    set_nodelay(conn.transport)
    conn.transport.write(encode_upgrade_request(req, host_header))
    try:
        if deadline is None:
            resp = await conn.head
        else:
            async with asyncio.timeout_at(deadline):
                resp = await conn.head
    except TimeoutError:
        conn.close()
        raise UpstreamTimeout() from None
    except BaseException:
        conn.close()
        raise
    if resp.status == 101:
        conn.start_pump(req.body if not isinstance(req.body, bytes) else _Empty())
    return resp


class _Empty(BodySource):
    """No client bytes yet and none to come (an upgrade request without a tunnel input)."""

    @property
    def total(self) -> int:
        return 0

    @property
    def at_eof(self) -> bool:
        return True

    async def read(self) -> bytes:
        await asyncio.Event().wait()     # the client side of the tunnel never ends on its own
        return b""
