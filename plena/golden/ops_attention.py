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
import numpy as np

from .primitives import (fpsram, matmul_tiles, mx_qdq, red_max_into, red_sum_into, s_add, s_exp,
                         s_max, s_mul, s_reci, s_sub, v_add, v_exp, v_mul, v_sub, vram)
from .quant import Policy


def mask_kind(cfg, causal: bool, qb: int, kb: int, nkb: int, valid_last: int):
    """Which score mask the program adds to query block ``qb`` x key block ``kb`` (``None`` or
    ``(diag, valid)``, as :func:`plena.frontend.ops_attention.mask_kind`)."""
    diag = bool(causal and kb == qb)
    valid = valid_last if kb == nkb - 1 else cfg.mlen
    return None if not diag and valid == cfg.mlen else (diag, valid)

__all__ = ["BTMM_SCALE", "btmm_scores", "flash_attention", "head_layout", "shift_matrix"]

BTMM_SCALE = 0.25


def head_layout(mlen: int, d: int, h: int, t: int):
    """Where the dims of query head ``h`` (columns ``h*d ..`` of Q / the output) and of its kv
    head ``t`` (columns ``t*d ..`` of K / V) lie, in MLEN column blocks / strips.

    Returns ``(strips, runs)``: ``strips`` the K/V strips holding kv head ``t`` (ascending);
    ``runs`` a list of ``(si, i0, i1, bq, delta)``: head dims ``i0 .. i1`` lie in strip
    ``strips[si]`` (at strip column ``t*d + i - s*MLEN``) and in one Q column block ``bq``
    (at column ``(h*d + i) % MLEN``), ``delta = q column - strip column``."""
    s_lo, s_hi = (t * d) // mlen, (t * d + d - 1) // mlen
    strips = list(range(s_lo, s_hi + 1))
    cuts = sorted({0, d} | {s * mlen - t * d for s in strips if 0 < s * mlen - t * d < d}
                  | {c * mlen - h * d for c in range((h * d) // mlen + 1, (h * d + d - 1) // mlen + 1)})
    runs = []
    for i0, i1 in zip(cuts[:-1], cuts[1:]):
        s = (t * d + i0) // mlen
        bq = (h * d + i0) // mlen
        runs.append((s - s_lo, i0, i1, bq, (h * d + i0) % mlen - (t * d + i0 - s * mlen)))
    return strips, runs


def shift_matrix(mlen: int, delta: int) -> np.ndarray:
    """``Sh`` with ``(X @ Sh)[:, x] = X[:, x + delta]`` (zero where ``x + delta`` is outside the
    row): the 0/1 selection matrix that moves Q lanes onto their kv head's K lanes."""
    sh = np.zeros((mlen, mlen), np.float32)
    x = np.arange(mlen)
    ok = (x + delta >= 0) & (x + delta < mlen)
    sh[x[ok] + delta, x[ok]] = 1.0
    return sh


def btmm_scores(q, k, hlen: int, policy: Optional[Policy] = None):
    """``vram(0.25 * q[..., M, HLEN] @ k[N, HLEN]^T)``: one M_BTMM into a zeroed accumulator,
    then M_BMM_WO."""
    acc = matmul_tiles(q, jnp.swapaxes(k, -1, -2), hlen, policy, write_out=False)
    return vram(acc * BTMM_SCALE, policy)


def _online_step(s, mask, fscale, m, l, o, vt, cfg, policy):
    """One key block of the online softmax, in the program's order: scale, mask, row max,
    rescale factor, exponentials, row sums, then ``O = O * alpha + P @ V``."""
    mlen = cfg.mlen
    s = v_mul(s, fscale, policy)
    if mask is not None:
        s = v_add(s, mask, policy)
    mx = red_max_into(jnp.full((mlen,), -jnp.inf, jnp.float32), s, policy)
    mn = s_max(mx, m, policy)
    alpha = s_exp(s_sub(m, mn, policy), policy)
    p = v_exp(v_sub(s, mn[:, None], policy), policy)
    rs = red_sum_into(jnp.zeros((mlen,), jnp.float32), p, policy)
    l = s_add(s_mul(l, alpha, policy), rs, policy)
    pv = matmul_tiles(p, vt, cfg, policy)
    return mn, l, v_add(v_mul(o, alpha[:, None], policy), pv, policy)


@functools.partial(jax.jit, static_argnames=("cfg", "num_heads", "num_kv_heads", "head_dim", "scale", "causal", "policy"))
def flash_attention(q, k, v, *, cfg, num_heads: int, num_kv_heads: int, head_dim: Optional[int] = None,
                    scale: Optional[float] = None,
                    causal: bool = False, policy: Optional[Policy] = None):
    """Attention as :func:`plena.frontend.ops_attention.flash_attention` computes it.

    ``q``: VRAM values ``(S, H*d)`` (``d = head_dim``: HLEN, MLEN, or any other multiple of
    HLEN via :func:`_flash_general`, the frontend's general head-dim path); ``k``, ``v``: the
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
    batched, lanes = d == hlen, max(1, mlen // d)
    if d not in (hlen, mlen):
        return _flash_general(q, k, v, cfg, num_heads, num_kv_heads, d, scale, causal, policy)
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
                m, l, o = _online_step(s, None if kind is None else mask_of(kind), fscale, m, l, o, vt, cfg, policy)
            y = v_mul(o, s_reci(l, policy)[:, None], policy)
            if lanes > 1:  # the lane merge adds the other heads' zero lanes
                y = v_add(y, 0.0, policy)
            heads_out.append(y)
        out_blocks.append(jnp.concatenate(heads_out, axis=-1))
    return jnp.concatenate(out_blocks, axis=0)[:S]


def _pad_blocks(q, k, v, mlen, policy):
    """Loaded operands padded to whole MLEN blocks (see :func:`flash_attention`)."""
    q = jnp.asarray(q, jnp.float32)
    km = mx_qdq(jnp.asarray(k, jnp.float32), None, policy, "hbm_kv")
    vm = mx_qdq(jnp.asarray(v, jnp.float32), None, policy, "hbm_kv")
    S, Skv = q.shape[0], km.shape[0]
    s_pad, nkb = -(-S // mlen) * mlen, -(-Skv // mlen)
    q = jnp.pad(q, ((0, s_pad - S), (0, 0)))
    km = jnp.pad(km, ((0, nkb * mlen - Skv), (0, 0)))
    vm = jnp.pad(vm, ((0, nkb * mlen - Skv), (0, 0)))
    return q, km, vm, S, s_pad, nkb, Skv - (nkb - 1) * mlen


def _mask(mlen, kind):
    diag, valid = kind
    idx = jnp.arange(mlen)
    lim = jnp.minimum(idx if diag else jnp.full((mlen,), mlen - 1), valid - 1)
    return jnp.where(idx[None, :] > lim[:, None], -jnp.inf, 0.0).astype(jnp.float32)


def _flash_general(q, k, v, cfg, H, Hkv, d, scale, causal, policy):
    """The general head-dim path of :mod:`plena.frontend.ops_attention` (``d`` a multiple of
    HLEN other than HLEN and MLEN), one head at a time::

        Q'_s = lanes of head h moved onto kv head t's lanes of K strip s   (d % MLEN != 0)
             = per run of dims: matmul_tiles(Q block bq, shift_matrix(delta))  (exact: one
               non-zero product per element), zero elsewhere
        Q'_s = Q column block h*n + s                                       (d = n*MLEN)
        s = vram(sum_s Q'_s K_s^T)   (M_TMM per strip, ascending s, one f32 accumulator:
                                      matmul_tiles over the concatenated strips)
        then the online softmax / PV / rescale of :func:`flash_attention` (scale multiplier
        ``scale``, no 0.25), y = vram(o * s_reci(l)), and ``vram(y + 0)`` on the output column
        blocks that two or more heads share (their merge adds the other heads' zero lanes)."""
    mlen = cfg.mlen
    G = H // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    q, km, vm, S, s_pad, nkb, valid_last = _pad_blocks(q, k, v, mlen, policy)
    fscale = fpsram(scale, policy)
    aligned = d % mlen == 0
    nblk_out = (H * d) // mlen
    shared = [sum(1 for h in range(H) if h * d < (c + 1) * mlen and h * d + d > c * mlen) > 1
              for c in range(nblk_out)]
    out_blocks = []
    for qb in range(s_pad // mlen):
        qrows = q[qb * mlen:(qb + 1) * mlen]
        heads_out = []
        for h in range(H):
            t = h // G
            strips, runs = head_layout(mlen, d, h, t)
            if aligned:
                qcat = qrows[:, h * d:(h + 1) * d]
            else:
                parts = [jnp.zeros((mlen, mlen), jnp.float32) for _ in strips]
                for si, i0, i1, bq, dl in runs:
                    x0 = t * d + i0 - strips[si] * mlen
                    sel = matmul_tiles(qrows[:, bq * mlen:(bq + 1) * mlen], jnp.asarray(shift_matrix(mlen, dl)),
                                       cfg, policy)
                    parts[si] = parts[si].at[:, x0:x0 + i1 - i0].set(sel[:, x0:x0 + i1 - i0])
                qcat = jnp.concatenate(parts, axis=-1)
            kcols = slice(strips[0] * mlen, (strips[-1] + 1) * mlen) if not aligned else slice(t * d, (t + 1) * d)
            m = jnp.full((mlen,), -jnp.inf, jnp.float32)
            l = jnp.zeros((mlen,), jnp.float32)
            o = jnp.zeros((mlen, d), jnp.float32)
            for kb in range(nkb):
                if causal and kb > qb:
                    continue
                kind = mask_kind(cfg, causal, qb, kb, nkb, valid_last)
                kt = km[kb * mlen:(kb + 1) * mlen, kcols]
                vt = vm[kb * mlen:(kb + 1) * mlen, t * d:(t + 1) * d]
                s = matmul_tiles(qcat, kt.T, cfg, policy)
                m, l, o = _online_step(s, None if kind is None else _mask(mlen, kind), fscale, m, l, o, vt, cfg,
                                       policy)
            heads_out.append(v_mul(o, s_reci(l, policy)[:, None], policy))
        y = jnp.concatenate(heads_out, axis=-1)
        y = jnp.concatenate([v_add(y[:, c * mlen:(c + 1) * mlen], 0.0, policy) if shared[c]
                             else y[:, c * mlen:(c + 1) * mlen] for c in range(nblk_out)], axis=-1)
        out_blocks.append(y)
    return jnp.concatenate(out_blocks, axis=0)[:S]
