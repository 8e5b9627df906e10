"""Format study: a small Llama-family decoder (SmolLM2-like, 2 layers) compiled by the frontend
with weights, activations and KV cache in one HBM format each run (MXFP8, MXINT8, MXFP6, MXFP4,
MXINT4; block 8 and 32), emulated, and compared with the golden model:

* ``bit_exact``: share of all compared stage elements whose bits equal the ``hardware`` golden
  (must be 100 % for every format: the emulator and the golden use the same codec);
* ``rel_l2`` / ``max_abs``: of the final output against the ``fp32`` golden (ideal math).

Prints a table, writes ``formats.json`` and ``formats.png`` (error vs format) into ``--out``.

    python benchmarks/formats.py [--out DIR] [--layers 2] [--seq 64] [--hidden 128] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plena.numerics.formats import E8M0, FloatType, IntType, MxFormat  # noqa: E402

ELEMENTS = {
    "MXFP8": FloatType(True, 4, 3),
    "MXINT8": IntType(8),
    "MXFP6": FloatType(True, 3, 2),
    "MXFP4": FloatType(True, 2, 1),
    "MXINT4": IntType(4),
}


def study_formats(blocks=(8, 32)):
    """[(label, MxFormat)] of the study."""
    return [(f"{name}/b{b}", MxFormat(block=b, elem=el, scale=E8M0)) for name, el in ELEMENTS.items()
            for b in blocks]


def with_hbm_format(cfg, fmt):
    """``cfg`` with every HBM transfer type (weights, KV, activations) set to ``fmt``."""
    p = dataclasses.replace(cfg.precision, hbm_m_weight_type=fmt, hbm_m_kv_type=fmt,
                            hbm_v_act_type=fmt, hbm_v_kv_type=fmt)
    return cfg.replace(precision=p)


def _rel_l2(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    n = np.linalg.norm(ref)
    return float(np.linalg.norm(a - ref) / n) if n else float(np.linalg.norm(a))


def run_format(fmt, *, layers=2, seq=64, hidden=128, heads=2, kv_heads=1, head_dim=64,
               intermediate=256, seed=0, cfg=None) -> dict:
    """Compile, emulate, run both goldens for one HBM format; returns the metrics."""
    from plena.config import default_config
    from plena.emu_jax.api import run
    from plena.frontend.model import compile_decoder, random_params
    from plena.golden import Policy
    from plena.golden.llama import decoder
    from plena.verify.stages import compare_run, read_stages

    cfg = with_hbm_format(cfg or default_config(), fmt)
    params = random_params(hidden, heads, kv_heads, head_dim, intermediate, layers, seed)
    prog, meta = compile_decoder(params, cfg, seq=seq, layers=layers, seed=seed)
    t0 = time.perf_counter()
    res = run(prog.words, cfg, hbm=prog.hbm, fpsram=prog.fpsram_bf16, intsram=prog.intsram,
              vram=meta["vram_preload"], hbm_size=prog.hbm_size)
    emulate_s = time.perf_counter() - t0
    _, hw = decoder(params, meta["x"], cfg, seq=seq, layers=layers, policy=Policy.hardware(cfg))
    _, f32 = decoder(params, meta["x"], cfg, seq=seq, layers=layers, policy=Policy.fp32(cfg))
    hw = {k: np.asarray(v) for k, v in hw.items()}
    f32 = {k: np.asarray(v) for k, v in f32.items()}
    emu = read_stages(prog, res, meta["intermediates"])
    vs_hw = compare_run(prog, res, meta["intermediates"], hw, emulated=emu, reference_label="hardware golden")
    out = meta["output"].read(prog, res)
    ref = f32["final_norm"]
    first = vs_hw.first_divergence
    return dict(format=str(fmt), bit_exact_pct=float(vs_hw.bit_exact_pct),
                rel_l2_fp32=_rel_l2(out, ref), max_abs_fp32=float(np.abs(out - ref).max()),
                hw_golden_rel_l2_fp32=_rel_l2(hw["final_norm"], ref),
                instructions=int(res.instructions), emulate_s=emulate_s,
                first_divergence=first.to_dict() if first else None)


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    ax[0].bar(x, [r["rel_l2_fp32"] for r in rows], color="tab:blue")
    ax[0].set_yscale("log")
    ax[0].set_title("relative L2 error vs fp32 golden")
    ax[1].bar(x, [r["max_abs_fp32"] for r in rows], color="tab:orange")
    ax[1].set_yscale("log")
    ax[1].set_title("max abs error vs fp32 golden")
    for a in ax:
        a.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    fig.suptitle("2-layer decoder: HBM format (weights, activations, KV) vs error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out", help="directory for formats.json / formats.png")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="block 32 only")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'format':<12} {'block':>5} {'bit-exact vs HW golden':>23} {'rel L2 vs fp32':>15} "
          f"{'max abs vs fp32':>16} {'emulate s':>10}")
    for label, fmt in study_formats((32,) if a.quick else (8, 32)):
        r = run_format(fmt, layers=a.layers, seq=a.seq, hidden=a.hidden, intermediate=2 * a.hidden)
        r.update(label=label, element=label.split("/")[0], block=fmt.block)
        rows.append(r)
        print(f"{r['element']:<12} {fmt.block:>5} {r['bit_exact_pct']:>22.2f}% {r['rel_l2_fp32']:>15.5f} "
              f"{r['max_abs_fp32']:>16.5g} {r['emulate_s']:>10.2f}", flush=True)
    (out / "formats.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "formats.png")
    ok = all(r["bit_exact_pct"] == 100.0 for r in rows)
    print(f"formats: {len(rows)} runs, all bit-exact: {ok}; wrote {out / 'formats.json'}, {out / 'formats.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
