"""numbarope.ops._toeplitz: FFT products with Toeplitz and block-Toeplitz matrices
(circulant embedding), against dense matrices built by loops (tests/naive.py)."""

import numpy as np
import pytest

import naive
from numbarope.ops._toeplitz import circulant_spectrum, fft_length, toeplitz_matmul


@pytest.mark.parametrize("n", [1, 2, 5, 64, 97])
@pytest.mark.parametrize("cols", [None, 3])
def test_toeplitz_matmul_matches_dense(n, cols):
    rng = np.random.default_rng(300 + n)
    c = rng.standard_normal(2 * n - 1)
    u = rng.standard_normal((n,) if cols is None else (n, cols))
    y = toeplitz_matmul(c, u)
    ref = naive.toeplitz_dense(c, n) @ u
    assert y.shape == u.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12 * max(1.0, np.abs(ref).max()))


def test_toeplitz_matmul_nonsymmetric_direction():
    # c(t) = 1 only for t = +1: y[i] = u[i-1] (a shift down), not u[i+1]
    n = 6
    c = np.zeros(2 * n - 1)
    c[n] = 1.0
    u = np.arange(1.0, n + 1)
    np.testing.assert_allclose(toeplitz_matmul(c, u), [0, 1, 2, 3, 4, 5], atol=1e-13)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_circulant_spectrum_block_sequences(n):
    rng = np.random.default_rng(400 + n)
    c = rng.standard_normal((2 * n - 1, 2, 3))        # block-Toeplitz kernel
    u = rng.standard_normal((n, 3, 4))
    N = fft_length(n)
    assert N >= 2 * n - 1
    Ch = circulant_spectrum(c, n, N)
    Uh = np.fft.rfft(u, n=N, axis=0)
    y = np.fft.irfft(np.matmul(Ch, Uh), n=N, axis=0)[:n]
    ref = np.einsum("ijab,jbc->iac", naive.toeplitz_dense(c, n), u)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)
