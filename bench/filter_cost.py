"""What a user filter costs: req/s through the sidecar with no filter, with one empty user
filter (``async (req, next) -> await next(req)``, loaded from a file as users load theirs),
and with three, in one run against the same nginx upstream.

    python -m bench.filter_cost                 # 10 s per measurement
    python -m bench.filter_cost --duration 5 --json out.json

One sidecar process per variant (``--concurrency 1``), pinned to the proxy core; the nginx
upstream and wrk on the load core (``--no-pin`` to disable). The variants run in turn, each
after a warm-up, and the order is repeated ``--rounds`` times (the best of each is reported,
which discounts the shared machine's noise rather than hiding the filter's cost). The ratio is
req/s with the filter(s) over req/s without; the target is a cost under 5% per filter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import configs
from bench.procs import ProcessGroup, cpu_count, free_port, tree_cpu_seconds, wait_http_ok
from bench.run import parse_wrk

REPO = Path(__file__).resolve().parent.parent

EMPTY_FILTER = '''
from sidecar import sdk


class Empty(sdk.UserFilter):
    """Does nothing: measures what the user-filter machinery itself costs."""

    async def __call__(self, req, next):
        return await next(req)
'''


def sidecar_config(listen: int, admin: int, upstream: int, filters: int, module: Path) -> dict:
    return {
        "admin": {"address": "127.0.0.1", "port": admin},
        "listeners": [{
            "name": "bench", "address": "127.0.0.1", "port": listen,
            "filters": [{"python": {"name": f"empty{i}", "module": str(module), "class": "Empty"}}
                        for i in range(filters)],
            "routes": [{"match": {"prefix": "/"}, "cluster": "up"}]}],
        "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{upstream}"]}],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--json", help="write the results here too")
    a = p.parse_args(argv)
    pin = not a.no_pin and cpu_count() >= 2
    proxy_core, load_core = ("0", "1") if pin else (None, None)
    work = Path(tempfile.mkdtemp(prefix="filter-cost-"))
    group = ProcessGroup(work)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    variants = (("no filter", 0), ("1 empty user filter", 1), ("3 empty user filters", 3))
    best: dict[str, dict] = {}
    try:
        files = work / "files"
        configs.write_body_files(files, {})
        up_port = free_port()
        d = work / "nginx"
        d.mkdir()
        conf = d / "nginx.conf"
        conf.write_text(configs.nginx_upstream_conf(d, up_port, files))
        up = group.start("nginx", ["nginx", "-p", str(d), "-c", str(conf), "-e", "stderr"],
                         cores=load_core)
        wait_http_ok(up, f"http://127.0.0.1:{up_port}/", 15)
        module = work / "empty_filter.py"
        module.write_text(EMPTY_FILTER)
        for _ in range(a.rounds):
            for name, n in variants:
                listen, admin = free_port(), free_port()
                cfg = work / f"sidecar-{n}.yaml"
                cfg.write_text(yaml.safe_dump(sidecar_config(listen, admin, up_port, n, module)))
                proxy = group.start(f"sidecar-{n}", [sys.executable, "-m", "sidecar", "run", "-c",
                                                     str(cfg), "--concurrency", "1",
                                                     "--log-level", "error"],
                                    cores=proxy_core, env=env, cwd=str(REPO))
                wait_http_ok(proxy, f"http://127.0.0.1:{listen}/", 30)
                for duration in (a.warmup, a.duration):
                    cpu0 = tree_cpu_seconds(proxy.pid)
                    wrk = group.start("wrk", ["wrk", "-t1", f"-c{a.connections}",
                                              f"-d{max(1, round(duration))}s", "--latency",
                                              f"http://127.0.0.1:{listen}/"], cores=load_core)
                    wrk.proc.wait(duration + 60)
                    group.stop(wrk)
                    cpu = tree_cpu_seconds(proxy.pid) - cpu0
                res = parse_wrk(wrk.log.read_text(errors="replace"))
                # CPU time per request is far less disturbed by a busy machine than req/s
                res["cpu_us_per_req"] = cpu / res["requests"] * 1e6 if res["requests"] else 0.0
                group.stop(proxy)
                if name not in best or res["cpu_us_per_req"] < best[name]["cpu_us_per_req"]:
                    best[name] = res
                time.sleep(0.5)
    finally:
        group.stop_all()
    base = best["no filter"]["rps"]
    base_cpu = best["no filter"]["cpu_us_per_req"]
    micro = micro_cost()
    rows = []
    print(f"filter cost ({'pinned: proxy core 0, load core 1' if pin else 'not pinned'}; "
          f"{a.duration:.0f} s per run, best of {a.rounds}; the machine is shared: the "
          "numbers are indicative)")
    print(f"{'variant':24} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} "
          f"{'CPU us/req':>10} {'CPU +%/filter':>13}")
    for name, n in variants:
        r = best[name]
        ratio = r["rps"] / base if base else float("nan")
        per = (r["cpu_us_per_req"] / base_cpu - 1) / n * 100 if n and base_cpu else 0.0
        rows.append({"variant": name, "filters": n, **r, "ratio": ratio,
                     "cpu_cost_per_filter_percent": per})
        print(f"{name:24} {r['rps']:9.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {ratio:6.3f} "
              f"{r['cpu_us_per_req']:10.1f} {per:12.1f}%"
              + (f"   (errors: {r['errors']})" if r["errors"] else ""))
    print(f"in-process: one empty user filter adds {micro:.2f} us of CPU per request "
          f"({micro / base_cpu * 100:.1f}% of the {base_cpu:.0f} us a proxied request costs "
          "without it)")
    rows.append({"variant": "in-process", "us_per_filter": micro})
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


def micro_cost(n: int = 200_000) -> float:
    """CPU microseconds one empty user filter adds to a request, in process: the guarded
    filter as a route builds it, around a ``next`` that answers at once, versus that ``next``
    alone."""
    import asyncio

    from sidecar import sdk
    from sidecar.testing import build_user_filter, make_request

    class Empty(sdk.UserFilter):
        async def __call__(self, req, next):
            return await next(req)

    resp = sdk.Response(200)

    async def upstream(req: sdk.Request) -> sdk.Response:
        return resp

    async def run() -> float:
        f = build_user_filter(Empty)
        req = make_request()

        async def bound(r: sdk.Request) -> sdk.Response:     # BoundFilter's shape
            return await f(r, upstream)

        timings = []
        for handler in (upstream, bound, upstream, bound):
            t0 = time.process_time()
            for _ in range(n):
                await handler(req)
            timings.append(time.process_time() - t0)
        bare = min(timings[0], timings[2])
        filtered = min(timings[1], timings[3])
        return (filtered - bare) / n * 1e6

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
