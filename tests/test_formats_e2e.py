"""Non-default precision tables end to end: the emulator and the hardware golden stay
bit-identical (sub-byte MX, MXINT, other blocks, Plain HBM, narrower VRAM / SCALAR_FP, VRAM /
SCALAR_FP wider than bf16 in the f32 container, 16-bit H_STORE_V), dumps follow the formats,
and check_formats names the key of a table it cannot honour."""

import dataclasses

import numpy as np
import pytest

from plena.config import ConfigError, default_config
from plena.emu_jax.ops_hbm import PrecisionWarning, UnsupportedFormat, check_formats
from plena.frontend import ProgramBuilder
from plena.frontend import ops_basic as F
from plena.golden import Policy
from plena.golden import ops_basic as G
from plena.numerics import codec
from plena.numerics.formats import E8M0, FloatType, IntType, MxFormat, PlainFormat

BASE = default_config().replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=8,
                                hbm_m_prefetch_amount_raw=32, hbm_v_prefetch_amount=4,
                                hbm_v_writeback_amount=8)


def _cfg(**prec):
    return BASE.replace(precision=dataclasses.replace(BASE.precision, **prec))


CASES = {
    # MXFP4 weights (packed nibbles, block 16), MXINT8 activations (block 8), MXINT4 KV,
    # VRAM e5m6, scalar unit e6m5 (the RTL's)
    "mxfp4w-mxint8a-e5m6vram-e6m5fp": _cfg(
        hbm_m_weight_type=MxFormat(16, FloatType(True, 2, 1), E8M0),
        hbm_m_kv_type=MxFormat(16, IntType(4), E8M0),
        hbm_v_act_type=MxFormat(8, IntType(8), E8M0),
        hbm_v_kv_type=MxFormat(16, IntType(4), E8M0),
        vector_sram_type=PlainFormat(FloatType(True, 5, 6)),
        scalar_fp=FloatType(True, 6, 5)),
    # Plain fp8 (e4m3, RNE) activations and KV, MXFP6 weights block 8, MRAM in e5m10-like e8m10
    "plain-e4m3a-mxfp6w-e8m10mram": _cfg(
        hbm_m_weight_type=MxFormat(8, FloatType(True, 3, 2), E8M0),
        hbm_v_act_type=PlainFormat(FloatType(True, 4, 3)),
        hbm_v_kv_type=PlainFormat(FloatType(True, 4, 3)),
        hbm_m_kv_type=PlainFormat(FloatType(True, 4, 3)),
        matrix_sram_type=PlainFormat(FloatType(True, 8, 10))),
    # types f32 does not hold: e9m10 VRAM (a 9-bit exponent; mantissa short enough that
    # products with the weights are exact, see docs/formats.md), e9m22 MRAM, e10m21 scalar unit,
    # 4-byte Plain e9m22 activations and KV in HBM
    "beyond-f32-e9m22": _cfg(
        vector_sram_type=PlainFormat(FloatType(True, 9, 10)),
        matrix_sram_type=PlainFormat(FloatType(True, 9, 22)),
        scalar_fp=FloatType(True, 10, 21),
        hbm_v_act_type=PlainFormat(FloatType(True, 9, 22)),
        hbm_v_kv_type=PlainFormat(FloatType(True, 9, 22)),
        hbm_m_kv_type=PlainFormat(FloatType(True, 9, 22))),
    # Int32 VRAM and Int32 activations in HBM (values beyond 2**24 pass the f32 datapath)
    "int32-vram-act": _cfg(
        vector_sram_type=PlainFormat(IntType(32)),
        hbm_v_act_type=PlainFormat(IntType(32))),
}


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_linear_rmsnorm_store_bit_exact(name):
    cfg = CASES[name]
    if name.startswith(("beyond", "int32")):
        with pytest.warns(PrecisionWarning, match="VECTOR_SRAM_TYPE"):
            check_formats(cfg)
    else:
        check_formats(cfg)
    rng = np.random.default_rng(0)
    M, K, N = 8, 2 * cfg.mlen, 2 * cfg.mlen
    x = rng.standard_normal((M, K)).astype(np.float32) * 3
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    b = ProgramBuilder(cfg)
    xt = b.hbm_input("x", x, pad_rows=cfg.hbm_v_prefetch_amount)
    wt = b.hbm_input("w", w, use="weight", pad_rows=cfg.hbm_m_prefetch_amount)
    y = F.linear(b, xt, wt)
    out = b.hbm_output("out", M, N)
    z = F.rms_norm(b, y, store=out)
    prog = b.build()
    res = prog.run()

    pol = Policy.hardware(cfg)
    xg = G.from_hbm(x, pol)
    yg = G.linear(xg, w, cfg=cfg, policy=pol)
    zg = G.rms_norm(yg, cfg=cfg, policy=pol)
    og = G.to_hbm(zg, pol)
    assert np.array_equal(_bits(y.read(prog, res)), _bits(yg))
    assert np.array_equal(_bits(z.read(prog, res)), _bits(zg))
    assert np.array_equal(_bits(prog.read_hbm_output(res, out)), _bits(og))
    # the formats really were applied: VRAM values lie in the VRAM type, HBM output in its format
    vt = cfg.precision.vector_sram_type.data
    zv = z.read(prog, res)
    assert np.array_equal(_bits(codec.round_to_np(zv, vt)), _bits(zv))
    # and they matter: the default-format golden differs
    assert not np.array_equal(_bits(G.linear(G.from_hbm(x), w, cfg=BASE)), _bits(yg))


def test_check_formats_names_the_key():
    with pytest.raises(UnsupportedFormat, match="VECTOR_SRAM_TYPE"):
        check_formats(_cfg(vector_sram_type=PlainFormat(FloatType(True, 9, 25))))  # 35 bits
    with pytest.raises(UnsupportedFormat, match="VECTOR_SRAM_TYPE"):
        check_formats(_cfg(vector_sram_type=PlainFormat(IntType(33))))
    with pytest.raises(UnsupportedFormat, match="SCALAR_FP"):
        check_formats(_cfg(scalar_fp=IntType(16)))
    with pytest.raises(UnsupportedFormat, match="MATRIX_SRAM_TYPE"):
        check_formats(_cfg(matrix_sram_type=PlainFormat(FloatType(False, 1, 31))))
    with pytest.raises(ConfigError, match="HBM_V_ACT_TYPE"):  # the config already refuses it
        check_formats(_cfg(hbm_v_act_type=PlainFormat(IntType(40))))
    # wider than bf16: honoured (f32 containers, wide H_STORE_V slots)
    check_formats(WIDE)
    check_formats(_cfg(vector_sram_type=PlainFormat(FloatType(True, 8, 23)), scalar_fp=FloatType(True, 5, 10),
                       hbm_v_act_type=PlainFormat(FloatType(True, 8, 23))))
    # beyond f32: honoured through the f32 datapath, with a warning naming the key
    with pytest.warns(PrecisionWarning, match="SCALAR_FP"):
        check_formats(_cfg(scalar_fp=FloatType(True, 11, 20)))
    with pytest.warns(PrecisionWarning, match="MATRIX_SRAM_TYPE"):
        check_formats(_cfg(matrix_sram_type=PlainFormat(FloatType(True, 5, 26))))


# fp16 (e5m10) VRAM and MRAM, fp32 (e8m23) scalar unit, 16-bit Plain fp16 activations in HBM
# (H_STORE_V / H_PREFETCH_V of 2-byte elements), MXFP8 weights and KV.
WIDE = _cfg(vector_sram_type=PlainFormat(FloatType(True, 5, 10)),
            matrix_sram_type=PlainFormat(FloatType(True, 5, 10)),
            scalar_fp=FloatType(True, 8, 23),
            hbm_v_act_type=PlainFormat(FloatType(True, 5, 10)))


def test_wide_vram_scalar_and_16bit_store_bit_exact(tmp_path):
    """Linear -> RMSNorm -> softmax (V_EXP_V on f32-held operands, S_SQRT/S_RECI in e8m23)
    -> 16-bit store: emulator == hardware golden bit for bit, containers are u32, and the
    dumps have the documented layouts."""
    from plena.emu_jax.state import fp_container, vram_container
    from plena.verify.dumps import read_dump_dir, write_dump_dir

    cfg = WIDE
    assert vram_container(cfg) == np.uint32 and fp_container(cfg) == np.uint32
    assert vram_container(BASE) == np.uint16 and fp_container(BASE) == np.uint16  # default unchanged
    rng = np.random.default_rng(1)
    M, K, N = 8, 2 * cfg.mlen, 2 * cfg.mlen
    x = rng.standard_normal((M, K)).astype(np.float32) * 3
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    b = ProgramBuilder(cfg)
    xt = b.hbm_input("x", x, pad_rows=cfg.hbm_v_prefetch_amount)
    wt = b.hbm_input("w", w, use="weight", pad_rows=cfg.hbm_m_prefetch_amount)
    y = F.linear(b, xt, wt)
    z = F.rms_norm(b, y)
    out = b.hbm_output("out", M, N)
    s = F.softmax(b, z, store=out)
    prog = b.build()
    res = prog.run()
    assert res.state.vram.dtype == np.uint32 and res.state.fp.dtype == np.uint32
    assert res.state.fpsram.dtype == np.uint32

    pol = Policy.hardware(cfg)
    yg = G.linear(G.from_hbm(x, pol), w, cfg=cfg, policy=pol)
    zg = G.rms_norm(yg, cfg=cfg, policy=pol)
    sg = G.softmax(zg, cfg=cfg, policy=pol)
    og = G.to_hbm(sg, pol)
    for got, want in ((y.read(prog, res), yg), (z.read(prog, res), zg), (s.read(prog, res), sg),
                      (prog.read_hbm_output(res, out), og)):
        assert np.array_equal(_bits(got), _bits(want))
    # values really are fp16 values, and not all of them bf16 values (the wide container matters)
    sv = s.read(prog, res)
    f16 = FloatType(True, 5, 10)
    assert np.array_equal(_bits(codec.round_to_np(sv, f16)), _bits(sv))
    assert not np.array_equal(_bits(codec.round_to_np(sv, FloatType(True, 8, 7))), _bits(sv))
    # the 16-bit store wrote 2 bytes per element: the output row is the fp16 codes, LE
    raw = np.asarray(res.state.hbm)[out.addr: out.addr + M * N * 2]
    assert np.array_equal(raw.view("<u2").reshape(M, N), codec.encode_np(og, f16).astype(np.uint16))

    # dumps: VRAM and MRAM as packed fp16 codes (2 bytes / element), FP SRAM as f32
    d = res.dumps()
    assert d.vram_type == f16 and d.mram_type == f16 and d.fpsram.dtype == np.uint32
    write_dump_dir(d, tmp_path)
    assert (tmp_path / "vram_dump.bin").stat().st_size == d.vram.size * 2
    assert (tmp_path / "mram_dump.bin").stat().st_size == d.mram.size * 2
    assert (tmp_path / "fpsram_dump.bin").stat().st_size == 4096
    vcodes = np.fromfile(tmp_path / "vram_dump.bin", "<u2")
    assert np.array_equal(codec.decode_np(vcodes, f16).view(np.uint32), d.vram)
    back = read_dump_dir(tmp_path, cfg=cfg, mmap=False)
    for name in ("vram", "mram", "fpsram", "intsram"):
        assert np.array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(d, name))), name
    mram = np.asarray(res.state.mram[:-1]).reshape(-1)
    assert np.array_equal(codec.decode_np(d.mram, f16).view(np.uint32), mram.view(np.uint32))
