"""Machine-code files (spec §3.5): one ``0x%08X`` word per line.

The reader accepts what the reference emulator accepts: whitespace-separated tokens, every
leading lower-case ``0x`` stripped, the rest parsed as base-16 u32. Anything else is an error
naming the token's position (the reference panics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


class MemFileError(ValueError):
    pass


def parse_mem(text: str, *, source: str = "<mem>") -> list[int]:
    words = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        for tok in line.split():
            digits = tok
            while digits.startswith("0x"):
                digits = digits[2:]
            try:
                if not digits or not all(c in "0123456789abcdefABCDEF" for c in digits):
                    raise ValueError
                value = int(digits, 16)
            except ValueError:
                raise MemFileError(f"{source}:{lineno}: token {tok!r} (instruction {len(words)}) "
                                   "is not a hexadecimal u32") from None
            if value > 0xFFFFFFFF:
                raise MemFileError(f"{source}:{lineno}: token {tok!r} (instruction {len(words)}) "
                                   "does not fit in 32 bits")
            words.append(value)
    return words


def read_mem(path: str | Path) -> list[int]:
    path = Path(path)
    return parse_mem(path.read_text(), source=str(path))


def format_mem(words: Iterable[int]) -> str:
    return "".join(f"0x{w:08X}\n" for w in words)


def write_mem(path: str | Path, words: Iterable[int]) -> None:
    Path(path).write_text(format_mem(words))


def read_program(path: str | Path) -> list[int]:
    """Read a program given as ``.asm`` text or ``.mem`` machine code (by extension)."""
    path = Path(path)
    if path.suffix == ".asm":
        from plena.isa.assembler import assemble_file

        return assemble_file(path)
    return read_mem(path)
