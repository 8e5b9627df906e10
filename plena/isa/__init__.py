"""PLENA instruction set: opcode table, encoding, assembler, disassembler, .mem files."""

from plena.isa.assembler import AsmError, assemble, assemble_file, assemble_line
from plena.isa.disassembler import disassemble, disassemble_word
from plena.isa.encoding import DecodedProgram, Instr, decode, decode_program, encode_fields
from plena.isa.memfile import MemFileError, format_mem, parse_mem, read_mem, read_program, write_mem
from plena.isa.opcodes import BY_MNEMONIC, OPCODES, Cycles, Layout, OpSpec, Role, Unit

__all__ = [
    "AsmError", "assemble", "assemble_file", "assemble_line", "disassemble", "disassemble_word",
    "DecodedProgram", "Instr", "decode", "decode_program", "encode_fields", "MemFileError",
    "format_mem", "parse_mem", "read_mem", "read_program", "write_mem", "BY_MNEMONIC", "OPCODES",
    "Cycles", "Layout", "OpSpec", "Role", "Unit",
]
