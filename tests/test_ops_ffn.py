"""FFN-family ops: frontend (plena.frontend.ops_ffn) against golden (plena.golden.ops_ffn).

(a) Bit-exactness: one program per machine (default MLEN 64 / BLEN 4, and MLEN 16 / BLEN 8
    whose H_PREFETCH_M moves 4 tiles) runs SiLU, GELU (also in place, and gated with the result
    over the gate operand; inputs over a wide range with ±0, ±inf, NaN, exp-clamp and
    f32-subnormal values, preloaded in VRAM), the gated FFN (D = 2 VLEN, I = 3 VLEN: K-split and several column blocks) and RoPE (several
    heads per row, in place) on the emulator; every output equals the hardware-policy golden
    bit for bit.
(b) fp32 golden = the ideal formulas (float64 numpy references), hardware golden close to it.
(c) jax.grad through the golden ops in fp32 mode equals the gradient of plain jnp formulas;
    hardware mode gives finite straight-through gradients close to it.
(d) Upstream conformance: the FFN and RoPE built at the aten_ffn / ci_ffn_m64b8s64 and
    aten_rope / ci_rope_m64b8s64 shapes and configs from their inputs/*.npy match the cases'
    golden (skipped without ../shared; the ci_* cells, a second machine, are marked slow).
(e) Layout helpers, rotate_half matrix, build-time errors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plena.config import default_config, load_config
from plena.frontend import ops_ffn as F
from plena.frontend.builder import BuildError, ProgramBuilder
from plena.golden import Policy, mx_qdq
from plena.golden import ops_ffn as G
from plena.numerics.bf16 import f32_to_bf16_bits_np
from plena.verify.conformance import bf16_match, conformance_dir, load_case

DEFAULT = default_config()
SMALL = DEFAULT.replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=8, matrix_sram_size=1024)
CONFIGS = {"m64b4": DEFAULT, "m16b8": SMALL}
F32 = Policy.fp32()
M = 8  # rows (a multiple of BLEN in both configs)


# =============================================================================================
# helpers
# =============================================================================================
def bf16_round(x) -> np.ndarray:
    bits = f32_to_bf16_bits_np(np.asarray(x, np.float32))
    return (bits.astype(np.uint32) << 16).view(np.float32)


def canon_bits(x) -> np.ndarray:
    """bf16 bits of bf16-valued data, every NaN as 0x7FC0 (NaNs compare by class)."""
    u = np.asarray(x, np.float32).view(np.uint32)
    assert not (u & 0xFFFF).any(), "value is not bf16"
    b = (u >> 16).astype(np.uint16)
    b[(b & 0x7FFF) > 0x7F80] = 0x7FC0
    return b


def assert_same_bits(golden, emulator):
    g, e = canon_bits(golden), canon_bits(emulator)
    bad = np.argwhere(g != e)
    if len(bad):
        at = tuple(bad[0])
        pytest.fail(f"{len(bad)} of {g.size} differ, first at {list(at)}: golden "
                    f"{np.asarray(golden)[at]} emulator {np.asarray(emulator)[at]}")


def wide_values(rng, shape) -> np.ndarray:
    """bf16 values over a wide range plus the special cases of exp's clamp and IEEE."""
    x = rng.choice([-1.0, 1.0], shape) * (1 + rng.integers(0, 128, shape) / 128) \
        * 2.0 ** rng.integers(-24, 8, shape)
    x = x.astype(np.float32)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 88.5, -88.5, 100.0, -100.0, 1e-30, -1e-38, 3e38]
    x.flat[: len(special)] = special
    return bf16_round(x)


def rope_tables(positions, head_dim: int, width: int, base: float = 10000.0):
    """Llama cos/sin tables: per head [cos(p*theta), cos(p*theta)], heads side by side."""
    inv = base ** (-np.arange(0, head_dim, 2) / head_dim)
    ang = np.outer(positions, inv)
    cos = np.tile(np.concatenate([np.cos(ang), np.cos(ang)], 1), (1, width // head_dim))
    sin = np.tile(np.concatenate([np.sin(ang), np.sin(ang)], 1), (1, width // head_dim))
    return cos.astype(np.float32), sin.astype(np.float32)


def rotate_half_np(x, head_dim: int):
    xs = x.reshape(x.shape[:-1] + (-1, 2, head_dim // 2))
    return np.concatenate([-xs[..., 1, :], xs[..., 0, :]], -1).reshape(x.shape)


def silu64(x):
    x = np.asarray(x, np.float64)
    return x / (1 + np.exp(-x))


def gelu64(x):
    x = np.asarray(x, np.float64)
    return x / (1 + np.exp(-1.702 * x))


def ffn64(x, wg, wu, wd, act=silu64):
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    return (act(x @ wg) * (x @ wu)) @ wd


def ffn_weights(rng, d, i):
    wg = rng.normal(size=(d, i)) / math.sqrt(d)
    wu = rng.normal(size=(d, i)) / math.sqrt(d)
    wd = rng.normal(size=(i, d)) / math.sqrt(i)
    return [w.astype(np.float32) for w in (wg, wu, wd)]


# =============================================================================================
# (a) one program per machine, bit-exact against the golden
# =============================================================================================
@pytest.fixture(scope="module", params=sorted(CONFIGS))
def machine_run(request):
    cfg = CONFIGS[request.param]
    v = cfg.vlen
    rng = np.random.default_rng(7)
    head_dim = v // 4 if v >= 32 else v // 2
    act_kind = "silu" if v >= 32 else "gelu"
    d, i = 2 * v, 3 * v
    data = {
        "act": wide_values(rng, (M, v)),
        "q": bf16_round(rng.normal(size=(M, v))),
        "gate_in": bf16_round(rng.normal(size=(M, v))),
        "x": rng.normal(size=(M, d)).astype(np.float32),
    }
    data["cos"], data["sin"] = (bf16_round(t) for t in rope_tables(np.arange(M) + 3, head_dim, v))
    data["wg"], data["wu"], data["wd"] = ffn_weights(rng, d, i)

    b = ProgramBuilder(cfg)
    # VRAM preload regions first (they start at element 0, in this order)
    names = ("act", "act_inplace", "q", "cos", "sin", "gate_in")
    act, act_inplace, q, cos, sin, gate_in = (b.vram(n, M) for n in names)
    preload = np.concatenate([data[n.replace("_inplace", "")] for n in names])
    regions = {"silu": b.vram("silu_out", M), "gelu": b.vram("gelu_out", M),
               "silu_inplace": act_inplace, "rope": q, "gelu_gated": gate_in}
    F.silu(b, act, regions["silu"])
    F.gelu(b, act, regions["gelu"])
    F.activation(b, "silu", act_inplace, act_inplace)
    F.gelu(b, act, gate_in, gate=gate_in)  # the result over the gate operand
    # FFN: x from HBM, weights MX in HBM
    xt = b.hbm_input("x", data["x"])
    wts = [F.weight_input(b, n, data[n]) for n in ("wg", "wu", "wd")]
    xv = F.vram_matrix(b, "xv", M, d)
    F.load_matrix(b, xt, xv)
    regions["ffn"] = F.vram_matrix(b, "ffn_out", M, d)
    F.ffn(b, xv, M, *wts, regions["ffn"], act=act_kind, name="ffn")
    F.store_matrix(b, regions["ffn"], b.hbm_output("y", M, d))
    # RoPE in place
    F.rope(b, q, cos, sin, q, head_dim=head_dim, rot_weight=F.rope_weight(b, "R", head_dim), name="rope")
    prog = b.build()
    result = prog.run(vram=f32_to_bf16_bits_np(preload).reshape(-1))
    out = {k: prog.read_vram(result, r) for k, r in regions.items()}
    out["ffn"] = F.read_matrix(prog, result, regions["ffn"], M)
    out["y"] = prog.read_hbm_output(result, "y")
    data["act_kind"] = act_kind
    return cfg, head_dim, data, out, prog, result


def test_silu_gelu_bit_exact(machine_run):
    cfg, _, data, out, _, _ = machine_run
    hw = Policy.hardware(cfg)
    x = data["act"]
    assert_same_bits(G.silu(x, hw), out["silu"])
    assert_same_bits(G.gelu(x, hw), out["gelu"])
    assert_same_bits(G.activation("silu", x, hw), out["silu_inplace"])
    assert_same_bits(G.gelu(x, hw, gate=data["gate_in"]), out["gelu_gated"])
    # and the values are the activations (where 1.702 vs its bf16 value 1.703125 does not matter)
    fin = np.isfinite(x) & (np.abs(x) < 8)
    np.testing.assert_allclose(out["silu"][fin], silu64(x[fin]), rtol=0.02, atol=2e-3)
    np.testing.assert_allclose(out["gelu"][fin], gelu64(x[fin]), rtol=0.02, atol=2e-3)


def test_ffn_bit_exact(machine_run):
    cfg, _, data, out, prog, result = machine_run
    hw = Policy.hardware(cfg)
    xv = G.from_hbm(data["x"], hw)
    want = G.ffn(xv, data["wg"], data["wu"], data["wd"], cfg, hw, act=data["act_kind"])
    assert_same_bits(want, out["ffn"])
    # stored to HBM (store_matrix): the hardware MX encoding of the VRAM result
    np.testing.assert_array_equal(out["y"], mx_qdq(want, policy=hw, point="hbm_act"))
    # the ideal FFN of the MX-quantised operands: only the bf16 roundings in between differ
    act64 = silu64 if data["act_kind"] == "silu" else gelu64
    ref = ffn64(xv, *(mx_qdq(data[n], policy=hw, point="hbm_weight") for n in ("wg", "wu", "wd")), act=act64)
    assert np.linalg.norm(out["ffn"] - ref) / np.linalg.norm(ref) < 0.02
    assert {"ffn.gate", "ffn.up", "ffn.act", "ffn.down"} <= set(prog.stages)
    # one M_MM_WO per BLEN x BLEN output block: gate, up (3 column blocks each), down (2), rope (1)
    assert result.opcode_counts["M_MM_WO"] == M // cfg.blen * (cfg.mlen // cfg.blen) * (3 + 3 + 2 + 1)
    # one M_MM per K-chunk: gate, up (K = 2 MLEN), down (K = 3 MLEN), rope (K = MLEN)
    assert result.opcode_counts["M_MM"] == M // cfg.blen * (cfg.mlen // cfg.blen) * (3 * 2 * 2 + 2 * 3 + 1)


def test_rope_bit_exact(machine_run):
    cfg, head_dim, data, out, _, _ = machine_run
    hw = Policy.hardware(cfg)
    q, cos, sin = data["q"], data["cos"], data["sin"]
    assert_same_bits(G.rope(q, cos, sin, head_dim, cfg, hw), out["rope"])
    ref = q * cos + rotate_half_np(q, head_dim) * sin
    np.testing.assert_allclose(out["rope"], ref, rtol=0.02, atol=0.02)


# =============================================================================================
# (b) fp32 golden = the formulas; (c) gradients
# =============================================================================================
def test_fp32_golden_matches_float64_references():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(6, 64)) * 4).astype(np.float32)
    np.testing.assert_allclose(G.silu(x, F32), silu64(x), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(G.gelu(x, F32), gelu64(x), rtol=2e-6, atol=1e-6)
    g = rng.normal(size=x.shape).astype(np.float32)
    np.testing.assert_allclose(G.silu(x, F32, gate=g), silu64(x) * g, rtol=2e-6, atol=1e-6)
    # the sigmoid approximation stays within 0.021 of the exact erf GELU
    erf_gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(x.astype(np.float64))
    assert np.max(np.abs(np.asarray(G.gelu(x, F32)) - erf_gelu)) < 0.021
    wg, wu, wd = ffn_weights(rng, 64, 128)
    np.testing.assert_allclose(G.ffn(x, wg, wu, wd, 64, F32, act="gelu"),
                               ffn64(x, wg, wu, wd, gelu64), rtol=1e-4, atol=1e-4)
    cos, sin = rope_tables(np.arange(6) * 5, 16, 64)
    np.testing.assert_allclose(G.rope(x, cos, sin, 16, 64, F32),
                               x * cos.astype(np.float64) + rotate_half_np(x, 16) * sin, rtol=1e-6, atol=1e-5)
    # hardware golden: same function up to MXFP8 / bf16 error
    hw = Policy.hardware()
    ref = ffn64(np.asarray(G.from_hbm(x, hw)), wg, wu, wd)
    got = np.asarray(G.ffn(G.from_hbm(x, hw), wg, wu, wd, 64, hw))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1


def test_rotate_half_matrix():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    for hd in (2, 8, 32, 64):
        r = G.rotate_half_matrix(hd, 64)
        np.testing.assert_array_equal(x @ r, rotate_half_np(x, hd))
        assert set(np.unique(r)) == {-1.0, 0.0, 1.0}
    for bad in (0, 3, 24):
        with pytest.raises(ValueError):
            G.rotate_half_matrix(bad, 64)


def test_grad_through_golden_ops():
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)
    wg, wu, wd = (jnp.asarray(w) for w in ffn_weights(rng, 32, 64))
    cos, sin = (jnp.asarray(t) for t in rope_tables(np.arange(4), 8, 32))
    ct = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)

    def plain(x, wg, wu, wd):
        hi = jax.lax.Precision.HIGHEST
        h = jax.nn.silu(jnp.matmul(x, wg, precision=hi)) * jnp.matmul(x, wu, precision=hi)
        y = jnp.matmul(h, wd, precision=hi)
        rot = jnp.concatenate([-x.reshape(4, 4, 2, 4)[:, :, 1], x.reshape(4, 4, 2, 4)[:, :, 0]], -1)
        return jnp.sum((y + x * cos + rot.reshape(4, 32) * sin) * ct)

    def golden(x, wg, wu, wd, policy):
        y = G.ffn(x, wg, wu, wd, 16, policy) + G.rope(x, cos, sin, 8, 16, policy)
        return jnp.sum(y * ct)

    want = jax.grad(plain, argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    grad = jax.grad(golden, argnums=(0, 1, 2, 3))
    got = grad(x, wg, wu, wd, F32)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # hardware mode (straight-through roundings): finite and close to the ideal gradient
    gate = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def act(v, policy):
        return jnp.sum(G.gelu(v, policy, gate=gate) * ct)

    ideal, hw = jax.grad(act)(x, F32), jax.grad(act)(x, Policy.hardware())
    assert np.all(np.isfinite(hw))
    assert np.linalg.norm(hw - ideal) / np.linalg.norm(ideal) < 0.05
    # GELU alone: derivative of x * sigmoid(1.702 x)
    dg = jax.grad(lambda v: jnp.sum(G.gelu(v, F32)))(x)
    s = jax.nn.sigmoid(1.702 * x)
    np.testing.assert_allclose(dg, s + 1.702 * x * s * (1 - s), rtol=1e-5, atol=1e-6)


# =============================================================================================
# (d) upstream conformance cases
# =============================================================================================
@pytest.mark.parametrize("case_name", [
    "aten_ffn",  # the default machine: shares the emulator compile with the tests above
    pytest.param("ci_ffn_m64b8s64", marks=pytest.mark.slow),  # BLEN 8: one more compile
])
def test_ffn_at_conformance_shapes(case_name):
    if conformance_dir() is None:
        pytest.skip("../shared/conformance is absent")
    case = load_case(case_name)
    cfg = load_config(case.settings_toml)
    inp = {k: np.load(case.path / v["file"]) for k, v in case.manifest["inputs"].items()}
    x = inp["X"]
    m, d = x.shape
    # The upstream testbench's golden is silu(X @ W_up) * (X @ W_gate) (names swapped w.r.t.
    # Llama's convention), so its W_up plays our gate role.
    w_act, w_lin, w_down = inp["W_up"], inp["W_gate"], inp["W_down"]
    b = ProgramBuilder(cfg)
    xt = b.hbm_input("X", x)
    wts = [F.weight_input(b, n, w) for n, w in (("W_up", w_act), ("W_gate", w_lin), ("W_down", w_down))]
    xv = F.vram_matrix(b, "x", m, d)
    F.load_matrix(b, xt, xv)
    F.ffn(b, xv, m, *wts, xv, name="ffn")  # output over the input, as upstream
    prog = b.build()
    result = prog.run()
    got = F.read_matrix(prog, result, xv, m)
    hw = Policy.hardware(cfg)
    assert_same_bits(G.ffn(G.from_hbm(x, hw), w_act, w_lin, w_down, cfg, hw), got)
    golden = case.golden()
    cmp = case.comparison
    upstream = 100 * bf16_match(golden, got, cmp["atol"], cmp["rtol"]).mean()
    strict = 100 * bf16_match(golden, got, 0.02, 0.02).mean()
    assert upstream >= cmp["min_match_rate_percent"]
    assert strict >= 99.0, f"strict match {strict:.2f} %"
    if case.dynamic_instructions is not None:
        assert result.instructions <= case.dynamic_instructions  # no more work than upstream


@pytest.mark.parametrize("case_name", [
    "aten_rope",
    pytest.param("ci_rope_m64b8s64", marks=pytest.mark.slow),
])
def test_rope_at_conformance_shapes(case_name):
    """Upstream passes rotate_half(Q) in from the host (QROT); here the machine computes it."""
    if conformance_dir() is None:
        pytest.skip("../shared/conformance is absent")
    case = load_case(case_name)
    cfg = load_config(case.settings_toml)
    inp = {k: np.load(case.path / v["file"]) for k, v in case.manifest["inputs"].items()}
    m, width = inp["Q"].shape
    np.testing.assert_array_equal(inp["QROT"], rotate_half_np(inp["Q"], width))  # the convention
    b = ProgramBuilder(cfg)
    regions = {}
    for n in ("Q", "COS", "SIN"):
        regions[n] = b.vram(n.lower(), m)
        b.load_rows(b.hbm_input(n, inp[n]), 0, regions[n], 0, m)
    F.rope(b, regions["Q"], regions["COS"], regions["SIN"], regions["Q"], head_dim=width)
    prog = b.build()
    got = prog.read_vram(prog.run(), regions["Q"])
    hw = Policy.hardware(cfg)
    want = G.rope(*(G.from_hbm(inp[n], hw) for n in ("Q", "COS", "SIN")), width, cfg, hw)
    assert_same_bits(want, got)
    cmp = case.comparison
    assert 100 * bf16_match(case.golden(), got, cmp["atol"], cmp["rtol"]).mean() >= cmp["min_match_rate_percent"]
    assert 100 * bf16_match(case.golden(), got, 0.02, 0.02).mean() >= 99.0


# =============================================================================================
# (e) layout helpers and build errors
# =============================================================================================
def test_block_layout_round_trip():
    a = np.arange(6 * 48).reshape(6, 48)
    rows = F.to_blocks(a, 16)
    assert rows.shape == (18, 16)
    np.testing.assert_array_equal(rows[6 + 2], a[2, 16:32])  # block 1, row 2
    np.testing.assert_array_equal(F.from_blocks(rows, 6), a)
    assert F.block_rows(6, 48, 16) == 18
    with pytest.raises(ValueError):
        F.to_blocks(a, 32)


def test_build_errors():
    b = ProgramBuilder(SMALL)
    x = F.vram_matrix(b, "x", 8, 32)
    out = F.vram_matrix(b, "out", 8, 32)
    w = np.ones((32, 32), np.float32)
    unpadded = b.hbm_input("w_unpadded", w, use="weight")  # 32 rows < H_PREFETCH_M's 64
    padded = F.weight_input(b, "w", w)
    assert padded.stored_rows == 64 and F.weight_tiles(SMALL, 32) == 4
    with pytest.raises(BuildError, match="weight_input"):
        F.linear(b, x, 8, unpadded, out)
    with pytest.raises(BuildError, match="multiple of BLEN"):
        F.linear(b, x, 4, padded, out)
    with pytest.raises(BuildError, match="rows"):
        F.linear(b, b.vram("tiny", 4), 8, padded, out)
    odd = F.weight_input(b, "odd", np.ones((32, 24), np.float32))
    with pytest.raises(BuildError, match="multiples of MLEN"):
        F.linear(b, x, 8, odd, out)
    with pytest.raises(BuildError, match="head_dim"):
        F.rope(b, x, x, x, x, head_dim=6)
    with pytest.raises(BuildError, match="rotate-half matrix for head_dim 8"):
        F.rope(b, x, x, x, x, head_dim=8, rot_weight=F.rope_weight(b, "R4", 4))
    with pytest.raises(BuildError, match="activation"):
        F.activation(b, "relu", x, x)
    with pytest.raises(BuildError, match="chain"):
        F.ffn(b, x, 8, padded, padded, F.weight_input(b, "tall", np.ones((64, 32), np.float32)), out)
