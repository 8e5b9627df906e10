"""End-to-end demo behind ``plena demo`` / ``python -m plena.demo``: a Llama-family decoder with
seeded random weights (shape of a :data:`plena.frontend.model.PRESETS` model), compiled with
:func:`plena.frontend.model.compile_decoder`, run on the JAX emulator, and compared stage by
stage with the golden model (:func:`plena.golden.llama.decoder`) in hardware mode (bit-exact
share) and fp32 mode (relative L2 error of the machine's numerics), with
:mod:`plena.verify.stages` (which also names the first diverging element, if any).

The last line printed is always::

    demo: layers=N bit_exact=<pct>% rel_l2_fp32=<x> emulate_s=<t> instructions=<n>

(``bit_exact``: share of all compared intermediate elements whose bits equal the hardware
golden; ``rel_l2_fp32``: of the final output against the fp32 golden; ``instructions``:
executed instructions.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

import numpy as np


MODELS = ("clm-60m", "smollm2-135m")  #: = sorted(plena.frontend.model.PRESETS), without importing it


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options (shared by ``python -m plena.demo`` and ``plena demo``)."""
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--seq", type=int, default=64, help="tokens, a multiple of MLEN (default 64)")
    p.add_argument("--config", help="plena_settings.toml (default: the built-in machine)")
    p.add_argument("--model", choices=MODELS, default="smollm2-135m", help="model shape (default smollm2-135m)")
    p.add_argument("--seed", type=int, default=0, help="weight / input seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (then the summary line)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


def _parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="plena demo", description="Llama-family decoder on the PLENA emulator vs the golden model "
        "(seeded random weights)"))


def _rel_l2(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    n = np.linalg.norm(ref)
    return float(np.linalg.norm(a - ref) / n) if n else float(np.linalg.norm(a))


def run_demo(*, layers: int = 2, seq: int = 64, config: Optional[str] = None, model: str = "smollm2-135m",
             seed: int = 0, progress: bool = False) -> dict:
    """Build, emulate and compare; returns the result dict (see :func:`main`)."""
    from plena.config import default_config, load_config
    from plena.emu_jax.profile import run_with_progress, terminal_progress
    from plena.frontend.model import compile_decoder, preset_params
    from plena.golden import Policy
    from plena.golden.llama import decoder
    from plena.verify.stages import compare_run, read_stages

    cfg = load_config(config) if config else default_config()
    params = preset_params(model, layers, seed)
    t0 = time.perf_counter()
    prog, meta = compile_decoder(params, cfg, seq=seq, layers=layers, seed=seed)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with terminal_progress(progress, "emulating") as cb:
        res = run_with_progress(prog.words, cfg, hbm=prog.hbm, fpsram=prog.fpsram_bf16, intsram=prog.intsram,
                                vram=meta["vram_preload"], hbm_size=prog.hbm_size, progress=cb,
                                first_chunk=1 << 16, target_s=2.0)  # few, long chunks: less overhead
    emulate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, hw = decoder(params, meta["x"], cfg, seq=seq, layers=layers, policy=Policy.hardware(cfg))
    hw = {k: np.asarray(v) for k, v in hw.items()}
    golden_hw_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, f32 = decoder(params, meta["x"], cfg, seq=seq, layers=layers, policy=Policy.fp32(cfg))
    f32 = {k: np.asarray(v) for k, v in f32.items()}
    golden_fp32_s = time.perf_counter() - t0
    emu = read_stages(prog, res, meta["intermediates"])
    vs_hw = compare_run(prog, res, meta["intermediates"], hw, emulated=emu, reference_label="hardware golden")
    vs_f32 = compare_run(prog, res, meta["intermediates"], f32, emulated=emu, reference_label="fp32 golden")
    stages = [dict(name=h.name, shape=list(h.shape), bit_exact_pct=h.bit_exact_pct, rel_l2_fp32=f.rel_l2,
                   max_abs_fp32=f.max_abs, mae_fp32=f.mae) for h, f in zip(vs_hw, vs_f32)]
    first = vs_hw.first_divergence
    out = meta["output"].read(prog, res)
    return dict(model=model, layers=layers, seq=seq, hidden=params.hidden, heads=params.heads,
                kv_heads=params.kv_heads, head_dim=params.head_dim, intermediate=params.intermediate,
                compile_s=compile_s, emulate_s=emulate_s, emulator_compile_s=float(res.compile_s),
                golden_hw_s=golden_hw_s, golden_fp32_s=golden_fp32_s,
                static_instructions=len(prog.words), instructions=int(res.instructions), cycles=int(res.cycles),
                bit_exact_pct=vs_hw.bit_exact_pct, rel_l2_fp32=_rel_l2(out, f32["final_norm"]),
                max_abs_fp32=float(np.abs(out - f32["final_norm"]).max()), stages=stages,
                first_divergence=first.to_dict() if first else None)


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table("stage output", "shape", "bit-exact vs HW golden", "rel L2 vs fp32", "max abs vs fp32",
              title=f"{r['model']}-shaped decoder, {r['layers']} layer(s), seq {r['seq']} (random weights)")
    for s in r["stages"]:
        t.add_row(s["name"], "x".join(map(str, s["shape"])), f"{s['bit_exact_pct']:.2f} %",
                  f"{s['rel_l2_fp32']:.4f}", f"{s['max_abs_fp32']:.4g}")
    con.print(t)
    print(f"compile {r['compile_s']:.2f} s, emulate {r['emulate_s']:.2f} s (of which JIT "
              f"{r['emulator_compile_s']:.2f} s), golden hardware {r['golden_hw_s']:.2f} s, golden fp32 "
              f"{r['golden_fp32_s']:.2f} s; {r['static_instructions']} program words, {r['instructions']} "
              f"executed instructions, {r['cycles']} non-HBM cycles")


def main(argv: Optional[list] = None, args: Optional[argparse.Namespace] = None) -> int:
    """Run the demo (``argv``: command-line options, or already parsed ``args``); exit status 0
    when every compared element is bit-exact."""
    if args is None:
        args = _parser().parse_args(argv)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    r = run_demo(layers=args.layers, seq=args.seq, config=args.config, model=args.model, seed=args.seed,
                 progress=progress)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        _print_table(r)
    fd = r.get("first_divergence")
    if fd:
        print(f"first divergence from the hardware golden: {fd['stage']}{fd['index']}: emulator {fd['actual']} "
              f"vs golden {fd['reference']}")
    print(f"demo: layers={r['layers']} bit_exact={r['bit_exact_pct']:.2f}% rel_l2_fp32={r['rel_l2_fp32']:.4g} "
          f"emulate_s={r['emulate_s']:.2f} instructions={r['instructions']}")
    return 0 if r["bit_exact_pct"] == 100.0 else 1


if __name__ == "__main__":
    sys.exit(main())


def compile_to_folder(out, *, layers: int = 2, seq: int = 64, config: Optional[str] = None,
                      model: str = "smollm2-135m", seed: int = 0):
    """``plena compile``: build the decoder and write it as the upstream files (program.asm,
    program.mem, hbm.bin, fp_sram.bin, int_sram.bin, vram_preload.bin, plena_settings.toml,
    tensors.json, run.sh) so that ``plena run`` or the reference emulator can run it."""
    from plena.config import default_config, load_config
    from plena.frontend.model import compile_decoder, preset_params

    cfg = load_config(config) if config else default_config()
    prog, meta = compile_decoder(preset_params(model, layers, seed), cfg, seq=seq, layers=layers, seed=seed)
    folder = prog.write(out, vram=meta["vram_preload"])
    return prog, meta, folder
