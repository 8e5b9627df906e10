"""MX decode / hardware MX encode (spec §2.9(c), §2.9(d)) and the conformance HBM images.

The encoder is checked against ``ref_*`` below: a scalar, pure-Python transcription of §2.9(d)
(Rust's ``minifloat_ieee_quantize_hardware`` / ``QuantTensor::into_bytes``), with every f32
operation rounded explicitly and ``log2_f32`` taken as the correctly rounded f32 of the float64
``math.log2``.
"""

import functools
import json
import math
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import CONFORMANCE, case_params
from plena.numerics import (E4M3, E8M0, MXFP8, FloatType, IntType, MxFormat, decode_table,
                            floor_log2_f32_np, ldexp_f32, ldexp_f32_np, minifloat_hw,
                            minifloat_hw_np, mx_decode, mx_decode_np, mx_encode, mx_encode_np)
from plena.numerics.mx import floor_log2_f32

I32_MAX, I32_MIN, U32 = 2**31 - 1, -2**31, 2**32


# ---------------------------------------------------------------------------------------------
# scalar reference of §2.9(d)
# ---------------------------------------------------------------------------------------------

def f32(v: float) -> float:
    """Round a Python float to the nearest f32 (C cast: ties to even, gradual underflow)."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:  # rounds to ±inf
        return math.copysign(math.inf, v)


EPS = f32(1e-9)


def ffloor(v: float) -> float:
    return v if math.isnan(v) or math.isinf(v) else float(math.floor(v))


def as_i32(v: float) -> int:
    """Rust `v as i32`: saturating, NaN -> 0."""
    if math.isnan(v):
        return 0
    if math.isinf(v):
        return I32_MAX if v > 0 else I32_MIN
    return max(I32_MIN, min(I32_MAX, int(v)))


def as_u32(v: float) -> int:
    """Rust `v as u32`: saturating, NaN -> 0."""
    if math.isnan(v) or v <= 0:
        return 0
    return U32 - 1 if math.isinf(v) else min(U32 - 1, int(v))


def log2_f32(v: float) -> float:
    if math.isnan(v) or math.isinf(v):
        return v
    return f32(math.log2(v))


def hwround(y: float) -> int:
    """t = floor(4y); round t/4 to nearest, ties to even (Rust: unsigned saturating casts)."""
    quarter = f32(ffloor(f32(y * 4.0)) / 4.0)
    fl = ffloor(quarter)
    frac = f32(quarter - fl) if not math.isinf(quarter) else math.nan
    if frac > 0.5:
        return (as_u32(fl) + 1) % U32
    if frac < 0.5:
        return as_u32(fl)
    u = as_u32(fl)
    return u if u % 2 == 0 else (u + 1) % U32


@functools.lru_cache(maxsize=None)  # a pure function; the cache only saves time
def ref_minifloat_hw(q: float, e_bits: int = 4, m_bits: int = 3) -> int:
    if q == 0.0:
        return 0
    bias = 2 ** (e_bits - 1) - 1
    emax, emin = 2**e_bits - 2 - bias, -bias
    s = 1 if q < 0 else 0
    a = abs(q)
    raw = as_i32(ffloor(log2_f32(f32(a + EPS))))
    overflow = raw > emax
    E = min(max(raw, emin), emax)
    m = f32(a / 2.0**E)
    if E != emin:
        k = hwround(f32(f32(m - 1.0) * 2**m_bits))
    else:
        k = hwround(f32(m * 2**m_bits))
    k = min(max(k, 0), 2**m_bits - 1)
    if overflow:
        k = 2**m_bits - 1
    return (s << (e_bits + m_bits)) | ((E + bias) << m_bits) | k


def ref_encode_block(xs):
    """One MXFP8 block: (element codes, scale code)."""
    max_abs = 0.0
    for x in xs:
        if not math.isnan(x):  # f32::max ignores NaN
            max_abs = max(max_abs, abs(x))
    if max_abs == 0.0:
        return [0] * len(xs), 0
    e = min(max(as_i32(ffloor(log2_f32(f32(max_abs + EPS)))), -127), 127)
    codes = [ref_minifloat_hw(0.0 if x == 0.0 else f32(x / 2.0**e)) for x in xs]
    return codes, e + 127


ALL_BF16 = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)


@functools.lru_cache(maxsize=None)
def ref_element_table():
    return np.array([ref_minifloat_hw(float(q)) for q in ALL_BF16], np.uint8)


# every bf16 pattern v dominates a block; the companions exercise all element paths
COMPANIONS = np.array([1.0, -0.9, 0.6, -0.33, 0.127, -1.5 * 2.0**-7, 2.0**-9, 0.0], np.float32)


def bf16_blocks():
    with np.errstate(all="ignore"):
        return (ALL_BF16[:, None] * COMPANIONS[None, :]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def ref_block_table():
    codes, scales = zip(*(ref_encode_block([float(x) for x in row]) for row in bf16_blocks()))
    return np.array(codes, np.uint8), np.array(scales, np.uint8)


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


# ---------------------------------------------------------------------------------------------
# the spec's worked examples
# ---------------------------------------------------------------------------------------------

SPEC_ELEMENTS = {1.0625: 0x38, 1.09375: 0x39, 1.8125: 0x3E, 1.96875: 0x3F, 0.01: 0x07,
                 0.0005: 0x00, 300.0: 0x77, math.nan: 0x38,
                 # consequences listed in §2.9(d)
                 1.9375: 0x3F, 2.0**-7: 0x07, 1.5 * 2.0**-7: 0x07, 240.0: 0x77, math.inf: 0x77,
                 -0.0: 0x00, -1.0: 0xB8, 1.0: 0x38}


@pytest.mark.parametrize("fn", [minifloat_hw_np, minifloat_hw, jax.jit(minifloat_hw, static_argnums=1)])
def test_spec_element_examples(fn):
    q = np.array(list(SPEC_ELEMENTS), np.float32)
    assert [int(c) for c in np.asarray(fn(q, E4M3))] == list(SPEC_ELEMENTS.values())
    assert [ref_minifloat_hw(float(v)) for v in q] == list(SPEC_ELEMENTS.values())


@pytest.mark.parametrize("enc", [mx_encode_np, mx_encode])
def test_spec_block_example(enc):
    codes, scale = enc(np.array([0.5, 1, 2, 4, 0, 0, 0, 0], np.float32), MXFP8)
    assert [int(s) for s in np.asarray(scale)] == [129]
    assert [int(c) for c in np.asarray(codes)] == [0x20, 0x28, 0x30, 0x38, 0, 0, 0, 0]


def test_special_blocks():
    nan, inf = np.nan, np.inf
    x = np.array([[0.0] * 8,                                 # all zero
                  [-0.0, 0.0, nan, nan, 0.0, nan, 0.0, 0.0],  # NaNs are ignored by the max
                  [1.0, nan, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0],  # NaN in a live block -> +1.0
                  [inf, 1.0, -inf, nan, 0.0, 0.0, 0.0, 0.0],  # inf -> scale 254, saturating
                  [2.0**-30, 0, 0, 0, 0, 0, 0, 0],            # the +1e-9 dominates
                  [1e-40, 0, 0, 0, 0, 0, 0, 0]], np.float32)  # f32 subnormal max
    codes, scales = mx_encode_np(x, MXFP8)
    assert scales[:, 0].tolist() == [0, 0, 127, 254, 98, 97]
    assert codes[0].tolist() == [0] * 8 and codes[1].tolist() == [0] * 8
    assert codes[2].tolist() == [0x38, 0x38, 0xB0, 0, 0, 0, 0, 0]
    assert codes[3].tolist() == [0x77, 0, 0xF7, 0x38, 0, 0, 0, 0]
    assert codes[4].tolist() == [0x30, 0, 0, 0, 0, 0, 0, 0]  # 2^-30 / 2^-29 = 0.5
    assert codes[5].tolist() == [0] * 8
    j_codes, j_scales = mx_encode(x, MXFP8)
    assert np.array_equal(np.asarray(j_codes), codes) and np.array_equal(np.asarray(j_scales), scales)
    for row, c, s in zip(x, codes, scales[:, 0]):
        assert ref_encode_block([float(v) for v in row]) == (c.tolist(), int(s))


# ---------------------------------------------------------------------------------------------
# exhaustive checks against the scalar reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [minifloat_hw_np, minifloat_hw])
def test_element_path_all_bf16_patterns(fn):
    got = np.asarray(fn(ALL_BF16, E4M3))
    want = ref_element_table()
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(hex(int(ALL_BF16[i:i + 1].view(np.uint32)[0])), got[i], want[i]) for i in bad[:5]]


@pytest.mark.parametrize("enc", [mx_encode_np, jax.jit(mx_encode, static_argnums=1)])
def test_scale_and_element_path_all_bf16_patterns(enc):
    codes, scales = enc(bf16_blocks(), MXFP8)
    want_codes, want_scales = ref_block_table()
    assert np.array_equal(np.asarray(scales)[:, 0], want_scales)
    bad = np.flatnonzero((np.asarray(codes) != want_codes).any(axis=1))
    assert bad.size == 0, bad[:5]
    # the table really covers every scale the encoder can produce
    assert set(np.unique(want_scales)) == {0} | set(range(97, 255))


def near_powers_of_two():
    """f32 values just below and above 2**n: where log2_f32 rounds up to the integer."""
    out = []
    for n in range(-149, 129):
        p = 2.0**n
        for k in range(0, 100):
            out.append(p * (1 - k * 2.0**-24))
        out.append(p * (1 + 2.0**-23))
    with np.errstate(over="ignore"):  # 2**128 * (1 - k 2**-24) may round to inf
        return np.array(out, np.float64).astype(np.float32)


def test_floor_log2_near_powers_of_two():
    v = near_powers_of_two()
    v = v[(v > 0) & np.isfinite(v)]
    want = np.array([as_i32(ffloor(log2_f32(float(x)))) for x in v])
    assert np.array_equal(floor_log2_f32_np(v), want)
    assert np.array_equal(np.asarray(floor_log2_f32(v)), want)
    # it is not just the exponent: e.g. the largest f32 rounds to log2 = 128
    assert floor_log2_f32_np(np.float32(np.finfo(np.float32).max)) == 128
    assert floor_log2_f32_np(np.float32(0.25 * (1 - 2.0**-24))) == -2
    assert floor_log2_f32_np(np.float32(0.5 * (1 - 2.0**-24))) == -2


def test_element_path_near_powers_of_two_and_random_f32():
    rng = np.random.default_rng(4)
    q = np.concatenate([near_powers_of_two(), -near_powers_of_two()[::7],
                        rng.integers(0, U32, 30000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    want = np.array([ref_minifloat_hw(float(v)) for v in q], np.uint8)
    assert np.array_equal(minifloat_hw_np(q, E4M3), want)
    assert np.array_equal(np.asarray(minifloat_hw(q, E4M3)), want)
    # the saturating-cast quirk of the reference's hwround (y slightly negative -> k = 1)
    assert minifloat_hw_np(np.float32(0.25 * (1 - 2.0**-24)), E4M3) == 0x29


def random_f32_blocks(rng, n):
    """Blocks mixing arbitrary bit patterns (NaN, inf, subnormals) and scaled normals."""
    raw = rng.integers(0, U32, (n, 8), dtype=np.uint64).astype(np.uint32).view(np.float32)
    scaled = (rng.standard_normal((n, 8)) * 2.0 ** rng.integers(-40, 40, (n, 1))).astype(np.float32)
    return np.where(rng.random((n, 8)) < 0.2, raw, scaled)


def test_random_f32_blocks():
    x = random_f32_blocks(np.random.default_rng(5), 4000)
    want = [ref_encode_block([float(v) for v in row]) for row in x]
    codes, scales = mx_encode_np(x, MXFP8)
    assert [(c.tolist(), int(s)) for c, s in zip(codes, scales[:, 0])] == want
    jc, js = mx_encode(x, MXFP8)
    assert np.array_equal(np.asarray(jc), codes) and np.array_equal(np.asarray(js), scales)


f32s = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(f32s, min_size=8, max_size=8))
def test_property_encoder_matches_reference(xs):
    x = np.array(xs, np.float32)
    codes, scale = mx_encode_np(x, MXFP8)
    assert (codes.tolist(), int(scale[0])) == ref_encode_block([float(v) for v in x])


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------

def spec_e4m3(c):
    s, e, m = c >> 7, (c >> 3) & 15, c & 7
    v = math.inf if m == 0 else math.nan
    if e == 0:
        v = m * 2.0**-10
    elif e < 15:
        v = (8 + m) * 2.0 ** (e - 10)
    return -v if s else v


def spec_e8m0(b):
    return 0.0 if b == 0 else math.inf if b == 255 else 2.0 ** (b - 127)


@pytest.mark.parametrize("dec", [mx_decode_np, mx_decode, jax.jit(mx_decode, static_argnums=2)])
def test_decode_all_element_scale_pairs(dec):
    e, s = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    elem = np.repeat(e.reshape(-1, 1), 8, axis=1).reshape(-1, 8).astype(np.uint8)
    scale = s.reshape(-1, 1).astype(np.uint8)
    got = np.asarray(dec(elem, scale, MXFP8))[:, 0]
    with np.errstate(all="ignore"):  # float64 product is exact; one rounding to f32
        want = (np.array([spec_e4m3(c) for c in range(256)])[e.ravel()]
                * np.array([spec_e8m0(b) for b in range(256)])[s.ravel()]).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(_bits(got)[~nan], _bits(want)[~nan])
    # f32 subnormal products survive (XLA CPU would flush a plain multiply)
    assert got[0x01 * 256 + 1] == np.float32(2.0**-136)
    assert np.signbit(got[0x80 * 256 + 0])  # -0 * 0 = -0


def test_decode_scale_index_is_i_div_block():
    rng = np.random.default_rng(6)
    elem = rng.integers(0, 0x77, (3, 4, 32)).astype(np.uint8)
    scale = rng.integers(110, 140, (3, 4, 4)).astype(np.uint8)
    got = mx_decode_np(elem, scale, MXFP8)
    want = decode_table(E4M3)[elem] * np.exp2(np.repeat(scale, 8, axis=-1).astype(np.float64) - 127)
    assert np.array_equal(got, want.astype(np.float32))
    assert np.array_equal(np.asarray(mx_decode(elem, scale, MXFP8)), got)
    assert np.array_equal(np.asarray(jax.vmap(lambda a, b: mx_decode(a, b, MXFP8))(elem, scale)), got)


# ---------------------------------------------------------------------------------------------
# round trips, shapes, vectorisation, errors
# ---------------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=8, max_size=32).filter(lambda v: len(v) % 8 == 0),
       st.integers(-20, 20))
def test_property_round_trip(xs, shift):
    x = np.ldexp(np.array(xs, np.float32), shift).astype(np.float32)
    codes, scales = mx_encode_np(x, MXFP8)
    y = mx_decode_np(codes, scales, MXFP8)
    xb, yb = x.reshape(-1, 8), y.reshape(-1, 8)
    for blk_x, blk_y, s in zip(xb, yb, scales):
        if s == 0:
            assert (blk_y == 0).all()
            continue
        step = 2.0 ** (int(s) - 127)
        # normal codes: < 1 ulp (no binade carry); below 2^-6 everything lands in [0, 2^-6)
        assert np.all(np.abs(blk_y - blk_x) <= np.maximum(np.abs(blk_x) / 8, 2.0**-6 * step))
    # re-encoding the decoded values changes nothing (except -0 codes becoming +0), for blocks
    # whose scale is the plain exponent of their max (not bumped by the log2 rounding or 1e-9)
    c2, s2 = mx_encode_np(y, MXFP8)
    mx = np.abs(xb).max(axis=1)
    plain = (mx >= 2.0**-20) & (scales.astype(int) == np.frexp(mx)[1] - 1 + 127)
    big = np.repeat(plain, 8)
    assert np.array_equal(c2[big], np.where(codes == 0x80, 0, codes)[big])
    assert np.array_equal(s2[big[::8]], scales[big[::8]])


def test_vectorised_shapes_jit_vmap():
    x = random_f32_blocks(np.random.default_rng(7), 2 * 3 * 4).reshape(2, 3, 32)
    codes, scales = mx_encode_np(x, MXFP8)
    assert codes.shape == (2, 3, 32) and codes.dtype == np.uint8
    assert scales.shape == (2, 3, 4) and scales.dtype == np.uint8
    flat_c, flat_s = mx_encode_np(x.reshape(-1, 8), MXFP8)
    assert np.array_equal(codes.reshape(-1, 8), flat_c) and np.array_equal(scales.reshape(-1), flat_s[:, 0])
    for c, s in (jax.jit(mx_encode, static_argnums=1)(x, MXFP8),
                 jax.vmap(lambda v: mx_encode(v, MXFP8))(jnp.asarray(x))):
        assert np.array_equal(np.asarray(c), codes) and np.array_equal(np.asarray(s), scales)


def test_ldexp_is_exact_with_gradual_underflow():
    rng = np.random.default_rng(8)
    x = rng.integers(0, U32, 50000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    k = rng.integers(-300, 300, x.size)
    with np.errstate(all="ignore"):
        want = (x.astype(np.float64) * np.exp2(k.astype(np.float64))).astype(np.float32)
    for got in (ldexp_f32_np(x, k), np.asarray(ldexp_f32(x, k))):
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(_bits(got)[~nan], _bits(want)[~nan])


def test_unsupported_formats_and_shapes():
    with pytest.raises(ValueError):
        mx_encode_np(np.zeros(12, np.float32), MXFP8)
    with pytest.raises(ValueError):
        mx_decode_np(np.zeros(16, np.uint8), np.zeros(3, np.uint8), MXFP8)
    for fmt in (MxFormat(8, IntType(8), E8M0), MxFormat(8, FloatType(True, 8, 7), E8M0),
                MxFormat(8, E4M3, FloatType(False, 5, 0)), MxFormat(8, E4M3, FloatType(True, 8, 0))):
        with pytest.raises(NotImplementedError):
            mx_encode_np(np.zeros(8, np.float32), fmt)


def test_other_small_element_type_runs():
    # e5m2 / e2m1 are not used upstream, but the generic algorithm gives sane codes.
    e5m2 = FloatType(True, 5, 2)
    codes, scale = mx_encode_np(np.array([1, 1.25, -1.5, 1.75, 0.5, 0, 0, 0], np.float32),
                                MxFormat(8, e5m2, E8M0))
    assert scale.tolist() == [127]
    assert codes.tolist() == [0x3C, 0x3D, 0xBE, 0x3F, 0x38, 0, 0, 0]
    assert [ref_minifloat_hw(v, 5, 2) for v in (1, 1.25, -1.5, 1.75, 0.5)] == codes[:5].tolist()


# ---------------------------------------------------------------------------------------------
# conformance: the HBM images written by the upstream Python toolchain
# ---------------------------------------------------------------------------------------------
#
# Findings (all asserted below):
# * Layout. `map_mx_data_to_hbm_for_behave_sim` tensors: the input, flattened in C order, is cut
#   into rows of `row_elements` (a [1, 4096] flash-attention input is 64 rows of 64); element
#   bytes at elem_offset + r*C + c, scale bytes at scale_offset + r*C/8 + c/8.
#   `row_elements == source_row_elements` everywhere. One tensor
#   (ci_flash_attention_m64b16b2s32 Q) has `rows` (128) larger than its input (64 rows): the
#   input fills the first rows and the remaining rows are plain zero bytes (element 0 AND scale 0,
#   i.e. never quantised). `memory_map._generate_hbm_bin` tensors: the flattened input is
#   n_blocks consecutive blocks; the scale region is zero-padded up to `scale_bytes`.
# * The bytes come from PLENA_Tools' torch quantizer, evaluated in the tensor's own dtype.
#   `py_quantizer` below models it and reproduces every byte. It differs from the hardware
#   encoder (mx_encode) in exactly these ways:
#   1. an all-zero block gets scale byte 97 (2^-30; floor(log2(0 + 1e-9)) = -30), not 0;
#   2. a negative value whose code has a zero magnitude is written 0x00 (the hardware: 0x80);
#   3. tensors whose orig_dtype is bfloat16 are quantised with bf16 arithmetic, so log2 is
#      rounded to bf16: a block max or element within ~0.5 % below a power of two gets the
#      next exponent (e.g. 0.2490234375 -> 0x28 = 0.25 instead of 0x27, and a scale one
#      higher); with f32 arithmetic the model agrees with the hardware encoder on every byte
#      except rules 1 and 2.
#   (It also clamps the shared exponent to [-128, 127]; never reached.)

def rnd(v, bf16: bool):
    v = np.asarray(v, np.float64).astype(np.float32)
    return v.astype(ml_dtypes.bfloat16).astype(np.float32) if bf16 else v


def py_quantizer(x, bf16: bool):
    """Vectorised model of PLENA_Tools `_mx_fp_quantize_hardware` (e4m3/e8m0, block 8) run on a
    torch tensor of dtype bf16 (bf16=True) or f32: every op rounds to that dtype."""
    xb = rnd(x, bf16).reshape(x.shape[:-1] + (-1, 8)).astype(np.float64)
    mx = rnd(np.abs(xb).max(-1, keepdims=True) + EPS, bf16).astype(np.float64)
    e = np.clip(np.floor(rnd(np.log2(mx), bf16)), -128, 127)
    q = rnd(xb / np.exp2(e), bf16).astype(np.float64)
    a = np.abs(q)
    with np.errstate(divide="ignore"):
        raw = np.floor(rnd(np.log2(rnd(a + EPS, bf16).astype(np.float64)), bf16))
    E = np.clip(raw, -7, 7)
    m = rnd(a / np.exp2(E), bf16).astype(np.float64)
    y = np.where(E != -7, (m - 1) * 8, m * 8)
    k = np.clip(np.round(np.floor(y * 4) / 4), 0, 7)  # torch.round: half to even
    k = np.where(raw > 7, 7, k)
    code = ((E + 7).astype(np.int64) << 3) | k.astype(np.int64)
    code = np.where((q < 0) & (code != 0), code | 0x80, code)
    return code.astype(np.uint8).reshape(x.shape), (e[..., 0] + 127).astype(np.uint8)


def mx_tensors(case):
    folder = CONFORMANCE / case
    manifest = json.loads((folder / "manifest.json").read_text())
    hbm = np.fromfile(folder / "hbm.bin", np.uint8)
    out = []
    for t in manifest["hbm"]["tensors"]:
        path = folder / "inputs" / f"{t['name']}.npy"
        if t.get("scale_bytes", 0) == 0 or t.get("block", 1) != 8 or not path.exists():
            continue  # not an MX tensor (e.g. an int32 table)
        x = np.load(path).astype(np.float32)
        bf16 = manifest["inputs"][t["name"]]["orig_dtype"] == "torch.bfloat16"
        if t["writer"] == "map_mx_data_to_hbm_for_behave_sim":
            cols = t["row_elements"]
            assert cols == t["source_row_elements"] and x.size % cols == 0
            x = x.reshape(-1, cols)
            rows = t["rows"]
            assert x.shape[0] <= rows
            elem = hbm[t["elem_offset"]:t["elem_offset"] + rows * cols].reshape(rows, cols)
            scale = hbm[t["scale_offset"]:t["scale_offset"] + rows * cols // 8].reshape(rows, -1)
            # rows beyond the input are untouched zero padding
            assert not elem[x.shape[0]:].any() and not scale[x.shape[0]:].any()
            elem, scale = elem[:x.shape[0]], scale[:x.shape[0]]
        else:
            assert t["writer"] == "memory_map._generate_hbm_bin"
            x = x.reshape(1, -1)
            nb = t["n_blocks"]
            assert nb * 8 == x.size == t["elem_bytes"]
            elem = hbm[t["elem_offset"]:t["elem_offset"] + x.size].reshape(x.shape)
            region = hbm[t["scale_offset"]:t["scale_offset"] + t["scale_bytes"]]
            assert not region[nb:].any()
            scale = region[:nb].reshape(1, -1)
        out.append((t["name"], x, bf16, elem, scale))
    return out


@pytest.mark.parametrize("case", case_params())
def test_conformance_hbm_images(case):
    tensors = mx_tensors(case)
    if not tensors:
        pytest.skip("no MX tensor with an input in this case")
    for name, x, bf16, elem, scale in tensors:
        # the model of the writer reproduces every byte
        pe, ps = py_quantizer(x, bf16)
        assert np.array_equal(pe, elem), name
        assert np.array_equal(ps, scale), name
        # the hardware encoder agrees except for the documented rules
        he, hs = mx_encode_np(x, MXFP8)
        zero = ~np.abs(x).reshape(x.shape[0], -1, 8).any(-1)
        assert (hs[zero] == 0).all() and (scale[zero] == 97).all(), name          # rule 1
        assert (he[np.repeat(zero, 8, -1)] == 0).all()
        negz = he == 0x80
        assert (x[negz] < 0).all() and (elem[negz] == 0).all(), name             # rule 2
        fe, fs = py_quantizer(x, False)                                          # rule 3
        assert np.array_equal(np.where(negz, 0, he), fe), name
        assert np.array_equal(np.where(zero, 97, hs), fs), name
        if not bf16:
            assert np.array_equal(fe, elem) and np.array_equal(fs, scale)
        # decoding the hardware bytes gives the values the hardware encoder meant
        y = mx_decode_np(he, hs, MXFP8)
        assert np.array_equal(np.asarray(mx_decode(he, hs, MXFP8)), y)
        step = np.exp2(np.repeat(hs, 8, -1) - 127.0)
        assert (np.abs(y - x) <= np.maximum(np.abs(x) / 8, 2.0**-6 * step)).all(), name
