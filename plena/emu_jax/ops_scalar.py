"""Scalar integer, scalar floating-point and control instructions (spec §4.3, §4.4, §4.6).

Each function maps (geometry, state, fields) to an :class:`Effect`. fp-destination ops with
rd = 0 never reach these functions: the dispatcher routes them to a no-op (spec §2.1).
"""

from __future__ import annotations

import jax.numpy as jnp

from plena.emu_jax.effects import Effect, no_effect
from plena.emu_jax.errors import Err
from plena.emu_jax.memory import (to_fp_bits, U32, err_if, first_err, fp_read, sram_index, to_vram_bits,
                                  vram_row, write_target)
from plena.numerics import ieee, unary
from plena.numerics.containers import bits_to_f32


# ------------------------------------------------------------------ scalar integer
def _gp_write(st, e: Effect, rd, value) -> Effect:
    return e._replace(gp=e.gp.at[rd].set(value.astype(U32)))


def s_add_int(geo, st, f):
    return _gp_write(st, no_effect(geo, st), f.rd, st.gp[f.rs1] + st.gp[f.rs2])


def s_sub_int(geo, st, f):
    return _gp_write(st, no_effect(geo, st), f.rd, st.gp[f.rs1] - st.gp[f.rs2])


def s_mul_int(geo, st, f):
    return _gp_write(st, no_effect(geo, st), f.rd, st.gp[f.rs1] * st.gp[f.rs2])


def s_addi_int(geo, st, f):
    return _gp_write(st, no_effect(geo, st), f.rd, st.gp[f.rs1] + f.imm18.astype(U32))


def s_lui_int(geo, st, f):
    return _gp_write(st, no_effect(geo, st), f.rd, f.imm22.astype(U32) << U32(12))


def s_ld_int(geo, st, f):
    idx, err = sram_index(st.gp[f.rs1] + f.imm18.astype(U32), Err.INTSRAM_RANGE)
    e = _gp_write(st, no_effect(geo, st), f.rd, st.intsram[jnp.minimum(idx, 1023)])
    return e._replace(err=err)


def s_st_int(geo, st, f):
    idx, err = sram_index(st.gp[f.rs1] + f.imm18.astype(U32), Err.INTSRAM_RANGE)
    e = no_effect(geo, st)
    return e._replace(ints_idx=jnp.asarray(e.ints_idx).at[0].set(idx),
                      ints_val=jnp.asarray(e.ints_val).at[0].set(st.gp[f.rd]), err=err)


# ------------------------------------------------------------------ scalar floating point
def _fp_write(geo, st, f, value_f32, *errs) -> Effect:
    e = no_effect(geo, st)
    bad_rd = err_if(f.rd >= st.fp.shape[0], Err.FP_REG)
    rd = jnp.minimum(f.rd, st.fp.shape[0] - 1)
    return e._replace(fp=e.fp.at[rd].set(to_fp_bits(value_f32, geo)), err=first_err(*errs, bad_rd))


def _binary_fp(op):
    def run(geo, st, f):
        a, ea = fp_read(st, f.rs1)
        b, eb = fp_read(st, f.rs2)
        return _fp_write(geo, st, f, op(a, b), ea, eb)
    return run


def _half_max(a, b):
    """half::bf16::max: b if a is NaN or b > a, else a."""
    return jnp.where(jnp.isnan(a) | ieee.greater(b, a), b, a)


s_add_fp = _binary_fp(ieee.add)
s_sub_fp = _binary_fp(ieee.sub)
s_mul_fp = _binary_fp(ieee.mul)
s_max_fp = _binary_fp(_half_max)


def _unary_fp(name):
    def run(geo, st, f):
        bad = err_if(f.rs1 >= st.fp.shape[0], Err.FP_REG)
        bits = st.fp[jnp.minimum(f.rs1, st.fp.shape[0] - 1)]
        return _fp_write(geo, st, f, unary.apply_bits(name, bits), bad)
    return run


s_exp_fp = _unary_fp("exp")
s_reci_fp = _unary_fp("reci")
s_sqrt_fp = _unary_fp("sqrt")


def s_ld_fp(geo, st, f):
    idx, err = sram_index(st.gp[f.rs1] + f.imm18.astype(U32), Err.FPSRAM_RANGE)
    e = no_effect(geo, st)
    rd = jnp.minimum(f.rd, st.fp.shape[0] - 1)
    return e._replace(fp=e.fp.at[rd].set(st.fpsram[jnp.minimum(idx, 1023)]),
                      err=first_err(err_if(f.rd >= st.fp.shape[0], Err.FP_REG), err))


def s_st_fp(geo, st, f):
    idx, err = sram_index(st.gp[f.rs1] + f.imm18.astype(U32), Err.FPSRAM_RANGE)
    bad = err_if(f.rd >= st.fp.shape[0], Err.FP_REG)
    e = no_effect(geo, st)
    val = st.fp[jnp.minimum(f.rd, st.fp.shape[0] - 1)]
    return e._replace(fps_idx=jnp.asarray(e.fps_idx).at[0].set(idx), fps_val=jnp.asarray(e.fps_val).at[0].set(val),
                      err=first_err(bad, err))


def s_map_v_fp(geo, st, f):
    """VRAM[gp[rd]] = FP_SRAM[gp[rs1]+imm18 : +VLEN] (bf16 -> f32 -> bf16 is exact)."""
    vlen = geo.cfg.vlen
    base = st.gp[f.rs1] + f.imm18.astype(U32)
    window = err_if((base > U32(1024 - vlen)) | (vlen > 1024), Err.FPSRAM_RANGE)
    start = jnp.minimum(base, U32(max(1024 - vlen, 0))).astype(jnp.int32)
    vals = jnp.take(st.fpsram, start + jnp.arange(vlen), mode="clip")
    row, e_row = vram_row(geo, st.gp[f.rd])
    target, e_win = write_target(geo, row)
    e = no_effect(geo, st)
    return e._replace(vram_row=target, vram_data=to_vram_bits(bits_to_f32(vals), geo),
                      err=first_err(window, e_row, e_win))


# ------------------------------------------------------------------ control
def c_set_addr_reg(geo, st, f):
    e = no_effect(geo, st)
    return e._replace(a_hi=e.a_hi.at[f.rd].set(st.gp[f.rs1]), a_lo=e.a_lo.at[f.rd].set(st.gp[f.rs2]))


def c_set_scale_reg(geo, st, f):
    return no_effect(geo, st)._replace(scale=st.gp[f.rd])


def c_set_stride_reg(geo, st, f):
    return no_effect(geo, st)._replace(stride=st.gp[f.rd])


def c_set_v_mask_reg(geo, st, f):
    return no_effect(geo, st)._replace(vmask=st.gp[f.rd])


def c_loop_start(geo, st, f):
    e = no_effect(geo, st)
    sp = st.loop_sp
    depth = st.loop_pc.shape[0]
    slot = jnp.minimum(sp, depth - 1)
    err = first_err(err_if(f.imm22 == 0, Err.LOOP_ZERO), err_if(sp >= depth, Err.LOOP_STACK))
    return e._replace(
        gp=e.gp.at[f.rd].set(f.imm22.astype(U32)),
        loop_pc=e.loop_pc.at[slot].set(st.pc), loop_reg=e.loop_reg.at[slot].set(f.rd),
        loop_cnt=e.loop_cnt.at[slot].set(0), loop_sp=sp + 1, err=err)


def c_loop_end(geo, st, f):
    e = no_effect(geo, st)
    depth = st.loop_pc.shape[0]
    slots = jnp.arange(depth)
    match = (slots < st.loop_sp) & (st.loop_reg == f.rd)
    found = jnp.any(match)
    idx = jnp.max(jnp.where(match, slots, -1))  # the most recent matching entry
    v = st.gp[f.rd]
    again = found & (v > U32(1))
    # leaving: remove entry idx, entries above it shift down one slot
    shifted = lambda arr, fill: jnp.where(slots >= idx, jnp.concatenate([arr[1:], jnp.array([fill], arr.dtype)]), arr)  # noqa: E731
    return e._replace(
        gp=e.gp.at[f.rd].set(jnp.where(again, v - U32(1), U32(0))),
        loop_cnt=jnp.where(again, st.loop_cnt.at[jnp.maximum(idx, 0)].set(0), shifted(st.loop_cnt, 0)),
        loop_pc=jnp.where(again, st.loop_pc, shifted(st.loop_pc, 0)),
        loop_reg=jnp.where(again, st.loop_reg, shifted(st.loop_reg, -1)),
        loop_sp=jnp.where(again, st.loop_sp, st.loop_sp - 1),
        next_pc=jnp.where(again, st.loop_pc[jnp.maximum(idx, 0)] + 1, st.pc + 1),
        err=err_if(~found, Err.LOOP_END_UNMATCHED))


def c_break(geo, st, f):
    e = no_effect(geo, st)
    top = jnp.maximum(st.loop_sp - 1, 0)
    reg = jnp.maximum(st.loop_reg[top], 0)
    none = st.loop_sp == 0
    return e._replace(
        gp=jnp.where(none, st.gp, st.gp.at[reg].set(U32(0))),
        loop_reg=st.loop_reg.at[top].set(jnp.where(none, st.loop_reg[top], -1)),
        loop_sp=jnp.maximum(st.loop_sp - 1, 0), err=err_if(none, Err.BREAK_NO_LOOP))


def invalid(geo, st, f):
    return no_effect(geo, st)._replace(err=jnp.int32(int(Err.INVALID_OPCODE)))


def skip(geo, st, f):
    """fp-destination op with rd = 0: a complete no-op taking no cycles (spec §2.1)."""
    return no_effect(geo, st)
