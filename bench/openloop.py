"""Open-loop, fixed-rate HTTP/1.1 load generator with coordinated-omission correction.

wrk2 is not packaged in Debian and h2load's `--rate` paces connections, not requests, so this
is a small asyncio client: a scheduler releases request slots at fixed intended times
(start + i / rate) whatever the target does; a pool of keep-alive connections takes the slots
in turn. The latency of a request is measured from the slot's release, not from when a
connection became free to send it, so when the target stalls, the requests that queue up
behind the stall are charged for it (what wrk2 calls coordinated-omission correction). The
scheduler's timer has ~1 ms resolution; its slack (release - intended) belongs to the
generator, so the headline figures leave it out and `strict_*` keep it.

Run as a subprocess (pinned by the harness):
    python -m bench.openloop --host 127.0.0.1 --port 8080 --rate 2000 --duration 10
prints one JSON object on stdout.

Only loopback targets are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time

import httptools


class _Conn(asyncio.Protocol):
    __slots__ = ("transport", "parser", "waiter", "status", "closed", "keep")

    def __init__(self) -> None:
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.status = 0
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(e)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed"))

    # httptools callbacks
    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(self.status)

    def _fail(self, exc: BaseException) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc)


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return math.nan
    k = min(len(sorted_vals) - 1, max(0, math.ceil(q / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


async def run(host: str, port: int, path: str, headers: list[tuple[str, str]], rate: float,
              duration: float, warmup: float, connections: int, timeout: float) -> dict:
    loop = asyncio.get_running_loop()
    head = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    head += [f"{k}: {v}" for k, v in headers]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

    # Slots are (intended, released): `intended` is start + i / rate; `released` is when the
    # scheduler woke up and queued it (its timer ticks in ~1 ms steps, so released - intended
    # is the generator's own slack, not the target's). Two latencies are recorded:
    #   from_release = done - released  (the table's figure: includes every wait for a free
    #                  connection, i.e. coordinated-omission corrected, minus timer slack)
    #   from_intended = done - intended (strict: also charges the generator's timer slack)
    queue: asyncio.Queue[tuple[float, float]] = asyncio.Queue()
    from_release: list[float] = []
    from_intended: list[float] = []
    counts = {"ok": 0, "non2xx": 0, "errors": 0, "timeouts": 0, "reconnects": 0}
    busy = [0]
    # uvloop's loop.time() ticks in milliseconds: time with perf_counter instead.
    clock = time.perf_counter
    t0 = clock() + 0.05
    measure_from = t0 + warmup
    end = measure_from + duration

    async def connect() -> _Conn:
        _, proto = await loop.create_connection(_Conn, host, port)
        return proto

    async def worker(conn: _Conn | None) -> None:
        while True:
            slot = await queue.get()
            busy[0] += 1
            try:
                conn = await one(conn, *slot)
            finally:
                busy[0] -= 1

    async def one(conn: _Conn | None, intended: float, released: float) -> _Conn | None:
        """Send one request on conn (reconnecting if needed); return the usable conn or None."""
        measured = intended >= measure_from
        if conn is None or conn.closed:
            try:
                conn = await connect()
                counts["reconnects"] += 1
            except OSError:
                if measured:
                    counts["errors"] += 1
                return None
        conn.waiter = loop.create_future()
        conn.transport.write(request)
        try:
            status = await asyncio.wait_for(conn.waiter, timeout)
        except TimeoutError:
            if measured:
                counts["timeouts"] += 1
            conn.transport.abort()
            return None
        except Exception:
            if measured:
                counts["errors"] += 1
            return None
        finally:
            conn.waiter = None
        if measured:
            done = clock()
            from_release.append(done - released)
            from_intended.append(done - intended)
            counts["ok" if 200 <= status < 300 else "non2xx"] += 1
        return conn

    try:
        conns = await asyncio.gather(*(connect() for _ in range(connections)))
    except OSError as e:
        return {"error": f"cannot connect to {host}:{port}: {e}"}
    workers = [asyncio.create_task(worker(c)) for c in conns]

    # Scheduler: queue every slot whose intended time has come; sleep until the next one.
    interval = 1.0 / rate
    i = 0
    scheduled = 0
    max_backlog = 0
    while True:
        now = clock()
        if now >= end:
            break
        while True:
            intended = t0 + i * interval
            if intended > now or intended >= end:
                break
            queue.put_nowait((intended, now))
            if intended >= measure_from:
                scheduled += 1
            i += 1
        max_backlog = max(max_backlog, queue.qsize())
        await asyncio.sleep(max(0.0, t0 + i * interval - clock()))

    # Let the queued and in-flight requests finish (bounded), then stop.
    drain_deadline = clock() + timeout
    while (not queue.empty() or busy[0]) and clock() < drain_deadline:
        await asyncio.sleep(0.01)
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    for c in conns:
        if c.transport is not None:
            c.transport.close()

    rel = sorted(v * 1000.0 for v in from_release)
    strict = sorted(v * 1000.0 for v in from_intended)
    completed = counts["ok"] + counts["non2xx"]
    return {
        "rate": rate,
        "duration": duration,
        "connections": connections,
        "scheduled": scheduled,
        "completed": completed,
        "unfinished": max(0, scheduled - completed - counts["errors"] - counts["timeouts"]),
        **counts,
        "achieved_rate": completed / duration if duration else 0.0,
        "p50_ms": _percentile(rel, 50),
        "p90_ms": _percentile(rel, 90),
        "p99_ms": _percentile(rel, 99),
        "p999_ms": _percentile(rel, 99.9),
        "max_ms": rel[-1] if rel else math.nan,
        "strict_p50_ms": _percentile(strict, 50),
        "strict_p99_ms": _percentile(strict, 99),
        "max_backlog": max_backlog,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("-H", "--header", action="append", default=[],
                   help="extra request header 'Name: value' (repeatable)")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        p.error("only loopback targets are allowed")
    if args.rate <= 0 or args.duration <= 0 or args.duration > 3600:
        p.error("rate must be > 0 and duration in (0, 3600]")
    headers = []
    for h in args.header:
        k, _, v = h.partition(":")
        headers.append((k.strip(), v.strip()))
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass
    result = asyncio.run(run(args.host, args.port, args.path, headers, args.rate,
                             args.duration, args.warmup, args.connections, args.timeout))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
