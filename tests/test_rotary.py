"""Tests of numbarope.rotary against explicit rotation matrices (tests/naive.py)."""

import re
from fractions import Fraction

import numpy as np
import pytest

import naive
import numbarope
from numbarope import Rotary, apply_rotary, rope_attention, rotary_relative_matrices
from numbarope.rotary import (DynamicNTKScaling, Llama3Scaling, LinearScaling,
                              LongRopeScaling, YarnScaling, rotary_tables)

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


def test_apply_rotary_returns_copy_and_keeps_input():
    n = 6
    q = np.random.default_rng(0).standard_normal((2, n, 4)) * 0.3
    c = q.copy()
    out = apply_rotary(q, Rotary(), positions=np.arange(n) + 7)
    assert out is not q and not np.shares_memory(out, q)
    np.testing.assert_array_equal(q, c)
    pos = np.arange(n, dtype=np.float64)
    pc = pos.copy()
    apply_rotary(q, positions=pos)
    np.testing.assert_array_equal(pos, pc)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_rotary_keeps_dtype_and_matches_naive(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 6)).astype(dtype)
    for rot in (Rotary(), Rotary(dim=4, layout="interleaved"), Rotary(base=500000.0)):
        out = apply_rotary(x, rot, positions=np.arange(5) + 3)
        assert out.dtype == dtype
        ref = np.stack([naive.rotation_matrix(p + 3, 6, rot.dim, rot.base, rot.layout)
                        @ x[p].astype(np.float64) for p in range(5)])
        tol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(out, ref, rtol=0, atol=tol * 10)


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
    with pytest.raises(ValueError, match=r"layout='llama' is unknown.*'half'.*'neox'.*'gptj'"):
        Rotary(layout="llama")
    with pytest.raises(ValueError, match=r"layout=None is unknown"):
        Rotary(layout=None)


def test_error_positions_and_dtype():
    with pytest.raises(ValueError, match="positions has 3 entries"):
        apply_rotary(np.ones((2, 4)), positions=[0, 1, 2])
    with pytest.raises(ValueError, match="NaN or inf"):
        apply_rotary(np.ones((2, 4)), positions=[0, np.nan])
    with pytest.raises(TypeError, match="float32 or float64"):
        apply_rotary(np.ones((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., n, E\)"):
        apply_rotary(np.ones(4))


@pytest.mark.parametrize("dim", [3, 0, -2])
def test_rotary_dim_not_positive_even(dim):
    with pytest.raises(ValueError, match=rf"dim.*{dim}"):
        Rotary(dim=dim)


def test_rotary_dim_wrong_type():
    with pytest.raises(TypeError, match="dim"):
        Rotary(dim=4.0)


@pytest.mark.parametrize("layout", ["full", "HALF", None])
def test_unknown_layout_lists_valid_ones(layout):
    with pytest.raises(ValueError, match=r"layout=.*'half', 'interleaved'"):
        Rotary(layout=layout)


@pytest.mark.parametrize("base", [1.0, 0.5, np.nan, np.inf])
def test_bad_rotary_base(base):
    with pytest.raises(ValueError, match="base"):
        Rotary(base=base)


def test_rotary_scaling_wrong_type_names_argument():
    with pytest.raises((TypeError, ValueError), match="scaling"):
        Rotary(scaling="a")


APPLY_ROTARY_CASES = [
    (dict(x=np.zeros((3, 4), np.int64)), TypeError, r"x must be float32 or float64.*int64"),
    (dict(x=np.zeros((3, 4), np.float16)), TypeError, r"float16.*astype\(np\.float32\)"),
    (dict(x=np.zeros((3, 4), np.complex128)), TypeError, r"complex128"),
    (dict(x=np.zeros((3, 4), object)), TypeError, r"object"),
    (dict(x=np.zeros((3, 4), bool)), TypeError, r"bool"),
    (dict(x=np.zeros(4)), ValueError, r"\(\.\.\., n, E\).*\(4,\)"),
    (dict(x=np.zeros((3, 3))), ValueError, r"even.*head_dim=3"),
    (dict(x=np.zeros((3, 4)), rotary=Rotary(dim=6)), ValueError, r"dim=6.*head_dim=4"),
    (dict(x=np.zeros((3, 4)), rotary="half"), TypeError, r"rotary must be a numbarope\.Rotary"),
    (dict(x=np.zeros((3, 4)), positions=[0, 1]), ValueError, r"positions has 2 entries.*n=3"),
    (dict(x=np.zeros((3, 4)), positions=[0, 1, np.nan]), ValueError, r"positions.*NaN or inf"),
    (dict(x=np.zeros((3, 4)), positions=[0, np.inf, 1]), ValueError, r"positions.*NaN or inf"),
]


@pytest.mark.parametrize("kw, exc, pattern", APPLY_ROTARY_CASES,
                         ids=[str(i) for i in range(len(APPLY_ROTARY_CASES))])
def test_apply_rotary_bad_input(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        apply_rotary(**kw)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_apply_rotary_non_finite_x_refused(bad):
    x = np.zeros((3, 4))
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or inf"):
        apply_rotary(x)


def test_rotary_false_means_none_and_base_string_refused():
    """New-user findings."""
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 2, 64, 8)) * 0.3
    v = rng.standard_normal((2, 64, 8))
    np.testing.assert_array_equal(numbarope.rope_attention(q, k, v, rotary=False),
                                  numbarope.rope_attention(q, k, v))
    with pytest.raises(TypeError, match="base"):
        numbarope.Rotary(base="1e4")
    with pytest.raises(ValueError, match="n must be an int"):
        numbarope.rotary_relative_matrices(4.0, None, 4)


# ------------------------------------------------------------- layout aliases
@pytest.mark.parametrize("alias, canonical", [("neox", "half"), ("rotate_half", "half"),
                                              ("gptj", "interleaved"),
                                              ("rotate_every_two", "interleaved")])
def test_layout_aliases(alias, canonical):
    rot = Rotary(layout=alias)
    assert rot.layout == canonical and rot == Rotary(layout=canonical)
    assert hash(rot) == hash(Rotary(layout=canonical))


# ------------------------------------------------------------------ scalings
SCALINGS = [
    LinearScaling(2.0),
    DynamicNTKScaling(2.0, 16),
    Llama3Scaling(8.0, 1.0, 4.0, 16),
    YarnScaling(4.0, 16),
    YarnScaling(4.0, 16, beta_fast=8, beta_slow=2, truncate=False, attention_factor=1.3),
    LongRopeScaling([1.0, 1.2, 1.5, 2.0], [1.0, 2.0, 4.0, 8.0], 16, factor=4.0),
]


def test_float_scaling_is_linear():
    assert Rotary(scaling=2.0) == Rotary(scaling=LinearScaling(2.0))
    assert Rotary(scaling=2).scaling == LinearScaling(2.0)
    np.testing.assert_array_equal(Rotary(scaling=2.0).inv_freq(8), Rotary().inv_freq(8) / 2)


@pytest.mark.parametrize("scaling", SCALINGS, ids=repr)
def test_scalings_hashable_and_tables_cached(scaling):
    rot = Rotary(base=100.0, scaling=scaling)
    assert hash(rot) == hash(Rotary(base=100.0, scaling=scaling))
    assert rot in {rot}
    a = rotary_tables(rot, 9, 8)
    assert rotary_tables(rot, 9, 8)[0] is a[0]          # cache hit
    assert np.all(np.isfinite(rot.inv_freq(8, seq_len=1000)))


@pytest.mark.parametrize("scaling", SCALINGS, ids=repr)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scaled_rotation_is_attention_factor_times_rotation(scaling, layout):
    # out = m · R(angles) x on the rotated features; the rest is copied unscaled
    rng = np.random.default_rng(12)
    E, dim, n = 10, 8, 40                  # n > 16: dynamic and longrope scale
    rot = Rotary(dim=dim, base=100.0, layout=layout, scaling=scaling)
    x = rng.standard_normal((2, n, E))
    out = apply_rotary(x, rot)
    m = rot.attention_factor
    ang = rot.angles(np.arange(n), E)
    first, second = rot.pairs(E)
    ref = x.copy()
    c, s = np.cos(ang), np.sin(ang)
    ref[..., first] = m * (x[..., first] * c - x[..., second] * s)
    ref[..., second] = m * (x[..., second] * c + x[..., first] * s)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(out[..., dim:], x[..., dim:])
    # the relative matrices carry m**2 on the rotated block
    W = rotary_relative_matrices(n, rot, head_dim=E)
    lhs = np.einsum("ie,ijef,jf->ij", x[0],
                    W[np.subtract.outer(np.arange(n), np.arange(n)) + n - 1], x[1])
    np.testing.assert_allclose(lhs, out[0] @ out[1].T, rtol=0, atol=1e-11)


def test_yarn_attention_factor_values():
    assert YarnScaling(4.0, 16).effective_attention_factor == pytest.approx(0.1 * np.log(4) + 1)
    assert YarnScaling(0.5, 16).effective_attention_factor == 1.0
    y = YarnScaling(4.0, 16, mscale=0.5, mscale_all_dim=1.0)
    assert y.effective_attention_factor == pytest.approx(
        (0.05 * np.log(4) + 1) / (0.1 * np.log(4) + 1))
    assert Rotary(scaling=YarnScaling(4.0, 16, attention_factor=2.0)).attention_factor == 2.0
    # angles stay pure: the factor is only in the tables
    rot = Rotary(scaling=YarnScaling(4.0, 16, attention_factor=2.0))
    cos, _ = rotary_tables(rot, 3, 4)
    np.testing.assert_allclose(cos, 2.0 * np.cos(rot.angles(np.arange(3), 4)), atol=1e-15)


def test_rope_attention_sees_attention_factor():
    import numbarope
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((9, 8)) for _ in range(3))
    rot = Rotary(scaling=YarnScaling(4.0, 4))
    out = numbarope.rope_attention(q, k, v, rotary=rot, method="exact")
    out = out[0] if isinstance(out, tuple) else out
    ref = numbarope.rope_attention(apply_rotary(q, rot), apply_rotary(k, rot), v, method="exact")
    ref = ref[0] if isinstance(ref, tuple) else ref
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_dynamic_ntk_depends_on_length_only():
    rot = Rotary(base=100.0, scaling=DynamicNTKScaling(2.0, 16))
    # up to the trained length: plain RoPE
    np.testing.assert_array_equal(rotary_tables(rot, 16, 8)[0], rotary_tables(Rotary(base=100.0), 16, 8)[0])
    short = np.array(rotary_tables(rot, 12, 8)[0])
    long = rotary_tables(rot, 64, 8)[0]
    assert np.abs(long[:12] - short).max() > 1e-3       # the base grew
    np.testing.assert_array_equal(rotary_tables(rot, 12, 8)[0], short)   # no state kept
    base64 = 100.0 * (2.0 * 64 / 16 - 1.0) ** (8 / 6)
    np.testing.assert_allclose(rot.inv_freq(8, seq_len=64), Rotary(base=base64).inv_freq(8),
                               rtol=1e-15)
    # explicit positions use max(positions) + 1: decoding the last row agrees
    rng = np.random.default_rng(14)
    x = rng.standard_normal((64, 8))
    np.testing.assert_allclose(apply_rotary(x[-1:], rot, positions=[63]),
                               apply_rotary(x, rot)[-1:], rtol=0, atol=1e-14)


def test_llama3_bands():
    sc = Llama3Scaling(8.0, 1.0, 4.0, 64)
    rot = Rotary(base=10000.0, scaling=sc)
    inv0, inv = Rotary(base=10000.0).inv_freq(32), rot.inv_freq(32)
    wl = 2 * np.pi / inv0
    hi, lo = wl < 64 / 4, wl > 64 / 1
    assert hi.any() and lo.any() and (~hi & ~lo).any()
    np.testing.assert_array_equal(inv[hi], inv0[hi])
    np.testing.assert_allclose(inv[lo], inv0[lo] / 8, rtol=1e-15)
    mid = ~hi & ~lo
    assert np.all(inv[mid] < inv0[mid]) and np.all(inv[mid] > inv0[mid] / 8)


def test_longrope_switches_factors():
    sc = LongRopeScaling([1.0, 2.0], [3.0, 4.0], 16, factor=4.0)
    rot = Rotary(base=100.0, scaling=sc)
    inv0 = Rotary(base=100.0).inv_freq(4)
    np.testing.assert_allclose(rot.inv_freq(4, seq_len=16), inv0 / [1.0, 2.0], rtol=1e-15)
    np.testing.assert_allclose(rot.inv_freq(4, seq_len=17), inv0 / [3.0, 4.0], rtol=1e-15)
    assert rot.attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(16)))
    with pytest.raises(ValueError, match="short_factor and long_factor have 2 entries.*needs 4"):
        rot.inv_freq(8)


# ---------------------------------------------------- scaling validation errors
@pytest.mark.parametrize("make, name", [
    (lambda: LinearScaling(0.0), "factor"),
    (lambda: LinearScaling("2"), "factor"),
    (lambda: DynamicNTKScaling(float("nan"), 16), "factor"),
    (lambda: DynamicNTKScaling(2.0, 0), "original_max_position_embeddings"),
    (lambda: DynamicNTKScaling(2.0, 16.5), "original_max_position_embeddings"),
    (lambda: Llama3Scaling(-1.0), "factor"),
    (lambda: Llama3Scaling(8.0, low_freq_factor=0.0), "low_freq_factor"),
    (lambda: Llama3Scaling(8.0, high_freq_factor=float("inf")), "high_freq_factor"),
    (lambda: Llama3Scaling(8.0, 4.0, 1.0), "high_freq_factor must be > low_freq_factor"),
    (lambda: Llama3Scaling(8.0, original_max_position_embeddings=True),
     "original_max_position_embeddings"),
    (lambda: YarnScaling(0.0, 16), "factor"),
    (lambda: YarnScaling(4.0, None), "original_max_position_embeddings"),
    (lambda: YarnScaling(4.0, 16, beta_fast=-1), "beta_fast"),
    (lambda: YarnScaling(4.0, 16, beta_slow=0), "beta_slow"),
    (lambda: YarnScaling(4.0, 16, beta_fast=1, beta_slow=2), "beta_fast must be >= beta_slow"),
    (lambda: YarnScaling(4.0, 16, attention_factor=0.0), "attention_factor"),
    (lambda: YarnScaling(4.0, 16, mscale="x"), "mscale"),
    (lambda: YarnScaling(4.0, 16, mscale_all_dim=float("nan")), "mscale_all_dim"),
    (lambda: YarnScaling(4.0, 16, truncate="yes"), "truncate"),
    (lambda: LongRopeScaling([], [1.0], 16), "short_factor"),
    (lambda: LongRopeScaling([1.0], [0.0], 16), r"long_factor\[0\]"),
    (lambda: LongRopeScaling([1.0], [1.0, 2.0], 16), "same length"),
    (lambda: LongRopeScaling([1.0], [1.0], -3), "original_max_position_embeddings"),
    (lambda: LongRopeScaling([1.0], [1.0], 16, factor=0), "factor"),
    (lambda: LongRopeScaling([1.0], [1.0], 16, attention_factor=-1.0), "attention_factor"),
    (lambda: Rotary(scaling=-2.0), "scaling must be finite and > 0"),
    (lambda: Rotary(scaling=float("inf")), "scaling must be finite and > 0"),
])
def test_scaling_errors_name_the_parameter(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_scaling_type_errors():
    with pytest.raises(TypeError, match="Rotary.from_hf"):
        Rotary(scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(TypeError, match="scaling must be a real number, one of LinearScaling"):
        Rotary(scaling="linear")


# -------------------------------------------------------------------- from_hf
def test_from_hf_forms():
    assert Rotary.from_hf({"rope_type": "default", "rope_theta": 500000.0}) == Rotary(base=500000.0)
    assert Rotary.from_hf({}) == Rotary()
    assert Rotary.from_hf({"type": "linear", "factor": 2.0}) == Rotary(scaling=2.0)
    assert Rotary.from_hf({"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=2048) \
        == Rotary(scaling=DynamicNTKScaling(2.0, 2048))
    r = Rotary.from_hf({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}, layout="neox")
    assert r == Rotary(base=500000.0, scaling=Llama3Scaling(8.0, 1.0, 4.0, 8192))
    # yarn: original length defaults to max_position_embeddings, beta 0/None to 32/1
    r = Rotary.from_hf({"rope_type": "yarn", "factor": 4.0, "beta_fast": None},
                       max_position_embeddings=4096)
    assert r.scaling == YarnScaling(4.0, 4096, 32.0, 1.0)
    # yarn/longrope factor from max_position_embeddings / original
    r = Rotary.from_hf({"rope_type": "yarn", "original_max_position_embeddings": 1024},
                       max_position_embeddings=4096)
    assert r.scaling.factor == 4.0
    r = Rotary.from_hf({"rope_type": "longrope", "short_factor": [1.0] * 4,
                        "long_factor": [2.0] * 4, "original_max_position_embeddings": 1024,
                        "partial_rotary_factor": 0.5}, head_dim=16,
                       max_position_embeddings=8192)
    assert r.dim == 8 and r.scaling.factor == 8.0 and r.scaling.long_factor == (2.0,) * 4
    assert Rotary.from_hf({}, head_dim=16, partial_rotary_factor=0.25).dim == 4


@pytest.mark.parametrize("params, kw, match", [
    ({"rope_type": "linear", "factor": 2.0, "fator": 3}, {}, r"unknown rope_parameters keys \['fator'\]"),
    ({"rope_type": "proportional"}, {}, "rope_type='proportional' is not supported"),
    ({"rope_type": "linear"}, {}, r"needs rope_parameters\['factor'\]"),
    ({"rope_type": "dynamic", "factor": 2.0}, {}, "needs max_position_embeddings"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "original_max_position_embeddings": 64}, {}, "high_freq_factor"),
    ({"rope_type": "yarn", "factor": 4.0}, {}, "original_max_position_embeddings"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 64}, {}, "factor"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
     {"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"rope_type": "default", "mrope_section": [1, 1]}, {}, "mrope_section"),
    ({"rope_theta": 0.5}, {}, "base must be finite and > 1"),
    ({"partial_rotary_factor": 0.5}, {}, "needs head_dim"),
    ({"partial_rotary_factor": 1.5}, {"head_dim": 8}, "partial_rotary_factor must be in"),
    ({"partial_rotary_factor": 0.0}, {"head_dim": 8}, "partial_rotary_factor"),
    ({"partial_rotary_factor": 0.3}, {"head_dim": 10}, "rotates 3 features"),
    ({}, {"head_dim": 8, "partial_rotary_factor": 0.5, "layout": "x"}, "layout='x'"),
])
def test_from_hf_errors(params, kw, match):
    with pytest.raises(ValueError, match=match):
        Rotary.from_hf(params, **kw)


# ------------------------------------------- exact angle reduction modulo 2π
# Reference without mpmath: Python integers and fractions. 2π from Machin's formula
# (π/4 = 4 arctan 1/5 − arctan 1/239) to 420 bits; p·θ is the exact rational product
# of the two float64 values.
def _atan_inv(x, one):
    s = t = one // x
    n, sign = 1, -1
    while t:
        t //= x * x
        n += 2
        s += sign * (t // n)
        sign = -sign
    return s


_ONE = 1 << 420
TWO_PI_EXACT = Fraction(8 * (4 * _atan_inv(5, _ONE) - _atan_inv(239, _ONE)), _ONE)  # err < 2**-400


def _circular_errors(ang, pos, inv):
    """|ang[i, j] − (pos[i]·inv[j] mod 2π)| measured modulo 2π, exactly (Fractions)."""
    err = np.empty(ang.shape)
    for i, p in enumerate(np.asarray(pos, dtype=np.float64)):
        for j, t in enumerate(np.asarray(inv, dtype=np.float64)):
            x = Fraction(float(p)) * Fraction(float(t))
            d = Fraction(float(ang[i, j])) - x
            d -= round(d / TWO_PI_EXACT) * TWO_PI_EXACT
            err[i, j] = abs(float(d))
    return err


P0S = [0, 2**20, 2**28, 2**32, 2**40, 2**50]


def test_two_pi_constants():
    # the three float64 pieces of 2π are the successive nearest roundings (see rotary/angles.py)
    from numbarope import rotary as R
    r = TWO_PI_EXACT
    for c in (R._C1, R._C2, R._C3):
        assert c == float(r)
        r -= Fraction(c)
    assert abs(r) < Fraction(1, 2**161)
    assert R._INV_2PI == float(1 / TWO_PI_EXACT)
    # the Veltkamp halves are exact and short (26 bits)
    for c, hi, lo in ((R._C1, R._C1_HI, R._C1_LO), (R._C2, R._C2_HI, R._C2_LO),
                      (R._C3, R._C3_HI, R._C3_LO)):
        assert Fraction(hi) + Fraction(lo) == Fraction(c)
        for h in (hi, lo):
            m, _ = np.frexp(h)
            assert float(m * 2**26).is_integer()
    assert R.ANGLE_ERROR == 2.0**-52 + 2.0**-86 and R.MAX_ANGLE == 2.0**60


@pytest.mark.parametrize("p0", P0S)
def test_angles_exact_at_large_positions(p0):
    # E = 16, n = 24 positions p0 + i: each angle within ANGLE_ERROR (half an ulp of π)
    # of the exact reduced angle. Before the exact reduction (np.longdouble product and
    # fmod): 4.0e-16, 1.8e-14, 4.5e-12, 7.3e-11, 2.0e-8, 2.0e-5 at these p0.
    from numbarope.rotary import ANGLE_ERROR
    rot = Rotary()
    pos = p0 + np.arange(24, dtype=np.float64)
    ang = rot.angles(pos, 16)
    assert ang.shape == (24, 8) and ang.dtype == np.float64
    assert np.abs(ang).max() <= np.pi
    err = _circular_errors(ang, pos, rot.inv_freq(16))
    assert err.max() <= ANGLE_ERROR <= 2.3e-16, err.max()


def test_angles_exact_hard_cases():
    # random float64 positions (integers to 2**53, fractions, negatives, tiny, huge with
    # a tiny frequency) and products close to multiples of 2π: within ANGLE_ERROR
    from numbarope.rotary import ANGLE_ERROR, _reduced_angles
    rng = np.random.default_rng(41)
    inv_default = Rotary().inv_freq(16)
    cases = [
        (rng.integers(0, 2**53, 12).astype(np.float64), inv_default),
        (rng.standard_normal(12) * 2.0 ** rng.integers(-60, 55, 12), 2.0 ** rng.uniform(-30, 4, 6)),
        (np.rint(rng.integers(1, 2**50, 12) * 2 * np.pi), np.array([1.0, 0.5, 0.1])),  # near k·2π
        (rng.standard_normal(6) * 2.0 ** rng.integers(-600, 10, 6),          # tiny products
         2.0 ** rng.uniform(-1074, -400, 4)),
        (rng.uniform(1, 2, 6) * 2.0 ** rng.integers(900, 1000, 6),           # huge positions
         2.0 ** rng.uniform(-1074, -1000, 4)),
        (np.array([2.0**60 / 3 * (1 - 2**-50), -(2.0**60 - 2**8) / 3, 2.0**58 + 1.5]),
         np.array([1.0, 0.75, 3.0])),
    ]
    for pos, inv in cases:
        assert (np.abs(pos)[:, None] * inv[None, :] < 2.0**60).all()
        ang = _reduced_angles(pos, inv)
        assert np.abs(ang).max() <= np.pi
        err = _circular_errors(ang, pos, inv)
        assert err.max() <= ANGLE_ERROR, (pos, inv, err.max())


def test_angles_near_odd_multiples_of_pi():
    # reduced angles within 1e-13 of ±π stay in [−fl(π), fl(π)] and within ANGLE_ERROR:
    # (a) positions from the convergents p/q of π with q odd (p ≈ q·π, 2**53 at most);
    # (b) double-doubles hi + lo = (2k+1)π + ε with k up to 2**56, where rint(hi/2π)
    #     and rint(r1/2π) can both land on the wrong side (the last fix-up step)
    from numbarope.rotary import _PI, ANGLE_ERROR, _reduce_two_pi, _reduced_angles
    pi = TWO_PI_EXACT / 2
    x, h, h_prev, q, q_prev, conv = pi, 1, 0, 0, 1, []
    for _ in range(40):
        a = x.numerator // x.denominator
        h, h_prev, q, q_prev = a * h + h_prev, h, a * q + q_prev, q
        if q % 2 and h < 2**53:
            conv.append(h)
        x = 1 / (x - a)
    pos = np.array(conv + [-c for c in conv], dtype=np.float64)
    inv = np.array([1.0, 0.5, 2.0])
    ang = _reduced_angles(pos, inv)
    assert np.abs(ang).max() <= _PI
    assert _circular_errors(ang, pos, inv).max() <= ANGLE_ERROR
    rng = np.random.default_rng(46)
    for _ in range(2000):
        target = (2 * int(rng.integers(2**50, 2**56)) + 1) * pi \
            + Fraction(int(rng.integers(-1000, 1000)), 10**16)
        hi = float(target)
        lo = float(target - Fraction(hi))
        r = _reduce_two_pi(hi, lo)
        assert abs(r) <= _PI
        d = Fraction(r) - (Fraction(hi) + Fraction(lo))
        d -= round(d / TWO_PI_EXACT) * TWO_PI_EXACT
        assert abs(d) <= ANGLE_ERROR, (hi, lo, float(d))


def test_angles_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    from numbarope.rotary import ANGLE_ERROR
    rng = np.random.default_rng(42)
    rot = Rotary(base=500000.0, scaling=0.25)      # inverse frequencies up to 4
    inv = rot.inv_freq(32)
    pos = np.concatenate([np.float64(2**50) + np.arange(4), rng.uniform(-2**55, 2**55, 8),
                          rng.uniform(-1e3, 1e3, 4)])
    ang = rot.angles(pos, 32)
    with mpmath.workprec(300):
        two_pi = 2 * mpmath.pi
        for i, p in enumerate(pos):
            for j, t in enumerate(inv):
                x = mpmath.mpf(float(p)) * mpmath.mpf(float(t))       # exact at 300 bits
                d = mpmath.mpf(float(ang[i, j])) - x
                d -= mpmath.nint(d / two_pi) * two_pi
                assert abs(d) <= ANGLE_ERROR, (p, t, float(d))


def test_apply_rotary_shift_invariant_at_large_positions():
    # angles of p0 + i and of i differ by p0·θ mod 2π to 2·ANGLE_ERROR, so the
    # rotated inner products (R_{p0+i} q)·(R_{p0+j} k) do not depend on p0
    rng = np.random.default_rng(43)
    x = rng.standard_normal((2, 9, 16))
    for p0 in P0S[1:]:
        a = apply_rotary(x, Rotary(), positions=p0 + np.arange(9))
        b = apply_rotary(x, Rotary(), positions=np.arange(9))
        np.testing.assert_allclose(a[0] @ a[1].T, b[0] @ b[1].T, rtol=0, atol=1e-14)


@pytest.mark.parametrize("p0", P0S)
def test_rope_attention_shift_invariant_within_certified_bounds(p0):
    # the output does not move with p0 (((p0+i) − (p0+j))θ = (i − j)θ): the two
    # results agree to the sum of their certified bounds. Before the exact reduction
    # it moved by 3.9e-11 at p0 = 2**32 against a bound of 1.5e-12.
    import numbarope
    rng = np.random.default_rng(44)
    n, E = 24, 16
    q, k, v = (rng.standard_normal((n, E)) for _ in range(3))

    def run(pos):
        return numbarope.rope_attention(q, k, v, rotary=numbarope.Rotary(), positions=pos,
                                        is_causal=True, method="exact", return_info=True)
    out0, info0 = run(np.arange(n))
    out, info = run(p0 + np.arange(n))
    bound = np.max(info.error_bound) + np.max(info0.error_bound)
    assert np.abs(out - out0).max() <= bound, (np.abs(out - out0).max(), bound)


def test_positions_beyond_the_reduction_range_raise():
    import numbarope
    rot = Rotary()                                  # largest inverse frequency 1
    ok = rot.angles([2.0**60 - 2**8], 8)            # just below 2**60 rad: supported
    assert np.abs(ok).max() <= np.pi
    with pytest.raises(ValueError, match=r"positions up to \|p\| = 1152921504606846976.*"
                                         r"positions \|p\| < 1\.15292e\+18"):
        rot.angles([0.0, 2.0**60], 8)
    with pytest.raises(ValueError, match="positions"):
        rot.angles([-(2.0**61)], 8)
    # a scaled frequency (θ0 = 4) lowers the largest position to 2**58
    with pytest.raises(ValueError, match=r"positions \|p\| < 2\.8823e\+17"):
        Rotary(scaling=0.25).angles([2.0**58], 8)
    with pytest.raises(ValueError, match="positions contain NaN or inf"):
        rot.angles([0.0, np.inf], 8)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(np.ones((2, 4)), rot, positions=[0.0, 2.0**61])
    with pytest.raises(ValueError, match="positions"):
        rotary_tables(rot, 2, 4, positions=[0.0, 2.0**61])
    with pytest.raises(ValueError, match="positions"):
        numbarope.rope_attention(np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 4)),
                                 rotary=rot, positions=2.0**61 + np.arange(3))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("offset", [
    1, 1000, 12345,
    2 ** 20, 2 ** 24,
])
def test_shift_invariance(offset, layout):
    rng = np.random.default_rng(17)
    n, e = 16, 8
    q, k, v = (rng.standard_normal((n, e)) for _ in range(3))
    rot = Rotary(layout=layout)

    def run(off):
        pos = off + np.arange(n)
        return rope_attention(apply_rotary(q, rot, positions=pos),
                              apply_rotary(k, rot, positions=pos), v, method="exact")

    base = run(0)
    np.testing.assert_allclose(base, rope_attention(q, k, v, rotary=rot, method="exact"),
                               rtol=0, atol=1e-14)
    rel = np.abs(run(offset) - base).max() / np.abs(base).max()
    assert rel < 1e-12, rel


# ----------------------------------------------------- odd rotary dims (refused)
def test_odd_rotary_dim_refused_with_transformers_behaviour():
    # transformers 5.24 has no consistent odd-dim rotation (see the tests below): the
    # error says what it does and gives the even-dim Rotary of the models that run
    eq = Rotary(dim=10, base=10000.0 ** (10 / 9), scaling=LinearScaling(2.0))
    with pytest.raises(ValueError, match=r"(?s)dim must be a positive even integer, got 9\. "
                       r"transformers 5\.24 .*base\*\*\(-2i/9\).*GPT-NeoX.*rotate 10 features.*"
                       r"Phi, StableLM, Persimmon.*shape error.*YaRN fails.*"
                       + re.escape(repr(eq)) + r".*even rotary dim: 8 or 10"):
        Rotary(dim=9, scaling=2.0)
    with pytest.raises(ValueError, match=r"rotates 9 features, an odd number.*" +
                       re.escape(repr(Rotary(dim=10, base=500000.0 ** (10 / 9),
                                             layout="interleaved")))):
        Rotary.from_hf({"rope_theta": 500000.0, "partial_rotary_factor": 0.3}, head_dim=30,
                       layout="gptj")
    # no even-dim Rotary reproduces dynamic NTK; transformers' YaRN fails
    with pytest.raises(ValueError, match=r"No Rotary reproduces it with DynamicNTKScaling"):
        Rotary.from_hf({"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.3},
                       head_dim=30, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"No Rotary reproduces it with YarnScaling"):
        Rotary.from_hf({"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.3,
                        "original_max_position_embeddings": 16}, head_dim=30)
    with pytest.raises(ValueError, match=r"rotates 0 features \(transformers rotates none\)"):
        Rotary.from_hf({"partial_rotary_factor": 0.01}, head_dim=30)
    # the other checks still come first
    with pytest.raises(ValueError, match="layout='x'"):
        Rotary.from_hf({"partial_rotary_factor": 0.3}, head_dim=30, layout="x")


_ODD_ROPE = {   # transformers rope_parameters (rope_theta 10000, partial_rotary_factor 0.3)
    "default": ({"rope_type": "default"}, None),
    "linear": ({"rope_type": "linear", "factor": 2.0}, LinearScaling(2.0)),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
               Llama3Scaling(8.0, 1.0, 4.0, 16)),
    "longrope": ({"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0],
                  "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0], "factor": 4.0,
                  "original_max_position_embeddings": 16},
                 LongRopeScaling([1.0, 1.1, 1.3, 1.6, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0], 16,
                                 factor=4.0)),
}


def _odd_hf_config(model, rope):
    transformers = pytest.importorskip("transformers")
    kw = dict(hidden_size=60, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1,
              vocab_size=50, max_position_embeddings=64,
              rope_parameters=dict(rope, rope_theta=10000.0, partial_rotary_factor=0.3))
    if model == "gpt_neox":
        return transformers.GPTNeoXConfig(**kw)
    return transformers.GlmConfig(num_key_value_heads=2, head_dim=30, **kw)


@pytest.mark.parametrize("model, layout", [("gpt_neox", "half"), ("glm", "interleaved")])
@pytest.mark.parametrize("case", list(_ODD_ROPE))
def test_odd_rotary_dim_suggestion_matches_transformers(model, layout, case):
    """head_dim 30, partial_rotary_factor 0.3: transformers' GPT-NeoX (rotate_half) and
    GLM (interleaved) rotate 10 features with the 5 frequencies 10000**(-2i/9); the
    Rotary the error names rotates q and k the same (transformers' float32 cos/sin:
    1e-6)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if model == "gpt_neox":
        from transformers.models.gpt_neox import modeling_gpt_neox as mod
        emb_cls = mod.GPTNeoXRotaryEmbedding
    else:
        from transformers.models.glm import modeling_glm as mod
        emb_cls = mod.GlmRotaryEmbedding
    rope, scaling = _ODD_ROPE[case]
    config = _odd_hf_config(model, rope)
    eq = Rotary(dim=10, base=10000.0 ** (10 / 9), layout=layout, scaling=scaling)
    with pytest.raises(ValueError, match=r"rotates 9 features.*" + re.escape(repr(eq))):
        Rotary.from_hf(config, layout=layout)
    n, E = 12, 30
    rng = np.random.default_rng(45)
    q, k = rng.standard_normal((2, 1, 2, n, E))
    cos, sin = emb_cls(config)(torch.zeros(1), torch.arange(n)[None])     # float32
    assert cos.shape == (1, n, 10)
    ours_cos, ours_sin = rotary_tables(eq, n, E)
    np.testing.assert_allclose(ours_cos, cos[0, :, :5].double().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours_sin, sin[0, :, :5].double().numpy(), rtol=0, atol=1e-6)
    q_hf, k_hf = mod.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k),
                                          cos.double(), sin.double())
    for x, ref in ((q, q_hf), (k, k_hf)):
        np.testing.assert_allclose(apply_rotary(x, eq), ref.numpy(), rtol=0,
                                   atol=1e-6 * np.abs(x).max())
        np.testing.assert_array_equal(ref.numpy()[..., 10:], x[..., 10:])


@pytest.mark.parametrize("model", ["phi", "stablelm", "persimmon", "gptj", "codegen"])
def test_odd_rotary_dim_fails_in_transformers(model):
    """Why an odd dim is refused: these transformers 5.24 models fail on it (9 features
    against 10 cos/sin columns). If this test fails, transformers changed: revisit
    _odd_dim_message in numbarope/rotary/embedding.py."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if model in ("gptj", "codegen"):
        kw = dict(n_embd=60, n_head=2, n_layer=1, vocab_size=50, rotary_dim=9)
    else:
        kw = dict(hidden_size=60, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=32, num_hidden_layers=1, vocab_size=50,
                  partial_rotary_factor=0.3)
    config = transformers.AutoConfig.for_model(model, **kw)
    m = transformers.AutoModel.from_config(config).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"size of tensor a \(9\) must "
                                                             r"match the size of tensor b \(10\)"):
        m(torch.arange(5)[None])


def test_odd_rotary_dim_yarn_fails_in_transformers():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = _odd_hf_config("gpt_neox", {"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 16})
    with pytest.raises(RuntimeError, match=r"tensor a \(5\).*tensor b \(4\)"):
        ROPE_INIT_FUNCTIONS["yarn"](config, None)
