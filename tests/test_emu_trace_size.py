"""The code the fast executor traces per instruction stays small: what an instruction's
fields decide is decided while tracing (its fields are constants there), and the "no write"
slots of an Effect are constants, not operations. Compile time follows the traced code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plena.config import default_config
from plena.emu_jax import api, fast, memory, ops_vector
from plena.emu_jax.effects import no_effect
from plena.emu_jax.plan import plan_program
from plena.emu_jax.state import init_state
from plena.isa import assemble
from plena.isa.opcodes import BY_MNEMONIC
from plena.numerics import ieee

CFG = default_config()


def _machine():
    p = api.load_program(assemble("S_ADDI_INT gp1, gp0, 1\n"))
    geo = api.geometry_for(p, CFG, plan_program(p, CFG), hbm_len=0, vram_len=0, hbm_capacity=1 << 20)
    st = init_state(geo, hbm_capacity=1 << 20)
    return geo, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), st)


def _trace(geo, abstract, mnemonic, rd=1, rs1=2, rs2=3, rs3=0, funct1=0):
    """The jaxpr of one instruction as the fast executor emits it."""
    key = ("I", BY_MNEMONIC[mnemonic].code, rd, rs1, rs2, rs3, funct1)
    ops = jax.ShapeDtypeStruct((3,), jnp.int32)
    return jax.make_jaxpr(lambda o, s: fast._instr(geo, key, o, s))(ops, abstract)


def test_no_effect_is_constants_but_the_next_pc():
    geo, abstract = _machine()
    jaxpr = jax.make_jaxpr(lambda s: no_effect(geo, s))(abstract)
    assert [e.primitive.name for e in jaxpr.eqns] == ["add"]  # next_pc = pc + 1


def test_pick_on_a_known_condition_builds_only_the_chosen_value():
    built = []
    a = lambda: built.append("a") or jnp.float32(1)  # noqa: E731
    b = lambda: built.append("b") or jnp.float32(2)  # noqa: E731
    assert memory.pick(np.int32(0) == 0, a, b) == 1 and built == ["a"]
    assert memory.pick(np.int32(3) == 0, a, b) == 2 and built == ["a", "b"]
    # a traced condition (the interpreter's fields): both values, as jnp.where
    f = jax.jit(lambda c: memory.pick(c == 0, a, b))
    assert [float(f(jnp.int32(c))) for c in (0, 3)] == [1.0, 2.0]


@pytest.mark.parametrize("funct1", [0, 1])
def test_v_sub_vf_traces_one_subtraction(monkeypatch, funct1):
    """funct1 picks a - s or s - a: only that one is traced (both were, then selected)."""
    geo, abstract = _machine()
    calls = []
    real = ieee.sub
    monkeypatch.setattr(ieee, "sub", lambda x, y: calls.append((x.shape, y.shape)) or real(x, y))
    _trace(geo, abstract, "V_SUB_VF", funct1=funct1)
    vlen = (CFG.vlen,)
    assert calls == [(vlen, ()) if funct1 == 0 else ((), vlen)], calls


@pytest.mark.parametrize("rs3, sums", [(0, 1), (1, 2)])
def test_v_red_sum_sums_heads_only_when_masked(monkeypatch, rs3, sums):
    """Without a head mask (rs3 = 0) the row is summed once; per-head sums (masked heads
    replaced by their sum) are traced only for a masked reduction."""
    geo, abstract = _machine()
    calls = []
    real = ops_vector.torch_sum
    monkeypatch.setattr(ops_vector, "torch_sum", lambda x: calls.append(x.shape) or real(x))
    _trace(geo, abstract, "V_RED_SUM", rd=1, rs1=2, rs2=0, rs3=rs3)
    assert len(calls) == sums, calls


def test_rules_on_known_fields_add_no_operations():
    """err_if on a condition known while tracing (an instruction field in the fast executor)
    is a constant, and first_err skips known zeros, yet keeps the order of the rules: the
    first rule that fails wins, known or traced."""
    from plena.emu_jax.errors import Err

    fine, bad = memory.err_if(np.int32(3) >= 8, Err.FP_REG), memory.err_if(np.int32(9) >= 8, Err.FP_REG)
    assert (fine, bad) == (0, int(Err.FP_REG))
    traced = jax.make_jaxpr(lambda c: memory.first_err(fine, memory.err_if(c, Err.VRAM_RANGE), fine))(True)
    assert len(traced.eqns) <= 3, traced  # the traced rule alone (select, compare, select)
    run = jax.jit(lambda c, first: memory.first_err(bad if first else fine, memory.err_if(c, Err.VRAM_RANGE), bad),
                  static_argnums=1)
    assert int(run(True, True)) == int(Err.FP_REG)  # a known failing rule before the traced one
    assert int(run(True, False)) == int(Err.VRAM_RANGE)  # the traced rule before a known one
    assert int(run(False, False)) == int(Err.FP_REG)
