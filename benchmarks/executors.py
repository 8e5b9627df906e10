"""Executor benchmark: the reference interpreter, the fast executor, a plain numpy interpreter
and the golden model on the same workloads, with the targets of the "Fast executor" issue.

    python benchmarks/executors.py [--quick] [--workloads a,b] [--executors interpreter,fast,numpy,golden]
                                   [--repeat 3] [--numpy-max-s 20] [--no-batch] [--json out.json]

Workloads
    aten_ffn, de_bmm, ci_flash_attention_m64b16b2s32
        conformance programs from ``../shared/conformance`` (skipped when it is absent), run
        with the case's files and settings. ``de_bmm`` panics upstream at pc 270 (see
        EXPECTED.md); it is run for its first 270 instructions (``max_steps``), which measures
        loading / compiling its 31,108-word program more than execution. With ``max_steps``,
        ``api.run(executor="fast")`` runs the interpreter (its rule), so b = a there.
    decoder_1l, decoder_8l
        the frontend's Llama decoder (:func:`plena.frontend.model.compile_decoder`, seeded random
        weights, seq 64) with SmolLM2-135M's shape, 1 and 8 layers. ``--quick`` uses a small
        shape instead (hidden 128, 2 heads / 1 kv head of 64, intermediate 256).

Executors (the table's column letters)
    (a) ``interpreter``: ``plena.emu_jax.api.run(..., executor="interpreter")``, the reference
        ``lax.while_loop`` interpreter.
    (b) ``fast``: ``api.run(..., executor="fast")``. When the installed ``api.run`` has no
        ``executor`` argument (the fast executor has not landed), this column runs the
        interpreter and says so in its note.
    (c) ``numpy``: ``benchmarks/numpy_interpreter.py``, a per-instruction Python/numpy
        interpreter. It is stopped after ``--numpy-max-s`` seconds; its instr/s is then the rate
        of the part it ran, and its run time is extrapolated to the whole program (marked
        "extrapolated").
    (d) ``golden``: the golden model computing the same layers in plain JAX, ``jax.jit``-ed:
        decoders -> :func:`plena.golden.llama.decoder` in ``Policy.hardware()`` (bit-exact with
        the machine; for L > 1 layers: L x the run time of the jitted 1-layer decoder, as a jit
        of all L layers takes many minutes to compile on 2 cores); aten_ffn -> :func:`plena.golden.ops_ffn.ffn` on the case's ``inputs/*.npy``;
        ci_flash_attention -> :func:`plena.golden.ops_attention.flash_attention` at the case's
        shapes (64 query rows, 4 heads of HLEN, one kv head, 128 kv rows: a timing reference, not
        the case's exact batch layout); de_bmm has no golden equivalent (left empty).

Measurements
    Each (workload, executor) runs in a fresh subprocess, so compile times are cold (the
    persistent XLA cache is switched off with ``PLENA_JAX_CACHE=off`` unless ``--warm-cache``)
    and the peak RSS is that child's own (``os.wait4`` rusage ``ru_maxrss``).
    compile s = wall time of the first call minus its execution time (load, pre-pass, tracing
    and XLA compile; for numpy: decoding the program and building the machine).
    run s = the best of at least ``--repeat`` executions; runs are repeated until they add up
    to ``--min-run-s`` seconds (at most :data:`MAX_RUNS`), the same rule for every executor,
    so that a run of a few ms on a noisy machine has as many samples as it needs for a stable
    best; a run longer than 10 s is not repeated.
    ``--interpreter-max-steps N`` stops (a) after N instructions on longer programs and
    extrapolates its run s from that rate (no identity check then).
    dynamic instr/s = dynamic instructions / run s.
    touched = VRAM rows written or preloaded x VLEN x 2 + MRAM (configured tiles x MLEN^2 x 2)
    + HBM bytes (preload or highest byte written), from the emulator's static pre-pass; the
    peak-memory target is RSS <= 2 x touched + 1 GiB.
    identical = the final VRAM, MRAM, FP SRAM and INT SRAM equal the reference interpreter's
    (trailing zeros ignored, as the executors size their windows differently). The numpy
    baseline keeps f32 subnormals as the emulator does (``plena.numerics.ieee``), so a "NO"
    there is a real difference.
    Ratios are speed ratios: b/a = run s(a) / run s(b) (> 1: b is faster); b/d < 1 means
    emulation is slower than the golden, and "emulation <= 10x the golden" is b/d >= 0.1.
    The batch target runs ``benchmarks/batch.py`` (64 input sets of aten_linear) in a child.

Timings on a shared machine are noisy; compare columns of the same run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EXECUTORS = ("interpreter", "fast", "numpy", "golden")
LETTER = {"interpreter": "a", "fast": "b", "numpy": "c", "golden": "d"}
CONFORMANCE_WORKLOADS = ("aten_ffn", "de_bmm", "ci_flash_attention_m64b16b2s32")
DECODER_WORKLOADS = {"decoder_1l": 1, "decoder_8l": 8}
SEQ = 64
SMALL_SHAPE = dict(hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=256)
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------
# workloads (prepared once in the parent, loaded by every child)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Workload:
    name: str
    kind: str  # "conformance" | "decoder"
    folder: str  # npz + json written by prepare()
    static: int = 0
    dynamic: int | None = None
    touched_bytes: int = 0
    max_steps: int | None = None
    settings: str | None = None  # conformance: plena_settings.toml; decoder: default config
    decoder: dict | None = None  # model shape / layers / seq / seed
    note: str = ""


def _decoder_params(spec: dict):
    from plena.frontend.model import preset_params, random_params

    if spec["model"] == "small":
        return random_params(layers=spec["layers"], seed=spec["seed"], **SMALL_SHAPE)
    return preset_params(spec["model"], spec["layers"], spec["seed"])


def _cfg(wl: Workload):
    from plena.config import default_config, load_config

    return load_config(wl.settings) if wl.settings else default_config()


def prepare(name: str, quick: bool, root: Path) -> Workload | None:
    """Build the program and its preloads, save them under ``root/name``; None if unavailable."""
    from plena.emu_jax import files
    from plena.emu_jax.api import load_program
    from plena.emu_jax.plan import plan_program
    from plena.isa import read_mem

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    wl = Workload(name=name, kind="decoder" if name in DECODER_WORKLOADS else "conformance", folder=str(folder))
    if wl.kind == "conformance":
        from plena.verify.conformance import conformance_dir, load_case

        if conformance_dir() is None:
            return None
        case = load_case(name)
        wl.settings = str(case.settings_toml)
        words = np.asarray(read_mem(case.program_mem), np.uint32)
        arrays = dict(words=words, hbm=files.read_bytes(case.hbm_bin), fpsram=files.load_fpsram(case.fp_sram_bin))
        if case.int_sram_bin:
            arrays["intsram"] = files.load_intsram(case.int_sram_bin)
        if case.vram_preload:
            arrays["vram"] = files.load_vram(case.vram_preload)
        hbm_size = case.hbm_size
        if case.outcome == "panic":
            wl.max_steps = case.panic_pc
            wl.note = f"panics upstream at pc {case.panic_pc}: first {case.panic_pc} instructions run"
    else:
        from plena.frontend.model import compile_decoder

        layers = DECODER_WORKLOADS[name]
        wl.decoder = dict(model="small" if quick else "smollm2-135m", layers=layers, seq=SEQ, seed=0)
        cfg = _cfg(wl)
        prog, meta = compile_decoder(_decoder_params(wl.decoder), cfg, seq=SEQ, layers=layers, seed=0)
        words = np.asarray(prog.words, np.uint32)
        arrays = dict(words=words, hbm=np.asarray(prog.hbm, np.uint8), fpsram=prog.fpsram_bf16,
                      intsram=prog.intsram, vram=meta["vram_preload"], x=meta["x"])
        hbm_size = prog.hbm_size
        wl.note = f"{wl.decoder['model']} shape, {layers} layer(s), seq {SEQ}"
    cfg = _cfg(wl)
    plan = plan_program(load_program(words), cfg, arrays.get("intsram"))
    wl.static = len(words)
    wl.dynamic = wl.max_steps if wl.max_steps is not None else plan.dynamic_instructions
    pre_rows = -(-len(arrays["vram"]) // cfg.vlen) if "vram" in arrays else 0
    vram_rows = max(plan.vram_rows or 0, pre_rows)
    hbm_bytes = max(len(arrays["hbm"]), plan.hbm_write_end or 0)
    wl.touched_bytes = vram_rows * cfg.vlen * 2 + cfg.matrix_sram_size * cfg.mlen * 2 + hbm_bytes
    np.savez(folder / "arrays.npz", hbm_size=np.int64(hbm_size), **arrays)
    (folder / "workload.json").write_text(json.dumps(dataclasses.asdict(wl)))
    return wl


def _load(folder: str):
    wl = Workload(**json.loads((Path(folder) / "workload.json").read_text()))
    with np.load(Path(folder) / "arrays.npz") as z:
        arrays = {k: z[k] for k in z.files}
    kw = dict(hbm=arrays["hbm"], fpsram=arrays["fpsram"], intsram=arrays.get("intsram"),
              vram=arrays.get("vram"), hbm_size=int(arrays["hbm_size"]))
    return wl, arrays, kw


def _state_hash(vram, mram, fpsram, intsram) -> str:
    h = hashlib.sha256()
    for a in (vram, mram, fpsram, intsram):
        a = np.trim_zeros(np.asarray(a).reshape(-1), "b")
        h.update(str(a.dtype).encode() + b":" + a.tobytes() + b"|")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# children: one (workload, executor) per process
# ---------------------------------------------------------------------------------------------

MAX_RUNS = 50  #: most executions of one measurement


def more_runs(runs: list, repeat: int, min_s: float) -> bool:
    """Whether a measurement runs again, given its run times so far (see "run s" above)."""
    if runs and runs[-1] > 10:
        return False
    return len(runs) < repeat or (sum(runs) < min_s and len(runs) < MAX_RUNS)


def has_executor_arg() -> bool:
    from plena.emu_jax import api

    return "executor" in inspect.signature(api.run).parameters


def _child_emulator(wl, arrays, kw, executor: str, repeat: int, cap: int | None, min_s: float = 0.0) -> dict:
    from plena.emu_jax import api

    out: dict = {}
    extra = {}
    if has_executor_arg():
        extra["executor"] = executor
    elif executor == "fast":
        out["note"] = "fast executor not available (api.run has no executor=): ran the interpreter"
    capped = executor == "interpreter" and cap and wl.dynamic and wl.max_steps is None and wl.dynamic > cap
    if wl.max_steps is not None or capped:
        kw = dict(kw, max_steps=cap if capped else wl.max_steps)
        if executor == "fast" and has_executor_arg():
            out["note"] = "max_steps given: api.run runs the interpreter for executor='fast'"
    cfg = _cfg(wl)
    words = arrays["words"]
    t0 = time.perf_counter()
    r = api.run(words, cfg, **kw, **extra)
    first = time.perf_counter() - t0
    runs, walls = [r.run_s], []
    while more_runs(runs, repeat, min_s):
        t0 = time.perf_counter()
        r2 = api.run(words, cfg, **kw, **extra)
        walls.append(time.perf_counter() - t0)
        runs.append(r2.run_s)
    out.update(dynamic=int(r.instructions), compile_s=first - r.run_s, run_s=min(runs), first_call_s=first,
               warm_wall_s=min(walls) if walls else None, runs=len(runs), ran=getattr(r, "executor", "interpreter"))
    if executor == "fast" and out["ran"] != "fast" and "note" not in out:
        out["note"] = f"api.run(executor='fast') ran the {out['ran']}"
    if capped:
        rate = r.instructions / out["run_s"]
        out.update(dynamic=wl.dynamic, run_s=wl.dynamic / rate, extrapolated=True,
                   note=f"stopped after {r.instructions} of {wl.dynamic} instructions; run s extrapolated "
                        f"at {rate / 1e3:.0f}k instr/s (--interpreter-max-steps)")
    else:
        d = r.dumps()
        out["hash"] = _state_hash(d.vram, d.mram, d.fpsram, d.intsram)
    return out


def _child_numpy(wl, arrays, kw, repeat: int, max_s: float, min_s: float = 0.0) -> dict:
    sys.path.insert(0, str(HERE))
    from numpy_interpreter import NumpyMachine

    cfg = _cfg(wl)
    best, runs = None, []
    while more_runs(runs, repeat, min_s):
        t0 = time.perf_counter()
        m = NumpyMachine(cfg, **kw)
        instrs = m.load(arrays["words"])
        setup = time.perf_counter() - t0
        st = m.run(instrs, max_steps=wl.max_steps, time_limit_s=max_s)
        runs.append(st.run_s)
        if best is None or st.run_s < best[1].run_s:
            best = (setup, st, m)
        complete = st.finished or st.steps == wl.max_steps
        if not complete:
            break
    setup, st, m = best
    out = dict(compile_s=setup, dynamic=st.steps, measured_steps=st.steps, measured_s=st.run_s, runs=len(runs))
    if st.finished or st.steps == wl.max_steps:
        out.update(run_s=st.run_s, hash=_state_hash(m.vram_bits(), m.mram_bits(), m.fpsram_bits(), m.intsram_words()))
    else:
        rate = st.steps / st.run_s
        out.update(dynamic=wl.dynamic, run_s=wl.dynamic / rate, extrapolated=True,
                   note=f"stopped after {st.steps} of {wl.dynamic} instructions ({st.run_s:.1f} s); "
                        f"run s extrapolated at {rate / 1e3:.0f}k instr/s")
    return out


def _golden_fn(wl, arrays):
    """(jitted function, its argument) computing the workload's layers with the golden model."""
    import jax

    from plena.golden import Policy

    cfg = _cfg(wl)
    hw = Policy.hardware(cfg)
    if wl.kind == "decoder":
        from plena.golden.llama import decoder

        spec = wl.decoder
        params = _decoder_params(spec)
        if spec["layers"] == 1:
            f = jax.jit(lambda x: decoder(params, x, cfg, seq=spec["seq"], layers=1, policy=hw)[0])
            return f, arrays["x"], "golden.llama.decoder (hardware policy), jitted", 1
        # jit-compiling all L layers at once takes many minutes on 2 cores: time one layer
        one = dataclasses.replace(params, layers=params.layers[:1])
        f = jax.jit(lambda x: decoder(one, x, cfg, seq=spec["seq"], layers=1, policy=hw)[0])
        return f, arrays["x"], (f"{spec['layers']} x the jitted 1-layer golden.llama.decoder (hardware "
                                f"policy); compile s is that of one layer"), spec["layers"]
    from plena.verify.conformance import load_case

    case = load_case(wl.name)
    if wl.name == "aten_ffn":
        from plena.golden import ops_ffn as G

        inp = {n: np.load(case.path / "inputs" / f"{n}.npy") for n in ("X", "W_gate", "W_up", "W_down")}
        # the upstream test activates the tensor it names W_up (see tests/test_ops_ffn.py)
        f = jax.jit(lambda x: G.ffn(G.from_hbm(x, hw), inp["W_up"], inp["W_gate"], inp["W_down"], cfg, hw))
        return f, inp["X"], "golden.ops_ffn.ffn on the case's inputs", 1
    if wl.name.startswith("ci_flash_attention"):
        from plena.golden import ops_attention as GA
        from plena.golden import ops_basic as GB

        q, k, v = (np.load(case.path / "inputs" / f"{n}.npy").reshape(-1, cfg.mlen) for n in "QKV")
        heads = cfg.mlen // cfg.hlen
        f = jax.jit(lambda q: GA.flash_attention(GB.from_hbm(q, hw), k, v, cfg=cfg, num_heads=heads, num_kv_heads=1,
                                                 head_dim=cfg.hlen, policy=hw))
        return f, q, f"golden.ops_attention.flash_attention at the case's shapes ({heads} heads of HLEN)", 1
    return None, None, "no golden equivalent", 1


def _child_golden(wl, arrays, repeat: int, min_s: float = 0.0) -> dict:
    import jax

    f, arg, what, times = _golden_fn(wl, arrays)
    if f is None:
        return dict(note=what, skipped=True)
    t0 = time.perf_counter()
    jax.block_until_ready(f(arg))
    first = time.perf_counter() - t0
    runs = []
    while not runs or (first < 60 and more_runs(runs, repeat - 1, min_s)):
        t0 = time.perf_counter()
        jax.block_until_ready(f(arg))
        runs.append(time.perf_counter() - t0)
    run_s = min(runs)
    return dict(compile_s=first - run_s, run_s=run_s * times, first_call_s=first, runs=len(runs), note=what)


def child_main(args) -> int:
    wl, arrays, kw = _load(args.child_workload)
    t0 = time.perf_counter()
    try:
        if args.child_executor in ("interpreter", "fast"):
            out = _child_emulator(wl, arrays, kw, args.child_executor, args.repeat, args.interpreter_max_steps,
                                  args.min_run_s)
        elif args.child_executor == "numpy":
            out = _child_numpy(wl, arrays, kw, args.repeat, args.numpy_max_s, args.min_run_s)
        else:
            out = _child_golden(wl, arrays, args.repeat, args.min_run_s)
    except Exception as exc:  # reported in the table, not fatal for the benchmark
        out = dict(error=f"{type(exc).__name__}: {exc}")
    out["child_wall_s"] = time.perf_counter() - t0
    Path(args.child_out).write_text(json.dumps(out))
    return 0


def run_child(wl: Workload, executor: str, args) -> dict:
    """Run one measurement in a fresh interpreter; adds peak_rss_bytes from os.wait4."""
    env = dict(os.environ)
    if not args.warm_cache:
        env["PLENA_JAX_CACHE"] = "off"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out_path = fh.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-executor", executor, "--child-workload",
           wl.folder, "--child-out", out_path, "--repeat", str(args.repeat), "--numpy-max-s", str(args.numpy_max_s),
           "--min-run-s", str(args.min_run_s)]
    if args.interpreter_max_steps:
        cmd += ["--interpreter-max-steps", str(args.interpreter_max_steps)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err_text = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        res = json.loads(Path(out_path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        res = {}
    finally:
        Path(out_path).unlink(missing_ok=True)
    if proc.returncode != 0 and "error" not in res:
        res["error"] = f"child exited {proc.returncode}: {err_text.strip().splitlines()[-1:] or ''}"
    res["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux: KiB
    return res


# ---------------------------------------------------------------------------------------------
# tables, ratios, targets
# ---------------------------------------------------------------------------------------------

def _fmt(v, spec, empty="-"):
    return empty if v is None else format(v, spec)


def _speed(rows, w, num, den):
    """run s(den) / run s(num): how many times faster `num` is than `den` on workload w."""
    a, b = rows.get((w, den)), rows.get((w, num))
    if not a or not b or a.get("run_s") is None or b.get("run_s") is None or b["run_s"] <= 0:
        return None
    return a["run_s"] / b["run_s"]


def _aggregate(rows, names, num, den):
    pairs = [(rows[(w, den)]["run_s"], rows[(w, num)]["run_s"]) for w in names
             if rows.get((w, den), {}).get("run_s") is not None and rows.get((w, num), {}).get("run_s") is not None]
    if not pairs:
        return None
    return sum(p[0] for p in pairs) / sum(p[1] for p in pairs)


def targets(wls: dict, rows: dict, batch: dict | None) -> list[dict]:
    """The issue's targets: list of {target, measured, pass}."""
    out = []

    def add(name, measured, ok):
        out.append(dict(target=name, measured=measured, passed=ok))

    fast = {w: rows.get((w, "fast")) for w in wls}
    fast_ok = {w: r for w, r in fast.items() if r and r.get("run_s") is not None}
    loop_heavy = [w for w in fast_ok if wls[w].dynamic and wls[w].dynamic >= 2 * wls[w].static]
    if loop_heavy:
        rates = {w: wls[w].dynamic / fast_ok[w]["run_s"] for w in loop_heavy}
        add(">= 5 M dynamic instr/s on loop-heavy workloads (b)",
            ", ".join(f"{w} {r / 1e6:.2f}M" for w, r in rates.items()), min(rates.values()) >= 5e6)
    names = list(wls)
    for den, lim, label in (("interpreter", 8, ">= 8x the reference interpreter overall (b/a)"),
                            ("numpy", 10, ">= 10x the numpy baseline overall (b/c)")):
        agg = _aggregate(rows, names, "fast", den)
        if agg is not None:
            per = [_speed(rows, w, "fast", den) for w in names]
            add(label, f"{agg:.2f}x aggregate (min per workload {min(p for p in per if p is not None):.2f}x)",
                agg >= lim)
    dec = [w for w in names if wls[w].kind == "decoder"]
    sp = {w: _speed(rows, w, "fast", "numpy") for w in dec}
    sp = {w: v for w, v in sp.items() if v is not None}
    if sp:
        add(">= 50x the numpy baseline on decoder workloads (b/c)",
            ", ".join(f"{w} {v:.1f}x" for w, v in sp.items()), min(sp.values()) >= 50)
    comp = {w: fast_ok[w]["compile_s"] for w in fast_ok if wls[w].kind == "conformance"}
    if comp:
        add("compile <= 10 s for the conformance workloads here (b; all 47: benchmarks/compile_times.py)",
            ", ".join(f"{w} {v:.2f}s" for w, v in comp.items()), max(comp.values()) <= 10)
    gd = {w: _speed(rows, w, "fast", "golden") for w in dec}
    gd = {w: v for w, v in gd.items() if v is not None}
    if gd:
        add("decoder emulation <= 10x the golden's time (b/d >= 0.1)",
            ", ".join(f"{w} b/d {v:.3f} ({1 / v:.1f}x the golden)" for w, v in gd.items()), min(gd.values()) >= 0.1)
    if batch:
        if "error" in batch:
            add(">= 20x throughput, batch of 64 vs 64 sequential runs", batch["error"], False)
        else:
            add(">= 20x throughput, batch of 64 vs 64 sequential runs",
                f"{batch['ratio_run']:.1f}x run only, {batch['ratio_total']:.1f}x incl. batch compile "
                f"({batch['case']}, executor {batch.get('executor', 'default')})", batch["ratio_run"] >= 20)
    mem = {w: (r["peak_rss_bytes"], 2 * wls[w].touched_bytes + GIB) for w, r in fast_ok.items()}
    if mem:
        add("peak RSS <= 2x touched + 1 GiB (b)",
            ", ".join(f"{w} {p / 2**20:.0f}/{lim / 2**20:.0f} MiB" for w, (p, lim) in mem.items()),
            all(p <= lim for p, lim in mem.values()))
    same = {w: (r.get("hash") is not None and r.get("hash") == rows.get((w, "interpreter"), {}).get("hash"))
            for w, r in fast_ok.items() if rows.get((w, "interpreter"), {}).get("hash")}
    if same:
        add("bit-identical final state to the reference interpreter (b)",
            ", ".join(f"{w} {'yes' if v else 'NO'}" for w, v in same.items()), all(same.values()))
    return out


def print_tables(wls, rows, tgts, fast_note):
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200)
    t = Table(title="PLENA executors (a) interpreter, (b) fast, (c) numpy baseline, (d) golden (JAX)")
    for col in ("workload", "exec", "static", "dynamic", "compile s", "run s", "dyn instr/s", "peak RSS MiB",
                "touched MiB", "RSS <= 2T+1G", "identical to a", "note"):
        t.add_column(col, justify="left" if col in ("workload", "exec", "note") else "right",
                     overflow="fold", max_width=60 if col == "note" else None)
    for (w, e), r in rows.items():
        wl = wls[w]
        if "error" in r or r.get("skipped"):
            t.add_row(w, f"{LETTER[e]} {e}", str(wl.static), "", "", "", "", "", "", "", "",
                      r.get("error") or r.get("note", ""))
            continue
        dyn = r.get("dynamic") if e != "golden" else None
        rate = dyn / r["run_s"] if dyn and r.get("run_s") else None
        rss = r.get("peak_rss_bytes")
        ok_mem = rss <= 2 * wl.touched_bytes + GIB if rss else None
        ref = rows.get((w, "interpreter"), {}).get("hash")
        same = None if e in ("interpreter", "golden") or r.get("hash") is None or ref is None else r["hash"] == ref
        run_txt = _fmt(r.get("run_s"), ".3f") + ("*" if r.get("extrapolated") else "")
        t.add_row(w, f"{LETTER[e]} {e}", str(wl.static), _fmt(dyn, "d"), _fmt(r.get("compile_s"), ".2f"), run_txt,
                  _fmt(rate, ",.0f"), _fmt(rss / 2**20 if rss else None, ".0f"), f"{wl.touched_bytes / 2**20:.1f}",
                  "" if ok_mem is None else ("yes" if ok_mem else "NO"),
                  "" if same is None else ("yes" if same else "NO"), r.get("note", ""))
    con.print(t)
    con.print("* run s extrapolated from a time-capped run (see note).")
    if fast_note:
        con.print(f"[bold]Note:[/bold] {fast_note}")
    rt = Table(title="speed ratios: run s(x) / run s(b)")
    for col in ("workload", "b/a", "b/c", "b/d"):
        rt.add_column(col, justify="right")
    for w in wls:
        rt.add_row(w, *(_fmt(_speed(rows, w, "fast", o), ".2f") for o in ("interpreter", "numpy", "golden")))
    con.print(rt)
    tt = Table(title="targets (issue: Fast executor)")
    for col in ("target", "measured", "result"):
        tt.add_column(col, overflow="fold")
    for x in tgts:
        tt.add_row(x["target"], x["measured"], "PASS" if x["passed"] else "FAIL")
    con.print(tt)


def run_batch_bench(args) -> dict:
    exe = "fast" if "fast" in args.executors else "interpreter"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out_path = fh.name
    env = dict(os.environ)
    if not args.warm_cache:
        env["PLENA_JAX_CACHE"] = "off"
    p = subprocess.run([sys.executable, str(HERE / "batch.py"), "--executor", exe, "--json", out_path],
                       env=env, capture_output=True, text=True)
    try:
        res = json.loads(Path(out_path).read_text())
    except (OSError, json.JSONDecodeError):
        res = dict(error=f"batch.py exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}")
    finally:
        Path(out_path).unlink(missing_ok=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(CONFORMANCE_WORKLOADS + tuple(DECODER_WORKLOADS)))
    ap.add_argument("--executors", default=",".join(EXECUTORS))
    ap.add_argument("--repeat", type=int, default=3, help="executions per measurement; the best counts")
    ap.add_argument("--min-run-s", type=float, default=1.0,
                    help="repeat a measurement until its runs add up to this many seconds (at most %d runs)" % MAX_RUNS)
    ap.add_argument("--quick", action="store_true", help="small decoder shape instead of SmolLM2-135M")
    ap.add_argument("--numpy-max-s", type=float, default=20.0, help="time cap of one numpy run (s)")
    ap.add_argument("--interpreter-max-steps", type=int, default=None,
                    help="stop (a) after this many instructions and extrapolate (default: run it all)")
    ap.add_argument("--no-batch", action="store_true", help="skip the batch-of-64 target (benchmarks/batch.py)")
    ap.add_argument("--warm-cache", action="store_true", help="keep the persistent XLA compile cache on")
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--child-executor", help=argparse.SUPPRESS)
    ap.add_argument("--child-workload", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_executor:
        return child_main(args)
    args.executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    bad = [e for e in args.executors if e not in EXECUTORS]
    if bad:
        ap.error(f"unknown executor(s) {bad}; choose from {EXECUTORS}")
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    fast_note = None if has_executor_arg() else \
        "plena.emu_jax.api.run has no executor= argument yet: column (b) ran the reference interpreter"

    wls: dict[str, Workload] = {}
    rows: dict = {}
    with tempfile.TemporaryDirectory(prefix="plena-bench-") as tmp:
        for name in names:
            if name not in CONFORMANCE_WORKLOADS and name not in DECODER_WORKLOADS:
                ap.error(f"unknown workload {name!r}")
            t0 = time.perf_counter()
            wl = prepare(name, args.quick, Path(tmp))
            if wl is None:
                print(f"{name}: skipped (../shared/conformance is absent)", flush=True)
                continue
            wls[name] = wl
            print(f"{name}: {wl.static} static / {wl.dynamic} dynamic instructions, touched "
                  f"{wl.touched_bytes / 2**20:.1f} MiB (prepared in {time.perf_counter() - t0:.1f} s)", flush=True)
            for e in args.executors:
                t0 = time.perf_counter()
                r = run_child(wl, e, args)
                rows[(name, e)] = r
                print(f"  {LETTER[e]} {e:11s} " + (r["error"] if "error" in r else
                      f"compile {_fmt(r.get('compile_s'), '.2f')} s, run {_fmt(r.get('run_s'), '.3f')} s, "
                      f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB") + f"  [{time.perf_counter() - t0:.0f} s]",
                      flush=True)
    batch = None if args.no_batch else run_batch_bench(args)
    tgts = targets(wls, rows, batch)
    print_tables(wls, rows, tgts, fast_note)
    if args.json:
        doc = dict(fast_executor_available=fast_note is None, note=fast_note, quick=args.quick,
                   repeat=args.repeat, numpy_max_s=args.numpy_max_s,
                   workloads={w: dataclasses.asdict(wl) for w, wl in wls.items()},
                   results=[dict(workload=w, executor=e, **r) for (w, e), r in rows.items()],
                   ratios={w: {f"b/{LETTER[o]}": _speed(rows, w, "fast", o) for o in ("interpreter", "numpy", "golden")}
                           for w in wls},
                   batch=batch, targets=tgts)
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
