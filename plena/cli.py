"""The ``plena`` command: assembler, disassembler and the drop-in emulator runner."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_PANIC = 101  # the reference emulator's exit status on a panic


def _cmd_asm(args) -> int:
    from plena.isa import AsmError, assemble_file, write_mem

    try:
        words = assemble_file(args.input)
    except AsmError as exc:
        print(f"{args.input}:{exc}", file=sys.stderr)
        return 1
    out = args.output or str(Path(args.input).with_suffix(".mem"))
    write_mem(out, words)
    print(f"{len(words)} instructions -> {out}", file=sys.stderr)
    return 0


def _cmd_disasm(args) -> int:
    from plena.isa import MemFileError, disassemble, read_mem

    try:
        words = read_mem(args.input)
    except MemFileError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    sys.stdout.write(disassemble(words, with_pc=args.pc))
    return 0


def _cmd_run(args) -> int:
    from plena.config import ConfigError, load_config, parse_size
    from plena.emu_jax import files
    from plena.emu_jax.api import run
    from plena.emu_jax.errors import PlenaError
    from plena.isa import AsmError, MemFileError, read_program
    from plena.verify.dumps import write_dump_dir

    try:
        cfg = load_config(args.settings)
        hbm_size = parse_size(args.hbm_size) if args.hbm_size else None
        words = read_program(args.opcode)
        result = run(words, cfg, hbm=files.read_bytes(args.hbm), fpsram=files.load_fpsram(args.fpsram),
                     intsram=files.load_intsram(args.intsram) if args.intsram else None,
                     vram=files.load_vram(args.vram) if args.vram else None, hbm_size=hbm_size)
    except PlenaError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_PANIC
    except (ConfigError, AsmError, MemFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PANIC
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_dump_dir(result.dumps(with_hbm=args.dump_hbm), out, hbm=args.dump_hbm)
    _print_stats(result, args.opcode)
    return 0


def _print_stats(result, program) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=False)
    con.print(f"[bold]{program}[/]: {result.instructions} instructions executed, "
              f"{result.cycles} non-HBM cycles, HBM {result.hbm_bytes_read} B read / "
              f"{result.hbm_bytes_written} B written")
    con.print(f"wall time: load {result.load_s:.3f} s, compile {result.compile_s:.3f} s, "
              f"run {result.run_s:.3f} s ({result.instr_per_s / 1e6:.3f} M instr/s)")
    table = Table("opcode", "count", title="dynamic instruction counts")
    for name, count in sorted(result.opcode_counts.items(), key=lambda kv: -kv[1]):
        table.add_row(name, str(count))
    con.print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plena", description="PLENA-JAX: assembler, disassembler and "
                                "JAX emulator of the PLENA accelerator (drop-in for the reference emulator).")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("asm", help="assemble upstream PLENA assembly into a .mem file")
    a.add_argument("input")
    a.add_argument("-o", "--output", help="output .mem (default: INPUT with .mem suffix)")
    a.set_defaults(func=_cmd_asm)

    d = sub.add_parser("disasm", help="print the assembly of a .mem file")
    d.add_argument("input")
    d.add_argument("--pc", action="store_true", help="annotate each line with its program counter")
    d.set_defaults(func=_cmd_disasm)

    r = sub.add_parser("run", help="run a program like the reference transactional_emulator")
    r.add_argument("--opcode", required=True, help="machine code (.mem) or assembly (.asm)")
    r.add_argument("--hbm", required=True, help="HBM preload, raw bytes at address 0")
    r.add_argument("--fpsram", required=True, help="FP SRAM preload, f16 little-endian")
    r.add_argument("--intsram", help="INT SRAM preload, u32 little-endian")
    r.add_argument("--vram", help="VRAM preload, bf16 little-endian from element 0")
    r.add_argument("--settings", help="plena_settings.toml (default: $PLENA_SETTINGS_TOML or configs/)")
    r.add_argument("--hbm-size", help="HBM capacity N[K|M|G|T][i][B], a multiple of 64")
    r.add_argument("--out", default=".", help="directory for the dump files (default: .)")
    r.add_argument("--dump-hbm", action="store_true", help="also write hbm_dump.bin (the emulated window)")
    r.add_argument("--log-level", help="accepted for compatibility; ignored")
    r.set_defaults(func=_cmd_run)

    i = sub.add_parser("isa-doc", help="print the ISA reference generated from the opcode table")
    i.set_defaults(func=lambda args: print(__import__("plena.isa.docs", fromlist=["isa_markdown"]).isa_markdown()) or 0)

    e = sub.add_parser("example", help="run the built-in example (softmax on the emulator)")
    e.set_defaults(func=lambda args: __import__("plena.example", fromlist=["main"]).main())
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
