"""``plena compare``: per-stage error tables and PNG plots.

Two ways to get the two sides:

* two dump folders (ours or the reference emulator's, as ``plena diff`` reads them) plus the
  ``tensors.json`` a frontend program writes (``plena compile``): every VRAM tensor it names is
  a stage, read from ``vram_dump.bin`` (bf16) of each folder; for a run whose VECTOR_SRAM_TYPE
  is wider than bf16 (the wide container, docs/formats.md "Dumps") give its config
  (``cfg=`` / ``--config S.toml``): the file then packs codes of that type;
* ``--golden``: a Llama-family decoder is compiled (same options as ``plena compile``), run on the
  emulator and compared stage by stage with the ``hardware`` golden (bit-exact expected) and
  the ``fp32`` golden (the numerics' error).

The text output is one line per stage (shape, bit-exact %, max abs, mean abs, rel L2 — the
metrics of :func:`plena.verify.stages.compare_arrays`). With ``--png DIR``:
``stage_errors.png`` (per-stage bar charts: max abs and mean abs error, log scale, and
bit-exact share) and ``first_divergence.png`` (heat map of ``|a - b|`` over the first stage
that differs, with the first differing element marked), one pair per reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from plena.numerics import codec
from plena.numerics.bf16 import bf16_bits_to_f32_np
from plena.verify.stages import StageReport, compare_stages

__all__ = ["vram_tensors_from_dumps", "compare_dump_folders", "stage_error_chart", "divergence_heatmap",
           "write_pngs", "report_text", "main"]


def vram_tensors_from_dumps(folder, tensors, cfg=None) -> dict:
    """``{name: f32[rows, cols]}`` of every VRAM tensor named in ``tensors`` (a tensors.json
    path or its parsed dict) read from ``folder/vram_dump.bin`` (bf16, little-endian; a short
    dump reads as zero-extended). ``cfg``: the config of the run that wrote the folder; with a
    wide VECTOR_SRAM_TYPE the file holds codes of that type (packed at its width), decoded
    here to their f32 values (``None``: the default bf16 layout)."""
    from plena.verify.diff import dump_files, read_elements

    meta = json.loads(Path(tensors).read_text()) if not isinstance(tensors, Mapping) else tensors
    meta = meta.get("tensors", meta)
    fname, element, _ = dump_files(cfg)["vram"]
    raw = read_elements(Path(folder) / fname, element)
    if isinstance(element, str):  # bf16 bits
        decode = bf16_bits_to_f32_np
    else:  # codes of the VRAM type
        decode = lambda c: codec.decode_np(c, element)  # noqa: E731
    out = {}
    for name, t in meta.items():
        if t.get("kind") != "vram":
            continue
        rows, cols = t["shape"]
        a = int(t["address"])
        bits = np.zeros(rows * cols, raw.dtype)
        have = raw[a: a + rows * cols]
        bits[: len(have)] = have
        out[name] = np.asarray(decode(bits), np.float32).reshape(rows, cols)
    return out


def compare_dump_folders(a, b, tensors, cfg=None) -> tuple[StageReport, dict, dict]:
    """(report, A's tensors, B's tensors) for two dump folders (A = "actual", B = reference),
    stages in address order of the tensors.json; ``cfg`` as for :func:`vram_tensors_from_dumps`
    (both folders in the layout of that config)."""
    ta = vram_tensors_from_dumps(a, tensors, cfg)
    tb = vram_tensors_from_dumps(b, tensors, cfg)
    return compare_stages(ta, tb, actual_label=str(a), reference_label=str(b)), ta, tb


def report_text(rep: StageReport, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'stage':<32} {'shape':>11} {'bit-exact':>10} {'max abs':>12} {'mean abs':>12} {'rel L2':>12}")
    for s in rep:
        shape = "x".join(map(str, s.shape))
        lines.append(f"{s.name:<32} {shape:>11} {s.bit_exact_pct:>9.2f}% {s.max_abs:>12.6g} {s.mae:>12.6g} "
                     f"{s.rel_l2:>12.6g}")
    fd = rep.first_divergence
    lines.append(f"first divergence: {fd}" if fd else "no divergence: every element bit-identical")
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def stage_error_chart(rep: StageReport, path, title: str = "") -> Path:
    """Per-stage bar charts (max abs, mean abs: log scale; bit-exact %) -> PNG at ``path``."""
    plt = _plt()
    names = rep.names
    x = np.arange(len(names))
    tiny = 1e-30  # zero errors drawn as an empty bar on the log axis
    fig, ax = plt.subplots(3, 1, figsize=(max(6.0, 0.45 * len(names) + 2), 8), sharex=True)
    ax[0].bar(x, [max(s.max_abs, tiny) for s in rep], color="tab:red")
    ax[0].set_ylabel("max |a-b|")
    ax[1].bar(x, [max(s.mae, tiny) for s in rep], color="tab:orange")
    ax[1].set_ylabel("mean |a-b|")
    for a in ax[:2]:
        a.set_yscale("log")
        errs = [v for s in rep for v in (s.max_abs, s.mae) if v > 0]
        if errs:
            a.set_ylim(min(errs) / 3, max(errs) * 3)
    ax[2].bar(x, [s.bit_exact_pct for s in rep], color="tab:green")
    ax[2].set_ylabel("bit-exact %")
    ax[2].set_ylim(0, 105)
    ax[2].set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    fig.suptitle(title or f"{rep.actual} vs {rep.reference}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def divergence_heatmap(name: str, actual, reference, path, title: str = "") -> Path:
    """Heat map of ``|actual - reference|`` (2-D; higher ranks are flattened to rows of the last
    axis) with the first differing element circled -> PNG at ``path``."""
    plt = _plt()
    a = np.asarray(actual, np.float32)
    r = np.asarray(reference, np.float32)
    a2 = a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a
    r2 = r.reshape(a2.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(a2.astype(np.float64) - r2.astype(np.float64))
    d = np.where(a2.view(np.uint32) == r2.view(np.uint32), 0.0, d)
    fig, ax = plt.subplots(figsize=(7, 5))
    im = ax.imshow(np.nan_to_num(d, nan=np.nanmax(d[np.isfinite(d)]) if np.isfinite(d).any() else 0.0),
                   aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="|a - b|")
    diff = np.argwhere(a2.view(np.uint32) != r2.view(np.uint32))
    if len(diff):
        i, j = diff[0]
        ax.plot([j], [i], "o", mfc="none", mec="cyan", ms=12, mew=2)
        ax.set_title(title or f"{name}: first difference at [{i}, {j}]: {a2[i, j]:.6g} vs {r2[i, j]:.6g}",
                     fontsize=9)
    else:
        ax.set_title(title or f"{name}: identical", fontsize=9)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_pngs(rep: StageReport, actual: Mapping, reference: Mapping, out_dir, prefix: str = "") -> list:
    """``stage_errors.png`` and, if a stage differs, ``first_divergence.png`` (with a prefix)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [stage_error_chart(rep, out / f"{prefix}stage_errors.png")]
    st = rep.first_divergent_stage
    if st is not None:
        files.append(divergence_heatmap(st.name, actual[st.name], reference[st.name],
                                        out / f"{prefix}first_divergence.png"))
    return files


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("a", nargs="?", help="dump folder (actual side)")
    p.add_argument("b", nargs="?", help="dump folder (reference side)")
    p.add_argument("--tensors", help="tensors.json naming the VRAM tensors (default: A/tensors.json, "
                   "then B/tensors.json)")
    p.add_argument("--golden", action="store_true", help="compile a decoder and compare the emulator with "
                   "the hardware and fp32 goldens (instead of two dump folders)")
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "clm-60m"])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", "--settings", dest="config", help="plena_settings.toml of the machine: "
                   "--golden compiles for it; two dump folders are read in its layout (needed when "
                   "VECTOR_SRAM_TYPE is wider than bf16; default: the bf16 layout)")
    p.add_argument("--png", help="folder for the PNG plots")
    p.add_argument("--json", help="write the per-stage numbers as JSON to this file")
    return p


def _find_tensors(args) -> Path:
    if args.tensors:
        return Path(args.tensors)
    for d in (args.a, args.b):
        if (Path(d) / "tensors.json").exists():
            return Path(d) / "tensors.json"
    raise SystemExit("plena compare: no tensors.json (give --tensors)")


def _golden_reports(args):
    from plena.config import default_config, load_config
    from plena.emu_jax.api import run
    from plena.frontend.model import compile_decoder, preset_params
    from plena.golden import Policy
    from plena.golden.llama import decoder
    from plena.verify.stages import read_stages

    cfg = load_config(args.config) if args.config else default_config()
    params = preset_params(args.model, args.layers, args.seed)
    prog, meta = compile_decoder(params, cfg, seq=args.seq, layers=args.layers, seed=args.seed)
    res = run(prog.words, cfg, hbm=prog.hbm, fpsram=prog.fpsram_bf16, intsram=prog.intsram,
              vram=meta["vram_preload"], hbm_size=prog.hbm_size)
    emu = read_stages(prog, res, meta["intermediates"])
    names = list(meta["intermediates"])
    out = []
    for label, pol in (("hardware golden", Policy.hardware(cfg)), ("fp32 golden", Policy.fp32(cfg))):
        _, g = decoder(params, meta["x"], cfg, seq=args.seq, layers=args.layers, policy=pol)
        g = {k: np.asarray(v) for k, v in g.items()}
        rep = compare_stages(emu, g, names, actual_label="emulator", reference_label=label)
        out.append((label, rep, emu, g))
    return out


def main(args) -> int:
    """Run ``plena compare`` (parsed ``args``); exit 0 when the first comparison is bit-exact."""
    if args.golden:
        reports = _golden_reports(args)
    else:
        if not (args.a and args.b):
            raise SystemExit("plena compare: give two dump folders A B, or --golden")
        cfg = None
        if args.config:
            from plena.config import load_config

            cfg = load_config(args.config)
        rep, ta, tb = compare_dump_folders(args.a, args.b, _find_tensors(args), cfg)
        reports = [(f"{args.b}", rep, ta, tb)]
    blob = {}
    for k, (label, rep, a, b) in enumerate(reports):
        print(report_text(rep, f"== {rep.actual} vs {label} =="))
        blob[label] = rep.to_dict()
        if args.png:
            prefix = "" if len(reports) == 1 else ("hw_" if k == 0 else "fp32_")
            for f in write_pngs(rep, a, b, args.png, prefix):
                print(f"wrote {f}")
    if args.json:
        Path(args.json).write_text(json.dumps(blob, indent=2))
    return 0 if reports[0][1].exact else 1
