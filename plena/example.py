"""The built-in example behind ``plena example``: a row-wise softmax of a 4x64 activation,
written in PLENA assembly, run on the emulator and checked against numpy."""

from __future__ import annotations

import numpy as np

from plena.config import default_config
from plena.numerics.bf16 import bf16_bits_to_f32_np, f16_bits_to_bf16_bits_np
from plena.numerics.formats import MXFP8
from plena.numerics.mx import mx_decode_np, mx_encode_np

ROWS, COLS = 4, 64

# Activation X (4 rows x 64, MXFP8) at HBM 0: elements 0..255, scales 256..287.
# Softmax of each row in place in VRAM, then stored back to HBM at 512 (scales at 768).
SOURCE = """\
; load X: H_PREFETCH_V moves 4 rows of VLEN = 64 elements
S_ADDI_INT gp1, gp0, 256
C_SET_SCALE_REG gp1
C_SET_ADDR_REG a0, gp0, gp0
S_ADDI_INT gp2, gp0, 0
H_PREFETCH_V gp2, gp0, a0, 0, 0
S_LD_FP f1, gp0, 0          ; f1 = -inf (FP SRAM[0])
C_LOOP_START gp3, 4         ; one iteration per row
S_ADD_FP f2, f1, f0         ; running max = -inf
V_RED_MAX f2, gp2, 0
V_SUB_VF gp2, gp2, f2, 0, 0 ; x - max
V_EXP_V gp2, gp2, 0
S_ADD_FP f3, f0, f0         ; sum = 0
V_RED_SUM f3, gp2
S_RECI_FP f4, f3
V_MUL_VF gp2, gp2, f4, 0
S_ADDI_INT gp2, gp2, 64
C_LOOP_END gp3
; store the 4 rows to HBM 512 (scales at 512 + 256)
S_ADDI_INT gp4, gp0, 512
C_SET_ADDR_REG a1, gp0, gp4
S_ADDI_INT gp2, gp0, 0
H_STORE_V gp2, gp0, a1, 0, 0
"""


def build_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((ROWS, COLS)) * 2).astype(np.float32)
    elem, scale = mx_encode_np(x, MXFP8)
    hbm = np.zeros(1024, np.uint8)
    hbm[:256] = elem.reshape(-1)
    hbm[256:288] = scale.reshape(-1)
    fpsram = f16_bits_to_bf16_bits_np(np.array([np.float16(-np.inf)]).view(np.uint16))
    return x, hbm, fpsram


def main() -> int:
    from plena.emu_jax.api import run
    from plena.isa import assemble

    cfg = default_config()
    x, hbm, fpsram = build_inputs()
    result = run(assemble(SOURCE), cfg, hbm=hbm, fpsram=fpsram, hbm_size=4096)
    vram = bf16_bits_to_f32_np(result.vram_bits()[: ROWS * COLS]).reshape(ROWS, COLS)
    xq = mx_decode_np(hbm[:256].reshape(ROWS, COLS), hbm[256:288].reshape(ROWS, COLS // 8), MXFP8)
    ref = np.exp(xq - xq.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    out = result.dumps(with_hbm=True).hbm
    stored = mx_decode_np(out[512:768].reshape(ROWS, COLS), out[768:800].reshape(ROWS, COLS // 8), MXFP8)
    print(cfg.describe())
    print(f"softmax of a {ROWS}x{COLS} MXFP8 activation: {result.instructions} instructions, "
          f"{result.cycles} non-HBM cycles, HBM {result.hbm_bytes_read} B read / {result.hbm_bytes_written} B written")
    print(f"wall: load {result.load_s:.2f} s, compile {result.compile_s:.2f} s, run {result.run_s:.4f} s")
    print(f"VRAM result vs float64 softmax of the quantised input: max abs err "
          f"{np.abs(vram - ref).max():.2e} (bf16 ulp at 1.0 = 7.8e-3); row sums {np.round(vram.sum(1), 3)}")
    print(f"after MXFP8 store to HBM: max abs err {np.abs(stored - ref).max():.2e}")
    return 0
