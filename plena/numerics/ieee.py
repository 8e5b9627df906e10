"""IEEE-754 binary32 arithmetic that keeps subnormals where the backend flushes them.

XLA:CPU runs compiled code with the x86 FTZ and DAZ modes on: a subnormal operand reads as
zero and a subnormal result is written as zero. The reference emulator (Rust, libtorch) keeps
IEEE gradual underflow, and PLENA's bf16 has the same exponent range as f32, so subnormal
values reach VRAM (``2**-100 * 2**-30`` is the bf16 subnormal ``0x0008``).

Each function here computes the plain f32 operation first and replaces only the elements
where FTZ/DAZ could have changed the result by an exact recomputation on the bits:

* :func:`add` / :func:`sub`: when both operands are below ``2**-100`` in magnitude. Their sum
  is then computed scaled by ``2**64`` (subnormal operands scaled through their integer
  significand), which is exact, and scaled back on the bits. When one operand is at least
  ``2**-100`` a subnormal other operand is below half its ulp, so DAZ's zero gives the IEEE
  result; cancellation of two such operands cannot reach the subnormal range (Sterbenz).
* :func:`mul`: when an operand is subnormal or the product's exponent is near or below
  ``2**-126``. The significands' product is formed exactly (Dekker's split) and rounded to the
  f32 grid at the product's exponent (round to nearest even, gradual underflow).
  ``inf * subnormal`` is ``inf`` (DAZ would make it NaN).
* :func:`maximum` / :func:`minimum` / :func:`greater` / :func:`max_reduce`: comparisons on
  integer keys of the bits, so a subnormal is not equal to zero.

The results are the IEEE results bit for bit on any backend (on one that keeps subnormals the
fallback branch simply agrees with the fast one). Derivatives are those of the plain
operations (``jax.custom_jvp``), so the golden model stays differentiable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["add", "sub", "mul", "maximum", "minimum", "greater", "max_reduce", "scale_up_exact",
           "scale_down_exact"]

_U = jnp.uint32
_SIGN = np.uint32(0x80000000)
_MAG = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)
_MIN_NORMAL = np.uint32(0x00800000)
_TINY = np.uint32((127 - 100) << 23)  # bits of 2**-100
_K = 64  # scale of the exact add path


def _bits(x):
    return lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), _U)


def _float(u):
    return lax.bitcast_convert_type(u.astype(_U), jnp.float32)


def _operands(a, b):
    """f32 operands behind an optimization barrier: each is used several times below, and
    without the barrier XLA fuses (duplicates) the whole expression that produced it into
    every use, which multiplies compile time along chains of these operations."""
    return lax.optimization_barrier((jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))


def _pow2(e: int):
    return np.float32(2.0 ** e)


# ---------------------------------------------------------------------------------------------
# add / sub
# ---------------------------------------------------------------------------------------------

def _pow2_of(e):
    """2.0**e as f32 for integer arrays e >= -126 (0.0 below)."""
    return _float(jnp.where(e >= -126, (jnp.clip(e, -126, 127) + 127) << 23, 0).astype(_U))


def scale_up_exact(x, k):
    """Exact ``x * 2**k`` for integer ``k >= 0`` (broadcasting) where no overflow occurs: the
    exponent field moved for normal values, the integer significand rescaled for subnormals (a
    multiply would meet DAZ). ±inf and NaN pass through."""
    b = _bits(x)
    k = jnp.asarray(k, jnp.int32)
    ef = ((b >> np.uint32(23)) & np.uint32(0xFF)).astype(jnp.int32)
    up = _float(jnp.where((ef > 0) & (ef < 255), b + (k << 23).astype(_U), b))
    sub = (b & np.uint32(0x7FFFFF)).astype(jnp.float32) * _pow2_of(k - 149)
    sub = jnp.where((b & _SIGN) != 0, -sub, sub)
    return jnp.where(ef == 0, sub, up)


def scale_down_exact(s, k):
    """``s * 2**-k`` for integer ``k >= 0`` and a value that is exactly representable (normal or
    subnormal), built on the bits."""
    b = _bits(s)
    k = jnp.asarray(k, jnp.int32)
    ef = ((b >> np.uint32(23)) & np.uint32(0xFF)).astype(jnp.int32)
    normal = (ef - k >= 1) | (ef == 255) | (k == 0)
    q = (jnp.abs(s) * _pow2_of(149 - k)).astype(_U)  # a subnormal's significand (exact)
    return _float(jnp.where(normal, b - (k << 23).astype(_U) * (ef < 255), (b & _SIGN) | q))


def _add_impl(a, b):
    a, b = _operands(a, b)
    ba, bb = _bits(a), _bits(b)
    tiny = ((ba & _MAG) < _TINY) & ((bb & _MAG) < _TINY)
    slow = scale_down_exact(scale_up_exact(a, _K) + scale_up_exact(b, _K), _K)
    return jnp.where(tiny, slow, a + b)


@jax.custom_jvp
def add(a, b):
    """IEEE f32 ``a + b`` (subnormal operands and results kept)."""
    return _add_impl(a, b)


@add.defjvp
def _add_jvp(primals, tangents):
    a, b = primals
    ta, tb = tangents
    return add(a, b), jnp.asarray(ta, jnp.float32) + jnp.asarray(tb, jnp.float32)


def _neg(x):
    return _float(_bits(x) ^ _SIGN)


@jax.custom_jvp
def sub(a, b):
    """IEEE f32 ``a - b`` (subnormal operands and results kept)."""
    return _add_impl(a, _neg(b))


@sub.defjvp
def _sub_jvp(primals, tangents):
    a, b = primals
    ta, tb = tangents
    return sub(a, b), jnp.asarray(ta, jnp.float32) - jnp.asarray(tb, jnp.float32)


# ---------------------------------------------------------------------------------------------
# mul
# ---------------------------------------------------------------------------------------------

def _significand(mag):
    """(significand in [1, 2) as f32, unbiased exponent) of non-zero finite magnitude bits."""
    ef = (mag >> np.uint32(23)).astype(jnp.int32)
    frac = mag & np.uint32(0x7FFFFF)
    lz = lax.clz(frac).astype(jnp.int32) - 8  # subnormal: shift that brings bit 23 up
    sig = jnp.where(ef == 0, frac << jnp.clip(lz, 0, 31).astype(_U), frac | _MIN_NORMAL)
    e = jnp.where(ef == 0, -126 - lz, ef - 127)
    return sig.astype(jnp.float32) * _pow2(-23), e


def _split(x):
    c = x * np.float32(4097.0)
    hi = c - (c - x)
    return hi, x - hi


def _mul_exact(a_mag, b_mag):
    """Bits of the IEEE product magnitude of non-zero finite magnitudes, computed exactly."""
    ma, ea = _significand(a_mag)
    mb, eb = _significand(b_mag)
    p = ma * mb  # in [1, 4), rounded to 24 bits
    ah, al = _split(ma)
    bh, bl = _split(mb)
    err = ((ah * bh - p) + ah * bl + al * bh) + al * bl  # p + err == ma * mb exactly
    big = p >= 2.0
    p = jnp.where(big, p * np.float32(0.5), p)
    u = ea + eb + big.astype(jnp.int32)
    normal = ((u + 127).astype(_U) << np.uint32(23)) | (_bits(p) & np.uint32(0x7FFFFF))
    s = jnp.clip(-126 - u, 1, 60)  # right shift into the subnormal grid
    t = p * _float(((23 - s + 127) << 23).astype(_U))  # exact: p / 2**s scaled to the grid
    fl = jnp.floor(t)
    frac = t - fl
    odd = (fl.astype(_U) & np.uint32(1)) == 1
    up = (frac > 0.5) | ((frac == 0.5) & ((err > 0) | ((err == 0) & odd)))
    tiny = fl.astype(_U) + up.astype(_U)  # 2**23 is the smallest normal: still the right bits
    return jnp.where(u > 127, _INF, jnp.where(u >= -126, normal, tiny))


@jax.custom_jvp
def mul(a, b):
    """IEEE f32 ``a * b`` (subnormal operands and results kept)."""
    a, b = _operands(a, b)
    ba, bb = _bits(a), _bits(b)
    am, bm = ba & _MAG, bb & _MAG
    sign = (ba ^ bb) & _SIGN
    finite_nz = (am != 0) & (bm != 0) & (am < _INF) & (bm < _INF)
    sub_a, sub_b = (am != 0) & (am < _MIN_NORMAL), (bm != 0) & (bm < _MIN_NORMAL)
    exp_sum = (am >> np.uint32(23)).astype(jnp.int32) + (bm >> np.uint32(23)).astype(jnp.int32)
    slow_needed = finite_nz & (sub_a | sub_b | (exp_sum < 127 + 3))  # product exponent near or below the normal range
    safe_a = jnp.where(slow_needed, am, np.uint32(0x3F800000))
    safe_b = jnp.where(slow_needed, bm, np.uint32(0x3F800000))
    slow = _float(sign | _mul_exact(safe_a, safe_b))
    inf_times_sub = ((am == _INF) & sub_b) | ((bm == _INF) & sub_a)
    out = jnp.where(slow_needed, slow, a * b)
    return jnp.where(inf_times_sub, _float(sign | _INF), out)


@mul.defjvp
def _mul_jvp(primals, tangents):
    a, b = (jnp.asarray(x, jnp.float32) for x in primals)
    ta, tb = (jnp.asarray(t, jnp.float32) for t in tangents)
    return mul(a, b), ta * b + a * tb


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------

def _key(x):
    """int32 whose order is the IEEE order of non-NaN f32 values (-0 and +0 equal)."""
    b = _bits(x)
    mag = (b & _MAG).astype(jnp.int32)
    return jnp.where((b & _SIGN) != 0, -mag, mag)


def greater(a, b):
    """IEEE ``a > b`` (false if either is NaN; a subnormal is greater than zero)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return (_key(a) > _key(b)) & ~jnp.isnan(a) & ~jnp.isnan(b)


def _keyed_extreme(a, b, plain, pick_a):
    """``pick_a ? a : b`` decided on keys, NaN propagating as in ``plain``; among equal-valued
    zeros (+0, -0) the backend's choice ``plain`` is kept."""
    both_zero = (_key(a) == 0) & (_key(b) == 0)
    keyed = jnp.where(both_zero, plain, jnp.where(pick_a, a, b))
    return jnp.where(jnp.isnan(a) | jnp.isnan(b), plain, keyed)


@jax.custom_jvp
def maximum(a, b):
    """``jnp.maximum`` with subnormals ordered as IEEE does (NaN propagates)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return _keyed_extreme(a, b, jnp.maximum(a, b), _key(a) >= _key(b))


@maximum.defjvp
def _maximum_jvp(primals, tangents):
    a, b = primals
    ta, tb = tangents
    return maximum(a, b), jnp.where(jnp.asarray(a) >= jnp.asarray(b), ta, tb)


@jax.custom_jvp
def minimum(a, b):
    """``jnp.minimum`` with subnormals ordered as IEEE does (NaN propagates)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return _keyed_extreme(a, b, jnp.minimum(a, b), _key(a) <= _key(b))


@minimum.defjvp
def _minimum_jvp(primals, tangents):
    a, b = primals
    ta, tb = tangents
    return minimum(a, b), jnp.where(jnp.asarray(a) <= jnp.asarray(b), ta, tb)


@jax.custom_jvp
def max_reduce(x):
    """``jnp.max(x, axis=-1)`` (NaN propagates) with subnormals ordered as IEEE does."""
    axis = -1
    x = jnp.asarray(x, jnp.float32)
    plain = jnp.max(x, axis=axis)
    k = jnp.max(_key(x), axis=axis)
    keyed = _float(jnp.where(k < 0, _SIGN, np.uint32(0)) | jnp.abs(k).astype(_U))
    # XLA:CPU's batched reduce-max does not always propagate NaN: the first NaN, explicitly
    nan = jnp.isnan(x)
    first_nan = jnp.take_along_axis(x, jnp.argmax(nan, axis=axis)[..., None], axis=axis)[..., 0]
    return jnp.where(jnp.any(nan, axis=axis), first_nan, jnp.where(k == 0, plain, keyed))


@max_reduce.defjvp
def _max_reduce_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return max_reduce(x), jax.jvp(lambda v: jnp.max(v, axis=-1), (jnp.asarray(x, jnp.float32),),
                                  (jnp.asarray(t, jnp.float32),))[1]
