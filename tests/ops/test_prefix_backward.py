"""numbarope.ops.prefix.prefix_backward: the certified fast backward of the causal prefix
algorithm, against the EXACT causal softmax gradients (the dense float64 reference of tests/naive.py, attention_gradients):
within the certified bound of numbarope.ops._bounds.causal_gradient_bound, itself O(δ);
the same sums as the dense polynomial backward (to rounding) for any chunk size; it
converges to the exact gradients as δ → 0; offsets, padded keys, grouped-query heads;
threads."""

import numpy as np
import pytest

from numbarope import _config
from numbarope.ops import prefix
from numbarope.ops._bounds import causal_gradient_bound, gradient_bound
from numbarope.ops.registry import get
from numbarope.ops.streaming import exact_attention, exact_backward
from numbarope.polynomial import exp_approximation

from _grad_inputs import inputs
from naive import visible
from naive import attention_gradients as dense_gradients


def scales(q, k, v, dO, s, keep, R, off):
    """The gradients' natural magnitudes from the maxima (what the bound multiplies δ by):
    dq: s·max|k|·max‖dO_i‖₁·max|v|; dk: s·max|q|·Σ c_i‖dO_i‖₁·max|v|; dv: Σ c_i‖dO_i‖_∞
    over the rows that see a key, c_i = 1/(1 + (S_i−1)e^{−2R}) >= row i's weights."""
    L = q.shape[-2]
    Si = np.tile(visible(L, k.shape[0], off, keep).sum(1), dO.size // (L * dO.shape[-1]))
    kr, vr = (k, v) if keep is None else (k[keep], v[keep])
    d = dO.reshape(-1, dO.shape[-1])[Si > 0]
    Si = Si[Si > 0]
    c = 1.0 / (1.0 + (Si - 1) * np.exp(-2 * R))
    V = np.abs(vr).max()
    return (s * np.abs(kr).max() * np.abs(d).sum(1).max() * V,
            s * np.abs(q).max() * (c @ np.abs(d).sum(1)) * V,
            c @ np.abs(d).max(1))


@pytest.fixture
def chunk(monkeypatch):
    """Force the chunk size of the forward and the backward (CAUSAL_CHUNK)."""
    def set_chunk(c):
        monkeypatch.setattr(_config, "CAUSAL_CHUNK", c)
    return set_chunk


CASES = [  # G, L, S, offset, E, Ev, R, padded, chunk
    (1, 1, 1, 0, 1, 1, 0.3, False, 16),
    (1, 7, 7, 0, 2, 3, 1.0, False, 16),            # n < chunk
    (1, 60, 60, 0, 4, 3, 1.0, False, 16),          # several chunks, square
    (1, 64, 64, 0, 4, 2, 2.0, False, 16),          # whole chunks
    (1, 200, 250, 50, 8, 8, 0.3, True, 32),        # rectangular at the end, padded
    (1, 1, 90, 89, 4, 3, 1.0, False, 16),          # decoding: one row sees all
    (1, 20, 300, 280, 4, 3, 2.0, True, 16),        # prefill with a cache
    (1, 120, 40, 0, 2, 1, 3.0, False, 16),         # L > S: rows that see every key
    (1, 90, 70, -15, 4, 3, 1.0, True, 8),          # rows that see no key
    (3, 40, 70, 30, 8, 8, 2.0, True, 16),          # G = 3 query heads
    (3, 100, 100, 0, 1, 3, 3.0, False, 32),
    (3, 17, 120, 103, 4, 1, 0.5, False, 16),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eps", [1e-3, 1e-7])
def test_within_the_certified_bound_of_the_exact_gradient(case, eps, chunk):
    G, L, S, off, E, Ev, R, padded, c = case
    chunk(c)
    rng = np.random.default_rng(hash(case) % 2**32)
    q, k, v, dO, s, keep = inputs(rng, G, L, S, E, Ev, R, padded)
    approx = exp_approximation(R, eps=eps)
    out, den = prefix.prefix_attention(q, k, v, s, approx.coef, offset=off, key_mask=keep)
    grads = prefix.prefix_backward(q, k, v, out, den, dO, s, approx.coef, offset=off,
                                   key_mask=keep)
    ref = dense_gradients(q, k, v, dO, s, off, keep)
    bounds = causal_gradient_bound(q, k, v, dO, s, approx.coef, approx.error_bound,
                                   offset=off, key_mask=keep)
    for name, g, r, b, sc in zip("qkv", grads, ref, bounds,
                                 scales(q, k, v, dO, s, keep, R, off)):
        assert g.shape == r.shape and g.dtype == np.float64, name
        err = np.abs(g - r).max()
        assert err <= b, (name, err, b)
        # not vacuous: O(δ) times the gradient's magnitude from the maxima
        assert b <= 8 * approx.error_bound * sc + 1e-12 * sc, (name, b, sc)


@pytest.mark.parametrize("c", [4, 16, 1000])
@pytest.mark.parametrize("G, L, S, off, padded", [(1, 80, 80, 0, False),
                                                  (3, 30, 75, 45, True),
                                                  (2, 70, 33, -5, True)])
def test_the_sums_of_the_polynomial_backward_for_any_chunk(c, G, L, S, off, padded, chunk):
    # the state route (whole chunks), the explicit route (the row's own chunk) and their
    # split are exact algebra: the dense backward with P̃ = p(x)/Σp agrees to rounding
    # (chunk 1000: everything explicit; 4: mostly states)
    chunk(c)
    rng = np.random.default_rng(c + G)
    q, k, v, dO, s, keep = inputs(rng, G, L, S, 4, 3, 1.5, padded)
    coef = exp_approximation(1.5, eps=1e-3).coef
    out, den = prefix.prefix_attention(q, k, v, s, coef, offset=off, key_mask=keep)
    grads = prefix.prefix_backward(q, k, v, out, den, dO, s, coef, offset=off, key_mask=keep)
    ref = dense_gradients(q, k, v, dO, s, off, keep, coef=coef)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-12 * np.abs(r).max())


def test_zero_coefficient(chunk):
    # a zero coefficient cuts the features' weight recurrence (unit weights, scaled after)
    chunk(16)
    rng = np.random.default_rng(12)
    q, k, v, dO, s, keep = inputs(rng, 2, 50, 70, 3, 2, 1.0, True)
    coef = np.array([1.0, 0.0, 0.5])
    out, den = prefix.prefix_attention(q, k, v, s, coef, offset=20, key_mask=keep)
    grads = prefix.prefix_backward(q, k, v, out, den, dO, s, coef, offset=20, key_mask=keep)
    ref = dense_gradients(q, k, v, dO, s, 20, keep, coef=coef)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-12 * np.abs(r).max())


@pytest.mark.parametrize("G, L, S, off, padded", [(3, 30, 45, 15, False),
                                                  (1, 25, 60, 35, True)])
def test_reference_is_numbaropes_exact_backward(G, L, S, off, padded):
    # the dense reference of these tests agrees with the exact path's backward with the
    # causal key ranges (lo = 0, hi = i + offset + 1) and its own lse
    rng = np.random.default_rng(3)
    q, k, v, dO, s, keep = inputs(rng, G, L, S, 4, 3, 1.5, padded)
    Q = q.reshape(G, L, 4)
    d = dO.reshape(G, L, 3)
    ref = dense_gradients(Q, k, v, d, s, off, keep)
    kv = np.zeros(G, np.int64)
    hi = np.clip(np.arange(L) + off + 1, 0, S)[None]
    ranges = (np.zeros_like(hi), hi, np.zeros(G, np.int64))
    km = None if keep is None else np.where(keep, 0.0, -np.inf)[None]
    kw = {"kvidx": kv, "key_ranges": ranges, "key_mask": km,
          "kidx": None if km is None else np.zeros(G, np.int64)}
    out, lse = exact_attention(Q, k[None], v[None], s, return_lse=True, **kw)[:2]
    ex = exact_backward(Q, k[None], v[None], out, lse, d, s, **kw)
    for a, b in zip(ref, (ex[0], ex[1][0], ex[2][0])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("G, off, padded", [(1, 0, False), (3, 40, True)])
def test_converges_to_the_exact_gradient(G, off, padded, chunk):
    # the fast backward approximates the exact causal gradient (not the polynomial
    # forward's gradient): a more accurate p brings it to the exact one
    chunk(16)
    rng = np.random.default_rng(17 + G)
    R = 2.0
    q, k, v, dO, s, keep = inputs(rng, G, 80, 120, 4, 3, R, padded)
    ref = dense_gradients(q, k, v, dO, s, off, keep)
    errs = []
    for eps in (1e-2, 1e-4, 1e-6, 1e-10):
        coef = exp_approximation(R, eps=eps).coef
        out, den = prefix.prefix_attention(q, k, v, s, coef, offset=off, key_mask=keep)
        g = prefix.prefix_backward(q, k, v, out, den, dO, s, coef, offset=off, key_mask=keep)
        errs.append([np.abs(a - b).max() / np.abs(b).max() for a, b in zip(g, ref)])
    errs = np.array(errs)
    assert np.all(errs[1:] < errs[:-1] / 10), errs          # each step: >= 10x smaller
    assert np.all(errs[0] > 1e-5) and np.all(errs[-1] < 1e-9), errs


def test_padded_keys_get_zero_and_change_nothing(chunk):
    chunk(16)
    rng = np.random.default_rng(5)
    q, k, v, dO, s, keep = inputs(rng, 3, 50, 90, 4, 3, 1.0, True)
    keep[:7] = False                          # left padding (as a batch of prompts)
    off = 40
    coef = exp_approximation(1.0, eps=1e-5).coef
    out, den = prefix.prefix_attention(q, k, v, s, coef, offset=off, key_mask=keep)
    dq, dk, dv = prefix.prefix_backward(q, k, v, out, den, dO, s, coef, offset=off,
                                        key_mask=keep)
    assert np.all(dk[~keep] == 0) and np.all(dv[~keep] == 0)
    assert np.abs(dk[keep]).min() > 0 and np.abs(dv[keep]).min() > 0
    # padding only at the start: the real keys alone at offset − 7 are the same problem
    # (bitwise: the same keys, chunks and tasks)
    k2, v2 = k[7:], v[7:]
    m2 = keep[7:]
    o2, d2 = prefix.prefix_attention(q, k2, v2, s, coef, offset=off - 7, key_mask=m2)
    dq2, dk2, dv2 = prefix.prefix_backward(q, k2, v2, o2, d2, dO, s, coef, offset=off - 7,
                                           key_mask=m2)
    assert np.array_equal(dq, dq2)
    assert np.array_equal(dk[7:], dk2) and np.array_equal(dv[7:], dv2)


def test_rows_that_see_no_key_get_zero(chunk):
    chunk(8)
    rng = np.random.default_rng(6)
    q, k, v, dO, s, _ = inputs(rng, 2, 40, 30, 4, 3, 1.0, False)
    coef = exp_approximation(1.0, eps=1e-5).coef
    out, den = prefix.prefix_attention(q, k, v, s, coef, offset=-10)
    dq = prefix.prefix_backward(q, k, v, out, den, dO, s, coef, offset=-10)[0]
    # (row 10 sees key 0 alone: its exact dq is 0, the computed one rounding)
    assert not dq[:, :10].any() and np.abs(dq[:, 11:]).min() > 0
    # the bound of those rows is not needed: it counts only rows that see a key
    assert causal_gradient_bound(q[:, :10], k, v, dO[:, :10], s, coef, 1e-5,
                                 offset=-10) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("columns", [None, 4])
def test_workers_do_not_change_results(columns, monkeypatch):
    # several chunks per explicit task, several column tasks per scan (4 columns: one
    # unit each), feature blocks of 8 rows: bitwise the same for any number of threads
    from numbarope.ops import _common
    monkeypatch.setattr(_config, "CAUSAL_CHUNK", 16)
    monkeypatch.setattr(_config, "MAX_TASKS", 5)
    if columns is not None:
        monkeypatch.setattr(prefix, "BACKWARD_COLUMNS", columns)
        monkeypatch.setattr(_common, "BACKWARD_BLOCK_BYTES", 8 * 35 * 8)
        monkeypatch.setattr(_common, "BACKWARD_MIN_ROWS", 8)
    rng = np.random.default_rng(29)
    q, k, v, dO, s, keep = inputs(rng, 2, 300, 410, 4, 3, 1.0, True)
    coef = exp_approximation(1.0, degree=3).coef            # m = 35 features
    out, den = prefix.prefix_attention(q, k, v, s, coef, offset=110, key_mask=keep)
    res = [prefix.prefix_backward(q, k, v, out, den, dO, s, coef, offset=110, key_mask=keep,
                                  workers=w) for w in (1, 2, 3, -1)]
    for r in res[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(r, res[0]))
    ref = dense_gradients(q, k, v, dO, s, 110, keep, coef=coef)
    for a, b in zip(res[0], ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())


def test_bound_reduces_to_the_gemm_bound_when_every_row_sees_every_key():
    # offset >= S − 1: every row sees every real key; the approximation parts are
    # gradient_bound's and the rounding counts differ by one addition
    rng = np.random.default_rng(9)
    q, k, v, dO, s, keep = inputs(rng, 3, 20, 50, 4, 3, 1.0, True)
    for eps in (1e-3, 1e-12):
        a = exp_approximation(1.0, eps=eps)
        b1 = causal_gradient_bound(q, k, v, dO, s, a.coef, a.error_bound, offset=49,
                                   key_mask=keep)
        b2 = gradient_bound(q, k, v, dO, s, a.coef, a.error_bound, key_mask=keep)
        np.testing.assert_allclose(b1, b2, rtol=1e-3 if eps < 1e-6 else 1e-10)
        assert all(x >= y for x, y in zip(b1, b2))


@pytest.mark.parametrize("L, S, off, least", [(60, 60, 0, (0.05, 0.1, 0.4)),
                                               (20, 60, 40, (0.05, 0.3, 0.7)),
                                               (40, 200, 160, (0.02, 0.4, 0.8))])
def test_bound_is_nearly_attained(L, S, off, least, chunk):
    # The worst case of test_gemm_backward.py, causal: key 0 at logit +R with value +1,
    # the others at −R with value −1, every row the same, p of even degree: the errors
    # reach a sizeable fraction of the bound and never exceed it (measured 0.05-0.13 for
    # dq, 0.15-0.6 for dk, 0.58-0.96 for dv; least on the square case, whose first rows
    # see few keys: their c_i is near 1, their errors near 0).
    chunk(16)
    R = 1.0
    approx = exp_approximation(R, degree=4)
    q = np.full((L, 1), np.sqrt(R))
    k = np.full((S, 1), -np.sqrt(R))
    k[0] = np.sqrt(R)
    v = np.where(np.arange(S) == 0, 1.0, -1.0)[:, None]
    dO = np.ones((L, 1))
    out, den = prefix.prefix_attention(q, k, v, 1.0, approx.coef, offset=off)
    grads = prefix.prefix_backward(q, k, v, out, den, dO, 1.0, approx.coef, offset=off)
    ref = dense_gradients(q, k, v, dO, 1.0, off)
    bounds = causal_gradient_bound(q, k, v, dO, 1.0, approx.coef, approx.error_bound,
                                   offset=off)
    for name, g, r, b, lo in zip("qkv", grads, ref, bounds, least):
        err = np.abs(g - r).max()
        assert lo * b <= err <= b, (name, err / b)


def test_shapes_edges_and_registry_method(chunk):
    chunk(8)
    rng = np.random.default_rng(8)
    q, k, v, dO, s, _ = inputs(rng, 1, 12, 20, 4, 3, 1.0, False)
    coef = exp_approximation(1.0, eps=1e-4).coef
    out, den = prefix.prefix_attention(q, k, v, s, coef, offset=4)
    g = prefix.prefix_backward(q, k, v, out, den, dO, s, coef, offset=4)
    assert [x.shape for x in g] == [(12, 4), (20, 4), (20, 3)]
    g2 = get("prefix").backward(q, k, v, out, den, dO, s, coef, offset=4)
    assert all(np.array_equal(a, b) for a, b in zip(g, g2))
    # keys after the last row's position (15) get nothing
    assert not g[1][16:].any() and not g[2][16:].any()
    assert np.abs(g[1][:16]).min() > 0 and np.abs(g[2][:16]).min() > 0
    # no real key: zero gradients; no query row: dq empty, dk = dv = 0
    none = np.zeros(20, bool)
    o0, d0 = prefix.prefix_attention(q, k, v, s, coef, key_mask=none)
    z = prefix.prefix_backward(q, k, v, o0, d0, dO, s, coef, key_mask=none)
    assert all(x.shape == y.shape and not x.any() for x, y in zip(z, g))
    e = prefix.prefix_backward(q[:0], k, v, out[:0], den[:0], dO[:0], s, coef)
    assert e[0].shape == (0, 4) and not e[1].any() and not e[2].any()
    # Ev = 0: nothing flows back
    o1, d1 = prefix.prefix_attention(q, k, v[:, :0], s, coef)
    z = prefix.prefix_backward(q, k, v[:, :0], o1, d1, dO[:, :0], s, coef)
    assert z[2].shape == (20, 0) and not z[0].any() and not z[1].any()
    # the bound of an empty problem is 0, of a void one inf
    assert causal_gradient_bound(q[:0], k, v, dO[:0], s, coef, 1e-4) == (0.0, 0.0, 0.0)
    assert causal_gradient_bound(q, k, v, dO, s, coef, 1.0) == (np.inf,) * 3
