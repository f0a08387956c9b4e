"""numbarope.ops.gemm.gemm_backward: the certified fast backward of the gemm algorithm,
against the EXACT softmax gradients (the dense float64 reference of tests/naive.py, attention_gradients): within the
certified bound of numbarope.ops._bounds.gradient_bound, which is itself O(δ); it
converges to the exact gradients as δ → 0; padded keys; grouped-query heads; threads."""

import numpy as np
import pytest

from numbarope import _config
from numbarope.ops import _common, gemm
from numbarope.ops._bounds import gradient_bound
from numbarope.ops.registry import get
from numbarope.ops.streaming import exact_attention, exact_backward
from numbarope.polynomial import exp_approximation

from _grad_inputs import inputs
from naive import attention_gradients


def scales(q, k, v, dO, s, keep, R):
    """The gradients' natural magnitudes from the maxima (what the bound multiplies δ by):
    dq: s·max|k|·max‖dO_i‖₁·max|v|; dk: s·max|q|·c_A·Σ‖dO_i‖₁·max|v|; dv: c_A·Σ‖dO_i‖_∞
    (c_A = 1/(1 + (S−1)e^{−2R}) >= every softmax weight)."""
    kr, vr = (k, v) if keep is None else (k[keep], v[keep])
    d = dO.reshape(-1, dO.shape[-1])
    cA = 1.0 / (1.0 + (kr.shape[0] - 1) * np.exp(-2 * R))
    V = np.abs(vr).max()
    return (s * np.abs(kr).max() * np.abs(d).sum(1).max() * V,
            s * np.abs(q).max() * cA * np.abs(d).sum() * V,
            cA * np.abs(d).max(1).sum())


CASES = [  # G, L, S, E, Ev, R, padded
    (1, 1, 1, 1, 1, 0.3, False),
    (1, 1, 7, 2, 3, 1.0, False),
    (1, 9, 1, 4, 1, 2.0, False),
    (1, 60, 50, 4, 3, 1.0, False),
    (1, 300, 290, 2, 1, 3.0, False),
    (1, 200, 250, 8, 8, 0.3, True),
    (3, 40, 70, 8, 8, 2.0, True),
    (3, 100, 300, 1, 3, 3.0, True),
    (3, 17, 120, 4, 1, 0.5, False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eps", [1e-3, 1e-7])
def test_within_the_certified_bound_of_the_exact_gradient(case, eps):
    G, L, S, E, Ev, R, padded = case
    rng = np.random.default_rng(hash(case) % 2**32)
    q, k, v, dO, s, keep = inputs(rng, G, L, S, E, Ev, R, padded)
    approx = exp_approximation(R, eps=eps)
    out, den = gemm.gemm_attention(q, k, v, s, approx.coef, key_mask=keep)
    grads = gemm.gemm_backward(q, k, v, out, den, dO, s, approx.coef, key_mask=keep)
    ref = attention_gradients(q, k, v, dO, s, keep=keep)
    bounds = gradient_bound(q, k, v, dO, s, approx.coef, approx.error_bound, key_mask=keep)
    for name, g, r, b, sc in zip("qkv", grads, ref, bounds, scales(q, k, v, dO, s, keep, R)):
        assert g.shape == r.shape and g.dtype == np.float64, name
        err = np.abs(g - r).max()
        assert err <= b, (name, err, b)
        # not vacuous: O(δ) times the gradient's magnitude from the maxima (the
        # approximation part is 2ε_P + e_Δ <= ~6δ of it; rounding adds ~1e-13)
        assert b <= 8 * approx.error_bound * sc + 1e-12 * sc, (name, b, sc)


@pytest.mark.parametrize("S, least", [(31, (0.05, 0.2, 0.6)), (200, (0.02, 0.4, 0.8))])
def test_bound_is_nearly_attained(S, least):
    # Not vacuous in the worst case: one key at logit +R with value +1, the others at −R
    # with value −1, every row the same, p of even degree (its relative error has
    # opposite signs at ±R: P̃/A − 1 ≈ ±2δ on the special key). The errors reach a
    # sizeable fraction of the bound (measured ~0.04-0.13 for dq, 0.3-0.6 for dk, 0.8-0.96
    # for dv) and never exceed it.
    R, n = 1.0, 20
    approx = exp_approximation(R, degree=4)
    f = np.polynomial.polynomial.polyval([-R, R], approx.coef) * np.exp([R, -R]) - 1
    assert f[0] * f[1] < 0 and np.abs(f).min() > 0.9 * approx.error_bound
    q = np.full((n, 1), np.sqrt(R))
    k = np.full((S, 1), -np.sqrt(R))
    k[0] = np.sqrt(R)
    v = np.where(np.arange(S) == 0, 1.0, -1.0)[:, None]
    dO = np.ones((n, 1))
    out, den = gemm.gemm_attention(q, k, v, 1.0, approx.coef)
    grads = gemm.gemm_backward(q, k, v, out, den, dO, 1.0, approx.coef)
    ref = attention_gradients(q, k, v, dO, 1.0)
    bounds = gradient_bound(q, k, v, dO, 1.0, approx.coef, approx.error_bound)
    for name, g, r, b, lo in zip("qkv", grads, ref, bounds, least):
        err = np.abs(g - r).max()
        assert lo * b <= err <= b, (name, err / b)


def test_reference_is_numbaropes_exact_backward():
    # the dense reference of these tests agrees with the exact path's backward
    rng = np.random.default_rng(3)
    q, k, v, dO, s, _ = inputs(rng, 3, 30, 45, 4, 3, 1.5, False)
    ref = attention_gradients(q, k, v, dO, s)
    kv = np.zeros(3, np.int64)
    out, lse = exact_attention(q, k[None], v[None], s, kvidx=kv, return_lse=True)[:2]
    ex = exact_backward(q, k[None], v[None], out, lse, dO, s, kvidx=kv)
    for a, b in zip(ref, (ex[0], ex[1][0], ex[2][0])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("G, padded", [(1, False), (3, True)])
def test_converges_to_the_exact_gradient(G, padded):
    # the fast backward approximates the exact gradient (not the polynomial forward's
    # gradient): a more accurate p brings it to the exact one, orders of magnitude
    rng = np.random.default_rng(17 + G)
    R = 2.0
    q, k, v, dO, s, keep = inputs(rng, G, 80, 150, 4, 3, R, padded)
    ref = attention_gradients(q, k, v, dO, s, keep=keep)
    errs = []
    for eps in (1e-2, 1e-4, 1e-6, 1e-10):
        coef = exp_approximation(R, eps=eps).coef
        out, den = gemm.gemm_attention(q, k, v, s, coef, key_mask=keep)
        g = gemm.gemm_backward(q, k, v, out, den, dO, s, coef, key_mask=keep)
        errs.append([np.abs(a - b).max() / np.abs(b).max() for a, b in zip(g, ref)])
    errs = np.array(errs)
    assert np.all(errs[1:] < errs[:-1] / 10), errs          # each step: >= 10x smaller
    assert np.all(errs[0] > 1e-5) and np.all(errs[-1] < 1e-9), errs


def test_padded_keys_get_zero_and_change_nothing():
    rng = np.random.default_rng(5)
    q, k, v, dO, s, keep = inputs(rng, 3, 50, 90, 4, 3, 1.0, True)
    keep[:5] = False
    coef = exp_approximation(1.0, eps=1e-5).coef
    out, den = gemm.gemm_attention(q, k, v, s, coef, key_mask=keep)
    dq, dk, dv = gemm.gemm_backward(q, k, v, out, den, dO, s, coef, key_mask=keep)
    assert np.all(dk[~keep] == 0) and np.all(dv[~keep] == 0)
    assert np.abs(dk[keep]).min() > 0 and np.abs(dv[keep]).min() > 0
    # the same as the real keys alone (bitwise: the same blocks and tasks)
    o2, d2 = gemm.gemm_attention(q, k[keep], v[keep], s, coef)
    dq2, dk2, dv2 = gemm.gemm_backward(q, k[keep], v[keep], o2, d2, dO, s, coef)
    assert np.array_equal(dq, dq2)
    assert np.array_equal(dk[keep], dk2) and np.array_equal(dv[keep], dv2)


@pytest.mark.parametrize("block_bytes", [None, 8 * 35 * 8])
def test_workers_do_not_change_results(block_bytes, monkeypatch):
    # several blocks per task, several tasks, waves of `workers` tasks: bitwise the
    # same for any number of threads, and the same numbers as one big block (1e-13)
    rng = np.random.default_rng(29)
    q, k, v, dO, s, keep = inputs(rng, 2, 300, 410, 4, 3, 1.0, True)
    coef = exp_approximation(1.0, degree=3).coef            # m = 35 features
    out, den = gemm.gemm_attention(q, k, v, s, coef, key_mask=keep)
    one_block = gemm.gemm_backward(q, k, v, out, den, dO, s, coef, key_mask=keep, workers=1)
    if block_bytes is not None:
        monkeypatch.setattr(_common, "BACKWARD_BLOCK_BYTES", block_bytes)   # 8-row blocks
        monkeypatch.setattr(_common, "BACKWARD_MIN_ROWS", 8)
        monkeypatch.setattr(_config, "MAX_TASKS", 7)
        assert _common.backward_chunk(35, 3 * 4 + 4 + 3) == 8
    res = [gemm.gemm_backward(q, k, v, out, den, dO, s, coef, key_mask=keep, workers=w)
           for w in (1, 2, 3, -1)]
    for r in res[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(r, res[0]))
    for a, b in zip(res[0], one_block):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.abs(b).max())


def test_shapes_edges_and_registry_method():
    rng = np.random.default_rng(8)
    q, k, v, dO, s, _ = inputs(rng, 1, 12, 20, 4, 3, 1.0, False)
    coef = exp_approximation(1.0, eps=1e-4).coef
    out, den = gemm.gemm_attention(q, k, v, s, coef)
    g = gemm.gemm_backward(q, k, v, out, den, dO, s, coef)
    assert [x.shape for x in g] == [(12, 4), (20, 4), (20, 3)]
    g2 = get("gemm").backward(q, k, v, out, den, dO, s, coef)
    assert all(np.array_equal(a, b) for a, b in zip(g, g2))
    # no real key: zero gradients; no query row: dq empty, dk = dv = 0
    none = np.zeros(20, bool)
    o0, d0 = gemm.gemm_attention(q, k, v, s, coef, key_mask=none)
    z = gemm.gemm_backward(q, k, v, o0, d0, dO, s, coef, key_mask=none)
    assert all(x.shape == y.shape and not x.any() for x, y in zip(z, g))
    e = gemm.gemm_backward(q[:0], k, v, out[:0], den[:0], dO[:0], s, coef)
    assert e[0].shape == (0, 4) and not e[1].any() and not e[2].any()
    # Ev = 0: nothing flows back
    o1, d1 = gemm.gemm_attention(q, k, v[:, :0], s, coef)
    z = gemm.gemm_backward(q, k, v[:, :0], o1, d1, dO[:, :0], s, coef)
    assert z[2].shape == (20, 0) and not z[0].any() and not z[1].any()
    # the bound of an empty problem is 0, of a void one inf
    assert gradient_bound(q[:0], k, v, dO[:0], s, coef, 1e-4) == (0.0, 0.0, 0.0)
    assert gradient_bound(q, k, v, dO, s, coef, 1.0) == (np.inf,) * 3
