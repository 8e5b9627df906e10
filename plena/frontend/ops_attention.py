"""Flash attention (online softmax) emitted into a :class:`~plena.frontend.builder.ProgramBuilder`
with the batched-head matrix ops, as the upstream compiler does it (spec §4.1).

``O = softmax(Q K^T * scale [+ causal mask]) V`` for ``H`` query heads and ``Hkv`` key/value
heads (GQA: query head ``h`` uses kv head ``h // (H / Hkv)``; MHA: ``Hkv == H``).

Scope (what is implemented): ``head_dim`` any multiple of HLEN. ``head_dim == HLEN``
(``BROADCAST_AMOUNT`` heads fill one VRAM column block, ``BA * HLEN == MLEN == VLEN``; scores
with M_BTMM) and ``head_dim == MLEN`` (one head per column block; scores with M_TMM as the
upstream MHA case does) are the upstream paths; every other head dim (``r*HLEN`` between HLEN
and MLEN, e.g. 32 or 48 on MLEN 64; ``n*MLEN``, e.g. 128 = Llama-2/3; or anything else) takes the
*general head-dim path* below. ``H * head_dim`` a multiple of MLEN, any query / key sequence
lengths (equal for ``causal``; lengths that are not multiples of MLEN are padded to whole
blocks: the padded keys are masked to -inf, the padded query rows computed and ignored),
``HLEN % BLEN == 0``.

General head-dim path (``d`` = head_dim not HLEN / MLEN)
--------------------------------------------------------
Neither batched product fits such a head directly: M_BTMM reduces over exactly one HLEN slice
per query-head lane, and M_TMM over a whole MLEN row, while VRAM addresses are VLEN-aligned
(lanes cannot be shifted by addressing). The path therefore runs **one query head at a time**
with M_TMM, summing over the MLEN-wide K *strips* that hold the head's kv head ``t`` in the f32
accumulator (m_accum accumulates across M_TMM instructions until M_MM_WO):

* ``d = n*MLEN``: head ``h`` is Q column blocks ``h*n .. h*n+n-1`` and kv head ``t`` K strips
  ``t*n ..``, at the same offsets: ``S = bf16(((0 + Q_0 K_0^T) + Q_1 K_1^T) + ...)`` (one M_TMM per
  strip, ascending, each an f32 sum over its MLEN dims, then one M_MM_WO): K-chunked QK^T.
* otherwise the head's lanes in Q (columns ``h*d ..``, in one or two column blocks) and the kv
  head's lanes in K (columns ``t*d ..``, one or two strips) are at different offsets. Per query
  block and head, an exact **lane-selection matmul** builds, for every strip ``s`` of ``t``, a
  VRAM block ``Q'_s`` holding the head's Q values at the kv head's lanes of strip ``s`` and
  zeros elsewhere: per run of dims that lies in one Q block ``bq`` and one strip, M_MM of the Q
  block rows by the 0/1 matrix :func:`shift_matrix` ``(delta)`` (``(X @ Sh)[:, x] = X[:, x +
  delta]``, placed in HBM as a weight: 0 and 1 are exact in MX) and M_MM_WO of just those
  columns. Each element is one product ``q * 1`` plus zero products, so ``Q'`` is exact (a -0
  becomes +0; a non-finite Q element would spread NaN over its row). ``Q'`` is re-zeroed when
  the kv head changes. Then ``S = bf16(sum_s Q'_s K_s^T)`` as above: the zero lanes add exact
  zeros, so every score is the f32 sum of the head's ``d`` products, chunked at the strips.
* Then per key block the same online softmax as below (scale multiplier ``scale``, no 0.25),
  ``PV = P V_t`` by M_MM per run of dims written at the head's output lanes of a PV scratch
  (zeroed per head), ``O = O * alpha + PV`` on the head's 1..n+1 output blocks, and at the end
  ``O * (1/l)``: the first head that touches an output column block writes it (V_MUL_VF), later
  ones add their normalised block (zeros outside their lanes, V_ADD_VV), so elements of a
  block shared by two or more heads see one ``+ 0``.

FP SRAM state: one head's ``m``, ``l``, ``alpha`` (3 * MLEN entries). Cost: per query block,
head and key block ``(MLEN/BLEN)^2`` (strips + 1) M_TMM / M_MM_WO for the scores plus
``MLEN/BLEN * d/BLEN`` M_MM for PV (and as many for the lane selection once per query block and
head): much more than the M_BTMM path, which stays the choice for ``d == HLEN``.
:func:`plena.golden.ops_attention.flash_attention` mirrors this sequence.

Layouts
-------
``d`` = head_dim, ``L = MLEN / d`` heads per VRAM column block (BA or 1).

* ``q``: :class:`~plena.frontend.ops_basic.VramMatrix` (or activation HbmTensor) ``S x H*d``,
  head ``h`` in columns ``h*d .. h*d+d`` (column block ``h // L``, lane ``h % L``).
* ``k``, ``v``: HbmTensors (``use="kv"``, loaded with H_PREFETCH_M) ``Skv x C`` with ``C`` a
  multiple of MLEN and ``>= Hkv*d``, kv head ``t`` in columns ``t*d ..``; stored rows
  padded to whole H_PREFETCH_M bursts (``pad_rows=cfg.hbm_m_prefetch_amount``).
* output: VramMatrix ``S x H*d`` in q's layout (the upstream packed-heads O layout).

Program (head_dim = HLEN; for head_dim = MLEN read "lane" as the whole block and step 1 as
M_TMM/M_MM_WO blocks, scale multiplier ``scale``), per query block ``qb`` (MLEN rows) and Q
column block ``j`` (heads ``j*BA + g``), per
key block ``kb`` (``kb <= qb`` when causal) and per kv head ``t`` used by these heads:

1. H_PREFETCH_M the K tile (keys of block kb, the MLEN columns holding ``t``) into MRAM;
   ``M_BTMM 0, tile + (t % BA)*HLEN, Q rows``: ``S_g = 0.25 * Q_g K_t^T`` for all BA heads;
   ``M_BMM_WO`` writes them head-major into the score scratch (BA*MLEN rows).
2. H_PREFETCH_M the V tile into the same MRAM.
3. For every head ``g`` of the block that uses ``t``, per score row (FP SRAM holds the
   running max ``m``, sum ``l`` and the rescale factor ``alpha`` of each row)::

       s = s * (scale / 0.25)                          V_MUL_VF (FP SRAM constant)
       [s = s + mask_row]   (causal, kb == qb)         V_ADD_VV (0 / -inf rows, S_MAP_V_FP)
       mx = -inf; mx = max(mx, max(s))                 S_LD_FP, V_RED_MAX
       mn = max(mx, m_old); alpha = exp(m_old - mn)    S_MAX_FP, S_SUB_FP, S_EXP_FP
       s = exp(s - mn)                                 V_SUB_VF, V_EXP_V
       rs = 0 + sum(s); l = l * alpha + rs             S_ADD_FP, V_RED_SUM, S_MUL_FP, S_ADD_FP

   (``alpha`` is kept per row only: each head is finished before the next one starts), then
   ``PV = P V_t`` with M_MM / M_MM_WO (BLEN rows x BLEN columns of the head, written at
   the head's lane of a per-lane PV scratch whose other lanes stay zero), and per row
   ``O_g = O_g * alpha; O_g = O_g + PV`` (V_MUL_VF, V_ADD_VV).
4. Finally per row ``out = O_0 * (1/l_0)``, then for g > 0 ``O_g = O_g * (1/l_g);
   out = out + O_g`` (S_RECI_FP, V_MUL_VF, V_ADD_VV): the zero lanes make the sum a lane merge.

FP SRAM holds the running state of :func:`heads_per_pass` heads at a time (all BA heads up to
MLEN 64; 2 at MLEN 128, 1 at MLEN 256, where BA heads' rows would not fit the 1024 entries):
the heads of a column block are processed in passes, each recomputing the M_BTMM scores. The
score masks (causal diagonal, padded keys) are built once at the start from a 0 / -inf window
written over the start of that state.

The O accumulators and PV scratch are zeroed with ``V_MUL_VF x, x, f0`` (fresh VRAM is zero,
so they are finite). Registers are freed; SCALE/STRIDE are clobbered.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np

from plena.frontend.builder import F0, GP0, ProgramBuilder
from plena.frontend.ops_basic import (VramMatrix, _finish, _output, _repeat, default_pitch, load_matrix,
                                      vram_matrix)
from plena.frontend.program import BuildError, HbmTensor, SramSlot
from plena.golden.ops_attention import head_layout, mask_kind, shift_matrix

__all__ = ["BTMM_SCALE", "flash_attention", "fp_state_words", "head_layout", "heads_per_pass", "mask_kind",
           "shift_matrix"]

BTMM_SCALE = 0.25  #: fixed factor of the batched-head products (spec §4.1)


FP_STATE_BUDGET = 640  #: FP SRAM entries (of 1024) the online-softmax state may take


def heads_per_pass(cfg, lanes: Optional[int] = None) -> int:
    """Query heads of one VRAM column block whose online softmax runs together (their running
    max / sum rows live in FP SRAM at once): all ``lanes`` (default BROADCAST_AMOUNT) while
    ``(2 * heads + 1) * MLEN`` fits :data:`FP_STATE_BUDGET`, else fewer (1 at MLEN 256); the
    other heads of the block follow in later passes (their scores are recomputed)."""
    lanes = cfg.broadcast_amount if lanes is None else lanes
    return max(1, min(lanes, (FP_STATE_BUDGET // cfg.mlen - 1) // 2))


def fp_state_words(cfg) -> int:
    """FP SRAM scratch entries of one attention op: the online-softmax state, ``(2 * heads +
    1) * MLEN`` with ``heads = heads_per_pass(cfg)`` (the mask window, 2 * MLEN, reuses it)."""
    return (2 * heads_per_pass(cfg) + 1) * cfg.mlen



def _mm_run(b: ProgramBuilder, regs, mram, x_addr: int, tile_col: int, o_addr: int, ncols: int, label: str):
    """``out[:, o .. o+ncols] = X[MLEN rows] @ T[:, tile_col .. +ncols]`` with the MRAM tile in
    slot 0 of ``mram``: one M_MM / M_MM_WO per BLEN x BLEN block (``regs``: four scratch gp)."""
    mlen, blen = b.cfg.mlen, b.cfg.blen
    p0, p1, p2, p3 = regs
    b.li(p0, x_addr)
    b.li(p1, o_addr)
    with _repeat(b, mlen // blen, f"{label} rows"):
        b.li(p2, mram.tile(0) + tile_col * mlen)
        b.mov(p3, p1)
        with _repeat(b, ncols // blen, f"{label} cols"):
            b.emit("M_MM", 0, p2, p0)
            b.emit("M_MM_WO", p3, GP0, 0)
            b.add_imm(p2, blen * mlen)
            b.add_imm(p3, blen)
        b.add_imm(p0, blen * mlen)
        b.add_imm(p1, blen * mlen)

def flash_attention(b: ProgramBuilder, q: Union[VramMatrix, HbmTensor], k: HbmTensor, v: HbmTensor, *,
                    num_heads: int, num_kv_heads: int, head_dim: Optional[int] = None,
                    scale: Optional[float] = None,
                    causal: bool = False, out: Optional[VramMatrix] = None,
                    fp_state: Optional[SramSlot] = None, store: Optional[HbmTensor] = None,
                    name: str = "attn") -> VramMatrix:
    """Emit flash attention (see the module docstring) and return the output VramMatrix.

    ``head_dim``: HLEN (default; batched-head M_BTMM scores), MLEN (one head per column
    block; scores with M_TMM / M_MM_WO, f32-accumulated over the head dim, no 0.25 factor) or
    any other multiple of HLEN (the general head-dim path of the module docstring).
    ``scale`` defaults to ``1/sqrt(head_dim)``; the program multiplies the scores by the FP
    SRAM constant ``scale / 0.25`` (M_BTMM path) or ``scale`` (M_TMM path), i.e. its
    f16 -> bf16 preload value.

    ``fp_state``: FP SRAM scratch of at least :func:`fp_state_words` entries for the running
    max / sum of every row of BA heads and the per-row rescale factor (placed if omitted; FP
    SRAM has only 1024 entries, so several attention ops should share one). The op writes it
    itself (S_ST_FP): its preload values do not matter."""
    cfg = b.cfg
    mlen, blen, hlen, ba = cfg.mlen, cfg.blen, cfg.hlen, cfg.broadcast_amount
    what = f"flash_attention {name!r}"
    if ba * hlen != mlen or cfg.vlen != mlen:
        raise BuildError(f"{what}: needs BROADCAST_AMOUNT * HLEN == MLEN == VLEN")
    if hlen % blen:
        raise BuildError(f"{what}: HLEN = {hlen} must be a multiple of BLEN = {blen} (P V columns per head)")
    H, Hkv = int(num_heads), int(num_kv_heads)
    if H < 1 or Hkv < 1 or H % Hkv:
        raise BuildError(f"{what}: num_heads {H} must be a multiple of num_kv_heads {Hkv}")
    G = H // Hkv
    for t, nm in ((k, "k"), (v, "v")):
        if not isinstance(t, HbmTensor) or t.use != "kv":
            raise BuildError(f"{what}: {nm} must be an HbmTensor placed with use='kv'")
    if k.shape != v.shape:
        raise BuildError(f"{what}: k {k.shape} and v {v.shape} differ")
    Skv, C = k.shape
    d = hlen if head_dim is None else int(head_dim)
    if d < hlen or d % hlen:
        raise BuildError(f"{what}: head_dim {d} not supported: it must be a positive multiple of HLEN = {hlen}")
    batched = d == hlen
    general = d not in (hlen, mlen)  # head_dim = r*HLEN (r > 1) or n*MLEN (n > 1): general_scores path
    lanes = max(1, mlen // d)  # heads per VRAM column block (old paths)
    if C % mlen or C < Hkv * d:
        raise BuildError(f"{what}: k/v shape {k.shape}: columns must be a multiple of MLEN "
                         f"= {mlen} with columns >= num_kv_heads * head_dim = {Hkv * d}")
    P = cfg.hbm_m_prefetch_amount
    nkb = -(-Skv // mlen)  # key blocks; the last holds `valid_last` keys
    valid_last = Skv - (nkb - 1) * mlen
    for t in (k, v):
        last = (nkb - 1) * mlen
        if t.stored_rows < last + P:
            raise BuildError(f"{what}: {t.name!r} needs {last + P} stored rows (pad_rows={P})")
    if not isinstance(q, (VramMatrix, HbmTensor)):
        raise BuildError(f"{what}: q must be a VramMatrix or an HbmTensor")
    S, D = q.shape
    if D != H * d or D % mlen:
        raise BuildError(f"{what}: q shape {q.shape}: expected (rows, num_heads * head_dim "
                         f"= {H * d}, a multiple of MLEN)")
    s_pad = -(-S // mlen) * mlen  # query rows processed (whole blocks)
    if isinstance(q, VramMatrix) and q.pitch < s_pad:
        raise BuildError(f"{what}: q {q.name!r} has pitch {q.pitch}; the op reads whole query blocks, so "
                         f"it needs pitch >= {s_pad} (rows past {S} may hold anything)")
    if out is not None and (not isinstance(out, VramMatrix) or out.pitch < s_pad):
        raise BuildError(f"{what}: out must be a VramMatrix with pitch >= {s_pad} (whole query blocks)")
    if causal and S != Skv:
        raise BuildError(f"{what}: causal needs equal query and key lengths ({S} != {Skv})")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(q, HbmTensor):
        qm = vram_matrix(b, f"{name}.q", S, D, pitch=default_pitch(cfg, s_pad))
        load_matrix(b, q, qm)
        q = qm
    if out is None:
        out = vram_matrix(b, f"{name}.out", S, D, pitch=default_pitch(cfg, s_pad))
    out = _output(b, out, f"{name}.out", S, D, what)
    if out.region.addr < q.end and q.region.addr < out.end:
        raise BuildError(f"{what}: the output may not overlap q")

    if general:
        _flash_general(b, name, q, k, v, out, H, G, d, scale, causal, fp_state, s_pad, nkb, valid_last)
        return _finish(b, out, store)

    # ---- storage
    scores = b.vram(f"{name}.scores", lanes * mlen)
    pv = [vram_matrix(b, f"{name}.pv{g}", mlen, mlen, pitch=mlen) for g in range(lanes)]
    acc = [vram_matrix(b, f"{name}.o{g}", mlen, mlen, pitch=mlen) for g in range(lanes)]
    mram = b.mram(f"{name}.kv", cfg.hbm_m_prefetch_tiles)
    consts = b.fpsram(f"{name}.consts", [-np.inf, scale / BTMM_SCALE if batched else scale])
    need = fp_state_words(cfg)
    if fp_state is None:
        fp_state = b.fpsram(f"{name}.state", np.zeros(need))
    elif not isinstance(fp_state, SramSlot) or fp_state.kind != "fpsram" or fp_state.size < need:
        raise BuildError(f"{what}: fp_state must be an FP SRAM slot of >= {need} entries")
    hpp = heads_per_pass(cfg, lanes)
    state = fp_state  # m [g][row] | l [g][row] | alpha [row] (g < hpp); the mask window first
    M_OFF, L_OFF, A_ABS = 0, hpp * mlen, 2 * hpp * mlen
    fneg, fscale = b.fp(f"{name} -inf"), b.fp(f"{name} scale")
    b.emit("S_LD_FP", fneg, GP0, int(consts))
    b.emit("S_LD_FP", fscale, GP0, int(consts) + 1)
    masks = _build_masks(b, name, what, causal, s_pad, nkb, valid_last, int(state), fneg)
    fa, fb, fc, fd, fe = (b.fp(f"{name} t{i}") for i in range(5))
    gps = [b.gp(f"{name} p{i}") for i in range(4)]
    p0, p1, p2, p3 = gps

    def zero(m: VramMatrix):
        b.li(p0, m.addr(0))
        with _repeat(b, mlen, f"{name} zero {m.name}"):
            b.emit("V_MUL_VF", p0, p0, F0, 0)
            b.add_imm(p0, mlen)

    if lanes > 1:  # M_MM_WO writes only the head's lane; the others must stay zero
        for g in range(lanes):
            zero(pv[g])
    b.comment(f"{what}: q {q.name} ({S} x {D}), {H} heads / {Hkv} kv heads, scale={scale}, causal={causal}")
    for qb in range(s_pad // mlen):
        for j in range(D // mlen):
            for first in range(0, lanes, hpp):
                grp = list(range(first, min(first + hpp, lanes)))  # lanes of this pass
                heads = [j * lanes + g for g in grp]
                kvs = sorted({h // G for h in heads})
                b.comment(f"{what}: query block {qb}, heads {heads[0]}..{heads[-1]}, kv heads {kvs}")
                # init state and accumulators
                b.li(p0, int(state) + M_OFF)
                with _repeat(b, len(grp) * mlen, f"{name} init m"):
                    b.emit("S_ST_FP", fneg, p0, 0)
                    b.emit("S_ST_FP", F0, p0, L_OFF)
                    b.add_imm(p0, 1)
                for g in grp:
                    zero(acc[g])
                for kb in range(nkb):
                    if causal and kb > qb:
                        continue
                    kind = mask_kind(cfg, causal, qb, kb, nkb, valid_last)
                    mask = masks[kind] if kind is not None else None
                    for t in kvs:
                        strip, kcol = (t * d) // mlen, (t * d) % mlen
                        b.load_tile(k, kb * mlen, strip * mlen, mram, tile=0)
                        if batched:
                            b.li(p0, mram.tile(0) + kcol)
                            b.li(p1, q.addr(qb * mlen, j))
                            b.emit("M_BTMM", 0, p0, p1)
                            b.li(p2, scores.addr)
                            b.emit("M_BMM_WO", p2, 0)
                        else:
                            _tmm_scores(b, name, q.addr(qb * mlen, j), mram.tile(0), scores.addr, (p0, p1, p2, p3))
                        b.load_tile(v, kb * mlen, strip * mlen, mram, tile=0)
                        for g in grp:
                            if (j * lanes + g) // G != t:
                                continue
                            gi = g - first
                            _softmax_rows(b, name, scores.addr + g * mlen * mlen, int(state) + gi * mlen,
                                          M_OFF, L_OFF, A_ABS - gi * mlen, mask,
                                          fneg, fscale, (fa, fb, fc, fd, fe), (p0, p1, p2))
                            # PV = P @ V_t into lane g of pv[g]
                            _mm_run(b, (p0, p1, p2, p3), mram, scores.addr + g * mlen * mlen, kcol,
                                    pv[g].addr(0) + g * d, d, f"{name} pv")
                            # O = O * alpha + PV
                            b.li(p0, acc[g].addr(0))
                            b.li(p1, pv[g].addr(0))
                            b.li(p2, int(state) + A_ABS)
                            with _repeat(b, mlen, f"{name} rescale"):
                                b.emit("S_LD_FP", fa, p2, 0)
                                b.emit("V_MUL_VF", p0, p0, fa, 0)
                                b.emit("V_ADD_VV", p0, p0, p1, 0)
                                b.add_imm(p0, mlen)
                                b.add_imm(p1, mlen)
                                b.add_imm(p2, 1)
                # final normalisation and lane merge into the output block (lane 0 writes it)
                for g in grp:
                    b.li(p0, acc[g].addr(0))
                    b.li(p1, out.addr(qb * mlen, j))
                    b.li(p2, int(state) + (g - first) * mlen + L_OFF)
                    with _repeat(b, mlen, f"{name} final"):
                        b.emit("S_LD_FP", fa, p2, 0)
                        b.emit("S_RECI_FP", fa, fa)
                        if g == 0:
                            b.emit("V_MUL_VF", p1, p0, fa, 0)
                        else:
                            b.emit("V_MUL_VF", p0, p0, fa, 0)
                            b.emit("V_ADD_VV", p1, p1, p0, 0)
                        b.add_imm(p0, mlen)
                        b.add_imm(p1, mlen)
                        b.add_imm(p2, 1)
    b.free(fneg, fscale, fa, fb, fc, fd, fe, *gps)
    return _finish(b, out, store)


def _tmm_scores(b, name, q_addr, tile, s_addr, regs):
    """``S = Q K^T`` (one head of MLEN dims) with M_TMM: per block of BLEN query rows and BLEN
    keys one M_TMM (f32 over the MLEN dims) and M_MM_WO into the score rows."""
    mlen, blen = b.cfg.mlen, b.cfg.blen
    pq, pk, po, ps = regs
    b.li(pk, tile)
    b.li(ps, s_addr)
    with _repeat(b, mlen // blen, f"{name} qk key blocks"):
        b.li(pq, q_addr)
        b.mov(po, ps)
        with _repeat(b, mlen // blen, f"{name} qk row blocks"):
            b.emit("M_TMM", 0, pq, pk)
            b.emit("M_MM_WO", po, GP0, 0)
            b.add_imm(pq, blen * mlen)
            b.add_imm(po, blen * mlen)
        b.add_imm(pk, blen * mlen)
        b.add_imm(ps, blen)


def _softmax_rows(b, name, s_addr, st_addr, M_OFF, L_OFF, A_OFF, mask, fneg, fscale, fregs, gregs):
    """The online-softmax update of MLEN score rows at ``s_addr`` (state rows at ``st_addr``)."""
    mlen = b.cfg.mlen
    mo, mx, al, rs, l = fregs
    ps, pst, pm = gregs
    b.li(ps, s_addr)
    b.li(pst, st_addr)
    if mask is not None:
        b.li(pm, mask.addr(0))
    with _repeat(b, mlen, f"{name} softmax rows"):
        b.emit("S_LD_FP", mo, pst, M_OFF)
        b.emit("V_MUL_VF", ps, ps, fscale, 0)
        if mask is not None:
            b.emit("V_ADD_VV", ps, ps, pm, 0)
            b.add_imm(pm, mlen)
        b.emit("S_ADD_FP", mx, fneg, F0)
        b.emit("V_RED_MAX", mx, ps, 0)
        b.emit("S_MAX_FP", mx, mx, mo)
        b.emit("S_SUB_FP", al, mo, mx)
        b.emit("S_EXP_FP", al, al, 0)
        b.emit("S_ST_FP", mx, pst, M_OFF)
        b.emit("S_ST_FP", al, pst, A_OFF)
        b.emit("V_SUB_VF", ps, ps, mx, 0, 0)
        b.emit("V_EXP_V", ps, ps, 0)
        b.emit("S_ADD_FP", rs, F0, F0)
        b.emit("V_RED_SUM", rs, ps)
        b.emit("S_LD_FP", l, pst, L_OFF)
        b.emit("S_MUL_FP", l, l, al)
        b.emit("S_ADD_FP", l, l, rs)
        b.emit("S_ST_FP", l, pst, L_OFF)
        b.add_imm(ps, mlen)
        b.add_imm(pst, 1)


def _build_masks(b, name, what, causal, s_pad, nkb, valid_last, window, fneg):
    """Build the score masks the op needs (see :func:`mask_kind`) as MLEN x MLEN VRAM matrices
    of 0 / -inf from a 0 / -inf window written at FP SRAM ``window`` (the start of the state,
    before it is used); returns ``{(diag, valid): VramMatrix}``."""
    cfg = b.cfg
    mlen = cfg.mlen
    kinds = sorted({mask_kind(cfg, causal, qb, kb, nkb, valid_last)
                    for qb in range(s_pad // mlen) for kb in range(nkb)} - {None})
    masks = {}
    if not kinds:
        return masks
    b.comment(f"{what}: score masks (0 for visible keys, -inf for later / padded ones) via S_MAP_V_FP")
    with b.scoped(b.gp(f"{name} mask row"), b.gp(f"{name} mask src")) as (pr, ps):
        b.li(ps, window)
        with _repeat(b, mlen, f"{name} mask window"):
            b.emit("S_ST_FP", F0, ps, 0)
            b.emit("S_ST_FP", fneg, ps, mlen)
            b.add_imm(ps, 1)
        for diag, valid in kinds:
            mk = masks[(diag, valid)] = vram_matrix(b, f"{name}.mask{int(diag)}_{valid}", mlen, mlen, pitch=mlen)
            b.li(pr, mk.addr(0))
            # row r shows keys c <= lim(r) = min(r if diag else MLEN-1, valid-1): its window
            # starts at window + MLEN-1 - lim(r)
            ramp = valid if diag else 0  # rows whose limit is r itself
            if ramp:
                b.li(ps, window + mlen - 1)
                with _repeat(b, ramp, f"{name} mask ramp"):
                    b.emit("S_MAP_V_FP", pr, ps, 0)
                    b.add_imm(pr, mlen)
                    b.add_imm(ps, -1)
            if mlen - ramp:
                b.li(ps, window + mlen - valid)
                with _repeat(b, mlen - ramp, f"{name} mask rows"):
                    b.emit("S_MAP_V_FP", pr, ps, 0)
                    b.add_imm(pr, mlen)
    return masks


# ---------------------------------------------------------------------------------------------
# general head dims: d = r*HLEN (1 < r, d != MLEN), e.g. 2*HLEN or 2*MLEN
# ---------------------------------------------------------------------------------------------

def _flash_general(b, name, q, k, v, out, H, G, d, scale, causal, fp_state, s_pad, nkb, valid_last):
    """The general head-dim path (module docstring, "Other head dims"): one query head at a
    time, scores with M_TMM accumulated over the K strips of the head in m_accum."""
    cfg = b.cfg
    mlen = cfg.mlen
    pt = cfg.hbm_m_prefetch_tiles
    P = cfg.hbm_m_prefetch_amount
    what = f"flash_attention {name!r}"
    aligned = d % mlen == 0  # heads are whole column blocks, at the same offset in Q and K
    layouts = {h: head_layout(mlen, d, h, h // G) for h in range(H)}
    ns_max = max(len(st) for st, _ in layouts.values())
    nob = {h: (h * d + d - 1) // mlen - (h * d) // mlen + 1 for h in range(H)}  # output blocks of head h
    nob_max = max(nob.values())
    need = 3 * mlen
    if fp_state is None:
        fp_state = b.fpsram(f"{name}.state", np.zeros(need))
    elif not isinstance(fp_state, SramSlot) or fp_state.kind != "fpsram" or fp_state.size < need:
        raise BuildError(f"{what}: fp_state must be an FP SRAM slot of >= {need} entries")
    state = int(fp_state)
    M_OFF, L_OFF, A_OFF = 0, mlen, 2 * mlen

    # ---- storage
    scores = b.vram(f"{name}.scores", mlen)
    pv = vram_matrix(b, f"{name}.pv", mlen, nob_max * mlen, pitch=mlen)
    acc = vram_matrix(b, f"{name}.o", mlen, nob_max * mlen, pitch=mlen)
    mram = b.mram(f"{name}.kv", ns_max * pt)
    kstride = pt * mlen * mlen  # MRAM distance between the K strips of one head
    consts = b.fpsram(f"{name}.consts", [-np.inf, scale])
    if not aligned:
        qsel = vram_matrix(b, f"{name}.qsel", mlen, ns_max * mlen, pitch=mlen)
        deltas = sorted({r[4] for _, runs in layouts.values() for r in runs})
        shifts = b.hbm_input(f"{name}.shift", np.concatenate([shift_matrix(mlen, dl) for dl in deltas]),
                             use="weight", pad_rows=P)
        if not np.array_equal(shifts.decoded[:len(deltas) * mlen],
                              np.concatenate([shift_matrix(mlen, dl) for dl in deltas])):
            raise BuildError(f"{what}: the 0/1 lane-selection matrices are not exact in the weight format")
        shift_row = {dl: i * mlen for i, dl in enumerate(deltas)}
    fneg, fscale = b.fp(f"{name} -inf"), b.fp(f"{name} scale")
    b.emit("S_LD_FP", fneg, GP0, int(consts))
    b.emit("S_LD_FP", fscale, GP0, int(consts) + 1)
    masks = _build_masks(b, name, what, causal, s_pad, nkb, valid_last, state, fneg)
    fregs = tuple(b.fp(f"{name} t{i}") for i in range(5))
    gps = [b.gp(f"{name} p{i}") for i in range(6)]
    p0, p1, p2, p3, p4, p5 = gps

    def zero(addr, rows):
        b.li(p0, addr)
        with _repeat(b, rows, f"{name} zero"):
            b.emit("V_MUL_VF", p0, p0, F0, 0)
            b.add_imm(p0, mlen)

    def mm_run(x_addr, tile_col, o_addr, ncols):
        _mm_run(b, (p0, p1, p2, p3), mram, x_addr, tile_col, o_addr, ncols, f"{name} mm")

    b.comment(f"{what}: q {q.name} {q.shape}, {H} heads / {H // G} kv heads of {d}, scale={scale}, "
              f"causal={causal} (general head-dim path)")
    qsel_t = None  # kv head whose lane pattern qsel currently holds
    for qb in range(s_pad // mlen):
        written = set()  # output column blocks already written in this query block
        for h in range(H):
            t = h // G
            strips, runs = layouts[h]
            ns, hb0 = len(strips), (h * d) // mlen
            b.comment(f"{what}: query block {qb}, head {h}, kv head {t}, K/V strips {strips}")
            if aligned:
                q_addr, q_stride = q.addr(qb * mlen, hb0), q.block_stride
            else:
                # Q'_s = the head's Q lanes moved onto kv head t's lanes of strip s, zero elsewhere
                if qsel_t != t:
                    zero(qsel.addr(0), ns_max * mlen)
                    qsel_t = t
                loaded = None
                for si, i0, i1, bq, dl in runs:
                    if loaded != dl:
                        b.load_tile(shifts, shift_row[dl], 0, mram, tile=0)
                        loaded = dl
                    x0 = t * d + i0 - strips[si] * mlen
                    mm_run(q.addr(qb * mlen, bq), x0, qsel.addr(0, si) + x0, i1 - i0)
                q_addr, q_stride = qsel.addr(0), mlen * mlen
            # init state and accumulators
            b.li(p0, state)
            with _repeat(b, mlen, f"{name} init m"):
                b.emit("S_ST_FP", fneg, p0, M_OFF)
                b.emit("S_ST_FP", F0, p0, L_OFF)
                b.add_imm(p0, 1)
            zero(acc.addr(0), nob[h] * mlen)
            if not aligned:
                zero(pv.addr(0), nob[h] * mlen)
            for kb in range(nkb):
                if causal and kb > qb:
                    continue
                kind = mask_kind(cfg, causal, qb, kb, nkb, valid_last)
                mask = masks[kind] if kind is not None else None
                for si, s in enumerate(strips):
                    b.load_tile(k, kb * mlen, s * mlen, mram, tile=si * pt)
                _tmm_scores_multi(b, name, q_addr, q_stride, mram.tile(0), kstride, ns, scores.addr, gps)
                _softmax_rows(b, name, scores.addr, state, M_OFF, L_OFF, A_OFF, mask, fneg, fscale, fregs,
                              (p0, p1, p2))
                # PV = P @ V_t, written at the head's output lanes of pv
                for si, s in enumerate(strips):
                    b.load_tile(v, kb * mlen, s * mlen, mram, tile=0)
                    for sj, i0, i1, bq, _ in runs:  # runs lie in one output (= Q) block bq
                        if sj == si:
                            mm_run(scores.addr, t * d + i0 - s * mlen, pv.addr(0, bq - hb0) + (h * d + i0) % mlen,
                                   i1 - i0)
                # O = O * alpha + PV
                for ob in range(nob[h]):
                    b.li(p0, acc.addr(0, ob))
                    b.li(p1, pv.addr(0, ob))
                    b.li(p2, state + A_OFF)
                    with _repeat(b, mlen, f"{name} rescale"):
                        b.emit("S_LD_FP", fregs[0], p2, 0)
                        b.emit("V_MUL_VF", p0, p0, fregs[0], 0)
                        b.emit("V_ADD_VV", p0, p0, p1, 0)
                        b.add_imm(p0, mlen)
                        b.add_imm(p1, mlen)
                        b.add_imm(p2, 1)
            # normalise; merge into the output blocks (the first head of a block writes it)
            first = [hb0 + ob not in written for ob in range(nob[h])]
            written.update(hb0 + ob for ob in range(nob[h]))
            b.li(p0, acc.addr(0))
            b.li(p1, out.addr(qb * mlen, hb0))
            b.li(p2, state + L_OFF)
            fa = fregs[0]
            with _repeat(b, mlen, f"{name} final"):
                b.emit("S_LD_FP", fa, p2, 0)
                b.emit("S_RECI_FP", fa, fa)
                for ob in range(nob[h]):
                    pa, po = p0, p1
                    if ob:
                        b.add_imm(p3, ob * mlen * mlen, src=p0)
                        b.add_imm(p4, ob * out.block_stride, src=p1)
                        pa, po = p3, p4
                    if first[ob]:
                        b.emit("V_MUL_VF", po, pa, fa, 0)
                    else:
                        b.emit("V_MUL_VF", pa, pa, fa, 0)
                        b.emit("V_ADD_VV", po, po, pa, 0)
                b.add_imm(p0, mlen)
                b.add_imm(p1, mlen)
                b.add_imm(p2, 1)
    b.free(fneg, fscale, *fregs, *gps)


def _tmm_scores_multi(b, name, q_addr, q_stride, tile, k_stride, ns, s_addr, regs):
    """``S = sum_s Q'_s K_s^T`` over ``ns`` (Q block, K strip) pairs: per block of BLEN query rows
    and BLEN keys ``ns`` M_TMM (ascending s, summed in m_accum) then one M_MM_WO. ``Q'_s`` at
    ``q_addr + s*q_stride``, ``K_s`` at MRAM ``tile + s*k_stride``."""
    mlen, blen = b.cfg.mlen, b.cfg.blen
    pq, pk, po, ps, tq, tk = regs
    b.li(pk, tile)
    b.li(ps, s_addr)
    with _repeat(b, mlen // blen, f"{name} qk key blocks"):
        b.li(pq, q_addr)
        b.mov(po, ps)
        with _repeat(b, mlen // blen, f"{name} qk row blocks"):
            b.emit("M_TMM", 0, pq, pk)
            for s in range(1, ns):
                b.add_imm(tq, s * q_stride, src=pq)
                b.add_imm(tk, s * k_stride, src=pk)
                b.emit("M_TMM", 0, tq, tk)
            b.emit("M_MM_WO", po, GP0, 0)
            b.add_imm(pq, blen * mlen)
            b.add_imm(po, blen * mlen)
        b.add_imm(pk, blen * mlen)
        b.add_imm(ps, blen)
