"""numbarope.ops.window: sliding windows by a tree of chunk states, against dense float64
references (the same polynomial; true softmax within the certified bound), tiny chunks
and deep trees, threads, stacked heads, edge cases; the driver on per-row key ranges;
the registry entry."""

import numpy as np
import pytest

from _poly_ref import Dense, agree, dense, inputs, poly_rows, window_log
from numbarope import _config
from numbarope import bias as nb
from numbarope.ops import _common, window
from numbarope.ops._bounds import recurrence_rounding
from numbarope.ops._features import n_features
from numbarope.ops.registry import HeadSpec, get
from numbarope.polynomial import exp_approximation

WINDOWS = ((0, 0), (1, 0), (5, 0), (300, 0), (0, 1), (1, 1), (5, 5), (300, 300), (3, 17))
SHAPES = ((5, 5, 0), (257, 257, 0), (700, 700, 0), (1500, 1500, 0), (40, 1000, 960),
          (300, 37, 0), (50, 300, -20), (30, 200, -100))


def fast_window(q, k, v, s, coef, left, right, workers=None, **kw):
    return window.window_attention(q, k, v, s, coef, nb.Window(left, right), workers=workers,
                                   **kw)


@pytest.fixture(scope="module")
def coef():
    return exp_approximation(1.0, eps=1e-6).coef


@pytest.mark.parametrize("L,S,offset", SHAPES)
def test_window_matches_dense_polynomial(coef, L, S, offset):
    rng = np.random.default_rng(L * S + 1)
    q, k, v, s = inputs(rng, L, S)
    mask = rng.random(S) < 0.7
    for key_mask in (None, mask):
        ref = Dense(q, k, v, s, offset, key_mask, coef)
        for left, right in WINDOWS:
            got = fast_window(q, k, v, s, coef, left, right, offset=offset, key_mask=key_mask)
            agree(got, ref(window_log(left, right)))


@pytest.mark.parametrize("chunk,state_bytes", [(1, 2**28), (7, 2**28), (7, 20_000)])
def test_small_chunks_deep_trees(coef, chunk, state_bytes, monkeypatch):
    """Tiny chunks: a deep tree of window states; workers 1 and 2 bitwise equal."""
    monkeypatch.setattr(_common, "CHUNK", chunk)
    monkeypatch.setattr(_config, "STATE_BYTES", state_bytes)
    rng = np.random.default_rng(chunk)
    for L, S, offset in ((300, 300, 0), (90, 250, 100), (120, 40, -10)):
        q, k, v, s = inputs(rng, L, S)
        mask = rng.random(S) < 0.8
        for left, right in ((20, 0), (9, 33), (500, 500)):
            a = fast_window(q, k, v, s, coef, left, right, 1, offset=offset, key_mask=mask)
            b = fast_window(q, k, v, s, coef, left, right, 2, offset=offset, key_mask=mask)
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
            agree(a, dense(q, k, v, s, window_log(left, right), offset, mask, coef))


def test_workers_bitwise_equal(coef):
    rng = np.random.default_rng(7)
    q, k, v, s = inputs(rng, 1500, 1500, E=6, Ev=5)
    for left, right in ((255, 0), (300, 700)):
        a = fast_window(q, k, v, s, coef, left, right, workers=1)
        for w in (2, 3):
            b = fast_window(q, k, v, s, coef, left, right, workers=w)
            assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_stacked_heads(coef):
    """G = 3 query heads on one key/value head: the same as one head at a time."""
    rng = np.random.default_rng(3)
    q, k, v, s = inputs(rng, 200, 260, G=3)
    mask = rng.random(260) < 0.8
    out, den = fast_window(q, k, v, s, coef, 17, 4, offset=30, key_mask=mask)
    assert out.shape == (3, 200, 3) and den.shape == (3, 200)
    for h in range(3):
        o1, d1 = fast_window(q[h], k, v, s, coef, 17, 4, offset=30, key_mask=mask)
        np.testing.assert_allclose(out[h], o1, rtol=0, atol=1e-14)
        agree((out[h], den[h]), dense(q[h], k, v, s, window_log(17, 4), 30, mask, coef))


def test_edge_cases(coef):
    rng = np.random.default_rng(5)
    q, k, v, s = inputs(rng, 50, 60)
    # no value columns, no rows, no real keys
    assert fast_window(q, k, v[:, :0], s, coef, 2, 2)[0].shape == (50, 0)
    assert fast_window(q[:0], k, v, s, coef, 2, 2)[0].shape == (0, 3)
    got = fast_window(q, k, v, s, coef, 3, 3, key_mask=np.zeros(60, bool))
    assert not got[0].any() and not got[1].any()
    # rows whose window holds no key: 0
    out, den = fast_window(q, k, v, s, coef, 0, 0, offset=100)
    assert not out.any() and not den.any()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            fast_window(q, k, v, s, coef, bad, 0)


def test_unbounded_sides_and_other_key_ranges(coef):
    """None (unbounded) sides, and any structure that gives key ranges and no bias: the
    causal mask (Window(None, 0)) and no restriction (Window(None, None)) are the prefix
    and every-key sums."""
    rng = np.random.default_rng(8)
    q, k, v, s = inputs(rng, 120, 150)
    keep = rng.random(150) < 0.75
    for st, causal in ((nb.Window(None, 0), True), (nb.Causal(), True),
                       (nb.Window(None, None), False), (nb.NoBias(), False)):
        out, _ = window.window_attention(q, k, v, s, coef, st, offset=10, key_mask=keep)
        np.testing.assert_allclose(out, poly_rows(q, k, v, s, coef, 10, causal, keep),
                                   rtol=0, atol=1e-12)
    out, _ = window.window_attention(q, k, v, s, coef, nb.Window(None, 7), offset=10)
    agree(window.window_attention(q, k, v, s, coef, nb.Window(None, 7), offset=10),
          dense(q, k, v, s, window_log(10**9, 7), 10, None, coef))


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
        for left, right in ((0, 0), (31, 0), (50, 200), (5000, 5000)):
            out, _ = fast_window(q, k, v, s, approx.coef, left, right, offset=offset,
                                 key_mask=key_mask)
            ref, _ = softmax(window_log(left, right))
            rho = recurrence_rounding("window", S, m, approx.coef, R, R1, approx.error_bound)
            d = approx.error_bound + rho
            err = np.abs(out - ref).max()
            assert err <= 2 * d / (1 - d) * vmax + 1e-13 * vmax, (L, S, left, right, err)


def test_registry_entry(coef):
    alg = get("window")
    assert isinstance(alg, window.Window) and alg.structures == (nb.Window,)
    h = HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=nb.Window(8, 2))
    assert alg.unavailable(h) == []
    assert alg.predict(h, 3) > 0 and alg.memory(h, 3) == window.window_memory(64, 4, 4, 3)
    assert 0 < alg.rounding(h, coef, 1e-6) < 1e-10
    for st in (nb.NoBias(), nb.Causal(), nb.Decay(0.1)):
        why = alg.unavailable(HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=st))
        assert [w.code for w in why] == ["structure"]
    q, k, v, kw = alg.example(np.random.default_rng(0))
    assert kw["bias"] == nb.Window(40, 0)
    out, den = alg.run(q, k, v, 0.5, coef, structure=nb.Window(40, 0), offset=2)
    o2, d2 = fast_window(q, k, v, 0.5, coef, 40, 0, offset=2)
    assert np.array_equal(out, o2) and np.array_equal(den, d2)
    with pytest.raises(ValueError, match="window: initial_state"):
        alg.run(q, k, v, 0.5, coef, structure=nb.Window(40, 0), return_state=True)
    with pytest.raises(ValueError, match="window: initial_state"):
        alg.run(q, k, v, 0.5, coef, structure=nb.Window(40, 0),
                initial_state=(np.zeros((35, 3)), np.zeros(35)))
