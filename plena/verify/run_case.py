"""Run one conformance case through the emulator exactly as the reference is run
(same files, same flags) and judge it with the upstream rule."""

from __future__ import annotations

import dataclasses
import time

from plena.config import load_config
from plena.emu_jax import files
from plena.emu_jax.api import RunResult, run
from plena.emu_jax.errors import PlenaError
from plena.isa import read_mem
from plena.verify.conformance import Case, Verdict, judge, outcome_matches


@dataclasses.dataclass
class CaseRun:
    case: Case
    result: RunResult | None
    error: PlenaError | None
    verdict: Verdict | None
    reproduced: bool  # the EXPECTED.md outcome is reproduced
    why: str
    wall_s: float

    @property
    def outcome(self) -> str:
        if self.error is not None:
            return "panic"
        return "pass" if self.verdict.passed and not self.verdict.degenerate else "fail"


def run_case(case: Case) -> CaseRun:
    t0 = time.perf_counter()
    cfg = load_config(case.settings_toml)
    result = error = verdict = None
    try:
        result = run(read_mem(case.program_mem), cfg, hbm=files.read_bytes(case.hbm_bin),
                     fpsram=files.load_fpsram(case.fp_sram_bin),
                     intsram=files.load_intsram(case.int_sram_bin) if case.int_sram_bin else None,
                     vram=files.load_vram(case.vram_preload) if case.vram_preload else None,
                     hbm_size=case.hbm_size)
        verdict = judge(case, result.dumps(with_hbm=True))
        ok, why = outcome_matches(case, verdict)
    except PlenaError as exc:
        error = exc
        ok, why = outcome_matches(case, exc)
    return CaseRun(case, result, error, verdict, ok, why, time.perf_counter() - t0)
