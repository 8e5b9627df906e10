"""Conformance corpus: case loader and judge (``../shared/conformance``, see its README.md).

A *case* is one folder holding a real upstream PLENA program, the reference emulator's inputs
and the upstream harness's golden output.  This module

* finds and loads cases (:func:`conformance_dir`, :func:`list_cases`, :func:`load_case`);
* judges a run's end-of-run memory (:class:`~plena.verify.dumps.Dumps`) the way the upstream
  harness does, plus stricter metrics (:func:`judge` -> :class:`Verdict`);
* decides whether a run reproduces the outcome listed in ``EXPECTED.md``
  (:func:`outcome_matches`).

The upstream rules, as recorded in each ``manifest["comparison"]``
-----------------------------------------------------------------
*VRAM check* (``check_vram_index.u32.bin`` + ``check_expected.f32.bin``; the harness's layout
handling, stride/slice modes and truncation are already folded into these pairs)::

    g   = bf16_rne(expected)                 sim = bf16 VRAM[index]
    err = bf16(|g - sim|)                    # torch bf16 tensor arithmetic: f32 op, RNE to bf16
    tol = bf16(atol + bf16(rtol * |g|))      # scalar times bf16 tensor, then scalar plus it
    ok  = err <= tol                         # PASS if count(ok)/n*100 >= min_match_rate_percent

"evaluated in bf16" is torch's bf16 tensor arithmetic: every binary op (``g - sim``,
``rtol * |g|``, ``atol + ...``) is computed in f32 from the bf16 operands and the Python
scalar (recent torch keeps reduced-precision ops' scalars in f32, ``original_scalar_value``)
and the result is rounded to bf16 (RNE).  ``abs`` and ``<=`` are exact.  We reproduce that with
numpy f32 + ``ml_dtypes.bfloat16`` casts.  A NaN anywhere makes the element fail.

*HBM check* (``de_h_store``): decode the E4M3 element bytes and E8M0 scale bytes in the given
byte ranges (element ``i`` uses scale byte ``i // 8``), value = elem * scale; golden and value
are both rounded to bf16 and judged with the bf16 formula above; every element must pass.  The
decoding is the harness's own (``check_mem.raw_to_fp``): IEEE-style minifloats, subnormal
exponent ``1 - bias`` (so E4M3 ``0x01`` = 2^-9, which is NOT the emulator's 2^-10 convention of
spec §2.9), all-ones exponent = inf/NaN, E8M0 byte 0 = 0.0 and 255 = inf.

*FP SRAM checks* (``de_flashattn_*``, ``manifest.comparison.fpsram_checks``): f32 arithmetic,
``|g - s| <= atol + rtol*|g|``, each item passes with >= 90 % of its elements.  The upstream
checker reads ``fpsram_dump.bin`` as IEEE f16, a tooling bug (spec §2.3): the dump is bf16.
By default we read it as bf16; ``judge(..., fpsram_as_f16=True)`` reproduces the bug.

*moe_topk* (``comparison.custom``): FP SRAM[32:36] with ``torch.allclose(atol=0.003,
rtol=0)`` (f32, all elements) and INT SRAM[64:68] exact.

*No check* (``de_loop``, ``de_dllm1``): the case passes iff the run completed.

A case passes upstream when every one of its checks passes.

Our stricter metrics (README "Passing the upstream rule is the floor")
----------------------------------------------------------------------
``strict_match_pct``: the bf16 formula with atol = rtol = 0.02 on every float check (integer
checks: exact), pooled over all compared elements; ``max_abs``, ``mean_abs`` and ``rel_l2 =
||sim - g|| / ||g||`` in float64 against the un-rounded golden, pooled likewise;
``degenerate``: the compared output is all zeros while the golden is not, or it is non-finite
where the golden is finite.  :func:`outcome_matches` fails a ``pass`` case that is degenerate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Optional

import ml_dtypes
import numpy as np

from plena.config import parse_size
from plena.numerics.formats import E4M3, E8M0, FloatType
from plena.verify.dumps import Dumps

__all__ = [
    "Case",
    "CheckResult",
    "Verdict",
    "conformance_dir",
    "list_cases",
    "load_case",
    "judge",
    "outcome_matches",
    "rule_matches",
    "bf16_match",
    "harness_minifloat_table",
    "STRICT_ATOL",
    "STRICT_RTOL",
]

BF16 = ml_dtypes.bfloat16

#: Tolerances of our strict metric (README): atol = rtol = 0.02, in bf16.
STRICT_ATOL = 0.02
STRICT_RTOL = 0.02

ENV_VAR = "PLENA_CONFORMANCE_DIR"


# --------------------------------------------------------------------------------------------
# Locating and loading cases
# --------------------------------------------------------------------------------------------


def conformance_dir() -> Optional[Path]:
    """The corpus folder: ``$PLENA_CONFORMANCE_DIR``, else ``$PLENA_SHARED_DIR/conformance``,
    else ``<repo>/../shared/conformance``.

    Returns ``None`` when the folder does not exist (a fresh clone without the corpus).
    """
    env = os.environ.get(ENV_VAR)
    shared = os.environ.get("PLENA_SHARED_DIR")  # also honoured by tests/conftest.py
    if env:
        p = Path(env)
    elif shared:
        p = Path(shared) / "conformance"
    else:
        repo = Path(__file__).resolve().parents[2]
        p = repo.parent / "shared" / "conformance"
    return p if p.is_dir() else None


def list_cases() -> list[str]:
    """Names of all cases (folders holding a ``manifest.json``), sorted; ``[]`` if no corpus."""
    root = conformance_dir()
    if root is None:
        return []
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())




def _cli_flag(cli: list[str], flag: str) -> Optional[str]:
    for i, tok in enumerate(cli):
        if tok == flag and i + 1 < len(cli):
            return cli[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance case: its files, manifest and expected outcome (immutable fields;
    ``manifest`` is a plain dict and should be treated as read-only)."""

    name: str
    path: Path
    manifest: dict = dataclasses.field(repr=False, compare=False)
    outcome: str  # "pass" | "fail" | "panic"
    panic_pc: Optional[int]
    panic_rule: Optional[str]
    why: Optional[str]
    dynamic_instructions: Optional[int]
    non_hbm_cycles: Optional[int]
    program_mem: Path
    program_asm: Path
    hbm_bin: Path
    fp_sram_bin: Path
    int_sram_bin: Optional[Path]
    vram_preload: Optional[Path]
    settings_toml: Path
    hbm_size: int  # bytes, the reference's --hbm-size

    @property
    def comparison(self) -> dict:
        return self.manifest.get("comparison") or {}

    @property
    def hardware(self) -> dict:
        return self.manifest.get("hardware") or {}

    @property
    def has_check(self) -> bool:
        """False for the cases the upstream harness does not check (de_loop, de_dllm1)."""
        return bool(_check_specs_meta(self.comparison))

    def golden(self) -> np.ndarray:
        """``golden.f32.bin`` as float32 in the manifest's shape."""
        g = self.manifest.get("golden") or {}
        arr = np.fromfile(self.path / g.get("file", "golden.f32.bin"), dtype="<f4")
        shape = g.get("shape")
        return arr.reshape(shape) if shape is not None else arr


def _load_expected(case_dir: Path) -> dict:
    for root in (case_dir.parent, conformance_dir()):
        if root is not None and (root / "expected.json").is_file():
            with open(root / "expected.json") as f:
                table = json.load(f)
            if case_dir.name in table:
                return table[case_dir.name]
    return {}


def load_case(name_or_path: str | os.PathLike) -> Case:
    """Load a case by name (looked up in :func:`conformance_dir`) or by folder path.

    The expected outcome comes from ``expected.json`` next to the case folder (else in the
    corpus folder); a case missing there is taken as ``"pass"``.  ``hbm_size`` is the
    ``--hbm-size`` of ``manifest["emulator_cli"]`` (falling back to
    ``manifest["hbm"]["emulator_hbm_size"]``).
    """
    p = Path(name_or_path)
    if not (p / "manifest.json").is_file():
        root = conformance_dir()
        if root is None or not (root / str(name_or_path) / "manifest.json").is_file():
            raise FileNotFoundError(f"no conformance case {str(name_or_path)!r}")
        p = root / str(name_or_path)
    p = p.resolve()
    with open(p / "manifest.json") as f:
        manifest = json.load(f)
    exp = _load_expected(p)

    cli = [str(t) for t in manifest.get("emulator_cli") or []]
    size_txt = _cli_flag(cli, "--hbm-size")
    if size_txt is not None:
        hbm_size = parse_size(size_txt)
    else:
        hbm_size = int((manifest.get("hbm") or {}).get("emulator_hbm_size", 0))

    def cli_path(flag: str, default: Optional[str]) -> Optional[Path]:
        v = _cli_flag(cli, flag) or default
        return None if v is None else p / v

    int_sram = cli_path("--intsram", "int_sram.bin")
    vram = cli_path("--vram", None)
    if vram is None and (p / "vram_preload.bin").is_file():
        vram = p / "vram_preload.bin"
    return Case(
        name=p.name,
        path=p,
        manifest=manifest,
        outcome=exp.get("outcome", "pass"),
        panic_pc=exp.get("panic_pc"),
        panic_rule=exp.get("panic_rule"),
        why=exp.get("why"),
        dynamic_instructions=exp.get("dynamic_instructions"),
        non_hbm_cycles=exp.get("non_hbm_cycles"),
        program_mem=cli_path("--opcode", "program.mem"),
        program_asm=p / "program.asm",
        hbm_bin=cli_path("--hbm", "hbm.bin"),
        fp_sram_bin=cli_path("--fpsram", "fp_sram.bin"),
        int_sram_bin=int_sram if int_sram is not None and int_sram.is_file() else None,
        vram_preload=vram,
        settings_toml=cli_path("--settings", "plena_settings.toml"),
        hbm_size=hbm_size,
    )


# --------------------------------------------------------------------------------------------
# Element-wise comparison rules
# --------------------------------------------------------------------------------------------


def _to_bf16(x) -> np.ndarray:
    """f32 (or wider) -> bf16, round to nearest even (ml_dtypes' cast)."""
    return np.asarray(x, dtype=np.float32).astype(BF16)


def bf16_match(golden, sim, atol: float, rtol: float) -> np.ndarray:
    """The harness's element test in bf16 (see module docstring); returns a bool array.

    ``golden`` and ``sim`` are real values (any float dtype); both are first rounded to bf16.
    """
    g = _to_bf16(golden).astype(np.float32)
    s = _to_bf16(sim).astype(np.float32)
    err = _to_bf16(np.abs(g - s)).astype(np.float32)  # |bf16(g - s)| == bf16(|g - s|)
    scaled = _to_bf16(np.float32(rtol) * np.abs(g)).astype(np.float32)
    tol = _to_bf16(np.float32(atol) + scaled).astype(np.float32)
    with np.errstate(invalid="ignore"):
        return err <= tol


def _f32_match(golden, sim, atol: float, rtol: float, allclose: bool) -> np.ndarray:
    """``|g - s| <= atol + rtol*|g|`` in f32 (torch f32 tensors); ``allclose`` adds torch's
    ``isclose`` short-cut ``s == g`` (equal infinities)."""
    g = np.asarray(golden, dtype=np.float32)
    s = np.asarray(sim, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.abs(g - s) <= np.float32(atol) + np.float32(rtol) * np.abs(g)
        if allclose:
            ok |= s == g
    return ok


def _match_pct(ok: np.ndarray) -> float:
    """Percentage the way the harness computes it: ``sum / len * 100``."""
    n = int(ok.size)
    return int(np.count_nonzero(ok)) / n * 100.0 if n else float("nan")


# --------------------------------------------------------------------------------------------
# Harness minifloat decode (HBM check)
# --------------------------------------------------------------------------------------------


def harness_minifloat_table(ft: FloatType) -> np.ndarray:
    """Value of every code of ``ft`` as the upstream harness decodes it (f32 table).

    The harness always assumes a sign bit above exponent and mantissa; IEEE-style: exponent 0
    is zero/subnormal with exponent ``1 - bias``, all-ones exponent is inf (mantissa 0) or NaN.
    For E8M0 this gives 0 -> 0.0, 1..254 -> 2^(b-127), 255 -> inf.
    """
    e_w, m_w = ft.exponent, ft.mantissa
    bias = ft.bias
    codes = np.arange(1 << (int(ft.sign) + e_w + m_w), dtype=np.int64)
    sign = np.where((codes >> (e_w + m_w)) & 1, -1.0, 1.0)
    exp = (codes >> m_w) & ((1 << e_w) - 1)
    man = (codes & ((1 << m_w) - 1)).astype(np.float64)
    frac = man / float(1 << m_w)
    with np.errstate(over="ignore"):
        normal = (1.0 + frac) * np.exp2(exp.astype(np.float64) - bias)
        sub = frac * 2.0 ** (1 - bias)
    val = np.where(exp == 0, sub, normal)
    top = exp == (1 << e_w) - 1
    val = np.where(top & (man == 0), np.inf, val)
    val = np.where(top & (man != 0), np.nan, val)
    return (sign * val).astype(np.float32)


_E4M3_TABLE = harness_minifloat_table(E4M3)
_E8M0_TABLE = harness_minifloat_table(E8M0)


def _bytes(hbm: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """HBM bytes [lo, hi); bytes past the end of the dump read as 0."""
    out = np.zeros(hi - lo, dtype=np.uint8)
    avail = max(0, min(hi, hbm.size) - lo)
    if avail:
        out[:avail] = hbm[lo : lo + avail]
    return out


# --------------------------------------------------------------------------------------------
# Verdict
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One upstream check of a case (a VRAM region, an HBM region, an SRAM slice)."""

    name: str
    kind: str  # "vram" | "hbm_mx" | "fpsram" | "intsram"
    n: int
    match_pct: float  # at the upstream tolerance
    passed: bool  # this check's upstream rule
    strict_match_pct: float
    max_abs: float
    atol: Optional[float] = None
    rtol: Optional[float] = None
    min_match_rate_percent: float = 100.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Judgement of one completed run of a case.

    ``passed`` is the upstream harness's verdict (all checks pass; True for the cases with no
    check).  The remaining numbers pool all compared elements of all checks (NaN when nothing
    is compared).
    """

    case: str
    passed: bool
    upstream_match_pct: float
    strict_match_pct: float
    max_abs: float
    mean_abs: float
    rel_l2: float
    degenerate: bool
    n_compared: int
    checks: tuple[CheckResult, ...] = ()

    @property
    def ok_strict_floor(self) -> bool:
        """Upstream pass and not degenerate: the README's minimum for a ``pass`` case."""
        return self.passed and not self.degenerate

    def summary(self) -> str:
        if not self.checks:
            return f"{self.case}: {'PASS' if self.passed else 'FAIL'} (no upstream check)"
        return (
            f"{self.case}: {'PASS' if self.passed else 'FAIL'}"
            f"{' DEGENERATE' if self.degenerate else ''} n={self.n_compared} "
            f"upstream={self.upstream_match_pct:.2f}% strict={self.strict_match_pct:.2f}% "
            f"max_abs={self.max_abs:.4g} mean_abs={self.mean_abs:.4g} rel_l2={self.rel_l2:.4g}"
        )


def _check_specs_meta(cmp: dict) -> list[str]:
    """The kinds of checks a ``manifest["comparison"]`` defines, in judging order."""
    kinds = []
    mem = str(cmp.get("memory") or "")
    if mem.startswith("VRAM"):
        kinds.append("vram")
    elif mem.startswith("HBM"):
        kinds.append("hbm_mx")
    if cmp.get("fpsram_checks"):
        kinds.append("fpsram_checks")
    if cmp.get("custom"):
        kinds.append("custom")
    return kinds


@dataclasses.dataclass
class _Compared:
    """Internal: what one check compared."""

    name: str
    kind: str
    golden: np.ndarray  # float64 of the un-rounded expected values
    sim: np.ndarray  # float64 of the values read from the dumps
    ok: np.ndarray
    ok_strict: np.ndarray
    min_pct: float
    atol: Optional[float]
    rtol: Optional[float]


def _read_f32(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<f4").astype(np.float32)


def _gather_u16(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``arr[idx]`` with indices past the end reading 0."""
    arr = np.asarray(arr).reshape(-1)
    out = np.zeros(idx.shape, dtype=np.uint16)
    inside = idx < arr.shape[0]
    if inside.any():
        out[inside] = arr[idx[inside]]
    return out


def _bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(BF16).astype(np.float32)


def _vram_check(case: Case, dumps: Dumps) -> _Compared:
    cmp = case.comparison
    idx = np.fromfile(case.path / "check_vram_index.u32.bin", dtype="<u4").astype(np.int64)
    exp = _read_f32(case.path / "check_expected.f32.bin")
    if idx.size != exp.size:
        raise ValueError(f"{case.name}: {idx.size} VRAM indices but {exp.size} expected values")
    sim = _bits_to_f32(_gather_u16(dumps.vram, idx))
    atol, rtol = float(cmp["atol"]), float(cmp["rtol"])
    return _Compared(
        name="vram",
        kind="vram",
        golden=exp.astype(np.float64),
        sim=sim.astype(np.float64),
        ok=bf16_match(exp, sim, atol, rtol),
        ok_strict=bf16_match(exp, sim, STRICT_ATOL, STRICT_RTOL),
        min_pct=float(cmp.get("min_match_rate_percent", 90.0)),
        atol=atol,
        rtol=rtol,
    )


def _hbm_check(case: Case, dumps: Dumps) -> _Compared:
    cmp = case.comparison
    if dumps.hbm is None:
        raise ValueError(f"{case.name} is judged on HBM but the dumps carry no HBM")
    exp = _read_f32(case.path / "check_expected.f32.bin")
    e_lo, e_hi = (int(v) for v in cmp["elements"]["byte_range"])
    s_lo, s_hi = (int(v) for v in cmp["scales"]["byte_range"])
    block = int(cmp.get("block", 8))
    hbm = np.asarray(dumps.hbm).reshape(-1)
    elems = _E4M3_TABLE[_bytes(hbm, e_lo, e_hi)].astype(np.float64)
    scales = _E8M0_TABLE[_bytes(hbm, s_lo, s_hi)].astype(np.float64)
    n = min(exp.size, elems.size)  # the harness truncates both sides to the shorter
    blk = np.arange(n) // block
    # the harness leaves an element without a scale byte unscaled
    sc = np.ones(n, dtype=np.float64)
    has = blk < scales.size
    sc[has] = scales[blk[has]]
    with np.errstate(invalid="ignore", over="ignore"):
        value = (elems[:n] * sc).astype(np.float32)
    exp = exp[:n]
    atol, rtol = float(cmp["atol"]), float(cmp["rtol"])
    return _Compared(
        name="hbm",
        kind="hbm_mx",
        golden=exp.astype(np.float64),
        sim=value.astype(np.float64),
        ok=bf16_match(exp, value, atol, rtol),
        ok_strict=bf16_match(exp, value, STRICT_ATOL, STRICT_RTOL),
        min_pct=float(cmp.get("min_match_rate_percent", 100.0)),
        atol=atol,
        rtol=rtol,
    )


def _fpsram_values(dumps: Dumps, start: int, count: int, as_f16: bool) -> np.ndarray:
    bits = _gather_u16(dumps.fpsram, np.arange(start, start + count, dtype=np.int64))
    if as_f16:
        return bits.view(np.float16).astype(np.float32)
    return _bits_to_f32(bits)


def _fpsram_item_checks(case: Case, dumps: Dumps, as_f16: bool) -> list[_Compared]:
    spec = case.comparison["fpsram_checks"]
    atol, rtol = float(spec.get("atol", 0.2)), float(spec.get("rtol", 0.2))
    out = []
    for name, item in spec["items"].items():
        exp = _read_f32(case.path / item["file"])
        count = int(item.get("count", exp.size))
        exp = exp[:count]
        sim = _fpsram_values(dumps, int(item["fpsram_start_index"]), exp.size, as_f16)
        out.append(
            _Compared(
                name=f"fpsram:{name}",
                kind="fpsram",
                golden=exp.astype(np.float64),
                sim=sim.astype(np.float64),
                ok=_f32_match(exp, sim, atol, rtol, allclose=False),
                ok_strict=bf16_match(exp, sim, STRICT_ATOL, STRICT_RTOL),
                min_pct=90.0,  # view_mem.compare_fpsram_with_golden: >= 90 % within tolerance
                atol=atol,
                rtol=rtol,
            )
        )
    return out


_ATOL_RE = re.compile(r"atol\s*=\s*([0-9.eE+-]+)")
_RTOL_RE = re.compile(r"rtol\s*=\s*([0-9.eE+-]+)")


def _custom_checks(case: Case, dumps: Dumps, as_f16: bool) -> list[_Compared]:
    custom = case.comparison["custom"]
    out = []
    if "fpsram" in custom:
        c = custom["fpsram"]
        exp = _read_f32(case.path / c["file"])[: int(c["count"])]
        rule = str(c.get("rule", ""))
        atol = float(_ATOL_RE.search(rule).group(1)) if _ATOL_RE.search(rule) else 0.0
        rtol = float(_RTOL_RE.search(rule).group(1)) if _RTOL_RE.search(rule) else 0.0
        # moe_topk's own checker reads the dump as bf16 (manifest "memory"), not the f16 bug.
        sim = _fpsram_values(dumps, int(c["start_index"]), exp.size, as_f16=False)
        out.append(
            _Compared(
                name="fpsram",
                kind="fpsram",
                golden=exp.astype(np.float64),
                sim=sim.astype(np.float64),
                ok=_f32_match(exp, sim, atol, rtol, allclose=True),
                ok_strict=bf16_match(exp, sim, STRICT_ATOL, STRICT_RTOL),
                min_pct=100.0,  # torch.allclose: all elements
                atol=atol,
                rtol=rtol,
            )
        )
    if "intsram" in custom:
        c = custom["intsram"]
        exp = np.fromfile(case.path / c["file"], dtype="<u4")[: int(c["count"])]
        start = int(c["start_index"])
        intsram = np.asarray(dumps.intsram, dtype=np.uint32).reshape(-1)
        idx = np.arange(start, start + exp.size)
        sim = np.zeros(exp.size, dtype=np.uint32)
        inside = idx < intsram.size
        sim[inside] = intsram[idx[inside]]
        ok = sim == exp
        out.append(
            _Compared(
                name="intsram",
                kind="intsram",
                golden=exp.astype(np.float64),
                sim=sim.astype(np.float64),
                ok=ok,
                ok_strict=ok,
                min_pct=100.0,
                atol=None,
                rtol=None,
            )
        )
    return out


def _compare_all(case: Case, dumps: Dumps, fpsram_as_f16: bool) -> list[_Compared]:
    checks: list[_Compared] = []
    for kind in _check_specs_meta(case.comparison):
        if kind == "vram":
            checks.append(_vram_check(case, dumps))
        elif kind == "hbm_mx":
            checks.append(_hbm_check(case, dumps))
        elif kind == "fpsram_checks":
            checks.extend(_fpsram_item_checks(case, dumps, fpsram_as_f16))
        elif kind == "custom":
            checks.extend(_custom_checks(case, dumps, fpsram_as_f16))
    return checks


def judge(case: Case, dumps: Dumps, *, fpsram_as_f16: bool = False) -> Verdict:
    """Judge the end-of-run ``dumps`` of ``case`` (see the module docstring for the rules).

    ``fpsram_as_f16=True`` reproduces the upstream checker's misreading of ``fpsram_dump.bin``
    as f16 in the ``de_flashattn_*`` FP SRAM checks.
    """
    compared = _compare_all(case, dumps, fpsram_as_f16)
    if not compared:
        nan = float("nan")
        return Verdict(case.name, True, nan, nan, nan, nan, nan, False, 0, ())

    results = []
    for c in compared:
        pct = _match_pct(c.ok)
        diff = np.abs(c.sim - c.golden)
        results.append(
            CheckResult(
                name=c.name,
                kind=c.kind,
                n=int(c.ok.size),
                match_pct=pct,
                passed=bool(c.ok.size) and pct >= c.min_pct,
                strict_match_pct=_match_pct(c.ok_strict),
                max_abs=float(diff.max()) if diff.size else float("nan"),
                atol=c.atol,
                rtol=c.rtol,
                min_match_rate_percent=c.min_pct,
            )
        )

    g = np.concatenate([c.golden for c in compared])
    s = np.concatenate([c.sim for c in compared])
    ok = np.concatenate([c.ok for c in compared])
    ok_strict = np.concatenate([c.ok_strict for c in compared])
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(s - g)
        err_norm = float(np.sqrt(np.sum(diff * diff)))
        g_norm = float(np.sqrt(np.sum(g * g)))
    if g_norm > 0:
        rel_l2 = err_norm / g_norm
    else:
        rel_l2 = 0.0 if err_norm == 0 else float("inf")
    all_zero = bool(np.all(s == 0)) and bool(np.any(g != 0))
    bad_nonfinite = bool(np.any(~np.isfinite(s) & np.isfinite(g)))
    return Verdict(
        case=case.name,
        passed=all(r.passed for r in results),
        upstream_match_pct=_match_pct(ok),
        strict_match_pct=_match_pct(ok_strict),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        rel_l2=rel_l2,
        degenerate=all_zero or bad_nonfinite,
        n_compared=int(ok.size),
        checks=tuple(results),
    )


# --------------------------------------------------------------------------------------------
# Expected outcome
# --------------------------------------------------------------------------------------------

#: Words ignored when matching a panic's rule text.
_STOPWORDS = frozenset({"a", "an", "the", "of", "is", "not", "to", "in", "at", "or", "and", "be"})


def _rule_keywords(rule: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9_]+", rule.lower()) if w not in _STOPWORDS]


def rule_matches(expected_rule: Optional[str], actual: str) -> bool:
    """Loose comparison of a panic's rule text with ``expected.json``'s ``panic_rule``.

    Every key word of the expected rule (lower-cased ``[a-z0-9_]`` runs, minus a few stop
    words such as "not", "a", "of") must occur, case-insensitively, as a substring of the
    actual text.  E.g. "M_MM matrix offset not a multiple of MLEN" needs "m_mm", "matrix",
    "offset", "multiple" and "mlen".  No expected rule matches anything.
    """
    if not expected_rule:
        return True
    text = actual.lower()
    return all(w in text for w in _rule_keywords(expected_rule))


def outcome_matches(case: Case, verdict_or_error: Verdict | BaseException) -> tuple[bool, str]:
    """Does a run reproduce the expected outcome of ``case`` (EXPECTED.md)?

    Pass ``verdict_or_error`` = the :class:`Verdict` of a completed run, or the exception a
    panicking run raised (it must carry ``pc``, the static program counter, and ``rule``, the
    violated rule's text; ``str(error)`` is used when ``rule`` is missing).

    * ``pass`` cases: the run completed, the upstream rule passed and the output is not
      degenerate.
    * ``fail`` cases: the run completed and the upstream rule failed.
    * ``panic`` cases: the run raised at ``case.panic_pc`` with a rule matching
      ``case.panic_rule`` (:func:`rule_matches`).
    """
    expected = case.outcome
    if isinstance(verdict_or_error, Verdict):
        v = verdict_or_error
        if expected == "panic":
            return False, f"expected a panic at pc {case.panic_pc} ({case.panic_rule}); the run completed"
        if expected == "fail":
            if v.passed:
                return False, f"expected the upstream check to fail, but it passed ({v.summary()})"
            return True, f"fails as expected ({v.summary()})"
        if not v.passed:
            return False, f"upstream check failed ({v.summary()})"
        if v.degenerate:
            return False, f"upstream check passed but the output is degenerate ({v.summary()})"
        return True, f"passes ({v.summary()})"

    err = verdict_or_error
    pc = getattr(err, "pc", None)
    rule = getattr(err, "rule", None)
    rule_text = str(rule) if rule is not None else str(err)
    desc = f"{type(err).__name__} at pc {pc}: {rule_text}"
    if expected != "panic":
        return False, f"expected outcome {expected!r}, but the run panicked ({desc})"
    if pc is None:
        return False, f"expected a panic at pc {case.panic_pc}; the error carries no pc ({desc})"
    if int(pc) != int(case.panic_pc):
        return False, f"expected a panic at pc {case.panic_pc}, got {desc}"
    if not rule_matches(case.panic_rule, rule_text):
        return False, f"panic at the right pc but the rule differs: want {case.panic_rule!r}, got {desc}"
    return True, f"panics as expected ({desc})"
