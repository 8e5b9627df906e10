import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PLENA_SHARED_DIR", REPO.parent / "shared"))
CONFORMANCE = SHARED / "conformance"


def conformance_cases() -> list[str]:
    if not CONFORMANCE.is_dir():
        return []
    return sorted(p.name for p in CONFORMANCE.iterdir() if (p / "program.mem").exists())


@pytest.fixture
def conformance_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip("../shared/conformance is absent")
    return CONFORMANCE


def case_params():
    """Parametrize over conformance cases; a single skipped param when the corpus is absent."""
    cases = conformance_cases()
    return cases if cases else [pytest.param("absent", marks=pytest.mark.skip(reason="no ../shared"))]


def judge_case_output(name, case, sim, capsys, *, rule_label="upstream rule"):
    """Print and return (upstream-rule %, strict %) of our output ``sim`` against a conformance
    case's golden; asserts the upstream rule passes."""
    from plena.verify.conformance import bf16_match

    golden = case.golden().reshape(sim.shape)
    cmp = case.comparison
    up_pct = 100 * bf16_match(golden, sim, cmp["atol"], cmp["rtol"]).mean()
    strict_pct = 100 * bf16_match(golden, sim, 0.02, 0.02).mean()
    with capsys.disabled():
        print(f"\n  {name}: {rule_label} {up_pct:.2f}% (need {cmp['min_match_rate_percent']}%), "
              f"strict {strict_pct:.2f}%, max abs {np.abs(golden - sim).max():.4g}", end="")
    assert up_pct >= cmp["min_match_rate_percent"]
    return up_pct, strict_pct
