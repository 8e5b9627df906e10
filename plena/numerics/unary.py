"""Unary functions of a bf16 operand, tabulated over all 65,536 bf16 inputs.

Every operand of V_EXP_V / V_RECI_V / S_EXP_FP / S_RECI_FP / S_SQRT_FP is a bf16 value (VRAM
rows and fp registers hold bf16), so a 65,536-entry f32 table is exact by construction and
independent of the backend's transcendental implementation and of XLA:CPU's flush-to-zero of
subnormals. Values follow spec §8: exp is evaluated in float64 after clamping to [-88, 88] and
rounded once to f32 (bit-exact with the reference after the bf16 rounding); reciprocal and
square root are IEEE f32 operations.
"""

from __future__ import annotations

import functools

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
