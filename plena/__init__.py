"""PLENA-JAX: the PLENA accelerator's ISA, numerics, emulator, golden model and frontend."""

from plena import xla_options as _xla_options

_xla_options.configure()  # before JAX starts its backend (see plena/xla_options.py)
