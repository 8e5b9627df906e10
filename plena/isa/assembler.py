"""Assembler for the upstream PLENA assembly text (spec §3.3).

Accepts exactly what the upstream assembler accepts (``MNEMONIC op, op, ...`` lines, ``;``
and ``//`` comments, ``gpN``/``fN``/``aN`` registers, non-negative decimal immediates, the
operand-count rules and each mnemonic's encoding group, quirks included), and produces the
same words. Where the upstream tool would crash or silently produce a corrupt word
(unknown mnemonic, a label, a missing operand, a register >= 16 spilling into the next field,
a negative or too-wide immediate), this one raises :class:`AsmError` naming the line.

One extension: ``.word 0xXXXXXXXX`` emits a raw word (the disassembler uses it for words the
upstream syntax cannot express).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from plena.isa.encoding import (FUNCT1_SHIFT, IMM18_MAX, IMM18_SHIFT, IMM22_MAX, IMM22_SHIFT,
                                RD_SHIFT, RS1_SHIFT, RS2_SHIFT, RS3_SHIFT, WORD_MAX)
from plena.isa.opcodes import BY_MNEMONIC, Layout

_REG_PREFIXES = ("gp", "f", "a")
# Spec §3.3: 3-operand forms of these copy the integer operand into rmask (which their
# encoding group then ignores or misplaces); the binary rmask ops default rmask to 0.
_MASKED_UNARY = frozenset({"V_EXP_V", "V_RECI_V", "V_RED_SUM", "V_RED_MAX"})


class AsmError(ValueError):
    """An assembly line the PLENA assembler cannot encode."""

    def __init__(self, lineno: int, text: str, problem: str):
        self.lineno, self.text, self.problem = lineno, text, problem
        super().__init__(f"line {lineno}: {problem}: {text.strip()!r}")


@dataclasses.dataclass
class AsmOperands:
    """The operand slots as the upstream parser fills them (None = absent)."""

    mnemonic: str
    rd: int | None = None
    rs1: int | None = None
    rs2: int | None = None
    rstride: int | None = None  # doubles as rmask
    funct1: int | None = None
    funct2: int | None = None
    imm: int | None = None


def strip_comment(line: str) -> str:
    for marker in ("//", ";"):
        cut = line.find(marker)
        if cut != -1:
            line = line[:cut]
    return line.strip()


def _number(tok: str, what: str) -> int:
    try:
        value = int(tok, 10)
    except ValueError:
        raise ValueError(f"{what} {tok!r} is not a decimal integer") from None
    if value < 0:
        raise ValueError(f"{what} {tok!r} is negative (immediates must be non-negative)")
    return value


def _operand(tok: str) -> int:
    if tok.startswith("gp"):
        return _number(tok[2:], "register")
    if tok.startswith(("f", "a")):
        return _number(tok[1:], "register")
    return _number(tok, "operand")


def _looks_like_register(tok: str) -> bool:
    return tok.startswith(_REG_PREFIXES)


def parse_operands(mnemonic: str, operands: list[str]) -> AsmOperands:
    """Fill the operand slots following the upstream operand-count rules."""
    ops = AsmOperands(mnemonic)
    n = len(operands)
    if n == 0:
        return ops
    if n > 6:
        raise ValueError(f"{n} operands (at most 6 are accepted)")
    if any(not tok for tok in operands):
        raise ValueError("empty operand")
    ops.rd = _operand(operands[0])
    for slot, tok in (("rs1", operands[1:2]), ("rs2", operands[2:3])):
        if not tok:
            continue
        if _looks_like_register(tok[0]):
            setattr(ops, slot, _operand(tok[0]))
        else:  # an immediate; the later one wins, as upstream
            ops.imm = _number(tok[0], "immediate")
    if n == 3:
        if mnemonic in _MASKED_UNARY:
            ops.rstride = ops.imm
        elif BY_MNEMONIC[mnemonic].layout is Layout.RMASK:
            ops.rstride = 0
    if n >= 4:
        ops.rstride = _number(operands[3], "rstride/rmask")
    if n >= 5:
        ops.funct1 = _number(operands[4], "funct1")
    if n == 6:
        ops.funct2 = _number(operands[5], "funct2")
    return ops


def _need(ops: AsmOperands, name: str, limit: int) -> int:
    value = getattr(ops, name)
    if value is None:
        what = {"imm": "an immediate", "rstride": "an rstride/rmask operand", "funct1": "a funct1 operand"}
        raise ValueError(f"{ops.mnemonic} needs {what.get(name, 'register operand ' + name)}"
                         + (" (a bare number there is read as an immediate; write gpN)"
                            if name in ("rs1", "rs2") else ""))
    if value > limit:
        kind = "immediate" if name == "imm" else f"{name} field"
        raise ValueError(f"{kind} value {value} does not fit (max {limit})"
                         + ("; load large values with S_LUI_INT + S_ADDI_INT" if name == "imm" else ""))
    return value


def encode_operands(ops: AsmOperands) -> int:
    """Place the operands by the mnemonic's encoding group (spec §3.3)."""
    spec = BY_MNEMONIC.get(ops.mnemonic)
    if spec is None:
        raise ValueError(f"unknown mnemonic {ops.mnemonic!r}")
    lay, code = spec.layout, spec.code
    if lay is Layout.IMM18_RS1_RD:
        word = _need(ops, "imm", IMM18_MAX) << IMM18_SHIFT | _need(ops, "rs1", 15) << RS1_SHIFT \
            | _need(ops, "rd", 15) << RD_SHIFT
    elif lay in (Layout.IMM22_RD, Layout.LOOP):
        word = _need(ops, "imm", IMM22_MAX) << IMM22_SHIFT | _need(ops, "rd", 15) << RD_SHIFT
    elif lay is Layout.RS1_RD:
        word = _need(ops, "rs1", 15) << RS1_SHIFT | _need(ops, "rd", 15) << RD_SHIFT
    elif lay is Layout.NONE:
        word = 0
    elif lay is Layout.RD:
        word = _need(ops, "rd", 15) << RD_SHIFT
    elif lay is Layout.FUNCT_STRIDE:
        word = (_need(ops, "funct1", 15) << FUNCT1_SHIFT | _need(ops, "rstride", 15) << RS3_SHIFT
                | _need(ops, "rs2", 15) << RS2_SHIFT | _need(ops, "rs1", 15) << RS1_SHIFT
                | _need(ops, "rd", 15) << RD_SHIFT)
    elif lay is Layout.RMASK:
        if ops.rstride is None:
            ops.rstride = 0
        word = (_need(ops, "rstride", 15) << RS3_SHIFT | _need(ops, "rs2", 15) << RS2_SHIFT
                | _need(ops, "rs1", 15) << RS1_SHIFT | _need(ops, "rd", 15) << RD_SHIFT)
    else:  # RS2_RS1_RD
        word = _need(ops, "rs2", 15) << RS2_SHIFT | _need(ops, "rs1", 15) << RS1_SHIFT \
            | _need(ops, "rd", 15) << RD_SHIFT
    word |= code
    if word > WORD_MAX:  # cannot happen after the range checks; kept as the upstream rule
        raise ValueError(f"encoding 0x{word:X} exceeds 32 bits")
    return word


def assemble_line(line: str, lineno: int = 1) -> int | None:
    """Assemble one source line; None for blank/comment lines."""
    text = strip_comment(line)
    if not text:
        return None
    parts = text.split()
    mnemonic = parts[0]
    try:
        if mnemonic.endswith(":"):
            raise ValueError("labels are not supported by the PLENA assembly syntax")
        if mnemonic == ".word":
            if len(parts) != 2:
                raise ValueError(".word takes exactly one value")
            value = int(parts[1], 0)
            if not 0 <= value <= WORD_MAX:
                raise ValueError(f"word {parts[1]} does not fit in 32 bits")
            return value
        if mnemonic not in BY_MNEMONIC:
            hint = " (mnemonics are upper case)" if mnemonic.upper() in BY_MNEMONIC else ""
            raise ValueError(f"unknown mnemonic {mnemonic!r}{hint}")
        rest = " ".join(parts[1:])
        operands = [tok.strip() for tok in rest.split(",")] if rest else []
        return encode_operands(parse_operands(mnemonic, operands))
    except ValueError as exc:
        raise AsmError(lineno, line, str(exc)) from None


def assemble(source: str | Iterable[str]) -> list[int]:
    """Assemble program text (a string or an iterable of lines) into 32-bit words."""
    lines = source.splitlines() if isinstance(source, str) else source
    words = []
    for lineno, line in enumerate(lines, start=1):
        word = assemble_line(line, lineno)
        if word is not None:
            words.append(word)
    return words


def assemble_file(path: str | Path) -> list[int]:
    return assemble(Path(path).read_text())
