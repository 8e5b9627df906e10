"""Register values known before the run, folded into register sets.

The scalar code between a program's loops mostly computes addresses from constants
(``S_ADDI_INT gp1, gp0, 13824``, ``C_SET_ADDR_REG a0, gp0, gp1``, ``S_LUI_INT`` pairs,
``C_SET_SCALE_REG``). The static pre-pass (:mod:`plena.emu_jax.plan`) executes it anyway, so
its results are known before the run. :func:`fold` replaces every maximal run of such
instructions outside loops by one :class:`~plena.emu_jax.structure.Regs` item holding the
values the run leaves in the registers it writes. All register sets share one signature, so
glue code that differs only in which registers it sets, or in how it builds a constant, no
longer splits otherwise identical code (decoder layers fold into one repeat), and the fast
executor runs such a run as a few selects instead of instruction by instruction.

Only runs whose every written value is known are folded (values loaded from INT SRAM that
V_TOPK wrote, for example, are not): the registers then hold exactly what the instructions
would have left. Nothing else changes: these instructions read and write registers only and
never fail; the instruction counts come from the plan as before.
"""

from __future__ import annotations

from plena.emu_jax import plan as plan_mod
from plena.emu_jax.structure import REG_SLOTS, Const, Instr, Regs, Signatures
from plena.isa.encoding import DecodedProgram
from plena.isa.opcodes import BY_MNEMONIC

_OP = {m: s.code for m, s in BY_MNEMONIC.items()}
#: opcodes that only compute register values from registers and immediates (never fail)
FOLDABLE = frozenset(_OP[m] for m in ("S_ADD_INT", "S_ADDI_INT", "S_SUB_INT", "S_MUL_INT", "S_LUI_INT",
                                      "C_SET_ADDR_REG", "C_SET_SCALE_REG", "C_SET_STRIDE_REG",
                                      "C_SET_V_MASK_REG"))
_SET_ADDR, _SCALE, _STRIDE, _VMASK = (_OP[m] for m in ("C_SET_ADDR_REG", "C_SET_SCALE_REG", "C_SET_STRIDE_REG",
                                                       "C_SET_V_MASK_REG"))


def _slots(prog: DecodedProgram, pc: int) -> tuple:
    """The register slots (:data:`~plena.emu_jax.structure.REG_SLOTS` numbering) the
    foldable instruction at pc writes."""
    op, rd = int(prog.opcode[pc]), int(prog.rd[pc])
    if op == _SET_ADDR:
        return 16 + rd, 32 + rd
    if op == _SCALE:
        return (48,)
    if op == _STRIDE:
        return (49,)
    if op == _VMASK:
        return (50,)
    return (rd,)


def _foldable(prog: DecodedProgram, it) -> bool:
    return isinstance(it, Const) or (isinstance(it, Instr) and int(prog.opcode[it.pc]) in FOLDABLE)


def _pcs(it) -> range:
    return range(it.pc, it.end) if isinstance(it, Const) else range(it.pc, it.pc + 1)


def fold(items: list, prog: DecodedProgram, cfg, intsram, sigs: Signatures) -> list:
    """``items`` (a parsed, not yet folded top level) with every maximal run of foldable
    items whose results are known replaced by a Regs item. ``intsram``: the INT SRAM
    preload (S_LD_INT values); returns ``items`` unchanged if the pre-pass cannot walk the
    program exactly."""
    s = plan_mod._Scalars(prog, cfg, intsram, max_dynamic=20_000_000)
    walker = plan_mod._Structured(s, prog)
    out: list = []
    run: list = []

    def flush():
        if not run:
            return
        written = sorted({slot for it in run for pc in _pcs(it) for slot in _slots(prog, pc)})
        flat = plan_mod._flat(s.snapshot())
        if any(flat[i] is None for i in written):  # some result depends on data: keep the code
            out.extend(run)
        else:
            values = [None] * REG_SLOTS
            for i in written:
                values[i] = flat[i]
            out.append(Regs(run[0].pc, _pcs(run[-1]).stop, tuple(values), sigs(("G",))))
        run.clear()

    try:
        for it in items:
            if _foldable(prog, it):
                run.append(it)
            else:
                flush()
                out.append(it)
            walker.item(it, 0)
        flush()
    except (plan_mod._Inexact, plan_mod._StaticError, plan_mod._NeedLinear):
        return items
    return out
