"""The proxy's own endpoints' server (runtime.local_http: admin, metrics port, worker sockets)
on the proxy's HTTP/1.1 codec, through real sockets."""

from __future__ import annotations

import asyncio
import os
import tempfile

from sidecar.runtime.local_http import (
    LocalRequest,
    LocalServer,
    Router,
    fetch_unix,
    json_response,
    respond,
    text,
)


def _router() -> Router:
    r = Router()

    async def hello(req: LocalRequest):
        return text(f"hello {req.query.get('who', 'world')} {req.headers.get('X-Test', '')}\n")

    async def echo(req: LocalRequest):
        return json_response({"len": len(req.body), "method": req.method})

    async def static(req: LocalRequest):
        return respond(b"file " + req.tail.encode(), "text/css")

    r.get("/hello", hello)
    r.post("/echo", echo)
    r.prefix("GET", "/static/", static)
    return r


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_routes_methods_and_errors():
    server = LocalServer(_router())
    port = await server.start_tcp("127.0.0.1", 0)
    try:
        got = await _exchange(port, b"GET /hello?who=you HTTP/1.1\r\nhost: a\r\nx-test: 1\r\n"
                                    b"connection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"content-type: text/plain; charset=utf-8\r\n" in got
        assert got.endswith(b"\r\n\r\nhello you 1\n")

        got = await _exchange(port, b"HEAD /hello HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\n")

        got = await _exchange(port, b"POST /hello HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n"
                                    b"connection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 405 ") and b"allow: GET, HEAD\r\n" in got

        got = await _exchange(port, b"GET /nope HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 404 ")

        got = await _exchange(port, b"GET /static/app.css HTTP/1.1\r\nhost: a\r\n"
                                    b"connection: close\r\n\r\n")
        assert b"content-type: text/css\r\n" in got and got.endswith(b"file app.css")

        got = await _exchange(port, b"POST /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked"
                                    b"\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert got.endswith(b'{"len": 5, "method": "POST"}')

        # the proxy codec's strictness applies: a bad request line is a 400, not a handler call
        got = await _exchange(port, b"GET /hello HTTP/1.1\r\nhost: a\r\nbad header\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 400 ")
    finally:
        await server.cleanup()


async def test_keep_alive_serves_requests_in_order():
    server = LocalServer(_router())
    port = await server.start_tcp("127.0.0.1", 0)
    try:
        got = await _exchange(port, b"GET /hello?who=1 HTTP/1.1\r\nhost: a\r\n\r\n"
                                    b"GET /hello?who=2 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        assert got.count(b"HTTP/1.1 200 OK") == 2
        assert got.index(b"hello 1") < got.index(b"hello 2")
    finally:
        await server.cleanup()


async def test_unix_socket_and_fetch_unix():
    path = os.path.join(tempfile.mkdtemp(), "w.sock")
    server = LocalServer(_router(), "worker0")
    await server.start_unix(path)
    try:
        assert await fetch_unix(path, "GET", "/hello?who=unix", 5) == (200, "hello unix \n")
        status, body = await fetch_unix(path, "POST", "/echo", 5)
        assert status == 200 and '"len": 0' in body
        assert (await fetch_unix(path, "GET", "/missing", 5))[0] == 404
    finally:
        await server.cleanup()
    try:
        await fetch_unix(path, "GET", "/hello", 2)
        raise AssertionError("a closed server answered")
    except OSError:
        pass
