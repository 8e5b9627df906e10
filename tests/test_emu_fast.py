"""The specialising executor (plena.emu_jax.fast) against the reference interpreter: identical
final state (every field, bit for bit) or the identical error, on conformance programs and on
hypothesis-generated programs with loops, masks, MX transfers and matrix ops."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asm_helpers import li, prog
from conftest import CONFORMANCE
from plena.config import default_config
from plena.emu_jax import api, fast, structure
from plena.emu_jax.errors import PlenaError
from plena.emu_jax.plan import plan_program
from plena.isa.memfile import read_mem

CFG = default_config()


def _bits(x):
    return np.asarray(x).tobytes()


def run_both(words, cfg=CFG, fast_options=None, **inputs):
    """(interpreter result or error, fast result or error)."""
    out = []
    for ex in ("interpreter", "fast"):
        try:
            out.append(api.run(words, cfg, executor=ex, fast_options=fast_options, **inputs))
        except PlenaError as e:
            out.append(e)
    return out


def assert_same(a, b):
    if isinstance(a, PlenaError) or isinstance(b, PlenaError):
        assert type(a) is type(b) and str(a) == str(b), (a, b)
        return
    assert b.executor == "fast"
    diff = [k for k in a.state._fields if _bits(getattr(a.state, k)) != _bits(getattr(b.state, k))]
    assert not diff, f"fields differ: {diff}"
    assert (a.instructions, a.cycles, a.opcode_counts) == (b.instructions, b.cycles, b.opcode_counts)


# ------------------------------------------------------------------------------------------
# structure: parse / fold / schedule
def test_parse_rejects_what_only_the_interpreter_handles():
    from plena.emu_jax.api import load_program

    for src in ("C_LOOP_START gp1, 2\nC_BREAK\nC_LOOP_END gp1",  # C_BREAK
                "C_LOOP_START gp1, 5\nS_ADDI_INT gp1, gp0, 1\nC_LOOP_END gp1",  # body writes its counter
                "C_LOOP_START gp1, 2\nC_LOOP_START gp2, 2\nC_LOOP_END gp1\nC_LOOP_END gp2",  # crossed
                "C_LOOP_START gp1, 0\nC_LOOP_END gp1",  # count 0
                "C_LOOP_START gp1, 2\nS_ADDI_INT gp2, gp2, 1"):  # never closed
        with pytest.raises(structure.Malformed):
            structure.parse(load_program(prog(src)))
        assert not api.fast_eligible(plan_program(load_program(prog(src)), CFG), None)


def test_reroll_folds_repeats_that_differ_only_in_immediates():
    from plena.emu_jax.api import load_program

    body = "\n".join(f"S_ADDI_INT gp1, gp0, {64 * k}\nV_ADD_VV gp2, gp1, gp1, 0" for k in range(10))
    p = load_program(prog(body))
    items, sigs = structure.parse(p)
    folded = structure.reroll(items, sigs)
    assert len(folded) == 1 and isinstance(folded[0], structure.Repeat) and folded[0].times == 10
    ops = structure.operands(folded[0], p)
    # per copy: the constant (S_ADDI_INT gp1, gp0, v is a structure.Const), then V_ADD_VV's pc, imm18, imm22
    assert ops[0::4] == [64 * k for k in range(10)]  # the constants, as operands
    # the same code at other addresses has the same signature tree (shares compiled code)
    other = load_program(prog(body.replace("64 *", "128 *").replace(", 64", ", 128")))
    items2, sigs2 = structure.parse(other)
    assert structure.signature_tree(structure.reroll(items2, sigs2), sigs2) == structure.signature_tree(folded, sigs)


def test_runs_of_one_instruction_of_any_length_share_code():
    """The rows of a causal mask: row r stores r + 1 times one value, then 7 - r times another.
    Each run of one instruction whose operands step evenly is an affine repeat (its length an
    operand), so the rows fold into one repeat of four items, and the program runs as the
    interpreter runs it. A run whose immediates do not step evenly stays a plain repeat, and
    without the program (its immediates) nothing is affine."""
    rows = []
    for r in range(7):
        rows += [f"S_ST_FP f1, gp0, {i}" for i in range(r + 1)] + [f"S_ST_FP f2, gp0, {i}" for i in range(r + 1, 8)]
        rows += ["S_MAP_V_FP gp1, gp0, 0", "S_ADDI_INT gp1, gp1, 64"]
    p = api.load_program(prog(rows))
    items, sigs = structure.parse(p)
    folded = structure.reroll(items, sigs, prog=p)
    key = lambda pc: structure.instr_key(p, pc)  # noqa: E731
    # row 0's first store, then (row r's second run, its map and increment, row r+1's first run) x 6
    assert structure.signature_tree(folded, sigs) == (
        key(0), ("R", 6, (("RA", (key(1),)), key(8), key(9), ("RA", (key(0),)))), key(67), key(68), key(69))
    copy0 = folded[1].copies[0]
    first, step = structure.operands(copy0[0], p)[:4], structure.operands(copy0[0], p)[4:]
    assert first[:3] == [7, 1, 1] and step[:2] == [1, 1]  # 7 stores from pc 1, imm 1; pc and imm + 1
    assert structure.operands(copy0[3], p)[:3] == [2, 10, 0]  # row 1: 2 stores from pc 10, imm 0
    assert "RA" not in str(structure.signature_tree(structure.reroll(items, sigs), sigs))
    uneven = api.load_program(prog([f"S_ST_FP f1, gp0, {i}" for i in (0, 1, 2, 4)]))
    items, sigs = structure.parse(uneven)
    assert structure.signature_tree(structure.reroll(items, sigs, prog=uneven), sigs)[0][0] == "R"
    a, b = run_both(prog(rows + ["S_ADDI_INT gp1, gp0, 0", "C_LOOP_START gp3, 64", "V_ADD_VV gp2, gp1, gp1, 0",
                                 "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp3"]), fast_options=dict(hot=1))
    assert_same(a, b)


def test_constant_idioms_share_one_signature():
    """S_ADDI_INT gX, gp0, v / S_LUI_INT gX, hi / S_LUI_INT + S_ADDI_INT gX, gX, lo all load a
    constant: one ("K", X) signature with the value as operand, so code that loads small and
    large addresses folds together (and gp0 written anywhere makes the first form ordinary)."""
    from plena.emu_jax.api import load_program

    values = [5, 1 << 20, (1 << 20) + 7, 0xFFFFF123, 3]
    body = "\n".join(f"{li(1, v)}\nV_ADD_VV gp2, gp1, gp1, 0" for v in values)
    p = load_program(prog(body))
    items, sigs = structure.parse(p)
    consts = [it for it in items if isinstance(it, structure.Const)]
    assert [c.value for c in consts] == values and all(sigs.keys[c.sig] == ("K", 1) for c in consts)
    assert [c.end - c.pc for c in consts] == [1, 1, 2, 2, 1]
    folded = structure.reroll(items, sigs)
    assert len(folded) == 1 and folded[0].times == len(values)
    assert structure.operands(folded[0], p)[0::4] == [v - (1 << 32) if v >= 1 << 31 else v for v in values]
    written = load_program(prog("S_ADDI_INT gp0, gp0, 1\nS_ADDI_INT gp1, gp0, 5\nS_LUI_INT gp2, 7"))
    items, sigs = structure.parse(written)
    assert [type(it).__name__ for it in items] == ["Instr", "Instr", "Const"]


def test_known_register_values_fold_into_register_sets():
    """Top-level register-only code with results known before the run becomes one Regs item
    (one shared signature); code whose result depends on INT SRAM data stays; the run is
    identical to the interpreter's."""
    from plena.emu_jax import regfold
    from plena.emu_jax.api import load_program

    src = [li(1, 4096), "C_SET_ADDR_REG a1, gp0, gp1", "S_ADDI_INT gp2, gp1, 64", "C_SET_SCALE_REG gp2",
           li(3, 0x12345678), "C_SET_V_MASK_REG gp3", "V_ADD_VV gp1, gp2, gp2, 1",
           "S_LD_INT gp4, gp0, 3", "S_ADDI_INT gp5, gp4, 64", "V_ADD_VV gp5, gp1, gp2, 0",
           "C_LOOP_START gp6, 3", "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp6", "S_ADDI_INT gp7, gp1, 1",
           "V_ADD_VV gp7, gp1, gp1, 0"]
    p = load_program(prog(src))
    items, sigs = structure.parse(p)
    ints = np.arange(1024, dtype=np.uint32) * 64
    out = regfold.fold(items, p, CFG, ints, sigs)
    regs = [it for it in out if isinstance(it, structure.Regs)]
    assert all(sigs.keys[r.sig] == ("G",) for r in regs)
    first = regs[0].values
    assert (first[1], first[2], first[3], first[16 + 1], first[32 + 1], first[48], first[50]) == \
        (4096, 4160, 0x12345678, 0, 4096, 4160, 0x12345678)
    assert first[4] is None and first[49] is None  # not written by the run
    # S_LD_INT reads data: it and what follows it stay instructions when INT SRAM is unknown to
    # the fold (intsram given: S_LD_INT is no register-only op, but gp5 = gp4 + 64 is known)
    assert regs[1].values[5] == 3 * 64 + 64
    assert regs[2].values[7] == 4096 + 3 * 64 + 1  # after the loop: the pre-pass's value
    a, b = run_both(prog(src), intsram=ints)
    assert_same(a, b)


def test_structured_plan_equals_linear_walk_and_skips_iterations():
    from plena.emu_jax.api import load_program

    src = [li(1, 0), li(2, 4096), "C_LOOP_START gp3, 50", "C_LOOP_START gp4, 7", "S_ADDI_INT gp1, gp1, 64",
           "V_ADD_VV gp1, gp1, gp1, 0", "S_ADD_INT gp5, gp2, gp1", "C_LOOP_END gp4", "S_ADDI_INT gp2, gp2, 8",
           "C_LOOP_END gp3"]
    p = load_program(prog(src))
    a = plan_program(p, CFG)
    b = plan_program(p, CFG, structured=False)
    assert a.structured and not b.structured
    assert (a.dynamic_instructions, a.vram_rows, a.loop_depth, a.counts, a.skipped) == \
        (b.dynamic_instructions, b.vram_rows, b.loop_depth, b.counts, b.skipped)
    assert a.vram_rows == 50 * 7 + 1


# ------------------------------------------------------------------------------------------
# conformance programs
CASES = ["aten_linear", "aten_flash_attention_gqa", "aten_flash_attention_gqa_causal", "moe_combine", "de_h_store", "de_bmm", "de_flashattn_decode"]


@pytest.mark.parametrize("name", CASES)
def test_conformance_program_identical_to_interpreter(name):
    if not CONFORMANCE.is_dir():
        pytest.skip("../shared/conformance is absent")
    from plena.verify.conformance import load_case

    case = load_case(CONFORMANCE / name)
    from plena.config import load_config

    cfg = load_config(case.settings_toml)
    ints = None
    if case.int_sram_bin is not None and case.int_sram_bin.exists():
        ints = np.fromfile(case.int_sram_bin, np.uint32)
    a, b = run_both(read_mem(case.program_mem), cfg, hbm=np.fromfile(case.hbm_bin, np.uint8),
                    fpsram=np.fromfile(case.fp_sram_bin, np.uint16), intsram=ints, hbm_size=case.hbm_size,
                    fast_options=dict(hot=4))
    assert_same(a, b)


# ------------------------------------------------------------------------------------------
# random programs
VREGS = (1, 2, 3)  # VRAM row addresses (multiples of VLEN)
MREG = 4  # MRAM tile address
OREG = 5  # HBM offset
FREGS = (1, 2, 3)


def _instr(draw):
    v = lambda: draw(st.sampled_from(VREGS))  # noqa: E731
    f = lambda: draw(st.sampled_from(FREGS))  # noqa: E731
    mask = draw(st.sampled_from([0, 0, 1]))
    kind = draw(st.integers(0, 15))
    return [
        lambda: f"S_ADDI_INT gp{v()}, gp{v()}, {64 * draw(st.integers(0, 3))}",
        lambda: f"V_ADD_VV gp{v()}, gp{v()}, gp{v()}, {mask}",
        lambda: f"V_MUL_VF gp{v()}, gp{v()}, f{f()}, {mask}",
        lambda: f"V_SUB_VF gp{v()}, gp{v()}, f{f()}, {mask}, {draw(st.integers(0, 1))}",
        lambda: f"V_EXP_V gp{v()}, gp{v()}, {mask}",
        lambda: f"V_RED_SUM f{f()}, gp{v()}",
        lambda: f"V_RED_MAX f{f()}, gp{v()}, 0",
        lambda: f"S_ADD_FP f{f()}, f{f()}, f{f()}",
        lambda: f"S_MUL_FP f{f()}, f{f()}, f{f()}",
        lambda: f"S_RECI_FP f{f()}, f{f()}",
        lambda: f"S_ST_FP f{f()}, gp0, {draw(st.integers(0, 40))}",
        lambda: f"S_LD_FP f{f()}, gp0, {draw(st.integers(0, 40))}",
        lambda: f"M_MM 0, gp{MREG}, gp{v()}",
        lambda: f"M_MM_WO gp{v()}, gp0, 0",
        lambda: f"H_PREFETCH_V gp{v()}, gp{OREG}, a0, 1, 0",
        lambda: f"H_STORE_V gp{v()}, gp{OREG}, a0, 1, 0",
    ][kind]()


@st.composite
def programs(draw):
    lines = [li(1, 0), li(2, 64), li(3, 128), li(MREG, 0), li(OREG, 0), li(6, 1 << 16),
             "C_SET_ADDR_REG a0, gp0, gp6", li(7, 0b0101), "C_SET_V_MASK_REG gp7",
             li(7, 4096), "C_SET_SCALE_REG gp7", li(7, 64), "C_SET_STRIDE_REG gp7",
             "S_LD_FP f1, gp0, 1", "S_LD_FP f2, gp0, 2", "S_LD_FP f3, gp0, 3",
             f"H_PREFETCH_M gp{MREG}, gp{OREG}, a0, 1, 0"]
    loop_regs = iter((8, 9, 10, 11, 12, 13))

    def block(depth):
        out = []
        for _ in range(draw(st.integers(1, 4))):
            if depth < 2 and draw(st.integers(0, 3)) == 0:
                reg = next(loop_regs, None)
                if reg is None:
                    continue
                body = block(depth + 1)
                step = [f"S_ADDI_INT gp{r}, gp{r}, 64" for r in draw(st.lists(st.sampled_from(VREGS), max_size=2))]
                out += [f"C_LOOP_START gp{reg}, {draw(st.integers(1, 6))}", *body, *step, f"C_LOOP_END gp{reg}"]
            else:
                out.append(_instr(draw))
        return out

    return lines + block(0)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    hbm = rng.integers(0, 256, 1 << 17, dtype=np.uint8)
    hbm[1 << 16:] = rng.integers(0x30, 0x48, (1 << 17) - (1 << 16), dtype=np.uint8)  # modest E4M3 values
    fps = (rng.standard_normal(64).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    vram = (rng.standard_normal(64 * 64).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return dict(hbm=hbm, fpsram=fps, vram=vram, hbm_size=1 << 20)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(programs(), st.integers(0, 2**16))
def test_random_programs_identical_to_interpreter(src, seed):
    words = prog(src)
    a, b = run_both(words, fast_options=dict(hot=1), **_inputs(seed))
    assert_same(a, b)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(programs(), st.integers(0, 2**16))
def test_random_programs_as_one_instruction_steps_identical_to_interpreter(src, seed):
    """Everything cold, run as one-instruction steps (loops unrolled on the host)."""
    words = prog(src)
    a, b = run_both(words, fast_options=dict(hot=10**9, eager_max=10**9), **_inputs(seed))
    assert_same(a, b)


def _schedule(src, **kw):
    """The schedule of a program (cold code on the interpreter unless ``eager_max`` is given)."""
    from plena.emu_jax import dispatch

    p = api.load_program(prog(src))
    items, sigs = structure.parse(p)
    items = structure.reroll(items, sigs)
    return fast.schedule(items, p, sigs, micro=dispatch.micro_steps(CFG), **{"eager_max": 0, **kw})


def _kinds(steps):
    return ["interp" if isinstance(s, fast.Interp) else "block" for s in steps]


def test_schedule_weighs_interpreter_cost_in_micro_steps():
    """An instruction run once is compiled when the interpreter would run enough micro-steps
    for it (H_PREFETCH_M: MLEN rows), not when it is one cheap step (V_ADD_VV)."""
    assert _kinds(_schedule(["H_PREFETCH_M gp1, gp2, a0, 1, 0"], hot=32)) == ["block"]
    assert _kinds(_schedule(["V_ADD_VV gp1, gp2, gp2, 0"], hot=32)) == ["interp"]
    assert _kinds(_schedule(["H_PREFETCH_M gp1, gp2, a0, 1, 0"], hot=CFG.hbm_m_prefetch_amount + 1)) == ["interp"]


def test_schedule_joins_short_cold_runs_and_starts_blocks_at_large_items():
    """A short cold run between hot loops is compiled with them (no interpreter step); a
    longer one, or any with absorb=0, stays on the interpreter (cold_max=0: not compiled
    because it is small in all); an item of at least ``unit`` instructions starts a block of
    its own."""
    hot_loop = ["C_LOOP_START gp3, 64", "V_ADD_VV gp1, gp2, gp2, 0", "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp3"]
    short, long_ = ["S_LD_FP f1, gp0, 1", "S_LD_FP f2, gp0, 2"], [f"S_LD_FP f{r}, gp0, {r}" for r in (1, 2, 3)]
    assert _kinds(_schedule(hot_loop + short + hot_loop)) == ["block"]
    assert _kinds(_schedule(hot_loop + short + hot_loop, absorb=0, cold_max=0)) == ["block", "interp", "block"]
    assert _kinds(_schedule(hot_loop + long_ + hot_loop, cold_max=0)) == ["block", "interp", "block"]
    big_loop = ["C_LOOP_START gp3, 64", *[f"V_ADD_VV gp1, gp2, gp{r}, 0" for r in (2, 4, 5, 6, 7, 8, 9, 10)],
                "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp3"]  # 9 instructions
    steps = _schedule(hot_loop + big_loop + hot_loop, unit=8)  # the small loop after it joins it
    assert _kinds(steps) == ["block", "block"] and [len(s.sig) for s in steps] == [1, 2]
    assert _kinds(_schedule(hot_loop + big_loop + hot_loop, unit=0)) == ["block"]
    a, b = run_both(prog(hot_loop + short + hot_loop))
    assert_same(a, b)


def test_schedule_compiles_little_cold_code_with_the_blocks():
    """When blocks are made anyway and the cold code is at most ``cold_max`` instructions in
    all, it is compiled too (no interpreter to compile); more cold code, or a program without
    hot code, stays on the interpreter."""
    hot_loop = ["C_LOOP_START gp3, 64", "V_ADD_VV gp1, gp2, gp2, 0", "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp3"]
    other_loop = [x.replace("V_ADD_VV", "V_MUL_VV") for x in hot_loop]
    cold = [f"S_LD_FP f{1 + r % 7}, gp0, {r}" for r in range(6)]
    src = hot_loop + cold + other_loop + cold
    assert _kinds(_schedule(src, cold_max=11)) == ["block", "interp", "block", "interp"]
    steps = _schedule(src, cold_max=12)
    assert _kinds(steps) == ["block"] and sum(s.size for s in steps) == 2 * 2 + 12  # loop bodies and the cold code
    assert _kinds(_schedule(cold, cold_max=64)) == ["interp"]
    a, b = run_both(prog(src))
    assert_same(a, b)


def _record_lowering(monkeypatch, what) -> list:
    """Compile every block afresh, through a fast.run_compiled that appends ``what(sig,
    lowered)`` for each block it lowers to the list returned."""
    real, seen = fast.run_compiled, []

    class Recording:
        def lower(self, geo, sig, *args):
            out = real.lower(geo, sig, *args)
            seen.append(what(sig, out))
            return out

        def clear_cache(self):
            real.clear_cache()

    monkeypatch.setattr(fast, "_BLOCKS", {})
    monkeypatch.setattr(fast, "run_compiled", Recording())
    return seen


def test_short_cold_code_runs_as_one_instruction_steps(monkeypatch):
    """Cold code of at most ``eager_max`` dynamic instructions runs one instruction per step,
    each opcode compiled once for any registers and immediates (no interpreter is compiled);
    loop counters, constants and an fp-destination no-op come out as the interpreter leaves
    them. More cold code than ``eager_max`` stays on the interpreter."""
    hot_loop = ["C_LOOP_START gp3, 64", "V_ADD_VV gp1, gp2, gp2, 0", "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp3"]
    cold = [li(5, 70000), "S_LD_FP f1, gp0, 1", "S_LD_FP f2, gp0, 2", "S_ADD_FP f0, f1, f2",
            "C_LOOP_START gp4, 3", "S_ADD_FP f3, f1, f3", "S_ST_FP f3, gp5, 0", "S_ADDI_INT gp5, gp5, 1", "C_LOOP_END gp4",
            "V_MUL_VF gp2, gp2, f3, 0"]
    src = cold + hot_loop + cold
    steps = _schedule(src, eager_max=64, cold_max=0)
    ones = [s for s in steps if fast._one_instruction(s)]
    assert not any(isinstance(s, fast.Interp) for s in steps) and len(steps) - len(ones) == 1
    by_op = {}
    for s in ones:
        if len(s.sig) == 2:
            by_op.setdefault(s.sig[1][1], []).append(s)
    names = {structure.BY_MNEMONIC[m].code: m for m in ("S_LD_FP", "S_ADD_FP", "S_ST_FP", "S_ADDI_INT", "V_MUL_VF")}
    # per copy of the cold code: 2 loads, 3 adds, stores and increments (the loop unrolled), 1
    # multiply; S_ADD_FP f0 writes nothing (no step); the constant and the loop counter are sets
    assert {names[k]: len(v) for k, v in by_op.items()} == \
        {"S_LD_FP": 4, "S_ADD_FP": 6, "S_ST_FP": 6, "S_ADDI_INT": 6, "V_MUL_VF": 2}
    per_copy = plan_program(api.load_program(prog(cold)), CFG).dynamic_instructions
    assert sum(s.dyn for s in ones) == 2 * per_copy == 2 * 18  # 1 + 2 + 1 + (1 + 3 * 4) + 1
    assert _kinds(_schedule(src, eager_max=35, cold_max=0)) == ["interp", "block", "interp"]
    compiled = _record_lowering(monkeypatch, lambda sig, lowered: sig)
    a, b = run_both(prog(src), fast_options=dict(eager_max=64, cold_max=0))
    assert_same(a, b)
    assert len(compiled) == len(set(compiled)) == len({s.sig for s in steps})  # one compile per opcode


@pytest.mark.parametrize("split_repeat", [4, 1000])
def test_a_dominant_blocks_big_repeats_compile_in_halves(monkeypatch, split_repeat):
    """In a block with more than half of the instructions to compile, a repeat whose body
    emits at least SPLIT_REPEAT instructions runs as two one-trip loops behind a sort (XLA
    then compiles the halves as two functions, in parallel); the result is the same."""
    src = []
    for k in range(4):
        src += [f"S_ADDI_INT gp1, gp0, {64 * k}", "V_ADD_VV gp2, gp1, gp1, 0", "V_MUL_VV gp3, gp1, gp2, 0",
                "V_EXP_V gp4, gp3, 0", "S_ADD_FP f1, f1, f2"]
    monkeypatch.setattr(fast, "SPLIT_REPEAT", split_repeat)
    lowered = _record_lowering(monkeypatch, lambda sig, out: out.as_text())
    a, b = run_both(prog(src), fast_options=dict(hot=1))
    assert_same(a, b)
    assert len(lowered) == 1 and ("stablehlo.sort" in lowered[0]) == (split_repeat == 4)


def test_long_schedules_get_larger_blocks(monkeypatch):
    """A schedule of more than LONG_STEPS steps is made again with blocks of up to
    MAX_BLOCK_LONG instructions (fewer host calls); a short one keeps MAX_BLOCK, and an
    explicit max_block is used as given."""
    # hot loops of 9 instructions, each a block of its own at MAX_BLOCK = 9
    loops = [["C_LOOP_START gp3, 64", *[f"V_ADD_VV gp1, gp2, gp{r}, 0" for r in range(2 + i, 10 + i)],
              "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp3"] for i in range(5)]
    monkeypatch.setattr(fast, "MAX_BLOCK", 9)
    monkeypatch.setattr(fast, "MAX_BLOCK_LONG", 18)
    monkeypatch.setattr(fast, "LONG_STEPS", 4)
    src = [x for loop in loops for x in loop]
    assert [s.size for s in _schedule(src, max_block=9, unit=0)] == [9] * 5
    assert [s.size for s in _schedule(src, unit=0)] == [18, 18, 9]  # 5 steps > LONG_STEPS
    assert [s.size for s in _schedule(src[: 4 * 11], unit=0)] == [9] * 4  # 4 steps: MAX_BLOCK kept
    a, b = run_both(prog(src))
    assert_same(a, b)


def test_blocks_are_traced_one_at_a_time_biggest_first(monkeypatch):
    """Tracing holds the GIL: prepare() traces one block at a time, the biggest first, so its
    XLA compile (the longest) starts as soon as it alone is traced."""
    import time

    ops = ("V_ADD_VV", "V_MUL_VV", "V_SUB_VV")
    loops = [["C_LOOP_START gp3, 64", *[f"{ops[i % 3]} gp1, gp2, gp2, 0" for i in range(n)],
              "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp3"] for n in (1, 8)]
    src = [li(1, 64 * 64)] + loops[0] + loops[1]  # rows written (from 64) never read (row 0)
    traced, sizes, real_lower, real_schedule = [], {}, fast.run_compiled.lower, fast.schedule

    def schedule(*args, **kw):
        steps = real_schedule(*args, **kw)
        sizes.update({s.sig: s.size for s in steps if isinstance(s, fast.Block)})
        return steps

    class Recording:  # fast.run_compiled, recording when each block is traced
        def lower(self, geo, sig, *args):
            t0 = time.perf_counter()
            out = real_lower(geo, sig, *args)
            traced.append((sizes[sig], t0, time.perf_counter()))
            return out

        def clear_cache(self):
            fast.run_compiled_real.clear_cache()

    monkeypatch.setattr(fast, "run_compiled_real", fast.run_compiled, raising=False)
    monkeypatch.setattr(fast, "run_compiled", Recording())
    monkeypatch.setattr(fast, "schedule", schedule)
    monkeypatch.setattr(fast, "_BLOCKS", {})
    a, b = run_both(prog(src), fast_options=dict(unit=2))
    assert_same(a, b)
    assert len(traced) == len(sizes) >= 2
    assert [t[0] for t in traced] == sorted(sizes.values(), reverse=True)
    assert all(prev[2] <= nxt[1] for prev, nxt in zip(traced, traced[1:]))  # one at a time


def test_error_inside_a_compiled_loop_reports_the_interpreters_pc():
    src = [li(1, 0), "C_LOOP_START gp2, 5", "V_ADD_VV gp1, gp1, gp1, 0", "S_ADDI_INT gp1, gp1, 96",
           "C_LOOP_END gp2"]  # the second iteration's address is not a multiple of VLEN
    a, b = run_both(prog(src), fast_options=dict(hot=1))
    assert isinstance(a, PlenaError) and str(a) == str(b)
    assert a.pc == 2


def test_scalar_stores_in_compiled_loops_match_the_interpreter():
    """S_ST_INT / S_ST_FP write their word in place in compiled code: the stored words, and
    the error (with its pc) when an index leaves the 1024-word SRAM, are the interpreter's."""
    def src(iterations):
        return [li(1, 0), "S_LD_FP f1, gp0, 2", f"C_LOOP_START gp2, {iterations}", "S_ADDI_INT gp3, gp3, 7",
                "S_ST_INT gp3, gp1, 3", "S_ST_FP f1, gp1, 900", "S_ADDI_INT gp1, gp1, 40", "C_LOOP_END gp2"]

    fps = np.arange(64, dtype=np.uint16) + 0x3F00
    a, b = run_both(prog(src(4)), fast_options=dict(hot=1), fpsram=fps)  # indices up to 1020
    assert_same(a, b)
    assert not isinstance(b, PlenaError) and int(np.asarray(b.state.intsram)[123]) == 28
    a, b = run_both(prog(src(5)), fast_options=dict(hot=1), fpsram=fps)  # the fifth S_ST_FP: 1060
    assert isinstance(b, PlenaError)
    assert_same(a, b)


def test_blocks_never_copy_a_whole_memory():
    """The compiled HLO of a block has no copy of VRAM, MRAM or HBM (an in-place update only)."""
    import re

    from plena.emu_jax.api import geometry_for, load_program
    from plena.emu_jax.state import init_state

    src = [li(1, 0), li(2, 0), li(3, 1 << 16), "C_SET_ADDR_REG a0, gp0, gp3", li(4, 4096), "C_SET_SCALE_REG gp4",
           "C_LOOP_START gp5, 8", "H_PREFETCH_V gp1, gp2, a0, 1, 0", "V_RED_SUM f1, gp1", "V_MUL_VF gp1, gp1, f1, 0",
           "V_EXP_V gp1, gp1, 0", "M_MM 0, gp0, gp1", "M_MM_WO gp1, gp0, 0", "H_STORE_V gp1, gp2, a0, 1, 0",
           "H_PREFETCH_M gp0, gp2, a0, 1, 0", "S_ADDI_INT gp1, gp1, 64", "S_ADDI_INT gp2, gp2, 64",
           "C_LOOP_END gp5"]
    p = load_program(prog(src))
    plan = plan_program(p, CFG)
    geo = geometry_for(p, CFG, plan, hbm_len=0, vram_len=0, hbm_capacity=1 << 20)
    ex = fast.prepare(p, geo, init_state(geo, hbm_capacity=1 << 20), hot=1)
    blocks = [s for s in ex.steps if isinstance(s, fast.Block)]
    assert any(sig[0] == "L" for b in blocks for sig in b.sig)  # the loop is compiled
    big = {f"u16[{geo.vram_rows + 1},{CFG.vlen}]", f"f32[{geo.mram_tiles + 1},{CFG.mlen},{CFG.mlen}]",
           f"u8[{geo.hbm_bytes + geo.hbm_pad}]"}
    for block in blocks:
        hlo = ex.compiled[block.sig].as_text()
        copies = [ln for ln in hlo.splitlines()
                  if re.search(r"\bcopy\(", ln) and any(b in ln.split("=")[1][:40] for b in big)]
        assert not copies, copies[:3]


def test_batched_head_writeback_does_not_copy_the_accumulator_per_row():
    """M_BMM_WO writes BA*MLEN rows from the batched-head accumulator (BA x MLEN x MLEN f32).
    Its rows are computed at once and only the last clears the accumulator: a row loop that
    carried the accumulator copied it on every row (256 copies of 64 KiB per instruction).
    Only the hardware loop may carry it."""
    import re

    from plena.emu_jax.api import geometry_for, load_program
    from plena.emu_jax.state import init_state

    src = [li(1, 0), li(2, 4096), "C_LOOP_START gp5, 4", "M_BTMM 0, gp0, gp1", "M_BMM_WO gp2, 0",
           "C_LOOP_END gp5"]
    p = load_program(prog(src))
    geo = geometry_for(p, CFG, plan_program(p, CFG), hbm_len=0, vram_len=0, hbm_capacity=1 << 20)
    ex = fast.prepare(p, geo, init_state(geo, hbm_capacity=1 << 20), hot=1)
    hlo = "\n".join(ex.compiled[s.sig].as_text() for s in ex.steps if isinstance(s, fast.Block))
    acc = rf"f32\[{CFG.broadcast_amount},{CFG.mlen},{CFG.mlen}\]"
    assert re.search(acc, hlo), "the accumulator is not in the HLO: the check would be vacuous"
    # (M_BTMM's product is a loop over its HLEN k steps whose partial sum has the accumulator's
    # shape: plena.numerics.matmul)
    product = f'"known_trip_count":{{"n":"{CFG.hlen - 1}"}}'
    carriers = [ln for ln in hlo.splitlines() if re.search(r" while\(", ln) and re.search(acc, ln.split("while(")[0])
                and product not in ln]
    assert len(carriers) == 1, carriers  # the hardware loop only, no per-row loop
    a, b = run_both(prog(src), fast_options=dict(hot=1), vram=np.arange(64 * 64, dtype=np.uint16) % 977 + 15000)
    assert_same(a, b)


def test_opcode_subset_interpreter():
    """The fast executor's interpreter holds branches only for the opcodes it will meet
    (dispatch.branches_for): same final state as the full interpreter, and an opcode outside
    the subset is dispatched to the invalid-opcode branch (it is never reached in a fast run)."""
    import jax.numpy as jnp

    from plena.emu_jax import dispatch
    from plena.emu_jax.api import compiled_interpreter, load_program
    from plena.emu_jax.state import init_state
    from plena.isa.opcodes import BY_MNEMONIC

    src = "\n".join([li(1, 3), li(2, 64), "S_ADD_INT gp3, gp1, gp2", "S_MUL_INT gp4, gp3, gp1",
                     "C_LOOP_START gp5, 4", "S_ADDI_INT gp6, gp6, 7", "C_LOOP_END gp5"])
    p = load_program(prog(src))
    plan = plan_program(p, CFG)
    geo = api.geometry_for(p, CFG, plan, hbm_len=0, vram_len=0, hbm_capacity=CFG.hbm_size)
    fields, n, limit = api.program_fields(p, geo), jnp.int32(len(p)), api.step_limit(None)
    full = compiled_interpreter(geo, fields, init_state(geo, hbm_capacity=CFG.hbm_size), n, limit)(
        fields, init_state(geo, hbm_capacity=CFG.hbm_size), n, limit)
    sub = compiled_interpreter(geo, fields, init_state(geo, hbm_capacity=CFG.hbm_size), n, limit, set(p.opcode))(
        fields, init_state(geo, hbm_capacity=CFG.hbm_size), n, limit)
    assert all(_bits(getattr(full, k)) == _bits(getattr(sub, k)) for k in full._fields)
    assert int(full.gp[6]) == 28 and int(full.err) == 0
    branches = dispatch.branches_for(set(p.opcode))
    assert branches[dispatch.BRANCH_OF[BY_MNEMONIC["S_MUL_INT"].code]] is dispatch.BRANCHES[
        dispatch.BRANCH_OF[BY_MNEMONIC["S_MUL_INT"].code]]
    assert branches[dispatch.BRANCH_OF[BY_MNEMONIC["V_ADD_VV"].code]] is dispatch.BRANCHES[dispatch.INVALID]
    assert sum(b is not dispatch.BRANCHES[dispatch.INVALID] for b in branches) == len(set(p.opcode)) + 1  # + SKIP


@pytest.mark.parametrize("name", sorted(fast.REGISTER_ONLY))
def test_register_only_opcodes_read_no_memory(name):
    """The fast executor puts no barrier after these opcodes, which is safe only because they
    touch no memory: their function must run with every memory (and accumulator) absent."""
    import jax.numpy as jnp

    from plena.emu_jax import dispatch
    from plena.emu_jax.effects import Fields
    from plena.emu_jax.state import init_state
    from plena.isa.opcodes import BY_MNEMONIC

    p = api.load_program(prog(li(1, 0)))
    geo = api.geometry_for(p, CFG, plan_program(p, CFG), hbm_len=0, vram_len=0, hbm_capacity=1 << 20)
    st = init_state(geo, hbm_capacity=1 << 20)
    bare = st._replace(vram=None, mram=None, hbm=None, fpsram=None, intsram=None, hm_acc=None, hv_acc=None)
    i32 = jnp.int32
    f = Fields(opcode=i32(BY_MNEMONIC[name].code), rd=i32(1), rs1=i32(2), rs2=i32(3), rs3=i32(0), funct1=i32(0),
               imm18=i32(5), imm22=i32(5))
    eff = dispatch.IMPLEMENTATIONS[name](geo, bare, f)
    assert int(eff.err) == 0
    with pytest.raises((TypeError, AttributeError)):  # the same call reaching a memory fails this way
        dispatch.IMPLEMENTATIONS["S_LD_FP"](geo, bare, f)


def test_a_run_compiles_nothing_but_its_blocks():
    """Loading compiles no XLA programs: the initial state, the program's fields and the
    blocks' operands go to the device with device_put (jnp.zeros / jnp.asarray compile a small
    program per shape: ~0.55 s of a cold run's load on a slow 2-core machine). A second run of
    a program whose blocks are compiled compiles nothing at all."""
    import logging

    import jax

    src = ["C_LOOP_START gp3, 8", "V_ADD_VV gp1, gp2, gp2, 0", "S_ADDI_INT gp1, gp1, 64", "C_LOOP_END gp3"]
    words = prog([li(1, 64 * 64)] + src)
    api.run(words, CFG, executor="fast")  # compiles the blocks (kept in fast._BLOCKS)
    jax.clear_caches()  # forget every small program a run might compile again
    compiled = []

    class Record(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling "):
                compiled.append(record.getMessage()[:80])

    handler = Record()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles():
            r = api.run(words, CFG, executor="fast")
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert r.executor == "fast"
    assert compiled == []
