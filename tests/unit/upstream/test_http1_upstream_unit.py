"""The pooled HTTP/1.1 upstream connection (``sidecar.upstream.http1``) without sockets: response
bytes are fed to the protocol through an in-memory transport, split into reads at every
position, so the head limits, interim responses, HEAD responses and bytes after a response are
checked whatever the read boundaries (the connection counts header sizes one by one only when a
head may exceed the limit, and the outcome must not depend on that)."""

from __future__ import annotations

import asyncio

import pytest
from multidict import MultiDict

from sidecar.core.context import RequestContext
from sidecar.core.errors import UpstreamProtocolError, UpstreamTimeout
from sidecar.core.message import Request, Response
from sidecar.upstream.http1 import ConnectionPool, UpstreamConnection, encode_request
from tests.unit.upstream.memory_transport import MemoryTransport


def request(method: str = "GET", headers: list[tuple[str, str]] | None = None, body: bytes = b"",
            query: str = "") -> Request:
    h: MultiDict[str] = MultiDict(headers if headers is not None else [("host", "a")])
    return Request(method, "/p", query, h, body, RequestContext("t", None, 0.0))


def pool(max_header_bytes: int = 80 * 1024, max_headers_count: int = 100) -> ConnectionPool:
    return ConnectionPool("127.0.0.1", 1, 1.0, max_header_bytes=max_header_bytes,
                          max_headers_count=max_headers_count)


def connect(p: ConnectionPool) -> tuple[UpstreamConnection, MemoryTransport]:
    conn = UpstreamConnection(p)
    t = MemoryTransport()
    conn.connection_made(t)
    p.active += 1
    return conn, t


async def exchange(conn: UpstreamConnection, reads: list[bytes], method: str = "GET") -> Response:
    task = asyncio.ensure_future(conn.send(request(method), None, None))
    await asyncio.sleep(0)
    for data in reads:
        conn.data_received(data)
    resp = await task
    if not isinstance(resp.body, bytes):       # the head came before the whole body
        resp.body = await resp.body.read_all(1 << 20)
    return resp


def splits(data: bytes) -> list[list[bytes]]:
    """The bytes in one read, in two reads cut at every position, and one byte per read."""
    out = [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))]
    out.append([data[i:i + 1] for i in range(len(data))])
    return out


def head(fields: list[tuple[bytes, bytes]], status: bytes = b"200 OK") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields)
            + b"content-length: 2\r\n\r\n")


LIMIT = 64
CL = len(b"content-length") + len(b"2")        # the framing header counts too


@pytest.mark.parametrize("size", [LIMIT - CL, LIMIT - CL + 1])
async def test_head_size_limit_does_not_depend_on_reads(size: int) -> None:
    # names + values of all the head's headers: at the limit it passes, one byte more is refused
    value = b"v" * (size - len(b"x-a"))
    data = head([(b"x-a", value)]) + b"ok"
    for reads in splits(data):
        conn, _ = connect(pool(max_header_bytes=LIMIT))
        if size + CL <= LIMIT:
            resp = await exchange(conn, reads)
            assert (resp.status, resp.body, resp.headers["x-a"]) == (200, b"ok", value.decode())
        else:
            with pytest.raises(UpstreamProtocolError, match="response headers too large"):
                await exchange(conn, reads)
            assert conn._closed


@pytest.mark.parametrize("extra", [0, 1])
async def test_interim_response_then_final_head_over_several_reads(extra: int) -> None:
    # the 100's headers do not count against the final head; the final head's do, wherever
    # the reads cut them
    fields = [(b"x-%d" % i, b"v" * 10) for i in range(3)]
    size = sum(len(n) + len(v) for n, v in fields) + CL
    interim = b"HTTP/1.1 100 Continue\r\nx-interim: " + b"i" * 40 + b"\r\n\r\n"
    data = interim + head(fields + [(b"x-e", b"e" * extra)] if extra else fields) + b"ok"
    limit = size + (len(b"x-e") if extra else 0)
    for reads in splits(data):
        conn, _ = connect(pool(max_header_bytes=limit))
        if not extra:
            resp = await exchange(conn, reads)
            assert (resp.status, resp.body) == (200, b"ok")
            assert "x-interim" not in resp.headers
        else:
            with pytest.raises(UpstreamProtocolError, match="response headers too large"):
                await exchange(conn, reads)


async def test_interim_then_final_head_cut_before_a_crlf() -> None:
    # the final head began in the read of the 1xx: a read starting with CR/LF is inside it
    conn, _ = connect(pool())
    reads = [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK", b"\r\ncontent-length: 2\r\n\r\nok"]
    assert (await exchange(conn, reads)).status == 200


async def test_header_count_limit() -> None:
    ok = head([(b"x-%d" % i, b"v") for i in range(2)])       # + content-length = 3 lines
    over = head([(b"x-%d" % i, b"v") for i in range(3)])
    conn, _ = connect(pool(max_headers_count=3))
    assert (await exchange(conn, [ok + b"ok"])).status == 200
    conn, _ = connect(pool(max_headers_count=3))
    with pytest.raises(UpstreamProtocolError, match="too many response headers"):
        await exchange(conn, [over + b"ok"])


async def test_connection_reused_with_its_parser_and_trailers_dropped() -> None:
    p = pool()
    conn, t = connect(p)
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
               b"2\r\nok\r\n0\r\nx-trailer: t\r\n\r\n")
    for reads in splits(chunked)[::7]:
        assert p.take_idle() in (None, conn)
        resp = await exchange(conn, reads)
        assert (resp.status, resp.body, "x-trailer" in resp.headers) == (200, b"ok", False)
        assert list(p.idle) == [conn] and not conn._closed
    assert t.out.count(b"GET /p HTTP/1.1\r\n") == len(splits(chunked)[::7])


async def test_head_response_then_next_request_on_the_same_connection() -> None:
    p = pool()
    conn, _ = connect(p)
    resp = await exchange(conn, [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"], "HEAD")
    assert (resp.status, resp.body, resp.headers["content-length"]) == (200, b"", "5")
    assert p.take_idle() is conn
    resp = await exchange(conn, [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"])
    assert (resp.status, resp.body) == (200, b"ok")


@pytest.mark.parametrize("method,response", [
    ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),         # a second response
    ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\nx-a: b\r\ncontent-length: 0\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),      # a body after HEAD
    ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTT"),   # a partial one
    ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokGARBAGE\r\n\r\n"),  # not HTTP
    ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"),
])
async def test_bytes_after_the_response_close_the_connection(method: str, response: bytes) -> None:
    p = pool()
    conn, t = connect(p)
    resp = await exchange(conn, [response], method)
    assert (resp.status, resp.body) == (200, b"ok" if method == "GET" else b"")
    assert conn._closed and t.closed and not p.idle


async def test_bytes_with_no_request_outstanding_close_the_connection() -> None:
    p = pool()
    conn, t = connect(p)
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\n")
    assert conn._closed and t.closed


def test_encode_request_forwards_headers_in_order_without_hop_by_hop_ones() -> None:
    plain = request("GET", [("host", "a"), ("x-b", "1"), ("x-a", "2"), ("x-b", "3")])
    assert encode_request(plain) == (
        b"GET /p HTTP/1.1\r\nhost: a\r\nx-b: 1\r\nx-a: 2\r\nx-b: 3\r\n\r\n", False)
    hop = request("POST", [("host", "a"), ("connection", "x-hop, keep-alive"), ("x-hop", "1"),
                           ("te", "trailers"), ("content-length", "9"), ("x-a", "2")], b"body",
                  query="q=1")
    head_, chunked = encode_request(hop, "b.example")
    assert head_ == (b"POST /p?q=1 HTTP/1.1\r\nhost: b.example\r\nte: trailers\r\nx-a: 2\r\n"
                     b"content-length: 4\r\n\r\n") and not chunked
    empty = Request("GET", "/", "", MultiDict(), b"", RequestContext("t", None, 0.0))
    assert encode_request(empty)[0] == b"GET / HTTP/1.1\r\n\r\n"


async def test_response_timeout_per_request_with_the_timer_kept_across_requests() -> None:
    # the timer armed for one request serves the next ones: each request still times out at
    # its own deadline, later or earlier than the last one's, and one without a deadline never
    loop = asyncio.get_running_loop()
    p = pool()
    conn, _ = connect(p)
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def send(deadline: float | None) -> asyncio.Task[Response]:
        task = asyncio.ensure_future(conn.send(request(), None, deadline))
        await asyncio.sleep(0)
        return task

    first = await send(loop.time() + 0.05)
    conn.data_received(ok)
    assert (await first).status == 200
    later = await send(loop.time() + 30)            # its deadline is after the timer's
    await asyncio.sleep(0.2)                         # the first request's deadline has passed
    assert not later.done()
    conn.data_received(ok)
    assert (await later).status == 200
    no_deadline = await send(None)
    await asyncio.sleep(0.1)
    assert not no_deadline.done()
    conn.data_received(ok)
    assert (await no_deadline).status == 200
    assert p.take_idle() is conn
    earlier = await send(loop.time() + 0.05)         # before the timer's time (30 s)
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(earlier, 10)
    assert conn._closed
