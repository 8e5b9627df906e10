"""Every panic of the reference emulator (spec §4.7) raises a PlenaError in the JAX emulator,
with the right subclass, the faulting pc and a rule text naming the condition; and the
matching boundary cases (one step inside the limit) do not raise.

Runs on the default machine (one XLA compile) plus the ``SMALL`` machine for the conditions
that need a small VRAM, a small loop budget, a 2-tile M prefetch or BROADCAST_AMOUNT*HLEN !=
MLEN (one more compile, shared with tests/test_emu_ops.py when both run in one process).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from plena.config import default_config
from plena.emu_jax.api import run
from plena.emu_jax.errors import DecodeError, ExecutionError, LoadError, PlenaError
from plena.isa import encode_fields

CFG = default_config()
SMALL = CFG.replace(vector_sram_size=2048, max_loop_instructions=40, dc_en=0, broadcast_amount=2,
                    hbm_m_prefetch_amount_raw=128)
MLEN = VLEN = 64
TILE = MLEN * MLEN
DEPTH = 4194304  # VECTOR_SRAM_SIZE (rows) of the default machine
SMALL_DEPTH = 2048


from asm_helpers import li, prog  # noqa: E402


# Words the assembler cannot express, opcode numbers from spec §3.2.
def word(opcode, **fields) -> int:
    return encode_fields(opcode, **fields)


# Tokens (case-insensitive) a rule text must contain to name each §4.7 condition; a tuple of
# alternatives where the spec allows either check to fire first.
RULES = {
    "decode": ("rd", "0"),
    "invalid": ("invalid", "opcode"),
    "fp_reg": ("fp register",),
    "fp_sram": ("FP SRAM",),
    "int_sram": ("INT SRAM",),
    "vram_align": ("VRAM", "VLEN"),
    "vram_range": ("VRAM", "VECTOR_SRAM_SIZE"),
    "mram_align": ("MRAM", "MLEN"),
    "mram_range": ("MRAM", "tile"),
    "mm_offset": ("offset", "MLEN"),
    "block_blen": ("block", "BLEN"),
    "mv_offset": ("M_MV", "offset"),
    "wo_column": ("column", "BLEN"),
    "bwo_align": ("write-out", "MLEN"),
    "head": ("head", "HLEN"),
    "batch_block": ("batched", "block"),
    "bmv": ("M_BMV",),
    "batch_cfg": ("BROADCAST_AMOUNT", "HLEN", "MLEN"),
    "topk": ("V_TOPK", "policy"),
    "loop_zero": ("C_LOOP_START",),
    "loop_end": ("C_LOOP_END",),
    "break": ("C_BREAK",),
    "budget": ("MAX_LOOP_INSTRUCTIONS",),
    "hbm_write": ("HBM", "write", "capacity"),
}


def rule_names(rule: str, kinds) -> bool:
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    low = rule.lower()
    return any(all(tok.lower() in low for tok in RULES[k]) for k in kinds)


@dataclasses.dataclass
class Case:
    id: str
    program: list
    kind: str | tuple
    pc: int | None = None  # default: the last instruction
    cfg: object = None
    kw: dict = dataclasses.field(default_factory=dict)
    exc: type = ExecutionError


def check_raises(case: Case):
    words = prog(*case.program)
    pc = len(words) - 1 if case.pc is None else case.pc
    with pytest.raises(case.exc) as info:
        run(words, case.cfg, **case.kw)
    err = info.value
    assert isinstance(err, PlenaError)
    assert err.pc == pc, (err.pc, pc, str(err))
    assert rule_names(err.rule, case.kind), err.rule
    assert err.instr  # the faulting instruction is named
    return err


def check_runs(program, cfg=None, **kw):
    return run(prog(*program), cfg, **kw)


V64 = li(1, VLEN)  # gp1 = a valid VRAM row address
MRAM2 = li(2, 2 * TILE)  # gp2 = tile 2


# =============================================================================================
# decode time (spec §3.2): M_BMM / M_BTMM with rd != 0 fail at load, even if never reached
# =============================================================================================
@pytest.mark.parametrize("opcode,name", [(0x03, "M_BMM"), (0x04, "M_BTMM")])
@pytest.mark.parametrize("max_steps", [None, 0])
def test_batched_rd_nonzero_is_a_decode_error(opcode, name, max_steps):
    # pc 0 would panic when executed (C_BREAK outside a loop): the decode error comes first
    words = prog("C_BREAK", V64, word(opcode, rd=3, rs1=2, rs2=1), "S_ADDI_INT gp5, gp0, 1")
    with pytest.raises(DecodeError) as info:
        run(words, max_steps=max_steps)
    assert info.value.pc == 2 and rule_names(info.value.rule, "decode") and name in info.value.rule


def test_m_btmv_rd_nonzero_is_not_a_decode_error():
    res = check_runs([MRAM2, li(3, 16), "M_BTMV gp3, gp2, gp0"])
    assert res.instructions == 3


# =============================================================================================
# invalid opcodes: a panic when executed, nothing at load time
# =============================================================================================
INVALID = [0x00, 0x31, 0x33] + list(range(0x38, 0x40))


@pytest.mark.parametrize("opcode", INVALID, ids=[f"0x{c:02X}" for c in INVALID])
def test_invalid_opcode_raises_when_executed(opcode):
    check_raises(Case("invalid", [V64, word(opcode, rd=1, rs1=1, rs2=1)], "invalid"))


def test_invalid_opcode_is_not_a_load_error():
    res = run(prog(V64, word(0x33), word(0x3F)), max_steps=1)
    assert int(res.state.gp[1]) == VLEN


# =============================================================================================
# one table of runtime conditions on the default machine
# =============================================================================================
def _fp_reg_cases():
    out = []
    for i, instr in enumerate(["S_ADD_FP f8, f1, f2", "S_ADD_FP f1, f9, f2", "S_MUL_FP f1, f2, f15",
                               "S_SUB_FP f3, f2, f8", "S_MAX_FP f8, f1, f1", "S_EXP_FP f3, f12",
                               "S_RECI_FP f9, f1", "S_SQRT_FP f1, f10", "S_LD_FP f8, gp0, 0",
                               "S_ST_FP f10, gp0, 0", "V_ADD_VF gp1, gp0, f8, 0", "V_MUL_VF gp1, gp0, f9, 1",
                               "V_SUB_VF gp1, gp0, f14, 0, 1", "V_MAX_VF gp1, gp0, f8, 0",
                               "V_MIN_VF gp1, gp0, f11, 0", "V_RED_SUM f9, gp0", "V_RED_MAX f11, gp0, 0"]):
        out.append(Case(f"fp_reg_{i}_{instr.split()[0]}", [V64, instr], "fp_reg"))
    return out


BIG = DEPTH * VLEN  # first element address past the default VRAM (2^28)
CASES = _fp_reg_cases() + [
    # ---- scalar SRAM indices >= 1024
    Case("s_ld_fp_1024", [li(3, 1023), "S_LD_FP f1, gp3, 1"], "fp_sram"),
    Case("s_st_fp_imm", ["S_ST_FP f1, gp0, 1024"], "fp_sram"),
    Case("s_ld_int_1024", [li(3, 1024), "S_LD_INT gp4, gp3, 0"], "int_sram"),
    Case("s_st_int_big", ["S_ST_INT gp4, gp0, 5000"], "int_sram"),
    Case("topk_fp_base", [li(3, 1021), "V_TOPK gp3, gp0, gp0, 0"], "fp_sram"),
    Case("topk_int_base", [li(3, 1021), "V_TOPK gp0, gp0, gp3, 0"], "int_sram"),
    Case("topk_fp_base_policy1", [li(3, 1017), "V_TOPK gp3, gp0, gp0, 1"], "fp_sram"),
    Case("s_map_v_fp_window", [V64, li(3, 961), "S_MAP_V_FP gp1, gp3, 0"], "fp_sram"),
    Case("s_map_v_fp_window_imm", [V64, "S_MAP_V_FP gp1, gp0, 1000"], "fp_sram"),
    # ---- VRAM alignment
    Case("v_add_vv_rs1", [V64, li(3, 32), "V_ADD_VV gp1, gp3, gp1, 0"], "vram_align"),
    Case("v_add_vv_rs2", [V64, li(3, 96), "V_ADD_VV gp1, gp1, gp3, 0"], "vram_align"),
    Case("v_add_vv_rd", [li(3, 1), "V_ADD_VV gp3, gp0, gp0, 0"], "vram_align"),
    Case("v_exp_v_rs1", [li(3, 8), "V_EXP_V gp0, gp3, 0"], "vram_align"),
    Case("v_red_sum_rs1", [li(3, 63), "V_RED_SUM f1, gp3"], "vram_align"),
    Case("v_shft_v_rd", [li(3, 65), "V_SHFT_V gp3, gp0, gp0"], "vram_align"),
    Case("s_map_v_fp_rd", [li(3, 2), "S_MAP_V_FP gp3, gp0, 0"], "vram_align"),
    Case("m_mm_vector", [MRAM2, li(3, 8), "M_MM 0, gp2, gp3"], "vram_align"),
    Case("m_tmm_vector", [MRAM2, li(3, 8), "M_TMM 0, gp3, gp2"], "vram_align"),
    Case("m_mv_vector", [MRAM2, li(3, 16), "M_MV 0, gp2, gp3"], "vram_align"),
    Case("m_btmm_vector", [MRAM2, li(3, 4), "M_BTMM 0, gp2, gp3"], "vram_align"),
    Case("m_btmv_vector", [MRAM2, li(3, 4), "M_BTMV gp0, gp2, gp3"], "vram_align"),
    Case("h_prefetch_v_rd", [li(3, 16), "H_PREFETCH_V gp3, gp0, a0, 0, 0"], "vram_align"),
    Case("h_store_v_rd", [li(3, 16), "H_STORE_V gp3, gp0, a0, 0, 0"], "vram_align"),
    Case("v_topk_rs1", [li(3, 100), "V_TOPK gp0, gp3, gp0, 0"], "vram_align"),
    # ---- VRAM rows beyond VECTOR_SRAM_SIZE (reads; the default VRAM is 4 Mi rows)
    Case("v_add_vv_read_past_depth", [li(3, BIG), "V_ADD_VV gp0, gp3, gp0, 0"], "vram_range"),
    Case("v_red_max_read_past_depth", [li(3, BIG), "V_RED_MAX f1, gp3, 0"], "vram_range"),
    Case("m_mm_rows_past_depth", [MRAM2, li(3, (DEPTH - 2) * VLEN), "M_MM 0, gp2, gp3"], "vram_range"),
    Case("m_btmm_rows_past_depth", [MRAM2, li(3, (DEPTH - 10) * VLEN), "M_BTMM 0, gp2, gp3"], "vram_range"),
    Case("h_store_v_rows_past_depth", [li(3, (DEPTH - 2) * VLEN), "H_STORE_V gp3, gp0, a0, 0, 0"],
         "vram_range"),
    Case("v_topk_policy1_second_row", [li(3, (DEPTH - 1) * VLEN), "V_TOPK gp0, gp3, gp0, 1"], "vram_range"),
    # ---- MRAM alignment / tile range (64 tiles)
    Case("h_prefetch_m_misaligned", [li(3, 64), "H_PREFETCH_M gp3, gp0, a0, 0, 0"], "mram_align"),
    Case("h_prefetch_m_tile_64", [li(3, 64 * TILE), "H_PREFETCH_M gp3, gp0, a0, 0, 0"], "mram_range"),
    Case("m_mm_tile_64", [li(3, 64 * TILE), "M_MM 0, gp3, gp0"], "mram_range"),
    Case("m_tmm_tile_64", [li(3, 64 * TILE), "M_TMM 0, gp0, gp3"], "mram_range"),
    Case("m_mv_tile_64", [li(3, 64 * TILE), "M_MV 0, gp3, gp0"], "mram_range"),
    Case("m_tmv_tile_64", [li(3, 64 * TILE), "M_TMV 0, gp3, gp0"], "mram_range"),
    Case("m_btmm_tile_64", [li(3, 64 * TILE + 16), "M_BTMM 0, gp3, gp0"], "mram_range"),
    Case("m_bmm_tile_64", [li(3, 64 * TILE), "M_BMM 0, gp3, gp0"], "mram_range"),
    Case("m_btmv_tile_64", [li(3, 63 * TILE), li(4, TILE), "M_BTMV gp4, gp3, gp0"], "mram_range"),
    # ---- M_MM / M_TMM matrix offset (row-granular)
    Case("m_mm_offset_32", [li(3, 2 * TILE + 32), "M_MM 0, gp3, gp0"], "mm_offset"),
    Case("m_mm_colblock_1", [li(3, 2 * TILE + 64), "M_MM 0, gp3, gp0"], "block_blen"),
    Case("m_mm_colblock_2", [li(3, 2 * TILE + 2 * 64), "M_MM 0, gp3, gp0"], "block_blen"),
    Case("m_mm_old_abi_plus_blen", [li(3, 2 * TILE + 4), "M_MM 0, gp3, gp0"], "mm_offset"),
    Case("m_tmm_offset_8", [li(3, 2 * TILE + 8), "M_TMM 0, gp0, gp3"], "mm_offset"),
    Case("m_tmm_colblock_5", [li(3, 2 * TILE + 5 * 64), "M_TMM 0, gp0, gp3"], "block_blen"),
    # ---- M_MV (element-granular) / M_TMV (must be 0)
    Case("m_mv_offset_2", [li(3, 2 * TILE + 2), "M_MV 0, gp3, gp0"], "mv_offset"),
    Case("m_mv_offset_mlen", [li(3, 2 * TILE + 64), "M_MV 0, gp3, gp0"], "mv_offset"),
    Case("m_mv_offset_256", [li(3, 2 * TILE + 256), "M_MV 0, gp3, gp0"], "mv_offset"),
    Case("m_tmv_offset_4", [li(3, 2 * TILE + 4), "M_TMV 0, gp3, gp0"], ("mram_align", "mv_offset")),
    Case("m_tmv_offset_row", [li(3, 2 * TILE + 4 * 64), "M_TMV 0, gp3, gp0"], ("mram_align", "mv_offset")),
    Case("m_tmv_offset_2", [li(3, 2 * TILE + 2), "M_TMV 0, gp3, gp0"], ("mram_align", "mv_offset")),
    # ---- write-out columns / alignment
    Case("m_mm_wo_col_2", [li(3, 200 * VLEN + 2), "M_MM_WO gp3, gp0, 0"], "wo_column"),
    Case("m_mm_wo_imm_6", [li(3, 200 * VLEN), "M_MM_WO gp3, gp0, 6"], "wo_column"),
    Case("m_mm_wo_col_62", [li(3, 200 * VLEN + 62), "M_MM_WO gp3, gp0, 0"], "wo_column"),
    Case("m_mv_wo_col_1", [li(3, 200 * VLEN + 1), "M_MV_WO gp3, 0"], "wo_column"),
    Case("m_mv_wo_imm18_3", [li(3, 200 * VLEN), word(0x0B, rd=3, imm18=3)], "wo_column"),
    Case("m_mv_wo_asm_imm_32", [li(3, 200 * VLEN), "M_MV_WO gp3, 32"], "wo_column"),  # emulator imm 2
    Case("m_bmm_wo_4", [li(3, 200 * VLEN + 4), "M_BMM_WO gp3, 0"], "bwo_align"),
    Case("m_bmm_wo_asm_imm_64", [li(3, 200 * VLEN), "M_BMM_WO gp3, 64"], "bwo_align"),  # emulator imm 4
    Case("m_bmv_wo_32", [li(3, 200 * VLEN + 32), "M_BMV_WO gp3, 0"], "bwo_align"),
    Case("m_bmv_wo_imm18_16", [li(3, 200 * VLEN), word(0x0C, rd=3, imm18=16)], "bwo_align"),
    # ---- batched heads
    Case("m_bmm_head_8", [li(3, 2 * TILE + 8), "M_BMM 0, gp3, gp0"], "head"),
    Case("m_btmm_head_24", [li(3, 2 * TILE + 24), "M_BTMM 0, gp3, gp0"], "head"),
    Case("m_btmv_head_rd_4", [MRAM2, li(3, 4), "M_BTMV gp3, gp2, gp0"], "head"),
    Case("m_bmm_colblock", [li(3, 2 * TILE + 64), "M_BMM 0, gp3, gp0"], "batch_block"),
    Case("m_bmm_colblock_head", [li(3, 2 * TILE + 128 + 16), "M_BMM 0, gp3, gp0"], "batch_block"),
    Case("m_bmm_unaligned_tile", [li(3, 2 * TILE + 256), "M_BMM 0, gp3, gp0"], ("mram_align", "batch_block")),
    Case("m_btmm_rowblock", [li(3, 2 * TILE + 256), "M_BTMM 0, gp3, gp0"], "batch_block"),
    Case("m_btmm_rowblock_64", [li(3, 2 * TILE + 64 + 32), "M_BTMM 0, gp3, gp0"], "batch_block"),
    Case("m_btmv_rowblock_rd", [MRAM2, li(3, 4 * 64), "M_BTMV gp3, gp2, gp0"], "batch_block"),
    Case("m_bmv_valid_operands", [MRAM2, "M_BMV gp0, gp2, gp0"], "bmv"),
    Case("m_bmv_head_1", [MRAM2, li(3, 16), V64, "M_BMV gp3, gp2, gp1"], "bmv"),
    # ---- V_TOPK policy
    Case("v_topk_policy_2", ["V_TOPK gp0, gp0, gp0, 2"], "topk"),
    Case("v_topk_policy_15", ["V_TOPK gp0, gp0, gp0, 15"], "topk"),
    # ---- loops
    Case("loop_start_0", [V64, "C_LOOP_START gp2, 0"], "loop_zero"),
    Case("loop_end_alone", [V64, "C_LOOP_END gp1"], "loop_end"),
    Case("loop_end_other_reg", ["C_LOOP_START gp1, 2", "S_ADDI_INT gp3, gp3, 1", "C_LOOP_END gp2"], "loop_end"),
    Case("loop_end_after_exit", ["C_LOOP_START gp1, 2", "S_ADDI_INT gp3, gp3, 1", "C_LOOP_END gp1",
                                 "C_LOOP_END gp1"], "loop_end"),
    Case("loop_end_after_break", ["C_LOOP_START gp1, 3", "C_LOOP_START gp5, 4", "C_BREAK", "C_LOOP_END gp5"],
         "loop_end"),
    # the outer entry (below the top) is removed first; the inner loop's jump back then re-runs it
    Case("loop_end_removed_below_top", ["C_LOOP_START gp1, 1", "C_LOOP_START gp5, 2", "C_LOOP_END gp1",
                                        "S_ADDI_INT gp2, gp2, 1", "C_LOOP_END gp5"], "loop_end", pc=2),
    Case("break_outside", ["C_BREAK"], "break"),
    Case("break_after_loop", ["C_LOOP_START gp1, 2", "C_LOOP_END gp1", "C_BREAK"], "break"),
    Case("break_twice", ["C_LOOP_START gp1, 2", "C_BREAK", "C_BREAK"], "break"),
    # ---- HBM writes past the capacity (--hbm-size 4096); the error is raised mid-instruction
    Case("h_store_v_row_2_past_capacity", [li(3, 4096 - 128), "H_STORE_V gp0, gp3, a0, 0, 0"], "hbm_write",
         kw={"hbm_size": 4096}),
    Case("h_store_v_scale_past_capacity", [li(3, 4096 - 8), "C_SET_SCALE_REG gp3",
                                           "H_STORE_V gp0, gp0, a0, 0, 0"], "hbm_write", kw={"hbm_size": 4096}),
    Case("h_store_v_stride_past_capacity", [li(3, 1500), "C_SET_STRIDE_REG gp3", "H_STORE_V gp0, gp0, a0, 1, 0"],
         "hbm_write", kw={"hbm_size": 4096}),
    Case("h_store_v_a_reg_past_capacity", [li(3, 4096), "C_SET_ADDR_REG a2, gp0, gp3",
                                           "H_STORE_V gp0, gp0, a2, 0, 0"], "hbm_write", kw={"hbm_size": 4096}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_runtime_condition_raises(case):
    check_raises(case)


# boundary cases: the same instructions one step inside the limit run without an error
BOUNDARY = [
    [li(3, 1022), "S_LD_FP f1, gp3, 1", "S_ST_FP f1, gp0, 1023", "S_LD_INT gp4, gp3, 1", "S_ST_INT gp4, gp0, 1023"],
    [li(3, 0xFFFFFFFF), "S_LD_INT gp4, gp3, 1", "S_LD_FP f1, gp3, 1"],  # gp + imm wraps to 0
    [li(3, 1020), li(4, 1016), "V_TOPK gp3, gp0, gp3, 0", "V_TOPK gp4, gp0, gp4, 1"],
    [V64, li(3, 960), "S_MAP_V_FP gp1, gp3, 0", "S_MAP_V_FP gp1, gp0, 960"],
    [li(3, 63 * TILE), "H_PREFETCH_M gp3, gp0, a0, 0, 0", "M_MM 0, gp3, gp0", "M_TMV 0, gp3, gp0"],
    [li(3, 2 * TILE + 60 * 64), "M_MM 0, gp3, gp0", "M_TMM 0, gp0, gp3", li(4, 2 * TILE + 60), "M_MV 0, gp4, gp0"],
    [li(3, 200 * VLEN + 60), "M_MM_WO gp3, gp0, 0", "M_MV_WO gp3, 0", li(4, 200 * VLEN), "M_BMV_WO gp4, 0"],
    [li(3, 2 * TILE + 48), "M_BMM 0, gp3, gp0", "M_BTMM 0, gp3, gp0", li(4, 2 * TILE), li(5, 48),
     "M_BTMV gp5, gp4, gp0", li(6, 300 * VLEN), "M_BMM_WO gp6, 0"],
    [li(3, (DEPTH - 4) * VLEN), "M_MM 0, gp0, gp3", "H_STORE_V gp3, gp0, a0, 0, 0", li(4, (DEPTH - 2) * VLEN),
     "V_TOPK gp0, gp4, gp0, 1"],
    ["C_LOOP_START gp1, 1", "C_LOOP_END gp1", "C_LOOP_START gp1, 2", "C_BREAK"],
    ["S_ADD_FP f0, f9, f9", "S_EXP_FP f0, f12", "V_RED_SUM f0, gp0"],  # rd = 0: skipped, operands never read
]


@pytest.mark.parametrize("i", range(len(BOUNDARY)))
def test_boundary_cases_do_not_raise(i):
    check_runs(BOUNDARY[i])


def test_hbm_store_that_ends_exactly_at_the_capacity_is_fine():
    # elements 3840..4095; scales at SCALE + 3840/8 = 4064..4095
    res = check_runs([li(3, 4096 - 256), li(4, 4096 - 32 - 480), "C_SET_SCALE_REG gp4", "H_STORE_V gp0, gp3, a0, 0, 0"],
                     hbm_size=4096)
    assert res.hbm_bytes_written > 0


# =============================================================================================
# the SMALL machine: VRAM depth 2048, loop budget 40, 2-tile M prefetch, BA * HLEN != MLEN
# =============================================================================================
SB = SMALL_DEPTH * VLEN
SMALL_CASES = [
    Case("v_add_vv_write_past_depth", [li(3, SB), "V_ADD_VV gp3, gp0, gp0, 0"], "vram_range", cfg=SMALL),
    Case("s_map_v_fp_write_past_depth", [li(3, SB), "S_MAP_V_FP gp3, gp0, 0"], "vram_range", cfg=SMALL),
    Case("v_shft_v_write_past_depth", [li(3, SB + 5 * VLEN), "V_SHFT_V gp3, gp0, gp0"], "vram_range", cfg=SMALL),
    Case("m_mv_wo_past_depth", [li(3, SB + 8), "M_MV_WO gp3, 0"], "vram_range", cfg=SMALL),
    # rows 2040, 2044, 2048 (!) with stride 4: the write-out fails on its third row
    Case("m_mm_wo_stride_past_depth", [li(3, 2040 * VLEN), li(4, 4), "M_MM_WO gp3, gp4, 0"], "vram_range",
         cfg=SMALL),
    Case("h_prefetch_v_base_past_depth", [li(3, SB), "H_PREFETCH_V gp3, gp0, a0, 0, 0"], "vram_range", cfg=SMALL),
    Case("h_prefetch_m_second_tile_past_end", [li(3, 63 * TILE), "H_PREFETCH_M gp3, gp0, a0, 0, 0"],
         "mram_range", cfg=SMALL),
    Case("m_bmm_batch_config", [MRAM2, "M_BMM 0, gp2, gp0"], "batch_cfg", cfg=SMALL),
    Case("m_btmm_batch_config", [MRAM2, "M_BTMM 0, gp2, gp0"], "batch_cfg", cfg=SMALL),
    Case("m_btmv_batch_config", [MRAM2, "M_BTMV gp0, gp2, gp0"], "batch_cfg", cfg=SMALL),
    # loop budget 40: 40 body instructions + C_LOOP_END = 41 > 40, raised at the C_LOOP_END
    Case("budget_single", ["C_LOOP_START gp1, 2", *["S_ADDI_INT gp10, gp10, 1"] * 40, "C_LOOP_END gp1"],
         "budget", pc=41, cfg=SMALL),
    # outer iteration: inner START (1) + 13 * 3 = 40; the 14th inner iteration's first instruction is the 41st
    Case("budget_nested_inner_work_counts", ["C_LOOP_START gp1, 2", "C_LOOP_START gp2, 14",
                                             "S_ADDI_INT gp10, gp10, 1", "S_ADDI_INT gp11, gp11, 1",
                                             "C_LOOP_END gp2", "C_LOOP_END gp1"], "budget", pc=2, cfg=SMALL),
    Case("budget_nested_at_outer_end", ["C_LOOP_START gp1, 2", "C_LOOP_START gp2, 13",
                                        "S_ADDI_INT gp10, gp10, 1", "S_ADDI_INT gp11, gp11, 1",
                                        "C_LOOP_END gp2", "C_LOOP_END gp1"], "budget", pc=5, cfg=SMALL),
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=[c.id for c in SMALL_CASES])
def test_runtime_condition_raises_on_small_machine(case):
    check_raises(case)


def test_small_machine_boundaries_do_not_raise():
    check_runs([li(3, SB - VLEN), "V_ADD_VV gp3, gp0, gp0, 0", li(4, 2044 * VLEN), li(5, 1),
                "M_MM_WO gp4, gp5, 0", li(6, 62 * TILE), "H_PREFETCH_M gp6, gp0, a0, 0, 0",
                "H_PREFETCH_V gp3, gp0, a0, 0, 0"], SMALL)
    res = check_runs(["C_LOOP_START gp1, 2", "C_LOOP_START gp2, 12", "S_ADDI_INT gp10, gp10, 1",
                      "S_ADDI_INT gp11, gp11, 1", "C_LOOP_END gp2", "C_LOOP_END gp1"], SMALL)
    assert int(res.state.gp[10]) == 24


# =============================================================================================
# load-time conditions (preloads, HBM size)
# =============================================================================================
@pytest.mark.parametrize("kw,tokens", [
    ({"hbm": np.zeros(4160, np.uint8), "hbm_size": 4096}, ("HBM", "preload")),
    ({"hbm": np.zeros(64, np.uint8), "hbm_size": 4100}, ("64",)),
    ({"fpsram": np.zeros(1025, np.uint16)}, ("FP SRAM", "1024")),
    ({"intsram": np.zeros(1025, np.uint32)}, ("INT SRAM", "1024")),
])
def test_load_errors(kw, tokens):
    with pytest.raises(LoadError) as info:
        run(prog("S_ADDI_INT gp1, gp0, 1"), **kw)
    assert info.value.pc is None
    assert all(t.lower() in info.value.rule.lower() for t in tokens), info.value.rule


def test_largest_allowed_preloads():
    res = run(prog("S_LD_INT gp1, gp0, 1023\nS_LD_FP f1, gp0, 1023"), hbm=np.ones(4096, np.uint8), hbm_size=4096,
              fpsram=np.full(1024, 0x3F80, np.uint16), intsram=np.arange(1024, dtype=np.uint32))
    assert int(res.state.gp[1]) == 1023 and int(res.state.fp[1]) == 0x3F80


# =============================================================================================
# an error always raises: never a silently truncated or corrupted run
# =============================================================================================
def test_error_in_a_later_loop_iteration_raises_with_its_pc():
    text = ["C_LOOP_START gp1, 6", "S_LD_INT gp4, gp2, 0", li(3, 300), "S_ADD_INT gp2, gp2, gp3", "C_LOOP_END gp1"]
    check_raises(Case("late", text, "int_sram", pc=1))  # the 5th iteration reads entry 1200


@pytest.mark.parametrize("max_steps", [3, 4, 100])
def test_max_steps_does_not_hide_an_error_it_reaches(max_steps):
    words = prog(V64, V64, V64, "C_BREAK", V64)
    with pytest.raises(ExecutionError) as info:
        run(words, max_steps=max_steps + 1)
    assert info.value.pc == 3
    assert run(words, max_steps=3).instructions == 3  # stopping before it does not raise


def test_a_failed_run_leaves_no_trace_in_the_next_one():
    bad = prog(li(3, 4096 - 128), "H_STORE_V gp0, gp3, a0, 0, 0")
    good = prog(li(2, 7), "S_ST_INT gp2, gp0, 5", li(3, 3968), "S_ADDI_INT gp4, gp0, 1")
    ref = run(good, hbm_size=4096)
    for _ in range(2):
        with pytest.raises(ExecutionError):
            run(bad, hbm_size=4096, vram=np.full(4 * VLEN, 0x3F80, np.uint16))
        again = run(good, hbm_size=4096)
        for name in ("gp", "fp", "intsram", "fpsram", "vram", "hbm", "mram"):
            np.testing.assert_array_equal(np.asarray(getattr(again.state, name)), np.asarray(getattr(ref.state, name)))
        assert not np.asarray(again.state.hbm).any()
