"""The generic codec (plena.numerics.codec): exhaustive / random agreement with ml_dtypes where a
format coincides, an independent exact (fractions) reference elsewhere, MXFP8 unchanged."""

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from plena.numerics import codec
from plena.numerics.formats import E4M3, E8M0, MXFP8, FloatType, IntType, MxFormat
from plena.numerics.minifloat import decode_table
from plena.numerics.mx import mx_decode_np, mx_encode_np

F = FloatType
# (ml_dtypes type, our type, specials convention)
ML = [
    (ml_dtypes.float8_e5m2, F(True, 5, 2), "ieee"),
    (ml_dtypes.float8_e4m3fn, F(True, 4, 3), "fn"),
    (ml_dtypes.float6_e2m3fn, F(True, 2, 3), "finite"),
    (ml_dtypes.float6_e3m2fn, F(True, 3, 2), "finite"),
    (ml_dtypes.float4_e2m1fn, F(True, 2, 1), "finite"),
    (ml_dtypes.bfloat16, F(True, 8, 7), "ieee"),
    (np.float16, F(True, 5, 10), "ieee"),
]


def _codes_view(arr, width):
    return arr.view(np.uint8 if width <= 8 else np.uint16).astype(np.uint32)


def _random_f32(n, seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    # plus values near the small formats' ranges (random bits are mostly huge or tiny)
    near = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    return np.concatenate([bits.view(np.float32), near])


@pytest.mark.parametrize("mld, t, sp", ML, ids=lambda v: getattr(v, "__name__", str(v)))
def test_matches_ml_dtypes(mld, t, sp):
    codes = np.arange(1 << t.width, dtype=np.uint32)
    want = codes.astype(np.uint8 if t.width <= 8 else np.uint16).view(mld).astype(np.float32)
    for got in (codec.decode_np(codes, t, "ieee", sp), np.asarray(codec.decode(codes, t, "ieee", sp))):
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    x = _random_f32(100_000, t.width)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = _codes_view(x.astype(mld), t.width)
    got_np = codec.encode_np(x, t, "ieee", sp)
    got_j = np.asarray(codec.encode(x, t, "ieee", sp))
    assert np.array_equal(got_np, got_j)
    # NaN included where the type has a NaN code; fp6/fp4 have none (ml_dtypes' choice then
    # depends on the payload; ours is always the sign-only code, checked below)
    # numpy's float16 keeps NaN payloads; ours is the canonical quiet NaN (checked below)
    keep = ~np.isnan(x) if (sp == "finite" or mld is np.float16) else np.ones(x.shape, bool)
    assert np.array_equal(got_np[keep], ref[keep])
    nan_codes = set(got_np[np.isnan(x)].tolist())
    if sp == "finite":
        assert nan_codes <= {1 << (t.width - 1)}
    if mld is np.float16:
        assert nan_codes <= {0x7E00, 0xFE00}


def test_int_matches_numpy_and_ml_dtypes_in_range():
    for t, mld in ((IntType(8), np.int8), (IntType(4), ml_dtypes.int4)):
        lo, hi = -(1 << (t.width - 1)), (1 << (t.width - 1)) - 1
        x = np.linspace(lo - 0.49, hi + 0.49, 4001).astype(np.float32)
        want = np.round(x).astype(np.int64)  # half to even, in range
        got = codec.encode_np(x, t)
        assert np.array_equal(codec.decode_np(got, t), want.astype(np.float32))
        assert np.array_equal(np.asarray(codec.decode(np.asarray(codec.encode(x, t)), t)), want.astype(np.float32))
        ref = (want.astype(mld).view(np.uint8 if t.width == 8 else np.int8).astype(np.uint32)
               & ((1 << t.width) - 1)) if mld is np.int8 else None
        if ref is not None:
            assert np.array_equal(got, ref)
        # saturation and NaN
        s = codec.decode_np(codec.encode_np(np.array([1e9, -1e9, np.inf, np.nan], np.float32), t), t)
        assert s.tolist() == [hi, lo, hi, 0]


def test_plena_decode_is_the_reference_decode_table():
    for t in (E4M3, E8M0, F(True, 8, 7), F(True, 2, 1), F(True, 3, 2), F(True, 2, 3), F(True, 5, 2),
              F(True, 5, 10), F(False, 4, 0)):
        codes = np.arange(1 << t.width, dtype=np.uint32)
        want = decode_table(t).view(np.uint32)
        assert np.array_equal(codec.decode_np(codes, t).view(np.uint32), want), t
        assert np.array_equal(np.asarray(codec.decode(codes, t)).view(np.uint32), want), t


def test_plena_e4m3_values():
    assert codec.max_finite(E4M3) == 240.0
    assert codec.decode_np(np.array([0x77, 0x78, 0x01, 0x38]), E4M3).tolist()[0] == 240.0
    v = codec.decode_np(np.array([0x78, 0x79, 0x01, 0x07, 0x08]), E4M3)
    assert np.isinf(v[0]) and np.isnan(v[1]) and v[2] == 2.0 ** -10 and v[3] == 7 * 2.0 ** -10 and v[4] == 2.0 ** -6
    # 250 rounds to 240 (below 240 + ulp/2 = 248? no: ulp at 240 is 16, so 248 is the tie) ...
    got = codec.encode_np(np.array([247.9, 248.0, 300.0, -1e9], np.float32), E4M3)
    assert got.tolist() == [0x77, 0x78, 0x78, 0xF8]  # 248 is a tie: to the even code, inf
    assert codec.encode_np(np.array([300.0], np.float32), E4M3, saturate=True).tolist() == [0x77]


# ---------------------------------------------------------------------------------------------
# independent exact reference (fractions) for formats ml_dtypes does not have
# ---------------------------------------------------------------------------------------------

def _values(t: FloatType, subnormals: str):
    """{code: Fraction} of every finite code (PLENA/IEEE specials: all-ones exponent excluded)."""
    out = {}
    for code in range(1 << t.width):
        m = code & ((1 << t.mantissa) - 1)
        e = (code >> t.mantissa) & ((1 << t.exponent) - 1)
        s = (code >> (t.exponent + t.mantissa)) & 1 if t.sign else 0
        if e == (1 << t.exponent) - 1:
            continue
        if e == 0:
            sub = -t.bias if (subnormals == "plena" and t.exponent < 8) else 1 - t.bias
            v = Fraction(m, 1 << t.mantissa) * Fraction(2) ** sub
        else:
            v = (1 + Fraction(m, 1 << t.mantissa)) * Fraction(2) ** (e - t.bias)
        out[code] = -v if s else v
    return out


def _ref_encode(x: float, t: FloatType, vals: dict) -> int:
    """Nearest finite value (ties to the even code); inf beyond max + ulp/2 (IEEE rule)."""
    fx = Fraction(x)
    if not t.sign and fx < 0:
        return 0
    cands = [(abs(v - fx), c & 1, c) for c, v in vals.items() if (v >= 0) == (fx >= 0) or v == 0]
    best = min(cands)
    # overflow: |x| >= max + ulp(max)/2 -> inf
    mx = max(abs(v) for v in vals.values())
    ulp = Fraction(2) ** ((1 << t.exponent) - 2 - t.bias - t.mantissa)
    if abs(fx) >= mx + ulp / 2:
        return (((1 << t.exponent) - 1) << t.mantissa) | ((1 << (t.exponent + t.mantissa)) if fx < 0 and t.sign else 0)
    code = best[2]
    if fx < 0 and t.sign and vals[code] == 0:
        code |= 1 << (t.exponent + t.mantissa)  # -0 keeps its sign
    return code


_REF_TYPES = [(F(True, 3, 2), "plena"), (F(True, 2, 1), "plena"), (F(True, 4, 3), "plena"),
              (F(False, 4, 3), "plena"), (F(True, 3, 4), "ieee"), (F(True, 2, 2), "plena"),
              (F(True, 5, 2), "plena"), (F(True, 6, 1), "ieee")]
_VALS = {k: _values(*k) for k in _REF_TYPES}


@settings(max_examples=300, deadline=None)
@given(k=st.sampled_from(_REF_TYPES),
       x=st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e4, max_value=1e4))
def test_encode_matches_exact_reference(k, x):
    t, sub = k
    want = _ref_encode(x, t, _VALS[k])
    got = int(codec.encode_np(np.array([x], np.float32), t, sub)[0])
    if x == 0:
        assert codec.decode_np(np.array([got]), t, sub)[0] == 0
        return
    assert got == want, (t, sub, x, hex(got), hex(want))


@settings(max_examples=200, deadline=None)
@given(k=st.sampled_from(_REF_TYPES), s=st.integers(-30, 30), m=st.floats(0.5, 2.0, width=32))
def test_encode_matches_exact_reference_scaled(k, s, m):
    t, sub = k
    x = float(np.float32(m * 2.0 ** s))
    assert int(codec.encode_np(np.array([x], np.float32), t, sub)[0]) == _ref_encode(x, t, _VALS[k])


def test_wide_formats_numpy_path():
    # 32-bit e8m23 is f32 itself; e11m20 rounds to 20 mantissa bits; round trips are exact
    x = _random_f32(20_000, 3)
    x = x[np.isfinite(x)]
    f32t = F(True, 8, 23)
    assert np.array_equal(codec.encode_np(x, f32t), x.view(np.uint32))
    assert np.array_equal(codec.decode_np(x.view(np.uint32), f32t).view(np.uint32), x.view(np.uint32))
    t = F(True, 11, 20)
    r = codec.round_to_np(x, t)
    # reference: round the significand to 21 bits with float64 arithmetic (exact, RNE)
    m, e = np.frexp(x.astype(np.float64))
    want = np.ldexp(np.round(np.ldexp(m, 21)), e - 21).astype(np.float32)
    assert np.array_equal(r.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("t", [F(True, 9, 3), F(False, 11, 4), F(True, 12, 3), F(True, 9, 22), F(True, 10, 21),
                               F(False, 9, 23), F(True, 15, 16), F(True, 5, 26), F(True, 2, 29),
                               F(True, 31, 0)], ids=str)
def test_jnp_codec_beyond_f32_equals_numpy_twin(t):
    """Types f32 does not hold (exponent > 8 or mantissa > 23): the jit-able codec decodes to
    the nearest f32 (RNE, ±inf on overflow, gradual underflow) exactly as the float64 numpy
    twin does, and encodes as the 64-bit numpy kernel does."""
    assert not codec.f32_holds(t)
    rng = np.random.default_rng(t.width)
    codes = (np.arange(1 << t.width, dtype=np.uint32) if t.width <= 16
             else rng.integers(0, 1 << t.width, 200_000, dtype=np.uint64).astype(np.uint32))
    got, want = np.asarray(codec.decode(codes, t)), codec.decode_np(codes, t)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), [(hex(c), g, w) for c, g, w in zip(codes[~same][:3], got[~same], want[~same])]
    x = _random_f32(100_000, t.width)
    assert np.array_equal(np.asarray(codec.encode(x, t)), codec.encode_np(x, t))


def test_beyond_f32_values_round_to_f32():
    e9 = F(True, 9, 22)  # bias 255: 2**200 and 2**-200 are normal e9m22 values, beyond f32
    big, tiny = (0x1C8 << 22), (0x37 << 22)
    assert codec.decode_np(np.array([big, tiny], np.uint32), e9).tolist() == [np.inf, 0.0]
    assert np.asarray(codec.decode(np.array([big, tiny | (1 << 31)], np.uint32), e9)).tolist() == [np.inf, -0.0]
    # a value just below 2**-149 rounds up to the smallest f32 subnormal; at 2**-150 it ties to 0
    t = F(True, 9, 3)
    just_below = ((255 - 150) << 3) | 0b111  # 1.875 * 2**-150
    tie = (255 - 150) << 3  # 2**-150
    assert np.asarray(codec.decode(np.array([just_below, tie], np.uint32), t)).view(np.uint32).tolist() == [1, 0]
    # wide mantissas: every f32 in the type's range is exact (round trip)
    w = F(True, 5, 26)
    x = np.float32([1.0, -3.1415927, 6.1e4, 2.0 ** -14 * 1.2345678])
    assert np.array_equal(np.asarray(codec.round_to(x, w)), x)
    i32 = IntType(32)
    v = np.float32([2.0 ** 30 + 128, -(2.0 ** 31), 3e9, -3e9, 16777217.0])
    assert np.asarray(codec.round_to(v, i32)).tolist() == [2.0 ** 30 + 128, -(2.0 ** 31), 2.0 ** 31, -(2.0 ** 31),
                                                            16777216.0]


# ---------------------------------------------------------------------------------------------
# MX
# ---------------------------------------------------------------------------------------------

def test_mxfp8_is_the_reference_encoder():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((16, 64)) * np.exp2(rng.integers(-30, 30, (16, 1)))).astype(np.float32)
    x[0, :8] = 0
    x[1, 3] = np.nan
    for block in (8, 32):
        fmt = MxFormat(block, E4M3, E8M0)
        e0, s0 = mx_encode_np(x, fmt)
        e1, s1 = codec.mx_encode_np(x, fmt)
        assert np.array_equal(e0, e1) and np.array_equal(s0, s1)
        j0, j1 = codec.mx_encode(x, fmt)
        assert np.array_equal(np.asarray(j0), e1) and np.array_equal(np.asarray(j1), s1)
        a = mx_decode_np(e0, s0, fmt)
        b = codec.mx_decode_np(e1, s1, fmt)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert MXFP8.block == 8


@pytest.mark.parametrize("width", [8, 4])
def test_mxint_exact_reference(width):
    fmt = MxFormat(8, IntType(width), E8M0)
    rng = np.random.default_rng(width)
    x = (rng.standard_normal((8, 32)) * np.exp2(rng.integers(-10, 10, (8, 1)))).astype(np.float32)
    x[2, :8] = 0
    codes, scales = codec.mx_encode_np(x, fmt)
    dec = codec.mx_decode_np(codes, scales, fmt)
    assert np.array_equal(np.asarray(codec.mx_round(x, fmt)).view(np.uint32), dec.view(np.uint32))
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    for r in range(8):
        for b in range(4):
            blk = x[r, 8 * b: 8 * b + 8].astype(np.float64)
            mx = np.abs(blk).max()
            if mx == 0:
                assert scales[r, b] == 0 and not dec[r, 8 * b: 8 * b + 8].any()
                continue
            e = int(np.floor(np.log2(mx))) - (width - 2)
            assert scales[r, b] == e + 127
            q = np.clip(np.round(blk / 2.0 ** e), lo, hi)
            assert np.array_equal(dec[r, 8 * b: 8 * b + 8], (q * 2.0 ** e).astype(np.float32))


def test_mx_sub_byte_fp_round_trip_and_packing():
    fmt = MxFormat(32, F(True, 2, 1), E8M0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    codes, scales = codec.mx_encode_np(x, fmt)
    assert codes.max() < 16
    packed = codec.pack_codes_np(codes, 4)
    assert packed.shape == (4, 32)
    assert np.array_equal(packed[:, 0], (codes[:, 0] | (codes[:, 1] << 4)).astype(np.uint8))  # low nibble first
    assert np.array_equal(codec.unpack_codes_np(packed, 4, 64), codes)
    assert np.array_equal(np.asarray(codec.unpack_codes(packed, 4, 64)), codes)
    assert np.array_equal(np.asarray(codec.pack_codes(codes, 4)), packed)
    dec = codec.mx_decode_np(codes, scales, fmt)
    # every decoded value is an element value (plena e2m1: 0, 0.25, 1, 1.5) times the block scale
    s = np.exp2(scales.astype(np.float64) - 127).repeat(32, axis=1)
    assert set(np.unique(np.abs(dec / s))) <= {0.0, 0.25, 1.0, 1.5}
    six = codec.pack_codes_np(np.array([[1, 2, 3, 63]], np.uint32), 6)
    assert six.tolist() == [[1 | (2 << 6), (2 >> 2) | (3 << 4), (3 >> 4) | (63 << 2)]]
    for w in (1, 2, 3, 6, 7, 16, 24, 32):
        c = rng.integers(0, 1 << w, (3, 16), dtype=np.uint64).astype(np.uint32)
        assert np.array_equal(codec.unpack_codes_np(codec.pack_codes_np(c, w), w, 16), c)
