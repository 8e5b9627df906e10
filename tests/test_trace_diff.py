"""Research tooling: instruction traces, `plena diff`, stage profiles and chunked progress runs.

Every run uses the default machine (one compiled interpreter, one compiled traced loop).
Oracles are independent of the trace: the final state of ``api.run``; the state after the
first k instructions (``api.run(max_steps=k)``) to pin the first divergent instruction; the
builder's static per-stage instruction counts; files edited by hand for the dump diff.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import chex
import numpy as np
import pytest

from conftest import CONFORMANCE
from plena.cli import main as cli_main
from plena.config import default_config
from plena.emu_jax import files
from plena.emu_jax.api import run
from plena.emu_jax.errors import PlenaError
from plena.emu_jax.profile import (OTHER, PcProfile, run_with_progress, stage_profile, stages_from_asm,
                                   stages_from_json)
from plena.emu_jax.trace import MEMORIES, REG_NAMES, Trace, run_traced
from plena.frontend import GP0, ProgramBuilder
from plena.isa import assemble, disassemble_word, read_mem
from plena.isa.opcodes import OPCODES
from plena.numerics.bf16 import bf16_bits_to_f32_np
from plena.verify.diff import TensorMap, diff_dumps, diff_traces
from plena.verify.dumps import read_dump_dir, write_dump_dir

CFG = default_config()


# --------------------------------------------------------------------------------------------
# programs
# --------------------------------------------------------------------------------------------

def staged_program(seed: int = 0):
    """z = (x + y) * 0.5 row by row, then a scaled copy in a nested loop; three stages."""
    rng = np.random.default_rng(seed)
    b = ProgramBuilder(CFG)
    x = b.hbm_input("x", rng.standard_normal((4, 64)).astype(np.float32))
    y = b.hbm_input("y", rng.standard_normal((4, 64)).astype(np.float32))
    xv, yv, zv, wv = b.vram("xv", 4), b.vram("yv", 4), b.vram("zv", 4), b.vram("wv", 4)
    z = b.hbm_output("z", 4, 64)
    half = b.fpsram("half", [0.5])
    b.stage("load")
    b.load_rows(x, 0, xv, 0, 4)
    b.load_rows(y, 0, yv, 0, 4)
    b.stage("add")
    with b.scoped(b.gp("px"), b.gp("py"), b.gp("pz")) as (px, py, pz), b.scoped(b.fp("h")) as h:
        b.li(px, xv.addr)
        b.li(py, yv.addr)
        b.li(pz, zv.addr)
        b.emit("S_LD_FP", h, GP0, half)
        with b.loop(4, "rows"):
            b.emit("V_ADD_VV", pz, px, py, 0)
            b.emit("V_MUL_VF", pz, pz, h, 0)
            for r in (px, py, pz):
                b.add_imm(r, CFG.vlen)
        b.stage("scale")
        b.li(pz, zv.addr)
        with b.scoped(b.gp("pw")) as pw:
            b.li(pw, wv.addr)
            with b.loop(2, "outer"):
                with b.loop(2, "inner"):
                    b.emit("V_MUL_VF", pw, pz, h, 0)
                    b.add_imm(pw, CFG.vlen)
                    b.add_imm(pz, CFG.vlen)
    b.stage("store")
    b.store_rows(zv, 0, z, 0, 4)
    return b.build()


def prog_inputs(prog, hbm=None):
    return dict(hbm=prog.hbm if hbm is None else hbm, fpsram=prog.fpsram_bf16, intsram=prog.intsram,
                hbm_size=prog.hbm_size)


def case_inputs(name):
    from plena.verify.conformance import load_case

    if not CONFORMANCE.is_dir():
        pytest.skip("../shared/conformance is absent")
    case = load_case(CONFORMANCE / name)
    kw = dict(hbm=files.read_bytes(case.hbm_bin), fpsram=files.load_fpsram(case.fp_sram_bin),
              intsram=files.load_intsram(case.int_sram_bin) if case.int_sram_bin else None,
              vram=files.load_vram(case.vram_preload) if case.vram_preload else None, hbm_size=case.hbm_size)
    return case, read_mem(case.program_mem), kw


def _windows(trace: Trace, mem: str) -> np.ndarray:
    """Boolean cover of everything ``trace`` says it wrote to ``mem``."""
    m = trace.w_mem == MEMORIES.index(mem)
    hi = int(trace.w_hi[m].max()) if m.any() else 0
    cover = np.zeros(max(hi, 1), bool)
    for lo, h in zip(trace.w_lo[m], trace.w_hi[m]):
        cover[lo:h] = True
    return cover


def _covered(changed_idx: np.ndarray, cover: np.ndarray) -> bool:
    return bool(np.all(changed_idx < len(cover)) and np.all(cover[changed_idx]))


# --------------------------------------------------------------------------------------------
# trace on / off: same final state
# --------------------------------------------------------------------------------------------

def check_traced_equals_plain(words, kw, chunk):
    plain = run(words, CFG, **kw)
    init = run(words, CFG, **kw, max_steps=0).state
    traced, trace = run_traced(words, CFG, **kw, chunk=chunk)
    chex.assert_trees_all_equal(plain.state, traced.state)
    assert (traced.instructions, traced.cycles, traced.opcode_counts) == \
        (plain.instructions, plain.cycles, plain.opcode_counts)
    assert len(trace) == plain.instructions and trace.error is None
    hist = np.bincount(trace.opcodes, minlength=64)
    assert {OPCODES[c].mnemonic: int(n) for c, n in enumerate(hist) if n} == plain.opcode_counts
    # registers after the last instruction are the final registers
    st = plain.state
    a = (np.asarray(st.a_hi, np.uint64) << np.uint64(32)) | np.asarray(st.a_lo, np.uint64)
    final = np.concatenate([np.asarray(st.gp, np.uint64), np.asarray(st.fp, np.uint64), a,
                            np.array([st.scale, st.stride, st.vmask], np.uint64)])
    np.testing.assert_array_equal(trace.registers_after(len(trace) - 1), final)
    # every memory element the run changed lies in a window the trace recorded
    geo = plain.geometry
    vrows = np.flatnonzero(np.any(np.asarray(init.vram[:-1]) != np.asarray(st.vram[:-1]), axis=1))
    assert _covered(vrows, _windows(trace, "vram"))
    mrows = np.flatnonzero(np.any(np.asarray(init.mram[:-1]) != np.asarray(st.mram[:-1]), axis=2).reshape(-1))
    assert _covered(mrows, _windows(trace, "mram"))
    hb = np.flatnonzero(np.asarray(init.hbm[: geo.hbm_bytes]) != np.asarray(st.hbm[: geo.hbm_bytes]))
    assert _covered(hb, _cover_union(trace, ("hbm", "hbm_scale")))
    for mem in ("fpsram", "intsram"):
        ch = np.flatnonzero(np.asarray(getattr(init, mem)) != np.asarray(getattr(st, mem)))
        assert _covered(ch, _windows(trace, mem))
    return plain, trace


def _cover_union(trace, mems):
    covers = [_windows(trace, m) for m in mems]
    n = max(len(c) for c in covers)
    return np.any([np.pad(c, (0, n - len(c))) for c in covers], axis=0)


def test_traced_run_equals_plain_run_frontend_program():
    prog = staged_program()
    plain, trace = check_traced_equals_plain(prog.words, prog_inputs(prog), chunk=7)  # many chunk borders
    assert plain.hbm_bytes_written > 0 and (trace.w_mem == MEMORIES.index("hbm")).any()


@pytest.mark.parametrize("name,chunk", [("aten_rms_norm", 13), ("aten_linear", 1 << 14), ("moe_topk", 1),
                                        ("de_h_store", 5), ("de_loop", 1 << 14)])
def test_traced_run_equals_plain_run_conformance(name, chunk):
    _, words, kw = case_inputs(name)
    check_traced_equals_plain(words, kw, chunk)


def test_trace_of_a_panicking_run():
    case, words, kw = case_inputs("de_ffn_intermediate")
    with pytest.raises(PlenaError) as plain:
        run(words, CFG, **kw)
    with pytest.raises(PlenaError) as traced:
        run_traced(words, CFG, **kw)
    assert str(traced.value) == str(plain.value)
    trace = traced.value.trace
    assert len(trace) == case.dynamic_instructions  # up to and including the faulting one
    assert int(trace.pc[-1]) == case.panic_pc == trace.error["pc"]
    assert trace.error["rule"] == "MM_OFFSET"


def test_trace_files_round_trip(tmp_path):
    prog = staged_program()
    _, trace = run_traced(prog.words, CFG, **prog_inputs(prog))
    for name in ("t.npz", "t.jsonl", "t.trace"):
        path = trace.save(tmp_path / name)
        back = Trace.load(path)
        for k in Trace.ARRAYS:
            np.testing.assert_array_equal(getattr(back, k), getattr(trace, k), err_msg=k)
            assert getattr(back, k).dtype == getattr(trace, k).dtype
        assert back.error == trace.error and diff_traces(back, trace).identical
    first = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[1])
    assert first["i"] == 0 and first["asm"] == disassemble_word(prog.words[0])


# --------------------------------------------------------------------------------------------
# plena diff on traces: the exact first divergent instruction
# --------------------------------------------------------------------------------------------

def _visible_state(st, hbm_mask=None):
    hbm = np.asarray(st.hbm).copy()
    if hbm_mask is not None:
        hbm[hbm_mask] = 0
    return [np.asarray(x) for x in (st.gp, st.fp, st.a_hi, st.a_lo, st.scale, st.stride, st.vmask, st.vram,
                                    st.mram, st.fpsram, st.intsram)] + [hbm]


def _states_equal_after(k, words_a, kw_a, words_b, kw_b, hbm_mask=None) -> bool:
    a = run(words_a, CFG, **kw_a, max_steps=k).state
    b = run(words_b, CFG, **kw_b, max_steps=k).state
    return all(np.array_equal(x, y) for x, y in zip(_visible_state(a, hbm_mask), _visible_state(b, hbm_mask)))


def check_first_divergence(words_a, kw_a, words_b, kw_b, hbm_mask=None):
    _, ta = run_traced(words_a, CFG, **kw_a)
    _, tb = run_traced(words_b, CFG, **kw_b)
    d = diff_traces(ta, tb)
    assert not d.identical
    i = d.index
    # oracle: registers and memories agree after i instructions, and differ after i + 1
    assert _states_equal_after(i, words_a, kw_a, words_b, kw_b, hbm_mask)
    assert not _states_equal_after(i + 1, words_a, kw_a, words_b, kw_b, hbm_mask)
    assert d.pc_a == int(ta.pc[i]) and d.asm_a == disassemble_word(int(words_a[d.pc_a]))
    rep = d.report()
    assert f"instruction #{i} " in rep and f"pc {d.pc_a}" in rep and d.asm_a in rep
    return d, ta, tb


def test_diff_finds_planted_hbm_bit_flip():
    prog = staged_program()
    y = prog.tensors["y"]
    hbm = prog.hbm.copy()
    byte = y.addr + y.offset(2, 17)  # element (2, 17) of y
    hbm[byte] ^= 0x08
    d, _, _ = check_first_divergence(prog.words, prog_inputs(prog), prog.words, prog_inputs(prog, hbm),
                                     hbm_mask=[byte])
    assert d.asm_a.startswith("H_PREFETCH_V")
    assert [f.field for f in d.fields] == ["write vram"]


def test_diff_finds_planted_immediate_change():
    prog = staged_program()
    lines = prog.asm.splitlines()
    # double the pointer bump after V_MUL_VF in the inner loop (its first execution already
    # writes a different gp value; the run still completes)
    j = next(k for k, ln in enumerate(lines) if ln.startswith("C_LOOP_START") and "inner" in ln) + 2
    assert lines[j].startswith("S_ADDI_INT") and lines[j].endswith(", 64")
    lines[j] = lines[j][: -len("64")] + "128"
    words_b = assemble("\n".join(lines))
    pc = sum(1 for ln in lines[:j] if ln.strip() and not ln.lstrip().startswith(";"))
    assert words_b[pc] != prog.words[pc] and sum(a != b for a, b in zip(prog.words, words_b)) == 1
    kw = prog_inputs(prog)
    d, ta, _ = check_first_divergence(prog.words, kw, words_b, kw)
    assert d.pc_a == d.pc_b == pc and d.index == int(np.flatnonzero(ta.pc == pc)[0])
    fields = [f.field for f in d.fields]
    assert fields[0] == "instruction" and fields[1].startswith("gp")


def test_diff_finds_planted_weight_bit_flip_conformance():
    case, words, kw = case_inputs("aten_linear")
    manifest = json.loads((CONFORMANCE / "aten_linear" / "manifest.json").read_text())
    w = next(t for t in manifest["hbm"]["tensors"] if t["name"] == "W")
    byte = w["elem_offset"] + 37 * w["elem_row_bytes"] + 90
    hbm = kw["hbm"].copy()
    hbm[byte] ^= 0x04
    d, _, _ = check_first_divergence(words, kw, words, dict(kw, hbm=hbm), hbm_mask=[byte])
    assert d.asm_a.startswith("H_PREFETCH_M") and [f.field for f in d.fields] == ["write mram"]


def test_diff_of_runs_ending_differently():
    prog = staged_program()
    kw = prog_inputs(prog)
    _, full = run_traced(prog.words, CFG, **kw)
    _, cut = run_traced(prog.words, CFG, **kw, max_steps=20)
    d = diff_traces(full, cut)
    assert d.index == 20 and d.fields[0].field == "end" and d.pc_b is None
    assert diff_traces(full, full).identical


# --------------------------------------------------------------------------------------------
# plena diff on dump folders
# --------------------------------------------------------------------------------------------

def test_dump_diff_finds_planted_elements(tmp_path):
    prog = staged_program()
    res = prog.run()
    a, b = tmp_path / "a", tmp_path / "b"
    write_dump_dir(res.dumps(with_hbm=True), a, hbm=True)
    meta = prog.write(tmp_path / "prog") / "tensors.json"
    tensors = TensorMap.load(meta)
    zv, z = prog.tensors["zv"], prog.tensors["z"]

    dumps = read_dump_dir(a, mmap=False)
    vram, hbm = dumps.vram.copy(), dumps.hbm.copy()
    e = zv.addr + 2 * CFG.vlen + 5
    vram[e] ^= 0x0001
    vram[e + 7] ^= 0x0100
    hbm[z.addr + z.offset(3, 9)] ^= 0x01
    write_dump_dir(dumps._replace(vram=vram, hbm=hbm), b, hbm=True)

    d = diff_dumps(a, b, tensors=tensors)
    assert not d.identical
    by = {m.memory: m for m in d.memories}
    v = by["vram"]
    assert (v.n_diff, v.first, v.where) == (2, e, "zv[2, 5]") and v.per_tensor == {"zv": 2}
    assert (v.a_bits, v.b_bits) == (int(dumps.vram[e]), int(vram[e]))
    assert f"A={bf16_bits_to_f32_np(np.array([v.a_bits], np.uint16))[0]:.7g}" in v.report()
    h = by["hbm"]
    assert (h.n_diff, h.first, h.where) == (1, z.addr + z.offset(3, 9), "z[3, 9]")
    assert all(by[m].status == "identical" for m in ("mram", "fpsram", "intsram"))

    # a shorter dump reads as zero-extended: trailing zeros are not a difference
    c = tmp_path / "c"
    shutil.copytree(a, c)
    nz = int(np.flatnonzero(dumps.vram)[-1]) + 1
    dumps.vram[:nz].astype("<u2").tofile(c / "vram_dump.bin")
    (c / "hbm_dump.bin").unlink()
    d2 = diff_dumps(a, c)
    assert d2.identical and {m.memory: m.status for m in d2.memories}["hbm"] == "only in A"
    # ... but a non-zero element past the shorter dump's end is
    longer = np.concatenate([dumps.vram, np.zeros(100, np.uint16)])
    longer[len(dumps.vram) + 42] = 0x3F80
    longer.astype("<u2").tofile(c / "vram_dump.bin")
    v3 = {m.memory: m for m in diff_dumps(a, c).memories}["vram"]
    assert (v3.n_diff, v3.first, v3.a_bits, v3.b_bits) == (1, len(dumps.vram) + 42, 0, 0x3F80)


# --------------------------------------------------------------------------------------------
# stage profile
# --------------------------------------------------------------------------------------------

def test_stages_from_asm_labels():
    asm = "\n".join([
        "S_ADDI_INT gp1, gp0, 1",        # pc 0: other
        "; stage: alpha",
        "S_ADDI_INT gp1, gp0, 2 ; x",    # pc 1
        "",
        "// a comment",
        "S_ADDI_INT gp1, gp0, 3",        # pc 2
        "S_ADDI_INT gp2, gp0, 4 ; stage: beta",  # pc 3: an inline marker labels its own line
        "; end stage",
        "S_ADDI_INT gp3, gp0, 5",        # pc 4: other
        "; Preload Addr Reg Generation",
        "S_ADDI_INT gp3, gp0, 6",        # pc 5
    ])
    sm = stages_from_asm(asm)
    assert sm.names == [OTHER, "alpha", "alpha", "beta", OTHER, OTHER]
    assert sm.ranges("alpha") == [[1, 3]] and sm.ranges(OTHER) == [[0, 1], [4, 6]]
    assert stages_from_asm(asm, rules=[("Addr Reg", "addr")]).names[5] == "addr"
    assert stages_from_asm(asm, all_comments=True).names[2:] == ["a comment", "beta", OTHER,
                                                                  "Preload Addr Reg Generation"]
    assert stages_from_asm(asm).fit(8).names[6:] == [OTHER, OTHER]


def test_stage_profile_matches_builder_counts_and_sums_to_totals():
    prog = staged_program()
    result, trace = run_traced(prog.words, CFG, **prog_inputs(prog))
    pcp = PcProfile.from_trace(trace)
    for stages in (stages_from_asm(prog.asm), stages_from_json(
            {"stages": {k: {"start": s.start, "end": s.end} for k, s in prog.stages.items()}}, len(prog.words))):
        prof = stage_profile(pcp, stages, CFG, wall_s=2.0)
        st = prof["stages"]
        for name, s in prog.stages.items():
            assert st[name]["instructions"] == s.dynamic, name  # the builder's static count
        assert sum(s["instructions"] for s in st.values()) == prof["total_instructions_executed"] \
            == result.instructions
        assert sum(s["non_hbm_cycles"] for s in st.values()) == prof["total_non_hbm_cycles"] == result.cycles
        assert sum(s["hbm_bytes_read"] for s in st.values()) == result.hbm_bytes_read > 0
        assert sum(s["hbm_bytes_written"] for s in st.values()) == result.hbm_bytes_written > 0
        assert st["store"]["hbm_bytes_written"] == result.hbm_bytes_written
        # H_STORE_V is read-modify-write (spec §6): the store stage reads what it writes
        assert st["store"]["hbm_bytes_read"] == st["store"]["hbm_bytes_written"]
        assert st["load"]["hbm_bytes_read"] + st["store"]["hbm_bytes_read"] == result.hbm_bytes_read
        assert sum(s["seconds"] for s in st.values()) == pytest.approx(2.0)
        assert sum(s["time_fraction"] for s in st.values()) == pytest.approx(1.0)
        assert prof["seconds_are_estimated"] is True


# --------------------------------------------------------------------------------------------
# chunked runs with progress
# --------------------------------------------------------------------------------------------

def check_chunked(words, kw, first_chunk):
    seen = []
    res = run_with_progress(words, CFG, **kw, first_chunk=first_chunk, target_s=0.0, executor="interpreter",
                            progress=lambda done, total: seen.append((done, total)))
    plain = run(words, CFG, **kw, executor="interpreter")
    chex.assert_trees_all_equal(res.state, plain.state)
    assert (res.instructions, res.cycles, res.opcode_counts) == (plain.instructions, plain.cycles,
                                                                 plain.opcode_counts)
    done = [d for d, _ in seen]
    assert seen[0] == (0, plain.plan.dynamic_instructions)
    assert len(seen) >= plain.instructions // first_chunk and done == sorted(done)
    assert done[-1] == plain.instructions and seen[-1][1] == plain.plan.dynamic_instructions


def test_chunked_progress_run_equals_unchunked():
    prog = staged_program()
    check_chunked(prog.words, prog_inputs(prog), first_chunk=3)


def test_fast_executor_reports_progress_and_equals_the_interpreter():
    _, words, kw = case_inputs("aten_linear")
    seen = []
    res = run_with_progress(words, CFG, **kw, executor="fast", progress=lambda done, total: seen.append((done, total)))
    plain = run(words, CFG, **kw, executor="interpreter")
    assert res.executor == "fast"
    chex.assert_trees_all_equal(res.state, plain.state)
    done = [d for d, _ in seen]
    assert seen[0] == (0, plain.instructions) and seen[-1] == (plain.instructions, plain.instructions)
    assert done == sorted(done)


def test_chunked_progress_run_equals_unchunked_conformance():
    _, words, kw = case_inputs("aten_linear")
    check_chunked(words, kw, first_chunk=397)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------

def test_cli_trace_stage_profile_and_diff(tmp_path, monkeypatch, capsys):
    prog = staged_program()
    d = prog.write(tmp_path / "prog")
    hbm = prog.hbm.copy()
    x = prog.tensors["x"]
    hbm[x.addr + x.offset(1, 3)] ^= 0x02
    (d / "hbm2.bin").write_bytes(hbm.tobytes())
    monkeypatch.chdir(d)
    args = prog.cli_args()
    assert cli_main(["run", *args, "--out", "a", "--trace", "a.npz", "--stage-profile", "prof.json",
                     "--no-progress"]) == 0
    i = args.index("hbm.bin")
    args_b = args[:i] + ["hbm2.bin"] + args[i + 1:]
    assert cli_main(["run", *args_b, "--out", "b", "--trace", "b.jsonl", "--progress"]) == 0
    capsys.readouterr()

    prof = json.loads(Path("prof.json").read_text())
    assert prof["stage_source"].endswith("tensors.json")
    assert {k: v["instructions"] for k, v in prof["stages"].items() if k != OTHER} == \
        {k: s.dynamic for k, s in prog.stages.items()}
    assert sum(v["instructions"] for v in prof["stages"].values()) == prof["total_instructions_executed"]

    assert cli_main(["diff", "a.npz", "b.jsonl"]) == 1
    out = capsys.readouterr().out
    ta = Trace.load("a.npz")
    expect = diff_traces(ta, Trace.load("b.jsonl"))
    assert f"first divergence at instruction #{expect.index} " in out and "H_PREFETCH_V" in out
    assert cli_main(["diff", "a.npz", "a.npz"]) == 0
    assert "identical" in capsys.readouterr().out

    assert cli_main(["diff", "a", "b", "--tensors", "tensors.json"]) == 1
    out = capsys.readouterr().out
    assert "vram:" in out and "xv[1, " in out
    assert cli_main(["diff", "a", "a"]) == 0
    assert cli_main(["diff", "a", "a.npz"]) == 2


def test_cli_trace_written_on_panic(tmp_path, capsys):
    case, _, _ = case_inputs("de_ffn_intermediate")
    out = tmp_path / "panic.npz"
    rc = cli_main(["run", "--opcode", str(case.program_mem), "--hbm", str(case.hbm_bin), "--fpsram",
                   str(case.fp_sram_bin), "--settings", str(case.settings_toml), "--hbm-size", str(case.hbm_size),
                   "--out", str(tmp_path / "dumps"), "--trace", str(out)])
    assert rc == 101 and not (tmp_path / "dumps").exists()
    t = Trace.load(out)
    assert int(t.pc[-1]) == case.panic_pc and t.error["pc"] == case.panic_pc
    assert f"pc {case.panic_pc}: M_MM" in capsys.readouterr().err


def test_register_names_cover_the_register_files():
    assert len(REG_NAMES) == 16 + 8 + 16 + 3 and len(set(REG_NAMES)) == len(REG_NAMES)
