"""Vector instructions (spec §4.2): element-wise ops on VRAM rows, reductions, V_SHFT_V, V_TOPK.

Operands are bf16 rows widened to f32; results are computed in f32 and rounded to bf16 with
the VRAM cast when written. A non-zero rmask field selects the V_MASK register: one bit per
HLEN-element head; masked-off heads keep the first operand (V_EXP_V: its clamped value).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from plena.emu_jax.effects import Fields, no_effect
from plena.emu_jax.errors import Err
from plena.emu_jax.memory import (to_fp_bits, U32, err_if, first_err, fp_read, pick, read_rows_bits, read_vram,
                                  sram_index, to_vram_bits, vram_row, write_target)
from plena.emu_jax.state import TOPK_MAX, Geometry
from plena.numerics import ieee, unary
from plena.numerics.containers import bits_to_f32
from plena.numerics.reduce import torch_sum


def head_mask(geo: Geometry, st, f: Fields):
    """bool[VLEN]: elements the op updates (all when rmask = 0)."""
    c = geo.cfg
    lane = jnp.arange(c.vlen)
    head = (lane // c.hlen).astype(U32)
    bit = (st.vmask >> (head % U32(32))) & U32(1)
    in_heads = lane < (c.vlen // c.hlen) * c.hlen
    return jnp.where(f.rs3 == 0, True, (bit == 1) & in_heads)


def masked(geo: Geometry, st, f: Fields, new, old):
    """``new`` where the op updates (:func:`head_mask`), else ``old`` (a value, or a callable
    that makes it: without a mask it is never made)."""
    return pick(f.rs3 == 0, lambda: new,
                lambda: jnp.where(head_mask(geo, st, f), new, old() if callable(old) else old))


def _write_row(geo, st, f, values_f32, *errs):
    row, e_row = vram_row(geo, st.gp[f.rd])
    target, e_win = write_target(geo, row)
    e = no_effect(geo, st)
    return e._replace(vram_row=target, vram_data=to_vram_bits(values_f32, geo), err=first_err(*errs, e_row, e_win))


def _elementwise(op, scalar_operand: bool):
    def run(geo, st, f):
        a, ea = read_vram(geo, st, st.gp[f.rs1])
        a = a[0]
        if scalar_operand:
            b, eb = fp_read(st, f.rs2)
        else:
            b, eb = read_vram(geo, st, st.gp[f.rs2])
            b = b[0]
        r = op(a, b, f)
        out = masked(geo, st, f, r, a)
        return _write_row(geo, st, f, out, ea, eb)
    return run


def _clamp_min(a, s):
    """libtorch clamp_min: NaN elements stay NaN; a NaN bound fills the result with NaN."""
    return jnp.where(jnp.isnan(s), s, jnp.where(jnp.isnan(a), a, ieee.maximum(a, s)))


def _clamp_max(a, s):
    return jnp.where(jnp.isnan(s), s, jnp.where(jnp.isnan(a), a, ieee.minimum(a, s)))


v_add_vv = _elementwise(lambda a, b, f: ieee.add(a, b), False)
v_sub_vv = _elementwise(lambda a, b, f: ieee.sub(a, b), False)
v_mul_vv = _elementwise(lambda a, b, f: ieee.mul(a, b), False)
v_add_vf = _elementwise(lambda a, s, f: ieee.add(a, s), True)
v_sub_vf = _elementwise(lambda a, s, f: pick(f.funct1 == 0, lambda: ieee.sub(a, s), lambda: ieee.sub(s, a)), True)
v_mul_vf = _elementwise(lambda a, s, f: ieee.mul(a, s), True)
v_max_vf = _elementwise(lambda a, s, f: _clamp_min(a, s), True)
v_min_vf = _elementwise(lambda a, s, f: _clamp_max(a, s), True)


def _unary_row(name: str, masked_off: str):
    def run(geo, st, f):
        row, err = vram_row(geo, st.gp[f.rs1])
        bits = read_rows_bits(geo, st.vram, row)[0]
        r = unary.apply_bits(name, bits)

        def keep():
            return unary.apply_bits(masked_off, bits) if masked_off != "identity" else bits_to_f32(bits)

        return _write_row(geo, st, f, masked(geo, st, f, r, keep), err)
    return run


v_exp_v = _unary_row("exp", "clamp")
v_reci_v = _unary_row("reci", "identity")


def v_red_sum(geo, st, f):
    """fp[rd] = bf16(fp[rd] + S), S summed in libtorch's CPU order (spec §8)."""
    c = geo.cfg
    a, ea = read_vram(geo, st, st.gp[f.rs1])
    a = a[0]
    heads = c.vlen // c.hlen

    def heads_summed():  # masked: each selected head -> its sum
        head_sums = torch_sum(a[: heads * c.hlen].reshape(heads, c.hlen))
        replaced = jnp.where(head_mask(geo, st, f)[: heads * c.hlen],
                             jnp.repeat(head_sums, c.hlen), a[: heads * c.hlen])
        return jnp.concatenate([replaced, a[heads * c.hlen:]])

    row = pick(f.rs3 == 0, a, heads_summed)
    acc, er = fp_read(st, f.rd)
    return _fp_dest(geo, st, f, ieee.add(acc, torch_sum(row)), ea, er)


def v_red_max(geo, st, f):
    """fp[rd] = bf16(rust_max(torch_max(a), fp[rd])): torch max propagates NaN, Rust's ignores it."""
    a, ea = read_vram(geo, st, st.gp[f.rs1])
    m = ieee.max_reduce(a[0])  # propagates NaN like torch.max
    acc, er = fp_read(st, f.rd)
    res = jnp.where(jnp.isnan(m), acc, jnp.where(jnp.isnan(acc), m, ieee.maximum(m, acc)))
    return _fp_dest(geo, st, f, res, ea, er)


def _fp_dest(geo, st, f, value, *errs):
    e = no_effect(geo, st)
    rd = jnp.minimum(f.rd, st.fp.shape[0] - 1)
    return e._replace(fp=e.fp.at[rd].set(to_fp_bits(value, geo)), err=first_err(*errs))


def v_shft_v(geo, st, f):
    """Shift right by gp[rs2] lanes: out[i] = a[i - n], zeros enter at lane 0."""
    a, ea = read_vram(geo, st, st.gp[f.rs1])
    n = st.gp[f.rs2]
    lane = jnp.arange(geo.cfg.vlen, dtype=U32)
    src = (lane - n).astype(jnp.int32)
    out = jnp.where(lane >= n, a[0][jnp.clip(src, 0, geo.cfg.vlen - 1)], 0.0)
    return _write_row(geo, st, f, out, ea)


# ------------------------------------------------------------------ V_TOPK
def _total_order_key(x):
    """uint32 key whose unsigned order is IEEE totalOrder of the f32 values."""
    b = lax.bitcast_convert_type(x, U32)
    return jnp.where(b >> U32(31) == 1, ~b, b | U32(0x80000000))


def _topk(values, k: int):
    """Indices and weights of the k largest logits (ties: lower index first)."""
    values = jnp.where(jnp.isnan(values), -jnp.inf, values)
    key = ~_total_order_key(values)  # ascending sort of ~key = descending totalOrder
    idx = jnp.arange(values.shape[0], dtype=jnp.int32)
    _, order = lax.sort((key, idx), num_keys=2)
    top = order[:k]
    return top, unary.topk_weights(values[top])


def v_topk(geo, st, f):
    """Routed-MoE router: policy 0 -> (E=32, K=4), 1 -> (E=128, K=8) (spec §4.2)."""
    c = geo.cfg
    base = st.gp[f.rs1]
    results, errs = [], []
    for experts, k in ((32, 4), (128, 8)):
        nrows = -(-experts // c.vlen)
        row, err = vram_row(geo, base)
        err = first_err(err, err_if(row + U32(nrows - 1) >= U32(c.vector_sram_size), Err.VRAM_RANGE))
        logits = bits_to_f32(read_rows_bits(geo, st.vram, row, nrows)).reshape(-1)[:experts]
        top, w = _topk(logits, k)
        pad = TOPK_MAX - k
        results.append((jnp.pad(top, (0, pad)), jnp.pad(w, (0, pad)), k, experts))
        errs.append(err)
    p1 = f.rs3 == 1
    top = jnp.where(p1, results[1][0], results[0][0])
    w = jnp.where(p1, results[1][1], results[0][1])
    k = jnp.where(p1, 8, 4)
    slot = jnp.arange(TOPK_MAX)
    live = slot < k
    fidx, fe = sram_index(st.gp[f.rd] + slot.astype(U32), Err.FPSRAM_RANGE)
    iidx, ie = sram_index(st.gp[f.rs2] + slot.astype(U32), Err.INTSRAM_RANGE)
    fe = jnp.max(jnp.where(live, fe, 0))
    ie = jnp.max(jnp.where(live, ie, 0))
    e = no_effect(geo, st)
    return e._replace(
        fps_idx=jnp.where(live, fidx, 1024), fps_val=to_fp_bits(w, geo),
        ints_idx=jnp.where(live, iidx, 1024), ints_val=top.astype(U32),
        topk_e=jnp.where(p1, 128, 32),
        err=first_err(err_if(f.rs3 > 1, Err.TOPK_POLICY), jnp.where(p1, errs[1], errs[0]), ie, fe))
