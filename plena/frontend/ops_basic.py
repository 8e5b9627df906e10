"""Basic layer ops emitted into a :class:`~plena.frontend.builder.ProgramBuilder`: linear
(K-split systolic matmul), RMSNorm, LayerNorm, row softmax, residual / embedding add.

Each op has a golden twin in :mod:`plena.golden.ops_basic` that computes the same result with
the same rounding sequence (bit-identical under ``Policy.hardware()``).

Matrix layout in VRAM: :class:`VramMatrix`
-----------------------------------------
A logical ``rows x cols`` bf16 matrix (``cols`` a multiple of VLEN) is stored
**column-block-major**: the columns are cut into ``cols / VLEN`` blocks of VLEN, and block ``j``
occupies ``pitch`` consecutive VRAM rows, so element ``(r, c)`` lives at element address ::

    region.addr + ((c // VLEN) * pitch + r) * VLEN + c % VLEN

``pitch >= rows`` is the number of VRAM rows per column block (the rows past ``rows`` are
padding). This is the layout of the upstream compiler (the conformance case ``aten_linear``
checks its output this way, with ``pitch = rows``); for ``cols == VLEN`` it is plain row-major.
It is also what the systolic array wants: one ``M_MM`` reads BLEN consecutive VRAM rows of one
column block (spec §4.1). The default pitch rounds ``rows`` up to a multiple of BLEN and of the
HBM burst sizes (HBM_V_Prefetch_Amount, HBM_V_Writeback_Amount), so that matmuls and whole-burst
HBM transfers stay inside the block.

Ops take an activation either as a :class:`VramMatrix` or as an activation
:class:`~plena.frontend.program.HbmTensor` (then it is loaded into a new VramMatrix first), and
return the output VramMatrix (allocated unless ``out=`` is given; ``store=`` additionally writes
it to an HBM tensor with H_STORE_V). Allocations are named ``"<name>.<part>"``.

Conventions: the ops clobber the SCALE/STRIDE registers (HBM transfers) and free every register
they allocate; the FP SRAM constants they need are placed with :meth:`ProgramBuilder.fpsram`.
Row ops may run in place (``out`` = the input matrix) but ``out`` must not partly overlap an
input; ``linear``'s output must not overlap its input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional, Union

import numpy as np

from plena.frontend.builder import F0, GP0, ProgramBuilder, Reg
from plena.frontend.program import BuildError, HbmTensor, MramRegion, Program, VramRegion

__all__ = [
    "VramMatrix", "default_pitch", "vram_matrix", "load_matrix", "store_matrix", "as_vram",
    "linear", "rms_norm", "layer_norm", "softmax", "residual_add", "embedding_add",
]

Activation = Union["VramMatrix", HbmTensor]


# ---------------------------------------------------------------------------------------------
# VRAM matrices
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VramMatrix:
    """A logical ``rows x cols`` matrix in VRAM, column-block-major with ``pitch`` VRAM rows per
    column block of VLEN columns (see the module docstring)."""

    region: VramRegion
    rows: int
    cols: int
    pitch: int

    def __post_init__(self):
        vlen = self.region.vlen
        if self.rows < 1 or self.cols < 1 or self.cols % vlen:
            raise BuildError(f"VramMatrix on {self.region.name!r}: shape ({self.rows}, {self.cols}) needs "
                             f"rows >= 1 and cols a positive multiple of VLEN = {vlen}")
        if self.pitch < self.rows or self.pitch * self.blocks > self.region.rows:
            raise BuildError(f"VramMatrix on {self.region.name!r}: pitch {self.pitch} must be >= rows "
                             f"({self.rows}) and {self.blocks} blocks x pitch must fit its "
                             f"{self.region.rows} rows")

    @property
    def name(self) -> str:
        return self.region.name

    @property
    def vlen(self) -> int:
        return self.region.vlen

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def blocks(self) -> int:
        """Number of column blocks (cols / VLEN)."""
        return self.cols // self.region.vlen

    @property
    def block_stride(self) -> int:
        """Element distance between column block j and j+1 of one row (pitch * VLEN)."""
        return self.pitch * self.region.vlen

    def addr(self, row: int, block: int = 0) -> int:
        """Element address of ``row``'s column block ``block`` (any row < pitch)."""
        if not (0 <= row < self.pitch and 0 <= block < self.blocks):
            raise BuildError(f"VramMatrix {self.name!r}: (row {row}, block {block}) out of range")
        return self.region.addr + (block * self.pitch + row) * self.region.vlen

    @property
    def end(self) -> int:
        """One past the last element address of the matrix's blocks."""
        return self.region.addr + self.blocks * self.block_stride

    def read(self, program: Program, result) -> np.ndarray:
        """f32 ``(rows, cols)`` contents after a run (``result`` of ``program.run()``)."""
        raw = program.read_vram(result, self.region)
        blocks = [raw[j * self.pitch: j * self.pitch + self.rows] for j in range(self.blocks)]
        return np.concatenate(blocks, axis=1)

    def to_vram_rows(self, values) -> np.ndarray:
        """Inverse of :meth:`read`: the ``(region.rows, VLEN)`` image of ``values`` (zeros in
        padding rows), e.g. to build a VRAM preload."""
        v = np.asarray(values, np.float32).reshape(self.rows, self.cols)
        out = np.zeros((self.region.rows, self.vlen), np.float32)
        for j in range(self.blocks):
            out[j * self.pitch: j * self.pitch + self.rows] = v[:, j * self.vlen:(j + 1) * self.vlen]
        return out


def default_pitch(cfg, rows: int) -> int:
    """``rows`` rounded up to a multiple of BLEN, HBM_V_Prefetch_Amount and
    HBM_V_Writeback_Amount."""
    unit = math.lcm(cfg.blen, cfg.hbm_v_prefetch_amount, cfg.hbm_v_writeback_amount)
    return -(-rows // unit) * unit


def vram_matrix(b: ProgramBuilder, name: str, rows: int, cols: int, *,
                pitch: Optional[int] = None) -> VramMatrix:
    """Allocate a ``rows x cols`` :class:`VramMatrix` (``pitch`` defaults to
    :func:`default_pitch`)."""
    vlen = b.cfg.vlen
    if cols < 1 or cols % vlen:
        raise BuildError(f"vram_matrix {name!r}: cols = {cols} is not a positive multiple of VLEN = {vlen}")
    pitch = default_pitch(b.cfg, rows) if pitch is None else int(pitch)
    region = b.vram(name, pitch * (cols // vlen))
    return VramMatrix(region, int(rows), int(cols), pitch)


def load_matrix(b: ProgramBuilder, t: HbmTensor, dst: VramMatrix) -> None:
    """H_PREFETCH_V all of ``t`` (MX activation/KV tensor, ``t.shape == dst.shape``) into
    ``dst``, one column block at a time (whole bursts: ``t`` needs stored rows, and ``dst`` a
    pitch, rounded up to HBM_V_Prefetch_Amount)."""
    if not isinstance(t, HbmTensor) or t.shape != dst.shape:
        raise BuildError(f"load_matrix: {getattr(t, 'name', t)!r} {getattr(t, 'shape', '')} does not "
                         f"match {dst.name!r} {dst.shape}")
    _check_burst_fits(b, dst, b.cfg.hbm_v_prefetch_amount, "load_matrix")
    for j in range(dst.blocks):
        b.load_rows(t, 0, dst.region, j * dst.pitch, dst.rows, col0=j * dst.vlen)


def store_matrix(b: ProgramBuilder, src: VramMatrix, t: HbmTensor) -> None:
    """H_STORE_V all of ``src`` into the HBM tensor ``t`` (same shape; hardware MX encoder)."""
    if not isinstance(t, HbmTensor) or t.shape != src.shape:
        raise BuildError(f"store_matrix: {getattr(t, 'name', t)!r} {getattr(t, 'shape', '')} does not "
                         f"match {src.name!r} {src.shape}")
    _check_burst_fits(b, src, b.cfg.hbm_v_writeback_amount, "store_matrix")
    for j in range(src.blocks):
        b.store_rows(src.region, j * src.pitch, t, 0, src.rows, col0=j * src.vlen)


def _check_burst_fits(b: ProgramBuilder, m: VramMatrix, burst: int, what: str) -> None:
    span = -(-m.rows // burst) * burst
    if m.blocks > 1 and span > m.pitch:
        raise BuildError(f"{what} {m.name!r}: {m.rows} rows rounded up to whole bursts of {burst} "
                         f"({span}) exceed the pitch {m.pitch}: a burst would overwrite the next "
                         "column block (use default_pitch)")


def as_vram(b: ProgramBuilder, x: Activation, name: str) -> VramMatrix:
    """``x`` itself if it is a :class:`VramMatrix`; an activation :class:`HbmTensor` is loaded
    into a new VramMatrix called ``name``."""
    if isinstance(x, VramMatrix):
        return x
    if isinstance(x, HbmTensor):
        m = vram_matrix(b, name, x.rows, x.cols)
        load_matrix(b, x, m)
        return m
    raise BuildError(f"{name}: expected a VramMatrix or an HbmTensor, got {type(x).__name__}")


def _output(b: ProgramBuilder, out: Optional[VramMatrix], name: str, rows: int, cols: int,
            what: str) -> VramMatrix:
    if out is None:
        return vram_matrix(b, name, rows, cols)
    if not isinstance(out, VramMatrix) or out.shape != (rows, cols):
        raise BuildError(f"{what}: out must be a VramMatrix of shape ({rows}, {cols}), got "
                         f"{getattr(out, 'shape', out)!r}")
    return out


def _overlap(a: VramMatrix, c: VramMatrix) -> bool:
    return a.region.addr < c.end and c.region.addr < a.end


def _check_alias(what: str, out: VramMatrix, *inputs: Optional[VramMatrix]) -> None:
    for x in inputs:
        if x is not None and x != out and _overlap(out, x):
            raise BuildError(f"{what}: output {out.name!r} partly overlaps input {x.name!r} (use the "
                             "same matrix for in place, or disjoint storage)")


def _row_vector(b: ProgramBuilder, v, cols: int, name: str, what: str) -> Optional[VramMatrix]:
    """A per-column parameter (weight / bias): VramMatrix or HbmTensor of shape (1, cols)."""
    if v is None:
        return None
    m = as_vram(b, v, name)
    if m.shape != (1, cols):
        raise BuildError(f"{what}: {m.name!r} has shape {m.shape}, expected (1, {cols})")
    return m


# ---------------------------------------------------------------------------------------------
# emission helpers
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _repeat(b: ProgramBuilder, n: int, name: str):
    """A hardware loop of ``n`` iterations (nothing for ``n == 1``)."""
    if n == 1:
        yield
    else:
        with b.loop(n, name):
            yield


def _chunk(b: ProgramBuilder, tmp: Reg, ptr: Reg, m: VramMatrix, j: int) -> Reg:
    """Register holding the address of block ``j`` of the row ``ptr`` points at (``ptr`` itself
    for block 0, else ``tmp = ptr + j * pitch * VLEN``)."""
    if j == 0:
        return ptr
    b.add_imm(tmp, j * m.block_stride, src=ptr)
    return tmp


def _const_addr(b: ProgramBuilder, tmp: Reg, m: VramMatrix, j: int) -> Reg:
    """``tmp = address of row 0, block j of m`` (a broadcast row)."""
    b.li(tmp, m.addr(0, j))
    return tmp


def _rows_loop(b: ProgramBuilder, n: int, name: str, mats: list[VramMatrix]):
    """Context manager: allocates one row pointer per matrix (at row 0), runs the body ``n``
    times as a hardware loop and advances every pointer by one VRAM row per iteration. Yields
    the pointers (aliases share one register)."""
    return _RowsLoop(b, n, name, mats)


class _RowsLoop:
    def __init__(self, b, n, name, mats):
        self.b, self.n, self.name, self.mats = b, n, name, mats

    def __enter__(self):
        b = self.b
        self.regs: dict[int, Reg] = {}
        ptrs = []
        for m in self.mats:
            key = m.region.addr
            if key not in self.regs:
                self.regs[key] = b.gp(f"{self.name} row ptr {m.name}")
                b.li(self.regs[key], m.addr(0, 0))
            ptrs.append(self.regs[key])
        self._loop = _repeat(b, self.n, f"{self.name} rows")
        self._loop.__enter__()
        return ptrs

    def __exit__(self, et, ev, tb):
        b = self.b
        try:
            if et is None:
                if self.n > 1:
                    for r in self.regs.values():
                        b.add_imm(r, b.cfg.vlen)
            return self._loop.__exit__(et, ev, tb)
        finally:
            b.free(*self.regs.values())


def _fp_consts(b: ProgramBuilder, name: str, values: list[float], labels: list[str]) -> list[Reg]:
    """Place ``values`` in FP SRAM and load each into a new fp register (S_LD_FP)."""
    slot = b.fpsram(name, values)
    regs = []
    for k, label in enumerate(labels):
        r = b.fp(f"{name} {label}")
        b.emit("S_LD_FP", r, GP0, slot + k, comment=f"{name}: {label} = {float(slot.values[k])!r}")
        regs.append(r)
    return regs


def _finish(b: ProgramBuilder, out: VramMatrix, store: Optional[HbmTensor]) -> VramMatrix:
    if store is not None:
        store_matrix(b, out, store)
    return out


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

def linear(b: ProgramBuilder, x: Activation, w: HbmTensor, *, bias: Optional[Activation] = None,
           out: Optional[VramMatrix] = None, mram: Optional[MramRegion] = None,
           store: Optional[HbmTensor] = None, name: str = "linear") -> VramMatrix:
    """Emit ``Y[M, N] = X[M, K] @ W[K, N] (+ bias)`` and return ``Y`` (a :class:`VramMatrix`).

    * ``x``: activation, :class:`VramMatrix` (M x K) or MX :class:`HbmTensor` (loaded first).
    * ``w``: MX weight :class:`HbmTensor` (``use="weight"``), K x N, with K and N multiples of
      MLEN and stored rows a multiple of the (effective) HBM_M_Prefetch_Amount P
      (``b.hbm_input(..., use="weight", pad_rows=cfg.hbm_m_prefetch_amount)``).
    * ``bias``: optional (1 x N) VramMatrix / HbmTensor, added to every row with V_ADD_VV.
    * ``mram``: MRAM region holding ``ceil(K/P)*P/MLEN`` tiles (allocated if omitted).
    * ``store``: optional HBM tensor (M x N) the result is also written to.

    Program, per column strip ``n`` of MLEN output columns: H_PREFETCH_M the strip
    ``W[:, n*MLEN:(n+1)*MLEN]`` into consecutive MRAM tiles (tile k = K-chunk k); then for every
    block of BLEN rows and every BLEN-column block ``c`` of the strip: ``M_MM`` over the K-chunks
    in ascending order (matrix address ``tile_k + c*BLEN*MLEN``, the row-granular ABI of spec
    §4.1; vector address = rows of X's column block k) accumulating in the systolic array,
    then ``M_MM_WO`` into the output's column block ``n`` at column ``c*BLEN``. All ``pitch``
    rows of X's blocks are multiplied (padding rows produce padding output rows). Finally the
    bias row is added to the M logical rows.
    """
    cfg = b.cfg
    mlen, blen, vlen = cfg.mlen, cfg.blen, cfg.vlen
    what = f"linear {name!r}"
    if not isinstance(x, (VramMatrix, HbmTensor)):
        raise BuildError(f"{what}: x must be a VramMatrix or an HbmTensor, got {type(x).__name__}")
    if not isinstance(w, HbmTensor):
        raise BuildError(f"{what}: w must be an HbmTensor, got {type(w).__name__}")
    if w.use != "weight":
        raise BuildError(f"{what}: weight {w.name!r} must be placed with use='weight' (H_PREFETCH_M format)")
    M, K = x.shape
    if w.rows != K:
        raise BuildError(f"{what}: X is {x.shape} but W is {w.shape}")
    N = w.cols
    if K % mlen or N % mlen:
        raise BuildError(f"{what}: K = {K} and N = {N} must be multiples of MLEN = {mlen} (pad W / X)")
    P = cfg.hbm_m_prefetch_amount
    loads = -(-K // P)
    if w.stored_rows < loads * P:
        raise BuildError(f"{what}: weight {w.name!r} has {w.stored_rows} stored rows; one H_PREFETCH_M "
                         f"moves {P} rows, so pad it to {loads * P} (pad_rows={P})")
    ntiles = loads * P // mlen
    if mram is not None and (not isinstance(mram, MramRegion) or mram.tiles < ntiles):
        raise BuildError(f"{what}: mram needs {ntiles} tiles, got {getattr(mram, 'tiles', mram)!r}")
    if out is not None:
        out = _output(b, out, f"{name}.out", M, N, what)  # validates before anything is placed
    x = as_vram(b, x, f"{name}.x")
    out = _output(b, out, f"{name}.out", M, N, what)
    if _overlap(out, x):
        raise BuildError(f"{what}: the output may not overlap the input {x.name!r}")
    row_blocks = -(-M // blen)
    for m in (x, out):
        if m.pitch < row_blocks * blen:
            raise BuildError(f"{what}: {m.name!r} pitch {m.pitch} < {row_blocks * blen} (M rounded up to BLEN)")
    bias_m = _row_vector(b, bias, N, f"{name}.bias", what)
    if mram is None:
        mram = b.mram(f"{name}.w", ntiles)
    nk = K // mlen
    tile = mlen * mlen

    b.comment(f"{what}: ({M} x {K}) @ {w.name} ({K} x {N}) -> {out.name}")
    for n in range(N // mlen):
        for t in range(loads):
            b.load_tile(w, t * P, n * mlen, mram, tile=t * P // mlen)
        with b.scoped(b.gp(f"{name} x row"), b.gp(f"{name} out row"), b.gp(f"{name} m col"),
                      b.gp(f"{name} out col")) as (xrow, orow, mcol, ocol):
            b.li(xrow, x.addr(0, 0))
            b.li(orow, out.addr(0, n))
            with _repeat(b, row_blocks, f"{name} strip {n} row blocks"):
                b.li(mcol, mram.tile(0))
                b.mov(ocol, orow)
                with _repeat(b, mlen // blen, f"{name} strip {n} col blocks"):
                    if nk == 1:
                        b.emit("M_MM", 0, mcol, xrow)
                    else:
                        with b.scoped(b.gp(f"{name} m ptr"), b.gp(f"{name} x ptr")) as (mp, vp):
                            b.mov(mp, mcol)
                            b.mov(vp, xrow)
                            with _repeat(b, nk, f"{name} K chunks"):
                                b.emit("M_MM", 0, mp, vp)
                                b.add_imm(mp, tile)
                                b.add_imm(vp, x.block_stride)
                    b.emit("M_MM_WO", ocol, GP0, 0)
                    b.add_imm(mcol, blen * mlen)
                    b.add_imm(ocol, blen)
                b.add_imm(xrow, blen * vlen)
                b.add_imm(orow, blen * vlen)
    if bias_m is not None:
        b.comment(f"{what}: + bias {bias_m.name}")
        with _rows_loop(b, M, f"{name} bias", [out]) as (po,), \
                b.scoped(b.gp(f"{name} o blk"), b.gp(f"{name} b blk")) as (to, tb):
            for j in range(out.blocks):
                o = _chunk(b, to, po, out, j)
                b.emit("V_ADD_VV", o, o, _const_addr(b, tb, bias_m, j), 0)
    return _finish(b, out, store)


# ---------------------------------------------------------------------------------------------
# normalisations and softmax (row ops)
# ---------------------------------------------------------------------------------------------

def _row_op_setup(b, x, out, name, what):
    if not isinstance(x, (VramMatrix, HbmTensor)):
        raise BuildError(f"{what}: x must be a VramMatrix or an HbmTensor, got {type(x).__name__}")
    if out is not None:
        _output(b, out, f"{name}.out", *x.shape, what)  # validates before anything is placed
    x = as_vram(b, x, f"{name}.x")
    out = _output(b, out, f"{name}.out", x.rows, x.cols, what)
    _check_alias(what, out, x)
    return x, out


def _emit_inv_std(b, acc, psq, nblocks, chunk, inv_d, feps):
    """acc = 1/sqrt(sum_j(chunk(j)^2) / D + eps): per block V_MUL_VV into scratch ``psq`` and
    V_RED_SUM into ``acc`` (zeroed first), then S_MUL_FP by 1/D, S_ADD_FP eps, S_SQRT_FP,
    S_RECI_FP. ``chunk(j)`` emits what addresses block j and returns its register."""
    b.emit("S_ADD_FP", acc, F0, F0)
    for j in range(nblocks):
        a = chunk(j)
        b.emit("V_MUL_VV", psq, a, a, 0)
        b.emit("V_RED_SUM", acc, psq)
    b.emit("S_MUL_FP", acc, acc, inv_d)
    b.emit("S_ADD_FP", acc, acc, feps)
    b.emit("S_SQRT_FP", acc, acc)
    b.emit("S_RECI_FP", acc, acc)


def rms_norm(b: ProgramBuilder, x: Activation, *, weight: Optional[Activation] = None,
             eps: float = 1e-6, out: Optional[VramMatrix] = None, scratch: Optional[VramRegion] = None,
             store: Optional[HbmTensor] = None, name: str = "rms_norm") -> VramMatrix:
    """Emit RMSNorm over each row of ``x`` (width D, a multiple of VLEN) and return the output.

    Per row (``acc`` an fp register, ``invD = 1/D`` and ``eps`` FP SRAM constants, i.e. their
    f16 -> bf16 preload values)::

        acc = 0                                    S_ADD_FP acc, f0, f0
        for each block j: sq = x_j * x_j           V_MUL_VV sq, x_j, x_j   (scratch row)
                          acc = acc + sum(sq)      V_RED_SUM acc, sq
        acc = acc * invD; acc = acc + eps          S_MUL_FP, S_ADD_FP
        acc = 1 / sqrt(acc)                        S_SQRT_FP, S_RECI_FP
        for each block j: y_j = x_j * acc          V_MUL_VF
                          y_j = y_j * weight_j     V_MUL_VV   (if weight)

    ``weight``: optional (1 x D) VramMatrix / HbmTensor. ``scratch``: one VRAM row (allocated
    if omitted). ``out`` may be ``x`` (in place).
    """
    what = f"rms_norm {name!r}"
    x, out = _row_op_setup(b, x, out, name, what)
    wm = _row_vector(b, weight, x.cols, f"{name}.weight", what)
    sq = scratch if scratch is not None else b.vram(f"{name}.sq", 1)
    D = x.cols
    b.comment(f"{what}: {x.name} ({x.rows} x {D}) -> {out.name}, eps={eps}")
    inv_d, feps = _fp_consts(b, f"{name}.consts", [1.0 / D, eps], ["1/D", "eps"])
    acc = b.fp(f"{name} acc")
    with b.scoped(b.gp(f"{name} sq"), b.gp(f"{name} tx"), b.gp(f"{name} to"), b.gp(f"{name} tw")) \
            as (psq, tx, to, tw):
        b.li(psq, sq.addr)
        with _rows_loop(b, x.rows, name, [x, out]) as (px, po):
            _emit_inv_std(b, acc, psq, x.blocks, lambda j: _chunk(b, tx, px, x, j), inv_d, feps)
            for j in range(x.blocks):
                a = _chunk(b, tx, px, x, j)
                o = _chunk(b, to, po, out, j)
                b.emit("V_MUL_VF", o, a, acc, 0)
                if wm is not None:
                    b.emit("V_MUL_VV", o, o, _const_addr(b, tw, wm, j), 0)
    b.free(acc, inv_d, feps)
    return _finish(b, out, store)


def layer_norm(b: ProgramBuilder, x: Activation, *, weight: Optional[Activation] = None,
               bias: Optional[Activation] = None, eps: float = 1e-5, out: Optional[VramMatrix] = None,
               scratch: Optional[VramRegion] = None, store: Optional[HbmTensor] = None,
               name: str = "layer_norm") -> VramMatrix:
    """Emit LayerNorm over each row of ``x`` (width D, a multiple of VLEN); two-pass variance
    (the centred values are squared, not ``E[x^2] - E[x]^2``). Per row::

        s = 0;  for j: s = s + sum(x_j)              S_ADD_FP, V_RED_SUM
        mean = s * invD                              S_MUL_FP
        for j: y_j = x_j - mean                      V_SUB_VF (into the output)
        v = 0;  for j: sq = y_j * y_j; v += sum(sq)  V_MUL_VV, V_RED_SUM
        v = v * invD; v = v + eps; r = 1/sqrt(v)     S_MUL_FP, S_ADD_FP, S_SQRT_FP, S_RECI_FP
        for j: y_j = y_j * r                         V_MUL_VF
               y_j = y_j * weight_j                  V_MUL_VV (if weight)
               y_j = y_j + bias_j                    V_ADD_VV (if bias)
    """
    what = f"layer_norm {name!r}"
    x, out = _row_op_setup(b, x, out, name, what)
    wm = _row_vector(b, weight, x.cols, f"{name}.weight", what)
    bm = _row_vector(b, bias, x.cols, f"{name}.bias", what)
    sq = scratch if scratch is not None else b.vram(f"{name}.sq", 1)
    D = x.cols
    b.comment(f"{what}: {x.name} ({x.rows} x {D}) -> {out.name}, eps={eps}")
    inv_d, feps = _fp_consts(b, f"{name}.consts", [1.0 / D, eps], ["1/D", "eps"])
    acc, mean = b.fp(f"{name} acc"), b.fp(f"{name} mean")
    with b.scoped(b.gp(f"{name} sq"), b.gp(f"{name} tx"), b.gp(f"{name} to"), b.gp(f"{name} tp")) \
            as (psq, tx, to, tp):
        b.li(psq, sq.addr)
        with _rows_loop(b, x.rows, name, [x, out]) as (px, po):
            b.emit("S_ADD_FP", acc, F0, F0)
            for j in range(x.blocks):
                b.emit("V_RED_SUM", acc, _chunk(b, tx, px, x, j))
            b.emit("S_MUL_FP", mean, acc, inv_d)
            for j in range(x.blocks):
                a = _chunk(b, tx, px, x, j)
                b.emit("V_SUB_VF", _chunk(b, to, po, out, j), a, mean, 0, 0)
            _emit_inv_std(b, acc, psq, x.blocks, lambda j: _chunk(b, to, po, out, j), inv_d, feps)
            for j in range(x.blocks):
                o = _chunk(b, to, po, out, j)
                b.emit("V_MUL_VF", o, o, acc, 0)
                if wm is not None:
                    b.emit("V_MUL_VV", o, o, _const_addr(b, tp, wm, j), 0)
                if bm is not None:
                    b.emit("V_ADD_VV", o, o, _const_addr(b, tp, bm, j), 0)
    b.free(acc, mean, inv_d, feps)
    return _finish(b, out, store)


def softmax(b: ProgramBuilder, x: Activation, *, scale: Optional[float] = None,
            out: Optional[VramMatrix] = None, store: Optional[HbmTensor] = None,
            name: str = "softmax") -> VramMatrix:
    """Emit a softmax over each row of ``x`` (width D, a multiple of VLEN), of ``scale * x``
    when ``scale`` is given (an FP SRAM constant, so its f16 -> bf16 value is what multiplies).
    Per row (``y`` the output row)::

        [for j: y_j = x_j * scale]                   V_MUL_VF            (else y_j = x_j below)
        m = -inf; for j: m = max(m, max(y_j))        S_LD_FP, V_RED_MAX
        s = 0; for j: y_j = exp(y_j - m)             V_SUB_VF, V_EXP_V
                      s = s + sum(y_j)               V_RED_SUM
        r = 1 / s; for j: y_j = y_j * r              S_RECI_FP, V_MUL_VF
    """
    what = f"softmax {name!r}"
    x, out = _row_op_setup(b, x, out, name, what)
    b.comment(f"{what}: {x.name} ({x.rows} x {x.cols}) -> {out.name}, scale={scale}")
    consts = [-np.inf] + ([] if scale is None else [float(scale)])
    regs = _fp_consts(b, f"{name}.consts", consts, ["-inf"] + ([] if scale is None else ["scale"]))
    neg_inf, fscale = regs[0], (regs[1] if scale is not None else None)
    m, s = b.fp(f"{name} max"), b.fp(f"{name} sum")
    with b.scoped(b.gp(f"{name} tx"), b.gp(f"{name} to")) as (tx, to):
        with _rows_loop(b, x.rows, name, [x, out]) as (px, po):
            src = x
            if fscale is not None:
                for j in range(x.blocks):
                    b.emit("V_MUL_VF", _chunk(b, to, po, out, j), _chunk(b, tx, px, x, j), fscale, 0)
                src = out
            ps, ts = (po, to) if src is out else (px, tx)
            b.emit("S_ADD_FP", m, neg_inf, F0)
            for j in range(x.blocks):
                b.emit("V_RED_MAX", m, _chunk(b, ts, ps, src, j), 0)
            b.emit("S_ADD_FP", s, F0, F0)
            for j in range(x.blocks):
                a = _chunk(b, ts, ps, src, j)
                o = _chunk(b, to, po, out, j)
                b.emit("V_SUB_VF", o, a, m, 0, 0)
                b.emit("V_EXP_V", o, o, 0)
                b.emit("V_RED_SUM", s, o)
            b.emit("S_RECI_FP", s, s)
            for j in range(x.blocks):
                o = _chunk(b, to, po, out, j)
                b.emit("V_MUL_VF", o, o, s, 0)
    b.free(m, s, *regs)
    return _finish(b, out, store)


# ---------------------------------------------------------------------------------------------
# element-wise adds
# ---------------------------------------------------------------------------------------------

def _add(b, a, c, out, store, name, what, broadcast: bool) -> VramMatrix:
    a = as_vram(b, a, f"{name}.a")
    c = as_vram(b, c, f"{name}.b")
    if c.cols != a.cols or not (c.rows == a.rows or (broadcast and c.rows == 1)):
        raise BuildError(f"{what}: shapes {a.shape} and {c.shape} do not match"
                         + (" (or (1, cols) to broadcast)" if broadcast else ""))
    out = _output(b, out, f"{name}.out", a.rows, a.cols, what)
    _check_alias(what, out, a, c)
    b.comment(f"{what}: {a.name} + {c.name} -> {out.name}")
    per_row = c.rows == a.rows
    with b.scoped(b.gp(f"{name} ta"), b.gp(f"{name} tc"), b.gp(f"{name} to")) as (ta, tc, to):
        mats = [a, out] + ([c] if per_row else [])
        with _rows_loop(b, a.rows, name, mats) as ptrs:
            pa, po = ptrs[0], ptrs[1]
            for j in range(a.blocks):
                rc = _chunk(b, tc, ptrs[2], c, j) if per_row else _const_addr(b, tc, c, j)
                b.emit("V_ADD_VV", _chunk(b, to, po, out, j), _chunk(b, ta, pa, a, j), rc, 0)
    return _finish(b, out, store)


def residual_add(b: ProgramBuilder, x: Activation, residual: Activation, *,
                 out: Optional[VramMatrix] = None, store: Optional[HbmTensor] = None,
                 name: str = "residual") -> VramMatrix:
    """Emit ``out = x + residual`` (same shapes; V_ADD_VV per row and column block). ``out``
    may be ``x`` or ``residual`` (in place)."""
    return _add(b, x, residual, out, store, name, f"residual_add {name!r}", broadcast=False)


def embedding_add(b: ProgramBuilder, x: Activation, emb: Activation, *,
                  out: Optional[VramMatrix] = None, store: Optional[HbmTensor] = None,
                  name: str = "embedding_add") -> VramMatrix:
    """Emit ``out = x + emb`` (V_ADD_VV): ``emb`` has x's shape (e.g. positional embeddings of
    each row) or is one row (1 x cols) added to every row."""
    return _add(b, x, emb, out, store, name, f"embedding_add {name!r}", broadcast=True)
