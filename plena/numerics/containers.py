"""Containers: the bits in which a memory holds the values of its number format.

VRAM rows (VECTOR_SRAM_TYPE) and the fp registers / FP SRAM (SCALAR_FP) hold

* **bf16 bits** (``uint16``) when every value of the type is a bf16 value
  (:func:`plena.numerics.codec.subset_of_bf16`: float types with exponent <= 8 and
  mantissa <= 7, integers of <= 8 bits). This is the reference machine's container, and the
  default (bf16) path.
* **f32 bits** (``uint32``) otherwise ("wide" types: e.g. fp16 e5m10, fp32 e8m23, e6m9,
  Int16), the values rounded to the type (RNE, :func:`plena.numerics.codec.round_to`), which
  f32 holds exactly for float types with exponent <= 8 and mantissa <= 23 and integers of at
  most 24 bits. Wider types (e9m22, e5m26, Int32 ...) are held as their values rounded to f32
  (RNE, ±inf beyond f32's range): the machine's datapath is f32, as in the reference.

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
    """Why a memory cannot hold type ``t`` (None if it can). Every type of the codec can be held;
    a type f32 does not hold exactly (:func:`plena.numerics.codec.f32_holds`: Int > 24 bits,
    Fp with > 8 exponent or > 23 mantissa bits) is held as its values rounded to f32, the
    precision of the f32 datapath (docs/formats.md)."""
    from .codec import check_scalar_type
    if isinstance(t, IntType) and not ints:
        return "an integer type is not allowed here"
    try:
        check_scalar_type(t)
    except (NotImplementedError, TypeError, ValueError) as e:
        return str(e)
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
