"""Program builder: write PLENA programs in Python, get exact upstream assembly + preload files.

A :class:`ProgramBuilder` collects three things and checks them while you build:

* **instructions** -- :meth:`~ProgramBuilder.emit` writes one upstream assembly line (spec §3.3)
  and assembles it at once with :func:`plena.isa.assemble_line`, so the machine word is exact
  and a bad operand is a :class:`BuildError` naming the instruction. :meth:`~ProgramBuilder.li`
  / :meth:`~ProgramBuilder.add_imm` expand large constants (spec §3.4),
  :meth:`~ProgramBuilder.loop` emits ``C_LOOP_START``/``C_LOOP_END`` and checks the per-iteration
  budget ``MAX_LOOP_INSTRUCTIONS`` (spec §4.6) statically, :meth:`~ProgramBuilder.stage` marks
  program regions for per-stage reports;
* **registers** -- ``gp1..gp15`` (``gp0`` is kept 0 by convention and used as the zero
  register), ``f1..f7`` (``f0`` reads as 0.0) and ``a0..a7`` are handed out by name and freed
  explicitly;
* **memory** -- bump allocators for VRAM rows, MRAM tiles, HBM tensors (MX layout of spec
  §2.7, encoded with the hardware MX encoder), FP SRAM and INT SRAM slots.

The high-level transfers :meth:`~ProgramBuilder.load_rows`, :meth:`~ProgramBuilder.load_tile`
and :meth:`~ProgramBuilder.store_rows` emit complete, correct ``H_PREFETCH_V`` /
``H_PREFETCH_M`` / ``H_STORE_V`` sequences (address register, SCALE, STRIDE, offsets), and
verify at build time that every row's MX scale bytes are where the layout puts them.

:meth:`~ProgramBuilder.build` returns a :class:`plena.frontend.program.Program` (words, text,
preload images, placements) that can be written to disk for ``plena run`` or run directly.

Conventions the helpers rely on (the upstream compiler's too): ``gp0`` holds 0 (never write a
non-zero value to it) and the helpers clobber the SCALE and STRIDE registers.

Example (double a 4 x 64 activation)::

    b = ProgramBuilder()
    x = b.hbm_input("x", np.random.randn(4, 64))        # MXFP8 in HBM
    xv = b.vram("xv", 4)
    y = b.hbm_output("y", 4, 64)
    two = b.fpsram("two", [2.0])
    b.load_rows(x, 0, xv, 0, 4)
    with b.scoped(b.gp("row"), b.fp("k")) as (row, k):
        b.li(row, xv.addr)
        b.emit("S_LD_FP", k, GP0, two)
        with b.loop(4, "rows"):
            b.emit("V_MUL_VF", row, row, k, 0)
            b.add_imm(row, b.cfg.vlen)
    b.store_rows(xv, 0, y, 0, 4)
    prog = b.build()
    result = prog.run()                                  # or prog.write("out/") + run.sh
    prog.read_hbm_output(result, "y")                    # ~ 2 * x

After a :class:`BuildError` raised inside a ``with b.loop(...)`` body the builder holds a
half-emitted loop: discard it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from plena.config import PlenaConfig, default_config
from plena.isa.assembler import AsmError, assemble_line
from plena.isa.encoding import IMM18_MAX, IMM22_MAX
from plena.isa.opcodes import BY_MNEMONIC, Role
from plena.numerics.bf16 import bf16_bits_to_f32_np, f16_bits_to_bf16_bits_np
from plena.numerics import codec
from plena.numerics.formats import FloatType, MxFormat, PlainFormat
from plena.numerics.mx import mx_decode_np, mx_encode_np
from plena.frontend.program import (BuildError, HbmTensor, MramRegion, Program, SramSlot, Stage,
                                    VramRegion, hbm_size_for)

__all__ = [
    "BuildError", "Reg", "GP0", "F0", "VramRegion", "MramRegion", "HbmTensor", "SramSlot",
    "Stage", "ProgramBuilder",
]

U32_MOD = 1 << 32
IMM18_LIMIT = IMM18_MAX + 1  # S_ADDI_INT immediates are < 2**18
HBM_ALIGN = 64  # HBM tensors start on a 64-byte block
SRAM_WORDS = 1024  # FP SRAM / INT SRAM entries (spec §2.3)
F16_MAX = 65504.0
USES = ("activation", "weight", "kv")


# ---------------------------------------------------------------------------------------------
# registers
# ---------------------------------------------------------------------------------------------

_REG_FILES = {  # kind -> (role in the opcode table, allocatable indices, description)
    "gp": (Role.GP, range(1, 16), "gp registers (gp1..gp15)"),
    "f": (Role.FP, range(1, 8), "fp registers (f1..f7)"),
    "a": (Role.ADDR, range(0, 8), "address registers (a0..a7)"),
}


@dataclasses.dataclass(frozen=True)
class Reg:
    """A register operand: prints as ``gp3`` / ``f2`` / ``a1``. ``name`` is the allocation
    label (documentation only: it takes no part in equality)."""

    kind: str  # "gp" | "f" | "a"
    index: int
    name: str = dataclasses.field(default="", compare=False)
    _token: int = dataclasses.field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.kind}{self.index}"


GP0 = Reg("gp", 0, "zero")  #: gp0, kept 0 by convention (the zero register)
F0 = Reg("f", 0, "zero")  #: f0, reads 0.0 (arithmetic with rd = f0 is a no-op)

Operand = Union[Reg, int]

# Instructions that write their rd gp register (refused on a running loop's counter).
_GP_WRITERS = frozenset({"S_ADD_INT", "S_ADDI_INT", "S_SUB_INT", "S_MUL_INT", "S_LUI_INT", "S_LD_INT"})


@dataclasses.dataclass
class _Frame:
    """One open loop (or the whole program): dynamic instructions per execution of its body."""

    name: str
    count: int
    dyn: int = 0


# ---------------------------------------------------------------------------------------------
# the builder
# ---------------------------------------------------------------------------------------------

def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise BuildError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _check_cols(what: str, cols: int, fmt) -> None:
    block = getattr(fmt, "block", 1)
    if cols % block:
        raise BuildError(f"{what}: {cols} columns is not a multiple of the MX block ({block})")
    if (cols * fmt.elem_bits) % 8:
        raise BuildError(f"{what}: {cols} columns of {fmt.elem_bits}-bit elements are not whole bytes")


def _encode_tensor(x: np.ndarray, fmt):
    """(element bytes u8[R, row bytes], scale bytes u8[R, scale bytes], decoded f32[R, C]) of a
    2-D f32 tensor in an HBM format: MX with the hardware encoder (MXFP8: the reference's,
    :func:`plena.numerics.mx.mx_encode_np`; other MX formats: :mod:`plena.numerics.codec`),
    Plain with RNE (:func:`plena.numerics.codec.encode_np`); sub-byte codes packed, spec §2.9(b)."""
    width = fmt.elem_bits
    if isinstance(fmt, MxFormat):
        if isinstance(fmt.elem, FloatType) and width == 8 and fmt.scale.width == 8:
            elem, scale = mx_encode_np(x, fmt)
            decoded = mx_decode_np(elem, scale, fmt)
        else:
            elem, scale = codec.mx_encode_np(x, fmt)
            decoded = codec.mx_decode_np(elem, scale, fmt)
        scale = scale.astype(np.uint8)
    else:
        elem = codec.encode_np(x, fmt.data)
        decoded = codec.decode_np(elem, fmt.data)
        scale = np.zeros((x.shape[0], 0), np.uint8)
    return codec.pack_codes_np(elem, width), scale, np.ascontiguousarray(decoded, np.float32)


class ProgramBuilder:
    """Builds one PLENA program for the machine ``cfg`` (default: the shipped TRANSACTIONAL
    config). See the module docstring for an overview."""

    def __init__(self, cfg: Optional[PlenaConfig] = None):
        self.cfg = cfg or default_config()
        self._lines: list[str] = []
        self._words: list[int] = []
        self._frames: list[_Frame] = [_Frame("<program>", 1)]
        self._regs: dict[str, dict[int, Reg]] = {k: {} for k in _REG_FILES}
        self._locked: set[tuple[str, int]] = set()  # loop counters
        self._tokens = itertools.count(1)
        self._resources: dict[str, object] = {}
        self._vram_next = 0  # rows
        self._mram_next = 0  # tiles
        self._hbm_next = 0  # bytes
        self._hbm = bytearray()
        self._hbm_inputs_end = 0
        self._fpsram: list[int] = []  # f16 bits
        self._intsram: list[int] = []
        self._stages: dict[str, Stage] = {}
        self._open_stage: Optional[tuple[Stage, _Frame, int, int]] = None  # stage, frame, dyn0, mult

    # -- state -------------------------------------------------------------------------------

    @property
    def pc(self) -> int:
        """Index of the next instruction to be emitted."""
        return len(self._words)

    # -- registers ---------------------------------------------------------------------------

    def _alloc(self, kind: str, name: str) -> Reg:
        _, indices, what = _REG_FILES[kind]
        used = self._regs[kind]
        for i in indices:
            if i not in used:
                reg = Reg(kind, i, name, next(self._tokens))
                used[i] = reg
                return reg
        busy = ", ".join(f"{r}={r.name!r}" for r in sorted(used.values(), key=lambda r: r.index))
        raise BuildError(f"out of {what}: cannot allocate {name!r} (in use: {busy})")

    def gp(self, name: str) -> Reg:
        """Allocate the lowest free gp register (gp1..gp15) for ``name``."""
        return self._alloc("gp", name)

    def fp(self, name: str) -> Reg:
        """Allocate the lowest free fp register (f1..f7; f0 is the constant 0.0)."""
        return self._alloc("f", name)

    def addr(self, name: str) -> Reg:
        """Allocate the lowest free HBM address register (a0..a7)."""
        return self._alloc("a", name)

    def free(self, *regs: Reg) -> None:
        """Give registers back (each must be currently allocated; loop counters are freed by
        their loop)."""
        for reg in regs:
            if not isinstance(reg, Reg) or reg.kind not in self._regs:
                raise BuildError(f"free: {reg!r} is not a register")
            held = self._regs[reg.kind].get(reg.index)
            if held is None or held._token != reg._token:
                raise BuildError(f"free: register {reg} ({reg.name!r}) is not allocated (double free?)")
            if (reg.kind, reg.index) in self._locked:
                raise BuildError(f"free: register {reg} is the counter of loop {reg.name!r}")
            del self._regs[reg.kind][reg.index]

    @contextlib.contextmanager
    def scoped(self, *regs: Reg):
        """``with b.scoped(b.gp("i"), b.gp("j")) as (i, j):`` frees the registers on exit
        (a single register is yielded as itself)."""
        try:
            yield regs[0] if len(regs) == 1 else regs
        finally:
            self.free(*regs)

    # -- emission ----------------------------------------------------------------------------

    def comment(self, text: str) -> None:
        """Add ``; text`` line(s) to the assembly (no instruction)."""
        for line in str(text).splitlines() or [""]:
            self._lines.append(f"; {line}".rstrip())

    def emit(self, mnemonic: str, *operands: Operand, comment: Optional[str] = None) -> int:
        """Emit one instruction ``MNEMONIC op, op, ...`` (operands are :class:`Reg` or
        non-negative ints, in upstream assembly order) and return its pc.

        The line is assembled immediately; problems (unknown mnemonic, an immediate that does
        not fit, a register of the wrong file, fp register >= 8, M_BMM/M_BTMM with rd != 0,
        an opcode the emulator cannot execute) raise :class:`BuildError`. ``C_LOOP_START`` /
        ``C_LOOP_END`` are only available through :meth:`loop`.
        """
        if mnemonic in ("C_LOOP_START", "C_LOOP_END"):
            raise BuildError(f"{mnemonic}: use `with b.loop(count):` (it tracks the loop budget)")
        return self._emit(mnemonic, operands, comment)

    def _emit(self, mnemonic: str, operands: Sequence[Operand], comment: Optional[str]) -> int:
        spec = BY_MNEMONIC.get(mnemonic)
        if spec is None:
            raise BuildError(f"unknown mnemonic {mnemonic!r}")
        if not spec.executable:
            raise BuildError(f"{mnemonic} is not executable by the emulator (Invalid opcode)")
        roles = (spec.rd, spec.rs1, spec.rs2, spec.rs3, spec.funct1)
        toks = []
        for pos, op in enumerate(operands):
            if isinstance(op, Reg):
                role = roles[pos] if pos < len(roles) else Role.IGNORED
                want = {Role.GP: "gp", Role.FP: "f", Role.ADDR: "a"}.get(role)
                if want is not None and op.kind != want:
                    raise BuildError(f"{mnemonic}: operand {pos + 1} must be a {want} register, got {op}"
                                     f" ({op.name!r})")
                if op.kind == "f" and op.index > 7:
                    raise BuildError(f"{mnemonic}: fp register {op} does not exist (f0..f7)")
                held = self._regs.get(op.kind, {}).get(op.index)
                if op._token and (held is None or held._token != op._token):
                    raise BuildError(f"{mnemonic}: register {op} ({op.name!r}) is used after it was freed")
                if pos == 0 and mnemonic in _GP_WRITERS and (op.kind, op.index) in self._locked:
                    raise BuildError(f"{mnemonic}: writes {op}, the counter of loop "
                                     f"{op.name.removeprefix('loop ')!r}")
                toks.append(str(op))
            else:
                v = _as_int(op, f"{mnemonic}: operand {pos + 1}")
                if v < 0:
                    raise BuildError(f"{mnemonic}: operand {pos + 1} is negative ({v}); "
                                     "immediates are unsigned")
                if pos < len(roles) and roles[pos] is Role.FP and v > 7:
                    raise BuildError(f"{mnemonic}: fp register index {v} does not exist (f0..f7)")
                toks.append(str(v))
        if mnemonic in ("M_BMM", "M_BTMM") and operands and str(operands[0]) not in ("0", "gp0"):
            raise BuildError(f"{mnemonic}: rd must be 0 (the emulator rejects it at load time)")
        text = mnemonic + (" " + ", ".join(toks) if toks else "")
        try:
            word = assemble_line(text, self.pc)
        except AsmError as exc:
            raise BuildError(f"{text}: {exc.problem}") from None
        if comment:
            text += " ; " + " ".join(str(comment).split())
        self._lines.append(text)
        self._words.append(word)
        self._frames[-1].dyn += 1
        return len(self._words) - 1

    # -- constants ---------------------------------------------------------------------------

    def _need_gp(self, reg: Reg, what: str) -> None:
        if not isinstance(reg, Reg) or reg.kind != "gp":
            raise BuildError(f"{what}: {reg!r} is not a gp register")

    def li(self, reg: Reg, value: int, *, comment: Optional[str] = None) -> None:
        """``reg = value`` for 0 <= value < 2**32 (spec §3.4): ``S_ADDI_INT reg, gp0, v`` below
        2**18, else ``S_LUI_INT reg, v >> 12`` plus ``S_ADDI_INT reg, reg, v & 0xFFF`` if needed."""
        self._need_gp(reg, "li")
        v = _as_int(value, "li: value")
        if not 0 <= v < U32_MOD:
            raise BuildError(f"li {reg}: value {v} is not an unsigned 32-bit integer")
        if v < IMM18_LIMIT:
            self._emit("S_ADDI_INT", (reg, GP0, v), comment)
            return
        self._emit("S_LUI_INT", (reg, v >> 12), comment)
        if v & 0xFFF:
            self._emit("S_ADDI_INT", (reg, reg, v & 0xFFF), None)

    def mov(self, dst: Reg, src: Reg) -> None:
        """``dst = src`` (``S_ADDI_INT dst, src, 0``)."""
        self._need_gp(dst, "mov")
        self._need_gp(src, "mov")
        self._emit("S_ADDI_INT", (dst, src, 0), None)

    def add_imm(self, reg: Reg, value: int, *, src: Optional[Reg] = None) -> None:
        """``reg = (src or reg) + value`` mod 2**32; ``value`` may be negative or >= 2**18.

        Small positive values are one ``S_ADDI_INT``; others go through a temporary gp
        register (``S_ADD_INT`` / ``S_SUB_INT``), or a chain of ``S_ADDI_INT`` steps when no
        register is free. Nothing is emitted for ``value == 0`` unless ``src`` differs from
        ``reg``.
        """
        self._need_gp(reg, "add_imm")
        src = reg if src is None else src
        self._need_gp(src, "add_imm")
        v = _as_int(value, "add_imm: value")
        if abs(v) >= U32_MOD:
            raise BuildError(f"add_imm {reg}: |{v}| does not fit in 32 bits")
        if 0 <= v < IMM18_LIMIT:
            if v or src != reg:
                self._emit("S_ADDI_INT", (reg, src, v), None)
            return
        if self._free_count("gp"):
            with self.scoped(self.gp(f"add_imm {reg} temp")) as tmp:
                self.li(tmp, abs(v))
                self._emit("S_ADD_INT" if v > 0 else "S_SUB_INT", (reg, src, tmp), None)
            return
        if 0 < v <= 8 * IMM18_MAX:  # no register free: a short chain of S_ADDI_INT steps
            first = True
            while v:
                step = min(v, IMM18_MAX)
                self._emit("S_ADDI_INT", (reg, src if first else reg, step), None)
                v -= step
                first = False
            return
        raise BuildError(f"add_imm {reg}, {v}: needs a temporary gp register and none is free")

    def _free_count(self, kind: str) -> int:
        return len(_REG_FILES[kind][1]) - len(self._regs[kind])

    def set_addr(self, areg: Reg, value: int) -> None:
        """``areg = value`` (a 64-bit HBM byte address) with ``C_SET_ADDR_REG``."""
        if not isinstance(areg, Reg) or areg.kind != "a":
            raise BuildError(f"set_addr: {areg!r} is not an address register")
        v = _as_int(value, "set_addr: value")
        if not 0 <= v < 1 << 64:
            raise BuildError(f"set_addr {areg}: {v} is not an unsigned 64-bit address")
        hi, lo = v >> 32, v & (U32_MOD - 1)
        regs = []
        try:
            rlo = GP0
            if lo:
                rlo = self.gp(f"set_addr {areg} low")
                regs.append(rlo)
                self.li(rlo, lo)
            rhi = GP0
            if hi:
                rhi = self.gp(f"set_addr {areg} high")
                regs.append(rhi)
                self.li(rhi, hi)
            self._emit("C_SET_ADDR_REG", (areg, rhi, rlo), None)
        finally:
            self.free(*regs)

    def _set_special(self, mnemonic: str, value: int) -> None:
        v = _as_int(value, f"{mnemonic}: value")
        if not 0 <= v < U32_MOD:
            raise BuildError(f"{mnemonic}: {v} is not an unsigned 32-bit integer")
        if v == 0:
            self._emit(mnemonic, (GP0,), None)
            return
        with self.scoped(self.gp(f"{mnemonic} value")) as tmp:
            self.li(tmp, v)
            self._emit(mnemonic, (tmp,), None)

    def set_scale(self, value: int) -> None:
        """SCALE register = value (the MX scale-region offset, ``HbmTensor.scale_offset``)."""
        self._set_special("C_SET_SCALE_REG", value)

    def set_stride(self, value: int) -> None:
        """STRIDE register = value (HBM row pitch in bytes, used when rstride = 1)."""
        self._set_special("C_SET_STRIDE_REG", value)

    def set_vmask(self, value: int) -> None:
        """V_MASK register = value (bit h enables elements [h*HLEN, (h+1)*HLEN))."""
        self._set_special("C_SET_V_MASK_REG", value)

    # -- loops -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def loop(self, count: int, name: Optional[str] = None) -> Iterator[Reg]:
        """``with b.loop(count, "name") as counter:`` -- a hardware loop running its body
        ``count`` times (1 <= count < 2**22). ``counter`` (an allocated gp register, freed at the
        end) holds the *remaining* iterations: ``count - k`` during iteration k; do not write it.

        On exit the dynamic length of one iteration (the body including nested loops, plus
        ``C_LOOP_END``) is checked against ``cfg.max_loop_instructions`` (spec §4.6); a longer
        body raises :class:`BuildError` naming the loop.
        """
        label = name or f"loop@pc{self.pc}"
        n = _as_int(count, f"loop {label!r}: count")
        if not 1 <= n <= IMM22_MAX:
            raise BuildError(f"loop {label!r}: count {n} must be in [1, {IMM22_MAX}]")
        counter = self.gp(f"loop {label}")
        key = (counter.kind, counter.index)
        self._emit("C_LOOP_START", (counter, n), label)
        frame = _Frame(label, n)
        self._frames.append(frame)
        self._locked.add(key)
        ok = False
        try:
            yield counter
            ok = True
        finally:
            if ok:
                self._close_stage_in(frame)
                self._emit("C_LOOP_END", (counter,), label)
            self._frames.pop()
            self._locked.discard(key)
            self.free(counter)
        limit = self.cfg.max_loop_instructions
        if frame.dyn > limit:
            raise BuildError(f"loop {label!r}: one iteration executes {frame.dyn} instructions "
                             f"(body incl. nested loops and its C_LOOP_END), over "
                             f"MAX_LOOP_INSTRUCTIONS = {limit}; split the loop")
        self._frames[-1].dyn += n * frame.dyn

    # -- stages ------------------------------------------------------------------------------

    def stage(self, name: str) -> contextlib.AbstractContextManager:
        """Start stage ``name`` here: emits ``; stage: NAME`` and records the pc range, which
        ends at the next :meth:`stage` (at the same loop level), at the end of a ``with``
        block (``with b.stage("attn"):``), at the end of the enclosing loop, or at the end of
        the program."""
        name = str(name)
        if name in self._stages:
            raise BuildError(f"stage {name!r} already exists")
        if self._open_stage is not None:
            _, frame, _, _ = self._open_stage
            if frame is not self._frames[-1]:
                raise BuildError(f"stage {name!r}: stage {self._open_stage[0].name!r} is still open "
                                 f"in loop {frame.name!r}; end it first")
            self._end_stage()
        self._lines.append(f"; stage: {name}")
        st = Stage(name, self.pc)
        mult = math.prod(f.count for f in self._frames)
        self._stages[name] = st
        self._open_stage = (st, self._frames[-1], self._frames[-1].dyn, mult)
        return self._stage_scope(st)

    @contextlib.contextmanager
    def _stage_scope(self, st: Stage):
        yield st
        if self._open_stage is not None and self._open_stage[0] is st:
            self._end_stage()

    def end_stage(self) -> None:
        """End the open stage (if any) here."""
        if self._open_stage is not None:
            if self._open_stage[1] is not self._frames[-1]:
                raise BuildError(f"stage {self._open_stage[0].name!r} must end in the loop it began in")
            self._end_stage()

    def _end_stage(self) -> None:
        st, frame, dyn0, mult = self._open_stage
        st.end = self.pc
        st.dynamic = (frame.dyn - dyn0) * mult
        self._open_stage = None

    def _close_stage_in(self, frame: _Frame) -> None:
        if self._open_stage is not None and self._open_stage[1] is frame:
            self._end_stage()

    # -- memory: SRAMs -----------------------------------------------------------------------

    def _claim(self, name: str, what: str) -> str:
        name = str(name)
        if not name:
            raise BuildError(f"{what}: empty name")
        if name in self._resources:
            raise BuildError(f"{what} {name!r}: the name is already used by a "
                             f"{getattr(self._resources[name], 'kind', '?')} placement")
        return name

    def vram(self, name: str, rows: int) -> VramRegion:
        """Allocate ``rows`` VLEN-element rows of Vector SRAM (bump allocation)."""
        name = self._claim(name, "vram")
        rows = _as_int(rows, f"vram {name!r}: rows")
        if rows < 1:
            raise BuildError(f"vram {name!r}: rows must be >= 1, got {rows}")
        depth = self.cfg.vector_sram_size
        if self._vram_next + rows > depth:
            raise BuildError(f"vram {name!r}: {rows} rows do not fit (rows {self._vram_next}.."
                             f"{depth - 1} free, VECTOR_SRAM_SIZE = {depth})")
        region = VramRegion(name, self._vram_next * self.cfg.vlen, rows, self.cfg.vlen)
        self._vram_next += rows
        self._resources[name] = region
        return region

    def mram(self, name: str, tiles: int = 1) -> MramRegion:
        """Allocate ``tiles`` MLEN x MLEN Matrix-SRAM tiles (bump allocation)."""
        name = self._claim(name, "mram")
        tiles = _as_int(tiles, f"mram {name!r}: tiles")
        if tiles < 1:
            raise BuildError(f"mram {name!r}: tiles must be >= 1, got {tiles}")
        total = self.cfg.mram_tiles
        if self._mram_next + tiles > total:
            raise BuildError(f"mram {name!r}: out of MRAM tiles ({tiles} requested, "
                             f"{total - self._mram_next} of {total} free)")
        region = MramRegion(name, self._mram_next * self.cfg.tile_elems, tiles, self.cfg.mlen)
        self._mram_next += tiles
        self._resources[name] = region
        return region

    def fpsram(self, name: str, values) -> SramSlot:
        """Place constants in FP SRAM; returns the first slot index.

        The preload file holds IEEE f16 (spec §2.3): values are rounded f32 -> f16 -> bf16
        (RNE each time). ``slot.values`` holds the exact values the machine sees. A finite
        value that overflows f16 is an error (write ``-np.inf`` explicitly if that is meant).
        """
        name = self._claim(name, "fpsram")
        v64 = np.atleast_1d(np.asarray(values, dtype=np.float64)).reshape(-1)
        if v64.size == 0:
            raise BuildError(f"fpsram {name!r}: no values")
        f32 = v64.astype(np.float32)
        with np.errstate(over="ignore"):
            f16 = f32.astype(np.float16)
        bad = np.isfinite(f32) & ~np.isfinite(f16)
        if bad.any():
            raise BuildError(f"fpsram {name!r}: value {f32[bad][0]!r} overflows the f16 preload "
                             f"format (|x| <= {F16_MAX})")
        start = len(self._fpsram)
        if start + f16.size > SRAM_WORDS:
            raise BuildError(f"fpsram {name!r}: {f16.size} entries do not fit "
                             f"({SRAM_WORDS - start} of {SRAM_WORDS} free)")
        bits = f16.view(np.uint16)
        self._fpsram.extend(int(b) for b in bits)
        exact = bf16_bits_to_f32_np(f16_bits_to_bf16_bits_np(bits))
        slot = SramSlot(start, name, "fpsram", exact)
        self._resources[name] = slot
        return slot

    def intsram(self, name: str, values) -> SramSlot:
        """Place u32 values in INT SRAM; returns the first slot index."""
        name = self._claim(name, "intsram")
        vals = [_as_int(v, f"intsram {name!r}: value") for v in np.atleast_1d(np.asarray(values)).reshape(-1)]
        if not vals:
            raise BuildError(f"intsram {name!r}: no values")
        if any(not 0 <= v < U32_MOD for v in vals):
            raise BuildError(f"intsram {name!r}: values must be unsigned 32-bit integers")
        start = len(self._intsram)
        if start + len(vals) > SRAM_WORDS:
            raise BuildError(f"intsram {name!r}: {len(vals)} entries do not fit "
                             f"({SRAM_WORDS - start} of {SRAM_WORDS} free)")
        self._intsram.extend(vals)
        slot = SramSlot(start, name, "intsram", np.asarray(vals, np.uint32))
        self._resources[name] = slot
        return slot

    # -- memory: HBM -------------------------------------------------------------------------

    def _hbm_format(self, what: str, fmt, use: str) -> MxFormat:
        if use not in USES:
            raise BuildError(f"{what}: use must be one of {USES}, got {use!r}")
        p = self.cfg.precision
        if fmt is None:
            fmt = {"activation": p.hbm_v_act_type, "weight": p.hbm_m_weight_type, "kv": p.hbm_v_kv_type}[use]
        try:
            if isinstance(fmt, MxFormat):
                codec.check_mx_format(fmt)
                if fmt.scale.width != 8:
                    raise NotImplementedError("MX scales must be 8 bits wide")
            elif isinstance(fmt, PlainFormat):
                codec.check_scalar_type(fmt.data)
            else:
                raise TypeError(f"not a storage format: {fmt!r}")
        except (NotImplementedError, TypeError, ValueError) as e:
            raise BuildError(f"{what}: format {fmt} is not supported ({e}); see docs/formats.md") from None
        return fmt

    def _place_hbm(self, nbytes: int) -> int:
        addr = -(-self._hbm_next // HBM_ALIGN) * HBM_ALIGN
        self._hbm_next = addr + nbytes
        return addr

    def _stored_rows(self, what: str, rows: int, pad_rows) -> int:
        pad = _as_int(pad_rows, f"{what}: pad_rows")
        if pad < 1:
            raise BuildError(f"{what}: pad_rows must be >= 1, got {pad}")
        return -(-rows // pad) * pad

    def hbm_input(self, name: str, array, fmt: Optional[MxFormat] = None, *, use: str = "activation",
                  pad_rows: int = 1) -> HbmTensor:
        """Place a 2-D float tensor (R, C) in the HBM image at a 64-byte aligned address.

        Encoded with the hardware MX encoder (:func:`plena.numerics.mx.mx_encode_np`) in the
        spec §2.7 layout: element bytes ``R*C`` row-major, then scale bytes ``R*(C/block)``.
        ``fmt`` defaults to the configured format for ``use`` (``"activation"``:
        HBM_V_ACT_TYPE, ``"weight"``: HBM_M_WEIGHT_TYPE, ``"kv"``: HBM_V_KV_TYPE). ``pad_rows``
        rounds the stored rows up to a multiple (zero rows, which load as exact zeros) so that
        partial final bursts of :meth:`load_rows` / :meth:`load_tile` stay inside the tensor.
        ``tensor.decoded`` holds the exact values the machine reads (f32, MRAM; VRAM gets
        their bf16 rounding).
        """
        what = f"hbm_input {name!r}"
        name = self._claim(name, "hbm_input")
        fmt = self._hbm_format(what, fmt, use)
        x = np.asarray(array, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise BuildError(f"{what}: expected a non-empty 2-D array (rows, cols), got shape {x.shape}")
        rows, cols = x.shape
        _check_cols(what, cols, fmt)
        stored = self._stored_rows(what, rows, pad_rows)
        elem, scale, decoded = _encode_tensor(x, fmt)
        elem = np.pad(elem, ((0, stored - rows), (0, 0)))
        scale = np.pad(scale, ((0, stored - rows), (0, 0)))
        decoded.setflags(write=False)
        t = HbmTensor(name, "hbm_input", 0, rows, cols, stored, fmt, use, decoded)
        addr = self._place_hbm(t.nbytes)
        t = dataclasses.replace(t, addr=addr)
        end = addr + t.nbytes
        if len(self._hbm) < end:
            self._hbm.extend(bytes(end - len(self._hbm)))
        self._hbm[addr:addr + t.scale_offset] = elem.tobytes()
        self._hbm[addr + t.scale_offset:end] = scale.tobytes()
        self._hbm_inputs_end = max(self._hbm_inputs_end, end)
        self._resources[name] = t
        return t

    def hbm_output(self, name: str, rows: int, cols: int, fmt: Optional[MxFormat] = None, *,
                   use: str = "activation", pad_rows: Optional[int] = None) -> HbmTensor:
        """Reserve HBM space (same layout as :meth:`hbm_input`) for ``H_STORE_V`` results.

        The stored rows are rounded up to ``pad_rows`` (default: the least common multiple of
        HBM_V_Writeback_Amount and HBM_V_Prefetch_Amount), because H_STORE_V always writes
        whole bursts and a short final burst would overwrite the scale region.
        """
        what = f"hbm_output {name!r}"
        name = self._claim(name, "hbm_output")
        fmt = self._hbm_format(what, fmt, use)
        rows, cols = _as_int(rows, f"{what}: rows"), _as_int(cols, f"{what}: cols")
        if rows < 1 or cols < 1:
            raise BuildError(f"{what}: rows and cols must be >= 1")
        _check_cols(what, cols, fmt)
        if pad_rows is None:
            pad_rows = math.lcm(self.cfg.hbm_v_writeback_amount, self.cfg.hbm_v_prefetch_amount)
        stored = self._stored_rows(what, rows, pad_rows)
        t = HbmTensor(name, "hbm_output", 0, rows, cols, stored, fmt, use)
        t = dataclasses.replace(t, addr=self._place_hbm(t.nbytes))
        self._resources[name] = t
        return t

    # -- HBM transfers -----------------------------------------------------------------------

    def _check_transfer_format(self, what: str, t: HbmTensor, unit: str) -> None:
        p = self.cfg.precision
        want = p.hbm_m_type(t.funct1) if unit == "m" else p.hbm_v_type(t.funct1)
        if want != t.fmt:
            raise BuildError(f"{what}: tensor {t.name!r} is {t.fmt} but this transfer (funct1 = "
                             f"{t.funct1}) uses {want}")

    def _check_scales(self, what: str, t: HbmTensor, row0: int, col0: int, nrows: int,
                      burst: int, row_len: int, check_straddle: bool) -> None:
        """Model the emulator's MX scale addressing (spec §4.5) for every row of the transfer
        and require it to equal the layout's address (and, for reads, not to cross a 64-byte
        block: the DMA reads a row's scales as one piece clipped at the block end)."""
        if not isinstance(t.fmt, MxFormat):
            return  # Plain: no scale stream
        ratio = t.fmt.element_scale_ratio
        nsc = row_len // t.fmt.block * (t.fmt.scale.width // 8)
        step = np.float32(np.float32(t.row_bytes) / np.float32(ratio))
        for k in range(nrows // burst):
            r = row0 + k * burst
            s0 = t.addr + t.scale_offset + t.offset(r, col0) // ratio
            i = np.arange(burst, dtype=np.float32)
            got = s0 + np.floor(i * step).astype(np.int64)
            want = np.array([t.scale_address(r + j, col0) for j in range(burst)], np.int64)
            if not np.array_equal(got, want):
                raise BuildError(f"{what}: the machine would read the scales of {t.name!r} row "
                                 f"{r} at {got.tolist()} instead of {want.tolist()} (format {t.fmt})")
            if check_straddle:
                bad = np.nonzero(want % HBM_ALIGN + nsc > HBM_ALIGN)[0]
                if len(bad):
                    j = int(bad[0])
                    raise BuildError(
                        f"{what}: the {nsc} scale bytes of {t.name!r} row {r + j} (columns {col0}.."
                        f"{col0 + row_len - 1}) at HBM {int(want[j])} cross a 64-byte boundary; the "
                        "DMA would read the bytes past it as 0. Choose a column offset/width whose "
                        "scale bytes stay inside 64-byte blocks (e.g. cols a multiple of 64).")

    def _range_checks(self, what: str, t: HbmTensor, row0: int, col0: int, span: int, row_len: int) -> None:
        if not isinstance(t, HbmTensor):
            raise BuildError(f"{what}: {t!r} is not an HbmTensor")
        if row0 < 0 or col0 < 0:
            raise BuildError(f"{what}: negative row/column offset")
        if col0 % getattr(t.fmt, "block", 1) or (col0 * t.elem_bits) % 8:
            raise BuildError(f"{what}: column offset {col0} is not a multiple of the MX block "
                             f"{getattr(t.fmt, 'block', 1)} or not at a byte boundary")
        if col0 + row_len > t.cols:
            raise BuildError(f"{what}: columns {col0}..{col0 + row_len - 1} are outside {t.name!r} "
                             f"({t.cols} columns); a transfer moves {row_len} columns per row")
        if row0 + span > t.stored_rows:
            raise BuildError(f"{what}: rows {row0}..{row0 + span - 1} (whole bursts) are outside "
                             f"{t.name!r} ({t.stored_rows} stored rows); pad the tensor (pad_rows=...)")

    def _vram_range(self, what: str, region: VramRegion, row0: int, span: int) -> None:
        if not isinstance(region, VramRegion):
            raise BuildError(f"{what}: {region!r} is not a VramRegion")
        if row0 < 0 or row0 + span > region.rows:
            raise BuildError(f"{what}: VRAM rows {row0}..{row0 + span - 1} (whole bursts) are outside "
                             f"{region.name!r} ({region.rows} rows)")

    def _hbm_rows(self, what: str, mnemonic: str, t: HbmTensor, region: VramRegion, vram_row0: int,
                  row0: int, col0: int, nbursts: int, burst: int) -> None:
        """Emit ``nbursts`` H_PREFETCH_V / H_STORE_V of ``burst`` rows (unrolled up to 2, else
        a hardware loop)."""
        vlen = self.cfg.vlen
        self.comment(what)
        a = self.addr(f"{what}: hbm base")
        try:
            self.set_addr(a, t.addr)
            self.set_scale(t.scale_offset)
            self.set_stride(t.row_bytes)
            with self.scoped(self.gp(f"{what}: vram addr"), self.gp(f"{what}: hbm offset")) as (v, h):
                self.li(v, region.row(vram_row0))
                self.li(h, t.offset(row0, col0))
                vstep, hstep = burst * vlen, burst * t.row_bytes
                if nbursts <= 2:
                    for k in range(nbursts):
                        if k:
                            self.add_imm(v, vstep)
                            self.add_imm(h, hstep)
                        self._emit(mnemonic, (v, h, a, 1, t.funct1), None)
                    return
                steps = []
                try:
                    regs = []
                    for step, label in ((vstep, "vram step"), (hstep, "hbm step")):
                        r = None
                        if step >= IMM18_LIMIT:
                            r = self.gp(f"{what}: {label}")
                            steps.append(r)
                            self.li(r, step)
                        regs.append(r)
                    with self.loop(nbursts, f"{what}: bursts"):
                        self._emit(mnemonic, (v, h, a, 1, t.funct1), None)
                        for reg, step, sreg in ((v, vstep, regs[0]), (h, hstep, regs[1])):
                            if sreg is None:
                                self._emit("S_ADDI_INT", (reg, reg, step), None)
                            else:
                                self._emit("S_ADD_INT", (reg, reg, sreg), None)
                finally:
                    self.free(*steps)
        finally:
            self.free(a)

    def load_rows(self, t: HbmTensor, row0: int, region: VramRegion, vram_row0: int, nrows: int, *,
                  col0: int = 0) -> None:
        """Load tensor rows ``row0 .. row0+nrows-1``, columns ``col0 .. col0+VLEN-1`` into VRAM
        rows ``vram_row0 ..`` of ``region`` (``H_PREFETCH_V``, rstride = 1, STRIDE = row pitch,
        SCALE = ``t.scale_offset``, gp offset = byte offset of (row0, col0)).

        One H_PREFETCH_V moves HBM_V_Prefetch_Amount rows, so ``nrows`` is rounded up to whole
        bursts; the rounded range must lie inside the tensor's stored rows and the region.
        VRAM receives bf16(MX decode). Clobbers SCALE and STRIDE.
        """
        burst = self.cfg.hbm_v_prefetch_amount
        what = f"load_rows {t.name!r}[{row0}:{row0 + nrows}, {col0}:{col0 + self.cfg.vlen}]"
        row0, vram_row0, nrows, col0 = (_as_int(v, what) for v in (row0, vram_row0, nrows, col0))
        if nrows < 1:
            raise BuildError(f"{what}: nrows must be >= 1")
        nb = -(-nrows // burst)
        self._range_checks(what, t, row0, col0, nb * burst, self.cfg.vlen)
        self._vram_range(what, region, vram_row0, nb * burst)
        self._check_transfer_format(what, t, "v")
        self._check_scales(what, t, row0, col0, nb * burst, burst, self.cfg.vlen, True)
        self._hbm_rows(f"{what} -> {region.name}[{vram_row0}:]", "H_PREFETCH_V", t, region,
                       vram_row0, row0, col0, nb, burst)

    def store_rows(self, region: VramRegion, vram_row0: int, t: HbmTensor, row0: int, nrows: int, *,
                   col0: int = 0) -> None:
        """Store VRAM rows ``vram_row0 ..`` of ``region`` into tensor rows ``row0 .. row0+nrows-1``,
        columns ``col0 .. col0+VLEN-1`` (``H_STORE_V``, hardware MX encoder), rounded up to
        whole HBM_V_Writeback_Amount bursts (the rounded range must lie inside the region and
        the tensor's stored rows). Clobbers SCALE and STRIDE."""
        burst = self.cfg.hbm_v_writeback_amount
        what = f"store_rows {region.name if isinstance(region, VramRegion) else region!r}[{vram_row0}:] -> " \
               f"{getattr(t, 'name', t)!r}[{row0}:{row0 + nrows}, {col0}:{col0 + self.cfg.vlen}]"
        row0, vram_row0, nrows, col0 = (_as_int(v, what) for v in (row0, vram_row0, nrows, col0))
        if nrows < 1:
            raise BuildError(f"{what}: nrows must be >= 1")
        nb = -(-nrows // burst)
        self._range_checks(what, t, row0, col0, nb * burst, self.cfg.vlen)
        self._vram_range(what, region, vram_row0, nb * burst)
        self._check_transfer_format(what, t, "v")
        self._check_scales(what, t, row0, col0, nb * burst, burst, self.cfg.vlen, False)
        self._hbm_rows(what, "H_STORE_V", t, region, vram_row0, row0, col0, nb, burst)

    def load_tile(self, t: HbmTensor, row0: int, col0: int, mram: MramRegion, tile: int = 0) -> None:
        """Load the block ``t[row0 : row0+P, col0 : col0+MLEN]`` (P = effective
        HBM_M_Prefetch_Amount, MLEN rows = one tile in the default config) into MRAM tiles
        ``tile ..`` of ``mram`` with one ``H_PREFETCH_M`` (exact f32 MX-decoded values).
        Clobbers SCALE and STRIDE."""
        mlen, amount = self.cfg.mlen, self.cfg.hbm_m_prefetch_amount
        what = f"load_tile {getattr(t, 'name', t)!r}[{row0}:{row0 + amount}, {col0}:{col0 + mlen}]"
        row0, col0, tile = (_as_int(v, what) for v in (row0, col0, tile))
        self._range_checks(what, t, row0, col0, amount, mlen)
        self._check_mram_target(what, mram, tile)
        self._check_transfer_format(what, t, "m")
        self._check_scales(what, t, row0, col0, amount, amount, mlen, True)
        self.comment(f"{what} -> {mram.name}[{tile}]")
        with self.scoped(self.addr(f"{what}: hbm base")) as a:
            self.set_addr(a, t.addr)
            self.set_scale(t.scale_offset)
            self.set_stride(t.row_bytes)
            with self.scoped(self.gp(f"{what}: mram addr"), self.gp(f"{what}: hbm offset")) as (m, h):
                self.li(m, mram.tile(tile))
                self.li(h, t.offset(row0, col0))
                self._emit("H_PREFETCH_M", (m, h, a, 1, t.funct1), None)

    def _check_mram_target(self, what: str, mram, tile: int) -> None:
        """The MRAM tiles one H_PREFETCH_M writes from ``tile`` lie inside ``mram``."""
        if not isinstance(mram, MramRegion):
            raise BuildError(f"{what}: {mram!r} is not an MramRegion")
        ntiles = self.cfg.hbm_m_prefetch_tiles
        if tile < 0 or tile + ntiles > mram.tiles:
            raise BuildError(f"{what}: tiles {tile}..{tile + ntiles - 1} are outside {mram.name!r} "
                             f"({mram.tiles} tiles; one H_PREFETCH_M writes {ntiles})")

    def load_tile_indexed(self, t: HbmTensor, index: Reg, count: int, rows_per_index: int, row0: int,
                          col0: int, mram: MramRegion, tile: int = 0) -> None:
        """:meth:`load_tile` of ``t[i*rows_per_index + row0 : ... + P, col0 : col0+MLEN]`` where
        ``i`` is the run-time value of the gp register ``index`` (e.g. an expert number read with
        S_LD_INT), assumed in ``[0, count)``: the HBM offset is ``S_MUL_INT`` of ``index`` by the
        row pitch of one index step. Every possible ``i`` is checked at build time (range and MX
        scale addressing). ``index`` is not modified. Clobbers SCALE and STRIDE."""
        mlen, amount = self.cfg.mlen, self.cfg.hbm_m_prefetch_amount
        what = (f"load_tile_indexed {getattr(t, 'name', t)!r}[{index}*{rows_per_index}+{row0}:+{amount}, "
                f"{col0}:{col0 + mlen}]")
        self._need_gp(index, what)
        count, rows_per_index, row0, col0, tile = (_as_int(v, what) for v in
                                                   (count, rows_per_index, row0, col0, tile))
        if count < 1 or rows_per_index < 0:
            raise BuildError(f"{what}: count must be >= 1 and rows_per_index >= 0")
        self._check_mram_target(what, mram, tile)
        for i in range(count):
            r = i * rows_per_index + row0
            self._range_checks(what, t, r, col0, amount, mlen)
            self._check_scales(what, t, r, col0, amount, amount, mlen, True)
        step = rows_per_index * t.row_bytes
        if (count - 1) * step + t.offset(row0, col0) >= U32_MOD:
            raise BuildError(f"{what}: HBM offsets exceed 32 bits")
        self._check_transfer_format(what, t, "m")
        self.comment(f"{what} -> {mram.name}[{tile}]")
        with self.scoped(self.addr(f"{what}: hbm base")) as a:
            self.set_addr(a, t.addr)
            self.set_scale(t.scale_offset)
            self.set_stride(t.row_bytes)
            with self.scoped(self.gp(f"{what}: mram addr"), self.gp(f"{what}: hbm offset")) as (m, h):
                self.li(h, step)
                self._emit("S_MUL_INT", (h, index, h), None)
                self.add_imm(h, t.offset(row0, col0))
                self.li(m, mram.tile(tile))
                self._emit("H_PREFETCH_M", (m, h, a, 1, t.funct1), None)

    # -- result ------------------------------------------------------------------------------

    def build(self):
        """Finish: returns a :class:`plena.frontend.program.Program`. Open loops are an error;
        an open top-level stage ends here. The builder may be extended and built again."""
        if len(self._frames) != 1:
            raise BuildError(f"build: loop {self._frames[-1].name!r} is still open")
        if self._open_stage is not None:
            self._end_stage()
        asm = "\n".join(self._lines) + "\n"
        n = -(-self._hbm_inputs_end // HBM_ALIGN) * HBM_ALIGN
        hbm = np.zeros(n, np.uint8)
        hbm[: min(n, len(self._hbm))] = np.frombuffer(bytes(self._hbm[:n]), np.uint8)
        f16 = np.asarray(self._fpsram, np.uint16)
        return Program(
            cfg=self.cfg, words=list(self._words), asm=asm, hbm=hbm,
            fpsram_f16=f16, fpsram_bf16=f16_bits_to_bf16_bits_np(f16).astype(np.uint16),
            intsram=np.asarray(self._intsram, np.uint32),
            tensors=dict(self._resources),
            stages={k: dataclasses.replace(v) for k, v in self._stages.items()},
            hbm_size=hbm_size_for(self._hbm_next),
            dynamic_instructions=self._frames[0].dyn,
        )
