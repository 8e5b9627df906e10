"""Unary functions of a bf16 operand, tabulated over all 65,536 bf16 inputs.

Every operand of V_EXP_V / V_RECI_V / S_EXP_FP / S_RECI_FP / S_SQRT_FP is a bf16 value (VRAM
rows and fp registers hold bf16), so a 65,536-entry f32 table is exact by construction and
independent of the backend's transcendental implementation and of XLA:CPU's flush-to-zero of
subnormals. Values follow spec §8: exp is evaluated in float64 after clamping to [-88, 88] and
rounded once to f32 (bit-exact with the reference after the bf16 rounding); reciprocal and
square root are IEEE f32 operations.

Operands held in the wide (f32) container (VECTOR_SRAM_TYPE / SCALAR_FP not a subset of bf16,
:mod:`plena.numerics.containers`) cannot be tabulated: :func:`apply_f32` evaluates the same
functions in f32 with XLA (reciprocal and square root IEEE, exp XLA's f32 exp, which is not
always correctly rounded; the golden model uses the same function, so emulator and golden
agree bit for bit).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from . import ieee
from .mx import _ldexp_bits  # exact scaling on the bits

EXP_CLAMP = 88.0


def _bf16_inputs() -> np.ndarray:
    return (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)


@functools.lru_cache(maxsize=None)
def table(name: str) -> np.ndarray:
    """f32[65536] table of `name` in {"exp", "reci", "sqrt", "clamp"} indexed by bf16 bits."""
    x = _bf16_inputs()
    with np.errstate(all="ignore"):
        if name == "clamp":
            out = np.clip(x, -EXP_CLAMP, EXP_CLAMP)  # NaN stays NaN
        elif name == "exp":
            out = np.exp(np.clip(x, -EXP_CLAMP, EXP_CLAMP).astype(np.float64)).astype(np.float32)
        elif name == "reci":
            out = np.float32(1.0) / x
        elif name == "sqrt":
            out = np.sqrt(x)
        else:
            raise KeyError(name)
    out = np.asarray(out, np.float32)
    out.setflags(write=False)
    return out


def apply(name: str, bits) -> jnp.ndarray:
    """f32 result of `name` for bf16 operands given as uint16 bits (jit-able gather)."""
    return jnp.asarray(table(name))[jnp.asarray(bits).astype(jnp.int32)]


def apply_f32(name: str, x) -> jnp.ndarray:
    """f32 result of `name` for f32 operands (the wide containers; jit-able, differentiable)."""
    x = jnp.asarray(x, jnp.float32)
    if name == "clamp":
        return jnp.clip(x, -EXP_CLAMP, EXP_CLAMP)
    if name == "exp":
        return jnp.exp(jnp.clip(x, -EXP_CLAMP, EXP_CLAMP))
    if name == "reci":
        return jnp.float32(1.0) / x
    if name == "sqrt":
        return jnp.sqrt(x)
    raise KeyError(name)


def apply_bits(name: str, bits) -> jnp.ndarray:
    """f32 result of `name` for container bits: the table for bf16 bits (``uint16``),
    :func:`apply_f32` for f32 bits (``uint32``)."""
    bits = jnp.asarray(bits)
    if bits.dtype == jnp.uint16:
        return apply(name, bits)
    return apply_f32(name, jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32))


# ---------------------------------------------------------------------------------------------
# exp of an f32 argument (V_TOPK), without float64
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _exp_parts_table() -> np.ndarray:
    """[65536, 3] f32 table over bf16 bits b (value x, |x| < 2**15; others unused):
    ``exp(x) = 2**k * (hi + lo)`` with ``hi`` in [1, 2), ``lo`` the f32 remainder, ``k`` stored as
    f32 (an integer). Evaluated in extended precision (numpy longdouble), ~2**-60 relative."""
    with np.errstate(invalid="ignore"):
        x = _bf16_inputs().astype(np.longdouble)
    ok = np.isfinite(x) & (np.abs(x) < 2 ** 15)
    x = np.where(ok, x, 0)
    ln2 = np.log(np.longdouble(2))
    k = np.floor(x / ln2)
    m = np.exp(x - k * ln2)  # in [1, 2) up to rounding at the ends
    adj = np.where(m >= 2, 1, np.where(m < 1, -1, 0))
    k, m = k + adj, m / np.exp2(np.longdouble(1) * adj)
    hi = m.astype(np.float32)
    lo = (m - hi.astype(np.longdouble)).astype(np.float32)
    out = np.stack([hi, lo, k.astype(np.float32)], axis=-1)
    out.setflags(write=False)
    return out


def _two_prod(a, b):
    p = a * b
    c = np.float32(4097.0)
    ah = a * c - (a * c - a)
    bh = b * c - (b * c - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _mul_pairs(x, y):
    """(hi, lo) * (hi, lo) in double-f32 (about 2**-44 relative), renormalised."""
    p, e = _two_prod(x[0], y[0])
    e = e + (x[0] * y[1] + x[1] * y[0])
    s = p + e
    return s, e - (s - p)


@jax.custom_jvp
def exp_f32(d) -> jnp.ndarray:
    """``expf(d)`` for f32 ``d``, correctly rounded to f32 except within ~2**-40 of a rounding
    midpoint (what spec §8 recommends: the float64 value rounded once). ``d`` is split exactly
    into three bf16 pieces whose exps come from an extended-precision table and are multiplied
    in double-f32 arithmetic; the power of two is applied on the bits (gradual underflow, no
    FTZ). NaN -> NaN, ``d > 88.8`` -> inf, ``d < -104`` -> 0. jit-able, no float64."""
    d = jnp.asarray(d, jnp.float32)
    bits = lax.bitcast_convert_type(d, jnp.uint32)
    part1 = bits & np.uint32(0xFFFF0000)  # bf16 truncations: d = p1 + p2 + p3 exactly
    r1 = d - lax.bitcast_convert_type(part1, jnp.float32)
    part2 = lax.bitcast_convert_type(r1, jnp.uint32) & np.uint32(0xFFFF0000)
    r2 = r1 - lax.bitcast_convert_type(part2, jnp.float32)  # exact, fits bf16
    part3 = lax.bitcast_convert_type(r2, jnp.uint32)
    tab = jnp.asarray(_exp_parts_table())
    e1, e2, e3 = (tab[(p >> np.uint32(16)).astype(jnp.int32)] for p in (part1, part2, part3))
    hi, lo = _mul_pairs(_mul_pairs((e1[..., 0], e1[..., 1]), (e2[..., 0], e2[..., 1])), (e3[..., 0], e3[..., 1]))
    r = hi + lo  # the f32 rounding of the double-f32 value (in [1, 8))
    k = (e1[..., 2] + e2[..., 2] + e3[..., 2]).astype(jnp.int32)
    out = lax.bitcast_convert_type(_ldexp_bits(jnp, lax.bitcast_convert_type(r, jnp.uint32), k), jnp.float32)
    # f32-subnormal results: round the pair itself on the 2**-149 grid (one rounding, not two)
    g = jnp.clip(k + 149, -30, 30)  # value / 2**-149 = (hi + lo) * 2**g
    scale = lax.bitcast_convert_type(((g + 127) << 23).astype(jnp.uint32), jnp.float32)
    hs, ls = hi * scale, lo * scale  # exact (powers of two, normal range)
    fl = jnp.floor(hs)
    frac = (hs - fl) + ls
    odd = (fl.astype(jnp.uint32) & np.uint32(1)) == 1
    q = fl.astype(jnp.uint32) + ((frac > 0.5) | ((frac == 0.5) & odd)).astype(jnp.uint32)
    sub = lax.bitcast_convert_type(q, jnp.float32)  # q <= 2**23: subnormal (or min normal) bits
    r_exp = (lax.bitcast_convert_type(r, jnp.uint32) >> np.uint32(23)).astype(jnp.int32) - 127
    out = jnp.where(k + r_exp < -126, sub, out)  # (hi + lo) * 2**k below 2**-126
    out = jnp.where(d < -104.0, 0.0, jnp.where(d > 88.8, jnp.inf, out))
    return jnp.where(jnp.isnan(d), d, out)


@exp_f32.defjvp
def _exp_f32_jvp(primals, tangents):
    y = exp_f32(primals[0])
    return y, y * jnp.asarray(tangents[0], jnp.float32)


def topk_weights(v) -> jnp.ndarray:
    """V_TOPK weights of the selected logits ``v[..., K]`` in rank order (spec §4.2):
    ``w_k = expf(v_k - v_0)`` in f32, ``den`` summed sequentially, ``w_k / den`` when ``den`` is
    finite and positive, else 0. IEEE f32 throughout (subnormals kept)."""
    v = jnp.asarray(v, jnp.float32)
    w = exp_f32(ieee.sub(v, v[..., :1]))
    den = w[..., 0]
    for i in range(1, v.shape[-1]):
        den = ieee.add(den, w[..., i])
    ok = jnp.isfinite(den) & (den > 0)
    safe = jnp.where(ok, den, 1.0)[..., None]
    # w <= den and den >= 1 here (w_0 = 1): only a tiny w can meet FTZ; scale it up by 2**64
    # (exact), divide, and scale back on the bits with RNE
    tiny = w < np.float32(2.0 ** -100)
    wbits = lax.bitcast_convert_type(w, jnp.uint32)
    w_up = lax.bitcast_convert_type(_ldexp_bits(jnp, wbits, jnp.int32(64)), jnp.float32)
    q_tiny = lax.bitcast_convert_type(
        _ldexp_bits(jnp, lax.bitcast_convert_type(w_up / safe, jnp.uint32), jnp.int32(-64)), jnp.float32)
    q = jnp.where(tiny, q_tiny, w / safe)
    return jnp.where(ok[..., None], q, 0.0)
