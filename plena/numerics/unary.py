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
import numpy as np

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
