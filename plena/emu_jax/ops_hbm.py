"""HBM transfers (spec §2.7, §4.5): H_PREFETCH_M, H_PREFETCH_V, H_STORE_V.

One HBM row moves per micro-step (``st.sub`` = row index i). Row i of a transfer has its
elements at ``E0 + i*S`` and its scales at ``S0 + trunc(f32(i) * f32(S/ratio))`` with
``E0 = a[rs2] + gp[rs1]``, ``S0 = a[rs2] + SCALE + gp[rs1] // ratio`` (64-bit) and
``S = STRIDE`` when the rstride field is exactly 1, else the row length. The scale bytes of
one row are fetched as a single piece clipped at the end of its 64-byte block (the rest read
as 0). Reads past the end of HBM return 0; writes past its capacity are errors.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from plena.emu_jax.effects import no_effect
from plena.emu_jax.errors import Err
from plena.emu_jax.memory import (U32, add64, blocks_touched, err_if, first_err, hbm_index, past_end64, hbm_read,
                                  mram_tile, read_rows_bits, to_vram_bits, u32, vram_row, write_target)
from plena.emu_jax.state import Geometry
from plena.numerics.bf16 import bf16_bits_to_f32
from plena.numerics.formats import MxFormat
from plena.numerics.minifloat import decode_table
from plena.numerics.mx import mx_encode


class UnsupportedFormat(NotImplementedError):
    pass


def check_formats(cfg) -> None:
    """The emulator currently moves MX data with 8-bit elements and 8-bit scales (MXFP8 and
    friends) and keeps VRAM in bf16; other precision tables raise here, at load time."""
    p = cfg.precision
    for name in ("hbm_m_weight_type", "hbm_m_kv_type", "hbm_v_act_type", "hbm_v_kv_type"):
        fmt = getattr(p, name)
        if not (isinstance(fmt, MxFormat) and fmt.elem.width == 8 and fmt.scale.width == 8
                and fmt.block == p.hbm_v_act_type.block and hasattr(fmt.elem, "exponent")):
            raise UnsupportedFormat(f"precision {name} = {fmt} is not supported yet "
                                    "(MX with 8-bit float elements and 8-bit scales only)")
    if str(p.vector_sram_type) != "Plain(e8m7s)":
        raise UnsupportedFormat(f"VECTOR_SRAM_TYPE = {p.vector_sram_type}: only bf16 VRAM is supported")


@functools.lru_cache(maxsize=None)
def _luts(fmt: MxFormat):
    return decode_table(fmt.elem).astype(np.float32), decode_table(fmt.scale).astype(np.float32)


def _pick_luts(fmt0: MxFormat, fmt1: MxFormat, funct1):
    e0, s0 = _luts(fmt0)
    e1, s1 = _luts(fmt1)
    if fmt0 == fmt1:
        return jnp.asarray(e0), jnp.asarray(s0)
    return jnp.where(funct1 == 0, e0, e1), jnp.where(funct1 == 0, s0, s1)


def _row_addresses(geo: Geometry, st, f, row_len: int, ratio: int):
    """(elem hi, lo), (scale hi, lo) of row i = st.sub."""
    base_hi, base_lo = st.a_hi[f.rs2], st.a_lo[f.rs2]
    off = st.gp[f.rs1]
    stride = jnp.where(f.rs3 == 1, st.stride, U32(row_len))
    i = u32(st.sub)
    e_hi, e_lo = add64(*add64(base_hi, base_lo, off), i * stride)
    s_hi, s_lo = add64(*add64(base_hi, base_lo, st.scale), off // U32(ratio))
    # scale step computed in f32 and truncated (spec §2.7), split into 32-bit words
    q = jnp.floor(st.sub.astype(jnp.float32) * (stride.astype(jnp.float32) / jnp.float32(ratio)))
    q_hi = jnp.floor(q / jnp.float32(2.0 ** 32))
    q_lo = (q - q_hi * jnp.float32(2.0 ** 32)).astype(U32)
    s_hi, s_lo = add64(s_hi + q_hi.astype(U32), s_lo, q_lo)
    return (e_hi, e_lo), (s_hi, s_lo)


def _read_mx_row(geo, st, f, fmt0, fmt1, row_len):
    ratio = fmt0.element_scale_ratio
    (e_hi, e_lo), (s_hi, s_lo) = _row_addresses(geo, st, f, row_len, ratio)
    nsc = row_len // fmt0.block
    elem = hbm_read(geo, st.hbm, e_hi, e_lo, row_len)
    scale = hbm_read(geo, st.hbm, s_hi, s_lo, nsc)
    scale = jnp.where((s_lo % U32(64)) + jnp.arange(nsc, dtype=U32) < U32(64), scale, jnp.uint8(0))
    elut, slut = _pick_luts(fmt0, fmt1, f.funct1)
    values = elut[elem.astype(jnp.int32)] * jnp.repeat(slut[scale.astype(jnp.int32)], fmt0.block)
    return values, blocks_touched(e_lo, row_len) + U32(1)


def h_prefetch_m(geo, st, f):
    c = geo.cfg
    p = c.precision
    values, nread = _read_mx_row(geo, st, f, p.hbm_m_weight_type, p.hbm_m_kv_type, c.mlen)
    tile0, et = mram_tile(geo, st.gp[f.rd])
    tile = tile0 + st.sub // c.mlen
    er = err_if(tile >= c.mram_tiles, Err.MRAM_RANGE)
    target = jnp.where((et == 0) & (er == 0), tile, geo.mram_tiles)
    e = no_effect(geo, st)
    return e._replace(mram_tile=target, mram_row=st.sub % c.mlen, mram_data=values, hbm_rd=nread,
                      err=first_err(et, er))


def h_prefetch_v(geo, st, f):
    c = geo.cfg
    p = c.precision
    values, nread = _read_mx_row(geo, st, f, p.hbm_v_act_type, p.hbm_v_kv_type, c.vlen)
    row0, err = vram_row(geo, st.gp[f.rd])
    row = row0 + u32(st.sub)
    dropped = row >= U32(c.vector_sram_size)  # rows past VRAM depth are silently dropped
    target, ew = write_target(geo, row)
    e = no_effect(geo, st)
    return e._replace(vram_row=jnp.where(dropped, geo.vram_rows, target), vram_data=to_vram_bits(values),
                      hbm_rd=nread, err=first_err(err, jnp.where(dropped, 0, ew)))


def h_store_v(geo, st, f):
    c = geo.cfg
    fmt0, fmt1 = c.precision.hbm_v_act_type, c.precision.hbm_v_kv_type
    ratio, nsc = fmt0.element_scale_ratio, c.vlen // fmt0.block
    (e_hi, e_lo), (s_hi, s_lo) = _row_addresses(geo, st, f, c.vlen, ratio)
    row0, err = vram_row(geo, st.gp[f.rd])
    row = row0 + u32(st.sub)
    er = err_if(row >= U32(c.vector_sram_size), Err.VRAM_RANGE)
    x = bf16_bits_to_f32(read_rows_bits(geo, st.vram, row)[0])
    if fmt0 == fmt1:
        elem, scale = mx_encode(x, fmt0)
    else:
        (ea, sa), (eb, sb) = mx_encode(x, fmt0), mx_encode(x, fmt1)
        elem, scale = jnp.where(f.funct1 == 0, ea, eb), jnp.where(f.funct1 == 0, sa, sb)
    e_over = past_end64(e_hi, e_lo, c.vlen, st.hbm_cap_hi, st.hbm_cap_lo)
    s_over = past_end64(s_hi, s_lo, nsc, st.hbm_cap_hi, st.hbm_cap_lo)
    e_idx, e_in = hbm_index(geo, e_hi, e_lo)
    s_idx, s_in = hbm_index(geo, s_hi, s_lo)
    e_fit = e_in & (e_lo <= U32(geo.hbm_bytes - c.vlen))
    s_fit = s_in & (s_lo <= U32(geo.hbm_bytes - nsc))
    ew = first_err(err_if(e_over | s_over, Err.HBM_WRITE_RANGE), err_if(~(e_fit & s_fit), Err.WINDOW))
    pieces = blocks_touched(e_lo, c.vlen) + blocks_touched(s_lo, nsc)
    e = no_effect(geo, st)
    return e._replace(hbm_e_idx=e_idx, hbm_e_data=elem.astype(jnp.uint8),
                      hbm_s_idx=s_idx, hbm_s_data=scale.astype(jnp.uint8),
                      hbm_rd=pieces, hbm_wr=pieces, err=first_err(err, er, ew))
