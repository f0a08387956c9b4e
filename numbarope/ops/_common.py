"""What the separable fast algorithms share, each piece once.

The separable algorithms (:mod:`~numbarope.ops.gemm`, :mod:`~numbarope.ops.prefix`,
:mod:`~numbarope.ops.decay`, :mod:`~numbarope.ops.window`, :mod:`~numbarope.ops.fft`)
replace every attention weight ``exp(s·q_iᵀk_j)·T(t_ij)`` (``t_ij = i + offset − j``)
by ``p(q'_iᵀk'_j)·T(t_ij)``, with ``p(x) = Σ_k a_k x^k ≈ eˣ`` certified on the logit
interval (:mod:`numbarope.polynomial`) and ``q' = √s q``, ``k' = √s k``. The
polynomial method (Alman & Song 2025, §4) writes ``p(q'ᵀk') = φ(q')ᵀψ(k')`` with
``m = C(E+g, g)`` symmetric monomial features (:mod:`numbarope.ops._features`), so
the numerator and denominator of a row,

    num_i = Σ_j T(t_ij) φ(q_i)ᵀψ(k_j) [v_j, 1],

are a product of the query-side features with a *key-side state*
``Σ_j ψ(k_j)[v_j, 1]ᵀ`` (m × (Ev+1)), summed over the keys the row sees with the
weights T. What differs between the algorithms is how that sum over keys is
organised (all keys, prefixes, decayed prefixes, windows, a Toeplitz product); what
they share lives here:

* the key-side state kernel (:func:`_key_state`, and :func:`_decay_state` with a
  decay weight on each key) and the query-side kernel (:func:`_query_rows`);
* the gemm-style drivers: key states over tasks (:func:`_key_states`), the query side
  of a state (:func:`_query_apply`);
* **one masked chunk kernel with an optional decay** (:func:`_horner_block`: the
  polynomial by Horner on the logits of a block of rows against a block of keys,
  each row its own key range) and the chunked scan built on it (:func:`_chunk_states`,
  :func:`_scan_queries`, the driver :func:`_scan`), which the causal prefix and the
  causal decay both run — with no decay no factor is applied at all, so the prefix
  pays no multiplication;
* task ranges (:func:`_ranges`, :func:`_state_tasks`, :func:`_causal_group`), chunk
  sizes (:func:`gemm_chunk`, :func:`prefix_chunk`, :func:`recurrence_chunk`), the
  memory of the shared pieces (:func:`base_memory`, :func:`scan_memory`);
* input setup (:func:`_setup`: scaled float64 copies, the real keys and their
  positions), feature tables (:class:`_Side`), ``[v, 1]`` (:func:`_extended`), the
  division (:func:`_finish`, :func:`_shaped`), :func:`visible_keys`;
* :func:`key_side_state` (the state of a block of keys alone) and :func:`add_states`.

Threads: serial numba kernels, each owning its outputs (a private state, or its own
rows of the numerator), run as the iterations of thin ``prange`` loops
(``@njit(parallel=True)``, the ``_par_*`` functions, under
:func:`numbarope._runtime.threads.parallel`); GEMMs are numba's ``np.dot`` (scipy's
BLAS) at one BLAS thread inside the parallel sections. Every partition that changes
a rounding depends on the sizes only (never on ``workers``), so results are bitwise
the same for any number of threads.

States are kept as ``S = Σ ψ(k)vᵀ`` (m × Ev) and ``s = Σ ψ(k)`` (m,): the column of
ones of ``[v, 1]`` is a row sum done next to the features, because BLAS runs
(m × w) @ (w × Ev) near full speed for Ev a multiple of 8 and ~40% slower at Ev + 1.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025): §4 (polynomial method, rescaled
Toeplitz decomposition), §5 (FFT algorithm).
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., SIAM
(2002): §3.1 and §4.2 (inner products and sums in any order).
"""

import math

import numpy as np
from numba import njit, prange

from .. import _config
from .._runtime.threads import parallel, prange_loop, resolve_workers, task_array
from ._features import (_features_block, _features_reduce, feature_recurrence,
                        feature_weights, monomial_table, n_features)

__all__ = ["gemm_chunk", "prefix_chunk", "recurrence_chunk", "backward_chunk",
           "visible_keys",
           "key_side_state", "add_states", "base_memory", "scan_memory", "CHUNK"]

_U = 2.0 ** -53
_FM = set(_config.FASTMATH)

#: Keys per chunk of the decay and window recurrences: None chooses it from the sizes
#: (:func:`recurrence_chunk`); an int forces it (tests use small ones).
CHUNK = None

_NO_DEC = np.empty(0)                      # "no decay" for the kernels' ``dec``
_NO_POS = np.empty(0, np.int64)


# ------------------------------------------------------------------ sizes
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


def recurrence_chunk(m, E, Ev, g):
    """Keys per chunk of the decay and window recurrences:
    ``8·sqrt(m(Ev+1) / (E + Ev + 2g + 3))``, a multiple of 16 in [16, 512].

    A chunk costs each query row ~C·(E + Ev + 2g + 3) inside it (logits, Horner, values)
    and each chunk a few m·(Ev+1) state operations; the square root balances the two.
    Measured (one thread, n = 8192, eps = 1e-3): E = 4 (m = 70) best at 32, E = 8
    (m = 495) at 64-128, E = 16 (m = 969) at 128-256; the rule gives 32, 96, 160.
    :data:`CHUNK` forces a size.
    """
    if CHUNK:
        return int(CHUNK)
    c = 8.0 * math.sqrt(m * (Ev + 1) / (E + Ev + 2 * g + 3))
    return int(min(512, max(16, 16 * round(c / 16))))


#: Bytes of one block of backward features (m × rows), kept next to its GEMM
#: (:func:`backward_chunk`).
BACKWARD_BLOCK_BYTES = 2 ** 21
#: Least rows per backward block while its features fit in BACKWARD_MAX_BYTES: every
#: block adds an m × width product to the state (or streams the state once), so
#: blocks of few rows are memory-bound (m = 4845, width 272, one thread: 15 GF/s at 48
#: rows, 25-27 GF/s at 256-512).
BACKWARD_MIN_ROWS = 256
BACKWARD_MAX_BYTES = 2 ** 24


def backward_chunk(m, width):
    """Rows per feature block of the fast backwards (gemm_backward,
    prefix_backward): about
    :data:`BACKWARD_BLOCK_BYTES` of features (m × rows) or of products
    (rows × width), at least :data:`BACKWARD_MIN_ROWS` within
    :data:`BACKWARD_MAX_BYTES`; a multiple of 8 in [8, 1024]."""
    per_row = 8 * max(m, width, 1)
    c = max(BACKWARD_BLOCK_BYTES // per_row,
            min(BACKWARD_MIN_ROWS, BACKWARD_MAX_BYTES // per_row))
    return int(min(1024, max(8, c - c % 8)))


def _state_tasks(m, ev1, units):
    """Number of tasks with a private m x (Ev+1) state over ``units`` chunks: at most
    MAX_TASKS, and their states within STATE_BYTES. Depends on the sizes only (not
    on ``workers``), so results do not depend on the number of threads."""
    per = 8 * m * ev1
    return int(max(1, min(units, _config.MAX_TASKS, _config.STATE_BYTES // per)))


def _causal_group(m, ev1, nchunks):
    """Chunks whose key-side states are stored at once (bounded by STATE_BYTES)."""
    return int(max(1, min(nchunks, _config.STATE_BYTES // (8 * m * ev1))))


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


def _row_blocks(r0, r1, cf):
    """Tasks over rows r0 .. r1 − 1 made of whole blocks of cf rows (the last may be
    short), at most MAX_TASKS: the same feature blocks and GEMMs for any ``workers``."""
    nb = -(-(r1 - r0) // cf)
    return [(r0 + a * cf, min(r0 + b * cf, r1))
            for a, b in _ranges(0, nb, min(nb, _config.MAX_TASKS))]


# ------------------------------------------------------------------ memory
def base_memory(n, S, E, Ev, heads=1):
    """Bytes of the float64 copies every fast algorithm makes: q, k, v (validated,
    rotated, scaled, transposed), ``[v, 1]``, the numerator and the output, for ``n``
    query rows of each of ``heads`` query heads and ``S`` keys."""
    nq = n * heads
    ev1 = Ev + 1
    return 8 * (nq * (3 * E + 2 * ev1) + S * (2 * E + 2 * ev1))


def scan_memory(n, S, E, Ev, degree, heads=1, chunk=None):
    """Peak working memory (bytes, an upper estimate) of one chunked scan
    (:func:`_scan`) of ``chunk`` keys per chunk: :func:`base_memory`, the stored chunk
    states of a group and the tasks' private states, and per thread a feature block,
    its products, a running state and the intra-chunk logits."""
    m = n_features(E, degree)
    ev1 = Ev + 1
    nw = resolve_workers(None)
    cf = min(gemm_chunk(m), max(n, S, 1))
    c = min(prefix_chunk(m) if chunk is None else int(chunk), max(S, 1))
    nch = -(-S // c)
    states = (_causal_group(m, ev1, nch) + 2 * _state_tasks(m, ev1, nch)) * m * ev1
    per_thread = 8 * (m * cf + 2 * m * ev1) + 8 * (2 * c * c + 2 * c * ev1)
    return base_memory(n, S, E, Ev, heads) + 8 * states + nw * per_thread


# ------------------------------------------------------------------ serial kernels
# Each is one task of a parallel loop and owns its outputs: a private state, or its
# own rows of the numerator. GEMMs are numba's np.dot (scipy's BLAS) with one BLAS
# thread (runtime.threads.parallel limits it around the parallel section).

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
def _decay_state(kt, v, kpos, dec, r0, r1, ref, cf, parent, var, ratio, w0, post, weight,
                 buf, dw, vw, S, s):
    # S += Σ_{r0 <= r < r1} dec[ref − kpos[r]] ψ(k_r) v_rᵀ, s alike with 1: the decay
    # weight rides on the values (w × Ev products), features in blocks of cf rows.
    m = parent.shape[0]
    Ev = v.shape[1]
    for j0 in range(r0, r1, cf):
        j1 = min(j0 + cf, r1)
        w = j1 - j0
        P = buf[:m * w].reshape((m, w))
        _features_block(kt, j0, j1, parent, var, ratio, w0, post, weight, P, 0)
        d = dw[:w]
        for r in range(w):
            d[r] = dec[ref - kpos[j0 + r]]
        s += np.dot(P, d)
        if Ev:
            W = vw[:w * Ev].reshape((w, Ev))
            for r in range(w):
                f = d[r]
                for e in range(Ev):
                    W[r, e] = v[j0 + r, e] * f
            S += np.dot(P, W)


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
def _task_keys(kt, v, kpos, dec, ref, r0, r1, cf, parent, var, ratio, w0, post, weight,
               S, s):
    # One task of _key_states: keys r0 .. r1 − 1 into the private (S, s); with a decay
    # (dec non-empty) each key weighted by dec[ref − kpos[r]].
    w = max(1, min(cf, r1 - r0))
    buf = np.empty(parent.shape[0] * w)
    if dec.shape[0]:
        dw = np.empty(w)
        vw = np.empty(w * max(1, v.shape[1]))
        _decay_state(kt, v, kpos, dec, r0, r1, ref, cf, parent, var, ratio, w0, post,
                     weight, buf, dw, vw, S, s)
    else:
        _key_state(kt, v, r0, r1, cf, parent, var, ratio, w0, post, weight, buf, S, s)


@njit(cache=True, nogil=True, fastmath=_FM)
def _task_queries(qt, S, s, r0, r1, cf, parent, var, ratio, w0, post, weight, num, den):
    buf = np.empty(parent.shape[0] * max(1, min(cf, r1 - r0)))
    _query_rows(qt, S, s, r0, r1, cf, parent, var, ratio, w0, post, weight, buf, num, den)


# ------------------------------------------------------------------ parallel loops
# Each a thin prange over independent tasks calling a serial kernel (tasks: (n, 2)
# int64 ranges whose partition depends on the sizes only): results do not depend on
# the number of threads.

@prange_loop(lambda *a: a[:5] + (0, 0) + a[6:13] + (a[13][0], a[14][0]))
def _par_task_keys(fn, kt, v, kpos, dec, ref, tasks, cf, parent, var, ratio, w0, post,
                   weight, S_t, s_t):
    for i in prange(tasks.shape[0]):
        fn(kt, v, kpos, dec, ref, tasks[i, 0], tasks[i, 1], cf, parent, var, ratio, w0, post,
           weight, S_t[i], s_t[i])


@prange_loop(lambda qt, S, s, tasks, cf, *rest: (qt, S, s, 0, 0, cf, *rest))
def _par_task_queries(fn, qt, S, s, tasks, cf, parent, var, ratio, w0, post, weight, num,
                      den):
    for i in prange(tasks.shape[0]):
        fn(qt, S, s, tasks[i, 0], tasks[i, 1], cf, parent, var, ratio, w0, post, weight, num,
           den)


@njit(cache=True, nogil=True, fastmath=_FM)
def _horner_block(qs, ks, v, pc, r0, r1, s0, s1, lo, hi, dec, kpos, xrow, num, den):
    # The masked chunk kernel. Rows r0 <= r < r1 against keys s0 <= t < s1: row r takes
    # the keys max(lo[r], s0) <= t < min(hi[r], s1) with weight p(q_r·k_t) (Horner on the
    # logit: the same polynomial, O(E + g) per pair instead of O(m)) times, with a decay
    # (dec non-empty), dec[xrow[r] − kpos[t]]; num[r] += Σ_t w_rt v_t, den[r] += Σ_t w_rt.
    # Without a decay no factor is applied (the prefix pays no multiplication).
    if s1 <= s0 or r1 <= r0:
        return
    g = pc.shape[0] - 1
    n = s1 - s0
    decayed = dec.shape[0] > 0
    X = np.dot(qs[r0:r1], ks[s0:s1].T)
    for r in range(r1 - r0):
        row = X[r]
        ta = min(max(lo[r0 + r] - s0, 0), n)
        tb = min(max(hi[r0 + r] - s0, ta), n)
        for t in range(ta):
            row[t] = 0.0
        acc = 0.0
        if decayed:
            x0 = xrow[r0 + r]
            for t in range(ta, tb):
                x = row[t]
                p = pc[0]
                for d in range(1, g + 1):
                    p = p * x + pc[d]
                p *= dec[x0 - kpos[s0 + t]]
                row[t] = p
                acc += p
        else:
            for t in range(ta, tb):
                x = row[t]
                p = pc[0]
                for d in range(1, g + 1):
                    p = p * x + pc[d]
                row[t] = p
                acc += p
        for t in range(tb, n):
            row[t] = 0.0
        den[r0 + r] += acc
    if v.shape[1]:
        num[r0:r1] += np.dot(X, v[s0:s1])


@njit(cache=True, nogil=True, fastmath=_FM)
def _chunk_states(kt, v, kpos, dec, j0, j1, base, c, cf, parent, var, ratio, w0, post,
                  weight, states, sums, tot, tsum):
    # states[j − base], sums[j − base] = the key-side state of chunk j (keys j·c ..
    # j·c + c − 1), for j0 <= j < j1. Without a decay Σ ψ(k_r)[v_r, 1]; with a decay (dec
    # non-empty) Σ dec[e_j − kpos[r]] ψ(k_r)[v_r, 1], e_j the position of the chunk's
    # last key. (tot, tsum), unless empty: the task's total in chunk order — the plain sum,
    # or with a decay referenced at e_{j1−1}: tot ← dec[e_j − e_{j−1}]·tot + state_j.
    n = v.shape[0]
    m = parent.shape[0]
    w = max(1, min(cf, c))
    buf = np.empty(m * w)
    decayed = dec.shape[0] > 0
    dw = np.empty(w if decayed else 0)
    vw = np.empty(w * max(1, v.shape[1]) if decayed else 0)
    total = tot.shape[0] > 0
    prev = 0
    for j in range(j0, j1):
        st = states[j - base]
        sm = sums[j - base]
        st[:, :] = 0.0
        sm[:] = 0.0
        k0 = j * c
        k1 = min(k0 + c, n)
        if decayed:
            ref = kpos[k1 - 1]
            _decay_state(kt, v, kpos, dec, k0, k1, ref, cf, parent, var, ratio, w0, post,
                         weight, buf, dw, vw, st, sm)
            if total:
                if j > j0:
                    f = dec[ref - prev]
                    tot[:, :] = tot * f + st
                    tsum[:] = tsum * f + sm
                else:
                    tot[:, :] = st
                    tsum[:] = sm
            prev = ref
        else:
            _key_state(kt, v, k0, k1, cf, parent, var, ratio, w0, post, weight, buf, st, sm)
            if total:
                tot += st
                tsum += sm


@njit(cache=True, nogil=True, fastmath=_FM)
def _scan_queries(qs, ks, qt, v, pc, lo, lim, xrow, kpos, dec, init, rstart, j0, j1, base,
                  c, cf, parent, var, ratio, w0, post, weight, states, sums, S, s, num, den):
    # For key chunks j0 <= j < j1 in order, (S, s) on entry = the state of all keys before
    # chunk j (with a decay: referenced at e_{j−1} = kpos[j·c − 1], the position of the
    # last key of chunk j − 1, and for j = 0 at position −1; ``init``: it holds an initial
    # state, else it is 0 for j = 0). Rows rstart[j] <= r < rstart[j+1] see the keys
    # 0 .. lim[r] − 1, the last of them in chunk j (with a decay at position xrow[r]):
    #   num[r] = f_r·φ(q_r)ᵀS + Σ_{j·c <= t < lim[r]} w_rt p(q_r k_t) v_t   (den alike, s, 1)
    # with f_r = dec[xrow[r] − e_{j−1}], w_rt = dec[xrow[r] − kpos[t]] (1 without a decay);
    # then (S, s) ← dec[e_j − e_{j−1}]·(S, s) + state_j (without a decay S += state_j).
    # Square causal: rows of chunk j = its keys, lim[r] = r + 1 (diagonal included).
    nk = v.shape[0]
    Ev = v.shape[1]
    decayed = dec.shape[0] > 0
    buf = np.empty(parent.shape[0] * max(1, min(cf, c)))
    for j in range(j0, j1):
        a = rstart[j]
        b = rstart[j + 1]
        k0 = j * c
        k1 = min(k0 + c, nk)
        e0 = kpos[k0 - 1] if j > 0 else -1
        carried = j > 0 or init
        if b > a:
            if carried:
                _query_rows(qt, S, s, a, b, cf, parent, var, ratio, w0, post, weight, buf,
                            num, den)
                if decayed:
                    for r in range(a, b):
                        f = dec[xrow[r] - e0]
                        den[r] *= f
                        for e in range(Ev):
                            num[r, e] *= f
            else:
                for r in range(a, b):
                    den[r] = 0.0
                    for e in range(Ev):
                        num[r, e] = 0.0
            for r0 in range(a, b, c):
                _horner_block(qs, ks, v, pc, r0, min(r0 + c, b), k0, k1, lo, lim, dec, kpos,
                              xrow, num, den)
        if decayed:
            if carried:
                f = dec[kpos[k1 - 1] - e0]
                S[:, :] = S * f + states[j - base]
                s[:] = s * f + sums[j - base]
            else:
                S[:, :] = states[j - base]
                s[:] = sums[j - base]
        else:
            S += states[j - base]
            s += sums[j - base]


@prange_loop(lambda *a: a[:4] + (0, 0) + a[5:16] + (a[16][0], a[17][0]))
def _par_chunk_states(fn, kt, v, kpos, dec, tasks, base, c, cf, parent, var, ratio, w0, post,
                      weight, states, sums, S_t, s_t):
    for i in prange(tasks.shape[0]):
        fn(kt, v, kpos, dec, tasks[i, 0], tasks[i, 1], base, c, cf, parent, var, ratio, w0,
           post, weight, states, sums, S_t[i], s_t[i])


@prange_loop(lambda *a: a[:12] + (0, 0) + a[13:24] + (a[24][0], a[25][0]) + a[26:])
def _par_scan_queries(fn, qs, ks, qt, v, pc, lo, lim, xrow, kpos, dec, init, rstart, tasks,
                      base, c, cf, parent, var, ratio, w0, post, weight, states, sums, S_t,
                      s_t, num, den):
    for i in prange(tasks.shape[0]):
        fn(qs, ks, qt, v, pc, lo, lim, xrow, kpos, dec, init, rstart, tasks[i, 0],
           tasks[i, 1], base, c, cf, parent, var, ratio, w0, post, weight, states, sums,
           S_t[i], s_t[i], num, den)


# ------------------------------------------------------------------ inputs and outputs
class _Side:
    """Feature tables of one call (the same for every pass): φ and ψ weights, the
    monomial tree, the recurrences of both sides and p's coefficients in Horner order."""

    def __init__(self, coef, E):
        g = len(coef) - 1
        self.wphi, self.wpsi = feature_weights(coef, E, g)
        _, self.parent, self.var, _ = monomial_table(E, g)
        self.rk, self.w0k, self.postk = feature_recurrence(self.wpsi, self.parent)
        self.rq, self.w0q, self.postq = feature_recurrence(self.wphi, self.parent)
        self.pc = np.ascontiguousarray(np.asarray(coef, np.float64)[::-1])   # Horner order
        self.m = self.parent.shape[0]
        self.E, self.g = E, g

    def keys(self):
        """Key-side arguments of the feature kernels."""
        return self.parent, self.var, self.rk, self.w0k, self.postk, self.wpsi

    def queries(self):
        """Query-side arguments of the feature kernels."""
        return self.parent, self.var, self.rq, self.w0q, self.postq, self.wphi


def _example_qkv(rng, n=96, E=4, s=0.4):
    """Random q, k (entries ~ N(0, s²)) and v for the algorithms' ``example``."""
    return (rng.standard_normal((n, E)) * s, rng.standard_normal((n, E)) * s,
            rng.standard_normal((n, 3)))


def _with_groups(q):
    q = np.asarray(q)
    return (q[None], True) if q.ndim == 2 else (q, False)


def _setup(q, k, v, scale, coef, key_mask, remove_padded=True):
    """Shapes, scaled float64 copies, real keys and their positions.

    Returns ``(single, G, L, E, S, Ev, qs, ks, v64, kpos)``: ``qs`` the (G·L, E) queries
    times √s, ``ks`` the keys times √s and ``v64`` the values (only the real keys when
    ``remove_padded``), ``kpos`` the positions of the real keys (increasing).
    """
    Q, single = _with_groups(q)
    G, L, E = Q.shape
    k = np.asarray(k)
    v = np.asarray(v)
    S, Ev = k.shape[0], v.shape[1]
    if k.shape != (S, E) or v.shape[0] != S:
        raise ValueError(f"shapes q {Q.shape}, k {k.shape}, v {v.shape} do not match: "
                         f"expected k (S, {E}) and v (S, Ev)")
    sq = np.sqrt(scale)
    qs = np.ascontiguousarray(Q.reshape(G * L, E) * sq, dtype=np.float64)
    ks = np.ascontiguousarray(k * sq, dtype=np.float64)
    v64 = np.ascontiguousarray(v, dtype=np.float64)
    if key_mask is None:
        kpos = np.arange(S, dtype=np.int64)
    else:
        keep = np.asarray(key_mask, dtype=bool).reshape(S)
        kpos = np.flatnonzero(keep).astype(np.int64)
        if kpos.size < S and remove_padded:
            ks = np.ascontiguousarray(ks[keep])
            v64 = np.ascontiguousarray(v64[keep])
    return single, G, L, E, S, Ev, qs, ks, v64, kpos


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
    """``out = num[:, :Ev] / den`` (den: ``num[:, Ev]`` if not given); rows with
    ``den <= 0`` get 0. Returns ``(out, den)``."""
    if den is None:
        den = num[:, Ev]
    ok = den > 0
    if ok.all():
        return np.divide(num[:, :Ev], den[:, None]), den
    out = np.zeros((num.shape[0], Ev))
    out[ok] = num[ok, :Ev] / den[ok, None]
    return out, den


def _shaped(num, den, G, L, Ev, single):
    """:func:`_finish`, then (G, L, ·) — or (L, ·) for a single head."""
    out, den = _finish(num, Ev, den)
    out, den = out.reshape(G, L, Ev), den.reshape(G, L)
    return (out[0], den[0]) if single else (out, den)


def _check_state(state, m, Ev, what):
    """``state`` as a pair of float64 arrays of shapes (m, Ev) and (m,)."""
    try:
        S0, s0 = state
    except (TypeError, ValueError):
        raise ValueError(f"{what}: initial_state must be a pair (S, s), got "
                         f"{type(state).__name__}") from None
    S0 = np.asarray(S0, dtype=np.float64)
    s0 = np.asarray(s0, dtype=np.float64)
    if S0.shape != (m, Ev) or s0.shape != (m,):
        raise ValueError(f"{what}: initial_state shapes {S0.shape}, {s0.shape} do not match "
                         f"the {m} features and {Ev} value columns: expected ({m}, {Ev}) "
                         f"and ({m},)")
    return S0, s0


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


# ------------------------------------------------------------------ drivers
def _key_states(ks, v, F, nw, kpos=None, dec=None, ref=0):
    """Key-side state ``S = Σ_j w_j ψ(k_j) v_jᵀ`` (m, Ev) and ``s = Σ_j w_j ψ(k_j)`` (m,),
    ``w_j = 1``, or with a decay ``w_j = dec[ref − kpos[j]]``.

    The keys are split into tasks by the sizes only, each with a private state; the
    states are added in task order, so the sum is the same for any number of threads.
    """
    nk, Ev = v.shape
    m = F.m
    cf = gemm_chunk(m)
    kt = np.ascontiguousarray(ks.T)
    dec = _NO_DEC if dec is None else dec
    kpos = _NO_POS if kpos is None else kpos
    tasks = _ranges(0, nk, _state_tasks(m, Ev + 1, -(-nk // cf)))
    S_t = np.zeros((max(1, len(tasks)), m, Ev))
    s_t = np.zeros((max(1, len(tasks)), m))
    with parallel(nw):
        _par_task_keys(_task_keys, kt, v, kpos, dec, ref, task_array(tasks), cf, *F.keys(),
                       S_t, s_t)
    S, s = S_t[0], s_t[0]
    for i in range(1, len(tasks)):
        S += S_t[i]
        s += s_t[i]
    return S, s


def _query_apply(qs, S, s, F, nw, num=None, den=None, r0=0, r1=None, cf=None):
    """``num[r] = φ(q_r)ᵀ S``, ``den[r] = φ(q_r)ᵀ s`` for rows r0 <= r < r1 (all).

    Rows are independent; they are split into tasks of whole feature blocks of ``cf``
    rows (default :func:`gemm_chunk`) by the sizes only (:func:`_row_blocks`), so every
    row meets the same feature block and GEMM for any ``workers``. (A row's result can
    depend on its block: BLAS takes other kernels for a few rows, and the vectorised
    feature loops a scalar remainder.)
    """
    nq = qs.shape[0]
    r1 = nq if r1 is None else r1
    cf = gemm_chunk(F.m) if cf is None else cf
    num = np.empty((nq, S.shape[1])) if num is None else num
    den = np.empty(nq) if den is None else den
    if r1 <= r0:
        return num, den
    qt = np.ascontiguousarray(qs.T)
    with parallel(resolve_workers(nw)):
        _par_task_queries(_task_queries, qt, S, s, task_array(_row_blocks(r0, r1, cf)), cf,
                          *F.queries(), num, den)
    return num, den


def _scan(qs, ks, v, lim, F, nw, c, kpos=None, dec=None, state=None):
    """Chunked prefix scan of the key-side states, optionally decayed.

    Row r sees the keys ``0 .. lim[r] − 1`` (a prefix of the keys, in position order;
    rows with lim = 0 see none). Without a decay (``dec`` None: the causal prefix) its
    weights are ``p(q'_rᵀk'_j)``; with a decay (``dec[d] = fl(γ^d)``, the causal decay)
    ``dec[x_r − kpos[j]]·p(q'_rᵀk'_j)``, ``x_r = kpos[lim[r] − 1]`` the position of the
    row's last visible key (every weight relative to it: none exceeds 1). Rectangular
    attention at an offset, key padding (padded keys removed, the real keys keeping
    their positions ``kpos``) and the stacked query heads of one key/value head are all
    this form. Rows are ordered by ``lim`` and each key chunk of ``c`` keys serves the
    rows whose last visible key it holds.

    Phases per group of chunks (their states within STATE_BYTES): (1) every chunk's
    key-side state and each task's total, in parallel (:func:`_chunk_states`); (2) an
    exclusive (decayed) scan over the tasks' totals, serial; (3) every task walks its
    chunks in order: query side φ(q_r)ᵀS, the masked intra-chunk polynomial for its rows
    (:func:`_horner_block`), then the state update, in parallel
    (:func:`_scan_queries`). Rows that see every key, when more than a chunk of them,
    are served after the last group from the total state, in parallel, in whole blocks
    of ``min(gemm_chunk(m), c)`` rows.

    ``state``: ``(S₀, s₀)`` of keys before key 0 that every row sees; without a decay
    added to every row, with a decay referenced at position −1 (row r gets
    ``dec[x_r + 1]·φ(q_r)ᵀS₀``; rows that see no key of the block get ``φ(q_r)ᵀS₀``,
    i.e. their weights are relative to position −1). ``dec`` then needs entries up to
    ``kpos[-1] + 1``.

    Returns ``(num, den, S, s)``: (nq, Ev), (nq,) in the rows' given order, and the
    final state of every key and ``state`` (with a decay referenced at ``kpos[-1]``;
    at −1 when there is no key).

    Accuracy: each weight sum is still ``Σ_j w_rj p(q'_rᵀk'_j)[v_j, 1]`` with p formed in
    float64 from the same features (or by Horner inside a chunk); only the order of the
    additions differs from a running sum (a tree of partial sums: chunk states, task
    totals, the scan). The bound γ_{n+m+2g+2}·Σ|φ_αψ_α| of
    :func:`numbarope.ops._bounds.rounding_term` counts the terms of the sum, not their
    order (Higham 2002, §4.2: any summation order of k terms is within γ_{k−1}); the
    decay's factors are counted by :func:`numbarope.ops._bounds.recurrence_rounding`.
    """
    nk, Ev = v.shape
    nq = qs.shape[0]
    m = F.m
    cf = min(gemm_chunk(m), c)
    nch = -(-nk // c)
    G = _causal_group(m, Ev + 1, nch)
    decayed = dec is not None
    dec = _NO_DEC if dec is None else dec
    kpos = np.arange(nk, dtype=np.int64) if kpos is None else kpos
    lim = np.asarray(lim, dtype=np.int64)
    order = None
    if np.any(lim[1:] < lim[:-1]):
        order = np.argsort(lim, kind="stable")
        lim = lim[order]
        qs = qs[order]
    qs = np.ascontiguousarray(qs)
    xrow = kpos[np.maximum(lim - 1, 0)] if decayed and nk else _NO_POS
    lo = np.zeros(nq, np.int64)
    full0 = int(np.searchsorted(lim, nk, side="left"))     # rows >= full0 see every key
    if nq - full0 <= c:
        full0 = nq                                          # few: served by the last chunk
    chunk_of = (lim[:full0] - 1) // c                       # -1: rows that see no key
    rstart = np.searchsorted(chunk_of, np.arange(nch + 1)).astype(np.int64)
    ends = kpos[np.minimum(np.arange(1, nch + 1) * c, nk) - 1]
    qt = np.ascontiguousarray(qs.T)
    kt = np.ascontiguousarray(ks.T)
    num = np.zeros((nq, Ev))
    den = np.zeros(nq)
    S = np.zeros((m, Ev))                                   # all earlier groups
    s = np.zeros(m)
    init = state is not None
    if init:
        S += state[0]
        s += state[1]
        if rstart[0] > 0:             # rows that see no key of this block: the state only
            _query_apply(qs, S, s, F, nw, num, den, 0, int(rstart[0]), cf)
    states = np.empty((min(G, nch), m, Ev))
    sums = np.empty((min(G, nch), m))
    # work of a chunk: its keys' side (c rows) and its query rows (query side + Horner)
    work = (c + np.diff(rstart)).astype(np.float64)
    with parallel(nw):
        for g0 in range(0, nch, G):
            g1 = min(g0 + G, nch)
            tasks = _ranges(g0, g1, _state_tasks(m, Ev + 1, g1 - g0), work[g0:g1])
            S_t = np.zeros((len(tasks), m, Ev))
            s_t = np.zeros((len(tasks), m))
            _par_chunk_states(_chunk_states, kt, v, kpos, dec, task_array(tasks), g0, c, cf,
                              *F.keys(), states, sums, S_t, s_t)
            for i, (a, b) in enumerate(tasks):            # exclusive scan, in place
                tot, tsum = S_t[i].copy(), s_t[i].copy()
                S_t[i], s_t[i] = S, s                     # decay: referenced at ends[a − 1]
                if decayed and (a > 0 or init):
                    f = dec[ends[b - 1] - (ends[a - 1] if a > 0 else -1)]
                    S *= f
                    s *= f
                S += tot
                s += tsum
            _par_scan_queries(_scan_queries, qs, ks, qt, v, F.pc, lo, lim, xrow, kpos, dec,
                              init, rstart, task_array(tasks), g0, c, cf, *F.queries(),
                              states, sums, S_t, s_t, num, den)
    if full0 < nq:                    # S: every key (decay: referenced at kpos[nk − 1] = x_r)
        _query_apply(qs, S, s, F, nw, num, den, full0, nq, cf)
    if order is not None:
        num[order], den[order] = num.copy(), den.copy()
    return num, den, S, s


# ------------------------------------------------------------------ states
def key_side_state(k, v, scale, coef, *, key_mask=None, workers=None):
    """Key-side state of the separable fast path for a block of keys (gemm, prefix).

    ``S = Σ_j ψ(k'_j) v_jᵀ`` and ``s = Σ_j ψ(k'_j)`` over the real keys, with
    ``k' = √s k`` and ψ the key-side features of ``p(q'ᵀk') = φ(q')ᵀψ(k')``
    (Alman & Song 2025, §4). The states of disjoint key blocks add
    (:func:`add_states`): this is what one long sequence's key blocks send to a tree
    reduction, then ``initial_state=(S, s)`` of :meth:`Gemm.run
    <numbarope.ops.gemm.Gemm.run>` / :meth:`Prefix.run <numbarope.ops.prefix.Prefix.run>`
    serves the query rows.

    Parameters
    ----------
    k : (S, E) ndarray of float64
        Keys, already rotated.
    v : (S, Ev) ndarray of float64
    scale : float
    coef : (g+1,) ndarray of float64
        Monomial coefficients of p ≈ exp.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys take no part.
    workers : int, optional
        Threads (None: :func:`numbarope.get_workers`); the result does not depend on it.

    Returns
    -------
    S : (m, Ev) ndarray of float64
    s : (m,) ndarray of float64
        ``m = C(E+g, g)`` features.
    """
    k = np.asarray(k)
    _, _, _, E, _, _, _, ks, v64, _ = _setup(k[:0], k, v, scale, coef, key_mask)
    return _key_states(ks, v64, _Side(coef, E), resolve_workers(workers))


def add_states(a, b):
    """The state of two disjoint key blocks without a decay: ``(S_a + S_b, s_a + s_b)``."""
    return a[0] + b[0], a[1] + b[1]


@njit(cache=True, nogil=True, fastmath=_FM)
def _add_rows_to_state(st, s0, s1, cb, sparent, svar, sratio, sw0, spost, sweight, A, B,
                       u0, ne, na, nx, fb, yb, Z, T, empty):
    # The backward scans' state update (prefix, decay): rows s0 <= j < s1 of the state
    # side, in blocks of cb, added to Z (m × width): Z[:, e·na + a] += Σ_j feat(x_j)
    # B[j, u0 + e] A[j, a] for the ne units, Z[:, ne·na + a] += Σ_j feat(x_j) A[j, a] for
    # the nx extra columns; features of x from st (E, rows) with the s* tables; fb, yb, T
    # scratch. ``empty``: Z holds nothing yet (the first block is written, not added).
    # Returns the new ``empty``.
    m, width = Z.shape
    for j0 in range(s0, s1, cb):
        j1 = min(j0 + cb, s1)
        n = j1 - j0
        P = fb[:m * n].reshape((m, n))
        Y = yb[:n * width].reshape((n, width))
        _features_block(st, j0, j1, sparent, svar, sratio, sw0, spost, sweight, P, 0)
        for r in range(n):
            j = j0 + r
            y = Y[r]
            aj = A[j]
            for e in range(ne):
                f = B[j, u0 + e]
                base = e * na
                for a in range(na):
                    y[base + a] = f * aj[a]
            base = ne * na
            for a in range(nx):
                y[base + a] = aj[a]
        if empty:
            np.dot(P, Y, Z)
            empty = False
        else:
            np.dot(P, Y, T)
            for a in range(m):
                za = Z[a]
                ta = T[a]
                for e in range(width):
                    za[e] += ta[e]
    return empty
