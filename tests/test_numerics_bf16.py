"""bf16 conversions (spec §2.1 FP registers, §2.3 FP SRAM preload, §2.4/§2.9(a) VRAM cast)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from plena.numerics import (bf16_bits_to_f32, bf16_bits_to_f32_np, f16_bits_to_bf16_bits,
                            f16_bits_to_bf16_bits_np, f32_to_bf16_bits, f32_to_bf16_bits_np,
                            f32_to_bf16_bits_reg, f32_to_bf16_bits_reg_np)


def as_f32(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


def is_nan_bits(bits):
    return (np.asarray(bits, np.uint32) & 0x7FFFFFFF) > 0x7F800000


def ref_vram_nan(bits: int) -> int:
    """§2.9(a) for a NaN, from the spec's words: exponent stays all ones, the 23-bit mantissa is
    rounded to 7 bits (nearest, ties to even), a carry out of the mantissa saturates to inf."""
    sign, mant = bits >> 31, bits & 0x7FFFFF
    keep, dropped = mant >> 16, mant & 0xFFFF
    if dropped > 0x8000 or (dropped == 0x8000 and keep & 1):
        keep += 1
    if keep == 0x80:
        keep = 0
    return (sign << 15) | 0x7F80 | keep


def ml_bf16(bits):
    return as_f32(bits).astype(ml_dtypes.bfloat16).view(np.uint16)


ALL_CASTS = [f32_to_bf16_bits_np, f32_to_bf16_bits, jax.jit(f32_to_bf16_bits)]
REG_CASTS = [f32_to_bf16_bits_reg_np, f32_to_bf16_bits_reg, jax.jit(f32_to_bf16_bits_reg)]

SPEC_NAN_CASES = {0x7FC00000: 0x7FC0, 0xFFC00000: 0xFFC0, 0x7F800001: 0x7F80, 0x7FFFFFFF: 0x7F80}


@pytest.mark.parametrize("cast", ALL_CASTS)
def test_vram_cast_spec_nan_cases(cast):
    bits = np.array(list(SPEC_NAN_CASES), np.uint32)
    got = np.asarray(cast(as_f32(bits)))
    assert got.dtype == np.uint16
    assert [int(g) for g in got] == list(SPEC_NAN_CASES.values())


@pytest.mark.parametrize("cast", ALL_CASTS)
def test_vram_cast_nan_payload_rounding(cast):
    rng = np.random.default_rng(1)
    mant = np.concatenate([rng.integers(1, 1 << 23, 20000),
                           [1, 0x7FFF, 0x8000, 0x8001, 0x18000, 0x17FFF, 0x7F8000, 0x7F7FFF,
                            0x7FFFFF, 0x400000, 0x3F8000]]).astype(np.uint32)
    sign = rng.integers(0, 2, mant.size).astype(np.uint32) << 31
    bits = sign | 0x7F800000 | mant
    got = np.asarray(cast(as_f32(bits)))
    assert [int(g) for g in got] == [ref_vram_nan(int(b)) for b in bits]


EDGE = np.array([
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,            # zeros, infinities
    0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,            # ties to even and neighbours
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F0000,  # max finite / overflow
    0x00000001, 0x00008000, 0x00018000, 0x00007FFF, 0x007FFFFF,  # subnormals
    0x807FFFFF, 0x00800000, 0x00808000, 0x0080C000,
], np.uint32)


@pytest.mark.parametrize("cast", ALL_CASTS + REG_CASTS)
def test_non_nan_rounding_matches_ml_dtypes_rne(cast):
    rng = np.random.default_rng(2)
    bits = np.concatenate([EDGE, rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)])
    bits = bits[~is_nan_bits(bits)]
    got = np.asarray(cast(as_f32(bits)))
    want = ml_bf16(bits)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [hex(b) for b in bits[bad[:5]]]


def test_edge_values_by_hand():
    got = f32_to_bf16_bits_np(as_f32(EDGE))
    want = [0x0000, 0x8000, 0x7F80, 0xFF80,
            0x3F80, 0x3F82, 0x3F80, 0x3F81,
            0x7F80, 0xFF80, 0x7F7F, 0x7F80, 0x7F7F,
            0x0000, 0x0000, 0x0002, 0x0000, 0x0080,
            0x8080, 0x0080, 0x0080, 0x0081]
    assert [int(g) for g in got] == want


@pytest.mark.parametrize("cast", REG_CASTS)
def test_register_cast_nan_rule(cast):
    bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFF800001, 0x7FA51234],
                    np.uint32)
    got = np.asarray(cast(as_f32(bits)))
    assert [int(g) for g in got] == [0x7FC0, 0xFFC0, 0x7FC0, 0x7FFF, 0xFFC0, 0x7FE5]


@pytest.mark.parametrize("conv", [bf16_bits_to_f32_np, bf16_bits_to_f32])
def test_bf16_to_f32_exhaustive_and_round_trip(conv):
    b = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f = np.asarray(conv(b))
    assert f.dtype == np.float32
    assert np.array_equal(f.view(np.uint32), b.astype(np.uint32) << 16)
    ref = b.view(ml_dtypes.bfloat16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(f), nan) and np.array_equal(f[~nan], ref[~nan])
    # the VRAM cast is the identity on every bf16 value, NaNs included
    assert np.array_equal(f32_to_bf16_bits_np(f), b)
    assert np.array_equal(np.asarray(f32_to_bf16_bits(f)), b)
    # the register cast too, except that it quiets signalling NaNs
    reg = f32_to_bf16_bits_reg_np(f)
    assert np.array_equal(reg[~nan], b[~nan])
    assert np.array_equal(reg[nan], b[nan] | 0x40)


@functools.lru_cache(maxsize=None)
def ref_f16_preload_table() -> np.ndarray:
    return np.array([ref_f16_preload(c) for c in range(1 << 16)], np.uint16)


def ref_f16_preload(code: int) -> int:
    """f16 -> f32 (half::f16 -> f32: exact, NaN gets the f32 quiet bit, payload kept), then
    half::bf16::from_f32."""
    if (code & 0x7C00) == 0x7C00 and code & 0x3FF:
        f32bits = ((code & 0x8000) << 16) | 0x7FC00000 | ((code & 0x3FF) << 13)
        return (f32bits >> 16) | 0x40
    value = float(np.array([code], np.uint16).view(np.float16)[0])  # exact in float64
    return int(np.array([value], np.float64).astype(ml_dtypes.bfloat16).view(np.uint16)[0])


@pytest.mark.parametrize("conv", [f16_bits_to_bf16_bits_np, f16_bits_to_bf16_bits])
def test_f16_preload_exhaustive(conv):
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = np.asarray(conv(codes))
    assert got.dtype == np.uint16
    assert np.array_equal(got, ref_f16_preload_table())


def test_f16_preload_examples():
    f16 = np.array([1.5, -2.0, 65504.0, 2.0 ** -24, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8,
                    1.0 + 5 * 2.0 ** -10], np.float16).view(np.uint16)
    got = f16_bits_to_bf16_bits_np(f16)
    # 65504 rounds up to 65536; 1+2^-8 and 1+3*2^-8 are ties (to even); 1+5*2^-10 rounds up
    assert [int(g) for g in got] == [0x3FC0, 0xC000, 0x4780, 0x3380, 0x3F80, 0x3F82, 0x3F81]
    nan = np.array([0x7E00, 0xFE00, 0x7C01, 0x7FFF], np.uint16)
    assert [int(g) for g in f16_bits_to_bf16_bits_np(nan)] == [0x7FC0, 0xFFC0, 0x7FC0, 0x7FFF]


def test_jit_vmap_and_input_kinds():
    x = np.random.default_rng(3).standard_normal((4, 33)).astype(np.float32)
    want = ml_bf16(x.view(np.uint32))
    assert np.array_equal(np.asarray(f32_to_bf16_bits(jnp.asarray(x))), want)
    assert np.array_equal(np.asarray(jax.vmap(f32_to_bf16_bits)(x)), want)
    assert np.array_equal(np.asarray(jax.jit(jax.vmap(f32_to_bf16_bits_reg))(x)), want)
    assert np.array_equal(f32_to_bf16_bits_np(x.tolist()), want)  # plain Python lists too
    b = np.asarray(f32_to_bf16_bits(x))
    assert np.array_equal(np.asarray(jax.jit(bf16_bits_to_f32)(b)),
                          b.view(ml_dtypes.bfloat16).astype(np.float32))
    assert np.array_equal(np.asarray(jax.vmap(f16_bits_to_bf16_bits)(x.astype(np.float16).view(np.uint16))),
                          f16_bits_to_bf16_bits_np(x.astype(np.float16).view(np.uint16)))


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False))
def test_property_rne_and_round_trip(v):
    x = np.array([v], np.float32)
    b = f32_to_bf16_bits_np(x)
    assert b[0] == ml_bf16(x.view(np.uint32))[0]
    back = bf16_bits_to_f32_np(b)
    # the bf16 value is the nearest one: no bf16 value lies strictly closer
    if np.isfinite(back[0]) and np.isfinite(v):
        err = abs(float(back[0]) - float(x[0]))
        for nb in (int(b[0]) - 1, int(b[0]) + 1):
            other = float(bf16_bits_to_f32_np(np.array([nb & 0xFFFF], np.uint16))[0])
            if np.isfinite(other) and np.sign(other) == np.sign(back[0]):
                assert err <= abs(other - float(x[0]))
    assert f32_to_bf16_bits_np(back)[0] == b[0]
