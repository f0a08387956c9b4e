"""The fast paths of Alman & Song (2025): polynomial method + Toeplitz/FFT.

Given a polynomial ``p(x) = Σ_{k<=g} a_k x^k`` with ``|p(x)/eˣ − 1| <= δ`` on
``[−R, R]`` (see :mod:`numbarope.polynomial`), every attention weight
``exp(s·q_iᵀW_{i−j}k_j + b_{i−j})`` is replaced by ``p(s·q_iᵀW_{i−j}k_j)·T(i−j)``,
``T(t) = exp(b_t)`` (bias is exact). With ``q' = √s q``, ``k' = √s k``:

* **separable** (``W_t = R_{−t}`` after rotating q, k; or ``W_t ≡ I``):
  ``p(q'ᵀk') = φ(q')ᵀψ(k')`` with ``m = C(E+g, g)`` symmetric monomial
  features, and the numerator/denominator ``Σ_j T(i−j) φ(q_i)ᵀψ(k_j)[v_j, 1]``
  is a Toeplitz product done by the cheapest structure that holds:
  ``"gemm"`` (no bias: two GEMMs), ``"prefix"`` (causal: chunked prefix
  sums), ``"fft"`` (any T: circulant embedding, blocked over features);
* **general** (``"toeplitz-fft"``, any ``W_t``): ``(q'ᵀW_t k')^k =
  Σ_{α,β} q'^α M_k(W_t)[α,β] k'^β`` and the sum over j is a block-Toeplitz
  product with ``m_k × m_k`` blocks ``M_k(W_t)·T(t)``, done per frequency.

Never is an ``n × m × Ev`` array formed: feature columns are processed in
blocks sized to ``_config.FFT_BLOCK_BYTES``.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and
Fast Fourier Transform", arXiv:2505.11892 (2025): §4 (polynomial method,
rescaled Toeplitz decomposition), §5 (FFT algorithm).
"""

import numpy as np
import scipy.fft as sfft

from . import _config
from ._monomials import (feature_weights, features, monomial_table,
                         n_features, symmetric_power)
from .toeplitz import circulant_spectrum, fft_length

__all__ = ["SEPARABLE_ALGORITHMS", "fast_memory", "gemm_chunk", "prefix_chunk", "fast_separable", "fast_general",
           "separable_algorithm"]

SEPARABLE_ALGORITHMS = ("gemm", "prefix", "fft")
_U = 2.0 ** -53


def separable_algorithm(has_bias, causal):
    """Toeplitz structure of the separable path: "gemm", "prefix" or "fft"."""
    if has_bias:
        return "fft"
    return "prefix" if causal else "gemm"


def _block_columns(rows, per_column_bytes, total):
    """Columns per block so that a block uses at most FFT_BLOCK_BYTES."""
    return int(max(1, min(total, _config.FFT_BLOCK_BYTES // max(1, rows * per_column_bytes))))


def fast_memory(algorithm, n, E, Ev, degree):
    """Peak working memory (bytes) of one head of the fast path (estimate, upper side).

    Parameters
    ----------
    algorithm : {"gemm", "prefix", "fft", "toeplitz-fft"}
    n, E, Ev, degree : int

    Returns
    -------
    int
        Bytes of float64/complex128 work arrays, not counting inputs/outputs.
    """
    m = n_features(E, degree)
    ev1 = Ev + 1
    # float64 copies of q, k, v (validated, rotated, scaled), [v, 1], numerator, output
    base = 8 * n * (4 * E + 4 * ev1)
    if algorithm in ("gemm", "prefix"):
        c = gemm_chunk(m) if algorithm == "gemm" else prefix_chunk(m)
        c = min(c, max(n, 1))
        inner = 6 * c * c if algorithm == "prefix" else 0      # logits, Horner temporaries
        return base + 8 * (c * m + 2 * m * ev1 + c * ev1 + inner)
    N = fft_length(n)
    F = N // 2 + 1
    if algorithm == "fft":
        # phi(Q), psi(K) in full + one block of (N, mb, Ev+1) real and spectra
        return base + 8 * 2 * n * m + min(_config.FFT_BLOCK_BYTES * 3, 3 * 16 * F * m * ev1)
    # toeplitz-fft: the largest degree's blocks dominate
    mk = n_features(E, degree) - n_features(E, degree - 1) if degree > 0 else 1
    sym = 8 * 2 * (2 * n - 1) * mk * mk               # M_k(W_t) and its predecessor
    uhat = 16 * F * mk * ev1 * 2                       # key-side spectrum + product
    block = min(_config.FFT_BLOCK_BYTES * 3, 3 * 16 * F * mk * mk)
    return base + sym + uhat + block + 8 * 2 * n * m   # + all monomials of q and k


def gemm_chunk(m):
    """Rows per chunk of the gemm path: ~FEATURE_BLOCK_BYTES of features, 64..FEATURE_CHUNK."""
    return int(min(_config.FEATURE_CHUNK, max(64, _config.FEATURE_BLOCK_BYTES // (8 * m))))


def prefix_chunk(m):
    """Rows per chunk of the causal prefix path: CAUSAL_CHUNK, fewer for many features."""
    return int(min(_config.CAUSAL_CHUNK, gemm_chunk(m)))


def _scaled(q, k, v, scale, coef):
    """Shapes, ``q' = √s q``, ``k' = √s k`` and ``[v, 1]`` shared by both fast paths."""
    n, E = q.shape
    Ev = v.shape[1]
    sq = np.sqrt(scale)
    vext = np.empty((n, Ev + 1))
    vext[:, :Ev] = v
    vext[:, Ev] = 1.0
    return (n, E, Ev, len(coef) - 1, np.ascontiguousarray(q * sq),
            np.ascontiguousarray(k * sq), vext)


def _finish(num, Ev):
    den = num[:, Ev]
    out = np.zeros((num.shape[0], Ev))
    ok = den > 0
    out[ok] = num[ok, :Ev] / den[ok, None]
    return out, den


def fast_separable(q, k, v, scale, coef, T=None, causal=False, workers=None):
    """Fast attention of one head with separable logits ``s·q_iᵀk_j``.

    Parameters
    ----------
    q, k : (n, E) ndarray of float64
        Queries and keys, already rotated (RoPE) if any.
    v : (n, Ev) ndarray of float64
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        Monomial coefficients of p ≈ exp on the logit interval.
    T : (2n−1,) ndarray of float64 or None
        ``T[t + n − 1] = exp(b_t − max b) >= 0`` (causal zeros included);
        None means all ones (no bias), with ``causal`` selecting the mask.
    causal : bool
        Only used when T is None.

    Returns
    -------
    out : (n, Ev) ndarray of float64
    den : (n,) ndarray of float64
        The approximate softmax denominators (rows with den <= 0 get out = 0).
    """
    n, E, Ev, g, qs, ks, vext = _scaled(q, k, v, scale, coef)
    wphi, wpsi = feature_weights(coef, E, g)
    m = wphi.size
    num = np.zeros((n, Ev + 1))
    algorithm = separable_algorithm(T is not None, causal)
    if algorithm == "gemm":
        c = gemm_chunk(m)
        S = np.zeros((m, Ev + 1))
        flat = np.empty(m * min(c, n))          # one buffer: no page faults per chunk
        for j0 in range(0, n, c):
            j1 = min(j0 + c, n)
            P = features(ks[j0:j1], E, g, wpsi, flat[:m * (j1 - j0)].reshape(m, j1 - j0))
            S += P @ vext[j0:j1]
        for i0 in range(0, n, c):
            i1 = min(i0 + c, n)
            P = features(qs[i0:i1], E, g, wphi, flat[:m * (i1 - i0)].reshape(m, i1 - i0))
            num[i0:i1] = P.T @ S
    elif algorithm == "prefix":
        c = prefix_chunk(m)
        S = np.zeros((m, Ev + 1))
        pc = coef[::-1]
        flat = np.empty(m * min(c, n))
        for i0 in range(0, n, c):
            i1 = min(i0 + c, n)
            buf = flat[:m * (i1 - i0)].reshape(m, i1 - i0)
            num[i0:i1] = features(qs[i0:i1], E, g, wphi, buf).T @ S
            # inside the chunk: p(q'ᵀk') directly (same polynomial, O(c²E) not O(c²m))
            X = qs[i0:i1] @ ks[i0:i1].T
            Pm = np.tril(np.polyval(pc, X))
            num[i0:i1] += Pm @ vext[i0:i1]
            S += features(ks[i0:i1], E, g, wpsi, buf) @ vext[i0:i1]
    else:
        N = fft_length(n)
        Tspec = circulant_spectrum(T, n, N, workers)
        Pq = features(qs, E, g, wphi).T      # (n, m) views of feature-major arrays
        Pk = features(ks, E, g, wpsi).T
        mb = _block_columns(N, 8 * (Ev + 1) * 3, m)
        for a0 in range(0, m, mb):
            a1 = min(a0 + mb, m)
            U = Pk[:, a0:a1, None] * vext[:, None, :]
            Uh = sfft.rfft(U, n=N, axis=0, workers=workers)
            del U
            Uh *= Tspec[:, None, None]
            Y = sfft.irfft(Uh, n=N, axis=0, workers=workers)[:n]
            del Uh
            num += np.einsum("ia,iae->ie", Pq[:, a0:a1], Y)
    return _finish(num, Ev)


def fast_general(q, k, v, scale, coef, relative, T, workers=None):
    """Fast attention of one head with general relative matrices (block-Toeplitz FFT).

    Parameters
    ----------
    q, k : (n, E) ndarray of float64
    v : (n, Ev) ndarray of float64
    scale : float
    coef : (g+1,) ndarray of float64
    relative : (2n−1, E, E) ndarray of float64
        ``relative[t + n − 1] = W_t``.
    T : (2n−1,) ndarray of float64
        ``exp(b_t − max b)`` with causal zeros; ones when there is no bias.

    Returns
    -------
    out : (n, Ev) ndarray of float64
    den : (n,) ndarray of float64

    Notes
    -----
    ``num_i = Σ_k a_k Σ_α q'_i^α Σ_j Σ_β M_k(W_{i−j})[α,β] T(i−j) k'_j^β [v_j, 1]``:
    for each degree k the key-side sequence ``k'^β ⊗ [v, 1]`` is transformed once,
    the kernel ``M_k(W_t)·T(t)`` in blocks of rows α, multiplied per frequency
    (a small matrix product), transformed back and contracted with ``q'^α``
    (Alman & Song 2025, §5; grouping by monomials gives Σ_k m_k² Toeplitz
    sequences instead of C(E²+g, g)).
    """
    n, E, Ev, g, qs, ks, vext = _scaled(q, k, v, scale, coef)
    N = fft_length(n)
    start, _, _, _ = monomial_table(E, g)
    ones = np.ones(start[-1])
    Qm = features(qs, E, g, ones).T     # unweighted monomials q'^α, (n, m) view
    Km = features(ks, E, g, ones).T
    num = np.zeros((n, Ev + 1))
    for deg in range(g + 1):
        a = coef[deg]
        if a == 0.0:
            continue
        lo, hi = start[deg], start[deg + 1]
        mk = hi - lo
        M = symmetric_power(relative, deg)
        M *= T[:, None, None]
        U = Km[:, lo:hi, None] * vext[:, None, :]
        Uh = sfft.rfft(U, n=N, axis=0, workers=workers)      # (F, mk, Ev+1)
        del U
        mb = _block_columns(N, 16 * mk * 2, mk)
        for a0 in range(0, mk, mb):
            a1 = min(a0 + mb, mk)
            Ch = circulant_spectrum(np.ascontiguousarray(M[:, a0:a1, :]), n, N, workers)
            Yh = np.matmul(Ch, Uh)                            # (F, mb, Ev+1)
            del Ch
            Y = sfft.irfft(Yh, n=N, axis=0, workers=workers)[:n]
            del Yh
            num += a * np.einsum("ia,iae->ie", Qm[:, lo + a0:lo + a1], Y)
        del M, Uh
    return _finish(num, Ev)
