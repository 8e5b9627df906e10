"""Address arithmetic and checked memory access shared by the instruction functions.

All functions are pure and jit-friendly. Address checks return an error code (0 = fine)
instead of raising; the step function keeps the first error of an instruction.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from plena.emu_jax.errors import Err
from plena.emu_jax.state import SRAM_WORDS, Geometry, MachineState
from plena.numerics import codec
from plena.numerics.bf16 import f32_bits, f32_to_bf16_bits, f32_to_bf16_bits_reg
from plena.numerics.containers import bits_to_f32, is_bf16, is_wide

U32 = jnp.uint32
I32 = jnp.int32


def u32(x) -> jnp.ndarray:
    return jnp.asarray(x, dtype=U32) if not isinstance(x, jnp.ndarray) else x.astype(U32)


def _known(x) -> bool:
    """Whether ``x`` is known while tracing (a Python or numpy value, not a traced array)."""
    return isinstance(x, (bool, int, np.bool_, np.integer)) or (isinstance(x, np.ndarray) and x.ndim == 0)


def first_err(*codes) -> jnp.ndarray:
    """The first non-zero error code (instruction rules are checked in order). Codes known
    while tracing (:func:`err_if` on a field condition) add no operation."""
    out = np.int32(0)
    for code in reversed(codes):
        if _known(code):
            if int(code) != 0:
                out = np.int32(code)
            continue
        code = jnp.asarray(code, I32)
        out = jnp.where(code != 0, code, out)
    return out


def pick(cond, a, b):
    """``jnp.where(cond, a, b)`` for a condition on instruction fields. The fast executor's
    fields are numpy constants (:meth:`plena.emu_jax.effects.Fields.of_key`): the condition
    is then known while tracing and only the chosen value is built (``a`` and ``b`` may be
    callables, called only when chosen), so an instruction emits no code for the variant it
    is not. ``a`` and ``b`` must have the result's shape and dtype."""
    if _known(cond):
        chosen = a if cond else b
        return chosen() if callable(chosen) else chosen
    a, b = (x() if callable(x) else x for x in (a, b))
    return jnp.where(cond, a, b)


def err_if(cond, code: Err) -> jnp.ndarray:
    """``code`` where ``cond`` holds, else 0 (a numpy constant when ``cond`` is known while
    tracing, as conditions on the fast executor's instruction fields are)."""
    if _known(cond):
        return np.int32(int(code) if cond else 0)
    return jnp.where(cond, jnp.int32(int(code)), jnp.int32(0))


# ---------------------------------------------------------------- 64-bit HBM addresses
def add64(hi, lo, x):
    """(hi:lo) + x for u32 words; x is a u32 (or u32-castable) value."""
    x = u32(x)
    nlo = lo + x
    return hi + (nlo < lo).astype(U32), nlo


def ge64(hi, lo, chi, clo):
    """(hi:lo) >= (chi:clo), all u32 words."""
    return (hi > chi) | ((hi == chi) & (lo >= clo))


def past_end64(hi, lo, n: int, cap_hi, cap_lo):
    """Whether n bytes from (hi:lo) reach past a capacity (cap_hi:cap_lo) >= n."""
    lim_hi, lim_lo = add64(cap_hi, cap_lo, U32((1 << 32) - n))  # cap - n, as cap + (2^32 - n) - 2^32
    return ge64(hi, lo, lim_hi - U32(1), lim_lo) & ~((hi == lim_hi - U32(1)) & (lo == lim_lo))


def hbm_index(geo: Geometry, hi, lo):
    """Index into the HBM window, and whether the address lies inside it."""
    inside = (hi == 0) & (lo < U32(geo.hbm_bytes))
    return jnp.where(inside, lo, U32(geo.hbm_bytes)).astype(I32), inside


def hbm_read(geo: Geometry, hbm, hi, lo, n: int):
    """n bytes at (hi:lo); bytes outside the window read as zero. ``hbm`` is the byte array
    or, inside the dispatch, an operand proxy (:mod:`plena.emu_jax.operands`)."""
    if hasattr(hbm, "hbm_bytes"):
        return hbm.hbm_bytes(hi, lo, n)
    return hbm_read_direct(geo, hbm, hi, lo, n)


def hbm_read_direct(geo: Geometry, hbm, hi, lo, n: int):
    idx, inside = hbm_index(geo, hi, lo)
    window = lax.dynamic_slice(hbm, (idx,), (n,))
    room = jnp.where(inside, U32(geo.hbm_bytes) - lo, U32(0))
    valid = jnp.arange(n, dtype=U32) < room
    return jnp.where(valid, window, jnp.uint8(0))


def blocks_touched(lo, n: int):
    """64-byte blocks covered by n bytes starting at an address whose low word is lo."""
    return ((lo % U32(64)) + U32(n - 1)) // U32(64) + U32(1)


# ---------------------------------------------------------------- VRAM
def vram_row(geo: Geometry, addr):
    """Row index for a VRAM element address, with the alignment/range rule checked."""
    vlen = geo.cfg.vlen
    addr = u32(addr)
    row = addr // U32(vlen)
    err = first_err(err_if(addr % U32(vlen) != 0, Err.VRAM_ALIGN),
                    err_if(row >= U32(geo.cfg.vector_sram_size), Err.VRAM_RANGE))
    return row, err


def read_rows_bits(geo: Geometry, vram, row, n: int = 1):
    """n consecutive rows from row (u32) as container bits [n, VLEN] (u16 bf16 bits, or u32 f32
    bits for a wide VECTOR_SRAM_TYPE); rows outside the window read 0.
    ``vram`` is the VRAM array or, inside the dispatch, an operand proxy."""
    if hasattr(vram, "vram_rows"):
        return vram.vram_rows(row, n)
    return rows_window(vram, row, n, geo.vram_rows)


def rows_window(buf, row, n: int, limit: int):
    """Rows [row, row+n) of a 2-D buffer whose rows >= limit read as zero.

    Uses one dynamic_slice (never a gather over the whole buffer: XLA then copies the buffer
    every loop iteration) and a small shift within the n-row window when it was clamped."""
    row = jnp.asarray(row, U32)
    start = jnp.minimum(row, U32(max(limit + 1 - n, 0))).astype(I32)
    data = lax.dynamic_slice(buf, (start, 0), (n, buf.shape[1]))
    if n > 1:
        shift = (row.astype(I32) - start)
        idx = jnp.arange(n) + shift
        data = jnp.take(data, jnp.clip(idx, 0, n - 1), axis=0)
    inside = (row + jnp.arange(n, dtype=U32)) < U32(limit)
    return jnp.where(inside[:, None], data, jnp.zeros((), buf.dtype))


def read_vram(geo: Geometry, st: MachineState, addr, n: int = 1):
    """f32 rows [n, VLEN] at element address addr (rows addr, addr+VLEN, ...), error code."""
    row, err = vram_row(geo, addr)
    if n > 1:
        err = first_err(err, err_if(row + U32(n - 1) >= U32(geo.cfg.vector_sram_size), Err.VRAM_RANGE))
    return bits_to_f32(read_rows_bits(geo, st.vram, row, n)), err


def write_target(geo: Geometry, row):
    """Window row for a write to VRAM row `row` (assumed < depth), or the spare row + error."""
    inside = row < U32(geo.vram_rows)
    return jnp.where(inside, row, U32(geo.vram_rows)).astype(I32), err_if(~inside, Err.WINDOW)


# ---------------------------------------------------------------- MRAM
def mram_tile(geo: Geometry, addr):
    """Tile index of an MRAM element address, checked (alignment, range)."""
    c = geo.cfg
    addr = u32(addr)
    te = U32(c.mlen * c.mlen)
    tile = addr // te
    err = first_err(err_if(addr % te != 0, Err.MRAM_ALIGN), err_if(tile >= U32(c.mram_tiles), Err.MRAM_RANGE))
    return jnp.minimum(tile, U32(c.mram_tiles)).astype(I32), err


def tile_cols(geo: Geometry, st: MachineState, tile, c0, width: int):
    """Columns [c0, c0+width) of MRAM tile `tile` (a zero block for tiles outside the MRAM)."""
    if hasattr(st.mram, "tile_cols"):
        return st.mram.tile_cols(tile, c0, width)
    # one slice of exactly the block (vmapped, it stays a block gather, not a whole-tile one)
    blk = lax.dynamic_slice(st.mram, (jnp.clip(tile, 0, geo.mram_tiles), 0, c0), (1, geo.cfg.mlen, width))[0]
    return jnp.where(tile < geo.mram_tiles, blk, 0.0)


def tile_rows(geo: Geometry, st: MachineState, tile, r0, n: int):
    """Rows [r0, r0+n) of MRAM tile `tile`."""
    if hasattr(st.mram, "tile_rows"):
        return st.mram.tile_rows(tile, r0, n)
    blk = lax.dynamic_slice(st.mram, (jnp.clip(tile, 0, geo.mram_tiles), r0, 0), (1, n, geo.cfg.mlen))[0]
    return jnp.where(tile < geo.mram_tiles, blk, 0.0)


def vram_block(geo: Geometry, st: MachineState, row):
    """The MLEN VRAM rows from `row` (container bits) that a batched-head product reads."""
    if hasattr(st.vram, "vram_block"):
        return st.vram.vram_block(row)
    return rows_window(st.vram, row, geo.cfg.mlen, geo.vram_rows)


def tile_full(geo: Geometry, st: MachineState, tile):
    """A whole MRAM tile (zeros for a tile outside the MRAM)."""
    if hasattr(st.mram, "tile_full"):
        return st.mram.tile_full(tile)
    return tile_rows(geo, st, tile, 0, geo.cfg.mlen)


# ---------------------------------------------------------------- scalar SRAMs / registers
def sram_index(idx, code: Err):
    idx = u32(idx)
    return jnp.minimum(idx, U32(SRAM_WORDS)).astype(I32), err_if(idx >= U32(SRAM_WORDS), code)


def fp_read(st: MachineState, r):
    """f32 value of fp register r (0..7; 8..15 is an error)."""
    bad = r >= st.fp.shape[0]
    return bits_to_f32(st.fp[jnp.minimum(r, st.fp.shape[0] - 1)]), err_if(bad, Err.FP_REG)


_is_bf16 = is_bf16


def vram_dtype(geo):
    """The scalar type VRAM holds (VECTOR_SRAM_TYPE's data type), or None for bf16."""
    if geo is None:
        return None
    t = geo.cfg.precision.vector_sram_type.data
    return None if _is_bf16(t) else t


def scalar_fp_dtype(geo):
    """The scalar type of the FP registers (SCALAR_FP), or None for bf16."""
    if geo is None:
        return None
    t = geo.cfg.precision.scalar_fp
    return None if _is_bf16(t) else t


def to_vram_bits(x, geo=None):
    """f32 -> VRAM container bits. With VECTOR_SRAM_TYPE = bf16 (or ``geo=None``) this is the
    VRAM cast of spec §2.9a (u16). For another type the value is first rounded to that type
    (RNE, :func:`plena.numerics.codec.round_to`) and then held exactly: as bf16 bits (u16) when
    every value of the type is a bf16 value, else as f32 bits (u32, the wide container; the
    choice is static, :mod:`plena.numerics.containers`)."""
    t = vram_dtype(geo)
    if t is None:
        return f32_to_bf16_bits(x)
    x = codec.round_to(x, t)
    return f32_bits(x) if is_wide(t) else f32_to_bf16_bits(x)


def to_fp_bits(x, geo=None):
    """f32 -> fp-register / FP SRAM container bits: ``half::bf16::from_f32`` for SCALAR_FP =
    bf16 (u16); another SCALAR_FP rounds to that type first, then holds the value exactly in
    bf16 bits (u16) or, for a type wider than bf16, in f32 bits (u32)."""
    t = scalar_fp_dtype(geo)
    if t is None:
        return f32_to_bf16_bits_reg(x)
    x = codec.round_to(x, t)
    return f32_bits(x) if is_wide(t) else f32_to_bf16_bits_reg(x)
