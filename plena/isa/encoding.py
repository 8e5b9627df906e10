"""Bit-exact 32-bit instruction encoding and decoding (spec §3.1).

::

     31      26 25   22 21   18 17   14 13   10 9     6 5      0
    [ unused  ][funct1][ rs3  ][ rs2  ][ rs1  ][  rd  ][ opcode ]
                                       [<------ imm22 (31..10) ------->]
                       [<-- imm18 (31..14) -->]

Both immediates are unsigned. The decoder extracts every field of every word; which fields
an opcode consumes is recorded in :mod:`plena.isa.opcodes`.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np

from plena.isa.opcodes import OPCODES, OpSpec, Role, mnemonic_of

OPCODE_BITS, REG_BITS = 6, 4
RD_SHIFT, RS1_SHIFT, RS2_SHIFT, RS3_SHIFT, FUNCT1_SHIFT = 6, 10, 14, 18, 22
IMM18_SHIFT, IMM22_SHIFT = 14, 10
IMM18_MAX, IMM22_MAX = (1 << 18) - 1, (1 << 22) - 1
WORD_MAX = 0xFFFFFFFF


class Instr(NamedTuple):
    """One decoded instruction word (all fields, consumed or not)."""

    word: int
    opcode: int
    rd: int
    rs1: int
    rs2: int
    rs3: int
    funct1: int
    imm18: int
    imm22: int

    @property
    def spec(self) -> OpSpec | None:
        return OPCODES.get(self.opcode)

    @property
    def mnemonic(self) -> str:
        return mnemonic_of(self.opcode)

    def __str__(self) -> str:  # human-readable, used in error messages
        from plena.isa.disassembler import disassemble_word

        return disassemble_word(self.word, raw_fallback=False)


def decode(word: int) -> Instr:
    if not 0 <= word <= WORD_MAX:
        raise ValueError(f"instruction word 0x{word:X} does not fit in 32 bits")
    return Instr(
        word=word,
        opcode=word & 0x3F,
        rd=(word >> RD_SHIFT) & 0xF,
        rs1=(word >> RS1_SHIFT) & 0xF,
        rs2=(word >> RS2_SHIFT) & 0xF,
        rs3=(word >> RS3_SHIFT) & 0xF,
        funct1=(word >> FUNCT1_SHIFT) & 0xF,
        imm18=word >> IMM18_SHIFT,
        imm22=word >> IMM22_SHIFT,
    )


def encode_fields(opcode: int, rd: int = 0, rs1: int = 0, rs2: int = 0, rs3: int = 0,
                  funct1: int = 0, imm18: int | None = None, imm22: int | None = None) -> int:
    """Encode by the emulator's field view. An immediate overrides the fields it overlaps."""
    for name, v, hi in (("opcode", opcode, 0x3F), ("rd", rd, 15), ("rs1", rs1, 15), ("rs2", rs2, 15),
                        ("rs3", rs3, 15), ("funct1", funct1, 15)):
        if not 0 <= v <= hi:
            raise ValueError(f"field {name}={v} out of range 0..{hi}")
    word = opcode | rd << RD_SHIFT
    if imm22 is not None:
        if not 0 <= imm22 <= IMM22_MAX:
            raise ValueError(f"imm22={imm22} out of range 0..{IMM22_MAX}")
        return word | imm22 << IMM22_SHIFT
    word |= rs1 << RS1_SHIFT
    if imm18 is not None:
        if not 0 <= imm18 <= IMM18_MAX:
            raise ValueError(f"imm18={imm18} out of range 0..{IMM18_MAX}")
        return word | imm18 << IMM18_SHIFT
    return word | rs2 << RS2_SHIFT | rs3 << RS3_SHIFT | funct1 << FUNCT1_SHIFT


class DecodedProgram(NamedTuple):
    """Struct-of-arrays view of a whole program (int32 columns), as the executors consume it."""

    word: np.ndarray
    opcode: np.ndarray
    rd: np.ndarray
    rs1: np.ndarray
    rs2: np.ndarray
    rs3: np.ndarray
    funct1: np.ndarray
    imm18: np.ndarray
    imm22: np.ndarray

    def __len__(self) -> int:
        return int(self.word.shape[0])

    def instr(self, pc: int) -> Instr:
        return decode(int(self.word[pc]))


def decode_program(words: Iterable[int]) -> DecodedProgram:
    w = np.asarray(list(words) if not isinstance(words, np.ndarray) else words, dtype=np.uint64)
    if w.size and int(w.max()) > WORD_MAX:
        raise ValueError("instruction word does not fit in 32 bits")
    w = w.astype(np.uint32)

    def f(shift: int, mask: int) -> np.ndarray:
        return ((w >> np.uint32(shift)) & np.uint32(mask)).astype(np.int32)

    return DecodedProgram(
        word=w,
        opcode=f(0, 0x3F), rd=f(RD_SHIFT, 0xF), rs1=f(RS1_SHIFT, 0xF), rs2=f(RS2_SHIFT, 0xF),
        rs3=f(RS3_SHIFT, 0xF), funct1=f(FUNCT1_SHIFT, 0xF),
        imm18=(w >> np.uint32(IMM18_SHIFT)).astype(np.int32),
        imm22=(w >> np.uint32(IMM22_SHIFT)).astype(np.int32),
    )


def register_name(role: Role, index: int) -> str:
    return f"{role.value}{index}" if role in (Role.GP, Role.FP, Role.ADDR) else str(index)
