"""Tests of the program builder (plena.frontend): register and memory allocation, emission
checks, the loop budget, constants, HBM transfers and the written program folder.

Every emulator run here uses one machine, EMU_CFG (the default config with a small loop
budget, so the budget boundary is cheap to run), so they share one compiled interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plena.config import default_config, load_config
from plena.emu_jax.api import run
from plena.emu_jax.errors import PlenaError
from plena.frontend import F0, GP0, BuildError, ProgramBuilder, config_toml
from plena.isa import assemble
from plena.numerics.bf16 import bf16_bits_to_f32_np, f32_to_bf16_bits_np
from plena.numerics.mx import mx_decode_np, mx_encode_np

REPO = Path(__file__).resolve().parents[1]
CFG = default_config()
EMU_CFG = CFG.replace(max_loop_instructions=40)


def bf16(x):
    return bf16_bits_to_f32_np(f32_to_bf16_bits_np(np.asarray(x, np.float32)))


def rand(shape, seed, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------------------------
# registers and emission (no emulator)
# --------------------------------------------------------------------------------------------

def test_registers_allocate_print_free_and_exhaust():
    b = ProgramBuilder()
    regs = [b.gp(f"r{i}") for i in range(15)]
    assert [str(r) for r in regs] == [f"gp{i}" for i in range(1, 16)]
    with pytest.raises(BuildError, match=r"out of gp registers.*'late'.*gp3='r2'"):
        b.gp("late")
    b.free(regs[4])
    again = b.gp("again")
    assert str(again) == "gp5" and again.name == "again"
    with pytest.raises(BuildError, match="not allocated"):
        b.free(regs[4])  # stale handle of the re-used gp5
    fps = [b.fp(f"f{i}") for i in range(7)]
    assert [str(f) for f in fps] == [f"f{i}" for i in range(1, 8)]
    with pytest.raises(BuildError, match="out of fp registers.*'x'"):
        b.fp("x")
    addrs = [b.addr(f"a{i}") for i in range(8)]
    assert [str(a) for a in addrs] == [f"a{i}" for i in range(8)]
    with pytest.raises(BuildError, match="out of address registers"):
        b.addr("x")
    # helpers that need a temporary name themselves when registers run out
    with pytest.raises(BuildError, match="out of gp registers.*cannot allocate 'loop inner'"):
        with b.loop(2, "inner"):
            pass


def test_emit_assembles_and_validates_operands():
    b = ProgramBuilder()
    g, f = b.gp("g"), b.fp("f")
    pc = b.emit("V_ADD_VF", g, g, f, 0, comment="add")
    assert pc == 0 and b._lines[-1] == "V_ADD_VF gp1, gp1, f1, 0 ; add"
    b.emit("M_MM", 0, g, g)
    prog = b.build()
    assert prog.words == assemble(prog.asm) and len(prog.words) == 2
    with pytest.raises(BuildError, match="V_ADD_VF: operand 3 must be a f register"):
        b.emit("V_ADD_VF", g, g, g, 0)
    with pytest.raises(BuildError, match="operand 1 must be a gp register"):
        b.emit("S_ADDI_INT", f, GP0, 1)
    with pytest.raises(BuildError, match=r"S_ADDI_INT gp1, gp0, 262144: immediate value 262144 does not fit"):
        b.emit("S_ADDI_INT", g, GP0, 1 << 18)
    with pytest.raises(BuildError, match="unknown mnemonic"):
        b.emit("V_ADD", g, g, g)
    with pytest.raises(BuildError, match="negative"):
        b.emit("S_ADDI_INT", g, GP0, -1)
    with pytest.raises(BuildError, match="fp register index 9"):
        b.emit("V_RED_SUM", 9, g)
    with pytest.raises(BuildError, match="rd must be 0"):
        b.emit("M_BMM", g, g, g)
    with pytest.raises(BuildError, match="not executable"):
        b.emit("V_PS_V", g, g, g)
    with pytest.raises(BuildError, match=r"b\.loop"):
        b.emit("C_LOOP_START", g, 3)
    for bad in (-1, 1 << 32):
        with pytest.raises(BuildError, match="li gp1"):
            b.li(g, bad)
    assert len(b._words) == 2  # nothing was emitted by the failures


def test_memory_allocators_and_overflow():
    b = ProgramBuilder()
    v1, v2 = b.vram("v1", 3), b.vram("v2", 2)
    assert (v1.addr, v2.addr, v2.row(1)) == (0, 3 * CFG.vlen, 4 * CFG.vlen)
    with pytest.raises(BuildError, match="row 2 out of range"):
        v2.row(2)
    with pytest.raises(BuildError, match="already used"):
        b.vram("v1", 1)
    with pytest.raises(BuildError, match=r"vram 'huge'.*VECTOR_SRAM_SIZE = 4194304"):
        b.vram("huge", CFG.vector_sram_size)
    m1 = b.mram("m1", 2)
    m2 = b.mram("m2")
    assert (m1.addr, m2.addr, m1.tile(1)) == (0, 2 * CFG.mlen ** 2, CFG.mlen ** 2)
    with pytest.raises(BuildError, match=r"mram 'm3': out of MRAM tiles \(63 requested, 61 of 64 free\)"):
        b.mram("m3", CFG.mram_tiles - 1)
    assert b.intsram("idx", [1, 2, 3]) == 0 and b.intsram("more", 7) == 3
    with pytest.raises(BuildError, match="intsram 'big'.*do not fit"):
        b.intsram("big", np.zeros(1022, np.uint32))
    with pytest.raises(BuildError, match="unsigned 32-bit"):
        b.intsram("neg", [-1])
    assert b.fpsram("c", [1.0, 2.0]) == 0
    with pytest.raises(BuildError, match="fpsram 'big'.*do not fit"):
        b.fpsram("big", np.zeros(1023))
    with pytest.raises(BuildError, match="overflows the f16 preload"):
        b.fpsram("large", [1e6])
    x = b.hbm_input("x", np.ones((4, 64)))
    y = b.hbm_input("y", np.ones((3, 72)), pad_rows=4)
    assert (x.addr, x.scale_offset, x.nbytes) == (0, 256, 288)
    assert y.addr == 320 and (y.rows, y.stored_rows, y.scale_offset, y.scale_row_bytes) == (3, 4, 288, 9)
    out = b.hbm_output("out", 5, 64)
    assert out.stored_rows == 8 and out.addr == 320 + 4 * 81 + 60
    with pytest.raises(BuildError, match="not a multiple of the MX block"):
        b.hbm_input("odd", np.ones((4, 12)))
    prog = b.build()
    assert prog.hbm_size == out.end and prog.hbm_size % 64 == 0
    assert len(prog.hbm) == 704  # the image covers the inputs (y ends at 644)
    assert prog.hbm[:256].tobytes() == mx_encode_np(np.ones((4, 64)), x.fmt)[0].tobytes()
    assert set(prog.tensors) == {"v1", "v2", "m1", "m2", "idx", "more", "c", "x", "y", "out"}


def test_fpsram_constants_follow_the_f16_preload_path():
    b = ProgramBuilder()
    tie = 1 + 2.0 ** -8 + 2.0 ** -12  # f16 rounds it onto a bf16 tie, which then rounds to even
    vals = [0.1, -3.14159, tie, 1e-6, 70000.0 / 2, -np.inf]
    slot = b.fpsram("consts", vals)
    prog = b.build()
    f16 = np.asarray(vals, np.float32).astype(np.float16)
    assert np.array_equal(prog.fpsram_f16, f16.view(np.uint16))
    # f16 -> f32 is exact, then bf16 RNE
    assert np.array_equal(slot.values, bf16(f16.astype(np.float32)))
    assert np.array_equal(bf16_bits_to_f32_np(prog.fpsram_bf16), slot.values)
    assert slot.values[2] == 1.0 and bf16(tie) == 1.0078125  # double rounding differs from bf16(x)
    assert slot.values[3] != bf16(1e-6)  # f16 subnormal: precision lost on the way


# --------------------------------------------------------------------------------------------
# loops
# --------------------------------------------------------------------------------------------

def test_loop_budget_is_checked_statically_with_nesting():
    b = ProgramBuilder(CFG.replace(max_loop_instructions=30))
    g = b.gp("g")
    with b.loop(3, "outer"):
        with b.loop(4, "inner") as c:
            assert str(c) == "gp3"
            b.emit("S_ADDI_INT", g, g, 1)
            b.emit("S_ADDI_INT", g, g, 1)
        # outer iteration: inner C_LOOP_START + 4 * (2 + C_LOOP_END) + C_LOOP_END = 14
    assert b._frames[0].dyn == 1 + 3 * 14
    with b.loop(5, "staged") as c:
        with pytest.raises(BuildError, match="S_ADDI_INT: writes gp2, the counter of loop 'staged'"):
            b.emit("S_ADDI_INT", c, c, 1)
        b.stage("in loop")  # ends with the loop, before its C_LOOP_END
        b.emit("S_ADDI_INT", g, g, 1)
        with b.loop(2):
            b.emit("S_ADDI_INT", g, g, 1)
    st = b.build().stages["in loop"]
    assert st.end - st.start == 4 and st.dynamic == 5 * (1 + 1 + 2 * 2)
    tmp = b.gp("tmp")
    b.free(tmp)
    with pytest.raises(BuildError, match=r"register gp2 \('tmp'\) is used after it was freed"):
        b.emit("S_ADDI_INT", tmp, GP0, 1)
    with pytest.raises(BuildError, match=r"loop 'big': one iteration executes 32 instructions.*= 30"):
        with b.loop(2, "big"):
            with b.loop(10, "inner2"):
                b.emit("S_ADDI_INT", g, g, 1)
                b.emit("S_ADDI_INT", g, g, 1)
    with pytest.raises(BuildError, match=r"loop 'zero': count 0"):
        with b.loop(0, "zero"):
            pass
    assert str(b.gp("free again")) == "gp2"  # loop counters and temporaries were released


def _budget_program(cfg, outer_extra: int):
    """Outer iteration = inner C_LOOP_START + 19 * (body + inner C_LOOP_END) + extras + outer
    C_LOOP_END = 40 + outer_extra instructions."""
    b = ProgramBuilder(cfg)
    g = b.gp("g")
    with b.loop(3, "outer"):
        with b.loop(19, "inner"):
            b.emit("S_ADDI_INT", g, g, 1)
        for _ in range(outer_extra):
            b.emit("S_ADDI_INT", g, g, 0)
    return b.build(), g


def test_loop_budget_boundary_matches_the_emulator():
    prog, g = _budget_program(EMU_CFG, 0)  # exactly at the budget: allowed, and it runs
    res = prog.run()
    assert res.instructions == prog.dynamic_instructions == 1 + 3 * 40
    assert int(res.state.gp[g.index]) == 3 * 19
    with pytest.raises(BuildError, match="loop 'outer'.*41 instructions.*= 40"):
        _budget_program(EMU_CFG, 1)
    relaxed, _ = _budget_program(EMU_CFG.replace(max_loop_instructions=41), 1)
    with pytest.raises(PlenaError, match="MAX_LOOP_INSTRUCTIONS"):
        run(relaxed.words, EMU_CFG)  # the same words on the real budget: the emulator panics


# --------------------------------------------------------------------------------------------
# constants, FP SRAM, stages on the emulator
# --------------------------------------------------------------------------------------------

def test_li_add_imm_fpsram_and_stages_on_the_emulator():
    b = ProgramBuilder(EMU_CFG)
    values = [0, 5, (1 << 18) - 1, 1 << 18, 0x12345000, 0x12345678, 0xFFFFFFFF]
    regs = [b.gp(f"v{i}") for i in range(len(values))]
    with b.stage("constants"):
        for r, v in zip(regs, values):
            b.li(r, v)
    b.stage("arith")
    acc = b.gp("acc")
    b.li(acc, 1000)
    b.add_imm(acc, 300000)  # large: through a temporary
    b.add_imm(acc, -1234)  # negative: S_SUB_INT
    b.add_imm(acc, 7)
    copy = b.gp("copy")
    b.mov(copy, acc)
    wrap = b.gp("wrap")
    b.add_imm(wrap, -1)  # 0 - 1 wraps to 2**32 - 1
    slot = b.fpsram("k", [0.0, 0.1, -2.5])
    f = b.fp("f")
    b.stage("fp")
    b.emit("S_LD_FP", f, GP0, slot + 1)
    f2 = b.fp("f2")
    b.emit("S_ADD_FP", f2, f, F0)
    with b.loop(3, "accumulate"):
        b.emit("S_ADD_FP", f2, f2, f)
    prog = b.build()
    assert prog.words == assemble(prog.asm)
    res = prog.run()
    gp = np.asarray(res.state.gp)
    assert [int(gp[r.index]) for r in regs] == values
    assert int(gp[acc.index]) == int(gp[copy.index]) == 1000 + 300000 - 1234 + 7
    assert int(gp[wrap.index]) == 0xFFFFFFFF
    fpreg = bf16_bits_to_f32_np(np.asarray(res.state.fp))
    assert fpreg[f.index] == slot.values[1]
    expect = slot.values[1]
    for _ in range(3):
        expect = bf16(np.float32(expect) + slot.values[1])
    assert fpreg[f2.index] == expect
    assert res.instructions == prog.dynamic_instructions
    st = prog.stages
    assert [(s.start, s.end) for s in st.values()] == [
        (0, st["arith"].start), (st["arith"].start, st["fp"].start), (st["fp"].start, len(prog.words))]
    assert st["constants"].dynamic == st["arith"].start == 1 + 1 + 1 + 1 + 1 + 2 + 2
    assert st["fp"].dynamic == 2 + 1 + 3 * 2
    assert prog.asm.count("; stage: ") == 3


# --------------------------------------------------------------------------------------------
# HBM transfers
# --------------------------------------------------------------------------------------------

def test_load_rows_store_rows_round_trip():
    b = ProgramBuilder(EMU_CFG)
    xa = rand((16, 128), seed=1)
    x = b.hbm_input("x", xa)
    single = b.hbm_input("single", rand((1, 64), seed=2), pad_rows=CFG.hbm_v_prefetch_amount)
    a = b.vram("a", 12)  # 3 bursts: hardware-loop path
    c = b.vram("c", 8)  # 2 bursts: unrolled path
    s = b.vram("s", 4)
    out = b.hbm_output("out", 12, 64)
    b.load_rows(x, 4, a, 0, 12, col0=64)
    b.load_rows(x, 0, c, 0, 8)
    b.load_rows(single, 0, s, 0, 1)
    b.store_rows(a, 0, out, 0, 12)
    b.store_rows(a, 0, x, 0, 4)  # in place into an input tensor (rows 0..3, columns 0..63)
    prog = b.build()
    assert prog.asm.count("H_PREFETCH_V") == 1 + 2 + 1 and "C_LOOP_START" in prog.asm
    res = prog.run()
    va, vc = prog.read_vram(res, a), prog.read_vram(res, "c")
    assert np.array_equal(va, bf16(x.decoded[4:16, 64:128]))
    assert np.array_equal(vc, bf16(x.decoded[0:8, 0:64]))
    vs = prog.read_vram(res, s)
    assert np.array_equal(vs[0], bf16(single.decoded[0])) and not vs[1:].any()  # padding rows: zeros
    elem, scale = mx_encode_np(va, out.fmt)  # what the hardware encoder writes
    stored = prog.read_hbm_output(res, "out")
    assert np.array_equal(stored, mx_decode_np(elem, scale, out.fmt))
    blockmax = np.abs(xa[4:16, 64:128]).reshape(12, 8, 8).max(-1).repeat(8, -1)
    assert np.all(np.abs(stored - xa[4:16, 64:128]) <= blockmax / 8)  # MXFP8 accuracy
    back = prog.read_hbm_output(res, x)
    assert np.array_equal(back[:4, :64], stored[:4]) and np.array_equal(back[:4, 64:], x.decoded[:4, 64:])
    assert np.array_equal(back[4:], x.decoded[4:])  # neighbouring rows and scales untouched
    assert res.instructions == prog.dynamic_instructions


def test_load_tile_at_a_row_and_column_offset():
    b = ProgramBuilder(EMU_CFG)
    w = b.hbm_input("w", rand((160, 128), seed=3), use="weight")
    m = b.mram("m", 2)
    b.load_tile(w, 80, 32, m, tile=1)
    b.load_tile(w, 0, 64, m, tile=0)
    prog = b.build()
    res = prog.run()
    assert np.array_equal(prog.read_mram(res, m, 1), w.decoded[80:144, 32:96])  # exact f32
    assert np.array_equal(prog.read_mram(res, "m", 0), w.decoded[0:64, 64:128])


def test_transfer_errors():
    b = ProgramBuilder()
    x = b.hbm_input("x", rand((6, 64), seed=4))
    w = b.hbm_input("w", rand((128, 160), seed=5), use="weight")
    v = b.vram("v", 8)
    m = b.mram("m")
    with pytest.raises(BuildError, match=r"load_rows 'x'.*rows 0\.\.7 .*6 stored rows.*pad_rows"):
        b.load_rows(x, 0, v, 0, 6)  # the second burst would read past the tensor
    with pytest.raises(BuildError, match=r"VRAM rows 6\.\.9 .*'v' \(8 rows\)"):
        b.load_rows(x, 0, v, 6, 2)
    with pytest.raises(BuildError, match="columns 8..71 are outside 'x'"):
        b.load_rows(x, 0, v, 0, 4, col0=8)
    with pytest.raises(BuildError, match="not a multiple of the MX block"):
        b.load_tile(w, 0, 4, m)
    with pytest.raises(BuildError, match=r"rows 96\.\.159"):
        b.load_tile(w, 96, 0, m)
    with pytest.raises(BuildError, match=r"tiles 1\.\.1 are outside 'm'"):
        b.load_tile(w, 0, 0, m, tile=1)
    # 160 columns: 20 scale bytes per row; at column 40 row 7's 8 scale bytes straddle a block
    with pytest.raises(BuildError, match=r"row [0-9]+ .* cross a 64-byte boundary"):
        b.load_tile(w, 0, 40, m)
    with pytest.raises(BuildError, match="not an HbmTensor"):
        b.load_rows(v, 0, v, 0, 4)
    out = b.hbm_output("o", 4, 64)
    with pytest.raises(BuildError, match=r"store_rows.*VRAM rows 6\.\.9"):
        b.store_rows(v, 6, out, 0, 4)
    assert b.pc == 0  # failed transfers emit nothing


# --------------------------------------------------------------------------------------------
# written folder and the command line
# --------------------------------------------------------------------------------------------

def test_write_and_cli_run_match_program_run(tmp_path):
    b = ProgramBuilder(EMU_CFG)
    xa, ya = rand((4, 64), seed=6), rand((4, 64), seed=7)
    x, y = b.hbm_input("x", xa), b.hbm_input("y", ya)
    xv, yv, zv = b.vram("xv", 4), b.vram("yv", 4), b.vram("zv", 4)
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
    b.stage("store")
    b.store_rows(zv, 0, z, 0, 4)
    prog = b.build()
    res = prog.run()
    zval = prog.read_vram(res, zv)
    assert np.array_equal(zval, bf16(bf16(bf16(x.decoded) + bf16(y.decoded)) * np.float32(0.5)))

    d = prog.write(tmp_path / "prog")
    names = {p.name for p in d.iterdir()}
    assert {"program.asm", "program.mem", "hbm.bin", "fp_sram.bin", "int_sram.bin",
            "plena_settings.toml", "tensors.json", "run.sh"} <= names
    assert load_config(d / "plena_settings.toml") == prog.cfg
    assert assemble((d / "program.asm").read_text()) == prog.words
    assert (d / "fp_sram.bin").read_bytes() == np.float16(0.5).tobytes()
    meta = json.loads((d / "tensors.json").read_text())
    assert meta["tensors"]["z"]["address"] == z.addr and meta["tensors"]["z"]["scale_offset"] == 256
    assert meta["hbm_size"] == prog.hbm_size and set(meta["stages"]) == {"load", "add", "store"}
    run_sh = (d / "run.sh").read_text()
    assert "run --opcode program.mem --hbm hbm.bin --fpsram fp_sram.bin --intsram int_sram.bin " \
           f"--settings plena_settings.toml --hbm-size {prog.hbm_size}" in run_sh

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cli = subprocess.run([sys.executable, "-m", "plena.cli", "run", *prog.cli_args(), "--out", "dumps",
                          "--dump-hbm"], cwd=d, env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    vram_dump = np.fromfile(d / "dumps" / "vram_dump.bin", "<u2")
    assert np.array_equal(vram_dump, res.vram_bits())
    hbm_dump = np.fromfile(d / "dumps" / "hbm_dump.bin", np.uint8)
    assert np.array_equal(hbm_dump[z.addr:z.end], np.asarray(res.state.hbm)[z.addr:z.end])
    assert np.array_equal(prog.read_hbm_output(res, z), mx_decode_np(*mx_encode_np(zval, z.fmt), z.fmt))


def test_settings_file_is_copied_or_generated(tmp_path):
    b = ProgramBuilder()  # the shipped config: its settings file is copied unchanged
    b.emit("S_ADDI_INT", GP0, GP0, 0)
    d = b.build().write(tmp_path / "default")
    assert (d / "plena_settings.toml").read_bytes() == Path(CFG.source).read_bytes()
    cfg = CFG.replace(max_loop_instructions=777, hbm_v_prefetch_amount=8)
    b = ProgramBuilder(cfg)  # a modified machine: a settings file is generated from it
    b.emit("S_ADDI_INT", GP0, GP0, 0)
    d = b.build().write(tmp_path / "modified")
    assert load_config(d / "plena_settings.toml") == cfg
    assert (d / "plena_settings.toml").read_text() == config_toml(cfg)
