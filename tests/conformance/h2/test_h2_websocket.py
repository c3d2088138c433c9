"""WebSocket and Upgrade through the proxy under test, compared with Envoy 1.40
(configs/websocket.yaml): a real ``websockets`` client and server, the tunnel both ways until
either side closes, a route that disables the upgrade, a route idle timeout, and what a
listener without upgrade_configs answers.
"""

from __future__ import annotations

import base64
import os
import socket

import pytest
from h2conf_grpc import clean_headers, wait_until
from h2conf_peers import http1_exchange
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

MASKED = {"sec-websocket-key", "sec-websocket-accept"}   # random per handshake


def _ws(port: int, path: str = "/chat"):
    """A websockets client on a socket to the proxy; the Host header is example.test (the
    same for every proxy, whatever its port)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return connect(f"ws://example.test{path}", sock=sock, compression=None,
                   open_timeout=5, close_timeout=2, max_size=16 << 20, ping_interval=None)


def _handshake_view(headers) -> list:
    return clean_headers([(k.lower(), "<random>" if k.lower() in MASKED else v)
                          for k, v in headers])


def test_echo_both_ways_then_client_closes(ws_pair):
    """Text, binary and a 4 MiB message echoed; the client's close (code and reason)
    reaches the server; the handshake as both ends saw it."""
    blob = os.urandom(4 << 20)
    ws_server = ws_pair.peers.ws

    def run(p):
        before = len(ws_server.closed_by_client)
        with _ws(p.port()) as ws:
            handshake = _handshake_view(ws.response.headers.raw_items())
            status = ws.response.status_code
            ws.send("hello")
            text = ws.recv(timeout=5)
            ws.send(blob)
            big = ws.recv(timeout=10)
            ws.send("big:100000")
            down = ws.recv(timeout=10)
            ws.close(4001, "client done")
        wait_until(lambda: len(ws_server.closed_by_client) > before, timeout=5)
        upstream = _handshake_view(ws_server.handshakes[-1])
        return {"status": status, "response": handshake, "upstream_request": upstream,
                "text": text, "binary_ok": big == blob, "download": len(down),
                "server_saw_close": ws_server.closed_by_client[before:]}
    out = ws_pair.same("echo", run)
    assert out["status"] == 101 and out["text"] == "hello" and out["binary_ok"]
    assert out["server_saw_close"] == [4001]


def test_server_closes(ws_pair):
    """The server's close frame (code, reason) reaches the client through the tunnel."""
    def run(p):
        with _ws(p.port()) as ws:
            ws.send("close:4002:server done")
            try:
                ws.recv(timeout=5)
                return {"closed": False}
            except ConnectionClosed as e:
                rcvd = e.rcvd
                return {"closed": True, "code": rcvd.code if rcvd else None,
                        "reason": rcvd.reason if rcvd else None}
    assert ws_pair.same("server-close", run) == {"closed": True, "code": 4002,
                                                 "reason": "server done"}


def test_many_messages_interleaved(ws_pair):
    def run(p):
        with _ws(p.port()) as ws:
            for i in range(200):
                ws.send(f"m{i}")
            got = [ws.recv(timeout=5) for _ in range(200)]
        return got == [f"m{i}" for i in range(200)]
    assert ws_pair.same("interleaved", run) is True


def _upgrade_request(path: str, upgrade: str = "websocket") -> bytes:
    key = base64.b64encode(b"0123456789abcdef").decode()
    return (f"GET {path} HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade\r\n"
            f"Upgrade: {upgrade}\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "\r\n").encode()


def _exchange_view(port: int, data: bytes) -> dict:
    r = http1_exchange(port, data)
    return {"status": r.status, "headers": clean_headers(r.headers), "body": r.body}


UPGRADE_CASES = [
    ("route-disables-websocket", "main", "/off", "websocket"),
    ("no-upgrade-configs", "plain", "/chat", "websocket"),
    ("upgrade-type-not-configured", "main", "/chat", "h2c"),
    ("upgrade-type-not-configured-custom", "main", "/chat", "my-protocol"),
    ("websocket-upgrade-raw", "main", "/chat", "websocket"),
]


@pytest.mark.parametrize("name,listener,path,upgrade", UPGRADE_CASES,
                         ids=[c[0] for c in UPGRADE_CASES])
def test_upgrade_answers(ws_pair, name, listener, path, upgrade):
    """The exact answer to an Upgrade request (101 from the upstream, or the proxy's own
    refusal)."""
    ws_pair.same(f"upgrade/{name}", lambda p: _exchange_view(p.port(listener),
                                                           _upgrade_request(path, upgrade)))


def test_websocket_client_refused_where_disabled(ws_pair):
    def run(p):
        try:
            with _ws(p.port(), "/off"):
                return {"connected": True}
        except InvalidStatus as e:
            return {"connected": False, "status": e.response.status_code}
    out = ws_pair.same("client-refused", run)
    assert out["connected"] is False


def test_idle_timeout_closes_tunnel(ws_pair):
    """A route idle_timeout of 1 s: an idle tunnel is closed by the proxy (bounded wait)."""
    def run(p):
        with _ws(p.port(), "/idle") as ws:
            ws.send("still here")
            first = ws.recv(timeout=5)
            try:
                ws.recv(timeout=10)
                return {"first": first, "closed": False}
            except ConnectionClosed as e:
                return {"first": first, "closed": True,
                        "close_frame_from_peer": e.rcvd is not None}
            except TimeoutError:
                return {"first": first, "closed": False}
    out = ws_pair.same("idle-timeout", run)
    assert out["closed"] is True


def test_plain_http_next_to_websocket(ws_pair):
    ws_pair.same("plain-http", lambda p: sorted(
        (k, v) for k, v in http1_exchange(
            p.port(), b"GET /http/a?body=plain HTTP/1.1\r\nHost: example.test\r\n\r\n").headers
        if k not in ("date", "x-envoy-upstream-service-time")))
