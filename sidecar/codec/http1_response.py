"""HTTP/1.1 response heads: a ``Response`` to the bytes the downstream connection writes
(status line, the upstream's headers less hop-by-hop ones, Server, Date, framing). Pure: the
connection (``codec.http1``) writes what this returns and streams bodies itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.codec.headers import DATE, HOP_BY_HOP, status_line
from sidecar.core.message import Request, Response

BODYLESS = (204, 304)


def local_head(status: int, headers: Iterable[tuple[str, str]], body_len: int,
               server_header: str, content_type: str = "") -> bytes:
    """The head of a reply the codec makes itself (protocol errors); the connection closes."""
    head = [status_line(status)]
    for k, v in headers:
        head.append(f"{k}: {v}\r\n")
    head.append(f"content-length: {body_len}\r\n")
    if content_type:
        head.append(f"content-type: {content_type}\r\n")
    head.append(f"{server_header}"
                f"date: {DATE.get()}\r\nconnection: close\r\n\r\n")
    return "".join(head).encode("latin-1")


class Head:
    """A response head being encoded: ``parts`` still lacks the framing header and the blank
    line, which depend on how the body goes (``whole``, ``bodyless`` or ``streaming``)."""

    __slots__ = ("parts", "head_only", "stream_len", "up_chunked")

    def __init__(self, req: Request, resp: Response, keep_alive: bool, server_header: str,
                 suppress_envoy_headers: bool) -> None:
        headers = resp.headers
        status = resp.status
        parts = [status_line(status)]
        conn_tokens = headers.get("connection")
        drop = HOP_BY_HOP
        if conn_tokens:
            drop = HOP_BY_HOP | {t.strip().lower() for t in conn_tokens.split(",")}
        head_only = req.method == "HEAD" or status in BODYLESS or status < 200
        whole = isinstance(resp.body, bytes)
        stream_len = None
        te = headers.get("transfer-encoding")
        # keep the upstream's chunked framing (Envoy does), even for a body read whole
        self.up_chunked = te is not None and "chunked" in te.lower()
        for k, v in headers.items():
            if k in drop or k == "server":
                continue
            if k == "content-length":
                if head_only or not whole:
                    stream_len = v     # keep the upstream's length for HEAD and streams
                    parts.append(f"content-length: {v}\r\n")
                continue
            parts.append(f"{k}: {v}\r\n")
        parts.append(server_header)
        if "date" not in headers:
            parts.append(f"date: {DATE.get()}\r\n")
        ctx = req.ctx
        if ctx.upstream_duration is not None and not suppress_envoy_headers:
            parts.append(f"x-envoy-upstream-service-time: {int(ctx.upstream_duration * 1000)}\r\n")
        if not keep_alive:
            parts.append("connection: close\r\n")
        self.parts = parts
        self.head_only = head_only
        self.stream_len = stream_len

    def whole(self, body: bytes, status: int) -> bytes:
        """Head and body of a response read whole, in one buffer (one ``send``)."""
        parts = self.parts
        if not self.head_only:
            if self.up_chunked:
                parts.append("transfer-encoding: chunked\r\n\r\n")
                return "".join(parts).encode("latin-1") + (
                    b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n")
            parts.append(f"content-length: {len(body)}\r\n\r\n")
            return "".join(parts).encode("latin-1") + body
        if self.stream_len is None:
            if self.up_chunked:
                parts.append("transfer-encoding: chunked\r\n")
            elif body and status >= 200 and status not in BODYLESS:
                # HEAD of a local reply: the length of the body a GET would get
                parts.append(f"content-length: {len(body)}\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("latin-1")

    def bodyless(self) -> bytes:
        """The head of a HEAD (or 1xx/204/304) answer whose upstream body streams."""
        self.parts.append("\r\n")
        return "".join(self.parts).encode("latin-1")

    def streaming(self) -> tuple[bytes, bool]:
        """The head of a streamed body, and whether the body is chunked (no known length)."""
        chunked = self.stream_len is None
        if chunked:
            self.parts.append("transfer-encoding: chunked\r\n")
        self.parts.append("\r\n")
        return "".join(self.parts).encode("latin-1"), chunked
