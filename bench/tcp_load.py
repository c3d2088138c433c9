"""The TCP benchmark's peers (run as separate processes by bench/tcp.py, on uvloop):

    python -m bench.tcp_load server PORT             # sink, echo and source in one server
    python -m bench.tcp_load bulk PORT BYTES         # send BYTES, print seconds
    python -m bench.tcp_load pingpong PORT CONNS SECONDS SIZE   # print exchanges
    python -m bench.tcp_load slow PORT BYTES RATE    # read BYTES at RATE bytes/s, print seconds

The server reads the first byte of a connection to know what is wanted: ``S`` sink (read
everything, answer one byte at the end), ``E`` echo, ``G`` source (send the 8-byte big-endian
count that follows, as fast as the connection takes it).
"""

from __future__ import annotations

import asyncio
import struct
import sys
import time

import uvloop

CHUNK = 1 << 20


class Server(asyncio.Protocol):
    def __init__(self) -> None:
        self.mode = b""
        self.t: asyncio.Transport | None = None
        self.left = 0
        self.buf = b""

    def connection_made(self, t: asyncio.BaseTransport) -> None:
        self.t = t  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        t = self.t
        assert t is not None
        if not self.mode:
            self.mode, data = data[:1], data[1:]
        if self.mode == b"E":
            t.write(data)
        elif self.mode == b"G":
            self.buf += data
            if len(self.buf) >= 8 and not self.left:
                self.left = struct.unpack("!Q", self.buf[:8])[0]
                self.pump()

    def pump(self) -> None:
        t = self.t
        assert t is not None
        chunk = b"x" * CHUNK
        while self.left > 0 and t.get_write_buffer_size() < 4 * CHUNK:
            n = min(self.left, CHUNK)
            t.write(chunk[:n])
            self.left -= n
        if self.left <= 0:
            t.write_eof()

    def resume_writing(self) -> None:
        if self.mode == b"G":
            self.pump()

    def eof_received(self) -> bool:
        if self.mode == b"S" and self.t is not None:
            self.t.write(b"!")
            self.t.close()
        return True


async def bulk(port: int, total: int) -> float:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"b" * CHUNK
    t0 = time.perf_counter()
    w.write(b"S")
    left = total
    while left > 0:
        w.write(chunk[:min(left, CHUNK)])
        left -= CHUNK
        await w.drain()
    w.write_eof()
    assert await r.read() == b"!"
    w.close()
    return time.perf_counter() - t0


class PingPong(asyncio.Protocol):
    def __init__(self, size: int, until: float, counts: list[int]):
        self.msg = b"p" * size
        self.until = until
        self.counts = counts
        self.got = 0
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, t: asyncio.BaseTransport) -> None:
        self.t = t
        t.write(b"E" + self.msg)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(self.msg):
            self.got -= len(self.msg)
            self.counts[0] += 1
            if time.perf_counter() < self.until:
                self.t.write(self.msg)  # type: ignore[attr-defined]
            else:
                self.t.close()
                if not self.done.done():
                    self.done.set_result(None)

    def connection_lost(self, exc: object) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def pingpong(port: int, conns: int, seconds: float, size: int) -> int:
    loop = asyncio.get_running_loop()
    counts = [0]
    until = time.perf_counter() + seconds
    protos = []
    for _ in range(conns):
        _, p = await loop.create_connection(lambda: PingPong(size, until, counts), "127.0.0.1",
                                            port)
        protos.append(p)
    await asyncio.gather(*(p.done for p in protos))
    return counts[0]


async def slow(port: int, total: int, rate: float) -> float:
    r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
    w.write(b"G" + struct.pack("!Q", total))
    t0 = time.perf_counter()
    got = 0
    while got < total:
        data = await r.read(1 << 16)
        if not data:
            break
        got += len(data)
        ahead = got / rate - (time.perf_counter() - t0)
        if ahead > 0:
            await asyncio.sleep(ahead)
    w.close()
    return time.perf_counter() - t0


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", port,
                                                            backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    cmd, port = sys.argv[1], int(sys.argv[2])
    rest = sys.argv[3:]
    if cmd == "server":
        uvloop.run(serve(port))
    elif cmd == "bulk":
        print(uvloop.run(bulk(port, int(rest[0]))))
    elif cmd == "pingpong":
        print(uvloop.run(pingpong(port, int(rest[0]), float(rest[1]), int(rest[2]))))
    elif cmd == "slow":
        print(uvloop.run(slow(port, int(rest[0]), float(rest[1]))))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
