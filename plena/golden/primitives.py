"""PLENA arithmetic as differentiable jnp functions, instruction by instruction.

Each function computes what one instruction (or one fixed sequence of instructions) of the
machine computes, with the roundings named by :mod:`plena.golden.quant`, so that with
``Policy.hardware()`` its output is bit-identical to the emulator (:mod:`plena.emu_jax`) given
the same operands, and with ``Policy.fp32()`` it is plain float32 math.

Conventions:

* Values are f32 arrays (any shape; vector ops work element-wise with broadcasting, reductions
  over the last axis). In hardware mode the operands must be what the machine holds: bf16 values
  for VRAM rows and fp registers, MX-dequantised values for MRAM. Operands of the tabulated
  unary ops are rounded to bf16 first (a no-op for such operands).
* ``policy`` is a static, hashable :class:`~plena.golden.quant.Policy`; ``None`` means
  ``Policy.hardware()``.
* Which point governs which choice: a V_* result is rounded at ``vram``, an S_*_FP / V_RED_*
  result at ``fpreg``; the exact tabulated exp / reciprocal / sqrt (spec §8) are used when that
  result point is in hardware mode (otherwise ``jnp.exp`` etc., without the ±88 clamp of exp);
  summation orders follow the ``accum`` point.
* Derivatives: roundings are straight-through; the tabulated functions have the derivative of
  the fp32 function (exp: zero where the clamp is active), and the hardware matmul has the
  fp32 matmul's derivative, so for one primitive and one incoming cotangent the hardware-mode
  gradient equals the fp32-mode gradient at the same point, bit for bit (except where the
  hardware-only exp clamp cuts it). Through a whole model the two differ only because the
  forward values (and hence later derivatives) differ.
* Everything is jit-able (``static_argnames="policy"``) and vmap-able.

Not modelled here: masked vector ops (rmask / V_MASK), V_SHFT_V, V_TOPK, the batched-head
matrix ops (M_BMM, M_BTMM, M_BTMV: products scaled by 0.25) and M_TMM/M_TMV (the transposed
tile); :func:`matmul_tiles` covers M_MM / M_MV with M_MM_WO / M_MV_WO.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from plena.numerics import ieee, unary
from plena.numerics.bf16 import f32_to_bf16_bits, f32_to_bf16_bits_reg
from plena.numerics.containers import is_wide
from plena.numerics.formats import MxFormat, PlainFormat
from plena.numerics.matmul import ordered_matmul
from plena.numerics.reduce import torch_sum

from .quant import HBM_POINTS, Policy, q

__all__ = [
    "vram", "fpreg", "fpsram", "mx_qdq",
    "v_add", "v_sub", "v_mul", "v_max", "v_min", "v_exp", "v_reci",
    "s_add", "s_sub", "s_mul", "s_max", "s_exp", "s_reci", "s_sqrt",
    "row_sum", "red_sum_into", "red_max_into",
    "matmul_tiles", "k_chunked_matmul",
]

HIGHEST = lax.Precision.HIGHEST
EXP_CLAMP = unary.EXP_CLAMP


def _policy(policy: Optional[Policy]) -> Policy:
    return Policy() if policy is None else policy


def _f32(x) -> jnp.ndarray:
    return jnp.asarray(x, jnp.float32)


# =============================================================================================
# storage roundings
# =============================================================================================

def vram(x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """A VRAM write: ``bf16(x)`` with the VRAM cast (every V_* result, M_*_WO, H_PREFETCH_V)."""
    return q(x, "vram", _policy(policy))


def fpreg(x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """An fp-register write: ``half::bf16::from_f32(x)`` (S_*_FP, V_RED_SUM, V_RED_MAX)."""
    return q(x, "fpreg", _policy(policy))


def fpsram(x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """An FP SRAM constant given in f32, as the preload file delivers it: f32 -> f16 -> bf16."""
    return q(x, "fpsram_preload", _policy(policy))


def mx_qdq(x, fmt: Optional[MxFormat] = None, policy: Optional[Policy] = None,
           point: str = "hbm_act") -> jnp.ndarray:
    """HBM quantise-dequantise along the last axis (MX: blocks of ``fmt.block``; a Plain format:
    RNE to its type, :mod:`plena.numerics.codec`), in the format the policy (from the config's
    precision tables, ``Policy.hardware(cfg)``) gives the point: the value an HBM
    round trip leaves, ``decode(encode(x))`` with the hardware encoder (H_STORE_V, spec §2.9(d))
    and decoder (H_PREFETCH_V / H_PREFETCH_M, §2.9(c)). The result is f32 (MRAM keeps it as is;
    a VRAM destination rounds it again, see :func:`vram`).

    ``point`` (``"hbm_act"``, ``"hbm_kv"`` or ``"hbm_weight"``) selects the policy mode;
    ``fmt=None`` takes that point's format from the policy.
    """
    policy = _policy(policy)
    if point not in HBM_POINTS:
        raise ValueError(f"mx_qdq: point must be one of {HBM_POINTS}, got {point!r}")
    if fmt is not None and not isinstance(fmt, (MxFormat, PlainFormat)):
        raise TypeError(f"mx_qdq: fmt must be an MxFormat, a PlainFormat or None, got {type(fmt).__name__} "
                        "(the signature is mx_qdq(x, fmt, policy, point))")
    if fmt is not None and fmt != policy.format(point):
        policy = policy.with_format(point, fmt)
    return q(x, point, policy)


class _Plain:
    """Plain XLA f32 arithmetic (what ``fp32`` mode uses: no bit-exactness is claimed there)."""

    add = staticmethod(jnp.add)
    sub = staticmethod(jnp.subtract)
    mul = staticmethod(jnp.multiply)
    maximum = staticmethod(jnp.maximum)
    minimum = staticmethod(jnp.minimum)
    greater = staticmethod(jnp.greater)
    max_reduce = staticmethod(lambda x: jnp.max(x, axis=-1))


def _arith(policy, point: str):
    """IEEE arithmetic that keeps subnormals (:mod:`plena.numerics.ieee`, as the emulator) when
    ``point`` is in hardware mode, else plain f32 (cheaper to compile)."""
    return ieee if _policy(policy).is_hardware(point) else _Plain


# =============================================================================================
# element-wise vector ops (VRAM result) and scalar fp ops (fp-register result)
# =============================================================================================

def v_add(a, b, policy: Optional[Policy] = None) -> jnp.ndarray:
    """V_ADD_VV / V_ADD_VF: ``vram(a + b)`` (``b`` a row or an fp-register scalar)."""
    return vram(_arith(policy, "vram").add(_f32(a), _f32(b)), policy)


def v_sub(a, b, policy: Optional[Policy] = None) -> jnp.ndarray:
    """V_SUB_VV (rs1 - rs2), V_SUB_VF (funct1 = 0: a - s; reversed: call ``v_sub(s, a)``)."""
    return vram(_arith(policy, "vram").sub(_f32(a), _f32(b)), policy)


def v_mul(a, b, policy: Optional[Policy] = None) -> jnp.ndarray:
    """V_MUL_VV / V_MUL_VF: ``vram(a * b)``."""
    return vram(_arith(policy, "vram").mul(_f32(a), _f32(b)), policy)


def v_max(a, s, policy: Optional[Policy] = None) -> jnp.ndarray:
    """V_MAX_VF: libtorch ``clamp_min(a, s)``: NaN elements of ``a`` stay NaN, a NaN ``s`` gives
    NaN everywhere; then ``vram``."""
    a, s = _f32(a), _f32(s)
    return vram(jnp.where(jnp.isnan(s), s, jnp.where(jnp.isnan(a), a, _arith(policy, "vram").maximum(a, s))), policy)


def v_min(a, s, policy: Optional[Policy] = None) -> jnp.ndarray:
    """V_MIN_VF: libtorch ``clamp_max(a, s)`` (same NaN rules as :func:`v_max`), then ``vram``."""
    a, s = _f32(a), _f32(s)
    return vram(jnp.where(jnp.isnan(s), s, jnp.where(jnp.isnan(a), a, _arith(policy, "vram").minimum(a, s))), policy)


def s_add(a, b, policy: Optional[Policy] = None) -> jnp.ndarray:
    """S_ADD_FP: ``fpreg(a + b)``."""
    return fpreg(_arith(policy, "fpreg").add(_f32(a), _f32(b)), policy)


def s_sub(a, b, policy: Optional[Policy] = None) -> jnp.ndarray:
    """S_SUB_FP: ``fpreg(a - b)``."""
    return fpreg(_arith(policy, "fpreg").sub(_f32(a), _f32(b)), policy)


def s_mul(a, b, policy: Optional[Policy] = None) -> jnp.ndarray:
    """S_MUL_FP: ``fpreg(a * b)``."""
    return fpreg(_arith(policy, "fpreg").mul(_f32(a), _f32(b)), policy)


def s_max(a, b, policy: Optional[Policy] = None) -> jnp.ndarray:
    """S_MAX_FP (``half`` max): ``b`` if ``a`` is NaN or ``b > a``, else ``a``; then ``fpreg``."""
    a, b = _f32(a), _f32(b)
    return fpreg(jnp.where(jnp.isnan(a) | _arith(policy, "fpreg").greater(b, a), b, a), policy)


# =============================================================================================
# tabulated unary functions (exact f32 results for bf16 operands, spec §8)
# =============================================================================================

def _exp_jvp(x, t):
    inside = jnp.abs(x) <= EXP_CLAMP  # exp(clamp(x)) is constant outside [-88, 88] (and for NaN)
    safe = jnp.where(inside, x, 0.0)  # keeps exp(x) = inf out of the (transposed) select
    return jnp.where(inside, jax.jvp(jnp.exp, (safe,), (t,))[1], jnp.zeros_like(t))


_FP32_FN = {"exp": jnp.exp, "reci": lambda x: 1.0 / x, "sqrt": jnp.sqrt}
_TABLE_JVP = {
    "exp": _exp_jvp,
    "reci": lambda x, t: jax.jvp(_FP32_FN["reci"], (x,), (t,))[1],
    "sqrt": lambda x, t: jax.jvp(jnp.sqrt, (x,), (t,))[1],
}
_OPERAND_CAST = {"vram": f32_to_bf16_bits, "fpreg": f32_to_bf16_bits_reg}


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _tabulated(name: str, cast: str, x):
    """f32 table value of ``name`` at the operand ``x`` rounded to bf16 with rule ``cast``."""
    return unary.apply(name, _OPERAND_CAST[cast](x))


@_tabulated.defjvp
def _tabulated_jvp(name, cast, primals, tangents):
    (x,), (t,) = primals, tangents
    return _tabulated(name, cast, x), _TABLE_JVP[name](x, t)


def _unary(name: str, point: str, x, policy: Optional[Policy]) -> jnp.ndarray:
    policy = _policy(policy)
    x = _f32(x)
    if not policy.is_hardware(point):
        return _FP32_FN[name](x)
    fmt = policy.vram_format if point == "vram" else policy.fpreg_format
    if is_wide(fmt):  # operands held in f32 (no table): the emulator's f32 evaluation
        return q(unary.apply_f32(name, x), point, policy)
    return q(_tabulated(name, point, x), point, policy)


def v_exp(x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """V_EXP_V: ``vram(exp(clamp(x, -88, 88)))`` through the exact table (hardware, ``vram``
    point); ``jnp.exp(x)`` in fp32 mode. Derivative ``exp(x)``, zero where ``|x| > 88``."""
    return _unary("exp", "vram", x, policy)


def v_reci(x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """V_RECI_V: ``vram(1 / x)`` (IEEE f32 reciprocal, tabulated); ``1 / x`` in fp32 mode."""
    return _unary("reci", "vram", x, policy)


def s_exp(x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """S_EXP_FP: ``fpreg(exp(clamp(x, -88, 88)))`` (table, ``fpreg`` point); fp32: ``jnp.exp``."""
    return _unary("exp", "fpreg", x, policy)


def s_reci(x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """S_RECI_FP: ``fpreg(1 / x)``."""
    return _unary("reci", "fpreg", x, policy)


def s_sqrt(x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """S_SQRT_FP: ``fpreg(sqrt(x))`` (NaN for x < 0)."""
    return _unary("sqrt", "fpreg", x, policy)


# =============================================================================================
# reductions
# =============================================================================================

def row_sum(x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """The f32 sum over the last axis as V_RED_SUM forms it: libtorch's CPU summation order
    (:func:`plena.numerics.reduce.torch_sum`, spec §8) when ``accum`` is hardware, else
    ``jnp.sum``. No rounding (see :func:`red_sum_into`)."""
    x = _f32(x)
    if _policy(policy).is_hardware("accum"):
        return torch_sum(x)
    return jnp.sum(x, axis=-1)


def red_sum_into(acc, x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """V_RED_SUM (rmask = 0): the new fp register ``fpreg(acc + row_sum(x))``; ``acc`` is the
    register's old value, ``x`` the row(s) (last axis summed)."""
    return fpreg(_arith(policy, "fpreg").add(_f32(acc), row_sum(x, policy)), policy)


def red_max_into(acc, x, policy: Optional[Policy] = None) -> jnp.ndarray:
    """V_RED_MAX: ``fpreg(rust_max(torch_max(x), acc))``. ``torch_max`` over the last axis
    propagates NaN; Rust's ``f32::max`` ignores a NaN operand, so a NaN row leaves ``acc``."""
    acc, x = _f32(acc), _f32(x)
    ar = _arith(policy, "fpreg")
    m = ar.max_reduce(x)
    res = jnp.where(jnp.isnan(m), acc, jnp.where(jnp.isnan(acc), m, ar.maximum(m, acc)))
    return fpreg(res, policy)


# =============================================================================================
# systolic array
# =============================================================================================

def _mm(x, w):
    return jnp.matmul(x, w, precision=HIGHEST, preferred_element_type=jnp.float32)


def k_chunked_matmul(x, w, mlen: int) -> jnp.ndarray:
    """``x[..., K] @ w[K, N]`` in the machine's f32 order (no differentiation rule of its own).

    K is cut into chunks of ``mlen`` (the last one zero-padded). For every output element::

        acc = +0.0
        for c in 0, 1, ..., ceil(K / mlen) - 1:          # one M_MM per K-chunk, ascending
            p = ordered_matmul(x[c*mlen : (c+1)*mlen], w[c*mlen : (c+1)*mlen])
            acc = f32(acc + p)                           # m_accum += partial

    The inner product is the emulator's own (:func:`plena.numerics.matmul.ordered_matmul`:
    k ascending, each product rounded on its own; the reference's libtorch sgemm order is
    unspecified, spec §8), so the result does not depend on BLEN.
    """
    x, w = _f32(x), _f32(w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"k_chunked_matmul: shapes {x.shape} @ {w.shape} do not match")
    lead, (K, N) = x.shape[:-1], w.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    nchunks = max(1, -(-K // mlen))
    pad = nchunks * mlen - K
    xs = jnp.pad(x2, ((0, 0), (0, pad))).reshape(M, nchunks, mlen).transpose(1, 0, 2)  # [c, M, k]
    ws = jnp.pad(w, ((0, pad), (0, 0))).reshape(nchunks, mlen, N)  # [c, k, N]

    def chunk(acc, operands):
        xc, wc = operands
        return ieee.add(acc, ordered_matmul(xc, wc)), None

    acc, _ = lax.scan(chunk, jnp.zeros((M, N), jnp.float32), (xs, ws))
    return acc.reshape(lead + (N,))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _hw_matmul(x, w, mlen):
    return k_chunked_matmul(x, w, mlen)


@_hw_matmul.defjvp
def _hw_matmul_jvp(mlen, primals, tangents):
    (x, w), (tx, tw) = primals, tangents
    return _hw_matmul(x, w, mlen), _mm(tx, w) + _mm(x, tw)


def matmul_tiles(x, w, cfg, policy: Optional[Policy] = None, *, write_out: bool = True) -> jnp.ndarray:
    """``X[..., K] @ W[K, N]`` as the systolic array computes it: M_MM (M_MV for one row) over
    the K-chunks of ``cfg.mlen`` in ascending order into one accumulator, then M_MM_WO.

    ``x`` holds VRAM rows (bf16 values in hardware mode), ``w`` the MRAM values (e.g.
    ``mx_qdq(w, point="hbm_weight")``). ``cfg``: a :class:`plena.config.PlenaConfig` or the
    int MLEN. With ``accum`` in hardware mode the f32 accumulator follows
    :func:`k_chunked_matmul` exactly; in fp32 mode it is ``jnp.matmul`` (precision HIGHEST).
    ``write_out=True`` applies the VRAM rounding of M_MM_WO (``vram`` point); ``False``
    returns the f32 accumulator itself. The derivative is the plain matmul's in both modes.
    """
    policy = _policy(policy)
    mlen = int(getattr(cfg, "mlen", cfg))
    x, w = _f32(x), _f32(w)
    acc = _hw_matmul(x, w, mlen) if policy.is_hardware("accum") else _mm(x, w)
    return vram(acc, policy) if write_out else acc
