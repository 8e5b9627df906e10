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
from jax import lax

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


def _online_step(s, mask, masked, fscale, m, l, o, vt, cfg, policy):
    """One key block of the online softmax, in the program's order: scale, mask (where
    ``masked``), row max, rescale factor, exponentials, row sums, then ``O = O * alpha + P @ V``."""
    mlen = cfg.mlen
    s = v_mul(s, fscale, policy)
    s = jnp.where(masked, v_add(s, mask, policy), s)
    mx = red_max_into(jnp.full((mlen,), -jnp.inf, jnp.float32), s, policy)
    mn = s_max(mx, m, policy)
    alpha = s_exp(s_sub(m, mn, policy), policy)
    p = v_exp(v_sub(s, mn[:, None], policy), policy)
    rs = red_sum_into(jnp.zeros((mlen,), jnp.float32), p, policy)
    l = s_add(s_mul(l, alpha, policy), rs, policy)
    pv = matmul_tiles(p, vt, cfg, policy)
    return mn, l, v_add(v_mul(o, alpha[:, None], policy), pv, policy)


def _head_attention(qh, kh, vh, score, fscale, cfg, causal, valid_last, policy):
    """Online-softmax attention of one head over padded blocks: ``qh`` ``(nqb*MLEN, dq)`` (the
    score operand), ``kh`` ``(nkb*MLEN, dq)``, ``vh`` ``(nkb*MLEN, d)``. Returns
    ``(o, l)``: ``(nqb, MLEN, d)`` and ``(nqb, MLEN)``.

    All query blocks advance together (``vmap``) through one ``lax.scan`` over the key blocks;
    a query block skips (keeps its state for) the key blocks a causal program never visits, and
    the mask of :func:`mask_kind` is formed from the traced block indices, so the traced graph
    holds one online step whatever the sequence length."""
    mlen = cfg.mlen
    nqb, nkb = qh.shape[0] // mlen, kh.shape[0] // mlen
    qblocks = qh.reshape(nqb, mlen, -1)
    kblocks, vblocks = kh.reshape(nkb, mlen, -1), vh.reshape(nkb, mlen, -1)
    idx = jnp.arange(mlen)

    def key_block(carry, xs):
        kb, kt, vt = xs

        def one(qblk, qb, m, l, o):
            diag = jnp.logical_and(causal, kb == qb)
            valid = jnp.where(kb == nkb - 1, valid_last, mlen)
            lim = jnp.minimum(jnp.where(diag, idx, mlen - 1), valid - 1)
            mask = jnp.where(idx[None, :] > lim[:, None], -jnp.inf, 0.0).astype(jnp.float32)
            new = _online_step(score(qblk, kt), mask, diag | (valid < mlen), fscale, m, l, o, vt, cfg, policy)
            visit = jnp.logical_not(jnp.logical_and(causal, kb > qb))
            return tuple(jnp.where(visit, a, b) for a, b in zip(new, (m, l, o)))

        return jax.vmap(one)(qblocks, jnp.arange(nqb), *carry), None

    d = vh.shape[-1]
    init = (jnp.full((nqb, mlen), -jnp.inf, jnp.float32), jnp.zeros((nqb, mlen), jnp.float32),
            jnp.zeros((nqb, mlen, d), jnp.float32))
    (_, l, o), _ = lax.scan(key_block, init, (jnp.arange(nkb), kblocks, vblocks))
    return o, l


@functools.partial(jax.jit, static_argnames=("cfg", "num_heads", "num_kv_heads", "head_dim", "scale", "causal", "policy"))
def flash_attention(q, k, v, *, cfg, num_heads: int, num_kv_heads: int, head_dim: Optional[int] = None,
                    scale: Optional[float] = None,
                    causal: bool = False, policy: Optional[Policy] = None):
    """Attention as :func:`plena.frontend.ops_attention.flash_attention` computes it.

    ``q``: VRAM values ``(S, H*d)`` (``d = head_dim``: HLEN, MLEN, or any other multiple of
    HLEN, the frontend's general head-dim path, see :func:`_general_operands`); ``k``, ``v``:
    the original f32 ``(Skv, C)`` HBM tensors (the op loads them into MRAM: ``mx_qdq`` at
    ``hbm_kv``), kv head t in columns ``t*d..``. Returns ``(S, H*d)`` (VRAM values).

    Per head and key block (``s`` scores, ``m``/``l`` running max / sum as fp registers)::

        s = vram(0.25 * Q_h K_t^T)   [d = HLEN, M_BTMM]   or   vram(Q'_h K'_t^T)  [else, M_TMM]
        s = vram(s * fpsram(scale'))  [then vram(s + mask row) where the program masks]
        mn = s_max(red_max(-inf, s), m); alpha = s_exp(s_sub(m, mn))
        p = vram(exp(vram(s - mn))); l = s_add(s_mul(l, alpha), red_sum(0, p))
        o = vram(vram(o * alpha) + matmul_tiles(p, V_t))
    Sequences that are not whole MLEN blocks are padded (zero query rows, dropped at the end;
    zero keys masked to -inf with the same ``(diag, valid)`` masks as the program, see
    :func:`mask_kind`); causal programs visit key blocks ``0 .. qb`` only.
    Then ``y = vram(o * s_reci(l))``, and ``vram(y + 0)`` on the output column blocks that two
    or more heads share (the lane merge adds the other heads' zero lanes; with d = HLEN < MLEN
    every head's output goes through it).

    Heads and query blocks are vmapped and key blocks scanned (:func:`_head_attention`): the
    traced graph has one online step, so compile time does not grow with heads or sequence."""
    mlen, hlen = cfg.mlen, cfg.hlen
    d = hlen if head_dim is None else head_dim
    H, Hkv = num_heads, num_kv_heads
    G = H // Hkv
    batched = d == hlen
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    q, km, vm, S, s_pad, nkb, valid_last = _pad_blocks(q, k, v, mlen, policy)
    kv_of = np.arange(H) // G  # kv head of each query head
    vh = _per_head(vm, Hkv, d, kv_of)  # (H, Skv_pad, d)
    if batched:
        qh, kh = _per_head(q, H, d, np.arange(H)), _per_head(km, Hkv, d, kv_of)
        fscale = fpsram(scale / BTMM_SCALE, policy)

        def score(qblk, kt):
            return btmm_scores(qblk, kt, hlen, policy)
    else:  # M_TMM over the lanes of the kv head's K strips, M_MM_WO
        qh, kh = _general_operands(q, km, cfg, H, G, d, policy)
        fscale = fpsram(scale, policy)

        def score(qblk, kt):
            return matmul_tiles(qblk, kt.T, cfg, policy)

    head = functools.partial(_head_attention, score=score, fscale=fscale, cfg=cfg, causal=causal,
                             valid_last=valid_last, policy=policy)
    o, l = jax.vmap(head)(qh, kh, vh)  # (H, nqb, MLEN, d), (H, nqb, MLEN)
    y = v_mul(o, s_reci(l, policy)[..., None], policy)
    y = y.transpose(1, 2, 0, 3).reshape(s_pad, H * d)
    if batched and mlen > d:
        y = v_add(y, 0.0, policy)
    elif not batched:
        col_block = np.arange(H * d) // mlen
        heads_in = [sum(1 for h in range(H) if h * d < (c + 1) * mlen and h * d + d > c * mlen)
                    for c in range(col_block[-1] + 1)]
        shared = np.asarray(heads_in)[col_block] > 1
        if shared.any():
            y = jnp.where(shared, v_add(y, 0.0, policy), y)
    return y[:S]


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


def _per_head(x, n: int, d: int, which) -> jnp.ndarray:
    """``(n_out, rows, d)``: head ``which[i]`` of the ``n`` heads in columns ``0 .. n*d`` of
    ``x`` (the tensor may be wider)."""
    return x[:, :n * d].reshape(x.shape[0], n, d)[:, which].transpose(1, 0, 2)


def _general_operands(q, km, cfg, H, G, d, policy):
    """Score operands of the general head-dim path of :mod:`plena.frontend.ops_attention`
    (``d`` a multiple of HLEN other than HLEN), per head ``h`` with kv head ``t = h // G``::

        K'_t = K strips s_lo .. s_hi holding t's columns (whole MLEN-wide strips)
        Q'_h = per strip: the lanes of head h moved onto t's lanes of that strip
             = per run of dims: matmul_tiles(Q block bq, shift_matrix(delta))  (exact: one
               non-zero product per element), zero elsewhere                 (d % MLEN != 0)
             = Q column blocks of head h                                      (d % MLEN == 0)

    so ``Q'_h K'_t^T`` is the M_TMM per strip, ascending, into one f32 accumulator. Heads whose
    kv head spans fewer strips are padded with zero strips at the end: a zero K-chunk adds
    ``+0.0`` to an accumulator that is never ``-0.0``, so the scores are unchanged.

    Returns ``(Q', K')``: ``(H, S_pad, n*MLEN)`` and ``(H, Skv_pad, n*MLEN)``."""
    mlen = cfg.mlen
    if d % mlen == 0:
        return _per_head(q, H, d, np.arange(H)), _per_head(km, H // G, d, np.arange(H) // G)
    layouts = [head_layout(mlen, d, h, h // G) for h in range(H)]
    width = max(len(strips) for strips, _ in layouts) * mlen
    qs, ks = [], []
    for h, (strips, runs) in enumerate(layouts):
        parts = [jnp.zeros((q.shape[0], mlen), jnp.float32) for _ in strips]
        for si, i0, i1, bq, dl in runs:
            x0 = (h // G) * d + i0 - strips[si] * mlen
            sel = matmul_tiles(q[:, bq * mlen:(bq + 1) * mlen], jnp.asarray(shift_matrix(mlen, dl)), cfg, policy)
            parts[si] = parts[si].at[:, x0:x0 + i1 - i0].set(sel[:, x0:x0 + i1 - i0])
        qcat = jnp.concatenate(parts, axis=-1)
        kcat = km[:, strips[0] * mlen:(strips[-1] + 1) * mlen]
        qs.append(jnp.pad(qcat, ((0, 0), (0, width - qcat.shape[1]))))
        ks.append(jnp.pad(kcat, ((0, 0), (0, width - kcat.shape[1]))))
    return jnp.stack(qs), jnp.stack(ks)
