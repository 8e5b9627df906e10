"""Number-format descriptors shared by the config loader, the numerics and the emulator.

These mirror the upstream ``plena_settings.toml`` precision schema (spec §1.3): a scalar
``DataType`` is either a minifloat (``FloatType``: sign/exponent/mantissa bits, implicit bias
``2**(exponent-1) - 1``, all-ones exponent = inf/NaN) or an integer (``IntType``), and a
storage format is either ``PlainFormat`` (one data type) or ``MxFormat`` (a block of elements
sharing one scale). All are frozen and hashable so a config can be a static jit argument.
"""

from __future__ import annotations

import dataclasses
from typing import Union


@dataclasses.dataclass(frozen=True)
class FloatType:
    sign: bool
    exponent: int
    mantissa: int

    @property
    def width(self) -> int:
        return int(self.sign) + self.exponent + self.mantissa

    @property
    def bias(self) -> int:
        return (1 << (self.exponent - 1)) - 1 if self.exponent > 0 else 0

    def __str__(self) -> str:
        return f"e{self.exponent}m{self.mantissa}{'s' if self.sign else 'u'}"


@dataclasses.dataclass(frozen=True)
class IntType:
    width: int

    def __str__(self) -> str:
        return f"int{self.width}"


DataType = Union[FloatType, IntType]


@dataclasses.dataclass(frozen=True)
class PlainFormat:
    data: DataType

    @property
    def elem_bits(self) -> int:
        return self.data.width

    @property
    def element_scale_ratio(self) -> int:
        """Spec §1.3: 1 for Plain types (no scale stream)."""
        return 1

    def __str__(self) -> str:
        return f"Plain({self.data})"


@dataclasses.dataclass(frozen=True)
class MxFormat:
    block: int
    elem: DataType
    scale: DataType

    @property
    def elem_bits(self) -> int:
        return self.elem.width

    @property
    def element_scale_ratio(self) -> int:
        """Spec §1.3: ``elem_bits * block / scale_bits`` (8 for MXFP8)."""
        return self.elem.width * self.block // self.scale.width

    def __str__(self) -> str:
        return f"Mx(block={self.block}, elem={self.elem}, scale={self.scale})"


StorageFormat = Union[PlainFormat, MxFormat]

BF16 = FloatType(sign=True, exponent=8, mantissa=7)
E4M3 = FloatType(sign=True, exponent=4, mantissa=3)
E8M0 = FloatType(sign=False, exponent=8, mantissa=0)
MXFP8 = MxFormat(block=8, elem=E4M3, scale=E8M0)
PLAIN_BF16 = PlainFormat(BF16)
