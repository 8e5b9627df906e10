"""Batched runs: one program, many input sets, identical to running each set alone."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from plena.emu_jax.api import run
from plena.emu_jax.batch import BatchDivergence, run_batch
from plena.isa import assemble
from plena.numerics.formats import MXFP8
from plena.numerics.mx import mx_encode_np

# y = exp(x) * sum(x) row by row, then stored back (uses HBM, VRAM, fp registers, loops)
SOURCE = """
S_ADDI_INT gp1, gp0, 256
C_SET_SCALE_REG gp1
C_SET_ADDR_REG a0, gp0, gp0
H_PREFETCH_V gp0, gp0, a0, 0, 0
S_ADDI_INT gp2, gp0, 0
C_LOOP_START gp3, 4
S_ADD_FP f1, f0, f0
V_RED_SUM f1, gp2
V_EXP_V gp2, gp2, 0
V_MUL_VF gp2, gp2, f1, 0
S_ADDI_INT gp2, gp2, 64
C_LOOP_END gp3
S_ADDI_INT gp4, gp0, 512
C_SET_ADDR_REG a1, gp0, gp4
H_STORE_V gp0, gp0, a1, 0, 0
"""


def _hbm(seed):
    x = np.random.default_rng(seed).standard_normal((4, 64)).astype(np.float32)
    e, s = mx_encode_np(x, MXFP8)
    hbm = np.zeros(1024, np.uint8)
    hbm[:256], hbm[256:288] = e.reshape(-1), s.reshape(-1)
    return hbm


@pytest.mark.parametrize("executor, options", [("interpreter", None), ("fast", dict(hot=1)),
                                               ("fast", dict(hot=10**9))])  # all compiled / all one-instruction steps
def test_batch_equals_sequential_runs(executor, options):
    words = assemble(SOURCE)
    hbms = [_hbm(i) for i in range(4)]
    batch = run_batch(words, hbm=hbms, hbm_size=4096, executor=executor, fast_options=options)
    assert batch.size == 4
    for i, h in enumerate(hbms):
        single = run(words, hbm=h, hbm_size=4096)
        got = batch.dumps(i, with_hbm=True)
        want = single.dumps(with_hbm=True)
        np.testing.assert_array_equal(got.vram, want.vram)
        np.testing.assert_array_equal(got.fpsram, want.fpsram)
        np.testing.assert_array_equal(got.hbm[:1024], want.hbm[:1024])
        assert batch.instructions == single.instructions and batch.cycles == single.cycles
    # the input sets really differ, so equality above is not vacuous
    assert not np.array_equal(batch.dumps(0).vram, batch.dumps(1).vram)


LOAD = "\n".join(SOURCE.strip().splitlines()[:4])  # 4 rows of HBM into VRAM rows 0-3
INDEPENDENT = """
S_ADDI_INT gp1, gp0, 0
S_ADDI_INT gp2, gp0, 256
C_LOOP_START gp3, 4
V_EXP_V gp2, gp1, 0
S_ADDI_INT gp1, gp1, 64
S_ADDI_INT gp2, gp2, 64
C_LOOP_END gp3
"""
RUNNING_SUM = """
S_ADDI_INT gp1, gp0, 0
C_LOOP_START gp3, 3
S_ADDI_INT gp4, gp1, 64
V_ADD_VV gp4, gp1, gp4, 0
S_ADDI_INT gp1, gp1, 64
C_LOOP_END gp3
"""


@pytest.mark.parametrize("body,prepared", [(INDEPENDENT, [True]), (RUNNING_SUM, [True, False])])
def test_batch_runs_loops_as_lanes_and_redoes_a_conflict(body, prepared, monkeypatch):
    """Batched blocks run independent loops as lanes; a loop whose iterations depend on each
    other (row k + 1 += row k) is redone without lanes (its conflict check reads only the
    shared addresses, so the conflict is the whole batch's), and every set equals its
    sequential run."""
    from plena.emu_jax import fast

    lanes, real = [], fast.prepare
    monkeypatch.setattr(fast, "prepare", lambda *a, **k: lanes.append(k.get("lanes", True)) or real(*a, **k))
    words = assemble(LOAD + body)
    hbms = [_hbm(10 + i) for i in range(3)]
    batch = run_batch(words, hbm=hbms, hbm_size=4096, executor="fast", fast_options=dict(hot=1))
    assert lanes == prepared
    for i, h in enumerate(hbms):
        want = run(words, hbm=h, hbm_size=4096, executor="interpreter").dumps()
        np.testing.assert_array_equal(batch.dumps(i).vram, want.vram)
    assert not np.array_equal(batch.dumps(0).vram, batch.dumps(1).vram)


def test_batch_rejects_data_dependent_control():
    words = assemble("V_TOPK gp1, gp2, gp3, 0\nS_LD_INT gp4, gp3, 0\n")
    with pytest.raises(BatchDivergence, match="V_TOPK"):
        run_batch(words, hbm=[np.zeros(64, np.uint8)] * 2, hbm_size=4096)
    with pytest.raises(BatchDivergence, match="intsram"):
        _differing_intsram()


def _differing_intsram():
    # INT SRAM is control state: input sets may not differ there
    from plena.emu_jax import batch as b
    from plena.emu_jax.api import geometry_for, load_program
    from plena.emu_jax.plan import plan_program
    from plena.emu_jax.state import init_state
    from plena.config import default_config
    cfg = default_config()
    prog = load_program(assemble("S_ADDI_INT gp1, gp0, 1"))
    geo = geometry_for(prog, cfg, plan_program(prog, cfg), hbm_len=0, vram_len=0, hbm_capacity=4096)
    states = [init_state(geo, hbm_capacity=4096, intsram=np.array([i], np.uint32)) for i in range(2)]
    b._stack_states(states)


def test_batch_sharded_over_host_devices(tmp_path):
    script = textwrap.dedent(f"""
        import numpy as np, jax
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_emu_batch import SOURCE, _hbm
        from plena.emu_jax.batch import run_batch
        from plena.emu_jax.api import run
        from plena.isa import assemble
        assert len(jax.devices()) == 4, jax.devices()
        words = assemble(SOURCE)
        hbms = [_hbm(i) for i in range(8)]
        b = run_batch(words, hbm=hbms, hbm_size=4096, devices=jax.devices(), executor="fast",
                      fast_options=dict(hot=1))
        assert len(b.state.vram.sharding.device_set) == 4
        for i in (0, 5):
            np.testing.assert_array_equal(b.dumps(i).vram, run(words, hbm=hbms[i], hbm_size=4096).dumps().vram)
        print("sharded-ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert "sharded-ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("executor", ["interpreter", "fast"])
def test_batch_of_head_products_equals_sequential_runs(executor):
    """M_BTMM over a batch: per set a product of BA heads ([BA, MLEN, HLEN]) with one matrix,
    with both operands differing between the sets (VRAM rows and the MX tile from HBM)."""
    from asm_helpers import li, prog

    words = prog([li(1, 64 * 64), "C_SET_SCALE_REG gp1", "H_PREFETCH_M gp0, gp0, a0, 0, 0",
                  "M_BTMM 0, gp0, gp0", li(6, 100 * 64), "M_BMM_WO gp6, 0"])
    rng = np.random.default_rng(7)
    hbms, vrams = [], []
    for _ in range(3):
        hbm = np.zeros(8192, np.uint8)
        hbm[:4096] = rng.integers(0, 0x70, 4096)  # e4m3 codes, finite
        hbm[4096:4608] = rng.integers(120, 130, 512)  # E8M0 scales near 1
        hbms.append(hbm)
        vrams.append(rng.standard_normal(64 * 64).astype(np.float32))
    batch = run_batch(words, hbm=hbms, vram=vrams, hbm_size=1 << 16, executor=executor)
    for i in range(3):
        single = run(words, hbm=hbms[i], vram=vrams[i], hbm_size=1 << 16)
        np.testing.assert_array_equal(batch.dumps(i).vram, single.dumps().vram)
    assert not np.array_equal(batch.dumps(0).vram, batch.dumps(1).vram)
