"""Golden twins of :mod:`plena.frontend.ops_moe`: routed mixture of experts (router, V_TOPK
top-k, expert FFNs, weighted combine), composed from :mod:`plena.golden.primitives` in the order
the emitted programs execute (bit-identical to the emulator under ``Policy.hardware()``, plain
f32 math under ``Policy.fp32()``, differentiable in both).

Top-k (V_TOPK, spec §4.2): the first E logits of a row (policy 0: E = 32, K = 4; policy 1:
E = 128, K = 8), NaN read as -inf, ranked by IEEE totalOrder descending with ties to the lower
index; ``w_k = exp(v_k - v_0)`` in f32, ``den`` summed sequentially in rank order, weight
``fpreg(w_k / den)`` (0 when ``den`` is not finite and positive). The selection is not
differentiable (the indices are constants for ``jax.grad``); the weights are, through the
selected logits. ``exp`` is :func:`plena.numerics.unary.exp_f32` (the float64 value rounded to
f32, as spec §8 recommends for libm ``expf``), shared with the emulator.

Expert activations (:data:`EXPERT_ACTIVATIONS`), ``g = x W_gate``, ``u = x W_up`` (VRAM values):

* ``"silu"`` / ``"gelu"``: ``h = sigmoid_gate(g, a) * u`` exactly as
  :func:`plena.golden.ops_ffn.sigmoid_gate` (a = 1 or 1.702).
* ``"swiglu_oai"`` (the GPT-OSS clamped SwiGLU of the upstream ``moe_*`` conformance cases,
  alpha 1.702, limit 7)::

      g = min(g, 7); u = min(u, 7); u = max(u, -7)          V_MIN_VF, V_MIN_VF, V_MAX_VF
      s = 1 / (exp(g * -1.702) + 1)                          V_MUL_VF, V_EXP_V, V_ADD_VF, V_RECI_V
      g = g * s; u = u + 1; h = u * g                        V_MUL_VV, V_ADD_VF, V_MUL_VV

Combine of the K selected experts of a token (``y_k`` the expert outputs, ``w_k`` the weights
as fp registers): ``o = vram(y_0 * w_0)``, then ``o = vram(o + vram(y_k * w_k))``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from plena.numerics import unary

from .ops_ffn import ACTIVATIONS, sigmoid_gate
from .primitives import (fpreg, fpsram, matmul_tiles, mx_qdq, v_add, v_exp, v_max, v_min, v_mul,
                         v_reci)
from .quant import Policy

__all__ = [
    "TOPK_POLICIES", "EXPERT_ACTIVATIONS", "OAI_ALPHA", "OAI_LIMIT", "topk", "clamp",
    "swiglu_oai", "expert_activation", "expert_ffn", "combine", "routed_moe",
]

TOPK_POLICIES = {0: (32, 4), 1: (128, 8)}  #: V_TOPK policy -> (experts E, selected K)
OAI_ALPHA = 1.702  #: sigmoid slope of the GPT-OSS SwiGLU
OAI_LIMIT = 7.0  #: clamp limit of the GPT-OSS SwiGLU
EXPERT_ACTIVATIONS = ("silu", "gelu", "swiglu_oai")


def _policy(policy: Optional[Policy]) -> Policy:
    return Policy() if policy is None else policy


def _f32(x):
    return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------------------------------------
# top-k (V_TOPK)
# ---------------------------------------------------------------------------------------------

def _rank(values):
    """Indices of ``values`` (last axis) in V_TOPK's order: totalOrder descending, NaN as -inf,
    ties to the lower index. Not differentiated."""
    v = lax.stop_gradient(jnp.where(jnp.isnan(values), -jnp.inf, values))
    bits = lax.bitcast_convert_type(v, jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))  # ascending totalOrder
    idx = jnp.broadcast_to(jnp.arange(v.shape[-1], dtype=jnp.int32), v.shape)
    _, order = lax.sort((~key, idx), dimension=v.ndim - 1, num_keys=2)
    return order


def topk(logits, *, policy_id: int = 0, policy: Optional[Policy] = None):
    """V_TOPK on each row of ``logits`` (``[..., >= E]``; the first E entries are the experts).
    Returns ``(indices int32 [..., K], weights f32 [..., K])`` in rank order; the weights are
    what lands in FP SRAM (``fpreg`` rounding in hardware mode)."""
    if policy_id not in TOPK_POLICIES:
        raise ValueError(f"topk: policy_id must be 0 or 1, got {policy_id!r}")
    policy = _policy(policy)
    E, K = TOPK_POLICIES[policy_id]
    logits = _f32(logits)
    if logits.shape[-1] < E:
        raise ValueError(f"topk: policy {policy_id} ranks {E} experts, the rows have {logits.shape[-1]}")
    vals = logits[..., :E]
    top = _rank(vals)[..., :K]
    v = jnp.take_along_axis(jnp.where(jnp.isnan(vals), -jnp.inf, vals), top, axis=-1)
    return top, fpreg(unary.topk_weights(v), policy)


# ---------------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------------

def clamp(x, lo: Optional[float] = None, hi: Optional[float] = None, policy: Optional[Policy] = None):
    """``V_MIN_VF x, hi`` then ``V_MAX_VF x, lo`` (each bound optional; FP SRAM constants)."""
    if hi is not None:
        x = v_min(x, fpsram(hi, policy), policy)
    if lo is not None:
        x = v_max(x, fpsram(lo, policy), policy)
    return _f32(x)


def swiglu_oai(g, u, policy: Optional[Policy] = None, *, alpha: float = OAI_ALPHA,
               limit: float = OAI_LIMIT):
    """The GPT-OSS clamped SwiGLU ``(clamp(u) + 1) * g' * sigmoid(alpha g')``, ``g' = min(g,
    limit)``, with the machine's instruction order (module docstring)."""
    g = clamp(g, None, limit, policy)
    u = clamp(u, -limit, limit, policy)
    s = v_mul(g, fpsram(-float(alpha), policy), policy)
    s = v_exp(s, policy)
    s = v_add(s, fpsram(1.0, policy), policy)
    s = v_reci(s, policy)
    g = v_mul(g, s, policy)
    u = v_add(u, fpsram(1.0, policy), policy)
    return v_mul(u, g, policy)


def expert_activation(kind: str, g, u, policy: Optional[Policy] = None):
    """``h`` from the gate and up projections for ``kind`` in :data:`EXPERT_ACTIVATIONS`."""
    if kind == "swiglu_oai":
        return swiglu_oai(g, u, policy)
    if kind not in ACTIVATIONS:
        raise ValueError(f"expert activation {kind!r}: expected one of {EXPERT_ACTIVATIONS}")
    return sigmoid_gate(g, ACTIVATIONS[kind], policy, gate=u)


def _mm(x, w_mram, cfg, policy):
    return matmul_tiles(x, w_mram, cfg, policy)


@functools.partial(jax.jit, static_argnames=("cfg", "act", "policy"))
def expert_ffn(x, w_gate, w_up, w_down, *, cfg, act: str = "swiglu_oai", policy: Optional[Policy] = None):
    """One expert: ``linear(h, W_down)`` with ``h = act(linear(x, W_gate), linear(x, W_up))``;
    ``x`` VRAM values ``[..., D]``, weights raw f32 (MX round trip at ``hbm_weight``)."""
    policy = _policy(policy)
    q = lambda w: mx_qdq(w, None, policy, "hbm_weight")  # noqa: E731
    x = _f32(x)
    g = _mm(x, q(w_gate), cfg, policy)
    u = _mm(x, q(w_up), cfg, policy)
    return _mm(expert_activation(act, g, u, policy), q(w_down), cfg, policy)


@functools.partial(jax.jit, static_argnames=("policy",))
def combine(outs, weights, *, policy: Optional[Policy] = None):
    """``o = vram(y_0 * w_0); o = vram(o + vram(y_k * w_k))`` for k = 1..: ``outs`` a sequence
    (or stacked ``[K, ...]`` array) of expert outputs, ``weights`` the matching multipliers
    (scalars, per-row ``[..., 1]`` columns or whole rows, as the machine's operand is an fp
    register (V_MUL_VF) or a VRAM row (V_MUL_VV))."""
    o = v_mul(outs[0], weights[0], policy)
    for k in range(1, len(outs)):
        o = v_add(o, v_mul(outs[k], weights[k], policy), policy)
    return o


@functools.partial(jax.jit, static_argnames=("cfg", "act", "policy_id", "policy"))
def routed_moe(x, w_router, w_gate, w_up, w_down, *, cfg, act: str = "swiglu_oai", policy_id: int = 0,
               policy: Optional[Policy] = None):
    """Routed MoE as :func:`plena.frontend.ops_moe.routed_moe` computes it.

    ``x``: VRAM values ``[T, D]``; ``w_router``: ``[D, Epad]`` (Epad >= E, columns past E
    ignored); ``w_gate``, ``w_up``: ``[E, D, F]``; ``w_down``: ``[E, F, D]`` (raw f32). Returns
    ``(out [T, D], indices [T, K], weights [T, K])``: per token the router logits
    ``linear(x, w_router)``, their V_TOPK, and the weighted combine of the K selected experts'
    :func:`expert_ffn` outputs in rank order."""
    policy = _policy(policy)
    q = lambda w: mx_qdq(w, None, policy, "hbm_weight")  # noqa: E731
    x = _f32(x)
    logits = _mm(x, q(w_router), cfg, policy)
    E, K = TOPK_POLICIES[policy_id]
    if _f32(w_gate).shape[0] != E:
        raise ValueError(f"routed_moe: policy {policy_id} routes over {E} experts, got {w_gate.shape[0]}")
    logits = v_mul(logits, fpsram(1.0, policy), policy)  # the copy into the V_TOPK scratch rows
    idx, wts = topk(logits, policy_id=policy_id, policy=policy)
    wg, wu, wd = q(w_gate), q(w_up), q(w_down)

    def one(xrow, e):  # one token row through expert e (weights already MRAM values)
        xr = xrow[None, :]
        g = _mm(xr, wg[e], cfg, policy)
        u = _mm(xr, wu[e], cfg, policy)
        return _mm(expert_activation(act, g, u, policy), wd[e], cfg, policy)[0]

    ys = jax.vmap(lambda xrow, es: jax.vmap(lambda e: one(xrow, e))(es))(x, idx)  # [T, K, D]
    out = combine([ys[:, k] for k in range(K)], [wts[:, k:k + 1] for k in range(K)], policy=policy)
    return out, idx, wts
