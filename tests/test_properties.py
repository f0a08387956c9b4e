"""Property tests (hypothesis) over random small shapes, dtypes and values.

* exact == the naive loops of ``tests/naive.py`` (bias with -inf, causal, rotary);
* fast is within its certified bound ``info.error_bound`` (R <= 2);
* attention weights (value = identity) are >= 0 and their rows sum to one;
* every output lies in the convex hull of the value rows, per column.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import naive
from numbarope import Rotary, rope_attention

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.differing_executors])


@st.composite
def problems(draw, max_n=10, max_e=6, allow_mask=True, bounded_R=None, vdim=None,
             kinds=("plain", "rotary", "rotary", "relative")):
    """Random (q, k, v, kwargs for rope_attention, kwargs for naive)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, max_n))
    E = draw(st.integers(1, max_e))
    Ev = n if vdim == "identity" else draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    scale = draw(st.sampled_from([None, 1.0 / E, 0.7]))
    s = 1.0 / np.sqrt(E) if scale is None else scale
    amp = draw(st.sampled_from([0.1, 1.0, 3.0]))
    q = rng.standard_normal((n, E)) * amp
    k = rng.standard_normal((n, E)) * amp
    if bounded_R is not None:             # s·max‖q‖·max‖k‖ = R (rotary keeps norms)
        R = draw(st.floats(0.0, bounded_R))
        c = np.sqrt(R / s)
        q *= c / max(np.linalg.norm(q, axis=1).max(), 1e-300)
        k *= c / max(np.linalg.norm(k, axis=1).max(), 1e-300)
    v = np.eye(n) if vdim == "identity" else rng.uniform(-2, 2, (n, Ev)) * draw(
        st.sampled_from([1e-3, 1.0, 1e3]))
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    kw = dict(scale=scale)
    nkw = dict(scale=s)
    kind = draw(st.sampled_from(kinds))
    if kind == "rotary" and E >= 2:
        dim = draw(st.sampled_from([None, 2 * (E // 2)]))
        if dim is None and E % 2:
            dim = E - 1
        layout = draw(st.sampled_from(["half", "interleaved"]))
        base = draw(st.sampled_from([10000.0, 100.0]))
        kw["rotary"] = Rotary(dim=dim, layout=layout, base=base)
        nkw["rotary"] = dict(dim=dim, layout=layout, base=base)
    elif kind == "relative":
        W = rng.standard_normal((2 * n - 1, E, E))
        W /= np.linalg.norm(W, ord=2, axis=(1, 2)).max()        # max_t ‖W_t‖₂ = 1
        kw["relative"] = W
        nkw["W"] = lambda t, W=W, n=n: W[t + n - 1]
    if draw(st.booleans()):
        kw["is_causal"] = nkw["causal"] = True
    if draw(st.booleans()):
        b = rng.standard_normal(2 * n - 1) * draw(st.sampled_from([0.5, 3.0]))
        if allow_mask and draw(st.booleans()):
            b[rng.random(2 * n - 1) < 0.3] = -np.inf
        kw["bias"] = b
        nkw["bias"] = lambda t, b=b, n=n: b[t + n - 1]
    return q, k, v, kw, nkw


def _naive(q, k, v, nkw):
    nkw = dict(nkw)
    rot = nkw.pop("rotary", None)
    if rot is not None:
        return naive.rope_attention(q, k, v, **rot, **nkw)
    return naive.attention(q, k, v, **nkw)


def _visible_rows(n, kw):
    """Rows that see at least one key (others are 0 by convention)."""
    t = np.arange(n)[:, None] - np.arange(n)[None, :]
    ok = np.ones((n, n), bool)
    if kw.get("is_causal"):
        ok &= t >= 0
    if "bias" in kw:
        ok &= np.isfinite(kw["bias"][t + n - 1])
    return ok.any(axis=1)


@SETTINGS
@given(problems())
def test_exact_matches_naive(prob):
    q, k, v, kw, nkw = prob
    out = rope_attention(q, k, v, method="exact", **kw)
    assert out.dtype == q.dtype and out.shape == v.shape
    ref = _naive(q, k, v, nkw)
    vmax = np.abs(v.astype(np.float64)).max()
    tol = (1e-5 if q.dtype == np.float32 else 1e-11) * vmax
    assert np.abs(out - ref).max() <= tol
    hidden = ~_visible_rows(q.shape[0], kw)
    assert np.all(out[hidden] == 0)


@pytest.mark.parametrize("kind", ["plain", "rotary", "relative"])
@settings(SETTINGS, max_examples=14)
@given(data=st.data(), eps=st.sampled_from([1e-2, 1e-3, 1e-5]),
       approx=st.sampled_from(["chebyshev", "taylor"]))
def test_fast_within_certified_bound(kind, data, eps, approx):
    q, k, v, kw, _ = data.draw(problems(max_n=24, max_e=4, bounded_R=2.0, kinds=(kind,)))
    out, info = rope_attention(q, k, v, method="fast", eps=eps, approx=approx,
                               return_info=True, **kw)
    assert info.method[()] == "fast"
    expect = ("toeplitz-fft" if "relative" in kw else "fft" if "bias" in kw
              else "prefix" if kw.get("is_causal") else "gemm")
    assert info.algorithm[()] == expect
    event(f"{expect} {q.dtype} n={'>8' if q.shape[0] > 8 else '<=8'}")
    exact, einfo = rope_attention(q, k, v, method="exact", return_info=True, **kw)
    vmax = np.abs(v.astype(np.float64)).max()
    err = np.abs(out.astype(np.float64) - exact.astype(np.float64)).max()
    rnd = float(einfo.error_bound[()])     # both bound the distance to the true value
    bound = float(info.error_bound[()])
    assert err <= bound + rnd, (err, bound)
    assert bound <= eps * vmax * (1 + 1e-9) + rnd
    hidden = ~_visible_rows(q.shape[0], kw)
    assert np.all(out[hidden] == 0)


@SETTINGS
@given(problems(max_n=12, allow_mask=False, vdim="identity"))
def test_weights_rows_sum_to_one(prob):
    q, k, v, kw, _ = prob
    q, k = q.astype(np.float64), k.astype(np.float64)
    n = q.shape[0]
    W = rope_attention(q, k, np.eye(n), method="exact", **kw)
    assert np.all(W >= 0)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    if kw.get("is_causal"):
        assert np.all(np.triu(W, 1) == 0)


@SETTINGS
@given(problems(max_n=16, max_e=4, allow_mask=False, bounded_R=2.0, vdim="identity"))
def test_fast_weights_rows_sum_to_one(prob):
    q, k, v, kw, _ = prob
    n = q.shape[0]
    W, info = rope_attention(q.astype(np.float64), k.astype(np.float64), np.eye(n),
                             method="fast", eps=1e-4, return_info=True, **kw)
    bound = float(info.error_bound[()])
    assert np.all(W >= -bound)
    assert np.abs(W.sum(axis=1) - 1).max() <= 1e-9 + n * bound


@SETTINGS
@given(problems(max_n=16, max_e=4, allow_mask=False, bounded_R=2.0),
       st.sampled_from(["exact", "fast"]))
def test_output_in_convex_hull_of_values(prob, method):
    q, k, v, kw, _ = prob
    out, info = rope_attention(q, k, v, method=method, eps=1e-3, return_info=True, **kw)
    v64, out64 = v.astype(np.float64), out.astype(np.float64)
    vmax = np.abs(v64).max()
    tol = float(info.error_bound[()]) + 4 * np.finfo(q.dtype).eps * vmax
    lo, hi = v64.min(axis=0), v64.max(axis=0)
    if kw.get("is_causal"):           # row i only sees v[:i+1]
        lo = np.minimum.accumulate(v64, axis=0)
        hi = np.maximum.accumulate(v64, axis=0)
    assert np.all(out64 >= lo - tol)
    assert np.all(out64 <= hi + tol)


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_convex_hull_extremes(method):
    """Constant values come back exactly-ish; one dominant key gives its value."""
    rng = np.random.default_rng(0)
    n, E = 9, 3
    q, k = (rng.standard_normal((n, E)) * 0.3 for _ in range(2))
    v = np.full((n, 2), 1.75)
    out, info = rope_attention(q, k, v, method=method, return_info=True, rotary=Rotary(dim=2))
    assert np.abs(out - 1.75).max() <= info.error_bound[()] + 1e-15
