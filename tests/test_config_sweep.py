"""Every op of the library on every machine size (MLEN = VLEN in 16, 32, 64, 128, 256 with their
own BLEN / HLEN / BROADCAST_AMOUNT / prefetch and writeback amounts): one program per machine
holding linear, RMSNorm, LayerNorm, softmax, residual and embedding add, SiLU, GELU, gated
FFN, RoPE, causal GQA flash attention and a routed MoE (V_TOPK) runs on the emulator, and every
output must equal its hardware golden bit for bit (the MoE's top-k expert numbers and weights
too). The programs and goldens are built by ``benchmarks/config_sweep.py`` (which prints the
op x config table). MLEN 32, 128 and 256 are marked slow (MLEN 256 alone takes minutes on 2 cores);
the benchmark covers them."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import config_sweep as CS  # noqa: E402

MLENS = [16] + [pytest.param(m, marks=pytest.mark.slow) for m in (32, 64, 128, 256)]  # all: benchmarks/config_sweep.py


@functools.lru_cache(maxsize=None)
def run(mlen: int):
    return CS.sweep(CS.CONFIGS[mlen])


def test_configs_are_the_advertised_machines():
    for mlen, cfg in CS.CONFIGS.items():
        assert cfg.mlen == cfg.vlen == mlen and cfg.broadcast_amount * cfg.hlen == mlen
        assert cfg.hlen % cfg.blen == 0  # flash attention's P V columns per head
    assert len({(c.blen, c.hbm_v_prefetch_amount, c.hbm_v_writeback_amount) for c in CS.CONFIGS.values()}) >= 4


@pytest.mark.parametrize("mlen", MLENS)
def test_every_op_bit_exact(mlen):
    r = run(mlen)
    bad = {}
    for op, (emu, gold) in r["ops"].items():
        assert emu.shape == gold.shape, op
        pct = CS.bit_exact_pct(emu, gold)
        if pct != 100.0:
            bad[op] = pct
        assert np.isfinite(emu).all() and np.abs(emu).max() > 0, op
    assert not bad, f"MLEN {mlen}: bit-exact % below 100: {bad}"
    assert set(r["ops"]) == set(CS.OPS)
