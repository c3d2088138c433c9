"""A small HTTP/1.1 server for the proxy's own endpoints (admin, dashboard, metrics port, each
worker's private socket), served by the proxy's own downstream codec (``codec.http1``: the same
parsing, limits and keep-alive as proxied traffic). It replaces aiohttp's web server there,
which cost ~9 MB of resident memory per process for a handful of GET and POST routes.

Routes are (method, exact path) or (method, path prefix); HEAD is served by the GET route;
a known path with another method is a 405 with ``Allow``; nothing matched is a 404. A
``middleware`` (one, optional) sees every request before the routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl

from multidict import CIMultiDict, MultiDict

from sidecar.codec.http1 import DownstreamConnection
from sidecar.core.body import BodySource
from sidecar.core.message import Request, Response

log = logging.getLogger("sidecar.local_http")

IDLE_TIMEOUT_S = 60.0          # an idle keep-alive connection is closed after this
HEADERS_TIMEOUT_S = 10.0       # a request head must arrive within this
SWEEP_S = 5.0
MAX_BODY = 1 << 20             # request bodies (the admin's POSTs carry none) are read up to this

TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"


class LocalRequest:
    """What a handler sees of a request (also made directly to call a router in memory)."""

    __slots__ = ("method", "path", "query", "headers", "body", "tail")

    def __init__(self, method: str, path: str, query: str = "",
                 headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> None:
        self.method = method
        self.path = path
        self.query: dict[str, str] = {}
        for k, v in parse_qsl(query, keep_blank_values=True):
            self.query.setdefault(k, v)
        self.headers: CIMultiDict[str] = CIMultiDict(headers)   # case-insensitive
        self.body = body
        self.tail = ""                    # what a prefix route matched after its prefix


Handler = Callable[[LocalRequest], Awaitable[Response]]
Middleware = Callable[[LocalRequest, Handler], Awaitable[Response]]


def respond(body: bytes | str, content_type: str = TEXT, status: int = 200,
            headers: Iterable[tuple[str, str]] = ()) -> Response:
    data = body.encode() if isinstance(body, str) else body
    h: MultiDict[str] = MultiDict(headers)
    h["content-type"] = content_type
    return Response(status, h, data)


def text(body: str, status: int = 200) -> Response:
    return respond(body, TEXT, status)


def json_response(obj: Any, status: int = 200, dumps: Callable[[Any], str] = json.dumps,
                  headers: Iterable[tuple[str, str]] = ()) -> Response:
    return respond(dumps(obj), JSON, status, headers)


class Router:
    def __init__(self) -> None:
        self.exact: dict[str, dict[str, Handler]] = {}
        self.prefixes: list[tuple[str, str, Handler]] = []
        self.fallback: Handler | None = None     # every request no route matched
        self.middleware: Middleware | None = None
        self.on_cleanup: list[Callable[[], Awaitable[None]]] = []

    def get(self, path: str, handler: Handler) -> None:
        self.exact.setdefault(path, {})["GET"] = handler

    def post(self, path: str, handler: Handler) -> None:
        self.exact.setdefault(path, {})["POST"] = handler

    def prefix(self, method: str, prefix: str, handler: Handler) -> None:
        self.prefixes.append((method, prefix, handler))

    async def handle(self, lreq: LocalRequest) -> Response:
        if self.middleware is not None:
            return await self.middleware(lreq, self._route)
        return await self._route(lreq)

    async def _route(self, lreq: LocalRequest) -> Response:
        method = "GET" if lreq.method == "HEAD" else lreq.method
        by_method = self.exact.get(lreq.path)
        if by_method is not None:
            h = by_method.get(method)
            if h is not None:
                return await h(lreq)
        for m, prefix, h in self.prefixes:
            if lreq.path.startswith(prefix) and len(lreq.path) > len(prefix):
                if m == method:
                    lreq.tail = lreq.path[len(prefix):]
                    return await h(lreq)
        if self.fallback is not None:
            return await self.fallback(lreq)
        if by_method is not None:
            allow = ", ".join(sorted({*by_method, *(("HEAD",) if "GET" in by_method else ())}))
            return respond("405: Method Not Allowed", status=405, headers=(("allow", allow),))
        return text("404: Not Found", 404)


class _Owner:
    """The codec's ``StreamOwner`` for a local server: dispatches to the router."""

    def __init__(self, router: Router, name: str) -> None:
        self.router = router
        self.name = name
        self.max_header_bytes = 60 * 1024
        self.max_headers_count = 100
        self.headers_with_underscores = "ALLOW"
        self.server_header = "server: sidecar\r\n"
        self.accept_http_10 = True
        self.suppress_envoy_headers = True
        self.stream_idle_timeout_s = IDLE_TIMEOUT_S
        self.port = 0
        self.closing = False
        self.connections: set[DownstreamConnection] = set()

    @property
    def bound_port(self) -> int:
        return self.port

    @property
    def draining(self) -> bool:
        return self.closing

    def connection_opened(self, conn: Any) -> None:
        self.connections.add(conn)

    def connection_closed(self, conn: Any) -> None:
        self.connections.discard(conn)

    def protocol_error(self, status: int) -> None:
        """Not counted: the admin and worker sockets have no listener metrics."""

    def finish(self, req: Request, resp: Response, body_bytes: int) -> None:
        """Nothing to observe: admin requests are not proxied traffic."""

    async def dispatch(self, req: Request) -> Response:
        body = req.body
        data = body if isinstance(body, bytes) else await _read(body)
        if data is None:
            return text("request body too large", 413)
        return await self.router.handle(LocalRequest(req.method, req.path, req.query,
                                                     req.headers.items(), data))


async def _read(source: BodySource) -> bytes | None:
    parts: list[bytes] = []
    size = 0
    async for chunk in source:
        size += len(chunk)
        if size > MAX_BODY:
            return None
        parts.append(chunk)
    return b"".join(parts)


class LocalServer:
    """One bound socket (TCP or Unix) serving a router; ``cleanup()`` closes it."""

    def __init__(self, router: Router, name: str = "admin") -> None:
        self.router = router
        self.owner = _Owner(router, name)
        self.server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def _protocol(self) -> DownstreamConnection:
        return DownstreamConnection(self.owner)

    async def start_tcp(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, host, port, reuse_address=True)
        self.owner.port = self.server.sockets[0].getsockname()[1]
        self._sweep()
        return self.owner.port

    async def start_unix(self, path: str) -> None:
        try:
            os.unlink(path)          # a restarted worker takes over its predecessor's socket
        except FileNotFoundError:
            pass
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(self._protocol, path)
        self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.owner.connections):
            conn.idle_check(now, IDLE_TIMEOUT_S, HEADERS_TIMEOUT_S)
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

    async def cleanup(self) -> None:
        self.owner.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.server is not None:
            self.server.close()
            for conn in list(self.owner.connections):
                if not conn.in_flight():
                    conn._close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except TimeoutError:
                pass
            self.server = None
        for fn in self.router.on_cleanup:
            try:
                await fn()
            except Exception:
                log.exception("local server cleanup")


async def fetch_unix(path: str, method: str, target: str, timeout: float) -> tuple[int, str]:
    """One request over a Unix socket (a worker's private endpoint): (status, body text).
    Raises OSError / TimeoutError when the peer does not answer."""
    async def go() -> tuple[int, str]:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(f"{method} {target} HTTP/1.1\r\nhost: local\r\ncontent-length: 0\r\n"
                         "connection: close\r\n\r\n".encode("latin-1"))
            data = await reader.read()          # until the server closes (connection: close)
        finally:
            writer.close()
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            raise ConnectionError("incomplete response")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ConnectionError("bad status line")
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"transfer-encoding" and b"chunked" in v.lower():
                body = _dechunk(body)
        return int(status_line[1]), body.decode("utf-8", "replace")
    return await asyncio.wait_for(go(), timeout)


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        n = int(size_line.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out.append(rest[:n])
        data = rest[n + 2:]
    return b"".join(out)
