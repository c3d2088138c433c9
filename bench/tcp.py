"""TCP proxy benchmark: the sidecar's tcp_proxy next to Envoy 1.40's and a direct path.

    python -m bench.tcp                      # 2 GB bulk, 10 s ping-pong, slow reader
    python -m bench.tcp --quick              # smaller and shorter
    python -m bench.tcp --markdown

Envoy and the sidecar run the same generated Envoy v3 bootstrap (one listener, tcp_proxy, one
STATIC cluster), each with one worker (``--concurrency 1``) pinned to core 0; the peers
(``bench/tcp_load.py``: a server that sinks, echoes or sources, and the clients) run on
core 1. Per target:

* **bulk**: one connection sends ``--bulk`` bytes through the proxy to a sink: throughput, and
  the proxy's CPU per GB (utime+stime of its process tree over the transfer);
* **ping-pong**: ``--conns`` connections each exchange ``--msg``-byte messages (send, wait for
  the echo, send again) for ``--seconds``: exchanges per second, and per proxy CPU second;
* **slow reader**: the server sends ``--slow`` bytes as fast as it can, the client reads at
  ``--slow-rate`` bytes/s: the proxy's RSS is sampled all along (flat = bounded buffering).

"Per core" figures divide by the proxy's own CPU time, so they hold when the proxy is not
the bottleneck. On a shared machine the numbers are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import (
    ProcessGroup,
    RssSampler,
    cores_busy_seconds,
    free_port,
    tree_cpu_seconds,
    tree_rss_kb,
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

CONFIG = """admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: bench
          cluster: upstream
  clusters:
  - name: upstream
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}
"""


def wait_port(port: int, child, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening")


def load(cores: str | None, *args: object) -> str:
    argv = [PY, "-m", "bench.tcp_load", *map(str, args)]
    if cores and shutil.which("taskset"):
        argv = ["taskset", "-c", cores, *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()


def run_target(name: str, a: argparse.Namespace, group: ProcessGroup, upstream: int,
               work: Path) -> dict:
    proxy_core = None if a.no_pin else a.proxy_core
    load_core = None if a.no_pin else a.load_core
    port = upstream
    child = None
    if name != "direct":
        port, admin = free_port(), free_port()
        cfg = work / f"{name}.yaml"
        cfg.write_text(CONFIG.format(admin=admin, port=port, upstream=upstream))
        if name == "envoy":
            argv = [a.envoy, "-c", str(cfg), "--concurrency", "1", "--log-level", "error",
                    "--disable-hot-restart"]
        else:
            argv = [PY, "-m", "sidecar", "run", "-c", str(cfg), "--concurrency", "1",
                    "--log-level", "warning", *(["--no-metrics"] if a.no_metrics else [])]
        child = group.start(name, argv, cores=proxy_core,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
        wait_port(port, child)
        time.sleep(0.5)
    out: dict = {"target": name}
    cpu = (lambda: tree_cpu_seconds(child.pid)) if child is not None else (lambda: 0.0)
    # bulk
    c0 = cpu()
    seconds = float(load(load_core, "bulk", port, a.bulk))
    c1 = cpu()
    out["bulk_mb_s"] = a.bulk / seconds / 1e6
    out["bulk_cpu_s_per_gb"] = (c1 - c0) / (a.bulk / 1e9) if child is not None else None
    # ping-pong
    c0, b0 = cpu(), cores_busy_seconds(proxy_core)
    n = int(load(load_core, "pingpong", port, a.conns, a.seconds, a.msg))
    c1, b1 = cpu(), cores_busy_seconds(proxy_core)
    out["pingpong_per_s"] = n / a.seconds
    out["pingpong_per_cpu_s"] = n / (c1 - c0) if child is not None and c1 > c0 else None
    # what else ran on the proxy's core meanwhile (other work on a shared machine)
    out["pingpong_bg_cpu_pct"] = max(0.0, (b1 - b0) - (c1 - c0)) / a.seconds * 100 \
        if proxy_core else None
    # slow reader
    if child is not None:
        idle = tree_rss_kb(child.pid)
        with RssSampler(child.pid, 0.2) as rss:
            load(load_core, "slow", port, a.slow, a.slow_rate)
        out["slow_rss_idle_mb"] = idle / 1024
        out["slow_rss_peak_mb"] = rss.peak_kb / 1024
        out["slow_rss_last_mb"] = (rss.samples[-1] if rss.samples else 0) / 1024
        group.stop(child)
    return out


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--bulk", type=int, default=2_000_000_000, help="bytes in the bulk transfer")
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--msg", type=int, default=128)
    p.add_argument("--slow", type=int, default=400_000_000, help="bytes to the slow reader")
    p.add_argument("--slow-rate", type=float, default=40_000_000, help="its bytes/s")
    p.add_argument("--targets", default="direct,envoy,sidecar")
    p.add_argument("--proxy-core", default="0")
    p.add_argument("--load-core", default="1")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--no-metrics", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.quick:
        a.bulk, a.seconds, a.slow = 300_000_000, 3.0, 80_000_000
    a.envoy = shutil.which("envoy")
    targets = [t for t in a.targets.split(",") if t != "envoy" or a.envoy]
    work = Path(tempfile.mkdtemp(prefix="bench-tcp-"))
    group = ProcessGroup(work)
    rows = []
    try:
        upstream = free_port()
        server = group.start("server", [PY, "-m", "bench.tcp_load", "server", str(upstream)],
                             cores=None if a.no_pin else a.load_core,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
        wait_port(upstream, server)
        for t in targets:
            print(f"{t} ...", flush=True)
            rows.append(run_target(t, a, group, upstream, work))
    finally:
        group.stop_all()
    env = next((r for r in rows if r["target"] == "envoy"), None)
    head = ["target", "bulk MB/s", "CPU s/GB", "ping-pong/s", "per CPU s", "vs envoy /CPU s",
            "bg CPU %", "RSS idle MB", "RSS peak MB (slow reader)"]
    lines = []
    for r in rows:
        ratio = None
        if env and r["pingpong_per_cpu_s"] and env["pingpong_per_cpu_s"]:
            ratio = r["pingpong_per_cpu_s"] / env["pingpong_per_cpu_s"]
        lines.append([r["target"], fmt(r["bulk_mb_s"]), fmt(r["bulk_cpu_s_per_gb"], 2),
                      fmt(r["pingpong_per_s"], 0), fmt(r["pingpong_per_cpu_s"], 0),
                      fmt(ratio, 2), fmt(r.get("pingpong_bg_cpu_pct"), 0),
                      fmt(r.get("slow_rss_idle_mb")), fmt(r.get("slow_rss_peak_mb"))])
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        for ln in lines:
            print("  ".join(c.ljust(w) for c, w in zip(ln, widths, strict=True)))
    if env is not None:
        for r in rows:
            if r["target"] == "sidecar" and env["bulk_cpu_s_per_gb"]:
                print(f"sidecar/envoy bulk CPU per GB: "
                      f"{r['bulk_cpu_s_per_gb'] / env['bulk_cpu_s_per_gb']:.2f} (lower is better)")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
