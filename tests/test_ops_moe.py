"""Routed mixture of experts (plena.frontend.ops_moe + plena.golden.ops_moe).

(a) Bit-exactness: one program per machine config holds a routed MoE layer (router linear,
    V_TOPK per token, expert numbers read back with S_LD_INT into gp registers that address the
    selected experts' weights in HBM, expert FFNs, weighted combine), a second V_TOPK pass over
    its logits, a whole-matrix expert and a fixed-routing combine. Every output, the top-k
    expert numbers (INT SRAM) and weights (FP SRAM) must equal the hardware golden bit for bit.
    Configs: the default machine (MLEN 64, BLEN 4, policy 0: the 32 logits fit one VRAM row) and
    a small one (MLEN 16: the logits span 2 rows (policy 0) or 8 rows (policy 1, 128 experts,
    top 8) and are copied into consecutive rows for V_TOPK).
(b) fp32 golden close to a float64 numpy MoE; golden top-k = the spec's ranking rule (ties,
    signed zeros, NaN, inf).
(c) jax.grad through the fp32 golden equals the gradient of a plain jnp MoE with the same
    selection (gradients flow through the selected experts' weights and the routing weights).
(d) Build-time errors.
(e) Conformance: the moe_* cases compiled from their inputs with our ops pass their upstream
    rule (exact match, >= 90 %) against the cases' goldens; skipped without ../shared.
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
from plena.frontend import ops_basic as FB
from plena.frontend import ops_moe as F
from plena.golden import Policy
from plena.golden import ops_basic as GB
from plena.golden import ops_moe as G

from conftest import CONFORMANCE, judge_case_output

CFG = default_config()
SMALL = CFG.replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=4,
                    hbm_m_prefetch_amount_raw=16, hbm_v_prefetch_amount=4, hbm_v_writeback_amount=4)
CONFIGS = {"default": CFG, "small": SMALL}
F32 = Policy.fp32()

# name -> (config, policy id, tokens, activation)
MOES = {"default": [("p0", 0, 5, "swiglu_oai")],
        "small": [("p0", 0, 5, "silu"), ("p1", 1, 2, "gelu")]}


def rand(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def same_bits(golden, emulated):
    g, e = np.asarray(golden, np.float32), np.asarray(emulated, np.float32)
    assert g.shape == e.shape
    bad = np.nonzero(g.view(np.uint32) != e.view(np.uint32))
    assert bad[0].size == 0, (f"{bad[0].size} of {g.size} differ, first at {tuple(int(i[0]) for i in bad)}: "
                              f"golden {g[tuple(i[0] for i in bad)]}, emulator {e[tuple(i[0] for i in bad)]}")


def moe_params(rng, cfg, policy_id, T):
    E, _ = G.TOPK_POLICIES[policy_id]
    D = F_ = cfg.mlen
    epad = -(-E // cfg.mlen) * cfg.mlen
    return dict(x=rand(rng, (T, D), 1.5), wr=rand(rng, (D, epad), 3 / np.sqrt(D)),
                wg=rand(rng, (E, D, F_), 2 / np.sqrt(D)), wu=rand(rng, (E, D, F_), 2 / np.sqrt(D)),
                wd=rand(rng, (E, F_, D), 1 / np.sqrt(F_)))


@functools.lru_cache(maxsize=None)
def moe_run(cfg_name: str):
    cfg = CONFIGS[cfg_name]
    rng = np.random.default_rng(21)
    b = ProgramBuilder(cfg)
    burst, P = cfg.hbm_v_prefetch_amount, cfg.hbm_m_prefetch_amount
    act = lambda n, a: b.hbm_input(n, a, pad_rows=burst)  # noqa: E731
    ops, params = {}, {}
    for key, pid, T, kind in MOES[cfg_name]:
        p = moe_params(rng, cfg, pid, T)
        params[key] = p
        res = F.routed_moe(b, act(f"{key}.x_in", p["x"]), b.hbm_input(f"{key}.wr", p["wr"], use="weight", pad_rows=P),
                           F.expert_weights(b, f"{key}.wg", p["wg"]), F.expert_weights(b, f"{key}.wu", p["wu"]),
                           F.expert_weights(b, f"{key}.wd", p["wd"]), policy_id=pid, act=kind, name=key)
        ops[key] = (res, F.topk(b, res.logits, policy_id=pid, name=f"{key}.again"))
    # a whole-matrix expert on 6 rows and a fixed-routing combine of it with the first MoE output
    D = cfg.mlen
    e = dict(x=rand(rng, (6, D), 1.5), wg=rand(rng, (D, 2 * D), 2 / np.sqrt(D)), wu=rand(rng, (D, 2 * D), 2 / np.sqrt(D)),
             wd=rand(rng, (2 * D, D), 1 / np.sqrt(2 * D)), r0=rand(rng, (6, D)), r1=rand(rng, (6, D)))
    wt = {k: b.hbm_input(f"ex.{k}", e[k], use="weight", pad_rows=P) for k in ("wg", "wu", "wd")}
    xe = FB.as_vram(b, act("ex.x_in", e["x"]), "ex.xv")
    first = MOES[cfg_name][0][3]
    kinds = (first, "swiglu_oai" if first != "swiglu_oai" else "gelu")
    y = F.moe_expert(b, xe, wt["wg"], wt["wu"], wt["wd"], act=kinds[0], name="ex")
    y2 = F.moe_expert(b, xe, wt["wg"], wt["wu"], wt["wd"], act=kinds[1], name="ex2")
    r0, r1 = FB.as_vram(b, act("r0", e["r0"]), "r0v"), FB.as_vram(b, act("r1", e["r1"]), "r1v")
    comb = F.combine(b, [y, y2], [r0, r1], out=FB.vram_matrix(b, "comb", 6, D), name="comb")
    prog = b.build()
    res_ = prog.run()
    assert res_.instructions == prog.dynamic_instructions

    hw = Policy.hardware(cfg)
    out = {}
    intsram = np.asarray(res_.state.intsram)
    for key, pid, T, kind in MOES[cfg_name]:
        p = params[key]
        r, (fs2, is2) = ops[key]
        K = r.k
        emu = dict(out=r.out.read(prog, res_), logits=r.logits.read(prog, res_),
                   idx=intsram[int(r.indices): int(r.indices) + T * K].reshape(T, K),
                   w=prog.read_fpsram(res_, r.weights).reshape(T, K),
                   idx2=intsram[int(is2): int(is2) + T * K].reshape(T, K),
                   w2=prog.read_fpsram(res_, fs2).reshape(T, K))
        g_out, g_idx, g_w = G.routed_moe(GB.from_hbm(p["x"], hw), p["wr"], p["wg"], p["wu"], p["wd"], cfg=cfg,
                                         act=kind, policy_id=pid, policy=hw)
        gold = dict(out=np.asarray(g_out), idx=np.asarray(g_idx), w=np.asarray(g_w),
                    logits=np.asarray(GB.linear(GB.from_hbm(p["x"], hw), p["wr"], cfg=cfg, policy=hw)))
        out[key] = (emu, gold, pid, kind)
    xv = GB.from_hbm(e["x"], hw)
    gy = [G.expert_ffn(xv, e["wg"], e["wu"], e["wd"], cfg=cfg, act=k, policy=hw) for k in kinds]
    gcomb = G.combine(gy, [GB.from_hbm(e["r0"], hw), GB.from_hbm(e["r1"], hw)], policy=hw)
    out["expert"] = (y.read(prog, res_), np.asarray(gy[0]))
    # combine scales the outputs k > 0 in place (as the upstream moe_combine program does)
    out["expert2"] = (y2.read(prog, res_), np.asarray(G.combine([gy[1]], [GB.from_hbm(e["r1"], hw)], policy=hw)))
    out["combine"] = (comb.read(prog, res_), np.asarray(gcomb))
    return out


CASES = [(c, k) for c, lst in MOES.items() for k, *_ in lst]


# =============================================================================================
# (a) bit-exact
# =============================================================================================

@pytest.mark.parametrize("cfg_name,key", CASES)
def test_routed_moe_emulator_equals_hardware_golden(cfg_name, key):
    emu, gold, pid, _ = moe_run(cfg_name)[key]
    same_bits(gold["logits"], emu["logits"])
    np.testing.assert_array_equal(emu["idx"], gold["idx"])  # S_LD_INT-addressed experts = golden's
    same_bits(gold["w"], emu["w"])
    same_bits(gold["out"], emu["out"])
    # the standalone top-k over the same logits agrees
    np.testing.assert_array_equal(emu["idx2"], emu["idx"])
    same_bits(emu["w2"], emu["w"])
    assert np.isfinite(emu["out"]).all() and np.abs(emu["out"]).max() > 0


@pytest.mark.parametrize("cfg_name,key", CASES)
def test_routed_moe_topk_is_the_ranking(cfg_name, key):
    """The expert numbers are the K largest of the E logits the machine holds; the weights are
    their softmax (bf16) and sum to ~1; the tokens do not all pick the same experts."""
    emu, _, pid, _ = moe_run(cfg_name)[key]
    E, K = G.TOPK_POLICIES[pid]
    lg = emu["logits"][:, :E].astype(np.float64)
    for t in range(lg.shape[0]):
        order = sorted(range(E), key=lambda i: (-lg[t, i], i))[:K]
        assert list(emu["idx"][t]) == order
        v = lg[t, order]
        ref = np.exp(v - v[0]) / np.exp(v - v[0]).sum()
        np.testing.assert_allclose(emu["w"][t], ref, atol=4e-3)
    assert len({tuple(r) for r in emu["idx"]}) > 1


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("op", ["expert", "expert2", "combine"])
def test_expert_and_combine_bits(cfg_name, op):
    emu, gold = moe_run(cfg_name)[op]
    same_bits(gold, emu)
    assert np.abs(emu).max() > 0


# =============================================================================================
# (b) fp32 golden vs float64, top-k semantics
# =============================================================================================

def np_act(kind, g, u):
    if kind == "swiglu_oai":
        g = np.minimum(g, 7.0)
        u = np.clip(u, -7.0, 7.0)
        return (u + 1) * g / (1 + np.exp(-1.702 * g))
    a = 1.0 if kind == "silu" else 1.702
    return g / (1 + np.exp(-a * g)) * u


def np_moe(p, kind, pid):
    E, K = G.TOPK_POLICIES[pid]
    x, wr, wg, wu, wd = (np.asarray(p[k], np.float64) for k in ("x", "wr", "wg", "wu", "wd"))
    lg = x @ wr
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        sel = sorted(range(E), key=lambda i: (-lg[t, i], i))[:K]
        w = np.exp(lg[t, sel] - lg[t, sel[0]])
        w /= w.sum()
        for k, e in enumerate(sel):
            out[t] += w[k] * (np_act(kind, x[t] @ wg[e], x[t] @ wu[e]) @ wd[e])
    return out


@pytest.mark.parametrize("kind,pid", [("swiglu_oai", 0), ("silu", 1)])
def test_fp32_golden_close_to_float64(kind, pid):
    p = moe_params(np.random.default_rng(5), SMALL, pid, 3)
    got, _, w = G.routed_moe(p["x"], p["wr"], p["wg"], p["wu"], p["wd"], cfg=SMALL, act=kind, policy_id=pid,
                             policy=F32)
    np.testing.assert_allclose(np.asarray(got), np_moe(p, kind, pid), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
    hw, _, _ = G.routed_moe(p["x"], p["wr"], p["wg"], p["wu"], p["wd"], cfg=SMALL, act=kind, policy_id=pid,
                            policy=Policy.hardware(SMALL))
    assert not np.array_equal(np.asarray(hw), np.asarray(got))


def np_topk(row, E, K):
    """Spec §4.2 V_TOPK on one f32 row, in float64 where exact."""
    v = np.where(np.isnan(row[:E]), -np.inf, row[:E]).astype(np.float32)
    bits = v.view(np.uint32).astype(np.int64)
    key = np.where(bits >> 31 == 1, -(bits & 0x7FFFFFFF), bits)  # totalOrder as signed ints
    order = sorted(range(E), key=lambda i: (-key[i], i))[:K]
    sel = v[order].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.exp(sel - sel[0])
        den = w.sum()
    w = w / den if np.isfinite(den) and den > 0 else np.zeros(K)
    return np.array(order), w


def test_golden_topk_follows_the_spec_rule():
    rng = np.random.default_rng(9)
    rows = [bf16(rand(rng, 32, 2.0)) for _ in range(4)]
    r = np.zeros(32, np.float32)
    r[[3, 7, 9]] = [4.0, 4.0, 2.0]  # a tie: lower index first
    rows.append(r)
    r = np.full(32, -1.0, np.float32)
    r[5], r[2] = -0.0, 0.0  # +0 ranks above -0
    rows.append(r)
    r = bf16(rand(rng, 32))
    r[[1, 4]] = np.nan  # NaN reads as -inf
    rows.append(r)
    r = bf16(rand(rng, 32))
    r[6] = np.inf  # den = NaN: all weights 0
    rows.append(r)
    x = np.stack(rows)
    idx, w = G.topk(x, policy_id=0, policy=F32)
    idx_h, w_h = G.topk(x, policy_id=0, policy=Policy.hardware(CFG))
    np.testing.assert_array_equal(idx, idx_h)
    for t, row in enumerate(rows):
        ref_i, ref_w = np_topk(row, 32, 4)
        np.testing.assert_array_equal(np.asarray(idx[t]), ref_i)
        np.testing.assert_allclose(np.asarray(w[t]), ref_w, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(w_h[t]), bf16(np.asarray(w[t])))
    assert list(np.asarray(idx[4][:3])) == [3, 7, 9] and int(idx[5][0]) == 2
    assert not np.isin([1, 4], np.asarray(idx[6])).any() and not np.asarray(w[7]).any()
    big = rand(rng, (2, 128))
    i8, w8 = G.topk(big, policy_id=1, policy=F32)
    assert i8.shape == (2, 8)
    np.testing.assert_array_equal(np.asarray(i8), np.argsort(-big, axis=-1, kind="stable")[:, :8])


# =============================================================================================
# (c) gradients
# =============================================================================================

def _jnp_act(kind, g, u):
    if kind == "swiglu_oai":
        g = jnp.minimum(g, 7.0)
        u = jnp.clip(u, -7.0, 7.0)
        return (u + 1) * g * jax.nn.sigmoid(1.702 * g)
    return g * jax.nn.sigmoid((1.0 if kind == "silu" else 1.702) * g) * u


@pytest.mark.parametrize("kind", ["swiglu_oai", "silu"])
def test_grad_fp32_matches_plain_jnp(kind):
    p = {k: jnp.asarray(v) for k, v in moe_params(np.random.default_rng(6), SMALL, 0, 3).items()}
    cot = jnp.asarray(rand(np.random.default_rng(7), p["x"].shape))
    _, idx, _ = G.routed_moe(*(p[k] for k in ("x", "wr", "wg", "wu", "wd")), cfg=SMALL, act=kind, policy=F32)

    def golden(x, wr, wg, wu, wd):
        return jnp.sum(cot * G.routed_moe(x, wr, wg, wu, wd, cfg=SMALL, act=kind, policy=F32)[0])

    def plain(x, wr, wg, wu, wd):
        v = jnp.take_along_axis((x @ wr)[:, :32], idx, axis=-1)
        w = jax.nn.softmax(v, axis=-1)
        y = 0.0
        for k in range(idx.shape[1]):
            e = idx[:, k]
            h = _jnp_act(kind, jnp.einsum("td,tdf->tf", x, wg[e]), jnp.einsum("td,tdf->tf", x, wu[e]))
            y = y + w[:, k:k + 1] * jnp.einsum("tf,tfd->td", h, wd[e])
        return jnp.sum(cot * y)

    args = tuple(p[k] for k in ("x", "wr", "wg", "wu", "wd"))
    with jax.default_matmul_precision("highest"):
        g1 = jax.grad(golden, argnums=range(5))(*args)
        g2 = jax.grad(plain, argnums=range(5))(*args)
    for a, c in zip(g1, g2):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(g1[1]).max()) > 0  # the router weights get a gradient through the weights
    assert int((jnp.abs(g1[2]).sum(axis=(1, 2)) > 0).sum()) <= 3 * 4  # only selected experts
    # directional finite difference in x (the selection is locally constant)
    v = jnp.asarray(rand(np.random.default_rng(8), p["x"].shape))
    t = 1e-3
    fd = (golden(args[0] + t * v, *args[1:]) - golden(args[0] - t * v, *args[1:])) / (2 * t)
    np.testing.assert_allclose(float(jnp.vdot(g1[0], v)), float(fd), rtol=2e-2, atol=2e-2)
    gh = jax.grad(lambda x: jnp.sum(cot * G.routed_moe(x, *args[1:], cfg=SMALL, act=kind,
                                                       policy=Policy.hardware(SMALL))[0]))(args[0])
    assert np.isfinite(np.asarray(gh)).all() and float(jnp.abs(gh).max()) > 0


# =============================================================================================
# (d) build errors
# =============================================================================================

def test_build_errors():
    b = ProgramBuilder(SMALL)
    D = 16
    x = b.hbm_input("x", np.zeros((4, D)), pad_rows=4)
    wr = b.hbm_input("wr", np.zeros((D, 32)), use="weight", pad_rows=16)
    wg = F.expert_weights(b, "wg", [np.zeros((D, D))] * 32)
    wd = F.expert_weights(b, "wd", [np.zeros((D, D))] * 32)
    with pytest.raises(BuildError, match="policy must be 0"):
        F.routed_moe(b, x, wr, wg, wg, wd, policy_id=2)
    with pytest.raises(BuildError, match=r"expected \(16, >= 128 experts\)"):
        F.routed_moe(b, x, wr, wg, wg, wd, policy_id=1)
    with pytest.raises(BuildError, match="must be stacked"):
        F.routed_moe(b, x, b.hbm_input("wr128", np.zeros((D, 128)), use="weight", pad_rows=16), wg, wg, wd,
                     policy_id=1)
    with pytest.raises(BuildError, match="activation 'relu'"):
        F.routed_moe(b, x, wr, wg, wg, wd, act="relu")
    with pytest.raises(BuildError, match="use='weight'"):
        F.routed_moe(b, x, x, wg, wg, wd)
    with pytest.raises(BuildError, match=r"w_down is"):
        F.routed_moe(b, x, wr, wg, wg, F.expert_weights(b, "wd2", [np.zeros((D, 2 * D))] * 32))
    with pytest.raises(BuildError, match="equal 2-D shapes"):
        F.expert_weights(b, "bad", [np.zeros((D, D)), np.zeros((D, 2 * D))])
    lv = FB.vram_matrix(b, "lv", 2, 16)
    with pytest.raises(BuildError, match="ranks 32"):
        F.topk(b, lv)
    with pytest.raises(BuildError, match="outside"):  # an index range past the stacked tensor
        with b.scoped(b.gp("e")) as e:
            b.load_tile_indexed(wg, e, 33, D, 0, 0, b.mram("m", 1))


# =============================================================================================
# (e) conformance
# =============================================================================================

MOE_CASES = ["moe_gate_up", "moe_clamp", "moe_activation", "moe_expert", "moe_combine"]


def _build_moe_case(name):
    from plena.verify.conformance import load_case

    case = load_case(CONFORMANCE / name)
    cfg = load_config(case.settings_toml)
    ins = {p.stem: np.load(p) for p in sorted((case.path / "inputs").glob("*.npy"))}
    b = ProgramBuilder(cfg)
    hw = Policy.hardware(cfg)
    P = cfg.hbm_m_prefetch_amount
    act = lambda n: b.hbm_input(n, ins[n], pad_rows=cfg.hbm_v_prefetch_amount)  # noqa: E731
    wt = lambda n: b.hbm_input(n, ins[n], use="weight", pad_rows=P)  # noqa: E731
    ld = lambda n: GB.from_hbm(ins[n], hw)  # noqa: E731
    x = FB.as_vram(b, act("X"), "X.v")
    if name == "moe_gate_up":
        out = FB.linear(b, x, wt("W_gate_up_e0"), name="gate_up")
        gold = GB.linear(ld("X"), ins["W_gate_up_e0"], cfg=cfg, policy=hw)
    elif name in ("moe_clamp", "moe_activation"):
        g = FB.linear(b, x, wt("W_gate_e0"), name="gate")
        u = FB.linear(b, x, wt("W_up_e0"), name="up")
        gg = GB.linear(ld("X"), ins["W_gate_e0"], cfg=cfg, policy=hw)
        gu = GB.linear(ld("X"), ins["W_up_e0"], cfg=cfg, policy=hw)
        if name == "moe_clamp":  # the case checks min(g, 7) + clamp(u, -7, 7) (V_ADD_VV into g)
            F.clamp(b, g, hi=7.0, name="clamp_g")
            F.clamp(b, u, lo=-7.0, hi=7.0, name="clamp_u")
            out = FB.residual_add(b, g, u, out=g)
            gold = GB.residual_add(G.clamp(gg, None, 7.0, hw), G.clamp(gu, -7.0, 7.0, hw), policy=hw)
        else:  # the case checks h = (clamp(u) + 1) * g * sigmoid(1.702 g)
            out = F.expert_activation(b, "swiglu_oai", g, u)
            gold = G.swiglu_oai(gg, gu, hw)
    elif name == "moe_expert":
        out = F.moe_expert(b, x, wt("W_gate_e0"), wt("W_up_e0"), wt("W_down_e0"))
        gold = G.expert_ffn(ld("X"), ins["W_gate_e0"], ins["W_up_e0"], ins["W_down_e0"], cfg=cfg, policy=hw)
    else:  # moe_combine: two experts, fixed routing weights given as activations
        ys = [F.moe_expert(b, x, wt(f"W{e}_gate"), wt(f"W{e}_up"), wt(f"W{e}_down"), name=f"e{e}") for e in (0, 1)]
        routes = [FB.as_vram(b, act(f"route{e}"), f"route{e}.v") for e in (0, 1)]
        out = F.combine(b, ys, routes)
        gy = [G.expert_ffn(ld("X"), ins[f"W{e}_gate"], ins[f"W{e}_up"], ins[f"W{e}_down"], cfg=cfg, policy=hw)
              for e in (0, 1)]
        gold = G.combine(gy, [ld("route0"), ld("route1")], policy=hw)
    pre = np.asarray(case.manifest["fp_sram_preload"], np.float32)
    if name != "moe_gate_up":  # our constants are the ones the case preloads (as f16)
        assert np.float16(7.0) in pre.astype(np.float16)
    if name in ("moe_activation", "moe_expert", "moe_combine"):
        assert np.float16(-G.OAI_ALPHA) in pre.astype(np.float16)
    return case, b.build(), out, np.asarray(gold)


@pytest.mark.parametrize("name", MOE_CASES)
def test_conformance_case_from_its_inputs(name, capsys):
    if not (CONFORMANCE / name / "inputs").is_dir():
        pytest.skip("../shared/conformance is absent")
    case, prog, out, gold = _build_moe_case(name)
    sim = out.read(prog, prog.run())
    judge_case_output(name, case, sim, capsys, rule_label="upstream rule (exact)")
    same_bits(gold, sim)


def test_conformance_moe_topk_from_its_vram_row(capsys):
    """moe_topk: V_TOPK over the case's preloaded logits row; the case checks the 4 weights
    (atol 0.003) and the 4 expert numbers (exact)."""
    path = CONFORMANCE / "moe_topk"
    if not path.is_dir():
        pytest.skip("../shared/conformance is absent")
    from plena.verify.conformance import load_case

    case = load_case(path)
    cfg = load_config(case.settings_toml)
    row = np.fromfile(path / "vram_preload.bin", "<u2")
    b = ProgramBuilder(cfg)
    lg = FB.vram_matrix(b, "logits", 1, cfg.vlen, pitch=1)
    fs, isl = F.topk(b, lg)
    prog = b.build()
    vram = np.zeros(lg.region.addr + cfg.vlen, np.uint16)
    vram[lg.region.addr:] = row[: cfg.vlen]
    res = prog.run(vram=vram)
    w = prog.read_fpsram(res, fs)
    idx = np.asarray(res.state.intsram)[int(isl): int(isl) + 4]
    want_w = np.fromfile(path / "check_fpsram_expected.f32.bin", np.float32)
    want_i = np.fromfile(path / "check_intsram_expected.u32.bin", np.uint32)
    with capsys.disabled():
        print(f"\n  moe_topk: indices {idx.tolist()} (want {want_i.tolist()}), weights {w.tolist()}", end="")
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(w, want_w, atol=0.003, rtol=0)
    logits = row[: cfg.vlen].view(ml_dtypes.bfloat16).astype(np.float32)[None]
    gi, gw = G.topk(logits, policy=Policy.hardware(cfg))
    np.testing.assert_array_equal(np.asarray(gi)[0], idx)
    same_bits(np.asarray(gw)[0], w)
