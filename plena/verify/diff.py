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

**Wide containers** (docs/formats.md, "Containers" and "Dumps"): with a VECTOR_SRAM_TYPE or
SCALAR_FP that is not a subset of bf16, the fp registers hold f32 bits (``uint32``) and the
dumps hold other layouts. :func:`diff_traces` formats fp registers by the width of the values
the traces hold (or as ``cfg=`` / ``fp_bits=`` says); :func:`diff_dumps` needs ``cfg=`` (``plena
diff --settings S.toml``) to read such folders: VRAM / MRAM are then compared as the codes of
their types, FP SRAM as f32 bits, and values are printed decoded from those.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from plena.numerics import codec
from plena.numerics.bf16 import bf16_bits_to_f32_np, f32_from_bits_np
from plena.numerics.formats import IntType
from plena.verify.dumps import FPSRAM_FILE, HBM_FILE, INTSRAM_FILE, MRAM_FILE, VRAM_FILE

__all__ = ["FieldDiff", "TraceDiff", "diff_traces", "MemoryDiff", "DumpDiff", "diff_dumps", "TensorMap",
           "dump_files", "read_elements", "fp_register_bits", "add_arguments", "main"]

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


def _fmt_reg(name: str, v: int, fp_bits: int = 16) -> str:
    """A register value as text; fp registers hold bf16 bits (``fp_bits=16``) or, in a wide
    SCALAR_FP container, f32 bits (``fp_bits=32``)."""
    if name.startswith("f"):
        if fp_bits == 32:
            return f"{float(f32_from_bits_np(np.array([v], np.uint32))[0]):.9g} (0x{v:08X})"
        return f"{float(bf16_bits_to_f32_np(np.array([v], np.uint16))[0]):.6g} (0x{v:04X})"
    if name.startswith("a"):
        return f"0x{v:016X}"
    return f"{v} (0x{v:08X})"


def _fmt_write(mem: str, w) -> str:
    if w is None:
        return "no write"
    lo, hi, h = w
    return f"[{lo}, {hi}) hash 0x{h:08X}"


def fp_register_bits(*traces, cfg=None) -> int:
    """Width of the fp registers' container in ``traces``: 32 (f32 bits) for a wide SCALAR_FP,
    else 16 (bf16 bits). From ``cfg`` when given; otherwise from the values the traces hold (a
    bf16 container never holds a value above 0xFFFF; an f32 one does for any nonzero value of
    magnitude >= 2**-126, so traces whose fp registers only ever hold 0 or f32 subnormals read
    as 16-bit: pass ``cfg`` for those)."""
    if cfg is not None:
        from plena.numerics.containers import is_wide
        return 32 if is_wide(cfg.precision.scalar_fp) else 16
    from plena.emu_jax.trace import REG_NAMES

    f0 = REG_NAMES.index("f0")
    nf = sum(1 for n in REG_NAMES if n.startswith("f"))
    for t in traces:
        fp = (t.reg_id >= f0) & (t.reg_id < f0 + nf)
        if (np.asarray(t.reg_init[f0:f0 + nf]) > 0xFFFF).any() or (np.asarray(t.reg_val)[fp] > 0xFFFF).any():
            return 32
    return 16


def diff_traces(a, b, *, context: int = 3, cfg=None, fp_bits: Optional[int] = None) -> TraceDiff:
    """First difference between traces ``a`` and ``b`` (:class:`~plena.emu_jax.trace.Trace`).

    fp register values print as bf16 or f32 (wide SCALAR_FP container): ``fp_bits`` (16 / 32)
    or ``cfg`` (the runs' config) says which, else :func:`fp_register_bits` infers it."""
    from plena.emu_jax.trace import MEMORIES, REG_NAMES
    from plena.isa.disassembler import disassemble_word

    if fp_bits is None:
        fp_bits = fp_register_bits(a, b, cfg=cfg)
    if fp_bits not in (16, 32):
        raise ValueError(f"fp_bits must be 16 or 32, got {fp_bits}")
    fmt = lambda name, v: _fmt_reg(name, v, fp_bits)  # noqa: E731

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
            d.fields.append(FieldDiff(f"initial {name}", fmt(name, int(a.reg_init[r])),
                                      fmt(name, int(b.reg_init[r]))))
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
        d.fields.append(FieldDiff(name, fmt(name, int(ra[r])), fmt(name, int(rb[r]))))
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

#: memory -> (file, dtype, how values print): the default (bf16) layouts
DUMP_FILES = {"vram": (VRAM_FILE, "<u2", "bf16"), "mram": (MRAM_FILE, "<u2", "bf16"),
              "fpsram": (FPSRAM_FILE, "<u2", "bf16"), "intsram": (INTSRAM_FILE, "<u4", "u32"),
              "hbm": (HBM_FILE, "u1", "u8")}


def dump_files(cfg=None) -> dict:
    """memory -> (file, element, kind) of the dump folders of a run under ``cfg``.

    ``element`` is a numpy dtype string for fixed-width elements, or a DataType (from
    :mod:`plena.numerics.formats`) whose codes the file packs at its width (a wide
    VECTOR_SRAM_TYPE in ``vram_dump.bin``, a MATRIX_SRAM_TYPE other than bf16 in
    ``mram_dump.bin``); ``kind`` says how values print ("bf16", "f32", "u32", "u8", or the
    type's name). ``cfg=None``: the default layouts (:data:`DUMP_FILES`)."""
    out = dict(DUMP_FILES)
    if cfg is None:
        return out
    from plena.numerics.containers import is_wide
    from plena.verify.dumps import dump_types

    types = dump_types(cfg)
    for mem, fname in (("vram", VRAM_FILE), ("mram", MRAM_FILE)):
        t = types[f"{mem}_type"]
        if t is not None:
            out[mem] = (fname, t, str(t))
    if is_wide(cfg.precision.scalar_fp):
        out["fpsram"] = (FPSRAM_FILE, "<u4", "f32")
    return out


_WHOLE = {8: "u1", 16: "<u2", 32: "<u4"}  # code widths a plain little-endian array reads


def read_elements(path, element) -> np.ndarray:
    """The elements of one dump file as a flat array: memory-mapped for a dtype string and for
    codes of 8, 16 or 32 bits (packed little-endian, i.e. exactly such arrays); codes of any
    other width are unpacked into ``uint32`` (a trailing partial code is dropped; the zero
    codes that pad the file to whole bytes read as zero elements)."""
    path = Path(path)
    if isinstance(element, str):
        return _read(path, element)
    w = int(element.width)
    if w in _WHOLE:
        return _read(path, _WHOLE[w])
    raw = np.fromfile(path, np.uint8)
    return codec.unpack_codes_np(raw, w, raw.size * 8 // w)


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
    kind: str = "bf16"  # "bf16", "f32", "u32", "u8", or the name of ``dtype``
    where: Optional[str] = None  # tensor name of the first difference
    per_tensor: dict = dataclasses.field(default_factory=dict)
    dtype: Optional[object] = None  # a DataType: the elements are codes of it

    def decoded(self, bits: int) -> float:
        """The value of one element's bits (an integer for u32 / u8 / Int codes)."""
        if self.dtype is not None:
            if isinstance(self.dtype, IntType):
                w = self.dtype.width
                return bits - (1 << w) if bits >> (w - 1) & 1 else bits
            return float(codec.decode_np(np.array([bits], np.uint32), self.dtype)[0])
        if self.kind == "bf16":
            return float(bf16_bits_to_f32_np(np.array([bits], np.uint16))[0])
        if self.kind == "f32":
            return float(f32_from_bits_np(np.array([bits], np.uint32))[0])
        return bits

    @property
    def a_value(self):
        return None if self.a_bits is None else self.decoded(self.a_bits)

    @property
    def b_value(self):
        return None if self.b_bits is None else self.decoded(self.b_bits)

    def value(self, bits: int) -> str:
        if self.dtype is not None:
            hexw = (int(self.dtype.width) + 3) // 4
            v = self.decoded(bits)
            return f"{v if isinstance(v, int) else format(v, '.7g')} (0x{bits:0{hexw}X})"
        if self.kind == "bf16":
            return f"{self.decoded(bits):.7g} (0x{bits:04X})"
        if self.kind == "f32":
            return f"{self.decoded(bits):.9g} (0x{bits:08X})"
        if self.kind == "u32":
            return f"{bits} (0x{bits:08X})"
        return f"0x{bits:02X}"

    def report(self) -> str:
        if self.status != "differ":
            n = max(self.len_a, self.len_b)
            return f"{self.memory}: {self.status}" + (f" ({n} elements)" if self.status == "identical" else "")
        n = max(self.len_a, self.len_b)
        what = "elements" if self.kind in ("bf16", "u32", "u8") else f"{self.kind} elements"
        s = (f"{self.memory}: {self.n_diff} of {n} {what} differ; first at element {self.first}: "
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
                   tensors: Optional[TensorMap] = None, dtype=None) -> MemoryDiff:
    """Bitwise comparison of two flat arrays, the shorter read as zero-extended. ``kind`` says
    how values print; ``dtype`` (a DataType) means the elements are codes of that type."""
    n = max(len(a), len(b))
    d = MemoryDiff(memory, "identical", len(a), len(b), kind=kind, dtype=dtype)
    ct = np.result_type(a.dtype, b.dtype)  # u16 / u32 codes of one type may come as either
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        ca = np.zeros(e - s, ct)
        cb = np.zeros(e - s, ct)
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


def diff_dumps(dir_a, dir_b, *, tensors: Optional[TensorMap] = None, cfg=None) -> DumpDiff:
    """Compare every dump file the two folders hold (a file in only one is reported, not
    compared: the reference writes ``hbm_dump.bin`` only with DEBUG logging).

    ``cfg``: the config of the runs that wrote the folders; needed for non-default layouts
    (:func:`dump_files`: a wide VECTOR_SRAM_TYPE or SCALAR_FP, a MATRIX_SRAM_TYPE other than
    bf16). Without it every folder is read in the default (bf16) layouts."""
    out = []
    for mem, (fname, element, kind) in dump_files(cfg).items():
        pa, pb = Path(dir_a) / fname, Path(dir_b) / fname
        dtype = None if isinstance(element, str) else element
        if not pa.exists() or not pb.exists():
            status = "only in A" if pa.exists() else "only in B" if pb.exists() else "absent"
            out.append(MemoryDiff(mem, status, kind=kind, dtype=dtype))
            continue
        out.append(compare_arrays(read_elements(pa, element), read_elements(pb, element), mem, kind, tensors,
                                  dtype=dtype))
    return DumpDiff(out)


# ---------------------------------------------------------------------------------------------
# command line (``plena diff``)
# ---------------------------------------------------------------------------------------------

def add_arguments(p):
    """The arguments of ``plena diff`` on an argparse parser."""
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tensors", metavar="tensors.json", help="name dump elements by the frontend tensors "
                   "(Program.write's tensors.json)")
    p.add_argument("--context", type=int, default=3, help="trace diff: executed instructions shown before "
                   "the divergence (default 3)")
    p.add_argument("--settings", "--config", dest="settings", metavar="plena_settings.toml",
                   help="the runs' machine config: needed to read dump folders of non-default formats "
                   "(a VECTOR_SRAM_TYPE / SCALAR_FP wider than bf16, a MATRIX_SRAM_TYPE other than bf16); "
                   "for traces it fixes how fp registers print (default: the default layouts; fp registers "
                   "by the values the traces hold)")
    return p


def main(args) -> int:
    """Run ``plena diff`` (parsed ``args``): print the report; exit 0 when the runs agree, 1 when
    they do not, 2 on a usage or input error."""
    import sys

    a, b = Path(args.a), Path(args.b)
    for p in (a, b):
        if not p.exists():
            print(f"error: {p} does not exist", file=sys.stderr)
            return 2
    if a.is_dir() != b.is_dir():
        print("error: compare two trace files or two dump folders", file=sys.stderr)
        return 2
    try:
        cfg = None
        if getattr(args, "settings", None):
            from plena.config import load_config

            cfg = load_config(args.settings)
        if a.is_dir():
            tensors = TensorMap.load(args.tensors) if args.tensors else None
            d = diff_dumps(a, b, tensors=tensors, cfg=cfg)
        else:
            from plena.emu_jax.trace import Trace

            d = diff_traces(Trace.load(a), Trace.load(b), context=args.context, cfg=cfg)
    except (OSError, ValueError, KeyError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(d.report())
    return 0 if d.identical else 1
