"""Matrix-engine instructions (spec §4.1).

Products are f32 matmuls in one defined order (:func:`plena.numerics.matmul.ordered_matmul`,
shared with the golden model) added to the f32 accumulators (``acc = f32(acc + f32(partial))``
per instruction); batched-head products are scaled by the fixed 0.25 first. Memory reads go
through :mod:`plena.emu_jax.memory` helpers, which the dispatch serves from operands fetched
outside it (:mod:`plena.emu_jax.operands`). Write-outs are micro-stepped one VRAM row per
step (``st.sub``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from plena.emu_jax.effects import no_effect
from plena.emu_jax.errors import Err
from plena.emu_jax.memory import (U32, err_if, first_err, mram_tile, pick, read_rows_bits, read_vram, tile_cols,
                                  tile_full, tile_rows, to_vram_bits, vram_block, u32, vram_row, write_target)

from plena.numerics import ieee
from plena.numerics.matmul import ordered_matmul_folded
from plena.numerics.containers import bits_to_f32

BMM_SCALE = 0.25  # fixed; no instruction can change it (spec §2.2)


def _mm(x, w):
    return ordered_matmul_folded(x, w)  # one defined order of the f32 adds (see plena.numerics.matmul)


def _rowgranular(geo, m_addr):
    """M_MM/M_TMM matrix address: tile base + colblock*BLEN*MLEN (spec §4.1)."""
    c = geo.cfg
    te = U32(c.mlen * c.mlen)
    off = m_addr % te
    c0 = off // U32(c.mlen)
    tile, et = mram_tile(geo, m_addr - off)
    err = first_err(err_if(off % U32(c.mlen) != 0, Err.MM_OFFSET), err_if(c0 % U32(c.blen) != 0, Err.MM_COLBLOCK), et)
    return tile, jnp.minimum(c0, U32(c.mlen - c.blen)).astype(jnp.int32), err


def m_mm(geo, st, f):
    c = geo.cfg
    tile, c0, em = _rowgranular(geo, st.gp[f.rs1])
    x, ev = read_vram(geo, st, st.gp[f.rs2], c.blen)
    cols = tile_cols(geo, st, tile, c0, c.blen)
    e = no_effect(geo, st)
    return e._replace(m_acc=ieee.add(st.m_acc, _mm(x, cols)), err=first_err(em, ev))


def m_tmm(geo, st, f):
    c = geo.cfg
    tile, c0, em = _rowgranular(geo, st.gp[f.rs2])
    x, ev = read_vram(geo, st, st.gp[f.rs1], c.blen)
    rows = tile_rows(geo, st, tile, c0, c.blen)
    e = no_effect(geo, st)
    return e._replace(m_acc=ieee.add(st.m_acc, _mm(x, rows.T)), err=first_err(em, ev))


def m_mv(geo, st, f):
    c = geo.cfg
    m_addr = st.gp[f.rs1]
    te = U32(c.mlen * c.mlen)
    off = m_addr % te
    tile, et = mram_tile(geo, m_addr - off)
    eo = err_if((off % U32(c.blen) != 0) | (off >= U32(c.mlen)), Err.MV_OFFSET)
    x, ev = read_vram(geo, st, st.gp[f.rs2])
    o = jnp.minimum(off, U32(c.mlen - c.blen)).astype(jnp.int32)
    cols = tile_cols(geo, st, tile, o, c.blen)
    e = no_effect(geo, st)
    return e._replace(v_acc=ieee.add(st.v_acc, _mm(x, cols)[0]), err=first_err(eo, et, ev))


def m_tmv(geo, st, f):
    c = geo.cfg
    m_addr = st.gp[f.rs1]
    eo = err_if(m_addr % U32(c.mlen * c.mlen) % U32(c.blen) != 0, Err.MV_OFFSET)
    tile, et = mram_tile(geo, m_addr)  # read at m_addr itself: any non-zero offset misaligns
    x, ev = read_vram(geo, st, st.gp[f.rs2])
    rows = tile_rows(geo, st, tile, 0, c.blen)
    e = no_effect(geo, st)
    return e._replace(v_acc=ieee.add(st.v_acc, _mm(x, rows.T)[0]), err=first_err(eo, et, ev))


# ------------------------------------------------------------------ write-outs (micro-stepped)
def _wo_target(geo, v_addr, row_addr, *errs):
    row, er = vram_row(geo, row_addr)
    target, ew = write_target(geo, row)
    return row, target, first_err(*errs, er, ew)


def _place(row, data, col):
    """``row`` with ``data`` written from column ``col`` (clamped into the row, as
    dynamic_update_slice does). A row as wide as the data is the data: no update, which
    under ``vmap`` with a batched column would become a scatter (vectorise reads BLEN-wide
    zero rows for M_MM_WO, and a scatter keeps XLA from compiling the loop around it whole)."""
    if row.shape == data.shape:
        return data
    return lax.dynamic_update_slice(row, data, (col,))


def m_mm_wo(geo, st, f):
    """Row i = st.sub of BLEN: VRAM[base + i*MLEN*s][col:col+BLEN] = bf16(m_acc[i])."""
    c = geo.cfg
    v_addr = st.gp[f.rd] + u32(f.imm18)
    s = pick(f.rs1 == 0, U32(1), lambda: st.gp[f.rs1])
    col = v_addr % U32(c.mlen)
    base = v_addr - col
    i = st.sub
    row_addr = base + u32(i) * U32(c.mlen) * s
    row, target, err = _wo_target(geo, v_addr, row_addr, err_if(col % U32(c.blen) != 0, Err.WO_COLUMN))
    old = read_rows_bits(geo, st.vram, row)[0]
    colc = jnp.minimum(col, U32(c.mlen - c.blen)).astype(jnp.int32)
    new = _place(old, to_vram_bits(st.m_acc[jnp.minimum(i, c.blen - 1)], geo), colc)
    last = i == c.blen - 1
    e = no_effect(geo, st)
    return e._replace(vram_row=target, vram_data=new, m_acc=jnp.where(last, 0.0, st.m_acc), err=err)


def m_mv_wo(geo, st, f):
    c = geo.cfg
    v_addr = st.gp[f.rd] + u32(f.imm18)
    col = v_addr % U32(c.mlen)
    row, target, err = _wo_target(geo, v_addr, v_addr - col, err_if(col % U32(c.blen) != 0, Err.WO_COLUMN))
    old = read_rows_bits(geo, st.vram, row)[0]
    colc = jnp.minimum(col, U32(c.mlen - c.blen)).astype(jnp.int32)
    new = lax.dynamic_update_slice(old, to_vram_bits(st.v_acc, geo), (colc,))
    e = no_effect(geo, st)
    return e._replace(vram_row=target, vram_data=new, v_acc=jnp.zeros_like(st.v_acc), err=err)


def m_bmm_wo(geo, st, f):
    """Step j = g*MLEN + i: VRAM[v + (g*MLEN + i)*MLEN] = bf16(hm_acc[g][i])."""
    c = geo.cfg
    v_addr = st.gp[f.rd] + u32(f.imm18)
    j = st.sub
    row, target, err = _wo_target(geo, v_addr, v_addr + u32(j) * U32(c.mlen),
                                  err_if(v_addr % U32(c.mlen) != 0, Err.BWO_ALIGN))
    g, i = j // c.mlen, j % c.mlen
    last = j == c.broadcast_amount * c.mlen - 1
    e = no_effect(geo, st)
    return e._replace(vram_row=target, vram_data=to_vram_bits(st.hm_acc[g, i], geo),
                      hm_acc=jnp.where(last, 0.0, st.hm_acc), err=err)


def m_bmv_wo(geo, st, f):
    c = geo.cfg
    v_addr = st.gp[f.rd] + u32(f.imm18)
    g = st.sub
    row, target, err = _wo_target(geo, v_addr, v_addr + u32(g) * U32(c.mlen),
                                  err_if(v_addr % U32(c.mlen) != 0, Err.BWO_ALIGN))
    last = g == c.broadcast_amount - 1
    e = no_effect(geo, st)
    return e._replace(vram_row=target, vram_data=to_vram_bits(st.hv_acc[g], geo),
                      hv_acc=jnp.where(last, 0.0, st.hv_acc), err=err)


# ------------------------------------------------------------------ batched heads
def _batch_cfg_err(geo):
    c = geo.cfg
    return jnp.int32(0 if c.broadcast_amount * c.hlen == c.mlen else int(Err.BATCH_CONFIG))


def _batched_decode(geo, m_addr, span: int):
    """Batched-head matrix address = tile base + block + h0, with r = m_addr mod span:
    block = r - r mod MLEN (must be 0, else a libtorch shape error) and h0 = r mod MLEN (a
    multiple of HLEN). span is MLEN*BLEN for M_BMM/M_BMV and MLEN*MLEN for M_BTMM/M_BTMV."""
    c = geo.cfg
    r = m_addr % U32(span)
    block = r - r % U32(c.mlen)
    h0 = r % U32(c.mlen)
    tile, et = mram_tile(geo, m_addr - r)
    err = first_err(_batch_cfg_err(geo), err_if(block % U32(c.blen) != 0, Err.MM_COLBLOCK),
                    err_if(h0 % U32(c.hlen) != 0, Err.HEAD_OFFSET), et,
                    err_if(block != 0, Err.BATCH_BLOCK))
    return tile, jnp.minimum(h0, U32(c.mlen - c.hlen)).astype(jnp.int32), err


def _bmm_decode(geo, m_addr):
    return _batched_decode(geo, m_addr, geo.cfg.mlen * geo.cfg.blen)


def _btmm_decode(geo, m_addr):
    return _batched_decode(geo, m_addr, geo.cfg.mlen * geo.cfg.mlen)


def _rows_ok(geo, v_addr):
    """Address rule for the MLEN VRAM rows a batched product reads (read after the dispatch)."""
    row, err = vram_row(geo, v_addr)
    return first_err(err, err_if(row + U32(geo.cfg.mlen - 1) >= U32(geo.cfg.vector_sram_size), Err.VRAM_RANGE))


def _batched_rows(geo, st, f):
    """The MLEN VRAM rows at gp[rs2] as f32 [MLEN, VLEN] (fetched outside the dispatch)."""
    return bits_to_f32(vram_block(geo, st, st.gp[f.rs2] // U32(geo.cfg.vlen)))


def _batched(geo, st, f, decode, product):
    """M_BMM / M_BTMM: hm_acc += 0.25 * product(X, tile, h0), X = the MLEN VRAM rows at gp[rs2]."""
    c = geo.cfg
    tile, h0, em = decode(geo, st.gp[f.rs1])
    err = first_err(em, _rows_ok(geo, st.gp[f.rs2]))
    e = no_effect(geo, st)
    if c.broadcast_amount * c.hlen != c.mlen:
        return e._replace(err=err)
    x = _batched_rows(geo, st, f)
    return e._replace(hm_acc=ieee.add(st.hm_acc, ieee.mul(BMM_SCALE, product(c, x, tile_full(geo, st, tile), h0))), err=err)


def _bmm_product(c, x, tile, h0):
    """X_g @ T[h0:h0+HLEN, :] with X_g the interleaved head g (elements d*BA + g)."""
    m = lax.dynamic_slice_in_dim(tile, h0, c.hlen, axis=0)  # [HLEN, MLEN]
    return _mm(x.reshape(c.mlen, c.hlen, c.broadcast_amount).transpose(2, 0, 1), m)


def _btmm_product(c, x, tile, h0):
    """X_g @ T[:, h0:h0+HLEN]^T with X_g the contiguous head g (elements g*HLEN + d)."""
    k = lax.dynamic_slice_in_dim(tile, h0, c.hlen, axis=1)  # [MLEN, HLEN]
    return _mm(x.reshape(c.mlen, c.broadcast_amount, c.hlen).transpose(1, 0, 2), k.T)


def m_bmm(geo, st, f):
    return _batched(geo, st, f, _bmm_decode, _bmm_product)


def m_btmm(geo, st, f):
    return _batched(geo, st, f, _btmm_decode, _btmm_product)


def m_btmv(geo, st, f):
    c = geo.cfg
    tile, h0, em = _btmm_decode(geo, st.gp[f.rs1] + st.gp[f.rd])
    x, ev = read_vram(geo, st, st.gp[f.rs2])
    e = no_effect(geo, st)
    if c.broadcast_amount * c.hlen != c.mlen:
        return e._replace(err=first_err(em, ev))
    k = tile_cols(geo, st, tile, h0, c.hlen)  # [MLEN, HLEN]
    xh = x[0].reshape(c.broadcast_amount, c.hlen)
    return e._replace(hv_acc=ieee.add(st.hv_acc, ieee.mul(BMM_SCALE, _mm(xh, k.T))), err=first_err(em, ev))


def m_bmv(geo, st, f):
    """Always a panic in the reference: its result [BA,1,MLEN] cannot be added to hv_accum."""
    _, _, em = _bmm_decode(geo, st.gp[f.rs1] + st.gp[f.rd])
    _, ev = read_vram(geo, st, st.gp[f.rs2])
    return no_effect(geo, st)._replace(err=first_err(em, ev, jnp.int32(int(Err.BMV))))
