"""Decoding PLENA minifloat codes to float32 (spec §2.9(a), quirk §7.18).

The reference emulator decodes every element through its generic ``FpType::cast(src -> f32)``.
For a source type with ``e`` exponent bits, ``M`` mantissa bits and ``bias = 2**(e-1) - 1``:

* the sign bit (if the type has one) is copied;
* exponent field all ones: ``±inf`` when the mantissa is 0, else NaN (the mantissa is shifted
  into the top of the f32 mantissa, so the NaN payload is kept);
* exponent 0, mantissa 0: ``±0``;
* exponent 0, mantissa ``m != 0`` (subnormal):

  - ``e < 8`` (the cast *widens* the exponent): the value is normalised with an effective
    exponent of ``-bias`` instead of IEEE's ``1 - bias``, i.e. ``m / 2**M * 2**-bias``, half the
    IEEE value (for e4m3: ``m * 2**-10``);
  - ``e == 8`` (bf16-like): it stays an f32 subnormal, i.e. the exact IEEE value;

* otherwise ``(1 + m / 2**M) * 2**(exp - bias)``, exact.

Types with more than 8 exponent bits would need a *narrowing* cast to f32, which is broken
upstream (§2.9(a)); they are rejected. Tables are built once per type (codes up to 16 bits wide)
and cached; :func:`decode` is a gather on that table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .formats import FloatType

__all__ = ["decode_table", "decode", "decode_np"]


def _check(dtype: FloatType) -> None:
    if not isinstance(dtype, FloatType):
        raise TypeError(f"decode_table needs a FloatType, got {dtype!r}")
    if dtype.exponent < 1:
        raise ValueError(f"{dtype}: a minifloat needs at least one exponent bit")
    if dtype.exponent > 8:
        raise NotImplementedError(
            f"{dtype}: more than 8 exponent bits needs a narrowing cast to f32, which the "
            "reference emulator gets wrong (spec §2.9(a)); not modelled")
    if dtype.width > 16:
        raise ValueError(f"{dtype}: decode tables are built for widths <= 16 bits")


@functools.lru_cache(maxsize=None)
def decode_table(dtype: FloatType) -> np.ndarray:
    """float32[2**width]: the f32 value the reference emulator decodes each code of ``dtype`` to.

    The returned array is cached and read-only.
    """
    _check(dtype)
    e_bits, m_bits = dtype.exponent, dtype.mantissa
    bias = dtype.bias
    codes = np.arange(1 << dtype.width, dtype=np.int64)
    mant = codes & ((1 << m_bits) - 1)
    expo = (codes >> m_bits) & ((1 << e_bits) - 1)
    neg = ((codes >> (e_bits + m_bits)) & 1).astype(bool) if dtype.sign else np.zeros_like(codes, bool)

    # Finite values in float64 (exact: at most 16 significant bits, exponent within f32 range).
    frac = mant.astype(np.float64) / float(1 << m_bits)
    normal = np.ldexp(1.0 + frac, (expo - bias).astype(np.int32))
    sub_exp = -bias if e_bits < 8 else 1 - bias  # the §2.9(a) quirk for widening casts
    subnormal = np.ldexp(frac, np.full(codes.shape, sub_exp, np.int32))
    mag = np.where(expo == 0, subnormal, normal)
    with np.errstate(over="ignore"):  # the all-ones-exponent rows are replaced below
        val = np.where(neg, -mag, mag).astype(np.float32)  # exact: representable in f32
    bits = val.view(np.uint32).copy()

    # Exponent all ones: inf / NaN with the mantissa shifted into the f32 mantissa.
    special = expo == (1 << e_bits) - 1
    spec_bits = (np.where(neg, 0x80000000, 0) | 0x7F800000 | (mant << (23 - m_bits))).astype(np.uint32)
    bits = np.where(special, spec_bits, bits).astype(np.uint32)
    table = bits.view(np.float32)
    table.setflags(write=False)
    return table


def _mask(dtype: FloatType) -> int:
    return (1 << dtype.width) - 1


@functools.partial(jax.jit, static_argnames="dtype")
def decode(codes, dtype: FloatType) -> jnp.ndarray:
    """Decode integer codes of ``dtype`` to float32 (jnp gather on :func:`decode_table`).

    Only the low ``dtype.width`` bits of each code are used.
    """
    table = jnp.asarray(decode_table(dtype))
    idx = jnp.asarray(codes).astype(jnp.int32) & jnp.int32(_mask(dtype))
    return table[idx]


def decode_np(codes, dtype: FloatType) -> np.ndarray:
    """numpy twin of :func:`decode`."""
    idx = np.asarray(codes).astype(np.int64) & _mask(dtype)
    return decode_table(dtype)[idx]
