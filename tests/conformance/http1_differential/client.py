"""The raw-socket client: plays a case's steps on one connection and records what came back.

Reading runs in the background for the whole exchange, so bytes and the close are seen
whenever they arrive. The exchange ends when the proxy closes the connection, or when nothing
has arrived for ``QUIET`` seconds (``CLOSE_WAIT`` after a response that announced
``connection: close``, or after a response that started and did not finish: Envoy delays
such a close by up to ``delayed_close_timeout``, 1 s).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass

from .cases import Abort, AwaitResponse, Case, Pause
from .wire import parse_responses, request_methods

QUIET = 0.6
CLOSE_WAIT = 1.6
AWAIT_LIMIT = 3.0


@dataclass
class ClientResult:
    received: bytes = b""
    closed: str = ""             # "", "eof" or "reset": how the proxy closed the connection
    closed_after: int = -1       # complete final responses received before the close
    aborted: bool = False        # the client closed first (Abort step)
    write_error: str = ""        # a send failed (the proxy had closed already)


class _Reader:
    def __init__(self, sock: socket.socket, methods: list[str]):
        self.sock = sock
        self.methods = methods
        self.buf = b""
        self.closed = ""
        self.closed_after = -1
        self.last_rx = time.monotonic()
        self.changed = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self.sock, 65536)
            except (ConnectionResetError, BrokenPipeError):
                self._closed("reset")
                return
            except OSError:
                self._closed("reset")
                return
            if not data:
                self._closed("eof")
                return
            self.buf += data
            self.last_rx = time.monotonic()
            self.changed.set()

    def _closed(self, kind: str) -> None:
        self.closed = kind
        self.closed_after = self.responses(eof=True)
        self.changed.set()

    def responses(self, eof: bool = False) -> int:
        msgs, _, _ = parse_responses(self.buf, self.methods, eof)
        return sum(1 for m in msgs if m.complete)

    def expects_close(self) -> bool:
        """The last response announced ``connection: close``, or a response has started and
        not finished (a proxy ends a broken response by closing, after its delayed close)."""
        msgs, _, rest = parse_responses(self.buf, self.methods, False)
        if rest:
            return True
        return bool(msgs) and "close" in (msgs[-1].get("connection") or "").lower()

    async def wait(self, until_count: int = 0) -> None:
        """Until ``until_count`` responses (0: until the close or quiet)."""
        start = time.monotonic()
        while not self.closed:
            if until_count and self.responses() >= until_count:
                return
            quiet = CLOSE_WAIT if self.expects_close() else QUIET
            now = time.monotonic()
            left = max(self.last_rx, start) + quiet - now
            if until_count:
                left = min(left, start + AWAIT_LIMIT - now)
            if left <= 0:
                return
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


async def play(port: int, case: Case) -> ClientResult:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    methods = list(case.methods) or [m for m in request_methods(case.sent)] or ["GET"]
    reader = _Reader(sock, methods)
    task = loop.create_task(reader.run())
    result = ClientResult()
    try:
        for step in case.steps:
            if isinstance(step, bytes):
                if reader.closed:
                    result.write_error = result.write_error or "closed by the proxy before this write"
                    continue
                try:
                    await loop.sock_sendall(sock, step)
                except OSError as e:
                    result.write_error = result.write_error or f"{type(e).__name__}"
            elif isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, AwaitResponse):
                await reader.wait(step.count)
            elif isinstance(step, Abort):
                result.aborted = True
                if step.reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                break
        if not result.aborted:
            await reader.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sock.close()
    result.received = reader.buf
    result.closed = reader.closed
    result.closed_after = reader.closed_after
    return result
