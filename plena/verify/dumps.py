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
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

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
        vram: ``uint16`` flat array of bf16 bits; element ``i`` = VRAM element address ``i``.
            May be shorter than the machine's VRAM (missing elements read as 0).
        mram: ``uint16`` flat array of MRAM element bits (tile after tile), or ``None``.
        fpsram: ``uint16[1024]`` bf16 bits.
        intsram: ``uint32[1024]``.
        hbm: ``uint8`` array of HBM bytes from address 0, or ``None`` when not dumped.
    """

    vram: np.ndarray
    mram: Optional[np.ndarray]
    fpsram: np.ndarray
    intsram: np.ndarray
    hbm: Optional[np.ndarray] = None


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


def read_dump_dir(path: str | Path, *, mmap: bool = True) -> Dumps:
    """Read the dump files the reference emulator leaves in directory ``path``.

    ``vram_dump.bin``, ``fpsram_dump.bin`` and ``intsram_dump.bin`` are required;
    ``mram_dump.bin`` and ``hbm_dump.bin`` are optional (``None`` when absent).  The large
    files (VRAM, MRAM, HBM) are memory-mapped read-only by default (``mmap=False`` reads them
    into memory with ``np.fromfile``); nothing is decoded element by element in Python.
    Scalar SRAM dumps shorter than 1024 entries are zero-padded to 1024.
    """
    d = Path(path)
    vram = _read(d / VRAM_FILE, "<u2", mmap)
    mram_p = d / MRAM_FILE
    mram = _read(mram_p, "<u2", mmap) if mram_p.exists() else None
    fpsram = _pad(np.array(_read(d / FPSRAM_FILE, "<u2", False)), SCALAR_SRAM_DEPTH)
    intsram = _pad(np.array(_read(d / INTSRAM_FILE, "<u4", False)), SCALAR_SRAM_DEPTH)
    hbm_p = d / HBM_FILE
    hbm = _read(hbm_p, "u1", mmap) if hbm_p.exists() else None
    return Dumps(vram=vram, mram=mram, fpsram=fpsram, intsram=intsram, hbm=hbm)


def _write(arr, dtype: str, path: Path) -> None:
    a = np.asarray(arr)
    if a.dtype.kind not in "ui" or a.dtype.itemsize != np.dtype(dtype).itemsize:
        raise TypeError(f"{path.name}: expected raw {dtype} bits, got an array of {a.dtype}")
    np.ascontiguousarray(a.reshape(-1).astype(dtype, copy=False)).tofile(path)


def write_dump_dir(dumps: Dumps, path: str | Path, *, hbm: bool = False) -> None:
    """Write ``dumps`` into directory ``path`` (created if needed) in the reference formats.

    Arrays must hold raw bits (uint16 for VRAM/MRAM/FP SRAM, uint32 for INT SRAM, uint8 for
    HBM); they are written little-endian exactly as given (no padding to the machine size).
    ``mram_dump.bin`` is written only when ``dumps.mram`` is not ``None``; ``hbm_dump.bin``
    only when ``hbm=True`` (like the reference, which dumps HBM only with DEBUG tracing).
    """
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    _write(dumps.vram, "<u2", d / VRAM_FILE)
    if dumps.mram is not None:
        _write(dumps.mram, "<u2", d / MRAM_FILE)
    _write(dumps.fpsram, "<u2", d / FPSRAM_FILE)
    _write(dumps.intsram, "<u4", d / INTSRAM_FILE)
    if hbm:
        if dumps.hbm is None:
            raise ValueError("write_dump_dir(hbm=True) but dumps.hbm is None")
        _write(dumps.hbm, "u1", d / HBM_FILE)
