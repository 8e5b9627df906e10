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

import jax.numpy as jnp

from .ieee import add as _add

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
            acc[0] = _add(acc[0], rows[i])
            i += 1
        for j in range(1, _LEVELS):
            acc[j] = _add(acc[j], acc[j - 1])
            acc[j - 1] = zero
            if i & (level_mask << (j * level_power)):
                break
    while i < size:
        acc[0] = _add(acc[0], rows[i])
        i += 1
    for j in range(1, _LEVELS):
        acc[0] = _add(acc[0], acc[j])
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
        parts[0] = _add(parts[0], items[i])
    for k in range(1, _ILP):
        parts[0] = _add(parts[0], parts[k])
    return parts[0]


def torch_sum(x, lanes: int = 8) -> jnp.ndarray:
    """Sum over the last axis of an f32 array in libtorch's CPU order."""
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[-1]
    zero = jnp.zeros(x.shape[:-1], jnp.float32)
    if n < lanes:
        return _row_sum([x[..., i] for i in range(n)], zero)
    nvec = n // lanes
    vecs = [x[..., v * lanes:(v + 1) * lanes] for v in range(nvec)]
    vacc = _row_sum(vecs, jnp.zeros(x.shape[:-1] + (lanes,), jnp.float32))
    final = zero
    for k in range(nvec * lanes, n):
        final = _add(final, x[..., k])
    for lane in range(lanes):
        final = _add(final, vacc[..., lane])
    return final
