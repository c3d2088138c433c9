"""Request and response: head, body (complete or streamed) and trailers.

Codecs turn bytes into these and back; everything between (routing, filters, clusters) works
on them only, whatever the wire protocol.
"""

from __future__ import annotations

from collections.abc import Callable

from multidict import MultiDict

from sidecar.core.body import Body, BodySource, BodyTooLarge, Headers
from sidecar.core.context import RequestContext


class Request:
    __slots__ = ("method", "path", "query", "headers", "body", "ctx", "version", "authority",
                 "keep_alive", "chunked", "reject", "trailers", "scheme", "upgrade")

    def __init__(self, method: str, path: str, query: str, headers: Headers, body: Body,
                 ctx: RequestContext, version: str = "1.1"):
        self.method = method
        self.path = path        # path only, as received (percent-encoding kept)
        self.query = query      # raw query string without "?", "" when absent
        self.headers = headers
        self.body = body
        self.ctx = ctx
        self.version = version  # "1.0", "1.1", "2"
        self.authority = headers.get("host", "")
        self.scheme = "http"
        self.keep_alive = True   # the client's wish for this request (captured at parse time)
        self.chunked = False     # HTTP/1.1: the client sent the body chunked
        self.trailers: Headers | None = None    # of a complete body
        # set by the codec: answer locally with (status, details) and close
        self.reject: tuple[int, str] | None = None
        # the Upgrade token of an HTTP/1.1 upgrade request ("websocket"): if the listener and
        # route allow it and the upstream answers 101, the connection becomes a tunnel and
        # ``body`` carries the client's bytes after the request
        self.upgrade: str | None = None

    @property
    def url(self) -> str:
        return self.path + "?" + self.query if self.query else self.path

    async def read_body(self, limit: int) -> bytes:
        """Buffer the whole body (up to ``limit``), replacing the stream so it can be replayed."""
        body = self.body
        if isinstance(body, bytes):
            if len(body) > limit:
                raise BodyTooLarge(len(body))
            return body
        data = await body.read_all(limit)
        if body.trailers is not None:
            self.trailers = body.trailers
        self.body = data
        return data


class Response:
    __slots__ = ("status", "headers", "body", "reason", "release", "trailers", "local")

    def __init__(self, status: int, headers: Headers | None = None, body: Body = b"",
                 reason: str = ""):
        self.status = status
        self.headers: Headers = headers if headers is not None else MultiDict()
        self.body = body
        self.reason = reason
        self.trailers: Headers | None = None    # of a complete body
        self.local = False      # made by the proxy itself (Envoy's "local reply")
        # called when the response is discarded (a retried attempt, a client gone) so the
        # upstream connection or stream holding its body is closed rather than leaked
        self.release: Callable[[], None] | None = None

    def discard(self) -> None:
        release = self.release
        if release is not None:
            self.release = None
            release()

    def body_source(self) -> BodySource | None:
        b = self.body
        return None if isinstance(b, bytes) else b

    async def read_body(self, limit: int) -> bytes:
        """Buffer the whole body (up to ``limit``), replacing the stream so it can be sent on.
        On ``BodyTooLarge`` the body is lost: ``discard()`` the response and answer locally."""
        body = self.body
        if isinstance(body, bytes):
            if len(body) > limit:
                raise BodyTooLarge(len(body))
            return body
        data = await body.read_all(limit)
        if body.trailers is not None:
            self.trailers = body.trailers
        self.body = data
        return data


def local_reply(ctx: RequestContext, status: int, body: str, flag: str | None = None,
                headers: Headers | None = None, details: str = "") -> Response:
    """A response made by the proxy itself (Envoy's "local reply"), recording its flag.

    The route's observe layer reshapes it for gRPC clients (status 200, grpc-status)."""
    if flag is not None:
        ctx.flags.append(flag)
    if details:
        ctx.response_code_details = details
    h = headers if headers is not None else MultiDict()
    data = body.encode()
    if "content-type" not in h:
        h["content-type"] = "text/plain"
    resp = Response(status, h, data)
    resp.local = True
    return resp
