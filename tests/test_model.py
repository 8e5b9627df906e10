"""Llama-family decoder (plena.frontend.model + plena.golden.llama).

(a) A tiny decoder (hidden 128 = 2 MLEN, 2 heads / 1 kv head of 64, intermediate 256, seq 64)
    on the default machine, 1 and 2 layers: every named intermediate and the output read from
    the emulator equal the hardware-policy golden bit for bit.
(b) The fp32-policy golden equals an independent float64 numpy Llama forward pass (so the
    composition -- RoPE convention, GQA head mapping, causal mask, residuals -- is the model's),
    and the hardware numerics stay close to it (max abs / rel L2 printed).
(c) Parameter helpers and build-time errors.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest

from plena.config import default_config
from plena.frontend import BuildError
from plena.frontend.model import (PRESETS, compile_decoder, from_hf_config, preset_params, random_params,
                                  rope_tables)
from plena.golden import Policy
from plena.golden.llama import decoder

CFG = default_config()
SEQ = 64
TINY = dict(hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=256)


@functools.lru_cache(maxsize=None)
def tiny_params():
    return random_params(layers=2, seed=3, **TINY)


@functools.lru_cache(maxsize=None)
def emulated(layers: int):
    params = tiny_params()
    prog, meta = compile_decoder(params, CFG, seq=SEQ, layers=layers, seed=5)
    res = prog.run(vram=meta["vram_preload"])
    emu = {k: m.read(prog, res) for k, m in meta["intermediates"].items()}
    return prog, meta, res, emu


@functools.lru_cache(maxsize=None)
def golden(layers: int, mode: str):
    params = tiny_params()
    _, meta, _, _ = emulated(layers)
    policy = Policy.hardware(CFG) if mode == "hw" else Policy.fp32(CFG)
    y, inter = decoder(params, meta["x"], CFG, seq=SEQ, layers=layers, policy=policy)
    return np.asarray(y), {k: np.asarray(v) for k, v in inter.items()}


def same_bits(golden, emulated, what):
    g, e = np.asarray(golden, np.float32), np.asarray(emulated, np.float32)
    assert g.shape == e.shape, what
    bad = np.nonzero(g.view(np.uint32) != e.view(np.uint32))
    assert bad[0].size == 0, f"{what}: {bad[0].size} of {g.size} differ, first at {tuple(int(i[0]) for i in bad)}"


# =============================================================================================
# (a) bit-exact
# =============================================================================================

# 2 layers: slow here; tests/test_decoder_layers.py and `plena demo` check 2 layers bit-exact
@pytest.mark.parametrize("layers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_emulator_matches_hardware_golden_bits(layers):
    prog, meta, res, emu = emulated(layers)
    y, gold = golden(layers, "hw")
    expected = {"x", "final_norm"} | {f"L{i}.{n}" for i in range(layers) for n in
                                      ("attn_norm", "q", "k", "v", "attn", "o_proj", "resid1", "ffn_norm", "ffn",
                                       "resid2")}
    assert set(emu) == expected == set(gold)
    for name in emu:
        same_bits(gold[name], emu[name], name)
    same_bits(y, meta["output"].read(prog, res), "output")
    assert np.all(np.isfinite(y)) and np.std(y) > 0.1
    # the stages are recorded and partition the layer's work
    for i in range(layers):
        for st in ("attn_norm", "qkv", "rope", "kv_store", "attn", "o_proj", "resid1", "ffn_norm", "ffn.gate",
                   "ffn.down", "resid2"):
            assert f"L{i}.{st}" in prog.stages
    assert prog.stages[f"L{layers - 1}.attn"].dynamic > 0


def test_layer_outputs_shared_between_programs():
    """The first layer of the 2-layer program computes what the 1-layer program computes."""
    e1, e2 = emulated(1)[3], emulated(2)[3]
    same_bits(e1["L0.resid2"], e2["L0.resid2"], "L0.resid2")


# =============================================================================================
# (b) fp32 golden vs float64 reference; hardware vs fp32
# =============================================================================================

def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope64(x, cos, sin, nh, d):
    out = np.empty_like(x)
    for h in range(nh):
        xh = x[:, h * d:(h + 1) * d]
        rot = np.concatenate([-xh[:, d // 2:], xh[:, :d // 2]], 1)
        out[:, h * d:(h + 1) * d] = xh * cos + rot * sin
    return out


def llama64(p, x, layers, seq):
    """Plain float64 Llama forward pass (weights [in, out])."""
    cos, sin = (t.astype(np.float64) for t in rope_tables(seq, p.head_dim, p.rope_theta))
    d, H, Hkv = p.head_dim, p.heads, p.kv_heads
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f(x)
    causal = np.triu(np.ones((seq, seq), bool), 1)
    for lp in p.layers[:layers]:
        h = _rms(x, f(lp.attn_norm), p.eps)
        q = _rope64(h @ f(lp.wq), cos, sin, H, d)
        k = _rope64(h @ f(lp.wk), cos, sin, Hkv, d)
        v = h @ f(lp.wv)
        a = np.empty((seq, H * d))
        for hh in range(H):
            t = hh // (H // Hkv)
            s = q[:, hh * d:(hh + 1) * d] @ k[:, t * d:(t + 1) * d].T / np.sqrt(d)
            s[causal] = -np.inf
            pr = np.exp(s - s.max(-1, keepdims=True))
            a[:, hh * d:(hh + 1) * d] = pr / pr.sum(-1, keepdims=True) @ v[:, t * d:(t + 1) * d]
        x = x + a @ f(lp.wo)
        h2 = _rms(x, f(lp.ffn_norm), p.eps)
        g = h2 @ f(lp.w_gate)
        x = x + (g / (1 + np.exp(-g)) * (h2 @ f(lp.w_up))) @ f(lp.w_down)
    return _rms(x, f(p.final_norm), p.eps)


def test_fp32_golden_is_the_llama_forward_pass():
    y32, _ = golden(2, "fp32")
    ref = llama64(tiny_params(), emulated(2)[1]["x"], 2, SEQ)
    # fp32 policy: FP SRAM constants (1/D, eps) still pass through f16 -> bf16 (1/128 and 1e-5
    # are close to exact), everything else plain f32
    np.testing.assert_allclose(y32, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("layers", [1, 2])
def test_hardware_numerics_close_to_fp32(layers, capsys):
    yhw, _ = golden(layers, "hw")
    y32, _ = golden(layers, "fp32")
    diff = yhw - y32
    max_abs = float(np.abs(diff).max())
    rel_l2 = float(np.linalg.norm(diff) / np.linalg.norm(y32))
    with capsys.disabled():
        print(f"\n  tiny decoder, {layers} layer(s): hardware vs fp32 golden max abs {max_abs:.4g}, "
              f"rel L2 {rel_l2:.4g}", end="")
    assert np.any(diff != 0)  # MXFP8 weights / activations and bf16 VRAM do change the result
    assert rel_l2 < 0.15 and max_abs < 1.0  # output is RMS-normalised (~unit scale)


# =============================================================================================
# (c) helpers and errors
# =============================================================================================

def test_params_helpers():
    a, b = random_params(layers=1, seed=9, **TINY), random_params(layers=1, seed=9, **TINY)
    assert np.array_equal(a.layers[0].wq, b.layers[0].wq)
    assert a.layers[0].wk.shape == (128, 64) and a.layers[0].w_down.shape == (256, 128)
    hf = types.SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                               intermediate_size=1536, num_hidden_layers=30, rope_theta=100000.0,
                               rms_norm_eps=1e-5)
    p = from_hf_config(hf, layers=1)
    s = preset_params("smollm2-135m", 1)
    assert (p.hidden, p.heads, p.kv_heads, p.head_dim, p.intermediate) == \
           (s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate) == (576, 9, 3, 64, 1536)
    assert set(PRESETS) == {"smollm2-135m", "clm-60m"}
    cos, sin = rope_tables(4, 8, 10000.0)
    assert np.allclose(cos[:, :4], cos[:, 4:]) and np.allclose(cos[0], 1) and np.allclose(sin[0], 0)
    with pytest.raises(ValueError):
        preset_params("gpt-5", 1)


def test_build_errors():
    p = random_params(layers=1, seed=0, **TINY)
    with pytest.raises(BuildError, match="multiple of MLEN"):
        compile_decoder(p, CFG, seq=32)
    with pytest.raises(BuildError, match="layers"):
        compile_decoder(p, CFG, seq=64, layers=2)
    p48 = random_params(hidden=128, heads=4, kv_heads=4, head_dim=48, intermediate=256, layers=1)
    with pytest.raises(BuildError, match="head_dim"):  # 48 neither divides MLEN 64 nor is a multiple of it
        compile_decoder(p48, CFG, seq=64)


# =============================================================================================
# (d) the demo (plena demo / python -m plena.demo)
# =============================================================================================

def test_demo_models_match_presets():
    from plena.demo import MODELS
    assert list(MODELS) == sorted(PRESETS)


def test_demo_cli_end_to_end(monkeypatch, capsys):
    """``plena demo`` on a tiny shape (the preset table is patched to keep the test fast)."""
    import re

    from plena import cli
    from plena.frontend import model

    monkeypatch.setitem(model.PRESETS, "clm-60m", dict(TINY, rope_theta=10000.0, eps=1e-5))
    rc = cli.main(["demo", "--model", "clm-60m", "--layers", "1", "--no-progress"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    m = re.fullmatch(r"demo: layers=1 bit_exact=([\d.]+)% rel_l2_fp32=([\d.e+-]+) emulate_s=([\d.]+) "
                     r"instructions=(\d+)", lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) == 100.0 and 0 < float(m.group(2)) < 0.15 and int(m.group(4)) > 10_000
    assert any("L0.attn" in ln for ln in lines)


def test_compile_writes_upstream_files_that_plena_run_reproduces(monkeypatch, tmp_path):
    """``plena compile`` writes the upstream files; ``plena run`` on them (the reference's flags)
    gives the same VRAM as running the built program directly."""
    import shlex

    from plena import cli
    from plena.demo import compile_to_folder
    from plena.frontend import model

    monkeypatch.setitem(model.PRESETS, "clm-60m", dict(TINY, rope_theta=10000.0, eps=1e-5))
    assert cli.main(["compile", "--model", "clm-60m", "--layers", "1", "--out", str(tmp_path / "m")]) == 0
    folder = tmp_path / "m"
    for name in ("program.asm", "program.mem", "hbm.bin", "fp_sram.bin", "int_sram.bin", "vram_preload.bin",
                 "plena_settings.toml", "tensors.json", "run.sh"):
        assert (folder / name).is_file(), name
    run_line = (folder / "run.sh").read_text().strip().splitlines()[-1]
    flags = shlex.split(run_line.split(" run ", 1)[1].replace('"$@"', ""))
    monkeypatch.chdir(folder)
    assert cli.main(["run", *flags, "--out", str(tmp_path / "dumps")]) == 0
    prog, meta, _ = compile_to_folder(tmp_path / "again", model="clm-60m", layers=1)
    res = prog.run(vram=meta["vram_preload"])
    dumped = np.fromfile(tmp_path / "dumps" / "vram_dump.bin", "<u2")
    np.testing.assert_array_equal(dumped, res.vram_bits())
    assert np.any(meta["intermediates"]["final_norm"].read(prog, res) != 0)  # a real output, not zeros
