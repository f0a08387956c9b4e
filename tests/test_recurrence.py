"""Decay and window attention by chunked recurrences (numbarope._recurrence).

Two references, both dense float64 over all (query, key) pairs:

* the same polynomial, ``Σ_j p(s·q_iᵀk_j)·T(i+offset−j)[v_j, 1]`` with ``p`` by
  ``np.polynomial.polynomial.polyval``: the fast result must agree to rounding;
* true softmax attention (``exp``) with bias ``log T``: the error must be within
  ``2(δ+ρ)/(1−δ−ρ)·max|v|``, ρ = ``recurrence_rounding``.

Decay weights are taken relative to each row's nearest visible key
(``γ^{|t| − t0}``): the same softmax, and what ``fast_decay`` returns as ``den``.
"""

import numpy as np
import pytest
from numpy.polynomial.polynomial import polyval

from numbarope import _config
from numbarope import _recurrence as rec
from numbarope._monomials import n_features
from numbarope._recurrence import fast_decay, fast_window, recurrence_rounding
from numbarope.polynomial import exp_approximation

RATES = (0.0, 0.01, 0.5, 5.0, 800.0)
WINDOWS = ((0, 0), (1, 0), (5, 0), (300, 0), (0, 1), (1, 1), (5, 5), (300, 300), (3, 17))
#: (L, S, offset): square below and above a chunk, rectangular (decoding block at the
#: end, queries beyond the keys, negative offsets)
SHAPES = ((5, 5, 0), (257, 257, 0), (700, 700, 0), (1500, 1500, 0), (40, 1000, 960),
          (300, 37, 0), (50, 300, -20), (30, 200, -100))
TOL = 1e-12                 # fast vs dense polynomial: rounding only (relative to max|v|)


def decay_log(rate, causal):
    """log T(t) for the decay, −inf where masked."""
    def f(t):
        with np.errstate(invalid="ignore"):
            lt = -rate * np.abs(t).astype(float)
        lt[t == 0] = 0.0                                 # rate = inf: 0·inf
        if causal:
            lt[t < 0] = -np.inf
        return lt
    return f


def window_log(left, right):
    return lambda t: np.where((t >= -right) & (t <= left), 0.0, -np.inf)


class Dense:
    """Dense ``Σ_j w(s q_iᵀk_j) T(t_ij) [v_j, 1]`` over all pairs, T relative to the row's
    largest visible T; ``weight`` = p (coefficients) or None for exp. The pair weights
    are formed once, each ``__call__(logT)`` applies one T; returns (out, den)."""

    def __init__(self, q, k, v, scale, offset=0, key_mask=None, weight=None):
        L, S = q.shape[0], k.shape[0]
        self.t = np.arange(L)[:, None] + offset - np.arange(S)[None, :]
        x = scale * (q @ k.T)
        self.W = np.exp(x) if weight is None else polyval(x, weight)
        self.v = v
        self.key_mask = key_mask

    def __call__(self, logT):
        lt = logT(self.t)
        if self.key_mask is not None:
            lt[:, ~self.key_mask] = -np.inf
        top = lt.max(axis=1, keepdims=True)
        top[~np.isfinite(top)] = 0.0
        W = np.exp(lt - top) * self.W
        num, den = W @ self.v, W.sum(axis=1)
        out = np.zeros_like(num)
        ok = den > 0
        out[ok] = num[ok] / den[ok, None]
        return out, den


def dense(q, k, v, scale, logT, offset=0, key_mask=None, weight=None):
    """One-off :class:`Dense`."""
    return Dense(q, k, v, scale, offset, key_mask, weight)(logT)


def inputs(rng, L, S, E=4, Ev=3, R=1.0, G=None):
    """q, k with s·max‖q‖·max‖k‖ = R at s = 1/sqrt(E), v uniform in [−1, 1]."""
    s = 1.0 / np.sqrt(E)
    q = rng.standard_normal((L, E) if G is None else (G, L, E))
    k = rng.standard_normal((S, E))
    q *= np.sqrt(R / s) / np.linalg.norm(q, axis=-1).max()
    k *= np.sqrt(R / s) / np.linalg.norm(k, axis=-1).max()
    return q, k, rng.uniform(-1, 1, (S, Ev)), s


@pytest.fixture(scope="module")
def coef():
    return exp_approximation(1.0, eps=1e-6).coef


def _agree(got, ref):
    out, den = got
    rout, rden = ref
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(den))
    assert np.abs(out - rout).max(initial=0.0) <= TOL
    assert np.all(np.abs(den - rden) <= TOL * np.abs(rden))


@pytest.mark.parametrize("L,S,offset", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_decay_matches_dense_polynomial(coef, L, S, offset, causal):
    rng = np.random.default_rng(L + S)
    q, k, v, s = inputs(rng, L, S)
    mask = rng.random(S) < 0.7
    for key_mask in (None, mask):
        ref = Dense(q, k, v, s, offset, key_mask, coef)
        for rate in RATES:
            got = fast_decay(q, k, v, s, coef, rate, causal, offset=offset, key_mask=key_mask)
            _agree(got, ref(decay_log(rate, causal)))


@pytest.mark.parametrize("L,S,offset", SHAPES)
def test_window_matches_dense_polynomial(coef, L, S, offset):
    rng = np.random.default_rng(L * S + 1)
    q, k, v, s = inputs(rng, L, S)
    mask = rng.random(S) < 0.7
    for key_mask in (None, mask):
        ref = Dense(q, k, v, s, offset, key_mask, coef)
        for left, right in WINDOWS:
            got = fast_window(q, k, v, s, coef, left, right, offset=offset, key_mask=key_mask)
            _agree(got, ref(window_log(left, right)))


@pytest.mark.parametrize("chunk,state_bytes", [(1, 2**28), (7, 2**28), (7, 20_000)])
def test_small_chunks_many_tasks_and_groups(coef, chunk, state_bytes, monkeypatch):
    """Tiny chunks: many chunks per task, a deep tree of window states; with little
    STATE_BYTES, several groups of chunk states and two-sided decay as two scans
    (else one pass); workers 1 and 2 bitwise equal."""
    monkeypatch.setattr(rec, "CHUNK", chunk)
    monkeypatch.setattr(_config, "STATE_BYTES", state_bytes)
    rng = np.random.default_rng(chunk)
    for L, S, offset in ((300, 300, 0), (90, 250, 100), (120, 40, -10)):
        q, k, v, s = inputs(rng, L, S)
        mask = rng.random(S) < 0.8
        for causal in (True, False):
            for rate in (0.05, 5.0):
                a = fast_decay(q, k, v, s, coef, rate, causal, 1, offset=offset, key_mask=mask)
                b = fast_decay(q, k, v, s, coef, rate, causal, 2, offset=offset, key_mask=mask)
                assert all(np.array_equal(x, y) for x, y in zip(a, b))
                _agree(a, dense(q, k, v, s, decay_log(rate, causal), offset, mask, coef))
        for left, right in ((20, 0), (9, 33), (500, 500)):
            a = fast_window(q, k, v, s, coef, left, right, 1, offset=offset, key_mask=mask)
            b = fast_window(q, k, v, s, coef, left, right, 2, offset=offset, key_mask=mask)
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
            _agree(a, dense(q, k, v, s, window_log(left, right), offset, mask, coef))


def test_workers_bitwise_equal(coef):
    rng = np.random.default_rng(7)
    q, k, v, s = inputs(rng, 1500, 1500, E=6, Ev=5)
    for causal in (True, False):
        a = fast_decay(q, k, v, s, coef, 0.01, causal, workers=1)
        b = fast_decay(q, k, v, s, coef, 0.01, causal, workers=2)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for left, right in ((255, 0), (300, 700)):
        a = fast_window(q, k, v, s, coef, left, right, workers=1)
        b = fast_window(q, k, v, s, coef, left, right, workers=2)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_stacked_heads(coef):
    """G = 3 query heads on one key/value head: the same as one head at a time."""
    rng = np.random.default_rng(3)
    q, k, v, s = inputs(rng, 200, 260, G=3)
    mask = rng.random(260) < 0.8
    for fn, args, logT in ((fast_decay, (0.05, False), decay_log(0.05, False)),
                           (fast_decay, (0.5, True), decay_log(0.5, True)),
                           (fast_window, (17, 4), window_log(17, 4))):
        out, den = fn(q, k, v, s, coef, *args, offset=30, key_mask=mask)
        assert out.shape == (3, 200, 3) and den.shape == (3, 200)
        for h in range(3):
            o1, d1 = fn(q[h], k, v, s, coef, *args, offset=30, key_mask=mask)
            np.testing.assert_allclose(out[h], o1, rtol=0, atol=1e-14)
            _agree((out[h], den[h]), dense(q[h], k, v, s, logT, 30, mask, coef))


def test_edge_cases(coef):
    rng = np.random.default_rng(5)
    q, k, v, s = inputs(rng, 50, 60)
    # rate = inf: only the nearest key(s); with every key at its own position, v itself
    out, _ = fast_decay(q, k, v, s, coef, np.inf, False)
    np.testing.assert_allclose(out, v[:50], atol=1e-15)
    # no value columns, no rows, no real keys
    assert fast_decay(q, k, v[:, :0], s, coef, 0.1, True)[0].shape == (50, 0)
    assert fast_window(q, k, v[:, :0], s, coef, 2, 2)[0].shape == (50, 0)
    assert fast_window(q[:0], k, v, s, coef, 2, 2)[0].shape == (0, 3)
    none = np.zeros(60, bool)
    for got in (fast_decay(q, k, v, s, coef, 0.1, False, key_mask=none),
                fast_window(q, k, v, s, coef, 3, 3, key_mask=none)):
        assert not got[0].any() and not got[1].any()
    # rows whose window or causal past holds no key: 0
    out, den = fast_window(q, k, v, s, coef, 0, 0, offset=100)
    assert not out.any() and not den.any()
    out, den = fast_decay(q, k, v, s, coef, 0.3, True, offset=-50)
    assert not out.any() and not den.any()
    for bad in (-1.0, np.nan, "x", [0.1, 0.2]):
        with pytest.raises(ValueError):
            fast_decay(q, k, v, s, coef, bad, True)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            fast_window(q, k, v, s, coef, bad, 0)


@pytest.mark.parametrize("R,eps", [(1.0, 1e-3), (3.0, 1e-3), (2.0, 1e-10)])
def test_error_within_certified_bound(R, eps):
    """max|out − softmax| <= 2(δ+ρ)/(1−δ−ρ)·max|v| against true softmax (exp) attention;
    1e-13·max|v| covers the dense float64 reference's own rounding."""
    approx = exp_approximation(R, eps=eps)
    rng = np.random.default_rng(int(R * 10))
    E, Ev = 4, 3
    m = n_features(E, approx.degree)
    cases = [(600, 600, 0, None), (40, 1000, 960, None), (300, 37, 0, None),
             (400, 500, -30, rng.random(500) < 0.6)]
    for L, S, offset, key_mask in cases:
        q, k, v, s = inputs(rng, L, S, E, Ev, R)
        vmax = np.abs(v).max()
        R1 = s * np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=1).max()
        softmax = Dense(q, k, v, s, offset, key_mask)
        for rate, causal in ((0.01, True), (0.3, False), (5.0, False), (800.0, True)):
            out, _ = fast_decay(q, k, v, s, approx.coef, rate, causal, offset=offset,
                                key_mask=key_mask)
            ref, _ = softmax(decay_log(rate, causal))
            rho = recurrence_rounding("decay", S, m, approx.coef, R, R1, approx.error_bound,
                                      chunk=rec.decay_chunk(m, E, Ev, approx.degree), rate=rate)
            d = approx.error_bound + rho
            bound = 2 * d / (1 - d) * vmax
            err = np.abs(out - ref).max()
            assert err <= bound + 1e-13 * vmax, (L, S, rate, causal, err, bound)
        for left, right in ((0, 0), (31, 0), (50, 200), (5000, 5000)):
            out, _ = fast_window(q, k, v, s, approx.coef, left, right, offset=offset,
                                 key_mask=key_mask)
            ref, _ = softmax(window_log(left, right))
            rho = recurrence_rounding("window", S, m, approx.coef, R, R1, approx.error_bound)
            d = approx.error_bound + rho
            err = np.abs(out - ref).max()
            assert err <= 2 * d / (1 - d) * vmax + 1e-13 * vmax, (L, S, left, right, err)


def test_rounding_allowance_shape():
    """ρ grows with S, shrinks with larger chunks, and is finite and tiny at R = 1."""
    approx = exp_approximation(1.0, eps=1e-3)
    c = approx.coef
    d = approx.error_bound
    a = recurrence_rounding("decay", 4096, 969, c, 1.0, 1.0, d, chunk=16)
    b = recurrence_rounding("decay", 4096, 969, c, 1.0, 1.0, d, chunk=256)
    assert 0 < b < a < 1e-10
    assert recurrence_rounding("decay", 4096, 969, c, 1.0, 1.0, d, rate=0.0) < a
    w = recurrence_rounding("window", 4096, 969, c, 1.0, 1.0, d)
    assert 0 < w < recurrence_rounding("window", 65536, 969, c, 1.0, 1.0, d) < 1e-10
    with pytest.raises(ValueError):
        recurrence_rounding("fft", 10, 10, c, 1.0, 1.0, d)
