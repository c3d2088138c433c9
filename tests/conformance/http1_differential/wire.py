"""Lenient parsers for what crosses the wire, used only to *describe* bytes.

``parse_responses`` splits what a client received into responses (status, headers, body), and
``parse_requests`` splits what the upstream received into requests. Both are deliberately
tolerant: the harness must describe whatever a proxy sends, not validate it. Anything that does
not parse is kept as ``trailing`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Message:
    """One HTTP/1.1 message as seen on the wire."""
    start_line: str
    headers: list[tuple[str, str]]          # (lowercase name, value) in wire order
    body: bytes
    framing: str                             # "length", "chunked", "close", "none"
    complete: bool = True
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def status(self) -> int:
        parts = self.start_line.split(" ", 2)
        try:
            return int(parts[1])
        except (IndexError, ValueError):
            return 0


def _head(buf: bytes, pos: int) -> tuple[str, list[tuple[str, str]], int] | None:
    end = buf.find(b"\r\n\r\n", pos)
    if end < 0:
        return None
    lines = buf[pos:end].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip().lower(), v.strip(" \t")))
    return lines[0], headers, end + 4


def _chunked(buf: bytes, pos: int) -> tuple[bytes, list, int] | None:
    """(body, trailers, end) or None when incomplete; raises ValueError when malformed."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0].strip() or b"x", 16)
        pos = eol + 2
        if size == 0:
            trailers = []
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                line = buf[pos:eol]
                pos = eol + 2
                if not line:
                    return bytes(body), trailers, pos
                k, _, v = line.decode("latin-1").partition(":")
                trailers.append((k.strip().lower(), v.strip()))
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos:pos + size]
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        pos += size + 2


def _body(buf: bytes, pos: int, headers, no_body: bool, eof: bool,
          close_delimited: bool) -> tuple[bytes, str, list, int, bool] | None:
    """(body, framing, trailers, end, complete) or None when more bytes are needed."""
    if no_body:
        return b"", "none", [], pos, True
    te = next((v for k, v in headers if k == "transfer-encoding"), None)
    cl = next((v for k, v in headers if k == "content-length"), None)
    if te is not None and te.lower().replace(" ", "").endswith("chunked"):
        try:
            got = _chunked(buf, pos)
        except ValueError:
            return buf[pos:], "chunked", [], len(buf), False
        if got is None:
            return (buf[pos:], "chunked", [], len(buf), False) if eof else None
        body, trailers, end = got
        return body, "chunked", trailers, end, True
    if cl is not None and cl.strip().isdigit():
        n = int(cl)
        if len(buf) - pos < n:
            return (buf[pos:], "length", [], len(buf), False) if eof else None
        return buf[pos:pos + n], "length", [], pos + n, True
    if close_delimited:
        if not eof:
            return None
        return buf[pos:], "close", [], len(buf), True
    return b"", "none", [], pos, True


def parse_responses(buf: bytes, methods: list[str], eof: bool) -> tuple[list[Message], list[int], bytes]:
    """Responses in ``buf`` (the i-th answers ``methods[i]``, for HEAD), the 1xx statuses seen,
    and the bytes left over. With ``eof`` an incomplete last message is returned as such."""
    out: list[Message] = []
    interim: list[int] = []
    pos = 0
    while pos < len(buf):
        if not buf.startswith(b"HTTP/", pos):
            break
        h = _head(buf, pos)
        if h is None:
            break
        line, headers, body_at = h
        msg = Message(line, headers, b"", "none")
        if 100 <= msg.status < 200:
            interim.append(msg.status)
            pos = body_at
            continue
        method = methods[len(out)] if len(out) < len(methods) else "GET"
        no_body = method == "HEAD" or msg.status in (204, 304)
        b = _body(buf, body_at, headers, no_body, eof, close_delimited=True)
        if b is None:
            break
        msg.body, msg.framing, msg.trailers, pos, msg.complete = b
        out.append(msg)
        if not msg.complete:
            break
    return out, interim, buf[pos:]


def parse_requests(buf: bytes, eof: bool) -> tuple[list[Message], bytes]:
    """Complete requests in ``buf`` and the bytes left over (an incomplete request, or bytes
    that do not frame as one)."""
    out: list[Message] = []
    pos = 0
    while pos < len(buf):
        h = _head(buf, pos)
        if h is None:
            break
        line, headers, body_at = h
        b = _body(buf, body_at, headers, False, eof, close_delimited=False)
        if b is None:
            break
        msg = Message(line, headers, b"", "none")
        msg.body, msg.framing, msg.trailers, end, msg.complete = b
        if not msg.complete and not eof:
            break
        out.append(msg)
        pos = end
    return out, buf[pos:]


def request_methods(data: bytes) -> list[str]:
    """The method of each request line a client sent (best effort, for HEAD handling)."""
    methods = []
    for line in data.split(b"\r\n"):
        word = line.split(b" ", 1)[0]
        if word in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                    b"CONNECT", b"TRACE") and b"HTTP/" in line:
            methods.append(word.decode())
    return methods
