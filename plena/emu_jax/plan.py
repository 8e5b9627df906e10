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


def _add(a, b):
    return None if a is None or b is None else (a + b) & M32


def plan_program(prog: DecodedProgram, cfg: PlenaConfig, intsram=None, *, max_dynamic: int = 20_000_000) -> Plan:
    n = len(prog)
    ops, rds, rs1s, rs2s = (c.tolist() for c in (prog.opcode, prog.rd, prog.rs1, prog.rs2))
    rs3s, imm18s, imm22s = prog.rs3.tolist(), prog.imm18.tolist(), prog.imm22.tolist()
    gp: list = [0] * 16
    a_hi: list = [0] * 16
    a_lo: list = [0] * 16
    ints: list = [0] * 1024
    if intsram is not None:
        for i, v in enumerate(list(intsram)[:1024]):
            ints[i] = int(v)
    scale, stride = 0, 1
    loops: list = []  # [start_pc, reg, count]
    depth = 0
    vlen, mlen, blen, ba = cfg.vlen, cfg.mlen, cfg.blen, cfg.broadcast_amount
    budget = cfg.max_loop_instructions
    vram_max = 0  # rows
    vram_known = True
    hbm_end = 0
    hbm_known = True
    ratio = cfg.precision.hbm_v_act_type.element_scale_ratio
    block = getattr(cfg.precision.hbm_v_act_type, "block", vlen)

    def vrow(addr, extra_rows=0):
        nonlocal vram_max, vram_known
        if addr is None:
            vram_known = False
        else:
            vram_max = max(vram_max, addr // vlen + extra_rows + 1)

    op_vwrite = {_OP[m] for m in ("V_ADD_VV", "V_ADD_VF", "V_SUB_VV", "V_SUB_VF", "V_MUL_VV", "V_MUL_VF",
                                  "V_EXP_V", "V_RECI_V", "V_SHFT_V", "V_MAX_VF", "V_MIN_VF", "S_MAP_V_FP",
                                  "M_MV_WO")}
    O = _OP
    pc = 0
    steps = 0
    static_error = None
    exact = True
    while pc < n:
        if steps >= max_dynamic:
            exact = False
            break
        steps += 1
        for lp in loops:
            lp[2] += 1
        if loops and max(lp[2] for lp in loops) > budget:
            static_error = (pc, Err.LOOP_BUDGET)
            break
        op, rd, rs1, rs2 = ops[pc], rds[pc], rs1s[pc], rs2s[pc]
        nxt = pc + 1
        if op == O["S_ADDI_INT"]:
            gp[rd] = _add(gp[rs1], imm18s[pc])
        elif op == O["S_ADD_INT"]:
            gp[rd] = _add(gp[rs1], gp[rs2])
        elif op == O["S_SUB_INT"]:
            gp[rd] = None if gp[rs1] is None or gp[rs2] is None else (gp[rs1] - gp[rs2]) & M32
        elif op == O["S_MUL_INT"]:
            gp[rd] = None if gp[rs1] is None or gp[rs2] is None else (gp[rs1] * gp[rs2]) & M32
        elif op == O["S_LUI_INT"]:
            gp[rd] = (imm22s[pc] << 12) & M32
        elif op in (O["S_LD_INT"], O["S_ST_INT"]):
            idx = _add(gp[rs1], imm18s[pc])
            if idx is None:
                exact = False
                if op == O["S_LD_INT"]:
                    gp[rd] = None
                else:  # unknown store address: every INT SRAM word becomes unknown
                    ints = [None] * 1024
            elif idx >= 1024:
                static_error = (pc, Err.INTSRAM_RANGE)
                break
            elif op == O["S_LD_INT"]:
                gp[rd] = ints[idx]
            else:
                ints[idx] = gp[rd]
        elif op == O["V_TOPK"]:
            base = gp[rs2]
            k = 8 if rs3s[pc] == 1 else 4
            if base is None:
                ints = [None] * 1024
            else:
                for j in range(k):
                    if base + j < 1024:
                        ints[base + j] = None
        elif op == O["C_SET_ADDR_REG"]:
            a_hi[rd], a_lo[rd] = gp[rs1], gp[rs2]
        elif op == O["C_SET_SCALE_REG"]:
            scale = gp[rd]
        elif op == O["C_SET_STRIDE_REG"]:
            stride = gp[rd]
        elif op == O["C_LOOP_START"]:
            if imm22s[pc] == 0:
                static_error = (pc, Err.LOOP_ZERO)
                break
            gp[rd] = imm22s[pc]
            loops.append([pc, rd, 0])
            depth = max(depth, len(loops))
        elif op == O["C_LOOP_END"]:
            j = next((i for i in range(len(loops) - 1, -1, -1) if loops[i][1] == rd), None)
            if j is None:
                static_error = (pc, Err.LOOP_END_UNMATCHED)
                break
            v = gp[rd]
            if v is None:
                exact = False
                break
            if v > 1:
                gp[rd] = v - 1
                loops[j][2] = 0
                nxt = loops[j][0] + 1
            else:
                gp[rd] = 0
                del loops[j]
        elif op == O["C_BREAK"]:
            if not loops:
                static_error = (pc, Err.BREAK_NO_LOOP)
                break
            _, reg, _ = loops.pop()
            gp[reg] = 0
        elif op in op_vwrite:
            vrow(gp[rd])
        elif op == O["M_MM_WO"]:
            v = _add(gp[rd], imm18s[pc])
            s = 1 if rs1 == 0 else gp[rs1]
            vrow(None if v is None or s is None else (v - v % mlen + (blen - 1) * mlen * s) & M32)
        elif op == O["M_BMM_WO"]:
            v = _add(gp[rd], imm18s[pc])
            vrow(v, ba * mlen - 1)
        elif op == O["M_BMV_WO"]:
            vrow(_add(gp[rd], imm18s[pc]), ba - 1)
        elif op == O["H_PREFETCH_V"]:
            v = gp[rd]
            if v is None:
                vram_known = False
            else:
                vram_max = max(vram_max, min(cfg.vector_sram_size, v // vlen + cfg.hbm_v_prefetch_amount))
        elif op == O["H_STORE_V"]:
            off, hi, lo = gp[rs1], a_hi[rs2], a_lo[rs2]
            s = stride if rs3s[pc] == 1 else vlen
            if None in (off, hi, lo, s, scale):
                hbm_known = False
            else:
                base = (hi << 32) | lo
                last = cfg.hbm_v_writeback_amount - 1
                e_end = base + off + ((last * s) & M32) + vlen
                s_end = base + scale + off // ratio + int(last * (s / ratio)) + vlen // block
                hbm_end = max(hbm_end, e_end, s_end)
        pc = nxt
    return Plan(
        dynamic_instructions=steps if exact and static_error is None else (steps if static_error else None),
        loop_depth=depth, vram_rows=vram_max if vram_known else None,
        hbm_write_end=hbm_end if hbm_known else None, static_error=static_error, exact=exact)
