"""Tests of numbarope.rotary against explicit rotation matrices (tests/naive.py)."""

import numpy as np
import pytest

import naive
from numbarope import Rotary, apply_rotary, rotary_relative_matrices

LAYOUTS = ("half", "interleaved")
TOL = {np.float32: 2e-6, np.float64: 1e-13}


def _reference(x, positions, dim=None, base=10000.0, layout="half", scaling=None):
    """R_p x row by row with naive.rotation_matrix, in float64."""
    x = np.asarray(x, dtype=np.float64)
    E = x.shape[-1]
    out = np.empty_like(x)
    for r, p in enumerate(positions):
        pp = p if scaling is None else p / scaling
        out[..., r, :] = x[..., r, :] @ naive.rotation_matrix(pp, E, dim, base, layout).T
    return out


# ----------------------------------------------------------------- known values
@pytest.mark.parametrize("layout, expected", [
    ("half", [-1.9841, 1.9599, 2.4624, 4.0198]),
    ("interleaved", [-1.1426, 1.9221, 2.9599, 4.0298]),
])
def test_known_values(layout, expected):
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    out = apply_rotary(x, Rotary(base=10000.0, layout=layout), positions=[1])
    assert out.shape == (1, 4)
    np.testing.assert_array_equal(np.round(out[0], 4), expected)


def test_default_positions_are_arange():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 6))
    np.testing.assert_allclose(apply_rotary(x), apply_rotary(x, Rotary(), np.arange(5)),
                               rtol=0, atol=0)
    # position 0 is the identity
    np.testing.assert_array_equal(apply_rotary(x[:1]), x[:1])


# ------------------------------------------------------ explicit rotation matrices
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, E, dim", [(1, 2, None), (2, 4, None), (7, 8, None),
                                       (13, 16, None), (7, 6, 4), (13, 7, 2),
                                       (31, 16, 8), (8, 5, 4)])
def test_matches_rotation_matrices(layout, dtype, n, E, dim):
    rng = np.random.default_rng(100 + n * 31 + E)
    x = rng.standard_normal((2, n, E)).astype(dtype)
    rot = Rotary(dim=dim, layout=layout)
    out = apply_rotary(x, rot)
    assert out.dtype == dtype and out.shape == x.shape
    ref = _reference(x, np.arange(n), dim=dim, layout=layout)
    np.testing.assert_allclose(out, ref, rtol=0, atol=TOL[dtype] * np.abs(x).max() * 4)
    if dim is not None:   # unrotated trailing features are untouched, bit for bit
        np.testing.assert_array_equal(out[..., dim:], x[..., dim:])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("base", [10.0, 500000.0, 1.5])
def test_base_variants(layout, base):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((13, 8))
    pos = rng.integers(0, 5000, size=13)
    out = apply_rotary(x, Rotary(base=base, layout=layout), positions=pos)
    ref = _reference(x, pos, base=base, layout=layout)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-11)
    # a different base gives a different rotation (the base is actually used)
    other = apply_rotary(x, Rotary(base=base * 2, layout=layout), positions=pos)
    assert np.abs(other - out).max() > 1e-3


def test_linear_scaling_divides_positions():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((7, 6))
    pos = np.arange(7) * 3.0
    out = apply_rotary(x, Rotary(scaling=4.0), positions=pos)
    np.testing.assert_allclose(out, _reference(x, pos, scaling=4.0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(out, apply_rotary(x, Rotary(), positions=pos / 4.0),
                               rtol=0, atol=1e-13)


def test_rotation_preserves_norm_and_composes():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((7, 10))
    out = apply_rotary(x, Rotary(layout="interleaved"), positions=np.full(7, 123.0))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-13)
    twice = apply_rotary(out, Rotary(layout="interleaved"), positions=np.full(7, 100.0))
    once = apply_rotary(x, Rotary(layout="interleaved"), positions=np.full(7, 223.0))
    np.testing.assert_allclose(twice, once, rtol=0, atol=1e-12)


# -------------------------------------------------------- float32 at long positions
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_large_positions_angles_in_float64(layout):
    rng = np.random.default_rng(11)
    pos = np.array([0, 1, 4095, 32768, 65537, 2**19 + 3, 2**20 - 1, 2**20], dtype=np.int64)
    x = rng.uniform(-1, 1, size=(len(pos), 64)).astype(np.float32)
    out = apply_rotary(x, Rotary(layout=layout), positions=pos)
    assert out.dtype == np.float32
    ref = _reference(x.astype(np.float64), pos, layout=layout)
    # only the final rounding to float32 (plus a few ulps of arithmetic) is allowed:
    # a float32 angle would be off by ~2**20 * 2**-24 rad ≈ 0.06 rad here
    err = np.abs(out.astype(np.float64) - ref).max()
    assert err <= 4 * np.finfo(np.float32).eps * np.abs(x).max() * 2, err


def test_positions_as_float32_array_are_still_exact():
    # positions given as float32 (exact integers up to 2**24) must not be rounded further
    x = np.ones((2, 4), dtype=np.float64)
    pos = np.array([2**20, 2**20 - 1], dtype=np.float32)
    out = apply_rotary(x, Rotary(), positions=pos)
    np.testing.assert_allclose(out, _reference(x, pos.astype(np.float64)), rtol=0, atol=1e-12)


# --------------------------------------------------------- relative matrices W_t
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n, E, dim", [(1, 2, None), (2, 4, None), (7, 6, None),
                                       (13, 8, 4), (5, 5, 4)])
def test_relative_matrices_bilinear_form(layout, n, E, dim):
    rng = np.random.default_rng(21 + n)
    rot = Rotary(dim=dim, layout=layout, base=100.0)
    W = rotary_relative_matrices(n, rot, head_dim=E)
    assert W.shape == (2 * n - 1, E, E) and W.dtype == np.float64
    q = rng.standard_normal((n, E))
    k = rng.standard_normal((n, E))
    rq = _reference(q, np.arange(n), dim=dim, base=100.0, layout=layout)
    rk = _reference(k, np.arange(n), dim=dim, base=100.0, layout=layout)
    lhs = np.einsum("ie,ijef,jf->ij", q,
                    W[np.subtract.outer(np.arange(n), np.arange(n)) + n - 1], k)
    rhs = rq @ rk.T
    np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-12)
    # W_0 is the identity and every W_t is orthogonal
    np.testing.assert_allclose(W[n - 1], np.eye(E), atol=1e-15)
    np.testing.assert_allclose(np.einsum("tab,tac->tbc", W, W),
                               np.broadcast_to(np.eye(E), W.shape), atol=1e-13)


def test_relative_matrices_explicit_offsets():
    n, E = 4, 6
    W = rotary_relative_matrices(n, Rotary(layout="interleaved"), head_dim=E)
    for t in range(-(n - 1), n):
        np.testing.assert_allclose(W[t + n - 1],
                                   naive.rotation_matrix(-t, E, layout="interleaved"),
                                   atol=1e-15)


def test_relative_matrices_n0():
    W = rotary_relative_matrices(0, Rotary(), head_dim=4)
    assert W.shape == (0, 4, 4)


# ----------------------------------------------------------- input not modified
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_not_modified(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 7, 8)).astype(dtype)
    x_copy = x.copy()
    out = apply_rotary(x, Rotary(layout="interleaved"))
    np.testing.assert_array_equal(x, x_copy)
    assert not np.shares_memory(out, x)
    # non-contiguous input view
    xt = np.swapaxes(rng.standard_normal((8, 7)), 0, 1)
    xt_copy = xt.copy()
    out2 = apply_rotary(xt)
    np.testing.assert_array_equal(xt, xt_copy)
    np.testing.assert_allclose(out2, _reference(xt_copy, np.arange(7)), atol=1e-13)


# ----------------------------------------------------------------------- errors
def test_error_odd_dim():
    with pytest.raises(ValueError, match="positive even integer"):
        Rotary(dim=3)
    with pytest.raises(ValueError, match="must be even"):
        apply_rotary(np.ones((2, 5)), Rotary())


def test_error_dim_larger_than_head_dim():
    with pytest.raises(ValueError, match=r"dim=8 is larger than head_dim=6"):
        apply_rotary(np.ones((2, 6)), Rotary(dim=8))
    with pytest.raises(ValueError, match="larger than head_dim"):
        rotary_relative_matrices(3, Rotary(dim=8), head_dim=4)


def test_error_unknown_layout():
    with pytest.raises(ValueError, match=r"layout='neox' is unknown"):
        Rotary(layout="neox")


def test_error_positions_and_dtype():
    with pytest.raises(ValueError, match="positions has 3 entries"):
        apply_rotary(np.ones((2, 4)), positions=[0, 1, 2])
    with pytest.raises(ValueError, match="NaN or inf"):
        apply_rotary(np.ones((2, 4)), positions=[0, np.nan])
    with pytest.raises(TypeError, match="float32 or float64"):
        apply_rotary(np.ones((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., n, E\)"):
        apply_rotary(np.ones(4))
