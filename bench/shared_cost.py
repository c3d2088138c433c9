"""What sharing limits across workers costs a whole request: req/s of ``sidecar run`` with its
default worker count, with shared state (the default) and with per-worker state
(``SIDECAR_SHARED_STATE=per_worker``, the behaviour before issue 15), one run each.

    python -m bench.shared_cost [--duration 10] [--connections 50]

Scenarios (one listener, one route, a cluster of two endpoints served by an upstream sidecar
process answering directly):

* ``core``: circuit breakers and least-request balancing (breaker admit/release, requests in
  flight per endpoint, the health-board epoch read on every pick);
* ``ratelimit``: the same plus a local rate limit that never limits (one exact bucket consume
  per request, under a robust mutex when shared).

Needs ``wrk``. The machine is shared: expect a few per cent of noise between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import yaml

from bench.procs import free_port
from sidecar.testing import wait_for_port


def upstream_config(ports: list[int], admin: int) -> dict:
    return {"admin": {"address": "127.0.0.1", "port": admin},
            "listeners": [{"name": f"u{i}", "address": "127.0.0.1", "port": p,
                           "routes": [{"match": {"prefix": "/"},
                                       "direct_response": {"status": 200, "body": "hello"}}]}
                          for i, p in enumerate(ports)], "clusters": []}


def proxy_config(port: int, admin: int, ups: list[int], ratelimit: bool) -> dict:
    lst: dict = {"name": "in", "address": "127.0.0.1", "port": port,
                 "routes": [{"match": {"prefix": "/"}, "cluster": "svc"}]}
    if ratelimit:
        lst["filters"] = [{"local_ratelimit": {"max_tokens": 1_000_000_000,
                                               "fill_interval": "1s", "headers": False}}]
    return {"admin": {"address": "127.0.0.1", "port": admin}, "listeners": [lst],
            "clusters": [{"name": "svc", "lb": "least_request",
                          "endpoints": [f"127.0.0.1:{p}" for p in ups],
                          "circuit_breakers": {"max_requests": 100000,
                                               "max_pending_requests": 100000,
                                               "max_connections": 100000}}]}


def start(cfg: dict, tmp: str, name: str, concurrency: str, env: dict | None = None
          ) -> subprocess.Popen:
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", path,
                             "--concurrency", concurrency],
                            env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wrk(port: int, duration: int, connections: int) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk: {out}")
    if "Non-2xx" in out:
        raise RuntimeError(f"errors during the run:\n{out}")
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ups = [free_port(), free_port()]
        up = start(upstream_config(ups, free_port()), tmp, "upstream", "1")
        try:
            for p in ups:
                wait_for_port(p, 20)
            for scenario in ("core", "ratelimit"):
                for mode in ("per_worker", "shared"):
                    port, admin = free_port(), free_port()
                    env = {"SIDECAR_SHARED_STATE": mode} if mode == "per_worker" else {}
                    proc = start(proxy_config(port, admin, ups, scenario == "ratelimit"), tmp,
                                 f"proxy-{scenario}-{mode}", "0", env)
                    try:
                        wait_for_port(port, 20)
                        time.sleep(1.0)
                        wrk(port, 2, a.connections)                 # warm-up
                        rps = wrk(port, a.duration, a.connections)
                    finally:
                        proc.terminate()
                        proc.wait(15)
                    results.setdefault(scenario, {})[mode] = rps
                    print(f"{scenario:10s} {mode:10s} {rps:10.0f} req/s", flush=True)
        finally:
            up.terminate()
            up.wait(15)
    print()
    print("| scenario | per-worker state req/s | shared state req/s | cost |")
    print("|---|---|---|---|")
    for scenario, r in results.items():
        cost = 1.0 - r["shared"] / r["per_worker"]
        print(f"| {scenario} | {r['per_worker']:.0f} | {r['shared']:.0f} | {cost:+.1%} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
