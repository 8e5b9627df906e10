"""Golden model: PLENA's arithmetic as differentiable JAX functions with a named quantisation
policy (bit-exact with the emulator under ``Policy.hardware()``, plain f32 under
``Policy.fp32()``).

* :mod:`.quant` — quantisation points, :class:`Policy`, :func:`q`.
* :mod:`.primitives` — instruction-level arithmetic (vector / scalar ops, reductions, MX round
  trips, the K-chunked systolic matmul).
"""

from .primitives import (fpreg, fpsram, k_chunked_matmul, matmul_tiles, mx_qdq, red_max_into,
                         red_sum_into, row_sum, s_add, s_exp, s_max, s_mul, s_reci, s_sqrt, s_sub,
                         v_add, v_exp, v_max, v_min, v_mul, v_reci, v_sub, vram)
from .quant import (FP32, HARDWARE, HBM_POINTS, MODES, POINTS, Policy, mx_round, q, round_fpreg,
                    round_fpsram_preload, round_vram, straight_through)

__all__ = [
    # quant
    "Policy", "q", "POINTS", "HBM_POINTS", "MODES", "HARDWARE", "FP32", "straight_through",
    "round_vram", "round_fpreg", "round_fpsram_preload", "mx_round",
    # primitives
    "vram", "fpreg", "fpsram", "mx_qdq",
    "v_add", "v_sub", "v_mul", "v_max", "v_min", "v_exp", "v_reci",
    "s_add", "s_sub", "s_mul", "s_max", "s_exp", "s_reci", "s_sqrt",
    "row_sum", "red_sum_into", "red_max_into", "matmul_tiles", "k_chunked_matmul",
]
