"""The specialising executor: a program compiled into straight JAX code, not interpreted.

PLENA control flow is static (loop counts are immediates, there are no branches), so instead
of dispatching every instruction through a ``lax.switch`` at run time, this executor emits
each instruction's own function once, at trace time, from the program's structure
(:mod:`plena.emu_jax.structure`):

* a hardware loop becomes one ``lax.fori_loop`` whose body is its instructions' code;
* runs of code that repeat with other immediates (unrolled tiles, layers) become one
  ``lax.fori_loop`` over a table of operands;
* everything else is emitted in order.

Immediates and program counters are *operands*: a run-time int32 array, never constants in
the code. Programs with the same structure (e.g. the same model at other addresses) share one
compiled executable, addresses stay dynamic (so XLA updates memories in place), and the
compiled size follows the number of distinct bodies, not the program length.

Each instruction runs the same pure function as the reference interpreter
(:mod:`plena.emu_jax.dispatch`), on the real state (no operand proxies are needed without a
switch), and commits only the memories its opcode writes (:data:`WRITES`). General-purpose
registers stay traced values, so data-dependent ones (S_LD_INT after V_TOPK) stay correct.
Instruction counts come from the static plan (:mod:`plena.emu_jax.plan`), which is exact for
every program this executor accepts. The first error raised by an instruction is kept with
its pc (later instructions still run, but the caller raises and writes nothing).

Programs outside the well-formed subset (C_BREAK, loops that modify their counter or do not
nest, a loop-budget overrun, data-dependent control) go to the reference interpreter.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from plena.emu_jax import dispatch, regfold, structure, vectorise
from plena.numerics import ieee
from plena.emu_jax.effects import Fields, no_effect
from plena.emu_jax.errors import Err
from plena.emu_jax.state import Geometry, MachineState
from plena.isa.encoding import DecodedProgram
from plena.isa.opcodes import OPCODES

#: memories (beyond registers and accumulators) each opcode writes; everything else an
#: instruction returns for them is the "no write" sentinel and is not committed.
WRITES: dict[str, frozenset] = {}
for _m in ("V_ADD_VV", "V_ADD_VF", "V_SUB_VV", "V_SUB_VF", "V_MUL_VV", "V_MUL_VF", "V_EXP_V", "V_RECI_V",
           "V_SHFT_V", "V_MAX_VF", "V_MIN_VF", "S_MAP_V_FP", "M_MM_WO", "M_BMM_WO", "M_MV_WO", "M_BMV_WO",
           "H_PREFETCH_V"):
    WRITES[_m] = frozenset({"vram"})
WRITES["H_PREFETCH_M"] = frozenset({"mram"})
WRITES["H_STORE_V"] = frozenset({"hbm"})
WRITES["S_ST_FP"] = frozenset({"fpsram"})
WRITES["S_ST_INT"] = frozenset({"intsram"})
WRITES["V_TOPK"] = frozenset({"fpsram", "intsram"})
#: opcodes that move HBM blocks (counted) / rank experts (cycle model)
HBM_OPS = frozenset({"H_PREFETCH_M", "H_PREFETCH_V", "H_STORE_V"})
#: instructions that read and write registers only. They need no barrier after them, so XLA
#: fuses runs of them (address arithmetic) into one kernel.
REGISTER_ONLY = frozenset({"S_ADD_INT", "S_ADDI_INT", "S_SUB_INT", "S_MUL_INT", "S_LUI_INT", "S_ADD_FP", "S_SUB_FP",
                           "S_MAX_FP", "S_MUL_FP", "S_EXP_FP", "S_RECI_FP", "S_SQRT_FP", "C_SET_ADDR_REG",
                           "C_SET_SCALE_REG", "C_SET_STRIDE_REG", "C_SET_V_MASK_REG"})
#: opcodes that write one scalar-SRAM word: (index field, value field, memory)
ONE_WORD = {"S_ST_FP": ("fps_idx", "fps_val", "fpsram"), "S_ST_INT": ("ints_idx", "ints_val", "intsram")}
UNROLL_MICRO = 8  # multi-row instructions with at most this many rows are unrolled


def _commit(geo: Geometry, name: str, st: MachineState, eff, pc) -> MachineState:
    """Apply one micro-step's Effect (only the memories ``name`` writes)."""
    c = geo.cfg
    ok = eff.err == 0
    keep = lambda new, spare: jnp.where(ok, new, spare)  # noqa: E731
    w = WRITES.get(name, frozenset())
    upd = dict(gp=eff.gp, fp=eff.fp, a_hi=eff.a_hi, a_lo=eff.a_lo, scale=eff.scale, stride=eff.stride,
               vmask=eff.vmask, m_acc=eff.m_acc, v_acc=eff.v_acc, hm_acc=eff.hm_acc, hv_acc=eff.hv_acc)
    if "vram" in w:
        upd["vram"] = lax.dynamic_update_slice(st.vram, eff.vram_data[None],
                                               (keep(eff.vram_row, geo.vram_rows), 0))
    if "mram" in w:
        upd["mram"] = lax.dynamic_update_slice(st.mram, eff.mram_data[None, None],
                                               (keep(eff.mram_tile, geo.mram_tiles), eff.mram_row, 0))
    if "hbm" in w:
        hbm = lax.dynamic_update_slice(st.hbm, eff.hbm_e_data, (keep(eff.hbm_e_idx, geo.hbm_bytes),))
        upd["hbm"] = lax.dynamic_update_slice(hbm, eff.hbm_s_data, (keep(eff.hbm_s_idx, geo.hbm_bytes + c.vlen + 64),))
    if name in ONE_WORD:  # one word: an in-place update (a scatter stops XLA hoisting the loop)
        idx_field, val_field, mem = ONE_WORD[name]
        idx, old = getattr(eff, idx_field)[0], getattr(st, mem)
        at = jnp.minimum(idx, old.shape[0] - 1)
        val = jnp.where(ok & (idx < old.shape[0]), getattr(eff, val_field)[0], old[at])
        upd[mem] = lax.dynamic_update_slice(old, val[None], (at,))
    else:
        if "fpsram" in w:
            upd["fpsram"] = st.fpsram.at[keep(eff.fps_idx, 1024)].set(eff.fps_val, mode="drop")
        if "intsram" in w:
            upd["intsram"] = st.intsram.at[keep(eff.ints_idx, 1024)].set(eff.ints_val, mode="drop")
    if name in HBM_OPS:
        upd["hbm_rd_blocks"] = st.hbm_rd_blocks + jnp.where(ok, eff.hbm_rd, 0).astype(jnp.uint32)
        upd["hbm_wr_blocks"] = st.hbm_wr_blocks + jnp.where(ok, eff.hbm_wr, 0).astype(jnp.uint32)
    if name == "V_TOPK":
        upd["topk_experts"] = st.topk_experts + jnp.where(ok, eff.topk_e, 0)
    first = (st.err == 0) & ~ok
    upd["err"] = jnp.where(first, eff.err, st.err)
    upd["err_pc"] = jnp.where(first, pc, st.err_pc)
    return st._replace(**upd)


#: multi-row instructions whose rows are independent: no row reads what another row writes.
#: Their rows are computed together (one vectorised MX decode / encode, one code copy instead
#: of one per row) and then written in row order, as the interpreter's micro-steps would.
#: Registers they change (the *_WO opcodes clear their accumulator after the last row) come
#: from the last row, computed once more on its own (the batched-head accumulator is
#: BA x MLEN x MLEN: one copy per row, as a row loop or a vmap would carry it, costs more
#: than the rows).
ROW_PARALLEL = {"H_PREFETCH_M": (), "H_PREFETCH_V": (), "H_STORE_V": (), "M_MM_WO": ("m_acc",),
                "M_BMM_WO": ("hm_acc",), "M_BMV_WO": ("hv_acc",)}
_ROW_FIELDS = ("vram_row", "vram_data", "mram_tile", "mram_row", "mram_data", "hbm_e_idx", "hbm_e_data",
               "hbm_s_idx", "hbm_s_data", "hbm_rd", "hbm_wr", "err")


def _rows_at_once(geo: Geometry, name: str, fn, f: Fields, pc, st: MachineState, nsub: int) -> MachineState:
    regs = ROW_PARALLEL[name]

    def row(i):
        eff = fn(geo, st._replace(pc=pc, sub=i), f)
        return {k: getattr(eff, k) for k in _ROW_FIELDS}

    rows = jax.vmap(row)(jnp.arange(nsub, dtype=jnp.int32))
    base = no_effect(geo, st)

    def commit(i, s):
        return _commit(geo, name, s, base._replace(**{k: v[i] for k, v in rows.items()}), pc)

    out = lax.fori_loop(0, nsub, commit, st)
    if not regs:  # prefetches and stores change no register: no last row to trace again
        return out
    last = fn(geo, st._replace(pc=pc, sub=jnp.int32(nsub - 1)), f)
    return out._replace(**{k: getattr(last, k) for k in regs})


def _instr(geo: Geometry, key: tuple, o, st: MachineState) -> MachineState:
    """Emit one instruction: key = ("I", opcode, rd, rs1, rs2, rs3, funct1); o = [pc, imm18, imm22]."""
    _, op, rd, rs1, rs2, rs3, funct1 = key
    if dispatch.FP_DEST[op] and rd == 0:  # a no-op (spec §2.1), counted by the plan
        return st
    return _emit(geo, op, Fields.of_key(key, o[1], o[2]), o[0], st)


def _any_instr(geo: Geometry, op: int, o, st: MachineState) -> MachineState:
    """Emit one instruction of opcode ``op`` whatever its other fields: a "D" item, o = [pc,
    imm18, imm22, rd, rs1, rs2, rs3, funct1] (all run-time values, so one compiled form
    serves every instruction with this opcode). A no-op (an fp destination f0) has no D item."""
    f = Fields(opcode=np.int32(op), rd=o[3], rs1=o[4], rs2=o[5], rs3=o[6], funct1=o[7], imm18=o[1], imm22=o[2])
    return _emit(geo, op, f, o[0], st)


def _emit(geo: Geometry, op: int, f: Fields, pc, st: MachineState) -> MachineState:
    spec = OPCODES.get(op)
    if spec is None or not spec.executable:
        first = st.err == 0
        return st._replace(err=jnp.where(first, jnp.int32(int(Err.INVALID_OPCODE)), st.err),
                           err_pc=jnp.where(first, pc, st.err_pc))
    fn = dispatch.IMPLEMENTATIONS[spec.mnemonic]
    nsub = int(dispatch.micro_steps(geo.cfg)[op])

    def micro(sub, s):
        eff = fn(geo, s._replace(pc=pc, sub=jnp.asarray(sub, jnp.int32)), f)
        return _commit(geo, spec.mnemonic, s, eff, pc)

    if nsub > 1 and spec.mnemonic in ROW_PARALLEL:
        st = _rows_at_once(geo, spec.mnemonic, fn, f, pc, st, nsub)
    elif nsub <= UNROLL_MICRO:
        for sub in range(nsub):
            st = micro(sub, st)
    else:
        st = lax.fori_loop(0, nsub, micro, st)
    # Materialise the instruction's results before the next one starts: otherwise XLA may
    # schedule a read of a memory after a later in-place write to it, and then copy the
    # whole memory to keep the old contents alive (tests/test_emu_hlo.py checks).
    if spec.mnemonic in REGISTER_ONLY:  # reads no memory: nothing to keep in order
        return st
    return lax.optimization_barrier(st)


def operand_count(sig) -> int:
    kind = sig[0]
    if kind == "I":
        return structure.INSTR_OPERANDS
    if kind == "D":
        return structure.INSTR_OPERANDS + len(structure.REG_FIELDS)
    if kind in ("S", "P", "K"):
        return 1
    if kind == "G":
        return 2 * structure.REG_SLOTS
    if kind == "L":
        return 3 + sum(operand_count(s) for s in sig[2])
    if kind in ("LV", "VL"):
        return 3 + sum(operand_count(s) for s in sig[3])
    if kind == "RA":  # count, first copy's operands, step
        return 1 + 2 * operand_count(sig[1][0])
    return sig[1] * sum(operand_count(s) for s in sig[2])


def _items(geo: Geometry, sigs: tuple, ops, st: MachineState, split: bool = False) -> MachineState:
    """Emit items in order (``split``: big repeats as two halves, see :func:`_repeat`)."""
    off = 0
    for sig in sigs:
        n = operand_count(sig)
        st = _item(geo, sig, ops[off: off + n], st, split)
        off += n
    return st


def _item(geo: Geometry, sig, ops, st: MachineState, split: bool = False) -> MachineState:
    kind = sig[0]
    if kind == "I":
        return _instr(geo, sig, ops, st)
    if kind == "D":
        return _any_instr(geo, sig[1], ops, st)
    if kind == "S":  # a host-driven loop's counter register
        return st._replace(gp=st.gp.at[sig[1]].set(ops[0].astype(jnp.uint32)))
    if kind == "P":  # where the interpreter resumes
        return st._replace(pc=ops[0])
    if kind == "K":  # a constant (structure.Const)
        return st._replace(gp=st.gp.at[sig[1]].set(ops[0].astype(jnp.uint32)))
    if kind == "G":  # known register values (structure.Regs)
        return set_registers(st, ops)
    if kind == "LV":
        return _tile_loop(geo, sig, ops, st)
    if kind == "VL":  # iterations at once (a conflict between them makes the caller redo the run)
        return vectorise.run_loop(geo, sig, ops, st)
    if kind == "RA":  # one instruction, count times, its operands moving by a step
        n = operand_count(sig[1][0])
        first, step = ops[1: 1 + n], ops[1 + n:]
        return lax.fori_loop(0, ops[0], lambda k, s: _item(geo, sig[1][0], first + k * step, s), st)
    body = sig[2]
    if kind == "L":
        reg, count, body_ops = sig[1], ops[1], ops[3:]
        st = st._replace(gp=st.gp.at[reg].set(count.astype(jnp.uint32)))  # C_LOOP_START

        def iteration(k, s):
            s = _items(geo, body, body_ops, s, split)
            return s._replace(gp=s.gp.at[reg].set((count - k - 1).astype(jnp.uint32)))  # C_LOOP_END

        return lax.fori_loop(0, count, iteration, st)
    return _repeat(geo, sig[1], body, ops, st, split)


def _repeat(geo: Geometry, times: int, body: tuple, ops, st: MachineState, split: bool) -> MachineState:
    """``times`` copies of ``body``, their operands the rows of ``ops``."""
    table = ops.reshape(times, -1)
    if not split or emitted(body) < SPLIT_REPEAT:
        return lax.fori_loop(0, times, lambda k, s: _items(geo, body, table[k], s, split), st)
    # a big body in a block that dominates the compile (see prepare): two halves, each a
    # one-trip loop (XLA:CPU compiles a loop whole, as one function; the two compile in
    # parallel), and a sort so that XLA does not compile the repeat itself whole (it keeps a
    # loop with a sort as kernels) into one function, serially
    sizes = np.cumsum([emitted((x,)) for x in body])
    cut = int(np.searchsorted(sizes, sizes[-1] / 2)) + 1
    n_first = sum(operand_count(x) for x in body[:cut])
    one = lax.optimization_barrier(jnp.int32(1))  # a run-time 1: XLA keeps the one-trip loops

    def halves(k, s):
        row = table[k]
        for part, o in ((body[:cut], row[:n_first]), (body[cut:], row[n_first:])):
            s = lax.fori_loop(0, one, lambda _, s_, part=part, o=o: _items(geo, part, o, s_, split), s)
        pair = lax.sort(jnp.stack([k, k]))
        return s._replace(err=s.err + (pair[1] - pair[0]))  # + 0

    return lax.fori_loop(0, times, halves, st)


#: in a block that dominates a program's compile, a repeat whose body emits at least this many
#: instructions runs as two halves that compile in parallel (see _repeat and prepare)
SPLIT_REPEAT = 32


def emitted(sigs: tuple) -> int:
    """Instructions a list of signatures emits (each body once)."""
    n = 0
    for sg in sigs:
        kind = sg[0]
        if kind in ("I", "D", "K", "G", "RA"):
            n += 1
        elif kind == "L" or kind == "R":
            n += emitted(sg[2])
        elif kind in ("LV", "VL"):
            n += emitted(sg[3])
    return n


def set_registers(st: MachineState, ops) -> MachineState:
    """A register set (:class:`plena.emu_jax.structure.Regs`): ``ops`` = one flag per
    register slot (gp, a_hi, a_lo, scale, stride, vmask), then the values."""
    n = structure.REG_SLOTS
    on, val = ops[:n] != 0, ops[n:].astype(jnp.uint32)
    pick = lambda lo, hi, old: jnp.where(on[lo:hi], val[lo:hi], old)  # noqa: E731
    one = lambda i, old: jnp.where(on[i], val[i], old)  # noqa: E731
    return st._replace(gp=pick(0, 16, st.gp), a_hi=pick(16, 32, st.a_hi), a_lo=pick(32, 48, st.a_lo),
                       scale=one(48, st.scale), stride=one(49, st.stride), vmask=one(50, st.vmask))


def _tile_loop(geo: Geometry, sig, ops, st: MachineState) -> MachineState:
    """A K-chunk product loop (:func:`plena.emu_jax.structure.tile_loop`) in one go: the n
    products are computed as one batch (each exactly as the instruction computes it: the
    instruction runs with an accumulator of -0.0, and -0.0 + p == p for every f32 p), then
    added to the accumulator one by one in loop order, so every rounding is the same."""
    _, reg, n, body = sig
    mm, incs = body[0], body[1:]
    body_ops = ops[3:]
    pc = body_ops[0]
    fn = dispatch.IMPLEMENTATIONS[OPCODES[mm[1]].mnemonic]
    f = Fields.of_key(mm, body_ops[1], body_ops[2])
    step = jnp.zeros(16, jnp.uint32)
    for j, key in enumerate(incs):  # per-iteration register increments
        step = step.at[key[2]].add(body_ops[3 * (j + 1) + 1].astype(jnp.uint32))
    gp0 = st.gp
    neg0 = jnp.full_like(st.m_acc, -0.0)

    def product(k):
        s = st._replace(gp=gp0 + k.astype(jnp.uint32) * step, m_acc=neg0, pc=pc, sub=jnp.int32(0))
        eff = fn(geo, s, f)
        return eff.m_acc, eff.err

    parts, errs = jax.vmap(product)(jnp.arange(n, dtype=jnp.int32))
    acc = st.m_acc
    if n <= 32:  # the loop-order sum, unrolled (no loop overhead)
        for k in range(n):
            acc = ieee.add(acc, parts[k])
    else:
        acc = lax.fori_loop(0, n, lambda k, a: ieee.add(a, parts[k]), acc)
    bad = errs != 0
    first = (st.err == 0) & jnp.any(bad)
    err = errs[jnp.argmax(bad)]
    gp = (gp0 + jnp.uint32(n) * step).at[reg].set(jnp.uint32(0))
    return lax.optimization_barrier(st._replace(
        m_acc=acc, gp=gp, err=jnp.where(first, err, st.err), err_pc=jnp.where(first, pc, st.err_pc)))


@functools.partial(jax.jit, static_argnums=(0, 1, 4), donate_argnums=(3,))
def run_compiled(geo: Geometry, sigs: tuple, ops, st: MachineState, split: bool = False) -> MachineState:
    """A list of items (signatures) as one function of (operands, state); ``split``: big
    repeats as two halves (see :func:`_repeat`)."""
    return _items(geo, sigs, ops, st, split)


# ------------------------------------------------------------------------------------------
# the schedule: compiled blocks for hot code, the reference interpreter for the rest
MAX_BLOCK = 64  #: most instructions one compiled block may emit (compile time grows with it)
#: a schedule of more than LONG_STEPS steps is made again with blocks of up to MAX_BLOCK_LONG
#: instructions. Every step costs host time (~30 us to dispatch even a trivial block with the
#: 32 state leaves), which long programs pay per step (the one-layer decoder: 20 -> 13 steps,
#: 7.8 -> 7.0 ms; the 8-layer decoder: 154 -> 98 steps, 51 -> 44 ms), while short ones keep
#: their distinct blocks compiling in parallel (ci_flash: 4 steps at 64, compiled in 5.2-5.3 s;
#: 6.0 s as 1 block).
MAX_BLOCK_LONG = 128
LONG_STEPS = 12
#: a block must execute at least HOT times as many instructions as it emits. 32 compiles the
#: attention and norm code of a decoder layer too: on the small 8-layer decoder the
#: interpreter's share fell from 44,366 to 1,820 dynamic instructions for 12 % more emitted code
HOT = 32
#: cold items of at most this many instructions in all between two hot ones are compiled with
#: them instead of splitting them by an interpreter step
ABSORB = 2
#: a hot item of at least this many instructions starts a block (with the small items after
#: it), so that every occurrence of it compiles to the same block
UNIT = 8
#: when the interpreter would run at most this many instructions of a program that also has
#: compiled blocks, they are compiled too: the interpreter then is not compiled at all (a few
#: seconds), and each interpreter call costs about 0.5 ms however little it runs
COLD_MAX = 64
#: cold code of at most this many dynamic instructions in all runs as one-instruction steps
#: (:func:`one_instruction_steps`) instead of on the reference interpreter. Each opcode is
#: compiled once, for any registers and immediates (~0.1-0.6 s of CPU each, in parallel with
#: the blocks), where the interpreter for the same code (every cold opcode's record and replay
#: branches in one loop) took 3-8 s; a step costs ~30-100 us of host dispatch, so long cold
#: code keeps the interpreter.
EAGER_MAX = 4096


@dataclasses.dataclass(frozen=True)
class Interp:
    lo: int  # first pc
    hi: int  # pc after the range
    dyn: int = 0  # dynamic instructions (for progress reports)


@dataclasses.dataclass(frozen=True)
class Block:
    sig: tuple  # the signatures of the items it runs, in order
    operands: np.ndarray
    size: int  # instructions emitted
    dyn: int = 0  # dynamic instructions


def _size(it) -> int:
    if isinstance(it, (structure.Instr, structure.Const, structure.Regs)):
        return 1
    return sum(_size(x) for x in it.body)


def _dynamic(it) -> int:
    if isinstance(it, (structure.Const, structure.Regs)):
        return it.end - it.pc
    if isinstance(it, structure.Instr):
        return 1
    if isinstance(it, structure.Loop):
        return 1 + it.count * (1 + sum(_dynamic(x) for x in it.body))  # C_LOOP_END runs per iteration
    return sum(_dynamic(x) for c in it.copies for x in c)


def _pcs(it) -> tuple[int, int]:
    if isinstance(it, (structure.Const, structure.Regs)):
        return it.pc, it.end
    if isinstance(it, structure.Instr):
        return it.pc, it.pc + 1
    if isinstance(it, structure.Loop):
        return it.start, it.end + 1
    return _pcs(it.copies[0][0])[0], _pcs(it.copies[-1][-1])[1]


def _work(it, sigs: structure.Signatures, micro) -> int:
    """Micro-steps the reference interpreter runs for an item (its cost there: one
    H_PREFETCH_M is MLEN of them, a register set as many as the instructions it replaces)."""
    if isinstance(it, (structure.Const, structure.Regs)):
        return it.end - it.pc
    if isinstance(it, structure.Instr):
        return int(micro[sigs.keys[it.sig][1]])
    if isinstance(it, structure.Loop):
        return 2 + it.count * sum(_work(x, sigs, micro) for x in it.body)
    return sum(_work(x, sigs, micro) for c in it.copies for x in c)


def one_instruction_steps(items: list, prog: DecodedProgram, sigs: structure.Signatures) -> list:
    """Items as steps of one instruction each, in execution order: hardware loops and repeats
    unrolled on the host, every instruction a :class:`Block` of signature
    ``(("G",), ("D", opcode))`` (the register sets pending before it, then the instruction with
    all its fields as operands), so a program's cold code compiles one small function per
    opcode. Loop counters, constants and register sets (C_LOOP_START / C_LOOP_END,
    :class:`~plena.emu_jax.structure.Const`, :class:`~plena.emu_jax.structure.Regs`) become
    the pending register sets; those left at the end make a ``(("G",),)`` step."""
    n = structure.REG_SLOTS
    on, val = np.zeros(n, np.int32), np.zeros(n, np.int32)
    out: list = []
    dyn = [0]  # instructions accounted for by the pending sets

    def put(slot: int, value: int):
        on[slot], val[slot] = 1, structure._i32(value)

    def step(sig: tuple, fields: list):
        out.append(Block(sig, np.concatenate([on, val, np.asarray(fields, np.int32)]), 1 if fields else 0, dyn[0]))
        on[:], val[:], dyn[0] = 0, 0, 0

    def walk(its):
        for it in its:
            if isinstance(it, structure.Const):
                put(it.reg, it.value)
                dyn[0] += it.end - it.pc
            elif isinstance(it, structure.Regs):
                for slot, v in enumerate(it.values):
                    if v is not None:
                        put(slot, v)
                dyn[0] += it.end - it.pc
            elif isinstance(it, structure.Instr):
                key = sigs.keys[it.sig]
                dyn[0] += 1
                if not (dispatch.FP_DEST[key[1]] and key[2] == 0):  # else a no-op
                    step((("G",), ("D", key[1])),
                         [it.pc, int(prog.imm18[it.pc]), int(prog.imm22[it.pc]), *key[2:]])
            elif isinstance(it, structure.Loop):
                put(it.reg, it.count)  # C_LOOP_START
                dyn[0] += 1
                for k in range(it.count):
                    walk(it.body)
                    put(it.reg, it.count - k - 1)  # C_LOOP_END
                    dyn[0] += 1
            else:
                for copy in it.copies:
                    walk(copy)

    walk(items)
    if on.any() or dyn[0]:
        step((("G",),), [])
    return out


def _one_instruction(step) -> bool:
    """A step of :func:`one_instruction_steps`."""
    return isinstance(step, Block) and step.sig[0] == ("G",) and all(k[0] == "D" for k in step.sig[1:])


def schedule(items: list, prog: DecodedProgram, sigs: structure.Signatures, *, max_block: int | None = None,
             hot: int = HOT, absorb: int = ABSORB, unit: int = UNIT, cold_max: int = COLD_MAX,
             eager_max: int = EAGER_MAX, micro=None) -> list:
    """Steps that execute ``items`` in order.

    An item is *hot* when the reference interpreter would run at least ``hot`` micro-steps
    (:func:`_work`; ``micro``: micro-steps per opcode, default 1) per instruction it emits,
    counting the iterations of the host-driven loops and repeats around it. Constants and
    register sets (:class:`~plena.emu_jax.structure.Const`, :class:`~plena.emu_jax.structure.Regs`)
    cost next to nothing to compile and are always hot. Consecutive hot items go into one
    compiled :class:`Block` (up to ``max_block`` emitted instructions); cold code runs on the
    reference interpreter (:class:`Interp` ranges). A hot loop too big for one block is driven
    from the host: its counter register is set in the blocks (the pseudo item ("S", reg)) and
    its body's steps are repeated per iteration. When blocks are made and the cold code is at
    most ``cold_max`` instructions in all, it is compiled too (everything is hot). Cold code of
    at most ``eager_max`` dynamic instructions runs as :func:`one_instruction_steps` instead.
    ``max_block`` None: :data:`MAX_BLOCK`, or :data:`MAX_BLOCK_LONG` when that schedule has
    more than :data:`LONG_STEPS` steps."""
    if max_block is None:
        steps = schedule(items, prog, sigs, max_block=MAX_BLOCK, hot=hot, absorb=absorb, unit=unit,
                         cold_max=cold_max, eager_max=eager_max, micro=micro)
        if sum(not _one_instruction(s) for s in steps) <= LONG_STEPS:
            return steps
        max_block = MAX_BLOCK_LONG
    micro = np.ones(64, np.int64) if micro is None else micro
    kw = dict(max_block=max_block, absorb=absorb, unit=unit, micro=micro)
    steps = _schedule(items, prog, sigs, hot=hot, **kw)
    cold = sum(s.hi - s.lo for s in steps if isinstance(s, Interp))
    if 0 < cold <= cold_max and any(isinstance(s, Block) for s in steps):
        hot, steps = 0, _schedule(items, prog, sigs, hot=0, **kw)
    if 0 < sum(s.dyn for s in steps if isinstance(s, Interp)) <= eager_max:
        steps = _schedule(items, prog, sigs, hot=hot, eager=True, **kw)
    return steps


def _schedule(items: list, prog: DecodedProgram, sigs: structure.Signatures, *, max_block: int, hot: int,
              absorb: int, unit: int, micro, eager: bool = False) -> list:
    """:func:`schedule` for one hotness threshold (``eager``: cold code as
    :func:`one_instruction_steps`, else on the interpreter)."""
    out: list = []
    group: list = []  # (signature, operands, size, dynamic instructions)
    cold: list = []  # eager: cold items not yet made steps

    def flush():
        if group:
            out.append(Block(tuple(g[0] for g in group), np.asarray([x for g in group for x in g[1]], np.int32),
                             sum(g[2] for g in group), sum(g[3] for g in group)))
            group.clear()

    def add(sig, ops, size, dyn=0):
        if cold:  # (the group is empty: the cold item flushed it)
            out.extend(one_instruction_steps(cold, prog, sigs))
            cold.clear()
        if group and sum(g[2] for g in group) + size > max_block:
            flush()
        group.append((sig, ops, size, dyn))

    pc_now = [0]  # the pc the machine holds before the next step

    def interp(lo, hi, dyn, item):
        if eager:
            flush()
            cold.append(item)
            return
        if pc_now[0] != lo:  # the interpreter starts at the state's pc: set it in a block
            add(("P",), [lo], 0)
        flush()
        if out and isinstance(out[-1], Interp) and out[-1].hi == lo:
            out[-1] = Interp(out[-1].lo, hi, out[-1].dyn + dyn)
        else:
            out.append(Interp(lo, hi, dyn))
        pc_now[0] = hi

    def hotness(its, reps) -> list:
        """Hot (True) or cold per item of one list (see the docstring)."""
        trivial = [isinstance(it, (structure.Const, structure.Regs)) for it in its]
        hot_ = [None if t else reps * _work(it, sigs, micro) >= hot * _size(it) for it, t in zip(its, trivial)]
        real = [i for i, t in enumerate(trivial) if not t]
        j = 0
        while j < len(real):  # a short cold run between hot items joins them
            if hot_[real[j]]:
                j += 1
                continue
            k = j
            while k < len(real) and not hot_[real[k]]:
                k += 1
            if 0 < j and k < len(real) and sum(_size(its[real[x]]) for x in range(j, k)) <= absorb:
                for x in range(j, k):
                    hot_[real[x]] = True
            j = k
        nxt = None  # a constant / register set goes with the code after it (the code it sets up)
        for i in range(len(its) - 1, -1, -1):
            if hot_[i] is None:
                hot_[i] = nxt if nxt is not None else next((h for h in hot_[i::-1] if h is not None), True)
            nxt = hot_[i]
        return hot_

    def walk(its, reps):
        for it, is_hot in zip(its, hotness(its, reps)):
            size, dyn = _size(it), _dynamic(it)
            if not is_hot:
                interp(*_pcs(it), dyn, it)
            elif size <= max_block:
                if unit and size >= unit:  # a block of its own (with the small items after it)
                    flush()
                add(structure._sig_tree(it, sigs), structure.operands(it, prog), size, dyn)
            elif isinstance(it, structure.Loop):  # C_LOOP_START / C_LOOP_END as register sets
                add(("S", it.reg), [it.count], 0, 1)
                for k in range(it.count):
                    flush()  # every iteration makes the same blocks (compiled once)
                    walk(it.body, reps * it.count)
                    add(("S", it.reg), [it.count - k - 1], 0, 1)
            else:  # the copies share their code: compiled once, run it.times times
                for copy in it.copies:
                    flush()
                    walk(copy, reps * it.times)

    walk(items, 1)
    flush()
    out.extend(one_instruction_steps(cold, prog, sigs))
    return out


def release_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).
    XLA compiles leave a few hundred MiB free but held by the heap (about 270 MiB after the
    8-layer decoder's blocks), which would count against the peak-memory target."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: XLA options for the blocks (per compile; the rest of the process keeps XLA's defaults).
#: XLA:CPU's MLIR fusion emitters compile each fusion outside a hoisted loop as its own
#: module with its own MLIR context, ~20-25 ms of CPU each; the older emitter is cheaper per
#: fusion. Measured in one run of benchmarks/executors.py --quick per setting, three times:
#: ci_flash_attention compiled in 8.0 / 7.6 / 6.8 s against 10.1 / 8.1 / 9.8 s with the
#: default, at 5.3-6.6 M instr/s either way; the one-layer decoder in 19-25 instead of 25-32
#: s, its steps ~5 % slower (the SiLU lanes block 0.85 -> 1.10 ms, the attention
#: projections 1.62 -> 1.82 ms, the residual adds 0.85 -> 0.71 ms). Optimisation level 0
#: compiled faster still but ran 6x slower. LLVM optimisation level 1 (XLA's default is 2):
#: LLVM's IR passes are ~30 % of a block's compile (perf on the flash-attention block);
#: at level 1 that block compiled with 6-22 % less CPU in 5 of 5 fresh-process pairs
#: (median 4.7 against 5.4 s) and ran as fast; in two interleaved runs of
#: benchmarks/executors.py the one-layer decoder ran ~10 % slower (9.6-9.7 against 10.6-10.9
#: M instr/s) and ci_flash_attention faster (6.5-7.0 against 6.2 M instr/s).
COMPILER_OPTIONS: dict = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}


@dataclasses.dataclass
class Executable:
    """A program ready to run: its schedule with every block compiled."""

    geo: Geometry
    steps: list
    compiled: dict  # block signature -> compiled function
    compile_s: float
    blocks_compiled: int  # blocks compiled now (not found in this process's cache)
    interpreter: object = None  # prepare(interpreter=...)'s result (None: not asked or no cold code)


_BLOCKS: dict = {}  # (geometry, block signature) -> compiled block


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5), donate_argnums=(3,))
def run_compiled_batched(geo: Geometry, sigs: tuple, ops, st: MachineState, axes: MachineState,
                         split: bool = False) -> MachineState:
    """:func:`run_compiled` over a batch of input sets (``axes``: which state fields carry
    the batch axis; control state is shared)."""
    return jax.vmap(lambda s: _items(geo, sigs, ops, s, split), in_axes=(axes,), out_axes=axes)(st)


_UNKNOWN = object()


def prepare(prog: DecodedProgram, geo: Geometry, example_state: MachineState, *, batch_axes=None,
            interpreter=None, lanes: bool = True, intsram=_UNKNOWN, **kw) -> Executable | None:
    """Parse, fold, schedule and compile a well-formed program (None: not well-formed).
    ``batch_axes``: compile the blocks for a batched state (see :mod:`plena.emu_jax.batch`).
    ``interpreter(opcodes)``: compiles the interpreter for the cold code's opcodes; it runs
    in the same thread pool as the blocks (its compile overlaps theirs) and the result is
    :attr:`Executable.interpreter`. ``lanes``: run independent loops as lanes
    (:mod:`plena.emu_jax.vectorise`); a run that reports LANE_CONFLICT is redone with False.
    ``intsram``: the INT SRAM preload (None: none); given, register values known before the
    run are folded (:mod:`plena.emu_jax.regfold`)."""
    import time

    try:
        items, sigs = structure.parse(prog, lanes=lanes)
    except structure.Malformed:
        return None
    if intsram is not _UNKNOWN:
        items = regfold.fold(items, prog, geo.cfg, intsram, sigs)
    items = structure.reroll(items, sigs, prog=prog)
    steps = schedule(items, prog, sigs, micro=dispatch.micro_steps(geo.cfg), **kw)
    t0 = time.perf_counter()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                                      example_state)
    batch = None if batch_axes is None else example_state.vram.shape[0]
    todo, sizes = {}, {}
    for step in steps:
        if isinstance(step, Block) and (geo, step.sig, batch) not in _BLOCKS and step.sig not in todo:
            todo[step.sig], sizes[step.sig] = step.operands.shape, step.size

    cold = [s for s in steps if isinstance(s, Interp)]
    # the biggest blocks first: their compiles are the longest
    jobs: list = sorted(todo.items(), key=lambda job: -sizes[job[0]])
    # A block of more than half the instructions to compile is the critical path: while XLA
    # compiles a loop of it as one function, the other cores run out of work, so its big
    # repeats are split in halves that compile in parallel (SPLIT_REPEAT). The flash-attention
    # block (a 4-iteration repeat of ~50 instructions): compile -1.3 to -1.7 s (~20 %), run
    # 0-15 % slower; split in the one-layer decoder, whose 13 blocks keep both cores busy, its
    # compile was 20 % longer, so smaller shares are not split.
    dominant = jobs[0][0] if jobs and 2 * sizes[jobs[0][0]] > sum(sizes.values()) else None
    if interpreter is not None and cold:
        jobs.insert(0, ("interpreter", np.unique(np.concatenate([np.asarray(prog.opcode[s.lo:s.hi]) for s in cold]))))

    def build(item):
        sig, shape = item
        if sig == "interpreter":
            fn = interpreter(shape)
            release_heap()
            return sig, fn
        ops = jax.ShapeDtypeStruct(shape, jnp.int32)
        with tracing:
            if batch_axes is None:
                lowered = run_compiled.lower(geo, sig, ops, abstract, sig == dominant)
            else:
                lowered = run_compiled_batched.lower(geo, sig, ops, abstract, batch_axes, sig == dominant)
        fn = lowered.compile(COMPILER_OPTIONS)
        release_heap()  # after each compile: XLA's freed memory would otherwise pile up (peak RSS)
        return sig, fn

    # XLA compiles outside the GIL: blocks compile in parallel. Tracing holds the GIL, so
    # blocks are traced one at a time (the lock), in job order: the first block's XLA
    # compile starts as soon as it alone is traced, instead of when all the traces
    # interleaved on the GIL are done.
    tracing = threading.Lock()
    cold_fn = None
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        for sig, fn in pool.map(build, jobs):
            if sig == "interpreter":
                cold_fn = fn
            else:
                _BLOCKS[(geo, sig, batch)] = fn
    compiled = {s.sig: _BLOCKS[(geo, s.sig, batch)] for s in steps if isinstance(s, Block)}
    if todo:  # the traced blocks (jaxprs) are not needed once compiled
        (run_compiled if batch_axes is None else run_compiled_batched).clear_cache()
        release_heap()
    fresh = len(todo)
    # host arrays go over with device_put (jnp.asarray compiles a small program per shape)
    steps = [dataclasses.replace(s, operands=jax.device_put(s.operands)) if isinstance(s, Block)
             else dataclasses.replace(s, hi=jax.device_put(np.int32(s.hi))) for s in steps]
    return Executable(geo, steps, compiled, time.perf_counter() - t0, fresh, cold_fn)


def execute(ex: Executable, interpreter, fields, st: MachineState, *, progress=None, total=None,
            every_s: float = 0.25) -> MachineState:
    """Run the schedule. Errors are read by the caller at the end; the host waits for the
    device only to report ``progress(done, total)`` (at most every ``every_s`` seconds)."""
    import time

    limit = jax.device_put(np.int32(2**31 - 1))
    done, last = 0, time.perf_counter()
    for step in ex.steps:
        if isinstance(step, Interp):  # the state's pc is step.lo (see schedule)
            st = interpreter(fields, st, step.hi, limit)
        else:
            st = ex.compiled[step.sig](step.operands, st)
        done += step.dyn
        if progress is not None and time.perf_counter() - last > every_s:
            jax.block_until_ready(st.err)
            progress(min(done, total) if total else done, total)
            last = time.perf_counter()
    return st


def finish_state(final: MachineState, plan, n_instr: int) -> MachineState:
    """The executor's final state in the interpreter's terms (pc past the end, counts)."""
    put = lambda value: jax.device_put(np.asarray(value, np.int32))  # noqa: E731
    return final._replace(pc=put(n_instr), sub=put(0), counts=put(plan.counts), skipped=put(plan.skipped),
                          steps=put(plan.dynamic_instructions))
