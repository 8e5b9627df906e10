"""FFN-family ops for :class:`~plena.frontend.builder.ProgramBuilder`: sigmoid-gated activations
(SiLU, GELU) on VRAM rows, a minimal linear layer on MX weights in HBM, the gated FFN, and RoPE.

The golden twins (same instruction order, same roundings) are in :mod:`plena.golden.ops_ffn`.

Layout of a matrix in VRAM (``[M, N]`` with N a multiple of VLEN): **column-block-major**,
N/VLEN blocks of M consecutive VRAM rows; element (r, c) is in VRAM row
``(c // VLEN) * M + r``, lane ``c % VLEN`` (:func:`to_blocks` / :func:`from_blocks` convert).
For N = VLEN this is plain row-major. It is the layout the systolic array needs: M_MM reads
BLEN consecutive rows of one K-chunk, and M_MM_WO writes BLEN consecutive rows of one output
column block. (It is also the upstream compiler's "stride mode" layout.)

Ops (``b`` is the builder; regions are :class:`~plena.frontend.program.VramRegion`):

* :func:`silu`, :func:`gelu`, :func:`sigmoid_gate`: ``dst = src * sigmoid(a * src)``
  (optionally ``* gate``) for ``nrows`` rows, as V_MUL_VF (by ``-a``) -> V_EXP_V -> V_ADD_VF 1
  -> V_RECI_V -> V_MUL_VV (-> V_MUL_VV gate), in a hardware loop over rows.
* :func:`linear`: ``out[M, N] = x[M, K] @ W[K, N]``, W an MX weight tensor in HBM
  (:func:`weight_input`); K and N multiples of MLEN, M a multiple of BLEN.
* :func:`ffn`: ``out = W_down(act(x W_gate) * (x W_up))``.
* :func:`rope`: ``out = x * cos + rotate_half(x) * sin`` per head of ``head_dim`` lanes.

Every op takes a ``name`` used to label its allocations and stages (default: derived from the
program counter, so it is unique). Ops clobber SCALE / STRIDE (weight loads) and allocate (never
free) scratch VRAM / MRAM / FP SRAM through the builder's bump allocators.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from plena.frontend.builder import GP0, BuildError, ProgramBuilder
from plena.frontend.program import HbmTensor, MramRegion, VramRegion
from plena.golden.ops_ffn import ACTIVATIONS, GELU_ALPHA, SILU_ALPHA, rotate_half_matrix

__all__ = [
    "to_blocks", "from_blocks", "block_rows", "vram_matrix", "load_matrix", "store_matrix",
    "read_matrix", "weight_input", "weight_tiles", "sigmoid_gate", "silu", "gelu", "activation",
    "linear", "ffn", "rope_weight", "rope",
]


# ---------------------------------------------------------------------------------------------
# layout helpers
# ---------------------------------------------------------------------------------------------

def to_blocks(a, vlen: int) -> np.ndarray:
    """``[M, N]`` -> the ``[(N/vlen)*M, vlen]`` VRAM rows of the column-block-major layout."""
    a = np.asarray(a)
    m, n = a.shape
    if n % vlen:
        raise ValueError(f"to_blocks: {n} columns is not a multiple of VLEN {vlen}")
    return a.reshape(m, n // vlen, vlen).transpose(1, 0, 2).reshape(-1, vlen)


def from_blocks(rows, m: int) -> np.ndarray:
    """Inverse of :func:`to_blocks`: VRAM rows ``[(N/vlen)*m (or more), vlen]`` -> ``[m, N]``
    (rows past the whole blocks are ignored)."""
    rows = np.asarray(rows)
    vlen = rows.shape[1]
    nb = rows.shape[0] // m
    return rows[: nb * m].reshape(nb, m, vlen).transpose(1, 0, 2).reshape(m, nb * vlen)


def block_rows(m: int, n: int, vlen: int) -> int:
    """VRAM rows an ``[m, n]`` matrix occupies (``n/vlen * m``)."""
    if n % vlen:
        raise BuildError(f"a matrix with {n} columns does not fit whole VLEN={vlen} rows")
    return n // vlen * m


def vram_matrix(b: ProgramBuilder, name: str, m: int, n: int) -> VramRegion:
    """Allocate VRAM for an ``[m, n]`` matrix (column-block-major)."""
    return b.vram(name, block_rows(m, n, b.cfg.vlen))


def load_matrix(b: ProgramBuilder, t: HbmTensor, region: VramRegion) -> None:
    """Load the whole HBM activation tensor ``t`` [M, N] into ``region`` (column-block-major,
    N/VLEN column blocks of ``load_rows``; M must be a multiple of HBM_V_Prefetch_Amount unless
    N == VLEN)."""
    vlen, m = b.cfg.vlen, t.rows
    for c in range(t.cols // vlen):
        b.load_rows(t, 0, region, c * m, m, col0=c * vlen)


def store_matrix(b: ProgramBuilder, region: VramRegion, t: HbmTensor) -> None:
    """Store ``region`` (column-block-major ``[t.rows, t.cols]``) into the HBM tensor ``t``."""
    vlen, m = b.cfg.vlen, t.rows
    for c in range(t.cols // vlen):
        b.store_rows(region, c * m, t, 0, m, col0=c * vlen)


def read_matrix(prog, result, region, m: int) -> np.ndarray:
    """The ``[m, N]`` matrix held column-block-major in ``region`` after ``result``."""
    return from_blocks(prog.read_vram(result, region), m)


def weight_input(b: ProgramBuilder, name: str, w) -> HbmTensor:
    """Place a weight ``w`` [K, N] in HBM in the weight MX format, its stored rows padded to a
    multiple of the effective HBM_M_Prefetch_Amount (so every ``H_PREFETCH_M`` of
    :func:`linear` stays inside the tensor)."""
    return b.hbm_input(name, w, use="weight", pad_rows=b.cfg.hbm_m_prefetch_amount)


def weight_tiles(cfg, k: int) -> int:
    """MRAM tiles :func:`linear` needs for a weight with ``k`` rows (one column block of all
    K-chunks, loaded in whole H_PREFETCH_M bursts)."""
    p = cfg.hbm_m_prefetch_amount
    return -(-k // p) * (p // cfg.mlen)


def _uniq(b: ProgramBuilder, name: Optional[str], op: str) -> str:
    return name if name is not None else f"{op}@pc{b.pc}"


def _need_rows(what: str, region: VramRegion, rows: int) -> None:
    if not isinstance(region, VramRegion):
        raise BuildError(f"{what}: {region!r} is not a VramRegion")
    if region.rows < rows:
        raise BuildError(f"{what}: region {region.name!r} has {region.rows} rows, {rows} needed")


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------

def sigmoid_gate(b: ProgramBuilder, src: VramRegion, dst: VramRegion, alpha: float, *,
                 nrows: Optional[int] = None, gate: Optional[VramRegion] = None,
                 name: Optional[str] = None) -> None:
    """``dst[i] = src[i] * sigmoid(alpha * src[i])`` (then ``* gate[i]`` if given) for rows
    ``i < nrows`` (default: all of ``src``). ``dst`` may be ``src`` or ``gate``. Per row:

    ``V_MUL_VF t, x, -alpha`` / ``V_EXP_V t`` / ``V_ADD_VF t, 1`` / ``V_RECI_V t`` /
    ``V_MUL_VV dst, t, x`` (with a gate: ``V_MUL_VV t, t, x`` / ``V_MUL_VV dst, t, gate``), with
    ``t`` a one-row scratch.
    """
    name = _uniq(b, name, "act")
    vlen = b.cfg.vlen
    nrows = src.rows if nrows is None else int(nrows)
    if nrows < 1:
        raise BuildError(f"{name}: nrows must be >= 1")
    for region in (src, dst) + ((gate,) if gate is not None else ()):
        _need_rows(name, region, nrows)
    consts = b.fpsram(f"{name}.consts", [-float(alpha), 1.0])
    tmp = b.vram(f"{name}.t", 1)
    b.comment(f"{name}: x * sigmoid({alpha} x){' * gate' if gate is not None else ''}, {nrows} rows")
    regs = [b.gp(f"{name} src"), b.gp(f"{name} dst"), b.gp(f"{name} tmp")]
    if gate is not None:
        regs.append(b.gp(f"{name} gate"))
    fneg, fone = b.fp(f"{name} -alpha"), b.fp(f"{name} one")
    try:
        s, d, t = regs[:3]
        b.li(s, src.addr)
        b.li(d, dst.addr)
        b.li(t, tmp.addr)
        if gate is not None:
            b.li(regs[3], gate.addr)
        b.emit("S_LD_FP", fneg, GP0, consts)
        b.emit("S_LD_FP", fone, GP0, consts + 1)
        with b.loop(nrows, f"{name} rows"):
            b.emit("V_MUL_VF", t, s, fneg, 0)
            b.emit("V_EXP_V", t, t, 0)
            b.emit("V_ADD_VF", t, t, fone, 0)
            b.emit("V_RECI_V", t, t, 0)
            if gate is None:
                b.emit("V_MUL_VV", d, t, s, 0)
            else:  # through t, so that dst may alias src or gate
                b.emit("V_MUL_VV", t, t, s, 0)
                b.emit("V_MUL_VV", d, t, regs[3], 0)
            for r in [s, d] + regs[3:]:
                b.add_imm(r, vlen)
    finally:
        b.free(*regs, fneg, fone)


def silu(b: ProgramBuilder, src: VramRegion, dst: VramRegion, *, nrows: Optional[int] = None,
         gate: Optional[VramRegion] = None, name: Optional[str] = None) -> None:
    """SiLU ``x * sigmoid(x)`` on VRAM rows (see :func:`sigmoid_gate`)."""
    sigmoid_gate(b, src, dst, SILU_ALPHA, nrows=nrows, gate=gate, name=_uniq(b, name, "silu"))


def gelu(b: ProgramBuilder, src: VramRegion, dst: VramRegion, *, nrows: Optional[int] = None,
         gate: Optional[VramRegion] = None, name: Optional[str] = None) -> None:
    """GELU, sigmoid approximation ``x * sigmoid(1.702 x)`` (the upstream ``de_gelu`` formula)."""
    sigmoid_gate(b, src, dst, GELU_ALPHA, nrows=nrows, gate=gate, name=_uniq(b, name, "gelu"))


def activation(b: ProgramBuilder, kind: str, src: VramRegion, dst: VramRegion, **kw) -> None:
    """:func:`silu` or :func:`gelu` by name."""
    if kind not in ACTIVATIONS:
        raise BuildError(f"activation {kind!r}: expected one of {sorted(ACTIVATIONS)}")
    kw["name"] = _uniq(b, kw.get("name"), kind)
    sigmoid_gate(b, src, dst, ACTIVATIONS[kind], **kw)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

def linear(b: ProgramBuilder, x: VramRegion, m: int, w: HbmTensor, out: VramRegion, *,
           mram: Optional[MramRegion] = None, name: Optional[str] = None) -> None:
    """``out[m, N] = x[m, K] @ w[K, N]`` (VRAM matrices column-block-major, ``w`` in HBM).

    For each output column block n (Python-unrolled): ``H_PREFETCH_M`` the K-chunks of
    ``w[:, n*MLEN : (n+1)*MLEN]`` into MRAM tiles 0..K/MLEN-1 of ``mram``; then for each block
    of BLEN rows and each BLEN-column slice j (hardware loops): ``M_MM`` over the K-chunks in
    ascending order into the accumulator, ``M_MM_WO`` to ``out`` (bf16).

    Requirements: K, N multiples of MLEN; m a multiple of BLEN; ``w.stored_rows`` a multiple of
    the effective HBM_M_Prefetch_Amount (:func:`weight_input` does it); ``mram`` (allocated if
    None) has at least :func:`weight_tiles` tiles.
    """
    name = _uniq(b, name, "linear")
    cfg = b.cfg
    mlen, blen, vlen = cfg.mlen, cfg.blen, cfg.vlen
    if not isinstance(w, HbmTensor):
        raise BuildError(f"{name}: weight {w!r} is not an HbmTensor")
    k, n = w.rows, w.cols
    if k % mlen or n % mlen:
        raise BuildError(f"{name}: weight {w.name!r} is {k} x {n}; both must be multiples of MLEN={mlen}")
    m = int(m)
    if m < 1 or m % blen:
        raise BuildError(f"{name}: m = {m} rows must be a positive multiple of BLEN={blen}")
    _need_rows(name, x, block_rows(m, k, vlen))
    _need_rows(name, out, block_rows(m, n, vlen))
    p = cfg.hbm_m_prefetch_amount
    nload = -(-k // p)
    if w.stored_rows < nload * p:
        raise BuildError(f"{name}: weight {w.name!r} stores {w.stored_rows} rows; H_PREFETCH_M moves {p} "
                         f"rows at a time, so it needs {nload * p} (create it with weight_input)")
    ntiles = weight_tiles(cfg, k)
    if mram is None:
        mram = b.mram(f"{name}.w", ntiles)
    elif mram.tiles < ntiles:
        raise BuildError(f"{name}: MRAM region {mram.name!r} has {mram.tiles} tiles, {ntiles} needed")
    nk = k // mlen
    b.comment(f"{name}: [{m} x {k}] @ {w.name}[{k} x {n}] -> {out.name}")
    for nb in range(n // mlen):
        for i in range(nload):
            b.load_tile(w, i * p, nb * mlen, mram, i * (p // mlen))
        o, xr, mj = b.gp(f"{name} out"), b.gp(f"{name} x"), b.gp(f"{name} w")
        try:
            b.li(o, out.row(nb * m))
            b.li(xr, x.addr)
            with b.loop(m // blen, f"{name} row blocks"):
                b.li(mj, mram.addr)
                with b.loop(mlen // blen, f"{name} column slices"):
                    if nk == 1:
                        b.emit("M_MM", 0, mj, xr)
                    else:
                        with b.scoped(b.gp(f"{name} mm"), b.gp(f"{name} vv")) as (mm, vv):
                            b.mov(mm, mj)
                            b.mov(vv, xr)
                            with b.loop(nk, f"{name} k chunks"):
                                b.emit("M_MM", 0, mm, vv)
                                b.add_imm(mm, mlen * mlen)
                                b.add_imm(vv, m * vlen)
                    b.emit("M_MM_WO", o, GP0, 0)
                    b.add_imm(o, blen)
                    b.add_imm(mj, blen * mlen)
                b.add_imm(o, blen * vlen - mlen)
                b.add_imm(xr, blen * vlen)
        finally:
            b.free(o, xr, mj)


# ---------------------------------------------------------------------------------------------
# FFN
# ---------------------------------------------------------------------------------------------

def ffn(b: ProgramBuilder, x: VramRegion, m: int, w_gate: HbmTensor, w_up: HbmTensor,
        w_down: HbmTensor, out: VramRegion, *, act: str = "silu", mram: Optional[MramRegion] = None,
        name: Optional[str] = None) -> None:
    """Gated FFN ``out = (act(x @ W_gate) * (x @ W_up)) @ W_down`` on ``m`` rows.

    ``x``: VRAM ``[m, D]``; ``w_gate``, ``w_up``: HBM weights ``[D, I]``; ``w_down``: ``[I, D_out]``
    (all from :func:`weight_input`); ``out``: VRAM ``[m, D_out]`` (may be ``x``). Scratch: two
    ``[m, I]`` VRAM matrices (``NAME.gate`` holds the gated hidden state afterwards), a VRAM row,
    two FP SRAM constants and, unless ``mram`` is given (to share it between layers), an MRAM
    region of ``max(weight_tiles(D), weight_tiles(I))`` tiles. Stages ``NAME.gate``, ``NAME.up``,
    ``NAME.act``, ``NAME.down``.

    Naming: the activation is applied to ``x @ w_gate`` (Llama / SwiGLU convention). The
    upstream testbench (conformance ``aten_ffn``) applies it to the tensor it calls ``W_up``
    (its golden is ``silu(X @ W_up) * (X @ W_gate)``), so pass its ``W_up`` as ``w_gate``.
    """
    name = _uniq(b, name, "ffn")
    vlen = b.cfg.vlen
    for t in (w_gate, w_up, w_down):
        if not isinstance(t, HbmTensor):
            raise BuildError(f"{name}: weight {t!r} is not an HbmTensor")
    d, i = w_gate.shape
    if w_up.shape != (d, i) or w_down.rows != i:
        raise BuildError(f"{name}: weight shapes gate {w_gate.shape}, up {w_up.shape}, down "
                         f"{w_down.shape} do not chain ([D, I], [D, I], [I, D_out])")
    if act not in ACTIVATIONS:
        raise BuildError(f"{name}: activation {act!r}: expected one of {sorted(ACTIVATIONS)}")
    gate = vram_matrix(b, f"{name}.gate", m, i)
    up = vram_matrix(b, f"{name}.up", m, i)
    if mram is None:
        mram = b.mram(f"{name}.w", max(weight_tiles(b.cfg, d), weight_tiles(b.cfg, i)))
    with b.stage(f"{name}.gate"):
        linear(b, x, m, w_gate, gate, mram=mram, name=f"{name}.gate")
    with b.stage(f"{name}.up"):
        linear(b, x, m, w_up, up, mram=mram, name=f"{name}.up")
    with b.stage(f"{name}.act"):
        sigmoid_gate(b, gate, gate, ACTIVATIONS[act], nrows=block_rows(m, i, vlen), gate=up,
                     name=f"{name}.{act}")
    with b.stage(f"{name}.down"):
        linear(b, gate, m, w_down, out, mram=mram, name=f"{name}.down")


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------

def rope_weight(b: ProgramBuilder, name: str, head_dim: int) -> HbmTensor:
    """The rotate-half matrix of :func:`rope` for ``head_dim`` as an HBM weight (place it once
    and pass it to every :func:`rope` call with ``rot_weight=``)."""
    return weight_input(b, name, rotate_half_matrix(head_dim, b.cfg.vlen))


def rope(b: ProgramBuilder, x: VramRegion, cos: VramRegion, sin: VramRegion, out: VramRegion, *,
         head_dim: int, nrows: Optional[int] = None, rot_weight: Optional[HbmTensor] = None,
         mram: Optional[MramRegion] = None, rot: Optional[VramRegion] = None,
         name: Optional[str] = None) -> None:
    """Rotary embedding, Llama's rotate-half convention, on ``nrows`` VRAM rows (default: all
    of ``x``; a multiple of BLEN): ``out = x * cos + rotate_half(x) * sin``, each row being
    VLEN/head_dim heads of ``head_dim`` lanes. ``cos`` / ``sin`` hold the tables in the same
    layout as ``x`` (one row per row of ``x``; for a head the usual ``[c, c]`` duplicated halves).
    ``out`` may be ``x``.

    rotate_half has no vector instruction (V_SHFT_V only shifts right, within a row), so it is
    one systolic product ``x @ R`` with R the signed permutation of
    :func:`plena.golden.ops_ffn.rotate_half_matrix`, a VLEN x VLEN weight (exact in MX) in HBM:
    ``rot_weight`` from :func:`rope_weight`, else placed by this op (``NAME.R``). Then per row:
    ``V_MUL_VV r, r, sin`` / ``V_MUL_VV out, x, cos`` / ``V_ADD_VV out, out, r``. Scratch:
    ``rot`` (``nrows`` VRAM rows; allocated if None) and ``mram`` (:func:`weight_tiles` (VLEN)
    tiles; allocated if None): pass them to share between calls.
    """
    name = _uniq(b, name, "rope")
    cfg = b.cfg
    vlen = cfg.vlen
    nrows = x.rows if nrows is None else int(nrows)
    head_dim = int(head_dim)
    if head_dim < 2 or head_dim % 2 or vlen % head_dim:
        raise BuildError(f"{name}: head_dim {head_dim} must be even and divide VLEN={vlen}")
    for region in (x, cos, sin, out) + ((rot,) if rot is not None else ()):
        _need_rows(name, region, nrows)
    if rot_weight is None:
        rot_weight = rope_weight(b, f"{name}.R", head_dim)
    elif not (isinstance(rot_weight, HbmTensor) and rot_weight.decoded is not None
              and np.array_equal(rot_weight.decoded, rotate_half_matrix(head_dim, vlen))):
        raise BuildError(f"{name}: rot_weight {getattr(rot_weight, 'name', rot_weight)!r} is not "
                         f"the rotate-half matrix for head_dim {head_dim} (use rope_weight)")
    if rot is None:
        rot = b.vram(f"{name}.rot", nrows)
    linear(b, x, nrows, rot_weight, rot, mram=mram, name=f"{name}.rotate_half")
    b.comment(f"{name}: out = x * cos + rotate_half(x) * sin, {nrows} rows")
    regs = [b.gp(f"{name} {what}") for what in ("x", "cos", "sin", "rot", "out")]
    try:
        rx, rc, rs, rr, ro = regs
        for reg, region in zip(regs, (x, cos, sin, rot, out)):
            b.li(reg, region.addr)
        with b.loop(nrows, f"{name} rows"):
            b.emit("V_MUL_VV", rr, rr, rs, 0)
            b.emit("V_MUL_VV", ro, rx, rc, 0)
            b.emit("V_ADD_VV", ro, ro, rr, 0)
            for reg in regs:
                b.add_imm(reg, vlen)
    finally:
        b.free(*regs)
