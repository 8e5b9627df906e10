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
   written by an iteration j < k, or two iterations writing one element, is a *conflict*.
3. **commit**: the written elements are scattered into VRAM in one operation, and the
   registers are those of the last iteration. A conflict is recorded as the internal error
   LANE_CONFLICT, and :func:`plena.emu_jax.api.run` redoes the run without lanes, so the
   final state is the sequential loop's, bit for bit, either way.

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
MAX_CHECK = 1 << 22  #: bound on count^2 x (body instructions)^2, the size of the conflict check
MAX_LANE_INSTRUCTIONS = 96  #: instructions one lane emits (LV bodies unrolled)


# ------------------------------------------------------------------------------------------
# the static rule


def _flat(body: tuple):
    """The body as the instruction keys one iteration executes, LV loops unrolled, with
    ("C", reg) marking a loop counter set; None when an item is not supported."""
    out = []
    for key in body:
        if key[0] == "I":
            out.append(key)
        elif key[0] == "LV":
            _, reg, n, inner = key
            out.append(("C", reg))
            out.extend(list(inner) * n)
        else:
            return None
    return out


def _regs(key):
    """(gp read, gp written, fp read, fp written) of one key."""
    if key[0] == "C":
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


def eligible(reg: int, body: tuple, count: int) -> bool:
    """Whether the loop (counter ``reg``, body signature keys, trip count) may run as lanes."""
    flat = _flat(body)
    if not flat or len(flat) > MAX_LANE_INSTRUCTIONS or count * count * len(flat) ** 2 > MAX_CHECK:
        return False
    keys = [k for k in flat if k[0] == "I"]
    if any(k[1] not in LANE_OPS for k in keys):
        return False
    if not any(k[1] in ROW_WORK for k in keys):
        return False  # nothing but scalar work: leave it to the plain loop
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


def induction_registers(reg: int, body: tuple) -> dict:
    """{gp register: index of its S_ADDI_INT self-increment in ``body``} for the registers the
    body writes exactly once, at top level, by ``gX = gX + imm`` (the value then moves by imm
    per iteration)."""
    flat = _flat(body) or []
    writes: dict[int, int] = {}
    for k in flat:
        for r in _regs(k)[1]:
            writes[r] = writes.get(r, 0) + 1
    out = {}
    defined = set()
    for j, key in enumerate(body):
        if key[0] == "I" and key[1] == structure.ADDI and key[2] == key[3] and writes.get(key[2]) == 1 and key[2] not in defined:
            out[key[2]] = j
        for k in _flat((key,)) or []:
            defined |= _regs(k)[1]
    return out


# ------------------------------------------------------------------------------------------
# lanes


class LaneMemory:
    """VRAM/MRAM seen by one iteration: the state before the loop plus the rows this
    iteration wrote, with every VRAM read recorded (except a write's own read-modify-write)."""

    def __init__(self, geo: Geometry, vram, mram):
        self.geo, self.vram, self.mram = geo, vram, mram
        self.writes: list = []  # (row i32, data [VLEN], mask bool[VLEN])
        self.reads: list = []  # (row i32[n], own bool[n]): rows read; own = whole row written before by this iteration
        self.recording = True

    def vram_rows(self, row, n):
        row = jnp.asarray(row, U32)
        data = memory.rows_window(self.vram, row, n, self.geo.vram_rows)
        rows = row.astype(I32) + jnp.arange(n, dtype=I32)
        own = jnp.zeros(n, bool)
        for w_row, w_data, w_mask in self.writes:
            hit = (rows == w_row) & (w_row < self.geo.vram_rows)
            data = jnp.where(hit[:, None], w_data[None], data)
            own = own | (hit & jnp.all(w_mask))
        if self.recording:
            self.reads.append((rows, own))
        return data

    def tile_cols(self, tile, c0, width):
        return memory.tile_cols(self.geo, _Mram(self.mram), tile, c0, width)

    def tile_rows(self, tile, r0, n):
        return memory.tile_rows(self.geo, _Mram(self.mram), tile, r0, n)


class _Mram:
    def __init__(self, mram):
        self.mram = mram


def _wo_mask(geo: Geometry, st: MachineState, f: Fields):
    """bool[VLEN]: the columns an M_MM_WO row write replaces (as ops_matrix.m_mm_wo places them)."""
    c = geo.cfg
    col = (st.gp[f.rd] + memory.u32(f.imm18)) % U32(c.mlen)
    colc = jnp.minimum(col, U32(c.mlen - c.blen)).astype(I32)
    lane = jnp.arange(c.vlen, dtype=I32)
    return (lane >= colc) & (lane < colc + c.blen)


def _lane_instr(geo: Geometry, key, o, st: MachineState, mem: LaneMemory, err, err_pc):
    op, rd = key[1], key[2]
    pc = o[0]
    spec = OPCODES[op]
    if dispatch.FP_DEST[op] and rd == 0:
        return st, err, err_pc
    fn = dispatch.IMPLEMENTATIONS[spec.mnemonic]
    f = Fields.of_key(key, o[1], o[2])
    nsub = int(dispatch.micro_steps(geo.cfg)[op])
    for sub in range(nsub):
        view = st._replace(pc=pc, sub=jnp.int32(sub), vram=mem, mram=mem)
        mem.recording = op != MM_WO  # M_MM_WO reads its row only to merge its columns in
        eff = fn(geo, view, f)
        mem.recording = True
        ok = eff.err == 0
        if op == MM_WO or spec.mnemonic in ELEMENTWISE:
            mask = _wo_mask(geo, view, f) if op == MM_WO else jnp.ones(geo.cfg.vlen, bool)
            row = jnp.where(ok, eff.vram_row, geo.vram_rows).astype(I32)
            mem.writes.append((row, eff.vram_data, mask))
        first = (err == 0) & ~ok
        err, err_pc = jnp.where(first, eff.err, err), jnp.where(first, pc, err_pc)
        st = st._replace(gp=eff.gp, fp=eff.fp, m_acc=eff.m_acc)
    return st, err, err_pc


def _lane(geo: Geometry, reg: int, body: tuple, body_ops, count, st: MachineState, k):
    """One iteration from the state before the loop: (registers after it, its writes, reads, error)."""
    from plena.emu_jax.fast import operand_count  # (fast imports this module)

    step = jnp.zeros(16, U32)
    off = 0
    increments = set(induction_registers(reg, body).values())
    for j, key in enumerate(body):
        if j in increments:
            step = step.at[key[2]].add(body_ops[off + 1].astype(U32))
        off += operand_count(key)
    gp = (st.gp + k.astype(U32) * step).at[reg].set((count - k).astype(U32))
    # the accumulator: the state's for iteration 0; cleared by the previous iteration's M_MM_WO
    # for the others (eligible() checks that the body ends its m_acc use with one)
    uses_acc = any(key[0] == "LV" or (key[0] == "I" and (key[1] in PRODUCTS or key[1] == MM_WO)) for key in body)
    m_acc = jnp.where(k == 0, st.m_acc, jnp.zeros_like(st.m_acc)) if uses_acc else st.m_acc
    s = st._replace(gp=gp, m_acc=m_acc)
    mem = LaneMemory(geo, st.vram, st.mram)
    err, err_pc = jnp.int32(0), jnp.int32(0)
    off = 0
    for key in body:
        n = operand_count(key)
        o = body_ops[off: off + n]
        off += n
        if key[0] == "I":
            s, err, err_pc = _lane_instr(geo, key, o, s, mem, err, err_pc)
            continue
        _, lreg, times, inner = key  # an LV K-chunk loop, unrolled
        s = s._replace(gp=s.gp.at[lreg].set(o[1].astype(U32)))
        inner_ops = o[3:]
        for t in range(times):
            for j, ikey in enumerate(inner):
                o3 = inner_ops[j * structure.INSTR_OPERANDS: (j + 1) * structure.INSTR_OPERANDS]
                s, err, err_pc = _lane_instr(geo, ikey, o3, s, mem, err, err_pc)
            s = s._replace(gp=s.gp.at[lreg].set(jnp.uint32(times - t - 1)))
    # a row written twice by this iteration: its last write carries the content, the masks merge
    rows, data, masks, live = [], [], [], []
    for i, (row, d, m) in enumerate(mem.writes):
        later = [r2 for r2, _, _ in mem.writes[i + 1:]]
        superseded = jnp.any(jnp.stack([r2 == row for r2 in later])) if later else jnp.bool_(False)
        merged = m
        for r0, _, m0 in mem.writes[:i]:
            merged = merged | (m0 & (r0 == row))
        rows.append(row)
        data.append(d)
        masks.append(merged)
        live.append((row < geo.vram_rows) & ~superseded)
    writes = (jnp.stack(rows), jnp.stack(data), jnp.stack(masks), jnp.stack(live))
    all_rows = jnp.stack([jnp.where(r < geo.vram_rows, r, -1) for r, _, _ in mem.writes])
    if mem.reads:
        reads = (jnp.concatenate([r for r, _ in mem.reads]), jnp.concatenate([o for _, o in mem.reads]))
    else:
        reads = (jnp.zeros(0, I32), jnp.zeros(0, bool))
    return s, writes, all_rows, reads, err, err_pc


def run_loop(geo: Geometry, sig, ops, st: MachineState) -> MachineState:
    """Run an :func:`eligible` loop ``("VL", reg, count, body)`` with operands ``ops`` as lanes.
    When its iterations conflict, the state gets the internal error LANE_CONFLICT at the
    loop's pc (unless an earlier error is already there) and the caller redoes the run
    without lanes. (A ``lax.cond`` to the plain loop instead would copy the whole VRAM on
    every call: XLA copies a buffer a conditional updates in place.)"""
    _, reg, count, body = sig
    body_ops = ops[3:]
    ks = jnp.arange(count, dtype=I32)

    def lane(k):
        s, writes, all_rows, reads, err, err_pc = _lane(geo, reg, body, body_ops, jnp.int32(count), st, k)
        return (s.gp, s.fp, s.m_acc), writes, all_rows, reads, err, err_pc

    (gp, fp, m_acc), (w_row, w_data, w_mask, w_live), all_rows, (r_row, r_own), errs, err_pcs = jax.vmap(lane)(ks)
    # read-after-write: iteration k reads a row that an iteration j < k wrote (a row iteration
    # k itself wrote whole before reading it, e.g. a scratch row, does not count)
    w = all_rows[None, :, None, :]  # [-, j, -, write]
    r = r_row[:, None, :, None]  # [k, -, read, -]
    earlier = (ks[None, :] < ks[:, None])[:, :, None, None]
    raw = jnp.any(earlier & (w >= 0) & (w == r) & ~r_own[:, None, :, None])
    # write-after-write: a write is superseded when a later iteration writes its whole row;
    # two live writes of one element (column spans, conservatively) are a conflict
    vlen = geo.cfg.vlen
    a = (slice(None), slice(None), None, None)
    b = (None, None, slice(None), slice(None))
    same = w_live[a] & w_live[b] & (w_row[a] == w_row[b])
    later_whole = same & (ks[None, None, :, None] > ks[:, None, None, None]) & jnp.all(w_mask, -1)[b]
    w_live = w_live & ~jnp.any(later_whole, axis=(2, 3))
    c_lo = jnp.argmax(w_mask, axis=-1)
    c_hi = vlen - jnp.argmax(w_mask[..., ::-1], axis=-1)
    other = (ks[:, None, None, None] != ks[None, None, :, None])
    waw = jnp.any(other & w_live[a] & w_live[b] & (w_row[a] == w_row[b]) & (c_lo[a] < c_hi[b]) & (c_lo[b] < c_hi[a]))

    rows = jnp.where(w_live[..., None] & w_mask, w_row[..., None], geo.vram_rows + 1)
    cols = jnp.broadcast_to(jnp.arange(vlen, dtype=I32), rows.shape)
    vram = st.vram.at[rows.reshape(-1), cols.reshape(-1)].set(w_data.reshape(-1), mode="drop")
    bad = errs != 0
    at = jnp.argmax(bad)
    # the first error in iteration order; a conflict makes every lane's result suspect
    err = jnp.where(raw | waw, jnp.int32(int(Err.LANE_CONFLICT)), jnp.where(jnp.any(bad), errs[at], 0))
    err_pc = jnp.where(raw | waw, ops[0], err_pcs[at])
    first = (st.err == 0) & (err != 0)
    return lax.optimization_barrier(st._replace(
        vram=vram, gp=gp[-1].at[reg].set(jnp.uint32(0)), fp=fp[-1], m_acc=m_acc[-1],
        err=jnp.where(first, err, st.err), err_pc=jnp.where(first, err_pc, st.err_pc)))
