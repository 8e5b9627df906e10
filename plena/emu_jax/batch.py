"""One program over many input sets: a batched run with shared control flow.

PLENA control flow depends only on registers and immediates, so every input set of one
program follows the same instruction sequence. The batched interpreter therefore keeps the
control state (pc, gp/address registers, loop stack, counters) unbatched and vmaps only the
data (fp registers, FP SRAM, VRAM, MRAM, HBM, accumulators): the dispatch stays a real
``lax.switch`` and each step does the work of all input sets at once. A program whose control
depends on tensor data (V_TOPK results loaded with S_LD_INT) cannot be batched this way and
is rejected with :class:`BatchDivergence`. The batch axis can be sharded over devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from plena.config import PlenaConfig, default_config
from plena.emu_jax import fast
from plena.emu_jax.api import (_COMPILED, _cold_opcodes, check_inputs, finish, use_fast, geometry_for, load_program,
                               program_fields, step_limit)
from plena.emu_jax.cache import enable_compilation_cache
from plena.emu_jax.errors import Err
from plena.emu_jax import dispatch, ops_scalar, ops_vector
from plena.emu_jax.interpreter import step
from plena.isa.opcodes import BY_MNEMONIC
from plena.emu_jax.ops_hbm import check_formats
from plena.emu_jax.plan import plan_program
from plena.emu_jax.state import MachineState, init_state
from plena.isa.encoding import DecodedProgram
from plena.verify.dumps import Dumps, dump_types, mram_dump_bits

DATA_FIELDS = ("fp", "fpsram", "vram", "mram", "hbm", "m_acc", "v_acc", "hm_acc", "hv_acc")  # batched


class BatchDivergence(ValueError):
    """The program's control flow depends on tensor data, so input sets cannot share it."""


def state_axes() -> MachineState:
    return MachineState(**{f: (0 if f in DATA_FIELDS else None) for f in MachineState._fields})


# V_TOPK writes data-dependent indices into INT SRAM, which feeds gp registers (control):
# programs using it are rejected before tracing, and its branch is left out of the batch
# dispatch so that INT SRAM and the registers stay unbatched.
_TOPK = BY_MNEMONIC["V_TOPK"].code
BATCH_BRANCHES = tuple(ops_scalar.invalid if fn is ops_vector.v_topk else fn for fn in dispatch.BRANCHES)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("branches",), donate_argnums=(2,))
def run_program_batched(geo, prog, st, n_instr, max_steps, branches=BATCH_BRANCHES):
    """The interpreter over a batch (``branches``: a subset of :data:`BATCH_BRANCHES`, see
    :func:`plena.emu_jax.dispatch.branches_for`)."""
    axes = state_axes()
    body = jax.vmap(functools.partial(step, geo, prog, branches=branches), in_axes=(axes,), out_axes=axes)

    def cond(s):
        return (s.pc < n_instr) & (s.err == 0) & ((s.steps < max_steps) | (s.sub != 0))

    return lax.while_loop(cond, body, st)


@dataclasses.dataclass
class BatchResult:
    cfg: PlenaConfig
    state: MachineState  # data fields carry a leading batch axis
    size: int
    instructions: int  # per input set
    opcode_counts: dict
    cycles: int
    compile_s: float
    run_s: float

    def dumps(self, i: int, *, with_hbm: bool = False) -> Dumps:
        s = self.state
        return Dumps(vram=np.asarray(s.vram[i, :-1]).reshape(-1),
                     mram=mram_dump_bits(np.asarray(s.mram[i, :-1]).reshape(-1), self.cfg),
                     fpsram=np.asarray(s.fpsram[i]), intsram=np.asarray(s.intsram),
                     hbm=np.asarray(s.hbm[i]) if with_hbm else None, **dump_types(self.cfg))


def _stack_states(states: list[MachineState]) -> MachineState:
    def pick(name, leaves):
        if name in DATA_FIELDS:
            return jnp.stack(leaves)
        first = leaves[0]
        if any(not np.array_equal(np.asarray(first), np.asarray(x)) for x in leaves[1:]):
            raise BatchDivergence(f"input sets differ in {name} (only data preloads may differ; "
                                  "INT SRAM must be shared)")
        return first
    return MachineState(*(pick(name, [getattr(s, name) for s in states]) for name in MachineState._fields))


def _shard(st: MachineState, devices) -> MachineState:
    mesh = Mesh(np.asarray(devices), ("batch",))
    batched = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    return MachineState(*(jax.device_put(x, batched if name in DATA_FIELDS else replicated)
                          for name, x in zip(MachineState._fields, st)))


@contextlib.contextmanager
def _divergence_as_error():
    """vmap's complaint that an unbatched (control) output became data-dependent, as a
    :class:`BatchDivergence`."""
    try:
        yield
    except ValueError as exc:
        if "out_axes" in str(exc) or "vmap" in str(exc):
            raise BatchDivergence("the program's control flow depends on tensor data (e.g. V_TOPK results "
                                  "used as addresses); run the input sets separately") from exc
        raise


def _initial_states(geo, inputs, devices) -> MachineState:
    st = _stack_states([init_state(geo, hbm_capacity=x.capacity, hbm=x.hbm, fpsram=x.fpsram, intsram=x.intsram,
                                   vram=x.vram) for x in inputs])
    return _shard(st, devices) if devices is not None and len(devices) > 1 else st


def run_batch(program, cfg: PlenaConfig | None = None, *, hbm: Sequence, fpsram: Sequence | None = None,
              intsram=None, vram: Sequence | None = None, hbm_size: int | None = None,
              devices=None, max_steps: int | None = None, executor: str = "auto",
              fast_options: dict | None = None) -> BatchResult:
    """Run one program over B input sets (lists of per-set HBM / FP SRAM / VRAM preloads;
    INT SRAM is shared). With `devices` (e.g. jax.devices()), the batch is sharded over them.
    ``executor`` as in :func:`plena.emu_jax.api.run`: the specialising executor's blocks are
    vmapped the same way as the interpreter."""
    enable_compilation_cache()
    cfg = cfg or default_config()
    check_formats(cfg)
    prog = program if isinstance(program, DecodedProgram) else load_program(program)
    if np.any(prog.opcode == _TOPK):
        raise BatchDivergence("the program uses V_TOPK, whose results can steer control flow; "
                              "run its input sets separately")
    size = len(hbm)
    inputs = [check_inputs(cfg, hbm=hbm[i], fpsram=None if fpsram is None else fpsram[i], intsram=intsram,
                           vram=None if vram is None else vram[i], hbm_size=hbm_size) for i in range(size)]
    plan = plan_program(prog, cfg, inputs[0].intsram)
    geo = geometry_for(prog, cfg, plan, hbm_len=max(len(x.hbm) for x in inputs),
                       vram_len=max(0 if x.vram is None else len(x.vram) for x in inputs),
                       hbm_capacity=inputs[0].capacity)
    st = _initial_states(geo, inputs, devices)
    fields, n, limit = program_fields(prog, geo), jnp.int32(len(prog)), step_limit(max_steps)
    t0 = time.perf_counter()
    ex = None

    def prepare_fast(state, **extra):
        with _divergence_as_error():
            return fast.prepare(prog, geo, state, batch_axes=state_axes(), intsram=inputs[0].intsram,
                                **{**(fast_options or {}), **extra})

    if use_fast(executor, plan, max_steps):
        ex = prepare_fast(st)

    def interpreter_for(executable, state):
        """The batched interpreter with branches for the cold code of ``executable`` (the fast
        executor's; None: the whole program), or None when that has no cold code."""
        branches = dispatch.branches_for(_cold_opcodes(prog, executable))  # never V_TOPK (rejected above)
        key = ("batch", geo, size, None if devices is None else tuple(devices), branches)
        if key not in _COMPILED and (executable is None or any(isinstance(s, fast.Interp) for s in executable.steps)):
            with _divergence_as_error():
                _COMPILED[key] = run_program_batched.lower(geo, fields, state, n, limit, branches=branches).compile()
        return _COMPILED.get(key)

    compiled = interpreter_for(ex, st)
    t1 = time.perf_counter()
    if ex is None:
        final = compiled(fields, st, n, limit)
    else:
        final = fast.execute(ex, compiled, fields, st)
        # loops run as lanes: their conflict check reads addresses only, which the batch shares,
        # so a conflict is the whole batch's; it is redone without lanes (as api.run does)
        if int(final.err) == Err.LANE_CONFLICT:
            st = _initial_states(geo, inputs, devices)
            ex = prepare_fast(st, lanes=False)
            final = fast.execute(ex, interpreter_for(ex, st), fields, st)
    jax.block_until_ready(final)
    t2 = time.perf_counter()
    if ex is not None:
        final = fast.finish_state(final, plan, len(prog))
    opcode_counts, cycles = finish(prog, final, cfg)
    return BatchResult(cfg=cfg, state=final, size=size, instructions=int(final.steps),
                       opcode_counts=opcode_counts, cycles=cycles, compile_s=t1 - t0, run_s=t2 - t1)
