"""1-, 2- and 5-layer decoders on a small machine (MLEN = VLEN = 16): the hardware-policy golden
equals the emulator bit for bit at every named stage (plena.verify.stages), and the fp32
golden's drift from the machine (max abs, MAE, rel L2) is printed -- the error a user comparing
against an ideal float32 model would see. The same comparison at SmolLM2 shapes is
benchmarks/golden_drift.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from plena.config import default_config
from plena.frontend.model import compile_decoder, random_params
from plena.golden import Policy
from plena.golden.llama import decoder
from plena.verify.stages import compare_run, read_stages

CFG = default_config().replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=4, hbm_m_prefetch_amount_raw=16,
                               hbm_v_prefetch_amount=4, hbm_v_writeback_amount=4)
SEQ = 32
SHAPE = dict(hidden=32, heads=4, kv_heads=2, head_dim=16, intermediate=64)
PARAMS = random_params(layers=5, seed=1, **SHAPE)
STAGE_KINDS = ("attn_norm", "q", "k", "v", "attn", "o_proj", "resid1", "ffn_norm", "ffn", "resid2")


@functools.lru_cache(maxsize=None)
def emulated(layers: int):
    prog, meta = compile_decoder(PARAMS, CFG, seq=SEQ, layers=layers, seed=2)
    res = prog.run(vram=meta["vram_preload"])
    return prog, meta, res, read_stages(prog, res, meta["intermediates"])


@functools.lru_cache(maxsize=None)
def golden(layers: int, mode: str) -> dict:
    policy = Policy.hardware(CFG) if mode == "hw" else Policy.fp32(CFG)
    _, inter = decoder(PARAMS, emulated(layers)[1]["x"], CFG, seq=SEQ, layers=layers, policy=policy)
    return {k: np.asarray(v) for k, v in inter.items()}


# 5 layers: slow here; benchmarks/golden_drift.py checks 1/2/5 layers bit-exact at SmolLM2 shape
@pytest.mark.parametrize("layers", [1, 2, pytest.param(5, marks=pytest.mark.slow)])
def test_hardware_golden_bit_exact_at_every_stage(layers, capsys):
    prog, meta, res, emu = emulated(layers)
    hw = compare_run(prog, res, meta["intermediates"], golden(layers, "hw"), emulated=emu,
                     reference_label="hardware golden")
    assert hw.names == ["x"] + [f"L{i}.{k}" for i in range(layers) for k in STAGE_KINDS] + ["final_norm"]
    assert hw.exact and hw.bit_exact_pct == 100.0 and hw.first_divergence is None, hw.render_text()
    for s in hw:
        assert s.max_abs == 0.0 and s.rel_l2 == 0.0
    out = emu["final_norm"]
    assert np.all(np.isfinite(out)) and np.std(out) > 0.1  # a real output, not zeros

    f32 = compare_run(prog, res, meta["intermediates"], golden(layers, "fp32"), emulated=emu,
                      reference_label="fp32 golden")
    fin = f32["final_norm"]
    resid = [f32[f"L{i}.resid2"].rel_l2 for i in range(layers)]
    with capsys.disabled():
        print(f"\n  {layers} layer(s), fp32 golden vs emulator at the output: max abs {fin.max_abs:.4g}, "
              f"MAE {fin.mae:.4g}, rel L2 {fin.rel_l2:.4g}; residual stream rel L2 per layer "
              + " ".join(f"{e:.3g}" for e in resid), end="")
    for s in f32:
        assert np.isfinite([s.max_abs, s.mae, s.rel_l2]).all(), s
    assert 0 < fin.mae <= fin.max_abs and 0 < fin.rel_l2 < 0.2  # MXFP8 / bf16 numerics: a few % off
    assert f32["x"].rel_l2 > 0  # the MX round trip of the input is already a drift source


def test_planted_difference_in_a_real_run():
    """One element of one stage changed (one bf16 ulp) in the golden dict: found at that stage
    and element, every other stage still 100 %."""
    prog, meta, res, emu = emulated(2)
    gold = {k: v.copy() for k, v in golden(2, "hw").items()}
    stage, idx = "L1.attn", (19, 37)
    ulp = np.float32(abs(gold[stage][idx]) * 2.0 ** -7 or 2.0 ** -126)
    gold[stage][idx] += ulp
    r = compare_run(prog, res, meta["intermediates"], gold, emulated=emu)
    fd = r.first_divergence
    assert (fd.stage, fd.index) == (stage, idx)
    assert fd.actual == float(emu[stage][idx]) and fd.reference == float(gold[stage][idx])
    assert r[stage].same == r[stage].size - 1
    assert [s.name for s in r if not s.exact] == [stage]
