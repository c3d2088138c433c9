"""CLI: run the corpus through Envoy and the sidecar and print a table.

    python -m tests.conformance.http1_differential [-k SUBSTR] [--details]
    python -m tests.conformance.http1_differential --markdown FILE   # the per-case doc table
    python -m tests.conformance.http1_differential --envoy-variants  # which Envoy settings matter
"""

from __future__ import annotations

import argparse
import sys
import time

from .corpus import ALL
from .expected import EXPECTED, FINDINGS
from .normalise import differences, outcome, summary, verdict
from .runner import Harness, Side
from .variants import VARIANTS


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def compare_with_sidecar(args, cases) -> int:
    sides = [Side("envoy", "envoy"), Side("sidecar", "sidecar")]
    t0 = time.monotonic()
    with Harness(sides, lanes=args.lanes, log_level=args.log_level) as h:
        t1 = time.monotonic()
        results = h.run(cases)
    t2 = time.monotonic()
    counts: dict[str, int] = {}
    rows = []
    unexpected = 0
    for c in cases:
        e = outcome(c, results[c.name]["envoy"])
        s = outcome(c, results[c.name]["sidecar"])
        v = verdict(e, s)
        counts[v] = counts.get(v, 0) + 1
        listed = EXPECTED.get(c.name)
        if bool(listed) == (v == "same"):
            unexpected += 1
            flag = "  <-- not as listed in expected.py"
        else:
            flag = ""
        rows.append((c, e, s, v, listed))
        print(f"{v:9} {c.name}{'  [' + listed + ']' if listed else ''}{flag}")
        if v != "same" or flag:
            print(f"          envoy:   {summary(e)}")
            print(f"          sidecar: {summary(s)}")
            print(f"          differs: {', '.join(differences(e, s)) or '-'}")
            if args.details:
                for side in ("envoy", "sidecar"):
                    o = results[c.name][side]
                    print(f"          {side} client got: {o.client.received[:600]!r}")
                    for i, u in enumerate(o.upstream):
                        print(f"          {side} upstream conn {i}: closed={u.closed_by_proxy} "
                              f"{u.data[:600]!r}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("| case | source | Envoy 1.40 | sidecar | verdict |\n|---|---|---|---|---|\n")
            for c, e, s, v, listed in rows:
                if listed:
                    fd = FINDINGS[listed]
                    verdict_text = f"{fd.verdict} [{listed}](#{listed.lower()})"
                else:
                    verdict_text = "same" if v == "same" else f"**unlisted {v}**"
                f.write(f"| `{c.name}` | {_md(c.source)} | {_md(summary(e))} | "
                        f"{'=' if v == 'same' else _md(summary(s))} | {verdict_text} |\n")
    print(f"\n{len(cases)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + f"; {unexpected} not as listed in expected.py"
          + f"  (start {t1 - t0:.1f}s, run {t2 - t1:.1f}s)", file=sys.stderr)
    return 1 if unexpected else 0


def envoy_variants(args, cases) -> int:
    """Envoy defaults against Envoy with one field changed, a few variants per run."""
    for start in range(0, len(VARIANTS), 4):
        group = VARIANTS[start:start + 4]
        sides = [Side("default", "envoy")] + [Side(v.name, "envoy", v.hcm, v.cluster) for v in group]
        with Harness(sides, lanes=args.lanes, log_level=args.log_level) as h:
            results = h.run(cases)
        for v in group:
            changed = []
            for c in cases:
                d = outcome(c, results[c.name]["default"])
                o = outcome(c, results[c.name][v.name])
                if differences(d, o):
                    changed.append(f"  {c.name}: {summary(d)}  ->  {summary(o)}")
            print(f"\n## {v.name}: {v.field} (default {v.default}): {len(changed)} cases change")
            print("\n".join(changed))
            sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.conformance.http1_differential")
    ap.add_argument("-k", action="append", default=[], help="only cases whose name contains this")
    ap.add_argument("--lanes", type=int, default=16)
    ap.add_argument("--details", action="store_true", help="print raw bytes of differing cases")
    ap.add_argument("--markdown", metavar="FILE", help="write the per-case table as markdown")
    ap.add_argument("--envoy-variants", action="store_true",
                    help="compare Envoy's defaults with Envoy under each variant (variants.py)")
    ap.add_argument("--log-level", default="error")
    args = ap.parse_args(argv)
    cases = [c for c in ALL if not args.k or any(k in c.name for k in args.k)]
    if args.envoy_variants:
        return envoy_variants(args, cases)
    return compare_with_sidecar(args, cases)


if __name__ == "__main__":
    sys.exit(main())
