"""Basic ops (plena.frontend.ops_basic + plena.golden.ops_basic): linear, RMSNorm, LayerNorm,
softmax, residual / embedding add.

(a) Bit-exactness: one program per machine config chains every op (HBM inputs, in-place ops,
    an op reading another op's VRAM output, an HBM store) and runs on the emulator; every
    output must equal the hardware-policy golden bit for bit. Two configs: the default machine
    (MLEN 64, BLEN 4) and a small one (MLEN 16, BLEN 8, two tiles per H_PREFETCH_M, different
    prefetch / writeback bursts).
(b) fp32 policy: close to a float64 numpy reference.
(c) Gradients: jax.grad through every op in fp32 mode equals the gradient of a plain jnp
    formula and a finite difference; hardware mode gives finite gradients.
(d) Build-time errors.
(e) Conformance: the ops compiled from a case's own inputs/*.npy with the case's config pass
    the case's upstream rule against its golden.f32.bin (strict match % reported too); skipped
    without ../shared.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from plena.config import default_config, load_config
from plena.frontend import BuildError, ProgramBuilder
from plena.frontend import ops_basic as F
from plena.golden import Policy
from plena.golden import ops_basic as G

from conftest import CONFORMANCE, judge_case_output

CFG = default_config()
SMALL = CFG.replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=8,
                    hbm_m_prefetch_amount_raw=32, hbm_v_prefetch_amount=4, hbm_v_writeback_amount=8)
CONFIGS = {"default": CFG, "small": SMALL}
F32 = Policy.fp32()


def bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def rand(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def same_bits(golden, emulated):
    g, e = np.asarray(golden, np.float32), np.asarray(emulated, np.float32)
    assert g.shape == e.shape
    bad = np.nonzero(g.view(np.uint32) != e.view(np.uint32))
    assert bad[0].size == 0, (f"{bad[0].size} of {g.size} differ, first at {tuple(int(i[0]) for i in bad)}: "
                              f"golden {g[tuple(i[0] for i in bad)]}, emulator {e[tuple(i[0] for i in bad)]}")


# =============================================================================================
# (a) bit-exact: one chained program per config
# =============================================================================================

@functools.lru_cache(maxsize=None)
def chained_run(cfg_name: str):
    """Build and run the chained program; return {op: (emulator output, golden output)}."""
    cfg = CONFIGS[cfg_name]
    v, P = cfg.vlen, cfg.hbm_m_prefetch_amount
    burst = cfg.hbm_v_prefetch_amount
    rng = np.random.default_rng(7)
    M = 13  # not a multiple of BLEN or of the bursts
    x = rand(rng, (M, 2 * v), 2.0)
    w = rand(rng, (2 * v, 2 * v), 1 / np.sqrt(2 * v))
    bias = rand(rng, (1, 2 * v))
    h = rand(rng, (M, 3 * v), 3.0)
    g_rms = rand(rng, (1, 3 * v))
    w2 = rand(rng, (3 * v, v), 0.2)
    ln_w, ln_b = rand(rng, (1, 2 * v)), rand(rng, (1, 2 * v))
    s_in = rand(rng, (M, 2 * v), 4.0)
    s_in[3, :] = -200.0  # a constant row: uniform output
    s_in[5, 7] = 60.0  # a dominant element
    emb = rand(rng, (1, 2 * v))
    small_x = rand(rng, (M, v), 0.5)

    b = ProgramBuilder(cfg)
    act = lambda name, a: b.hbm_input(name, a, pad_rows=burst)  # noqa: E731
    xt, bt, ht, gt = act("x", x), act("bias", bias), act("h", h), act("g", g_rms)
    wt = b.hbm_input("w", w, use="weight", pad_rows=P)
    w2t = b.hbm_input("w2", w2, use="weight", pad_rows=P)
    lwt, lbt, st, et, sxt = act("ln_w", ln_w), act("ln_b", ln_b), act("s", s_in), act("emb", emb), act("sx", small_x)
    y_store = b.hbm_output("y_hbm", M, 2 * v)

    out = {}
    out["linear"] = F.linear(b, xt, wt, bias=bt, store=y_store, name="lin")
    out["rms_norm_w"] = F.rms_norm(b, ht, weight=gt, name="rms")  # D = 3 VLEN
    out["linear_vram_in"] = F.linear(b, out["rms_norm_w"], w2t, name="lin2")  # K = 3 MLEN
    out["layer_norm"] = F.layer_norm(b, out["linear"], weight=lwt, bias=lbt, eps=1e-5, name="ln")
    out["residual_add"] = F.residual_add(b, out["layer_norm"], out["linear"], name="res")
    sm = F.vram_matrix(b, "s_vram", M, 2 * v)
    F.load_matrix(b, st, sm)
    out["softmax_scaled"] = F.softmax(b, sm, scale=0.3, out=sm, name="sm")  # in place
    out["embedding_add"] = F.embedding_add(b, out["residual_add"], et, out=out["residual_add"], name="emb")
    sx = F.as_vram(b, sxt, "sx_vram")
    out["softmax"] = F.softmax(b, sx, name="sm1")
    out["rms_norm"] = F.rms_norm(b, sx, out=sx, eps=1e-3, name="rms1")  # in place, D = VLEN
    prog = b.build()
    res = prog.run()
    emu = {k: m.read(prog, res) for k, m in out.items()}
    emu["linear_hbm"] = prog.read_hbm_output(res, y_store)

    # the golden chain starts from the VRAM values of the loaded inputs, bf16(MX decode): the
    # builder's decoded HBM values (G.from_hbm gives the same, test_from_hbm_...); weights raw
    vram_in = {k: bf16(t.decoded) for k, t in dict(x=xt, bias=bt, h=ht, g_rms=gt, ln_w=lwt, ln_b=lbt,
                                                     s_in=st, emb=et, small_x=sxt).items()}
    gold = golden_chain(dict(vram_in, w=w, w2=w2), cfg)
    # (the residual sum itself was overwritten in place by the embedding add)
    ref = {"linear": x @ w + bias, "rms_norm": small_x / np.sqrt((small_x ** 2).mean(-1, keepdims=True) + 1e-3)}
    assert res.instructions == prog.dynamic_instructions  # the builder's static count is exact
    return emu, {k: np.asarray(v_) for k, v_ in gold.items()}, ref, res


def golden_chain(a, cfg):
    """The hardware golden of the chained program (inputs: VRAM values of the loaded
    activations, raw weights; same order of operations)."""
    hw = Policy.hardware(cfg)
    ld = lambda v: v  # noqa: E731  (already the VRAM values)
    gold = {}
    gold["linear"] = G.linear(ld(a["x"]), a["w"], ld(a["bias"]), cfg=cfg, policy=hw)
    gold["linear_hbm"] = G.to_hbm(gold["linear"], hw)
    gold["rms_norm_w"] = G.rms_norm(ld(a["h"]), ld(a["g_rms"]), cfg=cfg, policy=hw)
    gold["linear_vram_in"] = G.linear(gold["rms_norm_w"], a["w2"], cfg=cfg, policy=hw)
    gold["layer_norm"] = G.layer_norm(gold["linear"], ld(a["ln_w"]), ld(a["ln_b"]), cfg=cfg, eps=1e-5, policy=hw)
    gold["residual_add"] = G.residual_add(gold["layer_norm"], gold["linear"], policy=hw)
    gold["softmax_scaled"] = G.softmax(ld(a["s_in"]), cfg=cfg, scale=0.3, policy=hw)
    gold["embedding_add"] = G.embedding_add(gold["residual_add"], ld(a["emb"]), policy=hw)
    gold["softmax"] = G.softmax(ld(a["small_x"]), cfg=cfg, policy=hw)
    gold["rms_norm"] = G.rms_norm(ld(a["small_x"]), cfg=cfg, eps=1e-3, policy=hw)
    return gold


def test_from_hbm_and_to_hbm_are_the_machine_transfers():
    """G.from_hbm = bf16 of the HBM tensor's MX decode (what H_PREFETCH_V writes); G.to_hbm is
    idempotent on stored values and identity in fp32 mode."""
    rng = np.random.default_rng(2)
    x = rand(rng, (5, 128), 3.0)
    x[1, :8] = 0.0  # an all-zero block
    b = ProgramBuilder(CFG)
    t = b.hbm_input("x", x)
    hw = Policy.hardware(CFG)
    same_bits(G.from_hbm(x, hw), bf16(t.decoded))
    once = G.to_hbm(x, hw)
    same_bits(once, t.decoded)
    same_bits(G.to_hbm(once, hw), once)
    np.testing.assert_array_equal(G.from_hbm(x, F32), x)


OPS = ["linear", "linear_hbm", "linear_vram_in", "rms_norm", "rms_norm_w", "layer_norm",
       "softmax", "softmax_scaled", "embedding_add"]


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("op", OPS)
def test_emulator_equals_hardware_golden(cfg_name, op):
    emu, gold, _, _ = chained_run(cfg_name)
    same_bits(gold[op], emu[op])
    assert np.isfinite(gold[op]).all() and np.abs(gold[op]).max() > 0


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_chained_program_is_plausible(cfg_name):
    """The hardware results are near the exact math (MXFP8 inputs, bf16 storage) and softmax
    rows sum to ~1."""
    emu, gold, ref, res = chained_run(cfg_name)
    rel = np.linalg.norm(emu["linear"] - ref["linear"]) / np.linalg.norm(ref["linear"])
    assert rel < 0.05
    rel = np.linalg.norm(emu["rms_norm"] - ref["rms_norm"]) / np.linalg.norm(ref["rms_norm"])
    assert rel < 0.06  # MXFP8 input: 3 mantissa bits
    for k in ("softmax", "softmax_scaled"):
        assert np.allclose(emu[k].sum(-1), 1.0, atol=0.03)
    assert np.allclose(emu["softmax_scaled"][3], emu["softmax_scaled"][3, 0])  # constant row: uniform
    assert emu["softmax_scaled"][5, 7] > 0.99
    assert res.opcode_counts["M_MM"] > 0 and res.opcode_counts["M_MM_WO"] > 0


def test_linear_program_shape():
    """The emitted linear is the K-split matmul: one M_MM per (row block, BLEN column block,
    K chunk), one M_MM_WO per (row block, column block), one H_PREFETCH_M per strip and load."""
    cfg = SMALL
    b = ProgramBuilder(cfg)
    M, K, N = 13, 3 * cfg.mlen, 2 * cfg.mlen
    x = b.hbm_input("x", np.ones((M, K)), pad_rows=cfg.hbm_v_prefetch_amount)
    w = b.hbm_input("w", np.ones((K, N)), use="weight", pad_rows=cfg.hbm_m_prefetch_amount)
    F.linear(b, x, w)
    prog = b.build()
    asm = prog.asm
    row_blocks, col_blocks, chunks = -(-M // cfg.blen), N // cfg.blen, K // cfg.mlen
    res = prog.run()
    assert res.opcode_counts["M_MM"] == row_blocks * col_blocks * chunks
    assert res.opcode_counts["M_MM_WO"] == row_blocks * col_blocks
    loads = -(-K // cfg.hbm_m_prefetch_amount)
    assert asm.count("H_PREFETCH_M") == (N // cfg.mlen) * loads
    assert res.instructions == prog.dynamic_instructions


# =============================================================================================
# (b) fp32 policy vs float64 numpy
# =============================================================================================

def np_rms(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def np_ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def np_softmax(x, scale):
    z = x * scale
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_fp32_policy_matches_float64_reference():
    rng = np.random.default_rng(3)
    x = rand(rng, (6, 128), 2.0)
    w = rand(rng, (128, 64), 0.1)
    bias, gw, gb = rand(rng, (64,)), rand(rng, (128,)), rand(rng, (128,))
    x64 = x.astype(np.float64)
    close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-5)
    close(G.linear(x, w, bias, cfg=CFG, policy=F32), x64 @ w + bias)
    close(G.rms_norm(x, gw, cfg=CFG, eps=1e-6, policy=F32), np_rms(x64, gw, 1e-6))
    close(G.layer_norm(x, gw, gb, cfg=CFG, eps=1e-5, policy=F32), np_ln(x64, gw, gb, 1e-5))
    close(G.softmax(x, cfg=CFG, scale=0.3, policy=F32), np_softmax(x64, 0.3))
    close(G.softmax(x, cfg=CFG, policy=F32), np_softmax(x64, 1.0))
    close(G.residual_add(x, 2 * x, policy=F32), 3 * x64)
    close(G.embedding_add(x, gw, policy=F32), x64 + gw)
    # hardware mode differs from fp32 (bf16 / MX roundings) but stays close
    hw = Policy.hardware(CFG)
    assert not np.array_equal(G.rms_norm(x, gw, cfg=CFG, policy=hw), G.rms_norm(x, gw, cfg=CFG, policy=F32))
    np.testing.assert_allclose(G.rms_norm(x, gw, cfg=CFG, policy=hw), np_rms(x64, gw, 1e-6), rtol=0.03, atol=0.03)


# =============================================================================================
# (c) gradients
# =============================================================================================

def _plain(name):
    """The same ops written as plain jnp formulas (reference for the derivatives)."""
    return {
        "linear": lambda x, p: x @ p["w"] + p["b"],
        "rms_norm": lambda x, p: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["g"],
        "layer_norm": lambda x, p: ((x - x.mean(-1, keepdims=True))
                                    * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * p["g"] + p["b2"]),
        "softmax": lambda x, p: jax.nn.softmax(0.5 * x, axis=-1),
        "residual_add": lambda x, p: x + p["r"],
    }[name]


def _golden(name, policy):
    return {
        "linear": lambda x, p: G.linear(x, p["w"], p["b"], cfg=CFG, policy=policy),
        "rms_norm": lambda x, p: G.rms_norm(x, p["g"], cfg=CFG, eps=1e-6, policy=policy),
        "layer_norm": lambda x, p: G.layer_norm(x, p["g"], p["b2"], cfg=CFG, eps=1e-5, policy=policy),
        "softmax": lambda x, p: G.softmax(x, cfg=CFG, scale=0.5, policy=policy),
        "residual_add": lambda x, p: G.residual_add(x, p["r"], policy=policy),
    }[name]


@pytest.mark.parametrize("name", ["linear", "rms_norm", "layer_norm", "softmax", "residual_add"])
def test_gradients(name):
    rng = np.random.default_rng(11)
    d = 128 if name == "linear" else 64  # linear: two K-chunks
    x = jnp.asarray(rand(rng, (3, d), 1.5))
    p = {"w": rand(rng, (d, 64), 0.1), "b": rand(rng, (64,)), "g": rand(rng, (d,)),
         "b2": rand(rng, (d,)), "r": rand(rng, (3, d))}
    p = jax.tree_util.tree_map(jnp.asarray, p)
    out_shape = jax.eval_shape(_plain(name), x, p).shape
    cot = jnp.asarray(rand(rng, out_shape))

    def loss(fn):
        return lambda x, p: jnp.sum(fn(x, p) * cot)

    grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1)))  # noqa: E731
    gx, gp = grad(_golden(name, F32))(x, p)
    rx, rp = grad(_plain(name))(x, p)
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-5)
    for k in rp:
        np.testing.assert_allclose(gp[k], rp[k], rtol=1e-4, atol=1e-5)
    # directional finite difference (central, f32): d/dt loss(x + t v)
    v = jnp.asarray(rand(rng, x.shape))
    f = jax.jit(loss(_golden(name, F32)))
    t = 1e-2
    fd = (f(x + t * v, p) - f(x - t * v, p)) / (2 * t)
    np.testing.assert_allclose(jnp.vdot(gx, v), fd, rtol=2e-2, atol=2e-2)
    # hardware mode: straight-through gradients exist and are finite
    hx, hp = grad(_golden(name, Policy.hardware(CFG)))(x, p)
    assert np.isfinite(hx).all() and all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(hp))
    assert float(jnp.abs(hx).max()) > 0


def test_vram_matrix_layout():
    """Column-block-major: (r, c) at region.addr + ((c // VLEN) * pitch + r) * VLEN + c % VLEN."""
    b = ProgramBuilder(CFG)
    b.vram("pad", 3)
    m = F.vram_matrix(b, "m", 5, 192)
    assert m.pitch == F.default_pitch(CFG, 5) == 8 and m.region.rows == 24 and m.blocks == 3
    assert m.addr(4, 2) == m.region.addr + (2 * 8 + 4) * 64 == (3 + 20) * 64
    v = np.arange(5 * 192, dtype=np.float32).reshape(5, 192)
    img = m.to_vram_rows(v)
    assert img[2 * 8 + 4, 7] == v[4, 2 * 64 + 7] and not img[5:8].any()


def test_golden_jits_with_static_policy():
    rng = np.random.default_rng(5)
    x = rand(rng, (4, 64))
    hw = Policy.hardware(CFG)
    fn = jax.jit(G.rms_norm, static_argnames=("cfg", "eps", "policy"))
    np.testing.assert_array_equal(fn(x, cfg=CFG, eps=1e-6, policy=hw), G.rms_norm(x, cfg=CFG, eps=1e-6, policy=hw))
    with pytest.raises(ValueError, match="not a multiple of VLEN"):
        G.softmax(np.ones((2, 40), np.float32), cfg=CFG)


# =============================================================================================
# (d) build-time errors
# =============================================================================================

def test_build_errors():
    b = ProgramBuilder(CFG)
    x = b.hbm_input("x", np.ones((4, 64)))
    w_odd = b.hbm_input("w_odd", np.ones((64, 72)), use="weight")
    w_act = b.hbm_input("w_act", np.ones((64, 64)))
    w_short = b.hbm_input("w_short", np.ones((32, 64)), use="weight")
    w_ok = b.hbm_input("w_ok", np.ones((64, 128)), use="weight")
    with pytest.raises(BuildError, match="multiples of MLEN"):
        F.linear(b, x, w_odd)
    with pytest.raises(BuildError, match="use='weight'"):
        F.linear(b, x, w_act)
    with pytest.raises(BuildError, match=r"X is \(4, 64\) but W is \(32, 64\)"):
        F.linear(b, x, w_short)
    xv = F.vram_matrix(b, "xv", 4, 64)
    with pytest.raises(BuildError, match="out must be a VramMatrix of shape"):
        F.linear(b, xv, w_ok, out=xv)
    big = F.vram_matrix(b, "big", 4, 128)
    with pytest.raises(BuildError, match="may not overlap"):
        F.linear(b, big, b.hbm_input("w_sq", np.ones((128, 128)), use="weight"), out=big)
    part = F.VramMatrix(big.region, 4, 64, 4)  # block 0 of `big`
    with pytest.raises(BuildError, match="partly overlaps"):
        F.softmax(b, part, out=F.VramMatrix(big.region, 4, 64, 5))
    with pytest.raises(BuildError, match="shapes .* do not match"):
        F.residual_add(b, xv, big)
    with pytest.raises(BuildError, match=r"expected \(1, 64\)"):
        F.rms_norm(b, xv, weight=xv)
    with pytest.raises(BuildError, match="pitch 2 must be >= rows"):
        F.VramMatrix(xv.region, 4, 64, 2)
    with pytest.raises(BuildError, match="not a positive multiple of VLEN"):
        F.vram_matrix(b, "odd", 4, 40)
    b2 = ProgramBuilder(CFG.replace(hbm_m_prefetch_amount_raw=128))
    x2 = b2.hbm_input("x", np.ones((4, 64)))
    w2 = b2.hbm_input("w", np.ones((64, 64)), use="weight")
    with pytest.raises(BuildError, match="pad it to 128"):
        F.linear(b2, x2, w2)


# =============================================================================================
# (e) conformance cases: compiled from their inputs, judged by their rules
# =============================================================================================

def _case_inputs(case):
    return {p.stem: np.load(p) for p in sorted((case.path / "inputs").glob("*.npy"))}


def _build_case(name):
    """(case, program, output VramMatrix, hardware-golden output): the case compiled with our ops."""
    from plena.verify.conformance import load_case

    case = load_case(CONFORMANCE / name)
    cfg = load_config(case.settings_toml)
    ins = _case_inputs(case)
    b = ProgramBuilder(cfg)
    hw = Policy.hardware(cfg)
    act = lambda n, a: b.hbm_input(n, np.atleast_2d(a), pad_rows=cfg.hbm_v_prefetch_amount)  # noqa: E731
    ld = lambda a: G.from_hbm(np.atleast_2d(a), hw)  # noqa: E731
    X = ins.get("X", ins.get("act_tensor"))
    W = ins.get("W", ins.get("weights"))
    op, eps = CONFORMANCE_CASES[name]
    if op == "linear":
        wt = b.hbm_input("W", W, use="weight", pad_rows=cfg.hbm_m_prefetch_amount)
        out = F.linear(b, act("X", X), wt)
        gold = G.linear(ld(X), W, cfg=cfg, policy=hw)
    elif op == "rms_norm":
        out = F.rms_norm(b, act("X", X), weight=None if W is None else act("w", W), eps=eps)
        gold = G.rms_norm(ld(X), None if W is None else ld(W), cfg=cfg, eps=eps, policy=hw)
    elif op == "layer_norm":
        out = F.layer_norm(b, act("X", X), weight=None if W is None else act("w", W), eps=eps)
        gold = G.layer_norm(ld(X), None if W is None else ld(W), cfg=cfg, eps=eps, policy=hw)
    elif op == "softmax":
        out = F.softmax(b, act("X", X), scale=0.125)  # the cases' 1/sqrt(64) (FP SRAM slot 1)
        gold = G.softmax(ld(X), cfg=cfg, scale=0.125, policy=hw)
    else:  # embedding add
        out = F.embedding_add(b, act("X", X), act("POS", ins["POS"]))
        gold = G.embedding_add(ld(X), ld(ins["POS"]), policy=hw)
    # the eps / scale we use are the values the case preloads (as f16)
    pre = np.asarray(case.manifest.get("fp_sram_preload") or [], np.float32).astype(np.float16)
    if op == "softmax":
        assert np.float16(0.125) in pre
    elif op in ("rms_norm", "layer_norm"):
        assert np.float16(eps) in pre
    return case, b.build(), out, np.asarray(gold)


# case -> (op, eps): eps is the value the case preloads into FP SRAM (as f16) next to 1/D.
# Machines: the default config and the ci_*_m64b8s64 one (BLEN 8, bursts of 8), one emulator
# compile each (ci_linear_m16b4s16, ci_linear_m64b16b2s32 and de_layer_norm, MLEN 128, pass too
# but would cost three more compiles).
CONFORMANCE_CASES = {
    "aten_linear": ("linear", None), "de_linear": ("linear", None),
    "de_linear_loop": ("linear", None), "ci_linear_m64b8s64": ("linear", None),
    "aten_rms_norm": ("rms_norm", 1e-6), "aten_norm_rms": ("rms_norm", 1e-5),
    "de_rms": ("rms_norm", 1e-6), "ci_rms_norm_m64b8s64": ("rms_norm", 1e-6),
    "aten_layer_norm": ("layer_norm", 1e-6), "aten_norm_layer": ("layer_norm", 1e-5),
    "ci_layer_norm_m64b8s64": ("layer_norm", 1e-6),
    "aten_softmax": ("softmax", None), "ci_softmax_m64b8s64": ("softmax", None),
    "aten_embedding_add": ("embedding_add", None), "ci_embedding_add_m64b8s64": ("embedding_add", None),
}


@pytest.mark.parametrize("name", list(CONFORMANCE_CASES))
def test_conformance_case_from_its_inputs(name, capsys):
    if not (CONFORMANCE / name / "inputs").is_dir():
        pytest.skip("../shared/conformance is absent")
    case, prog, out, gold = _build_case(name)
    sim = out.read(prog, prog.run())
    _, strict_pct = judge_case_output(name, case, sim, capsys)
    assert strict_pct >= 99.0
    same_bits(gold, sim)  # and our program is still bit-exact with our golden at these shapes
