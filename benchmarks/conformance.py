"""Conformance table: every upstream case through the emulator, judged by the upstream rule.

    python benchmarks/conformance.py [--json out.json] [CASE ...]

Columns: expected and reproduced outcome, upstream match %, strict match % (atol = rtol = 0.02
in bf16), max / mean abs error, relative L2, dynamic instructions and non-HBM cycles (with the
reference's counts from expected.json), wall time (load + compile + run).
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from plena.verify.conformance import list_cases, load_case
from plena.verify.run_case import run_case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    names = args.cases or list_cases()
    if not names:
        print("no conformance corpus found (../shared/conformance)", file=sys.stderr)
        return 1
    t = Table("case", "expected", "got", "ok", "upstream %", "strict %", "max abs", "mean abs", "rel L2",
              "dyn instr (ref)", "cycles (ref)", "wall s", title="PLENA conformance")
    rows = []
    for name in names:
        r = run_case(load_case(name))
        v, res, case = r.verdict, r.result, r.case
        row = dict(case=name, expected=case.outcome, got=r.outcome, reproduced=r.reproduced, why=r.why,
                   upstream_pct=v.upstream_match_pct if v else None, strict_pct=v.strict_match_pct if v else None,
                   max_abs=v.max_abs if v else None, mean_abs=v.mean_abs if v else None,
                   rel_l2=v.rel_l2 if v else None,
                   instructions=res.instructions if res else None, ref_instructions=case.dynamic_instructions,
                   cycles=res.cycles if res else None, ref_cycles=case.non_hbm_cycles, wall_s=r.wall_s,
                   error=str(r.error) if r.error else None)
        rows.append(row)
        fmt = lambda x, f: "-" if x is None or x != x else f.format(x)  # noqa: E731
        t.add_row(name, case.outcome, r.outcome, "yes" if r.reproduced else "[red]NO[/]",
                  fmt(row["upstream_pct"], "{:.2f}"), fmt(row["strict_pct"], "{:.2f}"),
                  fmt(row["max_abs"], "{:.3g}"), fmt(row["mean_abs"], "{:.3g}"), fmt(row["rel_l2"], "{:.3g}"),
                  f"{fmt(row['instructions'], '{}')} ({case.dynamic_instructions})",
                  f"{fmt(row['cycles'], '{}')} ({case.non_hbm_cycles})", f"{r.wall_s:.2f}")
    con = Console(width=200)
    con.print(t)
    n_ok = sum(r["reproduced"] for r in rows)
    counts_ok = sum(r["instructions"] in (None, r["ref_instructions"]) and r["cycles"] in (None, r["ref_cycles"])
                    for r in rows)
    strict_full = sum(r["expected"] == "pass" and r["strict_pct"] == 100.0 for r in rows)
    con.print(f"summary: {n_ok}/{len(rows)} outcomes reproduced; {counts_ok}/{len(rows)} dynamic-instruction "
              f"and cycle counts equal the reference's; {strict_full} pass cases at 100 % strict match; "
              f"total wall {sum(r['wall_s'] for r in rows):.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if n_ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
