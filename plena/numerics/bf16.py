"""bfloat16 conversions used by the PLENA emulator (spec §2.1, §2.3, §2.4, §2.9(a)).

All conversions work on raw bit patterns (``uint32`` for f32, ``uint16`` for bf16/f16) with
integer arithmetic only, so they are independent of the platform's floating-point mode. This
matters: XLA on CPU flushes subnormal f32 operands and results to zero, so any float-arithmetic
formulation would break on subnormals.

Three rounding rules exist in the reference emulator:

* **VRAM / MRAM-dump cast** (``f32_to_bf16_bits``): the generic ``FpType::cast`` of spec §2.9(a).
  For every non-NaN input it is IEEE round-to-nearest-even (overflow gives ±inf, subnormals are
  rounded like any other value). For a NaN the 23-bit mantissa is itself rounded to 7 bits with
  RNE while the exponent stays all-ones; a carry out of the mantissa saturates to ±inf, and a
  mantissa that rounds to zero also reads as ±inf. So ``0x7FC00000 -> 0x7FC0`` but
  ``0x7F800001 -> 0x7F80`` and ``0x7FFFFFFF -> 0x7F80``.
* **FP-register cast** (``f32_to_bf16_bits_reg``): ``half::bf16::from_f32``. RNE for non-NaN;
  a NaN becomes ``(bits >> 16) | 0x0040`` (payload truncated, quiet bit forced).
* **FP SRAM preload** (``f16_bits_to_bf16_bits``): ``bf16::from_f32(f32::from(f16::from_bits(b)))``
  at the spec's simulator snapshot. f16 -> f32 is exact; for a NaN, ``half`` sets the f32 quiet
  bit and keeps the 10-bit payload in the top of the f32 mantissa, and the register rule above
  then keeps its top 6 bits. Net NaN rule: ``(sign << 15) | 0x7FC0 | (payload >> 3)``. Every
  non-NaN f16 value is RNE-rounded to bf16 (f16 has 3 more mantissa bits than bf16).

Every function has a ``jnp`` version (jit/vmap-able, accepts numpy or jax arrays) and a numpy
twin with the ``_np`` suffix for host-side file handling; both share one implementation that is
parameterised by the array namespace.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "f32_to_bf16_bits",
    "f32_to_bf16_bits_np",
    "f32_to_bf16_bits_reg",
    "f32_to_bf16_bits_reg_np",
    "bf16_bits_to_f32",
    "bf16_bits_to_f32_np",
    "f16_bits_to_bf16_bits",
    "f16_bits_to_bf16_bits_np",
    "f32_bits",
    "f32_bits_np",
    "f32_from_bits",
    "f32_from_bits_np",
]

_SIGN = 0x80000000
_ABS = 0x7FFFFFFF
_INF = 0x7F800000


# ---------------------------------------------------------------------------------------------
# bit views
# ---------------------------------------------------------------------------------------------

def f32_bits(x) -> jnp.ndarray:
    """The IEEE binary32 bit pattern of ``x`` (cast to float32 first) as ``uint32``."""
    return lax.bitcast_convert_type(jnp.asarray(x, dtype=jnp.float32), jnp.uint32)


def f32_bits_np(x) -> np.ndarray:
    """numpy twin of :func:`f32_bits`."""
    return np.asarray(x, dtype=np.float32).view(np.uint32)  # same item size: any layout works


def f32_from_bits(u) -> jnp.ndarray:
    """Reinterpret ``uint32`` bit patterns as float32 (no rounding, subnormals kept)."""
    return lax.bitcast_convert_type(jnp.asarray(u).astype(jnp.uint32), jnp.float32)


def f32_from_bits_np(u) -> np.ndarray:
    """numpy twin of :func:`f32_from_bits`."""
    return np.asarray(u).astype(np.uint32).view(np.float32)


# ---------------------------------------------------------------------------------------------
# shared integer kernels (xp is numpy or jax.numpy; `bits` is a uint32 array)
# ---------------------------------------------------------------------------------------------

def _u32(xp, v):
    return xp.asarray(v, dtype=xp.uint32)


def _rne_hi16(xp, bits):
    """Round a uint32 to its top 16 bits, ties to even. Valid (no wrap) for non-NaN f32 bits."""
    lsb = (bits >> _u32(xp, 16)) & _u32(xp, 1)
    return (bits + _u32(xp, 0x7FFF) + lsb) >> _u32(xp, 16)


def _is_nan_bits(xp, bits):
    return (bits & _u32(xp, _ABS)) > _u32(xp, _INF)


def _bf16_vram_kernel(xp, bits):
    rounded = _rne_hi16(xp, bits)
    # NaN: RNE the 23-bit mantissa to 7 bits; a carry (0x80) saturates to inf (mantissa 0).
    mant = bits & _u32(xp, 0x7FFFFF)
    mant7 = _rne_hi16(xp, mant)
    mant7 = xp.where(mant7 >= _u32(xp, 0x80), _u32(xp, 0), mant7)
    nan_out = ((bits >> _u32(xp, 16)) & _u32(xp, 0x8000)) | _u32(xp, 0x7F80) | mant7
    return xp.where(_is_nan_bits(xp, bits), nan_out, rounded).astype(xp.uint16)


def _bf16_reg_kernel(xp, bits):
    rounded = _rne_hi16(xp, bits)
    nan_out = (bits >> _u32(xp, 16)) | _u32(xp, 0x0040)
    return xp.where(_is_nan_bits(xp, bits), nan_out, rounded).astype(xp.uint16)


# ---------------------------------------------------------------------------------------------
# f32 -> bf16
# ---------------------------------------------------------------------------------------------

@jax.jit
def f32_to_bf16_bits(x) -> jnp.ndarray:
    """VRAM-write cast (spec §2.9(a)): f32 -> bf16 bits, RNE, with the NaN-payload rounding quirk.

    ``x`` is converted to float32 first (so a float64 input is rounded twice).
    """
    return _bf16_vram_kernel(jnp, f32_bits(x))


def f32_to_bf16_bits_np(x) -> np.ndarray:
    """numpy twin of :func:`f32_to_bf16_bits`."""
    return _bf16_vram_kernel(np, f32_bits_np(x))


@jax.jit
def f32_to_bf16_bits_reg(x) -> jnp.ndarray:
    """FP-register cast (``half::bf16::from_f32``): RNE; NaN -> ``(bits >> 16) | 0x0040``."""
    return _bf16_reg_kernel(jnp, f32_bits(x))


def f32_to_bf16_bits_reg_np(x) -> np.ndarray:
    """numpy twin of :func:`f32_to_bf16_bits_reg`."""
    return _bf16_reg_kernel(np, f32_bits_np(x))


# ---------------------------------------------------------------------------------------------
# bf16 -> f32 (exact)
# ---------------------------------------------------------------------------------------------

@jax.jit
def bf16_bits_to_f32(b) -> jnp.ndarray:
    """bf16 bits (any integer dtype; low 16 bits used) -> float32, exact (a 16-bit shift)."""
    u = (jnp.asarray(b).astype(jnp.uint32) & jnp.uint32(0xFFFF)) << jnp.uint32(16)
    return f32_from_bits(u)


def bf16_bits_to_f32_np(b) -> np.ndarray:
    """numpy twin of :func:`bf16_bits_to_f32`."""
    u = (np.asarray(b).astype(np.uint32) & np.uint32(0xFFFF)) << np.uint32(16)
    return f32_from_bits_np(u)


# ---------------------------------------------------------------------------------------------
# f16 -> bf16 (FP SRAM preload)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _f16_to_bf16_table() -> np.ndarray:
    """All 65,536 f16 codes -> bf16 bits (see module docstring for the NaN rule)."""
    codes = np.arange(1 << 16, dtype=np.uint32)
    as_f16 = codes.astype(np.uint16).view(np.float16)
    with np.errstate(invalid="ignore"):
        f32 = as_f16.astype(np.float32)  # exact for every non-NaN f16, subnormals included
    out = _bf16_reg_kernel(np, f32_bits_np(f32)).astype(np.uint32)
    is_nan = (codes & 0x7C00 == 0x7C00) & (codes & 0x03FF != 0)
    nan_out = ((codes & 0x8000) | 0x7FC0 | ((codes & 0x03FF) >> 3))
    out = np.where(is_nan, nan_out, out).astype(np.uint16)
    out.setflags(write=False)
    return out


@jax.jit
def f16_bits_to_bf16_bits(b) -> jnp.ndarray:
    """FP SRAM preload conversion (spec §2.3): IEEE f16 bits -> bf16 bits.

    f16 -> f32 is exact, then RNE to bf16; NaN -> ``(sign << 15) | 0x7FC0 | (payload >> 3)``.
    """
    idx = jnp.asarray(b).astype(jnp.uint32) & jnp.uint32(0xFFFF)
    return jnp.asarray(_f16_to_bf16_table())[idx.astype(jnp.int32)]


def f16_bits_to_bf16_bits_np(b) -> np.ndarray:
    """numpy twin of :func:`f16_bits_to_bf16_bits`."""
    idx = np.asarray(b).astype(np.uint32) & np.uint32(0xFFFF)
    return _f16_to_bf16_table()[idx.astype(np.intp)]
