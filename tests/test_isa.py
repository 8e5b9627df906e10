import pytest
from hypothesis import given, settings, strategies as st

from conftest import CONFORMANCE, case_params
from plena.isa import (BY_MNEMONIC, OPCODES, AsmError, Layout, MemFileError, Role, assemble,
                       assemble_line, decode, decode_program, disassemble, disassemble_word,
                       encode_fields, parse_mem, read_mem)
from plena.isa.assembler import assemble_file


@pytest.mark.parametrize("case", case_params())
def test_conformance_assembly_reproduces_mem(case):
    words = assemble_file(CONFORMANCE / case / "program.asm")
    mem = read_mem(CONFORMANCE / case / "program.mem")
    assert words == mem


@pytest.mark.parametrize("case", case_params())
def test_conformance_disassembly_round_trip(case):
    mem = read_mem(CONFORMANCE / case / "program.mem")
    text = disassemble(mem)
    assert ".word" not in text  # everything the toolchain emits has a canonical form
    assert assemble(text) == mem


def test_table_is_consistent():
    assert len(OPCODES) == 55
    assert all(BY_MNEMONIC[op.mnemonic] is op for op in OPCODES.values())
    assert OPCODES[0x32].mnemonic == "V_SHFT_V" and OPCODES[0x34].mnemonic == "C_BREAK"
    assert not OPCODES[0x31].executable and not OPCODES[0x33].executable
    # the group the upstream assembler checks first wins
    assert BY_MNEMONIC["V_EXP_V"].layout is Layout.IMM18_RS1_RD
    assert BY_MNEMONIC["V_RED_SUM"].layout is Layout.RS1_RD


def test_field_placement_and_quirks():
    # S_ADDI_INT gp1, gp2, 5: imm18 at bit 14
    assert assemble_line("S_ADDI_INT gp1, gp2, 5") == 5 << 14 | 2 << 10 | 1 << 6 | 0x22
    # C_SET_ADDR_REG a1, gp0, gp1 -> rs2 = 1
    assert assemble_line("C_SET_ADDR_REG a1, gp0, gp1") == 1 << 14 | 0 << 10 | 1 << 6 | 0x2B
    # masked V_EXP_V: the rmask lands in imm18 (rs2 field), never in rs3
    w = assemble_line("V_EXP_V gp1, gp1, 1, 0")
    assert decode(w).rs3 == 0 and decode(w).rs2 == 1
    # V_RED_SUM drops the mask operand entirely
    assert assemble_line("V_RED_SUM f4, gp1, 1, 0") == assemble_line("V_RED_SUM f4, gp1")
    # M_MV_WO imm at bit 10: emulator reads imm18 = asm_imm >> 4
    w = assemble_line("M_MV_WO gp3, 32")
    assert decode(w).imm18 == 32 >> 4 and decode(w).rs1 == 0
    # M_MM_WO is consistent (imm18)
    assert decode(assemble_line("M_MM_WO gp5, gp7, 64")).imm18 == 64
    # H_* take funct1 from the 5th operand and rstride from the 4th; a 6th is accepted and unused
    w = assemble_line("H_PREFETCH_V gp4, gp3, a0, 1, 2, 7")
    d = decode(w)
    assert (d.rd, d.rs1, d.rs2, d.rs3, d.funct1) == (4, 3, 0, 1, 2)
    # rmask ops default rmask to 0; S_LUI_INT / C_LOOP_START use imm22
    assert decode(assemble_line("V_ADD_VV gp1, gp2, gp3")).rs3 == 0
    assert decode(assemble_line("S_LUI_INT gp1, 4194303")).imm22 == (1 << 22) - 1
    assert decode(assemble_line("C_LOOP_START gp6, 16")).imm22 == 16
    assert assemble_line("C_BREAK") == 0x34
    # comments and blank lines
    assert assemble("; hi\n\n  // x\nC_LOOP_END gp2 ; tail\n") == [2 << 6 | 0x30]
    # bare decimal in the rd slot
    assert assemble_line("M_MM 0, gp1, gp2") == assemble_line("M_MM gp0, gp1, gp2")


@pytest.mark.parametrize("line, problem", [
    ("FOO gp1, gp2", "unknown mnemonic"),
    ("s_addi_int gp1, gp2, 1", "upper case"),
    ("loop:", "labels"),
    ("S_ADDI_INT gp16, gp0, 1", "does not fit"),
    ("S_ADDI_INT gp1, gp0, -1", "negative"),
    ("S_ADDI_INT gp1, gp0, 262144", "does not fit"),
    ("S_LUI_INT gp1, 4194304", "does not fit"),
    ("M_MM 0, 1, gp2", "needs register operand rs1"),
    ("H_PREFETCH_V gp1, gp2, a0, 1", "funct1"),
    ("S_ADDI_INT gp1, gp0, 0x10", "not a decimal"),
    ("S_ADD_INT fpx, gp1, gp2", "not a decimal"),
])
def test_assembler_errors_name_line_and_problem(line, problem):
    with pytest.raises(AsmError) as err:
        assemble("S_ADDI_INT gp1, gp0, 1\n" + line)
    assert err.value.lineno == 2
    assert problem in str(err.value) and "line 2" in str(err.value)


def test_mem_reader_matches_reference_rules():
    assert parse_mem("0x00000022\n0x0x10  ff\n") == [0x22, 0x10, 0xFF]
    with pytest.raises(MemFileError, match="instruction 1"):
        parse_mem("0x1\n0X22\n")
    with pytest.raises(MemFileError, match="32 bits"):
        parse_mem("0x100000000")
    with pytest.raises(MemFileError):
        parse_mem("0xzz")


def _operand_text(role, value):
    return f"{role.value}{value}" if role in (Role.GP, Role.FP, Role.ADDR) else str(value)


@st.composite
def valid_lines(draw):
    op = draw(st.sampled_from(sorted(BY_MNEMONIC.values(), key=lambda o: o.code)))
    r = st.integers(0, 15)
    lay = op.layout
    rd = _operand_text(op.rd if op.rd is not Role.IGNORED else Role.GP, draw(r))
    reg = lambda role: _operand_text(role if role in (Role.GP, Role.FP, Role.ADDR) else Role.GP, draw(r))  # noqa: E731
    if lay is Layout.IMM18_RS1_RD:
        return f"{op.mnemonic} {rd}, {reg(op.rs1)}, {draw(st.integers(0, (1 << 18) - 1))}"
    if lay in (Layout.IMM22_RD, Layout.LOOP):
        return f"{op.mnemonic} {rd}, {draw(st.integers(0, (1 << 22) - 1))}"
    if lay is Layout.RS1_RD:
        return f"{op.mnemonic} {rd}, {reg(op.rs1)}"
    if lay is Layout.NONE:
        return op.mnemonic
    if lay is Layout.RD:
        return f"{op.mnemonic} {rd}"
    base = f"{op.mnemonic} {rd}, {reg(op.rs1)}, {reg(op.rs2)}"
    if lay is Layout.FUNCT_STRIDE:
        return f"{base}, {draw(r)}, {draw(r)}"
    if lay is Layout.RMASK:
        return f"{base}, {draw(r)}"
    return base


@settings(max_examples=400, deadline=None)
@given(valid_lines())
def test_disassemble_assemble_identity_on_valid_words(line):
    word = assemble_line(line)
    text = disassemble_word(word)
    assert not text.startswith(".word")
    assert assemble_line(text) == word


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 0xFFFFFFFF))
def test_any_word_round_trips_and_decodes(word):
    assert assemble(disassemble([word])) == [word]
    d = decode(word)
    again = encode_fields(d.opcode, d.rd, d.rs1, d.rs2, d.rs3, d.funct1) | (word >> 26) << 26
    assert again == word
    prog = decode_program([word])
    assert int(prog.imm18[0]) == d.imm18 and int(prog.imm22[0]) == d.imm22 and int(prog.rs3[0]) == d.rs3


def test_isa_doc_is_generated_from_the_table():
    from pathlib import Path

    from plena.isa.docs import isa_markdown

    text = isa_markdown()
    for op in OPCODES.values():
        assert f"| 0x{op.code:02X} | {op.mnemonic} |" in text
    committed = Path(__file__).resolve().parents[1] / "docs" / "isa.md"
    assert committed.read_text() == text + "\n", "docs/isa.md is stale: regenerate with `plena isa-doc`"


def test_cli_asm_and_disasm(tmp_path, capsys):
    """``plena asm IN.asm -o OUT.mem`` writes one 0x%08X word per line; ``plena disasm`` prints
    text that reassembles to the same words; an assembly error names the file and line and
    exits 1."""
    from plena.cli import main

    src = tmp_path / "p.asm"
    src.write_text("; demo\nS_ADDI_INT gp1, gp0, 5   // five\nC_LOOP_START gp2, 3\nV_ADD_VV gp3, gp1, gp1, 0\n"
                   "C_LOOP_END gp2\n")
    out = tmp_path / "p.mem"
    assert main(["asm", str(src), "-o", str(out)]) == 0
    lines = out.read_text().split()
    assert lines == [f"0x{w:08X}" for w in assemble(src.read_text())] and len(lines) == 4
    capsys.readouterr()
    assert main(["disasm", str(out)]) == 0
    assert assemble(capsys.readouterr().out) == read_mem(out)
    bad = tmp_path / "bad.asm"
    bad.write_text("S_ADDI_INT gp1, gp0, 5\nS_FROB gp1\n")
    assert main(["asm", str(bad), "-o", str(tmp_path / "bad.mem")]) == 1
    err = capsys.readouterr().err
    assert "bad.asm:line 2: unknown mnemonic 'S_FROB'" in err
    assert not (tmp_path / "bad.mem").exists()
