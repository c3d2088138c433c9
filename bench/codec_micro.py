"""Per-message CPU cost of the HTTP/1.1 codecs alone (no sockets, no routing): a typical
request parsed by the downstream codec up to the Request handed to the connection manager,
and a typical response parsed by the upstream codec up to the Response. Used to see what a
codec change costs with less noise than a full proxy run on a busy machine:

    python -m bench.codec_micro                    # this tree
    PYTHONPATH=/path/to/other/tree python -m bench.codec_micro   # another tree, to compare

Prints microseconds per request and per response (best of 7 rounds of 20,000).
"""

from __future__ import annotations

import asyncio
import time

from sidecar.codec.http1 import DownstreamConnection
from sidecar.core.message import Response
from sidecar.upstream.http1 import ConnectionPool, UpstreamConnection

REQUEST = (b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: service.internal:8080\r\n"
           b"User-Agent: bench/1.0\r\nAccept: */*\r\nX-Request-Id: 0f3c2b1a-1111-2222-3333-444455556666\r\n"
           b"Accept-Encoding: gzip\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 24\r\n"
            b"Date: Fri, 04 Dec 2026 23:00:00 GMT\r\nServer: nginx\r\n\r\n"
            b'{"ok": true, "id": 42}\r\n')


class _Transport:
    def write(self, data): pass
    def get_extra_info(self, name, default=None): return None
    def pause_reading(self): pass
    def resume_reading(self): pass
    def is_closing(self): return False
    def close(self): pass


class _Owner:
    name = "bench"
    bound_port = 8080
    max_header_bytes = 60 * 1024
    max_headers_count = 100
    headers_with_underscores = "ALLOW"
    server_header = "server: envoy\r\n"
    accept_http_10 = False
    suppress_envoy_headers = False
    draining = False

    def connection_opened(self, conn): pass
    def connection_closed(self, conn): pass
    def protocol_error(self, status): pass


class _Conn(DownstreamConnection):
    """Stops at the hand-off to the connection manager."""

    def _enqueue(self, req):
        self.got.append(req)


def downstream(n: int) -> float:
    conn = _Conn(_Owner())
    conn.transport = _Transport()
    got = conn.got = []
    t = time.perf_counter()
    for _ in range(n):
        conn.data_received(REQUEST)
    dt = time.perf_counter() - t
    assert len(got) == n
    return dt / n * 1e6


async def upstream(n: int) -> float:
    loop = asyncio.get_running_loop()
    pool = ConnectionPool("127.0.0.1", 1, 1.0)
    conn = UpstreamConnection(pool)
    conn.transport = _Transport()
    total = 0.0
    import httptools
    for _ in range(n):
        # what UpstreamConnection.request does before the bytes arrive
        conn.parser = conn._spare_parser or httptools.HttpResponseParser(conn)
        conn._spare_parser = None
        for attr, v in (("_headers", []), ("_chunks", []), ("_status", 0), ("_head_done", False),
                        ("_complete", False), ("_keep_alive", False), ("_no_body", False),
                        ("_stream", None), ("_got_bytes", False)):
            setattr(conn, attr, v)
        for attr in ("_hsize",):
            if hasattr(type(conn), attr):
                setattr(conn, attr, 0)
        for attr, v in (("_refusal", None), ("_until_close", False), ("_after_end", False),
                        ):
            if hasattr(type(conn), attr):
                setattr(conn, attr, v)
        fut = conn._future = loop.create_future()
        t = time.perf_counter()
        conn.data_received(RESPONSE)
        total += time.perf_counter() - t
        assert isinstance(fut.result(), Response)
    return total / n * 1e6


def main() -> None:
    n = 20_000
    d = min(downstream(n) for _ in range(7))
    u = min(asyncio.run(upstream(n)) for _ in range(7))
    print(f"downstream request parse: {d:.2f} us; upstream response parse: {u:.2f} us")


if __name__ == "__main__":
    main()
