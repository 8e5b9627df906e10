"""The reference interpreter: one ``lax.while_loop`` whose body dispatches the current
instruction with ``lax.switch`` and applies its :class:`Effect`.

Design (see docs/emulator.md): branches return only small state and fixed-size write slots;
the step then does exactly one ``dynamic_update_slice`` per memory (writes that change
nothing go to the memory's spare slot), so no large buffer is copied per step. An error
code stops the loop at the faulting instruction with its effects discarded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from plena.emu_jax import dispatch
from plena.emu_jax.effects import Fields
from plena.emu_jax.errors import Err
from plena.emu_jax.operands import Recorder, Replayer, fetch
from plena.emu_jax.state import Geometry, MachineState


def _with(st, proxy):
    return st._replace(vram=proxy, mram=proxy, hbm=proxy)


def _recording(geo, fn):
    def branch(small, f):
        rec = Recorder(geo)
        fn(geo, _with(small, rec), f)
        return rec.requests()
    return branch


def _replaying(geo, fn):
    def branch(small, f, fetched):
        return fn(geo, _with(small, Replayer(geo, fetched)), f)
    return branch


def _split(branches) -> tuple[tuple, tuple, np.ndarray]:
    """``branches`` as two dispatch tables: ``plain``, the opcodes that do not touch the
    batched-head accumulators (the others made invalid), and ``heads``, those that do, with
    ``heads_index`` mapping a branch number to 1 + its place there (0: not there)."""
    invalid = dispatch.BRANCHES[dispatch.INVALID]
    order = sorted(dispatch.HEAD_ACC_BRANCHES)
    plain = tuple(invalid if i in dispatch.HEAD_ACC_BRANCHES else fn for i, fn in enumerate(branches))
    heads = tuple(branches[i] for i in order)
    heads_index = np.zeros(len(branches), np.int32)
    heads_index[order] = np.arange(1, len(order) + 1)
    return plain, heads, heads_index


def effect_of(geo: Geometry, prog: Fields, st: MachineState, branches=None):
    """Dispatch the current micro-step: (fields, state with loop counts bumped, over_budget,
    skip, Effect). Nothing is written yet, except that the Effect's batched-head accumulators
    (``hm_acc``, ``hv_acc``) are final: already the old values when the step fails."""
    cfg = geo.cfg
    f = Fields(*(col[st.pc] for col in prog))
    op = f.opcode
    first = st.sub == 0
    active = jnp.arange(st.loop_cnt.shape[0]) < st.loop_sp
    cnt = jnp.where(first & active, st.loop_cnt + 1, st.loop_cnt)
    over_budget = first & jnp.any(active & (cnt > cfg.max_loop_instructions))
    st1 = st._replace(loop_cnt=cnt)

    skip = jnp.asarray(dispatch.FP_DEST)[op] & (f.rd == 0)
    branch = jnp.where(skip, dispatch.SKIP, jnp.asarray(dispatch.BRANCH_OF)[op])
    branches = dispatch.BRANCHES if branches is None else branches
    plain, heads, heads_index = _split(branches)
    uses_heads = any(fn is not dispatch.BRANCHES[dispatch.INVALID] for fn in heads)
    # record -> fetch -> replay (operands.py): no branch ever takes a large memory as operand.
    # The batched-head accumulators (BA x MLEN x MLEN) are large too: only the branches of the
    # opcodes that use them see them, behind a lax.cond that passes them through otherwise
    # (a pass-through in a switch branch costs a whole copy per step).
    small = st1._replace(vram=None, mram=None, hbm=None)
    blank = small._replace(hm_acc=jnp.zeros((0,), jnp.float32), hv_acc=jnp.zeros((0,), jnp.float32))
    zeros = small._replace(hm_acc=jnp.zeros_like(st.hm_acc), hv_acc=jnp.zeros_like(st.hv_acc))
    requests = lax.switch(branch, [_recording(geo, fn) for fn in branches], zeros, f)
    fetched = fetch(geo, st1, requests)

    def plain_step(hm, hv):
        eff = lax.switch(branch, [_replaying(geo, fn) for fn in plain], blank, f, fetched)
        return eff._replace(hm_acc=hm, hv_acc=hv)

    def heads_step(hm, hv):
        eff = lax.switch(jnp.asarray(heads_index)[branch] - 1, [_replaying(geo, fn) for fn in heads],
                         small._replace(hm_acc=hm, hv_acc=hv), f, fetched)
        ok = (eff.err == 0) & ~over_budget
        return eff._replace(hm_acc=jnp.where(ok, eff.hm_acc, hm), hv_acc=jnp.where(ok, eff.hv_acc, hv))

    if not uses_heads:
        eff = plain_step(st1.hm_acc, st1.hv_acc)
    else:
        eff = lax.cond(jnp.asarray(heads_index)[branch] > 0, heads_step, plain_step, st1.hm_acc, st1.hv_acc)
    return f, st1, over_budget, skip, eff


def step(geo: Geometry, prog: Fields, st: MachineState, branches=None) -> MachineState:
    return apply_effect(geo, st, *effect_of(geo, prog, st, branches))


def apply_effect(geo: Geometry, st: MachineState, f: Fields, st1: MachineState, over_budget, skip,
                 eff) -> MachineState:
    """Commit a dispatched micro-step: one write per memory, registers, counters, pc."""
    cfg = geo.cfg
    op = f.opcode
    first = st.sub == 0
    cnt = st1.loop_cnt
    err = jnp.where(over_budget, jnp.int32(int(Err.LOOP_BUDGET)), eff.err)
    ok = err == 0
    nsub = jnp.where(skip, 1, jnp.asarray(dispatch.micro_steps(cfg))[op])
    last = st.sub + 1 >= nsub
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731

    vram = lax.dynamic_update_slice(st.vram, eff.vram_data[None], (keep(eff.vram_row, geo.vram_rows), 0))
    mram = lax.dynamic_update_slice(st.mram, eff.mram_data[None, None],
                                    (keep(eff.mram_tile, geo.mram_tiles), eff.mram_row, 0))
    hbm = lax.dynamic_update_slice(st.hbm, eff.hbm_e_data, (keep(eff.hbm_e_idx, geo.hbm_bytes),))
    hbm = lax.dynamic_update_slice(hbm, eff.hbm_s_data, (keep(eff.hbm_s_idx, geo.hbm_bytes + cfg.vlen + 64),))
    fpsram = st.fpsram.at[keep(eff.fps_idx, 1024)].set(eff.fps_val, mode="drop")
    intsram = st.intsram.at[keep(eff.ints_idx, 1024)].set(eff.ints_val, mode="drop")
    executed = first.astype(jnp.int32)
    return MachineState(
        pc=jnp.where(ok & last, eff.next_pc, st.pc),
        sub=jnp.where(ok & ~last, st.sub + 1, 0),
        gp=keep(eff.gp, st.gp), fp=keep(eff.fp, st.fp), a_hi=keep(eff.a_hi, st.a_hi),
        a_lo=keep(eff.a_lo, st.a_lo), scale=keep(eff.scale, st.scale), stride=keep(eff.stride, st.stride),
        vmask=keep(eff.vmask, st.vmask), loop_pc=keep(eff.loop_pc, st.loop_pc),
        loop_reg=keep(eff.loop_reg, st.loop_reg), loop_cnt=keep(eff.loop_cnt, cnt),
        loop_sp=keep(eff.loop_sp, st.loop_sp), fpsram=fpsram, intsram=intsram, vram=vram, mram=mram,
        hbm=hbm, m_acc=keep(eff.m_acc, st.m_acc), v_acc=keep(eff.v_acc, st.v_acc),
        hm_acc=eff.hm_acc, hv_acc=eff.hv_acc,  # already kept by effect_of
        counts=st.counts.at[op].add(executed * (~skip)),
        skipped=st.skipped.at[op].add(executed * skip),
        topk_experts=st.topk_experts + jnp.where(ok, eff.topk_e, 0),
        hbm_rd_blocks=st.hbm_rd_blocks + jnp.where(ok, eff.hbm_rd, 0).astype(jnp.uint32),
        hbm_wr_blocks=st.hbm_wr_blocks + jnp.where(ok, eff.hbm_wr, 0).astype(jnp.uint32),
        hbm_cap_hi=st.hbm_cap_hi, hbm_cap_lo=st.hbm_cap_lo,
        steps=st.steps + executed,
        err=err, err_pc=jnp.where(ok, st.err_pc, st.pc),
    )


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("branches",), donate_argnums=(2,))
def run_program(geo: Geometry, prog: Fields, st: MachineState, n_instr, max_steps, branches=None) -> MachineState:
    """Run from st until the pc leaves the program, an error occurs, or max_steps instructions.
    ``branches``: a :func:`plena.emu_jax.dispatch.branches_for` subset (None: all opcodes)."""

    def cond(s):
        return (s.pc < n_instr) & (s.err == 0) & ((s.steps < max_steps) | (s.sub != 0))

    return lax.while_loop(cond, functools.partial(step, geo, prog, branches=branches), st)
