"""Non-default precision tables end to end: the emulator and the hardware golden stay
bit-identical (sub-byte MX, MXINT, other blocks, Plain HBM, narrower VRAM / SCALAR_FP), and
check_formats names the key of a table it cannot honour."""

import dataclasses

import numpy as np
import pytest

from plena.config import default_config
from plena.emu_jax.ops_hbm import UnsupportedFormat, check_formats
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
}


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_linear_rmsnorm_store_bit_exact(name):
    cfg = CASES[name]
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
        check_formats(_cfg(vector_sram_type=PlainFormat(FloatType(True, 5, 10))))
    with pytest.raises(UnsupportedFormat, match="SCALAR_FP"):
        check_formats(_cfg(scalar_fp=FloatType(True, 8, 23)))
    with pytest.raises(UnsupportedFormat, match="HBM_V_ACT_TYPE"):
        check_formats(_cfg(hbm_v_act_type=PlainFormat(FloatType(True, 8, 7))))  # 16-bit store
    check_formats(_cfg(hbm_m_weight_type=PlainFormat(FloatType(True, 8, 7))))  # 16-bit loads are fine
