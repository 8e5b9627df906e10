"""plena.verify.stages on synthetic stage dicts (the emulator-run path is tested in
tests/test_decoder_layers.py): metrics, first divergence, renderers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from plena.numerics.bf16 import bf16_bits_to_f32_np, f32_to_bf16_bits_np
from plena.verify.stages import compare_arrays, compare_run, compare_stages, read_stages


def bf16(a):
    return bf16_bits_to_f32_np(f32_to_bf16_bits_np(np.asarray(a, np.float32)))


def stages(seed=0):
    rng = np.random.default_rng(seed)
    return {"x": bf16(rng.standard_normal((8, 16))), "L0.q": bf16(rng.standard_normal((8, 32))),
            "L0.attn": bf16(rng.standard_normal((8, 32))), "final_norm": bf16(rng.standard_normal((8, 16)))}


def test_identical_runs_report_100_percent():
    a = stages()
    b = {k: v.copy() for k, v in a.items()}
    r = compare_stages(a, b)
    assert r.exact and r.bit_exact_pct == 100.0 and r.first_divergence is None
    assert r.names == list(a)
    for s in r:
        assert s.bit_exact_pct == 100.0 and s.max_abs == s.mae == s.rel_l2 == 0.0 and s.first is None
    d = json.loads(r.to_json())
    assert d["exact"] and d["first_divergence"] is None and len(d["stages"]) == 4
    assert "no divergence" in r.render_text()


@pytest.mark.parametrize("stage,index", [("L0.q", (5, 17)), ("x", (0, 0)), ("final_norm", (7, 15))])
def test_planted_difference_found(stage, index):
    a = stages()
    b = {k: v.copy() for k, v in a.items()}
    old = float(b[stage][index])
    b[stage][index] = np.nextafter(np.float32(old), np.float32(np.inf))  # one ulp: bits differ
    r = compare_stages(a, b, actual_label="emu", reference_label="gold")
    assert not r.exact
    assert r.first_divergent_stage.name == stage
    fd = r.first_divergence
    assert fd.stage == stage and fd.index == index
    assert fd.actual == old and fd.reference == float(b[stage][index])
    assert fd.actual_bits + 1 == fd.reference_bits or fd.actual_bits - 1 == fd.reference_bits
    s = r[stage]
    n = a[stage].size
    assert s.same == n - 1 and s.bit_exact_pct == pytest.approx(100.0 * (n - 1) / n)
    diff = abs(float(b[stage][index]) - old)
    assert s.max_abs == diff and s.mae == pytest.approx(diff / n)
    assert s.rel_l2 == pytest.approx(diff / np.linalg.norm(np.float64(b[stage])))
    assert all(r[o].exact for o in a if o != stage)
    total = sum(v.size for v in a.values())
    assert r.bit_exact_pct == pytest.approx(100.0 * (total - 1) / total)
    text = r.render_text()
    assert f"first divergence {stage}[{', '.join(map(str, index))}]" in text
    d = r.to_dict()
    assert d["first_divergence"]["stage"] == stage and d["first_divergence"]["index"] == list(index)


def test_first_divergence_is_first_stage_in_order():
    a = stages()
    b = {k: v.copy() for k, v in a.items()}
    b["final_norm"][0, 0] += 1.0
    b["L0.attn"][3, 4] += 1.0
    b["L0.attn"][2, 9] += 1.0
    r = compare_stages(a, b)
    assert r.first_divergence.stage == "L0.attn" and r.first_divergence.index == (2, 9)  # row-major first
    assert r["final_norm"].first.index == (0, 0)
    # an explicit order changes which stage is first
    r2 = compare_stages(a, b, names=["final_norm", "L0.attn"])
    assert r2.first_divergence.stage == "final_norm" and len(r2) == 2


def test_metrics_and_special_values():
    ref = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    act = np.array([[1.0, -2.5], [0.0, 4.0]], np.float32)
    s = compare_arrays("t", act, ref)
    assert s.same == 2 and s.max_abs == 0.5 and s.mae == pytest.approx(0.25)
    assert s.rel_l2 == pytest.approx(np.sqrt(0.5) / np.linalg.norm(ref))
    assert s.first.index == (0, 1)
    # -0.0 vs +0.0 differ in bits (not in value); equal NaNs / infs are no error
    z = compare_arrays("z", np.array([-0.0, np.inf, np.nan], np.float32), np.array([0.0, np.inf, np.nan], np.float32))
    assert z.same == 2 and z.max_abs == 0.0 and z.first.index == (0,)
    n = compare_arrays("n", np.array([np.nan, 1.0], np.float32), np.array([1.0, 1.0], np.float32))
    assert n.same == 1 and np.isnan(n.max_abs)
    json.dumps(compare_stages({"n": np.array([np.nan])}, {"n": np.array([1.0])}).to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="shapes"):
        compare_arrays("bad", np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(KeyError, match="missing"):
        compare_stages({"a": np.zeros(1)}, {"b": np.zeros(1)})


def test_rich_table_and_run_reading():
    from rich.console import Console

    a = stages()

    class Loc:  # stands in for a VramMatrix
        def __init__(self, v):
            self.v = v

        def read(self, program, result):
            return self.v

    locs = {k: Loc(v) for k, v in a.items()}
    emu = read_stages(None, None, locs)
    assert all(np.array_equal(emu[k], a[k]) for k in a)
    gold = {k: v.copy() for k, v in a.items()}
    gold["L0.attn"][1, 2] = 7.0
    r = compare_run(None, None, locs, gold, reference_label="hardware golden")
    assert r.first_divergence.stage == "L0.attn" and r.first_divergence.index == (1, 2)
    con = Console(record=True, width=160)
    con.print(r.rich_table())
    out = con.export_text()
    assert "L0.attn" in out and "emulator vs hardware golden" in out
