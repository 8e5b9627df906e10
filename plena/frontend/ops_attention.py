"""Flash attention (online softmax) emitted into a :class:`~plena.frontend.builder.ProgramBuilder`
with the batched-head matrix ops, as the upstream compiler does it (spec §4.1).

``O = softmax(Q K^T * scale [+ causal mask]) V`` for ``H`` query heads and ``Hkv`` key/value
heads (GQA: query head ``h`` uses kv head ``h // (H / Hkv)``; MHA: ``Hkv == H``).

Scope (what is implemented): ``head_dim == HLEN`` (``BROADCAST_AMOUNT`` heads fill one VRAM
column block, ``BA * HLEN == MLEN == VLEN``; scores with M_BTMM) or ``head_dim == MLEN`` (one
head per column block; scores with M_TMM as the upstream MHA case does), ``H * head_dim`` a
multiple of MLEN, any query / key sequence lengths (equal for ``causal``; lengths that are not
multiples of MLEN are padded to whole blocks: the padded keys are masked to -inf, the padded
query rows computed and ignored), ``HLEN % BLEN == 0``.

Other head dims (multiples of HLEN strictly between HLEN and MLEN, e.g. 32 on MLEN 64) are NOT
implemented and raise a BuildError. They are not impossible on the ISA, but neither product
path fits them directly: M_BTMM reduces over exactly one HLEN slice of every query head lane
(a head of ``r*HLEN`` dims would need the r chunks of one head in the same lane of r different
query rows, i.e. a re-layout of Q), and M_TMM reduces over the whole MLEN row (it would need a
copy of Q per head with the other heads' lanes zeroed and the head moved to its KV head's lane;
VRAM addresses are VLEN-aligned, so lanes cannot be shifted by addressing). Both re-layouts
need an extra permutation matmul per query block.

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
from plena.golden.ops_attention import mask_kind

__all__ = ["BTMM_SCALE", "flash_attention", "fp_state_words", "heads_per_pass", "mask_kind"]

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


def flash_attention(b: ProgramBuilder, q: Union[VramMatrix, HbmTensor], k: HbmTensor, v: HbmTensor, *,
                    num_heads: int, num_kv_heads: int, head_dim: Optional[int] = None,
                    scale: Optional[float] = None,
                    causal: bool = False, out: Optional[VramMatrix] = None,
                    fp_state: Optional[SramSlot] = None, store: Optional[HbmTensor] = None,
                    name: str = "attn") -> VramMatrix:
    """Emit flash attention (see the module docstring) and return the output VramMatrix.

    ``head_dim``: HLEN (default; batched-head M_BTMM scores) or MLEN (one head per column
    block; scores with M_TMM / M_MM_WO, f32-accumulated over the head dim, no 0.25 factor).
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
    if d not in (hlen, mlen):
        raise BuildError(f"{what}: head_dim {d} not supported: HLEN = {hlen} (M_BTMM path) or MLEN = {mlen} "
                         "(M_TMM path) only; other multiples of HLEN need a re-layout of Q that is not "
                         "implemented (see the module docstring)")
    batched = d == hlen
    lanes = mlen // d  # heads per VRAM column block
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
    kinds = sorted({mask_kind(cfg, causal, qb, kb, nkb, valid_last)
                    for qb in range(s_pad // mlen) for kb in range(nkb)} - {None})
    masks = {}
    if kinds:
        window = int(state)  # MLEN zeros then MLEN -inf (before the state is used)
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
                            b.li(p0, scores.addr + g * mlen * mlen)
                            b.li(p1, pv[g].addr(0) + g * d)
                            with _repeat(b, mlen // blen, f"{name} pv rows"):
                                b.li(p2, mram.tile(0) + kcol * mlen)
                                b.mov(p3, p1)
                                with _repeat(b, d // blen, f"{name} pv cols"):
                                    b.emit("M_MM", 0, p2, p0)
                                    b.emit("M_MM_WO", p3, GP0, 0)
                                    b.add_imm(p2, blen * mlen)
                                    b.add_imm(p3, blen)
                                b.add_imm(p0, blen * mlen)
                                b.add_imm(p1, blen * mlen)
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
