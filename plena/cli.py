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

    profile_out = args.stage_profile or ("stage_profile.json" if args.stage_profile_asm else None)
    traced = bool(args.trace or profile_out)
    show = args.progress if args.progress is not None else sys.stdout.isatty()
    trace = None
    try:
        cfg = load_config(args.settings)
        hbm_size = parse_size(args.hbm_size) if args.hbm_size else None
        words = read_program(args.opcode)
        inputs = dict(hbm=files.read_bytes(args.hbm), fpsram=files.load_fpsram(args.fpsram),
                      intsram=files.load_intsram(args.intsram) if args.intsram else None,
                      vram=files.load_vram(args.vram) if args.vram else None, hbm_size=hbm_size)
        if traced or show:
            from plena.emu_jax.profile import run_with_progress, terminal_progress
            from plena.emu_jax.trace import run_traced

            with terminal_progress(show) as progress:
                if traced:
                    result, trace = run_traced(words, cfg, **inputs, progress=progress)
                else:
                    result = run_with_progress(words, cfg, **inputs, progress=progress)
        else:
            result = run(words, cfg, **inputs)
    except PlenaError as exc:
        if args.trace and getattr(exc, "trace", None) is not None:
            exc.trace.save(args.trace)
            print(f"trace of {len(exc.trace)} instructions (up to the panic) -> {args.trace}", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return EXIT_PANIC
    except (ConfigError, AsmError, MemFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PANIC
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_dump_dir(result.dumps(with_hbm=args.dump_hbm), out, hbm=args.dump_hbm)
    _print_stats(result, args.opcode)
    if args.trace:
        trace.save(args.trace)
        print(f"trace of {len(trace)} instructions -> {args.trace}")
    if profile_out:
        return _write_stage_profile(args, result, trace, profile_out)
    return 0


def _write_stage_profile(args, result, trace, path) -> int:
    import json

    from plena.emu_jax.profile import PcProfile, stage_profile, stages_for_program

    rules = []
    for rule in args.stage_rule or []:
        sub, sep, name = rule.partition("=")
        if not sep or not sub or not name:
            print(f"error: --stage-rule {rule!r} is not SUBSTRING=NAME", file=sys.stderr)
            return 2
        rules.append((sub, name))
    try:
        stages = stages_for_program(args.opcode, len(trace.words), args.stage_profile_asm, rules=rules,
                                    all_comments=args.stage_all_comments)
    except (OSError, ValueError) as exc:
        print(f"error: stage profile: {exc}", file=sys.stderr)
        return 2
    prof = stage_profile(PcProfile.from_trace(trace), stages, result.cfg, wall_s=result.run_s)
    Path(path).write_text(json.dumps(prof, indent=2) + "\n")
    _print_stages(prof, path)
    return 0


def _print_stages(prof: dict, path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("stage", "instructions", "%", "non-HBM cycles", "%", "HBM read B", "HBM written B",
                  title=f"stage profile -> {path} (seconds estimated from instruction shares)")
    for name, s in prof["stages"].items():
        table.add_row(name, str(s["instructions"]), f"{100 * s['instruction_fraction']:.1f}",
                      str(s["non_hbm_cycles"]), f"{100 * s['cycle_fraction']:.1f}", str(s["hbm_bytes_read"]),
                      str(s["hbm_bytes_written"]))
    Console().print(table)


def _cmd_diff(args) -> int:
    from plena.verify.diff import main

    return main(args)


def _print_stats(result, program) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=False)
    # Plain print for the summary lines: rich would wrap them at the terminal width, and scripts
    # grep them (e.g. "91 instructions executed").
    print(f"{program}: {result.instructions} instructions executed, "
          f"{result.cycles} non-HBM cycles, HBM {result.hbm_bytes_read} B read / "
          f"{result.hbm_bytes_written} B written")
    print(f"wall time: load {result.load_s:.3f} s, compile {result.compile_s:.3f} s, "
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
    r.add_argument("--trace", metavar="FILE", help="record every executed instruction (pc, registers, "
                   "written windows with content hashes) into FILE: .npz, or .jsonl for one JSON line "
                   "per instruction; compare two with `plena diff`")
    r.add_argument("--stage-profile", "--stage-profile-out", dest="stage_profile", metavar="FILE",
                   help="write a per-stage profile (instructions, non-HBM cycles, HBM bytes, estimated "
                   "time share) as JSON; stages come from `; stage: NAME` comments")
    r.add_argument("--stage-profile-asm", metavar="PATH", help="assembly (or tensors.json) that labels the "
                   "pcs with stages (default: --opcode if .asm, else tensors.json / .asm beside it); "
                   "alone it writes ./stage_profile.json like the reference")
    r.add_argument("--stage-rule", action="append", metavar="SUBSTRING=NAME",
                   help="a comment containing SUBSTRING starts stage NAME (repeatable)")
    r.add_argument("--stage-all-comments", action="store_true",
                   help="every whole-line comment starts a stage named after its text")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: when stdout is a terminal)")
    r.set_defaults(func=_cmd_run)

    f = sub.add_parser("diff", help="compare two runs: two --trace files (first divergent instruction) "
                       "or two dump folders (first differing element per memory); exit 0 if identical, else 1")
    from plena.verify.diff import add_arguments as diff_arguments

    diff_arguments(f)
    f.set_defaults(func=_cmd_diff)

    i = sub.add_parser("isa-doc", help="print the ISA reference generated from the opcode table")
    i.set_defaults(func=lambda args: print(__import__("plena.isa.docs", fromlist=["isa_markdown"]).isa_markdown()) or 0)

    e = sub.add_parser("example", help="run the built-in example (softmax on the emulator)")
    e.set_defaults(func=lambda args: __import__("plena.example", fromlist=["main"]).main())

    from plena.demo import add_arguments as _demo_arguments

    m = sub.add_parser("demo", help="Llama-family decoder (seeded random weights) on the emulator vs the golden "
                       "model, stage by stage")
    _demo_arguments(m)
    m.set_defaults(func=lambda args: __import__("plena.demo", fromlist=["main"]).main(args=args))

    cp = sub.add_parser("compare", help="per-stage errors of two dump folders (VRAM tensors of a tensors.json) "
                        "or of the emulator vs the golden (--golden); --png DIR writes error bar charts and a "
                        "heat map of the first divergent tensor")
    from plena.verify.plots import add_arguments as _compare_args
    _compare_args(cp)
    cp.set_defaults(func=_cmd_compare)

    c = sub.add_parser("compile", help="compile a Llama-family decoder (seeded random weights) into the "
                       "upstream files (program.mem, hbm.bin, ...) plus run.sh")
    c.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "clm-60m"])
    c.add_argument("--layers", type=int, default=2)
    c.add_argument("--seq", type=int, default=64)
    c.add_argument("--config", help="plena_settings.toml of the target machine")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(func=_cmd_compile)
    return p


def _cmd_compare(args) -> int:
    from plena.verify.plots import main as compare_main

    return compare_main(args)


def _cmd_compile(args) -> int:
    from plena.demo import compile_to_folder

    prog, meta, folder = compile_to_folder(args.out, layers=args.layers, seq=args.seq, config=args.config,
                                           model=args.model, seed=args.seed)
    print(f"{args.model}: {args.layers} layer(s), seq {args.seq}: {len(prog.words)} instructions "
          f"({prog.dynamic_instructions} dynamic), HBM image {len(prog.hbm)} B -> {folder}")
    print(f"run it with: sh {folder}/run.sh --out DUMPS")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
