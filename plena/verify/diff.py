"""Compare two runs: two instruction traces, or two folders of memory dumps.

* :func:`diff_traces` finds the first executed instruction at which two traces
  (:class:`plena.emu_jax.trace.Trace`) disagree: a different pc or instruction word, a register
  with a different value after it, a memory write to a different window or with different
  content (hash), different HBM traffic, or one run ending (or panicking) there.
* :func:`diff_dumps` compares the dump files of two runs (``vram_dump.bin``, ``mram_dump.bin``,
  ``fpsram_dump.bin``, ``intsram_dump.bin``, ``hbm_dump.bin``: ours or the reference
  emulator's) element by element, reading a shorter dump as zero-extended (our VRAM dump
  covers the emulated window only). With the ``tensors.json`` a frontend program writes, an
  element index is named as ``tensor[row, col]``.

Both return plain data with a ``report()`` text; ``plena diff A B`` prints it and exits 0
when the runs agree, 1 when they do not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from plena.numerics.bf16 import bf16_bits_to_f32_np
from plena.verify.dumps import FPSRAM_FILE, HBM_FILE, INTSRAM_FILE, MRAM_FILE, VRAM_FILE

__all__ = ["FieldDiff", "TraceDiff", "diff_traces", "MemoryDiff", "DumpDiff", "diff_dumps", "TensorMap"]

CHUNK = 1 << 22  # elements compared at a time (bounded memory on 512 MiB dumps)


# ---------------------------------------------------------------------------------------------
# traces
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FieldDiff:
    field: str  # "pc", "instruction", a register name, "write vram", "hbm traffic", "end"
    a: str
    b: str


@dataclasses.dataclass
class TraceDiff:
    """The first instruction (dynamic index) at which two traces differ, or none."""

    index: Optional[int]  # None: identical
    len_a: int
    len_b: int
    pc_a: Optional[int] = None
    pc_b: Optional[int] = None
    asm_a: str = ""
    asm_b: str = ""
    fields: list = dataclasses.field(default_factory=list)
    context: list = dataclasses.field(default_factory=list)  # (index, pc, asm) before it

    @property
    def identical(self) -> bool:
        return self.index is None

    def report(self) -> str:
        if self.identical:
            return f"traces identical ({self.len_a} instructions)"
        out = [f"first divergence at instruction #{self.index} (of {self.len_a} in A, {self.len_b} in B)"]
        for i, pc, asm in self.context:
            out.append(f"     #{i:<8} pc {pc:<6} {asm}")
        for side, pc, asm in (("A", self.pc_a, self.asm_a), ("B", self.pc_b, self.asm_b)):
            out.append(f"  {side}: #{self.index:<8} " + (f"pc {pc:<6} {asm}" if pc is not None else "(run ended)"))
        for f in self.fields:
            out.append(f"  {f.field}: A={f.a}  B={f.b}")
        return "\n".join(out)


def _first_event_diff(a_idx, a_cols, b_idx, b_cols) -> Optional[int]:
    """Instruction index of the first difference between two sorted event lists."""
    m = min(len(a_idx), len(b_idx))
    neq = a_idx[:m] != b_idx[:m]
    for ca, cb in zip(a_cols, b_cols):
        neq |= ca[:m] != cb[:m]
    j = int(np.argmax(neq)) if m and neq.any() else m
    if j < m:
        return int(min(a_idx[j], b_idx[j]))
    if len(a_idx) > m:
        return int(a_idx[m])
    if len(b_idx) > m:
        return int(b_idx[m])
    return None


def _fmt_reg(name: str, v: int) -> str:
    if name.startswith("f"):
        return f"{float(bf16_bits_to_f32_np(np.array([v], np.uint16))[0]):.6g} (0x{v:04X})"
    if name.startswith("a"):
        return f"0x{v:016X}"
    return f"{v} (0x{v:08X})"


def _fmt_write(mem: str, w) -> str:
    if w is None:
        return "no write"
    lo, hi, h = w
    return f"[{lo}, {hi}) hash 0x{h:08X}"


def diff_traces(a, b, *, context: int = 3) -> TraceDiff:
    """First difference between traces ``a`` and ``b`` (:class:`~plena.emu_jax.trace.Trace`)."""
    from plena.emu_jax.trace import MEMORIES, REG_NAMES
    from plena.isa.disassembler import disassemble_word

    na, nb = len(a), len(b)
    n = min(na, nb)
    cands = []
    wa, wb = a.instr_words[:n], b.instr_words[:n]
    step_neq = (a.pc[:n] != b.pc[:n]) | (wa != wb)
    if step_neq.any():
        cands.append(int(np.argmax(step_neq)))
    if not np.array_equal(a.reg_init, b.reg_init):
        cands.append(-1)
    for idx_a, cols_a, idx_b, cols_b in (
            (a.reg_idx, (a.reg_id, a.reg_val), b.reg_idx, (b.reg_id, b.reg_val)),
            (a.w_idx, (a.w_mem, a.w_lo, a.w_hi, a.w_hash), b.w_idx, (b.w_mem, b.w_lo, b.w_hi, b.w_hash)),
            (a.c_idx, (a.c_rd, a.c_wr, a.c_topk), b.c_idx, (b.c_rd, b.c_wr, b.c_topk))):
        c = _first_event_diff(idx_a, cols_a, idx_b, cols_b)
        if c is not None:
            cands.append(c)
    cands = [c for c in cands if c < n]
    if na != nb or (a.error or {}).get("code") != (b.error or {}).get("code"):
        cands.append(n - 1 if na == nb else n)  # same length, different panic: the last one
    if not cands:
        return TraceDiff(None, na, nb)
    i = max(min(cands), 0)
    d = TraceDiff(i, na, nb)
    if min(cands) < 0:  # different initial registers (preloads do not reach registers: unusual)
        for r in np.flatnonzero(a.reg_init != b.reg_init):
            name = REG_NAMES[r]
            d.fields.append(FieldDiff(f"initial {name}", _fmt_reg(name, int(a.reg_init[r])),
                                      _fmt_reg(name, int(b.reg_init[r]))))
    for t, side in ((a, "a"), (b, "b")):
        if i < len(t):
            pc = int(t.pc[i])
            setattr(d, f"pc_{side}", pc)
            setattr(d, f"asm_{side}", disassemble_word(int(t.words[pc])))
    d.context = [(j, int(a.pc[j]), disassemble_word(int(a.words[a.pc[j]]))) for j in range(max(0, i - context), i)]
    if i >= na or i >= nb:
        end = lambda t: "ended" if i >= len(t) else "continues"  # noqa: E731
        d.fields.append(FieldDiff("end", f"{end(a)} after {na} instructions{_err(a)}",
                                  f"{end(b)} after {nb} instructions{_err(b)}"))
        return d
    if d.pc_a != d.pc_b:
        d.fields.append(FieldDiff("pc", str(d.pc_a), str(d.pc_b)))
    if int(wa[i]) != int(wb[i]):
        d.fields.append(FieldDiff("instruction", f"0x{int(wa[i]):08X}", f"0x{int(wb[i]):08X}"))
    ra, rb = a.registers_after(i), b.registers_after(i)
    for r in np.flatnonzero(ra != rb):
        name = REG_NAMES[r]
        d.fields.append(FieldDiff(name, _fmt_reg(name, int(ra[r])), _fmt_reg(name, int(rb[r]))))
    xa, xb = a.writes_of(i), b.writes_of(i)
    for mem in MEMORIES:
        if xa.get(mem) != xb.get(mem):
            d.fields.append(FieldDiff(f"write {mem}", _fmt_write(mem, xa.get(mem)), _fmt_write(mem, xb.get(mem))))
    ca, cb = a.counters_of(i), b.counters_of(i)
    if ca != cb:
        d.fields.append(FieldDiff("hbm traffic / topk", json.dumps(ca), json.dumps(cb)))
    ea, eb = (a.error if i == na - 1 else None), (b.error if i == nb - 1 else None)
    if (ea or {}).get("code") != (eb or {}).get("code"):
        d.fields.append(FieldDiff("panic", _err(a) if ea else "none", _err(b) if eb else "none"))
    return d


def _err(t) -> str:
    e = t.error
    return f" (panic {e.get('rule')} at pc {e.get('pc')})" if e else ""


# ---------------------------------------------------------------------------------------------
# tensors.json: naming element indices
# ---------------------------------------------------------------------------------------------

class TensorMap:
    """Element index -> ``name[row, col]`` for each memory, from a frontend ``tensors.json``."""

    def __init__(self, regions: dict):
        self.regions = regions  # memory -> list of (start, end, name, locate(offset) -> str)

    @classmethod
    def load(cls, path) -> "TensorMap":
        meta = json.loads(Path(path).read_text())
        regions: dict = {m: [] for m in ("vram", "mram", "hbm", "fpsram", "intsram")}
        for name, t in meta.get("tensors", meta).items():
            kind, addr, shape = t.get("kind"), int(t.get("address", 0)), list(t.get("shape", []))
            if kind == "vram":
                rows, cols = shape
                regions["vram"].append((addr, addr + rows * cols, name, _grid(cols)))
            elif kind == "mram":
                tiles, r, c = shape
                regions["mram"].append((addr, addr + tiles * r * c, name, _tiles(r, c)))
            elif kind in ("hbm_input", "hbm_output"):
                rows, cols = shape
                stored, row_bytes = int(t["stored_rows"]), int(t["row_bytes"])
                elem_bytes = max(1, row_bytes // cols)
                scale_addr = int(t.get("scale_address", addr + int(t["scale_offset"])))
                scale_row = (int(t["nbytes"]) - stored * row_bytes) // stored if stored else 0
                regions["hbm"].append((addr, addr + stored * row_bytes, name,
                                       _hbm_elems(row_bytes, elem_bytes)))
                if scale_row:
                    regions["hbm"].append((scale_addr, scale_addr + stored * scale_row, f"{name} (scales)",
                                           _grid(scale_row)))
            elif kind in ("fpsram", "intsram"):
                regions[kind].append((addr, addr + int(shape[0]), name, lambda off: f"[{off}]"))
        for v in regions.values():
            v.sort(key=lambda r: r[0])
        return cls(regions)

    def name(self, memory: str, index: int) -> Optional[str]:
        for start, end, name, locate in self.regions.get(memory, []):
            if start <= index < end:
                return f"{name}{locate(index - start)}"
        return None

    def counts(self, memory: str, diff_idx: np.ndarray) -> dict:
        """Differing elements per named region."""
        out = {}
        for start, end, name, _ in self.regions.get(memory, []):
            c = int(np.searchsorted(diff_idx, end) - np.searchsorted(diff_idx, start))
            if c:
                out[name] = out.get(name, 0) + c
        return out


def _grid(cols: int):
    return lambda off: f"[{off // cols}, {off % cols}]"


def _tiles(r: int, c: int):
    return lambda off: f"[tile {off // (r * c)}, {off % (r * c) // c}, {off % c}]"


def _hbm_elems(row_bytes: int, elem_bytes: int):
    return lambda off: f"[{off // row_bytes}, {off % row_bytes // elem_bytes}]"


# ---------------------------------------------------------------------------------------------
# dump folders
# ---------------------------------------------------------------------------------------------

#: memory -> (file, dtype, how values print)
DUMP_FILES = {"vram": (VRAM_FILE, "<u2", "bf16"), "mram": (MRAM_FILE, "<u2", "bf16"),
              "fpsram": (FPSRAM_FILE, "<u2", "bf16"), "intsram": (INTSRAM_FILE, "<u4", "u32"),
              "hbm": (HBM_FILE, "u1", "u8")}


@dataclasses.dataclass
class MemoryDiff:
    memory: str
    status: str  # "identical", "differ", "only in A", "only in B", "absent"
    len_a: int = 0
    len_b: int = 0
    n_diff: int = 0
    first: Optional[int] = None
    a_bits: Optional[int] = None
    b_bits: Optional[int] = None
    kind: str = "bf16"
    where: Optional[str] = None  # tensor name of the first difference
    per_tensor: dict = dataclasses.field(default_factory=dict)

    def value(self, bits: int) -> str:
        if self.kind == "bf16":
            return f"{float(bf16_bits_to_f32_np(np.array([bits], np.uint16))[0]):.7g} (0x{bits:04X})"
        if self.kind == "u32":
            return f"{bits} (0x{bits:08X})"
        return f"0x{bits:02X}"

    def report(self) -> str:
        if self.status != "differ":
            n = max(self.len_a, self.len_b)
            return f"{self.memory}: {self.status}" + (f" ({n} elements)" if self.status == "identical" else "")
        n = max(self.len_a, self.len_b)
        s = (f"{self.memory}: {self.n_diff} of {n} elements differ; first at element {self.first}: "
             f"A={self.value(self.a_bits)} B={self.value(self.b_bits)}")
        if self.where:
            s += f"  [{self.where}]"
        if self.per_tensor:
            s += "\n  per tensor: " + ", ".join(f"{k}: {v}" for k, v in self.per_tensor.items())
        return s


@dataclasses.dataclass
class DumpDiff:
    memories: list

    @property
    def identical(self) -> bool:
        return all(m.status != "differ" for m in self.memories)

    def report(self) -> str:
        return "\n".join(m.report() for m in self.memories)


def _read(path: Path, dtype: str) -> np.ndarray:
    n = path.stat().st_size // np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def compare_arrays(a: np.ndarray, b: np.ndarray, memory: str, kind: str,
                   tensors: Optional[TensorMap] = None) -> MemoryDiff:
    """Bitwise comparison of two flat arrays, the shorter read as zero-extended."""
    n = max(len(a), len(b))
    d = MemoryDiff(memory, "identical", len(a), len(b), kind=kind)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        ca = np.zeros(e - s, a.dtype)
        cb = np.zeros(e - s, a.dtype)
        pa, pb = a[s:min(e, len(a))], b[s:min(e, len(b))]
        ca[: len(pa)] = pa
        cb[: len(pb)] = pb
        idx = np.flatnonzero(ca != cb)
        if len(idx):
            if d.first is None:
                d.first = s + int(idx[0])
                d.a_bits, d.b_bits = int(ca[idx[0]]), int(cb[idx[0]])
            d.n_diff += len(idx)
            if tensors is not None:
                for k, v in tensors.counts(memory, idx + s).items():
                    d.per_tensor[k] = d.per_tensor.get(k, 0) + v
    if d.n_diff:
        d.status = "differ"
        if tensors is not None:
            d.where = tensors.name(memory, d.first)
    return d


def diff_dumps(dir_a, dir_b, *, tensors: Optional[TensorMap] = None) -> DumpDiff:
    """Compare every dump file the two folders hold (a file in only one is reported, not
    compared: the reference writes ``hbm_dump.bin`` only with DEBUG logging)."""
    out = []
    for mem, (fname, dtype, kind) in DUMP_FILES.items():
        pa, pb = Path(dir_a) / fname, Path(dir_b) / fname
        if not pa.exists() or not pb.exists():
            status = "only in A" if pa.exists() else "only in B" if pb.exists() else "absent"
            out.append(MemoryDiff(mem, status, kind=kind))
            continue
        out.append(compare_arrays(_read(pa, dtype), _read(pb, dtype), mem, kind, tensors))
    return DumpDiff(out)
