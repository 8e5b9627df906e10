"""Golden model of the FFN-family ops of :mod:`plena.frontend.ops_ffn`: sigmoid-gated
activations (SiLU, GELU), a linear layer on MX weights, the gated FFN and RoPE.

Every function composes :mod:`plena.golden.primitives` in exactly the order the frontend emits
the instructions, so under ``Policy.hardware()`` it is bit-identical to the emulator running the
emitted program, and under ``Policy.fp32()`` it is the same formula in plain float32. All
functions are jit-able (``policy`` / ``cfg`` static) and differentiable.

Operands are *logical* matrices (``[..., M, N]``), not the VRAM layout: the frontend stores a
matrix with N > VLEN column-block-major (see :func:`plena.frontend.ops_ffn.to_blocks`), which
does not change any value. Activations are what the machine holds in VRAM (bf16 values in
hardware mode; :func:`from_hbm` gives that for a tensor loaded from HBM); weights are given
raw (f32) and MX-quantised here at the ``hbm_weight`` point, as ``H_PREFETCH_M`` delivers them.

Formulas (each arrow one instruction, one rounding):

* ``sigmoid_gate(x, a) = x * sigmoid(a*x)``:
  ``t = x * (-a)`` (V_MUL_VF) -> ``exp(t)`` (V_EXP_V) -> ``+ 1`` (V_ADD_VF) -> ``1/.`` (V_RECI_V)
  -> ``* x`` (V_MUL_VV). ``-a`` and ``1`` are FP SRAM constants (f32 -> f16 -> bf16 preload).
* :func:`silu`: a = 1. :func:`gelu`: a = 1.702, the sigmoid approximation of GELU that the
  upstream ``de_gelu`` program computes (``x * sigmoid(1.702 x)``; the machine holds 1.702 as
  bf16 1.703125). It differs from the exact erf GELU by up to ~0.02 (absolute).
* :func:`linear`: ``vram(K-chunked f32 matmul(x, mx_qdq(w)))`` (M_MM per K-chunk of MLEN,
  ascending, then M_MM_WO).
* :func:`ffn`: ``linear(act(linear(x, Wg)) * linear(x, Wu), Wd)`` with the elementwise gate
  ``h = (sigmoid_gate(g)) * u`` as one more V_MUL_VV.
* :func:`rope`: ``r = linear(x, R)`` with ``R`` the signed permutation of
  :func:`rotate_half_matrix` (exact: one non-zero product per output), then
  ``t = r * sin`` (V_MUL_VV), ``o = x * cos`` (V_MUL_VV), ``out = o + t`` (V_ADD_VV).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .primitives import fpsram, matmul_tiles, mx_qdq, v_add, v_exp, v_mul, v_reci, vram
from .quant import Policy

__all__ = [
    "SILU_ALPHA", "GELU_ALPHA", "ACTIVATIONS", "from_hbm", "sigmoid_gate", "silu", "gelu",
    "activation", "linear", "ffn", "rotate_half_matrix", "rope",
]

SILU_ALPHA = 1.0
GELU_ALPHA = 1.702  #: x * sigmoid(1.702 x), the upstream de_gelu approximation
ACTIVATIONS = {"silu": SILU_ALPHA, "gelu": GELU_ALPHA}


def _policy(policy: Optional[Policy]) -> Policy:
    return Policy() if policy is None else policy


def from_hbm(x, policy: Optional[Policy] = None):
    """An activation as ``H_PREFETCH_V`` puts it in VRAM: ``vram(mx_qdq(x, hbm_act))``."""
    return vram(mx_qdq(x, policy=policy, point="hbm_act"), policy)


def sigmoid_gate(x, alpha: float, policy: Optional[Policy] = None, *, gate=None):
    """``x * sigmoid(alpha * x)`` as five vector instructions (module docstring); with ``gate``
    one more V_MUL_VV multiplies the result by ``gate`` (the FFN's up projection)."""
    policy = _policy(policy)
    neg_alpha = fpsram(-float(alpha), policy)
    one = fpsram(1.0, policy)
    t = v_mul(x, neg_alpha, policy)
    t = v_exp(t, policy)
    t = v_add(t, one, policy)
    t = v_reci(t, policy)
    y = v_mul(t, x, policy)
    return y if gate is None else v_mul(y, gate, policy)


def silu(x, policy: Optional[Policy] = None, *, gate=None):
    """SiLU ``x * sigmoid(x)`` (optionally times ``gate``), as the machine computes it."""
    return sigmoid_gate(x, SILU_ALPHA, policy, gate=gate)


def gelu(x, policy: Optional[Policy] = None, *, gate=None):
    """GELU, sigmoid approximation ``x * sigmoid(1.702 x)`` (optionally times ``gate``)."""
    return sigmoid_gate(x, GELU_ALPHA, policy, gate=gate)


def activation(kind: str, x, policy: Optional[Policy] = None, *, gate=None):
    """``silu`` or ``gelu`` by name."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"activation {kind!r}: expected one of {sorted(ACTIVATIONS)}")
    return sigmoid_gate(x, ACTIVATIONS[kind], policy, gate=gate)


def linear(x, w, cfg, policy: Optional[Policy] = None):
    """``x[..., K] @ w[K, N]`` as :func:`plena.frontend.ops_ffn.linear` computes it: ``w`` is
    MX-quantised (``hbm_weight``), the product accumulates in f32 K-chunk by K-chunk of MLEN
    (``cfg``: a PlenaConfig or the int MLEN) and is written to VRAM (bf16)."""
    policy = _policy(policy)
    return matmul_tiles(x, mx_qdq(w, policy=policy, point="hbm_weight"), cfg, policy)


def ffn(x, w_gate, w_up, w_down, cfg, policy: Optional[Policy] = None, act: str = "silu"):
    """Gated FFN ``W_down(act(x W_gate) * (x W_up))`` (Llama/SwiGLU form) as the machine computes
    it. ``x`` [..., D] VRAM values, ``w_gate``/``w_up`` [D, I], ``w_down`` [I, D_out] raw f32.
    (The upstream ``aten_ffn`` testbench activates the tensor it names ``W_up``: pass that one
    as ``w_gate``.)"""
    policy = _policy(policy)
    g = linear(x, w_gate, cfg, policy)
    u = linear(x, w_up, cfg, policy)
    h = activation(act, g, policy, gate=u)
    return linear(h, w_down, cfg, policy)


def rotate_half_matrix(head_dim: int, width: int) -> np.ndarray:
    """The ``width x width`` matrix ``R`` with ``x @ R == rotate_half(x)`` per head of
    ``head_dim`` elements (heads side by side along the row): for a head with half ``h``,
    ``out[j] = -x[j + h]`` for ``j < h`` and ``out[j] = x[j - h]`` for ``j >= h`` (Llama's
    rotate-half convention)."""
    if head_dim < 2 or head_dim % 2 or width % head_dim:
        raise ValueError(f"rotate_half_matrix: head_dim {head_dim} must be even and divide {width}")
    h = head_dim // 2
    r = np.zeros((width, width), np.float32)
    for base in range(0, width, head_dim):
        j = np.arange(h)
        r[base + h + j, base + j] = -1.0
        r[base + j, base + h + j] = 1.0
    return r


def rope(x, cos, sin, head_dim: int, cfg, policy: Optional[Policy] = None):
    """RoPE ``x * cos + rotate_half(x) * sin`` per head of ``head_dim`` along the last axis
    (``x``, ``cos``, ``sin`` of one shape [..., W], W = VLEN on the machine), with the
    machine's roundings: ``rotate_half`` through the systolic array (exact), then
    ``vram(vram(x*cos) + vram(rot*sin))``."""
    policy = _policy(policy)
    rmat = rotate_half_matrix(head_dim, int(np.shape(x)[-1]))
    rot = linear(x, rmat, cfg, policy)
    t = v_mul(rot, sin, policy)
    o = v_mul(x, cos, policy)
    return v_add(o, t, policy)
