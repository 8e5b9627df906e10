"""MX (shared-scale microscaling) decode and the hardware MX encoder (spec §2.9(c), §2.9(d)).

Decode (HBM -> SRAM, §2.9(c)): ``value[i] = f32(elem[i] * scale[i // block])``, one f32 multiply.

Encode (SRAM -> HBM, H_STORE_V, §2.9(d)), per block of ``block`` consecutive f32 values ``x``:

1. ``max_abs`` = f32 max of ``|x|`` starting from 0.0; NaNs are ignored.
2. ``max_abs == 0`` -> scale code 0 and all element codes 0.
3. ``e = floor(log2_f32(max_abs + 1e-9f))`` clamped to ``[-sbias, sbias]`` (sbias = 127 for
   e8m0; ``max_abs = inf`` gives 127); scale code ``e + sbias``.
4. ``q = f32(x / 2**e)``, then each element ``minifloat_hw(q)``: ``q == 0`` -> 0;
   ``raw = floor(log2_f32(|q| + 1e-9f))``, ``overflow = raw > emax``, ``E = clamp(raw, -bias,
   emax)``, ``m = |q| / 2**E``; ``k = hwround((m - 1) * 2**M)`` if ``E != -bias`` else
   ``hwround(m * 2**M)``; ``k = clamp(k, 0, 2**M - 1)``, ``k = 2**M - 1`` on overflow;
   ``code = s << (e+M) | (E + bias) << M | k``. NaN -> the code of +1.0, +inf -> max code.

Bit-exactness notes (all verified by the tests):

* Everything that could meet an f32 subnormal is done with integer operations on the bit
  patterns (``ldexp_f32``, the NaN-aware block max, the zero tests): XLA on CPU runs with
  flush-to-zero / denormals-are-zero, the reference does not.
* ``floor(log2_f32(v))`` is computed without any transcendental: it is the binary exponent of
  ``v``, plus one when ``v`` lies so close below a power of two ``2**n`` that the correctly
  rounded f32 ``log2(v)`` is the integer ``n`` itself (a per-``n`` mantissa threshold, computed
  once with 60-digit decimal arithmetic). glibc's ``log2f`` (what Rust's ``f32::log2`` calls)
  assembles ``k + log2(z)`` in double precision, so it is correctly rounded there too. This never
  triggers for bf16-valued inputs of magnitude >= 2**-22 (the H_STORE_V case), only for f32
  values within a few ulps (up to 88, for |n| >= 128) below a power of two.
* ``hwround`` follows the Rust code, including a case the spec's integer description does not
  cover: when ``y = (m - 1) * 2**M`` is slightly negative (``m`` just below 1, which happens
  only after the ``log2`` rounding above), the reference's unsigned saturating casts give
  ``k = 1`` for ``floor(4y) % 4 == 3`` (e.g. ``y = -1e-6``), not 0.
* ``1e-9f`` is ``float32(1e-9)``; the sum ``|q| + 1e-9f`` is one f32 add.

HBM images written by the upstream Python toolchain (PLENA_Tools' torch quantizer, used for
the conformance corpus's ``hbm.bin``) differ from this encoder in exactly three ways, all
reproduced byte for byte by ``tests/test_numerics_mx.py``: (1) an all-zero block gets scale
byte 97 (2**-30 = floor(log2(0 + 1e-9))), not 0; (2) a negative value whose code has a zero
magnitude is written 0x00, where the hardware writes 0x80 (-0.0); (3) tensors that were bf16 in
torch are quantised with bf16 arithmetic, so log2 is rounded to bf16 and a block max or an
element within ~0.5 % below a power of two takes the next exponent (0.2490234375 -> 0x28,
not the hardware's 0x27). It also clamps the shared exponent to [-128, 127] (never reached).
Rows of a tensor region beyond its input are plain zero bytes (scale 0).

Element types: any signed ``FloatType`` with at most 8 bits (one code per ``uint8``; the
reference's byte packing for sub-byte types is broken, §2.9(d)5, but the codes are computed the
same way). Scale types: unsigned 8-exponent-bit, 0-mantissa types (e8m0), because the reference
writes the scale through the generic cast of ``2**(e + sbias - 127)``, which is only correct
for an 8-bit exponent field. Other combinations raise ``NotImplementedError``. Only MXFP8
(e4m3 / e8m0 / block 8) is exercised by the reference toolchain.
"""

from __future__ import annotations

import decimal
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .bf16 import f32_bits, f32_bits_np, f32_from_bits, f32_from_bits_np
from .formats import FloatType, MxFormat
from .minifloat import decode_table
from . import ieee

__all__ = [
    "mx_decode",
    "mx_decode_np",
    "mx_encode",
    "mx_encode_np",
    "minifloat_hw",
    "minifloat_hw_np",
    "ldexp_f32",
    "ldexp_f32_np",
    "floor_log2_f32",
    "floor_log2_f32_np",
    "EPS_F32",
]

EPS_F32 = np.float32(1e-9)
"""The ``1e-9`` the hardware encoder adds before ``log2`` (as an f32: 0x3089705F)."""

_BIG = 1 << 20  # stands for floor(log2(inf)) (Rust saturates it to i32::MAX; only "> max" matters)
_THR_LO = -148  # smallest n = exponent + 1 for a (normalised) f32 subnormal


# ---------------------------------------------------------------------------------------------
# array-namespace helpers (xp is numpy or jax.numpy)
# ---------------------------------------------------------------------------------------------

def _bits(xp, x):
    return f32_bits(x) if xp is jnp else f32_bits_np(x)


def _float(xp, u):
    return f32_from_bits(u) if xp is jnp else f32_from_bits_np(u)


def _clz32(xp, u):
    """Leading zeros of uint32 values, as int32 (32 for 0)."""
    if xp is jnp:
        return lax.clz(u.astype(jnp.uint32)).astype(jnp.int32)
    _, ex = np.frexp(np.asarray(u, dtype=np.float64))  # exact for integers < 2**53
    return (32 - ex).astype(np.int32)


def _i32(xp, v):
    return xp.asarray(v, dtype=xp.int32)


def _u32(xp, v):
    return xp.asarray(v, dtype=xp.uint32)


def _normalise(xp, mag):
    """Split non-zero finite f32 magnitude bits into (24-bit significand with bit 23 set,
    biased exponent), normalising subnormals (whose biased exponent then drops below 1)."""
    ef = (mag >> _u32(xp, 23)).astype(xp.int32)
    mant = mag & _u32(xp, 0x7FFFFF)
    sub = ef == 0
    lz = xp.clip(_clz32(xp, mant) - 8, 0, 31)
    sig = xp.where(sub, mant << lz.astype(xp.uint32), mant | _u32(xp, 0x800000))
    e = xp.where(sub, 1 - lz, ef)
    return sig, e


# ---------------------------------------------------------------------------------------------
# exact ldexp on f32 bits
# ---------------------------------------------------------------------------------------------

def _ldexp_bits(xp, bits, k):
    """Bits of f32(x * 2**k): exact, RNE on underflow (gradual), ±inf on overflow.

    ±0, ±inf and NaN pass through unchanged."""
    k = xp.clip(xp.asarray(k).astype(xp.int32), -1000, 1000)
    sign = bits & _u32(xp, 0x80000000)
    mag = bits & _u32(xp, 0x7FFFFFFF)
    special = (mag == 0) | (mag >= _u32(xp, 0x7F800000))
    sig, e = _normalise(xp, xp.where(special, _u32(xp, 0x3F800000), mag))
    ne = e + k
    normal = (ne << 23).astype(xp.uint32) | (sig & _u32(xp, 0x7FFFFF))
    # gradual underflow: keep sig >> (1 - ne), rounded to nearest even
    s = xp.clip(1 - ne, 1, 25).astype(xp.uint32)
    q = sig >> s
    rem = sig & ((_u32(xp, 1) << s) - _u32(xp, 1))
    half = _u32(xp, 1) << (s - _u32(xp, 1))
    up = (rem > half) | ((rem == half) & ((q & _u32(xp, 1)) == 1))
    tiny = q + up.astype(xp.uint32)  # q + 1 == 2**23 is the smallest normal: still correct bits
    out = xp.where(ne >= 255, _u32(xp, 0x7F800000), xp.where(ne >= 1, normal, tiny))
    return xp.where(special, bits, sign | out).astype(xp.uint32)


@jax.jit
def ldexp_f32(x, k) -> jnp.ndarray:
    """``f32(x * 2**k)`` computed exactly on the bits (no FTZ): RNE underflow, ±inf overflow."""
    return f32_from_bits(_ldexp_bits(jnp, f32_bits(x), jnp.asarray(k)))


def ldexp_f32_np(x, k) -> np.ndarray:
    """numpy twin of :func:`ldexp_f32`."""
    return f32_from_bits_np(_ldexp_bits(np, f32_bits_np(x), np.asarray(k)))


# ---------------------------------------------------------------------------------------------
# floor(log2_f32(v))
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _log2_round_up_thresholds() -> np.ndarray:
    """thr[n - _THR_LO]: the smallest 23-bit mantissa f for which the correctly rounded f32
    log2 of ``(1 + f/2**23) * 2**(n-1)`` equals ``n`` (2**23 if none does)."""
    ctx = decimal.Context(prec=60)
    ln2 = ctx.ln(decimal.Decimal(2))
    out = []
    for n in range(_THR_LO, 129):
        if n == 0:
            out.append(1 << 23)  # log2 in [-1, 0): f32 resolves it down to 2**-149
            continue
        # j: binade of the f32 neighbour of n on the side of log2(v) (below n, towards -inf)
        j = ((n - 1).bit_length() - 1 if n >= 2 else -1) if n > 0 else (-n).bit_length() - 1
        half_gap = ctx.power(decimal.Decimal(2), j - 24)
        # RN(log2 v) == n  <=>  log2(1 + f/2**23) >= 1 - half_gap (no ties: log2 is irrational)
        r = ctx.multiply(decimal.Decimal(1 << 23),
                         ctx.subtract(ctx.exp(ctx.multiply(ctx.subtract(1, half_gap), ln2)), 1))
        out.append(min(int(r) + 1, 1 << 23))
    return np.asarray(out, dtype=np.int32)


def _floor_log2_bits(xp, bits):
    """floor(RN_f32(log2(v))) for f32 bits of v >= 0, as int32.

    v = +inf -> a large positive number; NaN -> 0 (Rust's ``NaN as i32``); v = 0 -> a large
    negative number (never used by the encoder)."""
    mag = bits & _u32(xp, 0x7FFFFFFF)
    is_nan = mag > _u32(xp, 0x7F800000)
    is_inf = mag == _u32(xp, 0x7F800000)
    is_zero = mag == 0
    sig, e = _normalise(xp, xp.where(is_nan | is_inf | is_zero, _u32(xp, 0x3F800000), mag))
    n0 = e - 127
    f = (sig & _u32(xp, 0x7FFFFF)).astype(xp.int32)
    thr = xp.asarray(_log2_round_up_thresholds())[xp.clip(n0 + 1 - _THR_LO, 0, 128 - _THR_LO)]
    r = n0 + (f >= thr).astype(xp.int32)
    r = xp.where(is_nan, 0, r)
    r = xp.where(is_inf, _BIG, r)
    return xp.where(is_zero, -_BIG, r).astype(xp.int32)


@jax.jit
def floor_log2_f32(v) -> jnp.ndarray:
    """``floor(log2_f32(v))`` as int32 for f32 ``v >= 0`` (log2 correctly rounded to f32).

    inf -> 2**20 (the reference saturates to i32::MAX), NaN -> 0, 0 -> -2**20."""
    return _floor_log2_bits(jnp, f32_bits(v))


def floor_log2_f32_np(v) -> np.ndarray:
    """numpy twin of :func:`floor_log2_f32`."""
    return _floor_log2_bits(np, f32_bits_np(v))


# ---------------------------------------------------------------------------------------------
# format checks
# ---------------------------------------------------------------------------------------------

def _check_encode_format(fmt: MxFormat) -> None:
    if not isinstance(fmt, MxFormat):
        raise TypeError(f"expected an MxFormat, got {fmt!r}")
    sc = fmt.scale
    _check_elem(fmt.elem)
    if not (isinstance(sc, FloatType) and not sc.sign and sc.exponent == 8 and sc.mantissa == 0):
        raise NotImplementedError(
            f"MX encode of {fmt}: only an unsigned 8-exponent-bit scale (e8m0) is modelled here "
            "(plena.numerics.codec.mx_encode takes other eKm0 scales)")
    if fmt.block < 1:
        raise ValueError(f"{fmt}: block must be positive")


def _split_blocks(xp, x, block):
    n = x.shape[-1] if x.ndim else 0
    if x.ndim == 0 or n % block:
        raise ValueError(f"last axis ({n}) must be a positive multiple of the block size {block}")
    return x.reshape(x.shape[:-1] + (n // block, block))


# ---------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------

def _minifloat_hw(xp, qbits, el: FloatType):
    """Element codes (uint32) of the hardware minifloat quantiser for f32 bits ``qbits``."""
    e_bits, m_bits = el.exponent, el.mantissa
    bias = el.bias
    emax = (1 << e_bits) - 2 - bias
    kmax = (1 << m_bits) - 1
    mag = qbits & _u32(xp, 0x7FFFFFFF)
    is_zero = mag == 0
    is_nan = mag > _u32(xp, 0x7F800000)
    neg = ((qbits >> _u32(xp, 31)) == 1) & ~is_nan  # Rust: value < 0.0 (false for NaN)
    a = _float(xp, mag)
    v = (a + EPS_F32).astype(xp.float32)  # one f32 add; FTZ cannot change it (v >= 1e-9)
    raw = _floor_log2_bits(xp, _bits(xp, v))
    overflow = raw > emax
    E = xp.clip(raw, -bias, emax)
    m = _float(xp, _ldexp_bits(xp, mag, -E))  # exact: |q| / 2**E
    is_normal = E != -bias
    scale = np.float32(1 << m_bits)
    y = xp.where(is_normal, (m - np.float32(1.0)) * scale, m * scale)
    lim = np.float32(4 << m_bits)
    y = xp.clip(xp.where(is_nan, np.float32(0.0), y), -lim, lim)  # hwround is monotone
    t = xp.floor(y * np.float32(4.0)).astype(xp.int32)  # exact integer
    base = xp.maximum(t >> 2, 0)  # Rust: `floor as u32` saturates negatives to 0
    r = t & 3
    k = base + (r == 3).astype(xp.int32) + ((r == 2) & ((base & 1) == 1)).astype(xp.int32)
    k = xp.clip(k, 0, kmax)
    k = xp.where(overflow, kmax, k)
    code = (neg.astype(xp.int32) << (e_bits + m_bits)) | ((E + bias) << m_bits) | k
    return xp.where(is_zero, 0, code).astype(xp.uint32)


def _check_elem(el) -> None:
    if not (isinstance(el, FloatType) and el.sign and 1 <= el.exponent <= 7 and el.width <= 16):
        raise NotImplementedError(
            f"hardware minifloat quantiser for {el}: only signed FP types of at most 16 bits "
            "with at most 7 exponent bits are modelled (MXFP8's e4m3 is the one in use)")


def _code_dtype(xp, el):
    return xp.uint8 if el.width <= 8 else xp.uint16


@functools.partial(jax.jit, static_argnames="elem")
def minifloat_hw(q, elem: FloatType) -> jnp.ndarray:
    """Step 4 of §2.9(d) alone: the hardware minifloat code (uint8) of each already-scaled f32
    ``q`` (e4m3: 1.0625 -> 0x38, 0.01 -> 0x07, 300 -> 0x77, NaN -> 0x38, -0.0 -> 0x00)."""
    _check_elem(elem)
    return _minifloat_hw(jnp, f32_bits(q), elem).astype(_code_dtype(jnp, elem))


def minifloat_hw_np(q, elem: FloatType) -> np.ndarray:
    """numpy twin of :func:`minifloat_hw`."""
    _check_elem(elem)
    with np.errstate(all="ignore"):
        return _minifloat_hw(np, f32_bits_np(q), elem).astype(_code_dtype(np, elem))


def _mx_encode(xp, x, fmt: MxFormat, check: bool = True):
    if check:
        _check_encode_format(fmt)
    sbias = fmt.scale.bias
    xb = _split_blocks(xp, xp.asarray(x, dtype=xp.float32), fmt.block)
    bits = _bits(xp, xb)
    mag = bits & _u32(xp, 0x7FFFFFFF)
    mag = xp.where(mag > _u32(xp, 0x7F800000), _u32(xp, 0), mag)  # NaNs ignored by the max
    max_bits = xp.max(mag, axis=-1)  # f32 order == uint32 order for non-negative values
    zero_block = max_bits == 0
    v = (_float(xp, max_bits) + EPS_F32).astype(xp.float32)
    e = xp.clip(_floor_log2_bits(xp, _bits(xp, v)), -sbias, sbias)
    scale_codes = xp.where(zero_block, 0, e + sbias).astype(xp.uint8)
    q = _ldexp_bits(xp, bits, -e[..., None])
    codes = _minifloat_hw(xp, q, fmt.elem)
    codes = xp.where(zero_block[..., None], _u32(xp, 0), codes).astype(_code_dtype(xp, fmt.elem))
    return codes.reshape(codes.shape[:-2] + (-1,)), scale_codes


@functools.partial(jax.jit, static_argnames="fmt")
def mx_encode(x, fmt: MxFormat):
    """The reference's hardware MX encoder (spec §2.9(d)) along the last axis of ``x``.

    Returns ``(elem_codes uint8[..., n], scale_codes uint8[..., n // block])``. ``n`` must be a
    multiple of ``fmt.block``. jit/vmap-able (``fmt`` is static).
    """
    return _mx_encode(jnp, x, fmt)


def mx_encode_np(x, fmt: MxFormat):
    """numpy twin of :func:`mx_encode`."""
    with np.errstate(all="ignore"):
        return _mx_encode(np, x, fmt)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------

def _mx_decode(xp, elem_codes, scale_codes, fmt: MxFormat):
    if not isinstance(fmt, MxFormat):
        raise TypeError(f"expected an MxFormat, got {fmt!r}")
    if not isinstance(fmt.elem, FloatType) or not isinstance(fmt.scale, FloatType):
        raise NotImplementedError(f"MX decode of {fmt}: only FP element and scale types")
    et = xp.asarray(decode_table(fmt.elem))
    st = xp.asarray(decode_table(fmt.scale))
    ec = xp.asarray(elem_codes).astype(xp.int32) & ((1 << fmt.elem.width) - 1)
    sc = xp.asarray(scale_codes).astype(xp.int32) & ((1 << fmt.scale.width) - 1)
    eb = _split_blocks(xp, ec, fmt.block)
    if sc.shape != eb.shape[:-1]:
        raise ValueError(f"scale codes {sc.shape} do not match {eb.shape[:-1]} blocks")
    out = _apply_scale(xp, et[eb], st[sc][..., None])
    return out.reshape(out.shape[:-2] + (-1,))


def _apply_scale(xp, elem, scale):
    """IEEE f32 ``elem * scale`` (broadcasting) without FTZ/DAZ: numpy's multiply keeps
    subnormals; jnp goes through :func:`plena.numerics.ieee.mul` (an exact float64 product
    rounded once, so power-of-two scales need no path of their own)."""
    if xp is jnp:
        return ieee.mul(elem, scale)
    return (elem * scale).astype(np.float32)


def apply_scale(elem, scale) -> jnp.ndarray:
    """``f32(elem * scale)`` as MX decode forms it (jnp; subnormal products kept)."""
    return _apply_scale(jnp, jnp.asarray(elem, jnp.float32), jnp.asarray(scale, jnp.float32))


@functools.partial(jax.jit, static_argnames="fmt")
def mx_decode(elem_codes, scale_codes, fmt: MxFormat) -> jnp.ndarray:
    """MX decode (spec §2.9(c)): ``f32(decode(elem[..., i]) * decode(scale[..., i // block]))``.

    ``elem_codes``: integer[..., n]; ``scale_codes``: integer[..., n // block]. Power-of-two
    scales (every e8m0 code but 0 and 255) are applied exactly on the bits, so f32-subnormal
    results are rounded as IEEE does, not flushed.
    """
    return _mx_decode(jnp, elem_codes, scale_codes, fmt)


def mx_decode_np(elem_codes, scale_codes, fmt: MxFormat) -> np.ndarray:
    """numpy twin of :func:`mx_decode`."""
    with np.errstate(all="ignore"):
        return _mx_decode(np, elem_codes, scale_codes, fmt)
