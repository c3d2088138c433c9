"""CLI: run the corpus through Envoy and the sidecar and print a table.

    python -m tests.conformance.http1_differential [-k SUBSTR] [--details]
    python -m tests.conformance.http1_differential --update-doc docs/http1-differential.md
    python -m tests.conformance.http1_differential --envoy-variants  # which Envoy settings matter
"""

from __future__ import annotations

import argparse
import sys
import time

from .corpus import ALL
from .expected import DOCUMENTED, EXPECTED, FINDINGS, FIXED_FINDINGS, STRICTER, TO_FIX
from .normalise import differences, outcome, summary, verdict
from .runner import Harness, Side
from .variants import VARIANTS


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _md(text: str) -> str:
    return text.replace("|", "\\|")


MARKER = "<!-- everything below is generated: python -m tests.conformance.http1_differential --update-doc docs/http1-differential.md -->"


def write_doc(path: str, rows, counts: dict[str, int]) -> None:
    """Replace the generated part of the doc (below MARKER): the findings with their cases,
    then every case."""
    with open(path) as f:
        text = f.read()
    if MARKER not in text:
        raise SystemExit(f"{path}: marker line not found")
    out = [text[:text.index(MARKER) + len(MARKER)], ""]
    by_finding: dict[str, list[str]] = {}
    for c, _e, _s, _v, listed in rows:
        if listed:
            by_finding.setdefault(listed, []).append(c.name)
    total = len(rows)
    same = counts.get("same", 0)
    tally = (f"{total} cases: {same} the same as Envoy, {total - same} different, each listed "
             "under one finding below (and in `expected.py`).")
    out += ["## Findings", "", tally, ""]
    for verdict_name in (TO_FIX, DOCUMENTED, STRICTER):
        group = [f for f in FINDINGS.values() if f.verdict == verdict_name and f.id in by_finding]
        n_cases = sum(len(by_finding[f.id]) for f in group)
        heading = (f"### {verdict_name.capitalize()} ({_n(len(group), 'finding')}, "
                   f"{_n(n_cases, 'case')})")
        out += [heading, ""]
        for f in group:
            names = by_finding[f.id]
            listing = ", ".join(f"`{n}`" for n in names)
            out += [f"#### {f.id}", "", f"**{f.title}** ({_n(len(names), 'case')}: {listing})", "",
                    f"- Envoy: {f.envoy}", f"- Sidecar today: {f.sidecar}",
                    f"- {'Fix' if f.verdict == TO_FIX else 'Why'}: {f.fix}", ""]
    if FIXED_FINDINGS:
        out += [f"### Fixed ({_n(len(FIXED_FINDINGS), 'finding')}: the sidecar now does what "
                "Envoy does, or the finding became a stricter one above)", ""]
        for f in FIXED_FINDINGS.values():
            out += [f"#### {f.id}", "", f"**{f.title}**", "", f"- Envoy: {f.envoy}",
                    f"- Sidecar before: {f.sidecar}", f"- Fixed by: {f.fix}", ""]
    legend = ("`statuses | client connection | upstream: [requests per upstream connection]`; "
              "`(closed)`: the proxy closed that upstream connection; `upstream: -`: nothing "
              "reached the upstream; `=`: the sidecar's outcome is Envoy's. Sources: RFC "
              "sections as \"9112 §x\", papers by author and year (see the top of this page).")
    out += ["## Every case", "", legend, "",
            "| case | source | Envoy 1.40 | sidecar | verdict |", "|---|---|---|---|---|"]
    for c, e, s, v, listed in rows:
        if listed:
            fd = FINDINGS[listed]
            verdict_text = f"{fd.verdict}: [{listed}](#{listed.lower()})"
        else:
            verdict_text = "same" if v == "same" else f"**unlisted {v}**"
        out.append(f"| `{c.name}` | {_md(c.source)} | {_md(summary(e))} | "
                   f"{'=' if v == 'same' else _md(summary(s))} | {verdict_text} |")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


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
    if args.update_doc:
        write_doc(args.update_doc, rows, counts)
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
    ap.add_argument("--update-doc", metavar="FILE",
                    help="rewrite the generated part of FILE (docs/http1-differential.md); "
                         "needs the whole corpus")
    ap.add_argument("--envoy-variants", action="store_true",
                    help="compare Envoy's defaults with Envoy under each variant (variants.py)")
    ap.add_argument("--log-level", default="error")
    args = ap.parse_args(argv)
    cases = [c for c in ALL if not args.k or any(k in c.name for k in args.k)]
    if args.update_doc and args.k:
        raise SystemExit("--update-doc documents every case: drop -k")
    if args.envoy_variants:
        return envoy_variants(args, cases)
    return compare_with_sidecar(args, cases)


if __name__ == "__main__":
    sys.exit(main())
