"""A raw-socket recording upstream: one asyncio server per lane.

It records exactly the bytes each connection delivered, answers every complete request (as
framed by ``wire.parse_requests``) with the case's scripted raw reply, and notes whether the
proxy closed the connection (FIN or RST) before the case ended. Between cases the lane closes
every connection still open, so no pooled connection carries over into the next case.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

from .cases import Reply, ok_reply
from .wire import parse_requests


@dataclass
class UpstreamConn:
    """One connection the proxy opened to the upstream during a case."""
    data: bytes = b""
    closed_by_proxy: bool = False     # the proxy sent FIN or RST
    reset_by_proxy: bool = False
    closed_by_upstream: bool = False  # the script closed it


class _Conn(asyncio.Protocol):
    def __init__(self, lane: RecordingUpstream):
        self.lane = lane
        self.rec = UpstreamConn()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.answered = 0
        self.pending: asyncio.Task | None = None
        self.harness_closed = False       # closed by RecordingUpstream.end(), not the proxy

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.lane.conns.append(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.rec.data = bytes(self.buf)
        requests, _ = parse_requests(self.rec.data, eof=False)
        while self.answered < len(requests):
            method = requests[self.answered].start_line.split(" ", 1)[0]
            self.answered += 1
            reply = self.lane.next_reply(method)
            prev = self.pending
            self.pending = asyncio.get_running_loop().create_task(self._send(reply, prev))
            self.lane.tasks.add(self.pending)

    async def _send(self, reply: Reply, prev: asyncio.Task | None) -> None:
        if prev is not None:
            await prev
        t = self.transport
        for part in reply.parts:
            if isinstance(part, float):
                await asyncio.sleep(part)
            elif not t.is_closing():
                t.write(part)
        if t.is_closing():
            return
        if reply.then == "close":
            self.rec.closed_by_upstream = True
            t.close()
        elif reply.then == "reset":
            self.rec.closed_by_upstream = True
            reset(t)

    def eof_received(self) -> bool:
        if not self.rec.closed_by_upstream:
            self.rec.closed_by_proxy = True
        return False

    def connection_lost(self, exc) -> None:
        if not self.rec.closed_by_upstream and not self.harness_closed:
            self.rec.closed_by_proxy = True
            if exc is not None:
                self.rec.reset_by_proxy = True


def reset(transport: asyncio.Transport) -> None:
    """Close with an RST (SO_LINGER 0) rather than a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class RecordingUpstream:
    """One lane's upstream: ``begin(case)``, let the proxy talk to it, ``end()``."""

    def __init__(self) -> None:
        self.port = 0
        self.conns: list[_Conn] = []
        self.tasks: set[asyncio.Task] = set()
        self.replies: tuple[Reply, ...] = ()
        self.count = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> RecordingUpstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def begin(self, replies: tuple[Reply, ...]) -> None:
        self.replies = replies
        self.count = 0
        self.conns = []

    def next_reply(self, method: str) -> Reply:
        k = self.count
        self.count += 1
        return self.replies[k] if k < len(self.replies) else ok_reply(k, method)

    def holding(self, client_aborted: bool) -> bool:
        """A connection the proxy should close and has not closed yet: after the client
        aborted, any connection carrying its request; otherwise one holding bytes that frame no
        complete request (a request the client never finished)."""
        return any(c.rec.data and not c.rec.closed_by_proxy and not c.rec.closed_by_upstream
                   and (client_aborted or parse_requests(c.rec.data, eof=False)[1])
                   for c in self.conns)

    async def end(self) -> list[UpstreamConn]:
        """The connections of the case as they are now; then close them all."""
        out = [UpstreamConn(c.rec.data, c.rec.closed_by_proxy, c.rec.reset_by_proxy,
                            c.rec.closed_by_upstream) for c in self.conns]
        for t in self.tasks:
            t.cancel()
        self.tasks = set()
        for c in self.conns:
            if c.transport is not None and not c.transport.is_closing():
                c.harness_closed = True
                c.transport.close()
        self.conns = []
        await asyncio.sleep(0.05)       # let the proxy see the pooled connections go
        return out

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
