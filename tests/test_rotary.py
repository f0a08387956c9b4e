"""Tests of numbarope.rotary against explicit rotation matrices (tests/naive.py)."""

import numpy as np
import pytest

import naive
from numbarope import Rotary, apply_rotary, rotary_relative_matrices
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
