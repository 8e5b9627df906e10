"""Python API: load a program and its preloads, run it, collect dumps and statistics.

    result = run(words, cfg, hbm=..., fpsram=..., intsram=...)
    result.dumps()            # the reference's dump contents, as arrays
    result.instructions, result.cycles, result.hbm_bytes_read, result.opcode_counts

``run`` raises :class:`plena.emu_jax.errors.PlenaError` (pc, instruction, rule) on any condition
under which the reference panics.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plena.config import PlenaConfig, default_config
from plena.emu_jax import cycles as cycle_model
from plena.emu_jax import dispatch, fast
from plena.emu_jax.cache import enable_compilation_cache
from plena.emu_jax.effects import Fields
from plena.emu_jax.errors import DecodeError, Err, LoadError, PlenaError, raise_for
from plena.emu_jax.interpreter import run_program
from plena.emu_jax.ops_hbm import check_formats
from plena.emu_jax.plan import Plan, plan_program
from plena.emu_jax.state import Geometry, MachineState, init_state
from plena.isa.encoding import DecodedProgram, decode_program
from plena.isa.opcodes import BY_MNEMONIC, OPCODES, mnemonic_of
from plena.verify.dumps import Dumps, dump_types, mram_dump_bits

UNKNOWN_VRAM_ROWS = 1 << 16  # window used when the pre-pass cannot bound VRAM writes
UNKNOWN_HBM_BYTES = 1 << 28
MAX_HBM_WINDOW = (1 << 31) - (1 << 20)
# Coarse shape buckets: programs on the same machine config share one compiled interpreter.
MIN_VRAM_ROWS, MIN_HBM_BYTES, MIN_LOOP_DEPTH, MIN_PROG_LEN = 1 << 11, 1 << 17, 8, 1 << 12


_COMPILED: dict = {}  # (Geometry, branches) -> compiled interpreter (lower().compile() bypasses jit's cache)


def _bucket(n: int, lo: int) -> int:
    """Round up to a power of two (shapes shared between similar programs: fewer compiles)."""
    n = max(n, lo)
    return 1 << (n - 1).bit_length()


def load_program(words: Sequence[int] | np.ndarray) -> DecodedProgram:
    """Decode a whole program, raising the reference's load-time panics (spec §3.2)."""
    prog = decode_program(words)
    for code in (BY_MNEMONIC["M_BMM"].code, BY_MNEMONIC["M_BTMM"].code):
        bad = np.nonzero((prog.opcode == code) & (prog.rd != 0))[0]
        if len(bad):
            pc = int(bad[0])
            raise DecodeError(f"{mnemonic_of(code)} rd must be 0", pc=pc, instr=str(prog.instr(pc)))
    return prog


def geometry_for(prog: DecodedProgram, cfg: PlenaConfig, plan: Plan, *, hbm_len: int, vram_len: int,
                 hbm_capacity: int) -> Geometry:
    rows = plan.vram_rows if plan.vram_rows is not None else UNKNOWN_VRAM_ROWS
    rows = max(rows, -(-vram_len // cfg.vlen))
    rows = min(_bucket(rows, MIN_VRAM_ROWS), cfg.vector_sram_size)
    hbm = plan.hbm_write_end + 64 if plan.hbm_write_end is not None else UNKNOWN_HBM_BYTES
    # The window may extend past the capacity: those bytes are never written and read as 0.
    hbm = min(_bucket(max(hbm, hbm_len), MIN_HBM_BYTES), MAX_HBM_WINDOW)
    if plan.hbm_write_end is not None and plan.hbm_write_end > hbm and plan.hbm_write_end <= hbm_capacity:
        raise LoadError(f"program writes HBM up to byte {plan.hbm_write_end}; the emulated window is "
                        f"limited to {MAX_HBM_WINDOW} bytes")
    return Geometry(cfg=cfg, vram_rows=rows, hbm_bytes=hbm,
                    loop_depth=_bucket(plan.loop_depth, MIN_LOOP_DEPTH), prog_len=_bucket(len(prog), MIN_PROG_LEN))


@dataclasses.dataclass
class RunResult:
    cfg: PlenaConfig
    geometry: Geometry
    state: MachineState
    plan: Plan
    instructions: int
    opcode_counts: dict[str, int]
    cycles: int
    hbm_bytes_read: int
    hbm_bytes_written: int
    load_s: float
    compile_s: float
    run_s: float
    executor: str = "interpreter"  # which executor ran the program

    def vram_bits(self) -> np.ndarray:
        """VRAM window as flat container bits (rows past the window are all zero): bf16 bits
        (u16), or f32 bits (u32) when VECTOR_SRAM_TYPE is wider than bf16."""
        return np.asarray(self.state.vram[:-1]).reshape(-1)

    def dumps(self, *, with_hbm: bool = False) -> Dumps:
        """The dump contents (:class:`plena.verify.dumps.Dumps`; non-default formats as
        described there and in docs/formats.md)."""
        mram = np.asarray(self.state.mram[:-1]).reshape(-1)
        return Dumps(vram=self.vram_bits(), mram=mram_dump_bits(mram, self.cfg),
                     fpsram=np.asarray(self.state.fpsram), intsram=np.asarray(self.state.intsram),
                     hbm=np.asarray(self.state.hbm[: self.geometry.hbm_bytes]) if with_hbm else None,
                     **dump_types(self.cfg))

    @property
    def instr_per_s(self) -> float:
        return self.instructions / self.run_s if self.run_s > 0 else float("inf")


def _u8(data) -> np.ndarray:
    if data is None:
        return np.zeros(0, np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), np.uint8)
    return np.asarray(data, np.uint8).reshape(-1)


@dataclasses.dataclass
class Inputs:
    """Validated preloads in machine formats."""

    hbm: np.ndarray  # u8
    fpsram: np.ndarray | None  # u16 bf16 bits (or u32 f32 bits)
    intsram: np.ndarray | None  # u32
    vram: np.ndarray | None  # u16 bf16 bits (or u32 f32 bits)
    capacity: int


def _bits16or32(data) -> np.ndarray:
    """Preload bits: f32 bits (u32) when given as uint32 or float32, else bf16 bits (u16)."""
    a = np.asarray(data)
    if a.dtype == np.float32:
        return a.view(np.uint32).reshape(-1)
    if a.dtype == np.uint32:
        return a.reshape(-1)
    return a.astype(np.uint16).reshape(-1)


def check_inputs(cfg: PlenaConfig, *, hbm=None, fpsram=None, intsram=None, vram=None,
                 hbm_size: int | None = None) -> Inputs:
    """Validate preloads the way the reference does (its panics become LoadError)."""
    hbm_arr = _u8(hbm)
    capacity = int(hbm_size if hbm_size is not None else cfg.hbm_size)
    if capacity % 64:
        raise LoadError(f"HBM size {capacity} is not a multiple of 64")
    if len(hbm_arr) > capacity:
        raise LoadError(f"HBM preload ({len(hbm_arr)} bytes) is larger than HBM ({capacity} bytes)")
    ints = None if intsram is None else np.asarray(intsram, np.uint32).reshape(-1)
    fps = None if fpsram is None else _bits16or32(fpsram)
    for name, arr in (("FP SRAM", fps), ("INT SRAM", ints)):
        if arr is not None and len(arr) > 1024:
            raise LoadError(f"{name} preload has {len(arr)} entries (at most 1024)")
    vr = None if vram is None else _bits16or32(vram)
    return Inputs(hbm_arr, fps, ints, vr, capacity)


def program_fields(prog: DecodedProgram, geo: Geometry) -> Fields:
    pad = geo.prog_len - len(prog)
    return Fields(*(jax.device_put(np.pad(getattr(prog, name), (0, pad))) for name in Fields._fields))


def step_limit(max_steps: int | None):
    return jax.device_put(np.int32(min(max_steps if max_steps is not None else 2**31 - 1, 2**31 - 1)))


def finish(prog: DecodedProgram, final: MachineState, cfg: PlenaConfig):
    """Raise the run's error, if any; else (opcode counts, cycles) of the run."""
    err, err_pc = int(final.err), int(final.err_pc)
    if err != Err.NONE:
        raise_for(err, err_pc, str(prog.instr(err_pc)))
    counts = np.asarray(final.counts)
    skipped = np.asarray(final.skipped)
    names = {c: OPCODES[c].mnemonic if c in OPCODES else f"0x{c:02X}" for c in range(64)}
    opcode_counts = {names[c]: int(counts[c] + skipped[c]) for c in range(64) if counts[c] or skipped[c]}
    return opcode_counts, cycle_model.non_hbm_cycles(counts, int(final.topk_experts), cfg)


EXECUTORS = ("auto", "fast", "interpreter")


#: "auto" picks the fast executor from this many dynamic instructions on: below it, the
#: interpreter (compiled once per machine geometry) finishes before the fast executor's blocks
#: (compiled per program structure, ~20-50 ms per emitted instruction on a 2-core CPU) would.
AUTO_FAST_MIN_INSTRUCTIONS = 1_000_000


def use_fast(executor: str, plan: Plan, max_steps: int | None) -> bool:
    """Whether a run with this ``executor`` setting goes to the fast executor."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, not {executor!r}")
    if executor == "interpreter" or not fast_eligible(plan, max_steps):
        return False
    return executor == "fast" or plan.dynamic_instructions >= AUTO_FAST_MIN_INSTRUCTIONS


def fast_eligible(plan: Plan, max_steps: int | None) -> bool:
    """Whether the specialising executor can run a program (else the interpreter does)."""
    return (max_steps is None and plan.structured and plan.exact and plan.static_error is None
            and plan.counts is not None)


def compiled_interpreter(geo: Geometry, fields: Fields, st: MachineState, n, limit, opcodes=None):
    """The reference interpreter compiled for ``geo`` (cached in-process). ``opcodes``: only
    these opcodes get their branch (:func:`~plena.emu_jax.dispatch.branches_for`; the fast
    executor's cold code holds few, and the full switch is most of the interpreter's
    compile time); None: all."""
    branches = None if opcodes is None else dispatch.branches_for(sorted(set(int(c) for c in opcodes)))
    key = (geo, branches)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = run_program.lower(geo, fields, st, n, limit, branches=branches).compile()
    return compiled


def _cold_opcodes(prog, ex) -> np.ndarray:
    """Opcodes the interpreter meets in a fast run: those of its cold ranges (the whole
    program when the fast executor declined it)."""
    if ex is None:
        return np.unique(prog.opcode)
    ranges = [np.asarray(prog.opcode[s.lo:int(s.hi)]) for s in ex.steps if isinstance(s, fast.Interp)]
    return np.unique(np.concatenate(ranges)) if ranges else np.zeros(0, np.int32)


def run(program, cfg: PlenaConfig | None = None, *, hbm=None, fpsram=None, intsram=None, vram=None,
        hbm_size: int | None = None, max_steps: int | None = None, executor: str = "auto",
        progress=None, fast_options: dict | None = None) -> RunResult:
    """Run a program (words, a DecodedProgram) with preloads already in machine formats:
    hbm bytes, fpsram bf16 bits (u16), intsram u32, vram bf16 bits (u16 elements); fpsram and
    vram may also be f32 bits (u32) or float32 values, converted to the containers the config
    chooses (docs/formats.md).

    ``executor``: "interpreter" (the reference interpreter), "fast" (the specialising executor,
    :mod:`plena.emu_jax.fast`, whenever the program is well-formed and no ``max_steps`` is
    given; otherwise the interpreter) or "auto" (as "fast" for programs of at least
    :data:`AUTO_FAST_MIN_INSTRUCTIONS` dynamic instructions). All give the identical final state.
    ``progress(done, total)`` is called during a fast run (see
    :func:`plena.emu_jax.profile.run_with_progress` for the interpreter). ``fast_options``:
    keyword arguments of :func:`plena.emu_jax.fast.schedule` (``hot``, ``max_block``).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, not {executor!r}")
    t0 = time.perf_counter()
    enable_compilation_cache()
    cfg = cfg or default_config()
    check_formats(cfg)
    prog = program if isinstance(program, DecodedProgram) else load_program(program)
    inp = check_inputs(cfg, hbm=hbm, fpsram=fpsram, intsram=intsram, vram=vram, hbm_size=hbm_size)
    plan = plan_program(prog, cfg, inp.intsram)
    geo = geometry_for(prog, cfg, plan, hbm_len=len(inp.hbm), vram_len=0 if inp.vram is None else len(inp.vram),
                       hbm_capacity=inp.capacity)
    st = init_state(geo, hbm_capacity=inp.capacity, hbm=inp.hbm, fpsram=inp.fpsram, intsram=inp.intsram,
                    vram=inp.vram)
    fields, n, limit = program_fields(prog, geo), jax.device_put(np.int32(len(prog))), step_limit(max_steps)
    ex = None

    def prepare_fast(state, **extra):
        # the interpreter for the cold code holds only the opcodes it will meet, and compiles
        # beside the blocks
        return fast.prepare(prog, geo, state, interpreter=lambda ops: compiled_interpreter(geo, fields, state, n, limit, ops),
                            intsram=inp.intsram, **{**(fast_options or {}), **extra})

    if use_fast(executor, plan, max_steps):
        ex = prepare_fast(st)
    t1 = time.perf_counter() - (ex.compile_s if ex is not None else 0.0)  # blocks: compile time, not load
    if ex is None:
        opcodes = _cold_opcodes(prog, ex) if executor == "fast" else None
        compiled = compiled_interpreter(geo, fields, st, n, limit, opcodes)
    else:
        compiled = ex.interpreter
    t2 = time.perf_counter()
    if ex is None:
        final = compiled(fields, st, n, limit)
    else:
        final = fast.execute(ex, compiled, fields, st, progress=progress, total=plan.dynamic_instructions)
        if int(final.err) == Err.LANE_CONFLICT:  # a loop's iterations were dependent: redo it plainly
            # (the redo, its block compiles included, counts as run time)
            st = init_state(geo, hbm_capacity=inp.capacity, hbm=inp.hbm, fpsram=inp.fpsram, intsram=inp.intsram,
                            vram=inp.vram)
            ex = prepare_fast(st, lanes=False)
            final = fast.execute(ex, ex.interpreter, fields, st, progress=progress, total=plan.dynamic_instructions)
    jax.block_until_ready(final)
    t3 = time.perf_counter()
    if ex is not None:
        final = fast.finish_state(final, plan, len(prog))
    opcode_counts, cycles = finish(prog, final, cfg)
    return RunResult(
        cfg=cfg, geometry=geo, state=final, plan=plan, instructions=int(final.steps),
        opcode_counts=opcode_counts, cycles=cycles,
        hbm_bytes_read=64 * int(final.hbm_rd_blocks), hbm_bytes_written=64 * int(final.hbm_wr_blocks),
        load_s=t1 - t0, compile_s=t2 - t1, run_s=t3 - t2, executor="interpreter" if ex is None else "fast")


__all__ = ["run", "load_program", "RunResult", "PlenaError"]
