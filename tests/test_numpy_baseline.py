"""The numpy baseline interpreter of ``benchmarks/numpy_interpreter.py`` (column (c) of
``benchmarks/executors.py``) computes what the emulator computes.

(a) On small conformance cases its final VRAM, MRAM, FP SRAM, INT SRAM and dynamic instruction
    count equal those of ``plena.emu_jax.api.run`` (the reference interpreter) bit for bit.
(b) A run stopped by ``max_steps`` and resumed ends in the same state as one uninterrupted run.
(c) A reference panic is raised at the reference's program counter (de_bmm, pc 270).
(d) Its numeric helpers agree with plena's: libtorch summation order, VRAM / register casts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import CONFORMANCE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from numpy_interpreter import (NumpyExecError, NumpyMachine, bf16_reg, bf16_round,  # noqa: E402
                               run_numpy, torch_sum)


def _case_inputs(name):
    from plena.config import load_config
    from plena.emu_jax import files
    from plena.isa import read_mem
    from plena.verify.conformance import load_case

    if not (CONFORMANCE / name / "program.mem").is_file():
        pytest.skip("../shared/conformance is absent")
    case = load_case(CONFORMANCE / name)
    kw = dict(hbm=files.read_bytes(case.hbm_bin), fpsram=files.load_fpsram(case.fp_sram_bin),
              intsram=files.load_intsram(case.int_sram_bin) if case.int_sram_bin else None,
              vram=files.load_vram(case.vram_preload) if case.vram_preload else None, hbm_size=case.hbm_size)
    return case, load_config(case.settings_toml), read_mem(case.program_mem), kw


def _padded_equal(a, b) -> int:
    """Number of differing elements of two flat arrays, the shorter one zero-padded."""
    n = max(len(a), len(b))
    pa, pb = np.zeros(n, a.dtype), np.zeros(n, b.dtype)
    pa[: len(a)], pb[: len(b)] = a, b
    return int(np.count_nonzero(pa != pb))


# aten_ffn needs one more emulator compile; benchmarks/executors.py compares it ("identical to a")
# de_dllm1 writes bf16 subnormals (MX decode at pc 9), which numpy keeps like the reference
@pytest.mark.parametrize("name", ["aten_linear", "aten_rms_norm", "aten_softmax", "de_dllm1",
                                  pytest.param("aten_ffn", marks=pytest.mark.slow)])
def test_same_state_as_emulator(name):
    from plena.emu_jax.api import run

    case, cfg, words, kw = _case_inputs(name)
    m, stats = run_numpy(words, cfg, **kw)
    ref = run(words, cfg, **kw)
    d = ref.dumps()
    assert stats.finished and stats.steps == ref.instructions == case.dynamic_instructions
    assert np.count_nonzero(m.vram_bits()) > 0
    assert _padded_equal(m.vram_bits(), d.vram) == 0
    assert _padded_equal(m.mram_bits(), d.mram) == 0
    assert np.array_equal(m.fpsram_bits(), d.fpsram)
    assert np.array_equal(m.intsram_words(), d.intsram)


def test_resumed_run_equals_one_run():
    _, cfg, words, kw = _case_inputs("aten_softmax")
    whole, st = run_numpy(words, cfg, **kw)
    part = NumpyMachine(cfg, **kw)
    first = part.run(words, max_steps=400)
    assert not first.finished and first.steps == 400 and part.pc < len(words)
    rest = part.run(words)
    assert rest.finished and rest.steps == st.steps
    assert np.array_equal(part.vram_bits(), whole.vram_bits())
    assert np.array_equal(part.fpsram_bits(), whole.fpsram_bits())


def test_time_limit_stops_the_run():
    _, cfg, words, kw = _case_inputs("aten_ffn")
    m = NumpyMachine(cfg, **kw)
    st = m.run(words, time_limit_s=0.0)
    assert not st.finished and st.steps < 1024


def test_panic_at_reference_pc():
    case, cfg, words, kw = _case_inputs("de_bmm")
    with pytest.raises(NumpyExecError) as info:
        run_numpy(words, cfg, **kw)
    assert info.value.pc == case.panic_pc == 270
    assert "M_MM matrix offset" in info.value.rule


@pytest.mark.parametrize("n", [4, 7, 16, 64, 100, 128, 640])
def test_torch_sum_order(n):
    from plena.numerics.reduce import torch_sum as jax_torch_sum

    rng = np.random.default_rng(n)
    # values over many binades, so that a different summation order would change the result
    x = (rng.standard_normal((8, n)) * np.exp2(rng.integers(-12, 12, (8, n)))).astype(np.float32)
    want = np.asarray(jax_torch_sum(x)).view(np.uint32)
    got = np.array([torch_sum(r) for r in x], np.float32).view(np.uint32)
    assert np.array_equal(got, want)
    naive = np.array([np.float32(sum(np.float64(v) for v in r)) for r in x], np.float32).view(np.uint32)
    assert n < 8 or not np.array_equal(naive, want)  # the order matters on these rows


@pytest.mark.parametrize("n", [7, 64, 640])
def test_torch_sum_keeps_subnormals(n):
    """Rows of subnormal and near-subnormal values (and rows mixing them with ordinary ones):
    plena's jitted sum equals numpy's IEEE f32 sum in the same order, bit for bit, although
    XLA:CPU flushes subnormals (plena scales each row by an exact power of two)."""
    from plena.numerics.reduce import torch_sum as jax_torch_sum

    rng = np.random.default_rng(n)
    x = np.concatenate([rng.standard_normal((100, n)) * 2.0 ** -134,
                        rng.standard_normal((100, n)) * np.exp2(rng.integers(-149, -90, (100, n))),
                        rng.standard_normal((100, n)) * np.exp2(rng.integers(-140, 20, (100, n)))]).astype(np.float32)
    want = np.array([torch_sum(r) for r in x], np.float32)
    got = np.asarray(jax.jit(jax_torch_sum)(x))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert ((np.abs(want) < 2.0 ** -126) & (want != 0)).sum() > 20  # subnormal results really occur


def test_casts_match_plena():
    from plena.numerics.bf16 import f32_to_bf16_bits_np, f32_to_bf16_bits_reg_np

    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    bits[:4] = [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00001]  # NaN payload cases
    x = bits.view(np.float32)
    got = (bf16_round(x).view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(got, f32_to_bf16_bits_np(x))
    reg = np.array([bf16_reg(v).view(np.uint32) >> 16 for v in x[:2000]], np.uint16)
    assert np.array_equal(reg, f32_to_bf16_bits_reg_np(x[:2000]))
