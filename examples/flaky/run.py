"""The flaky-upstream demo in one command: three unreliable instances of a service, the sidecar
in front of them (``sidecar.yaml``, or its Envoy twin ``envoy.yaml``), a few seconds of load,
then a report: the same traffic with no protection (``/direct/``) and with retries, per-try
timeouts, outlier detection, active health checks and a retry budget (``/``).

    python -m examples.flaky                  # native config, the ports in sidecar.yaml
    python -m examples.flaky --envoy          # the Envoy v3 twin
    python -m examples.flaky --free-ports     # any free ports (CI)
    python -m examples.flaky --duration 15 --concurrency 16
    python -m examples.flaky --upstreams-only # just the flaky instances, for `sidecar run -c ...`

Exits 1 if the protected route did not do what the config promises.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import aiohttp  # noqa: E402

from examples.flaky import services  # noqa: E402
from sidecar.shared.testing import free_port  # noqa: E402

DEFAULT_PORTS = {"listener": 10001, "admin": 9902, "steady": 18081, "flaky": 18082, "broken": 18083}




def config_text(envoy: bool, ports: dict[str, int]) -> str:
    """The example config, with its ports replaced when they differ from the defaults."""
    with open(os.path.join(HERE, "envoy.yaml" if envoy else "sidecar.yaml")) as f:
        text = f.read()
    for key, default in DEFAULT_PORTS.items():
        if ports[key] != default:
            text = re.sub(rf"\b{default}\b", str(ports[key]), text)
    return text


def load_snapshot(envoy: bool, ports: dict[str, int]):
    from sidecar.runtime.loader import parse_text, snapshot_from_doc
    return snapshot_from_doc(parse_text(config_text(envoy, ports), "envoy.yaml" if envoy else "sidecar.yaml"))


async def load(base: str, path: str, duration: float, concurrency: int) -> list[tuple[int, float]]:
    """``concurrency`` clients sending requests to ``path`` for ``duration`` seconds."""
    out: list[tuple[int, float]] = []
    end = time.monotonic() + duration
    timeout = aiohttp.ClientTimeout(total=5)

    async def client(s: aiohttp.ClientSession, i: int) -> None:
        n = 0
        while time.monotonic() < end:
            t = time.monotonic()
            try:
                async with s.get(f"{base}{path}item-{i}-{n}") as r:
                    await r.read()
                    out.append((r.status, time.monotonic() - t))
            except (TimeoutError, aiohttp.ClientError):
                out.append((0, time.monotonic() - t))
            n += 1
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(client(s, i) for i in range(concurrency)))
    return out


def summarize(results: list[tuple[int, float]]) -> dict:
    statuses = Counter(s for s, _ in results)
    lat = sorted(t for _, t in results) or [0.0]
    n = len(results)
    return {"requests": n, "ok": statuses.get(200, 0),
            "success_rate": statuses.get(200, 0) / n if n else 0.0,
            "statuses": dict(statuses), "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000}


def metric_lines(text: str, *prefixes: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith(prefixes) and not line.endswith(" 0.0") and 'cluster="catalog"' in line]


async def run(envoy: bool = False, free_ports: bool = False, duration: float = 8.0,
              concurrency: int = 8, quiet: bool = False) -> dict:
    """Start everything, drive load, print and return the report."""
    from sidecar.admin.server import start_admin
    from sidecar.runtime.app import App

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    ports = {k: (free_port() if free_ports else v) for k, v in DEFAULT_PORTS.items()}
    insts = services.instances([ports["steady"], ports["flaky"], ports["broken"]],
                               broken_from=min(1.0, duration / 8), broken_for=duration / 2)
    runners = await services.start(insts)
    app = App(load_snapshot(envoy, ports), metrics_enabled=True, watch_config=False,
              admin=start_admin)
    await app.start(admin=True)
    base = f"http://127.0.0.1:{ports['listener']}"
    admin = f"http://127.0.0.1:{app.admin_port}"
    try:
        say(f"\n  flaky-upstream demo ({'Envoy v3' if envoy else 'native'} config), "
            f"{duration:.0f}s of load with {concurrency} clients per route\n"
            f"  instances: steady :{ports['steady']}, flaky :{ports['flaky']} (25% 503, 5% hang), "
            f"broken :{ports['broken']} (503 from {insts[2].broken_from:.1f}s "
            f"to {insts[2].broken_until:.1f}s)\n")
        raw, protected = await asyncio.gather(load(base, "/direct/", duration, concurrency),
                                              load(base, "/", duration, concurrency))
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{admin}/stats/prometheus") as r:
                prom = await r.text()
            async with s.get(f"{admin}/clusters?format=json") as r:
                view = await r.json()
        report = {"unprotected": summarize(raw), "protected": summarize(protected),
                  "instances": {i.name: {"served": i.served, "failed": i.failed, "hung": i.hung,
                                         "health_checks": i.health_checks} for i in insts}}
        for name in ("unprotected", "protected"):
            r = report[name]
            say(f"  {name:12s} {r['requests']:5d} requests  {100 * r['success_rate']:6.2f}% ok  "
                f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:7.1f} ms  statuses {r['statuses']}")
        say("\n  what the sidecar did (from /stats/prometheus):")
        for line in metric_lines(prom, "sidecar_upstream_rq_retry_total", "sidecar_upstream_rq_per_try_timeout_total",
                                 "sidecar_upstream_rq_timeout_total", "sidecar_upstream_outlier_ejections",
                                 "sidecar_upstream_outlier_unejections", "sidecar_upstream_health_check_total",
                                 "sidecar_upstream_health_check_transitions", "sidecar_upstream_rq_overflow_total"):
            say(f"    {line}")
        cat = next(c for c in view["clusters"] if c["name"] == "catalog")
        say("\n  catalog hosts now (from /clusters):")
        for h in cat["hosts"]:
            say(f"    {h['address']:>16s}  {h['health_flags']:22s} ejections={h['ejections']} "
                f"rq_total={h['rq_total']} rq_error={h['rq_error']} active_hc={h['active_hc']}")
        say("")
        return report
    finally:
        await app.close()
        await services.stop(runners)


async def upstreams_only(free_ports: bool) -> None:
    ports = {k: (free_port() if free_ports else v) for k, v in DEFAULT_PORTS.items()}
    insts = services.instances([ports["steady"], ports["flaky"], ports["broken"]],
                               broken_from=10.0, broken_for=20.0)
    runners = await services.start(insts)
    print(f"flaky instances on :{ports['steady']} :{ports['flaky']} :{ports['broken']} "
          f"('broken' fails from 10s to 30s). Now: sidecar run -c examples/flaky/sidecar.yaml "
          f"and curl localhost:{ports['listener']}/item   (Ctrl-C to stop)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await services.stop(runners)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.flaky", description=__doc__.split("\n\n")[0])
    ap.add_argument("--envoy", action="store_true", help="use the Envoy v3 twin (envoy.yaml)")
    ap.add_argument("--free-ports", action="store_true", help="pick free ports instead of the config's")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of load (default 8)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients per route (default 8)")
    ap.add_argument("--upstreams-only", action="store_true", help="only run the flaky instances")
    args = ap.parse_args(argv)
    if args.upstreams_only:
        try:
            asyncio.run(upstreams_only(args.free_ports))
        except KeyboardInterrupt:
            pass
        return 0
    report = asyncio.run(run(args.envoy, args.free_ports, args.duration, args.concurrency))
    ok = report["protected"]["success_rate"] >= 0.99 and \
        report["protected"]["success_rate"] > report["unprotected"]["success_rate"]
    print("  OK: the protected route hid the flaky upstreams" if ok else
          "  UNEXPECTED: the protected route failed more than 1% of requests", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
