"""How long a config update with 1,000 clusters takes to apply (issue 9: under 1 s).

    python -m bench.update_scale [--clusters 1000] [--endpoints 3]

Builds the snapshot from native YAML text (parse + validate + translate), then applies it to
a running App twice: first from empty, then an update that changes every cluster's endpoints
(the case a control plane pushes), and prints each phase's time.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import yaml


def config(n: int, eps: int, base_port: int) -> dict:
    clusters = [{"name": f"svc{i}", "endpoints": [f"127.0.0.1:{base_port + i * eps + j}" for j in range(eps)]}
                for i in range(n)]
    routes = [{"match": {"prefix": f"/svc{i}/"}, "cluster": f"svc{i}"} for i in range(n)]
    return {"admin": {"port": 0}, "listeners": [{"name": "l", "port": 0, "routes": routes}],
            "clusters": clusters}


async def main(n: int, eps: int) -> None:
    from sidecar.runtime.app import App
    from sidecar.runtime.loader import parse_text, snapshot_from_doc

    rows = []
    text = yaml.safe_dump(config(n, eps, 20000))
    t0 = time.perf_counter()
    snap = snapshot_from_doc(parse_text(text))
    rows.append(("parse + validate (YAML text -> Snapshot)", time.perf_counter() - t0))
    app = App(snap, watch_config=False)
    t0 = time.perf_counter()
    await app.start(admin=False)
    rows.append((f"first apply ({n} clusters, {n} routes, bind)", time.perf_counter() - t0))
    text2 = yaml.safe_dump(config(n, eps, 30000))
    t0 = time.perf_counter()
    snap2 = snapshot_from_doc(parse_text(text2))
    t1 = time.perf_counter()
    await app.store.apply(snap2)
    t2 = time.perf_counter()
    rows.append(("update: parse + validate", t1 - t0))
    rows.append(("update: apply (reconcile clusters, compile routes, swap)", t2 - t1))
    rows.append(("update: total", t2 - t0))
    await app.close()
    for name, s in rows:
        print(f"{name:60s} {s * 1000:8.1f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=3)
    a = ap.parse_args()
    asyncio.run(main(a.clusters, a.endpoints))
