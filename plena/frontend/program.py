"""The built artifact of :class:`plena.frontend.builder.ProgramBuilder`, and its vocabulary.

* placements: :class:`VramRegion`, :class:`MramRegion`, :class:`HbmTensor`, :class:`SramSlot`
  (where the builder put each named tensor), :class:`Stage` (a marked pc range);
* :class:`Program`: machine words, assembly text, the HBM / FP SRAM / INT SRAM preload images,
  placements, stages, config and a suitable ``--hbm-size``. :meth:`Program.write` produces
  the folder ``plena run`` (or the reference ``transactional_emulator``) takes,
  :meth:`Program.run` runs it on the JAX emulator, and the ``read_*`` methods extract named
  results from a :class:`plena.emu_jax.api.RunResult`.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Optional, Union

import numpy as np

from plena.config import (LATENCY_TABLES, PRECISION_TABLES, PlenaConfig, load_config)
from plena.isa.memfile import format_mem
from plena.numerics.containers import bits_to_f32_np
from plena.numerics.formats import FloatType, IntType, MxFormat, PlainFormat
from plena.numerics import codec

__all__ = [
    "BuildError", "VramRegion", "MramRegion", "HbmTensor", "SramSlot", "Stage", "Program",
    "hbm_size_for", "config_toml",
]

HBM_BLOCK = 64


class BuildError(ValueError):
    """A program the builder refuses to produce (names the op / tensor / loop at fault)."""




@dataclasses.dataclass(frozen=True)
class VramRegion:
    """``rows`` consecutive VLEN-element rows of Vector SRAM starting at element ``addr``."""

    name: str
    addr: int  # element address (a multiple of VLEN)
    rows: int
    vlen: int
    kind: str = "vram"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.vlen)

    @property
    def fmt(self) -> str:
        return "bf16"

    def row(self, i: int) -> int:
        """Element address of row ``i`` (0 <= i < rows)."""
        if not 0 <= i < self.rows:
            raise BuildError(f"VRAM region {self.name!r}: row {i} out of range (it has {self.rows} rows)")
        return self.addr + i * self.vlen


@dataclasses.dataclass(frozen=True)
class MramRegion:
    """``tiles`` consecutive MLEN x MLEN Matrix-SRAM tiles starting at element ``addr``."""

    name: str
    addr: int  # element address (a multiple of MLEN**2)
    tiles: int
    mlen: int
    kind: str = "mram"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.tiles, self.mlen, self.mlen)

    @property
    def fmt(self) -> str:
        return "f32"

    @property
    def first_tile(self) -> int:
        """Machine tile index of tile 0 of this region."""
        return self.addr // (self.mlen * self.mlen)

    def tile(self, i: int = 0) -> int:
        """Element address of tile ``i`` of the region (0 <= i < tiles)."""
        if not 0 <= i < self.tiles:
            raise BuildError(f"MRAM region {self.name!r}: tile {i} out of range (it has {self.tiles} tiles)")
        return self.addr + i * self.mlen * self.mlen


@dataclasses.dataclass(frozen=True)
class HbmTensor:
    """A 2-D MX tensor in HBM, laid out as spec §2.7: element bytes row-major
    (``stored_rows x cols``, pitch ``row_bytes``), then the scale bytes
    (``stored_rows x cols/block``, pitch ``scale_row_bytes``).

    ``rows`` is the logical row count; ``stored_rows >= rows`` adds zero rows (they decode to
    exact zeros) so that whole transfer bursts stay inside the tensor. ``scale_offset`` is the
    value for ``C_SET_SCALE_REG`` (``stored_rows * row_bytes``). ``use`` picks the precision
    flag of the transfers: ``"kv"`` -> funct1 = 1 (KV formats), else funct1 = 0 (activation
    format for H_PREFETCH_V / H_STORE_V, weight format for H_PREFETCH_M).
    """

    name: str
    kind: str  # "hbm_input" | "hbm_output"
    addr: int  # byte address (64-byte aligned)
    rows: int
    cols: int
    stored_rows: int
    fmt: MxFormat
    use: str  # "activation" | "weight" | "kv"
    decoded: Optional[np.ndarray] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def funct1(self) -> int:
        return 1 if self.use == "kv" else 0

    @property
    def elem_bits(self) -> int:
        """Bits per element (8 for MXFP8; sub-byte elements are packed, spec §2.9(b))."""
        return self.fmt.elem_bits

    @property
    def elem_bytes(self) -> int:
        """Bytes per element (1 for MXFP8; 0 for sub-byte elements)."""
        return self.elem_bits // 8

    @property
    def row_bytes(self) -> int:
        """Row pitch in bytes (the STRIDE register value)."""
        return self.cols * self.elem_bits // 8

    @property
    def scale_row_bytes(self) -> int:
        if not isinstance(self.fmt, MxFormat):
            return 0  # Plain formats have no scale stream
        return self.cols // self.fmt.block * (self.fmt.scale.width // 8)

    @property
    def scale_offset(self) -> int:
        """Size of the element region = the SCALE register value for this tensor."""
        return self.stored_rows * self.row_bytes

    @property
    def nbytes(self) -> int:
        return self.stored_rows * (self.row_bytes + self.scale_row_bytes)

    @property
    def end(self) -> int:
        return self.addr + self.nbytes

    def offset(self, row: int, col: int = 0) -> int:
        """Byte offset of element (row, col) from ``addr`` (the gp offset of a transfer)."""
        return row * self.row_bytes + col * self.elem_bits // 8

    def scale_address(self, row: int, col: int = 0) -> int:
        """Absolute byte address of the scale of the block holding element (row, col)."""
        return (self.addr + self.scale_offset + row * self.scale_row_bytes
                + col // self.fmt.block * (self.fmt.scale.width // 8))


class SramSlot(int):
    """The first index of a block of FP SRAM / INT SRAM entries. It *is* that index (an ``int``),
    so it can be used directly as an immediate; ``values`` holds what the machine sees there
    (for FP SRAM the exact bf16 values after the f32 -> f16 -> bf16 preload path)."""

    name: str
    kind: str  # "fpsram" | "intsram"
    values: np.ndarray

    def __new__(cls, index: int, name: str, kind: str, values: np.ndarray):
        obj = super().__new__(cls, index)
        obj.name, obj.kind, obj.values = name, kind, values
        return obj

    @property
    def addr(self) -> int:
        return int(self)

    @property
    def size(self) -> int:
        return len(self.values)

    @property
    def shape(self) -> tuple[int]:
        return (len(self.values),)

    @property
    def fmt(self) -> str:
        return "bf16 (f16 preload)" if self.kind == "fpsram" else "u32"

    def __repr__(self) -> str:
        return f"SramSlot({int(self)}, name={self.name!r}, kind={self.kind!r}, size={self.size})"


@dataclasses.dataclass
class Stage:
    """A marked program region: instructions ``start <= pc < end``. ``dynamic`` is the number
    of instructions it executes in a whole run (exact for straight-line code and builder loops;
    an upper bound if the program uses C_BREAK or writes a loop counter)."""

    name: str
    start: int
    end: Optional[int] = None
    dynamic: Optional[int] = None


Placement = Union[VramRegion, MramRegion, HbmTensor, SramSlot]


def hbm_size_for(end: int) -> int:
    """An HBM capacity covering bytes ``[0, end)``: rounded up to 64, at least 64."""
    return max(HBM_BLOCK, -(-end // HBM_BLOCK) * HBM_BLOCK)


# ---------------------------------------------------------------------------------------------
# plena_settings.toml writer
# ---------------------------------------------------------------------------------------------

def _dtype_lines(table: str, dt) -> list[str]:
    if isinstance(dt, FloatType):
        body = ['type = "Fp"', f"sign = {str(dt.sign).lower()}", f"exponent = {dt.exponent}",
                f"mantissa = {dt.mantissa}"]
    elif isinstance(dt, IntType):
        body = ['type = "Int"', f"width = {dt.width}"]
    else:
        raise TypeError(f"cannot write data type {dt!r}")
    return [f"[{table}]", *body]


def _storage_lines(table: str, fmt) -> list[str]:
    if isinstance(fmt, PlainFormat):
        return [f"[{table}]", 'format = "Plain"', *_dtype_lines(f"{table}.DATA_TYPE", fmt.data)]
    if isinstance(fmt, MxFormat):
        return [f"[{table}]", 'format = "Mx"', f"block = {fmt.block}",
                *_dtype_lines(f"{table}.ELEM", fmt.elem), *_dtype_lines(f"{table}.SCALE", fmt.scale)]
    raise TypeError(f"cannot write storage format {fmt!r}")


def config_toml(cfg: PlenaConfig, section: str = "TRANSACTIONAL") -> str:
    """``cfg`` as an upstream-schema ``plena_settings.toml`` (one section) that
    :func:`plena.config.load_config` reads back equal to ``cfg``."""
    out = ["# PLENA machine written by plena.frontend (upstream plena_settings.toml schema)", ""]
    for key, value in cfg.config_values().items():
        out += [f"[{section}.CONFIG.{key}]", f"value = {value}", ""]
    for field, table in PRECISION_TABLES:
        out += _storage_lines(f"{section}.PRECISION.{table}", getattr(cfg.precision, field)) + [""]
    out += _dtype_lines(f"{section}.PRECISION.SCALAR_FP", cfg.precision.scalar_fp) + [""]
    for field, table in LATENCY_TABLES:
        lat = getattr(cfg.latency, field)
        out += [f"[{section}.LATENCY.{table}]", f"dc_lib_en = {lat.en}", f"dc_lib_dis = {lat.dis}", ""]
    return "\n".join(out)


def _placement_json(p: Placement) -> dict:
    d = {"kind": p.kind, "address": int(p.addr), "shape": list(p.shape), "fmt": str(p.fmt)}
    if isinstance(p, HbmTensor):
        d.update(stored_rows=p.stored_rows, row_bytes=p.row_bytes, scale_offset=p.scale_offset,
                 scale_address=p.addr + p.scale_offset, nbytes=p.nbytes, use=p.use, funct1=p.funct1)
    return d


# ---------------------------------------------------------------------------------------------
# the program
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Program:
    """A built PLENA program with everything needed to run it.

    Attributes:
        cfg: the machine it was built for.
        words: machine code, one u32 per instruction.
        asm: upstream assembly text (assembles to ``words``; ``; stage: NAME`` markers).
        hbm: u8 HBM preload image from address 0 (covers the input tensors).
        fpsram_f16: u16 IEEE f16 bits, the FP SRAM preload file's contents.
        fpsram_bf16: u16 bf16 bits the machine holds after loading that file.
        intsram: u32 INT SRAM preload.
        tensors: name -> placement (VramRegion, MramRegion, HbmTensor, SramSlot); each has
            ``kind``, ``addr``, ``shape``, ``fmt``.
        stages: name -> :class:`Stage` (pc range and dynamic instruction count).
        hbm_size: a ``--hbm-size`` covering every HBM placement, outputs included.
        dynamic_instructions: instructions the run executes (static count: exact unless the
            program uses C_BREAK or writes a loop counter).
    """

    cfg: PlenaConfig
    words: list
    asm: str
    hbm: np.ndarray
    fpsram_f16: np.ndarray
    fpsram_bf16: np.ndarray
    intsram: np.ndarray
    tensors: dict
    stages: dict
    hbm_size: int
    dynamic_instructions: int

    # -- files -------------------------------------------------------------------------------

    FILES = {"opcode": "program.mem", "hbm": "hbm.bin", "fpsram": "fp_sram.bin",
             "intsram": "int_sram.bin", "settings": "plena_settings.toml"}

    VRAM_FILE = "vram_preload.bin"

    def cli_args(self, *, vram: bool = False) -> list[str]:
        """The ``plena run`` / ``transactional_emulator`` flags for a folder written by
        :meth:`write` (file names relative to that folder)."""
        args = []
        for flag, name in self.FILES.items():
            args += [f"--{flag}", name]
        if vram:
            args += ["--vram", self.VRAM_FILE]
        return args + ["--hbm-size", str(self.hbm_size)]

    def _write_settings(self, path: Path) -> None:
        src = self.cfg.source
        if src and self.cfg.section == "TRANSACTIONAL" and Path(src).is_file():
            try:
                same = load_config(src) == self.cfg
            except ValueError:
                same = False
            if same:
                path.write_bytes(Path(src).read_bytes())
                return
        path.write_text(config_toml(self.cfg))
        if load_config(path) != self.cfg:  # pragma: no cover - guards the writer
            raise RuntimeError(f"{path}: the written settings do not describe the program's machine")

    def write(self, directory: Union[str, Path], *, vram=None) -> Path:
        """Write program.asm, program.mem, hbm.bin, fp_sram.bin (f16 LE), int_sram.bin,
        plena_settings.toml, tensors.json and run.sh into ``directory`` (created if needed), and
        ``vram_preload.bin`` (bf16 LE) when a VRAM preload (u16 bf16 bits) is given.
        ``sh run.sh [--out DIR]`` runs it with ``$PLENA`` (default ``plena``)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "program.asm").write_text(self.asm)
        (d / self.FILES["opcode"]).write_text(format_mem(self.words))
        (d / self.FILES["hbm"]).write_bytes(np.asarray(self.hbm, np.uint8).tobytes())
        (d / self.FILES["fpsram"]).write_bytes(np.asarray(self.fpsram_f16, "<u2").tobytes())
        (d / self.FILES["intsram"]).write_bytes(np.asarray(self.intsram, "<u4").tobytes())
        self._write_settings(d / self.FILES["settings"])
        if vram is not None:
            (d / self.VRAM_FILE).write_bytes(np.asarray(vram, "<u2").tobytes())
        meta = {"hbm_size": self.hbm_size, "instructions": len(self.words),
                "dynamic_instructions": self.dynamic_instructions,
                "tensors": {k: _placement_json(v) for k, v in self.tensors.items()},
                "stages": {k: dataclasses.asdict(v) for k, v in self.stages.items()}}
        (d / "tensors.json").write_text(json.dumps(meta, indent=2) + "\n")
        cmd = " ".join(shlex.quote(a) for a in self.cli_args(vram=vram is not None))
        (d / "run.sh").write_text("#!/bin/sh\n# Runs this program on PLENA-JAX (the reference "
                                  "transactional_emulator takes the same flags).\n"
                                  'cd "$(dirname "$0")" || exit 1\n'
                                  f'exec ${{PLENA:-plena}} run {cmd} "$@"\n')
        (d / "run.sh").chmod(0o755)
        return d

    # -- running -----------------------------------------------------------------------------

    def run(self, **kwargs):
        """Run on the JAX emulator (:func:`plena.emu_jax.api.run`; FP SRAM as the bf16 bits the
        preload file turns into). Extra keyword arguments go to ``run``."""
        from plena.emu_jax.api import run

        kwargs.setdefault("hbm_size", self.hbm_size)
        return run(self.words, self.cfg, hbm=self.hbm, fpsram=self.fpsram_bf16,
                   intsram=self.intsram, **kwargs)

    def _get(self, name_or_placement, cls):
        p = self.tensors.get(name_or_placement) if isinstance(name_or_placement, str) else name_or_placement
        if not isinstance(p, cls):
            raise KeyError(f"{name_or_placement!r} is not a {cls.__name__} of this program")
        return p

    def read_vram(self, result, region) -> np.ndarray:
        """f32 [rows, VLEN] contents of a VRAM region (by name or object) after ``result``."""
        r = self._get(region, VramRegion)
        bits = np.asarray(result.vram_bits())
        n = r.rows * r.vlen
        window = bits[r.addr: r.addr + n]
        out = np.zeros(n, bits.dtype)  # rows past the emulated window are 0 (never written)
        out[: len(window)] = window
        return bits_to_f32_np(out).reshape(r.rows, r.vlen)  # bf16 or f32 (wide) container

    def read_mram(self, result, region, tile: int = 0) -> np.ndarray:
        """f32 [MLEN, MLEN] exact contents of tile ``tile`` of an MRAM region."""
        r = self._get(region, MramRegion)
        return np.asarray(result.state.mram[r.tile(tile) // (r.mlen * r.mlen)])

    def read_hbm_output(self, result, tensor) -> np.ndarray:
        """f32 (rows, cols): an HBM tensor (by name or object; outputs or inputs) after
        ``result``, MX-decoded exactly as the machine would load it."""
        t = self._get(tensor, HbmTensor)
        hbm = np.asarray(result.state.hbm)
        raw = np.zeros(t.nbytes, np.uint8)
        have = hbm[t.addr: t.addr + t.nbytes]
        raw[: len(have)] = have
        elem = codec.unpack_codes_np(raw[: t.rows * t.row_bytes].reshape(t.rows, t.row_bytes),
                                     t.elem_bits, t.cols)
        if not isinstance(t.fmt, MxFormat):
            return codec.decode_np(elem, t.fmt.data)
        scale = raw[t.scale_offset: t.scale_offset + t.rows * t.scale_row_bytes].reshape(t.rows, -1)
        return codec.mx_decode_np(elem, scale, t.fmt)

    def read_fpsram(self, result, slot) -> np.ndarray:
        """f32 values of an FP SRAM block (by name or slot) after ``result``."""
        s = self._get(slot, SramSlot)
        bits = np.asarray(result.state.fpsram)[int(s): int(s) + s.size]
        return bits_to_f32_np(bits)
