"""The exact path ("streaming"): blocked online softmax on BLAS, never an n×n matrix.

Its kernels, its per-row bias shift, its visited pairs, cost and memory, its
certified error bound (:func:`exact_error_bound`) and its registry entry
(:class:`Streaming`, which serves every structure) live in this one file.

The work is cut into tasks, one per (head, block of ``_config.EXACT_ROW_BLOCK``
query rows; blocks from the sizes only, :func:`exact_blocks`), the iterations of a
thin ``prange`` loop (:func:`_par_exact`, numba's threading layer, ``workers``
threads: :mod:`numbarope._runtime.threads`), each a serial numba kernel. Query row i of head b sees
at most the keys ``lo_i <= j < hi_i`` of its range row (``key_ranges``: the causal
mask, a window, chunked local attention, packed sequences; all keys without).
A task walks the key blocks (``_config.EXACT_KEY_BLOCK`` keys, aligned) from
``min lo`` to ``max hi`` over its rows (whole key blocks outside are skipped),
masks per row inside a block, and keeps, per row, the running maximum ``m``,
denominator ``l`` and numerator ``acc`` (Milakov & Gimelshein 2018, "Online
normalizer calculation for softmax"; Dao et al. 2022, FlashAttention, Alg. 1):

    S = s·Q_b K_bᵀ + b − rowshift          (one GEMM; bias and mask in one pass)
    m' = max(m, rowmax S);  P = exp(S − m')  (vectorised exp, see below)
    l = l·e^{m−m'} + rowsum P;  acc = acc·e^{m−m'} + P·V_b   (one GEMM)

and finally ``out = acc / l`` and the row log-sum-exp ``lse = m + log l``.

* **GEMMs** ``Q_b K_bᵀ`` and ``P V_b`` go to BLAS (numba's ``np.dot``), one BLAS
  thread per task; the threads of numbarope are the tasks.
* **exp** is the proven vectorised kernel of :mod:`numbarope.ops._exp`
  (``_exp_block``): relative error at most ``EXP_ULPS[dtype]`` units of
  roundoff; arguments below ``EXP_FLUSH[dtype]`` (weights below e^−708 in
  float64, e^−87 in float32, relative to the row's running maximum) give
  exactly 0: they would be subnormal, cost ~50× more in arithmetic, and change a
  sum of >= 1 by less than ``n·e^{EXP_FLUSH}`` (in :func:`exact_error_bound`).
* **Maximum pass skipped** where a Cauchy–Schwarz bound ``s‖q_i‖·max‖k_j‖``
  keeps the key block within ``EXACT_HEADROOM`` of the running maximum (the
  weights are then at most e^headroom: no overflow), which is most blocks of
  ordinary inputs.
* **Bias** ``b_t`` (Toeplitz, float64) enters as ``b_t − shift_i`` with
  ``shift_i`` the largest bias over the real keys row i sees
  (:func:`bias_row_shift`): biases of any finite magnitude cost no accuracy.
* **Precision**: the logits, ``exp`` and the ``P V`` product run in the compute
  dtype (float32 or float64); ``m``, ``l``, ``acc`` and the bias are float64.
* **General** ``W_t`` (``relative``): the logits ``q_iᵀ W_{i−j} k_j`` are
  per-pair bilinear forms, O(E²) each (no GEMM applies), computed for the keys
  in the row's range only; the rest is the same.

Fully masked rows (every logit ``-inf``, or an empty range) return 0, as torch
>= 2.5 does, with ``lse = -inf``. Memory: O(B·n·(E + Ev)) plus one row block ×
key block per thread.
"""

import math

import functools
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .. import _config
from .._runtime.threads import parallel, prange_loop, resolve_workers
from ._cost import COST_CONSTANTS
from ._exp import EXP_FLUSH, EXP_ULPS, _exp_block
from .registry import Algorithm, HeadSpec, register

__all__ = ["exact_attention", "exact_backward", "row_norms", "bias_row_shift", "exact_blocks",
           "gather_key_ranges", "visible_pairs", "visited_pairs", "pairs_visited",
           "exact_error_bound",
           "predict_exact", "exact_memory", "EXACT_HEADROOM", "Streaming"]

_FM = set(_config.FASTMATH)

#: A key block whose logits are bounded (Cauchy–Schwarz) by the running maximum
#: plus this much needs no maximum pass: its weights are at most e^headroom.
#: It enters the rounding bound as 3u·headroom (:func:`exact_error_bound`).
EXACT_HEADROOM = {np.dtype(np.float64): 60.0, np.dtype(np.float32): 30.0}


@njit(cache=True, nogil=True, fastmath=_FM)
def _online_update(row, n, bm, r, mx, den, acc):
    # one key block's logits row[:n] (bm: their maximum over the keys the row sees)
    # into row r's online softmax: (mx, den, acc) rescaled to the new maximum,
    # row[:n] = exp(row − max), den += their sum. False (row zeroed) while the row has
    # seen no key. Shared by the main kernel and the decoding kernel.
    mnew = max(mx[r], bm)
    if mnew == -np.inf:
        for jj in range(n):
            row[jj] = 0.0
        return False
    if mnew > mx[r]:
        corr = np.exp(mx[r] - mnew)
        if corr < 1e-308:
            corr = 0.0
        den[r] *= corr
        for c in range(acc.shape[1]):
            acc[r, c] *= corr
        mx[r] = mnew
    den[r] += _exp_block(row, n, mx[r])
    return True


# ------------------------------------------------------------------ the kernel

@njit(cache=True, nogil=True, fastmath=_FM)
def _exact_tasks(q, k, v, relative, ridx, general, bias, bidx, has_bias, rowshift, sidx,
                 gscale, row_block, key_block, qnorm, knorm, headroom,
                 kmask, kidx, has_kmask, kvidx, lo, hi, lidx, has_ranges, softcap, tasks,
                 out, lse):
    # q arrives multiplied by the scale s, except with general W (then gscale = s;
    # with no general W and a bias, gscale = 1). Row i of head b sees at most the keys
    # lo[lidx[b], i] <= j < hi[lidx[b], i] (all keys without ranges); the bias and W
    # of the pair (i, j) are stored at i - j + nk - 1. softcap > 0: the logits
    # (before the bias) are soft-capped, c·tanh(x/c) (then headroom = −inf).
    B, n, E = q.shape            # n query rows
    nk = k.shape[1]              # keys 0 .. nk-1
    Ev = v.shape[2]
    dt = q.dtype
    Sbuf = np.empty(row_block * key_block, dt)
    acc = np.empty((row_block, Ev))
    PV = np.empty(row_block * Ev, dt)
    mx = np.empty(row_block)
    den = np.empty(row_block)
    wq = np.empty(E)
    for ti in range(tasks.shape[0]):
        b = tasks[ti, 0]
        hk = kvidx[b]            # key/value head of query head b (GQA)
        i0 = tasks[ti, 1]
        i1 = min(i0 + row_block, n)
        rb = i1 - i0
        acc[:rb] = 0.0
        mx[:rb] = -np.inf
        den[:rb] = 0.0
        lr = lidx[b]
        jbeg = 0
        jend = nk
        if has_ranges:          # key blocks from min lo to max hi over the block's rows
            jbeg = nk           # (none when no row sees a key)
            jend = 0
            sees = False
            for i in range(i0, i1):
                jbeg = min(jbeg, lo[lr, i])
                jend = max(jend, hi[lr, i])
                sees = sees or hi[lr, i] > lo[lr, i]
            jbeg -= jbeg % key_block
            if not sees:
                jend = jbeg
        for j0 in range(jbeg, jend, key_block):
            j1 = min(j0 + key_block, jend)
            kb = j1 - j0
            S = Sbuf[:rb * kb].reshape((rb, kb))
            if general:
                for r in range(rb):
                    i = i0 + r
                    ja = 0
                    jb = kb
                    if has_ranges:
                        ja = min(max(lo[lr, i] - j0, 0), kb)
                        jb = max(min(hi[lr, i] - j0, kb), ja)
                    for j in range(j0 + ja, j0 + jb):
                        W = relative[ridx[b], i - j + nk - 1]
                        for c in range(E):
                            wq[c] = 0.0
                        for a in range(E):
                            qa = q[b, i, a]
                            for c in range(E):
                                wq[c] += qa * W[a, c]
                        s = 0.0
                        for c in range(E):
                            s += wq[c] * k[hk, j, c]
                        S[r, j - j0] = s
            else:
                np.dot(q[b, i0:i1], k[hk, j0:j1].T, S)
            # scale (general W), bias (float64), key ranges and padding, row maxima
            kbound = knorm[hk, j0 // key_block]
            for r in range(rb):
                i = i0 + r
                row = S[r]
                ja = 0                  # the row's keys in this block: ja <= jj < jb
                jb = kb
                if has_ranges:
                    ja = min(max(lo[lr, i] - j0, 0), kb)
                    jb = max(min(hi[lr, i] - j0, kb), ja)
                # Cauchy–Schwarz: logits of this block <= ‖q_i‖·max‖k_j‖ (+ shifted
                # bias <= 0). Within `headroom` of the running maximum no new maximum
                # is needed: weights e^{x−m} <= e^headroom cannot overflow.
                skip_max = (not general) and qnorm[b, i] * kbound <= mx[r] + headroom
                gs = gscale
                if softcap > 0.0:       # logit soft-capping (Gemma 2): c·tanh(s·qᵀk / c)
                    for jj in range(ja, jb):
                        row[jj] = softcap * np.tanh(row[jj] * gscale / softcap)
                    gs = 1.0
                bm = -np.inf
                for jj in range(ja):
                    row[jj] = -np.inf
                if has_kmask:               # key padding: 0 / -inf per key
                    km = kmask[kidx[b]]
                    for jj in range(ja, jb):
                        row[jj] += km[j0 + jj]
                if has_bias:
                    bb = bias[bidx[b]]
                    sh = rowshift[sidx[b], i]
                    off = i + nk - 1 - j0
                    for jj in range(ja, jb):
                        x = row[jj] * gs + (bb[off - jj] - sh)
                        row[jj] = x
                        bm = x if x > bm else bm
                elif general:
                    for jj in range(ja, jb):
                        x = row[jj] * gs
                        row[jj] = x
                        bm = x if x > bm else bm
                elif not skip_max:          # q was scaled: the GEMM gave the logits
                    for jj in range(ja, jb):
                        x = row[jj]
                        bm = x if x > bm else bm
                for jj in range(jb, kb):
                    row[jj] = -np.inf
                _online_update(row, kb, bm, r, mx, den, acc)
            P = PV[:rb * Ev].reshape((rb, Ev))
            if Ev > 0:
                np.dot(S, v[hk, j0:j1], P)
            for r in range(rb):
                for c in range(Ev):
                    acc[r, c] += P[r, c]
        for r in range(rb):
            if den[r] > 0.0:
                inv = 1.0 / den[r]
                for c in range(Ev):
                    out[b, i0 + r, c] = acc[r, c] * inv
                lse[b, i0 + r] = mx[r] + np.log(den[r])
            else:
                for c in range(Ev):
                    out[b, i0 + r, c] = 0.0
                lse[b, i0 + r] = -np.inf


@prange_loop(lambda *a: a[:26] + (a[26][a[27][0]:a[27][1]],) + a[28:])
def _par_exact(fn, q, k, v, relative, ridx, general, bias, bidx, has_bias, rowshift, sidx,
               gscale, row_block, key_block, qnorm, knorm, headroom, kmask, kidx, has_kmask,
               kvidx, lo, hi, lidx, has_ranges, softcap, tasks, starts, out, lse):
    # the parallel loop of the exact path: one iteration per group of tasks
    # tasks[starts[g]:starts[g+1]] (each task writes its own rows of out, lse)
    for g in prange(starts.shape[0] - 1):
        fn(q, k, v, relative, ridx, general, bias, bidx, has_bias, rowshift, sidx, gscale,
           row_block, key_block, qnorm, knorm, headroom, kmask, kidx, has_kmask, kvidx, lo, hi,
           lidx, has_ranges, softcap, tasks[starts[g]:starts[g + 1]], out, lse)


_DUMMY_REL = np.zeros((1, 1, 1, 1))
_DUMMY_BIAS = np.zeros((1, 1))
_DUMMY_RANGE = np.zeros((1, 1), np.int64)


# ------------------------------------------------------------------ per-row bias shift

@njit(cache=True, nogil=True)
def _window_max(b, lo, hi):
    # max of b[lo_i .. hi_i] (inclusive; -inf when empty) for nondecreasing lo, hi:
    # a monotone deque, O(len(b) + len(lo))
    out = np.full(lo.size, -np.inf)
    dq = np.empty(b.size, np.int64)
    head = 0
    tail = 0
    nxt = 0
    for i in range(lo.size):
        while nxt <= hi[i] and nxt < b.size:
            while tail > head and b[dq[tail - 1]] <= b[nxt]:
                tail -= 1
            dq[tail] = nxt
            tail += 1
            nxt += 1
        while tail > head and dq[head] < lo[i]:
            head += 1
        if tail > head and lo[i] <= hi[i]:
            out[i] = b[dq[head]]
    return out


@njit(cache=True, nogil=True)
def _max_tree(b):
    # bottom-up segment tree of maxima over b (leaves at P .. P + len(b) - 1)
    P = 1
    while P < b.size:
        P *= 2
    t = np.full(2 * P, -np.inf)
    t[P:P + b.size] = b
    for i in range(P - 1, 0, -1):
        x = t[2 * i]
        y = t[2 * i + 1]
        t[i] = x if x > y else y
    return t, P


@njit(cache=True, nogil=True)
def _tree_max(t, P, l, r):
    # max of b[l .. r] (inclusive, l <= r) from its segment tree: O(log len(b))
    res = -np.inf
    l += P
    r += P + 1
    while l < r:
        if l & 1:
            x = t[l]
            res = x if x > res else res
            l += 1
        if r & 1:
            r -= 1
            x = t[r]
            res = x if x > res else res
        l >>= 1
        r >>= 1
    return res


@njit(cache=True, nogil=True)
def _first_run_after(ends, x):
    # index of the first run whose end exceeds x (ends increasing): binary search
    a = 0
    c = ends.size
    while a < c:
        mid = (a + c) // 2
        if ends[mid] <= x:
            a = mid + 1
        else:
            c = mid
    return a


#: Ways of :func:`_range_row_max`.
_DEQUE, _TREE, _PROBE = 0, 1, 2
#: Offsets a row probes, in decreasing order of bias, before it walks its runs.
_PROBES = 32


@njit(cache=True, nogil=True)
def _range_row_max(b, runs, lo, hi, S, mode):
    # max over the real keys j (runs [a, c) of real keys) with lo_i <= j < hi_i of
    # b[i - j + S - 1], per row i; -inf where there is none. For one run the offsets
    # e = i - j + S - 1 form the interval [i - min(c, hi_i) + S, i - max(a, lo_i) + S - 1].
    # _DEQUE: both ends of it are nondecreasing in i (lo and hi rise by at most 1 per
    # row): one monotone-deque window maximum per run, O(runs · (n + S)).
    # _TREE: a segment tree over b, O(log) per (row, run) pair that meets, or a direct
    # scan of the pair's few offsets.
    # _PROBE (many runs): the offsets in decreasing order of bias; a row takes the first
    # whose key it sees (its maximum), after _PROBES misses it walks its runs (_TREE).
    n = lo.size
    out = np.full(n, -np.inf)
    R = runs.shape[0]
    if mode == _DEQUE:
        el = np.empty(n, np.int64)
        er = np.empty(n, np.int64)
        for r in range(R):
            a = runs[r, 0]
            c = runs[r, 1]
            for i in range(n):
                el[i] = i - min(c, hi[i]) + S
                er[i] = i - max(a, lo[i]) + S - 1
            m = _window_max(b, el, er)
            for i in range(n):
                if m[i] > out[i]:
                    out[i] = m[i]
        return out
    t, P = _max_tree(b)
    ends = runs[:, 1].copy()
    order = np.empty(0, np.int64)
    real = np.zeros(S, np.bool_)
    if mode == _PROBE:
        order = np.argsort(-b, kind="mergesort")
        for r in range(R):
            real[runs[r, 0]:runs[r, 1]] = True
    for i in range(n):
        li = lo[i]
        hii = hi[i]
        if hii <= li:
            continue
        if mode == _PROBE:
            found = False
            for p in range(min(_PROBES, order.size)):
                e = order[p]
                if b[e] == -np.inf:          # no finite bias left: none visible
                    found = True
                    break
                j = i - e + S - 1
                if li <= j < hii and real[j]:
                    out[i] = b[e]
                    found = True
                    break
            if found:
                continue
        best = -np.inf
        r = _first_run_after(ends, li)
        while r < R and runs[r, 0] < hii:
            x0 = max(runs[r, 0], li)
            x1 = min(runs[r, 1], hii)
            e0 = i - x1 + S
            e1 = i - x0 + S - 1
            if e1 - e0 < 32:
                for e in range(e0, e1 + 1):
                    if b[e] > best:
                        best = b[e]
            else:
                x = _tree_max(t, P, e0, e1)
                if x > best:
                    best = x
            r += 1
        out[i] = best
    return out


def _key_runs(real):
    """(runs, 2) int64: the maximal runs [a, c) of True in a boolean vector."""
    d = np.diff(np.concatenate([[0], real.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(d == 1), np.flatnonzero(d == -1)], axis=1).astype(np.int64)


def _shift_mode(runs, lo, hi, S):
    """The cheapest way of :func:`_range_row_max` by operation counts: the deque
    (monotone ranges only), the tree, or probing (many runs per row)."""
    n = lo.size
    nonempty = hi > lo
    meets = float(np.maximum(
        np.searchsorted(runs[:, 0], hi[nonempty], side="left")
        - np.searchsorted(runs[:, 1], lo[nonempty], side="right"), 0).sum())
    log = math.log2(n + S + 1)
    tree = 2 * (n + S) + 2 * meets * log
    probe = 2 * (n + S) * log + n * _PROBES
    monotone = n <= 1 or (np.diff(lo).max() <= 1 and np.diff(hi).max() <= 1)
    deque = runs.shape[0] * (n + S) if monotone else np.inf
    best = min(deque, tree, probe)
    return _DEQUE if deque == best else _TREE if tree == best else _PROBE


def bias_row_shift(bias, n, n_keys=None, key_range=None, key_mask=None):
    """Largest bias over the keys each query row sees: ``max_{j visible to i} b_{ij}``.

    Softmax is invariant to a constant per row, so the exact kernel adds
    ``b − shift_i`` (<= 0 on the keys row i sees): biases of any finite magnitude
    (``finfo.min`` as a mask, a constant ``-1e30``) then cost no accuracy. Row i
    sees key j when ``lo_i <= j < hi_i`` (``key_range``) and j is a real key
    (``key_mask``); the bias of the pair is ``bias[i − j + S − 1]``. Rows that see no
    finite bias get 0. Taking the maximum over keys a row cannot see would be wrong:
    a padded key, or one outside the row's range, with bias 0 next to visible keys
    at −1e30 would make every visible weight underflow.

    Where ``lo`` and ``hi`` rise by at most 1 from a row to the next (causal,
    windows, no range) the offsets a run of real keys reaches form an interval whose
    ends are nondecreasing in i: a monotone-deque window maximum per run,
    O(runs·(L + S)). Otherwise (chunked local attention, packed sequences, any
    range) a segment tree over the bias: O((L + S) + pairs·log(L + S)) for the
    (row, run) pairs that meet. With many runs (scattered padding) each row first
    probes the offsets in decreasing order of bias and takes the first whose key it
    sees (O((L + S) log(L + S)) for the order, a few probes per row). The cheapest
    by operation counts is taken; all give the same maxima.

    Parameters
    ----------
    bias : (Bb, L + S − 1) ndarray of float64
        One relative bias per row of the result (−inf masks, no NaN or +inf).
    n : int
        Query rows L.
    n_keys : int, optional
        Key rows S (default L).
    key_range : (lo, hi), optional
        Each (L,) int: row i sees at most keys ``lo[i] <= j < hi[i]`` (clipped to
        [0, S]); default every key.
    key_mask : (S,) ndarray of bool, optional
        True = a real key (the same for every row of ``bias``); default all real.

    Returns
    -------
    (Bb, L) ndarray of float64
    """
    S = n if n_keys is None else int(n_keys)
    bias = np.asarray(bias, dtype=np.float64)
    Bb = bias.shape[0]
    shift = np.zeros((Bb, n))
    if n == 0 or S == 0 or Bb == 0:
        return shift
    if key_range is None:
        lo = np.zeros(n, np.int64)
        hi = np.full(n, S, np.int64)
    else:
        lo = np.clip(np.asarray(key_range[0], dtype=np.int64).reshape(n), 0, S)
        hi = np.clip(np.asarray(key_range[1], dtype=np.int64).reshape(n), 0, S)
    if key_mask is None:
        runs = np.array([[0, S]], np.int64)
    else:
        runs = _key_runs(np.asarray(key_mask, dtype=bool).reshape(S))
        if runs.shape[0] == 0:
            return shift
    mode = _shift_mode(runs, lo, hi, S)
    for r in range(Bb):
        m = _range_row_max(np.ascontiguousarray(bias[r]), runs, lo, hi, S, mode)
        ok = np.isfinite(m)
        shift[r, ok] = m[ok]
    return shift


# ------------------------------------------------------------------ helpers

@njit(cache=True, nogil=True, fastmath=_FM)
def _sum_squares(x):
    # (rows,) float64 sums of the squares of each row (inf when they overflow)
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        acc = 0.0
        for e in range(x.shape[1]):
            y = np.float64(x[i, e])
            acc += y * y
        out[i] = acc
    return out


def row_norms(x):
    """Upper bounds of the row norms ‖x[b, i]‖₂ of a (B, n, E) array, as float64.

    The squares are summed in float64 (one pass, no copy of x), then enlarged by
    ``1 + 2(E+1)u`` (u the unit roundoff of x's dtype, >= float64's), which covers
    the rounding of a sum of E squares (Higham 2002, §3.1): the result is never below
    the true norm.
    """
    E = x.shape[-1]
    u = np.finfo(x.dtype).eps / 2
    sq = _sum_squares(x.reshape(-1, E) if x.flags.c_contiguous else
                      np.ascontiguousarray(x).reshape(-1, E)).reshape(x.shape[:-1])
    out = np.sqrt(sq * (1 + 2 * (E + 1) * u))
    bad = ~np.isfinite(out)
    if bad.any():           # the squares overflowed x's dtype: rows scaled by max|x|, float64
        rows = x[bad].astype(np.float64)
        m = np.abs(rows).max(axis=1)
        m = np.where(m > 0, m, 1.0)
        r = rows / m[:, None]
        out[bad] = m * np.sqrt(np.einsum("ke,ke->k", r, r) * (1 + 2 * (E + 2) * 2.0 ** -53))
    return out


def exact_blocks(B, n, n_keys=None):
    """Row and key block sizes of the exact kernel for B heads of length n.

    ``_config.EXACT_ROW_BLOCK`` rows per task (large blocks keep the GEMMs
    efficient), halved down to 32 until one head has at least
    ``_config.EXACT_TASKS`` tasks (so that one long head keeps several threads busy
    and the last tasks balance); ``_config.EXACT_KEY_BLOCK`` keys, fewer when n is
    shorter. From n alone (not B, not the threads): a row's blocks, hence its
    rounding, are the same for any number of threads and any batching of the heads
    (a Dask chunk of heads gives the bits of the whole call).
    """
    rb = int(_config.EXACT_ROW_BLOCK)
    while rb > 32 and -(-n // rb) < _config.EXACT_TASKS:
        rb //= 2
    kb = int(min(_config.EXACT_KEY_BLOCK, max(n if n_keys is None else n_keys, 1)))
    return rb, kb


def _check_ranges(key_ranges, B, n, S):
    """``key_ranges`` as C-contiguous int64 ``(lo, hi, lidx)``, clipped to [0, S]."""
    if len(key_ranges) == 2:
        lo, hi = key_ranges
        lidx = None
    else:
        lo, hi, lidx = key_ranges
    lo = np.atleast_2d(np.asarray(lo, dtype=np.int64))
    hi = np.atleast_2d(np.asarray(hi, dtype=np.int64))
    if lo.ndim != 2 or lo.shape != hi.shape or lo.shape[1] != n:
        raise ValueError(f"key_ranges: lo and hi must have shape (P, {n}), got "
                         f"{lo.shape} and {hi.shape}")
    P = lo.shape[0]
    if lidx is None:
        if P not in (1, B):
            raise ValueError(f"key_ranges: {P} range rows for {B} heads need lidx")
        lidx = np.zeros(B, np.int64) if P == 1 else np.arange(B, dtype=np.int64)
    lidx = np.ascontiguousarray(lidx, dtype=np.int64).reshape(-1)
    if lidx.shape != (B,) or (B and (lidx.min() < 0 or lidx.max() >= P)):
        raise ValueError(f"key_ranges: lidx must be ({B},) indices into {P} range rows")
    return (np.ascontiguousarray(np.clip(lo, 0, S)), np.ascontiguousarray(np.clip(hi, 0, S)),
            lidx)


def gather_key_ranges(ranges, n, S):
    """One ``key_ranges=(lo, hi, lidx)`` argument from per-head ranges.

    Parameters
    ----------
    ranges : sequence of ((L,), (L,)) or None
        Per head, the ``(lo, hi)`` of :meth:`numbarope.bias.Structure.key_ranges`,
        or None (every key).
    n, S : int
        Query rows L and keys S.

    Returns
    -------
    (lo, hi, lidx) or None
        Equal ranges share one row; None when no head has a range.
    """
    if all(r is None for r in ranges):
        return None
    rows, index, lidx = [], {}, np.empty(len(ranges), np.int64)
    for b, r in enumerate(ranges):
        if r is None:
            r = (np.zeros(n, np.int64), np.full(n, S, np.int64))
        lo = np.clip(np.asarray(r[0], dtype=np.int64).reshape(n), 0, S)
        hi = np.clip(np.asarray(r[1], dtype=np.int64).reshape(n), 0, S)
        key = lo.tobytes() + hi.tobytes()
        if key not in index:
            index[key] = len(rows)
            rows.append((lo, hi))
        lidx[b] = index[key]
    return (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), lidx)


def _block_work(lo, hi, n, rb, kb):
    """(P, row blocks) keys each row block of each range row visits, and its rows."""
    starts = np.arange(0, n, rb, dtype=np.int64)
    rows = np.diff(np.append(starts, n))
    mn = np.minimum.reduceat(lo, starts, axis=1)
    mxh = np.maximum.reduceat(hi, starts, axis=1)
    sees = np.maximum.reduceat((hi > lo).astype(np.int8), starts, axis=1) > 0
    jbeg = mn - mn % kb
    return np.where(sees, np.maximum(mxh - jbeg, 0), 0), rows


class _Layout(NamedTuple):
    rb: int
    kb: int
    lo: np.ndarray
    hi: np.ndarray
    li: np.ndarray
    tasks: np.ndarray        # (T, 2) (head, first row), longest first
    inline: bool             # too small for a parallel region
    waves: tuple             # per wave, the group starts (each group one prange iteration)


_layouts: dict = {}


def _layout(B, n, S, cost, key_ranges, nthreads):
    """The exact kernel's blocks, tasks, groups and waves for these sizes (a function of
    the sizes, the ranges and the threads only). Kept for read-only range arrays (the
    fast lane's, reused call after call: the same objects, which cannot change) and
    calls without ranges; computed afresh otherwise."""
    key = None
    if key_ranges is None or all(not getattr(a, "flags", None) or not a.flags.writeable
                                 for a in key_ranges):
        key = (B, n, S, cost, nthreads) + (() if key_ranges is None else
                                          tuple(id(a) for a in key_ranges))
        hit = _layouts.get(key)
        if hit is not None and (key_ranges is None or
                                all(a is b for a, b in zip(hit[0], key_ranges))):
            return hit[1]
    rb, kb = exact_blocks(B, n, S)
    if key_ranges is not None:
        lo, hi, li = _check_ranges(key_ranges, B, n, S)
    else:
        lo = hi = _DUMMY_RANGE
        li = np.zeros(B, np.int64)
    starts = np.arange(0, n, rb, dtype=np.int64)
    tasks = np.stack(np.broadcast_arrays(np.arange(B, dtype=np.int64)[:, None],
                                         starts[None, :]), axis=-1).reshape(-1, 2)
    if key_ranges is not None:   # keys each task visits; longest tasks first: dynamic
        span, rows = _block_work(lo, hi, n, rb, kb)     # scheduling then balances the tail
        work = (span * rows)[li].reshape(-1).astype(np.float64)
        tasks = tasks[np.argsort(-work, kind="stable")]
        total = float(work.sum()) * cost
    else:
        total = float(B) * n * S * cost
    tasks = np.ascontiguousarray(tasks)
    inline = total < _config.INLINE_WORK
    waves = ()
    if not inline and len(tasks):
        # tasks in groups (each group one prange iteration, reusing its buffers: a row
        # does not depend on its group), groups in waves of about WAVE_WORK multiply-adds
        # per thread: between waves Python runs, so Ctrl-C stops a long call
        per_task = total / len(tasks)
        group = max(1, min(int(_config.EXACT_GROUP_WORK // max(per_task, 1)),
                           -(-len(tasks) // (4 * nthreads))))
        gs = np.arange(0, len(tasks) + group, group, dtype=np.int64)
        gs[-1] = len(tasks)
        gs = np.unique(gs)
        wave = max(8 * nthreads, int(_config.WAVE_WORK * nthreads // max(per_task * group, 1)))
        waves = tuple(np.ascontiguousarray(gs[w0:min(w0 + wave, len(gs) - 1) + 1])
                      for w0 in range(0, len(gs) - 1, wave))
    lay = _Layout(rb, kb, lo, hi, li, tasks, inline, waves)
    if key is not None:      # (writable arrays, as the kernels are compiled for; no
        if len(_layouts) >= 64:
            _layouts.pop(next(iter(_layouts)))
        _layouts[key] = (key_ranges, lay)      # caller sees them)
    return lay


def _row_shifts(n, S, bs, bi, km, ki, has_kmask, lo, hi, li, has_ranges):
    """``(shift (P, n), sidx (B,))``: each head's per-row bias shift (the largest bias
    over the keys the row sees: :func:`bias_row_shift`), one row of shifts per (key
    mask row, range row, bias row) triple."""
    trip, sidx = np.unique(np.stack([ki, li, bi], axis=1), axis=0, return_inverse=True)
    sidx = np.ascontiguousarray(sidx.reshape(-1), dtype=np.int64)
    shift = np.empty((trip.shape[0], n))
    pairs_, which = np.unique(trip[:, :2], axis=0, return_inverse=True)
    which = which.reshape(-1)
    for g, (pk, pl) in enumerate(pairs_):
        rows = np.flatnonzero(which == g)
        shift[rows] = bias_row_shift(
            bs[trip[rows, 2]], n, S, (lo[pl], hi[pl]) if has_ranges else None,
            np.isfinite(km[pk]) if has_kmask else None)
    return shift, sidx


# ------------------------------------------------------------------ the entry point

def exact_attention(q, k, v, scale, *, relative=None, ridx=None, bias=None, bidx=None,
                    key_ranges=None, key_mask=None, kidx=None, kvidx=None, norms=None,
                    workers=None, return_lse=False, softcap=None):
    """Exact softmax attention of flattened heads (internal entry point).

    Parameters
    ----------
    q : (B, n, E) ndarray of float32 or float64, C-contiguous
    k : (Bk, S, E) ndarray, same dtype, C-contiguous
        Head ``b`` uses ``k[kvidx[b]]`` (default ``kvidx[b] = b``; GQA shares heads).
        Queries and keys, already rotated if a rotary embedding applies. Their
        dtype (the same for q, k, v) is the compute precision of the logits,
        exp and the value product; the softmax state is float64.
    v : (Bk, S, Ev) ndarray, same dtype, C-contiguous
    scale : float
        Logit scale s > 0.
    relative : (Br, n+S−1, E, E) ndarray of the same dtype, optional
        General relative matrices; head ``b`` uses ``relative[ridx[b]]``; the pair
        (i, j) uses entry ``i − j + S − 1``.
    bias : (Bb, n+S−1) ndarray of float64, optional
        Relative bias (−inf masks); head ``b`` uses ``bias[bidx[b]]``, the pair
        (i, j) entry ``i − j + S − 1``. Shifted per row by :func:`bias_row_shift`
        over the keys the row sees (exact for softmax).
    key_ranges : (lo, hi, lidx), optional
        ``lo``, ``hi``: (P, n) int64; ``lidx``: (B,) int64. Row i of head b sees at
        most the keys ``lo[lidx[b], i] <= j < hi[lidx[b], i]`` (clipped to [0, S];
        empty when hi <= lo). None: every key. Causal is ``lo = 0``, ``hi = clip(i +
        offset + 1, 0, S)``; a window ``Window(left, right)`` is ``clip(i + offset −
        left, 0, S) .. clip(i + offset + right + 1, 0, S)``
        (:meth:`numbarope.bias.Structure.key_ranges`, :func:`gather_key_ranges`).
        A block of rows visits the key blocks from the smallest ``lo`` to the largest
        ``hi`` of its rows, empty rows included (give an empty row ``lo = hi`` within
        its neighbours' span), none when no row of it sees a key. ``lidx`` may be
        omitted for P = 1 or P = B.
    key_mask : (Bk', S) ndarray of float64, optional
        0 for real keys, −inf for padding; head ``b`` uses ``key_mask[kidx[b]]``.
    norms : (ndarray (B, n), ndarray (Bk, S)), optional
        Upper bounds of the row norms of (unscaled) q and of k, if the caller
        has them (:func:`row_norms`); computed otherwise.
    workers : int, optional
        Threads (scipy.fft's meaning; default all cores).
    return_lse : bool
        Also return the row log-sum-exp ``log Σ_j exp(s·logit_ij + b_ij)``.
    softcap : float > 0, optional
        Logit soft-capping (Gemma 2): the logit ``x = s·q_iᵀk_j`` (times W with
        general matrices) becomes ``c·tanh(x/c)`` before the bias is added.

    Returns
    -------
    out : (B, n, Ev) ndarray of the compute dtype
        ``softmax(s·logits + bias) @ v`` row by row over the keys each row sees;
        fully masked rows are 0.
    lse : (B, n) ndarray of float64
        Only with ``return_lse``; −inf on fully masked rows.
    """
    B, n, E = q.shape
    dt = q.dtype
    Ev = v.shape[2]
    out = np.empty((B, n, Ev), dt)
    lse = np.empty((B, n))
    if B == 0 or n == 0:
        return (out, lse) if return_lse else out
    S = k.shape[1]
    if S == 0:                       # no keys: every row is fully masked
        out[...] = 0
        lse[...] = -np.inf
        return (out, lse) if return_lse else out
    general = relative is not None
    has_bias = bias is not None
    rel = relative if general else _DUMMY_REL.astype(dt)
    ri = np.ascontiguousarray(ridx, dtype=np.int64) if general else np.zeros(B, np.int64)
    bs = np.ascontiguousarray(bias, dtype=np.float64) if has_bias else _DUMMY_BIAS
    bi = np.ascontiguousarray(bidx, dtype=np.int64) if has_bias else np.zeros(B, np.int64)
    kvi = (np.arange(B, dtype=np.int64) if kvidx is None
           else np.ascontiguousarray(kvidx, dtype=np.int64))
    has_kmask = key_mask is not None
    km = np.ascontiguousarray(key_mask, dtype=np.float64) if has_kmask else _DUMMY_BIAS
    ki = np.ascontiguousarray(kidx, dtype=np.int64) if has_kmask else np.zeros(B, np.int64)
    has_ranges = key_ranges is not None
    nthreads = resolve_workers(workers)
    lay = _layout(B, n, S, E * E if relative is not None else E + Ev, key_ranges, nthreads)
    lo, hi, li = lay.lo, lay.hi, lay.li
    softcap = 0.0 if softcap is None else float(softcap)
    if not general and not has_bias and not softcap:
        dp = decode_plan(B, n, k.shape[0], S, E, Ev, kvi, ki, has_kmask, lo, hi, li,
                         has_ranges)
        if dp is not None:
            out, lse = decode_run(dp, q, k, v, scale, km, nthreads)
            return (out, lse) if return_lse else out
    if has_bias:
        shift, sidx = _row_shifts(n, S, bs, bi, km, ki, has_kmask, lo, hi, li, has_ranges)
    else:
        shift, sidx = _DUMMY_BIAS, np.zeros(B, np.int64)
    rb, kb = lay.rb, lay.kb
    if general:
        gscale = float(scale)
        qnorm = knorm = np.zeros((1, 1))
        headroom = -np.inf
    elif n * S <= _config.EXACT_ALWAYS_MAX:
        # small heads: every block's maximum is computed (a pass over a few logits),
        # no norms are needed (their pass costs more than the maxima it saves);
        # decided by n and S alone, so a head's bits do not depend on its batch
        q = q * q.dtype.type(scale)
        gscale = 1.0
        qnorm = np.zeros((B, n))                 # read by the kernel, never decisive:
        knorm = np.zeros((k.shape[0], -(-S // kb)))          # headroom −inf
        headroom = -np.inf
    else:           # fold the scale into q: the GEMM then gives the logits (one rounding)
        q = q * q.dtype.type(scale)
        gscale = 1.0
        # bounds of the logits per row and key block, slightly enlarged for rounding
        if norms is None:
            qn0, kn0 = row_norms(q), row_norms(k)
        else:                  # bounds of ‖q‖, ‖k‖ from the caller (unscaled q)
            qn0, kn0 = norms[0] * float(scale), norms[1]
        qnorm = np.ascontiguousarray(qn0 * (1 + 1e-5))     # margin for the GEMM's rounding
        kn = kn0 * (1 + 1e-5)
        nkb = -(-S // kb)
        knorm = np.full((k.shape[0], nkb * kb), 0.0)
        knorm[:, :S] = kn
        knorm = np.ascontiguousarray(knorm.reshape(k.shape[0], nkb, kb).max(axis=2))
        # e^headroom · key_block · max|V| must stay far below the dtype's maximum
        vmax = float(np.abs(v).max(initial=0.0))
        cap = np.log(float(np.finfo(dt).max) / 16 / kb / max(vmax, 1e-300))
        headroom = float(min(EXACT_HEADROOM[np.dtype(dt)], cap))
        if headroom < 1.0:
            headroom = -np.inf          # always compute the maximum

    if softcap:
        headroom = -np.inf           # capped logits: every block's maximum is computed
    args = (q, k, v, rel, ri, general, bs, bi, has_bias, shift, sidx, gscale, rb, kb, qnorm,
            knorm, headroom, km, ki, has_kmask, kvi, lo, hi, li, has_ranges, softcap)
    if lay.inline:      # a small call: a parallel region costs more than it saves
        _exact_tasks(*args, lay.tasks, out, lse)
    else:
        with parallel(nthreads):
            for wave in lay.waves:
                _par_exact(_exact_tasks, *args, lay.tasks, wave, out, lse)
    if return_lse and has_bias:              # undo the per-row bias shift
        lse += shift[sidx]
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------ few rows (decoding)
#
# Decoding asks for one query per head (a few with grouped-query heads, or a few new
# tokens onto a cache) against a long cache: the rows of one key/value head are
# stacked (R <= DECODE_ROWS), and the keys are split into chunks of DECODE_CHUNK
# (flash-decoding): one task per (key/value head, chunk), each the online softmax of
# the main kernel over its keys in blocks of DECODE_BLOCK, with the logits and the
# value products as loops (vectorised over E; BLAS packs its operands, which for a
# few rows costs more than the product). The partial (max, sum, numerator) of the
# chunks are merged in float64, in chunk order. Every chunk boundary is a block
# boundary, so each weight passes the roundings of the main kernel's analysis
# (exact_error_bound with key_block = DECODE_BLOCK); the merge is one more
# rescale-and-add per chunk, within the float64 terms there.

@njit(cache=True, nogil=True, fastmath=_FM)
def _decode_task(q, k, v, zero, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges, block,
                 b, c0, c1, m_out, l_out, acc_out, bad_out):
    # rows r of key/value head b (q[b, r], already scaled) against keys c0 .. c1 - 1;
    # writes the chunk's running maximum, sum and numerator (float64)
    R, E = q.shape[1], q.shape[2]
    Ev = v.shape[2]
    S = np.empty((R, block), q.dtype)
    tmp = np.empty((R, Ev), q.dtype)
    acc = np.zeros((R, Ev))
    mx = np.full(R, -np.inf)
    den = np.zeros(R)
    lr = lidx[b]
    bad = False
    for j0 in range(c0, c1, block):
        j1 = min(j0 + block, c1)
        nb = j1 - j0
        jj = 0                      # four keys at a time: four independent dot chains
        while jj + 4 <= nb:
            k0 = k[b, j0 + jj]
            k1 = k[b, j0 + jj + 1]
            k2 = k[b, j0 + jj + 2]
            k3 = k[b, j0 + jj + 3]
            for r in range(R):
                qr = q[b, r]
                x0 = zero
                x1 = zero
                x2 = zero
                x3 = zero
                for e in range(E):
                    qe = qr[e]
                    x0 += qe * k0[e]
                    x1 += qe * k1[e]
                    x2 += qe * k2[e]
                    x3 += qe * k3[e]
                S[r, jj] = x0
                S[r, jj + 1] = x1
                S[r, jj + 2] = x2
                S[r, jj + 3] = x3
            jj += 4
        for j in range(jj, nb):
            kr = k[b, j0 + j]
            for r in range(R):
                qr = q[b, r]
                x = zero
                for e in range(E):
                    x += qr[e] * kr[e]
                S[r, j] = x
        any_row = False
        for r in range(R):
            row = S[r]
            for jj in range(nb):        # a non-finite logit: NaN/inf in q or k (any key,
                bad |= not np.isfinite(row[jj])     # padded or not) or beyond the dtype
            ja = 0
            jb = nb
            if has_ranges:
                ja = min(max(lo[lr, r] - j0, 0), nb)
                jb = max(min(hi[lr, r] - j0, nb), ja)
            for jj in range(ja):
                row[jj] = -np.inf
            for jj in range(jb, nb):
                row[jj] = -np.inf
            if has_kmask:
                km = kmask[kidx[b]]
                for jj in range(ja, jb):
                    row[jj] += km[j0 + jj]
            bm = -np.inf
            for jj in range(ja, jb):
                y = row[jj]
                bm = y if y > bm else bm
            if _online_update(row, nb, bm, r, mx, den, acc):
                any_row = True
        if not any_row:
            continue
        tmp[:, :] = 0.0
        jj = 0                      # four keys at a time: one update of tmp per four
        while jj + 4 <= nb:
            v0 = v[b, j0 + jj]
            v1 = v[b, j0 + jj + 1]
            v2 = v[b, j0 + jj + 2]
            v3 = v[b, j0 + jj + 3]
            for r in range(R):
                p0 = S[r, jj]
                p1 = S[r, jj + 1]
                p2 = S[r, jj + 2]
                p3 = S[r, jj + 3]
                tr = tmp[r]
                for c in range(Ev):
                    tr[c] += p0 * v0[c] + p1 * v1[c] + p2 * v2[c] + p3 * v3[c]
            jj += 4
        for j in range(jj, nb):
            vr = v[b, j0 + j]
            for r in range(R):
                p = S[r, j]
                tr = tmp[r]
                for c in range(Ev):
                    tr[c] += p * vr[c]
        for r in range(R):
            for c in range(Ev):
                acc[r, c] += tmp[r, c]
    m_out[:] = mx
    l_out[:] = den
    acc_out[:, :] = acc
    bad_out[0] = bad


@njit(cache=True, parallel=True)
def _par_decode(q, k, v, zero, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges, block,
                tasks, M, L, A, F):
    # the decoding kernel's parallel loop. It calls its kernel directly (compiled into
    # the loop, not through prange_loop's function pointer): decoding calls take
    # microseconds, and the pointer's conversion on every call cost ~50 µs; this is
    # the kernel's only entry point, so it is compiled once all the same.
    for t in prange(tasks.shape[0]):
        _decode_task(q, k, v, zero, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges, block,
                     tasks[t, 0], tasks[t, 1], tasks[t, 2], M[t], L[t], A[t], F[t:t + 1])


@njit(cache=True, nogil=True)
def _consecutive(kvidx, g):
    # kvidx[b] == b // g for every b
    for b in range(kvidx.shape[0]):
        if kvidx[b] != b // g:
            return False
    return True


@njit(cache=True, nogil=True)
def _decode_merge(M, L, A, F, first, out, lse):
    # the chunks first[b] .. first[b+1] - 1 of key/value head b, merged in order; a head
    # with a non-finite logit (F) gets NaN rows (NaN/inf inputs: the callers refuse)
    Bk, R, Ev = out.shape
    for b in range(Bk):
        bad = False
        for t in range(first[b], first[b + 1]):
            bad |= F[t]
        if bad:
            for r in range(R):
                for c in range(Ev):
                    out[b, r, c] = np.nan
                lse[b, r] = np.nan
            continue
        for r in range(R):
            m = -np.inf
            for t in range(first[b], first[b + 1]):
                m = max(m, M[t, r])
            if m == -np.inf:
                for c in range(Ev):
                    out[b, r, c] = 0.0
                lse[b, r] = -np.inf
                continue
            den = 0.0
            num = np.zeros(Ev)
            for t in range(first[b], first[b + 1]):
                if M[t, r] == -np.inf:
                    continue
                f = np.exp(M[t, r] - m)
                den += L[t, r] * f
                for c in range(Ev):
                    num[c] += A[t, r, c] * f
            inv = 1.0 / den
            for c in range(Ev):
                out[b, r, c] = num[c] * inv
            lse[b, r] = m + np.log(den)


def _decode_stack(B, n, kvidx, Bk, kidx, has_kmask, lidx, has_ranges):
    """Group size g when the query heads of each key/value head are g consecutive heads
    with one key mask and one range row each, and g·n <= DECODE_ROWS; else 0."""
    if B % Bk:
        return 0
    g = B // Bk
    if g * n > _config.DECODE_ROWS or not _consecutive(kvidx, g):
        return 0
    for idx, has in ((kidx, has_kmask), (lidx, has_ranges)):
        if has and not np.all(idx.reshape(Bk, g) == idx[::g, None]):
            return 0
    return g


class DecodePlan(NamedTuple):
    """What the decoding kernel needs beyond the arrays, fixed by the shapes and the
    index arrays (:func:`decode_plan`); a caller that sees the same shapes again (a
    model's layers and steps) keeps it and calls :func:`decode_run`."""

    B: int
    n: int
    Bk: int
    g: int
    kib: np.ndarray           # (Bk,) key-mask row of each key/value head
    has_kmask: bool
    lo: np.ndarray            # (rows, g·n) key ranges of the stacked rows
    hi: np.ndarray
    lidx: np.ndarray          # (Bk,)
    has_ranges: bool
    block: int
    tasks: np.ndarray         # (T, 3) (head, start, stop)
    first: np.ndarray         # (Bk + 1,)
    threads: bool             # worth more than one thread


def decode_plan(B, n, Bk, S, E, Ev, kvidx, kidx, has_kmask, lo, hi, lidx, has_ranges):
    """The :class:`DecodePlan` of q (B, n, E) on k (Bk, S, E), v (Bk, S, Ev) with the
    index arrays of :func:`exact_attention` (int64, ``lo``/``hi`` (rows, n)), or None
    when the call is not for the decoding kernel (too many rows per key/value head,
    heads not grouped consecutively, or masks that differ inside a group)."""
    g = _decode_stack(B, n, kvidx, Bk, kidx, has_kmask, lidx, has_ranges)
    if not g:
        return None
    kib = np.ascontiguousarray(kidx[::g]) if has_kmask else np.zeros(Bk, np.int64)
    if has_ranges:          # a range row per stacked row: rows of g heads share lidx
        lr = lidx[::g]
        lo2 = np.ascontiguousarray(np.tile(lo[lr], (1, g)))
        hi2 = np.ascontiguousarray(np.tile(hi[lr], (1, g)))
        li2 = np.arange(Bk, dtype=np.int64)
    else:
        lo2, hi2, li2 = _DUMMY_RANGE, _DUMMY_RANGE, np.zeros(Bk, np.int64)
    block, tasks, first = _decode_plan(Bk, S, int(_config.DECODE_BLOCK),
                                       int(_config.DECODE_CHUNK))
    # the parallel region costs a few microseconds: worth it from a few thousand
    # row-key products of work per thread
    work = float(Bk) * g * n * S * (E + Ev)
    return DecodePlan(B, n, Bk, g, kib, has_kmask, lo2, hi2, li2, has_ranges, block,
                      tasks, first, tasks.shape[0] > 1 and work >= _config.DECODE_PARALLEL)


def decode_run(plan, q, k, v, scale, km, nthreads):
    """``(out (B, n, Ev), lse (B, n) float64)`` of the decoding kernel under ``plan``
    (:func:`decode_plan`); q (B, n, E), k, v C-contiguous of one dtype, ``km`` the
    (rows, S) float64 key mask (0 / −inf) or a dummy when the plan has none."""
    B, n, E = q.shape
    Bk = plan.Bk
    Ev = v.shape[2]
    dt = q.dtype
    R = plan.g * n
    qs = (q * dt.type(scale)).reshape(Bk, R, E)
    T = plan.tasks.shape[0]
    M, L, A = np.empty((T, R)), np.empty((T, R)), np.empty((T, R, Ev))
    F = np.zeros(T, np.bool_)
    with parallel(nthreads if plan.threads else 1, blas=False, balance=False):
        _par_decode(qs, k, v, dt.type(0.0), km, plan.kib, plan.has_kmask, plan.lo,
                    plan.hi, plan.lidx, plan.has_ranges, plan.block, plan.tasks, M, L, A, F)
    out = np.empty((Bk, R, Ev), dt)
    lse = np.empty((Bk, R))
    _decode_merge(M, L, A, F, plan.first, out, lse)
    return out.reshape(B, n, Ev), lse.reshape(B, n)


@functools.lru_cache(maxsize=256)
def _decode_plan(Bk, S, block, chunk):
    """``(block, tasks, first)`` of the decoding kernel: chunks of ``chunk`` keys (a
    multiple of the block), one task ``(head, start, stop)`` each, ``first[b]`` the
    first task of head b; read-only, shared by every call of these sizes."""
    chunk = max(block, chunk // block * block)
    nch = -(-S // chunk)
    c0 = np.arange(nch, dtype=np.int64) * chunk
    tasks = np.stack([np.repeat(np.arange(Bk, dtype=np.int64), nch), np.tile(c0, Bk),
                      np.tile(np.minimum(c0 + chunk, S), Bk)], axis=1)
    first = np.arange(0, Bk * nch + 1, nch, dtype=np.int64)
    for a in (tasks, first):
        a.setflags(write=False)
    return block, tasks, first


# ------------------------------------------------------------------ the backward
#
# Gradients of the exact attention (Dao, "FlashAttention-2", arXiv:2307.08691, §3.2,
# Algorithm 2, here in two passes so that every output has one writer): with the
# logits x_ij = s·q_iᵀk_j + b_ij over the keys row i sees, P_ij = exp(x_ij − lse_i)
# recomputed from the forward's log-sum-exp, dP_ij = dO_i·v_j and
# Δ_i = dO_i·O_i = Σ_j P_ij dP_ij,
#
#     dS_ij = P_ij (dP_ij − Δ_i),   dq_i = s Σ_j dS_ij k_j,
#     dk_j = s Σ_i dS_ij q_i,       dv_j = Σ_i P_ij dO_i.
#
# Pass 1 (tasks: query head × row block) forms dq; pass 2 (tasks: key/value head ×
# key block, over the query heads of its group: GQA sums their gradients) forms dk
# and dv. Each task runs its blocks in a fixed order and writes its own rows: the
# gradients are bitwise the same for any number of threads. Working memory: the
# float64 gradients and, per thread, blocks of BWD_BLOCK² — O(n·(E+Ev)).


@njit(cache=True, nogil=True, fastmath=_FM)
def _grad_block(P, D, b, i0, j0, nk, lse, delta, bias, bidx, has_bias, rowshift, sidx,
                kmask, kidx, has_kmask, lo, hi, lr, has_ranges, softcap, tb):
    # P holds s·q_iᵀk_j and D holds dO_i·v_j of rows i0.., keys j0..; on return
    # P_ij = exp(x_ij − lse_i) (0 where row i does not see key j; by the forward's
    # exp kernel, vectorised, in P's dtype) and D = dS. softcap > 0: x_ij is
    # c·tanh(s·q_iᵀk_j / c) + b_ij, and dS carries its derivative 1 − tanh² (in tb)
    rb, kb = P.shape
    dt = P.dtype
    for r in range(rb):
        i = i0 + r
        row = P[r]
        ja = 0
        jb = kb
        if has_ranges:
            ja = min(max(lo[lr, i] - j0, 0), kb)
            jb = max(min(hi[lr, i] - j0, kb), ja)
        li = lse[b, i]
        if li == -np.inf:
            ja = jb = 0                                     # the row sees nothing
        for jj in range(ja):
            row[jj] = -np.inf
        for jj in range(jb, kb):
            row[jj] = -np.inf
        if softcap > 0.0:
            for jj in range(ja, jb):
                t = np.tanh(row[jj] / softcap)
                tb[jj] = 1.0 - t * t
                row[jj] = softcap * t
        if has_kmask:
            km = kmask[kidx[b]]
            for jj in range(ja, jb):
                row[jj] += km[j0 + jj]
        if has_bias:
            sh = rowshift[sidx[b], i]
            li = li - sh                                    # both sides shifted alike
            bb = bias[bidx[b]]
            off = i + nk - 1 - j0
            for jj in range(ja, jb):
                row[jj] = row[jj] + (bb[off - jj] - sh)
        if jb > ja:
            _exp_block(row, kb, li)                         # −inf → 0
        else:
            for jj in range(kb):
                row[jj] = 0.0
        dl = dt.type(delta[b, i])
        drow = D[r]
        for jj in range(kb):
            drow[jj] = row[jj] * (drow[jj] - dl)
        if softcap > 0.0:
            for jj in range(ja, jb):
                drow[jj] *= tb[jj]


@njit(cache=True, nogil=True)
def _grad_q_task(qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask,
                 kidx, has_kmask, kvidx, lo, hi, lidx, has_ranges, softcap, block, task, dq):
    # pass 1, one task (query head b, rows i0 .. i0+block): dq[b, rows] = Σ_j dS_ij k_j
    B, n, E = qs.shape
    nk = k.shape[1]
    dt = qs.dtype
    b = task[0]
    i0 = task[1]
    i1 = min(i0 + block, n)
    rb = i1 - i0
    hk = kvidx[b]
    lr = lidx[b]
    Pb = np.empty(rb * block, dt)
    Db = np.empty(rb * block, dt)
    G = np.empty((rb, E), dt)
    tb = np.empty(block, dt)
    jbeg = 0
    jend = nk
    if has_ranges:
        jbeg = nk
        jend = 0
        for i in range(i0, i1):
            if hi[lr, i] > lo[lr, i]:
                jbeg = min(jbeg, lo[lr, i])
                jend = max(jend, hi[lr, i])
    for j0 in range(jbeg, jend, block):
        j1 = min(j0 + block, jend)
        kb = j1 - j0
        P = Pb[:rb * kb].reshape((rb, kb))
        D = Db[:rb * kb].reshape((rb, kb))
        np.dot(qs[b, i0:i1], k[hk, j0:j1].T, P)
        np.dot(do[b, i0:i1], v[hk, j0:j1].T, D)
        _grad_block(P, D, b, i0, j0, nk, lse, delta, bias, bidx, has_bias, rowshift, sidx,
                    kmask, kidx, has_kmask, lo, hi, lr, has_ranges, softcap, tb)
        np.dot(D, k[hk, j0:j1], G)
        for r in range(rb):
            for e in range(E):
                dq[b, i0 + r, e] += G[r, e]


@njit(cache=True, nogil=True)
def _grad_kv_task(qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask,
                  kidx, has_kmask, heads, hstart, lo, hi, lidx, has_ranges, softcap, block,
                  task, dk, dv):
    # pass 2, one task (key/value head hk, keys j0 .. j0+block), over the query heads
    # heads[hstart[hk]:hstart[hk+1]] in order: dk = Σ dSᵀ·(s q), dv = Σ Pᵀ·dO
    B, n, E = qs.shape
    nk = k.shape[1]
    Ev = v.shape[2]
    dt = qs.dtype
    hk = task[0]
    j0 = task[1]
    j1 = min(j0 + block, nk)
    kb = j1 - j0
    Pb = np.empty(block * kb, dt)
    Db = np.empty(block * kb, dt)
    GK = np.empty((kb, E), dt)
    GV = np.empty((kb, Ev), dt)
    tb = np.empty(kb, dt)
    for t in range(hstart[hk], hstart[hk + 1]):
        b = heads[t]
        lr = lidx[b]
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            rb = i1 - i0
            if has_ranges:                  # rows of this block that see one of the keys
                sees = False
                for i in range(i0, i1):
                    if lo[lr, i] < j1 and hi[lr, i] > j0 and hi[lr, i] > lo[lr, i]:
                        sees = True
                        break
                if not sees:
                    continue
            P = Pb[:rb * kb].reshape((rb, kb))
            D = Db[:rb * kb].reshape((rb, kb))
            np.dot(qs[b, i0:i1], k[hk, j0:j1].T, P)
            np.dot(do[b, i0:i1], v[hk, j0:j1].T, D)
            _grad_block(P, D, b, i0, j0, nk, lse, delta, bias, bidx, has_bias, rowshift,
                        sidx, kmask, kidx, has_kmask, lo, hi, lr, has_ranges, softcap, tb)
            np.dot(P.T, do[b, i0:i1], GV)
            np.dot(D.T, qs[b, i0:i1], GK)
            for jj in range(kb):
                for e in range(E):
                    dk[hk, j0 + jj, e] += GK[jj, e]
                for c in range(Ev):
                    dv[hk, j0 + jj, c] += GV[jj, c]


@prange_loop(lambda *a: a[:21] + (a[21][0],) + a[22:])
def _par_grad_q(fn, qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask,
                kidx, has_kmask, kvidx, lo, hi, lidx, has_ranges, softcap, block, tasks, dq):
    # pass 1's parallel loop: one iteration per (query head, row block)
    for t in prange(tasks.shape[0]):
        fn(qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask, kidx,
           has_kmask, kvidx, lo, hi, lidx, has_ranges, softcap, block, tasks[t], dq)


@prange_loop(lambda *a: a[:22] + (a[22][0],) + a[23:])
def _par_grad_kv(fn, qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask,
                 kidx, has_kmask, heads, hstart, lo, hi, lidx, has_ranges, softcap, block,
                 tasks, dk, dv):
    # pass 2's parallel loop: one iteration per (key/value head, key block)
    for t in prange(tasks.shape[0]):
        fn(qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask, kidx,
           has_kmask, heads, hstart, lo, hi, lidx, has_ranges, softcap, block, tasks[t],
           dk, dv)


def exact_backward(q, k, v, out, lse, dout, scale, *, bias=None, bidx=None,
                   key_ranges=None, key_mask=None, kidx=None, kvidx=None, workers=None,
                   softcap=None, dlse=None):
    """Gradients of :func:`exact_attention` with respect to q, k and v.

    FlashAttention-2's backward (Dao 2023, §3.2), in two passes that each write their
    own rows (see the comment above ``_grad_block``): the probabilities are recomputed
    from the forward's log-sum-exp, so the memory is O(n·(E+Ev)) beyond the inputs.

    Parameters
    ----------
    q, k, v, scale, bias, bidx, key_ranges, key_mask, kidx, kvidx, workers, softcap
        As given to :func:`exact_attention` (no general relative matrices): q (B, n, E),
        k (Bk, S, E), v (Bk, S, Ev) of one dtype, C-contiguous, the precision of the
        recomputed logits and of the block products.
    out : (B, n, Ev) ndarray
        The forward's output.
    lse : (B, n) ndarray of float64
        The forward's row log-sum-exps (−inf on rows that see no key).
    dout : (B, n, Ev) ndarray
        Gradient of the loss with respect to ``out``.
    dlse : (B, n) ndarray, optional
        Gradient of the loss with respect to ``lse``: since ``∂lse_i/∂x_ij = P_ij``
        it enters as ``Δ_i − dlse_i`` (``dS_ij = P_ij (dP_ij − Δ_i + dlse_i)``).

    Returns
    -------
    dq : (B, n, E), dk : (Bk, S, E), dv : (Bk, S, Ev) ndarray of float64
        dk and dv summed over the query heads that share a key/value head. Rows that
        see no key contribute nothing.

    References
    ----------
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", arXiv:2307.08691 (2023), §3.2, Algorithm 2.
    """
    B, n, E = q.shape
    Bk, S, _ = k.shape
    Ev = v.shape[2]
    dt = q.dtype
    dq = np.zeros((B, n, E))
    dk = np.zeros((Bk, S, E))
    dv = np.zeros((Bk, S, Ev))
    if B == 0 or n == 0 or S == 0:
        return dq, dk, dv
    kvi = (np.arange(B, dtype=np.int64) if kvidx is None
           else np.ascontiguousarray(kvidx, dtype=np.int64))
    has_bias = bias is not None
    bs = np.ascontiguousarray(bias, dtype=np.float64) if has_bias else _DUMMY_BIAS
    bi = np.ascontiguousarray(bidx, dtype=np.int64) if has_bias else np.zeros(B, np.int64)
    has_kmask = key_mask is not None
    km = np.ascontiguousarray(key_mask, dtype=np.float64) if has_kmask else _DUMMY_BIAS
    ki = np.ascontiguousarray(kidx, dtype=np.int64) if has_kmask else np.zeros(B, np.int64)
    has_ranges = key_ranges is not None
    if has_ranges:
        lo, hi, li = _check_ranges(key_ranges, B, n, S)
    else:
        lo = hi = _DUMMY_RANGE
        li = np.zeros(B, np.int64)
    if has_bias:
        shift, sidx = _row_shifts(n, S, bs, bi, km, ki, has_kmask, lo, hi, li, has_ranges)
    else:
        shift, sidx = _DUMMY_BIAS, np.zeros(B, np.int64)
    qs = np.ascontiguousarray(q * dt.type(scale))
    do = np.ascontiguousarray(dout, dtype=dt)
    lse = np.ascontiguousarray(lse, dtype=np.float64)
    delta = np.einsum("bic,bic->bi", np.asarray(dout, np.float64),
                      np.asarray(out, np.float64))
    if dlse is not None:
        delta = delta - np.where(np.isneginf(lse), 0.0, np.asarray(dlse, np.float64))
    blk = int(_config.BWD_BLOCK)
    cap = 0.0 if softcap is None else float(softcap)
    common = (qs, k, v, do, lse, delta, bs, bi, has_bias, shift, sidx, km, ki, has_kmask)
    nthreads = resolve_workers(workers)
    tq = np.stack(np.broadcast_arrays(np.arange(B, dtype=np.int64)[:, None],
                                      np.arange(0, n, blk, dtype=np.int64)[None, :]),
                  axis=-1).reshape(-1, 2)
    order = np.argsort(kvi, kind="stable")          # query heads of each key/value head
    heads = np.ascontiguousarray(order, dtype=np.int64)
    hstart = np.searchsorted(kvi[order], np.arange(Bk + 1)).astype(np.int64)
    tkv = np.stack(np.broadcast_arrays(np.arange(Bk, dtype=np.int64)[:, None],
                                       np.arange(0, S, blk, dtype=np.int64)[None, :]),
                   axis=-1).reshape(-1, 2)
    with parallel(nthreads):
        _par_grad_q(_grad_q_task, *common, kvi, lo, hi, li, has_ranges, cap, blk,
                    np.ascontiguousarray(tq), dq)
        _par_grad_kv(_grad_kv_task, *common, heads, hstart, lo, hi, li, has_ranges, cap,
                     blk, np.ascontiguousarray(tkv), dk, dv)
    dq *= scale
    return dq, dk, dv


# ------------------------------------------------------------------ pairs, cost, bound

def visible_pairs(n, S, key_range=None, *, causal=False, offset=0):
    """(query, key) pairs inside the rows' key ranges: ``Σ_i max(hi_i − lo_i, 0)``.

    ``key_range`` (lo, hi), each (n,), clipped to [0, S]; without it, the causal
    pairs (``j <= i + offset``, in closed form) or all n·S.
    """
    n, S = int(n), int(S)
    if key_range is not None:
        lo = np.clip(np.asarray(key_range[0], dtype=np.int64), 0, S)
        hi = np.clip(np.asarray(key_range[1], dtype=np.int64), 0, S)
        return float(np.maximum(hi - lo, 0).sum())
    if not causal:
        return float(n) * S
    # Σ_{i<n} clip(i + offset + 1, 0, S): rows [0, a) see no key, rows [a, c) the
    # ramp i + offset + 1, rows [c, n) all S keys
    offset = int(offset)
    a = min(max(0, -offset - 1), n)
    c = min(max(S - offset - 1, a), n)
    return float((a + offset + 1 + c + offset) * (c - a) / 2 + float(S) * (n - c))



def visited_pairs(n, S, key_range=None, row_block=None, key_block=None):
    """(query, key) pairs the kernel computes: per block of ``row_block`` rows, whole
    key blocks from the smallest ``lo`` (aligned down to ``key_block``) to the largest
    ``hi`` of its rows (none when no row of it sees a key) (defaults: ``_config.EXACT_ROW_BLOCK``, ``EXACT_KEY_BLOCK``).
    Without ``key_range``, n·S. The predicted time of a window or a chunked structure
    is in these pairs, not in :func:`visible_pairs`."""
    n, S = int(n), int(S)
    if key_range is None or n == 0:
        return float(n) * S
    rb = int(row_block or _config.EXACT_ROW_BLOCK)
    kb = int(min(key_block or _config.EXACT_KEY_BLOCK, max(S, 1)))
    lo = np.clip(np.asarray(key_range[0], dtype=np.int64).reshape(1, n), 0, S)
    hi = np.clip(np.asarray(key_range[1], dtype=np.int64).reshape(1, n), 0, S)
    span, rows = _block_work(lo, hi, n, rb, kb)
    return float((span[0] * rows).sum())


def pairs_visited(n, S, offset=0, key_ranges=None):
    """The pipeline's ``HeadSpec.pairs``: :func:`visited_pairs` of the problem's
    ``key_ranges`` (lo, hi) at the default blocks; ``offset`` is already in the ranges
    (kept for the call's signature). Without ranges, n·S."""
    return visited_pairs(n, S, key_ranges)


def _gamma(k, u):
    """Higham's γ_k = k·u / (1 − k·u) (Accuracy and Stability of Numerical Algorithms, §3.1)."""
    ku = k * u
    return ku / (1.0 - ku) if ku < 1 else np.inf


def exact_error_bound(n, E, radius, radius1, vmax, precision="float64", general=False,
                      has_bias=False, key_block=None, logit_error=0.0):
    """Bound on ``max|out − o|`` of the exact kernel, o the mathematical value.

    Parameters
    ----------
    n, E : int
        Keys (S) and head_dim.
    radius : float
        Proven logit radius R >= max |s·q_iᵀW_t k_j| (not a caller's guess).
    radius1 : float
        ``s·max‖q‖·max‖W‖_F·max‖k‖`` (>= Σ_ab |s q_a W_ab k_b|); R for W = I.
    vmax : float
        max|V| of the head.
    precision : {"float64", "float32"}
        Compute precision of logits, exp and the P·V product (unit roundoff u).
    general, has_bias : bool
    key_block : int, optional
        Keys per block (default ``_config.EXACT_KEY_BLOCK``).
    logit_error : float, optional
        Absolute error of the logits from the inputs' preparation before the
        kernel, e.g. the float64 rotation (:func:`numbarope.rotary.rotation_logit_error`).

    Returns
    -------
    float
        ``2ρ/(1−ρ)·vmax + (γ_kb(u) + u + γ_{n/kb}(u₆₄) + 2u₆₄)·vmax``; ρ bounds the
        error of the weights relative to their sum (see Notes). Excludes the final
        rounding of a float32 result (added by the caller).

    Notes
    -----
    With x_ij = L_ij − m_i (the logit, bias shifted per row, minus the running
    maximum; |m_i| <= R because the shifted bias is 0 at the row's largest
    visible bias and <= 0 elsewhere):

    * the logit's dot product, the rounding of rotated inputs to the compute
      dtype and the scale: ``|ΔL| <= γ_{E+3}(u)·R₁`` (Higham §3.1; general W:
      γ_{2E+3}); the bias addition, the store and the subtraction of m:
      ``<= 3u(|x| + R + H)``, H = :data:`EXACT_HEADROOM` (the running maximum
      may trail the row's by up to H); the logits' own error from the inputs'
      preparation, ``logit_error``, adds to ``|ΔL|``;
    * exp: ``EXP_ULPS·u`` relative (:mod:`numbarope.ops._exp`);
    * hence each weight ``e^x`` is computed within ``e^x·(ρ₀)`` plus
      ``3u|x|e^x``; Σ_j |x_j|e^{x_j} <= 1.37·(ln n + 1)·Σ_j e^{x_j}, so the
      weights' total error is ``<= ρ·Σ_j e^{x_j}`` with
      ``ρ = ρ₀ + 4.2u(ln n + 1)(1 + ρ₀) + n·e^{EXP_FLUSH} + γ_{n+n/kb}(u₆₄) + 3(n/kb)u₆₄``
      (flushed weights, float64 sums and block rescalings);
    * the value product in the compute dtype adds ``γ_kb(u)·vmax`` per block,
      the value rounding ``u·vmax``, the float64 accumulation ``γ_{n/kb}(u₆₄)``.

    A perturbation of the weights by at most ``ρ`` times their sum moves a
    ratio ``Σ w v / Σ w`` by at most ``2ρ/(1−ρ)·max|v|``. Key blocks or keys a
    row does not see (key ranges, padding) give it weights exactly 0 and add
    nothing.
    """
    if n == 0 or vmax == 0.0:
        return 0.0
    dt = np.dtype(precision)
    u = 2.0 ** -24 if dt == np.float32 else 2.0 ** -53
    u64 = 2.0 ** -53
    kb = int(key_block or _config.EXACT_KEY_BLOCK)
    nb = -(-n // kb)
    R = min(float(radius), 1e300)
    R1 = min(max(float(radius1), R), 1e300)
    # the running maximum may trail the row's by up to EXACT_HEADROOM (blocks whose
    # Cauchy–Schwarz bound is within it skip the maximum pass): 3u·headroom more
    dlogit = (_gamma((2 * E if general else E) + 3, u) * R1 + 3 * u * (R + EXACT_HEADROOM[dt])
              + float(logit_error))
    if not math.isfinite(dlogit) or dlogit > 1.0:
        return np.inf
    # scalar math (not numpy): this runs once per head of every call
    rho0 = math.expm1(2 * dlogit) + EXP_ULPS[dt] * u * math.exp(2 * dlogit)
    rho = (rho0 + 4.2 * u * (math.log(n) + 1) * (1 + rho0) + n * math.exp(EXP_FLUSH[dt])
           + _gamma(n + nb, u64) + 3 * nb * u64)
    if not rho < 1:
        return np.inf
    return float(vmax * (2 * rho / (1 - rho) + _gamma(kb, u) + u + _gamma(nb, u64)
                         + 2 * u64))


class Streaming(Algorithm):
    """The exact path: blocked online softmax, BLAS products (:func:`exact_attention`).

    It serves every structure (any key ranges, bias, padding, general W_t); the
    pipeline runs it through :func:`exact_attention`, not :meth:`run`.
    """

    name = "streaming"
    fast = False
    bound_kind = "exact"

    def serves(self, structure) -> bool:
        return True

    def unavailable(self, h):
        return []

    def predict(self, h, degree=None):
        """Seconds: ``h.pairs`` (the pairs the kernel visits; n·S when None) times the
        per-pair and GEMM constants of :data:`numbarope.ops._cost.COST_CONSTANTS`."""
        c = COST_CONSTANTS
        sfx = "32" if h.compute_dtype == "float32" else ""
        pairs = float(h.n) * h.S if h.pairs is None else h.pairs
        t = pairs * (c["exact_pair" + sfx] + c["exact_flop" + sfx] * (h.E + h.Ev))
        if h.general:
            t += pairs * c["exact_general_flop"] * (h.E * h.E + h.E)
        return t

    def memory(self, h, degree=None):
        """Bytes: float64 copies of q, k, v, the output, and per-thread row/key-block
        buffers."""
        cfg = _config
        blocks = (cfg.EXACT_ROW_BLOCK * (cfg.EXACT_KEY_BLOCK + 2 * h.Ev + 2)
                  + 2 * cfg.EXACT_KEY_BLOCK + h.E)
        return 8 * (max(h.n, h.S) * (2 * h.E + 2 * h.Ev) + 2 * blocks)

    def run(self, q, k, v, scale, coef=None, **_):
        raise NotImplementedError("the exact path runs through "
                                  "numbarope.ops.streaming.exact_attention")

    def example(self, rng):
        q, k, v = (rng.standard_normal((96, 4)) * 0.4 for _ in range(3))
        return q, k, v, dict(is_causal=True, method="exact")


def predict_exact(n, E, Ev, general=False, precision="float64", S=None, key_range=None):
    """Predicted seconds of the exact kernel for one head (all threads): n query rows
    against S key rows (default n), rows seeing at most ``key_range`` (lo, hi)."""
    S = n if S is None else S
    return Streaming().predict(HeadSpec((), n, S, E, Ev, 0.0, 0.0, 0.0, general=general,
                                       compute_dtype=precision,
                                       pairs=visited_pairs(n, S, key_range)))


def exact_memory(n, E, Ev, S=None):
    """Working memory (bytes) of the exact path for one head."""
    return Streaming().memory(HeadSpec((), n, n if S is None else S, E, Ev, 0.0, 0.0, 0.0))


register(Streaming())
