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

__all__ = ["fast_memory", "gemm_chunk", "prefix_chunk", "fast_separable", "fast_general",
           "visible_keys", "key_side_state"]

_U = 2.0 ** -53
_FM = set(_config.FASTMATH)


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


def fast_memory(algorithm, n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes) of one head of the fast path (estimate, upper side).

    Parameters
    ----------
    algorithm : {"gemm", "prefix", "fft", "toeplitz-fft"}
    n, E, Ev, degree : int
        Query rows n (= L), head_dim, value columns, polynomial degree.
    S : int, optional
        Key rows (default n).
    heads : int, optional
        Query heads computed together on one key/value head (grouped-query).

    Returns
    -------
    int
        Bytes of float64/complex128 work arrays, not counting inputs/outputs.
    """
    S = n if S is None else S
    nq = n * heads
    m = n_features(E, degree)
    ev1 = Ev + 1
    # float64 copies of q, k, v (validated, rotated, scaled, transposed), [v, 1], numerator,
    # output
    base = 8 * (nq * (3 * E + 2 * ev1) + S * (2 * E + 2 * ev1))
    if algorithm in ("gemm", "prefix"):
        nw = resolve_workers(None)
        cf = min(gemm_chunk(m), max(n, S, 1))
        per_thread = 8 * (m * cf + 2 * m * ev1)        # feature block, product, running S
        if algorithm == "gemm":
            states = _state_tasks(m, ev1, -(-S // cf)) * m * ev1
        else:
            c = min(prefix_chunk(m), max(S, 1))
            nch = -(-S // c)
            states = (_causal_group(m, ev1, nch) + 2 * _state_tasks(m, ev1, nch)) * m * ev1
            per_thread += 8 * (2 * c * c + 2 * c * ev1)  # intra-chunk weights and products
        return base + 8 * states + nw * per_thread
    N = fft_length(n, S)
    F = N // 2 + 1
    if algorithm == "fft":
        # phi(Q), psi(K) in full + one block of (N, mb, Ev+1) real and spectra
        return base + 8 * (nq + S) * m + min(_config.FFT_BLOCK_BYTES * 3, 3 * 16 * F * m * ev1)
    # toeplitz-fft: the largest degree's blocks dominate
    mk = n_features(E, degree) - n_features(E, degree - 1) if degree > 0 else 1
    sym = 8 * 2 * (n + S - 1) * mk * mk               # M_k(W_t) and its predecessor
    uhat = 16 * F * mk * ev1 * 2                       # key-side spectrum + product
    block = min(_config.FFT_BLOCK_BYTES * 3, 3 * 16 * F * mk * mk)
    return base + sym + uhat + block + 8 * (nq + S) * m   # + all monomials of q and k


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
def _chunk_queries(qs, ks, qt, v, pc, lim, rstart, j0, j1, base, c, cf, parent, var, ratio,
                   w0, post, weight, states, sums, S, s, num, den):
    # For key chunks j0 <= j < j1 in order, (S, s) = sum of the states of all earlier
    # chunks on entry. Query rows rstart[j] <= r < rstart[j+1] see the keys
    # 0 .. lim[r] − 1, the last of them in chunk j:
    #   num[r] = φ(q_r) S + Σ_{j·c <= t < lim[r]} p(q_r k_t) v_t  (den alike, with s and 1);
    # then S += states[j − base]. p by Horner on the logits (the same polynomial,
    # O(c·E) per row instead of O(c·m)). Square causal: rows of chunk j = its keys,
    # lim[r] = r + 1 (key <= query, diagonal included).
    nk = v.shape[0]
    g = pc.shape[0] - 1
    buf = np.empty(parent.shape[0] * max(1, min(cf, c)))
    for j in range(j0, j1):
        a = rstart[j]
        b = rstart[j + 1]
        k0 = j * c
        k1 = min(k0 + c, nk)
        if b > a:
            _query_rows(qt, S, s, a, b, cf, parent, var, ratio, w0, post, weight, buf,
                        num, den)
            for r0 in range(a, b, c):
                r1 = min(r0 + c, b)
                X = np.dot(qs[r0:r1], ks[k0:k1].T)
                for r in range(r1 - r0):
                    row = X[r]
                    cnt = lim[r0 + r] - k0
                    acc = 0.0
                    for t in range(cnt):
                        x = row[t]
                        p = pc[0]
                        for d in range(1, g + 1):
                            p = p * x + pc[d]
                        row[t] = p
                        acc += p
                    for t in range(cnt, k1 - k0):
                        row[t] = 0.0
                    den[r0 + r] += acc
                if v.shape[1]:
                    num[r0:r1] += np.dot(X, v[k0:k1])
        S += states[j - base]
        s += sums[j - base]


def _ranges(lo, hi, k, weight=None):
    """``k`` contiguous ranges covering lo .. hi, balanced by count or by ``weight``
    (one non-negative weight per unit lo .. hi − 1)."""
    if weight is None:
        b = np.linspace(lo, hi, k + 1).round().astype(np.int64)
    else:
        cw = np.concatenate([[0.0], np.cumsum(weight, dtype=np.float64)])
        b = lo + np.searchsorted(cw, np.linspace(0.0, cw[-1], k + 1), side="left")
        b[0], b[-1] = lo, hi
        b = np.minimum(np.maximum.accumulate(b), hi)
    return [(int(x), int(y)) for x, y in zip(b[:-1], b[1:]) if y > x]


def _key_states(ks, v, wpsi, parent, var, nw):
    """Key-side state ``S = Σ_j ψ(k_j) v_jᵀ`` (m, Ev) and ``s = Σ_j ψ(k_j)`` (m,)."""
    nk, Ev = v.shape
    m = parent.shape[0]
    cf = gemm_chunk(m)
    kt = np.ascontiguousarray(ks.T)
    rk, w0k, postk = feature_recurrence(wpsi, parent)
    # a partition that depends on the sizes only: the sum of the private states in
    # task order is the same for any number of threads
    tasks = _ranges(0, nk, _state_tasks(m, Ev + 1, -(-nk // cf)))
    S_t = np.zeros((max(1, len(tasks)), m, Ev))
    s_t = np.zeros((max(1, len(tasks)), m))
    with blas_threads(1):
        run_tasks(lambda i: _gemm_keys(kt, v, tasks[i][0], tasks[i][1], cf, parent, var,
                                       rk, w0k, postk, wpsi, S_t[i], s_t[i]),
                  range(len(tasks)), nw)
    S, s = S_t[0], s_t[0]
    for i in range(1, len(tasks)):
        S += S_t[i]
        s += s_t[i]
    return S, s


def _query_apply(qs, S, s, wphi, parent, var, nw, num=None, den=None, r0=0, r1=None):
    """``num[r] = φ(q_r)ᵀ S``, ``den[r] = φ(q_r)ᵀ s`` for rows r0 <= r < r1 (all)."""
    nq = qs.shape[0]
    r1 = nq if r1 is None else r1
    m = parent.shape[0]
    cf = gemm_chunk(m)
    num = np.empty((nq, S.shape[1])) if num is None else num
    den = np.empty(nq) if den is None else den
    if r1 <= r0:
        return num, den
    qt = np.ascontiguousarray(qs.T)
    rq, w0q, postq = feature_recurrence(wphi, parent)
    nw = resolve_workers(nw)
    rows = _ranges(r0, r1, min(-(-(r1 - r0) // cf), 4 * nw))   # rows are independent
    with blas_threads(1):
        run_tasks(lambda t: _gemm_queries(qt, S, s, t[0], t[1], cf, parent, var, rq, w0q,
                                          postq, wphi, num, den), rows, nw)
    return num, den


def _gemm(qs, ks, v, wphi, wpsi, parent, var, nw, state=None):
    """Every query row sees every key, no bias: S = Σ_j ψ(k_j)[v_j, 1]ᵀ, then num = φ(Q) S.
    ``state``: (S₀, s₀) of further keys every row sees, added to S, s."""
    S, s = _key_states(ks, v, wpsi, parent, var, nw)
    if state is not None:
        S += state[0]
        s += state[1]
    return _query_apply(qs, S, s, wphi, parent, var, nw)


def _prefix(qs, ks, v, coef, wphi, wpsi, parent, var, nw, lim=None, state=None):
    """Causal, no bias: chunked prefix sums of the key-side states.

    Query row r sees the keys ``0 .. lim[r] − 1`` (a prefix; default ``lim[r] = r + 1``,
    square causal attention). Rectangular attention at an offset, key padding (the
    padded keys removed) and the stacked query heads of one key/value head are all
    this form. Rows are ordered by ``lim`` and each key chunk serves the rows whose
    last visible key it holds.

    Three phases per group of chunks (their states bounded by STATE_BYTES): (1) every
    chunk's key-side state ψ(K_C)ᵀ[V_C, 1] and each task's total, in parallel;
    (2) an exclusive prefix sum over the tasks' totals, serial; (3) every task walks
    its chunks in order, query side φ(Q_r) S + masked intra-chunk polynomial for its
    rows, then S += state, in parallel. Rows that see every key, when more than a
    chunk of them, are done after the last group with the total state, in parallel.

    Accuracy: each weight sum is still Σ_j p(q'_iᵀk'_j)[v_j, 1] with p formed in
    float64 from the same features (or by Horner inside a chunk), and each numerator
    entry is a sum of the same n·m + ... products; only the order of the additions
    differs from a running sum (a tree of partial sums: chunk states, task totals,
    prefix). The rounding bound γ_{n+m+2g+2}·Σ|φ_αψ_α| of planner.rounding_term counts
    the terms of the sum, not its order (Higham 2002, §4.2: any summation order of
    k terms is within γ_{k−1}), so it stays valid.
    """
    nk, Ev = v.shape
    nq = qs.shape[0]
    m = parent.shape[0]
    c = prefix_chunk(m)
    cf = min(gemm_chunk(m), c)
    nch = -(-nk // c)
    G = _causal_group(m, Ev + 1, nch)
    if lim is None:
        lim = np.arange(1, nq + 1, dtype=np.int64)
    lim = np.asarray(lim, dtype=np.int64)
    order = None
    if np.any(lim[1:] < lim[:-1]):
        order = np.argsort(lim, kind="stable")
        lim = lim[order]
        qs = qs[order]
    qs = np.ascontiguousarray(qs)
    full0 = int(np.searchsorted(lim, nk, side="left"))     # rows >= full0 see every key
    if nq - full0 <= c:
        full0 = nq                                          # few: served by the last chunk
    chunk_of = (lim[:full0] - 1) // c                       # -1: rows that see no key
    rstart = np.searchsorted(chunk_of, np.arange(nch + 1)).astype(np.int64)
    qt = np.ascontiguousarray(qs.T)
    kt = np.ascontiguousarray(ks.T)
    rk, w0k, postk = feature_recurrence(wpsi, parent)
    rq, w0q, postq = feature_recurrence(wphi, parent)
    pc = np.ascontiguousarray(coef[::-1], dtype=np.float64)      # Horner order
    num = np.zeros((nq, Ev))
    den = np.zeros(nq)
    S = np.zeros((m, Ev))                                         # all earlier groups
    s = np.zeros(m)
    if state is not None:
        S += state[0]
        s += state[1]
        if rstart[0] > 0:                 # rows that see no key of this block: the state
            _query_apply(qs, S, s, wphi, parent, var, nw, num, den, 0, int(rstart[0]))
    states = np.empty((min(G, nch), m, Ev))
    sums = np.empty((min(G, nch), m))
    # work of a chunk: its keys' side (c rows) and its query rows (query side + Horner)
    work = (c + np.diff(rstart)).astype(np.float64)
    with blas_threads(1):
        for g0 in range(0, nch, G):
            g1 = min(g0 + G, nch)
            tasks = _ranges(g0, g1, _state_tasks(m, Ev + 1, g1 - g0), work[g0:g1])
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
            run_tasks(lambda i: _chunk_queries(qs, ks, qt, v, pc, lim, rstart, tasks[i][0],
                                               tasks[i][1], g0, c, cf, parent, var, rq, w0q,
                                               postq, wphi, states, sums, S_t[i], s_t[i],
                                               num, den),
                      range(len(tasks)), nw)
    if full0 < nq:                                                # S, s: every key now
        _query_apply(qs, S, s, wphi, parent, var, nw, num, den, full0, nq)
    if order is not None:
        num[order], den[order] = num.copy(), den.copy()
    return num, den


def _extended(v, key_weight=None):
    """``[v, 1]``: the column of ones gives the softmax denominators; rows of padded keys
    (``key_weight`` 0) are zero, so they take no part."""
    vext = np.empty((v.shape[0], v.shape[1] + 1))
    vext[:, :-1] = v
    vext[:, -1] = 1.0
    if key_weight is not None:
        vext *= key_weight[:, None]
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


def visible_keys(L, S, offset=0, causal=False, key_mask=None):
    """Keys seen by each query row, as a prefix of the real (unpadded) keys.

    Query i is at position ``i + offset``, key j at j; with ``causal`` it sees keys
    ``j <= i + offset``, and only keys with ``key_mask[j]`` (all if None).

    Returns
    -------
    lim : (L,) ndarray of int64 or None
        Number of real keys row i sees (they are the first ``lim[i]`` real keys);
        None when every row sees every real key.
    """
    if key_mask is None:
        cum = np.arange(1, S + 1, dtype=np.int64)
    else:
        cum = np.cumsum(np.asarray(key_mask, dtype=bool), dtype=np.int64)
    real = int(cum[-1]) if S else 0
    if not causal or S == 0:
        return None
    last = np.arange(L, dtype=np.int64) + int(offset)          # last visible key position
    lim = np.where(last < 0, 0, cum[np.clip(last, 0, S - 1)])
    if lim.size and lim.min() == real:
        return None
    return lim


def _with_groups(q):
    q = np.asarray(q)
    return (q[None], True) if q.ndim == 2 else (q, False)


def key_side_state(k, v, scale, coef, workers=None):
    """Key-side state of the separable fast path for a block of keys.

    ``S = Σ_j ψ(k'_j) v_jᵀ`` and ``s = Σ_j ψ(k'_j)`` with ``k' = √s k`` and ψ the
    key-side features of ``p(q'ᵀk') = φ(q')ᵀψ(k')`` (Alman & Song 2025, §4). The
    states of disjoint key blocks add: this is what one long sequence's key
    blocks send to a tree reduction (``numbarope._dask``), then
    ``fast_separable(..., state=(S, s))`` serves the query rows.

    Parameters
    ----------
    k : (S, E) ndarray of float64
        Keys, already rotated.
    v : (S, Ev) ndarray of float64
    scale : float
    coef : (g+1,) ndarray of float64
    workers : int, optional

    Returns
    -------
    S : (m, Ev) ndarray of float64
    s : (m,) ndarray of float64
        ``m = C(E+g, g)`` features.
    """
    k = np.asarray(k)
    E = k.shape[1]
    g = len(coef) - 1
    ks = np.ascontiguousarray(k * np.sqrt(scale), dtype=np.float64)
    _, wpsi = feature_weights(coef, E, g)
    _, parent, var, _ = monomial_table(E, g)
    return _key_states(ks, np.ascontiguousarray(v, dtype=np.float64), wpsi, parent, var,
                       resolve_workers(workers))


def fast_separable(q, k, v, scale, coef, T=None, causal=False, workers=None, *, offset=0,
                   key_mask=None, state=None):
    """Fast attention of one key/value head with separable logits ``s·q_iᵀk_j``.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, already rotated (RoPE) if any; query i is at position
        ``i + offset``. G query heads that share this key/value head (grouped-query
        attention) are computed together: the key-side features and states (or
        spectra) are formed once for all of them.
    k : (S, E) ndarray of float64
        Keys at positions 0 .. S−1, already rotated.
    v : (S, Ev) ndarray of float64
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        Monomial coefficients of p ≈ exp on the logit interval.
    T : (L+S−1,) ndarray of float64 or None
        ``T[i − j + S − 1] = exp(b_t − max b) >= 0`` for offset ``t = i + offset − j``
        (causal zeros included); None means all ones (no bias), with ``causal``
        selecting the mask.
    causal : bool
        Only used when T is None: row i sees keys ``j <= i + offset``.
    workers : int, optional
        Threads for the feature kernels, the chunk GEMMs and scipy.fft
        (scipy.fft's meaning; None: :func:`numbarope.get_workers`). The result
        does not depend on it.
    offset : int, optional
        Position of query 0 (default 0).
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys take no part (removed from the gemm and
        prefix paths, zero rows of ``[v, 1]`` on the FFT path: the Toeplitz
        structure is kept).
    state : tuple of ndarray, optional
        ``(S₀, s₀)`` of shapes (m, Ev) and (m,): the key-side state
        (:func:`key_side_state`) of further keys that every query row sees
        in full, e.g. the earlier blocks of one long sequence
        (``numbarope._dask``). Only with ``T=None``.

    Returns
    -------
    out : (L, Ev) or (G, L, Ev) ndarray of float64
    den : (L,) or (G, L) ndarray of float64
        The approximate softmax denominators (rows with den <= 0 get out = 0).
    """
    Q, single = _with_groups(q)
    G, L, E = Q.shape
    S, Ev = k.shape[0], v.shape[1]
    g = len(coef) - 1
    sq = np.sqrt(scale)
    qs = np.ascontiguousarray(Q.reshape(G * L, E) * sq, dtype=np.float64)
    ks = np.ascontiguousarray(k * sq, dtype=np.float64)
    v64 = np.ascontiguousarray(v, dtype=np.float64)
    nw = resolve_workers(workers)
    wphi, wpsi = feature_weights(coef, E, g)
    _, parent, var, _ = monomial_table(E, g)
    keep = None if key_mask is None else np.asarray(key_mask, dtype=bool)
    if keep is not None and keep.all():
        keep = None

    def shaped(out, den):
        out, den = out.reshape(G, L, Ev), den.reshape(G, L)
        return (out[0], den[0]) if single else (out, den)

    if state is not None and T is not None:
        raise ValueError("fast_separable: state= needs T=None (no bias)")
    if state is not None and (S == 0 or (keep is not None and not keep.any())):
        num, den = _query_apply(qs, state[0], state[1], wphi, parent, var, nw)
        return shaped(*_finish(num, Ev, den))
    if G * L == 0 or S == 0 or (keep is not None and not keep.any()):
        return shaped(np.zeros((G * L, Ev)), np.zeros(G * L))
    if T is None:
        lim = visible_keys(L, S, offset, causal, keep)
        if keep is not None:
            ks, v64 = ks[keep], v64[keep]
        if lim is None:
            num, den = _gemm(qs, ks, v64, wphi, wpsi, parent, var, nw, state)
        else:
            num, den = _prefix(qs, ks, v64, np.asarray(coef, np.float64), wphi, wpsi,
                               parent, var, nw, np.tile(lim, G), state)
        return shaped(*_finish(num, Ev, den))
    vext = _extended(v64, None if keep is None else keep.astype(np.float64))
    m = wphi.size
    num = np.zeros((G * L, Ev + 1))
    N = fft_length(L, S)
    Tspec = circulant_spectrum(T, L, N, nw, S=S)
    Pq = features(qs, E, g, wphi, workers=nw).T      # (G·L, m) views of feature-major arrays
    Pk = features(ks, E, g, wpsi, workers=nw).T      # (S, m)
    mb = _block_columns(N, 8 * (Ev + 1) * 3, m)
    for a0 in range(0, m, mb):
        a1 = min(a0 + mb, m)
        U = Pk[:, a0:a1, None] * vext[:, None, :]
        Uh = sfft.rfft(U, n=N, axis=0, workers=nw)
        del U
        Uh *= Tspec[:, None, None]
        Y = sfft.irfft(Uh, n=N, axis=0, workers=nw)[:L]
        del Uh
        for h in range(G):                              # the key side serves every head
            num[h * L:(h + 1) * L] += np.einsum("ia,iae->ie", Pq[h * L:(h + 1) * L, a0:a1], Y)
    return shaped(*_finish(num, Ev))


def fast_general(q, k, v, scale, coef, relative, T, workers=None, *, key_mask=None):
    """Fast attention of one head with general relative matrices (block-Toeplitz FFT).

    Parameters
    ----------
    q : (L, E) ndarray of float64
    k : (S, E) ndarray of float64
    v : (S, Ev) ndarray of float64
    scale : float
    coef : (g+1,) ndarray of float64
    relative : (L+S−1, E, E) ndarray of float64
        ``relative[i − j + S − 1] = W_t`` (square, L = S = n: ``relative[t + n − 1]``;
        rectangular: t = i + query_offset − j, the offset only names the entries).
    T : (L+S−1,) ndarray of float64
        ``exp(b_t − max b)`` with causal zeros; ones when there is no bias.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys' rows of ``[v, 1]`` are zero.
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
    L, E = q.shape
    S, Ev = v.shape
    if L == 0 or S == 0:
        return np.zeros((L, Ev)), np.zeros(L)
    g = len(coef) - 1
    sq = np.sqrt(scale)
    qs = np.ascontiguousarray(q * sq, dtype=np.float64)
    ks = np.ascontiguousarray(k * sq, dtype=np.float64)
    vext = _extended(np.asarray(v, dtype=np.float64),
                     None if key_mask is None else np.asarray(key_mask, np.float64))
    nw = resolve_workers(workers)
    N = fft_length(L, S)
    start, _, _, _ = monomial_table(E, g)
    ones = np.ones(start[-1])
    Qm = features(qs, E, g, ones, workers=nw).T     # unweighted monomials q'^α, (n, m) view
    Km = features(ks, E, g, ones, workers=nw).T
    num = np.zeros((L, Ev + 1))
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
            Ch = circulant_spectrum(np.ascontiguousarray(M[:, a0:a1, :]), L, N, nw, S=S)
            Yh = np.matmul(Ch, Uh)                            # (F, mb, Ev+1)
            del Ch
            Y = sfft.irfft(Yh, n=N, axis=0, workers=nw)[:L]
            del Yh
            num += a * np.einsum("ia,iae->ie", Qm[:, lo + a0:lo + a1], Y)
        del M, Uh
    return _finish(num, Ev)
