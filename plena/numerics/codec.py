"""One generic codec for every PLENA number format (spec §1.3, §2.9).

Scalar types (:class:`~plena.numerics.formats.FloatType`, :class:`~.formats.IntType`):

* :func:`encode` / :func:`decode` (jnp, jit-able) and :func:`encode_np` / :func:`decode_np`
  (numpy twins): f32 values <-> integer codes (``uint32``, the low ``width`` bits used).
* :func:`round_to` / :func:`round_to_np`: ``decode(encode(x))``, the nearest value of the type.

Floating-point types: any ``sign`` / ``exponent`` (>= 1) / ``mantissa`` with a total width of at
most 32 bits, bias ``2**(exponent-1) - 1``. Encoding is round-to-nearest, ties to even, done with
integer operations on the f32 bit pattern (so it is exact and immune to XLA:CPU's
flush-to-zero). Two switches describe the value set:

``subnormals``
    ``"plena"`` (default, what PLENA's decoder does, spec §2.9(a)): for ``exponent < 8`` a code
    with exponent field 0 is ``m / 2**M * 2**-bias``, half the IEEE value (e4m3 ``0x01`` is
    ``2**-10``); there is then a gap between the largest subnormal and ``2**(1-bias)`` and values
    in it round to the nearer end. For ``exponent >= 8`` it is the IEEE value.
    ``"ieee"``: always ``m / 2**M * 2**(1-bias)`` (ml_dtypes, OCP).
``specials``
    ``"ieee"`` (default, PLENA: "an all-ones exponent decodes as inf/NaN", spec §1.3): exponent
    field all ones is ±inf (mantissa 0) or NaN. Overflow (``|x| >= max + ulp/2``) gives ±inf,
    NaN gives the quiet NaN ``exponent all ones, top mantissa bit`` (for ``mantissa = 0``, e8m0,
    that is the inf code 0xFF, which PLENA decodes as +inf).
    ``"fn"`` (OCP float8_e4m3fn): no inf; the all-ones code ``S.1..1.1..1`` is NaN, every other
    code is finite. Overflow, ±inf and NaN give NaN (as ml_dtypes).
    ``"finite"`` (OCP fp6/fp4, ``*fn`` types without NaN): every code is finite. Overflow and
    ±inf saturate to ±max; NaN encodes as the sign-only code (-0), as ml_dtypes does.

``saturate=True`` (encode) clamps overflow and ±inf to ±max for every convention.
Unsigned types: negative values encode as 0 (the nearest representable value).

PLENA's E4M3 is ``FloatType(True, 4, 3)`` with the defaults: max 240 (``0x77``), exponent
field 15 = inf/NaN, subnormals ``m * 2**-10``. OCP's float8_e4m3fn is the same bit width with
``subnormals="ieee", specials="fn"`` (max 448). E8M0 (the MX scale) is
``FloatType(False, 8, 0)``: code 0 is 0.0, 255 is +inf, the rest ``2**(b-127)``.

Integer types (:class:`~.formats.IntType`): two's complement, ``width`` bits, RNE, saturating to
``[-2**(width-1), 2**(width-1) - 1]``; NaN encodes as 0.

MX formats (:func:`mx_encode` / :func:`mx_decode` and numpy twins): blocks of ``block``
consecutive values along the last axis share one scale code.

* Decode: ``f32(decode(elem) * decode(scale))`` (spec §2.9(c)); for float elements and
  power-of-two float scales this is :func:`plena.numerics.mx.mx_decode` (exact on the bits);
  integer elements are the integer value times the scale.
* Encode, float elements: the reference's hardware encoder (spec §2.9(d),
  :func:`plena.numerics.mx.mx_encode`), generalised to any signed element type of up to 16
  bits and any unsigned mantissa-free scale type (``e`` clamped to ``[-sbias, sbias]``);
  MXFP8 (e4m3 / e8m0 / any block) is bit-identical to the reference. As in the hardware, the
  shared exponent is ``floor(log2(max|x|))``, so block elements lie in ``[0, 2)``.
* Encode, integer elements (MXINT): shared exponent ``e = floor(log2_f32(max|x| + 1e-9))``
  (the hardware's, see :mod:`.mx`), scale ``2**(e - (width - 2))``, so the block maximum
  lands in ``[2**(width-2), 2**(width-1))``; elements are RNE, saturating (OCP MXINT8 with
  its ``2**-6`` fixed-point element is the same set of values). An all-zero block gets scale
  code 0 and zero elements, as in the hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .bf16 import f32_bits, f32_bits_np, f32_from_bits, f32_from_bits_np
from .formats import DataType, FloatType, IntType, MxFormat
from . import mx as _mx

__all__ = [
    "SUBNORMALS", "SPECIALS", "encode", "encode_np", "decode", "decode_np", "round_to",
    "round_to_np", "max_finite", "sub_exponent", "mx_encode", "mx_encode_np", "mx_decode",
    "mx_decode_np", "mx_round", "mx_round_np", "pack_codes_np", "unpack_codes_np", "unpack_codes",
    "check_scalar_type", "check_mx_format", "subset_of_bf16", "f32_holds",
]

SUBNORMALS = ("plena", "ieee")
SPECIALS = ("ieee", "fn", "finite")


# =============================================================================================
# descriptors
# =============================================================================================

def check_scalar_type(t: DataType) -> None:
    """Raise if ``t`` is not a type this codec handles (both the jnp and the numpy path)."""
    if isinstance(t, IntType):
        if not 1 <= t.width <= 32:
            raise NotImplementedError(f"{t}: integer widths 1..32 are supported")
        return
    if not isinstance(t, FloatType):
        raise TypeError(f"expected a FloatType or IntType, got {t!r}")
    if t.exponent < 1:
        raise ValueError(f"{t}: a float type needs at least one exponent bit")
    if t.width > 32:
        raise NotImplementedError(f"{t}: float types of at most 32 bits are supported")
    if t.mantissa > 30:
        raise NotImplementedError(f"{t}: float types with at most 30 mantissa bits are supported")


def f32_holds(t: DataType) -> bool:
    """Whether every value of ``t`` is an f32 value (float: exponent <= 8 and mantissa <= 23;
    integer: at most 24 bits). Decoding other types rounds to f32 (RNE, overflow to ±inf)."""
    if isinstance(t, IntType):
        return t.width <= 24
    return t.exponent <= 8 and t.mantissa <= 23


def sub_exponent(t: FloatType, subnormals: str = "plena") -> int:
    """Exponent of the subnormal binade (value ``m / 2**M * 2**sub_exponent``)."""
    if subnormals not in SUBNORMALS:
        raise ValueError(f"subnormals must be one of {SUBNORMALS}, got {subnormals!r}")
    if subnormals == "plena" and t.exponent < 8:
        return -t.bias
    return 1 - t.bias


def _max_fields(t: FloatType, specials: str):
    """(exponent field, mantissa field) of the largest finite magnitude."""
    if specials not in SPECIALS:
        raise ValueError(f"specials must be one of {SPECIALS}, got {specials!r}")
    all_e, all_m = (1 << t.exponent) - 1, (1 << t.mantissa) - 1
    if specials == "ieee":
        return all_e - 1, all_m
    if specials == "fn":
        if t.mantissa == 0:
            return all_e - 1, 0
        return all_e, all_m - 1
    return all_e, all_m


def max_finite(t: DataType, specials: str = "ieee") -> float:
    """The largest finite value of ``t`` (python float; may exceed f32 for wide exponents)."""
    if isinstance(t, IntType):
        return float((1 << (t.width - 1)) - 1)
    ef, mf = _max_fields(t, specials)
    return float(np.ldexp(1.0 + mf / (1 << t.mantissa), ef - t.bias))


def subset_of_bf16(t: DataType) -> bool:
    """Whether every value of ``t`` (PLENA conventions) is exactly a bf16 value: true for float
    types with at most 8 exponent and 7 mantissa bits, and for integers of at most 8 bits."""
    if isinstance(t, IntType):
        return t.width <= 8
    return t.exponent <= 8 and t.mantissa <= 7


# =============================================================================================
# float kernels (xp = numpy or jax.numpy; bits = f32 bit patterns as uint32)
# =============================================================================================

def _types(xp):
    # numpy works in 64 bits (any field width up to 32); jnp in 32 (checked by the caller)
    return (np.uint64, np.int64) if xp is np else (jnp.uint32, jnp.int32)


def _clz(xp, u, nbits):
    if xp is jnp:
        return jax.lax.clz(u.astype(jnp.uint32)).astype(jnp.int32) - (32 - nbits)
    _, ex = np.frexp(np.asarray(u, dtype=np.float64))
    return (nbits - ex).astype(np.int64)


def _encode_fp(xp, bits, t: FloatType, subnormals: str, specials: str, saturate: bool):
    U, I = _types(xp)
    u = lambda v: xp.asarray(v, dtype=U)

    bits = xp.asarray(bits).astype(U)
    M, E, bias = t.mantissa, t.exponent, t.bias
    sign = (bits >> u(31)) & u(1)
    mag = bits & u(0x7FFFFFFF)
    is_nan = mag > u(0x7F800000)
    is_inf = mag == u(0x7F800000)
    is_zero = mag == u(0)

    # normalise: value = sig * 2**(e2 - 23), sig in [2**23, 2**24)
    ef32 = (mag >> u(23)).astype(I)
    man = mag & u(0x7FFFFF)
    sub32 = ef32 == 0
    lz = xp.clip(_clz(xp, man, 32) - 8, 0, 31).astype(I)
    sig = xp.where(sub32, man << lz.astype(U), man | u(0x800000))
    e2 = xp.where(sub32, 1 - lz, ef32) - 127
    e2 = xp.where(is_zero | is_nan | is_inf, 0, e2).astype(I)
    sig = xp.where(is_zero | is_nan | is_inf, u(0x800000), sig)

    emin = 1 - bias
    qsub = sub_exponent(t, subnormals) - M  # quantum exponent of the subnormal binade
    normal = e2 >= emin
    Q = xp.where(normal, e2 - M, qsub).astype(I)
    shift = 23 + Q - e2  # right shift of sig that gives the significand in units of 2**Q
    rs = xp.clip(shift, 0, 26).astype(U)
    q = sig >> rs
    rem = sig & ((u(1) << rs) - u(1))
    half = (u(1) << rs) >> u(1)
    up = (rem > half) | ((rem == half) & (rs > 0) & ((q & u(1)) == u(1)))
    q = q + up.astype(U)
    q = xp.where(shift < 0, sig << xp.clip(-shift, 0, 31).astype(U), q)

    one = u(1 << M)
    # normal binade: carry out of the mantissa moves up one binade
    carry = q >= u(2 << M)
    ef_n = (e2 + bias + carry.astype(I)).astype(I)
    code_n = (ef_n.astype(U) << u(M)) | xp.where(carry, u(0), q - one)
    # subnormal binade (IEEE: q == 2**M is the smallest normal, which the arithmetic gives)
    code_s = q
    if subnormals == "plena" and E < 8:
        # PLENA: subnormals reach 2**-bias * (1 - 2**-M); the smallest normal is 2**(1-bias).
        top = e2 == emin - 1  # value in [2**-bias, 2**(1-bias)): the gap
        ls = max(0, M - 23)
        lhs = sig << u(1 + ls)
        rhs = u(3 * (1 << M) - 1) << u(max(0, 23 - M))
        tie_to_normal = M >= 1  # codes 2**M (min normal, even) vs 2**M - 1 (odd)
        to_normal = (lhs > rhs) | ((lhs == rhs) & tie_to_normal)
        gap = xp.where(to_normal, one, one - u(1))
        below = xp.where(q >= one, one - u(1), q)  # rounding up into the gap: max subnormal
        code_s = xp.where(top, gap, below)
    code = xp.where(normal, code_n, code_s)

    ef_max, mf_max = _max_fields(t, specials)
    max_code = u((ef_max << M) | mf_max)
    all_e = u(((1 << E) - 1) << M)
    quiet_nan = all_e | (u(1 << (M - 1)) if M else u(0))
    if specials == "ieee":
        over_code, nan_code = all_e, quiet_nan  # overflow -> inf
    elif specials == "fn":
        over_code = nan_code = u((1 << (E + M)) - 1)  # the all-ones code
    else:
        over_code, nan_code = max_code, u(0)
    if saturate:
        over_code = max_code
    # (the exponent test catches codes whose exponent field would not fit before the shift)
    overflow = is_inf | (code > max_code) | (normal & (ef_n > (1 << E) - 1))
    code = xp.where(overflow, over_code, code)
    code = xp.where(is_zero, u(0), code)

    if t.sign:
        code = code | (sign << u(E + M))
        # ml_dtypes: NaN keeps its sign; without a NaN code it becomes the sign-only code (-0)
        nan_sign = u(1 << (E + M)) if specials == "finite" else sign << u(E + M)
        code = xp.where(is_nan, nan_code | nan_sign, code)
    else:
        code = xp.where((sign == u(1)) & ~is_nan, u(0), code)
        code = xp.where(is_nan, nan_code, code)
    return code.astype(U)


def _decode_fp_bits(xp, codes, t: FloatType, subnormals: str, specials: str):
    """f32 bits of each code (exponent <= 8, mantissa <= 23: every value is an f32, exact)."""
    U, I = _types(xp)
    u = lambda v: xp.asarray(v, dtype=U)
    M, E, bias = t.mantissa, t.exponent, t.bias
    c = xp.asarray(codes).astype(U) & u((1 << t.width) - 1)
    mant = c & u((1 << M) - 1)
    ef = ((c >> u(M)) & u((1 << E) - 1)).astype(I)
    neg = ((c >> u(E + M)) & u(1)) if t.sign else xp.zeros_like(c)
    sgn = (neg << u(31)).astype(U)
    normal_bits = ((ef - bias + 127).astype(U) << u(23)) | (mant << u(23 - M))
    # subnormal: mant * 2**(sub - M), exact; build it by hand (no float ops: FTZ-proof)
    k = sub_exponent(t, subnormals) - M
    lz = xp.clip(_clz(xp, mant, 32), 0, 32).astype(I)
    msb = 31 - lz  # position of the top set bit of mant
    e_res = msb + k  # unbiased exponent of the value
    # normal f32 result
    sh_n = (23 - msb).astype(I)
    sig_n = xp.where(sh_n >= 0, mant << xp.clip(sh_n, 0, 31).astype(U),
                     mant >> xp.clip(-sh_n, 0, 31).astype(U))
    norm_res = ((e_res + 127).astype(U) << u(23)) | (sig_n & u(0x7FFFFF))
    # f32-subnormal result: mant * 2**(k + 149) units of 2**-149 (exact when representable)
    sh_s = (k + 149)
    if sh_s >= 0:
        den_res = mant << u(min(sh_s, 31))
    else:
        den_res = mant >> u(min(-sh_s, 31))
    sub_bits = xp.where(mant == u(0), u(0), xp.where(e_res >= -126, norm_res, den_res))
    out = xp.where(ef == 0, sub_bits, normal_bits)
    all_e = (1 << E) - 1
    if specials == "ieee":
        spec = (ef == all_e)
        out = xp.where(spec, u(0x7F800000) | (mant << u(23 - M)), out)
    elif specials == "fn":
        spec = (ef == all_e) & (mant == u((1 << M) - 1))
        out = xp.where(spec, u(0x7FC00000), out)
    return (out | sgn).astype(xp.uint32)


def _round_to_f32_bits(sig, k):
    """f32 bits of ``sig * 2**k`` (jnp; ``sig`` uint32, ``k`` int32): RNE, gradual underflow,
    ±inf on overflow, all in integer arithmetic (no FTZ). ``sig == 0`` gives +0."""
    u = lambda v: jnp.asarray(v, dtype=jnp.uint32)
    lz = jax.lax.clz(sig).astype(jnp.int32)
    s = sig << jnp.clip(lz, 0, 31).astype(jnp.uint32)  # top bit at 31
    e = 31 - lz + k  # the value lies in [2**e, 2**(e+1))
    drop = 8 + jnp.clip(-126 - e, 0, 40)  # low bits of s that do not fit
    d = jnp.clip(drop, 1, 31).astype(jnp.uint32)
    q = s >> d
    rem = s & ((u(1) << d) - u(1))
    half = u(1) << (d - u(1))
    q = q + ((rem > half) | ((rem == half) & ((q & u(1)) == u(1)))).astype(jnp.uint32)
    q = jnp.where(drop == 32, (s > u(0x80000000)).astype(jnp.uint32), jnp.where(drop > 32, u(0), q))
    carry = q >= u(1 << 24)  # rounding carried into the next binade (normal results)
    en = e + carry.astype(jnp.int32)
    qn = jnp.where(carry, q >> u(1), q)
    normal = ((en + 127).astype(jnp.uint32) << u(23)) | (qn & u(0x7FFFFF))
    normal = jnp.where(en + 127 >= 255, u(0x7F800000), normal)
    out = jnp.where(e >= -126, normal, q)  # q == 2**23 is the smallest normal's bit pattern
    return jnp.where(sig == u(0), u(0), out)


def _decode_fp_bits_rounded(codes, t: FloatType, subnormals: str, specials: str):
    """f32 bits (jnp) of codes of any float type up to 32 bits: the value rounded to f32 (RNE,
    overflow to ±inf), for types f32 does not hold exactly (exponent > 8 or mantissa > 23)."""
    u = lambda v: jnp.asarray(v, dtype=jnp.uint32)
    M, E, bias = t.mantissa, t.exponent, t.bias
    c = jnp.asarray(codes).astype(jnp.uint32) & u((1 << t.width) - 1 if t.width < 32 else 0xFFFFFFFF)
    mant = c & u((1 << M) - 1)
    ef = ((c >> u(M)) & u((1 << E) - 1)).astype(jnp.int32)
    neg = ((c >> u(E + M)) & u(1)) if t.sign else jnp.zeros_like(c)
    sig = jnp.where(ef == 0, mant, mant | u(1 << M))
    k = jnp.where(ef == 0, sub_exponent(t, subnormals) - M, ef - bias - M)
    out = _round_to_f32_bits(sig, k)
    all_e = (1 << E) - 1
    if specials == "ieee":
        out = jnp.where(ef == all_e, jnp.where(mant == u(0), u(0x7F800000), u(0x7FC00000)), out)
    elif specials == "fn":
        out = jnp.where((ef == all_e) & (mant == u((1 << M) - 1)), u(0x7FC00000), out)
    return out | (neg << u(31))


def _decode_fp_np_wide(codes, t: FloatType, subnormals: str, specials: str) -> np.ndarray:
    """numpy decode for any field widths (float64, then one RNE to f32)."""
    M, E, bias = t.mantissa, t.exponent, t.bias
    c = np.asarray(codes).astype(np.uint64) & np.uint64((1 << t.width) - 1)
    mant = (c & np.uint64((1 << M) - 1)).astype(np.float64)
    ef = ((c >> np.uint64(M)) & np.uint64((1 << E) - 1)).astype(np.int64)
    neg = ((c >> np.uint64(E + M)) & np.uint64(1)).astype(bool) if t.sign else np.zeros(c.shape, bool)
    frac = mant / float(1 << M)
    with np.errstate(over="ignore", under="ignore"):
        normal = np.ldexp(1.0 + frac, np.clip(ef - bias, -2000, 2000).astype(np.int32))
        sub = np.ldexp(frac, np.full(c.shape, max(sub_exponent(t, subnormals), -2000), np.int32))
        mag = np.where(ef == 0, sub, normal)
        all_e = (1 << E) - 1
        if specials == "ieee":
            mag = np.where(ef == all_e, np.where(mant == 0, np.inf, np.nan), mag)
        elif specials == "fn":
            mag = np.where((ef == all_e) & (mant == (1 << M) - 1), np.nan, mag)
        val = np.where(neg, -mag, mag)
        return val.astype(np.float32)


# =============================================================================================
# integer kernels
# =============================================================================================

def _encode_int(xp, x, t: IntType):
    lo, hi = -(1 << (t.width - 1)), (1 << (t.width - 1)) - 1
    x = xp.asarray(x, dtype=xp.float32)
    r = xp.round(x)  # half to even
    r = xp.where(xp.isnan(r), 0.0, r)
    if xp is np:
        v = np.clip(r.astype(np.float64), lo, hi).astype(np.int64)
        return (v & ((1 << t.width) - 1)).astype(np.uint64)
    # f32 holds every saturation bound of width <= 25 exactly; wider: clamp in f32 first
    v = jnp.clip(r, np.float32(lo), np.float32(hi) if t.width <= 24 else np.float32(2.0 ** (t.width - 1) - 2 ** (t.width - 25)))
    v = v.astype(jnp.int32) if t.width <= 31 else jnp.where(r >= 2.0 ** 31, jnp.int32(hi), v.astype(jnp.int32))
    return (v.astype(jnp.uint32) & jnp.uint32((1 << t.width) - 1 if t.width < 32 else 0xFFFFFFFF))


def _decode_int(xp, codes, t: IntType):
    U, I = _types(xp)
    w = t.width
    c = xp.asarray(codes).astype(U) & xp.asarray((1 << w) - 1 if w < 64 else -1, dtype=U)
    if xp is np:
        v = c.astype(np.int64)
        v = np.where(v >= (1 << (w - 1)), v - (1 << w), v)
        return v.astype(np.float32)  # RNE for |v| > 2**24
    if w == 32:
        return jax.lax.bitcast_convert_type(c, jnp.int32).astype(jnp.float32)
    v = c.astype(jnp.int32)
    v = jnp.where(v >= (1 << (w - 1)), v - (1 << w), v)
    return v.astype(jnp.float32)


# =============================================================================================
# public scalar API
# =============================================================================================

def _check_conv(subnormals, specials):
    if subnormals not in SUBNORMALS:
        raise ValueError(f"subnormals must be one of {SUBNORMALS}, got {subnormals!r}")
    if specials not in SPECIALS:
        raise ValueError(f"specials must be one of {SPECIALS}, got {specials!r}")


@functools.partial(jax.jit, static_argnames=("t", "subnormals", "specials", "saturate"))
def encode(x, t: DataType, subnormals: str = "plena", specials: str = "ieee",
           saturate: bool = False) -> jnp.ndarray:
    """Codes (``uint32``) of the f32 values ``x`` in type ``t``, RNE (see the module docstring
    for the conventions). jit-able; ``t`` and the switches are static."""
    check_scalar_type(t)
    _check_conv(subnormals, specials)
    if isinstance(t, IntType):
        return _encode_int(jnp, x, t)
    return _encode_fp(jnp, f32_bits(x), t, subnormals, specials, saturate)


def encode_np(x, t: DataType, subnormals: str = "plena", specials: str = "ieee",
              saturate: bool = False) -> np.ndarray:
    """numpy twin of :func:`encode` (any field widths up to 32 bits)."""
    check_scalar_type(t)
    _check_conv(subnormals, specials)
    with np.errstate(all="ignore"):
        if isinstance(t, IntType):
            return _encode_int(np, x, t).astype(np.uint32)
        return _encode_fp(np, f32_bits_np(np.asarray(x, np.float32)), t, subnormals, specials,
                          saturate).astype(np.uint32)


@functools.partial(jax.jit, static_argnames=("t", "subnormals", "specials"))
def decode(codes, t: DataType, subnormals: str = "plena", specials: str = "ieee") -> jnp.ndarray:
    """f32 values of integer codes of type ``t`` (low ``t.width`` bits used): exact when
    :func:`f32_holds` (``t``), else rounded to f32 (RNE, overflow to ±inf, gradual underflow)."""
    check_scalar_type(t)
    _check_conv(subnormals, specials)
    if isinstance(t, IntType):
        return _decode_int(jnp, codes, t)
    if not f32_holds(t):
        return f32_from_bits(_decode_fp_bits_rounded(codes, t, subnormals, specials))
    return f32_from_bits(_decode_fp_bits(jnp, codes, t, subnormals, specials))


def decode_np(codes, t: DataType, subnormals: str = "plena", specials: str = "ieee") -> np.ndarray:
    """numpy twin of :func:`decode` (any widths up to 32 bits; values outside f32 are rounded
    to f32 with RNE, overflowing to ±inf)."""
    check_scalar_type(t)
    _check_conv(subnormals, specials)
    with np.errstate(all="ignore"):
        if isinstance(t, IntType):
            return _decode_int(np, codes, t)
        if f32_holds(t):
            return f32_from_bits_np(_decode_fp_bits(np, codes, t, subnormals, specials))
        return _decode_fp_np_wide(codes, t, subnormals, specials)


@functools.partial(jax.jit, static_argnames=("t", "subnormals", "specials", "saturate"))
def round_to(x, t: DataType, subnormals: str = "plena", specials: str = "ieee",
             saturate: bool = False) -> jnp.ndarray:
    """``decode(encode(x))``: each f32 value rounded (RNE) to the nearest value of ``t``."""
    return decode(encode(x, t, subnormals, specials, saturate), t, subnormals, specials)


def round_to_np(x, t: DataType, subnormals: str = "plena", specials: str = "ieee",
                saturate: bool = False) -> np.ndarray:
    """numpy twin of :func:`round_to`."""
    return decode_np(encode_np(x, t, subnormals, specials, saturate), t, subnormals, specials)


# =============================================================================================
# MX blocks
# =============================================================================================

def check_mx_format(fmt: MxFormat) -> None:
    """Raise NotImplementedError for MX formats the codec does not model."""
    if not isinstance(fmt, MxFormat):
        raise TypeError(f"expected an MxFormat, got {fmt!r}")
    if fmt.block < 1:
        raise ValueError(f"{fmt}: block must be positive")
    sc = fmt.scale
    if not (isinstance(sc, FloatType) and not sc.sign and sc.mantissa == 0 and 1 <= sc.exponent <= 8):
        raise NotImplementedError(
            f"{fmt}: the scale must be an unsigned power-of-two type eKm0 with K <= 8 (e8m0)")
    el = fmt.elem
    if isinstance(el, FloatType):
        if not (el.sign and 1 <= el.exponent <= 7 and el.width <= 16):
            raise NotImplementedError(
                f"{fmt}: MX float elements must be signed, at most 16 bits wide, exponent <= 7")
    elif isinstance(el, IntType):
        if not 2 <= el.width <= 16:
            raise NotImplementedError(f"{fmt}: MX integer elements of 2..16 bits are supported")
    else:
        raise TypeError(f"{fmt}: unknown element type {el!r}")


def _mx_encode_int(xp, x, fmt: MxFormat):
    el, sbias = fmt.elem, fmt.scale.bias
    x = xp.asarray(x, dtype=xp.float32)
    n = x.shape[-1]
    if n % fmt.block:
        raise ValueError(f"last axis ({n}) must be a positive multiple of the block size {fmt.block}")
    xb = x.reshape(x.shape[:-1] + (n // fmt.block, fmt.block))
    bits = (f32_bits(xb) if xp is jnp else f32_bits_np(xb))
    u = (lambda v: xp.asarray(v, dtype=xp.uint32))
    mag = bits & u(0x7FFFFFFF)
    mag = xp.where(mag > u(0x7F800000), u(0), mag)
    max_bits = xp.max(mag, axis=-1)
    zero_block = max_bits == 0
    fl = f32_from_bits if xp is jnp else f32_from_bits_np
    v = (fl(max_bits) + _mx.EPS_F32).astype(xp.float32)
    e = _mx._floor_log2_bits(xp, (f32_bits(v) if xp is jnp else f32_bits_np(v))) - (el.width - 2)
    e = xp.clip(e, -sbias, sbias)
    scale_codes = xp.where(zero_block, 0, e + sbias).astype(xp.uint32)
    qv = fl(_mx._ldexp_bits(xp, bits, -e[..., None]))
    codes = _encode_int(xp, qv, el).astype(xp.uint32)
    codes = xp.where(zero_block[..., None], u(0), codes)
    return codes.reshape(codes.shape[:-2] + (-1,)), scale_codes


def _mx_decode_int(xp, elem_codes, scale_codes, fmt: MxFormat):
    from .minifloat import decode_table
    el = fmt.elem
    st = xp.asarray(decode_table(fmt.scale))
    vals = _decode_int(xp, elem_codes, el)
    n = vals.shape[-1]
    vb = vals.reshape(vals.shape[:-1] + (n // fmt.block, fmt.block))
    sc = xp.asarray(scale_codes).astype(xp.int32) & ((1 << fmt.scale.width) - 1)
    s = st[sc]
    sbits = (f32_bits(s) if xp is jnp else f32_bits_np(s))[..., None]
    s_exp = ((sbits >> 23) & 0xFF).astype(xp.int32)
    pow2 = ((sbits & 0x7FFFFF) == 0) & (s_exp >= 1) & (s_exp <= 254)
    vbits = f32_bits(vb) if xp is jnp else f32_bits_np(vb)
    fl = f32_from_bits if xp is jnp else f32_from_bits_np
    exact = fl(_mx._ldexp_bits(xp, vbits, s_exp - 127))  # integers are normal: no DAZ issue
    out = xp.where(pow2, exact, vb * s[..., None]).astype(xp.float32)
    return out.reshape(out.shape[:-2] + (-1,))


@functools.partial(jax.jit, static_argnames="fmt")
def mx_encode(x, fmt: MxFormat):
    """MX encode along the last axis: ``(elem_codes uint32[..., n], scale_codes uint32[..., n/block])``.
    Float elements: the hardware encoder (MXFP8 bit-identical to the reference)."""
    check_mx_format(fmt)
    if isinstance(fmt.elem, IntType):
        return _mx_encode_int(jnp, x, fmt)
    e, s = _mx._mx_encode(jnp, x, fmt, check=False)
    return e.astype(jnp.uint32), s.astype(jnp.uint32)


def mx_encode_np(x, fmt: MxFormat):
    """numpy twin of :func:`mx_encode`."""
    check_mx_format(fmt)
    with np.errstate(all="ignore"):
        if isinstance(fmt.elem, IntType):
            return _mx_encode_int(np, x, fmt)
        e, s = _mx._mx_encode(np, x, fmt, check=False)
        return e.astype(np.uint32), s.astype(np.uint32)


@functools.partial(jax.jit, static_argnames="fmt")
def mx_decode(elem_codes, scale_codes, fmt: MxFormat) -> jnp.ndarray:
    """MX decode (spec §2.9(c)) for any element type and power-of-two scale type."""
    check_mx_format(fmt)
    if isinstance(fmt.elem, IntType):
        return _mx_decode_int(jnp, elem_codes, scale_codes, fmt)
    return _mx._mx_decode(jnp, elem_codes, scale_codes, fmt)


def mx_decode_np(elem_codes, scale_codes, fmt: MxFormat) -> np.ndarray:
    """numpy twin of :func:`mx_decode`."""
    check_mx_format(fmt)
    with np.errstate(all="ignore"):
        if isinstance(fmt.elem, IntType):
            return _mx_decode_int(np, elem_codes, scale_codes, fmt)
        return _mx._mx_decode(np, elem_codes, scale_codes, fmt)


@functools.partial(jax.jit, static_argnames="fmt")
def mx_round(x, fmt: MxFormat) -> jnp.ndarray:
    """``mx_decode(mx_encode(x))``: the value an HBM round trip leaves."""
    e, s = mx_encode(x, fmt)
    return mx_decode(e, s, fmt)


def mx_round_np(x, fmt: MxFormat) -> np.ndarray:
    """numpy twin of :func:`mx_round`."""
    return mx_decode_np(*mx_encode_np(x, fmt), fmt)


# =============================================================================================
# byte packing (spec §2.9(b): little-endian, first element in the lowest bits)
# =============================================================================================

def _pack(xp, codes, width: int):
    U = xp.uint32
    c = xp.asarray(codes).astype(U)
    if width < 32:
        c = c & xp.asarray((1 << width) - 1, U)
    n = c.shape[-1]
    if (n * width) % 8:
        raise ValueError(f"{n} codes of {width} bits do not fill whole bytes")
    if width % 8 == 0:  # whole bytes per code
        shifts = xp.arange(width // 8, dtype=U) * xp.asarray(8, U)
        b = (c[..., None] >> shifts) & xp.asarray(0xFF, U)
        return b.reshape(c.shape[:-1] + (-1,)).astype(xp.uint8)
    if 8 % width == 0:  # whole codes per byte
        per = 8 // width
        g = c.reshape(c.shape[:-1] + (n // per, per))
        shifts = xp.arange(per, dtype=U) * xp.asarray(width, U)
        return xp.sum(g << shifts, axis=-1).astype(xp.uint8)  # disjoint bits: sum == or
    # any other width (e.g. 6): through a little-endian bit stream
    bits = (c[..., None] >> xp.arange(width, dtype=U)) & xp.asarray(1, U)
    bits = bits.reshape(c.shape[:-1] + (n * width // 8, 8))
    return xp.sum(bits << xp.arange(8, dtype=U), axis=-1).astype(xp.uint8)


def _unpack(xp, data, width: int, n: int):
    U = xp.uint32
    d = xp.asarray(data).astype(U)
    if width % 8 == 0:
        nb = width // 8
        g = d.reshape(d.shape[:-1] + (-1, nb))[..., :n, :]
        shifts = xp.arange(nb, dtype=U) * xp.asarray(8, U)
        return xp.sum(g << shifts, axis=-1).astype(U)
    if 8 % width == 0:
        per = 8 // width
        shifts = xp.arange(per, dtype=U) * xp.asarray(width, U)
        c = (d[..., None] >> shifts) & xp.asarray((1 << width) - 1, U)
        return c.reshape(d.shape[:-1] + (-1,))[..., :n]
    bits = (d[..., None] >> xp.arange(8, dtype=U)) & xp.asarray(1, U)
    bits = bits.reshape(d.shape[:-1] + (-1,))[..., : n * width]
    bits = bits.reshape(d.shape[:-1] + (n, width))
    return xp.sum(bits << xp.arange(width, dtype=U), axis=-1).astype(U)


def pack_codes_np(codes, width: int) -> np.ndarray:
    """Pack codes of ``width`` bits (1..32) along the last axis into bytes
    (uint8[..., n * width / 8]), little-endian: the first element takes the lowest bits
    (spec §2.9(b); 6-bit codes straddle bytes)."""
    return _pack(np, codes, width)


def unpack_codes_np(data, width: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes_np`: ``n`` codes (uint32) from bytes along the last axis."""
    return _unpack(np, data, width, n)


def unpack_codes(data, width: int, n: int) -> jnp.ndarray:
    """jnp twin of :func:`unpack_codes_np` (``width`` and ``n`` static)."""
    return _unpack(jnp, data, width, n)


def pack_codes(codes, width: int) -> jnp.ndarray:
    """jnp twin of :func:`pack_codes_np`."""
    return _pack(jnp, codes, width)


__all__.append("pack_codes")
