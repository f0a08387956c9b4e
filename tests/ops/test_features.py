"""numbarope.ops._features: the table of symmetric monomials, the weighted feature maps
φ, ψ with φ(q)ᵀψ(k) = p(qᵀk), symmetric powers of matrices (the features of
q W_t k), and their thread partition."""

import itertools
import math

import numpy as np
import pytest

from numbarope.ops._features import (feature_weights, features, monomial_table, n_features,
                                     symmetric_power)


def _sequences(E, g):
    """Index sequences a_1 <= ... <= a_k of the table, rebuilt from parent/var."""
    start, parent, var, _ = monomial_table(E, g)
    seqs = [()]
    for idx in range(1, parent.size):
        assert parent[idx] < idx
        seqs.append(seqs[parent[idx]] + (int(var[idx]),))
    return seqs


@pytest.mark.parametrize("E, g", [(1, 0), (1, 5), (2, 3), (3, 4), (5, 2), (8, 3), (16, 2),
                                  (4, 7)])
def test_monomial_table_counts_and_order(E, g):
    start, parent, var, multi = monomial_table(E, g)
    assert start[0] == 0 and start.shape == (g + 2,)
    assert start[-1] == math.comb(E + g, g) == n_features(E, g)
    for k in range(g + 1):
        assert start[k + 1] - start[k] == math.comb(E + k - 1, k)
    seqs = _sequences(E, g)
    # each degree block lists every multiset of size k exactly once, sorted
    for k in range(g + 1):
        block = seqs[start[k]:start[k + 1]]
        assert all(len(s) == k and list(s) == sorted(s) for s in block)
        assert sorted(block) == list(itertools.combinations_with_replacement(range(E), k))
    # multinomial coefficients |α|!/α!
    for s, mu in zip(seqs, multi):
        counts = np.bincount(np.array(s, dtype=np.int64), minlength=E)
        expected = math.factorial(len(s)) / np.prod([math.factorial(c) for c in counts])
        assert mu == expected, (s, mu, expected)


def test_monomial_table_is_read_only():
    start, parent, var, multi = monomial_table(3, 3)
    with pytest.raises(ValueError):
        multi[0] = 2.0


@pytest.mark.parametrize("E, g", [(1, 1), (2, 4), (3, 3), (4, 5), (8, 3)])
def test_unweighted_features_are_monomials(E, g):
    rng = np.random.default_rng(10 * E + g)
    x = rng.standard_normal((7, E))
    F = features(x, E, g, np.ones(n_features(E, g))).T
    for idx, s in enumerate(_sequences(E, g)):
        np.testing.assert_allclose(F[:, idx], np.prod(x[:, list(s)], axis=1), rtol=1e-13)


@pytest.mark.parametrize("E, g", [(1, 0), (1, 6), (2, 5), (3, 4), (5, 3), (16, 2)])
def test_features_give_polynomial_of_inner_product(E, g):
    rng = np.random.default_rng(100 + E * g)
    coef = rng.standard_normal(g + 1)        # mixed signs
    if g >= 2:
        coef[1] = 0.0                         # a zero coefficient
    q = rng.standard_normal((13, E)) * 0.7
    k = rng.standard_normal((11, E)) * 0.7
    wphi, wpsi = feature_weights(coef, E, g)
    assert np.all(wphi >= 0)
    phi = features(np.ascontiguousarray(q), E, g, wphi).T
    psi = features(np.ascontiguousarray(k), E, g, wpsi).T
    assert phi.shape == (13, n_features(E, g))
    lhs = phi @ psi.T
    rhs = np.polyval(coef[::-1], q @ k.T)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-11, atol=1e-11 * np.abs(rhs).max())


def test_features_out_buffer_and_empty():
    x = np.random.default_rng(3).standard_normal((4, 3))
    w = np.ones(n_features(3, 2))
    buf = np.full((w.size, 4), np.nan)
    res = features(x, 3, 2, w, out=buf)
    assert res is buf and np.isfinite(buf).all()
    assert features(np.zeros((0, 3)), 3, 2, w).shape == (w.size, 0)


@pytest.mark.parametrize("E, k", [(1, 0), (1, 3), (2, 1), (2, 4), (3, 2), (3, 3), (5, 2),
                                  (4, 4)])
def test_symmetric_power_bilinear_identity(E, k):
    rng = np.random.default_rng(200 + 10 * E + k)
    T = 5
    W = rng.standard_normal((T, E, E))
    M = symmetric_power(W, k)
    mk = math.comb(E + k - 1, k)
    assert M.shape == (T, mk, mk)
    start = monomial_table(E, k)[0]
    ones = np.ones(n_features(E, k))
    q = rng.standard_normal((6, E))
    kk = rng.standard_normal((6, E))
    mq = features(q, E, k, ones).T[:, start[k]:start[k + 1]]
    mkk = features(kk, E, k, ones).T[:, start[k]:start[k + 1]]
    for t in range(T):
        lhs = np.einsum("ia,ab,ib->i", mq, M[t], mkk)
        rhs = np.einsum("ie,ef,if->i", q, W[t], kk) ** k
        np.testing.assert_allclose(lhs, rhs, rtol=1e-11, atol=1e-12 * max(1, np.abs(rhs).max()))


def test_symmetric_power_special_matrices():
    E, k = 3, 3
    # identity: M_k(I) = diag(k!/α!) in the monomial basis  ((qᵀk)^k = Σ (k!/α!) q^α k^α)
    M = symmetric_power(np.eye(E)[None], k)[0]
    start, _, _, multi = monomial_table(E, k)
    np.testing.assert_allclose(M, np.diag(multi[start[k]:start[k + 1]]), atol=1e-14)
    # multiplicative: M_k(AB) = M_k(A) · D⁻¹ · M_k(B) with D = diag(k!/α!)
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((2, E, E))
    MA, MB, MAB = symmetric_power(np.stack([A, B, A @ B]), k)
    D = multi[start[k]:start[k + 1]]
    np.testing.assert_allclose(MA @ np.diag(1 / D) @ MB, MAB, rtol=1e-10, atol=1e-10)


def test_features_and_symmetric_power_workers():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1000, 4))
    w = rng.uniform(0.5, 2, n_features(4, 3))
    one = features(x, 4, 3, w, workers=1)
    np.testing.assert_array_equal(features(x, 4, 3, w, workers=2), one)
    np.testing.assert_array_equal(features(x, 4, 3, w, workers=-1), one)
    W = rng.standard_normal((301, 3, 3))
    np.testing.assert_array_equal(symmetric_power(W, 3, workers=2),
                                  symmetric_power(W, 3, workers=1))
    with pytest.raises(ValueError, match="workers=0"):
        features(x, 4, 3, w, workers=0)
