"""System calls and CPU per gRPC call, counted by the kernel (``perf stat`` tracepoints, no
strace slow-down): how many writes (each wakes the peer), reads and loop polls a proxy makes.

    python -m bench.grpc_syscalls envoy                # Envoy 1.40
    python -m bench.grpc_syscalls .                    # this checkout, interpreted
    scripts/build_compiled /tmp/c && python -m bench.grpc_syscalls /tmp/c   # compiled
    python -m bench.grpc_syscalls envoy . --seconds 8 --rounds 3           # alternating

The scenario is ``bench.http2``'s ``grpc`` one (unary calls to the grpcio echo server, h2load
``-c 10 -m 10``, proxy on core 0, load and server on core 1). Needs ``perf`` and the kernel's
syscall tracepoints (root, or ``perf_event_paranoid`` <= 1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import configs
from bench.http2 import bootstrap, h2load
from bench.procs import ProcessGroup, free_port

REPO = Path(__file__).resolve().parents[1]
SYSCALLS = ("write", "sendto", "writev", "read", "readv", "recvfrom", "epoll_wait",
            "epoll_pwait")


def measure(target: str, seconds: int) -> dict[str, float]:
    """Per-call counts for one proxy (``envoy`` or a source tree) under the gRPC load."""
    work = Path(tempfile.mkdtemp(prefix="grpc-syscalls-"))
    procs = ProcessGroup(work)
    try:
        grpc_port, listen, admin = free_port(), free_port(), free_port()
        procs.start("grpc-upstream", [sys.executable, "-m", "bench.grpc_upstream",
                                      str(grpc_port), "32"], "1", cwd=str(REPO))
        time.sleep(2)
        cfg = work / "bootstrap.yaml"
        cfg.write_text(configs.dump(bootstrap(listen, admin, grpc_port, True)))
        if target == "envoy":
            proxy = procs.start("envoy", ["envoy", "-c", str(cfg), "--concurrency", "1",
                                          "--log-level", "error", "--disable-hot-restart"], "0")
        else:
            tree = str(Path(target).resolve())
            proxy = procs.start("sidecar", [sys.executable, "-m", "sidecar", "run", "-c",
                                            str(cfg), "--concurrency", "1", "--log-level",
                                            "warning"], "0",
                                env=dict(os.environ, PYTHONPATH=tree), cwd=tree)
        time.sleep(3)
        h2load(listen, 2, 0, cores="1", grpc=True, workdir=work)       # warm-up
        events = ",".join(f"syscalls:sys_enter_{s}" for s in SYSCALLS) + \
            ",task-clock,context-switches"
        out = work / "perf-stat.csv"
        perf = subprocess.Popen(["perf", "stat", "-x,", "-e", events, "-p",
                                 str(proxy.proc.pid), "-o", str(out), "--", "sleep",
                                 str(seconds)])
        load = h2load(listen, seconds + 1, 0, cores="1", grpc=True, workdir=work)
        perf.wait()
        calls = load["ok"] * seconds / (seconds + 1)     # the calls of perf's window
        result = {"calls/s": load["rps"]}
        for line in out.read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 3 and parts[0] and parts[0][0].isdigit():
                name = parts[2].replace("syscalls:sys_enter_", "")
                value = float(parts[0]) / calls
                result[name] = value * 1000 if name == "task-clock" else value  # ms -> us
        return result
    finally:
        procs.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="+", help="envoy, or a source tree (PYTHONPATH)")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the targets this often")
    args = ap.parse_args()
    for _ in range(args.rounds):
        for target in args.targets:
            r = measure(target, args.seconds)
            shown = [f"{k} {v:.3f}" for k, v in r.items()
                     if k not in ("calls/s", "task-clock") and v]
            print(f"{target}: {r['calls/s']:.0f} calls/s, CPU {r.get('task-clock', 0):.1f} us "
                  f"per call; per call: " + ", ".join(shown), flush=True)


if __name__ == "__main__":
    main()
