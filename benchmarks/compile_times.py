"""Fast-executor compile time of every conformance program (the "compile <= 10 s for any
conformance program" target of the fast-executor issue).

    python benchmarks/compile_times.py [--repeat 1] [--json out.json] [CASE ...]

Each case runs ``--repeat`` times, each time in a fresh subprocess with the persistent XLA
cache off (``PLENA_JAX_CACHE=off``), through ``plena.emu_jax.api.run(..., executor="fast")``
with the case's files and settings, exactly as ``benchmarks/executors.py`` measures its
conformance workloads: compile s = wall time of the first call minus its execution time
(pre-pass, scheduling, tracing and XLA compile of the blocks, the one-instruction steps and,
for long cold code, the interpreter). Panicking cases (EXPECTED.md) are timed up to the error
they raise.

Columns: static and dynamic instructions; the schedule (compiled blocks: distinct / steps,
one-instruction steps, interpreter steps); compile s (the worst of the repeats, then every
repeat); run s (the first call's execution). The target line holds when the worst compile of
every case is at most 10 s. Timings on a shared 2-core machine are noisy: compare rows of one
run, and use ``--repeat`` to see the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 10.0


def child(case_name: str, out_path: str) -> None:
    from plena.config import load_config
    from plena.emu_jax import fast, files
    from plena.emu_jax.api import run
    from plena.emu_jax.errors import PlenaError
    from plena.isa import read_mem
    from plena.verify.conformance import load_case

    case = load_case(case_name)
    cfg = load_config(case.settings_toml)
    kw = dict(hbm=files.read_bytes(case.hbm_bin), fpsram=files.load_fpsram(case.fp_sram_bin),
              intsram=files.load_intsram(case.int_sram_bin) if case.int_sram_bin else None,
              vram=files.load_vram(case.vram_preload) if case.vram_preload else None, hbm_size=case.hbm_size)
    words = read_mem(case.program_mem)
    made = []
    real_prepare = fast.prepare

    def prepare(*args, **kwargs):  # keep the schedule for the table
        ex = real_prepare(*args, **kwargs)
        made.append(ex)
        return ex

    fast.prepare = prepare
    out = dict(static=len(words))
    t0 = time.perf_counter()
    try:
        r = run(words, cfg, executor="fast", **kw)
        first = time.perf_counter() - t0
        out.update(dynamic=r.instructions, compile_s=first - r.run_s, run_s=r.run_s, executor=r.executor)
    except PlenaError as exc:
        out.update(compile_s=time.perf_counter() - t0, run_s=None, error=str(exc).splitlines()[0])
    if made and made[-1] is not None:
        steps = made[-1].steps
        blocks = [s for s in steps if isinstance(s, fast.Block) and not fast._one_instruction(s)]
        out.update(blocks=len({s.sig for s in blocks}), block_steps=len(blocks),
                   one_steps=sum(fast._one_instruction(s) for s in steps),
                   interp_steps=sum(isinstance(s, fast.Interp) for s in steps))
    Path(out_path).write_text(json.dumps(out))


def measure(case_name: str) -> dict:
    env = dict(os.environ, PLENA_JAX_CACHE="off")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", case_name, path], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        return json.loads(Path(path).read_text() or "{}") if proc.returncode == 0 else \
            dict(failed=(proc.stderr.strip().splitlines() or ["?"])[-1])
    finally:
        Path(path).unlink(missing_ok=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--repeat", type=int, default=1, help="fresh-process measurements per case")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from plena.verify.conformance import list_cases

    names = args.cases or list_cases()
    if not names:
        print("no conformance corpus found (../shared/conformance)", file=sys.stderr)
        return 1
    rows = []
    for name in track(names, description="compiling", transient=True):
        runs = [measure(name) for _ in range(args.repeat)]
        good = [r for r in runs if "failed" not in r]
        row = dict(case=name, runs=runs, worst_compile_s=max((r["compile_s"] for r in good), default=None))
        if good:
            row.update({k: good[0].get(k) for k in ("static", "dynamic", "blocks", "block_steps", "one_steps",
                                                     "interp_steps", "run_s", "error")})
        rows.append(row)
    t = Table("case", "static", "dynamic", "blocks (steps)", "1-instr steps", "interp steps", "compile s (worst)",
              "compile s (each)", "run s", "note", title="fast executor: compile time per conformance program")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        w = r["worst_compile_s"]
        t.add_row(r["case"], fmt(r.get("static"), "d"), fmt(r.get("dynamic"), "d"),
                  f"{fmt(r.get('blocks'), 'd')} ({fmt(r.get('block_steps'), 'd')})", fmt(r.get("one_steps"), "d"),
                  fmt(r.get("interp_steps"), "d"),
                  "-" if w is None else (f"[red]{w:.2f}[/]" if w > TARGET_S else f"{w:.2f}"),
                  " ".join(fmt(x.get("compile_s"), ".2f") for x in r["runs"]), fmt(r.get("run_s"), ".4f"),
                  (r.get("error") or next((x["failed"] for x in r["runs"] if "failed" in x), ""))[:60])
    con = Console(width=220)
    con.print(t)
    worst = max(rows, key=lambda r: -1 if r["worst_compile_s"] is None else r["worst_compile_s"])
    failed = [r["case"] for r in rows if r["worst_compile_s"] is None]
    ok = not failed and worst["worst_compile_s"] <= TARGET_S
    con.print(f"target compile <= {TARGET_S:.0f} s for every conformance program: "
              f"{'PASS' if ok else 'FAIL'} (worst {worst['case']} {fmt(worst['worst_compile_s'], '.2f')} s over "
              f"{args.repeat} run(s) each; median of the worst per case "
              f"{sorted(r['worst_compile_s'] or 0 for r in rows)[len(rows) // 2]:.2f} s"
              + (f"; no measurement: {', '.join(failed)}" if failed else "") + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, target_passed=ok), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
