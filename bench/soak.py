"""Memory over a long run (issue 9: no growth over 10 minutes).

    python -m bench.soak [--minutes 10]

Starts an nginx upstream and the sidecar (same Envoy-format config as bench.run, one worker,
pinned like bench.run), drives wrk -c50 for the whole time in 30 s slices and prints the
sidecar's RSS after each slice, then the growth between the first and the second half.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import configs
from bench.procs import ProcessGroup, free_port, pin_prefix, rss_kb, wait_http_ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--slice", type=float, default=30.0, help="seconds per wrk run")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    up, lp, admin = free_port(), free_port(), free_port()
    procs = ProcessGroup(tmp)
    try:
        (tmp / "files").mkdir()
        nginx_conf = tmp / "nginx.conf"
        nginx_conf.write_text(configs.nginx_upstream_conf(tmp, up, tmp / "files"))
        procs.start("nginx", ["nginx", "-c", str(nginx_conf), "-p", str(tmp)], cores="1")
        cfg = configs.basic_config(lp, admin, up)
        path = tmp / "sidecar.yaml"
        path.write_text(cfg.text)
        sc = procs.start("sidecar", [sys.executable, "-m", "sidecar", "run", "-c", str(path),
                                     "--concurrency", "1", "--log-level", "warning"], cores="0")
        wait_http_ok(sc, f"http://127.0.0.1:{lp}{cfg.path}")
        series = [(0.0, rss_kb(sc.pid) / 1024)]
        start = time.monotonic()
        total = 0
        while time.monotonic() - start < a.minutes * 60:
            out = subprocess.run(pin_prefix("1") + ["wrk", "-t1", "-c50", f"-d{int(a.slice)}s",
                                                    f"http://127.0.0.1:{lp}{cfg.path}"],
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                if line.strip().startswith("Requests/sec"):
                    total += float(line.split()[1]) * a.slice
            series.append((time.monotonic() - start, rss_kb(sc.pid) / 1024))
            print(f"  t={series[-1][0]:6.0f}s  RSS {series[-1][1]:6.1f} MB  "
                  f"({total / 1e6:.2f} M requests so far)", flush=True)
    finally:
        procs.stop_all()
    half = len(series) // 2
    first = max(r for _, r in series[1:half + 1]) if half else series[-1][1]
    second = max(r for _, r in series[half + 1:]) if len(series) > half + 1 else series[-1][1]
    print(f"idle {series[0][1]:.1f} MB; peak first half {first:.1f} MB, second half {second:.1f} MB; "
          f"growth {second - first:+.1f} MB over {series[-1][0] / 60:.1f} min, "
          f"{total / 1e6:.1f} M requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
