"""Symmetric monomials: tables, feature maps, symmetric powers of matrices.

Monomials ``x^α`` of E variables with ``|α| <= g`` are listed by degree, then
lexicographically in their sorted index sequence ``a_1 <= ... <= a_k``. Each
monomial of degree k >= 1 has a *parent* (drop the last index) and a *last
variable*, so ``x^α = x^{parent(α)} · x_{var(α)}``: one multiplication per
monomial builds them all. Their count is ``C(E+g, g)``.

``(qᵀk)^k = Σ_{|α|=k} (k!/α!) q^α k^α`` (multinomial theorem), so a polynomial
``p(x) = Σ a_k x^k`` of the logit becomes an inner product of feature vectors
``φ(q)_α = sqrt(|a_k| k!/α!) q^α`` and ``ψ(k)_α = sign(a_k) sqrt(|a_k| k!/α!) k^α``
(Alman & Song 2025, §4, the polynomial method; symmetric monomials rather than
the E^k tensor power).
"""

from functools import lru_cache

import numpy as np
from numba import njit, prange
from scipy.special import comb

from .. import _config
from .._runtime.threads import parallel, prange_loop, resolve_workers, task_array

_FM = set(_config.FASTMATH)

__all__ = ["monomial_table", "n_features", "features", "symmetric_power", "monomial_pairs",
           "pair_weights"]


def n_features(E, g):
    """Number of monomials of E variables of degree <= g: ``C(E+g, g)`` (exact int)."""
    return int(comb(E + g, g, exact=True))


@lru_cache(maxsize=64)
def monomial_table(E, g):
    """Tables of the monomials of E variables up to degree g.

    Returns
    -------
    start : (g+2,) ndarray of int64
        Monomials of degree k occupy ``start[k]:start[k+1]``.
    parent : (m,) ndarray of int64
        Index of ``x^α / x_{var(α)}`` (0 for the constant monomial itself).
    var : (m,) ndarray of int64
        Last (largest) variable of α (0 for the constant).
    multinomial : (m,) ndarray of float64
        ``|α|! / α!`` (1 for the constant).
    """
    starts = [0, 1]
    parent = [np.zeros(1, np.int64)]
    var = [np.zeros(1, np.int64)]
    multi = [np.ones(1)]
    last = np.zeros(1, np.int64)
    run = np.zeros(1, np.int64)
    for d in range(g):
        lo = starts[-2]
        counts = E - last                       # children b = last .. E-1
        par = np.repeat(np.arange(lo, lo + last.size), counts)
        off = np.arange(par.size) - np.repeat(np.cumsum(counts) - counts, counts)
        v = np.repeat(last, counts) + off
        prun = np.repeat(run, counts)
        same = (v == np.repeat(last, counts)) & (d > 0)
        crun = np.where(same, prun + 1, 1)
        cm = np.repeat(multi[-1], counts) * (d + 1) / crun
        parent.append(par)
        var.append(v)
        multi.append(cm)
        last, run = v, crun
        starts.append(starts[-1] + v.size)
    out = (np.array(starts, np.int64), np.concatenate(parent), np.concatenate(var),
           np.concatenate(multi))
    for a in out:
        a.setflags(write=False)
    return out


@njit(cache=True, nogil=True, fastmath=_FM)
def _features_block(xt, r0, r1, parent, var, ratio, w0, post, weight, out, o0):
    # Feature-major: out[idx, o0 + r − r0] for rows r0 <= r < r1 of xt (E, rows). The
    # inner loops run over contiguous 1-d views (they vectorise; 2-d indexing in the
    # inner loop was 4x slower); the weights ride along the recurrence:
    # out[idx] = out[parent] · x[var] · ratio[idx], ratio = weight[idx] / weight[parent]
    # (one pass). ``post``: unit weights were used (a zero weight cuts the chain),
    # scale each row by ``weight`` afterwards. Serial and nogil: callers run it on
    # threads, each on its own columns of ``out``.
    m = parent.shape[0]
    w = r1 - r0
    dst = out[0, o0:o0 + w]
    for r in range(w):
        dst[r] = w0
    for idx in range(1, m):
        f = ratio[idx]
        dst = out[idx, o0:o0 + w]
        src = out[parent[idx], o0:o0 + w]
        xv = xt[var[idx], r0:r1]
        for r in range(w):
            dst[r] = src[r] * xv[r] * f
    if post:
        for idx in range(m):
            f = weight[idx]
            dst = out[idx, o0:o0 + w]
            for r in range(w):
                dst[r] *= f


@njit(cache=True, nogil=True, fastmath=_FM)
def _features_reduce(xt, r0, r1, parent, var, ratio, w0, post, weight, out, mode, s, d):
    # _features_block into out (m, r1 − r0) fused with one reduction, while the values
    # are in registers: mode 1: s[α] += Σ_r out[α, r] (key side: ψ(K)ᵀ1);
    # mode 2: d[r] += Σ_α out[α, r]·s[α] (query side: φ(Q)s). Rows with ``post``
    # (unit-weight recurrence, scaled afterwards) reduce in a second pass.
    m = parent.shape[0]
    w = r1 - r0
    if post:
        _features_block(xt, r0, r1, parent, var, ratio, w0, post, weight, out, 0)
        for idx in range(m):
            row = out[idx, :w]
            if mode == 1:
                acc = 0.0
                for r in range(w):
                    acc += row[r]
                s[idx] += acc
            else:
                f = s[idx]
                for r in range(w):
                    d[r] += row[r] * f
        return
    dst = out[0, :w]
    for r in range(w):
        dst[r] = w0
    if mode == 1:
        s[0] += w0 * w
    else:
        f = w0 * s[0]
        for r in range(w):
            d[r] += f
    for idx in range(1, m):
        f = ratio[idx]
        dst = out[idx, :w]
        src = out[parent[idx], :w]
        xv = xt[var[idx], r0:r1]
        if mode == 1:
            acc = 0.0
            for r in range(w):
                val = src[r] * xv[r] * f
                dst[r] = val
                acc += val
            s[idx] += acc
        else:
            sa = s[idx]
            for r in range(w):
                val = src[r] * xv[r] * f
                dst[r] = val
                d[r] += val * sa


def feature_recurrence(weight, parent):
    """Arguments ``(ratio, w0, post)`` of :func:`_features_block` for these weights."""
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    wpar = weight[parent]
    if np.all(wpar[1:] != 0.0):
        ratio = np.zeros_like(weight)
        ratio[1:] = weight[1:] / wpar[1:]
        return ratio, float(weight[0]), False
    return np.ones_like(weight), 1.0, True


def _row_tasks(rows, least=256):
    """Balanced ranges of rows (at most ``_config.MAX_TASKS``, each >= ``least`` rows),
    by the sizes only: a row meets the same vectorised block for any ``workers``."""
    k = max(1, min(_config.MAX_TASKS, rows // max(1, least)))
    bounds = np.linspace(0, rows, k + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def features(x, E, g, weight, out=None, workers=None):
    """Weighted monomial features ``weight[α] · x^α`` of the rows of x, feature-major.

    Parameters
    ----------
    x : (rows, E) ndarray of float64
    weight : (m,) ndarray of float64, m = C(E+g, g)
    out : (m, rows) ndarray of float64, C-contiguous, optional
    workers : int, optional
        Threads (scipy.fft's meaning; None: :func:`numbarope.get_workers`).
        The result does not depend on it.

    Returns
    -------
    (m, rows) ndarray of float64
        ``out[α, r] = weight[α] · x[r]^α`` (the transpose of the usual feature
        matrix: contiguous along rows, so that the recurrence vectorises).
    """
    start, parent, var, _ = monomial_table(E, g)
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    if out is None:
        out = np.empty((parent.shape[0], x.shape[0]))
    rows = x.shape[0]
    if rows:
        xt = np.ascontiguousarray(np.asarray(x, dtype=np.float64).T)
        ratio, w0, post = feature_recurrence(weight, parent)

        with parallel(resolve_workers(workers)):
            _par_features(_features_block, xt, task_array(_row_tasks(rows)), parent, var,
                          ratio, w0, post, weight, out)
    return out


@prange_loop(lambda xt, tasks, *rest: (xt, 0, 0, *rest, 0))
def _par_features(fn, xt, tasks, parent, var, ratio, w0, post, weight, out):
    for i in prange(tasks.shape[0]):
        fn(xt, tasks[i, 0], tasks[i, 1], parent, var, ratio, w0, post, weight, out,
           tasks[i, 0])


def feature_weights(coef, E, g):
    """Weights of φ and ψ for a polynomial with monomial coefficients ``coef``.

    Returns ``(wphi, wpsi)``, each (m,) float64, with
    ``wphi = sqrt(|a_k| k!/α!)`` and ``wpsi = sign(a_k) · wphi``, so that
    ``φ(q)ᵀψ(k) = Σ_k a_k (qᵀk)^k``.
    """
    start, _, _, multi = monomial_table(E, g)
    deg = np.repeat(np.arange(g + 1), np.diff(start))
    a = np.asarray(coef, dtype=np.float64)[deg]
    wphi = np.sqrt(np.abs(a) * multi)
    return wphi, np.sign(a) * wphi


@lru_cache(maxsize=64)
def _mul_table(E, d):
    """``mul[β, e]``: within-degree index of ``x^β · x_e`` (β of degree d)."""
    start, parent, var, _ = monomial_table(E, d + 1)
    lo, hi = start[d + 1], start[d + 2]
    seqs = _sequences(E, d + 1)
    index = {s: i for i, s in enumerate(seqs[lo:hi])}
    mul = np.empty((start[d + 1] - start[d], E), np.int64)
    for i, s in enumerate(seqs[start[d]:start[d + 1]]):
        for e in range(E):
            mul[i, e] = index[tuple(sorted(s + (e,)))]
    return mul


@lru_cache(maxsize=16)
def _sequences(E, g):
    """Sorted index tuples of all monomials up to degree g, in table order."""
    start, parent, var, _ = monomial_table(E, g)
    seqs = [()]
    for idx in range(1, parent.size):
        seqs.append(seqs[parent[idx]] + (int(var[idx]),))
    return seqs


@njit(cache=True, nogil=True)
def _sympow_step(W, Pprev, par_local, var_local, mul, t0, t1, out):
    # out[t, α, :] = coefficients (degree-k basis) of P_{parent(α)} · ℓ_{var(α)},
    # ℓ_a(k) = Σ_e W[t, a, e] k_e, for t0 <= t < t1 (each task owns its t range).
    E = W.shape[1]
    mk = par_local.shape[0]
    mprev = Pprev.shape[2]
    for t in range(t0, t1):
        for a in range(mk):
            for c in range(out.shape[2]):
                out[t, a, c] = 0.0
            pa = par_local[a]
            row = var_local[a]
            for bprev in range(mprev):
                cf = Pprev[t, pa, bprev]
                if cf != 0.0:
                    for e in range(E):
                        out[t, a, mul[bprev, e]] += cf * W[t, row, e]


@prange_loop(lambda W, Pprev, par_local, var_local, mul, tasks, out:
             (W, Pprev, par_local, var_local, mul, 0, 0, out))
def _par_sympow_step(fn, W, Pprev, par_local, var_local, mul, tasks, out):
    for i in prange(tasks.shape[0]):
        fn(W, Pprev, par_local, var_local, mul, tasks[i, 0], tasks[i, 1], out)


def symmetric_power(W, k, workers=None):
    """Symmetric power ``M_k(W_t)`` of a stack of matrices in the monomial basis.

    ``(qᵀ W k)^k = Σ_{|α|=|β|=k} q^α M_k(W)[α, β] k^β``, with
    ``M_k(W)[α, β] = (k!/α!) · [k^β] Π_r ℓ_{a_r}(k)``, ``ℓ_a(k) = Σ_e W[a, e] k_e``
    (Alman & Song 2025, §5: the tensor trick for general W_{i−j}, here grouped by
    monomials). Built by expanding products of linear forms along the monomial
    tree, in parallel over the stack (``workers`` threads).

    Parameters
    ----------
    W : (T, E, E) ndarray of float64
    k : int >= 0
    workers : int, optional
        Threads (scipy.fft's meaning); the result does not depend on it.

    Returns
    -------
    (T, m_k, m_k) ndarray of float64, m_k = C(E+k−1, k)
    """
    W = np.ascontiguousarray(W, dtype=np.float64)
    T, E, _ = W.shape
    P = np.ones((T, 1, 1))
    if k == 0:
        return P
    start, parent, var, multi = monomial_table(E, k)
    nw = resolve_workers(workers)
    tasks = task_array(_row_tasks(T, least=16))
    for d in range(1, k + 1):
        lo, hi = start[d], start[d + 1]
        par_local = np.ascontiguousarray(parent[lo:hi] - start[d - 1])
        var_local = np.ascontiguousarray(var[lo:hi])
        mul = _mul_table(E, d - 1)
        out = np.empty((T, hi - lo, hi - lo))
        with parallel(nw):
            _par_sympow_step(_sympow_step, W, P, par_local, var_local, mul, tasks, out)
        P = out
    P *= multi[start[k]:start[k + 1]][None, :, None]
    return P


@lru_cache(maxsize=32)
def monomial_pairs(E, g):
    """Monomials of degree <= g+1 and the pairs undoing ``x^β = x^α · x_e``.

    Returns ``(M1, parent, var, ptr, pe, pa)``: the ``M1 = C(E+g+1, g+1)`` monomials in
    :func:`monomial_table` order (its first ``C(E+g, g)`` are
    the features' monomials), their parent and last variable (``x^β = x^parent(β) ·
    x_var(β)``), and for every β the pairs ``(pe[p], pa[p])``, ``ptr[β] <= p <
    ptr[β+1]``: the coordinates e with ``β_e >= 1`` and ``α = β − e_e`` (each pair
    (α, e) with |α| <= g exactly once)."""
    start, parent, var, _ = monomial_table(E, g + 1)
    beta, es, als = [], [], []
    for d in range(g + 1):
        mul = _mul_table(E, d)                       # (m_d, E): index in degree d+1
        a = np.arange(mul.shape[0])
        beta.append((start[d + 1] + mul).ravel())
        es.append(np.tile(np.arange(E), a.size))
        als.append(np.repeat(start[d] + a, E))
    beta = np.concatenate(beta)
    order = np.argsort(beta, kind="stable")
    M1 = int(start[-1])
    ptr = np.zeros(M1 + 1, np.int64)
    np.add.at(ptr, beta + 1, 1)
    ptr = np.cumsum(ptr)
    out = (M1, np.ascontiguousarray(parent, dtype=np.int64),
           np.ascontiguousarray(var, dtype=np.int64), ptr,
           np.concatenate(es)[order].astype(np.int64),
           np.concatenate(als)[order].astype(np.int64))
    for x in out[1:]:
        x.setflags(write=False)
    return out


def pair_weights(coef, E, g):
    """``c_α = a_|α|·|α|!/α!`` (= wphi_α·wpsi_α of :func:`feature_weights`) for the
    ``C(E+g, g)`` monomials of degree <= g."""
    start, _, _, multi = monomial_table(E, g)
    deg = np.repeat(np.arange(g + 1), np.diff(start))
    return np.asarray(coef, dtype=np.float64)[deg] * multi
