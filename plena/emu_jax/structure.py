"""The static structure of a program: its loop tree, and repeated code folded into tables.

PLENA control flow is almost static: the only jumps are hardware loops whose trip counts are
immediates. :func:`parse` turns a well-formed program into a tree of :class:`Instr` and
:class:`Loop` items; :func:`reroll` then folds runs of items that repeat with only their
immediates (and program counters) changed into :class:`Repeat` items, so a long
straight-line program becomes a short list of bodies plus tables of operands.

Every item has a *signature* (what code the fast executor emits for it: opcodes and register
fields, never immediates) and an *operand vector* (the immediates and pcs it needs at run
time). Items with the same signature share emitted code; their operand vectors differ.

A program is *well-formed* (and :func:`parse` returns a tree) when its loops nest properly
(each C_LOOP_END names the innermost open loop's register), no loop body writes its own
counter register, no trip count is 0 and there is no C_BREAK. Anything else is left to the
reference interpreter, which implements the reference's exact behaviour for such programs.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np

from plena.isa.encoding import DecodedProgram
from plena.isa.opcodes import BY_MNEMONIC, OPCODES, Role

_OP = {m: s.code for m, s in BY_MNEMONIC.items()}
LOOP_START, LOOP_END, BREAK = _OP["C_LOOP_START"], _OP["C_LOOP_END"], _OP["C_BREAK"]
LUI = _OP["S_LUI_INT"]
M32 = 0xFFFFFFFF
#: opcodes that write gp[rd]
GP_WRITERS = frozenset(_OP[m] for m in ("S_ADD_INT", "S_ADDI_INT", "S_SUB_INT", "S_MUL_INT", "S_LUI_INT",
                                        "S_LD_INT", "C_LOOP_START"))
#: operands per instruction: pc, imm18, imm22
INSTR_OPERANDS = 3
MM, TMM, ADDI = _OP["M_MM"], _OP["M_TMM"], _OP["S_ADDI_INT"]


def tile_loop(reg: int, body_keys: tuple) -> bool:
    """Whether a loop body is a K-chunk product: one M_MM / M_TMM followed by S_ADDI_INT
    self-increments (gpX = gpX + imm) of registers other than the counter. Such loops are
    emitted as one batched product (see :mod:`plena.emu_jax.fast`); their trip count is
    part of the signature."""
    if not body_keys or body_keys[0][0] != "I" or body_keys[0][1] not in (MM, TMM):
        return False
    return all(k[0] == "I" and k[1] == ADDI and k[2] == k[3] and k[2] != reg for k in body_keys[1:])


def loop_key(reg: int, count: int, body_keys: tuple, lanes: bool = True) -> tuple:
    """A loop's signature: ("LV", ...) for a K-chunk product loop, ("VL", ...) for a loop that
    may run as lanes (:mod:`plena.emu_jax.vectorise`; only when ``lanes``), else ("L", ...).
    The first two hold the trip count (their code depends on it)."""
    if tile_loop(reg, body_keys):
        return ("LV", reg, count, body_keys)
    from plena.emu_jax import vectorise

    if lanes and count >= vectorise.MIN_COUNT and vectorise.eligible(reg, body_keys, count):
        return ("VL", reg, count, body_keys)
    return ("L", reg, body_keys)


@dataclasses.dataclass(frozen=True)
class Instr:
    pc: int
    sig: int  # interned signature id


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # pc of C_LOOP_START
    end: int  # pc of C_LOOP_END
    reg: int
    count: int  # the trip count (C_LOOP_START's immediate)
    body: tuple
    sig: int


@dataclasses.dataclass(frozen=True)
class Repeat:
    """``times`` consecutive copies of ``body`` (same signatures, other operands)."""

    times: int
    body: tuple  # the first copy
    copies: tuple  # all copies (tuples of items), for operands
    sig: int
    #: one instruction whose operands move by a fixed step per copy: signature ("RA", body)
    #: whatever ``times``, operands [times, first copy's, step] (see :func:`affine_step`)
    affine: bool = False


@dataclasses.dataclass(frozen=True)
class Const:
    """``gp[reg] = value`` written by the instructions at pcs ``[pc, end)``, one of the
    compilers' constant idioms (spec §3.4): ``S_ADDI_INT gX, gp0, v`` (while no instruction
    writes gp0, which then stays 0), ``S_LUI_INT gX, hi``, or ``S_LUI_INT gX, hi`` followed by
    ``S_ADDI_INT gX, gX, lo``. All of them have the signature ("K", reg) and the value as
    operand, so code that loads small and large constants still folds and shares code."""

    pc: int
    end: int
    reg: int
    value: int
    sig: int


@dataclasses.dataclass(frozen=True)
class Regs:
    """Register-only instructions at pcs ``[pc, end)`` whose results are known before the
    run (:mod:`plena.emu_jax.regfold`), replaced by the register values they leave:
    ``values[i]`` for every register slot ``i`` of :data:`REG_SLOTS` they write (None for
    the others). Signature ("G",), whatever the registers: one compiled form for all."""

    pc: int
    end: int
    values: tuple
    sig: int


#: register slots a Regs item may set: gp0..15, a_hi0..15, a_lo0..15, scale, stride, vmask
REG_SLOTS = 51


Item = Union[Instr, Loop, Repeat, Const, Regs]


class Signatures:
    """Interns item signatures (nested tuples) to small integers."""

    def __init__(self, lanes: bool = True):
        self.ids: dict = {}
        self.keys: list = []
        self.lanes = lanes  # loops may run as lanes ("VL" signatures)

    def __call__(self, key) -> int:
        i = self.ids.get(key)
        if i is None:
            i = self.ids[key] = len(self.keys)
            self.keys.append(key)
        return i


REG_FIELDS = ("rd", "rs1", "rs2", "rs3", "funct1")


def instr_key(prog: DecodedProgram, pc: int) -> tuple:
    """("I", opcode, rd, rs1, rs2, rs3, funct1) with the fields the opcode does not read (per
    the opcode table) set to 0: bits of an immediate that overlap them must not split code."""
    op = int(prog.opcode[pc])
    spec = OPCODES.get(op)
    vals = []
    for name in REG_FIELDS:
        used = spec is None or getattr(spec, name) is not Role.IGNORED
        vals.append(int(getattr(prog, name)[pc]) if used else 0)
    return ("I", op, *vals)


class Malformed(Exception):
    """The program is outside the well-formed subset (see the module docstring)."""


def parse(prog: DecodedProgram, sigs: Signatures | None = None, *, lanes: bool = True) -> tuple[list, Signatures]:
    """The loop tree of a well-formed program; raises :class:`Malformed` otherwise.
    ``lanes``: whether loops may get "VL" signatures (see :func:`loop_key`)."""
    sigs = sigs or Signatures(lanes)
    ops, rds, imm22 = prog.opcode.tolist(), prog.rd.tolist(), prog.imm22.tolist()
    rs1s, imm18 = prog.rs1.tolist(), prog.imm18.tolist()
    gp0_zero = not any(op in GP_WRITERS and rd == 0 for op, rd in zip(ops, rds))
    stack: list = [(None, [])]  # (open loop: (start, reg), items)
    skip_to = 0
    for pc, op in enumerate(ops):
        if pc < skip_to:  # the S_ADDI_INT of an S_LUI_INT pair
            continue
        const = _constant(ops, rds, rs1s, imm18, imm22, pc, gp0_zero)
        if const is not None:
            end, value = const
            skip_to = end
            stack[-1][1].append(Const(pc, end, rds[pc], value, sigs(("K", rds[pc]))))
        elif op == LOOP_START:
            if imm22[pc] == 0:
                raise Malformed(f"pc {pc}: loop count 0")
            stack.append(((pc, rds[pc]), []))
        elif op == LOOP_END:
            head, body = stack[-1]
            if head is None or head[1] != rds[pc]:
                raise Malformed(f"pc {pc}: C_LOOP_END does not close the innermost loop")
            stack.pop()
            start, reg = head
            if any(_writes_gp(prog, it, reg) for it in body):
                raise Malformed(f"pc {start}: loop body writes its counter gp{reg}")
            body = tuple(body)
            sig = sigs(loop_key(reg, imm22[start], tuple(sigs.keys[it.sig] for it in body), sigs.lanes))
            stack[-1][1].append(Loop(start, pc, reg, imm22[start], body, sig))
        elif op == BREAK:
            raise Malformed(f"pc {pc}: C_BREAK")
        else:
            stack[-1][1].append(Instr(pc, sigs(instr_key(prog, pc))))
    if len(stack) != 1:
        raise Malformed(f"pc {stack[-1][0][0]}: loop never closed")
    return stack[0][1], sigs


def _constant(ops, rds, rs1s, imm18, imm22, pc: int, gp0_zero: bool):
    """(end pc, value) when the instruction at pc starts a :class:`Const` idiom, else None."""
    op, rd = ops[pc], rds[pc]
    if op == ADDI and rs1s[pc] == 0 and gp0_zero:
        return pc + 1, imm18[pc]
    if op != LUI:
        return None
    hi = (imm22[pc] << 12) & M32
    nxt = pc + 1
    if nxt < len(ops) and ops[nxt] == ADDI and rds[nxt] == rd and rs1s[nxt] == rd:
        return nxt + 1, (hi + imm18[nxt]) & M32
    return nxt, hi


def _writes_gp(prog: DecodedProgram, item: Item, reg: int) -> bool:
    if isinstance(item, Const):
        return item.reg == reg
    if isinstance(item, Regs):
        return item.values[reg] is not None
    if isinstance(item, Instr):
        return int(prog.opcode[item.pc]) in GP_WRITERS and int(prog.rd[item.pc]) == reg
    if isinstance(item, Loop):
        return item.reg == reg or any(_writes_gp(prog, it, reg) for it in item.body)
    return any(_writes_gp(prog, it, reg) for it in item.body)


# ------------------------------------------------------------------------------------------
# folding repeated code
def _runs(ids: np.ndarray, period: int) -> np.ndarray:
    """r[i] = how many consecutive j >= i have ids[j] == ids[j + period]."""
    n = len(ids)
    eq = np.zeros(n + 1, np.int64)
    if period < n:
        eq[: n - period] = ids[: n - period] == ids[period:]
    # run length of trues from each position: reverse cumulative count reset at falses
    out = np.zeros(n + 1, np.int64)
    idx = np.nonzero(eq[:n] == 0)[0]
    # next false position at or after i
    nxt = np.full(n + 1, n, np.int64)
    nxt[idx] = idx
    nxt = np.minimum.accumulate(nxt[::-1])[::-1]
    out[:n] = nxt[:n] - np.arange(n)
    return out[:n]


def affine_step(copies: tuple, prog: DecodedProgram | None) -> list | None:
    """The per-copy step of the operands of a repeated single instruction when every copy's
    operands are the first copy's plus k times that step (None otherwise, or without
    ``prog``). Such a repeat runs with its count as an operand (signature ("RA", body)), so
    runs of one instruction that differ only in length share their code: the rows of a
    causal mask (row r stores r + 1 zeros, then 63 - r times -inf) fold into one repeat."""
    if prog is None or len(copies[0]) != 1 or not isinstance(copies[0][0], Instr):
        return None
    ops = np.array([operands(c[0], prog) for c in copies], np.int64)
    step = ops[1] - ops[0]
    if not (ops == ops[0] + np.arange(len(ops))[:, None] * step).all():
        return None
    return [int(x) for x in step]


def reroll_level(items: list, sigs: Signatures, *, max_period: int = 256, budget: int = 1 << 24,
                 prog: DecodedProgram | None = None) -> list:
    """One pass of folding at one level: greedy, left to right, taking at each position the
    repetition that covers the most items (the shortest period among equals). With ``prog``,
    repeats of one instruction with evenly stepping operands become affine (:func:`affine_step`)."""
    n = len(items)
    if n < 2:
        return list(items)
    ids = np.array([it.sig for it in items], np.int64)
    pmax = max(1, min(max_period, n // 2, budget // max(n, 1)))
    runs = [_runs(ids, p) for p in range(1, pmax + 1)]
    out, i = [], 0
    while i < n:
        best_p, best_cover = 0, 1
        for p in range(1, pmax + 1):
            if i + 2 * p > n:
                break
            k = 1 + runs[p - 1][i] // p
            if k >= 2 and k * p > best_cover:
                best_p, best_cover = p, k * p
        if best_p == 0:
            out.append(items[i])
            i += 1
            continue
        k = best_cover // best_p
        copies = tuple(tuple(items[i + j * best_p: i + (j + 1) * best_p]) for j in range(k))
        if best_p > 1:  # fold inside the body too (every copy the same way: same signatures)
            folded = tuple(tuple(reroll(list(c), sigs, prog=prog)) for c in copies)
            if len({tuple(it.sig for it in c) for c in folded}) == 1:
                copies = folded
        body = copies[0]
        if affine_step(copies, prog) is not None:
            out.append(Repeat(k, body, copies, sigs(("RA", (body[0].sig,))), affine=True))
        else:
            out.append(Repeat(k, body, copies, sigs(("R", k, tuple(it.sig for it in body)))))
        i += k * best_p
    return out


def reroll(items: list, sigs: Signatures, *, passes: int = 4, prog: DecodedProgram | None = None) -> list:
    """Fold repeated code at every level of the tree (loop bodies included), repeatedly, so
    repeats of repeats (e.g. decoder layers made of repeated tiles) fold too. ``prog``: the
    program (its immediates), for affine repeats (:func:`affine_step`)."""
    items = [_reroll_inside(it, sigs, passes, prog) for it in items]
    for _ in range(passes):
        new = reroll_level(items, sigs, prog=prog)
        if len(new) == len(items):
            break
        items = new
    return items


def _reroll_inside(item: Item, sigs: Signatures, passes: int, prog: DecodedProgram | None) -> Item:
    if isinstance(item, Loop):
        body = tuple(reroll(list(item.body), sigs, passes=passes, prog=prog))
        sig = sigs(loop_key(item.reg, item.count, tuple(sigs.keys[it.sig] for it in body), sigs.lanes))
        return dataclasses.replace(item, body=body, sig=sig)
    return item


# ------------------------------------------------------------------------------------------
# operands
def _i32(v: int) -> int:
    """A u32 value as the int32 operand with the same bits."""
    return v - (1 << 32) if v >= 1 << 31 else v


def operands(item: Item, prog: DecodedProgram) -> list:
    """The run-time operands of an item, in emission order (see :func:`operand_count`)."""
    if isinstance(item, Const):
        return [_i32(item.value)]
    if isinstance(item, Regs):  # which slots are set, then their values
        return [int(v is not None) for v in item.values] + [_i32(v or 0) for v in item.values]
    if isinstance(item, Instr):
        return [item.pc, int(prog.imm18[item.pc]), int(prog.imm22[item.pc])]
    if isinstance(item, Loop):
        out = [item.start, item.count, item.end]
        for it in item.body:
            out += operands(it, prog)
        return out
    if item.affine:
        return [int(item.times), *operands(item.copies[0][0], prog), *affine_step(item.copies, prog)]
    out = []
    for copy in item.copies:
        for it in copy:
            out += operands(it, prog)
    return out


def signature_tree(items: list, sigs: Signatures) -> tuple:
    """A hashable description of the emitted code (cache key of a compiled program)."""
    return tuple(_sig_tree(it, sigs) for it in items)


def _sig_tree(item: Item, sigs: Signatures):
    if isinstance(item, (Instr, Const, Regs)):
        return sigs.keys[item.sig]
    if isinstance(item, Loop):
        return loop_key(item.reg, item.count, tuple(_sig_tree(it, sigs) for it in item.body), sigs.lanes)
    if item.affine:
        return ("RA", (_sig_tree(item.body[0], sigs),))
    return ("R", item.times, tuple(_sig_tree(it, sigs) for it in item.body))
