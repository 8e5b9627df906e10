"""Routed mixture-of-experts ops for :class:`~plena.frontend.builder.ProgramBuilder`: the expert
activations (GPT-OSS clamped SwiGLU, SiLU, GELU), a whole expert FFN, the weighted combine, and
the routed MoE layer whose experts are chosen at run time by ``V_TOPK``.

Golden twins (same instruction order, same roundings): :mod:`plena.golden.ops_moe`.
Matrices are :class:`~plena.frontend.ops_basic.VramMatrix` (column-block-major, see
:mod:`plena.frontend.ops_basic`); weights are MX :class:`~plena.frontend.program.HbmTensor`
placed with ``use="weight"``.

Routed MoE (:func:`routed_moe`), per token ``t`` (a hardware loop over the tokens):

1. (before the loop) router logits ``L = X @ W_router`` with :func:`ops_basic.linear`.
2. ``V_TOPK`` on row ``t`` of ``L`` (policy 0: 32 experts, top 4; policy 1: 128, top 8). It
   reads ``ceil(E / VLEN)`` consecutive VRAM rows; when E > VLEN the logits of the token are
   first copied from their column blocks into consecutive scratch rows (``V_MUL_VF`` by 1.0).
   The expert numbers land in INT SRAM, the weights in FP SRAM, at ``t * K`` of the op's slots.
3. For each rank ``k``: ``S_LD_INT e`` reads the expert number into a gp register (**data-
   dependent control**: it becomes an HBM address). Each weight strip of the selected expert is
   loaded with :meth:`ProgramBuilder.load_tile_indexed` (HBM offset ``e * rows_per_expert *
   row_bytes`` computed with ``S_MUL_INT``), and the token row goes through the expert
   (``M_MM`` / ``M_MM_WO`` into BLEN-row scratch matrices, the activation on the token's row,
   the down projection); ``S_LD_FP`` reads the weight and the output row accumulates
   ``o = y * w`` (k = 0), ``y = y * w; o = o + y`` (k > 0).

The experts' weights are stacked in one HBM tensor per projection (:func:`expert_weights`):
``W_gate``/``W_up`` ``[E*D, F]``, ``W_down`` ``[E*F, D]``, expert ``e`` in rows
``e*D .. (e+1)*D`` (resp. ``e*F ..``). D and F are multiples of MLEN.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from plena.frontend.builder import GP0, ProgramBuilder, Reg
from plena.frontend.ops_basic import (VramMatrix, _output, _rows_loop, as_vram, linear,
                                      vram_matrix)
from plena.frontend.program import BuildError, HbmTensor, MramRegion
from plena.golden.ops_ffn import ACTIVATIONS
from plena.golden.ops_moe import EXPERT_ACTIVATIONS, OAI_ALPHA, OAI_LIMIT, TOPK_POLICIES

__all__ = ["expert_weights", "clamp", "expert_activation", "moe_expert", "combine", "topk",
           "routed_moe", "RoutedMoe"]


def expert_weights(b: ProgramBuilder, name: str, ws: Sequence[np.ndarray]) -> HbmTensor:
    """Stack the per-expert weights ``ws[e]`` (each ``[K, N]``) into one MX weight tensor
    ``[E*K, N]`` in HBM, its stored rows padded so that every ``H_PREFETCH_M`` burst of every
    expert stays inside it."""
    ws = [np.asarray(w, np.float32) for w in ws]
    if not ws or any(w.shape != ws[0].shape or w.ndim != 2 for w in ws):
        raise BuildError(f"expert_weights {name!r}: expected a non-empty list of equal 2-D shapes")
    k = ws[0].shape[0]
    p = b.cfg.hbm_m_prefetch_amount
    need = (len(ws) - 1) * k + -(-k // p) * p
    return b.hbm_input(name, np.concatenate(ws, axis=0), use="weight", pad_rows=max(need, len(ws) * k))


# ---------------------------------------------------------------------------------------------
# activations (row emission shared by the whole-matrix and the routed forms)
# ---------------------------------------------------------------------------------------------

class _ActConsts:
    """FP SRAM constants of an expert activation, loaded into fp registers."""

    def __init__(self, b: ProgramBuilder, kind: str, name: str):
        if kind not in EXPERT_ACTIVATIONS:
            raise BuildError(f"{name}: activation {kind!r}: expected one of {EXPERT_ACTIVATIONS}")
        self.b, self.kind = b, kind
        if kind == "swiglu_oai":
            vals, labels = [OAI_LIMIT, -OAI_LIMIT, -OAI_ALPHA, 1.0], ["limit", "-limit", "-alpha", "one"]
        else:
            vals, labels = [-ACTIVATIONS[kind], 1.0], ["-alpha", "one"]
        slot = b.fpsram(f"{name}.consts", vals)
        self.regs = {}
        for i, label in enumerate(labels):
            r = b.fp(f"{name} {label}")
            b.emit("S_LD_FP", r, GP0, slot + i)
            self.regs[label] = r

    def row(self, g: Reg, u: Reg, s: Reg) -> None:
        """One row: ``u = act(g, u)`` (``g`` clobbered), ``s`` a scratch row."""
        b, r = self.b, self.regs
        if self.kind == "swiglu_oai":
            b.emit("V_MIN_VF", g, g, r["limit"], 0)
            b.emit("V_MIN_VF", u, u, r["limit"], 0)
            b.emit("V_MAX_VF", u, u, r["-limit"], 0)
            b.emit("V_MUL_VF", s, g, r["-alpha"], 0)
            b.emit("V_EXP_V", s, s, 0)
            b.emit("V_ADD_VF", s, s, r["one"], 0)
            b.emit("V_RECI_V", s, s, 0)
            b.emit("V_MUL_VV", g, g, s, 0)
            b.emit("V_ADD_VF", u, u, r["one"], 0)
            b.emit("V_MUL_VV", u, u, g, 0)
        else:  # x * sigmoid(a x) * up, as ops_ffn.sigmoid_gate
            b.emit("V_MUL_VF", s, g, r["-alpha"], 0)
            b.emit("V_EXP_V", s, s, 0)
            b.emit("V_ADD_VF", s, s, r["one"], 0)
            b.emit("V_RECI_V", s, s, 0)
            b.emit("V_MUL_VV", s, s, g, 0)
            b.emit("V_MUL_VV", u, s, u, 0)

    def free(self) -> None:
        self.b.free(*self.regs.values())


def clamp(b: ProgramBuilder, x: VramMatrix, *, lo: Optional[float] = None, hi: Optional[float] = None,
          name: str = "clamp") -> VramMatrix:
    """In place ``x = max(min(x, hi), lo)`` (``V_MIN_VF`` then ``V_MAX_VF``, FP SRAM bounds;
    either bound may be omitted). Returns ``x``."""
    if not isinstance(x, VramMatrix):
        raise BuildError(f"clamp {name!r}: x must be a VramMatrix")
    bounds = [(m, v) for m, v in (("V_MIN_VF", hi), ("V_MAX_VF", lo)) if v is not None]
    if not bounds:
        return x
    slot = b.fpsram(f"{name}.bounds", [v for _, v in bounds])
    regs = [b.fp(f"{name} {m}") for m, _ in bounds]
    for i, r in enumerate(regs):
        b.emit("S_LD_FP", r, GP0, slot + i)
    with b.scoped(b.gp(f"{name} blk")) as t, _rows_loop(b, x.rows, name, [x]) as (px,):
        for j in range(x.blocks):
            a = px if j == 0 else t
            if j:
                b.add_imm(t, j * x.block_stride, src=px)
            for (m, _), r in zip(bounds, regs):
                b.emit(m, a, a, r, 0)
    b.free(*regs)
    return x


def expert_activation(b: ProgramBuilder, kind: str, gate: VramMatrix, up: VramMatrix, *,
                      name: str = "act") -> VramMatrix:
    """``up = act(gate, up)`` in place on every row (``gate`` is clobbered; for ``"swiglu_oai"``
    it ends as ``g * sigmoid(1.702 g)`` of the clamped gate). Returns ``up``."""
    if not (isinstance(gate, VramMatrix) and isinstance(up, VramMatrix)) or gate.shape != up.shape:
        raise BuildError(f"expert_activation {name!r}: gate and up must be VramMatrix of one shape")
    consts = _ActConsts(b, kind, name)
    s = b.vram(f"{name}.s", 1)
    with b.scoped(b.gp(f"{name} s"), b.gp(f"{name} tg"), b.gp(f"{name} tu")) as (ps, tg, tu):
        b.li(ps, s.addr)
        with _rows_loop(b, gate.rows, name, [gate, up]) as (pg, pu):
            for j in range(gate.blocks):
                if j:
                    b.add_imm(tg, j * gate.block_stride, src=pg)
                    b.add_imm(tu, j * up.block_stride, src=pu)
                consts.row(pg if j == 0 else tg, pu if j == 0 else tu, ps)
    consts.free()
    return up


def moe_expert(b: ProgramBuilder, x, w_gate: HbmTensor, w_up: HbmTensor, w_down: HbmTensor, *,
               act: str = "swiglu_oai", out: Optional[VramMatrix] = None, name: str = "expert") -> VramMatrix:
    """One expert on every row of ``x``: ``(act(x W_gate, x W_up)) W_down`` with
    :func:`ops_basic.linear` and :func:`expert_activation`. The intermediates stay readable as
    ``NAME.gate.out`` / ``NAME.up.out`` (the latter holds ``h``)."""
    x = as_vram(b, x, f"{name}.x")
    with b.stage(f"{name}.gate_up"):
        g = linear(b, x, w_gate, name=f"{name}.gate")
        u = linear(b, x, w_up, name=f"{name}.up")
    with b.stage(f"{name}.act"):
        expert_activation(b, act, g, u, name=f"{name}.{act}")
    with b.stage(f"{name}.down"):
        return linear(b, u, w_down, out=out, name=f"{name}.down")


def combine(b: ProgramBuilder, outs: Sequence[VramMatrix], weights: Sequence[VramMatrix], *,
            out: Optional[VramMatrix] = None, name: str = "combine") -> VramMatrix:
    """``out = sum_k outs[k] * weights[k]`` (fixed routing: the weights are VRAM matrices of
    the outputs' shape, e.g. a per-row weight broadcast along the row): per row
    ``out = outs[0] * weights[0]`` (V_MUL_VV), then for k > 0 ``outs[k] = outs[k] * weights[k]``
    **in place** and ``out = out + outs[k]`` (V_ADD_VV), as the upstream ``moe_combine``
    program does. ``out`` defaults to ``outs[0]``."""
    if not outs or len(outs) != len(weights):
        raise BuildError(f"combine {name!r}: need as many weights as outputs (>= 1)")
    shape = outs[0].shape
    if any(m.shape != shape for m in list(outs) + list(weights)):
        raise BuildError(f"combine {name!r}: all matrices must have shape {shape}")
    out = outs[0] if out is None else _output(b, out, f"{name}.out", *shape, f"combine {name!r}")
    with b.scoped(b.gp(f"{name} ta"), b.gp(f"{name} tb"), b.gp(f"{name} to")) as temps:
        for k, (y, w) in enumerate(zip(outs, weights)):
            mats = [y, w, out]
            with _rows_loop(b, y.rows, f"{name}.{k}", mats) as ptrs:
                for j in range(y.blocks):
                    ry, rw, ro = ptrs if j == 0 else temps
                    if j:
                        for p, m, t in zip(ptrs, mats, temps):
                            b.add_imm(t, j * m.block_stride, src=p)
                    if k == 0:
                        b.emit("V_MUL_VV", ro, ry, rw, 0)
                    else:
                        b.emit("V_MUL_VV", ry, ry, rw, 0)
                        b.emit("V_ADD_VV", ro, ro, ry, 0)
    return out


# ---------------------------------------------------------------------------------------------
# routed MoE
# ---------------------------------------------------------------------------------------------

def topk(b: ProgramBuilder, logits: VramMatrix, *, policy_id: int = 0, name: str = "topk"):
    """``V_TOPK`` on every row of ``logits`` (``[T, >= E]``): returns the FP SRAM slot of the
    weights and the INT SRAM slot of the expert numbers, ``T*K`` entries each (token-major, rank
    order). Rows whose E logits span several column blocks are first copied into consecutive
    scratch rows (``V_MUL_VF`` by 1.0, exact)."""
    what = f"topk {name!r}"
    if policy_id not in TOPK_POLICIES:
        raise BuildError(f"{what}: V_TOPK policy must be 0 (32 experts, top 4) or 1 (128, top 8)")
    if not isinstance(logits, VramMatrix):
        raise BuildError(f"{what}: logits must be a VramMatrix")
    E, K = TOPK_POLICIES[policy_id]
    if logits.cols < E:
        raise BuildError(f"{what}: logits have {logits.cols} columns; policy {policy_id} ranks {E}")
    T = logits.rows
    fslot = b.fpsram(f"{name}.weights", np.zeros(T * K))
    islot = b.intsram(f"{name}.indices", np.zeros(T * K, np.int64))
    ctx = _TopkEmitter(b, logits, E, name)
    with b.scoped(b.gp(f"{name} w slot"), b.gp(f"{name} i slot")) as (pw, pi):
        b.li(pw, int(fslot))
        b.li(pi, int(islot))
        with _rows_loop(b, T, name, [logits]) as (pl,):
            ctx.emit(pl, pw, pi, policy_id)
            if T > 1:
                b.add_imm(pw, K)
                b.add_imm(pi, K)
    ctx.free()
    return fslot, islot


class _TopkEmitter:
    """Emits V_TOPK for the logits row a register points at (with the copy into consecutive
    rows when E > VLEN)."""

    def __init__(self, b: ProgramBuilder, logits: VramMatrix, experts: int, name: str):
        self.b, self.logits, self.name = b, logits, name
        self.nrows = -(-experts // b.cfg.vlen)
        self.fone = None
        if self.nrows > 1:
            self.rows = b.vram(f"{name}.topk_rows", self.nrows)
            one = b.fpsram(f"{name}.one", [1.0])
            self.fone = b.fp(f"{name} one")
            b.emit("S_LD_FP", self.fone, GP0, one)

    def emit(self, pl: Reg, pw: Reg, pi: Reg, policy_id: int) -> None:
        b = self.b
        with b.scoped(b.gp(f"{self.name} topk src")) as src:
            if self.fone is not None:
                b.li(src, self.rows.addr)
                with b.scoped(b.gp(f"{self.name} blk")) as tb:
                    for j in range(self.nrows):
                        if j:
                            b.add_imm(tb, j * self.logits.block_stride, src=pl)
                        b.emit("V_MUL_VF", src, tb if j else pl, self.fone, 0)
                        b.add_imm(src, b.cfg.vlen)
                b.li(src, self.rows.addr)
            else:
                b.mov(src, pl)
            b.emit("V_TOPK", pw, src, pi, policy_id)

    def free(self) -> None:
        if self.fone is not None:
            self.b.free(self.fone)


class RoutedMoe:
    """What :func:`routed_moe` placed: the output, the router logits, and the FP / INT SRAM
    slots holding every token's top-k weights / expert numbers (``[T*K]``, token-major)."""

    def __init__(self, out, logits, weights, indices, k):
        self.out, self.logits, self.weights, self.indices, self.k = out, logits, weights, indices, k


def _row_matmul(b: ProgramBuilder, xreg: Reg, x_block_stride: int, nk: int, w: HbmTensor, e: Reg,
                experts: int, out: VramMatrix, mram: MramRegion, name: str) -> None:
    """``out[0:BLEN] = X[0:BLEN] @ W_e`` where row i of X's K-chunk c is at ``xreg + c *
    x_block_stride + i * VLEN`` and ``W_e`` is rows ``e*K ..`` of the stacked ``w`` (``e`` a
    run-time expert number)."""
    cfg = b.cfg
    mlen, blen = cfg.mlen, cfg.blen
    P = cfg.hbm_m_prefetch_amount
    K = nk * mlen
    loads = -(-K // P)
    for n in range(out.cols // mlen):
        for t in range(loads):
            b.load_tile_indexed(w, e, experts, K, t * P, n * mlen, mram, tile=t * P // mlen)
        with b.scoped(b.gp(f"{name} m col"), b.gp(f"{name} out col")) as (mcol, ocol):
            b.li(mcol, mram.tile(0))
            b.li(ocol, out.addr(0, n))
            with b.loop(mlen // blen, f"{name} strip {n} col blocks"):
                if nk == 1:
                    b.emit("M_MM", 0, mcol, xreg)
                else:
                    with b.scoped(b.gp(f"{name} m ptr"), b.gp(f"{name} x ptr")) as (mp, vp):
                        b.mov(mp, mcol)
                        b.mov(vp, xreg)
                        with b.loop(nk, f"{name} K chunks"):
                            b.emit("M_MM", 0, mp, vp)
                            b.add_imm(mp, mlen * mlen)
                            b.add_imm(vp, x_block_stride)
                b.emit("M_MM_WO", ocol, GP0, 0)
                b.add_imm(mcol, blen * mlen)
                b.add_imm(ocol, blen)


def routed_moe(b: ProgramBuilder, x, w_router: HbmTensor, w_gate: HbmTensor, w_up: HbmTensor,
               w_down: HbmTensor, *, policy_id: int = 0, act: str = "swiglu_oai",
               out: Optional[VramMatrix] = None, name: str = "moe") -> RoutedMoe:
    """Emit the routed MoE layer (module docstring) on every row of ``x`` ([T, D]).

    ``w_router``: weight ``[D, Epad]`` (Epad a multiple of MLEN, >= E; only the first E logits
    are ranked); ``w_gate``, ``w_up``: stacked ``[E*D, F]``, ``w_down``: ``[E*F, D]``
    (:func:`expert_weights`). Returns a :class:`RoutedMoe` (``.out`` the ``[T, D]`` result)."""
    cfg = b.cfg
    mlen, blen, vlen = cfg.mlen, cfg.blen, cfg.vlen
    what = f"routed_moe {name!r}"
    if policy_id not in TOPK_POLICIES:
        raise BuildError(f"{what}: V_TOPK policy must be 0 (32 experts, top 4) or 1 (128, top 8)")
    E, K = TOPK_POLICIES[policy_id]
    for t, nm in ((w_router, "w_router"), (w_gate, "w_gate"), (w_up, "w_up"), (w_down, "w_down")):
        if not isinstance(t, HbmTensor) or t.use != "weight":
            raise BuildError(f"{what}: {nm} must be an HbmTensor placed with use='weight'")
    if act not in EXPERT_ACTIVATIONS:
        raise BuildError(f"{what}: activation {act!r}: expected one of {EXPERT_ACTIVATIONS}")
    if not isinstance(x, (VramMatrix, HbmTensor)):
        raise BuildError(f"{what}: x must be a VramMatrix or an HbmTensor")
    T, D = x.shape
    if w_router.rows != D or w_router.cols < E:
        raise BuildError(f"{what}: w_router is {w_router.shape}; expected ({D}, >= {E} experts)")
    if w_gate.rows != E * D or w_up.shape != w_gate.shape:
        raise BuildError(f"{what}: w_gate {w_gate.shape} / w_up {w_up.shape} must be stacked "
                         f"[{E} experts * {D}, F] (expert_weights)")
    F = w_gate.cols
    if w_down.shape != (E * F, D):
        raise BuildError(f"{what}: w_down is {w_down.shape}; expected ({E} * {F}, {D})")
    if D % mlen or F % mlen:
        raise BuildError(f"{what}: D = {D} and F = {F} must be multiples of MLEN = {mlen}")
    x = as_vram(b, x, f"{name}.x")
    out = _output(b, out, f"{name}.out", T, D, what)
    if out.region.addr < x.end and x.region.addr < out.end:
        raise BuildError(f"{what}: the output may not overlap x")

    with b.stage(f"{name}.router"):
        logits = linear(b, x, w_router, name=f"{name}.router")
    P = cfg.hbm_m_prefetch_amount
    mram = b.mram(f"{name}.w", -(-max(D, F) // P) * P // mlen)
    hs = [vram_matrix(b, f"{name}.{p}", blen, F, pitch=blen) for p in ("g", "u")]
    ys = vram_matrix(b, f"{name}.y", blen, D, pitch=blen)
    srow = b.vram(f"{name}.s", 1)
    fslot = b.fpsram(f"{name}.weights", np.zeros(T * K))
    islot = b.intsram(f"{name}.indices", np.zeros(T * K, np.int64))

    b.comment(f"{what}: {T} tokens, {E} experts (top {K}), D={D}, F={F}, act={act}")
    consts = _ActConsts(b, act, f"{name}.act")
    ranker = _TopkEmitter(b, logits, E, name)
    fw = b.fp(f"{name} w")
    px, po, pl, pw, pi = (b.gp(f"{name} {s}") for s in ("x row", "out row", "logit row", "w slot", "i slot"))
    b.li(px, x.addr(0))
    b.li(po, out.addr(0))
    b.li(pl, logits.addr(0))
    b.li(pw, int(fslot))
    b.li(pi, int(islot))
    with b.stage(f"{name}.experts"), b.loop(T, f"{name} tokens"):
        ranker.emit(pl, pw, pi, policy_id)
        with b.scoped(b.gp(f"{name} expert"), b.gp(f"{name} addr")) as (e, ta):
            for k in range(K):
                b.comment(f"{what}: rank {k}")
                b.emit("S_LD_INT", e, pi, k)
                _row_matmul(b, px, x.block_stride, D // mlen, w_gate, e, E, hs[0], mram, f"{name}.gate")
                _row_matmul(b, px, x.block_stride, D // mlen, w_up, e, E, hs[1], mram, f"{name}.up")
                with b.scoped(b.gp(f"{name} g"), b.gp(f"{name} u")) as (pg, pu):
                    b.li(ta, srow.addr)
                    for j in range(F // vlen):
                        b.li(pg, hs[0].addr(0, j))
                        b.li(pu, hs[1].addr(0, j))
                        consts.row(pg, pu, ta)
                b.li(ta, hs[1].addr(0))
                _row_matmul(b, ta, hs[1].block_stride, F // mlen, w_down, e, E, ys, mram, f"{name}.down")
                b.emit("S_LD_FP", fw, pw, k)
                for j in range(D // vlen):
                    b.li(ta, ys.addr(0, j))
                    with b.scoped(b.gp(f"{name} o")) as to:
                        b.add_imm(to, j * out.block_stride, src=po)
                        if k == 0:
                            b.emit("V_MUL_VF", to, ta, fw, 0)
                        else:
                            b.emit("V_MUL_VF", ta, ta, fw, 0)
                            b.emit("V_ADD_VV", to, to, ta, 0)
        for r, step in ((px, vlen), (po, vlen), (pl, vlen), (pw, K), (pi, K)):
            b.add_imm(r, step)
    b.free(px, po, pl, pw, pi, fw)
    ranker.free()
    consts.free()
    return RoutedMoe(out, logits, fslot, islot, K)
