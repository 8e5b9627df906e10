"""Per-opcode tests of the JAX emulator (spec §2, §4, §6).

Method: each test builds a small program, runs it once stopped just before the instruction
under test (``max_steps``) and once to the end, and compares the two final machine states
field by field. The fields the spec says the instruction changes must equal values computed
*here* from the spec's formulas (numpy / ml_dtypes, never the emulator's own helpers), and
every other field must be unchanged. Counters (pc, steps, per-opcode counts, HBM block
counts, loop instruction counts) are left out of the state comparison; the spec-defined ones
(cycles, HBM bytes) are checked separately.

All test programs run on the default machine (one XLA compile) except the ``SMALL`` group,
which shares one second machine (small VRAM depth, loop budget, DC_EN = 0, 2-tile M prefetch,
BROADCAST_AMOUNT = 2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import ml_dtypes
import numpy as np
import pytest

from plena.config import default_config
from plena.emu_jax.api import RunResult, run
from plena.isa import encode_fields

BF16 = ml_dtypes.bfloat16
CFG = default_config()
MLEN = VLEN = 64
BLEN, HLEN, BA = 4, 16, 4
TILE = MLEN * MLEN
DEPTH = 4194304  # VECTOR_SRAM_SIZE rows of the TRANSACTIONAL config
# One machine for the tests that need a non-default config (one extra compile).
SMALL = CFG.replace(vector_sram_size=2048, max_loop_instructions=40, dc_en=0, broadcast_amount=2,
                    hbm_m_prefetch_amount_raw=128)

# Opcode numbers straight from spec §3.2 (used for hand-encoded words).
OP = {"M_BMM_WO": 0x05, "M_MV_WO": 0x0B, "M_BMV_WO": 0x0C, "V_EXP_V": 0x13, "V_RECI_V": 0x14,
      "V_RED_SUM": 0x15, "V_RED_MAX": 0x16}

COUNTERS = frozenset({"pc", "sub", "counts", "skipped", "steps", "hbm_rd_blocks", "hbm_wr_blocks",
                      "topk_experts", "err", "err_pc", "loop_cnt", "loop_pc", "loop_reg", "loop_sp"})
BF16_FIELDS = ("fp", "fpsram", "vram")


def test_default_machine_is_the_one_these_tests_assume():
    assert (CFG.mlen, CFG.vlen, CFG.blen, CFG.hlen, CFG.broadcast_amount) == (MLEN, VLEN, BLEN, HLEN, BA)
    assert CFG.vector_sram_size == DEPTH and CFG.mram_tiles == 64 and CFG.dc_en == 1
    assert (CFG.hbm_m_prefetch_amount, CFG.hbm_v_prefetch_amount, CFG.hbm_v_writeback_amount) == (64, 4, 4)


# =============================================================================================
# numeric references (spec §2.9), written independently of plena.numerics
# =============================================================================================
def bf(x) -> np.ndarray:
    """f32 -> bf16 bits, round to nearest even (ml_dtypes)."""
    return np.asarray(np.asarray(x, np.float32).astype(BF16).view(np.uint16))


def fv(bits) -> np.ndarray:
    """bf16 bits -> f32 values."""
    return np.asarray(bits, np.uint16).view(BF16).astype(np.float32)


def f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def canon(bits) -> np.ndarray:
    """Compare NaNs by class (spec §8): every bf16 NaN pattern becomes 0x7FC0."""
    b = np.array(bits, np.uint16)
    b[(b & 0x7FFF) > 0x7F80] = 0x7FC0
    return b


def e4m3_value(b: int) -> float:
    """Spec §2.9(a): e=0 -> m*2^-10 (the 2^-bias subnormal rule), e=15 -> inf/NaN."""
    s = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 7
    if e == 0:
        return s * m * 2.0 ** -10
    if e == 15:
        return s * math.inf if m == 0 else math.nan
    return s * (8 + m) * 2.0 ** (e - 10)


def e8m0_value(b: int) -> float:
    return 0.0 if b == 0 else math.inf if b == 255 else 2.0 ** (b - 127)


E4M3 = np.array([e4m3_value(b) for b in range(256)])
E8M0 = np.array([e8m0_value(b) for b in range(256)])


def mx_decode(elem: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Spec §2.9(c): value = f32(elem * scale[i // 8]) (rows along the last axis)."""
    with np.errstate(invalid="ignore"):
        return f32(E4M3[elem] * np.repeat(E8M0[scale], 8, axis=-1))


def _hwround(y: float) -> int:
    t = math.floor(4 * y)
    q, r = t >> 2, t & 3
    return q if r in (0, 1) else q + 1 if r == 3 else q + (q & 1)


def e4m3_encode_hw(q: np.float32) -> int:
    """Spec §2.9(d) step 4 (minifloat_hw for e4m3)."""
    if np.isnan(q):
        return 0x38
    if q == 0:
        return 0x00
    s = int(q < 0)
    a = np.float32(abs(q))
    with np.errstate(divide="ignore", over="ignore"):
        raw = np.floor(np.log2(np.float32(a + np.float32(1e-9))))
    overflow = raw > 7
    E = int(min(max(raw, -7), 7))
    if overflow:
        k = 7
    else:
        m = np.float32(a / np.float32(2.0 ** E))
        k = _hwround(float((m - np.float32(1)) * np.float32(8)) if E != -7 else float(m * np.float32(8)))
        k = min(max(k, 0), 7)
    return s << 7 | (E + 7) << 3 | k


def mx_encode_row(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spec §2.9(d): hardware MX encode of one VLEN row -> (64 element bytes, 8 scale bytes)."""
    x = f32(x)
    elems, scales = [], []
    for blk in x.reshape(-1, 8):
        max_abs = np.float32(0)
        for v in blk:
            if not np.isnan(v):
                max_abs = max(max_abs, np.float32(abs(v)))
        if max_abs == 0:
            elems += [0] * 8
            scales.append(0)
            continue
        with np.errstate(over="ignore"):
            e = int(min(max(np.floor(np.log2(np.float32(max_abs + np.float32(1e-9)))), -127), 127))
        scales.append(e + 127)
        with np.errstate(invalid="ignore"):
            elems += [e4m3_encode_hw(np.float32(v / np.float32(2.0 ** e))) for v in blk]
    return np.array(elems, np.uint8), np.array(scales, np.uint8)


def torch_sum64(x) -> np.float32:
    """Spec §8 libtorch order for VLEN = 64: p_k[l] = (0 + x[8k+l]) + x[32+8k+l];
    q = ((p0+p1)+p2)+p3 per lane; then ((0+q0)+q1)+...+q7, all in f32."""
    x = f32(x)
    p = [(np.float32(0) + x[8 * k: 8 * k + 8]) + x[32 + 8 * k: 40 + 8 * k] for k in range(4)]
    q = ((p[0] + p[1]) + p[2]) + p[3]
    s = np.float32(0)
    for lane in q:
        s = np.float32(s + lane)
    return s


def rand_bf16(rng, n, lo=-8, hi=8) -> np.ndarray:
    """Random normal bf16 values (as f32) with binary exponents in [lo, hi]."""
    m = rng.integers(0, 128, n)
    e = rng.integers(lo, hi + 1, n)
    s = rng.choice([-1.0, 1.0], n)
    return f32(s * (1 + m / 128) * 2.0 ** e)


def small_ints(rng, shape, lo=-4, hi=4) -> np.ndarray:
    return f32(rng.integers(lo, hi + 1, shape))


def nice_e4m3(rng, shape) -> np.ndarray:
    """e4m3 bytes of normal values with exponent field 5..9: |v| in [0.25, 7.5]."""
    s, e, m = rng.integers(0, 2, shape), rng.integers(5, 10, shape), rng.integers(0, 8, shape)
    return (s << 7 | e << 3 | m).astype(np.uint8)


# =============================================================================================
# running programs and comparing states
# =============================================================================================
from asm_helpers import li, prog  # noqa: E402


def snapshot(res: RunResult) -> dict[str, np.ndarray]:
    """The architectural state as numpy arrays (spare rows/tiles/bytes dropped, NaNs canonical,
    the loop stack as its active (start_pc, reg) entries)."""
    st = res.state._asdict()
    out = {}
    for name, v in st.items():
        if name in COUNTERS:
            continue
        a = np.array(v)
        if name in ("vram", "mram"):
            a = a[:-1]
        elif name == "hbm":
            a = a[: res.geometry.hbm_bytes]
        if name in BF16_FIELDS:
            a = canon(a)
        out[name] = a
    sp = int(st["loop_sp"])
    out["loops"] = np.array([[int(st["loop_pc"][i]), int(st["loop_reg"][i])] for i in range(sp)],
                            np.int64).reshape(sp, 2)
    return out


class Pair(NamedTuple):
    before: dict
    after: dict
    rb: RunResult
    ra: RunResult

    def expected(self) -> dict:
        return {k: v.copy() for k, v in self.before.items()}


def step(prefix, instr, **kw) -> Pair:
    """Run prefix alone (max_steps) and prefix + instr; both runs share one geometry."""
    pre, ins = prog(prefix), prog(instr)
    rb = run(pre + ins, max_steps=len(pre), **kw)
    ra = run(pre + ins, **kw)
    return Pair(snapshot(rb), snapshot(ra), rb, ra)


def assert_state(actual: dict, expected: dict) -> None:
    exp = dict(expected)
    for name in BF16_FIELDS:
        exp[name] = canon(exp[name])
    assert sorted(actual) == sorted(exp)
    chex.assert_trees_all_equal(actual, exp, strict=True)


def vram_image(*rows, n_rows: int | None = None) -> np.ndarray:
    """Flat bf16 bits of VRAM rows 0.. from f32 row values (None = zero row)."""
    n = n_rows if n_rows is not None else len(rows)
    out = np.zeros((n, VLEN), np.uint16)
    for i, r in enumerate(rows):
        if r is not None:
            out[i] = bf(r)
    return out.reshape(-1)


def fp_image(*values) -> np.ndarray:
    return bf(f32(values))


def load_fp(*regs: int) -> str:
    """S_LD_FP f<r>, gp0, <i> for the i-th listed register (FP SRAM entry i)."""
    return "\n".join(f"S_LD_FP f{r}, gp0, {i}" for i, r in enumerate(regs))


def head_select(rmask: int, vmask: int) -> np.ndarray:
    """bool[VLEN]: lanes an rmask-able op updates (spec §4.0)."""
    if rmask == 0:
        return np.ones(VLEN, bool)
    heads = np.arange(VLEN) // HLEN
    return ((vmask >> heads) & 1).astype(bool)


# =============================================================================================
# scalar integer (spec §4.4)
# =============================================================================================
@pytest.mark.parametrize("op,a,b,want", [
    ("S_ADD_INT", 1, 2, 3),
    ("S_ADD_INT", 0xFFFFF000, 0x2000, 0x1000),
    ("S_ADD_INT", 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE),
    ("S_SUB_INT", 3, 5, 0xFFFFFFFE),
    ("S_SUB_INT", 0, 0xFFFFFFFF, 1),
    ("S_SUB_INT", 100, 58, 42),
    ("S_MUL_INT", 12345, 678, 8369910),
    ("S_MUL_INT", 0x10000, 0x10001, 0x10000),
    ("S_MUL_INT", 0xFFFFFFFF, 0xFFFFFFFF, 1),
])
def test_integer_register_ops_wrap_mod_2_32(op, a, b, want):
    p = step([li(1, a), li(2, b)], f"{op} gp3, gp1, gp2")
    exp = p.expected()
    exp["gp"][3] = want
    assert_state(p.after, exp)


@pytest.mark.parametrize("start,imm,want", [
    (5, 7, 12), (0xFFFFFFFF, 1, 0), (0xFFFFFFF0, (1 << 18) - 1, 0x3FFEF), (0, 0, 0)])
def test_s_addi_int_zero_extended_imm_wraps(start, imm, want):
    p = step(li(4, start), f"S_ADDI_INT gp4, gp4, {imm}")
    exp = p.expected()
    exp["gp"][4] = want
    assert_state(p.after, exp)


def test_gp0_is_an_ordinary_writable_register():
    p = step("", "S_ADDI_INT gp0, gp0, 9")
    exp = p.expected()
    exp["gp"][0] = 9
    assert_state(p.after, exp)


@pytest.mark.parametrize("imm,want", [(5, 0x5000), (0xFFFFF, 0xFFFFF000), ((1 << 22) - 1, 0xFFFFF000),
                                      (0x100000, 0), (0x100001, 0x1000)])
def test_s_lui_int_overwrites_the_whole_register(imm, want):
    p = step(li(4, 0x123), f"S_LUI_INT gp4, {imm}")
    exp = p.expected()
    exp["gp"][4] = want  # not want | 0x123
    assert_state(p.after, exp)


INTS = np.arange(1024, dtype=np.uint32) * np.uint32(2654435761)  # distinct u32 values


@pytest.mark.parametrize("base,imm,idx", [(10, 5, 15), (0, 1023, 1023), (0xFFFFFFFF, 5, 4)])
def test_s_ld_int(base, imm, idx):
    p = step(li(1, base), f"S_LD_INT gp2, gp1, {imm}", intsram=INTS)
    exp = p.expected()
    exp["gp"][2] = INTS[idx]
    assert_state(p.after, exp)


def test_s_st_int():
    p = step([li(1, 700), li(2, 0xDEADBEEF)], "S_ST_INT gp2, gp1, 3", intsram=INTS)
    exp = p.expected()
    exp["intsram"][703] = 0xDEADBEEF
    assert_state(p.after, exp)


# =============================================================================================
# scalar floating point (spec §4.3)
# =============================================================================================
FPS = bf(rand_bf16(np.random.default_rng(7), 1024))


@pytest.mark.parametrize("rd", [0, 5])
def test_s_ld_fp_loads_any_register_including_f0(rd):
    p = step(li(1, 500), f"S_LD_FP f{rd}, gp1, 17", fpsram=FPS)
    exp = p.expected()
    exp["fp"][rd] = FPS[517]
    assert_state(p.after, exp)


def test_s_st_fp():
    p = step([li(1, 1000), "S_LD_FP f6, gp0, 3"], "S_ST_FP f6, gp1, 23", fpsram=FPS)
    exp = p.expected()
    exp["fpsram"][1023] = FPS[3]
    assert_state(p.after, exp)


INF, NAN = math.inf, math.nan
E8 = 2.0 ** -8


@pytest.mark.parametrize("op,a,b,want", [
    ("S_ADD_FP", 1.0, 2.0, 3.0),
    ("S_ADD_FP", 256.0, 1.0, 256.0),  # 257 is a tie: RNE keeps the even 256
    ("S_ADD_FP", 258.0, 1.0, 260.0),  # 259 is a tie: RNE goes up to the even 260
    ("S_ADD_FP", 1.0, E8, 1.0),  # 1 + 2^-8: tie, down to even
    ("S_ADD_FP", 1.0 + 2 * E8, E8, 1.0 + 4 * E8),  # tie, up to even
    ("S_ADD_FP", 1.0, 3 * 2.0 ** -9, 1.0 + 2 * E8),  # above the tie
    ("S_ADD_FP", INF, -INF, NAN),
    ("S_ADD_FP", 3.0, -3.0, 0.0),
    ("S_SUB_FP", 1.0, 3.0, -2.0),
    ("S_SUB_FP", 256.0, -1.0, 256.0),
    ("S_SUB_FP", -0.0, 0.0, -0.0),
    ("S_MUL_FP", 1.5, -2.5, -3.75),
    ("S_MUL_FP", 1.0 + 2 * E8, 1.0 + 2 * E8, 1.0 + 4 * E8),  # 1 + 2^-6 + 2^-14 rounds down
    ("S_MUL_FP", 2.0 ** 127, 4.0, INF),
    ("S_MUL_FP", 0.0, INF, NAN),
    ("S_MAX_FP", 1.0, 2.0, 2.0),
    ("S_MAX_FP", 2.0, 1.0, 2.0),
    ("S_MAX_FP", NAN, 1.0, 1.0),
    ("S_MAX_FP", 1.0, NAN, 1.0),
    ("S_MAX_FP", NAN, NAN, NAN),
    ("S_MAX_FP", 0.0, -0.0, 0.0),  # ties keep the first operand
    ("S_MAX_FP", -0.0, 0.0, -0.0),
    ("S_MAX_FP", -INF, -5.0, -5.0),
])
def test_scalar_fp_binary(op, a, b, want):
    p = step(load_fp(1, 2), f"{op} f3, f1, f2", fpsram=fp_image(a, b))
    exp = p.expected()
    exp["fp"][3] = bf(want)
    assert_state(p.after, exp)


def _exp_ref(a):
    with np.errstate(all="ignore"):
        return f32(np.exp(np.clip(np.float64(a), -88.0, 88.0)))


@pytest.mark.parametrize("op,a,want", [
    ("S_EXP_FP", 0.0, 1.0),
    ("S_EXP_FP", 1.0, _exp_ref(1.0)),
    ("S_EXP_FP", 2.0, _exp_ref(2.0)),
    ("S_EXP_FP", -3.5, _exp_ref(-3.5)),
    ("S_EXP_FP", 100.0, _exp_ref(88.0)),  # clamped to 88
    ("S_EXP_FP", INF, _exp_ref(88.0)),
    ("S_EXP_FP", -100.0, _exp_ref(-88.0)),  # clamped to -88 (a bf16 subnormal result)
    ("S_EXP_FP", -INF, _exp_ref(-88.0)),
    ("S_EXP_FP", NAN, NAN),
    ("S_RECI_FP", 4.0, 0.25),
    ("S_RECI_FP", 3.0, f32(1) / f32(3)),
    ("S_RECI_FP", 0.0, INF),
    ("S_RECI_FP", -0.0, -INF),
    ("S_RECI_FP", INF, 0.0),
    ("S_RECI_FP", -INF, -0.0),
    ("S_SQRT_FP", 16.0, 4.0),
    ("S_SQRT_FP", 2.0, np.sqrt(f32(2))),
    ("S_SQRT_FP", -1.0, NAN),
    ("S_SQRT_FP", -0.0, -0.0),
    ("S_SQRT_FP", INF, INF),
])
def test_scalar_fp_unary(op, a, want):
    p = step(load_fp(1), f"{op} f4, f1", fpsram=fp_image(a))
    exp = p.expected()
    exp["fp"][4] = bf(want)
    assert_state(p.after, exp)


def test_exp_of_minus_88_is_a_nonzero_bf16_subnormal():
    assert 0 < bf(_exp_ref(-88.0)) < 0x0080  # guards the parametrisation above


FP_ARITH_RD0 = ["S_ADD_FP f0, f1, f2", "S_SUB_FP f0, f1, f2", "S_MAX_FP f0, f1, f2", "S_MUL_FP f0, f1, f2",
                "S_EXP_FP f0, f1", "S_RECI_FP f0, f1", "S_SQRT_FP f0, f1", "V_RED_SUM f0, gp0",
                "V_RED_MAX f0, gp0, 0"]


@pytest.mark.parametrize("instr", FP_ARITH_RD0)
def test_fp_arithmetic_with_rd_0_is_a_no_op_taking_no_cycles(instr):
    # f0 = 5, f1 = 1, f2 = 2, a VRAM row of 100s: every op would change f0 if it ran.
    p = step(load_fp(0, 1, 2), instr, fpsram=fp_image(5.0, 1.0, 2.0), vram=vram_image(np.full(VLEN, 100.0)))
    assert_state(p.after, p.expected())
    assert p.ra.cycles == p.rb.cycles
    assert p.ra.instructions == p.rb.instructions + 1


def test_s_map_v_fp_copies_a_window_of_fp_sram():
    p = step([li(1, 900), li(2, 3 * VLEN)], "S_MAP_V_FP gp2, gp1, 60", fpsram=FPS)
    exp = p.expected()
    exp["vram"][3] = FPS[960:1024]  # the window ends exactly at entry 1023
    assert_state(p.after, exp)


# =============================================================================================
# vector element-wise ops (spec §4.0, §4.2)
# =============================================================================================
RNG = np.random.default_rng(2024)
VA, VB = rand_bf16(RNG, VLEN), rand_bf16(RNG, VLEN)
VS = f32(1.375)
VV_OPS = {"V_ADD_VV": lambda a, b: a + b, "V_SUB_VV": lambda a, b: a - b, "V_MUL_VV": lambda a, b: a * b}
VF_OPS = {"V_ADD_VF": lambda a, s: a + s, "V_MUL_VF": lambda a, s: a * s,
          "V_MAX_VF": np.maximum, "V_MIN_VF": np.minimum}
MASKS = [(0, 0), (0, 0b0101), (1, 0b0101), (7, 0b1010), (1, 0b1111), (3, 0xFFFFFFF0), (1, 0b1001)]


@pytest.mark.parametrize("rmask,vmask", MASKS)
@pytest.mark.parametrize("op", list(VV_OPS) + list(VF_OPS))
def test_vector_elementwise(op, rmask, vmask):
    """VRAM[gp[rd]] = bf16(f32 op); with rmask != 0 only heads whose V_MASK bit is set change,
    the others take the first operand (spec §4.0)."""
    prefix = [li(1, VLEN), li(2, 2 * VLEN), li(5, vmask), "C_SET_V_MASK_REG gp5", load_fp(3)]
    src2 = "gp1" if op in VV_OPS else "f3"
    p = step(prefix, f"{op} gp2, gp0, {src2}, {rmask}", vram=vram_image(VA, VB), fpsram=fp_image(VS))
    r = VV_OPS[op](VA, VB) if op in VV_OPS else VF_OPS[op](VA, VS)
    exp = p.expected()
    exp["vram"][2] = bf(np.where(head_select(rmask, vmask), f32(r), VA))
    assert_state(p.after, exp)


def test_vector_result_may_alias_a_source():
    p = step(li(1, VLEN), "V_SUB_VV gp1, gp1, gp0, 0", vram=vram_image(VA, VB))
    exp = p.expected()
    exp["vram"][1] = bf(VB - VA)  # rs1 - rs2, written over rs1's row
    assert_state(p.after, exp)


def test_vram_writes_round_to_nearest_even():
    a = np.ones(VLEN, np.float32)
    b = np.zeros(VLEN, np.float32)
    ties = [(256.0, 1.0, 256.0), (258.0, 1.0, 260.0), (1.0, E8, 1.0), (1.0 + 2 * E8, E8, 1.0 + 4 * E8),
            (1.0, 3 * 2.0 ** -9, 1.0 + 2 * E8), (-258.0, -1.0, -260.0),
            (2.0 ** 127 * 1.9921875, 2.0 ** 119, INF)]  # a tie at the bf16 maximum rounds to inf
    for i, (x, y, _) in enumerate(ties):
        a[i], b[i] = x, y
    p = step(li(1, VLEN), "V_ADD_VV gp0, gp0, gp1, 0", vram=vram_image(a, b))
    got = fv(p.after["vram"][0])
    for i, (_, _, want) in enumerate(ties):
        assert got[i] == want, (i, got[i], want)
    exp = p.expected()
    exp["vram"][0] = bf(a + b)
    assert_state(p.after, exp)


@pytest.mark.parametrize("funct1", [0, 1, 9])
@pytest.mark.parametrize("rmask,vmask", [(0, 0b1111), (2, 0b0110)])
def test_v_sub_vf_order(funct1, rmask, vmask):
    """funct1 = 0: a - s; funct1 != 0 ("reverse"): s - a."""
    prefix = [li(2, 2 * VLEN), li(5, vmask), "C_SET_V_MASK_REG gp5", load_fp(3)]
    p = step(prefix, f"V_SUB_VF gp2, gp0, f3, {rmask}, {funct1}", vram=vram_image(VA), fpsram=fp_image(VS))
    r = VA - VS if funct1 == 0 else VS - VA
    exp = p.expected()
    exp["vram"][2] = bf(np.where(head_select(rmask, vmask), r, VA))
    assert_state(p.after, exp)


@pytest.mark.parametrize("op", ["V_MAX_VF", "V_MIN_VF"])
@pytest.mark.parametrize("rmask,vmask", [(0, 0), (1, 0b0110)])
@pytest.mark.parametrize("nan_bound", [False, True])
def test_v_max_min_vf_nan_rules(op, rmask, vmask, nan_bound):
    """clamp_min/clamp_max: NaN elements stay NaN; a NaN bound makes every updated lane NaN."""
    a = VA.copy()
    a[[3, 20, 40, 63]] = NAN
    a[[4, 21]] = [INF, -INF]
    s = NAN if nan_bound else 0.5
    prefix = [li(2, 2 * VLEN), li(5, vmask), "C_SET_V_MASK_REG gp5", load_fp(3)]
    p = step(prefix, f"{op} gp2, gp0, f3, {rmask}", vram=vram_image(a), fpsram=fp_image(s))
    if nan_bound:
        r = np.full(VLEN, NAN, np.float32)
    else:
        r = np.where(np.isnan(a), a, (np.maximum if op == "V_MAX_VF" else np.minimum)(a, f32(s)))
    exp = p.expected()
    exp["vram"][2] = bf(np.where(head_select(rmask, vmask), r, a))
    assert_state(p.after, exp)


EXP_IN = fv(bf(np.concatenate([f32([0, 1, -1, 2, 0.5, 100, -100, INF, -INF, NAN, 88, -88, 89, -89, 10, -10]),
                         rand_bf16(RNG, 48, -6, 3)])))


def test_v_exp_v_clamps_to_plus_minus_88():
    p = step(li(2, 2 * VLEN), "V_EXP_V gp2, gp0, 0", vram=vram_image(EXP_IN))
    exp = p.expected()
    exp["vram"][2] = bf(_exp_ref(EXP_IN))
    assert_state(p.after, exp)
    got = fv(p.after["vram"][2])
    assert got[5] == got[10] == got[7] and got[6] == got[11] == got[8] > 0


@pytest.mark.parametrize("vmask", [0b0101, 0b1110, 0])
def test_masked_v_exp_v_gives_unmasked_heads_the_clamped_input(vmask):
    # heads 0 and 1 hold the out-of-range inputs; the assembler cannot mask V_EXP_V (spec §3.3)
    word = encode_fields(OP["V_EXP_V"], rd=2, rs1=0, rs3=1)
    p = step([li(2, 2 * VLEN), li(5, vmask), "C_SET_V_MASK_REG gp5"], word, vram=vram_image(EXP_IN))
    keep = f32(np.clip(EXP_IN, -88.0, 88.0))
    exp = p.expected()
    exp["vram"][2] = bf(np.where(head_select(1, vmask), _exp_ref(EXP_IN), keep))
    assert_state(p.after, exp)


def test_assembled_v_exp_v_with_a_mask_operand_is_not_masked():
    """`V_EXP_V gp2, gp0, 1` puts the 1 into imm18 (the rs2 field), so rmask stays 0 (spec §3.3)."""
    p = step([li(2, 2 * VLEN), li(5, 0b0001), "C_SET_V_MASK_REG gp5"], "V_EXP_V gp2, gp0, 1",
             vram=vram_image(EXP_IN))
    exp = p.expected()
    exp["vram"][2] = bf(_exp_ref(EXP_IN))
    assert_state(p.after, exp)


RECI_IN = fv(bf(np.concatenate([f32([0.0, -0.0, INF, -INF, 3, -7, 0.1, NAN]), rand_bf16(RNG, 56)])))


@pytest.mark.parametrize("rmask,vmask", [(0, 0), (1, 0b1010), (4, 0b0001)])
def test_v_reci_v(rmask, vmask):
    word = encode_fields(OP["V_RECI_V"], rd=2, rs1=0, rs3=rmask)
    p = step([li(2, 2 * VLEN), li(5, vmask), "C_SET_V_MASK_REG gp5"], word, vram=vram_image(RECI_IN))
    with np.errstate(divide="ignore"):
        r = np.float32(1) / RECI_IN
    exp = p.expected()
    exp["vram"][2] = bf(np.where(head_select(rmask, vmask), r, RECI_IN))
    assert_state(p.after, exp)
    if rmask == 0:
        assert list(p.after["vram"][2][:4]) == [0x7F80, 0xFF80, 0x0000, 0x8000]


@pytest.mark.parametrize("n", [0, 1, 5, 63, 64, 65, 1000, 0x80000000, 0xFFFFFFFF])
def test_v_shft_v_shifts_right_with_zero_fill(n):
    src = rand_bf16(RNG, VLEN)
    p = step([li(2, 2 * VLEN), li(3, n)], "V_SHFT_V gp2, gp0, gp3", vram=vram_image(src))
    out = np.zeros(VLEN, np.float32)
    if n < VLEN:
        out[n:] = src[: VLEN - n]
    exp = p.expected()
    exp["vram"][2] = bf(out)
    assert_state(p.after, exp)


# =============================================================================================
# reductions (spec §4.2, §8)
# =============================================================================================
def test_v_red_sum_uses_libtorch_order():
    """256 + 1 + 62 * 2^-16: summed left to right in f32 every 2^-16 is lost (257 -> bf16 256);
    in libtorch's lane order (spec §8) the small terms first combine, giving bf16 258."""
    x = np.full(VLEN, 2.0 ** -16, np.float32)
    x[0], x[1] = 256.0, 1.0
    seq = np.float32(0)
    for v in x:
        seq = np.float32(seq + v)
    assert bf(seq) == bf(256.0) and bf(torch_sum64(x)) == bf(258.0)
    p = step("", "V_RED_SUM f1, gp0", vram=vram_image(x))
    exp = p.expected()
    exp["fp"][1] = bf(258.0)
    assert_state(p.after, exp)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_v_red_sum_accumulates_into_fp_rd(seed):
    rng = np.random.default_rng(seed)
    x = rand_bf16(rng, VLEN, -12, 12)
    acc = f32(rand_bf16(rng, 1, 0, 6)[0])
    p = step(load_fp(6), "V_RED_SUM f6, gp0", vram=vram_image(x), fpsram=fp_image(acc))
    exp = p.expected()
    exp["fp"][6] = bf(np.float32(acc + torch_sum64(x)))
    assert_state(p.after, exp)


@pytest.mark.parametrize("vmask", [0b0101, 0b1111, 0b0000, 0b1000])
def test_masked_v_red_sum_counts_masked_heads_hlen_times(vmask):
    """S = sum(unmasked heads) + HLEN * sum(masked heads) (the HLEN-fold bug, spec §4.2)."""
    x = f32(np.repeat([1.0, 2.0, 3.0, -4.0], HLEN) + np.tile(np.arange(HLEN) % 3, 4))
    head_sums = x.reshape(4, HLEN).sum(axis=1)
    sel = np.array([(vmask >> h) & 1 for h in range(4)], bool)
    want = float(head_sums[~sel].sum() + HLEN * head_sums[sel].sum()) + 0.5
    word = encode_fields(OP["V_RED_SUM"], rd=2, rs1=0, rs3=1)
    p = step([li(5, vmask), "C_SET_V_MASK_REG gp5", load_fp(2)], word, vram=vram_image(x),
             fpsram=fp_image(0.5))
    exp = p.expected()
    exp["fp"][2] = bf(want)
    assert_state(p.after, exp)


def _row_with(values: dict) -> np.ndarray:
    x = small_ints(np.random.default_rng(5), VLEN, -20, 20)
    for i, v in values.items():
        x[i] = v
    return x


@pytest.mark.parametrize("row,acc,want,rmask", [
    (_row_with({37: 50.0}), -INF, 50.0, 0),
    (_row_with({37: 50.0}), 60.0, 60.0, 0),
    (_row_with({37: 50.0, 9: NAN}), 5.0, 5.0, 0),  # torch max -> NaN, Rust max ignores it
    (_row_with({37: 50.0}), NAN, 50.0, 0),  # a NaN accumulator is replaced
    (_row_with({9: NAN}), NAN, NAN, 0),
    (_row_with({60: 70.0}), 0.0, 70.0, 1),  # masked: the mask (head 0 only) is ignored
    (_row_with({1: -0.0} | {i: -1.0 for i in range(VLEN) if i != 1}), -INF, -0.0, 0),
])
def test_v_red_max(row, acc, want, rmask):
    word = encode_fields(OP["V_RED_MAX"], rd=7, rs1=0, rs3=rmask)
    p = step([li(5, 0b0001), "C_SET_V_MASK_REG gp5", load_fp(7)], word, vram=vram_image(row),
             fpsram=fp_image(acc))
    exp = p.expected()
    exp["fp"][7] = bf(want)
    assert_state(p.after, exp)


# =============================================================================================
# V_TOPK (spec §4.2)
# =============================================================================================
def _total_order_key(v: np.float32) -> int:
    b = int(np.float32(v).view(np.uint32))
    return (~b & 0xFFFFFFFF) if b >> 31 else b | 0x80000000


def topk_ref(logits: np.ndarray, experts: int, k: int):
    v = f32(logits[:experts]).copy()
    v[np.isnan(v)] = -INF
    order = sorted(range(experts), key=lambda i: (-_total_order_key(v[i]), i))[:k]
    sel = v[order]
    with np.errstate(invalid="ignore"):
        w = [f32(np.exp(np.float64(np.float32(x - sel[0])))) for x in sel]
    den = np.float32(0)
    for x in w:
        den = np.float32(den + x)
    ok = np.isfinite(den) and den > 0
    weights = [bf(np.float32(x / den)) if ok else bf(0.0) for x in w]
    return np.array(order, np.uint32), np.array(weights, np.uint16)


def _topk_rows(first: np.ndarray, n_rows: int) -> np.ndarray:
    rows = np.full((3, VLEN), 100.0, np.float32)  # rows / lanes beyond E must be ignored
    flat = rows.reshape(-1)
    flat[: len(first)] = first
    return rows


_ties = np.full(32, -1.0, np.float32)
_ties[[3, 5, 7, 9]] = [0.0, -0.0, NAN, 0.0]
TOPK_CASES = {
    "policy0_distinct": (0, np.random.default_rng(11).permutation(32).astype(np.float32) * 0.25 - 4),
    "policy0_ties_nan_zero": (0, _ties),
    "policy0_equal": (0, np.full(32, 2.5, np.float32)),
    "policy0_top_inf": (0, np.where(np.arange(32) == 17, INF, np.arange(32) * 0.5).astype(np.float32)),
    "policy0_all_nan": (0, np.full(32, NAN, np.float32)),
    "policy1_distinct": (1, np.random.default_rng(12).permutation(128).astype(np.float32) * 0.125 - 8),
    "policy1_equal_top": (1, np.where(np.arange(128) % 17 == 0, 3.0, -2.0).astype(np.float32)),
}


@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_v_topk(case):
    policy, logits = TOPK_CASES[case]
    experts, k = (32, 4) if policy == 0 else (128, 8)
    rows = _topk_rows(logits, 3)
    prefix = [li(1, 1000), li(2, 3 * VLEN), li(3, 200)]
    p = step(prefix, f"V_TOPK gp1, gp2, gp3, {policy}", vram=vram_image(None, None, None, *rows),
             fpsram=FPS, intsram=INTS)
    idx, w = topk_ref(rows.reshape(-1), experts, k)
    exp = p.expected()
    exp["intsram"][200:200 + k] = idx
    exp["fpsram"][1000:1000 + k] = w
    assert_state(p.after, exp)
    if case == "policy0_ties_nan_zero":  # +0 before -0, ties by lower index, NaN ranks as -inf
        assert list(idx) == [3, 9, 5, 0]
    if case == "policy0_equal":
        assert list(fv(w)) == [0.25] * 4 and list(idx) == [0, 1, 2, 3]
    if case in ("policy0_top_inf", "policy0_all_nan"):
        assert not w.any()


# =============================================================================================
# HBM transfers (spec §2.7, §4.5)
# =============================================================================================
def mx_tensor(elem: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Testbench layout: element bytes row-major, then the scale bytes (spec §2.7)."""
    return np.concatenate([elem.reshape(-1), scale.reshape(-1)]).astype(np.uint8)


def _m_tensor(rng, rows=128):
    elem = rng.integers(0, 256, (rows, MLEN)).astype(np.uint8)
    elem[(elem & 0x78) == 0x78] &= 0xF7  # no inf/NaN codes here (tested separately)
    scale = rng.integers(115, 140, (rows, MLEN // 8)).astype(np.uint8)
    return elem, scale


@pytest.mark.parametrize("rstride,stride,funct1", [(0, None, 0), (0, None, 1), (1, 128, 0), (2, 128, 0)])
def test_h_prefetch_m(rstride, stride, funct1):
    """Rows at a + off + i*S, scales at a + SCALE + off/8 + i*S/8; S = STRIDE only if rstride == 1."""
    rng = np.random.default_rng(3)
    elem, scale = _m_tensor(rng, 256)
    base, off = 1024, 64 * MLEN  # tensor at HBM byte 1024, sub-block from row 64
    hbm = np.zeros(base + elem.size + scale.size, np.uint8)
    hbm[base:] = mx_tensor(elem, scale)
    prefix = [li(1, elem.size), "C_SET_SCALE_REG gp1", li(2, base), "C_SET_ADDR_REG a3, gp0, gp2",
              li(4, 5 * TILE), li(6, off)]
    if stride is not None:
        prefix += [li(7, stride), "C_SET_STRIDE_REG gp7"]
    p = step(prefix, f"H_PREFETCH_M gp4, gp6, a3, {rstride}, {funct1}", hbm=hbm)
    s = stride if rstride == 1 else MLEN
    rows = 64 + np.arange(MLEN) * s // MLEN
    exp = p.expected()
    exp["mram"][5] = mx_decode(elem[rows], scale[rows])
    assert_state(p.after, exp)
    # one block per row of elements (aligned) + one per row for the scales
    assert p.ra.hbm_bytes_read - p.rb.hbm_bytes_read == MLEN * 2 * 64


def test_h_prefetch_m_special_codes_and_unrounded_f32():
    elem = np.zeros((MLEN, MLEN), np.uint8)
    scale = np.full((MLEN, 8), 127, np.uint8)
    elem[0, :8] = [0x01, 0x07, 0x08, 0x77, 0x78, 0xF8, 0x79, 0xFF]  # subnormals, max 240, +-inf, NaN
    elem[1, :8] = [0x38, 0x78, 0x00, 0xB8, 0x79, 0x3F, 0x40, 0x01]
    scale[1, 0] = 0  # scale 0: finite -> 0, inf/NaN -> NaN
    elem[2, :8] = elem[1, :8]
    scale[2, 0] = 255  # scale 255 = inf
    elem[3, :8] = 0x3F  # 1.875 * 2^-120
    scale[3, 0] = 7
    elem[3, 8:16] = 0x39
    scale[3, 1] = 254
    prefix = [li(1, TILE), "C_SET_SCALE_REG gp1"]
    p = step(prefix, "H_PREFETCH_M gp0, gp0, a0, 0, 0", hbm=mx_tensor(elem, scale))
    exp = p.expected()
    exp["mram"][0] = mx_decode(elem, scale)
    assert_state(p.after, exp)
    t = p.after["mram"][0]
    assert list(t[0, :6]) == [2.0 ** -10, 7 * 2.0 ** -10, 2.0 ** -6, 240.0, INF, -INF] and np.isnan(t[0, 6])
    assert t[1, 0] == 0 and np.isnan(t[1, 1]) and np.isnan(t[2, 2])
    assert t[3, 8] == f32(1.125 * 2.0 ** 127)


@pytest.mark.parametrize("funct1", [0, 1])
def test_h_prefetch_v(funct1):
    rng = np.random.default_rng(4)
    elem, scale = _m_tensor(rng, 8)
    scale[:] = rng.integers(120, 135, scale.shape)
    hbm = mx_tensor(elem, scale)
    prefix = [li(1, elem.size), "C_SET_SCALE_REG gp1", li(4, 10 * VLEN), li(6, 2 * VLEN)]
    p = step(prefix, f"H_PREFETCH_V gp4, gp6, a0, 0, {funct1}", hbm=hbm)
    exp = p.expected()
    exp["vram"][10:14] = bf(mx_decode(elem[2:6], scale[2:6]))
    assert_state(p.after, exp)
    assert p.ra.hbm_bytes_read - p.rb.hbm_bytes_read == 4 * 2 * 64


def test_h_prefetch_v_unaligned_rows_count_two_blocks_each():
    rng = np.random.default_rng(14)
    hbm = rng.integers(0, 0x70, 4096).astype(np.uint8)
    hbm[2048:2100] = 127  # scales
    prefix = [li(1, 2048 - 10), "C_SET_SCALE_REG gp1", li(6, 80)]  # scale start 2038 + 10 = 2048
    p = step(prefix, "H_PREFETCH_V gp0, gp6, a0, 0, 0", hbm=hbm)
    exp = p.expected()
    for i in range(4):
        e = hbm[80 + 64 * i: 144 + 64 * i]
        exp["vram"][i] = bf(mx_decode(e, hbm[2048 + 8 * i: 2056 + 8 * i]))
    assert_state(p.after, exp)
    assert p.ra.hbm_bytes_read - p.rb.hbm_bytes_read == 4 * (2 + 1) * 64


def test_h_prefetch_v_with_rstride_1_and_default_stride_1_overlaps_rows():
    """STRIDE resets to 1: rows start 1 byte apart and all share scale bytes S0 (spec §4.5)."""
    rng = np.random.default_rng(5)
    hbm = rng.integers(0, 0x70, 1024).astype(np.uint8)
    hbm[512:600] = rng.integers(120, 135, 88)
    prefix = [li(1, 512), "C_SET_SCALE_REG gp1", li(6, 16)]  # E0 = 16, S0 = 512 + 2
    p = step(prefix, "H_PREFETCH_V gp0, gp6, a0, 1, 0", hbm=hbm)
    exp = p.expected()
    for i in range(4):
        exp["vram"][i] = bf(mx_decode(hbm[16 + i: 80 + i], hbm[514:522]))
    assert_state(p.after, exp)


def test_h_prefetch_v_scale_bytes_are_clipped_at_a_64_byte_boundary():
    rng = np.random.default_rng(6)
    hbm = rng.integers(0, 0x70, 1024).astype(np.uint8)
    hbm[512 + 60: 512 + 100] = rng.integers(120, 135, 40)
    prefix = [li(1, 512 + 60), "C_SET_SCALE_REG gp1"]  # row 0's 8 scale bytes straddle byte 576
    p = step(prefix, "H_PREFETCH_V gp0, gp0, a0, 0, 0", hbm=hbm)
    exp = p.expected()
    for i in range(4):
        sc = hbm[572 + 8 * i: 580 + 8 * i].copy()
        if i == 0:
            sc[4:] = 0  # past the block end: read as 0, so blocks 4..7 decode to 0
        exp["vram"][i] = bf(mx_decode(hbm[64 * i: 64 * i + 64], sc))
    assert_state(p.after, exp)
    assert (fv(p.after["vram"][0][32:]) == 0).all() and np.count_nonzero(fv(p.after["vram"][0][:32])) > 24


@pytest.mark.parametrize("hi,lo,hbm_size", [(0, 4096 - 32, 4096), (1, 0, None), (0, 4096, 4096)])
def test_h_prefetch_v_reads_past_the_end_of_hbm_as_zero(hi, lo, hbm_size):
    hbm = np.full(4096, 0x38, np.uint8)  # 1.0 everywhere, scale byte 0x38 = 2^-71 too
    prefix = [li(1, hi), li(2, lo), "C_SET_ADDR_REG a2, gp1, gp2", li(4, 5 * VLEN)]
    p = step(prefix, "H_PREFETCH_V gp4, gp0, a2, 0, 0", hbm=hbm, hbm_size=hbm_size)
    exp = p.expected()
    if lo == 4096 - 32 and hi == 0:
        # row 0: 32 bytes of data then zeros; its scales at 4064 are 0x38; later rows are all past the end
        row = np.zeros(VLEN, np.float32)
        row[:32] = 2.0 ** -71
        exp["vram"][5] = bf(row)
    assert_state(p.after, exp)
    per_row = (lo % 64 + 63) // 64 + 1 + 1  # element blocks touched + one scale block
    assert p.ra.hbm_bytes_read - p.rb.hbm_bytes_read == 4 * per_row * 64  # reads past the end still count


SPEC_BLOCKS = [  # (block values, element bytes, scale byte) straight from spec §2.9(d)
    ([1.0625, 1.09375, 1.8125, 1.96875, float(fv(bf(0.01))), float(fv(bf(0.0005))), NAN, -0.0],
     [0x38, 0x39, 0x3E, 0x3F, 0x07, 0x00, 0x38, 0x00], 127),
    ([0.0] * 8, [0] * 8, 0),  # all-zero block: scale byte 0
    ([1.9375, 1.0, 0.0, -1.0, 1.5, 0.25, 0.125, 1.875], [0x3F, 0x38, 0, 0xB8, 0x3C, 0x28, 0x20, 0x3F], 127),
    ([1.0, 1.5, -2.0, 0.25, 3.0, 0.0, 0.5, -3.75], [0x30, 0x34, 0xB8, 0x20, 0x3C, 0, 0x28, 0xBF], 128),
    ([INF, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0x77, 0, 0, 0, 0, 0, 0, 0], 254),
    ([NAN] * 8, [0] * 8, 0),  # NaNs are ignored by max_abs: max_abs = 0 -> all-zero block
    ([0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0x38, 0x30, 0, 0, 0, 0, 0, 0], 126),
    ([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0xB8, 0, 0, 0, 0, 0, 0, 0], 127),
]


def test_h_store_v_hardware_mx_encode_spec_examples():
    row0 = np.concatenate([f32(b) for b, _, _ in SPEC_BLOCKS])
    rng = np.random.default_rng(8)
    rows = [row0] + [rand_bf16(rng, VLEN, -10, 10) for _ in range(3)]
    prefix = [li(1, 4 * VLEN), "C_SET_SCALE_REG gp1", li(4, 6 * VLEN)]
    p = step(prefix, "H_STORE_V gp4, gp0, a0, 0, 0", vram=vram_image(*([None] * 6 + rows)))
    exp = p.expected()
    want_e0 = np.concatenate([e for _, e, _ in SPEC_BLOCKS]).astype(np.uint8)
    want_s0 = np.array([s for _, _, s in SPEC_BLOCKS], np.uint8)
    e0, s0 = mx_encode_row(fv(bf(row0)))
    np.testing.assert_array_equal(e0, want_e0)  # the test's own encoder agrees with the spec
    np.testing.assert_array_equal(s0, want_s0)
    for i, r in enumerate(rows):
        e, s = mx_encode_row(fv(bf(r)))
        exp["hbm"][64 * i: 64 * i + 64] = e
        exp["hbm"][256 + 8 * i: 264 + 8 * i] = s
    assert_state(p.after, exp)
    assert p.ra.hbm_bytes_written - p.rb.hbm_bytes_written == 4 * 2 * 64
    assert p.ra.hbm_bytes_read - p.rb.hbm_bytes_read == 4 * 2 * 64


@pytest.mark.parametrize("rstride,stride,funct1", [(0, None, 0), (1, 192, 1), (3, 192, 0)])
def test_h_store_v_unaligned_preserves_neighbours(rstride, stride, funct1):
    rng = np.random.default_rng(9)
    rows = [rand_bf16(rng, VLEN, -20, 20) for _ in range(4)]
    hbm = np.full(8192, 0xA5, np.uint8)
    a, off, scale_reg = 1000, 77, 3000
    prefix = [li(1, scale_reg), "C_SET_SCALE_REG gp1", li(2, a), "C_SET_ADDR_REG a9, gp0, gp2", li(3, off),
              li(4, 12 * VLEN)]
    if stride is not None:
        prefix += [li(7, stride), "C_SET_STRIDE_REG gp7"]
    p = step(prefix, f"H_STORE_V gp4, gp3, a9, {rstride}, {funct1}", hbm=hbm,
             vram=vram_image(*([None] * 12 + rows)))
    s = stride if rstride == 1 else VLEN
    exp = p.expected()
    blocks = 0
    for i, r in enumerate(rows):
        e, sc = mx_encode_row(fv(bf(r)))
        e0, s0 = a + off + i * s, a + scale_reg + off // 8 + i * s // 8
        exp["hbm"][e0: e0 + 64] = e
        exp["hbm"][s0: s0 + 8] = sc
        blocks += (e0 % 64 + 63) // 64 + 1 + (s0 % 64 + 7) // 64 + 1
    assert_state(p.after, exp)
    assert p.ra.hbm_bytes_written - p.rb.hbm_bytes_written == blocks * 64


def test_h_store_then_prefetch_round_trip():
    rng = np.random.default_rng(10)
    rows = [rand_bf16(rng, VLEN, -3, 3) for _ in range(4)]
    text = [li(1, 2048), "C_SET_SCALE_REG gp1", li(4, 20 * VLEN), li(5, 40 * VLEN),
            "H_STORE_V gp4, gp0, a0, 0, 0"]
    p = step(text, "H_PREFETCH_V gp5, gp0, a0, 0, 0", vram=vram_image(*([None] * 20 + rows)))
    exp = p.expected()
    for i, r in enumerate(rows):
        e, sc = mx_encode_row(fv(bf(r)))
        exp["vram"][40 + i] = bf(mx_decode(e, sc))
    assert_state(p.after, exp)


# =============================================================================================
# matrix ops (spec §4.1)
# =============================================================================================
MRNG = np.random.default_rng(77)
M_ELEM = nice_e4m3(MRNG, (MLEN, MLEN))
M_SCALE = MRNG.integers(126, 129, (MLEN, 8)).astype(np.uint8)
T = mx_decode(M_ELEM, M_SCALE).astype(np.float64)  # the tile, exact
X = small_ints(MRNG, (MLEN, VLEN))  # 64 VRAM rows of small integers
X2 = small_ints(MRNG, (MLEN, VLEN))
TILE_NO = 2


def mram_prefix(*extra) -> list:
    return [li(1, TILE), "C_SET_SCALE_REG gp1", li(2, TILE_NO * TILE), "H_PREFETCH_M gp2, gp0, a0, 0, 0", *extra]


MHBM = mx_tensor(M_ELEM, M_SCALE)
MVRAM = vram_image(*X, *X2)  # X at rows 0..63, X2 at rows 64..127


def mstep(prefix, instr) -> Pair:
    return step(mram_prefix(*prefix), instr, hbm=MHBM, vram=MVRAM)


def acc_mm(rows_x, cols) -> np.ndarray:
    return f32(rows_x.astype(np.float64) @ cols)


@pytest.mark.parametrize("colblock", [0, 3, 15])
def test_m_mm_row_granular_matrix_offset(colblock):
    c0 = colblock * BLEN
    p = mstep([li(3, TILE_NO * TILE + c0 * MLEN), li(4, 5 * VLEN)], "M_MM 0, gp3, gp4")
    exp = p.expected()
    exp["m_acc"] = acc_mm(X[5:9], T[:, c0:c0 + BLEN])
    assert_state(p.after, exp)


@pytest.mark.parametrize("colblock", [0, 2, 15])
def test_m_tmm_swaps_operands_and_uses_tile_rows(colblock):
    c0 = colblock * BLEN
    p = mstep([li(3, TILE_NO * TILE + c0 * MLEN), li(4, 7 * VLEN)], "M_TMM 0, gp4, gp3")
    exp = p.expected()
    exp["m_acc"] = acc_mm(X[7:11], T[c0:c0 + BLEN, :].T)
    assert_state(p.after, exp)


@pytest.mark.parametrize("executor", ["interpreter", "fast"])
@pytest.mark.parametrize("op", ["M_MM", "M_TMM"])
def test_products_add_in_ascending_k(op, executor):
    """One M_MM's (M_TMM's) MLEN products are added in ascending k, each rounded to f32 on its
    own (the golden model's order, plena.numerics.matmul), in both executors. Activations over
    17 binades and weights over ~30 make the f32 sums depend on the order (XLA's dot kernel
    for a 4 x 64 by 64 x 4 block, which the emulator used before, differs on most elements)."""
    rng = np.random.default_rng(78)
    elem, scale = _m_tensor(rng, MLEN)
    rows = [rand_bf16(rng, VLEN) for _ in range(BLEN)]
    prefix = [li(1, TILE), "C_SET_SCALE_REG gp1", li(2, TILE_NO * TILE), "H_PREFETCH_M gp2, gp0, a0, 0, 0",
              li(3, TILE_NO * TILE + 8 * MLEN), li(4, 0)]
    instr = "M_MM 0, gp3, gp4" if op == "M_MM" else "M_TMM 0, gp4, gp3"
    got = run(prog(prefix, instr), hbm=mx_tensor(elem, scale), vram=vram_image(*rows), executor=executor,
              fast_options=dict(hot=1))
    assert got.executor == executor
    tile = mx_decode(elem, scale).astype(np.float32)
    x, w = np.stack(rows), (tile[:, 8:8 + BLEN] if op == "M_MM" else tile[8:8 + BLEN, :].T)
    acc = x[:, 0, None] * w[0, None, :]
    for k in range(1, MLEN):
        acc = f32(acc + f32(x[:, k, None] * w[k, None, :]))
    np.testing.assert_array_equal(np.asarray(got.state.m_acc).view(np.uint32), acc.view(np.uint32))


def test_m_mm_and_m_tmm_accumulate_into_one_buffer():
    prefix = [li(3, TILE_NO * TILE + 4 * MLEN), li(4, 64 * VLEN), "M_MM 0, gp3, gp4", "M_MM 0, gp3, gp0"]
    p = mstep(prefix, "M_TMM 0, gp4, gp3")
    exp = p.expected()
    first = X2[0:4].astype(np.float64) @ T[:, 4:8] + X[0:4].astype(np.float64) @ T[:, 4:8]
    np.testing.assert_array_equal(p.before["m_acc"], f32(first))
    exp["m_acc"] = f32(f32(first) + acc_mm(X2[0:4], T[4:8, :].T))
    assert_state(p.after, exp)


@pytest.mark.parametrize("stride_reg,stride,gp0,imm,col", [
    (0, None, 0, 0, 0),  # rs1 = 0: stride 1
    (0, None, 5, 0, 8),  # rs1 = 0 means 1 even when gp0 != 0
    (6, 3, 0, 0, 60),
    (6, 0, 0, 0, 4),  # gp[rs1] = 0: every row lands on the base row; the last one wins
    (6, 2, 0, 100, 4),  # imm18 is added (M_MM_WO's assembler immediate is consistent)
])
def test_m_mm_wo(stride_reg, stride, gp0, imm, col):
    prefix = [li(3, TILE_NO * TILE + 8 * MLEN), li(4, 0), "M_MM 0, gp3, gp4", "M_MM 0, gp3, gp4",
              li(5, 200 * VLEN + col - imm if imm else 200 * VLEN + col)]
    if stride is not None:
        prefix.append(li(stride_reg, stride))
    if gp0:
        prefix.append(li(0, gp0))
    p = mstep(prefix, f"M_MM_WO gp5, gp{stride_reg}, {imm}")
    acc = f32(2 * (X[0:4].astype(np.float64) @ T[:, 8:12]))
    s = 1 if stride_reg == 0 else stride
    exp = p.expected()
    np.testing.assert_array_equal(p.before["m_acc"], acc)
    for i in range(BLEN):
        exp["vram"][200 + i * s, col:col + BLEN] = bf(acc[i])
    exp["m_acc"] = np.zeros((BLEN, BLEN), np.float32)
    assert_state(p.after, exp)


@pytest.mark.parametrize("off", [0, 4, 60])
def test_m_mv_element_granular_offset(off):
    p = mstep([li(3, TILE_NO * TILE + off), li(4, 9 * VLEN)], "M_MV 0, gp3, gp4")
    exp = p.expected()
    exp["v_acc"] = acc_mm(X[9:10], T[:, off:off + BLEN])[0]
    assert_state(p.after, exp)


def test_m_tmv_uses_tile_rows_0_to_blen():
    p = mstep([li(3, TILE_NO * TILE), li(4, 70 * VLEN), "M_MV 0, gp3, gp4"], "M_TMV 0, gp3, gp4")
    exp = p.expected()
    mv = acc_mm(X2[6:7], T[:, 0:BLEN])[0]
    np.testing.assert_array_equal(p.before["v_acc"], mv)
    exp["v_acc"] = f32(mv + acc_mm(X2[6:7], T[0:BLEN, :].T)[0])
    assert_state(p.after, exp)


@pytest.mark.parametrize("word_imm,asm_imm,col", [(0, None, 0), (12, None, 12), (None, 64, 4), (None, 0, 0)])
def test_m_mv_wo(word_imm, asm_imm, col):
    """The emulator reads imm18 at bit 14; the assembler writes the immediate at bit 10, so
    `M_MV_WO gp5, 64` means +4 to the emulator (spec §3.3)."""
    prefix = [li(3, TILE_NO * TILE + 16), li(4, 3 * VLEN), "M_MV 0, gp3, gp4", li(5, 300 * VLEN)]
    instr = (encode_fields(OP["M_MV_WO"], rd=5, imm18=word_imm) if word_imm is not None
             else f"M_MV_WO gp5, {asm_imm}")
    p = mstep(prefix, instr)
    acc = acc_mm(X[3:4], T[:, 16:20])[0]
    exp = p.expected()
    exp["vram"][300, col:col + BLEN] = bf(acc)
    exp["v_acc"] = np.zeros(BLEN, np.float32)
    assert_state(p.after, exp)


def bmm_ref(x, h0):
    """hm[g][i][j] = 0.25 * sum_d X[i][d*BA+g] * T[h0+d][j] (interleaved heads)."""
    xh = x.astype(np.float64).reshape(MLEN, HLEN, BA).transpose(2, 0, 1)
    return f32(0.25 * (xh @ T[h0:h0 + HLEN, :]))


def btmm_ref(x, h0):
    """hm[g][i][j] = 0.25 * sum_d X[i][g*HLEN+d] * T[j][h0+d] (contiguous heads)."""
    xh = x.astype(np.float64).reshape(MLEN, BA, HLEN).transpose(1, 0, 2)
    return f32(0.25 * (xh @ T[:, h0:h0 + HLEN].T))


@pytest.mark.parametrize("head", [0, 1, 3])
def test_m_bmm_interleaved_heads_scaled_by_a_quarter(head):
    p = mstep([li(3, TILE_NO * TILE + head * HLEN), li(4, 64 * VLEN)], "M_BMM 0, gp3, gp4")
    exp = p.expected()
    exp["hm_acc"] = bmm_ref(X2, head * HLEN)
    assert_state(p.after, exp)


@pytest.mark.parametrize("head", [0, 2])
def test_m_btmm_contiguous_heads_scaled_by_a_quarter(head):
    p = mstep([li(3, TILE_NO * TILE + head * HLEN), li(4, 0)], "M_BTMM 0, gp3, gp4")
    exp = p.expected()
    exp["hm_acc"] = btmm_ref(X, head * HLEN)
    assert_state(p.after, exp)


def test_batched_ops_accumulate_and_write_out_resets():
    prefix = [li(3, TILE_NO * TILE + 16), li(4, 0), li(5, 64 * VLEN), "M_BMM 0, gp3, gp4",
              "M_BTMM 0, gp3, gp5", li(6, 300 * VLEN)]
    p = mstep(prefix, "M_BMM_WO gp6, 0")
    acc = f32(bmm_ref(X, 16) + btmm_ref(X2, 16))
    np.testing.assert_array_equal(p.before["hm_acc"], acc)
    exp = p.expected()
    exp["vram"][300:300 + BA * MLEN] = bf(acc.reshape(BA * MLEN, MLEN))  # head-major rows
    exp["hm_acc"] = np.zeros_like(acc)
    assert_state(p.after, exp)


@pytest.mark.parametrize("instr,row", [(encode_fields(OP["M_BMM_WO"], rd=6, imm18=128), 302),
                                       ("M_BMM_WO gp6, 1024", 301)])  # assembler imm >> 4 = 64
def test_m_bmm_wo_immediate(instr, row):
    prefix = [li(3, TILE_NO * TILE + 48), li(4, 0), "M_BTMM 0, gp3, gp4", li(6, 300 * VLEN)]
    p = mstep(prefix, instr)
    acc = btmm_ref(X, 48)
    exp = p.expected()
    exp["vram"][row:row + BA * MLEN] = bf(acc.reshape(BA * MLEN, MLEN))
    exp["hm_acc"] = np.zeros_like(acc)
    assert_state(p.after, exp)


@pytest.mark.parametrize("base,off", [(TILE_NO * TILE, 32), (TILE_NO * TILE + 16, 0), (TILE_NO * TILE, 0)])
def test_m_btmv_adds_gp_rd_to_the_matrix_address(base, off):
    p = mstep([li(3, base), li(6, off), li(4, 66 * VLEN), "M_BTMV gp6, gp3, gp4"], "M_BTMV gp6, gp3, gp4")
    h0 = base + off - TILE_NO * TILE
    one = f32(0.25 * (X2[2].astype(np.float64).reshape(BA, HLEN) @ T[:, h0:h0 + HLEN].T))
    np.testing.assert_array_equal(p.before["hv_acc"], one)
    exp = p.expected()
    exp["hv_acc"] = f32(one + one)
    assert_state(p.after, exp)


@pytest.mark.parametrize("instr,row", [("M_BMV_WO gp5, 0", 400), (encode_fields(OP["M_BMV_WO"], rd=5, imm18=64), 401)])
def test_m_bmv_wo(instr, row):
    p = mstep([li(3, TILE_NO * TILE + 32), li(4, 66 * VLEN), "M_BTMV gp0, gp3, gp4", li(5, 400 * VLEN)], instr)
    acc = f32(0.25 * (X2[2].astype(np.float64).reshape(BA, HLEN) @ T[:, 32:48].T))
    exp = p.expected()
    for g in range(BA):
        exp["vram"][row + g] = bf(acc[g])
    exp["hv_acc"] = np.zeros_like(acc)
    assert_state(p.after, exp)


# =============================================================================================
# control (spec §4.6)
# =============================================================================================
def test_c_set_addr_reg_rs1_is_the_high_word():
    p = step([li(1, 0x12345), li(2, 0xFEDCBA98)], "C_SET_ADDR_REG a15, gp1, gp2")
    exp = p.expected()
    exp["a_hi"][15], exp["a_lo"][15] = 0x12345, 0xFEDCBA98
    assert_state(p.after, exp)


@pytest.mark.parametrize("op,field", [("C_SET_SCALE_REG", "scale"), ("C_SET_STRIDE_REG", "stride"),
                                      ("C_SET_V_MASK_REG", "vmask")])
def test_c_set_special_registers(op, field):
    p = step(li(9, 0xABCDE123), f"{op} gp9")
    assert p.before["stride"] == 1 and p.before["scale"] == 0 and p.before["vmask"] == 0  # reset values
    exp = p.expected()
    exp[field] = np.array(0xABCDE123, np.uint32)
    assert_state(p.after, exp)


def test_c_loop_start_sets_the_counter_and_pushes_an_entry():
    p = step(li(1, 77), "C_LOOP_START gp1, 1000")
    exp = p.expected()
    exp["gp"][1] = 1000
    exp["loops"] = np.array([[1, 1]])  # (start_pc, reg)
    assert_state(p.after, exp)


def test_c_loop_end_removes_a_matched_entry_below_the_top():
    p = step(["C_LOOP_START gp1, 1", "C_LOOP_START gp5, 2"], "C_LOOP_END gp1")
    exp = p.expected()
    exp["gp"][1] = 0
    exp["loops"] = np.array([[1, 5]])  # the inner loop stays
    assert_state(p.after, exp)


def test_c_break_pops_the_innermost_loop_and_zeroes_its_counter():
    p = step(["C_LOOP_START gp1, 3", "C_LOOP_START gp5, 4"], "C_BREAK")
    exp = p.expected()
    exp["gp"][5] = 0
    exp["loops"] = np.array([[0, 1]])
    assert_state(p.after, exp)


def run_final(text, **kw) -> dict:
    return snapshot(run(prog(text), **kw))


def test_loop_counter_counts_down_and_is_zero_afterwards():
    st = run_final("""
        C_LOOP_START gp1, 4
        S_ST_INT gp1, gp6, 0
        S_ADDI_INT gp6, gp6, 1
        C_LOOP_END gp1
    """)
    assert list(st["intsram"][:5]) == [4, 3, 2, 1, 0]
    assert st["gp"][1] == 0 and st["gp"][6] == 4 and len(st["loops"]) == 0


def test_nested_loops():
    st = run_final("""
        C_LOOP_START gp1, 3
        C_LOOP_START gp2, 4
        C_LOOP_START gp3, 5
        S_ADDI_INT gp10, gp10, 1
        C_LOOP_END gp3
        S_ADDI_INT gp11, gp11, 1
        C_LOOP_END gp2
        S_ADDI_INT gp12, gp12, 1
        C_LOOP_END gp1
    """)
    assert list(st["gp"][[1, 2, 3, 10, 11, 12]]) == [0, 0, 0, 60, 12, 3]


def test_nested_loops_reusing_one_register_share_the_counter():
    """The inner C_LOOP_START overwrites the count; after the inner loop gp1 = 0, so the
    outer C_LOOP_END exits at once: the body runs 3 times, not 6."""
    st = run_final("""
        C_LOOP_START gp1, 2
        C_LOOP_START gp1, 3
        S_ADDI_INT gp10, gp10, 1
        C_LOOP_END gp1
        S_ADDI_INT gp11, gp11, 1
        C_LOOP_END gp1
    """)
    assert list(st["gp"][[1, 10, 11]]) == [0, 3, 1] and len(st["loops"]) == 0


def test_body_modifying_its_counter_changes_the_trip_count():
    # each iteration also subtracts 1: counter 10 -> body sees 10, 8, 6, 4, 2 -> 5 iterations
    st = run_final("""
        S_ADDI_INT gp4, gp0, 1
        C_LOOP_START gp1, 10
        S_ADDI_INT gp10, gp10, 1
        S_SUB_INT gp1, gp1, gp4
        C_LOOP_END gp1
    """)
    assert st["gp"][10] == 5 and st["gp"][1] == 0
    st = run_final("""
        C_LOOP_START gp1, 10
        S_ADDI_INT gp10, gp10, 1
        S_ADDI_INT gp1, gp0, 1
        C_LOOP_END gp1
    """)
    assert st["gp"][10] == 1 and st["gp"][1] == 0


def test_c_break_falls_through_to_the_next_instruction():
    st = run_final("""
        C_LOOP_START gp1, 3
        C_LOOP_START gp5, 4
        S_ADDI_INT gp10, gp10, 1
        C_BREAK
        S_ADDI_INT gp11, gp11, 1
        C_LOOP_END gp1
    """)
    assert list(st["gp"][[1, 5, 10, 11]]) == [0, 0, 3, 3] and len(st["loops"]) == 0


def test_c_break_then_loop_end_of_an_outer_loop_on_the_same_register():
    st = run_final("""
        C_LOOP_START gp1, 2
        C_LOOP_START gp1, 5
        S_ADDI_INT gp10, gp10, 1
        C_BREAK
        S_ADDI_INT gp11, gp11, 1
        C_LOOP_END gp1
        S_ADDI_INT gp12, gp12, 1
    """)
    assert list(st["gp"][[1, 10, 11, 12]]) == [0, 1, 1, 1] and len(st["loops"]) == 0


def test_loop_iteration_of_exactly_the_budget_is_allowed():
    """SMALL budget 40: 39 body instructions + C_LOOP_END = 40 per iteration is fine."""
    body = "\n".join(["S_ADDI_INT gp10, gp10, 1"] * 39)
    st = run_final(f"C_LOOP_START gp1, 3\n{body}\nC_LOOP_END gp1", cfg=SMALL)
    assert st["gp"][10] == 117


# =============================================================================================
# non-default machine: VRAM depth, prefetch amount (SMALL)
# =============================================================================================
def test_h_prefetch_v_drops_rows_beyond_the_vram_depth():
    rng = np.random.default_rng(21)
    hbm = rng.integers(0, 0x70, 512).astype(np.uint8)
    hbm[256:300] = 127
    prefix = [li(1, 256), "C_SET_SCALE_REG gp1", li(4, 2046 * VLEN)]
    p = step(prefix, "H_PREFETCH_V gp4, gp0, a0, 0, 0", hbm=hbm, cfg=SMALL)
    exp = p.expected()
    for i in range(2):  # rows 2046 and 2047 exist; 2048 and 2049 are silently dropped
        exp["vram"][2046 + i] = bf(mx_decode(hbm[64 * i: 64 * i + 64], hbm[256 + 8 * i: 264 + 8 * i]))
    assert_state(p.after, exp)


def test_h_prefetch_m_amount_of_two_tiles():
    rng = np.random.default_rng(22)
    elem, scale = _m_tensor(rng, 128)
    prefix = [li(1, elem.size), "C_SET_SCALE_REG gp1", li(4, 62 * TILE)]
    p = step(prefix, "H_PREFETCH_M gp4, gp0, a0, 0, 0", hbm=mx_tensor(elem, scale), cfg=SMALL)
    exp = p.expected()
    exp["mram"][62] = mx_decode(elem[:64], scale[:64])
    exp["mram"][63] = mx_decode(elem[64:], scale[64:])
    assert_state(p.after, exp)


# =============================================================================================
# cycles (spec §6)
# =============================================================================================
# (instruction, cycles with DC_EN = 1, cycles with DC_EN = 0) from spec §1.4 / §6
CYCLE_MIX = [
    ("S_ADDI_INT gp1, gp0, 64", 1, 1), ("S_ADDI_INT gp2, gp0, 128", 1, 1),
    ("S_LD_FP f1, gp0, 0", 1, 1), ("S_ST_FP f1, gp0, 5", 1, 1),
    ("S_LD_INT gp3, gp0, 0", 1, 1), ("S_ST_INT gp3, gp0, 7", 1, 1),
    ("S_LUI_INT gp8, 3", 1, 1), ("S_ADD_INT gp8, gp8, gp1", 1, 1), ("S_SUB_INT gp8, gp8, gp1", 1, 1),
    ("S_MUL_INT gp8, gp8, gp1", 1, 1),
    ("V_ADD_VV gp2, gp0, gp1, 0", 1, 2), ("V_ADD_VF gp2, gp0, f1, 0", 1, 2),
    ("V_SUB_VV gp2, gp0, gp1, 0", 1, 2), ("V_SUB_VF gp2, gp0, f1, 0, 1", 1, 2),
    ("V_MUL_VV gp2, gp0, gp1, 0", 1, 5), ("V_MUL_VF gp2, gp0, f1, 0", 1, 5),
    ("V_SHFT_V gp2, gp0, gp1", 1, 5), ("V_EXP_V gp2, gp0, 0", 1, 6), ("V_RECI_V gp2, gp0, 0", 2, 7),
    ("V_MAX_VF gp2, gp0, f1, 0", 4, 4), ("V_MIN_VF gp2, gp0, f1, 0", 4, 4),
    ("V_RED_MAX f2, gp0, 0", 4, 4), ("V_RED_SUM f2, gp0", 8, 20),
    ("V_RED_SUM f0, gp0", 0, 0), ("S_MUL_FP f0, f1, f1", 0, 0),  # rd = 0: skipped
    ("S_ADD_FP f3, f1, f1", 1, 1), ("S_SUB_FP f3, f1, f1", 1, 1), ("S_MUL_FP f3, f1, f1", 1, 1),
    ("S_MAX_FP f3, f1, f2", 1, 1), ("S_EXP_FP f3, f1", 1, 2), ("S_RECI_FP f3, f1", 1, 2),
    ("S_SQRT_FP f3, f1", 1, 2), ("S_MAP_V_FP gp2, gp0, 0", 128, 128),
    ("C_SET_V_MASK_REG gp1", 1, 1), ("C_SET_SCALE_REG gp0", 1, 1), ("C_SET_STRIDE_REG gp1", 1, 1),
    ("C_SET_ADDR_REG a1, gp0, gp1", 1, 1),
    ("M_MM 0, gp0, gp0", 64, 64), ("M_TMM 0, gp0, gp0", 64, 64), ("M_MM_WO gp2, gp0, 0", 1, 1),
    ("M_MV 0, gp0, gp0", 64, 64), ("M_TMV 0, gp0, gp0", 64, 64), ("M_MV_WO gp2, 0", 1, 1),
    ("V_TOPK gp0, gp0, gp0, 0", 4 * 32, 4 * 32), ("V_TOPK gp0, gp0, gp0, 1", 4 * 128, 4 * 128),
]
BATCHED_MIX = [("M_BMM 0, gp0, gp0", 64), ("M_BTMM 0, gp0, gp0", 64), ("M_BMM_WO gp2, 0", 1),
               ("M_BTMV gp0, gp0, gp0", 1), ("M_BMV_WO gp2, 0", 1)]
LOOP_MIX = "C_LOOP_START gp9, 3\nS_ADDI_INT gp10, gp10, 1\nS_ADD_FP f4, f1, f1\nC_LOOP_END gp9"


def test_cycles_default_machine():
    lines = [c[0] for c in CYCLE_MIX] + [b[0] for b in BATCHED_MIX] + [LOOP_MIX]
    res = run(prog(lines), fpsram=fp_image(1.0))
    want = sum(c[1] for c in CYCLE_MIX) + sum(b[1] for b in BATCHED_MIX) + 1 + 3 * (1 + 1 + 1)
    assert res.cycles == want
    assert res.instructions == len(CYCLE_MIX) + len(BATCHED_MIX) + 1 + 3 * 3


def test_cycles_with_dc_en_0_use_the_dc_lib_dis_column():
    lines = [c[0] for c in CYCLE_MIX] + [LOOP_MIX]
    res = run(prog(lines), cfg=SMALL, fpsram=fp_image(1.0))
    assert res.cycles == sum(c[2] for c in CYCLE_MIX) + 1 + 3 * (1 + 1 + 1)


def test_hbm_ops_add_no_non_hbm_cycles():
    p = step(li(1, 64), ["H_PREFETCH_V gp1, gp0, a0, 0, 0", "H_STORE_V gp1, gp0, a0, 0, 0",
                         "H_PREFETCH_M gp0, gp0, a0, 0, 0"])
    assert p.ra.cycles == p.rb.cycles == 1


# =============================================================================================
# subnormals: XLA:CPU runs with FTZ/DAZ, the reference keeps IEEE gradual underflow
# (plena.numerics.ieee recomputes the affected elements on the bits)
# =============================================================================================
SUB = 2.0 ** -130  # an f32 subnormal and a bf16 subnormal (0x0008)


@pytest.mark.parametrize("op,a,b,want", [
    ("S_ADD_FP", SUB, 0.0, SUB),
    ("S_ADD_FP", SUB, SUB, 2 * SUB),
    ("S_SUB_FP", 2.0 ** -126 + 2.0 ** -133, 2.0 ** -126, 2.0 ** -133),  # cancellation below 2^-126
    ("S_SUB_FP", 0.0, SUB, -SUB),
    ("S_MUL_FP", SUB, 2.0 ** 40, 2.0 ** -90),  # a subnormal operand is not zero
    ("S_MUL_FP", SUB, INF, INF),  # (DAZ would give 0 * inf = NaN)
    ("S_MUL_FP", -(2.0 ** -65), 2.0 ** -66, -(2.0 ** -131)),
    ("S_MUL_FP", 2.0 ** -100, 2.0 ** -100, 0.0),  # true underflow to zero
    ("S_MAX_FP", 0.0, SUB, SUB),
    ("S_MAX_FP", -SUB, 0.0, 0.0),
    ("S_MAX_FP", SUB, 2 * SUB, 2 * SUB),
])
def test_scalar_fp_subnormals(op, a, b, want):
    p = step(load_fp(1, 2), f"{op} f3, f1, f2", fpsram=fp_image(a, b))
    exp = p.expected()
    exp["fp"][3] = bf(want)
    assert exp["fp"][3] != p.before["fp"][3] or want == 0.0
    assert_state(p.after, exp)


@pytest.mark.parametrize("op,s", [("V_ADD_VF", -SUB), ("V_SUB_VF", SUB), ("V_MUL_VF", 2.0 ** -8),
                                  ("V_MAX_VF", SUB), ("V_MIN_VF", -SUB)])
def test_vector_subnormal_rows(op, s):
    """Rows of subnormals and near-subnormals through the element-wise ops equal numpy's IEEE
    f32 result, element for element."""
    rng = np.random.default_rng(11)
    a = rand_bf16(rng, VLEN, -135, -120) * rng.choice([-1.0, 1.0], VLEN).astype(np.float32)
    a = fv(bf(a))
    instr = f"{op} gp2, gp0, f1, 0" + (", 0" if op == "V_SUB_VF" else "")
    p = step([li(2, 2 * VLEN), load_fp(1)], instr, vram=vram_image(a), fpsram=fp_image(s))
    sv = f32(fv(bf(s)))
    with np.errstate(all="ignore"):
        r = {"V_ADD_VF": a + sv, "V_SUB_VF": a - sv, "V_MUL_VF": a * sv,
             "V_MAX_VF": np.maximum(a, sv), "V_MIN_VF": np.minimum(a, sv)}[op]
    exp = p.expected()
    exp["vram"][2] = bf(r)
    assert (bf(r) & 0x7F80 == 0).sum() > VLEN // 4  # many results are bf16 subnormals
    assert_state(p.after, exp)


def test_reductions_keep_subnormals():
    x = np.full(VLEN, 2.0 ** -133, np.float32)
    x[5] = -(2.0 ** -100)
    p = step(load_fp(2), ["V_RED_SUM f1, gp0", "V_RED_MAX f2, gp0, 0"], vram=vram_image(x),
             fpsram=fp_image(-INF, -INF, -1.0))
    exp = p.expected()
    exp["fp"][1] = bf(np.float32(torch_sum64(x)))
    exp["fp"][2] = bf(2.0 ** -133)
    assert fv(exp["fp"][2]) != 0
    assert_state(p.after, exp)


def test_v_mul_vf_subnormal_result():
    a = np.full(VLEN, 2.0 ** -100, np.float32)
    p = step([load_fp(1), li(2, 2 * VLEN)], "V_MUL_VF gp2, gp0, f1, 0", vram=vram_image(a), fpsram=fp_image(2.0 ** -30))
    exp = p.expected()
    exp["vram"][2] = bf(np.full(VLEN, 2.0 ** -130))  # = 0x0008, a bf16 subnormal
    assert_state(p.after, exp)


def test_s_mul_fp_subnormal_result():
    p = step(load_fp(1, 2), "S_MUL_FP f3, f1, f2", fpsram=fp_image(2.0 ** -100, 2.0 ** -30))
    exp = p.expected()
    exp["fp"][3] = bf(2.0 ** -130)
    assert_state(p.after, exp)


def test_v_add_vf_subnormal_operand():
    a = np.full(VLEN, 2.0 ** -130, np.float32)
    p = step([load_fp(1), li(2, 2 * VLEN)], "V_ADD_VF gp2, gp0, f1, 0", vram=vram_image(a), fpsram=fp_image(0.0))
    exp = p.expected()
    exp["vram"][2] = bf(a)
    assert_state(p.after, exp)


def test_h_prefetch_m_keeps_f32_subnormal_products():
    elem = np.zeros((MLEN, MLEN), np.uint8)
    scale = np.full((MLEN, 8), 127, np.uint8)
    elem[0, :8] = 0x0F  # 15 * 2^-9 ...
    scale[0, 0] = 1  # ... * 2^-126 = 15 * 2^-135: an f32 subnormal (and not a bf16 value)
    p = step([li(1, TILE), "C_SET_SCALE_REG gp1"], "H_PREFETCH_M gp0, gp0, a0, 0, 0", hbm=mx_tensor(elem, scale))
    exp = p.expected()
    exp["mram"][0] = mx_decode(elem, scale)
    assert exp["mram"][0][0, 0] == f32(15 * 2.0 ** -135) != 0
    assert_state(p.after, exp)
