"""Flash attention (plena.frontend.ops_attention + plena.golden.ops_attention).

(a) Bit-exactness: one program per machine config holds several attention ops (MHA and GQA,
    causal and not, one and two query/key blocks) and runs on the emulator; every output must
    equal the hardware-policy golden bit for bit. Configs: the default machine (MLEN 64,
    HLEN 16, BLEN 4) and a small one (MLEN 16, HLEN 4, BLEN 4, the ci_flash_attention_m16b4s16
    machine).
(b) fp32 policy: close to a float64 numpy softmax attention.
(c) Gradients: jax.grad through the golden in fp32 mode equals the gradient of a plain jnp
    attention.
(d) Build-time errors.
(e) Conformance: the flash-attention cases compiled from their inputs/*.npy with the case's config pass the
    case's upstream rule (strict match % printed); skipped without ../shared.
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
from plena.frontend import ops_attention as F
from plena.golden import Policy
from plena.golden import ops_attention as G

from conftest import CONFORMANCE

CFG = default_config()
SMALL = CFG.replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=4,
                    hbm_m_prefetch_amount_raw=16, hbm_v_prefetch_amount=4, hbm_v_writeback_amount=4)
CONFIGS = {"default": CFG, "small": SMALL, "default_hd": CFG}  # default_hd: slow-marked head-dim cases
F32 = Policy.fp32()

# (num_heads, num_kv_heads, seq blocks, causal, head_dim "hlen" / "mlen")
SHAPES = {
    "mha": (4, 4, 1, False, "hlen"), "mha_causal": (4, 4, 1, True, "hlen"),
    "gqa": (8, 2, 1, False, "hlen"), "gqa_causal": (8, 2, 1, True, "hlen"),
    "gqa_causal_2blocks": (4, 2, 2, True, "hlen"), "mqa_2blocks": (4, 1, 2, False, "hlen"),
    "mha_dmlen": (2, 2, 1, False, "mlen"), "gqa_dmlen_causal_2blocks": (2, 1, 2, True, "mlen"),
    # the general head-dim path: d = 2*HLEN / 3*HLEN (Q lanes moved onto the kv head's K lanes by
    # an exact selection matmul; 3*HLEN heads straddle column blocks), d = 2*MLEN (K-chunked QK^T)
    "gqa_d2h_causal_2blocks": (4, 2, 2, True, "2hlen"), "mqa_d2h": (4, 1, 1, False, "2hlen"),
    "gqa_d2h_causal": (4, 2, 1, True, "2hlen"), "gqa_d3h_causal": (4, 2, 1, True, "3hlen"),
    "mqa_d2h_causal": (2, 1, 1, True, "2hlen"), "gqa_d2m_causal": (2, 1, 1, True, "2mlen"),
    "gqa_d2m_causal_2blocks": (2, 1, 2, True, "2mlen"), "mha_d2m": (2, 2, 1, False, "2mlen"),
    "mqa_d2m": (2, 1, 1, False, "2mlen"),
}


# which shapes run on which machine (each emulator instruction costs; the d = MLEN path at
# S = MLEN on the default machine is also covered by the aten_flash_attention_mha case below)
CASES = [("default", k) for k in ("mha", "mha_causal", "gqa", "gqa_causal", "gqa_causal_2blocks", "mqa_2blocks")] \
    + [("small", k) for k in ("gqa_causal", "mqa_2blocks", "mha_dmlen", "gqa_dmlen_causal_2blocks")] \
    + [("default_hd", k) for k in ("mqa_d2h_causal", "mqa_d2m")] \
    + [("small", k) for k in ("gqa_d2h_causal_2blocks", "mqa_d2h", "gqa_d3h_causal", "gqa_d2m_causal_2blocks",
                              "mha_d2m")]


def head_dim(cfg, which):
    """``"hlen"`` / ``"mlen"`` / ``"<r>hlen"`` / ``"<r>mlen"`` -> head_dim on ``cfg``."""
    r = int(which[:-4] or 1)
    return r * (cfg.hlen if which.endswith("hlen") else cfg.mlen)


def bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def ref_attention(q, k, v, H, Hkv, d, scale, causal):
    """float64 softmax attention; q (S, H*d), k/v (Skv, >= Hkv*d)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    S, Skv, G_ = q.shape[0], k.shape[0], H // Hkv
    out = np.zeros((S, H * d))
    for h in range(H):
        t = h // G_
        s = q[:, h * d:(h + 1) * d] @ k[:, t * d:(t + 1) * d].T * scale
        if causal:
            s = np.where(np.arange(Skv)[None, :] > np.arange(S)[:, None], -np.inf, s)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h * d:(h + 1) * d] = (p / p.sum(-1, keepdims=True)) @ v[:, t * d:(t + 1) * d]
    return out


# sequences that are not whole MLEN blocks (small machine, head_dim = HLEN):
# name -> (num_heads, num_kv_heads, query rows, key rows, causal)
RAGGED = {"gqa_s20_kv27": (8, 2, 20, 27, False), "mqa_s5_kv9": (4, 1, 5, 9, False),
          "causal_s21": (4, 2, 21, 21, True)}


def make_inputs(rng, cfg, H, Hkv, nblk, d, S=None, Skv=None):
    S = nblk * cfg.mlen if S is None else S
    Skv = S if Skv is None else Skv
    kv_cols = -(-Hkv * d // cfg.mlen) * cfg.mlen
    q = rng.standard_normal((S, H * d)).astype(np.float32)
    k = rng.standard_normal((Skv, kv_cols)).astype(np.float32)
    v = rng.standard_normal((Skv, kv_cols)).astype(np.float32)
    return q, k, v


@functools.lru_cache(maxsize=None)
def attention_run(cfg_name: str):
    cfg = CONFIGS[cfg_name]
    rng = np.random.default_rng(11)
    b = ProgramBuilder(cfg)
    ops = {}
    state = b.fpsram("attn_state", np.zeros(F.fp_state_words(cfg)))  # shared by all the ops
    keys = [k for c, k in CASES if c == cfg_name] + ([k for _, k in RAGGED_CASES] if cfg_name == "small" else [])
    for key in keys:
        H, Hkv, nblk, causal, which, S, Skv = _shape(key)
        d = head_dim(cfg, which)
        q, k, v = make_inputs(rng, cfg, H, Hkv, nblk, d, S, Skv)
        q[3] *= 8.0  # a peaked row
        qt = b.hbm_input(f"{key}_in_q", q, pad_rows=cfg.hbm_v_prefetch_amount)
        kt = b.hbm_input(f"{key}_in_k", k, use="kv", pad_rows=cfg.hbm_m_prefetch_amount)
        vt = b.hbm_input(f"{key}_in_v", v, use="kv", pad_rows=cfg.hbm_m_prefetch_amount)
        out = F.flash_attention(b, qt, kt, vt, num_heads=H, num_kv_heads=Hkv, head_dim=d, causal=causal,
                                fp_state=state, name=key)
        ops[key] = (out, qt, k, v, kt, vt)
    prog = b.build()
    res = prog.run()
    hw = Policy.hardware(cfg)
    result = {}
    for key, (out, qt, k, v, kt, vt) in ops.items():
        H, Hkv, nblk, causal, which, _, _ = _shape(key)
        d = head_dim(cfg, which)
        gold = G.flash_attention(bf16(qt.decoded), k, v, cfg=cfg, num_heads=H, num_kv_heads=Hkv, head_dim=d,
                                 causal=causal, policy=hw)
        ref = ref_attention(qt.decoded, kt.decoded, vt.decoded, H, Hkv, d, 1 / np.sqrt(d), causal)
        result[key] = (out.read(prog, res), np.asarray(gold), ref)
    return result


RAGGED_CASES = [("small", k) for k in RAGGED]


def _shape(key):
    """(H, Hkv, blocks, causal, head_dim kind, S or None, Skv or None) of a SHAPES / RAGGED key."""
    if key in SHAPES:
        return SHAPES[key] + (None, None)
    H, Hkv, S, Skv, causal = RAGGED[key]
    return H, Hkv, None, causal, "hlen", S, Skv


def same_bits(golden, emulated):
    g, e = np.asarray(golden, np.float32), np.asarray(emulated, np.float32)
    assert g.shape == e.shape
    bad = np.nonzero(g.view(np.uint32) != e.view(np.uint32))
    assert bad[0].size == 0, f"{bad[0].size} of {g.size} differ, first at {tuple(int(i[0]) for i in bad)}"


# =============================================================================================
# (a) bit-exact
# =============================================================================================

@pytest.mark.parametrize("cfg_name,key", [pytest.param(c, k, marks=pytest.mark.slow) if c == "default_hd" else (c, k)
                                          for c, k in CASES + RAGGED_CASES])
def test_emulator_matches_hardware_golden_bits(cfg_name, key):
    emu, gold, ref = attention_run(cfg_name)[key]
    same_bits(gold, emu)
    assert np.all(np.isfinite(emu))
    # and it is attention: close to the float64 reference on the loaded (MX-decoded) inputs
    # (bf16 scores / probabilities / accumulators)
    assert np.abs(emu - ref).max() < 0.1


# =============================================================================================
# (b) fp32 golden vs float64 reference
# =============================================================================================

@pytest.mark.parametrize("key", list(SHAPES) + list(RAGGED))
def test_fp32_golden_close_to_float64(key):
    H, Hkv, nblk, causal, which, S, Skv = _shape(key)
    d = head_dim(CFG, which)
    q, k, v = make_inputs(np.random.default_rng(3), CFG, H, Hkv, nblk, d, S, Skv)
    got = np.asarray(G.flash_attention(q, k, v, cfg=CFG, num_heads=H, num_kv_heads=Hkv, head_dim=d,
                                       causal=causal, scale=0.3 / np.sqrt(d / 16), policy=F32))
    ref = ref_attention(q, k, v, H, Hkv, d, 0.3 / np.sqrt(d / 16), causal)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)


def test_hardware_golden_differs_from_fp32():
    H, Hkv, nblk, causal, _ = SHAPES["gqa"]
    q, k, v = make_inputs(np.random.default_rng(4), CFG, H, Hkv, nblk, CFG.hlen)
    hw = np.asarray(G.flash_attention(q, k, v, cfg=CFG, num_heads=H, num_kv_heads=Hkv, policy=Policy.hardware(CFG)))
    f32 = np.asarray(G.flash_attention(q, k, v, cfg=CFG, num_heads=H, num_kv_heads=Hkv, policy=F32))
    assert np.any(hw != f32) and np.abs(hw - f32).max() < 0.2


# =============================================================================================
# (c) gradients
# =============================================================================================

def _jnp_attention(q, k, v, H, Hkv, d, scale, causal):
    S, Skv, G_ = q.shape[0], k.shape[0], H // Hkv
    outs = []
    for h in range(H):
        t = h // G_
        s = q[:, h * d:(h + 1) * d] @ k[:, t * d:(t + 1) * d].T * scale
        if causal:
            s = jnp.where(jnp.arange(Skv)[None, :] > jnp.arange(S)[:, None], -jnp.inf, s)
        outs.append(jax.nn.softmax(s, axis=-1) @ v[:, t * d:(t + 1) * d])
    return jnp.concatenate(outs, axis=-1)


@pytest.mark.parametrize("key", ["gqa_causal_2blocks", "gqa_d2h_causal", "gqa_d2m_causal"])
def test_grad_fp32_matches_plain_jnp(key):
    H, Hkv, nblk, causal, which = SHAPES[key]
    d, scale = head_dim(SMALL, which), 1 / np.sqrt(head_dim(SMALL, which))
    q, k, v = make_inputs(np.random.default_rng(5), SMALL, H, Hkv, nblk, d)
    w = np.random.default_rng(6).standard_normal((q.shape[0], q.shape[1])).astype(np.float32)

    def loss_golden(q, k, v):
        return jnp.sum(w * G.flash_attention(q, k, v, cfg=SMALL, num_heads=H, num_kv_heads=Hkv, head_dim=d,
                                             causal=causal, policy=F32))

    def loss_plain(q, k, v):
        return jnp.sum(w * _jnp_attention(q, k, v, H, Hkv, d, scale, causal))

    with jax.default_matmul_precision("highest"):
        g1 = jax.grad(loss_golden, argnums=(0, 1, 2))(q, k, v)
        g2 = jax.grad(loss_plain, argnums=(0, 1, 2))(q, k, v)
    for a, c in zip(g1, g2):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
    gh = jax.grad(lambda q: jnp.sum(w * G.flash_attention(q, k, v, cfg=SMALL, num_heads=H, num_kv_heads=Hkv,
                                                           head_dim=d, causal=causal,
                                                           policy=Policy.hardware(SMALL))))(q)
    assert np.all(np.isfinite(np.asarray(gh))) and np.any(np.asarray(gh) != 0)


# =============================================================================================
# (d) build errors
# =============================================================================================

def test_build_errors():
    b = ProgramBuilder(CFG)
    P = CFG.hbm_m_prefetch_amount
    q = b.hbm_input("q", np.zeros((64, 64), np.float32), pad_rows=4)
    k = b.hbm_input("k", np.zeros((64, 64), np.float32), use="kv", pad_rows=P)
    kw = b.hbm_input("kw", np.zeros((64, 64), np.float32), use="weight", pad_rows=P)
    k2 = b.hbm_input("k2", np.zeros((128, 64), np.float32), use="kv", pad_rows=P)
    with pytest.raises(BuildError, match="head_dim 24 not supported"):
        F.flash_attention(b, q, k, k, num_heads=2, num_kv_heads=1, head_dim=24)
    with pytest.raises(BuildError, match="multiple of num_kv_heads"):
        F.flash_attention(b, q, k, k, num_heads=4, num_kv_heads=3)
    with pytest.raises(BuildError, match="use='kv'"):
        F.flash_attention(b, q, kw, kw, num_heads=4, num_kv_heads=1)
    with pytest.raises(BuildError, match="q shape"):
        F.flash_attention(b, q, k, k, num_heads=8, num_kv_heads=1)
    with pytest.raises(BuildError, match="columns >= num_kv_heads"):
        F.flash_attention(b, b.hbm_input("q8", np.zeros((64, 128), np.float32), pad_rows=4), k, k,
                              num_heads=8, num_kv_heads=8)
    with pytest.raises(BuildError, match="causal needs equal"):
        F.flash_attention(b, q, k2, k2, num_heads=4, num_kv_heads=1, causal=True)
    with pytest.raises(BuildError, match="fp_state must be"):
        F.flash_attention(b, q, k, k, num_heads=4, num_kv_heads=1, fp_state=b.fpsram("small", [0.0] * 8))
    bb = ProgramBuilder(CFG.replace(blen=32, hbm_v_prefetch_amount=32, hbm_v_writeback_amount=32))
    with pytest.raises(BuildError, match="multiple of BLEN"):
        F.flash_attention(bb, q, k, k, num_heads=4, num_kv_heads=1)


# =============================================================================================
# (e) conformance
# =============================================================================================

# case -> (causal, head_dim "hlen" / "mlen"). The GQA cases: BA query heads of HLEN, one kv
# head (K/V zero-padded to MLEN columns); aten_flash_attention_mha: one head of MLEN dims, its
# Q preloaded into VRAM upstream (we load it from HBM: same bf16(MX) values).
CONFORMANCE_CASES = {
    "aten_flash_attention_gqa": (False, "hlen"), "aten_flash_attention_gqa_causal": (True, "hlen"),
    "ci_flash_attention_m16b4s16": (False, "hlen"), "ci_flash_attention_m64b8s64": (False, "hlen"),
    "aten_flash_attention_mha": (False, "mlen"),
}


@pytest.mark.parametrize("name", list(CONFORMANCE_CASES))
def test_conformance_case_from_its_inputs(name, capsys):
    if not (CONFORMANCE / name / "inputs").is_dir():
        pytest.skip("../shared/conformance is absent")
    from plena.verify.conformance import bf16_match, load_case

    case = load_case(CONFORMANCE / name)
    cfg = load_config(case.settings_toml)
    mlen, hlen = cfg.mlen, cfg.hlen
    ins = {n: np.load(case.path / "inputs" / f"{n}.npy") for n in "QKV"}
    q = ins["Q"].reshape(-1, mlen)
    S = q.shape[0]
    k, v = ins["K"].reshape(S, -1), ins["V"].reshape(S, -1)
    causal, which = CONFORMANCE_CASES[name]
    d = head_dim(cfg, which)
    H = mlen // d
    # the case's FP SRAM scale slot (f16), times the fixed 0.25 on the M_BTMM path, is 1/sqrt(d)
    pre = np.asarray(case.manifest["fp_sram_preload"], np.float32)
    assert np.float32(pre[1]) * (0.25 if d == hlen else 1.0) == np.float32(1 / np.sqrt(d))
    b = ProgramBuilder(cfg)
    qt = b.hbm_input("Q", q, pad_rows=cfg.hbm_v_prefetch_amount)
    kt = b.hbm_input("K", k, use="kv", pad_rows=cfg.hbm_m_prefetch_amount)
    vt = b.hbm_input("V", v, use="kv", pad_rows=cfg.hbm_m_prefetch_amount)
    out = F.flash_attention(b, qt, kt, vt, num_heads=H, num_kv_heads=1, head_dim=d, causal=causal)
    prog = b.build()
    res = prog.run()
    sim_all = out.read(prog, res).reshape(-1)
    # the case compares VRAM elements check_vram_index of its own O matrix (row-major S x MLEN,
    # starting at region_elements[0]); ours has the same packed layout
    idx = np.fromfile(case.path / "check_vram_index.u32.bin", np.uint32).astype(np.int64)
    expected = np.fromfile(case.path / "check_expected.f32.bin", np.float32)
    base = case.comparison["region_elements"][0]
    sim = sim_all[idx - base]
    cmp = case.comparison
    ok = bf16_match(expected, sim, cmp["atol"], cmp["rtol"])
    strict = bf16_match(expected, sim, 0.02, 0.02)
    up_pct, strict_pct = 100 * ok.mean(), 100 * strict.mean()
    with capsys.disabled():
        print(f"\n  {name}: upstream rule {up_pct:.2f}% (need {cmp['min_match_rate_percent']}%), "
              f"strict {strict_pct:.2f}%, max abs {np.abs(expected - sim).max():.4g}", end="")
    assert up_pct >= cmp["min_match_rate_percent"]
    gold = G.flash_attention(bf16(qt.decoded), k, v, cfg=cfg, num_heads=H, num_kv_heads=1, head_dim=d, causal=causal,
                             policy=Policy.hardware(cfg))
    same_bits(np.asarray(gold).reshape(-1), sim_all)


def test_conformance_ci_flash_attention_batch2_seq32(capsys):
    """ci_flash_attention_m64b16b2s32: batch 2, sequence 32 < MLEN (64), 4 query heads of HLEN
    on one kv head, BLEN 16. Per batch one op from the case's inputs (the keys past 32 are the
    op's padding, masked to -inf); the case compares head 0 (the first 16 lanes) of the 2 x 32
    output rows, stored batch after batch."""
    path = CONFORMANCE / "ci_flash_attention_m64b16b2s32"
    if not (path / "inputs").is_dir():
        pytest.skip("../shared/conformance is absent")
    from plena.verify.conformance import bf16_match, load_case

    case = load_case(path)
    cfg = load_config(case.settings_toml)
    mlen, hlen = cfg.mlen, cfg.hlen
    B, S = 2, 32
    ins = {n: np.load(path / "inputs" / f"{n}.npy") for n in "QKV"}
    q = ins["Q"].reshape(B, S, mlen)
    k, v = ins["K"].reshape(B, -1, mlen)[:, :S], ins["V"].reshape(B, -1, mlen)[:, :S]
    pre = np.asarray(case.manifest["fp_sram_preload"], np.float32)
    assert np.float32(pre[1]) * 0.25 == np.float32(1 / np.sqrt(hlen))  # the scale we use (M_BTMM x 0.25)
    b = ProgramBuilder(cfg)
    state = b.fpsram("attn_state", np.zeros(F.fp_state_words(cfg)))
    outs, golds = [], []
    for i in range(B):
        qt = b.hbm_input(f"Q{i}", q[i], pad_rows=cfg.hbm_v_prefetch_amount)
        kt = b.hbm_input(f"K{i}", k[i], use="kv", pad_rows=cfg.hbm_m_prefetch_amount)
        vt = b.hbm_input(f"V{i}", v[i], use="kv", pad_rows=cfg.hbm_m_prefetch_amount)
        outs.append(F.flash_attention(b, qt, kt, vt, num_heads=mlen // hlen, num_kv_heads=1, fp_state=state,
                                      name=f"attn{i}"))
        golds.append(G.flash_attention(bf16(qt.decoded), k[i], v[i], cfg=cfg, num_heads=mlen // hlen,
                                       num_kv_heads=1, policy=Policy.hardware(cfg)))
    prog = b.build()
    res = prog.run()
    sim_all = np.concatenate([o.read(prog, res) for o in outs]).reshape(-1)  # (B*S, MLEN) rows
    idx = np.fromfile(path / "check_vram_index.u32.bin", np.uint32).astype(np.int64)
    expected = np.fromfile(path / "check_expected.f32.bin", np.float32)
    sim = sim_all[idx - case.comparison["region_elements"][0]]
    cmp = case.comparison
    ok = bf16_match(expected, sim, cmp["atol"], cmp["rtol"])
    strict = bf16_match(expected, sim, 0.02, 0.02)
    up_pct, strict_pct = 100 * ok.mean(), 100 * strict.mean()
    with capsys.disabled():
        print(f"\n  ci_flash_attention_m64b16b2s32: upstream rule {up_pct:.2f}% (need "
              f"{cmp['min_match_rate_percent']}%), strict {strict_pct:.2f}%, max abs "
              f"{np.abs(expected - sim).max():.4g}, nonzero {np.mean(sim != 0):.2f}", end="")
    assert up_pct >= cmp["min_match_rate_percent"]
    assert strict_pct >= 99.0 and np.abs(sim).max() > 0  # the case's rule alone passes all-zero output
    same_bits(np.concatenate([np.asarray(g) for g in golds]).reshape(-1), sim_all)
