"""Memory dumps in the reference emulator's file formats (spec §5.2, §2.3-2.5, §2.7).

At the end of a run the reference transactional emulator writes, into its working directory:

==================  ====================================================================
``vram_dump.bin``   every VRAM row in order, bf16 little-endian; element ``i`` (the VRAM
                    element address ``i``) is at byte ``2*i``.  512 MiB for the full
                    TRANSACTIONAL machine.
``mram_dump.bin``   every MRAM tile in order, each element encoded as MATRIX_SRAM_TYPE
                    (bf16 LE).
``fpsram_dump.bin`` 1024 x bf16 LE (NOT f16, although the preload file is f16).
``intsram_dump.bin`` 1024 x u32 LE.
``hbm_dump.bin``    the whole HBM, raw bytes (only written with DEBUG tracing).
==================  ====================================================================

:class:`Dumps` holds the same content as flat numpy arrays of raw bits; :func:`read_dump_dir`
and :func:`write_dump_dir` convert between the two.  A ``Dumps.vram`` may be shorter than the
machine's VRAM: consumers must read elements past its end as 0 (the reset value).

**Formats other than the default** (docs/formats.md, "Dumps"):

* VRAM whose VECTOR_SRAM_TYPE is wider than bf16 (e.g. fp16 e5m10, fp32 e8m23): in memory
  ``Dumps.vram`` holds the emulator's container, ``uint32`` f32 bits of values of the type,
  and ``Dumps.vram_type`` names the type. ``vram_dump.bin`` then has the reference's layout
  for such a VRAM (spec §2.4: "packed bits" of VECTOR_SRAM_TYPE): every element encoded in
  the type (:mod:`plena.numerics.codec`), packed little-endian at the type's width (2 bytes
  per element for fp16, 4 for fp32, the first element in the lowest bits). A type that is a
  subset of bf16 keeps the bf16 container and the bf16 file.
* MRAM with MATRIX_SRAM_TYPE other than bf16: ``Dumps.mram`` holds the ``uint32`` codes of
  the type (the MRAM values are already in the type) and ``Dumps.mram_type`` names it;
  ``mram_dump.bin`` packs them little-endian at the type's width (e.g. 19-bit e8m10 codes
  straddle bytes), as the reference would write "each element encoded with MATRIX_SRAM_TYPE".
* FP SRAM with a SCALAR_FP wider than bf16: ``Dumps.fpsram`` is ``uint32`` f32 bits and
  ``fpsram_dump.bin`` is 1024 x f32 LE (4096 B). (The reference always dumps bf16; an FP SRAM
  entry may hold a value outside SCALAR_FP, e.g. a preloaded constant, so f32 is kept.)

Reading such a folder back needs the types: ``read_dump_dir(path, vram_type=..., mram_type=...,
fpsram_bits=32)`` (or ``cfg=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from plena.numerics import codec
from plena.numerics.bf16 import f32_bits_np, f32_to_bf16_bits_np
from plena.numerics.containers import bits_to_f32_np, is_bf16, is_wide

__all__ = [
    "Dumps",
    "read_dump_dir",
    "write_dump_dir",
    "VRAM_FILE",
    "MRAM_FILE",
    "FPSRAM_FILE",
    "INTSRAM_FILE",
    "HBM_FILE",
    "SCALAR_SRAM_DEPTH",
    "dump_types",
    "mram_dump_bits",
]

VRAM_FILE = "vram_dump.bin"
MRAM_FILE = "mram_dump.bin"
FPSRAM_FILE = "fpsram_dump.bin"
INTSRAM_FILE = "intsram_dump.bin"
HBM_FILE = "hbm_dump.bin"

#: FP SRAM and INT SRAM both hold 1024 entries (spec §2.3).
SCALAR_SRAM_DEPTH = 1024


class Dumps(NamedTuple):
    """Raw end-of-run memory contents.

    Attributes:
        vram: ``uint16`` flat array of bf16 bits (``uint32`` f32 bits when ``vram_type`` is
            set); element ``i`` = VRAM element address ``i``. May be shorter than the
            machine's VRAM (missing elements read as 0).
        mram: ``uint16`` flat array of MRAM element bits (tile after tile; ``uint32`` codes of
            ``mram_type`` when it is set), or ``None``.
        fpsram: ``uint16[1024]`` bf16 bits (``uint32`` f32 bits for a wide SCALAR_FP).
        intsram: ``uint32[1024]``.
        hbm: ``uint8`` array of HBM bytes from address 0, or ``None`` when not dumped.
        vram_type: VECTOR_SRAM_TYPE's data type when VRAM is held in the wide (f32) container
            (the file packs codes of it), else ``None``.
        mram_type: MATRIX_SRAM_TYPE's data type when it is not bf16 (``mram`` holds its codes),
            else ``None``.
    """

    vram: np.ndarray
    mram: Optional[np.ndarray]
    fpsram: np.ndarray
    intsram: np.ndarray
    hbm: Optional[np.ndarray] = None
    vram_type: Optional[object] = None
    mram_type: Optional[object] = None


def dump_types(cfg) -> dict:
    """``{"vram_type": ..., "mram_type": ...}`` of a config for :class:`Dumps` /
    :func:`read_dump_dir` (``None`` for the default layouts)."""
    p = cfg.precision
    v, m = p.vector_sram_type.data, p.matrix_sram_type.data
    return {"vram_type": v if is_wide(v) else None, "mram_type": None if is_bf16(m) else m}


def mram_dump_bits(mram_f32, cfg) -> np.ndarray:
    """MRAM contents (f32 values, flat) as dumped: bf16 bits (RNE, the reference's dump) for
    MATRIX_SRAM_TYPE = bf16, else the ``uint32`` codes of MATRIX_SRAM_TYPE."""
    t = cfg.precision.matrix_sram_type.data
    vals = np.asarray(mram_f32, np.float32).reshape(-1)
    if is_bf16(t):
        return f32_to_bf16_bits_np(vals)
    return codec.encode_np(vals, t).astype(np.uint32)


def _pack_file(codes: np.ndarray, width: int, path: Path) -> None:
    codes = np.asarray(codes, np.uint32).reshape(-1)
    per = 8 // np.gcd(width, 8)  # codes per whole number of bytes
    pad = (-codes.size) % per
    codec.pack_codes_np(np.concatenate([codes, np.zeros(pad, np.uint32)]), width).tofile(path)


def _unpack_file(path: Path, width: int) -> np.ndarray:
    raw = np.fromfile(path, np.uint8)
    return codec.unpack_codes_np(raw, width, raw.size * 8 // width)


def _read(path: Path, dtype: str, mmap: bool) -> np.ndarray:
    """Read a whole little-endian file as a flat array (memory-mapped when ``mmap``)."""
    itemsize = np.dtype(dtype).itemsize
    nbytes = path.stat().st_size
    count = nbytes // itemsize  # a trailing partial element is ignored
    if count == 0:
        return np.zeros(0, dtype=np.dtype(dtype).newbyteorder("="))
    if mmap:
        arr = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    else:
        arr = np.fromfile(path, dtype=dtype, count=count)
    # On a little-endian host '<u2' is already native and this is free (no copy).
    return arr.astype(np.dtype(dtype).newbyteorder("="), copy=False)


def _pad(arr: np.ndarray, n: int) -> np.ndarray:
    if arr.size >= n:
        return arr
    out = np.zeros(n, dtype=arr.dtype)
    out[: arr.size] = arr
    return out


def read_dump_dir(path: str | Path, *, mmap: bool = True, cfg=None, vram_type=None, mram_type=None,
                  fpsram_bits: int = 16) -> Dumps:
    """Read the dump files the reference emulator leaves in directory ``path``.

    ``vram_dump.bin``, ``fpsram_dump.bin`` and ``intsram_dump.bin`` are required;
    ``mram_dump.bin`` and ``hbm_dump.bin`` are optional (``None`` when absent).  The large
    files (VRAM, MRAM, HBM) are memory-mapped read-only by default (``mmap=False`` reads them
    into memory with ``np.fromfile``); nothing is decoded element by element in Python.
    Scalar SRAM dumps shorter than 1024 entries are zero-padded to 1024.

    Non-default formats (see the module docstring): ``vram_type`` (a wide VECTOR_SRAM_TYPE)
    unpacks its codes into f32 container bits, ``mram_type`` unpacks MATRIX_SRAM_TYPE codes,
    ``fpsram_bits=32`` reads an f32 FP SRAM dump; ``cfg`` sets all three from a config.
    """
    d = Path(path)
    if cfg is not None:
        types = dump_types(cfg)
        vram_type, mram_type = types["vram_type"], types["mram_type"]
        fpsram_bits = 32 if is_wide(cfg.precision.scalar_fp) else 16
    if vram_type is None:
        vram = _read(d / VRAM_FILE, "<u2", mmap)
    else:
        vals = codec.decode_np(_unpack_file(d / VRAM_FILE, vram_type.width), vram_type)
        vram = f32_bits_np(vals).astype(np.uint32)
    mram_p = d / MRAM_FILE
    if not mram_p.exists():
        mram = None
    elif mram_type is None:
        mram = _read(mram_p, "<u2", mmap)
    else:
        mram = _unpack_file(mram_p, mram_type.width)
    fps_dt = "<u4" if fpsram_bits == 32 else "<u2"
    fpsram = _pad(np.array(_read(d / FPSRAM_FILE, fps_dt, False)), SCALAR_SRAM_DEPTH)
    intsram = _pad(np.array(_read(d / INTSRAM_FILE, "<u4", False)), SCALAR_SRAM_DEPTH)
    hbm_p = d / HBM_FILE
    hbm = _read(hbm_p, "u1", mmap) if hbm_p.exists() else None
    return Dumps(vram=vram, mram=mram, fpsram=fpsram, intsram=intsram, hbm=hbm, vram_type=vram_type,
                 mram_type=mram_type)


def _write(arr, dtype: str, path: Path) -> None:
    a = np.asarray(arr)
    if a.dtype.kind not in "ui" or a.dtype.itemsize != np.dtype(dtype).itemsize:
        raise TypeError(f"{path.name}: expected raw {dtype} bits, got an array of {a.dtype}")
    np.ascontiguousarray(a.reshape(-1).astype(dtype, copy=False)).tofile(path)


def write_dump_dir(dumps: Dumps, path: str | Path, *, hbm: bool = False) -> None:
    """Write ``dumps`` into directory ``path`` (created if needed) in the reference formats.

    Arrays must hold raw bits (uint16 for VRAM/MRAM/FP SRAM, uint32 for INT SRAM, uint8 for
    HBM); they are written little-endian exactly as given (no padding to the machine size).
    Non-default formats (``dumps.vram_type`` / ``dumps.mram_type`` set, a ``uint32`` FP SRAM)
    are written as the module docstring describes.
    ``mram_dump.bin`` is written only when ``dumps.mram`` is not ``None``; ``hbm_dump.bin``
    only when ``hbm=True`` (like the reference, which dumps HBM only with DEBUG tracing).
    """
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    if dumps.vram_type is None:
        _write(dumps.vram, "<u2", d / VRAM_FILE)
    else:
        t = dumps.vram_type
        _pack_file(codec.encode_np(bits_to_f32_np(np.asarray(dumps.vram).reshape(-1)), t), t.width, d / VRAM_FILE)
    if dumps.mram is not None:
        if dumps.mram_type is None:
            _write(dumps.mram, "<u2", d / MRAM_FILE)
        else:
            _pack_file(dumps.mram, dumps.mram_type.width, d / MRAM_FILE)
    fps = np.asarray(dumps.fpsram)
    _write(fps, "<u4" if fps.dtype == np.uint32 else "<u2", d / FPSRAM_FILE)
    _write(dumps.intsram, "<u4", d / INTSRAM_FILE)
    if hbm:
        if dumps.hbm is None:
            raise ValueError("write_dump_dir(hbm=True) but dumps.hbm is None")
        _write(dumps.hbm, "u1", d / HBM_FILE)
