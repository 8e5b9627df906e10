"""plena.numerics.matmul: the product order shared by the emulator and the golden model."""

import jax
import ml_dtypes
import numpy as np
import pytest

from plena.numerics.matmul import ordered_matmul, ordered_matmul_folded


def sequential(x, w) -> np.ndarray:
    """Reference: numpy f32, k ascending, each product rounded to f32 before its add."""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    p = x[..., :, 0, None] * w[..., 0, None, :]
    for k in range(1, x.shape[-1]):
        p = (p + (x[..., :, k, None] * w[..., k, None, :]).astype(np.float32)).astype(np.float32)
    return p


def spread(rng, shape) -> np.ndarray:
    """Full-mantissa f32 values over 40 binades: the order of the adds shows in the result."""
    return (rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))).astype(np.float32)


@pytest.mark.parametrize("shape", [(4, 64, 4), (1, 64, 4), (16, 16, 64), (3, 7, 5)])
def test_sums_k_in_ascending_order(shape):
    m, k, n = shape
    rng = np.random.default_rng(m * 100 + k)
    x, w = spread(rng, (m, k)), spread(rng, (k, n))
    got = np.asarray(jax.jit(ordered_matmul)(x, w))
    np.testing.assert_array_equal(got.view(np.uint32), sequential(x, w).view(np.uint32))


def test_products_are_rounded_before_the_add():
    """No fused multiply-add: -1 + (1 + 2**-12)**2 is 2**-11 + 2**-24 with an FMA, 2**-11 when
    the product is rounded to f32 first (its 2**-24 is a tie, to even)."""
    x = np.array([[1.0, 1.0 + 2.0**-12]], np.float32)
    w = np.array([[-1.0], [1.0 + 2.0**-12]], np.float32)
    got = float(np.asarray(jax.jit(ordered_matmul)(x, w))[0, 0])
    assert got == float(sequential(x, w)[0, 0]) == 2.0**-11


def test_result_does_not_depend_on_how_the_blocks_are_grouped():
    """What the fast executor relies on: a [64, 64] by [64, 64] product equals its [4, 64] by
    [64, 4] blocks (one instruction each), and a vmapped batch of blocks, bit for bit (XLA's
    own dot on XLA:CPU, jax 0.10, did not: its kernels sum k in an order that depends on the shapes)."""
    rng = np.random.default_rng(3)
    x = spread(rng, (64, 64)).astype(ml_dtypes.bfloat16).astype(np.float32)
    w = rng.standard_normal((64, 64)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    w = w * np.exp2(rng.integers(-10, 10, w.shape)).astype(np.float32)  # MX-like: e4m3 times a power of 2
    assert np.isfinite(x).all() and np.isfinite(w).all()
    whole = np.asarray(jax.jit(ordered_matmul)(x, w))
    one = jax.jit(ordered_matmul)
    blocks = np.block([[np.asarray(one(x[i:i + 4], w[:, j:j + 4])) for j in range(0, 64, 4)] for i in range(0, 64, 4)])
    xb, wb = x.reshape(16, 4, 64), w.reshape(64, 16, 4).transpose(1, 0, 2)
    lanes = jax.jit(jax.vmap(jax.vmap(ordered_matmul, (None, 0)), (0, None)))(xb, wb)
    lanes = np.asarray(lanes).transpose(0, 2, 1, 3).reshape(64, 64)
    for got in (blocks, lanes):
        np.testing.assert_array_equal(got.view(np.uint32), whole.view(np.uint32))
    np.testing.assert_array_equal(whole.view(np.uint32), sequential(x, w).view(np.uint32))


def test_leading_axes_broadcast_and_shapes_are_checked():
    rng = np.random.default_rng(4)
    x, w = spread(rng, (2, 3, 5, 8)), spread(rng, (8, 6))
    got = np.asarray(ordered_matmul(x, w))
    assert got.shape == (2, 3, 5, 6)
    np.testing.assert_array_equal(got.view(np.uint32), sequential(x, w).view(np.uint32))
    with pytest.raises(ValueError, match="do not match"):
        ordered_matmul(x, spread(rng, (7, 6)))


#: how the fast executor's lanes (and a batch of input sets) map a product: the vmap, the
#: shapes of x and w, and the sequential reference over the same pairs (numpy broadcasting)
VMAPS = {
    "rows": (lambda f: jax.vmap(f, (0, None)), (5, 4, 16), (16, 4), lambda x, w: sequential(x, w)),
    "cols": (lambda f: jax.vmap(f, (None, 0)), (4, 16), (5, 16, 4), lambda x, w: sequential(x, w)),
    "both": (lambda f: jax.vmap(f, (0, 0)), (5, 4, 16), (5, 16, 4), lambda x, w: sequential(x, w)),
    "rows of cols": (lambda f: jax.vmap(jax.vmap(f, (None, 0)), (0, None)), (5, 4, 16), (6, 16, 4),
                     lambda x, w: sequential(x[:, None], w[None])),
    "cols of rows": (lambda f: jax.vmap(jax.vmap(f, (0, None)), (None, 0)), (6, 4, 16), (5, 16, 4),
                     lambda x, w: sequential(x[None], w[:, None])),
    "both of rows": (lambda f: jax.vmap(jax.vmap(f, (0, None)), (0, 0)), (3, 6, 4, 16), (3, 16, 4),
                     lambda x, w: sequential(x, w[:, None])),
    # per lane a batch of heads times one matrix (M_BMM / M_BTMM): x [H, M, K] @ w [K, N];
    # H = 3 = the vmapped size, so a wrong pairing of axes would not raise
    "heads, cols": (lambda f: jax.vmap(f, (None, 0)), (3, 4, 16), (3, 16, 4), lambda x, w: sequential(x[None], w[:, None])),
    "heads, both": (lambda f: jax.vmap(f, (0, 0)), (2, 3, 4, 16), (2, 16, 4), lambda x, w: sequential(x, w[:, None])),
    "heads, rows": (lambda f: jax.vmap(f, (0, None)), (2, 3, 4, 16), (16, 4), lambda x, w: sequential(x, w)),
}


@pytest.mark.parametrize("how", list(VMAPS))
def test_folded_product_equals_the_plain_one_under_every_vmap(how):
    vmap, x_shape, w_shape, reference = VMAPS[how]
    rng = np.random.default_rng(len(how))
    x, w = spread(rng, x_shape), spread(rng, w_shape)
    want = reference(x, w).view(np.uint32)
    for f in (ordered_matmul, ordered_matmul_folded):
        got = np.asarray(jax.jit(vmap(f))(x, w))
        np.testing.assert_array_equal(got.view(np.uint32), want)


def test_folded_product_runs_its_k_loop_on_one_wide_block():
    """Row blocks x column blocks (the nested lanes of a tile loop): the k loop of the folded
    product carries one [rows * 4, cols * 4] block, the plain one [rows, cols, 4, 4] (innermost
    axis 4 wide: 2.6x slower on XLA:CPU)."""
    x, w = np.ones((16, 4, 64), np.float32), np.ones((16, 64, 4), np.float32)

    def carries(f):
        hlo = jax.jit(VMAPS["rows of cols"][0](f)).lower(x, w).compile().as_text()
        return {line.split("= (")[1].split(")")[0] for line in hlo.splitlines() if " while(" in line}

    assert any("f32[64,64]" in c for c in carries(ordered_matmul_folded))
    assert not any("f32[64,64]" in c for c in carries(ordered_matmul))
