"""Errors raised by the emulator: one hierarchy, each naming pc, instruction and rule.

Inside a jitted run an error is an integer code carried in the machine state (the run stops
at the faulting instruction, whose effects are discarded); :func:`raise_for` turns it into
the matching exception afterwards. Every panic of the reference (spec §4.7) has a code.
"""

from __future__ import annotations

import enum


class PlenaError(Exception):
    """Base class: a condition under which the reference emulator panics (exit 101)."""

    def __init__(self, rule: str, *, pc: int | None = None, instr: str | None = None,
                 detail: str = ""):
        self.rule, self.pc, self.instr, self.detail = rule, pc, instr, detail
        where = f"pc {pc}: {instr}: " if pc is not None else ""
        super().__init__(f"{where}{rule}" + (f" ({detail})" if detail else ""))


class DecodeError(PlenaError):
    """Raised while loading a program (the reference decodes everything before running)."""


class ExecutionError(PlenaError):
    """Raised when an executed instruction violates a rule of the reference."""


class LoadError(PlenaError):
    """A preload file or machine-size option the reference would reject."""


class Err(enum.IntEnum):
    NONE = 0
    INVALID_OPCODE = 1
    FP_REG = 2
    FPSRAM_RANGE = 3
    INTSRAM_RANGE = 4
    VRAM_ALIGN = 5
    VRAM_RANGE = 6
    MRAM_ALIGN = 7
    MRAM_RANGE = 8
    MM_OFFSET = 9
    MM_COLBLOCK = 10
    MV_OFFSET = 11
    WO_COLUMN = 12
    BWO_ALIGN = 13
    HEAD_OFFSET = 14
    BATCH_BLOCK = 15
    BMV = 16
    TOPK_POLICY = 17
    LOOP_ZERO = 18
    LOOP_END_UNMATCHED = 19
    BREAK_NO_LOOP = 20
    LOOP_BUDGET = 21
    HBM_WRITE_RANGE = 22
    WINDOW = 23  # internal: the emulated memory window was sized too small
    LOOP_STACK = 24  # internal: loop stack deeper than planned
    BATCH_CONFIG = 25
    LANE_CONFLICT = 26  # internal: a loop run as lanes had dependent iterations (the run is redone)


RULES: dict[Err, str] = {
    Err.INVALID_OPCODE: "invalid opcode (0x00, 0x31, 0x33 and 0x38-0x3F are not executable)",
    Err.FP_REG: "fp register index must be 0..7",
    Err.FPSRAM_RANGE: "FP SRAM index out of range (>= 1024)",
    Err.INTSRAM_RANGE: "INT SRAM index out of range (>= 1024)",
    Err.VRAM_ALIGN: "VRAM address not a multiple of VLEN",
    Err.VRAM_RANGE: "VRAM row beyond VECTOR_SRAM_SIZE",
    Err.MRAM_ALIGN: "MRAM address not a multiple of MLEN*MLEN",
    Err.MRAM_RANGE: "MRAM tile beyond MATRIX_SRAM_SIZE/MLEN",
    Err.MM_OFFSET: "M_MM matrix offset not a multiple of MLEN",
    Err.MM_COLBLOCK: "matrix column block (offset/MLEN) not a multiple of BLEN",
    Err.MV_OFFSET: "M_MV matrix offset not a multiple of BLEN or not below MLEN",
    Err.WO_COLUMN: "write-out column not a multiple of BLEN",
    Err.BWO_ALIGN: "batched write-out VRAM address not a multiple of MLEN",
    Err.HEAD_OFFSET: "batched-head offset not a multiple of HLEN",
    Err.BATCH_BLOCK: "batched op with a non-zero row/column block (libtorch shape error)",
    Err.BMV: "M_BMV always panics in the reference (hv_accum shape-broadcast bug)",
    Err.TOPK_POLICY: "V_TOPK policy must be 0 or 1",
    Err.LOOP_ZERO: "C_LOOP_START iteration count must be greater than 0",
    Err.LOOP_END_UNMATCHED: "C_LOOP_END without a matching active loop",
    Err.BREAK_NO_LOOP: "C_BREAK: no active loop to break out of",
    Err.LOOP_BUDGET: "loop iteration exceeded MAX_LOOP_INSTRUCTIONS",
    Err.HBM_WRITE_RANGE: "HBM write beyond HBM capacity",
    Err.WINDOW: "access beyond the emulated memory window (internal sizing error; please report)",
    Err.LOOP_STACK: "loop nesting deeper than the emulator planned (internal; please report)",
    Err.BATCH_CONFIG: "batched-head op needs BROADCAST_AMOUNT * HLEN == MLEN",
    Err.LANE_CONFLICT: "a loop run as lanes had dependent iterations (internal; the run is redone without lanes)",
}


def raise_for(code: int, pc: int, instr: str) -> None:
    if code == Err.NONE:
        return
    err = Err(code)
    raise ExecutionError(RULES[err], pc=pc, instr=instr)
