"""f32 sums in libtorch's CPU summation order (spec §8, ``SumKernel.cpp``).

V_RED_SUM is bit-exact only if the additions happen in the reference's order. For a
contiguous row of n f32 values libtorch (8-lane vectors on every x86 capability) does:

* n >= 8: cut the row into n // 8 vectors; ``row_sum`` with 4-way ILP adds vector 4i+k into
  accumulator k through a 4-level cascade (``multi_row_sum``), puts left-over vectors onto
  accumulator 0, then adds accumulators 1..3 onto 0. The scalar tail (n mod 8) is summed from
  0.0, then the 8 lanes are added left to right.
* n < 8: the same ``row_sum`` over scalars.

The additions are unrolled at trace time (n is static), vectorised over leading axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .bf16 import f32_bits
from .ieee import scale_down_exact, scale_up_exact

_ILP = 4

_LEVELS = 4


def _ceil_log2(x: int) -> int:
    return 0 if x <= 1 else (x - 1).bit_length()


def _multi_row_sum(rows: list, zero):
    """libtorch multi_row_sum over `rows` (each an array of 4 'columns' stacked on axis -1...)."""
    size = len(rows)
    level_power = max(4, _ceil_log2(size) // _LEVELS)
    level_step = 1 << level_power
    level_mask = level_step - 1
    acc = [zero for _ in range(_LEVELS)]
    i = 0
    while i + level_step <= size:
        for _ in range(level_step):
            acc[0] = acc[0] + rows[i]
            i += 1
        for j in range(1, _LEVELS):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = zero
            if i & (level_mask << (j * level_power)):
                break
    while i < size:
        acc[0] = acc[0] + rows[i]
        i += 1
    for j in range(1, _LEVELS):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _row_sum(items: list, zero):
    """libtorch row_sum: items are vectors (or scalars) of equal shape."""
    n = len(items)
    size_ilp = n // _ILP
    if size_ilp:
        groups = [jnp.stack(items[_ILP * r:_ILP * r + _ILP], axis=0) for r in range(size_ilp)]
        partial = _multi_row_sum(groups, jnp.zeros_like(groups[0]))
        parts = [partial[k] for k in range(_ILP)]
    else:
        parts = [zero] * _ILP
    for i in range(size_ilp * _ILP, n):
        parts[0] = parts[0] + items[i]
    for k in range(1, _ILP):
        parts[0] = parts[0] + parts[k]
    return parts[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def torch_sum(x, lanes: int = 8) -> jnp.ndarray:
    """Sum over the last axis of an f32 array in libtorch's CPU order, IEEE f32 (subnormals
    kept although XLA:CPU flushes them, :mod:`plena.numerics.ieee`).

    Each row is scaled by a power of two ``2**k`` (``k >= 0``, exact on the bits) that lifts its
    smallest non-zero magnitude to at least ``2**-100`` while its largest stays below
    ``2**(126 - ceil(log2 n))``. Every partial sum is then a multiple of ``2**-123`` (zero or
    normal: FTZ/DAZ never act) and below the overflow threshold, so the additions round exactly
    as the unscaled IEEE ones, and the result is scaled back on the bits (gradual underflow).
    Rows without tiny values get ``k = 0``: the plain sum. (A row whose non-zero magnitudes span
    more than about ``2**(226 - log2 n)`` cannot be fully lifted; its tiniest values then meet
    DAZ.)"""
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[-1]
    b = f32_bits(x)
    mag = b & np.uint32(0x7FFFFFFF)
    ef = (mag >> np.uint32(23)).astype(jnp.int32)
    top = jnp.where(ef == 0, -149 + 31 - lax.clz(mag).astype(jnp.int32), ef - 127)  # exponent of the leading bit
    finite_nz = (mag != 0) & (ef < 255)
    lo = jnp.min(jnp.where(finite_nz, top, 1000), axis=-1)
    hi = jnp.max(jnp.where(finite_nz, top, -1000), axis=-1)
    k = jnp.clip(jnp.minimum(-100 - lo, 126 - 1 - max(1, (n - 1).bit_length()) - hi), 0, 250)
    s = _torch_sum_plain(scale_up_exact(x, k[..., None]), lanes)
    # the barrier keeps XLA from fusing (duplicating) the chain of adds into each use of s
    return scale_down_exact(lax.optimization_barrier(s), k)


@torch_sum.defjvp
def _torch_sum_jvp(lanes, primals, tangents):
    (x,), (t,) = primals, tangents
    return torch_sum(x, lanes), _torch_sum_plain(jnp.asarray(t, jnp.float32), lanes)


def _torch_sum_plain(x, lanes: int):
    n = x.shape[-1]
    zero = jnp.zeros(x.shape[:-1], jnp.float32)
    if n < lanes:
        return _row_sum([x[..., i] for i in range(n)], zero)
    nvec = n // lanes
    vecs = [x[..., v * lanes:(v + 1) * lanes] for v in range(nvec)]
    vacc = _row_sum(vecs, jnp.zeros(x.shape[:-1] + (lanes,), jnp.float32))
    final = zero
    for k in range(nvec * lanes, n):
        final = final + x[..., k]
    for lane in range(lanes):
        final = final + vacc[..., lane]
    return final
