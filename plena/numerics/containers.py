"""Containers: the bits in which a memory holds the values of its number format.

VRAM rows (VECTOR_SRAM_TYPE) and the fp registers / FP SRAM (SCALAR_FP) hold

* **bf16 bits** (``uint16``) when every value of the type is a bf16 value
  (:func:`plena.numerics.codec.subset_of_bf16`: float types with exponent <= 8 and
  mantissa <= 7, integers of <= 8 bits). This is the reference machine's container, and the
  default (bf16) path.
* **f32 bits** (``uint32``) otherwise ("wide" types: e.g. fp16 e5m10, fp32 e8m23, e6m9,
  Int16), the values rounded to the type (RNE, :func:`plena.numerics.codec.round_to`), which
  f32 holds exactly for float types with exponent <= 8 and mantissa <= 23 and integers of at
  most 24 bits.

The choice is static (made from the config), so the default machine is unchanged. The reader
functions dispatch on the dtype of the bits they are given, so code that reads a container
needs no configuration.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .bf16 import bf16_bits_to_f32, bf16_bits_to_f32_np, f32_from_bits, f32_from_bits_np
from .formats import DataType, FloatType, IntType

__all__ = ["is_bf16", "is_wide", "container_dtype", "bits_to_f32", "bits_to_f32_np",
           "container_problem"]


def is_bf16(t) -> bool:
    """Whether ``t`` is bf16 itself (sign, 8 exponent, 7 mantissa bits)."""
    return isinstance(t, FloatType) and (t.sign, t.exponent, t.mantissa) == (True, 8, 7)


def is_wide(t: DataType) -> bool:
    """Whether values of ``t`` need the f32 container (some value is not a bf16 value)."""
    from .codec import subset_of_bf16
    return not subset_of_bf16(t)


def container_dtype(t: DataType):
    """numpy dtype of the container of type ``t``: ``uint16`` (bf16 bits) or ``uint32`` (f32)."""
    return np.dtype(np.uint32) if is_wide(t) else np.dtype(np.uint16)


def container_problem(t: DataType, *, ints: bool = True) -> str | None:
    """Why a memory cannot hold type ``t`` in either container (None if it can)."""
    if isinstance(t, IntType):
        if not ints:
            return "an integer type is not allowed here"
        return None if 1 <= t.width <= 24 else "integer types of at most 24 bits (exact in f32)"
    if not isinstance(t, FloatType):
        return f"unknown data type {t!r}"
    if not (1 <= t.exponent <= 8 and t.mantissa <= 23):
        return "float types need 1..8 exponent and at most 23 mantissa bits (values held in f32)"
    return None


def bits_to_f32(bits) -> jnp.ndarray:
    """f32 values of container bits (jnp): bf16 bits for ``uint16``, f32 bits for ``uint32``."""
    bits = jnp.asarray(bits)
    if bits.dtype == jnp.uint16:
        return bf16_bits_to_f32(bits)
    return f32_from_bits(bits.astype(jnp.uint32))


def bits_to_f32_np(bits) -> np.ndarray:
    """numpy twin of :func:`bits_to_f32`."""
    bits = np.asarray(bits)
    if bits.dtype == np.uint16:
        return bf16_bits_to_f32_np(bits)
    return f32_from_bits_np(bits.astype(np.uint32))
