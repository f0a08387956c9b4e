"""Exact path of rope_attention against the loop references of tests/naive.py, and its
certified error bound against long-double references."""

import numpy as np
import pytest

import naive
import numbarope
from numbarope import Rotary, rope_attention

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _inputs(rng, shape_q, Ev=None, dtype=np.float64, scale=1.0):
    n, E = shape_q[-2:]
    Ev = E if Ev is None else Ev
    q = (rng.standard_normal(shape_q) * scale).astype(dtype)
    k = (rng.standard_normal(shape_q) * scale).astype(dtype)
    v = rng.standard_normal(shape_q[:-1] + (Ev,)).astype(dtype)
    return q, k, v


def _close(out, ref, dtype):
    tol = TOL[dtype] * max(1.0, np.abs(ref).max())
    err = np.abs(np.asarray(out, dtype=np.float64) - ref).max(initial=0.0)
    assert err <= tol, f"max error {err:.3e} > {tol:.3e}"


# ----------------------------------------------------------------- plain / rotary
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, E, Ev", [(1, 1, 1), (2, 2, 3), (7, 4, 5), (13, 8, 1), (31, 3, 2),
                                      (64, 16, 4)])
def test_plain(dtype, n, E, Ev):
    rng = np.random.default_rng(n * 100 + E)
    q, k, v = _inputs(rng, (n, E), Ev, dtype)
    out = rope_attention(q, k, v, method="exact")
    assert out.dtype == dtype and out.shape == (n, Ev)
    _close(out, naive.attention(q, k, v), dtype)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, E, dim", [(1, 2, None), (2, 4, None), (13, 8, None),
                                       (31, 6, 4), (7, 5, 2)])
def test_rotary(layout, dtype, n, E, dim):
    rng = np.random.default_rng(7 + n + E)
    q, k, v = _inputs(rng, (n, E), 3, dtype)
    out = rope_attention(q, k, v, rotary=Rotary(dim=dim, base=100.0, layout=layout),
                         method="exact")
    assert out.dtype == dtype
    ref = naive.rope_attention(q, k, v, dim=dim, base=100.0, layout=layout)
    _close(out, ref, dtype)
    # rotary actually changes the result (except for n = 1)
    if n > 1:
        plain = rope_attention(q, k, v, method="exact")
        assert np.abs(plain.astype(np.float64) - ref).max() > 1e-4


def test_rotary_true_is_default_rotary():
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, (13, 4))
    a = rope_attention(q, k, v, rotary=True, method="exact")
    _close(a, naive.rope_attention(q, k, v), np.float64)


# ------------------------------------------------------------ general relative W_t
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, E", [(1, 1), (2, 3), (7, 4), (13, 2), (31, 5)])
def test_general_relative(dtype, n, E):
    rng = np.random.default_rng(40 + n * E)
    q, k, v = _inputs(rng, (n, E), 2, dtype)
    rel = rng.standard_normal((2 * n - 1, E, E)).astype(dtype)
    out = rope_attention(q, k, v, relative=rel, method="exact")
    ref = naive.attention(q, k, v, W=lambda t: rel[t + n - 1].astype(np.float64))
    _close(out, ref, dtype)


# ------------------------------------------------------------------ bias / causal
@pytest.mark.parametrize("n, E", [(1, 2), (2, 2), (7, 3), (13, 8), (31, 4)])
def test_bias_random(n, E):
    rng = np.random.default_rng(60 + n)
    q, k, v = _inputs(rng, (n, E), 3)
    b = rng.standard_normal(2 * n - 1) * 3
    out = rope_attention(q, k, v, bias=b, method="exact")
    _close(out, naive.attention(q, k, v, bias=lambda t: b[t + n - 1]), np.float64)


@pytest.mark.parametrize("n", [2, 7, 31])
def test_bias_with_neg_inf(n):
    rng = np.random.default_rng(70 + n)
    q, k, v = _inputs(rng, (n, 4), 2)
    b = rng.standard_normal(2 * n - 1)
    b[rng.random(2 * n - 1) < 0.4] = -np.inf
    b[n - 1] = 0.0                 # the diagonal stays, no row is empty
    out = rope_attention(q, k, v, bias=b, method="exact")
    ref = naive.attention(q, k, v, bias=lambda t: b[t + n - 1])
    assert np.isfinite(out).all()
    _close(out, ref, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, E", [(1, 1), (2, 4), (7, 3), (31, 8), (300, 4)])
def test_causal(dtype, n, E):
    rng = np.random.default_rng(80 + n)
    q, k, v = _inputs(rng, (n, E), 2, dtype)
    out = rope_attention(q, k, v, is_causal=True, method="exact")
    if n <= 31:
        ref = naive.attention(q, k, v, causal=True)
    else:   # dense numpy reference (the naive loop is too slow at n = 300)
        qd, kd, vd = (a.astype(np.float64) for a in (q, k, v))
        L = qd @ kd.T / np.sqrt(E)
        L[np.triu_indices(n, 1)] = -np.inf
        P = np.exp(L - L.max(axis=1, keepdims=True))
        ref = P @ vd / P.sum(axis=1, keepdims=True)
    _close(out, ref, dtype)
    # row 0 sees only key 0
    np.testing.assert_allclose(out[0], v[0], rtol=TOL[dtype])


@pytest.mark.parametrize("n", [2, 7, 13])
def test_bias_and_causal(n):
    rng = np.random.default_rng(90 + n)
    q, k, v = _inputs(rng, (n, 4), 3)
    b = rng.standard_normal(2 * n - 1) * 2
    out = rope_attention(q, k, v, bias=b, is_causal=True, rotary=True, method="exact")
    ref = naive.rope_attention(q, k, v, bias=lambda t: b[t + n - 1], causal=True)
    _close(out, ref, np.float64)


def test_fully_masked_rows_are_zero():
    n = 7
    rng = np.random.default_rng(95)
    q, k, v = _inputs(rng, (n, 4), 3)
    b = np.zeros(2 * n - 1)
    b[n - 1:n + 1] = -np.inf       # t = 0 and t = 1 masked: with causal, rows 0, 1 empty
    out = rope_attention(q, k, v, bias=b, is_causal=True, method="exact")
    ref = naive.attention(q, k, v, bias=lambda t: b[t + n - 1], causal=True)
    np.testing.assert_array_equal(out[:2], 0.0)
    assert np.isfinite(out).all()
    _close(out, ref, np.float64)
    # every key masked everywhere: all zeros, no NaN
    out = rope_attention(q, k, v, bias=np.full(2 * n - 1, -np.inf), method="exact")
    np.testing.assert_array_equal(out, 0.0)


# ------------------------------------------------------------- batch / broadcasting
def test_batch_heads_rotary_bias():
    rng = np.random.default_rng(100)
    n, E = 13, 4
    q, k, v = _inputs(rng, (2, 3, n, E), 5)
    b = rng.standard_normal((3, 2 * n - 1))          # one bias per head, shared over batch
    out = rope_attention(q, k, v, rotary=True, bias=b, method="exact")
    assert out.shape == (2, 3, n, 5)
    for i in range(2):
        for h in range(3):
            ref = naive.rope_attention(q[i, h], k[i, h], v[i, h],
                                       bias=lambda t, h=h: b[h, t + n - 1])
            _close(out[i, h], ref, np.float64)


def test_broadcast_key_value_head_dim_one():
    rng = np.random.default_rng(101)
    n, E = 7, 4
    q = rng.standard_normal((2, 3, n, E))
    k = rng.standard_normal((2, 1, n, E))
    v = rng.standard_normal((1, 1, n, 2))
    out = rope_attention(q, k, v, rotary=Rotary(layout="interleaved"), method="exact")
    assert out.shape == (2, 3, n, 2)
    for i in range(2):
        for h in range(3):
            _close(out[i, h], naive.rope_attention(q[i, h], k[i, 0], v[0, 0],
                                                   layout="interleaved"), np.float64)


def test_broadcast_relative_per_head():
    rng = np.random.default_rng(102)
    n, E = 7, 3
    q = rng.standard_normal((2, 3, n, E))
    k = rng.standard_normal((1, 3, n, E))
    v = rng.standard_normal((2, 1, n, 4))
    rel = rng.standard_normal((3, 2 * n - 1, E, E)) * 0.5
    out = rope_attention(q, k, v, relative=rel, method="exact")
    assert out.shape == (2, 3, n, 4)
    for i in range(2):
        for h in range(3):
            ref = naive.attention(q[i, h], k[0, h], v[i, 0],
                                  W=lambda t, h=h: rel[h, t + n - 1])
            _close(out[i, h], ref, np.float64)


# -------------------------------------------------------------------- dtypes
def test_float32_output_dtype_and_mixed():
    rng = np.random.default_rng(103)
    q, k, v = _inputs(rng, (2, 13, 4), 3, np.float32)
    out = rope_attention(q, k, v, rotary=True, method="exact")
    assert out.dtype == np.float32
    for h in range(2):
        _close(out[h], naive.rope_attention(q[h], k[h], v[h]), np.float32)
    out64 = rope_attention(q, k, v.astype(np.float64), method="exact")
    assert out64.dtype == np.float64


# ------------------------------------------------------------------ huge logits
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("general", [False, True])
def test_huge_logits_no_overflow(dtype, general):
    rng = np.random.default_rng(104)
    n, E = 31, 4
    q, k, v = _inputs(rng, (n, E), 3, dtype, scale=1.0)
    scale = 1e4 / np.abs(q.astype(np.float64) @ k.astype(np.float64).T).max()
    kw = {}
    W = None
    if general:
        rel = np.broadcast_to(np.eye(E), (2 * n - 1, E, E)) + 0.1 * rng.standard_normal(
            (2 * n - 1, E, E))
        kw["relative"] = rel.astype(dtype)
        W = lambda t: kw["relative"][t + n - 1].astype(np.float64)  # noqa: E731
    with np.errstate(over="raise", invalid="raise"):
        out = rope_attention(q, k, v, scale=scale, method="exact", **kw)
    ref = naive.attention(q, k, v, scale=scale, W=W)
    assert np.isfinite(out).all()
    # the logits are ~1e4: their relative rounding (1e-16·1e4) moves weights by ~1e-12
    tol = {np.float32: 2e-5, np.float64: 1e-8}[dtype]
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)


def test_huge_logits_with_auto_and_causal():
    rng = np.random.default_rng(105)
    n, E = 13, 8
    q, k, v = _inputs(rng, (n, E), 2, scale=40.0)     # |s qᵀk| ~ 1e3..1e4
    out = rope_attention(q, k, v, is_causal=True, rotary=True)
    ref = naive.rope_attention(q, k, v, causal=True)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("setting", ["plain", "causal", "bias", "relative"])
def test_huge_logits_exact(setting, dtype):
    """Robustness suite."""
    rng = np.random.default_rng(13)
    n, e = 12, 4
    q = rng.standard_normal((n, e))
    k = rng.standard_normal((n, e))
    q *= 100 / np.linalg.norm(q, axis=1, keepdims=True)
    k *= 100 / np.linalg.norm(k, axis=1, keepdims=True)        # |s qᵀk| up to 1e4
    v = rng.standard_normal((n, 3))
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    kw, nkw = {}, {}
    if setting == "causal":
        kw, nkw = dict(is_causal=True), dict(causal=True)
    elif setting == "bias":
        b = rng.standard_normal(2 * n - 1) * 1e3
        kw, nkw = dict(bias=b), dict(bias=lambda t: b[t + n - 1])
    elif setting == "relative":
        W = rng.standard_normal((2 * n - 1, e, e))
        W /= np.linalg.norm(W, ord=2, axis=(1, 2), keepdims=True)
        kw, nkw = dict(relative=W), dict(W=lambda t: W[t + n - 1])
    out = rope_attention(q, k, v, method="exact", scale=1.0, **kw)
    ref = naive.attention(q, k, v, scale=1.0, **nkw)
    assert out.dtype == dtype and np.all(np.isfinite(out))
    tol = 1e-6 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)
    # auto must not pick an uncertifiable fast path here
    out_auto = rope_attention(q, k, v, method="auto", scale=1.0, **kw)
    np.testing.assert_array_equal(out_auto, out)


# ------------------------------------------------------------ the exact error bound
@pytest.mark.parametrize("setting", ["plain", "rotary", "causal", "bias", "relative"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_bound_holds_against_long_double(setting, dtype):
    """Field reports (issue 7)."""
    rng = np.random.default_rng(7)
    n, E = 37, 8
    worst = 0.0
    for amp in (0.3, 1.5, 4.0):
        q, k, v = (rng.standard_normal((n, E)) * amp for _ in range(3))
        kw, rkw = {}, {}
        if setting == "rotary":
            q = numbarope.apply_rotary(q, numbarope.Rotary())
            k = numbarope.apply_rotary(k, numbarope.Rotary())
        elif setting == "causal":
            kw, rkw = dict(is_causal=True), dict(causal=True)
        elif setting == "bias":
            b = rng.standard_normal(2 * n - 1) * 3
            kw, rkw = dict(bias=b), dict(bias=b)
        qd, kd, vd = (a.astype(dtype) for a in (q, k, v))
        ref_q, ref_k = qd.astype(np.float64), kd.astype(np.float64)
        if setting == "relative":
            W = rng.standard_normal((2 * n - 1, E, E)) / np.sqrt(E)
            kw = dict(relative=W.astype(dtype))
            # reference: logits q W_t k computed in long double
            ld = np.longdouble
            j = np.arange(n)
            out_ref = np.zeros((n, E))
            for i in range(n):
                Wi = W.astype(dtype).astype(ld)[i - j + n - 1]
                lg = np.einsum("e,jef,jf->j", ref_q[i].astype(ld), Wi,
                               ref_k.astype(ld)) / np.sqrt(ld(E))
                w = np.exp(lg - lg.max())
                out_ref[i] = (w @ vd.astype(ld)) / w.sum()
        else:
            out_ref = naive.attention_longdouble(ref_q, ref_k, vd, **rkw).astype(np.float64)
        out, info = rope_attention(qd, kd, vd, method="exact", return_info=True, **kw)
        err = np.abs(out.astype(np.float64) - out_ref).max()
        bound = float(info.error_bound)
        assert 0 < bound and err <= bound, (amp, err, bound)
        worst = max(worst, err / bound)
    assert worst > 1e-4       # the bound is not vacuous by orders of magnitude


def test_exact_bound_reported_for_float64_readme_example():
    """Field reports (issue 7)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 256, 16)) * 0.4
    k = rng.standard_normal((2, 256, 16)) * 0.4
    v = rng.standard_normal((2, 256, 16))
    out, info = rope_attention(q, k, v, rotary=True, method="exact", return_info=True)
    assert np.all(info.error_bound > 0) and np.all(info.error_bound < 1e-11)



# ------------------------------------------------------------------ edge cases
def test_n1_E1():
    q, k, v = np.array([[2.0]]), np.array([[-3.0]]), np.array([[0.5, -7.0]])
    out = rope_attention(q, k, v, method="exact")
    np.testing.assert_array_equal(out, v)


def test_Ev_zero():
    rng = np.random.default_rng(106)
    q, k, _ = _inputs(rng, (2, 7, 4))
    v = np.zeros((2, 7, 0))
    out = rope_attention(q, k, v, rotary=True, method="exact")
    assert out.shape == (2, 7, 0) and out.dtype == np.float64


@pytest.mark.parametrize("kw", [{}, {"rotary": True}, {"is_causal": True},
                                {"bias": np.zeros((0,))},
                                {"relative": np.zeros((0, 4, 4))}])
def test_n_zero(kw):
    q = np.zeros((3, 0, 4), dtype=np.float32)
    v = np.zeros((3, 0, 5), dtype=np.float32)
    out = rope_attention(q, q, v, method="exact", **kw)
    assert out.shape == (3, 0, 5) and out.dtype == np.float32


def test_empty_batch():
    q = np.zeros((0, 7, 4))
    out = rope_attention(q, q, np.zeros((0, 7, 2)), method="exact")
    assert out.shape == (0, 7, 2)


def test_inputs_not_modified():
    rng = np.random.default_rng(107)
    q, k, v = _inputs(rng, (2, 7, 4), 3, np.float32)
    b = rng.standard_normal(13)
    copies = [a.copy() for a in (q, k, v, b)]
    rope_attention(q, k, v, rotary=True, bias=b, is_causal=True, method="exact")
    for a, c in zip((q, k, v, b), copies):
        np.testing.assert_array_equal(a, c)


def test_scale_is_used():
    rng = np.random.default_rng(108)
    q, k, v = _inputs(rng, (13, 4))
    out = rope_attention(q, k, v, scale=0.25, method="exact")
    _close(out, naive.attention(q, k, v, scale=0.25), np.float64)
    # paper convention scale = 1/E
    out = rope_attention(q, k, v, scale=1 / 4, rotary=True, method="exact")
    _close(out, naive.rope_attention(q, k, v, scale=1 / 4), np.float64)
