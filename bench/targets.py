"""Issue 18's verdicts from one ``bench.run`` result: each feature's cost as a ratio to the
bare router, and each target met or not, as Markdown ready to paste into docs/performance.md.
The rows are ``bench.run.Row`` objects (read by attribute only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Row = Any   # bench.run.Row (not imported: bench.run imports this module)

FEATURE_SCENARIOS = ("metrics off", "tracing 1%", "access log", "jwt_authn", "fault 0%",
                     "retry policy", "filters")


def _get(rows: Sequence[Row], target: str, scenario: str) -> Row | None:
    return next((r for r in rows if r.target == target and r.scenario == scenario
                 and r.requests), None)


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def feature_costs(rows: Sequence[Row]) -> list[str]:
    """req/s and CPU per request of each feature scenario over the same proxy's base."""
    out = ["| feature | sidecar req/s vs its base | sidecar CPU/req vs its base | "
           "envoy req/s vs its base | envoy CPU/req vs its base | sidecar/envoy req/s | "
           "sidecar RSS idle / load MB |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    bases = {t: _get(rows, t, "base") for t in ("sidecar", "envoy")}
    for name in FEATURE_SCENARIOS:
        cells = []
        got = {t: _get(rows, t, name) for t in ("sidecar", "envoy")}
        if not any(got.values()):
            continue
        for t in ("sidecar", "envoy"):
            r, b = got[t], bases[t]
            if r is None or b is None:
                cells += ["-", "-"]
                continue
            cells.append(f"{r.rps / b.rps:.2f}x")
            cells.append(f"{r.cpu_s_per_1k / b.cpu_s_per_1k:.2f}x"
                         if r.cpu_s_per_1k and b.cpu_s_per_1k else "-")
        s, e = got["sidecar"], got["envoy"]
        cells.append(f"{s.rps / e.rps:.2f}x" if s and e else "-")
        cells.append(f"{s.rss_idle_kb / 1024:.1f} / {s.rss_load_kb / 1024:.1f}"
                     if s and s.rss_idle_kb and s.rss_load_kb else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("Ratios within this run: < 1.00x req/s (> 1.00x CPU) is what the feature costs; "
               "RSS: a feature's modules load only when a config uses it.")
    return out


def issue18_targets(rows: Sequence[Row], rates: Sequence[int], soak: str) -> list[str]:
    out = ["| target | sidecar | envoy | result | met? |", "|---|---:|---:|---|---|"]

    def row(target: str, sc: str, en: str, result: str, ok: bool | None) -> None:
        out.append(f"| {target} | {sc} | {en} | {result} | "
                   f"{'-' if ok is None else ('yes' if ok else '**no**')} |")

    for scen, label in (("base", "24 B"), ("100B body", "100 B"), ("10KB body", "10 KB")):
        for target, form in (("sidecar", ""), ("sidecar-mypyc", " (mypyc-compiled hot modules)")):
            s, e = _get(rows, target, scen), _get(rows, "envoy", scen)
            if not (s and e):
                continue
            ratio = s.rps / e.rps
            cpu = (e.cpu_s_per_1k / s.cpu_s_per_1k) if s.cpu_s_per_1k and e.cpu_s_per_1k else None
            row(f"1. bare router req/s >= 1.5x Envoy, {label} body{form}", f"{s.rps:,.0f}",
                f"{e.rps:,.0f}", f"{ratio:.2f}x req/s; {_f(cpu)}x requests per CPU-second",
                ratio >= 1.5)
    s, e, d = _get(rows, "sidecar", "base"), _get(rows, "envoy", "base"), _get(rows, "direct", "base")
    for target in ("sidecar", "sidecar-mypyc"):
        s = _get(rows, target, "base")
        if not (s and e and d):
            continue
        for rate in rates:
            so, eo, do = s.open_loop.get(rate), e.open_loop.get(rate), d.open_loop.get(rate)
            if not (so and eo and do):
                continue
            sp50, sp99 = so.p50_ms - do.p50_ms, so.p99_ms - do.p99_ms
            ep50, ep99 = eo.p50_ms - do.p50_ms, eo.p99_ms - do.p99_ms
            row(f"3. added latency at {rate} req/s (p50 / p99 over direct, ms)"
                + (" (mypyc)" if target == "sidecar-mypyc" else ""),
                f"{sp50:.2f} / {sp99:.2f}", f"{ep50:.2f} / {ep99:.2f}",
                "no worse than Envoy" if sp50 <= ep50 and sp99 <= ep99 else "worse than Envoy",
                sp50 <= ep50 and sp99 <= ep99)
    s = _get(rows, "sidecar", "base")
    if s and s.rss_idle_kb:
        idle = s.rss_idle_kb / 1024
        row("4a. idle RSS <= 40 MB", f"{idle:.1f} MB",
            f"{e.rss_idle_kb / 1024:.1f} MB" if e and e.rss_idle_kb else "-", "", idle <= 40)
        bare = [r for r in rows if r.target.startswith("sidecar") and r.rss_load_kb
                and (r.scenario in ("base", "metrics off") or r.scenario.endswith(" body"))]
        peak = max(r.rss_load_kb for r in bare) / 1024
        epeak = max((r.rss_load_kb or 0) for r in rows if r.target == "envoy"
                    and (r.scenario == "base" or r.scenario.endswith(" body"))) / 1024
        row("4b. RSS under load <= 60 MB (bare router: peak over base and bodies)",
            f"{peak:.1f} MB", f"{epeak:.1f} MB" if epeak else "-", "", peak <= 60)
    if soak:
        growth = None
        if "growth" in soak:
            try:
                growth = float(soak.split("growth")[1].split("MB")[0])
            except ValueError:
                growth = None
        row("4c. no growth over a 10-minute soak", "", "", soak, None if growth is None
            else growth <= 0.5)
    row("5. cost of each feature as a ratio", "", "", "see the feature table", None)
    return out
