"""Minifloat decode tables (spec §2.9(a)): e4m3, e8m0, bf16, f16 and odd types."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from plena.numerics import BF16, E4M3, E8M0, FloatType, IntType, decode, decode_np, decode_table


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def spec_e4m3(code: int) -> float:
    """§2.9(a)'s e4m3 table, written out from the spec text."""
    s, e, m = code >> 7, (code >> 3) & 0xF, code & 7
    sign = -1.0 if s else 1.0
    if e == 0:
        return sign * m * 2.0 ** -10
    if e == 15:
        return sign * math.inf if m == 0 else math.nan
    return sign * (8 + m) * 2.0 ** (e - 10)


def test_all_256_e4m3_codes_match_the_spec_table():
    table = decode_table(E4M3)
    assert table.dtype == np.float32 and table.shape == (256,)
    expected = np.array([spec_e4m3(c) for c in range(256)], np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(table), nan)
    # bitwise, so the sign of zero counts (0x80 is -0.0)
    assert np.array_equal(_bits(table)[~nan], _bits(expected)[~nan])
    # a few anchors quoted by the spec
    assert table[0x38] == 1.0 and table[0x3F] == 1.875 and table[0x08] == 2.0 ** -6
    assert table[0x77] == 240.0 and table[0x01] == 0.0009765625 and table[0x07] == 0.0068359375
    assert table[0x78] == np.inf and table[0xF8] == -np.inf
    assert np.signbit(table[0x80])


def test_e4m3_nan_keeps_its_payload_shifted_into_the_f32_mantissa():
    table = decode_table(E4M3)
    assert _bits(table)[0x79] == 0x7F800000 | (1 << 20)
    assert _bits(table)[0xFF] == 0xFF800000 | (7 << 20)


def test_e8m0_codes():
    table = decode_table(E8M0)
    assert table.shape == (256,)
    assert table[0] == 0.0 and not np.signbit(table[0])
    for b in range(1, 255):
        assert table[b] == np.float32(2.0 ** (b - 127)), b
    assert table[255] == np.inf


def test_bf16_decode_is_exact_ieee_including_subnormals():
    table = decode_table(BF16)
    ref = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    ref = ref.astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(table), nan)
    assert np.array_equal(_bits(table)[~nan], _bits(ref)[~nan])
    # same exponent width: even NaN payloads are a plain 16-bit shift
    assert np.array_equal(_bits(table), np.arange(1 << 16, dtype=np.uint32) << 16)


def test_f16_decode_halves_subnormals_and_keeps_normals():
    f16 = FloatType(True, 5, 10)
    table = decode_table(f16)
    codes = np.arange(1 << 16, dtype=np.uint32)
    ieee = codes.astype(np.uint16).view(np.float16).astype(np.float64)
    expo, mant = (codes >> 10) & 0x1F, codes & 0x3FF
    normal = (expo > 0) & (expo < 31)
    assert np.array_equal(table[normal].astype(np.float64), ieee[normal])
    sub = (expo == 0) & (mant != 0)
    # §2.9(a)/§7.18: effective exponent -bias, so half the IEEE value
    assert np.array_equal(table[sub].astype(np.float64), ieee[sub] / 2)
    assert np.array_equal(table[sub].astype(np.float64),
                          np.where(codes[sub] & 0x8000, -1, 1) * mant[sub] * 2.0 ** (-10 - 15))
    assert table[0x7C00] == np.inf and table[0xFC00] == -np.inf
    assert np.isnan(table[(expo == 31) & (mant != 0)]).all()


def test_unsigned_type_has_no_sign_bit():
    u44 = FloatType(False, 4, 4)  # bias 7
    table = decode_table(u44)
    assert table.shape == (256,)
    assert table[0x70] == 1.0          # exponent 7, mantissa 0
    assert table[0x78] == 1.5          # mantissa 8/16
    assert table[0x01] == 2.0 ** -4 * 2.0 ** -7  # subnormal, effective exponent -bias
    assert table[0xF0] == np.inf and np.isnan(table[0xF1])
    assert (table[~np.isnan(table)] >= 0).all()


def test_tables_are_cached_and_read_only():
    assert decode_table(E4M3) is decode_table(FloatType(True, 4, 3))
    with pytest.raises(ValueError):
        decode_table(E4M3)[0] = 1.0


def test_rejected_types():
    with pytest.raises(NotImplementedError):
        decode_table(FloatType(True, 9, 6))   # narrowing cast to f32: broken upstream
    with pytest.raises(ValueError):
        decode_table(FloatType(True, 8, 23))  # wider than 16 bits
    with pytest.raises(TypeError):
        decode_table(IntType(8))


def test_decode_jnp_numpy_jit_vmap():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(3, 5, 16), dtype=np.uint8)
    want = decode_table(E4M3)[codes]
    for got in (decode_np(codes, E4M3), np.asarray(decode(codes, E4M3)),
                np.asarray(decode(jnp.asarray(codes), E4M3)),
                np.asarray(jax.jit(decode, static_argnums=1)(codes, E4M3)),
                np.asarray(jax.vmap(lambda c: decode(c, E4M3))(codes))):
        assert got.dtype == np.float32 and got.shape == codes.shape
        assert np.array_equal(_bits(got), _bits(want))


def test_decode_keeps_subnormal_bits_through_jax():
    # XLA CPU flushes subnormal arithmetic; the gather must not touch them.
    codes = np.array([0x0001, 0x8001, 0x007F], np.uint16)
    got = np.asarray(decode(codes, BF16))
    assert np.array_equal(_bits(got), codes.astype(np.uint32) << 16)
