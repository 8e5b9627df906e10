"""Golden twins of :mod:`plena.frontend.ops_basic`: linear, RMSNorm, LayerNorm, row softmax,
residual / embedding add, composed from :mod:`plena.golden.primitives` in exactly the order the
emitted programs execute, so that under ``Policy.hardware()`` they are bit-identical to the
emulator running those programs, and under ``Policy.fp32()`` they are plain float32 math.

Conventions:

* Activations are the values **as they sit in VRAM** (bf16 in hardware mode), shape
  ``(..., D)``, logical layout (the column-block-major VRAM layout is the frontend's business).
  Use :func:`from_hbm` for a tensor the program loads from HBM (MX round trip + bf16 VRAM
  write) and :func:`to_hbm` for the value an output stored to HBM reads back as.
* Linear weights are given as the original f32 values: the op itself loads them from HBM into
  MRAM (``mx_qdq`` at the ``hbm_weight`` point, no bf16 rounding).
* Row reductions run over column blocks of ``vlen`` elements (``cfg`` = a PlenaConfig or the int
  VLEN): each block's V_RED_SUM result is rounded into the bf16 fp-register accumulator.
* FP SRAM constants (1/D, eps, softmax scale) are taken through the f32 -> f16 -> bf16
  preload path (:func:`plena.golden.primitives.fpsram`).
* Everything is differentiable (``jax.grad`` in either mode; hardware mode uses the
  straight-through derivatives of the primitives). Every op is a ``jax.jit`` function with
  ``cfg`` / ``policy`` / ``eps`` / ``scale`` / ``point`` static (one compile per shape and
  setting; eager evaluation of the bit-level primitives is much slower).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from .primitives import (fpsram, matmul_tiles, mx_qdq, red_max_into, red_sum_into, s_add, s_mul,
                         s_reci, s_sqrt, v_add, v_exp, v_mul, v_sub, vram)
from .quant import Policy

__all__ = ["from_hbm", "to_hbm", "linear", "rms_norm", "layer_norm", "softmax", "residual_add",
           "embedding_add"]


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _vlen(cfg) -> int:
    return int(getattr(cfg, "vlen", cfg))


def _blocks(x, cfg) -> list:
    """The column blocks ``x[..., j*VLEN:(j+1)*VLEN]`` (D must be a multiple of VLEN)."""
    vlen = _vlen(cfg)
    d = x.shape[-1]
    if d % vlen:
        raise ValueError(f"row width {d} is not a multiple of VLEN = {vlen}")
    return [x[..., j * vlen:(j + 1) * vlen] for j in range(d // vlen)]


def _cat(blocks):
    return jnp.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]


@functools.partial(jax.jit, static_argnames=('policy', 'point'))
def from_hbm(x, policy: Optional[Policy] = None, point: str = "hbm_act"):
    """What H_PREFETCH_V leaves in VRAM for an f32 tensor placed in HBM: ``vram(mx_qdq(x))``."""
    return vram(mx_qdq(x, None, policy, point), policy)


@functools.partial(jax.jit, static_argnames=('policy', 'point'))
def to_hbm(y, policy: Optional[Policy] = None, point: str = "hbm_act"):
    """The value a VRAM tensor stored with H_STORE_V reads back as: ``mx_qdq(y)``."""
    return mx_qdq(y, None, policy, point)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=('cfg', 'policy'))
def linear(x, w, bias=None, *, cfg, policy: Optional[Policy] = None):
    """``x[..., K] @ w[K, N] (+ bias[N])`` as :func:`plena.frontend.ops_basic.linear` computes
    it: ``w`` goes through the weight MX round trip (MRAM), the product accumulates over the
    K-chunks of MLEN in ascending order (:func:`~plena.golden.primitives.matmul_tiles`), M_MM_WO
    rounds it to bf16, then ``v_add`` adds the bias row (a VRAM row: bf16 values in hardware mode,
    e.g. ``from_hbm(bias)``). ``x`` holds VRAM values (e.g. ``from_hbm(x)``)."""
    w_mram = mx_qdq(w, None, policy, "hbm_weight")
    y = matmul_tiles(_f32(x), w_mram, cfg, policy)
    if bias is not None:
        y = v_add(y, _f32(bias).reshape(-1), policy)
    return y


# ---------------------------------------------------------------------------------------------
# row ops
# ---------------------------------------------------------------------------------------------

def _inv_sqrt_of_mean(acc, d: int, eps: float, policy):
    """``1 / sqrt(acc * invD + eps)``: S_MUL_FP, S_ADD_FP, S_SQRT_FP, S_RECI_FP."""
    acc = s_mul(acc, fpsram(1.0 / d, policy), policy)
    acc = s_add(acc, fpsram(eps, policy), policy)
    return s_reci(s_sqrt(acc, policy), policy)


def _param_blocks(p, cfg, d: int):
    if p is None:
        return None
    return _blocks(_f32(p).reshape(d), cfg)


@functools.partial(jax.jit, static_argnames=('cfg', 'eps', 'policy'))
def rms_norm(x, weight=None, *, cfg, eps: float = 1e-6, policy: Optional[Policy] = None):
    """RMSNorm over the last axis, as :func:`plena.frontend.ops_basic.rms_norm` computes it::

        acc = 0; for each VLEN block: acc = fpreg(acc + sum(vram(x_j * x_j)))
        r = s_reci(s_sqrt(s_add(s_mul(acc, 1/D), eps)));  y = vram(x * r) [* weight]
    """
    x = _f32(x)
    d = x.shape[-1]
    xs = _blocks(x, cfg)
    acc = jnp.zeros(x.shape[:-1], jnp.float32)
    for xj in xs:
        acc = red_sum_into(acc, v_mul(xj, xj, policy), policy)
    r = _inv_sqrt_of_mean(acc, d, eps, policy)[..., None]
    ws = _param_blocks(weight, cfg, d)
    ys = []
    for j, xj in enumerate(xs):
        yj = v_mul(xj, r, policy)
        if ws is not None:
            yj = v_mul(yj, ws[j], policy)
        ys.append(yj)
    return _cat(ys)


@functools.partial(jax.jit, static_argnames=('cfg', 'eps', 'policy'))
def layer_norm(x, weight=None, bias=None, *, cfg, eps: float = 1e-5, policy: Optional[Policy] = None):
    """LayerNorm over the last axis (two-pass variance), as
    :func:`plena.frontend.ops_basic.layer_norm` computes it::

        s = sum of fpreg-accumulated block sums; mean = s_mul(s, 1/D)
        c = vram(x - mean); v = fpreg-accumulated sums of vram(c * c)
        r = s_reci(s_sqrt(s_add(s_mul(v, 1/D), eps)))
        y = vram(c * r) [then vram(y * weight)] [then vram(y + bias)]
    """
    x = _f32(x)
    d = x.shape[-1]
    xs = _blocks(x, cfg)
    acc = jnp.zeros(x.shape[:-1], jnp.float32)
    for xj in xs:
        acc = red_sum_into(acc, xj, policy)
    mean = s_mul(acc, fpsram(1.0 / d, policy), policy)[..., None]
    cs = [v_sub(xj, mean, policy) for xj in xs]
    acc = jnp.zeros(x.shape[:-1], jnp.float32)
    for cj in cs:
        acc = red_sum_into(acc, v_mul(cj, cj, policy), policy)
    r = _inv_sqrt_of_mean(acc, d, eps, policy)[..., None]
    ws, bs = _param_blocks(weight, cfg, d), _param_blocks(bias, cfg, d)
    ys = []
    for j, cj in enumerate(cs):
        yj = v_mul(cj, r, policy)
        if ws is not None:
            yj = v_mul(yj, ws[j], policy)
        if bs is not None:
            yj = v_add(yj, bs[j], policy)
        ys.append(yj)
    return _cat(ys)


@functools.partial(jax.jit, static_argnames=('cfg', 'scale', 'policy'))
def softmax(x, *, cfg, scale: Optional[float] = None, policy: Optional[Policy] = None):
    """Softmax over the last axis of ``scale * x``, as :func:`plena.frontend.ops_basic.softmax`
    computes it::

        [y = vram(x * scale)]; m = fpreg max over blocks (from -inf)
        e_j = vram(exp(vram(y_j - m))); s = fpreg-accumulated block sums of e
        out = vram(e * s_reci(s))
    """
    x = _f32(x)
    xs = _blocks(x, cfg)
    if scale is not None:
        k = fpsram(scale, policy)
        xs = [v_mul(xj, k, policy) for xj in xs]
    m = jnp.full(x.shape[:-1], -jnp.inf, jnp.float32)
    for xj in xs:
        m = red_max_into(m, xj, policy)
    m = m[..., None]
    s = jnp.zeros(x.shape[:-1], jnp.float32)
    es = []
    for xj in xs:
        ej = v_exp(v_sub(xj, m, policy), policy)
        s = red_sum_into(s, ej, policy)
        es.append(ej)
    r = s_reci(s, policy)[..., None]
    return _cat([v_mul(ej, r, policy) for ej in es])


# ---------------------------------------------------------------------------------------------
# adds
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=('policy',))
def residual_add(x, residual, *, policy: Optional[Policy] = None):
    """``vram(x + residual)`` (V_ADD_VV)."""
    return v_add(x, residual, policy)


@functools.partial(jax.jit, static_argnames=('policy',))
def embedding_add(x, emb, *, policy: Optional[Policy] = None):
    """``vram(x + emb)`` (V_ADD_VV); ``emb`` of x's shape or one row broadcast to all rows."""
    return v_add(x, emb, policy)
