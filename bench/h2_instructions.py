"""Instructions per HTTP/2 request (callgrind): a load-independent measure of the HTTP/2 path.

    python -m bench.h2_instructions                      # h2->h1, h2->h2, grpc; this checkout
    python -m bench.h2_instructions --tree /work/main    # another checkout
    python -m bench.h2_instructions --scenarios grpc -n 2000

The sidecar (one worker) runs under ``valgrind --tool=callgrind`` with collection off; after a
warm-up of ``h2load`` requests collection is switched on (``callgrind_control -i on``), ``-n``
requests are sent (``h2load -c 10 -m 10``: 100 concurrent streams over 10 connections, as in
``bench.http2``), collection is switched off and the sidecar stopped. Instructions divided by
requests is the proxy's cost per request, whatever else runs on the machine (wall-clock
benchmarks on a shared box are not). Upstreams: nginx over HTTP/1.1 or HTTP/2 (h2c), and the
grpcio echo server of ``bench.grpc_upstream`` for unary gRPC calls.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import configs
from bench.http2 import GRPC_MESSAGE, bootstrap, h2load, nginx_conf
from bench.procs import ProcessGroup, free_port, tree_cpu_seconds, wait_http_ok

REPO = Path(__file__).resolve().parents[1]


def h2load_n(port: int, n: int, grpc: bool, workdir: Path) -> None:
    argv = ["h2load", "-c", "10", "-m", "10", "-n", str(n), f"http://127.0.0.1:{port}/"]
    if grpc:
        data = workdir / "grpc-message.bin"
        data.write_bytes(GRPC_MESSAGE)
        argv[-1] = f"http://127.0.0.1:{port}/bench.Echo/Unary"
        argv[-1:-1] = ["-d", str(data), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", cp.stdout)
    if m is None or int(m.group(1)) != n:
        raise RuntimeError(f"h2load: {cp.stdout[-1500:]}")


def measure(tree: str, scenario: str, n: int, ports: dict[str, int], workdir: Path,
            procs: ProcessGroup, profile: bool, cpu: bool = False) -> float:
    """Instructions per request, or with ``cpu`` the proxy's CPU microseconds per request
    (user + system, so syscalls count; not load-independent, but far less noisy than req/s)."""
    upstream = {"h2->h1": ports["h1"], "h2->h2": ports["h2"], "grpc": ports["grpc"]}[scenario]
    listen, admin = free_port(), free_port()
    cfg = workdir / f"{scenario.replace('>', '')}-{listen}.yaml"
    cfg.write_text(configs.dump(bootstrap(listen, admin, upstream, scenario != "h2->h1")))
    out = workdir / f"cg-{listen}.out"
    env = dict(os.environ, PYTHONPATH=tree)
    grind = [] if cpu else ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                            f"--callgrind-out-file={out}"]
    child = procs.start("sidecar", [*grind, sys.executable, "-m", "sidecar", "run", "-c", str(cfg),
                                    "--concurrency", "1", "--no-metrics", "--log-level", "warning"],
                        env=env, cwd=tree)
    grpc = scenario == "grpc"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                h2load_n(listen, 100, grpc, workdir)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline or not child.alive():
                    raise RuntimeError(f"sidecar did not serve: {child.log_tail()}") from None
                time.sleep(1)
        h2load_n(listen, 300, grpc, workdir)         # warm: pools, caches
        if cpu:
            cpu0 = tree_cpu_seconds(child.pid)
            h2load_n(listen, n, grpc, workdir)
            return (tree_cpu_seconds(child.pid) - cpu0) / n * 1e6
        subprocess.run(["callgrind_control", "-i", "on", str(child.pid)], check=True,
                       capture_output=True)
        h2load_n(listen, n, grpc, workdir)
        subprocess.run(["callgrind_control", "-i", "off", str(child.pid)], check=True,
                       capture_output=True)
    finally:
        procs.stop(child, grace=60)
    txt = out.read_text(errors="replace")
    m = re.search(r"^totals:\s+(\d+)", txt, re.M)
    if m is None:
        raise RuntimeError("no callgrind totals")
    if profile:
        top = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", str(out)],
                             capture_output=True, text=True).stdout
        by_object: dict[str, int] = {}
        for line in top.splitlines():
            m2 = re.match(r"\s*([\d,]+) \(.*\)\s+.*\[(.*)\]$", line)
            if m2:
                obj = os.path.basename(m2.group(2))
                by_object[obj] = by_object.get(obj, 0) + int(m2.group(1).replace(",", ""))
        print("\n".join(top.splitlines()[:40]))
        total = sum(by_object.values()) or 1
        for obj, ir in sorted(by_object.items(), key=lambda kv: -kv[1])[:15]:
            print(f"  {ir / total * 100:5.1f}%  {obj}")
    return int(m.group(1)) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", default=str(REPO))
    p.add_argument("--scenarios", default="h2->h1,h2->h2,grpc")
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--cpu", action="store_true",
                   help="CPU microseconds per request instead (no valgrind; -n 20000 is better)")
    p.add_argument("--annotate", action="store_true", help="print callgrind_annotate's top")
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="h2-ir-"))
    procs = ProcessGroup(workdir)
    try:
        ports = {"h1": free_port(), "h2": free_port(), "grpc": free_port()}
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(workdir, ports["h1"], ports["h2"]))
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / d).mkdir(exist_ok=True)
        ng = procs.start("nginx", ["nginx", "-c", str(conf), "-p", str(workdir)])
        wait_http_ok(ng, f"http://127.0.0.1:{ports['h1']}/")
        procs.start("grpc-upstream", [sys.executable, "-m", "bench.grpc_upstream",
                                      str(ports["grpc"]), "8"], cwd=str(REPO))
        deadline = time.monotonic() + 20
        while True:
            try:
                h2load(ports["grpc"], 0.2, 0, cores=None, grpc=True, clients=1, streams=1,
                       workdir=workdir)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for scen in a.scenarios.split(","):
            v = measure(a.tree, scen, a.n, ports, workdir, procs, a.annotate, a.cpu)
            unit = "CPU us" if a.cpu else "instructions"
            print(f"{scen:8} {v:>12,.{1 if a.cpu else 0}f} {unit} per request  ({a.tree})", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
