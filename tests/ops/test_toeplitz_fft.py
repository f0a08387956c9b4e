"""The general-W_t algorithm, numbarope.ops.toeplitz_fft: the block-Toeplitz FFT
against the dense polynomial-weighted attention it computes, its class (structures,
reasons, features, cost, memory, rounding, run) and its registry entry."""

import numpy as np
import pytest

from numbarope import bias as nb
from numbarope.ops import toeplitz_fft as tf
from numbarope.ops._bounds import rounding_term
from numbarope.ops._features import n_features
from numbarope.ops._toeplitz import fft_length
from numbarope.ops.registry import HeadSpec


def poly_reference(q, k, v, scale, coef, W, T, real=None):
    """Dense loops: weights p(s·q_iᵀW_{i−j}k_j)·T(i−j) on the real keys; (out, den)."""
    L, S = len(q), len(k)
    out = np.zeros((L, v.shape[1]))
    den = np.zeros(L)
    for i in range(L):
        num = np.zeros(v.shape[1])
        for j in range(S):
            if real is not None and not real[j]:
                continue
            x = scale * q[i] @ W[i - j + S - 1] @ k[j]
            w = np.polyval(coef[::-1], x) * T[i - j + S - 1]
            num += w * v[j]
            den[i] += w
        if den[i] > 0:
            out[i] = num / den[i]
    return out, den


def inputs(rng, L, S, E, Ev=3, g=4):
    q = rng.standard_normal((L, E)) * 0.5
    k = rng.standard_normal((S, E)) * 0.5
    v = rng.standard_normal((S, Ev))
    W = rng.standard_normal((L + S - 1, E, E))
    W /= np.linalg.norm(W, ord=2, axis=(1, 2)).max()
    coef = 1.0 / np.cumprod(np.concatenate([[1.0], np.arange(1.0, g + 1)]))   # Taylor
    return q, k, v, W, coef


@pytest.mark.parametrize("L, S, E, offset", [(30, 30, 2, 0), (25, 40, 3, 15),
                                             (40, 25, 2, -5), (1, 33, 2, 32)])
@pytest.mark.parametrize("T_kind", ["ones", "causal", "decay"])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_general_against_dense(L, S, E, offset, T_kind, masked):
    rng = np.random.default_rng(L * 100 + S)
    q, k, v, W, coef = inputs(rng, L, S, E)
    t = np.arange(L + S - 1) - (S - 1) + offset
    T = np.ones(L + S - 1)
    if T_kind == "causal":
        T = np.where(t >= 0, 1.0, 0.0)
    elif T_kind == "decay":
        T = np.exp(-0.1 * np.abs(t))
    real = None
    if masked:
        real = rng.random(S) < 0.7
        real[0] = True
    out, den = tf.fast_general(q, k, v, 0.6, coef, W, T, key_mask=real)
    ro, rd = poly_reference(q, k, v, 0.6, coef, W, T, real)
    np.testing.assert_allclose(den, rd, rtol=1e-10, atol=1e-12)
    ok = rd > 1e-8
    np.testing.assert_allclose(out[ok], ro[ok], rtol=0, atol=1e-10)


def test_fast_general_empty_and_degree_zero_terms():
    rng = np.random.default_rng(1)
    q, k, v, W, coef = inputs(rng, 10, 10, 2)
    out, den = tf.fast_general(q[:0], k, v, 1.0, coef, W, np.ones(19))
    assert out.shape == (0, 3) and den.shape == (0,)
    out, den = tf.fast_general(q, k[:0], v[:0], 1.0, coef, W, np.ones(9))
    assert out.shape == (10, 3) and np.all(den == 0)
    c = coef.copy()
    c[1] = 0.0                                   # a zero coefficient is skipped
    o1, d1 = tf.fast_general(q, k, v, 0.5, c, W, np.ones(19))
    ro, rd = poly_reference(q, k, v, 0.5, c, W, np.ones(19))
    np.testing.assert_allclose(o1, ro, atol=1e-10)


@pytest.mark.parametrize("workers", [1, 2, -1])
def test_workers_do_not_change_results(workers):
    # the kernel-level twin of tests/test_fast.py::test_workers_do_not_change_results
    rng = np.random.default_rng(77)
    n = 600
    q, k = rng.standard_normal((n, 3)) * 0.3, rng.standard_normal((n, 3)) * 0.3
    v = rng.standard_normal((n, 2))
    coef = 1.0 / np.cumprod(np.concatenate([[1.0], np.arange(1.0, 6)]))
    W = np.broadcast_to(np.eye(3), (2 * n - 1, 3, 3))
    ref = tf.fast_general(q, k, v, 0.5, coef, W, np.ones(2 * n - 1), workers=1)
    out, den = tf.fast_general(q, k, v, 0.5, coef, W, np.ones(2 * n - 1), workers=workers)
    np.testing.assert_allclose(out, ref[0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(den, ref[1], rtol=1e-13)


# ---------------------------------------------------------------- the class

def test_registered_with_its_declarations():
    import numbarope.ops as ops
    alg = ops.get("toeplitz-fft")
    assert isinstance(alg, tf.ToeplitzFFT)
    assert alg in ops.fast_algorithms()
    assert alg.general is True and alg.bound_kind == "estimated"
    assert alg.structures == (nb.RelativeBias,)


def _head(**kw):
    base = dict(head=(), n=40, S=40, E=2, Ev=3, radius=1.0, radius1=1.0, vmax=1.0,
                general=True, structure=nb.Causal())
    base.update(kw)
    return HeadSpec(**base)


def test_unavailable_reasons():
    alg = tf.ToeplitzFFT()

    class Chunked(nb.Structure):
        kind = "chunked"

    assert alg.unavailable(_head()) == []
    for s in (nb.NoBias(), nb.Window(3, 0), nb.Decay(0.1), nb.Dense(np.zeros(79))):
        assert alg.unavailable(_head(structure=s)) == []
    codes = [r.code for r in alg.unavailable(_head(general=False))]
    assert codes == ["structure"]                     # separable heads: not this one
    codes = [r.code for r in alg.unavailable(_head(structure=Chunked()))]
    assert codes == ["structure"]                     # not a relative bias
    codes = [r.code for r in alg.unavailable(_head(row_mass=0.0))]
    assert codes == ["row-mass"]


def test_features_cost_memory_rounding():
    alg = tf.ToeplitzFFT()
    assert tf.general_features(2, 1) == 1 + 4
    assert tf.general_features(3, 2) == 1 + 9 + 36
    assert alg.features(3, 2) == tf.general_features(3, 2)
    h = _head(n=500, S=700, E=3, Ev=4)
    assert 0 < alg.predict(h, 2) < alg.predict(h, 4)
    assert alg.predict(_head(n=1000, S=1000, E=3), 3) > alg.predict(_head(n=100, S=100, E=3), 3)
    assert alg.memory(h, 3) == tf.toeplitz_fft_memory(500, 3, 4, 3, 700, 1)
    assert 0 < alg.memory(h, 2) < alg.memory(h, 4)
    coef = np.array([1.0, 1.0, 0.5, 1 / 6])
    h = _head(n=500, S=700, E=3, radius=1.0, radius1=1.5, row_mass=0.25)
    rho = alg.rounding(h, coef, 1e-4)
    assert rho == rounding_term(700, n_features(3, 3), coef, 1.0, 1.5, 1e-4,
                                fft_length(500, 700), 0.25)
    assert rho > rounding_term(700, n_features(3, 3), coef, 1.0, 1.5, 1e-4)


def test_run():
    alg = tf.ToeplitzFFT()
    rng = np.random.default_rng(3)
    q, k, v, W, coef = inputs(rng, 20, 30, 2)
    T = np.exp(-0.05 * np.abs(np.arange(49) - 29))
    real = np.ones(30, bool)
    real[:4] = False
    out, den = alg.run(q, k, v, 0.5, coef, structure=nb.Dense(np.log(T)), T=T,
                       key_mask=real, relative=W)
    ro, rd = tf.fast_general(q, k, v, 0.5, coef, W, T, key_mask=real)
    np.testing.assert_array_equal(out, ro)
    np.testing.assert_array_equal(den, rd)
    o1, _ = alg.run(q, k, v, 0.5, coef, structure=nb.NoBias(), relative=W)   # T = ones
    np.testing.assert_array_equal(o1, tf.fast_general(q, k, v, 0.5, coef, W,
                                                      np.ones(49))[0])
    og, dg = alg.run(np.stack([q, 2 * q]), k, v, 0.5, coef, structure=nb.NoBias(),
                     relative=W)                                   # G query heads
    assert og.shape == (2, 20, 3) and dg.shape == (2, 20)
    np.testing.assert_array_equal(og[0], o1)
    np.testing.assert_array_equal(og[1], tf.fast_general(2 * q, k, v, 0.5, coef, W,
                                                         np.ones(49))[0])
    with pytest.raises(ValueError, match="key-side state"):
        alg.run(q, k, v, 0.5, coef, structure=nb.NoBias(), relative=W, return_state=True)
    with pytest.raises(ValueError, match="key-side state"):
        alg.run(q, k, v, 0.5, coef, structure=nb.NoBias(), relative=W,
                initial_state=(np.zeros((3, 3)), np.zeros(3)))
    with pytest.raises(ValueError, match="relative"):
        alg.run(q, k, v, 0.5, coef, structure=nb.NoBias())


def test_example_is_a_general_head():
    q, k, v, kw = tf.ToeplitzFFT().example(np.random.default_rng(7))
    n, E = q.shape
    assert kw["relative"].shape == (2 * n - 1, E, E)
    assert np.linalg.norm(kw["relative"], ord=2, axis=(1, 2)).max() <= 1 + 1e-12
    assert kw["is_causal"] is True
