import os
from pathlib import Path

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
