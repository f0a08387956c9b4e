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
from numba import njit

from . import _config
from ._monomials import (_features_reduce, feature_recurrence, feature_weights, features,
                         monomial_table, n_features, symmetric_power)
from ._threads import blas_threads, resolve_workers, run_tasks
from .toeplitz import circulant_spectrum, fft_length

__all__ = ["SEPARABLE_ALGORITHMS", "fast_memory", "gemm_chunk", "prefix_chunk", "fast_separable",
           "fast_general", "separable_algorithm"]

SEPARABLE_ALGORITHMS = ("gemm", "prefix", "fft")
_U = 2.0 ** -53
_FM = set(_config.FASTMATH)


def separable_algorithm(has_bias, causal):
    """Toeplitz structure of the separable path: "gemm", "prefix" or "fft"."""
    if has_bias:
        return "fft"
    return "prefix" if causal else "gemm"


def _block_columns(rows, per_column_bytes, total):
    """Columns per block so that a block uses at most FFT_BLOCK_BYTES."""
    return int(max(1, min(total, _config.FFT_BLOCK_BYTES // max(1, rows * per_column_bytes))))


def gemm_chunk(m):
    """Rows per feature block: ~FEATURE_BLOCK_BYTES of features (kept in L2 between the
    feature recurrence and its GEMM), between 8 and FEATURE_CHUNK rows."""
    c = _config.FEATURE_BLOCK_BYTES // (8 * m)
    return int(min(_config.FEATURE_CHUNK, max(8, c - c % 8)))      # whole SIMD vectors


def prefix_chunk(m):
    """Rows per chunk of the causal prefix path (CAUSAL_CHUNK): the intra-chunk
    polynomial is formed on chunks, one key-side state is kept per chunk."""
    return int(max(1, _config.CAUSAL_CHUNK))


def _state_tasks(m, ev1, units):
    """Number of tasks with a private m x (Ev+1) state over ``units`` chunks: at most
    MAX_TASKS, and their states within STATE_BYTES. Depends on the sizes only (not
    on ``workers``), so results do not depend on the number of threads."""
    per = 8 * m * ev1
    return int(max(1, min(units, _config.MAX_TASKS, _config.STATE_BYTES // per)))


def _causal_group(m, ev1, nchunks):
    """Chunks whose key-side states are stored at once (bounded by STATE_BYTES)."""
    return int(max(1, min(nchunks, _config.STATE_BYTES // (8 * m * ev1))))


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
    # float64 copies of q, k, v (validated, rotated, scaled, transposed), [v, 1], numerator,
    # output
    base = 8 * n * (5 * E + 4 * ev1)
    if algorithm in ("gemm", "prefix"):
        nw = resolve_workers(None)
        cf = min(gemm_chunk(m), max(n, 1))
        per_thread = 8 * (m * cf + 2 * m * ev1)        # feature block, product, running S
        if algorithm == "gemm":
            states = _state_tasks(m, ev1, -(-n // cf)) * m * ev1
        else:
            c = min(prefix_chunk(m), max(n, 1))
            nch = -(-n // c)
            states = (_causal_group(m, ev1, nch) + 2 * _state_tasks(m, ev1, nch)) * m * ev1
            per_thread += 8 * (2 * c * c + 2 * c * ev1)  # intra-chunk weights and products
        return base + 8 * states + nw * per_thread
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


# ------------------------------------------------------------------ serial kernels
# Each runs on one Python thread with the GIL released (nogil) and owns its outputs:
# a private state, or its own rows of the numerator. GEMMs are numba's np.dot (scipy's
# BLAS) with one BLAS thread (the caller sets blas_threads(1) around the parallel
# section). The state is kept as S = Σ ψ(k)vᵀ (m x Ev) and s = Σ ψ(k) (m,): the
# column of ones of [v, 1] is a row sum done next to the features, because BLAS runs
# (m x w) @ (w x Ev) near full speed for Ev a multiple of 8, and ~40% slower at Ev + 1.

@njit(cache=True, nogil=True, fastmath=_FM)
def _key_state(kt, v, r0, r1, cf, parent, var, ratio, w0, post, weight, buf, S, s):
    # S += Σ_{r0 <= r < r1} ψ(k_r) v_rᵀ, s += Σ ψ(k_r); features in blocks of cf rows
    # (in L2 between the recurrence and the product).
    m = parent.shape[0]
    for j0 in range(r0, r1, cf):
        j1 = min(j0 + cf, r1)
        w = j1 - j0
        P = buf[:m * w].reshape((m, w))
        _features_reduce(kt, j0, j1, parent, var, ratio, w0, post, weight, P, 1, s, s)
        if v.shape[1]:
            S += np.dot(P, v[j0:j1])


@njit(cache=True, nogil=True, fastmath=_FM)
def _query_rows(qt, S, s, r0, r1, cf, parent, var, ratio, w0, post, weight, buf, num, den):
    # num[r] = φ(q_r)ᵀ S, den[r] = φ(q_r)ᵀ s for r0 <= r < r1, in blocks of cf rows.
    m = parent.shape[0]
    for i0 in range(r0, r1, cf):
        i1 = min(i0 + cf, r1)
        w = i1 - i0
        P = buf[:m * w].reshape((m, w))
        d = den[i0:i1]
        d[:] = 0.0
        _features_reduce(qt, i0, i1, parent, var, ratio, w0, post, weight, P, 2, s, d)
        if S.shape[1]:
            num[i0:i1] = np.dot(P.T, S)


@njit(cache=True, nogil=True, fastmath=_FM)
def _gemm_keys(kt, v, r0, r1, cf, parent, var, ratio, w0, post, weight, S, s):
    buf = np.empty(parent.shape[0] * max(1, min(cf, r1 - r0)))
    _key_state(kt, v, r0, r1, cf, parent, var, ratio, w0, post, weight, buf, S, s)


@njit(cache=True, nogil=True, fastmath=_FM)
def _gemm_queries(qt, S, s, r0, r1, cf, parent, var, ratio, w0, post, weight, num, den):
    buf = np.empty(parent.shape[0] * max(1, min(cf, r1 - r0)))
    _query_rows(qt, S, s, r0, r1, cf, parent, var, ratio, w0, post, weight, buf, num, den)


@njit(cache=True, nogil=True, fastmath=_FM)
def _chunk_states(kt, v, j0, j1, base, c, cf, parent, var, ratio, w0, post, weight,
                  states, sums, total, tsum):
    # states[j − base], sums[j − base] = Σ_{r in chunk j} ψ(k_r) v_rᵀ, Σ ψ(k_r), for
    # chunks j0 <= j < j1; total, tsum += their sum (in chunk order).
    n = v.shape[0]
    buf = np.empty(parent.shape[0] * max(1, min(cf, c)))
    for j in range(j0, j1):
        st = states[j - base]
        sm = sums[j - base]
        st[:, :] = 0.0
        sm[:] = 0.0
        _key_state(kt, v, j * c, min(j * c + c, n), cf, parent, var, ratio, w0, post,
                   weight, buf, st, sm)
        total += st
        tsum += sm


@njit(cache=True, nogil=True, fastmath=_FM)
def _chunk_queries(qs, ks, qt, v, pc, j0, j1, base, c, cf, parent, var, ratio, w0, post,
                   weight, states, sums, S, s, num, den):
    # For chunks j0 <= j < j1 in order, (S, s) = sum of the states of all earlier chunks
    # on entry:  num[C] = φ(Q_C) S + tril(p(Q_C K_Cᵀ)) V_C  (den alike, with s and 1);
    # then S += states[j − base]. p by Horner on the logits (the same polynomial,
    # O(c²E) instead of O(c²m) work); mask: key <= query, diagonal included.
    n = v.shape[0]
    g = pc.shape[0] - 1
    buf = np.empty(parent.shape[0] * max(1, min(cf, c)))
    for j in range(j0, j1):
        i0 = j * c
        i1 = min(i0 + c, n)
        w = i1 - i0
        _query_rows(qt, S, s, i0, i1, cf, parent, var, ratio, w0, post, weight, buf, num, den)
        X = np.dot(qs[i0:i1], ks[i0:i1].T)
        for r in range(w):
            row = X[r]
            acc = 0.0
            for t in range(r + 1):
                x = row[t]
                p = pc[0]
                for d in range(1, g + 1):
                    p = p * x + pc[d]
                row[t] = p
                acc += p
            for t in range(r + 1, w):
                row[t] = 0.0
            den[i0 + r] += acc
        if v.shape[1]:
            num[i0:i1] += np.dot(X, v[i0:i1])
        S += states[j - base]
        s += sums[j - base]


def _ranges(lo, hi, k):
    """``k`` contiguous, balanced ranges covering lo .. hi."""
    b = np.linspace(lo, hi, k + 1).round().astype(np.int64)
    return [(int(x), int(y)) for x, y in zip(b[:-1], b[1:]) if y > x]


def _gemm(qs, ks, v, wphi, wpsi, parent, var, nw):
    """Non-causal, no bias: S = Σ_j ψ(k_j)[v_j, 1]ᵀ, then num = φ(Q) S."""
    n, Ev = v.shape
    m = parent.shape[0]
    cf = gemm_chunk(m)
    qt = np.ascontiguousarray(qs.T)
    kt = np.ascontiguousarray(ks.T)
    rk, w0k, postk = feature_recurrence(wpsi, parent)
    rq, w0q, postq = feature_recurrence(wphi, parent)
    # a partition that depends on the sizes only: the sum of the private states in
    # task order is the same for any number of threads
    tasks = _ranges(0, n, _state_tasks(m, Ev + 1, -(-n // cf)))
    S_t = np.zeros((len(tasks), m, Ev))
    s_t = np.zeros((len(tasks), m))
    num = np.empty((n, Ev))
    den = np.empty(n)
    with blas_threads(1):
        run_tasks(lambda i: _gemm_keys(kt, v, tasks[i][0], tasks[i][1], cf, parent, var,
                                       rk, w0k, postk, wpsi, S_t[i], s_t[i]),
                  range(len(tasks)), nw)
        S, s = S_t[0], s_t[0]
        for i in range(1, len(tasks)):
            S += S_t[i]
            s += s_t[i]
        rows = _ranges(0, n, min(-(-n // cf), 4 * nw))      # any partition: rows are independent
        run_tasks(lambda t: _gemm_queries(qt, S, s, t[0], t[1], cf, parent, var, rq, w0q,
                                          postq, wphi, num, den), rows, nw)
    return num, den


def _prefix(qs, ks, v, coef, wphi, wpsi, parent, var, nw):
    """Causal, no bias: chunked prefix sums of the key-side states.

    Three phases per group of chunks (their states bounded by STATE_BYTES): (1) every
    chunk's key-side state ψ(K_C)ᵀ[V_C, 1] and each task's total, in parallel;
    (2) an exclusive prefix sum over the tasks' totals, serial; (3) every task walks
    its chunks in order, query side φ(Q_C) S + masked intra-chunk polynomial, then
    S += state, in parallel.

    Accuracy: each weight sum is still Σ_j p(q'_iᵀk'_j)[v_j, 1] with p formed in
    float64 from the same features (or by Horner inside a chunk), and each numerator
    entry is a sum of the same n·m + ... products; only the order of the additions
    differs from a running sum (a tree of partial sums: chunk states, task totals,
    prefix). The rounding bound γ_{n+m+2g+2}·Σ|φ_αψ_α| of planner.rounding_term counts
    the terms of the sum, not its order (Higham 2002, §4.2: any summation order of
    k terms is within γ_{k−1}), so it stays valid.
    """
    n, Ev = v.shape
    m = parent.shape[0]
    c = prefix_chunk(m)
    cf = min(gemm_chunk(m), c)
    nch = -(-n // c)
    G = _causal_group(m, Ev + 1, nch)
    qt = np.ascontiguousarray(qs.T)
    kt = np.ascontiguousarray(ks.T)
    rk, w0k, postk = feature_recurrence(wpsi, parent)
    rq, w0q, postq = feature_recurrence(wphi, parent)
    pc = np.ascontiguousarray(coef[::-1], dtype=np.float64)      # Horner order
    num = np.empty((n, Ev))
    den = np.empty(n)
    S = np.zeros((m, Ev))                                         # all earlier groups
    s = np.zeros(m)
    states = np.empty((min(G, nch), m, Ev))
    sums = np.empty((min(G, nch), m))
    with blas_threads(1):
        for g0 in range(0, nch, G):
            g1 = min(g0 + G, nch)
            tasks = _ranges(g0, g1, _state_tasks(m, Ev + 1, g1 - g0))
            S_t = np.zeros((len(tasks), m, Ev))
            s_t = np.zeros((len(tasks), m))
            run_tasks(lambda i: _chunk_states(kt, v, tasks[i][0], tasks[i][1], g0, c, cf,
                                              parent, var, rk, w0k, postk, wpsi, states, sums,
                                              S_t[i], s_t[i]),
                      range(len(tasks)), nw)
            for i in range(len(tasks)):                           # exclusive prefix, in place
                tot, tsum = S_t[i].copy(), s_t[i].copy()
                S_t[i], s_t[i] = S, s
                S += tot
                s += tsum
            run_tasks(lambda i: _chunk_queries(qs, ks, qt, v, pc, tasks[i][0], tasks[i][1],
                                               g0, c, cf, parent, var, rq, w0q, postq, wphi,
                                               states, sums, S_t[i], s_t[i], num, den),
                      range(len(tasks)), nw)
    return num, den


def _scaled(q, k, v, scale, coef):
    """Shapes, ``q' = √s q``, ``k' = √s k`` and v (float64, contiguous) of both fast paths."""
    n, E = q.shape
    Ev = v.shape[1]
    sq = np.sqrt(scale)
    return (n, E, Ev, len(coef) - 1, np.ascontiguousarray(q * sq),
            np.ascontiguousarray(k * sq), np.ascontiguousarray(v, dtype=np.float64))


def _extended(v):
    """``[v, 1]``: the column of ones gives the softmax denominators."""
    vext = np.empty((v.shape[0], v.shape[1] + 1))
    vext[:, :-1] = v
    vext[:, -1] = 1.0
    return vext


def _finish(num, Ev, den=None):
    if den is None:
        den = num[:, Ev]
    ok = den > 0
    if ok.all():
        return np.divide(num[:, :Ev], den[:, None]), den
    out = np.zeros((num.shape[0], Ev))
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
    workers : int, optional
        Threads for the feature kernels, the chunk GEMMs and scipy.fft
        (scipy.fft's meaning; None: :func:`numbarope.get_workers`). The result
        does not depend on it.

    Returns
    -------
    out : (n, Ev) ndarray of float64
    den : (n,) ndarray of float64
        The approximate softmax denominators (rows with den <= 0 get out = 0).
    """
    n, E, Ev, g, qs, ks, v64 = _scaled(q, k, v, scale, coef)
    nw = resolve_workers(workers)
    wphi, wpsi = feature_weights(coef, E, g)
    _, parent, var, _ = monomial_table(E, g)
    algorithm = separable_algorithm(T is not None, causal)
    if n == 0:
        return _finish(np.zeros((0, Ev)), Ev, np.zeros(0))
    if algorithm == "gemm":
        num, den = _gemm(qs, ks, v64, wphi, wpsi, parent, var, nw)
        return _finish(num, Ev, den)
    if algorithm == "prefix":
        num, den = _prefix(qs, ks, v64, np.asarray(coef, np.float64), wphi, wpsi, parent,
                           var, nw)
        return _finish(num, Ev, den)
    vext = _extended(v64)
    m = wphi.size
    num = np.zeros((n, Ev + 1))
    N = fft_length(n)
    Tspec = circulant_spectrum(T, n, N, nw)
    Pq = features(qs, E, g, wphi, workers=nw).T      # (n, m) views of feature-major arrays
    Pk = features(ks, E, g, wpsi, workers=nw).T
    mb = _block_columns(N, 8 * (Ev + 1) * 3, m)
    for a0 in range(0, m, mb):
        a1 = min(a0 + mb, m)
        U = Pk[:, a0:a1, None] * vext[:, None, :]
        Uh = sfft.rfft(U, n=N, axis=0, workers=nw)
        del U
        Uh *= Tspec[:, None, None]
        Y = sfft.irfft(Uh, n=N, axis=0, workers=nw)[:n]
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
    workers : int, optional
        Threads for the symmetric powers, the features and scipy.fft (scipy.fft's
        meaning; None: :func:`numbarope.get_workers`).

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
    n, E, Ev, g, qs, ks, v64 = _scaled(q, k, v, scale, coef)
    vext = _extended(v64)
    nw = resolve_workers(workers)
    N = fft_length(n)
    start, _, _, _ = monomial_table(E, g)
    ones = np.ones(start[-1])
    Qm = features(qs, E, g, ones, workers=nw).T     # unweighted monomials q'^α, (n, m) view
    Km = features(ks, E, g, ones, workers=nw).T
    num = np.zeros((n, Ev + 1))
    for deg in range(g + 1):
        a = coef[deg]
        if a == 0.0:
            continue
        lo, hi = start[deg], start[deg + 1]
        mk = hi - lo
        M = symmetric_power(relative, deg, workers=nw)
        M *= T[:, None, None]
        U = Km[:, lo:hi, None] * vext[:, None, :]
        Uh = sfft.rfft(U, n=N, axis=0, workers=nw)      # (F, mk, Ev+1)
        del U
        mb = _block_columns(N, 16 * mk * 2, mk)
        for a0 in range(0, mk, mb):
            a1 = min(a0 + mb, mk)
            Ch = circulant_spectrum(np.ascontiguousarray(M[:, a0:a1, :]), n, N, nw)
            Yh = np.matmul(Ch, Uh)                            # (F, mb, Ev+1)
            del Ch
            Y = sfft.irfft(Yh, n=N, axis=0, workers=nw)[:n]
            del Yh
            num += a * np.einsum("ia,iae->ie", Qm[:, lo + a0:lo + a1], Y)
        del M, Uh
    return _finish(num, Ev)
