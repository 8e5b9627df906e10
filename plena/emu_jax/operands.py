"""Operand fetch outside the dispatch: the record / fetch / replay protocol.

A conditional that reads a large buffer which is then updated in place makes XLA copy the
whole buffer on every loop iteration. So no branch of the dispatch ever sees VRAM, MRAM, HBM
or the batched accumulator. Each step instead runs in three phases:

1. **record**: the instruction's function runs inside the first ``lax.switch`` with a
   :class:`Recorder` standing in for the large memories. Every read it makes is logged, and
   the recorder returns zeros. The switch outputs only these read *addresses* (the compute
   is dead code there and is removed by XLA).
2. **fetch**: fixed-size windows at those addresses are sliced from the real memories,
   outside any conditional.
3. **replay**: the same function runs in the second ``lax.switch`` with a :class:`Replayer`
   that hands back the fetched windows in the same order.

Both passes call the same code with the same register values, so the reads happen in the
same order. Addresses never depend on memory contents.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from plena.emu_jax.state import Geometry, MachineState

U32, I32 = jnp.uint32, jnp.int32
N_VRAM, N_HBM = 2, 2  # reads of each kind one instruction may make


def slot_sizes(geo: Geometry):
    c = geo.cfg
    rows = max(c.blen, -(-128 // c.vlen), 1)  # M_MM reads BLEN rows, V_TOPK up to 128 logits
    width = max(c.blen, c.hlen)  # tile column block: M_MM/M_MV (BLEN) or M_BTMV (HLEN)
    p = c.precision
    row_bytes = [c.mlen * _elem_bits(f) // 8 for f in (p.hbm_m_weight_type, p.hbm_m_kv_type)]
    row_bytes += [c.vlen * _elem_bits(f) // 8 for f in (p.hbm_v_act_type, p.hbm_v_kv_type)]
    # HBM window: one row of the widest element type (elements of > 8 bits take more bytes
    # than elements per row; the H_STORE_V merge reads its whole element slot)
    return rows, width, max(c.mlen, c.vlen, *row_bytes)


def _elem_bits(fmt) -> int:
    return (fmt.elem if hasattr(fmt, "elem") else fmt.data).width


class Requests(NamedTuple):
    vram_row: jnp.ndarray  # u32[N_VRAM] first row of each VRAM read
    tile_c: jnp.ndarray  # i32[2] tile, first column of the column-block read
    tile_r: jnp.ndarray  # i32[2] tile, first row of the row-block read
    hbm_hi: jnp.ndarray  # u32[N_HBM]
    hbm_lo: jnp.ndarray  # u32[N_HBM]
    block: jnp.ndarray  # u32 first of the MLEN VRAM rows a batched product reads
    tile: jnp.ndarray  # i32 whole MRAM tile a batched product reads


class Fetched(NamedTuple):
    vram: jnp.ndarray  # VRAM container [N_VRAM, rows, VLEN] (u16, or u32 when wide)
    cols: jnp.ndarray  # f32[MLEN, width]
    rows: jnp.ndarray  # f32[BLEN, MLEN]
    hbm: jnp.ndarray  # u8[N_HBM, bytes]
    block: jnp.ndarray  # VRAM container [MLEN, VLEN]
    tile: jnp.ndarray  # f32[MLEN, MLEN]


class Recorder:
    """Stands in for the large memories during the address pass."""

    def __init__(self, geo: Geometry):
        self.geo = geo
        self.vram, self.cols, self.rows, self.hbm, self.block, self.tile = [], [], [], [], [], []

    def vram_rows(self, row, n):
        self.vram.append(jnp.asarray(row, U32))
        return jnp.zeros((n, self.geo.cfg.vlen), self.geo.vram_container)

    def tile_cols(self, tile, c0, width):
        self.cols.append((jnp.asarray(tile, I32), jnp.asarray(c0, I32)))
        return jnp.zeros((self.geo.cfg.mlen, width), jnp.float32)

    def tile_rows(self, tile, r0, n):
        self.rows.append((jnp.asarray(tile, I32), jnp.asarray(r0, I32)))
        return jnp.zeros((n, self.geo.cfg.mlen), jnp.float32)

    def hbm_bytes(self, hi, lo, n):
        self.hbm.append((jnp.asarray(hi, U32), jnp.asarray(lo, U32)))
        return jnp.zeros((n,), jnp.uint8)

    def vram_block(self, row):
        self.block.append(jnp.asarray(row, U32))
        return jnp.zeros((self.geo.cfg.mlen, self.geo.cfg.vlen), self.geo.vram_container)

    def tile_full(self, tile):
        self.tile.append(jnp.asarray(tile, I32))
        return jnp.zeros((self.geo.cfg.mlen, self.geo.cfg.mlen), jnp.float32)

    def requests(self) -> Requests:
        def pad(items, n, width=1, dtype=I32):
            if len(items) > n:
                raise AssertionError("instruction makes more reads than the operand slots hold")
            rows = [jnp.stack(it) if isinstance(it, tuple) else it[None] for it in items]
            rows += [jnp.zeros((width,), dtype)] * (n - len(items))
            return jnp.stack([r.astype(dtype) for r in rows])

        hbm = pad(self.hbm, N_HBM, 2, U32)
        return Requests(vram_row=pad(self.vram, N_VRAM, 1, U32)[:, 0], tile_c=pad(self.cols, 1, 2)[0],
                        tile_r=pad(self.rows, 1, 2)[0], hbm_hi=hbm[:, 0], hbm_lo=hbm[:, 1],
                        block=pad(self.block, 1, 1, U32)[0, 0], tile=pad(self.tile, 1, 1)[0, 0])


class Replayer:
    """Hands the fetched windows back to the instruction, in the order it asked for them."""

    def __init__(self, geo: Geometry, fetched: Fetched):
        self.geo, self.f = geo, fetched
        self.k_vram = self.k_hbm = 0

    def vram_rows(self, row, n):
        out = self.f.vram[self.k_vram, :n]
        self.k_vram += 1
        return out

    def tile_cols(self, tile, c0, width):
        mlen, w = self.geo.cfg.mlen, self.f.cols.shape[1]
        shift = jnp.asarray(c0, I32) - jnp.minimum(jnp.asarray(c0, I32), mlen - w)
        return lax.dynamic_slice_in_dim(self.f.cols, shift, width, axis=1)

    def tile_rows(self, tile, r0, n):
        mlen, blen = self.geo.cfg.mlen, self.f.rows.shape[0]
        shift = jnp.asarray(r0, I32) - jnp.minimum(jnp.asarray(r0, I32), mlen - blen)
        return lax.dynamic_slice_in_dim(self.f.rows, shift, n, axis=0)

    def hbm_bytes(self, hi, lo, n):
        out = self.f.hbm[self.k_hbm, :n]
        self.k_hbm += 1
        return out

    def vram_block(self, row):
        return self.f.block

    def tile_full(self, tile):
        return self.f.tile


def fetch(geo: Geometry, st: MachineState, req: Requests) -> Fetched:
    """Slice the requested windows from the real memories (no conditional involved)."""
    from plena.emu_jax.memory import hbm_read_direct, rows_window

    c = geo.cfg
    nrows, width, nbytes = slot_sizes(geo)
    vram = jnp.stack([rows_window(st.vram, req.vram_row[k], nrows, geo.vram_rows) for k in range(N_VRAM)])

    def tile_block(tile, start, size, axis):
        ok = (tile >= 0) & (tile < geo.mram_tiles)
        t = jnp.clip(tile, 0, geo.mram_tiles)
        s = jnp.minimum(jnp.maximum(start, 0), c.mlen - size)
        idx = (t, 0, s) if axis == 2 else (t, s, 0)
        shape = (1, c.mlen, size) if axis == 2 else (1, size, c.mlen)
        return jnp.where(ok, lax.dynamic_slice(st.mram, idx, shape)[0], 0.0)

    cols = tile_block(req.tile_c[0], req.tile_c[1], width, 2)
    rws = tile_block(req.tile_r[0], req.tile_r[1], c.blen, 1)
    hbm = jnp.stack([hbm_read_direct(geo, st.hbm, req.hbm_hi[k], req.hbm_lo[k], nbytes) for k in range(N_HBM)])
    block = rows_window(st.vram, req.block, c.mlen, geo.vram_rows)
    tile = tile_block(req.tile, 0, c.mlen, 1)
    return Fetched(vram=vram, cols=cols, rows=rws, hbm=hbm, block=block, tile=tile)
