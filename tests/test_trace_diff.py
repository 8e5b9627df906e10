"""Research tooling: instruction traces, `plena diff`, stage profiles and chunked progress runs.

Every run uses the default machine (one compiled interpreter, one compiled traced loop).
Oracles are independent of the trace: the final state of ``api.run``; the state after the
first k instructions (``api.run(max_steps=k)``) to pin the first divergent instruction; the
builder's static per-stage instruction counts; files edited by hand for the dump diff.
"""

from __future__ import annotations

import dataclasses
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
from plena.frontend import ops_basic as F
from plena.isa import assemble, disassemble_word, read_mem
from plena.isa.opcodes import OPCODES
from plena.numerics.bf16 import bf16_bits_to_f32_np
from plena.verify.diff import TensorMap, diff_dumps, diff_traces
from plena.verify.dumps import Dumps, read_dump_dir, write_dump_dir

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

def _visible_state(st, hbm_mask=None, fpsram_mask=None):
    hbm, fpsram = np.asarray(st.hbm).copy(), np.asarray(st.fpsram).copy()
    if hbm_mask is not None:
        hbm[hbm_mask] = 0
    if fpsram_mask is not None:
        fpsram[fpsram_mask] = 0
    return [np.asarray(x) for x in (st.gp, st.fp, st.a_hi, st.a_lo, st.scale, st.stride, st.vmask, st.vram,
                                    st.mram, st.intsram)] + [fpsram, hbm]


def _states_equal_after(k, words_a, kw_a, words_b, kw_b, hbm_mask=None, cfg=CFG, fpsram_mask=None) -> bool:
    a = run(words_a, cfg, **kw_a, max_steps=k).state
    b = run(words_b, cfg, **kw_b, max_steps=k).state
    return all(np.array_equal(x, y) for x, y in zip(_visible_state(a, hbm_mask, fpsram_mask),
                                                    _visible_state(b, hbm_mask, fpsram_mask)))


def check_first_divergence(words_a, kw_a, words_b, kw_b, hbm_mask=None, cfg=CFG, fpsram_mask=None):
    _, ta = run_traced(words_a, cfg, **kw_a)
    _, tb = run_traced(words_b, cfg, **kw_b)
    d = diff_traces(ta, tb)
    assert not d.identical
    i = d.index
    # oracle: registers and memories agree after i instructions, and differ after i + 1
    assert _states_equal_after(i, words_a, kw_a, words_b, kw_b, hbm_mask, cfg, fpsram_mask)
    assert not _states_equal_after(i + 1, words_a, kw_a, words_b, kw_b, hbm_mask, cfg, fpsram_mask)
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
# wide (u32) containers: fp16 VRAM and MRAM, e8m23 scalar unit (f32 fp registers / FP SRAM)
# --------------------------------------------------------------------------------------------

def wide_program(seed: int = 3):
    """linear -> rms_norm under the WIDE config of test_formats_e2e."""
    from test_formats_e2e import WIDE

    rng = np.random.default_rng(seed)
    M, K, N = 4, 2 * WIDE.mlen, 2 * WIDE.mlen
    b = ProgramBuilder(WIDE)
    x = b.hbm_input("x", rng.standard_normal((M, K)).astype(np.float32) * 3, pad_rows=WIDE.hbm_v_prefetch_amount)
    w = b.hbm_input("w", (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32), use="weight",
                    pad_rows=WIDE.hbm_m_prefetch_amount)
    y = F.linear(b, x, w, name="lin")
    F.rms_norm(b, y, name="rms")
    return WIDE, b.build()


def _f32(bits) -> float:
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def _f16(code) -> float:
    return float(np.array([code], np.uint16).view(np.float16)[0])


def _f16_code(value) -> int:
    """IEEE fp16 code of an f32 value that fp16 holds exactly (numpy's own conversion)."""
    h = np.float32(value).astype(np.float16)
    assert float(h) == float(np.float32(value))
    return int(h.view(np.uint16))


def _parse(text: str, dtype=np.float32):
    """``"<value> (0x<hex>)"`` -> (value read as ``dtype``, bits): the printed digits must
    identify the value in its own type."""
    v, h = text.split()
    return float(dtype(v)), int(h.strip("()"), 16)


def test_diff_traces_wide_containers():
    from plena.emu_jax.state import fp_container
    from plena.verify.diff import fp_register_bits

    cfg, prog = wide_program()
    assert fp_container(cfg) == np.uint32
    kw = prog_inputs(prog)
    # FP SRAM preload: flip the lowest mantissa bit of rms_norm's 1/D constant (bf16 bits)
    slot = int(prog.tensors["rms.consts"])
    fps = prog.fpsram_bf16.copy()
    fps[slot] ^= 0x0001
    d, ta, tb = check_first_divergence(prog.words, kw, prog.words, dict(kw, fpsram=fps), cfg=cfg,
                                       fpsram_mask=[slot])
    assert d.asm_a.startswith("S_LD_FP") and d.asm_a == d.asm_b
    (f,) = d.fields
    reg = d.asm_a.split()[1].rstrip(",")  # the loaded register
    assert f.field == reg and reg.startswith("f")
    # the register holds f32 bits (wide SCALAR_FP): bf16 preload bits << 16, printed as f32
    want_a, want_b = int(prog.fpsram_bf16[slot]) << 16, int(fps[slot]) << 16
    r = REG_NAMES.index(reg)
    assert (int(ta.registers_after(d.index)[r]), int(tb.registers_after(d.index)[r])) == (want_a, want_b)
    assert _parse(f.a) == (_f32(want_a), want_a) and _parse(f.b) == (_f32(want_b), want_b)
    assert _f32(want_a) == np.float32(1 / (2 * cfg.mlen))  # 1/D, exact in bf16
    assert f"{reg}: A={f.a}  B={f.b}" in d.report()
    assert fp_register_bits(ta, tb) == 32 == fp_register_bits(cfg=cfg) and fp_register_bits(cfg=CFG) == 16
    assert diff_traces(ta, tb, cfg=cfg).report() == d.report()

    # HBM input: one bit of an fp16 activation (Plain e5m10, 2 bytes per element)
    x = prog.tensors["x"]
    byte = x.addr + x.offset(1, 3)
    hbm = prog.hbm.copy()
    hbm[byte] ^= 0x01
    d, _, _ = check_first_divergence(prog.words, kw, prog.words, prog_inputs(prog, hbm), hbm_mask=[byte],
                                     cfg=cfg)
    assert d.asm_a.startswith("H_PREFETCH_V") and [f.field for f in d.fields] == ["write vram"]


def test_dump_diff_wide_containers(tmp_path, capsys):
    from plena.numerics import codec
    from plena.numerics.formats import FloatType, PlainFormat

    cfg, prog = wide_program()
    res = prog.run()
    dumps = res.dumps()
    f16 = FloatType(True, 5, 10)
    assert dumps.vram.dtype == np.uint32 and dumps.vram_type == f16 and dumps.mram_type == f16
    assert dumps.fpsram.dtype == np.uint32
    a, b = tmp_path / "a", tmp_path / "b"
    write_dump_dir(dumps, a)
    folder = prog.write(tmp_path / "prog")
    meta = json.loads((folder / "tensors.json").read_text())["tensors"]
    tensors = TensorMap.load(folder / "tensors.json")

    # plant: VRAM element (2, 5) of the RMSNorm output: f32 container bit 13 (the lowest bit an
    # fp16 value keeps); FP SRAM entry of eps: f32 bit 0; MRAM element 37: fp16 code bit 9
    t = meta["rms.out"]
    e = t["address"] + 2 * t["shape"][1] + 5
    vram, fpsram, mram = dumps.vram.copy(), dumps.fpsram.copy(), np.asarray(dumps.mram).copy()
    vram[e] ^= np.uint32(1 << 13)
    j = int(prog.tensors["rms.consts"]) + 1
    assert fpsram[j] != 0
    fpsram[j] ^= np.uint32(1)
    m = 37
    mram[m] ^= np.uint32(1 << 9)
    write_dump_dir(dumps._replace(vram=vram, fpsram=fpsram, mram=mram), b)

    d = diff_dumps(a, b, tensors=tensors, cfg=cfg)
    by = {x.memory: x for x in d.memories}
    v = by["vram"]
    code_a, code_b = _f16_code(_f32(int(dumps.vram[e]))), _f16_code(_f32(int(vram[e])))
    assert code_a ^ code_b == 1
    assert (v.n_diff, v.first, v.where, v.per_tensor) == (1, e, "rms.out[2, 5]", {"rms.out": 1})
    assert (v.a_bits, v.b_bits) == (code_a, code_b)
    assert (v.a_value, v.b_value) == (_f32(int(dumps.vram[e])), _f32(int(vram[e])))
    assert (v.a_value, v.b_value) == (_f16(code_a), _f16(code_b))
    assert v.len_a == v.len_b == len(dumps.vram)  # 2 bytes per element in the file
    line = v.report()
    a_txt, b_txt = line.split("A=")[1].split("  [")[0].split(" B=")
    assert _parse(a_txt, np.float16) == (_f16(code_a), code_a) and _parse(b_txt, np.float16) == (_f16(code_b), code_b)
    s = by["fpsram"]
    assert (s.n_diff, s.first, s.len_a) == (1, j, 1024)
    assert (s.a_bits, s.b_bits) == (int(dumps.fpsram[j]), int(fpsram[j]))
    assert (s.a_value, s.b_value) == (_f32(int(dumps.fpsram[j])), _f32(int(fpsram[j])))
    assert _parse(s.report().split("A=")[1].split(" B=")[0]) == (s.a_value, s.a_bits)
    mr = by["mram"]
    assert (mr.n_diff, mr.first, mr.where) == (1, m, "lin.w[tile 0, 2, 5]")
    assert (mr.a_bits, mr.b_bits) == (int(dumps.mram[m]), int(mram[m]))
    assert (mr.a_value, mr.b_value) == (_f16(int(dumps.mram[m])), _f16(int(mram[m])))
    assert by["intsram"].status == "identical" and by["hbm"].status == "absent"
    assert diff_dumps(a, a, cfg=cfg).identical

    # `plena diff --settings` (the command line): the folders' config names the layouts
    from plena.cli import main as cli_main
    capsys.readouterr()
    rc = cli_main(["diff", str(a), str(b), "--tensors", str(folder / "tensors.json"),
                   "--settings", str(folder / "plena_settings.toml")])
    out = capsys.readouterr().out
    assert rc == 1 and out.strip() == d.report()
    assert cli_main(["diff", str(a), str(a), "--settings", str(folder / "plena_settings.toml")]) == 0

    # codes that straddle bytes: a 19-bit e8m10 VRAM (f32 bits >> 13 are its codes)
    e8m10 = FloatType(True, 8, 10)
    cfg19 = cfg.replace(precision=dataclasses.replace(cfg.precision, vector_sram_type=PlainFormat(e8m10)))
    vals = codec.round_to_np(np.random.default_rng(1).standard_normal(37).astype(np.float32), e8m10)
    bits = vals.view(np.uint32).copy()
    base = Dumps(vram=bits, mram=None, fpsram=np.zeros(1024, np.uint32), intsram=np.zeros(1024, np.uint32),
                 vram_type=e8m10)
    write_dump_dir(base, tmp_path / "c")
    flipped = bits.copy()
    flipped[29] ^= np.uint32(1 << 13)
    write_dump_dir(base._replace(vram=flipped), tmp_path / "d")
    v = {x.memory: x for x in diff_dumps(tmp_path / "c", tmp_path / "d", cfg=cfg19).memories}["vram"]
    assert (v.n_diff, v.first, v.len_a) == (1, 29, 40)  # 37 codes padded to 5 x 19 bytes
    assert (v.a_bits, v.b_bits) == (int(bits[29]) >> 13, int(flipped[29]) >> 13)
    assert (v.a_value, v.b_value) == (_f32(int(bits[29])), _f32(int(flipped[29])))


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
