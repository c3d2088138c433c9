"""Load-balancing scenario: three endpoints, one of them 10x slower.

How much traffic does the slow endpoint get, and what does that do to the tail, under
round robin, least request (power of two choices on active requests) and peak EWMA?

    python -m bench.lb_scenario                       # 300 req/s for 15 s per policy
    python -m bench.lb_scenario --rate 200 --duration 8 --json out.json
    python -m bench.lb_scenario --repeat 3          # interleaved rounds, medians and ranges

Setup (all on 127.0.0.1, each in its own process):

* upstreams: three small asyncio HTTP/1.1 servers, each with ``--workers`` concurrent workers
  (requests beyond that queue, like a real worker pool); service time ``--fast-ms`` (5 ms) for
  two of them and ten times that for the third;
* the sidecar (``python -m sidecar run``), restarted for each policy, default LB settings
  (peak EWMA: decay 10 s, default RTT 30 ms, choices 2);
* an open-loop load generator (this process): requests are released at fixed intended times
  (``start + i / rate``) whatever the proxy does, and latency is measured from the intended
  time, so queueing behind a slow endpoint is charged to the requests that suffer it
  (coordinated-omission safe). The first ``--warmup`` seconds are not measured.

Prints a table (Markdown) and, with ``--json``, writes the raw figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile

from sidecar.testing import free_port, wait_for_port

POLICIES = ("round_robin", "least_request", "peak_ewma")


# ---- upstreams (child process) ----------------------------------------------------------------

async def serve_upstreams(specs: list[tuple[str, int, float]], workers: int) -> None:
    """``specs``: (name, port, service seconds). Answers ``<name>`` after the service time,
    at most ``workers`` requests at a time per endpoint (the rest wait their turn)."""

    def make_handler(name: str, service: float):
        sem = asyncio.Semaphore(workers)
        body = name.encode()
        resp = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body))

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line[:15].lower() == b"content-length:":
                            length = int(line[15:].strip())
                    if length:
                        await reader.readexactly(length)
                    async with sem:
                        await asyncio.sleep(service)
                    writer.write(resp)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()
        return handle

    servers = []
    for name, port, service in specs:
        servers.append(await asyncio.start_server(make_handler(name, service), "127.0.0.1", port,
                                                  reuse_address=True))
    print("ready", flush=True)
    await asyncio.Event().wait()


# ---- load generator ---------------------------------------------------------------------------

class _Client(asyncio.Protocol):
    """One keep-alive connection: send a GET, wait for one response (Content-Length bodies)."""

    def __init__(self) -> None:
        self.transport = None
        self.buf = b""
        self.waiter = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._check()

    def connection_lost(self, exc) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc or ConnectionResetError("closed"))

    def _check(self) -> None:
        w = self.waiter
        if w is None or w.done():
            return
        i = self.buf.find(b"\r\n\r\n")
        if i < 0:
            return
        head = self.buf[:i]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:].strip())
        if len(self.buf) < i + 4 + length:
            return
        status = int(head[9:12])
        body = self.buf[i + 4:i + 4 + length]
        self.buf = self.buf[i + 4 + length:]
        w.set_result((status, body))

    async def get(self, request: bytes):
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            self.waiter = None


async def run_load(port: int, rate: float, duration: float, warmup: float) -> dict:
    loop = asyncio.get_running_loop()
    request = b"GET /work HTTP/1.1\r\nhost: svc\r\n\r\n"
    idle: list[_Client] = []
    lat: list[float] = []
    names: dict[str, int] = {}
    errors = 0
    pending: set[asyncio.Task] = set()

    async def one(intended: float, measured: bool) -> None:
        nonlocal errors
        conn = idle.pop() if idle else None
        try:
            if conn is None or conn.closed:
                _, conn = await loop.create_connection(_Client, "127.0.0.1", port)
            status, body = await conn.get(request)
        except OSError:
            errors += measured
            return
        done = loop.time()
        idle.append(conn)
        if not measured:
            return
        if status != 200:
            errors += 1
            return
        lat.append(done - intended)
        n = body.decode()
        names[n] = names.get(n, 0) + 1

    total = int(rate * (duration + warmup))
    start = loop.time() + 0.05
    first_measured = int(rate * warmup)
    for i in range(total):
        intended = start + i / rate
        delay = intended - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t = loop.create_task(one(intended, i >= first_measured))
        pending.add(t)
        t.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    for c in idle:
        c.transport.close()
    lat.sort()

    def pct(q: float) -> float:
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

    n = len(lat)
    return {"requests": n, "errors": errors, "by_endpoint": names,
            "slow_share": names.get("slow", 0) / n if n else float("nan"),
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": lat[-1] * 1000 if lat else float("nan"),
            "mean_ms": sum(lat) / n * 1000 if n else float("nan")}


# ---- orchestration ----------------------------------------------------------------------------

def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sidecar_config(listen: int, admin: int, ports: list[int], policy: str,
                   ewma_decay: str = "") -> str:
    import yaml
    cfg = {
        "admin": {"address": "127.0.0.1", "port": admin},
        "listeners": [{"name": "bench", "address": "127.0.0.1", "port": listen,
                       "routes": [{"match": {"prefix": "/"}, "cluster": "svc", "timeout": "10s"}]}],
        "clusters": [{"name": "svc", "lb": policy, "connect_timeout": "1s",
                      "endpoints": [f"127.0.0.1:{p}" for p in ports]}],
    }
    if policy == "peak_ewma" and ewma_decay:
        cfg["clusters"][0]["ewma"] = {"decay": ewma_decay}
    return yaml.safe_dump(cfg)


def run(args) -> list[dict]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ports = [free_port() for _ in range(3)]
    specs = [("fast1", ports[0], args.fast_ms / 1000), ("fast2", ports[1], args.fast_ms / 1000),
             ("slow", ports[2], args.fast_ms * args.slow_factor / 1000)]
    up = subprocess.Popen([sys.executable, "-m", "bench.lb_scenario", "--serve-upstreams",
                           json.dumps(specs), "--workers", str(args.workers)],
                          cwd=root, stdout=subprocess.PIPE, text=True)
    results = []
    tmp = tempfile.mkdtemp(prefix="lb-scenario-")
    try:
        assert up.stdout is not None and up.stdout.readline().strip() == "ready"
        order = [p for _ in range(args.repeat) for p in args.policies]   # interleaved rounds
        for policy in order:
            listen, admin = free_port(), free_port()
            path = os.path.join(tmp, f"{policy}.yaml")
            with open(path, "w") as f:
                f.write(sidecar_config(listen, admin, ports, policy, args.ewma_decay))
            log = open(os.path.join(tmp, f"{policy}.log"), "w")
            proxy = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", path,
                                      "--log-level", "warning"], cwd=root, stdout=log,
                                     stderr=subprocess.STDOUT)
            try:
                wait_for_port(listen, 20.0, proxy)
                r = asyncio.run(run_load(listen, args.rate, args.duration, args.warmup))
            finally:
                stop(proxy)
                log.close()
            r["policy"] = policy + (f" (decay {args.ewma_decay})"
                                    if policy == "peak_ewma" and args.ewma_decay else "")
            results.append(r)
            print(f"  {policy:14} slow share {r['slow_share'] * 100:5.1f} %   "
                  f"p50 {r['p50_ms']:7.1f} ms   p99 {r['p99_ms']:7.1f} ms   "
                  f"({r['requests']} requests, {r['errors']} errors)", file=sys.stderr, flush=True)
    finally:
        stop(up)
    return results


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def markdown(results: list[dict], args) -> str:
    lines = [f"Three endpoints ({args.workers} workers each; service time {args.fast_ms:g} ms, "
             f"{args.fast_ms:g} ms and {args.fast_ms * args.slow_factor:g} ms), open loop at "
             f"{args.rate:g} req/s for {args.duration:g} s per policy (after {args.warmup:g} s "
             f"warm-up), latency from the intended send time.",
             ""]
    if args.repeat > 1:
        lines[0] += (f" {args.repeat} interleaved rounds: medians, with the range over the "
                     f"rounds in brackets.")
        lines += ["| policy | slow endpoint share | p50 | p90 | p99 |",
                  "|---|---:|---:|---:|---:|"]
        for policy in dict.fromkeys(r["policy"] for r in results):
            rs = [r for r in results if r["policy"] == policy]
            sh = [r["slow_share"] * 100 for r in rs]
            p99 = [r["p99_ms"] for r in rs]
            lines.append(f"| {policy} | {_median(sh):.1f} % ({min(sh):.1f}–{max(sh):.1f}) | "
                         f"{_median([r['p50_ms'] for r in rs]):.1f} ms | "
                         f"{_median([r['p90_ms'] for r in rs]):.1f} ms | "
                         f"{_median(p99):.1f} ms ({min(p99):.1f}–{max(p99):.1f}) |")
        return "\n".join(lines)
    lines += ["| policy | requests | slow endpoint share | p50 | p90 | p99 | max |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['policy']} | {r['requests']} | {r['slow_share'] * 100:.1f} % | "
                     f"{r['p50_ms']:.1f} ms | {r['p90_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
                     f"{r['max_ms']:.1f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=300.0, help="requests per second (open loop)")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per policy")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--fast-ms", type=float, default=5.0, help="service time of the fast endpoints")
    p.add_argument("--slow-factor", type=float, default=10.0, help="how much slower the slow one is")
    p.add_argument("--workers", type=int, default=8, help="concurrent requests per endpoint")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--ewma-decay", default="", help="peak EWMA decay (default: the sidecar's, 10s)")
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds (medians reported)")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--serve-upstreams", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_upstreams:
        specs = [tuple(x) for x in json.loads(args.serve_upstreams)]
        try:
            asyncio.run(serve_upstreams(specs, args.workers))
        except KeyboardInterrupt:
            pass
        return 0
    results = run(args)
    print(markdown(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
