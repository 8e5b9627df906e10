"""PLENA number formats and bit-exact conversions (spec §2.1, §2.3, §2.9).

* :mod:`.formats` — format descriptors (FloatType, IntType, PlainFormat, MxFormat, ...).
* :mod:`.bf16` — f32 <-> bf16 (VRAM cast, FP-register cast) and the f16 FP SRAM preload.
* :mod:`.minifloat` — decode tables for minifloat codes (e4m3, e8m0, bf16, ...).
* :mod:`.mx` — MX decode and the hardware MX encoder.

Every jnp function has a numpy twin with the ``_np`` suffix.
"""

from .bf16 import (bf16_bits_to_f32, bf16_bits_to_f32_np, f16_bits_to_bf16_bits,
                   f16_bits_to_bf16_bits_np, f32_bits, f32_bits_np, f32_from_bits,
                   f32_from_bits_np, f32_to_bf16_bits, f32_to_bf16_bits_np,
                   f32_to_bf16_bits_reg, f32_to_bf16_bits_reg_np)
from .formats import (BF16, E4M3, E8M0, MXFP8, PLAIN_BF16, DataType, FloatType, IntType,
                      MxFormat, PlainFormat, StorageFormat)
from .minifloat import decode, decode_np, decode_table
from .mx import (EPS_F32, floor_log2_f32, floor_log2_f32_np, ldexp_f32, ldexp_f32_np,
                 minifloat_hw, minifloat_hw_np, mx_decode, mx_decode_np, mx_encode,
                 mx_encode_np)

__all__ = [
    # formats
    "FloatType", "IntType", "PlainFormat", "MxFormat", "DataType", "StorageFormat",
    "BF16", "E4M3", "E8M0", "MXFP8", "PLAIN_BF16",
    # bf16
    "f32_to_bf16_bits", "f32_to_bf16_bits_np", "f32_to_bf16_bits_reg", "f32_to_bf16_bits_reg_np",
    "bf16_bits_to_f32", "bf16_bits_to_f32_np", "f16_bits_to_bf16_bits", "f16_bits_to_bf16_bits_np",
    "f32_bits", "f32_bits_np", "f32_from_bits", "f32_from_bits_np",
    # minifloat
    "decode_table", "decode", "decode_np",
    # mx
    "mx_decode", "mx_decode_np", "mx_encode", "mx_encode_np", "minifloat_hw", "minifloat_hw_np",
    "ldexp_f32", "ldexp_f32_np", "floor_log2_f32", "floor_log2_f32_np", "EPS_F32",
]
