"""Every frontend op on every machine size: emulator output vs hardware golden, bit for bit.

    python benchmarks/config_sweep.py [--mlen 16 32 64 128 256] [--json out.json]

For each MLEN = VLEN in {16, 32, 64, 128, 256} (with its own BLEN, HLEN = MLEN / 4,
BROADCAST_AMOUNT 4 and prefetch / writeback amounts, :data:`CONFIGS`) one program holds every
op of the library at small shapes (linear with bias and two K-chunks, RMSNorm, LayerNorm,
softmax, residual and embedding add, SiLU, GELU, gated FFN, RoPE, causal GQA flash attention,
routed MoE with V_TOPK), runs once on the emulator, and each output is compared with the op's
hardware-policy golden. Prints a table op x config of the % of bit-identical bf16 values
(100.0 everywhere is the claim) and the build / run / golden times.

``tests/test_config_sweep.py`` runs the same function (MLEN 16 / 64 / 256 by default, 32 and
128 marked slow).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from plena.config import default_config
from plena.frontend import ProgramBuilder
from plena.frontend import ops_attention as FA
from plena.frontend import ops_basic as FB
from plena.frontend import ops_ffn as FF
from plena.frontend import ops_moe as FM
from plena.golden import Policy
from plena.golden import ops_attention as GA
from plena.golden import ops_basic as GB
from plena.golden import ops_ffn as GF
from plena.golden import ops_moe as GM

BASE = default_config()
#: MLEN -> machine (MLEN = VLEN, HLEN = MLEN / BROADCAST_AMOUNT, BLEN and the HBM amounts varied)
CONFIGS = {
    16: BASE.replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=4, hbm_m_prefetch_amount_raw=16,
                     hbm_v_prefetch_amount=4, hbm_v_writeback_amount=4),
    32: BASE.replace(mlen=32, vlen=32, hlen=8, broadcast_amount=4, blen=8, hbm_m_prefetch_amount_raw=64,
                     hbm_v_prefetch_amount=8, hbm_v_writeback_amount=4),
    64: BASE,
    128: BASE.replace(mlen=128, vlen=128, hlen=32, broadcast_amount=4, blen=16, hbm_m_prefetch_amount_raw=128,
                      hbm_v_prefetch_amount=16, hbm_v_writeback_amount=16),
    256: BASE.replace(mlen=256, vlen=256, hlen=64, broadcast_amount=4, blen=8, hbm_m_prefetch_amount_raw=256,
                      hbm_v_prefetch_amount=4, hbm_v_writeback_amount=8),
}
OPS = ("linear", "rms_norm", "layer_norm", "softmax", "residual_add", "embedding_add", "silu", "gelu",
       "ffn", "rope", "flash_attention", "moe", "moe_topk")


def _rand(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _rope_tables(rows, head_dim, width):
    inv = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    ang = (np.arange(rows)[:, None] + 3) * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    reps = width // head_dim
    return np.tile(cos, reps).astype(np.float32), np.tile(sin, reps).astype(np.float32)


def sweep(cfg, seed: int = 0) -> dict:
    """Build, run and check every op on machine ``cfg``. Returns ``{"ops": {op: (emulator,
    golden)}, "build_s", "run_s", "golden_s", "instructions"}``."""
    t0 = time.perf_counter()
    m, blen = cfg.mlen, cfg.blen
    rng = np.random.default_rng(seed)
    rows = math.lcm(blen, cfg.hbm_v_prefetch_amount, cfg.hbm_v_writeback_amount)  # whole bursts / row blocks
    M = 5  # the VramMatrix ops take any row count
    P = cfg.hbm_m_prefetch_amount
    d = {"x": _rand(rng, (M, 2 * m), 2.0), "w": _rand(rng, (2 * m, m), 1 / np.sqrt(2 * m)), "bias": _rand(rng, (1, m)),
         "g": _rand(rng, (1, 2 * m)), "b": _rand(rng, (1, 2 * m)), "emb": _rand(rng, (1, 2 * m)),
         "r": _rand(rng, (M, 2 * m)), "a": _rand(rng, (rows, m), 3.0), "fx": _rand(rng, (rows, m)),
         "wg": _rand(rng, (m, 2 * m), 1 / np.sqrt(m)), "wu": _rand(rng, (m, 2 * m), 1 / np.sqrt(m)),
         "wd": _rand(rng, (2 * m, m), 1 / np.sqrt(2 * m)), "q": _rand(rng, (m, m)), "k": _rand(rng, (m, m)),
         "v": _rand(rng, (m, m))}
    head_dim = m // 2
    d["cos"], d["sin"] = _rope_tables(rows, head_dim, m)
    E = 32
    epad = -(-E // m) * m
    moe = GM.TOPK_POLICIES[0]
    mo = {"x": _rand(rng, (2, m), 1.5), "wr": _rand(rng, (m, epad), 3 / np.sqrt(m)),
          "wg": _rand(rng, (E, m, m), 2 / np.sqrt(m)), "wu": _rand(rng, (E, m, m), 2 / np.sqrt(m)),
          "wd": _rand(rng, (E, m, m), 1 / np.sqrt(m))}

    b = ProgramBuilder(cfg)
    act = lambda n, a: b.hbm_input(n, a, pad_rows=cfg.hbm_v_prefetch_amount)  # noqa: E731
    wgt = lambda n, a: b.hbm_input(n, a, use="weight", pad_rows=P)  # noqa: E731
    t = {k: act(k, d[k]) for k in ("x", "bias", "g", "b", "emb", "r", "a", "fx", "cos", "sin", "q")}
    out = {}
    x = FB.as_vram(b, t["x"], "xv")
    out["linear"] = FB.linear(b, x, wgt("w", d["w"]), bias=t["bias"], name="lin")
    out["rms_norm"] = FB.rms_norm(b, x, weight=t["g"], name="rms")
    out["layer_norm"] = FB.layer_norm(b, x, weight=t["g"], bias=t["b"], name="ln")
    out["softmax"] = FB.softmax(b, x, scale=0.5, name="sm")
    out["residual_add"] = FB.residual_add(b, x, t["r"], name="res")
    out["embedding_add"] = FB.embedding_add(b, x, t["emb"], name="emb")
    a = FB.as_vram(b, t["a"], "av")
    for kind in ("silu", "gelu"):
        out[kind] = FB.vram_matrix(b, f"{kind}_out", rows, m)
        FF.activation(b, kind, a.region, out[kind].region, name=kind)
    fx = FB.as_vram(b, t["fx"], "fxv")
    out["ffn"] = FB.vram_matrix(b, "ffn_out", rows, m)
    FF.ffn(b, fx.region, rows, *(wgt(n, d[n]) for n in ("wg", "wu", "wd")), out["ffn"].region, name="ffn")
    out["rope"] = FB.vram_matrix(b, "rope_out", rows, m)
    FF.rope(b, fx.region, FB.as_vram(b, t["cos"], "cosv").region, FB.as_vram(b, t["sin"], "sinv").region,
            out["rope"].region, head_dim=head_dim, name="rope")
    kv = {n: b.hbm_input(n + "_kv", d[n], use="kv", pad_rows=P) for n in ("k", "v")}
    H, Hkv = cfg.broadcast_amount, 2
    out["flash_attention"] = FA.flash_attention(b, t["q"], kv["k"], kv["v"], num_heads=H, num_kv_heads=Hkv,
                                                causal=True, name="attn")
    r = FM.routed_moe(b, act("moe_x", mo["x"]), wgt("moe_wr", mo["wr"]),
                      *(FM.expert_weights(b, f"moe_{n}", mo[n]) for n in ("wg", "wu", "wd")), name="moe")
    prog = b.build()
    t1 = time.perf_counter()
    res = prog.run()
    t2 = time.perf_counter()
    emu = {k: v.read(prog, res) for k, v in out.items()}
    emu["moe"] = r.out.read(prog, res)
    T, K = 2, moe[1]
    emu["moe_topk"] = np.concatenate([
        np.asarray(res.state.intsram)[int(r.indices): int(r.indices) + T * K].astype(np.float32),
        prog.read_fpsram(res, r.weights)])

    hw = Policy.hardware(cfg)
    ld = lambda n: GB.from_hbm(d[n], hw)  # noqa: E731
    xv = ld("x")
    gold = {
        "linear": GB.linear(xv, d["w"], ld("bias"), cfg=cfg, policy=hw),
        "rms_norm": GB.rms_norm(xv, ld("g"), cfg=cfg, policy=hw),
        "layer_norm": GB.layer_norm(xv, ld("g"), ld("b"), cfg=cfg, policy=hw),
        "softmax": GB.softmax(xv, cfg=cfg, scale=0.5, policy=hw),
        "residual_add": GB.residual_add(xv, ld("r"), policy=hw),
        "embedding_add": GB.embedding_add(xv, ld("emb"), policy=hw),
        "silu": GF.silu(ld("a"), hw), "gelu": GF.gelu(ld("a"), hw),
        "ffn": GF.ffn(ld("fx"), d["wg"], d["wu"], d["wd"], cfg, hw),
        "rope": GF.rope(ld("fx"), ld("cos"), ld("sin"), head_dim, cfg, hw),
        "flash_attention": GA.flash_attention(ld("q"), d["k"], d["v"], cfg=cfg, num_heads=H, num_kv_heads=Hkv,
                                              causal=True, policy=hw),
    }
    g_out, g_idx, g_w = GM.routed_moe(GB.from_hbm(mo["x"], hw), mo["wr"], mo["wg"], mo["wu"], mo["wd"], cfg=cfg,
                                      policy=hw)
    gold["moe"] = g_out
    gold["moe_topk"] = np.concatenate([np.asarray(g_idx, np.float32).reshape(-1), np.asarray(g_w).reshape(-1)])
    gold = {k: np.asarray(v, np.float32) for k, v in gold.items()}
    t3 = time.perf_counter()
    return {"ops": {k: (emu[k], gold[k]) for k in OPS}, "build_s": t1 - t0, "run_s": t2 - t1,
            "golden_s": t3 - t2, "instructions": res.instructions}


def bit_exact_pct(emulated, golden) -> float:
    e, g = np.asarray(emulated, np.float32), np.asarray(golden, np.float32)
    if e.shape != g.shape:
        return 0.0
    return 100.0 * float(np.mean(e.view(np.uint32) == g.view(np.uint32)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mlen", type=int, nargs="*", default=sorted(CONFIGS), choices=sorted(CONFIGS))
    ap.add_argument("--json", help="write the table as JSON")
    args = ap.parse_args(argv)
    table, info = {}, {}
    for mlen in args.mlen:
        cfg = CONFIGS[mlen]
        print(f"MLEN={mlen} BLEN={cfg.blen} HLEN={cfg.hlen} ...", end=" ", flush=True)
        r = sweep(cfg)
        table[mlen] = {op: bit_exact_pct(e, g) for op, (e, g) in r["ops"].items()}
        info[mlen] = {k: r[k] for k in ("build_s", "run_s", "golden_s", "instructions")}
        print(f"build {r['build_s']:.1f} s, run {r['run_s']:.1f} s, golden {r['golden_s']:.1f} s, "
              f"{r['instructions']} instructions", flush=True)
    cols = list(table)
    head = "op".ljust(16) + "".join(f"MLEN={c}".rjust(10) for c in cols)
    print("\nbit-exact % (emulator vs hardware golden)\n" + head + "\n" + "-" * len(head))
    for op in OPS:
        print(op.ljust(16) + "".join(f"{table[c][op]:10.1f}" for c in cols))
    ok = all(v == 100.0 for row in table.values() for v in row.values())
    print(f"\nconfig_sweep: configs={len(cols)} ops={len(OPS)} all_bit_exact={ok}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bit_exact_pct": table, "timing": info, "configs": {
                c: dict(mlen=CONFIGS[c].mlen, blen=CONFIGS[c].blen, hlen=CONFIGS[c].hlen,
                        hbm_m_prefetch_amount=CONFIGS[c].hbm_m_prefetch_amount,
                        hbm_v_prefetch_amount=CONFIGS[c].hbm_v_prefetch_amount,
                        hbm_v_writeback_amount=CONFIGS[c].hbm_v_writeback_amount) for c in cols}}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
