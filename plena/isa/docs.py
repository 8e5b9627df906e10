"""Generate the ISA reference (docs/isa.md) from the opcode table."""

from __future__ import annotations

from plena.isa.opcodes import OPCODES, Layout, Role

_LAYOUT_TEXT = {
    Layout.IMM18_RS1_RD: "`MN rd, rs1, imm` → imm<<14 | rs1<<10 | rd<<6",
    Layout.IMM22_RD: "`MN rd, imm` → imm<<10 | rd<<6",
    Layout.RS1_RD: "`MN rd, rs1` → rs1<<10 | rd<<6",
    Layout.NONE: "`MN` → opcode only",
    Layout.RD: "`MN rd` → rd<<6",
    Layout.LOOP: "`MN rd, imm` → imm<<10 | rd<<6",
    Layout.FUNCT_STRIDE: "`MN rd, rs1, rs2, rstride, funct1` → funct1<<22 | rstride<<18 | rs2<<14 | rs1<<10 | rd<<6",
    Layout.RMASK: "`MN rd, rs1, rs2[, rmask]` → rmask<<18 | rs2<<14 | rs1<<10 | rd<<6",
    Layout.RS2_RS1_RD: "`MN rd, rs1, rs2` → rs2<<14 | rs1<<10 | rd<<6",
}


def _fields(op) -> str:
    parts = []
    for name in ("rd", "rs1", "rs2", "rs3", "funct1"):
        role = getattr(op, name)
        if role is not Role.IGNORED:
            parts.append(f"{name}:{role.value}")
    if op.imm:
        parts.append(op.imm)
    return ", ".join(parts) or "—"


def isa_markdown() -> str:
    lines = [
        "# PLENA ISA reference",
        "",
        "Generated from `plena/isa/opcodes.py` by `plena isa-doc`; do not edit by hand.",
        "Word layout: opcode bits 0-5, rd 6-9, rs1 10-13, rs2 14-17, rs3 (rmask/rstride) 18-21,",
        "funct1 22-25; imm18 = bits 14-31, imm22 = bits 10-31 (both unsigned).",
        "",
        "| hex | mnemonic | unit | fields read by the emulator | assembler encoding | cycles | semantics |",
        "|---|---|---|---|---|---|---|",
    ]
    for code in sorted(OPCODES):
        op = OPCODES[code]
        note = op.summary + ("" if op.executable else " (not executable: Invalid in the emulator)")
        if op.fp_dest:
            note += "; rd = f0 makes it a no-op (0 cycles)"
        cells = [f"0x{code:02X}", op.mnemonic, op.unit.value, _fields(op), _LAYOUT_TEXT[op.layout],
                 op.cycles.value, note]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Role legend: gp = general-purpose register index, f = bf16 scalar register, "
              "a = HBM address register, flag = plain number.", ""]
    return "\n".join(lines)
