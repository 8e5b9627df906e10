"""The XLA:CPU option PLENA-JAX sets before JAX starts its backend: whole-loop compilation.

The fast executor (:mod:`plena.emu_jax.fast`) turns PLENA hardware loops into XLA while
loops. XLA:CPU runs a loop body as a sequence of small kernels, each costing ~0.1 us to
launch, and a bit-exact softmax row is ~80 of them: launch overhead, not arithmetic, is most
of the time. XLA:CPU can compile a whole while loop into one function instead (its "small
while-loop hoisting"), but only for loops whose body touches fewer than
``xla_cpu_small_while_loop_byte_threshold`` bytes, 1 KiB by default, while the machine state
a body carries is hundreds of KiB. Raising the threshold makes every loop without a
scatter or sort one function: on ``ci_flash_attention_m64b16b2s32`` the compiled blocks run ~2x
faster (docs/emulator.md has the measurements). The results are the same bits (the same HLO,
emitted another way; the test suite compares every executor bit for bit).

XLA reads the option from ``XLA_FLAGS`` once, when JAX starts its CPU backend, so
:func:`configure` runs when :mod:`plena` is imported. It leaves ``XLA_FLAGS`` alone when it
already names ``xla_backend_extra_options`` (your setting wins) or when
``PLENA_JAX_XLA_OPTIONS=0``. If JAX's backend started before :mod:`plena` was imported, the
option cannot take effect: a warning says so (results are unchanged, only speed).
"""

from __future__ import annotations

import os
import warnings

OPTION = "xla_cpu_small_while_loop_byte_threshold"
LOOP_BYTES = 1 << 30  #: hoist every loop XLA can (it skips loops with a scatter, sort or custom call)
FLAG = f"--xla_backend_extra_options={OPTION}={LOOP_BYTES}"
ENV_SWITCH = "PLENA_JAX_XLA_OPTIONS"  #: "0": leave XLA_FLAGS as it is


def configure(environ=None) -> bool:
    """Add :data:`FLAG` to ``XLA_FLAGS`` in ``environ`` (default: the process environment).
    Returns whether it was added."""
    env = os.environ if environ is None else environ
    if env.get(ENV_SWITCH, "1") == "0":
        return False
    flags = env.get("XLA_FLAGS", "")
    if "xla_backend_extra_options" in flags:
        return False
    env["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    if environ is None and _backend_started():
        warnings.warn(f"JAX started its backend before plena was imported, so XLA ignores {FLAG}: "
                      "the fast executor's loops run slower (results are the same). Import plena "
                      "before running JAX code, or set XLA_FLAGS yourself.", RuntimeWarning, stacklevel=3)
    return True


def _backend_started() -> bool:
    import sys

    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", None)
    return bool(started and started())


def loops_hoisted() -> bool:
    """Whether XLA:CPU compiles a while loop that touches a few KiB as one function in this
    process (the option is in effect)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def body(i, x):
        return (x * 1.5).at[i].set(x[i] + 1.0)

    text = jax.jit(lambda x: lax.fori_loop(0, 4, body, x)).lower(jnp.zeros(4096, jnp.float32)).compile().as_text()
    return "xla_cpu_small_call" in text
