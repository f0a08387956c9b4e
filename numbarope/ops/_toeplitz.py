"""Toeplitz and block-Toeplitz products through the FFT.

A (block-)Toeplitz matrix ``T[i, j] = c(i − j)`` of order n is stored as its
generating sequence ``c[t + n − 1] = c(t)``, ``t = −(n−1) .. n−1`` (the storage
of ``relative`` and ``bias`` in :func:`numbarope.rope_attention`). It is
embedded in a circulant of length ``N = scipy.fft.next_fast_len(2n − 1, real=True)``
whose first column is ``c(t mod N)``; then ``y = T u`` is the first n entries of
the circular convolution ``irfft(rfft(c_circ) · rfft(u, N))`` (Golub & Van Loan,
Matrix Computations, 4th ed., §4.8.2; scipy.linalg.matmul_toeplitz does the same
for a single Toeplitz matrix).
"""

import numpy as np
import scipy.fft as sfft

__all__ = ["fft_length", "circulant_spectrum", "toeplitz_matmul", "toeplitz_visibility"]


def fft_length(n, S=None):
    """Circulant length of an n × S Toeplitz product (S = n if None):
    ``next_fast_len(n + S − 1)``."""
    S = n if S is None else S
    return sfft.next_fast_len(max(n + S - 1, 1), real=True)


def circulant_spectrum(c, n, N, workers=None, S=None):
    """rfft of the circulant embedding of a generating sequence.

    Parameters
    ----------
    c : (n+S−1, ...) ndarray of float64
        ``c[d + S − 1] = c(d)`` for ``d = i − j``, ``−(S−1) <= d <= n−1``
        (square, S = n: ``c[t + n − 1] = c(t)``); trailing axes are carried along.
    n, N : int
        Rows of the Toeplitz matrix and circulant length (N >= n + S − 1).
    S : int, optional
        Columns (default n).

    Returns
    -------
    (N//2 + 1, ...) ndarray of complex128
        The product ``y = T u`` (u of S rows) is the first n rows of
        ``irfft(spectrum · rfft(u, N))``.
    """
    S = n if S is None else S
    circ = np.zeros((N,) + c.shape[1:], dtype=np.float64)
    circ[:n] = c[S - 1:]
    if S > 1:
        circ[N - (S - 1):] = c[:S - 1]
    return sfft.rfft(circ, axis=0, workers=workers)


def toeplitz_matmul(c, u, workers=None):
    """Product ``y[i] = Σ_j c(i − j) u[j]`` of a Toeplitz matrix with u.

    Parameters
    ----------
    c : (2n−1,) ndarray of float64
        Generating sequence, ``c[t + n − 1] = c(t)``.
    u : (n, ...) ndarray of float64
        Right-hand side; the product acts along axis 0.
    workers : int, optional
        Passed to ``scipy.fft`` (None: its default; negative: counts from
        ``os.cpu_count()``).

    Returns
    -------
    y : (n, ...) ndarray of float64

    Notes
    -----
    O(N log N) per column, N = ``fft_length(n)``. The result carries an
    absolute rounding error of order ``u·log2(N)·‖c‖₂‖u‖₂`` (unit roundoff u),
    not a relative one per entry.
    """
    n = u.shape[0]
    N = fft_length(n)
    spec = circulant_spectrum(c, n, N, workers)
    spec = spec.reshape(spec.shape + (1,) * (u.ndim - 1))
    U = sfft.rfft(u, n=N, axis=0, workers=workers)
    U *= spec
    return sfft.irfft(U, n=N, axis=0, workers=workers)[:n]


def toeplitz_visibility(T, L, S, keep):
    """``(rows, keys)``: (L,) bool, row i sees a real key j with ``T[i − j + S − 1] >
    0``; (S,) bool, real key j is seen by some row. Exact counts (integers: cumulative
    sums, or a rounded FFT convolution of 0/1 sequences, as the pipeline's
    ``_sees_keys``)."""
    pos = (np.asarray(T) > 0).astype(np.int64)
    cs = np.concatenate([[0], np.cumsum(pos)])
    j = np.arange(S)
    keys = (cs[S - 1 - j + L] - cs[S - 1 - j]) > 0           # T[S−1−j .. S−1−j+L−1]
    if keep is None:
        i = np.arange(L)
        return (cs[i + S] - cs[i]) > 0, keys
    from scipy.signal import fftconvolve
    cnt = np.rint(fftconvolve(pos.astype(np.float64), keep.astype(np.float64)))
    return cnt[S - 1:S - 1 + L] > 0, keys & keep
