"""Golden drift of multi-layer decoders: the hardware golden vs the emulator (must be 100 %
bit-exact at every stage) and the fp32 golden's drift from the machine (max abs, MAE, rel L2)
-- the error a user comparing the hardware against an ideal float32 model sees.

    python benchmarks/golden_drift.py [--layers 1 2 5] [--seq 64] [--model smollm2-135m]
                                      [--config S.toml] [--json out.json]

For each layer count: the decoder (seeded random weights with the model's shape, default
machine) is compiled, emulated, and compared stage by stage with both goldens
(:mod:`plena.verify.stages`). Prints one table row per layer count (output drift, residual
stream drift after each layer, first divergence from the hardware golden, times) and exits 1
if any stage is not bit-exact. Several minutes on 2 cores (the 5-layer SmolLM2-shaped program
executes ~1.5 M instructions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def measure(layers: int, *, seq: int, model: str, cfg, seed: int = 0) -> dict:
    from plena.frontend.model import compile_decoder, preset_params
    from plena.golden import Policy
    from plena.golden.llama import decoder
    from plena.verify.stages import compare_run, read_stages

    params = preset_params(model, layers, seed)
    prog, meta = compile_decoder(params, cfg, seq=seq, layers=layers, seed=seed)
    t0 = time.perf_counter()
    res = prog.run(vram=meta["vram_preload"])
    emulate_s = time.perf_counter() - t0
    emu = read_stages(prog, res, meta["intermediates"])
    t0 = time.perf_counter()
    gold = {}
    for mode, policy in (("hw", Policy.hardware(cfg)), ("fp32", Policy.fp32(cfg))):
        _, inter = decoder(params, meta["x"], cfg, seq=seq, layers=layers, policy=policy)
        gold[mode] = {k: np.asarray(v) for k, v in inter.items()}
    golden_s = time.perf_counter() - t0
    hw = compare_run(prog, res, meta["intermediates"], gold["hw"], emulated=emu, reference_label="hardware golden")
    f32 = compare_run(prog, res, meta["intermediates"], gold["fp32"], emulated=emu, reference_label="fp32 golden")
    out = f32["final_norm"]
    fd = hw.first_divergence
    return dict(layers=layers, seq=seq, model=model, instructions=int(res.instructions), emulate_s=emulate_s,
                golden_s=golden_s, hw_bit_exact_pct=hw.bit_exact_pct, hw_exact=hw.exact,
                hw_first_divergence=fd.to_dict() if fd else None,
                fp32_max_abs=out.max_abs, fp32_mae=out.mae, fp32_rel_l2=out.rel_l2,
                fp32_resid_rel_l2=[f32[f"L{i}.resid2"].rel_l2 for i in range(layers)],
                fp32_stages=f32.to_dict()["stages"])


def main(argv=None) -> int:
    from plena.config import default_config, load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 5])
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "clm-60m"])
    p.add_argument("--config", help="plena_settings.toml (default: the built-in machine)")
    p.add_argument("--json", help="write all results (with per-stage fp32 metrics) here")
    a = p.parse_args(argv)
    cfg = load_config(a.config) if a.config else default_config()
    rows = []
    for n in a.layers:
        r = measure(n, seq=a.seq, model=a.model, cfg=cfg)
        rows.append(r)
        print(f"  {n} layer(s): emulated {r['instructions']} instructions in {r['emulate_s']:.1f} s, "
              f"goldens {r['golden_s']:.1f} s", file=sys.stderr, flush=True)

    from rich.console import Console
    from rich.table import Table

    t = Table("layers", "HW golden bit-exact", "first divergence", "fp32 max abs", "fp32 MAE", "fp32 rel L2",
              "fp32 rel L2 of residual after each layer",
              title=f"{a.model}-shaped decoder, seq {a.seq}: output of the emulator vs the goldens")
    for r in rows:
        fd = r["hw_first_divergence"]
        t.add_row(str(r["layers"]), f"{r['hw_bit_exact_pct']:.4f} %",
                  "none" if fd is None else f"{fd['stage']}{fd['index']}",
                  f"{r['fp32_max_abs']:.4g}", f"{r['fp32_mae']:.4g}", f"{r['fp32_rel_l2']:.4g}",
                  " ".join(f"{e:.3g}" for e in r["fp32_resid_rel_l2"]))
    Console(width=200).print(t)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    ok = all(r["hw_exact"] for r in rows)
    print(f"golden_drift: layers={','.join(str(r['layers']) for r in rows)} bit_exact={'yes' if ok else 'NO'} "
          + " ".join(f"rel_l2_fp32[{r['layers']}]={r['fp32_rel_l2']:.4g}" for r in rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
