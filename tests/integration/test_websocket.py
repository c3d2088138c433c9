"""WebSocket (and other Upgrade types) through the sidecar with a real ``websockets`` client and
server, native config: ``upgrades: [websocket]`` on the listener, a route that turns it off, a
route idle timeout, the answer without the config, and the tunnel carrying data both ways
until either side closes."""

from __future__ import annotations

import asyncio
import socket

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sidecar.testing import native_config, running_proxy


async def echo(ws) -> None:
    try:
        async for msg in ws:
            if msg == "close-please":
                await ws.close(4000, "as asked")
                return
            await ws.send(msg)
    except ConnectionClosed:
        pass


@pytest.fixture
async def ws_server():
    async with websockets.serve(echo, "127.0.0.1", 0, compression=None, max_size=8 << 20) as srv:
        yield srv.sockets[0].getsockname()[1]


def cfg(ws_port: int, upgrades=("websocket",)) -> dict:
    return native_config(
        clusters={"ws": [f"127.0.0.1:{ws_port}"]},
        routes=[{"match": {"prefix": "/off"}, "cluster": "ws", "upgrades": [{"type": "websocket",
                                                                           "enabled": False}]},
                {"match": {"prefix": "/idle"}, "cluster": "ws", "idle_timeout": "300ms"},
                {"match": {"prefix": "/"}, "cluster": "ws"}],
        listener={"upgrades": list(upgrades)} if upgrades else None)


def connect(port: int, path: str):
    sock = socket.create_connection(("127.0.0.1", port))
    return websockets.connect(f"ws://example.test{path}", sock=sock, compression=None,
                              max_size=8 << 20, open_timeout=5, close_timeout=2)


async def test_websocket_tunnel_both_ways(ws_server):
    async with running_proxy(cfg(ws_server), admin=False) as p:
        async with connect(p.port(), "/chat") as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            blob = bytes(range(256)) * 8192          # 2 MiB through the tunnel and back
            await ws.send(blob)
            assert await ws.recv() == blob
            for i in range(100):
                await ws.send(f"m{i}")
            assert [await ws.recv() for _ in range(100)] == [f"m{i}" for i in range(100)]
            await ws.send("close-please")
            with pytest.raises(ConnectionClosed) as e:
                await ws.recv()
            assert (e.value.rcvd.code, e.value.rcvd.reason) == (4000, "as asked")


async def test_websocket_disabled_route_and_unconfigured_listener(ws_server):
    async with running_proxy(cfg(ws_server), admin=False) as p:
        with pytest.raises(InvalidStatus) as e:
            async with connect(p.port(), "/off"):
                pass
        assert e.value.response.status_code == 403
    async with running_proxy(cfg(ws_server, upgrades=()), admin=False) as p:
        with pytest.raises(InvalidStatus) as e:
            async with connect(p.port(), "/chat"):
                pass
        assert e.value.response.status_code == 403


async def test_websocket_route_idle_timeout(ws_server):
    async with running_proxy(cfg(ws_server), admin=False) as p:
        async with connect(p.port(), "/idle") as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
            with pytest.raises(ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), 10)
            assert e.value.rcvd is None          # closed by the proxy, no close frame


async def test_unconfigured_upgrade_type_is_refused(ws_server):
    async with running_proxy(cfg(ws_server), admin=False) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port())
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: my-proto\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 403 ") and b"connection: close" in data.lower()
