"""HTTP/1.1 response heads: a ``Response`` to the bytes the downstream connection writes
(status line, the upstream's headers less hop-by-hop ones, Server, Date, framing). Pure: the
connection (``codec.http1``) writes what this returns and streams bodies itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from time import time

from sidecar.codec.headers import DATE, HOP_BY_HOP, STATUS_LINES, status_line
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
    head.append(f"{server_header}{DATE.line()}connection: close\r\n\r\n")
    return "".join(head).encode("latin-1")


def _head_parts(req: Request, resp: Response, keep_alive: bool, server_header: str,
                suppress_envoy_headers: bool, whole: bool) -> tuple[list[str], bool, str | None, bool]:
    """A response head being encoded: its lines still lack the framing header and the blank
    line, which depend on how the body goes; with whether the answer has no body
    (HEAD, 1xx, 204, 304), the upstream's Content-Length, whether the upstream chunked it."""
    headers = resp.headers
    status = resp.status
    line = STATUS_LINES.get(status)
    parts = [line if line is not None else status_line(status)]
    conn_tokens = headers.get("connection")
    drop = HOP_BY_HOP
    if conn_tokens:
        drop = HOP_BY_HOP | {t.strip().lower() for t in conn_tokens.split(",")}
    head_only = req.method == "HEAD" or status in BODYLESS or status < 200
    stream_len = None
    te = headers.get("transfer-encoding")
    # keep the upstream's chunked framing (Envoy does), even for a body read whole
    up_chunked = te is not None and "chunked" in te.lower()
    append = parts.append
    for k, v in headers.items():
        if k in drop or k == "server":
            continue
        if k == "content-length":
            if head_only or not whole:
                stream_len = v     # keep the upstream's length for HEAD and streams
                append(f"content-length: {v}\r\n")
            continue
        append(f"{k}: {v}\r\n")
    append(server_header)
    if "date" not in headers:
        date = DATE         # DATE.line(), without its call while the second has not changed
        append(date.header_line if int(time()) == date.sec else date.line())
    duration = req.ctx.upstream_duration
    if duration is not None and not suppress_envoy_headers:
        append(f"x-envoy-upstream-service-time: {int(duration * 1000)}\r\n")
    if not keep_alive:
        append("connection: close\r\n")
    return parts, head_only, stream_len, up_chunked


def whole_response(req: Request, resp: Response, body: bytes, keep_alive: bool,
                   server_header: str, suppress_envoy_headers: bool) -> tuple[bytes, int]:
    """Head and body of a response read whole, in one buffer (one ``send``), and the body
    bytes it carries."""
    parts, head_only, stream_len, up_chunked = _head_parts(
        req, resp, keep_alive, server_header, suppress_envoy_headers, True)
    if not head_only:
        if up_chunked:
            parts.append("transfer-encoding: chunked\r\n\r\n")
            return "".join(parts).encode("latin-1") + (
                b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"), len(body)
        parts.append(f"content-length: {len(body)}\r\n\r\n")
        return "".join(parts).encode("latin-1") + body, len(body)
    if stream_len is None:
        status = resp.status
        if up_chunked:
            parts.append("transfer-encoding: chunked\r\n")
        elif body and status >= 200 and status not in BODYLESS:
            # HEAD of a local reply: the length of the body a GET would get
            parts.append(f"content-length: {len(body)}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1"), 0


def streamed_head(req: Request, resp: Response, keep_alive: bool, server_header: str,
                  suppress_envoy_headers: bool) -> tuple[bytes, bool, bool, str | None]:
    """The head of a response whose body streams: the bytes, whether the answer has no body
    (then the stream is discarded), whether the body is chunked (no known length), and the
    upstream's Content-Length (to catch a short body)."""
    parts, head_only, stream_len, _ = _head_parts(
        req, resp, keep_alive, server_header, suppress_envoy_headers, False)
    chunked = False
    if not head_only and stream_len is None:
        chunked = True
        parts.append("transfer-encoding: chunked\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1"), head_only, chunked, stream_len
