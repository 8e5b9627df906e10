"""The reference emulator's input and output files (spec §2.3-2.5, §5).

Inputs are converted to machine formats (HBM bytes, bf16 bits for FP SRAM and VRAM, u32 INT
SRAM); outputs are written in the reference's dump formats so existing checkers read them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plena.emu_jax.errors import LoadError
from plena.numerics.bf16 import f16_bits_to_bf16_bits_np

SRAM_WORDS = 1024


def read_bytes(path) -> np.ndarray:
    return np.fromfile(Path(path), dtype=np.uint8)


def load_fpsram(path) -> np.ndarray:
    """FP SRAM preload: IEEE f16 LE values -> bf16 bits (RNE); an odd last byte is ignored."""
    raw = read_bytes(path)
    words = raw[: len(raw) // 2 * 2].view("<u2")
    if len(words) > SRAM_WORDS:
        raise LoadError(f"FP SRAM preload has {len(words)} entries (at most {SRAM_WORDS})", detail=str(path))
    return f16_bits_to_bf16_bits_np(words.astype(np.uint16))


def load_intsram(path) -> np.ndarray:
    raw = read_bytes(path)
    words = raw[: len(raw) // 4 * 4].view("<u4").astype(np.uint32)
    if len(words) > SRAM_WORDS:
        raise LoadError(f"INT SRAM preload has {len(words)} entries (at most {SRAM_WORDS})", detail=str(path))
    return words


def load_vram(path) -> np.ndarray:
    raw = read_bytes(path)
    return raw[: len(raw) // 2 * 2].view("<u2").astype(np.uint16)
