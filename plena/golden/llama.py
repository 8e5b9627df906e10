"""Golden model of the decoder of :mod:`plena.frontend.model`: the golden ops composed in the
order (and with the roundings) of the emitted program, so that ``Policy.hardware()`` gives the
emulator's bits and ``Policy.fp32()`` the plain float32 model.

Data path per layer (``vram`` / MX round trips are identities under ``Policy.fp32()``)::

    x0 = from_hbm(X)                                   (H_PREFETCH_V)
    h  = rms_norm(x, from_hbm(attn_norm))
    q, k, v = linear(h, wq / wk / wv)
    q, k = rope per head (cos / sin: VRAM-preloaded bf16)
    a  = flash_attention(q, k, v, causal)             (k, v MX round trip at hbm_kv inside)
    x1 = residual_add(linear(a, wo), x)
    h2 = rms_norm(x1, from_hbm(ffn_norm))
    x2 = residual_add(ffn(h2), x1)
    y  = rms_norm(x_L, from_hbm(final_norm))
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from . import ops_attention as GA
from . import ops_basic as GB
from . import ops_ffn as GF
from .primitives import vram
from .quant import Policy

__all__ = ["decoder"]


def _norm_w(wt, policy):
    return GB.from_hbm(jnp.asarray(np.asarray(wt, np.float32).reshape(1, -1)), policy)


def _rope_heads(m, cos, sin, nh: int, d: int, cfg, policy):
    """RoPE as the program applies it: per head when a head spans whole column blocks
    (``d >= MLEN``: one rotate-half product over the head), else per column block of
    ``MLEN / d`` heads with the tables tiled across them."""
    w = max(d, cfg.mlen)
    reps = w // d
    cos, sin = jnp.tile(cos, (1, reps)), jnp.tile(sin, (1, reps))
    outs = [GF.rope(m[:, j * w:(j + 1) * w], cos, sin, d, cfg, policy) for j in range(nh * d // w)]
    return jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]


def decoder(params, x, cfg, *, seq: int, layers: Optional[int] = None, policy: Optional[Policy] = None,
            cos=None, sin=None):
    """Run the decoder on the embedded input ``x`` ``(seq, hidden)`` (f32, as placed in HBM).

    ``params``: :class:`plena.frontend.model.LlamaParams`; ``cos`` / ``sin``: the RoPE tables
    (default: :func:`plena.frontend.model.rope_tables`). Returns ``(y, intermediates)`` with the
    same intermediate names as the frontend's ``meta["intermediates"]``."""
    from plena.frontend.model import rope_tables

    p = params
    L = p.num_layers if layers is None else int(layers)
    d, H, Hkv = p.head_dim, p.heads, p.kv_heads
    if cos is None or sin is None:
        cos, sin = rope_tables(seq, d, p.rope_theta)
    cos_v, sin_v = vram(jnp.asarray(cos, jnp.float32), policy), vram(jnp.asarray(sin, jnp.float32), policy)
    inter = {}
    cur = GB.from_hbm(jnp.asarray(x, jnp.float32), policy)
    inter["x"] = cur
    for li in range(L):
        lp, pre = p.layers[li], f"L{li}"
        h = GB.rms_norm(cur, _norm_w(lp.attn_norm, policy), cfg=cfg, eps=p.eps, policy=policy)
        q = GB.linear(h, lp.wq, cfg=cfg, policy=policy)
        k = GB.linear(h, lp.wk, cfg=cfg, policy=policy)
        v = GB.linear(h, lp.wv, cfg=cfg, policy=policy)
        q = _rope_heads(q, cos_v, sin_v, H, d, cfg, policy)
        k = _rope_heads(k, cos_v, sin_v, Hkv, d, cfg, policy)
        a = GA.flash_attention(q, k, v, cfg=cfg, num_heads=H, num_kv_heads=Hkv, head_dim=d, causal=True,
                               policy=policy)
        o = GB.linear(a, lp.wo, cfg=cfg, policy=policy)
        x1 = GB.residual_add(o, cur, policy=policy)
        h2 = GB.rms_norm(x1, _norm_w(lp.ffn_norm, policy), cfg=cfg, eps=p.eps, policy=policy)
        f = GF.ffn(h2, lp.w_gate, lp.w_up, lp.w_down, cfg, policy, act="silu")
        x2 = GB.residual_add(f, x1, policy=policy)
        inter.update({f"{pre}.attn_norm": h, f"{pre}.q": q, f"{pre}.k": k, f"{pre}.v": v, f"{pre}.attn": a,
                      f"{pre}.o_proj": o, f"{pre}.resid1": x1, f"{pre}.ffn_norm": h2, f"{pre}.ffn": f,
                      f"{pre}.resid2": x2})
        cur = x2
    y = GB.rms_norm(cur, _norm_w(p.final_norm, policy), cfg=cfg, eps=p.eps, policy=policy)
    inter["final_norm"] = y
    return y, inter
