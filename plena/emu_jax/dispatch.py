"""Executor dispatch, driven by the opcode table.

Maps every executable opcode of :data:`plena.isa.opcodes.OPCODES` to its pure instruction
function, and derives the per-opcode tables the step function indexes (branch number,
micro-steps, fp-destination protection). A missing implementation is an import-time error.
"""

from __future__ import annotations

import numpy as np

from plena.emu_jax import ops_hbm, ops_matrix, ops_scalar, ops_vector
from plena.isa.opcodes import OPCODES

IMPLEMENTATIONS = {
    "M_MM": ops_matrix.m_mm, "M_TMM": ops_matrix.m_tmm, "M_BMM": ops_matrix.m_bmm,
    "M_BTMM": ops_matrix.m_btmm, "M_BMM_WO": ops_matrix.m_bmm_wo, "M_MM_WO": ops_matrix.m_mm_wo,
    "M_MV": ops_matrix.m_mv, "M_TMV": ops_matrix.m_tmv, "M_BMV": ops_matrix.m_bmv,
    "M_BTMV": ops_matrix.m_btmv, "M_MV_WO": ops_matrix.m_mv_wo, "M_BMV_WO": ops_matrix.m_bmv_wo,
    "V_ADD_VV": ops_vector.v_add_vv, "V_ADD_VF": ops_vector.v_add_vf, "V_SUB_VV": ops_vector.v_sub_vv,
    "V_SUB_VF": ops_vector.v_sub_vf, "V_MUL_VV": ops_vector.v_mul_vv, "V_MUL_VF": ops_vector.v_mul_vf,
    "V_EXP_V": ops_vector.v_exp_v, "V_RECI_V": ops_vector.v_reci_v, "V_RED_SUM": ops_vector.v_red_sum,
    "V_RED_MAX": ops_vector.v_red_max, "V_SHFT_V": ops_vector.v_shft_v, "V_MAX_VF": ops_vector.v_max_vf,
    "V_MIN_VF": ops_vector.v_min_vf, "V_TOPK": ops_vector.v_topk,
    "S_ADD_FP": ops_scalar.s_add_fp, "S_SUB_FP": ops_scalar.s_sub_fp, "S_MAX_FP": ops_scalar.s_max_fp,
    "S_MUL_FP": ops_scalar.s_mul_fp, "S_EXP_FP": ops_scalar.s_exp_fp, "S_RECI_FP": ops_scalar.s_reci_fp,
    "S_SQRT_FP": ops_scalar.s_sqrt_fp, "S_LD_FP": ops_scalar.s_ld_fp, "S_ST_FP": ops_scalar.s_st_fp,
    "S_MAP_V_FP": ops_scalar.s_map_v_fp,
    "S_ADD_INT": ops_scalar.s_add_int, "S_ADDI_INT": ops_scalar.s_addi_int, "S_SUB_INT": ops_scalar.s_sub_int,
    "S_MUL_INT": ops_scalar.s_mul_int, "S_LUI_INT": ops_scalar.s_lui_int, "S_LD_INT": ops_scalar.s_ld_int,
    "S_ST_INT": ops_scalar.s_st_int,
    "H_PREFETCH_M": ops_hbm.h_prefetch_m, "H_PREFETCH_V": ops_hbm.h_prefetch_v, "H_STORE_V": ops_hbm.h_store_v,
    "C_SET_ADDR_REG": ops_scalar.c_set_addr_reg, "C_SET_SCALE_REG": ops_scalar.c_set_scale_reg,
    "C_SET_STRIDE_REG": ops_scalar.c_set_stride_reg, "C_SET_V_MASK_REG": ops_scalar.c_set_v_mask_reg,
    "C_LOOP_START": ops_scalar.c_loop_start, "C_LOOP_END": ops_scalar.c_loop_end, "C_BREAK": ops_scalar.c_break,
}

_missing = [op.mnemonic for op in OPCODES.values() if op.executable and op.mnemonic not in IMPLEMENTATIONS]
if _missing:  # the table and the executor must agree
    raise ImportError(f"no implementation for executable opcodes {_missing}")

INVALID, SKIP = 0, 1
BRANCHES = [ops_scalar.invalid, ops_scalar.skip] + [IMPLEMENTATIONS[OPCODES[c].mnemonic]
                                                    for c in sorted(OPCODES) if OPCODES[c].executable]
BRANCH_OF = np.full(64, INVALID, np.int32)
for _i, _code in enumerate(c for c in sorted(OPCODES) if OPCODES[c].executable):
    BRANCH_OF[_code] = _i + 2
#: branches of the opcodes that read or write the batched-head accumulators (hm_acc, hv_acc)
HEAD_ACC_BRANCHES = frozenset(int(BRANCH_OF[c]) for c in OPCODES
                              if OPCODES[c].mnemonic in ("M_BMM", "M_BTMM", "M_BMM_WO", "M_BMV", "M_BTMV", "M_BMV_WO"))
FP_DEST = np.array([bool(OPCODES.get(c) and OPCODES[c].fp_dest) for c in range(64)])


def micro_steps(cfg) -> np.ndarray:
    """Rows moved per instruction: each micro-step writes at most one row of each memory."""
    n = np.ones(64, np.int32)
    by = {op.mnemonic: op.code for op in OPCODES.values()}
    n[by["H_PREFETCH_M"]] = cfg.hbm_m_prefetch_amount
    n[by["H_PREFETCH_V"]] = cfg.hbm_v_prefetch_amount
    n[by["H_STORE_V"]] = cfg.hbm_v_writeback_amount
    n[by["M_MM_WO"]] = cfg.blen
    n[by["M_BMM_WO"]] = cfg.broadcast_amount * cfg.mlen
    n[by["M_BMV_WO"]] = cfg.broadcast_amount
    return n


def branches_for(opcodes) -> tuple:
    """:data:`BRANCHES` with every opcode outside ``opcodes`` replaced by the invalid-opcode
    branch: the interpreter of a program (or of the part of one) that contains only those
    opcodes. Control flow never reaches an opcode the code does not hold, so it runs exactly
    as the full interpreter, and XLA compiles far fewer distinct branches."""
    keep = {int(BRANCH_OF[c]) for c in opcodes if 0 <= int(c) < 64} | {INVALID, SKIP}
    return tuple(fn if i in keep else BRANCHES[INVALID] for i, fn in enumerate(BRANCHES))
