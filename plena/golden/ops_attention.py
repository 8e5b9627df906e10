"""Golden twin of :mod:`plena.frontend.ops_attention`: flash attention with online softmax,
composed from :mod:`plena.golden.primitives` in the order the emitted program executes
(bit-identical to the emulator under ``Policy.hardware()``, plain f32 math under
``Policy.fp32()``; differentiable in both).

Batched-head product (M_BTMM, spec §4.1): the emulator adds ``0.25 * (Q_g @ K^T)`` (an f32
matmul over HLEN, ascending k, products exact) to the zeroed accumulator and M_BMM_WO rounds
to bf16: :func:`btmm_scores` mirrors it with :func:`~plena.golden.primitives.matmul_tiles`
(one K-chunk of HLEN, ``write_out=False``), the 0.25 factor, then ``vram``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from .primitives import (fpsram, matmul_tiles, mx_qdq, red_max_into, red_sum_into, s_add, s_exp,
                         s_max, s_mul, s_reci, s_sub, v_add, v_exp, v_mul, v_sub, vram)
from .quant import Policy


def mask_kind(cfg, causal: bool, qb: int, kb: int, nkb: int, valid_last: int):
    """Which score mask the program adds to query block ``qb`` x key block ``kb`` (``None`` or
    ``(diag, valid)``, as :func:`plena.frontend.ops_attention.mask_kind`)."""
    diag = bool(causal and kb == qb)
    valid = valid_last if kb == nkb - 1 else cfg.mlen
    return None if not diag and valid == cfg.mlen else (diag, valid)

__all__ = ["BTMM_SCALE", "btmm_scores", "flash_attention"]

BTMM_SCALE = 0.25


def btmm_scores(q, k, hlen: int, policy: Optional[Policy] = None):
    """``vram(0.25 * q[..., M, HLEN] @ k[N, HLEN]^T)``: one M_BTMM into a zeroed accumulator,
    then M_BMM_WO."""
    acc = matmul_tiles(q, jnp.swapaxes(k, -1, -2), hlen, policy, write_out=False)
    return vram(acc * BTMM_SCALE, policy)


@functools.partial(jax.jit, static_argnames=("cfg", "num_heads", "num_kv_heads", "head_dim", "scale", "causal", "policy"))
def flash_attention(q, k, v, *, cfg, num_heads: int, num_kv_heads: int, head_dim: Optional[int] = None,
                    scale: Optional[float] = None,
                    causal: bool = False, policy: Optional[Policy] = None):
    """Attention as :func:`plena.frontend.ops_attention.flash_attention` computes it.

    ``q``: VRAM values ``(S, H*d)`` (``d = head_dim``, HLEN or MLEN); ``k``, ``v``: the
    original f32 ``(Skv, C)`` HBM tensors (the op loads them into MRAM: ``mx_qdq`` at
    ``hbm_kv``), kv head t in columns ``t*d..``. Returns ``(S, H*d)`` (VRAM values).

    Per head and key block (``s`` scores, ``m``/``l`` running max / sum as fp registers)::

        s = vram(0.25 * Q_h K_t^T)   [d = HLEN, M_BTMM]   or   vram(Q_h K_t^T)  [d = MLEN, M_TMM]
        s = vram(s * fpsram(scale'))  [then vram(s + causal mask row) on the diagonal block]
        mn = s_max(red_max(-inf, s), m); alpha = s_exp(s_sub(m, mn))
        p = vram(exp(vram(s - mn))); l = s_add(s_mul(l, alpha), red_sum(0, p))
        o = vram(vram(o * alpha) + matmul_tiles(p, V_t))
    Sequences that are not whole MLEN blocks are padded (zero query rows, dropped at the end;
    zero keys masked to -inf with the same ``(diag, valid)`` masks as the program, see
    :func:`mask_kind`);
    then ``y = vram(o * s_reci(l))`` (``vram(y + 0)`` for the lane merge when BA heads share a
    column block)."""
    mlen, hlen = cfg.mlen, cfg.hlen
    d = hlen if head_dim is None else head_dim
    batched, lanes = d == hlen, mlen // d
    H, Hkv = num_heads, num_kv_heads
    G = H // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    q = jnp.asarray(q, jnp.float32)
    km = mx_qdq(jnp.asarray(k, jnp.float32), None, policy, "hbm_kv")
    vm = mx_qdq(jnp.asarray(v, jnp.float32), None, policy, "hbm_kv")
    S, Skv = q.shape[0], km.shape[0]
    s_pad, nkb = -(-S // mlen) * mlen, -(-Skv // mlen)
    valid_last = Skv - (nkb - 1) * mlen
    # whole blocks: padded query rows (zeros; computed, then dropped) and keys (masked to -inf)
    q = jnp.pad(q, ((0, s_pad - S), (0, 0)))
    km = jnp.pad(km, ((0, nkb * mlen - Skv), (0, 0)))
    vm = jnp.pad(vm, ((0, nkb * mlen - Skv), (0, 0)))
    fscale = fpsram(scale / BTMM_SCALE if batched else scale, policy)
    idx = jnp.arange(mlen)

    def mask_of(kind):  # see plena.frontend.ops_attention.mask_kind
        diag, valid = kind
        lim = jnp.minimum(idx if diag else jnp.full((mlen,), mlen - 1), valid - 1)
        return jnp.where(idx[None, :] > lim[:, None], -jnp.inf, 0.0).astype(jnp.float32)

    out_blocks = []
    for qb in range(s_pad // mlen):
        qrows = q[qb * mlen:(qb + 1) * mlen]
        heads_out = []
        for h in range(H):
            t = h // G
            qh = qrows[:, h * d:(h + 1) * d]
            m = jnp.full((mlen,), -jnp.inf, jnp.float32)
            l = jnp.zeros((mlen,), jnp.float32)
            o = jnp.zeros((mlen, d), jnp.float32)
            for kb in range(nkb):
                if causal and kb > qb:
                    continue
                kind = mask_kind(cfg, causal, qb, kb, nkb, valid_last)
                kt = km[kb * mlen:(kb + 1) * mlen, t * d:(t + 1) * d]
                vt = vm[kb * mlen:(kb + 1) * mlen, t * d:(t + 1) * d]
                if batched:
                    s = btmm_scores(qh, kt, hlen, policy)
                else:  # M_TMM over the MLEN dims, M_MM_WO
                    s = matmul_tiles(qh, kt.T, cfg, policy)
                s = v_mul(s, fscale, policy)
                if kind is not None:
                    s = v_add(s, mask_of(kind), policy)
                mx = red_max_into(jnp.full((mlen,), -jnp.inf, jnp.float32), s, policy)
                mn = s_max(mx, m, policy)
                alpha = s_exp(s_sub(m, mn, policy), policy)
                p = v_exp(v_sub(s, mn[:, None], policy), policy)
                rs = red_sum_into(jnp.zeros((mlen,), jnp.float32), p, policy)
                l = s_add(s_mul(l, alpha, policy), rs, policy)
                m = mn
                pv = matmul_tiles(p, vt, cfg, policy)
                o = v_add(v_mul(o, alpha[:, None], policy), pv, policy)
            y = v_mul(o, s_reci(l, policy)[:, None], policy)
            if lanes > 1:  # the lane merge adds the other heads' zero lanes
                y = v_add(y, 0.0, policy)
            heads_out.append(y)
        out_blocks.append(jnp.concatenate(heads_out, axis=-1))
    return jnp.concatenate(out_blocks, axis=0)[:S]
