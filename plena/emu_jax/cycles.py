"""Non-HBM cycle model (spec §6): instructions never overlap, so the total is the sum of
per-instruction latencies. HBM transfers take Ramulator time, which is not modelled here
(the run reports HBM bytes instead); they count 0 here."""

from __future__ import annotations

import numpy as np

from plena.config import PlenaConfig
from plena.isa.opcodes import OPCODES, Cycles


def cycles_of(kind: Cycles, cfg: PlenaConfig) -> int:
    lat = cfg.lat
    return {
        Cycles.SYSTOLIC_MLEN: lat("SYSTOLIC_PROCESSING_OVERHEAD") + cfg.mlen,
        Cycles.SYSTOLIC_ONE: lat("SYSTOLIC_PROCESSING_OVERHEAD") + 1,
        Cycles.MLEN: cfg.mlen,
        Cycles.ONE: 1,
        Cycles.VECTOR_ADD: lat("VECTOR_ADD"),
        Cycles.VECTOR_MUL: lat("VECTOR_MUL"),
        Cycles.VECTOR_EXP: lat("VECTOR_EXP"),
        Cycles.VECTOR_RECI: lat("VECTOR_RECI"),
        Cycles.VECTOR_MAX: lat("VECTOR_MAX"),
        Cycles.VECTOR_SUM: lat("VECTOR_SUM"),
        Cycles.VECTOR_TOPK: 0,  # VECTOR_MAX x experts, added from the experts count
        Cycles.SCALAR_FP_BASIC: lat("SCALAR_FP_BASIC"),
        Cycles.SCALAR_FP_EXP: lat("SCALAR_FP_EXP"),
        Cycles.SCALAR_FP_RECI: lat("SCALAR_FP_RECI"),
        Cycles.SCALAR_FP_SQRT: lat("SCALAR_FP_SQRT"),
        Cycles.SCALAR_INT: lat("SCALAR_INT_BASIC"),
        Cycles.TWO_VLEN: 2 * cfg.vlen,
        Cycles.HBM: 0,
        Cycles.NONE: 0,
    }[kind]


def per_opcode_cycles(cfg: PlenaConfig) -> np.ndarray:
    out = np.zeros(64, np.int64)
    for code, op in OPCODES.items():
        out[code] = cycles_of(op.cycles, cfg)
    return out


def non_hbm_cycles(counts, topk_experts: int, cfg: PlenaConfig) -> int:
    """counts: executed (not skipped) instructions per opcode."""
    return int(np.dot(np.asarray(counts, np.int64), per_opcode_cycles(cfg))) \
        + int(topk_experts) * cfg.lat("VECTOR_MAX")
