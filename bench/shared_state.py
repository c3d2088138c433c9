"""Cost of shared state: ns per operation of each primitive, single-process (``LocalState``,
the baseline) against shared memory (``WorkerShared``), alone and with a second worker
process hammering the same rows; then an estimate per request.

    python -m bench.shared_state                 # about 20 s
    python -m bench.shared_state --n 50000       # quicker, noisier

Per request, a typical proxied request with a breaker, least-request balancing, outlier
detection, a local rate limit and a JWT with replay protection does (``OPS_PER_REQUEST``):
breaker admit + release, endpoint begin + end + outcome, two active-count reads (P2C picks
between two hosts), one health-epoch read, one bucket consume, one jti insert.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

from sidecar.config.stores import SharedStateConfig
from sidecar.shared.api import BucketSpec, Outcome, Priority, Resource
from sidecar.shared.host import SharedHost
from sidecar.shared.local import LocalState

D, REQ = Priority.DEFAULT, Resource.REQUESTS
SPEC = BucketSpec(max_tokens=1 << 40, tokens_per_fill=1, fill_interval_s=1.0)
OPS_PER_REQUEST = {"breaker admit": 1, "breaker release": 1, "endpoint begin": 1,
                   "endpoint end": 1, "endpoint outcome": 1, "active read": 2,
                   "health epoch": 1, "bucket consume": 1, "jti insert": 1}
# req/s of one worker from docs/performance.md (same machine class): core data plane, and
# the JWT + fault + retry filter chain with tracing
BASELINES = {"core (20,066 req/s)": 20_066, "filter chain (14,145 req/s)": 14_145}


def ops(state) -> dict[str, Callable[[int], None]]:
    b = state.breaker("svc")
    e = state.endpoint("svc", "10.0.0.1:80")
    bk = state.buckets()
    rp = state.replay()
    seq = [0]

    def admit(n):
        for _ in range(n):
            b.try_acquire(D, REQ, 1 << 40)

    def release(n):
        for _ in range(n):
            b.release(D, REQ)

    def begin(n):
        for _ in range(n):
            e.begin()

    def end(n):
        for _ in range(n):
            e.end()

    def outcome(n):
        for i in range(n):
            e.record(Outcome.SUCCESS if i & 7 else Outcome.ERROR_5XX)

    def active(n):
        for _ in range(n):
            e.active()

    def epoch(n):
        for _ in range(n):
            state.health_epoch()

    def consume(n):
        now = time.monotonic()
        for _ in range(n):
            bk.consume("cfg", (), SPEC, now)

    def jti(n):
        # a new jti each call, living a millisecond: each batch starts on an empty table and
        # fills it to n / capacity (capacity is 4 n: at most a quarter full)
        base = seq[0]
        seq[0] += n
        now = time.time()
        for i in range(base, base + n):
            rp.check_and_add("iss", f"jti-{os.getpid()}-{i}", now + 0.001, now)

    return {"breaker admit": admit, "breaker release": release, "endpoint begin": begin,
            "endpoint end": end, "endpoint outcome": outcome, "active read": active,
            "health epoch": epoch, "bucket consume": consume, "jti insert": jti}


def measure(fn: Callable[[int], None], n: int) -> float:
    fn(min(n, 2000))                                  # warm up
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        fn(n)
        best = min(best, (time.perf_counter() - t) / n * 1e9)
    return best


def contended(host: SharedHost, n: int) -> dict[str, float]:
    """Worker 1 runs the same operations in a loop while worker 0 is measured."""
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(stop_w)
        os.set_blocking(stop_r, False)
        mine = ops(host.worker(1))
        try:
            while True:
                for fn in mine.values():
                    fn(200)
                try:
                    if os.read(stop_r, 1):
                        break
                except BlockingIOError:
                    pass
        finally:
            os._exit(0)
    os.close(stop_r)
    try:
        time.sleep(0.2)
        return {name: measure(fn, n) for name, fn in ops(host.worker(0)).items()}
    finally:
        os.write(stop_w, b"x")
        os.waitpid(pid, 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000, help="operations per measurement")
    ap.add_argument("--json", help="write the numbers here too")
    a = ap.parse_args()
    cfg = SharedStateConfig(replay_entries=4 * a.n)
    local = {k: measure(f, a.n) for k, f in ops(LocalState(cfg)).items()}
    host = SharedHost.create(cfg, 2)
    shm = {k: measure(f, a.n) for k, f in ops(host.worker(0)).items()}
    busy = contended(host, a.n)
    host.close()

    print(f"{'operation':18} {'ops/req':>7} {'local ns':>9} {'shm ns':>8} "
          f"{'shm+busy ns':>11}")
    totals = {"local": 0.0, "shm": 0.0, "busy": 0.0}
    for k in local:
        per = OPS_PER_REQUEST[k]
        totals["local"] += per * local[k]
        totals["shm"] += per * shm[k]
        totals["busy"] += per * busy[k]
        print(f"{k:18} {per:>7} {local[k]:>9.0f} {shm[k]:>8.0f} {busy[k]:>11.0f}")
    print(f"{'per request':18} {'':>7} {totals['local']:>9.0f} {totals['shm']:>8.0f} "
          f"{totals['busy']:>11.0f}")
    extra = totals["busy"] - totals["local"]
    for name, rps in BASELINES.items():
        per_req_ns = 1e9 / rps
        print(f"added per request vs local: {extra / 1000:.2f} us = "
              f"{extra / per_req_ns * 100:.1f} % of a {name} request "
              f"(req/s ratio ~{per_req_ns / (per_req_ns + extra):.3f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"local": local, "shm": shm, "shm_contended": busy,
                       "ops_per_request": OPS_PER_REQUEST, "per_request_ns": totals}, f,
                      indent=2)


if __name__ == "__main__":
    main()
