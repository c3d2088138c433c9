"""HTTP/2 and gRPC benchmark: Envoy 1.40 and the sidecar side by side, in one run, on loopback.

    python -m bench.http2                   # 10 s per measurement, about 3 minutes
    python -m bench.http2 --quick           # 3 s per measurement
    python -m bench.http2 --baseline-tree /work/main --http1   # + HTTP/1.1 against another checkout
    python -m bench.http2 --markdown --json results.json
    python -m bench.http2 --targets envoy,sidecar,sidecar-mypyc   # + the mypyc-compiled build

Scenarios (each proxy runs the same generated Envoy v3 bootstrap, one worker; ``sidecar-mypyc``
is this tree with the modules of scripts/compiled_modules compiled, scripts/build_compiled):

* ``h2->h1`` / ``h2->h2``: ``h2load -c 10 -m 10`` (100 concurrent streams over 10
  connections) with HTTP/2 prior knowledge to the proxy, whose upstream is nginx over
  HTTP/1.1 (keep-alive) or HTTP/2 (h2c).
* ``grpc``: unary calls (``/bench.Echo/Unary``, a 5-byte message in gRPC framing, sent by
  h2load) to a grpcio server, closed loop (``-c 10 -m 10``), also straight to the server
  (``direct``).
* ``grpc@R``: the same calls at a fixed rate R (h2load ``--rps``, open loop per connection);
  per-call latencies from h2load's log, p50/p99, and what the proxy adds over ``direct``.
* ``h1`` (``--http1``): HTTP/1.1 through the proxy with ``wrk -c 50`` (the bench.run base
  scenario), to check HTTP/1.1 did not regress against ``--baseline-tree``.

"req/s per core" is requests divided by the CPU seconds the proxy's process tree used during
the run (so it does not depend on how busy the load side was). The proxy runs on core 0, the
load generator and upstreams on core 1 (``--no-pin`` to turn off). On a shared machine the
figures are indicative: the ``bg CPU%`` column shows other work on the proxy's core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python bench/http2.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import configs  # noqa: E402
from bench.procs import (  # noqa: E402
    ProcessGroup,
    StartError,
    compiled_tree,
    cores_busy_seconds,
    free_port,
    tree_cpu_split,
    wait_http_ok,
)

REPO = Path(__file__).resolve().parents[1]
GRPC_MESSAGE = b"\x00\x00\x00\x00\x05hello"
T_OPTS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass
class Result:
    target: str
    scenario: str
    rps: float = math.nan
    per_core: float = math.nan        # requests per proxy CPU second
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    added_p50_ms: float = math.nan    # over direct, fixed-rate runs
    added_p99_ms: float = math.nan
    ok: int = 0
    failed: int = 0
    cpu_s: float = math.nan
    user_us: float = math.nan         # the proxy's user-space and kernel CPU per request
    kernel_us: float = math.nan
    bg_cpu_pct: float = math.nan
    note: str = ""


def nginx_conf(workdir: Path, h1_port: int, h2_port: int) -> str:
    body = configs.UPSTREAM_BODY.strip()
    return configs._nginx_common(workdir) + f"""http {{
{configs._nginx_http_common(workdir)}
    server {{
        listen 127.0.0.1:{h1_port} backlog=4096;
        location / {{ default_type text/plain; return 200 "{body}\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{h2_port} http2 backlog=4096;
        http2_max_concurrent_streams 1000;
        location / {{ default_type text/plain; return 200 "{body}\\n"; }}
    }}
}}
"""


def bootstrap(listen: int, admin: int, upstream: int, h2_upstream: bool) -> dict:
    doc = configs.envoy_bootstrap(listen_port=listen, admin_port=admin, upstream_port=upstream)
    if h2_upstream:
        doc["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T_OPTS, "explicit_http_config": {"http2_protocol_options": {}}}}
    return doc


# ---- load generators --------------------------------------------------------------------------

def h2load(port: int, duration: float, warmup: float, *, cores: str | None, grpc: bool,
           rps_per_client: float = 0, clients: int = 10, streams: int = 10,
           workdir: Path) -> dict:
    """Run h2load; returns counts, rate and per-request latencies (ms) from its log."""
    log = workdir / f"h2load-{port}-{time.monotonic_ns()}.log"
    # h2load takes whole seconds; a duration under one second is a short fixed count
    span = ["-D", str(max(1, round(duration)))] if duration >= 1 else ["-n", str(clients * streams)]
    if warmup >= 1:
        span += ["--warm-up-time", str(round(warmup))]
    argv = (["taskset", "-c", cores] if cores else []) + [
        "h2load", "-c", str(clients), "-m", str(streams), *span,
        "--log-file", str(log), f"http://127.0.0.1:{port}/"]
    if grpc:
        data = workdir / "grpc-message.bin"
        data.write_bytes(GRPC_MESSAGE)
        argv[-1] = f"http://127.0.0.1:{port}/bench.Echo/Unary"
        argv[-1:-1] = ["-d", str(data), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    if rps_per_client:
        argv[-1:-1] = ["--rps", f"{rps_per_client:g}"]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
    out = cp.stdout
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored", out)
    lat: list[float] = []
    try:
        for line in log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1].isdigit() and parts[1].startswith("2"):
                lat.append(int(parts[2]) / 1000.0)
    except OSError:
        pass
    if m is None or counts is None:
        raise RuntimeError(f"h2load failed ({cp.returncode}):\n{out[-2000:]}\n{cp.stderr[-2000:]}")
    secs = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    return {"seconds": secs, "rps": float(m.group(3)), "ok": int(counts.group(4)),
            "failed": int(counts.group(5)) + int(counts.group(6)), "latencies": lat,
            "raw": out}


def wrk(port: int, duration: float, cores: str | None) -> dict:
    argv = (["taskset", "-c", cores] if cores else []) + [
        "wrk", "-t1", "-c50", f"-d{duration:g}s", "--latency", f"http://127.0.0.1:{port}/"]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"Requests/sec:\s+([\d.]+)", cp.stdout)
    total = re.search(r"(\d+) requests in", cp.stdout)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", cp.stdout)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", cp.stdout)
    if m is None or total is None:
        raise RuntimeError(f"wrk failed:\n{cp.stdout}\n{cp.stderr}")

    def ms(x: re.Match[str] | None) -> float:
        if x is None:
            return math.nan
        return float(x.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[x.group(2)]
    return {"rps": float(m.group(1)), "ok": int(total.group(1)), "p50": ms(p50), "p99": ms(p99)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- the harness ----------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = ProcessGroup(workdir)
        self.proxy_core = None if args.no_pin else args.proxy_core
        self.load_core = None if args.no_pin else args.load_core
        self.results: list[Result] = []

    def start_upstreams(self) -> None:
        self.h1_port, self.h2_port, self.grpc_port = free_port(), free_port(), free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_conf(self.workdir, self.h1_port, self.h2_port))
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / d).mkdir(exist_ok=True)
        ng = self.procs.start("nginx", ["nginx", "-c", str(conf), "-p", str(self.workdir)],
                              self.load_core)
        wait_http_ok(ng, f"http://127.0.0.1:{self.h1_port}/")
        self.grpc = self.procs.start("grpc-upstream", [sys.executable, "-m", "bench.grpc_upstream",
                                                       str(self.grpc_port), "32"],
                                     self.load_core, cwd=str(REPO))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                h2load(self.grpc_port, 0.2, 0, cores=None, grpc=True, clients=1, streams=1,
                       workdir=self.workdir)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                time.sleep(0.2)
        raise StartError("the grpc upstream did not start")

    def start_proxy(self, target: str, upstream: int, h2_upstream: bool):  # type: ignore[no-untyped-def]
        listen, admin = free_port(), free_port()
        doc = bootstrap(listen, admin, upstream, h2_upstream)
        cfg = self.workdir / f"{target}-{listen}.yaml"
        cfg.write_text(configs.dump(doc))
        if target == "envoy":
            argv = [self.args.envoy, "-c", str(cfg), "--concurrency", "1", "--log-level", "error",
                    "--disable-hot-restart"]
            env = None
        else:
            tree = (self.args.baseline_tree if target == "sidecar@baseline" else
                    str(compiled_tree(REPO, self.workdir)) if target == "sidecar-mypyc" else
                    str(REPO))
            argv = [sys.executable, "-m", "sidecar", "run", "-c", str(cfg), "--concurrency", "1",
                    "--log-level", "warning"]
            env = dict(os.environ, PYTHONPATH=tree)
        # the checkout's own directory first on sys.path (python -m puts the cwd there)
        child = self.procs.start(target, argv, self.proxy_core, env=env,
                                 cwd=tree if target.startswith("sidecar") else str(REPO))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not child.alive():
                raise StartError(f"{target} exited:\n{child.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", listen), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        return child, listen

    def measure(self, target: str, scenario: str, run) -> Result:  # type: ignore[no-untyped-def]
        """Run ``run(port)`` against a fresh proxy (or ``direct``), with CPU accounting."""
        upstream, h2_up, direct_port = {
            "h2->h1": (self.h1_port, False, None), "h2->h2": (self.h2_port, True, None),
            "h1": (self.h1_port, False, None)}.get(scenario.split("@")[0],
                                                   (self.grpc_port, True, self.grpc_port))
        r = Result(target, scenario)
        child = None
        try:
            if target == "direct":
                port = direct_port if direct_port is not None else upstream
            else:
                child, port = self.start_proxy(target, upstream, h2_up)
                run(port, warm=True)            # warm up (connections, pools, caches)
            user0, kernel0 = tree_cpu_split(child.pid) if child else (0.0, 0.0)
            bg0 = cores_busy_seconds(self.proxy_core)
            t0 = time.monotonic()
            out = run(port, warm=False)
            elapsed = time.monotonic() - t0
            if child is not None:
                user1, kernel1 = tree_cpu_split(child.pid)
                r.cpu_s = user1 - user0 + kernel1 - kernel0
                busy = cores_busy_seconds(self.proxy_core) - bg0
                r.bg_cpu_pct = max(0.0, (busy - r.cpu_s) / elapsed * 100) if self.proxy_core else math.nan
            r.rps, r.ok, r.failed = out["rps"], out["ok"], out.get("failed", 0)
            lat = out.get("latencies")
            if lat:
                r.p50_ms, r.p99_ms = pct(lat, 0.5), pct(lat, 0.99)
            elif "p50" in out:
                r.p50_ms, r.p99_ms = out["p50"], out["p99"]
            if child is not None and r.cpu_s > 0:
                r.per_core = r.ok / r.cpu_s
                r.user_us = (user1 - user0) / max(r.ok, 1) * 1e6
                r.kernel_us = (kernel1 - kernel0) / max(r.ok, 1) * 1e6
        except (StartError, RuntimeError, subprocess.TimeoutExpired) as e:
            r.note = str(e).splitlines()[0][:200]
        finally:
            if child is not None:
                self.procs.stop(child)
        self.results.append(r)
        print(f"  {target:18} {scenario:10} {fmt(r.rps, 0):>8} req/s  {fmt(r.per_core, 0):>8} /core-s"
              f"  p50 {fmt(r.p50_ms, 2)} p99 {fmt(r.p99_ms, 2)} ms  {r.note}", flush=True)
        return r

    def run(self) -> None:
        a = self.args
        d, w = a.duration, a.warmup
        lc = self.load_core

        def closed(grpc: bool):  # type: ignore[no-untyped-def]
            def go(port: int, warm: bool) -> dict:
                return h2load(port, w if warm else d, 0, cores=lc, grpc=grpc, workdir=self.workdir)
            return go

        def fixed(rate: float):  # type: ignore[no-untyped-def]
            def go(port: int, warm: bool) -> dict:
                return h2load(port, w if warm else d, 0, cores=lc, grpc=True, clients=10, streams=1,
                              rps_per_client=rate / 10, workdir=self.workdir)
            return go

        def http1(port: int, warm: bool) -> dict:
            return wrk(port, w if warm else d, lc)

        proxies = [t for t in a.targets.split(",") if t]
        for scenario in ("h2->h1", "h2->h2"):
            for t in proxies:
                self.measure(t, scenario, closed(False))
        for t in ["direct", *proxies]:
            self.measure(t, "grpc", closed(True))
        for rate in a.rates:
            base = self.measure("direct", f"grpc@{rate:g}", fixed(rate))
            for t in proxies:
                r = self.measure(t, f"grpc@{rate:g}", fixed(rate))
                r.added_p50_ms = r.p50_ms - base.p50_ms
                r.added_p99_ms = r.p99_ms - base.p99_ms
        if a.http1:
            # the baseline checkout (one without HTTP/2, say) runs the HTTP/1.1 scenario only
            for t in proxies + (["sidecar@baseline"] if a.baseline_tree else []):
                self.measure(t, "h1", http1)


def fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report(results: list[Result], markdown: bool) -> str:
    cols = ("target", "scenario", "req/s", "req/s per core", "user / kernel us per req", "p50 ms",
            "p99 ms", "+p50 ms", "+p99 ms", "failed", "bg CPU%", "vs envoy (req/s, per core)")
    env = {(r.scenario): r for r in results if r.target == "envoy"}
    rows = []
    for r in results:
        e = env.get(r.scenario)
        ratio = "-"
        if e is not None and r.target != "envoy" and r.target != "direct" and e.rps == e.rps:
            ratio = f"{r.rps / e.rps:.2f}, {r.per_core / e.per_core:.2f}" if e.per_core else "-"
        rows.append((r.target, r.scenario, fmt(r.rps, 0), fmt(r.per_core, 0),
                     f"{fmt(r.user_us)} / {fmt(r.kernel_us)}", fmt(r.p50_ms, 2),
                     fmt(r.p99_ms, 2), fmt(r.added_p50_ms, 2), fmt(r.added_p99_ms, 2),
                     str(r.failed), fmt(r.bg_cpu_pct, 0), ratio + (f" ({r.note})" if r.note else "")))
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(cols))]
    lines += ["  ".join(v.ljust(widths[i]) for i, v in enumerate(row)) for row in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="envoy,sidecar")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rates", default="500", help="fixed gRPC call rates (comma-separated)")
    p.add_argument("--quick", action="store_true", help="3 s measurements, 1 s warm-up")
    p.add_argument("--http1", action="store_true", help="also HTTP/1.1 with wrk (regression check)")
    p.add_argument("--baseline-tree", default="", help="another checkout: its sidecar runs too")
    p.add_argument("--envoy", default=shutil.which("envoy") or "envoy")
    p.add_argument("--proxy-core", default="0")
    p.add_argument("--load-core", default="1")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.duration, a.warmup = 3.0, 1.0
    a.rates = [float(x) for x in a.rates.split(",") if x]
    for tool in ("h2load", "nginx", *(("wrk",) if a.http1 else ())):
        if shutil.which(tool) is None:
            print(f"{tool} is needed (Debian: nghttp2-client, nginx-light, wrk)", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-h2-"))
    b = Bench(a, workdir)
    print(f"HTTP/2 + gRPC benchmark, {a.duration:g} s per measurement; proxy on core "
          f"{b.proxy_core or 'any'}, load on core {b.load_core or 'any'}; figures are indicative "
          "on a shared machine", flush=True)
    try:
        b.start_upstreams()
        b.run()
    finally:
        b.procs.stop_all()
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(report(b.results, a.markdown))
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in b.results], indent=1))
    by = {(r.target, r.scenario): r for r in b.results}
    print()
    for scen in ("h2->h1", "h2->h2", "grpc"):
        s, e = by.get(("sidecar", scen)), by.get(("envoy", scen))
        if s and e and e.per_core == e.per_core and e.per_core:
            print(f"{scen}: sidecar/envoy req/s {s.rps / e.rps:.2f}, per core {s.per_core / e.per_core:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
