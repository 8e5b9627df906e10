"""Disassembler: machine words back to upstream assembly text.

Each word is printed in the canonical operand form of its encoding group, so that
:func:`plena.isa.assembler.assemble` gives the same word back. Words the upstream syntax
cannot express (bits in fields its group does not place, unassigned opcodes) are printed as
``.word 0x........`` followed by a comment with the emulator's view of the fields.
"""

from __future__ import annotations

from typing import Iterable

from plena.isa.encoding import decode, register_name
from plena.isa.opcodes import OPCODES, Layout, Role


def _canonical(word: int) -> str | None:
    ins = decode(word)
    spec = OPCODES.get(ins.opcode)
    if spec is None:
        return None
    m, lay = spec.mnemonic, spec.layout
    # Registers are printed with the role's prefix; an unused rd slot as a number.
    rd = register_name(spec.rd if spec.rd is not Role.IGNORED else Role.FLAG, ins.rd)

    def reg(role: Role, idx: int) -> str:  # rs1/rs2 must carry a register prefix to parse as such
        return register_name(role if role in (Role.GP, Role.FP, Role.ADDR) else Role.GP, idx)

    if lay is Layout.IMM18_RS1_RD:
        return f"{m} {rd}, {reg(spec.rs1, ins.rs1)}, {ins.imm18}"
    if lay in (Layout.IMM22_RD, Layout.LOOP):
        return f"{m} {rd}, {ins.imm22}"
    if lay is Layout.RS1_RD:
        return f"{m} {rd}, {reg(spec.rs1, ins.rs1)}"
    if lay is Layout.NONE:
        return m
    if lay is Layout.RD:
        return f"{m} {rd}"
    base = f"{m} {rd}, {reg(spec.rs1, ins.rs1)}, {reg(spec.rs2, ins.rs2)}"
    if lay is Layout.FUNCT_STRIDE:
        return f"{base}, {ins.rs3}, {ins.funct1}"
    if lay is Layout.RMASK:
        return f"{base}, {ins.rs3}"
    return base


def describe_fields(word: int) -> str:
    ins = decode(word)
    return (f"opcode=0x{ins.opcode:02X} rd={ins.rd} rs1={ins.rs1} rs2={ins.rs2} rs3={ins.rs3} "
            f"funct1={ins.funct1} imm18={ins.imm18} imm22={ins.imm22}")


def disassemble_word(word: int, *, raw_fallback: bool = True) -> str:
    """Text for one word. With ``raw_fallback=False`` a non-canonical word is shown in its
    nearest canonical form plus the field dump (for error messages), not as ``.word``."""
    from plena.isa.assembler import AsmError, assemble_line

    text = _canonical(word)
    if text is not None:
        try:
            if assemble_line(text) == word:
                return text
        except AsmError:
            pass
    if not raw_fallback:
        return f"{text or 'INVALID'} [{describe_fields(word)}]"
    return f".word 0x{word:08X}  ; {describe_fields(word)}"


def disassemble(words: Iterable[int], *, with_pc: bool = False) -> str:
    lines = []
    for pc, word in enumerate(words):
        text = disassemble_word(word)
        lines.append(f"{text:<40} ; pc {pc}" if with_pc and not text.startswith(".word") else text)
    return "\n".join(lines) + ("\n" if lines else "")
