"""PLENA machine configuration: the ``plena_settings.toml`` loader and its frozen config types.

The machine is described by one section (default ``[TRANSACTIONAL]``) of an upstream-schema
``plena_settings.toml`` (spec §1):

* ``<S>.CONFIG.<KEY>.value``: the integer parameters (MLEN, VLEN, BLEN, HLEN, ...);
* ``<S>.PRECISION.<NAME>``: storage formats (``format = "Plain"`` + ``DATA_TYPE`` table, or
  ``format = "Mx"`` + ``block``, ``ELEM``, ``SCALE``); ``SCALAR_FP`` is a bare type table;
* ``<S>.LATENCY.<NAME>``: ``dc_lib_en`` / ``dc_lib_dis`` cycle counts, picked by ``DC_EN``.

Unlike the reference emulator, which logs a warning and silently runs a different machine
when the file is missing or malformed, every problem here is a :class:`ConfigError` whose
message names the file and the full key (e.g. ``TRANSACTIONAL.CONFIG.MLEN.value``).
Unknown extra keys (``HBM_WIDTH`` aside, which is read when present) are ignored, as upstream.

One deliberate leniency: ``BROADCAST_AMOUNT * HLEN == MLEN`` is *not* checked at load time,
because the reference asserts it only when a batched-head matrix op executes and real
conformance configs violate it (``de_layer_norm``: MLEN 128, HLEN 16, BA 4) yet must run.
Use ``load_config(..., strict=True)`` to make it a load error, or
:meth:`PlenaConfig.require_batched` at the point a batched op executes.

All config objects are frozen, hashable dataclasses holding only scalars and other frozen
dataclasses, so a :class:`PlenaConfig` can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional

from plena.numerics.formats import (
    DataType,
    FloatType,
    IntType,
    MxFormat,
    PlainFormat,
    StorageFormat,
)

__all__ = [
    "ConfigError",
    "Latency",
    "Latencies",
    "Precision",
    "PlenaConfig",
    "DEFAULT_CONFIG_PATH",
    "ENV_VAR",
    "load_config",
    "default_config",
    "resolve_config_path",
    "parse_size",
]

#: Environment variable naming the settings file (same name as the reference emulator's).
ENV_VAR = "PLENA_SETTINGS_TOML"
#: The settings file shipped with the repository.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "plena_settings.toml"

_U8_MAX = (1 << 8) - 1
_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1  # usize on the 64-bit hosts the reference runs on
HBM_BLOCK_BYTES = 64  # HBM is modelled in 64-byte blocks; its size must be a multiple


class ConfigError(ValueError):
    """A settings file that cannot be read, or describes an invalid machine.

    ``path`` is the file (or ``None`` for a config built in code) and ``key`` the full
    dotted TOML key at fault (or ``None`` for file-level problems).
    """

    def __init__(self, message: str, *, path: Optional[str] = None, key: Optional[str] = None):
        self.path = path
        self.key = key
        where = path if path is not None else "<PlenaConfig built in code>"
        head = f"{where}: {key}: " if key else f"{where}: "
        super().__init__(head + message)


# ----------------------------------------------------------------------------------------------
# Latencies
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Latency:
    """One latency table: cycles with the DC library enabled (``en``) and disabled (``dis``)."""

    en: int
    dis: int

    def cycles(self, dc_en: int) -> int:
        """Cycles for the column selected by ``DC_EN``: non-zero picks ``en``, zero ``dis``."""
        return self.en if dc_en else self.dis


# (python field, TOML table name) for every latency table the reference requires (spec §1.4).
LATENCY_TABLES: tuple[tuple[str, str], ...] = (
    ("systolic_processing_overhead", "SYSTOLIC_PROCESSING_OVERHEAD"),
    ("vector_add", "VECTOR_ADD_CYCLES"),
    ("vector_mul", "VECTOR_MUL_CYCLES"),
    ("vector_exp", "VECTOR_EXP_CYCLES"),
    ("vector_prefix_scan", "VECTOR_PREFIX_SCAN_CYCLES"),  # parsed, unused
    ("vector_shift", "VECTOR_SHIFT_CYCLES"),  # parsed, unused (V_SHFT_V costs vector_mul)
    ("vector_reci", "VECTOR_RECI_CYCLES"),
    ("vector_max", "VECTOR_MAX_CYCLES"),
    ("vector_sum", "VECTOR_SUM_CYCLES"),
    ("scalar_fp_longest_operate", "SCALAR_FP_LONGEST_OPERATE_CYCLES"),  # parsed, unused
    ("scalar_fp_basic", "SCALAR_FP_BASIC_CYCLES"),
    ("scalar_fp_exp", "SCALAR_FP_EXP_CYCLES"),
    ("scalar_fp_sqrt", "SCALAR_FP_SQRT_CYCLES"),
    ("scalar_fp_reci", "SCALAR_FP_RECI_CYCLES"),
    ("scalar_int_basic", "SCALAR_INT_BASIC_CYCLES"),
)

# Names the reference uses for a table it does not have: V_MIN_VF is charged VECTOR_MAX.
_LATENCY_ALIASES = {"vector_min": "vector_max"}


@dataclasses.dataclass(frozen=True)
class Latencies:
    """All latency tables of spec §1.4, one field per TOML table (``_CYCLES`` dropped)."""

    systolic_processing_overhead: Latency
    vector_add: Latency
    vector_mul: Latency
    vector_exp: Latency
    vector_prefix_scan: Latency
    vector_shift: Latency
    vector_reci: Latency
    vector_max: Latency
    vector_sum: Latency
    scalar_fp_longest_operate: Latency
    scalar_fp_basic: Latency
    scalar_fp_exp: Latency
    scalar_fp_sqrt: Latency
    scalar_fp_reci: Latency
    scalar_int_basic: Latency

    @staticmethod
    def field_name(name: str) -> str:
        """Map ``"VECTOR_ADD_CYCLES"``, ``"VECTOR_ADD"``, ``"vector_add"``... to the field name."""
        key = name.strip().lower()
        if key.endswith("_cycles"):
            key = key[: -len("_cycles")]
        key = _LATENCY_ALIASES.get(key, key)
        if key not in _LATENCY_FIELDS:
            raise KeyError(f"unknown latency {name!r}; known: {', '.join(_LATENCY_FIELDS)}")
        return key

    def get(self, name: str) -> Latency:
        """The :class:`Latency` for a TOML table name or field name (see :meth:`field_name`)."""
        return getattr(self, self.field_name(name))


_LATENCY_FIELDS = tuple(f for f, _ in LATENCY_TABLES)
assert _LATENCY_FIELDS == tuple(f.name for f in dataclasses.fields(Latencies))


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------

# (python field, TOML table name) of the storage-format tables (spec §1.3).
PRECISION_TABLES: tuple[tuple[str, str], ...] = (
    ("matrix_sram_type", "MATRIX_SRAM_TYPE"),
    ("vector_sram_type", "VECTOR_SRAM_TYPE"),
    ("hbm_m_weight_type", "HBM_M_WEIGHT_TYPE"),
    ("hbm_m_kv_type", "HBM_M_KV_TYPE"),
    ("hbm_v_act_type", "HBM_V_ACT_TYPE"),
    ("hbm_v_kv_type", "HBM_V_KV_TYPE"),
    ("hbm_v_int_type", "HBM_V_INT_TYPE"),  # parsed, unused by the emulator
)
# The four formats that go through the HBM DMA (and its width assertions).
HBM_TRANSFER_TYPES = ("hbm_m_weight_type", "hbm_m_kv_type", "hbm_v_act_type", "hbm_v_kv_type")


@dataclasses.dataclass(frozen=True)
class Precision:
    """Number formats of the memories (spec §1.3)."""

    matrix_sram_type: StorageFormat  # MRAM dump encoding (MRAM values stay f32)
    vector_sram_type: StorageFormat  # VRAM row storage
    hbm_m_weight_type: StorageFormat  # H_PREFETCH_M, funct1 = 0
    hbm_m_kv_type: StorageFormat  # H_PREFETCH_M, funct1 != 0
    hbm_v_act_type: StorageFormat  # H_PREFETCH_V / H_STORE_V, funct1 = 0
    hbm_v_kv_type: StorageFormat  # H_PREFETCH_V / H_STORE_V, funct1 != 0
    hbm_v_int_type: StorageFormat  # unused by the emulator
    scalar_fp: DataType  # unused: FP registers / FP SRAM are hard-wired bf16

    def hbm_m_type(self, funct1: int) -> StorageFormat:
        """Format of an H_PREFETCH_M transfer."""
        return self.hbm_m_kv_type if funct1 else self.hbm_m_weight_type

    def hbm_v_type(self, funct1: int) -> StorageFormat:
        """Format of an H_PREFETCH_V / H_STORE_V transfer."""
        return self.hbm_v_kv_type if funct1 else self.hbm_v_act_type


# ----------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------

# (python field, TOML key, maximum) of the integer parameters, in upstream order.  The
# maxima are the Rust field types (u32 or usize).
CONFIG_KEYS: tuple[tuple[str, str, int], ...] = (
    ("dc_en", "DC_EN", _U32_MAX),
    ("max_loop_instructions", "MAX_LOOP_INSTRUCTIONS", _U64_MAX),
    ("blen", "BLEN", _U32_MAX),
    ("hlen", "HLEN", _U32_MAX),
    ("mlen", "MLEN", _U32_MAX),
    ("vlen", "VLEN", _U32_MAX),
    ("broadcast_amount", "BROADCAST_AMOUNT", _U32_MAX),
    ("hbm_size", "HBM_SIZE", _U64_MAX),
    ("matrix_sram_size", "MATRIX_SRAM_SIZE", _U64_MAX),
    ("vector_sram_size", "VECTOR_SRAM_SIZE", _U64_MAX),
    ("hbm_m_prefetch_amount_raw", "HBM_M_Prefetch_Amount", _U32_MAX),
    ("hbm_v_prefetch_amount", "HBM_V_Prefetch_Amount", _U32_MAX),
    ("hbm_v_writeback_amount", "HBM_V_Writeback_Amount", _U32_MAX),
)
_TOML_KEY = {f: k for f, k, _ in CONFIG_KEYS} | {"hbm_width": "HBM_WIDTH"}
# Parameters that may be zero (everything else must be positive).
_MAY_BE_ZERO = {"dc_en"}
_POWER_OF_TWO = ("mlen", "vlen", "blen", "hlen")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def effective_m_prefetch_amount(raw: int, mlen: int) -> int:
    """H_PREFETCH_M row count actually used (spec §1.1): at least MLEN, rounded up to a
    multiple of MLEN."""
    if raw < mlen:
        return mlen
    return -(-raw // mlen) * mlen


@dataclasses.dataclass(frozen=True)
class PlenaConfig:
    """One PLENA machine.  Built by :func:`load_config`; validated on construction (so
    :meth:`replace` re-validates).  ``source``/``section`` say where it came from and take
    no part in equality or hashing."""

    mlen: int
    vlen: int
    blen: int
    hlen: int
    broadcast_amount: int
    hbm_size: int  # bytes
    matrix_sram_size: int  # MRAM depth in MLEN-element rows
    vector_sram_size: int  # VRAM depth in VLEN-element rows
    hbm_m_prefetch_amount_raw: int  # as written in the file
    hbm_v_prefetch_amount: int
    hbm_v_writeback_amount: int
    dc_en: int
    max_loop_instructions: int
    precision: Precision
    latency: Latencies
    hbm_width: Optional[int] = None  # bits; read by the HBM writer only
    source: Optional[str] = dataclasses.field(default=None, compare=False)
    section: str = dataclasses.field(default="TRANSACTIONAL", compare=False)
    #: effective H_PREFETCH_M row count (derived from the raw value and MLEN)
    hbm_m_prefetch_amount: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self._validate()
        object.__setattr__(
            self,
            "hbm_m_prefetch_amount",
            effective_m_prefetch_amount(self.hbm_m_prefetch_amount_raw, self.mlen),
        )

    # -- validation ------------------------------------------------------------------------

    def _err(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.source, key=f"{self.section}.{key}")

    def _ckey(self, field: str) -> str:
        return f"CONFIG.{_TOML_KEY[field]}.value"

    def _validate(self) -> None:
        for field, _, hi in CONFIG_KEYS:
            v = getattr(self, field)
            if not _is_int(v):
                raise self._err(self._ckey(field), f"must be an integer, got {v!r}")
            lo = 0 if field in _MAY_BE_ZERO else 1
            if not lo <= v <= hi:
                what = "non-negative" if lo == 0 else "positive"
                raise self._err(self._ckey(field), f"must be {what} and at most {hi}, got {v}")
        if self.hbm_width is not None and not (_is_int(self.hbm_width) and self.hbm_width > 0):
            raise self._err(self._ckey("hbm_width"), f"must be a positive integer, got {self.hbm_width!r}")
        for field in _POWER_OF_TWO:
            v = getattr(self, field)
            if not _is_pow2(v):
                raise self._err(self._ckey(field), f"{_TOML_KEY[field]} = {v} is not a power of two")
        if self.vlen != self.mlen:
            raise self._err(
                self._ckey("vlen"),
                f"VLEN ({self.vlen}) must equal MLEN ({self.mlen}): matrix ops use MLEN as the "
                "VRAM row stride",
            )
        if self.blen > self.mlen:
            raise self._err(self._ckey("blen"), f"BLEN ({self.blen}) must not exceed MLEN ({self.mlen})")
        if self.hbm_size % HBM_BLOCK_BYTES:
            raise self._err(
                self._ckey("hbm_size"),
                f"HBM_SIZE ({self.hbm_size}) must be a multiple of {HBM_BLOCK_BYTES} bytes",
            )
        self._validate_latency()
        self._validate_precision()

    def _validate_latency(self) -> None:
        if not isinstance(self.latency, Latencies):
            raise self._err("LATENCY", f"must be a Latencies, got {type(self.latency).__name__}")
        for field, table in LATENCY_TABLES:
            lat = getattr(self.latency, field)
            for col, v in (("dc_lib_en", getattr(lat, "en", None)), ("dc_lib_dis", getattr(lat, "dis", None))):
                if not _is_int(v) or not 0 <= v <= _U32_MAX:
                    raise self._err(f"LATENCY.{table}.{col}", f"must be an integer in [0, {_U32_MAX}], got {v!r}")

    def _validate_precision(self) -> None:
        p = self.precision
        if not isinstance(p, Precision):
            raise self._err("PRECISION", f"must be a Precision, got {type(p).__name__}")
        for field, table in PRECISION_TABLES:
            fmt = getattr(p, field)
            _check_storage(fmt, lambda sub, msg, t=table: self._err(f"PRECISION.{t}{sub}", msg))
        _check_dtype(p.scalar_fp, lambda sub, msg: self._err(f"PRECISION.SCALAR_FP{sub}", msg))
        # What the reference DMA asserts for the formats it moves (spec §1.3, dma.rs).
        for field in HBM_TRANSFER_TYPES:
            fmt = getattr(p, field)
            table = dict(PRECISION_TABLES)[field]
            elem = fmt.elem if isinstance(fmt, MxFormat) else fmt.data
            sub = ".ELEM" if isinstance(fmt, MxFormat) else ".DATA_TYPE"
            # The reference DMA asserts a power-of-two element width; PLENA-JAX packs any width
            # up to 32 bits little-endian (docs/formats.md), e.g. MXFP6.
            if not 1 <= elem.width <= 32:
                raise self._err(
                    f"PRECISION.{table}{sub}",
                    f"element width {elem.width} bits is not in 1..32 (HBM elements are packed codes of at most 32 bits)",
                )
            if elem.width * self.mlen % 8:
                raise self._err(
                    f"PRECISION.{table}{sub}",
                    f"a row of MLEN={self.mlen} {elem.width}-bit elements is not a whole number of bytes",
                )
            if isinstance(fmt, MxFormat):
                scale = fmt.scale
                if isinstance(scale, FloatType) and scale.sign:
                    raise self._err(
                        f"PRECISION.{table}.SCALE.sign",
                        "an Mx scale must be unsigned (sign = false); a signed e8m0 is 9 bits wide",
                    )
                if not _is_pow2(scale.width):
                    raise self._err(
                        f"PRECISION.{table}.SCALE",
                        f"scale width {scale.width} bits is not a power of two (the HBM DMA requires it)",
                    )
                if self.mlen % fmt.block:
                    raise self._err(
                        f"PRECISION.{table}.block",
                        f"block {fmt.block} does not divide MLEN ({self.mlen})",
                    )
                if scale.width * (self.mlen // fmt.block) % 8:
                    raise self._err(
                        f"PRECISION.{table}.SCALE",
                        f"the {self.mlen // fmt.block} scales of a row are not a whole number of bytes",
                    )

    # -- derived values --------------------------------------------------------------------

    @property
    def batched_consistent(self) -> bool:
        """Whether ``BROADCAST_AMOUNT * HLEN == MLEN`` (required by the batched-head ops)."""
        return self.broadcast_amount * self.hlen == self.mlen

    def require_batched(self, op: str = "batched-head op") -> None:
        """Raise :class:`ConfigError` unless the batched-head ops can run on this machine
        (the reference asserts this only when such an op executes)."""
        if not self.batched_consistent:
            raise self._err(
                "CONFIG.BROADCAST_AMOUNT.value",
                f"{op} needs BROADCAST_AMOUNT * HLEN == MLEN, but {self.broadcast_amount} * "
                f"{self.hlen} != {self.mlen}",
            )

    @property
    def mram_tiles(self) -> int:
        """Number of MLEN x MLEN tiles in the Matrix SRAM."""
        return self.matrix_sram_size // self.mlen

    @property
    def tile_elems(self) -> int:
        """Elements per Matrix-SRAM tile (MLEN²)."""
        return self.mlen * self.mlen

    @property
    def vram_rows(self) -> int:
        """Vector SRAM depth in VLEN-element rows."""
        return self.vector_sram_size

    @property
    def vram_elems(self) -> int:
        """Vector SRAM capacity in elements (element addresses run below this)."""
        return self.vector_sram_size * self.vlen

    @property
    def heads(self) -> int:
        """Heads of the batched-head matrix ops (BROADCAST_AMOUNT)."""
        return self.broadcast_amount

    @property
    def mask_bits(self) -> int:
        """Vector-mask bits that cover one VLEN row (one bit per HLEN elements)."""
        return max(1, self.vlen // self.hlen)

    @property
    def hbm_m_prefetch_tiles(self) -> int:
        """Tiles written by one H_PREFETCH_M."""
        return self.hbm_m_prefetch_amount // self.mlen

    @property
    def hbm_blocks(self) -> int:
        """HBM capacity in 64-byte blocks."""
        return self.hbm_size // HBM_BLOCK_BYTES

    def lat(self, name: str) -> int:
        """Cycles of a latency table (TOML or field name) for the active DC_EN column."""
        return self.latency.get(name).cycles(self.dc_en)

    def replace(self, **changes: Any) -> "PlenaConfig":
        """A copy with some fields changed (re-validated; the prefetch amount re-derived)."""
        return dataclasses.replace(self, **changes)

    def with_hbm_size(self, size: "int | str") -> "PlenaConfig":
        """A copy with HBM_SIZE overridden, as ``--hbm-size`` does (``size`` may use the
        :func:`parse_size` syntax)."""
        return self.replace(hbm_size=parse_size(size))

    def config_values(self) -> dict[str, int]:
        """The integer parameters under their upstream TOML key names, as written in the file
        (so ``HBM_M_Prefetch_Amount`` is the raw value); ``HBM_WIDTH`` only when present."""
        out = {key: getattr(self, field) for field, key, _ in CONFIG_KEYS}
        if self.hbm_width is not None:
            out["HBM_WIDTH"] = self.hbm_width
        return out

    def describe(self) -> str:
        """A short human-readable summary: topology, memories, transfers, formats, timing."""
        p = self.precision
        batched = "ok" if self.batched_consistent else "MISMATCH: batched-head ops will fail"
        prefetch_m = f"{self.hbm_m_prefetch_amount} rows ({self.hbm_m_prefetch_tiles} tile(s))"
        if self.hbm_m_prefetch_amount != self.hbm_m_prefetch_amount_raw:
            prefetch_m += f", file says {self.hbm_m_prefetch_amount_raw}"
        width = f", {self.hbm_width}-bit bus" if self.hbm_width is not None else ""
        column = "dc_lib_en" if self.dc_en else "dc_lib_dis"
        lines = [
            f"PLENA machine [{self.section}] from {self.source or '<built in code>'}",
            f"  topology : MLEN={self.mlen} VLEN={self.vlen} BLEN={self.blen} HLEN={self.hlen} "
            f"BROADCAST_AMOUNT={self.broadcast_amount} (BA*HLEN=MLEN: {batched})",
            f"  MRAM     : {self.matrix_sram_size} rows = {self.mram_tiles} tiles of "
            f"{self.mlen}x{self.mlen}, dump format {p.matrix_sram_type}",
            f"  VRAM     : {self.vram_rows} rows x {self.vlen}, stored {p.vector_sram_type}",
            f"  HBM      : {_human_bytes(self.hbm_size)} ({self.hbm_size} B){width}",
            f"  transfers: H_PREFETCH_M {prefetch_m}; H_PREFETCH_V {self.hbm_v_prefetch_amount} "
            f"rows; H_STORE_V {self.hbm_v_writeback_amount} rows",
            f"  HBM types: M weight {p.hbm_m_weight_type}, M kv {p.hbm_m_kv_type}, "
            f"V act {p.hbm_v_act_type}, V kv {p.hbm_v_kv_type}, V int {p.hbm_v_int_type}",
            f"  timing   : DC_EN={self.dc_en} ({column} column), loop budget "
            f"{self.max_loop_instructions} instructions per iteration",
        ]
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:g} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n} B"


def _check_dtype(dt: Any, err) -> None:
    """Validate a data type built in code or by the loader (ranges of the Rust fields)."""
    if isinstance(dt, FloatType):
        if not isinstance(dt.sign, bool):
            raise err(".sign", f"must be a boolean, got {dt.sign!r}")
        for name in ("exponent", "mantissa"):
            v = getattr(dt, name)
            if not _is_int(v) or not 0 <= v <= _U8_MAX:
                raise err(f".{name}", f"must be an integer in [0, {_U8_MAX}], got {v!r}")
        if dt.exponent < 1:
            raise err(".exponent", "a floating-point type needs at least one exponent bit")
    elif isinstance(dt, IntType):
        if not _is_int(dt.width) or not 1 <= dt.width <= _U32_MAX:
            raise err(".width", f"must be an integer in [1, {_U32_MAX}], got {dt.width!r}")
    else:
        raise err("", f"not a FloatType/IntType: {dt!r}")


def _check_storage(fmt: Any, err) -> None:
    if isinstance(fmt, PlainFormat):
        _check_dtype(fmt.data, lambda sub, msg: err(".DATA_TYPE" + sub, msg))
    elif isinstance(fmt, MxFormat):
        if not _is_int(fmt.block) or not 1 <= fmt.block <= _U32_MAX:
            raise err(".block", f"must be an integer in [1, {_U32_MAX}], got {fmt.block!r}")
        _check_dtype(fmt.elem, lambda sub, msg: err(".ELEM" + sub, msg))
        _check_dtype(fmt.scale, lambda sub, msg: err(".SCALE" + sub, msg))
    else:
        raise err("", f"not a PlainFormat/MxFormat: {fmt!r}")


# ----------------------------------------------------------------------------------------------
# TOML reading
# ----------------------------------------------------------------------------------------------

_MISSING = object()


class _Reader:
    """Typed access to the parsed TOML document, naming the full key in every error."""

    def __init__(self, path: str, doc: Mapping[str, Any]):
        self.path = path
        self.doc = doc

    def err(self, keys: tuple[str, ...], message: str) -> ConfigError:
        return ConfigError(message, path=self.path, key=".".join(keys))

    def get(self, keys: tuple[str, ...], *, required: bool = True) -> Any:
        node: Any = self.doc
        for i, k in enumerate(keys):
            if not isinstance(node, dict):
                parent = ".".join(keys[:i])
                raise self.err(keys, f"{parent} must be a table, got {type(node).__name__} {node!r}")
            if k not in node:
                if not required:
                    return _MISSING
                missing = ".".join(keys[: i + 1])
                extra = "" if i == len(keys) - 1 else f" (no {missing})"
                raise self.err(keys, f"missing required key{extra}")
            node = node[k]
        return node

    def table(self, keys: tuple[str, ...]) -> dict:
        t = self.get(keys)
        if not isinstance(t, dict):
            raise self.err(keys, f"must be a table, got {type(t).__name__} {t!r}")
        return t

    def int_(self, keys: tuple[str, ...], lo: int, hi: int, *, required: bool = True) -> Any:
        v = self.get(keys, required=required)
        if v is _MISSING:
            return None
        if not _is_int(v):
            raise self.err(keys, f"must be an integer, got {type(v).__name__} {v!r}")
        if not lo <= v <= hi:
            raise self.err(keys, f"must be in [{lo}, {hi}], got {v}")
        return v

    def bool_(self, keys: tuple[str, ...]) -> bool:
        v = self.get(keys)
        if not isinstance(v, bool):
            raise self.err(keys, f"must be a boolean, got {type(v).__name__} {v!r}")
        return v

    def str_(self, keys: tuple[str, ...]) -> str:
        v = self.get(keys)
        if not isinstance(v, str):
            raise self.err(keys, f"must be a string, got {type(v).__name__} {v!r}")
        return v

    def dtype(self, keys: tuple[str, ...]) -> DataType:
        """A ``type = "Fp" | "Int"`` table."""
        self.table(keys)
        kind = self.str_(keys + ("type",))
        if kind == "Fp":
            sign = self.bool_(keys + ("sign",))
            exponent = self.int_(keys + ("exponent",), 1, _U8_MAX)
            mantissa = self.int_(keys + ("mantissa",), 0, _U8_MAX)
            return FloatType(sign=sign, exponent=exponent, mantissa=mantissa)
        if kind == "Int":
            return IntType(width=self.int_(keys + ("width",), 1, _U32_MAX))
        raise self.err(keys + ("type",), f'unknown type {kind!r} (expected "Fp" or "Int")')

    def storage(self, keys: tuple[str, ...]) -> StorageFormat:
        """A ``format = "Plain"`` (+ DATA_TYPE) or ``format = "Mx"`` (+ block/ELEM/SCALE) table."""
        self.table(keys)
        fmt = self.str_(keys + ("format",))
        if fmt == "Plain":
            return PlainFormat(self.dtype(keys + ("DATA_TYPE",)))
        if fmt == "Mx":
            block = self.int_(keys + ("block",), 1, _U32_MAX)
            return MxFormat(block=block, elem=self.dtype(keys + ("ELEM",)), scale=self.dtype(keys + ("SCALE",)))
        raise self.err(keys + ("format",), f'unknown format {fmt!r} (expected "Plain" or "Mx")')

    def scalar_type(self, keys: tuple[str, ...]) -> DataType:
        """SCALAR_FP: upstream files use a bare type table; a Plain table is accepted too."""
        t = self.table(keys)
        if "type" in t or "format" not in t:
            return self.dtype(keys)
        fmt = self.storage(keys)
        if not isinstance(fmt, PlainFormat):
            raise self.err(keys + ("format",), "a scalar type cannot be an Mx format")
        return fmt.data


def resolve_config_path(path: "str | os.PathLike[str] | None" = None) -> Path:
    """The settings file to use: ``path`` if given; else ``$PLENA_SETTINGS_TOML`` if set and
    non-empty; else the repository's ``configs/plena_settings.toml``."""
    if path is not None:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH


def load_config(
    path: "str | os.PathLike[str] | None" = None,
    *,
    section: str = "TRANSACTIONAL",
    strict: bool = False,
) -> PlenaConfig:
    """Load and validate one section of a ``plena_settings.toml``.

    ``path`` is resolved by :func:`resolve_config_path`.  ``strict=True`` additionally
    requires ``BROADCAST_AMOUNT * HLEN == MLEN`` (see the module docstring).  Raises
    :class:`ConfigError` on any problem, naming the file and the key.
    """
    file = resolve_config_path(path)
    where = str(file)
    try:
        with open(file, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("settings file not found", path=where) from None
    except OSError as e:
        raise ConfigError(f"cannot read settings file: {e.strerror or e}", path=where) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"TOML syntax error: {e}", path=where) from None

    r = _Reader(where, doc)
    s = (section,)
    if not isinstance(doc.get(section, _MISSING), dict):
        raise r.err(s, "missing required section" if section not in doc else "must be a table")

    ints: dict[str, Any] = {}
    for field, key, hi in CONFIG_KEYS:
        lo = 0 if field in _MAY_BE_ZERO else 1
        ints[field] = r.int_(s + ("CONFIG", key, "value"), lo, hi)
    hbm_width = r.int_(s + ("CONFIG", "HBM_WIDTH", "value"), 1, _U32_MAX, required=False)

    precision = Precision(
        **{field: r.storage(s + ("PRECISION", table)) for field, table in PRECISION_TABLES},
        scalar_fp=r.scalar_type(s + ("PRECISION", "SCALAR_FP")),
    )
    lat = {}
    for field, table in LATENCY_TABLES:
        keys = s + ("LATENCY", table)
        r.table(keys)
        lat[field] = Latency(
            en=r.int_(keys + ("dc_lib_en",), 0, _U32_MAX),
            dis=r.int_(keys + ("dc_lib_dis",), 0, _U32_MAX),
        )

    cfg = PlenaConfig(
        **ints,
        precision=precision,
        latency=Latencies(**lat),
        hbm_width=hbm_width,
        source=where,
        section=section,
    )
    if strict:
        cfg.require_batched("strict loading")
    return cfg


@functools.lru_cache(maxsize=None)
def default_config() -> PlenaConfig:
    """The machine of the shipped ``configs/plena_settings.toml`` (TRANSACTIONAL), cached.
    Independent of ``$PLENA_SETTINGS_TOML``."""
    return load_config(DEFAULT_CONFIG_PATH)


# ----------------------------------------------------------------------------------------------
# --hbm-size syntax
# ----------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"(?P<num>[0-9]+)(?:(?P<unit>[KMGT])(?P<iec>I)?)?(?P<b>B)?")
_UNIT_SHIFT = {None: 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: "str | int") -> int:
    """Parse an HBM size as ``--hbm-size`` accepts it: ``N[K|M|G|T][i][B]``.

    Units are case-insensitive and always binary, as in the reference CLI: K = 1024,
    M = 1024², G = 1024³, T = 1024⁴; the optional ``i`` (``KiB``) and ``B`` change nothing
    (so ``1G``, ``1GB``, ``1GiB`` and ``1gib`` are all 2³⁰).  ``i`` is only accepted after a
    unit letter; no sign, no fraction, no inner spaces.  The result must be a positive
    multiple of 64 bytes and fit in 64 bits.  Raises ``ValueError``.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int):
        n = text
        shown = str(text)
    elif isinstance(text, str):
        shown = text.strip()
        m = _SIZE_RE.fullmatch(shown.upper())
        if not m:
            raise ValueError(f"invalid size {text!r}: expected N[K|M|G|T][i][B], e.g. 256M or 16GiB")
        n = int(m["num"]) << _UNIT_SHIFT[m["unit"]]
    else:
        raise ValueError(f"invalid size {text!r}: expected a string or an integer")
    if n <= 0:
        raise ValueError(f"invalid size {shown!r}: must be positive")
    if n > _U64_MAX:
        raise ValueError(f"invalid size {shown!r}: {n} bytes does not fit in 64 bits")
    if n % HBM_BLOCK_BYTES:
        raise ValueError(
            f"invalid size {shown!r}: {n} bytes is not a multiple of {HBM_BLOCK_BYTES} "
            "(HBM is made of 64-byte blocks)"
        )
    return n
