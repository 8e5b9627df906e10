"""Loops run as lanes (plena.emu_jax.vectorise): which loops qualify, and the fast executor's
final state against the reference interpreter's, bit for bit, on loops whose iterations are
independent (one array program), on loops whose iterations write the same elements (committed
in iteration order) and on loops whose iterations conflict (a read after an earlier
iteration's write: the run-time check flags it and api.run redoes the run without lanes)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asm_helpers import li, prog
from plena.emu_jax import api, structure
from plena.emu_jax.errors import PlenaError
from test_emu_fast import _inputs, assert_same, run_both

PRELUDE = [li(1, 0), li(2, 64 * 16), li(3, 64 * 32), li(5, 0), li(6, 1 << 16), "C_SET_ADDR_REG a0, gp0, gp6",
           li(7, 4096), "C_SET_SCALE_REG gp7", li(7, 64), "C_SET_STRIDE_REG gp7", "S_LD_FP f1, gp0, 1",
           "S_LD_FP f2, gp0, 2", "H_PREFETCH_M gp5, gp0, a0, 1, 0"]


def loop_kinds(src: list) -> list:
    """The signature kinds ("L", "VL", "LV") of the program's loops, outermost first."""
    items, sigs = structure.parse(api.load_program(prog(src)))
    out = []

    def walk(its):
        for it in its:
            if isinstance(it, structure.Loop):
                out.append(sigs.keys[it.sig][0])
                walk(it.body)

    walk(items)
    return out


def _has_kind(sig, kind: str) -> bool:
    """Whether a block signature tree holds an item of this kind ("L", "LV", "VL", ...)."""
    return isinstance(sig, tuple) and (sig[:1] == (kind,) or any(_has_kind(s, kind) for s in sig))


def loop(count: int, *body: str, reg: int = 9) -> list:
    return [f"C_LOOP_START gp{reg}, {count}", *body, f"C_LOOP_END gp{reg}"]


CASES = {
    # independent rows: in-place chain per row, results to another row block
    "rows": loop(8, "V_MUL_VF gp1, gp1, f1, 0", "V_EXP_V gp1, gp1, 0", "V_ADD_VV gp2, gp1, gp3, 0",
                 "S_ADDI_INT gp1, gp1, 64", "S_ADDI_INT gp2, gp2, 64", "S_ADDI_INT gp3, gp3, 64"),
    # iteration k reads the row iteration k - 1 wrote (a running sum): read-after-write
    "running_sum": loop(8, "S_ADDI_INT gp4, gp2, 64", "V_ADD_VV gp4, gp2, gp1, 0", "S_ADDI_INT gp2, gp2, 64",
                        "S_ADDI_INT gp1, gp1, 64"),
    # every iteration writes the same whole row: the last one must win
    "same_row": loop(6, "V_MUL_VF gp3, gp1, f1, 0", "S_ADDI_INT gp1, gp1, 64"),
    # a scratch row written and then read by every iteration (as RMS norm code does)
    "scratch_row": loop(8, "V_MUL_VV gp4, gp1, gp1, 0", "V_ADD_VV gp2, gp4, gp1, 0", "S_ADDI_INT gp1, gp1, 64",
                        "S_ADDI_INT gp2, gp2, 64"),
    # every iteration writes the same 4 columns of the same rows: write-after-write on part
    # of a row (the last iteration's columns stay)
    "same_columns": loop(4, "M_MM 0, gp5, gp1", "M_MM_WO gp2, gp0, 0", "S_ADDI_INT gp1, gp1, 256"),
    # scalar temporaries per iteration, FP SRAM loads, reductions into a reset register
    "scalars": loop(8, "S_LD_FP f3, gp5, 4", "S_ADD_FP f4, f0, f0", "V_RED_SUM f4, gp1", "S_MUL_FP f4, f4, f3",
                    "V_MUL_VF gp2, gp1, f4, 0", "S_ADDI_INT gp1, gp1, 64", "S_ADDI_INT gp2, gp2, 64",
                    "S_ADDI_INT gp5, gp5, 1"),
    # output columns of one row block: M_MM_WO writes 4 columns of the same rows per iteration
    "matrix_columns": loop(8, "M_MM 0, gp5, gp1", "M_MM_WO gp2, gp0, 0", "S_ADDI_INT gp2, gp2, 4",
                           "S_ADDI_INT gp5, gp5, 256"),
    # a K-chunk product loop inside the column loop (unrolled in every lane)
    "k_chunks": loop(4, "S_ADDI_INT gp6, gp5, 0", "S_ADDI_INT gp7, gp1, 0",
                     *loop(2, "M_MM 0, gp6, gp7", "S_ADDI_INT gp6, gp6, 4096", "S_ADDI_INT gp7, gp7, 256", reg=10),
                     "M_MM_WO gp2, gp0, 0", "S_ADDI_INT gp2, gp2, 4", "S_ADDI_INT gp5, gp5, 256"),
    # only M_MM_WO in the body: iteration 0 writes the product made before the loop, the
    # others the accumulator it cleared
    "drain": ["M_MM 0, gp5, gp1", *loop(4, "M_MM_WO gp2, gp0, 0", "S_ADDI_INT gp2, gp2, 256")],
    # FP SRAM runs out in iteration 3: the interpreter's error and pc
    "error_late": [li(5, 1000), *loop(8, "S_LD_FP f3, gp5, 0", "V_MUL_VF gp2, gp1, f3, 0", "S_ADDI_INT gp1, gp1, 64",
                                      "S_ADDI_INT gp2, gp2, 64", "S_ADDI_INT gp5, gp5, 8")],
    # a long loop (a SiLU over 200 rows): the check is linear in the lanes
    "long": [li(2, 64 * 300), *loop(200, "V_MUL_VF gp2, gp1, f1, 0", "V_EXP_V gp2, gp2, 0",
                                     "V_ADD_VF gp2, gp2, f2, 0", "V_RECI_V gp2, gp2, 0", "V_MUL_VV gp2, gp2, gp1, 0",
                                     "S_ADDI_INT gp1, gp1, 64", "S_ADDI_INT gp2, gp2, 64")],
    # row blocks x column tiles (a projection): the outer loop resets the inner loop's
    # registers, every (row block, column tile) pair is a lane
    "nested": loop(3, "S_ADDI_INT gp6, gp5, 0", "S_ADDI_INT gp7, gp2, 0",
                   *loop(4, "M_MM 0, gp6, gp1", "M_MM_WO gp7, gp0, 0", "S_ADDI_INT gp6, gp6, 256",
                         "S_ADDI_INT gp7, gp7, 4", reg=11),
                   "S_ADDI_INT gp1, gp1, 256", "S_ADDI_INT gp2, gp2, 256", reg=10),
    # the inner loop's registers run on across outer iterations (16 columns per outer step)
    "nested_running": loop(3, *loop(4, "M_MM 0, gp5, gp1", "M_MM_WO gp2, gp0, 0", "S_ADDI_INT gp2, gp2, 4",
                                    "S_ADDI_INT gp5, gp5, 256", reg=11),
                           "S_ADDI_INT gp1, gp1, 256", reg=10),
    # every outer iteration writes the same columns: write-after-write across outer iterations
    "nested_same_columns": loop(3, "S_ADDI_INT gp7, gp2, 0",
                                *loop(4, "M_MM 0, gp5, gp1", "M_MM_WO gp7, gp0, 0", "S_ADDI_INT gp7, gp7, 4", reg=11),
                                "S_ADDI_INT gp1, gp1, 256", reg=10),
}


#: the cases whose iterations depend on each other (a read after another iteration's write):
#: their run is redone without lanes. Iterations that write the same elements
#: ("same_columns", "nested_same_columns") are not a conflict: the writes go in in iteration
#: order, so the last one stays, as in the sequential loop.
CONFLICTS = {"running_sum"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loop_runs_as_lanes_identical_to_interpreter(name, monkeypatch):
    from plena.emu_jax import fast

    src = PRELUDE + CASES[name]
    assert loop_kinds(src)[0] == "VL", loop_kinds(src)  # the case's (outermost) loop
    calls = []
    real = fast.prepare
    monkeypatch.setattr(fast, "prepare", lambda *a, **k: calls.append(k.get("lanes", True)) or real(*a, **k))
    a, b = run_both(prog(src), fast_options=dict(hot=1), **_inputs(7))
    assert_same(a, b)
    assert isinstance(a, PlenaError) == (name == "error_late"), a
    assert calls == ([True, False] if name in CONFLICTS else [True])


@pytest.mark.parametrize("body, why", [
    (["V_RED_SUM f1, gp1", "V_MUL_VF gp2, gp1, f1, 0", "S_ADDI_INT gp1, gp1, 64"], "f1 carried across iterations"),
    (["V_ADD_VV gp2, gp1, gp1, 0", "S_ADDI_INT gp1, gp2, 64"], "gp1 carried (not a self-increment)"),
    (["V_EXP_V gp1, gp1, 0", "S_ST_FP f1, gp1, 0", "S_ADDI_INT gp1, gp1, 64"], "writes FP SRAM"),
    (["M_MM 0, gp5, gp1", "V_EXP_V gp2, gp2, 0", "S_ADDI_INT gp1, gp1, 64"], "m_acc carried (no M_MM_WO)"),
    (["S_ADDI_INT gp1, gp1, 64", "S_ADDI_INT gp2, gp2, 64"], "no row work"),
])
def test_loops_that_stay_sequential(body, why):
    assert loop_kinds(PRELUDE + loop(8, *body)) == ["L"], why


def test_nested_lanes_only_around_scalar_work():
    """An outer loop runs its inner loop's lanes only when the rest of its body is scalar."""
    inner = loop(4, "V_EXP_V gp1, gp1, 0", "S_ADDI_INT gp1, gp1, 64", reg=11)
    assert loop_kinds(PRELUDE + loop(3, "S_ADDI_INT gp2, gp2, 64", *inner, reg=10)) == ["VL", "VL"]
    assert loop_kinds(PRELUDE + loop(3, "V_EXP_V gp2, gp2, 0", *inner, "S_ADDI_INT gp2, gp2, 64",
                                     reg=10)) == ["L", "VL"]
    assert loop_kinds(PRELUDE + loop(3, *inner, *inner, reg=10)) == ["L", "VL", "VL"]


@st.composite
def row_loops(draw):
    """A loop of row ops whose address registers move by 0, 1 or 2 rows per iteration (so
    iterations may overlap in any way), inside a plain outer loop."""
    regs = (1, 2, 3, 4)
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        r = lambda: draw(st.sampled_from(regs))  # noqa: E731
        ops.append(draw(st.sampled_from([
            f"V_ADD_VV gp{r()}, gp{r()}, gp{r()}, 0", f"V_MUL_VF gp{r()}, gp{r()}, f1, 0",
            f"V_EXP_V gp{r()}, gp{r()}, 0", f"V_SUB_VF gp{r()}, gp{r()}, f2, 0, 1"])))
    steps = [f"S_ADDI_INT gp{g}, gp{g}, {64 * draw(st.integers(0, 2))}"
             for g in draw(st.lists(st.sampled_from(regs), unique=True, min_size=1))]
    inner = loop(draw(st.integers(2, 6)), *ops, *steps, reg=9)
    return PRELUDE + [li(4, 64 * draw(st.integers(0, 40)))] + loop(2, *inner, reg=10)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(row_loops(), st.integers(0, 2**16))
def test_random_row_loops_identical_to_interpreter(src, seed):
    a, b = run_both(prog(src), fast_options=dict(hot=1), **_inputs(seed))
    assert_same(a, b)


def test_lanes_block_never_copies_a_whole_memory():
    """The lanes, the conflict check, the in-order commit and the plain-loop fallback update
    VRAM in place: the compiled block has no copy of VRAM, MRAM or HBM. The commit writes
    rows one by one in iteration order: no scatter into VRAM and no sort of write keys."""
    import re

    from plena.config import default_config
    from plena.emu_jax import fast
    from plena.emu_jax.plan import plan_program
    from plena.emu_jax.state import init_state

    cfg = default_config()
    p = api.load_program(prog(PRELUDE + CASES["rows"] + CASES["matrix_columns"]))
    geo = api.geometry_for(p, cfg, plan_program(p, cfg), hbm_len=0, vram_len=0, hbm_capacity=1 << 20)
    ex = fast.prepare(p, geo, init_state(geo, hbm_capacity=1 << 20), hot=1)
    sigs = [s.sig for s in ex.steps if isinstance(s, fast.Block)]
    assert any(_has_kind(sig, "VL") for sig in sigs)
    big = {f"u16[{geo.vram_rows + 1},{cfg.vlen}]", f"f32[{geo.mram_tiles + 1},{cfg.mlen},{cfg.mlen}]",
           f"u8[{geo.hbm_bytes + geo.hbm_pad}]"}
    for sig in sigs:
        hlo = ex.compiled[sig].as_text()
        copies = [ln for ln in hlo.splitlines()
                  if re.search(r"\bcopy\(", ln) and any(b in ln.split("=")[1][:40] for b in big)]
        assert not copies, copies[:3]
        vram = f"u16[{geo.vram_rows + 1},{cfg.vlen}]"
        scatters = [ln for ln in hlo.splitlines() if re.search(r"\bscatter\(", ln) and vram in ln.split("=")[1][:40]]
        assert not scatters and not re.search(r"\bsort\(", hlo), (scatters[:2], "sort(" in hlo)


def test_nested_lanes_gather_operands_per_loop_not_per_pair():
    """In row blocks x column tiles ("nested": 3 x 4 lanes), the activation rows depend on the
    outer loop only and the weight columns on the inner one (vectorise.LaneRegs keeps each gp
    register its own vmap leaf): the block gathers [3, BLEN, MLEN] rows and [4, MLEN, BLEN]
    columns, never one copy of either per (row block, column tile) pair, and the result is the
    interpreter's."""
    import re

    from plena.config import default_config
    from plena.emu_jax import fast
    from plena.emu_jax.plan import plan_program
    from plena.emu_jax.state import init_state

    cfg = default_config()
    p = api.load_program(prog(PRELUDE + CASES["nested"]))
    geo = api.geometry_for(p, cfg, plan_program(p, cfg), hbm_len=0, vram_len=0, hbm_capacity=1 << 20)
    ex = fast.prepare(p, geo, init_state(geo, hbm_capacity=1 << 20), hot=1)
    (sig,) = [s.sig for s in ex.steps if isinstance(s, fast.Block) and _has_kind(s.sig, "VL")]
    shapes = set(re.findall(r"f32\[[0-9,]+\]", ex.compiled[sig].as_text()))
    m, b = cfg.mlen, cfg.blen
    assert f"f32[4,{m},{b}]" in shapes and f"f32[3,{b},{m}]" in shapes, shapes
    assert not shapes & {f"f32[3,4,{m},{b}]", f"f32[3,4,{b},{m}]", f"f32[12,{m},{b}]", f"f32[12,1,{m},{b}]"}, shapes
    a, b_ = run_both(prog(PRELUDE + CASES["nested"]), fast_options=dict(hot=1), **_inputs(3))
    assert_same(a, b_)


def test_a_row_rewritten_in_place_keeps_only_its_last_write(monkeypatch):
    """In "rows" each iteration rewrites its row gp1 twice in place (V_MUL_VF, V_EXP_V) and
    writes gp2 once: the lane keeps one write per row (the register has not moved between the
    in-place writes, so the later one replaces the earlier), so its commit holds 2 row writes
    per iteration, not 3; and the result is the interpreter's."""
    from plena.emu_jax import fast, vectorise

    monkeypatch.setattr(fast, "_BLOCKS", {})  # trace the block again, even if an earlier test compiled it
    seen = []
    real = vectorise._commit_in_order
    monkeypatch.setattr(vectorise, "_commit_in_order",
                        lambda geo, vram, whole, span: seen.append(whole[0].shape) or real(geo, vram, whole, span))
    a, b = run_both(prog(PRELUDE + CASES["rows"]), fast_options=dict(hot=1), **_inputs(5))
    assert_same(a, b)
    assert seen == [(8, 2)], seen


@pytest.mark.parametrize("name", ["matrix_columns", "nested"])
def test_lanes_with_write_outs_leave_no_scatter(name):
    """An M_MM_WO in a lane writes the BLEN-wide span it read as zeros: the span is the data
    itself, with no update at the lane's column (under vmap a dynamic_update_slice at a
    batched column becomes a scatter, and a scatter keeps XLA:CPU from compiling the loops
    around it as one function: the ci_flash matmul loop compiled in 2.8 instead of 0.95
    CPU-s). Wrapped in a plain loop, the whole block compiles without a scatter, and the
    result is the interpreter's."""
    import re

    from plena.config import default_config
    from plena.emu_jax import fast
    from plena.emu_jax.plan import plan_program
    from plena.emu_jax.state import init_state

    src = PRELUDE + loop(2, *CASES[name], reg=12)
    cfg = default_config()
    p = api.load_program(prog(src))
    geo = api.geometry_for(p, cfg, plan_program(p, cfg), hbm_len=0, vram_len=0, hbm_capacity=1 << 20)
    ex = fast.prepare(p, geo, init_state(geo, hbm_capacity=1 << 20), hot=1)
    sigs = [s.sig for s in ex.steps if isinstance(s, fast.Block)]
    assert any(_has_kind(sig, "VL") for sig in sigs)
    for sig in sigs:
        hlo = ex.compiled[sig].as_text()
        assert not re.search(r"\bscatter\(", hlo), [ln for ln in hlo.splitlines() if "scatter(" in ln][:2]
    a, b = run_both(prog(src), fast_options=dict(hot=1), **_inputs(7))
    assert_same(a, b)
