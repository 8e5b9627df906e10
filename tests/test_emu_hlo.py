"""Regression check on the compiled interpreter: no whole-buffer copy of VRAM, MRAM or HBM
inside the loop (each would cost time proportional to the emulated memory on every step)."""

import re

import jax.numpy as jnp
import numpy as np

from plena.config import default_config
from plena.emu_jax.api import geometry_for, load_program
from plena.emu_jax.effects import Fields
from plena.emu_jax.interpreter import run_program
from plena.emu_jax.plan import plan_program
from plena.emu_jax.state import init_state
from plena.isa import assemble


def compiled_loop_hlo(source: str):
    """(config, geometry, compiled HLO text) of the interpreter for a program."""
    cfg = default_config()
    prog = load_program(assemble(source))
    geo = geometry_for(prog, cfg, plan_program(prog, cfg), hbm_len=0, vram_len=0, hbm_capacity=1 << 20)
    st = init_state(geo, hbm_capacity=1 << 20)
    fields = Fields(*(jnp.asarray(np.pad(getattr(prog, n), (0, geo.prog_len - len(prog)))) for n in Fields._fields))
    return cfg, geo, run_program.lower(geo, fields, st, jnp.int32(len(prog)), jnp.int32(10)).compile().as_text()


def test_no_whole_memory_copies_in_compiled_loop():
    cfg, geo, hlo = compiled_loop_hlo("V_ADD_VV gp0, gp0, gp0, 0\nM_MM 0, gp0, gp0\n")
    shapes = {
        "vram": rf"u16\[{geo.vram_rows + 1},{cfg.vlen}\]",
        "mram": rf"f32\[{geo.mram_tiles + 1},{cfg.mlen},{cfg.mlen}\]",
        "hbm": rf"u8\[{geo.hbm_bytes + geo.hbm_pad}\]",
    }
    for name, shape in shapes.items():
        assert re.search(shape, hlo), f"{name} buffer not found in HLO: the check would be vacuous"
        copies = [ln for ln in hlo.splitlines() if re.search(rf"= {shape}\S* copy\(", ln)]
        assert not copies, f"whole-{name} copies in the compiled loop: {copies[:2]}"


def test_batched_head_accumulator_is_not_copied_per_branch():
    """hm_acc (BA x MLEN x MLEN f32) passes through the dispatch only behind a lax.cond taken
    by the opcodes that use it. Before, every switch branch returned it, and XLA copied it on
    every step (one copy per branch in the HLO, 50+). Left: the three head-accumulator
    opcodes that leave hm_acc unchanged (M_BMV, M_BTMV, M_BMV_WO) and run only for those."""
    cfg, _, hlo = compiled_loop_hlo("M_BTMM 0, gp0, gp0\nV_ADD_VV gp0, gp0, gp0, 0\n")
    shape = rf"f32\[{cfg.broadcast_amount},{cfg.mlen},{cfg.mlen}\]"
    assert re.search(shape, hlo), "hm_acc not found in HLO: the check would be vacuous"
    copies = [ln for ln in hlo.splitlines() if re.search(rf"= {shape}\S* copy\(", ln)]
    assert len(copies) <= 3, f"{len(copies)} hm_acc copies in the compiled loop: {copies[:2]}"
