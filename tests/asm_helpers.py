"""Small helpers shared by the emulator tests: build programs from text and raw words."""

from plena.isa import assemble


def prog(*parts) -> list[int]:
    """Words from assembly text and raw words (ints / lists of ints), in order."""
    out: list[int] = []
    for p in parts:
        if isinstance(p, str):
            out += assemble(p)
        elif isinstance(p, int):
            out.append(p)
        else:
            out += prog(*p)
    return out


def li(reg: int, value: int) -> str:
    """Load a u32 constant into gp<reg> (the compiler's S_LUI_INT/S_ADDI_INT idiom, spec §3.4)."""
    if value < 1 << 18:
        return f"S_ADDI_INT gp{reg}, gp0, {value}"
    lines = [f"S_LUI_INT gp{reg}, {value >> 12}"]
    if value & 0xFFF:
        lines.append(f"S_ADDI_INT gp{reg}, gp{reg}, {value & 0xFFF}")
    return "\n".join(lines)
