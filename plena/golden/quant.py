"""Quantisation policy of the golden model: every place where PLENA rounds, by name.

The hardware computes in f32 and rounds at a handful of well-defined points (spec §2.3, §2.4,
§2.9, §4.0). The golden model calls :func:`q` at each of them, and a :class:`Policy` decides per
point whether the rounding happens exactly as in the machine (``"hardware"``) or not at all
(``"fp32"``, the identity). That gives, from one model definition, the bit-exact golden output
(``Policy.hardware()``), the plain float32 reference (``Policy.fp32()``) and every mixture in
between, e.g. ``Policy.fp32().override(hbm_weight="hardware")`` to measure the error due to
weight quantisation alone.

Quantisation points (:data:`POINTS`):

=================  ==========================================================================
``vram``           every VRAM write (vector-op results, M_*_WO, H_PREFETCH_V): f32 -> bf16 with
                   the VRAM cast (spec §2.9(a), :func:`plena.numerics.f32_to_bf16_bits`);
                   another VECTOR_SRAM_TYPE (``Policy.vram_format``): RNE to it (and, for a
                   subset of bf16, the VRAM cast, exact). Types wider than bf16 (fp16, fp32)
                   are held in f32, so the result is the type's value itself.
``fpreg``          every fp-register write (S_*_FP, V_RED_SUM, V_RED_MAX): f32 -> bf16 with
                   ``half::bf16::from_f32`` (:func:`plena.numerics.f32_to_bf16_bits_reg`);
                   another SCALAR_FP (``Policy.fpreg_format``) as for ``vram``.
``fpsram_preload`` FP SRAM constants, given as f32: the preload file holds IEEE f16, loaded as
                   f16 -> f32 -> bf16 (spec §2.3), so f32 -> f16 (RNE) -> bf16 (RNE).
``hbm_act``        MX quantise-dequantise of activations stored to / loaded from HBM
                   (H_STORE_V then H_PREFETCH_V): the hardware MX encoder (spec §2.9(d)) and
                   decoder (§2.9(c)), blocks along the last axis, format ``act_format``.
``hbm_kv``         the same for the KV cache, format ``kv_format``.
``hbm_weight``     the same for weights (H_PREFETCH_M into MRAM), format ``weight_format``.
                   The hardware encoder is used; the upstream torch quantiser that writes
                   weight images differs from it in rare cases (see :mod:`plena.numerics.mx`).
``accum``          the f32 accumulators (systolic array, vector sums). No rounding in either
                   mode (:func:`q` is the identity); the mode instead selects the *summation
                   order*: ``"hardware"`` reproduces the machine's f32 order (libtorch's sum
                   order for V_RED_SUM, K-chunked accumulation for M_MM), ``"fp32"`` uses plain
                   ``jnp.sum`` / ``jnp.matmul``.
=================  ==========================================================================

Differentiation: in ``"hardware"`` mode :func:`q` has an exact rounding forward pass and a
straight-through (identity) derivative, defined with :func:`jax.custom_jvp`, so ``jax.grad``,
``jax.jvp`` and ``jax.vjp`` go through every point. In ``"fp32"`` mode it is the identity.
Everything is jit-able and vmap-able; a :class:`Policy` is frozen and hashable, so pass it as a
static argument (``jax.jit(f, static_argnames="policy")``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from plena.numerics.bf16 import (bf16_bits_to_f32, f16_bits_to_bf16_bits, f32_to_bf16_bits,
                                 f32_to_bf16_bits_reg)
from plena.numerics import codec
from plena.numerics.containers import is_wide
from plena.numerics.formats import BF16, MXFP8, DataType, FloatType, MxFormat, PlainFormat
from plena.numerics.mx import mx_decode, mx_encode

__all__ = [
    "HARDWARE", "FP32", "MODES", "POINTS", "HBM_POINTS", "Policy", "q", "straight_through",
    "round_vram", "round_fpreg", "round_fpsram_preload", "mx_round", "vram_round", "fpreg_round",
]

HARDWARE = "hardware"
FP32 = "fp32"
MODES = (HARDWARE, FP32)
POINTS = ("vram", "fpreg", "fpsram_preload", "hbm_act", "hbm_kv", "hbm_weight", "accum")
HBM_POINTS = ("hbm_act", "hbm_kv", "hbm_weight")
_FORMAT_FIELD = {"hbm_act": "act_format", "hbm_kv": "kv_format", "hbm_weight": "weight_format"}


@dataclasses.dataclass(frozen=True)
class Policy:
    """Mode (``"hardware"`` or ``"fp32"``) of each quantisation point, plus the MX formats of
    the HBM points. Frozen and hashable: usable as a static jit argument.

    ``Policy()`` is ``Policy.hardware()`` with MXFP8 everywhere (the default machine).
    """

    vram: str = HARDWARE
    fpreg: str = HARDWARE
    fpsram_preload: str = HARDWARE
    hbm_act: str = HARDWARE
    hbm_kv: str = HARDWARE
    hbm_weight: str = HARDWARE
    accum: str = HARDWARE
    act_format: MxFormat = MXFP8
    kv_format: MxFormat = MXFP8
    weight_format: MxFormat = MXFP8
    #: VECTOR_SRAM_TYPE's data type (the ``vram`` point rounds to it, then to bf16)
    vram_format: DataType = BF16
    #: SCALAR_FP (the ``fpreg`` point rounds to it, then to bf16)
    fpreg_format: DataType = BF16
    #: MATRIX_SRAM_TYPE's data type (bf16: MRAM keeps the decoded f32 values, as the
    #: reference; another type rounds the ``hbm_weight`` point's result to it)
    mram_format: DataType = BF16

    def __post_init__(self) -> None:
        for point in POINTS:
            mode = getattr(self, point)
            if mode not in MODES:
                raise ValueError(f"quantisation point {point!r}: mode {mode!r} is not one of {MODES}")
        for field in _FORMAT_FIELD.values():
            fmt = getattr(self, field)
            if not isinstance(fmt, (MxFormat, PlainFormat)):
                raise TypeError(f"{field} must be an MxFormat or PlainFormat, got {fmt!r}")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def hardware(cls, cfg=None) -> "Policy":
        """Every point rounds as the machine does. With a :class:`plena.config.PlenaConfig` the
        MX formats come from its precision table (HBM_V_ACT_TYPE, HBM_V_KV_TYPE,
        HBM_M_WEIGHT_TYPE); without one they are MXFP8."""
        return cls(**_formats_of(cfg))

    @classmethod
    def fp32(cls, cfg=None) -> "Policy":
        """Every point is the identity: plain float32 math (formats kept for later overrides)."""
        return cls(**{p: FP32 for p in POINTS}, **_formats_of(cfg))

    def override(self, **modes: str) -> "Policy":
        """A copy with the named points set to the given modes, e.g. ``override(vram="fp32")``."""
        bad = sorted(set(modes) - set(POINTS))
        if bad:
            raise ValueError(f"unknown quantisation point(s) {bad}; the points are {POINTS}")
        return dataclasses.replace(self, **modes)

    # ---------------------------------------------------------------- queries
    def mode(self, point: str) -> str:
        if point not in POINTS:
            raise ValueError(f"unknown quantisation point {point!r}; the points are {POINTS}")
        return getattr(self, point)

    def is_hardware(self, point: str) -> bool:
        return self.mode(point) == HARDWARE

    def format(self, point: str) -> MxFormat:
        """The MX format of an HBM point."""
        if point not in _FORMAT_FIELD:
            raise ValueError(f"{point!r} has no MX format; HBM points are {HBM_POINTS}")
        return getattr(self, _FORMAT_FIELD[point])

    def with_format(self, point: str, fmt: MxFormat) -> "Policy":
        """A copy with the MX format of HBM point ``point`` replaced."""
        self.format(point)  # validates the point
        return dataclasses.replace(self, **{_FORMAT_FIELD[point]: fmt})

    def modes(self) -> dict:
        """``{point: mode}`` for every point."""
        return {p: getattr(self, p) for p in POINTS}


def _formats_of(cfg) -> dict:
    if cfg is None:
        return {}
    p = cfg.precision
    if p.hbm_m_kv_type != p.hbm_v_kv_type:
        raise NotImplementedError(
            f"HBM_M_KV_TYPE ({p.hbm_m_kv_type}) != HBM_V_KV_TYPE ({p.hbm_v_kv_type}): a KV cache "
            "written by H_STORE_V in one format and read by H_PREFETCH_M in another is not modelled")
    out = dict(act_format=p.hbm_v_act_type, kv_format=p.hbm_v_kv_type, weight_format=p.hbm_m_weight_type,
               fpreg_format=p.scalar_fp)
    if isinstance(p.vector_sram_type, PlainFormat):
        out["vram_format"] = p.vector_sram_type.data
    if isinstance(p.matrix_sram_type, PlainFormat):
        out["mram_format"] = p.matrix_sram_type.data
    return out


# ---------------------------------------------------------------------------------------------
# exact rounding functions (f32 -> f32 values), jit/vmap-able
# ---------------------------------------------------------------------------------------------

def round_vram(x) -> jnp.ndarray:
    """f32 -> bf16 (VRAM cast, spec §2.9(a)) -> f32."""
    return bf16_bits_to_f32(f32_to_bf16_bits(x))


def round_fpreg(x) -> jnp.ndarray:
    """f32 -> bf16 (``half::bf16::from_f32``, the fp-register rule) -> f32."""
    return bf16_bits_to_f32(f32_to_bf16_bits_reg(x))


def round_fpsram_preload(x) -> jnp.ndarray:
    """f32 -> IEEE f16 (RNE, overflow to inf) -> bf16 (the FP SRAM preload, spec §2.3) -> f32."""
    f16_bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32).astype(jnp.float16), jnp.uint16)
    return bf16_bits_to_f32(f16_bits_to_bf16_bits(f16_bits))


@functools.lru_cache(maxsize=None)
def mx_round(fmt, mram_format: DataType = BF16):
    """The f32 -> f32 function an HBM round trip applies (blocks along the last axis, whose
    length must be a multiple of ``fmt.block``): for MX, ``mx_decode(mx_encode(x, fmt), fmt)``
    (the hardware encoder; :mod:`plena.numerics.codec` for formats other than 8-bit float
    elements); for a Plain format the RNE rounding to its data type. With a ``mram_format``
    other than bf16 the result is further rounded to it (what H_PREFETCH_M leaves in MRAM).
    One function object per format, so jit caches and custom_jvp see a stable identity."""
    if isinstance(fmt, MxFormat) and isinstance(fmt.elem, FloatType) and fmt.elem.width == 8 \
            and fmt.scale == MXFP8.scale:
        def base(x):
            elem, scale = mx_encode(x, fmt)
            return mx_decode(elem, scale, fmt)
    elif isinstance(fmt, MxFormat):
        def base(x):
            return codec.mx_round(x, fmt)
    else:
        def base(x):
            return codec.round_to(x, fmt.data)
    if _is_bf16(mram_format):
        qdq = base
    else:
        def qdq(x):
            return codec.round_to(base(x), mram_format)
    qdq.__name__ = f"mx_round[{fmt}]"
    return qdq


def _is_bf16(t) -> bool:
    return isinstance(t, FloatType) and (t.sign, t.exponent, t.mantissa) == (True, 8, 7)


@functools.lru_cache(maxsize=None)
def vram_round(fmt: DataType):
    """f32 -> f32 VRAM write for VECTOR_SRAM_TYPE data type ``fmt``: the VRAM cast for bf16,
    else RNE to ``fmt`` (held exactly: in bf16 when ``fmt`` is a subset of bf16, else in the
    f32 container, :mod:`plena.numerics.containers`)."""
    if _is_bf16(fmt):
        return round_vram
    if is_wide(fmt):
        def fn(x):
            return codec.round_to(x, fmt)
        fn.__name__ = f"vram_round[{fmt}]"
        return fn

    def fn(x):
        return round_vram(codec.round_to(x, fmt))
    fn.__name__ = f"vram_round[{fmt}]"
    return fn


@functools.lru_cache(maxsize=None)
def fpreg_round(fmt: DataType):
    """f32 -> f32 fp-register write for SCALAR_FP ``fmt`` (bf16: ``half::bf16::from_f32``;
    another type: RNE to it, held exactly in bf16 or, for a type wider than bf16, in f32)."""
    if _is_bf16(fmt):
        return round_fpreg
    if is_wide(fmt):
        def fn(x):
            return codec.round_to(x, fmt)
        fn.__name__ = f"fpreg_round[{fmt}]"
        return fn

    def fn(x):
        return round_fpreg(codec.round_to(x, fmt))
    fn.__name__ = f"fpreg_round[{fmt}]"
    return fn


# ---------------------------------------------------------------------------------------------
# straight-through differentiation
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def straight_through(fn, x):
    """``fn(x)`` forward, identity derivative (``d fn(x) / dx := 1``).

    ``fn`` must be a hashable f32 -> f32 function that preserves shapes (a module-level function
    or one from :func:`mx_round`)."""
    return fn(x)


@straight_through.defjvp
def _straight_through_jvp(fn, primals, tangents):
    (x,), (t,) = primals, tangents
    return fn(x), t


_ROUNDERS = {"vram": round_vram, "fpreg": round_fpreg, "fpsram_preload": round_fpsram_preload}


def q(x, point: str, policy: Optional[Policy] = None) -> jnp.ndarray:
    """Apply quantisation point ``point`` to ``x`` (cast to float32) under ``policy``.

    Hardware mode: the machine's exact rounding (forward) with a straight-through derivative.
    fp32 mode, and the ``accum`` point in both modes: ``x`` unchanged. ``policy=None`` means
    ``Policy.hardware()``.
    """
    policy = _DEFAULT if policy is None else policy
    x = jnp.asarray(x, jnp.float32)
    if not policy.is_hardware(point) or point == "accum":
        return x
    if point in HBM_POINTS:
        fn = mx_round(policy.format(point), policy.mram_format if point == "hbm_weight" else BF16)
    elif point == "vram":
        fn = vram_round(policy.vram_format)
    elif point == "fpreg":
        fn = fpreg_round(policy.fpreg_format)
    else:
        fn = _ROUNDERS[point]
    return straight_through(fn, x)


_DEFAULT = Policy()
