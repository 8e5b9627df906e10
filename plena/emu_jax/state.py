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

import jax
import jax.numpy as jnp
import numpy as np

from plena.config import PlenaConfig
from plena.numerics.bf16 import bf16_bits_to_f32_np, f32_bits_np, f32_to_bf16_bits_np
from plena.numerics.containers import container_dtype

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

    @property
    def vram_container(self):
        """dtype of the VRAM container: uint16 bf16 bits, or uint32 f32 bits when
        VECTOR_SRAM_TYPE is not a subset of bf16 (:mod:`plena.numerics.containers`)."""
        return vram_container(self.cfg)

    @property
    def fp_container(self):
        """dtype of the fp registers and the FP SRAM (SCALAR_FP): uint16 or uint32."""
        return fp_container(self.cfg)


def vram_container(cfg: PlenaConfig):
    """numpy dtype of VRAM rows for a config (static: chosen from VECTOR_SRAM_TYPE)."""
    return container_dtype(cfg.precision.vector_sram_type.data)


def fp_container(cfg: PlenaConfig):
    """numpy dtype of the fp registers / FP SRAM for a config (static: from SCALAR_FP)."""
    return container_dtype(cfg.precision.scalar_fp)


def to_container_np(bits, dtype, data_type=None) -> np.ndarray:
    """Preload bits (uint16 bf16 bits, or uint32 f32 bits) converted to a container dtype:
    bf16 -> f32 is exact; f32 -> bf16 uses the VRAM cast (RNE). With ``data_type`` a wide
    container's values are rounded to that type (VRAM holds only values of its type)."""
    from plena.numerics import codec
    bits = np.asarray(bits).reshape(-1)
    if np.dtype(dtype) == np.uint16:
        return bits.astype(np.uint16) if bits.dtype != np.uint32 else \
            f32_to_bf16_bits_np(bits.view(np.float32)).astype(np.uint16)
    vals = bf16_bits_to_f32_np(bits) if bits.dtype != np.uint32 else bits.view(np.float32)
    if data_type is not None:
        vals = codec.round_to_np(vals, data_type)
    return f32_bits_np(vals).astype(np.uint32)


class MachineState(NamedTuple):
    pc: jnp.ndarray  # i32
    sub: jnp.ndarray  # i32 micro-step within a multi-row instruction
    gp: jnp.ndarray  # u32[16]
    fp: jnp.ndarray  # u16[8] bf16 bits (u32 f32 bits for a wide SCALAR_FP)
    a_hi: jnp.ndarray  # u32[16] high words of the 64-bit HBM address registers
    a_lo: jnp.ndarray  # u32[16]
    scale: jnp.ndarray  # u32
    stride: jnp.ndarray  # u32 (1 at reset)
    vmask: jnp.ndarray  # u32
    loop_pc: jnp.ndarray  # i32[D]
    loop_reg: jnp.ndarray  # i32[D]
    loop_cnt: jnp.ndarray  # i32[D] instructions in the current iteration
    loop_sp: jnp.ndarray  # i32
    fpsram: jnp.ndarray  # u16[1024] bf16 bits (u32 f32 bits for a wide SCALAR_FP)
    intsram: jnp.ndarray  # u32[1024]
    vram: jnp.ndarray  # u16[rows + 1, VLEN] bf16 bits (u32 f32 bits: wide VECTOR_SRAM_TYPE)
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
    u16 bf16 FP SRAM, u32 INT SRAM, u16 bf16 VRAM elements from element 0). FP SRAM and VRAM
    preloads may also be u32 f32 bits; both are converted to the containers the config
    chooses (:func:`to_container_np`; a wide VRAM rounds its preload to VECTOR_SRAM_TYPE)."""
    c = geo.cfg
    d = max(geo.loop_depth, 1)
    hbm_arr = np.zeros(geo.hbm_bytes + geo.hbm_pad, np.uint8)
    if hbm is not None and len(hbm):
        hbm_arr[: len(hbm)] = hbm
    vdt, fdt = geo.vram_container, geo.fp_container
    fps = np.zeros(SRAM_WORDS, fdt)
    if fpsram is not None:
        fps[: len(fpsram)] = to_container_np(fpsram, fdt)
    ints = np.zeros(SRAM_WORDS, np.uint32)
    if intsram is not None:
        ints[: len(intsram)] = intsram
    vr = np.zeros(((geo.vram_rows + 1) * c.vlen,), vdt)
    if vram is not None and len(vram):
        n = min(len(vram), geo.vram_rows * c.vlen)
        vr[:n] = to_container_np(np.asarray(vram)[:n], vdt, c.precision.vector_sram_type.data)
    # every field made on the host and transferred with device_put: jnp.zeros, jnp.asarray and
    # jnp.int32 each compile a small XLA program per shape and dtype (~0.55 s of a cold run's
    # load on a slow 2-core machine)
    put = lambda value, dtype: jax.device_put(np.asarray(value, dtype))  # noqa: E731
    zeros = lambda shape, dtype: put(np.zeros(shape, dtype), dtype)  # noqa: E731
    z32 = lambda *s: zeros(s, np.float32)  # noqa: E731
    return MachineState(
        pc=put(0, np.int32), sub=put(0, np.int32),
        gp=zeros(16, np.uint32), fp=zeros(FP_REGS, fdt),
        a_hi=zeros(16, np.uint32), a_lo=zeros(16, np.uint32),
        scale=put(0, np.uint32), stride=put(1, np.uint32), vmask=put(0, np.uint32),
        loop_pc=zeros(d, np.int32), loop_reg=put(np.full(d, -1), np.int32),
        loop_cnt=zeros(d, np.int32), loop_sp=put(0, np.int32),
        fpsram=put(fps, fdt), intsram=put(ints, np.uint32),
        vram=put(vr.reshape(geo.vram_rows + 1, c.vlen), vdt),
        mram=z32(geo.mram_tiles + 1, c.mlen, c.mlen),
        hbm=put(hbm_arr, np.uint8),
        m_acc=z32(c.blen, c.blen), v_acc=z32(c.blen),
        hm_acc=z32(c.broadcast_amount, c.mlen, c.mlen), hv_acc=z32(c.broadcast_amount, c.mlen),
        counts=zeros(64, np.int32), skipped=zeros(64, np.int32),
        topk_experts=put(0, np.int32),
        hbm_rd_blocks=put(0, np.uint32), hbm_wr_blocks=put(0, np.uint32),
        hbm_cap_hi=put(hbm_capacity >> 32, np.uint32), hbm_cap_lo=put(hbm_capacity & 0xFFFFFFFF, np.uint32),
        steps=put(0, np.int32), err=put(0, np.int32), err_pc=put(-1, np.int32),
    )
