"""Canary example in one command: the demo services, the sidecar (a real ``sidecar run``
process with ``examples/canary/sidecar.yaml``), a few hundred requests, then a report of what
happened: the 90/10 split, the injected delays on the canary, pinned and debug routing,
header-controlled aborts, the shadow copies the debug build received, and how peak EWMA
treated the slow v1 replica.

    python examples/canary/run.py                  # the ports of sidecar.yaml
    python examples/canary/run.py --free-ports     # any free ports (CI)
    python examples/canary/run.py --requests 1000

Exits 1 if what happened is not what the config promises.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

from sidecar.testing import stop_process

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from examples.canary import services  # noqa: E402
from sidecar.shared.testing import free_port  # noqa: E402


def load_config(free_ports: bool) -> tuple[dict, list[int]]:
    """The example config, and the service ports (v1a, v1b, v2, debug) it points at."""
    with open(os.path.join(HERE, "sidecar.yaml")) as f:
        cfg = yaml.safe_load(f)
    if free_ports:
        cfg["admin"]["port"] = free_port()
        cfg["listeners"][0]["port"] = free_port()
        for c in cfg["clusters"]:
            c["endpoints"] = [f"127.0.0.1:{free_port()}" for _ in c["endpoints"]]
    eps = {c["name"]: [int(e.rsplit(":", 1)[1]) for e in c["endpoints"]] for c in cfg["clusters"]}
    ports = eps["reviews-v1"] + eps["reviews-v2"] + eps["reviews-debug"]
    return cfg, ports


async def wait_http(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def line(self, text: str = "") -> None:
        print(text, flush=True)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            print(f"   !! {what}", flush=True)


async def scenario(base: str, admin: str, debug_url: str, n: int, rep: Report) -> None:
    async with aiohttp.ClientSession() as s:
        async def call(path="/reviews/1", **headers):
            t = time.monotonic()
            async with s.get(base + path, headers=headers) as r:
                if r.headers.get("content-type", "").startswith("application/json"):
                    body = await r.json()
                else:
                    body = {"text": await r.text()}
                return r.status, body, time.monotonic() - t

        # 1. the canary rollout
        res = []
        for i in range(0, n, 4):      # a few users at a time
            res += await asyncio.gather(*(call(f"/reviews/{j}") for j in range(i, min(n, i + 4))))
        versions = Counter(b.get("version") for st, b, _ in res if st == 200)
        v2 = versions["v2"]
        rep.line(f"1. canary rollout, {n} requests to /reviews/*:")
        rep.line(f"     v1 {versions['v1']} ({versions['v1'] * 100 / n:.1f} %), "
                 f"v2 {v2} ({v2 * 100 / n:.1f} %)   [configured 90/10]")
        share = v2 / n
        sd = (0.09 / n) ** 0.5
        rep.check(all(st == 200 for st, _, _ in res), "every canary request answered 200")
        rep.check(abs(share - 0.10) <= 4.5 * sd, f"v2 share {share:.3f} is within 4.5 sd of 0.10")

        # 2. fault injection on the canary only
        slow_v2 = sum(1 for st, b, dt in res if b.get("version") == "v2" and dt >= 0.19)
        slow_v1 = sum(1 for st, b, dt in res if b.get("version") == "v1" and dt >= 0.19)
        rep.line("2. fault injection (200 ms delay, 50 % of requests bound to reviews-v2):")
        rep.line(f"     delayed: {slow_v2} of {v2} v2 responses, {slow_v1} of {versions['v1']} v1")
        rep.check(slow_v1 == 0, "no v1 response was delayed")
        rep.check(v2 == 0 or 0 < slow_v2 < v2 or v2 < 4,
                  "some but not all v2 responses were delayed")

        # 3. peak EWMA inside reviews-v1
        replicas = Counter(b.get("replica") for st, b, _ in res if b.get("version") == "v1")
        tot = max(1, sum(replicas.values()))
        rep.line(f"3. peak EWMA in reviews-v1: fast replica a {replicas['a']} "
                 f"({replicas['a'] * 100 / tot:.0f} %), 10x slower replica b {replicas['b']} "
                 f"({replicas['b'] * 100 / tot:.0f} %)")
        rep.check(replicas["b"] < replicas["a"], "the slow replica got less traffic")

        # 4. version and debug routing
        pinned = [await call(**{"x-version": "v2"}) for _ in range(10)]
        cookie = [await call(cookie="version=v2") for _ in range(10)]
        debug = [await call(**{"x-debug": "1"}) for _ in range(5)]
        rep.line("4. version and debug routing:")
        rep.line(f"     x-version: v2 -> {Counter(b.get('version') for _, b, _ in pinned)}")
        rep.line(f"     cookie version=v2 -> {Counter(b.get('version') for _, b, _ in cookie)}")
        rep.line(f"     x-debug: 1 -> {Counter(b.get('version') for _, b, _ in debug)}")
        rep.check(all(b.get("version") == "v2" for _, b, _ in pinned + cookie), "pinned to v2")
        rep.check(all(b.get("version") == "debug" for _, b, _ in debug), "debug routing")

        # 5. header-controlled aborts (listener-level fault config, on the pinned route; on the
        #    canary route the per-route config limits faults to requests bound to reviews-v2)
        aborts = [await call(**{"x-version": "v2", "x-envoy-fault-abort-request": "503"})
                  for _ in range(3)]
        rep.line(f"5. x-version: v2 + x-envoy-fault-abort-request: 503 -> "
                 f"{[(st, b.get('text')) for st, b, _ in aborts]}")
        rep.check(all(st == 503 for st, _, _ in aborts), "header-controlled aborts")

        # 6. the shadow debug cluster
        seen = {}
        end = time.monotonic() + 5
        while time.monotonic() < end:
            async with s.get(debug_url) as r:
                seen = await r.json()
            if seen["shadow"] >= n:
                break
            await asyncio.sleep(0.1)
        rep.line(f"6. shadow: the debug build received {seen['shadow']} shadow copies and "
                 f"{seen['direct']} direct requests; hosts {seen['hosts']}")
        # every canary request is mirrored (and only those: the other routes have no mirror)
        rep.check(seen["shadow"] == n, f"{n} shadow copies arrived")
        rep.check(seen["direct"] == 5, "5 direct (x-debug) requests")

        async with s.get(admin + "/stats/prometheus") as r:
            text = await r.text()
        rep.line("7. metrics:")
        for line in text.splitlines():
            if line.startswith(("sidecar_fault_injected_total", "sidecar_shadow_requests_total")):
                rep.line(f"     {line}")


async def main(free_ports: bool, n: int) -> int:
    cfg, ports = load_config(free_ports)
    listen = cfg["listeners"][0]["port"]
    admin = cfg["admin"]["port"]
    runners, _debug = await services.start(ports)
    tmp = tempfile.mkdtemp(prefix="sidecar-canary-")
    path = os.path.join(tmp, "sidecar.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    log_path = os.path.join(tmp, "sidecar.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", path,
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    rep = Report()
    try:
        await wait_http(f"http://127.0.0.1:{admin}/ready", proc)
        print(f"sidecar http://127.0.0.1:{listen}/ (admin http://127.0.0.1:{admin}/)\n", flush=True)
        await scenario(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}",
                       f"http://127.0.0.1:{ports[3]}/__shadow", n, rep)
    finally:
        stop_process(proc, timeout=10)
        log.close()
        for r in runners:
            await r.cleanup()
        if os.environ.get("SHOW_SIDECAR_LOG"):
            print(open(log_path).read())
    if rep.failures:
        print(f"\n{len(rep.failures)} check(s) failed", file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Canary rollout + fault injection + shadow demo.")
    p.add_argument("--free-ports", action="store_true", help="use free ports instead of sidecar.yaml's")
    p.add_argument("--requests", type=int, default=400, help="canary requests to send")
    a = p.parse_args()
    sys.exit(asyncio.run(main(a.free_ports, a.requests)))
