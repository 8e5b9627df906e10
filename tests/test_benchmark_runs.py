"""How many times ``benchmarks/executors.py`` repeats a measurement (its "run s" rule)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import executors  # noqa: E402


def count_runs(run_s: float, repeat: int, min_s: float) -> int:
    runs: list = []
    while executors.more_runs(runs, repeat, min_s):
        runs.append(run_s)
    return len(runs)


def test_short_runs_repeat_until_min_seconds_at_most_max_runs():
    assert count_runs(0.3, repeat=3, min_s=1.0) == 4  # 3 runs make 0.9 s: one more
    assert count_runs(0.002, repeat=5, min_s=1.0) == executors.MAX_RUNS
    assert count_runs(0.002, repeat=5, min_s=0.0) == 5


def test_long_runs_keep_the_repeat_count_and_runs_over_10_s_stop():
    assert count_runs(2.0, repeat=5, min_s=1.0) == 5
    assert count_runs(11.0, repeat=5, min_s=1.0) == 1
    assert count_runs(0.5, repeat=1, min_s=0.0) == 1
