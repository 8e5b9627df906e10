"""What one instruction (micro-step) changes: the :class:`Effect` record.

Every instruction function returns a full Effect. Small state (registers, loop stack, small
accumulators, the batched-head accumulator) is returned whole; each large memory gets exactly
one fixed-size write slot (VRAM row, MRAM row, HBM element and scale windows, up to 8
scalar-SRAM words) that the step function applies after the dispatch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from plena.emu_jax.state import SRAM_WORDS, TOPK_MAX, Geometry, MachineState

class Fields(NamedTuple):
    """The decoded fields of the current instruction (traced int32 scalars)."""

    opcode: jnp.ndarray
    rd: jnp.ndarray
    rs1: jnp.ndarray
    rs2: jnp.ndarray
    rs3: jnp.ndarray
    funct1: jnp.ndarray
    imm18: jnp.ndarray
    imm22: jnp.ndarray

    @classmethod
    def of_key(cls, key: tuple, imm18, imm22) -> "Fields":
        """Fields of a signature key ("I", opcode, rd, rs1, rs2, rs3, funct1) (constants) with
        run-time immediates (the fast executor's form, :mod:`plena.emu_jax.structure`)."""
        _, op, rd, rs1, rs2, rs3, funct1 = key
        i32 = np.int32
        return cls(opcode=i32(op), rd=i32(rd), rs1=i32(rs1), rs2=i32(rs2), rs3=i32(rs3), funct1=i32(funct1),
                   imm18=imm18, imm22=imm22)


class Effect(NamedTuple):
    gp: jnp.ndarray
    fp: jnp.ndarray
    a_hi: jnp.ndarray
    a_lo: jnp.ndarray
    scale: jnp.ndarray
    stride: jnp.ndarray
    vmask: jnp.ndarray
    loop_pc: jnp.ndarray
    loop_reg: jnp.ndarray
    loop_cnt: jnp.ndarray
    loop_sp: jnp.ndarray
    m_acc: jnp.ndarray
    v_acc: jnp.ndarray
    hv_acc: jnp.ndarray
    hm_acc: jnp.ndarray  # f32[BA, MLEN, MLEN]
    next_pc: jnp.ndarray
    vram_row: jnp.ndarray  # window row (the spare row = no write)
    vram_data: jnp.ndarray  # VRAM container [VLEN] (u16 bf16 bits; u32 f32 bits if wide)
    mram_tile: jnp.ndarray  # the spare tile = no write
    mram_row: jnp.ndarray
    mram_data: jnp.ndarray  # f32[MLEN]
    hbm_e_idx: jnp.ndarray  # HBM window index of the element write (spare tail = no write)
    hbm_e_data: jnp.ndarray  # u8[hbm_elem_slot(geo)] (VLEN for elements of <= 8 bits)
    hbm_s_idx: jnp.ndarray
    hbm_s_data: jnp.ndarray  # u8[VLEN // block]
    fps_idx: jnp.ndarray  # i32[8] (>= 1024 = no write)
    fps_val: jnp.ndarray  # fp container [8] (u16 bf16 bits; u32 f32 bits if SCALAR_FP is wide)
    ints_idx: jnp.ndarray
    ints_val: jnp.ndarray  # u32[8]
    hbm_rd: jnp.ndarray  # u32 blocks read by this step
    hbm_wr: jnp.ndarray  # u32 blocks written
    topk_e: jnp.ndarray  # i32 experts ranked (V_TOPK cycle model)
    err: jnp.ndarray  # i32


def hbm_scale_bytes(geo: Geometry) -> int:
    """Bytes of the H_STORE_V scale write slot: the most scale bytes one VLEN row of
    HBM_V_ACT_TYPE or HBM_V_KV_TYPE has (at least 1; Plain formats have none)."""
    p, vlen = geo.cfg.precision, geo.cfg.vlen
    return max([1] + [vlen // f.block * f.scale.width // 8 for f in (p.hbm_v_act_type, p.hbm_v_kv_type)
                      if hasattr(f, "block")])


def hbm_elem_slot(geo: Geometry) -> int:
    """Bytes of the H_STORE_V element write slot: one VLEN-element row of the widest HBM_V_*
    element type, at least VLEN (the default, 8-bit elements); at most 4*VLEN (32 bits)."""
    p, vlen = geo.cfg.precision, geo.cfg.vlen
    widths = [getattr(f, "elem", None) or f.data for f in (p.hbm_v_act_type, p.hbm_v_kv_type)]
    return max(vlen, max(vlen * w.width // 8 for w in widths))


@functools.lru_cache(maxsize=64)
def _no_writes(geo: Geometry) -> dict:
    """The Effect fields that say "no write", as numpy constants made once per geometry: they
    cost nothing to trace (a jnp.zeros is an operation in every instruction's trace) and are
    constants in XLA. (Not jax arrays: JAX passes captured jax arrays to a compiled function
    as extra arguments, which ahead-of-time compiled calls do not supply.)"""
    c = geo.cfg

    def const(x):
        x = np.asarray(x)
        x.setflags(write=False)
        return x

    no_sram = const(np.full((TOPK_MAX,), SRAM_WORDS, np.int32))
    return dict(
        vram_row=const(np.int32(geo.vram_rows)), vram_data=const(np.zeros(c.vlen, geo.vram_container)),
        mram_tile=const(np.int32(geo.mram_tiles)), mram_row=const(np.int32(0)),
        mram_data=const(np.zeros(c.mlen, np.float32)),
        hbm_e_idx=const(np.int32(geo.hbm_bytes)), hbm_e_data=const(np.zeros(hbm_elem_slot(geo), np.uint8)),
        hbm_s_idx=const(np.int32(geo.hbm_bytes + c.vlen + 64)),
        hbm_s_data=const(np.zeros(hbm_scale_bytes(geo), np.uint8)),
        fps_idx=no_sram, fps_val=const(np.zeros(TOPK_MAX, geo.fp_container)),
        ints_idx=no_sram, ints_val=const(np.zeros(TOPK_MAX, np.uint32)),
        hbm_rd=const(np.uint32(0)), hbm_wr=const(np.uint32(0)), topk_e=const(np.int32(0)), err=const(np.int32(0)),
    )


def no_effect(geo: Geometry, st: MachineState) -> Effect:
    """The effect of an instruction that changes nothing but the pc."""
    return Effect(
        gp=st.gp, fp=st.fp, a_hi=st.a_hi, a_lo=st.a_lo, scale=st.scale, stride=st.stride,
        vmask=st.vmask, loop_pc=st.loop_pc, loop_reg=st.loop_reg, loop_cnt=st.loop_cnt,
        loop_sp=st.loop_sp, m_acc=st.m_acc, v_acc=st.v_acc, hv_acc=st.hv_acc,
        hm_acc=st.hm_acc, next_pc=st.pc + 1, **_no_writes(geo))
