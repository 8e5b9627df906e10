"""The f32 matrix product in one defined order, shared by the emulator and the golden model.

A PLENA product instruction (M_MM, M_TMM, M_MV, the batched-head products) computes an f32
matmul and adds it to an f32 accumulator. The reference leaves the order of the additions to
its BLAS (spec §8: unspecified), and XLA's dot kernels choose one by shape: a [4, 64] by
[64, 4] block and a [64, 64] by [64, 64] matmul sum the same k in different orders, so a
``jnp.matmul`` result depends on how an executor groups the products (and on the backend).
Here the order is fixed::

    p = f32(x[0] * w[0])
    for k in 1, 2, ..., K - 1:          # ascending
        p = f32(p + f32(x[k] * w[k]))   # each product rounded on its own (no FMA)

so every output element is the same whatever the shapes around it (one block, a batch of
blocks, a whole weight matrix at once) and on every backend. Products of a bf16 activation
and an MX-dequantised weight are exact anyway (at most 12 significant bits); the order of the
additions is what matters. (Starting from the first product instead of +0.0 changes only
the sign of an all-zero sum, which adding it to an accumulator, never -0.0, cannot show.)

Subnormal products and sums follow the backend's f32 arithmetic (XLA:CPU flushes them, as its
dot kernels do).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

__all__ = ["ordered_matmul", "ordered_matmul_folded", "separately_rounded"]


def separately_rounded(p):
    """``p`` itself, in a form XLA:CPU cannot contract with a following add into an FMA (it
    does contract ``acc + a * b``): the select sits between the multiply and the add."""
    return jnp.where(p == p, p, p + 1.0)


def ordered_matmul(x, w):
    """``x[..., M, K] @ w[..., K, N]`` in f32, k ascending (see the module doc). Leading axes
    broadcast. The k steps are a ``fori_loop`` whose body is one elementwise kernel over the
    output: under vmap (the fast executor's lanes) that ran 2-2.5x faster on XLA:CPU than the
    steps unrolled at trace time, which XLA fused into one kernel of thousands of scalar
    operations per output element."""
    x = jnp.asarray(x, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    if x.ndim < 2 or w.ndim < 2 or x.shape[-1] != w.shape[-2]:
        raise ValueError(f"ordered_matmul: shapes {x.shape} @ {w.shape} do not match")
    xk, wk = jnp.moveaxis(x, -1, 0), jnp.moveaxis(w, -2, 0)  # [K, ..., M], [K, ..., N]

    def term(k):
        return separately_rounded(xk[k][..., :, None] * wk[k][..., None, :])

    return lax.fori_loop(1, x.shape[-1], lambda k, p: p + term(k), term(0))


@custom_vmap
def ordered_matmul_folded(x, w):
    """:func:`ordered_matmul`, with a ``vmap`` rule that folds a batch of only one operand into
    the product's rows (a batch of ``x``) or columns (a batch of ``w``): one [B*M, K] x [K, N]
    or [M, K] x [K, B*N] product instead of B products side by side. Every output element is
    the same sum in the same order; what changes is the layout of the loop's kernel. Under
    the fast executor's nested lanes (row blocks x column blocks of BLEN), the vmapped product
    otherwise runs its k steps over [rows, cols, BLEN, BLEN] arrays, whose innermost axis is
    BLEN wide (64 k steps over 16 x 16 x 4 x 4 elements: 142 us on XLA:CPU, against 54 us
    for the same products as one 64 x 64 block). Not differentiable (``custom_vmap``): the
    golden model uses :func:`ordered_matmul`."""
    return ordered_matmul(x, w)


@ordered_matmul_folded.def_vmap
def _fold_batch(axis_size, in_batched, x, w):
    x_batched, w_batched = in_batched
    if x_batched and not w_batched and x.ndim == 3 and w.ndim == 2:  # [B, M, K] @ [K, N]
        b, m, k = x.shape
        return ordered_matmul_folded(x.reshape(b * m, k), w).reshape(b, m, w.shape[1]), True
    if w_batched and not x_batched and w.ndim == 3 and x.ndim == 2:  # [M, K] @ [B, K, N]
        b, k, n = w.shape
        p = ordered_matmul_folded(x, jnp.moveaxis(w, 0, 1).reshape(k, b * n))  # [M, B*N]
        return jnp.moveaxis(p.reshape(x.shape[0], b, n), 1, 0), True
    # otherwise one broadcasting product: the batch axis first on both operands (size 1 where
    # unbatched), and the shorter operand's own leading axes padded with 1s after it, so that
    # they line up with the other's as they do per lane
    x, w = (x if x_batched else x[None]), (w if w_batched else w[None])
    lead = max(x.ndim, w.ndim)
    x = x.reshape(x.shape[:1] + (1,) * (lead - x.ndim) + x.shape[1:])
    w = w.reshape(w.shape[:1] + (1,) * (lead - w.ndim) + w.shape[1:])
    return ordered_matmul(x, w), True
