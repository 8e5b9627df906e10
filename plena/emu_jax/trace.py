"""Instruction traces: run a program recording what every executed instruction did.

    result, trace = run_traced(words, cfg, hbm=..., fpsram=..., intsram=...)
    trace.save("run.trace.npz")          # or "run.trace.jsonl" (one JSON object per line)
    Trace.load("run.trace.npz")

The traced run is a jitted ``lax.while_loop`` over :func:`plena.emu_jax.interpreter.step`
(the same step the normal run uses, so the final state is exactly :func:`api.run`'s) that
writes one record per *executed instruction* into a preallocated buffer of ``chunk``
records; the host drains the buffer after each chunk, so device memory stays bounded
whatever the run length. Multi-row instructions (H_PREFETCH_*, H_STORE_V, M_*MM_WO, ...) run
as several micro-steps; their record is written when the instruction completes, with the
windows of all its micro-steps merged.

A record holds:

* ``pc`` (the opcode and instruction word follow from the program);
* the registers after the instruction: gp0-15, f0-7 (bf16 bits), a0-15 (64-bit), SCALE,
  STRIDE, V_MASK. The trace stores them sparsely: the initial values plus one event
  ``(instruction, register, new value)`` per change;
* for every memory it wrote (``vram`` rows, ``mram`` rows numbered ``tile * MLEN + row``,
  ``hbm`` element bytes, ``hbm_scale`` scale bytes, ``fpsram`` / ``intsram`` entries) the
  window ``[lo, hi)`` and a u32 content hash of the data written (computed in JAX; it mixes
  every written element with its address, so it changes when any written bit changes);
* HBM 64-byte blocks read / written and the V_TOPK expert count (for per-pc profiles).

How the record is taken: the interpreter's step is split into :func:`effect_of` (dispatch)
and :func:`apply_effect` (commit); the traced loop calls both and records the Effect in
between, so the state update (write masking, micro-steps, errors, counters) is the
interpreter's, unchanged. The normal path (:func:`api.run`) does not record anything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from plena.config import PlenaConfig, default_config
from plena.emu_jax import api
from plena.emu_jax.cache import enable_compilation_cache
from plena.emu_jax.effects import Effect, Fields
from plena.emu_jax.errors import Err, PlenaError
from plena.emu_jax.interpreter import apply_effect, effect_of
from plena.emu_jax.ops_hbm import check_formats
from plena.emu_jax.plan import Plan, plan_program
from plena.emu_jax.state import Geometry, MachineState, init_state
from plena.isa.encoding import DecodedProgram

__all__ = ["Trace", "run_traced", "prepare", "Prepared", "result_of", "trace_chunk", "REG_NAMES", "MEMORIES",
           "DEFAULT_CHUNK", "TraceFormatError"]

REG_NAMES = ([f"gp{i}" for i in range(16)] + [f"f{i}" for i in range(8)] + [f"a{i}" for i in range(16)]
             + ["SCALE", "STRIDE", "VMASK"])
N_REGS = len(REG_NAMES)
MEMORIES = ("vram", "mram", "hbm", "hbm_scale", "fpsram", "intsram")
MEM_UNITS = {"vram": "row", "mram": "row (tile*MLEN + row)", "hbm": "byte", "hbm_scale": "byte",
             "fpsram": "entry", "intsram": "entry"}
DEFAULT_CHUNK = 1 << 14  # records per device buffer (~5 MiB)
FORMAT, VERSION = "plena-trace", 1

U32, I32 = jnp.uint32, jnp.int32
_NONE_LO = np.iinfo(np.int32).max


class TraceFormatError(ValueError):
    """A file that is not a trace written by :meth:`Trace.save`."""


# ---------------------------------------------------------------------------------------------
# preparing a run exactly as api.run does
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Prepared:
    """Everything :func:`api.run` sets up before it starts the loop."""

    cfg: PlenaConfig
    prog: DecodedProgram
    plan: Plan
    geo: Geometry
    state: MachineState
    fields: Fields
    n_instr: jnp.ndarray
    limit: jnp.ndarray
    load_s: float


def prepare(program, cfg: PlenaConfig | None = None, *, hbm=None, fpsram=None, intsram=None, vram=None,
            hbm_size: int | None = None, max_steps: int | None = None) -> Prepared:
    """Load, check and plan a program like :func:`plena.emu_jax.api.run` (same errors)."""
    t0 = time.perf_counter()
    enable_compilation_cache()
    cfg = cfg or default_config()
    check_formats(cfg)
    prog = program if isinstance(program, DecodedProgram) else api.load_program(program)
    inp = api.check_inputs(cfg, hbm=hbm, fpsram=fpsram, intsram=intsram, vram=vram, hbm_size=hbm_size)
    plan = plan_program(prog, cfg, inp.intsram)
    geo = api.geometry_for(prog, cfg, plan, hbm_len=len(inp.hbm),
                           vram_len=0 if inp.vram is None else len(inp.vram), hbm_capacity=inp.capacity)
    st = init_state(geo, hbm_capacity=inp.capacity, hbm=inp.hbm, fpsram=inp.fpsram, intsram=inp.intsram,
                    vram=inp.vram)
    return Prepared(cfg, prog, plan, geo, st, api.program_fields(prog, geo), jnp.int32(len(prog)),
                    api.step_limit(max_steps), time.perf_counter() - t0)


def result_of(p: Prepared, final: MachineState, compile_s: float, run_s: float) -> api.RunResult:
    """The :class:`api.RunResult` of a finished run (raises its PlenaError, like api.run)."""
    opcode_counts, cycles = api.finish(p.prog, final, p.cfg)
    return api.RunResult(
        cfg=p.cfg, geometry=p.geo, state=final, plan=p.plan, instructions=int(final.steps),
        opcode_counts=opcode_counts, cycles=cycles,
        hbm_bytes_read=64 * int(final.hbm_rd_blocks), hbm_bytes_written=64 * int(final.hbm_wr_blocks),
        load_s=p.load_s, compile_s=compile_s, run_s=run_s)


# ---------------------------------------------------------------------------------------------
# the traced loop (device side)
# ---------------------------------------------------------------------------------------------

def _fmix(h):
    """murmur3's 32-bit finaliser (a bijective avalanche mix)."""
    h = h ^ (h >> 16)
    h = h * U32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * U32(0xC2B2AE35)
    return h ^ (h >> 16)


def _hash_at(words, addr0):
    """Hash of u32 ``words`` stored at consecutive addresses from ``addr0``."""
    pos = addr0.astype(U32) + jnp.arange(words.shape[0], dtype=U32)
    return jnp.sum(_fmix(words.astype(U32) ^ _fmix(pos * U32(0x9E3779B1) + U32(0x7F4A7C15))), dtype=U32)


class _Acc(NamedTuple):
    lo: jnp.ndarray  # i32[len(MEMORIES)] (INT32_MAX = nothing written)
    hi: jnp.ndarray  # i32[len(MEMORIES)] exclusive end (-1 = nothing written)
    hash: jnp.ndarray  # u32[len(MEMORIES)]
    rd: jnp.ndarray  # u32 HBM blocks read
    wr: jnp.ndarray  # u32 HBM blocks written
    topk: jnp.ndarray  # i32 experts ranked by V_TOPK


def _empty_acc() -> _Acc:
    m = len(MEMORIES)
    return _Acc(jnp.full(m, _NONE_LO, I32), jnp.full(m, -1, I32), jnp.zeros(m, U32), U32(0), U32(0), I32(0))


class _Rec(NamedTuple):
    pc: jnp.ndarray
    gp: jnp.ndarray
    fp: jnp.ndarray
    a_hi: jnp.ndarray
    a_lo: jnp.ndarray
    special: jnp.ndarray  # u32[3] SCALE, STRIDE, VMASK
    acc: _Acc


def _writes(geo: Geometry, eff: Effect, ok):
    """(written?, lo, hi, hash) per memory for this micro-step's effect."""
    c = geo.cfg
    nb = eff.hbm_s_data.shape[0]
    vrow, tile, e_idx, s_idx = eff.vram_row, eff.mram_tile, eff.hbm_e_idx, eff.hbm_s_idx
    mrow = tile * c.mlen + eff.mram_row

    def sram(idx, val):
        valid = ok & (idx >= 0) & (idx < 1024)
        h = jnp.sum(jnp.where(valid, _fmix(val.astype(U32) ^ _fmix(idx.astype(U32) * U32(0x9E3779B1))), U32(0)),
                    dtype=U32)
        return (jnp.any(valid), jnp.min(jnp.where(valid, idx, _NONE_LO)), jnp.max(jnp.where(valid, idx + 1, -1)), h)

    rows = [
        (ok & (vrow < geo.vram_rows), vrow, vrow + 1, _hash_at(eff.vram_data, vrow * c.vlen)),
        (ok & (tile < geo.mram_tiles), mrow, mrow + 1,
         _hash_at(lax.bitcast_convert_type(eff.mram_data, U32), mrow * c.mlen)),
        (ok & (e_idx < geo.hbm_bytes), e_idx, e_idx + eff.hbm_e_data.shape[0], _hash_at(eff.hbm_e_data, e_idx)),
        (ok & (s_idx < geo.hbm_bytes), s_idx, s_idx + nb, _hash_at(eff.hbm_s_data, s_idx)),
        sram(eff.fps_idx, eff.fps_val),
        sram(eff.ints_idx, eff.ints_val),
    ]
    w = jnp.stack([r[0] for r in rows])
    lo = jnp.stack([jnp.asarray(r[1], I32) for r in rows])
    hi = jnp.stack([jnp.asarray(r[2], I32) for r in rows])
    h = jnp.stack([jnp.asarray(r[3], U32) for r in rows])
    return w, lo, hi, h


def _traced_step(geo: Geometry, prog: Fields, carry):
    st, acc, buf, k = carry
    f, st1, over_budget, skip, eff = effect_of(geo, prog, st)
    new = apply_effect(geo, st, f, st1, over_budget, skip, eff)
    ok = new.err == 0
    w, lo, hi, h = _writes(geo, eff, ok)
    acc = _Acc(
        lo=jnp.minimum(acc.lo, jnp.where(w, lo, _NONE_LO)), hi=jnp.maximum(acc.hi, jnp.where(w, hi, -1)),
        hash=acc.hash + jnp.where(w, h, U32(0)),
        rd=acc.rd + (new.hbm_rd_blocks - st.hbm_rd_blocks), wr=acc.wr + (new.hbm_wr_blocks - st.hbm_wr_blocks),
        topk=acc.topk + (new.topk_experts - st.topk_experts))
    rec = _Rec(pc=st.pc, gp=new.gp, fp=new.fp, a_hi=new.a_hi, a_lo=new.a_lo,
               special=jnp.stack([new.scale, new.stride, new.vmask]).astype(U32), acc=acc)
    # Slot k is rewritten by every micro-step of the instruction; k moves on when it completes.
    buf = jax.tree_util.tree_map(lambda b, r: lax.dynamic_update_index_in_dim(b, r, k, 0), buf, rec)
    done = new.sub == 0  # completed, or stopped by an error (sub is reset then too)
    acc = jax.tree_util.tree_map(lambda e, a: jnp.where(done, e, a), _empty_acc(), acc)
    return new, acc, buf, k + done.astype(I32)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def trace_chunk(geo: Geometry, size: int, prog: Fields, st: MachineState, n_instr, max_steps, cap):
    """Run from ``st`` (at an instruction boundary) until ``cap`` (<= ``size``, the static
    buffer length) instructions have completed or the run stops (as :func:`run_program`
    would); returns (state, records, count)."""
    proto = _Rec(pc=I32(0), gp=st.gp, fp=st.fp, a_hi=st.a_hi, a_lo=st.a_lo, special=jnp.zeros(3, U32),
                 acc=_empty_acc())
    buf = jax.tree_util.tree_map(lambda x: jnp.zeros((size,) + x.shape, x.dtype), proto)
    cap = jnp.minimum(cap, size)

    def cond(c):
        s, _, _, k = c
        return (s.pc < n_instr) & (s.err == 0) & ((s.steps < max_steps) | (s.sub != 0)) & (k < cap)

    st, _, buf, k = lax.while_loop(cond, functools.partial(_traced_step, geo, prog),
                                   (st, _empty_acc(), buf, I32(0)))
    return st, buf, k


# ---------------------------------------------------------------------------------------------
# the trace (host side)
# ---------------------------------------------------------------------------------------------

def _regs_dense(gp, fp, a_hi, a_lo, special) -> np.ndarray:
    """[n, N_REGS] u64 register values from the device record columns."""
    a = (np.asarray(a_hi, np.uint64) << np.uint64(32)) | np.asarray(a_lo, np.uint64)
    return np.concatenate([np.asarray(gp, np.uint64), np.asarray(fp, np.uint64), a,
                           np.asarray(special, np.uint64)], axis=-1)


def _empty(dtype) -> np.ndarray:
    return np.zeros(0, dtype)


@dataclasses.dataclass
class Trace:
    """The executed-instruction trace of one run (numpy arrays, sparse events).

    Attributes:
        words: u32 program words (for disassembly and the executed instruction words).
        pc: i32[n] pc of executed instruction i (i = 0 .. n-1, in execution order).
        reg_init: u64[N_REGS] register values before the first instruction.
        reg_idx, reg_id, reg_val: register change events (instruction, REG_NAMES index, value
            after it), sorted by (instruction, register).
        w_idx, w_mem, w_lo, w_hi, w_hash: memory write events (instruction, MEMORIES index,
            window [lo, hi) in that memory's unit, content hash), sorted by (instruction, memory).
        c_idx, c_rd, c_wr, c_topk: counter events for instructions that read/wrote HBM blocks or
            ranked V_TOPK experts.
        error: None, or {"code", "rule", "pc", "message"} for a run stopped by a panic (the last
            record is the faulting instruction; its own effects are discarded).
        meta: free-form run description (config, geometry, limits).
    """

    words: np.ndarray
    pc: np.ndarray
    reg_init: np.ndarray
    reg_idx: np.ndarray
    reg_id: np.ndarray
    reg_val: np.ndarray
    w_idx: np.ndarray
    w_mem: np.ndarray
    w_lo: np.ndarray
    w_hi: np.ndarray
    w_hash: np.ndarray
    c_idx: np.ndarray
    c_rd: np.ndarray
    c_wr: np.ndarray
    c_topk: np.ndarray
    error: Optional[dict] = None
    meta: dict = dataclasses.field(default_factory=dict)

    ARRAYS = ("words", "pc", "reg_init", "reg_idx", "reg_id", "reg_val", "w_idx", "w_mem", "w_lo", "w_hi",
              "w_hash", "c_idx", "c_rd", "c_wr", "c_topk")
    DTYPES = dict(words=np.uint32, pc=np.int32, reg_init=np.uint64, reg_idx=np.int64, reg_id=np.uint8,
                  reg_val=np.uint64, w_idx=np.int64, w_mem=np.uint8, w_lo=np.int64, w_hi=np.int64,
                  w_hash=np.uint32, c_idx=np.int64, c_rd=np.int64, c_wr=np.int64, c_topk=np.int64)

    def __len__(self) -> int:
        return int(self.pc.shape[0])

    # -- queries -----------------------------------------------------------------------------

    @property
    def instr_words(self) -> np.ndarray:
        """u32[n]: the instruction word executed at each step."""
        return self.words[self.pc] if len(self) else _empty(np.uint32)

    @property
    def opcodes(self) -> np.ndarray:
        """u8[n]: opcode of each executed instruction."""
        return (self.instr_words & np.uint32(0x3F)).astype(np.uint8)

    def registers_after(self, i: int) -> np.ndarray:
        """u64[N_REGS]: every register after instruction ``i`` (``i = -1``: initial values)."""
        regs = self.reg_init.copy()
        p = int(np.searchsorted(self.reg_idx, i, side="right"))
        last = np.full(N_REGS, -1, np.int64)
        np.maximum.at(last, self.reg_id[:p].astype(np.int64), np.arange(p))
        have = last >= 0
        regs[have] = self.reg_val[last[have]]
        return regs

    def writes_of(self, i: int) -> dict:
        """{memory: (lo, hi, hash)} written by instruction ``i``."""
        a, b = np.searchsorted(self.w_idx, [i, i + 1])
        return {MEMORIES[int(self.w_mem[j])]: (int(self.w_lo[j]), int(self.w_hi[j]), int(self.w_hash[j]))
                for j in range(a, b)}

    def counters_of(self, i: int) -> dict:
        a, b = np.searchsorted(self.c_idx, [i, i + 1])
        if a == b:
            return {}
        out = {"hbm_rd_blocks": int(self.c_rd[a]), "hbm_wr_blocks": int(self.c_wr[a]),
               "topk_experts": int(self.c_topk[a])}
        return {k: v for k, v in out.items() if v}

    def record(self, i: int) -> dict:
        """Instruction ``i`` as one JSON-able dict (changed registers only)."""
        from plena.isa.disassembler import disassemble_word

        a, b = np.searchsorted(self.reg_idx, [i, i + 1])
        pc = int(self.pc[i])
        out = {"i": i, "pc": pc, "asm": disassemble_word(int(self.words[pc]))}
        regs = {REG_NAMES[int(self.reg_id[j])]: int(self.reg_val[j]) for j in range(a, b)}
        if regs:
            out["regs"] = regs
        writes = self.writes_of(i)
        if writes:
            out["writes"] = {m: list(v) for m, v in writes.items()}
        out.update(self.counters_of(i))
        return out

    # -- files -------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write ``path``: ``.jsonl`` = a header line then one JSON object per instruction;
        anything else = a compressed ``.npz`` of the arrays."""
        path = Path(path)
        header = {"format": FORMAT, "version": VERSION, "instructions": len(self), "error": self.error,
                  "meta": self.meta}
        if path.suffix == ".jsonl":
            with path.open("w") as fh:
                fh.write(json.dumps({**header, "words": [int(w) for w in self.words],
                                     "reg_init": {REG_NAMES[r]: int(v) for r, v in enumerate(self.reg_init)}}) + "\n")
                for i in range(len(self)):
                    fh.write(json.dumps(self.record(i)) + "\n")
            return path
        arrays = {k: getattr(self, k) for k in self.ARRAYS}
        with path.open("wb") as fh:  # a file object: numpy would otherwise append ".npz"
            np.savez_compressed(fh, header=np.array(json.dumps(header)), **arrays)
        return path

    @classmethod
    def load(cls, path) -> "Trace":
        path = Path(path)
        with path.open("rb") as fh:
            magic = fh.read(2)
        if magic == b"PK":
            with np.load(path, allow_pickle=False) as z:
                try:
                    header = json.loads(str(z["header"]))
                    arrays = {k: z[k].astype(cls.DTYPES[k]) for k in cls.ARRAYS}
                except KeyError as exc:
                    raise TraceFormatError(f"{path}: not a plena trace (missing {exc})") from None
            cls._check_header(path, header)
            return cls(**arrays, error=header.get("error"), meta=header.get("meta", {}))
        return cls._load_jsonl(path)

    @staticmethod
    def _check_header(path, header) -> None:
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
            raise TraceFormatError(f"{path}: not a {FORMAT} v{VERSION} file")

    @classmethod
    def _load_jsonl(cls, path: Path) -> "Trace":
        with path.open() as fh:
            try:
                header = json.loads(fh.readline())
                lines = [json.loads(line) for line in fh if line.strip()]
            except json.JSONDecodeError as exc:
                raise TraceFormatError(f"{path}: not a plena trace ({exc})") from None
        cls._check_header(path, header)
        reg_ix = {n: i for i, n in enumerate(REG_NAMES)}
        mem_ix = {n: i for i, n in enumerate(MEMORIES)}
        regs, writes, counters = [], [], []
        for rec in lines:
            i = rec["i"]
            regs += sorted((i, reg_ix[n], v) for n, v in rec.get("regs", {}).items())
            writes += sorted((i, mem_ix[m], *v) for m, v in rec.get("writes", {}).items())
            if any(k in rec for k in ("hbm_rd_blocks", "hbm_wr_blocks", "topk_experts")):
                counters.append((i, rec.get("hbm_rd_blocks", 0), rec.get("hbm_wr_blocks", 0),
                                 rec.get("topk_experts", 0)))

        def cols(rows, names):  # explicit dtypes: u64 register values do not survive a float detour
            return {k: np.array([r[j] for r in rows], dtype=cls.DTYPES[k]) for j, k in enumerate(names)}

        d = cols([(h,) for h in header["words"]], ("words",))
        d.update(cols([(r["pc"],) for r in lines], ("pc",)))
        d.update(cols([(header["reg_init"][n],) for n in REG_NAMES], ("reg_init",)))
        d.update(cols(regs, ("reg_idx", "reg_id", "reg_val")))
        d.update(cols(writes, ("w_idx", "w_mem", "w_lo", "w_hi", "w_hash")))
        d.update(cols(counters, ("c_idx", "c_rd", "c_wr", "c_topk")))
        return cls(**d, error=header.get("error"), meta=header.get("meta", {}))


class _Builder:
    """Accumulates the device chunks into sparse host arrays."""

    def __init__(self, words: np.ndarray, reg_init: np.ndarray):
        self.words, self.reg_init = words, reg_init
        self.prev = reg_init
        self.n = 0
        self.parts: dict[str, list] = {k: [] for k in Trace.ARRAYS if k not in ("words", "reg_init")}

    def add(self, buf: _Rec, k: int) -> None:
        if k == 0:
            return
        b = jax.tree_util.tree_map(lambda x: np.asarray(x[:k]), jax.device_get(buf))
        regs = _regs_dense(b.gp, b.fp, b.a_hi, b.a_lo, b.special)
        before = np.concatenate([self.prev[None], regs[:-1]])
        ri, rr = np.nonzero(regs != before)
        p = self.parts
        p["pc"].append(b.pc.astype(np.int32))
        p["reg_idx"].append(ri + self.n)
        p["reg_id"].append(rr.astype(np.uint8))
        p["reg_val"].append(regs[ri, rr])
        wi, wm = np.nonzero(b.acc.hi >= 0)
        p["w_idx"].append(wi + self.n)
        p["w_mem"].append(wm.astype(np.uint8))
        p["w_lo"].append(b.acc.lo[wi, wm].astype(np.int64))
        p["w_hi"].append(b.acc.hi[wi, wm].astype(np.int64))
        p["w_hash"].append(b.acc.hash[wi, wm].astype(np.uint32))
        ci = np.flatnonzero((b.acc.rd != 0) | (b.acc.wr != 0) | (b.acc.topk != 0))
        p["c_idx"].append(ci + self.n)
        p["c_rd"].append(b.acc.rd[ci].astype(np.int64))
        p["c_wr"].append(b.acc.wr[ci].astype(np.int64))
        p["c_topk"].append(b.acc.topk[ci].astype(np.int64))
        self.prev = regs[-1]
        self.n += k

    def build(self, error=None, meta=None) -> Trace:
        arrays = {k: (np.concatenate(v) if v else _empty(Trace.DTYPES[k])).astype(Trace.DTYPES[k])
                  for k, v in self.parts.items()}
        return Trace(words=self.words.astype(np.uint32), reg_init=self.reg_init, **arrays, error=error,
                     meta=meta or {})


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------

_COMPILED: dict = {}  # (Geometry, buffer size) -> compiled trace_chunk

ProgressFn = Callable[[int, Optional[int]], None]  # (instructions done, expected total or None)


def run_traced(program, cfg: PlenaConfig | None = None, *, hbm=None, fpsram=None, intsram=None, vram=None,
               hbm_size: int | None = None, max_steps: int | None = None, chunk: int = DEFAULT_CHUNK,
               progress: ProgressFn | None = None) -> tuple[api.RunResult, Trace]:
    """Run like :func:`plena.emu_jax.api.run` (same arguments, same final state and result),
    recording every executed instruction. Returns ``(result, trace)``.

    ``chunk`` records are buffered on the device between host transfers; ``progress`` is
    called after every chunk. A panic raises the same :class:`PlenaError` as ``api.run``,
    with the trace up to and including the faulting instruction attached as ``exc.trace``.
    """
    p = prepare(program, cfg, hbm=hbm, fpsram=fpsram, intsram=intsram, vram=vram, hbm_size=hbm_size,
                max_steps=max_steps)
    st = p.state
    reg_init = _regs_dense(st.gp, st.fp, st.a_hi, st.a_lo,
                           np.array([st.scale, st.stride, st.vmask], np.uint32))
    builder = _Builder(np.asarray(p.prog.word), reg_init)
    total = p.plan.dynamic_instructions if p.plan.exact else None
    if total is not None and max_steps is not None:
        total = min(total, max_steps)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    size = max(chunk, DEFAULT_CHUNK)  # one buffer shape (one compile) for every chunk <= the default
    if progress is not None:
        progress(0, total)
    t1 = time.perf_counter()
    compiled = _COMPILED.get((p.geo, size))
    if compiled is None:
        compiled = _COMPILED[(p.geo, size)] = trace_chunk.lower(p.geo, size, p.fields, st, p.n_instr, p.limit,
                                                                jnp.int32(chunk)).compile()
    t2 = time.perf_counter()
    while True:
        st, buf, k = compiled(p.fields, st, p.n_instr, p.limit, jnp.int32(chunk))
        k = int(k)
        builder.add(buf, k)
        if progress is not None:
            progress(builder.n, total)
        if k < chunk:
            break
    jax.block_until_ready(st)
    t3 = time.perf_counter()
    meta = {"config": p.cfg.describe() if hasattr(p.cfg, "describe") else str(p.cfg),
            "geometry": {"vram_rows": p.geo.vram_rows, "hbm_bytes": p.geo.hbm_bytes},
            "max_steps": max_steps, "chunk": chunk}
    error = None
    err = int(st.err)
    if err != Err.NONE:
        err_pc = int(st.err_pc)
        error = {"code": err, "rule": Err(err).name, "pc": err_pc,
                 "instruction": str(p.prog.instr(err_pc))}
    trace = builder.build(error=error, meta=meta)
    try:
        result = result_of(p, st, t2 - t1, t3 - t2)
    except PlenaError as exc:
        if trace.error is not None:
            trace.error["message"] = str(exc)
        exc.trace = trace
        raise
    return result, trace
