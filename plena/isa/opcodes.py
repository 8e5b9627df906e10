"""The PLENA opcode table: the single source of truth for the ISA.

Every other part of the package is driven by :data:`OPCODES`: the encoder and decoder
(:mod:`plena.isa.encoding`), the assembler and disassembler, the emulator's dispatch and
cycle model, and the generated ISA reference (``plena isa-doc``).

Numbers, operand roles and quirks follow the reference emulator (spec §3.2, §4) and the
upstream assembler's field placement (spec §3.3).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Mapping


class Unit(enum.Enum):
    MATRIX = "matrix"
    VECTOR = "vector"
    SCALAR_FP = "scalar-fp"
    SCALAR_INT = "scalar-int"
    HBM = "hbm"
    CONTROL = "control"
    INVALID = "invalid"


class Layout(enum.Enum):
    """Where the upstream assembler places the operands (spec §3.3 encoding groups).

    The groups are listed in the order the assembler checks them; the table below records
    the group that wins for each mnemonic (so V_EXP_V is IMM18_RS1_RD, not RS1_RD).
    """

    IMM18_RS1_RD = 1  # imm<<14 | rs1<<10 | rd<<6
    IMM22_RD = 2  # imm<<10 | rd<<6      (the imm22 position)
    RS1_RD = 3  # rs1<<10 | rd<<6
    NONE = 4  # opcode only
    RD = 5  # rd<<6
    LOOP = 6  # imm<<10 | rd<<6      (C_LOOP_START)
    FUNCT_STRIDE = 7  # funct1<<22 | rstride<<18 | rs2<<14 | rs1<<10 | rd<<6
    RMASK = 8  # rmask<<18 | rs2<<14 | rs1<<10 | rd<<6
    RS2_RS1_RD = 9  # rs2<<14 | rs1<<10 | rd<<6


class Role(enum.Enum):
    """What a 4-bit field means to the emulator (and how the disassembler prints it)."""

    GP = "gp"  # index of a general-purpose (u32) register
    FP = "f"  # index of a bf16 scalar register (0..7 exist)
    ADDR = "a"  # index of an HBM address register
    FLAG = "flag"  # a plain number (rmask/rstride flag, funct1, policy, stride reg index)
    IGNORED = "-"  # not read by the emulator


class Cycles(enum.Enum):
    """Cycle classes of spec §6 (resolved against the config by the emulator)."""

    SYSTOLIC_MLEN = "SYSTOLIC_PROCESSING_OVERHEAD + MLEN"
    SYSTOLIC_ONE = "SYSTOLIC_PROCESSING_OVERHEAD + 1"
    MLEN = "MLEN"
    ONE = "1"
    VECTOR_ADD = "VECTOR_ADD_CYCLES"
    VECTOR_MUL = "VECTOR_MUL_CYCLES"
    VECTOR_EXP = "VECTOR_EXP_CYCLES"
    VECTOR_RECI = "VECTOR_RECI_CYCLES"
    VECTOR_MAX = "VECTOR_MAX_CYCLES"
    VECTOR_SUM = "VECTOR_SUM_CYCLES"
    VECTOR_TOPK = "VECTOR_MAX_CYCLES x experts"
    SCALAR_FP_BASIC = "SCALAR_FP_BASIC_CYCLES"
    SCALAR_FP_EXP = "SCALAR_FP_EXP_CYCLES"
    SCALAR_FP_RECI = "SCALAR_FP_RECI_CYCLES"
    SCALAR_FP_SQRT = "SCALAR_FP_SQRT_CYCLES"
    SCALAR_INT = "SCALAR_INT_BASIC_CYCLES"
    TWO_VLEN = "2 x VLEN"
    HBM = "HBM (Ramulator; not modelled)"
    NONE = "0 (panics)"


@dataclasses.dataclass(frozen=True)
class OpSpec:
    code: int
    mnemonic: str
    unit: Unit
    layout: Layout
    rd: Role = Role.IGNORED
    rs1: Role = Role.IGNORED
    rs2: Role = Role.IGNORED
    rs3: Role = Role.IGNORED
    funct1: Role = Role.IGNORED
    imm: str | None = None  # "imm18" or "imm22": the immediate the EMULATOR reads
    cycles: Cycles = Cycles.ONE
    executable: bool = True  # False: assembles, but the emulator treats it as Invalid
    fp_dest: bool = False  # rd is an fp register protected when 0 (op skipped, 0 cycles)
    summary: str = ""


G, F, A, X, N = Role.GP, Role.FP, Role.ADDR, Role.FLAG, Role.IGNORED
L = Layout
C = Cycles
U = Unit

_TABLE: tuple[OpSpec, ...] = (
    # --- matrix -------------------------------------------------------------------------
    OpSpec(0x01, "M_MM", U.MATRIX, L.RS2_RS1_RD, N, G, G, cycles=C.SYSTOLIC_MLEN,
           summary="m_accum[BLEN,BLEN] += VRAM[gp[rs2]] rows @ MRAM tile columns (gp[rs1], row-granular)"),
    OpSpec(0x02, "M_TMM", U.MATRIX, L.RS2_RS1_RD, N, G, G, cycles=C.SYSTOLIC_MLEN,
           summary="m_accum += VRAM[gp[rs1]] rows @ MRAM[gp[rs2]] rows^T (operands swapped vs M_MM)"),
    OpSpec(0x03, "M_BMM", U.MATRIX, L.RS2_RS1_RD, N, G, G, cycles=C.SYSTOLIC_MLEN,
           summary="hm_accum[g] += 0.25 * X_g(interleaved heads) @ T[h0:h0+HLEN, :]; rd must be 0"),
    OpSpec(0x04, "M_BTMM", U.MATRIX, L.RS2_RS1_RD, N, G, G, cycles=C.SYSTOLIC_MLEN,
           summary="hm_accum[g] += 0.25 * X_g(contiguous heads) @ T[:, h0:h0+HLEN]^T; rd must be 0"),
    OpSpec(0x05, "M_BMM_WO", U.MATRIX, L.IMM22_RD, G, imm="imm18", cycles=C.ONE,
           summary="VRAM[gp[rd]+imm18 + (g*MLEN+i)*MLEN] = bf16(hm_accum[g][i]); hm_accum = 0"),
    OpSpec(0x06, "M_MM_WO", U.MATRIX, L.IMM18_RS1_RD, G, X, imm="imm18", cycles=C.ONE,
           summary="write m_accum BLEN columns into rows gp[rd]+imm18 (+i*MLEN*stride); m_accum = 0"),
    OpSpec(0x07, "M_MV", U.MATRIX, L.RS2_RS1_RD, N, G, G, cycles=C.MLEN,
           summary="v_accum[BLEN] += VRAM[gp[rs2]] @ T[:, off:off+BLEN] (element-granular offset)"),
    OpSpec(0x08, "M_TMV", U.MATRIX, L.RS2_RS1_RD, N, G, G, cycles=C.MLEN,
           summary="v_accum[BLEN] += VRAM[gp[rs2]] @ T[0:BLEN, :]^T (offset must be 0)"),
    OpSpec(0x09, "M_BMV", U.MATRIX, L.RS2_RS1_RD, G, G, G, cycles=C.SYSTOLIC_ONE,
           summary="batched-head matrix-vector (interleaved); always panics in the reference"),
    OpSpec(0x0A, "M_BTMV", U.MATRIX, L.RS2_RS1_RD, G, G, G, cycles=C.SYSTOLIC_ONE,
           summary="hv_accum[g] += 0.25 * x_g(contiguous) @ T[:, h0:h0+HLEN]^T, m_addr = gp[rs1]+gp[rd]"),
    OpSpec(0x0B, "M_MV_WO", U.MATRIX, L.IMM22_RD, G, imm="imm18", cycles=C.ONE,
           summary="VRAM[gp[rd]+imm18][col:col+BLEN] = bf16(v_accum); v_accum = 0"),
    OpSpec(0x0C, "M_BMV_WO", U.MATRIX, L.IMM22_RD, G, imm="imm18", cycles=C.ONE,
           summary="VRAM[gp[rd]+imm18 + g*MLEN] = bf16(hv_accum[g]); hv_accum = 0"),
    # --- vector -------------------------------------------------------------------------
    OpSpec(0x0D, "V_ADD_VV", U.VECTOR, L.RMASK, G, G, G, X, cycles=C.VECTOR_ADD,
           summary="VRAM[gp[rd]] = a + b"),
    OpSpec(0x0E, "V_ADD_VF", U.VECTOR, L.RMASK, G, G, F, X, cycles=C.VECTOR_ADD,
           summary="VRAM[gp[rd]] = a + fp[rs2]"),
    OpSpec(0x0F, "V_SUB_VV", U.VECTOR, L.RMASK, G, G, G, X, cycles=C.VECTOR_ADD,
           summary="VRAM[gp[rd]] = a - b (rs1 - rs2)"),
    OpSpec(0x10, "V_SUB_VF", U.VECTOR, L.FUNCT_STRIDE, G, G, F, X, X, cycles=C.VECTOR_ADD,
           summary="VRAM[gp[rd]] = a - s (funct1 = 0) or s - a (funct1 != 0)"),
    OpSpec(0x11, "V_MUL_VV", U.VECTOR, L.RMASK, G, G, G, X, cycles=C.VECTOR_MUL,
           summary="VRAM[gp[rd]] = a * b"),
    OpSpec(0x12, "V_MUL_VF", U.VECTOR, L.RMASK, G, G, F, X, cycles=C.VECTOR_MUL,
           summary="VRAM[gp[rd]] = a * fp[rs2]"),
    OpSpec(0x13, "V_EXP_V", U.VECTOR, L.IMM18_RS1_RD, G, G, N, X, cycles=C.VECTOR_EXP,
           summary="VRAM[gp[rd]] = exp(clamp(a, -88, 88)); masked-off heads get the clamped a"),
    OpSpec(0x14, "V_RECI_V", U.VECTOR, L.IMM18_RS1_RD, G, G, N, X, cycles=C.VECTOR_RECI,
           summary="VRAM[gp[rd]] = 1 / a"),
    OpSpec(0x15, "V_RED_SUM", U.VECTOR, L.RS1_RD, F, G, N, X, cycles=C.VECTOR_SUM, fp_dest=True,
           summary="fp[rd] = bf16(fp[rd] + sum(a)) in libtorch's summation order"),
    OpSpec(0x16, "V_RED_MAX", U.VECTOR, L.IMM18_RS1_RD, F, G, N, X, cycles=C.VECTOR_MAX, fp_dest=True,
           summary="fp[rd] = bf16(max(max(a), fp[rd])) (Rust max ignores NaN)"),
    # --- scalar fp ----------------------------------------------------------------------
    OpSpec(0x17, "S_ADD_FP", U.SCALAR_FP, L.RS2_RS1_RD, F, F, F, cycles=C.SCALAR_FP_BASIC, fp_dest=True,
           summary="fp[rd] = bf16(fp[rs1] + fp[rs2])"),
    OpSpec(0x18, "S_SUB_FP", U.SCALAR_FP, L.RS2_RS1_RD, F, F, F, cycles=C.SCALAR_FP_BASIC, fp_dest=True,
           summary="fp[rd] = bf16(fp[rs1] - fp[rs2])"),
    OpSpec(0x19, "S_MAX_FP", U.SCALAR_FP, L.RS2_RS1_RD, F, F, F, cycles=C.SCALAR_FP_BASIC, fp_dest=True,
           summary="fp[rd] = half-crate max (NaN ignored unless both NaN; ties keep rs1)"),
    OpSpec(0x1A, "S_MUL_FP", U.SCALAR_FP, L.RS2_RS1_RD, F, F, F, cycles=C.SCALAR_FP_BASIC, fp_dest=True,
           summary="fp[rd] = bf16(fp[rs1] * fp[rs2])"),
    OpSpec(0x1B, "S_EXP_FP", U.SCALAR_FP, L.RS1_RD, F, F, cycles=C.SCALAR_FP_EXP, fp_dest=True,
           summary="fp[rd] = bf16(exp(clamp(fp[rs1], -88, 88)))"),
    OpSpec(0x1C, "S_RECI_FP", U.SCALAR_FP, L.RS1_RD, F, F, cycles=C.SCALAR_FP_RECI, fp_dest=True,
           summary="fp[rd] = bf16(1 / fp[rs1])"),
    OpSpec(0x1D, "S_SQRT_FP", U.SCALAR_FP, L.RS1_RD, F, F, cycles=C.SCALAR_FP_SQRT, fp_dest=True,
           summary="fp[rd] = bf16(sqrt(fp[rs1]))"),
    OpSpec(0x1E, "S_LD_FP", U.SCALAR_FP, L.IMM18_RS1_RD, F, G, imm="imm18", cycles=C.ONE,
           summary="fp[rd] = FP_SRAM[gp[rs1] + imm18] (also for rd = 0)"),
    OpSpec(0x1F, "S_ST_FP", U.SCALAR_FP, L.IMM18_RS1_RD, F, G, imm="imm18", cycles=C.ONE,
           summary="FP_SRAM[gp[rs1] + imm18] = fp[rd]"),
    OpSpec(0x20, "S_MAP_V_FP", U.SCALAR_FP, L.IMM18_RS1_RD, G, G, imm="imm18", cycles=C.TWO_VLEN,
           summary="VRAM[gp[rd]] = FP_SRAM[gp[rs1]+imm18 : +VLEN]"),
    # --- scalar int ---------------------------------------------------------------------
    OpSpec(0x21, "S_ADD_INT", U.SCALAR_INT, L.RS2_RS1_RD, G, G, G, cycles=C.SCALAR_INT,
           summary="gp[rd] = gp[rs1] + gp[rs2] (mod 2^32)"),
    OpSpec(0x22, "S_ADDI_INT", U.SCALAR_INT, L.IMM18_RS1_RD, G, G, imm="imm18", cycles=C.SCALAR_INT,
           summary="gp[rd] = gp[rs1] + imm18 (mod 2^32)"),
    OpSpec(0x23, "S_SUB_INT", U.SCALAR_INT, L.RS2_RS1_RD, G, G, G, cycles=C.SCALAR_INT,
           summary="gp[rd] = gp[rs1] - gp[rs2] (mod 2^32)"),
    OpSpec(0x24, "S_MUL_INT", U.SCALAR_INT, L.RS2_RS1_RD, G, G, G, cycles=C.SCALAR_INT,
           summary="gp[rd] = low 32 bits of gp[rs1] * gp[rs2]"),
    OpSpec(0x25, "S_LUI_INT", U.SCALAR_INT, L.IMM22_RD, G, imm="imm22", cycles=C.SCALAR_INT,
           summary="gp[rd] = (imm22 << 12) mod 2^32 (overwrites)"),
    OpSpec(0x26, "S_LD_INT", U.SCALAR_INT, L.IMM18_RS1_RD, G, G, imm="imm18", cycles=C.SCALAR_INT,
           summary="gp[rd] = INT_SRAM[gp[rs1] + imm18]"),
    OpSpec(0x27, "S_ST_INT", U.SCALAR_INT, L.IMM18_RS1_RD, G, G, imm="imm18", cycles=C.SCALAR_INT,
           summary="INT_SRAM[gp[rs1] + imm18] = gp[rd]"),
    # --- HBM ----------------------------------------------------------------------------
    OpSpec(0x28, "H_PREFETCH_M", U.HBM, L.FUNCT_STRIDE, G, G, A, X, X, cycles=C.HBM,
           summary="MRAM tiles at gp[rd] <- MX-decoded HBM rows at a[rs2]+gp[rs1]"),
    OpSpec(0x29, "H_PREFETCH_V", U.HBM, L.FUNCT_STRIDE, G, G, A, X, X, cycles=C.HBM,
           summary="VRAM rows at gp[rd] <- bf16(MX-decoded HBM rows at a[rs2]+gp[rs1])"),
    OpSpec(0x2A, "H_STORE_V", U.HBM, L.FUNCT_STRIDE, G, G, A, X, X, cycles=C.HBM,
           summary="HBM rows at a[rs2]+gp[rs1] <- hardware MX encode of VRAM rows at gp[rd]"),
    # --- control ------------------------------------------------------------------------
    OpSpec(0x2B, "C_SET_ADDR_REG", U.CONTROL, L.RS2_RS1_RD, A, G, G, cycles=C.ONE,
           summary="a[rd] = gp[rs1] << 32 | gp[rs2]"),
    OpSpec(0x2C, "C_SET_SCALE_REG", U.CONTROL, L.RD, G, cycles=C.ONE, summary="SCALE = gp[rd]"),
    OpSpec(0x2D, "C_SET_STRIDE_REG", U.CONTROL, L.RD, G, cycles=C.ONE, summary="STRIDE = gp[rd]"),
    OpSpec(0x2E, "C_SET_V_MASK_REG", U.CONTROL, L.RD, G, cycles=C.ONE, summary="V_MASK = gp[rd]"),
    OpSpec(0x2F, "C_LOOP_START", U.CONTROL, L.LOOP, G, imm="imm22", cycles=C.ONE,
           summary="gp[rd] = imm22 (> 0); push loop {start = pc, reg = rd}"),
    OpSpec(0x30, "C_LOOP_END", U.CONTROL, L.RD, G, cycles=C.ONE,
           summary="innermost loop on rd: if gp[rd] > 1 decrement and jump to start+1, else pop"),
    OpSpec(0x31, "V_PS_V", U.INVALID, L.RS2_RS1_RD, G, G, G, cycles=C.NONE, executable=False,
           summary="RTL prefix scan; Invalid in the emulator"),
    OpSpec(0x32, "V_SHFT_V", U.VECTOR, L.RS2_RS1_RD, G, G, G, cycles=C.VECTOR_MUL,
           summary="VRAM[gp[rd]][i] = a[i - gp[rs2]] (shift right, zero fill)"),
    OpSpec(0x33, "C_HADAMARD_TRANSFORM", U.INVALID, L.RS2_RS1_RD, G, G, G, cycles=C.NONE,
           executable=False, summary="RTL Hadamard transform; Invalid in the emulator"),
    OpSpec(0x34, "C_BREAK", U.CONTROL, L.NONE, cycles=C.ONE,
           summary="pop the innermost loop, zero its counter, fall through"),
    OpSpec(0x35, "V_MAX_VF", U.VECTOR, L.RMASK, G, G, F, X, cycles=C.VECTOR_MAX,
           summary="VRAM[gp[rd]] = clamp_min(a, fp[rs2])"),
    OpSpec(0x36, "V_MIN_VF", U.VECTOR, L.RMASK, G, G, F, X, cycles=C.VECTOR_MAX,
           summary="VRAM[gp[rd]] = clamp_max(a, fp[rs2])"),
    OpSpec(0x37, "V_TOPK", U.VECTOR, L.RMASK, G, G, G, X, cycles=C.VECTOR_TOPK,
           summary="router top-k: INT_SRAM[gp[rs2]+k] = index_k, FP_SRAM[gp[rd]+k] = softmax weight_k"),
)

del G, F, A, X, N, L, C, U

OPCODES: Mapping[int, OpSpec] = {op.code: op for op in _TABLE}
BY_MNEMONIC: Mapping[str, OpSpec] = {op.mnemonic: op for op in _TABLE}

INVALID_MNEMONIC = "INVALID"


def spec_of(code: int) -> OpSpec | None:
    """The table entry of a 6-bit opcode, or None if the number is unassigned."""
    return OPCODES.get(code)


def is_executable(code: int) -> bool:
    op = OPCODES.get(code)
    return op is not None and op.executable


def mnemonic_of(code: int) -> str:
    op = OPCODES.get(code)
    return op.mnemonic if op is not None else f"{INVALID_MNEMONIC}(0x{code:02X})"
