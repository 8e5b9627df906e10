"""Per-stage profiles and progress reporting for long runs.

**Stages.** A stage is a named set of program counters. :func:`stages_from_asm` reads them from
the ``;`` comments of the assembly source: the frontend writes a ``; stage: NAME`` line before
each stage (``; end stage`` returns to the unlabelled ``other``); ``rules`` map comment
substrings to stage names the way the reference's routed-MoE stage profiler labels upstream
programs; ``all_comments`` makes every whole-line comment start a stage named after its text
(useful for upstream programs without markers; repeated comments aggregate). A stage runs
from its label to the next label. :func:`stages_from_json` takes the exact ``[start, end)``
ranges a frontend ``tensors.json`` records. The pc of a line is the number of instruction
lines (non-blank after comment stripping, as :func:`plena.isa.assemble` counts) before it.

**Profile.** :class:`PcProfile` holds per-pc dynamic counts, HBM bytes and V_TOPK expert
counts, derived from an instruction trace (:mod:`plena.emu_jax.trace`). :func:`stage_profile`
aggregates it per stage into the JSON ``plena run --stage-profile FILE`` writes: dynamic
instructions, non-HBM cycles (the per-opcode costs of :mod:`plena.emu_jax.cycles`, spec §6),
HBM bytes read / written, and a share of the run's wall time. Wall time per stage cannot be
measured inside one jitted loop, so it is *estimated* proportionally to the stage's dynamic
instructions (the JSON says so).

**Progress.** The jitted loop never syncs with the host, so :func:`run_with_progress` runs the
normal compiled interpreter in chunks of instructions (its ``max_steps`` bound, raised chunk
by chunk; chunk sizes adapt to about ``target_s`` seconds each) and reports between chunks.
The sequence of steps, hence the final state, is exactly that of one unchunked
:func:`plena.emu_jax.api.run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from plena.config import PlenaConfig
from plena.emu_jax import api
from plena.emu_jax.cycles import per_opcode_cycles
from plena.emu_jax.dispatch import FP_DEST
from plena.isa.assembler import strip_comment

__all__ = ["StageMap", "stages_from_asm", "stages_from_json", "stages_for_program", "PcProfile",
           "stage_profile", "run_with_progress", "terminal_progress", "OTHER"]

OTHER = "other"
SCHEMA_VERSION = 1
_MARKER = re.compile(r"^\s*stage\s*:\s*(.*?)\s*$", re.IGNORECASE)
_END = re.compile(r"^\s*(end\s*stage|stage\s*end|endstage)\b", re.IGNORECASE)

TIME_CAVEAT = ("Per-stage seconds are estimates: the run's measured wall time (the jitted loop, "
               "excluding compilation) split in proportion to each stage's dynamic instruction count; "
               "a jitted run cannot be timed per instruction. non_hbm_cycles is exact for the "
               "reference's timing model (spec §6); HBM latency (Ramulator) is not modelled, HBM "
               "traffic is reported in bytes (64-byte blocks).")


# ---------------------------------------------------------------------------------------------
# stage maps
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StageMap:
    """The stage of every pc of a program."""

    names: list  # names[pc]
    labels: list  # (pc, name) in source order (name None = back to OTHER)
    source: str = ""

    def __len__(self) -> int:
        return len(self.names)

    def order(self) -> list:
        """Stage names in order of their first pc (OTHER where it first occurs)."""
        seen: dict = {}
        for n in self.names:
            seen.setdefault(n, None)
        return list(seen)

    def ranges(self, name: str) -> list:
        """The maximal ``[start, end)`` pc ranges of stage ``name``."""
        out, start = [], None
        for pc, n in enumerate(self.names + [None]):
            if n == name and start is None:
                start = pc
            elif n != name and start is not None:
                out.append([start, pc])
                start = None
        return out

    def fit(self, n_instr: int) -> "StageMap":
        """Pad (with OTHER) or cut to a program of ``n_instr`` instructions."""
        names = (self.names + [OTHER] * n_instr)[:n_instr]
        return StageMap(names, self.labels, self.source)


def _comment(line: str) -> Optional[str]:
    cuts = [c for c in (line.find(";"), line.find("//")) if c != -1]
    if not cuts:
        return None
    cut = min(cuts)
    return line[cut + (2 if line.startswith("//", cut) else 1):]


def stages_from_asm(text: str, *, rules: Iterable[tuple[str, str]] = (), all_comments: bool = False,
                    source: str = "") -> StageMap:
    """Stage of every instruction of assembly ``text`` (see the module docstring)."""
    rules = list(rules)
    names: list = []
    labels: list = []
    current = OTHER
    for line in text.splitlines():
        comment = _comment(line)
        is_instr = bool(strip_comment(line))
        if comment is not None:
            label: Optional[str] = None
            found = False
            m = _MARKER.match(comment)
            if m and m.group(1):
                label, found = m.group(1), True
            elif _END.match(comment):
                label, found = None, True
            else:
                for sub, name in rules:
                    if sub in comment:
                        label, found = name, True
                        break
                else:
                    if all_comments and not is_instr and comment.strip():
                        label, found = comment.strip(), True
            if found:
                labels.append((len(names), label))
                current = label if label is not None else OTHER
        if is_instr:
            names.append(current)
    return StageMap(names, labels, source)


def stages_from_json(meta, n_instr: int, *, source: str = "") -> StageMap:
    """Stages from the ``stages`` of a frontend ``tensors.json`` (a path or its parsed dict):
    ``name -> {start, end}`` pc ranges; pcs in no range are OTHER."""
    if not isinstance(meta, dict):
        source = source or str(meta)
        meta = json.loads(Path(meta).read_text())
    names = [OTHER] * n_instr
    labels = []
    for name, st in sorted(meta.get("stages", {}).items(), key=lambda kv: kv[1]["start"]):
        start = int(st["start"])
        end = int(st["end"]) if st.get("end") is not None else n_instr
        for pc in range(max(start, 0), min(end, n_instr)):
            names[pc] = name
        labels.append((start, name))
    return StageMap(names, labels, source)


def stages_for_program(opcode_path, n_instr: int, stage_source=None, *, rules=(),
                       all_comments: bool = False) -> StageMap:
    """The stage map for a program file: from ``stage_source`` (an .asm, or a .json with
    ``stages``) if given, else found next to ``opcode_path``: the program itself if it is
    assembly, a ``tensors.json`` with stages, or an .asm of the same name / ``program.asm``."""
    cands = []
    if stage_source is not None:
        cands = [Path(stage_source)]
    else:
        op = Path(opcode_path)
        if op.suffix == ".asm":
            cands.append(op)
        tj = op.parent / "tensors.json"
        if tj.exists() and not rules and not all_comments:
            try:
                if json.loads(tj.read_text()).get("stages"):
                    cands.append(tj)
            except (ValueError, OSError):
                pass
        cands += [op.with_suffix(".asm"), op.parent / "program.asm"]
    for path in cands:
        if path.suffix == ".json" and path.exists():
            return stages_from_json(path, n_instr, source=str(path))
        if path.exists():
            return stages_from_asm(path.read_text(), rules=rules, all_comments=all_comments,
                                   source=str(path)).fit(n_instr)
    if stage_source is not None:
        raise FileNotFoundError(f"stage source {stage_source} not found")
    return StageMap([OTHER] * n_instr, [], "")


# ---------------------------------------------------------------------------------------------
# per-pc and per-stage profiles
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PcProfile:
    """Per-pc totals of one run (arrays over the program's pcs)."""

    words: np.ndarray  # u32 program
    count: np.ndarray  # executions
    hbm_read: np.ndarray  # bytes
    hbm_written: np.ndarray
    topk_experts: np.ndarray

    @classmethod
    def from_trace(cls, trace) -> "PcProfile":
        n = len(trace.words)
        pcs = trace.pc.astype(np.int64)

        def per_pc(idx, vals):
            if not len(idx):
                return np.zeros(n, np.int64)
            return np.bincount(pcs[idx], weights=vals, minlength=n).astype(np.int64)[:n]

        return cls(words=np.asarray(trace.words, np.uint32),
                   count=np.bincount(pcs, minlength=n).astype(np.int64)[:n],
                   hbm_read=64 * per_pc(trace.c_idx, trace.c_rd), hbm_written=64 * per_pc(trace.c_idx, trace.c_wr),
                   topk_experts=per_pc(trace.c_idx, trace.c_topk))

    def cycles(self, cfg: PlenaConfig) -> np.ndarray:
        """Non-HBM cycles spent at each pc (spec §6; fp-destination ops with rd = 0 cost 0)."""
        ops = (self.words & np.uint32(0x3F)).astype(np.int64)
        rd = ((self.words >> np.uint32(6)) & np.uint32(0xF)).astype(np.int64)
        per = per_opcode_cycles(cfg)[ops]
        per = np.where(FP_DEST[ops] & (rd == 0), 0, per)
        return self.count * per + self.topk_experts * cfg.lat("VECTOR_MAX")


def stage_profile(pcp: PcProfile, stages: StageMap, cfg: PlenaConfig, *, wall_s: float) -> dict:
    """The stage-profile JSON (a dict) of a run."""
    n = len(pcp.words)
    stages = stages.fit(n)
    names = np.array(stages.names, dtype=object)
    cyc = pcp.cycles(cfg)
    tot = {"instructions": int(pcp.count.sum()), "cycles": int(cyc.sum()), "rd": int(pcp.hbm_read.sum()),
           "wr": int(pcp.hbm_written.sum())}
    frac = lambda x, t: (x / t) if t else 0.0  # noqa: E731
    out_stages = {}
    for name in stages.order():
        m = names == name
        ins = int(pcp.count[m].sum())
        out_stages[name] = {
            "pc_ranges": stages.ranges(name), "static_instructions": int(m.sum()), "instructions": ins,
            "instruction_fraction": frac(ins, tot["instructions"]),
            "non_hbm_cycles": int(cyc[m].sum()), "cycle_fraction": frac(int(cyc[m].sum()), tot["cycles"]),
            "hbm_bytes_read": int(pcp.hbm_read[m].sum()), "hbm_bytes_written": int(pcp.hbm_written[m].sum()),
            "seconds": wall_s * frac(ins, tot["instructions"]), "time_fraction": frac(ins, tot["instructions"]),
        }
    return {
        "schema_version": SCHEMA_VERSION, "generator": "plena-jax", "stage_source": stages.source,
        "label_count": len(stages.labels), "total_instructions_executed": tot["instructions"],
        "total_non_hbm_cycles": tot["cycles"], "total_profiled_seconds": wall_s,
        "total_hbm_bytes_read": tot["rd"], "total_hbm_bytes_written": tot["wr"],
        "seconds_are_estimated": True, "stages": out_stages, "caveat": TIME_CAVEAT,
    }


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------

ProgressFn = Callable[[int, Optional[int]], None]


def run_with_progress(program, cfg: PlenaConfig | None = None, *, hbm=None, fpsram=None, intsram=None,
                      vram=None, hbm_size: int | None = None, max_steps: int | None = None,
                      progress: ProgressFn | None = None, first_chunk: int = 4096,
                      target_s: float = 0.25, executor: str = "auto") -> api.RunResult:
    """:func:`api.run` in chunks of instructions, calling ``progress(done, total)`` between
    chunks (``total``: the pre-pass's dynamic instruction count, None when unknown). Same
    arguments, result, final state and errors as ``api.run``. Chunks start at ``first_chunk``
    instructions and adapt (never below that) towards ``target_s`` seconds each.

    With ``executor`` "auto" or "fast", a program the specialising executor can run is run by
    it (:func:`api.run` with ``progress``), which reports between its steps instead."""
    from plena.emu_jax.trace import prepare, result_of

    if executor != "interpreter" and max_steps is None:
        prog = program if isinstance(program, api.DecodedProgram) else api.load_program(program)
        plan = api.plan_program(prog, cfg or api.default_config(), None if intsram is None else
                                np.asarray(intsram, np.uint32).reshape(-1))
        if api.use_fast(executor, plan, max_steps):
            if progress is not None:
                progress(0, plan.dynamic_instructions)
            res = api.run(prog, cfg, hbm=hbm, fpsram=fpsram, intsram=intsram, vram=vram, hbm_size=hbm_size,
                          executor=executor, progress=progress)
            if progress is not None:
                progress(res.instructions, plan.dynamic_instructions)
            return res

    p = prepare(program, cfg, hbm=hbm, fpsram=fpsram, intsram=intsram, vram=vram, hbm_size=hbm_size,
                max_steps=max_steps)
    limit = int(p.limit)
    total = p.plan.dynamic_instructions if p.plan.exact else None
    if total is not None:
        total = min(total, limit)
    if progress is not None:
        progress(0, total)
    t1 = time.perf_counter()
    compiled = api.compiled_interpreter(p.geo, p.fields, p.state, p.n_instr, p.limit)  # the one api.run uses
    t2 = time.perf_counter()
    first_chunk = max(1, int(first_chunk))
    st, chunk, n = p.state, first_chunk, len(p.prog)
    while True:
        bound = min(int(st.steps) + chunk, limit)
        t = time.perf_counter()
        st = compiled(p.fields, st, p.n_instr, jnp.int32(bound))
        steps = int(st.steps)  # a host sync
        dt = time.perf_counter() - t
        if progress is not None:
            progress(steps, total)
        if steps < bound or bound >= limit or int(st.err) != 0 or int(st.pc) >= n:
            break
        chunk = int(min(max(chunk * min(4.0, max(0.25, target_s / max(dt, 1e-6))), first_chunk), 1 << 26))
    jax.block_until_ready(st)
    return result_of(p, st, t2 - t1, time.perf_counter() - t2)


@contextlib.contextmanager
def terminal_progress(enabled: bool = True, description: str = "running") -> Iterator[Optional[ProgressFn]]:
    """A rich progress bar on stderr; yields the ``progress(done, total)`` callback (None when
    disabled)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    cols = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("instructions"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=Console(file=sys.stderr), transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: Optional[int]) -> None:
            bar.update(task, completed=done, total=total)

        yield update
