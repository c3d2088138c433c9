"""The downstream half of an upgraded HTTP/1.1 connection (WebSocket and other ``Upgrade``
types the listener's ``upgrade_configs`` allow).

The HTTP/1.1 codec hands over at two points: after the upgrade request's head (the bytes the
client sends from then on feed ``TunnelInput``, which the upstream half copies upstream), and
when the route's answer is a 101 (``serve_tunnel`` writes the 101 and copies the upstream's
bytes to the client until either side closes or the tunnel is idle for the stream idle timeout:
the route's ``idle_timeout``, else the listener's ``stream_idle_timeout``). Then the connection
closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from sidecar.codec.headers import DATE
from sidecar.core.body import BodyStream
from sidecar.core.message import Request, Response

_DROP = frozenset({"server", "content-length", "transfer-encoding", "keep-alive",
                   "proxy-connection"})


class TunnelInput(BodyStream):
    """The client's bytes after an upgrade request (flow-controlled: past the high-water mark
    the client's socket is not read)."""

    __slots__ = ("touched",)

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        super().__init__(pause, resume)
        self.touched = time.monotonic()

    def feed(self, data: bytes) -> None:
        self.touched = time.monotonic()
        super().feed(data)


def tunnel_input(req: Request, transport: asyncio.Transport, first: bytes) -> TunnelInput:
    """Install the tunnel's input as the upgrade request's body; ``first``: bytes the client
    sent right after the request head."""
    s = TunnelInput(transport.pause_reading, transport.resume_reading)
    if first:
        s.feed(first)
    req.body = s
    return s


def _head(resp: Response, server_header: str) -> bytes:
    parts = ["HTTP/1.1 101 Switching Protocols\r\n"]
    for k, v in resp.headers.items():
        if k not in _DROP:
            parts.append(f"{k}: {v}\r\n")
    parts.append(server_header)
    if "date" not in resp.headers:
        parts.append(f"date: {DATE.get()}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


async def serve_tunnel(t: asyncio.Transport, wait_writable: Callable[[], Awaitable[None]],
                       server_header: str, req: Request, resp: Response, idle: float) -> int:
    """Write the 101 and copy the upstream's bytes to the client until the tunnel ends
    (``wait_writable``: the connection's write backpressure; ``idle``: the stream idle
    timeout, 0 = none); returns the bytes sent to the client. The caller closes the
    connection after."""
    t.write(_head(resp, server_header))
    body = resp.body
    if isinstance(body, bytes):
        if body:
            t.write(body)
        resp.discard()
        return len(body)
    inp = req.body if isinstance(req.body, TunnelInput) else None
    loop = asyncio.get_running_loop()
    last = time.monotonic()
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal timer
        seen = max(last, inp.touched if inp is not None else 0.0)
        left = seen + idle - time.monotonic()
        if left <= 0:
            timer = None
            resp.discard()          # closes the upstream: the copy below ends, then the client
        else:
            timer = loop.call_later(left, check)

    timer = loop.call_later(idle, check) if idle > 0 else None
    sent = 0
    try:
        async for chunk in body:
            last = time.monotonic()
            t.write(chunk)
            sent += len(chunk)
            await wait_writable()
            if t.is_closing():
                break
    except Exception:       # the upstream went away mid-tunnel: the client is closed below
        pass
    finally:
        if timer is not None:
            timer.cancel()
        resp.discard()
    return sent
