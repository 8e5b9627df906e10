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
import warnings

import jax.numpy as jnp
import numpy as np

from plena.emu_jax.effects import hbm_elem_slot, hbm_scale_bytes, no_effect
from plena.emu_jax.errors import Err
from plena.emu_jax.memory import (U32, add64, blocks_touched, err_if, first_err, hbm_index, past_end64, hbm_read, pick,
                                  mram_tile, read_rows_bits, to_vram_bits, u32, vram_row, write_target)
from plena.emu_jax.state import Geometry
from plena.numerics.containers import bits_to_f32, container_problem
from plena.numerics import codec, mx
from plena.numerics.formats import FloatType, IntType, MxFormat, PlainFormat
from plena.numerics.minifloat import decode_table
from plena.numerics.mx import mx_encode


class UnsupportedFormat(NotImplementedError):
    pass


def _is_bf16(t) -> bool:
    return isinstance(t, FloatType) and (t.sign, t.exponent, t.mantissa) == (True, 8, 7)


def _data(fmt):
    return fmt.elem if isinstance(fmt, MxFormat) else fmt.data


def check_formats(cfg) -> None:
    """Raise :class:`UnsupportedFormat` (naming the precision key) for precision tables the
    emulator cannot honour; everything else is supported (docs/formats.md):

    * HBM transfer types (HBM_M_WEIGHT_TYPE, HBM_M_KV_TYPE, HBM_V_ACT_TYPE, HBM_V_KV_TYPE):
      Plain Fp or Int of up to 32 bits (decoded to f32 with RNE), or Mx with a signed Fp (<= 16 bits,
      exponent <= 7) or Int (2..16 bits) element and an 8-bit unsigned power-of-two scale
      (e8m0); elements of any width are packed little-endian, a row must be whole bytes and
      the block must divide the row. H_STORE_V formats (HBM_V_*) take elements of up to 32
      bits; the element and scale write slots are sized from the two formats
      (:func:`~.effects.hbm_elem_slot`, :func:`~.effects.hbm_scale_bytes`).
    * VECTOR_SRAM_TYPE, MATRIX_SRAM_TYPE (Plain) and SCALAR_FP (Fp): any type of the codec (Fp
      up to 32 bits with <= 30 mantissa bits, Int up to 32 bits; no Int for SCALAR_FP). Types
      that are subsets of bf16 keep the u16 bf16 containers; wider ones are held as u32 f32 bits
      (:mod:`plena.numerics.containers`); a type f32 does not hold exactly (Int > 24 bits, Fp
      with > 8 exponent or > 23 mantissa bits) is rounded to f32 by the datapath, with a
      :class:`PrecisionWarning`.
    """
    p = cfg.precision
    keys = {"hbm_m_weight_type": "HBM_M_WEIGHT_TYPE", "hbm_m_kv_type": "HBM_M_KV_TYPE",
            "hbm_v_act_type": "HBM_V_ACT_TYPE", "hbm_v_kv_type": "HBM_V_KV_TYPE"}

    def bad(key, fmt, why):
        raise UnsupportedFormat(f"precision {key} = {fmt}: {why} (see docs/formats.md)")

    for name, key in keys.items():
        fmt = getattr(p, name)
        row = cfg.mlen if name.startswith("hbm_m") else cfg.vlen
        el = _data(fmt)
        if isinstance(fmt, MxFormat):
            try:
                codec.check_mx_format(fmt)
            except (NotImplementedError, TypeError, ValueError) as e:
                bad(key, fmt, str(e))
            if fmt.scale.width != 8:
                bad(key, fmt, "MX scales must be 8 bits wide")
            if row % fmt.block:
                bad(key, fmt, f"the block ({fmt.block}) must divide the row length ({row})")
            if (fmt.elem.width * fmt.block) % fmt.scale.width:
                bad(key, fmt, "elem_bits * block must be a multiple of the scale width")
        else:
            try:
                codec.check_scalar_type(el)
            except (NotImplementedError, TypeError, ValueError) as e:
                bad(key, fmt, str(e))
        if (row * el.width) % 8:
            bad(key, fmt, "a row must be a whole number of bytes")
    v = p.vector_sram_type
    why = "VRAM holds Plain types only" if not isinstance(v, PlainFormat) else container_problem(v.data)
    if why:
        bad("VECTOR_SRAM_TYPE", v, why)
    sfp = p.scalar_fp
    why = container_problem(sfp, ints=False)
    if why:
        bad("SCALAR_FP", sfp, why)
    m = p.matrix_sram_type
    why = "MRAM holds Plain types only" if not isinstance(m, PlainFormat) else container_problem(m.data)
    if why:
        bad("MATRIX_SRAM_TYPE", m, why)
    _warn_f32_datapath(cfg)


class PrecisionWarning(UserWarning):
    """A configured on-chip type holds values that the f32 datapath rounds."""


def _warn_f32_datapath(cfg) -> None:
    p = cfg.precision
    for key, t in (("VECTOR_SRAM_TYPE", p.vector_sram_type.data), ("MATRIX_SRAM_TYPE", p.matrix_sram_type.data),
                   ("SCALAR_FP", p.scalar_fp)):
        if not codec.f32_holds(t):
            warnings.warn(f"precision {key} = {t}: values this type holds beyond f32 (a 24-bit significand, "
                  "exponents -149..127) are rounded to f32 by the f32 datapath (RNE, ±inf on overflow); "
                  "see docs/formats.md", PrecisionWarning, stacklevel=3)


def _scale_bytes(fmt, row_len: int) -> int:
    """Scale bytes of one row (0 for Plain)."""
    if not isinstance(fmt, MxFormat):
        return 0
    return row_len // fmt.block * fmt.scale.width // 8


def _row_bytes(fmt, row_len: int) -> int:
    return row_len * _data(fmt).width // 8


@functools.lru_cache(maxsize=None)
def _elem_lut(t):
    """f32 value of every code of an MX element type (float: the reference decode, §2.9(a))."""
    if isinstance(t, IntType):
        return codec.decode_np(np.arange(1 << t.width, dtype=np.uint32), t)
    return decode_table(t).astype(np.float32)


def _decode_codes(fmt, raw, scale_raw, row_len):
    """f32 values of one row from its element bytes (and scale bytes, already clipped)."""
    el = _data(fmt)
    nb = _row_bytes(fmt, row_len)
    codes = raw[:nb] if el.width == 8 else codec.unpack_codes(raw[:nb], el.width, row_len)
    if not isinstance(fmt, MxFormat):
        return codec.decode(codes, el)
    scale = scale_raw[:_scale_bytes(fmt, row_len)]
    elut = jnp.asarray(_elem_lut(el))
    slut = jnp.asarray(decode_table(fmt.scale).astype(np.float32))
    return mx.apply_scale(elut[codes.astype(jnp.int32)], jnp.repeat(slut[scale.astype(jnp.int32)], fmt.block))


def _select(funct1, a, b):
    return tuple(jnp.where(funct1 == 0, x, y) for x, y in zip(a, b))


def _addresses(geo, st, f, fmt0, fmt1, row_len):
    """Element and scale addresses of row st.sub for the format funct1 selects."""
    a0 = _row_addresses(geo, st, f, _row_bytes(fmt0, row_len), fmt0.element_scale_ratio)
    if fmt0 == fmt1:
        return a0
    a1 = _row_addresses(geo, st, f, _row_bytes(fmt1, row_len), fmt1.element_scale_ratio)
    (e0, s0), (e1, s1) = a0, a1
    return _select(f.funct1, e0, e1), _select(f.funct1, s0, s1)


def _row_addresses(geo: Geometry, st, f, row_bytes: int, ratio: int):
    """(elem hi, lo), (scale hi, lo) of row i = st.sub (``row_bytes``: the default stride,
    the bytes of one row; equal to the row length for 8-bit elements as in the reference)."""
    base_hi, base_lo = st.a_hi[f.rs2], st.a_lo[f.rs2]
    off = st.gp[f.rs1]
    stride = pick(f.rs3 == 1, st.stride, U32(row_bytes))
    i = u32(st.sub)
    e_hi, e_lo = add64(*add64(base_hi, base_lo, off), i * stride)
    s_hi, s_lo = add64(*add64(base_hi, base_lo, st.scale), off // U32(ratio))
    # scale step computed in f32 and truncated (spec §2.7), split into 32-bit words
    q = jnp.floor(st.sub.astype(jnp.float32) * (stride.astype(jnp.float32) / jnp.float32(ratio)))
    q_hi = jnp.floor(q / jnp.float32(2.0 ** 32))
    q_lo = (q - q_hi * jnp.float32(2.0 ** 32)).astype(U32)
    s_hi, s_lo = add64(s_hi + q_hi.astype(U32), s_lo, q_lo)
    return (e_hi, e_lo), (s_hi, s_lo)


def _read_row(geo, st, f, fmt0, fmt1, row_len):
    """(f32 values, blocks read) of row i = st.sub of a transfer (format by funct1); one
    element read and at most one scale read."""
    fmts = (fmt0,) if fmt0 == fmt1 else (fmt0, fmt1)
    (e_hi, e_lo), (s_hi, s_lo) = _addresses(geo, st, f, fmt0, fmt1, row_len)
    nb_max = max(_row_bytes(m, row_len) for m in fmts)
    nsc_max = max(_scale_bytes(m, row_len) for m in fmts)
    raw = hbm_read(geo, st.hbm, e_hi, e_lo, nb_max)
    scale = None
    if nsc_max:
        scale = hbm_read(geo, st.hbm, s_hi, s_lo, nsc_max)
        scale = jnp.where((s_lo % U32(64)) + jnp.arange(nsc_max, dtype=U32) < U32(64), scale, jnp.uint8(0))
    outs = []
    for m in fmts:
        nread = blocks_touched(e_lo, _row_bytes(m, row_len)) + U32(1 if isinstance(m, MxFormat) else 0)
        outs.append((_decode_codes(m, raw, scale, row_len), nread))
    return outs[0] if len(outs) == 1 else _select(f.funct1, *outs)


def _to_mram(geo, values):
    """MRAM keeps f32 values as decoded (reference, MATRIX_SRAM_TYPE = bf16); another
    MATRIX_SRAM_TYPE rounds them to that type (RNE)."""
    t = geo.cfg.precision.matrix_sram_type.data
    return values if _is_bf16(t) else codec.round_to(values, t)


def h_prefetch_m(geo, st, f):
    c = geo.cfg
    p = c.precision
    values, nread = _read_row(geo, st, f, p.hbm_m_weight_type, p.hbm_m_kv_type, c.mlen)
    values = _to_mram(geo, values)
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
    values, nread = _read_row(geo, st, f, p.hbm_v_act_type, p.hbm_v_kv_type, c.vlen)
    row0, err = vram_row(geo, st.gp[f.rd])
    row = row0 + u32(st.sub)
    dropped = row >= U32(c.vector_sram_size)  # rows past VRAM depth are silently dropped
    target, ew = write_target(geo, row)
    e = no_effect(geo, st)
    return e._replace(vram_row=jnp.where(dropped, geo.vram_rows, target), vram_data=to_vram_bits(values, geo),
                      hbm_rd=nread, err=first_err(err, jnp.where(dropped, 0, ew)))


def _encode_row(fmt, x, vlen):
    """(element bytes u8[row bytes], scale bytes u8[scale bytes]) of one VRAM row ``x``."""
    el = _data(fmt)
    if isinstance(fmt, MxFormat):
        if isinstance(el, FloatType) and el.width == 8:
            elem, scale = mx_encode(x, fmt)  # the reference's encoder, unchanged
        else:
            elem, scale = codec.mx_encode(x, fmt)
    else:
        elem, scale = codec.encode(x, el), jnp.zeros(0, jnp.uint8)
    return codec.pack_codes(elem, el.width), scale.astype(jnp.uint8)


def h_store_v(geo, st, f):
    """H_STORE_V: MX-encode (hardware encoder) or, for Plain types, RNE-encode one VRAM row.
    Sub-byte elements are packed (first element in the low bits), wider ones (up to 32 bits)
    take ``bits/8`` bytes each, little-endian; rows whose element or scale
    bytes are fewer than the write slots are merged into the current HBM contents."""
    c = geo.cfg
    fmt0, fmt1 = c.precision.hbm_v_act_type, c.precision.hbm_v_kv_type
    fmts = (fmt0,) if fmt0 == fmt1 else (fmt0, fmt1)
    slot_e, slot_s = hbm_elem_slot(geo), hbm_scale_bytes(geo)
    row0, err = vram_row(geo, st.gp[f.rd])
    row = row0 + u32(st.sub)
    er = err_if(row >= U32(c.vector_sram_size), Err.VRAM_RANGE)
    x = bits_to_f32(read_rows_bits(geo, st.vram, row)[0])
    (e_hi, e_lo), (s_hi, s_lo) = _addresses(geo, st, f, fmt0, fmt1, c.vlen)
    old_e = old_s = None
    if any(_row_bytes(m, c.vlen) < slot_e for m in fmts):  # read-modify-write of the slot
        old_e = hbm_read(geo, st.hbm, e_hi, e_lo, slot_e)
    if any(_scale_bytes(m, c.vlen) < slot_s for m in fmts):
        old_s = hbm_read(geo, st.hbm, s_hi, s_lo, slot_s)
    e_idx, e_in = hbm_index(geo, e_hi, e_lo)
    s_idx0, s_in = hbm_index(geo, s_hi, s_lo)

    def one(fmt):
        nb, nsc = _row_bytes(fmt, c.vlen), _scale_bytes(fmt, c.vlen)
        elem, scale = _encode_row(fmt, x, c.vlen)
        if nb < slot_e:
            elem = jnp.concatenate([elem, old_e[nb:]])
        if nsc < slot_s:
            scale = jnp.concatenate([scale, old_s[nsc:]])
        e_over = past_end64(e_hi, e_lo, nb, st.hbm_cap_hi, st.hbm_cap_lo)
        e_fit = e_in & (e_lo <= U32(geo.hbm_bytes - nb))
        pieces = blocks_touched(e_lo, nb)
        if nsc:
            s_over = past_end64(s_hi, s_lo, nsc, st.hbm_cap_hi, st.hbm_cap_lo)
            s_fit = s_in & (s_lo <= U32(geo.hbm_bytes - nsc))
            pieces = pieces + blocks_touched(s_lo, nsc)
            s_idx = s_idx0
        else:  # Plain: no scale stream; the scale slot writes nowhere
            s_over, s_fit = jnp.bool_(False), jnp.bool_(True)
            s_idx = jnp.int32(geo.hbm_bytes + c.vlen + 64)
        ew = first_err(err_if(e_over | s_over, Err.HBM_WRITE_RANGE), err_if(~(e_fit & s_fit), Err.WINDOW))
        return elem.astype(jnp.uint8), scale.astype(jnp.uint8), s_idx, pieces, ew

    outs = [one(m) for m in fmts]
    elem, scale, s_idx, pieces, ew = outs[0] if len(outs) == 1 else _select(f.funct1, *outs)
    e = no_effect(geo, st)
    return e._replace(hbm_e_idx=e_idx, hbm_e_data=elem,
                      hbm_s_idx=s_idx, hbm_s_data=scale,
                      hbm_rd=pieces, hbm_wr=pieces, err=first_err(err, er, ew))
