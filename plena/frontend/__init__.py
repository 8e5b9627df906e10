"""PLENA program frontend: build programs in Python (:class:`ProgramBuilder`), get the exact
upstream assembly, machine code and preload files (:class:`Program`), and run them."""

from plena.frontend.builder import F0, GP0, ProgramBuilder, Reg
from plena.frontend.program import (BuildError, HbmTensor, MramRegion, Program, SramSlot, Stage,
                                    VramRegion, config_toml, hbm_size_for)

__all__ = [
    "ProgramBuilder", "Program", "BuildError", "Reg", "GP0", "F0", "VramRegion", "MramRegion",
    "HbmTensor", "SramSlot", "Stage", "config_toml", "hbm_size_for",
]
