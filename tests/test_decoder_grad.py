"""Gradients through the whole (tiny) golden decoder.

fp32 policy: ``jax.grad`` of a scalar loss of the decoder output, with respect to the input
activations and to linear weights of both layers, equals float64 central finite differences of
an independent float64 numpy Llama forward pass along random directions (the exact derivative of
the ideal model, up to float32 rounding in the JAX gradient: tolerance 1e-3 relative).
hardware policy: the gradient exists (straight-through estimators at the quantisation points),
is finite, and is close in direction to the fp32 gradient (one layer, one token block).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plena.config import default_config
from plena.frontend.model import random_params, rope_tables
from plena.golden import Policy
from plena.golden.llama import decoder

CFG = default_config().replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=4, hbm_m_prefetch_amount_raw=16,
                               hbm_v_prefetch_amount=4, hbm_v_writeback_amount=4)
SEQ = 32
PARAMS = random_params(hidden=32, heads=4, kv_heads=2, head_dim=16, intermediate=64, layers=2, seed=8)
X = np.random.default_rng(9).standard_normal((SEQ, 32)).astype(np.float32)
R = np.random.default_rng(10).standard_normal((SEQ, 32)).astype(np.float32)  # loss = sum(R * y)
WEIGHTS = (("wq", 0), ("w_down", 0), ("wk", 1), ("w_up", 1))  # (name, layer) differentiated


def with_weights(params, ws):
    layers = list(params.layers)
    for (name, li), w in zip(WEIGHTS, ws):
        layers[li] = dataclasses.replace(layers[li], **{name: w})
    return dataclasses.replace(params, layers=layers)


def golden_loss(policy):
    def loss(x, ws):
        y, _ = decoder(with_weights(PARAMS, ws), x, CFG, seq=SEQ, policy=policy)
        return jnp.sum(jnp.asarray(R) * y)
    return loss


def ref_loss(x, ws) -> float:
    """float64 numpy Llama forward pass (weights [in, out]), then sum(R * y)."""
    p = with_weights(PARAMS, ws)
    cos, sin = (t.astype(np.float64) for t in rope_tables(SEQ, p.head_dim, p.rope_theta))
    d, H, Hkv = p.head_dim, p.heads, p.kv_heads
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    rms = lambda v, w: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + p.eps) * f64(w)  # noqa: E731

    def rope(m, nh):
        out = np.empty_like(m)
        for h in range(nh):
            mh = m[:, h * d:(h + 1) * d]
            out[:, h * d:(h + 1) * d] = mh * cos + np.concatenate([-mh[:, d // 2:], mh[:, :d // 2]], 1) * sin
        return out

    x = f64(x)
    masked = np.triu(np.ones((SEQ, SEQ), bool), 1)
    for lp in p.layers:
        h = rms(x, lp.attn_norm)
        q, k, v = rope(h @ f64(lp.wq), H), rope(h @ f64(lp.wk), Hkv), h @ f64(lp.wv)
        a = np.empty((SEQ, H * d))
        for hh in range(H):
            t = hh // (H // Hkv)
            s = q[:, hh * d:(hh + 1) * d] @ k[:, t * d:(t + 1) * d].T / np.sqrt(d)
            s[masked] = -np.inf
            e = np.exp(s - s.max(-1, keepdims=True))
            a[:, hh * d:(hh + 1) * d] = e / e.sum(-1, keepdims=True) @ v[:, t * d:(t + 1) * d]
        x = x + a @ f64(lp.wo)
        h2 = rms(x, lp.ffn_norm)
        g = h2 @ f64(lp.w_gate)
        x = x + (g / (1 + np.exp(-g)) * (h2 @ f64(lp.w_up))) @ f64(lp.w_down)
    return float(np.sum(f64(R) * rms(x, p.final_norm)))


def base_weights():
    return [np.asarray(getattr(PARAMS.layers[li], name), np.float32) for name, li in WEIGHTS]


def test_fp32_grad_matches_float64_finite_differences():
    ws = base_weights()
    loss = golden_loss(Policy.fp32(CFG))
    val, (gx, gws) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(X), [jnp.asarray(w) for w in ws])
    assert float(val) == pytest.approx(ref_loss(X, ws), rel=1e-5)
    rng = np.random.default_rng(0)
    eps = 1e-4
    for trial in range(3):
        # a random direction in (x, weights) space, unit norm per block
        dx = rng.standard_normal(X.shape)
        dws = [rng.standard_normal(w.shape) for w in ws]
        dx /= np.linalg.norm(dx)
        dws = [dw / np.linalg.norm(dw) for dw in dws]
        analytic = float(np.sum(np.asarray(gx, np.float64) * dx)
                         + sum(np.sum(np.asarray(g, np.float64) * dw) for g, dw in zip(gws, dws)))
        step = lambda s: ref_loss(np.float64(X) + s * dx, [np.float64(w) + s * dw for w, dw in zip(ws, dws)])  # noqa: E731
        fd = (step(eps) - step(-eps)) / (2 * eps)
        assert abs(fd) > 1e-2  # a direction the loss actually depends on
        assert analytic == pytest.approx(fd, rel=1e-3), trial
    # each block separately too (the input alone, one weight alone)
    for g, base, which in ((gx, X, None), (gws[3], ws[3], 3)):
        d = rng.standard_normal(base.shape)
        d /= np.linalg.norm(d)
        if which is None:
            fd = (ref_loss(np.float64(X) + eps * d, ws) - ref_loss(np.float64(X) - eps * d, ws)) / (2 * eps)
        else:
            def at(s):
                w2 = list(ws)
                w2[which] = np.float64(ws[which]) + s * d
                return ref_loss(X, w2)
            fd = (at(eps) - at(-eps)) / (2 * eps)
        assert float(np.sum(np.asarray(g, np.float64) * d)) == pytest.approx(fd, rel=1e-3)


def test_hardware_grad_is_finite_straight_through():
    """One GQA layer, one MLEN block of tokens (the hardware-mode backward pass of the unrolled
    bit-level attention is expensive to compile)."""
    p = random_params(hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=32, layers=1, seed=4)
    seq = 16
    x = jnp.asarray(X[:seq])
    r = jnp.asarray(R[:seq])

    def loss(policy):
        def f(x, wq, wd):
            lp = dataclasses.replace(p.layers[0], wq=wq, w_down=wd)
            y, _ = decoder(dataclasses.replace(p, layers=[lp]), x, CFG, seq=seq, policy=policy)
            return jnp.sum(r * y)
        return f

    args = (x, jnp.asarray(p.layers[0].wq), jnp.asarray(p.layers[0].w_down))
    g_hw = jax.grad(loss(Policy.hardware(CFG)), argnums=(0, 1, 2))(*args)
    g_32 = jax.grad(loss(Policy.fp32(CFG)), argnums=(0, 1, 2))(*args)
    for a, b in zip(g_hw, g_32):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.isfinite(a)) and np.any(a != 0)
        assert np.any(a != b)  # the hardware forward values enter the backward pass
        cos = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos > 0.9  # straight-through: same derivative structure at a quantised operating point
