"""Tests of the conformance-case loader and judge (plena.verify.conformance / .dumps).

No emulator is needed: dumps are synthesised from each case's own golden data.  Tests that
read the corpus skip when ``../shared/conformance`` is absent.
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest

from plena.numerics.formats import E4M3, E8M0
from plena.verify import conformance as C
from plena.verify.dumps import Dumps, read_dump_dir, write_dump_dir

BF16 = ml_dtypes.bfloat16
ROOT = C.conformance_dir()
CASES = C.list_cases()
needs_corpus = pytest.mark.skipif(ROOT is None, reason="../shared/conformance is absent")


def case_params():
    return CASES if CASES else [pytest.param("absent", marks=pytest.mark.skip(reason="no corpus"))]


def checked_case_params():
    names = [n for n in CASES if C.load_case(n).has_check]
    return names if names else [pytest.param("absent", marks=pytest.mark.skip(reason="no corpus"))]


# --------------------------------------------------------------------------------------------
# Synthesised dumps
# --------------------------------------------------------------------------------------------


def _bf16_bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(BF16).view(np.uint16)


def empty_dumps(case: C.Case) -> Dumps:
    """All-zero memories; the HBM holds the preload image (as after a run that stored nothing)."""
    hbm = np.zeros(case.hbm_size, dtype=np.uint8)
    pre = np.fromfile(case.hbm_bin, dtype=np.uint8)
    hbm[: pre.size] = pre
    return Dumps(
        vram=np.zeros(0, np.uint16),
        mram=None,
        fpsram=np.zeros(1024, np.uint16),
        intsram=np.zeros(1024, np.uint32),
        hbm=hbm,
    )


def h_store_copy(hbm: np.ndarray, pre: np.ndarray, dst: tuple[int, int], src: tuple[int, int]):
    """de_h_store: copy one 64-element half-row (64 E4M3 bytes + 8 E8M0 bytes) of the preloaded
    (4 x 128) activation to the result region.

    From the manifest: the input's element bytes are at 0 + r*128 + c, its scale bytes at
    512 + r*16 + c//8; the result region mirrors that at 576 (elements) and 1088 (scales).
    """
    (dr, dh), (sr, sh) = dst, src
    e_dst, e_src = 576 + dr * 128 + dh * 64, sr * 128 + sh * 64
    s_dst, s_src = 1088 + dr * 16 + dh * 8, 512 + sr * 16 + sh * 8
    hbm[e_dst : e_dst + 64] = pre[e_src : e_src + 64]
    hbm[s_dst : s_dst + 8] = pre[s_src : s_src + 8]


def golden_dumps(case: C.Case) -> Dumps:
    """Dumps holding exactly what each upstream check expects (bf16-rounded where stored)."""
    d = empty_dumps(case)
    cmp = case.comparison
    vram = d.vram
    if (case.path / "check_vram_index.u32.bin").is_file() and str(cmp.get("memory", "")).startswith("VRAM"):
        idx = np.fromfile(case.path / "check_vram_index.u32.bin", dtype="<u4").astype(np.int64)
        exp = np.fromfile(case.path / "check_expected.f32.bin", dtype="<f4")
        vram = np.zeros(int(idx.max()) + 1, np.uint16)
        vram[idx] = _bf16_bits(exp)
    fps, ints = d.fpsram.copy(), d.intsram.copy()
    for item in (cmp.get("fpsram_checks") or {}).get("items", {}).values():
        exp = np.fromfile(case.path / item["file"], dtype="<f4")
        s = item["fpsram_start_index"]
        fps[s : s + exp.size] = _bf16_bits(exp)
    custom = cmp.get("custom") or {}
    if "fpsram" in custom:
        exp = np.fromfile(case.path / custom["fpsram"]["file"], dtype="<f4")
        s = custom["fpsram"]["start_index"]
        fps[s : s + exp.size] = _bf16_bits(exp)
    if "intsram" in custom:
        exp = np.fromfile(case.path / custom["intsram"]["file"], dtype="<u4")
        s = custom["intsram"]["start_index"]
        ints[s : s + exp.size] = exp
    hbm = d.hbm
    if str(cmp.get("memory", "")).startswith("HBM"):
        # The golden of de_h_store is the activation the program loads, so a correct H_STORE_V
        # writes back the MX encoding the preload image already holds.
        pre = np.fromfile(case.hbm_bin, dtype=np.uint8)
        for r in range(4):
            for h in range(2):
                h_store_copy(hbm, pre, (r, h), (r, h))
    return Dumps(vram=vram, mram=None, fpsram=fps, intsram=ints, hbm=hbm)


# --------------------------------------------------------------------------------------------
# Dump files
# --------------------------------------------------------------------------------------------


def test_dump_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    d = Dumps(
        vram=rng.integers(0, 1 << 16, 4096, dtype=np.uint16),
        mram=rng.integers(0, 1 << 16, 1024, dtype=np.uint16),
        fpsram=rng.integers(0, 1 << 16, 1024, dtype=np.uint16),
        intsram=rng.integers(0, 1 << 32, 1024, dtype=np.uint32),
        hbm=rng.integers(0, 256, 640, dtype=np.uint8),
    )
    write_dump_dir(d, tmp_path / "a", hbm=True)
    for mmap in (True, False):
        r = read_dump_dir(tmp_path / "a", mmap=mmap)
        for name in ("vram", "mram", "fpsram", "intsram", "hbm"):  # the arrays (not the format fields)
            got, want = getattr(r, name), getattr(d, name)
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want, err_msg=name)
    assert (tmp_path / "a" / "vram_dump.bin").stat().st_size == 2 * 4096
    assert (tmp_path / "a" / "intsram_dump.bin").stat().st_size == 4 * 1024

    # hbm=False (the default) writes no hbm_dump.bin; mram=None writes no mram_dump.bin.
    write_dump_dir(d._replace(mram=None), tmp_path / "b")
    r = read_dump_dir(tmp_path / "b")
    assert r.hbm is None and r.mram is None
    assert not (tmp_path / "b" / "hbm_dump.bin").exists()


def test_dump_files_are_little_endian_and_fpsram_is_bf16(tmp_path):
    d = Dumps(
        vram=_bf16_bits([1.0, -2.0]),
        mram=None,
        fpsram=_bf16_bits(np.full(1024, 1.0)),
        intsram=np.arange(1024, dtype=np.uint32) + 0x01020300,
    )
    write_dump_dir(d, tmp_path)
    assert (tmp_path / "vram_dump.bin").read_bytes() == b"\x80\x3f\x00\xc0"
    assert (tmp_path / "fpsram_dump.bin").read_bytes()[:2] == b"\x80\x3f"  # bf16 1.0, not f16
    assert (tmp_path / "intsram_dump.bin").read_bytes()[:8] == b"\x00\x03\x02\x01\x01\x03\x02\x01"


def test_short_scalar_dumps_are_zero_padded(tmp_path):
    (tmp_path / "vram_dump.bin").write_bytes(b"\x80\x3f")
    (tmp_path / "fpsram_dump.bin").write_bytes(b"\x80\x3f")
    (tmp_path / "intsram_dump.bin").write_bytes(b"\x07\x00\x00\x00")
    r = read_dump_dir(tmp_path)
    assert r.vram.tolist() == [0x3F80]
    assert r.fpsram.shape == (1024,) and r.fpsram[0] == 0x3F80 and not r.fpsram[1:].any()
    assert r.intsram.shape == (1024,) and r.intsram[0] == 7 and not r.intsram[1:].any()


def test_write_rejects_float_arrays(tmp_path):
    d = Dumps(np.zeros(4, np.float32), None, np.zeros(1024, np.uint16), np.zeros(1024, np.uint32))
    with pytest.raises(TypeError):
        write_dump_dir(d, tmp_path)


# --------------------------------------------------------------------------------------------
# Comparison arithmetic
# --------------------------------------------------------------------------------------------


def test_bf16_rule_differs_from_f32_evaluation():
    # g = 2, sim = 1.3984375 (both bf16), atol = rtol = 0.2.  Exact |g - sim| = 0.6015625.
    # f32: tol = 0.2 + 0.4 = 0.6 < 0.6015625  -> fails.
    # bf16: 0.2*2 = 0.4 -> bf16 0.400390625; 0.2 + that = 0.600390625 -> bf16 0.6015625;
    #       err 0.6015625 <= 0.6015625 -> passes.
    assert C.bf16_match([2.0], [1.3984375], 0.2, 0.2).tolist() == [True]
    assert C.bf16_match([2.0], [1.390625], 0.2, 0.2).tolist() == [False]  # err 0.609375
    # The error itself is rounded: |-0.421875 - (-0.1357421875)| = 0.2861328125 -> bf16
    # 0.28515625; tol = bf16(0.2 + bf16(0.084375)) = 0.28515625.  (f32 tol: 0.284375.)
    assert C.bf16_match([-0.421875], [-0.1357421875], 0.2, 0.2).tolist() == [True]
    # The golden is rounded to bf16 first: with atol = rtol = 0 (routed-MoE cases), a golden of
    # 1.001 equals the bf16 value 1.0 but not its neighbour 1.0078125.
    assert C.bf16_match([1.001, 1.001], [1.0, 1.0078125], 0.0, 0.0).tolist() == [True, False]
    # NaN never matches.
    assert C.bf16_match([1.0, np.nan], [np.nan, np.nan], 0.2, 0.2).tolist() == [False, False]


def test_harness_minifloat_tables():
    e4m3 = C.harness_minifloat_table(E4M3)
    # The harness decodes IEEE-style (subnormal exponent 1 - bias, inf/NaN at exponent 15),
    # which is exactly ml_dtypes' float8_e4m3.
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3).astype(np.float32)
    np.testing.assert_array_equal(e4m3, ref)
    assert e4m3[0x38] == 1.0 and e4m3[0x77] == 240.0 and e4m3[0x01] == 2.0**-9
    assert np.isinf(e4m3[0x78]) and np.isnan(e4m3[0x79]) and e4m3[0xB8] == -1.0
    e8m0 = C.harness_minifloat_table(E8M0)
    assert e8m0.shape == (256,)
    assert e8m0[0] == 0.0 and e8m0[127] == 1.0 and e8m0[130] == 8.0 and e8m0[1] == 2.0**-126
    assert np.isinf(e8m0[255])


def test_harness_e4m3_vs_emulator_decode():
    """The harness and the emulator agree on every E4M3 code except the subnormals, which the
    emulator decodes to half the harness value (spec §2.9 (a))."""
    minifloat = pytest.importorskip("plena.numerics.minifloat")
    emu = np.asarray(minifloat.decode_table(E4M3), dtype=np.float32)
    ours = C.harness_minifloat_table(E4M3)
    codes = np.arange(256)
    sub = ((codes >> 3) & 0xF) == 0
    finite = np.isfinite(ours)
    np.testing.assert_array_equal(emu[~sub & finite], ours[~sub & finite])
    np.testing.assert_array_equal(emu[sub] * 2, ours[sub])
    np.testing.assert_array_equal(minifloat.decode_table(E8M0), C.harness_minifloat_table(E8M0))


def test_conformance_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PLENA_CONFORMANCE_DIR", str(tmp_path / "missing"))
    assert C.conformance_dir() is None and C.list_cases() == []
    monkeypatch.setenv("PLENA_CONFORMANCE_DIR", str(tmp_path))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text("{}")
    (tmp_path / "y").mkdir()  # no manifest: not a case
    assert C.conformance_dir() == tmp_path and C.list_cases() == ["x"]


@needs_corpus
def test_case_table_matches_expected_md():
    assert len(CASES) == 47
    outcomes = [C.load_case(n).outcome for n in CASES]
    assert outcomes.count("pass") == 40
    assert outcomes.count("fail") == 3 and outcomes.count("panic") == 4
    bmm = C.load_case("de_bmm")
    assert (bmm.outcome, bmm.panic_pc) == ("panic", 270)
    assert "multiple of MLEN" in bmm.panic_rule
    assert bmm.dynamic_instructions == 271
    with pytest.raises(FileNotFoundError):
        C.load_case("no_such_case")


@needs_corpus
@pytest.mark.parametrize("name", case_params())
def test_load_case(name):
    case = C.load_case(name)
    assert case.name == name and case.manifest["case"] == name
    assert case == C.load_case(case.path)  # by path, same case
    cli = case.manifest["emulator_cli"]
    assert case.hbm_size == int(cli[cli.index("--hbm-size") + 1])
    assert case.hbm_size % 64 == 0 and case.hbm_size >= case.hbm_bin.stat().st_size
    for p in (case.program_mem, case.program_asm, case.hbm_bin, case.fp_sram_bin, case.settings_toml):
        assert p.is_file(), p
    assert case.int_sram_bin is not None and case.int_sram_bin.is_file()
    assert (case.vram_preload is not None) == ("--vram" in cli)
    if case.vram_preload is not None:
        assert case.vram_preload.is_file()
    assert case.outcome in ("pass", "fail", "panic")
    assert (case.panic_pc is not None) == (case.outcome == "panic")
    assert case.golden().shape == tuple(case.manifest["golden"]["shape"])


# --------------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------------


@needs_corpus
@pytest.mark.parametrize("name", case_params())
def test_golden_dumps_pass_with_full_match(name):
    case = C.load_case(name)
    v = C.judge(case, golden_dumps(case))
    assert v.passed and not v.degenerate
    if not case.has_check:  # de_loop, de_dllm1: pass iff the run completed
        assert v.n_compared == 0 and v.checks == ()
        return
    assert v.upstream_match_pct == 100.0
    assert all(c.passed and c.match_pct == 100.0 for c in v.checks)
    assert v.n_compared == sum(c.n for c in v.checks) > 0
    if case.comparison.get("n_compared") is not None:
        assert v.checks[0].n == case.comparison["n_compared"]
    if case.comparison["memory"].startswith("HBM"):
        # the MX encoding of the (unquantised) golden is within 0.03 + 10 %, not exact
        assert 0 < v.max_abs < 0.2 and 0 < v.rel_l2 < 0.1
    else:
        # only the bf16 rounding of the golden remains
        assert v.strict_match_pct == 100.0
        assert v.max_abs <= np.max(np.abs(case.golden())) * 2.0**-8
        assert v.rel_l2 < 2.0**-8


@needs_corpus
@pytest.mark.parametrize("name", checked_case_params())
def test_all_zero_output(name):
    case = C.load_case(name)
    cmp = case.comparison
    v = C.judge(case, empty_dumps(case))
    assert v.degenerate  # every checked case has a non-zero golden
    if cmp.get("zero_output_would_pass") is False or "custom" in cmp:
        assert not v.passed
    if "zero_output_match_rate_percent" in cmp:
        # the manifest's own figure for an all-zero output, from the upstream arithmetic
        assert round(v.checks[0].match_pct, 2) == pytest.approx(cmp["zero_output_match_rate_percent"], abs=1e-9)
        assert (v.checks[0].match_pct >= v.checks[0].min_match_rate_percent) == cmp["zero_output_would_pass"]
    assert v.rel_l2 == pytest.approx(1.0)


def _corrupt_one(case: C.Case, d: Dumps, check: str) -> Dumps:
    """Make exactly one compared element of ``check`` wrong by far more than any tolerance."""
    if check == "vram":
        idx = np.fromfile(case.path / "check_vram_index.u32.bin", dtype="<u4")
        exp = np.fromfile(case.path / "check_expected.f32.bin", dtype="<f4")
        k = idx.size // 2
        vram = d.vram.copy()
        vram[idx[k]] = _bf16_bits(-(4 * abs(exp[k]) + 8))
        return d._replace(vram=vram)
    if check == "hbm":
        hbm = d.hbm.copy()
        lo = case.comparison["elements"]["byte_range"][0]
        hbm[lo + 100] = 0x77  # 240 x scale: far from any activation
        return d._replace(hbm=hbm)
    if check == "intsram":
        start = case.comparison["custom"]["intsram"]["start_index"]
        ints = d.intsram.copy()
        ints[start + 1] += 1
        return d._replace(intsram=ints)
    # an FP SRAM check
    if check.startswith("fpsram:"):
        start = case.comparison["fpsram_checks"]["items"][check.split(":", 1)[1]]["fpsram_start_index"]
    else:
        start = case.comparison["custom"]["fpsram"]["start_index"]
    fps = d.fpsram.copy()
    fps[start] = _bf16_bits(-(4 * abs(float(fps[start : start + 1].view(BF16)[0])) + 8))
    return d._replace(fpsram=fps)


@needs_corpus
@pytest.mark.parametrize("name", checked_case_params())
def test_one_corrupted_element_costs_exactly_one(name):
    case = C.load_case(name)
    good = golden_dumps(case)
    base = C.judge(case, good)
    for i, chk in enumerate(base.checks):
        v = C.judge(case, _corrupt_one(case, good, chk.name))
        assert v.n_compared == base.n_compared
        got = v.checks[i]
        assert got.match_pct == pytest.approx((chk.n - 1) / chk.n * 100.0)
        lost_strict = round((chk.strict_match_pct - got.strict_match_pct) * chk.n / 100.0, 6)
        if chk.strict_match_pct == 100.0:
            assert lost_strict == 1
        else:  # de_h_store: the golden's own MX rounding already misses the strict tolerance
            assert lost_strict in (0, 1)
        assert v.upstream_match_pct == pytest.approx((v.n_compared - 1) / v.n_compared * 100.0)
        for j, other in enumerate(v.checks):
            if j != i:
                assert other.match_pct == 100.0
        # a single bad element fails the all-elements checks only
        assert got.passed == (chk.min_match_rate_percent <= (chk.n - 1) / chk.n * 100.0)
        assert not v.degenerate


@needs_corpus
def test_nonfinite_output_is_degenerate():
    case = C.load_case("aten_softmax")  # zero output passes upstream here
    d = golden_dumps(case)
    idx = np.fromfile(case.path / "check_vram_index.u32.bin", dtype="<u4")
    vram = d.vram.copy()
    vram[idx[7]] = _bf16_bits(np.inf)
    v = C.judge(case, d._replace(vram=vram))
    assert v.passed and v.degenerate  # one element in 4096 does not fail the 90 % rule
    assert v.checks[0].match_pct == pytest.approx(4095 / 4096 * 100)
    assert math.isinf(v.max_abs)
    ok, why = C.outcome_matches(case, v)
    assert not ok and "degenerate" in why


@needs_corpus
def test_vram_shorter_than_indices_reads_zero():
    case = C.load_case("aten_linear")
    d = golden_dumps(case)
    idx = np.fromfile(case.path / "check_vram_index.u32.bin", dtype="<u4")
    cut = int(np.sort(idx)[idx.size // 2])  # drop the top half of the compared elements
    v = C.judge(case, d._replace(vram=d.vram[:cut]))
    short = C.judge(case, d._replace(vram=np.where(np.arange(d.vram.size) < cut, d.vram, 0).astype(np.uint16)))
    assert v.upstream_match_pct == short.upstream_match_pct < 60


@needs_corpus
def test_de_h_store_reproduces_the_documented_defect():
    """The program stores VRAM rows 1..4 instead of 4..7 as the second halves (EXPECTED.md):
    the upstream check must fail with about 51 % of the elements matching."""
    case = C.load_case("de_h_store")
    d = empty_dumps(case)
    pre = np.fromfile(case.hbm_bin, dtype=np.uint8)
    vram_rows = [(r, 0) for r in range(4)] + [(r, 1) for r in range(4)]  # after the prefetches
    hbm = d.hbm.copy()
    for r in range(4):
        h_store_copy(hbm, pre, (r, 0), vram_rows[r])
        h_store_copy(hbm, pre, (r, 1), vram_rows[1 + r])  # the defect: VRAM row 1.. not 4..
    v = C.judge(case, d._replace(hbm=hbm))
    assert not v.passed and not v.degenerate
    assert 48 < v.upstream_match_pct < 55
    assert C.outcome_matches(case, v)[0]
    with pytest.raises(ValueError):
        C.judge(case, d._replace(hbm=None))


@needs_corpus
def test_fpsram_f16_quirk():
    case = C.load_case("de_flashattn_decode")
    d = golden_dumps(case)
    assert C.judge(case, d).passed
    # Read as f16 (the upstream checker's bug), bf16 4.15625 (0x4085) becomes 2.26 -> fails.
    v = C.judge(case, d, fpsram_as_f16=True)
    by_name = {c.name: c for c in v.checks}
    assert by_name["vram"].passed and by_name["fpsram:golden_exp_m_res"].passed  # 0 is 0
    assert not by_name["fpsram:golden_exp_sum_new"].passed and not v.passed
    # ... and f16 bits in the dump satisfy the quirky reader.
    item = case.comparison["fpsram_checks"]["items"]["golden_exp_sum_new"]
    fps = d.fpsram.copy()
    fps[item["fpsram_start_index"]] = np.float16(4.15625).view(np.uint16)
    assert C.judge(case, d._replace(fpsram=fps), fpsram_as_f16=True).passed


@needs_corpus
def test_moe_topk_tolerances():
    case = C.load_case("moe_topk")
    d = golden_dumps(case)
    start = case.comparison["custom"]["fpsram"]["start_index"]
    exp = np.fromfile(case.path / case.comparison["custom"]["fpsram"]["file"], dtype="<f4")
    fps = d.fpsram.copy()
    # one bf16 ulp off on 0.45703125 (ulp 2^-9 ~ 0.00195 <= 0.003): still allclose
    fps[start] = _bf16_bits(exp[0] + 2.0**-9)
    assert C.judge(case, d._replace(fpsram=fps)).passed
    # two ulps (0.0039 > 0.003): fails, although the strict bf16 rule (0.02) accepts it
    fps[start] = _bf16_bits(exp[0] + 2.0**-8)
    v = C.judge(case, d._replace(fpsram=fps))
    assert not v.passed and v.strict_match_pct == 100.0


# --------------------------------------------------------------------------------------------
# Expected outcome
# --------------------------------------------------------------------------------------------


class FakePanic(RuntimeError):
    def __init__(self, pc, rule):
        super().__init__(f"pc {pc}: {rule}")
        self.pc, self.rule = pc, rule


@needs_corpus
def test_outcome_matches_pass_case():
    case = C.load_case("aten_linear")
    good = C.judge(case, golden_dumps(case))
    assert C.outcome_matches(case, good)[0]
    assert not C.outcome_matches(case, C.judge(case, empty_dumps(case)))[0]
    ok, why = C.outcome_matches(case, FakePanic(3, "VRAM address not a multiple of VLEN"))
    assert not ok and "panicked" in why
    # a zero output passing the weak upstream rule is still not a pass
    sm = C.load_case("aten_softmax")
    v = C.judge(sm, empty_dumps(sm))
    assert v.passed and not C.outcome_matches(sm, v)[0]
    # no-check cases pass iff the run completed
    loop = C.load_case("de_loop")
    assert C.outcome_matches(loop, C.judge(loop, empty_dumps(loop)))[0]
    assert not C.outcome_matches(loop, FakePanic(0, "loop budget exceeded"))[0]


@needs_corpus
def test_outcome_matches_fail_case():
    case = C.load_case("de_flashattn_qkt")
    assert C.outcome_matches(case, C.judge(case, empty_dumps(case)))[0]
    ok, why = C.outcome_matches(case, C.judge(case, golden_dumps(case)))
    assert not ok and "passed" in why
    assert not C.outcome_matches(case, FakePanic(5, "anything"))[0]


@needs_corpus
def test_outcome_matches_panic_case():
    case = C.load_case("de_bmm")
    assert C.outcome_matches(case, FakePanic(270, "M_MM: matrix offset 4 is not a multiple of MLEN (64)"))[0]
    assert C.outcome_matches(case, FakePanic(270, "m_mm matrix OFFSET must be a multiple of mlen"))[0]
    assert not C.outcome_matches(case, FakePanic(269, "M_MM matrix offset not a multiple of MLEN"))[0]
    assert not C.outcome_matches(case, FakePanic(270, "VRAM address not a multiple of VLEN"))[0]
    assert not C.outcome_matches(case, RuntimeError("no pc attribute"))[0]
    assert not C.outcome_matches(case, C.judge(case, golden_dumps(case)))[0]

    class NoRule(Exception):
        pc = 270

    # without a ``rule`` attribute the message is used
    assert C.outcome_matches(case, NoRule("M_MM matrix offset 8 not a multiple of MLEN"))[0]
    assert not C.outcome_matches(case, NoRule("something else"))[0]


def test_rule_matches():
    assert C.rule_matches("M_MM matrix offset not a multiple of MLEN", "m_mm MATRIX offset % MLEN != 0 (multiple)")
    assert not C.rule_matches("M_MM matrix offset not a multiple of MLEN", "M_MV offset not a multiple of BLEN")
    assert C.rule_matches(None, "anything")


def test_no_check_verdict_is_nan_but_passes(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text(
        json.dumps({"case": "c", "comparison": {"harness_params": None},
                    "emulator_cli": ["transactional_emulator", "--hbm-size", "128"]})
    )
    case = C.load_case(tmp_path / "c")
    assert case.hbm_size == 128 and case.outcome == "pass" and not case.has_check
    v = C.judge(case, Dumps(np.zeros(0, np.uint16), None, np.zeros(1024, np.uint16), np.zeros(1024, np.uint32)))
    assert v.passed and v.n_compared == 0 and math.isnan(v.upstream_match_pct)


@needs_corpus
def test_outcome_matches_with_emulator_errors():
    errors = pytest.importorskip("plena.emu_jax.errors")
    case = C.load_case("de_ffn_intermediate")
    err = errors.ExecutionError(errors.RULES[errors.Err.MM_OFFSET], pc=41, instr="M_MM 0, gp1, gp2")
    assert C.outcome_matches(case, err)[0]
    err = errors.ExecutionError(errors.RULES[errors.Err.MV_OFFSET], pc=41, instr="M_MV 0, gp1, gp2")
    assert not C.outcome_matches(case, err)[0]
