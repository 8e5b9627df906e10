"""Golden-model primitives (plena.golden): bit-exact with the emulator, fp32 policy, gradients,
policy behaviour.

(a) Bit-exactness: small PLENA programs (assembled from upstream-syntax text) run on the JAX
    emulator; their VRAM rows / FP SRAM entries must equal, bit for bit (NaNs by class), the
    golden primitive in hardware mode applied to the same operands. All programs run on the
    default machine, which shares one emulator compile.
(b) fp32 policy: every point is the identity and the primitives are plain float32 math.
(c) Gradients: fp32 mode matches central finite differences; hardware mode gives the
    straight-through gradient, finite and equal to the fp32-mode gradient at the same point.
(d) Policy: hashable, a static jit argument, overrides change exactly the named point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from plena.config import default_config
from plena.emu_jax.api import run
from plena.emu_jax.files import load_fpsram
from plena.golden import (FP32, HARDWARE, POINTS, Policy, fpreg, fpsram, k_chunked_matmul,
                          matmul_tiles, mx_qdq, q, red_max_into, red_sum_into, row_sum, s_add,
                          s_exp, s_max, s_mul, s_reci, s_sqrt, s_sub, v_add, v_exp, v_max, v_min,
                          v_mul, v_reci, v_sub, vram)
from plena.isa import assemble
from plena.numerics import MXFP8, mx_encode_np

CFG = default_config()
MLEN = VLEN = 64
BLEN = 4
HW = Policy.hardware()
F32 = Policy.fp32()
SEEDS = (0, 1, 2)
BF16 = ml_dtypes.bfloat16


def test_default_machine():
    assert (CFG.mlen, CFG.vlen, CFG.blen, CFG.hbm_m_prefetch_amount, CFG.hbm_v_prefetch_amount,
            CFG.hbm_v_writeback_amount) == (MLEN, VLEN, BLEN, 64, 4, 4)
    assert CFG.precision.hbm_m_weight_type == MXFP8 == CFG.precision.hbm_v_act_type


# =============================================================================================
# helpers
# =============================================================================================
def bits_of(x) -> np.ndarray:
    """bf16 bits of bf16-valued f32 data (asserting it is bf16-valued)."""
    u = np.asarray(x, np.float32).view(np.uint32)
    assert not (u & 0xFFFF).any(), "value is not bf16"
    return (u >> 16).astype(np.uint16)


def vals(bits) -> np.ndarray:
    return (np.asarray(bits, np.uint32) << 16).view(np.float32)


def canon(bits) -> np.ndarray:
    """bf16 bits with every NaN pattern replaced by 0x7FC0 (spec §8: compare NaNs by class)."""
    b = np.array(bits, np.uint16)
    b[(b & 0x7FFF) > 0x7F80] = 0x7FC0
    return b


def same_bits(golden, emulator_bits):
    np.testing.assert_array_equal(canon(bits_of(golden)), canon(emulator_bits))


def wide_bf16(rng, shape, lo=-30, hi=30) -> np.ndarray:
    """bf16-valued f32: random sign, binary exponent in [lo, hi], random 7-bit mantissa."""
    sign = rng.choice([-1.0, 1.0], shape)
    mant = 1.0 + rng.integers(0, 128, shape) / 128.0
    return (sign * mant * 2.0 ** rng.integers(lo, hi + 1, shape)).astype(np.float32)


def half_ulp_partner(rng, a) -> np.ndarray:
    """b = ±(half a bf16 ulp of a): a + b lies exactly half-way between two bf16 values (a tie)."""
    e = np.floor(np.log2(np.abs(a)))
    return (rng.choice([-1.0, 1.0], a.shape) * 2.0 ** (e - 8)).astype(np.float32)


def n_ties(f32_results) -> int:
    """How many f32 results sit exactly half-way between two bf16 values."""
    u = np.asarray(f32_results, np.float32).view(np.uint32)
    return int(((u & 0xFFFF) == 0x8000).sum())


def li(reg: int, value: int) -> str:
    assert 0 <= value < 1 << 18
    return f"S_ADDI_INT gp{reg}, gp0, {value}"


def row_addr(row: int) -> int:
    return row * VLEN


# =============================================================================================
# (a) bit-exactness against the emulator
# =============================================================================================
ALL_BF16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@functools.lru_cache(maxsize=None)
def exhaustive_unary_run():
    """V_EXP_V in place on rows 0..1023 and V_RECI_V on rows 1024..2047: every bf16 operand."""
    text = "\n".join([
        li(1, 0),
        "C_LOOP_START gp10, 1024", "V_EXP_V gp1, gp1, 0", "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp10",
        "C_LOOP_START gp10, 1024", "V_RECI_V gp1, gp1, 0", "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp10",
    ])
    res = run(assemble(text), CFG, vram=np.concatenate([ALL_BF16, ALL_BF16]))
    return res.vram_bits()[: 2 * (1 << 16)]


@pytest.mark.parametrize("fn,part", [(v_exp, 0), (v_reci, 1)])
def test_v_exp_v_reci_every_bf16_operand(fn, part):
    emu = exhaustive_unary_run()[part << 16:(part + 1) << 16]
    golden = np.asarray(jax.jit(fn, static_argnames="policy")(vals(ALL_BF16), policy=HW))
    same_bits(golden, emu)
    if fn is v_exp:  # the clamp: exp(100) = exp(88), exp(-inf) = exp(-88) (a bf16 subnormal)
        assert golden[bits_of(np.float32([100.0]))[0]] == golden[bits_of(np.float32([88.0]))[0]]
        assert 0 < golden[0xFF80] < 2.0 ** -126


# ------------------------------------------------------------------ vector program
R = 4  # rows per operand
A0, B0, C0, OUT0 = 0, R, 2 * R, 3 * R  # VRAM row bases
VEC_OPS = ["V_ADD_VV", "V_SUB_VV", "V_MUL_VV", "V_ADD_VF", "V_SUB_VF", "V_SUB_VF_REV", "V_MUL_VF",
           "V_MAX_VF", "V_MIN_VF"]
SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 2.0 ** -130, -(2.0 ** -133), 3.0e38],
                    np.float32).astype(BF16).astype(np.float32)


def vector_data(seed):
    rng = np.random.default_rng(seed)
    a = wide_bf16(rng, (R, VLEN))
    a[:, :len(SPECIALS)] = SPECIALS  # bf16-valued specials (subnormals, inf, NaN, signed zeros)
    b = wide_bf16(rng, (R, VLEN))
    b[:, 16:48] = half_ulp_partner(rng, a[:, 16:48])  # ties for add and sub
    c = wide_bf16(rng, (R, VLEN), -4, 4)  # narrow range: sums round often
    big = wide_bf16(rng, (2, 2), 20, 22)  # cancelling pairs: the sum order shows in the result
    c[:2, 5], c[:2, 40], c[:2, 17], c[:2, 18] = big[:, 0], -big[:, 0], big[:, 1], -big[:, 1]
    s = wide_bf16(rng, (R,), -8, 8)
    s[-1] = np.nan  # V_MAX_VF / V_MIN_VF with a NaN bound fill the row with NaN
    acc = wide_bf16(rng, (R,), -2, 6)
    return a, b, c, s, acc


@functools.lru_cache(maxsize=None)
def vector_run(seed):
    a, b, c, s, acc = vector_data(seed)
    lines = []
    for i in range(R):
        lines += [li(1, row_addr(A0 + i)), li(2, row_addr(B0 + i)), li(3, row_addr(C0 + i)),
                  f"S_LD_FP f1, gp0, {i}"]
        for k, op in enumerate(VEC_OPS):
            lines.append(li(4, row_addr(OUT0 + k * R + i)))
            if op.endswith("_VV"):
                lines.append(f"{op} gp4, gp1, gp2, 0")
            elif op == "V_SUB_VF_REV":
                lines.append("V_SUB_VF gp4, gp1, f1, 0, 1")
            elif op == "V_SUB_VF":
                lines.append("V_SUB_VF gp4, gp1, f1, 0, 0")
            else:
                lines.append(f"{op} gp4, gp1, f1, 0")
        # V_RED_SUM accumulates C then B into f2; V_RED_MAX accumulates A (has NaN) then C into f3
        lines += [f"S_LD_FP f2, gp0, {8 + i}", "V_RED_SUM f2, gp3", f"S_ST_FP f2, gp0, {16 + i}",
                  "V_RED_SUM f2, gp2", f"S_ST_FP f2, gp0, {20 + i}",
                  f"S_LD_FP f3, gp0, {8 + i}", "V_RED_MAX f3, gp1, 0", "V_RED_MAX f3, gp3, 0",
                  f"S_ST_FP f3, gp0, {24 + i}"]
    fps = np.zeros(32, np.uint16)
    fps[:R], fps[8:8 + R] = bits_of(s), bits_of(acc)
    vram_img = bits_of(np.concatenate([a, b, c]).reshape(-1))
    res = run(assemble("\n".join(lines)), CFG, vram=vram_img, fpsram=fps)
    rows = res.vram_bits().reshape(-1, VLEN)
    out = {op: rows[OUT0 + k * R:OUT0 + (k + 1) * R] for k, op in enumerate(VEC_OPS)}
    fp = np.asarray(res.state.fpsram)
    return out, fp[16:16 + 2 * R], fp[24:24 + R]


@functools.partial(jax.jit, static_argnames="policy")
def golden_vector(a, b, c, s, acc, policy):
    sc = s[:, None]
    out = {"V_ADD_VV": v_add(a, b, policy), "V_SUB_VV": v_sub(a, b, policy), "V_MUL_VV": v_mul(a, b, policy),
           "V_ADD_VF": v_add(a, sc, policy), "V_SUB_VF": v_sub(a, sc, policy),
           "V_SUB_VF_REV": v_sub(sc, a, policy), "V_MUL_VF": v_mul(a, sc, policy),
           "V_MAX_VF": v_max(a, sc, policy), "V_MIN_VF": v_min(a, sc, policy)}
    after_c = red_sum_into(acc, c, policy)
    red_sum = jnp.concatenate([after_c, red_sum_into(after_c, b, policy)])
    red_max = red_max_into(red_max_into(acc, a, policy), c, policy)
    return out, red_sum, red_max


@pytest.mark.parametrize("seed", SEEDS)
def test_vector_ops_and_reductions_match_emulator(seed):
    a, b, c, s, acc = vector_data(seed)
    emu_out, emu_sum, emu_max = vector_run(seed)
    out, red_sum, red_max = golden_vector(a, b, c, s, acc, policy=HW)
    for op in VEC_OPS:
        same_bits(np.asarray(out[op]), emu_out[op])
    same_bits(np.asarray(red_sum), emu_sum)
    same_bits(np.asarray(red_max), emu_max)
    # the data exercises round-half-to-even and the NaN rules
    assert n_ties(a[:, 16:48] + b[:, 16:48]) > R * 24  # (a = 2**e minus half an ulp is exact)
    assert np.isnan(vals(emu_out["V_MAX_VF"][-1])).all() and not np.isnan(vals(emu_max)).any()


# ------------------------------------------------------------------ scalar program
NS = 64  # values per operand
FPS_A, FPS_C, FPS_D = 0, NS, 2 * NS
SCALAR_OPS = ["S_EXP_FP", "S_RECI_FP", "S_SQRT_FP", "S_ADD_FP", "S_SUB_FP", "S_MUL_FP", "S_MAX_FP"]
SCALAR_OUT0 = 3 * NS


def scalar_data(seed):
    rng = np.random.default_rng(100 + seed)
    a = vals(rng.integers(0, 1 << 16, NS))  # every bf16 class: subnormals, inf, NaN, ...
    c = wide_bf16(rng, (NS,), -12, 12)
    c[:4] = [np.nan, np.inf, -0.0, 0.0]
    d_bf16 = half_ulp_partner(rng, c[: NS // 2])  # ties for S_ADD_FP / S_SUB_FP
    # the other half comes through the FP SRAM preload file (IEEE f16), from these f32 values:
    d_src = (rng.standard_normal(NS // 2) * 2.0 ** rng.integers(-26, 18, NS // 2)).astype(np.float32)
    d_src[:3] = [70000.0, 65520.0, 2.0 ** -25 * 3]  # f16 overflow, rounding to inf, f16 subnormal tie
    return a, c, d_bf16, d_src


@functools.lru_cache(maxsize=None)
def scalar_run(seed, tmp_dir):
    a, c, d_bf16, d_src = scalar_data(seed)
    path = tmp_dir / f"fpsram_{seed}.bin"
    d_src.astype("<f2").tofile(path)
    fps = np.zeros(SCALAR_OUT0, np.uint16)
    fps[FPS_A:FPS_A + NS], fps[FPS_C:FPS_C + NS] = bits_of(a), bits_of(c)
    fps[FPS_D:FPS_D + NS // 2] = bits_of(d_bf16)
    fps[FPS_D + NS // 2:FPS_D + NS] = load_fpsram(path)  # the emulator's f16 preload conversion
    body = [f"S_LD_FP f1, gp1, {FPS_A}", f"S_LD_FP f2, gp1, {FPS_C}", f"S_LD_FP f4, gp1, {FPS_D}"]
    for k, op in enumerate(SCALAR_OPS):
        body.append(f"{op} f3, f1" if k < 3 else f"{op} f3, f2, f4")
        body.append(f"S_ST_FP f3, gp1, {SCALAR_OUT0 + k * NS}")
    text = "\n".join([li(1, 0), f"C_LOOP_START gp10, {NS}", *body, "S_ADDI_INT gp1, gp1, 1", "C_LOOP_END gp10"])
    res = run(assemble(text), CFG, fpsram=fps)
    fp = np.asarray(res.state.fpsram)
    out = {op: fp[SCALAR_OUT0 + k * NS:SCALAR_OUT0 + (k + 1) * NS] for k, op in enumerate(SCALAR_OPS)}
    return out, fps[FPS_D + NS // 2:FPS_D + NS]


@functools.partial(jax.jit, static_argnames="policy")
def golden_scalar(a, c, d_bf16, d_src, policy):
    d = jnp.concatenate([d_bf16, fpsram(d_src, policy)])
    return d, {"S_EXP_FP": s_exp(a, policy), "S_RECI_FP": s_reci(a, policy), "S_SQRT_FP": s_sqrt(a, policy),
               "S_ADD_FP": s_add(c, d, policy), "S_SUB_FP": s_sub(c, d, policy),
               "S_MUL_FP": s_mul(c, d, policy), "S_MAX_FP": s_max(c, d, policy)}


@pytest.mark.parametrize("seed", SEEDS)
def test_scalar_fp_ops_and_fpsram_preload_match_emulator(seed, tmp_path_factory):
    a, c, d_bf16, d_src = scalar_data(seed)
    emu, emu_preload = scalar_run(seed, tmp_path_factory.getbasetemp())
    d, out = golden_scalar(a, c, d_bf16, d_src, policy=HW)
    same_bits(np.asarray(d)[NS // 2:], emu_preload)
    for op in SCALAR_OPS:
        same_bits(np.asarray(out[op]), emu[op])
    assert n_ties(c[: NS // 2] + d_bf16) > NS // 4


# ------------------------------------------------------------------ matmul + MX round trip program
M, K, N = 8, 2 * MLEN, MLEN  # two K-chunks accumulate into each output block
X_ROW, OUT_ROW, MX_SRC_ROW, MX_DST_ROW, MV_ROW = 0, 2 * M, 3 * M, 3 * M + 4, 3 * M + 8
W_SCALE = K * N  # element bytes of W; its scale bytes follow (spec §2.7 layout)
ACT_BASE = 16384  # HBM byte address of the activation round trip


def matmul_data(seed):
    rng = np.random.default_rng(200 + seed)
    x = wide_bf16(rng, (M, K), -6, 6)
    w = (rng.standard_normal((K, N)) * 2.0 ** rng.integers(-4, 4, (K, N))).astype(np.float32)
    w[5, :8] = 0.0  # an all-zero MX block
    # cancelling products, across the two K-chunks (3, 100) and inside chunk 0 (10, 50): small
    # products get absorbed differently in every other summation order
    big = wide_bf16(rng, (M,), 24, 26)
    x[:, 3], x[:, 100], x[:, 10], x[:, 50] = big, -big, 2 * big, -2 * big
    w[100], w[50] = w[3], w[10]
    y = wide_bf16(rng, (4, VLEN), -20, 20)  # rows for H_STORE_V -> H_PREFETCH_V
    y[0, :8] = 0.0
    y[1, :8] = wide_bf16(rng, (8,), -40, -30)  # max_abs < 2**-22: the 1e-9 term sets the scale
    y[2, 3], y[2, 12], y[3, 20] = np.nan, np.inf, -np.inf
    return x, w, y


@functools.lru_cache(maxsize=None)
def matmul_run(seed):
    x, w, y = matmul_data(seed)
    elem, scale = mx_encode_np(w, MXFP8)
    hbm = np.concatenate([elem.reshape(-1), scale.reshape(-1)])
    lines = [li(1, W_SCALE), "C_SET_SCALE_REG gp1",
             "H_PREFETCH_M gp0, gp0, a0, 0, 0",  # W rows 0..63 -> MRAM tile 0
             li(2, MLEN * MLEN), "H_PREFETCH_M gp2, gp2, a0, 0, 0"]  # rows 64..127 -> tile 1
    for rb in range(M // BLEN):
        for cb in range(N // BLEN):
            for chunk in range(K // MLEN):
                lines += [li(3, chunk * MLEN * MLEN + cb * BLEN * MLEN),
                          li(4, row_addr(X_ROW + chunk * M + rb * BLEN)), "M_MM 0, gp3, gp4"]
            lines += [li(5, row_addr(OUT_ROW + rb * BLEN) + cb * BLEN), "M_MM_WO gp5, gp0, 0"]
    for cb in range(N // BLEN):  # M_MV (element-granular column offset) on row 0 of X
        for chunk in range(K // MLEN):
            lines += [li(3, chunk * MLEN * MLEN + cb * BLEN), li(4, row_addr(X_ROW + chunk * M)), "M_MV 0, gp3, gp4"]
        lines += [li(5, row_addr(MV_ROW) + cb * BLEN), "M_MV_WO gp5, 0"]
    lines += [li(6, ACT_BASE), "C_SET_ADDR_REG a1, gp0, gp6",
              li(7, row_addr(MX_SRC_ROW)), "H_STORE_V gp7, gp0, a1, 0, 0",
              li(8, row_addr(MX_DST_ROW)), "H_PREFETCH_V gp8, gp0, a1, 0, 0"]
    x_rows = np.concatenate([x[:, c * MLEN:(c + 1) * MLEN] for c in range(K // MLEN)])
    vram_img = np.zeros((MX_SRC_ROW + 4, VLEN), np.uint16)
    vram_img[X_ROW:X_ROW + 2 * M] = bits_of(x_rows)
    vram_img[MX_SRC_ROW:MX_SRC_ROW + 4] = bits_of(y)
    res = run(assemble("\n".join(lines)), CFG, hbm=hbm, vram=vram_img.reshape(-1))
    rows = res.vram_bits().reshape(-1, VLEN)
    return rows[OUT_ROW:OUT_ROW + M], rows[MX_DST_ROW:MX_DST_ROW + 4], rows[MV_ROW]


@functools.partial(jax.jit, static_argnames="policy")
def golden_matmul(x, w, y, policy):
    w_mram = mx_qdq(w, None, policy, "hbm_weight")
    acc = matmul_tiles(x, w_mram, CFG, policy, write_out=False)
    mv = matmul_tiles(x[0], w_mram, CFG, policy)  # one row: M_MV + M_MV_WO
    return acc, vram(acc, policy), vram(mx_qdq(y, MXFP8, policy, "hbm_act"), policy), w_mram, mv


@pytest.mark.parametrize("seed", SEEDS)
def test_matmul_tiles_and_mx_round_trip_match_emulator(seed):
    """M_MM over two K-chunks + M_MM_WO, M_MV + M_MV_WO, H_STORE_V -> H_PREFETCH_V."""
    x, w, y = matmul_data(seed)
    emu_out, emu_mx, emu_mv = matmul_run(seed)
    acc, out, mx, w_mram, mv = golden_matmul(x, w, y, policy=HW)
    same_bits(np.asarray(out), emu_out)
    same_bits(np.asarray(mv), emu_mv)
    same_bits(np.asarray(mx), emu_mx)
    assert np.array_equal(np.asarray(out), np.asarray(matmul_tiles(x, w_mram, CFG, HW)))
    # the operands make the order matter: the f32 accumulator is not the exact sum everywhere
    exact = (x.astype(np.float64) @ np.asarray(w_mram, np.float64)).astype(np.float32)
    assert (np.asarray(acc) != exact).any()


def test_k_chunked_order_is_the_documented_one():
    """Sequential k inside a chunk, separately rounded products (no FMA), chunks in order."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5, 150)).astype(np.float32)  # K not a multiple of MLEN: zero-padded
    w = rng.standard_normal((150, 6)).astype(np.float32)  # f32 weights: inexact products
    ref = np.zeros((3, 5, 6), np.float32)
    for c0 in range(0, 150, MLEN):
        p = np.zeros_like(ref)
        for k in range(c0, min(c0 + MLEN, 150)):
            p = p + x[..., k:k + 1] * w[k]
        ref = ref + p
    got = np.asarray(jax.jit(k_chunked_matmul, static_argnums=2)(x, w, MLEN))
    np.testing.assert_array_equal(got, ref)
    batched = np.asarray(jax.vmap(lambda a: matmul_tiles(a, w, MLEN, HW, write_out=False))(x))
    np.testing.assert_array_equal(batched, ref)
    assert (got != (x.astype(np.float64) @ w).astype(np.float32)).any()


def test_fpsram_preload_is_f32_to_f16_to_bf16():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(20000) * 2.0 ** rng.integers(-28, 18, 20000)).astype(np.float32)
    x[:6] = [65504.0, 65519.0, 65520.0, 2.0 ** -24, 2.0 ** -25, -(2.0 ** -26)]
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).astype(np.float32).astype(BF16).view(np.uint16)
    got = np.asarray(jax.jit(fpsram)(x))
    np.testing.assert_array_equal(bits_of(got), ref)
    assert (got != x.astype(BF16).astype(np.float32)).any()  # the f16 step matters


# =============================================================================================
# (b) fp32 policy = plain float32 math
# =============================================================================================
def test_fp32_policy_is_plain_float32():
    rng = np.random.default_rng(11)
    a = (rng.standard_normal((4, 64)) * 3).astype(np.float32)  # not bf16-valued
    b = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
    pos = np.abs(a) + np.float32(0.5)
    for point in POINTS:
        np.testing.assert_array_equal(np.asarray(q(a, point, F32)), a)
    assert not np.array_equal(np.asarray(vram(a, HW)), a)
    np.testing.assert_array_equal(np.asarray(mx_qdq(a, None, F32, "hbm_kv")), a)
    np.testing.assert_array_equal(np.asarray(v_add(a, b, F32)), a + b)
    np.testing.assert_array_equal(np.asarray(v_sub(a, b, F32)), a - b)
    np.testing.assert_array_equal(np.asarray(v_mul(a, b, F32)), a * b)
    np.testing.assert_array_equal(np.asarray(s_add(a, b, F32)), a + b)
    np.testing.assert_array_equal(np.asarray(s_mul(a, b, F32)), a * b)
    np.testing.assert_array_equal(np.asarray(v_max(a, b, F32)), np.maximum(a, b))
    np.testing.assert_array_equal(np.asarray(s_max(a, b, F32)), np.maximum(a, b))
    np.testing.assert_array_equal(np.asarray(v_exp(a, F32)), np.asarray(jnp.exp(a)))
    np.testing.assert_allclose(np.asarray(s_exp(a, F32)), np.exp(a), rtol=3e-7)
    np.testing.assert_allclose(np.asarray(v_reci(pos, F32)), 1 / pos, rtol=2e-7)
    np.testing.assert_allclose(np.asarray(s_sqrt(pos, F32)), np.sqrt(pos), rtol=2e-7)
    assert float(v_exp(100.0, F32)) == np.inf and np.isfinite(float(v_exp(100.0, HW)))  # no clamp
    np.testing.assert_array_equal(np.asarray(row_sum(a, F32)), np.asarray(jnp.sum(a, axis=-1)))
    np.testing.assert_array_equal(np.asarray(red_sum_into(b[:, 0], a, F32)),
                                  b[:, 0] + np.asarray(jnp.sum(a, axis=-1)))
    np.testing.assert_array_equal(np.asarray(red_max_into(b[:, 0], a, F32)), np.maximum(a.max(-1), b[:, 0]))
    w = (rng.standard_normal((64, 32))).astype(np.float32)
    x = (rng.standard_normal((5, 128))).astype(np.float32)
    w2 = (rng.standard_normal((128, 32))).astype(np.float32)
    mm = np.asarray(matmul_tiles(x, w2, CFG, F32))
    np.testing.assert_array_equal(mm, np.asarray(jnp.matmul(x, w2, precision=jax.lax.Precision.HIGHEST)))
    np.testing.assert_allclose(mm, x.astype(np.float64) @ w2, rtol=1e-5, atol=1e-5)
    assert (np.asarray(matmul_tiles(a, w, CFG, F32)).view(np.uint32) & 0xFFFF).any()  # not rounded


# =============================================================================================
# (c) gradients
# =============================================================================================
def _bf(x):
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def _cases(rng):
    """(name, function of (policy, *args) returning an array, args): bf16-valued arguments, and
    for the max-type functions operands at least 0.09 apart (finite differences stay off kinks)."""
    a = _bf(rng.uniform(-3, 3, (2, 64)))
    b = _bf(rng.uniform(-3, 3, (2, 64)))
    apart = _bf(a + rng.choice([-1, 1], a.shape) * rng.uniform(0.1, 1, a.shape))
    distinct = np.stack([rng.permutation(np.arange(-32, 32)) * np.float32(0.09375) for _ in range(2)])
    pos = _bf(rng.uniform(0.5, 4, (2, 64)))
    acc = _bf(rng.uniform(-2, 2, (2,)))
    x = _bf(rng.uniform(-1, 1, (4, 128)))
    w = _bf(rng.uniform(-1, 1, (128, 16)))
    return [
        ("vram", lambda p, a: vram(a, p), [a]),
        ("fpreg", lambda p, a: fpreg(a, p), [a]),
        ("fpsram", lambda p, a: fpsram(a, p), [a]),
        ("mx_qdq", lambda p, a: mx_qdq(a, None, p, "hbm_weight"), [a]),
        ("v_add", lambda p, a, b: v_add(a, b, p), [a, b]),
        ("v_sub", lambda p, a, b: v_sub(a, b, p), [a, b]),
        ("v_mul", lambda p, a, b: v_mul(a, b, p), [a, b]),
        ("v_max", lambda p, a, b: v_max(a, b, p), [a, apart]),
        ("v_min", lambda p, a, b: v_min(a, b, p), [a, apart]),
        ("s_add", lambda p, a, b: s_add(a, b, p), [a, b]),
        ("s_sub", lambda p, a, b: s_sub(a, b, p), [a, b]),
        ("s_mul", lambda p, a, b: s_mul(a, b, p), [a, b]),
        ("s_max", lambda p, a, b: s_max(a, b, p), [a, apart]),
        ("v_exp", lambda p, a: v_exp(a, p), [a]),
        ("s_exp", lambda p, a: s_exp(a, p), [a]),
        ("v_reci", lambda p, a: v_reci(a, p), [pos]),
        ("s_reci", lambda p, a: s_reci(a, p), [pos]),
        ("s_sqrt", lambda p, a: s_sqrt(a, p), [pos]),
        ("row_sum", lambda p, a: row_sum(a, p), [a]),
        ("red_sum_into", lambda p, c, a: red_sum_into(c, a, p), [acc, a]),
        ("red_max_into", lambda p, c, a: red_max_into(c, a, p), [acc, distinct]),
        ("matmul_tiles", lambda p, x, w: matmul_tiles(x, w, CFG, p), [x, w]),
    ]


CASE_NAMES = [c[0] for c in _cases(np.random.default_rng(0))]


def _loss(fn, policy, cot):
    return lambda *args: jnp.sum(cot * fn(policy, *args))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_gradients(name):
    rng = np.random.default_rng(CASE_NAMES.index(name))
    _, fn, args = next(c for c in _cases(rng) if c[0] == name)
    cot = jnp.asarray(rng.uniform(0.5, 1.5, np.shape(fn(F32, *args))).astype(np.float32))
    argnums = tuple(range(len(args)))
    jit = jax.jit if name in ("row_sum", "red_sum_into", "matmul_tiles") else (lambda f: f)  # speed only
    g32 = jit(jax.grad(_loss(fn, F32, cot), argnums))(*args)
    ghw = jit(jax.grad(_loss(fn, HW, cot), argnums))(*args)
    loss32 = jit(_loss(fn, F32, cot))
    for i, arg in enumerate(args):
        # fp32 mode: central finite difference along a random direction
        v = rng.standard_normal(np.shape(arg)).astype(np.float32)
        h = np.float32(1e-3)
        plus = [np.asarray(x) + h * v if j == i else x for j, x in enumerate(args)]
        minus = [np.asarray(x) - h * v if j == i else x for j, x in enumerate(args)]
        fd = (float(loss32(*plus)) - float(loss32(*minus))) / (2 * float(h))
        ad = float(jnp.vdot(g32[i], v))
        assert ad == pytest.approx(fd, rel=2e-2, abs=5e-2), (name, i)
        # hardware mode: straight-through, finite, identical to the fp32-mode gradient
        assert np.isfinite(np.asarray(ghw[i])).all()
        np.testing.assert_array_equal(np.asarray(ghw[i]), np.asarray(g32[i]), err_msg=f"{name} arg {i}")


def test_exp_gradient_is_cut_by_the_clamp_in_hardware_mode():
    x = jnp.asarray([-100.0, -80.0, 0.0, 88.0, 100.0, -np.inf])
    g_hw = jax.grad(lambda x: jnp.sum(v_exp(x, HW)))(x)
    g_32 = jax.grad(lambda x: jnp.sum(v_exp(x, F32)))(x)
    e = np.asarray(jnp.exp(jnp.float32([-80.0, 88.0])))  # the derivative is jnp.exp's value
    np.testing.assert_array_equal(np.asarray(g_hw), [0.0, e[0], 1.0, e[1], 0.0, 0.0])
    assert float(g_32[4]) == np.inf  # fp32 mode: no clamp


# =============================================================================================
# (d) the policy
# =============================================================================================
def test_policy_constructors_and_overrides():
    assert Policy() == HW and hash(Policy()) == hash(HW)
    assert set(HW.modes().values()) == {HARDWARE} and set(F32.modes().values()) == {FP32}
    assert Policy.hardware(CFG) == HW and Policy.fp32(CFG) == F32
    assert HW.format("hbm_weight") == MXFP8
    for point in POINTS:
        for base, mode in ((HW, FP32), (F32, HARDWARE)):
            new = base.override(**{point: mode})
            changed = {p for p in POINTS if new.mode(p) != base.mode(p)}
            assert changed == {point}
            assert new != base and hash(new) != hash(base)
    with pytest.raises(ValueError):
        HW.override(vrm="fp32")
    with pytest.raises(ValueError):
        HW.override(vram="bf16")
    with pytest.raises(ValueError):
        q(1.0, "mram", HW)
    with pytest.raises(TypeError):
        mx_qdq(np.zeros(8, np.float32), HW)  # policy passed where the format goes


def test_policy_is_a_static_jit_argument():
    traces = []

    @functools.partial(jax.jit, static_argnames="policy")
    def f(a, b, policy):
        traces.append(policy)
        return v_add(a, b, policy), s_add(a, b, policy)

    a = np.float32([1.0, 3.0])
    b = np.float32([2.0 ** -8, 2.0 ** -9])
    out_hw = f(a, b, policy=HW)
    f(a, b, policy=Policy.hardware())  # equal policy: cached
    assert len(traces) == 1
    only_vram = HW.override(vram="fp32")
    v, s = f(a, b, policy=only_vram)
    assert len(traces) == 2
    np.testing.assert_array_equal(np.asarray(out_hw[0]), [1.0, 3.0])  # ties to even
    np.testing.assert_array_equal(np.asarray(v), a + b)  # vram point off
    np.testing.assert_array_equal(np.asarray(s), np.asarray(out_hw[1]))  # fpreg point still on


def test_override_changes_exactly_one_rounding():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 64)) * 5).astype(np.float32)
    full = {p: np.asarray(q(x, p, HW)) for p in POINTS}
    for point in POINTS:
        pol = HW.override(**{point: FP32})
        for other in POINTS:
            got = np.asarray(q(x, other, pol))
            np.testing.assert_array_equal(got, x if other == point else full[other])
    for point in set(POINTS) - {"accum"}:
        assert not np.array_equal(full[point], x), point  # each point really rounds
    # the accum point selects the summation order of the hardware sums
    rows = wide_bf16(rng, (256, 64), -10, 10)
    assert not np.array_equal(np.asarray(row_sum(rows, HW)), np.asarray(row_sum(rows, HW.override(accum=FP32))))
    x, w = rows[:16].reshape(8, 128), wide_bf16(rng, (128, 64), -10, 10)  # two K-chunks
    assert not np.array_equal(np.asarray(matmul_tiles(x, w, CFG, HW, write_out=False)),
                              np.asarray(matmul_tiles(x, w, CFG, HW.override(accum=FP32), write_out=False)))


def test_vmap_agrees_with_one_by_one():
    rng = np.random.default_rng(9)
    rows = wide_bf16(rng, (3, 2, 64), -6, 6)
    acc = wide_bf16(rng, (3, 2), -2, 2)
    w = np.asarray(mx_qdq((rng.standard_normal((128, 8))).astype(np.float32), None, HW, "hbm_weight"))
    x = wide_bf16(rng, (3, 2, 128), -4, 4)

    def f(acc, rows, x):
        return red_sum_into(acc, rows, HW), v_exp(rows, HW), matmul_tiles(x, w, CFG, HW), vram(x, HW)

    single = jax.jit(f)
    one_by_one = [single(acc[i], rows[i], x[i]) for i in range(3)]
    eager = [np.stack([o[k] for o in one_by_one]) for k in range(4)]
    vm = jax.jit(jax.vmap(f))(acc, rows, x)
    for e, v in zip(eager, vm):
        np.testing.assert_array_equal(np.asarray(e), np.asarray(v))
