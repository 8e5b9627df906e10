"""Throughput of one program over many input sets: a batched run vs sequential runs.

    python benchmarks/batch.py [--case aten_linear] [--batch 64] [--executor auto|interpreter|fast] [--json out.json]

Each input set is the case's HBM image with its MX element bytes randomised (scales kept).
Prints compile and run time of both ways, the throughput ratio (target >= 20x for 64 sets),
and checks that every batched result equals its sequential run bit for bit.

``--executor`` is passed to ``plena.emu_jax.api.run`` (the sequential runs) and to
``plena.emu_jax.batch.run_batch`` as ``executor=``, for each function whose signature has that
argument; where it has none (the fast executor has not landed), that side runs its default
executor and the output says so.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import numpy as np

from plena.config import load_config
from plena.emu_jax import files
from plena.emu_jax.api import run
from plena.emu_jax.batch import run_batch
from plena.isa import read_mem
from plena.verify.conformance import load_case


def input_sets(case, n, seed=0):
    hbm = files.read_bytes(case.hbm_bin)
    elem = np.zeros(len(hbm), bool)
    for t in case.manifest["hbm"]["tensors"]:
        off, nbytes = t.get("elem_offset"), t.get("elem_bytes")
        if off is not None and nbytes:
            elem[off:off + nbytes] = True
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h = hbm.copy()
        rand = rng.integers(0, 0x78, len(h), dtype=np.uint8) | (rng.integers(0, 2, len(h), dtype=np.uint8) << 7)
        h[elem] = rand[elem]
        out.append(h)
    return out


def executor_kwargs(fn, executor: str) -> dict:
    """``{"executor": executor}`` if ``fn`` accepts it, else ``{}``."""
    return {"executor": executor} if "executor" in inspect.signature(fn).parameters else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="aten_linear")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--executor", default="auto", help="auto (default), interpreter or fast")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    seq_kw, batch_kw = executor_kwargs(run, args.executor), executor_kwargs(run_batch, args.executor)
    notes = [f"{what} has no executor= argument: it ran its default executor"
             for what, kw in (("api.run", seq_kw), ("run_batch", batch_kw)) if args.executor != "auto" and not kw]
    case = load_case(args.case)
    cfg = load_config(case.settings_toml)
    words = read_mem(case.program_mem)
    fps = files.load_fpsram(case.fp_sram_bin)
    ints = files.load_intsram(case.int_sram_bin) if case.int_sram_bin else None
    sets = input_sets(case, args.batch)

    run(words, cfg, hbm=sets[0], fpsram=fps, intsram=ints, hbm_size=case.hbm_size, **seq_kw)  # compile once
    t0 = time.perf_counter()
    singles = [run(words, cfg, hbm=h, fpsram=fps, intsram=ints, hbm_size=case.hbm_size, **seq_kw) for h in sets]
    seq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = run_batch(words, cfg, hbm=sets, fpsram=[fps] * len(sets), intsram=ints, hbm_size=case.hbm_size,
                      **batch_kw)
    batch_total = time.perf_counter() - t0
    identical = all(np.array_equal(batch.dumps(i).vram, s.dumps().vram) for i, s in enumerate(singles))
    n_instr = singles[0].instructions
    row = dict(case=args.case, batch=args.batch, instructions_per_set=n_instr, sequential_s=seq_s,
               batch_compile_s=batch.compile_s, batch_run_s=batch.run_s, batch_total_s=batch_total,
               ratio_run=seq_s / batch.run_s, ratio_total=seq_s / batch_total, identical=identical,
               executor=args.executor, notes=notes)
    print(f"{'case':14s} {'sets':>5s} {'instr/set':>9s} {'sequential s':>12s} {'batch run s':>11s} "
          f"{'batch compile s':>15s} {'ratio (run)':>11s} {'ratio (incl. compile)':>21s} identical")
    print(f"{args.case:14s} {args.batch:5d} {n_instr:9d} {seq_s:12.3f} {batch.run_s:11.3f} {batch.compile_s:15.2f} "
          f"{row['ratio_run']:10.1f}x {row['ratio_total']:20.1f}x {identical}")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=1)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
