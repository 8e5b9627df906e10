"""Hardware loops run as one array program: all iterations at once, when they are independent.

Most PLENA loops walk rows: iteration k applies the same vector ops (or M_MM / M_MM_WO
tiles) to rows at addresses that move by a fixed step. When no iteration reads a row an
earlier iteration wrote, and no two iterations write the same element, the loop's result does
not depend on the order of its iterations, so the fast executor (:mod:`plena.emu_jax.fast`)
runs them all at once:

1. **lanes**: the body runs once per iteration under ``vmap``, from the state before the loop.
   Iteration k starts with its induction registers at ``gp + k * step`` and the counter at
   ``count - k``. Memories are read through :class:`LaneMemory`, which overlays the rows the
   iteration itself wrote earlier and records every row it reads.
2. **check** (at run time, the addresses are data): a read of iteration k that meets a row
   written by an iteration j < k is a *conflict*.
3. **commit**: the written elements go into VRAM iteration after iteration (where two
   iterations write one element, the later one's value stays, as in the sequential loop),
   and the registers are those of the last iteration. A conflict is recorded as the
   internal error LANE_CONFLICT, and :func:`plena.emu_jax.api.run` redoes the run without
   lanes, so the final state is the sequential loop's, bit for bit, either way.

Check and commit are two small ``fori_loop``s of dynamic slices over the lanes' rows (XLA:CPU
compiles each as one function), in place of the scatters, masks and key sort a commit in one
operation needed to find and order write-after-write.

Which loops qualify is decided statically from the body's signature (:func:`eligible`): only
the opcodes in :data:`LANE_OPS`; every register the body writes is either an *induction*
register (one ``S_ADDI_INT gX, gX, imm`` per iteration) or *local* (written before it is read
in every iteration); the matrix accumulator, when used, is cleared by M_MM_WO after the last
product of the body. K-chunk product loops inside the body (``LV`` items) are unrolled in
the lane.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from plena.emu_jax import dispatch, memory, structure
from plena.emu_jax.effects import Fields
from plena.emu_jax.errors import Err
from plena.emu_jax.state import Geometry, MachineState
from plena.isa.opcodes import BY_MNEMONIC, OPCODES, Role

U32, I32 = jnp.uint32, jnp.int32
_OP = {m: s.code for m, s in BY_MNEMONIC.items()}
ELEMENTWISE = ("V_ADD_VV", "V_ADD_VF", "V_SUB_VV", "V_SUB_VF", "V_MUL_VV", "V_MUL_VF", "V_EXP_V", "V_RECI_V",
               "V_MAX_VF", "V_MIN_VF")
#: opcodes a vectorised loop body may hold: row-wise vector and tile work, scalar arithmetic,
#: FP SRAM loads (the body never writes FP SRAM, INT SRAM, MRAM or HBM)
LANE_OPS = frozenset(_OP[m] for m in ELEMENTWISE + (
    "V_RED_SUM", "V_RED_MAX", "M_MM", "M_TMM", "M_MM_WO", "S_ADD_INT", "S_ADDI_INT", "S_SUB_INT", "S_MUL_INT",
    "S_LUI_INT", "S_ADD_FP", "S_SUB_FP", "S_MAX_FP", "S_MUL_FP", "S_EXP_FP", "S_RECI_FP", "S_SQRT_FP", "S_LD_FP"))
#: opcodes that do the row or tile work a loop is worth running as lanes for
ROW_WORK = frozenset(_OP[m] for m in ELEMENTWISE + ("V_RED_SUM", "V_RED_MAX", "M_MM", "M_TMM", "M_MM_WO"))
FP_RD_READ = frozenset(_OP[m] for m in ("V_RED_SUM", "V_RED_MAX"))  # fp[rd] accumulates
PRODUCTS = frozenset((structure.MM, structure.TMM))
MM_WO, LD_FP = _OP["M_MM_WO"], _OP["S_LD_FP"]
MIN_COUNT = 2  #: fewer iterations gain nothing
#: bound on lanes x instructions per lane (the arrays of the lanes and of their check)
MAX_LANE_WORK = 1 << 16
MAX_LANE_INSTRUCTIONS = 96  #: instructions one lane emits (LV bodies unrolled)


# ------------------------------------------------------------------------------------------
# the static rule


def _flat(body: tuple):
    """The body as the instruction keys one iteration executes, LV loops unrolled and a
    nested VL loop's body once, with ("C", reg) marking a loop counter set; None when an item
    is not supported."""
    out = []
    for key in body:
        if key[0] in ("I", "K"):  # an instruction, a constant
            out.append(key)
        elif key[0] in ("LV", "VL"):
            _, reg, n, inner = key
            inner_flat = _flat(inner)
            if inner_flat is None:
                return None
            out.append(("C", reg))
            out.extend(inner_flat * (n if key[0] == "LV" else 1))
        else:
            return None
    return out


def lanes_of(count: int, body: tuple) -> int:
    """Iterations the loop runs as lanes: ``count`` times a nested VL loop's lanes."""
    return count * max((lanes_of(k[2], k[3]) for k in body if k[0] == "VL"), default=1)


def _regs(key):
    """(gp read, gp written, fp read, fp written) of one key."""
    if key[0] in ("C", "K"):
        return set(), {key[1]}, set(), set()
    _, op, rd, rs1, rs2, rs3, _f = key
    spec = OPCODES[op]
    fields = {"rd": rd, "rs1": rs1, "rs2": rs2, "rs3": rs3}
    # a field names a gp register the op may read unless the table says it is an fp or
    # address register or unused (flags count: M_MM_WO's rs1 flag field selects gp[rs1] as a
    # stride; a flag that is not a register only makes the rule stricter)
    gp_r = {v for k, v in fields.items() if getattr(spec, k) in (Role.GP, Role.FLAG)
            and not (k == "rd" and op in structure.GP_WRITERS)}
    gp_w = {rd} if op in structure.GP_WRITERS else set()
    writes_fp = spec.fp_dest or op == LD_FP
    fp_r = {v for k, v in fields.items() if getattr(spec, k) is Role.FP and not (k == "rd" and writes_fp)}
    fp_w = {rd} if writes_fp else set()
    if op in FP_RD_READ:
        fp_r.add(rd)
    return gp_r, gp_w, fp_r, fp_w


def _self_increment(key) -> bool:
    return key[0] == "I" and key[1] == structure.ADDI and key[2] == key[3]


def eligible(reg: int, body: tuple, count: int) -> bool:
    """Whether the loop (counter ``reg``, body signature keys, trip count) may run as lanes.
    A body may hold one nested VL loop when everything else in it is scalar work (the lanes
    are then every iteration of the inner loop in every iteration of this one)."""
    flat = _flat(body)
    if not flat or len(flat) > MAX_LANE_INSTRUCTIONS or lanes_of(count, body) * len(flat) > MAX_LANE_WORK:
        return False
    keys = [k for k in flat if k[0] == "I"]
    if any(k[1] not in LANE_OPS for k in keys):
        return False
    if not any(k[1] in ROW_WORK for k in keys):
        return False  # nothing but scalar work: leave it to the plain loop
    nested = [k for k in body if k[0] == "VL"]
    if nested and (len(nested) > 1 or any(k[0] == "LV" or (k[0] == "I" and k[1] in ROW_WORK) for k in body)):
        return False
    ind = induction_registers(reg, body)
    gp_def, fp_def = set(), set()
    written_gp = set().union(*(_regs(k)[1] for k in flat))
    written_fp = set().union(*(_regs(k)[3] for k in flat))
    if reg in written_gp:
        return False
    last_product = max((i for i, k in enumerate(flat) if k[0] == "I" and k[1] in PRODUCTS), default=-1)
    if last_product >= 0:  # m_acc must be cleared after the last product of every iteration
        if not any(k[0] == "I" and k[1] == MM_WO for k in flat[last_product + 1:]):
            return False
    for k in flat:
        gr, gw, fr, fw = _regs(k)
        for r in gr:
            if r in written_gp and r not in gp_def and r not in ind:
                return False
        for r in fr:
            if r in written_fp and r not in fp_def:
                return False
        gp_def |= gw
        fp_def |= fw
    return True


def induction_registers(reg: int, body: tuple) -> frozenset:
    """The gp registers other than the counter that the body (nested loops included) writes
    only by self-increments ``gX = gX + imm``: each iteration moves them by the same amount,
    so iteration k starts at the loop's value + k x that amount."""
    ok: dict[int, bool] = {}
    for k in _flat(body) or []:
        for r in _regs(k)[1]:
            ok[r] = ok.get(r, True) and _self_increment(k)
    return frozenset(r for r, good in ok.items() if good and r != reg)


def _body_items(body: tuple, ops):
    """(key, operands) of each item of a loop body, in order."""
    from plena.emu_jax.fast import operand_count  # (fast imports this module)

    off = 0
    for key in body:
        n = operand_count(key)
        yield key, ops[off: off + n]
        off += n


def _set_constant(st: MachineState, key, o) -> MachineState:
    """A ("K", reg) item: gp[reg] = its operand."""
    return st._replace(gp=st.gp.at[key[1]].set(o[0].astype(U32)))


def _increments(body: tuple, ops, regs: frozenset):
    """u32[16]: how far one iteration of ``body`` (operands ``ops``) moves each register in
    ``regs`` (their self-increments' immediates, times the trip counts of the loops around
    them)."""
    step = jnp.zeros(16, U32)
    for key, o in _body_items(body, ops):
        if key[0] == "I":
            if _self_increment(key) and key[2] in regs:
                step = step.at[key[2]].add(o[1].astype(U32))
        elif key[0] in ("LV", "VL"):  # trip count in the signature
            step = step + U32(key[2]) * _increments(key[3], o[3:], regs)
    return step


# ------------------------------------------------------------------------------------------
# lanes


@jax.tree_util.register_pytree_node_class
class LaneRegs:
    """The gp register file of a lane as 16 separate u32 scalars (one pytree leaf each), in
    place of the state's u32[16] array, for the instructions' ``gp[i]`` and ``gp.at[i].set(v)``
    (``i`` a static register number).

    ``vmap`` batches each leaf on its own, so a register that is the same in every lane (a
    base address, a register only the outer of two nested loops moves) stays one scalar. In a
    tile loop the activation rows then depend on the outer lane alone and the weight columns
    on the inner one: they are gathered once per row block and once per column block, and the
    products broadcast, instead of both being gathered for every (row, column) lane."""

    def __init__(self, regs):
        self.regs = tuple(regs)

    @classmethod
    def of(cls, gp) -> "LaneRegs":
        return gp if isinstance(gp, cls) else cls(gp[i] for i in range(gp.shape[0]))

    def __getitem__(self, i):
        return self.regs[i]

    def array(self):
        return jnp.stack([jnp.asarray(r, U32) for r in self.regs])

    @property
    def at(self):
        return _RegsAt(self)

    def tree_flatten(self):
        return self.regs, None

    @classmethod
    def tree_unflatten(cls, _aux, regs):
        return cls(regs)


class _RegsAt:
    """``regs.at[i].set(value)``: the register file with register ``i`` replaced."""

    def __init__(self, regs: LaneRegs, i: int | None = None):
        self.regs, self.i = regs, i

    def __getitem__(self, i):
        return _RegsAt(self.regs, i)

    def set(self, value) -> LaneRegs:
        regs = list(self.regs.regs)
        regs[self.i] = jnp.asarray(value).astype(U32)
        return LaneRegs(regs)


class LaneMemory:
    """VRAM/MRAM seen by one iteration: the state before the loop plus what this iteration
    wrote, with every VRAM read recorded (M_MM_WO reads nothing: see :class:`_ZeroRows`).

    Writes are kept in order as ``(rows, col0, data)`` with ``rows`` i32[n] and ``data``
    [n, width]: one whole row (vector ops; col0 = 0, VLEN values) or the BLEN rows of an
    M_MM_WO, each a BLEN-wide column span from col0; a later row of the same entry wins."""

    def __init__(self, geo: Geometry, vram, mram):
        self.geo, self.vram, self.mram = geo, vram, mram
        self.writes: list = []  # (rows i32[n], col0 i32, data [n, VLEN] or [n, BLEN])
        self.tags: list = []  # per write: the address register value of a whole-row write, else None
        self.reads: list = []  # (row i32[n], own bool[n]): rows read; own = whole row written before by this iteration

    def vram_rows(self, row, n):
        row = jnp.asarray(row, U32)
        data = memory.rows_window(self.vram, row, n, self.geo.vram_rows)
        rows = row.astype(I32) + jnp.arange(n, dtype=I32)
        own = jnp.zeros(n, bool)
        for w_rows, col0, w_data in self.writes:
            for j in range(w_rows.shape[0]):
                hit = (rows == w_rows[j]) & (w_rows[j] < self.geo.vram_rows)
                if w_data.shape[1] == self.geo.cfg.vlen:
                    data = jnp.where(hit[:, None], w_data[j][None], data)
                    own = own | hit
                else:
                    merged = lax.dynamic_update_slice(data, jnp.broadcast_to(w_data[j], (n, w_data.shape[1])),
                                                      (0, col0))
                    data = jnp.where(hit[:, None], merged, data)
        self.reads.append((rows, own))
        return data

    def write(self, rows, col0, data, tag=None):
        """Record a write. ``tag``: for one whole row, the traced value of the register that
        addresses it. An earlier whole-row write with the same tag (the register has not
        changed since) wrote the same row and is dropped: nothing reads it any more, and its
        data is then not computed at all (an in-place chain of vector ops on one row keeps
        only its last write)."""
        if tag is not None:
            keep = [i for i, t in enumerate(self.tags) if t is None or t is not tag]
            self.writes, self.tags = [self.writes[i] for i in keep], [self.tags[i] for i in keep]
        self.writes.append((rows, col0, data))
        self.tags.append(tag)

    def tile_cols(self, tile, c0, width):
        return memory.tile_cols(self.geo, _Mram(self.mram), tile, c0, width)

    def tile_rows(self, tile, r0, n):
        return memory.tile_rows(self.geo, _Mram(self.mram), tile, r0, n)


class _ZeroRows:
    """A VRAM view that reads zeros ``width`` elements wide (rows whose contents the
    instruction does not keep)."""

    def __init__(self, width: int, dtype):
        self.width, self.dtype = width, dtype

    def vram_rows(self, row, n):
        return jnp.zeros((n, self.width), self.dtype)


class _Mram:
    def __init__(self, mram):
        self.mram = mram


def _wo_column(geo: Geometry, st: MachineState, f: Fields):
    """The first column an M_MM_WO row write replaces (as ops_matrix.m_mm_wo places it)."""
    c = geo.cfg
    col = (st.gp[f.rd] + memory.u32(f.imm18)) % U32(c.mlen)
    return jnp.minimum(col, U32(c.mlen - c.blen)).astype(I32)


def _lane_instr(geo: Geometry, key, o, st: MachineState, mem: LaneMemory, err, err_pc):
    op, rd = key[1], key[2]
    pc = o[0]
    spec = OPCODES[op]
    if dispatch.FP_DEST[op] and rd == 0:
        return st, err, err_pc
    fn = dispatch.IMPLEMENTATIONS[spec.mnemonic]
    f = Fields.of_key(key, o[1], o[2])
    nsub = int(dispatch.micro_steps(geo.cfg)[op])
    if op == MM_WO:
        return _lane_mm_wo(geo, fn, f, pc, nsub, st, mem, err, err_pc)
    for sub in range(nsub):
        view = st._replace(pc=pc, sub=jnp.int32(sub), vram=mem, mram=mem)
        eff = fn(geo, view, f)
        ok = eff.err == 0
        if spec.mnemonic in ELEMENTWISE:
            row = jnp.where(ok, eff.vram_row, geo.vram_rows).astype(I32)
            mem.write(row[None], jnp.int32(0), eff.vram_data[None], tag=st.gp[rd])
        first = (err == 0) & ~ok
        err, err_pc = jnp.where(first, eff.err, err), jnp.where(first, pc, err_pc)
        st = st._replace(gp=eff.gp, fp=eff.fp, m_acc=eff.m_acc)
    return st, err, err_pc


def _lane_mm_wo(geo: Geometry, fn, f: Fields, pc, nsub: int, st: MachineState, mem: LaneMemory, err, err_pc):
    """M_MM_WO in a lane: its BLEN rows at once, kept as one entry of BLEN column spans.
    It reads its rows only to merge the new columns in, and a lane keeps just those columns,
    so it reads BLEN-wide rows of zeros (:class:`_ZeroRows`) instead of the lane's memory: its
    update of the columns at col0 then starts at 0 (XLA clamps a dynamic_update_slice into
    bounds) and replaces the whole row, which is the span itself (no VLEN-wide zero rows per
    lane and row, no slicing the span back out)."""
    source = _ZeroRows(geo.cfg.blen, mem.vram.dtype)
    col0 = _wo_column(geo, st, f)

    def row(sub):
        eff = fn(geo, st._replace(pc=pc, sub=sub, vram=source, mram=source), f)
        return eff.vram_row, eff.vram_data, eff.err, eff.m_acc

    rows, data, errs, accs = jax.vmap(row)(jnp.arange(nsub, dtype=I32))
    ok = errs == 0
    mem.write(jnp.where(ok, rows, geo.vram_rows).astype(I32), col0, data)
    bad = ~ok
    first = (err == 0) & jnp.any(bad)
    err, err_pc = jnp.where(first, errs[jnp.argmax(bad)], err), jnp.where(first, pc, err_pc)
    # the last row clears the accumulator (when every row succeeded; else the run fails)
    return st._replace(m_acc=accs[-1]), err, err_pc


def _uses_acc(body: tuple) -> bool:
    return any(k[0] == "I" and (k[1] in PRODUCTS or k[1] == MM_WO) for k in _flat(body) or [])


def _start(st: MachineState, reg: int, count: int, body: tuple, body_ops, k) -> MachineState:
    """The registers at the start of iteration k, from the state before the loop."""
    ind = induction_registers(reg, body)
    step = _increments(body, body_ops, ind)
    gp = LaneRegs.of(st.gp)  # registers that no iteration moves stay unbatched
    moved = [gp[r] + k.astype(U32) * step[r] if r in ind else gp[r] for r in range(len(gp.regs))]
    gp = LaneRegs(moved).at[reg].set((count - k).astype(U32))
    if not _uses_acc(body):
        return st._replace(gp=gp)
    # the accumulator: the state's for iteration 0; cleared by the previous iteration's M_MM_WO
    # for the others (eligible() checks that the body ends its m_acc use with one)
    return st._replace(gp=gp, m_acc=jnp.where(k == 0, st.m_acc, jnp.zeros_like(st.m_acc)))


def _writes(geo: Geometry, writes: list, vram_dtype):
    """One iteration's writes as (whole rows, column spans), each (row, [col0,] data, mask)
    with one entry per row: mask = the elements no later write of the same iteration replaces
    (so each element the iteration writes has one entry that writes it, and the order of its
    entries no longer matters); and every row it writes (-1: none, outside VRAM)."""
    vlen, blen = geo.cfg.vlen, geo.cfg.blen
    masks = []
    for i, (rows, col0, data) in enumerate(writes):
        n, width = data.shape
        cols = col0 + jnp.arange(width, dtype=I32)
        covered = jnp.zeros((n, width), bool)
        if n > 1:  # a later row of the same entry (same columns) on the same row
            later = (rows[:, None] == rows[None, :]) & (jnp.arange(n)[:, None] < jnp.arange(n)[None, :])
            covered = covered | jnp.any(later, 1)[:, None]
        for rows_j, col0_j, data_j in writes[i + 1:]:
            same_row = jnp.any(rows[:, None] == rows_j[None, :], 1)
            in_cols = (cols >= col0_j) & (cols < col0_j + data_j.shape[1])
            covered = covered | (same_row[:, None] & in_cols[None, :])
        masks.append(~covered)

    def group(width, whole):  # (a span as wide as a row is a whole row)
        ws = [(w, m) for w, m in zip(writes, masks) if (w[2].shape[1] == vlen) == whole]
        if not ws:
            return jnp.zeros(0, I32), jnp.zeros(0, I32), jnp.zeros((0, width), vram_dtype), jnp.zeros((0, width), bool)
        return (jnp.concatenate([w[0] for w, _ in ws]),
                jnp.concatenate([jnp.full(w[0].shape, w[1], I32) for w, _ in ws]),
                jnp.concatenate([w[2] for w, _ in ws]), jnp.concatenate([m for _, m in ws]))

    w_row, _, w_data, w_mask = group(vlen, True)
    s_row, s_col, s_data, s_mask = group(blen, False)
    groups = ((w_row, w_data, w_mask), (s_row, s_col, s_data, s_mask))
    rows = jnp.concatenate([w[0] for w in writes]) if writes else jnp.zeros(0, I32)
    return groups, jnp.where((rows >= 0) & (rows < geo.vram_rows), rows, -1)


def _lane(geo: Geometry, reg: int, body: tuple, body_ops, count: int, st: MachineState, k):
    """One iteration from the state before the loop: (registers after it, its writes, every
    row it wrote, its reads, error)."""
    s = _start(st, reg, count, body, body_ops, k)
    mem = LaneMemory(geo, st.vram, st.mram)
    err, err_pc = jnp.int32(0), jnp.int32(0)
    for key, o in _body_items(body, body_ops):
        if key[0] == "I":
            s, err, err_pc = _lane_instr(geo, key, o, s, mem, err, err_pc)
            continue
        if key[0] == "K":
            s = _set_constant(s, key, o)
            continue
        _, lreg, times, inner = key  # an LV K-chunk loop, unrolled
        s = s._replace(gp=s.gp.at[lreg].set(o[1].astype(U32)))
        inner_ops = o[3:]
        for t in range(times):
            for j, ikey in enumerate(inner):
                o3 = inner_ops[j * structure.INSTR_OPERANDS: (j + 1) * structure.INSTR_OPERANDS]
                s, err, err_pc = _lane_instr(geo, ikey, o3, s, mem, err, err_pc)
            s = s._replace(gp=s.gp.at[lreg].set(jnp.uint32(times - t - 1)))
    writes, all_rows = _writes(geo, mem.writes, st.vram.dtype)
    if mem.reads:
        reads = (jnp.concatenate([r for r, _ in mem.reads]), jnp.concatenate([o for _, o in mem.reads]))
    else:
        reads = (jnp.zeros(0, I32), jnp.zeros(0, bool))
    return s, writes, all_rows, reads, err[None], err_pc[None]


def _lanes(geo: Geometry, sig, ops, st: MachineState):
    """Every iteration of the loop ``sig`` (and of a nested VL loop in it) as a lane, from the
    state ``st`` before it: ((gp, fp, m_acc) after the last iteration, writes, all written
    rows, reads, errors, their pcs), the per-lane arrays in iteration order."""
    _, reg, count, body = sig
    body_ops = ops[3:]
    ks = jnp.arange(count, dtype=I32)
    if not any(key[0] == "VL" for key in body):
        def lane(k):
            s, *rest = _lane(geo, reg, body, body_ops, count, st, k)
            return (s.gp, s.fp, s.m_acc), *rest

        regs, writes, all_rows, reads, errs, err_pcs = jax.vmap(lane)(ks)
        return jax.tree_util.tree_map(lambda x: x[-1], regs), writes, all_rows, reads, errs.reshape(-1), \
            err_pcs.reshape(-1)

    def outer(k):  # scalar work around one nested VL loop, whose lanes this iteration holds
        s = _start(st, reg, count, body, body_ops, k)
        errs, pcs, inner = [], [], None
        for key, o in _body_items(body, body_ops):
            if key[0] == "I":
                s, err, err_pc = _lane_instr(geo, key, o, s, None, jnp.int32(0), jnp.int32(0))
                errs.append(err[None])
                pcs.append(err_pc[None])
            elif key[0] == "K":
                s = _set_constant(s, key, o)
            else:
                (gp, fp, m_acc), *inner, err, err_pc = _lanes(geo, key, o, s)
                s = s._replace(gp=gp.at[key[1]].set(jnp.uint32(0)), fp=fp, m_acc=m_acc)
                errs.append(err)
                pcs.append(err_pc)
        return (s.gp, s.fp, s.m_acc), inner, jnp.concatenate(errs), jnp.concatenate(pcs)

    regs, inner, errs, err_pcs = jax.vmap(outer)(ks)
    merge = lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])  # noqa: E731  [outer, inner, ...] -> [lanes, ...]
    writes, all_rows, reads = jax.tree_util.tree_map(merge, inner)
    return jax.tree_util.tree_map(lambda x: x[-1], regs), writes, all_rows, reads, errs.reshape(-1), \
        err_pcs.reshape(-1)


#: a lane's rows are written one by one, unrolled up to this many; more run as a loop (the
#: code of a commit then does not grow with the rows an M_MM_WO writes)
UNROLL_ROWS = 2


def _each(n: int, fn, carry):
    """``fn(j, carry)`` for j in 0..n-1: unrolled when short, else a fori_loop."""
    if n <= UNROLL_ROWS:
        for j in range(n):
            carry = fn(j, carry)
        return carry
    return lax.fori_loop(0, n, fn, carry)


def _read_after_write(geo: Geometry, all_rows, r_row, r_own):
    """Whether a lane reads a row an earlier lane wrote. A table holds, per row, the first
    lane that writes it: the lanes' rows are put in from the last lane to the first, one
    dynamic_update_slice each. A row a lane itself wrote whole before reading it (a scratch
    row) does not count."""
    n_lanes, per_lane = all_rows.shape
    lanes = jnp.arange(n_lanes, dtype=I32)[:, None]
    nowhere, outside = geo.vram_rows, geo.vram_rows + 1  # table slots: no write / a read outside VRAM
    big = jnp.int32(2**31 - 1)

    def put(i, table):
        k = n_lanes - 1 - i

        def one(j, table):
            row = all_rows[k, j]
            return lax.dynamic_update_slice(table, k[None], (jnp.where(row >= 0, row, nowhere),))

        return _each(per_lane, one, table)

    first = lax.fori_loop(0, n_lanes, put, jnp.full(geo.vram_rows + 2, big, I32))
    first = lax.dynamic_update_slice(first, big[None], (nowhere,))
    read = jnp.where((r_row >= 0) & (r_row < geo.vram_rows), r_row, outside)
    return jnp.any(~r_own & (first[read] < lanes))


def _commit_in_order(geo: Geometry, vram, whole, span):
    """The lanes' writes into VRAM, lane after lane (iteration order), each row and span with
    one dynamic_update_slice of the elements its mask keeps. Where two iterations write one
    element the later one's value stays, as in the sequential loop, so only reads after
    writes are conflicts. A span the update clamps into the row lands where the instruction
    itself puts it. Rows outside VRAM (failed writes: the run raises) go to the spare row."""
    w_row, w_data, w_mask = whole
    s_row, s_col, s_data, s_mask = span
    vlen, blen = geo.cfg.vlen, geo.cfg.blen
    sink = geo.vram_rows
    target = lambda row: jnp.where((row >= 0) & (row < geo.vram_rows), row, sink)  # noqa: E731

    def whole_row(k, j, v):
        row = target(w_row[k, j])
        old = lax.dynamic_slice(v, (row, 0), (1, vlen))[0]
        return lax.dynamic_update_slice(v, jnp.where(w_mask[k, j], w_data[k, j], old)[None], (row, 0))

    def span_row(k, j, v):
        row, col = target(s_row[k, j]), s_col[k, j]
        old = lax.dynamic_slice(v, (row, col), (1, blen))[0]
        return lax.dynamic_update_slice(v, jnp.where(s_mask[k, j], s_data[k, j], old)[None], (row, col))

    def lane(k, v):
        v = _each(w_row.shape[1], lambda j, v: whole_row(k, j, v), v)
        return _each(s_row.shape[1], lambda j, v: span_row(k, j, v), v)

    n_lanes = max(w_row.shape[0], s_row.shape[0])
    return lax.fori_loop(0, n_lanes, lane, vram)


def run_loop(geo: Geometry, sig, ops, st: MachineState) -> MachineState:
    """Run an :func:`eligible` loop ``("VL", reg, count, body)`` with operands ``ops`` as lanes.
    When its iterations conflict, the state gets the internal error LANE_CONFLICT at the
    loop's pc (unless an earlier error is already there) and the caller redoes the run
    without lanes. (A ``lax.cond`` to the plain loop instead would copy the whole VRAM on
    every call: XLA copies a buffer a conditional updates in place.)"""
    reg = sig[1]
    (gp, fp, m_acc), (whole, span), all_rows, (r_row, r_own), errs, err_pcs = _lanes(geo, sig, ops, st)
    gp = gp.array()
    conflict = _read_after_write(geo, all_rows, r_row, r_own)
    vram = _commit_in_order(geo, st.vram, whole, span)
    bad = errs != 0
    at = jnp.argmax(bad)
    # the first error in iteration order; a conflict makes every lane's result suspect
    err = jnp.where(conflict, jnp.int32(int(Err.LANE_CONFLICT)), jnp.where(jnp.any(bad), errs[at], 0))
    err_pc = jnp.where(conflict, ops[0], err_pcs[at])
    first = (st.err == 0) & (err != 0)
    return lax.optimization_barrier(st._replace(
        vram=vram, gp=gp.at[reg].set(jnp.uint32(0)), fp=fp, m_acc=m_acc,
        err=jnp.where(first, err, st.err), err_pc=jnp.where(first, err_pc, st.err_pc)))
