"""plena.xla_options: the XLA:CPU whole-loop option is set on import, and only when the user
has not chosen for themselves."""

import os
import subprocess
import sys

from plena import xla_options


def test_configure_adds_the_flag_and_keeps_other_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_options.configure(env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", xla_options.FLAG]
    env = {}
    assert xla_options.configure(env) and env["XLA_FLAGS"] == xla_options.FLAG


def test_configure_leaves_a_users_choice_alone():
    own = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=2048"
    env = {"XLA_FLAGS": own}
    assert not xla_options.configure(env) and env["XLA_FLAGS"] == own
    env = {xla_options.ENV_SWITCH: "0"}
    assert not xla_options.configure(env) and "XLA_FLAGS" not in env


def _hoisted_in_child(**env) -> str:
    code = "import plena; from plena.xla_options import loops_hoisted; print(loops_hoisted())"
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_options.ENV_SWITCH)}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=300, check=True)
    return out.stdout.strip()


def test_importing_plena_makes_xla_compile_loops_whole():
    """In a fresh process, importing plena is enough for XLA to compile a loop of a few KiB as
    one function; with the switch off, XLA's default (1 KiB) leaves it as separate kernels."""
    assert _hoisted_in_child() == "True"
    assert _hoisted_in_child(**{xla_options.ENV_SWITCH: "0"}) == "False"
