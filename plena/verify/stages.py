"""Stage compare / first divergence: named intermediates of an emulator run against a golden run.

A compiled program records where each named intermediate lives in VRAM (e.g.
``meta["intermediates"]`` of :func:`plena.frontend.model.compile_decoder`: name ->
:class:`~plena.frontend.ops_basic.VramMatrix`, in program order); the golden model returns a dict
of the same names (:func:`plena.golden.llama.decoder`). :func:`compare_run` reads every
intermediate from the run and compares it with the golden value, stage by stage:

* ``bit_exact_pct``: share of elements whose float32 bit patterns are equal (VRAM holds bf16,
  read back exactly as f32; a golden in ``Policy.hardware()`` should give 100 %);
* ``max_abs``, ``mae`` (mean abs), ``rel_l2`` (``||a - r|| / ||r||``) of ``a`` = the run (the
  "actual" side) against ``r`` = the reference, in float64 (elements with equal bits count as 0,
  so equal infinities / NaNs are no error);
* ``first``: the first differing element of the stage (row-major), its index and both values.

The report's :attr:`StageReport.first_divergence` is the first differing element of the first
stage (in program order) that is not bit-exact: where to start debugging. Render it with
:meth:`StageReport.render_text`, :meth:`StageReport.rich_table`, or take :meth:`StageReport.to_dict`
/ :meth:`StageReport.to_json`.

:func:`compare_stages` does the same for two dicts of arrays (e.g. two golden runs).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable, Mapping, Optional

import numpy as np

__all__ = ["Divergence", "StageStats", "StageReport", "compare_arrays", "compare_stages", "read_stages",
           "compare_run"]


@dataclasses.dataclass(frozen=True)
class Divergence:
    """One differing element: ``stage[index]`` is ``actual`` in the run, ``reference`` in the
    reference (both as f32, with their bit patterns)."""

    stage: str
    index: tuple
    actual: float
    reference: float

    @property
    def actual_bits(self) -> int:
        return int(np.float32(self.actual).view(np.uint32))

    @property
    def reference_bits(self) -> int:
        return int(np.float32(self.reference).view(np.uint32))

    def to_dict(self) -> dict:
        return dict(stage=self.stage, index=list(self.index), actual=_json_float(self.actual),
                    reference=_json_float(self.reference), actual_bits=f"0x{self.actual_bits:08x}",
                    reference_bits=f"0x{self.reference_bits:08x}")

    def __str__(self) -> str:
        idx = ", ".join(map(str, self.index))
        return (f"{self.stage}[{idx}]: {self.actual!r} (0x{self.actual_bits:08x}) vs "
                f"{self.reference!r} (0x{self.reference_bits:08x})")


@dataclasses.dataclass(frozen=True)
class StageStats:
    """Comparison of one stage's tensor (see the module docstring for the metrics)."""

    name: str
    shape: tuple
    same: int  # elements with identical f32 bits
    max_abs: float
    mae: float
    rel_l2: float
    first: Optional[Divergence]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bit_exact_pct(self) -> float:
        return 100.0 * self.same / self.size if self.size else 100.0

    @property
    def exact(self) -> bool:
        return self.same == self.size

    def to_dict(self) -> dict:
        return dict(name=self.name, shape=list(self.shape), size=self.size, same=self.same,
                    bit_exact_pct=self.bit_exact_pct, max_abs=_json_float(self.max_abs),
                    mae=_json_float(self.mae), rel_l2=_json_float(self.rel_l2),
                    first=self.first.to_dict() if self.first else None)


def _json_float(x: float):
    """A float for JSON: NaN / inf as strings (strict JSON has neither)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


@dataclasses.dataclass
class StageReport:
    """Per-stage comparison, in stage order; ``actual`` / ``reference`` name the two sides."""

    stages: list
    actual: str = "emulator"
    reference: str = "golden"

    def __getitem__(self, name: str) -> StageStats:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def names(self) -> list:
        return [s.name for s in self.stages]

    @property
    def exact(self) -> bool:
        """Every element of every stage bit-identical."""
        return all(s.exact for s in self.stages)

    @property
    def first_divergent_stage(self) -> Optional[StageStats]:
        return next((s for s in self.stages if not s.exact), None)

    @property
    def first_divergence(self) -> Optional[Divergence]:
        """First differing element of the first stage that is not bit-exact (None: identical)."""
        s = self.first_divergent_stage
        return None if s is None else s.first

    @property
    def bit_exact_pct(self) -> float:
        """Share of all compared elements (all stages) with identical bits."""
        n = sum(s.size for s in self.stages)
        return 100.0 * sum(s.same for s in self.stages) / n if n else 100.0

    def to_dict(self) -> dict:
        fd = self.first_divergence
        return dict(actual=self.actual, reference=self.reference, bit_exact_pct=self.bit_exact_pct,
                    exact=self.exact, first_divergence=fd.to_dict() if fd else None,
                    stages=[s.to_dict() for s in self.stages])

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def _rows(self) -> list:
        rows = []
        for s in self.stages:
            first = "" if s.first is None else (f"[{', '.join(map(str, s.first.index))}] "
                                                f"{s.first.actual:.6g} vs {s.first.reference:.6g}")
            rows.append((s.name, "x".join(map(str, s.shape)), f"{s.bit_exact_pct:.2f} %", f"{s.max_abs:.4g}",
                         f"{s.mae:.4g}", f"{s.rel_l2:.4g}", first))
        return rows

    _HEADER = ("stage", "shape", "bit-exact", "max abs", "MAE", "rel L2", "first difference")

    def _summary(self) -> str:
        fd = self.first_divergence
        return (f"{self.actual} vs {self.reference}: {self.bit_exact_pct:.4f} % bit-exact over "
                f"{len(self.stages)} stage(s); " + ("no divergence" if fd is None else f"first divergence {fd}"))

    def render_text(self) -> str:
        """Plain fixed-width table plus a summary line."""
        rows = [self._HEADER] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [self._summary()])

    def __str__(self) -> str:
        return self.render_text()

    def rich_table(self, title: Optional[str] = None):
        """The table as a :class:`rich.table.Table` (the summary is its caption)."""
        from rich.table import Table

        t = Table(*self._HEADER, title=title or f"{self.actual} vs {self.reference}", caption=self._summary())
        for r in self._rows():
            t.add_row(*r)
        return t


def compare_arrays(name: str, actual, reference) -> StageStats:
    """:class:`StageStats` of ``actual`` against ``reference`` (same shape; compared as f32)."""
    a = np.asarray(actual, np.float32)
    r = np.asarray(reference, np.float32)
    if a.shape != r.shape:
        raise ValueError(f"stage {name!r}: shapes differ, {a.shape} vs {r.shape}")
    differ = a.view(np.uint32) != r.view(np.uint32)
    same = int(a.size - np.count_nonzero(differ))
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(differ, np.abs(a.astype(np.float64) - r.astype(np.float64)), 0.0)
        max_abs = float(d.max()) if d.size else 0.0
        mae = float(d.mean()) if d.size else 0.0
        num, den = float(np.linalg.norm(d)), float(np.linalg.norm(r.astype(np.float64)))
    rel = num / den if den else num
    first = None
    if same != a.size:
        flat = int(np.flatnonzero(differ.reshape(-1))[0])
        idx = tuple(int(i) for i in np.unravel_index(flat, a.shape))
        first = Divergence(name, idx, float(a.reshape(-1)[flat]), float(r.reshape(-1)[flat]))
    return StageStats(name, tuple(a.shape), same, max_abs, mae, rel, first)


def compare_stages(actual: Mapping, reference: Mapping, names: Optional[Iterable[str]] = None, *,
                   actual_label: str = "emulator", reference_label: str = "golden") -> StageReport:
    """Compare ``actual[name]`` with ``reference[name]`` for each name (default: ``actual``'s
    names in its order, which should be program order). A name missing on either side is a
    :class:`KeyError`."""
    names = list(actual) if names is None else list(names)
    missing = [n for n in names if n not in actual or n not in reference]
    if missing:
        raise KeyError(f"stage(s) {missing} missing in the {actual_label} or the {reference_label} results")
    return StageReport([compare_arrays(n, actual[n], reference[n]) for n in names], actual_label, reference_label)


def read_stages(program, result, locations: Mapping) -> dict:
    """``{name: f32 array}`` read from a run: ``locations`` maps names to objects with a
    ``read(program, result)`` method (a :class:`~plena.frontend.ops_basic.VramMatrix`), or to
    VRAM regions (read with ``program.read_vram``)."""
    out = {}
    for name, loc in locations.items():
        out[name] = loc.read(program, result) if hasattr(loc, "read") else program.read_vram(result, loc)
    return out


def compare_run(program, result, locations: Mapping, golden: Mapping, *, names: Optional[Iterable[str]] = None,
                reference_label: str = "golden", emulated: Optional[Mapping] = None) -> StageReport:
    """Compare the intermediates of an emulator run with a golden run's dict of the same names.

    ``program``: the compiled :class:`~plena.frontend.program.Program`; ``result``: its
    ``RunResult``; ``locations``: name -> where it lives in VRAM (``meta["intermediates"]``);
    ``golden``: name -> array. ``emulated``: already-read values (from :func:`read_stages`), to
    compare one run with several goldens without reading VRAM again."""
    emu = read_stages(program, result, locations) if emulated is None else emulated
    return compare_stages(emu, golden, list(locations) if names is None else names,
                          actual_label="emulator", reference_label=reference_label)
