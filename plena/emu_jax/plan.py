"""Static pre-pass: run the integer/control part of a program in plain Python.

PLENA control flow depends only on general-purpose registers, which (apart from values
loaded from INT SRAM entries written by V_TOPK) are independent of tensor data. Executing
just the scalar/control instructions therefore tells, before any JAX work:

* loop misuse (C_LOOP_START 0, unmatched C_LOOP_END, C_BREAK outside a loop, the loop
  instruction budget) and out-of-range INT SRAM addresses, with the exact pc;
* the deepest loop nesting (loop-stack size) and the dynamic instruction count;
* the highest VRAM row and HBM byte any instruction can write, so memories are allocated
  to what the program touches instead of the configured 512 MiB VRAM / 16 GiB HBM.

Values that depend on tensor data are tracked as unknown (None); an unknown address makes
the corresponding extent unknown, and the caller falls back to a bounded default window.

Two walkers share the per-instruction semantics (:class:`_Scalars`):

* the *linear* walker steps through every dynamic instruction with an explicit loop stack,
  exactly like the reference (it handles any program, including malformed loops, C_BREAK and
  loop-budget overruns, at the exact pc);
* the *structured* walker follows the loop tree of a well-formed program
  (:mod:`plena.emu_jax.structure`) and does not step through every iteration of a loop whose
  body only does affine integer work (adds, subtracts, copies, constants): it runs iterations
  0 and 1, checks that they moved the scalar state by the same delta (then, the body being an
  affine map, every iteration does), jumps to the last iteration, runs it, and checks that
  every address the sampled iterations used lies on one straight line (so no iteration in
  between reaches further). Its cost is proportional to the static program, not to the
  dynamic instruction count. Anything it cannot prove is simulated in full.
"""

from __future__ import annotations

import dataclasses

from plena.config import PlenaConfig
from plena.emu_jax.errors import Err
from plena.isa.encoding import DecodedProgram
from plena.isa.opcodes import BY_MNEMONIC

_OP = {m: s.code for m, s in BY_MNEMONIC.items()}
M32 = 0xFFFFFFFF



@dataclasses.dataclass
class Plan:
    dynamic_instructions: int | None  # None when the pre-pass could not finish exactly
    loop_depth: int
    vram_rows: int | None  # highest written row + 1 (None: unknown)
    hbm_write_end: int | None  # highest written HBM byte + 1 (None: unknown)
    static_error: tuple[int, Err] | None  # (pc, rule) of a control/INT-SRAM panic found statically
    exact: bool
    counts: list | None = None  # executed instructions per opcode (exact plans only)
    skipped: list | None = None  # fp-destination instructions skipped for rd = 0, per opcode
    structured: bool = False  # made by the structured walker (the program is well-formed)


def _add(a, b):
    return None if a is None or b is None else (a + b) & M32


class _StaticError(Exception):
    def __init__(self, pc: int, rule: Err):
        super().__init__(pc, rule)
        self.pc, self.rule = pc, rule


class _Inexact(Exception):
    """The walk cannot continue exactly (an unknown loop counter, the step cap)."""


_OP_VWRITE = frozenset(_OP[m] for m in ("V_ADD_VV", "V_ADD_VF", "V_SUB_VV", "V_SUB_VF", "V_MUL_VV", "V_MUL_VF",
                                        "V_EXP_V", "V_RECI_V", "V_SHFT_V", "V_MAX_VF", "V_MIN_VF", "S_MAP_V_FP",
                                        "M_MV_WO"))
#: opcodes after which the scalar state is no longer an affine function of the state before
NON_AFFINE = frozenset(_OP[m] for m in ("S_MUL_INT", "S_LD_INT", "S_ST_INT", "V_TOPK", "C_BREAK"))


class _Scalars:
    """The scalar/control state of the machine and the per-instruction semantics (all but
    the loop instructions, which each walker handles its own way)."""

    def __init__(self, prog: DecodedProgram, cfg: PlenaConfig, intsram, max_dynamic: int):
        from plena.emu_jax.dispatch import FP_DEST

        self.ops, self.rds, self.rs1s, self.rs2s = (c.tolist() for c in (prog.opcode, prog.rd, prog.rs1, prog.rs2))
        self.rs3s, self.imm18s, self.imm22s = prog.rs3.tolist(), prog.imm18.tolist(), prog.imm22.tolist()
        self.fp_dest = FP_DEST.tolist()
        self.cfg = cfg
        self.gp: list = [0] * 16
        self.a_hi: list = [0] * 16
        self.a_lo: list = [0] * 16
        self.ints: list = [0] * 1024
        if intsram is not None:
            for i, v in enumerate(list(intsram)[:1024]):
                self.ints[i] = int(v)
        self.scale, self.stride, self.vmask = 0, 1, 0
        self.vram_max, self.vram_known = 0, True
        self.hbm_end, self.hbm_known = 0, True
        self.steps = 0  # dynamic instructions (including extrapolated ones)
        self.simulated = 0  # instructions actually stepped through here
        self.max_dynamic = max_dynamic
        self.counts = [0] * 64
        self.skipped = [0] * 64
        self.depth = 0
        self.exact = True
        self.recording = 0  # > 0: append the raw operands of every extent to self.events
        self.events: list = []
        fmt = cfg.precision.hbm_v_act_type
        self.ratio = fmt.element_scale_ratio
        self.block = getattr(fmt, "block", cfg.vlen)
        # bytes of one stored row (an upper bound: elements wider than 8 bits make longer rows)
        widths = [(getattr(f, "elem", None) or f.data).width
                  for f in (cfg.precision.hbm_v_act_type, cfg.precision.hbm_v_kv_type)]
        self.row_bytes = max(cfg.vlen, max(cfg.vlen * w // 8 for w in widths))

    # ------------------------------------------------------------------ extents
    def vrow(self, addr, extra_rows=0):
        if self.recording:
            self.events.append(("v", addr, extra_rows))
        if addr is None:
            self.vram_known = False
        else:
            self.vram_max = max(self.vram_max, addr // self.cfg.vlen + extra_rows + 1)

    def hbm_store(self, off, hi, lo, s, scale):
        if self.recording:
            self.events.append(("h", off, hi, lo, s, scale))
        if None in (off, hi, lo, s, scale):
            self.hbm_known = False
            return
        c = self.cfg
        base = (hi << 32) | lo
        last = c.hbm_v_writeback_amount - 1
        e_end = base + off + ((last * s) & M32) + self.row_bytes
        s_end = base + scale + off // self.ratio + int(last * (s / self.ratio)) + c.vlen // self.block
        self.hbm_end = max(self.hbm_end, e_end, s_end)

    # ------------------------------------------------------------------ state snapshots
    def snapshot(self):
        return (list(self.gp), list(self.a_hi), list(self.a_lo), self.scale, self.stride, self.vmask)

    def restore(self, snap):
        gp, a_hi, a_lo, self.scale, self.stride, self.vmask = snap
        self.gp, self.a_hi, self.a_lo = list(gp), list(a_hi), list(a_lo)

    # ------------------------------------------------------------------ one instruction
    def count(self, pc):
        if self.simulated >= self.max_dynamic:
            raise _Inexact()
        self.simulated += 1
        self.steps += 1
        op = self.ops[pc]
        if self.fp_dest[op] and self.rds[pc] == 0:
            self.skipped[op] += 1
        else:
            self.counts[op] += 1

    def exec(self, pc):
        """Execute the non-loop instruction at pc on the scalar state (counting it)."""
        self.count(pc)
        O, gp = _OP, self.gp
        op, rd, rs1, rs2 = self.ops[pc], self.rds[pc], self.rs1s[pc], self.rs2s[pc]
        cfg = self.cfg
        if op == O["S_ADDI_INT"]:
            gp[rd] = _add(gp[rs1], self.imm18s[pc])
        elif op == O["S_ADD_INT"]:
            gp[rd] = _add(gp[rs1], gp[rs2])
        elif op == O["S_SUB_INT"]:
            gp[rd] = None if gp[rs1] is None or gp[rs2] is None else (gp[rs1] - gp[rs2]) & M32
        elif op == O["S_MUL_INT"]:
            gp[rd] = None if gp[rs1] is None or gp[rs2] is None else (gp[rs1] * gp[rs2]) & M32
        elif op == O["S_LUI_INT"]:
            gp[rd] = (self.imm22s[pc] << 12) & M32
        elif op in (O["S_LD_INT"], O["S_ST_INT"]):
            idx = _add(gp[rs1], self.imm18s[pc])
            if idx is None:
                self.exact = False
                if op == O["S_LD_INT"]:
                    gp[rd] = None
                else:  # unknown store address: every INT SRAM word becomes unknown
                    self.ints = [None] * 1024
            elif idx >= 1024:
                raise _StaticError(pc, Err.INTSRAM_RANGE)
            elif op == O["S_LD_INT"]:
                gp[rd] = self.ints[idx]
            else:
                self.ints[idx] = gp[rd]
        elif op == O["V_TOPK"]:
            base = gp[rs2]
            k = 8 if self.rs3s[pc] == 1 else 4
            if base is None:
                self.ints = [None] * 1024
            else:
                for j in range(k):
                    if base + j < 1024:
                        self.ints[base + j] = None
        elif op == O["C_SET_ADDR_REG"]:
            self.a_hi[rd], self.a_lo[rd] = gp[rs1], gp[rs2]
        elif op == O["C_SET_SCALE_REG"]:
            self.scale = gp[rd]
        elif op == O["C_SET_STRIDE_REG"]:
            self.stride = gp[rd]
        elif op == O["C_SET_V_MASK_REG"]:
            self.vmask = gp[rd]
        elif op in _OP_VWRITE:
            self.vrow(gp[rd])
        elif op == O["M_MM_WO"]:
            v = _add(gp[rd], self.imm18s[pc])
            s = 1 if rs1 == 0 else gp[rs1]
            mlen = cfg.mlen
            self.vrow(None if v is None or s is None else (v - v % mlen + (cfg.blen - 1) * mlen * s) & M32)
        elif op == O["M_BMM_WO"]:
            self.vrow(_add(gp[rd], self.imm18s[pc]), cfg.broadcast_amount * cfg.mlen - 1)
        elif op == O["M_BMV_WO"]:
            self.vrow(_add(gp[rd], self.imm18s[pc]), cfg.broadcast_amount - 1)
        elif op == O["H_PREFETCH_V"]:
            v = gp[rd]
            if self.recording:
                self.events.append(("p", v))
            if v is None:
                self.vram_known = False
            else:
                self.vram_max = max(self.vram_max, min(cfg.vector_sram_size, v // cfg.vlen + cfg.hbm_v_prefetch_amount))
        elif op == O["H_STORE_V"]:
            s = self.stride if self.rs3s[pc] == 1 else self.row_bytes
            self.hbm_store(gp[rs1], self.a_hi[rs2], self.a_lo[rs2], s, self.scale)

    def plan(self, static_error=None, structured=False) -> Plan:
        return Plan(dynamic_instructions=self.steps if (self.exact or static_error) else None,
                    loop_depth=self.depth, vram_rows=self.vram_max if self.vram_known else None,
                    hbm_write_end=self.hbm_end if self.hbm_known else None, static_error=static_error,
                    exact=self.exact, counts=list(self.counts) if self.exact else None,
                    skipped=list(self.skipped) if self.exact else None, structured=structured)


def _walk_linear(s: _Scalars, n: int) -> Plan:
    """Step through every dynamic instruction with the reference's loop stack."""
    O = _OP
    loops: list = []  # [start_pc, reg, count]
    budget = s.cfg.max_loop_instructions
    pc = 0
    try:
        while pc < n:
            for lp in loops:
                lp[2] += 1
            if loops and max(lp[2] for lp in loops) > budget:
                raise _StaticError(pc, Err.LOOP_BUDGET)
            op, rd = s.ops[pc], s.rds[pc]
            nxt = pc + 1
            if op == O["C_LOOP_START"]:
                if s.imm22s[pc] == 0:
                    raise _StaticError(pc, Err.LOOP_ZERO)
                s.count(pc)
                s.gp[rd] = s.imm22s[pc]
                loops.append([pc, rd, 0])
                s.depth = max(s.depth, len(loops))
            elif op == O["C_LOOP_END"]:
                j = next((i for i in range(len(loops) - 1, -1, -1) if loops[i][1] == rd), None)
                if j is None:
                    raise _StaticError(pc, Err.LOOP_END_UNMATCHED)
                s.count(pc)
                v = s.gp[rd]
                if v is None:
                    s.exact = False
                    break
                if v > 1:
                    s.gp[rd] = v - 1
                    loops[j][2] = 0
                    nxt = loops[j][0] + 1
                else:
                    s.gp[rd] = 0
                    del loops[j]
            elif op == O["C_BREAK"]:
                if not loops:
                    raise _StaticError(pc, Err.BREAK_NO_LOOP)
                s.count(pc)
                _, reg, _ = loops.pop()
                s.gp[reg] = 0
            else:
                s.exec(pc)
            pc = nxt
    except _StaticError as e:
        return s.plan((e.pc, e.rule))
    except _Inexact:
        s.exact = False
    return s.plan()


class _NeedLinear(Exception):
    """The structured walk met something only the linear walker reports exactly."""


def _has_non_affine(prog: DecodedProgram, items) -> bool:
    from plena.emu_jax.structure import Const, Instr, Loop

    for it in items:
        if isinstance(it, Const):
            continue
        if isinstance(it, Instr):
            if int(prog.opcode[it.pc]) in NON_AFFINE:
                return True
        elif _has_non_affine(prog, it.body if isinstance(it, Loop) else [x for c in it.copies for x in c]):
            return True
    return False


def _linear_events(e0, e1, elast, n: int) -> bool:
    """Every raw operand of the sampled iterations' extents lies on one line: e(n-1) ==
    e(0) + (n-1) (e(1) - e(0)) as integers (so nothing wrapped modulo 2^32 in between)."""
    if not (len(e0) == len(e1) == len(elast)):
        return False
    for a, b, z in zip(e0, e1, elast):
        if a[0] != b[0] or a[0] != z[0]:
            return False
        for x, y, w in zip(a[1:], b[1:], z[1:]):
            if x is None or y is None or w is None:
                if not (x is None and y is None and w is None):
                    return False
                continue
            if w != x + (n - 1) * (y - x):
                return False
    return True


class _Structured:
    def __init__(self, s: _Scalars, prog: DecodedProgram):
        self.s, self.prog = s, prog
        self.budget = s.cfg.max_loop_instructions
        self.affine: dict = {}

    def items(self, items, depth: int):
        for it in items:
            self.item(it, depth)

    def item(self, it, depth: int):
        from plena.emu_jax.structure import Const, Instr, Loop

        if isinstance(it, Const):
            for pc in range(it.pc, it.end):
                self.s.exec(pc)
        elif isinstance(it, Instr):
            self.s.exec(it.pc)
        elif isinstance(it, Loop):
            self.loop(it, depth + 1)
        else:
            for copy in it.copies:
                self.items(copy, depth)

    def iteration(self, lp, k: int, depth: int):
        s = self.s
        before = s.steps
        self.items(lp.body, depth)
        s.count(lp.end)
        s.gp[lp.reg] = (lp.count - k - 1) & M32  # C_LOOP_END: count down (0 after the last)
        if s.steps - before > self.budget:  # the iteration overran the loop budget
            raise _NeedLinear()

    def loop(self, lp, depth: int):
        s = self.s
        s.count(lp.start)
        s.depth = max(s.depth, depth)
        n = lp.count
        s.gp[lp.reg] = n
        affine = self.affine.get(lp.sig)
        if affine is None:
            affine = self.affine[lp.sig] = not _has_non_affine(self.prog, lp.body)
        if n < 6 or not affine:
            for k in range(n):
                self.iteration(lp, k, depth)
        else:
            self.extrapolated(lp, n, depth)

    def extrapolated(self, lp, n: int, depth: int):
        """Iterations 0, 1, 2 and n-1 for real; the n-4 others from the affine delta.

        The body maps the state x to A x + b (mod 2^32), so the deltas d_k = x_{k+1} - x_k obey
        d_{k+1} = A d_k: if d_2 == d_1, every later delta is d_1 as well. (d_0 may differ:
        registers the body overwrites hold stale values before the first iteration.)"""
        s = self.s
        s.recording += 1
        mark = len(s.events)
        steps0, counts0, skipped0 = s.steps, list(s.counts), list(s.skipped)
        self.iteration(lp, 0, depth)
        snaps, marks = [s.snapshot()], [len(s.events)]
        for k in (1, 2):
            self.iteration(lp, k, depth)
            snaps.append(s.snapshot())
            marks.append(len(s.events))
        done = 3
        flat = [_flat(x) for x in snaps]  # states before iterations 1, 2, 3
        if all(None not in f for f in flat):
            d1 = [(b - a) & M32 for a, b in zip(flat[0], flat[1])]
            d2 = [(c - b) & M32 for b, c in zip(flat[1], flat[2])]
            if d1 == d2:
                saved = (s.steps, list(s.counts), list(s.skipped))
                s.restore(_unflat([(a + (n - 2) * d) & M32 for a, d in zip(flat[0], d1)]))
                self.iteration(lp, n - 1, depth)
                ev = s.events
                if _linear_events(ev[marks[0]:marks[1]], ev[marks[1]:marks[2]], ev[marks[2]:], n - 1):
                    # iterations 3 .. n-2 execute the same instructions as the sampled ones
                    s.counts = [c + (n - 4) * ((c - c0) // 4) for c, c0 in zip(s.counts, counts0)]
                    s.skipped = [c + (n - 4) * ((c - c0) // 4) for c, c0 in zip(s.skipped, skipped0)]
                    s.steps += (n - 4) * ((s.steps - steps0) // 4)
                    done = n
                else:  # an address wrapped: step through iterations 3 .. n-1 for real
                    s.steps, s.counts, s.skipped = saved
                    s.restore(snaps[2])
        s.recording -= 1
        if not s.recording:
            del s.events[mark:]
        for k in range(done, n):
            self.iteration(lp, k, depth)


def _flat(snap):
    """A snapshot as one list (the register slots of :data:`plena.emu_jax.structure.REG_SLOTS`)."""
    gp, a_hi, a_lo, scale, stride, vmask = snap
    return [*gp, *a_hi, *a_lo, scale, stride, vmask]


def _unflat(vals):
    return (vals[:16], vals[16:32], vals[32:48], vals[48], vals[49], vals[50])


def plan_program(prog: DecodedProgram, cfg: PlenaConfig, intsram=None, *, max_dynamic: int = 20_000_000,
                 structured: bool = True) -> Plan:
    """The pre-pass (see the module docstring). ``structured=False`` forces the linear walker."""
    n = len(prog)
    if structured:
        from plena.emu_jax.structure import Malformed, parse

        try:
            items, _ = parse(prog)
        except Malformed:
            items = None
        if items is not None:
            s = _Scalars(prog, cfg, intsram, max_dynamic)
            try:
                _Structured(s, prog).items(items, 0)
                return s.plan(structured=True)
            except (_NeedLinear, _StaticError):
                pass
            except _Inexact:
                s.exact = False
                return s.plan(structured=True)
    return _walk_linear(_Scalars(prog, cfg, intsram, max_dynamic), n)
