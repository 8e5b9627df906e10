"""Machine state (a pytree) and the static geometry it is allocated with.

Memories are sized to what the program can touch (:mod:`plena.emu_jax.plan`), never to the
configured 16 GiB HBM / 512 MiB VRAM. Each memory carries one spare slot past its window
(a VRAM row, an MRAM tile, a padding tail of HBM): instructions that write nothing direct
their single write there, so every step does exactly one fixed-size write per memory and no
whole-buffer copy is needed. Reads of the spare slot are masked to zero.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from plena.config import PlenaConfig

FP_REGS = 8
GP_REGS = 16
SRAM_WORDS = 1024
TOPK_MAX = 8  # the widest V_TOPK policy writes 8 entries


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shapes of one emulated machine (a jit static argument)."""

    cfg: PlenaConfig
    vram_rows: int  # emulated VRAM window in rows (<= cfg.vector_sram_size)
    hbm_bytes: int  # emulated HBM window in bytes (<= capacity)
    loop_depth: int  # loop stack slots
    prog_len: int  # padded program length

    @property
    def hbm_pad(self) -> int:
        """Spare bytes after the window: room for the widest read window / redirected write."""
        c = self.cfg
        return 2 * (max(c.mlen, c.vlen) * 4 + 64)

    @property
    def mram_tiles(self) -> int:
        return self.cfg.mram_tiles


class MachineState(NamedTuple):
    pc: jnp.ndarray  # i32
    sub: jnp.ndarray  # i32 micro-step within a multi-row instruction
    gp: jnp.ndarray  # u32[16]
    fp: jnp.ndarray  # u16[8] bf16 bits
    a_hi: jnp.ndarray  # u32[16] high words of the 64-bit HBM address registers
    a_lo: jnp.ndarray  # u32[16]
    scale: jnp.ndarray  # u32
    stride: jnp.ndarray  # u32 (1 at reset)
    vmask: jnp.ndarray  # u32
    loop_pc: jnp.ndarray  # i32[D]
    loop_reg: jnp.ndarray  # i32[D]
    loop_cnt: jnp.ndarray  # i32[D] instructions in the current iteration
    loop_sp: jnp.ndarray  # i32
    fpsram: jnp.ndarray  # u16[1024] bf16 bits
    intsram: jnp.ndarray  # u32[1024]
    vram: jnp.ndarray  # u16[rows + 1, VLEN] bf16 bits
    mram: jnp.ndarray  # f32[tiles + 1, MLEN, MLEN]
    hbm: jnp.ndarray  # u8[window + pad]
    m_acc: jnp.ndarray  # f32[BLEN, BLEN]
    v_acc: jnp.ndarray  # f32[BLEN]
    hm_acc: jnp.ndarray  # f32[BA, MLEN, MLEN]
    hv_acc: jnp.ndarray  # f32[BA, MLEN]
    counts: jnp.ndarray  # i32[64] executed instructions per opcode
    skipped: jnp.ndarray  # i32[64] fp-destination ops skipped because rd = 0 (0 cycles)
    topk_experts: jnp.ndarray  # i32 sum of E over executed V_TOPK (cycle model)
    hbm_rd_blocks: jnp.ndarray  # u32 64-byte blocks read
    hbm_wr_blocks: jnp.ndarray  # u32 64-byte blocks written
    hbm_cap_hi: jnp.ndarray  # u32 HBM capacity (HBM_SIZE or --hbm-size), high word
    hbm_cap_lo: jnp.ndarray  # u32 low word: writes past the capacity panic
    steps: jnp.ndarray  # i32 dynamic instructions executed
    err: jnp.ndarray  # i32 error code (0 = running / ok)
    err_pc: jnp.ndarray  # i32


def init_state(geo: Geometry, *, hbm_capacity: int, hbm: np.ndarray | None = None, fpsram: np.ndarray | None = None,
               intsram: np.ndarray | None = None, vram: np.ndarray | None = None) -> MachineState:
    """Reset state with optional preloads (already in machine formats: u8 HBM bytes,
    u16 bf16 FP SRAM, u32 INT SRAM, u16 bf16 VRAM elements from element 0)."""
    c = geo.cfg
    d = max(geo.loop_depth, 1)
    hbm_arr = np.zeros(geo.hbm_bytes + geo.hbm_pad, np.uint8)
    if hbm is not None and len(hbm):
        hbm_arr[: len(hbm)] = hbm
    fps = np.zeros(SRAM_WORDS, np.uint16)
    if fpsram is not None:
        fps[: len(fpsram)] = fpsram
    ints = np.zeros(SRAM_WORDS, np.uint32)
    if intsram is not None:
        ints[: len(intsram)] = intsram
    vr = np.zeros(((geo.vram_rows + 1) * c.vlen,), np.uint16)
    if vram is not None and len(vram):
        n = min(len(vram), geo.vram_rows * c.vlen)
        vr[:n] = vram[:n]
    z32 = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    return MachineState(
        pc=jnp.int32(0), sub=jnp.int32(0),
        gp=jnp.zeros(16, jnp.uint32), fp=jnp.zeros(FP_REGS, jnp.uint16),
        a_hi=jnp.zeros(16, jnp.uint32), a_lo=jnp.zeros(16, jnp.uint32),
        scale=jnp.uint32(0), stride=jnp.uint32(1), vmask=jnp.uint32(0),
        loop_pc=jnp.zeros(d, jnp.int32), loop_reg=jnp.full(d, -1, jnp.int32),
        loop_cnt=jnp.zeros(d, jnp.int32), loop_sp=jnp.int32(0),
        fpsram=jnp.asarray(fps), intsram=jnp.asarray(ints),
        vram=jnp.asarray(vr.reshape(geo.vram_rows + 1, c.vlen)),
        mram=z32(geo.mram_tiles + 1, c.mlen, c.mlen),
        hbm=jnp.asarray(hbm_arr),
        m_acc=z32(c.blen, c.blen), v_acc=z32(c.blen),
        hm_acc=z32(c.broadcast_amount, c.mlen, c.mlen), hv_acc=z32(c.broadcast_amount, c.mlen),
        counts=jnp.zeros(64, jnp.int32), skipped=jnp.zeros(64, jnp.int32),
        topk_experts=jnp.int32(0),
        hbm_rd_blocks=jnp.uint32(0), hbm_wr_blocks=jnp.uint32(0),
        hbm_cap_hi=jnp.uint32(hbm_capacity >> 32), hbm_cap_lo=jnp.uint32(hbm_capacity & 0xFFFFFFFF),
        steps=jnp.int32(0), err=jnp.int32(0), err_pc=jnp.int32(-1),
    )
