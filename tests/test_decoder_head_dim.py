"""Decoders whose head_dim is neither MLEN nor HLEN (plena.frontend.model + plena.golden.llama)
on the small machine (MLEN = VLEN = 16, HLEN 4, BLEN 4), one layer, seq 32:

* head_dim = 2*MLEN = 32 (Llama-2/3-like: a head spans two column blocks; RoPE's rotate-half is
  one K-chunked product over the head, attention's K-chunked QK^T), GQA 2 / 1 heads;
* head_dim = 2*HLEN = 8 (two heads per column block: RoPE per block with tiled tables,
  attention's lane-selection path), GQA 4 / 2 heads.

Each: the hardware-policy golden equals the emulator bit for bit at every named stage, and the
fp32-policy golden is the float64 Llama forward pass of tests/test_model.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from plena.config import default_config
from plena.frontend import BuildError
from plena.frontend.model import compile_decoder, random_params
from plena.golden import Policy
from plena.golden.llama import decoder
from plena.verify.stages import compare_run, read_stages

from test_model import llama64

CFG = default_config().replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=4, hbm_m_prefetch_amount_raw=16,
                               hbm_v_prefetch_amount=4, hbm_v_writeback_amount=4)
SEQ = 32
SHAPES = {"d2mlen": dict(hidden=32, heads=2, kv_heads=1, head_dim=32, intermediate=32),
          "d2hlen": dict(hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=32)}
STAGE_KINDS = ("attn_norm", "q", "k", "v", "attn", "o_proj", "resid1", "ffn_norm", "ffn", "resid2")


@functools.lru_cache(maxsize=None)
def params(shape: str):
    return random_params(layers=1, seed=4, **SHAPES[shape])


@functools.lru_cache(maxsize=None)
def emulated(shape: str):
    prog, meta = compile_decoder(params(shape), CFG, seq=SEQ, seed=6)
    res = prog.run(vram=meta["vram_preload"])
    return prog, meta, res, read_stages(prog, res, meta["intermediates"])


def golden(shape: str, mode: str) -> dict:
    policy = Policy.hardware(CFG) if mode == "hw" else Policy.fp32(CFG)
    _, inter = decoder(params(shape), emulated(shape)[1]["x"], CFG, seq=SEQ, policy=policy)
    return {k: np.asarray(v) for k, v in inter.items()}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_hardware_golden_bit_exact_at_every_stage(shape, capsys):
    prog, meta, res, emu = emulated(shape)
    hw = compare_run(prog, res, meta["intermediates"], golden(shape, "hw"), emulated=emu,
                     reference_label="hardware golden")
    assert hw.names == ["x"] + [f"L0.{k}" for k in STAGE_KINDS] + ["final_norm"]
    assert hw.exact and hw.bit_exact_pct == 100.0 and hw.first_divergence is None, hw.render_text()
    out = emu["final_norm"]
    assert np.all(np.isfinite(out)) and np.std(out) > 0.1
    assert np.std(emu["L0.attn"]) > 0.05  # attention produced a real output
    # the fp32 golden is the Llama forward pass (RoPE convention, head mapping, causal mask)
    g32 = golden(shape, "fp32")
    ref = llama64(params(shape), meta["x"], 1, SEQ)
    np.testing.assert_allclose(g32["final_norm"], ref, rtol=2e-3, atol=2e-3)
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    with capsys.disabled():
        print(f"\n  head_dim {SHAPES[shape]['head_dim']}: emulator vs float64 Llama rel L2 {rel:.4g}", end="")
    assert rel < 0.15


def test_unsupported_head_dim_is_a_build_error():
    # 12 = 3*HLEN neither divides MLEN = 16 nor is a multiple of it: RoPE would straddle blocks
    p = random_params(hidden=32, heads=4, kv_heads=4, head_dim=12, intermediate=32, layers=1)
    with pytest.raises(BuildError, match="head_dim 12"):
        compile_decoder(p, CFG, seq=SEQ)
